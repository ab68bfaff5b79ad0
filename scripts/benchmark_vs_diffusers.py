"""Training throughput of Stunning's LoRA trainer against the diffusers example LoRA scripts.

    python scripts/benchmark_vs_diffusers.py --diffusers-script PATH [--diffusers-python PY]
        [--models tiny small sd15] [--resolution PX] [--precision fp32 [bf16 defaults]]
        [--steps 200] [--batch-size 4]
        [--rank 4] [--lr 1e-4] [--out reports/benchmark_vs_diffusers.json]

The issue's target: at least 1.5x the training steps per second of the diffusers example
LoRA script (examples/text_to_image or dreambooth) on the same model, data, resolution and
batch size on this machine.

Getting the example script. It is in the diffusers git repository, not in the wheel; take
the version matching the installed diffusers (0.42.1 here) and pass the file, unmodified:

    git clone --depth 1 --branch v0.42.1 https://github.com/huggingface/diffusers /tmp/diffusers
    --diffusers-script /tmp/diffusers/examples/text_to_image/train_text_to_image_lora.py
    # or /tmp/diffusers/examples/dreambooth/train_dreambooth_lora.py

The text_to_image script reads its data through the `datasets` library (a benchmark-only
dependency, not one of the project's): `pip install datasets` into the python that runs it
(`--diffusers-python`, default: this one). Both scripts import torchvision for their image
transforms; where `import torchvision` fails (its CPU wheel is not on PyPI, see
TORCHVISION_SHIM) the runner supplies a PIL/torch equivalent of the transforms they use.
Before anything runs, the script's `check_min_version(...)` is compared with the diffusers
that python imports, so a checkout newer than the installed wheel is refused with the tag
to clone instead.

What runs, for each model and precision, each side in its own subprocess:

- **diffusers**: the example script, unmodified, through `runpy`; a small runner only wraps
  `tqdm.update` of its "Steps" bar to timestamp every optimizer step. Offline: local model
  folder, `HF_HUB_OFFLINE=1`, `HF_DATASETS_OFFLINE=1`, no validation prompt, no hub push,
  `--checkpointing_steps` beyond the last step.
- **stunning**: `stunning.training.trainer.train_style` (sd-unet family), timestamping steps
  with its `on_step` hook; no tracker, no checkpoints, no sample images.

Same on both sides: the local SD-1.5-layout model folder; the images and captions (the
embedded sample set's `noir` train split, written as an imagefolder with metadata.jsonl for
text_to_image, as a plain image folder plus one `--instance-prompt` for dreambooth, which
Stunning then uses as `train.instance_prompt`); resolution (centre crop); batch size; LoRA
rank with alpha = rank; targets to_q, to_k, to_v, to_out.0 (dreambooth also lists
add_k_proj/add_v_proj, which an SD-1.5 UNet does not have); learning rate with a constant
schedule and no warm-up; seed; no validation images; no checkpoints. Precision
(`--precision`, one row per choice):

- `fp32`: both in fp32 (example `--mixed_precision=no`, Stunning `train.mixed_precision: no`);
- `bf16`: both with bf16 (example `--mixed_precision=bf16`, which casts the frozen weights to
  bf16; Stunning `bf16`, autocast over fp32 weights);
- `defaults`: each side's default: the example's `no` against Stunning's `auto` (on a CPU
  fp32, with a timed choice of thread count).

Each side keeps its own defaults otherwise, because that is what a user of either gets: the
example decodes and transforms images and runs the VAE and text encoder every step, uses
AdamW with weight decay 1e-2 and gradient clipping, logs to tensorboard when installed, and
uses torch's default thread count; Stunning encodes the set once and may drop to one
intra-op thread for a small denoiser. The example's epochs end with a partial batch
(n_images mod batch size), so it trains on slightly fewer images per step: images/s is
reported next to steps/s for that reason.

Measured: **steps/s** = (steps - 1) / (time of the last step - time of the first step), the
same definition on both sides: model loading, data preparation, Stunning's calibration and
the first (warm-up) step are outside it. **wall s**: the whole subprocess (interpreter
start-up, imports, loading, data, training, saving, and Stunning's val loss with and without
the adapter). Threads and precision actually used are recorded for each side. Models: `tiny`
is the project's test-sized SD-1.5 layout (32 px, where per-step overheads dominate);
`small` a wider SD-1.5-layout UNet at 64 px (see `small_sd15`), where the UNet's compute
dominates; `sd15` SD 1.5's own architecture with random weights at 256 px (see `sd15`), where
the VAE and text encoder take their real share of a step. A benchmark, not a test: figures
depend on the machine and its load. For the figures, run it on an otherwise idle machine
without OMP_NUM_THREADS set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KINDS = {"train_text_to_image_lora.py": "text_to_image", "train_dreambooth_lora.py": "dreambooth"}
MODELS = {"tiny": 32, "small": 64, "sd15": 256}  # --models: default resolution
PRECISIONS = {  # --precision: (example --mixed_precision, Stunning train.mixed_precision)
    "fp32": ("no", "no"),
    "bf16": ("bf16", "bf16"),
    "defaults": ("no", "auto"),
}

RUNNER = r"""
import json, runpy, sys, time
import torch
import tqdm.std
stamps, threads = [], []
_update = tqdm.std.tqdm.update
def update(self, n=1):
    if getattr(self, "desc", "") == "Steps":
        stamps.append(time.perf_counter())
        if not threads:
            threads.append(torch.get_num_threads())
    return _update(self, n)
