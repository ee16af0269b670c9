"""``mi-crow demo``: the whole workflow on the embedded default model and corpus, step by step.

load model and corpus -> save activations -> train a TopK SAE -> top texts per feature -> evaluate and write the
report -> steer a feature chosen so that its effect is visible in the generated text.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mi_crow.cli.common import (
    load_dataset,
    load_model,
    open_store,
    parse_layer,
    put_cli_info,
    resolve_layer,
    say,
    select_by_tokens,
    step,
)
from mi_crow.cli.concepts import save_top_texts
from mi_crow.cli.report import evaluate_step, print_metrics, report_step
from mi_crow.cli.save import default_run_id, save_step
from mi_crow.cli.train import train_step
from mi_crow.mechanistic.sae.concepts import (
    choose_steering_feature,
    generate_steered,
    steering_candidates,
    track_from_run,
)


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


def _steer(args: argparse.Namespace, lm: Any, sae: Any, layer: str, pick: tuple[int, str, str] | None,
           stats: Any, max_new_tokens: int) -> tuple[int, str] | None:
    """Step 6: generate the prompt plainly and with the chosen feature added; returns ``(index, word)``."""
    if pick is None:
        say("no feature passed the interpretability heuristic (train longer, e.g. more --tokens); skipped")
        return None
    idx, word, reason = pick
    activation = args.steer_scale * float(stats.act_max[idx])
    plain, steered = generate_steered(lm, sae, layer, [args.prompt], idx, activation, max_new_tokens)
    say(f"feature {idx} ({reason})\nadding {activation:.3g} (= {args.steer_scale:g} x its max activation) "
        f"along its decoder direction at every token")
    say(f"prompt:  {args.prompt!r}\nplain:   {plain[0]!r}\nsteered: {steered[0]!r}")
    return idx, word


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
    sae_id = args.sae_id or f"{run_id}-topk{args.k}-n{n_latents}"
    sae, result = train_step(store, run_id, layer, n_latents, args.k, sae_id, tokens=budget, epochs=None,
                             batch_size=batch, lr=args.lr, seed=args.seed, model_id=lm.model_id, resume=True)
    say(f"{result.steps} steps of {batch} tokens ({result.tokens} tokens) -> sae_models/{sae_id}")
    timer.end("train")

    step("4/6 top texts per feature")
    timer.begin()
    seen = track_from_run(lm, sae, run_id, layer, texts, top_k=10, progress=True)
    save_top_texts(sae, store, sae_id)
    say(f"tracked {seen} tokens (stored activations and token ids replayed through sae.concepts)")
    timer.end("concepts")

    step("5/6 evaluate and write the report")
    timer.begin()
    metrics, stats = evaluate_step(lm, sae, store, run_id, layer, texts[:eval_texts], max_length)
    put_cli_info(store, sae_id, eval=metrics)
    print_metrics(metrics)
    candidates = steering_candidates(sae.concepts.get_top_texts(), stats.frequency, lm.tokenizer)
    # Chosen before the report is written so the report names the feature the demo steers.
    pick = choose_steering_feature(lm, sae, layer, candidates, stats.act_max, args.prompt, args.steer_scale,
                                   min(16, max_new_tokens))
    if pick is not None:
        sae.concepts.name_concept(pick[0], f"'{pick[1]}' detector", notes=f"chosen for the demo's steering: {pick[2]}")
        sae.concepts.save(store, sae_id)
    report = report_step(out, sae, store, sae_id, stats, metrics, lm.tokenizer,
                         title=f"mi_crow demo: {n_latents}-latent TopK SAE on {layer}",
                         metadata={"model": lm.model_id, "layer": layer, "sae": sae_id, "run": run_id})
    timer.end("evaluate+report")

    step("6/6 steering")
    timer.begin()
    steering = _steer(args, lm, sae, layer, pick, stats, max_new_tokens)
    timer.end("steer")

    step(timer.summary())
    say(f"activations: {store.location(f'activations/{run_id}')}")
    say(f"SAE:         {store.location(f'sae_models/{sae_id}')}")
    say(f"history:     {store.location(f'runs/{result.training_run_id}/training_history.json')}")
    say(f"report:      {Path(report).resolve()}")
    if steering is not None:
        say(f"steering:    feature {steering[0]} ('{steering[1]}')")
    return 0
