"""The pipeline's deployable parts as fixed-shape modules: denoiser, VAE decoder and encoder, text encoders.

:func:`components` turns a loaded diffusers pipeline into the list of :class:`Component` an
exporter converts, each with named inputs of fixed shapes (the configured resolution and batch),
a realistic example input, the wrapper module the exporter traces, and ``reference``: the same
computation through the diffusers/transformers API itself (``vae.decode``, the text encoder's
own forward), so a test of the exported graph against ``reference`` checks the graph, not the
wrapper against itself.

What each part computes (the Swift template relies on these contracts):

- ``denoiser``: the family sampler's call (:mod:`stunning.export.signature`), output ``out_sample``;
- ``vae_decoder``: ``latents`` as the sampler leaves them → ``image`` in [-1, 1]; the VAE's
  ``scaling_factor``/``shift_factor`` un-scaling is inside the graph;
- ``vae_encoder``: ``image`` in [-1, 1] → ``latents``: the posterior mean, scaled the way the
  sampler expects (deterministic; add noise outside for img2img);
- ``text_encoder`` / ``text_encoder_2``: ``input_ids`` (int32, padded to the tokenizer's
  ``model_max_length``) → ``hidden_states`` (the layer the pipeline conditions on: the
  penultimate for SD3/SDXL, the last for SD 1.x) and, for encoders with a projection,
  ``pooled`` (``text_embeds``).

Families: ``sd3`` and ``sd-unet`` are covered, ``sdxl`` exports the same parts (its denoiser's
``added_cond_kwargs`` are flat inputs ``text_embeds``/``time_ids``). ``flux`` is refused with
:data:`FLUX_NOT_COVERED`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stunning.export import ExportError
from stunning.export.signature import OUTPUT_NAME, DenoiserSignature, capture, flat_denoiser

if TYPE_CHECKING:
    import torch

COVERED_FAMILIES = ("sd3", "sd-unet", "sdxl")
FLUX_NOT_COVERED = (
    "FLUX is not covered by the deployment export: its prompt needs a T5 encoder and a SentencePiece "
    "tokenizer, and its sampler packs latents into 2x2 patches with position ids and a resolution-dependent "
    "time shift; neither the exporter's component wrappers nor the Swift template implement those "
    "(sd3 and sd-unet are covered; the FLUX denoiser alone still exports with `stunning export onnx`)."
)
# Which hidden layer each family's pipeline conditions on, per text encoder (-1: last, -2: penultimate).
HIDDEN_LAYER = {"sd3": {"text_encoder": -2, "text_encoder_2": -2},
                "sdxl": {"text_encoder": -2, "text_encoder_2": -2},
                "sd-unet": {"text_encoder": -1}}


@dataclass(frozen=True)
class IOSpec:
    """One named input or output of a component: shape and numpy dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Component:
    """A deployable part: the module the exporter traces, its fixed-shape example, and the
    diffusers computation it must reproduce."""

    name: str
    module: torch.nn.Module  # positional tensors in `inputs` order -> a tensor or a tuple of `outputs`
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    example: tuple[torch.Tensor, ...] = field(repr=False)
    reference: Callable[..., tuple[torch.Tensor, ...]] = field(repr=False)
    strip: str = ""  # prefix of the module's parameter names dropped in reports ("denoiser.")
    notes: str = ""


def check_family(name: str) -> None:
    """Raise :class:`ExportError` for a family the deployment export does not cover."""
    if name == "flux":
        raise ExportError(FLUX_NOT_COVERED)
    if name not in COVERED_FAMILIES:
        raise ExportError(f"family {name!r}: the deployment export covers {list(COVERED_FAMILIES)}")


def at_resolution(family: Any, resolution: int | None) -> Any:
    """`family`, sampling at `resolution` pixels (None: the model's own): a copy with that
    resolution, so :func:`~stunning.export.signature.capture` records the call at that size."""
    if resolution is None:
        return family
    fixed = copy.copy(family)
    fixed.resolution = lambda pipe: int(resolution)
    return fixed


def capture_at(family: Any, pipe: Any, *, resolution: int | None, batch: int, guidance_scale: float) -> DenoiserSignature:
    """The denoiser call at `resolution` (checked against the VAE and patch factors)."""
    res = resolution or family.resolution(pipe)
    factor = int(pipe.vae_scale_factor) * int(getattr(family.denoiser(pipe).config, "patch_size", None) or 1)
    if res % factor:
        raise ExportError(
            f"resolution {res}: the {family.name} model needs a multiple of {factor} (VAE factor x patch size); "
            "set data.resolution accordingly"
        )
    try:
        return capture(at_resolution(family, resolution), pipe, batch=batch, guidance_scale=guidance_scale)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the pipeline refusing the size is a user error here
        raise ExportError(f"the {family.name} pipeline cannot sample at {res} px: {type(exc).__name__}: {exc}") from exc


def components(family: Any, pipe: Any, signature: DenoiserSignature, *, batch: int = 1,
               which: tuple[str, ...] | list[str] | None = None) -> list[Component]:
    """The deployable parts of `pipe` (all, or those named in `which`), shapes from `signature`."""
    check_family(family.name)
    made = [denoiser_component(family, pipe, signature), *vae_components(pipe, signature, batch),
            *text_components(family, pipe, batch)]
    if which is None:
        return made
    unknown = sorted(set(which) - {c.name for c in made})
    if unknown:
        raise ExportError(f"components {unknown}: the {family.name} model has {[c.name for c in made]}")
    return [c for c in made if c.name in which]


