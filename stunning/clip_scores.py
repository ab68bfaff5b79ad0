"""Optional CLIP scores for validation: text-image agreement and image-image style similarity.

When ``validate.clip_model`` names a CLIP-family model (a Hugging Face id already in the local
cache, or a local folder holding a ``CLIPModel`` with its processor), validation embeds every
image it draws with that model and reports, per style adapter:

* **text-image score** (CLIPScore without its 2.5 rescale, Hessel et al. 2021,
  arXiv:2104.08718): the mean cosine similarity between each image and the prompt that drew
  it, for the base model and the adapter. ``clip_adherence_drop`` = base − adapter: how much
  the style made the images agree less with their prompts. Unlike the analytic oracle this
  works on any user's prompts.
* **image-image style score**: the mean cosine similarity between each image and the
  centroid of the style's reference photos (their normalised CLIP image embeddings).
  ``clip_style_gain`` = adapter − base on the same content-matched prompts and seeds: how
  much closer to the style's look the adapter's images are, as CLIP sees it.

Nothing is downloaded (``local_files_only``): a model that is not in the cache is reported as
not measured, with the reason and the command that fetches it, and validation goes on. The
report names the model (and the revision folder it was read from) next to every score.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

EMBED_BATCH = 16


class ClipUnavailable(RuntimeError):
    """The configured CLIP model cannot be loaded offline; the message says why and what to do."""


@dataclass
class ClipScorer:
    """A loaded CLIP model and processor; :meth:`images` and :meth:`texts` give unit-norm embeddings."""

    name: str
    source: str  # the folder the weights were read from
    model: Any
    processor: Any

    @classmethod
    def load(cls, name: str) -> ClipScorer:
        """Load `name` (a local folder or a cached hub id) without network access."""
        import torch
        from transformers import CLIPModel, CLIPProcessor

        try:
            if Path(name).is_dir():
                folder = Path(name)
            else:
                from huggingface_hub import snapshot_download

                folder = Path(snapshot_download(name, local_files_only=True))
            model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # not cached, not a CLIP model, damaged files
            raise ClipUnavailable(
                f"validate.clip_model={name!r} cannot be loaded offline ({type(exc).__name__}: {str(exc)[:300]}). "
                f"Fetch it once with `hf download {name}` (or point the key at a local CLIP folder), "
                "or set validate.clip_model: null to skip CLIP scores."
            ) from None
        return cls(name=name, source=str(folder), model=model, processor=processor)

    def images(self, images: list[Image.Image]) -> torch.Tensor:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(images), EMBED_BATCH):
                pixels = self.processor(images=[im.convert("RGB") for im in images[i:i + EMBED_BATCH]],
                                        return_tensors="pt")["pixel_values"]
                out.append(_unit(_embeds(self.model.get_image_features(pixel_values=pixels))))
        return torch.cat(out)

    def texts(self, texts: list[str]) -> torch.Tensor:
        import torch

        out = []
        limit = int(self.model.config.text_config.max_position_embeddings)
        with torch.inference_mode():
            for i in range(0, len(texts), EMBED_BATCH):
                tok = self.processor(text=texts[i:i + EMBED_BATCH], return_tensors="pt", padding=True,
                                     truncation=True, max_length=limit)
                out.append(_unit(_embeds(self.model.get_text_features(
                    input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))))
        return torch.cat(out)

    def text_image(self, images: list[Image.Image], texts: torch.Tensor) -> float:
        """Mean cosine similarity of each image with its prompt (`texts`: :meth:`texts` of the prompts)."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} prompts")
        return float((self.images(images) * texts).sum(-1).mean())

    def centroid(self, references: list[Image.Image]) -> torch.Tensor:
        """The unit-norm mean embedding of the references, shape (1, dim)."""
        return _unit(self.images(references).mean(0, keepdim=True))

    def style_image(self, images: list[Image.Image], centroid: torch.Tensor) -> float:
        """Mean cosine similarity of each image with a references' :meth:`centroid`."""
        return float((self.images(images) @ centroid.T).mean())


def _embeds(out: Any) -> torch.Tensor:
    # transformers 5 may return a model output holding the projected embeddings
    return out if not hasattr(out, "pooler_output") else out.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def clip_report(
    name: str | None,
    adapters: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The ``clip`` section of ``reports/validation.json``.

    `adapters` maps each style to ``base_images``/``adapter_images`` (drawn from the same
    content-matched prompts and seeds), ``base_prompts`` (the prompts as the base saw them;
    the adapter's own prompts add the style words, which would flatter its text score), and
    ``references`` (the style's reference photos). Returns ``{"measured": False, "reason": ...}``
    when no model is configured or it cannot be loaded.
    """
    if not name:
        return {"measured": False, "reason": "validate.clip_model is not set (optional CLIP scores are off)"}
    try:
        scorer = ClipScorer.load(name)
    except ClipUnavailable as exc:
        log.warning("%s", exc)
        return {"measured": False, "model": name, "reason": str(exc)}
    styles: dict[str, dict[str, float]] = {}
    for style, d in sorted(adapters.items()):
        texts, centroid = scorer.texts(d["base_prompts"]), scorer.centroid(d["references"])  # once per style
        base_text = scorer.text_image(d["base_images"], texts)
        adapter_text = scorer.text_image(d["adapter_images"], texts)
        base_style = scorer.style_image(d["base_images"], centroid)
        adapter_style = scorer.style_image(d["adapter_images"], centroid)
        styles[style] = {
            "text_image_base": round(base_text, 6),
            "text_image_adapter": round(adapter_text, 6),
            "adherence_drop": round(base_text - adapter_text, 6),
            "style_image_base": round(base_style, 6),
            "style_image_adapter": round(adapter_style, 6),
            "style_gain": round(adapter_style - base_style, 6),
        }
    return {"measured": True, "model": name, "source": scorer.source, "styles": styles}
