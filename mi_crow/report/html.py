"""Write the browsable feature report: one self-contained HTML file (inline CSS, JS, SVG and JSON data)."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from mi_crow.report.stats import FeatureStats
from mi_crow.report.svg import histogram_chart, line_chart
from mi_crow.report.template import PAGE
from mi_crow.store.atomic import atomic_write_text

logger = logging.getLogger(__name__)

# Labels and explanations of the metrics the evaluation and the trainer report.
_METRIC_LABELS = {
    "fvu": ("FVU", "fraction of variance unexplained by the reconstruction (lower is better)"),
    "l0": ("L0", "mean number of active latents per token"),
    "dead_fraction": ("dead fraction", "fraction of latents that never fired on the evaluation tokens"),
    "loss_recovered": ("loss recovered", "share of the LM loss gap (zero-ablation vs clean) that the SAE closes"),
    "mse": ("MSE", "mean squared reconstruction error"),
    "loss_clean": ("LM loss (clean)", "next-token cross-entropy of the model without the SAE"),
    "loss_sae": ("LM loss (SAE)", "cross-entropy with the SAE reconstruction spliced in"),
    "loss_zero": ("LM loss (zeroed)", "cross-entropy with the layer output zeroed"),
    "delta_loss": ("delta loss", "LM loss with the SAE minus clean"),
    "eval_texts": ("LM-loss texts", "texts used for the LM-loss numbers"),
    "n_tokens": ("tokens", "tokens evaluated"),
    "train_fvu": ("FVU (training texts)", "FVU on the stored run the SAE was trained on"),
    "train_n_tokens": ("training tokens", "tokens of the stored run the training-text figures are measured on"),
}

_HISTORY_CHARTS = (
    ("loss", ("loss", "auxk_loss"), False),
    ("MSE", ("mse",), False),
    ("FVU", ("fvu",), False),
    ("L0", ("l0",), False),
    ("dead fraction", ("dead_fraction",), False),
)


def _check_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}: {path!r}")
    return Path(path)


def _get(item: Any, names: Sequence[str], default: Any = None) -> Any:
    """First present field among ``names`` of a dict, NamedTuple or object."""
    if isinstance(item, Mapping):
        for n in names:
            if n in item and item[n] is not None:
                return item[n]
        return default
    if hasattr(item, "_asdict"):
        return _get(item._asdict(), names, default)
    for n in names:
        value = getattr(item, n, None)
        if value is not None:
            return value
    return default


def _as_float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _token_display(token: str | None, tokenizer: Any) -> str:
    """Readable form of a vocabulary token (byte-level BPE ``Ġ``/``Ċ`` and sentencepiece ``▁`` markers undone)."""
    if not token:
        return ""
    if tokenizer is not None and hasattr(tokenizer, "convert_tokens_to_string"):
        try:
            return str(tokenizer.convert_tokens_to_string([token]))
        except Exception:  # noqa: BLE001 - some tokenizers reject lone pieces; fall back to the marker rules
            pass
    return token.replace("\u0120", " ").replace("\u010a", "\n").replace("\u2581", " ")


class _Locator:
    """Finds the character span of a tracked token inside its text, with tokenizer offsets when possible."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, tuple[list[tuple[int, int]], list[str]] | None] = {}

    def _encode(self, text: str) -> tuple[list[tuple[int, int]], list[str]] | None:
        if text in self._cache:
            return self._cache[text]
        result = None
        if self.tokenizer is not None:
            try:
                enc = self.tokenizer(text, return_offsets_mapping=True)
                ids = enc["input_ids"]
                tokens = list(self.tokenizer.convert_ids_to_tokens(ids))
                result = ([tuple(o) for o in enc["offset_mapping"]], tokens)
            except Exception:  # noqa: BLE001 - slow tokenizers have no offsets: use the string search below
                result = None
        self._cache[text] = result
        return result

    def locate(self, text: str, position: int | None, token: str | None, shown: str) -> tuple[int, int]:
        enc = self._encode(text)
        if enc is not None and position is not None:
            offsets, tokens = enc
            candidates = range(len(tokens))
            if token:
                # The tracker's position may be counted with padding or a BOS the offsets lack: prefer the
                # closest position whose token string agrees with the tracked one.
                matching = [p for p in candidates if tokens[p] == token]
                if matching:
                    p = min(matching, key=lambda q: abs(q - position))
                    s, e = offsets[p]
                    if e > s:
                        return s, e
            if 0 <= position < len(offsets):
                s, e = offsets[position]
                if e > s:
                    return s, e
        needle = shown.strip() or shown
        if needle:
            found = text.find(needle)
            if found >= 0:
                return found, found + len(needle)
        return 0, 0


