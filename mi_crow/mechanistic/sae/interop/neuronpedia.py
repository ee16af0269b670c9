"""Feature dashboards in the batch JSON layout of Neuronpedia's importer (what SAEDashboard's ``NeuronpediaRunner``
writes and Neuronpedia uploads): ``batch-<i>.json`` files, each ``{"model_id", "layer", "sae_set", "features": [...]}``.

Every feature is a dict with the fields of SAEDashboard's ``NeuronpediaDashboardFeature``:

- ``feature_index``;
- ``activations``: one record per top text, ``{"bin_min", "bin_max", "bin_contains", "tokens", "values"}`` with the
  text's tokens (as the tokenizer spells them) and the feature's activation at every token; the top-activation
  group carries ``bin_min = bin_max = bin_contains = -1``, as SAEDashboard writes it;
- ``pos_str`` / ``pos_values`` and ``neg_str`` / ``neg_values``: the tokens whose unembedding the feature's decoder
  direction raises / lowers most (``W_U @ W_dec[j]``, the direct logit effect without the final norm);
- ``logits_hist_data_bar_heights`` / ``_values``: histogram of that effect over the vocabulary;
- ``frac_nonzero``: the feature's density (tokens it fired on / tokens tracked);
- ``freq_hist_data_bar_heights`` / ``_values``: histogram of its nonzero activations over the tokens of the exported
  texts (the top texts of all exported features; not a uniform sample of the dataset);
- ``n_prompts_total``, ``n_tokens_in_prompt``, ``dataset``; the neuron-alignment and correlation lists are empty.

The input is mi_crow's tracking data (``top_texts.json`` of ``mi-crow concepts`` / ``sae.concepts``), replayed through
the model to recover each top text's per-token activations.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.interop.files import write_json
from mi_crow.validation import check_positive_int

__all__ = ["neuronpedia_features", "write_neuronpedia_batches"]

logger = logging.getLogger(__name__)


def _histogram(values: Tensor, bins: int) -> tuple[list[float], list[float]]:
    """``(heights, bin centres)`` of ``values`` over ``bins`` equal bins between their min and max."""
    if values.numel() == 0:
        return [], []
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return [float(values.numel())], [lo]
    heights = torch.histc(values.to(torch.float64), bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins
    centres = [lo + width * (i + 0.5) for i in range(bins)]
    return [float(h) for h in heights], centres


def _unembedding(lm: Any) -> Tensor:
    get = getattr(lm.model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor):
        raise UserInputError("neuronpedia export: the model has no output embedding (get_output_embeddings) for logits")
    return weight.detach().to("cpu", torch.float32)


@torch.no_grad()
def _per_token_codes(sae: Any, lm: Any, layer: str, texts: Sequence[str], max_length: int,
                     batch_size: int) -> list[tuple[list[int], Tensor, Tensor]]:
    """For each text: its real token ids and the SAE code ``(values [T, k], indices [T, k])`` at ``layer`` (of the
    layer's output; of its first input for a transcoder, which reads the input of the module it hooks)."""
    module = lm.layers.get_module(layer)
    captured: list[Tensor] = []
    reads_input = bool(getattr(sae, "is_transcoder", False))

    def grab(mod: Any, args: Any, output: Any) -> None:
        seen = args[0] if reads_input else output
        captured.append((seen[0] if isinstance(seen, tuple) else seen).detach())

    out: list[tuple[list[int], Tensor, Tensor]] = []
    handle = module.register_forward_hook(grab)
    try:
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start:start + batch_size])
            enc = lm.tokenize(batch, max_length=max_length)
            captured.clear()
            lm.model(input_ids=enc["input_ids"].to(lm.device), attention_mask=enc["attention_mask"].to(lm.device),
                     use_cache=False)
            hidden = captured[0]
            mask = enc["attention_mask"].bool()
            for row in range(len(batch)):
                real = mask[row]
                x = hidden[row][real.to(hidden.device)].to(sae.device, sae.dtype)
                code = sae.encode(x)
                values = sae.inlier_values(x, code.values)
                ids = enc["input_ids"][row][real].tolist()
                out.append((ids, values.float().cpu(), code.indices.cpu()))
    finally:
        handle.remove()
    return out


