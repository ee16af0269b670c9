"""Saving layer activations over a dataset into a store, resumably, one forward pass per batch."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from mi_crow.datasets import TextDataset
from mi_crow.errors import ArgumentTypeError, DistributedError, UserInputError
from mi_crow.hooks import LayerActivationDetector
from mi_crow.language_model.inference import check_texts
from mi_crow.validation import check_dtype, check_identifier, check_positive_int, resolve_synonym

if TYPE_CHECKING:
    from mi_crow.language_model.language_model import LanguageModel

__all__ = ["LanguageModelActivations", "SAVE_FORMAT_VERSION"]

logger = logging.getLogger(__name__)

#: Format of new runs: 2 = packed, padding-free token vectors with per-batch completion markers
#: (:mod:`mi_crow.store.packed`). Runs saved in format 1 (padded files) are resumed in format 1.
SAVE_FORMAT_VERSION = 2

# Fields of meta.json that must agree before a run is resumed: anything else would mix incompatible batches.
_RESUME_KEYS = ("model_id", "layers", "dtype", "batch_size", "max_length", "dataset", "dataset_sha256",
                "sample_limit", "shard_size", "shard_tokens")
#: Storage dtypes of format-2 runs; a model computing in another dtype (float64) is stored in float32.
_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _StopForward(Exception):
    """Raised from a hook once every requested layer has run, so later layers and the LM head never run."""


class _StoredBatch(NamedTuple):
    """One batch as it is written: ``activations`` layer -> ``[b, seq, d]``, ``attention_mask`` and ``input_ids``
    ``[b, seq]``."""

    index: int
    activations: dict[str, torch.Tensor]
    attention_mask: torch.Tensor
    input_ids: torch.Tensor


class _Shard(NamedTuple):
    """One format-2 batch as it is written: packed ``[tokens, d]`` per layer, ``offsets [texts + 1]``, ``token_ids
    [tokens]``, the texts' global indices and the forward batches it holds."""

    index: int
    activations: dict[str, torch.Tensor]
    offsets: torch.Tensor
    token_ids: torch.Tensor
    text_ids: torch.Tensor
    forward_batches: list[int]


class _Skip:
    """The batches this process does not write: complete ones, and (sharded saving) those of the other ranks."""

    def __init__(self, complete: set[int], rank: int, world: int) -> None:
        self.complete, self.rank, self.world = complete, rank, world

    def __contains__(self, index: object) -> bool:
        return index in self.complete or (isinstance(index, int) and index % self.world != self.rank)


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default ``torch.distributed`` group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_ok(ok: bool, world: int) -> bool:
    """Whether every rank reports ``ok`` (an all-reduce; a rank that failed makes every rank stop, none hangs)."""
    if world == 1:
        return ok
    import torch.distributed as dist

    # NCCL reduces CUDA tensors only; gloo (and the rest) CPU tensors.
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=device)
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    except (RuntimeError, ValueError) as exc:  # gloo/NCCL report a dead peer (at once) or a timeout so
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DistributedError(
            f"sharded save: rank {dist.get_rank()} of {world}: another rank stopped, or did not answer within the "
            f"process group's timeout ({first}). The batches written so far are kept: run the same save again on "
            "every rank to resume"
        ) from exc
    return bool(flag.item())


def _pack(batch: _StoredBatch, text_start: int, forward_batches: list[int]) -> _Shard:
    """A padded stored batch as a packed shard (its texts are ``text_start, text_start + 1, ...``)."""
    real = batch.attention_mask.bool()
    lengths = real.sum(dim=1).to(torch.int64)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    acts = {name: a[real] for name, a in batch.activations.items()}
    text_ids = torch.arange(text_start, text_start + lengths.numel(), dtype=torch.int64)
    return _Shard(batch.index, acts, offsets, batch.input_ids[real], text_ids, forward_batches)


def _join(pieces: list[_Shard], index: int) -> _Shard:
    """Several packed forward batches as one shard."""
    if len(pieces) == 1:
        return pieces[0]._replace(index=index)
    lengths = torch.cat([p.offsets[1:] - p.offsets[:-1] for p in pieces])
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    acts = {name: torch.cat([p.activations[name] for p in pieces]) for name in pieces[0].activations}
    return _Shard(index, acts, offsets, torch.cat([p.token_ids for p in pieces]),
                  torch.cat([p.text_ids for p in pieces]), [b for p in pieces for b in p.forward_batches])


