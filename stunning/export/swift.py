"""The Swift package template of the release: a macOS/iOS command-line app over the Core ML packages.

:func:`render_swift` copies the template (``stunning/export/swift_template``: ``Package.swift``,
``Sources/StunningDiffusion/*.swift``, ``README.md``) into the export folder's ``swift/`` and writes
what it loads at run time:

- ``resources.json`` (:func:`resource_manifest`): every Core ML package per part and variant
  (paths relative to ``resources.json``), their input/output names and shapes as exported, the
  tokenizer files, the sampler's schedule and the conditioning rule;
- ``Resources/<tokenizer>/vocab.json`` and ``merges.txt`` (from the model's ``tokenizer.json``)
  and ``Resources/scheduler_config.json``.

The sampler is data: the family's diffusers scheduler is run for `steps` here and its timesteps,
sigmas and input scales go into the manifest, so the Swift loop is one rule for both families
(``x += (sigma[i+1] - sigma[i]) * guided_prediction``; flow-matching Euler for sd3, Euler on
epsilon for sd-unet). :func:`mirror_sample` is that loop in torch; the export stage checks that it
reproduces the diffusers pipeline's latents, which checks the manifest and the Swift rule here
(the Swift code itself cannot be compiled or run on this machine: no Swift toolchain, no Core ML).
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from stunning.export import ExportError

MANIFEST = "resources.json"
FORMAT = "stunning-swift-resources/1"
SWIFT_FAMILIES = ("sd3", "sd-unet")
NOT_COMPILED = (
    "The Swift template is not compiled or run by the pipeline: this machine has no Swift toolchain and "
    "Core ML runs only on Apple platforms. The pipeline checks what it can: every resource resources.json "
    "names exists with the exported shapes, and the sampler rule it encodes reproduces diffusers."
)


def template_dir() -> Path:
    """The packaged template folder."""
    return Path(str(resources.files("stunning.export") / "swift_template"))


def tokenizer_files(tokenizer_json: Path, out_dir: Path) -> dict[str, Any]:
    """Write `out_dir`/vocab.json and merges.txt (CLIP's files) from a fast tokenizer's tokenizer.json."""
    data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
        raise ExportError(f"{tokenizer_json}: not a CLIP byte-level BPE tokenizer; the Swift template reads only those")
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = dict(model["vocab"])
    for tok in data.get("added_tokens") or []:
        vocab.setdefault(tok["content"], tok["id"])
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return {"vocab_size": len(vocab), "merges": len(merges)}


def schedule(pipe: Any, steps: int) -> dict[str, Any]:
    """The family scheduler's timesteps, sigmas and denoiser input scales for `steps` steps."""
    import copy

    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    sched = copy.deepcopy(pipe.scheduler)
    if isinstance(sched, FlowMatchEulerDiscreteScheduler):
        if sched.config.get("use_dynamic_shifting") or sched.config.get("stochastic_sampling"):
            raise ExportError("the Swift template's flow sampler has no dynamic shifting or stochastic steps")
        kind = "flow-euler"
    elif isinstance(sched, EulerDiscreteScheduler) and sched.config.prediction_type == "epsilon":
        kind = "euler"
    else:
        raise ExportError(f"scheduler {type(sched).__name__}: the Swift template runs FlowMatchEuler or Euler (epsilon)")
    sched.set_timesteps(steps)
    sigmas = [float(s) for s in sched.sigmas]
    scales = [1.0] * steps if kind == "flow-euler" else [1.0 / (s * s + 1) ** 0.5 for s in sigmas[:steps]]
    return {"kind": kind, "timesteps": [float(t) for t in sched.timesteps], "sigmas": sigmas,
            "input_scales": scales, "init_noise_sigma": float(getattr(sched, "init_noise_sigma", 1.0))}


def resource_manifest(fam: Any, pipe: Any, coreml: dict[str, Any], *, resolution: int, batch: int,
                      guidance_scale: float, steps: int, coreml_prefix: str = "../coreml") -> dict[str, Any]:
    """The ``resources.json`` data for the Core ML report `coreml` (paths relative to ``swift/``)."""
    if fam.name not in SWIFT_FAMILIES:
        raise ExportError(f"the Swift template covers {list(SWIFT_FAMILIES)}, not {fam.name!r}")
    parts = coreml["components"]
    models = {
        name: {"packages": {v: f"{coreml_prefix}/{p['package']}" for v, p in c["packages"].items()},
               "inputs": c["inputs"], "outputs": c["outputs"]}
        for name, c in parts.items()
    }
    encoders = [n for n in ("text_encoder", "text_encoder_2") if n in parts]
    tokenizers = {}
    for enc in encoders:
        tok = getattr(pipe, enc.replace("text_encoder", "tokenizer"))
        tokenizers[enc] = {"vocab": f"Resources/{enc}/vocab.json", "merges": f"Resources/{enc}/merges.txt",
                           "max_length": int(tok.model_max_length), "bos_id": int(tok.bos_token_id),
                           "eos_id": int(tok.eos_token_id), "pad_id": int(tok.pad_token_id)}
    den = {i["name"]: i["shape"] for i in parts["denoiser"]["inputs"]}
    if fam.name == "sd3":
        conditioning = {"kind": "sd3", "encoders": encoders, "pad_to": int(den["encoder_hidden_states"][-1]),
                        "zero_tokens": int(fam.t5_tokens(pipe))}
    else:
        conditioning = {"kind": "sd-unet", "encoders": encoders, "pad_to": 0, "zero_tokens": 0}
    bits = [v for v in next(iter(parts.values()))["packages"] if v.endswith("bit")]
    return {
        "format": FORMAT,
        "family": fam.name,
        "resolution": int(resolution),
        "batch": int(batch),
        "guidance_scale": float(guidance_scale),
        "steps": int(steps),
        "default_variant": bits[0] if bits else coreml["precision"],
        "models": models,
        "tokenizers": tokenizers,
        "sampler": {**schedule(pipe, steps), "scheduler_config": "Resources/scheduler_config.json"},
        "conditioning": conditioning,
    }


def render_swift(out_dir: Path, fam: Any, pipe: Any, model_dir: Path, coreml: dict[str, Any], *, resolution: int,
                 batch: int, guidance_scale: float, steps: int) -> dict[str, Any]:
    """Write the template and its resources into `out_dir` (the export's ``swift/``); return its summary."""
    out_dir = Path(out_dir)
    shutil.copytree(template_dir(), out_dir, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    manifest = resource_manifest(fam, pipe, coreml, resolution=resolution, batch=batch,
                                 guidance_scale=guidance_scale, steps=steps)
    for enc in manifest["tokenizers"]:
        tokenizer_files(Path(model_dir) / enc.replace("text_encoder", "tokenizer") / "tokenizer.json",
                        out_dir / "Resources" / enc)
    shutil.copyfile(Path(model_dir) / "scheduler" / "scheduler_config.json", out_dir / "Resources" / "scheduler_config.json")
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    readme = out_dir / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8").replace("{{FAMILY}}", fam.name)
                      .replace("{{RESOLUTION}}", str(resolution)).replace("{{STEPS}}", str(steps))
                      .replace("{{VARIANT}}", manifest["default_variant"]), encoding="utf-8")
    return {"path": "swift", "manifest": f"swift/{MANIFEST}", "compiled": False, "reason": NOT_COMPILED,
            "default_variant": manifest["default_variant"], "sampler": manifest["sampler"]["kind"],
            "files": sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())}


