"""Test factories shared by every test layer: tiny curated sets, random LoRA adapters, test
pictures, raw folders, a recording tracker. Import them from here (never from another test module).

Model builders live in the library (`stunning.tiny`, used by the conftest fixtures); these
make the data and the fakes of the *interfaces* (tracker), never of the maths under test.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
STYLES = ("impressionist", "noir")


def blocks(seed: int, size: tuple[int, int] = (48, 48)) -> Image.Image:
    """A sharp, distinctive test picture: random colour blocks."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small, mode="RGB").resize(size, Image.Resampling.NEAREST)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def put(folder: Path, name: str, data: bytes, caption: str | None = "a test picture of things") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption)
    return folder / name


class CuratedItem(NamedTuple):
    """One picture of a curated set, saved as ``{split}/{style}/{id}.png``."""

    id: str
    style: str
    split: str
    image: Image.Image
    caption: str


def write_curated(root: Path, items: Iterable[CuratedItem], blur: float = 100.0) -> Path:
    """A curated folder like the curation stage writes: the items' PNGs and manifest.csv with the
    stage's columns (sizes and caption words from the items; placeholder phash and `blur`)."""
    from stunning.data.curate import MANIFEST_COLUMNS

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in items:
        rel = f"{item.split}/{item.style}/{item.id}.png"
        (root / item.split / item.style).mkdir(parents=True, exist_ok=True)
        item.image.save(root / rel)
        rows.append(
            {
                "id": item.id,
                "style": item.style,
                "split": item.split,
                "path": rel,
                "caption": item.caption,
                "width": item.image.width,
                "height": item.image.height,
                "phash": "0" * 16,
                "blur": blur,
                "caption_words": len(item.caption.split()),
            }
        )
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root


def read_curated(root: Path) -> list[CuratedItem]:
    """The items of a curated folder, images loaded (to write it again changed)."""
    with (root / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    items = []
    for r in rows:
        with Image.open(root / r["path"]) as img:
            items.append(CuratedItem(r["id"], r["style"], r["split"], img.copy(), r["caption"]))
    return items


def noisy_dress_items(n_train: int = 6, n_val: int = 2, res: int = 32, seed: int = 0) -> Iterator[CuratedItem]:
    """Per style, `n_train` then `n_val` noisy single-colour pictures (impressionist: strong
    colour noise; noir: grey, little noise), captioned as dresses of eight colours."""
    rng = np.random.default_rng(seed)
    colours = ["red", "blue", "green", "yellow", "white", "black", "pink", "orange"]
    for style in STYLES:
        for i in range(n_train + n_val):
            split = "train" if i < n_train else "val"
            base = rng.integers(0, 255, 3)
            arr = np.clip(base + rng.normal(0, 40 if style == "impressionist" else 8, (res, res, 3)), 0, 255)
            if style == "noir":
                arr = arr.mean(-1, keepdims=True).repeat(3, -1)
            caption = f"a {colours[i % len(colours)]} dress on a white background, {style} style"
            yield CuratedItem(f"{style}-{i:03d}", style, split, Image.fromarray(arr.astype(np.uint8)), caption)


def make_curated(root: Path, n_train: int = 6, n_val: int = 2, res: int = 32, seed: int = 0) -> Path:
    """The standard two-style curated set (:func:`noisy_dress_items`), PNGs + manifest.csv."""
    return write_curated(root, noisy_dress_items(n_train, n_val, res, seed))


def make_grey_noir(root: Path, n: int = 6, res: int = 32) -> Path:
    """One style: `n` train + two val `res`x`res` noisy grey pictures of noir hats."""
    rng = np.random.default_rng(1)

    def items() -> Iterator[CuratedItem]:
        for i in range(n + 2):
            grey = np.clip(rng.integers(20, 235) + rng.normal(0, 12, (res, res, 1)), 0, 255).repeat(3, -1)
            caption = f"a {['red', 'blue', 'green'][i % 3]} hat on a grey background, noir style"
            yield CuratedItem(f"noir-{i}", "noir", "train" if i < n else "val", Image.fromarray(grey.astype(np.uint8)),
                              caption)

    return write_curated(root, items(), blur=50.0)


def make_colour_vs_grey(root: Path) -> Path:
    """Two clearly different styles, two val then four train 32x32 pictures each, all captioned
    "a red dress": impressionist is uniform colour noise, noir grey noise."""
    rng = np.random.default_rng(0)

    def picture(style: str) -> Image.Image:
        if style == "noir":
            g = np.clip(rng.normal(0.5, 0.35, (32, 32)), 0, 1)
            return Image.fromarray((np.stack([g] * 3, -1) * 255).astype(np.uint8), mode="RGB")
        return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), mode="RGB")

    def items() -> Iterator[CuratedItem]:
        for style in STYLES:
            for i in range(6):
                yield CuratedItem(f"{style}-{i}", style, "val" if i < 2 else "train", picture(style),
                                  f"a red dress, {style} style")

    return write_curated(root, items())


class RecordingTracker:
    """A Tracker that keeps what it was told (the tracking interface, not maths, is faked)."""

    def __init__(self) -> None:
        self.params: dict = {}
        self.metrics: list[tuple[dict, int | None]] = []
        self.artifacts: list[tuple[Path, str | None]] = []
        self.runs: list[tuple[str, dict]] = []
        self.ended: list[str] = []

    def start_run(self, name, tags=None):
        self.runs.append((name, dict(tags or {})))
        return f"run-{len(self.runs)}"

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((Path(path), artifact_path))

    def set_tags(self, tags):
        pass

    def end_run(self, status="FINISHED"):
        self.ended.append(status)


