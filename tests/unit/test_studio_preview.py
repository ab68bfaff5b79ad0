"""The latent previewer: a linear latent-to-RGB map fitted from the model's own VAE.

On the shipped micro model (a trained VAE) the preview must reproduce the VAE's decode of
held-out latents, pooled to the latent grid, much better than the best constant colour.
"""

from __future__ import annotations

import time

import pytest

PROMPTS = ["a red dress on a white background", "a blue hat on a grey background"]


@pytest.fixture(scope="module")
def micro(micro_base, one_torch_thread):
    import torch

    from stunning.families import get_family

    family = get_family("sd3")
    return family, family.load_pipeline(micro_base, torch.device("cpu"), torch.float32)


def _errors(previewer, latents, decoded) -> tuple[float, float]:
    """(preview MSE, MSE of the held-out images' own mean colour) against the pooled VAE decode."""
    constant = decoded.mean(dim=(0, 2, 3), keepdim=True)
    return float(((previewer.rgb(latents) - decoded) ** 2).mean()), float(((constant - decoded) ** 2).mean())


def _decode_pooled(pipe, raw):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        decoded = pipe.vae.decode(raw).sample.clamp(-1, 1)
    return F.avg_pool2d(decoded, decoded.shape[-1] // raw.shape[-1])


def test_preview_reproduces_the_vae_decode_of_held_out_latents(micro):
    import torch

    from stunning.studio.preview import fit_previewer, synthetic_images

    family, pipe = micro
    t0 = time.perf_counter()
    previewer = fit_previewer(pipe, family)
    assert time.perf_counter() - t0 < 10  # measured ~0.3 s on 2 cores
    assert previewer.weight.shape == (3, 4) and previewer.info["latent_grid"] == [16, 16]

    # Held out 1: painted images the fit never saw (another seed), encoded.
    with torch.no_grad():
        mean = pipe.vae.encode(synthetic_images(12, 32, seed=99)).latent_dist.mean
    latents = family.latents_from_moments(pipe, mean, torch.zeros_like(mean), torch.Generator().manual_seed(0))
    err, baseline = _errors(previewer, latents, _decode_pooled(pipe, mean))
    assert err < 0.4 * baseline, (err, baseline)  # measured 0.063 vs 0.253

    # Held out 2: what the sampler actually produces (the last step's latents, scaled/shifted).
    finals = []
    family.generate(pipe, PROMPTS, [0, 1], 8, 4.0,
                    on_step=lambda step, total, lat: finals.append(lat.clone()) if step == total else None)
    cfg = pipe.vae.config
    raw = finals[0] / cfg.scaling_factor + cfg.shift_factor
    err, baseline = _errors(previewer, finals[0], _decode_pooled(pipe, raw))
    assert err < 0.6 * baseline, (err, baseline)  # measured 0.100 vs 0.255


def test_preview_images_are_small_and_fast(micro):
    import torch

    from stunning.studio.preview import fit_previewer

    family, pipe = micro
    previewer = fit_previewer(pipe, family, n_images=8)
    latents = torch.randn(2, 4, 16, 16)
    image = previewer.image(latents)
    assert image.mode == "RGB" and image.size == (256, 128)  # 16x16 grid x8, the batch side by side
    assert previewer.image(latents[0]).size == (128, 128)
    t0 = time.perf_counter()
    for _ in range(50):
        previewer.image(latents[:1])
    assert (time.perf_counter() - t0) / 50 < 0.02  # measured ~0.1 ms
    with pytest.raises(ValueError, match=r"expected \(batch, 4, h, w\)"):
        previewer.image(torch.randn(1, 16, 8, 8))


@pytest.mark.parametrize("family_name, fixture", [("sd-unet", "tiny_sd_unet"), ("sdxl", "tiny_sdxl"),
                                                  ("flux", "tiny_flux")])
def test_every_family_previews_its_sampling_steps(family_name, fixture, request):
    """The previewer fits each family's VAE, and a preview of the latents the sampler hands
    `on_step` (FLUX unpacks its 2x2 patches first) is an image after every step."""
    import torch

    from stunning.families import get_family
    from stunning.studio.preview import fit_previewer

    family = get_family(family_name)
    pipe = family.load_pipeline(request.getfixturevalue(fixture), torch.device("cpu"), torch.float32)
    previewer = fit_previewer(pipe, family, n_images=8)
    channels = pipe.vae.config.latent_channels
    assert previewer.weight.shape == (3, channels) and torch.isfinite(previewer.weight).all()
    frames = []
    family.generate(pipe, ["a red dress"], [0], 3, 4.0, on_step=lambda i, n, lat: frames.append(previewer.image(lat)))
    assert len(frames) == 3 and all(f.size == (128, 128) for f in frames)
    assert len(set(frames[-1].getdata())) > 1  # not a flat colour


def test_a_failing_preview_gives_none_from_then_on_without_being_called_again(caplog):
    from stunning.studio.preview import until_it_fails

    calls = []

    def preview(latents):
        calls.append(latents)
        if latents == 2:
            raise RuntimeError("no previewer")
        return f"frame {latents}"

    guarded = until_it_fails(preview)
    assert [guarded(i) for i in (1, 2, 3)] == ["frame 1", None, None]
    assert calls == [1, 2]  # after the first failure the preview is not tried again
    assert sum("latent preview failed" in r.getMessage() for r in caplog.records) == 1
