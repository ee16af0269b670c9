"""Steering modes (add, clamp, cap, ablate, relative strengths, special tokens) against hand-computed residuals,
positional steering with and without a KV cache on a real (tiny) model, and bad input (issue 17)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mi_crow.hooks import BatchContext
from mi_crow.mechanistic.sae import TopKSae
from mi_crow.mechanistic.sae.concepts import AutoencoderConcepts

pytestmark = pytest.mark.usefixtures("one_thread")

N, D, K = 10, 6, 3


def fake_sae(context=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, D, generator=g)
    w[2] *= 3.0  # a row of norm != 1: relative values and caps must use the unit direction
    return SimpleNamespace(n_latents=N, context=context, W_dec=w)


def random_code(b=2, s=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(b, s, K, generator=g).sort(dim=-1, descending=True).values
    indices = torch.rand(b, s, N, generator=g).topk(K, dim=-1).indices
    x = torch.randn(b, s, D, generator=g) * 4
    return values, indices, x


def residual_change(sae, values, indices, new):
    """What the SAE adds to the layer output: decode(new) - decode(old), computed densely by hand."""
    new_v, new_i = new
    dense_old = torch.zeros(*values.shape[:-1], N).scatter_add(-1, indices, values)
    dense_new = torch.zeros(*new_v.shape[:-1], N).scatter_add(-1, new_i, new_v)
    return (dense_new - dense_old) @ sae.W_dec


def test_relative_add_has_the_asked_norm_along_the_unit_direction():
    sae = fake_sae()
    concepts = AutoencoderConcepts(sae)
    values, indices, x = random_code()
    concepts.add_concept(2, strength=0.5)
    delta = residual_change(sae, values, indices, concepts.modify_code(values, indices, x))
    unit = sae.W_dec[2] / sae.W_dec[2].norm()
    want = 0.5 * x.norm(dim=-1, keepdim=True) * unit
    torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-5)


def test_clamp_sets_the_latent_to_the_value_where_it_fired_or_not():
    sae = fake_sae()
    concepts = AutoencoderConcepts(sae)
    values, indices, x = random_code()
    neuron = int(indices[0, 0, 0])  # fires at [0, 0] with some value
    concepts.clamp_concept(neuron, 2.0)
    new = concepts.modify_code(values, indices, x)
    dense_new = torch.zeros(2, 4, N).scatter_add(-1, new[1], new[0])
    dense_old = torch.zeros(2, 4, N).scatter_add(-1, indices, values)
    assert torch.allclose(dense_new[..., neuron], torch.full((2, 4), 2.0))
    others = [j for j in range(N) if j != neuron]
    assert torch.equal(dense_new[..., others], dense_old[..., others])


def test_projection_cap_limits_the_projection_and_nothing_else():
    sae = fake_sae()
    concepts = AutoencoderConcepts(sae)
    values, indices, x = random_code(seed=3)
    unit = sae.W_dec[2] / sae.W_dec[2].norm()
    cap = 0.5
    concepts.cap_concept(2, cap)
    delta = residual_change(sae, values, indices, concepts.modify_code(values, indices, x))
    steered = x + delta
    proj_before = x @ unit
    proj_after = steered @ unit
    assert bool((proj_before > cap).any()) and bool((proj_before < cap).any())  # both cases are exercised
    torch.testing.assert_close(proj_after, torch.minimum(proj_before, torch.tensor(cap)), rtol=1e-5, atol=1e-5)
    # Only the direction's component changed.
    torch.testing.assert_close(steered - proj_after.unsqueeze(-1) * unit, x - proj_before.unsqueeze(-1) * unit,
                               rtol=1e-5, atol=1e-5)


def test_ablate_and_steer_dispatch():
    sae = fake_sae()
    concepts = AutoencoderConcepts(sae)
    values, indices, x = random_code()
    neuron = int(indices[1, 2, 0])
    concepts.steer(neuron, "ablate")
    assert concepts.get_manipulation_config() == {neuron: 0.0}
    new_v, new_i = concepts.modify_code(values, indices, x)
    assert bool((new_v[new_i == neuron] == 0).all())
    concepts.reset_manipulations()
    concepts.steer(neuron, "add", strength=1.0, exclude_special=True)
    assert concepts.manipulation_state()["additions"][0]["relative"] is True
    concepts.steer(neuron, "clamp", 3.0)
    assert concepts.manipulation_state()["additions"] == [] and concepts.manipulation_state()["clamps"][0]["value"] == 3.0


def test_exclude_special_leaves_special_tokens_and_padding_alone():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ids = torch.tensor([[7, 5, 5, 0], [7, 5, 7, 5]])
    special = (ids == 7) | (mask == 0)
    context = BatchContext(["a", "b"], ids, mask, special, None)
    sae = fake_sae(context)
    concepts = AutoencoderConcepts(sae)
    values, indices, x = random_code()
    concepts.add_concept(1, 2.0, exclude_special=True)
    added = concepts.modify_code(values, indices, x)[0][..., K]
    assert torch.equal(added, torch.where(special, 0.0, 2.0))


def test_state_round_trips_every_mode():
    sae = fake_sae()
    concepts = AutoencoderConcepts(sae)
    concepts.add_concept(1, strength=0.25, positions=[0, -1], exclude_special=True)
    concepts.clamp_concept(2, 4.0)
    concepts.cap_concept(3, strength=0.1)
    concepts.manipulate_concept(4, 1.5)
    state = concepts.manipulation_state()
    other = AutoencoderConcepts(fake_sae())
    other.load_manipulation_state(state)
    assert other.manipulation_state() == state
    values, indices, x = random_code()
    torch.testing.assert_close(other.modify_code(values, indices, x), concepts.modify_code(values, indices, x))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda c: c.add_concept(N, 1.0), ValueError, rf"in \[0, {N}\).*got {N}"),
        (lambda c: c.clamp_concept("nobody", 1.0), ValueError, "unknown concept name 'nobody'"),
        (lambda c: c.add_concept(1, strength=float("inf")), ValueError, "strength must be finite"),
        (lambda c: c.cap_concept(1, float("nan")), ValueError, "cap must be finite"),
        (lambda c: c.add_concept(1), ValueError, "exactly one of activation .* and strength"),
        (lambda c: c.add_concept(1, 1.0, strength=1.0), ValueError, "exactly one of activation"),
        (lambda c: c.steer(1, "boost", 1.0), ValueError, "mode"),
        (lambda c: c.steer(1, "ablate", 1.0), ValueError, "takes no value"),
        (lambda c: c.steer(1, "scale", 1.0, positions=[0]), ValueError, "positions, strength"),
        (lambda c: c.add_concept(1, 1.0, positions=[0.5]), TypeError, "positions must contain ints"),
    ],
)
def test_bad_steering_input(call, exc, match):
    concepts = AutoencoderConcepts(fake_sae())
    with pytest.raises(exc, match=match):
        call(concepts)
    assert not concepts.has_manipulations


def test_positions_outside_every_text_are_an_error():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    context = BatchContext(["a", "b"], mask * 5, mask, mask == 0, None)
    concepts = AutoencoderConcepts(fake_sae(context))
    values, indices, x = random_code()
    concepts.add_concept(1, 1.0, positions=[2])  # only the first text has a third token: fine
    assert concepts.modify_code(values, indices, x)[0][..., K].sum() == 1.0
    concepts.add_concept(1, 1.0, positions=[3])
    with pytest.raises(ValueError, match=r"positions \[3\] are outside every text.*\[3, 2\]"):
        concepts.modify_code(values, indices, x)
    concepts.add_concept(1, 1.0, positions=[-4])
    with pytest.raises(ValueError, match=r"positions \[-4\]"):
        concepts.modify_code(values, indices, x)
    no_context = AutoencoderConcepts(fake_sae())
    no_context.add_concept(1, 1.0, positions=[4])
    with pytest.raises(ValueError, match=r"positions \[4\] are outside the sequence of 4 tokens"):
        no_context.modify_code(values, indices, x)


def _steered_text_positions(lm, sae, prompts, use_cache):
    """Generate with the SAE attached; return, per prompt row, the set of text positions that received the
    addition, reading each forward's context the way the model saw it (independently of the steering code)."""
    hit: list[set[int]] = [set() for _ in prompts]
    original = sae.concepts.modify_code
    prompt_len: dict[int, int] = {}

    def recording(values, indices, *args, **kwargs):
        out = original(values, indices, *args, **kwargs)
        ctx = sae.context
        added = out[0][..., -1] != 0  # the addition's column
        mask = ctx.attention_mask.bool()
        step = ctx.generation_step
        if step == 0:
            for r in range(mask.shape[0]):
                prompt_len[r] = int(mask[r].sum())
        for r in range(mask.shape[0]):
            if ctx.input_ids.shape[1] == 1:  # cached step: the fed token is the text's newest
                positions = [prompt_len[r] + step - 1]
            else:  # the whole text is fed (step 0, or every step without a cache)
                positions = (mask[r].long().cumsum(0) - 1).tolist()
            for col, pos in enumerate(positions):
                if mask[r, col] and added[r, col]:
                    hit[r].add(pos)
        return out

    sae.concepts.modify_code = recording
    try:
        lm.generate(prompts, max_new_tokens=5, use_cache=use_cache)
    finally:
        del sae.concepts.modify_code
    return hit


