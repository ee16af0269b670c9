"""The abstract :class:`Store`: a key/value view of a directory-like backend plus the activation-run layout.

Backends implement five primitives (``put_bytes``, ``get_bytes``, ``exists``, ``list``, ``delete``) and ``location``;
everything else (JSON, safetensors, ``torch.save`` files, activation runs and the streaming reader) is built on them
here, so a new backend (an object store, a shared filesystem) gets the whole API by implementing the primitives.
A backend that can lock (``LocalStore`` can) also overrides :meth:`Store.lock`.

Layout of an activation run (keys are ``/``-separated, relative to the store root; see :mod:`mi_crow.store.layout`)::

    activations/<run_id>/meta.json
    activations/<run_id>/batch_<i>/<layer>/activations.safetensors    tensors "activations" [b, seq, d]
                                                                       and "attention_mask" [b, seq]
    activations/<run_id>/batch_<i>/extra.safetensors                  optional per-batch tensors (e.g. input_ids)
    activations/<run_id>/.lock                                        while a process writes the run

A batch counts only once ``meta.json`` lists it in ``complete_batches``; that mark is written after every file of
the batch, so an interrupted write leaves a batch that readers do not see.

That is format 1. Format 2 (:mod:`mi_crow.store.packed`; what ``lm.activations.save`` writes) keeps the folders but
stores only real tokens (``[tokens, d]`` per layer, token ids and per-text offsets in ``extra.safetensors``) and
marks each batch complete with its own ``batch_<i>/complete.json`` (O(1) per batch); ``meta.json`` is written when a
save starts and when it ends. Every reading method here serves both formats the same way (format-2 batches come back
right-padded from ``load_batch``/``get_run_batch``; ``read_tokens`` gives the packed vectors of either format).
"""

from __future__ import annotations

import io
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.store.errors import CorruptStoreFileError, RunNotFoundError, StoreKeyNotFoundError
from mi_crow.store.layout import (
    ACTIVATIONS_FILE,
    ACTIVATIONS_PREFIX,
    EXTRA_FILE,
    META_FILE,
    activation_key,
    batch_folder,
    check_batch_index,
    check_count,
    sae_key,
    training_key,
)
from mi_crow.store.packed import (
    FORMAT_KEY,
    INDEX_FILE,
    MARKER_FILE,
    PACKED_FORMAT,
    STORAGE_DTYPES,
    TOKENS_FILE,
    check_record,
    index_to_records,
    records_to_index,
    unpack_to_padded,
)
from mi_crow.store.reader import ActivationReader
from mi_crow.validation import check_choice, check_identifier, check_real, check_str, fail, fail_type

logger = logging.getLogger(__name__)

#: Keys of ``meta.json`` that the store maintains itself; values given for them in ``write_run_meta`` are ignored.
RESERVED_META_KEYS = ("run_id", "complete_batches", "batch_tokens", "batch_shapes", "n_tokens", "layer_dims",
                      "layer_dtypes", "sample_count", "batch_count")

#: ``kind`` values of :meth:`Store.lock_run` and the folder each one locks.
RUN_KINDS = {"activations": activation_key, "training": training_key}


class ActivationBatch(NamedTuple):
    """One stored batch of one layer.

    Attributes:
        activations: ``[batch, seq, d]`` hidden states as written.
        attention_mask: ``[batch, seq]`` mask as written (1 = real token, 0 = padding).
    """

    activations: torch.Tensor
    attention_mask: torch.Tensor


class RunBatch(NamedTuple):
    """One stored batch of an activation run, every layer at once (what :meth:`Store.get_run_batch` returns).

    Attributes:
        activations: layer name -> ``[batch, seq, d]`` hidden states as written, one entry per layer of the run.
        attention_mask: ``[batch, seq]`` mask shared by every layer (1 = real token, 0 = padding).
        extra: the batch's extra tensors (``input_ids [batch, seq]`` for runs saved by ``lm.activations.save``);
            ``{}`` when none were written.
    """

    activations: dict[str, torch.Tensor]
    attention_mask: torch.Tensor
    extra: dict[str, torch.Tensor]


