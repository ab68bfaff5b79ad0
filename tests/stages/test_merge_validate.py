"""Stages `merge` and `validate` end to end on tiny inputs: files, formats, gate verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.factories import make_colour_vs_grey, random_lora

# The module fixture runs the merge stage: blends, a fused model and a two-level quantization
# ladder (~70 s on 2 cores), so the whole module is slow (`make test` runs it, test-fast does not).
pytestmark = pytest.mark.slow

STYLES = ("impressionist", "noir")


@pytest.fixture(scope="module")
def project(tiny_base, tmp_path_factory) -> Path:
    """A tiny project: params, two adapters, a curated set, and the merge stage run once."""
    from stages import merge

    root = tmp_path_factory.mktemp("project")
    params = {
        "base": {"path": str(tiny_base)},
        "data": {"styles": list(STYLES)},
        "merge": {"blends": [{"name": "half-half", "weights": {"impressionist": 0.5, "noir": 0.5}}], "fuse": "half-half"},
        "validate": {"prompts": ["a red dress on a white background", "a blue hat on a grey background"],
                     "seeds": [0], "steps": 2, "guidance_scale": 4.0},
        "budgets": {"max_latency_s": 60.0, "min_style_gain": -10.0},
    }
    params["merge"].update(quantization=["int8", "int4"], target_device="apple-8gb", style_set_size=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for i, style in enumerate(STYLES):
        random_lora(tiny_base, root / "adapters" / style, "sd3", seed=i + 1)
    make_colour_vs_grey(root / "curated")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the MLflow store of the run the stage logs: the project's own
        merge.main(merge_args(root, tiny_base))
    return root


def merge_args(root: Path, tiny_base: Path, reports: str = "reports", out: str = "merged") -> list[str]:
    """The merge stage's command line as dvc.yaml writes it (target: an Apple chip, no research plan needed)."""
    r = root / reports
    return [
        "--params", str(root / "params.yaml"), "--base", str(tiny_base), "--adapters", str(root / "adapters"),
        "--out", str(root / out), "--report", str(r / "merge.json"), "--data", str(root / "curated"),
        "--quantize-report", str(r / "quantize.json"), "--quantize-md", str(r / "quantize.md"),
        "--grid", str(r / "quantize_grid.png"), "--plot-csv", str(r / "quantize_plot.csv"), "--device", "cpu",
    ]


def validate_args(root: Path, tiny_base: Path, tag: str, *extra: str) -> list[str]:
    return [
        "--params", str(root / "params.yaml"), "--base", str(tiny_base), "--adapters", str(root / "adapters"),
        "--merged", str(root / "merged"), "--data", str(root / "curated"), "--out", str(root / tag / "validation"),
        "--metrics", str(root / tag / "validation.json"), "--gate", str(root / tag / "gate.json"),
        "--merge-report", str(root / "reports" / "merge.json"), "--champion", str(no_champion(root)),
        "--quantize-report", str(root / "reports" / "quantize.json"),
        "--device", "cpu", *extra,
    ]


def no_champion(root: Path) -> Path:
    """A champion record of a registry without a champion (what the champion stage writes then)."""
    record = root / "no-champion.json"
    if not record.is_file():
        record.write_text(json.dumps({"model_name": "stunning-style", "version": None}))
    return record


