"""The LoRA adapter's PEFT configuration: rank, alpha, dropout and which modules it wraps."""

from __future__ import annotations

import re

from stunning.config import TrainConfig


def target_modules(cfg: TrainConfig) -> list[str] | str:
    """PEFT `target_modules`: the module names, or with `target_blocks` a regex restricting them
    to those blocks (PEFT full-matches a string against each module path)."""
    if not cfg.target_blocks:
        return list(cfg.target_modules)
    blocks = "|".join(re.escape(b.strip(".")) for b in cfg.target_blocks)
    names = "|".join(re.escape(t) for t in cfg.target_modules)
    return rf"(.*\.)?({blocks})\.(.*\.)?({names})"


def lora_config(cfg: TrainConfig):
    """The `peft.LoraConfig` of `train.*` (gaussian init, drawn from torch's global RNG)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules(cfg),
        init_lora_weights="gaussian",
    )
