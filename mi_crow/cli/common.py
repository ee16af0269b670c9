"""What the subcommands share: output, file names, and loading a store, model, dataset, layer, run or SAE with
the checks that turn a wrong flag into one clear :class:`~mi_crow.errors.UserInputError`."""

from __future__ import annotations

import logging
import random
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mi_crow.errors import UserInputError

if TYPE_CHECKING:  # pragma: no cover
    from mi_crow.datasets import TextDataset
    from mi_crow.language_model import LanguageModel
    from mi_crow.mechanistic.sae import TopKSae
    from mi_crow.store import LocalStore

logger = logging.getLogger("mi_crow.cli")

PROG = "mi-crow"
TEXTS_FILE = "cli_texts.json"  # the exact texts of a run saved by the CLI, beside its meta.json
CLI_INFO_FILE = "cli.json"  # what the CLI knows about an SAE: model, layer, runs, evaluation
TOP_TEXTS_FILE = "top_texts.json"


# ------------------------------------------------------------------------------------------------ output
def say(message: str = "") -> None:
    """Print a line for the user (the CLI prints; the library logs)."""
    print(message, flush=True)


def step(title: str) -> None:
    """Print the heading of a step of a longer command."""
    say(f"\n== {title}")


# ------------------------------------------------------------------------------------------------ loading
def parse_layer(value: str | None) -> str | int | None:
    """``--layer``: a block index (an int) or a layer name."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if re.fullmatch(r"-?\d+", value) else value


def open_store(path: str) -> LocalStore:
    from mi_crow.store import LocalStore

    return LocalStore(path)


def model_path(spec: str) -> str:
    """``--model``: ``default`` (the embedded model's folder) or an existing local folder."""
    if spec == "default":
        from mi_crow.defaults import default_model_path

        return str(default_model_path())
    if not Path(spec).exists():
        raise UserInputError(
            f"--model {spec!r}: no such directory. Pass 'default' (the embedded SmolLM2-135M-Instruct) or the path "
            f"of a local HuggingFace model folder (config.json, weights, tokenizer)."
        )
    return spec


def load_model(spec: str, store: Any = None, dtype: str | None = None) -> LanguageModel:
    """Load ``--model`` on CPU in the model dtype policy's dtype.

    ``dtype``: ``"auto"`` (bfloat16 on a CPU with bf16 matrix instructions, else float32:
    :func:`mi_crow.defaults.preferred_model_dtype`), ``"float32"`` or ``"bfloat16"``; ``None`` reads
    ``$MI_CROW_MODEL_DTYPE`` and defaults to ``"auto"``. So ``mi-crow save``, the demo and every command that runs
    the model forward use the same dtype.
    """
    from mi_crow.defaults import resolve_model_dtype
    from mi_crow.language_model import LanguageModel

    path = model_path(spec)
    model_dtype = resolve_model_dtype(dtype, "cpu")
    t0 = time.perf_counter()
    lm = LanguageModel.from_huggingface(path, store=store, dtype=model_dtype)
    # Keep the user's name ("default") in run metadata so the run resumes whatever the cache path is.
    lm.model_id = "default:SmolLM2-135M-Instruct" if spec == "default" else str(spec)
    logger.info("loaded %s (%s) in %.1f s", path, str(model_dtype).replace("torch.", ""), time.perf_counter() - t0)
    return lm


def load_tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(spec))


def model_of_sae(flag: str | None, info: dict[str, Any]) -> str | None:
    """``--model`` if given, else the model the store records for the SAE (``default`` for the embedded one)."""
    if flag:
        return flag
    return "default" if str(info.get("model", "")).startswith("default") else info.get("model")


