"""Training throughput of Stunning's LoRA trainer against the diffusers example LoRA script.

    python scripts/benchmark_vs_diffusers.py --diffusers-script PATH/train_text_to_image_lora.py \\
        [--models tiny small] [--steps 200] [--batch-size 4] [--rank 4] [--out reports/benchmark_vs_diffusers.json]

The issue's target: at least 1.5x the training steps per second of the diffusers example
LoRA script on the same model, data, resolution and batch size on this machine.

What runs, for each model:

- **diffusers**: `examples/text_to_image/train_text_to_image_lora.py` from a diffusers checkout
  (not shipped here; `git clone https://github.com/huggingface/diffusers` and pass the file —
  the figures in docs/benchmarks.md name the commit used). It needs `datasets` (and
  torchvision, see TORCHVISION_SHIM): install it in a *separate* virtualenv with the project
  (it is not a project dependency) and pass that python as `--diffusers-python`. It runs
  unmodified in a subprocess; a small runner only wraps `tqdm.update` to timestamp every
  optimizer step.
- **stunning**: `stunning.training.lora.train_style` (sd-unet family), in a subprocess too,
  timestamping steps with its `on_step` hook.

Same on both sides: the local SD-1.5-layout model folder, the images and captions (the embedded
sample set's `noir` train split, written as an imagefolder with metadata.jsonl for the
example script), resolution, batch size, LoRA rank (alpha = rank) and targets (to_q, to_k,
to_v, to_out.0), learning rate, seed, fp32 on the CPU, no validation images, no checkpoints.
Each side keeps its own defaults otherwise (the example script's AdamW weight decay and
DataLoader; Stunning's encoding of the set once and its single intra-op thread for small
models), because that is what a user of either gets.

Measured: **steps/s** = (steps − 1) / (time of the last step − time of the first step), the
same definition on both sides, so model loading, data preparation and the first (warm-up)
step are outside it; and the **wall time** of the whole subprocess (start-up, loading, data,
training, saving). Models: `tiny` is the project's test-sized SD-1.5 layout (32 px, where
per-step overheads dominate) and `small` a wider 64-px UNet defined below, where the UNet's
compute dominates. A benchmark, not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RUNNER = r"""
import json, runpy, sys, time
import tqdm.std
stamps = []
_update = tqdm.std.tqdm.update
def update(self, n=1):
    if getattr(self, "desc", "") == "Steps":
        stamps.append(time.perf_counter())
    return _update(self, n)
tqdm.std.tqdm.update = update
script, out, shim = sys.argv[1], sys.argv[2], sys.argv[3]
if shim:
    # Libraries decide once whether torchvision exists; let them see it does not, then give
    # the example script the transforms it imports.
    import importlib.util, types
    import accelerate, datasets, diffusers, peft, transformers
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
    json.dump(stamps, open(out, "w"))
