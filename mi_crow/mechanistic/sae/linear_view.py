"""`LinearView`: one side (encoder or decoder) of an SAE seen as an ``nn.Linear``, without copying anything."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.base import SaeBase

__all__ = ["LinearView"]


class LinearView:
    """One side of an SAE (any `SaeBase`: `TopKSae`, `BatchTopKSae`, `JumpReLUSae`, `Transcoder`...) seen as an ``nn.Linear``: ``.weight`` and ``.bias`` are the SAE's own parameters.

    ``sae.encoder`` and ``sae.decoder`` are such views (nothing is copied; they are not submodules, so the SAE's
    ``state_dict`` keeps its four entries ``W_enc, b_enc, W_dec, b_dec``):

    - ``sae.encoder.weight`` is ``W_enc`` itself, ``[n_latents, n_inputs]``; ``sae.encoder.bias`` is ``b_enc``
      ``[n_latents]``. The encoder reads ``x - b_dec``: ``pre = F.linear(x - sae.decoder.bias, encoder.weight,
      encoder.bias)``, then ReLU and top-k.
    - ``sae.decoder.weight`` is ``W_dec.T``, ``[n_inputs, n_latents]`` (the layout of ``nn.Linear(n_latents,
      n_inputs)``: column ``j`` is latent ``j``'s direction); ``sae.decoder.bias`` is ``b_dec`` ``[n_inputs]``, so
      ``F.linear(dense_code, decoder.weight, decoder.bias)`` is the reconstruction.

    In-place writes through ``.weight`` / ``.bias`` (under ``torch.no_grad()``, or on ``.data``) change the SAE, and
    assigning a tensor (``sae.decoder.weight = w``) copies it into the parameter after checking its shape. Assigning
    ``.data`` of ``decoder.weight`` (a transpose view) does not reach ``W_dec``; assign ``decoder.weight`` instead.

    Args:
        sae: the SAE.
        side: ``"encoder"`` or ``"decoder"``.
    """

    __slots__ = ("_sae", "_side")

    def __init__(self, sae: SaeBase, side: str) -> None:
        if side not in ("encoder", "decoder"):
            raise ValueError(f"side must be 'encoder' or 'decoder', got {side!r}")
        self._sae = sae
        self._side = side

    @property
    def in_features(self) -> int:
        """Input width of this side (``n_inputs`` for the encoder, ``n_latents`` for the decoder)."""
        return self._sae.n_inputs if self._side == "encoder" else self._sae.n_latents

    @property
    def out_features(self) -> int:
        """Output width of this side (``n_latents`` for the encoder, ``n_outputs`` for the decoder: ``n_inputs`` for an
        SAE, the target width for a transcoder)."""
        return self._sae.n_latents if self._side == "encoder" else self._sae.n_outputs

    @property
    def weight(self) -> Tensor:
        """``[out_features, in_features]`` view of the SAE's weight (``W_enc``, or ``W_dec.T``)."""
        return self._sae.W_enc if self._side == "encoder" else self._sae.W_dec.t()

    @weight.setter
    def weight(self, value: Tensor) -> None:
        self._assign("weight", self.weight, value)

    @property
    def bias(self) -> Tensor:
        """``[out_features]``: ``b_enc`` for the encoder, ``b_dec`` for the decoder."""
        return self._sae.b_enc if self._side == "encoder" else self._sae.b_dec

    @bias.setter
    def bias(self, value: Tensor) -> None:
        self._assign("bias", self.bias, value)

    def _assign(self, name: str, target: Tensor, value: Any) -> None:
        if not isinstance(value, Tensor):
            raise TypeError(f"sae.{self._side}.{name} must be set to a torch.Tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"sae.{self._side}.{name} must be set to a tensor of shape {list(target.shape)}, got "
                f"{list(value.shape)}"
            )
        with torch.no_grad():
            target.copy_(value)

    def __repr__(self) -> str:
        return f"LinearView({self._side}: in_features={self.in_features}, out_features={self.out_features})"
