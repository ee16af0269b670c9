"""Ground truth: the synthetic generator has the properties it claims, the scores are right, and a CI gate on the
training maths — the recipe recovers a known dictionary, and a broken recipe does not.

The gate trains on 1M synthetic tokens (about 10-20 s on one core). Its threshold sits well below what the recipe
reaches (MCC ~0.88-0.92 at seed 0, see benchmarks/bench_ground_truth.py for the full size) and well above what a 100x
learning rate reaches (~0.27), so a regression of the recipe fails it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae
from mi_crow.mechanistic.sae.synthetic import (
    SyntheticConfig,
    linear_sum_assignment,
    make_ground_truth,
    matched_correlation,
    mean_max_cosine_similarity,
    score_recovery,
)

pytestmark = pytest.mark.usefixtures("one_thread")

GATE = SyntheticConfig(d_in=128, n_features=256, n_parents=16, children_per_parent=2, mean_active=4.0, seed=0)
GATE_LATENTS, GATE_K, GATE_TOKENS, GATE_EPOCHS = 512, 6, 200_000, 5
MCC_THRESHOLD = 0.8


def test_linear_sum_assignment_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(120):
        n, m = int(rng.integers(1, 6)), int(rng.integers(1, 7))
        cost = rng.normal(size=(n, m))
        if trial % 3 == 0:
            cost = np.round(cost)  # ties
        rows, cols = linear_sum_assignment(cost)
        assert len(rows) == min(n, m) and len(set(rows)) == len(set(cols)) == min(n, m)
        assert list(rows) == sorted(rows)
        if n <= m:
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        else:
            best = min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))
        assert cost[rows, cols].sum() == pytest.approx(best, abs=1e-9)
    with pytest.raises(UserInputError, match="cost must be a matrix of finite numbers"):
        linear_sum_assignment(np.array([[np.inf]]))


def test_generator_has_the_structure_it_claims():
    cfg = SyntheticConfig(d_in=32, n_features=96, n_parents=4, children_per_parent=3, mean_active=5.0,
                          group_size=4, correlation=0.6, seed=3)
    truth = make_ground_truth(cfg)
    torch.testing.assert_close(truth.dictionary.norm(dim=1), torch.ones(96), rtol=0, atol=1e-6)
    n_top = 96 - 12
    # Zipf: uncapped top-level probabilities are proportional to rank^-1.
    p = truth.probability[:n_top].sort(descending=True).values
    free = p < cfg.max_probability
    ranks = torch.arange(1, n_top + 1, dtype=torch.float64)[free]
    ratio = p[free] * ranks
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-9, atol=0)
    assert float(truth.probability.sum()) == pytest.approx(5.0, rel=1e-6)

    x, acts = truth.sample(100_000, seed=1)
    fired = acts > 0
    assert float(fired.sum(1).double().mean()) == pytest.approx(5.0, rel=0.03)
    empirical = fired.double().mean(0)
    big = truth.probability > 0.02
    torch.testing.assert_close(empirical[big], truth.probability[big], rtol=0.1, atol=0)
    # Hierarchy: a child fires only with its parent.
    children = torch.arange(n_top, 96)
    assert not (fired[:, children] & ~fired[:, truth.parent[children]]).any()
    # Correlation: firing of two frequent features of one group co-occurs more than independence predicts; of two
    # groups it does not.
    f = fired.double()
    lift = (f.T @ f / f.shape[0]) / torch.outer(empirical, empirical).clamp_min(1e-12)
    frequent = torch.nonzero(empirical[:n_top] > 0.03).flatten()
    pairs = torch.combinations(frequent)
    same_group = truth.group[pairs[:, 0]] == truth.group[pairs[:, 1]]
    lifts = lift[pairs[:, 0], pairs[:, 1]]
    assert same_group.any() and (~same_group).any()
    assert float(lifts[same_group].mean()) > 1.5
    assert float(lifts[~same_group].mean()) == pytest.approx(1.0, abs=0.1)
    # x is the activations through the dictionary plus small noise.
    assert float((x - acts @ truth.dictionary).std()) == pytest.approx(cfg.noise_std, rel=0.05)


def test_scores_of_a_perfect_and_a_permuted_recovery():
    truth = make_ground_truth(SyntheticConfig(d_in=16, n_features=24, n_parents=2, children_per_parent=2,
                                              mean_active=2.0, seed=1))
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    assert mean_max_cosine_similarity(truth.dictionary, truth.dictionary[perm]) == pytest.approx(1.0)
    _, acts = truth.sample(5000, seed=2)
    extra = torch.rand(5000, 8)  # unmatched extra latents must not matter
    mcc, rows, cols = matched_correlation(acts, torch.cat([acts[:, perm], extra], dim=1))
    assert mcc == pytest.approx(1.0)
    assert (perm[torch.as_tensor(cols)] == torch.as_tensor(rows)).all()
    # by hand: two features, the latent of the second is its negation half the time -> correlation known exactly
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    mcc, _, _ = matched_correlation(a, a.flip(1))
    assert mcc == pytest.approx(1.0)
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # corr(a0, b0) = 1, corr(a1, b1) = 1/sqrt(3)
    mcc, _, _ = matched_correlation(a, b)
    assert mcc == pytest.approx((1.0 + 1.0 / 3**0.5) / 2)
    with pytest.raises(UserInputError, match="learned_acts must be at least n_features=2 latents"):
        matched_correlation(a, b[:, :1])
    with pytest.raises(UserInputError, match="sae.n_inputs must be the ground truth's d_in=16, got 8"):
        score_recovery(truth, TopKSae(32, 8, 2))


def _train_on_gate(config: SaeTrainingConfig) -> dict[str, float]:
    truth = make_ground_truth(GATE)
    x = truth.sample_x(GATE_TOKENS, seed=1)
    torch.manual_seed(0)
    sae = TopKSae(GATE_LATENTS, GATE.d_in, GATE_K)
    SaeTrainer(sae).train_on_tensor(x, config)
    return score_recovery(truth, sae, n_tokens=16384)


def _gate_config(**overrides) -> SaeTrainingConfig:
    base = dict(batch_size=1024, epochs=GATE_EPOCHS, progress=False, checkpoint_every=None, save_sae=False)
    return SaeTrainingConfig(**{**base, **overrides})


def test_gate_the_recipe_recovers_the_ground_truth():
    scores = _train_on_gate(_gate_config())
    assert scores["mcc"] > MCC_THRESHOLD, scores
    assert scores["mmcs"] > 0.85, scores


def test_gate_fails_for_a_broken_recipe():
    """The same gate on a recipe with a 100x learning rate: it must fail, or the gate above proves nothing."""
    lr = 100 * TopKSae(GATE_LATENTS, GATE.d_in, GATE_K).default_lr()
    scores = _train_on_gate(_gate_config(lr=lr))
    assert scores["mcc"] < MCC_THRESHOLD, scores