def test_merge_stage_outputs(project):
    merged = project / "merged"
    assert (merged / "blends" / "half-half" / "pytorch_lora_weights.safetensors").is_file()
    assert (merged / "blends" / "half-half" / "blend.yaml").is_file()
    assert (merged / "fused" / "model_index.json").is_file()
    q = json.loads((project / "reports" / "quantize.json").read_text())
    assert q["mode"] == "ladder" and q["ladder"] == ["int8", "int4"] and q["target"]["name"] == "apple-8gb"
    assert q["budgets"] == {"min_psnr": 30.0, "max_style_gain_loss": 0.05}
    assert q["reference"]["denoiser_bytes"] > 0 and q["reference"]["latency_s"] > 0
    by = {e["level"]: e for e in q["levels"]}
    for name in ("int8", "int4"):  # quanto runs everywhere; each level is on disk with its base denoiser
        e = by[name]
        assert e["runs"] and e["denoiser_bytes"] < q["reference"]["denoiser_bytes"]
        assert (merged / "quantized" / name / "quantization_map.json").is_file()
        assert (merged / "quantized" / name / "base" / "quantization_map.json").is_file()
        assert set(e["variants"]) == {"half-half", *STYLES}
        for v in e["variants"].values():
            assert v["psnr"] > 0 and 0 < v["ssim"] <= 1 and v["peak_memory_mb"] > 0 and v["latency_s"] > 0
        for style in STYLES:
            v = e["variants"][style]
            assert v["kind"] == "adapter"
            assert v["style_gain_loss"] == pytest.approx(v["style_gain_fp32"] - v["style_gain"], abs=2e-6)
    assert by["int4"]["denoiser_bytes"] < by["int8"]["denoiser_bytes"]
    assert q["chosen"] in {e["level"] for e in q["levels"] if e["passes"]} and q["why"]
    index = json.loads((merged / "quantized" / "quantized.json").read_text())
    assert index["chosen"] == q["chosen"] == index["load"]
    rep = json.loads((project / "reports" / "merge.json").read_text())
    chosen = by[q["chosen"]]
    assert rep["quantization"] == q["chosen"] and rep["size_ratio"] == chosen["size_ratio"]
    assert rep["quantization_mse"] == chosen["variants"]["half-half"]["mse"]
    assert rep["blends"]["half-half"]["rank"] == 8
    csv_rows = (project / "reports" / "quantize_plot.csv").read_text().splitlines()
    assert csv_rows[0] == "level,bytes,psnr,ssim,style_gain_loss" and len(csv_rows) == 1 + sum(e["runs"] for e in q["levels"])
    assert "| int8 |" in (project / "reports" / "quantize.md").read_text()
    with Image.open(project / "reports" / "quantize_grid.png") as grid:
        assert grid.height > (1 + sum(e["runs"] for e in q["levels"])) * 96
    assert not list(project.glob(".merged*"))  # no temporary folders left behind
    # recorded source paths (e.g. each level's quantized.json "source") name the published folder
    texts = [p for p in merged.rglob("*") if p.suffix in (".json", ".yaml") and p.stat().st_size < 1 << 20]
    assert texts and not [p for p in texts if f"{project}/.merged." in p.read_text()]


def test_validate_stage_writes_reports_grid_and_a_passing_gate(project, tiny_base, monkeypatch, capsys):
    from stages import validate

    monkeypatch.chdir(project)  # no registry database here: no champion
    validate.main(validate_args(project, tiny_base, "run1"))
    out = project / "run1"
    gate = json.loads((out / "gate.json").read_text())
    body = json.loads((out / "validation.json").read_text())
    expected = {"base", "adapter-impressionist", "adapter-noir", "blend-half-half", "fused", "quantized"}
    assert set(body["variants"]) == expected
    for v in body["variants"].values():
        assert set(v["style_distance"]) == set(STYLES)
        assert v["latency_s"] > 0 and v["peak_memory_mb"] > 0 and v["images"] == 2
    assert body["variants"]["base"]["distance_to_base"] == 0
    assert body["variants"]["adapter-noir"]["pixel_mse_to_base"] > 0  # the adapter changes the output
    assert set(body["style_gain"]) == set(STYLES) and body["gate_passed"] is gate["passed"]
    assert gate["passed"] is True, gate["reasons"]
    quantize = json.loads((project / "reports" / "quantize.json").read_text())
    assert gate["quantization"]["level"] == quantize["chosen"] and gate["quantization"]["why"] == quantize["why"]
    assert {c["name"] for c in gate["checks"]} >= {"style_gain/noir", "latency_s", "quantization_mse", "vs_champion"}
    assert gate["candidate"]["metrics"]["style_gain/noir"] == pytest.approx(body["style_gain"]["noir"], abs=1e-6)
    with Image.open(out / "validation" / "grid.png") as grid:
        assert grid.width > 2 * 96 and grid.height > 6 * 96
    assert len(list((out / "validation" / "fused").glob("*.png"))) == 2
    # the gain is content-matched: base and adapter drew the six references' captions
    assert body["style_set_images"] == {"impressionist": 6, "noir": 6}
    for style in STYLES:
        for kind in ("base", "adapter"):
            assert len(list((out / "validation" / "style-sets" / f"{style}-{kind}").glob("*.png"))) == 6
        info = body["adapters"][style]
        assert body["style_gain"][style] == pytest.approx(1 - info["own_distance"] / info["base_distance"], abs=1e-5)
        assert {"fixed_prompts_own_distance", "fixed_prompts_base_distance"} <= set(info)
        assert len(body["style_residual"][style]) == 3
    assert "GATE PASSED" in capsys.readouterr().out


