"""Exceptions raised by stores.

Each error subclasses the built-in exception a caller would naturally catch (``FileNotFoundError`` for a missing
key, ``ValueError`` for a corrupt file or bad argument, ``PermissionError`` for a directory that cannot be written),
so code that does not know about mi_crow still handles them sensibly.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by a :class:`~mi_crow.store.Store`."""


class StoreKeyNotFoundError(StoreError, FileNotFoundError):
    """A key (file) that was asked for does not exist; the message names its full location."""


class CorruptStoreFileError(StoreError, ValueError):
    """A file exists but cannot be decoded (truncated, not the expected format, inconsistent with meta.json)."""


class StoreNotWritableError(StoreError, ValueError, PermissionError):
    """The store's base location cannot be created or written to."""


class RunNotFoundError(StoreError, FileNotFoundError):
    """An activation run id that has no ``meta.json`` in the store."""
