"""Research phase: will a candidate base model fit this machine, and at which precision?

For each candidate in `params.research.candidates` (an embedded preset or a local diffusers
folder) the component configs are read, each model is instantiated on PyTorch's `meta`
device (shapes only, no memory allocated, no weights read) and its parameters counted.
Memory for inference and for LoRA training is then estimated at fp32/bf16/fp16/int8/int4 and
compared with the machine's memory budget. The LoRA adapter sized is the one training makes:
`train.rank` on the denoiser's layers named by `train.target_modules` (within
`train.target_blocks`), counted on each candidate's own module tree, so the same target list
can match a different number of layers in each candidate. The result is the fit report
(`reports/research.json` + a Markdown table) and the plan: the base model named by
`params.base` at the highest precision whose LoRA training fits on the probed device, among
the precisions the trainer runs there (:func:`training_precisions`: `train.base_precision`,
whose `auto` takes the plan; int8/int4 quantize the frozen denoiser, QLoRA).

The activation terms are a coarse, documented heuristic (see :data:`HEURISTIC`), good to
within a factor of about 1.5 for Stable-Diffusion-like models: enough to tell "fits easily"
from "will swap" from "cannot run", which is all a plan needs. Checked against the trainer's
measured peak (process RSS high-water mark, CPU): the shipped micro model and a tiny SD-1.5
UNet at fp32/bf16/int8/int4 come out at 0.88-0.99x of the measured peak (scripts/bench_qlora.py;
tests/unit/test_research.py checks fp32 and int8 within 20 %). On such small models the 0.5 GB
runtime term (torch + diffusers + transformers imported: ~0.50 GB RSS measured) dominates, so
the check confirms that term and the structure, not the per-parameter bytes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stunning.config import BaseModelConfig, ConfigError, ResearchCandidate, ResearchConfig, TrainConfig

log = logging.getLogger(__name__)

GB = 1024**3

# Bytes per weight at each precision; int4 packs two weights per byte.
BYTES_PER_PARAM: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
# Highest precision first: the plan takes the first one that fits.
PRECISION_ORDER = ("fp32", "bf16", "fp16", "int8", "int4")

# The attention projections every family has (q/k/v/out), for sizing an attention-only
# adapter by hand (tests, benchmarks). Not a default: the research phase sizes the
# configured adapter (train.rank, train.target_modules, train.target_blocks).
ATTENTION_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# Precisions whose frozen denoiser is quantized (train.base_precision int8/int4): only the
# denoiser's weights are; the VAE, the text encoders and the denoiser's norms/embeddings stay
# in the compute type (see stunning/training/quantized.py).
QUANTIZED = ("int8", "int4")

# The memory heuristic, written into every report so a reader can check the arithmetic.
HEURISTIC: dict[str, Any] = {
    "weights_overhead": 0.20,  # allocator fragmentation, buffers, temporary casts: +20% of weights
    "runtime_overhead_gb": 0.5,  # the framework itself (CUDA context, or torch + diffusers in RAM)
    # Denoiser activations alive at once for one sample, in elements:
    #   feature_maps * tokens * width  +  heads * attn_tokens**2
    # tokens = latent pixels (or patches) at the top level, width = the top level's channels,
    # the second term is the attention score matrix of the highest-resolution attention
    # layer (materialised on CPU/MPS and without memory-efficient attention kernels).
    "feature_maps": 16,
    # The VAE decoder at full resolution: vae_feature_maps * resolution**2 * first channels.
    "vae_feature_maps": 6,
    "cfg_batch": 2,  # classifier-free guidance runs the denoiser on 2 samples per image
    # Training keeps the activations of every block for the backward pass; about this many
    # times a forward pass's peak for SD-like UNets without gradient checkpointing.
    "train_activation_factor": 8,
    # Trainable LoRA parameters are fp32: weight + gradient + two Adam moments.
    "lora_bytes_per_param": 16,
    # Activations are computed in fp32 for fp32 weights, in half precision for half weights;
    # quantized weights are dequantized to the compute type: float32 on a CPU (the trainer's
    # mixed_precision auto), fp16/bf16 on a GPU or MPS.
    "activation_bytes": {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 2, "int4": 2},
    "quantized_compute_bytes": {"cpu": 4, "cuda": 2, "mps": 2},
    # On a CPU an int8/int4 run loads the pipeline in float32 before quantizing the denoiser:
    # the load holds every weight at 4 bytes once (on a GPU it is loaded on the CPU, and only
    # the quantized denoiser reaches device memory).
    "quantized_cpu_load_bytes": 4,
    "tight_fraction": 0.8,  # above 80% of the budget: "tight"
    "batch_size": 1,
    "resolution": "native: denoiser sample_size x VAE scale factor",
}

# Component classes when a config dict does not name its own (embedded preset dicts).
DEFAULT_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}
DENOISER_NAMES = ("unet", "transformer", "prior")


# --------------------------------------------------------------------------- presets


def sd15_reference_configs() -> dict[str, dict[str, Any]]:
    """Stable Diffusion 1.5's component configs (from its published config.json files)."""
    return {
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "center_input_sample": False,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "act_fn": "silu",
            "norm_num_groups": 32,
            "norm_eps": 1e-05,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        },
        "vae": {
            "_class_name": "AutoencoderKL",
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
            "act_fn": "silu",
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": 512,
        },
        "text_encoder": {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
    }


