"""Ground truth for SAE training: a known dictionary, data generated from it, and scores of how much was recovered.

No language model is involved. `make_ground_truth` draws a dictionary of unit-norm feature directions and a firing
model with the three properties that make real activations hard:

- **a long tail**: the firing probabilities of the top-level features follow a Zipf law (``p_i ~ rank_i^-a``), so a
  few features fire often and most rarely;
- **correlation**: top-level features come in groups whose firing is coupled through a shared Gaussian factor (a
  Gaussian copula with correlation ``correlation`` inside a group), so features co-occur;
- **hierarchy**: some top-level features are parents of children that can fire only when their parent fires.

A token is ``x = sum_i a_i f_i + noise``, with ``a_i`` a positive magnitude for every firing feature ``i``.
`score_recovery` compares a trained SAE with the truth: the mean over true features of the best cosine similarity of
any decoder row (``mmcs``), and the mean correlation coefficient (``mcc``) between each true feature's activations and
its SAE latent's activations on fresh samples after a one-to-one (Hungarian) matching of features to latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from mi_crow.validation import check_int, check_positive_int, check_real, check_tensor, fail

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.sae import TopKSae

__all__ = [
    "GroundTruth",
    "SyntheticConfig",
    "linear_sum_assignment",
    "make_ground_truth",
    "mean_max_cosine_similarity",
    "matched_correlation",
    "score_recovery",
]


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of a synthetic ground truth (see the module docstring).

    Raises:
        UserInputError / ArgumentTypeError: a field out of range (the message names it).
    """

    d_in: int = 256
    """Width of the generated vectors."""

    n_features: int = 1024
    """Number of true features (dictionary rows); more than ``d_in`` puts them in superposition."""

    mean_active: float = 8.0
    """Expected number of firing features per token."""

    zipf_exponent: float = 1.0
    """Exponent ``a`` of the Zipf law of the top-level firing probabilities (0: all equal)."""

    max_probability: float = 0.25
    """Cap on any feature's firing probability."""

    n_parents: int = 32
    """Top-level features that have children."""

    children_per_parent: int = 4
    """Children of each parent (``n_parents * children_per_parent`` features are children)."""

    child_probability: float = 0.25
    """Probability that a child fires when its parent fires (it never fires otherwise)."""

    group_size: int = 8
    """Top-level features per correlated group."""

    correlation: float = 0.4
    """Correlation of the Gaussian factors of two top-level features in the same group (in [0, 1))."""

    magnitude_std: float = 0.25
    """Spread of the firing magnitudes: ``a = max(0.1, 1 + magnitude_std * N(0, 1))``."""

    noise_std: float = 0.01
    """Standard deviation of the isotropic Gaussian noise added to every coordinate."""

    seed: int = 0
    """Seed of the dictionary and the firing model."""

    def __post_init__(self) -> None:
        check_positive_int(self.d_in, "SyntheticConfig.d_in")
        check_positive_int(self.n_features, "SyntheticConfig.n_features")
        check_real(self.mean_active, "SyntheticConfig.mean_active", minimum=0.0, min_inclusive=False)
        check_real(self.zipf_exponent, "SyntheticConfig.zipf_exponent", minimum=0.0)
        check_real(self.max_probability, "SyntheticConfig.max_probability", minimum=0.0, maximum=1.0, min_inclusive=False)
        check_int(self.n_parents, "SyntheticConfig.n_parents", minimum=0)
        check_int(self.children_per_parent, "SyntheticConfig.children_per_parent", minimum=0)
        check_real(self.child_probability, "SyntheticConfig.child_probability", minimum=0.0, maximum=1.0)
        check_positive_int(self.group_size, "SyntheticConfig.group_size")
        check_real(self.correlation, "SyntheticConfig.correlation", minimum=0.0, maximum=1.0, max_inclusive=False)
        check_real(self.magnitude_std, "SyntheticConfig.magnitude_std", minimum=0.0)
        check_real(self.noise_std, "SyntheticConfig.noise_std", minimum=0.0)
        check_int(self.seed, "SyntheticConfig.seed", minimum=0)
        n_children = self.n_parents * self.children_per_parent
        if self.n_parents + n_children > self.n_features:
            raise fail(
                "SyntheticConfig.n_features",
                f"at least n_parents * (1 + children_per_parent) = {self.n_parents + n_children}",
                self.n_features,
            )


