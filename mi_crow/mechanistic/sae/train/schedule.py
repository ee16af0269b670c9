"""The schedules of a run: the learning rate (warm-up, constant, optional linear or cosine decay), its default peak,
and the number of active latents when k-annealing is on."""

from __future__ import annotations

import math

from mi_crow.mechanistic.sae.config import SaeTrainingConfig

__all__ = ["default_lr", "k_at_step", "lr_at_step", "width_lr"]


#: The fitted rule of `default_lr`: the peak learning rate
#: ``LR_RULE_C * (n / 2**14) ** LR_RULE_WIDTH_EXPONENT * (budget / 2**20) ** LR_RULE_BUDGET_EXPONENT``, never below
#: OpenAI's ``2e-4 / sqrt(n / 2**14)``.
#: From benchmarks/bench_lr_sweep.py (results: benchmarks/results/bench_lr_sweep.json).
LR_RULE_C = 1.967e-3
LR_RULE_WIDTH_EXPONENT = 0.049
LR_RULE_BUDGET_EXPONENT = -0.435


def width_lr(n_latents: int) -> float:
    """OpenAI's learning rate for a dictionary of ``n_latents`` latents, ``2e-4 / sqrt(n_latents / 2**14)`` (Gao et
    al., 2024, fitted on runs of billions of tokens): the floor of `default_lr`."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def default_lr(n_latents: int, budget_tokens: int) -> float:
    """The default peak learning rate of a run of ``budget_tokens`` tokens on ``n_latents`` latents.

    A power law fitted by a sweep, never below OpenAI's width rule ``2e-4 / sqrt(n_latents / 2**14)`` (Gao et al.,
    2024, fitted on long runs)::

        max(2e-4 / sqrt(n_latents / 2**14),
            LR_RULE_C * (n_latents / 2**14) ** LR_RULE_WIDTH_EXPONENT * (budget_tokens / 2**20) ** LR_RULE_BUDGET_EXPONENT)

    with ``LR_RULE_C = 1.967e-3``, ``LR_RULE_WIDTH_EXPONENT = 0.049`` and ``LR_RULE_BUDGET_EXPONENT = -0.435``.

    Derived from a sweep (``benchmarks/bench_lr_sweep.py``, written to ``benchmarks/results/bench_lr_sweep.json``):
    TopK SAEs (k = 32, batch 1024, the rest of the default recipe) on SmolLM2-135M ``model.layers.15`` (d = 576,
    117,557 training and 12,650 held-out token vectors, sinks removed), peak learning rate over multiples of
    OpenAI's rule, held-out FVU and dead latents per run. For each (width, budget) cell the best multiple is the one
    with the lowest held-out FVU among runs leaving at most 1% of the latents dead on the held-out set (the recipe's
    target): 8 at n = 1152 and 65k tokens, 16 at n = 4608 and 65k, 4 at n = 1152 and 262k, and 5.1 at n = 4608 and
    1M (held-out FVU 0.2208 with 0.5% dead; 4.1x gave 0.2245, 6.1x 0.2183 but 1.3% dead, 8x 0.2177 but 6% dead;
    the 1M runs other than 8x come from ``benchmarks/bench_recipe_ablation.py`` and ``bench_quality.py``, the same
    recipe and data). The least-squares power law
    through the four optima is ``1.97e-3 * (n / 2**14) ** 0.049 * (budget / 2**20) ** -0.435`` (rms error 3.6% in
    log lr). Ignoring dead latents the best multiples are 1.5-2x higher but leave 1.3-45% of the latents dead.

    Limits: four cells for three parameters, so the fit is barely checked by the sweep itself; the 1M cell's
    optimum sits on the edge of the runs with at most 1% dead (5.1x is the highest such run). Outside the swept
    range (widths 1152-4608, budgets 65k-1M tokens) the law is extrapolated. The floor keeps long runs at OpenAI's
    rule, which was fitted on runs of billions of tokens; at n = 4608 the law reaches that floor near 40M tokens.
    On the synthetic ground truth (``benchmarks/bench_ground_truth.py``) higher rates still recover more of the
    dictionary (MCC 0.88 at the previous rule, 0.92-0.93 at 2-4x it at the CI gate's size).

    Args:
        n_latents: dictionary size.
        budget_tokens: tokens the run will train on (optimizer steps times batch size).
    """
    openai = width_lr(n_latents)
    fitted = (LR_RULE_C * (n_latents / 2**14) ** LR_RULE_WIDTH_EXPONENT
              * (max(1, budget_tokens) / 2**20) ** LR_RULE_BUDGET_EXPONENT)
    return max(openai, fitted)


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
