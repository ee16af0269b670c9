"""A bounded token-shuffle buffer sized in bytes, for streams of token vectors (training straight from a model).

The stored-run reader (:class:`~mi_crow.store.reader.ActivationReader`) shuffles whole groups of files with a
seeded permutation so that it can resume exactly; a producer that generates vectors as it goes (a model forward)
needs an incremental buffer instead. :class:`ShuffleBuffer` is that buffer::

    buf = ShuffleBuffer(d=768, batch_size=4096, buffer_bytes=1 << 30, dtype=torch.float32, seed=0)
    for vectors in producer:                 # [n, d] real-token vectors, any n
        while vectors.shape[0]:
            taken = buf.push(vectors)        # rows accepted (<= buf.free)
            vectors = vectors[taken:]
            while buf.full:                  # pop only from a full buffer: best mixing
                train(buf.pop())             # [batch_size, d], rows drawn uniformly from the buffer
    while (batch := buf.pop(drain=True)) is not None:   # the end of the stream: empty the buffer
        train(batch)

Memory is one preallocated ``[capacity, d]`` tensor, ``capacity = buffer_bytes // (d * element size)``; a buffer
that cannot hold one batch is a ``ValueError``. Draws are seeded (``seed``), so the same pushes give the same pops.
Not thread-safe: guard it with a lock (or a queue in front of it) when a producer thread pushes.
"""

from __future__ import annotations

import torch

from mi_crow.errors import UserInputError
from mi_crow.store.layout import check_count
from mi_crow.store.reader import DEFAULT_BUFFER_BYTES, buffer_rows
from mi_crow.validation import check_int, fail, fail_type

__all__ = ["ShuffleBuffer"]


class ShuffleBuffer:
    """Bounded random-order buffer of ``d``-wide token vectors; see the module docstring for the loop.

    Args:
        d: vector width.
        batch_size: rows per :meth:`pop`.
        buffer_bytes: memory of the buffer (default 1 GiB).
        dtype: dtype the vectors are kept (and popped) in; pushed vectors are converted.
        seed: seed of the draws.
        device: where the buffer lives (``"cpu"`` by default).

    Attributes:
        capacity: vectors the buffer holds.
        size: vectors held now.
    """

    def __init__(self, d: int, batch_size: int, *, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 dtype: torch.dtype = torch.float32, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.d = check_count(d, "d")
        self.batch_size = check_count(batch_size, "batch_size")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise fail("dtype", "a floating-point torch.dtype", dtype)
        self.capacity = buffer_rows(buffer_bytes, self.d, dtype, self.batch_size)
        self.buffer_bytes = int(buffer_bytes)
        self.dtype = dtype
        self._data = torch.empty(self.capacity, self.d, dtype=dtype, device=device)
        self._generator = torch.Generator().manual_seed(check_int(seed, "seed"))
        self.size = 0

    def __repr__(self) -> str:
        return (f"ShuffleBuffer(d={self.d}, batch_size={self.batch_size}, capacity={self.capacity}, "
                f"size={self.size}, dtype={str(self.dtype).removeprefix('torch.')})")

    def __len__(self) -> int:
        return self.size

    @property
    def free(self) -> int:
        """Vectors :meth:`push` accepts now."""
        return self.capacity - self.size

    @property
    def full(self) -> bool:
        """Whether no more vectors fit (the moment to :meth:`pop`)."""
        return self.size == self.capacity

    def push(self, vectors: torch.Tensor) -> int:
        """Copy the first ``min(len(vectors), free)`` rows of ``vectors [n, d]`` in; returns how many were taken."""
        if not isinstance(vectors, torch.Tensor):
            raise fail_type("vectors", "a Tensor[n, d]", vectors)
        if vectors.dim() != 2 or vectors.shape[1] != self.d:
            raise UserInputError(f"vectors must have shape [n, {self.d}], got {list(vectors.shape)}")
        n = min(int(vectors.shape[0]), self.free)
        if n:
            self._data[self.size: self.size + n].copy_(vectors[:n])
            self.size += n
        return n

    def pop(self, *, drain: bool = False) -> torch.Tensor | None:
        """``[batch_size, d]`` vectors drawn uniformly without replacement from those held, or None when fewer
        than ``batch_size`` are held. ``drain=True`` (end of the stream) returns the last, smaller batch too."""
        bs = self.batch_size
        if self.size < bs:
            if not (drain and self.size):
                return None
            bs = self.size
        n = self.size
        picked = torch.randperm(n, generator=self._generator)[:bs].to(self._data.device)
        batch = self._data.index_select(0, picked)
        # Fill the holes left below the new end with the kept rows above it (the tail), so rows stay packed.
        end = n - bs
        in_tail = torch.zeros(bs, dtype=torch.bool, device=self._data.device)
        in_tail |= picked >= end
        holes = picked[~in_tail]
        if holes.numel():
            keep = torch.ones(bs, dtype=torch.bool, device=self._data.device)
            keep[picked[in_tail] - end] = False
            movers = torch.arange(end, n, device=self._data.device)[keep]
            self._data[holes] = self._data[movers]
        self.size = end
        return batch
