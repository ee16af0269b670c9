"""``BaseDataset``: what every text dataset offers to activation saving and inference."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterator

from mi_crow.validation import check_int, check_positive_int

__all__ = ["BaseDataset", "check_positive_int", "sample_indices"]


def sample_indices(n_total: int, n: object, seed: int | None) -> list[int]:
    """``n`` distinct row indices out of ``n_total``, drawn uniformly without replacement.

    Args:
        n_total: how many rows there are.
        n: how many to draw, ``1 <= n <= n_total``.
        seed: seed of the draw (same seed, same rows in the same order); ``None``: a fresh draw each time.

    Raises:
        ValueError: ``n`` out of range; TypeError: ``n`` or ``seed`` not an int.
    """
    n = check_int(n, "n", minimum=1, maximum=n_total)
    seed = check_int(seed, "seed", allow_none=True)
    return random.Random(seed).sample(range(n_total), n)


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