def test_validate_gate_fails_on_champion_regression_but_exits_zero(project, tiny_base, capsys):
    from stages import validate

    champion = project / "champion.json"
    champion.write_text(json.dumps({"style_gain/noir": 100.0, "style_gain/impressionist": 100.0}))
    # a cheaper run: one prompt, one step (the verdict, not the images, is under test here)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["validate"].update(prompts=["a red dress on a white background"], steps=1)
    (project / "params-quick.yaml").write_text(yaml.safe_dump(params))
    args = validate_args(project, tiny_base, "run2", "--champion-metrics", str(champion))
    args[args.index("--params") + 1] = str(project / "params-quick.yaml")
    validate.main(args)  # no SystemExit: a failed gate is a result
    gate = json.loads((project / "run2" / "gate.json").read_text())
    assert gate["passed"] is False
    assert any(r.startswith("vs_champion/style_gain/noir") for r in gate["reasons"])
    assert gate["champion"]["style_gain/noir"] == 100.0
    assert json.loads((project / "run2" / "validation.json").read_text())["gate_passed"] is False
    assert "GATE FAILED" in capsys.readouterr().out


def test_validate_missing_curated_manifest_exits_2(project, tiny_base, tmp_path, capsys):
    from stages import validate

    args = validate_args(project, tiny_base, "run3")
    args[args.index("--data") + 1] = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exc:
        validate.main(args)
    assert exc.value.code == 2
    assert "manifest.csv" in capsys.readouterr().err
    assert not (project / "run3" / "gate.json").exists()


def test_plain_prompt_inverts_the_adapter_prompt_template():
    from stunning.config import ValidateConfig
    from stunning.validation import adapter_prompt, plain_prompt

    cfg = ValidateConfig()
    assert plain_prompt(cfg, "a red dress on a white background, noir style", "noir") == "a red dress on a white background"
    assert plain_prompt(cfg, "a red dress, impressionist style", "noir") == "a red dress, impressionist style"
    assert plain_prompt(cfg, ", noir style", "noir") == ", noir style"  # nothing would be left: kept as it is
    trigger = ValidateConfig(adapter_prompt="sks {style}, {prompt}")
    assert plain_prompt(trigger, "sks noir, a hat", "noir") == "a hat"
    assert adapter_prompt(trigger, plain_prompt(trigger, "sks noir, a hat", "noir"), "noir") == "sks noir, a hat"
    bare = ValidateConfig(adapter_prompt="{prompt}")
    assert plain_prompt(bare, "a hat", "noir") == "a hat"


@pytest.mark.slow  # trains a tiny adapter (~10 s)
def test_eval_loss_is_lower_with_an_adapter_trained_on_the_style(project, tiny_base, tmp_path, one_torch_thread):
    """The held-out denoising loss: same val images, timesteps and noise for base and adapter;
    an adapter trained a few steps on the style's train images lowers it on its val images."""
    import torch

    from stunning.families import get_family
    from stunning.training.trainer import train_style
    from stunning.validation import eval_losses
    from tests.factories import make_curated, tiny_train_config

    data = make_curated(tmp_path / "curated", n_train=4, n_val=2)
    style = "noir"
    cfg = tiny_train_config(steps=40, learning_rate=5e-3)
    train_style(tiny_base, "sd3", data, style, cfg, tmp_path / "adapters", None, None, device="cpu", sample_seeds=())
    fam = get_family("sd3")
    pipe = fam.load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
    report = eval_losses(fam, pipe, data, [style, "absent"], {style: tmp_path / "adapters" / style},
                         champion_adapters=tmp_path / "adapters")
    e = report[style]
    assert e["measured"] and e["val_images"] == 2 and e["repeats"] == 4
    assert e["adapter"] < e["base"] and e["gain"] == pytest.approx(1 - e["adapter"] / e["base"], abs=1e-6)
    assert e["gain_std"] >= 0 and e["base_std"] > 0
    assert e["champion"] == pytest.approx(e["adapter"])  # same weights, same noise: same loss
    assert report["absent"]["measured"] is False and "no val images" in report["absent"]["reason"]
    again = eval_losses(fam, pipe, data, [style], {style: tmp_path / "adapters" / style})
    assert again[style]["base"] == e["base"] and again[style]["adapter"] == e["adapter"]  # fixed noise


