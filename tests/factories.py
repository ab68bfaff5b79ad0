"""Test factories shared by every test layer: tiny curated sets, random LoRA adapters, test
pictures, raw folders, a recording tracker, stage inputs and reports. Import them from here (never from another test module).

Model builders live in the library (`stunning.tiny`, used by the conftest fixtures); these
make the data and the fakes of the *interfaces* (tracker), never of the maths under test.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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

    def log_metric_steps(self, entries):
        self.metrics.extend((dict(m), step) for step, m in entries)

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


def register_tiny_champion(root: Path, base: Path, model_name: str | None = None, seed: int = 0,
                           gate: dict | None = None) -> dict:
    """Register the tiny sd3 `base` with two random style LoRAs (:data:`STYLES`) as a new
    version in the project at `root` (the shipped params.yaml is copied there first if it has
    none); a passing `gate` (the default) promotes it to @champion. Returns the registry's
    result (`version`, `promoted`, ...)."""
    import torch

    from stunning.config import load_params
    from stunning.families import get_family
    from stunning.registry import register_candidate

    if not (root / "params.yaml").is_file():
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
    seed_store(root)
    torch.manual_seed(seed)
    pipe = get_family("sd3").load_pipeline(base, torch.device("cpu"), torch.float32)
    candidate = root / f"candidate-{model_name or 'default'}-{seed}"
    for i, style in enumerate(STYLES):
        random_lora(pipe, candidate / "adapters" / style, "sd3", seed * 10 + i, scale=0.5)
    cfg = load_params(root / "params.yaml").registry
    if model_name:
        cfg = cfg.model_copy(update={"model_name": model_name})
    gate = gate or {"passed": True, "checks": [], "reasons": [],
                    "candidate": {"metrics": {"style_gain": {"noir": 0.25}}}}
    return register_candidate(cfg, gate, {"adapters": candidate / "adapters"}, base, "sd3", {}, root=root)


# Captured `pmset -g therm` outputs (an Intel MacBook Pro, nominal and throttled; an Apple
# Silicon Mac, which reports no CPU power status), for the device probe and the thermal guard.
PMSET_NOMINAL = """\
Note: No thermal warning level has been recorded
Note: No performance warning level has been recorded
2024-03-02 09:14:51 +0100 CPU Power notify
\tCPU_Scheduler_Limit \t= 100
\tCPU_Available_CPUs \t= 12
\tCPU_Speed_Limit \t= 100
"""
PMSET_APPLE_SILICON = """\
Note: No thermal warning level has been recorded
Note: No performance warning level has been recorded
Note: No CPU power status has been recorded
"""
PMSET_THROTTLED = """\
Thermal Warning Level = 2
Note: No performance warning level has been recorded
2020-11-24 13:10:40 +0100 CPU Power notify
\tCPU_Scheduler_Limit \t= 100
\tCPU_Available_CPUs \t= 8
\tCPU_Speed_Limit \t= 35
"""


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
    # Two ladder levels (int4 fails the PSNR budget on 30-step adapters, so auto's choice is
    # exercised), two style-set images per adapter. Exports: the ONNX denoiser only; the Core ML
    # stage path runs in tests/stages/test_export.py and in the default DAG.
    "merge": {"quantization": ["int8", "int4"], "style_set_size": 2},
    "export": {"targets": ["onnx"], "onnx": {"exporter": "torchscript"}},
    # quality vs the @champion: a noise band so wide that a 30-step adapter never regresses
    "budgets": {
        "min_style_gain": -100.0,
        "max_adherence_drop": 1.0,
        "noise_floor": {"style_gain": 100.0, "eval_loss": 100.0, "adherence_drop": 1.0},
    },
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


# --------------------------------------------------------------------------- stage inputs
# Builders shared by a library module's tests (tests/unit) and its stage's tests (tests/stages).


def soft_gradient(start: int, size: int = 48) -> Image.Image:
    """A blurry test picture: a smooth grey diagonal ramp from `start` (fails the blur filter)."""
    ramp = np.linspace(start, start + 150, size)
    arr = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def make_ingested_with_flaws(root: Path, n_good: int = 6) -> Path:
    """An ingest stage output folder (``root/ingested``, from raw pictures under ``root/raw``).

    Per style of :data:`STYLES`: `n_good` distinct sharp images, then one blurry, one
    near-duplicate, one with a one-word caption and one small original; ingest accepts all of
    them, so the curation filters are what drop the last four."""
    from stunning.config import DataConfig
    from stunning.data.ingest import ingest

    raw = root / "raw"
    for k, style in enumerate(STYLES):
        folder = raw / style
        for i in range(n_good):
            put(folder, f"img{i}.png", encode(blocks(100 * k + i), "PNG"), f"picture number {i} in {style}")
        put(folder, "blurry.png", encode(soft_gradient(20 + 30 * k), "PNG"), "a soft gradient")
        near = np.clip(np.asarray(blocks(100 * k), dtype=int) + 3, 0, 255).astype(np.uint8)
        put(folder, "near.png", encode(Image.fromarray(near), "PNG"), "almost picture zero")
        put(folder, "short.png", encode(blocks(100 * k + 50), "PNG"), "picture")
        put(folder, "small.png", encode(blocks(100 * k + 60, (26, 26)), "PNG"), "a small original")
    out = root / "ingested"
    report = ingest(raw, out, DataConfig(styles=list(STYLES)))
    assert report.rejected == 0
    return out


def make_messy_raw(tmp_path: Path) -> Path:
    """A raw folder (``tmp_path/raw``) with every kind of file ingest must accept or reject.

    impressionist: five good pictures (PNG, EXIF-rotated JPEG, transparent PNG, WEBP, one
    captioned by metadata.jsonl) beside a hidden, a corrupt, a truncated, a not-an-image, an
    uncaptioned, a blank-captioned, a tiny, a duplicate, a BMP and a dangling-symlink file, an
    orphan caption and a README; noir: one nested good picture and one latin-1 caption.
    (6 accepted, 11 rejected.)"""
    root = tmp_path / "raw"
    a, b = root / "impressionist", root / "noir"
    good = encode(blocks(1), "PNG")
    put(a, "good.png", good, "a good picture")
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    put(a, "rotated.jpg", encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif), "a rotated photo")
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste((200, 0, 0, 255), (10, 10, 30, 30))
    put(a, "alpha.png", encode(rgba, "PNG"), "a red square on nothing")
    put(a, "photo.WEBP", encode(blocks(3), "WEBP", lossless=True), "a webp photo")
    put(a, "from_meta.png", encode(blocks(4), "PNG"), caption=None)
    (a / "metadata.jsonl").write_text(
        json.dumps({"file_name": "from_meta.png", "text": "  a caption\nfrom metadata  "})
        + "\n"
        + "not json at all\n"
        + json.dumps({"file_name": "ghost.png", "text": "missing file"})
        + "\n"
    )
    put(a, "corrupt.png", bytes(range(256)) * 4)
    put(a, "truncated.png", encode(blocks(5), "PNG")[:200])
    put(a, "not_image.jpg", b"hello, I am text\n")
    put(a, "no_caption.png", encode(blocks(6), "PNG"), caption=None)
    put(a, "blank.png", encode(blocks(7), "PNG"), caption="  \n ")
    put(a, "tiny.png", encode(blocks(8, (8, 8)), "PNG"))
    put(a, "good_copy.png", good)
    put(a, "scan.bmp", encode(blocks(9), "BMP"))
    put(a, ".hidden.png", encode(blocks(10), "PNG"))
    (a / "README.md").write_text("notes about this folder")
    (a / "gone.png").symlink_to(tmp_path / "does-not-exist.png")
    (a / "orphan.txt").write_text("a caption without an image")
    put(b / "sub", "nested.png", encode(blocks(11, (64, 50)), "PNG"), "a nested picture")
    put(b, "latin1.png", encode(blocks(12), "PNG"), caption=None)
    (b / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    return root


def make_release_inputs(root: Path, params=None) -> tuple[Path, Path, Path]:
    """Adapters, blends and a model card folder as the train/merge/docs stages leave them
    (small random safetensors, no real LoRA), for `params` (default: ``Params()``); returns
    the three folders."""
    from safetensors.numpy import save_file

    from stunning.config import Params

    params = params or Params()
    rng = np.random.default_rng(0)
    adapters, blends, card = (
        root / "models" / "adapters",
        root / "models" / "merged" / "blends",
        root / "build" / "card",
    )
    for style in params.data.styles:
        (adapters / style).mkdir(parents=True)
        save_file(
            {"unet.down.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32)},
            str(adapters / style / "pytorch_lora_weights.safetensors"),
        )
        (adapters / style / "train_config.yaml").write_text(f"style: {style}\nrank: 4\n")
    for blend in params.merge.blends:
        (blends / blend.name).mkdir(parents=True)
        save_file(
            {"unet.down.lora_A.weight": np.ones((4, 8), np.float32)},
            str(blends / blend.name / "pytorch_lora_weights.safetensors"),
        )
    card.mkdir(parents=True)
    (card / "README.md").write_text("---\nlibrary_name: diffusers\n---\n# card\n")
    (card / "grid.png").write_bytes(b"\x89PNG fake")
    return adapters, blends, card


# The reports the docs stage reads, as train/validate/gate/register write them: the noir style
# fails the gate (version 3 blocked, champion v2).
MODEL_CARD_REPORTS = {
    "train": {
        "styles": {
            "impressionist": {
                "final_loss": 0.1234,
                "steps": 150,
                "steps_per_s": 3.2,
                "peak_memory_mb": 812.5,
                "mlflow_run_id": "abc123",
            },
            "noir": {
                "final_loss": 0.0987,
                "steps": 150,
                "steps_per_s": 3.1,
                "peak_memory_mb": 790.0,
                "mlflow_run_id": "def456",
            },
        }
    },
    "validation": {
        "variants": {
            "base": {"style_distance": {"impressionist": 0.40, "noir": 0.50}, "latency_s": 0.8,
                     "peak_memory_mb": 700.0},
            "impressionist": {"style_distance": {"impressionist": 0.20}, "latency_s": 0.9, "peak_memory_mb": 720.0},
        }
    },
    "gate": {
        "passed": False,
        "checks": [
            {"name": "latency", "value": 0.9, "threshold": 5.0, "passed": True, "detail": "max over variants"},
            {"name": "style_gain[noir]", "value": 0.01, "threshold": 0.05, "passed": False, "detail": "too weak"},
        ],
        "reasons": ["style_gain[noir] 0.01 < 0.05: the noir adapter barely changes the style"],
        "candidate": {"version": 3},
    },
    "registry": {
        "model_name": "stunning-style",
        "version": 3,
        "promoted": False,
        "champion_version": 2,
        "previous_champion_version": 1,
    },
}


def write_model_card_reports(root: Path) -> tuple[Path, Path]:
    """``root/reports`` holding :data:`MODEL_CARD_REPORTS` as ``<name>.json`` and an 8x8 red
    ``validation/grid.png``; returns the reports folder and the grid."""
    reports = root / "reports"
    reports.mkdir()
    for name, data in MODEL_CARD_REPORTS.items():
        (reports / f"{name}.json").write_text(json.dumps(data))
    grid = reports / "validation" / "grid.png"
    grid.parent.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(grid)
    return reports, grid


def gate_report(passed: bool, gain: float = 0.4, reasons: list[str] | None = None) -> dict:
    """A gate report as the validate stage writes it: three checks (impressionist style gain
    `gain`, latency, an unmeasured peak memory), the verdict `passed` and its `reasons`
    (default: none if passed, else the style gain's), and the candidate's metrics."""
    checks = [
        {"name": "style_gain/impressionist", "value": gain, "threshold": 0.05, "passed": gain >= 0.05, "detail": ""},
        {"name": "latency_s", "value": 0.25, "threshold": 5.0, "passed": True, "detail": "p50"},
        {"name": "peak_memory_mb", "value": None, "threshold": 4096.0, "passed": passed, "detail": "not measured"},
    ]
    return {
        "passed": passed,
        "checks": checks,
        "reasons": reasons if reasons is not None else ([] if passed else ["style_gain/impressionist 0.01 < 0.05"]),
        "candidate": {"metrics": {"style_gain": {"impressionist": gain, "noir": 0.3}, "quant_mse": 0.002}},
    }


_STORE_TEMPLATE: list[Path] = []  # this process's empty MLflow database, made once


def seed_store(root: Path) -> Path:
    """Give the project at `root` an empty MLflow store (default RegistryConfig) by copying a
    template database made once per test process: creating one runs MLflow's migrations
    (2-4 s), a copy is opened in a tenth of a second (the store relocates its artifact root to
    `root` on open, as for any copied project). Does nothing if `root` has a store; returns `root`."""
    from stunning.config import RegistryConfig
    from stunning.tracking import configure_mlflow

    db = Path(root) / "mlruns" / "mlflow.db"
    if db.exists():
        return root
    if not _STORE_TEMPLATE:
        template = Path(tempfile.mkdtemp(prefix="stunning-store-template-"))
        configure_mlflow(RegistryConfig(), template)
        _STORE_TEMPLATE.append(template / "mlruns" / "mlflow.db")
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_STORE_TEMPLATE[0], db)
    return root


def make_registry_store(root: Path) -> Path:
    """`root` as a project root whose MLflow registry database (default RegistryConfig) is
    created, empty (no aliases); returns `root`. Give each test its own model name."""
    from stunning.config import RegistryConfig
    from stunning.registry import aliases
    from stunning.tracking import configure_mlflow

    seed_store(root)
    configure_mlflow(RegistryConfig(), root)
    assert aliases(RegistryConfig(), root) == {}
    return root


def make_registry_candidate(root: Path) -> dict[str, Path]:
    """Adapter (impressionist, noir) and blend (half-half) folders under `root` in the layout
    the train/merge stages write, with placeholder weight files (the registry copies them; it
    does not read the weights); returns ``{"adapters": ..., "blends": ...}``."""
    for folder in ("adapters/impressionist", "adapters/noir", "blends/half-half"):
        (root / folder).mkdir(parents=True)
        (root / folder / "pytorch_lora_weights.safetensors").write_bytes(folder.encode())
    (root / "adapters/noir/train_config.yaml").write_text("rank: 4\n")
    return {"adapters": root / "adapters", "blends": root / "blends"}


# Small diffusers/transformers configs (a 2-block UNet, a 2-block VAE, a 2-layer CLIP text
# encoder) that instantiate in milliseconds.
SMALL_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [16, 32],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
SMALL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "norm_num_groups": 8,
    "sample_size": 16,
}
SMALL_CLIP = {
    "vocab_size": 100,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 16,
    "projection_dim": 16,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}


def make_config_only_sd_folder(root: Path, with_vae_config: bool = True, configs: dict | None = None) -> Path:
    """A local Stable Diffusion (UNet) diffusers folder holding only configs (model_index.json +
    one config.json per component, default :data:`SMALL_UNET` / :data:`SMALL_VAE` /
    :data:`SMALL_CLIP`), no weights: what the research stage sizes. `with_vae_config=False`
    leaves vae/config.json out."""
    configs = configs or {
        "unet": {"_class_name": "UNet2DConditionModel", **SMALL_UNET},
        "vae": {"_class_name": "AutoencoderKL", **SMALL_VAE},
        "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **SMALL_CLIP},
    }
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "safety_checker": [None, None],
            }
        )
    )
    for name, cfg in configs.items():
        (root / name).mkdir()
        if name != "vae" or with_vae_config:
            (root / name / "config.json").write_text(json.dumps(cfg))
    return root


# --------------------------------------------------------------------------- a real MLflow server


@contextmanager
def mlflow_server(root: Path, backend_store_uri: str | None = None) -> Iterator[str]:
    """A real `mlflow server --serve-artifacts` on 127.0.0.1 (a free port, one worker) while
    the block runs; yields its tracking URI for `registry.tracking_uri`. Its database
    (SQLite unless `backend_store_uri`), served artifacts and log (`server.log`) live under
    `root/mlflow-server`. Starting it costs ~5-20 s (MLflow's import and migrations), so use
    one per module or session."""
    from stunning.mlflow_server import running_server

    home = Path(root) / "mlflow-server"
    home.mkdir(parents=True, exist_ok=True)
    backend = backend_store_uri or f"sqlite:///{home / 'mlflow.db'}"
    with running_server(backend, home / "artifacts", log_path=home / "server.log") as uri:
        yield uri


def _postgres_bin(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"))  # Debian's layout, not on PATH
    return str(candidates[-1]) if candidates else None


@contextmanager
def postgres_database() -> Iterator[str | None]:
    """A throwaway PostgreSQL server (Debian's `postgresql` package: `initdb`, `pg_ctl`) on
    127.0.0.1, a free port, with an empty database `mlflow`, stopped and deleted after the
    block; yields its SQLAlchemy URI (`postgresql+psycopg://...`), or None when PostgreSQL
    or psycopg is not installed (PostgreSQL refuses to run as root: then it runs as the
    `postgres` user, which the package creates). Costs ~4 s (initdb)."""
    import importlib.util
    import pwd

    from stunning.mlflow_server import free_port

    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if initdb is None or pg_ctl is None or importlib.util.find_spec("psycopg") is None:
        yield None
        return
    as_user: list[str] = []
    home = Path(tempfile.mkdtemp(prefix="stunning-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(home)
            yield None
            return
        as_user = ["runuser", "-u", "postgres", "--"]
        home.chmod(0o755)
        os.chown(home, user.pw_uid, user.pw_gid)
    port = free_port()
    data = home / "data"
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        run(pg_ctl, "-D", str(data), "-l", str(home / "postgres.log"), "-w", "start",
            "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off")
        try:
            import psycopg

            with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
                conn.execute("CREATE DATABASE mlflow")
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/mlflow"
        finally:
            subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
