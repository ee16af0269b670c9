"""Manipulation of SAE codes (``modify_code``) against dense references, the config round trip, and bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mi_crow.hooks import BatchContext
from mi_crow.mechanistic.sae.concepts import AutoencoderConcepts

N, K = 12, 3


def dense(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Scatter a code into ``[..., N]`` (summing repeated indices), the reference every modified code is read by."""
    return torch.zeros(*values.shape[:-1], N, dtype=values.dtype).scatter_add(-1, indices, values)


def random_code(b: int = 2, s: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(b, s, K, generator=g).sort(dim=-1, descending=True).values
    indices = torch.rand(b, s, N, generator=g).topk(K, dim=-1).indices
    return values, indices


def make_concepts(context=None) -> AutoencoderConcepts:
    return AutoencoderConcepts(SimpleNamespace(n_latents=N, context=context))


def context_for(mask: torch.Tensor, step: int | None = None) -> BatchContext:
    ids = torch.where(mask.bool(), 5, 0)
    return BatchContext(["t"] * mask.shape[0], ids, mask, mask == 0, None, generation_step=step)


def test_nothing_to_do_returns_none():
    concepts = make_concepts()
    values, indices = random_code()
    assert concepts.modify_code(values, indices) is None
    assert not concepts.has_manipulations
    concepts.manipulate_concept(1, 0.0)
    concepts.reset_manipulations()
    assert concepts.modify_code(values, indices) is None


def test_scales_match_dense_reference():
    concepts = make_concepts()
    values, indices = random_code()
    concepts.manipulate_concept(int(indices[0, 0, 0]), 0.0)
    concepts.manipulate_concept(int(indices[1, 2, 1]), 1.5)
    new_v, new_i = concepts.modify_code(values, indices)
    assert new_v.shape == values.shape and torch.equal(new_i, indices)
    scale = torch.ones(N)
    scale[int(indices[0, 0, 0])] = 0.0
    scale[int(indices[1, 2, 1])] = 1.5
    torch.testing.assert_close(dense(new_v, new_i), dense(values, indices) * scale)
    # Values of other neurons are untouched, bit for bit.
    untouched = (scale[indices] == 1.0)
    assert torch.equal(new_v[untouched], values[untouched])


def test_scales_keep_dtype():
    concepts = make_concepts()
    values, indices = random_code()
    concepts.manipulate_concept(int(indices[0, 0, 0]), 0.5)
    new_v, _ = concepts.modify_code(values.to(torch.bfloat16), indices)
    assert new_v.dtype == torch.bfloat16


def test_additions_everywhere_and_by_name():
    concepts = make_concepts()
    concepts.name_concept(7, "steer")
    concepts.add_concept("steer", 2.5)
    concepts.add_concept(3, -1.0)
    values, indices = random_code()
    new_v, new_i = concepts.modify_code(values, indices)
    assert new_v.shape == (2, 5, K + 2)
    assert torch.equal(new_v[..., :K], values) and torch.equal(new_i[..., :K], indices)
    want = dense(values, indices)
    want[..., 7] += 2.5
    want[..., 3] -= 1.0
    torch.testing.assert_close(dense(new_v, new_i), want)


@pytest.mark.parametrize("side", ["left", "right"])
def test_addition_positions_count_each_texts_own_tokens(side):
    lengths = [5, 3]
    s = 5
    mask = torch.zeros(2, s, dtype=torch.int64)
    for r, n in enumerate(lengths):
        if side == "right":
            mask[r, :n] = 1
        else:
            mask[r, s - n:] = 1
    concepts = make_concepts(context_for(mask))
    concepts.add_concept(4, 1.0, positions=[0, -1, 4])
    values, indices = random_code(2, s)
    new_v, new_i = concepts.modify_code(values, indices)
    added = new_v[..., K]
    expected = torch.zeros(2, s)
    for r, n in enumerate(lengths):
        start = 0 if side == "right" else s - n
        for p in (0, n - 1, 4):
            if p < n:
                expected[r, start + p] = 1.0
    assert torch.equal(added, expected)
    assert bool((new_i[..., K] == 4).all())


def test_addition_positions_follow_generation():
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # prompt lengths 3 and 4, left padded
    sae = SimpleNamespace(n_latents=N, context=context_for(prompt_mask, step=0))
    concepts = AutoencoderConcepts(sae)
    concepts.add_concept(1, 1.0, positions=[-1, 4])
    values, indices = random_code(2, 4)
    step0 = concepts.modify_code(values, indices)[0][..., K]
    assert torch.equal(step0, torch.tensor([[0.0, 0, 0, 1], [0, 0, 0, 1]]))
    one = torch.ones(2, 1, dtype=torch.int64)
    v1, i1 = random_code(2, 1, seed=1)
    # Step n feeds the n-th generated token: text position prompt_len + n - 1.
    sae.context = context_for(one, step=1)  # positions 3 and 4
    assert concepts.modify_code(v1, i1)[0][..., K].tolist() == [[1.0], [1.0]]
    sae.context = context_for(one, step=2)  # positions 4 and 5: -1 always, 4 only for the first text
    assert concepts.modify_code(v1, i1)[0][..., K].tolist() == [[1.0], [1.0]]
    concepts.add_concept(1, 1.0, positions=[4])
    assert concepts.modify_code(v1, i1)[0][..., K].tolist() == [[1.0], [0.0]]
    sae.context = context_for(one, step=1)
    assert concepts.modify_code(v1, i1)[0][..., K].tolist() == [[0.0], [1.0]]


def test_addition_positions_without_context_index_the_sequence_axis():
    concepts = make_concepts()
    concepts.add_concept(2, 3.0, positions=[1, -1])
    values, indices = random_code(2, 4)
    added = concepts.modify_code(values, indices)[0][..., K]
    assert torch.equal(added, torch.tensor([[0.0, 3, 0, 3], [0, 3, 0, 3]]))
    flat = concepts.modify_code(values.reshape(8, K), indices.reshape(8, K))[0][..., K]
    assert flat.shape == (8,) and flat.tolist() == [0, 3, 0, 0, 0, 0, 0, 3]


def test_manipulation_config_round_trip():
    concepts = make_concepts()
    concepts.name_concept(6, "six")
    concepts.manipulate_concept("six", 0.0)
    concepts.manipulate_concept(2, 1.5)
    concepts.add_concept(9, 4.0, positions=[-1, 0, 0])
    concepts.add_concept(1, -0.5)
    cfg = concepts.manipulation_state()
    cfg = json.loads(json.dumps(cfg))  # JSON-able
    assert cfg["scales"] == [{"neuron": 2, "name": None, "scale": 1.5}, {"neuron": 6, "name": "six", "scale": 0.0}]
    assert cfg["additions"][1] == {"neuron": 9, "name": None, "activation": 4.0, "positions": [-1, 0],
                                   "relative": False, "exclude_special": False}
    other = make_concepts()
    other.load_manipulation_state(cfg)
    assert other.manipulation_state() == {**cfg, "scales": [dict(e, name=None) for e in cfg["scales"]]}
    values, indices = random_code()
    for a, b in zip(other.modify_code(values, indices), concepts.modify_code(values, indices)):
        assert torch.equal(a, b)
    # Entries may name a concept instead of a neuron.
    named = make_concepts()
    named.name_concept(5, "five")
    named.load_manipulation_state({"scales": [{"name": "five", "scale": 2.0}]})
    assert named.manipulation_state()["scales"] == [{"neuron": 5, "name": "five", "scale": 2.0}]


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda c: c.manipulate_concept(N, 1.0), ValueError, r"in \[0, 12\).*got 12"),
        (lambda c: c.manipulate_concept(-1, 1.0), ValueError, r"got -1"),
        (lambda c: c.manipulate_concept("nobody", 1.0), ValueError, "unknown concept name 'nobody'"),
        (lambda c: c.manipulate_concept(1.0, 1.0), TypeError, "neuron_idx_or_name must be an int"),
        (lambda c: c.manipulate_concept(1, -0.5), ValueError, r"scale must be >= 0.*got -0.5"),
        (lambda c: c.manipulate_concept(1, "2"), TypeError, "scale must be a real number, got str"),
        (lambda c: c.manipulate_concept(1, None), TypeError, "scale must be a real number"),
        (lambda c: c.manipulate_concept(1, float("nan")), ValueError, "scale must be finite"),
        (lambda c: c.manipulate_concept(1, True), TypeError, "scale must be a real number, got bool"),
        (lambda c: c.add_concept(1, "x"), TypeError, "activation must be a real number"),
        (lambda c: c.add_concept(1, float("inf")), ValueError, "activation must be finite"),
        (lambda c: c.add_concept(N, 1.0), ValueError, r"in \[0, 12\)"),
        (lambda c: c.add_concept(1, 1.0, positions=[]), ValueError, "positions must be None"),
        (lambda c: c.add_concept(1, 1.0, positions=[1.5]), TypeError, "positions must contain ints"),
        (lambda c: c.add_concept(1, 1.0, positions="12"), TypeError, "positions must be None or a sequence"),
        (lambda c: c.add_concept(1, 1.0, positions=3), TypeError, "positions must be None or a sequence"),
    ],
)
def test_bad_manipulations(call, exc, match):
    concepts = make_concepts()
    with pytest.raises(exc, match=match):
        call(concepts)
    assert not concepts.has_manipulations