def load_dataset(spec: str, limit: int | None, text_field: str) -> TextDataset:
    """``--dataset``: ``default`` (the embedded corpus) or a .txt, .jsonl or .csv file; the first ``limit`` texts."""
    from mi_crow.datasets import TextDataset

    if spec == "default":
        from mi_crow.defaults import default_corpus

        return default_corpus(limit=limit)
    path = Path(spec)
    if not path.is_file():
        raise UserInputError(f"--dataset {spec!r}: no such file. Pass 'default' or a .txt, .jsonl or .csv file.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        ds = TextDataset.from_txt(path)
    elif suffix == ".jsonl":
        ds = TextDataset.from_jsonl(path, text_field=text_field)
    elif suffix == ".csv":
        ds = TextDataset.from_csv(path, text_field=text_field)
    else:
        raise UserInputError(f"--dataset {spec!r}: unsupported file type {suffix!r}; expected .txt, .jsonl or .csv")
    if limit is not None and limit < len(ds):
        ds = TextDataset(texts=ds[:limit], name=f"{path.name}[:{limit}]")
    return ds


def resolve_layer(lm: LanguageModel, layer: str | int | None) -> str:
    """The layer's name; the middle block when ``layer`` is None."""
    if layer is None:
        n = lm.layers.num_blocks
        if n == 0:
            raise UserInputError(
                "--layer is required: this model has no list of transformer blocks to pick the middle one"
            )
        return lm.layers.resolve(n // 2)
    name = lm.layers.resolve(layer)
    if name == "":
        raise UserInputError("--layer must name a layer of the model, not the whole model")
    return name


def check_fits(lm: LanguageModel, sae: TopKSae, layer: str) -> None:
    """The SAE's width must be the layer's."""
    width = lm.layers.width(layer)
    if width != sae.n_inputs:
        raise UserInputError(f"the SAE has n_inputs={sae.n_inputs} but layer {layer!r} has width {width}: "
                             f"this SAE was not trained on this layer")


def select_by_tokens(lm: LanguageModel, texts: list[str], tokens: int | None, max_length: int,
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


# ------------------------------------------------------------------------------------------------ the store
def run_texts(store: Any, run_id: str) -> list[str] | None:
    """The texts the CLI saved beside a run, or None for a run saved otherwise."""
    key = f"activations/{run_id}/{TEXTS_FILE}"
    return list(store.get_json(key)["texts"]) if store.exists(key) else None


def check_run(store: Any, run_id: str | None, what: str = "--run-id") -> str:
    """An activation run with at least one complete batch; the store's only run when ``run_id`` is None."""
    runs = store.list_runs()
    if run_id is None:
        if len(runs) == 1:
            return runs[0]
        if not runs:
            raise UserInputError(f"no activation runs in the store {store.base_path}; run `{PROG} save` first")
        raise UserInputError(f"{what} is required: the store has several runs: {runs}")
    if run_id not in runs:
        hint = f"runs in the store: {runs}" if runs else f"the store {store.base_path} has no runs yet"
        raise UserInputError(f"{what} {run_id!r}: no such activation run; {hint}")
    if not store.list_batches(run_id):
        raise UserInputError(
            f"{what} {run_id!r} has no complete batch yet; re-run `{PROG} save` with the same run id"
        )
    return run_id


def run_layer(store: Any, run_id: str, layer: str | None) -> str:
    """A layer stored in the run; its only layer when ``layer`` is None."""
    layers = store.list_layers(run_id)
    if layer is None:
        if len(layers) != 1:
            raise UserInputError(f"--layer is required: run {run_id!r} stores layers {layers}")
        return layers[0]
    if layer not in layers:
        raise UserInputError(f"--layer {layer!r} is not stored in run {run_id!r}; stored layers: {layers}")
    return layer


def sae_ids(store: Any) -> list[str]:
    return sorted({k.split("/")[1] for k in store.list("sae_models") if k.count("/") >= 2})


def load_sae(store: Any, sae_id: str) -> TopKSae:
    ids = sae_ids(store)
    if sae_id not in ids:
        hint = f"SAEs in the store: {ids}" if ids else f"the store {store.base_path} has no SAE yet (`{PROG} train`)"
        raise UserInputError(f"--sae-id {sae_id!r}: no such SAE; {hint}")
    # Any architecture of the family (TopK, BatchTopK, Matryoshka, JumpReLU, transcoders): config.json says which.
    from mi_crow.mechanistic.sae import load_sae as load_any

    return load_any(store, sae_id)  # type: ignore[return-value]


def cli_info(store: Any, sae_id: str) -> dict[str, Any]:
    """What the CLI recorded about an SAE (``sae_models/<sae_id>/cli.json``), empty if nothing."""
    key = f"sae_models/{sae_id}/{CLI_INFO_FILE}"
    return dict(store.get_json(key)) if store.exists(key) else {}


def put_cli_info(store: Any, sae_id: str, **updates: Any) -> dict[str, Any]:
    """Merge ``updates`` into the SAE's ``cli.json``; returns the new document."""
    info = cli_info(store, sae_id)
    info.update(updates)
    store.put_json(f"sae_models/{sae_id}/{CLI_INFO_FILE}", info)
    return info
