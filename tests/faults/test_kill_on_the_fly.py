"""SIGKILL during ``mi-crow train --model ... --dataset ...`` (training on the fly), then ``--resume``: the SAE and its
history equal an uninterrupted run's bit for bit (a kill loses at most the forwards of the buffer half in progress
and the steps since the last checkpoint, which the resumed run recomputes identically). Resuming with another
dataset (refused, naming what differs) is tested in ``tests/sae/test_on_the_fly.py``.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mi_crow.store import LocalStore

from .conftest import assert_ok

pytestmark = pytest.mark.slow

SEED = 20240613
SAE = "f1"


def _train(workdir: Path, store: Path, *, resume: bool, dataset: Path | None = None) -> list[object]:
    # ~480 tokens, one epoch in steps of 16 (~30 steps), blocks of ~80 tokens (several per epoch), a record every 5
    # steps and a checkpoint every 5.
    return ["train", "--model", workdir / "llama", "--dataset", dataset or workdir / "data.txt", "--layer", "1",
            "--store", store, "--max-length", "24", "--forward-batch-size", "2", "--buffer-mb", "0.02",
            "--n-latents", "64", "--k", "4", "--epochs", "1", "--batch-size", "16", "--sae-id", SAE, "--seed", "3",
            "--checkpoint-every", "5"] + (["--resume"] if resume else [])


def _history(store: LocalStore) -> list[dict]:
    rows = store.get_json(f"runs/{SAE}/training_history.json")
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


def test_train_on_the_fly_killed_and_resumed_gives_the_same_sae_bit_for_bit(launcher, workdir, fast_tmp):
    rng = random.Random(SEED)
    reference = fast_tmp / "otf-reference"
    assert_ok(launcher.run(*_train(workdir, reference, resume=False)))

    store_path = fast_tmp / "otf-killed"
    history_file = store_path / "runs" / SAE / "training_history.json"
    checkpoint = store_path / "runs" / SAE / "checkpoint.pt"

    def records(at_least: int):
        def ready() -> bool:
            try:
                return history_file.exists() and len(LocalStore(store_path).get_json(
                    f"runs/{SAE}/training_history.json")) >= at_least
            except Exception:  # not written yet, or being replaced
                return False
        return ready

    kills = [
        (_train(workdir, store_path, resume=False), records(rng.randint(1, 2))),
        (_train(workdir, store_path, resume=True), lambda: checkpoint.exists() and records(rng.randint(3, 5))()),
    ]
    results = [launcher.run(*argv, kill_when=when, kill_after=rng.uniform(0.0, 0.02)) for argv, when in kills]
    for result in results:
        assert result.killed or result.returncode == 0, result.describe()
    assert any(r.killed for r in results), "no run was killed: the kill points came too late"
    final = launcher.run(*_train(workdir, store_path, resume=True))
    assert_ok(final)

    ref, got = LocalStore(reference), LocalStore(store_path)
    files = ref.list(f"sae_models/{SAE}")
    assert got.list(f"sae_models/{SAE}") == files
    for key in files:
        if key.endswith("cli.json"):
            continue
        assert got.get_bytes(key) == ref.get_bytes(key), key  # bit for bit, the weights included
    assert _history(got) == _history(ref)
