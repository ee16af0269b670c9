"""`b_dec_median` (the fast geometric median of the ``b_dec`` initialisation) against the reference Weiszfeld
implementation `geometric_median` (float64, 200 iterations, tolerance 1e-7): the same point where both see the same
points, and on a subsample an estimate whose cost (sum of distances over the whole sample) is the reference's."""

from __future__ import annotations

import pytest
import torch

from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae, geometric_median
from mi_crow.mechanistic.sae.train.init import b_dec_median

pytestmark = pytest.mark.usefixtures("one_thread")


def _cloud(m: int, d: int, seed: int = 0) -> torch.Tensor:
    """An offset, anisotropic, heavy-tailed cloud with 5% gross outliers (what makes the median differ from the
    mean)."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.linspace(-3.0, 5.0, d)
    spread = torch.linspace(0.2, 2.0, d)
    x = offset + spread * torch.randn(m, d, generator=g) / torch.rand(m, 1, generator=g).clamp_min(0.2)
    x[: m // 20] += 60.0  # all on one side: they drag the mean
    return x


def _cost(points: torch.Tensor, p: torch.Tensor) -> float:
    return float((points.double() - p.double()).norm(dim=1).sum())


def test_same_point_as_the_reference_on_the_same_points():
    x = _cloud(3000, 24)
    ref, fast = geometric_median(x), b_dec_median(x)
    scale = float((x - x.mean(0)).norm(dim=1).mean())
    assert float((fast - ref).norm()) < 1e-5 * scale
    assert _cost(x, fast) == pytest.approx(_cost(x, ref), rel=1e-9)
    assert float((x.mean(0) - ref).norm()) > 0.1 * scale  # the outliers move the mean, not the median
    assert fast.dtype == x.dtype and fast.shape == (24,)


def test_point_sitting_on_the_median_and_one_point():
    values = torch.tensor([0.0, 1.0, 2.0, 3.0, 100.0]).unsqueeze(1)
    assert float(b_dec_median(values)) == pytest.approx(2.0, abs=1e-5)
    one = torch.tensor([[1.5, -2.0, 3.0]])
    torch.testing.assert_close(b_dec_median(one), one[0])
    same = one.repeat(7, 1)  # every point on the median: zero distances floored, no NaN
    torch.testing.assert_close(b_dec_median(same), one[0])


def test_a_subsample_gives_the_reference_quality_on_the_whole_sample():
    x = _cloud(32768, 96, seed=1)
    ref = geometric_median(x)
    fast = b_dec_median(x)  # on 8192 of the 32768 points
    scale = float((x - x.mean(0)).norm(dim=1).mean())
    # The cost over all 32768 points: the subsample's median is within 1e-4 of the optimum (a random point at the
    # same distance from the median costs far more), and it sits within 3% of the spread from the full median.
    assert _cost(x, fast) <= _cost(x, ref) * (1 + 1e-4)
    assert float((fast - ref).norm()) < 0.03 * scale
    assert _cost(x, x.mean(0)) > _cost(x, ref) * (1 + 1e-3)
    # The full sample (max_points above m) gives the reference's point.
    whole = b_dec_median(x, max_points=x.shape[0])
    assert float((whole - ref).norm()) < 1e-5 * scale


def test_the_trainer_initialises_b_dec_with_it():
    x = _cloud(4096, 16, seed=2)
    sae = TopKSae(32, 16, 4)
    cfg = SaeTrainingConfig(batch_size=256, n_tokens=256, lr=1e-12, warmup_steps=0, dead_window_tokens=256,
                            b_dec_init="geometric_median", b_dec_init_tokens=4096, outlier_norm_factor=None,
                            progress=False, checkpoint_every=None, save_sae=False)
    SaeTrainer(sae).train_on_tensor(x, cfg)
    ref = geometric_median(x)
    scale = float((x - x.mean(0)).norm(dim=1).mean())
    assert float((sae.b_dec.detach() - ref).norm()) < 1e-4 * scale
