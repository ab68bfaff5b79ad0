"""The divergence sentinel: a step whose loss or gradients are not finite is never applied.

:func:`~stunning.training.loop.train_step` raises :class:`NonFiniteStep` before the optimizer
steps when a micro-batch's loss, or the gradient norm that clipping measures, is NaN or
infinite (with an fp16 loss scaler an infinite gradient is the scaler's business: it skips
that step and lowers its scale). The loop then rolls back to the last good state — the
newest checkpoint, or without checkpointing the in-memory :class:`Snapshot` taken every
`train.checkpoint_every` steps (and at the start) — halves the learning rate and goes on.
Everything random is rolled back with the weights, so a retried run is as deterministic as
one that never diverged, and a run that never diverges is untouched by any of this.
After `train.max_divergence_retries` retries :class:`TrainingDiverged` says what to change.
"""

from __future__ import annotations

from typing import Any

import torch

from stunning.training.checkpoint import Checkpoint


class TrainingDiverged(ValueError):
    """Training produced a non-finite loss, gradient or adapter even at the lowered learning rates."""


class NonFiniteStep(Exception):
    """A step's loss or gradient norm is not finite; raised before the optimizer applies it."""

    def __init__(self, what: str, value: float) -> None:
        super().__init__(f"the {what} is {value}")
        self.what = what
        self.value = value


def cpu_copy(obj: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples with every tensor cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(cpu_copy(v) for v in obj)
    return obj


def snapshot(step: int, lora: dict[str, torch.Tensor], optimizer: dict[str, Any], rng: dict[str, torch.Tensor],
             history: list[float], meta: dict[str, Any]) -> Checkpoint:
    """An in-memory checkpoint (the same state a checkpoint folder holds), every tensor copied to the CPU."""
    return Checkpoint(path=None, step=step, lora=cpu_copy(lora), optimizer=cpu_copy(optimizer), rng=cpu_copy(rng),
                      loss_history=list(history), meta=dict(meta))


def set_learning_rate(optimizer: Any, lr_schedule: Any, base_lr: float) -> float:
    """Make `base_lr` the schedule's base learning rate from the current step on; the rate now in use.

    diffusers' schedules are `LambdaLR`s: lr = base_lr x lambda(step), so the schedule's shape
    (warmup, decay) is kept and only its scale changes.
    """
    lambdas = getattr(lr_schedule, "lr_lambdas", None)
    lr_schedule.base_lrs = [base_lr for _ in lr_schedule.base_lrs]
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * (lambdas[i](lr_schedule.last_epoch) if lambdas else 1.0)
    lr_schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
    return float(optimizer.param_groups[0]["lr"])


def advice(style: str, step: int, cause: str, lr: float, retries: int, mixed_precision: str, max_grad_norm: float) -> str:
    """The message of :class:`TrainingDiverged`: what happened and what to change."""
    tried = (f"also after {retries} retr{'y' if retries == 1 else 'ies'} from the last good state, each at half the "
             "learning rate (train.max_divergence_retries)") if retries else "and train.max_divergence_retries is 0"
    precision = (f" train.mixed_precision is {mixed_precision}: fp16 overflows easily, try bf16 or no."
                 if mixed_precision == "fp16" else " Mixed precision fp16 overflows more easily than bf16 or no.")
    return (f"{style}: training diverged at step {step}: {cause} at learning rate {lr:g}, {tried}. "
            f"Lower train.learning_rate (e.g. to {lr / 10:g}); gradients are already clipped to norm "
            f"{max_grad_norm:g}.{precision} No adapter was written.")
