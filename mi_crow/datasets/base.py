"""``BaseDataset``: what every text dataset offers to activation saving and inference."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator


def check_positive_int(value: object, argument: str) -> int:
    """Return ``value`` if it is an int > 0, else raise a TypeError/ValueError naming ``argument``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{argument} must be > 0, got {value}")
    return value


class BaseDataset(ABC):
    """An iterable of texts (``str``) with batched iteration and a description for run metadata.

    Subclasses implement :meth:`__iter__` and :meth:`describe`, and :meth:`__len__` when the size is known.

    Attributes:
        name: short identifier of the source (``"texts"``, a file path, a Hub dataset name), stored in run metadata.
    """

    name: str

    @abstractmethod
    def __iter__(self) -> Iterator[str]:
        """Yield the texts one by one, in a fixed order."""

    def __len__(self) -> int:
        """Number of texts; raises TypeError when the size is not known up front (streaming sources)."""
        raise TypeError(f"the length of {self.describe()} is not known (a streaming source)")

    @abstractmethod
    def describe(self) -> str:
        """One-line description of the source and its options, recorded in activation-run metadata."""

    def iter_batches(self, batch_size: int) -> Iterator[list[str]]:
        """Yield consecutive lists of ``batch_size`` texts (the last list may be shorter).

        Args:
            batch_size: texts per batch, > 0.

        Returns:
            An iterator of non-empty ``list[str]``.
        """
        check_positive_int(batch_size, "batch_size")
        batch: list[str] = []
        for text in self:
            batch.append(text)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __repr__(self) -> str:
        return self.describe()
