"""Stores: where activations, training runs and SAE models live.

``LocalStore(base_path)`` keeps everything under one directory with atomic writes; ``Store`` is the abstract base
other backends implement. ``store.activation_reader(...)`` streams a saved run as shuffled, padding-free token
vectors with bounded memory.
"""

from mi_crow.store.base import ActivationBatch, Store
from mi_crow.store.errors import (
    CorruptStoreFileError,
    RunNotFoundError,
    StoreError,
    StoreKeyNotFoundError,
    StoreNotWritableError,
)
from mi_crow.store.local import LocalStore
from mi_crow.store.reader import ActivationReader

__all__ = [
    "ActivationBatch",
    "ActivationReader",
    "CorruptStoreFileError",
    "LocalStore",
    "RunNotFoundError",
    "Store",
    "StoreError",
    "StoreKeyNotFoundError",
    "StoreNotWritableError",
]
