"""The schedules of a run: the learning rate (warm-up, constant, optional linear or cosine decay), its default peak,
and the number of active latents when k-annealing is on."""

from __future__ import annotations

import math

from mi_crow.mechanistic.sae.config import SaeTrainingConfig

__all__ = ["default_lr", "k_at_step", "lr_at_step"]


def default_lr(n_latents: int, budget_tokens: int) -> float:
    """The default peak learning rate of a run: OpenAI's ``2e-4 / sqrt(n_latents / 2**14)``.

    Args:
        n_latents: dictionary size.
        budget_tokens: tokens the run will train on.
    """
    return 2e-4 / math.sqrt(n_latents / 2**14)


def lr_at_step(step: int, total_steps: int, peak: float, warmup_steps: int, config: SaeTrainingConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, constant, then the configured decay.

    The decay reaches ``lr_final_fraction * peak`` at ``step == total_steps``, one step after the last one taken,
    so every step of the run (the last included) moves the weights even when the final fraction is 0.

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
    span = max(1, total_steps - start)
    frac = min(1.0, (step - start) / span)
    final = config.lr_final_fraction
    if config.lr_decay == "linear":
        return peak * (1.0 - (1.0 - final) * frac)
    return peak * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def k_at_step(step: int, k_start: int, k_final: int, anneal_steps: int) -> int:
    """Active latents at step ``step``: ``k_start`` decaying linearly to ``k_final`` over ``anneal_steps`` steps
    (``k_final`` from then on, and always when ``anneal_steps`` is 0)."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return k_final
    return round(k_start + (k_final - k_start) * step / anneal_steps)
