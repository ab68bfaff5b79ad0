"""Test factories shared by every test layer: tiny curated sets, test pictures, raw folders,
a recording tracker. Import them from here (never from another test module).

Model builders live in the library (`stunning.families.tiny`... see conftest fixtures); these
make the data and the fakes of the *interfaces* (tracker), never of the maths under test.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def make_curated(root: Path, n_train: int = 6, n_val: int = 2, res: int = 32, seed: int = 0) -> Path:
    """A curated folder like the curation stage writes: PNGs + manifest.csv, two styles."""
    rng = np.random.default_rng(seed)
    colours = ["red", "blue", "green", "yellow", "white", "black", "pink", "orange"]
    rows = []
    for style in STYLES:
        for i in range(n_train + n_val):
            split = "train" if i < n_train else "val"
            base = rng.integers(0, 255, 3)
            arr = np.clip(base + rng.normal(0, 40 if style == "impressionist" else 8, (res, res, 3)), 0, 255)
            if style == "noir":
                arr = arr.mean(-1, keepdims=True).repeat(3, -1)
            iid = f"{style}-{i:03d}"
            rel = f"{split}/{style}/{iid}.png"
            (root / split / style).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr.astype(np.uint8)).save(root / rel)
            caption = f"a {colours[i % len(colours)]} dress on a white background, {style} style"
            rows.append(
                {
                    "id": iid,
                    "style": style,
                    "split": split,
                    "path": rel,
                    "caption": caption,
                    "width": res,
                    "height": res,
                    "phash": "0" * 16,
                    "blur": 100.0,
                    "caption_words": len(caption.split()),
                }
            )
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


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
    make_curated(root, n_train=6, n_val=3)
    (root / "curate_config.yaml").write_text(
        "data:\n  styles: [impressionist, noir]\n  resolution: 32\n  buckets: true\n  bucket_step: 8\n"
        "  bucket_max_ratio: 2.0\n"
    )
    with (root / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for i, r in enumerate(rows):
        size = [(32, 32), (40, 24), (24, 40)][i % 3]
        with Image.open(root / r["path"]) as img:
            img.resize(size).save(root / r["path"])
        r["width"], r["height"] = size
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
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
