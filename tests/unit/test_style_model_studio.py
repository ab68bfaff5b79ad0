"""`StyleModel` as the studio drives it: request-time blends, samplers, negatives, batches, previews.

One model is loaded once for the module: the tiny sd3 base with two random style LoRAs and two
offline blends of them (written by `stunning.blend.blend_adapters`), so a request-time blend can
be compared pixel by pixel with the offline blend of the same weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from stunning.style_model import GenerateRequest, StyleModel, UnknownAdapterError
from tests.factories import random_lora

REQUEST = {"prompt": "a red dress on a white background", "seed": 3, "steps": 2, "guidance_scale": 4.0}
OFFLINE = {"mix": {"a": 0.7, "b": -0.3}, "strong": {"a": 1.5}}


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_base, one_torch_thread) -> StyleModel:
    import torch

    from stunning.blend import blend_adapters
    from stunning.families import get_family

    root = tmp_path_factory.mktemp("studio-model")
    torch.manual_seed(0)  # random_lora draws the down weights from the global RNG
    pipe = get_family("sd3").load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
    for seed, name in enumerate(("a", "b")):
        random_lora(pipe, root / "adapters" / name, "sd3", seed, scale=0.5)
    styles = {name: root / "adapters" / name for name in ("a", "b")}
    for name, weights in OFFLINE.items():
        blend_adapters(styles, weights, root / "blends" / name)
    (root / "manifest.json").write_text(json.dumps({"family": "sd3", "model_name": "studio-test"}))
    artifacts = {"manifest": root / "manifest.json", "base": tiny_base, "adapters": root / "adapters",
                 "blends": root / "blends"}
    return StyleModel.load(artifacts, device="cpu")


def _px(model: StyleModel, **fields) -> np.ndarray:
    return np.asarray(model.generate(GenerateRequest(**{**REQUEST, **fields})), dtype=np.int16)


@pytest.mark.parametrize("blend", sorted(OFFLINE))
def test_request_time_blend_draws_the_offline_blend(model, blend):
    offline = _px(model, blend=blend)
    live = _px(model, styles=OFFLINE[blend])
    # Both apply the same delta, sum_i w_i s_i B_i A_i x, but in another float32 order: the
    # offline file folds w_i s_i into B_i and sums over the concatenated rank in one matmul;
    # PEFT computes each adapter's B_i (A_i x), scales it by w_i s_i and adds adapters one by
    # one. That changes activations by ~1e-7 relative, which after the sampling steps and the
    # VAE can move a value sitting at a .5 boundary of the uint8 rounding by one level.
    # Measured over 5 adapter seeds x 2 image seeds: {a: 0.7, b: -0.3} was bit-identical in
    # all 10, {a: 1.5} in 4; otherwise 1 to 5 of the 3072 values differed, each by exactly 1.
    diff = np.abs(offline - live)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005, (diff.max(), (diff > 0).sum())
    # ...while the blend visibly changes the image, so the bound is not met trivially.
    assert np.abs(live - _px(model)).mean() > 5.0
    assert np.abs(live - _px(model, styles={"a": 0.7})).mean() > 1.0


def test_blends_switch_in_milliseconds_and_old_requests_are_unchanged(model):
    base = _px(model)
    _px(model, styles={"b": -0.3, "a": 2.0})
    assert model.last_switch_s is not None and model.last_switch_s < 0.25  # measured ~5-10 ms on 2 cores
    assert np.array_equal(_px(model), base), "a request without styles must draw the plain base again"
    assert np.array_equal(_px(model, style="a"), _px(model, styles={"a": 1.0}))


def test_unknown_styles_and_samplers_name_the_choices(model):
    with pytest.raises(UnknownAdapterError, match=r"unknown style\(s\) \['cubism'\].*\['a', 'b'\]"):
        model.generate(GenerateRequest(**REQUEST, styles={"a": 0.5, "cubism": 1.0}))
    with pytest.raises(UnknownAdapterError, match="not both"):
        model.generate(GenerateRequest(**REQUEST, styles={"a": 0.5}, style="a"))
    with pytest.raises(UnknownAdapterError, match=r"unknown sampler 'ddim'.*euler-ancestral"):
        model.generate(GenerateRequest(**REQUEST, sampler="ddim"))


def test_sampler_applies_to_one_request_only(model):
    scheduler = model.pipe.scheduler
    base = _px(model)
    dpm = _px(model, sampler="dpm++")
    assert model.pipe.scheduler is scheduler
    assert np.abs(dpm - base).mean() > 0.5
    assert np.array_equal(_px(model, sampler="default"), base) and np.array_equal(_px(model), base)


def test_batch_draws_consecutive_seeds_and_negative_prompts_steer(model):
    images = model.generate_images(GenerateRequest(**REQUEST, batch=3, styles={"a": 0.5}))
    assert len(images) == 3
    for i, image in enumerate(images):
        single = _px(model, seed=REQUEST["seed"] + i, styles={"a": 0.5})
        assert np.array_equal(np.asarray(image, dtype=np.int16), single)
    base = _px(model)
    assert np.array_equal(_px(model, negative_prompt=""), base)
    assert np.abs(_px(model, negative_prompt="a blue hat") - base).mean() > 0.5
    model.default_negative_prompt = "a blue hat"
    try:
        assert np.array_equal(_px(model), _px(model, negative_prompt="a blue hat"))
        assert np.array_equal(_px(model, negative_prompt=""), base)  # "" overrides the default
    finally:
        model.default_negative_prompt = None


def test_on_step_sees_every_step_and_previews_are_small_images(model):
    seen = []

    def on_step(step, total, latents):
        seen.append((step, total, tuple(latents.shape), model.preview(latents).size))

    model.generate_images(GenerateRequest(**{**REQUEST, "steps": 3}, batch=2), on_step=on_step)
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    assert seen[0][2] == (2, 4, 16, 16) and seen[0][3] == (256, 128)  # 16x16 grid x8, the batch side by side


@pytest.mark.parametrize(
    ("field", "value", "limit"),
    [
        ("styles", {f"s{i}": 0.1 for i in range(9)}, "max_length"),
        ("styles", {"a": 2.5}, "[-2, 2]"),
        ("styles", {"a": -2.01}, "[-2, 2]"),
        ("styles", {"a": float("nan")}, None),
        ("styles", {}, "min_length"),
        ("batch", 5, "le"),
        ("negative_prompt", "x" * 1001, "max_length"),
    ],
)
def test_request_limits_are_named_in_validation_errors(field, value, limit):
    with pytest.raises(ValidationError) as info:
        GenerateRequest(**REQUEST, **{field: value})
    err = info.value.errors()[0]
    assert err["loc"][0] == field
    if limit is not None:
        assert limit in err.get("ctx", {}) or limit in err["msg"], err
    ok = GenerateRequest(**REQUEST, styles={"a": -2.0, "b": 2.0}, batch=4, negative_prompt="x" * 1000)
    assert ok.batch == 4


def test_request_defaults_keep_the_old_schema():
    req = GenerateRequest(prompt="a hat")
    assert (req.negative_prompt, req.styles, req.sampler, req.batch) == (None, None, None, 1)
