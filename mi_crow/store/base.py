"""The abstract :class:`Store`: a key/value view of a directory-like backend plus the activation-run layout.

Backends implement five primitives (``put_bytes``, ``get_bytes``, ``exists``, ``list``, ``delete``) and ``location``;
everything else (JSON, safetensors, ``torch.save`` files, activation runs and the streaming reader) is built on them
here, so a new backend (an object store, a shared filesystem) gets the whole API by implementing the primitives.

Layout of an activation run (keys are ``/``-separated, relative to the store root)::

    activations/<run_id>/meta.json
    activations/<run_id>/batch_<i>/<layer>/activations.safetensors    tensors "activations" [b, seq, d]
                                                                       and "attention_mask" [b, seq]
    activations/<run_id>/batch_<i>/extra.safetensors                  optional per-batch tensors (e.g. input_ids)

A batch counts only once ``meta.json`` lists it in ``complete_batches``; that mark is written after every file of
the batch, so an interrupted write leaves a batch that readers do not see.
"""

from __future__ import annotations

import io
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from mi_crow.store.errors import CorruptStoreFileError, RunNotFoundError, StoreKeyNotFoundError

if TYPE_CHECKING:
    from mi_crow.store.reader import ActivationReader

logger = logging.getLogger(__name__)

ACTIVATIONS_PREFIX = "activations"
META_FILE = "meta.json"
ACTIVATIONS_FILE = "activations.safetensors"
EXTRA_FILE = "extra.safetensors"

#: Keys of ``meta.json`` that the store maintains itself; values given for them in ``write_run_meta`` are ignored.
RESERVED_META_KEYS = ("run_id", "complete_batches", "batch_tokens", "batch_shapes", "n_tokens", "layer_dims",
                      "layer_dtypes", "sample_count", "batch_count")


class ActivationBatch(NamedTuple):
    """One stored batch of one layer.

    Attributes:
        activations: ``[batch, seq, d]`` hidden states as written.
        attention_mask: ``[batch, seq]`` mask as written (1 = real token, 0 = padding).
    """

    activations: torch.Tensor
    attention_mask: torch.Tensor


def _check_segment(value: object, argument: str) -> str:
    """Validate a name used as one path segment (run id, layer name, sae id)."""
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str, got {type(value).__name__} ({value!r})")
    if value in ("", ".", "..") or "/" in value or "\\" in value or "\x00" in value or value.startswith("."):
        raise ValueError(
            f"{argument} must be a non-empty name without '/', '\\' or a leading '.', usable as a folder name; "
            f"got {value!r}"
        )
    return value


