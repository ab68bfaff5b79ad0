"""The quantization ladder: each level saved, rebuilt from disk (also in a fresh process), smaller,
close to float32; fidelity metrics; and the choice of the smallest level within the budgets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stunning.families import get_family
from stunning.quantize import (
    LEVELS,
    LadderInputs,
    LevelUnavailable,
    QuantizationError,
    choose_level,
    image_fidelity,
    load_quantized,
    load_quantized_denoiser,
    measure_ladder,
    memory_target,
    quantize_denoiser,
    ssim,
)

FAMILY = get_family("sd-unet")


@pytest.fixture(scope="module")
def quantized(tiny_sd_unet, tmp_path_factory):
    # Any pipeline folder works as the "fused" model; the tiny base is one.
    return quantize_denoiser(tiny_sd_unet, FAMILY, tmp_path_factory.mktemp("q") / "quantized")


def test_quantized_folder_is_complete_and_smaller(quantized, tiny_sd_unet):
    q = quantized.path
    assert {p.name for p in q.iterdir()} >= {
        "quantized_model.safetensors", "quantization_map.json", "config.json", "quantized.json"
    }
    qmap = json.loads((q / "quantization_map.json").read_text())
    assert qmap and all(v["weights"] == "qint8" for v in qmap.values())
    assert quantized.component == "unet"
    assert quantized.fp32_bytes == (tiny_sd_unet / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert 0 < quantized.size_ratio < 0.5  # int8 weights + fp32 scales/biases/norms
    assert 0 < quantized.quantized_memory_bytes < 0.5 * quantized.fp32_memory_bytes


def test_load_quantized_rebuilds_int8_modules(quantized, tiny_sd_unet):
    from optimum.quanto import QConv2d, QLinear

    model, component = load_quantized_denoiser(quantized.path)
    assert component == "unet"
    kinds = {type(m) for m in model.modules()}
    assert QLinear in kinds and QConv2d in kinds
    assert model.conv_in.weight.qtype.name == "qint8"
    pipe = load_quantized(tiny_sd_unet, quantized.path, "cpu")
    assert isinstance(pipe.unet.conv_in, QConv2d) and isinstance(pipe.vae, torch.nn.Module)


def test_measure_ladder_generates_with_both_and_reports_fidelity(tiny_sd_unet, tmp_path):
    """One level, no adapters: float32 and the int8 model reloaded from disk draw the same pairs."""
    inputs = LadderInputs(["a blue hat on a grey background"], [0, 1], 3, 4.0)
    rep = measure_ladder(FAMILY, tiny_sd_unet, tiny_sd_unet, tmp_path / "q", ["int8"], inputs, "fused", "cpu")
    ref, (level,) = rep["reference"], rep["levels"]
    assert level["runs"] and level["path"] == str(tmp_path / "q" / "int8")
    assert (tmp_path / "q" / "int8" / "quantization_map.json").is_file()
    assert not (tmp_path / "q" / "int8" / "base").exists()  # no adapter is served on the base
    assert level["denoiser_bytes"] < ref["denoiser_bytes"]
    assert level["size_ratio"] == pytest.approx(level["denoiser_bytes"] / ref["denoiser_bytes"], rel=1e-4)
    assert set(level["variants"]) == {"fused"}
    v = level["variants"]["fused"]
    assert ref["peak_memory_mb"] > 0 and v["peak_memory_mb"] > 0
    assert v["latency_s"] > 0 and [len(rep["images"][k][0]) for k in ("float32", "int8")] == [2, 2]
    # int8 weights perturb the output a little, never wildly (a broken requantize would)
    assert 0 <= v["mse"] < 1e-3
    assert 0 <= v["max_abs"] <= 0.25


def test_image_fidelity_is_pixel_mse_in_unit_range():
    a = Image.new("RGB", (4, 4), (0, 0, 0))
    b = Image.new("RGB", (4, 4), (255, 0, 0))
    fid = image_fidelity([a], [b])
    assert fid["mse"] == pytest.approx(1 / 3)
    assert fid["max_abs"] == pytest.approx(1.0)
    assert fid["psnr"] == pytest.approx(10 * math.log10(3))
    same = image_fidelity([a], [a])
    assert same["psnr"] == 100.0 and same["ssim"] == pytest.approx(1.0)


def test_ssim_falls_with_noise_and_ignores_a_constant_shift_less_than_structure():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ref = Image.fromarray(img)
    noisy = Image.fromarray(np.clip(img + rng.normal(0, 40, img.shape), 0, 255).astype(np.uint8))
    shuffled = Image.fromarray(rng.permutation(img.reshape(-1, 3)).reshape(img.shape))
    assert ssim([ref], [ref]) == pytest.approx(1.0)
    assert ssim([ref], [shuffled]) < ssim([ref], [noisy]) < 0.95


def test_missing_quantized_folder_says_how_to_rebuild(tmp_path):
    with pytest.raises(QuantizationError, match="dvc repro merge"):
        load_quantized_denoiser(tmp_path)


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_every_level_saves_smaller_and_reloads_or_says_why_it_cannot_run(level, tiny_sd_unet, tmp_path):
    try:
        res = quantize_denoiser(tiny_sd_unet, FAMILY, tmp_path / level, level)
    except LevelUnavailable as exc:  # reported, never faked: only bitsandbytes' CPU backend may be missing here
        assert level == "nf4" and "bitsandbytes" in str(exc)
        return
    assert res.scheme == level and res.quantized_modules > 0
    assert res.size_ratio < (0.5 if LEVELS[level].bits == 4 else 0.6)
    meta = json.loads((tmp_path / level / "quantized.json").read_text())
    assert meta["level"] == level and meta["library"] == LEVELS[level].backend
    model, component = load_quantized_denoiser(tmp_path / level)
    assert component == "unet"
    assert sum(p.numel() for p in model.parameters()) > 0


def test_old_scheme_name_is_int8():
    assert quantize_denoiser.__defaults__[0] == "int8"
    from stunning.quantize import level_of

    assert level_of("int8-weight").name == "int8"
    with pytest.raises(QuantizationError, match="int8, fp8, int4, nf4|one of"):
        level_of("int3")


_RELOAD = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from stunning.families import get_family
from stunning.quantize import load_quantized
pipe = load_quantized(sys.argv[1], sys.argv[2], "cpu")
ims = get_family("sd-unet").generate(pipe, ["a blue hat on a grey background"], [3], 2, 4.0)
np.save(sys.argv[3], np.stack([np.asarray(i) for i in ims]))
"""


