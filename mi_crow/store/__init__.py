"""Stores: where activations, training runs and SAE models live.

``LocalStore(base_path)`` keeps everything under one directory with atomic writes; ``Store`` is the abstract base
other backends implement. ``store.activation_reader(...)`` streams a saved run as shuffled, padding-free token
vectors with bounded memory.

Example::

    store = LocalStore("./store")
    store.write_run_meta("run1", {"model_id": "tiny"})
    store.write_activation_batch("run1", 0, {"model.layers.3": acts}, attention_mask)   # acts [b, seq, d]
    store.list_batches("run1")                       # [0]  (complete batches only)
    acts, mask = store.load_batch("run1", 0, "model.layers.3")
    reader = store.activation_reader("run1", "model.layers.3", batch_size=4096, seed=0)
    for x in reader:                                 # x: [4096, d], real tokens only, shuffled across files
        ...
    state = reader.state_dict()                      # later: reader.load_state_dict(state) resumes exactly
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
