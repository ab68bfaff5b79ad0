"""User handoff: the release bundle and its verification.

`build_bundle` assembles `dist/release/`: the style adapters, the pre-computed blends,
`blends.yaml`, the model card (README.md + grid), a runnable `example.py` that needs only
stock diffusers, the deployment exports under `export/` (Core ML packages, the ONNX denoiser,
the Swift app template: the export stage's build/export, when given), a `manifest.json`
(files, sizes, hashes, params hash) and `SHA256SUMS`
in the format of GNU `sha256sum` so a user can check the bundle with
`sha256sum -c SHA256SUMS` as well as with `stunning verify dist/release`.

`verify_bundle` recomputes every hash and reports missing, changed and unexpected files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from stunning.config import Params

log = logging.getLogger(__name__)

SUMS_NAME = "SHA256SUMS"
MANIFEST_NAME = "manifest.json"
# Files an OS drops into folders a user merely opened; never part of a release.
IGNORED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
ADAPTER_FILE = "pytorch_lora_weights.safetensors"


class BundleError(ValueError):
    """A bundle input is missing or incomplete; the message names it and what to run."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# The params sections that determine the released adapter files (data, curation, training,
# blending and the base they were trained on); registry or budget edits do not change a bundle.
HASHED_SECTIONS = ("base", "data", "curate", "train", "merge")