class GroundTruth:
    """A sampled ground truth: the dictionary and the firing model of a `SyntheticConfig`.

    Attributes:
        config: the configuration.
        dictionary: ``[n_features, d_in]`` float32 unit-norm feature directions.
        probability: ``[n_features]`` float64 marginal firing probability of each feature.
        parent: ``[n_features]`` int64, the parent of each child feature (-1 for top-level features).
        group: ``[n_features]`` int64, the correlated group of each top-level feature (-1 for children).
    """

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        g = torch.Generator().manual_seed(config.seed)
        n, n_par, per = config.n_features, config.n_parents, config.children_per_parent
        n_children = n_par * per
        n_top = n - n_children
        d = torch.randn(n, config.d_in, generator=g, dtype=torch.float64)
        self.dictionary = (d / d.norm(dim=1, keepdim=True)).float()
        # Top-level features are 0..n_top-1 (parents first), children n_top.. in parent order. Zipf ranks are
        # shuffled so that neither parents nor any group hold all the frequent features.
        ranks = torch.randperm(n_top, generator=g).double() + 1.0
        weights = ranks.pow(-config.zipf_exponent)
        self.parent = torch.full((n,), -1, dtype=torch.int64)
        self.parent[n_top:] = torch.arange(n_par).repeat_interleave(per)
        self.group = torch.full((n,), -1, dtype=torch.int64)
        self.group[:n_top] = torch.arange(n_top) // config.group_size
        # Scale the Zipf weights so the expected number of firing features (children included) is mean_active;
        # the cap makes this a one-dimensional root find, solved by bisection on the scale.
        child_mass = torch.zeros(n_top, dtype=torch.float64)
        child_mass[:n_par] = per * config.child_probability

        def expected(scale: float) -> float:
            p = (scale * weights).clamp(max=config.max_probability)
            return float((p * (1.0 + child_mass)).sum())

        lo, hi = 0.0, 1.0
        while expected(hi) < config.mean_active and hi < 1e12:
            hi *= 2.0
        if expected(hi) < config.mean_active:
            raise fail(
                "SyntheticConfig.mean_active",
                f"reachable with max_probability={config.max_probability} (at most {expected(hi):.3g})",
                config.mean_active,
            )
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if expected(mid) < config.mean_active else (lo, mid)
        top_p = (hi * weights).clamp(max=config.max_probability)
        self.probability = torch.empty(n, dtype=torch.float64)
        self.probability[:n_top] = top_p
        self.probability[n_top:] = top_p[self.parent[n_top:]] * config.child_probability
        # Firing threshold of each top-level feature on its standard normal factor: P(z > t) = p.
        self._threshold_f32 = (-torch.special.ndtri(top_p)).float()
        self._n_top = n_top

    @property
    def n_features(self) -> int:
        return self.config.n_features

    @property
    def d_in(self) -> int:
        return self.config.d_in

    @torch.no_grad()
    def sample(self, n_tokens: int, *, seed: int = 0, chunk: int = 8192) -> tuple[Tensor, Tensor]:
        """Draw tokens and their true feature activations.

        Args:
            n_tokens: number of tokens.
            seed: seed of this sample (independent of the dictionary's).
            chunk: tokens generated at a time (bounds the ``[chunk, n_features]`` temporaries).

        Returns:
            ``x [n_tokens, d_in]`` float32 and ``activations [n_tokens, n_features]`` float32 (0 where a feature
            does not fire). For large samples use `sample_x`, which never holds the activations.
        """
        check_positive_int(n_tokens, "n_tokens")
        xs, acts = [], []
        g = torch.Generator().manual_seed(1_000_003 * (seed + 1))
        for start in range(0, n_tokens, chunk):
            a = self._activations(min(chunk, n_tokens - start), g)
            xs.append(self._embed(a, g))
            acts.append(a)
        return torch.cat(xs), torch.cat(acts)

    @torch.no_grad()
    def sample_x(self, n_tokens: int, *, seed: int = 0, chunk: int = 8192) -> Tensor:
        """``x [n_tokens, d_in]`` float32 as in `sample`, without keeping the activations."""
        check_positive_int(n_tokens, "n_tokens")
        out = torch.empty(n_tokens, self.d_in)
        g = torch.Generator().manual_seed(1_000_003 * (seed + 1))
        for start in range(0, n_tokens, chunk):
            b = min(chunk, n_tokens - start)
            out[start : start + b] = self._embed(self._activations(b, g), g)
        return out

    def _activations(self, b: int, g: torch.Generator) -> Tensor:
        cfg = self.config
        n_top, n_groups = self._n_top, int(self.group[: self._n_top].max()) + 1
        # float32 factors: the thresholds only need to resolve probabilities well above float32's 1e-7 resolution.
        shared = torch.randn(b, n_groups, generator=g)
        z = torch.randn(b, n_top, generator=g).mul_(math.sqrt(1.0 - cfg.correlation))
        z.add_(shared[:, self.group[:n_top]], alpha=math.sqrt(cfg.correlation))
        fires = torch.zeros(b, cfg.n_features, dtype=torch.bool)
        fires[:, :n_top] = z > self._threshold_f32
        if n_top < cfg.n_features:
            child_draw = torch.rand(b, cfg.n_features - n_top, generator=g)
            fires[:, n_top:] = fires[:, self.parent[n_top:]] & (child_draw < cfg.child_probability)
        # Magnitudes are drawn for the firing entries only (a few per token, not n_features).
        out = torch.zeros(b, cfg.n_features)
        where = fires.nonzero(as_tuple=True)
        out[where] = (1.0 + cfg.magnitude_std * torch.randn(where[0].shape[0], generator=g)).clamp_min(0.1)
        return out

    def _embed(self, a: Tensor, g: torch.Generator) -> Tensor:
        x = a @ self.dictionary
        if self.config.noise_std > 0:
            x += self.config.noise_std * torch.randn(x.shape, generator=g)
        return x


