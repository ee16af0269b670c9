"""The store's layout: folder and file names, and the one rule for every name used as a key segment.

::

    activations/<run_id>/meta.json
    activations/<run_id>/batch_<i>/<layer>/activations.safetensors    "activations" [b, seq, d],
                                                                       "attention_mask" [b, seq]
    activations/<run_id>/batch_<i>/extra.safetensors                  optional per-batch tensors (input_ids)
    activations/<run_id>/.lock                                        held while a process writes the run

    format 2 (mi_crow.store.packed), the same folders:
    activations/<run_id>/batch_<i>/<layer>/activations.safetensors    "activations" [tokens, d] (real tokens only)
    activations/<run_id>/batch_<i>/extra.safetensors                  "token_ids", "offsets", "text_ids"
    activations/<run_id>/batch_<i>/complete.json                      the batch's completion marker (written last)
    activations/<run_id>/index.json                                   per-batch records, written when a save ends
    runs/<run_id>/...                                                 training runs (history, config, checkpoints)
    runs/<run_id>/.lock                                               held while a process trains into the run
    sae_models/<sae_id>/...                                           saved SAEs (model, config, concepts)

Run ids, layer names and SAE ids all go through :func:`mi_crow.validation.check_identifier`, so a name that one
``save`` accepts, every other accepts too.
"""

from __future__ import annotations

from typing import Any

from mi_crow.validation import check_identifier, check_int, fail

__all__ = [
    "ACTIVATIONS_FILE",
    "ACTIVATIONS_PREFIX",
    "EXTRA_FILE",
    "LOCK_FILE",
    "META_FILE",
    "RUNS_PREFIX",
    "SAE_PREFIX",
    "activation_key",
    "batch_folder",
    "check_batch_index",
    "check_count",
    "sae_key",
    "training_key",
]

ACTIVATIONS_PREFIX = "activations"
RUNS_PREFIX = "runs"
SAE_PREFIX = "sae_models"
META_FILE = "meta.json"
ACTIVATIONS_FILE = "activations.safetensors"
EXTRA_FILE = "extra.safetensors"
#: Name of a run's lock file; it starts with "." so that it is never listed as part of the run's content.
LOCK_FILE = ".lock"


def check_batch_index(value: Any, argument: str = "batch_index") -> int:
    """An int >= 0 (a batch index); the same errors and message format as :mod:`mi_crow.validation`."""
    value = check_int(value, argument)
    if value < 0:
        raise fail(argument, ">= 0", value)
    return value


def check_count(value: Any, argument: str) -> int:
    """An int > 0 (a size or a count); the same errors and message format as :mod:`mi_crow.validation`."""
    value = check_int(value, argument)
    if value <= 0:
        raise fail(argument, "> 0", value)
    return value


def batch_folder(batch_index: int) -> str:
    """Folder name of batch ``batch_index`` inside a run: ``batch_<i>``."""
    return f"batch_{check_batch_index(batch_index)}"


def activation_key(run_id: str, *parts: str) -> str:
    """Key of ``parts`` inside activation run ``run_id``: ``activations/<run_id>/<parts...>``."""
    return "/".join((ACTIVATIONS_PREFIX, check_identifier(run_id, "run_id")) + parts)


def training_key(run_id: str, *parts: str) -> str:
    """Key of ``parts`` inside training run ``run_id``: ``runs/<run_id>/<parts...>``."""
    return "/".join((RUNS_PREFIX, check_identifier(run_id, "run_id")) + parts)


def sae_key(sae_id: str, *parts: str) -> str:
    """Key of ``parts`` inside saved SAE ``sae_id``: ``sae_models/<sae_id>/<parts...>``."""
    return "/".join((SAE_PREFIX, check_identifier(sae_id, "sae_id")) + parts)
