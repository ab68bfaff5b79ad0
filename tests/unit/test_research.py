"""Research phase: parameter counts from configs, memory estimates, the plan."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stunning import research as rs  # noqa: E402
from stunning.config import (  # noqa: E402
    BaseModelConfig,
    ConfigError,
    ResearchCandidate,
    ResearchConfig,
    TrainConfig,
)
from tests.factories import SMALL_CLIP, SMALL_UNET, SMALL_VAE, make_config_only_sd_folder  # noqa: E402

CPU_INFO = {"device": "cpu", "memory": {"total_mb": 16 * 1024.0}, "cuda": {}, "mps": {}}


def _real_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_count_parameters_matches_real_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    assert rs.count_parameters("UNet2DConditionModel", SMALL_UNET) == _real_count(UNet2DConditionModel(**SMALL_UNET))
    assert rs.count_parameters("AutoencoderKL", SMALL_VAE) == _real_count(AutoencoderKL(**SMALL_VAE))
    assert rs.count_parameters("CLIPTextModel", SMALL_CLIP) == _real_count(CLIPTextModel(CLIPTextConfig(**SMALL_CLIP)))


def test_meta_instantiation_allocates_no_storage():
    model = rs.instantiate_meta("UNet2DConditionModel", SMALL_UNET)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_unknown_class_is_a_clear_error():
    with pytest.raises(ValueError, match="NoSuchModel"):
        rs.count_parameters("NoSuchModel", {})


def test_lora_count_matches_peft():
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    layers = rs.lora_layers(rs.instantiate_meta("UNet2DConditionModel", SMALL_UNET), targets)
    assert layers and all(name.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for name, _, _ in layers)
    unet = UNet2DConditionModel(**SMALL_UNET)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert rs.lora_parameter_count(layers, rank=4) == trainable


@pytest.mark.parametrize("blocks", [[], ["down_blocks.0"], ["up_blocks.1.attentions.0"]])
def test_the_configured_adapter_is_counted_as_the_trainer_makes_it(blocks):
    """train.target_modules/target_blocks on a UNet: Linear and (1x1 proj_in/out) Conv2d layers, as PEFT adapts."""
    from diffusers import UNet2DConditionModel

    from stunning.training.adapter import lora_config

    train = TrainConfig(target_blocks=blocks)  # the shipped sd3 list; proj_out is a Conv2d in this UNet
    layers = rs.lora_layers(rs.instantiate_meta("UNet2DConditionModel", SMALL_UNET), train.target_modules, blocks)
    unet = UNet2DConditionModel(**SMALL_UNET)
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(train))
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert layers and rs.lora_parameter_count(layers, rank=train.rank) == trainable
    assert {n.split(".lora_A")[0] for n, _ in unet.named_parameters() if ".lora_A" in n} == {n for n, _, _ in layers}
    assert any(isinstance(unet.get_submodule(n).base_layer, torch.nn.Conv2d) for n, _, _ in layers)


def test_the_report_sizes_train_rank_and_targets(tmp_path):
    folder = make_config_only_sd_folder(tmp_path / "model")
    research = ResearchConfig(candidates=[ResearchCandidate(name="mine", path=str(folder))])
    base = BaseModelConfig(source="local", path=str(folder))
    shipped = rs.build_report(research, base, CPU_INFO)  # no train section given: TrainConfig()'s = params.yaml's
    assert shipped == rs.build_report(research, base, CPU_INFO, train=TrainConfig())
    assert shipped["lora_rank"] == TrainConfig().rank and shipped["lora_targets"] == TrainConfig().target_modules
    small = rs.build_report(research, base, CPU_INFO, train=TrainConfig(rank=2, target_modules=["to_q"]))
    lora, small_lora = shipped["candidates"][0]["lora"], small["candidates"][0]["lora"]
    assert small_lora["rank"] == 2 and small_lora["targets"] == ["to_q"] and 0 < small_lora["layers"] < lora["layers"]
    assert small_lora["params"] < lora["params"]
    assert small["candidates"][0]["estimates"]["fp32"]["training_gb"] < shipped["candidates"][0]["estimates"]["fp32"]["training_gb"]
    md = rs.render_markdown(small)
    assert "LoRA rank 2 on to_q (train.rank" in md and "| mine | LoRA (rank 2) |" in md
    blocks = rs.build_report(research, base, CPU_INFO, train=TrainConfig(target_blocks=["down_blocks.0"]))
    assert 0 < blocks["candidates"][0]["lora"]["layers"] < lora["layers"] and blocks["lora_blocks"] == ["down_blocks.0"]


def test_sd15_reference_counts():
    cand = rs.size_candidate(ResearchCandidate(name="sd15", preset="sd15-reference"), lora_rank=4,
                             targets=rs.ATTENTION_LORA_TARGETS)
    counts = {name: c["params"] for name, c in cand["components"].items()}
    assert counts["unet"] == pytest.approx(859.5e6, rel=0.02)
    assert counts["vae"] == pytest.approx(83.7e6, rel=0.02)
    assert counts["text_encoder"] == pytest.approx(123.1e6, rel=0.02)
    assert cand["resolution"] == 512
    assert cand["lora"]["layers"] == 128  # 16 transformer blocks x 2 attentions x q/k/v/out


def test_estimates_monotone_in_precision():
    shape = rs.DenoiserShape(tokens=4096, width=320, heads=8, attn_tokens=4096, latent_size=64)
    est = {p: rs.estimate_memory(1_066_000_000, 800_000, shape, 512, 128, p) for p in rs.PRECISION_ORDER}
    for kind in ("weights_gb", "inference_gb", "training_gb"):
        values = [est[p][kind] for p in ("fp32", "fp16", "int8", "int4")]
        assert values == sorted(values, reverse=True) and values[0] > values[-1], kind
        assert est["bf16"][kind] == est["fp16"][kind]
    assert all(est[p]["training_gb"] > est[p]["inference_gb"] for p in rs.PRECISION_ORDER)
    assert est["fp32"]["weights_gb"] == pytest.approx(1_066_000_000 * 4 / rs.GB)
    # The heuristic puts SD1.5 fp16 inference in the 2.5-5 GB range people observe.
    assert 2.5 < est["fp16"]["inference_gb"] < 5


def test_verdict_thresholds():
    assert rs.verdict(7.9, 10) == "fits"
    assert rs.verdict(9.0, 10) == "tight"
    assert rs.verdict(10.5, 10) == "does not fit"


def test_local_folder_candidate(tmp_path):
    folder = make_config_only_sd_folder(tmp_path / "model")
    comps = rs.read_diffusers_folder(folder)
    assert [c.name for c in comps] == ["text_encoder", "unet", "vae"]
    cand = rs.size_candidate(ResearchCandidate(name="mine", path=str(folder)), lora_rank=2,
                             targets=rs.ATTENTION_LORA_TARGETS)
    assert cand["components"]["unet"]["params"] == rs.count_parameters("UNet2DConditionModel", SMALL_UNET)
    assert cand["resolution"] == 16  # latent 8 x VAE scale 2


def test_local_folder_missing_files_are_named(tmp_path):
    folder = make_config_only_sd_folder(tmp_path / "model", with_vae_config=False)
    with pytest.raises(ConfigError, match=r"vae/config\.json"):
        rs.read_diffusers_folder(folder)
    with pytest.raises(ConfigError, match="model_index.json"):
        rs.read_diffusers_folder(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        rs.read_diffusers_folder(tmp_path / "nowhere")


def test_plan_picks_highest_precision_that_fits(tmp_path):
    folder = make_config_only_sd_folder(tmp_path / "model")
    research = ResearchConfig(
        candidates=[
            ResearchCandidate(name="mine", path=str(folder)),
            ResearchCandidate(name="sd15", preset="sd15-reference"),
        ]
    )
    base = BaseModelConfig(source="local", path=str(folder))
    report = rs.build_report(research, base, CPU_INFO)
    assert report["plan"]["candidate"] == "mine"
    assert report["plan"]["precision"] == "fp32" and report["plan"]["train_mixed_precision"] == "no"
    assert report["budget_gb"] == pytest.approx(16.0)

    # A local SD1.5 folder on a bf16 GPU whose memory rules out fp32 training but not bf16.
    sd_folder = make_config_only_sd_folder(tmp_path / "sd15", configs=rs.sd15_reference_configs())
    gpu = {
        "device": "cuda",
        "memory": {"total_mb": 64e3},
        "cuda": {"total_memory_mb": 8 * 1024.0, "bf16_supported": True},
        "mps": {},
    }
    sd = rs.build_report(research, BaseModelConfig(source="local", path=str(sd_folder)), gpu)
    assert sd["budget_source"] == "CUDA device memory"
    assert sd["plan"]["candidate"] == "base"
    est = next(c for c in sd["candidates"] if c["name"] == "base")["estimates"]
    assert est["fp32"]["training"] == "does not fit"
    assert sd["plan"]["precision"] == "bf16" and sd["plan"]["train_mixed_precision"] == "bf16"
    gpu["cuda"]["bf16_supported"] = False  # an older GPU: fp16 instead
    assert (
        rs.build_report(research, BaseModelConfig(source="local", path=str(sd_folder)), gpu)["plan"]["precision"]
        == "fp16"
    )

    tiny_budget = rs.build_report(research, base, CPU_INFO, budget_gb=0.01)
    assert tiny_budget["plan"]["precision"] is None and tiny_budget["plan"]["verdict"] == "does not fit"
    assert "does not fit" in rs.render_markdown(tiny_budget)


def test_base_not_among_candidates_is_added(tmp_path):
    folder = make_config_only_sd_folder(tmp_path / "model")
    research = ResearchConfig(candidates=[ResearchCandidate(name="sd15", preset="sd15-reference")])
    report = rs.build_report(research, BaseModelConfig(source="local", path=str(folder)), CPU_INFO)
    assert [c["name"] for c in report["candidates"]] == ["sd15", "base"]
    assert report["plan"]["candidate"] == "base"


def test_missing_base_folder_names_base_path(tmp_path):
    research = ResearchConfig(candidates=[])
    with pytest.raises(ConfigError, match=r"^base\.path: model folder"):
        rs.build_report(research, BaseModelConfig(source="local", path=str(tmp_path / "nope")), CPU_INFO)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        rs.candidate_components(ResearchCandidate(name="x", preset="sdxl-nope"))


def test_embedded_micro_preset():
    pytest.importorskip("stunning.embedded")
    cand = rs.size_candidate(ResearchCandidate(name="tiny", preset="embedded-micro"), lora_rank=4,
                             targets=rs.ATTENTION_LORA_TARGETS)
    assert set(cand["components"]) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert 0 < cand["total_params"] < 10_000_000
    assert cand["lora"]["params"] > 0


def test_flux_and_sd3_shapes_count_packed_patches_and_joint_text_tokens():
    flux = {"patch_size": 1, "in_channels": 64, "num_attention_heads": 24, "attention_head_dim": 128}
    shape = rs.denoiser_shape(flux, "FluxTransformer2DModel")
    # No sample_size: FLUX's native 128-latent (1024 px), 2x2 packed, plus 512 T5 tokens.
    assert (shape.latent_size, shape.tokens, shape.attn_tokens, shape.width) == (128, 4096, 4096 + 512, 3072)
    tiny = rs.denoiser_shape(flux, "FluxTransformer2DModel", {"resolution": 32, "t5_tokens": 8}, vae_factor=4)
    assert (tiny.latent_size, tiny.tokens, tiny.attn_tokens) == (8, 16, 24)
    sd3 = rs.denoiser_shape({"sample_size": 128, "patch_size": 2, "num_attention_heads": 24,
                             "attention_head_dim": 64}, "SD3Transformer2DModel")
    assert (sd3.tokens, sd3.attn_tokens) == (4096, 4096 + 333)
    unet = rs.denoiser_shape({"sample_size": 64, "block_out_channels": [320, 640],
                              "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]})
    assert (unet.tokens, unet.attn_tokens) == (4096, 4096)  # no settings, no class: as before


MEASURE_SCRIPT = """
import json, sys
from pathlib import Path
from stunning.config import TrainConfig
from stunning.training.trainer import train_style
cfg = TrainConfig(**json.loads(sys.argv[1]))
s = train_style(Path(sys.argv[2]), "sd3", Path(sys.argv[3]), "noir", cfg, Path(sys.argv[4]), None, None, "cpu",
                sample_seeds=(), progress=False)
