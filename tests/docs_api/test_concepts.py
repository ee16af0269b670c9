"""DOCUMENTED_API.md, "SAEs, training, concepts": text tracking, top texts, concept names and manipulation.

References are computed independently: top texts by a dense brute force over the layer's activations captured
with a plain ``register_forward_hook``; manipulated logits by a hand-written forward hook that rescales the dense
code in plain PyTorch.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mi_crow.mechanistic.sae import TopKSae

N_LATENTS, K, TOP_K = 48, 4, 3


def _sae(seed: int = 0) -> TopKSae:
    torch.manual_seed(seed)
    sae = TopKSae(n_latents=N_LATENTS, n_inputs=32, k=K, device="cpu")
    with torch.no_grad():
        sae.b_enc.uniform_(0.0, 0.2)  # most latents fire somewhere
    return sae


@pytest.fixture
def lm(tiny_gpt2):
    return tiny_gpt2


def _layer_output(lm, layer, texts):
    """The layer's output for ``texts`` (plain torch hook, no mi_crow hook involved) and the encodings."""
    captured = {}
    module = dict(lm.model.named_modules())[layer]

    def capture(_module, _inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output

    handle = module.register_forward_hook(capture)
    try:
        lm.forwards(texts, with_controllers=False)
    finally:
        handle.remove()
    return captured["h"].detach(), lm.tokenize(texts)


def _dense_code(sae: TopKSae, h: torch.Tensor) -> torch.Tensor:
    """``[..., n_latents]`` dense TopK code in plain PyTorch."""
    pre = F.relu(F.linear(h - sae.b_dec, sae.W_enc, sae.b_enc)).detach()
    values, indices = pre.topk(sae.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


def _brute_force_top_texts(lm, sae, layer, texts, top_k):
    """neuron -> [(text, activation, token_position, token)] strongest first, from the dense code."""
    h, enc = _layer_output(lm, layer, texts)
    valid = enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], lm.special_token_ids)
    dense = _dense_code(sae, h) * valid.unsqueeze(-1)  # [b, s, n]
    out = {}
    for neuron in range(sae.n_latents):
        per_text = []
        for row, text in enumerate(texts):
            acts = dense[row, :, neuron]
            best = float(acts.max())
            if best > 0:
                pos = int((acts == acts.max()).nonzero()[0])  # earliest token on a tie
                token = lm.tokenizer.convert_ids_to_tokens(int(enc["input_ids"][row, pos]))
                per_text.append((text, best, pos, token))
        per_text.sort(key=lambda e: -e[1])
        if per_text:
            out[neuron] = per_text[:top_k]
    return out


def test_top_texts_mapping_matches_a_dense_brute_force(lm, sample_texts):
    texts = sample_texts[:12]
    layer = lm.layers.resolve(1)
    sae = _sae()
    lm.attach_sae(sae, layer)
    sae.concepts.enable_text_tracking(top_k=TOP_K)
    outputs, encodings = lm.inference.execute_inference(texts)
    assert outputs.logits.shape[0] == len(texts) and encodings["input_ids"].shape[0] == len(texts)
    top = sae.concepts.get_top_texts()
    want = _brute_force_top_texts(lm, sae, layer, texts, TOP_K)
    assert len(want) > N_LATENTS // 2  # the comparison covers many neurons

    # The documented mapping reading: neurons that fired, each a list of (text, activation) pairs.
    assert sorted(top.keys()) == sorted(want)
    assert dict(top.items()).keys() == want.keys()
    for neuron, entries in top.items():
        ref = want[neuron]
        assert len(entries) == len(ref)
        for entry, (text, act, pos, token) in zip(entries, ref):
            got_text, got_act = entry  # unpacks as a pair
            assert got_text == text and got_act == pytest.approx(act, rel=1e-4, abs=1e-6)
            assert (entry.text, entry.token_position, entry.token) == (text, pos, token)
            assert entry.activation == got_act and isinstance(entry.token_id, int)
    quiet = next(i for i in range(N_LATENTS) if i not in want) if len(want) < N_LATENTS else None
    if quiet is not None:
        assert top.get(quiet, []) == [] and quiet not in top
    some = next(iter(want))
    assert top.get(some, []) is top[some] and some in top
    for text, activation in top.get(some, []):
        assert isinstance(text, str) and activation > 0
    # The same object is the list indexed by neuron that mi_crow's own code reads.
    assert len(top) == N_LATENTS and all(top[i] == [] for i in range(N_LATENTS) if i not in want)
    # JSON-able as the documented pairs.
    dumped = json.loads(json.dumps(top.to_dict()))
    assert dumped[str(some)] == [[e.text, e.activation] for e in top[some]]


