"""Typed, validated configuration: one pydantic model per component.

`params.yaml` is the single source of truth for the pipeline. Every stage reads its own
section through :func:`load_params`; unknown keys are errors that name the key, and values
are validated on load so a typo fails before any work starts.

The defaults here are exactly the shipped `params.yaml` (tests/unit/test_config.py checks it
key by key), so `Params()`, a section built with no arguments, the one-off `stunning train`
(stunning/oneoff.py) and the pipeline all start from the same values; there is no other copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem a user can fix: names the file, the key and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelConfig(_Section):
    """Which base model the pipeline adapts.

    `source: embedded` installs the project's shipped micro model (`stunning/assets/micro`,
    an `sd3`-family model trained by `python -m stunning.pretrain`) into `path` (a DVC
    output); `source: local` uses an existing diffusers folder at `path` (never downloaded).
    """

    source: Literal["embedded", "local"] = "embedded"
    path: str = "models/embedded"
    family: str = "sd3"
    seed: int = 0


class ResearchCandidate(_Section):
    """A base model considered by the research phase: an embedded preset or a local folder."""

    name: str
    preset: str | None = None  # e.g. "embedded-micro", "sd15-reference"
    path: str | None = None  # a local diffusers folder (configs are read, weights are not)

    @model_validator(mode="after")
    def _one_source(self) -> ResearchCandidate:
        if (self.preset is None) == (self.path is None):
            raise ValueError(f"candidate {self.name!r}: give exactly one of 'preset' or 'path'")
        return self


class ResearchConfig(_Section):
    candidates: list[ResearchCandidate] = Field(
        default_factory=lambda: [
            ResearchCandidate(name="embedded-micro", preset="embedded-micro"),
            ResearchCandidate(name="sd15", preset="sd15-reference"),
        ]
    )
    memory_budget_gb: float | None = None  # None: the machine's total memory
    # The adapter sized is the one training makes: train.rank on train.target_modules
    # (within train.target_blocks); research has no LoRA settings of its own.

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: object) -> object:
        if isinstance(data, dict) and "lora_rank" in data:
            raise ValueError(
                "research.lora_rank was removed: research sizes the adapter training makes "
                "(train.rank, train.target_modules, train.target_blocks); delete the key"
            )
        return data


class DataConfig(_Section):
    """Where photos come from and how they are normalised for training."""

    source: Literal["embedded", "local"] = "embedded"
    raw_dir: str = "data/sample"
    styles: list[str] = Field(default_factory=lambda: ["impressionist", "noir"])
    resolution: int = 32
    min_size: int = 24
    extensions: list[str] = Field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    sample_images_per_style: int = 24
    sample_seed: int = 0
    # Aspect-ratio buckets: off = every image is centre-cropped to a square. On = each image
    # is fitted (cover, then centre crop) to the bucket nearest its aspect ratio among
    # stunning.data.images.bucket_sizes(resolution, bucket_step, bucket_max_ratio): sides
    # multiples of bucket_step, at most resolution² pixels, aspect up to bucket_max_ratio
    # either way; every training batch is drawn from one bucket. bucket_step must be a
    # multiple of what the model needs, VAE factor x patch size (x2 where latents are packed
    # 2x2, x the UNet's own downsampling): 64 for SD 1.x, 32 for SDXL, 16 for SD3/FLUX, 4 for
    # the embedded 32-px model; the trainer checks it (stunning.training.encoding.size_multiple).
    buckets: bool = False
    bucket_step: int = Field(4, ge=1)
    bucket_max_ratio: float = Field(2.0, ge=1.0, le=4.0)

    @model_validator(mode="after")
    def _bucket_step(self) -> DataConfig:
        if self.buckets and self.bucket_step > self.resolution:
            raise ValueError(
                f"data.bucket_step={self.bucket_step} is larger than data.resolution={self.resolution}: "
                "set a smaller data.bucket_step (a multiple of the model's VAE factor x patch size, "
                "e.g. 4 for the embedded 32-px model) or data.buckets: false"
            )
        return self

    @field_validator("styles")
    @classmethod
    def _styles_nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one style (a sub-folder of raw_dir)")
        if len(set(v)) != len(v):
            raise ValueError(f"styles must be unique, got {v}")
        return v


class CurateConfig(_Section):
    min_resolution: int = 24
    blur_threshold: float = 5.0  # variance of the Laplacian below which an image is blurry
    near_duplicate_distance: int = 2  # max perceptual-hash Hamming distance of a near-duplicate
    min_caption_words: int = 2
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)  # 0: no val split, every image trains
    split_seed: int = 0
    min_images_per_style: int = 4


class TrainConfig(_Section):
    rank: int = Field(16, ge=1)
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # The sd3 family's best measured set (see params.yaml); other families' one-off runs use
    # their own `default_lora_targets` (stunning/families).
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "ff.net.0.proj", "ff.net.2", "norm1.linear", "norm_out.linear", "proj_out",
        ]
    )
    # Block-wise selection: only modules under these path prefixes of the denoiser, e.g.
    # ["transformer_blocks.0", "transformer_blocks.5"] (sd3) or ["up_blocks.1"] (sd-unet).
    # Empty: every block.
    target_blocks: list[str] = Field(default_factory=list)
    trigger_words: list[str] = Field(default_factory=list)  # recorded in the adapter's metadata
    learning_rate: float = Field(2e-3, gt=0)
    # diffusers.optimization schedules: constant, constant_with_warmup, linear, cosine, ...
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    steps: int = Field(800, ge=1)
    # Images per micro-batch, or "auto": probe the largest batch that fits this machine (trial
    # steps doubling from 1 up to max_batch_size; see stunning/training/batch.py). Either way a
    # step that runs out of memory halves the batch and is retried.
    batch_size: int | Literal["auto"] = 4
    max_batch_size: int = Field(16, ge=1)  # upper bound of batch_size: auto
    gradient_accumulation: int = Field(1, ge=1)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30 % slower
    ema_decay: float | None = Field(None, gt=0, lt=1)  # keep and save an exponential moving average of the adapter
    caption_dropout: float = Field(0.1, ge=0, lt=1)  # share of steps' captions replaced by the empty prompt
    checkpoint_every: int = Field(200, ge=1)
    # A step with a non-finite loss or gradient rolls back to the last good state (checkpoint or
    # in-memory snapshot) and retries at half the learning rate, at most this often a run;
    # then training fails with what to change (stunning/training/divergence.py).
    max_divergence_retries: int = Field(3, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    sample_every: int = Field(0, ge=0)  # 0: only at the end
    seed: int = 0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    # The frozen base's weights (QLoRA, stunning/training/quantized.py): fp32, bf16/fp16 (half
    # precision weights, trained with that autocast), int8/int4 (the denoiser's Linear/Conv2d
    # weights quantized with optimum-quanto; the LoRA weights stay float32). auto: the research
    # plan's precision (reports/research.json, the train stage's --research), or without a plan
    # the weight type of mixed_precision as before (fp32 on a CPU, bf16/fp16 on a GPU).
    base_precision: Literal["auto", "fp32", "bf16", "fp16", "int8", "int4"] = "auto"
    sample_prompt: str = "a red dress on a white background"
    # Thermal awareness (stunning/training/thermal.py): every thermal_check_every steps (0: never)
    # read the OS thermal state; while it reports throttling, pause in thermal_pause_s chunks,
    # at most thermal_max_pause_s in the whole run.
    thermal_check_every: int = Field(50, ge=0)
    thermal_pause_s: float = Field(30.0, gt=0)
    thermal_max_pause_s: float = Field(600.0, ge=0)
    # DreamBooth (Ruiz et al. 2023, arXiv:2208.12242). instance_prompt: the caption of every
    # training image, e.g. "a photo in sks style" (a "{caption}" placeholder keeps each image's
    # own caption inside it). With prior_preservation each step also trains on as many class
    # images (class_prompt, e.g. "a photo") as instance images, and the loss is
    # instance + prior_loss_weight x class: the adapter learns the style without forgetting
    # what the class looks like. Class images: those in class_data_dir first, the rest
    # (up to num_class_images) generated once by the base model and cached.
    instance_prompt: str | None = None
    class_prompt: str | None = None
    prior_preservation: bool = False
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(100, ge=1)
    class_data_dir: str | None = None
    class_sample_steps: int = Field(30, ge=1)  # sampling steps of generated class images

    @model_validator(mode="after")
    def _dreambooth(self) -> TrainConfig:
        if self.prior_preservation and not self.class_prompt:
            raise ValueError("train.prior_preservation needs train.class_prompt (e.g. 'a photo')")
        if self.instance_prompt is not None and not self.instance_prompt.strip():
            raise ValueError("train.instance_prompt is empty; set a prompt with a trigger word or leave it unset")
        return self

    @model_validator(mode="after")
    def _base_precision(self) -> TrainConfig:
        half = self.base_precision in ("bf16", "fp16")
        if half and self.mixed_precision not in ("auto", self.base_precision):
            raise ValueError(
                f"train.base_precision={self.base_precision} keeps the frozen weights in {self.base_precision}, "
                f"which trains only under that autocast: set train.mixed_precision to {self.base_precision} or auto "
                f"(not {self.mixed_precision}), or train.base_precision to fp32"
            )
        return self

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, v: object) -> object:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"train.batch_size={v!r}: use a whole number >= 1 or auto (probe the largest that fits)")
        return v


class BlendConfig(_Section):
    name: str
    weights: dict[str, float]


class MergeConfig(_Section):
    blends: list[BlendConfig] = Field(
        default_factory=lambda: [BlendConfig(name="half-half", weights={"impressionist": 0.5, "noir": 0.5})]
    )
    fuse: str = "half-half"  # which blend (or single style) is fused into the base
    # The quantization ladder (stunning/quantize.py): `auto` tries every level (int8, fp8,
    # int4, nf4) and keeps the smallest within budgets.min_quantized_psnr,
    # budgets.max_style_gain_loss and the target's memory; a list tries only those levels.
    quantization: Literal["auto"] | list[Literal["int8", "fp8", "int4", "nf4"]] = "auto"
    # Whose memory budget a level must fit: `plan` (reports/research.json) or an Apple chip.
    target_device: Literal["plan", "apple-8gb", "apple-16gb", "apple-24gb", "apple-32gb"] = "plan"
    # Reference captions per style drawn to measure the style gain each quantized adapter keeps.
    style_set_size: int = Field(8, ge=1)

    @field_validator("quantization", mode="before")
    @classmethod
    def _ladder(cls, v: object) -> object:
        if v == "int8-weight":
            raise ValueError("merge.quantization=int8-weight was replaced by the ladder: use [int8] (or auto)")
        if isinstance(v, list):
            if not v:
                raise ValueError("merge.quantization=[]: list at least one of int8, fp8, int4, nf4 (or use auto)")
            if len(set(v)) != len(v):
                raise ValueError(f"merge.quantization={v}: a level is listed twice")
        return v


class ValidateConfig(_Section):
    prompts: list[str] = Field(
        default_factory=lambda: [
            "a red dress on a white background",
            "a blue hat on a grey background, on the left",
            "a black bag on a beige background",
            "a green dress on a beige background",
            "a purple hat on a white background, on the right",
            "a pair of yellow trousers on a black background",
        ]
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3])
    steps: int = Field(16, ge=1)
    guidance_scale: float = 4.0
    # How an adapter is prompted: the training captions' convention ("{prompt}" alone: no trigger).
    adapter_prompt: str = "{prompt}, {style} style"
    # The family's sampler: for sd3 one of euler, euler-ancestral, dpm++ (families/sd3.py);
    # "default" keeps the scheduler saved with the model.
    sampler: str = "default"
    # Style distance is measured content-matched: base and adapter draw the scenes of (up to
    # this many of) each style's reference captions, one image each, and are compared with
    # those references, so the distance measures style and not which scenes were drawn.
    style_set_size: int = Field(32, ge=1)
    # Optional CLIP text-image and image-image style scores (stunning/clip_scores.py): a CLIP
    # model id already in the local Hugging Face cache, or a local folder; None: not measured.
    clip_model: str | None = None

    @field_validator("adapter_prompt")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            filled = v.format(prompt="P", style="S")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"validate.adapter_prompt={v!r}: only {{prompt}} and {{style}} may appear ({exc})") from None
        if "P" not in filled:
            raise ValueError(f"validate.adapter_prompt={v!r} must contain {{prompt}}")
        return v


class BudgetsConfig(_Section):
    """Promotion budgets (stunning/gate.py). A candidate that violates any of them is not promoted.

    The `max_*`/`min_*` keys are absolute budgets. `required` names the gate metrics that must
    be measured (an unmeasured one blocks; the others are listed as not evaluated). Against the
    `@champion` every metric may be worse than the champion's reference only by measurement
    noise: `noise_sigmas` x the validation's per-seed spread where it reports one, never less
    than `noise_floor` (absolute, in the metric's unit) or `noise_floor_relative` (a fraction
    of the reference). Metric names (keys of `required` and the floors) are `stunning.gate.METRICS`.
    """

    max_peak_memory_mb: float = 4096.0
    max_latency_s: float = 5.0
    min_style_gain: float = 0.5  # relative drop of style distance vs the base, per adapter
    max_adherence_drop: float = 0.10  # prompt adherence (oracle) may fall at most this much below the base
    max_quantized_size_ratio: float = 0.6  # quantized denoiser bytes / fp32 bytes
    max_quantization_mse: float = 0.01  # pixel MSE of quantized vs unquantized outputs
    # The quantization ladder (merge.quantization): a level is kept only if every variant's
    # images stay this close to float32 and no adapter loses more style gain than this.
    min_quantized_psnr: float = 30.0  # dB, images of each variant vs its float32 counterpart
    max_style_gain_loss: float = 0.05  # style gain (float32) minus style gain (quantized), per adapter
    required: list[str] = Field(
        default_factory=lambda: ["style_gain", "peak_memory_mb", "latency_s", "quantized_size_ratio", "quantization_mse"]
    )
    noise_sigmas: float = Field(2.0, ge=0)
    noise_floor: dict[str, float] = Field(
        default_factory=lambda: {
            "style_gain": 0.03,
            "eval_loss": 0.0,
            "adherence_drop": 0.05,
            "peak_memory_mb": 64.0,
            "latency_s": 0.05,
            "quantized_size_ratio": 0.01,
            "quantization_mse": 0.0001,
            "clip_style_gain": 0.01,
            "clip_adherence_drop": 0.01,
        }
    )
    noise_floor_relative: dict[str, float] = Field(
        default_factory=lambda: {"eval_loss": 0.05, "peak_memory_mb": 0.10, "latency_s": 0.25, "quantization_mse": 0.5}
    )

    @field_validator("noise_floor", "noise_floor_relative")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not x >= 0}
        if bad:
            raise ValueError(f"noise floors must be >= 0: {bad}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: object) -> object:
        if isinstance(data, dict) and "max_regression_vs_champion" in data:
            raise ValueError(
                "budgets.max_regression_vs_champion was removed (a fixed 10 % per promotion let quality "
                "ratchet down): the champion comparison now allows only measurement noise, "
                "budgets.noise_sigmas x the validation's per-seed spread or the per-metric floors "
                "budgets.noise_floor / budgets.noise_floor_relative (e.g. noise_floor: {style_gain: 0.03}); "
                "delete the key"
            )
        return data


class RegistryConfig(_Section):
    """Where runs and the model registry live.

    `tracking_uri`: a local SQLite store (relative paths from the project root), or a team's
    MLflow server, `http(s)://HOST:PORT` (`stunning registry server`; README, Team setup).
    `artifact_root`: the local store's artifacts folder; with a server the server keeps the
    artifacts and this folder only caches the versions downloaded from it.
    """

    model_name: str = "stunning-style"
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_root: str = "mlruns/artifacts"
    experiment: str = "stunning-engine"
    # A `dvc exp run` candidate is registered and compared, but moves @champion only if
    # true; otherwise promote it explicitly with `stunning promote VERSION`.
    promote_experiments: bool = False


class GateConfig(_Section):
    """How the promotion gate acts.

    enabled: checks decide, a passing candidate becomes @champion. dry_run: checks run and
    are reported, the version is registered tagged `dry_run=true`, never promoted.
    disabled: checks are skipped (the report says so), never promoted automatically.
    """

    mode: Literal["enabled", "dry_run", "disabled"] = "enabled"


class CoreMLExportConfig(_Section):
    """Core ML packages (stunning/export/coreml.py): one float package per part, palettized copies."""

    palettize_bits: list[int] = Field(default_factory=lambda: [8, 6, 4])  # one package per part and width
    palettize_mode: Literal["uniform", "kmeans"] = "uniform"  # kmeans: better tables, minutes per width
    precision: Literal["float16", "float32"] = "float16"  # the float package's weights
    deployment_target: Literal["macOS14", "iOS17", "macOS15", "iOS18"] = "macOS14"  # palettization needs 14/17+

    @field_validator("palettize_bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        bad = [n for n in v if n not in (1, 2, 3, 4, 6, 8)]
        if bad or len(set(v)) != len(v):
            raise ValueError(f"export.coreml.palettize_bits={v}: distinct widths of 1, 2, 3, 4, 6 or 8 bits")
        return v


class OnnxExportConfig(_Section):
    """The ONNX denoiser (stunning/export/onnx.py), checked with ONNX Runtime against torch."""

    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    max_abs_error: float = Field(1e-3, gt=0)  # the export stage fails above this (ONNX vs torch denoiser)
    min_psnr_db: float = Field(40.0, gt=0)  # ...or when an image drawn through ONNX falls below this PSNR


class ExportConfig(_Section):
    """Deployment exports of the fused model (stage `export`): fixed shapes at data.resolution."""

    targets: list[Literal["coreml", "onnx"]] = Field(default_factory=lambda: ["coreml", "onnx"])
    batch: int = Field(1, ge=1)  # images per call the fixed shapes are made for
    coreml: CoreMLExportConfig = CoreMLExportConfig()
    onnx: OnnxExportConfig = OnnxExportConfig()

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"export.targets={v}: list each target once")
        return v


class NightlyConfig(_Section):
    """The nightly retrain deployment (`python -m flows.nightly --serve`)."""

    cron: str = "0 2 * * *"


class Params(_Section):
    base: BaseModelConfig = BaseModelConfig()
    research: ResearchConfig = ResearchConfig()
    data: DataConfig = DataConfig()
    curate: CurateConfig = CurateConfig()
    train: TrainConfig = TrainConfig()
    merge: MergeConfig = MergeConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    budgets: BudgetsConfig = BudgetsConfig()
    registry: RegistryConfig = RegistryConfig()
    gate: GateConfig = GateConfig()
    export: ExportConfig = ExportConfig()
    nightly: NightlyConfig = NightlyConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        styles = set(self.data.styles)
        names = set()
        for blend in self.merge.blends:
            unknown = set(blend.weights) - styles
            if unknown:
                raise ValueError(
                    f"merge.blends[{blend.name}] uses styles {sorted(unknown)} not in data.styles {sorted(styles)}"
                )
            names.add(blend.name)
        if self.merge.fuse not in names | styles:
            raise ValueError(f"merge.fuse={self.merge.fuse!r} is neither a blend name nor a style")
        return self


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate `params.yaml`; raise :class:`ConfigError` naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found. Run from the project root or pass --params PATH.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}).") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections.")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<top level>"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling against params.yaml in the project)"
            problems.append(f"  {key}: {msg}")
        raise ConfigError(f"{path}: invalid parameters:\n" + "\n".join(problems)) from exc


def dump_resolved(params: BaseModel, path: str | Path) -> None:
    """Save a resolved config (a section or all params) next to an artefact, atomically."""
    from stunning.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(params.model_dump(by_alias=True), sort_keys=False))
