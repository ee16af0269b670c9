"""Measuring steering: did steering a feature make the model talk about it, and what did that cost?

:func:`evaluate_steering` steers one feature of an SAE attached to a model at each strength of a sweep, generates
continuations of a few prompts, and measures, against the same prompts generated without steering:

1. **feature active**: the share of steered continuations in which the feature fires (the continuation,
   re-read by the clean model, re-encoded by the SAE: the text itself carries the feature);
2. **promoted words**: the share of continuations holding, as a whole word, one of the words the feature's
   decoder direction promotes by the logit lens (:mod:`~mi_crow.mechanistic.sae.concepts.logit_lens`: its top
   tokens reduced to letters, 3+ letters, no stopwords; "line" counts in "a line." but not in "online"), next to
   the same share without steering;
3. **fluency**: the clean model's loss (nats per token) on the steered continuation, and its rise over the loss
   on the plain continuation;
4. **KL**: between the steered and the plain model's next-token distributions, on the prompts and plain
   continuations (how much the intervention moves the model at all).

:data:`DEFINITIONS` spells each measure out; every result's JSON carries it. The strength that meets the targets
(:data:`TARGETS`: feature active in at least 80% of continuations, promoted words in at least half and in under 10%
of the plain ones, loss rise under 1 nat/token) with the most promoted words is
:attr:`SteeringEvaluation.best_strength`; when none meets them, the one closest to them within the loss limit.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.concepts.logit_lens import LogitLens, feature_logit_lens, readable_words
from mi_crow.mechanistic.sae.concepts.steering import MODES, _check_finite_number
from mi_crow.validation import check_choice, check_positive_int, check_texts

__all__ = ["DEFAULT_STRENGTHS", "DEFINITIONS", "TARGETS", "count_words", "word_pattern", "SteeringEvaluation", "SteeringPoint", "evaluate_steering",
           "evaluate_steering_many"]

DEFAULT_STRENGTHS = (0.25, 0.35, 0.5)
"""Default sweep of ``add`` strengths: multiples of each token's residual norm at the layer. Measured on the demo's
SAEs (SmolLM2-135M, layer 15 of 30): 0.15 barely moves the text, 0.5 costs about 1 nat/token of fluency, 0.8 loops."""

TARGETS = {"feature_active": 0.8, "promoted_rate": 0.5, "plain_promoted_rate": 0.1, "loss_rise": 1.0}
"""What a successful steering reaches: feature active in >= 80% of continuations, promoted words in >= 50% (and in
under 10% of the plain continuations), clean-model loss rise < 1 nat/token."""

DEFINITIONS = {
    "feature_active": "share of continuations in which the feature is among the SAE's top-k latents with a positive "
                      "value on at least one continuation token, the prompt + continuation re-read by the model "
                      "WITHOUT steering and the layer's residual re-encoded by the SAE",
    "promoted_rate": "share of continuations holding, as a whole word (case-insensitive; not inside a longer word), "
                     "one of promoted_words: the feature's top promoted tokens by the logit lens of its decoder "
                     "direction, reduced to letters, 3+ letters, stopwords left out",
    "promoted_count": "whole-word occurrences of promoted_words in all continuations",
    "loss": "the model's mean loss (nats per token) on the continuation tokens given the prompt, WITHOUT steering",
    "loss_rise": "loss minus the loss of the plain (unsteered) continuations",
    "kl": "mean KL(steered || plain) of the next-token distributions over the prompt and plain continuation tokens",
    "continuations": "greedy decoding of max_new_tokens tokens per prompt",
}
"""What each measure means, recorded in every result's JSON."""


@dataclass
class SteeringPoint:
    """The measurements at one strength (or, with ``strength=None``, without steering).

    Attributes:
        strength: the steering strength (``None``: plain generation).
        feature_active: share of continuations in which the SAE finds the feature active.
        promoted_rate: share of continuations holding one of the feature's promoted tokens.
        loss: clean model's mean loss per continuation token (nats).
        loss_rise: ``loss`` minus the plain continuations' loss.
        kl: mean KL(steered || plain) of the next-token distributions over the prompts and plain continuations
            (0 for the plain point).
        promoted_count: promoted tokens in all continuations together.
        continuations: the generated continuations, one per prompt.
        passes: whether the three targets are met.
    """

    strength: float | None
    feature_active: float
    promoted_rate: float
    loss: float
    loss_rise: float
    kl: float
    promoted_count: int
    continuations: list[str]
    passes: bool = False


