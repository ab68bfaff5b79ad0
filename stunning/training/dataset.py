"""The curated training set of one style: manifest rows → normalised pixel tensors + captions.

`data/curated/manifest.csv` (written by the curation stage) lists every kept image with its
style, split, path (relative to the curated folder) and caption. :class:`CuratedDataset`
serves the rows of one style and split as ``{"id", "caption", "pixels"}`` with pixels as a
float32 CHW tensor in [-1, 1], the range Stable Diffusion's VAE was trained on. Problems a
user can fix (no manifest, missing columns, a listed image that is gone, no rows for the
style) raise :class:`DatasetError` naming the file and what to do.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
CURATE_CONFIG = "curate_config.yaml"  # written by the curation stage next to the manifest
REQUIRED_COLUMNS = ("id", "style", "split", "path", "caption", "width", "height")


class DatasetError(ValueError):
    """The curated data cannot be used for training; the message names the file and the fix."""


def read_manifest(curated_dir: Path) -> list[dict[str, str]]:
    """All rows of `curated_dir/manifest.csv` as dicts (strings, as written)."""
    path = Path(curated_dir) / MANIFEST
    if not path.is_file():
        raise DatasetError(
            f"{path}: the curated manifest does not exist. Run the curation stage first "
            "(`dvc repro curate`) or pass --data pointing at a curated folder."
        )
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(
                f"{path}: missing column(s) {missing}; expected at least {list(REQUIRED_COLUMNS)}. "
                "Re-run the curation stage to rewrite it."
            )
        return list(reader)


def style_rows(curated_dir: Path, style: str, split: str | None = None) -> list[dict[str, str]]:
    """Rows of one style (and split, if given), sorted by id so the order never depends on the file."""
    rows = [r for r in read_manifest(curated_dir) if r["style"] == style and (split is None or r["split"] == split)]
    return sorted(rows, key=lambda r: r["id"])


def curated_data_config(curated_dir: Path) -> dict[str, Any]:
    """The `data` settings recorded in a curated set's `curate_config.yaml` ({} if none)."""
    import yaml

    path = Path(curated_dir) / CURATE_CONFIG
    if not path.is_file():
        return {}
    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not valid YAML ({exc}). Re-run the curation stage.") from None
    data = recorded.get("data") if isinstance(recorded, dict) else None
    return data if isinstance(data, dict) else {}


def load_pixels(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as a float32 CHW tensor in [-1, 1]."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(
            f"{path}: listed in the curated manifest but missing on disk. Re-run the curation stage "
            "(`dvc repro curate`) so the manifest and the images agree."
        ) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"{path}: cannot be read as an image ({exc}). Re-run the curation stage.") from None
    if size is not None and rgb.size != size:
        raise DatasetError(
            f"{path}: is {rgb.size[0]}x{rgb.size[1]} but the manifest says {size[0]}x{size[1]}. "
            "Re-run the curation stage so images and manifest agree."
        )
    arr = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class CuratedDataset(Dataset):
    """Manifest rows of one style and split; items are ``{"id", "caption", "pixels"}``.

    Images are read lazily; the manifest is validated eagerly so a bad path fails before any
    model is loaded. Images may come in several sizes only from a set curated with
    aspect-ratio buckets (`data.buckets`, recorded in the set's `curate_config.yaml`): each
    size must then be one of its buckets; :meth:`buckets` groups them, and the trainer draws
    each batch from one group. Mixed sizes in any other set are an error (stale images, or a
    changed `data.resolution`).
    """

    def __init__(self, curated_dir: str | Path, style: str, split: str = "train", *, allow_empty: bool = False):
        self.root = Path(curated_dir)
        self.style = style
        self.split = split
        all_rows = read_manifest(self.root)
        self.rows = sorted((r for r in all_rows if r["style"] == style and r["split"] == split), key=lambda r: r["id"])
        manifest = self.root / MANIFEST
        if not self.rows and not allow_empty:
            styles = sorted({r["style"] for r in all_rows})
            raise DatasetError(
                f"{manifest}: no rows with style={style!r} and split={split!r} (styles present: {styles}). "
                "Check data.styles in params.yaml and that the curation stage kept images of this style."
            )
        self._check_sizes(manifest)
        for r in self.rows:
            if not (self.root / r["path"]).is_file():
                raise DatasetError(
                    f"{self.root / r['path']}: listed in {manifest} (id {r['id']}) but missing on disk. "
                    "Re-run the curation stage (`dvc repro curate`)."
                )

    def _check_sizes(self, manifest: Path) -> None:
        sizes = set(self.sizes)
        if len(sizes) < 2:
            return
        data = curated_data_config(self.root)
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
        if not data.get("buckets"):
            raise DatasetError(
                f"{manifest}: images of style {self.style!r} ({self.split}) have different sizes ({shown}) but "
                f"the set was not curated with aspect-ratio buckets ({self.root / CURATE_CONFIG} does not say "
                "data.buckets: true). Re-run ingest and curation with one data.resolution, or with data.buckets: true."
            )
        from stunning.data.images import bucket_sizes

        try:
            allowed = set(bucket_sizes(int(data["resolution"]), int(data["bucket_step"]), float(data["bucket_max_ratio"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(
                f"{self.root / CURATE_CONFIG}: data.buckets is true but its resolution/bucket_step/bucket_max_ratio "
                f"are missing or invalid ({exc}). Re-run the curation stage."
            ) from None
        stray = sorted(sizes - allowed)
        if stray:
            raise DatasetError(
                f"{manifest}: style {self.style!r} ({self.split}) has images of size(s) "
                f"{', '.join(f'{w}x{h}' for w, h in stray)}, which are not buckets of data.resolution="
                f"{data['resolution']} with data.bucket_step={data['bucket_step']}. Re-run ingest and curation."
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.rows[i]
        pixels = load_pixels(self.root / r["path"], (int(r["width"]), int(r["height"])))
        return {"id": r["id"], "caption": r["caption"], "pixels": pixels}

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(width, height) of every item: one size, or several with aspect-ratio buckets."""
        return [(int(r["width"]), int(r["height"])) for r in self.rows]

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """Item indices per (width, height), in dataset order; the trainer batches within one."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(self.sizes):
            groups.setdefault(size, []).append(i)
        return dict(sorted(groups.items()))

    @property
    def captions(self) -> list[str]:
        return [r["caption"] for r in self.rows]

    def image_files(self) -> list[Path]:
        return [self.root / r["path"] for r in self.rows]
