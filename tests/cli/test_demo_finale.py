"""The demo's steering finale on a tiny Llama: it measures the candidates the ranking gives, in order, with the
sweep the demo documents, and what it reports is what evaluate_steering measures for that feature."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mi_crow.cli.demo import FINALE_CANDIDATES, FINALE_STRENGTHS, _finale
from mi_crow.mechanistic.sae import TopKSae
from mi_crow.mechanistic.sae.concepts import evaluate_steering, feature_logit_lens, lens_candidates

LAYER = "model.layers.1"
PROMPTS = ["the cat sat on", "a dog ran to the"]


def test_the_finale_measures_the_ranked_candidates_as_evaluate_steering_does(tiny_llama):
    torch.set_num_threads(1)
    lm = tiny_llama
    sae = TopKSae(24, lm.layers.width(LAYER), 3)
    sae.reset_parameters(generator=torch.Generator().manual_seed(0))
    # The tiny model's vocabulary has no readable words: give three features coherent promoted words by hand.
    lens = feature_logit_lens(lm, sae, list(range(24)), top=10)
    for j, word in ((3, " house"), (7, " water"), (11, " river")):
        lens.promoted[j] = [word, word.title(), word + "s"] + lens.promoted[j][3:]
    stats = SimpleNamespace(frequency=torch.full((24,), 0.01))
    top_texts = [[("the house by the river", 1.0)] for _ in range(24)]
    chosen, evaluation = _finale(lm, sae, LAYER, stats, lens, PROMPTS, None, 4, top_texts)
    ranked = lens_candidates(lens, stats.frequency, limit=FINALE_CANDIDATES, top_texts=top_texts)
    # The texts say house and river, not water: those two first.
    assert {c[0] for c in ranked[:2]} == {3, 11} and [c[0] for c in ranked[2:]] == [7][:FINALE_CANDIDATES - 2]
    assert chosen in ranked
    assert not lm.layers.is_registered(sae) and not sae.concepts.has_manipulations
    assert [p.strength for p in evaluation.points] == list(FINALE_STRENGTHS)
    lm.attach_sae(sae, LAYER)
    again = evaluate_steering(lm, sae, chosen[0], PROMPTS, FINALE_STRENGTHS, max_new_tokens=4, lens=lens,
                              batch_sweep=False)
    assert again.plain == evaluation.plain
    assert [p.continuations for p in again.points] == [p.continuations for p in evaluation.points]
    assert again.best_strength == evaluation.best_strength
