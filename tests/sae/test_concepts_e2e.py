"""Concepts through a real (tiny) LanguageModel: tracking vs a brute-force reference, steering vs a hand-made
FunctionController, generation, and saving with the SAE."""

from __future__ import annotations

import pytest
import torch

from mi_crow.hooks import FunctionController, LayerActivationDetector
from mi_crow.mechanistic.sae import TopKSae

LAYER = 1
N_LATENTS, K, TOP_K = 48, 4, 3


def make_sae(lm, seed: int = 0) -> TopKSae:
    sae = TopKSae(N_LATENTS, lm.layers.width(LAYER), K)
    sae.reset_parameters(generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        # A small negative encoder bias keeps some of the top-k values at 0, as in a trained SAE.
        sae.b_enc.fill_(-0.05)
    return sae


def reference_top_texts(lm, sae, texts, top_k):
    """Every text alone (no padding): the dense SAE code of every token, reduced in plain Python."""
    detector = LayerActivationDetector(LAYER)
    special = set(lm.special_token_ids.tolist())
    best: list[dict[str, tuple[float, int, str]]] = [dict() for _ in range(sae.n_latents)]
    with lm.layers.hooks({LAYER: detector}):
        for text in texts:
            lm.forwards([text])
            ids = lm.tokenize([text])["input_ids"][0].tolist()
            codes = sae.encode_dense(detector.activations)[0].tolist()  # [seq, n_latents]
            tokens = lm.tokenizer.convert_ids_to_tokens(ids)
            for pos, (row, tok_id) in enumerate(zip(codes, ids)):
                if tok_id in special:
                    continue
                for neuron, value in enumerate(row):
                    if value > 0 and (text not in best[neuron] or value > best[neuron][text][0]):
                        best[neuron][text] = (value, pos, tokens[pos])
    out = []
    for neuron in range(sae.n_latents):
        ranked = sorted(best[neuron].items(), key=lambda item: -item[1][0])[:top_k]
        out.append([(text, v, pos, tok) for text, (v, pos, tok) in ranked])
    return out


def assert_same_top_texts(got, want, atol=1e-4):
    """Same texts, positions and tokens in the same order and close activations; near-ties may swap."""
    assert len(got) == len(want)
    for neuron, (g_list, w_list) in enumerate(zip(got, want)):
        assert len(g_list) == len(w_list), f"neuron {neuron}"
        w_by_text = {w[0]: w for w in w_list}
        for rank, (g, w) in enumerate(zip(g_list, w_list)):
            g = tuple(g)[:4]
            assert g[1] == pytest.approx(w[1], abs=atol), f"neuron {neuron} rank {rank}"
            if g[0] != w[0]:  # a tie up to float noise between two texts: allowed, but then it must be that tie
                assert g[0] in w_by_text and abs(w_by_text[g[0]][1] - w[1]) <= atol, f"neuron {neuron} rank {rank}"
                g_ref = w_by_text[g[0]]
                assert (g[2], g[3]) == (g_ref[2], g_ref[3])
            else:
                assert (g[2], g[3]) == (w[2], w[3]), f"neuron {neuron} rank {rank}"


def tracked(sae):
    return [[(r.text, r.activation, r.token_position, r.token) for r in recs] for recs in sae.concepts.get_top_texts()]


def test_tracking_matches_bruteforce_reference(tiny_lm, sample_texts):
    sae = make_sae(tiny_lm)
    want = reference_top_texts(tiny_lm, sae, sample_texts, TOP_K)
    assert sum(len(w) for w in want) > N_LATENTS  # the reference is not trivially empty
    tiny_lm.attach_sae(sae, LAYER)
    sae.concepts.enable_text_tracking(top_k=TOP_K)
    tiny_lm.inference.execute_inference(sample_texts, batch_size=5)
    assert_same_top_texts(tracked(sae), want)
    n_tokens = sum(
        sum(1 for t in tiny_lm.tokenize([x])["input_ids"][0].tolist() if t not in set(tiny_lm.special_token_ids.tolist()))
        for x in sample_texts
    )
    assert sae.concepts.neuron_stats().tokens_seen == n_tokens


def test_batch_size_and_padding_side_do_not_change_the_result(tiny_llama, sample_texts):
    lm = tiny_llama
    sae = make_sae(lm, seed=1)
    lm.attach_sae(sae, LAYER)
    sae.concepts.enable_text_tracking(top_k=TOP_K)
    runs = []
    for batch_size in (1, 7, None):
        sae.concepts.reset_tracking()
        lm.inference.execute_inference(sample_texts, batch_size=batch_size)  # right padding
        runs.append(tracked(sae))
    sae.concepts.reset_tracking()
    for start in range(0, len(sample_texts), 6):
        chunk = sample_texts[start:start + 6]
        lm.inference.forward_encoded(chunk, lm.tokenize(chunk, padding_side="left"))
    runs.append(tracked(sae))
    for other in runs[1:]:
        assert_same_top_texts(other, runs[0])


def test_tracking_through_activations_save_and_generate(tiny_gpt2, sample_texts):
    lm = tiny_gpt2
    sae = make_sae(lm, seed=2)
    lm.attach_sae(sae, LAYER)
    sae.concepts.enable_text_tracking(top_k=TOP_K)
    lm.inference.execute_inference(sample_texts, batch_size=8)
    want = tracked(sae)
    sae.concepts.reset_tracking()
    lm.activations.save(sample_texts, layers=[LAYER + 1], batch_size=8, progress=False)
    assert_same_top_texts(tracked(sae), want)
    # generate: the prompt forward is tracked (left padded), the generated tokens are not.
    sae.concepts.reset_tracking()
    lm.generate(sample_texts[:6], max_new_tokens=3)
    sae.concepts.reset_tracking()
    lm.inference.execute_inference(sample_texts[:6])
    want_prompts = tracked(sae)
    sae.concepts.reset_tracking()
    lm.generate(sample_texts[:6], max_new_tokens=3)
    assert_same_top_texts(tracked(sae), want_prompts)


def test_attaching_without_manipulation_leaves_logits_equal(tiny_lm, sample_texts):
    base = tiny_lm.forwards(sample_texts[:6]).logits
    sae = make_sae(tiny_lm)
    tiny_lm.attach_sae(sae, LAYER)
    assert torch.equal(tiny_lm.forwards(sample_texts[:6]).logits, base)
    sae.concepts.enable_text_tracking(top_k=2)
    assert torch.equal(tiny_lm.forwards(sample_texts[:6]).logits, base)


def strongest_neuron(lm, sae, texts):
    sae.concepts.enable_text_tracking(top_k=1)
    lm.forwards(texts)
    stats = sae.concepts.neuron_stats()
    sae.concepts.disable_text_tracking()
    neuron = int(torch.argmax(stats.firing_count.to(torch.float64) * stats.mean_activation))
    assert int(stats.firing_count[neuron]) > 0
    return neuron


@pytest.mark.parametrize("scale", [0.0, 1.5])
def test_manipulation_matches_a_hand_made_controller(tiny_lm, sample_texts, scale):
    texts = sample_texts[:8]
    lm = tiny_lm
    base = lm.forwards(texts).logits
    sae = make_sae(lm, seed=3)
    lm.attach_sae(sae, LAYER)
    neuron = strongest_neuron(lm, sae, texts)
    sae.concepts.manipulate_concept(neuron, scale)
    steered = lm.forwards(texts).logits

    lm.detach_sae(sae)

    def change_neuron(h):
        code = sae.encode(h)
        values = torch.where(code.indices == neuron, code.values * scale, code.values)
        return h + sae.decode((values, code.indices)) - sae.decode(code)

    with lm.layers.hooks({LAYER: FunctionController(change_neuron)}):
        reference = lm.forwards(texts).logits
    torch.testing.assert_close(steered, reference, rtol=0, atol=1e-6)
    mask = lm.tokenize(texts)["attention_mask"].bool()
    assert float((steered - base)[mask].abs().max()) > 1e-3  # the manipulation really changed the model

    lm.attach_sae(sae, LAYER)
    sae.concepts.reset_manipulations()
    assert torch.equal(lm.forwards(texts).logits, base)


def test_add_concept_adds_the_decoder_direction(tiny_lm, sample_texts):
    texts = sample_texts[:8]
    lm = tiny_lm
    sae = make_sae(lm, seed=4)
    lm.attach_sae(sae, LAYER)
    neuron, amount = 5, 3.0
    sae.concepts.name_concept(neuron, "five")
    sae.concepts.add_concept("five", amount, positions=[-1])
    steered = lm.forwards(texts).logits
    lm.detach_sae(sae)
    mask = lm.tokenize(texts)["attention_mask"]
    last = mask.sum(dim=1) - 1  # right padding: each text's last real token
    direction = sae.W_dec[neuron].detach()

    def add_at_last(h):
        out = h.clone()
        out[torch.arange(h.shape[0]), last] += amount * direction
        return out

    with lm.layers.hooks({LAYER: FunctionController(add_at_last)}):
        reference = lm.forwards(texts).logits
    torch.testing.assert_close(steered, reference, rtol=1e-5, atol=1e-5)


def test_steered_generation_differs_and_reset_restores_it(tiny_lm, sample_texts):
    prompts = sample_texts[:4]
    lm = tiny_lm
    plain = lm.generate(prompts, max_new_tokens=6)
    sae = make_sae(lm, seed=5)
    lm.attach_sae(sae, LAYER)
    assert lm.generate(prompts, max_new_tokens=6) == plain
    sae.concepts.add_concept(7, 20.0)
    steered = lm.generate(prompts, max_new_tokens=6)
    assert steered != plain
    sae.concepts.reset_manipulations()
    assert lm.generate(prompts, max_new_tokens=6) == plain


def test_concepts_are_saved_and_loaded_with_the_sae(tiny_gpt2, store, sample_texts):
    sae = make_sae(tiny_gpt2)
    sae.concepts.name_concept(3, "three", "notes")
    sae.concepts.manipulate_concept("three", 0.0)
    sae.concepts.add_concept(4, 1.5, positions=[-1])
    sae.save(store, "with_concepts")
    base = tiny_gpt2.forwards(sample_texts[:4]).logits
    loaded = TopKSae.load(store, "with_concepts")
    assert loaded.concepts.dictionary == sae.concepts.dictionary
    # A loaded SAE steers nothing until asked: attached, it leaves a plain forward unchanged, bit for bit.
    assert not loaded.concepts.has_manipulations
    tiny_gpt2.attach_sae(loaded, LAYER)
    assert torch.equal(tiny_gpt2.forwards(sample_texts[:4]).logits, base)
    # The saved steering is there on request, and then it changes the forward.
    assert loaded.concepts.saved_manipulations == sae.concepts.manipulation_state()
    loaded.concepts.apply_saved_manipulations()
    assert loaded.concepts.manipulation_state() == sae.concepts.manipulation_state()
    assert not torch.equal(tiny_gpt2.forwards(sample_texts[:4]).logits, base)
    tiny_gpt2.detach_sae(loaded)
    steered = TopKSae.load(store, "with_concepts", manipulations=True)
    assert steered.concepts.manipulation_state() == sae.concepts.manipulation_state()


def test_tracking_without_a_language_model_is_a_clear_error(tiny_gpt2):
    sae = make_sae(tiny_gpt2)
    sae.concepts.enable_text_tracking(top_k=2)
    with pytest.raises(RuntimeError, match="attach it to a LanguageModel"):
        sae.modify_activations(None, None, torch.randn(2, 3, sae.n_inputs))