def make_ground_truth(config: SyntheticConfig | None = None) -> GroundTruth:
    """Draw the dictionary and firing model of ``config`` (defaults when None)."""
    if config is None:
        config = SyntheticConfig()
    if not isinstance(config, SyntheticConfig):
        raise fail("config", "a SyntheticConfig or None", config)
    return GroundTruth(config)


# -- scoring ---------------------------------------------------------------------------------------------------------
def linear_sum_assignment(cost: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one assignment of rows to columns (the Hungarian method with potentials, O(n^2 m)).

    Same contract as ``scipy.optimize.linear_sum_assignment`` for a finite cost matrix: every row of a wide matrix
    (or every column of a tall one) is assigned.

    Args:
        cost: ``[n, m]`` finite costs.

    Returns:
        ``(rows, cols)`` int64 arrays of length ``min(n, m)``, rows ascending; ``cost[rows, cols].sum()`` is minimal.
    """
    c = cost.detach().cpu().double().numpy() if isinstance(cost, Tensor) else np.asarray(cost, dtype=np.float64)
    if c.ndim != 2:
        raise fail("cost", "a 2-D matrix", cost)
    if not np.isfinite(c).all():
        raise fail("cost", "a matrix of finite numbers", cost)
    if c.shape[0] > c.shape[1]:
        cols, rows = linear_sum_assignment(c.T)
        order = np.argsort(rows)
        return rows[order], cols[order]
    n, m = c.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    # 1-based potentials u (rows) and v (columns); p[j] is the row matched to column j, column 0 is a sentinel.
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=np.int64)
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            free = ~used[1:]
            reduced = c[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0 != 0:  # augment along the alternating path
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    cols = np.nonzero(p[1:])[0]
    rows = p[1:][cols] - 1
    order = np.argsort(rows)
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


def mean_max_cosine_similarity(true_dictionary: Tensor, learned: Tensor) -> float:
    """Mean over true features of the largest cosine similarity with any learned row.

    Args:
        true_dictionary: ``[n_features, d]`` true directions.
        learned: ``[n_latents, d]`` learned directions (e.g. ``W_dec``).
    """
    check_tensor(true_dictionary, "true_dictionary", ndim=2, floating=True)
    check_tensor(learned, "learned", ndim=2, floating=True, shape=(None, true_dictionary.shape[1]))
    t = torch.nn.functional.normalize(true_dictionary.detach().double(), dim=1)
    s = torch.nn.functional.normalize(learned.detach().double(), dim=1)
    return float((t @ s.T).max(dim=1).values.mean())


def matched_correlation(true_acts: Tensor, learned_acts: Tensor) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean correlation coefficient (MCC) after a one-to-one matching of true features to learned latents.

    The Pearson correlation of every (true feature, latent) pair over the tokens is computed; the Hungarian method
    picks the matching that maximises the summed correlation; MCC is the mean correlation of the matched pairs,
    averaged over the true features (a feature or latent that is constant on the sample correlates 0).

    Args:
        true_acts: ``[tokens, n_features]`` true activations.
        learned_acts: ``[tokens, n_latents]`` SAE latent activations, ``n_latents >= n_features``.

    Returns:
        ``(mcc, features, latents)``: the score and the matched index pairs.
    """
    check_tensor(true_acts, "true_acts", ndim=2, floating=True)
    check_tensor(learned_acts, "learned_acts", ndim=2, floating=True, shape=(true_acts.shape[0], None))
    if learned_acts.shape[1] < true_acts.shape[1]:
        raise fail("learned_acts", f"at least n_features={true_acts.shape[1]} latents", learned_acts)

    def standardise(a: Tensor) -> Tensor:
        a = a.detach().double()
        a = a - a.mean(dim=0)
        norm = a.norm(dim=0)
        return (a / torch.where(norm > 0, norm, torch.ones_like(norm))).float()

    # Standardised in float64, multiplied in float32: correlations need ~1e-6, not the 5x slower float64 product.
    corr = (standardise(true_acts).T @ standardise(learned_acts)).double()  # [n_features, n_latents]
    rows, cols = linear_sum_assignment(-corr.numpy())
    return float(corr[rows, cols].sum()) / true_acts.shape[1], rows, cols


@torch.no_grad()
def score_recovery(truth: GroundTruth, sae: TopKSae, *, n_tokens: int = 32768, seed: int = 12345) -> dict[str, float]:
    """How much of the ground truth an SAE recovered, on a fresh sample.

    Args:
        truth: the ground truth the SAE was trained on.
        sae: the trained SAE (``n_latents >= n_features`` for the MCC matching).
        n_tokens: size of the scoring sample (every feature should fire several times in it).
        seed: seed of the scoring sample (keep it apart from the training sample's).

    Returns:
        ``mmcs`` (mean max cosine similarity of the true directions to the decoder rows), ``mcc`` (matched
        activation correlation), ``matched_cosine`` (mean cosine of the matched decoder rows), ``fvu`` of the SAE
        on the sample and ``unseen_features`` (true features that did not fire in the sample).
    """
    from mi_crow.mechanistic.sae.metrics import fvu as fvu_

    check_positive_int(n_tokens, "n_tokens")
    if sae.n_inputs != truth.d_in:
        raise fail("sae.n_inputs", f"the ground truth's d_in={truth.d_in}", sae.n_inputs)
    x, acts = truth.sample(n_tokens, seed=seed)
    out = sae(x.to(device=sae.device, dtype=sae.dtype))
    dense = sae.dense(out.code).float().cpu()
    mcc, rows, cols = matched_correlation(acts, dense)
    t = torch.nn.functional.normalize(truth.dictionary.double(), dim=1)
    w = torch.nn.functional.normalize(sae.W_dec.detach().double().cpu(), dim=1)
    matched = float((t[torch.as_tensor(rows)] * w[torch.as_tensor(cols)]).sum(dim=1).mean())
    return {
        "mmcs": mean_max_cosine_similarity(truth.dictionary, sae.W_dec.detach().float().cpu()),
        "mcc": mcc,
        "matched_cosine": matched,
        "fvu": fvu_(x, out.reconstruction.float().cpu()),
        "unseen_features": float(((acts > 0).sum(dim=0) == 0).sum()),
    }