@dataclass
class SteeringEvaluation:
    """What :func:`evaluate_steering` measured for one feature.

    Attributes:
        neuron: the feature.
        layer: the layer the SAE is attached to.
        mode: the steering mode swept.
        prompts: the prompts.
        promoted_tokens: the feature's promoted tokens (logit lens), highest first.
        suppressed_tokens: its suppressed tokens, lowest first.
        promoted_words: the words counted in the continuations (see :data:`DEFINITIONS`).
        plain: the unsteered measurements.
        points: one :class:`SteeringPoint` per strength, in sweep order.
        best_strength: the strength chosen by the sweep (see the module docstring).
        max_new_tokens: tokens generated per prompt.
    """

    neuron: int
    layer: str
    mode: str
    prompts: list[str]
    promoted_tokens: list[str]
    suppressed_tokens: list[str]
    promoted_words: list[str]
    plain: SteeringPoint
    points: list[SteeringPoint]
    best_strength: float | None
    max_new_tokens: int
    targets: dict[str, float] = field(default_factory=lambda: dict(TARGETS))

    @property
    def best(self) -> SteeringPoint | None:
        """The point at :attr:`best_strength`."""
        return next((p for p in self.points if p.strength == self.best_strength), None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of everything measured."""
        data = asdict(self)
        data["best"] = None if self.best is None else asdict(self.best)
        data["definitions"] = dict(DEFINITIONS)
        return data

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def table(self) -> str:
        """A plain-text table: one row per strength, the plain row first, the chosen strength marked."""
        head = f"{'strength':>9} {'active':>7} {'promoted':>9} {'loss':>7} {'rise':>7} {'KL':>7}  targets"
        lines = [head]
        for p in [self.plain, *self.points]:
            label = "plain" if p.strength is None else f"{p.strength:g}"
            mark = " <- chosen" if p.strength is not None and p.strength == self.best_strength else ""
            ok = "" if p.strength is None else ("met" if p.passes else "not met")
            lines.append(f"{label:>9} {p.feature_active:>7.0%} {p.promoted_rate:>9.0%} {p.loss:>7.3f} "
                         f"{p.loss_rise:>+7.3f} {p.kl:>7.3f}  {ok}{mark}")
        return "\n".join(lines)


def _attached_layer(lm: Any, sae: Any) -> str:
    layers = getattr(lm, "layers", None)
    if layers is None or not layers.is_registered(sae):
        raise UserInputError(
            "the SAE is not attached to this model: attach it first with lm.attach_sae(sae, layer) (steering "
            "evaluation steers through the attached SAE)"
        )
    return str(sae.layer_signature)


class _Capture:
    """A forward hook on the layer module that keeps the last hidden state (the residual the SAE reads)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.hidden: Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, Tensor):
            self.hidden = out.detach()

    def remove(self) -> None:
        self.handle.remove()


def word_pattern(words: Sequence[str]) -> re.Pattern[str] | None:
    """A case-insensitive pattern matching any of ``words`` as a whole word (not inside a longer word: "line"
    matches "a line." but not "online" or "lines"); ``None`` for no words."""
    words = [w for w in words if w]
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
    return re.compile(rf"(?<![^\W\d_])(?:{alternatives})(?![^\W\d_])", re.IGNORECASE)


def count_words(texts: Sequence[str], words: Sequence[str]) -> tuple[float, int]:
    """``(share of texts holding one of words as a whole word, whole-word occurrences in all texts)``."""
    pattern = word_pattern(words)
    if pattern is None or not texts:
        return 0.0, 0
    counts = [len(pattern.findall(t)) for t in texts]
    return sum(1 for c in counts if c) / len(texts), sum(counts)