@pytest.mark.slow  # a fresh Python process imports torch + diffusers (~10-20 s on 2 busy cores)
def test_a_saved_level_generates_the_same_images_in_a_fresh_process(tiny_sd_unet, tmp_path):
    """The quantized model is rebuilt from disk, not only in the process that made it."""
    quantize_denoiser(tiny_sd_unet, FAMILY, tmp_path / "int4", "int4")
    pipe = load_quantized(tiny_sd_unet, tmp_path / "int4", "cpu")
    here = np.stack([np.asarray(i) for i in FAMILY.generate(pipe, ["a blue hat on a grey background"], [3], 2, 4.0)])
    subprocess.run([sys.executable, "-c", _RELOAD, str(tiny_sd_unet), str(tmp_path / "int4"), str(tmp_path / "o.npy")],
                   check=True, cwd=str(Path(__file__).resolve().parents[2]), timeout=300)
    assert np.array_equal(np.load(tmp_path / "o.npy"), here)


def test_ladder_index_loads_the_chosen_level(quantized, tiny_sd_unet, tmp_path):
    import shutil

    shutil.copytree(quantized.path, tmp_path / "int8")
    (tmp_path / "quantized.json").write_text(json.dumps({"levels": ["int8"], "chosen": "int8", "load": "int8"}))
    model, _ = load_quantized_denoiser(tmp_path)
    assert model.conv_in.weight.qtype.name == "qint8"
    (tmp_path / "quantized.json").write_text(json.dumps({"levels": [], "chosen": None, "load": None}))
    with pytest.raises(QuantizationError, match="no quantization level ran"):
        load_quantized_denoiser(tmp_path)


def _level(name, size, psnr, loss=0.0, mem=500.0, runs=True):
    return {
        "level": name, "runs": runs, "reason": None if runs else "no backend here", "denoiser_bytes": size if runs else None,
        "size_ratio": size / 1000 if runs else None,
        "variants": {} if not runs else {
            "half-half": {"kind": "fused", "psnr": psnr, "peak_memory_mb": mem},
            "noir": {"kind": "adapter", "psnr": psnr + 1, "style_gain_loss": loss, "peak_memory_mb": mem},
        },
    }