def _as_dataset(dataset_or_texts: Any, argument: str) -> Any:
    if hasattr(dataset_or_texts, "iter_batches"):
        return dataset_or_texts
    if isinstance(dataset_or_texts, str) or not isinstance(dataset_or_texts, Sequence):
        raise ArgumentTypeError(
            f"{argument} must be a list of str or a mi_crow dataset (with iter_batches), got "
            f"{type(dataset_or_texts).__name__}"
        )
    return TextDataset(texts=check_texts(dataset_or_texts, argument))


def _limit(batches: Iterable[list[str]], limit: int | None) -> Iterator[list[str]]:
    """The batches cut after ``limit`` texts in all (the last one shortened)."""
    left = limit
    for batch in batches:
        if left is not None:
            if left <= 0:
                return
            batch = batch[:left]
            left -= len(batch)
        yield batch


def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), so stored and requested meta compare equal."""
    return json.loads(json.dumps(value, default=str))


def _fingerprint(dataset: Any) -> str | None:
    """SHA-256 of an in-memory dataset's texts, so a resume with other texts of the same count is refused."""
    texts = getattr(dataset, "texts", None)
    if not isinstance(texts, list):
        return None
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Resharder:
    """Regroups the rows of forward batches into stored batches of ``shard_size`` texts, in text order.

    Stored batch ``i`` holds texts ``i * shard_size`` to ``(i + 1) * shard_size - 1``, right-padded to its longest
    text; positions past a text's end hold 0 (``pad_token_id`` in ``input_ids``). Rows of batches already complete
    (``done``) are dropped, and a forward batch whose texts all belong to complete batches need not run at all.
    """

    def __init__(self, shard_size: int, done: set[int], pad_token_id: int) -> None:
        self.size = shard_size
        self.done = done
        self.pad_token_id = pad_token_id
        self.next_text = 0
        self.index: int | None = None
        self.rows: list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]] = []

    def needs_forward(self, n_texts: int) -> bool:
        """Whether any of the next ``n_texts`` texts belongs to a batch still to be written."""
        first, last = self.next_text // self.size, (self.next_text + n_texts - 1) // self.size
        return any(i not in self.done for i in range(first, last + 1))

    def skip(self, n_texts: int) -> None:
        """Account for ``n_texts`` texts that need no forward pass."""
        self.next_text += n_texts

    def add(self, acts: dict[str, torch.Tensor], mask: torch.Tensor, ids: torch.Tensor) -> list[_StoredBatch]:
        """Take one forward batch (``acts`` layer -> ``[b, seq, d]``, ``mask``/``ids`` ``[b, seq]``); return the
        stored batches it completes."""
        out = []
        for row in range(mask.shape[0]):
            index = self.next_text // self.size
            self.next_text += 1
            if index in self.done:
                continue
            if self.index is not None and index != self.index:
                out.append(self._build())
            self.index = index
            self.rows.append(({name: a[row] for name, a in acts.items()}, mask[row], ids[row]))
            if len(self.rows) == self.size:  # complete: write it now, not when the next batch arrives
                out.append(self._build())
        return out

    def finish(self) -> list[_StoredBatch]:
        """The last, possibly shorter, stored batch."""
        return [self._build()] if self.rows else []

    def _build(self) -> _StoredBatch:
        rows, index = self.rows, self.index
        self.rows, self.index = [], None
        lengths = [int(mask.sum()) for _, mask, _ in rows]
        seq = max(lengths)
        n = len(rows)
        first_acts, first_mask, first_ids = rows[0]
        acts = {name: a.new_zeros((n, seq, a.shape[-1])) for name, a in first_acts.items()}
        mask = first_mask.new_zeros((n, seq))
        ids = first_ids.new_full((n, seq), self.pad_token_id)
        for r, ((row_acts, row_mask, row_ids), length) in enumerate(zip(rows, lengths)):
            for name, a in row_acts.items():
                acts[name][r, :length] = a[:length]
            mask[r, :length] = row_mask[:length]
            ids[r, :length] = row_ids[:length]
        return _StoredBatch(int(index), acts, mask, ids)  # type: ignore[arg-type]  # set by add() with the rows


