"""Saved request-time blends: named style weights (and a negative prompt) as small YAML files.

A blend found by trying weights in the studio is saved by name, one file per blend
(default folder ``<project root>/studio/blends/<name>.yaml``), in the same format as an entry
of params.yaml's ``merge.blends`` plus an optional negative prompt::

    name: soft-noir
    weights: {noir: 0.7, impressionist: -0.3}
    negative_prompt: blurry, low contrast     # optional

A saved blend is applied at request time (``GenerateRequest.styles``), costing nothing to
try; :func:`promote_to_params` adds it to ``merge.blends`` in params.yaml so the pipeline
builds it offline, validates it and ships it (`dvc repro`). That edit touches only the lines
of that one entry, so params.yaml keeps its comments and layout; the negative prompt stays in
the studio file (``merge.blends`` has no such key).

Names are 1-64 characters of letters, digits, ``-`` and ``_`` (they become file names); the
weights follow the request limits of :mod:`stunning.style_model`. Every error names the file
and the key.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stunning.io import atomic_write_text
from stunning.style_model import MAX_BLEND_STYLES, MAX_NEGATIVE_CHARS, MAX_STYLE_WEIGHT

log = logging.getLogger(__name__)

__all__ = [
    "BLENDS_DIR", "BlendFileError", "SavedBlend", "blends_dir", "check_name", "delete_blend", "list_blends",
    "load_blend", "promote_to_params", "save_blend",
]

BLENDS_DIR = Path("studio") / "blends"  # relative to the project root
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_KEYS = ("name", "weights", "negative_prompt")


class BlendFileError(ValueError):
    """A saved blend (or its name, or the params.yaml it is promoted into) is unusable; the message
    names the file, the key and the fix."""


@dataclass(frozen=True)
class SavedBlend:
    name: str
    weights: dict[str, float]
    negative_prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "weights": dict(self.weights)}
        if self.negative_prompt is not None:
            out["negative_prompt"] = self.negative_prompt
        return out


def blends_dir(root: str | Path | None = None) -> Path:
    """The saved-blend folder of the project at `root` (default: the current directory)."""
    return Path(root or ".") / BLENDS_DIR


def check_name(name: Any, what: str = "blend name") -> str:
    """`name` if it is a valid blend or style name; BlendFileError saying what a name may hold."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BlendFileError(
            f"{what} {str(name)[:80]!r} is not valid: use 1-64 letters, digits, '-' or '_', starting with a "
            "letter or digit (it becomes a file name)"
        )
    return name


