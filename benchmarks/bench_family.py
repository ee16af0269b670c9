"""SAE family training steps: BatchTopK and Matryoshka against the plain TopK step, time and step memory.

One optimizer step (`SaeTrainer.train_step`: losses, backward with the in-backward Adam steps) per architecture on
the same batch, at B=4096, d=768, n=32768, k=32 by default (``--quick``: a small shape):

- ``topk``: the plain per-token TopK step;
- ``batchtopk``: BatchTopK over the batch (fused candidate lists + one global selection, see
  ``mi_crow/ops/batch_topk.py``);
- ``matryoshka_topk`` / ``matryoshka_batchtopk``: 5 nested prefixes (group sizes doubling), the prefix losses as
  masked sparse decodes in one call.

Timings are interleaved rounds (each round runs every variant once, in turn) and the per-variant median is
reported, with the ratios to ``topk`` taken from the same run. Memory is measured in a fresh subprocess per
variant from the kernel's peak-RSS counter (VmHWM reset through ``/proc/self/clear_refs``): the step's peak above
the resident parameters + Adam state, with every allocation of 1 MiB or more mapped on its own
(``MALLOC_MMAP_THRESHOLD_``) so RSS follows the live tensors. A dense ``[B, n]`` float32 matrix is printed for
scale. Results go to ``benchmarks/results/bench_family.json``.

On a shared CPU the timings are noisy: compare the ratios of one run, not absolute figures across runs.
``--variants`` runs a subset (with ``topk``), ``--no-memory`` skips the memory subprocesses (the step-time ratio
alone, for a loaded machine).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_meta, markdown  # noqa: E402

VARIANTS = ("topk", "batchtopk", "matryoshka_topk", "matryoshka_batchtopk")


def _groups(n: int, count: int = 5) -> list[int]:
    unit = n // (2**count - 1)
    sizes = [unit * 2**g for g in range(count)]
    sizes[-1] += n - sum(sizes)
    return sizes


def make(variant: str, n: int, d: int, k: int):  # type: ignore[no-untyped-def]
    from mi_crow.mechanistic.sae import BatchTopKSae, MatryoshkaSae, SaeTrainer, SaeTrainingConfig, TopKSae

    torch.manual_seed(0)
    sae = {
        "topk": lambda: TopKSae(n, d, k),
        "batchtopk": lambda: BatchTopKSae(n, d, k),
        "matryoshka_topk": lambda: MatryoshkaSae(n, d, k, _groups(n), batch_topk=False),
        "matryoshka_batchtopk": lambda: MatryoshkaSae(n, d, k, _groups(n), batch_topk=True),
    }[variant]()
    trainer = SaeTrainer(sae)
    trainer.prepare(SaeTrainingConfig(progress=False, checkpoint_every=None, save_sae=False), lr=1e-4)
    return trainer


def step(trainer, x: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    out = trainer.train_step(x, 1e-4, k_aux=0)
    assert out is not None


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def memory_child(variant: str, B: int, d: int, n: int, k: int) -> dict:
    trainer = make(variant, n, d, k)
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(1))
    step(trainer, x)  # creates the Adam state
    ctypes.CDLL(None).malloc_trim(0)
    base = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step(trainer, x)
    return {"step_peak_MiB": round((_rss("VmHWM") - base) / 2**20, 1)}


def measure_memory(variant: str, B: int, d: int, n: int, k: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", json.dumps([variant, B, d, n, k])]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B=512, d=128, n=4096, k=16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of the variants (topk always runs: the ratios' base)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(*json.loads(args.memory_child))))
        return
    B, d, n, k = (512, 128, 4096, 16) if args.quick else (4096, 768, 32768, 32)
    variants = ["topk"] + [v for v in args.variants.split(",") if v and v != "topk"]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected some of {VARIANTS}")
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(1))
    trainers = {v: make(v, n, d, k) for v in variants}
    for v in variants:
        step(trainers[v], x)  # warm-up: Adam state, caches
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            start = time.perf_counter()
            step(trainers[v], x)
            times[v].append(time.perf_counter() - start)
    med = {v: statistics.median(t) for v, t in times.items()}
    refinements = width = None
    from mi_crow.ops.batch_topk import batch_topk_encode

    if "batchtopk" in trainers:
        with torch.no_grad():
            sae = trainers["batchtopk"].sae
            code = batch_topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, k)
            refinements, width = code.refinements, code.values.shape[1]
    params_mib = sum(p.numel() * p.element_size() for p in trainers["topk"].sae.parameters()) / 2**20
    rows = []
    for v in variants:
        mem = measure_memory(v, B, d, n, k) if not args.no_memory else {"step_peak_MiB": None}
        rows.append({
            "variant": v,
            "step_ms": round(med[v] * 1e3, 1),
            "ratio_to_topk": round(med[v] / med["topk"], 3),
            "step_peak_MiB": mem["step_peak_MiB"],
        })
    dense_mib = round(B * n * 4 / 2**20, 1)
    print(f"B={B} d={d} n={n} k={k}, {args.rounds} interleaved rounds, threads={torch.get_num_threads()}")
    print(markdown(rows))
    print(f"parameters {params_mib:.0f} MiB (+ Adam state 2x); a dense [B, n] fp32 matrix would be {dense_mib} MiB"
          + (f"; BatchTopK selection on this batch: width {width}, {refinements} refinement(s)" if width else ""))
    RESULTS.mkdir(exist_ok=True)
    out = {"meta": {**machine_meta(), "measured_utc": time.strftime("%Y-%m-%d %H:%M"),
                    "cpu": "AMD EPYC (AVX2), 2 cores shared with other sessions (timings rough)",
                    "shape": {"B": B, "d": d, "n": n, "k": k}, "rounds": args.rounds,
                    "dense_BxN_fp32_MiB": dense_mib, "params_MiB": round(params_mib, 1),
                    "batchtopk_width": width, "batchtopk_refinements": refinements},
           "rows": rows, "raw_seconds": times}
    name = "bench_family_quick.json" if args.quick else "bench_family.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
