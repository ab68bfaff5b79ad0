"""`stunning generate`: PNGs with A1111 parameters from the registry's champion, resumable.

A project root is made once: the shipped params.yaml and a registry whose @champion is the
tiny sd3 base with two random style LoRAs and a blend (the pattern of tests/unit/test_serve.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stunning.cli import app
from tests.factories import random_lora, seed_store

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base, one_torch_thread) -> Path:
    import torch

    from stunning.config import load_params
    from stunning.families import get_family
    from stunning.registry import register_candidate

    root = seed_store(tmp_path_factory.mktemp("generate"))
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    torch.manual_seed(0)
    pipe = get_family("sd3").load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
    for seed, folder in enumerate(("adapters/impressionist", "adapters/noir", "blends/half-half")):
        random_lora(pipe, root / "candidate" / folder, "sd3", seed, scale=0.5)
    dirs = {"adapters": root / "candidate/adapters", "blends": root / "candidate/blends"}
    gate = {"passed": True, "checks": [], "reasons": [], "candidate": {}}
    cfg = load_params(root / "params.yaml").registry
    assert register_candidate(cfg, gate, dirs, tiny_base, "sd3", {}, root=root)["promoted"]
    return root


def _run(project: Path, *args: str):
    result = runner.invoke(app, ["generate", *args, "--params", str(project / "params.yaml"), "--steps", "2",
                                 "--device", "cpu"])
    return result


def _index(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


def test_generate_writes_pngs_with_parameters_and_resumes(project, tmp_path):
    out = tmp_path / "out"
    args = ["a red dress", "a blue hat", "--style", "noir=0.7", "--style", "impressionist=-0.3",
            "--negative", "blurry", "--count", "2", "--seed", "5", "--out", str(out)]
    result = _run(project, *args)
    assert result.exit_code == 0, result.output
    assert "4 generated, 0 already there" in result.output
    index = _index(out)
    assert [(r["prompt"], r["seed"]) for r in index] == [("a red dress", 5), ("a red dress", 6), ("a blue hat", 5),
                                                        ("a blue hat", 6)]
    image = Image.open(out / index[0]["file"])
    assert image.size == (32, 32)
    assert image.text["parameters"] == (
        "a red dress\n"
        "Negative prompt: blurry\n"
        "Steps: 2, Sampler: Euler, CFG scale: 4.0, Seed: 5, Size: 32x32, Model: stunning-style, Model version: 1, "
        "Styles: noir:0.7 impressionist:-0.3"
    )
    record = json.loads(image.text["stunning"])
    assert record == index[0] and record["styles"] == {"noir": 0.7, "impressionist": -0.3}
    assert record["model_uri"] == "models:/stunning-style@champion" and record["negative_prompt"] == "blurry"

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    again = _run(project, *args)
    assert again.exit_code == 0 and "0 generated, 4 already there" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes
    (out / index[1]["file"]).unlink()  # a lost file is made again; one more seed per prompt is added
    more = _run(project, *[a if a != "2" else "3" for a in args])
    assert more.exit_code == 0 and "3 generated, 3 already there" in more.output, more.output
    assert len(_index(out)) == 6 and len(list(out.glob("*.png"))) == 6


def test_a_saved_blend_draws_what_its_weights_draw(project, tmp_path):
    from stunning.studio.blends import SavedBlend, save_blend

    save_blend(SavedBlend("dusk", {"noir": 0.7, "impressionist": -0.3}, "blurry"), project / "studio/blends")
    saved = _run(project, "a red dress", "--blend", "dusk", "--out", str(tmp_path / "saved"))
    explicit = _run(project, "a red dress", "--style", "noir=0.7", "--style", "impressionist=-0.3",
                    "--negative", "blurry", "--out", str(tmp_path / "explicit"))
    assert saved.exit_code == 0 and explicit.exit_code == 0, saved.output + explicit.output
    [a], [b] = _index(tmp_path / "saved"), _index(tmp_path / "explicit")
    assert a["key"] == b["key"] and a["negative_prompt"] == "blurry"
    pixels = [np.asarray(Image.open(d / r["file"])) for d, r in ((tmp_path / "saved", a), (tmp_path / "explicit", b))]
    assert np.array_equal(*pixels)
    registered = _run(project, "a red dress", "--blend", "half-half", "--out", str(tmp_path / "registered"))
    assert registered.exit_code == 0 and _index(tmp_path / "registered")[0]["blend"] == "half-half"
    assert "Styles: half-half:1" in Image.open(tmp_path / "registered" / _index(tmp_path / "registered")[0]["file"]
                                              ).text["parameters"]


def test_bad_input_fails_with_a_message_and_no_images(project, tmp_path):
    out = tmp_path / "out"
    cases = [
        (["a hat", "--style", "cubism=0.5"], "available styles: ['impressionist', 'noir']"),
        (["a hat", "--style", "noir=3"], "[-2, 2]"),
        (["a hat", "--style", "noir=lots"], "'lots' is not a number"),
        (["a hat", "--style", "noir", "--blend", "half-half"], "not both"),
        (["a hat", "--blend", "nope"], "no blend 'nope'"),
        (["a hat", "--sampler", "ddim"], "unknown sampler 'ddim'"),
        (["--prompts", str(tmp_path / "missing.txt")], "missing.txt: cannot read the prompt file"),
        (["a hat", "--model", "models:/nothing@champion"], "no model named 'nothing'"),
    ]
    for args, message in cases:
        result = _run(project, *args, "--out", str(out))
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
    assert not list(out.glob("*.png"))


def test_prompts_come_from_a_file(project, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na green bag\n\na black hat\n")
    result = _run(project, "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--sampler", "euler-ancestral")
    assert result.exit_code == 0, result.output
    index = _index(tmp_path / "out")
    assert [r["prompt"] for r in index] == ["a green bag", "a black hat"]
    assert "Sampler: Euler a" in Image.open(tmp_path / "out" / index[0]["file"]).text["parameters"]