def missing_resources(swift_dir: Path) -> list[str]:
    """What ``resources.json`` names that is absent or has other shapes than it says (empty: all good).

    Shapes of every package are read from its spec with coremltools (no Core ML runtime needed).
    """
    swift_dir = Path(swift_dir)
    manifest = json.loads((swift_dir / MANIFEST).read_text(encoding="utf-8"))
    problems = []
    files = [manifest["sampler"]["scheduler_config"]]
    for t in manifest["tokenizers"].values():
        files += [t["vocab"], t["merges"]]
    problems += [f"{f}: not found" for f in files if not (swift_dir / f).is_file()]
    for enc in manifest["conditioning"]["encoders"]:
        if enc not in manifest["models"] or enc not in manifest["tokenizers"]:
            problems.append(f"conditioning encoder {enc}: no model or tokenizer entry")
    for key in ("denoiser", "vae_decoder"):
        if key not in manifest["models"]:
            problems.append(f"models.{key}: missing (the app needs it)")
    if manifest["default_variant"] not in manifest["models"].get("denoiser", {}).get("packages", {}):
        problems.append(f"default_variant {manifest['default_variant']}: no such denoiser package")
    for name, entry in manifest["models"].items():
        for variant, rel in entry["packages"].items():
            path = swift_dir / rel
            if not (path / "Manifest.json").is_file():
                problems.append(f"{name} {variant}: {rel} is not a .mlpackage")
                continue
            got = package_io(path)
            want = {k: [(i["name"], list(i["shape"])) for i in entry[k]] for k in ("inputs", "outputs")}
            if got != want:
                problems.append(f"{name} {variant}: {rel} has {got}, resources.json says {want}")
    steps = manifest["steps"]
    s = manifest["sampler"]
    if not (len(s["timesteps"]) == len(s["input_scales"]) == steps and len(s["sigmas"]) == steps + 1):
        problems.append(f"sampler: {steps} steps need {steps} timesteps/input_scales and {steps + 1} sigmas")
    return problems


