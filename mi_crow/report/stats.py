"""Per-feature statistics of a sparse autoencoder over a stream of activations.

One pass, vectorised (``bincount``/``index_add``/``scatter_reduce`` on the sparse code; no Python loop over
features or tokens), bounded memory: only ``[n_latents]`` accumulators and a ``[n_latents, n_bins]`` histogram.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from mi_crow.store import Store

# Histogram of activation values on a log10 axis: SAE latents span several orders of magnitude.
DEFAULT_LOG10_RANGE = (-3.0, 3.0)
DEFAULT_BINS = 24


@dataclass
class FeatureStats:
    """How often and how strongly each SAE feature fires over a set of tokens.

    A feature "fires" on a token when it is among the token's top-k latents with a positive value.
    """

    n_tokens: int
    """Number of tokens seen."""
    fire_count: Tensor
    """``[n_latents]`` int64: tokens on which each feature fired."""
    act_sum: Tensor
    """``[n_latents]`` float64: sum of the feature's activation over the tokens where it fired."""
    act_max: Tensor
    """``[n_latents]`` float32: largest activation (0 for features that never fired)."""
    hist_counts: Tensor
    """``[n_latents, n_bins]`` int64: histogram of positive activations over log10-spaced bins."""
    hist_log10_edges: Tensor
    """``[n_bins + 1]`` float64: bin edges as log10 of the activation (values outside are clipped into the ends)."""
    sq_error_sum: float | None = None
    """Sum over tokens of ``||x - decode(encode(x))||^2`` (None when the SAE has no ``decode``)."""
    x_sum: Tensor | None = None
    """``[d_in]`` float64: sum of the inputs (for the variance in FVU)."""
    x_sq_sum: float | None = None
    """Sum over tokens of ``||x||^2``."""
    cofire_pairs: Tensor | None = None
    """``[n_pairs, 3]`` int64 rows ``(i, j, count)``: tokens (of the first ``cofire_tokens``) on which features
    ``i`` and ``j`` both fired, for each feature's most frequent partners (None when not measured)."""
    cofire_tokens: int = 0
    """Tokens the co-firing counts were measured on."""

    def cofiring(self, feature: int) -> list[tuple[int, float]]:
        """The features that fire with ``feature`` most often: ``(j, share of feature's firings where j fired
        too)``, most frequent first (empty when not measured)."""
        if self.cofire_pairs is None or self.cofire_pairs.numel() == 0:
            return []
        rows = self.cofire_pairs[self.cofire_pairs[:, 0] == feature]
        # The feature's own firings within the sampled tokens are stored as the pair (i, i).
        own = rows[rows[:, 1] == feature]
        fired = int(own[0, 2]) if own.numel() else 0
        return [(int(j), int(c) / fired) for _, j, c in rows.tolist() if j != feature and fired > 0]

    @property
    def n_latents(self) -> int:
        """Number of features."""
        return int(self.fire_count.numel())

    @property
    def frequency(self) -> Tensor:
        """``[n_latents]`` float64: fraction of tokens on which each feature fired."""
        return self.fire_count.double() / max(self.n_tokens, 1)

    @property
    def mean_activation(self) -> Tensor:
        """``[n_latents]`` float64: mean activation over the tokens where the feature fired (0 if never)."""
        return self.act_sum / self.fire_count.clamp_min(1).double()

    @property
    def l0(self) -> float:
        """Mean number of active (positive) latents per token."""
        return float(self.fire_count.sum()) / max(self.n_tokens, 1)

    @property
    def mse(self) -> float | None:
        """Mean squared reconstruction error per element (None without reconstruction)."""
        if self.sq_error_sum is None or self.x_sum is None:
            return None
        return self.sq_error_sum / max(self.n_tokens * self.x_sum.numel(), 1)

    @property
    def fvu(self) -> float | None:
        """Fraction of variance unexplained: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (None without
        reconstruction)."""
        if self.sq_error_sum is None or self.x_sum is None or self.x_sq_sum is None or self.n_tokens == 0:
            return None
        total = self.x_sq_sum - float((self.x_sum**2).sum()) / self.n_tokens
        return self.sq_error_sum / total if total > 0 else float("nan")

    @property
    def dead_fraction(self) -> float:
        """Fraction of features that never fired."""
        return float((self.fire_count == 0).double().mean()) if self.n_latents else 0.0


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def compute_feature_stats(
    sae: Any,
    batches: Iterable[Tensor],
    *,
    n_bins: int = DEFAULT_BINS,
    log10_range: tuple[float, float] = DEFAULT_LOG10_RANGE,
    max_tokens: int | None = None,
    cofire_tokens: int = 8192,
    cofire_top: int = 5,
) -> FeatureStats:
    """Encode activations with ``sae`` and accumulate per-feature firing statistics.

    Args:
        sae: the autoencoder; needs ``encode(x) -> (values, indices)`` (each ``[tokens, k]``), ``n_latents`` and
            ``n_inputs``; with ``decode((values, indices)) -> [tokens, d_in]`` the reconstruction error (MSE, FVU)
            is measured too.
        batches: iterable of activation tensors ``[tokens, d_in]`` (or ``[batch, seq, d_in]``, flattened; padding
            must already be removed).
        n_bins: number of histogram bins.
        log10_range: ``(lo, hi)`` of the histogram on the log10 activation axis.
        max_tokens: stop after this many tokens (``None``: all).
        cofire_tokens: count which features fire together on the first this many tokens (0: not at all).
        cofire_top: partners kept per feature.

    Returns:
        The statistics (on CPU).
    """
    n_bins = _check_int(n_bins, "n_bins", 1)
    if max_tokens is not None:
        _check_int(max_tokens, "max_tokens", 1)
    lo, hi = (float(v) for v in log10_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"log10_range must be (lo, hi) with finite lo < hi, got {log10_range!r}")
    n = _check_int(int(sae.n_latents), "sae.n_latents", 1)
    d = int(sae.n_inputs)
    fire = torch.zeros(n, dtype=torch.int64)
    act_sum = torch.zeros(n, dtype=torch.float64)
    act_max = torch.zeros(n, dtype=torch.float32)
    hist = torch.zeros(n * n_bins, dtype=torch.int64)
    can_decode = callable(getattr(sae, "decode", None))
    sq_err = 0.0
    x_sum = torch.zeros(d, dtype=torch.float64)
    x_sq = 0.0
    seen = 0
    pair_keys: list[Tensor] = []
    with torch.no_grad():
        for x in batches:
            if not isinstance(x, Tensor):
                raise TypeError(f"batches must yield tensors, got {type(x).__name__}")
            if x.shape[-1] != d:
                raise ValueError(f"activations have width {x.shape[-1]} but the SAE expects n_inputs={d}")
            x = x.reshape(-1, d)
            # Tokens the SAE leaves alone (attention sinks, see TopKSae.inlier_mask) count in no statistic.
            keep = sae.inlier_mask(x) if callable(getattr(sae, "inlier_mask", None)) else None
            if keep is not None:
                x = x[keep.to(x.device)]
            if max_tokens is not None:
                x = x[: max_tokens - seen]
            if x.shape[0] == 0:
                break
            values, indices = sae.encode(x)[:2]
            if can_decode:
                recon = sae.decode((values, indices))
                xd = x.to(device=recon.device, dtype=torch.float64)
                sq_err += float(((xd - recon.double()) ** 2).sum())
                x_sum += xd.sum(0).cpu()
                x_sq += float((xd**2).sum())
            if seen < cofire_tokens:
                # Every ordered pair of active latents of a token (the pair (i, i) counts i's own firings).
                take = min(x.shape[0], cofire_tokens - seen)
                v2 = values[:take].detach().cpu()
                i2 = torch.where(v2 > 0, indices[:take].detach().cpu(), torch.full_like(indices[:take].cpu(), -1))
                a, b = i2.unsqueeze(-1), i2.unsqueeze(-2)
                ok = (a >= 0) & (b >= 0)
                pair_keys.append((a * n + b)[ok])
            values = values.detach().float().cpu().reshape(-1)
            indices = indices.detach().cpu().reshape(-1)
            active = values > 0
            values, indices = values[active], indices[active]
            fire += torch.bincount(indices, minlength=n)
            act_sum.index_add_(0, indices, values.double())
            act_max.scatter_reduce_(0, indices, values, reduce="amax")
            bins = ((values.log10() - lo) / (hi - lo) * n_bins).floor().clamp_(0, n_bins - 1).long()
            hist += torch.bincount(indices * n_bins + bins, minlength=n * n_bins)
            seen += x.shape[0]
            if max_tokens is not None and seen >= max_tokens:
                break
    cofire = _top_pairs(torch.cat(pair_keys), n, cofire_top) if pair_keys else None
    return FeatureStats(
        n_tokens=seen,
        cofire_pairs=cofire,
        cofire_tokens=min(seen, cofire_tokens),
        fire_count=fire,
        act_sum=act_sum,
        act_max=act_max,
        hist_counts=hist.view(n, n_bins),
        hist_log10_edges=torch.linspace(lo, hi, n_bins + 1, dtype=torch.float64),
        sq_error_sum=sq_err if can_decode else None,
        x_sum=x_sum if can_decode else None,
        x_sq_sum=x_sq if can_decode else None,
    )


