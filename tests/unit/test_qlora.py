"""QLoRA: training on an int8/int4-quantized frozen base (`train.base_precision`), the adapter it
writes loading on the unquantized base in stock diffusers, and `auto` taking the research plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open

from stunning.config import ConfigError, TrainConfig
from stunning.training.quantized import resolve_base_precision, trainable_precisions
from stunning.training.trainer import train_style
from tests.factories import make_curated, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    return make_curated(tmp_path_factory.mktemp("curated"), n_train=4, n_val=1)


def _train(base: Path, family: str, curated: Path, out: Path, precision: str, research=None, **kw) -> dict:
    from stunning.families import get_family

    cfg = tiny_train_config(steps=2, batch_size=2, checkpoint_every=100, base_precision=precision,
                            target_modules=get_family(family).default_lora_targets, **kw)
    return train_style(base, family, curated, "noir", cfg, out, None, None, "cpu", sample_seeds=(), research=research)


def _keys_and_meta(adapter: Path) -> tuple[set[str], dict[str, str]]:
    with safe_open(str(adapter), framework="pt") as f:
        return set(f.keys()), dict(f.metadata() or {})


def _stock_output_changes(family: str, base: Path, adapter_dir: Path) -> float:
    """Max pixel change the adapter makes on the UNQUANTIZED base, loaded with stock diffusers only."""
    from stunning.families import absent_components, get_family

    # Stock from_pretrained; absent_components only names the optional parts the folder leaves out
    # (text_encoder_3=None for the tiny SD3), as a user would pass them.
    pipe = get_family(family).pipeline_class().from_pretrained(str(base), local_files_only=True,
                                                               **absent_components(base))
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("a red dress", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    before = image()
    pipe.load_lora_weights(str(adapter_dir))
    assert not any("Quant" in type(m).__name__ for m in pipe.components[get_family(family).lora_component].modules())
    return float(abs(image() - before).max())


def test_an_int4_base_trains_sd3_and_the_adapter_loads_on_the_unquantized_base(tmp_path, tiny_base, curated):
    # int8 on sd3: test_auto_trains_at_the_research_plans_precision; other families: the slow test.
    runs = {p: _train(tiny_base, "sd3", curated, tmp_path / p, p) for p in ("fp32", "int4")}
    fp32_keys, _ = _keys_and_meta(Path(runs["fp32"]["adapter"]))
    for precision in ("int4",):
        s = runs[precision]
        assert s["base_precision"] == precision and s["base_quantization_backend"] == "optimum-quanto"
        assert s["base_precision_source"] == "train.base_precision" and s["mixed_precision"] == "no"
        # Same seed and data: quantization perturbs the curve a little, never wrecks it.
        assert s["final_loss"] == pytest.approx(runs["fp32"]["final_loss"], rel=0.05)
        assert s["final_loss"] != runs["fp32"]["final_loss"]
        keys, meta = _keys_and_meta(Path(s["adapter"]))
        assert keys == fp32_keys  # the standard diffusers LoRA layout an fp32 run writes
        assert meta["stunning.base_precision"] == precision
        with safe_open(s["adapter"], framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118
    assert _stock_output_changes("sd3", tiny_base, Path(runs["int4"]["adapter"]).parent) > 1e-4


@pytest.mark.slow  # ~15-25 s: three more families, two precisions each, plus a stock load each
@pytest.mark.parametrize("family", ["sd-unet", "sdxl", "flux"])
def test_every_family_trains_on_a_quantized_base(tmp_path, request, curated, family):
    base = request.getfixturevalue({"sd-unet": "tiny_sd_unet", "sdxl": "tiny_sdxl", "flux": "tiny_flux"}[family])
    for precision in ("int8", "int4"):
        s = _train(base, family, curated, tmp_path / precision, precision)
        assert s["base_precision"] == precision and s["final_loss"] > 0
    assert _stock_output_changes(family, base, Path(s["adapter"]).parent) > 1e-4


def test_base_precision_config_errors_name_the_key():
    assert TrainConfig().base_precision == "auto"
    with pytest.raises(ValidationError, match="base_precision"):
        TrainConfig(base_precision="int3")
    with pytest.raises(ValidationError, match=r"train\.base_precision=bf16 .*train\.mixed_precision"):
        TrainConfig(base_precision="bf16", mixed_precision="no")
    with pytest.raises(ConfigError, match=r"train\.base_precision 'fp16'.*cannot train on cpu"):
        resolve_base_precision(TrainConfig(base_precision="fp16"), CPU)


def test_auto_keeps_todays_behaviour_without_a_plan_and_takes_the_plans_precision():
    base = resolve_base_precision(TrainConfig(), CPU)
    assert (base.precision, base.mixed_precision, base.load_dtype) == ("fp32", "no", torch.float32)
    bf16 = resolve_base_precision(TrainConfig(base_precision="bf16"), CPU)
    assert (bf16.mixed_precision, bf16.load_dtype) == ("bf16", torch.bfloat16)  # half weights, their autocast
    plan = {"plan": {"precision": "int4", "device": "cpu"}}
    got = resolve_base_precision(TrainConfig(), CPU, plan, "reports/research.json")
    assert got.precision == "int4" and got.quantized and "reports/research.json" in got.source
    assert resolve_base_precision(TrainConfig(base_precision="int8"), CPU, plan).precision == "int8"  # explicit wins
    with pytest.raises(ConfigError, match="found no precision at which training fits"):
        resolve_base_precision(TrainConfig(), CPU, {"plan": {"precision": None, "reason": "too big"}})
    with pytest.raises(ConfigError, match="no 'plan' section"):
        resolve_base_precision(TrainConfig(), CPU, {"candidates": []})


def test_every_precision_the_plan_may_recommend_is_one_the_trainer_runs():
    from stunning import research as rs

    for device, cuda in (("cpu", {}), ("mps", {}), ("cuda", {"bf16_supported": True}), ("cuda", {"bf16_supported": False})):
        allowed = rs.training_precisions({"device": device, "cuda": cuda})
        assert allowed == trainable_precisions(device, cuda.get("bf16_supported", True))
        assert set(allowed) <= set(rs.PRECISION_ORDER) and "int8" in allowed and "int4" in allowed
        assert all(rs.MIXED_PRECISION[p] in ("no", "bf16", "fp16", "auto") for p in allowed)
    for precision in rs.training_precisions({"device": "cpu"}):  # each one resolves on this CPU
        assert resolve_base_precision(TrainConfig(base_precision=precision), CPU).precision == precision
    assert rs.MIXED_PRECISION["int8"] == rs.MIXED_PRECISION["int4"] == "auto"  # never silently fp16


def test_auto_trains_at_the_research_plans_precision(tmp_path, tiny_base, curated):
    from stunning import research as rs
    from stunning.config import BaseModelConfig, ResearchCandidate, ResearchConfig

    # A GPU too small for the tiny model at 16-bit (a budget between its int8 and fp16 figures).
    research = ResearchConfig(candidates=[ResearchCandidate(name="tiny", path=str(tiny_base))])
    base = BaseModelConfig(source="local", path=str(tiny_base))
    gpu = {"device": "cuda", "memory": {"total_mb": 1e5}, "cuda": {"bf16_supported": True}}
    est = rs.build_report(research, base, gpu)["candidates"][0]["estimates"]
    budget = (est["int8"]["training_gb"] + est["fp16"]["training_gb"]) / 2 / rs.HEURISTIC["tight_fraction"] * 0.999
    report = rs.build_report(research, base, gpu, budget_gb=budget)
    assert report["plan"]["precision"] == "int8" and report["plan"]["train_base_precision"] == "int8"
    path = tmp_path / "research.json"
    path.write_text(json.dumps(report))
    s = _train(tiny_base, "sd3", curated, tmp_path / "out", "auto", research=json.loads(path.read_text()))
    assert s["base_precision"] == "int8" and s["base_precision_requested"] == "auto"
    assert "research plan" in s["base_precision_source"] and s["base_quantization_backend"] == "optimum-quanto"
    keys, meta = _keys_and_meta(Path(s["adapter"]))
    assert meta["stunning.base_precision"] == "int8" and keys and all("lora" in k for k in keys)
