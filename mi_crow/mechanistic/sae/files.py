"""The files of a saved SAE and where they live: ``sae_models/<sae_id>/`` in a store, or a plain folder.

Layout (the seed's, the same in both places)::

    <folder>/model.pt        the state dict W_enc, b_enc, W_dec, b_dec (tensors only; torch.load(weights_only=True))
    <folder>/config.json     sizes, dtype, mode, what the SAE was trained on
    <folder>/concepts.json   concept names and manipulations

Folders written by earlier versions hold ``model.safetensors`` instead of ``model.pt``; they still load.

`SaeFiles` gives one interface over both places (read/write/delete bytes by file name, and a location for error
messages), so saving and loading are written once. `state_to_bytes` / `state_from_bytes` are the only code that
encodes and decodes the weights.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mi_crow.store.base import Store
from mi_crow.store.errors import CorruptStoreFileError, StoreKeyNotFoundError
from mi_crow.store.local import atomic_write

__all__ = [
    "CONCEPTS_FILE",
    "CONFIG_FILE",
    "LEGACY_MODEL_FILE",
    "MODEL_FILE",
    "SaeFiles",
    "sae_key",
    "state_from_bytes",
    "state_to_bytes",
]

MODEL_FILE = "model.pt"
LEGACY_MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CONCEPTS_FILE = "concepts.json"


def sae_key(sae_id: str, name: str = "") -> str:
    """Store key of a file of a saved SAE: ``sae_models/<sae_id>/<name>``."""
    if not isinstance(sae_id, str) or not sae_id or "/" in sae_id or "\\" in sae_id or ".." in sae_id:
        raise ValueError(f"sae_id must be a non-empty name without '/', '\\\\' or '..', got {sae_id!r}")
    return f"sae_models/{sae_id}/{name}" if name else f"sae_models/{sae_id}"


class SaeFiles:
    """The folder of one saved SAE, in a store or on the filesystem.

    Build it with :meth:`in_store` or :meth:`in_folder`; then every file is addressed by its name (``"model.pt"``).
    """

    def __init__(self, store: Store | None, sae_id: str | None, folder: Path | None) -> None:
        self.store = store
        self.sae_id = sae_id
        self.folder = folder

    @classmethod
    def in_store(cls, store: Store, sae_id: str) -> SaeFiles:
        """``sae_models/<sae_id>/`` of ``store`` (``sae_id`` is checked)."""
        sae_key(sae_id)
        return cls(store, sae_id, None)

    @classmethod
    def in_folder(cls, folder: str | os.PathLike[str]) -> SaeFiles:
        """A plain folder."""
        return cls(None, None, Path(folder))

    def key(self, name: str = "") -> str:
        """Store key of ``name`` (store form only)."""
        assert self.sae_id is not None
        return sae_key(self.sae_id, name)

    def where(self, name: str = "") -> str:
        """Full location of file ``name`` (or of the folder) for messages."""
        if self.store is not None:
            return self.store.location(self.key(name))
        assert self.folder is not None
        return str(self.folder / name) if name else str(self.folder)

    def exists(self, name: str) -> bool:
        """Whether file ``name`` exists."""
        if self.store is not None:
            return self.store.exists(self.key(name))
        assert self.folder is not None
        return (self.folder / name).is_file()

    def read(self, name: str) -> bytes:
        """The bytes of file ``name``; a missing file raises `StoreKeyNotFoundError` (a ``FileNotFoundError``)
        naming its location."""
        if self.store is not None:
            return self.store.get_bytes(self.key(name))
        assert self.folder is not None
        path = self.folder / name
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StoreKeyNotFoundError(f"missing file {str(path)!r}") from None

    def write(self, name: str, data: bytes) -> None:
        """Write file ``name`` atomically (temporary file, then rename)."""
        if self.store is not None:
            self.store.put_bytes(self.key(name), data)
            return
        assert self.folder is not None

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                handle.write(data)

        atomic_write(self.folder / name, write)

    def delete(self, name: str) -> None:
        """Remove file ``name`` if it exists."""
        if self.store is not None:
            self.store.delete(self.key(name))
            return
        assert self.folder is not None
        (self.folder / name).unlink(missing_ok=True)

    def concepts_target(self) -> tuple[Any, str | None]:
        """``(target, sae_id)`` for ``sae.concepts.save`` / ``load``: the store and the id, or the file path."""
        if self.store is not None:
            return self.store, self.sae_id
        assert self.folder is not None
        return self.folder / CONCEPTS_FILE, None


def state_to_bytes(tensors: dict[str, Tensor]) -> bytes:
    """Encode a state dict (name -> tensor) as a ``torch.save`` file that ``torch.load(weights_only=True)`` reads.

    Each tensor is saved with its own compact storage (a view of a larger buffer would otherwise drag the whole
    buffer into the file).
    """
    compact = {}
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu")
        if not t.is_contiguous() or t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone(memory_format=torch.contiguous_format)
        compact[name] = t
    buffer = io.BytesIO()
    torch.save(compact, buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes, where: str, *, safetensors: bool = False) -> dict[str, Tensor]:
    """Decode a weights file: a ``torch.save`` state dict read with ``weights_only=True`` (or, for legacy folders,
    a safetensors file). Never runs pickled code.

    Args:
        data: the file's bytes.
        where: the file's location, named in every error.
        safetensors: decode as safetensors instead.

    Returns:
        name -> CPU tensor.

    Raises:
        CorruptStoreFileError: the file does not decode with ``weights_only=True`` (it holds pickled objects, or is
            truncated), or it holds anything but a flat mapping of names to tensors.
    """
    try:
        if safetensors:
            from safetensors.torch import load as load_safetensors

            obj: Any = load_safetensors(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...; safetensors its own types
        raise CorruptStoreFileError(
            f"cannot load {where} as a state dict of tensors (read with weights_only=True, no pickled objects "
            f"allowed): {_short_reason(exc)}"
        ) from exc
    if not isinstance(obj, dict):
        raise CorruptStoreFileError(
            f"{where} must hold a state dict (name -> tensor), got {type(obj).__name__}"
        )
    bad = [f"{name!r}: {type(value).__name__}" for name, value in obj.items()
           if not isinstance(name, str) or not isinstance(value, Tensor)]
    if bad:
        raise CorruptStoreFileError(
            f"{where} must hold only tensors (name -> tensor), got non-tensor entries {', '.join(bad[:5])}"
        )
    return obj


def _short_reason(exc: Exception) -> str:
    """The line of torch's long weights-only refusal that says what was refused (the whole text otherwise)."""
    text = str(exc)
    for line in text.splitlines():
        if "WeightsUnpickler error" in line:
            return line.strip().split(". Please use")[0]
    return text