def _top_pairs(keys: Tensor, n: int, top: int) -> Tensor:
    """``(i, j, count)`` rows: each feature's own count (j = i) and its ``top`` most frequent partners."""
    pairs, counts = torch.unique(keys, return_counts=True)
    i, j = pairs // n, pairs % n
    own = i == j
    # Order by feature, then the own count first, then partners by count (descending).
    rank = torch.where(own, torch.full_like(counts, -int(counts.max()) - 1), -counts)
    order = torch.argsort(rank, stable=True)
    order = order[torch.argsort(i[order], stable=True)]
    i, j, counts = i[order], j[order], counts[order]
    start = torch.searchsorted(i, i, right=False)
    within = torch.arange(i.numel()) - start
    keep = within <= top  # the own row plus ``top`` partners
    return torch.stack([i[keep], j[keep], counts[keep]], dim=1)


def feature_stats_from_store(
    sae: Any,
    store: "Store",
    run_id: str,
    layer: str,
    *,
    max_tokens: int | None = None,
    batch_size: int = 4096,
    **kwargs: Any,
) -> FeatureStats:
    """:func:`compute_feature_stats` over a saved activation run, streamed padding-free from the store.

    Args:
        sae: the autoencoder.
        store: the store holding ``activations/<run_id>``.
        run_id: the activation run.
        layer: the layer name as saved in the run.
        max_tokens: stop after this many tokens (``None``: the whole run).
        batch_size: tokens per encoded batch.
        **kwargs: passed to :func:`compute_feature_stats` (``n_bins``, ``log10_range``).

    Returns:
        The statistics.
    """
    reader = store.activation_reader(run_id, layer, batch_size, shuffle=False, drop_last=False)
    return compute_feature_stats(sae, reader, max_tokens=max_tokens, **kwargs)
