"""Content-keyed disk cache of what the frozen encoders make of the training data.

Encoding every image with the VAE and every caption with the text encoder(s) is repeated
work across styles, reruns and resumed runs. This cache stores, per item, the VAE
posterior's *moments* (mean and standard deviation) and the caption's conditioning tensor,
under a key made of the item's content (the pixels actually fed to the VAE, or the caption
text) and a hash of the encoder weights. So a changed image or caption is re-encoded, an
unchanged one is not, and a different base model never reads another's entries.

Latents are *sampled* from the cached moments with the run's seeded generator, exactly as
``latent_dist.sample(generator)`` would, so a cached run trains like an uncached one (to
float precision: images are encoded one at a time, not in batches). Entries are written atomically (a crash leaves no half file).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Components whose weights decide an entry: the VAE for latents, the text encoders for prompts.
ENCODER_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def encoder_key(base_path: Path) -> str:
    """Hash of the base model's encoder weights and configs (the files under the encoder folders)."""
    h = hashlib.sha256()
    base_path = Path(base_path)
    for comp in ENCODER_COMPONENTS:
        folder = base_path / comp
        if not folder.is_dir():
            continue
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                h.update(p.relative_to(base_path).as_posix().encode())
                with p.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()[:16]


class EncodingCache:
    """Tensors on disk under ``root/<encoder key>/<kind>/<content key>.pt``."""

    def __init__(self, root: str | Path, base_path: str | Path):
        self.root = Path(root) / encoder_key(Path(base_path))
        self.hits = 0
        self.misses = 0

    @staticmethod
    def pixels_key(pixels: torch.Tensor) -> str:
        t = pixels.detach().to("cpu", torch.float32).contiguous()
        return hashlib.sha256(str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()[:24]

    @staticmethod
    def text_key(caption: str, family: str) -> str:
        return hashlib.sha256(f"{family}\0{caption}".encode()).hexdigest()[:24]

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.pt"

    def get(self, kind: str, key: str):
        path = self._path(kind, key)
        if not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        return torch.load(path, map_location="cpu", weights_only=True)

    def put(self, kind: str, key: str, value) -> None:
        path = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(value, tmp)
        os.replace(tmp, path)
