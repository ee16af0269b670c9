"""One writer per training run (issue 11, defect 10): while another live process holds ``runs/<id>/.lock`` a trainer
refuses to write into that run, naming the holder's pid; once the holder is gone the run trains normally."""

from __future__ import annotations

import multiprocessing
import sys

import pytest
import torch

from mi_crow.errors import ResourceBusyError
from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae
from mi_crow.store import LocalStore

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the holder process is forked")
CTX = multiprocessing.get_context("fork")


def _hold(base: str, run_id: str, locked, release) -> None:
    store = LocalStore(base, fsync=False)
    with store.lock_run(run_id, kind="training", purpose="test-holder"):
        locked.set()
        release.wait(60)


def _train(store: LocalStore, run_id: str):
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    sae = TopKSae(n_latents=16, n_inputs=8, k=2)
    config = SaeTrainingConfig(n_tokens=1024, batch_size=128, training_run_id=run_id, save_sae=False,
                               checkpoint_every=None, seed=0)
    return SaeTrainer(sae, store).train_on_tensor(x, config)


def test_a_second_trainer_of_the_same_run_is_refused(tmp_path):
    store = LocalStore(tmp_path / "store", fsync=False)
    locked, release = CTX.Event(), CTX.Event()
    holder = CTX.Process(target=_hold, args=(str(store.base_path), "r1", locked, release))
    holder.start()
    try:
        assert locked.wait(30)
        with pytest.raises(ResourceBusyError, match=str(holder.pid)):
            _train(store, "r1")
        assert not store.exists("runs/r1/training_history.json"), "the refused trainer wrote into the run"
    finally:
        release.set()
        holder.join(30)
    result = _train(store, "r1")  # the holder is gone: the run trains and writes its history
    assert store.get_json("runs/r1/training_history.json") == result.history
