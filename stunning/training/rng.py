"""The state that makes a run continue exactly: the adapter's weights and the RNG states.

A checkpoint holds :func:`trainable_state` (the LoRA parameters) and :func:`rng_state` (the
loop's two generators plus torch's global RNG, which drives LoRA dropout). The batch probe,
the CPU calibration and a step redone after running out of memory take the same snapshots
and put them back, so that what they tried leaves no trace on the run.
"""

from __future__ import annotations

import torch


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters by full module name, detached on the CPU."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`trainable_state` back in; names must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        extra, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise ValueError(f"LoRA state does not match the model: unexpected {extra[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(device=p.device, dtype=p.dtype))


def global_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's global RNG state (and the device's): it drives LoRA dropout."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_global_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put back a :func:`global_rng_state`."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def rng_state(loop_gen: torch.Generator, noise_gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Every RNG state of a run: the generators drive batches, noise and timesteps; the global RNG LoRA dropout."""
    return {"loop": loop_gen.get_state(), "noise": noise_gen.get_state(), **global_rng_state(device)}


def set_rng_state(
    state: dict[str, torch.Tensor], loop_gen: torch.Generator, noise_gen: torch.Generator, device: torch.device
) -> None:
    """Put back an :func:`rng_state`."""
    loop_gen.set_state(state["loop"])
    noise_gen.set_state(state["noise"])
    set_global_rng_state(state, device)
