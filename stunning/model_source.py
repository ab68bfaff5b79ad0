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
  `work_dir`, keyed by the file's content hash (and the configs used), and reused on the next
  run. Conversion needs the component configs of the checkpoint's architecture; offline they
  come from `config` (a diffusers folder or a cached Hub id of the same architecture, e.g. the
  base model the checkpoint was fine-tuned from) or, without it, from the cached repo diffusers
  names for that architecture (``stable-diffusion-v1-5/stable-diffusion-v1-5`` for SD 1.x, ...);
  the error says which repo and the command that fetches only its configs.

A checkpoint may hold only some components: a transformer-only file (how FLUX.1 and SD3.5
fine-tunes are often shared) takes the components it lacks (VAE, text encoders) from the
config folder.

:func:`detect_family` names the family of a diffusers folder from its pipeline class;
:mod:`stunning.single_file` goes the other way (a diffusers folder as one checkpoint).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import os
import re
from collections.abc import Mapping
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


def _fingerprint(folder: Path) -> str:
    """sha256 of a diffusers folder's configs (model_index.json and every component's config)."""
    h = hashlib.sha256()
    for f in sorted([folder / "model_index.json", *folder.glob("*/*.json")]):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


class _LazyCheckpoint(Mapping):
    """A safetensors checkpoint as a read-only mapping that loads a tensor only when asked.

    diffusers names a checkpoint's architecture from a handful of keys and shapes; this
    spares loading gigabytes just to look at them.
    """

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key):
        if key not in self._key_set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __contains__(self, key) -> bool:
        return key in self._key_set

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _open_checkpoint(path: Path) -> Mapping:
    """A single-file checkpoint's tensors (safetensors: lazily; pickled .ckpt: loaded)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError

        try:
            return _LazyCheckpoint(path)
        except (SafetensorError, OSError) as exc:
            raise ModelNotFoundError(f"{path}: not a readable safetensors file ({exc}); re-download it") from None
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        return load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged or foreign pickle
        raise ModelNotFoundError(f"{path}: could not read this checkpoint ({exc}); re-download it") from None


def _default_config(path: Path, checkpoint: Mapping) -> Path:
    """The cached Hub repo whose configs diffusers names for this checkpoint's architecture."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    repo = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    try:
        return cached_snapshot(repo)
    except ModelNotFoundError:
        raise ModelNotFoundError(
            f"{path}: converting a single-file checkpoint needs its architecture's component configs "
            f"(model_index.json, */config.json, tokenizer files); for this checkpoint diffusers takes them from "
            f"{repo}, which is not in the Hugging Face cache {hub_cache_dir()}. Either pass config "
            "(--model-config / base.config): a local diffusers folder or cached id of the model this checkpoint "
            "was fine-tuned from; or, on a machine with internet, fetch the configs only (a few MB): "
            f"`hf download {repo} --include '*.json' '*.txt'` (older huggingface_hub: `huggingface-cli download "
            "...`), then copy the cache here or point HF_HOME / HF_HUB_CACHE at it."
        ) from None


def _components_not_in(checkpoint: Mapping, folder: Path) -> dict[str, type]:
    """The VAE and text encoders of `folder`'s pipeline whose weights the checkpoint lacks, with their classes.

    Transformer-only files (FLUX.1 and SD3.5 fine-tunes, ComfyUI's "diffusion models") carry
    neither. diffusers' ``from_single_file`` fails on such a file (it will not take a text
    encoder from a folder in the transformers layout), so these come from the config folder.
    The denoiser is never on the list: a file without one is not a base model.
    """
    from diffusers.loaders.single_file_utils import LDM_VAE_KEYS, is_clip_model_in_single_file, is_t5_in_single_file

    missing = {}
    for name, spec in json.loads((folder / "model_index.json").read_text()).items():
        if name.startswith("_") or not isinstance(spec, list) or spec[1] is None:
            continue
        if name != "vae" and not spec[1].startswith(("CLIPTextModel", "T5")):
            continue
        cls = getattr(importlib.import_module(spec[0]), spec[1])
        if name == "vae":
            present = any(k.startswith(tuple(LDM_VAE_KEYS)) for k in checkpoint)
        elif spec[1].startswith("CLIPTextModel"):
            present = is_clip_model_in_single_file(cls, checkpoint)
        else:
            present = is_t5_in_single_file(checkpoint)
        if not present:
            missing[name] = cls
    return missing


