"""Deployment exports of a model folder's denoiser: ONNX (:mod:`stunning.export.onnx`) and Core ML
(:mod:`stunning.export.coreml`).

Both export the denoiser of a diffusers folder (a base model, or the fused model that
:func:`stunning.blend.fuse` writes) with fixed shapes, the ones the family's own sampler feeds it at
the model's resolution (captured from one real sampling call, :mod:`stunning.export.signature`), and
both write a report that is data: input/output names, shapes and dtypes, sizes, numerical errors
against the torch module, seconds. Neither module imports torch, onnx or coremltools at import time.
"""

from __future__ import annotations


class ExportError(ValueError):
    """An export cannot be made or checked (bad option, unsupported family, missing tool); the
    message says what was wrong and what to do."""


__all__ = ["ExportError"]
