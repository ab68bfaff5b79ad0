"""The denoiser's call as the family's sampler makes it, flattened to named fixed-shape tensors.

Exporters need a module taking positional tensors with fixed shapes; diffusers denoisers take
keyword arguments, some nested (SDXL's ``added_cond_kwargs``), some not tensors at all
(``return_dict``, ``joint_attention_kwargs=None``). Rather than spell out every family's call,
:func:`capture` runs the family's own :meth:`~stunning.families.base.Family.generate` for one step
and records the first denoiser call (a forward pre-hook stops the pipeline there). That call is the
ground truth for names, shapes and dtypes at the model's resolution, for `batch` images with the
family's classifier-free guidance (an SD-style pipeline doubles the batch).

One normalisation: ``timestep`` is always exported as a ``(batch,)`` float32 vector (UNet
pipelines pass a 0-d integer tensor; the timestep embedding casts to float anyway), so every
export has the same, deployment-friendly timestep input.

:class:`FlatDenoiser` is the export-time module (positional tensors → the original call);
:meth:`DenoiserSignature.flatten` turns a live call back into named arrays (what the ONNX
Runtime swap-in uses).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stunning.export import ExportError

if TYPE_CHECKING:
    import torch

OUTPUT_NAME = "out_sample"
TIMESTEP = "timestep"
# Inputs without a batch dimension (FLUX's position ids are (sequence, 3) for the whole batch).
_UNBATCHED = frozenset({"img_ids", "txt_ids"})
_IGNORED = frozenset({"return_dict"})


class _Captured(Exception):
    """Raised by the pre-hook to stop the pipeline once the denoiser call is recorded."""


@dataclass(frozen=True)
class TensorSpec:
    """One flat input: its exported name, where it sits in the call, shape and torch dtype name."""

    name: str
    path: tuple[str, ...]  # ("sample",) or ("added_cond_kwargs", "text_embeds")
    shape: tuple[int, ...]
    dtype: str  # "float32", "int64", ...
    batched: bool


@dataclass
class DenoiserSignature:
    """The captured call: flat tensor inputs (in export order), the constant non-tensor arguments,
    the exported batch, and the call's tensors themselves (a realistic example input)."""

    component: str
    inputs: list[TensorSpec]
    constants: dict[str, Any]
    batch: int
    output_shape: tuple[int, ...]
    example: dict[str, torch.Tensor] = field(repr=False)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def example_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.example[s.name] for s in self.inputs)

    def call_kwargs(self, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> dict[str, Any]:
        """The denoiser's keyword arguments for flat `tensors` (in :attr:`inputs` order)."""
        kwargs: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.constants.items()}
        for spec, t in zip(self.inputs, tensors, strict=True):
            if len(spec.path) == 1:
                kwargs[spec.path[0]] = t
            else:
                kwargs.setdefault(spec.path[0], {})[spec.path[1]] = t
        kwargs["return_dict"] = False
        return kwargs

    def flatten(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """Named tensors of a live call of `module` (same layout as the capture), timestep normalised.

        Raises :class:`ExportError` when the call differs from the captured one in a way the fixed
        export cannot follow (a non-tensor argument changed, a tensor is missing).
        """
        import torch

        bound = call_arguments(module, args, kwargs)
        for key, value in self.constants.items():
            if not _same_constant(bound.get(key), value):
                raise ExportError(
                    f"the denoiser was called with {key}={bound.get(key)!r}, but the export fixed it to {value!r}; "
                    "export again for that setting"
                )
        out: dict[str, torch.Tensor] = {}
        for spec in self.inputs:
            value: Any = bound.get(spec.path[0])
            if len(spec.path) == 2:
                value = (value or {}).get(spec.path[1])
            if not isinstance(value, torch.Tensor):
                raise ExportError(f"the denoiser call lacks the exported input {spec.name!r}")
            out[spec.name] = value
        n = next((out[s.name].shape[0] for s in self.inputs if s.batched and s.name != TIMESTEP), self.batch)
        if TIMESTEP in out:
            out[TIMESTEP] = normalise_timestep(out[TIMESTEP], n)
        return out


def normalise_timestep(t: torch.Tensor, batch: int) -> torch.Tensor:
    """A timestep as a ``(batch,)`` float32 vector (see the module docstring)."""
    import torch

    t = t.detach().to(torch.float32)
    return t.reshape(1).expand(batch).clone() if t.numel() == 1 else t.reshape(batch)


def flat_denoiser(module: torch.nn.Module, signature: DenoiserSignature) -> torch.nn.Module:
    """A module whose forward takes the flat tensors of `signature` positionally and returns the
    denoiser's output tensor: what the exporters trace."""
    import torch

    class FlatDenoiser(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.denoiser = module

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.denoiser(**signature.call_kwargs(tensors))[0]

    return FlatDenoiser().eval()


def capture(family: Any, pipe: Any, *, batch: int = 1, guidance_scale: float = 4.0,
            prompt: str = "a photo") -> DenoiserSignature:
    """Run one sampling step of `family.generate` for `batch` images and record the denoiser's call."""
    import torch

    if batch < 1:
        raise ExportError(f"batch={batch}: export at least one image per call (batch >= 1)")
    module = family.denoiser(pipe)
    seen: dict[str, Any] = {}

    def hook(mod, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Captured

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        family.generate(pipe, [prompt] * batch, list(range(batch)), 2, guidance_scale)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "args" not in seen:
        raise ExportError(f"the {family.name} pipeline never called its {family.lora_component}; nothing to export")
    bound = call_arguments(module, seen["args"], seen["kwargs"])
    specs: list[TensorSpec] = []
    example: dict[str, torch.Tensor] = {}
    constants: dict[str, Any] = {}
    first = next(v for v in bound.values() if isinstance(v, torch.Tensor))
    n = int(first.shape[0])
    for key, value in bound.items():
        if key in _IGNORED:
            continue
        if isinstance(value, torch.Tensor):
            _add(specs, example, (key,), value, n)
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            for sub, t in value.items():
                _add(specs, example, (key, sub), t, n)
        else:
            constants[key] = value
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ExportError(f"the {family.name} denoiser's inputs have clashing names {names}; cannot export them flat")
    with torch.no_grad():
        out = module(**{**bound, "return_dict": False})[0]
    return DenoiserSignature(
        component=family.lora_component, inputs=specs, constants=constants, batch=n,
        output_shape=tuple(out.shape), example=example,
    )


def _add(specs: list[TensorSpec], example: dict, path: tuple[str, ...], t: torch.Tensor, n: int) -> None:
    name = path[-1]
    if name == TIMESTEP:
        t = normalise_timestep(t, n)
    t = t.detach().clone()
    batched = name not in _UNBATCHED and t.dim() >= 1 and t.shape[0] == n
    example[name] = t
    specs.append(TensorSpec(name, path, tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch."), batched))


def call_arguments(module: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call of `module` by parameter name (only those given), read from its class's
    ``forward`` so that a ``forward`` swapped onto the instance does not hide them."""
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(arguments)))  # self
    return arguments


def _same_constant(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable ==: treat as different
        return a is b
