"""Train the embedded micro model from scratch: the VAE first, then the MMDiT and text encoders.

Run ``python -m stunning.pretrain --out stunning/assets/micro`` (about 37 minutes on a
2-core laptop CPU with the defaults; seed 0 is what ships). Everything the model sees is the
*unstyled* procedural world (`stunning.data.sample.render_clean`): styles are what LoRA
adapters add later. Scenes whose (garment, colour) pair is in
`stunning.embedded.HELD_OUT_PAIRS` are never drawn, so adherence to those prompts measures
composition, not memory.

1. **VAE** — reconstruct world images under generic photometric jitter (film grain of random
   strength, saturation 0–1.6×, contrast, blur), so grainy or high-contrast images stay
   representable for the style adapters; MSE and a tiny KL weight. Then the *decoder only*
   is fine-tuned (encoder frozen, so the latent space does not move) on batches of which
   40 % are black-and-white photographs (random tone curve, lens falloff, grain), with an
   extra L1 chroma term: a decoder that only saw colour tints greys, and on dark pixels a
   faint tint is a strong saturation. Then the latent
   ``shift_factor``/``scaling_factor`` are measured, as SD3 normalises latents.
2. **Denoiser** — rectified flow matching through the `sd3` family's own loss
   (`SD3Family.training_loss`), the transformer and both CLIP text encoders trained jointly,
   10 % empty captions for classifier-free guidance, cosine learning-rate schedule with
   warm-up, and an exponential moving average of the weights (what is saved).

The output folder is a stock `StableDiffusion3Pipeline` folder plus ``stunning.json``
(T5 token count) and ``training.json`` (the settings, timings and final numbers).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CFG_DROPOUT = 0.1


@dataclass
class PretrainConfig:
    seed: int = 0
    images: int = 6000
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 2e-3
    decoder_steps: int = 800
    decoder_lr: float = 5e-4
    denoiser_steps: int = 2500
    denoiser_batch: int = 48
    denoiser_lr: float = 6e-4
    warmup: int = 200
    ema_decay: float = 0.999
    threads: int = 2


def world_images(n: int, seed: int, resolution: int, exclude=None) -> tuple[torch.Tensor, list[str]]:
    """`n` style-free scenes as NCHW pixels in [-1, 1] and their captions (no style words).

    Scenes whose (garment, colour) is in `exclude` (default: the held-out pairs) are redrawn.
    """
    from PIL import Image

    from stunning.data.sample import draw_scene, render_clean
    from stunning.embedded import HELD_OUT_PAIRS

    exclude = set(HELD_OUT_PAIRS if exclude is None else exclude)
    rng = np.random.default_rng(seed)
    pixels, captions = [], []
    for i in range(n):
        scene = draw_scene(rng, i)
        while (scene.garment, scene.colour) in exclude:
            scene = draw_scene(rng, i)
        arr = (render_clean(scene) * 255).round().astype(np.uint8)
        img = Image.fromarray(arr).resize((resolution, resolution), Image.Resampling.LANCZOS)
        pixels.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        captions.append(scene.caption("plain").removesuffix(", plain style"))
    return torch.stack(pixels), captions


MONO_FRACTION = 0.4  # share of VAE batches rendered as black-and-white photographs
CHROMA_WEIGHT = 2.0  # weight of the L1 chroma term in the VAE loss


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Generic photometric jitter: grain of random strength, saturation 0-1.6x, contrast, blur."""
    b = x.shape[0]
    grain = torch.rand(b, 1, 1, 1, generator=gen) * 0.3
    x = x + grain * torch.randn(x.shape, generator=gen)
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * (torch.rand(b, 1, 1, 1, generator=gen) * 1.6)
    x = x * (0.6 + 0.9 * torch.rand(b, 1, 1, 1, generator=gen))
    blur = torch.rand(b, generator=gen) < 0.2
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0]) / 4
        kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return x.clamp(-1, 1)