class Store(ABC):
    """Abstract key/value store with atomic writes, plus the activation-run API on top of it.

    Keys are ``/``-separated relative paths (``"sae_models/my_sae/config.json"``). Every ``put_*`` is atomic: a
    reader sees either the previous content or the complete new content, never a partial file. Reading a missing
    key raises :class:`~mi_crow.store.errors.StoreKeyNotFoundError` and reading an undecodable file raises
    :class:`~mi_crow.store.errors.CorruptStoreFileError`; both name the file's location.
    """

    # ------------------------------------------------------------------ primitives (backend-specific)
    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` atomically, creating parent folders as needed."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Return the bytes stored under ``key``; a missing key raises ``StoreKeyNotFoundError``."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` names a stored file or a folder holding files."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Return the sorted keys of every file under the folder ``prefix`` (recursively; ``""`` = everything).

        A ``prefix`` naming a single file returns ``[prefix]``; a missing prefix returns ``[]``. Temporary files of
        writes in progress are never listed.
        """

    @abstractmethod
    def delete(self, prefix: str) -> None:
        """Delete the file ``prefix`` or everything under the folder ``prefix``; missing keys are ignored."""

    @abstractmethod
    def location(self, key: str) -> str:
        """Human-readable full location of ``key`` (a filesystem path, a URL) for error messages."""

    # ------------------------------------------------------------------ typed helpers (generic)
    def put_json(self, key: str, obj: Any) -> None:
        """Write ``obj`` as indented JSON under ``key`` (atomic).

        Raises:
            TypeError: ``obj`` is not JSON-serialisable.
        """
        try:
            text = json.dumps(obj, indent=2, sort_keys=False)
        except (TypeError, ValueError) as exc:
            raise ArgumentTypeError(f"put_json: obj for key {key!r} is not JSON-serialisable: {exc}") from exc
        self.put_bytes(key, text.encode("utf-8"))

    def get_json(self, key: str) -> Any:
        """Read and parse the JSON stored under ``key``."""
        data = self.get_bytes(key)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptStoreFileError(f"corrupt JSON file {self.location(key)}: {exc}") from exc

    def put_tensors(self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                    ) -> None:
        """Write named tensors as a safetensors file under ``key`` (atomic).

        Args:
            key: destination key, conventionally ending in ``.safetensors``.
            tensors: name -> tensor of any shape; tensors are moved to CPU and made contiguous.
            metadata: optional ``str -> str`` metadata stored in the file header.
        """
        prepared = _prepare_tensors(tensors, metadata)
        self.put_bytes(key, _st_save(prepared, metadata=dict(metadata) if metadata else None))

    def get_tensors(self, key: str) -> dict[str, torch.Tensor]:
        """Read a safetensors file written by :meth:`put_tensors`; returns name -> CPU tensor."""
        data = self.get_bytes(key)
        try:
            return _st_load(data)
        except Exception as exc:  # safetensors raises its own error types for every decoding failure
            raise CorruptStoreFileError(f"corrupt safetensors file {self.location(key)}: {exc}") from exc

    def put_torch(self, key: str, obj: Any) -> None:
        """Write ``obj`` with ``torch.save`` under ``key`` (atomic).

        Only objects that ``torch.load(weights_only=True)`` accepts (tensors, dicts, lists, numbers, strings) can be
        read back with :meth:`get_torch`.
        """
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        self.put_bytes(key, buffer.getvalue())

    def get_torch(self, key: str, map_location: str | torch.device | None = "cpu") -> Any:
        """Read a ``torch.save`` file with ``weights_only=True`` (never runs pickled code)."""
        data = self.get_bytes(key)
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
            raise CorruptStoreFileError(f"cannot load torch file {self.location(key)}: {exc}") from exc

    # ------------------------------------------------------------------ keys of the layout
    @staticmethod
    def run_key(run_id: str, *parts: str) -> str:
        """Key of ``parts`` inside the folder of activation run ``run_id`` (``run_id`` is validated)."""
        return activation_key(run_id, *parts)

    @staticmethod
    def training_key(run_id: str, *parts: str) -> str:
        """Key of ``parts`` inside the folder of training run ``run_id``: ``runs/<run_id>/...``."""
        return training_key(run_id, *parts)

    @staticmethod
    def sae_key(sae_id: str, *parts: str) -> str:
        """Key of ``parts`` inside the folder of saved SAE ``sae_id``: ``sae_models/<sae_id>/...``."""
        return sae_key(sae_id, *parts)

    def batch_key(self, run_id: str, batch_index: int, layer: str) -> str:
        """Key of the safetensors file of ``layer`` in batch ``batch_index`` of run ``run_id``."""
        return self.run_key(run_id, batch_folder(batch_index), check_identifier(layer, "layer"), ACTIVATIONS_FILE)

    # ------------------------------------------------------------------ locks
    def lock(self, folder: str, *, what: str = "", purpose: str = "", timeout: float = 0.0
             ) -> AbstractContextManager[Any]:
        """A cross-process lock on the folder ``folder``, to hold while one process writes into it.

        The base implementation does not lock (a backend without a lock primitive gives no protection against
        concurrent writers); :class:`~mi_crow.store.LocalStore` returns a :class:`~mi_crow.store.lock.RunLock` on
        ``<folder>/.lock``. Use :meth:`lock_run` for runs.

        Args:
            folder: key of the folder to lock.
            what: what the folder holds, for messages (``"activation run 'r1'"``).
            purpose: what the holder is doing, recorded for whoever finds the lock held.
            timeout: seconds to wait for a busy lock (0: fail at once).
        """
        return nullcontext()

    def lock_run(self, run_id: str, *, kind: str = "activations", purpose: str = "", timeout: float = 0.0
                 ) -> AbstractContextManager[Any]:
        """Lock activation run or training run ``run_id`` against other processes, as a context manager.

        ``with store.lock_run("r1"):`` holds ``activations/<run_id>/.lock`` for the block;
        ``kind="training"`` locks ``runs/<run_id>/.lock`` (for a trainer writing checkpoints and history). The lock
        records the holder's pid, host and start time; a lock left by a process that died on this host is taken
        over with a logged warning. Re-entrant within a process; released when the block ends, also on an exception.
        :meth:`write_activation_batch`, :meth:`write_run_meta` and :meth:`delete_run` take the activation lock
        themselves, so they refuse to touch a run another process is writing.

        Args:
            run_id: the run (a valid identifier).
            kind: ``"activations"`` or ``"training"``.
            purpose: what the holder is doing (``"activations.save"``, ``"training"``).
            timeout: seconds to wait for the lock before giving up (0: fail at once).

        Returns:
            A context manager holding the lock inside its block.

        Raises:
            ResourceBusyError: (on entering the block) another live process holds the lock; the message names its
                pid and host and the lock file.
        """
        key_of = RUN_KINDS[check_choice(kind, "kind", tuple(RUN_KINDS))]
        folder = key_of(run_id)
        check_str(purpose, "purpose", allow_empty=True)
        timeout = check_real(timeout, "timeout", minimum=0.0)
        label = "activation run" if kind == "activations" else "training run"
        return self.lock(folder, what=f"{label} {run_id!r}", purpose=purpose or kind, timeout=timeout)

    # ------------------------------------------------------------------ activation runs
    def list_runs(self) -> list[str]:
        """Sorted ids of the activation runs in the store (those with a ``meta.json``)."""
        runs = set()
        for key in self.list(ACTIVATIONS_PREFIX):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == META_FILE:
                runs.add(parts[1])
        return sorted(runs)

    def run_exists(self, run_id: str) -> bool:
        """Whether run ``run_id`` has a ``meta.json``."""
        return self.exists(self.run_key(run_id, META_FILE))

    def read_run_meta(self, run_id: str) -> dict[str, Any]:
        """Return the parsed ``meta.json`` of run ``run_id``.

        Besides what the writer stored, it holds the store's own records: ``complete_batches`` (sorted list of
        batch indices), ``batch_tokens`` (batch index as str -> number of real tokens), ``batch_shapes`` (batch index
        as str -> ``[batch, seq]``), ``n_tokens`` (real tokens over complete batches), ``sample_count`` (texts over
        complete batches), ``batch_count`` (number of complete batches), ``layer_dims`` (layer -> d) and
        ``layer_dtypes`` (layer -> dtype name).

        Raises:
            RunNotFoundError: the run has no ``meta.json`` (the message names the run id and the store location).
            CorruptStoreFileError: ``meta.json`` is not valid JSON or its records are malformed (names the path).
        """
        key = self.run_key(run_id, META_FILE)
        if not self.exists(key):
            runs = self.list_runs()
            raise RunNotFoundError(
                f"activation run {run_id!r} not found in store {self.location('')}: no {self.location(key)}; "
                f"existing runs: {runs if runs else 'none'}"
            )
        meta = self._meta_file(run_id)
        if _is_packed(meta):
            return self._packed_meta(run_id, meta)
        # Normalised records; also fills sample_count/batch_count for runs written before they were recorded.
        meta.update(_store_records(meta, run_id, self.location(key)))
        return meta

    def _meta_file(self, run_id: str) -> dict[str, Any]:
        """``meta.json`` as stored (no records added); a missing run raises ``RunNotFoundError``."""
        key = self.run_key(run_id, META_FILE)
        try:
            meta = self.get_json(key)
        except StoreKeyNotFoundError:
            runs = self.list_runs()
            raise RunNotFoundError(
                f"activation run {run_id!r} not found in store {self.location('')}: no {self.location(key)}; "
                f"existing runs: {runs if runs else 'none'}"
            ) from None
        if not isinstance(meta, dict):
            raise CorruptStoreFileError(f"{self.location(key)} must hold a JSON object, got {type(meta).__name__}")
        return meta

    def run_format(self, run_id: str) -> int:
        """Store format of run ``run_id``: 1 (padded files, records in ``meta.json``) or 2 (packed, markers)."""
        return PACKED_FORMAT if _is_packed(self._meta_file(run_id)) else 1

    def get_run_metadata(self, run_id: str) -> dict[str, Any]:
        """The ``meta.json`` of run ``run_id`` as a dict (the same as :meth:`read_run_meta`)."""
        return self.read_run_meta(run_id)

    def write_run_meta(self, run_id: str, meta: Mapping[str, Any]) -> None:
        """Create or replace the user part of run ``run_id``'s ``meta.json`` (atomic).

        The store's own records (:data:`RESERVED_META_KEYS`: completed batches, token and sample counts, layer
        widths) are kept from the existing file; values given for them in ``meta`` are ignored, so a resumed save can
        rewrite its metadata without forgetting which batches are done.

        Args:
            run_id: run id (a folder name: no ``/``, no leading ``.``).
            meta: JSON-serialisable mapping (model id, layers, dtype, dataset description, ...).

        Raises:
            ResourceBusyError: another process is writing the run.
        """
        check_identifier(run_id, "run_id")
        if not isinstance(meta, Mapping):
            raise fail_type("meta", "a mapping (dict)", meta)
        with self.lock_run(run_id, purpose="write_run_meta"):
            existing = self.read_run_meta(run_id) if self.run_exists(run_id) else {}
            if _is_packed(existing):
                raw = self._meta_file(run_id)
                merged = {k: v for k, v in meta.items() if k not in RESERVED_META_KEYS and k not in _PACKED_KEYS}
                merged.update({k: raw[k] for k in (*RESERVED_META_KEYS, *_PACKED_KEYS) if k in raw})
                self.put_json(self.run_key(run_id, META_FILE), merged)
                return
            merged: dict[str, Any] = {k: v for k, v in meta.items() if k not in RESERVED_META_KEYS}
            merged.update(_store_records(existing, run_id, self.location(self.run_key(run_id, META_FILE))))
            self.put_json(self.run_key(run_id, META_FILE), merged)

    def write_activation_batch(
        self,
        run_id: str,
        batch_index: int,
        activations: Mapping[str, torch.Tensor],
        attention_mask: torch.Tensor,
        extra: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Write one batch of activations for one or more layers, then mark the batch complete in ``meta.json``.

        Each layer goes to ``activations/<run_id>/batch_<i>/<layer>/activations.safetensors`` with tensors
        ``activations`` and ``attention_mask``; each file is written atomically, and only after all of them the batch
        is added to ``complete_batches`` (with its real-token count), so an interruption leaves no visible batch.
        Rewriting a complete batch replaces it.

        Args:
            run_id: run id.
            batch_index: index ``i >= 0`` of the batch.
            activations: layer name -> ``[batch, seq, d]`` tensor. Layer names are used as folder names as they
                are (dots allowed, no ``/``).
            attention_mask: ``[batch, seq]`` with 1 for real tokens and 0 for padding.
            extra: optional name -> tensor saved once per batch in ``batch_<i>/extra.safetensors``
                (e.g. ``input_ids [batch, seq]``); read back with :meth:`load_batch_extra`.
        """
        check_identifier(run_id, "run_id")
        check_batch_index(batch_index)
        mask = _check_mask(attention_mask)
        if not isinstance(activations, Mapping):
            raise fail_type("activations", "a non-empty dict layer name -> Tensor[b, seq, d]", activations)
        if len(activations) == 0:
            raise fail("activations", "a non-empty dict layer name -> Tensor[b, seq, d]", activations)
        for layer, tensor in activations.items():
            check_identifier(layer, "layer name")
            if layer == EXTRA_FILE:
                raise fail("layer name", f"a name other than {EXTRA_FILE!r} (reserved for the batch's extra tensors)",
                           layer)
            if not isinstance(tensor, torch.Tensor):
                raise fail_type(f"activations[{layer!r}]", "a Tensor", tensor)
            if tensor.dim() != 3 or tuple(tensor.shape[:2]) != tuple(mask.shape):
                raise UserInputError(
                    f"activations[{layer!r}] must have shape [b, seq, d] matching attention_mask "
                    f"{list(mask.shape)}, got {list(tensor.shape)}"
                )
        if extra is not None:
            if not isinstance(extra, Mapping) or not all(isinstance(v, torch.Tensor) for v in extra.values()):
                raise fail_type("extra", "None or a dict name -> Tensor", extra)
        meta_key = self.run_key(run_id, META_FILE)
        with self.lock_run(run_id, purpose="write_activation_batch"):
            meta = self.read_run_meta(run_id) if self.run_exists(run_id) else {"run_id": run_id}
            if _is_packed(meta):
                raise UserInputError(
                    f"run {run_id!r} is a packed (format 2) run: write its batches with write_packed_batch, not "
                    "write_activation_batch (one run never mixes the two formats)")
            layer_dims = dict(meta.get("layer_dims", {}))
            layer_dtypes = dict(meta.get("layer_dtypes", {}))
            if meta.get("complete_batches") and set(activations) != set(layer_dims):
                # Readers expect every complete batch to hold every layer of the run.
                raise UserInputError(
                    f"activations must hold the same layers as the earlier batches of run {run_id!r}: "
                    f"expected {sorted(layer_dims)}, got {sorted(activations)}"
                )
            for layer, tensor in activations.items():
                d = int(tensor.shape[2])
                if layer in layer_dims and int(layer_dims[layer]) != d:
                    raise UserInputError(
                        f"activations[{layer!r}] has width d={d} but earlier batches of run {run_id!r} have "
                        f"d={layer_dims[layer]}"
                    )
                layer_dims[layer] = d
                layer_dtypes[layer] = str(tensor.dtype).removeprefix("torch.")
            if batch_index in meta.get("complete_batches", []):
                # Rewriting a complete batch: unmark it first, so an interruption between the layer files never
                # leaves a batch marked complete whose layers come from two different writes.
                meta["complete_batches"] = [i for i in meta["complete_batches"] if i != batch_index]
                meta.update(_store_records(meta, run_id, self.location(meta_key)))
                self.put_json(meta_key, meta)

            header = {"run_id": run_id, "batch_index": str(batch_index)}
            for layer, tensor in activations.items():
                self.put_tensors(self.batch_key(run_id, batch_index, layer),
                                 {"activations": tensor, "attention_mask": mask}, metadata={**header, "layer": layer})
            if extra:
                self.put_tensors(self.run_key(run_id, batch_folder(batch_index), EXTRA_FILE), dict(extra),
                                 metadata=header)

            # Re-read right before the update so metadata written meanwhile (write_run_meta) is not lost.
            meta = self.read_run_meta(run_id) if self.run_exists(run_id) else {"run_id": run_id}
            records = _store_records(meta, run_id, self.location(meta_key))
            records["complete_batches"] = sorted(set(records["complete_batches"]) | {batch_index})
            records["batch_tokens"][str(batch_index)] = int(mask.sum().item())
            records["batch_shapes"][str(batch_index)] = [int(mask.shape[0]), int(mask.shape[1])]
            records["layer_dims"] = {**records["layer_dims"], **layer_dims}
            records["layer_dtypes"] = {**records["layer_dtypes"], **layer_dtypes}
            meta.update(_store_records(records, run_id, self.location(meta_key)))
            self.put_json(meta_key, meta)

    # ------------------------------------------------------------------ format 2: packed runs
    def create_packed_run(self, run_id: str, meta: Mapping[str, Any], layers: Mapping[str, int],
                          dtype: torch.dtype | str) -> None:
        """Start (or restart, to resume) writing format-2 run ``run_id``: ``meta.json`` with ``"status": "writing"``.

        Layout and guarantees: :mod:`mi_crow.store.packed`. The caller holds the run's lock (``lock_run``) for the
        whole save. Restarting a run keeps its complete batches; the run's ``index.json`` is ignored until
        :meth:`finish_packed_run` rewrites it.

        Args:
            run_id: the run.
            meta: the writer's JSON-serialisable description (model, layers, dataset...); the store's own keys are
                ignored.
            layers: layer name -> width ``d`` of every layer the run stores.
            dtype: storage dtype (``torch.bfloat16``, ``torch.float16`` or ``torch.float32``, or their names).

        Raises:
            ValueError: a bad argument; the run exists as a format-1 run, with another storage dtype or other layers
                (the message names both values).
        """
        check_identifier(run_id, "run_id")
        if not isinstance(meta, Mapping):
            raise fail_type("meta", "a mapping (dict)", meta)
        dtype_name = _storage_dtype_name(dtype)
        if not isinstance(layers, Mapping) or not layers:
            raise fail("layers", "a non-empty dict layer name -> width d", layers)
        dims = {}
        for layer, d in layers.items():
            _check_layer_name(layer)
            dims[layer] = check_count(d, f"layers[{layer!r}]")
        if self.run_exists(run_id):
            stored = self._meta_file(run_id)
            if not _is_packed(stored):
                raise UserInputError(f"run {run_id!r} exists as a format-1 (padded) run; it cannot continue as a "
                                     "packed run (use another run_id, or delete the run)")
            if stored.get("storage_dtype") != dtype_name:
                raise UserInputError(
                    f"run {run_id!r} is stored in dtype {stored.get('storage_dtype')}, this save asks for "
                    f"{dtype_name}: one run holds one storage dtype (save with dtype={stored.get('storage_dtype')!r}, "
                    "or use another run_id)")
            if stored.get("layer_dims") != dims:
                raise UserInputError(f"run {run_id!r} stores layers {stored.get('layer_dims')}, this save writes "
                                     f"{dims}")
        header = {k: v for k, v in meta.items() if k not in RESERVED_META_KEYS and k not in _PACKED_KEYS}
        header.update({"run_id": run_id, FORMAT_KEY: PACKED_FORMAT, "status": "writing", "storage_dtype": dtype_name,
                       "layer_dims": dims, "layer_dtypes": {layer: dtype_name for layer in dims}})
        self.put_json(self.run_key(run_id, META_FILE), header)

    def write_packed_batch(
        self,
        run_id: str,
        batch_index: int,
        activations: Mapping[str, torch.Tensor],
        offsets: torch.Tensor,
        token_ids: torch.Tensor,
        *,
        text_ids: torch.Tensor | None = None,
        forward_batches: list[int] | None = None,
        rank: int = 0,
    ) -> None:
        """Write one batch of format-2 run ``run_id``: its files, then its completion marker (O(1) in the run size).

        ``meta.json`` is not touched. Rewriting a complete batch first removes its marker. Several processes may
        write disjoint batch indices of one run at once (sharded saving).

        Args:
            run_id: a run started with :meth:`create_packed_run`.
            batch_index: ``i >= 0``.
            activations: layer -> ``[tokens, d]`` packed token vectors in the run's storage dtype, every layer of
                the run, texts one after the other.
            offsets: ``[texts + 1]`` int: text ``t`` is tokens ``offsets[t]:offsets[t + 1]``; ``offsets[0] == 0``,
                ``offsets[-1] == tokens``.
            token_ids: ``[tokens]`` token ids.
            text_ids: ``[texts]`` global dataset index of each text (default: ``0 .. texts - 1``).
            forward_batches: the writer's forward batches the batch holds (used to resume).
            rank: the writing process's rank (recorded).

        Raises:
            ValueError: inconsistent shapes, another dtype or other layers than the run's (both named).
        """
        check_identifier(run_id, "run_id")
        check_batch_index(batch_index)
        header = self._meta_file(run_id)
        if not _is_packed(header):
            raise UserInputError(f"run {run_id!r} is a format-1 run; write_packed_batch needs a run started with "
                                 "create_packed_run")
        dims = header["layer_dims"]
        dtype = STORAGE_DTYPES[header["storage_dtype"]]
        if not isinstance(activations, Mapping) or set(activations) != set(dims):
            raise fail("activations", f"a dict with exactly the run's layers {sorted(dims)}",
                       sorted(activations) if isinstance(activations, Mapping) else activations)
        if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() < 2 \
                or offsets.dtype.is_floating_point:
            raise fail_type("offsets", "an integer Tensor[texts + 1] (texts >= 1)", offsets)
        offsets = offsets.to(torch.int64).cpu()
        lengths = offsets[1:] - offsets[:-1]
        if int(offsets[0]) != 0 or bool((lengths < 0).any()):
            raise fail("offsets", "non-decreasing from 0", offsets.tolist()[:8])
        n_tokens, n_texts = int(offsets[-1]), int(lengths.numel())
        if not isinstance(token_ids, torch.Tensor) or tuple(token_ids.shape) != (n_tokens,) \
                or token_ids.dtype.is_floating_point:
            raise fail("token_ids", f"an integer Tensor[{n_tokens}] (offsets[-1] tokens)", token_ids)
        if text_ids is None:
            text_ids = torch.arange(n_texts)
        if not isinstance(text_ids, torch.Tensor) or tuple(text_ids.shape) != (n_texts,):
            raise fail("text_ids", f"an integer Tensor[{n_texts}] (one per text)", text_ids)
        for layer, tensor in activations.items():
            if not isinstance(tensor, torch.Tensor):
                raise fail_type(f"activations[{layer!r}]", "a Tensor[tokens, d]", tensor)
            if tuple(tensor.shape) != (n_tokens, int(dims[layer])):
                raise UserInputError(f"activations[{layer!r}] must have shape [{n_tokens}, {dims[layer]}] "
                                     f"(offsets[-1] tokens, the layer's d), got {list(tensor.shape)}")
            if tensor.dtype != dtype:
                raise UserInputError(f"activations[{layer!r}] has dtype {_dtype_str(tensor.dtype)} but run "
                                     f"{run_id!r} is stored in {header['storage_dtype']}")
        folder = batch_folder(batch_index)
        marker = self.run_key(run_id, folder, MARKER_FILE)
        if self.exists(marker):
            self.delete(marker)  # rewriting: never a marker over files from two different writes
        meta = {"run_id": run_id, "batch_index": str(batch_index), FORMAT_KEY: str(PACKED_FORMAT)}
        for layer, tensor in activations.items():
            self.put_tensors(self.batch_key(run_id, batch_index, layer), {"activations": tensor},
                             metadata={**meta, "layer": layer})
        self.put_tensors(self.run_key(run_id, folder, TOKENS_FILE),
                         {"token_ids": token_ids.to(torch.int32), "offsets": offsets,
                          "text_ids": text_ids.to(torch.int64)}, metadata=meta)
        record = {"batch_index": batch_index, "n_tokens": n_tokens, "n_texts": n_texts,
                  "max_len": int(lengths.max()), "rank": int(rank),
                  "forward_batches": [int(b) for b in (forward_batches or [])]}
        self.put_bytes(marker, json.dumps(record).encode("utf-8"))

    def finish_packed_run(self, run_id: str, meta: Mapping[str, Any] | None = None) -> None:
        """End a format-2 save: write ``index.json`` from the markers, then ``meta.json`` with the totals and
        ``"status": "complete"`` (``meta``: user keys to update at the same time)."""
        header = self._meta_file(run_id)
        if not _is_packed(header):
            raise UserInputError(f"run {run_id!r} is not a packed (format 2) run")
        if meta:
            header.update({k: v for k, v in meta.items() if k not in RESERVED_META_KEYS and k not in _PACKED_KEYS})
        records = self._marker_records(run_id, header)
        self.put_json(self.run_key(run_id, INDEX_FILE), records_to_index(records))
        header.update(_packed_totals(records))
        header["status"] = "complete"
        self.put_json(self.run_key(run_id, META_FILE), header)

    def batch_records(self, run_id: str) -> list[dict[str, Any]]:
        """Per-batch records of a format-2 run (``batch_index``, ``n_tokens``, ``n_texts``, ``max_len``, ``rank``,
        ``forward_batches``), sorted by batch index: from ``index.json`` once the save completed, else rebuilt from
        the completion markers (after a crash, or while a save runs)."""
        header = self._meta_file(run_id)
        if not _is_packed(header):
            raise UserInputError(f"run {run_id!r} is a format-1 run; its records are in read_run_meta(run_id)")
        return self._records(run_id, header)

    def _records(self, run_id: str, header: Mapping[str, Any]) -> list[dict[str, Any]]:
        if header.get("status") == "complete":
            key = self.run_key(run_id, INDEX_FILE)
            if not self.exists(key):
                raise CorruptStoreFileError(f"{self.location(self.run_key(run_id, META_FILE))} says the run is "
                                            f"complete but {self.location(key)} is missing")
            return index_to_records(self.get_json(key), self.location(key))
        return self._marker_records(run_id, header)

    def _marker_records(self, run_id: str, header: Mapping[str, Any]) -> list[dict[str, Any]]:
        records = []
        for index in self._marked_batches(run_id):
            key = self.run_key(run_id, batch_folder(index), MARKER_FILE)
            records.append(check_record(self.get_json(key), self.location(key), index))
        return records

    def _marked_batches(self, run_id: str) -> list[int]:
        """Sorted indices of the batch folders of ``run_id`` that hold a completion marker."""
        found = []
        prefix = self.run_key(run_id)
        for key in self.list(prefix):
            parts = key[len(prefix) + 1:].split("/")
            if len(parts) == 2 and parts[1] == MARKER_FILE and parts[0].startswith("batch_"):
                found.append(int(parts[0][len("batch_"):]))
        return sorted(found)

    def _packed_meta(self, run_id: str, header: dict[str, Any]) -> dict[str, Any]:
        records = self._records(run_id, header)
        meta = dict(header)
        meta.update(_packed_totals(records))
        meta["complete_batches"] = [r["batch_index"] for r in records]
        meta["batch_tokens"] = {str(r["batch_index"]): r["n_tokens"] for r in records}
        meta["batch_shapes"] = {str(r["batch_index"]): [r["n_texts"], r["max_len"]] for r in records}
        return meta

    def _packed_record(self, run_id: str, batch_index: int) -> dict[str, Any]:
        """The marker of one batch (O(1)); a batch without one is not complete (``UserInputError``)."""
        key = self.run_key(run_id, batch_folder(batch_index), MARKER_FILE)
        if not self.exists(key):
            raise UserInputError(f"batch_index {batch_index} is not a complete batch of run {run_id!r} "
                                 f"(no completion marker {self.location(key)})")
        return check_record(self.get_json(key), self.location(key), batch_index)

    def read_tokens(self, run_id: str, batch_index: int, layer: str, n_tokens: int | None = None,
                    d: int | None = None) -> torch.Tensor:
        """The real-token vectors ``[tokens, d]`` of ``layer`` in batch ``batch_index``, in storage order (text by
        text), without consulting ``meta.json`` (for readers that read it once; both formats).

        Args:
            n_tokens, d: what the run's records say; a file that disagrees raises ``CorruptStoreFileError``
                naming the file and both values.
        """
        key = self.batch_key(run_id, batch_index, layer)
        try:
            tensors = self.get_tensors(key)
        except StoreKeyNotFoundError as exc:
            raise CorruptStoreFileError(f"batch {batch_index} of run {run_id!r} is recorded complete but "
                                        f"{self.location(key)} is missing") from exc
        acts = tensors.get("activations")
        if acts is None:
            raise CorruptStoreFileError(f"{self.location(key)} has no tensor 'activations' (has {sorted(tensors)})")
        source = "meta.json" if "attention_mask" in tensors else "its completion marker"
        if "attention_mask" in tensors:  # format 1: drop the padding
            mask = tensors["attention_mask"]
            if acts.dim() != 3 or tuple(acts.shape[:2]) != tuple(mask.shape):
                raise CorruptStoreFileError(f"{self.location(key)} has inconsistent shapes: activations "
                                            f"{list(acts.shape)}, attention_mask {list(mask.shape)}")
            acts = acts.reshape(-1, acts.shape[2])[mask.reshape(-1).bool()]
        elif acts.dim() != 2:
            raise CorruptStoreFileError(f"{self.location(key)} must hold activations [tokens, d], has "
                                        f"{list(acts.shape)}")
        if d is not None and acts.shape[1] != d:
            raise CorruptStoreFileError(f"{self.location(key)} has width {acts.shape[1]}, {source} says d={d}")
        if n_tokens is not None and acts.shape[0] != n_tokens:
            raise CorruptStoreFileError(f"{self.location(key)} has {acts.shape[0]} real tokens, {source} says "
                                        f"{n_tokens}")
        return acts

    def _read_packed_tokens_file(self, run_id: str, batch_index: int, record: Mapping[str, Any]
                                 ) -> dict[str, torch.Tensor]:
        key = self.run_key(run_id, batch_folder(batch_index), TOKENS_FILE)
        try:
            tensors = self.get_tensors(key)
        except StoreKeyNotFoundError as exc:
            raise CorruptStoreFileError(f"batch {batch_index} of run {run_id!r} has a completion marker but "
                                        f"{self.location(key)} is missing") from exc
        offsets, ids, text_ids = tensors.get("offsets"), tensors.get("token_ids"), tensors.get("text_ids")
        if offsets is None or ids is None or text_ids is None or offsets.numel() != record["n_texts"] + 1 \
                or int(offsets[-1]) != record["n_tokens"] or ids.numel() != record["n_tokens"] \
                or text_ids.numel() != record["n_texts"]:
            raise CorruptStoreFileError(
                f"{self.location(key)} disagrees with its completion marker ({record['n_texts']} texts, "
                f"{record['n_tokens']} tokens): holds {{{', '.join(f'{k}: {list(v.shape)}' for k, v in tensors.items())}}}")
        return tensors

    def batch_text_indices(self, run_id: str, batch_index: int) -> list[int]:
        """Global dataset indices of the texts of batch ``batch_index``, in row order (both formats).

        Format 1 batches hold consecutive texts: those after the texts of the batches before it.
        """
        check_batch_index(batch_index)
        header = self._meta_file(run_id)
        if _is_packed(header):
            record = self._packed_record(run_id, batch_index)
            return self._read_packed_tokens_file(run_id, batch_index, record)["text_ids"].tolist()
        meta = self.read_run_meta(run_id)
        if batch_index not in meta["complete_batches"]:
            raise UserInputError(f"batch_index {batch_index} is not a complete batch of run {run_id!r}")
        shapes = meta["batch_shapes"]
        per = meta.get("shard_size") or meta.get("batch_size")
        start = batch_index * int(per) if per else sum(shapes[str(i)][0] for i in meta["complete_batches"]
                                                       if i < batch_index)
        return list(range(start, start + shapes[str(batch_index)][0]))

    def list_batches(self, run_id: str) -> list[int]:
        """Sorted indices of the complete batches of run ``run_id`` (as recorded in ``meta.json``)."""
        meta = self.read_run_meta(run_id)
        return sorted(int(i) for i in meta.get("complete_batches", []))

    def list_layers(self, run_id: str) -> list[str]:
        """Layer names stored in run ``run_id`` (from ``meta.json``)."""
        return sorted(self.read_run_meta(run_id).get("layer_dims", {}))

    def _check_complete(self, run_id: str, batch_index: int, layer: str, meta: Mapping[str, Any]) -> None:
        complete = [int(i) for i in meta.get("complete_batches", [])]
        if batch_index not in complete:
            raise UserInputError(
                f"batch_index {batch_index} is not a complete batch of run {run_id!r} "
                f"(complete batches: {_summarise(complete)})"
            )
        layers = meta.get("layer_dims", {})
        if layer not in layers:
            raise UserInputError(f"layer {layer!r} is not stored in run {run_id!r}; stored layers: {sorted(layers)}")

    def load_batch(self, run_id: str, batch_index: int, layer: str) -> ActivationBatch:
        """Load batch ``batch_index`` of ``layer`` in run ``run_id``.

        Returns:
            :class:`ActivationBatch` with ``activations [batch, seq, d]`` and ``attention_mask [batch, seq]`` exactly
            as written.

        Raises:
            ValueError: the batch is not complete or the layer is not in the run.
            StoreKeyNotFoundError / CorruptStoreFileError: the file is missing or unreadable (message names the path).
        """
        check_identifier(run_id, "run_id")
        check_batch_index(batch_index)
        check_identifier(layer, "layer")
        header = self._meta_file(run_id)
        if _is_packed(header):
            # O(1): this batch's marker, not the run's records.
            if layer not in header["layer_dims"]:
                raise UserInputError(f"layer {layer!r} is not stored in run {run_id!r}; stored layers: "
                                     f"{sorted(header['layer_dims'])}")
            record = self._packed_record(run_id, batch_index)
            return self._unpacked(run_id, batch_index, layer, record, header)
        meta = self.read_run_meta(run_id)
        self._check_complete(run_id, batch_index, layer, meta)
        return self.read_batch_file(run_id, batch_index, layer)

    def _unpacked(self, run_id: str, batch_index: int, layer: str, record: Mapping[str, Any],
                  header: Mapping[str, Any]) -> ActivationBatch:
        """A format-2 batch as format 1 returns it: right-padded ``[texts, max_len, d]`` and its mask."""
        packed = self.read_tokens(run_id, batch_index, layer, record["n_tokens"], int(header["layer_dims"][layer]))
        offsets = self._read_packed_tokens_file(run_id, batch_index, record)["offsets"]
        acts, mask = unpack_to_padded(packed, offsets)
        return ActivationBatch(acts, mask)

    def read_batch_file(self, run_id: str, batch_index: int, layer: str) -> ActivationBatch:
        """Read the file of ``layer`` in batch ``batch_index`` without consulting ``meta.json``.

        For readers that have already read ``meta.json`` once (the :class:`ActivationReader` reads thousands of
        files per epoch); everyone else should use :meth:`load_batch`, which also checks that the batch is complete.
        The file's tensors are checked against each other, not against ``meta.json``.

        Returns:
            :class:`ActivationBatch` with ``activations [batch, seq, d]`` and ``attention_mask [batch, seq]``.

        Raises:
            StoreKeyNotFoundError / CorruptStoreFileError: the file is missing, unreadable or does not hold the two
                tensors with matching shapes (the message names the path).
        """
        header = self._meta_file(run_id) if self.run_exists(run_id) else {}
        if _is_packed(header):
            return self._unpacked(run_id, batch_index, layer, self._packed_record(run_id, batch_index), header)
        key = self.batch_key(run_id, batch_index, layer)
        tensors = self.get_tensors(key)
        acts, mask = tensors.get("activations"), tensors.get("attention_mask")
        if acts is None or mask is None:
            raise CorruptStoreFileError(
                f"{self.location(key)} must hold tensors 'activations' and 'attention_mask', has {sorted(tensors)}"
            )
        if acts.dim() != 3 or mask.dim() != 2 or tuple(acts.shape[:2]) != tuple(mask.shape):
            raise CorruptStoreFileError(
                f"{self.location(key)} has inconsistent shapes: activations {list(acts.shape)}, "
                f"attention_mask {list(mask.shape)}"
            )
        return ActivationBatch(acts, mask)

    def load_batch_extra(self, run_id: str, batch_index: int) -> dict[str, torch.Tensor]:
        """Load the ``extra`` tensors written with batch ``batch_index`` of run ``run_id`` (``{}`` if none)."""
        check_batch_index(batch_index)
        header = self._meta_file(run_id)
        if _is_packed(header):
            return self._packed_extra(run_id, batch_index, self._packed_record(run_id, batch_index), header)
        meta = self.read_run_meta(run_id)
        if batch_index not in meta["complete_batches"]:
            raise UserInputError(f"batch_index {batch_index} is not a complete batch of run {run_id!r}")
        return self._read_extra(run_id, batch_index)

    def _packed_extra(self, run_id: str, batch_index: int, record: Mapping[str, Any], header: Mapping[str, Any]
                      ) -> dict[str, torch.Tensor]:
        """Format-2 token ids as format 1 stores them: ``input_ids [texts, max_len]`` int64 padded with the run's
        ``pad_token_id`` (0 if it has none)."""
        tensors = self._read_packed_tokens_file(run_id, batch_index, record)
        pad = header.get("pad_token_id")
        ids, _ = unpack_to_padded(tensors["token_ids"].to(torch.int64), tensors["offsets"],
                                  fill=int(pad) if pad is not None else 0)
        return {"input_ids": ids}

    def _read_extra(self, run_id: str, batch_index: int) -> dict[str, torch.Tensor]:
        key = self.run_key(run_id, batch_folder(batch_index), EXTRA_FILE)
        return self.get_tensors(key) if self.exists(key) else {}

    def list_run_batches(self, run_id: str) -> list[int]:
        """Sorted indices of the complete batches of run ``run_id`` (the same as :meth:`list_batches`).

        Raises:
            RunNotFoundError: the run does not exist.
        """
        return self.list_batches(run_id)

    def get_run_batch(self, run_id: str, batch_index: int) -> RunBatch:
        """Load every layer of one complete batch of run ``run_id``.

        Returns:
            :class:`RunBatch` ``(activations, attention_mask, extra)``: ``activations`` maps each layer of the run to
            its ``[batch, seq, d]`` tensor, ``attention_mask`` is the ``[batch, seq]`` mask the layers share, and
            ``extra`` holds the batch's extra tensors (``input_ids [batch, seq]`` for runs saved by
            ``lm.activations.save``), all exactly as written.

        Raises:
            ValueError: the batch is not complete.
            StoreKeyNotFoundError / CorruptStoreFileError: a file is missing, unreadable, or its mask differs from
                the other layers' (the message names the path).
        """
        check_batch_index(batch_index)
        header = self._meta_file(run_id)
        if _is_packed(header):
            record = self._packed_record(run_id, batch_index)
            unpacked = {layer: self._unpacked(run_id, batch_index, layer, record, header)
                        for layer in sorted(header["layer_dims"])}
            mask = next(iter(unpacked.values())).attention_mask
            return RunBatch({layer: b.activations for layer, b in unpacked.items()}, mask,
                            self._packed_extra(run_id, batch_index, record, header))
        meta = self.read_run_meta(run_id)
        layers = sorted(meta["layer_dims"])
        if not layers:
            if batch_index not in meta["complete_batches"]:
                raise UserInputError(f"batch_index {batch_index} is not a complete batch of run {run_id!r} "
                                     "(complete batches: none)")
            raise CorruptStoreFileError(f"{self.location(self.run_key(run_id, META_FILE))} lists complete batches "
                                        "but no layers (layer_dims is empty)")
        self._check_complete(run_id, batch_index, layers[0], meta)
        activations: dict[str, torch.Tensor] = {}
        mask: torch.Tensor | None = None
        for layer in layers:
            batch = self.read_batch_file(run_id, batch_index, layer)
            if mask is None:
                mask = batch.attention_mask
            elif not torch.equal(mask, batch.attention_mask):
                raise CorruptStoreFileError(
                    f"{self.location(self.batch_key(run_id, batch_index, layer))} has another attention_mask than "
                    f"layer {layers[0]!r} of the same batch"
                )
            activations[layer] = batch.activations
        return RunBatch(activations, mask, self._read_extra(run_id, batch_index))  # type: ignore[arg-type]

    def delete_run(self, run_id: str) -> None:
        """Delete activation run ``run_id`` and all its files.

        Raises:
            ResourceBusyError: another process is writing the run.
        """
        with self.lock_run(run_id, purpose="delete_run"):
            self.delete(self.run_key(run_id))

    def activation_reader(
        self,
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
    ) -> ActivationReader:
        """Stream run ``run_id``'s ``layer`` as padding-free token vectors in batches (see ``ActivationReader``).

        Args:
            run_id: activation run id.
            layer: layer name as stored.
            batch_size: tokens per batch.
            shuffle: permute files per epoch and mix tokens across files in the shuffle buffer.
            buffer_tokens: shuffle buffer size in tokens (instead of ``buffer_bytes``).
            buffer_bytes: shuffle buffer size in bytes of yielded vectors (default 1 GiB; with ``prefetch`` the
                group being served and the one read ahead share it). Smaller than one batch: ``ValueError``.
            seed: seed of all permutations (same seed, same stream).
            dtype: dtype of the yielded tensors (``None`` = as stored).
            drop_last: drop each epoch's last batch when it is short.
            epochs: passes over the run, ``None`` = endless.
            prefetch: read the next buffer ahead in a background thread (default).

        Returns:
            An :class:`~mi_crow.store.reader.ActivationReader`: an iterable of ``Tensor[batch_size, d_in]`` with
            ``n_tokens``, ``d_in``, ``state_dict()`` and ``load_state_dict()``.
        """
        return ActivationReader(self, run_id, layer, batch_size, shuffle=shuffle, buffer_tokens=buffer_tokens,
                                seed=seed, dtype=dtype, drop_last=drop_last, epochs=epochs, prefetch=prefetch,
                                buffer_bytes=buffer_bytes)