print(json.dumps({"peak_memory_mb": s["peak_memory_mb"], "base_precision": s["base_precision"]}))
"""


@pytest.mark.slow  # ~20-30 s: two fresh training processes (the peak must be a process's own)
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_training_estimate_matches_the_measured_peak_within_20_percent(tmp_path, micro_base, precision):
    """The research estimate of the shipped micro model is the trainer's measured peak (the
    process RSS high-water mark, `stunning.device.PeakMemory`) within 20 %, at fp32 and int8."""
    import json
    import subprocess
    import sys

    from tests.factories import REPO, make_curated

    curated = make_curated(tmp_path / "curated", n_train=4, n_val=1)
    cfg = {"steps": 3, "batch_size": 4, "checkpoint_every": 100, "sample_every": 0, "base_precision": precision}
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE_SCRIPT, json.dumps(cfg), str(micro_base), str(curated), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        check=True,
    )
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    assert measured["base_precision"] == precision
    train = TrainConfig(**cfg)
    info = rs.size_candidate(ResearchCandidate(name="micro", path=str(micro_base)), train.rank, train.target_modules)
    predicted_mb = rs.training_estimate(info, precision, "cpu", train.batch_size)["training_gb"] * 1024
    assert predicted_mb == pytest.approx(measured["peak_memory_mb"], rel=0.20)