def test_validate_reads_the_champion_record_and_obeys_gate_modes(project, tiny_base, capsys):
    from stages import validate

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["validate"].update(prompts=["a red dress on a white background"], steps=1, style_set_size=2)
    params["gate"] = {"mode": "disabled"}
    (project / "params-off.yaml").write_text(yaml.safe_dump(params))
    record = project / "champion-record.json"
    record.write_text(json.dumps({"model_name": "m", "version": 7, "content_hash": "abc", "adapters": None,
                                  "metrics": {"style_gain/noir": 100.0}}))
    args = validate_args(project, tiny_base, "run4", "--champion", str(record))
    args[args.index("--params") + 1] = str(project / "params-off.yaml")
    validate.main(args)
    gate = json.loads((project / "run4" / "gate.json").read_text())
    body = json.loads((project / "run4" / "validation.json").read_text())
    assert gate["mode"] == "disabled" and gate["passed"] is False and gate["checks"] == []
    assert "disabled" in gate["reasons"][0] and "GATE DISABLED" in capsys.readouterr().out
    assert gate["champion"] == {"style_gain/noir": 100.0} and "v7" in gate["candidate"]["champion_source"]
    assert len(gate["candidate"]["content_hash"]) == 64
    for style in STYLES:
        e = body["eval_loss"][style]
        assert e["measured"] and e["gain"] == pytest.approx(1 - e["adapter"] / e["base"], abs=1e-6)
        assert gate["candidate"]["metrics"][f"eval_gain/{style}"] == pytest.approx(e["gain"])


def _cache_clip(cache: Path, repo_id: str) -> Path:
    """A tiny random CLIP model placed in a Hugging Face hub cache as `repo_id` (offline)."""
    from stunning.tiny import build_clip

    revision = "0" * 40
    model = cache / f"models--{repo_id.replace('/', '--')}"
    build_clip(model / "snapshots" / revision)
    (model / "refs").mkdir()
    (model / "refs" / "main").write_text(revision)
    return model


def test_validate_reports_clip_scores_from_the_local_hub_cache(project, tiny_base, tmp_path, monkeypatch):
    """validate.clip_model: a CLIP model found in the local HF cache scores every adapter, the
    report names it and the gate checks the scores; a model that is not cached is reported as
    not measured (with the command that fetches it) and validation still completes."""
    import huggingface_hub.constants as hub
    import yaml

    from stages import validate

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _cache_clip(tmp_path / "hub", "tiny/clip")
    params = yaml.safe_load((project / "params.yaml").read_text())
    for tag, name in (("clip", "tiny/clip"), ("clip-missing", "absent/clip")):
        params["validate"]["clip_model"] = name
        (project / f"{tag}.yaml").write_text(yaml.safe_dump(params))
        args = validate_args(project, tiny_base, tag)
        args[1] = str(project / f"{tag}.yaml")
        validate.main(args)
    body = json.loads((project / "clip" / "validation.json").read_text())
    clip = body["clip"]
    assert clip["measured"] and clip["model"] == "tiny/clip" and "snapshots" in clip["source"]
    for style in STYLES:
        s = clip["styles"][style]
        for key in ("text_image_base", "text_image_adapter", "style_image_base", "style_image_adapter"):
            assert -1.0 <= s[key] <= 1.0
        assert s["style_gain"] == pytest.approx(s["style_image_adapter"] - s["style_image_base"], abs=2e-6)
        assert s["adherence_drop"] == pytest.approx(s["text_image_base"] - s["text_image_adapter"], abs=2e-6)
    assert s["style_image_adapter"] != s["style_image_base"]  # the adapter's images embed differently
    gate = json.loads((project / "clip" / "gate.json").read_text())
    check = next(c for c in gate["checks"] if c["name"] == "clip_style_gain/noir")
    assert check["verdict"] == "pass" and "tiny/clip" in check["detail"]
    missing = json.loads((project / "clip-missing" / "validation.json").read_text())["clip"]
    assert not missing["measured"] and "hf download absent/clip" in missing["reason"]
    gate = json.loads((project / "clip-missing" / "gate.json").read_text())
    assert "clip_style_gain" in {x["name"] for x in gate["not_evaluated"]}
