"""Streaming, shuffled, padding-free reader over a stored activation run.

Design (why it looks like this):

* Each epoch visits the run's complete batch files in an order permuted with ``(seed, epoch)``.
* Files are consumed in *groups*: consecutive files (in that order) are loaded until the group would exceed
  ``buffer_tokens`` real tokens (by default what ``buffer_bytes``, 1 GiB, holds; half of it per group when reading
  ahead). The group's real tokens (format-1 padding dropped; format-2 files hold only real tokens) go into one
  preallocated buffer, a random permutation seeded with ``(seed, epoch, group)`` is drawn, and batches are gathered
  from the buffer with ``index_select`` on slices of that permutation. Tokens that do not fill a last batch are
  carried into the next group, where they are shuffled again.
* Because the groups, permutations and carries are all functions of the seed and the per-batch token counts in
  ``meta.json``, a position in the stream is described by (epoch, first file of the group, group number, batches
  taken from the group, carried tokens), and resuming from that state re-creates exactly the same batches.

Memory holds one group: at most ``max(buffer_tokens, batch_size - 1 + largest file's tokens)`` token vectors, plus
one file's padded tensor while it is being loaded, whatever the size of the run (two groups with ``prefetch=True``,
where the next group is loaded in a background thread while the current one is served).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

import torch

from mi_crow.errors import UserInputError
from mi_crow.store.layout import check_count
from mi_crow.validation import check_bool, check_identifier, check_int, fail, fail_type

__all__ = ["DEFAULT_BUFFER_BYTES", "ActivationReader", "BatchSource", "buffer_rows"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 1
#: Default shuffle-buffer size: 1 GiB of token vectors (in the dtype they are yielded in).
DEFAULT_BUFFER_BYTES = 1 << 30


def buffer_rows(buffer_bytes: int, d: int, dtype: torch.dtype, batch_size: int, *, parts: int = 1,
                argument: str = "buffer_bytes", share: str = "the read-ahead buffer takes the other half") -> int:
    """How many ``d``-wide vectors of ``dtype`` fit in ``buffer_bytes / parts``; fewer than ``batch_size`` is a
    ``ValueError`` naming the buffer, the vector size and the batch size (and, halved, ``share``: why)."""
    buffer_bytes = check_count(buffer_bytes, argument)
    row = d * torch.empty(0, dtype=dtype).element_size()
    rows = buffer_bytes // parts // row
    if rows < batch_size:
        share = f" (halved: {share})" if parts == 2 else ""
        raise UserInputError(
            f"{argument}={buffer_bytes} holds {rows} token vectors of d={d} in {str(dtype).removeprefix('torch.')} "
            f"({row} bytes each){share}, fewer than one batch of batch_size={batch_size}: give at least "
            f"{batch_size * row * parts} bytes")
    return rows
_MASK64 = (1 << 63) - 1


def _mix_seed(*values: int) -> int:
    # splitmix64-style mixing: nearby (seed, epoch, group) triples give unrelated generator seeds.
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK64


def _generator(*values: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(_mix_seed(*values))
    return gen


class _LayerBatch(NamedTuple):
    activations: torch.Tensor
    attention_mask: torch.Tensor


class BatchSource(Protocol):
    """What the reader needs from a store: the part of :class:`~mi_crow.store.Store`'s public API it calls."""

    def read_run_meta(self, run_id: str) -> dict[str, Any]:
        """The run's ``meta.json`` (``layer_dims``, ``layer_dtypes``, ``complete_batches``, ``batch_tokens``)."""

    def read_tokens(self, run_id: str, batch_index: int, layer: str, n_tokens: int | None = None,
                    d: int | None = None) -> torch.Tensor:
        """The real-token vectors ``[tokens, d]`` of one layer of one batch (checked against ``n_tokens``, ``d``)."""

    def batch_key(self, run_id: str, batch_index: int, layer: str) -> str:
        """Key of that file."""

    def location(self, key: str) -> str:
        """Full location of a key, for error messages."""