def test_one_neuron_lists_and_json_export(lm, sample_texts, tmp_path):
    layer = lm.layers.resolve(1)
    sae = _sae(seed=1)
    lm.attach_sae(sae, layer)
    sae.concepts.enable_text_tracking(top_k=TOP_K)
    lm.inference.execute_inference(sample_texts[:10])
    top = sae.concepts.get_top_texts()
    neuron = top.keys()[0]
    assert sae.concepts.get_top_texts(neuron) == top[neuron]
    assert sae.concepts.get_top_texts_for_neuron(neuron) == top[neuron]
    assert sae.concepts.get_top_texts_for_neuron(neuron, top_m=1) == top[neuron][:1]
    sae.concepts.load_concepts({neuron: "first"})
    assert sae.concepts.get_top_texts("first") == top[neuron]

    path = sae.concepts.export_top_texts_to_json(tmp_path / "top.json")
    data = json.loads(path.read_text())
    rows = {row["neuron"]: row for row in data["neurons"]}
    assert sorted(rows) == top.keys()
    for n, entries in top.items():
        assert [(r["text"], r["activation"], r["token_position"], r["token"]) for r in rows[n]["top_texts"]] == [
            (e.text, e.activation, e.token_position, e.token) for e in entries
        ]
    assert rows[neuron]["name"] == "first"


def test_disable_text_tracking_stops_updates(lm, sample_texts):
    layer = lm.layers.resolve(1)
    sae = _sae(seed=2)
    lm.attach_sae(sae, layer)
    sae.concepts.enable_text_tracking(top_k=2)
    lm.inference.execute_inference(sample_texts[:6])
    before = [list(entries) for entries in sae.concepts.get_top_texts()]
    sae.concepts.disable_text_tracking()
    lm.inference.execute_inference(sample_texts[6:18])
    assert [list(entries) for entries in sae.concepts.get_top_texts()] == before
    sae.concepts.enable_text_tracking(top_k=2)
    lm.inference.execute_inference(sample_texts[6:18])
    assert [list(entries) for entries in sae.concepts.get_top_texts()] != before


def _hand_steered_logits(lm, sae, layer, texts, scales):
    """Logits with a plain forward hook adding decode(scaled code) - decode(code) to the layer output."""
    module = dict(lm.model.named_modules())[layer]
    table = torch.ones(sae.n_latents)
    for neuron, scale in scales.items():
        table[neuron] = scale

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        dense = _dense_code(sae, h)
        delta = (dense * table - dense) @ sae.W_dec.detach()
        new = h + delta
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        return lm.forwards(texts, with_controllers=False).logits
    finally:
        handle.remove()