def _component_from(folder: Path, name: str, cls: type, checkpoint: Path):
    """Component `name` (a `cls`) with its weights from a diffusers folder, for a checkpoint that lacks it."""
    try:
        component = cls.from_pretrained(str(folder), subfolder=name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"{checkpoint} holds no {name} (a transformer-only file), so it comes from the config folder {folder}, "
            f"which has no {name} weights either ({type(exc).__name__}: {exc}). Pass the full diffusers base model "
            "this checkpoint was fine-tuned from as the config (--model-config / base.config)."
        ) from None
    log.info("single-file checkpoint %s has no %s: taking it from %s", checkpoint, name, folder)
    return component


def _convert_single_file(path: Path, family: str | None, config: str | Path | None, work_dir: Path) -> Path:
    from stunning.families import absent_components, complete_model_index, model_settings
    from stunning.io import atomic_dir

    if family is None:
        raise ModelNotFoundError(
            f"{path} is a single-file checkpoint: name its family (--family / base.family: {', '.join(available())}) "
            "so it can be converted with the right pipeline class"
        )
    fam = get_family(family)
    checkpoint = _open_checkpoint(path)
    if len(checkpoint) and all(".lora" in k or k.startswith(("lora_", "lycoris_")) or k.endswith(".alpha")
                               for k in checkpoint):
        raise ModelNotFoundError(
            f"{path} holds LoRA weights, not a base model: pass the base model it was trained on as the base, "
            "and this file as an adapter"
        )
    config_folder = resolve_base(config, family) if config is not None else _default_config(path, checkpoint)
    missing = _components_not_in(checkpoint, config_folder)
    del checkpoint
    try:
        config_family = detect_family(config_folder)
    except ModelNotFoundError:
        config_family = family  # an unregistered pipeline class: let from_single_file judge
    if config_family != family:
        raise ModelNotFoundError(
            f"{path}: asked to convert it as {family!r}, but its configs ({config_folder}) are a {config_family!r} "
            f"model. Pass --family {config_family}, or a config folder of the {family} model it was fine-tuned from."
        )
    # The conversion depends on the file, the family and the configs: key the cache by all three.
    digest = file_digest(path)
    key = hashlib.sha256(f"{digest}\0{family}\0{_fingerprint(config_folder)}".encode()).hexdigest()
    out = work_dir / f"{family}-{path.stem[:40]}-{key[:16]}"
    if (out / "model_index.json").is_file():
        log.info("single-file checkpoint %s: reusing its conversion %s", path, out)
        return out
    pipeline_class = fam.pipeline_class()
    kwargs = dict(absent_components(config_folder))
    for name, cls in missing.items():
        kwargs.setdefault(name, _component_from(config_folder, name, cls, path))
    if "safety_checker" in inspect.signature(pipeline_class.__init__).parameters:
        kwargs.update(safety_checker=None, requires_safety_checker=False)  # webui checkpoints carry none
    log.info("converting single-file checkpoint %s (%s, configs from %s)", path, family, config_folder)
    try:
        pipe = pipeline_class.from_single_file(str(path), config=str(config_folder), local_files_only=True, **kwargs)
    except Exception as exc:  # diffusers raises several types for a foreign layout or a config mismatch
        raise ModelNotFoundError(
            f"{path}: could not convert this single-file checkpoint with the configs of {config_folder} "
            f"({type(exc).__name__}: {exc}). Check that it is a {family} checkpoint of the same architecture "
            "(same block sizes and text encoders) as that config."
        ) from exc
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        complete_model_index(tmp, pipeline_class)
        settings = model_settings(config_folder)
        if settings:
            from stunning.families import PROJECT_FILE

            (tmp / PROJECT_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        (tmp / "stunning-source.json").write_text(json.dumps(
            {"single_file": str(path.resolve()), "sha256": digest, "config": str(config_folder)},
            indent=2) + "\n")
    log.info("single-file checkpoint %s converted to %s", path, out)
    return out
