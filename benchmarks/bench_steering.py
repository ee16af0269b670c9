"""The demo's steering finale, measured on a demo store: which feature it chooses, how well steering it works, what
the choice costs.

Needs a store written by ``mi-crow demo`` (activations, a trained SAE, its top texts). Runs the finale exactly as
the demo does (``mi_crow.cli.demo._finale``: candidates ranked by the logit lens and top texts, the sweep of
``FINALE_STRENGTHS``, stopped early) and writes ``benchmarks/results/bench_steering[_<tag>].json``: the chosen
feature, every measured point (with the definitions of the measures), the targets met or not, and the wall time of
the lens, the candidate ranking and the sweep.

    python benchmarks/bench_steering.py --store /tmp/demo_full            # the default demo's store
    python benchmarks/bench_steering.py --store /tmp/demo_quick --tag quick --max-new-tokens 16
    python benchmarks/bench_steering.py --store S --features 12,345       # measure given features instead

Wall times are only as good as the machine was idle: say which CPU and load they come from.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, machine_meta  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--sae-id", help="default: the store's only (or first) SAE")
    parser.add_argument("--max-new-tokens", type=int, default=30, help="the demo's default is 30 (quick: 16)")
    parser.add_argument("--features", help="comma-separated features to measure instead of the finale's choice")
    parser.add_argument("--strengths", help="comma-separated strengths (default: the finale's)")
    parser.add_argument("--candidates", type=int,
                        help="measure the first N features of the finale's ranking, all of them (not only until one "
                             "meets the targets)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    import torch

    from mi_crow.cli.common import cli_info, load_model, model_of_sae, open_store, sae_ids
    from mi_crow.cli.demo import FINALE_STRENGTHS, _finale
    from mi_crow.cli.steer_eval import DEFAULT_PROMPTS
    from mi_crow.mechanistic.sae import TopKSae
    from mi_crow.mechanistic.sae.concepts import evaluate_steering, feature_logit_lens, lens_candidates
    from mi_crow.report import feature_stats_from_store

    store = open_store(args.store)
    sae_id = args.sae_id or sorted(sae_ids(store))[0]
    info = cli_info(store, sae_id)
    layer, run_id = info["layer"], info["activation_run"]
    lm = load_model(model_of_sae(None, info) or "default", store=store)
    sae = TopKSae.load(store, sae_id)
    # The top texts the demo stored (step 4), as (text, activation) pairs per feature.
    top_texts = [[] for _ in range(sae.n_latents)]
    for entry in store.get_json(f"sae_models/{sae_id}/top_texts.json")["neurons"]:
        top_texts[entry["neuron"]] = [(t["text"], t["activation"]) for t in entry["top_texts"]]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    stats = feature_stats_from_store(sae, store, run_id, layer)
    timings["stats_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lens = feature_logit_lens(lm, sae, [i for i, n in enumerate(stats.fire_count.tolist()) if n > 0], top=10)
    timings["lens_s"] = time.perf_counter() - t0
    strengths = [float(s) for s in args.strengths.split(",")] if args.strengths else list(FINALE_STRENGTHS)
    results = []
    t0 = time.perf_counter()
    if args.features or args.candidates:
        if args.features:
            features = [int(x) for x in args.features.split(",")]
            reason = "given with --features"
        else:
            ranked = lens_candidates(lens, stats.frequency, limit=args.candidates, top_texts=top_texts)
            features = [c[0] for c in ranked]
            reason = f"the first {args.candidates} of the finale's ranking: " + "; ".join(
                f"{c[0]} ({c[2]})" for c in ranked)
        lm.attach_sae(sae, layer)
        plain = None
        try:
            for f in features:
                results.append(evaluate_steering(lm, sae, f, DEFAULT_PROMPTS, strengths,
                                                 max_new_tokens=args.max_new_tokens, lens=lens,
                                                 plain_continuations=plain))
                plain = results[-1].plain.continuations
        finally:
            lm.detach_sae(sae)
    else:
        finale = _finale(lm, sae, layer, stats, lens, DEFAULT_PROMPTS, None, args.max_new_tokens, top_texts)
        if finale is None:
            print("no candidate feature")
            return 1
        (_, _, reason), evaluation = finale
        results.append(evaluation)
    timings["steer_s"] = time.perf_counter() - t0
    rows = []
    for r in results:
        best = r.best
        print(f"feature {r.neuron}: promoted words {r.promoted_words}")
        print(r.table())
        for prompt, a, b in zip(r.prompts, r.plain.continuations, best.continuations):
            print(f"prompt:  {prompt!r}\nplain:   {a!r}\nsteered: {b!r}")
        rows.append(r.to_dict())
    out = {
        "what": "mi-crow demo's steering finale on a demo store (mi_crow.cli.demo._finale)",
        "command": "python " + " ".join(sys.argv),
        "store": args.store, "sae_id": sae_id, "layer": layer, "reason": reason,
        "max_new_tokens": args.max_new_tokens, "strengths": strengths,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "results": rows,
        "meta": {**machine_meta(), "torch_threads": torch.get_num_threads(),
                 "note": "wall times on a shared machine (other sessions running): rough"},
    }
    path = RESULTS / f"bench_steering{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"timings {out['timings']}\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