#: Keys of a format-2 ``meta.json`` that the store maintains (besides ``RESERVED_META_KEYS``).
_PACKED_KEYS = (FORMAT_KEY, "status", "storage_dtype")


def _is_packed(meta: Mapping[str, Any]) -> bool:
    return meta.get(FORMAT_KEY) == PACKED_FORMAT


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _storage_dtype_name(dtype: object) -> str:
    name = _dtype_str(dtype) if isinstance(dtype, torch.dtype) else dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    if isinstance(name, str):
        name = aliases.get(name.removeprefix("torch."), name.removeprefix("torch."))
    if name not in STORAGE_DTYPES:
        raise fail("dtype", f"a storage dtype, one of {sorted(STORAGE_DTYPES)}", dtype)
    return str(name)


def _check_layer_name(layer: object) -> None:
    check_identifier(layer, "layer name")
    if layer in (EXTRA_FILE, TOKENS_FILE, MARKER_FILE):
        raise fail("layer name", "a name other than the batch folder's own files "
                                 f"({EXTRA_FILE!r}, {TOKENS_FILE!r}, {MARKER_FILE!r})", layer)


def _packed_totals(records: list[dict[str, Any]]) -> dict[str, int]:
    return {"n_tokens": sum(r["n_tokens"] for r in records), "sample_count": sum(r["n_texts"] for r in records),
            "batch_count": len(records)}