def _check_batch_index(value: object, argument: str = "batch_index") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__} ({value!r})")
    if value < 0:
        raise ValueError(f"{argument} must be >= 0, got {value}")
    return value


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
            raise TypeError(f"put_json: obj for key {key!r} is not JSON-serialisable: {exc}") from exc
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

    # ------------------------------------------------------------------ activation runs
    @staticmethod
    def run_key(run_id: str, *parts: str) -> str:
        """Key of ``parts`` inside the folder of activation run ``run_id``."""
        return "/".join((ACTIVATIONS_PREFIX, run_id) + parts)

    def batch_key(self, run_id: str, batch_index: int, layer: str) -> str:
        """Key of the safetensors file of ``layer`` in batch ``batch_index`` of run ``run_id``."""
        return self.run_key(run_id, f"batch_{batch_index}", layer, ACTIVATIONS_FILE)

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
        return self.exists(self.run_key(_check_segment(run_id, "run_id"), META_FILE))

    def read_run_meta(self, run_id: str) -> dict[str, Any]:
        """Return the parsed ``meta.json`` of run ``run_id``.

        Besides what the writer stored, it holds the store's own records: ``complete_batches`` (sorted list of
        batch indices), ``batch_tokens`` (batch index as str -> number of real tokens), ``batch_shapes`` (batch index
        as str -> ``[batch, seq]``), ``n_tokens`` (real tokens over complete batches), ``layer_dims`` (layer -> d)
        and ``layer_dtypes`` (layer -> dtype name).

        Raises:
            RunNotFoundError: the run has no ``meta.json`` (the message names the run id and the store location).
        """
        _check_segment(run_id, "run_id")
        key = self.run_key(run_id, META_FILE)
        if not self.exists(key):
            runs = self.list_runs()
            raise RunNotFoundError(
                f"activation run {run_id!r} not found in store {self.location('')}: no {self.location(key)}; "
                f"existing runs: {runs if runs else 'none'}"
            )
        meta = self.get_json(key)
        if not isinstance(meta, dict):
            raise CorruptStoreFileError(f"{self.location(key)} must hold a JSON object, got {type(meta).__name__}")
        return meta

    def write_run_meta(self, run_id: str, meta: Mapping[str, Any]) -> None:
        """Create or replace the user part of run ``run_id``'s ``meta.json`` (atomic).

        The store's own records (:data:`RESERVED_META_KEYS`: completed batches, token counts, layer widths) are kept
        from the existing file; values given for them in ``meta`` are ignored, so a resumed save can rewrite its
        metadata without forgetting which batches are done.

        Args:
            run_id: run id (a folder name: no ``/``, no leading ``.``).
            meta: JSON-serialisable mapping (model id, layers, dtype, dataset description, ...).
        """
        _check_segment(run_id, "run_id")
        if not isinstance(meta, Mapping):
            raise TypeError(f"meta must be a mapping (dict), got {type(meta).__name__}")
        existing = self.read_run_meta(run_id) if self.run_exists(run_id) else {}
        merged: dict[str, Any] = {k: v for k, v in meta.items() if k not in RESERVED_META_KEYS}
        merged.update(_store_records(existing, run_id))
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
        _check_segment(run_id, "run_id")
        _check_batch_index(batch_index)
        mask = _check_mask(attention_mask)
        if not isinstance(activations, Mapping) or len(activations) == 0:
            raise ValueError(f"activations must be a non-empty dict layer name -> Tensor[b, seq, d], got {activations!r}")
        meta = self.read_run_meta(run_id) if self.run_exists(run_id) else {"run_id": run_id}
        layer_dims = dict(meta.get("layer_dims", {}))
        layer_dtypes = dict(meta.get("layer_dtypes", {}))
        if meta.get("complete_batches") and set(activations) != set(layer_dims):
            # Readers expect every complete batch to hold every layer of the run.
            raise ValueError(
                f"activations must hold the same layers as the earlier batches of run {run_id!r}: "
                f"expected {sorted(layer_dims)}, got {sorted(activations)}"
            )
        for layer, tensor in activations.items():
            _check_segment(layer, "layer name")
            if layer == EXTRA_FILE:
                raise ValueError(f"layer name {layer!r} is reserved for the batch's extra tensors")
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"activations[{layer!r}] must be a Tensor, got {type(tensor).__name__}")
            if tensor.dim() != 3 or tuple(tensor.shape[:2]) != tuple(mask.shape):
                raise ValueError(
                    f"activations[{layer!r}] must have shape [b, seq, d] matching attention_mask "
                    f"{list(mask.shape)}, got {list(tensor.shape)}"
                )
            d = int(tensor.shape[2])
            if layer in layer_dims and int(layer_dims[layer]) != d:
                raise ValueError(
                    f"activations[{layer!r}] has width d={d} but earlier batches of run {run_id!r} have "
                    f"d={layer_dims[layer]}"
                )
            layer_dims[layer] = d
            layer_dtypes[layer] = str(tensor.dtype).removeprefix("torch.")
        if extra is not None:
            if not isinstance(extra, Mapping) or not all(isinstance(v, torch.Tensor) for v in extra.values()):
                raise TypeError(f"extra must be None or a dict name -> Tensor, got {type(extra).__name__}")

        header = {"run_id": run_id, "batch_index": str(batch_index)}
        for layer, tensor in activations.items():
            self.put_tensors(self.batch_key(run_id, batch_index, layer),
                             {"activations": tensor, "attention_mask": mask}, metadata={**header, "layer": layer})
        if extra:
            self.put_tensors(self.run_key(run_id, f"batch_{batch_index}", EXTRA_FILE), dict(extra), metadata=header)

        # Re-read right before the update so metadata written meanwhile (write_run_meta) is not lost.
        meta = self.read_run_meta(run_id) if self.run_exists(run_id) else {"run_id": run_id}
        records = _store_records(meta, run_id)
        complete = set(records["complete_batches"]) | {batch_index}
        records["complete_batches"] = sorted(complete)
        records["batch_tokens"][str(batch_index)] = int(mask.sum().item())
        records["batch_shapes"][str(batch_index)] = [int(mask.shape[0]), int(mask.shape[1])]
        records["layer_dims"] = {**records["layer_dims"], **layer_dims}
        records["layer_dtypes"] = {**records["layer_dtypes"], **layer_dtypes}
        records["n_tokens"] = sum(int(records["batch_tokens"][str(i)]) for i in records["complete_batches"])
        records.update(_counts(records))
        meta.update(records)
        self.put_json(self.run_key(run_id, META_FILE), meta)

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
            raise ValueError(
                f"batch_index {batch_index} is not a complete batch of run {run_id!r} "
                f"(complete batches: {_summarise(complete)})"
            )
        layers = meta.get("layer_dims", {})
        if layer not in layers:
            raise ValueError(f"layer {layer!r} is not stored in run {run_id!r}; stored layers: {sorted(layers)}")

    def load_batch(self, run_id: str, batch_index: int, layer: str) -> ActivationBatch:
        """Load batch ``batch_index`` of ``layer`` in run ``run_id``.

        Returns:
            :class:`ActivationBatch` with ``activations [batch, seq, d]`` and ``attention_mask [batch, seq]`` exactly
            as written.

        Raises:
            ValueError: the batch is not complete or the layer is not in the run.
            StoreKeyNotFoundError / CorruptStoreFileError: the file is missing or unreadable (message names the path).
        """
        _check_segment(run_id, "run_id")
        _check_batch_index(batch_index)
        _check_segment(layer, "layer")
        meta = self.read_run_meta(run_id)
        self._check_complete(run_id, batch_index, layer, meta)
        return self._load_layer_file(run_id, batch_index, layer)

    def _load_layer_file(self, run_id: str, batch_index: int, layer: str) -> ActivationBatch:
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
        _check_segment(run_id, "run_id")
        _check_batch_index(batch_index)
        meta = self.read_run_meta(run_id)
        if batch_index not in [int(i) for i in meta.get("complete_batches", [])]:
            raise ValueError(f"batch_index {batch_index} is not a complete batch of run {run_id!r}")
        key = self.run_key(run_id, f"batch_{batch_index}", EXTRA_FILE)
        return self.get_tensors(key) if self.exists(key) else {}

    def delete_run(self, run_id: str) -> None:
        """Delete activation run ``run_id`` and all its files."""
        self.delete(self.run_key(_check_segment(run_id, "run_id")))

    def activation_reader(
        self,
        run_id: str,
        layer: str,
        batch_size: int,
        *,
        shuffle: bool = True,
        buffer_tokens: int = 2**18,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        drop_last: bool = True,
        epochs: int | None = 1,
        prefetch: bool = False,
    ) -> ActivationReader:
        """Stream run ``run_id``'s ``layer`` as padding-free token vectors in batches (see ``ActivationReader``).

        Args:
            run_id: activation run id.
            layer: layer name as stored.
            batch_size: tokens per batch.
            shuffle: permute files per epoch and mix tokens across files in the shuffle buffer.
            buffer_tokens: shuffle buffer size in tokens; bounds memory.
            seed: seed of all permutations (same seed, same stream).
            dtype: dtype of the yielded tensors (``None`` = as stored).
            drop_last: drop each epoch's last batch when it is short.
            epochs: passes over the run, ``None`` = endless.
            prefetch: load the next buffer in a background thread.

        Returns:
            An :class:`~mi_crow.store.reader.ActivationReader`: an iterable of ``Tensor[batch_size, d_in]`` with
            ``n_tokens``, ``d_in``, ``state_dict()`` and ``load_state_dict()``.
        """
        from mi_crow.store.reader import ActivationReader

        return ActivationReader(self, run_id, layer, batch_size, shuffle=shuffle, buffer_tokens=buffer_tokens,
                                seed=seed, dtype=dtype, drop_last=drop_last, epochs=epochs, prefetch=prefetch)