def params_hash(params: Params) -> str:
    """sha256 of the artefact-defining params sections (canonical JSON): ties a bundle to its configuration."""
    dumped = params.model_dump(by_alias=True, mode="json")
    canonical = json.dumps({k: dumped[k] for k in HASHED_SECTIONS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _bundle_files(root: Path) -> list[str]:
    """Relative POSIX paths of every regular file under `root`, except the checksum list."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_NAMES)
        for name in filenames:
            if name in IGNORED_NAMES:
                continue
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != SUMS_NAME:
                files.append(rel)
    return sorted(files)


def format_sums(entries: dict[str, str]) -> str:
    """`sha256sum` text-mode lines (`<hex>  <path>`), sorted by path."""
    return "".join(f"{digest}  {path}\n" for path, digest in sorted(entries.items()))


def parse_sums(text: str) -> tuple[dict[str, str], list[str]]:
    """(path -> digest, malformed lines) from a `sha256sum` file (text or binary `*` mode)."""
    entries: dict[str, str] = {}
    bad: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        digest, sep, path = line.partition(" ")
        path = path[1:] if path[:1] in (" ", "*") else path
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()) or not path:
            bad.append(line)
            continue
        entries[path] = digest.lower()
    return entries, bad


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*IGNORED_NAMES, ".*.tmp", "__pycache__"))


def _created_timestamp() -> str:
    # SOURCE_DATE_EPOCH (reproducible-builds.org) makes two builds of the same inputs identical.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), UTC) if epoch and epoch.isdigit() else datetime.now(UTC)
    return moment.isoformat(timespec="seconds")


EXAMPLE_TEMPLATE = '''\
"""Generate images with the LoRA style adapters of this release, using stock diffusers only.

    python example.py --base PATH/TO/BASE/MODEL --style {first_style}
    python example.py --base PATH/TO/BASE/MODEL --blend {first_blend}
    python example.py --base PATH/TO/BASE/MODEL --mix {mix_example}

PATH/TO/BASE/MODEL is the local diffusers folder of the base model the adapters were trained
on ({base_model}). Nothing is downloaded.
"""

import argparse
import json
from pathlib import Path

import torch
import yaml
from diffusers import DiffusionPipeline

HERE = Path(__file__).resolve().parent
STYLES = {styles!r}
BLENDS = yaml.safe_load((HERE / "blends.yaml").read_text())["blends"]


def pick_device():
    if torch.backends.mps.is_available():
        return "mps", torch.float16
    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default={base_path!r}, help="local diffusers folder of the base model")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--style", choices=STYLES, help="one style adapter")
    group.add_argument("--blend", choices=sorted(BLENDS), help="a pre-computed blend (blends/<name>)")
    group.add_argument("--mix", nargs="+", metavar="STYLE=WEIGHT", help="blend adapters at load time")
    ap.add_argument("--prompt", default={prompt!r})
    ap.add_argument("--steps", type=int, default={steps})
    ap.add_argument("--guidance-scale", type=float, default={guidance})
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="example.png")
    args = ap.parse_args()

    device, dtype = pick_device()
    index = json.loads((Path(args.base) / "model_index.json").read_text())
    absent = {{k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None}}  # e.g. SD3 without T5
    pipe = DiffusionPipeline.from_pretrained(args.base, torch_dtype=dtype, local_files_only=True, **absent)
    pipe = pipe.to(device)
    if args.blend:
        pipe.load_lora_weights(str(HERE / "blends" / args.blend), adapter_name=args.blend)
    elif args.mix:
        names, weights = [], []
        for item in args.mix:
            name, _, weight = item.partition("=")
            pipe.load_lora_weights(str(HERE / "adapters" / name), adapter_name=name)
            names.append(name)
            weights.append(float(weight or 1.0))
        pipe.set_adapters(names, adapter_weights=weights)
    else:
        style = args.style or STYLES[0]
        pipe.load_lora_weights(str(HERE / "adapters" / style), adapter_name=style)

    # An SD3 model trained without T5 (like the project's micro model) records how many
    # T5 tokens it expects in stunning.json; the stock default is 256.
    settings = Path(args.base) / "stunning.json"
    extra = {{}}
    if settings.is_file() and "t5_tokens" in json.loads(settings.read_text()):
        extra["max_sequence_length"] = json.loads(settings.read_text())["t5_tokens"]
    generator = torch.Generator("cpu").manual_seed(args.seed)
    image = pipe(
        args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, generator=generator, **extra
    ).images[0]
    image.save(args.out)
    print(f"saved {{args.out}}")


if __name__ == "__main__":
    main()
'''


def render_example(params: Params, base_model: str | None = None) -> str:
    """Source of `example.py`: loads the base model and the adapters with diffusers only."""
    styles = list(params.data.styles)
    blends = [b.name for b in params.merge.blends]
    mix = " ".join(f"{s}={1.0 / len(styles[:2]):g}" for s in styles[:2])
    return EXAMPLE_TEMPLATE.format(
        first_style=styles[0],
        first_blend=blends[0] if blends else "NAME",
        mix_example=mix,
        base_model=base_model or params.base.path,
        styles=styles,
        base_path=params.base.path,
        prompt=params.train.sample_prompt,
        steps=params.validate_.steps,
        guidance=params.validate_.guidance_scale,
    )


def _check_adapter_dir(path: Path, what: str, hint: str) -> None:
    if not path.is_dir():
        raise BundleError(f"{what} folder {path} not found. {hint}")
    if not any(path.glob("*.safetensors")):
        raise BundleError(f"{what} folder {path} has no .safetensors file. {hint}")


def build_bundle(
    out_dir: str | Path,
    adapters_dir: str | Path,
    blends_dir: str | Path,
    model_card_dir: str | Path,
    params: Params,
    base_model: str | None = None,
    *,
    model: dict[str, Any] | None = None,
    created: str | None = None,
    export_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Assemble the release folder `out_dir` atomically; returns a summary.

    Every style in `params.data.styles` must have an adapter in `adapters_dir/<style>/` and
    every blend in `params.merge.blends` a folder `blends_dir/<name>/`; the model card
    folder must hold README.md. A missing input is a :class:`BundleError` naming it.
    `model` (which registered model the adapters are, e.g. ``{"source": "champion",
    "version": 3}``) goes into the manifest; `created` is its build time (default:
    SOURCE_DATE_EPOCH, else now) — the handoff stage passes the registered version's
    creation time, so a rebuild of the same model writes the same bytes. `export_dir` (the export
    stage's folder, with its export.json) is copied to `export/`; None: the bundle has no exports.
    """
    from stunning.io import atomic_dir

    adapters_dir, blends_dir, model_card_dir = Path(adapters_dir), Path(blends_dir), Path(model_card_dir)
    styles = list(params.data.styles)
    blends = list(params.merge.blends)
    for style in styles:
        _check_adapter_dir(adapters_dir / style, f"adapter of style {style!r}", "Run the `train` stage first.")
    for blend in blends:
        _check_adapter_dir(blends_dir / blend.name, f"blend {blend.name!r}", "Run the `merge` stage first.")
    if not (model_card_dir / "README.md").is_file():
        raise BundleError(f"{model_card_dir / 'README.md'} not found. Run the `docs` stage first.")
    if export_dir is not None and not (Path(export_dir) / "export.json").is_file():
        raise BundleError(f"{Path(export_dir) / 'export.json'} not found. Run the `export` stage first.")

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for style in styles:
            _copy_tree(adapters_dir / style, tmp / "adapters" / style)
        for blend in blends:
            _copy_tree(blends_dir / blend.name, tmp / "blends" / blend.name)
        for item in sorted(model_card_dir.iterdir()):
            if item.name in IGNORED_NAMES or item.name.startswith("."):
                continue
            if item.is_dir():
                _copy_tree(item, tmp / item.name)
            else:
                shutil.copyfile(item, tmp / item.name)
        blends_doc = {
            "blends": {b.name: {"weights": dict(b.weights), "path": f"blends/{b.name}"} for b in blends},
            "fuse": params.merge.fuse,
        }
        (tmp / "blends.yaml").write_text(
            "# Adapter blends: each is also pre-computed as a single LoRA file under blends/<name>/.\n"
            + yaml.safe_dump(blends_doc, sort_keys=True),
            encoding="utf-8",
        )
        (tmp / "example.py").write_text(render_example(params, base_model), encoding="utf-8")
        if export_dir is not None:
            _copy_tree(Path(export_dir), tmp / "export")

        files = [
            {"path": rel, "size": (tmp / rel).stat().st_size, "sha256": sha256_file(tmp / rel)}
            for rel in _bundle_files(tmp)
        ]
        manifest = {
            "format": "stunning-release/1",
            "created": created or _created_timestamp(),
            "params_sha256": params_hash(params),
            "params_sections": list(HASHED_SECTIONS),
            "base_model": {
                "source": params.base.source,
                "path": params.base.path,
                "family": params.base.family,
                "id": base_model or params.base.path,
            },
            "styles": styles,
            "blends": [b.name for b in blends],
            "exports": export_dir is not None,
            "files": files,
        }
        if model is not None:
            manifest["model"] = dict(model)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        sums = {f["path"]: f["sha256"] for f in files}
        sums[MANIFEST_NAME] = sha256_file(tmp / MANIFEST_NAME)
        (tmp / SUMS_NAME).write_text(format_sums(sums), encoding="utf-8")
    total = sum(f["size"] for f in files)
    log.info("release bundle %s: %d files, %.1f MB", out_dir, len(sums), total / 1e6)
    return {
        "out": str(out_dir),
        "files": len(sums) + 1,
        "bytes": total,
        "styles": styles,
        "blends": [b.name for b in blends],
        "params_sha256": manifest["params_sha256"],
        "model": manifest.get("model"),
        "exports": sum(1 for f in files if f["path"].startswith("export/")),
    }


@dataclass
class VerifyResult:
    """What `verify_bundle` found; `ok` when nothing is missing, changed, unexpected or malformed."""

    root: Path
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.unexpected or self.errors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "ok": self.ok,
            "checked": self.checked,
            "missing": self.missing,
            "changed": self.changed,
            "unexpected": self.unexpected,
            "errors": self.errors,
        }

    def describe(self) -> str:
        if self.ok:
            return f"{self.root}: OK, {self.checked} files match {SUMS_NAME}"
        lines = [f"{self.root}: FAILED verification"]
        lines += [f"  error:      {e}" for e in self.errors]
        lines += [f"  missing:    {p}" for p in self.missing]
        lines += [f"  changed:    {p}" for p in self.changed]
        lines += [f"  unexpected: {p}" for p in self.unexpected]
        return "\n".join(lines)


def verify_bundle(root: str | Path) -> VerifyResult:
    """Recompute every file's sha256 against `SHA256SUMS` and list the differences."""
    root = Path(root)
    result = VerifyResult(root=root)
    if not root.is_dir():
        result.errors.append(f"{root} is not a directory")
        return result
    sums_file = root / SUMS_NAME
    if not sums_file.is_file():
        result.errors.append(f"{SUMS_NAME} not found in {root}: not a release bundle, or it was removed")
        result.unexpected = _bundle_files(root)
        return result
    expected, bad = parse_sums(sums_file.read_text(encoding="utf-8", errors="replace"))
    result.errors += [f"malformed line in {SUMS_NAME}: {line!r}" for line in bad]
    for rel, digest in sorted(expected.items()):
        path = root / rel
        # A path escaping the bundle (../x, /etc/x) is tampering, never something to hash.
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            result.errors.append(f"{SUMS_NAME} lists a path outside the bundle: {rel!r}")
            continue
        if not path.is_file():
            result.missing.append(rel)
            continue
        result.checked += 1
        if sha256_file(path) != digest:
            result.changed.append(rel)
    result.unexpected = [rel for rel in _bundle_files(root) if rel not in expected]
    return result