def monochrome(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Black-and-white photographs of `x`: luma through a random tone curve, lens falloff, grain.

    A photo codec must hand back neutral greys as neutral: a decoder that only ever saw colour
    tints them, and on dark pixels a faint tint is a strong HSV saturation. The tone curve
    is a logistic of random steepness (near-linear to hard-lit) and pivot; the falloff darkens
    the corners by a random amount; the grain is the same on all three channels.
    """
    b, _, h, w = x.shape
    luma = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3] + 1) / 2
    slope = 1 + 9 * torch.rand(b, 1, 1, 1, generator=gen)
    pivot = 0.3 + 0.3 * torch.rand(b, 1, 1, 1, generator=gen)
    lo, hi = torch.sigmoid(-slope * pivot), torch.sigmoid(slope * (1 - pivot))
    luma = (torch.sigmoid(slope * (luma - pivot)) - lo) / (hi - lo)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    r2 = (xx - 0.5) ** 2 + (yy - 0.5) ** 2
    luma = luma * (1 - 1.5 * torch.rand(b, 1, 1, 1, generator=gen) * r2)
    luma = luma + 0.1 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(luma.shape, generator=gen)
    return (luma.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1).contiguous()


def decoder_batch(pixels: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    """One VAE training batch: colour jitter (`augment`), a `MONO_FRACTION` of it monochrome."""
    x = augment(pixels[torch.randint(0, len(pixels), (batch,), generator=gen)], gen)
    mono = torch.rand(batch, generator=gen) < MONO_FRACTION
    if mono.any():
        x[mono] = monochrome(pixels[torch.randint(0, len(pixels), (int(mono.sum()),), generator=gen)], gen)
    return x


def _chroma(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(1, keepdim=True)


def train_vae(vae, pixels: torch.Tensor, steps: int, gen: torch.Generator, batch: int = 32, lr: float = 2e-3,
              progress: Callable[[int, float], None] | None = None) -> float:
    """Train the VAE to reconstruct (augmented) world images; return the last 50 steps' mean loss."""
    from diffusers.optimization import get_scheduler

    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = get_scheduler("cosine", opt, num_warmup_steps=min(100, steps // 10), num_training_steps=max(steps, 1))
    recent: list[float] = []
    for step in range(steps):
        x = augment(pixels[torch.randint(0, len(pixels), (batch,), generator=gen)], gen)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        # A tiny KL weight keeps the latent space smooth without blurring reconstructions.
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [float(loss.detach())])[-50:]
        if progress:
            progress(step, recent[-1])
    vae.eval()
    return float(np.mean(recent)) if recent else float("nan")


def finetune_decoder(vae, pixels: torch.Tensor, steps: int, gen: torch.Generator, batch: int = 32,
                     lr: float = 5e-4, progress: Callable[[int, float], None] | None = None) -> float:
    """Fine-tune the decoder only (`decoder_batch`: colour jitter and black-and-white photographs).

    The encoder is frozen, so the latent space the denoiser learns is unchanged (as Stable
    Diffusion's ft-MSE VAE was made). Loss: MSE plus an L1 term on chroma (each pixel minus
    its channel mean), which makes greys decode neutral. Returns the last 50 steps' mean loss.
    """
    from diffusers.optimization import get_scheduler

    params = list(vae.decoder.parameters())
    if vae.post_quant_conv is not None:
        params += list(vae.post_quant_conv.parameters())
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(params, lr=lr)
    sched = get_scheduler("cosine", opt, num_warmup_steps=min(50, steps // 10), num_training_steps=max(steps, 1))
    recent: list[float] = []
    try:
        for step in range(steps):
            x = decoder_batch(pixels, batch, gen)
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample(generator=gen)
            recon = vae.decode(z).sample
            loss = F.mse_loss(recon, x) + CHROMA_WEIGHT * (_chroma(recon) - _chroma(x)).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            recent = (recent + [float(loss.detach())])[-50:]
            if progress:
                progress(step, recent[-1])
    finally:
        vae.requires_grad_(True)
        vae.eval()
    return float(np.mean(recent)) if recent else float("nan")


@torch.no_grad()
def reconstruction_mse(vae, pixels: torch.Tensor) -> float:
    """Pixel MSE (range [0, 1]) of reconstructing `pixels` through the posterior mean."""
    errs = []
    for i in range(0, len(pixels), 64):
        x = pixels[i : i + 64]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        errs.append(((recon - x) / 2).pow(2).mean(dim=(1, 2, 3)))
    return float(torch.cat(errs).mean())


@torch.no_grad()
def set_latent_normalisation(vae, pixels: torch.Tensor) -> tuple[float, float]:
    """Measure and store SD3's ``shift_factor`` (mean) and ``scaling_factor`` (1/std) of the latents."""
    lat = torch.cat([vae.encode(pixels[i : i + 64]).latent_dist.mean for i in range(0, len(pixels), 64)])
    shift, scale = float(lat.mean()), float(1.0 / lat.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


def train_denoiser(family, pipe, latents: torch.Tensor, captions: list[str], steps: int, gen: torch.Generator,
                   batch: int = 48, lr: float = 6e-4, warmup: int = 200, ema_decay: float = 0.999,
                   progress: Callable[[int, float], None] | None = None) -> float:
    """Train the transformer and text encoders jointly on captioned latents; EMA weights are kept.

    `latents` are normalised as the family's `encode_images` returns them. Returns the mean
    loss of the last 100 steps (of the raw, not the averaged, weights).
    """
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    modules = [m for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2) if m is not None]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = get_scheduler("cosine", opt, num_warmup_steps=min(warmup, steps // 10), num_training_steps=max(steps, 1))
    ema = EMAModel(params, decay=ema_decay)
    recent: list[float] = []
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        drop = torch.rand(batch, generator=gen) < CFG_DROPOUT
        prompts = ["" if d else captions[int(i)] for i, d in zip(idx, drop, strict=True)]
        cond = family.encode_prompts_with_grad(pipe, prompts)
        loss = family.training_loss(pipe, latents[idx], cond, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        recent = (recent + [float(loss.detach())])[-100:]
        if progress:
            progress(step, recent[-1])
    ema.copy_to(params)
    for m in modules:
        m.eval()
    return float(np.mean(recent)) if recent else float("nan")


def _trained_vae(pipe, pixels, held_pixels, cfg: PretrainConfig, gen: torch.Generator, stage_dir: Path) -> dict:
    """Train the VAE, or reuse the one a previous run of the same settings left in `stage_dir`.

    The VAE stage takes minutes; keeping it means an interrupted (or re-threaded) run
    restarts at the denoiser. The stage is matched on the settings that shape the VAE, and
    the generator's state is restored so a resumed run continues exactly as an unbroken one.
    """
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    key = {k: v for k, v in asdict(cfg).items() if k in ("seed", "images", "vae_steps", "vae_batch", "vae_lr")}
    key.update(decoder_steps=cfg.decoder_steps, decoder_lr=cfg.decoder_lr, latent_channels=pipe.vae.config.latent_channels,
               mono_fraction=MONO_FRACTION, chroma_weight=CHROMA_WEIGHT)
    info = stage_dir / "vae_stage.json"
    if info.is_file() and json.loads(info.read_text())["key"] == key:
        saved = json.loads(info.read_text())
        pipe.vae = AutoencoderKL.from_pretrained(stage_dir / "vae")
        pipe.vae.eval()
        gen.set_state(torch.load(stage_dir / "generator.pt"))
        log.info("VAE stage reused from %s", stage_dir)
        return {**saved["report"], "reused_from_interrupted_run": True}
    t0 = time.perf_counter()
    with tqdm(total=cfg.vae_steps, desc="micro VAE", unit="step", mininterval=5) as bar:
        loss = train_vae(pipe.vae, pixels, cfg.vae_steps, gen, cfg.vae_batch, cfg.vae_lr,
                         progress=lambda _s, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4f}")))
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    with tqdm(total=cfg.decoder_steps, desc="micro VAE decoder", unit="step", mininterval=5) as bar:
        dec_loss = finetune_decoder(pipe.vae, pixels, cfg.decoder_steps, gen, cfg.vae_batch, cfg.decoder_lr,
                                    progress=lambda _s, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4f}")))
    dec_seconds = time.perf_counter() - t1
    mse = reconstruction_mse(pipe.vae, held_pixels)
    shift, scale = set_latent_normalisation(pipe.vae, pixels)
    log.info("VAE: %d steps in %.0f s, held-out MSE %.4f, shift %.3f, scale %.3f", cfg.vae_steps, seconds, mse,
             shift, scale)
    report = {"steps": cfg.vae_steps, "seconds": round(seconds + dec_seconds, 1), "final_loss": loss,
              "decoder_finetune": {"steps": cfg.decoder_steps, "seconds": round(dec_seconds, 1), "final_loss": dec_loss},
              "heldout_mse": mse, "shift_factor": shift, "scaling_factor": scale}
    from stunning.io import atomic_dir

    with atomic_dir(stage_dir) as tmp:
        pipe.vae.save_pretrained(tmp / "vae")
        torch.save(gen.get_state(), tmp / "generator.pt")
        (tmp / "vae_stage.json").write_text(json.dumps({"key": key, "report": report}, indent=2))
    return report


def pretrain(out_dir: str | Path, cfg: PretrainConfig, resolution: int = 32) -> dict:
    """Build and train the micro model, save it to `out_dir`, and return the training report."""
    from tqdm.auto import tqdm

    from stunning.embedded import RESOLUTION, T5_TOKENS, build_micro
    from stunning.families import get_family, save_model

    if resolution != RESOLUTION:
        raise ValueError(f"the micro model is configured for {RESOLUTION} px, not {resolution}")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    try:
        gen = torch.Generator().manual_seed(cfg.seed)
        pipe = build_micro(cfg.seed)
        family = get_family("sd3")
        pipe._stunning_t5_tokens = T5_TOKENS
        pixels, captions = world_images(cfg.images, cfg.seed, resolution)
        held_pixels, _ = world_images(256, cfg.seed + 10_000, resolution)
        vae_report = _trained_vae(pipe, pixels, held_pixels, cfg, gen, Path(str(out_dir) + ".vae-stage"))
        shift, scale = vae_report["shift_factor"], vae_report["scaling_factor"]
        with torch.no_grad():
            latents = torch.cat([
                (pipe.vae.encode(pixels[i : i + 64]).latent_dist.mean - shift) * scale
                for i in range(0, len(pixels), 64)
            ])
        t0 = time.perf_counter()
        with tqdm(total=cfg.denoiser_steps, desc="micro MMDiT", unit="step", mininterval=5) as bar:
            loss = train_denoiser(
                family, pipe, latents, captions, cfg.denoiser_steps, gen, cfg.denoiser_batch, cfg.denoiser_lr,
                cfg.warmup, cfg.ema_decay,
                progress=lambda _s, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4f}")),
            )
        den_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    report = {
        "config": asdict(cfg),
        "threads": cfg.threads,
        "resolution": resolution,
        "parameters": counts,
        "vae": vae_report,
        "denoiser": {"steps": cfg.denoiser_steps, "seconds": round(den_s, 1), "final_loss": loss},
        # Wall time of the whole training; a VAE stage reused from an interrupted run counts
        # with the time it took then.
        "total_seconds": round(time.perf_counter() - t_start
                               + (vae_report["seconds"] if vae_report.get("reused_from_interrupted_run") else 0), 1),
        "torch": torch.__version__,
    }
    out = save_model(pipe, out_dir, {"t5_tokens": T5_TOKENS, "trained": True})
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(Path(str(out_dir) + ".vae-stage"), ignore_errors=True)  # done: nothing left to resume
    log.info("micro model saved to %s (%.0f s in all)", out, report["total_seconds"])
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("stunning/assets/micro"))
    defaults = PretrainConfig()
    for name, value in asdict(defaults).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = PretrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    report = pretrain(args.out, cfg)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
