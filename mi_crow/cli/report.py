"""``mi-crow report``: evaluate an SAE (statistics over a stored run, LM loss recovered) and write the HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mi_crow.cli.common import (
    TOP_TEXTS_FILE,
    check_fits,
    check_run,
    cli_info,
    load_model,
    load_sae,
    load_tokenizer,
    model_of_sae,
    open_store,
    put_cli_info,
    run_layer,
    run_texts,
    sae_ids,
    say,
)
from mi_crow.errors import UserInputError

if TYPE_CHECKING:  # pragma: no cover
    from mi_crow.language_model import LanguageModel
    from mi_crow.mechanistic.sae import TopKSae
    from mi_crow.report import FeatureStats


def evaluate_step(lm: LanguageModel | None, sae: TopKSae, store: Any, run_id: str, layer: str,
                  eval_texts: list[str], max_length: int, max_tokens: int | None = None,
                  held_out: bool = False) -> tuple[dict, FeatureStats]:
    """FVU, MSE, L0 and dead fraction over the stored run (:mod:`mi_crow.report.stats`), plus the LM loss clean /
    with the SAE spliced in / with the layer zeroed and the loss recovered on ``eval_texts`` (needs ``lm``; from
    :func:`mi_crow.mechanistic.sae.evaluate.evaluate`).

    With ``held_out`` (``eval_texts`` are texts the SAE was not trained on) the headline FVU, MSE and L0 are those
    of the held-out texts too (``eval_tokens`` of them); the training run's FVU stays as ``fvu_train``, and the
    dead fraction is the run's (a few held-out texts are too few tokens to call a latent dead). The per-feature
    statistics (for the report's pages) always come from the stored run.
    """
    from mi_crow.report import feature_stats_from_store

    stats = feature_stats_from_store(sae, store, run_id, layer, max_tokens=max_tokens)
    metrics: dict[str, Any] = {"fvu": stats.fvu, "mse": stats.mse, "l0": stats.l0,
                               "dead_fraction": stats.dead_fraction, "n_tokens": stats.n_tokens}
    if lm is not None and eval_texts:
        from mi_crow.mechanistic.sae.evaluate import evaluate

        # The LM-loss part needs full forward passes: run it on a few texts only.
        lm_metrics = evaluate(sae, lm, eval_texts, layer, batch_size=8, max_length=max_length, progress=True,
                              weight_metrics=False)
        for key in ("loss_clean", "loss_sae", "loss_zero", "loss_recovered", "delta_loss"):
            if key in lm_metrics:
                metrics[key] = lm_metrics[key]
        metrics["eval_texts"] = len(eval_texts)
        if held_out:
            metrics["fvu_train"] = stats.fvu
            for key in ("fvu", "mse", "l0"):
                if key in lm_metrics:
                    metrics[key] = lm_metrics[key]
            # Dead latents need many tokens to say anything: that one stays the stored run's.
            metrics["eval_tokens"] = lm_metrics.get("n_tokens")
            metrics["held_out"] = True
    return metrics, stats


def report_step(out: str, sae: TopKSae, store: Any, sae_id: str, stats: FeatureStats, metrics: dict,
                tokenizer: Any, title: str, metadata: dict[str, Any], lens: Any = None,
                steering: dict[int, Any] | None = None) -> Path:
    """Write the HTML report from what the store holds about ``sae_id`` (top texts, history, steering
    measurements in ``steering.json``), with the logit lens of the features when given."""
    from mi_crow.report import write_feature_report

    info = cli_info(store, sae_id)
    history = None
    training_run = info.get("training_run") or sae.metadata.get("training_run_id")
    if training_run and store.exists(f"runs/{training_run}/training_history.json"):
        history = store.get_json(f"runs/{training_run}/training_history.json")
    key = f"sae_models/{sae_id}/{TOP_TEXTS_FILE}"
    top = store.get_json(key) if store.exists(key) else None
    quantile_key = f"sae_models/{sae_id}/quantile_examples.json"
    quantile = store.get_json(quantile_key) if store.exists(quantile_key) else None
    measured = dict(steering or {})
    steering_key = f"sae_models/{sae_id}/steering.json"
    if store.exists(steering_key):
        for neuron, result in store.get_json(steering_key).items():
            measured.setdefault(int(neuron), result)
    concepts = list(sae.concepts.dictionary) if getattr(sae, "concepts", None) is not None else None
    return write_feature_report(out, sae, top_texts=top, history=history, eval_metrics=metrics,
                                feature_stats=stats, concepts=concepts, tokenizer=tokenizer, title=title,
                                metadata=metadata, logit_lens=lens, steering=measured or None, quantile_examples=quantile,
                                frontier=frontier_points(store),
                                initial_feature=next(iter(measured), None))


def frontier_points(store: Any) -> list[dict[str, Any]]:
    """L0 and FVU of every SAE in the store with an evaluation (``cli.json``) and of every grid frontier file
    (``sae_models/<grid>.frontier.json``): the report draws the L0-FVU frontier when there are two or more."""
    points: dict[str, dict[str, Any]] = {}
    for sid in sae_ids(store):
        info = cli_info(store, sid)
        ev = info.get("eval") or {}
        if isinstance(ev.get("l0"), (int, float)) and isinstance(ev.get("fvu"), (int, float)):
            points[sid] = {"sae_id": sid, "l0": ev["l0"], "fvu": ev["fvu"], "k": info.get("k"),
                           "n_latents": info.get("n_latents"), "layer": info.get("layer")}
    for key in store.list("sae_models"):
        if key.endswith(".frontier.json"):
            try:
                for p in store.get_json(key).get("points", []):
                    if isinstance(p, dict) and p.get("sae_id") not in points:
                        points[str(p.get("sae_id", len(points)))] = p
            except (ValueError, AttributeError):
                continue
    return list(points.values())


def print_metrics(metrics: dict[str, Any]) -> None:
    """One line with the evaluation figures that are present."""
    fvu_label = "held-out FVU" if metrics.get("held_out") else "FVU"
    names = [("fvu", fvu_label), ("fvu_train", "train FVU"), ("l0", "L0"), ("dead_fraction", "dead fraction"), ("loss_recovered", "loss recovered"),
             ("loss_clean", "LM loss clean"), ("loss_sae", "LM loss with SAE"), ("loss_zero", "LM loss layer zeroed"),
             ("n_tokens", "tokens"), ("eval_tokens", "held-out tokens")]

    def fmt(value: float) -> str:
        return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"

    say("  " + " | ".join(f"{label} {fmt(metrics[key])}" for key, label in names
                          if isinstance(metrics.get(key), (int, float))))


def run(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    sae = load_sae(store, args.sae_id)
    info = cli_info(store, args.sae_id)
    run_id = check_run(store, args.run_id or info.get("activation_run"))
    layer = run_layer(store, run_id, args.layer or info.get("layer") or sae.metadata.get("layer"))
    d = int(store.read_run_meta(run_id)["layer_dims"][layer])
    if d != sae.n_inputs:
        raise UserInputError(
            f"the SAE has n_inputs={sae.n_inputs} but layer {layer!r} of run {run_id!r} has width {d}"
        )
    model = model_of_sae(args.model, info)
    lm = None
    if model and args.eval_texts > 0:
        lm = load_model(model, store=store)
        check_fits(lm, sae, layer)
    texts = run_texts(store, run_id) or []
    metrics, stats = evaluate_step(lm, sae, store, run_id, layer, texts[: args.eval_texts], args.max_length,
                                   args.max_tokens)
    put_cli_info(store, args.sae_id, eval=metrics)
    tokenizer = lm.tokenizer if lm is not None else (load_tokenizer(model) if model else None)
    lens = None
    if lm is not None:
        from mi_crow.mechanistic.sae.concepts import feature_logit_lens

        lens = feature_logit_lens(lm, sae, [i for i, n in enumerate(stats.fire_count.tolist()) if n > 0], top=10)
    out = report_step(args.out, sae, store, args.sae_id, stats, metrics, tokenizer,
                      title=f"mi_crow feature report: {args.sae_id}",
                      metadata={"model": model, "layer": layer, "sae": args.sae_id, "run": run_id}, lens=lens)
    print_metrics(metrics)
    say(f"report: {out.resolve()}")
    return 0
