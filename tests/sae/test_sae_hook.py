"""TopKSae attached to a tiny model's layer: observe is bit-exact, replace and manipulations match a hand-written
splice, bf16 models work, width mismatches fail at attach time."""

from __future__ import annotations

import pytest
import torch

from mi_crow.mechanistic.sae import TopKSae

LAYER = 1


pytestmark = pytest.mark.usefixtures("one_thread")


def _sae_for(lm, seed: int = 0, dtype: torch.dtype = torch.float32) -> TopKSae:
    torch.manual_seed(seed)
    sae = TopKSae(64, lm.layers.width(LAYER), 4, dtype=dtype)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.1)
    return sae


def _logits_with_torch_hook(lm, texts, fn):
    """Logits with ``fn(hidden) -> hidden`` applied to the layer output by a plain torch hook (the reference)."""
    module = lm.layers.get_module(LAYER)
    handle = module.register_forward_hook(lambda m, a, out: fn(out))
    try:
        return lm.forwards(texts, with_controllers=False).logits
    finally:
        handle.remove()


def test_observe_leaves_logits_bit_exact_and_feeds_tracking(tiny_lm, sample_texts):
    texts = sample_texts[:6]
    clean = tiny_lm.forwards(texts).logits
    sae = _sae_for(tiny_lm)
    tiny_lm.attach_sae(sae, LAYER)
    assert torch.equal(tiny_lm.forwards(texts).logits, clean)
    sae.concepts.enable_text_tracking(top_k=2)  # the code is now computed on every forward
    assert torch.equal(tiny_lm.forwards(texts).logits, clean)
    tops = sae.concepts.get_top_texts()
    assert sum(len(t) for t in tops) > 0, "tracking saw no activation: the SAE did not encode"
    tiny_lm.detach_sae(sae)


def test_replace_mode_substitutes_the_reconstruction(tiny_lm, sample_texts):
    texts = sample_texts[:6]
    clean = tiny_lm.forwards(texts).logits
    sae = _sae_for(tiny_lm)
    sae.mode = "replace"
    tiny_lm.attach_sae(sae, LAYER)
    spliced = tiny_lm.forwards(texts).logits
    tiny_lm.detach_sae(sae)
    with torch.no_grad():
        expected = _logits_with_torch_hook(tiny_lm, texts, lambda h: sae(h).reconstruction)
    assert not torch.allclose(spliced, clean)
    torch.testing.assert_close(spliced, expected, rtol=1e-5, atol=1e-5)


def test_manipulation_adds_only_the_change(tiny_lm, sample_texts):
    texts = sample_texts[:6]
    sae = _sae_for(tiny_lm)
    # Scale the most frequently firing latent of this batch, so the manipulation certainly applies.
    captured = {}
    _logits_with_torch_hook(tiny_lm, texts, lambda h: captured.setdefault("h", h.detach().clone()))
    with torch.no_grad():
        idx = sae.encode(captured["h"]).indices
    neuron = int(torch.bincount(idx.reshape(-1), minlength=sae.n_latents).argmax())
    sae.concepts.manipulate_concept(neuron, 3.0)
    tiny_lm.attach_sae(sae, LAYER)
    steered = tiny_lm.forwards(texts).logits
    tiny_lm.detach_sae(sae)

    def reference(h):
        with torch.no_grad():
            code = sae.encode(h)
            scaled = torch.where(code.indices == neuron, code.values * 3.0, code.values)
            return h + sae.decode((scaled, code.indices)) - sae.decode(code)

    expected = _logits_with_torch_hook(tiny_lm, texts, reference)
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered, tiny_lm.forwards(texts).logits)


def test_bf16_model_with_fp32_sae(tiny_lm, sample_texts):
    texts = sample_texts[:4]
    tiny_lm.model.to(torch.bfloat16)
    clean = tiny_lm.forwards(texts).logits
    sae = _sae_for(tiny_lm)
    tiny_lm.attach_sae(sae, LAYER)
    assert torch.equal(tiny_lm.forwards(texts).logits, clean)
    sae.mode = "replace"
    spliced = tiny_lm.forwards(texts).logits
    tiny_lm.detach_sae(sae)
    assert sae.dtype == torch.float32 and spliced.dtype == clean.dtype
    assert torch.isfinite(spliced.float()).all()

    def reference(h):
        with torch.no_grad():
            return sae(h.float()).reconstruction.to(h.dtype)

    expected = _logits_with_torch_hook(tiny_lm, texts, reference)
    torch.testing.assert_close(spliced, expected, rtol=0, atol=0)
    assert not torch.equal(spliced, clean)


def test_bf16_sae_on_fp32_model(tiny_gpt2, sample_texts):
    sae = _sae_for(tiny_gpt2, dtype=torch.bfloat16)
    sae.mode = "replace"
    tiny_gpt2.attach_sae(sae, LAYER)
    logits = tiny_gpt2.forwards(sample_texts[:3]).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_width_mismatch_fails_at_attach_time(tiny_gpt2):
    sae = TopKSae(64, 16, 4)
    with pytest.raises(ValueError, match=r"n_inputs=16.*32"):
        tiny_gpt2.attach_sae(sae, LAYER)
    with pytest.raises(ValueError, match=r"width 32 does not match the SAE's n_inputs=16"):
        sae.mode = "replace"
        sae.modify_activations(None, (), torch.randn(2, 3, 32))


def test_norm_outliers_pass_through_the_hook_unchanged():
    torch.manual_seed(0)
    sae = TopKSae(32, 8, 2, mode="replace")
    sae.outlier_norm_factor = 10.0
    hidden = torch.randn(3, 6, 8)
    hidden[:, 0] *= 500.0  # an attention sink at the first position of every text
    out = sae.modify_activations(None, (), hidden)
    assert torch.equal(out[:, 0], hidden[:, 0])
    with torch.no_grad():
        torch.testing.assert_close(out[:, 1:], sae(hidden[:, 1:]).reconstruction)
    sae.outlier_norm_factor = None
    with torch.no_grad():
        torch.testing.assert_close(sae.modify_activations(None, (), hidden), sae(hidden).reconstruction)


def test_norm_outliers_are_not_tracked_and_not_counted_in_report_stats():
    from mi_crow.report.stats import compute_feature_stats

    torch.manual_seed(0)
    sae = TopKSae(32, 8, 2)
    hidden = torch.randn(3, 6, 8)
    hidden[:, 0] *= 500.0
    values = sae.encode(hidden).values
    sae.outlier_norm_factor = 10.0
    masked = sae.inlier_values(hidden, values)
    assert torch.equal(masked[:, 0], torch.zeros_like(masked[:, 0]))
    assert torch.equal(masked[:, 1:], values[:, 1:])

    with_outliers = compute_feature_stats(sae, [hidden.reshape(-1, 8)])
    assert with_outliers.n_tokens == 15  # the three sinks are left out
    sae.outlier_norm_factor = None
    inliers_only = compute_feature_stats(sae, [hidden[:, 1:].reshape(-1, 8)])
    assert torch.equal(with_outliers.fire_count, inliers_only.fire_count)
    assert torch.allclose(with_outliers.act_sum, inliers_only.act_sum)