class ActivationReader:
    """Iterable of ``Tensor[batch_size, d_in]`` token vectors from one layer of a stored run.

    Only real tokens (``attention_mask == 1``) are yielded; each real token appears exactly once per epoch
    (with ``drop_last=True`` the last incomplete batch of each epoch is dropped). With ``shuffle=True`` tokens are
    mixed across files inside a bounded shuffle buffer; with ``shuffle=False`` they come in storage order.

    Iterating continues from the reader's current position; :meth:`state_dict` captures that position and
    :meth:`load_state_dict` restores it, so a reader restored from a state taken after ``N`` batches yields exactly
    batches ``N+1, N+2, ...`` of an uninterrupted reader with the same arguments. :meth:`reset` goes back to the start.

    Args:
        store: the store holding the run.
        run_id: activation run id.
        layer: layer name as stored.
        batch_size: tokens per yielded batch (> 0).
        shuffle: shuffle file order per epoch and tokens within the buffer.
        buffer_tokens: shuffle group size in token vectors (> 0); the older way to bound memory.
        buffer_bytes: shuffle buffer size in bytes of yielded vectors (default ``DEFAULT_BUFFER_BYTES``, 1 GiB),
            used when ``buffer_tokens`` is None; with ``prefetch`` the group being served and the group read ahead
            share it (half each). A buffer that cannot hold one batch is a ``ValueError``.
        seed: seed of every permutation.
        dtype: dtype of yielded tensors (``None`` = as stored).
        drop_last: drop the last batch of an epoch when it has fewer than ``batch_size`` tokens.
        epochs: number of passes over the run, or ``None`` for an endless stream.
        prefetch: read the next group ahead in a background thread while the current one is consumed (default;
            hides file reading behind the consumer's work). With the same group size it yields exactly the same
            batches as without.

    Attributes:
        n_tokens: real tokens per epoch (from ``meta.json``).
        d_in: width of the layer.
        batches_per_epoch: batches yielded per epoch.
        peak_buffered_tokens: the largest number of token vectors held in the buffer so far.
    """

    def __init__(
        self,
        store: BatchSource,
        run_id: str,
        layer: str,
        batch_size: int,
        *,
        shuffle: bool = True,
        buffer_tokens: int | None = None,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        drop_last: bool = True,
        epochs: int | None = 1,
        prefetch: bool = True,
        buffer_bytes: int | None = None,
    ) -> None:
        check_identifier(run_id, "run_id")
        check_identifier(layer, "layer")
        self.batch_size = check_count(batch_size, "batch_size")
        if buffer_tokens is not None and buffer_bytes is not None:
            raise UserInputError(f"give buffer_tokens or buffer_bytes, not both (got buffer_tokens={buffer_tokens}, "
                                 f"buffer_bytes={buffer_bytes})")
        if buffer_tokens is not None:
            check_count(buffer_tokens, "buffer_tokens")
        if buffer_bytes is not None:
            check_count(buffer_bytes, "buffer_bytes")
        check_int(seed, "seed")
        if epochs is not None:
            check_count(epochs, "epochs")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise fail_type("dtype", "a torch.dtype or None", dtype)
        if dtype is not None and not dtype.is_floating_point:
            raise fail("dtype", "a floating-point dtype", dtype)
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last), ("prefetch", prefetch)):
            check_bool(flag, name)
        self.store = store
        self.run_id = run_id
        self.layer = layer
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.dtype = dtype
        self.drop_last = bool(drop_last)
        self.epochs = epochs
        self.prefetch = bool(prefetch)

        meta = store.read_run_meta(run_id)
        layer_dims = meta.get("layer_dims", {})
        if layer not in layer_dims:
            raise UserInputError(
                f"layer {layer!r} is not stored in run {run_id!r}; stored layers: {sorted(layer_dims)}")
        self.d_in: int = int(layer_dims[layer])
        self.files: list[int] = sorted(int(i) for i in meta.get("complete_batches", []))
        tokens = meta.get("batch_tokens", {})
        self.file_tokens: dict[int, int] = {i: int(tokens[str(i)]) for i in self.files}
        self.n_tokens: int = sum(self.file_tokens.values())
        if self.n_tokens == 0:
            raise UserInputError(f"run {run_id!r} has no real tokens in complete batches (complete: {self.files})")
        if self.drop_last and self.n_tokens < self.batch_size:
            raise UserInputError(
                f"batch_size {self.batch_size} exceeds the {self.n_tokens} tokens of run {run_id!r}: with "
                "drop_last=True no batch could ever be yielded"
            )
        self.stored_dtype = getattr(torch, meta.get("layer_dtypes", {}).get(layer, "float32"))
        self.out_dtype: torch.dtype = dtype if dtype is not None else self.stored_dtype
        if buffer_tokens is None:
            buffer_tokens = buffer_rows(DEFAULT_BUFFER_BYTES if buffer_bytes is None else buffer_bytes, self.d_in,
                                        self.out_dtype, self.batch_size, parts=2 if self.prefetch else 1)
        #: Token vectors per shuffle group (the read-ahead group, with ``prefetch``, is a second one).
        self.buffer_tokens: int = buffer_tokens
        self.buffer_bytes: int | None = buffer_bytes
        self.peak_buffered_tokens = 0
        #: ``(rank, world_size)`` once `split` was called (data-parallel: this rank reads only its files).
        self.part: tuple[int, int] | None = None
        self.reset()

    # ------------------------------------------------------------------ sizes
    @property
    def batches_per_epoch(self) -> int:
        """Number of batches in one epoch."""
        full, rest = divmod(self.n_tokens, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an ActivationReader with epochs=None is endless and has no len()")
        return self.batches_per_epoch * self.epochs

    def __repr__(self) -> str:
        return (f"ActivationReader(run_id={self.run_id!r}, layer={self.layer!r}, batch_size={self.batch_size}, "
                f"n_tokens={self.n_tokens}, d_in={self.d_in}, shuffle={self.shuffle}, epochs={self.epochs})")

    # ------------------------------------------------------------------ position
    def reset(self) -> None:
        """Go back to the start of epoch 0."""
        self._epoch = 0
        self._cursor = 0
        self._group = 0
        self._taken = 0
        self._carry = torch.empty(0, self.d_in, dtype=self.out_dtype)
        self._carry_owner = torch.empty(0, dtype=torch.int16)  # split: the rank holding each carried token
        self._batches_yielded = 0
        self._finished = False

    @property
    def batches_yielded(self) -> int:
        """Batches yielded since the start (across epochs and resumes)."""
        return self._batches_yielded

    @property
    def epoch(self) -> int:
        """Current epoch (0-based)."""
        return self._epoch

    def _config(self) -> dict[str, Any]:
        config = {"run_id": self.run_id, "layer": self.layer, "batch_size": self.batch_size,
                  "buffer_tokens": self.buffer_tokens, "shuffle": self.shuffle, "seed": self.seed,
                  "drop_last": self.drop_last, "files": list(self.files)}
        if self.part is not None:
            config["part"] = list(self.part)
        return config

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream plus the arguments it depends on.

        Contains only ints, strings, lists and one tensor (the ``[m, d_in]`` carried tokens, ``m < batch_size``), so
        it can be saved with ``torch.save`` and read back with ``torch.load(weights_only=True)``.
        """
        return {
            "version": _STATE_VERSION,
            **self._config(),
            "epoch": self._epoch,
            "cursor": self._cursor,
            "group": self._group,
            "taken": self._taken,
            "carry": self._carry.clone(),
            "batches_yielded": self._batches_yielded,
            "finished": self._finished,
            **({"carry_owner": self._carry_owner.clone()} if self.part is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position taken with :meth:`state_dict` from a reader built with the same arguments.

        Raises:
            ValueError: the state comes from a reader with different arguments or run content (the differing field
                is named), or is malformed.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from ActivationReader.state_dict(), got {type(state).__name__}")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"state version must be {_STATE_VERSION}, got {state.get('version')!r}")
        part = list(self.part) if self.part is not None else None
        if state.get("part") != part:  # [rank, world_size] of a split reader (see `split`)
            raise ValueError(f"state was taken from a reader with part={state.get('part')!r}, this reader has "
                             f"part={part!r}")
        for name, value in self._config().items():
            if name == "files" and state.get(name) != value:
                then = state.get(name)
                raise ValueError(
                    f"the complete batches of run {self.run_id!r} changed since the state was taken "
                    f"({len(then) if isinstance(then, list) else then!r} batches then, {len(value)} now); "
                    "an exact resume needs the same run content"
                )
            if state.get(name) != value:
                raise ValueError(
                    f"state was taken from a reader with {name}={state.get(name)!r}, this reader has {name}={value!r}"
                )
        carry = state.get("carry")
        if not isinstance(carry, torch.Tensor) or carry.dim() != 2 or carry.shape[1] != self.d_in:
            raise ValueError(f"state['carry'] must be a Tensor[m, {self.d_in}], got {carry!r}")
        self._epoch = int(state["epoch"])
        self._cursor = int(state["cursor"])
        self._group = int(state["group"])
        self._taken = int(state["taken"])
        if self.part is not None:
            owner = state.get("carry_owner")
            if (not isinstance(owner, torch.Tensor) or owner.dim() != 1
                    or int((owner == self.part[0]).sum()) != carry.shape[0]):
                raise ValueError(f"state['carry_owner'] must be a 1-d Tensor with {carry.shape[0]} entries equal to "
                                 f"rank {self.part[0]} (this rank's carried tokens), got {owner!r}")
            self._carry_owner = owner.to(torch.int16).clone()
        self._carry = carry.to(self.out_dtype).clone()
        self._batches_yielded = int(state["batches_yielded"])
        self._finished = bool(state["finished"])

    # ------------------------------------------------------------------ iteration
    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(self.files)
        perm = torch.randperm(len(self.files), generator=_generator(self.seed, epoch, -1))
        return [self.files[i] for i in perm.tolist()]

    def _group_files(self, order: list[int], cursor: int, carried: int) -> list[int]:
        files: list[int] = []
        total = carried
        for index in order[cursor:]:
            n = self.file_tokens[index]
            if files and total + n > self.buffer_tokens:
                break
            files.append(index)
            total += n
            if total >= self.buffer_tokens:
                break
        return files

    def _fill_group(self, files: list[int], n_carry: int) -> torch.Tensor:
        """Buffer ``[n_carry + real tokens of files, d_in]`` with the files' real tokens from row ``n_carry`` on.

        Rows ``[:n_carry]`` are left for the caller to fill with the carried tokens, so this can run in a
        background thread before the carry is known.
        """
        total = n_carry + sum(self.file_tokens[i] for i in files)
        buffer = torch.empty(total, self.d_in, dtype=self.out_dtype)
        offset = n_carry
        for index in files:
            n = self.file_tokens[index]
            # Both store formats: the file's real tokens, checked against the run's records (n, d).
            tokens = self.store.read_tokens(self.run_id, index, self.layer, n, self.d_in)
            buffer[offset: offset + n].copy_(tokens)
            offset += n
        self.peak_buffered_tokens = max(self.peak_buffered_tokens, total)
        return buffer

    def _next_group(self, order: list[int], files: list[int], n_rest: int, last_group: bool
                    ) -> tuple[int, int, list[int], int] | None:
        """(epoch, cursor, files, n_carry) of the group after the current one, or None at the end of the stream."""
        if not last_group:
            cursor = self._cursor + len(files)
            return self._epoch, cursor, self._group_files(order, cursor, n_rest), n_rest
        if self.epochs is not None and self._epoch + 1 >= self.epochs:
            return None
        next_order = self._epoch_order(self._epoch + 1)
        return self._epoch + 1, 0, self._group_files(next_order, 0, 0), 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.part is not None:
            yield from self._iter_part()
            return
        bs = self.batch_size
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mi_crow-reader") if self.prefetch else None
        pending: tuple[tuple[int, int, int], Future[torch.Tensor]] | None = None
        try:
            while not self._finished:
                order = self._epoch_order(self._epoch)
                while self._cursor < len(order):
                    n_carry = self._carry.shape[0]
                    files = self._group_files(order, self._cursor, n_carry)
                    last_group = self._cursor + len(files) >= len(order)
                    if pending is not None and pending[0] == (self._epoch, self._cursor, n_carry):
                        buffer = pending[1].result()
                    else:
                        buffer = self._fill_group(files, n_carry)
                    pending = None
                    buffer[:n_carry].copy_(self._carry)
                    total = buffer.shape[0]
                    n_full = total // bs
                    if executor is not None:
                        upcoming = self._next_group(order, files, total - n_full * bs, last_group)
                        if upcoming is not None:
                            epoch, cursor, next_files, next_carry = upcoming
                            pending = ((epoch, cursor, next_carry),
                                       executor.submit(self._fill_group, next_files, next_carry))
                    perm = (torch.randperm(total, generator=_generator(self.seed, self._epoch, self._group))
                            if self.shuffle else None)
                    while self._taken < n_full:
                        start = self._taken * bs
                        batch = (buffer.index_select(0, perm[start: start + bs]) if perm is not None
                                 else buffer[start: start + bs].clone())
                        self._taken += 1
                        self._batches_yielded += 1
                        yield batch
                    rest = perm[n_full * bs:] if perm is not None else torch.arange(n_full * bs, total)
                    if last_group:
                        if rest.numel() and not self.drop_last and self._taken == n_full:
                            self._taken += 1
                            self._batches_yielded += 1
                            yield buffer.index_select(0, rest)
                        carry = buffer[:0].clone()
                    else:
                        carry = buffer.index_select(0, rest)
                    del buffer
                    self._carry = carry
                    self._cursor += len(files)
                    self._group += 1
                    self._taken = 0
                self._epoch += 1
                self._cursor = 0
                self._group = 0
                self._carry = self._carry[:0]
                if self.epochs is not None and self._epoch >= self.epochs:
                    self._finished = True
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ per-rank reading (data-parallel)
    def split(self, rank: int, world_size: int) -> None:
        """Read only rank ``rank``'s part of the run from now on (data-parallel training over ``world_size`` ranks).

        The groups, permutations and carries stay exactly those of the unsplit reader; each group's files are divided
        between the ranks (largest file first onto the rank with the fewest tokens so far, ties to the lower rank;
        every rank computes the same division from ``meta.json``) and this reader loads only its own files. Of each
        global batch it yields the rows that come from its files or from the tokens it carried over, in the unsplit
        reader's order: the ranks' batches together are the unsplit reader's batch. Their sizes vary around
        ``batch_size / world_size`` with the rank's share of the group's tokens (a group of fewer files than ranks
        leaves some ranks without tokens for that group: groups of one file take turns). After each batch ``last_batch_positions`` holds the rows' positions in
        the global batch and ``last_batch_size`` that batch's size. Memory holds about ``1 / world_size`` of a group.

        Call it on a fresh reader (before iterating or loading a state; states record the split).

        Raises:
            ValueError: ``rank``/``world_size`` out of range, or the reader has already been read from.
        """
        world_size = check_count(world_size, "world_size")
        rank = check_int(rank, "rank")
        if not 0 <= rank < world_size:
            raise fail("rank", f"in [0, world_size={world_size})", rank)
        if self._batches_yielded or self._epoch or self._cursor:
            raise UserInputError("ActivationReader.split: call it before reading any batch")
        self.part = (rank, world_size)
        self.last_batch_positions = torch.empty(0, dtype=torch.long)
        self.last_batch_size = 0

    def _file_owners(self, files: list[int], cursor: int) -> list[int]:
        """The rank of each of a group's files (``cursor``: the group's first place in the epoch's order; ties go
        to the ranks from ``cursor % world`` on, so that groups of one file take turns)."""
        assert self.part is not None
        world = self.part[1]
        loads = [0] * world
        owners = [0] * len(files)
        for i in sorted(range(len(files)), key=lambda i: (-self.file_tokens[files[i]], i)):
            rank = min(range(world), key=lambda r: (loads[r], (r - cursor) % world))
            owners[i] = rank
            loads[rank] += self.file_tokens[files[i]]
        return owners

    def _own_files(self, files: list[int], cursor: int) -> list[int]:
        assert self.part is not None
        return [f for f, o in zip(files, self._file_owners(files, cursor)) if o == self.part[0]]

    def _iter_part(self) -> Iterator[torch.Tensor]:
        """`__iter__` of a split reader: the same groups and permutations over the global positions of each group
        (carried tokens first, then the group's files), of which this rank holds and yields its own."""
        assert self.part is not None
        rank = self.part[0]
        bs = self.batch_size
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mi_crow-reader") if self.prefetch else None
        pending: tuple[tuple[int, int, int, int], Future[torch.Tensor]] | None = None

        def take(buffer: torch.Tensor, local: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            rows = local[positions]
            keep = rows >= 0
            self.last_batch_positions = keep.nonzero().squeeze(1)
            self.last_batch_size = positions.numel()
            self._batches_yielded += 1
            return buffer.index_select(0, rows[keep])

        try:
            while not self._finished:
                order = self._epoch_order(self._epoch)
                while self._cursor < len(order):
                    n_carry = self._carry_owner.numel()
                    n_local = self._carry.shape[0]
                    files = self._group_files(order, self._cursor, n_carry)
                    last_group = self._cursor + len(files) >= len(order)
                    if pending is not None and pending[0] == (self._epoch, self._cursor, n_carry, n_local):
                        buffer = pending[1].result()
                    else:
                        buffer = self._fill_group(self._own_files(files, self._cursor), n_local)
                    pending = None
                    buffer[:n_local].copy_(self._carry)
                    sizes = torch.tensor([self.file_tokens[f] for f in files], dtype=torch.long)
                    owner = torch.cat([self._carry_owner, torch.repeat_interleave(
                        torch.tensor(self._file_owners(files, self._cursor), dtype=torch.int16), sizes)])
                    total = owner.numel()
                    mine = owner == rank
                    local = torch.full((total,), -1, dtype=torch.long)  # global position -> row of buffer
                    local[mine] = torch.arange(buffer.shape[0])
                    n_full = total // bs
                    perm = (torch.randperm(total, generator=_generator(self.seed, self._epoch, self._group))
                            if self.shuffle else torch.arange(total))
                    rest = perm[n_full * bs:]
                    if executor is not None:
                        upcoming = self._next_group(order, files, total - n_full * bs, last_group)
                        if upcoming is not None:
                            epoch, cursor, next_files, next_carry = upcoming
                            next_local = 0 if last_group else int((owner[rest] == rank).sum())
                            pending = ((epoch, cursor, next_carry, next_local),
                                       executor.submit(self._fill_group, self._own_files(next_files, cursor), next_local))
                    while self._taken < n_full:
                        start = self._taken * bs
                        self._taken += 1
                        yield take(buffer, local, perm[start: start + bs])
                    if last_group:
                        if rest.numel() and not self.drop_last and self._taken == n_full:
                            self._taken += 1
                            yield take(buffer, local, rest)
                        carry, carry_owner = buffer[:0].clone(), owner[:0]
                    else:
                        rows = local[rest]
                        carry, carry_owner = buffer.index_select(0, rows[rows >= 0]), owner[rest]
                    del buffer
                    self._carry, self._carry_owner = carry, carry_owner
                    self._cursor += len(files)
                    self._group += 1
                    self._taken = 0
                self._epoch += 1
                self._cursor = 0
                self._group = 0
                self._carry, self._carry_owner = self._carry[:0], self._carry_owner[:0]
                if self.epochs is not None and self._epoch >= self.epochs:
                    self._finished = True
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