def neuronpedia_features(
    sae: Any,
    lm: Any,
    top_texts: dict[str, Any],
    *,
    layer: str | None = None,
    features: Sequence[int] | None = None,
    max_length: int = 128,
    n_logits: int = 10,
    bins: int = 40,
    batch_size: int = 8,
    dataset: str = "",
) -> list[dict[str, Any]]:
    """Build Neuronpedia feature dicts from tracking data (see the module docstring for the fields).

    Args:
        sae: the SAE (a `TopKSae`).
        lm: its LanguageModel.
        top_texts: a ``top_texts.json`` document: ``{"tokens_seen", "neurons": [{"neuron", "firing_count",
            "top_texts": [{"text", "activation", ...}]}]}``.
        layer: the layer the SAE reads (default: its ``layer_signature``).
        features: the features to export (default: every feature with top texts).
        max_length: tokens per text when replaying it (use the value the texts were tracked with).
        n_logits: positive and negative logits listed per feature.
        bins: histogram bins.
        batch_size: texts per forward pass.
        dataset: the dataset's name, written as ``dataset``.

    Returns:
        One dict per feature, in ascending feature order.

    Raises:
        UserInputError: a malformed document, a feature index out of range, or no layer.
    """
    check_positive_int(max_length, "max_length")
    check_positive_int(n_logits, "n_logits")
    check_positive_int(bins, "bins")
    neurons = top_texts.get("neurons") if isinstance(top_texts, dict) else None
    tokens_seen = top_texts.get("tokens_seen") if isinstance(top_texts, dict) else None
    if not isinstance(neurons, list) or not isinstance(tokens_seen, int):
        raise UserInputError("top_texts must be a top_texts.json document with 'neurons' (a list) and 'tokens_seen'")
    rows = {int(r["neuron"]): r for r in neurons if isinstance(r, dict) and "neuron" in r}
    chosen = sorted(rows) if features is None else sorted(set(int(f) for f in features))
    bad = [f for f in chosen if not 0 <= f < sae.n_latents]
    if bad:
        raise UserInputError(f"features {bad[:5]} are out of range 0..{sae.n_latents - 1}")
    layer = layer or (str(sae.layer_signature) if sae.layer_signature is not None else None)
    if layer is None:
        raise UserInputError("neuronpedia export: the SAE has no layer; pass layer=")
    texts: list[str] = []
    index: dict[str, int] = {}
    for f in chosen:
        for rec in rows.get(f, {}).get("top_texts", []):
            if rec["text"] not in index:
                index[rec["text"]] = len(texts)
                texts.append(rec["text"])
    codes = _per_token_codes(sae, lm, layer, texts, max_length, batch_size)
    tokenizer = lm.tokenizer
    W_U = _unembedding(lm)
    W_dec = sae.W_dec.detach().to("cpu", torch.float32)
    n_logits = min(n_logits, W_U.shape[0])
    out = []
    for f in chosen:
        row = rows.get(f, {})
        effect = W_U @ W_dec[f]
        pos = effect.topk(n_logits)
        neg = (-effect).topk(n_logits)
        logit_heights, logit_values = _histogram(effect, bins)
        records = []
        for rec in row.get("top_texts", []):
            ids, values, indices = codes[index[rec["text"]]]
            per_token = (values * (indices == f)).sum(-1)
            records.append({"bin_min": -1, "bin_max": -1, "bin_contains": -1,
                            "tokens": tokenizer.convert_ids_to_tokens(ids), "values": per_token.tolist()})
        fired = torch.cat([(v * (i == f)).sum(-1) for _, v, i in codes]) if codes else torch.zeros(0)
        nonzero = fired[fired != 0]
        freq_heights, freq_values = _histogram(nonzero, bins)
        count = row.get("firing_count", 0)
        out.append({
            "feature_index": f,
            "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
            "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
            "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
            "neg_str": tokenizer.convert_ids_to_tokens(neg.indices.tolist()),
            "neg_values": (-neg.values).tolist(),
            "pos_str": tokenizer.convert_ids_to_tokens(pos.indices.tolist()),
            "pos_values": pos.values.tolist(),
            "frac_nonzero": count / tokens_seen if tokens_seen > 0 else 0.0,
            "freq_hist_data_bar_heights": freq_heights,
            "freq_hist_data_bar_values": freq_values,
            "logits_hist_data_bar_heights": logit_heights,
            "logits_hist_data_bar_values": logit_values,
            "n_prompts_total": len(texts),
            "n_tokens_in_prompt": max_length,
            "dataset": dataset,
            "decoder_weights_dist": [],
            "activations": records,
        })
    return out


def write_neuronpedia_batches(
    folder: str | Path,
    features: list[dict[str, Any]],
    *,
    model_id: str,
    layer: int,
    sae_set: str,
    batch_size: int = 128,
) -> list[Path]:
    """Write ``features`` as ``batch-0.json``, ``batch-1.json``, ... (``batch_size`` features each).

    Args:
        folder: destination (created).
        features: what `neuronpedia_features` returned.
        model_id: Neuronpedia's model id (``gpt2-small``, ``gemma-2-2b``...).
        layer: the layer index (Neuronpedia's SAE id is ``<layer>-<sae_set>``).
        sae_set: the SAE set's name.
        batch_size: features per file.

    Returns:
        The files written.
    """
    check_positive_int(batch_size, "batch_size")
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise UserInputError(f"layer must be a non-negative int (Neuronpedia's layer index), got {layer!r}")
    folder = Path(folder)
    paths = []
    for i in range(math.ceil(len(features) / batch_size) if features else 0):
        chunk = features[i * batch_size:(i + 1) * batch_size]
        doc = {"model_id": model_id, "layer": layer, "sae_set": sae_set, "features": chunk}
        paths.append(write_json(folder / f"batch-{i}.json", doc, indent=None))
    logger.info("wrote %d Neuronpedia batch files to %s", len(paths), folder)
    return paths
