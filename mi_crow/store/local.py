"""``LocalStore``: a :class:`~mi_crow.store.base.Store` on a local (or mounted) directory."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import save_file as _st_save_file

from mi_crow.store.base import ACTIVATIONS_PREFIX, META_FILE, Store, _prepare_tensors
from mi_crow.store.errors import CorruptStoreFileError, StoreKeyNotFoundError, StoreNotWritableError

logger = logging.getLogger(__name__)

_TMP_SUFFIX = ".tmp"


def _is_hidden(name: str) -> bool:
    # Temporary files of in-flight writes start with "." (see _atomic_write); they are never part of the store.
    return name.startswith(".")


def atomic_write(final: Path, write: Callable[[str], None], *, fsync: bool = False) -> None:
    """Create ``final`` by calling ``write(tmp)`` on a temporary file beside it, then renaming it into place.

    A crash never leaves a half-written file that looks valid: readers see the old file or the complete new one,
    and the temporary file is removed on any error. The parent folder is created if needed.

    Args:
        final: the file to write.
        write: writes the whole content to the path it is given.
        fsync: flush the temporary file to disk before the rename.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=_TMP_SUFFIX, dir=final.parent)
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        # Also on KeyboardInterrupt: the temporary file is not a valid file, never leave it around.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class LocalStore(Store):
    """Store rooted at a directory; keys map to files below it.

    Writes go to a temporary file in the destination folder, are flushed and fsync'ed, then renamed over the
    destination with ``os.replace`` (atomic on POSIX and Windows), so a crash leaves either the old or the new file.

    Args:
        base_path: root directory; created (with parents) if missing.
        fsync: fsync files and folders after writing (protects against power loss, not only process crashes).

    Raises:
        StoreNotWritableError: ``base_path`` cannot be created or is not writable (the message names the path).
    """

    def __init__(self, base_path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        if not isinstance(base_path, (str, os.PathLike)):
            raise TypeError(f"base_path must be a str or os.PathLike, got {type(base_path).__name__} ({base_path!r})")
        path = Path(base_path).expanduser()
        if path.exists() and not path.is_dir():
            raise StoreNotWritableError(f"base_path {str(path)!r} exists and is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreNotWritableError(f"base_path {str(path)!r} cannot be created as a store directory: {exc}") from exc
        # os.access alone misses read-only mounts and is always True for root, so probe with a real write.
        try:
            fd, probe = tempfile.mkstemp(prefix=".write_probe-", suffix=_TMP_SUFFIX, dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StoreNotWritableError(f"base_path {str(path)!r} is not writable: {exc}") from exc
        self.base_path: Path = path.resolve()
        self.fsync = bool(fsync)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.base_path)!r})"

    # ------------------------------------------------------------------ paths
    def path(self, key: str) -> Path:
        """Filesystem path of ``key`` (``""`` is the base directory).

        Raises:
            ValueError: the key is absolute, contains ``..``/``.``/empty parts or backslashes, or a part starts
                with ``.`` (reserved for temporary files).
        """
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__} ({key!r})")
        if key in ("", "/"):
            return self.base_path
        parts = key.strip("/").split("/")
        if key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"key must be a relative '/'-separated path without '.', '..' or empty parts, got {key!r}")
        if any(p.startswith(".") for p in parts):
            # Names starting with "." are reserved for temporary files of in-flight writes (never listed).
            raise ValueError(f"key must not have a part starting with '.', got {key!r}")
        return self.base_path.joinpath(*parts)

    def location(self, key: str) -> str:
        return str(self.path(key))

    # ------------------------------------------------------------------ atomic write
    def _fsync_dir(self, directory: Path) -> None:
        if not self.fsync or os.name == "nt":
            return
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _atomic_write(self, key: str, write: Callable[[str], None]) -> None:
        final = self.path(key)
        if final == self.base_path:
            raise ValueError("key must name a file, got the store root ''")
        atomic_write(final, write, fsync=self.fsync)
        self._fsync_dir(final.parent)

    # ------------------------------------------------------------------ primitives
    def put_bytes(self, key: str, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                handle.write(data)

        self._atomic_write(key, write)

    def get_bytes(self, key: str) -> bytes:
        path = self.path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise StoreKeyNotFoundError(f"no file {str(path)!r} in store {str(self.base_path)!r}") from exc

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def list(self, prefix: str = "") -> list[str]:
        root = self.path(prefix)
        if root.is_file():
            return [] if _is_hidden(root.name) else [prefix.strip("/")]
        if not root.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
            rel = Path(dirpath).relative_to(self.base_path)
            for name in filenames:
                if not _is_hidden(name):
                    keys.append((rel / name).as_posix())
        return sorted(keys)

    def delete(self, prefix: str) -> None:
        path = self.path(prefix)
        if path == self.base_path:
            raise ValueError("delete: prefix '' would delete the whole store; delete its folders one by one")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

    # ------------------------------------------------------------------ faster typed paths
    def put_tensors(self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                    ) -> None:
        prepared = _prepare_tensors(tensors, metadata)
        # Writing straight to the temporary file avoids holding a second, serialised copy in memory.
        self._atomic_write(key, lambda tmp: _st_save_file(prepared, tmp, metadata=dict(metadata) if metadata else None))

    def get_tensors(self, key: str) -> dict[str, torch.Tensor]:
        path = self.path(key)
        if not path.is_file():
            raise StoreKeyNotFoundError(f"no file {str(path)!r} in store {str(self.base_path)!r}")
        try:
            return _st_load_file(path)
        except Exception as exc:  # safetensors raises its own error types for every decoding failure
            raise CorruptStoreFileError(f"corrupt safetensors file {str(path)!r}: {exc}") from exc

    def list_runs(self) -> list[str]:
        root = self.path(ACTIVATIONS_PREFIX)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if not _is_hidden(p.name) and (p / META_FILE).is_file())
