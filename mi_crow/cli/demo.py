"""``mi-crow demo``: the whole workflow on the embedded default model and corpus, step by step.

load model and corpus -> save activations -> train a TopK SAE -> top texts per feature -> evaluate (on held-out
texts of the corpus) and write the report -> steer a feature chosen by measured steering success: candidates ranked
by the coherence of the tokens their decoder direction promotes (logit lens) and by how many of their top texts hold
those words, then a strength sweep measured by ``evaluate_steering``.
"""

from __future__ import annotations

import argparse
import random
import time
from types import SimpleNamespace
from pathlib import Path
from typing import Any

from mi_crow.cli.common import (
    PROG,
    cli_info,
    load_dataset,
    load_model,
    open_store,
    parse_layer,
    put_cli_info,
    resolve_layer,
    sae_ids,
    say,
    select_by_tokens,
    step,
)
from mi_crow.cli.concepts import save_top_texts
from mi_crow.cli.report import evaluate_step, print_metrics, report_step
from mi_crow.cli.save import default_run_id, save_step
from mi_crow.cli.steer_eval import DEFAULT_PROMPTS, put_steering
from mi_crow.cli.train import train_step
from mi_crow.mechanistic.sae.concepts import choose_by_sweep, feature_logit_lens, lens_candidates, track_from_run
from mi_crow.mechanistic.sae.concepts.evaluation import DEFAULT_STRENGTHS


class _Timer:
    """Wall time of each step, for the closing line."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self._t0 = self.start

    def begin(self) -> None:
        self._t0 = time.perf_counter()

    def end(self, name: str) -> None:
        self.timings[name] = time.perf_counter() - self._t0

    def summary(self) -> str:
        total = time.perf_counter() - self.start
        return f"done in {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items()) + ")"


def train_or_reuse(store: Any, run_id: str, layer: str, n_latents: int, k: int, sae_id: str | None, *,
                   budget: int, batch: int, lr: float | None, seed: int, model_id: str | None) -> tuple[Any, Any, str]:
    """Train the demo's SAE, or continue an interrupted training of the same configuration.

    The SAE's id names its configuration (budget, batch, seed and learning rate besides the run and sizes), so a
    re-run with other knobs trains a new SAE instead of failing to resume; the same knobs resume an interrupted
    run, or reuse the finished one. A user's ``--sae-id`` that exists with another configuration is retrained from
    scratch (the demo owns its SAEs). Returns ``(sae, result, sae_id)``.
    """
    knobs = {"tokens": budget, "batch": batch, "lr": lr, "seed": seed}
    if sae_id is None:
        lr_part = "" if lr is None else f"-lr{lr:g}"
        sae_id = f"{run_id}-topk{k}-n{n_latents}-t{budget}-b{batch}-s{seed}{lr_part}"
    info = cli_info(store, sae_id)
    recorded = info.get("demo_training")
    exists = sae_id in sae_ids(store)
    if exists and recorded == knobs and info.get("demo_result"):
        # The same configuration trained to the end before: reuse it.
        from mi_crow.mechanistic.sae import TopKSae

        done = info["demo_result"]
        return TopKSae.load(store, sae_id), SimpleNamespace(**done, resumed_from_step=None, reused=True), sae_id
    # Resuming is safe only for the same configuration; anything else starts afresh.
    resume = not exists or recorded == knobs
    sae, result = train_step(store, run_id, layer, n_latents, k, sae_id, tokens=budget, epochs=None,
                             batch_size=batch, lr=lr, seed=seed, model_id=model_id, resume=resume)
    put_cli_info(store, sae_id, demo_training=knobs, demo_result={
        "steps": result.steps, "tokens": result.tokens, "training_run_id": result.training_run_id})
    return sae, result, sae_id


def _held_out(dataset: list[str], chosen: list[str], seed: int, n: int) -> list[str]:
    """``n`` texts of the corpus the demo did not save (the same shuffle as the selection, continued)."""
    order = list(dataset)
    random.Random(seed).shuffle(order)
    used = set(chosen)
    return [t for t in order if t not in used and t.strip()][:n]


FINALE_CANDIDATES = 3
"""Features measured by the finale's sweep (ranked without generating: logit-lens coherence and top texts)."""