@pytest.mark.parametrize("use_cache", [True, False])
def test_positional_steering_hits_the_intended_tokens_with_and_without_kv_cache(tiny_llama, use_cache):
    lm = tiny_llama
    sae = TopKSae(16, lm.layers.width(1), 2)
    sae.reset_parameters(generator=torch.Generator().manual_seed(0))
    lm.attach_sae(sae, 1)
    prompts = ["the cat sat on the mat", "a dog"]
    lengths = [len(ids) for ids in lm.tokenizer(prompts)["input_ids"]]
    target = lengths[1] + 2  # inside the first prompt, a generated token of the second
    assert target < lengths[0]
    sae.concepts.add_concept(3, 5.0, positions=[1, target])
    hit = _steered_text_positions(lm, sae, prompts, use_cache)
    assert hit == [{1, target}, {1, target}]


def test_row_scales_multiply_each_texts_edit_value():
    sae = fake_sae()
    concepts = AutoencoderConcepts(sae)
    values, indices, x = random_code(b=3)
    concepts.add_concept(2, strength=1.0)
    concepts._steering.row_scales = torch.tensor([0.0, 0.5, 2.0])
    delta = residual_change(sae, values, indices, concepts.modify_code(values, indices, x))
    unit = sae.W_dec[2] / sae.W_dec[2].norm()
    want = torch.tensor([0.0, 0.5, 2.0]).view(3, 1, 1) * x.norm(dim=-1, keepdim=True) * unit
    torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-5)
    concepts._steering.row_scales = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"row_scales holds 2 values but this forward's code has leading shape "
                                         r"\(3, 4\)"):
        concepts.modify_code(values, indices, x)
    concepts.reset_manipulations()
    assert concepts._steering.row_scales is None
