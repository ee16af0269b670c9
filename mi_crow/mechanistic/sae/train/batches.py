"""Batches over consecutive epochs: a fresh reader (a fresh shuffle) each time one runs out."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mi_crow.errors import UserInputError

from mi_crow.mechanistic.sae.train.results import ActivationReader, NonFiniteTrainingError, ReaderFactory
from mi_crow.mechanistic.sae.train.state import TrainingState

__all__ = ["EpochBatches"]


class EpochBatches:
    """Yields batches from ``reader_factory(epoch)`` for epoch after epoch, keeping ``state.epoch`` current.

    Args:
        reader_factory: ``epoch -> reader``; epoch ``e`` must always give the same order.
        state: the run's state; ``state.epoch`` is the epoch to start in and is advanced here, ``state.step`` tells
            whether an epoch trained anything.
        reader: the reader of ``state.epoch`` if one exists already (``reader_factory(0)`` made for the plan).
        reader_state: a checkpoint's reader position to continue from (None for a fresh run).

    Raises (from :meth:`next`):
        ValueError: an epoch (not a resumed one) yields no batch.
        NonFiniteTrainingError: a whole epoch trained no step, so another pass would only repeat it.
    """

    def __init__(
        self,
        reader_factory: ReaderFactory,
        state: TrainingState,
        reader: ActivationReader | None = None,
        reader_state: dict[str, Any] | None = None,
    ) -> None:
        self._factory = reader_factory
        self._state = state
        if reader is None or state.epoch != 0:
            reader = reader_factory(state.epoch)
        if reader_state is not None:
            reader.load_state_dict(reader_state)
        self.reader = reader
        self._iterator = None
        self._epoch_batches = 0
        # A resumed epoch began before the checkpoint: its earlier batches are not counted here, and whether it
        # trained anything is unknown.
        self._in_resumed_epoch = reader_state is not None
        self._epoch_start_step = -1 if reader_state is not None else state.step

    def next(self) -> Tensor:
        """The next batch, moving on to the next epoch when this one is exhausted."""
        if self._iterator is None:
            self._iterator = iter(self.reader)
        while True:
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._next_epoch()
                continue
            self._epoch_batches += 1
            return batch

    def _next_epoch(self) -> None:
        state = self._state
        if self._epoch_batches == 0 and not self._in_resumed_epoch:
            raise UserInputError(f"SaeTrainer: epoch {state.epoch} of the activation reader yields no batch") from None
        if state.step == self._epoch_start_step:
            # Another pass would see the same batches again: stop instead of looping forever.
            raise NonFiniteTrainingError(
                f"SaeTrainer: every one of the {self._epoch_batches} batches of epoch {state.epoch} had non-finite "
                f"activations or loss; nothing could be trained"
            ) from None
        self._epoch_batches = 0
        self._in_resumed_epoch = False
        self._epoch_start_step = state.step
        state.epoch += 1
        self.reader = self._factory(state.epoch)
        self._iterator = iter(self.reader)