def _normalize_top_texts(top_texts: Any) -> dict[int, list[Any]]:
    if top_texts is None:
        return {}
    if isinstance(top_texts, Mapping) and isinstance(top_texts.get("neurons"), list):
        # The layout of ``sae.concepts.export_top_texts_json``.
        items: Iterable[tuple[Any, Any]] = [(row["neuron"], row.get("top_texts", [])) for row in top_texts["neurons"]]
    elif isinstance(top_texts, Mapping):
        items = top_texts.items()
    elif isinstance(top_texts, Sequence) and not isinstance(top_texts, (str, bytes)):
        items = enumerate(top_texts)
    else:
        raise TypeError(
            f"top_texts must be a mapping neuron -> list of examples (or a list indexed by neuron), "
            f"got {type(top_texts).__name__}"
        )
    out: dict[int, list[Any]] = {}
    for key, examples in items:
        try:
            idx = int(key)
        except (TypeError, ValueError):
            raise TypeError(f"top_texts keys must be neuron indices, got {key!r}") from None
        if examples is None:
            continue
        if isinstance(examples, (str, bytes)) or not isinstance(examples, Iterable):
            raise TypeError(f"top_texts[{idx}] must be a list of examples, got {type(examples).__name__}")
        out[idx] = list(examples)
    return out


def _normalize_history(history: Any) -> list[dict[str, Any]]:
    if history is None:
        return []
    if isinstance(history, Mapping):
        for key in ("history", "steps", "log", "records"):
            if isinstance(history.get(key), list):
                return _normalize_history(history[key])
        lists = {k: v for k, v in history.items() if isinstance(v, list)}
        if lists:  # column format: {"loss": [...], "l0": [...]}
            n = max(len(v) for v in lists.values())
            return [{k: (v[i] if i < len(v) else None) for k, v in lists.items()} for i in range(n)]
        raise TypeError(f"history must be a list of per-step dicts or a dict of lists, got keys {list(history)}")
    if isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        rows = []
        for i, row in enumerate(history):
            if isinstance(row, Mapping):
                rows.append(dict(row))
            elif hasattr(row, "_asdict"):
                rows.append(dict(row._asdict()))
            elif hasattr(row, "__dict__"):
                rows.append(dict(vars(row)))
            else:
                raise TypeError(f"history[{i}] must be a dict of metrics, got {type(row).__name__}")
        return rows
    raise TypeError(f"history must be a list of per-step dicts, got {type(history).__name__}")


def _concept_names(concepts: Any) -> dict[int, tuple[str, str]]:
    if concepts is None:
        return {}
    if isinstance(concepts, Mapping):
        out = {}
        for k, v in concepts.items():
            if isinstance(v, str):
                out[int(k)] = (v, "")
            else:
                out[int(k)] = (str(_get(v, ("name",), "")), str(_get(v, ("notes",), "") or ""))
        return out
    if hasattr(concepts, "to_dict") and not isinstance(concepts, Iterable):
        return _concept_names(concepts.to_dict())
    if isinstance(concepts, Iterable):
        out = {}
        for c in concepts:
            neuron = _get(c, ("neuron", "neuron_idx", "index"))
            name = _get(c, ("name",))
            if neuron is None or name is None:
                raise TypeError(f"concepts entries need a neuron index and a name, got {c!r}")
            out[int(neuron)] = (str(name), str(_get(c, ("notes",), "") or ""))
        return out
    raise TypeError(f"concepts must be a mapping neuron -> name or a ConceptDictionary, got {type(concepts).__name__}")


