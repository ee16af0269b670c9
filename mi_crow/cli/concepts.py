"""``mi-crow concepts``: each feature's top texts, from a stored run (replayed) or by running the model."""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from mi_crow.cli.common import (
    TOP_TEXTS_FILE,
    check_fits,
    check_run,
    cli_info,
    load_dataset,
    load_model,
    load_sae,
    model_of_sae,
    open_store,
    parse_layer,
    resolve_layer,
    run_layer,
    run_texts,
    say,
)
from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.concepts import track_from_run

QUANTILE_FILE = "quantile_examples.json"

if TYPE_CHECKING:  # pragma: no cover
    from mi_crow.language_model import LanguageModel
    from mi_crow.mechanistic.sae import TopKSae


def track_by_inference(lm: LanguageModel, sae: TopKSae, layer: str, texts: list[str], top_k: int,
                       batch_size: int, max_length: int) -> int:
    """Collect top texts by running the model with the SAE attached (the general path). Returns tokens seen."""
    from tqdm.auto import tqdm

    sae.concepts.enable_text_tracking(top_k=top_k)
    hook_id = lm.attach_sae(sae, layer)
    seen = 0
    try:
        with tqdm(total=len(texts), desc="top texts", unit="text", disable=None) as bar:
            for _, enc in lm.inference.iter_inference(texts, batch_size=batch_size, max_length=max_length):
                seen += int(enc["attention_mask"].sum())
                bar.update(enc["attention_mask"].shape[0])
    finally:
        lm.layers.unregister_hook(hook_id)
    return seen


def save_top_texts(sae: TopKSae, store: Any, sae_id: str, texts: list[str] | None = None,
                   tokenizer: Any = None) -> dict[str, Any]:
    """Store ``sae.concepts``' top texts as ``sae_models/<sae_id>/top_texts.json``; return the document.

    With ``texts`` (the replayed run's texts) and an activation sampler filled by the replay, the examples across
    each feature's activation quantiles go to ``sae_models/<sae_id>/quantile_examples.json`` too.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = sae.concepts.export_top_texts_json(Path(tmp) / TOP_TEXTS_FILE)
        data = json.loads(path.read_text(encoding="utf-8"))
    store.put_json(f"sae_models/{sae_id}/{TOP_TEXTS_FILE}", data)
    sampler = getattr(sae.concepts, "activation_sampler", None)
    if sampler is not None and texts is not None:
        examples = sampler.examples(texts, tokenizer)
        store.put_json(f"sae_models/{sae_id}/{QUANTILE_FILE}", {str(k): v for k, v in examples.items()})
    return data


def _parse_names(items: Sequence[str]) -> list[tuple[int, str]]:
    out = []
    for item in items:
        left, sep, right = item.partition("=")
        if not sep or not re.fullmatch(r"\d+", left.strip()) or not right.strip():
            raise UserInputError(f"--name {item!r}: expected NEURON=NAME, e.g. --name 123=french")
        out.append((int(left), right.strip()))
    return out


def run(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    sae = load_sae(store, args.sae_id)
    info = cli_info(store, args.sae_id)
    model = model_of_sae(args.model, info)
    if not model:
        raise UserInputError("--model is required: the store does not say which model this SAE belongs to")
    lm = load_model(model, store=store)
    run_id = args.run_id if args.run_id is not None else (None if args.dataset else info.get("activation_run"))
    if run_id is not None:
        run_id = check_run(store, run_id)
        layer = run_layer(store, run_id, args.layer or info.get("layer") or sae.metadata.get("layer"))
        check_fits(lm, sae, layer)
        texts = run_texts(store, run_id)
        if texts is None:
            texts = list(load_dataset(args.dataset or "default", args.limit, args.text_field))
        seen = track_from_run(lm, sae, run_id, layer, texts, args.top_k, progress=True)
        source = f"stored run {run_id!r}"
    else:
        layer = resolve_layer(lm, parse_layer(args.layer) if args.layer else info.get("layer"))
        check_fits(lm, sae, layer)
        texts = list(load_dataset(args.dataset or "default", args.limit, args.text_field))
        seen = track_by_inference(lm, sae, layer, texts, args.top_k, args.batch_size, args.max_length)
        source = f"{len(texts)} texts run through the model"
    for item in _parse_names(args.name):
        sae.concepts.name_concept(*item)
    data = save_top_texts(sae, store, args.sae_id, texts if run_id is not None else None, lm.tokenizer)
    if args.name:
        sae.concepts.save(store, args.sae_id)
    say(f"top texts of {len(data['neurons'])} features from {seen} tokens ({source}) -> "
        f"{store.location(f'sae_models/{args.sae_id}/{TOP_TEXTS_FILE}')}")
    stats = sae.concepts.neuron_stats()
    busiest = stats.firing_count.argsort(descending=True)[: args.show].tolist()
    for idx in busiest:
        records = sae.concepts.get_top_texts(idx)
        tokens = ", ".join(repr(lm.tokenizer.convert_tokens_to_string([r.token])) for r in records[:5])
        say(f"  feature {idx:5d}: fires on {100 * float(stats.firing_rate[idx]):.2f}% of tokens; top tokens {tokens}")
    return 0
