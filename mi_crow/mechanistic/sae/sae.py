"""`TopKSae`: a TopK sparse autoencoder that is also a hook on a language-model layer.

The shared machinery (parameters, hook, encode/decode plumbing, save/load) lives in `SaeBase` (``base.py``);
`SparseCode`, `SaeOutput` and `LinearView` are re-exported here, where they have always been importable from.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mi_crow.mechanistic.sae.base import SaeBase, SaeOutput, SparseCode, _zero_outliers  # noqa: F401
from mi_crow.mechanistic.sae.linear_view import LinearView

__all__ = ["LinearView", "SaeOutput", "SparseCode", "TopKSae"]


class TopKSae(SaeBase):
    """TopK sparse autoencoder (Gao et al., 2024) that can be attached to a layer as a forward hook.

    ``code = topk(relu((x - b_dec) @ W_enc.T + b_enc), k)`` and ``x_hat = b_dec + sum_j values_j * W_dec[idx_j]``.
    The encoder, top-k and sparse decoder run on the `mi_crow.ops` kernels (C++ on CPU, Triton on CUDA).

    Attached to a layer (``lm.attach_sae(sae, layer)``) the SAE encodes every token of the layer's output:
    - ``mode="observe"`` (default) and no concept manipulation: the output is returned untouched (bit-exact); the
      codes only feed concept tracking;
    - with manipulations (``sae.concepts``): ``output + decode(modified code) - decode(code)``, so the
      reconstruction error is kept and only the change is added;
    - ``mode="replace"``: the output is replaced by the reconstruction (of the modified code, if any).
    The SAE computes in its own dtype and casts its result back to the layer's dtype (bf16 models work).

    Args:
        n_latents: dictionary size ``n`` (positive int).
        n_inputs: input width ``d`` (positive int), the hidden size of the layer it reads.
        k: active latents per token, ``1 <= k <= n_latents``; used everywhere (encode, training, hooks).
        device: where the parameters live.
        dtype: floating dtype of the parameters.
        mode: ``"observe"`` or ``"replace"`` (see above).
        layer_signature: the layer this SAE belongs to (set by ``lm.attach_sae``; also saved with the SAE).
        hook_id: the hook id (random when omitted).

    Parameters (``nn.Parameter``): ``W_enc [n, d]``, ``b_enc [n]``, ``W_dec [n, d]`` with unit-norm rows,
    ``b_dec [d]``. ``sae.encoder`` / ``sae.decoder`` show them in ``nn.Linear``'s layout (`LinearView`):
    ``encoder.weight`` is ``W_enc`` ``[n, d]``, ``decoder.weight`` is ``W_dec.T`` ``[d, n]``.

    Raises:
        TypeError / ValueError: a size is not a positive int, ``k > n_latents``, an unknown mode or a non-floating
            dtype.
    """

    architecture: ClassVar[str] = "topk"
    selection = "topk"

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
            n_latents,
            n_inputs,
            k,
            device,
            dtype,
            mode=mode,
            layer_signature=layer_signature,
            hook_id=hook_id,
        )