FINALE_STRENGTHS = DEFAULT_STRENGTHS
"""The finale's sweep of ``add`` strengths (multiples of each token's residual norm), generated as one batch per
candidate."""


def _finale(lm: Any, sae: Any, layer: str, stats: Any, lens: Any, prompts: list[str], strength: float | None,
            max_new_tokens: int, top_texts: Any = None) -> tuple[Any, Any] | None:
    """Choose the feature to steer by measured steering success; returns ``(candidate, evaluation)``.

    The candidates are ranked without generating (how coherent the tokens their decoder direction promotes are,
    and how many of their top texts hold those words: features that both read and write a word); only the best
    :data:`FINALE_CANDIDATES` are steered, each over all of :data:`FINALE_STRENGTHS` in one batched generation, the
    plain continuations generated once.
    """
    if top_texts is None:
        try:
            top_texts = sae.concepts.get_top_texts()
        except RuntimeError:  # tracking never ran: rank by the logit lens alone
            top_texts = None
    candidates = lens_candidates(lens, stats.frequency, limit=FINALE_CANDIDATES, top_texts=top_texts)
    if not candidates:
        return None
    lm.attach_sae(sae, layer)
    try:
        return choose_by_sweep(lm, sae, candidates, prompts, FINALE_STRENGTHS if strength is None else [strength],
                               max_new_tokens=max_new_tokens, lens=lens)
    finally:
        lm.detach_sae(sae)


def _show_finale(result: Any, reason: str) -> None:
    """Step 6: the chosen feature, the measured success, plain and steered continuations."""
    best, plain = result.best, result.plain
    n = len(result.prompts)

    def count(share: float) -> str:
        return f"{round(share * n)}/{n}"

    say(f"feature {result.neuron}: {reason}")
    say(f"steering: add {best.strength:g} x the residual norm along its decoder direction at every token "
        f"(strength chosen by the sweep {', '.join(f'{p.strength:g}' for p in result.points)})")
    words = ", ".join(repr(w) for w in result.promoted_words[:6])
    say(f"measured: feature active in {count(best.feature_active)} steered continuations "
        f"({count(plain.feature_active)} plain); its promoted words ({words}) in {count(best.promoted_rate)} "
        f"({count(plain.promoted_rate)} plain); clean-model loss {best.loss:.2f} vs {plain.loss:.2f} nat/token "
        f"({best.loss_rise:+.2f}); KL {best.kl:.2f}; targets " + ("met" if best.passes else "NOT met"))
    for prompt, a, b in zip(result.prompts, plain.continuations, best.continuations):
        say(f"prompt:  {prompt!r}\nplain:   {a!r}\nsteered: {b!r}")