def test_manipulation_config_reapplied_by_the_documented_loop(lm, sample_texts, store):
    texts = sample_texts[:8]
    layer = lm.layers.resolve(1)
    sae = _sae(seed=3)
    sae.save(store, "plain")  # saved before any manipulation
    lm.attach_sae(sae, layer)
    clean = lm.forwards(texts).logits
    sae.concepts.enable_text_tracking(top_k=2)
    lm.inference.execute_inference(texts)
    sae.concepts.disable_text_tracking()
    fired = sae.concepts.get_top_texts().keys()
    a, b, c = fired[0], fired[1], fired[2]

    sae.concepts.manipulate_concept(neuron_idx=a, scale=1.5)
    sae.concepts.manipulate_concept(b, 0.0)
    sae.concepts.load_concepts({c: "named"})
    sae.concepts.manipulate_concept("named", 2.0)
    sae.concepts.manipulate_concept(neuron_idx=fired[3], scale=1.0)  # 1.0 is the identity: nothing to record
    steered = lm.forwards(texts).logits
    config = sae.concepts.get_manipulation_config()
    assert config == {a: 1.5, b: 0.0, c: 2.0}
    assert not torch.equal(steered, clean)
    torch.testing.assert_close(steered, _hand_steered_logits(lm, sae, layer, texts, config), rtol=1e-4, atol=1e-4)

    # The documented save / load of the configuration: JSON, then the loop on a fresh load of the SAE.
    config = json.loads(json.dumps(config))
    lm.detach_sae(sae)
    fresh = TopKSae.load(store, "plain")
    lm.attach_sae(fresh, layer)
    assert torch.equal(lm.forwards(texts).logits, clean)
    for neuron_idx, scale in config.items():
        fresh.concepts.manipulate_concept(neuron_idx=int(neuron_idx), scale=scale)
    assert torch.equal(lm.forwards(texts).logits, steered)
    # load_manipulation_config takes the same dict.
    other = TopKSae.load(store, "plain")
    other.concepts.load_manipulation_config(config)
    assert other.concepts.get_manipulation_config() == fresh.concepts.get_manipulation_config()

    fresh.concepts.reset_manipulations()
    assert fresh.concepts.get_manipulation_config() == {}
    assert torch.equal(lm.forwards(texts).logits, clean)


def test_additive_steering_stays_its_own_call(lm, sample_texts):
    texts = sample_texts[:4]
    layer = lm.layers.resolve(1)
    sae = _sae(seed=4)
    lm.attach_sae(sae, layer)
    clean = lm.forwards(texts).logits
    sae.concepts.add_concept(5, 3.0)
    assert sae.concepts.get_manipulation_config() == {}  # only scales are in the documented config
    assert sae.concepts.manipulation_state()["additions"][0]["neuron"] == 5
    assert not torch.equal(lm.forwards(texts).logits, clean)


def test_load_concepts_names_neurons():
    sae = _sae()
    concepts = sae.concepts
    concepts.load_concepts({3: "cats", "7": "dogs"})  # keys may be strings, as after JSON
    assert concepts.find_concept("cats") == 3 and concepts.find_concept("dogs") == 7
    # Names may move between neurons named in the same call.
    concepts.load_concepts({3: "dogs", 7: "cats"})
    assert concepts.dictionary.name_of(3) == "dogs" and concepts.dictionary.name_of(7) == "cats"
    # The curated-CSV shape: several candidate names per neuron, the first one names it.
    concepts.load_concepts({9: [{"name": "family", "confidence": 0.9}, {"name": "parents", "confidence": 0.8}]})
    entry = concepts.dictionary.get(9)
    assert entry.name == "family" and "confidence=0.9" in entry.notes and "parents" in entry.notes
    concepts.manipulate_concept("family", 0.5)
    assert concepts.get_manipulation_config() == {9: 0.5}


def test_bad_concept_input_names_the_argument():
    sae = _sae()
    concepts = sae.concepts
    with pytest.raises(ValueError, match="neuron_idx and neuron_idx_or_name .*neuron_idx=1 and neuron_idx_or_name=2"):
        concepts.manipulate_concept(neuron_idx=1, neuron_idx_or_name=2, scale=1.5)
    with pytest.raises(ValueError, match=r"config\['5'\]: scale must be >= 0"):
        concepts.load_manipulation_config({"5": -1.0})
    with pytest.raises(ValueError, match=r"concepts\[4\]: name 'cats' is already used by neuron 3"):
        concepts.load_concepts({3: "cats", 4: "cats"})
    with pytest.raises(ValueError, match=rf"concepts\[{N_LATENTS}\]: .*got {N_LATENTS}"):
        concepts.load_concepts({N_LATENTS: "out of range"})
    assert len(concepts.dictionary) == 0  # nothing changed by the failed calls
    with pytest.raises(TypeError, match="top_m must be a positive int"):
        concepts.get_top_texts_for_neuron(0, top_m="3")
