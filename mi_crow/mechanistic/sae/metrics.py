"""SAE quality metrics on tensors, named as in SAEBench's ``core`` evaluation.

Pure functions of tensors (no model, no store) plus `ReconstructionStats`, a streaming accumulator that `evaluate`
feeds batch by batch. Every sum is accumulated in float64; the total variance (the FVU denominator) is merged from
per-batch means and centred sums of squares (Chan et al.'s pairwise update), never as ``sum ||x||^2 - ||sum x||^2 / N``,
which loses every digit when the data sit far from the origin (a per-dimension offset of 300 standard deviations
costs 14% with float32 partial sums).

Definitions (``x``: input token vectors, ``x_hat``: reconstructions, both ``[tokens, d]``; sums run over tokens):

- ``fvu`` = ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``; ``explained_variance`` = ``1 - fvu``.
- ``mse``: mean over tokens and dimensions of ``(x - x_hat)^2``.
- ``cossim``: mean over tokens of ``cos(x, x_hat)`` (a zero vector counts as cosine 0).
- ``l2_norm_in`` / ``l2_norm_out``: mean ``||x||`` / ``||x_hat||``; ``l2_ratio``: mean of ``||x_hat|| / ||x||``
  per token (a token with ``||x|| < 1e-4`` is divided by 1, as SAEBench does).
- ``relative_reconstruction_bias``: ``mean ||x_hat||^2 / mean <x, x_hat>``, the scale ``gamma`` minimising
  ``E ||x_hat / gamma - x||^2`` (Rajamanoharan et al., 2024, eq. 10): below 1 means shrinkage.
- ``l0``: mean number of latents with a value > 0 per token; ``l1``: mean sum of latent values per token.
- ``feature_density``: per latent, the fraction of tokens on which it is active (value > 0). A latent is dead when
  its density is 0 and dense when it exceeds 10% (SAEBench's ``freq_over_10_percent``).
- ``ce_loss_score`` = ``(ce_ablation - ce_sae) / (ce_ablation - ce_clean)``; ``kl_div_score`` =
  ``(kl_ablation - kl_sae) / kl_ablation``, with ``kl`` = ``KL(p_clean || p_new)`` of the next-token distributions
  and "ablation" the layer's output replaced by zeros.
- ``max_cosine_similarity``: per latent, the largest cosine similarity of its (decoder or encoder) row with any other
  latent's row, computed in chunks so no ``[n, n]`` matrix ever exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mi_crow.validation import check_positive_int, check_real, check_tensor, fail

__all__ = [
    "DENSE_THRESHOLD",
    "ReconstructionStats",
    "ce_loss_score",
    "cossim",
    "dead_latents",
    "dense_latents",
    "density_histogram",
    "explained_variance",
    "feature_density",
    "fvu",
    "kl_divergence",
    "kl_div_score",
    "l0",
    "l1",
    "l2_ratio",
    "max_cosine_similarity",
    "mse",
    "relative_reconstruction_bias",
]

#: A latent active on more than this fraction of tokens is "dense" (SAEBench's ``freq_over_10_percent``).
DENSE_THRESHOLD = 0.1
#: Tokens with an input norm below this are divided by 1 in ``l2_ratio`` (SAEBench's guard against 0/0).
_TINY_NORM = 1e-4


def _pair(x: Any, x_hat: Any) -> tuple[Tensor, Tensor]:
    x = check_tensor(x, "x", ndim=2, floating=True)
    x_hat = check_tensor(x_hat, "x_hat", ndim=2, floating=True)
    if x.shape != x_hat.shape:
        raise fail("x_hat", f"a tensor of the shape of x {list(x.shape)}", x_hat)
    return x, x_hat


def _code(values: Any, indices: Any | None = None) -> None:
    check_tensor(values, "values", floating=True)
    if indices is not None:
        check_tensor(indices, "indices", dtypes=(torch.int64,))
        if indices.shape != values.shape:
            raise fail("indices", f"a tensor of the shape of values {list(values.shape)}", indices)


@dataclass
class ReconstructionStats:
    """Streaming float64 accumulator of the reconstruction, shrinkage and sparsity metrics.

    Feed it batches with `update` and read the metrics with `compute`; the result does not depend on how the tokens
    were split into batches (up to float64 rounding).

    Args:
        n_inputs: width ``d`` of the token vectors.
        n_latents: dictionary size (for the per-latent firing counts); None skips the sparsity metrics.

    Attributes:
        n_tokens: tokens seen.
        mean: ``[d]`` float64 running mean of ``x``.
        m2: ``[d]`` float64 running sum of squared deviations from ``mean`` (the total variance is ``m2.sum()``).
        fire_counts: ``[n_latents]`` int64, tokens on which each latent was active.
    """

    n_inputs: int
    n_latents: int | None = None
    n_tokens: int = field(init=False, default=0)
    mean: Tensor = field(init=False)
    m2: Tensor = field(init=False)
    fire_counts: Tensor | None = field(init=False)
    sums: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        check_positive_int(self.n_inputs, "ReconstructionStats.n_inputs")
        check_positive_int(self.n_latents, "ReconstructionStats.n_latents", allow_none=True)
        self.mean = torch.zeros(self.n_inputs, dtype=torch.float64)
        self.m2 = torch.zeros(self.n_inputs, dtype=torch.float64)
        self.fire_counts = None if self.n_latents is None else torch.zeros(self.n_latents, dtype=torch.int64)
        keys = ("sse", "norm_in", "norm_out", "ratio", "cos", "xhat_sq", "dot", "active", "l1")
        self.sums = dict.fromkeys(keys, 0.0)
        self._has_code = False

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, values: Tensor | None = None, indices: Tensor | None = None) -> None:
        """Add a batch.

        Args:
            x: ``[tokens, d]`` inputs.
            x_hat: ``[tokens, d]`` their reconstructions.
            values: ``[tokens, k]`` code values (optional; needed for ``l0``, ``l1`` and the densities).
            indices: ``[tokens, k]`` int64 latent indices of ``values`` (needed with ``n_latents`` for the
                densities).
        """
        x, x_hat = _pair(x, x_hat)
        if x.shape[1] != self.n_inputs:
            raise fail("x", f"a [tokens, {self.n_inputs}] tensor", x)
        b = int(x.shape[0])
        if b == 0:
            return
        xd = x.detach().to(device="cpu", dtype=torch.float64)
        hd = x_hat.detach().to(device="cpu", dtype=torch.float64)
        # Chan's merge of (count, mean, M2): the batch is centred on its own float64 mean first, so no digit is lost
        # to a large common offset.
        batch_mean = xd.mean(dim=0)
        batch_m2 = (xd - batch_mean).pow(2).sum(dim=0)
        total = self.n_tokens + b
        delta = batch_mean - self.mean
        self.mean += delta * (b / total)
        self.m2 += batch_m2 + delta.pow(2) * (self.n_tokens * b / total)
        self.n_tokens = total

        s = self.sums
        s["sse"] += float((xd - hd).pow(2).sum())
        norm_in = xd.norm(dim=1)
        norm_out = hd.norm(dim=1)
        dot = (xd * hd).sum(dim=1)
        s["norm_in"] += float(norm_in.sum())
        s["norm_out"] += float(norm_out.sum())
        s["ratio"] += float((norm_out / torch.where(norm_in < _TINY_NORM, torch.ones_like(norm_in), norm_in)).sum())
        denom = norm_in * norm_out
        s["cos"] += float(torch.where(denom > 0, dot / denom.clamp_min(1e-300), torch.zeros_like(dot)).sum())
        s["xhat_sq"] += float(norm_out.pow(2).sum())
        s["dot"] += float(dot.sum())
        if values is not None:
            _code(values, indices)
            if values.shape[0] != b:
                raise fail("values", f"a tensor with {b} rows (one per token of x)", values)
            self._has_code = True
            v = values.detach().to(device="cpu", dtype=torch.float64)
            active = v > 0
            s["active"] += float(active.sum())
            s["l1"] += float(v.abs().sum())
            if self.fire_counts is not None and indices is not None:
                # index_add: a latent listed twice for one token (only possible in hand-made codes) counts twice,
                # like its value does in the decode.
                idx = indices.detach().to("cpu").reshape(-1)
                self.fire_counts.index_add_(0, idx, active.reshape(-1).to(torch.int64))

    def total_variance(self) -> float:
        """``sum_i ||x_i - mean||^2`` over every token seen (float64)."""
        return float(self.m2.sum())

    def compute(self) -> dict[str, float]:
        """The metrics of everything seen so far (see the module docstring for the definitions).

        Returns:
            ``fvu``, ``explained_variance``, ``mse``, ``cossim``, ``l2_norm_in``, ``l2_norm_out``, ``l2_ratio``,
            ``relative_reconstruction_bias``; with code values also ``l0`` and ``l1``; with firing counts also
            ``frac_alive``, ``dead_latents``, ``dense_latents``, ``freq_over_1_percent``, ``freq_over_10_percent``,
            ``normalized_freq_over_1_percent``, ``normalized_freq_over_10_percent``. NaN where a ratio is 0/0.

        Raises:
            UserInputError: no token was seen.
        """
        n = self.n_tokens
        if n == 0:
            raise fail("ReconstructionStats", "fed at least one token before compute()", 0)
        s = self.sums
        var = self.total_variance()
        fvu_ = s["sse"] / var if var > 0 else math.nan
        out = {
            "fvu": fvu_,
            "explained_variance": 1.0 - fvu_,
            "mse": s["sse"] / (n * self.n_inputs),
            "cossim": s["cos"] / n,
            "l2_norm_in": s["norm_in"] / n,
            "l2_norm_out": s["norm_out"] / n,
            "l2_ratio": s["ratio"] / n,
            "relative_reconstruction_bias": s["xhat_sq"] / s["dot"] if s["dot"] != 0 else math.nan,
        }
        if self._has_code:
            out["l0"] = s["active"] / n
            out["l1"] = s["l1"] / n
        if self.fire_counts is not None:
            out.update(_density_summary(self.fire_counts.double() / n))
        return out

    def feature_density(self) -> Tensor:
        """``[n_latents]`` float64: fraction of the tokens seen on which each latent was active."""
        if self.fire_counts is None or self.n_tokens == 0:
            raise fail("ReconstructionStats", "built with n_latents and fed tokens before feature_density()", None)
        return self.fire_counts.double() / self.n_tokens


def _density_summary(density: Tensor) -> dict[str, float]:
    total = float(density.sum())
    over1 = density > 0.01
    over10 = density > DENSE_THRESHOLD
    return {
        "frac_alive": float((density > 0).double().mean()),
        "dead_latents": float((density == 0).sum()),
        "dense_latents": float(over10.sum()),
        "freq_over_1_percent": float(over1.double().mean()),
        "freq_over_10_percent": float(over10.double().mean()),
        "normalized_freq_over_1_percent": float(density[over1].sum()) / total if total > 0 else 0.0,
        "normalized_freq_over_10_percent": float(density[over10].sum()) / total if total > 0 else 0.0,
    }


# -- reconstruction ----------------------------------------------------------------------------------------------
def _stats(x: Tensor, x_hat: Tensor) -> dict[str, float]:
    x, x_hat = _pair(x, x_hat)
    if x.shape[0] == 0:
        raise fail("x", "a tensor with at least one token", x)
    stats = ReconstructionStats(int(x.shape[1]))
    stats.update(x, x_hat)
    return stats.compute()


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (float64, stable).

    Args:
        x: ``[tokens, d]`` inputs.
        x_hat: ``[tokens, d]`` reconstructions.

    Returns:
        The FVU (NaN when every token is the same vector).
    """
    return _stats(x, x_hat)["fvu"]


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """``1 - fvu(x, x_hat)`` (SAEBench's ``explained_variance``)."""
    return _stats(x, x_hat)["explained_variance"]