class LanguageModelActivations:
    """Saves layer activations of a LanguageModel into its store (``lm.activations``).

    Args:
        lm: the owning LanguageModel.
    """

    def __init__(self, lm: LanguageModel) -> None:
        self._lm = lm

    def save(
        self,
        dataset_or_texts: Any = None,
        layers: str | int | Sequence[str | int] | None = None,
        run_id: str | None = None,
        batch_size: int = 16,
        max_length: int = 128,
        dtype: torch.dtype | str | None = None,
        progress: bool = True,
        *,
        dataset: Any = None,
        layer_signature: str | int | Sequence[str | int] | None = None,
        sample_limit: int | None = None,
        shard_size: int | None = None,
        shard_tokens: int | None = None,
    ) -> str:
        """Run the model over a dataset and save the outputs of the given layers into the store, batch by batch.

        Call shapes: ``save(dataset=..., layer_signature=..., sample_limit=None, batch_size=..., shard_size=None,
        run_id=None)`` (the documented keywords) and ``save(dataset_or_texts, layers, ...)`` (positional);
        ``dataset`` / ``dataset_or_texts`` and ``layer_signature`` / ``layers`` are two names for one argument
        each. ``save_activations_dataset`` is the same operation.

        One forward pass per batch serves every requested layer, and it stops as soon as all of them have run, so
        later layers and the LM head never run. Registered hooks stay active (controllers included). New runs use
        store format 2 (:mod:`mi_crow.store.packed`): each stored batch is written as
        ``activations/<run_id>/batch_<i>/<layer>/activations.safetensors`` holding only the real tokens
        (``activations [tokens, d]``, text after text) in the storage dtype, ``extra.safetensors`` (token ids,
        per-text offsets, the texts' dataset indices), then a completion marker; ``store.load_batch`` /
        ``get_run_batch`` still return each batch right-padded (``[b, seq, d]`` with its mask, position ``j`` is
        token ``j`` of every text, zeros past a text's end) and ``input_ids [b, seq]`` in its extra tensors. Batch
        ``i`` is written in a worker thread while the next forward pass runs, so memory holds at most two batches
        whatever the dataset size. ``meta.json`` (written when the save starts and when it ends) records the model,
        layers, dtype, batching and dataset, and the store keeps ``sample_count`` (texts saved) and
        ``batch_count`` (stored batches) in it.

        Re-running with the same ``run_id`` (after an interruption) skips the complete batches, leaving their files
        untouched, and continues with the first incomplete one; at most the batch that was being written is lost.
        Runs saved in format 1 are continued in format 1.

        Under an initialised ``torch.distributed`` process group (``torchrun``), every rank calls ``save`` with the
        same arguments and saves a disjoint part of the dataset (forward batch ``b`` goes to rank
        ``b % world_size``) into the same run; batch indices never collide; rank 0 holds the run's lock and writes
        ``meta.json`` at the start and, after every rank is done, at the end. ``run_id=None`` takes rank 0's id.

        Args:
            dataset_or_texts: a list of str or a mi_crow dataset (anything with ``iter_batches(batch_size)`` and
                ``describe()``); ``dataset=`` is a keyword synonym.
            layers: a layer or a list of layers (dotted or flattened names, block indices); ``layer_signature=`` is
                a keyword synonym.
            run_id: the run to write or resume (``None``: a new id).
            batch_size: texts per forward pass.
            max_length: truncate each text to this many tokens.
            dtype: storage dtype, ``bfloat16``, ``float16`` or ``float32`` (``None``: the model's compute dtype,
                read from its parameters; float32 for a float64 model). Resuming a run with another dtype is an
                error naming both.
            progress: show a progress bar with tokens/s.
            sample_limit: save at most this many texts (the first ones of the dataset); ``None``: all.
            shard_size: texts per stored batch when it should differ from ``batch_size`` (forward batches are
                split or joined; a re-grouped batch is padded to its longest text with zeros). ``None``: one
                stored batch per forward batch.
            shard_tokens: real tokens per stored batch: forward batches are joined (whole) into one stored batch
                until it holds at least this many tokens (the last one may hold fewer); for long runs, where
                a stored batch should hold many forward batches. Not together with ``shard_size``.

        Returns:
            The run id.

        Raises:
            ValueError: no store, an empty dataset, a bad layer, bad sizes, an argument given under both of its
                names, or a ``run_id`` that already exists with a different model, layers, dtype, batching or
                dataset.
        """
        lm = self._lm
        store = lm.store
        data_arg = "dataset" if dataset is not None else "dataset_or_texts"
        data = resolve_synonym("dataset", dataset, "dataset_or_texts", dataset_or_texts)
        layers_arg = "layer_signature" if layer_signature is not None else "layers"
        layers = resolve_synonym("layer_signature", layer_signature, "layers", layers)
        if store is None:
            raise UserInputError(
                "lm.store is None: create the LanguageModel with store=LocalStore(path) to save activations"
            )
        if data is None:
            raise UserInputError("dataset must be given (a list of str or a mi_crow dataset), got None")
        if layers is None:
            raise UserInputError("layer_signature must name a layer or a list of layers, got None")
        batch_size = check_positive_int(batch_size, "batch_size")
        max_length = check_positive_int(max_length, "max_length")
        sample_limit = check_positive_int(sample_limit, "sample_limit", allow_none=True)
        shard_size = check_positive_int(shard_size, "shard_size", allow_none=True)
        shard_tokens = check_positive_int(shard_tokens, "shard_tokens", allow_none=True)
        if shard_size is not None and shard_tokens is not None:
            raise UserInputError(f"give shard_size (texts per stored batch) or shard_tokens (tokens per stored "
                                 f"batch), not both; got shard_size={shard_size}, shard_tokens={shard_tokens}")
        save_dtype = check_dtype(dtype, "dtype", allow_none=True)
        if run_id is not None:
            try:
                check_identifier(run_id, "run_id")
            except ArgumentTypeError:
                raise
            except UserInputError as exc:
                raise UserInputError(
                    f"run_id must be a non-empty str without '/' that does not start with '.', got {run_id!r}"
                ) from exc
        layer_list = [layers] if isinstance(layers, (str, int)) else list(layers)
        if not layer_list:
            raise UserInputError(f"{layers_arg} must name at least one layer, got {layers!r}")
        names: list[str] = []
        for layer in layer_list:
            name = lm.layers.resolve(layer)
            if name == "":
                raise UserInputError(f"{layers_arg} must be layers of the model, not the whole model, got {layer!r}")
            if name not in names:
                names.append(name)
        data = _as_dataset(data, data_arg)
        batches = _limit(data.iter_batches(batch_size), sample_limit)
        first = next(batches, None)
        if first is None or len(first) == 0:
            raise UserInputError(f"{data_arg} is empty: {type(data).__name__} yielded no texts")

        widths = {name: lm.layers.width(name) for name in names}
        # The model's compute dtype, read from its parameters now (a bf16 forward policy may have cast them).
        model_dtype = next((p.dtype for p in lm.model.parameters() if p.is_floating_point()), torch.float32)
        if save_dtype is None and model_dtype not in _STORAGE_DTYPES:
            model_dtype = torch.float32
        meta = {
            "format_version": SAVE_FORMAT_VERSION,
            "model_id": lm.model_id,
            "layers": names,
            "d": widths,
            "dtype": _dtype_name(save_dtype or model_dtype),
            "dataset": _jsonable(data.describe()) if hasattr(data, "describe") else None,
            "dataset_sha256": _fingerprint(data),
            "batch_size": batch_size,
            "max_length": max_length,
            "padding_side": "right",
            "sample_limit": sample_limit,
            "shard_size": shard_size,
            "shard_tokens": shard_tokens,
            "pad_token_id": getattr(lm.tokenizer, "pad_token_id", None),
        }
        rank, world = _distributed()
        if run_id is None:
            run_id = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            if world > 1:
                import torch.distributed as dist

                shared = [run_id]
                dist.broadcast_object_list(shared, src=0)
                run_id = shared[0]
        stored_format = store.run_format(run_id) if store.run_exists(run_id) else SAVE_FORMAT_VERSION
        if stored_format == 1 and world == 1:
            meta["format_version"] = 1
            self._save_v1(store, run_id, meta, names, save_dtype, max_length, _chain(first, batches), shard_size,
                          progress)
            return run_id
        if stored_format == 1:
            raise UserInputError(f"run {run_id!r} is a format-1 run; sharded saving ({world} ranks) writes format 2 "
                                 "runs only: use another run_id")
        storage = save_dtype or model_dtype
        if storage not in _STORAGE_DTYPES:
            raise UserInputError(f"dtype must be one of bfloat16, float16, float32 for a stored run, got "
                                 f"{_dtype_name(storage)}")
        meta["dtype"] = _dtype_name(storage)
        self._save_v2(store, run_id, meta, names, widths, storage, max_length, _chain(first, batches), batch_size,
                      shard_size, shard_tokens, progress, rank, world)
        return run_id

    def _save_v1(self, store: Any, run_id: str, meta: dict[str, Any], names: list[str],
                 save_dtype: torch.dtype | None, max_length: int, batches: Iterable[list[str]],
                 shard_size: int | None, progress: bool) -> None:
        """Continue a format-1 run (padded files, records in ``meta.json``) in format 1."""
        lm = self._lm
        batch_size = meta["batch_size"]
        done: set[int] = set()
        # One writer per run: a second process saving into the same run id gets ResourceBusyError (naming the
        # holder's pid) instead of interleaving batches; a lock left by a crashed save is taken over.
        with store.lock_run(run_id, purpose="activations.save"):
            if store.run_exists(run_id):
                stored = store.read_run_meta(run_id)
                for key in _RESUME_KEYS:
                    if _jsonable(stored.get(key)) != _jsonable(meta[key]):
                        raise UserInputError(
                            f"run_id={run_id!r} already exists in the store with a different {key}: stored "
                            f"{stored.get(key)!r}, requested {meta[key]!r}. Use another run_id, or delete the run to "
                            "redo it."
                        )
                done = set(store.list_batches(run_id))
                logger.info("resuming run %r: %d complete batches kept", run_id, len(done))
            else:
                store.write_run_meta(run_id, meta)

            resharder = None
            if shard_size is not None and shard_size != batch_size:
                resharder = _Resharder(shard_size, done, lm.tokenizer.pad_token_id)
            self._run(run_id, names, save_dtype, max_length, batches, done, progress, resharder)

    def _save_v2(self, store: Any, run_id: str, meta: dict[str, Any], names: list[str], widths: dict[str, int],
                 storage: torch.dtype, max_length: int, batches: Iterable[list[str]], batch_size: int,
                 shard_size: int | None, shard_tokens: int | None, progress: bool, rank: int, world: int) -> None:
        """Save (or resume) a format-2 run; with ``world > 1`` this rank's part of it."""
        lm = self._lm
        # 1. Every rank reads the run's state before anyone writes, and checks it the same way (same errors).
        records: list[dict[str, Any]] = []
        if store.run_exists(run_id):
            stored = store.read_run_meta(run_id)
            for key in _RESUME_KEYS:
                if _jsonable(stored.get(key)) != _jsonable(meta[key]):
                    raise UserInputError(
                        f"run_id={run_id!r} already exists in the store with a different {key}: stored "
                        f"{stored.get(key)!r}, requested {meta[key]!r}. Use another run_id, or delete the run to "
                        "redo it."
                    )
            records = store.batch_records(run_id)
            if rank == 0:
                logger.info("resuming run %r: %d complete batches kept", run_id, len(records))
        _all_ok(True, world)
        # 2. Rank 0 takes the run's lock and (re)writes meta.json ("writing"); the others wait for it.
        with contextlib.ExitStack() as stack:
            failure: BaseException | None = None
            if rank == 0:
                try:
                    stack.enter_context(store.lock_run(run_id, purpose="activations.save"))
                    store.create_packed_run(run_id, meta, widths, storage)
                except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
                    failure = exc
            if not _all_ok(failure is None, world):
                if failure is not None:
                    raise failure
                raise RuntimeError(f"rank 0 could not start saving run {run_id!r} (see its error); nothing written")
            # 3. Every rank writes its batches.
            complete = {r["batch_index"] for r in records}
            try:
                shards = self._shards(names, max_length, batches, batch_size, shard_size, shard_tokens, records,
                                      complete, rank, world)
                self._write_shards(run_id, names, storage, shards, progress, rank)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
                failure = exc
            if not _all_ok(failure is None, world):
                if failure is not None:
                    raise failure
                raise RuntimeError(f"another rank failed while saving run {run_id!r} (see its error); the batches "
                                   "written so far are kept: run the same save again to resume")
            # 4. Rank 0 records the end: index.json and the final meta.json.
            if rank == 0:
                store.finish_packed_run(run_id)
            _all_ok(True, world)

    def _shards(self, names: list[str], max_length: int, batches: Iterable[list[str]], batch_size: int,
                shard_size: int | None, shard_tokens: int | None, records: list[dict[str, Any]],
                complete: set[int], rank: int, world: int) -> Callable[[dict[str, LayerActivationDetector],
                                                                          set[str]], Iterator[_Shard]]:
        """A generator factory: given the detectors, the packed batches this rank writes, in order."""
        lm = self._lm

        def by_text_count(detectors: dict[str, LayerActivationDetector], fired: set[str]) -> Iterator[_Shard]:
            size = shard_size if shard_size is not None else batch_size
            skip = _Skip(complete, rank, world)
            resharder = _Resharder(shard_size, skip, lm.tokenizer.pad_token_id) \
                if shard_size is not None and shard_size != batch_size else None  # type: ignore[arg-type]
            for batch in self._batches(names, detectors, max_length, batches, skip, resharder, fired):
                forward = [batch.index] if resharder is None else []
                yield _pack(batch, batch.index * size, forward)

        def by_tokens(detectors: dict[str, LayerActivationDetector], fired: set[str]) -> Iterator[_Shard]:
            done_forward = {b for r in records for b in r["forward_batches"]}
            base = max(complete) + 1 if complete else 0
            made, pieces, n = 0, [], 0
            for batch in self._batches(names, detectors, max_length, batches, _Skip(done_forward, rank, world),
                                       None, fired):
                pieces.append(_pack(batch, batch.index * batch_size, [batch.index]))
                n += int(pieces[-1].offsets[-1])
                if n >= shard_tokens:  # type: ignore[operator]
                    yield _join(pieces, base + made * world + rank)
                    made, pieces, n = made + 1, [], 0
            if pieces:
                yield _join(pieces, base + made * world + rank)

        return by_tokens if shard_tokens is not None else by_text_count

    def _write_shards(self, run_id: str, names: list[str], storage: torch.dtype,
                      shards: Callable[[dict[str, LayerActivationDetector], set[str]], Iterator[_Shard]],
                      progress: bool, rank: int) -> None:
        lm = self._lm
        detectors = {
            name: LayerActivationDetector(name, dtype=storage, device="cpu", hook_id=f"save-{run_id}-{name}")
            for name in names
        }
        fired: set[str] = set()

        def stopper(name: str):
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                fired.add(name)
                if len(fired) == len(names):
                    raise _StopForward

            return hook

        bar = tqdm(desc=f"saving {run_id}", unit="tok", unit_scale=True, disable=not progress or rank != 0,
                   leave=False)
        n_saved = 0
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mi_crow-save")
        pending: Future[None] | None = None
        with lm.layers.hooks(list(detectors.values())):
            handles = [lm.layers.get_module(name).register_forward_hook(stopper(name)) for name in names]
            try:
                for shard in shards(detectors, fired):
                    if pending is not None:
                        previous, pending = pending, None
                        previous.result()
                    pending = writer.submit(
                        lm.store.write_packed_batch, run_id, shard.index, shard.activations, shard.offsets,
                        shard.token_ids, text_ids=shard.text_ids, forward_batches=shard.forward_batches, rank=rank)
                    n_saved += 1
                    bar.update(int(shard.offsets[-1]))
                if pending is not None:
                    previous, pending = pending, None
                    previous.result()
            finally:
                _finish_writes(pending, writer, handles, bar, run_id)
        logger.info("run %r (rank %d): saved %d new batches", run_id, rank, n_saved)

    def save_activations_dataset(
        self,
        dataset: Any = None,
        layer_signature: str | int | Sequence[str | int] | None = None,
        **kwargs: Any,
    ) -> str:
        """The same operation as ``save`` (documented spelling): ``save(dataset=dataset,
        layer_signature=layer_signature, **kwargs)``; returns the run id."""
        return self.save(dataset=dataset, layer_signature=layer_signature, **kwargs)

    def _batches(
        self,
        names: list[str],
        detectors: dict[str, LayerActivationDetector],
        max_length: int,
        batches: Iterable[list[str]],
        done: Any,
        resharder: _Resharder | None,
        fired: set[str],
    ) -> Iterator[_StoredBatch]:
        """Run the forward passes still needed and yield the batches to store, in order."""
        for index, texts in enumerate(batches):
            if resharder is None and index in done:
                continue
            if resharder is not None and not resharder.needs_forward(len(texts)):
                resharder.skip(len(texts))
                continue
            fired.clear()
            for detector in detectors.values():
                detector.clear()
            encodings = self._forward(texts, max_length)
            acts = {}
            for name, detector in detectors.items():
                if detector.activations is None:
                    raise RuntimeError(f"layer {name!r} did not run during the forward pass of batch {index}")
                acts[name] = detector.activations
            mask, ids = encodings["attention_mask"], encodings["input_ids"]
            if resharder is None:
                yield _StoredBatch(index, acts, mask, ids)
            else:
                yield from resharder.add(acts, mask, ids)
        if resharder is not None:
            yield from resharder.finish()

    def _run(
        self,
        run_id: str,
        names: list[str],
        save_dtype: torch.dtype | None,
        max_length: int,
        batches: Iterable[list[str]],
        done: set[int],
        progress: bool,
        resharder: _Resharder | None = None,
    ) -> None:
        lm = self._lm
        detectors = {
            name: LayerActivationDetector(name, dtype=save_dtype, device="cpu", hook_id=f"save-{run_id}-{name}")
            for name in names
        }
        fired: set[str] = set()

        def stopper(name: str):
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                fired.add(name)
                if len(fired) == len(names):
                    raise _StopForward

            return hook

        bar = tqdm(desc=f"saving {run_id}", unit="tok", unit_scale=True, disable=not progress, leave=False)
        n_saved = 0
        # Batch i is written by a worker thread while batch i+1 runs through the model, so file writes (and fsync)
        # overlap compute. At most one write is in flight: memory stays bounded by two batches.
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mi_crow-save")
        pending: Future[None] | None = None
        with lm.layers.hooks(list(detectors.values())):
            # Registered after the detectors so that the detectors of the last layer run before the stop.
            handles = [lm.layers.get_module(name).register_forward_hook(stopper(name)) for name in names]
            try:
                for batch in self._batches(names, detectors, max_length, batches, done, resharder, fired):
                    if pending is not None:
                        # Surfaces a failed write before more work is done. Cleared first, so that the cleanup
                        # below does not report the same failure again as one "during an interruption".
                        previous, pending = pending, None
                        previous.result()
                    pending = writer.submit(
                        lm.store.write_activation_batch,
                        run_id,
                        batch.index,
                        batch.activations,
                        batch.attention_mask,
                        extra={"input_ids": batch.input_ids},
                    )
                    n_saved += 1
                    bar.update(int(batch.attention_mask.sum()))
                if pending is not None:
                    previous, pending = pending, None
                    previous.result()
            finally:
                _finish_writes(pending, writer, handles, bar, run_id)
        logger.info("run %r: saved %d new batches (%d already complete)", run_id, n_saved, len(done))

    def _forward(self, texts: list[str], max_length: int) -> Any:
        """One forward pass that ends early once every requested layer has produced its output."""
        lm = self._lm
        encodings = lm.tokenize(texts, max_length=max_length, padding_side="right")
        try:
            lm.inference.forward_encoded(texts, encodings)
        except _StopForward:
            pass
        return encodings


def _chain(first: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rest


def _finish_writes(pending: Any, writer: Any, handles: Sequence[Any], bar: Any, run_id: str) -> None:
    """End a save loop, normally or on an interruption: the batch already computed is still written in full (then
    marked complete), so a resumed run loses at most the batch that was in the forward pass; then the writer thread,
    the hooks and the progress bar are closed."""
    if pending is not None:
        try:
            pending.result()
        except Exception:  # noqa: BLE001 - the interrupting exception is the one to report
            logger.exception("writing the last batch of run %r failed during an interruption", run_id)
    writer.shutdown(wait=True)
    for handle in handles:
        handle.remove()
    bar.close()