def _prepare_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
                     ) -> dict[str, torch.Tensor]:
    if not isinstance(tensors, Mapping) or not tensors:
        raise fail("tensors", "a non-empty dict name -> Tensor", tensors)
    if metadata is not None and (not isinstance(metadata, Mapping)
                                 or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise fail_type("metadata", "a dict str -> str", metadata)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise fail_type("tensor names", "str", name)
        if not isinstance(tensor, torch.Tensor):
            raise fail_type(f"tensors[{name!r}]", "a Tensor", tensor)
        # safetensors refuses views sharing storage and non-contiguous tensors; a private contiguous CPU copy
        # of each tensor satisfies both without changing values.
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous() or (t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.contiguous().clone()
        out[name] = t
    return out


def _check_mask(attention_mask: object) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor):
        raise fail_type("attention_mask", "a Tensor[b, seq]", attention_mask)
    if attention_mask.dim() != 2:
        raise UserInputError(f"attention_mask must have shape [b, seq], got {list(attention_mask.shape)}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise fail_type("attention_mask", "an integer or bool tensor", attention_mask)
    if attention_mask.numel() and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise UserInputError("attention_mask must contain only 0 and 1, got other values")
    return attention_mask


def _store_records(meta: Mapping[str, Any], run_id: str, location: str) -> dict[str, Any]:
    """The store's own records of a run, normalised, with the totals recomputed over the complete batches.

    Raises:
        CorruptStoreFileError: the records are malformed (the message names ``location``, the meta.json path).
    """
    try:
        complete = sorted({int(i) for i in meta.get("complete_batches", [])})
        tokens = {str(k): int(v) for k, v in meta.get("batch_tokens", {}).items()}
        shapes = {str(k): [int(x) for x in v] for k, v in meta.get("batch_shapes", {}).items()}
        layer_dims = {str(k): int(v) for k, v in meta.get("layer_dims", {}).items()}
        layer_dtypes = {str(k): str(v) for k, v in meta.get("layer_dtypes", {}).items()}
        n_tokens = sum(tokens[str(i)] for i in complete)
        sample_count = sum(shapes[str(i)][0] for i in complete if str(i) in shapes)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise CorruptStoreFileError(
            f"{location} has malformed store records (complete_batches, batch_tokens, batch_shapes, layer_dims): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return {
        "run_id": run_id,
        "complete_batches": complete,
        "batch_tokens": tokens,
        "batch_shapes": shapes,
        "n_tokens": n_tokens,
        "sample_count": sample_count,
        "batch_count": len(complete),
        "layer_dims": layer_dims,
        "layer_dtypes": layer_dtypes,
    }


def _summarise(indices: list[int]) -> str:
    if not indices:
        return "none"
    if len(indices) <= 10:
        return str(indices)
    return f"{indices[:5]} ... {indices[-3:]} ({len(indices)} in all)"
