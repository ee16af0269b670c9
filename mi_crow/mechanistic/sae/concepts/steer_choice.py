"""Choosing a feature to steer with: one whose effect a reader can see in generated text.

What a feature does to the output is a different property from what makes it fire, so the choice starts from the
output side: :func:`lens_candidates` ranks features by how coherent the tokens their decoder direction promotes are
(the logit lens, :mod:`~mi_crow.mechanistic.sae.concepts.logit_lens`), and :func:`choose_by_sweep` measures each
candidate with :func:`~mi_crow.mechanistic.sae.concepts.evaluation.evaluate_steering` and keeps the first that meets
the targets (else the best measured).

The earlier input-side heuristic stays available: :func:`steering_candidates` ranks features by how well their top
texts agree on one readable word, :func:`choose_steering_feature` steers each candidate once and keeps the one whose
word shows up most, :func:`generate_steered` generates with and without a feature's decoder direction added.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

__all__ = ["choose_by_sweep", "choose_steering_feature", "generate_steered", "lens_candidates",
           "steering_candidates"]

_STOPWORDS = frozenset(
    "the and for that with was were are this from which its his her their they them has have had not but also "
    "been who whom when where what into than then there these those such other more most some many any all one "
    "two can may would could should will being over after before about between during under while both each".split()
)


def steering_candidates(
    top_texts: Sequence[Sequence[Any]],
    frequency: Sequence[float] | Any,
    tokenizer: Any,
    min_texts: int = 5,
    limit: int = 6,
) -> list[tuple[int, str, str]]:
    """Rank features by how easy they should be to recognise when amplified.

    Heuristic: among features that fire on 0.05%-5% of tokens (neither rare noise nor dense) and have at least
    ``min_texts`` top texts, rank by how much their top texts agree on the firing token, preferring tokens that
    are whole content words of 3+ letters (not stopwords, not word pieces such as "ism"); ties go to the more
    frequent feature.

    Args:
        top_texts: per feature, its top-text records (``TopText``, with ``.token``), as
            ``sae.concepts.get_top_texts()`` returns them.
        frequency: ``[n_latents]`` fraction of tokens each feature fires on (a tensor or a list of floats).
        tokenizer: turns a token into text (``convert_tokens_to_string``).
        min_texts: fewest top texts a candidate needs.
        limit: most candidates returned.

    Returns:
        Up to ``limit`` tuples ``(index, word, reason)``, best first.
    """
    freq = frequency.tolist() if hasattr(frequency, "tolist") else list(frequency)
    scored: list[tuple[float, int, str, str]] = []
    for idx, records in enumerate(top_texts):
        if len(records) < min_texts or not 5e-4 <= freq[idx] <= 5e-2:
            continue
        words = []
        for r in records:
            try:
                w = tokenizer.convert_tokens_to_string([r.token])
            except Exception:  # noqa: BLE001 - odd byte tokens: count them as unreadable
                w = ""
            # A leading space marks the start of a word; a piece inside a word is not something to look for.
            words.append(w.strip().lower() if w[:1].isspace() else "")
        word, count = Counter(words).most_common(1)[0]
        agreement = count / len(words)
        # A content word makes the steered text recognisable; "the" or "," would not.
        readable = bool(re.fullmatch(r"[a-z][a-z\-']{2,}", word)) and word not in _STOPWORDS
        score = agreement + (0.5 if readable else 0.0) + freq[idx]
        reason = (f"{count}/{len(words)} of its top texts fire on the word {word!r}; it fires on "
                  f"{100 * freq[idx]:.2f}% of tokens")
        scored.append((score, idx, word, reason))
    scored.sort(key=lambda item: -item[0])
    return [(idx, word, reason) for _, idx, word, reason in scored[:limit]]


def generate_steered(
    lm: Any,
    sae: Any,
    layer: str,
    prompts: list[str],
    neuron: int | str,
    activation: float,
    max_new_tokens: int,
) -> tuple[list[str], list[str]]:
    """Generate ``prompts`` without and with ``activation`` of ``neuron`` added at every token.

    The SAE is attached to ``layer`` for the two generations and detached afterwards; its manipulations are
    cleared before and after.

    Args:
        lm: the ``LanguageModel``.
        sae: the ``TopKSae`` (``n_inputs`` = the layer's width).
        layer: where to attach it.
        prompts: the prompts.
        neuron: feature index or concept name.
        activation: the activation added along the feature's decoder direction.
        max_new_tokens: tokens generated per prompt.

    Returns:
        ``(plain, steered)``: the generated continuations, one per prompt each.
    """
    sae.concepts.reset_manipulations()
    hook_id = lm.attach_sae(sae, layer)
    try:
        plain = lm.generate(prompts, max_new_tokens=max_new_tokens)
        sae.concepts.add_concept(neuron, activation)
        steered = lm.generate(prompts, max_new_tokens=max_new_tokens)
    finally:
        sae.concepts.reset_manipulations()
        lm.layers.unregister_hook(hook_id)
    return plain, steered


def choose_steering_feature(
    lm: Any,
    sae: Any,
    layer: str,
    candidates: Sequence[tuple[int, str, str]],
    max_activation: Sequence[float] | Any,
    prompt: str,
    scale: float,
    max_new_tokens: int,
) -> tuple[int, str, str] | None:
    """Among ``candidates``, the feature whose word shows up most when it is amplified (first on a tie).

    Each candidate is steered once on ``prompt`` (``scale`` x its max activation added at every token, with
    :func:`generate_steered`); the count of its word in the generated text decides, so a reader can see the effect.

    Args:
        lm, sae, layer: as in :func:`generate_steered`.
        candidates: ``(index, word, reason)`` tuples from :func:`steering_candidates`.
        max_activation: ``[n_latents]`` largest activation of each feature.
        prompt: the prompt steered.
        scale: multiple of the feature's max activation to add.
        max_new_tokens: tokens generated per try.

    Returns:
        ``(index, word, reason)`` of the chosen feature (the reason also gives the count), or None without
        candidates.
    """
    if not candidates:
        return None
    best, best_count = candidates[0], -1
    for idx, word, reason in candidates:
        _, steered = generate_steered(lm, sae, layer, [prompt], idx, scale * float(max_activation[idx]),
                                      max_new_tokens)
        count = len(re.findall(rf"\b{re.escape(word)}", steered[0].lower())) if word else 0
        if count > best_count:
            best, best_count = (idx, word, f"{reason}; its word appears {count}x when steered"), count
    return best


def lens_candidates(
    lens: Any,
    frequency: Sequence[float] | Any,
    limit: int = 3,
    min_frequency: float = 5e-4,
    max_frequency: float = 5e-2,
    min_coherence: float = 0.3,
    top_texts: Sequence[Sequence[Any]] | None = None,
) -> list[tuple[int, str, str]]:
    """Rank features by how visible steering them should be, without generating anything.

    Among features that fire on ``min_frequency`` to ``max_frequency`` of tokens (neither rare noise nor dense),
    the score is :func:`~mi_crow.mechanistic.sae.concepts.logit_lens.coherence` of the tokens their decoder direction
    promotes (the share agreeing on one readable word; below ``min_coherence`` a feature is left out), plus, with
    ``top_texts``, the share of the feature's top texts that hold one of its promoted words as a whole word: a
    feature that both reads and writes a word is one whose steered text the SAE recognises again, plus a tie-break
    by the top promoted logit.

    Args:
        lens: a ``LogitLens`` over the features to consider.
        frequency: ``[n_latents]`` fraction of tokens each feature fires on.
        limit: most candidates returned.
        min_frequency / max_frequency: the firing-frequency window.
        min_coherence: the least coherence kept.
        top_texts: per feature, its top-text records (``.text``, or ``(text, activation)`` pairs), as
            ``sae.concepts.get_top_texts()`` gives them; ``None`` ranks by the logit lens alone.

    Returns:
        Up to ``limit`` tuples ``(index, word, reason)``, best first.
    """
    from mi_crow.mechanistic.sae.concepts.evaluation import count_words
    from mi_crow.mechanistic.sae.concepts.logit_lens import coherence, readable_words

    freq = frequency.tolist() if hasattr(frequency, "tolist") else list(frequency)
    top_logit = lens.promoted_logits[:, 0].tolist() if len(lens.neurons) else []
    scale = max((abs(v) for v in top_logit), default=1.0) or 1.0
    scored = []
    for row, idx in enumerate(lens.neurons):
        if not min_frequency <= freq[idx] <= max_frequency:
            continue
        promoted = lens.promoted[row][:10]
        score, word = coherence(promoted)
        if score < min_coherence or not word:
            continue
        shown = ", ".join(repr(t) for t in promoted[:5])
        reason = (f"its decoder direction promotes {shown} ({round(score * len(promoted))}/{len(promoted)} of its "
                  f"top tokens are '{word}')")
        if top_texts is not None:
            records = top_texts[idx] if idx < len(top_texts) else []
            texts = [r[0] for r in records]  # TopText unpacks as (text, activation)
            reads, _ = count_words(texts, readable_words(promoted))
            if texts:
                reason += f"; {round(reads * len(texts))}/{len(texts)} of its top texts hold one of its promoted words"
            score += reads
        reason += f"; it fires on {100 * freq[idx]:.2f}% of tokens"
        scored.append((score + 0.1 * top_logit[row] / scale, idx, word, reason))
    scored.sort(key=lambda item: -item[0])
    return [(idx, word, reason) for _, idx, word, reason in scored[:limit]]


def choose_by_sweep(
    lm: Any,
    sae: Any,
    candidates: Sequence[tuple[int, str, str]],
    prompts: Sequence[str],
    strengths: Sequence[float] | None = None,
    max_new_tokens: int = 24,
    lens: Any = None,
    stop_early: bool = True,
    **kwargs: Any,
) -> tuple[tuple[int, str, str], Any] | None:
    """Measure each candidate's steering (the SAE must be attached to ``lm``) and keep the first that meets the
    targets, else the one closest to them.

    The plain continuations are generated once and shared by every candidate's measurement. For the modes whose
    strength scales a value (``add``, the default, ``clamp``, ``cap``) every candidate at every strength is one
    batched generation (`evaluate_steering_many`): on a CPU that costs about as much as one candidate.

    Args:
        lm, sae: the model and the attached SAE.
        candidates: ``(index, word, reason)`` from :func:`lens_candidates`, best first.
        prompts: the prompts steered.
        strengths: the sweep (default ``evaluation.DEFAULT_STRENGTHS``).
        max_new_tokens: tokens generated per prompt.
        lens: the ``LogitLens`` the candidates came from (saves recomputing it).
        stop_early: each sweep stops at its first strength that meets the targets or loses too much fluency (only
            when the sweep is not batched, see ``evaluate_steering``'s ``batch_sweep``).
        **kwargs: passed to ``evaluate_steering`` (``mode``, ``relative``, ...).

    Returns:
        ``(candidate, SteeringEvaluation)`` of the chosen feature, or None without candidates.
    """
    from mi_crow.mechanistic.sae.concepts.evaluation import evaluate_steering, evaluate_steering_many

    candidates = list(candidates)
    if kwargs.get("mode", "add") in ("add", "clamp", "cap") and candidates:
        many = {k: v for k, v in kwargs.items() if k != "batch_sweep"}
        results = evaluate_steering_many(lm, sae, [c[0] for c in candidates], prompts, strengths,
                                         max_new_tokens=max_new_tokens, lens=lens, **many)
    else:
        results = None
    best = None
    best_key = None
    plain = None
    for i, candidate in enumerate(candidates):
        if results is not None:
            result = results[i]
        else:
            result = evaluate_steering(lm, sae, candidate[0], prompts, strengths, max_new_tokens=max_new_tokens,
                                       lens=lens, stop_early=stop_early, plain_continuations=plain, **kwargs)
        plain = result.plain.continuations
        point = result.best
        if point is None:
            continue
        if point.passes:
            return candidate, result
        fluent = point.loss_rise < result.targets["loss_rise"]
        key = (fluent, point.promoted_rate + point.feature_active, -point.loss_rise)
        if best_key is None or key > best_key:
            best, best_key = (candidate, result), key
    return best
