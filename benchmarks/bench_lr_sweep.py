"""Question: which peak learning rate minimises held-out FVU, as a function of the dictionary size and the token
budget, and what rule fits it?

On the activation tensors of bench_quality.py (SmolLM2-135M block 15, sinks removed, split by text), a TopK SAE
(``k = 32``, batch 1024 tokens) is trained with the recipe's defaults except the peak learning rate, which runs over
multiples of the reference ``2e-4 / sqrt(n / 2**14)`` (OpenAI's rule), for a small grid of widths ``n`` and budgets
``T``. Each (n, T) cell starts on a small grid of multiples (default 2, 4, 8) and adds a point (x2 or /2) while the
best one lies on the grid's edge; its best multiple is located by a parabola through the best point and its two
neighbours in log-lr, and a power law ``lr* = c * (n / 2**14)**a * (T / 2**20)**b`` is fitted to the optima by least squares in log space.

Usage: ``python benchmarks/bench_lr_sweep.py [--quick] [--data PATH] [--cells 4608:1048576,...] [--resume]``; prints
the grid and the fitted rule and writes ``benchmarks/results/bench_lr_sweep[_quick].json`` after every run (``--resume``
keeps the runs already there, so a sweep can be run in pieces). Rows with a ``source`` field were measured by
bench_recipe_ablation.py or bench_quality.py (the same data and recipe, only the peak learning rate set) and copied in;
``--resume`` with ``--extend 0`` and multiples already measured re-fits the rule without training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae
from mi_crow.mechanistic.sae.metrics import fvu

RESULTS = Path(__file__).resolve().parent / "results"


def reference_lr(n: int) -> float:
    return 2e-4 / math.sqrt(n / 2**14)


def run(train: torch.Tensor, heldout: torch.Tensor, n: int, k: int, batch: int, budget: int, lr: float,
        extra: dict[str, Any]) -> dict[str, float]:
    torch.manual_seed(0)
    sae = TopKSae(n, train.shape[1], k)
    cfg = SaeTrainingConfig(batch_size=batch, n_tokens=budget, lr=lr, progress=False, checkpoint_every=None,
                            save_sae=False, **extra)
    start = time.perf_counter()
    SaeTrainer(sae).train_on_tensor(train, cfg)
    wall = time.perf_counter() - start
    with torch.no_grad():
        out = sae(heldout)
    fired = torch.zeros(n, dtype=torch.bool)
    fired[out.code.indices[out.code.values > 0]] = True
    return {"heldout_fvu": fvu(heldout, out.reconstruction), "dead_fraction": float((~fired).float().mean()),
            "wall_s": wall}


def best_multiple(points: list[tuple[float, float]]) -> float:
    """Minimiser in log-lr of a parabola through the best point and its neighbours (the best grid point itself when
    it lies on the edge of the grid)."""
    points = sorted(points)
    i = min(range(len(points)), key=lambda j: points[j][1])
    if i == 0 or i == len(points) - 1:
        return points[i][0]
    (x0, y0), (x1, y1), (x2, y2) = [(math.log(m), f) for m, f in points[i - 1 : i + 2]]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    if a <= 0:
        return points[i][0]
    return math.exp(min(max(-b / (2 * a), x0), x2))


def fit_rule(optima: list[dict[str, float]]) -> dict[str, float]:
    """Least squares of ``log lr* = log c + a log(n / 2**14) + b log(T / 2**20)``."""
    rows = torch.tensor([[1.0, math.log(o["n"] / 2**14), math.log(o["budget"] / 2**20)] for o in optima],
                        dtype=torch.float64)
    target = torch.tensor([math.log(o["lr"]) for o in optima], dtype=torch.float64).unsqueeze(1)
    coef = torch.linalg.lstsq(rows, target).solution.flatten()
    resid = (rows @ coef.unsqueeze(1) - target).flatten()
    return {"c": math.exp(float(coef[0])), "a": float(coef[1]), "b": float(coef[2]),
            "rms_log_error": float(resid.pow(2).mean().sqrt())}


def _identifiable(optima: list[dict[str, float]]) -> bool:
    """Whether the cells determine the power law's three parameters (its design matrix has rank 3)."""
    rows = torch.tensor([[1.0, math.log(o["n"]), math.log(o["budget"])] for o in optima], dtype=torch.float64)
    return len(optima) >= 3 and int(torch.linalg.matrix_rank(rows)) == 3


def _cell_points(rows: list[dict[str, Any]], n: int, budget: int, max_dead: float = 1.0) -> list[tuple[float, float]]:
    """(multiple, held-out FVU) of the cell's runs that leave at most ``max_dead`` of the latents dead."""
    return sorted((r["multiple"], r["heldout_fvu"]) for r in rows
                  if r["n"] == n and r["budget"] == budget and r["dead_fraction"] <= max_dead)