def mse(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens and dimensions of ``(x - x_hat)^2`` (``[tokens, d]`` each)."""
    return _stats(x, x_hat)["mse"]


def cossim(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of the cosine similarity of ``x`` and ``x_hat`` (``[tokens, d]`` each; 0 for a zero
    vector)."""
    return _stats(x, x_hat)["cossim"]


def l2_ratio(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of ``||x_hat|| / ||x||`` (``[tokens, d]`` each; tokens with ``||x|| < 1e-4`` divide by 1)."""
    return _stats(x, x_hat)["l2_ratio"]


def relative_reconstruction_bias(x: Tensor, x_hat: Tensor) -> float:
    """``mean ||x_hat||^2 / mean <x, x_hat>`` over tokens (``[tokens, d]`` each): 1 for an unbiased scale, below 1
    when the SAE shrinks its reconstructions."""
    return _stats(x, x_hat)["relative_reconstruction_bias"]


# -- sparsity ----------------------------------------------------------------------------------------------------
def l0(values: Tensor) -> float:
    """Mean number of active latents (value > 0) per token.

    Args:
        values: ``[tokens, k]`` TopK code values or ``[tokens, n_latents]`` dense codes.
    """
    _code(values)
    if values.dim() != 2 or values.shape[0] == 0:
        raise fail("values", "a [tokens, k] tensor with at least one token", values)
    return float((values > 0).sum(dtype=torch.float64)) / values.shape[0]


def l1(values: Tensor) -> float:
    """Mean over tokens of the sum of absolute latent values (``[tokens, k]`` or ``[tokens, n_latents]``)."""
    _code(values)
    if values.dim() != 2 or values.shape[0] == 0:
        raise fail("values", "a [tokens, k] tensor with at least one token", values)
    return float(values.detach().double().abs().sum()) / values.shape[0]


def feature_density(values: Tensor, indices: Tensor, n_latents: int) -> Tensor:
    """Per latent, the fraction of tokens on which it is active (value > 0).

    Args:
        values: ``[tokens, k]`` code values.
        indices: ``[tokens, k]`` int64 latent indices.
        n_latents: dictionary size.

    Returns:
        ``[n_latents]`` float64 densities in [0, 1].
    """
    _code(values, indices)
    check_positive_int(n_latents, "n_latents")
    if values.dim() != 2 or values.shape[0] == 0:
        raise fail("values", "a [tokens, k] tensor with at least one token", values)
    counts = torch.zeros(n_latents, dtype=torch.int64)
    counts.index_add_(0, indices.detach().cpu().reshape(-1), (values.detach().cpu() > 0).reshape(-1).to(torch.int64))
    return counts.double() / values.shape[0]


def dead_latents(density: Tensor) -> int:
    """Number of latents that never fired (density 0). ``density``: ``[n_latents]``."""
    check_tensor(density, "density", ndim=1, floating=True)
    return int((density == 0).sum())


def dense_latents(density: Tensor, threshold: float = DENSE_THRESHOLD) -> int:
    """Number of latents active on more than ``threshold`` of the tokens. ``density``: ``[n_latents]``."""
    check_tensor(density, "density", ndim=1, floating=True)
    check_real(threshold, "threshold", minimum=0.0, maximum=1.0)
    return int((density > threshold).sum())


def density_histogram(density: Tensor, *, bins: int = 20, low: float = -8.0) -> dict[str, list[float] | int]:
    """Histogram of ``log10(feature density)`` over latents, the usual picture of an SAE's firing frequencies.

    Args:
        density: ``[n_latents]`` densities in [0, 1].
        bins: number of equal-width bins between ``low`` and 0.
        low: lower edge in log10 units (densities below ``10**low`` but above 0 go into the first bin).

    Returns:
        ``{"edges": [bins + 1 floats], "counts": [bins ints], "dead": latents with density 0}``.
    """
    check_tensor(density, "density", ndim=1, floating=True)
    check_positive_int(bins, "bins")
    check_real(low, "low", maximum=0.0, max_inclusive=False)
    alive = density[density > 0].double()
    logd = alive.log10().clamp(min=low, max=0.0)
    counts = torch.histc(logd, bins=bins, min=low, max=0.0) if alive.numel() else torch.zeros(bins)
    edges = torch.linspace(low, 0.0, bins + 1, dtype=torch.float64)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()], "dead": int((density == 0).sum())}


# -- downstream loss -----------------------------------------------------------------------------------------------
def kl_divergence(clean_logits: Tensor, new_logits: Tensor) -> Tensor:
    """``KL(softmax(clean) || softmax(new))`` per position, in nats.

    Args:
        clean_logits: ``[..., vocab]`` logits of the unmodified model.
        new_logits: ``[..., vocab]`` logits with the intervention.

    Returns:
        ``[...]`` float32 (float64 for float64 inputs) KL divergences (>= 0).
    """
    check_tensor(clean_logits, "clean_logits", floating=True)
    check_tensor(new_logits, "new_logits", floating=True)
    if clean_logits.shape != new_logits.shape:
        raise fail("new_logits", f"a tensor of the shape of clean_logits {list(clean_logits.shape)}", new_logits)
    dtype = torch.float64 if clean_logits.dtype == torch.float64 else torch.float32
    log_p = torch.log_softmax(clean_logits.to(dtype), dim=-1)
    log_q = torch.log_softmax(new_logits.to(dtype), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def ce_loss_score(ce_clean: float, ce_sae: float, ce_ablation: float) -> float:
    """Fraction of the loss gap closed by the SAE: ``(ce_ablation - ce_sae) / (ce_ablation - ce_clean)``.

    1 means splicing the SAE in costs nothing, 0 means it is as bad as zeroing the layer. NaN when zeroing the layer
    does not change the loss.
    """
    gap = float(ce_ablation) - float(ce_clean)
    return (float(ce_ablation) - float(ce_sae)) / gap if abs(gap) > 1e-12 else math.nan


def kl_div_score(kl_sae: float, kl_ablation: float) -> float:
    """``(kl_ablation - kl_sae) / kl_ablation``: 1 when the SAE leaves the next-token distribution unchanged, 0 when
    it changes it as much as zeroing the layer. NaN when zeroing the layer does not change it."""
    return (float(kl_ablation) - float(kl_sae)) / float(kl_ablation) if abs(kl_ablation) > 1e-12 else math.nan


# -- weights -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def max_cosine_similarity(weights: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Per latent, the largest cosine similarity of its row with any other latent's row.

    Computed ``chunk_size`` rows at a time against all rows (``[chunk_size, n]`` scores at most), so it runs for
    dictionaries whose ``[n, n]`` similarity matrix would not fit in memory; the cost is ``n^2 d`` multiply-adds.

    Args:
        weights: ``[n_latents, d]`` decoder (``W_dec``) or encoder (``W_enc``) rows.
        chunk_size: rows per chunk; None picks one that keeps the score block near 16M entries.

    Returns:
        ``[n_latents]`` float32 maxima (-inf when there is a single latent; a zero row has similarity 0 to all).
    """
    check_tensor(weights, "weights", ndim=2, floating=True)
    n = int(weights.shape[0])
    if chunk_size is None:
        chunk_size = max(1, min(n, (1 << 24) // max(n, 1)))
    check_positive_int(chunk_size, "chunk_size")
    w = weights.detach().float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = torch.empty(n, dtype=torch.float32, device=w.device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        scores = w[start:end] @ w.T
        rows = torch.arange(end - start, device=w.device)
        scores[rows, rows + start] = float("-inf")
        out[start:end] = scores.max(dim=1).values
    return out
