"""LoRA training of one style adapter (diffusers + peft + accelerate), resumable and reproducible.

:func:`train_style` loads the base pipeline through its model family, freezes it, adds a
PEFT LoRA adapter to the denoiser and trains only the adapter on the style's curated train
images. The VAE and the text encoder are frozen, so the latents and prompt embeddings of the
train (and val) images are computed once before the loop; each step then costs one denoiser
forward/backward. All randomness goes through explicit generators seeded from `train.seed`
(batch indices on a CPU generator, noise and timesteps on a generator of the compute device)
whose states are checkpointed with the weights, so a resumed run continues exactly where the
interrupted one stopped. The result is saved in the diffusers LoRA layout (loadable with
stock `pipe.load_lora_weights(dir)`) next to the resolved `train_config.yaml`; losses,
throughput, peak memory, sample images and the adapter go to the experiment tracker.

Two things keep a long run alive on a small machine: `batch_size: auto` probes the largest
batch that fits before training (`stunning.training.batch`), and any step that runs out of
memory halves the batch and is redone; a thermal guard (`stunning.training.thermal`) pauses
while the OS reports the machine throttling. The batch size in use is checkpointed, so a
resumed run continues with it (never re-probed) and stays exact.

Two data options change what a step sees. With aspect-ratio buckets (`data.buckets`) the
curated images come in several sizes: each bucket is encoded on its own and every batch is
drawn from one bucket, chosen with probability proportional to its image count on the loop
generator (so bucketed runs are reproducible and resume exactly); val loss is evaluated per
bucket. DreamBooth (`train.instance_prompt`, `train.prior_preservation`, Ruiz et al. 2023,
arXiv:2208.12242): the instance prompt replaces (or wraps) the captions, and with prior
preservation each step adds the same objective on as many class images, made once by the
frozen base model and cached, weighted by `train.prior_loss_weight`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from stunning.config import TrainConfig, dump_resolved
from stunning.io import atomic_dir
from stunning.tracking import NullTracker, Tracker
from stunning.training.batch import BatchSizeError, find_batch_size, free_memory, is_oom_error
from stunning.training.cache import EncodingCache
from stunning.training.checkpoint import CheckpointStore, fingerprint
from stunning.training.dataset import CuratedDataset, DatasetError, curated_data_config, style_rows
from stunning.training.thermal import ThermalGuard, ThermalProbe, describe

log = logging.getLogger(__name__)

# Gradient-norm clipping as in diffusers' LoRA example scripts; keeps a high learning rate
# from blowing up the adapter on the first steps.
MAX_GRAD_NORM = 1.0
ENCODE_BATCH = 16
# The diffusion loss of one batch swings with the drawn timesteps, so the reported final
# loss averages the last few steps and the val loss averages several noise draws.
FINAL_LOSS_WINDOW = 10
VAL_REPEATS = 4
SAMPLE_SEEDS = (0, 1, 2, 3)
SAMPLE_STEPS = 12
SAMPLE_GUIDANCE = 4.0
# Config keys that never change the trained weights (bookkeeping, and sampling, which runs
# on its own generators and a forked global RNG); left out of the checkpoint fingerprint so
# changing them still resumes.
NON_NUMERIC_KEYS = frozenset({
    "checkpoint_every", "keep_checkpoints", "sample_every", "sample_prompt",
    # Pausing for heat delays steps but never changes them.
    "thermal_check_every", "thermal_pause_s", "thermal_max_pause_s",
})
# Below this many denoiser parameters a CPU run uses one intra-op thread: the kernels are too
# small for OpenMP to pay for its synchronisation, and its spinning threads make a run on a
# busy machine 10-100x slower (embedded model, batch 4, 2 cores: 18-22 steps/s with one
# thread, 15-19 with two on an idle machine, 0.15-0.25 with two beside one busy process).
SMALL_DENOISER_PARAMS = 20_000_000

StepCallback = Callable[[int, float], None]


# --------------------------------------------------------------------------- precision


def resolve_mixed_precision(requested: str, device: torch.device, mps_choice: str | None = None) -> str:
    """The accelerate `mixed_precision` for `train.mixed_precision` on `device`.

    "auto":
    - CPU: "no" (fp32); the trainer then times a few steps (:func:`_calibrate_cpu`) to
      choose the thread count. bf16 autocast only when asked for (`bf16`);
    - CUDA: "bf16" where supported (Ampere and newer; no loss scaling needed), else "fp16";
    - MPS: the choice of :func:`stunning.device.mps_half_precision` (what the Mac trainers
      use): "bf16" on M2-or-newer with macOS 14+ and torch 2.6+, else "fp16" with a gradient
      scaler. `mps_choice` overrides the probe (tests).
    The frozen weights are loaded in that half type and the LoRA parameters stay float32; a
    VAE that overflows in fp16 (config `force_upcast`, e.g. SDXL's) stays float32 (the family
    loads it so). `PYTORCH_ENABLE_MPS_FALLBACK` is set by `import stunning` on macOS, so an
    operator Metal lacks runs on the CPU instead of stopping the run.
    """
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise ValueError("train.mixed_precision=fp16 needs a GPU; use auto, no or bf16 on CPU")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        if mps_choice is None:
            from stunning.device import mps_half_precision

            mps_choice, why = mps_half_precision()
            log.info("MPS precision %s: %s", mps_choice, why)
        return mps_choice
    return "no"


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """dtype of the frozen weights: the half type being trained in, else float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


# --------------------------------------------------------------------------- adapter helpers