LADDER = [_level("int8", 300, 50.0), _level("fp8", 300, 32.0), _level("int4", 160, 27.0), _level("nf4", 150, 0, runs=False)]


def test_auto_choice_is_the_smallest_passing_level():
    chosen, why, judged = choose_level(LADDER, min_psnr=25.0, max_style_gain_loss=0.05)
    assert chosen == "int4" and "smallest" in why and "nf4: does not run here" in why
    assert [j["passes"] for j in judged] == [True, True, True, False]


def test_a_level_that_breaks_a_budget_is_never_chosen():
    chosen, why, judged = choose_level(LADDER, min_psnr=30.0, max_style_gain_loss=0.05)
    assert chosen == "int8"  # same bytes as fp8: the higher PSNR wins the tie
    int4 = next(j for j in judged if j["level"] == "int4")
    assert not int4["passes"] and "psnr 27.0 < 30 (half-half)" in int4["failures"]
    assert "int4" in why
    lossy = [_level("int4", 160, 45.0, loss=0.2), _level("int8", 300, 50.0)]
    assert choose_level(lossy, 30.0, 0.05)[0] == "int8"
    assert choose_level(LADDER, 30.0, 0.05, memory_budget_mb=400.0)[0] is None  # nothing fits the target


def test_no_passing_level_chooses_none_and_says_why():
    chosen, why, judged = choose_level(LADDER, min_psnr=99.0, max_style_gain_loss=0.0)
    assert chosen is None and not any(j["passes"] for j in judged)
    assert why.startswith("no level passes") and "int8: psnr 50.0 < 99" in why


def test_memory_target_from_the_plan_or_an_apple_chip():
    assert memory_target("apple-16gb", None)["memory_budget_mb"] == pytest.approx(16 * 1024 * 2 / 3, abs=0.1)
    plan = memory_target("plan", {"budget_gb": 8.0, "budget_source": "system memory (total)"})
    assert plan["memory_budget_mb"] == 8192.0 and "research.json" in plan["source"]
    with pytest.raises(QuantizationError, match="dvc repro research"):
        memory_target("plan", None)


def test_config_ladder_values_and_the_old_value_error():
    from stunning.config import ConfigError, MergeConfig, load_params

    assert MergeConfig().quantization == "auto"
    assert MergeConfig(quantization=["int8", "int4"]).quantization == ["int8", "int4"]
    with pytest.raises(ValueError, match=r"use \[int8\]"):
        MergeConfig(quantization="int8-weight")
    with pytest.raises(ValueError):
        MergeConfig(quantization=["int3"])
    with pytest.raises(ValueError):
        MergeConfig(target_device="apple-12gb")
    params = Path(__import__("tempfile").mkdtemp()) / "params.yaml"
    params.write_text("merge:\n  quantization: int8-weight\n")
    with pytest.raises(ConfigError, match=r"merge.quantization.*use \[int8\]"):
        load_params(params)


@pytest.mark.slow  # a fresh process imports torch + quanto (~10 s)
def test_the_int4_kernel_is_not_rebuilt_by_a_process_without_the_environment_on_path():
    """quanto's C++ kernel is built by the first `ninja` on PATH; a system ninja of another
    version rebuilt what the environment's had built (~40 s each time). Loaded through
    `load_quanto_kernel`, a process whose PATH lacks `.venv/bin` reuses the build."""
    from optimum.quanto.library.extensions import get_extension

    from stunning.training.quantized import load_quanto_kernel

    load_quanto_kernel()  # built (or found) with this environment's ninja
    build = Path(get_extension("quanto_cpp").build_directory)
    before = {p.name: p.stat().st_mtime_ns for p in build.iterdir()}
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env["PATH"] = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                                  if Path(d).resolve() != Path(sys.executable).parent.resolve()) or "/usr/bin:/bin"
    code = "import os; from stunning.training.quantized import load_quanto_kernel; p = os.environ['PATH']; load_quanto_kernel(); " \
           "assert os.environ['PATH'] == p"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    after = {p.name: p.stat().st_mtime_ns for p in build.iterdir()}
    assert {k: after.get(k) for k in before if k.endswith((".so", ".o"))} == \
        {k: v for k, v in before.items() if k.endswith((".so", ".o"))}
