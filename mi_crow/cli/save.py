"""``mi-crow save``: activations of one layer over a dataset, into a store (resumable)."""

from __future__ import annotations

import argparse
import re
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


def save_step(lm: LanguageModel, texts: list[str], layer: str, run_id: str, batch_size: int, max_length: int,
              dtype: str | None) -> str:
    """Save ``layer`` over ``texts`` into ``lm.store`` (resumable) and remember the texts beside the run."""
    store = lm.store
    if store.run_exists(run_id) and store.exists(f"activations/{run_id}/{TEXTS_FILE}"):
        if run_texts(store, run_id) != texts:
            raise UserInputError(
                f"run {run_id!r} already exists with other texts; choose another --run-id or delete "
                f"{store.location(f'activations/{run_id}')}"
            )
    run_id = lm.activations.save(texts, layer, run_id=run_id, batch_size=batch_size, max_length=max_length,
                                 dtype=dtype, progress=True)
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
    say(f"saving {layer} over {len(texts)} texts into {store.location(f'activations/{run_id}')}")
    run_id = save_step(lm, texts, layer, run_id, args.batch_size, args.max_length, args.dtype)
    meta = store.read_run_meta(run_id)
    say(f"run {run_id!r}: {meta.get('n_tokens')} tokens, layer {layer} (width {meta['layer_dims'][layer]})")
    return 0
