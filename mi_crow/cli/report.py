"""``mi-crow report``: evaluate an SAE on held-out texts (reconstruction and LM-loss figures), gather statistics over
a stored run for the feature list, and write the HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mi_crow.cli.common import (
    TOP_TEXTS_FILE,
    check_fits,
    check_run,
    cli_info,
    load_dataset,
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
                  eval_texts: list[str], max_length: int, max_tokens: int | None = None) -> tuple[dict, FeatureStats]:
    """The evaluation figures of the report and the feature statistics of its feature list.

    With ``lm`` and ``eval_texts`` (held-out texts: pick them with `pick_eval_texts`), FVU, MSE, L0, explained
    variance, the LM loss clean / with the SAE spliced in / with the layer zeroed, the loss recovered and the KL score
    come from :func:`mi_crow.mechanistic.sae.evaluate.evaluate` on those texts, and ``n_tokens`` counts their tokens;
    the same reconstruction figures over the stored run (training activations, :mod:`mi_crow.report.stats`) are
    kept as ``train_fvu``, ``train_mse``, ``train_l0`` and ``train_n_tokens``. ``dead_fraction`` is always the
    stored run's (a few held-out texts are too few tokens to call a latent dead). Without ``lm`` or texts, only the
    stored run's figures exist and are reported under the plain names."""
    from mi_crow.report import feature_stats_from_store

    stats = feature_stats_from_store(sae, store, run_id, layer, max_tokens=max_tokens)
    on_run: dict[str, Any] = {"fvu": stats.fvu, "mse": stats.mse, "l0": stats.l0,
                              "dead_fraction": stats.dead_fraction, "n_tokens": stats.n_tokens}
    if lm is None or not eval_texts:
        return on_run, stats
    from mi_crow.mechanistic.sae.evaluate import evaluate

    # Full forward passes (clean, spliced, zeroed): run them on a few texts only.
    held_out = evaluate(sae, lm, eval_texts, layer, batch_size=8, max_length=max_length, progress=True,
                        weight_metrics=False)
    metrics: dict[str, Any] = {key: held_out[key] for key in (
        "fvu", "mse", "l0", "explained_variance", "loss_clean", "loss_sae", "loss_zero", "loss_recovered",
        "delta_loss", "kl_div_score") if key in held_out}
    metrics["dead_fraction"] = on_run["dead_fraction"]
    metrics["n_tokens"] = int(held_out["n_tokens"])
    metrics["eval_texts"] = len(eval_texts)
    metrics.update({f"train_{key}": on_run[key] for key in ("fvu", "mse", "l0", "n_tokens")})
    metrics["held_out"] = True
    return metrics, stats


def pick_eval_texts(store: Any, runs: list[str], spec: str, count: int, text_field: str = "text") -> list[str]:
    """``count`` texts of the dataset ``spec`` (as ``--dataset`` takes it) that are not among the texts of the
    activation runs ``runs`` (the SAE's training texts).

    Raises:
        UserInputError: the dataset has no text outside the runs' texts.
    """
    from mi_crow.mechanistic.sae.evaluate import held_out_texts

    seen: list[str] = []
    for run_id in dict.fromkeys(r for r in runs if r):
        texts = run_texts(store, run_id)
        if texts is None:
            say(f"  note: run {run_id!r} has no saved texts, so the evaluation texts cannot be checked to be held out")
        else:
            seen.extend(texts)
    texts = held_out_texts(load_dataset(spec, None, text_field), seen, count)
    if not texts:
        raise UserInputError(f"--eval-dataset {spec!r} has no text outside the SAE's training texts; pass a dataset "
                             f"of held-out texts")
    return texts


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
    names = [("fvu", fvu_label), ("train_fvu", "train FVU"), ("l0", "L0"), ("dead_fraction", "dead fraction"), ("loss_recovered", "loss recovered"),
             ("loss_clean", "LM loss clean"), ("loss_sae", "LM loss with SAE"), ("loss_zero", "LM loss layer zeroed"),
             ("n_tokens", "held-out tokens" if metrics.get("held_out") else "tokens"),
             ("train_n_tokens", "training tokens")]

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
    eval_texts: list[str] = []
    if lm is not None:
        eval_texts = pick_eval_texts(store, [info.get("activation_run"), run_id], args.eval_dataset, args.eval_texts,
                                     args.text_field)
        say(f"evaluating on {len(eval_texts)} held-out texts of --eval-dataset {args.eval_dataset!r}")
    metrics, stats = evaluate_step(lm, sae, store, run_id, layer, eval_texts, args.max_length, args.max_tokens)
    put_cli_info(store, args.sae_id, eval=metrics)
    tokenizer = lm.tokenizer if lm is not None else (load_tokenizer(model) if model else None)
    lens = None
    if lm is not None:
        from mi_crow.mechanistic.sae.concepts import feature_logit_lens

        lens = feature_logit_lens(lm, sae, [i for i, n in enumerate(stats.fire_count.tolist()) if n > 0], top=10)
    out = report_step(args.out, sae, store, args.sae_id, stats, metrics, tokenizer,
                      title=f"mi_crow feature report: {args.sae_id}",
                      metadata={"model": model, "layer": layer, "sae": args.sae_id, "run": run_id,
                                "evaluation texts": f"{len(eval_texts)} held-out texts of {args.eval_dataset!r}"
                                if eval_texts else "none (statistics over the stored run only)"}, lens=lens)
    print_metrics(metrics)
    say(f"report: {out.resolve()}")
    return 0
