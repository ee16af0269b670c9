"""SIGKILL during ``save``, ``train`` and ``concepts``, then run again: the result equals an uninterrupted run.

The CLI runs as ``python -m mi_crow ...`` in child processes (see ``cli_launcher.py``); kill points are drawn from
a seeded RNG: after a given number of batch files, a given number of logged training records, or a fraction of the
uninterrupted run's wall time, plus a short random delay so that kills land inside file writes too. Each command is
killed several times in a row (each run resuming what the previous one left), then completed.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest
import torch

from mi_crow.store import LocalStore

from .conftest import Pipeline, assert_ok

pytestmark = pytest.mark.slow

SEED = 20240611
RUN, SAE, LAYER = Pipeline.RUN, Pipeline.SAE, Pipeline.LAYER


def _temporaries(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.tmp"))


def _killed_then_completed(launcher, runs: list[tuple[list[object], object, float]], final: list[object]) -> list:
    """Run each (argv, kill_when, delay) in turn, then ``final`` to completion; returns the results."""
    results = [launcher.run(*argv, kill_when=when, kill_after=delay) for argv, when, delay in runs]
    for result in results:
        assert result.killed or result.returncode == 0, result.describe()
    assert any(r.killed for r in results), "no run was killed: the kill points came too late"
    last = launcher.run(*final)
    assert_ok(last)
    return results + [last]


def test_save_killed_and_resumed_equals_an_uninterrupted_save(launcher, pipeline, reference, fast_tmp):
    rng = random.Random(SEED)
    store_path = fast_tmp / "kill-save"
    run_dir = store_path / "activations" / RUN
    n_batches = pipeline.N_TEXTS // pipeline.BATCH
    thresholds = sorted(rng.sample(range(1, n_batches - 1), 2))

    def batches_on_disk(at_least: int):
        return lambda: len(list(run_dir.glob(f"batch_*/{LAYER}/activations.safetensors"))) >= at_least

    runs = [(pipeline.save(store_path), batches_on_disk(t), rng.uniform(0.0, 0.02)) for t in thresholds]
    results = _killed_then_completed(launcher, runs, pipeline.save(store_path))

    ref, got = LocalStore(reference["store"]), LocalStore(store_path)
    assert got.get_run_metadata(RUN) == ref.get_run_metadata(RUN)
    assert got.list_run_batches(RUN) == ref.list_run_batches(RUN) == list(range(n_batches))
    for index in range(n_batches):
        a, b = ref.get_run_batch(RUN, index), got.get_run_batch(RUN, index)
        assert torch.equal(a.activations[LAYER], b.activations[LAYER])
        assert torch.equal(a.attention_mask, b.attention_mask)
        assert torch.equal(a.extra["input_ids"], b.extra["input_ids"])
    assert got.get_json(f"activations/{RUN}/cli_texts.json") == ref.get_json(f"activations/{RUN}/cli_texts.json")
    # The killed runs' lock was taken over and their half-written temporary files removed.
    assert not (run_dir / ".lock").exists() and _temporaries(run_dir) == []
    if any(r.killed for r in results[:-1]):
        assert any("stale lock" in r.stderr for r in results[1:]), [r.stderr[-500:] for r in results]


def _history(store: LocalStore) -> list[dict]:
    data = store.get_json(f"runs/{SAE}/training_history.json")
    rows = data["history"] if isinstance(data, dict) else data
    # Throughput depends on the machine's load, not on the training.
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


def test_train_killed_and_resumed_gives_the_same_sae_bit_for_bit(launcher, pipeline, reference, fast_tmp):
    rng = random.Random(SEED + 1)
    store_path = fast_tmp / "kill-train"
    shutil.copytree(Path(reference["store"]) / "activations", store_path / "activations")
    history_file = store_path / "runs" / SAE / "training_history.json"
    checkpoint = store_path / "runs" / SAE / "checkpoint.pt"
    sae_dir = store_path / "sae_models" / SAE

    def records(at_least: int):
        def ready() -> bool:
            try:
                return len(LocalStore(store_path).get_json(f"runs/{SAE}/training_history.json")) >= at_least
            except Exception:  # not written yet
                return False
        return lambda: history_file.exists() and ready()

    before_checkpoint = rng.randint(1, 9)  # records come every 5 steps; the checkpoint is at step 50
    after_checkpoint = rng.randint(10, 11)
    runs = [
        (pipeline.train(store_path, resume=False), records(before_checkpoint), rng.uniform(0.0, 0.02)),
        (pipeline.train(store_path, resume=True), lambda: checkpoint.exists() and records(after_checkpoint)(),
         rng.uniform(0.0, 0.02)),
        # While the trained SAE is being written.
        (pipeline.train(store_path, resume=True), lambda: sae_dir.exists(), rng.uniform(0.0, 0.005)),
    ]
    _killed_then_completed(launcher, runs, pipeline.train(store_path, resume=True))

    ref, got = LocalStore(reference["after_train"]), LocalStore(store_path)
    ref_files = ref.list(f"sae_models/{SAE}")
    assert got.list(f"sae_models/{SAE}") == ref_files
    for key in ref_files:
        assert got.get_bytes(key) == ref.get_bytes(key), key  # bit for bit, the weights included
    assert _history(got) == _history(ref)


def test_concepts_killed_and_rerun_gives_the_same_output(launcher, pipeline, reference, fast_tmp):
    rng = random.Random(SEED + 2)
    store_path = fast_tmp / "kill-concepts"
    shutil.copytree(reference["after_train"], store_path)
    wall = reference["concepts_wall"]

    def after(seconds: float):
        started: list[float] = []

        def ready() -> bool:  # first polled right after the run starts
            if not started:
                started.append(time.monotonic())
            return time.monotonic() - started[0] >= seconds
        return ready

    runs = [(pipeline.concepts(store_path), after(rng.uniform(0.3, 0.9) * wall), 0.0) for _ in range(2)]
    _killed_then_completed(launcher, runs, pipeline.concepts(store_path))

    ref, got = LocalStore(reference["store"]), LocalStore(store_path)
    for name in ("top_texts.json", "concepts.json"):
        assert got.get_bytes(f"sae_models/{SAE}/{name}") == ref.get_bytes(f"sae_models/{SAE}/{name}"), name
    assert got.list(f"sae_models/{SAE}") == ref.list(f"sae_models/{SAE}")