def target_modules(cfg: TrainConfig) -> list[str] | str:
    """PEFT `target_modules`: the module names, or with `target_blocks` a regex restricting them
    to those blocks (PEFT full-matches a string against each module path)."""
    if not cfg.target_blocks:
        return list(cfg.target_modules)
    blocks = "|".join(re.escape(b.strip(".")) for b in cfg.target_blocks)
    names = "|".join(re.escape(t) for t in cfg.target_modules)
    return rf"(.*\.)?({blocks})\.(.*\.)?({names})"


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules(cfg),
        init_lora_weights="gaussian",
    )


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters by full module name, detached on the CPU."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`trainable_state` back in; names must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        extra, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise ValueError(f"LoRA state does not match the model: unexpected {extra[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(device=p.device, dtype=p.dtype))


def _global_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    # The global RNG (and the device's) drives LoRA dropout.
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_global_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def _rng_state(loop_gen: torch.Generator, noise_gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    # The generators drive batches, noise and timesteps; the global RNG LoRA dropout.
    return {"loop": loop_gen.get_state(), "noise": noise_gen.get_state(), **_global_rng_state(device)}


def _set_rng_state(
    state: dict[str, torch.Tensor], loop_gen: torch.Generator, noise_gen: torch.Generator, device: torch.device
) -> None:
    loop_gen.set_state(state["loop"])
    noise_gen.set_state(state["noise"])
    _set_global_rng_state(state, device)


def cpu_threads_for(model: torch.nn.Module, device: torch.device) -> int | None:
    """1 for a small model on the CPU, unless the user set OMP_NUM_THREADS; else None (leave as is)."""
    import os

    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    n = sum(p.numel() for p in model.parameters())
    return 1 if n < SMALL_DENOISER_PARAMS else None


# --------------------------------------------------------------------------- data helpers


def encode_dataset(
    family,
    pipe,
    dataset: CuratedDataset,
    seed: int,
    cache: EncodingCache | None = None,
    *,
    indices: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    caption_fn: Callable[[str], str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, prompt embeddings) of every item (or of `indices`), in dataset order.

    The VAE posterior is sampled once per image with a generator seeded from `seed` (or the
    given `generator`, shared across calls), so the tensors are the same on every run and on
    resume. With `cache`, each image's posterior moments and each caption's embedding are read
    from disk when their content was seen before (see `stunning.training.cache`); the sampled
    latents are identical either way. `caption_fn` maps each caption first (DreamBooth's
    instance prompt).
    """
    gen = generator if generator is not None else torch.Generator(device="cpu").manual_seed(seed)
    order = list(range(len(dataset))) if indices is None else list(indices)
    latents, conds = [], []
    for start in range(0, len(order), ENCODE_BATCH):
        items = [dataset[i] for i in order[start:start + ENCODE_BATCH]]
        pixels = torch.stack([it["pixels"] for it in items])
        captions = [caption_fn(it["caption"]) if caption_fn else it["caption"] for it in items]
        if cache is None:
            latents.append(family.encode_images(pipe, pixels, gen))
            conds.append(family.encode_prompts(pipe, captions))
            continue
        moments = [_cached(cache, "latent", cache.pixels_key(px), lambda px=px: _moments(pipe, px)) for px in pixels]
        mean = torch.stack([m for m, _ in moments]).to(pipe.vae.device)
        std = torch.stack([s for _, s in moments]).to(pipe.vae.device)
        latents.append(family.latents_from_moments(pipe, mean, std, gen))
        conds.append(torch.stack([
            _cached(cache, "prompt", cache.text_key(c, family.name), lambda c=c: family.encode_prompts(pipe, [c])[0])
            for c in captions
        ]).to(pipe.text_encoder.device))
    return torch.cat(latents), torch.cat(conds)


def encode_buckets(
    family, pipe, dataset: CuratedDataset, seed: int, cache: EncodingCache | None = None,
    caption_fn: Callable[[str], str] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(latents, conditioning) per aspect-ratio bucket (one entry for a single-size set).

    Buckets are encoded in size order with one generator, so a single-size set gives exactly
    what :func:`encode_dataset` gives.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [
        encode_dataset(family, pipe, dataset, seed, cache, indices=idx, generator=gen, caption_fn=caption_fn)
        for idx in dataset.buckets().values()
    ]


def size_multiple(fam, pipe) -> int:
    """What every image side must be a multiple of for this model: the VAE's downsampling factor
    times the denoiser's patch size, times 2 where the pipeline packs 2x2 latent patches (FLUX);
    for a UNet times its own downsampling (2 per down block but the last), so that no level
    of it has to resample a skip connection to an odd size.

    Real models: 16 for SD3 and FLUX, 64 for SD 1.x, 32 for SDXL; the embedded 32-px models: 4.
    """
    factor = int(getattr(pipe, "vae_scale_factor", None) or 8)
    config = dict(getattr(fam.denoiser(pipe), "config", {}) or {})
    patch = config.get("patch_size") or 1
    factor *= patch if isinstance(patch, int) else 1
    down = config.get("down_block_types")
    if isinstance(down, list | tuple) and down:
        factor *= 2 ** (len(down) - 1)
    if hasattr(type(pipe), "_pack_latents"):
        factor *= 2
    return factor


def check_bucket_sizes(fam, pipe, sizes, where: str) -> None:
    """Raise :class:`DatasetError` naming the sizes that this model cannot train on."""
    multiple = size_multiple(fam, pipe)
    bad = sorted({(w, h) for w, h in sizes if w % multiple or h % multiple})
    if bad:
        raise DatasetError(
            f"{where}: image size(s) {', '.join(f'{w}x{h}' for w, h in bad)} are not multiples of {multiple}, "
            f"which the {fam.name} model needs (VAE factor x patch size; for a UNet x its downsampling). "
            f"Set data.bucket_step to a multiple of {multiple} (and data.resolution too) and re-run ingest and curation."
        )


def class_image_size(train_set: CuratedDataset, sizes: Sequence[tuple[int, int]], largest: int) -> tuple[int, int]:
    """(width, height) of DreamBooth class images: the training size of a single-size set; with
    aspect-ratio buckets the square bucket of the resolution (the largest bucket, and one that
    every family's pipeline can sample)."""
    data = curated_data_config(train_set.root)
    if data.get("buckets"):
        res, step = int(data["resolution"]), int(data["bucket_step"])
        return res - res % step, res - res % step
    return sizes[largest]


def evaluate_buckets(family, pipe, scheduler, buckets, seed: int, batch_size: int) -> float:
    """:func:`evaluate_loss` over several buckets, weighted by their image counts."""
    total = sum(lat.shape[0] for lat, _ in buckets)
    return sum(
        evaluate_loss(family, pipe, scheduler, lat, cond, seed + i, batch_size) * lat.shape[0] / total
        for i, (lat, cond) in enumerate(buckets)
    )


def instance_caption_fn(cfg: TrainConfig) -> Callable[[str], str] | None:
    """DreamBooth's instance prompt as a caption mapping (None: captions as curated)."""
    if not cfg.instance_prompt:
        return None
    prompt = cfg.instance_prompt
    if "{caption}" in prompt:
        return lambda caption: prompt.replace("{caption}", caption)
    return lambda caption: prompt


# Words of an instance prompt that are never its trigger: articles, prepositions and the
# usual class nouns of a style or subject prompt ("a photo in sks style").
COMMON_PROMPT_WORDS = frozenset({
    "a", "an", "the", "in", "of", "on", "at", "by", "with", "and", "or", "for", "to", "from", "as", "style",
    "photo", "photograph", "picture", "image", "painting", "drawing", "illustration", "art", "artwork",
})
_WORD = re.compile(r"[^\s,.;:!?()\[\]{}\"]+")


def trigger_words(cfg: TrainConfig) -> list[str]:
    """The trigger words recorded in the adapter's metadata.

    `train.trigger_words` as listed; with an instance prompt that contains none of them (or
    with none listed), also the instance prompt's own trigger: its words that are neither in
    `class_prompt` nor common prompt words (COMMON_PROMPT_WORDS), e.g. "sks" for "a photo in
    sks style" (or "a photo of sks dog" with class prompt "a photo of dog"); if no word is
    left, the whole instance prompt without its `{caption}` placeholder.
    """
    words = list(cfg.trigger_words)
    if not cfg.instance_prompt:
        return words
    text = cfg.instance_prompt.replace("{caption}", " ")
    if any(w.lower() in text.lower() for w in words):
        return words
    known = {w.lower() for w in _WORD.findall(cfg.class_prompt or "")} | COMMON_PROMPT_WORDS
    found: list[str] = []
    for w in _WORD.findall(text):
        if w.lower() not in known and w not in found:
            found.append(w)
    return words + (found or [" ".join(text.split()).strip(" ,")])


def _moments(pipe, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from stunning.families import image_moments

    mean, std = image_moments(pipe, pixels[None])
    return mean[0].cpu(), std[0].cpu()


def _cached(cache: EncodingCache, kind: str, key: str, compute):
    value = cache.get(kind, key)
    if value is None:
        value = compute()
        value = tuple(v.detach().cpu() for v in value) if isinstance(value, tuple) else value.detach().cpu()
        cache.put(kind, key, value)
    return value


def sample_indices(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Batch indices: distinct within a batch when the set is large enough, else with replacement."""
    if batch_size <= n:
        return torch.randperm(n, generator=generator)[:batch_size]
    return torch.randint(0, n, (batch_size,), generator=generator)


@torch.no_grad()
def evaluate_loss(
    family,
    pipe,
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    seed: int,
    batch_size: int,
    repeats: int = VAL_REPEATS,
) -> float:
    """Mean training objective over a fixed set with fixed noise: comparable across models.

    The same `seed` gives the same noise and timesteps for every model, so the difference
    between two models' values is the difference of the models, not of the draw.
    """
    gen = torch.Generator(device=latents.device).manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(repeats):
        for start in range(0, latents.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            loss = family.training_loss(pipe, latents[sl], cond[sl], gen, scheduler=scheduler)
            n = latents[sl].shape[0]
            total += float(loss) * n
            count += n
    return total / count


# --------------------------------------------------------------------------- training


def train_style(
    base_path: str | Path,
    family,
    curated_dir: str | Path,
    style: str,
    cfg: TrainConfig,
    out_dir: str | Path,
    tracker: Tracker | None,
    checkpoint_dir: str | Path | None,
    device: str | torch.device | None = None,
    *,
    samples_dir: str | Path | None = None,
    sample_seeds: Sequence[int] = SAMPLE_SEEDS,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    on_step: StepCallback | None = None,
    progress: bool | None = None,
    cache_dir: str | Path | None = None,
    thermal_probe: ThermalProbe | None = None,
    class_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train one LoRA adapter for `style`; save it to `out_dir/<style>/`; return a summary.

    `family` is a :class:`stunning.families.Family` or its name. `checkpoint_dir=None`
    disables checkpointing (and resuming). One final sample image per seed in
    `sample_seeds` (none if empty) goes to the tracker and, if given, to
    `samples_dir/<style>/`. The tracker run is `run_name` (default `train-<style>`), tagged
    with style, stage and fingerprint plus `tags`. `on_step(step, loss)` is called after
    every optimizer step; an exception raised there stops the run like a crash would (the
    newest checkpoint survives). `progress=None` shows the progress bar only on a terminal.
    `cache_dir` keeps encoded images and captions on disk, keyed by content
    (`stunning.training.cache`); None encodes everything in memory each run.
    `thermal_probe` replaces :func:`stunning.device.thermal_state` as the thermal guard's
    source of the OS thermal state (tests feed captured states through it).
    `class_dir` keeps the generated class images of DreamBooth prior preservation (default:
    `<cache_dir>/class-images`, else `<checkpoint_dir>/class-images`, else a temporary folder).

    The summary holds `final_loss` (mean of the last few steps' losses), `val_loss` and
    `base_val_loss` (the same fixed-noise objective on the val split with and without the
    adapter; None without val images), `steps`, `steps_per_s`, `images_per_s` (of the steps
    run in this call; None if none ran), `peak_memory_mb`, `mlflow_run_id`, `seconds`,
    `adapter`, `resumed_from_step`, `fingerprint`, `device`, `mixed_precision`, `loss_history`,
    `batch_size` (the one in use at the end: `batch_size: auto` resolved, after any halving),
    `batch_backoffs` (steps redone with half the batch after running out of memory),
    `thermal_checks`, `thermal_throttled_checks` and `thermal_paused_s` (of this call).
    """
    from stunning.device import PeakMemory, select_device
    from stunning.families import get_family

    t_start = time.perf_counter()
    fam = get_family(family) if isinstance(family, str) else family
    base_path, curated_dir, out_dir = Path(base_path), Path(curated_dir), Path(out_dir)
    dev = select_device(None if device is None else str(device))
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision, dev)
    tracker = tracker or NullTracker()

    train_set = CuratedDataset(curated_dir, style, "train")
    val_set = CuratedDataset(curated_dir, style, "val", allow_empty=True)
    # max_batch_size only matters when the batch size is probed.
    exclude = set(NON_NUMERIC_KEYS) | ({"max_batch_size"} if cfg.batch_size != "auto" else set())
    fp = fingerprint(
        cfg.model_dump(exclude=exclude),
        base_path,
        style_rows(curated_dir, style),
        curated_dir,
        extra={"family": fam.name, "style": style, "code": _code_identity(fam)},
    )
    store = CheckpointStore.for_run(Path(checkpoint_dir), style, fp, cfg.keep_checkpoints) if checkpoint_dir else None

    run_tags = {"style": style, "stage": "train", "fingerprint": fp, **(tags or {})}
    run_id = tracker.start_run(run_name or f"train-{style}", tags=run_tags)
    status = "FAILED"
    threads_before = torch.get_num_threads()  # _train may lower it for a small model
    try:
        tracker.log_params(
            {
                **{f"train.{k}": v for k, v in cfg.model_dump().items()},
                "style": style,
                "base": str(base_path),
                "family": fam.name,
                "n_images": len(train_set),
                "n_val_images": len(val_set),
                "device": str(dev),
                "mixed_precision": mixed_precision,
                "fingerprint": fp,
            }
        )
        with PeakMemory(dev) as pm:
            result = _train(
                fam, base_path, train_set, val_set, style, cfg, dev, mixed_precision, store, tracker, on_step, progress,
                Path(cache_dir) if cache_dir is not None else None, thermal_probe,
                _class_dir(class_dir, cache_dir, checkpoint_dir),
            )
        pipe, history, start_step, loop_s, val_loss, base_val_loss, info = result
        mixed_precision = info["mixed_precision"]  # on a CPU with auto: what calibration chose
        if dev.type == "cpu":
            tracker.log_params({"cpu_threads": torch.get_num_threads()})
        steps_run = cfg.steps - start_step
        steps_per_s = steps_run / loop_s if steps_run and loop_s > 0 else None
        images_per_s = info["images"] / loop_s if steps_per_s else None
        run_facts = {
            "batch_size": info["batch_size"],
            "batch_backoffs": info["batch_backoffs"],
            **info["thermal"],
        }

        adapter_dir = out_dir / style
        with atomic_dir(adapter_dir) as tmp:
            fam.save_lora(pipe, tmp, metadata={
                "style": style,
                "training_hash": fp,
                "base_model": str(base_path),
                "family": fam.name,
                "rank": cfg.rank,
                "alpha": cfg.alpha,
                "target_modules": cfg.target_modules,
                "target_blocks": cfg.target_blocks,
                "trigger_words": trigger_words(cfg),
                "steps": cfg.steps,
                "batch_size": info["batch_size"],
            })
            dump_resolved(cfg, tmp / "train_config.yaml")
        adapter_file = adapter_dir / "pytorch_lora_weights.safetensors"

        samples = _write_samples(fam, pipe, cfg, style, samples_dir, sample_seeds) if sample_seeds else None
        final_loss = sum(history[-FINAL_LOSS_WINDOW:]) / len(history[-FINAL_LOSS_WINDOW:])
        metrics = {
            "final_loss": final_loss,
            "peak_memory_mb": pm.peak_mb,
            "peak_memory_delta_mb": pm.delta_mb,
            "seconds": time.perf_counter() - t_start,
            **run_facts,
        }
        if steps_per_s is not None:
            metrics.update(steps_per_s=steps_per_s, images_per_s=images_per_s)
        if val_loss is not None:
            metrics.update(val_loss=val_loss, base_val_loss=base_val_loss)
        tracker.log_metrics(metrics)
        tracker.log_artifact(adapter_dir, "adapter")
        if samples is not None:
            tracker.log_artifact(samples, "samples")
            if samples_dir is None:
                shutil.rmtree(samples, ignore_errors=True)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        torch.set_num_threads(threads_before)
        tracker.end_run(status)

    summary = {
        "final_loss": final_loss,
        "val_loss": val_loss,
        "base_val_loss": base_val_loss,
        "steps": cfg.steps,
        "steps_per_s": steps_per_s,
        "images_per_s": images_per_s,
        "peak_memory_mb": pm.peak_mb,
        "mlflow_run_id": run_id,
        "seconds": time.perf_counter() - t_start,
        "adapter": str(adapter_file),
        "resumed_from_step": start_step,
        "fingerprint": fp,
        "device": str(dev),
        "mixed_precision": mixed_precision,
        "n_images": len(train_set),
        "loss_history": history,
        **run_facts,
    }
    log.info(
        "%s: %d steps, final loss %.4f, val loss %s, %s steps/s, peak %.0f MB, batch %d, paused %.0f s for heat",
        style,
        cfg.steps,
        final_loss,
        "n/a" if val_loss is None else f"{val_loss:.4f}",
        "n/a" if steps_per_s is None else f"{steps_per_s:.2f}",
        pm.peak_mb,
        run_facts["batch_size"],
        run_facts["thermal_paused_s"],
    )
    return summary


def _train(
    fam,
    base_path: Path,
    train_set: CuratedDataset,
    val_set: CuratedDataset,
    style: str,
    cfg: TrainConfig,
    dev: torch.device,
    mixed_precision: str,
    store: CheckpointStore | None,
    tracker: Tracker,
    on_step: StepCallback | None,
    progress: bool | None,
    cache_dir: Path | None = None,
    thermal_probe: ThermalProbe | None = None,
    class_dir: Path | None = None,
):
    """The training proper; returns (pipe, loss history, start step, loop seconds, val, base val,
    info) where `info` holds `batch_size`, `batch_backoffs`, `images` (trained on in this call)
    and `thermal` (the guard's counters)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    pipe = fam.load_pipeline(base_path, dev, weight_dtype(mixed_precision))
    from stunning.device import vae_needs_fp32

    if vae_needs_fp32(pipe.vae, pipe.vae.dtype):
        pipe.vae.to(torch.float32)  # fp16 overflows in this VAE (its config says force_upcast)
    default_threads = torch.get_num_threads()
    threads = cpu_threads_for(fam.denoiser(pipe), dev)
    if threads is not None:
        log.info("small denoiser on the CPU: using %d intra-op thread(s)", threads)
        torch.set_num_threads(threads)
    for module in fam.frozen_modules(pipe):
        module.requires_grad_(False)
    scheduler = fam.noise_scheduler(pipe)

    if len(set(train_set.sizes) | set(val_set.sizes)) > 1 or curated_data_config(train_set.root).get("buckets"):
        check_bucket_sizes(fam, pipe, set(train_set.sizes) | set(val_set.sizes), str(train_set.root / "manifest.csv"))
    cache = EncodingCache(cache_dir, base_path) if cache_dir is not None else None
    captions = instance_caption_fn(cfg)
    buckets = encode_buckets(fam, pipe, train_set, cfg.seed, cache, captions)
    val_buckets = encode_buckets(fam, pipe, val_set, cfg.seed + 1, cache, captions) if len(val_set) else None
    sizes = list(train_set.buckets())
    counts = torch.tensor([float(lat.shape[0]) for lat, _ in buckets])
    # The biggest bucket (most pixels, then most images): the batch-size probe and the memory cap use it.
    largest = max(range(len(buckets)), key=lambda i: (sizes[i][0] * sizes[i][1], counts[i]))
    class_size = class_image_size(train_set, sizes, largest) if cfg.prior_preservation else None
    if class_size is not None:
        check_bucket_sizes(fam, pipe, [class_size], "train.prior_preservation class images")
    if len(buckets) > 1:
        log.info("%s: %d aspect-ratio buckets: %s", style, len(buckets),
                 ", ".join(f"{w}x{h}: {int(n)}" for (w, h), n in zip(sizes, counts, strict=True)))
        tracker.log_params({"buckets": {f"{w}x{h}": int(n) for (w, h), n in zip(sizes, counts, strict=True)}})
    class_latents = class_cond = None
    if class_size is not None:
        class_latents, class_cond = _class_set(fam, pipe, base_path, cfg, class_size, class_dir, cache)
        log.info("%s: prior preservation with %d class images (%r)", style, class_latents.shape[0], cfg.class_prompt)
    if cache is not None:
        log.info("%s: encoding cache %s: %d hits, %d misses", style, cache.root, cache.hits, cache.misses)
        tracker.log_metrics({"cache_hits": cache.hits, "cache_misses": cache.misses}, step=0)

    # The empty prompt's conditioning, for caption dropout (and so for guidance-free style).
    empty_cond = fam.encode_prompts(pipe, [""]) if cfg.caption_dropout else None

    denoiser = fam.denoiser(pipe)
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    # The adapter's gaussian init draws from the global RNG: seed it so runs are repeatable.
    torch.manual_seed(cfg.seed)
    denoiser.add_adapter(lora_config(cfg))
    # Trainable parameters stay float32 even when the frozen weights are half precision.
    cast_training_params(denoiser, dtype=torch.float32)
    params = [p for p in denoiser.parameters() if p.requires_grad]

    # The batch size: the checkpoint's (a resumed run continues with the one it used, never
    # re-probed), else the config's, else probed. Probing happens here, before the optimizer
    # and the loop's generators exist, and restores what it touches (see _probe_batch_size).
    ckpt = store.latest() if store else None
    if ckpt is not None and "batch_size" in ckpt.meta:
        batch, batch_source = int(ckpt.meta["batch_size"]), "checkpoint"
    elif cfg.batch_size == "auto":
        probe_latents, probe_cond = buckets[largest]
        if class_latents is not None:  # each step trains on as many class images as instance images
            if class_latents.shape[1:] == probe_latents.shape[1:]:
                probe_latents, probe_cond = torch.cat([probe_latents, class_latents]), torch.cat([probe_cond, class_cond])
            elif class_latents[0].numel() > probe_latents[0].numel():
                probe_latents, probe_cond = class_latents, class_cond  # trials of the bigger size bound both
        batch = _probe_batch_size(fam, pipe, params, scheduler, probe_latents, probe_cond, cfg, dev, mixed_precision,
                                  per_step=2 if class_latents is not None else 1)
        batch_source = "probe"
    else:
        batch, batch_source = int(cfg.batch_size), "config"
    log.info("%s: batch size %d (%s)", style, batch, batch_source)
    tracker.log_params({"batch_size": batch, "batch_size_source": batch_source})

    # CPU with mixed_precision auto: measured, not guessed (a resumed run keeps the checkpoint's).
    if dev.type == "cpu" and cfg.mixed_precision == "auto":
        if ckpt is not None and "cpu_setup" in ckpt.meta:
            cpu_threads, mixed_precision = ckpt.meta["cpu_setup"]
        else:
            lat, con = buckets[largest]
            cpu_threads, mixed_precision = _calibrate_cpu(
                fam, pipe, params, scheduler, lat, con, batch, cfg, dev,
                default_threads if threads is not None else None,
            )
        torch.set_num_threads(int(cpu_threads))
        tracker.log_params({"cpu_threads_chosen": int(cpu_threads), "mixed_precision_chosen": mixed_precision})

    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    from diffusers.optimization import get_scheduler

    lr_schedule = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps
    )
    ema = None
    if cfg.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay)

    loop_gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    noise_gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    history: list[float] = []
    start_step = 0
    if ckpt is not None:
        load_trainable_state(denoiser, ckpt.lora)
        optimizer.load_state_dict(ckpt.optimizer["optimizer"])
        if "lr_scheduler" in ckpt.optimizer:
            lr_schedule.load_state_dict(ckpt.optimizer["lr_scheduler"])
        if ema is not None and "ema" in ckpt.optimizer:
            ema.load_state_dict(ckpt.optimizer["ema"])
        _set_rng_state(ckpt.rng, loop_gen, noise_gen, dev)
        history = list(ckpt.loss_history)
        start_step = min(ckpt.step, cfg.steps)
        log.info("%s: resuming from %s (step %d of %d)", style, ckpt.path, ckpt.step, cfg.steps)
        for i, loss in enumerate(history, start=1):
            tracker.log_metrics({"loss": loss}, step=i)
    tracker.log_metrics({"batch_size": batch}, step=start_step)

    # The shared accelerate state would refuse a second Accelerator with another precision
    # in the same process (two runs in one test session or flow); each run sets its own.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        cpu=dev.type == "cpu",
        device_placement=False,  # everything is already on `dev`, which may be e.g. cuda:1
    )
    if ckpt is not None and accelerator.scaler is not None and ckpt.optimizer.get("scaler"):
        accelerator.scaler.load_state_dict(ckpt.optimizer["scaler"])
    optimizer = accelerator.prepare(optimizer)

    # (instance loss, prior loss) of each micro-batch, with prior preservation.
    loss_parts: list[tuple[float, float]] = []

    def run_step(batch_size: int, updated: list[bool]) -> list[float]:
        """One optimizer step (all its micro-batches); the micro-batch losses."""
        micro = []
        for _ in range(cfg.gradient_accumulation):
            # One bucket per batch, drawn in proportion to its images (no draw with one bucket,
            # so single-size runs use the generator exactly as before buckets existed).
            b = int(torch.multinomial(counts, 1, generator=loop_gen)) if len(buckets) > 1 else 0
            latents, cond = buckets[b]
            idx = sample_indices(latents.shape[0], batch_size, loop_gen).to(latents.device)
            batch_cond = cond[idx]
            if empty_cond is not None:
                drop = torch.rand(len(idx), generator=loop_gen) < cfg.caption_dropout
                batch_cond = torch.where(
                    drop.to(cond.device)[:, None, None], empty_cond.expand_as(batch_cond), batch_cond
                )
            class_idx = None
            if class_latents is not None:
                class_idx = sample_indices(class_latents.shape[0], batch_size, loop_gen).to(class_latents.device)
            with accelerator.accumulate(denoiser):
                with accelerator.autocast():
                    loss = fam.training_loss(pipe, latents[idx], batch_cond, noise_gen, scheduler=scheduler)
                    if class_idx is not None:
                        # DreamBooth's prior-preservation loss (Ruiz et al. 2023, eq. 2): the same
                        # objective on base-model images of the class, weighted, added to the
                        # instance loss (noise drawn after the instance batch's).
                        prior = fam.training_loss(pipe, class_latents[class_idx], class_cond[class_idx], noise_gen,
                                                  scheduler=scheduler)
                        loss_parts.append((loss.detach().float().item(), prior.detach().float().item()))
                        loss = loss + cfg.prior_loss_weight * prior
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()
                if accelerator.sync_gradients:
                    updated[0] = True  # from here on the step cannot be redone
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                lr_schedule.step()
                if ema is not None:
                    ema.step(params)
            micro.append(loss.detach().float().item())
        return micro

    guard = ThermalGuard(
        thermal_probe,
        check_every=cfg.thermal_check_every,
        pause_s=cfg.thermal_pause_s,
        max_pause_s=cfg.thermal_max_pause_s,
    )
    backoffs = 0
    images = 0
    denoiser.train()
    pending: list[tuple[int, dict[str, float]]] = []
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc=f"train {style}",
        unit="step",
        disable=None if progress is None else not progress,
    )
    t0 = time.perf_counter()
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            step_metrics: dict[str, float] = {}
            while True:
                # What a step redone after running out of memory must start from again.
                rng_before, accumulated_before = _rng_state(loop_gen, noise_gen, dev), accelerator.step
                updated = [False]
                failure = None
                try:
                    micro = run_step(batch, updated)
                except Exception as exc:
                    if not is_oom_error(exc) or updated[0]:
                        raise
                    failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if failure is None:
                    break
                # Out of the except block: the failed attempt's frames and tensors are released.
                for p in params:
                    p.grad = None
                _set_rng_state(rng_before, loop_gen, noise_gen, dev)
                accelerator.step = accumulated_before
                free_memory(dev)
                if batch == 1:
                    raise BatchSizeError(
                        f"{style}: step {step} runs out of memory on {dev} even with a batch of 1 image ({failure}). "
                        "Lower data.resolution or train.rank, set train.gradient_checkpointing: true, or use "
                        "train.mixed_precision fp16/bf16 on a GPU."
                    )
                batch //= 2
                backoffs += 1
                step_metrics["batch_size"] = batch
                log.warning(
                    "%s: step %d ran out of memory (%s); redoing it with batch size %d", style, step, failure, batch
                )
            images += batch * cfg.gradient_accumulation
            step_loss = sum(micro) / len(micro)
            history.append(step_loss)
            step_metrics["loss"] = step_loss
            if loss_parts:
                parts = loss_parts[-len(micro):]
                step_metrics["instance_loss"] = sum(i for i, _ in parts) / len(parts)
                step_metrics["prior_loss"] = sum(p for _, p in parts) / len(parts)
                loss_parts.clear()
            check = guard(step)
            if check is not None:
                step_metrics["thermal_throttled"] = float(check.throttled)
                step_metrics["thermal_paused_s"] = guard.paused_s
                t0 += check.paused_s  # a pause for heat is not training throughput
            pending.append((step, step_metrics))
            bar.update(1)
            postfix = {"loss": f"{step_loss:.4f}", "mem": _memory_now(dev)}
            if guard.last_state is not None:
                postfix["thermal"] = describe(guard.last_state)
            bar.set_postfix(postfix)
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                t_sample = time.perf_counter()
                _log_intermediate_samples(fam, pipe, cfg, style, step, dev, tracker)
                t0 += time.perf_counter() - t_sample  # sampling is not training throughput
            if store is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                opt_state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_schedule.state_dict()}
                if ema is not None:
                    opt_state["ema"] = ema.state_dict()
                if accelerator.scaler is not None:
                    opt_state["scaler"] = accelerator.scaler.state_dict()
                store.save(
                    step,
                    trainable_state(denoiser),
                    opt_state,
                    _rng_state(loop_gen, noise_gen, dev),
                    history,
                    meta={"batch_size": batch, "cpu_setup": [torch.get_num_threads(), mixed_precision]},
                )
                # Metrics are flushed with each checkpoint: per-step database writes would
                # slow the loop, and a crashed run still shows its curve up to here.
                _flush(tracker, pending)
            if on_step is not None:
                on_step(step, step_loss)
    finally:
        bar.close()
        _flush(tracker, pending)
    loop_s = time.perf_counter() - t0
    if ema is not None:
        ema.copy_to(params)  # the averaged adapter is the one evaluated and saved

    denoiser.eval()
    val_loss = base_val_loss = None
    if val_buckets is not None:
        val_loss = evaluate_buckets(fam, pipe, scheduler, val_buckets, cfg.seed + 2, batch)
        denoiser.disable_adapters()
        try:
            base_val_loss = evaluate_buckets(fam, pipe, scheduler, val_buckets, cfg.seed + 2, batch)
        finally:
            denoiser.enable_adapters()
    accelerator.free_memory()
    info = {"batch_size": batch, "batch_backoffs": backoffs, "images": images, "thermal": guard.metrics(),
            "buckets": len(buckets), "mixed_precision": mixed_precision}
    return pipe, history, start_step, loop_s, val_loss, base_val_loss, info


def _memory_now(dev: torch.device) -> str:
    """Memory in use right now, for the progress bar: the accelerator's allocations, or on the
    CPU this process's resident set."""
    if dev.type == "cuda":
        used = torch.cuda.memory_allocated(dev)
    elif dev.type == "mps":
        used = torch.mps.current_allocated_memory()
    else:
        import psutil

        used = psutil.Process().memory_info().rss
    return f"{used / 2**30:.2f} GB"


def _class_dir(class_dir, cache_dir, checkpoint_dir) -> Path:
    if class_dir is not None:
        return Path(class_dir)
    if cache_dir is not None:
        return Path(cache_dir) / "class-images"
    if checkpoint_dir is not None:
        return Path(checkpoint_dir) / "class-images"
    return Path(tempfile.mkdtemp(prefix="stunning-class-"))


def class_images(fam, pipe, base_path: Path, cfg: TrainConfig, size: tuple[int, int], root: Path) -> list[Path]:
    """The class images of DreamBooth prior preservation: `num_class_images` PNGs of `size`.

    Images in `train.class_data_dir` come first (fitted to `size`); the rest are generated by
    the frozen base model from `class_prompt`, one seed each, into a folder of `root` keyed by
    base model, family, prompt, size and sampling settings. Each image is written atomically
    as it is made, so an interrupted run keeps what it generated and the next run (or a
    resume) reuses it: generation happens once.
    """
    import hashlib
    import json

    from PIL import Image, ImageOps

    from stunning.io import atomic_write_bytes
    from stunning.training.cache import encoder_key

    key = hashlib.sha256(json.dumps({
        "base": encoder_key(base_path), "family": fam.name, "prompt": cfg.class_prompt, "size": list(size),
        "steps": cfg.class_sample_steps, "guidance": SAMPLE_GUIDANCE, "seed": cfg.seed,
    }, sort_keys=True).encode()).hexdigest()[:16]
    folder = root / key
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if cfg.class_data_dir:
        given = Path(cfg.class_data_dir)
        if not given.is_dir():
            raise FileNotFoundError(f"train.class_data_dir={given}: not a folder of class images")
        suffixes = (".png", ".jpg", ".jpeg", ".webp")
        for src in sorted(p for p in given.iterdir() if p.suffix.lower() in suffixes)[: cfg.num_class_images]:
            dst = folder / f"given-{src.stem}.png"
            if not dst.is_file():
                with Image.open(src) as img:
                    fitted = ImageOps.fit(img.convert("RGB"), size, method=Image.Resampling.LANCZOS)
                buf = io.BytesIO()
                fitted.save(buf, format="PNG")
                atomic_write_bytes(dst, buf.getvalue())
            paths.append(dst)
    missing = [i for i in range(cfg.num_class_images - len(paths)) if not (folder / f"gen-{i:05d}.png").is_file()]
    if missing:
        log.info("generating %d class image(s) for %r with the base model into %s", len(missing), cfg.class_prompt, folder)
        w, h = size
        with torch.random.fork_rng(devices=[]):
            for i in missing:
                gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 100_003 + i)
                image = pipe(cfg.class_prompt, generator=gen, num_inference_steps=cfg.class_sample_steps,
                             guidance_scale=SAMPLE_GUIDANCE, height=h, width=w, output_type="pil",
                             **_sampling_kwargs(fam, pipe)).images[0]
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                atomic_write_bytes(folder / f"gen-{i:05d}.png", buf.getvalue())
    paths += [folder / f"gen-{i:05d}.png" for i in range(cfg.num_class_images - len(paths))]
    return paths


def _sampling_kwargs(fam, pipe) -> dict[str, Any]:
    """Pipeline-call arguments a family needs beyond the stock defaults (its T5 token count)."""
    t5 = getattr(fam, "t5_tokens", None)
    return {"max_sequence_length": t5(pipe)} if t5 is not None else {}


class _Images:
    """Class images as a dataset of ``{"pixels", "caption"}`` items for :func:`encode_dataset`."""

    def __init__(self, paths: list[Path], caption: str):
        self.paths, self.caption = paths, caption

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from stunning.training.dataset import load_pixels

        return {"pixels": load_pixels(self.paths[i]), "caption": self.caption}


def _class_set(fam, pipe, base_path, cfg, size, root: Path, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, conditioning) of the class images (made before the adapter exists: base model)."""
    paths = class_images(fam, pipe, base_path, cfg, size, root)
    return encode_dataset(fam, pipe, _Images(paths, cfg.class_prompt), cfg.seed + 3, cache)


# CPU calibration (train.mixed_precision auto): a step shorter than this is bound by
# per-operator overhead, where neither more threads nor bf16 pay (measured: the 32-px micro
# model trains at 12.2 steps/s in fp32 and 9.3 in bf16 autocast, one thread); longer steps
# are compute-bound (a 64-px SD-1.5-layout UNet: 0.66 steps/s on one thread, 1.0 on two,
# 1.68 in bf16 autocast on an AVX512-BF16 CPU).
CPU_BOUND_STEP_S = 0.15
CALIBRATION_STEPS = 2
MIN_SPEEDUP = 1.15  # switch only for a clear gain: timings on a shared machine are noisy


def _calibrate_cpu(fam, pipe, params, scheduler, latents, cond, batch, cfg, dev, more_threads: int | None):
    """(threads, mixed_precision) for a CPU run with `train.mixed_precision: auto`.

    Times a few trial steps (leaving no trace, like the batch probe) at the current thread
    count; if a step is compute-bound (>= CPU_BOUND_STEP_S) and the small-model rule chose
    fewer threads than the default (`more_threads`), also with the default, which must be
    MIN_SPEEDUP faster to be chosen. Precision stays fp32 ("no"): bf16 autocast on a CPU
    with native bf16 (AVX512-BF16/AMX) measured up to 1.5x faster on compute-bound steps,
    but it changes the numerics, so it is only used when `train.mixed_precision: bf16` asks.
    """
    threads = torch.get_num_threads()
    try:
        timing = {threads: _time_steps(fam, pipe, params, scheduler, latents, cond, batch, cfg, dev, "no")}
    except Exception as exc:
        if not is_oom_error(exc):
            raise
        free_memory(dev)  # the loop's own out-of-memory handling takes it from here
        log.info("CPU calibration skipped: a trial step ran out of memory")
        return threads, "no"
    if timing[threads] >= CPU_BOUND_STEP_S and more_threads and more_threads > threads:
        torch.set_num_threads(more_threads)
        timing[more_threads] = _time_steps(fam, pipe, params, scheduler, latents, cond, batch, cfg, dev, "no")
        if timing[threads] / timing[more_threads] >= MIN_SPEEDUP:
            threads = more_threads
        torch.set_num_threads(threads)
    log.info("CPU calibration: %s", ", ".join(f"{n} thread(s): {t:.3f} s/step" for n, t in timing.items()))
    log.info("CPU training with %d thread(s), fp32", threads)
    return threads, "no"


def _time_steps(fam, pipe, params, scheduler, latents, cond, batch, cfg, dev, mixed_precision) -> float:
    """Seconds per training step (forward, backward, AdamW step) after one warm-up; no trace left."""
    denoiser = fam.denoiser(pipe)
    snapshot, rng, was_training = trainable_state(denoiser), _global_rng_state(dev), denoiser.training
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    idx = torch.arange(batch) % latents.shape[0]
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    denoiser.train()
    times = []
    try:
        for _ in range(1 + CALIBRATION_STEPS):
            t0 = time.perf_counter()
            with _autocast(dev, mixed_precision):
                loss = fam.training_loss(pipe, latents[idx], cond[idx], gen, scheduler=scheduler)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    finally:
        opt.state.clear()
        load_trainable_state(denoiser, snapshot)
        _set_global_rng_state(rng, dev)
        denoiser.train(was_training)
    return sum(times[1:]) / CALIBRATION_STEPS


def _autocast(dev: torch.device, mixed_precision: str):
    """The autocast context of `mixed_precision` on `dev` (what accelerate's `autocast` enters)."""
    if mixed_precision in ("fp16", "bf16"):
        return torch.autocast(device_type=dev.type, dtype=weight_dtype(mixed_precision))
    return contextlib.nullcontext()


def _attention_geometry(denoiser: torch.nn.Module) -> tuple[int, int]:
    """(attention heads, patch size) of a diffusers denoiser, for the MPS batch cap.

    Transformers (sd3) name their heads `num_attention_heads`; the SD 1.x UNet's
    `attention_head_dim` is, despite its name, its number of heads. Unknown: 8 heads, no patches.
    """
    config = dict(getattr(denoiser, "config", {}) or {})
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 8
    if isinstance(heads, list | tuple):
        heads = max((h for h in heads if isinstance(h, int)), default=8)
    patch = config.get("patch_size") or 1
    return int(heads), int(patch) if isinstance(patch, int) else 1


def _probe_batch_size(
    fam,
    pipe,
    params: list[torch.nn.Parameter],
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    cfg: TrainConfig,
    dev: torch.device,
    mixed_precision: str,
    per_step: int = 1,
) -> int:
    """Resolve `batch_size: auto` with trial steps that leave no trace on the run.

    `per_step`: images a step trains on per unit of batch size (2 with prior preservation:
    the instance batch plus as many class images); trials use that many.

    Runs before the run's optimizer, schedule and generators are created. Each trial is one
    forward/backward (in training mode, under the run's autocast, with gradient checkpointing
    if enabled) and one step of a throwaway AdamW (its state is part of the memory), on the
    first images of the train set with noise from a throwaway generator. Afterwards the
    adapter weights are copied back from before the trials, the gradients dropped and torch's
    global RNG (LoRA dropout) restored, so the run trains exactly as if the chosen size had
    been set in the config.
    """
    denoiser = fam.denoiser(pipe)
    heads, patch = _attention_geometry(denoiser)
    snapshot = trainable_state(denoiser)
    rng = _global_rng_state(dev)
    was_training = denoiser.training
    probe_opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    n = latents.shape[0]

    def trial(batch_size: int) -> None:
        idx = (torch.arange(batch_size * per_step) % n).to(latents.device)
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        try:
            with _autocast(dev, mixed_precision):
                loss = fam.training_loss(pipe, latents[idx], cond[idx], gen, scheduler=scheduler)
            loss.backward()
            probe_opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)  # an asynchronous failure surfaces here, not in training
        finally:
            probe_opt.zero_grad(set_to_none=True)

    denoiser.train()
    try:
        search = find_batch_size(
            trial,
            1,
            cfg.max_batch_size,
            dev,
            latent_shape=tuple(latents.shape[1:]),
            heads=heads,
            patch_size=patch,
            bytes_per_element=weight_dtype(mixed_precision).itemsize,
        )
    finally:
        probe_opt.state.clear()  # its moments are the trials', and memory the run needs
        load_trainable_state(denoiser, snapshot)
        _set_global_rng_state(rng, dev)
        denoiser.train(was_training)
        free_memory(dev)
    return search.batch_size


def _flush(tracker: Tracker, pending: list[tuple[int, dict[str, float]]]) -> None:
    for step, metrics in pending:
        tracker.log_metrics(metrics, step=step)
    pending.clear()


def _log_intermediate_samples(fam, pipe, cfg: TrainConfig, style: str, step: int, dev, tracker: Tracker) -> None:
    """Samples at `step` to the tracker (`samples/step-<n>/`), without disturbing training.

    Generation uses its own seeded generators; the global RNG (LoRA dropout) is forked so
    that a run with samples trains exactly like one without.
    """
    denoiser = fam.denoiser(pipe)
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), tempfile.TemporaryDirectory(prefix=f"samples-{style}-") as tmp:
        denoiser.eval()
        try:
            folder = _write_samples(fam, pipe, cfg, style, tmp, SAMPLE_SEEDS)
        finally:
            denoiser.train()
        tracker.log_artifact(folder, f"samples/step-{step}")


def _code_identity(fam) -> dict[str, str]:
    """Hashes of the training code and versions of the libraries that shape the numbers.

    Part of the checkpoint fingerprint: a checkpoint is only resumed by the code that wrote
    it, so a fixed bug or an upgraded library never continues (or reuses) a stale run.
    """
    import hashlib
    import importlib.metadata
    import inspect

    files = sorted(Path(__file__).parent.glob("*.py"))
    family_file = inspect.getsourcefile(type(fam))
    if family_file:
        files.append(Path(family_file))
    ident = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files}
    for lib in ("torch", "diffusers", "peft", "accelerate"):
        ident[lib] = importlib.metadata.version(lib)
    return ident


def sample_prompt(cfg: TrainConfig, style: str) -> str:
    """The sample prompt in the captions' convention (`..., <style> style`), or with DreamBooth's
    instance prompt that prompt (its `{caption}` filled with `train.sample_prompt`)."""
    if cfg.instance_prompt:
        return cfg.instance_prompt.replace("{caption}", cfg.sample_prompt)
    return f"{cfg.sample_prompt}, {style} style"


def _write_samples(
    fam, pipe, cfg: TrainConfig, style: str, samples_dir: str | Path | None, seeds: Sequence[int]
) -> Path:
    """Generate the final sample images into `samples_dir/<style>/` (or a temp folder)."""
    prompt = sample_prompt(cfg, style)
    images = fam.generate(pipe, [prompt] * len(seeds), [int(s) for s in seeds], SAMPLE_STEPS, SAMPLE_GUIDANCE)
    target = (
        Path(samples_dir) / style if samples_dir is not None else Path(tempfile.mkdtemp(prefix=f"samples-{style}-"))
    )
    ctx = atomic_dir(target) if samples_dir is not None else contextlib.nullcontext(target)
    with ctx as folder:
        for seed, img in zip(seeds, images, strict=True):
            img.save(Path(folder) / f"seed-{seed}.png")
        (Path(folder) / "prompt.txt").write_text(prompt + "\n")
    return target
