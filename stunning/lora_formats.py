"""LoRA files in other tools' key layouts: kohya/webui and ComfyUI, from the diffusers layout.

The trainer saves adapters in the diffusers/PEFT layout (``<component>.<module>.lora_A.weight``
/ ``lora_B``, the LoRA config in the ``lora_adapter_metadata`` header), which diffusers loads.
Most people run their LoRAs in AUTOMATIC1111/Forge (webui), kohya's tools or ComfyUI, which
share one key layout, the one kohya's sd-scripts introduced:

    <prefix>_<module path with "." replaced by "_">.lora_down.weight   (= lora_A)
    <prefix>_<module path with "." replaced by "_">.lora_up.weight     (= lora_B)
    <prefix>_<module path with "." replaced by "_">.alpha              (the LoRA alpha, a scalar)

and apply ``W + (alpha / rank) · up @ down``. The ``.alpha`` tensor is what carries the
trained scale: a loader that finds none (e.g. ComfyUI on a diffusers-layout file) applies
scale 1, wrong whenever lora_alpha != rank.

Prefixes per component and family, from ComfyUI's LoRA key mapping (comfy/lora.py in
comfyanonymous/ComfyUI: ``model_lora_keys_unet`` maps ``lora_unet_<diffusers UNet weight>``
through ``comfy.utils.unet_to_diffusers`` for SD 1.x/SDXL, and ``lora_transformer_<diffusers
weight>`` - commented there as the OneTrainer format - through ``mmdit_to_diffusers`` (SD3) and
``flux_to_diffusers`` (FLUX), which also split diffusers' separate q/k/v onto the fused original
weights; ``model_lora_keys_clip`` maps ``lora_te_`` (SD 1.x CLIP-L), ``lora_te1_``/``lora_te2_``
(CLIP-L/CLIP-G of SDXL and SD3, CLIP-L of FLUX) + ``text_model_encoder_layers_<i>_<proj>``):

    sd-unet  unet → lora_unet, text_encoder → lora_te
    sdxl     unet → lora_unet, text_encoder → lora_te1, text_encoder_2 → lora_te2
    sd3      transformer → lora_transformer, text_encoder → lora_te1, text_encoder_2 → lora_te2
    flux     transformer → lora_transformer, text_encoder → lora_te1

ComfyUI also reads the diffusers ``transformer.*.lora_A`` layout for SD3/FLUX, but without
alphas, and does not read diffusers' current ``unet.*.lora_A`` names for SD 1.x/SDXL (the version read maps
only the older ``unet.*.processor.to_q`` form), so the kohya-style file is the one to share.
Stock diffusers reads this layout back for SD 1.x/SDXL (kohya) and FLUX (OneTrainer keys);
not for SD3. Layouts:

- ``diffusers``: the file as trained (copied, metadata kept);
- ``kohya``: the layout above, plus the ``ss_*`` header fields kohya's tools and webui show
  (``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``, ``ss_base_model_version``);
- ``comfyui``: the same tensors as ``kohya`` - ComfyUI reads that layout for all four families;
  the name exists so a user asking for "a ComfyUI LoRA" gets the right file.

Not written: kohya sd-scripts' own SD3/FLUX naming (``lora_unet_double_blocks_0_img_attn_qkv``,
original checkpoint module names with fused q/k/v), which ComfyUI and diffusers also read.
diffusers' ``convert_state_dict_to_kohya`` names UNet modules the same way (the tests check it)
but writes alpha = rank, names the SD 1.x text encoder ``lora_te1`` and knows no transformer
prefix, so the conversion is done here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from stunning.io import canonicalize_safetensors

LAYOUTS = ("diffusers", "kohya", "comfyui")

PREFIXES: dict[str, dict[str, str]] = {
    "sd-unet": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "sd3": {"transformer": "lora_transformer", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "flux": {"transformer": "lora_transformer", "text_encoder": "lora_te1"},
}
BASE_MODEL_VERSION = {"sd-unet": "sd_v1", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}
# diffusers' writers name the same two matrices three ways: PEFT's `lora_A`/`lora_B`, the older
# `lora.down`/`lora.up`, and `lora_linear_layer.down`/`.up` (text encoders, through
# `convert_state_dict_to_diffusers`); all mean down = A, up = B.
DIFFUSERS_KEY = re.compile(
    r"^(?P<component>[a-z_0-9]+?)\.(?P<module>.+)\."
    r"(lora_(?P<ab>[AB])|lora\.(?P<updown>down|up)|lora_linear_layer\.(?P<lin>down|up))\.weight$"
)
# transformers >= 5.6 flattened `CLIPTextModel` (no `text_model.` level); the key layouts
# (webui, ComfyUI's LORA_CLIP_MAP) name CLIP layers `..._text_model_encoder_layers_<i>_...`.
CLIP_TOP_LEVEL = ("embeddings.", "encoder.", "final_layer_norm.")


def adapter_alphas(header: dict[str, str]) -> dict[str, tuple[float, dict[str, float]]]:
    """Per component: (lora_alpha, alpha_pattern) from a diffusers LoRA file's header.

    diffusers writes the LoraConfig as ``lora_adapter_metadata`` (``"<component>.<field>"``
    keys); without it the project's ``stunning.alpha`` applies; without either, alpha = rank
    (scale 1, what diffusers assumes for a file without metadata) is signalled by {}.
    """
    out: dict[str, tuple[float, dict[str, float]]] = {}
    raw = header.get("lora_adapter_metadata")
    if raw:
        meta = json.loads(raw)
        for key, value in meta.items():
            component, _, field = key.partition(".")
            if field == "lora_alpha":
                pattern = meta.get(f"{component}.alpha_pattern") or {}
                out[component] = (float(value), {k: float(v) for k, v in pattern.items()})
    if not out and "stunning.alpha" in header:
        out["*"] = (float(header["stunning.alpha"]), {})
    return out


def _alpha_for(alphas, component: str, module: str, rank: int) -> float:
    alpha, pattern = alphas.get(component) or alphas.get("*") or (float(rank), {})
    for key, value in pattern.items():  # PEFT's alpha_pattern: per-module overrides, matched by suffix
        if module == key or module.endswith("." + key):
            return value
    return alpha


def to_kohya(tensors: dict[str, torch.Tensor], header: dict[str, str], family: str) -> dict[str, torch.Tensor]:
    """The kohya/ComfyUI state dict of a diffusers-layout LoRA state dict (see the module docstring)."""
    if family not in PREFIXES:
        raise ValueError(f"no kohya/ComfyUI key layout for family {family!r}; known: {sorted(PREFIXES)}")
    prefixes = PREFIXES[family]
    alphas = adapter_alphas(header)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        m = DIFFUSERS_KEY.match(key)
        if m is None:
            raise ValueError(f"{key!r} is not a diffusers LoRA key (<component>.<module>.lora_A/B.weight, "
                             ".lora.down/up.weight or .lora_linear_layer.down/up.weight)")
        component, module = m["component"], m["module"]
        is_down = m["ab"] == "A" or "down" in (m["updown"], m["lin"])
        if component.startswith("text_encoder") and module.startswith(CLIP_TOP_LEVEL):
            module = "text_model." + module
        if component not in prefixes:
            raise ValueError(f"{family} LoRA files hold {sorted(prefixes)} layers; {key!r} belongs to {component!r}")
        name = f"{prefixes[component]}_{module.replace('.', '_')}"
        out[f"{name}.{'lora_down' if is_down else 'lora_up'}.weight"] = tensor.contiguous()
        if is_down:
            rank = tensor.shape[0]
            out[f"{name}.alpha"] = torch.tensor(_alpha_for(alphas, component, module, rank), dtype=torch.float32)
    return out


def convert_lora_file(src: str | Path, dst: str | Path, layout: str, family: str) -> Path:
    """Write the diffusers-layout LoRA file `src` as `layout` to `dst` (atomically); return `dst`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; choose one of {list(LAYOUTS)}")
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no LoRA file there (train first, or pass the adapter's .safetensors)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    if layout == "diffusers":
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        return dst
    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    converted = to_kohya(tensors, header, family)
    ranks = sorted({int(t.shape[0]) for k, t in converted.items() if k.endswith("lora_down.weight")})
    alphas = sorted({float(t) for k, t in converted.items() if k.endswith(".alpha")})
    meta = {k: v for k, v in header.items() if k.startswith("stunning.")}
    meta.update({
        "format": "pt",
        "stunning.layout": layout,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": (f"{alphas[0]:g}" if len(alphas) == 1 else "Dynamic"),
        "ss_base_model_version": BASE_MODEL_VERSION[family],
    })
    if "stunning.trigger_words" in header:
        meta["ss_tag_frequency"] = json.dumps({"trigger": {w: 1 for w in json.loads(header["stunning.trigger_words"])}})
    save_file(converted, str(tmp), metadata=meta)
    canonicalize_safetensors(tmp)
    os.replace(tmp, dst)
    return dst
