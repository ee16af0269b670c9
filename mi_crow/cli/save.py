"""``mi-crow save``: activations of one layer over a dataset, into a store (resumable).

Under ``torchrun --nproc_per_node=N -m mi_crow save ...`` every rank saves a disjoint part of the texts into the same
run (see ``lm.activations.save``); the process group (gloo) is created here from torchrun's environment when the
caller has not created one.
"""

from __future__ import annotations

import argparse
import os
import re
from contextlib import contextmanager
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mi_crow.cli.common import (
    TEXTS_FILE,
    load_dataset,
    load_model,
    open_store,
    parse_layer,
    resolve_layer,
    run_texts,
    say,
    select_by_tokens,
)
from mi_crow.errors import UserInputError

if TYPE_CHECKING:  # pragma: no cover
    from mi_crow.language_model import LanguageModel


@contextmanager
def distributed_from_env() -> Iterator[int]:
    """Yield this process's rank: a torchrun launch (``WORLD_SIZE`` > 1 in the environment) without an initialised
    process group gets a gloo group for the block (destroyed after it); otherwise the existing group's rank, or 0."""
    import torch.distributed as dist

    created = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        created = True
    try:
        yield dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    finally:
        if created:
            dist.destroy_process_group()


def save_step(lm: LanguageModel, texts: list[str], layer: str, run_id: str, batch_size: int, max_length: int,
              dtype: str | None, shard_tokens: int | None = None, rank: int = 0) -> str:
    """Save ``layer`` over ``texts`` into ``lm.store`` (resumable) and remember the texts beside the run (rank 0
    writes them, after every rank has saved its part)."""
    store = lm.store
    if store.run_exists(run_id) and store.exists(f"activations/{run_id}/{TEXTS_FILE}"):
        if run_texts(store, run_id) != texts:
            raise UserInputError(
                f"run {run_id!r} already exists with other texts; choose another --run-id or delete "
                f"{store.location(f'activations/{run_id}')}"
            )
    run_id = lm.activations.save(texts, layer, run_id=run_id, batch_size=batch_size, max_length=max_length,
                                 dtype=dtype, progress=True, shard_tokens=shard_tokens)
    if rank == 0:
        store.put_json(f"activations/{run_id}/{TEXTS_FILE}", {"texts": texts})
    return run_id


def default_run_id(prefix: str, layer: str, suffix: str) -> str:
    """A run id from the layer name (characters a folder name may hold) and a description of the texts."""
    return f"{prefix}{re.sub(r'[^A-Za-z0-9_.-]+', '-', layer)}-{suffix}"


def run(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    lm = load_model(args.model, store=store)
    layer = resolve_layer(lm, parse_layer(args.layer))
    dataset = load_dataset(args.dataset, args.limit, args.text_field)
    texts = select_by_tokens(lm, list(dataset), args.tokens, args.max_length, args.shuffle, args.seed)
    run_id = args.run_id or default_run_id("", layer, f"{len(texts)}texts")
    with distributed_from_env() as rank:
        if rank == 0:
            say(f"saving {layer} over {len(texts)} texts into {store.location(f'activations/{run_id}')}")
        run_id = save_step(lm, texts, layer, run_id, args.batch_size, args.max_length, args.dtype,
                           getattr(args, "shard_tokens", None), rank)
    if rank == 0:
        meta = store.read_run_meta(run_id)
        say(f"run {run_id!r}: {meta.get('n_tokens')} tokens, layer {layer} (width {meta['layer_dims'][layer]})")
    return 0
