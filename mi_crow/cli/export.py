"""``mi-crow export``: an SAE of the store in another library's format, Neuronpedia's batch JSON, or SAEBench's core
results JSON.

- ``mi-crow export sae_lens|sparsify|dictionary_learning|circuit_tracer --sae-id ID --out DIR``: files the library
  loads itself (`TopKSae.export`);
- ``mi-crow export neuronpedia --sae-id ID``: ``batch-<i>.json`` feature dashboards from the SAE's tracked top texts
  (``mi-crow concepts`` first), replayed through the model for per-token activations;
- ``mi-crow export saebench --sae-id ID``: `evaluate` on held-out texts, written in SAEBench's ``core`` layout.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mi_crow.cli.common import (
    TOP_TEXTS_FILE,
    check_fits,
    cli_info,
    load_dataset,
    load_model,
    load_sae,
    model_of_sae,
    open_store,
    resolve_layer,
    say,
)
from mi_crow.errors import UserInputError

__all__ = ["FORMATS", "add_arguments", "run"]

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
FORMATS = ("sae_lens", "sparsify", "dictionary_learning", "circuit_tracer", "neuronpedia", "saebench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``mi-crow export`` (kept here so the parser only registers the subcommand)."""
    p.add_argument("format", choices=FORMATS, help="what to write")
    p.add_argument("--store", default="store", help="store directory (default: ./store)")
    p.add_argument("--sae-id", required=True)
    p.add_argument("--out", help="output folder (default: ./<sae-id>-<format>)")
    p.add_argument("--model", help="the model (default: the one the store records for the SAE)")
    p.add_argument("--model-name", help="model name written into the files (default: the recorded one)")
    p.add_argument("--layer", help="layer the SAE reads (default: the one it was trained on)")
    p.add_argument("--sae-set", help="neuronpedia: the SAE set's name (default: the SAE id)")
    p.add_argument("--layer-index", type=int, help="neuronpedia: layer index (default: the block number of --layer)")
    p.add_argument("--features", type=int, help="neuronpedia: export only the N most frequent features")
    p.add_argument("--batch-size", type=int, default=128, help="neuronpedia: features per batch file")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (as tracked / evaluated)")
    p.add_argument("--dataset", help="saebench: held-out texts ('default' or a .txt/.jsonl/.csv file)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--limit", type=int, default=64, help="saebench: texts evaluated (default 64)")


def run(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    sae = load_sae(store, args.sae_id)
    info = cli_info(store, args.sae_id)
    out = Path(args.out or f"{args.sae_id}-{args.format}")
    model_name = args.model_name or sae.metadata.get("model_id") or info.get("model")
    if isinstance(model_name, str) and model_name.startswith("default"):
        # The embedded default model (a GGUF of SmolLM2-135M-Instruct): name it by its hub id in other tools' files.
        model_name = DEFAULT_HUB_ID
    if args.format in ("sae_lens", "sparsify", "dictionary_learning", "circuit_tracer"):
        folder = sae.export(out, args.format, model_name=model_name)
        say(f"exported {args.sae_id} as {args.format} -> {folder.resolve()}")
        return 0
    model = model_of_sae(args.model, info)
    if not model:
        raise UserInputError("--model is required: the store does not say which model this SAE belongs to")
    lm = load_model(model, store=store)
    layer = resolve_layer(lm, args.layer or info.get("layer") or sae.metadata.get("layer"))
    check_fits(lm, sae, layer)
    if args.format == "neuronpedia":
        return _neuronpedia(args, store, sae, lm, layer, out, model_name)
    return _saebench(args, sae, lm, layer, out)


def _neuronpedia(args: argparse.Namespace, store, sae, lm, layer: str, out: Path, model_name: str | None) -> int:
    from mi_crow.mechanistic.sae.interop.neuronpedia import neuronpedia_features, write_neuronpedia_batches

    key = f"sae_models/{args.sae_id}/{TOP_TEXTS_FILE}"
    if not store.exists(key):
        raise UserInputError(
            f"--sae-id {args.sae_id!r} has no tracked top texts ({store.location(key)}): run `mi-crow concepts "
            f"--sae-id {args.sae_id}` first"
        )
    doc = store.get_json(key)
    features = None
    if args.features is not None:
        rows = sorted(doc.get("neurons", []), key=lambda r: -r.get("firing_count", 0))
        features = [r["neuron"] for r in rows[: args.features]]
    layer_index = args.layer_index
    if layer_index is None:
        match = re.search(r"\.(\d+)(\.|$)", layer)
        if match is None:
            raise UserInputError(f"--layer-index is required: layer {layer!r} has no block number")
        layer_index = int(match.group(1))
    feats = neuronpedia_features(sae, lm, doc, layer=layer, features=features, max_length=args.max_length,
                                 dataset=str(args.dataset or ""))
    paths = write_neuronpedia_batches(out, feats, model_id=model_name or lm.model_id, layer=layer_index,
                                      sae_set=args.sae_set or args.sae_id, batch_size=args.batch_size)
    say(f"{len(feats)} features in {len(paths)} Neuronpedia batch files -> {out.resolve()}")
    return 0


def _saebench(args: argparse.Namespace, sae, lm, layer: str, out: Path) -> int:
    from mi_crow.mechanistic.sae.evaluate import evaluate, save_saebench_core

    texts = list(load_dataset(args.dataset or "default", args.limit, args.text_field))
    result = evaluate(sae, lm, texts, layer, max_length=args.max_length, progress=True)
    target = out if out.suffix == ".json" else out / f"{args.sae_id}_eval_results.json"
    save_saebench_core(result, target)
    say(f"SAEBench core results over {len(texts)} texts -> {target.resolve()}")
    return 0
