"""The learning-rate schedule: linear warm-up, constant, then an optional linear or cosine decay."""

from __future__ import annotations

import math

from mi_crow.mechanistic.sae.config import SaeTrainingConfig

__all__ = ["lr_at_step"]


def lr_at_step(step: int, total_steps: int, peak: float, warmup_steps: int, config: SaeTrainingConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, constant, then the configured decay.

    Args:
        step: 0-based step index.
        total_steps: planned number of steps.
        peak: peak learning rate.
        warmup_steps: warm-up length (the first step uses ``peak / warmup_steps``).
        config: gives ``lr_decay``, ``lr_decay_start`` and ``lr_final_fraction``.

    Returns:
        The learning rate.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    start = int(config.lr_decay_start * total_steps)
    if config.lr_decay == "none" or step < start:
        return peak
    span = max(1, total_steps - 1 - start)
    frac = min(1.0, (step - start) / span)
    final = config.lr_final_fraction
    if config.lr_decay == "linear":
        return peak * (1.0 - (1.0 - final) * frac)
    return peak * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * frac)))

