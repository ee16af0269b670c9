"""Export of the collected top texts and statistics as JSON or CSV files (for people and the HTML report)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from mi_crow.mechanistic.sae.concepts.dictionary import ConceptDictionary, _atomic_write_text
from mi_crow.mechanistic.sae.concepts.tracker import TopTextTracker

__all__ = ["export_rows", "write_top_texts_csv", "write_top_texts_json"]


def export_rows(tracker: TopTextTracker, dictionary: ConceptDictionary, include_empty: bool) -> list[dict[str, Any]]:
    """One dict per neuron: ``{"neuron", "name", "firing_count", "mean_activation", "max_activation",
    "top_texts": [TopText as dict, ...]}``; neurons with no entry are left out unless ``include_empty``."""
    stats = tracker.stats()
    tops = tracker.top_texts()
    count = stats.firing_count.tolist()
    mean = stats.mean_activation.tolist()
    peak = stats.max_activation.tolist()
    rows = []
    for neuron, records in enumerate(tops):
        if not records and not include_empty:
            continue
        rows.append(
            {
                "neuron": neuron,
                "name": dictionary.name_of(neuron),
                "firing_count": count[neuron],
                "mean_activation": mean[neuron],
                "max_activation": peak[neuron],
                "top_texts": [r._asdict() for r in records],
            }
        )
    return rows


def write_top_texts_json(
    path: str | os.PathLike[str],
    tracker: TopTextTracker,
    dictionary: ConceptDictionary,
    include_empty: bool = False,
) -> Path:
    """Write ``{"n_latents", "top_k", "tokens_seen", "neurons": export_rows(...)}`` as JSON, atomically.

    Returns:
        The path written.
    """
    data = {
        "n_latents": tracker.n_latents,
        "top_k": tracker.top_k,
        "tokens_seen": tracker.stats().tokens_seen,
        "neurons": export_rows(tracker, dictionary, include_empty),
    }
    target = Path(path)
    _atomic_write_text(target, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return target


def write_top_texts_csv(path: str | os.PathLike[str], tracker: TopTextTracker, dictionary: ConceptDictionary) -> Path:
    """Write one CSV row per (neuron, rank): ``neuron,name,rank,activation,token_position,token,token_id,text``.

    Returns:
        The path written (atomically).
    """
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["neuron", "name", "rank", "activation", "token_position", "token", "token_id", "text"])
    for row in export_rows(tracker, dictionary, include_empty=False):
        for rank, rec in enumerate(row["top_texts"]):
            writer.writerow(
                [row["neuron"], row["name"] or "", rank, repr(rec["activation"]), rec["token_position"],
                 rec["token"], rec["token_id"], rec["text"]]
            )
    target = Path(path)
    _atomic_write_text(target, buf.getvalue())
    return target