def _score_texts(lm: Any, sae: Any, layer: str, prompts: list[str], continuations: list[str],
                 neuron: int | Sequence[int],
                 max_length: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Clean forward over each prompt + continuation: per text, whether the feature is active on a continuation
    token (bool ``[n]``), the summed loss of its continuation tokens and their count (``[n]`` each); and the logits
    and attention mask."""
    texts = [p + c for p, c in zip(prompts, continuations)]
    prompt_lens = [len(ids) for ids in lm.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    capture = _Capture(lm.layers.get_module(layer))
    try:
        outputs, enc = lm.inference.forward_batch(texts, max_length=max_length)
    finally:
        capture.remove()
    ids = enc["input_ids"]
    mask = enc["attention_mask"].bool()
    cont = mask.clone()
    for row, n in enumerate(prompt_lens):
        cont[row, :n] = False
    logits = outputs.logits.float().cpu()
    # Loss of each continuation token given everything before it.
    log_probs = F.log_softmax(logits[:, :-1], dim=-1)
    token_loss = -log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    target = cont[:, 1:]
    loss_sum = (token_loss * target).sum(dim=1).double()
    n_tokens = target.sum(dim=1)
    # Is the feature active on a continuation token, as the SAE reads the clean residual?
    hidden = capture.hidden
    if hidden is None:
        raise UserInputError(f"layer {layer!r} produced no hidden state to re-encode")
    with torch.no_grad():
        code = sae.encode(hidden)
    values = code.values.cpu()
    if isinstance(neuron, int):
        fired = ((code.indices.cpu() == neuron) & (values > 0)).any(dim=-1) & cont
        return fired.any(dim=1), loss_sum, n_tokens, logits, mask
    # Several features: [texts, features], each text's continuation tokens against every feature.
    wanted = torch.tensor(list(neuron), dtype=code.indices.dtype)
    hits = (code.indices.cpu().unsqueeze(-1) == wanted) & (values > 0).unsqueeze(-1)  # [n, seq, k, features]
    fired = hits.any(dim=2) & cont.unsqueeze(-1)
    return fired.any(dim=1), loss_sum, n_tokens, logits, mask


def _make_points(strengths: Sequence[float | None], texts: list[str], kls: Sequence[float], base: float | None,
                 active: Tensor, loss_sum: Tensor, n_tok: Tensor, words: Sequence[str],
                 n: int) -> list[SteeringPoint]:
    """One point per strength from scored texts: ``texts`` (and the rows of ``active``, ``loss_sum``, ``n_tok``)
    hold ``n`` continuations per strength, in order."""
    points = []
    for i, (strength, group, kl) in enumerate(zip(strengths, _chunks(texts, n), kls)):
        rows = slice(i * n, (i + 1) * n)
        loss = float(loss_sum[rows].sum()) / max(int(n_tok[rows].sum()), 1)
        rate, count = count_words(group, words)
        rise = 0.0 if base is None else loss - base
        points.append(SteeringPoint(strength, float(active[rows].float().mean()), rate, loss, rise, kl, count,
                                    group))
    return points


def _apply_edit(concepts: Any, idx: int, mode: str, relative: bool, exclude_special: bool, value: float) -> None:
    """Set the ``add`` / ``clamp`` / ``cap`` edit of ``idx`` to ``value`` (a residual-norm multiple if relative)."""
    key = {"strength": value} if relative else {{"add": "activation", "clamp": "value", "cap": "cap"}[mode]: value}
    getattr(concepts, {"add": "add_concept", "clamp": "clamp_concept", "cap": "cap_concept"}[mode])(
        idx, exclude_special=exclude_special, **key)


def _kl(steered: Tensor, plain: Tensor, mask: Tensor) -> float:
    lp = F.log_softmax(steered, dim=-1)
    lq = F.log_softmax(plain, dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(dim=-1)
    return float(kl[mask].mean()) if bool(mask.any()) else 0.0


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _passes(p: SteeringPoint, plain: SteeringPoint, targets: dict[str, float]) -> bool:
    return (p.feature_active >= targets["feature_active"] and p.promoted_rate >= targets["promoted_rate"]
            and plain.promoted_rate < targets["plain_promoted_rate"] and p.loss_rise < targets["loss_rise"]
            and math.isfinite(p.loss) and math.isfinite(p.kl))


def choose_strength(points: Sequence[SteeringPoint], targets: dict[str, float] = TARGETS) -> float | None:
    """The sweep's choice: among strengths that meet the targets, the most promoted tokens (then the smallest loss
    rise); else, within the loss limit, the highest ``promoted_rate + feature_active``; else the smallest loss
    rise."""
    if not points:
        return None
    passing = [p for p in points if p.passes]
    if passing:
        return max(passing, key=lambda p: (p.promoted_rate, p.promoted_count, -p.loss_rise)).strength
    fluent = [p for p in points if p.loss_rise < targets["loss_rise"]]
    if fluent:
        return max(fluent, key=lambda p: (p.promoted_rate + p.feature_active, -p.loss_rise)).strength
    return min(points, key=lambda p: p.loss_rise).strength


def _check_sweep(strengths: Sequence[float] | None) -> list[float]:
    """The strengths of a sweep (default :data:`DEFAULT_STRENGTHS`), each a finite number."""
    raw = DEFAULT_STRENGTHS if strengths is None else strengths
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or len(raw) == 0:
        raise UserInputError(f"strengths must be a non-empty sequence of finite numbers, got {raw!r}")
    return [_check_finite_number(s, f"strengths[{i}]") for i, s in enumerate(raw)]


def _check_unsteered(concepts: Any) -> None:
    if concepts.has_manipulations:
        raise UserInputError("the SAE already carries manipulations; call sae.concepts.reset_manipulations() "
                             "before evaluating steering (the plain baseline must be unsteered)")


def _plain_texts(lm: Any, prompts: list[str], given: Sequence[str] | None, max_new_tokens: int) -> list[str]:
    """The unsteered continuations: ``given`` (checked: one per prompt) or generated."""
    if given is None:
        return lm.generate(prompts, max_new_tokens=max_new_tokens)
    texts = check_texts(list(given), "plain_continuations")
    if len(texts) != len(prompts):
        raise UserInputError(f"plain_continuations must hold one continuation per prompt ({len(prompts)}), "
                             f"got {len(texts)}")
    return texts


def evaluate_steering(
    lm: Any,
    sae: Any,
    neuron: int | str,
    prompts: Sequence[str],
    strengths: Sequence[float] | None = None,
    *,
    mode: str = "add",
    relative: bool = True,
    max_new_tokens: int = 24,
    top_tokens: int = 10,
    exclude_special: bool = True,
    max_length: int | None = None,
    lens: LogitLens | None = None,
    stop_early: bool = False,
    plain_continuations: Sequence[str] | None = None,
    batch_sweep: bool = True,
) -> SteeringEvaluation:
    """Steer one feature at each strength of a sweep and measure whether it worked (see the module docstring).

    The SAE must be attached to ``lm`` (``lm.attach_sae(sae, layer)``); its manipulations must be empty (they are
    reset after the sweep, so the model is left as it was). Generation is greedy, so the result is reproducible.

    Args:
        lm: the ``LanguageModel``.
        sae: the attached SAE.
        neuron: feature index or concept name.
        prompts: the prompts (a few; each is continued once per strength).
        strengths: the sweep (default :data:`DEFAULT_STRENGTHS`); each a finite number: for ``add`` / ``clamp`` /
            ``cap`` a multiple of the residual norm (``relative=True``) or an activation, for ``scale`` the scale.
        mode: ``"add"`` (default), ``"clamp"``, ``"scale"``, ``"cap"`` or ``"ablate"`` (one point, no strength).
        relative: strengths of ``add`` / ``clamp`` / ``cap`` are multiples of each token's residual norm.
        max_new_tokens: tokens generated per prompt.
        top_tokens: promoted tokens looked for (the logit lens's top).
        exclude_special: leave special tokens unsteered.
        max_length: truncate the scored texts to this many tokens.
        lens: a precomputed logit lens holding ``neuron`` (saves recomputing it).
        stop_early: stop the sweep at the first strength that meets the targets or whose loss rise reaches the
            limit (for a sweep in increasing order: the later strengths would only cost more fluency).
        plain_continuations: the unsteered continuations of ``prompts`` when already generated (with the same
            ``max_new_tokens``; saves one generation when several features are measured on the same prompts).
        batch_sweep: for ``add`` / ``clamp`` / ``cap``, generate every strength in one batch (each prompt once per
            strength; the same greedy texts as one generation per strength, up to float rounding, for about the
            cost of one on a CPU); ``stop_early`` then has nothing to save. ``False``: one generation per strength.

    Returns:
        A :class:`SteeringEvaluation` (``.table()``, ``.to_json()``, ``.best_strength``).

    Raises:
        UserInputError: the SAE is not attached to ``lm``; a bad neuron, name, strength, mode or prompt list; the
            SAE already carries manipulations.
    """
    layer = _attached_layer(lm, sae)
    concepts = sae.concepts
    targets = dict(TARGETS)
    idx = concepts.dictionary.resolve(neuron)
    prompts = check_texts(list(prompts) if not isinstance(prompts, str) else prompts, "prompts")
    mode = check_choice(mode, "mode", MODES)
    max_new_tokens = check_positive_int(max_new_tokens, "max_new_tokens")
    top_tokens = check_positive_int(top_tokens, "top_tokens")
    if mode == "ablate":
        sweep: list[float] = [0.0]
    else:
        sweep = _check_sweep(strengths)
    _check_unsteered(concepts)
    if lens is None or idx not in lens.neurons:
        lens = feature_logit_lens(lm, sae, [idx], top=top_tokens)
    row = lens.row(idx)
    promoted_text = lens.promoted[row][:top_tokens]
    # Words a reader would recognise (3+ letters, no stopwords): "a" or "," in a continuation says nothing.
    words = readable_words(promoted_text)

    def apply(strength: float) -> None:
        if mode == "ablate":
            concepts.ablate_concept(idx)
        elif mode == "scale":
            concepts.manipulate_concept(idx, strength)
        else:
            _apply_edit(concepts, idx, mode, relative, exclude_special, strength)

    def measure(strengths: list[float | None], texts: list[str], kls: list[float],
                base: float | None) -> tuple[list[SteeringPoint], Tensor, Tensor]:
        """One point per strength; ``texts`` holds len(prompts) continuations per strength, in order."""
        active, loss_sum, n_tok, logits, mask = _score_texts(lm, sae, layer, prompts * len(strengths), texts, idx,
                                                             max_length)
        return _make_points(strengths, texts, kls, base, active, loss_sum, n_tok, words, len(prompts)), logits, mask

    steering = concepts._steering
    try:
        plain_text = _plain_texts(lm, prompts, plain_continuations, max_new_tokens)
        (plain,), plain_logits, mask = measure([None], plain_text, [0.0], None)
        plain_texts = [p + c for p, c in zip(prompts, plain_text)]
        # Edits whose value scales (add / clamp / cap) run the whole sweep as one batch: every prompt once per
        # strength, the edit's value 1 times a per-text factor (Steering.row_scales).
        batched = batch_sweep and mode in ("add", "clamp", "cap") and len(sweep) > 1
        groups = [sweep] if batched else [[s] for s in sweep]
        points: list[SteeringPoint] = []
        for group in groups:
            apply(1.0 if batched else group[0])
            if batched:
                steering.row_scales = torch.tensor([s for s in group for _ in prompts], dtype=torch.float64)
            try:
                steered = lm.generate(prompts * len(group), max_new_tokens=max_new_tokens)
                # The steered model's distributions on the plain texts, against the plain model's.
                out, _ = lm.inference.forward_batch(plain_texts * len(group), max_length=max_length)
            finally:
                concepts.reset_manipulations()
            steered_logits = out.logits.float().cpu()
            n = len(prompts)
            kls = [_kl(steered_logits[i * n:(i + 1) * n], plain_logits, mask) for i in range(len(group))]
            measured, _, _ = measure(list(group), steered, kls, plain.loss)
            for point in measured:
                point.passes = _passes(point, plain, targets)
            points.extend(measured)
            if stop_early and not batched and (points[-1].passes or points[-1].loss_rise >= targets["loss_rise"]):
                break
    finally:
        concepts.reset_manipulations()
    return SteeringEvaluation(
        neuron=idx, layer=layer, mode=mode, prompts=prompts, promoted_tokens=promoted_text,
        suppressed_tokens=lens.suppressed[row][:top_tokens], promoted_words=words, plain=plain, points=points,
        best_strength=choose_strength(points, targets), max_new_tokens=max_new_tokens, targets=dict(targets),
    )


def evaluate_steering_many(
    lm: Any,
    sae: Any,
    neurons: Sequence[int | str],
    prompts: Sequence[str],
    strengths: Sequence[float] | None = None,
    *,
    mode: str = "add",
    relative: bool = True,
    max_new_tokens: int = 24,
    top_tokens: int = 10,
    exclude_special: bool = True,
    max_length: int | None = None,
    lens: LogitLens | None = None,
    plain_continuations: Sequence[str] | None = None,
) -> list[SteeringEvaluation]:
    """:func:`evaluate_steering` for several features at once: every feature at every strength in one batched
    generation (each feature steers only its own rows: ``Steering.row_masks``; the plain continuations, unless
    given, are unsteered rows of the same batch), one forward for the KL, one scoring forward for the steered and one
    for the plain continuations. Each result holds what ``evaluate_steering`` gives
    for that feature (the same greedy texts, up to float rounding), for about the cost of one feature on a CPU,
    where generating a few rows is bound by reading the weights.

    Args:
        neurons: the features (indices or concept names), distinct.
        mode: ``"add"`` (default), ``"clamp"`` or ``"cap"``: the modes whose strength scales a value.
        others: as for :func:`evaluate_steering`.

    Returns:
        One :class:`SteeringEvaluation` per feature, in the order given.

    Raises:
        UserInputError: as :func:`evaluate_steering`; no features, or a feature given twice.
    """
    layer = _attached_layer(lm, sae)
    concepts = sae.concepts
    targets = dict(TARGETS)
    if isinstance(neurons, (str, bytes)) or not isinstance(neurons, Sequence) or len(neurons) == 0:
        raise UserInputError(f"neurons must be a non-empty sequence of feature indices or names, got {neurons!r}")
    idxs = [concepts.dictionary.resolve(n) for n in neurons]
    if len(set(idxs)) != len(idxs):
        raise UserInputError(f"neurons must be distinct features, got {list(neurons)!r} (indices {idxs})")
    prompts = check_texts(list(prompts) if not isinstance(prompts, str) else prompts, "prompts")
    mode = check_choice(mode, "mode", ("add", "clamp", "cap"))
    max_new_tokens = check_positive_int(max_new_tokens, "max_new_tokens")
    top_tokens = check_positive_int(top_tokens, "top_tokens")
    sweep = _check_sweep(strengths)
    _check_unsteered(concepts)
    if lens is None or any(i not in lens.neurons for i in idxs):
        lens = feature_logit_lens(lm, sae, idxs, top=top_tokens)
    lens_rows = [lens.row(i) for i in idxs]
    promoted = [lens.promoted[r][:top_tokens] for r in lens_rows]
    words = [readable_words(p) for p in promoted]
    n, n_s, n_f = len(prompts), len(sweep), len(idxs)

    steering = concepts._steering
    steered_rows = n_f * n_s * n
    # The plain continuations, when not given, are generated as unsteered rows of the same batch (no edit applies to
    # them): on a CPU a few more rows cost far less than a generation of their own.
    extra = n if plain_continuations is None else 0

    def steer_rows(rows_plain: int) -> None:
        """Every feature's edit, value 1 on its own rows only, times the row's strength. Rows: feature-major, then
        strength, then prompt; then ``rows_plain`` unsteered rows."""
        for idx in idxs:
            _apply_edit(concepts, idx, mode, relative, exclude_special, 1.0)
        steering.row_scales = torch.tensor([s for _ in idxs for s in sweep for _ in prompts] + [0.0] * rows_plain,
                                           dtype=torch.float64)
        steering.row_masks = {
            idx: torch.tensor([f == j for f in range(n_f) for _ in sweep for _ in prompts] + [False] * rows_plain)
            for j, idx in enumerate(idxs)
        }

    try:
        steer_rows(extra)
        try:
            generated = lm.generate(prompts * (n_f * n_s) + prompts[:extra], max_new_tokens=max_new_tokens)
        finally:
            concepts.reset_manipulations()
        steered = generated[:steered_rows]
        plain_text = generated[steered_rows:] if extra else _plain_texts(lm, prompts, plain_continuations,
                                                                          max_new_tokens)
        p_active, p_loss, p_tok, plain_logits, mask = _score_texts(lm, sae, layer, prompts, plain_text, idxs,
                                                                    max_length)
        plain_texts = [p + c for p, c in zip(prompts, plain_text)]
        # The steered model's distributions on the plain texts, against the plain model's.
        steer_rows(0)
        try:
            out, _ = lm.inference.forward_batch(plain_texts * (n_f * n_s), max_length=max_length)
        finally:
            concepts.reset_manipulations()
        steered_logits = out.logits.float().cpu()
        s_active, s_loss, s_tok, _, _ = _score_texts(lm, sae, layer, prompts * (n_f * n_s), steered, idxs,
                                                     max_length)
    finally:
        concepts.reset_manipulations()
    results = []
    for j, idx in enumerate(idxs):
        (plain,) = _make_points([None], plain_text, [0.0], None, p_active[:, j], p_loss, p_tok, words[j], n)
        block = slice(j * n_s * n, (j + 1) * n_s * n)
        kls = [_kl(steered_logits[block][i * n:(i + 1) * n], plain_logits, mask) for i in range(n_s)]
        points = _make_points(sweep, steered[block], kls, plain.loss, s_active[block, j], s_loss[block],
                              s_tok[block], words[j], n)
        for point in points:
            point.passes = _passes(point, plain, targets)
        results.append(SteeringEvaluation(
            neuron=idx, layer=layer, mode=mode, prompts=prompts, promoted_tokens=promoted[j],
            suppressed_tokens=lens.suppressed[lens_rows[j]][:top_tokens], promoted_words=words[j], plain=plain,
            points=points, best_strength=choose_strength(points, targets), max_new_tokens=max_new_tokens,
            targets=dict(targets),
        ))
    return results
