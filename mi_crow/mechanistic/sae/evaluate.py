"""`evaluate`: how well an SAE reconstructs a layer and how much of the model's behaviour survives splicing it in.

The metrics are SAEBench's ``core`` set, computed by `mi_crow.mechanistic.sae.metrics` (see its docstring for every
definition) and named as SAEBench names them; `to_saebench_core` and `save_saebench_core` write them in SAEBench's
``core`` JSON layout. Evaluate on texts the SAE was not trained on: numbers on training texts flatter it.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae import metrics as M
from mi_crow.mechanistic.sae.outliers import attention_sink_mask
from mi_crow.mechanistic.sae.base import SaeBase
from mi_crow.mechanistic.sae.sae import TopKSae
from mi_crow.validation import check_bool, check_positive_int, check_real, fail, fail_type

if TYPE_CHECKING:
    from mi_crow.language_model import LanguageModel

__all__ = ["EvaluationResult", "evaluate", "held_out_texts", "save_saebench_core", "to_saebench_core"]

logger = logging.getLogger(__name__)


class EvaluationResult(dict):
    """The scalar metrics of `evaluate` (a ``dict[str, float]``) with the per-latent results as attributes.

    Attributes:
        feature_density: ``[n_latents]`` float64, fraction of evaluated tokens on which each latent was active.
        consistent_activation_heuristic: ``[n_latents]`` float64, mean number of active tokens per text among the
            texts where the latent fired at all (-1 for latents that never fired), as in SAEBench.
        density_histogram: `metrics.density_histogram` of ``feature_density``.
        max_decoder_cosine_sim / max_encoder_cosine_sim: ``[n_latents]`` float32, or None when weight metrics were
            not asked for.
        encoder_norm, encoder_bias, encoder_decoder_cosine_sim: ``[n_latents]`` float32 per-latent weight facts.
        eval_config: how the evaluation was run (layer, batch size, maximum length, outlier factor, text count).
        sae_config: the evaluated SAE's ``config_dict()``.
    """

    feature_density: Tensor
    consistent_activation_heuristic: Tensor
    density_histogram: dict[str, Any]
    max_decoder_cosine_sim: Tensor | None
    max_encoder_cosine_sim: Tensor | None
    encoder_norm: Tensor
    encoder_bias: Tensor
    encoder_decoder_cosine_sim: Tensor
    eval_config: dict[str, Any]
    sae_config: dict[str, Any]


def _text_batches(dataset_or_texts: Any, batch_size: int) -> Iterator[list[str]]:
    if hasattr(dataset_or_texts, "iter_batches"):
        yield from (list(batch) for batch in dataset_or_texts.iter_batches(batch_size))
        return
    if isinstance(dataset_or_texts, str) or not isinstance(dataset_or_texts, Sequence):
        raise fail_type(
            "dataset_or_texts", "a list of str or a mi_crow dataset (with iter_batches)", dataset_or_texts
        )
    for i, text in enumerate(dataset_or_texts):
        if not isinstance(text, str):
            raise fail_type(f"dataset_or_texts item {i}", "a str", text)
    for start in range(0, len(dataset_or_texts), batch_size):
        yield list(dataset_or_texts[start : start + batch_size])


def held_out_texts(candidates: Iterable[str], seen: Iterable[str], limit: int | None = None) -> list[str]:
    """The texts of ``candidates`` that are not in ``seen`` (exact match), each once, in order, at most ``limit``.

    This is how the CLI picks evaluation texts: the evaluation dataset's texts minus those the SAE's activations were
    saved from, so that no number is measured on training texts.

    Args:
        candidates: evaluation texts (a list or a mi_crow dataset: anything iterable over str).
        seen: the training texts.
        limit: keep at most this many (None: all).

    Raises:
        UserInputError / ArgumentTypeError: ``limit`` is not a positive int or None, or a candidate is not a str.
    """
    check_positive_int(limit, "limit", allow_none=True)
    exclude = set(seen)
    out: list[str] = []
    for i, text in enumerate(candidates):
        if limit is not None and len(out) >= limit:
            break
        if not isinstance(text, str):
            raise fail_type(f"candidates item {i}", "a str", text)
        if text not in exclude:
            exclude.add(text)
            out.append(text)
    return out


def _hidden(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _prediction_mask(attention_mask: Tensor) -> Tensor:
    """``[batch, seq - 1]`` bool: next-token predictions whose input and target are both real tokens."""
    return (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)


def _lm_loss_sums(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over positions whose input and target are both real tokens."""
    mask = _prediction_mask(attention_mask)
    targets = input_ids[:, 1:].to(logits.device)
    pred = logits[:, :-1].float()
    losses = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1), reduction="none")
    mask = mask.to(losses.device).reshape(-1)
    return float(losses[mask].double().sum()), int(mask.sum())


