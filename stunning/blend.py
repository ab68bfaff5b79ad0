"""Adapter blends and fusion: mix style LoRAs into one LoRA, or bake one into the base.

A LoRA adapter adds ``ΔW = s · B A`` to a layer (``s = alpha / r``, or ``alpha / sqrt(r)``
with rsLoRA; Hu et al. 2021, arXiv:2106.09685). A weighted blend of styles is
``ΔW = Σ_i w_i s_i B_i A_i``, which is itself a LoRA of rank ``Σ_i r_i``: stack the ``A_i``
along the rank dimension and concatenate the ``B_i`` scaled by ``w_i s_i`` (PEFT's
``combination_type="cat"``). The blend is therefore exact, not an approximation, and is
saved with ``alpha == r`` (scale 1) so stock ``pipe.load_lora_weights(dir)`` applies it as is.

:func:`fuse` bakes an adapter (or blend) into the base weights and saves a full pipeline
folder that stock ``DiffusionPipeline.from_pretrained`` loads without PEFT.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from stunning.families.base import LORA_FILE
from stunning.io import atomic_dir, atomic_write_text

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata key (LORA_ADAPTER_METADATA_KEY)

# `<component>.<module path>.<down/up>.weight` in either diffusers layout: the older
# `lora.down`/`lora.up` names (what `convert_state_dict_to_diffusers` writes) or PEFT's
# `lora_A`/`lora_B`.
_KEY = re.compile(r"^(?P<comp>[^.]+)\.(?P<module>.+)\.(?P<kind>lora\.down|lora\.up|lora_A|lora_B)\.weight$")
_DOWN = {"lora.down": "lora.up", "lora_A": "lora_B"}

# LoraConfig fields that change what the saved tensors mean; blending them is not a sum of
# low-rank products, so such adapters are refused rather than blended wrongly.
_UNSUPPORTED_FLAGS = ("use_dora", "lora_bias")


class BlendError(ValueError):
    """An adapter cannot be blended (missing file, unsupported layout); the message says why."""


@dataclass
class LoraFile:
    """One diffusers-layout LoRA file: per component, per module, the (down, up) pair."""

    path: Path
    layers: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # comp -> module -> (A, B)
    configs: dict[str, dict[str, Any]]  # comp -> LoraConfig dict (empty if the file has none)
    naming: tuple[str, str] = ("lora.down", "lora.up")
    family: str | None = None  # the `stunning.family` metadata of adapters this project trained

    def scale(self, comp: str, module: str) -> float:
        """The factor PEFT multiplies ``B A`` by for this module once diffusers loads the file."""
        a, _ = self.layers[comp][module]
        rank = int(a.shape[0])
        cfg = self.configs.get(comp) or {}
        if not cfg:
            # No metadata and no network alphas: diffusers sets alpha = r, i.e. scale 1.
            return 1.0
        from peft.utils.other import get_pattern_key

        alpha_pattern = cfg.get("alpha_pattern") or {}
        alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), cfg.get("lora_alpha", rank)))
        return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


@dataclass
class BlendResult:
    path: Path
    rank: dict[str, int]  # comp -> most common rank of the blended layers
    layers: int
    weights: dict[str, float]
    sources: dict[str, str] = field(default_factory=dict)


def adapter_file(adapter_dir: str | Path) -> Path:
    """The LoRA weights file of an adapter folder (or the file itself), checked to exist."""
    p = Path(adapter_dir)
    f = p if p.is_file() else p / LORA_FILE
    if not f.is_file():
        raise BlendError(
            f"no LoRA weights at {f}: expected a folder holding {LORA_FILE} "
            "(as written by the train stage or `pipe.save_lora_weights`)."
        )
    return f


def read_lora(adapter_dir: str | Path) -> LoraFile:
    """Read a diffusers-layout LoRA file and its adapter metadata (per component)."""
    from safetensors import safe_open

    path = adapter_file(adapter_dir)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    configs: dict[str, dict[str, Any]] = {}
    if METADATA_KEY in meta:
        for key, value in json.loads(meta[METADATA_KEY]).items():
            comp, _, name = key.partition(".")
            configs.setdefault(comp, {})[name] = value
    for comp, cfg in configs.items():
        for flag in _UNSUPPORTED_FLAGS:
            if cfg.get(flag):
                raise BlendError(f"{path}: component {comp!r} uses {flag}=true, which cannot be blended by concatenation.")

    downs: dict[tuple[str, str], torch.Tensor] = {}
    ups: dict[tuple[str, str], torch.Tensor] = {}
    naming: tuple[str, str] | None = None
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise BlendError(
                f"{path}: unsupported tensor {key!r}; only diffusers/PEFT LoRA down/up weights "
                "(no alphas, DoRA magnitudes or LoRA biases) can be blended."
            )
        kind = m["kind"]
        slot = (m["comp"], m["module"])
        if kind in _DOWN:
            downs[slot] = t
            naming = naming or (kind, _DOWN[kind])
        else:
            ups[slot] = t
    if not downs:
        raise BlendError(f"{path}: contains no LoRA weights.")
    if set(downs) != set(ups):
        odd = sorted(set(downs) ^ set(ups))[:3]
        raise BlendError(f"{path}: unpaired LoRA down/up weights for modules {odd}.")
    layers: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for (comp, module), a in downs.items():
        b = ups[(comp, module)]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise BlendError(
                f"{path}: {comp}.{module} has down {tuple(a.shape)} / up {tuple(b.shape)}; "
                "only Linear LoRA layers can be blended."
            )
        layers.setdefault(comp, {})[module] = (a.float(), b.float())
    from stunning.families import METADATA_PREFIX

    return LoraFile(path=path, layers=layers, configs=configs, naming=naming or ("lora.down", "lora.up"),
                    family=meta.get(f"{METADATA_PREFIX}family") or None)


def _check_weights(adapter_dirs: Mapping[str, Path], weights: Mapping[str, float]) -> None:
    if not weights:
        raise BlendError("a blend needs at least one style weight (merge.blends[*].weights).")
    missing = sorted(set(weights) - set(adapter_dirs))
    if missing:
        raise BlendError(f"blend weights name styles {missing} with no adapter; adapters: {sorted(adapter_dirs)}.")
    for style, w in weights.items():
        if not math.isfinite(float(w)):
            raise BlendError(f"blend weight for {style!r} is {w}; use a finite number.")


def blend_loras(loras: Mapping[str, LoraFile], weights: Mapping[str, float]):
    """The concatenated LoRA: per comp/module ``(A_cat, B_cat)`` with ``B_cat A_cat = Σ w_i s_i B_i A_i``.

    Also returns the source LoraConfig dicts per component (empty dicts for files without
    metadata). A module targeted by only some adapters gets the ranks of those only.
    """
    import torch

    out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    templates: dict[str, list[dict[str, Any]]] = {}
    for style, w in weights.items():
        lora = loras[style]
        for comp, mods in lora.layers.items():
            templates.setdefault(comp, []).append(dict(lora.configs.get(comp) or {}))
            dest = out.setdefault(comp, {})
            for module, (a, b) in mods.items():
                # Fold weight and scale into B so the blend is saved with scale 1.
                b_scaled = b * (float(w) * lora.scale(comp, module))
                if module in dest:
                    a0, b0 = dest[module]
                    if b0.shape[0] != b.shape[0] or a0.shape[1] != a.shape[1]:
                        raise BlendError(
                            f"{lora.path}: {comp}.{module} has shape {tuple(b.shape[:1]) + tuple(a.shape[1:])} "
                            f"but another adapter has {tuple(b0.shape[:1]) + tuple(a0.shape[1:])}: "
                            "adapters of different base models cannot be blended."
                        )
                    dest[module] = (torch.cat([a0, a], dim=0), torch.cat([b0, b_scaled], dim=1))
                else:
                    dest[module] = (a.clone(), b_scaled)
    return out, templates


def _blend_config(sources: list[dict[str, Any]], mods: Mapping[str, tuple[Any, Any]]) -> dict[str, Any]:
    """LoraConfig dict for the blend: alpha == r for every module, so every scale is 1."""
    from collections import Counter

    ranks = {module: int(a.shape[0]) for module, (a, _) in mods.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    # Full module paths as patterns: PEFT matches `(.*\.)?(pattern)$`, so each names one module.
    pattern = {re.escape(m): rk for m, rk in sorted(ranks.items()) if rk != r}
    cfg = dict(next((s for s in sources if s), {"peft_type": "LORA", "bias": "none"}))
    cfg.update(
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        use_dora=False,
        init_lora_weights=True,
        lora_dropout=0.0,
    )
    # The union of the sources' target lists covers every blended module; without metadata
    # (or with regex targets) the exact module paths do.
    lists = [s.get("target_modules") for s in sources]
    if all(isinstance(t, list) and t for t in lists):
        cfg["target_modules"] = sorted({t for lst in lists for t in lst})
    else:
        cfg["target_modules"] = sorted(ranks)
    return cfg


def blend_adapters(
    adapter_dirs: Mapping[str, str | Path],
    weights: Mapping[str, float],
    out_dir: str | Path,
    name: str | None = None,
) -> BlendResult:
    """Blend style adapters into one diffusers-layout LoRA at ``out_dir`` (published atomically).

    ``out_dir`` receives ``pytorch_lora_weights.safetensors`` (loadable with stock
    ``pipe.load_lora_weights``) and ``blend.yaml`` (the blend: name, weights, sources, ranks).
    """
    adapter_dirs = {k: Path(v) for k, v in adapter_dirs.items()}
    weights = {k: float(v) for k, v in weights.items()}
    _check_weights(adapter_dirs, weights)
    loras = {style: read_lora(adapter_dirs[style]) for style in weights}
    blended, templates = blend_loras(loras, weights)
    family = _family_of(blended, loras)
    naming = next(iter(loras.values())).naming

    layers_by_comp: dict[str, dict[str, torch.Tensor]] = {}
    configs: dict[str, dict[str, Any]] = {}
    ranks: dict[str, int] = {}
    for comp, mods in blended.items():
        cfg = _blend_config(templates[comp], mods)
        ranks[comp] = int(cfg["r"])
        layers: dict[str, torch.Tensor] = {}
        for module, (a, b) in sorted(mods.items()):
            layers[f"{module}.{naming[0]}.weight"] = a.contiguous()
            layers[f"{module}.{naming[1]}.weight"] = b.contiguous()
        layers_by_comp[comp] = layers
        configs[comp] = cfg

    out_dir = Path(out_dir)
    sources = {s: str(loras[s].path) for s in weights}
    spec = {
        "name": name or out_dir.name,
        "weights": weights,
        "sources": sources,
        "rank": ranks,
        "combination": "cat (exact weighted sum of LoRA deltas, scale folded into B, alpha = r)",
    }
    from stunning.families import write_lora_metadata

    with atomic_dir(out_dir) as tmp:
        family.save_lora_layers(tmp, layers_by_comp, configs)
        write_lora_metadata(tmp / LORA_FILE, {"family": family.name, "blend": spec["name"]})
        atomic_write_text(tmp / "blend.yaml", yaml.safe_dump(spec, sort_keys=False))
    n_layers = sum(len(m) for m in blended.values())
    log.info("blend %s (%s) -> %s: %d layers, rank %s", spec["name"], weights, out_dir, n_layers, ranks)
    return BlendResult(path=out_dir / LORA_FILE, rank=ranks, layers=n_layers, weights=weights, sources=sources)


def _family_of(blended: Mapping[str, Any], loras: Mapping[str, LoraFile]):
    """The model family whose LoRA layout the blend is saved in.

    The sources' `stunning.family` metadata where they have it (they must agree); otherwise
    from the components: `transformer` is saved like sd3 (flux's layout is the same), `unet`
    like sd-unet.
    """
    from stunning.families import get_family

    named = {style: lora.family for style, lora in loras.items() if lora.family}
    if len(set(named.values())) > 1:
        raise BlendError(f"adapters were trained for different model families ({named}); blend adapters of one "
                         "family only.")
    if named:
        family = get_family(next(iter(named.values())))
        if family.lora_component not in blended:
            raise BlendError(f"adapters say family {family.name} but hold no {family.lora_component} LoRA weights "
                             f"(components: {sorted(blended)}).")
    elif "transformer" in blended:
        family = get_family("sd3")
    elif "unet" in blended:
        family = get_family("sd-unet")
    else:
        raise BlendError(f"adapters hold LoRA weights for components {sorted(blended)}; expected unet or transformer.")
    allowed = {family.lora_component, "text_encoder", "text_encoder_2"}
    unknown = sorted(set(blended) - allowed)
    if unknown:
        raise BlendError(f"adapters hold LoRA weights for components {unknown}; {family.name} blends {sorted(allowed)}.")
    return family


def lora_deltas(lora: LoraFile, weight: float = 1.0) -> dict[str, dict[str, torch.Tensor]]:
    """``w · s · B A`` per comp/module: the weight change the adapter makes (for checks and tests)."""
    return {
        comp: {m: weight * lora.scale(comp, m) * (b @ a) for m, (a, b) in mods.items()}
        for comp, mods in lora.layers.items()
    }


def fuse(
    base_path: str | Path,
    family: Any,
    lora_dir: str | Path,
    out_dir: str | Path,
    lora_scale: float = 1.0,
) -> Path:
    """Bake the LoRA at ``lora_dir`` into the base and save the full pipeline at ``out_dir``.

    Loads and fuses in float32 on the CPU so the saved weights lose no precision to the
    compute dtype of an accelerator; the result loads with stock ``from_pretrained``.
    """
    import torch

    from stunning.families import complete_model_index

    lora_file = adapter_file(lora_dir)
    pipe = family.load_pipeline(Path(base_path), torch.device("cpu"), torch.float32)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="fused")
    pipe.fuse_lora(lora_scale=lora_scale, adapter_names=["fused"])
    # After fusing, the LoRA layers are no longer needed: unloading keeps the fused weights
    # and leaves plain modules, so the saved folder needs no PEFT to load.
    pipe.unload_lora_weights()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        complete_model_index(tmp, type(pipe))
        settings = Path(base_path) / "stunning.json"  # the project's per-model settings travel along
        if settings.is_file():
            atomic_write_text(tmp / settings.name, settings.read_text())
        atomic_write_text(
            tmp / "fused.yaml",
            yaml.safe_dump({"base": str(base_path), "lora": str(lora_file), "lora_scale": lora_scale}, sort_keys=False),
        )
    log.info("fused %s into %s -> %s", lora_file, base_path, out_dir)
    return out_dir
