"""The token-shuffle buffer for streams of token vectors: two halves sized in bytes, one served while the other fills.

One implementation of the block shuffle, used by training straight from a model
(:class:`~mi_crow.mechanistic.sae.train.on_the_fly.ModelActivationStream`, whose producer thread fills a half with
forward batches while the trainer is served the other) and by :class:`ShuffleBuffer`, the push/pop form of the same
buffer for any stream of vectors. The stored-run reader (:class:`~mi_crow.store.reader.ActivationReader`) works the
same way over groups of files.

A *block* is what one half holds: the rows carried over from the previous block (fewer than one batch) followed by
the rows pushed since. When the half is sealed, the block is permuted as a whole with a generator seeded by
``(seed, epoch, block index)`` (`block_seed`; one permutation for every layer when the vectors of several layers are
kept together) and cut into ``batch_size`` batches; the rows that do not fill a last batch are carried into the next
block, where they are shuffled again. So the batches are a pure function of the pushed rows, the block boundaries
and the seed, and a position in the stream is ``(block, batches taken from it, the rows carried into it)``
(`ShuffleBuffer.position`): replaying the block's pushes from there gives the same batches, bit for bit.

::

    buf = ShuffleBuffer(d=768, batch_size=4096, buffer_bytes=1 << 30, dtype=torch.float32, seed=0)
    for vectors in producer:                 # [n, d] real-token vectors, any n
        while vectors.shape[0]:
            taken = buf.push(vectors)        # rows accepted into the filling half (<= buf.free)
            vectors = vectors[taken:]
            while buf.full:                  # the filling half is full: serve (sealing it when the other is done)
                train(buf.pop())             # [batch_size, d]
    while (batch := buf.pop(drain=True)) is not None:   # the end of the stream: seal and serve what is left
        train(batch)

Memory: two halves of ``buffer_bytes // 2`` (the block being served and the one being filled); a half that cannot
hold one batch is a ``ValueError``. Not thread-safe: guard a `ShuffleBuffer` with a lock when a producer thread
pushes (the on-the-fly stream hands sealed blocks from its producer thread to the trainer through a queue instead).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.store.layout import check_count
from mi_crow.store.reader import DEFAULT_BUFFER_BYTES, buffer_rows
from mi_crow.validation import check_int, fail, fail_type

__all__ = ["ShuffleBuffer", "ShuffledBlock", "block_seed", "shuffle_block"]

_SINGLE = ""  # the name of the one "layer" of a buffer built with an int width


def block_seed(seed: int, epoch: int, block: int) -> int:
    """The generator seed of block ``block`` of epoch ``epoch`` (unrelated seeds for neighbouring blocks)."""
    raw = hashlib.sha256(f"mi_crow-stream/{seed}/{epoch}/{block}".encode()).digest()
    return int.from_bytes(raw[:8], "little") & ((1 << 63) - 1)


@dataclass
class ShuffledBlock:
    """A sealed block: its rows (``rows[name]`` ``[n, d]``, in the order pushed, the carried rows first), the
    permutation ``order`` and the cut: ``n_batches`` batches of ``batch_size``, the rest carried out.

    Batches are gathered from ``rows`` through ``order`` when asked for (`batch`), so a block holds its rows once.
    """

    index: int
    rows: dict[str, Tensor]
    order: Tensor
    batch_size: int
    n_batches: int
    carry_in: dict[str, Tensor] | None
    carry_out: dict[str, Tensor]
    outliers: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def batch(self, j: int, name: str | None = None) -> Any:
        """Batch ``j`` (``0 <= j < n_batches``): of one layer ``name`` (a tensor), or of every layer (a dict)."""
        picked = self.order[j * self.batch_size: (j + 1) * self.batch_size]
        if name is not None:
            return self.rows[name].index_select(0, picked)
        return {key: value.index_select(0, picked) for key, value in self.rows.items()}

    def batch_rows(self, name: str) -> Tensor:
        """Every batch of layer ``name`` in one tensor ``[n_batches * batch_size, d]`` (batch ``j`` is rows
        ``j * batch_size`` on)."""
        return self.rows[name].index_select(0, self.order[: self.n_batches * self.batch_size])

    @property
    def n_rows(self) -> int:
        return int(self.order.shape[0])


def shuffle_block(index: int, parts: Mapping[str, list[Tensor]], batch_size: int, seed: int,
                  carry_in: Mapping[str, Tensor] | None = None, *, outliers: int = 0) -> ShuffledBlock:
    """Seal a block: ``carry_in`` then ``parts`` (per layer, the chunks pushed in order) permuted with a generator
    seeded by ``seed`` (`block_seed`), cut into ``batch_size`` batches and the rest carried out.

    Every layer gets the same permutation; the permutation lives on the rows' device.
    """
    rows: dict[str, Tensor] = {}
    for name, chunks in parts.items():
        chunks = ([] if carry_in is None else [carry_in[name]]) + list(chunks)
        if not chunks:
            raise UserInputError(f"shuffle_block: block {index} has no rows for {name!r}")
        rows[name] = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    counts = {name: value.shape[0] for name, value in rows.items()}
    n = next(iter(counts.values()))
    if any(count != n for count in counts.values()):
        raise UserInputError(f"shuffle_block: the layers of block {index} hold different numbers of rows: {counts}")
    device = next(iter(rows.values())).device
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    n_batches = n // batch_size
    rest = order[n_batches * batch_size:]
    carry_out = {name: value.index_select(0, rest) for name, value in rows.items()}
    return ShuffledBlock(index, rows, order, batch_size, n_batches,
                         None if carry_in is None else dict(carry_in), carry_out, outliers)


class ShuffleBuffer:
    """Bounded two-half shuffle buffer of token vectors; see the module docstring for the loop.

    Args:
        d: vector width, or ``{name: width}`` for the vectors of several layers kept together (push and pop dicts;
            every layer's rows get the same permutation).
        batch_size: rows per :meth:`pop`.
        buffer_bytes: memory of the two halves together (default 1 GiB).
        dtype: dtype the vectors are kept (and popped) in; pushed vectors are converted.
        seed: seed of the permutations (block ``i`` of epoch ``epoch``: ``block_seed(seed, epoch, i)``).
        epoch: the epoch the blocks' seeds are drawn for.
        device: where the buffer lives (``"cpu"`` by default).

    Attributes:
        half_rows: vectors one half holds (the filling half takes pushes up to this, the carried rows included).
        capacity: vectors the buffer holds, both halves (``2 * half_rows``).
        size: vectors held now.
    """

    def __init__(self, d: int | Mapping[str, int], batch_size: int, *, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 dtype: torch.dtype = torch.float32, seed: int = 0, epoch: int = 0,
                 device: str | torch.device = "cpu") -> None:
        if isinstance(d, Mapping):
            if not d:
                raise fail("d", "a width or a non-empty {name: width} mapping", d)
            self.widths = {str(name): check_count(width, f"d[{name!r}]") for name, width in d.items()}
        else:
            self.widths = {_SINGLE: check_count(d, "d")}
        self.d = d if not isinstance(d, Mapping) else dict(self.widths)
        self.batch_size = check_count(batch_size, "batch_size")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise fail("dtype", "a floating-point torch.dtype", dtype)
        self.half_rows = buffer_rows(buffer_bytes, sum(self.widths.values()), dtype, self.batch_size, parts=2,
                                     share="one half is served while the other fills")
        self.capacity = 2 * self.half_rows
        self.buffer_bytes = int(buffer_bytes)
        self.dtype = dtype
        self.device = torch.device(device)
        self.seed = check_int(seed, "seed")
        self.epoch = check_int(epoch, "epoch")
        self._parts: dict[str, list[Tensor]] = {name: [] for name in self.widths}
        self._filled = 0
        self._carry: dict[str, Tensor] | None = None  # the rows carried into the filling half
        self._next = 0  # index of the block being filled
        self._ready: ShuffledBlock | None = None  # sealed, waiting for the served block to be done
        self._served: ShuffledBlock | None = None
        self._taken = 0  # batches taken from the served block
        self._skip = 0  # batches of the next served block already taken before a resume
        self._pushed = 0  # rows pushed since the start of the stream
        self._first_row = 0  # the stream row the filling block's first pushed row is

    def __repr__(self) -> str:
        width = self.d if isinstance(self.d, int) else self.widths
        return (f"ShuffleBuffer(d={width}, batch_size={self.batch_size}, capacity={self.capacity}, "
                f"size={self.size}, dtype={str(self.dtype).removeprefix('torch.')})")

    def __len__(self) -> int:
        return self.size

    # -- sizes -----------------------------------------------------------------------------------------------------
    @property
    def _carried(self) -> int:
        return 0 if self._carry is None else int(next(iter(self._carry.values())).shape[0])

    @property
    def size(self) -> int:
        """Vectors held: the served block's untaken rows, a sealed block waiting, the filling half."""
        held = self._carried + self._filled
        if self._served is not None:
            held += (self._served.n_batches - self._taken) * self.batch_size
        if self._ready is not None:
            held += self._ready.n_batches * self.batch_size
        return held

    @property
    def free(self) -> int:
        """Vectors :meth:`push` accepts now (none while a sealed half waits for the served one to be done)."""
        if self._ready is not None:
            return 0
        return max(0, self.half_rows - self._carried - self._filled)

    @property
    def full(self) -> bool:
        """Whether no more vectors fit (the moment to :meth:`pop`)."""
        return self.free == 0

    # -- filling ---------------------------------------------------------------------------------------------------
    def push(self, vectors: Tensor | Mapping[str, Tensor]) -> int:
        """Copy the first ``min(n, free)`` rows of ``vectors`` (``[n, d]``, or a dict of them with ``d`` a
        mapping) into the filling half; returns how many were taken."""
        given = self._as_layers(vectors)
        n = min(next(iter(given.values())).shape[0], self.free)
        if n:
            for name, value in given.items():
                self._parts[name].append(value[:n].to(device=self.device, dtype=self.dtype).clone())
            self._filled += n
            self._pushed += n
        return n

    def seal(self) -> None:
        """Close the filling half now (a full half is sealed by :meth:`pop` by itself): shuffle it, serve it when the
        served half is done, start the next block with its leftover rows."""
        if self._ready is not None:
            raise RuntimeError("ShuffleBuffer.seal: a sealed half is already waiting; pop batches first")
        if not self._filled and not self._carried:
            return
        parts = self._parts if self._filled else {name: [] for name in self.widths}
        block = shuffle_block(self._next, parts, self.batch_size, block_seed(self.seed, self.epoch, self._next),
                              self._carry)
        block.info["first_row"] = self._first_row
        self._first_row = self._pushed
        self._parts = {name: [] for name in self.widths}
        self._filled = 0
        self._carry = block.carry_out if block.n_rows - block.n_batches * self.batch_size else None
        self._next += 1
        if self._serving_done():
            self._serve(block)
        else:
            self._ready = block

    # -- serving ---------------------------------------------------------------------------------------------------
    def pop(self, *, drain: bool = False) -> Tensor | dict[str, Tensor] | None:
        """The next ``[batch_size, d]`` batch (a dict with ``d`` a mapping), or None when none is ready: the served
        half is done, no sealed half waits and the filling half is not full. ``drain=True`` (the end of the
        stream) seals what is left, and returns the last rows (fewer than a batch) as a smaller batch."""
        while True:
            if self._served is not None and self._taken < self._served.n_batches:
                batch = self._served.batch(self._taken)
                self._taken += 1
                return batch[_SINGLE] if _SINGLE in self.widths else batch
            if self._ready is not None:
                block, self._ready = self._ready, None
                self._serve(block)
                continue
            if self.full or (drain and self._filled):
                self.seal()
                continue
            if drain and self._carried:
                last, self._carry = self._carry, None
                self._served = None
                return last[_SINGLE] if _SINGLE in self.widths else last
            return None

    def position(self) -> dict[str, Any]:
        """Where the stream stands: the served block, the batches taken from it, the rows carried into it and the
        stream row its first pushed row was (``row``). A checkpoint needs only this: after `resume_at`, pushing the
        stream again from ``row`` continues with the same batches."""
        served = self._served
        if served is None:
            return {"block": self._next, "consumed": 0, "row": self._first_row,
                    "carry": None if self._carry is None else {k: v.cpu().clone() for k, v in self._carry.items()}}
        return {"block": served.index, "consumed": self._taken, "row": served.info["first_row"],
                "carry": None if served.carry_in is None else {k: v.cpu().clone() for k, v in
                                                               served.carry_in.items()}}

    def resume_at(self, position: Mapping[str, Any]) -> None:
        """Start over at a `position` of the same stream: an empty buffer, to be pushed the stream again from
        ``position["row"]``."""
        if not isinstance(position, Mapping) or not {"block", "consumed", "carry", "row"} <= set(position):
            raise fail_type("position", "a dict from ShuffleBuffer.position()", position)
        self._parts = {name: [] for name in self.widths}
        self._filled = 0
        carry = position["carry"]
        self._carry = None if carry is None else {k: v.to(device=self.device, dtype=self.dtype)
                                                  for k, v in carry.items()}
        self._next = int(position["block"])
        self._ready = self._served = None
        self._taken = 0
        self._skip = int(position["consumed"])
        self._pushed = self._first_row = int(position["row"])

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _serving_done(self) -> bool:
        return self._served is None or self._taken >= self._served.n_batches

    def _serve(self, block: ShuffledBlock) -> None:
        self._served = block
        self._taken = min(self._skip, block.n_batches)
        self._skip = 0

    def _as_layers(self, vectors: Any) -> dict[str, Tensor]:
        if isinstance(vectors, Mapping):
            if _SINGLE in self.widths or set(vectors) != set(self.widths):
                raise UserInputError(f"vectors must be a dict with the layers {sorted(self.widths)}, got "
                                     f"{sorted(map(str, vectors))}")
            given = dict(vectors)
        elif _SINGLE in self.widths:
            given = {_SINGLE: vectors}
        else:
            raise fail_type("vectors", f"a dict of Tensor[n, d] for the layers {sorted(self.widths)}", vectors)
        rows = None
        for name, value in given.items():
            if not isinstance(value, Tensor):
                raise fail_type("vectors", "a Tensor[n, d]", value)
            width = self.widths[name]
            if value.dim() != 2 or value.shape[1] != width:
                label = "vectors" if name == _SINGLE else f"vectors[{name!r}]"
                raise UserInputError(f"{label} must have shape [n, {width}], got {list(value.shape)}")
            if rows is not None and value.shape[0] != rows:
                raise UserInputError(f"vectors: every layer must hold the same rows, got {rows} and {value.shape[0]}")
            rows = value.shape[0]
        return given