tqdm.std.tqdm.update = update
script, out, shim = sys.argv[1], sys.argv[2], sys.argv[3]
if shim:
    # Libraries decide once whether torchvision exists; let them see it does not, then give
    # the example script the transforms it imports.
    import importlib.util, types
    import accelerate, diffusers, peft, transformers
    try:
        import datasets
    except ImportError:
        pass
    from transformers.utils import import_utils
    import_utils.is_torchvision_available()
    spec = importlib.util.spec_from_file_location("torchvision.transforms", shim)
    transforms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(transforms)
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = package, transforms
sys.argv = [script] + sys.argv[4:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    json.dump({"stamps": stamps, "threads": threads[0] if threads else None}, open(out, "w"))
"""

STUNNING_RUNNER = r"""
import json, sys, time
from pathlib import Path
import torch
from stunning.config import TrainConfig
from stunning.training.trainer import train_style
spec = json.loads(sys.argv[1])
stamps, threads = [], []
def on_step(step, loss):
    stamps.append(time.perf_counter())
    if not threads:
        threads.append(torch.get_num_threads())
cfg = TrainConfig(**spec["cfg"])
s = train_style(Path(spec["base"]), "sd-unet", Path(spec["data"]), "noir", cfg, Path(spec["out"]), None, None, "cpu",
                sample_seeds=(), progress=False, on_step=on_step)
json.dump({"stamps": stamps, "threads": threads[0] if threads else None, "mixed_precision": s["mixed_precision"],
           "n_images": s["n_images"], "batch_size": s["batch_size"]}, open(spec["stamps"], "w"))
"""


# The example script uses eight `torchvision.transforms` for its per-step image preprocessing.
# torchvision's CPU wheel comes from download.pytorch.org, which an offline machine cannot
# reach, and PyPI's (CUDA) wheel fails to load its operators beside a CPU torch. Where
# `import torchvision` fails, the runner hands the example script this PIL/torch equivalent
# of those transforms (the same operations; their cost is microseconds per batch next to a
# UNet step). With a working torchvision installed, the real one is used.
TORCHVISION_SHIM = r"""
import enum, random
import numpy as np
import torch
from PIL import Image

class InterpolationMode(enum.Enum):
    NEAREST = "nearest"; BILINEAR = "bilinear"; BICUBIC = "bicubic"; LANCZOS = "lanczos"
    BOX = "box"; HAMMING = "hamming"; NEAREST_EXACT = "nearest-exact"

_PIL = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS,
        "box": Image.BOX, "hamming": Image.HAMMING, "nearest-exact": Image.NEAREST}

class Compose:
    def __init__(self, ts): self.ts = ts
    def __call__(self, x):
        for t in self.ts: x = t(x)
        return x

class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR): self.size, self.mode = size, interpolation
    def __call__(self, img):
        w, h = img.size; s = self.size
        nw, nh = (s, max(1, round(h * s / w))) if w <= h else (max(1, round(w * s / h)), s)
        return img.resize((nw, nh), _PIL[self.mode.value])

class CenterCrop:
    def __init__(self, size): self.size = size
    def __call__(self, img):
        w, h = img.size; l, t = (w - self.size) // 2, (h - self.size) // 2
        return img.crop((l, t, l + self.size, t + self.size))

class RandomCrop(CenterCrop):
    def __call__(self, img):
        w, h = img.size; l, t = random.randint(0, w - self.size), random.randint(0, h - self.size)
        return img.crop((l, t, l + self.size, t + self.size))