def _check(data: Any, where: str) -> SavedBlend:
    """A SavedBlend from parsed YAML/JSON `data`; `where` (file or request) prefixes every error."""
    if not isinstance(data, dict):
        raise BlendFileError(f"{where}: expected a mapping with 'name' and 'weights', got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _KEYS)
    if unknown:
        raise BlendFileError(f"{where}: unknown key(s) {unknown}; a blend has {list(_KEYS)}")
    if "name" not in data:
        raise BlendFileError(f"{where}: key 'name' is missing")
    try:
        name = check_name(data["name"])
    except BlendFileError as exc:
        raise BlendFileError(f"{where}: key 'name': {exc}") from None
    weights = data.get("weights")
    if not isinstance(weights, dict) or not weights:
        raise BlendFileError(f"{where}: key 'weights' must be a non-empty mapping of style name to weight, "
                             "e.g. {noir: 0.7, impressionist: -0.3}")
    if len(weights) > MAX_BLEND_STYLES:
        raise BlendFileError(f"{where}: key 'weights' has {len(weights)} styles; at most {MAX_BLEND_STYLES}")
    clean: dict[str, float] = {}
    for style, w in weights.items():
        try:
            check_name(style, "style name")
        except BlendFileError as exc:
            raise BlendFileError(f"{where}: key 'weights': {exc}") from None
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise BlendFileError(f"{where}: key 'weights.{style}' is {w!r}; use a finite number")
        if not -MAX_STYLE_WEIGHT <= w <= MAX_STYLE_WEIGHT:
            raise BlendFileError(
                f"{where}: key 'weights.{style}' is {w}; use a weight in [-{MAX_STYLE_WEIGHT:g}, {MAX_STYLE_WEIGHT:g}]"
            )
        clean[style] = float(w)
    negative = data.get("negative_prompt")
    if negative is not None and (not isinstance(negative, str) or len(negative) > MAX_NEGATIVE_CHARS):
        raise BlendFileError(f"{where}: key 'negative_prompt' must be text of at most {MAX_NEGATIVE_CHARS} characters")
    return SavedBlend(name=name, weights=clean, negative_prompt=negative)


def _path(name: str, folder: str | Path | None) -> Path:
    return Path(folder) / f"{check_name(name)}.yaml" if folder is not None else blends_dir() / f"{check_name(name)}.yaml"


def save_blend(blend: SavedBlend | dict[str, Any], folder: str | Path | None = None) -> Path:
    """Write `blend` to `<folder>/<name>.yaml` atomically (replacing a blend of that name); returns the file."""
    data = blend.to_dict() if isinstance(blend, SavedBlend) else dict(blend)
    checked = _check(data, f"blend {str(data.get('name'))[:80]!r}")
    path = _path(checked.name, folder)
    out = {"name": checked.name, "weights": checked.weights}
    text = yaml.safe_dump(out, sort_keys=False, default_flow_style=None, width=4096, allow_unicode=True)
    if checked.negative_prompt is not None:
        text += yaml.safe_dump({"negative_prompt": checked.negative_prompt}, width=4096, allow_unicode=True)
    atomic_write_text(path, text)
    log.info("saved blend %s -> %s", checked.name, path)
    return path


def _read(path: Path) -> SavedBlend:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BlendFileError(f"{path}: cannot be read ({exc})") from None
    except yaml.YAMLError as exc:
        raise BlendFileError(f"{path}: not valid YAML ({exc}); fix or delete the file") from None
    blend = _check(data, str(path))
    if blend.name != path.stem:
        raise BlendFileError(f"{path}: key 'name' is {blend.name!r} but the file is named {path.stem!r}; "
                             "make them agree (the file name is how the blend is found)")
    return blend


def load_blend(name: str, folder: str | Path | None = None) -> SavedBlend:
    """The saved blend `name`; BlendFileError if there is none (listing those there are) or it is invalid."""
    path = _path(name, folder)
    if not path.is_file():
        have = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise BlendFileError(f"no saved blend {name!r} ({path} does not exist); saved blends: {have}")
    return _read(path)


def list_blends(folder: str | Path | None = None) -> list[SavedBlend]:
    """Every saved blend, by name. An invalid file raises BlendFileError naming it (nothing is skipped)."""
    folder = Path(folder) if folder is not None else blends_dir()
    if not folder.is_dir():
        return []
    return [_read(p) for p in sorted(folder.glob("*.yaml")) if not p.name.startswith(".")]


def delete_blend(name: str, folder: str | Path | None = None) -> bool:
    """Delete the saved blend `name`; False if there was none."""
    path = _path(name, folder)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    log.info("deleted blend %s (%s)", name, path)
    return True


# --------------------------------------------------------------------------- promotion into params.yaml


def _scalar(value: str) -> str:
    """`value` as a YAML scalar that reads back as the same string (quoted when plain would not)."""
    try:
        plain_ok = yaml.safe_load(value) == value and ":" not in value and "#" not in value
    except yaml.YAMLError:
        plain_ok = False
    return value if plain_ok else json.dumps(value)


def _entry_lines(blend: SavedBlend, dash_indent: str) -> list[str]:
    weights = ", ".join(f"{_scalar(k)}: {v!r}" for k, v in blend.weights.items())
    return [f"{dash_indent}- name: {_scalar(blend.name)}\n", f"{dash_indent}  weights: {{{weights}}}\n"]


def _mapping_get(node: yaml.Node, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return k, v
    return None


def _end_line(node: yaml.Node) -> int:
    """The line after the last line holding part of `node` (0-based).

    A block collection's end mark is the start of the *next* token (possibly lines later, past
    comments), so the end is taken from its last scalar or flow collection instead.
    """
    while isinstance(node, yaml.MappingNode | yaml.SequenceNode) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(node, yaml.MappingNode) else last
    mark = node.end_mark
    return mark.line if mark.column == 0 else mark.line + 1


def _edited_params(text: str, blend: SavedBlend, path: Path) -> str:
    """params.yaml text with `blend` added to (or replacing its namesake in) `merge.blends`.

    Only the lines of that entry change (a new entry goes after the last one, indented like
    it), so comments and layout elsewhere are kept byte for byte.
    """
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise BlendFileError(f"{path}: not valid YAML ({exc})") from None
    if root is None or not isinstance(root, yaml.MappingNode):
        raise BlendFileError(f"{path}: the top level must be a mapping of sections")
    merge = _mapping_get(root, "merge")
    if merge is None:
        return "".join(lines) + "\nmerge:\n  blends:\n" + "".join(_entry_lines(blend, "    "))
    merge_key, merge_node = merge
    if not isinstance(merge_node, yaml.MappingNode) or merge_node.flow_style:
        raise BlendFileError(f"{path}: key 'merge' is not a block mapping; add the blend to merge.blends by hand")
    found = _mapping_get(merge_node, "blends")
    if found is None:
        first_key = merge_node.value[0][0] if merge_node.value else None
        indent = " " * (first_key.start_mark.column if first_key is not None else merge_key.start_mark.column + 2)
        at = merge_key.start_mark.line + 1
        return "".join(lines[:at] + [f"{indent}blends:\n"] + _entry_lines(blend, indent + "  ") + lines[at:])
    key, seq = found
    key_indent = " " * key.start_mark.column
    if isinstance(seq, yaml.ScalarNode) and seq.value in ("", "null", "~") or (
            isinstance(seq, yaml.SequenceNode) and seq.flow_style and not seq.value):
        # `blends:`, `blends: null` or `blends: []`: the one key line becomes a block list.
        at = key.start_mark.line
        if _end_line(seq) > at + 1:
            raise BlendFileError(f"{path}: key 'merge.blends' spans several lines; add the blend by hand")
        return "".join(lines[:at] + [f"{key_indent}blends:\n"] + _entry_lines(blend, key_indent + "  ") + lines[at + 1:])
    if not isinstance(seq, yaml.SequenceNode) or seq.flow_style:
        raise BlendFileError(f"{path}: key 'merge.blends' is not a block list (`- name: ...` entries); "
                             "add the blend by hand")
    first_line = lines[seq.value[0].start_mark.line]
    dash_indent = first_line[: len(first_line) - len(first_line.lstrip(" "))]
    for item in seq.value:
        name = _mapping_get(item, "name")
        if name is not None and name[1].value == blend.name:  # replace this entry's lines
            start, end = item.start_mark.line, _end_line(item)
            if lines[start].lstrip(" ").startswith("-"):
                return "".join(lines[:start] + _entry_lines(blend, dash_indent) + lines[end:])
            raise BlendFileError(f"{path}: merge.blends entry {blend.name!r} is not laid out one key per line; "
                                 "edit it by hand")
    at = _end_line(seq.value[-1])
    return "".join(lines[:at] + _entry_lines(blend, dash_indent) + lines[at:])


def promote_to_params(name: str, params_path: str | Path = "params.yaml", folder: str | Path | None = None) -> dict:
    """Add the saved blend `name` to `merge.blends` in `params_path` (replacing one of that name).

    The file is edited in place, line-wise (comments and layout kept), checked to parse to
    exactly the intended data and to pass :func:`stunning.config.load_params` (styles must be
    in ``data.styles``), then written atomically; on any error the file is left unchanged.
    Returns ``{"params": path, "blend": entry, "replaced": bool}``.
    """
    from stunning.config import ConfigError, load_params

    blend = load_blend(name, folder)
    path = Path(params_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BlendFileError(f"{path}: cannot be read ({exc}); pass the project's params.yaml") from None
    before = yaml.safe_load(text) or {}
    new_text = _edited_params(text, blend, path)

    # The edit must mean exactly this: the same data, with the one entry added or replaced.
    entry = {"name": blend.name, "weights": dict(blend.weights)}
    expected = json.loads(json.dumps(before))
    blends = expected.setdefault("merge", {}).get("blends") or []
    replaced = any(b.get("name") == blend.name for b in blends if isinstance(b, dict))
    blends = [entry if isinstance(b, dict) and b.get("name") == blend.name else b for b in blends]
    if not replaced:
        blends.append(entry)
    expected["merge"]["blends"] = blends
    if json.loads(json.dumps(yaml.safe_load(new_text))) != expected:  # pragma: no cover - a bug in _edited_params
        raise BlendFileError(f"{path}: could not add blend {name!r} without changing other keys; add it by hand:\n"
                             + "".join(_entry_lines(blend, "    ")))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".check.yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(new_text)
        try:
            load_params(tmp)
        except ConfigError as exc:
            raise BlendFileError(
                f"{str(exc).replace(tmp, str(path))}\n(promoting blend {name!r}; {path} was left unchanged)"
            ) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_text(path, new_text)
    log.info("%s blend %s in %s merge.blends", "replaced" if replaced else "added", name, path)
    return {"params": str(path), "blend": entry, "replaced": replaced}
