"""evaluate_steering and the logit lens on a tiny Llama: every measure against an independent hand computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mi_crow.hooks import LayerActivationDetector
from mi_crow.mechanistic.sae import TopKSae
from mi_crow.mechanistic.sae.concepts import evaluate_steering, feature_logit_lens
import re

from mi_crow.mechanistic.sae.concepts.evaluation import SteeringPoint, choose_strength, count_words
from mi_crow.mechanistic.sae.concepts.logit_lens import _STOPWORDS, coherence, normalize_token, readable_words

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = "model.layers.1"
PROMPTS = ["the cat sat on", "a dog ran to the"]


def make_sae(lm, seed=0):
    sae = TopKSae(24, lm.layers.width(LAYER), 3)
    sae.reset_parameters(generator=torch.Generator().manual_seed(seed))
    return sae


def test_logit_lens_matches_norm_and_unembedding_by_hand(tiny_llama):
    lm = tiny_llama
    sae = make_sae(lm)
    lens = feature_logit_lens(lm, sae, [3, 7], top=4)
    model = lm.model
    for row, j in enumerate([3, 7]):
        d = sae.W_dec[j].detach()
        h = d / d.pow(2).mean().sqrt()
        # LlamaRMSNorm by hand: h / rms(h) * weight (its bias-free output at 0 is 0).
        normed = h / torch.sqrt(h.pow(2).mean() + model.model.norm.variance_epsilon) * model.model.norm.weight
        logits = model.lm_head.weight @ normed
        assert lens.promoted_ids[row].tolist() == logits.topk(4).indices.tolist()
        assert lens.suppressed_ids[row].tolist() == logits.topk(4, largest=False).indices.tolist()
        torch.testing.assert_close(lens.promoted_logits[row], logits.topk(4).values, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"neurons \[24\] are out of range \[0, 24\)"):
        feature_logit_lens(lm, sae, [24])


def test_coherence_groups_forms_of_one_word():
    assert coherence([" wedding", "Wedding", " weddings", " bride", "the", ","]) == (0.5, "wedding")
    assert coherence([",", ".", " the"]) == (0.0, "")


def test_evaluate_steering_measures_against_hand_computations(tiny_llama):
    lm = tiny_llama
    sae = make_sae(lm)
    with pytest.raises(ValueError, match="not attached"):
        evaluate_steering(lm, sae, 5, PROMPTS)
    lm.attach_sae(sae, LAYER)
    neuron = 5
    result = evaluate_steering(lm, sae, neuron, PROMPTS, [0.5, 4.0], max_new_tokens=6, top_tokens=5)
    assert not sae.concepts.has_manipulations  # left as it was
    assert [p.strength for p in result.points] == [0.5, 4.0]
    assert result.plain.kl == 0.0 and result.plain.loss_rise == 0.0
    assert result.plain.continuations == lm.generate(PROMPTS, max_new_tokens=6)

    # Loss and feature activity of the plain continuations, recomputed independently.
    texts = [p + c for p, c in zip(PROMPTS, result.plain.continuations)]
    detector = LayerActivationDetector(LAYER)
    with lm.layers.hooks({LAYER: detector}):
        logits = lm.forwards(texts).logits
    hidden = detector.activations
    enc = lm.tokenize(texts)
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    total, count, active = 0.0, 0, []
    for r, prompt in enumerate(PROMPTS):
        start = len(lm.tokenizer(prompt)["input_ids"])
        end = int(mask[r].sum())
        for t in range(start, end):
            total += float(-F.log_softmax(logits[r, t - 1].float(), -1)[ids[r, t]])
            count += 1
        dense = sae.encode_dense(hidden[r, start:end])
        active.append(bool((dense[:, neuron] > 0).any()))
    assert result.plain.loss == pytest.approx(total / count, rel=1e-4)
    assert result.plain.feature_active == pytest.approx(sum(active) / len(active))

    # Promoted words: the lens's top tokens reduced to letters (3+ letters), counted as whole words by hand.
    lens = feature_logit_lens(lm, sae, [neuron], top=5)
    words = []
    for t in lens.promoted[0]:
        w = normalize_token(t)
        if len(w) >= 3 and w not in words and w not in _STOPWORDS:
            words.append(w)
    assert result.promoted_words == words
    for point in [result.plain, *result.points]:
        hits = [sum(1 for w in words for _ in re.finditer(rf"(?<![a-zA-Z]){w}(?![a-zA-Z])", c, re.I))
                for c in point.continuations]
        assert point.promoted_count == sum(hits)
        assert point.promoted_rate == pytest.approx(sum(1 for h in hits if h) / len(hits))

    # The KL of a point: the steered model against the plain one on the plain texts.
    sae.concepts.add_concept(neuron, strength=4.0, exclude_special=True)
    steered_logits = lm.forwards(texts).logits
    sae.concepts.reset_manipulations()
    lp, lq = F.log_softmax(steered_logits.float(), -1), F.log_softmax(logits.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)[mask].mean()
    assert result.points[1].kl == pytest.approx(float(kl), rel=1e-4)
    assert result.points[1].kl > result.points[0].kl > 0
    assert result.best_strength in (0.5, 4.0)
    for p in result.points:
        assert p.passes == (p.feature_active >= 0.8 and p.promoted_rate >= 0.5 and p.loss_rise < 1.0
                            and result.plain.promoted_rate < 0.1)
    data = result.to_dict()
    assert data["neuron"] == neuron and len(data["points"]) == 2 and "strength" in result.table()


def test_promoted_words_count_as_whole_words_only():
    assert count_words(["a line.", "online", "Lines of LINE", "x"], ["line"]) == (0.5, 2)
    assert count_words(["Paris, paris2 and PARIS"], ["paris", "par"]) == (1.0, 3)
    assert count_words(["anything"], []) == (0.0, 0)
    assert readable_words([" Line", "line", " lines", "the", ",", "ab"]) == ["line", "lines"]


def test_plain_continuations_given_are_used_and_checked(tiny_llama):
    lm = tiny_llama
    sae = make_sae(lm)
    lm.attach_sae(sae, LAYER)
    plain = lm.generate(PROMPTS, max_new_tokens=4)
    a = evaluate_steering(lm, sae, 2, PROMPTS, [1.0], max_new_tokens=4)
    b = evaluate_steering(lm, sae, 2, PROMPTS, [1.0], max_new_tokens=4, plain_continuations=plain)
    assert a.plain == b.plain and a.points == b.points
    data = b.to_dict()
    assert "whole word" in data["definitions"]["promoted_rate"] and data["promoted_words"] == b.promoted_words
    with pytest.raises(ValueError, match=r"plain_continuations must hold one continuation per prompt \(2\), got 1"):
        evaluate_steering(lm, sae, 2, PROMPTS, [1.0], max_new_tokens=4, plain_continuations=plain[:1])


def test_evaluate_steering_bad_input(tiny_llama):
    lm = tiny_llama
    sae = make_sae(lm)
    lm.attach_sae(sae, LAYER)
    with pytest.raises(ValueError, match=r"strengths\[1\] must be finite"):
        evaluate_steering(lm, sae, 1, PROMPTS, [1.0, float("nan")])
    with pytest.raises(ValueError, match="unknown concept name 'cats'"):
        evaluate_steering(lm, sae, "cats", PROMPTS)
    with pytest.raises(ValueError, match=r"in \[0, 24\).*got 99"):
        evaluate_steering(lm, sae, 99, PROMPTS)
    sae.concepts.add_concept(1, 1.0)
    with pytest.raises(ValueError, match="already carries manipulations"):
        evaluate_steering(lm, sae, 1, PROMPTS)


def test_the_sweep_prefers_passing_then_fluent_points():
    def point(strength, active, promoted, rise, passes):
        return SteeringPoint(strength, active, promoted, 2.0 + rise, rise, 0.1, 3, [], passes)

    passing = [point(0.5, 0.9, 0.6, 0.2, True), point(1.0, 1.0, 0.9, 0.8, True), point(2.0, 1.0, 1.0, 3.0, False)]
    assert choose_strength(passing) == 1.0
    none_pass = [point(0.5, 0.5, 0.2, 0.1, False), point(1.0, 0.7, 0.4, 0.9, False), point(2.0, 1.0, 1.0, 2.0, False)]
    assert choose_strength(none_pass) == 1.0
    assert choose_strength([point(1.0, 1, 1, 3.0, False), point(2.0, 1, 1, 2.0, False)]) == 2.0


def _lens(rows):
    """A LogitLens built by hand: ``rows`` is ``{neuron: promoted tokens}``."""
    from mi_crow.mechanistic.sae.concepts.logit_lens import LogitLens

    neurons = list(rows)
    n = len(neurons)
    top = max(len(v) for v in rows.values())
    logits = torch.arange(top, 0, -1, dtype=torch.float32).repeat(n, 1)
    return LogitLens(neurons, torch.zeros(n, top, dtype=torch.int64), logits, torch.zeros(n, top, dtype=torch.int64),
                     -logits, [list(v) for v in rows.values()], [[] for _ in rows])


def test_lens_candidates_prefer_features_that_read_the_words_they_write():
    from mi_crow.mechanistic.sae.concepts import lens_candidates

    lens = _lens({0: [" river", " rivers", " River", " the", ","],      # coherent, top texts about rivers
                  1: [" music", " musical", " Music", " a", "."],       # as coherent, top texts never say it
                  2: [" cat", " dog", " car", " sun", " sea"],          # incoherent
                  3: [" bread", " breads", " Bread", " of", "x"]})      # coherent but too dense
    freq = [0.01, 0.01, 0.01, 0.2]
    top_texts = [[("The river flooded.", 3.0), ("Rivers of Europe", 2.0), ("a long way", 1.0)],
                 [("the concert hall", 3.0), ("a musician's guitar", 2.0), ("the song", 1.0)],
                 [("cat and dog", 1.0)], [("bread", 1.0)]]
    # By the lens alone, 0 and 1 tie on coherence (3/5 each).
    by_lens = lens_candidates(lens, freq, limit=4)
    assert {c[0] for c in by_lens} == {0, 1}
    ranked = lens_candidates(lens, freq, limit=4, top_texts=top_texts)
    assert [c[0] for c in ranked] == [0, 1]  # 2 is below min_coherence, 3 outside the frequency window
    assert ranked[0][1] == "river" and "2/3 of its top texts hold" in ranked[0][2]
    assert "0/3 of its top texts hold" in ranked[1][2]


def test_the_batched_sweep_measures_what_one_generation_per_strength_does(tiny_llama):
    lm = tiny_llama
    sae = make_sae(lm)
    lm.attach_sae(sae, LAYER)
    for mode in ("add", "clamp"):
        one_by_one = evaluate_steering(lm, sae, 4, PROMPTS, [0.5, 2.0, 6.0], mode=mode, max_new_tokens=5,
                                       batch_sweep=False)
        batched = evaluate_steering(lm, sae, 4, PROMPTS, [0.5, 2.0, 6.0], mode=mode, max_new_tokens=5)
        assert batched.plain == one_by_one.plain
        for a, b in zip(batched.points, one_by_one.points):
            assert a.strength == b.strength and a.continuations == b.continuations
            assert a.feature_active == b.feature_active and a.promoted_count == b.promoted_count
            assert a.loss == pytest.approx(b.loss, rel=1e-4) and a.kl == pytest.approx(b.kl, rel=1e-3, abs=1e-6)
        assert not sae.concepts.has_manipulations and sae.concepts._steering.row_scales is None


def test_several_features_in_one_batch_measure_what_each_alone_does(tiny_llama):
    """evaluate_steering_many (every feature at every strength in one generation, each steering only its rows)
    gives each feature what evaluate_steering gives it alone."""
    from mi_crow.mechanistic.sae.concepts import evaluate_steering_many

    lm = tiny_llama
    sae = make_sae(lm)
    lm.attach_sae(sae, LAYER)
    features = [4, 11, 17]
    for mode in ("add", "clamp"):
        together = evaluate_steering_many(lm, sae, features, PROMPTS, [0.5, 2.0, 6.0], mode=mode, max_new_tokens=5)
        assert [r.neuron for r in together] == features
        for neuron, many in zip(features, together):
            alone = evaluate_steering(lm, sae, neuron, PROMPTS, [0.5, 2.0, 6.0], mode=mode, max_new_tokens=5,
                                      batch_sweep=False)
            assert many.plain.continuations == alone.plain.continuations
            assert many.plain.feature_active == alone.plain.feature_active
            assert many.plain.loss == pytest.approx(alone.plain.loss, rel=1e-4)
            assert many.promoted_words == alone.promoted_words
            for a, b in zip(many.points, alone.points):
                assert a.strength == b.strength and a.continuations == b.continuations
                assert a.feature_active == b.feature_active and a.promoted_count == b.promoted_count
                assert a.loss == pytest.approx(b.loss, rel=1e-4) and a.kl == pytest.approx(b.kl, rel=1e-3, abs=1e-6)
                assert a.passes == b.passes
            assert many.best_strength == alone.best_strength
        steering = sae.concepts._steering
        assert not sae.concepts.has_manipulations and steering.row_scales is None and steering.row_masks is None
    with pytest.raises(ValueError, match="distinct"):
        evaluate_steering_many(lm, sae, [4, 4], PROMPTS, [1.0])
    with pytest.raises(ValueError, match="mode"):
        evaluate_steering_many(lm, sae, [4], PROMPTS, [1.0], mode="scale")


def test_row_masks_steer_only_their_rows(tiny_llama):
    """Two features added on disjoint rows of one batch: each row's code equals the code with only its feature
    steered (a hand-built single-feature steering)."""
    lm = tiny_llama
    sae = make_sae(lm)
    x = torch.randn(2, 3, sae.n_inputs, generator=torch.Generator().manual_seed(1))
    code = sae.encode(x.reshape(-1, sae.n_inputs))
    values, indices = code.values.reshape(2, 3, -1), code.indices.reshape(2, 3, -1)
    concepts = sae.concepts
    concepts.add_concept(4, activation=2.0)
    concepts.add_concept(9, activation=3.0)
    concepts._steering.row_masks = {4: torch.tensor([True, False]), 9: torch.tensor([False, True])}
    v2, i2 = concepts._steering.modify_code(values, indices, x)
    concepts.reset_manipulations()
    expected = []
    for row, (neuron, amount) in enumerate(((4, 2.0), (9, 3.0))):
        delta = torch.zeros(3, sae.n_latents)
        delta[:, neuron] = amount
        dense = torch.zeros(3, sae.n_latents).scatter_add(1, indices[row], values[row]) + delta
        expected.append(dense)
    got = torch.stack([torch.zeros(3, sae.n_latents).scatter_add(1, i2[r], v2[r]) for r in range(2)])
    torch.testing.assert_close(got, torch.stack(expected))
