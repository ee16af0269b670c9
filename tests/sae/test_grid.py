"""SaeGrid: a grid trained from one read equals the separate runs bit for bit (stored run and on the fly), resumes
exactly from its one checkpoint, writes its L0/FVU points; the frontier chart; bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae
from mi_crow.mechanistic.sae.train.grid import GridMember, SaeGrid
from mi_crow.report.frontier import frontier_svg, load_frontier, pareto_front
from mi_crow.store import LocalStore
from mi_crow.testing import SAMPLE_TEXTS, make_tiny_llama_lm

pytestmark = pytest.mark.usefixtures("one_thread")

L1, L2 = "model.layers.1", "model.layers.2"
WIDTHS = {L1: 32, L2: 32}
RUN = "r"


@pytest.fixture(scope="module")
def lm():
    return make_tiny_llama_lm()


@pytest.fixture(scope="module")
def run_store(lm, tmp_path_factory):
    store = LocalStore(tmp_path_factory.mktemp("grid"))
    lm.store = store
    lm.activations.save(SAMPLE_TEXTS, [L1, L2], run_id=RUN, batch_size=6, max_length=24, progress=False)
    return store


def _base(**kw) -> SaeTrainingConfig:
    options = dict(epochs=1, batch_size=16, log_every=5, checkpoint_every=None, progress=False, save_sae=False,
                   b_dec_init_tokens=64, shuffle_buffer_tokens=256)
    options.update(kw)
    return SaeTrainingConfig(**options)


def _weights(sae: TopKSae) -> list[torch.Tensor]:
    return [getattr(sae, name).detach().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")]


def _history(result) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in result.history]


def test_grid_from_a_stored_run_equals_separate_runs(run_store):
    grid = SaeGrid.product(WIDTHS, k=[4], n_latents=[64], seed=[0], config=_base(), store=run_store, grid_id="g1")
    assert len(grid.members) == 2
    result = grid.train(RUN)
    for member, res in zip(grid.members, result.results):
        sae = TopKSae(n_latents=64, n_inputs=32, k=member.sae.k)
        alone = SaeTrainer(sae, run_store).train(RUN, member.layer, dataclasses.replace(
            member.config, training_run_id=member.config.training_run_id + "-alone"))
        for a, b in zip(_weights(member.sae), _weights(sae)):
            assert torch.equal(a, b), member.config.training_run_id
        assert _history(res) == _history(alone)
    # The frontier points: each member's last record, written next to the SAEs.
    points = load_frontier(run_store, "g1")
    assert points == json.loads(json.dumps(result.points))
    for point, res in zip(points, result.results):
        assert point["l0"] == res.history[-1]["l0"] and point["fvu"] == res.history[-1]["fvu"]
    assert [(p["layer"], p["k"], p["n_latents"]) for p in points] == [(L1, 4, 64), (L2, 4, 64)]


def test_grid_on_the_fly_equals_single_on_the_fly_runs(lm):
    options = dict(forward_batch_size=4, max_length=24, buffer_bytes=1 << 20)
    grid = SaeGrid.product(WIDTHS, k=[4], n_latents=[64], seed=[0, 1], config=_base(seed=0), grid_id="g2")
    grid.train_from_model(lm, SAMPLE_TEXTS, **options)
    for member in grid.members:
        sae = TopKSae(n_latents=64, n_inputs=32, k=4)
        # The single run's stream is seeded by its own config's seed: give it the grid's (0), keep the member's
        # init seed by initialising the same way (reinit from the member's seed happens in initialise_weights).
        config = dataclasses.replace(member.config)
        if config.seed != 0:
            continue  # a single run shuffles with its own seed; only seed-0 members share the grid's stream
        SaeTrainer(sae).train_from_model(lm, SAMPLE_TEXTS, member.layer, config, **options)
        for a, b in zip(_weights(member.sae), _weights(sae)):
            assert torch.equal(a, b), member.config.training_run_id
    seeds = {m.config.seed: _weights(m.sae)[0] for m in grid.members if m.layer == L1}
    assert not torch.equal(seeds[0], seeds[1])  # the seed axis gives different SAEs


def test_grid_resumes_exactly_from_its_checkpoint(run_store, monkeypatch, tmp_path):
    config = _base(checkpoint_every=5, save_sae=True)

    def make(store, grid_id, resume=False):
        return SaeGrid.product({L1: 32}, k=[4], n_latents=[32, 64], config=config, store=store, grid_id=grid_id,
                               resume=resume)

    reference = make(run_store, "g3")
    ref = reference.train(RUN)

    writes = []
    original = SaeGrid._write_checkpoint

    def interrupted(self, *args):
        original(self, *args)
        writes.append(1)
        if len(writes) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(SaeGrid, "_write_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make(run_store, "g4").train(RUN)
    monkeypatch.setattr(SaeGrid, "_write_checkpoint", original)
    resumed = make(run_store, "g4", resume=True)
    got = resumed.train(RUN)
    for a_member, b_member, a, b in zip(reference.members, resumed.members, ref.results, got.results):
        assert b.resumed_from_step == 10
        for x, y in zip(_weights(a_member.sae), _weights(b_member.sae)):
            assert torch.equal(x, y)
        assert _history(a) == _history(b)
        assert TopKSae.load(run_store, b.sae_id).n_latents == b_member.sae.n_latents


def test_frontier_svg_and_pareto_front():
    points = [
        {"sae_id": "a", "layer": "x", "l0": 8.0, "fvu": 0.30},
        {"sae_id": "b", "layer": "x", "l0": 16.0, "fvu": 0.20},
        {"sae_id": "c", "layer": "y", "l0": 16.0, "fvu": 0.25},  # dominated by b
        {"sae_id": "d<&>", "layer": "y", "l0": 32.0, "fvu": 0.10},
        {"sae_id": "e", "layer": "y", "l0": 32.0, "fvu": None},  # no record: not drawn
    ]
    assert [p["sae_id"] for p in pareto_front(points)] == ["a", "b", "d<&>"]
    svg = frontier_svg(points)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count('<circle class="sae"') == 4
    assert svg.count('class="frontier"') == 1
    assert "d&lt;&amp;&gt;" in svg and "d<&>" not in svg
    assert "no data" in frontier_svg([])
    with pytest.raises(UserInputError, match="points"):
        frontier_svg([{"l0": 1.0}])


def test_bad_input(run_store):
    sae = TopKSae(n_latents=64, n_inputs=32, k=4)
    a = GridMember(sae, L1, _base(training_run_id="a"))
    with pytest.raises(UserInputError, match="same batch_size"):
        SaeGrid([a, GridMember(sae, L1, _base(training_run_id="b", batch_size=32))])
    with pytest.raises(UserInputError, match="own training_run_id"):
        SaeGrid([a, GridMember(sae, L1, _base(training_run_id="a"))])
    with pytest.raises(UserInputError, match="k"):
        SaeGrid.product(WIDTHS, k=[128], n_latents=[64])
    with pytest.raises(UserInputError, match="has width 32 but SAE .* has n_inputs=16"):
        SaeGrid.product({L1: 16}, k=[4], n_latents=[64], config=_base(), store=run_store).train(RUN)
