"""A diffusers folder as one original-layout checkpoint (what webui, Forge and ComfyUI load).

The inverse of diffusers' ``from_single_file`` converters, for a fine-tuned or LoRA-fused
model saved with ``save_pretrained``. :func:`stunning.model_source.resolve_base` reads the
file back, and the tests check that round trip tensor by tensor. Layouts written:

- ``sd-unet`` (SD 1.x/2.x): ``model.diffusion_model.*`` (LDM UNet), ``first_stage_model.*``
  (VAE), ``cond_stage_model.transformer.text_model.*`` (the CLIP text encoder);
- ``sdxl``: the same UNet and VAE layouts, ``conditioner.embedders.0.transformer.*`` (CLIP-L,
  transformers layout) and ``conditioner.embedders.1.model.*`` (the OpenCLIP layout of the
  second encoder: fused q/k/v ``in_proj``, transposed ``text_projection``), as in
  ``sd_xl_base_1.0.safetensors``;
- ``sd3`` (SD3/3.5): ``model.diffusion_model.*`` in the MMDiT layout (fused q/k/v, adaLN
  modulation, shift/scale order swapped where diffusers swaps it) and, unless ``vae=False``,
  ``first_stage_model.*``. Text encoders are not written (Stability ships SD3.5's separately);
  on the way back they come from the config folder.

FLUX.1 is not written: diffusers' FLUX converter assumes FLUX.1's width (3072, MLP ratio 4)
when it splits the single blocks' fused projection, so only a full-size FLUX checkpoint
converts back, and that cannot be round-tripped (or tested) here. Train FLUX adapters and
share them as LoRA files instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from stunning.families import check_model_dir, get_family
from stunning.io import canonicalize_safetensors

EXPORTABLE = ("sd-unet", "sdxl", "sd3")

# diffusers' resnet parameter names -> the original (LDM) ones, for the UNet and the VAE.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."


def _rename(rest: str, table: dict[str, str]) -> str:
    head, _, param = rest.rpartition(".")
    return f"{table.get(head, head)}.{param}"


def ldm_unet_key(key: str, layers_per_block: int, up_has_attention: dict[int, bool]) -> str:
    """The original (LDM/webui) name of a diffusers SD-1.x/2.x/XL UNet parameter.

    Inverse of diffusers' ``convert_ldm_unet_checkpoint``: down block b, layer j is
    ``input_blocks.{1 + b(L+1) + j}`` (resnet at .0, transformer at .1), its downsampler
    ``input_blocks.{(b+1)(L+1)}.0.op``; the middle block is resnet/transformer/resnet; up block
    b, layer j is ``output_blocks.{b(L+1) + j}`` with the upsampler after the block's last layer.
    SDXL's size/pooled-text embedding (``add_embedding``) is ``label_emb.0``.
    """
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    mapping = DIFFUSERS_TO_LDM_MAPPING["unet"]
    for table in (mapping["layers"], mapping["addition_embed_type"]):
        if key in table:
            return table[key]
    per = layers_per_block + 1
    parts = key.split(".")
    if parts[0] == "down_blocks":
        b, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.<param>
            return f"input_blocks.{(b + 1) * per}.0.op.{parts[-1]}"
        j, rest = int(parts[3]), ".".join(parts[4:])
        index = 1 + b * per + j
        return (f"input_blocks.{index}.0.{_rename(rest, _UNET_RESNET)}" if kind == "resnets"
                else f"input_blocks.{index}.1.{rest}")
    if parts[0] == "mid_block":
        k, rest = int(parts[2]), ".".join(parts[3:])
        return (f"middle_block.{2 * k}.{_rename(rest, _UNET_RESNET)}" if parts[1] == "resnets"
                else f"middle_block.1.{rest}")
    if parts[0] == "up_blocks":
        b, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            slot = 2 if up_has_attention[b] else 1
            return f"output_blocks.{b * per + layers_per_block}.{slot}.conv.{parts[-1]}"
        j, rest = int(parts[3]), ".".join(parts[4:])
        index = b * per + j
        return (f"output_blocks.{index}.0.{_rename(rest, _UNET_RESNET)}" if kind == "resnets"
                else f"output_blocks.{index}.1.{rest}")
    raise ValueError(f"UNet parameter {key!r} has no place in the original SD layout")


def ldm_vae_key(key: str, num_blocks: int) -> str:
    """The original (LDM) name of a diffusers AutoencoderKL parameter (inverse of ``convert_ldm_vae_checkpoint``).

    The decoder's up blocks are numbered in reverse in the original layout.
    """
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in top:
        return top[key]
    parts = key.split(".")
    coder, where = parts[0], parts[1]
    if where == "mid_block":
        k, rest = int(parts[3]), ".".join(parts[4:])
        if parts[2] == "resnets":
            return f"{coder}.mid.block_{k + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{coder}.mid.attn_1.{_rename(rest, _VAE_ATTENTION)}"
    if where in ("down_blocks", "up_blocks"):
        i = int(parts[2])
        block, name = (f"down.{i}", "downsample") if where == "down_blocks" else (f"up.{num_blocks - 1 - i}", "upsample")
        if parts[3] in ("downsamplers", "upsamplers"):
            return f"{coder}.{block}.{name}.conv.{parts[-1]}"
        j, rest = int(parts[4]), ".".join(parts[5:])
        return f"{coder}.{block}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    raise ValueError(f"VAE parameter {key!r} has no place in the original layout")


def unet_tensors(unet) -> Iterator[tuple[str, torch.Tensor]]:
    """A diffusers UNet2DConditionModel's weights under their LDM names (without a prefix)."""
    cfg = unet.config
    up_attn = {b: "CrossAttn" in t for b, t in enumerate(cfg.up_block_types)}
    for k, v in unet.state_dict().items():
        yield ldm_unet_key(k, cfg.layers_per_block, up_attn), v


