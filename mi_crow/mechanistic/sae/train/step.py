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

Every data-dependent reduction goes through the seams `SaeStepper._all_reduce_sum` / `_all_reduce_max` (over the
ranks that hold different tokens: data-parallel), `_all_gather_rows` (the outlier median's norms, the ``b_dec``
sample) and `_any_over_latents` (over the ranks that hold different latents: latent-sharded); all are identities in a
single process. Because parameters are stepped inside backward, the data-parallel layout all-reduces each gradient
in the ``before_step`` hook of `step_in_backward`, before that parameter's step (`_gradient_hooks`). The layouts
themselves are in ``distributed.py``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mi_crow import ops
from mi_crow.errors import NotSupportedError
from mi_crow.mechanistic.sae.config import SaeTrainingConfig
from mi_crow.mechanistic.sae.optim import step_in_backward
from mi_crow.mechanistic.sae.base import SaeBase
from mi_crow.mechanistic.sae.outliers import attention_sink_mask
from mi_crow.mechanistic.sae.train import distributed
from mi_crow.mechanistic.sae.sae import TopKSae
from mi_crow.mechanistic.sae.train.results import LossOutput
from mi_crow.mechanistic.sae.train.state import _utc_run_id
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
        self._layout: distributed.Layout | None = None  # set by a distributed run (train_from_reader)
        self._full_sae: TopKSae | None = None  # latent-sharded: the caller's SAE while self.sae is this rank's slice

    # -- distributed seams --------------------------------------------------------------------------------------
    @property
    def _data_parallel(self) -> bool:
        return self._layout is not None and self._layout.parallel == "data" and self._layout.world_size > 1

    @property
    def _latent_sharded(self) -> bool:
        return self._layout is not None and self._layout.parallel == "latents"

    @property
    def _writes_run(self) -> bool:
        """Whether this process writes the run's files (history, config, saved SAE): rank 0 only."""
        return self.rank == 0

    @property
    def _n_latents_total(self) -> int:
        """Latents of the whole dictionary (latent-sharded: of every rank's slice together)."""
        return self.sae.n_latents * (self._layout.world_size if self._latent_sharded else 1)

    def _all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over data-parallel ranks (identity in a single process and in the layouts where every rank sees the
        whole batch). A tensor that requires grad keeps a gradient path to this rank's own term."""
        return distributed.sum_with_local_grad(tensor) if self._data_parallel else tensor

    def _all_reduce_max(self, tensor: Tensor) -> Tensor:
        """Max (logical or, for bool) over data-parallel ranks (identity otherwise)."""
        return distributed.all_reduce(tensor, "max") if self._data_parallel else tensor

    def _all_gather_rows(self, tensor: Tensor) -> list[Tensor]:
        """Every data-parallel rank's ``[m_r, ...]`` tensor, in rank order (``[tensor]`` otherwise)."""
        return distributed.all_gather_rows(tensor) if self._data_parallel else [tensor]

    def _any_over_latents(self, flag: Tensor) -> Tensor:
        """Logical or of a bool scalar over the ranks holding different latents (identity otherwise)."""
        return distributed.all_reduce(flag, "max") if self._latent_sharded else flag

    def _batch_topk_seams(self) -> dict[str, Any]:
        """Keyword arguments of `batch_topk_encode` that make the BatchTopK selection one selection over the whole
        global batch (data-parallel: ``k * B_global`` winners among every rank's candidates); none otherwise."""
        if not self._data_parallel:
            return {}
        return {"select_fn": distributed.batch_topk_select,
                "any_fn": lambda flag: bool(distributed.all_reduce(torch.tensor(flag), "max"))}

    def _all_finite(self, value: Tensor) -> bool:
        """Whether ``value`` is finite on every data-parallel rank (one decision for all: skip the batch or not)."""
        return not bool(self._all_reduce_max(~torch.isfinite(value)))

    def _sink_mask(self, x: Tensor, norms: Tensor, factor: float | None) -> tuple[Tensor, int]:
        """The attention-sink mask of this rank's tokens and the number of sinks over every rank.

        Data-parallel: the median is that of every rank's token norms (all-gathered), so a token is a sink exactly
        when it would be one in the single-process batch; the rule is `attention_sink_mask`'s, applied to the
        norms (the norm of a one-element vector is its absolute value).
        """
        if not self._data_parallel:
            sinks = attention_sink_mask(x, factor=factor)
            return sinks, int(sinks.sum())
        local = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32).norm(dim=-1)
        gathered = self._all_gather_rows(local)
        every = attention_sink_mask(torch.cat(gathered).unsqueeze(1), factor=factor)
        start = sum(part.shape[0] for part in gathered[: self._layout.rank])
        return every[start : start + x.shape[0]], int(every.sum())

    def _dead_count(self, window_tokens: int) -> int:
        """Latents (of the whole dictionary) silent for at least ``window_tokens`` tokens."""
        dead = (self.tokens_since_fired >= window_tokens).sum()
        if self._latent_sharded:
            dead = distributed.all_reduce(dead, "sum")
        return int(dead)

    def _gradient_hooks(self) -> dict[Tensor, Any]:
        """``before_step`` hooks that sum gradients over ranks: every parameter's (data-parallel), or the
        replicated ``b_dec``'s (latent-sharded; the other parameters are this rank's own slice)."""
        if self._data_parallel:
            params = [self.sae.W_enc, self.sae.b_enc, self.sae.W_dec, self.sae.b_dec]
        elif self._latent_sharded and self._layout.world_size > 1:
            params = [self.sae.b_dec]
        else:
            return {}
        return {p: distributed.reduce_gradient_ for p in params}

    # -- distributed run set-up (called by SaeTrainer) ----------------------------------------------------------
    def _distribute(
        self,
        config: SaeTrainingConfig,
        reader_factory: Any,
        sample_reader: Any,
    ) -> tuple[SaeTrainingConfig, Any, Any]:
        """Resolve the distributed layout of ``config`` (None: single process) and check the ranks agree.

        Returns:
            ``(config with rank/world_size, reader factory, sample reader)``: data-parallel wraps both readers
            (each rank reads its slice of each batch; the ``b_dec`` sample is gathered from every rank's rows).
        """
        config, layout = distributed.resolve(config)
        self._layout = layout
        self.rank, self.world_size = (layout.rank, layout.world_size) if layout is not None else (0, 1)
        if layout is None:
            return config, reader_factory, sample_reader
        if layout.parallel == "layers":
            raise fail("SaeTrainingConfig.parallel", "'data' or 'latents' for one SAE (parallel='layers' trains "
                       "several SAEs: use train.distributed.train_layers)", config.parallel)
        distributed.check_same_config(config, self.sae.config_dict())
        if config.training_run_id is None:  # one generated name for every rank: rank 0's
            config = dataclasses.replace(config, training_run_id=distributed.broadcast_object(_utc_run_id()))
        if layout.parallel == "latents":
            distributed.check_latent_layout(layout, self.sae.n_latents, self.sae.k)
            return config, reader_factory, sample_reader
        original = reader_factory
        sample = sample_reader or (lambda: original(0))
        n_sample = config.b_dec_init_tokens
        return (config, distributed.slice_factory(reader_factory, layout),
                lambda: distributed.gathered_sample(sample, n_sample, layout, self._all_gather_rows)())

    def _enter_layout(self, k_max: int) -> None:
        """Latent-sharded: train this rank's slice (``self.sae``) and free the caller's full weights meanwhile
        (``k_max``: the largest ``k`` of the run, k-annealing included)."""
        if not self._latent_sharded or self._full_sae is not None:
            return
        from mi_crow.mechanistic.sae.batchtopk import BatchTopKSae
        from mi_crow.mechanistic.sae.matryoshka import MatryoshkaSae

        if type(self.sae) not in (TopKSae, BatchTopKSae, MatryoshkaSae):
            raise NotSupportedError(
                f"parallel='latents' shards TopKSae, BatchTopKSae and MatryoshkaSae; {type(self.sae).__name__} cannot "
                "be latent-sharded (its losses are not split over latent slices): train it with parallel='data' or "
                "'layers'"
            )
        distributed.check_latent_layout(self._layout, self.sae.n_latents, max(k_max, self.sae.k))
        full = self.sae
        self.sae = distributed.shard_sae(full, self._layout, release=True)
        self._full_sae = full

    def _leave_layout(self) -> None:
        """Latent-sharded: gather the trained slices back into the caller's SAE (every rank gets the whole SAE)."""
        if self._full_sae is None:
            return
        distributed.unshard_into(self.sae, self._full_sae)
        self.sae, self._full_sae = self._full_sae, None
        self._layout = None  # the whole SAE again: later direct calls (compute_losses, train_step) are local

    def _initialise_weights(self, config: SaeTrainingConfig, sample_reader: Any) -> float:
        """`initialise_weights` in the run's layout; returns the input scale."""
        from mi_crow.mechanistic.sae.train.init import initialise_weights

        if self._latent_sharded:
            full = self._full_sae
            assert full is not None
            return distributed.initialise_latent_shard(self.sae, (full.n_latents, full.n_inputs, full.k), config,
                                                       sample_reader, self._layout)
        scale = initialise_weights(self.sae, config, sample_reader)
        if self._data_parallel:
            # Every rank computed the same weights from the same seed and the gathered sample; rank 0's are copied
            # anyway, so weights kept from before (reinit_weights=False) cannot differ between ranks.
            with torch.no_grad():
                for p in (self.sae.W_enc, self.sae.b_enc, self.sae.W_dec, self.sae.b_dec):
                    distributed.broadcast_(p.data)
        return scale

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
        if self._latent_sharded:
            return distributed.latent_losses(
                self, self._layout, x, dead_mask=dead_mask, k_aux=k_aux, auxk_coef=auxk_coef,
                encode_dtype=encode_dtype, l1_lambda=l1_lambda, k=k, topk_by_decoder_norm=topk_by_decoder_norm,
            )
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
        sse = self._all_reduce_sum(_sum_sq(err))
        total_var = self._centered_sum_sq(x)
        fvu = sse / total_var
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
            wide = x.double() if x.dtype == torch.float64 else x.float()
            if n:
                var, mean = torch.var_mean(wide, dim=0, correction=0)
            else:  # a data-parallel rank with no token of this batch (a split reader's share can be empty)
                var = mean = wide.new_zeros(x.shape[1])
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
        # One decision for every rank (the graph, hence the collectives of backward, must be the same on all).
        if self._latent_sharded:
            any_dead = bool(self._any_over_latents(dead.any()))
        else:
            # With fewer dead latents than k_aux, the slots past them would only be padding (value 0, no gradient):
            # AuxK takes min(k_aux, dead) slots, the same code without the padding, at a fraction of the cost
            # (data-parallel ranks hold the same counters, so the same number on every rank).
            n_dead = int(self._all_reduce_max(dead.sum()))
            any_dead = n_dead > 0
            k_aux = min(k_aux, n_dead)
        out = self.compute_losses(
            x,
            dead_mask=dead if any_dead else None,
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
        before, after = self._gradient_hooks(), {}
        # A transcoder's decoder starts at zero and keeps free row norms (normalising a row as soon as it leaves 0
        # would undo the zero initialisation).
        if config.normalize_decoder and not sae.is_transcoder:
            reduce_dec = before.get(sae.W_dec)

            def project(p: Tensor) -> None:
                if reduce_dec is not None:
                    reduce_dec(p)
                self._remove_parallel_grad()

            before[sae.W_dec] = project
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
