"""Matryoshka step: the fused prefix loss (`matryoshka_prefix_sse`) against the previous autograd chain, same run.

One `SaeTrainer.train_step` per variant on the same batch (B=4096, d=768, n=32768, k=32, 5 prefixes with doubling
group sizes; ``--quick``: B=512, d=128, n=4096, k=16), interleaved rounds, medians and ratios to the plain TopK
step of the same run:

- ``topk``: the plain TopK step;
- ``matryoshka_{topk,batchtopk}_fused``: the prefix losses as one autograd node (the library's path);
- ``matryoshka_{topk,batchtopk}_chain``: the earlier formulation, kept here for the comparison: the ``[B, G, d]``
  prefix reconstructions from `matryoshka_reconstructions` (every slot decoded, zeros included) and the errors,
  squares and sums through autograd.

Writes ``benchmarks/results/bench_family_matryoshka_ab[_quick].json``. The machine is shared: compare the ratios
of one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_family as bf  # noqa: E402
from _common import RESULTS, machine_meta, markdown  # noqa: E402


def chain_prefix_sse(values, indices, W_dec, b_dec, goal, prefixes):  # type: ignore[no-untyped-def]
    """The earlier formulation of the prefix losses (autograd over ``[B, G, d]`` tensors)."""
    from mi_crow.mechanistic.sae.train import losses

    recons = losses.matryoshka_reconstructions(values, indices, W_dec, b_dec, prefixes)
    errs = goal.unsqueeze(1) - recons
    return errs.pow(2).sum(dim=(0, 2)), errs[:, -1].detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    from mi_crow.mechanistic.sae.train import losses

    fused = losses.matryoshka_prefix_sse
    B, d, n, k = (512, 128, 4096, 16) if args.quick else (4096, 768, 32768, 32)
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(1))
    variants = {"topk": "topk"}
    for sel in ("topk", "batchtopk"):
        for impl in ("fused", "chain"):
            variants[f"matryoshka_{sel}_{impl}"] = f"matryoshka_{sel}"
    trainers = {name: bf.make(kind, n, d, k) for name, kind in variants.items()}

    def run(name: str) -> None:
        losses.matryoshka_prefix_sse = chain_prefix_sse if name.endswith("_chain") else fused
        try:
            bf.step(trainers[name], x)
        finally:
            losses.matryoshka_prefix_sse = fused

    for name in trainers:
        run(name)  # warm-up: Adam state, caches
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name in trainers:
            start = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = [{"variant": name, "step_ms": round(med[name] * 1e3, 1), "ratio_to_topk": round(med[name] / med["topk"], 3)}
            for name in trainers]
    print(f"B={B} d={d} n={n} k={k}, {args.rounds} interleaved rounds, threads={torch.get_num_threads()}")
    print(markdown(rows))
    RESULTS.mkdir(exist_ok=True)
    out = {"meta": {**machine_meta(), "measured_utc": time.strftime("%Y-%m-%d %H:%M"),
                    "cpu": "AMD EPYC (AVX2), 2 cores shared with other sessions (timings rough)",
                    "shape": {"B": B, "d": d, "n": n, "k": k}, "rounds": args.rounds},
           "rows": rows, "raw_seconds": times}
    name = "bench_family_matryoshka_ab_quick.json" if args.quick else "bench_family_matryoshka_ab.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
