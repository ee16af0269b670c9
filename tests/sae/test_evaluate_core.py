"""evaluate(): the SAEBench core metrics against plain HF calls and torch hooks, the core JSON layout, the one
outlier rule end to end, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae import TopKSae, evaluate
from mi_crow.mechanistic.sae.evaluate import EvaluationResult, save_saebench_core, to_saebench_core

LAYER = 1  # the block of the evaluate_trained fixture (tests/sae/conftest.py)

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(lm, enc, replace=None):
    """(hidden at LAYER, logits) of one plain HF forward, with an optional torch hook replacing the layer output."""
    module = lm.layers.get_module(LAYER)
    captured = {}

    def hook(m, a, out):
        h = out[0] if isinstance(out, tuple) else out
        captured.setdefault("h", h.detach().clone())
        if replace is None:
            return None
        new = replace(h)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        handle.remove()
    return captured["h"], out.logits


def _ce(logits, enc):
    mask = (enc["attention_mask"][:, 1:] != 0) & (enc["attention_mask"][:, :-1] != 0)
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).double(), enc["input_ids"][:, 1:], reduction="none"
    )
    return float(losses[mask].mean())


def _kl(clean, new, enc):
    real = enc["attention_mask"].bool()
    p = torch.softmax(clean[real].double(), -1)
    q = torch.softmax(new[real].double(), -1)
    return float((p * (p.log() - q.log())).sum(-1).mean())


def test_saebench_metrics_match_plain_computations(evaluate_trained, sample_texts):
    lm, sae = evaluate_trained
    texts = sample_texts[:10]
    result = evaluate(sae, lm, texts, LAYER, batch_size=4, max_length=32, outlier_norm_factor=None)
    assert isinstance(result, EvaluationResult)

    enc = lm.tokenize(texts, max_length=32, padding_side="right")
    real = enc["attention_mask"].bool()
    hidden, clean = _run(lm, enc)
    with torch.no_grad():
        _, spliced = _run(lm, enc, lambda h: sae(h).reconstruction)
        _, zeroed = _run(lm, enc, torch.zeros_like)
        x = hidden[real].double()
        out = sae(hidden[real])
        x_hat = out.reconstruction.double()
        dense = sae.encode_dense(hidden[real]).double()

    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert result["explained_variance"] == pytest.approx(1 - fvu, rel=1e-5)
    assert result["cossim"] == pytest.approx(float(torch.cosine_similarity(x, x_hat, dim=1).mean()), rel=1e-5)
    assert result["l2_norm_in"] == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-6)
    assert result["l2_norm_out"] == pytest.approx(float(x_hat.norm(dim=1).mean()), rel=1e-5)
    assert result["l2_ratio"] == pytest.approx(float((x_hat.norm(dim=1) / x.norm(dim=1)).mean()), rel=1e-5)
    rrb = float(x_hat.pow(2).sum(1).mean() / (x * x_hat).sum(1).mean())
    assert result["relative_reconstruction_bias"] == pytest.approx(rrb, rel=1e-5)
    assert result["l1"] == pytest.approx(float(dense.sum(1).mean()), rel=1e-5)
    density = (dense > 0).double().mean(0)
    torch.testing.assert_close(result.feature_density, density, rtol=0, atol=1e-12)
    assert result["frac_alive"] == pytest.approx(float((density > 0).double().mean()))
    assert result["dead_latents"] == float((density == 0).sum())
    assert result["dense_latents"] == float((density > 0.1).sum())
    assert result["freq_over_10_percent"] == pytest.approx(float((density > 0.1).double().mean()))

    ce_clean, ce_sae, ce_zero = _ce(clean, enc), _ce(spliced, enc), _ce(zeroed, enc)
    assert result["ce_loss_without_sae"] == pytest.approx(ce_clean, rel=1e-5)
    assert result["ce_loss_with_sae"] == pytest.approx(ce_sae, rel=1e-5)
    assert result["ce_loss_with_ablation"] == pytest.approx(ce_zero, rel=1e-5)
    assert result["ce_loss_score"] == pytest.approx((ce_zero - ce_sae) / (ce_zero - ce_clean), rel=1e-3)
    kl_sae, kl_zero = _kl(clean, spliced, enc), _kl(clean, zeroed, enc)
    assert result["kl_div_with_sae"] == pytest.approx(kl_sae, rel=1e-3, abs=1e-7)
    assert result["kl_div_with_ablation"] == pytest.approx(kl_zero, rel=1e-4)
    assert result["kl_div_score"] == pytest.approx((kl_zero - kl_sae) / kl_zero, rel=1e-3)
    assert result["total_tokens_eval_reconstruction"] == float(real.sum())

    # Per text: how many tokens fire a latent, averaged over the texts where it fires at all.
    code = sae.encode_dense(hidden).detach() > 0
    code &= real.unsqueeze(-1)
    per_text = code.sum(dim=1).double()  # [texts, n_latents]
    texts_fired = (per_text > 0).sum(0)
    cah = torch.where(texts_fired > 0, per_text.sum(0) / texts_fired.clamp_min(1), torch.full_like(density, -1.0))
    torch.testing.assert_close(result.consistent_activation_heuristic, cah, rtol=0, atol=1e-12)

    # Weight metrics against the full [n, n] matrix (tiny here).
    for name, w in (("decoder", sae.W_dec), ("encoder", sae.W_enc)):
        unit = torch.nn.functional.normalize(w.detach().double(), dim=1)
        sims = unit @ unit.T
        sims.fill_diagonal_(-math.inf)
        ref = sims.max(dim=1).values
        got = getattr(result, f"max_{name}_cosine_sim")
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
        assert result[f"average_max_{name}_cosine_sim"] == pytest.approx(float(ref.mean()), abs=1e-5)


def test_saebench_core_layout_round_trips_through_json(evaluate_trained, sample_texts, tmp_path):
    lm, sae = evaluate_trained
    result = evaluate(sae, lm, sample_texts[:6], LAYER, batch_size=3, max_length=32)
    core = to_saebench_core(result)
    assert core["eval_type_id"] == "core"
    assert set(core["eval_result_metrics"]) == {
        "model_behavior_preservation",
        "model_performance_preservation",
        "reconstruction_quality",
        "shrinkage",
        "sparsity",
        "token_stats",
        "misc_metrics",
    }
    m = core["eval_result_metrics"]
    assert m["model_performance_preservation"]["ce_loss_score"] == result["ce_loss_score"]
    assert m["model_behavior_preservation"]["kl_div_score"] == result["kl_div_score"]
    assert m["reconstruction_quality"] == {k: result[k] for k in ("explained_variance", "mse", "cossim")}
    assert m["sparsity"] == {"l0": result["l0"], "l1": result["l1"]}
    assert m["token_stats"]["total_tokens_eval_sparsity_variance"] == int(result["n_tokens"])
    rows = core["eval_result_details"]
    assert [r["index"] for r in rows] == list(range(sae.n_latents))
    assert rows[5]["feature_density"] == pytest.approx(float(result.feature_density[5]), abs=1e-6)
    assert rows[5]["encoder_bias"] == pytest.approx(float(sae.b_enc[5].detach()), abs=1e-6)
    assert core["sae_cfg_dict"]["n_latents"] == sae.n_latents
    assert core["eval_result_unstructured"]["fvu"] == pytest.approx(result["fvu"])
    path = save_saebench_core(result, tmp_path / "out" / "core.json", details=False)
    loaded = json.loads(path.read_text())
    assert loaded["eval_result_details"] == [] and loaded["eval_result_metrics"] == m
    with pytest.raises(TypeError, match="result must be an EvaluationResult"):
        to_saebench_core({"fvu": 1.0})


def test_one_token_text_sink_is_left_alone_by_evaluate(tiny_gpt2, sample_texts):
    """The issue's case end to end: a one-token text whose token is a sink (norm x1000, made so by a hook that runs
    before evaluate's). The batch's real tokens are the reference, so evaluate leaves it out; a per-text median
    would have kept it (it is its own text's median)."""
    lm = tiny_gpt2
    texts = [sample_texts[0], "a"]
    enc = lm.tokenize(texts, max_length=32, padding_side="right")
    assert int(enc["attention_mask"][1].sum()) == 1
    module = lm.layers.get_module(LAYER)

    def boost(m, a, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[1, 0] *= 1000.0
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = module.register_forward_hook(boost)
    try:
        torch.manual_seed(0)
        sae = TopKSae(16, 32, 2)
        result = evaluate(sae, lm, texts, LAYER, batch_size=2, outlier_norm_factor=10.0)
    finally:
        handle.remove()
    assert result["n_outlier_tokens"] == 1.0
    assert result["n_tokens"] == float(enc["attention_mask"].sum() - 1)


def test_bad_input_is_a_user_input_error_naming_the_field(tiny_gpt2, sample_texts):
    sae = TopKSae(32, 32, 4)
    with pytest.raises(UserInputError, match="dataset_or_texts must be texts with at least one real"):
        evaluate(sae, tiny_gpt2, ["", ""], LAYER)
    with pytest.raises(UserInputError, match=r"sae.n_inputs=16 does not match the width of layer .*, 32"):
        evaluate(TopKSae(32, 16, 4), tiny_gpt2, sample_texts, LAYER)
    with pytest.raises(UserInputError, match="dataset_or_texts must be texts with a next-token prediction"):
        evaluate(sae, tiny_gpt2, ["a", "a"], LAYER)
    with pytest.raises(UserInputError, match="outlier_norm_factor must be 'sae', None or a number > 1"):
        evaluate(sae, tiny_gpt2, sample_texts, LAYER, outlier_norm_factor="median")
    with pytest.raises(TypeError, match="weight_metrics must be a bool"):
        evaluate(sae, tiny_gpt2, sample_texts, LAYER, weight_metrics=1)


def test_held_out_texts_leaves_out_the_training_texts_in_order():
    from mi_crow.mechanistic.sae import held_out_texts

    candidates = ["a", "b", "a", "c", "d", "e"]
    assert held_out_texts(candidates, ["b", "d"]) == ["a", "c", "e"]  # each once, in order
    assert held_out_texts(iter(candidates), {"b"}, limit=2) == ["a", "c"]
    assert held_out_texts(candidates, candidates) == []
    with pytest.raises(UserInputError, match="limit must be a positive int"):
        held_out_texts(candidates, [], limit=0)
    with pytest.raises(TypeError, match="candidates item 1 must be a str"):
        held_out_texts(["a", 3], [])