def vae_tensors(vae) -> Iterator[tuple[str, torch.Tensor]]:
    """A diffusers AutoencoderKL's weights under their LDM names (without a prefix)."""
    n = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        name = ldm_vae_key(k, n)
        if ".mid.attn_1." in name and name.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        yield name, v


def clip_tensors(text_encoder) -> Iterator[tuple[str, torch.Tensor]]:
    """A transformers CLIP text encoder's weights in the original checkpoints' `text_model.` naming."""
    for k, v in text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel; the original checkpoints keep `text_model.`
        yield (k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k), v


def open_clip_tensors(text_encoder) -> Iterator[tuple[str, torch.Tensor]]:
    """A CLIPTextModelWithProjection's weights in the OpenCLIP layout (inverse of ``convert_open_clip_checkpoint``)."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    yield "token_embedding.weight", sd.pop("embeddings.token_embedding.weight")
    yield "positional_embedding", sd.pop("embeddings.position_embedding.weight")
    yield "text_projection", sd.pop("text_projection.weight").T.contiguous()
    for part in ("weight", "bias"):
        yield f"ln_final.{part}", sd.pop(f"final_layer_norm.{part}")
    sd.pop("embeddings.position_ids", None)  # a buffer some transformers versions save
    for i in range(text_encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            yield dst + f"attn.in_proj_{part}", torch.cat(
                [sd.pop(src + f"self_attn.{p}_proj.{part}") for p in ("q", "k", "v")])
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                yield dst + f"{theirs}.{part}", sd.pop(src + f"{ours}.{part}")
    if sd:
        raise ValueError(f"text encoder parameters with no OpenCLIP name: {sorted(sd)[:5]}")


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along dim 0: diffusers orders adaLN outputs (scale, shift), the original (shift, scale)."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def mmdit_tensors(transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """An SD3Transformer2DModel's weights in the original MMDiT layout (inverse of diffusers' SD3 converter)."""
    sd = dict(transformer.state_dict())
    renames = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
               "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
               "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
               "context_embedder": "context_embedder", "proj_out": "final_layer.linear"}
    for ours, theirs in renames.items():
        if ours in sd:  # a parameter (pos_embed), not a module
            yield theirs, sd.pop(ours)
            continue
        for part in ("weight", "bias"):
            yield f"{theirs}.{part}", sd.pop(f"{ours}.{part}")
    for part in ("weight", "bias"):
        yield f"final_layer.adaLN_modulation.1.{part}", _swap_halves(sd.pop(f"norm_out.linear.{part}"))
    last = transformer.config.num_layers - 1
    for i in range(transformer.config.num_layers):
        src, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        fused = [(x + "attn.", "attn.to_{}"), (c + "attn.", "attn.add_{}_proj")]
        if src + "attn2.to_q.weight" in sd:
            fused.append((x + "attn2.", "attn2.to_{}"))
        for dst, pattern in fused:
            for part in ("weight", "bias"):
                yield dst + f"qkv.{part}", torch.cat([sd.pop(src + pattern.format(p) + f".{part}") for p in "qkv"])
        pairs = [("attn.to_out.0", x + "attn.proj"), ("norm1.linear", x + "adaLN_modulation.1"),
                 ("ff.net.0.proj", x + "mlp.fc1"), ("ff.net.2", x + "mlp.fc2"),
                 ("attn.to_add_out", c + "attn.proj"), ("ff_context.net.0.proj", c + "mlp.fc1"),
                 ("ff_context.net.2", c + "mlp.fc2"), ("attn2.to_out.0", x + "attn2.proj")]
        for ours, theirs in pairs:
            for part in ("weight", "bias"):
                if src + f"{ours}.{part}" in sd:  # the last block's context side has no output path
                    yield f"{theirs}.{part}", sd.pop(src + f"{ours}.{part}")
        for part in ("weight", "bias"):
            modulation = sd.pop(src + f"norm1_context.linear.{part}")
            yield c + f"adaLN_modulation.1.{part}", _swap_halves(modulation) if i == last else modulation
        norms = [("attn.norm_q", x + "attn.ln_q"), ("attn.norm_k", x + "attn.ln_k"),
                 ("attn.norm_added_q", c + "attn.ln_q"), ("attn.norm_added_k", c + "attn.ln_k"),
                 ("attn2.norm_q", x + "attn2.ln_q"), ("attn2.norm_k", x + "attn2.ln_k")]
        for ours, theirs in norms:
            if src + f"{ours}.weight" in sd:  # SD3.5's RMS q/k norms
                yield f"{theirs}.weight", sd.pop(src + f"{ours}.weight")
    if sd:
        raise ValueError(f"SD3 transformer parameters with no MMDiT name: {sorted(sd)[:5]}")


def original_tensors(pipe, family: str, *, vae: bool = True) -> dict[str, torch.Tensor]:
    """Every weight of a loaded pipeline under its name in `family`'s original single-file layout."""
    out: dict[str, torch.Tensor] = {}

    def put(prefix: str, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        for name, value in tensors:
            out[prefix + name] = value

    if family in ("sd-unet", "sdxl"):
        put(UNET_PREFIX, unet_tensors(pipe.unet))
    elif family == "sd3":
        put(UNET_PREFIX, mmdit_tensors(pipe.transformer))
    else:
        raise ValueError(f"single-file export is implemented for {list(EXPORTABLE)}, not {family!r}")
    if vae:
        put(VAE_PREFIX, vae_tensors(pipe.vae))
    if family == "sd-unet":
        put("cond_stage_model.transformer.", clip_tensors(pipe.text_encoder))
    elif family == "sdxl":
        put("conditioner.embedders.0.transformer.", clip_tensors(pipe.text_encoder))
        put("conditioner.embedders.1.model.", open_clip_tensors(pipe.text_encoder_2))
    return out


def export_single_file(folder: str | Path, dst: str | Path, family: str = "sd-unet", *, vae: bool = True) -> Path:
    """Write a diffusers folder of `family` as one original-layout ``.safetensors`` file (atomically).

    `vae=False` leaves the VAE out (an SD3 "diffusion model only" file, as ComfyUI's
    ``diffusion_models`` folder holds); it is kept for the SD-UNet families, whose checkpoints
    always carry one.
    """
    from safetensors.torch import save_file

    if family not in EXPORTABLE:
        why = (" (diffusers converts FLUX files back only at FLUX.1's full width; share FLUX adapters as LoRA files)"
               if family == "flux" else "")
        raise ValueError(f"single-file export is implemented for {list(EXPORTABLE)}, not {family!r}{why}")
    folder, dst = Path(folder), Path(dst)
    check_model_dir(folder, get_family(family).required_components)
    pipe = get_family(family).load_pipeline(folder, torch.device("cpu"), torch.float32)
    tensors = original_tensors(pipe, family, vae=vae or family != "sd3")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt", "stunning.family": family, "stunning.exported_from": str(folder)})
    canonicalize_safetensors(tmp)
    os.replace(tmp, dst)
    return dst