def _next_multiple(points: list[tuple[float, float]], factor: float) -> float | None:
    """The grid point to add when the best multiple lies on an edge of the grid (None when it is inside)."""
    i = min(range(len(points)), key=lambda j: points[j][1])
    if i == 0:
        return points[0][0] / factor
    if i == len(points) - 1:
        return points[-1][0] * factor
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", type=Path, default=None, help="bench_quality.py's activation tensors (.pt)")
    parser.add_argument("--widths", default=None)
    parser.add_argument("--budgets", default=None)
    parser.add_argument("--cells", default=None,
                        help="explicit (n:budget) cells, e.g. 4608:1048576,1152:65536 (instead of widths x budgets)")
    parser.add_argument("--multiples", default=None, help="starting grid of multiples of the reference lr")
    parser.add_argument("--extend", type=int, default=2,
                        help="grid points added (x2 or /2) per cell while the best multiple lies on the grid's edge")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the results file")
    parser.add_argument("--max-dead", type=float, default=0.01,
                        help="a cell's best multiple is the best among runs leaving at most this fraction of the "
                             "latents dead on the held-out set (the recipe's target; default 0.01)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cells:
        cells = [tuple(int(v) for v in c.split(":")) for c in args.cells.split(",")]
    else:
        widths = [int(v) for v in (args.widths or ("512,1024" if args.quick else "1152,4608")).split(",")]
        budgets = [int(v) for v in (args.budgets or ("16384,65536" if args.quick else "65536,262144,1048576")).split(",")]
        cells = [(n, b) for n in widths for b in budgets]
    multiples = [float(v) for v in (args.multiples or "2,4,8").split(",")]
    if args.data is None:
        from mi_crow.defaults import get_cache_dir

        args.data = get_cache_dir() / "bench_quality" / "smollm2_l15_1200_135.pt"
    if not args.data.exists():
        raise SystemExit(f"{args.data} is missing: run benchmarks/bench_quality.py first (it builds the tensors)")
    data = torch.load(args.data, weights_only=True)
    train, heldout = data["train"], data["heldout"]
    meta = {"torch": torch.__version__, "threads": args.threads, "machine": platform.processor(), "k": args.k,
            "batch": args.batch, "train_tokens": int(train.shape[0]), "heldout_tokens": int(heldout.shape[0]),
            "reference_lr": "2e-4 / sqrt(n / 2**14)", "data": data.get("meta")}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench_lr_sweep{'_quick' if args.quick else ''}.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"] if args.resume and path.exists() else []

    def measure(n: int, budget: int, m: float) -> None:
        if any(r["n"] == n and r["budget"] == budget and math.isclose(r["multiple"], m) for r in rows):
            return
        lr = m * reference_lr(n)
        res = run(train, heldout, n, args.k, args.batch, budget, lr, {})
        rows.append({"n": n, "budget": budget, "multiple": m, "lr": lr, **res})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        path.write_text(json.dumps({"meta": meta, "rows": rows, "optima": None, "rule": None}, indent=2))

    optima: list[dict[str, float]] = []
    for n, budget in cells:
        budget = (budget // args.batch) * args.batch
        for m in multiples:
            measure(n, budget, m)
        for _ in range(args.extend):
            extra = _next_multiple(_cell_points(rows, n, budget), 2.0)
            if extra is None:
                break
            measure(n, budget, extra)
        points = _cell_points(rows, n, budget)
        m_free = best_multiple(points)
        alive = _cell_points(rows, n, budget, args.max_dead)
        m_star = best_multiple(alive) if alive else min(m for m, _ in points)
        optima.append({"n": n, "budget": budget, "multiple": m_star, "lr": m_star * reference_lr(n),
                       "best_heldout_fvu": min(f for _, f in alive) if alive else None,
                       "multiple_ignoring_dead": m_free, "best_heldout_fvu_ignoring_dead": min(f for _, f in points)})
    rule = fit_rule(optima) if _identifiable(optima) else None
    if rule is not None:
        rule["max_dead_fraction"] = args.max_dead
    grid = sorted({r["multiple"] for r in rows})
    print("held-out FVU by multiple of the reference lr 2e-4 / sqrt(n / 2**14):")
    print(f"(dead % on the held-out set in brackets; best multiple: among runs with <= {100 * args.max_dead:g}% dead, "
          "and ignoring dead latents)")
    print("| n | budget | " + " | ".join(f"x{m:g}" for m in grid) + " | best multiple | ignoring dead |")
    print("|---|---|" + "---|" * len(grid) + "---|---|")
    for o in optima:
        by_m = {r["multiple"]: r for r in rows if r["n"] == o["n"] and r["budget"] == o["budget"]}
        cells_txt = [f"{by_m[m]['heldout_fvu']:.4f} ({100 * by_m[m]['dead_fraction']:.1f})" if m in by_m else ""
                     for m in grid]
        print(f"| {o['n']} | {o['budget']:,} | " + " | ".join(cells_txt)
              + f" | {o['multiple']:.2f} | {o['multiple_ignoring_dead']:.2f} |")
    if rule is not None:
        print(f"fit: lr* = {rule['c']:.3g} * (n / 2**14)^{rule['a']:.3f} * (T / 2**20)^{rule['b']:.3f} "
              f"(rms log error {rule['rms_log_error']:.3f})")
    path.write_text(json.dumps({"meta": meta, "rows": rows, "optima": optima, "rule": rule}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
