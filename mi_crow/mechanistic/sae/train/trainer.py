"""`SaeTrainer`: TopK SAE training from a stored activation run (the recipe of one step is in ``step.py``).

A run: plan it (``state.TrainingPlan``), initialise the weights or resume from the checkpoint (``checkpoint.py``),
then take steps on batches from epoch after epoch (``batches.EpochBatches``), logging the window means
(``metrics.MetricsWindow``) every ``log_every`` steps and checkpointing every ``checkpoint_every``; at the end the
run's config is marked completed and the SAE saved.

Files of a run in the store: ``runs/<training_run_id>/config.json`` (the plan, ``status`` running/completed),
``training_history.json`` (the log records) and ``checkpoint.pt``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.mechanistic.sae.config import SaeTrainingConfig
from mi_crow.mechanistic.sae.data import TensorActivationReader
from mi_crow.mechanistic.sae.train.batches import EpochBatches
from mi_crow.mechanistic.sae.train.checkpoint import (
    check_checkpoint,
    read_checkpoint,
    restore_checkpoint,
    write_checkpoint,
)
from mi_crow.mechanistic.sae.outliers import attention_sink_mask
from mi_crow.mechanistic.sae.train.init import fold_into_weights, initialise_weights
from mi_crow.mechanistic.sae.train.metrics import MetricsWindow
from mi_crow.mechanistic.sae.train.on_the_fly import DEFAULT_BUFFER_BYTES
from mi_crow.mechanistic.sae.train.results import (
    ActivationReader,
    ReaderFactory,
    StepInfo,
    TrainingResult,
)
from mi_crow.mechanistic.sae.train.schedule import k_at_step, lr_at_step
from mi_crow.mechanistic.sae.train.state import TrainingPlan, TrainingState
from mi_crow.mechanistic.sae.train.step import SaeStepper
from mi_crow.mechanistic.sae.train.wandb_log import WandbRun, require_wandb
from mi_crow.store.base import Store
from mi_crow.validation import check_identifier, check_tensor, resolve_synonym

__all__ = ["HISTORY_FILE", "RUN_CONFIG_FILE", "SaeTrainer"]

logger = logging.getLogger(__name__)

HISTORY_FILE = "training_history.json"
RUN_CONFIG_FILE = "config.json"


class SaeTrainer(SaeStepper):
    """Trains a `TopKSae` on activations streamed from a store (see ``step.py`` for the recipe of one step).

    Args:
        sae: the SAE to train (in place).
        store: the store holding the activation run; also receives ``runs/<training_run_id>/`` (history, config,
            checkpoints) and the trained SAE. May be None: then pass it to `train` (``SaeTrainer(sae).train(store,
            ...)``), or use `train_on_tensor` without checkpoints.

    Attributes:
        sae: the SAE.
        store: the store.
        optimizer: the Adam optimizer of the current/last run (None before training).
        tokens_since_fired: ``[n_latents]`` int64, tokens since each latent was last active.
    """

    _wandb: WandbRun | None = None  # the W&B run of the training in progress, when use_wandb is on

    # -- public entry points -------------------------------------------------------------------------------------
    def train(
        self,
        *args: Any,
        store: Store | None = None,
        run_id: str | None = None,
        layer_signature: str | None = None,
        config: SaeTrainingConfig | None = None,
        layer: str | None = None,
        callbacks: Sequence[Callable[[StepInfo], None]] = (),
    ) -> TrainingResult:
        """Train on ``activations/<run_id>/`` layer ``layer_signature`` of a store.

        Call shapes (the first positional argument tells them apart by type):

        - ``SaeTrainer(sae).train(store=..., run_id=..., layer_signature=..., config=...)``
        - ``SaeTrainer(sae).train(store, run_id, layer_signature, config)`` (a `Store` first)
        - ``SaeTrainer(sae, store).train(run_id, layer, config)`` (a run id first)

        A store passed here becomes the trainer's store. ``layer`` is a synonym of ``layer_signature``. A flattened
        layer name of the original mi-crow (``gpt2lmheadmodel_transformer_h_0_mlp``) finds the stored dotted name.

        Args:
            *args: ``store, run_id, layer_signature, config`` or ``run_id, layer_signature, config`` (a prefix).
            store: the store holding the activation run; it also receives the run's history, checkpoints and SAE.
            run_id: activation run id (``store.list_runs()``).
            layer_signature: layer name stored in the run.
            config: `SaeTrainingConfig` (defaults when None).
            layer: synonym of ``layer_signature``.
            callbacks: called with a `StepInfo` after every optimizer step (and after its checkpoint); an exception
                from a callback stops training (the last checkpoint stays, so ``resume=True`` continues).

        Returns:
            `TrainingResult` (also a mapping of per-log-step lists: ``result["loss"]``, ``result["r2"]``, ...).

        Raises:
            UserInputError: unknown run or layer, a layer width different from ``sae.n_inputs``, a bad config, no
                store, an argument given twice with different values.
            NonFiniteTrainingError: too many non-finite batches.
        """
        given = _bind_train_arguments(
            args, {"store": store, "run_id": run_id, "layer_signature": layer_signature, "config": config}
        )
        store, run_id, config = given["store"], given["run_id"], given["config"]
        layer = resolve_synonym("layer_signature", given["layer_signature"], "layer", layer)
        if store is not None:
            if not isinstance(store, Store):
                raise ArgumentTypeError(f"SaeTrainer.train: store must be a Store, got {type(store).__name__}")
            self.store = store
        if run_id is None or layer is None:
            raise UserInputError(
                f"SaeTrainer.train: run_id and layer_signature are required, got run_id={run_id!r}, "
                f"layer_signature={layer!r}"
            )
        if self.store is None:
            raise UserInputError("SaeTrainer.train: the trainer has no store (SaeTrainer(sae, store))")
        config = self._check_config(config)
        store = self.store
        check_identifier(run_id, "SaeTrainer.train: run_id")
        runs = store.list_runs()
        if run_id not in runs:
            raise UserInputError(f"SaeTrainer.train: unknown activation run_id {run_id!r}; runs in the store: {runs}")
        meta = store.read_run_meta(run_id)
        layer_dims = meta.get("layer_dims", {})
        layer = _stored_layer_name(layer, layer_dims)
        if layer not in layer_dims:
            raise UserInputError(
                f"SaeTrainer.train: layer {layer!r} is not stored in run {run_id!r}; stored layers: "
                f"{sorted(layer_dims)}"
            )
        if int(layer_dims[layer]) != self.sae.n_inputs:
            raise UserInputError(
                f"SaeTrainer.train: layer {layer!r} of run {run_id!r} has width {layer_dims[layer]} but the SAE has "
                f"n_inputs={self.sae.n_inputs}"
            )

        def factory(epoch: int) -> ActivationReader:
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
        def sample() -> ActivationReader:
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
        check_tensor(activations, "SaeTrainer.train_on_tensor: activations", ndim=2,
                     shape=(None, self.sae.n_inputs))

        def factory(epoch: int) -> ActivationReader:
            return TensorActivationReader(
                activations, config.batch_size, shuffle=config.shuffle, seed=config.seed + epoch, drop_last=True
            )

        return self.train_from_reader(factory, config, callbacks=callbacks)

    def train_from_model(
        self,
        lm: Any,
        dataset: Any,
        layers: str | int | Sequence[str | int],
        config: SaeTrainingConfig | None = None,
        *,
        forward_batch_size: int = 16,
        max_length: int = 128,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        callbacks: Sequence[Callable[[StepInfo], None]] = (),
    ) -> TrainingResult:
        """Train straight from the model's forward passes over ``dataset``, without a stored activation run.

        The forwards run on a producer thread into a shuffle buffer of ``buffer_bytes`` (two halves: one trained on,
        one filled; see ``on_the_fly.py``); padding never reaches the SAE and attention sinks are left out by the one
        outlier rule (``config.outlier_norm_factor``, over the real tokens of each forward batch). One epoch is one
        pass over the texts. Checkpoints (with a store) record the position in the dataset: ``resume=True``
        recomputes at most the forwards of one buffer half and continues bit for bit; resuming with other texts,
        another model, layer, ``max_length``, ``forward_batch_size`` or ``buffer_bytes`` is refused, naming what
        differs.

        Args:
            lm: the `LanguageModel`.
            dataset: a list of str or a mi_crow dataset (its texts are read in order).
            layers: the layer (a name or block index; a one-element list is accepted). Several layers: `SaeGrid`.
            config: `SaeTrainingConfig` (``n_tokens`` or ``epochs`` set the budget; default one epoch).
            forward_batch_size: texts per forward pass.
            max_length: tokens per text (truncation).
            buffer_bytes: size of the shuffle buffer in bytes (default 1 GiB).
            callbacks: as in `train`.

        Returns:
            `TrainingResult`; the saved SAE's metadata names the layer and model (no activation run).

        Raises:
            UserInputError: several layers, a layer whose width is not ``sae.n_inputs``, a buffer smaller than two
                batches, empty texts, a bad config, or a resume that does not match the checkpoint.
        """
        from mi_crow.mechanistic.sae.train.on_the_fly import ModelActivationStream, texts_of

        config = self._check_config(config)
        layer_list = [layers] if isinstance(layers, (str, int)) else list(layers)
        if len(layer_list) != 1:
            raise UserInputError(
                f"SaeTrainer.train_from_model: layers must name one layer for one SAE, got {layers!r}; train several "
                f"layers at once with SaeGrid"
            )
        layer = lm.layers.resolve(layer_list[0])
        width = int(lm.layers.width(layer))
        if width != self.sae.n_inputs:
            raise UserInputError(
                f"SaeTrainer.train_from_model: layer {layer!r} has width {width} but the SAE has "
                f"n_inputs={self.sae.n_inputs}"
            )
        stream = ModelActivationStream(
            lm, texts_of(dataset), [layer], batch_size=config.batch_size, forward_batch_size=forward_batch_size,
            max_length=max_length, buffer_bytes=buffer_bytes, seed=config.seed, dtype=self.sae.dtype,
            device=self.sae.device, outlier_norm_factor=config.outlier_norm_factor,
        )
        return self.train_from_reader(
            lambda epoch: stream.reader(epoch, layer), config, layer=layer, model_id=getattr(lm, "model_id", None),
            callbacks=callbacks, sample_reader=lambda: stream.sample(layer),
        )

    # -- the run -------------------------------------------------------------------------------------------------
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
        # dist: layout, rank checks and per-rank readers (identity for a single process)
        config, reader_factory, sample_reader = self._distribute(config, reader_factory, sample_reader)
        self.config = config
        if self.store is None and (config.checkpoint_every is not None or config.resume or config.save_sae):
            raise UserInputError(
                "SaeTrainer: checkpoint_every, resume and save_sae need a store; pass SaeTrainer(sae, store) or set "
                "checkpoint_every=None, save_sae=False"
            )
        wandb = require_wandb() if config.use_wandb else None  # fail before any work when it is missing
        reader = reader_factory(0)
        plan = TrainingPlan.make(config, self.sae, reader, run_id, layer, model_id)
        # One writer per training run: a second process training into the same run id is refused (naming the
        # holder's pid) instead of interleaving checkpoints and history; a crashed holder's lock is taken over.
        lock = (contextlib.nullcontext() if self.store is None or not self._writes_run  # dist: rank 0 locks
                else self.store.lock_run(plan.training_run_id, kind="training", purpose="training"))
        with lock:
            return self._run(plan, reader_factory, reader, sample_reader, callbacks, wandb)

    def _run(
        self,
        plan: TrainingPlan,
        reader_factory: ReaderFactory,
        reader: Any,
        sample_reader: Callable[[], Iterable[Tensor]] | None,
        callbacks: Sequence[Callable[[StepInfo], None]],
        wandb: Any,
    ) -> TrainingResult:
        """The loop of `train_from_reader` once the plan is made and the run is locked (``wandb``: the imported
        module when ``use_wandb`` is on, else ``None``)."""
        session = self._open(plan, reader_factory, reader, sample_reader, callbacks, wandb)
        failed = True
        try:
            batches, state = session.batches, session.state
            while state.step < plan.total_steps:
                batch = batches.next()
                self._advance(session, batch, batches.reader)
            result = self._finish(plan, state, session.run_config)
            failed = False
        finally:
            self._close(session, failed)
        return result

    def _open(
        self,
        plan: TrainingPlan,
        reader_factory: ReaderFactory,
        reader: Any,
        sample_reader: Callable[[], Iterable[Tensor]] | None,
        callbacks: Sequence[Callable[[StepInfo], None]],
        wandb: Any,
        checkpoint: Any = ...,
    ) -> _Session:
        """Start a run: optimizer, weights or checkpoint, the run config, progress bar, metrics window, W&B.

        ``checkpoint``: the checkpoint dict to resume from (a grid passes its member's), None for a fresh start,
        or ``...``: the run's own checkpoint when ``config.resume`` asks for it.
        """
        config = self.config
        self._enter_layout(plan.k_start)  # dist: latent-sharded runs train this rank's slice
        self.prepare(config, plan.peak_lr, plan.dead_window_tokens)
        state, batches, window_state = self._start(plan, reader_factory, reader, sample_reader, checkpoint)
        run_config = self._write_run_config(plan, status="running")
        bar = self._progress_bar(plan, state)
        window = MetricsWindow(self.sae.device)
        if window_state is not None:
            window.load_checkpoint(window_state)
        self._wandb = None
        if wandb is not None and self._writes_run:  # dist: rank 0 logs
            self._wandb = WandbRun(wandb, config.wandb_project, config.wandb_run_name or plan.training_run_id,
                                   run_config)
        return _Session(plan, state, batches, window, run_config, bar, tuple(callbacks))

    def _advance(self, session: _Session, batch: Tensor, reader: Any, *, checkpoints: bool = True) -> None:
        """One batch of a run: the step, then (as due) the log record, the checkpoint and the callbacks.

        ``reader``: the reader the batch came from (its position goes into the checkpoint; a reader that filters
        the outlier rule itself reports the tokens it left out through ``take_outliers``)."""
        plan, state, window, config = session.plan, session.state, session.window, self.config
        filtered = getattr(reader, "filters_outliers", False)
        if filtered:
            state.outliers += reader.take_outliers()
        lr = self._train_batch(batch, plan, state, window, filtered=filtered)
        if lr is None:
            return
        every = config.checkpoint_every
        checkpoint_due = checkpoints and every is not None and state.step % every == 0 and state.step < plan.total_steps
        if state.step % config.log_every == 0 or state.step == plan.total_steps:
            self._log(plan, state, window, lr, session.bar,
                      write=checkpoint_due or state.step == plan.total_steps)
        if session.bar is not None:
            session.bar.update(1)
        if checkpoint_due:
            write_checkpoint(self.store, plan, config, self.sae, self.optimizer, self.tokens_since_fired,
                             state, reader, window)
        for callback in session.callbacks:
            callback(StepInfo(state.step, plan.total_steps, state.tokens_seen, self))

    def _close(self, session: _Session, failed: bool) -> None:
        if session.bar is not None:
            session.bar.close()
        if self._wandb is not None:
            self._wandb.finish(failed=failed)
            self._wandb = None

    def _start(
        self,
        plan: TrainingPlan,
        reader_factory: ReaderFactory,
        reader: ActivationReader,
        sample_reader: Callable[[], Iterable[Tensor]] | None,
        checkpoint: Any = ...,
    ) -> tuple[TrainingState, EpochBatches, dict[str, Any] | None]:
        """Resume from the run's checkpoint when asked and one exists, else initialise the weights.

        Returns:
            ``(state, batches, the checkpoint's metrics window or None)``.
        """
        config = self.config
        if checkpoint is ...:
            checkpoint = read_checkpoint(self.store, plan) if config.resume else None
        if checkpoint is None:
            scale = self._initialise_weights(config, sample_reader or (lambda: reader_factory(0)))  # dist
            state = TrainingState(input_scale=scale)
            return state, EpochBatches(reader_factory, state, reader), None
        check_checkpoint(checkpoint, self.sae, config, plan)
        self.tokens_since_fired, state = restore_checkpoint(checkpoint, self.sae, self.optimizer)
        batches = EpochBatches(reader_factory, state, reader, checkpoint["reader"])
        logger.info("resumed training run %s at step %d/%d", plan.training_run_id, state.step, plan.total_steps)
        return state, batches, checkpoint["window"]

    def _train_batch(
        self, batch: Tensor, plan: TrainingPlan, state: TrainingState, window: MetricsWindow, *,
        filtered: bool = False,
    ) -> float | None:
        """Filter one batch (non-finite, outlier tokens) and take one step on it.

        ``filtered``: the batch is already free of outlier tokens (the reader applied the rule).

        Returns:
            The step's learning rate, or None when the batch was skipped as non-finite.
        """
        config, sae = self.config, self.sae
        state.batches_seen += 1
        x = batch.to(device=sae.device, dtype=sae.dtype, non_blocking=True)
        # NaN/Inf anywhere makes a sum (or a row norm) non-finite; an overflowing one would overflow the loss's
        # squares too. With outlier filtering the row norms serve both checks in one pass over x, and the sum and
        # the sink count come to the host together (one synchronisation).
        if config.outlier_norm_factor is None or filtered:
            if not self._all_finite(x.sum()):  # dist: over every rank
                return self._skip_nonfinite(state)
        else:
            norms = (x.norm(dim=1) if x.dtype in (torch.float32, torch.float64)
                     else torch.linalg.vector_norm(x, dim=1, dtype=torch.float32))
            if self._data_parallel:
                # dist: finite over every rank; the median and the count over every rank's token norms
                if not self._all_finite(norms.sum()):
                    return self._skip_nonfinite(state)
                sinks, n_out = self._sink_mask(x, norms, config.outlier_norm_factor)
            else:
                # The one outlier rule on the row norms already at hand: the norm of a one-element row is its
                # absolute value, so [B, 1] norms give the same decision as x without a second pass over x.
                sinks = attention_sink_mask(norms.unsqueeze(1), factor=config.outlier_norm_factor)
                total, n_out = torch.stack([norms.sum(), sinks.sum(dtype=norms.dtype)]).tolist()
                if not math.isfinite(total):
                    return self._skip_nonfinite(state)
            if n_out:
                state.outliers += int(n_out)
                x = x[~sinks]
        if state.input_scale != 1.0:
            x = x * state.input_scale
        lr = lr_at_step(state.step, plan.total_steps, plan.peak_lr, plan.warmup_steps, config)
        k = k_at_step(state.step, plan.k_start, self.sae.k, plan.k_anneal_steps)
        out = self.train_step(x, lr, k_aux=plan.k_aux, encode_dtype=plan.encode_dtype, k=k)
        if out is None:
            return self._skip_nonfinite(state)
        window.add(out)
        state.step += 1
        state.tokens_seen += out.tokens
        return lr

    def _skip_nonfinite(self, state: TrainingState) -> None:
        state.nonfinite += 1
        state.check_nonfinite(self.config, final=False)

    # The history file is rewritten whole (it is one JSON list), so its cost grows with the run: it is written at
    # checkpoints and at the end, and in between only once the time since the last write is this many times what
    # that write took (at most ~1/HISTORY_WRITE_SPACING of the run goes to it). Resuming never needs the file: the
    # checkpoint holds the history.
    HISTORY_WRITE_SPACING = 20.0
    _history_written_at = float("-inf")
    _history_write_cost = 0.0

    def _log(self, plan: TrainingPlan, state: TrainingState, window: MetricsWindow, lr: float, bar: Any,
             write: bool = True) -> None:
        """Append the window's record to the history (and, when ``write`` or when due, to the store), show it on
        the bar, empty the window."""
        means = window.means(self.sae.n_inputs)
        # Before a full window of tokens no latent can have been silent for a window: "not yet measurable" (None).
        dead_count = None
        if state.tokens_seen >= plan.dead_window_tokens:
            dead_count = self._dead_count(plan.dead_window_tokens)  # dist: over every rank's latents
        record = {
            "step": state.step,
            "tokens": state.tokens_seen,
            "loss": means["loss"],
            "mse": means["mse"] / state.input_scale**2,  # in the raw activations' scale
            "fvu": means["fvu"],
            "r2": 1.0 - means["fvu"],
            "l0": means["l0"],
            "dead_fraction": None if dead_count is None else dead_count / self._n_latents_total,  # dist
            "dead_features": dead_count,
            "auxk_loss": means["auxk_loss"],
            "l1": means["l1"],
            "tokens_per_s": means["tokens_per_s"],
            "lr": lr,
            "nonfinite_batches": state.nonfinite,
            "outlier_tokens": state.outliers,
        }
        state.history.append(record)
        window.clear()
        if self.store is not None and self._writes_run:  # dist: rank 0 writes
            now = time.perf_counter()
            if write or now - self._history_written_at >= self.HISTORY_WRITE_SPACING * self._history_write_cost:
                self.store.put_json(f"{plan.prefix}/{HISTORY_FILE}", state.history)
                self._history_written_at = time.perf_counter()
                self._history_write_cost = self._history_written_at - now
        if self._wandb is not None:
            self._wandb.log(record)
        if bar is not None:
            bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                fvu=f"{record['fvu']:.4f}",
                l0=f"{record['l0']:.1f}",
                dead="n/a" if dead_count is None else f"{record['dead_fraction']:.3f}",
                auxk=f"{record['auxk_loss']:.4f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                refresh=False,
            )
        logger.debug("step %d: %s", state.step, record)
        window.restart_clock()

    def _progress_bar(self, plan: TrainingPlan, state: TrainingState) -> Any:
        if not self.config.progress or not self._writes_run:
            return None
        from tqdm.auto import tqdm  # only runs that show progress need tqdm

        return tqdm(total=plan.total_steps, initial=state.step, desc=f"train SAE {plan.training_run_id}", unit="step")

    def _write_run_config(self, plan: TrainingPlan, **status: Any) -> dict[str, Any]:
        """Write ``runs/<id>/config.json`` (when there is a store) and return it."""
        run_config = {
            "training_run_id": plan.training_run_id,
            "activation_run_id": plan.run_id,
            "layer": plan.layer,
            "model_id": plan.model_id,
            "training_config": self.config.to_dict(),
            "sae": self.sae.config_dict(),
            "total_steps": plan.total_steps,
            "peak_lr": plan.peak_lr,
            "warmup_steps": plan.warmup_steps,
            "k_aux": plan.k_aux,
            "dead_window_tokens": plan.dead_window_tokens,
            "optimizer": type(self.optimizer).__name__ + self._optimizer_flavour(),
            **status,
        }
        if self.store is not None and self._writes_run:
            self.store.put_json(f"{plan.prefix}/{RUN_CONFIG_FILE}", run_config)
        return run_config

    def _finish(self, plan: TrainingPlan, state: TrainingState, run_config: dict[str, Any]) -> TrainingResult:
        """Final non-finite check, SAE metadata, the completed run config and the saved SAE."""
        self._leave_layout()  # dist: the latent slices gathered back into the caller's SAE
        config, sae, store = self.config, self.sae, self.store
        state.check_nonfinite(config, final=True)
        fold_into_weights(sae, state.input_scale, config.topk_by_decoder_norm)
        sae.metadata.update(
            {"layer": plan.layer, "model_id": plan.model_id, "activation_run_id": plan.run_id,
             "training_run_id": plan.training_run_id}
        )
        sae.outlier_norm_factor = config.outlier_norm_factor
        sae_id = None
        if store is not None and config.save_sae:
            sae_id = config.sae_id or plan.training_run_id
        if store is not None and self._writes_run:
            # The history is already on disk: the last step always logs.
            run_config.update(status="completed", steps=state.step, tokens=state.tokens_seen,
                              nonfinite_batches=state.nonfinite, outlier_tokens=state.outliers)
            store.put_json(f"{plan.prefix}/{RUN_CONFIG_FILE}", run_config)
            if config.save_sae:
                sae.save(store, sae_id)
        return TrainingResult(
            training_run_id=plan.training_run_id,
            sae_id=sae_id,
            history=state.history,
            steps=state.step,
            tokens=state.tokens_seen,
            nonfinite_batches=state.nonfinite,
            outlier_tokens=state.outliers,
            resumed_from_step=state.resumed_from,
            config=config,
        )


@dataclass
class _Session:
    """A run in progress: what `SaeTrainer._advance` needs between two batches."""

    plan: TrainingPlan
    state: TrainingState
    batches: EpochBatches
    window: MetricsWindow
    run_config: dict[str, Any]
    bar: Any
    callbacks: tuple[Callable[[StepInfo], None], ...]


_TRAIN_POSITIONAL_WITH_STORE = ("store", "run_id", "layer_signature", "config")
_TRAIN_POSITIONAL = ("run_id", "layer_signature", "config")


def _bind_train_arguments(args: tuple[Any, ...], given: dict[str, Any]) -> dict[str, Any]:
    """Put `SaeTrainer.train`'s positional arguments into their named slots: a `Store` first means
    ``(store, run_id, layer_signature, config)``, anything else ``(run_id, layer_signature, config)``."""
    if not args:
        return given
    names = _TRAIN_POSITIONAL_WITH_STORE if isinstance(args[0], Store) else _TRAIN_POSITIONAL
    if not isinstance(args[0], (Store, str)):
        raise ArgumentTypeError(
            f"SaeTrainer.train: the first argument must be a Store (train(store, run_id, layer_signature, config)) "
            f"or a run id (train(run_id, layer, config)), got {type(args[0]).__name__}"
        )
    if len(args) > len(names):
        raise ArgumentTypeError(
            f"SaeTrainer.train: takes at most {len(names)} positional arguments ({', '.join(names)}), got {len(args)}"
        )
    out = dict(given)
    for name, value in zip(names, args):
        if out[name] is not None and out[name] is not value and out[name] != value:
            raise UserInputError(
                f"SaeTrainer.train: {name} given both positionally ({value!r}) and as a keyword ({out[name]!r})"
            )
        out[name] = value
    return out


def _stored_layer_name(layer: Any, stored: dict[str, Any]) -> Any:
    """``layer`` as the run stores it: itself, or the one stored dotted name whose flattened spelling it is
    (``<model class>_<path with '.' as '_'>``, the original mi-crow's layer names)."""
    if not isinstance(layer, str) or layer in stored:
        return layer
    matches = []
    for name in stored:
        suffix = "_" + name.replace(".", "_")
        prefix = layer[: -len(suffix)] if layer.endswith(suffix) else ""
        if prefix and "_" not in prefix and "." not in prefix:
            matches.append(name)
    return matches[0] if len(matches) == 1 else layer