"""

STUNNING_RUNNER = r"""
import json, sys, time
from pathlib import Path
from stunning.config import TrainConfig
from stunning.training.lora import train_style
base, data, out, stamps_file, steps, batch, rank, lr, seed = sys.argv[1:10]
stamps = []
cfg = TrainConfig(steps=int(steps), batch_size=int(batch), rank=int(rank), alpha=float(rank), learning_rate=float(lr),
                  seed=int(seed), checkpoint_every=10**6, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
train_style(Path(base), "sd-unet", Path(data), "noir", cfg, Path(out), None, None, "cpu", sample_seeds=(),
            progress=False, on_step=lambda step, loss: stamps.append(time.perf_counter()))
json.dump(stamps, open(stamps_file, "w"))
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


def small_sd15(out: Path, seed: int = 0) -> Path:
    """A wider SD-1.5-layout model at 64 px (three UNet levels, 64-128-128 channels)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stunning.embedded import _clip, load_tokenizer, save_model, tiny_configs

    tok = load_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=AutoencoderKL(**tiny_configs(len(tok))["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_clip(len(tok), hidden=64, layers=2, heads=4))), tokenizer=tok,
        scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return save_model(pipe, out)


def sample_data(root: Path, resolution: int) -> tuple[Path, Path]:
    """(curated dir for Stunning, imagefolder for the example script): the same images and captions."""
    import csv

    from PIL import Image

    from stunning.config import DataConfig, Params
    from stunning.data.curate import curate
    from stunning.data.ingest import ingest
    from stunning.data.sample import generate_sample

    params = Params()
    data_cfg = DataConfig(**{**params.data.model_dump(), "resolution": resolution, "min_size": 24})
    generate_sample(root / "sample", data_cfg)
    ingest(root / "sample", root / "ingested", data_cfg)
    curate(root / "ingested", root / "curated", data_cfg, params.curate, validate=False)
    folder = root / "imagefolder"
    folder.mkdir()
    lines = []
    with (root / "curated" / "manifest.csv").open() as fh:
        for row in csv.DictReader(fh):
            if row["style"] == "noir" and row["split"] == "train":
                name = Path(row["path"]).name
                Image.open(root / "curated" / row["path"]).save(folder / name)
                lines.append(json.dumps({"file_name": name, "text": row["caption"]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root / "curated", folder


def timed(cmd: list[str], env: dict[str, str], stamps_file: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    stamps = json.loads(stamps_file.read_text())
    if len(stamps) < 3:
        raise RuntimeError(f"only {len(stamps)} step timestamps recorded; raise --steps")
    return {"steps_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "wall_s": wall, "steps": len(stamps)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diffusers-script", type=Path, required=True,
                    help="examples/text_to_image/train_text_to_image_lora.py of a diffusers checkout")
    ap.add_argument("--diffusers-python", default=sys.executable,
                    help="python with datasets + torchvision installed (default: this one)")
    ap.add_argument("--models", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("reports/benchmark_vs_diffusers.json"))
    args = ap.parse_args(argv)
    if not args.diffusers_script.is_file():
        ap.error(f"--diffusers-script {args.diffusers_script}: no such file (clone huggingface/diffusers)")

    import torch

    from stunning.embedded import build_tiny

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "TQDM_DISABLE": "0", "WANDB_MODE": "disabled"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-vs-") as tmp:
        tmp = Path(tmp)
        shim = torchvision_shim(args.diffusers_python, tmp)
        for name in args.models:
            res = 32 if name == "tiny" else 64
            model = build_tiny(tmp / "tiny", "sd-unet") if name == "tiny" else small_sd15(tmp / "small")
            curated, folder = sample_data(tmp / f"data-{name}", res)
            ex_stamps = tmp / f"ex-{name}.json"
            example = timed([
                args.diffusers_python, "-c", RUNNER, str(args.diffusers_script), str(ex_stamps), shim,
                f"--pretrained_model_name_or_path={model}", f"--train_data_dir={folder}",
                "--image_column=image", "--caption_column=text", f"--resolution={res}", "--center_crop",
                f"--train_batch_size={args.batch_size}", f"--max_train_steps={args.steps}",
                f"--learning_rate={args.lr}", f"--rank={args.rank}", f"--seed={args.seed}",
                "--lr_scheduler=constant", "--lr_warmup_steps=0", "--mixed_precision=no",
                "--dataloader_num_workers=0", f"--checkpointing_steps={10 * args.steps}",
                f"--output_dir={tmp / f'ex-out-{name}'}", "--report_to=tensorboard",
            ], env, ex_stamps)
            st_stamps = tmp / f"st-{name}.json"
            ours = timed([
                sys.executable, "-c", STUNNING_RUNNER, str(model), str(curated), str(tmp / f"st-out-{name}"),
                str(st_stamps), str(args.steps), str(args.batch_size), str(args.rank), str(args.lr), str(args.seed),
            ], env, st_stamps)
            row = {"model": name, "resolution": res, "batch_size": args.batch_size, "steps": args.steps,
                   "diffusers_steps_per_s": round(example["steps_per_s"], 3),
                   "stunning_steps_per_s": round(ours["steps_per_s"], 3),
                   "speedup": round(ours["steps_per_s"] / example["steps_per_s"], 2),
                   "diffusers_wall_s": round(example["wall_s"], 1), "stunning_wall_s": round(ours["wall_s"], 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "script": str(args.diffusers_script),
              "torchvision": "shim (PIL/torch transforms)" if shim else "installed", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'model':6} {'diffusers st/s':>15} {'stunning st/s':>14} {'speedup':>8} {'wall s (d / s)':>16}")
    for r in rows:
        print(f"{r['model']:6} {r['diffusers_steps_per_s']:15.2f} {r['stunning_steps_per_s']:14.2f} "
              f"{r['speedup']:7.2f}x {r['diffusers_wall_s']:7.1f} / {r['stunning_wall_s']:.1f}")


if __name__ == "__main__":
    main()