def make_bucketed(root: Path) -> Path:
    """make_curated's set with a third of the images landscape (40x24) and a third portrait (24x40),
    recorded as curated with buckets (resolution 32, step 8) like the curation stage does."""
    sizes = [(32, 32), (40, 24), (24, 40)]
    items = noisy_dress_items(n_train=6, n_val=3)
    write_curated(root, (item._replace(image=item.image.resize(sizes[i % 3])) for i, item in enumerate(items)))
    (root / "curate_config.yaml").write_text(
        "data:\n  styles: [impressionist, noir]\n  resolution: 32\n  buckets: true\n  bucket_step: 8\n"
        "  bucket_max_ratio: 2.0\n"
    )
    return root


class ShapeRecorder:
    """The real family, recording the latent shape of every training batch it is given."""

    def __init__(self, name: str):
        from stunning.families import get_family

        self._fam = get_family(name)
        self.shapes: list[tuple[int, ...]] = []

    def __getattr__(self, attr):
        return getattr(self._fam, attr)

    def training_loss(self, pipe, latents, cond, generator, scheduler=None):
        self.shapes.append(tuple(latents.shape))
        return self._fam.training_loss(pipe, latents, cond, generator, scheduler=scheduler)


def random_lora(
    base,
    out: Path,
    family: str,
    seed: int | None,
    *,
    rank: int = 4,
    alpha: float = 4,
    targets=("to_q", "to_k", "to_v", "to_out.0"),
    rslora: bool = False,
    scale: float = 0.2,
    metadata: dict | None = None,
    text_encoder: dict | None = None,
) -> Path:
    """A real, non-zero LoRA saved by the family in the diffusers layout; returns the file.

    `base` is a model folder, or a loaded pipeline (the adapter is removed from it again after
    saving). PEFT's gaussian init draws the down (A) weights from torch's global RNG; the up (B)
    weights, which PEFT starts at zero, are drawn N(0, `scale`) from a generator seeded `seed`
    (`None`: from the global RNG, continuing). `text_encoder` (LoraConfig keywords, e.g. r,
    lora_alpha, target_modules) gives the first text encoder its own LoRA too, saved the way
    diffusers' training scripts save one."""
    import torch
    from peft import LoraConfig

    from stunning.families import get_family

    fam = get_family(family)
    loaded = not isinstance(base, (str, Path))
    pipe = base if loaded else fam.load_pipeline(base, torch.device("cpu"), torch.float32)
    denoiser = fam.denoiser(pipe)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian",
                        use_rslora=rslora)
    denoiser.add_adapter(config)
    modules = [denoiser]
    if text_encoder is not None:
        te_config = LoraConfig(**text_encoder, init_lora_weights="gaussian")
        pipe.text_encoder.add_adapter(te_config)
        modules.append(pipe.text_encoder)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
    if text_encoder is None:
        path = fam.save_lora(pipe, out, metadata=metadata)
    else:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        from stunning.families import write_lora_metadata

        layers = fam.lora_layers(pipe)
        layers["text_encoder"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder))
        fam.save_lora_layers(out, layers, {fam.lora_component: config.to_dict(), "text_encoder": te_config.to_dict()})
        path = Path(out) / "pytorch_lora_weights.safetensors"
        if metadata:
            write_lora_metadata(path, metadata)
    if loaded:
        denoiser.delete_adapters(["default"])
    return path


# --------------------------------------------------------------------------- project clones


def project_env() -> dict[str, str]:
    """Environment for subprocesses: `python` is this interpreter, everything offline."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_in(root: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=root, env=project_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# The shipped DAG on tiny settings: every stage runs and writes every output, in about a
# minute. Budgets are loosened so that a 30-step adapter is promoted (the flow tests need a
# champion); the quality budgets are judged by the default-settings run
# (tests/e2e/test_quality.py), never here.
TINY_DAG_PARAMS = {
    "data": {"sample_images_per_style": 8},
    "train": {"steps": 30, "checkpoint_every": 15, "thermal_check_every": 0},
    "validate": {
        "prompts": ["a red dress on a white background", "a green dress on a beige background"],
        "seeds": [0],
        "steps": 4,
        "style_set_size": 4,
    },
    "budgets": {"min_style_gain": -100.0, "max_adherence_drop": 1.0, "max_regression_vs_champion": 100.0},
}


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied key by key (nested dicts merged, other values replaced)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def copy_project(dest: Path, params: dict | None = None) -> Path:
    """Copy what git would commit (tracked + untracked-not-ignored files) into a fresh repo,
    with `params` overriding keys of its params.yaml (committed in the copy)."""
    # Outputs of a local `dvc repro` (dvc.lock, reports/) are not part of a fresh clone.
    skip = ("dvc.lock", "reports/")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        rel = Path(raw.decode())
        if rel.as_posix().startswith(skip):
            continue
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if params:
        import yaml

        shipped = yaml.safe_load((dest / "params.yaml").read_text())
        (dest / "params.yaml").write_text(yaml.safe_dump(merged(shipped, params), sort_keys=False))
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "clone"],
    ):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


# The small, fast train settings tests were written against (TrainConfig's code defaults until
# they became params.yaml's: rank 16 on 13 sd3 modules, 800 steps, ...). Tests that train or
# build an adapter start from these so their runtime and assertions stay what they were.
TINY_TRAIN = {
    "rank": 4,
    "alpha": 4.0,
    "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
    "learning_rate": 1e-3,
    "steps": 150,
    "caption_dropout": 0.0,
    "checkpoint_every": 50,
}


def tiny_train_config(**kw):
    """A TrainConfig from :data:`TINY_TRAIN`, with `kw` on top."""
    from stunning.config import TrainConfig

    return TrainConfig(**{**TINY_TRAIN, **kw})
