"""One optimizer step of TopK SAE training (the OpenAI / sparsify recipe), with no data handling.

One optimizer step on a batch ``x [B, d]``:

1. ``code = topk_encode(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)`` (fused op; bf16 product optional),
   ``x_hat = sparse_decode(code, W_dec, b_dec)``;
2. ``fvu = sum((x - x_hat)^2) / sum((x - mean(x))^2)`` -- the MSE normalised by the batch variance, so the loss
   scale does not depend on the layer's activation scale;
3. AuxK (Gao et al. 2024, §A.2): the residual ``e = x - x_hat`` (a constant target) is reconstructed from the
   top-``k_aux`` *dead* latents, ``e_hat = sparse_decode(aux code, W_dec, 0)``, and
   ``auxk = sum((e - e_hat)^2) / sum((e - mean(e))^2)``; its gradient reaches the encoder through the aux values and
   the decoder through the dead rows. ``loss = fvu + auxk_coef * auxk``;
4. during backward, as soon as each gradient is complete (`step_in_backward`): the decoder-weight gradient loses
   its component along each (unit-norm) row, Adam steps that parameter, its gradient is freed and the rows are
   renormalised -- so at most one dense weight gradient is alive at a time;
5. dead-latent counters: tokens since each latent was last active; dead = at least ``dead_window_tokens``.

Every data-dependent reduction goes through `SaeStepper._all_reduce_sum` / `_all_reduce_max`, the two places where
a ``torch.distributed.all_reduce`` goes for data-parallel training (identity for ``world_size == 1``).
Because parameters are stepped inside backward, a data-parallel version must also all-reduce each gradient in
the ``before_step`` hook of `step_in_backward`, before that parameter's step.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mi_crow import ops
from mi_crow.errors import NotSupportedError
from mi_crow.mechanistic.sae.config import SaeTrainingConfig
from mi_crow.mechanistic.sae.optim import step_in_backward
from mi_crow.mechanistic.sae.base import SaeBase
from mi_crow.mechanistic.sae.sae import TopKSae
from mi_crow.mechanistic.sae.train.results import LossOutput
from mi_crow.validation import fail, fail_type

if TYPE_CHECKING:
    from mi_crow.store import Store

__all__ = ["SaeStepper"]

logger = logging.getLogger(__name__)


def _sum_sq(t: Tensor) -> Tensor:
    """Sum of squares as one BLAS dot product (differentiable; low-precision input is accumulated in float32)."""
    flat = t.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return torch.dot(flat, flat)


class SaeStepper:
    """The optimizer, the losses and one training step of a `TopKSae`; `SaeTrainer` adds the data and the run.

    Args:
        sae: the SAE to train (in place).
        store: the store the trainer reads activations from and writes runs to (unused by the step itself).

    Attributes:
        sae: the SAE.
        store: the store.
        optimizer: the Adam optimizer of the current/last run (None before training).
        tokens_since_fired: ``[n_latents]`` int64, tokens since each latent was last active.
    """

    def __init__(self, sae: TopKSae, store: Store | None = None) -> None:
        if not isinstance(sae, SaeBase):
            raise fail_type("SaeTrainer: sae", "a TopKSae (or another SAE of the family: BatchTopKSae, ...)", sae)
        self.sae = sae
        self.store = store
        self.optimizer: torch.optim.Optimizer | None = None
        self.tokens_since_fired = torch.zeros(sae.n_latents, dtype=torch.int64, device=sae.device)
        self.config: SaeTrainingConfig | None = None
        self.dead_window_tokens = 10_000_000
        self.world_size = 1
        self.rank = 0

    # -- distributed seams --------------------------------------------------------------------------------------
    def _all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over data-parallel ranks (identity while ``world_size == 1``)."""
        return tensor

    def _all_reduce_max(self, tensor: Tensor) -> Tensor:
        """Max (logical or, for bool) over data-parallel ranks (identity while ``world_size == 1``)."""
        return tensor

    # -- losses --------------------------------------------------------------------------------------------------
    def compute_losses(
        self,
        x: Tensor,
        *,
        dead_mask: Tensor | None = None,
        k_aux: int = 0,
        auxk_coef: float = 1.0 / 32.0,
        encode_dtype: torch.dtype | None = None,
        l1_lambda: float = 0.0,
        k: int | None = None,
        topk_by_decoder_norm: bool = False,
    ) -> LossOutput:
        """Forward pass and losses of one batch (differentiable; nothing is stepped).

        Args:
            x: ``[B, n_inputs]`` batch in the SAE's dtype and device.
            dead_mask: ``[n_latents]`` bool, True for dead latents (AuxK is computed when any is True and
                ``k_aux > 0`` and ``auxk_coef > 0``).
            k_aux: dead latents per token used by AuxK.
            auxk_coef: AuxK weight in ``loss``.
            encode_dtype: dtype of the encoder product (None = the SAE's dtype).
            l1_lambda: weight of the L1 penalty ``mean |code|`` (over tokens and latents) added to ``loss``.
            k: active latents per token (None = the SAE's ``k``; k-annealing passes more).
            topk_by_decoder_norm: rank latents by pre-activation times decoder-row norm and decode with unit rows
                (see ``SaeTrainingConfig.topk_by_decoder_norm``).

        Returns:
            `LossOutput`.
        """
        sae = self.sae
        if type(sae) is not TopKSae:
            # BatchTopK, Matryoshka, transcoders: their losses live in losses.py (the TopK path below is unchanged).
            from mi_crow.mechanistic.sae.train.losses import family_losses

            return family_losses(
                self, x, dead_mask=dead_mask, k_aux=k_aux, auxk_coef=auxk_coef, encode_dtype=encode_dtype,
                l1_lambda=l1_lambda, k=k, topk_by_decoder_norm=topk_by_decoder_norm,
            )
        W_enc, b_enc, W_dec = sae.W_enc, sae.b_enc, sae.W_dec
        if topk_by_decoder_norm:
            # The decoder as if normalised: scaling latent i's pre-activation by ||d_i|| and its row by 1/||d_i||
            # leaves each reconstruction unchanged but ranks latents by their contribution's size.
            norms = W_dec.norm(dim=1).clamp_min(1e-12)
            W_enc, b_enc, W_dec = W_enc * norms.unsqueeze(1), b_enc * norms, W_dec / norms.unsqueeze(1)
        use_aux = dead_mask is not None and k_aux > 0 and auxk_coef > 0
        enc_dtype = encode_dtype or sae.dtype
        # With a low-precision encoder product the op rounds copies of x - b_dec and W_enc for the product only;
        # it keeps none of them for backward, and every gradient is computed against the master weights.
        code = ops.topk_encode(
            x,
            W_enc,
            b_enc,
            sae.b_dec,
            sae.k if k is None else k,
            dead_mask if use_aux else None,
            k_aux if use_aux else 0,
            compute_dtype=enc_dtype if enc_dtype != sae.dtype else None,
        )
        values = code.values.to(sae.dtype)
        e_hat = None
        if use_aux and code.aux_values is not None:
            # Both decodes in one op, so the backward reads each decoder row once and gives W_dec one gradient.
            x_hat, e_hat = ops.sparse_decode_with_aux(
                values, code.indices, code.aux_values.to(sae.dtype), code.aux_indices, W_dec, sae.b_dec
            )
        else:
            x_hat = ops.sparse_decode(values, code.indices, W_dec, sae.b_dec)
        err = x - x_hat
        sse = _sum_sq(err)
        total_var = self._centered_sum_sq(x)
        fvu = self._all_reduce_sum(sse) / total_var
        loss = fvu
        auxk = x.new_zeros(())
        if e_hat is not None:
            target = err.detach()
            aux_sse = self._all_reduce_sum(_sum_sq(target - e_hat))
            auxk = aux_sse / self._centered_sum_sq(target)
            # A residual with no variance (perfect reconstruction) makes AuxK 0/0; it then carries no signal.
            auxk = torch.nan_to_num(auxk, nan=0.0, posinf=0.0, neginf=0.0)
            loss = loss + auxk_coef * auxk
        active = values > 0
        count = self._all_reduce_sum(torch.tensor(x.shape[0], dtype=torch.int64, device=x.device))
        # mean |z| over the dense [tokens, n_latents] code: its zeros add nothing, so the k values suffice. Off, it
        # is only measured (detached), so the loss and its gradient are exactly those without the penalty.
        l1_source = values if l1_lambda > 0 else values.detach()
        l1 = self._all_reduce_sum(l1_source.abs().sum(dtype=torch.float32)) / (count * sae.n_latents)
        if l1_lambda > 0:
            loss = loss + l1_lambda * l1.to(loss.dtype)
        l0 = self._all_reduce_sum(active.sum(dtype=torch.float32)) / count
        # index_add (not a bool scatter): duplicate indices must all count, whatever order they are written in.
        hits = torch.zeros(sae.n_latents, dtype=torch.int32, device=x.device)
        hits.index_add_(0, code.indices.reshape(-1), active.reshape(-1).to(torch.int32))
        fired = self._all_reduce_max(hits > 0)
        return LossOutput(loss, fvu.detach(), sse.detach(), auxk.detach(), l0, fired, int(count), l1.detach())

    def _centered_sum_sq(self, x: Tensor) -> Tensor:
        """``sum ||x_i - mean||^2`` over all ranks' tokens (the mean is the global one)."""
        with torch.no_grad():
            # Per rank: count, per-dimension mean and centred sum of squares from torch.var_mean (a Welford-style
            # reduction, no [B, d] temporary), then Chan's merge across ranks. The one-pass form
            # sum ||x||^2 - ||sum x||^2 / N from float32 partial sums loses every digit when the activations sit
            # far from the origin (2% error at a per-dimension offset of 100 sigma).
            n = x.shape[0]
            var, mean = torch.var_mean(x.double() if x.dtype == torch.float64 else x.float(), dim=0, correction=0)
            count = self._all_reduce_sum(torch.tensor(float(n), dtype=torch.float64, device=x.device))
            mean = mean.double()
            global_mean = self._all_reduce_sum(mean * n) / count
            centered = self._all_reduce_sum(var.double().sum() * n + (mean - global_mean).pow(2).sum() * n)
            return centered.clamp_min(torch.finfo(x.dtype).tiny).to(x.dtype)

    # -- one step ------------------------------------------------------------------------------------------------
    def prepare(
        self, config: SaeTrainingConfig, lr: float | None = None, dead_window_tokens: int | None = None
    ) -> None:
        """Create the optimizer and reset the dead-latent counters (done by `train*`; call it before using
        `train_step` directly).

        Args:
            config: gives the Adam settings and the AuxK / decoder-norm options `train_step` uses.
            lr: initial learning rate (None: ``config.lr`` or the dictionary-size default).
            dead_window_tokens: the run's dead-latent window (None: ``config.dead_window_tokens``, or 10M tokens
                when that is None too; `SaeTrainer` passes the window scaled to the run).
        """
        self.config = self._check_config(config)
        if dead_window_tokens is None:
            dead_window_tokens = config.dead_window_tokens if config.dead_window_tokens is not None else 10_000_000
        self.dead_window_tokens = dead_window_tokens
        peak = lr if lr is not None else (config.lr if config.lr is not None else self.sae.default_lr())
        self.optimizer = self._make_optimizer(config, peak)
        self.tokens_since_fired = torch.zeros(self.sae.n_latents, dtype=torch.int64, device=self.sae.device)

    def train_step(
        self, x: Tensor, lr: float, *, k_aux: int, encode_dtype: torch.dtype | None = None, k: int | None = None
    ) -> LossOutput | None:
        """One optimizer step on one batch, without any data handling.

        Sets the learning rate, computes the losses (AuxK over the latents dead by ``dead_window_tokens``) and runs
        backward, during which each parameter is stepped as soon as its gradient is complete (the decoder gradient
        first loses its component along the rows, and the rows are renormalised after their step); then updates
        the dead-latent counters. Gradients are freed as they are used: none is left on the parameters.

        Args:
            x: ``[B, n_inputs]`` finite batch in the SAE's dtype and device.
            lr: learning rate of this step.
            k_aux: dead latents per token for AuxK.
            encode_dtype: dtype of the encoder product (None = the SAE's dtype).
            k: active latents per token of this step (None = the SAE's ``k``).

        Returns:
            The step's `LossOutput`, or None when the loss was non-finite (then nothing was changed).
        """
        config, optimizer, sae = self.config, self.optimizer, self.sae
        if config is None or optimizer is None:
            raise RuntimeError("SaeTrainer.train_step: call prepare(config) first")
        for group in optimizer.param_groups:
            group["lr"] = lr
        dead = self.tokens_since_fired >= self.dead_window_tokens
        out = self.compute_losses(
            x,
            dead_mask=dead if bool(dead.any()) else None,
            k_aux=k_aux,
            auxk_coef=config.auxk_coef,
            encode_dtype=encode_dtype,
            l1_lambda=config.l1_lambda,
            k=k,
            topk_by_decoder_norm=config.topk_by_decoder_norm,
        )
        if not bool(torch.isfinite(out.loss)):
            return None
        optimizer.zero_grad(set_to_none=True)
        # Each parameter is stepped as soon as its gradient is complete, and the gradient freed: the decoder
        # (projected, stepped, renormalised) before the encoder's gradient exists, so at most one dense
        # [n_latents, d_in] gradient is alive at a time. The update equals a plain backward-then-step.
        before, after = {}, {}
        # A transcoder's decoder starts at zero and keeps free row norms (normalising a row as soon as it leaves 0
        # would undo the zero initialisation).
        if config.normalize_decoder and not sae.is_transcoder:
            before[sae.W_dec] = lambda _p: self._remove_parallel_grad()
            after[sae.W_dec] = lambda _p: sae.normalize_decoder_()
        with step_in_backward(optimizer, before_step=before, after_step=after):
            out.loss.backward()
        with torch.no_grad():
            self.tokens_since_fired.add_(out.tokens)
            self.tokens_since_fired.masked_fill_(out.fired, 0)
        return out

    # -- optimizer -----------------------------------------------------------------------------------------------
    def _make_optimizer(self, config: SaeTrainingConfig, lr: float) -> torch.optim.Optimizer:
        # W_enc, b_enc, W_dec, b_dec (and a skip transcoder's W_skip), in registration order.
        params = list(self.sae.parameters())
        kwargs: dict[str, Any] = {"lr": lr, "betas": tuple(config.adam_betas), "eps": config.adam_eps}
        impl = config.optimizer_impl
        if impl in ("auto", "fused"):
            try:
                return torch.optim.Adam(params, fused=True, **kwargs)
            except (RuntimeError, ValueError) as exc:
                if impl == "fused":
                    raise NotSupportedError(
                        f"SaeTrainingConfig.optimizer_impl='fused' is not available for "
                        f"{self.sae.device}/{self.sae.dtype} parameters: {exc}"
                    ) from exc
                logger.info("fused Adam unavailable (%s); using foreach", exc)
                impl = "foreach"
        return torch.optim.Adam(params, foreach=(impl != "for_loop"), **kwargs)

    @torch.no_grad()
    def _remove_parallel_grad(self) -> None:
        W = self.sae.W_dec
        if W.grad is None:
            return
        # Rows are unit norm, so <g, w> w is the component that would only change a row's length.
        parallel = torch.einsum("nd,nd->n", W.grad, W).unsqueeze(1)
        W.grad.addcmul_(parallel, W, value=-1.0)


    def _optimizer_flavour(self) -> str:
        assert self.optimizer is not None
        defaults = self.optimizer.defaults
        if defaults.get("fused"):
            return "(fused)"
        if defaults.get("foreach"):
            return "(foreach)"
        return "(for_loop)"

    def _check_config(self, config: SaeTrainingConfig | None) -> SaeTrainingConfig:
        if config is None:
            config = SaeTrainingConfig()
        if not isinstance(config, SaeTrainingConfig):
            raise fail_type("SaeTrainer: config", "a SaeTrainingConfig or None", config)
        # Re-validate: fields may have been changed after construction.
        config.__post_init__()
        if config.k_aux is not None and config.k_aux > self.sae.n_latents:
            raise fail("SaeTrainingConfig.k_aux", f"<= n_latents={self.sae.n_latents}", config.k_aux)
        return config