@pytest.mark.parametrize(
    "cfg,exc,match",
    [
        ([], TypeError, "config must be a dict"),
        ({"scale": []}, ValueError, "unknown keys"),
        ({"version": 3}, ValueError, "config version must be 1 or 2"),
        ({"caps": [{"neuron": 1, "value": float("inf")}]}, ValueError, r"config\[.caps.\]\[0\]: cap must be finite"),
        ({"scales": {}}, TypeError, r"config\['scales'\] must be a list"),
        ({"scales": [{"neuron": 1}]}, ValueError, r"config\['scales'\]\[0\]: missing 'scale'"),
        ({"scales": [{"scale": 1.0}]}, ValueError, r"config\['scales'\]\[0\] needs a 'neuron'"),
        ({"scales": [{"neuron": 1, "scale": 1.0}, {"neuron": 99, "scale": 1.0}]}, ValueError,
         r"config\['scales'\]\[1\]: neuron_idx_or_name must be in"),
        ({"additions": [{"neuron": 1, "activation": 1.0, "positions": []}]}, ValueError,
         r"config\['additions'\]\[0\]: positions must be None"),
        ({"additions": [{"name": "ghost", "activation": 1.0}]}, ValueError, "unknown concept name 'ghost'"),
    ],
)
def test_bad_manipulation_config_changes_nothing(cfg, exc, match):
    concepts = make_concepts()
    concepts.manipulate_concept(0, 0.25)
    before = concepts.get_manipulation_config()
    with pytest.raises(exc, match=match):
        concepts.load_manipulation_config(cfg)
    assert concepts.get_manipulation_config() == before
