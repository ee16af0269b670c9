"""mi_crow.mechanistic.sae.metrics: every metric against a hand computation or a plain float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae import metrics as M

pytestmark = pytest.mark.usefixtures("one_thread")


# Two tokens in two dimensions, every number below worked out by hand.
X = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
X_HAT = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
# mean(x) = (0.5, 1); sum ||x - mean||^2 = 0.25 + 1 + 0.25 + 1 = 2.5; sum ||x - x_hat||^2 = 1 + 1 = 2.


def test_reconstruction_metrics_by_hand():
    assert M.fvu(X, X_HAT) == pytest.approx(2 / 2.5, rel=1e-12)
    assert M.explained_variance(X, X_HAT) == pytest.approx(1 - 2 / 2.5, rel=1e-12)
    assert M.mse(X, X_HAT) == pytest.approx(2 / 4, rel=1e-12)
    assert M.cossim(X, X_HAT) == pytest.approx(1.0, rel=1e-12)  # each reconstruction points along its input
    # ||x_hat|| / ||x|| = 2 / 1 and 1 / 2.
    assert M.l2_ratio(X, X_HAT) == pytest.approx((2.0 + 0.5) / 2, rel=1e-12)
    # mean ||x_hat||^2 = (4 + 1) / 2; mean <x, x_hat> = (2 + 2) / 2.
    assert M.relative_reconstruction_bias(X, X_HAT) == pytest.approx(2.5 / 2.0, rel=1e-12)
    stats = M.ReconstructionStats(2)
    stats.update(X, X_HAT)
    out = stats.compute()
    assert out["l2_norm_in"] == pytest.approx(1.5) and out["l2_norm_out"] == pytest.approx(1.5)
    assert "l0" not in out  # no code given, no sparsity numbers invented


def test_cossim_and_l2_ratio_by_hand_with_an_angle_and_a_zero_input():
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    # cos 45 degrees, and 0 for the zero input; the zero input's norm ratio is divided by 1 (SAEBench's guard).
    assert M.cossim(x, x_hat) == pytest.approx((math.sqrt(0.5) + 0.0) / 2, rel=1e-12)
    assert M.l2_ratio(x, x_hat) == pytest.approx((math.sqrt(2.0) + 3.0) / 2, rel=1e-12)


def test_sparsity_and_density_by_hand():
    values = torch.tensor([[3.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    indices = torch.tensor([[0, 2, 1], [2, 0, 1]])
    assert M.l0(values) == pytest.approx(1.5)  # 2 active, then 1 (a value of 0 is not active)
    assert M.l1(values) == pytest.approx(3.0)  # (3 + 1 + 0 + 2 + 0 + 0) / 2
    density = M.feature_density(values, indices, 4)
    # latent 0: token 0 only (value 0 on token 1); latent 2: both tokens; latents 1 and 3: never.
    assert density.tolist() == [0.5, 0.0, 1.0, 0.0]
    assert M.dead_latents(density) == 2
    assert M.dense_latents(density) == 2 and M.dense_latents(density, 0.75) == 1
    hist = M.density_histogram(density, bins=8, low=-8.0)
    assert hist["edges"] == [float(e) for e in range(-8, 1)]
    assert hist["counts"] == [0, 0, 0, 0, 0, 0, 0, 2] and hist["dead"] == 2  # log10 0.5 and log10 1 in [-1, 0]
    hist = M.density_histogram(torch.tensor([1e-3, 1e-12, 0.02]), bins=4, low=-8.0)
    assert hist["counts"] == [1, 0, 1, 1]  # 1e-12 is clamped into the first bin, 1e-3 in [-4, -2), 0.02 in [-2, 0]

    stats = M.ReconstructionStats(2, n_latents=4)
    stats.update(X, X_HAT, values, indices)
    out = stats.compute()
    assert out["l0"] == pytest.approx(1.5) and out["l1"] == pytest.approx(3.0)
    assert stats.feature_density().tolist() == density.tolist()
    assert out["frac_alive"] == 0.5 and out["dead_latents"] == 2 and out["dense_latents"] == 2
    assert out["freq_over_1_percent"] == 0.5 and out["freq_over_10_percent"] == 0.5
    assert out["normalized_freq_over_1_percent"] == pytest.approx(1.0)  # every firing is by a latent above 1%


def test_downstream_scores_by_hand():
    clean = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[math.log(3.0), 0.0]])
    # p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
    assert float(M.kl_divergence(clean, new)) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert float(M.kl_divergence(clean, clean)) == pytest.approx(0.0, abs=1e-7)
    assert M.ce_loss_score(2.0, 2.5, 4.0) == pytest.approx(0.75)
    assert M.kl_div_score(0.1, 0.4) == pytest.approx(0.75)
    assert math.isnan(M.ce_loss_score(2.0, 2.5, 2.0)) and math.isnan(M.kl_div_score(0.1, 0.0))


def test_max_cosine_similarity_by_hand_and_chunked():
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [-1.0, 0.0]])
    # unit rows e1, (e1 + e2)/sqrt2, e2, -e1: the first three have a 45-degree neighbour, -e1 at best e2 (0).
    expected = [math.sqrt(0.5)] * 3 + [0.0]
    for chunk in (None, 1, 3, 4):
        assert M.max_cosine_similarity(w, chunk_size=chunk).tolist() == pytest.approx(expected, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 16, generator=g)
    unit = big.double() / big.double().norm(dim=1, keepdim=True)
    full = unit @ unit.T
    full.fill_diagonal_(-math.inf)
    ref = full.max(dim=1).values
    got = M.max_cosine_similarity(big, chunk_size=7)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


def _two_pass(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    xd, hd = x.double(), x_hat.double()
    return float((xd - hd).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum())


def test_fvu_is_exact_far_from_the_origin_and_independent_of_batching():
    """Far from the origin (a per-dimension offset of 300 sigma) the ``sum x^2 - (sum x)^2 / N`` form from float32
    partial sums loses digits; the float64 Chan merge must agree with a float64 two-pass reference to 1e-9."""
    g = torch.Generator().manual_seed(1)
    n, d = 16384, 64
    x = (300.0 + torch.randn(n, d, generator=g)).float()
    x_hat = (x + 0.3 * torch.randn(n, d, generator=g)).float()
    ref = _two_pass(x, x_hat)

    # The data really are hard: the defect's formula (float32 partial sums per batch of 4096) misses by orders of
    # magnitude more than the tolerance below.
    sq = sum(float(b.pow(2).sum()) for b in x.split(4096))
    tot = sum(b.sum(0).double() for b in x.split(4096))
    naive = float((x.double() - x_hat.double()).pow(2).sum()) / (sq - float(tot.dot(tot)) / n)
    assert abs(naive - ref) / ref > 1e-5

    stats = M.ReconstructionStats(d)
    for xb, hb in zip(x.split(1000), x_hat.split(1000)):  # uneven last batch
        stats.update(xb, hb)
    assert stats.compute()["fvu"] == pytest.approx(ref, rel=1e-9)
    assert M.fvu(x, x_hat) == pytest.approx(ref, rel=1e-9)
    one = M.ReconstructionStats(d)
    one.update(x, x_hat)
    for key, value in one.compute().items():
        assert stats.compute()[key] == pytest.approx(value, rel=1e-9), key


def test_stats_match_plain_float64_formulas_on_an_sae(one_thread):
    from mi_crow.mechanistic.sae import TopKSae

    torch.manual_seed(0)
    sae = TopKSae(48, 12, 4)
    x = torch.randn(200, 12) * 2 + 1
    with torch.no_grad():
        out = sae(x)
    dense = sae.encode_dense(x).detach().double()
    xd, hd = x.double(), out.reconstruction.double()
    stats = M.ReconstructionStats(12, n_latents=48)
    for a, b, v, i in zip(x.split(64), out.reconstruction.split(64), out.code.values.split(64), out.code.indices.split(64)):
        stats.update(a, b, v, i)
    got = stats.compute()
    fired = (dense > 0).double()
    ref = {
        "fvu": float((xd - hd).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum()),
        "mse": float((xd - hd).pow(2).mean()),
        "cossim": float(torch.nn.functional.cosine_similarity(xd, hd, dim=1).mean()),
        "l2_ratio": float((hd.norm(dim=1) / xd.norm(dim=1)).mean()),
        "relative_reconstruction_bias": float(hd.pow(2).sum(1).mean() / (xd * hd).sum(1).mean()),
        "l0": float(fired.sum(1).mean()),
        "l1": float(dense.sum(1).mean()),
        "frac_alive": float((fired.sum(0) > 0).double().mean()),
    }
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    torch.testing.assert_close(stats.feature_density(), fired.mean(0), rtol=0, atol=1e-12)


def test_bad_input_names_the_argument():
    with pytest.raises(UserInputError, match="x_hat must be a tensor of the shape of x"):
        M.fvu(X, X_HAT[:1])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        M.mse([[1.0]], X_HAT)
    with pytest.raises(UserInputError, match="ReconstructionStats must be fed at least one token"):
        M.ReconstructionStats(2).compute()
    with pytest.raises(UserInputError, match=r"x must be a \[tokens, 3\] tensor"):
        M.ReconstructionStats(3).update(X, X_HAT)
    with pytest.raises(UserInputError, match="indices must be a tensor of the shape of values"):
        M.feature_density(torch.ones(2, 3), torch.zeros(2, 2, dtype=torch.int64), 4)
    with pytest.raises(UserInputError, match="chunk_size must be a positive int"):
        M.max_cosine_similarity(X, chunk_size=0)
