"""Question: which parts of the default TopK recipe cost held-out FVU at a given budget, and what would do better?

On the activation tensors of bench_quality.py (SmolLM2-135M block 15, sinks removed, split by text), a TopK SAE
(``n = 4608``, ``k = 32``, batch 1024 tokens) is trained on the recipe's defaults and on variants that change one
knob (or a named pair) of `SaeTrainingConfig`: input normalisation, the AuxK coefficient and dead window, the
learning-rate decay's start and shape, warm-up, Adam's betas, the ``b_dec`` and encoder initialisation, k-annealing,
and the peak learning rate as a multiple of `schedule.default_lr`. Every run reports held-out FVU (float64) and the
latents never active on the held-out set; everything else (data, seed, shuffling) is the same for all.

Usage: ``python benchmarks/bench_recipe_ablation.py [--data PATH] [--budget 1000000] [--variants defaults,...]
[--resume]``; prints a table ordered by held-out FVU and writes ``benchmarks/results/bench_recipe_ablation.json``
after every run (``--resume`` keeps the runs already there, so an ablation can be run in pieces; a run is identified
by its variant name and budget). ``--list`` prints the variants. ``lr_multiple`` variants are relative to the rule
in force when they ran (recorded per row as ``default_lr_rule``); rows with a ``source`` were measured by another
benchmark on the same data and recipe and copied in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae
from mi_crow.mechanistic.sae.metrics import fvu
from mi_crow.mechanistic.sae.train.schedule import default_lr

RESULTS = Path(__file__).resolve().parent / "results"

#: name -> (what it changes, SaeTrainingConfig overrides). ``lr_multiple`` (not a config field) multiplies the
#: default peak learning rate of the run.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "defaults": ("the recipe's defaults", {}),
    "normalize_inputs": ("inputs scaled to mean squared norm d_in", {"normalize_inputs": True}),
    "no_auxk": ("AuxK off (the recipe before issue 12's fixes never ran it in short runs)", {"auxk_coef": 0.0}),
    "auxk_1_8": ("AuxK coefficient 1/8", {"auxk_coef": 1.0 / 8.0}),
    "dead_window_2pct": ("dead window 2% of the budget", {"dead_window_fraction": 0.02}),
    "dead_window_30pct": ("dead window 30% of the budget", {"dead_window_fraction": 0.3}),
    "decay_from_0.5": ("linear decay over the last half", {"lr_decay_start": 0.5}),
    "decay_from_0": ("linear decay over the whole run", {"lr_decay_start": 0.0}),
    "cosine_from_0": ("cosine decay over the whole run", {"lr_decay": "cosine", "lr_decay_start": 0.0}),
    "no_decay": ("constant learning rate after warm-up", {"lr_decay": "none"}),
    "no_warmup": ("no warm-up", {"warmup_steps": 0}),
    "warmup_10pct": ("warm-up over 10% of the steps", {"warmup_fraction": 0.1}),
    "betas_0.9_0.99": ("Adam betas (0.9, 0.99)", {"adam_betas": (0.9, 0.99)}),
    "eps_1e-8": ("Adam eps 1e-8", {"adam_eps": 1e-8}),
    "b_dec_mean": ("b_dec at the mean of the sample", {"b_dec_init": "mean"}),
    "b_dec_zeros": ("b_dec at zero", {"b_dec_init": "zeros"}),
    "random_encoder": ("a random encoder instead of the decoder's transpose", {"init_encoder_from_decoder": False}),
    "k_anneal_10pct": ("k annealed from 4k over the first 10% of the steps", {"k_anneal_fraction": 0.1}),
    "lr_x0.5": ("half the default peak learning rate", {"lr_multiple": 0.5}),
    "lr_x1.25": ("1.25x the default peak learning rate", {"lr_multiple": 1.25}),
    "lr_x1.5": ("1.5x the default peak learning rate", {"lr_multiple": 1.5}),
    "lr_x2": ("twice the default peak learning rate", {"lr_multiple": 2.0}),
    "lr_x3": ("three times the default peak learning rate", {"lr_multiple": 3.0}),
    "lr_x4": ("four times the default peak learning rate", {"lr_multiple": 4.0}),
    "lr_x2_auxk_1_8": ("twice the default peak learning rate, AuxK coefficient 1/8",
                       {"lr_multiple": 2.0, "auxk_coef": 1.0 / 8.0}),
    "lr_x2_dead_window_2pct": ("twice the default peak learning rate, dead window 2% of the budget",
                               {"lr_multiple": 2.0, "dead_window_fraction": 0.02}),
}


def _rule() -> str:
    """The default learning-rate rule that ``lr_multiple`` multiplies (it changes when the rule is re-fitted)."""
    from mi_crow.mechanistic.sae.train import schedule

    return (f"max(2e-4 / sqrt(n / 2**14), {schedule.LR_RULE_C:.4g} * (n / 2**14) ** "
            f"{schedule.LR_RULE_WIDTH_EXPONENT:.3g} * (budget / 2**20) ** {schedule.LR_RULE_BUDGET_EXPONENT:.3g})")


def config_for(overrides: dict[str, Any], n: int, batch: int, budget: int) -> SaeTrainingConfig:
    """The run's config: defaults plus ``overrides`` (``lr_multiple``, ``dead_window_fraction`` and
    ``warmup_fraction`` are resolved here into ``lr``, ``dead_window_tokens`` and ``warmup_steps``)."""
    fields = dict(overrides)
    if "lr_multiple" in fields:
        fields["lr"] = fields.pop("lr_multiple") * default_lr(n, budget)
    if "dead_window_fraction" in fields:
        fields["dead_window_tokens"] = max(batch, int(fields.pop("dead_window_fraction") * budget))
    if "warmup_fraction" in fields:
        fields["warmup_steps"] = int(fields.pop("warmup_fraction") * (budget // batch))
    return SaeTrainingConfig(batch_size=batch, n_tokens=budget, progress=False, checkpoint_every=None,
                             save_sae=False, **fields)


def run(train: torch.Tensor, heldout: torch.Tensor, n: int, k: int, batch: int, budget: int,
        overrides: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    sae = TopKSae(n, train.shape[1], k)
    cfg = config_for(overrides, n, batch, budget)
    start = time.perf_counter()
    result = SaeTrainer(sae).train_on_tensor(train, cfg)
    wall = time.perf_counter() - start
    with torch.no_grad():
        out = sae(heldout)
    fired = torch.zeros(n, dtype=torch.bool)
    fired[out.code.indices[out.code.values > 0]] = True
    history = getattr(result, "history", None) or []
    last = history[-1] if history else {}
    return {"heldout_fvu": fvu(heldout, out.reconstruction), "dead_pct": 100.0 * float((~fired).float().mean()),
            "train_fvu_last_log": last.get("fvu") if isinstance(last, dict) else None,
            "peak_lr": cfg.lr if cfg.lr is not None else default_lr(n, budget), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="bench_quality.py's activation tensors (.pt)")
    parser.add_argument("--budget", type=int, default=1_000_000)
    parser.add_argument("--variants", default="defaults", help="comma-separated names (see --list), or 'all'")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--n", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the results file")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_recipe_ablation.json")
    args = parser.parse_args()
    if args.list:
        for name, (what, overrides) in VARIANTS.items():
            print(f"{name:20s} {what}  {overrides}")
        return
    torch.set_num_threads(args.threads)
    names = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    if args.data is None:
        from mi_crow.defaults import get_cache_dir

        args.data = get_cache_dir() / "bench_quality" / "smollm2_l15_1200_135.pt"
    if not args.data.exists():
        raise SystemExit(f"{args.data} is missing: run benchmarks/bench_quality.py first (it builds the tensors)")
    data = torch.load(args.data, weights_only=True)
    train, heldout = data["train"], data["heldout"]
    budget = (args.budget // args.batch) * args.batch
    meta = {"torch": torch.__version__, "threads": args.threads, "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "n": args.n, "k": args.k, "batch": args.batch,
            "train_tokens": int(train.shape[0]), "heldout_tokens": int(heldout.shape[0]), "data": data.get("meta"),
            "default_lr_rule": _rule()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = json.loads(args.out.read_text())["rows"] if args.resume and args.out.exists() else []
    for name in names:
        if any(r["variant"] == name and r["budget"] == budget and r["n"] == args.n for r in rows):
            continue
        what, overrides = VARIANTS[name]
        print(f"-- {name} ({what}), {budget} tokens", file=sys.stderr, flush=True)
        res = run(train, heldout, args.n, args.k, args.batch, budget, overrides)
        row = {"variant": name, "what": what, "default_lr_rule": _rule(),
               "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
               "n": args.n, "budget": budget, "measured_utc": time.strftime("%Y-%m-%d %H:%M"), **res}
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.resume and args.out.exists():  # another process may have added rows meanwhile
            rows = json.loads(args.out.read_text())["rows"]
        rows = [r for r in rows if not (r["variant"] == name and r["budget"] == budget and r["n"] == args.n)] + [row]
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"n={args.n} k={args.k} batch={args.batch}; held-out FVU and dead % per variant")
    print("| budget | variant | held-out FVU | dead % | peak lr | wall s |\n|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["budget"], r["heldout_fvu"])):
        print(f"| {r['budget']:,} | {r['variant']} | {r['heldout_fvu']:.4f} | {r['dead_pct']:.1f} | "
              f"{r['peak_lr']:.3g} | {r['wall_s']:.0f} |")
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