class RandomHorizontalFlip:
    def __call__(self, img): return img.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < 0.5 else img

class Lambda:
    def __init__(self, f): self.f = f
    def __call__(self, x): return self.f(x)

class ToTensor:
    def __call__(self, img): return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

class Normalize:
    def __init__(self, mean, std): self.mean, self.std = mean[0], std[0]
    def __call__(self, x): return (x - self.mean) / self.std
"""


def torchvision_shim(python: str, tmp: Path) -> str:
    """The transforms shim's file when `python` cannot import torchvision, else ''."""
    if subprocess.run([python, "-c", "import torchvision.transforms"], capture_output=True).returncode == 0:
        return ""
    shim = tmp / "torchvision_transforms_shim.py"
    shim.write_text(TORCHVISION_SHIM)
    return str(shim)


def example_kind(script: Path) -> str:
    """'text_to_image' or 'dreambooth' from the example script's file name."""
    try:
        return KINDS[script.name]
    except KeyError:
        raise SystemExit(f"--diffusers-script {script}: expected one of {sorted(KINDS)} "
                         "(examples/text_to_image/ or examples/dreambooth/ of a diffusers checkout)") from None


def check_example_env(python: str, script: Path, kind: str) -> str:
    """The diffusers version `python` imports; exits with what to do if the script cannot run there."""
    probe = ("import importlib.util, json, diffusers; print(json.dumps([diffusers.__version__, "
             "importlib.util.find_spec('datasets') is not None]))")
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"--diffusers-python {python}: cannot import diffusers:\n{proc.stderr[-2000:]}")
    version, has_datasets = json.loads(proc.stdout.strip().splitlines()[-1])
    if kind == "text_to_image" and not has_datasets:
        raise SystemExit(f"--diffusers-python {python}: `datasets` is not installed; the text_to_image example "
                         f"reads its data through it. Run: {python} -m pip install datasets")
    from packaging.version import Version

    needed = re.search(r"""check_min_version\(\s*["']([^"']+)["']""", script.read_text())
    if needed and Version(version) < Version(needed.group(1)):
        raise SystemExit(f"--diffusers-script {script} needs diffusers >= {needed.group(1)} but {python} has "
                         f"{version}; use the example of the installed release: git clone --branch v{version} "
                         "https://github.com/huggingface/diffusers")
    return version


def small_sd15(out: Path, seed: int = 0) -> Path:
    """The `small` model: an SD-1.5-layout pipeline for 64 px images.

    UNet: three levels of 64-128-128 channels (cross-attention in the first two), one layer
    per block, 8-dim heads, 64-dim cross-attention (about 5.8 M parameters); the tiny VAE
    (scale factor 2, so 32x32 latents) and a 2-layer, 64-wide CLIP text encoder.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stunning.embedded import clip_config, load_tokenizer
    from stunning.families import save_model
    from stunning.tiny import sd_unet_configs

    tok = load_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=AutoencoderKL(**sd_unet_configs(len(tok))["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip_config(len(tok), hidden=64, layers=2, heads=4))), tokenizer=tok,
        scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, steps_offset=1, clip_sample=False),  # SD 1.5's settings
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return save_model(pipe, out)


def sd15(out: Path, seed: int = 0) -> Path:
    """The `sd15` model: Stable Diffusion 1.5's own architecture with random weights.

    The UNet (860 M parameters), VAE (84 M, scale factor 8) and 12-layer CLIP-L text encoder
    with 77 tokens have SD 1.5's configurations, so the share of a step spent in the VAE and
    text encoder (which Stunning caches and the example recomputes every step) is the real
    model's. The weights are random because nothing can be downloaded here; throughput does
    not depend on them. The vocabulary is the project's small BPE (the embedding table's size
    does not change the compute).
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stunning.embedded import clip_config, load_tokenizer
    from stunning.families import save_model

    tok = load_tokenizer()
    tok.model_max_length = 77
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
    )
    text = CLIPTextModel(CLIPTextConfig(**{**clip_config(len(tok), hidden=768, layers=12, heads=12),
                                           "max_position_embeddings": 77, "hidden_act": "quick_gelu"}))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tok,
        scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return save_model(pipe, out)


