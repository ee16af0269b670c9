"""SIGKILL during a format-2 save whose stored batches hold many forward batches (``--shard-tokens``): each kill
loses at most the batch being written, the run stays readable from its completion markers, and resuming completes it
to the same content, text by text, as an uninterrupted save."""

from __future__ import annotations

import random
import time

import pytest

from mi_crow.store import LocalStore

from .conftest import Pipeline, assert_ok
from .test_sharded_save import assert_same_texts

pytestmark = pytest.mark.slow

SEED = 20261129
RUN, LAYER = Pipeline.RUN, Pipeline.LAYER


def test_token_sharded_save_killed_loses_at_most_the_batch_in_flight(launcher, pipeline, reference, fast_tmp):
    rng = random.Random(SEED)
    store_path = fast_tmp / "kill-v2"
    run_dir = store_path / "activations" / RUN
    argv = pipeline.save(store_path) + ["--shard-tokens", "24"]

    def markers() -> int:
        return len(list(run_dir.glob("batch_*/complete.json")))

    killed = 0
    kept: dict[str, bytes] = {}
    for threshold in sorted(rng.sample(range(1, 8), 3)):
        result = launcher.run(*argv, kill_when=lambda t=threshold: markers() >= t, kill_after=rng.uniform(0, 0.02))
        assert result.killed or result.returncode == 0, result.describe()
        killed += result.killed
        folders = [p for p in run_dir.glob("batch_*") if p.is_dir()]
        unmarked = [p for p in folders if not (p / "complete.json").exists()]
        assert len(unmarked) <= 1, unmarked  # only the batch in flight is lost
        store = LocalStore(store_path)
        meta = store.get_run_metadata(RUN)  # rebuilt from the markers after the kill
        assert meta["batch_count"] == markers() and meta["status"] in ("writing", "complete")
        for i in store.list_run_batches(RUN):  # every marked batch reads back whole
            assert store.load_batch(RUN, i, LAYER).activations.shape[0] == len(store.batch_text_indices(RUN, i))
        # complete batches are never rewritten by a later run
        for path, data in kept.items():
            assert (run_dir / path).read_bytes() == data
        kept = {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.glob("batch_*/**/*")
                if p.is_file() and (run_dir / p.relative_to(run_dir).parts[0] / "complete.json").exists()}
        time.sleep(0.01)
    assert killed, "no run was killed: the kill points came too late"
    assert_ok(launcher.run(*argv))
    got, ref = LocalStore(store_path), LocalStore(reference["store"])
    assert got.get_run_metadata(RUN)["status"] == "complete"
    assert_same_texts(got, ref)
    assert not (run_dir / ".lock").exists() and not list(run_dir.rglob("*.tmp"))
    # the finished run's index agrees with its markers
    assert [r["batch_index"] for r in got.batch_records(RUN)] == sorted(
        int(p.parent.name.removeprefix("batch_")) for p in run_dir.glob("batch_*/complete.json"))
    assert sum(int(x.shape[0]) for x in got.activation_reader(RUN, LAYER, 7, drop_last=False)) == \
        got.get_run_metadata(RUN)["n_tokens"] == ref.get_run_metadata(RUN)["n_tokens"]
