"""Weight initialisation at the start of a fresh run: fresh unit-norm decoder, encoder, and ``b_dec`` from data."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.config import SaeTrainingConfig
from mi_crow.mechanistic.sae.data import geometric_median
from mi_crow.mechanistic.sae.sae import TopKSae
from mi_crow.mechanistic.sae.train.results import NonFiniteTrainingError

__all__ = ["initialise_weights"]


@torch.no_grad()
def initialise_weights(
    sae: TopKSae, config: SaeTrainingConfig, sample_reader: Callable[[], Iterable[Tensor]]
) -> None:
    """Re-draw the SAE's weights as ``config`` asks (nothing when ``reinit_weights`` is off).

    Args:
        sae: the SAE, changed in place.
        config: ``seed``, ``init_encoder_from_decoder``, ``b_dec_init`` (``"geometric_median"``, ``"mean"`` or
            ``"zeros"``), ``b_dec_init_tokens`` and ``outlier_norm_factor`` (outliers are left out of the sample).
        sample_reader: makes an iterable of ``[*, n_inputs]`` batches; its first ``b_dec_init_tokens`` finite
            vectors give ``b_dec``.

    Raises:
        UserInputError: the sample yields no batch.
        NonFiniteTrainingError: no token of the sample is finite.
    """
    if not config.reinit_weights:
        return
    generator = torch.Generator().manual_seed(config.seed)
    sae.reset_parameters(generator)
    if not config.init_encoder_from_decoder:
        w = torch.randn(sae.n_latents, sae.n_inputs, generator=generator) / math.sqrt(sae.n_inputs)
        sae.W_enc.copy_(w)
    if config.b_dec_init == "zeros":
        return
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
    if config.outlier_norm_factor is not None and sample.shape[0] > 0:
        norms = sample.norm(dim=1)
        sample = sample[norms <= config.outlier_norm_factor * norms.median()]
    if sample.shape[0] == 0:
        raise NonFiniteTrainingError("SaeTrainer: every token of the b_dec initialisation sample is non-finite")
    center = geometric_median(sample) if config.b_dec_init == "geometric_median" else sample.mean(dim=0)
    sae.b_dec.copy_(center)