def sample_data(root: Path, resolution: int) -> tuple[Path, Path, Path]:
    """(curated dir for Stunning, imagefolder with metadata.jsonl, images-only folder): the
    same images (the sample set's `noir` train split) and captions."""
    import csv
    import shutil

    from stunning.config import DataConfig, Params
    from stunning.data.curate import curate
    from stunning.data.ingest import ingest
    from stunning.data.sample import generate_sample

    params = Params()
    data_cfg = DataConfig(**{**params.data.model_dump(), "resolution": resolution, "min_size": 24})
    generate_sample(root / "sample", data_cfg)
    ingest(root / "sample", root / "ingested", data_cfg)
    # The sample is 64 px: upscaled to a large resolution it is blurry by the curation's measure.
    # Throughput does not depend on the pictures, so the blur filter is off here.
    curate_cfg = params.curate.model_copy(update={"blur_threshold": 0.0})
    curate(root / "ingested", root / "curated", data_cfg, curate_cfg, validate=False)
    folder, images = root / "imagefolder", root / "instance"
    folder.mkdir()
    images.mkdir()
    lines = []
    with (root / "curated" / "manifest.csv").open() as fh:
        for row in csv.DictReader(fh):
            if row["style"] == "noir" and row["split"] == "train":
                name = Path(row["path"]).name
                shutil.copyfile(root / "curated" / row["path"], folder / name)
                shutil.copyfile(root / "curated" / row["path"], images / name)
                lines.append(json.dumps({"file_name": name, "text": row["caption"]}))
    if not lines:
        raise RuntimeError(f"{root / 'curated' / 'manifest.csv'}: no noir train images")
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root / "curated", folder, images


def example_command(kind: str, python: str, script: Path, stamps: Path, shim: str, model: Path, folder: Path,
                    images: Path, res: int, args: argparse.Namespace, mixed_precision: str, out: Path) -> list[str]:
    """The example script's command line: the shared settings plus each script's data flags."""
    cmd = [python, "-c", RUNNER, str(script), str(stamps), shim,
           f"--pretrained_model_name_or_path={model}", f"--resolution={res}", "--center_crop",
           f"--train_batch_size={args.batch_size}", f"--max_train_steps={args.steps}",
           f"--learning_rate={args.lr}", f"--rank={args.rank}", f"--seed={args.seed}",
           "--lr_scheduler=constant", "--lr_warmup_steps=0", f"--mixed_precision={mixed_precision}",
           "--dataloader_num_workers=0", f"--checkpointing_steps={10 * args.steps}", f"--output_dir={out}"]
    if kind == "text_to_image":
        return cmd + [f"--train_data_dir={folder}", "--image_column=image", "--caption_column=text"]
    return cmd + [f"--instance_data_dir={images}", f"--instance_prompt={args.instance_prompt}"]


