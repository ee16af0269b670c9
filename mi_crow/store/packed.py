"""Store format 2: packed, padding-free token vectors with O(1) per-batch completion markers.

Layout of a format-2 activation run (the seed's folders; see :mod:`mi_crow.store.layout`)::

    activations/<run_id>/meta.json                              written when the save starts ("status": "writing")
                                                                and once when it ends ("status": "complete")
    activations/<run_id>/index.json                             per-batch records, written once at the end
    activations/<run_id>/batch_<i>/<layer>/activations.safetensors   "activations" [tokens, d] in the storage dtype
    activations/<run_id>/batch_<i>/extra.safetensors            "token_ids" [tokens] int32, "offsets" [texts + 1]
                                                                int64, "text_ids" [texts] int64
    activations/<run_id>/batch_<i>/complete.json                the batch's completion marker, written last

Text ``t`` of a batch (global dataset index ``text_ids[t]``) is tokens ``offsets[t]:offsets[t + 1]`` of every layer
file and of ``token_ids``, in position order: token ``offsets[t] + j`` is position ``j`` of that text. Nothing else
is stored: bytes on disk are tokens × d × dtype size per layer plus 4 bytes of token id per token and the headers.

Saving a batch writes its files and then its marker: one small file, whatever the run's size (format 1 rewrote the
whole ``meta.json`` per batch). A batch without a marker does not exist for readers (it was in flight when the writer
died; a resumed save rewrites it). While ``meta.json`` says ``"writing"`` (a save in progress or killed), readers
rebuild the run's records from the markers; once it says ``"complete"`` they read ``index.json``. A marker that
disagrees with its files (missing file, other token count or width) is a :class:`CorruptStoreFileError` naming both.
"""

from __future__ import annotations

from typing import Any

import torch

from mi_crow.store.errors import CorruptStoreFileError

__all__ = [
    "FORMAT_KEY",
    "INDEX_FILE",
    "MARKER_FILE",
    "PACKED_FORMAT",
    "STORAGE_DTYPES",
    "TOKENS_FILE",
    "pack_padded",
    "unpack_to_padded",
]

#: Key of ``meta.json`` holding the store format (absent: format 1).
FORMAT_KEY = "store_format"
PACKED_FORMAT = 2
MARKER_FILE = "complete.json"
TOKENS_FILE = "extra.safetensors"  # the name format 1 gives a batch's extra tensors (input_ids)
INDEX_FILE = "index.json"
#: Storage dtypes a format-2 run may use.
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Per-batch record fields (marker and index columns).
RECORD_FIELDS = ("batch_index", "n_tokens", "n_texts", "max_len", "rank", "forward_batches")


def pack_padded(acts: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([real tokens, d], offsets [b + 1])`` from right-padded ``acts [b, seq, d]`` and ``mask [b, seq]``.

    Raises:
        ValueError: a row of the mask is not a run of ones followed by zeros (left padding or holes): positions
            could not be recovered from the packed form.
    """
    lengths = mask.sum(dim=1).to(torch.int64)
    seq = mask.shape[1]
    prefix = torch.arange(seq, device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, mask.bool()):
        raise ValueError("attention_mask must be right-padded (each row ones then zeros) to be packed")
    offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(lengths.cpu(), 0, out=offsets[1:])
    return acts[prefix], offsets


def unpack_to_padded(packed: torch.Tensor, offsets: torch.Tensor, fill: float | int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(padded [texts, max_len, *rest], mask [texts, max_len] int64)`` from ``packed [tokens, *rest]``.

    Positions past a text's end hold ``fill``.
    """
    lengths = offsets[1:] - offsets[:-1]
    n = lengths.numel()
    seq = int(lengths.max()) if n else 0
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(torch.int64)
    out = packed.new_full((n, seq, *packed.shape[1:]), fill)
    out[mask.bool()] = packed
    return out, mask


def check_record(record: Any, location: str, batch_index: int | None = None) -> dict[str, Any]:
    """A marker's (or index row's) record, normalised; malformed -> ``CorruptStoreFileError`` naming ``location``."""
    try:
        out = {
            "batch_index": int(record["batch_index"]),
            "n_tokens": int(record["n_tokens"]),
            "n_texts": int(record["n_texts"]),
            "max_len": int(record["max_len"]),
            "rank": int(record.get("rank", 0)),
            "forward_batches": [int(b) for b in record.get("forward_batches", [])],
        }
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise CorruptStoreFileError(
            f"{location} is not a valid batch completion record ({type(exc).__name__}: {exc}); expected "
            f"{list(RECORD_FIELDS)}"
        ) from exc
    if batch_index is not None and out["batch_index"] != batch_index:
        raise CorruptStoreFileError(
            f"{location} is the marker of batch {out['batch_index']} but lies in the folder of batch {batch_index}")
    if min(out["n_tokens"], out["n_texts"], out["max_len"]) < 0:
        raise CorruptStoreFileError(f"{location} has negative counts: {out}")
    return out


def records_to_index(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Column form of the per-batch records, as written to ``index.json``."""
    return {field: [r[field] for r in records] for field in RECORD_FIELDS}


def index_to_records(index: Any, location: str) -> list[dict[str, Any]]:
    """The per-batch records from ``index.json``'s columns (malformed -> ``CorruptStoreFileError``)."""
    try:
        columns = [index[field] for field in RECORD_FIELDS]
        if len({len(c) for c in columns}) != 1:
            raise ValueError("columns of different lengths")
    except (TypeError, KeyError, ValueError) as exc:
        raise CorruptStoreFileError(f"{location} is not a valid run index: {type(exc).__name__}: {exc}") from exc
    return [check_record(dict(zip(RECORD_FIELDS, row)), location) for row in zip(*columns)]
