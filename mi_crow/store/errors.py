"""Exceptions raised by stores.

Each error is a :class:`mi_crow.errors.StoreError` (so the CLI reports it as one line) and also subclasses the
built-in exception a caller would naturally catch (``FileNotFoundError`` for a missing key, ``ValueError`` for a
corrupt file, ``PermissionError`` for a directory that cannot be written, ``OSError`` for a full disk,
``BlockingIOError`` for a run locked by another process), so code that does not know about mi_crow still handles
them sensibly. Every message names the file or folder concerned.
"""

from __future__ import annotations

from mi_crow.errors import ResourceBusyError, StoreError

__all__ = [
    "CorruptStoreFileError",
    "ResourceBusyError",
    "RunNotFoundError",
    "StoreError",
    "StoreKeyNotFoundError",
    "StoreNotWritableError",
    "StoreWriteError",
]


class StoreKeyNotFoundError(StoreError, FileNotFoundError):
    """A key (file) that was asked for does not exist; the message names its full location."""


class CorruptStoreFileError(StoreError, ValueError):
    """A file exists but cannot be decoded (truncated, not the expected format, inconsistent with meta.json)."""


class StoreNotWritableError(StoreError, ValueError, PermissionError):
    """The store's base location cannot be created or written to."""


class StoreWriteError(StoreError, OSError):
    """A write failed for a reason outside the program, most often a full disk ("no space left on device").

    The message names the file; the file keeps its previous content (writes are atomic), so what was complete before
    stays readable.
    """


class RunNotFoundError(StoreError, FileNotFoundError):
    """An activation run id that has no ``meta.json`` in the store."""