def _check_factor(value: Any, sae: TopKSae) -> float | None:
    if isinstance(value, str):
        if value != "sae":
            raise fail("outlier_norm_factor", "'sae', None or a number > 1", value)
        return sae.outlier_norm_factor
    return check_real(value, "outlier_norm_factor", minimum=1.0, min_inclusive=False, allow_none=True)


@torch.no_grad()
def evaluate(
    sae: TopKSae,
    lm: LanguageModel,
    dataset_or_texts: Any,
    layer: str | int | None = None,
    *,
    batch_size: int = 8,
    max_length: int | None = 128,
    progress: bool = False,
    outlier_norm_factor: float | None | str = "sae",
    weight_metrics: bool = True,
) -> EvaluationResult:
    """Evaluate an SAE on a layer of a language model over a set of (held-out) texts.

    Three forward passes per batch, all without the model's registered controllers (so an attached, steered SAE
    or other controllers do not disturb the measurement): clean; with the layer's output replaced by the SAE's
    reconstruction (the plain SAE, no concept manipulation); and with the layer's output zeroed. Padding is masked
    everywhere: reconstruction statistics count real tokens only; the LM loss counts next-token predictions whose
    input and target are both real tokens; the KL divergence counts every real position. Means are over all tokens
    (or predictions) of the dataset, whatever the batching. Attention sinks (`attention_sink_mask`, with the real
    tokens of each batch as the reference set) are left unchanged in the spliced and the zero-ablated passes and out
    of the reconstruction statistics, as in training.

    Args:
        sae: the SAE (moved to the layer's device for the call).
        lm: the LanguageModel.
        dataset_or_texts: a list of str or a mi_crow dataset (anything with ``iter_batches(batch_size)``).
        layer: layer name or block index; defaults to the layer recorded in ``sae.metadata`` (set by training).
        batch_size: texts per forward pass.
        max_length: truncate texts to this many tokens (None = the model's maximum).
        progress: show a progress bar.
        outlier_norm_factor: the sink factor: ``"sae"`` uses the SAE's own ``outlier_norm_factor``; None acts on
            every real token.
        weight_metrics: also compute each latent's maximum decoder and encoder cosine similarity with any other
            latent (``n_latents^2 * d`` multiply-adds, in chunks).

    Returns:
        An `EvaluationResult`: a dict of floats with SAEBench's names ``explained_variance``, ``mse``, ``cossim``,
        ``l2_norm_in``, ``l2_norm_out``, ``l2_ratio``, ``relative_reconstruction_bias``, ``l0``, ``l1``,
        ``frac_alive``, ``freq_over_1_percent``, ``freq_over_10_percent``, ``normalized_freq_over_1_percent``,
        ``normalized_freq_over_10_percent``, ``ce_loss_score``, ``ce_loss_with_ablation``, ``ce_loss_with_sae``,
        ``ce_loss_without_sae``, ``kl_div_score``, ``kl_div_with_ablation``, ``kl_div_with_sae``,
        ``total_tokens_eval_reconstruction``, ``total_tokens_eval_sparsity_variance`` and (with ``weight_metrics``)
        ``average_max_decoder_cosine_sim``, ``average_max_encoder_cosine_sim``; and mi_crow's ``fvu``,
        ``dead_latents``, ``dense_latents`` (counts), ``dead_fraction`` (latents never active on the evaluation
        set), ``loss_clean``, ``loss_sae``, ``loss_zero`` (the three mean cross-entropies again), ``loss_recovered``
        (= ``ce_loss_score``), ``delta_loss`` = ``loss_sae - loss_clean``, ``n_tokens`` (real tokens the SAE acted
        on), ``n_outlier_tokens`` and ``n_predictions``. Per-latent results are attributes of the result.

    Raises:
        UserInputError / ArgumentTypeError: bad arguments, no layer known, an SAE width different from the layer's
            (both numbers named), an evaluation set without a real token or without a next-token prediction.
    """
    # Any autoencoder of the family (TopK, BatchTopK, Matryoshka, JumpReLU); a transcoder predicts another layer.
    if not isinstance(sae, SaeBase) or sae.is_transcoder:
        raise fail_type("sae", "a TopKSae (or another autoencoder of the family, not a transcoder)", sae)
    check_positive_int(batch_size, "batch_size")
    check_positive_int(max_length, "max_length", allow_none=True)
    check_bool(progress, "progress")
    check_bool(weight_metrics, "weight_metrics")
    if not (hasattr(lm, "layers") and hasattr(lm, "inference") and hasattr(lm, "tokenize")):
        raise fail_type("lm", "a mi_crow LanguageModel", lm)
    if layer is None:
        layer = sae.metadata.get("layer")
        if layer is None:
            raise fail("layer", "given: the SAE records no layer; pass layer=", None)
    name = lm.layers.resolve(layer)
    width = lm.layers.width(name)
    if width != sae.n_inputs:
        raise UserInputError(
            f"sae.n_inputs={sae.n_inputs} does not match the width of layer {name!r}, {width}: evaluate an SAE on "
            f"the layer it was trained on"
        )
    factor = _check_factor(outlier_norm_factor, sae)
    module = lm.layers.get_module(name)
    sae.to(lm.layers.layer_device(name))

    stats = M.ReconstructionStats(sae.n_inputs, n_latents=sae.n_latents)
    prompts_fired = torch.zeros(sae.n_latents, dtype=torch.int64)
    n_real = 0
    batch: dict[str, Tensor] = {}

    def acted_on(hidden: Tensor) -> Tensor:
        """[batch, seq] bool: real tokens that are not attention sinks of the batch."""
        real = batch["mask"].to(hidden.device) != 0
        return real & ~attention_sink_mask(hidden, real, factor=factor)

    def splice(module_: Any, args: Any, output: Any) -> Any:
        hidden = _hidden(output)
        out = sae(hidden)
        acted = acted_on(hidden)
        recon = torch.where(acted.unsqueeze(-1), out.reconstruction.to(hidden.dtype), hidden)
        values, indices = out.code.values[acted], out.code.indices[acted]
        stats.update(hidden[acted], recon[acted], values, indices)
        # Texts in which each latent fired at least once (for SAEBench's consistent_activation_heuristic).
        rows = acted.nonzero()[:, 0].to(indices.device)
        active = values > 0
        per_text = torch.zeros(hidden.shape[0], sae.n_latents, dtype=torch.int32, device=indices.device)
        per_text.index_put_(
            (rows.unsqueeze(1).expand_as(indices)[active], indices[active]),
            torch.ones((), dtype=torch.int32, device=indices.device),
            accumulate=True,
        )
        prompts_fired.add_((per_text > 0).sum(dim=0).cpu())
        return _with_hidden(output, recon)

    def zero(module_: Any, args: Any, output: Any) -> Any:
        hidden = _hidden(output)
        return _with_hidden(output, torch.where(acted_on(hidden).unsqueeze(-1), torch.zeros_like(hidden), hidden))

    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl = {"sae": 0.0, "zero": 0.0}
    n_pred = 0
    n_texts = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"evaluate SAE on {name}", unit="text")
    for texts in _text_batches(dataset_or_texts, batch_size):
        if not texts:
            continue
        encodings = lm.tokenize(texts, max_length=max_length, padding_side="right")
        mask = encodings["attention_mask"]
        if int((mask != 0).sum()) == 0:
            continue  # only empty texts: nothing to measure, and some models reject an all-padding batch
        batch["mask"] = mask
        n_real += int((mask != 0).sum())
        n_texts += len(texts)
        clean_logits: Tensor | None = None
        passes: tuple[tuple[str, Callable[..., Any] | None], ...] = (("clean", None), ("sae", splice), ("zero", zero))
        for label, hook in passes:
            handle = module.register_forward_hook(hook) if hook is not None else None
            try:
                outputs = lm.inference.forward_encoded(texts, encodings, with_controllers=False)
            finally:
                if handle is not None:
                    handle.remove()
            total, count = _lm_loss_sums(outputs.logits, encodings["input_ids"], mask)
            ce[label] += total
            # KL over every real position (the last token's next-token distribution counts too).
            real_logits = outputs.logits[mask.to(outputs.logits.device) != 0]
            if label == "clean":
                n_pred += count
                clean_logits = real_logits
            else:
                assert clean_logits is not None
                kl[label] += float(M.kl_divergence(clean_logits, real_logits).double().sum())
        if bar is not None:
            bar.update(len(texts))
    if bar is not None:
        bar.close()
    if n_real == 0:
        raise fail("dataset_or_texts", "texts with at least one real (non-padding) token", "no tokens")
    if stats.n_tokens == 0:
        raise UserInputError(
            f"dataset_or_texts: all {n_real} real tokens are attention sinks (outlier_norm_factor={factor}); "
            f"nothing is left to evaluate the SAE on"
        )
    if n_pred == 0:
        raise fail(
            "dataset_or_texts", "texts with a next-token prediction (at least two tokens)", "single-token texts only"
        )

    result = EvaluationResult(stats.compute())
    density = stats.feature_density()
    loss_clean, loss_sae, loss_zero = (ce[key] / n_pred for key in ("clean", "sae", "zero"))
    kl_sae, kl_zero = kl["sae"] / n_real, kl["zero"] / n_real
    if abs(loss_zero - loss_clean) <= 1e-12:
        logger.warning("evaluate: zero-ablating %s does not change the loss; ce_loss_score is undefined", name)
    result.update(
        {
            "ce_loss_score": M.ce_loss_score(loss_clean, loss_sae, loss_zero),
            "ce_loss_with_ablation": loss_zero,
            "ce_loss_with_sae": loss_sae,
            "ce_loss_without_sae": loss_clean,
            "kl_div_score": M.kl_div_score(kl_sae, kl_zero),
            "kl_div_with_ablation": kl_zero,
            "kl_div_with_sae": kl_sae,
            "total_tokens_eval_reconstruction": float(n_real),
            "total_tokens_eval_sparsity_variance": float(stats.n_tokens),
            "dead_fraction": 1.0 - result["frac_alive"],
            "loss_clean": loss_clean,
            "loss_sae": loss_sae,
            "loss_zero": loss_zero,
            "loss_recovered": M.ce_loss_score(loss_clean, loss_sae, loss_zero),
            "delta_loss": loss_sae - loss_clean,
            "n_tokens": float(stats.n_tokens),
            "n_outlier_tokens": float(n_real - stats.n_tokens),
            "n_predictions": float(n_pred),
        }
    )
    assert stats.fire_counts is not None
    fired = stats.fire_counts.double()
    result.feature_density = density
    result.consistent_activation_heuristic = torch.where(
        prompts_fired > 0, fired / prompts_fired.clamp_min(1).double(), torch.full_like(fired, -1.0)
    )
    result.density_histogram = M.density_histogram(density)
    w_enc, w_dec = sae.W_enc.detach().float(), sae.W_dec.detach().float()
    result.encoder_norm = w_enc.norm(dim=1).cpu()
    result.encoder_bias = sae.b_enc.detach().float().cpu()
    result.encoder_decoder_cosine_sim = F.cosine_similarity(w_enc, w_dec, dim=1).cpu()
    result.max_decoder_cosine_sim = result.max_encoder_cosine_sim = None
    if weight_metrics:
        result.max_decoder_cosine_sim = M.max_cosine_similarity(w_dec).cpu()
        result.max_encoder_cosine_sim = M.max_cosine_similarity(w_enc).cpu()
        result["average_max_decoder_cosine_sim"] = float(result.max_decoder_cosine_sim.double().mean())
        result["average_max_encoder_cosine_sim"] = float(result.max_encoder_cosine_sim.double().mean())
    result.eval_config = {
        "model_name": getattr(lm, "model_id", None) or sae.metadata.get("model_id"),
        "layer": name,
        "batch_size_prompts": batch_size,
        "context_size": max_length,
        "n_texts": n_texts,
        "outlier_norm_factor": factor,
    }
    result.sae_config = sae.config_dict()
    return result


