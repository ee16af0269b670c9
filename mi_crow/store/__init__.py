"""Stores: where activations, training runs and SAE models live.

``LocalStore(base_path)`` keeps everything under one directory with atomic writes; ``Store`` is the abstract base
other backends implement. ``store.activation_reader(...)`` streams a saved run as shuffled, padding-free token
vectors with bounded memory; ``store.lock_run(run_id)`` keeps other processes out of a run while one writes it.

Example::

    store = LocalStore("./store")
    store.write_run_meta("run1", {"model_id": "tiny"})
    store.write_activation_batch("run1", 0, {"model.layers.3": acts}, attention_mask)   # acts [b, seq, d]
    store.list_run_batches("run1")                   # [0]  (complete batches only)
    acts, mask = store.load_batch("run1", 0, "model.layers.3")
    batch = store.get_run_batch("run1", 0)           # all layers: batch.activations[layer], batch.attention_mask
    store.get_run_metadata("run1")["sample_count"]   # texts saved
    reader = store.activation_reader("run1", "model.layers.3", batch_size=4096, seed=0)   # 1 GiB buffer, read-ahead
    for x in reader:                                 # x: [4096, d], real tokens only, shuffled across files
        ...
    state = reader.state_dict()                      # later: reader.load_state_dict(state) resumes exactly
    # format 2 (what lm.activations.save writes): packed [tokens, d] batches, one completion marker per batch
    store.create_packed_run("run2", {"model_id": "tiny"}, {"model.layers.3": 768}, torch.bfloat16)
    store.write_packed_batch("run2", 0, {"model.layers.3": packed}, offsets, token_ids)   # O(1) per batch
    store.finish_packed_run("run2")                  # index.json + meta.json, once at the end
    buf = ShuffleBuffer(d=768, batch_size=4096, buffer_bytes=1 << 30)   # bounded shuffle for streamed vectors
    with store.lock_run("sae1", kind="training"):    # runs/sae1/.lock: a second trainer gets ResourceBusyError
        ...
"""

from mi_crow.store.atomic import atomic_directory, atomic_write, atomic_write_bytes, atomic_write_text
from mi_crow.store.base import ActivationBatch, RunBatch, Store
from mi_crow.store.errors import (
    CorruptStoreFileError,
    ResourceBusyError,
    RunNotFoundError,
    StoreError,
    StoreKeyNotFoundError,
    StoreNotWritableError,
    StoreWriteError,
)
from mi_crow.store.local import LocalStore
from mi_crow.store.lock import LockHolder, RunLock
from mi_crow.store.reader import DEFAULT_BUFFER_BYTES, ActivationReader
from mi_crow.store.shuffle import ShuffleBuffer

__all__ = [
    "ActivationBatch",
    "ActivationReader",
    "DEFAULT_BUFFER_BYTES",
    "CorruptStoreFileError",
    "LocalStore",
    "LockHolder",
    "ResourceBusyError",
    "RunBatch",
    "RunLock",
    "RunNotFoundError",
    "ShuffleBuffer",
    "Store",
    "StoreError",
    "StoreKeyNotFoundError",
    "StoreNotWritableError",
    "StoreWriteError",
    "atomic_directory",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
]
