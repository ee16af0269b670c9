"""Failures of distributed runs: a rank killed mid-run makes the others fail with a clear error within the gloo
timeout (no hang) and the run resumes from its last checkpoint; bad input is refused at the start, naming it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mi_crow.errors import UserInputError
from tests.distributed.conftest import (
    GLOO_TIMEOUT_S,
    assert_same_run,
    launch,
    ok,
    reference,
    train,
    training_config,
)


def _killed_run(rank: int, world: int, store: str) -> dict:
    from mi_crow.mechanistic.sae.train.distributed import DistributedTrainingError

    config = training_config(parallel="latents", checkpoint_every=5, training_run_id="killed")

    def die(info):
        if info.step == 7 and rank == 1:
            os._exit(1)  # killed: no exception, no goodbye to the other rank

    try:
        train(config, store_path=Path(store), callbacks=[die])
    except DistributedTrainingError as exc:
        return {"error": str(exc)}
    return {"error": None}


def _resumed_run(rank: int, world: int, store: str) -> dict:
    config = training_config(parallel="latents", checkpoint_every=5, training_run_id="killed", resume=True)
    return train(config, store_path=Path(store))


def test_killed_rank_fails_the_others_and_the_run_resumes(tmp_path):
    store = str(tmp_path / "store")
    # A survivor that hung instead of failing would run into the launcher's timeout and fail the test.
    results = launch(_killed_run, tmp_path, store, timeout=3 * GLOO_TIMEOUT_S + 30)
    assert results[1] == {"missing": True}  # rank 1 died without a result
    survivor = results[0]["ok"]
    assert survivor["error"] is not None, "rank 0 finished although rank 1 was killed"
    assert "rank 0" in survivor["error"] and "resume=True" in survivor["error"]
    want = reference()
    for res in ok(launch(_resumed_run, tmp_path, store)):
        assert res["resumed_from"] == 5
        assert_same_run(res, want)


def _hung_run(rank: int, world: int) -> dict:
    from mi_crow.mechanistic.sae.train.distributed import DistributedTrainingError

    def hang(info):
        if info.step == 3 and rank == 1:
            time.sleep(120)  # alive but stuck: only the timeout can tell

    try:
        train(training_config(parallel="data"), callbacks=[hang])
    except DistributedTrainingError as exc:
        return {"error": str(exc)}
    return {"error": None}


def test_stuck_rank_fails_the_others_after_the_gloo_timeout(tmp_path):
    results = launch(_hung_run, tmp_path, world=2, timeout=15, gloo_timeout=2, hang_ok=(1,))
    assert results[1] == {"missing": True}  # killed by the launcher, still sleeping
    survivor = results[0]["ok"]
    # gloo's own words: the survivor failed on the 2 s gloo timeout (a hang would have hit the launcher's 15 s)
    assert survivor["error"] is not None and "Timed out waiting 2000ms" in survivor["error"]


def _bad_inputs(rank: int, world: int, store: str) -> dict[str, str]:
    """Each bad input on both ranks; the error text per case (every case must raise the same on both ranks)."""
    from mi_crow.mechanistic.sae import SaeTrainer

    out = {}

    def attempt(name, fn):
        try:
            fn()
        except (UserInputError, TypeError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
        else:
            out[name] = "no error"

    attempt("mismatch", lambda: train(training_config(parallel="data", lr=1e-3 if rank == 0 else 2e-3)))
    attempt("batch", lambda: train(training_config(parallel="data", batch_size=63, n_tokens=63 * 4, dead_window_tokens=None)))
    attempt("n_below_world_k", lambda: train(training_config(parallel="latents", k_aux=2), n_latents=6))
    attempt("n_not_divisible", lambda: train(training_config(parallel="latents"), n_latents=97))
    attempt("rank_given", lambda: train(training_config(parallel="data", rank=1 - rank, world_size=2)))
    # A data-parallel checkpoint resumed as latent-sharded, and a single-process one resumed data-parallel.
    base = dict(checkpoint_every=5, n_tokens=64 * 6)
    train(training_config(parallel="data", training_run_id="dp", **base), store_path=Path(store))
    attempt("layout", lambda: train(training_config(parallel="latents", training_run_id="dp", resume=True, **base),
                                    store_path=Path(store)))
    return out


def test_bad_input_is_named_on_every_rank(tmp_path):
    got = ok(launch(_bad_inputs, tmp_path, str(tmp_path / "store")))
    for rank, msgs in enumerate(got):
        assert "different configurations" in msgs["mismatch"]
        assert "lr: 0.001 on rank 0, 0.002 on rank 1" in msgs["mismatch"]
        assert "batch_size" in msgs["batch"] and "multiple of world_size=2" in msgs["batch"]
        assert "n_latents" in msgs["n_below_world_k"] and "2 x 4 = 8" in msgs["n_below_world_k"]
        assert "multiple of the world size 2" in msgs["n_not_divisible"] and "97" in msgs["n_not_divisible"]
        assert "rank=" in msgs["rank_given"] and "world_size=2" in msgs["rank_given"]
        assert "parallel='data'" in msgs["layout"] and "parallel='latents'" in msgs["layout"]


def test_single_process_checkpoint_refused_by_a_distributed_run(tmp_path):
    store = str(tmp_path / "store")
    train(training_config(checkpoint_every=5, n_tokens=64 * 6, training_run_id="solo"), store_path=Path(store))

    def resume(rank, world, store):
        try:
            train(training_config(parallel="data", checkpoint_every=5, n_tokens=64 * 6, training_run_id="solo",
                                  resume=True), store_path=Path(store))
        except UserInputError as exc:
            return str(exc)
        return "no error"

    for msg in ok(launch(resume, tmp_path, store)):
        assert "single-process" in msg and "parallel='data'" in msg


def test_parallel_without_process_group_is_refused():
    with pytest.raises(UserInputError, match="process group"):
        train(training_config(parallel="data"))