def run(args: argparse.Namespace) -> int:
    timer = _Timer()
    # Sized on 2 CPU cores: the default takes about 5 minutes, --quick well under one.
    tokens = args.tokens if args.tokens is not None else (20_000 if args.quick else 150_000)
    max_length = args.max_length or (64 if args.quick else 128)
    eval_texts = 8 if args.quick else 32
    max_new_tokens = args.max_new_tokens or (16 if args.quick else 30)
    store = open_store(args.store)
    out = args.out or str(Path(args.store) / "report.html")

    step(f"1/6 model and corpus ({args.model}, {args.dataset})")
    timer.begin()
    lm = load_model(args.model, store=store)
    layer = resolve_layer(lm, parse_layer(args.layer))
    dataset = load_dataset(args.dataset, args.limit, args.text_field)
    texts = select_by_tokens(lm, list(dataset), tokens, max_length, shuffle=True, seed=args.seed)
    d = lm.layers.width(layer)
    n_latents = args.n_latents or 8 * d
    say(f"model {lm.model_id} ({lm.layers.num_blocks} blocks, width {d}); layer {layer}; "
        f"{len(texts)} of {len(dataset)} texts (~{tokens} tokens, max {max_length} per text)")
    timer.end("load")

    step(f"2/6 save activations of {layer}")
    timer.begin()
    run_id = args.run_id or default_run_id("demo-", layer, f"{len(texts)}x{max_length}")
    run_id = save_step(lm, texts, layer, run_id, batch_size=16, max_length=max_length, dtype=None)
    n_run = int(store.read_run_meta(run_id)["n_tokens"])
    say(f"run {run_id!r}: {n_run} tokens")
    timer.end("save")

    step(f"3/6 train a TopK SAE (n_latents={n_latents}, k={args.k})")
    timer.begin()
    batch = min(1024, max(128, n_run // 20))
    budget = args.train_tokens or n_run * 8
    sae, result, sae_id = train_or_reuse(store, run_id, layer, n_latents, args.k, args.sae_id, budget=budget,
                                         batch=batch, lr=args.lr, seed=args.seed, model_id=lm.model_id)
    reused = " (trained before with the same settings: reused)" if getattr(result, "reused", False) else ""
    say(f"{result.steps} steps of {batch} tokens ({result.tokens} tokens) -> sae_models/{sae_id}{reused}")
    timer.end("train")

    step("4/6 top texts per feature")
    timer.begin()
    seen = track_from_run(lm, sae, run_id, layer, texts, top_k=10, progress=True)
    save_top_texts(sae, store, sae_id, texts, lm.tokenizer)
    say(f"tracked {seen} tokens (stored activations and token ids replayed through sae.concepts)")
    timer.end("concepts")

    step(f"5/6 evaluate on {eval_texts} held-out texts")
    timer.begin()
    held_out = _held_out(list(dataset), texts, args.seed, eval_texts)
    metrics, stats = evaluate_step(lm, sae, store, run_id, layer, held_out, max_length)
    put_cli_info(store, sae_id, eval=metrics)
    print_metrics(metrics)
    timer.end("evaluate")

    step("6/6 steering: choose a feature by measured steering success, write the report")
    timer.begin()
    prompts = args.prompt or DEFAULT_PROMPTS
    # The logit lens of every feature that fired: candidates for steering, and the report's feature pages.
    lens = feature_logit_lens(lm, sae, [i for i, n in enumerate(stats.fire_count.tolist()) if n > 0], top=10)
    timer.end("lens")
    timer.begin()
    finale = _finale(lm, sae, layer, stats, lens, prompts, args.strength, max_new_tokens)
    timer.end("steer")
    timer.begin()
    steering = {}
    if finale is not None:
        (idx, word, reason), evaluation = finale
        sae.concepts.name_concept(idx, f"'{word}' steering", notes=f"chosen for the demo's steering: {reason}")
        sae.concepts.save(store, sae_id)
        put_steering(store, sae_id, evaluation)
        steering = {idx: evaluation.to_dict()}
    report = report_step(out, sae, store, sae_id, stats, metrics, lm.tokenizer,
                         title=f"mi_crow demo: {n_latents}-latent TopK SAE on {layer}",
                         metadata={"model": lm.model_id, "layer": layer, "sae": sae_id, "run": run_id},
                         lens=lens, steering=steering)
    if finale is None:
        say("no feature promotes a coherent set of tokens (train longer, e.g. more --tokens); steering skipped")
    else:
        _show_finale(evaluation, reason)
    timer.end("report")

    step(timer.summary())
    say(f"activations: {store.location(f'activations/{run_id}')}")
    say(f"SAE:         {store.location(f'sae_models/{sae_id}')}")
    say(f"history:     {store.location(f'runs/{result.training_run_id}/training_history.json')}")
    say(f"report:      {Path(report).resolve()}")
    if finale is not None:
        say(f"steering:    feature {idx} ('{word}'), `{PROG} steer-eval --store {args.store} --sae-id {sae_id} "
            f"--feature {idx}` measures it again")
    return 0