def _json_for_script(data: Any) -> str:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # Inside <script>, "</script" or "<!--" in a string would end or confuse the element.
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") \
        .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _overview_svgs(history: list[dict[str, Any]], stats: FeatureStats | None, n_latents: int) -> list[str]:
    charts = []
    if history:
        x_key = "tokens" if any(_as_float(r.get("tokens")) is not None for r in history) else "step"
        for title, keys, log_y in _HISTORY_CHARTS:
            series = {}
            for key in keys:
                pts = [(
                    _as_float(r.get(x_key)) if r.get(x_key) is not None else float(i),
                    _as_float(r.get(key)),
                ) for i, r in enumerate(history)]
                pts = [(x, y) for x, y in pts if x is not None and y is not None]
                if pts:
                    series[key] = pts
            if series:
                charts.append(line_chart(series, title=f"{title} during training", x_label=x_key, log_y=log_y))
    if stats is not None and stats.n_tokens > 0:
        freq = stats.frequency
        alive = freq[freq > 0]
        dead = n_latents - int(alive.numel())
        if alive.numel():
            logf = alive.log10()
            lo = math.floor(float(logf.min()) * 2) / 2
            hi = 0.0
            n_bins = max(1, int(round((hi - lo) / 0.25)))
            edges = [lo + (hi - lo) * j / n_bins for j in range(n_bins + 1)]
            idx = ((logf - lo) / (hi - lo) * n_bins).floor().clamp(0, n_bins - 1).long()
            counts = [int(c) for c in idx.bincount(minlength=n_bins)]
            labels = [f"1e{round(e):d}" if abs(e - round(e)) < 1e-9 else "" for e in edges]
            charts.append(histogram_chart(
                counts, edges, edge_labels=labels,
                title=f"firing frequency (log scale); {dead} of {n_latents} dead",
                x_label="fraction of tokens a feature fires on", y_label="features"))
    return charts


def _lens_json(lens: Any, n_latents: int) -> dict[str, list[list[Any]]]:
    """``{feature: [promoted, promoted_logits, suppressed, suppressed_logits]}`` from a ``LogitLens`` or a dict."""
    if lens is None:
        return {}
    out: dict[str, list[list[Any]]] = {}
    if hasattr(lens, "neurons") and hasattr(lens, "promoted"):
        for row, idx in enumerate(lens.neurons):
            out[str(int(idx))] = [list(lens.promoted[row]), [round(float(v), 3) for v in lens.promoted_logits[row]],
                                  list(lens.suppressed[row]),
                                  [round(float(v), 3) for v in lens.suppressed_logits[row]]]
    elif isinstance(lens, Mapping):
        for key, value in lens.items():
            if not isinstance(value, Mapping):
                raise TypeError(f"logit_lens[{key!r}] must be a dict with 'promoted' and 'suppressed', got "
                                f"{type(value).__name__}")
            out[str(int(key))] = [list(value.get("promoted", [])),
                                  [_as_float(v) for v in value.get("promoted_logits", [])],
                                  list(value.get("suppressed", [])),
                                  [_as_float(v) for v in value.get("suppressed_logits", [])]]
    else:
        raise TypeError(f"logit_lens must be a LogitLens or a mapping feature -> dict, got {type(lens).__name__}")
    bad = [k for k in out if not 0 <= int(k) < n_latents]
    if bad:
        raise ValueError(f"neuron index {bad[0]} in logit_lens is out of range [0, {n_latents})")
    return out


def _steering_json(steering: Mapping[int, Any] | None, n_latents: int) -> dict[str, Any]:
    """The steering measurements, reduced to what the page shows (the sweep and the chosen point's texts)."""
    if steering is None:
        return {}
    if not isinstance(steering, Mapping):
        raise TypeError(f"steering must be a mapping feature -> SteeringEvaluation, got {type(steering).__name__}")
    out = {}
    for key, result in steering.items():
        idx = int(key)
        if not 0 <= idx < n_latents:
            raise ValueError(f"neuron index {idx} in steering is out of range [0, {n_latents})")
        data = result.to_dict() if hasattr(result, "to_dict") else dict(result)

        def point(p: Mapping[str, Any]) -> dict[str, Any]:
            return {k: p.get(k) for k in ("strength", "feature_active", "promoted_rate", "loss", "loss_rise", "kl",
                                          "passes")}

        best = data.get("best") or {}
        out[str(idx)] = {
            "mode": data.get("mode"), "best_strength": data.get("best_strength"), "prompts": data.get("prompts", []),
            "plain": point(data.get("plain", {})), "points": [point(p) for p in data.get("points", [])],
            "plain_texts": (data.get("plain") or {}).get("continuations", []),
            "steered_texts": best.get("continuations", []),
        }
    return out


def _nearest_decoder(sae: Any, n_latents: int, top: int, chunk: int = 1024) -> dict[str, list[list[float]]]:
    """Each feature's ``top`` nearest decoder directions by cosine similarity (chunked ``W_dec @ W_dec.T``)."""
    w = getattr(sae, "W_dec", None)
    if top <= 0 or w is None or not hasattr(w, "shape") or w.shape[0] != n_latents or n_latents < 2:
        return {}
    import torch

    with torch.no_grad():
        unit = w.detach().float().cpu()
        unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
        k = min(top + 1, n_latents)
        out = {}
        for start in range(0, n_latents, chunk):
            sims = unit[start:start + chunk] @ unit.T
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + start] = -2.0  # not itself
            val, idx = sims.topk(k - 1, dim=1)
            for r, (vs, js) in enumerate(zip(val.tolist(), idx.tolist())):
                out[str(start + r)] = [[j, round(v, 3)] for j, v in zip(js, vs)]
    return out