def denoiser_component(family: Any, pipe: Any, signature: DenoiserSignature) -> Component:
    module = family.denoiser(pipe).eval()

    def reference(*tensors):
        return (module(**signature.call_kwargs(tensors))[0],)

    import numpy as np

    return Component(
        name="denoiser",
        module=flat_denoiser(module, signature),
        inputs=[IOSpec(s.name, s.shape, np.dtype(s.dtype).name) for s in signature.inputs],
        outputs=[IOSpec(OUTPUT_NAME, signature.output_shape, "float32")],
        example=signature.example_tuple(),
        reference=reference,
        strip="denoiser.",
        notes=f"the {signature.component} as the sampler calls it (classifier-free guidance doubles the batch)",
    )


def _latent_shape(signature: DenoiserSignature, batch: int) -> tuple[int, ...]:
    shape = signature.output_shape
    return (batch, *shape[1:])


def vae_components(pipe: Any, signature: DenoiserSignature, batch: int) -> list[Component]:
    import torch

    vae = pipe.vae.eval()
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    latent = _latent_shape(signature, batch)
    res = latent[-1] * int(pipe.vae_scale_factor)
    image = (batch, 3, latent[-2] * int(pipe.vae_scale_factor), res)

    class VaeDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

        def forward(self, latents):
            z = latents / scale + shift
            if self.post_quant_conv is not None:
                z = self.post_quant_conv(z)
            return self.decoder(z)

    class VaeEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.quant_conv = vae.encoder, vae.quant_conv

        def forward(self, image):
            h = self.encoder(image)
            if self.quant_conv is not None:
                h = self.quant_conv(h)
            mean = h[:, : h.shape[1] // 2]  # (not .chunk: coremltools cannot convert the alias it leaves)
            return (mean - shift) * scale

    g = torch.Generator().manual_seed(0)
    z = torch.randn(latent, generator=g)
    x = torch.rand(image, generator=g) * 2 - 1
    return [
        Component("vae_decoder", VaeDecoder().eval(), [IOSpec("latents", latent, "float32")],
                  [IOSpec("image", image, "float32")], (z,),
                  lambda t: (vae.decode(t / scale + shift, return_dict=False)[0],),
                  notes=f"latents -> image in [-1, 1] (un-scaling /{scale:g} +{shift:g} inside)"),
        Component("vae_encoder", VaeEncoder().eval(), [IOSpec("image", image, "float32")],
                  [IOSpec("latents", latent, "float32")], (x,),
                  lambda t: ((vae.encode(t).latent_dist.mean - shift) * scale,),
                  notes="image in [-1, 1] -> posterior mean, scaled like the sampler's latents"),
    ]


def text_components(family: Any, pipe: Any, batch: int) -> list[Component]:
    import torch

    out = []
    for name, layer in HIDDEN_LAYER[family.name].items():
        encoder = getattr(pipe, name, None)
        tokenizer = getattr(pipe, name.replace("text_encoder", "tokenizer"), None)
        if encoder is None or tokenizer is None:
            continue
        encoder = encoder.eval()
        length = int(tokenizer.model_max_length)
        pooled = hasattr(encoder, "text_projection")
        width = int(encoder.config.hidden_size)

        class TextEncoder(torch.nn.Module):
            def __init__(self, enc=encoder, layer=layer, pooled=pooled) -> None:
                super().__init__()
                self.encoder, self.layer, self.pooled = enc, layer, pooled

            def forward(self, input_ids):
                o = self.encoder(input_ids, output_hidden_states=True)
                hidden = o.hidden_states[self.layer]
                return (hidden, o.text_embeds) if self.pooled else hidden

        def reference(ids, enc=encoder, layer=layer, pooled=pooled):
            o = enc(ids.long(), output_hidden_states=True, return_dict=True)
            return (o.hidden_states[layer], o.text_embeds) if pooled else (o.hidden_states[layer],)

        ids = tokenizer(["a red dress on a white background"] * batch, padding="max_length", max_length=length,
                        truncation=True, return_tensors="pt").input_ids.to(torch.int32)
        outputs = [IOSpec("hidden_states", (batch, length, width), "float32")]
        if pooled:
            outputs.append(IOSpec("pooled", (batch, int(encoder.config.projection_dim)), "float32"))
        out.append(Component(
            name, TextEncoder().eval(), [IOSpec("input_ids", (batch, length), "int32")], outputs, (ids,), reference,
            strip="encoder.",
            notes=f"token ids -> hidden layer {layer}" + (" and the pooled projection" if pooled else ""),
        ))
    return out


def export_program(component: Component):
    """The ``torch.export`` program of `component` (ATen decompositions, ``alias`` nodes removed:
    coremltools 9 has no converter for ``aten.alias``, which CLIP's ``position_ids[:, :n]`` leaves)."""
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(component.module, component.example).run_decompositions({})
    graph = program.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()
    return program


def graph_check(component: Component, program) -> dict[str, Any]:
    """Max abs error of the exported graph against the diffusers computation on the example."""
    import torch

    with torch.no_grad():
        got = program.module()(*component.example)
        ref = component.reference(*component.example)
    got = got if isinstance(got, tuple | list) else (got,)
    if len(got) != len(ref):
        raise ExportError(f"the exported {component.name} returns {len(got)} outputs, diffusers {len(ref)}")
    errors = {spec.name: float((g.float() - r.float()).abs().max()) for spec, g, r in zip(component.outputs, got, ref,
                                                                                            strict=True)}
    return {"max_abs_error": max(errors.values()), "per_output": errors,
            "reference_max_abs": max(float(r.abs().max()) for r in ref)}
