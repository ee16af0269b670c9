"""Atomic file writes for the whole package: write a temporary file beside the target, then rename it into place.

A reader (or a crash) sees the previous file or the complete new one, never a half-written file. The temporary file
is created with ``open(..., O_CREAT | O_EXCL, 0o666)``, so the kernel applies the process umask (and any default
ACL of the folder) exactly as for a file written with plain ``open``: under umask 022 the result is ``0644``, under
027 it is ``0640``. (``tempfile.mkstemp`` would make every file ``0600`` whatever the umask, which makes a store on
a shared filesystem unreadable to collaborators.)

Temporary names start with ``.`` and end with ``.tmp``; stores never list such names.

A write that fails because the filesystem is full raises ``OSError(errno.ENOSPC, "no space left on device ...")``
naming the target, whatever library did the writing (safetensors and ``torch.save`` report a full disk with their
own messages), and the temporary file is removed.

This module imports only the standard library, so any layer of mi_crow (store, concept exports, the report, the
default-model cache) can use it.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "TMP_SUFFIX",
    "atomic_directory",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_directory",
    "is_no_space_error",
]

TMP_SUFFIX = ".tmp"

# Phrases with which libraries that do their own I/O (safetensors' Rust writer, for one) report a full disk.
_NO_SPACE_PHRASES = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def _temp_name(final: Path) -> Path:
    # pid + random token: unique across processes and threads without a shared counter.
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


def is_no_space_error(exc: BaseException, directory: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``exc`` means that the filesystem (or the user's quota) is full.

    ``OSError`` with ``ENOSPC``/``EDQUOT`` is recognised directly, as are the messages of writers that wrap the
    error (safetensors). For errors that say nothing useful (``torch.save`` reports a short write as an assertion
    about stream positions), ``directory`` is checked: no free block left there counts as a full disk.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(phrase in str(current).lower() for phrase in _NO_SPACE_PHRASES):
            return True
        current = current.__cause__ or current.__context__
    if directory is not None:
        try:
            return os.statvfs(directory).f_bavail == 0
        except (OSError, AttributeError):  # AttributeError: no statvfs on Windows
            return False
    return False


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened (Windows)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    write_fn: Callable[[str], None],
    *,
    fsync: bool = False,
) -> Path:
    """Create or replace ``path`` by calling ``write_fn(tmp_path)`` on a temporary file beside it, then renaming it.

    The temporary file already exists (empty) when ``write_fn`` is called; ``write_fn`` writes the whole content to
    it (opening it by name, so libraries that only take paths work). The file ends up with mode ``0o666 & ~umask``.
    The parent folder is created if needed. On any error (``KeyboardInterrupt`` included) the temporary file is
    removed and the previous ``path``, if any, is left untouched.

    Args:
        path: the file to write.
        write_fn: writes the content to the path it is given.
        fsync: flush the file to disk before the rename and the folder after it (survives power loss, not only
            a crash of the process).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: with ``errno.ENOSPC`` and a message naming ``path`` when the filesystem is full; any other error of
            ``write_fn`` or of the filesystem as it is.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    # O_EXCL: never write through a file (or a symlink) someone else put at this name.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # what the kernel made of 0o666 with the umask and folder ACLs
    finally:
        os.close(fd)
    try:
        write_fn(str(tmp))
        # Some writers (safetensors' save_file) replace the file with one of their own, created 0600.
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, Exception) and is_no_space_error(exc, final.parent):
            raise OSError(errno.ENOSPC, f"no space left on device while writing {final}", str(final)) from exc
        raise
    if fsync:
        fsync_directory(final.parent)
    return final


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview, *,
                       fsync: bool = False) -> Path:
    """Atomically write ``data`` to ``path`` (see :func:`atomic_write`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    return atomic_write(path, write, fsync=fsync)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8",
                      fsync: bool = False) -> Path:
    """Atomically write ``text`` to ``path`` in ``encoding`` (see :func:`atomic_write`); newlines are kept as given."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def atomic_directory(path: str | os.PathLike[str], fill_fn: Callable[[Path], None]) -> Path:
    """Create the folder ``path`` by calling ``fill_fn(tmp_dir)`` on a temporary folder beside it, then renaming it.

    The folder gets mode ``0o777 & ~umask`` like one made with ``mkdir``. If another process created ``path`` in the
    meantime, its folder is kept and ours is discarded (both were built from the same input). On any error the
    temporary folder is removed.

    Args:
        path: the folder to create; must not exist yet.
        fill_fn: writes the folder's content into the folder it is given.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    tmp.mkdir(mode=0o777)
    try:
        fill_fn(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # The target exists: another process finished the same work first.
            if not final.is_dir():
                raise
    except BaseException as exc:
        if isinstance(exc, Exception) and is_no_space_error(exc, final.parent):
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(errno.ENOSPC, f"no space left on device while writing {final}", str(final)) from exc
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