def package_io(path: Path) -> dict[str, list[tuple[str, list[int]]]]:
    """(name, shape) of the inputs and outputs of a .mlpackage, from its spec (works off macOS)."""
    from stunning.export.coreml import _coremltools, spec_io

    io = spec_io(_coremltools().utils.load_spec(str(path)))
    return {k: [(i["name"], i["shape"]) for i in items] for k, items in io.items()}


def mirror_sample(pipe: Any, parts: dict[str, Any], manifest: dict[str, Any], prompt: str, noise):
    """The Swift app's text -> latents loop (Pipeline.swift ``generate``) in torch, on the torch parts
    (:class:`~stunning.export.components.Component` by name): conditioning by the manifest's rule,
    the manifest's schedule, classifier-free guidance. Returns the final latents."""
    import torch

    cond = manifest["conditioning"]
    batch = manifest["batch"]

    def encode(text: str):
        hidden, pooled = [], []
        for enc in cond["encoders"]:
            tok = getattr(pipe, enc.replace("text_encoder", "tokenizer"))
            ids = tok([text] * batch, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(torch.int32)
            out = parts[enc].module(ids)
            out = out if isinstance(out, tuple) else (out,)
            hidden.append(out[0])
            if len(out) > 1:
                pooled.append(out[1])
        h = torch.cat(hidden, dim=-1)
        width = max(cond["pad_to"], h.shape[-1])
        h = torch.nn.functional.pad(h, (0, width - h.shape[-1]))
        h = torch.cat([h, h.new_zeros(h.shape[0], cond["zero_tokens"], width)], dim=1)
        return h, (torch.cat(pooled, dim=-1) if pooled else None)

    s = manifest["sampler"]
    den = parts["denoiser"]
    with torch.no_grad():
        (c, pc), (u, pu) = encode(prompt), encode("")
        x = noise * s["init_noise_sigma"]
        g = manifest["guidance_scale"]
        for i, t in enumerate(s["timesteps"]):
            xi = x * s["input_scales"][i]
            feed = []
            for spec in den.inputs:
                if spec.name == "timestep":
                    feed.append(torch.full(spec.shape, t))
                elif spec.name == "encoder_hidden_states":
                    feed.append(torch.cat([u, c]))
                elif spec.name == "pooled_projections":
                    feed.append(torch.cat([pu, pc]))
                else:
                    feed.append(torch.cat([xi, xi]))
            pred = den.module(*feed)
            pu_, pc_ = pred.chunk(2)
            x = x + (s["sigmas"][i + 1] - s["sigmas"][i]) * (pu_ + g * (pc_ - pu_))
    return x
