"""Reading and writing the files of the other formats: JSON, safetensors and weights-only ``torch.load``.

Every read names the file in its error; every write is atomic (temporary file, then rename). Nothing here unpickles
arbitrary objects: ``.pt`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mi_crow.store.atomic import atomic_write_bytes, atomic_write_text
from mi_crow.store.errors import CorruptStoreFileError, StoreKeyNotFoundError

__all__ = ["read_json", "read_safetensors", "read_torch_weights", "write_json", "write_safetensors", "write_torch"]


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        StoreKeyNotFoundError: no such file.
        CorruptStoreFileError: not valid JSON, or not an object.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise StoreKeyNotFoundError(f"missing file {str(path)!r}") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptStoreFileError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CorruptStoreFileError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file (on the CPU).

    Raises:
        StoreKeyNotFoundError / CorruptStoreFileError: missing, or not a safetensors file.
    """
    from safetensors.torch import load as load_safetensors

    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise StoreKeyNotFoundError(f"missing file {str(path)!r}") from None
    try:
        return dict(load_safetensors(data))
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise CorruptStoreFileError(f"cannot read {path} as safetensors: {exc}") from exc


def read_torch_weights(path: Path) -> dict[str, Any]:
    """A ``torch.save`` file read with ``weights_only=True`` (tensors, numbers, strings and containers only).

    Raises:
        StoreKeyNotFoundError: missing.
        CorruptStoreFileError: it holds pickled objects other than those (refused, never run), is truncated, or is
            not a dict.
    """
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise StoreKeyNotFoundError(f"missing file {str(path)!r}") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorruptStoreFileError(
            f"cannot load {path} with torch.load(weights_only=True) (no pickled objects allowed): {reason}"
        ) from exc
    if not isinstance(obj, dict):
        raise CorruptStoreFileError(f"{path} must hold a state dict (name -> tensor), got {type(obj).__name__}")
    return obj


def _clean(value: Any) -> Any:
    """JSON cannot hold NaN or infinities: they become None (readers of these formats expect plain numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: Any, *, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON atomically (non-finite floats become null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_clean(data), indent=indent, ensure_ascii=False, allow_nan=False))
    return path


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write tensors (contiguous CPU copies) as a safetensors file atomically."""
    from safetensors.torch import save as save_safetensors

    path.parent.mkdir(parents=True, exist_ok=True)
    compact = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    atomic_write_bytes(path, save_safetensors(compact, metadata=metadata))
    return path


def write_torch(path: Path, tensors: dict[str, Tensor]) -> Path:
    """Write a state dict of tensors with ``torch.save`` atomically (what ``torch.load(weights_only=True)`` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path
