"""The numbers of one training run: its plan (fixed when it starts) and its progress (saved in checkpoints)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import torch

from mi_crow.errors import UserInputError
from mi_crow.validation import fail

from mi_crow.mechanistic.sae.config import SaeTrainingConfig, dead_window_for
from mi_crow.mechanistic.sae.train.schedule import default_lr
from mi_crow.mechanistic.sae.train.results import ActivationReader, NonFiniteTrainingError

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.sae import TopKSae

__all__ = ["TrainingPlan", "TrainingState"]

logger = logging.getLogger(__name__)

# The progress counters as the checkpoint names them (TrainingState field -> checkpoint key).
_CHECKPOINT_KEYS = {
    "step": "step",
    "epoch": "epoch",
    "tokens_seen": "tokens_seen",
    "batches_seen": "batches_seen",
    "nonfinite": "nonfinite_batches",
    "outliers": "outlier_tokens",
}


def _utc_run_id() -> str:
    return f"sae-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class TrainingPlan:
    """What a run will do, derived once from the config, the SAE and the first reader.

    Attributes:
        training_run_id: the run's name; its files live under ``runs/<training_run_id>/``.
        total_steps: optimizer steps planned.
        warmup_steps: learning-rate warm-up length.
        peak_lr: learning rate after warm-up.
        k_aux: dead latents per token used by AuxK.
        dead_window_tokens: tokens without activity after which a latent counts as dead (and AuxK trains it).
        k_start, k_anneal_steps: the number of active latents starts at ``k_start`` and decays linearly to the SAE's
            ``k`` over the first ``k_anneal_steps`` steps (no annealing: ``k_anneal_steps == 0``).
        encode_dtype: dtype of the encoder product.
        run_id, layer, model_id: the activations trained on (None when training on a tensor).
    """

    training_run_id: str
    total_steps: int
    warmup_steps: int
    peak_lr: float
    k_aux: int
    dead_window_tokens: int
    k_start: int
    k_anneal_steps: int
    encode_dtype: torch.dtype
    run_id: str | None
    layer: str | None
    model_id: str | None

    @property
    def prefix(self) -> str:
        """Store folder of the run: ``runs/<training_run_id>``."""
        return f"runs/{self.training_run_id}"

    @classmethod
    def make(
        cls,
        config: SaeTrainingConfig,
        sae: TopKSae,
        reader: ActivationReader,
        run_id: str | None,
        layer: str | None,
        model_id: str | None,
    ) -> TrainingPlan:
        """The plan for training ``sae`` with ``config`` on epochs like ``reader``.

        Raises:
            UserInputError: the reader's width is not ``sae.n_inputs``, or it has fewer tokens than one batch.
        """
        if reader.d_in != sae.n_inputs:
            raise UserInputError(
                f"SaeTrainer: the activations have width {reader.d_in} but the SAE has n_inputs={sae.n_inputs}"
            )
        steps_per_epoch = reader.n_tokens // config.batch_size
        if steps_per_epoch == 0:
            raise UserInputError(
                f"SaeTrainer: the run has {reader.n_tokens} tokens, fewer than batch_size={config.batch_size}"
            )
        if config.n_tokens is not None:
            total_steps = config.n_tokens // config.batch_size
        else:
            epochs = config.epochs or 1.0
            if epochs * reader.n_tokens < config.batch_size:
                raise fail("SaeTrainingConfig.epochs", f"enough for one batch of {config.batch_size} tokens (the run "
                           f"has {reader.n_tokens} tokens)", config.epochs)
            total_steps = max(1, int(epochs * steps_per_epoch))
        budget = total_steps * config.batch_size
        k_start = sae.k
        anneal = 0
        if config.k_anneal_fraction > 0:
            k_start = config.k_anneal_start if config.k_anneal_start is not None else min(sae.n_latents, 4 * sae.k)
            if not sae.k <= k_start <= sae.n_latents:
                raise fail("SaeTrainingConfig.k_anneal_start", f"between the SAE's k={sae.k} and n_latents="
                           f"{sae.n_latents}", k_start)
            anneal = int(config.k_anneal_fraction * total_steps)
        return cls(
            training_run_id=config.training_run_id or _utc_run_id(),
            total_steps=total_steps,
            warmup_steps=config.warmup_steps if config.warmup_steps is not None else min(1000, total_steps // 20),
            peak_lr=config.lr if config.lr is not None else default_lr(sae.n_latents, budget),
            k_aux=min(config.k_aux if config.k_aux is not None else max(1, sae.n_inputs // 2), sae.n_latents),
            dead_window_tokens=dead_window_for(config, budget),
            k_start=k_start,
            k_anneal_steps=anneal,
            encode_dtype=torch.bfloat16 if config.encode_dtype == "bfloat16" else sae.dtype,
            run_id=run_id,
            layer=layer,
            model_id=model_id,
        )


@dataclass
class TrainingState:
    """Progress of a run: the counters and history a checkpoint saves and a resumed run continues from.

    Attributes:
        step: optimizer steps done.
        epoch: current epoch of the reader.
        tokens_seen: tokens consumed by the steps done.
        batches_seen: batches read (skipped ones included).
        nonfinite: batches skipped because of NaN/Inf activations or loss.
        outliers: tokens left out by ``outlier_norm_factor``.
        history: the logged records.
        input_scale: the scalar the inputs are multiplied by during training (``normalize_inputs``; 1 otherwise).
        resumed_from: the checkpoint step this run continued from (None for a fresh run; not saved).
    """

    step: int = 0
    epoch: int = 0
    tokens_seen: int = 0
    batches_seen: int = 0
    nonfinite: int = 0
    outliers: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    input_scale: float = 1.0
    resumed_from: int | None = None

    def to_checkpoint(self) -> dict[str, Any]:
        """The counters and the history under their checkpoint keys."""
        out: dict[str, Any] = {key: getattr(self, name) for name, key in _CHECKPOINT_KEYS.items()}
        out["history"] = self.history
        out["input_scale"] = self.input_scale
        return out

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> TrainingState:
        """The state saved by :meth:`to_checkpoint` (``resumed_from`` is the saved step)."""
        counters = {name: int(checkpoint[key]) for name, key in _CHECKPOINT_KEYS.items()}
        return cls(**counters, history=list(checkpoint["history"]), input_scale=float(checkpoint.get("input_scale", 1.0)),
                   resumed_from=counters["step"])

    def check_nonfinite(self, config: SaeTrainingConfig, *, final: bool) -> None:
        """Raise when too many batches were skipped as non-finite (after the grace batches, or at the end).

        Raises:
            NonFiniteTrainingError: every batch was non-finite (at the end), or the fraction exceeds
                ``config.max_nonfinite_fraction``.
        """
        nonfinite, seen = self.nonfinite, self.batches_seen
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