# -- SAEBench's core layout -------------------------------------------------------------------------------------------
_CORE_CATEGORIES: dict[str, tuple[str, ...]] = {
    "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
    "model_performance_preservation": (
        "ce_loss_score",
        "ce_loss_with_ablation",
        "ce_loss_with_sae",
        "ce_loss_without_sae",
    ),
    "reconstruction_quality": ("explained_variance", "mse", "cossim"),
    "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
    "sparsity": ("l0", "l1"),
    "token_stats": ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"),
    "misc_metrics": (
        "freq_over_1_percent",
        "freq_over_10_percent",
        "normalized_freq_over_1_percent",
        "normalized_freq_over_10_percent",
        "average_max_encoder_cosine_sim",
        "average_max_decoder_cosine_sim",
        "frac_alive",
    ),
}
_INT_METRICS = ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance")


def _json_number(value: float) -> float | None:
    # JSON has no NaN; SAEBench writes -1 for metrics it could not compute, we write null.
    return None if value is None or not math.isfinite(value) else value


def to_saebench_core(result: EvaluationResult, *, details: bool = True) -> dict[str, Any]:
    """The result in SAEBench's ``core`` eval output layout (``eval_type_id = "core"``).

    The categories and metric names are SAEBench's; non-finite values become null. ``eval_result_details`` lists,
    per latent, ``index``, ``feature_density``, ``consistent_activation_heuristic``, ``encoder_bias``,
    ``encoder_norm``, ``encoder_decoder_cosine_sim`` and (when computed) ``max_decoder_cosine_sim`` and
    ``max_encoder_cosine_sim``. mi_crow's own numbers (FVU, dead and dense counts, the density histogram, outlier
    counts) go into ``eval_result_unstructured``.

    Args:
        result: what `evaluate` returned.
        details: include the per-latent list (one entry per latent: large for wide SAEs).

    Returns:
        A JSON-serialisable dict.
    """
    if not isinstance(result, EvaluationResult):
        raise fail_type("result", "an EvaluationResult (what evaluate() returns)", result)
    metrics: dict[str, dict[str, Any]] = {}
    for category, keys in _CORE_CATEGORIES.items():
        present = {k: result[k] for k in keys if k in result}
        if present:
            metrics[category] = {
                k: int(v) if k in _INT_METRICS else _json_number(float(v)) for k, v in present.items()
            }
    rows: list[dict[str, Any]] = []
    if details:
        columns: dict[str, Tensor | None] = {
            "feature_density": result.feature_density,
            "consistent_activation_heuristic": result.consistent_activation_heuristic,
            "encoder_bias": result.encoder_bias,
            "encoder_norm": result.encoder_norm,
            "encoder_decoder_cosine_sim": result.encoder_decoder_cosine_sim,
            "max_decoder_cosine_sim": result.max_decoder_cosine_sim,
            "max_encoder_cosine_sim": result.max_encoder_cosine_sim,
        }
        lists = {k: v.double().tolist() for k, v in columns.items() if v is not None}
        n = len(lists["feature_density"])
        rows = [{"index": i, **{k: _json_number(round(v[i], 6)) for k, v in lists.items()}} for i in range(n)]
    config = result.eval_config
    from mi_crow import __version__

    return {
        "eval_type_id": "core",
        "eval_config": {
            "model_name": config.get("model_name"),
            "batch_size_prompts": config.get("batch_size_prompts"),
            "context_size": config.get("context_size"),
            "dataset": None,
            "compute_kl": True,
            "compute_ce_loss": True,
            "compute_l2_norms": True,
            "compute_sparsity_metrics": True,
            "compute_variance_metrics": True,
            "compute_featurewise_density_statistics": True,
            "compute_featurewise_weight_based_metrics": result.max_decoder_cosine_sim is not None,
            "exclude_special_tokens_from_reconstruction": config.get("outlier_norm_factor") is not None,
            "layer": config.get("layer"),
            "outlier_norm_factor": config.get("outlier_norm_factor"),
        },
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": rows,
        "sae_bench_commit_hash": None,
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": result.sae_config,
        "eval_result_unstructured": {
            "producer": f"mi_crow {__version__}",
            "fvu": _json_number(result["fvu"]),
            "dead_latents": int(result["dead_latents"]),
            "dense_latents": int(result["dense_latents"]),
            "n_outlier_tokens": int(result["n_outlier_tokens"]),
            "n_predictions": int(result["n_predictions"]),
            "density_histogram": result.density_histogram,
        },
    }


def save_saebench_core(result: EvaluationResult, path: str | Path, *, details: bool = True) -> Path:
    """Write `to_saebench_core` of ``result`` as JSON to ``path`` (parent folders are created).

    Returns:
        The path written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(to_saebench_core(result, details=details), indent=2))
    return target
