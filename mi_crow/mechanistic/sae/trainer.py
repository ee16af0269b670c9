"""`SaeTrainer`: TopK SAE training from a stored activation run (the OpenAI / sparsify recipe).

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

Every data-dependent reduction goes through `SaeTrainer._all_reduce_sum` / `_all_reduce_max`, the two places where
a ``torch.distributed.all_reduce`` goes for data-parallel training (identity for ``world_size == 1``).
Because parameters are stepped inside backward, a data-parallel version must also all-reduce each gradient in
the ``before_step`` hook of `step_in_backward`, before that parameter's step.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import Tensor

from mi_crow import ops
from mi_crow.mechanistic.sae.config import SaeTrainingConfig
from mi_crow.mechanistic.sae.data import TensorActivationReader, geometric_median
from mi_crow.mechanistic.sae.optim import step_in_backward

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.sae import TopKSae
    from mi_crow.store import Store

__all__ = [
    "LossOutput",
    "NonFiniteTrainingError",
    "SaeTrainer",
    "StepInfo",
    "TrainingResult",
    "lr_at_step",
]

logger = logging.getLogger(__name__)

HISTORY_FILE = "training_history.json"
RUN_CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
# Config fields that may differ between an interrupted run and its resumption.
_RESUME_FREE_FIELDS = {"resume", "progress", "checkpoint_every", "log_every", "extra", "save_sae", "sae_id"}


class NonFiniteTrainingError(RuntimeError):
    """Too many batches had NaN/Inf activations or a non-finite loss (see ``max_nonfinite_fraction``)."""


class _Reader(Protocol):
    n_tokens: int
    d_in: int

    def __iter__(self) -> Iterator[Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


ReaderFactory = Callable[[int], _Reader]
"""``factory(epoch) -> reader`` over one epoch (a fresh shuffle per epoch)."""


class LossOutput(NamedTuple):
    """Losses and statistics of one batch (all tensors, no host sync).

    Attributes:
        loss: scalar, ``fvu + auxk_coef * auxk_loss`` (differentiable).
        fvu: scalar fraction of variance unexplained of the batch.
        sse: scalar sum of squared errors.
        auxk_loss: scalar AuxK loss (0 when no latent is dead or AuxK is off).
        l0: scalar mean number of active (> 0) latents per token.
        fired: ``[n_latents]`` bool, latents active on at least one token of the batch.
        tokens: number of tokens in the batch (over all data-parallel ranks).
    """

    loss: Tensor
    fvu: Tensor
    sse: Tensor
    auxk_loss: Tensor
    l0: Tensor
    fired: Tensor
    tokens: int


@dataclass
class StepInfo:
    """What a training callback receives after every optimizer step.

    Attributes:
        step: number of optimizer steps done.
        total_steps: steps planned.
        tokens_seen: tokens consumed by the steps done.
        trainer: the trainer (its ``sae`` and ``optimizer`` are live objects).
    """

    step: int
    total_steps: int
    tokens_seen: int
    trainer: SaeTrainer


@dataclass
class TrainingResult:
    """Outcome of `SaeTrainer.train`.

    Attributes:
        training_run_id: name of the run (``runs/<training_run_id>/`` in the store).
        sae_id: where the trained SAE was saved (``sae_models/<sae_id>/``), or None.
        history: the logged records (dicts with step, tokens, loss, mse, fvu, l0, dead_fraction, auxk_loss,
            tokens_per_s, lr, nonfinite_batches).
        steps: optimizer steps done.
        tokens: tokens trained on.
        nonfinite_batches: batches skipped because of NaN/Inf.
        outlier_tokens: tokens left out by ``outlier_norm_factor``.
        resumed_from_step: the checkpoint step this call continued from (None for a fresh run).
        config: the configuration used.
    """

    training_run_id: str
    sae_id: str | None
    history: list[dict[str, Any]]
    steps: int
    tokens: int
    nonfinite_batches: int
    outlier_tokens: int
    resumed_from_step: int | None
    config: SaeTrainingConfig = field(repr=False)


def lr_at_step(step: int, total_steps: int, peak: float, warmup_steps: int, config: SaeTrainingConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, constant, then the configured decay.

    Args:
        step: 0-based step index.
        total_steps: planned number of steps.
        peak: peak learning rate.
        warmup_steps: warm-up length (the first step uses ``peak / warmup_steps``).
        config: gives ``lr_decay``, ``lr_decay_start`` and ``lr_final_fraction``.

    Returns:
        The learning rate.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    start = int(config.lr_decay_start * total_steps)
    if config.lr_decay == "none" or step < start:
        return peak
    span = max(1, total_steps - 1 - start)
    frac = min(1.0, (step - start) / span)
    final = config.lr_final_fraction
    if config.lr_decay == "linear":
        return peak * (1.0 - (1.0 - final) * frac)
    return peak * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _sum_sq(t: Tensor) -> Tensor:
    """Sum of squares as one BLAS dot product (differentiable; low-precision input is accumulated in float32)."""
    flat = t.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return torch.dot(flat, flat)


def _utc_run_id() -> str:
    return f"sae-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


class SaeTrainer:
    """Trains a `TopKSae` on activations streamed from a store (see the module docstring for the recipe).

    Args:
        sae: the SAE to train (in place).
        store: the store holding the activation run; also receives ``runs/<training_run_id>/`` (history, config,
            checkpoints) and the trained SAE. May be None only for `train_on_tensor` without checkpoints.

    Attributes:
        sae: the SAE.
        store: the store.
        optimizer: the Adam optimizer of the current/last run (None before training).
        tokens_since_fired: ``[n_latents]`` int64, tokens since each latent was last active.
    """

    def __init__(self, sae: TopKSae, store: Store | None = None) -> None:
        from mi_crow.mechanistic.sae.sae import TopKSae

        if not isinstance(sae, TopKSae):
            raise TypeError(f"SaeTrainer: sae must be a TopKSae, got {type(sae).__name__}")
        self.sae = sae
        self.store = store
        self.optimizer: torch.optim.Optimizer | None = None
        self.tokens_since_fired = torch.zeros(sae.n_latents, dtype=torch.int64, device=sae.device)
        self.config: SaeTrainingConfig | None = None
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
    ) -> LossOutput:
        """Forward pass and losses of one batch (differentiable; nothing is stepped).

        Args:
            x: ``[B, n_inputs]`` batch in the SAE's dtype and device.
            dead_mask: ``[n_latents]`` bool, True for dead latents (AuxK is computed when any is True and
                ``k_aux > 0`` and ``auxk_coef > 0``).
            k_aux: dead latents per token used by AuxK.
            auxk_coef: AuxK weight in ``loss``.
            encode_dtype: dtype of the encoder product (None = the SAE's dtype).

        Returns:
            `LossOutput`.
        """
        sae = self.sae
        use_aux = dead_mask is not None and k_aux > 0 and auxk_coef > 0
        enc_dtype = encode_dtype or sae.dtype
        # With a low-precision encoder product the op rounds copies of x - b_dec and W_enc for the product only;
        # it keeps none of them for backward, and every gradient is computed against the master weights.
        code = ops.topk_encode(
            x,
            sae.W_enc,
            sae.b_enc,
            sae.b_dec,
            sae.k,
            dead_mask if use_aux else None,
            k_aux if use_aux else 0,
            compute_dtype=enc_dtype if enc_dtype != sae.dtype else None,
        )
        values = code.values.to(sae.dtype)
        e_hat = None
        if use_aux and code.aux_values is not None:
            # Both decodes in one op, so the backward reads each decoder row once and gives W_dec one gradient.
            x_hat, e_hat = ops.sparse_decode_with_aux(
                values, code.indices, code.aux_values.to(sae.dtype), code.aux_indices, sae.W_dec, sae.b_dec
            )
        else:
            x_hat = ops.sparse_decode(values, code.indices, sae.W_dec, sae.b_dec)
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
        l0 = self._all_reduce_sum(active.sum(dtype=torch.float32)) / count
        # index_add (not a bool scatter): duplicate indices must all count, whatever order they are written in.
        hits = torch.zeros(sae.n_latents, dtype=torch.int32, device=x.device)
        hits.index_add_(0, code.indices.reshape(-1), active.reshape(-1).to(torch.int32))
        fired = self._all_reduce_max(hits > 0)
        return LossOutput(loss, fvu.detach(), sse.detach(), auxk.detach(), l0, fired, int(count))

    def _centered_sum_sq(self, x: Tensor) -> Tensor:
        """``sum ||x_i - mean||^2`` over all ranks' tokens (the mean is the global one)."""
        with torch.no_grad():
            # sum ||x_i||^2 - ||sum x_i||^2 / N: two reductions and no [B, d] temporary. Its rounding error only
            # rescales the loss by a constant factor, which Adam ignores; evaluate() reports FVU in float64.
            count = self._all_reduce_sum(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
            total = self._all_reduce_sum(x.sum(dim=0).double())
            squares = self._all_reduce_sum(_sum_sq(x).double())
            centered = squares - total.dot(total) / count
            return centered.clamp_min(torch.finfo(x.dtype).tiny).to(x.dtype)

    # -- one step ------------------------------------------------------------------------------------------------
    def prepare(self, config: SaeTrainingConfig, lr: float | None = None) -> None:
        """Create the optimizer and reset the dead-latent counters (done by `train*`; call it before using
        `train_step` directly).

        Args:
            config: gives the Adam settings and the AuxK / decoder-norm options `train_step` uses.
            lr: initial learning rate (None: ``config.lr`` or the dictionary-size default).
        """
        self.config = self._check_config(config)
        peak = lr if lr is not None else (config.lr if config.lr is not None else self.sae.default_lr())
        self.optimizer = self._make_optimizer(config, peak)
        self.tokens_since_fired = torch.zeros(self.sae.n_latents, dtype=torch.int64, device=self.sae.device)

    def train_step(
        self, x: Tensor, lr: float, *, k_aux: int, encode_dtype: torch.dtype | None = None
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

        Returns:
            The step's `LossOutput`, or None when the loss was non-finite (then nothing was changed).
        """
        config, optimizer, sae = self.config, self.optimizer, self.sae
        if config is None or optimizer is None:
            raise RuntimeError("SaeTrainer.train_step: call prepare(config) first")
        for group in optimizer.param_groups:
            group["lr"] = lr
        dead = self.tokens_since_fired >= config.dead_window_tokens
        out = self.compute_losses(
            x,
            dead_mask=dead if bool(dead.any()) else None,
            k_aux=k_aux,
            auxk_coef=config.auxk_coef,
            encode_dtype=encode_dtype,
        )
        if not bool(torch.isfinite(out.loss)):
            return None
        optimizer.zero_grad(set_to_none=True)
        # Each parameter is stepped as soon as its gradient is complete, and the gradient freed: the decoder
        # (projected, stepped, renormalised) before the encoder's gradient exists, so at most one dense
        # [n_latents, d_in] gradient is alive at a time. The update equals a plain backward-then-step.
        before, after = {}, {}
        if config.normalize_decoder:
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
        params = [self.sae.W_enc, self.sae.b_enc, self.sae.W_dec, self.sae.b_dec]
        kwargs: dict[str, Any] = {"lr": lr, "betas": tuple(config.adam_betas), "eps": config.adam_eps}
        impl = config.optimizer_impl
        if impl in ("auto", "fused"):
            try:
                return torch.optim.Adam(params, fused=True, **kwargs)
            except (RuntimeError, ValueError) as exc:
                if impl == "fused":
                    raise ValueError(
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

    # -- initialisation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _initialise(self, config: SaeTrainingConfig, sample_reader: Callable[[], Iterable[Tensor]]) -> None:
        sae = self.sae
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
            raise ValueError("SaeTrainer: the activation run yields no batch to initialise b_dec from")
        sample = torch.cat(chunks)[: config.b_dec_init_tokens]
        sample = sample[torch.isfinite(sample).all(dim=1)]
        if config.outlier_norm_factor is not None and sample.shape[0] > 0:
            norms = sample.norm(dim=1)
            sample = sample[norms <= config.outlier_norm_factor * norms.median()]
        if sample.shape[0] == 0:
            raise NonFiniteTrainingError("SaeTrainer: every token of the b_dec initialisation sample is non-finite")
        center = geometric_median(sample) if config.b_dec_init == "geometric_median" else sample.mean(dim=0)
        sae.b_dec.copy_(center)

    # -- public entry points -------------------------------------------------------------------------------------
    def train(
        self,
        run_id: str,
        layer: str,
        config: SaeTrainingConfig | None = None,
        *,
        callbacks: Sequence[Callable[[StepInfo], None]] = (),
    ) -> TrainingResult:
        """Train on ``activations/<run_id>/`` layer ``layer`` of the store.

        Args:
            run_id: activation run id (``store.list_runs()``).
            layer: layer name stored in the run.
            config: `SaeTrainingConfig` (defaults when None).
            callbacks: called with a `StepInfo` after every optimizer step (and after its checkpoint); an exception
                from a callback stops training (the last checkpoint stays, so ``resume=True`` continues).

        Returns:
            `TrainingResult`.

        Raises:
            ValueError: unknown run or layer, a layer width different from ``sae.n_inputs``, a bad config.
            NonFiniteTrainingError: too many non-finite batches.
        """
        if self.store is None:
            raise ValueError("SaeTrainer.train: the trainer has no store (SaeTrainer(sae, store))")
        config = self._check_config(config)
        store = self.store
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"SaeTrainer.train: run_id must be a non-empty str, got {run_id!r}")
        runs = store.list_runs()
        if run_id not in runs:
            raise ValueError(f"SaeTrainer.train: unknown activation run_id {run_id!r}; runs in the store: {runs}")
        meta = store.read_run_meta(run_id)
        layer_dims = meta.get("layer_dims", {})
        if layer not in layer_dims:
            raise ValueError(
                f"SaeTrainer.train: layer {layer!r} is not stored in run {run_id!r}; stored layers: "
                f"{sorted(layer_dims)}"
            )
        if int(layer_dims[layer]) != self.sae.n_inputs:
            raise ValueError(
                f"SaeTrainer.train: layer {layer!r} of run {run_id!r} has width {layer_dims[layer]} but the SAE has "
                f"n_inputs={self.sae.n_inputs}"
            )

        def factory(epoch: int) -> _Reader:
            kwargs: dict[str, Any] = {
                "shuffle": config.shuffle,
                "seed": config.seed + epoch,
                "dtype": self.sae.dtype,
                "drop_last": True,
            }
            if config.shuffle_buffer_tokens is not None:
                kwargs["buffer_tokens"] = config.shuffle_buffer_tokens
            return store.activation_reader(run_id, layer, config.batch_size, **kwargs)

        model_id = meta.get("model_id", meta.get("model_name"))
        def sample() -> _Reader:
            # A small buffer: the b_dec sample needs b_dec_init_tokens vectors, not a full shuffle group.
            size = config.b_dec_init_tokens
            return store.activation_reader(
                run_id, layer, min(config.batch_size, size), shuffle=True, seed=config.seed, dtype=self.sae.dtype,
                buffer_tokens=size, drop_last=False,
            )

        return self.train_from_reader(
            factory, config, run_id=run_id, layer=layer, model_id=model_id, callbacks=callbacks, sample_reader=sample
        )

    def train_on_tensor(
        self,
        activations: Tensor,
        config: SaeTrainingConfig | None = None,
        *,
        callbacks: Sequence[Callable[[StepInfo], None]] = (),
    ) -> TrainingResult:
        """Train on an in-memory ``[tokens, n_inputs]`` tensor (same recipe; checkpoints need a store).

        Args:
            activations: ``[tokens, n_inputs]`` floating tensor.
            config: `SaeTrainingConfig`.
            callbacks: as in `train`.
        """
        config = self._check_config(config)
        if not isinstance(activations, Tensor) or activations.dim() != 2:
            shape = tuple(activations.shape) if isinstance(activations, Tensor) else type(activations).__name__
            raise ValueError(f"SaeTrainer.train_on_tensor: activations must be [tokens, d], got {shape}")
        if activations.shape[1] != self.sae.n_inputs:
            raise ValueError(
                f"SaeTrainer.train_on_tensor: activations have width {activations.shape[1]} but the SAE has "
                f"n_inputs={self.sae.n_inputs}"
            )

        def factory(epoch: int) -> _Reader:
            return TensorActivationReader(
                activations, config.batch_size, shuffle=config.shuffle, seed=config.seed + epoch, drop_last=True
            )

        return self.train_from_reader(factory, config, callbacks=callbacks)

    def _check_config(self, config: SaeTrainingConfig | None) -> SaeTrainingConfig:
        if config is None:
            config = SaeTrainingConfig()
        if not isinstance(config, SaeTrainingConfig):
            raise TypeError(f"SaeTrainer: config must be a SaeTrainingConfig, got {type(config).__name__}")
        # Re-validate: fields may have been changed after construction.
        config.__post_init__()
        if config.k_aux is not None and config.k_aux > self.sae.n_latents:
            raise ValueError(
                f"SaeTrainingConfig.k_aux must be <= n_latents={self.sae.n_latents}, got {config.k_aux}"
            )
        return config

    # -- the loop ------------------------------------------------------------------------------------------------
    def train_from_reader(
        self,
        reader_factory: ReaderFactory,
        config: SaeTrainingConfig,
        *,
        run_id: str | None = None,
        layer: str | None = None,
        model_id: str | None = None,
        callbacks: Sequence[Callable[[StepInfo], None]] = (),
        sample_reader: Callable[[], Iterable[Tensor]] | None = None,
    ) -> TrainingResult:
        """Training loop over readers made by ``reader_factory(epoch)`` (used by `train` and `train_on_tensor`).

        Args:
            reader_factory: ``epoch -> reader`` yielding ``[batch_size, n_inputs]`` tensors, with ``n_tokens``,
                ``d_in``, ``state_dict()`` and ``load_state_dict()``; epoch ``e`` must always give the same order.
            config: `SaeTrainingConfig`.
            run_id, layer, model_id: recorded in the run's config and the saved SAE.
            callbacks: as in `train`.
            sample_reader: makes an iterable of ``[*, n_inputs]`` batches whose first ``b_dec_init_tokens`` vectors
                initialise ``b_dec`` (default: ``reader_factory(0)``).
        """
        config = self._check_config(config)
        self.config = config
        sae = self.sae
        store = self.store
        needs_store = config.checkpoint_every is not None or config.resume or config.save_sae
        if store is None and needs_store:
            raise ValueError(
                "SaeTrainer: checkpoint_every, resume and save_sae need a store; pass SaeTrainer(sae, store) or set "
                "checkpoint_every=None, save_sae=False"
            )
        training_run_id = config.training_run_id or _utc_run_id()
        prefix = f"runs/{training_run_id}"

        reader = reader_factory(0)
        if reader.d_in != sae.n_inputs:
            raise ValueError(
                f"SaeTrainer: the activations have width {reader.d_in} but the SAE has n_inputs={sae.n_inputs}"
            )
        steps_per_epoch = reader.n_tokens // config.batch_size
        if steps_per_epoch == 0:
            raise ValueError(
                f"SaeTrainer: the run has {reader.n_tokens} tokens, fewer than batch_size={config.batch_size}"
            )
        if config.n_tokens is not None:
            total_steps = config.n_tokens // config.batch_size
        else:
            total_steps = max(1, int((config.epochs or 1.0) * steps_per_epoch))
        warmup = config.warmup_steps if config.warmup_steps is not None else min(1000, total_steps // 20)
        peak_lr = config.lr if config.lr is not None else sae.default_lr()
        k_aux = min(config.k_aux if config.k_aux is not None else max(1, sae.n_inputs // 2), sae.n_latents)
        enc_dtype = torch.bfloat16 if config.encode_dtype == "bfloat16" else sae.dtype
        device = sae.device

        self.prepare(config, peak_lr)
        step = 0
        epoch = 0
        tokens_seen = 0
        batches_seen = 0
        nonfinite = 0
        outliers = 0
        history: list[dict[str, Any]] = []
        resumed_from: int | None = None

        checkpoint = None
        if config.resume:
            assert store is not None
            key = f"{prefix}/{CHECKPOINT_FILE}"
            if store.exists(key):
                checkpoint = store.get_torch(key)
            else:
                logger.info("resume: no checkpoint at %s; starting run %s from scratch", key, training_run_id)
        if checkpoint is not None:
            self._check_checkpoint(checkpoint, config, total_steps, run_id, layer)
            with torch.no_grad():
                for name, tensor in checkpoint["sae"].items():
                    getattr(sae, name).copy_(tensor)
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.tokens_since_fired = checkpoint["tokens_since_fired"].to(device)
            step = int(checkpoint["step"])
            epoch = int(checkpoint["epoch"])
            tokens_seen = int(checkpoint["tokens_seen"])
            batches_seen = int(checkpoint["batches_seen"])
            nonfinite = int(checkpoint["nonfinite_batches"])
            outliers = int(checkpoint["outlier_tokens"])
            history = list(checkpoint["history"])
            torch.set_rng_state(checkpoint["rng"]["torch"])
            if torch.cuda.is_available() and "cuda" in checkpoint["rng"]:
                torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
            if epoch != 0:
                reader = reader_factory(epoch)
            reader.load_state_dict(checkpoint["reader"])
            resumed_from = step
            logger.info("resumed training run %s at step %d/%d", training_run_id, step, total_steps)
        else:
            self._initialise(config, sample_reader or (lambda: reader_factory(0)))

        run_config = {
            "training_run_id": training_run_id,
            "activation_run_id": run_id,
            "layer": layer,
            "model_id": model_id,
            "training_config": config.to_dict(),
            "sae": sae.config_dict(),
            "total_steps": total_steps,
            "peak_lr": peak_lr,
            "warmup_steps": warmup,
            "k_aux": k_aux,
            "optimizer": type(self.optimizer).__name__ + self._optimizer_flavour(),
            "status": "running",
        }
        if store is not None:
            store.put_json(f"{prefix}/{RUN_CONFIG_FILE}", run_config)

        bar = None
        if config.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=step, desc=f"train SAE {training_run_id}", unit="step")

        acc = {name: torch.zeros((), dtype=torch.float64, device=device) for name in ("loss", "fvu", "sse", "auxk", "l0")}
        acc_steps = 0
        acc_tokens = 0
        window_start = time.perf_counter()
        if checkpoint is not None:
            for name in acc:
                acc[name].fill_(float(checkpoint["window"][name]))
            acc_steps = int(checkpoint["window"]["steps"])
            acc_tokens = int(checkpoint["window"]["tokens"])
        iterator = iter(reader)
        epoch_batches = 0
        in_resumed_epoch = checkpoint is not None  # its batches before the checkpoint are not counted here
        epoch_start_step = step if checkpoint is None else -1  # a resumed epoch began before the checkpoint
        try:
            while step < total_steps:
                try:
                    batch = next(iterator)
                except StopIteration:
                    if epoch_batches == 0 and not in_resumed_epoch:
                        raise ValueError(f"SaeTrainer: epoch {epoch} of the activation reader yields no batch") from None
                    if step == epoch_start_step:
                        # Another pass would see the same batches again: stop instead of looping forever.
                        raise NonFiniteTrainingError(
                            f"SaeTrainer: every one of the {epoch_batches} batches of epoch {epoch} had non-finite "
                            f"activations or loss; nothing could be trained"
                        ) from None
                    epoch_batches = 0
                    in_resumed_epoch = False
                    epoch_start_step = step
                    epoch += 1
                    reader = reader_factory(epoch)
                    iterator = iter(reader)
                    continue
                batches_seen += 1
                epoch_batches += 1
                x = batch.to(device=device, dtype=sae.dtype, non_blocking=True)
                # NaN/Inf anywhere makes a sum (or a row norm) non-finite; an overflowing one would overflow the
                # loss's squares too. With outlier filtering the row norms serve both checks in one pass.
                norms = x.norm(dim=1) if config.outlier_norm_factor is not None else None
                if not bool(torch.isfinite(norms.sum() if norms is not None else x.sum())):
                    nonfinite += 1
                    self._check_nonfinite(nonfinite, batches_seen, config, final=False)
                    continue
                if norms is not None:
                    keep = norms <= config.outlier_norm_factor * norms.median()
                    n_out = int(keep.numel() - keep.sum())
                    if n_out:
                        outliers += n_out
                        x = x[keep]
                lr = lr_at_step(step, total_steps, peak_lr, warmup, config)
                out = self.train_step(x, lr, k_aux=k_aux, encode_dtype=enc_dtype)
                if out is None:
                    nonfinite += 1
                    self._check_nonfinite(nonfinite, batches_seen, config, final=False)
                    continue
                n_tok = out.tokens
                with torch.no_grad():
                    acc["loss"] += out.loss.detach()
                    acc["fvu"] += out.fvu
                    acc["sse"] += out.sse
                    acc["auxk"] += out.auxk_loss
                    acc["l0"] += out.l0
                step += 1
                tokens_seen += n_tok
                acc_steps += 1
                acc_tokens += n_tok

                if step % config.log_every == 0 or step == total_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    record = {
                        "step": step,
                        "tokens": tokens_seen,
                        "loss": float(acc["loss"]) / acc_steps,
                        "mse": float(acc["sse"]) / (acc_tokens * sae.n_inputs),
                        "fvu": float(acc["fvu"]) / acc_steps,
                        "l0": float(acc["l0"]) / acc_steps,
                        "dead_fraction": float((self.tokens_since_fired >= config.dead_window_tokens).float().mean()),
                        "auxk_loss": float(acc["auxk"]) / acc_steps,
                        "tokens_per_s": acc_tokens / elapsed,
                        "lr": lr,
                        "nonfinite_batches": nonfinite,
                        "outlier_tokens": outliers,
                    }
                    history.append(record)
                    for value in acc.values():
                        value.zero_()
                    acc_steps = 0
                    acc_tokens = 0
                    if store is not None:
                        store.put_json(f"{prefix}/{HISTORY_FILE}", history)
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{record['loss']:.4f}",
                            fvu=f"{record['fvu']:.4f}",
                            l0=f"{record['l0']:.1f}",
                            dead=f"{record['dead_fraction']:.3f}",
                            auxk=f"{record['auxk_loss']:.4f}",
                            tok_s=f"{record['tokens_per_s']:.0f}",
                            refresh=False,
                        )
                    logger.debug("step %d: %s", step, record)
                    window_start = time.perf_counter()
                if bar is not None:
                    bar.update(1)
                if config.checkpoint_every is not None and step % config.checkpoint_every == 0 and step < total_steps:
                    assert store is not None
                    window = {name: float(value) for name, value in acc.items()}
                    window.update(steps=acc_steps, tokens=acc_tokens)
                    self._save_checkpoint(
                        f"{prefix}/{CHECKPOINT_FILE}", config, total_steps, run_id, layer, step, epoch, tokens_seen,
                        batches_seen, nonfinite, outliers, history, reader, window,
                    )
                for callback in callbacks:
                    callback(StepInfo(step, total_steps, tokens_seen, self))
        finally:
            if bar is not None:
                bar.close()

        self._check_nonfinite(nonfinite, batches_seen, config, final=True)
        sae.metadata.update(
            {"layer": layer, "model_id": model_id, "activation_run_id": run_id, "training_run_id": training_run_id}
        )
        sae.outlier_norm_factor = config.outlier_norm_factor
        sae_id = None
        if store is not None:
            # The history is already on disk: the last step always logs.
            run_config.update(
                status="completed", steps=step, tokens=tokens_seen, nonfinite_batches=nonfinite, outlier_tokens=outliers
            )
            store.put_json(f"{prefix}/{RUN_CONFIG_FILE}", run_config)
            if config.save_sae:
                sae_id = config.sae_id or training_run_id
                sae.save(store, sae_id)
        return TrainingResult(
            training_run_id=training_run_id,
            sae_id=sae_id,
            history=history,
            steps=step,
            tokens=tokens_seen,
            nonfinite_batches=nonfinite,
            outlier_tokens=outliers,
            resumed_from_step=resumed_from,
            config=config,
        )

    def _optimizer_flavour(self) -> str:
        assert self.optimizer is not None
        defaults = self.optimizer.defaults
        if defaults.get("fused"):
            return "(fused)"
        if defaults.get("foreach"):
            return "(foreach)"
        return "(for_loop)"

    # -- non-finite accounting -------------------------------------------------------------------------------------
    @staticmethod
    def _check_nonfinite(nonfinite: int, seen: int, config: SaeTrainingConfig, *, final: bool) -> None:
        if nonfinite == 0:
            return
        if nonfinite == seen and final:
            raise NonFiniteTrainingError(
                f"SaeTrainer: all {seen} batches had non-finite activations or loss; nothing was trained"
            )
        if not final and seen < config.nonfinite_grace_batches:
            return
        fraction = nonfinite / seen
        if fraction > config.max_nonfinite_fraction:
            raise NonFiniteTrainingError(
                f"SaeTrainer: {nonfinite} of {seen} batches ({fraction:.1%}) had non-finite activations or loss, more "
                f"than max_nonfinite_fraction={config.max_nonfinite_fraction}; check the activation run"
            )
        logger.warning("skipped %d of %d batches with non-finite values", nonfinite, seen)

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def _save_checkpoint(
        self,
        key: str,
        config: SaeTrainingConfig,
        total_steps: int,
        run_id: str | None,
        layer: str | None,
        step: int,
        epoch: int,
        tokens_seen: int,
        batches_seen: int,
        nonfinite: int,
        outliers: int,
        history: list[dict[str, Any]],
        reader: _Reader,
        window: dict[str, float],
    ) -> None:
        assert self.store is not None and self.optimizer is not None
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": config.to_dict(),
            "total_steps": total_steps,
            "activation_run_id": run_id,
            "layer": layer,
            "sae_shape": [self.sae.n_latents, self.sae.n_inputs, self.sae.k],
            "sae": {name: getattr(self.sae, name).detach().cpu().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")},
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.cpu().clone(),
            "step": step,
            "epoch": epoch,
            "tokens_seen": tokens_seen,
            "batches_seen": batches_seen,
            "nonfinite_batches": nonfinite,
            "outlier_tokens": outliers,
            "history": history,
            "reader": reader.state_dict(),
            "window": window,
            "rng": rng,
        }
        self.store.put_torch(key, state)
        logger.debug("checkpoint at step %d written to %s", step, key)

    def _check_checkpoint(
        self,
        checkpoint: Any,
        config: SaeTrainingConfig,
        total_steps: int,
        run_id: str | None,
        layer: str | None,
    ) -> None:
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("SaeTrainer: the checkpoint to resume from has an unknown format")
        shape = [self.sae.n_latents, self.sae.n_inputs, self.sae.k]
        if list(checkpoint["sae_shape"]) != shape:
            raise ValueError(
                f"SaeTrainer: cannot resume: the checkpoint is for an SAE with [n_latents, n_inputs, k]="
                f"{list(checkpoint['sae_shape'])}, this SAE has {shape}"
            )
        if checkpoint.get("activation_run_id") != run_id or checkpoint.get("layer") != layer:
            raise ValueError(
                f"SaeTrainer: cannot resume: the checkpoint trains on run {checkpoint.get('activation_run_id')!r} "
                f"layer {checkpoint.get('layer')!r}, not run {run_id!r} layer {layer!r}"
            )
        saved = checkpoint["config"]
        current = config.to_dict()
        differing = sorted(
            name for name in current if name not in _RESUME_FREE_FIELDS and saved.get(name) != current[name]
        )
        if differing:
            details = ", ".join(f"{name}: {saved.get(name)!r} -> {current[name]!r}" for name in differing)
            raise ValueError(f"SaeTrainer: cannot resume with a different configuration ({details})")
