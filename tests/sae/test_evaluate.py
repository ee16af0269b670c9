"""evaluate(): every number against a hand computation with plain HF calls and torch hooks on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from mi_crow.mechanistic.sae import TopKSae, evaluate

LAYER = 1  # the block of the evaluate_trained fixture (tests/sae/conftest.py)


pytestmark = pytest.mark.usefixtures("one_thread")


def _hidden_states(lm, texts, max_length):
    enc = lm.tokenize(texts, max_length=max_length, padding_side="right")
    captured = {}
    module = lm.layers.get_module(LAYER)
    handle = module.register_forward_hook(lambda m, a, out: captured.setdefault("h", out.detach().clone()))
    with torch.no_grad():
        lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    handle.remove()
    return enc, captured["h"]


def _hf_loss(lm, enc, replace=None) -> float:
    """HF's own causal-LM loss (labels, -100 on padding) with an optional torch hook replacing the layer output."""
    module = lm.layers.get_module(LAYER)
    handle = module.register_forward_hook(lambda m, a, out: replace(out)) if replace is not None else None
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    try:
        with torch.no_grad():
            out = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
    finally:
        if handle is not None:
            handle.remove()
    return float(out.loss)


def test_evaluate_matches_hand_computation(evaluate_trained, sample_texts):
    lm, sae = evaluate_trained
    texts = sample_texts[:10]
    result = evaluate(sae, lm, texts, LAYER, batch_size=len(texts), max_length=32)

    enc, hidden = _hidden_states(lm, texts, 32)
    real = enc["attention_mask"].bool()
    x = hidden[real]
    with torch.no_grad():
        out = sae(x)
    dense = sae.encode_dense(x).detach()
    fvu = float((x - out.reconstruction).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    l0 = float((dense > 0).sum(dim=1).float().mean())
    dead = float(((dense > 0).sum(dim=0) == 0).float().mean())

    clean = _hf_loss(lm, enc)
    with torch.no_grad():
        spliced = _hf_loss(lm, enc, lambda h: sae(h).reconstruction)
    zeroed = _hf_loss(lm, enc, torch.zeros_like)

    assert result["n_tokens"] == real.sum()
    assert result["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert result["mse"] == pytest.approx(float((x - out.reconstruction).pow(2).mean()), rel=1e-4)
    assert result["l0"] == pytest.approx(l0, rel=1e-6)
    assert result["dead_fraction"] == pytest.approx(dead, abs=1e-9)
    assert result["loss_clean"] == pytest.approx(clean, rel=1e-5)
    assert result["loss_sae"] == pytest.approx(spliced, rel=1e-5)
    assert result["loss_zero"] == pytest.approx(zeroed, rel=1e-5)
    # The ratio amplifies float32 noise of HF's losses; the losses are checked above, the formula here.
    recovered = (result["loss_zero"] - result["loss_sae"]) / (result["loss_zero"] - result["loss_clean"])
    assert result["loss_recovered"] == pytest.approx(recovered, rel=1e-12)
    assert result["loss_recovered"] == pytest.approx((zeroed - spliced) / (zeroed - clean), rel=1e-3)
    assert result["delta_loss"] == pytest.approx(result["loss_sae"] - result["loss_clean"], rel=1e-12)


def test_evaluate_is_token_weighted_across_batches(evaluate_trained, sample_texts):
    lm, sae = evaluate_trained
    texts = sample_texts[:10]
    one = evaluate(sae, lm, texts, LAYER, batch_size=10, max_length=32)
    several = evaluate(sae, lm, texts, LAYER, batch_size=3, max_length=32)
    for key in one:
        assert several[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_evaluate_ignores_attached_controllers_and_uses_recorded_layer(evaluate_trained, sample_texts):
    lm, sae = evaluate_trained
    texts = sample_texts[:5]
    base = evaluate(sae, lm, texts, LAYER, batch_size=5, max_length=32)
    sae.metadata["layer"] = lm.layers.resolve(LAYER)
    sae.concepts.manipulate_concept(0, 0.0)
    lm.attach_sae(sae, LAYER)
    again = evaluate(sae, lm, texts, batch_size=5, max_length=32)
    lm.detach_sae(sae)
    assert again == base


def test_evaluate_bad_input(tiny_gpt2, sample_texts):
    sae = TopKSae(32, 32, 4)
    with pytest.raises(ValueError, match="n_inputs=16 does not match.*32"):
        evaluate(TopKSae(32, 16, 4), tiny_gpt2, sample_texts, LAYER)
    with pytest.raises(ValueError, match="records no layer"):
        evaluate(sae, tiny_gpt2, sample_texts)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        evaluate(sae, tiny_gpt2, sample_texts, LAYER, batch_size=0)
    with pytest.raises(TypeError, match="list of str"):
        evaluate(sae, tiny_gpt2, "just one string", LAYER)
    with pytest.raises(TypeError, match="item 1"):
        evaluate(sae, tiny_gpt2, ["fine", 3], LAYER)
    with pytest.raises(ValueError, match="no tokens"):
        evaluate(sae, tiny_gpt2, [], LAYER)
    with pytest.raises(TypeError, match="TopKSae"):
        evaluate(torch.nn.Linear(2, 2), tiny_gpt2, sample_texts, LAYER)
    result = evaluate(sae, tiny_gpt2, sample_texts[:2], LAYER)
    assert all(isinstance(v, float) and not math.isnan(v) for v in result.values())


def test_evaluate_leaves_norm_outliers_alone_like_a_hand_computation(evaluate_trained, sample_texts):
    lm, sae = evaluate_trained
    texts = sample_texts[:8]
    factor = 1.05  # low enough that some real tokens of the tiny model count as outliers
    result = evaluate(sae, lm, texts, LAYER, batch_size=len(texts), max_length=32, outlier_norm_factor=factor)

    enc, hidden = _hidden_states(lm, texts, 32)
    real = enc["attention_mask"].bool()
    # The one outlier rule: the reference set is the real tokens of the batch (all texts together).
    norms = hidden.norm(dim=-1)
    acted = real & (norms <= factor * norms[real].median())
    assert 0 < int(acted.sum()) < int(real.sum())
    assert result["n_outlier_tokens"] == int(real.sum() - acted.sum()) and result["n_tokens"] == int(acted.sum())

    def splice(h):
        with torch.no_grad():
            mask = acted.unsqueeze(-1)
            return torch.where(mask, sae(h).reconstruction, h)

    x = hidden[acted]
    with torch.no_grad():
        recon = sae(x).reconstruction
    assert result["fvu"] == pytest.approx(float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-4)
    assert result["loss_sae"] == pytest.approx(_hf_loss(lm, enc, splice), rel=1e-5)
    zeroed = _hf_loss(lm, enc, lambda h: torch.where(acted.unsqueeze(-1), torch.zeros_like(h), h))
    assert result["loss_zero"] == pytest.approx(zeroed, rel=1e-5)
    with pytest.raises(ValueError, match="outlier_norm_factor"):
        evaluate(sae, lm, texts, LAYER, outlier_norm_factor=0.5)
