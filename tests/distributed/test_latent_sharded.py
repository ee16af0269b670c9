"""Latent-sharded training (each rank owns half of the latents, sees the whole batch) on 2 gloo ranks equals the
single-process run up to the order of the sums; its checkpoint re-shards onto another number of ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.conftest import assert_same_run, launch, ok, reference, train, training_config


def _latent_run(rank: int, world: int, overrides: dict) -> dict:
    from mi_crow.mechanistic.sae.train import distributed

    distributed.reset_comm_bytes()
    out = train(training_config(parallel="latents", **overrides))
    out["comm_bytes"] = distributed.comm_bytes()
    return out


def test_latent_sharded_equals_single_process(tmp_path):
    overrides = {"k_anneal_fraction": 0.5, "k_anneal_start": 8}
    want = train(training_config(**overrides))
    assert any((r["dead_features"] or 0) > 0 for r in want["history"])
    assert any(r["auxk_loss"] > 0 for r in want["history"])
    got = ok(launch(_latent_run, tmp_path, overrides))
    for rank, res in enumerate(got):
        # Every rank ends with the whole SAE (the slices gathered back) and the run's full history.
        assert_same_run(res, want)
        # Each rank counts the dead latents of its own slice.
        assert torch.equal(res["tokens_since_fired"], want["tokens_since_fired"][rank * 48 : (rank + 1) * 48])
    # Communication is per token O(k world + d), never [B, n]: far below an all-gather of the dense codes.
    steps, batch, n = 12, 64, 96
    assert got[0]["comm_bytes"] < steps * batch * n * 4 * 2


def _latent_stop(rank: int, world: int, store: str) -> None:
    config = training_config(parallel="latents", checkpoint_every=5, training_run_id="lat")

    def stop(info):
        if info.step == 7:
            raise KeyboardInterrupt

    try:
        train(config, store_path=Path(store), callbacks=[stop])
    except KeyboardInterrupt:
        return None
    raise AssertionError("the run was not stopped")


def _latent_resume(rank: int, world: int, store: str) -> dict:
    config = training_config(parallel="latents", checkpoint_every=5, training_run_id="lat", resume=True)
    return train(config, store_path=Path(store))


def test_latent_checkpoint_resumes_on_the_same_and_another_world_size(tmp_path):
    import shutil

    want = reference()
    store = tmp_path / "store"
    ok(launch(_latent_stop, tmp_path, str(store), world=2))
    shutil.copytree(store, tmp_path / "store-copy")
    # Written by 2 ranks, resumed by 2 ranks.
    for res in ok(launch(_latent_resume, tmp_path, str(store), world=2)):
        assert res["resumed_from"] == 5
        assert_same_run(res, want)
    # Written by 2 ranks, resumed by 1: the single rank reads both halves of every sharded tensor.
    (one,) = ok(launch(_latent_resume, tmp_path, str(tmp_path / "store-copy"), world=1))
    assert one["resumed_from"] == 5
    assert_same_run(one, want)
    assert torch.equal(one["tokens_since_fired"], want["tokens_since_fired"])


def test_latent_checkpoint_of_one_rank_reshards_onto_two(tmp_path):
    """Written by a 1-rank latent-sharded run (the whole dictionary in one shard), resumed by 2 ranks: each reads
    the rows of its new half of every latent-indexed tensor (weights, Adam moments, dead counters)."""
    want = reference()
    store = tmp_path / "store"
    ok(launch(_latent_stop, tmp_path, str(store), world=1))
    got = ok(launch(_latent_resume, tmp_path, str(store), world=2))
    for rank, res in enumerate(got):
        assert res["resumed_from"] == 5
        assert_same_run(res, want)
        assert torch.equal(res["tokens_since_fired"], want["tokens_since_fired"][rank * 48 : (rank + 1) * 48])


@pytest.mark.parametrize("d", [16, 12])  # 12: not a multiple of 16, the whole draw is sliced instead
@pytest.mark.parametrize("from_decoder", [True, False])
def test_latent_shard_initialisation_equals_the_rows_of_the_single_process_one(d, from_decoder):
    """Each rank draws only its rows of the seed's stream (no [n, d] tensor), bit for bit those of the whole draw."""
    from mi_crow.mechanistic.sae import TopKSae
    from mi_crow.mechanistic.sae.train.distributed import Layout, initialise_latent_shard, shard_sae
    from mi_crow.mechanistic.sae.train.init import initialise_weights

    x = torch.randn(300, d, generator=torch.Generator().manual_seed(1)) + 1.0
    config = training_config(init_encoder_from_decoder=from_decoder, normalize_inputs=True)
    full = TopKSae(64, d, 4)
    want_scale = initialise_weights(full, config, lambda: [x])
    for rank in range(2):
        layout = Layout("latents", rank, 2)
        shard = shard_sae(TopKSae(64, d, 4), layout)
        scale = initialise_latent_shard(shard, (64, d, 4), config, lambda: [x], layout)
        assert scale == want_scale
        lo, hi = layout.latent_slice(64)
        for name in ("W_enc", "b_enc", "W_dec"):
            assert torch.equal(getattr(shard, name), getattr(full, name)[lo:hi]), name
        assert torch.equal(shard.b_dec, full.b_dec)
