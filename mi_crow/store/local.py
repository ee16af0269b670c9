"""``LocalStore``: a :class:`~mi_crow.store.base.Store` on a local (or mounted) directory."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import save_file as _st_save_file

from mi_crow.store.atomic import TMP_SUFFIX, atomic_write, is_no_space_error
from mi_crow.store.base import Store, _prepare_tensors
from mi_crow.store.errors import CorruptStoreFileError, StoreKeyNotFoundError, StoreNotWritableError, StoreWriteError
from mi_crow.store.layout import ACTIVATIONS_PREFIX, LOCK_FILE, META_FILE
from mi_crow.store.lock import RunLock
from mi_crow.store.packed import MARKER_FILE
from mi_crow.validation import fail, fail_type

__all__ = ["LocalStore", "atomic_write"]

logger = logging.getLogger(__name__)


def _is_hidden(name: str) -> bool:
    # Temporary files of in-flight writes and lock files start with "."; they are never part of the store's content.
    return name.startswith(".")


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
            raise fail_type("base_path", "a str or os.PathLike", base_path)
        path = Path(base_path).expanduser()
        if path.exists() and not path.is_dir():
            raise StoreNotWritableError(f"base_path {str(path)!r} exists and is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreNotWritableError(
                f"base_path {str(path)!r} cannot be created as a store directory: {exc}") from exc
        # os.access alone misses read-only mounts and is always True for root, so probe with a real write.
        try:
            probe = path / f".write_probe-{os.getpid()}{TMP_SUFFIX}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
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
            raise fail_type("key", "a str", key)
        if key in ("", "/"):
            return self.base_path
        parts = key.strip("/").split("/")
        if key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
            raise fail("key", "a relative '/'-separated path without '.', '..' or empty parts", key)
        if any(p.startswith(".") for p in parts):
            # Names starting with "." are reserved for temporary files of in-flight writes (never listed).
            raise fail("key", "a path without parts starting with '.' (reserved for temporary and lock files)", key)
        return self.base_path.joinpath(*parts)

    def location(self, key: str) -> str:
        return str(self.path(key))

    # ------------------------------------------------------------------ atomic write
    def _atomic_write(self, key: str, write: Callable[[str], None]) -> None:
        final = self.path(key)
        if final == self.base_path:
            raise fail("key", "the key of a file, not the store root", key)
        try:
            atomic_write(final, write, fsync=self.fsync)
        except OSError as exc:
            if is_no_space_error(exc):
                raise StoreWriteError(
                    f"no space left on device writing {final} (store {self.base_path}): the file was not written; "
                    "everything written before is intact. Free some space and re-run to continue."
                ) from exc
            raise

    # ------------------------------------------------------------------ locks
    def lock(self, folder: str, *, what: str = "", purpose: str = "", timeout: float = 0.0) -> RunLock:
        """A :class:`~mi_crow.store.lock.RunLock` on ``<folder>/.lock`` (see :meth:`Store.lock_run`)."""
        directory = self.path(folder)
        if directory == self.base_path:
            raise fail("folder", "the key of a folder inside the store, not the store root", folder)
        return RunLock(directory / LOCK_FILE, what=what or f"folder {directory}", purpose=purpose, timeout=timeout)

    # ------------------------------------------------------------------ primitives
    def put_bytes(self, key: str, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise fail_type("data", "bytes", data)

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
            raise fail("prefix", "a folder or file inside the store (delete: '' would delete the whole store; "
                                 "delete its folders one by one)", prefix)
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

    def _marked_batches(self, run_id: str) -> list[int]:
        # One scandir of the run folder and one stat per batch folder, instead of walking every layer folder.
        root = self.path(self.run_key(run_id))
        found = []
        try:
            entries = list(os.scandir(root))
        except FileNotFoundError:
            return []
        for entry in entries:
            name = entry.name
            if name.startswith("batch_") and name[6:].isdigit() and os.path.isfile(
                    os.path.join(entry.path, MARKER_FILE)):
                found.append(int(name[6:]))
        return sorted(found)

    def list_runs(self) -> list[str]:
        root = self.path(ACTIVATIONS_PREFIX)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if not _is_hidden(p.name) and (p / META_FILE).is_file())
