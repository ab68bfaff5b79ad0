"""Where a base model comes from: a local diffusers folder, a cached Hub id, or a single file.

Users hold base models in three forms, and :func:`resolve_base` turns each into the local
diffusers folder every family loads:

- a **diffusers folder** (`save_pretrained` layout with `model_index.json`): used as is;
- a **Hugging Face Hub id** (``org/name`` or ``org/name@revision``) that is already in the
  local Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``). Nothing is ever downloaded: training runs offline, and a
  missing id fails with the command that fetches it on a machine with internet;
- a **single-file checkpoint** (``.safetensors``/``.ckpt`` as shared on Civitai and the Hub):
  converted once with the family's stock ``from_single_file`` into a diffusers folder under
  `work_dir`, keyed by the file's content hash, and reused on the next run. Conversion needs
  the model's component configs; offline they come from `config` (a diffusers folder or a
  cached Hub id of the same architecture, e.g. the base model the checkpoint was fine-tuned
  from).

:func:`detect_family` names the family of a diffusers folder from its pipeline class.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from stunning.families import ModelNotFoundError, available, get_family

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?$")
DEFAULT_WORK_DIR = Path.home() / ".cache" / "stunning" / "single-file"


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache this process would use (read from the environment now)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                     "huggingface")
    return Path(home) / "hub"


def detect_family(folder: str | Path) -> str:
    """The registered family whose stock pipeline class wrote `folder`'s model_index.json."""
    index_file = Path(folder) / "model_index.json"
    if not index_file.is_file():
        raise ModelNotFoundError(f"{index_file} is missing: {folder} is not a diffusers model folder")
    class_name = json.loads(index_file.read_text()).get("_class_name")
    by_class = {get_family(name).pipeline_class().__name__: name for name in available()}
    if class_name not in by_class:
        raise ModelNotFoundError(
            f"{index_file}: pipeline class {class_name!r} is not one this project trains; supported: "
            + ", ".join(f"{cls} ({fam})" for cls, fam in sorted(by_class.items()))
        )
    return by_class[class_name]


def resolve_base(
    ref: str | Path,
    family: str | None = None,
    *,
    config: str | Path | None = None,
    work_dir: str | Path | None = None,
) -> Path:
    """The local diffusers folder for a base-model reference (see the module docstring).

    `family` is required for single-file checkpoints (it picks the pipeline class that
    converts them) and, when given, checks a folder has that family's components.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        if family is not None:
            _check(path, family)
        return path
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelNotFoundError(
                f"{path} is a file but not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}); pass a diffusers "
                "folder, a single-file checkpoint or a Hugging Face id"
            )
        return _convert_single_file(path, family, config, Path(work_dir) if work_dir else DEFAULT_WORK_DIR)
    match = HUB_ID.match(str(ref))
    if match and not str(ref).startswith((".", "/", "~")):
        folder = cached_snapshot(match["repo"], match["revision"])
        if family is not None:
            _check(folder, family)
        return folder
    raise ModelNotFoundError(
        f"base model {str(ref)!r} not found: it is neither an existing folder or file nor a Hugging Face id "
        "(org/name). Pass a local diffusers folder, a .safetensors checkpoint, or an id already in your "
        f"Hugging Face cache ({hub_cache_dir()})."
    )


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The cached snapshot folder of a Hub model repo, without network access."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        at = f" at revision {revision!r}" if revision else ""
        raise ModelNotFoundError(
            f"{repo_id}{at} is not in the Hugging Face cache {cache} ({type(exc).__name__}). Training runs "
            f"offline; on a machine with internet run `hf download {repo_id}"
            + (f" --revision {revision}" if revision else "")
            + "` (older huggingface_hub: `huggingface-cli download ...`), then copy the cache here or point "
            "HF_HOME / HF_HUB_CACHE at it."
        ) from None
    return Path(folder)


def file_digest(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    """sha256 of a file's content (streamed; a multi-GB checkpoint takes seconds, once)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check(folder: Path, family: str) -> None:
    from stunning.families import check_model_dir

    check_model_dir(folder, get_family(family).required_components)


def _convert_single_file(path: Path, family: str | None, config: str | Path | None, work_dir: Path) -> Path:
    from stunning.io import atomic_dir

    if family is None:
        raise ModelNotFoundError(
            f"{path} is a single-file checkpoint: name its family (--family / base.family: {', '.join(available())}) "
            "so it can be converted with the right pipeline class"
        )
    digest = file_digest(path)
    out = work_dir / f"{family}-{digest[:16]}"
    if (out / "model_index.json").is_file():
        log.info("single-file checkpoint %s: reusing its conversion %s", path, out)
        return out
    config_folder = None
    if config is not None:
        config_folder = resolve_base(config, family)
    pipeline_class = get_family(family).pipeline_class()
    kwargs = {"config": str(config_folder)} if config_folder is not None else {}
    try:
        pipe = pipeline_class.from_single_file(str(path), local_files_only=True, **kwargs)
    except Exception as exc:  # diffusers raises several types for a missing config or a foreign layout
        hint = (
            "Conversion needs the component configs of the model's architecture, which are not available "
            "offline: pass `config` (--config / base.config) as a diffusers folder or a cached Hugging Face id "
            "of the same architecture (e.g. the base model this checkpoint was fine-tuned from)."
            if config_folder is None
            else f"Check that {path} is a {family} checkpoint of the same architecture as {config_folder}."
        )
        raise ModelNotFoundError(f"{path}: could not convert this single-file checkpoint ({exc}). {hint}") from exc
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    log.info("single-file checkpoint %s converted to %s", path, out)
    return out
