"""BatchTopK and Matryoshka-BatchTopK under data-parallel training: the selection keeps the ``k * B`` largest
candidates of the GLOBAL batch (over both ranks' tokens), so 2 gloo ranks train exactly what one process trains on
the same global batches (weights, running threshold, history, dead counters); the per-rank selection (``k * B / 2``
per rank) would not. Latent-sharded, BatchTopK chooses the k*B winners over every rank's slice and Matryoshka sums
the ranks' partial prefix reconstructions; transcoders are refused there with a NotSupportedError."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.conftest import activations, assert_same_run, launch, ok, training_config


def _sae(arch: str):
    from mi_crow.mechanistic.sae import BatchTopKSae, MatryoshkaSae

    torch.manual_seed(0)
    if arch == "batchtopk":
        return BatchTopKSae(96, 16, 4)
    return MatryoshkaSae(96, 16, 4, group_sizes=[16, 40, 40], batch_topk=arch == "matryoshka")


def _family_run(rank: int, world: int, arch: str, parallel: str | None, local_selection: bool = False) -> dict:
    from mi_crow.mechanistic.sae import SaeTrainer

    sae = _sae(arch)
    trainer = SaeTrainer(sae)
    if local_selection:  # the selection of each rank's own tokens only (what a naive data-parallel run does)
        trainer._batch_topk_seams = lambda: {}
    # adam_eps 1e-6, not 6.25e-10: with the tied initialisation a token whose only winner is latent i has a residual
    # orthogonal to row i, so that value's gradient is 0 up to rounding (~1e-11); Adam divides such a gradient by
    # its own size plus eps, and at 6.25e-10 the sign of the rounding (which the order of the sums decides) moves
    # the row by ~lr: a comparison of two reduction orders would measure that, not the selection.
    result = trainer.train_on_tensor(activations(), training_config(parallel=parallel, adam_eps=1e-6))
    return {"weights": {k: v.detach().clone() for k, v in sae.state_dict().items()}, "history": result.history,
            "tokens_since_fired": trainer.tokens_since_fired.clone()}


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_data_parallel_selects_over_the_global_batch(tmp_path, arch):
    want = _family_run(0, 1, arch, None)
    assert torch.isfinite(want["weights"]["threshold"])
    assert any((r["dead_features"] or 0) > 0 for r in want["history"])
    for res in ok(launch(_family_run, tmp_path, arch, "data")):
        assert_same_run(res, want)  # the threshold buffer included
        assert torch.equal(res["tokens_since_fired"], want["tokens_since_fired"])
    # The comparison can tell: selecting k * B/2 per rank trains something else.
    local = ok(launch(_family_run, tmp_path, arch, "data", True))[0]
    assert (local["weights"]["W_enc"] - want["weights"]["W_enc"]).abs().max() > 1e-3


def _select(rank: int, world: int) -> list:
    from mi_crow.mechanistic.sae.train.distributed import batch_topk_select

    g = torch.Generator().manual_seed(7)
    values = torch.randn(10, 6, generator=g).relu().sort(dim=1, descending=True).values  # zeros: ties
    values[3, :3] = 0.5  # ties above 0 across tokens
    values[3] = values[3].sort(descending=True).values
    mine = values[rank * 5 : rank * 5 + 5] if rank == 0 else values[5 : 5 + 3]  # unequal shares: 5 and 3 tokens
    return [batch_topk_select(mine, 2 * mine.shape[0]).tolist(),
            batch_topk_select(mine, 2 * 8, split_tokens=False).tolist()]


def test_distributed_batch_topk_select_equals_the_selection_on_the_concatenated_batch(tmp_path):
    from mi_crow.ops.batch_topk import batch_topk_select

    got = ok(launch(_select, tmp_path))
    g = torch.Generator().manual_seed(7)
    values = torch.randn(10, 6, generator=g).relu().sort(dim=1, descending=True).values
    values[3, :3] = 0.5
    values[3] = values[3].sort(descending=True).values
    both = values[:8]
    counts = got[0][0] + got[1][0]
    assert counts == got[0][1] + got[1][1]
    assert sum(counts) == 16
    want = batch_topk_select(both, 16)
    # Equal except in how ties at the K-th value are shared out; the selected values are the same multiset.
    picked = lambda c: sorted(v for row, n in zip(both.tolist(), c) for v in row[:n])  # noqa: E731
    assert picked(counts) == picked(want.tolist())
    assert all(n <= 6 for n in counts)


def _transcoder_latents(rank: int, world: int) -> str:
    from mi_crow.errors import NotSupportedError
    from mi_crow.mechanistic.sae import SaeTrainer, Transcoder

    try:
        SaeTrainer(Transcoder(96, 16, 16, 4)).train_on_tensor(activations(), training_config(parallel="latents"))
    except NotSupportedError as exc:
        return str(exc)
    return "trained"


def test_latent_sharded_transcoder_is_refused_with_the_reason(tmp_path):
    for message in ok(launch(_transcoder_latents, tmp_path)):
        assert "parallel='latents'" in message and "Transcoder" in message


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "matryoshka-topk"])
def test_family_latent_sharded_equals_single_process(tmp_path, arch):
    """Each rank holds half of the latents; BatchTopK's k*B winners are chosen over both slices (one threshold over
    all latents); Matryoshka's second group (latents 16..55) straddles the slices, its prefix reconstructions are the
    sums of the ranks' partial ones. Every rank ends with the whole SAE (and running threshold) of the
    single-process run."""
    want = _family_run(0, 1, arch, None)
    for rank, res in enumerate(ok(launch(_family_run, tmp_path, arch, "latents"))):
        assert_same_run(res, want)
        assert torch.equal(res["tokens_since_fired"], want["tokens_since_fired"][rank * 48 : (rank + 1) * 48])


def _btk_resume(rank: int, world: int, store: str, parallel: str) -> dict:
    import dataclasses
    from pathlib import Path

    from mi_crow.mechanistic.sae import SaeTrainer
    from mi_crow.store import LocalStore

    config = training_config(parallel=parallel, adam_eps=1e-6, checkpoint_every=5, training_run_id=f"b-{parallel}")

    def stop(info):
        if info.step == 7:
            raise KeyboardInterrupt

    try:
        SaeTrainer(_sae("batchtopk"), LocalStore(Path(store), fsync=False)).train_on_tensor(
            activations(), config, callbacks=[stop])
    except KeyboardInterrupt:
        pass
    sae = _sae("batchtopk")
    trainer = SaeTrainer(sae, LocalStore(Path(store), fsync=False))
    result = trainer.train_on_tensor(activations(), dataclasses.replace(config, resume=True))
    return {"weights": {k: v.detach().clone() for k, v in sae.state_dict().items()}, "history": result.history,
            "resumed_from": result.resumed_from_step}


@pytest.mark.parametrize("parallel", ["data", "latents"])
def test_batchtopk_distributed_checkpoint_keeps_the_running_threshold(tmp_path, parallel):
    want = _family_run(0, 1, "batchtopk", None)
    for res in ok(launch(_btk_resume, tmp_path, str(tmp_path / "store"), parallel)):
        assert res["resumed_from"] == 5
        assert_same_run(res, want)


def _btk_store_run(rank: int, world: int, store: str, parallel: str | None) -> dict:
    from pathlib import Path

    from mi_crow.mechanistic.sae import BatchTopKSae, SaeTrainer
    from mi_crow.store import LocalStore

    torch.manual_seed(0)
    sae = BatchTopKSae(48, 12, 3)
    # Shuffle groups of one file: each rank holds every token of some batches and none of the others.
    config = training_config(parallel=parallel, dead_window_tokens=64, b_dec_init_tokens=100, adam_eps=1e-6,
                             batch_size=48, n_tokens=48 * 8, shuffle_buffer_tokens=200)
    result = SaeTrainer(sae, LocalStore(Path(store), fsync=False)).train("acts", "h.1", config)
    return {"weights": {k: v.detach().clone() for k, v in sae.state_dict().items()}, "history": result.history}


def test_batchtopk_data_parallel_from_a_store_with_empty_rank_shares(tmp_path):
    from tests.distributed.test_layers import _write_run

    _write_run(tmp_path / "store")
    want = _btk_store_run(0, 1, str(tmp_path / "store"), None)
    for res in ok(launch(_btk_store_run, tmp_path, str(tmp_path / "store"), "data")):
        assert_same_run(res, want)
