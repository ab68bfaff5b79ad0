"""Stunning Engine: from a folder of photographs to a validated, deployable style model.

Importing the package sets ``PYTORCH_ENABLE_MPS_FALLBACK=1`` on macOS unless the user set
it (``0`` is respected): torch reads it once, when it starts, and without it an operator
that Metal lacks stops a training run with NotImplementedError instead of running that
one operator on the CPU. Every entry point (CLI, stages, flows) imports ``stunning``
before torch, so the setting is in place in time; `stunning doctor` reports its value.
"""

import os
import sys

if sys.platform == "darwin":
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
