"""What training hands back and passes around: the loss record of one batch, the callback payload, the run's
result, the reader protocol, and the error for data that cannot be trained on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from torch import Tensor

from mi_crow.errors import MiCrowError

from mi_crow.mechanistic.sae.config import SaeTrainingConfig

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.train.trainer import SaeTrainer

__all__ = ["ActivationReader", "LossOutput", "NonFiniteTrainingError", "ReaderFactory", "StepInfo", "TrainingResult"]


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
