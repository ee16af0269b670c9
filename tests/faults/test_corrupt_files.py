"""Corrupt and truncated files in every position of the store layout are reported by path.

Starting from the store an uninterrupted save -> train -> concepts left, one file at a time is emptied, cut in half,
cut by its last byte or overwritten with random bytes, and the code that reads it must fail with an error that names
the file's full path: the library call that reads it, and the CLI command that needs it (one line, exit status 2).
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mi_crow.errors import MiCrowError
from mi_crow.mechanistic.sae import TopKSae
from mi_crow.store import LocalStore

from .conftest import Pipeline

RUN, SAE, LAYER = Pipeline.RUN, Pipeline.SAE, Pipeline.LAYER
BATCH_FILE = f"activations/{RUN}/batch_3/{LAYER}/activations.safetensors"


def _empty(data: bytes) -> bytes:
    return b""


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _cut_last_byte(data: bytes) -> bytes:
    return data[:-1]


def _garbage(data: bytes) -> bytes:
    return random.Random(len(data)).randbytes(len(data))


DAMAGE = {"empty": _empty, "half": _half, "cut-last-byte": _cut_last_byte, "garbage": _garbage}


def _read_whole_run(store: LocalStore) -> None:
    for _ in store.activation_reader(RUN, LAYER, 16, shuffle=False, drop_last=False):
        pass


# Every file of the layout, with the library calls that read it.
READERS: dict[str, list[Callable[[LocalStore], object]]] = {
    f"activations/{RUN}/meta.json": [lambda s: s.get_run_metadata(RUN), lambda s: s.list_run_batches(RUN),
                                     lambda s: s.activation_reader(RUN, LAYER, 16)],
    BATCH_FILE: [lambda s: s.get_run_batch(RUN, 3), lambda s: s.load_batch(RUN, 3, LAYER), _read_whole_run],
    f"activations/{RUN}/batch_3/extra.safetensors": [lambda s: s.get_run_batch(RUN, 3),
                                                      lambda s: s.load_batch_extra(RUN, 3)],
    f"runs/{SAE}/training_history.json": [lambda s: s.get_json(f"runs/{SAE}/training_history.json")],
    f"runs/{SAE}/checkpoint.pt": [lambda s: s.get_torch(f"runs/{SAE}/checkpoint.pt")],
}


def _sae_files(store: LocalStore) -> list[str]:
    """The files ``TopKSae.save`` wrote (model weights, config, concepts) — whatever the layout calls them."""
    return [key for key in store.list(f"sae_models/{SAE}") if not key.endswith(("cli.json", "top_texts.json"))]


@pytest.fixture
def damaged(reference, fast_tmp):
    """A copy of the reference store as train left it, to damage one file of."""
    root = Path(tempfile.mkdtemp(prefix="corrupt-", dir=fast_tmp)) / "store"
    shutil.copytree(reference["after_train"], root)
    return LocalStore(root, fsync=False)


def _damage(store: LocalStore, key: str, how: Callable[[bytes], bytes]) -> Path:
    path = store.path(key)
    path.write_bytes(how(path.read_bytes()))
    return path


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("key", READERS)
def test_damaged_store_files_are_reported_by_path(damaged: LocalStore, key, how):
    path = _damage(damaged, key, DAMAGE[how])
    for read in READERS[key]:
        with pytest.raises(MiCrowError) as info:
            read(damaged)
        assert str(path) in str(info.value), (read, str(info.value))


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_sae_files_are_reported_by_path(damaged: LocalStore, how):
    files = _sae_files(damaged)
    assert files, "the reference store has no saved SAE"
    TopKSae.load(damaged, SAE)  # intact: loads
    for key in files:
        original = damaged.get_bytes(key)
        path = _damage(damaged, key, DAMAGE[how])
        with pytest.raises(MiCrowError) as info:
            TopKSae.load(damaged, SAE)
        assert str(path) in str(info.value), str(info.value)
        path.write_bytes(original)


def _rewrite_mask(store: LocalStore, change: str) -> Path:
    path = store.path(BATCH_FILE)
    tensors = load_file(path)
    if "attention_mask" not in tensors:  # format 2: real tokens only; the same damages to the packed tensor
        acts = tensors["activations"]
        if change == "missing":
            tensors = {"other": acts}
        elif change == "wrong shape":
            tensors["activations"] = acts[:, :-1].contiguous()
        else:  # one more real token than the completion marker recorded
            tensors["activations"] = torch.cat([acts, acts[:1]])
        save_file(tensors, path)
        return path
    mask = tensors["attention_mask"]
    if change == "missing":
        del tensors["attention_mask"]
    elif change == "wrong shape":
        tensors["attention_mask"] = mask[:, :-1].contiguous()
    else:  # one more real token than meta.json recorded: a padding position turned on
        padding = (mask == 0).nonzero()
        assert len(padding), "batch 3 of the reference run has no padding to turn on"
        row, col = padding[0].tolist()
        flipped = mask.clone()
        flipped[row, col] = 1
        tensors["attention_mask"] = flipped
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("change", ["missing", "wrong shape", "extra real token"])
def test_a_damaged_attention_mask_is_reported_by_path(damaged: LocalStore, change):
    path = _rewrite_mask(damaged, change)
    readers = [_read_whole_run]
    if change != "extra real token" or "attention_mask" not in load_file(path):
        # format 1: with an extra real token the file on its own is consistent; only meta.json's count tells
        # (format 2 checks every file against its completion marker)
        readers += [lambda s: s.get_run_batch(RUN, 3), lambda s: s.load_batch(RUN, 3, LAYER)]
    for read in readers:
        with pytest.raises(MiCrowError) as info:
            read(damaged)
        assert str(path) in str(info.value), str(info.value)


def _cli_fails_naming(result, path: Path) -> None:
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr and str(path) in result.stderr, result.describe()


@pytest.mark.parametrize(
    ("key", "command"),
    [
        (f"activations/{RUN}/meta.json", "train"),
        (BATCH_FILE, "train"),
        (f"activations/{RUN}/batch_3/extra.safetensors", "concepts"),
        (f"runs/{SAE}/checkpoint.pt", "train --resume"),
        (f"runs/{SAE}/training_history.json", "report"),
        ("sae model weights", "concepts"),
        ("sae config", "concepts"),
    ],
)
def test_cli_reports_a_truncated_file_by_path(launcher, pipeline, damaged: LocalStore, fast_tmp, key, command):
    if key.startswith("sae "):
        files = _sae_files(damaged)
        key = next(k for k in files if ("config" in k) == (key == "sae config") and not k.endswith("concepts.json"))
    path = _damage(damaged, key, _half)
    root = damaged.base_path
    argv: list[object]
    if command == "train":
        argv = pipeline.train(root, resume=False)
        argv[argv.index("--sae-id") + 1] = "fresh"  # a new training run: reads the activations only
    elif command == "train --resume":
        argv = pipeline.train(root, resume=True)
    elif command == "concepts":
        argv = pipeline.concepts(root)
    else:
        argv = ["report", "--store", root, "--sae-id", SAE, "--eval-texts", "0", "--out", fast_tmp / "r.html"]
    _cli_fails_naming(launcher.run(*argv), path)