def timed(cmd: list[str], env: dict[str, str], stamps_file: Path, what: str) -> dict:
    """Run `cmd`; its step timestamps (written to `stamps_file`) as steps/s, plus wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(stamps_file.read_text())
    stamps = result.pop("stamps")
    if len(stamps) < 3:
        raise RuntimeError(f"{what}: only {len(stamps)} step timestamps recorded; raise --steps")
    return {"steps_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "wall_s": wall,
            "steps_timed": len(stamps), **result}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diffusers-script", type=Path, required=True,
                    help="examples/text_to_image/train_text_to_image_lora.py or "
                         "examples/dreambooth/train_dreambooth_lora.py of a diffusers checkout")
    ap.add_argument("--diffusers-python", default=sys.executable,
                    help="python that runs the example (needs datasets for text_to_image; default: this one)")
    ap.add_argument("--models", nargs="+", default=["tiny", "small"], choices=list(MODELS))
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=list(PRECISIONS))
    ap.add_argument("--resolution", type=int, default=None,
                    help="image size for every model (default: tiny 32, small 64, sd15 256)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--instance-prompt", default="a photo in sks style", help="dreambooth only: every image's prompt")
    ap.add_argument("--out", type=Path, default=Path("reports/benchmark_vs_diffusers.json"))
    args = ap.parse_args(argv)
    if not args.diffusers_script.is_file():
        ap.error(f"--diffusers-script {args.diffusers_script}: no such file; get it with: git clone --branch "
                 "v0.42.1 https://github.com/huggingface/diffusers")
    if args.steps < 3:
        ap.error(f"--steps {args.steps}: at least 3 (steps/s is timed from the first to the last step)")
    kind = example_kind(args.diffusers_script)
    example_diffusers = check_example_env(args.diffusers_python, args.diffusers_script, kind)

    import hashlib

    import diffusers
    import torch

    from stunning.tiny import build_tiny

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "TQDM_DISABLE": "0", "WANDB_MODE": "disabled"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-vs-") as tmp:
        tmp = Path(tmp)
        shim = torchvision_shim(args.diffusers_python, tmp)
        for name in args.models:
            res = args.resolution or MODELS[name]
            builders = {"tiny": lambda out: build_tiny(out, "sd-unet"), "small": small_sd15, "sd15": sd15}
            model = builders[name](tmp / name)
            curated, folder, images = sample_data(tmp / f"data-{name}", res)
            n_images = len(list(images.iterdir()))
            for precision in args.precision:
                ex_mp, st_mp = PRECISIONS[precision]
                tag = f"{name}-{precision}"
                ex_stamps = tmp / f"ex-{tag}.json"
                example = timed(example_command(kind, args.diffusers_python, args.diffusers_script, ex_stamps, shim,
                                                model, folder, images, res, args, ex_mp, tmp / f"ex-out-{tag}"),
                                env, ex_stamps, f"diffusers {kind} example ({tag})")
                st_stamps = tmp / f"st-{tag}.json"
                cfg = {"steps": args.steps, "batch_size": args.batch_size, "rank": args.rank, "alpha": float(args.rank),
                       "learning_rate": args.lr, "seed": args.seed, "checkpoint_every": 10**6,
                       "mixed_precision": st_mp, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
                       "caption_dropout": 0.0}  # the diffusers examples drop no captions
                if kind == "dreambooth":
                    cfg["instance_prompt"] = args.instance_prompt
                spec = {"base": str(model), "data": str(curated), "out": str(tmp / f"st-out-{tag}"),
                        "stamps": str(st_stamps), "cfg": cfg}
                ours = timed([sys.executable, "-c", STUNNING_RUNNER, json.dumps(spec)], env, st_stamps,
                             f"stunning ({tag})")
                # The example's DataLoader keeps the last, partial batch of every epoch.
                batches = -(-n_images // args.batch_size)
                ex_images_per_step = n_images / batches
                row = {
                    "model": name, "resolution": res, "precision": precision, "batch_size": args.batch_size,
                    "steps": args.steps, "n_images": n_images,
                    "diffusers_steps_per_s": round(example["steps_per_s"], 3),
                    "stunning_steps_per_s": round(ours["steps_per_s"], 3),
                    "speedup": round(ours["steps_per_s"] / example["steps_per_s"], 3),
                    "diffusers_images_per_s": round(example["steps_per_s"] * ex_images_per_step, 3),
                    "stunning_images_per_s": round(ours["steps_per_s"] * ours["batch_size"], 3),
                    "diffusers_wall_s": round(example["wall_s"], 1), "stunning_wall_s": round(ours["wall_s"], 1),
                    "diffusers_mixed_precision": ex_mp, "stunning_mixed_precision": ours["mixed_precision"],
                    "diffusers_threads": example["threads"], "stunning_threads": ours["threads"],
                    "steps_timed": [example["steps_timed"], ours["steps_timed"]],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {
        "target_speedup": 1.5, "example": kind, "script": str(args.diffusers_script.resolve()),
        "script_sha256": hashlib.sha256(args.diffusers_script.read_bytes()).hexdigest(),
        "example_diffusers": example_diffusers, "diffusers": diffusers.__version__, "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torchvision": "shim (PIL/torch transforms)" if shim else "installed",
        "measured": "steps_per_s = (steps - 1) / (last step time - first step time) on both sides; "
                    "wall_s = whole subprocess; images_per_s = steps_per_s x images per step",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    tmp_out.replace(args.out)
    print(f"\n{kind} example vs Stunning (target: Stunning >= 1.5x the example's steps/s)")
    print(f"{'model':6} {'precision':9} {'diffusers st/s':>15} {'stunning st/s':>14} {'speedup':>8} "
          f"{'img/s (d / s)':>15} {'wall s (d / s)':>16}")
    for r in rows:
        print(f"{r['model']:6} {r['precision']:9} {r['diffusers_steps_per_s']:15.2f} {r['stunning_steps_per_s']:14.2f} "
              f"{r['speedup']:7.2f}x {r['diffusers_images_per_s']:7.1f} / {r['stunning_images_per_s']:<5.1f} "
              f"{r['diffusers_wall_s']:7.1f} / {r['stunning_wall_s']:.1f}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
