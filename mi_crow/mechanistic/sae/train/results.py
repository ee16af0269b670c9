"""What training hands back and passes around: the loss record of one batch, the callback payload, the run's
result, the reader protocol, and the error for data that cannot be trained on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from torch import Tensor

from mi_crow.errors import MiCrowError

from mi_crow.mechanistic.sae.config import SaeTrainingConfig

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.train.trainer import SaeTrainer

__all__ = [
    "HISTORY_SERIES",
    "ActivationReader",
    "LossOutput",
    "NonFiniteTrainingError",
    "ReaderFactory",
    "StepInfo",
    "TrainingResult",
    "history_columns",
]


class NonFiniteTrainingError(MiCrowError, RuntimeError):
    """Too many batches had NaN/Inf activations or a non-finite loss (see ``max_nonfinite_fraction``).

    A problem of the data, not of the code: the CLI reports it as a user error."""


class ActivationReader(Protocol):
    """One epoch of ``[batch_size, d_in]`` batches, resumable through ``state_dict`` / ``load_state_dict``."""

    n_tokens: int
    d_in: int

    def __iter__(self) -> Iterator[Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


ReaderFactory = Callable[[int], ActivationReader]
"""``factory(epoch) -> reader`` over one epoch (a fresh shuffle per epoch)."""


class LossOutput(NamedTuple):
    """Losses and statistics of one batch (all tensors, no host sync).

    Attributes:
        loss: scalar, ``fvu + auxk_coef * auxk_loss + l1_lambda * l1`` (differentiable).
        fvu: scalar fraction of variance unexplained of the batch.
        sse: scalar sum of squared errors.
        auxk_loss: scalar AuxK loss (0 when no latent is dead or AuxK is off).
        l0: scalar mean number of active (> 0) latents per token.
        fired: ``[n_latents]`` bool, latents active on at least one token of the batch.
        tokens: number of tokens in the batch (over all data-parallel ranks).
        l1: scalar mean ``|code|`` over tokens and latents (``sum |values| / (tokens * n_latents)``), unweighted;
            ``loss`` includes ``l1_lambda * l1``.
    """

    loss: Tensor
    fvu: Tensor
    sse: Tensor
    auxk_loss: Tensor
    l0: Tensor
    fired: Tensor
    tokens: int
    l1: Tensor | None = None


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


#: The per-log-step series of the original mi-crow history, first in `TrainingResult`'s keys.
HISTORY_SERIES = ("loss", "r2", "l0", "dead_features", "fvu", "mse")


class TrainingResult(dict):
    """Outcome of `SaeTrainer.train`: a dict of per-log-step lists (the history by column) with the run's facts
    as attributes.

    As a mapping (``result["r2"]``, ``result.keys()``, ``json.dump(result, f)``) it holds one list per metric, one
    entry per log record, in step order: ``"loss"``, ``"r2"`` (``1 - fvu``), ``"l0"``, ``"dead_features"`` (a count
    of latents dead at that step), ``"fvu"``, ``"mse"`` first, then every other field of the records (``"step"``,
    ``"tokens"``, ``"dead_fraction"``, ``"auxk_loss"``, ``"l1"``, ``"tokens_per_s"``, ``"lr"``, ...). The columns
    are taken from :attr:`history` when the result is made.

    Attributes:
        training_run_id: name of the run (``runs/<training_run_id>/`` in the store).
        sae_id: where the trained SAE was saved (``sae_models/<sae_id>/``), or None.
        history: the logged records (dicts with step, tokens, loss, mse, fvu, r2, l0, dead_fraction, dead_features,
            auxk_loss, l1, tokens_per_s, lr, nonfinite_batches, outlier_tokens).
        steps: optimizer steps done.
        tokens: tokens trained on (the total; ``result["tokens"]`` is the per-record series).
        nonfinite_batches: batches skipped because of NaN/Inf.
        outlier_tokens: tokens left out by ``outlier_norm_factor``.
        resumed_from_step: the checkpoint step this call continued from (None for a fresh run).
        config: the configuration used.
    """

    def __init__(
        self,
        training_run_id: str,
        sae_id: str | None,
        history: list[dict[str, Any]],
        steps: int,
        tokens: int,
        nonfinite_batches: int,
        outlier_tokens: int,
        resumed_from_step: int | None,
        config: SaeTrainingConfig,
    ) -> None:
        super().__init__(history_columns(history))
        self.training_run_id = training_run_id
        self.sae_id = sae_id
        self.history = history
        self.steps = steps
        self.tokens = tokens
        self.nonfinite_batches = nonfinite_batches
        self.outlier_tokens = outlier_tokens
        self.resumed_from_step = resumed_from_step
        self.config = config

    def __repr__(self) -> str:
        return (
            f"TrainingResult(training_run_id={self.training_run_id!r}, sae_id={self.sae_id!r}, steps={self.steps}, "
            f"tokens={self.tokens}, records={len(self.history)}, keys={list(self)})"
        )


def history_columns(history: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The history records as columns: ``{metric: [value per record]}`` (see `TrainingResult`).

    Records written before ``r2`` was logged get ``1 - fvu``; a field a record lacks is None there.
    """
    names = list(HISTORY_SERIES)
    for record in history:
        names.extend(key for key in record if key not in names)
    columns: dict[str, list[Any]] = {name: [] for name in names}
    for record in history:
        for name in names:
            value = record.get(name)
            if value is None and name == "r2" and record.get("fvu") is not None:
                value = 1.0 - record["fvu"]
            columns[name].append(value)
    return columns