def _frontier_svg(points: Sequence[Mapping[str, Any]] | None) -> str:
    """The L0-FVU frontier of several SAEs (``mi_crow.report.frontier``), or nothing with fewer than two points."""
    if not points or len(points) < 2:
        return ""
    try:
        from mi_crow.report.frontier import frontier_svg
    except ImportError:  # the frontier module ships with the SAE grid; without it there is nothing to draw
        logger.warning("mi_crow.report.frontier is not available: the L0-FVU frontier is left out of the report")
        return ""
    return frontier_svg([dict(p) for p in points], title="L0 vs FVU of the SAEs in the store")


def write_feature_report(
    path: str | os.PathLike[str],
    sae: Any = None,
    *,
    top_texts: Any = None,
    history: Any = None,
    eval_metrics: Mapping[str, Any] | None = None,
    feature_stats: FeatureStats | None = None,
    concepts: Any = None,
    tokenizer: Any = None,
    title: str = "mi_crow feature report",
    metadata: Mapping[str, Any] | None = None,
    window_chars: int = 120,
    max_examples: int = 10,
    initial_feature: int | None = None,
    logit_lens: Any = None,
    steering: Mapping[int, Any] | None = None,
    quantile_examples: Any = None,
    frontier: Sequence[Mapping[str, Any]] | None = None,
    nearest: int = 5,
) -> Path:
    """Write one self-contained HTML page to browse an SAE's features.

    The page has an overview (metric cards, training curves of loss/FVU/L0/dead fraction, a log-scale histogram of
    firing frequencies, the L0-FVU frontier when several SAEs are given), a sortable and searchable table of
    features (index, concept name, firing frequency, mean and max activation, top token, top promoted token) and,
    per feature, a dashboard: the tokens its decoder direction promotes and suppresses (logit lens through the
    final norm and unembedding), its density and activation histogram, its top texts and examples across its
    activation quantiles with the firing token highlighted by strength, the features that fire with it most
    often, the features with the nearest decoder directions, and its steering measurement when there is one.
    Everything (CSS, JS, SVG, data as JSON) is inline: the file opens from disk without network.

    Args:
        path: output file (written atomically).
        sae: the autoencoder (for ``n_latents``, ``n_inputs``, ``k``); optional if ``feature_stats`` or
            ``top_texts`` tell the number of features.
        top_texts: neuron -> list of examples, strongest first, as returned by ``sae.concepts.get_top_texts()``;
            or the JSON of ``sae.concepts.export_top_texts_json``; each example a ``TopText``, dict or object with
            ``text``, ``activation`` (or ``score``), the token position ``token_position`` (special tokens
            included, padding excluded) and the token string ``token``.
        history: training history: a list of per-step dicts (``step``, ``tokens``, ``loss``, ``mse``, ``fvu``,
            ``l0``, ``dead_fraction``, ``auxk_loss`` ...), or a dict holding such a list under ``history``.
        eval_metrics: evaluation numbers (``fvu``, ``l0``, ``dead_fraction``, ``loss_recovered`` ...).
        feature_stats: per-feature firing statistics (:func:`mi_crow.report.compute_feature_stats`).
        concepts: neuron -> name (or a ``ConceptDictionary``).
        tokenizer: the model's tokenizer, to locate the tracked token in its text via offsets (optional: without
            it the token string is searched in the text).
        title: page title.
        metadata: shown in the header (``model``, ``layer``, ``sae``, ``tokens`` ...).
        window_chars: characters of context shown on each side of the firing token.
        max_examples: top texts kept per feature.
        initial_feature: feature opened when the page loads (default: the first feature with texts).
        logit_lens: a ``LogitLens`` (``sae.concepts.feature_logit_lens``) or ``{feature: {"promoted": [...],
            "promoted_logits": [...], "suppressed": [...], "suppressed_logits": [...]}}``.
        steering: ``{feature: SteeringEvaluation or its to_dict()}`` measured by ``evaluate_steering``.
        quantile_examples: ``{feature: [example, ...]}`` across the activation range (examples as in ``top_texts``,
            with a ``quantile``), as ``ActivationSampler.examples`` returns them.
        frontier: points ``{"l0", "fvu", "sae_id", ...}`` of several trained SAEs: drawn as the L0-FVU frontier
            (with two or more points).
        nearest: decoder-direction neighbours listed per feature (needs ``sae.W_dec``; 0: none).

    Returns:
        The path written.
    """
    out = _check_path(path)
    for name, value, minimum in (("window_chars", window_chars, 1), ("max_examples", max_examples, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if eval_metrics is not None and not isinstance(eval_metrics, Mapping):
        raise TypeError(f"eval_metrics must be a mapping of metric name -> number, got {type(eval_metrics).__name__}")
    if feature_stats is not None and not isinstance(feature_stats, FeatureStats):
        raise TypeError(f"feature_stats must be a FeatureStats, got {type(feature_stats).__name__}")
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    examples_by_neuron = _normalize_top_texts(top_texts)
    rows = _normalize_history(history)
    names = _concept_names(concepts)

    n_latents = None
    if sae is not None:
        n_latents = int(sae.n_latents)
    if feature_stats is not None:
        if n_latents is not None and feature_stats.n_latents != n_latents:
            raise ValueError(
                f"feature_stats has {feature_stats.n_latents} features but the SAE has n_latents={n_latents}"
            )
        n_latents = feature_stats.n_latents
    if n_latents is None:
        if not examples_by_neuron:
            raise ValueError("write_feature_report needs sae, feature_stats or top_texts to know the features")
        n_latents = max(examples_by_neuron) + 1
    bad = [i for i in list(examples_by_neuron) + list(names) if not 0 <= i < n_latents]
    if bad:
        raise ValueError(f"neuron index {bad[0]} in top_texts/concepts is out of range [0, {n_latents})")
    if initial_feature is not None and not (isinstance(initial_feature, int) and 0 <= initial_feature < n_latents):
        raise ValueError(f"initial_feature must be a feature index in [0, {n_latents}), got {initial_feature!r}")

    locator = _Locator(tokenizer)
    texts: list[str] = []
    text_ids: dict[str, int] = {}
    examples_json: dict[str, list[list[Any]]] = {}
    top_tokens: dict[int, str] = {}
    for idx, examples in examples_by_neuron.items():
        rows_ex = []
        token_counts: Counter[str] = Counter()
        for ex in examples[:max_examples]:
            text = _get(ex, ("text",))
            if not isinstance(text, str):
                raise TypeError(f"top_texts[{idx}] example has no 'text' string: {ex!r}")
            score = _as_float(_get(ex, ("score", "activation", "value", "act"), 0.0)) or 0.0
            position = _get(ex, ("token_position", "token_idx", "token_index", "position", "pos"))
            token = _get(ex, ("token", "token_str", "token_string"))
            token = str(token) if token is not None else None
            shown = _token_display(token, tokenizer)
            start, end = locator.locate(text, int(position) if position is not None else None, token, shown)
            tid = text_ids.setdefault(text, len(texts))
            if tid == len(texts):
                texts.append(text)
            rows_ex.append([tid, start, end, score, shown])
            if shown.strip():
                token_counts[shown.strip()] += 1
        examples_json[str(idx)] = rows_ex
        if token_counts:
            top_tokens[idx] = token_counts.most_common(1)[0][0]

    quantile_json: dict[str, list[list[Any]]] = {}
    for idx, examples in _normalize_top_texts(quantile_examples).items():
        if not 0 <= idx < n_latents:
            raise ValueError(f"neuron index {idx} in quantile_examples is out of range [0, {n_latents})")
        rows_q = []
        for ex in examples:
            text = _get(ex, ("text",))
            if not isinstance(text, str):
                raise TypeError(f"quantile_examples[{idx}] example has no 'text' string: {ex!r}")
            score = _as_float(_get(ex, ("activation", "score", "value"), 0.0)) or 0.0
            position = _get(ex, ("token_position", "position"))
            token = _get(ex, ("token",))
            token = str(token) if token is not None else None
            shown = _token_display(token, tokenizer)
            start, end = locator.locate(text, int(position) if position is not None else None, token, shown)
            tid = text_ids.setdefault(text, len(texts))
            if tid == len(texts):
                texts.append(text)
            rows_q.append([tid, start, end, score, shown, _as_float(_get(ex, ("quantile",), None))])
        quantile_json[str(idx)] = rows_q
    lens_json = _lens_json(logit_lens, n_latents)
    steering_json = _steering_json(steering, n_latents)
    neighbours = _nearest_decoder(sae, n_latents, nearest)
    cofire: dict[str, list[list[float]]] = {}
    if feature_stats is not None and feature_stats.cofire_pairs is not None:
        for i, j, c in feature_stats.cofire_pairs.tolist():
            cofire.setdefault(str(i), []).append([j, c])
        cofire = {k: [[j, round(c / own, 4)] for j, c in v if j != int(k)]
                  for k, v in cofire.items() for own in [next((c for j, c in v if j == int(k)), 0)] if own > 0}

    features = []
    hist_edges: list[float] = []
    if feature_stats is not None:
        freq = feature_stats.frequency.tolist()
        mean = feature_stats.mean_activation.tolist()
        amax = feature_stats.act_max.tolist()
        hist = feature_stats.hist_counts
        hist_edges = [round(float(e), 6) for e in feature_stats.hist_log10_edges]
        nz = hist > 0
        any_nz = nz.any(dim=1)
        first = nz.float().argmax(dim=1).tolist()
        last = (hist.shape[1] - 1 - nz.flip(1).float().argmax(dim=1)).tolist()
        any_nz = any_nz.tolist()
        hist_rows = hist.tolist()
    for i in range(n_latents):
        name, notes = names.get(i, ("", ""))
        f: dict[str, Any] = {"i": i, "n": name, "t": top_tokens.get(i, "")}
        lens_row = lens_json.get(str(i))
        if lens_row is not None:
            f["p"] = lens_row[0][0] if lens_row[0] else ""
        if notes:
            f["notes"] = notes
        if feature_stats is not None:
            f.update(f=freq[i], m=round(mean[i], 6), x=round(amax[i], 6), d=feature_stats.fire_count[i].item() == 0)
            if any_nz[i]:
                f["hs"] = first[i]
                f["h"] = hist_rows[i][first[i]: last[i] + 1]
        else:
            ex = examples_json.get(str(i), [])
            f.update(f=None, m=None, x=max((e[3] for e in ex), default=None), d=False)
        features.append(f)

    metrics = dict(eval_metrics or {})
    cards = []
    for key, value in metrics.items():
        v = None if isinstance(value, bool) else _as_float(value)
        if v is None:
            continue
        label, help_text = _METRIC_LABELS.get(key, (key.replace("_", " "), ""))
        if metrics.get("held_out") and key in ("fvu", "mse", "l0"):
            label, help_text = f"{label} (held-out)", help_text + "; on texts the SAE was not trained on"
        cards.append({"label": label, "value": v, "help": help_text})
    if feature_stats is not None and "dead_fraction" not in metrics:
        cards.append({"label": "dead fraction", "value": feature_stats.dead_fraction,
                      "help": f"features that never fired on the {feature_stats.n_tokens} report tokens"})

    meta: dict[str, Any] = {}
    if sae is not None:
        meta.update(n_latents=int(sae.n_latents), n_inputs=int(getattr(sae, "n_inputs", 0)) or None,
                    k=getattr(sae, "k", None))
    if feature_stats is not None:
        meta["tokens"] = feature_stats.n_tokens
    for key, value in (metadata or {}).items():
        meta[str(key)] = value if isinstance(value, (int, float, str)) or value is None else str(value)
    meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    if initial_feature is None:
        with_examples = [int(k) for k, v in examples_json.items() if v]
        initial_feature = min(with_examples) if with_examples else None

    data = {
        "meta": meta,
        "cards": cards,
        "features": features,
        "texts": texts,
        "examples": examples_json,
        "hist_edges": hist_edges,
        "window": window_chars,
        "initial_feature": initial_feature,
        "metrics": {k: _as_float(v) for k, v in metrics.items()},
        "lens": lens_json,
        "quantile": quantile_json,
        "cofire": cofire,
        "cofire_tokens": feature_stats.cofire_tokens if feature_stats is not None else 0,
        "nearest": neighbours,
        "steering": steering_json,
    }
    overview = "".join(_overview_svgs(rows, feature_stats, n_latents)) + _frontier_svg(frontier)
    page = (PAGE.replace("@@TITLE@@", escape(title))
            .replace("@@OVERVIEW@@", overview)
            .replace("@@DATA@@", _json_for_script(data)))
    # Atomic, with the umask's permissions: a report is meant to be shared like any file the user writes.
    atomic_write_text(out, page)
    logger.info("wrote feature report %s (%d features, %d texts)", out, n_latents, len(texts))
    return out
