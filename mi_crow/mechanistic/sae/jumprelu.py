"""`JumpReLUSae`: a JumpReLU sparse autoencoder (Rajamanoharan et al., 2024) for inference, on the fused ops.

``code = pre * (pre > threshold)`` per latent, ``pre = (x - b_dec) @ W_enc.T + b_enc`` and
``x_hat = b_dec + sum_j values_j * W_dec[idx_j]``. The selection runs on the same fused top-k op as `TopKSae`
(see `mi_crow.mechanistic.sae.base.threshold_encode`): no dense ``[tokens, n_latents]`` matrix is built.
Any TopK / BatchTopK SAE can be turned into one (`JumpReLUSae.from_sae`), and a JumpReLU SAE trained elsewhere can
be filled with ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.base import SaeBase
from mi_crow.validation import fail, fail_type

__all__ = ["JumpReLUSae", "estimate_thresholds"]

#: Relative margin of the per-latent thresholds of `estimate_thresholds` below the smallest kept activation.
THRESHOLD_MARGIN = 1e-3


@torch.no_grad()
def estimate_thresholds(sae: SaeBase, activations: Tensor, *, per_latent: bool = True,
                        batch_size: int = 4096) -> Tensor:
    """Thresholds that make a JumpReLU SAE fire like ``sae`` (TopK or BatchTopK) did on ``activations``.

    The training selection is run on the sample (per-token top-k, or the batch top-``k * B`` for BatchTopK, in
    batches of ``batch_size``). Global: the smallest positive kept activation of the sample (one number, what
    BatchTopK's running threshold estimates). Per latent: just below the smallest activation at which each latent
    was kept, so on this sample the JumpReLU code contains every kept latent; a latent never kept gets the global
    value.

    Args:
        sae: a TopK / BatchTopK / Matryoshka SAE (an autoencoder).
        activations: ``[tokens, n_inputs]`` sample.
        per_latent: per-latent thresholds (``[n_latents]``) or one global threshold (0-d).
        batch_size: tokens per selection.

    Returns:
        ``[n_latents]`` or 0-d thresholds in the SAE's dtype.
    """
    from mi_crow import ops
    from mi_crow.ops.batch_topk import batch_topk_encode

    if not isinstance(sae, SaeBase) or sae.is_transcoder:
        raise fail_type("estimate_thresholds: sae", "an SAE autoencoder (TopKSae, BatchTopKSae, ...)", sae)
    x_all = sae._check_input(activations, "activations").reshape(-1, sae.n_inputs)
    lowest = torch.full((sae.n_latents,), float("inf"), dtype=torch.float32, device=sae.device)
    W_enc, b_enc, b_dec = sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach()
    for start in range(0, x_all.shape[0], batch_size):
        x = x_all[start : start + batch_size]
        if sae.selection == "batchtopk":
            code = batch_topk_encode(x, W_enc, b_enc, b_dec, sae.k)
            values, indices = code.values, code.indices
        else:
            code = ops.topk_encode(x, W_enc, b_enc, b_dec, sae.k)
            values, indices = code.values, code.indices
        kept = values > 0
        vals = torch.where(kept, values.float(), torch.full_like(values, float("inf"), dtype=torch.float32))
        lowest.scatter_reduce_(0, indices.reshape(-1), vals.reshape(-1), reduce="amin")
    finite = lowest[torch.isfinite(lowest)]
    if finite.numel() == 0:
        raise UserInputError("estimate_thresholds: no latent was active on the sample; give more activations")
    global_thr = finite.min()
    if not per_latent:
        return global_thr.to(sae.dtype)
    lowest = torch.where(torch.isfinite(lowest), lowest, global_thr)
    # 0.1% below the smallest kept value, so that value still passes the strict ``pre > threshold`` although the
    # JumpReLU encode folds the threshold into the bias (a different rounding of the same pre-activation).
    return (lowest * (1.0 - THRESHOLD_MARGIN)).to(sae.dtype)


class JumpReLUSae(SaeBase):
    """JumpReLU SAE for inference: a latent is active when its pre-activation exceeds its threshold.

    Parameters as in `TopKSae` (``W_enc [n, d]``, ``b_enc [n]``, ``W_dec [n, d]``, ``b_dec [d]``) plus the buffer
    ``threshold [n]`` (per latent; a global threshold is stored expanded to ``[n]``, so every JumpReLU SAE has the
    same state-dict shapes). ``sae.load_state_dict(...)`` with those five entries fills it.

    A value is the pre-activation itself (not ``pre - threshold``); the threshold is strict (``pre > threshold``).
    ``encode`` returns, per call, as many slots as the token with the most active latents has (at least 1);
    the other tokens' extra slots hold value 0.

    Args:
        n_latents: dictionary size ``n``.
        n_inputs: input width ``d``.
        k: the first selection width tried (it doubles while needed, so the result never depends on it; a value
            near the typical L0 is fastest). Default ``min(64, n_latents)``.
        device, dtype, mode, layer_signature, hook_id: as for `TopKSae`.
        threshold: initial threshold: a float (every latent) or an ``[n]`` tensor. Default 0 (then the SAE is a
            ReLU SAE).
    """

    architecture: ClassVar[str] = "jumprelu"
    selection = "jumprelu"

    def __init__(
        self,
        n_latents: int,
        n_inputs: int,
        k: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        threshold: float | Tensor = 0.0,
        mode: str = "observe",
        layer_signature: str | int | None = None,
        hook_id: str | None = None,
    ) -> None:
        if k is None and isinstance(n_latents, int) and not isinstance(n_latents, bool) and n_latents > 0:
            k = min(64, n_latents)
        super().__init__(
            n_latents, n_inputs, k, device, dtype, mode=mode, layer_signature=layer_signature,  # type: ignore[arg-type]
            hook_id=hook_id,
        )
        self.set_threshold(threshold)

    @torch.no_grad()
    def set_threshold(self, threshold: float | Tensor) -> None:
        """Set the thresholds: a number (every latent) or an ``[n_latents]`` tensor (or a 0-d one).

        Raises:
            TypeError / ValueError: not a real number or tensor of that shape, or a NaN threshold.
        """
        if isinstance(threshold, Tensor):
            if threshold.dim() not in (0, 1) or (threshold.dim() == 1 and threshold.shape[0] != self.n_latents):
                raise UserInputError(
                    f"JumpReLUSae: threshold must be a number or a tensor of shape [n_latents={self.n_latents}], "
                    f"got shape {tuple(threshold.shape)}"
                )
            t = threshold.to(device=self.threshold.device, dtype=self.threshold.dtype)
        elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
            t = torch.tensor(float(threshold), device=self.threshold.device, dtype=self.threshold.dtype)
        else:
            raise fail_type("JumpReLUSae: threshold", "a number or a tensor", threshold)
        if bool(torch.isnan(t).any()):
            raise fail("JumpReLUSae: threshold", "no NaN", threshold)
        self.threshold.copy_(t.expand(self.n_latents))

    @classmethod
    def from_sae(cls, sae: SaeBase, threshold: float | Tensor | None = None) -> JumpReLUSae:
        """A JumpReLU SAE with the weights of ``sae`` (a TopK, BatchTopK or Matryoshka SAE) and thresholds.

        Args:
            sae: the source SAE (an autoencoder: ``n_outputs == n_inputs``).
            threshold: a number or ``[n_latents]`` tensor (e.g. from `estimate_thresholds` on a data sample); None:
                the source's own estimate (a BatchTopK SAE's ``threshold``, or any ``threshold`` buffer it has).

        Returns:
            A new `JumpReLUSae` on the source's device and dtype, with its metadata, outlier factor and mode.

        Raises:
            UserInputError: the source is a transcoder, or no threshold is given and the source has none.
        """
        if not isinstance(sae, SaeBase):
            raise fail_type("JumpReLUSae.from_sae: sae", "an SAE (TopKSae, BatchTopKSae, ...)", sae)
        if sae.is_transcoder:
            raise UserInputError("JumpReLUSae.from_sae: sae must be an autoencoder, got a transcoder")
        if threshold is None:
            own = getattr(sae, "threshold", None)
            if not isinstance(own, Tensor) or not bool(torch.isfinite(own).all()):
                raise UserInputError(
                    f"JumpReLUSae.from_sae: threshold is required for a {type(sae).__name__} without an estimated "
                    f"threshold (got threshold=None)"
                )
            threshold = own.detach().clone()
        out = cls(
            sae.n_latents, sae.n_inputs, sae.k, sae.device, sae.dtype, mode=sae.mode,
            layer_signature=sae.layer_signature,
        )
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(out, name).copy_(getattr(sae, name))
        out.set_threshold(threshold)
        out.metadata.update(sae.metadata)
        out.outlier_norm_factor = sae.outlier_norm_factor
        return out

    @classmethod
    def _init_kwargs_from_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {}

    def extra_repr(self) -> str:
        return super().extra_repr() + ", jumprelu"
