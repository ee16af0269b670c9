"""`BatchTopKSae`: BatchTopK sparse autoencoder (Bussmann et al., 2024) on the fused kernels.

Training keeps the ``k * B`` largest activations of the whole batch (not ``k`` per token); see
`mi_crow.ops.batch_topk` for the fused selection. Inference uses one global ``threshold`` (a 0-d buffer) estimated
while training: a latent is active when its activation exceeds it, so inference does not depend on the batch.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mi_crow.mechanistic.sae.base import SaeBase

__all__ = ["BatchTopKSae"]


class BatchTopKSae(SaeBase):
    """BatchTopK SAE: per batch, the ``k * B`` largest activations over all ``B`` tokens during training; a global
    threshold at inference.

    Parameters as in `TopKSae` (``W_enc [n, d]``, ``b_enc [n]``, ``W_dec [n, d]``, ``b_dec [d]``) plus the buffer
    ``threshold``, a 0-d tensor: the running estimate of the smallest activation the batch selection keeps (an
    exponential moving average over training steps). It is NaN until training sets it; while it is NaN, ``encode``
    falls back to the per-token top-``k``. Set it by hand with ``sae.threshold.fill_(t)``.

    Args:
        n_latents, n_inputs, k: as for `TopKSae` (``k`` is the mean number of active latents per token).
        device, dtype, mode, layer_signature, hook_id: as for `TopKSae`.
    """

    architecture: ClassVar[str] = "batchtopk"
    selection = "batchtopk"

    def __init__(
        self,
        n_latents: int,
        n_inputs: int,
        k: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        mode: str = "observe",
        layer_signature: str | int | None = None,
        hook_id: str | None = None,
    ) -> None:
        super().__init__(
            n_latents, n_inputs, k, device, dtype, mode=mode, layer_signature=layer_signature, hook_id=hook_id
        )
