"""The `Family.generate` contract every family keeps: negative prompts and per-step callbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stunning.families import get_family

FAMILIES = {"sd3": "tiny_base", "sd-unet": "tiny_sd_unet", "sdxl": "tiny_sdxl", "flux": "tiny_flux"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_negative_prompt_and_step_callback(family, request, one_torch_thread):
    fam = get_family(family)
    pipe = fam.load_pipeline(request.getfixturevalue(FAMILIES[family]), torch.device("cpu"), torch.float32)

    def draw(**kwargs) -> np.ndarray:
        return np.asarray(fam.generate(pipe, ["a red cat"], [7], 3, 4.0, **kwargs)[0], dtype=np.int16)

    plain = draw()
    # An empty negative prompt is no negative prompt: the same pixels (SDXL zeroes its
    # unconditional input only when it is given none).
    assert np.array_equal(draw(negative_prompts=[""]), plain)
    seen: list[tuple[int, int, tuple[int, ...]]] = []
    steered = draw(negative_prompts=["a blue dog"], on_step=lambda i, n, lat: seen.append((i, n, tuple(lat.shape))))
    assert np.abs(steered - plain).mean() > 0.5, "a negative prompt must change the image"
    side = fam.resolution(pipe) // pipe.vae_scale_factor
    channels = pipe.vae.config.latent_channels
    assert seen == [(i, 3, (1, channels, side, side)) for i in (1, 2, 3)]
    with pytest.raises(ValueError, match="one per prompt"):
        fam.generate(pipe, ["a", "b"], [1, 2], 1, 4.0, negative_prompts=["x"])

    class Stop(Exception):
        pass

    def cancel(i, n, lat):
        raise Stop

    with pytest.raises(Stop):  # raising from on_step cancels the generation
        fam.generate(pipe, ["a red cat"], [7], 3, 4.0, on_step=cancel)