def _prepare_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
                     ) -> dict[str, torch.Tensor]:
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError(f"tensors must be a non-empty dict name -> Tensor, got {tensors!r}")
    if metadata is not None and (not isinstance(metadata, Mapping)
                                 or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError(f"metadata must be a dict str -> str, got {metadata!r}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] must be a Tensor, got {type(tensor).__name__}")
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
        raise TypeError(f"attention_mask must be a Tensor[b, seq], got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must have shape [b, seq], got {list(attention_mask.shape)}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be an integer or bool tensor, got dtype {attention_mask.dtype}")
    if attention_mask.numel() and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must contain only 0 and 1")
    return attention_mask


def _store_records(meta: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    records = {
        "run_id": run_id,
        "complete_batches": sorted(int(i) for i in meta.get("complete_batches", [])),
        "batch_tokens": {str(k): int(v) for k, v in meta.get("batch_tokens", {}).items()},
        "batch_shapes": {str(k): list(v) for k, v in meta.get("batch_shapes", {}).items()},
        "n_tokens": int(meta.get("n_tokens", 0)),
        "layer_dims": dict(meta.get("layer_dims", {})),
        "layer_dtypes": dict(meta.get("layer_dtypes", {})),
    }
    records.update(_counts(records))
    return records


def _counts(records: Mapping[str, Any]) -> dict[str, int]:
    """``sample_count`` (texts in the complete batches) and ``batch_count`` (complete batches)."""
    complete = records["complete_batches"]
    shapes = records["batch_shapes"]
    return {"sample_count": sum(int(shapes[str(i)][0]) for i in complete if str(i) in shapes),
            "batch_count": len(complete)}


def _summarise(indices: list[int]) -> str:
    if not indices:
        return "none"
    if len(indices) <= 10:
        return str(indices)
    return f"{indices[:5]} ... {indices[-3:]} ({len(indices)} in all)"
