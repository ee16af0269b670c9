"""Sharded saving: ``python -m mi_crow save`` in 2 processes with torchrun's environment (gloo on 127.0.0.1) writes
one run that reads back identical, text by text, to a 1-process save; batch indices never collide."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from mi_crow.store import LocalStore

from .conftest import ROOT, Pipeline, cli_env

pytestmark = pytest.mark.slow

RUN, LAYER = Pipeline.RUN, Pipeline.LAYER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def by_text(store: LocalStore, run: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Text index -> (token ids, vectors of LAYER), read through the store's padded view and text mapping."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i in store.list_run_batches(run):
        batch = store.get_run_batch(run, i)
        for row, text in enumerate(store.batch_text_indices(run, i)):
            n = int(batch.attention_mask[row].sum())
            assert text not in out, f"text {text} stored twice"
            out[text] = (batch.extra["input_ids"][row, :n], batch.activations[LAYER][row, :n])
    return out


def assert_same_texts(got: LocalStore, ref: LocalStore) -> None:
    a, b = by_text(got, RUN), by_text(ref, RUN)
    assert sorted(a) == sorted(b) == list(range(Pipeline.N_TEXTS))
    for text in b:
        assert torch.equal(a[text][0], b[text][0]) and torch.equal(a[text][1], b[text][1]), text
    for key in ("n_tokens", "sample_count", "layer_dims", "dtype", "model_id"):
        assert got.get_run_metadata(RUN)[key] == ref.get_run_metadata(RUN)[key], key


# Run by the rank that dies: ``python -m mi_crow`` whose store SIGKILLs this process right after its first batch
# is written (a real death mid-save: no exception, no clean-up, its sockets closed by the kernel).
_DIE_AFTER_FIRST_BATCH = """
import os, runpy, signal, sys
from mi_crow.store.base import Store
write = Store.write_packed_batch
def dying(self, *args, **kwargs):
    out = write(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
    return out
Store.write_packed_batch = dying
sys.argv = ["mi_crow", *sys.argv[1:]]
runpy.run_module("mi_crow", run_name="__main__", alter_sys=True)
"""


def _run_ranks(argv: list[object], world: int = 2, dying: int | None = None) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = cli_env()
        # The ranks keep the reference save's thread count (no OMP_NUM_THREADS=1 as torchrun would set): the
        # model's matrix products reduce in an order that depends on it, and the test compares bit for bit.
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = ["-c", _DIE_AFTER_FIRST_BATCH] if rank == dying else ["-m", "mi_crow"]
        procs.append(subprocess.Popen([sys.executable, *command, *map(str, argv)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.parametrize("extra", [[], ["--shard-tokens", "30"]], ids=["per-forward-batch", "shard-tokens"])
def test_two_ranks_save_one_run_equal_to_one_process(pipeline, reference, fast_tmp, extra):
    store_path = fast_tmp / f"sharded{len(extra)}"
    results = _run_ranks(pipeline.save(store_path) + extra)
    for r in results:
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    got, ref = LocalStore(store_path), LocalStore(reference["store"])
    assert_same_texts(got, ref)
    meta = got.get_run_metadata(RUN)
    assert meta["status"] == "complete"
    records = got.batch_records(RUN)
    assert {r["rank"] for r in records} == {0, 1}
    assert all(r["batch_index"] % 2 == r["rank"] for r in records)  # indices of the two ranks never collide
    assert got.get_json(f"activations/{RUN}/cli_texts.json") == ref.get_json(f"activations/{RUN}/cli_texts.json")
    assert not (store_path / "activations" / RUN / ".lock").exists()
    if extra:  # a stored batch holds whole forward batches, at least 30 tokens except each rank's last
        for rank in (0, 1):
            mine = [r for r in records if r["rank"] == rank]
            assert all(r["n_tokens"] >= 30 for r in mine[:-1]) and all(len(r["forward_batches"]) >= 1 for r in mine)
            assert all(b % 2 == rank for r in mine for b in r["forward_batches"])


def test_a_rank_dying_mid_save_stops_the_others_with_a_clear_error_and_the_save_resumes(pipeline, reference,
                                                                                        fast_tmp):
    """Rank 1 is SIGKILLed after writing its first batch: rank 0 fails with the DistributedError message (the peer's
    closed connection, not gloo's 30-minute timeout: a hang would fail through ``_run_ranks``' own timeout) and keeps
    what was written; the same 2-rank save then resumes to a run equal to the 1-process save."""
    store_path = fast_tmp / "sharded-dying"
    argv = pipeline.save(store_path)
    survivor, dead = _run_ranks(argv, dying=1)
    assert dead.returncode == -9, dead.stderr[-3000:]
    assert survivor.returncode != 0
    assert "another rank stopped" in survivor.stderr and "run the same save again" in survivor.stderr, \
        survivor.stderr[-3000:]
    assert "Traceback" not in survivor.stderr, survivor.stderr[-3000:]
    partial = LocalStore(store_path)
    assert partial.get_run_metadata(RUN)["status"] != "complete"
    written = {r["rank"] for r in partial.batch_records(RUN)}
    assert 1 in written  # the dead rank's first batch is kept
    for r in _run_ranks(argv):
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    got = LocalStore(store_path)
    assert_same_texts(got, LocalStore(reference["store"]))
    assert got.get_run_metadata(RUN)["status"] == "complete"
