"""Weight initialisation at the start of a fresh run: decoder, encoder, ``b_dec`` from data, and the input scale."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.config import SaeTrainingConfig
from mi_crow.mechanistic.sae.outliers import attention_sink_mask
from mi_crow.mechanistic.sae.sae import TopKSae
from mi_crow.mechanistic.sae.train.results import NonFiniteTrainingError

__all__ = ["b_dec_median", "fold_into_weights", "initialise_weights"]

#: The ``b_dec`` median is estimated on at most this many vectors of the sample, evenly spaced through it: the
#: estimate's error is then ~1% of the data's spread in the direction of a 576-wide residual (far below what the first
#: steps move ``b_dec``), and the Weiszfeld iterations cost a quarter of those on a 32k-token sample.
MEDIAN_POINTS = 8192
#: Weiszfeld iteration cap and tolerance (an update moving the estimate by less than ``MEDIAN_TOL`` times the mean
#: distance to it stops the iteration; from the mean, typical activations converge in 10-40 iterations).
MEDIAN_MAX_ITER = 100
MEDIAN_TOL = 1e-6


def _sample(config: SaeTrainingConfig, sample_reader: Callable[[], Iterable[Tensor]]) -> Tensor:
    """The first ``b_dec_init_tokens`` finite, non-sink vectors of the sample reader (float32, CPU)."""
    chunks, have = [], 0
    for batch in sample_reader():
        chunks.append(batch.to(device="cpu", dtype=torch.float32))
        have += batch.shape[0]
        if have >= config.b_dec_init_tokens:
            break
    if not chunks:
        raise UserInputError("SaeTrainer: the activation run yields no batch to initialise b_dec from")
    sample = torch.cat(chunks)[: config.b_dec_init_tokens]
    sample = sample[torch.isfinite(sample).all(dim=1)]
    sample = sample[~attention_sink_mask(sample, factor=config.outlier_norm_factor)]
    if sample.shape[0] == 0:
        raise NonFiniteTrainingError("SaeTrainer: every token of the b_dec initialisation sample is non-finite")
    return sample


@torch.no_grad()
def initialise_weights(
    sae: TopKSae, config: SaeTrainingConfig, sample_reader: Callable[[], Iterable[Tensor]]
) -> float:
    """Initialise the SAE's weights as ``config`` asks, in the frame training works in.

    - ``reinit_weights``: fresh unit-norm decoder rows from ``seed`` and a zero ``b_enc`` (else both are kept);
    - ``init_encoder_from_decoder``: ``W_enc = W_dec`` (else a fresh random encoder when reinitialising, the current
      one when not);
    - ``b_dec_init``: the geometric median or mean of a data sample, zeros, or ``"keep"``;
    - ``normalize_inputs``: the scale ``s`` with mean ``||s x||^2 = n_inputs`` on the sample; kept weights are moved
      into the scaled frame (``b_enc``, ``b_dec`` times ``s``), the inverse of `fold_into_weights`.

    Args:
        sae: the SAE, changed in place.
        config: the options above, ``b_dec_init_tokens`` and ``outlier_norm_factor`` (sinks are left out of the
            sample, by the one outlier rule).
        sample_reader: makes an iterable of ``[*, n_inputs]`` batches; its first ``b_dec_init_tokens`` finite
            vectors give ``b_dec`` and the scale.

    Returns:
        The input scale ``s`` (1.0 without ``normalize_inputs``).

    Raises:
        UserInputError: the sample yields no batch.
        NonFiniteTrainingError: no token of the sample is finite.
    """
    needs_sample = config.b_dec_init in ("geometric_median", "mean") or config.normalize_inputs
    sample = _sample(config, sample_reader) if needs_sample else None
    scale = 1.0
    if config.normalize_inputs:
        assert sample is not None
        mean_sq = float(sample.double().pow(2).sum(dim=1).mean())
        scale = math.sqrt(sae.n_inputs / mean_sq) if mean_sq > 0 else 1.0
        sample = sample * scale
        sae.b_enc.mul_(scale)
        sae.b_dec.mul_(scale)
        if isinstance(getattr(sae, "threshold", None), Tensor):  # thresholds are on activations: same frame
            sae.threshold.mul_(scale)
    if config.reinit_weights:
        generator = torch.Generator().manual_seed(config.seed)
        sae.reset_parameters(generator)
        if not config.init_encoder_from_decoder and not sae.is_transcoder:
            w = torch.randn(sae.n_latents, sae.n_inputs, generator=generator) / math.sqrt(sae.n_inputs)
            sae.W_enc.copy_(w)
    elif config.init_encoder_from_decoder and not sae.is_transcoder:
        sae.W_enc.copy_(sae.W_dec)
    if config.b_dec_init == "zeros":
        sae.b_dec.zero_()
    elif config.b_dec_init != "keep":
        assert sample is not None
        if sae.is_transcoder:  # the batch rows are [input | target]; b_dec starts at the target's centre
            sample = sample[:, sae.n_inputs :]
        sae.b_dec.copy_(b_dec_median(sample) if config.b_dec_init == "geometric_median" else sample.mean(dim=0))
    return scale


@torch.no_grad()
def b_dec_median(
    points: Tensor, *, max_points: int = MEDIAN_POINTS, max_iter: int = MEDIAN_MAX_ITER, tol: float = MEDIAN_TOL
) -> Tensor:
    """Geometric median of ``points [m, d]`` for the ``b_dec`` initialisation: Weiszfeld's algorithm, vectorised.

    The same estimate as `mi_crow.mechanistic.sae.data.geometric_median` (the reference: float64, from the mean, a
    floored inverse-distance weighting), computed at a fraction of its cost:

    - at most ``max_points`` points, evenly spaced through ``points`` (the sample is already in shuffled order);
    - the points are centred on their mean once, and each iteration needs two matrix-vector products:
      ``||c_i - g||^2 = ||c_i||^2 - 2 c_i.g + ||g||^2`` and the weighted sum ``w @ c`` -- no ``[m, d]`` temporary
      per iteration (the reference allocates two);
    - a tolerance relative to the data's spread (``tol`` times the mean distance to the mean) and an iteration cap.

    In float64, the expanded distance is exact to ~3e-8 of the spread, so the inverse-distance weights are floored at
    1e-6 of it (the reference floors at 1e-12 of it with exact distances): a point sitting on the median still gets
    the largest weight, which keeps the estimate on it.

    Args:
        points: ``[m, d]`` floating tensor (``m >= 1``).
        max_points, max_iter, tol: as above.

    Returns:
        ``[d]`` in ``points.dtype``.
    """
    m = points.shape[0]
    if m > max_points:
        points = points[torch.arange(max_points, dtype=torch.int64) * m // max_points]
    p = points.to(torch.float64)
    mean = p.mean(dim=0)
    c = p - mean
    sq = torch.einsum("md,md->m", c, c)
    scale = float(sq.sqrt().mean().clamp_min(1e-30))
    floor = 1e-6 * scale
    guess = torch.zeros_like(mean)  # relative to the mean: the reference's start
    for _ in range(max_iter):
        dist = (sq - 2.0 * (c @ guess) + guess.dot(guess)).clamp_min(0.0).sqrt()
        weights = dist.clamp_min(floor).reciprocal()
        new = (weights @ c) / weights.sum()
        moved = float((new - guess).norm())
        guess = new
        if moved < tol * scale:
            break
    return (guess + mean).to(points.dtype)


@torch.no_grad()
def fold_into_weights(sae: TopKSae, input_scale: float, decoder_norms: bool) -> None:
    """Turn the weights trained in the scaled, decoder-norm-ranked frame into a plain SAE on raw activations.

    With decoder norms: ``W_enc``, ``b_enc`` times ``||d_i||`` and ``W_dec`` rows divided by it (the same pre-activations
    and reconstructions, now with unit rows, so a plain top-k ranks as training did). With an input scale ``s``:
    ``b_enc`` and ``b_dec`` divided by ``s``, so ``sae(x)`` reconstructs ``x`` as the trained SAE reconstructed
    ``s x``, divided by ``s`` (latent values come out divided by ``s`` too; top-k order is unchanged).

    Args:
        sae: the SAE, changed in place.
        input_scale: the scale ``s`` the inputs were multiplied by during training.
        decoder_norms: whether training ranked latents by decoder-row norm (``topk_by_decoder_norm``).
    """
    if decoder_norms:
        norms = sae.W_dec.norm(dim=1).clamp_min(1e-12)
        sae.W_enc.mul_(norms.unsqueeze(1))
        sae.b_enc.mul_(norms)
        sae.W_dec.div_(norms.unsqueeze(1))
    if input_scale != 1.0:
        sae.b_enc.div_(input_scale)
        sae.b_dec.div_(input_scale)
        if isinstance(getattr(sae, "threshold", None), Tensor):  # BatchTopK / JumpReLU thresholds are activations
            sae.threshold.div_(input_scale)
