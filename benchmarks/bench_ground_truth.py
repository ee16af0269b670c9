"""Question: how much of a known dictionary does the training recipe recover?

A synthetic ground truth (`mi_crow.mechanistic.sae.synthetic`: Zipf-distributed firing, correlated groups, a feature
hierarchy, small noise) generates the training tokens; a TopK SAE with twice as many latents as true features is
trained on them with the recipe's defaults (only the batch and the token budget are set), and recovery is scored on a
fresh sample: MMCS (mean over true features of the best decoder cosine), MCC (mean activation correlation after
Hungarian matching) and FVU. Variants of the recipe run beside the default for comparison.

The default size is the benchmark's (target MCC >= 0.9); ``--quick`` is the CI gate's size
(tests/sae/test_ground_truth.py).

Usage: ``python benchmarks/bench_ground_truth.py [--quick] [--variants default,lr_x4] [--merge]``; prints a Markdown
table and writes ``benchmarks/results/bench_ground_truth[_quick].json`` (``--merge`` keeps the rows of the variants
this run does not measure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae
from mi_crow.mechanistic.sae.synthetic import SyntheticConfig, make_ground_truth, score_recovery
from mi_crow.mechanistic.sae.train.schedule import default_lr

RESULTS = Path(__file__).resolve().parent / "results"

SIZES = {
    # the CI gate's size: 1M training tokens
    "quick": dict(truth=SyntheticConfig(d_in=128, n_features=256, n_parents=16, children_per_parent=2,
                                        mean_active=4.0), latents=512, k=6, tokens=200_000, epochs=5),
    # the benchmark's size: 2M training tokens
    "default": dict(truth=SyntheticConfig(), latents=2048, k=12, tokens=400_000, epochs=5),
}

#: Recipe variants: overrides of SaeTrainingConfig (``lr_scale`` multiplies the run's default learning rate,
#: `schedule.default_lr` of the width and the budget).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "lr_x1.25": {"lr_scale": 1.25},
    "lr_x2": {"lr_scale": 2.0},
    "lr_x3": {"lr_scale": 3.0},
    "lr_x4": {"lr_scale": 4.0},
    "lr_x2_normalize_inputs": {"lr_scale": 2.0, "normalize_inputs": True},
    "normalize_inputs": {"normalize_inputs": True},
    "no_auxk": {"auxk_coef": 0.0},
    "k_anneal_10pct": {"k_anneal_fraction": 0.1},
    "decay_from_0.5": {"lr_decay_start": 0.5},
    "no_decoder_norm": {"normalize_decoder": False},
}


def _rule() -> str:
    """The default learning-rate rule the ``lr_scale`` variants multiply (it changes when the rule is re-fitted)."""
    from mi_crow.mechanistic.sae.train import schedule

    return (f"max(2e-4 / sqrt(n / 2**14), {schedule.LR_RULE_C:.4g} * (n / 2**14) ** "
            f"{schedule.LR_RULE_WIDTH_EXPONENT:.3g} * (budget / 2**20) ** {schedule.LR_RULE_BUDGET_EXPONENT:.3g})")


def run(size: dict[str, Any], variant: str, batch: int) -> dict[str, Any]:
    truth = make_ground_truth(size["truth"])
    x = truth.sample_x(size["tokens"], seed=1)
    torch.manual_seed(0)
    sae = TopKSae(size["latents"], truth.d_in, size["k"])
    overrides = dict(VARIANTS[variant])
    lr_scale = overrides.pop("lr_scale", None)
    if lr_scale is not None:
        budget = int(size["epochs"] * (size["tokens"] // batch)) * batch  # what the trainer plans
        overrides["lr"] = lr_scale * default_lr(size["latents"], budget)
    cfg = SaeTrainingConfig(batch_size=batch, epochs=size["epochs"], progress=False, checkpoint_every=None,
                            save_sae=False, **overrides)
    start = time.perf_counter()
    result = SaeTrainer(sae).train_on_tensor(x, cfg)
    wall = time.perf_counter() - start
    scores = score_recovery(truth, sae, n_tokens=32768)
    return {"variant": variant, "default_lr_rule": _rule(), **scores, "train_tokens": result.tokens, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI gate's size")
    parser.add_argument("--variants", default="default")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of other variants already in the results file (run variants in pieces)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = SIZES["quick" if args.quick else "default"]
    rows = []
    for variant in args.variants.split(","):
        rows.append(run(size, variant, args.batch))
        print(json.dumps(rows[-1]))
    truth = size["truth"]
    print(f"ground truth: {truth.n_features} features in {truth.d_in} dims, {truth.mean_active} active per token; "
          f"SAE n={size['latents']} k={size['k']}, {size['tokens'] * size['epochs']:,} training tokens")
    print("| variant | MCC | MMCS | matched cos | FVU | wall s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['mcc']:.3f} | {r['mmcs']:.3f} | {r['matched_cosine']:.3f} | {r['fvu']:.4f} | "
              f"{r['wall_s']:.1f} |")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench_ground_truth{'_quick' if args.quick else ''}.json"
    names = [r["variant"] for r in rows]
    if args.merge and path.exists():
        rows = [r for r in json.loads(path.read_text())["rows"] if r["variant"] not in names] + rows
    meta = {"torch": torch.__version__, "threads": args.threads, "machine": platform.processor(),
            "truth": asdict(truth), "latents": size["latents"], "k": size["k"], "batch": args.batch,
            "train_tokens": size["tokens"] * size["epochs"],
            "variants": {r["variant"]: VARIANTS[r["variant"]] for r in rows}}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
