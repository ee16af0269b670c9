"""Data-parallel training on 2 gloo ranks equals the single-process run on the same global batches (up to the order
of the sums): weights, history (losses, L0, dead latents, outlier tokens) and dead-latent counters; and a run
stopped after a checkpoint resumes to the same result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.conftest import assert_same_run, launch, ok, reference, train, training_config



def _dp_run(rank: int, world: int, overrides: dict) -> dict:
    return train(training_config(parallel="data", **overrides))


def test_data_parallel_equals_single_process(tmp_path):
    want = reference()
    # The run exercises what must be reduced over ranks: outliers, dead latents (AuxK on), several log records.
    assert want["outliers"] > 0
    assert any((r["dead_features"] or 0) > 0 for r in want["history"])
    assert any(r["auxk_loss"] > 0 for r in want["history"])
    got = ok(launch(_dp_run, tmp_path, {}))
    for res in got:
        assert_same_run(res, want)
        assert torch.equal(res["tokens_since_fired"], want["tokens_since_fired"])
        assert res["outliers"] == want["outliers"]
    # Both ranks hold bit-identical replicas (the same summed gradient, the same Adam step).
    for name in want["weights"]:
        assert torch.equal(got[0]["weights"][name], got[1]["weights"][name])


def _dp_resume(rank: int, world: int, store: str) -> dict:
    from pathlib import Path

    config = training_config(parallel="data", checkpoint_every=5, training_run_id="dp", save_sae=True)

    def stop(info):
        if info.step == 7:
            raise KeyboardInterrupt("stopped after step 7")

    try:
        train(config, store_path=Path(store), callbacks=[stop])
    except KeyboardInterrupt:
        pass
    import dataclasses

    return train(dataclasses.replace(config, resume=True), store_path=Path(store))


def test_data_parallel_checkpoint_resume(tmp_path):
    want = reference()
    got = ok(launch(_dp_resume, tmp_path, str(tmp_path / "store")))
    for res in got:
        assert res["resumed_from"] == 5
        assert_same_run(res, want)
        assert torch.equal(res["tokens_since_fired"], want["tokens_since_fired"])
    # The tensors went through torch.distributed.checkpoint with JSON metadata: no pickle file in the run.
    run = tmp_path / "store" / "runs" / "dp"
    assert (run / "checkpoint.json").exists()
    steps = list((run / "checkpoint").iterdir())
    assert [s.name for s in steps] == ["step-000000010"]
    assert (steps[0] / "metadata.json").exists() and not (steps[0] / ".metadata").exists()
    assert not (run / "checkpoint.pt").exists()
    # The saved SAE is the ordinary single-file format, loadable without any process group.
    from mi_crow.mechanistic.sae import TopKSae
    from mi_crow.store import LocalStore

    loaded = TopKSae.load(LocalStore(tmp_path / "store"), "dp")
    torch.testing.assert_close(loaded.W_dec, want["weights"]["W_dec"], atol=1e-5, rtol=0)


def _store_run(rank: int, world: int, store: str, parallel: str | None) -> dict:
    from mi_crow.mechanistic.sae import SaeTrainer
    from mi_crow.store import LocalStore

    from tests.distributed.conftest import make_sae

    sae = make_sae(48, 12)
    config = training_config(parallel=parallel, n_tokens=64 * 6, dead_window_tokens=64, b_dec_init_tokens=100)
    result = SaeTrainer(sae, LocalStore(Path(store), fsync=False)).train("acts", "h.1", config)
    return {"weights": {k: v.detach().clone() for k, v in sae.state_dict().items()}, "history": result.history}


def test_data_parallel_from_a_store_run(tmp_path):
    """The store reader path: each rank keeps its rows of every global batch; the b_dec sample (read in batches
    that do not split evenly) is gathered back in stream order."""
    from tests.distributed.test_layers import _write_run

    _write_run(tmp_path / "store")
    want = _store_run(0, 1, str(tmp_path / "store"), None)
    for res in ok(launch(_store_run, tmp_path, str(tmp_path / "store"), "data")):
        assert_same_run(res, want)


def _counting_reads() -> dict:
    """Count ``read_tokens`` per batch file in this process (the store reader's only way to a file's tokens)."""
    from collections import Counter

    from mi_crow.store import LocalStore

    reads: Counter = Counter()
    original = LocalStore.read_tokens

    def counted(self, run_id, batch_index, *args, **kwargs):
        reads[batch_index] += 1
        return original(self, run_id, batch_index, *args, **kwargs)

    LocalStore.read_tokens = counted
    return {"reads": reads, "restore": lambda: setattr(LocalStore, "read_tokens", original)}


# Shuffle groups of one 128-token file and 48-token batches: tokens are carried from group to group, and each group
# (so each batch) belongs to one rank: the other trains on an empty share of that batch.
_SPLIT = dict(batch_size=48, n_tokens=48 * 8, shuffle_buffer_tokens=200)


def _split_store_run(rank: int, world: int, store: str, parallel: str | None, stop_at: int | None = None,
                     resume: bool = False) -> dict:
    from mi_crow.mechanistic.sae import SaeTrainer
    from mi_crow.store import LocalStore

    from tests.distributed.conftest import make_sae

    counting = _counting_reads()
    try:
        sae = make_sae(48, 12)
        config = training_config(parallel=parallel, dead_window_tokens=64, b_dec_init_tokens=100,
                                 training_run_id=f"split-{parallel}", checkpoint_every=3, resume=resume, **_SPLIT)

        def stop(info):
            if info.step == stop_at:
                raise KeyboardInterrupt

        trainer = SaeTrainer(sae, LocalStore(Path(store), fsync=False))
        try:
            result = trainer.train("acts", "h.1", config, callbacks=[stop])
        except KeyboardInterrupt:
            return {"reads": dict(counting["reads"])}
        return {"weights": {k: v.detach().clone() for k, v in sae.state_dict().items()}, "history": result.history,
                "tokens_since_fired": trainer.tokens_since_fired.clone(), "reads": dict(counting["reads"]),
                "resumed_from": result.resumed_from_step}
    finally:
        counting["restore"]()


def test_data_parallel_ranks_read_only_their_files(tmp_path):
    """Each rank reads its share of the run's files (no file is read by both ranks), yet trains the single-process run's global batches, through carried tokens and
    batches of which one rank holds no token."""
    from tests.distributed.test_layers import _write_run

    _write_run(tmp_path / "store")
    want = _split_store_run(0, 1, str(tmp_path / "store"), None)
    got = ok(launch(_split_store_run, tmp_path, str(tmp_path / "store"), "data"))
    for res in got:
        assert_same_run(res, want)
        assert torch.equal(res["tokens_since_fired"], want["tokens_since_fired"])
    # (How far the read-ahead thread gets before the run stops is timing: compare which files, not how often.)
    reads = [set(res["reads"]) for res in got]
    assert reads[0] and reads[1] and reads[0].isdisjoint(reads[1])
    assert set(want["reads"]) <= reads[0] | reads[1] <= {0, 1, 2, 3}


def _split_resume(rank: int, world: int, store: str) -> dict:
    _split_store_run(rank, world, store, "data", stop_at=4)
    return _split_store_run(rank, world, store, "data", resume=True)


def test_data_parallel_split_reader_resumes_from_a_checkpoint(tmp_path):
    """The checkpoint keeps each rank's own carried tokens (``reader.rank<r>.carry``): a resumed run equals the
    uninterrupted single-process run."""
    from tests.distributed.test_layers import _write_run

    _write_run(tmp_path / "store")
    want = _split_store_run(0, 1, str(tmp_path / "store"), None)
    got = ok(launch(_split_resume, tmp_path, str(tmp_path / "store")))
    for res in got:
        assert res["resumed_from"] == 3
        assert_same_run(res, want)
        assert torch.equal(res["tokens_since_fired"], want["tokens_since_fired"])
    import json

    record = json.loads((tmp_path / "store" / "runs" / "split-data" / "checkpoint.json").read_text())
    shapes = [spec["carry"]["shape"][0] for spec in record["reader_rank_tensors"]]
    assert sum(shapes) > 0  # tokens were carried at the checkpoint, each rank saving its own