def _embedded_micro_configs() -> dict[str, dict[str, Any]]:
    """The shipped micro model (SD3 layout), with the class of each component named."""
    from stunning.embedded import micro_configs

    cfg = micro_configs()
    clip = {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model"}
    return {
        "transformer": {"_class_name": "SD3Transformer2DModel", **cfg["transformer"]},
        "vae": {"_class_name": "AutoencoderKL", **cfg["vae"]},
        "text_encoder": {**clip, **cfg["text_encoder"]},
        "text_encoder_2": {**clip, **cfg["text_encoder_2"]},
    }


PRESETS = {"embedded-micro": _embedded_micro_configs, "sd15-reference": sd15_reference_configs}


# --------------------------------------------------------------------------- meta instantiation


def resolve_class(class_name: str, library: str | None = None) -> type:
    """The diffusers or transformers class called `class_name` (diffusers tried first)."""
    import importlib

    libraries = [library] if library in ("diffusers", "transformers") else ["diffusers", "transformers"]
    for lib in libraries:
        module = importlib.import_module(lib)
        cls = getattr(module, class_name, None)
        if isinstance(cls, type):
            return cls
    raise ValueError(f"unknown model class {class_name!r}: not found in {' or '.join(libraries)}")


def instantiate_meta(class_name: str, config: Mapping[str, Any], library: str | None = None):
    """Build the model on the `meta` device: real module tree and shapes, no storage."""
    import torch

    cls = resolve_class(class_name, library)
    config = dict(config)
    with torch.device("meta"):
        if hasattr(cls, "from_config") and hasattr(cls, "config_name"):  # a diffusers ModelMixin
            return cls.from_config(config)
        config_class = getattr(cls, "config_class", None)
        if config_class is None:
            raise ValueError(f"{class_name} is neither a diffusers model nor a transformers PreTrainedModel")
        config.pop("architectures", None)
        return cls(config_class.from_dict(config))


def count_parameters(component_class_name: str, config_dict: Mapping[str, Any], library: str | None = None) -> int:
    """Number of parameters of `component_class_name(config_dict)`, computed without weights."""
    model = instantiate_meta(component_class_name, config_dict, library)
    return sum(p.numel() for p in model.parameters())


def _target_matcher(targets: Sequence[str], blocks: Sequence[str] = ()):
    r"""name -> bool: the rule the trainer gives PEFT (stunning.training.adapter.target_modules).

    Without blocks PEFT matches a module whose name equals a target or ends with
    `.<target>`; with blocks the trainer passes the regex ``(.*\.)?(blocks)\.(.*\.)?(targets)``,
    which PEFT full-matches against each module path.
    """
    if not blocks:
        return lambda name: any(name == t or name.endswith("." + t) for t in targets)
    block_alt = "|".join(re.escape(b.strip(".")) for b in blocks)
    target_alt = "|".join(re.escape(t) for t in targets)
    pattern = re.compile(rf"(.*\.)?({block_alt})\.(.*\.)?({target_alt})")
    return lambda name: pattern.fullmatch(name) is not None


def lora_layers(
    model, targets: Sequence[str], blocks: Sequence[str] = ()
) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every layer PEFT would adapt for these targets.

    Linear layers, and Conv2d layers (LoRA on a convolution: A is a conv with the layer's
    kernel, B a 1x1 conv; `in_features` is then in_channels x kernel area), whose name
    matches `targets` (within `blocks`, if any) as the trainer asks PEFT to match them.
    """
    import torch

    matches = _target_matcher(targets, blocks)
    found = []
    for name, module in model.named_modules():
        if not matches(name):
            continue
        if isinstance(module, torch.nn.Linear):
            found.append((name, module.in_features, module.out_features))
        elif isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            found.append((name, module.in_channels * kh * kw, module.out_channels))
    return found


def lora_parameter_count(layers: list[tuple[str, int, int]], rank: int) -> int:
    """LoRA adds A (rank x in) and B (out x rank) per layer: rank * (in + out) parameters."""
    return sum(rank * (fin + fout) for _, fin, fout in layers)


# --------------------------------------------------------------------------- candidates


@dataclass
class Component:
    name: str
    class_name: str
    library: str | None
    config: dict[str, Any] = field(repr=False)


def _class_of(name: str, config: Mapping[str, Any], index_entry: Any = None) -> tuple[str, str | None]:
    if config.get("_class_name"):
        return str(config["_class_name"]), "diffusers"
    archs = config.get("architectures")
    if archs:
        return str(archs[0]), "transformers"
    if isinstance(index_entry, list | tuple) and len(index_entry) == 2 and index_entry[1]:
        return str(index_entry[1]), str(index_entry[0]) if index_entry[0] else None
    base = "text_encoder" if name.startswith("text_encoder") else name
    if base in DEFAULT_CLASSES:
        return DEFAULT_CLASSES[base], None
    raise ValueError(f"component {name!r}: its config names no class (_class_name or architectures)")


def _is_sized_component(name: str) -> bool:
    return name in DENOISER_NAMES or name == "vae" or name.startswith("text_encoder")


def read_diffusers_folder(path: str | Path, where: str = "") -> list[Component]:
    """Component configs of a local diffusers folder (model_index.json + <component>/config.json).

    Only configs are read; weights are never opened. Raises :class:`ConfigError` naming the
    missing folder or file.
    """
    path = Path(path)
    prefix = f"{where}: " if where else ""
    if not path.is_dir():
        raise ConfigError(f"{prefix}model folder {path} does not exist. Point it at a local diffusers folder.")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ConfigError(
            f"{prefix}{index_file} not found: {path} is not a diffusers folder (saved with save_pretrained)."
        )
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{prefix}{index_file} is not valid JSON ({exc}).") from exc
    components = []
    for name in sorted(index):
        entry = index[name]
        if name.startswith("_") or not _is_sized_component(name):
            continue
        if isinstance(entry, list | tuple) and (len(entry) < 2 or entry[1] is None):
            continue  # e.g. "text_encoder_2": [null, null] — an optional component left out
        cfg_file = path / name / "config.json"
        if not cfg_file.parent.is_dir():
            raise ConfigError(f"{prefix}{path / name}/ is missing but model_index.json lists component {name!r}.")
        if not cfg_file.is_file():
            raise ConfigError(f"{prefix}{cfg_file} is missing (needed to size component {name!r}).")
        try:
            config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{prefix}{cfg_file} is not valid JSON ({exc}).") from exc
        class_name, library = _class_of(name, config, entry)
        components.append(Component(name, class_name, library, config))
    if not any(c.name in DENOISER_NAMES for c in components):
        raise ConfigError(f"{prefix}{index_file} lists no denoiser (a 'unet' or 'transformer' component).")
    return components


def candidate_components(candidate: ResearchCandidate) -> list[Component]:
    """The components of a research candidate (preset configs or a local folder's configs)."""
    where = f"research.candidates[{candidate.name}]"
    if candidate.path is not None:
        return read_diffusers_folder(candidate.path, where)
    if candidate.preset not in PRESETS:
        raise ConfigError(f"{where}.preset: unknown preset {candidate.preset!r}; known presets: {sorted(PRESETS)}")
    configs = PRESETS[candidate.preset]()
    components = []
    for name, config in configs.items():
        class_name, library = _class_of(name, config)
        components.append(Component(name, class_name, library, dict(config)))
    return components


# --------------------------------------------------------------------------- estimates


@dataclass
class DenoiserShape:
    """What the activation heuristic needs to know about a denoiser at native resolution."""

    tokens: int  # latent pixels (UNet) or patches (transformer) at the top level
    width: int  # channels at the top level
    heads: int  # attention heads of the highest-resolution attention layer
    attn_tokens: int  # tokens seen by that attention layer
    latent_size: int  # latent height (= width) in pixels


def _first(value: Any, default: int) -> int:
    if isinstance(value, list | tuple):
        return int(value[0]) if value else default
    return int(value) if value is not None else default


# Transformers whose pipelines pack 2x2 latent patches into one token (patch_size 1 in the
# config) and ship no sample_size: their native latent size and text tokens per prompt.
PACKED_TRANSFORMERS = {"FluxTransformer2DModel": {"latent_size": 128, "text_tokens": 512}}
# Joint-attention (MMDiT) transformers attend over image and text tokens together.
JOINT_TEXT_TOKENS = {"SD3Transformer2DModel": 77 + 256, "FluxTransformer2DModel": 512}


def denoiser_shape(
    config: Mapping[str, Any], class_name: str | None = None, settings: Mapping[str, Any] | None = None,
    vae_factor: int = 8,
) -> DenoiserShape:
    """Read the activation-relevant sizes from a UNet or transformer config.

    `class_name` is the denoiser's class (FLUX packs 2x2 patches and has no sample_size;
    MMDiTs attend over text tokens too); `settings` is the folder's ``stunning.json``, whose
    ``resolution`` and ``t5_tokens`` (the project's tiny models) override the defaults.
    """
    settings = settings or {}
    packed = PACKED_TRANSFORMERS.get(class_name or "")
    size = _first(config.get("sample_size"), packed["latent_size"] if packed else 64)
    if settings.get("resolution"):
        size = int(settings["resolution"]) // vae_factor
    if "block_out_channels" in config:  # a UNet
        width = _first(config["block_out_channels"], 320)
        tokens = size * size
        heads_cfg = config.get("num_attention_heads") or config.get("attention_head_dim") or 8
        heads_list = heads_cfg if isinstance(heads_cfg, list | tuple) else None
        level = 0
        for i, block in enumerate(config.get("down_block_types") or []):
            if "Attn" in block:
                level = i
                break
        heads = int(heads_list[min(level, len(heads_list) - 1)]) if heads_list else int(heads_cfg)
        return DenoiserShape(tokens, width, heads, tokens // (4**level), size)
    patch = 2 if packed else int(config.get("patch_size") or 1)
    heads = int(config.get("num_attention_heads") or 8)
    width = heads * int(config.get("attention_head_dim") or 64)
    tokens = (size // patch) ** 2
    text = JOINT_TEXT_TOKENS.get(class_name or "", 0)
    if packed and settings.get("t5_tokens"):
        text = int(settings["t5_tokens"])
    return DenoiserShape(tokens, width, heads, tokens + text, size)


def vae_scale_factor(vae_config: Mapping[str, Any] | None) -> int:
    if not vae_config or not vae_config.get("block_out_channels"):
        return 8
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def verdict(required_gb: float, budget_gb: float, tight_fraction: float = HEURISTIC["tight_fraction"]) -> str:
    """ "fits" up to `tight_fraction` of the budget, "tight" up to all of it, else "does not fit"."""
    if required_gb <= tight_fraction * budget_gb:
        return "fits"
    if required_gb <= budget_gb:
        return "tight"
    return "does not fit"


def estimate_memory(
    total_params: int,
    lora_params: int,
    shape: DenoiserShape,
    resolution: int,
    vae_width: int,
    precision: str,
    *,
    denoiser_params: int | None = None,
    device: str = "cuda",
    batch_size: int | None = None,
) -> dict[str, float]:
    """Inference and LoRA-training memory (GB) at `precision` on `device`, per :data:`HEURISTIC`.

    At int8/int4 only the denoiser (`denoiser_params` of the `total_params`; None: all of them)
    is quantized, as the trainer does (`train.base_precision`); the other weights and the
    activations stay in the compute type of `device` (float32 on a CPU). Training on a CPU at
    int8/int4 also peaks at the float32 load that precedes quantization. `batch_size` is the
    training batch (None: :data:`HEURISTIC`'s); inference is one image.
    """
    h = HEURISTIC
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"unknown precision {precision!r}; one of {list(BYTES_PER_PARAM)}")
    quantized = precision in QUANTIZED
    denoiser = total_params if denoiser_params is None else denoiser_params
    compute = h["quantized_compute_bytes"].get(device, 2) if quantized else BYTES_PER_PARAM[precision]
    weights = denoiser * BYTES_PER_PARAM[precision] + (total_params - denoiser) * compute
    act_bytes = compute if quantized else h["activation_bytes"][precision]
    batch = h["batch_size"] if batch_size is None else batch_size
    denoise_act = h["feature_maps"] * shape.tokens * shape.width + shape.heads * shape.attn_tokens**2
    vae_act = h["vae_feature_maps"] * resolution * resolution * vae_width
    runtime = h["runtime_overhead_gb"] * GB
    resident = weights * (1 + h["weights_overhead"]) + runtime
    # The VAE runs before (training: encode) or after (inference: decode) the denoiser, so
    # the peak is the larger of the two activation footprints, not their sum.
    inference = resident + act_bytes * h["batch_size"] * max(h["cfg_batch"] * denoise_act, vae_act)
    training = (
        resident
        + lora_params * h["lora_bytes_per_param"]
        + act_bytes * batch * max(h["train_activation_factor"] * denoise_act, vae_act)
    )
    if quantized and device == "cpu":
        load = total_params * h["quantized_cpu_load_bytes"] * (1 + h["weights_overhead"]) + runtime
        training = max(training, load)
    return {"weights_gb": weights / GB, "inference_gb": inference / GB, "training_gb": training / GB}


def training_estimate(
    info: Mapping[str, Any], precision: str, device: str = "cuda", batch_size: int | None = None
) -> dict[str, float]:
    """:func:`estimate_memory` of a :func:`size_candidate` result (its denoiser, LoRA and shape)."""
    return estimate_memory(
        info["total_params"], info["lora"]["params"], DenoiserShape(**info["shape"]), info["resolution"],
        info["vae_width"], precision, denoiser_params=info["components"][info["denoiser"]]["params"],
        device=device, batch_size=batch_size,
    )


def size_candidate(
    candidate: ResearchCandidate, lora_rank: int, targets: Sequence[str], blocks: Sequence[str] = (),
) -> dict[str, Any]:
    """Count parameters and LoRA layers of one candidate (no budget involved).

    The adapter is `lora_rank` on the denoiser's layers matching `targets` within `blocks`
    (:func:`lora_layers`); :func:`build_report` passes the train section's values.
    """
    components = candidate_components(candidate)
    sized: dict[str, Any] = {}
    denoiser = None
    lora = {"layers": 0, "params": 0}
    for comp in components:
        where = f"research.candidates[{candidate.name}] component {comp.name!r} ({comp.class_name})"
        try:
            model = instantiate_meta(comp.class_name, comp.config, comp.library)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: cannot build it from its config: {exc}") from exc
        n = sum(p.numel() for p in model.parameters())
        sized[comp.name] = {"class": comp.class_name, "params": n}
        if comp.name in DENOISER_NAMES and denoiser is None:
            denoiser = comp
            layers = lora_layers(model, targets, blocks)
            lora = {"layers": len(layers), "params": lora_parameter_count(layers, lora_rank)}
        del model
    assert denoiser is not None  # read_diffusers_folder / presets guarantee one
    vae = next((c.config for c in components if c.name == "vae"), None)
    from stunning.families import model_settings  # the project's own per-model settings file

    settings = model_settings(Path(candidate.path)) if candidate.path is not None else {}
    shape = denoiser_shape(denoiser.config, denoiser.class_name, settings, vae_scale_factor(vae))
    resolution = shape.latent_size * vae_scale_factor(vae)
    return {
        "name": candidate.name,
        "source": f"preset:{candidate.preset}" if candidate.preset else str(candidate.path),
        "components": sized,
        "total_params": sum(c["params"] for c in sized.values()),
        "denoiser": denoiser.name,
        "resolution": resolution,
        "shape": asdict(shape),
        "vae_width": _first((vae or {}).get("block_out_channels"), 128),
        "lora": {**lora, "rank": lora_rank, "targets": list(targets), "blocks": list(blocks)},
    }


def training_precisions(device_info: Mapping[str, Any]) -> list[str]:
    """Base precisions the trainer runs on the probed device, highest first: exactly
    :func:`stunning.training.quantized.trainable_precisions` (`train.base_precision`), so the
    plan never recommends a precision the trainer would refuse or silently replace.

    CPU: fp32, bf16, int8, int4 (no fp16); CUDA: all, bf16 only where the GPU supports it;
    MPS: fp32, fp16, int8, int4. int8/int4 quantize the frozen denoiser (optimum-quanto).
    """
    from stunning.training.quantized import trainable_precisions

    bf16 = bool((device_info.get("cuda") or {}).get("bf16_supported"))  # only CUDA's list depends on it
    return trainable_precisions(str(device_info.get("device", "cpu")), bf16)


# train.mixed_precision for each planned base precision: a half base trains under its own
# autocast; fp32 without; a quantized base computes in the device's default (auto: float32 on
# a CPU, bf16/fp16 on a GPU).
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16", "int8": "auto", "int4": "auto"}


IMPLICIT_BASE = "base"


def _plan_candidate(research: ResearchConfig, base: BaseModelConfig) -> tuple[list[ResearchCandidate], str]:
    """The candidate list, with the base model added (as "base") if no candidate names it."""
    candidates = list(research.candidates)
    if base.source == "embedded":
        match = next((c for c in candidates if c.preset == "embedded-micro"), None)
        if match is None:
            match = ResearchCandidate(name="embedded-micro", preset="embedded-micro")
            candidates.append(match)
    else:
        want = Path(base.path).resolve()
        match = next((c for c in candidates if c.path is not None and Path(c.path).resolve() == want), None)
        if match is None:
            match = ResearchCandidate(name=IMPLICIT_BASE, path=base.path)
            candidates.append(match)
    return candidates, match.name


def build_report(
    research: ResearchConfig,
    base: BaseModelConfig,
    device_info: Mapping[str, Any],
    budget_gb: float | None = None,
    train: TrainConfig | None = None,
) -> dict[str, Any]:
    """The fit report: every candidate sized and estimated, and the plan for `base`.

    `device_info` is :func:`stunning.device.probe` output (or a subset with `device`,
    `memory.total_mb` and the CUDA/MPS fields). The budget is, in order: `budget_gb`,
    `research.memory_budget_gb`, the probed device's memory. The LoRA adapter sized is
    `train`'s (rank, target_modules, target_blocks): pass `params.train`; None means the
    shipped defaults (``TrainConfig()``, which equal params.yaml's).
    """
    from stunning.device import memory_budget_mb

    train = train if train is not None else TrainConfig()
    device = str(device_info.get("device", "cpu"))

    if budget_gb is not None:
        budget, budget_source = float(budget_gb), "argument"
    elif research.memory_budget_gb is not None:
        budget, budget_source = float(research.memory_budget_gb), "params research.memory_budget_gb"
    else:
        budget = memory_budget_mb(device_info) / 1024
        budget_source = {"cuda": "CUDA device memory", "mps": "MPS recommended max working set"}.get(
            str(device_info.get("device")), "system memory (total)"
        )
    if budget <= 0:
        raise ConfigError(f"research.memory_budget_gb must be positive, got {budget}")

    candidates, plan_name = _plan_candidate(research, base)
    reports = []
    for cand in candidates:
        log.info("sizing candidate %s", cand.name)
        try:
            info = size_candidate(cand, train.rank, train.target_modules, train.target_blocks)
        except ConfigError as exc:
            if cand.name == plan_name and cand not in research.candidates:
                # The base model was added implicitly: point the user at base.path, not a
                # candidate they never wrote.
                raise ConfigError(str(exc).replace(f"research.candidates[{cand.name}]", "base.path")) from exc
            raise
        estimates = {}
        for precision in PRECISION_ORDER:
            # Batch 1: the least a run needs (a step that runs out of memory halves the batch).
            est = training_estimate(info, precision, device)
            est["inference"] = verdict(est["inference_gb"], budget)
            est["training"] = verdict(est["training_gb"], budget)
            estimates[precision] = {k: round(v, 4) if isinstance(v, float) else v for k, v in est.items()}
        info["estimates"] = estimates
        reports.append(info)

    chosen = next(r for r in reports if r["name"] == plan_name)
    allowed = training_precisions(device_info)
    plan: dict[str, Any] = {"candidate": plan_name, "device": device_info.get("device", "cpu"), "allowed": allowed}
    pick = next((p for p in allowed if chosen["estimates"][p]["training"] == "fits"), None)
    pick = pick or next((p for p in allowed if chosen["estimates"][p]["training"] == "tight"), None)
    if pick is None:
        lowest = allowed[-1]
        plan.update(
            precision=None,
            verdict="does not fit",
            training_gb=chosen["estimates"][lowest]["training_gb"],
            train_base_precision=None,
            train_mixed_precision=None,
            reason=(
                f"{plan_name} needs about {chosen['estimates'][lowest]['training_gb']:.1f} GB to train even at "
                f"{lowest} on {plan['device']}, over the {budget:.1f} GB budget: choose a smaller base model, "
                "a machine with more memory, or raise research.memory_budget_gb if the budget is too strict."
            ),
        )
    else:
        est = chosen["estimates"][pick]
        plan.update(
            precision=pick,
            verdict=est["training"],
            training_gb=est["training_gb"],
            inference_gb=est["inference_gb"],
            train_base_precision=pick,
            train_mixed_precision=MIXED_PRECISION[pick],
            reason=(
                f"highest precision whose LoRA training {'fits' if est['training'] == 'fits' else 'just fits'} "
                f"on {plan['device']}: {est['training_gb']:.2f} GB of {budget:.1f} GB"
            ),
        )
    return {
        "device": device_info.get("device", "cpu"),
        "budget_gb": round(budget, 3),
        "budget_source": budget_source,
        "lora_rank": train.rank,
        "lora_targets": list(train.target_modules),
        "lora_blocks": list(train.target_blocks),
        "heuristic": HEURISTIC,
        "candidates": reports,
        "plan": plan,
    }


def _fmt_params(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _fmt_gb(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The fit report as a Markdown document with one table row per candidate x precision."""
    lines = [
        "# Research: base model fit report",
        "",
        f"Device: **{report['device']}**; memory budget: **{report['budget_gb']:.1f} GB** "
        f"({report['budget_source']}); LoRA rank {report['lora_rank']} on "
        f"{', '.join(report['lora_targets'])}"
        f"{' in ' + ', '.join(report['lora_blocks']) if report.get('lora_blocks') else ''} "
        "(train.rank, train.target_modules, train.target_blocks).",
        "",
        "| Candidate | Params | Precision | Weights GB | Inference GB | Inference | LoRA training GB | Training |",
        "|---|---:|---|---:|---:|---|---:|---|",
    ]
    for cand in report["candidates"]:
        for precision, est in cand["estimates"].items():
            lines.append(
                f"| {cand['name']} | {_fmt_params(cand['total_params'])} | {precision} | {_fmt_gb(est['weights_gb'])} "
                f"| {_fmt_gb(est['inference_gb'])} | {est['inference']} | {_fmt_gb(est['training_gb'])} | {est['training']} |"
            )
    lines += ["", "## Components", "", "| Candidate | Component | Class | Params |", "|---|---|---|---:|"]
    for cand in report["candidates"]:
        for comp, info in cand["components"].items():
            lines.append(f"| {cand['name']} | {comp} | {info['class']} | {info['params']:,} |")
        lora = cand["lora"]
        lines.append(f"| {cand['name']} | LoRA (rank {lora['rank']}) | {lora['layers']} layers | {lora['params']:,} |")
    plan = report["plan"]
    lines += ["", "## Plan", ""]
    if plan.get("precision"):
        lines.append(
            f"Train **{plan['candidate']}** on **{plan['device']}** at **{plan['precision']}** "
            f"(train.base_precision: `{plan['precision']}` — what `auto` takes — train.mixed_precision: "
            f"`{plan['train_mixed_precision']}`), {plan['verdict']}: {plan['reason']}."
        )
    else:
        lines.append(f"**{plan['candidate']} does not fit**: {plan['reason']}")
    h = report["heuristic"]
    lines += [
        "",
        "## How the estimates are made",
        "",
        "Parameters are counted by building each component on PyTorch's `meta` device from its config "
        "(no weights are read). Memory = weights x bytes per parameter x "
        f"{1 + h['weights_overhead']:.2f} + {h['runtime_overhead_gb']} GB runtime + activations. "
        f"Inference activations: the larger of {h['cfg_batch']} denoiser samples (classifier-free guidance) "
        "and the VAE decoder at full resolution; LoRA training: trainable LoRA parameters at "
        f"{h['lora_bytes_per_param']} bytes each (fp32 weight, gradient, two Adam moments) plus "
        f"{h['train_activation_factor']}x a forward pass's activations (kept for backward), batch "
        f"{h['batch_size']} at native resolution. "
        "At int8/int4 only the denoiser is quantized (optimum-quanto, as the trainer does); the rest "
        "and the activations stay in the compute type (float32 on a CPU, where the float32 load "
        f"before quantizing also counts). Denoiser activations = {h['feature_maps']} x tokens x channels "
        "+ heads x tokens² (attention scores of the highest-resolution attention layer). "
        f"'tight' means over {int(h['tight_fraction'] * 100)}% of the budget. Expect +/-50%: "
        "memory-efficient attention, gradient checkpointing and offloading lower the real figures.",
        "",
    ]
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], json_path: str | Path, md_path: str | Path) -> None:
    from stunning.io import atomic_write_text, write_json

    write_json(Path(json_path), report)
    atomic_write_text(Path(md_path), render_markdown(report))


def research_table(report: Mapping[str, Any]):
    """The fit report as a rich Table (what `stunning research` and the research stage print)."""
    from rich.table import Table

    table = Table(title=f"Fit on {report['device']} (budget {report['budget_gb']:.1f} GB, {report['budget_source']})")
    for col in ("candidate", "params", "precision", "inference GB", "inference", "training GB", "training"):
        table.add_column(col, justify="right" if "GB" in col or col == "params" else "left")
    colour = {"fits": "green", "tight": "yellow", "does not fit": "red"}
    for cand in report["candidates"]:
        for precision, est in cand["estimates"].items():
            table.add_row(
                cand["name"],
                f"{cand['total_params'] / 1e6:.1f}M",
                precision,
                f"{est['inference_gb']:.2f}",
                f"[{colour[est['inference']]}]{est['inference']}[/]",
                f"{est['training_gb']:.2f}",
                f"[{colour[est['training']]}]{est['training']}[/]",
            )
    return table


def plan_summary(report: Mapping[str, Any]) -> str:
    plan = report["plan"]
    if plan.get("precision"):
        return f"{plan['candidate']} on {plan['device']} at {plan['precision']} ({plan['verdict']}, {plan['training_gb']:.2f} GB)"
    return f"{plan['candidate']} does not fit on {plan['device']}"


__all__ = [
    "BYTES_PER_PARAM",
    "HEURISTIC",
    "PRECISION_ORDER",
    "build_report",
    "count_parameters",
    "estimate_memory",
    "instantiate_meta",
    "lora_layers",
    "lora_parameter_count",
    "plan_summary",
    "read_diffusers_folder",
    "render_markdown",
    "research_table",
    "sd15_reference_configs",
    "size_candidate",
    "training_estimate",
    "training_precisions",
    "verdict",
    "write_report",
]
