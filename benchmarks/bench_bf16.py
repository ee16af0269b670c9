"""Question: what does a bf16 encoder cost on this CPU, against the fp32 encoder product and torch.matmul in bf16?

At B=4096, d=768, n=32768, k=32 (``--quick``: B=512, d=128, n=4096), on ``--threads`` threads (default 1, as
``bench_step.py``), in one process. Each repetition runs, back to back:

* ``(c) encoder product fp32``: ``x @ W_enc.T`` -- the unit of ``x_c``;
* ``(m) torch.matmul bf16``: ``x_bf16 @ W_bf16.T`` on operands already in bf16 (oneDNN on CPUs with AVX-512,
  the reference the bf16 encoder must match or beat) -- the unit of ``x_m``;
* ``encode fp32`` / ``encode bf16 [product]``: the fused ``topk_encode`` alone (no grad);
* ``step fp32`` / ``step bf16 [product]``: one training step as ``bench_step.py`` takes it (encode, decode, MSE,
  backward with Adam stepping inside it), ``compute_dtype=torch.bfloat16`` for the bf16 ones, once per low-precision
  product available here (``csrc/lowp_gemm.h``: ``onednn`` on CPUs with bf16 instructions, ``mkl``, ``fp32`` =
  widened operands), switched in-process;
* ``step autocast bf16``: the fp32 step inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` (automatic product).

Each case's ratio to (c) and to (m) is taken per repetition against that repetition's (c) and (m) (robust to the
machine's speed drifting), and the median over repetitions is reported with every repetition's value. The
``(m)`` case is slow on CPUs without bf16 support (bf16 products emulated); ``--matmul-repeats`` limits it.

Usage: ``python benchmarks/bench_bf16.py [--quick] [--repeats 3] [--threads 1]``; prints a Markdown table and
writes ``benchmarks/results/bench_bf16[_quick].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import mi_crow.ops as ops
from mi_crow.ops import registration, topk_encode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, Shape, machine_meta, markdown  # noqa: E402
from bench_step import Sae, loss_fast, train_step_in_backward  # noqa: E402

FULL = Shape(4096, 768, 32768, 32)
QUICK = Shape(512, 128, 4096, 32)


def seconds(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def available_products() -> list[str]:
    ext = registration.EXTENSION
    if ext is None or not hasattr(ext, "request_lowp_gemm"):
        return []
    found = [name for name in ("onednn", "mkl", "fp32") if ext.request_lowp_gemm(name) == name]
    ext.request_lowp_gemm("auto")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul-repeats", type=int, default=None,
                        help="repetitions that also time (m) (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    ext = registration.EXTENSION

    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape.batch, shape.d, generator=g)
    sae = Sae(shape)
    xb, Wb = x.bfloat16(), sae.W_enc.detach().bfloat16()
    products = available_products()
    auto = ops.cpu_isa().bf16_gemm if ops.cpu_isa() else "unknown"

    def with_product(name: str, fn):  # type: ignore[no-untyped-def]
        def run() -> None:
            ext.request_lowp_gemm(name)
            try:
                fn()
            finally:
                ext.request_lowp_gemm("auto")
        return run

    def encode(dtype):  # type: ignore[no-untyped-def]
        def run() -> None:
            with torch.no_grad():
                topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, shape.k, compute_dtype=dtype)
        return run

    def step(dtype):  # type: ignore[no-untyped-def]
        return lambda: train_step_in_backward(sae, loss_fast, x, shape.k, dtype)

    def autocast_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            train_step_in_backward(sae, loss_fast, x, shape.k)

    cases = {"encode fp32": encode(torch.float32), "step fp32": step(torch.float32)}
    for p in products:
        cases[f"encode bf16 [{p}]"] = with_product(p, encode(torch.bfloat16))
        cases[f"step bf16 [{p}]"] = with_product(p, step(torch.bfloat16))
    cases[f"step autocast bf16 [{auto}]"] = autocast_step

    product = lambda: x @ sae.W_enc.t()  # noqa: E731
    matmul = lambda: xb @ Wb.t()  # noqa: E731
    for fn in (product, matmul, *cases.values()):
        fn()  # warm-up: Adam state, allocator, oneDNN/MKL caches
    matmul_repeats = args.repeats if args.matmul_repeats is None else args.matmul_repeats
    t_c, t_m = [], []
    times: dict[str, list[float]] = {name: [] for name in cases}
    x_c: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(args.repeats):
        t_c.append(seconds(product))
        if rep < matmul_repeats:
            t_m.append(seconds(matmul))
        for name, fn in cases.items():
            t = seconds(fn)
            times[name].append(t)
            x_c[name].append(t / t_c[-1])
        sae.opt.zero_grad(set_to_none=True)

    m_over_c = [m / c for m, c in zip(t_m, t_c)]
    rows = [
        {"case": "(c) encoder product fp32", "ms": round(statistics.median(t_c) * 1e3, 1), "x_c": 1.0,
         "x_m": round(1 / statistics.median(m_over_c), 3) if m_over_c else "", "x_c per repetition": ""},
        {"case": "(m) torch.matmul bf16", "ms": round(statistics.median(t_m) * 1e3, 1) if t_m else "",
         "x_c": round(statistics.median(m_over_c), 3) if m_over_c else "", "x_m": 1.0,
         "x_c per repetition": " ".join(f"{r:.3f}" for r in m_over_c)},
    ]
    m_med = statistics.median(m_over_c) if m_over_c else None
    for name in cases:
        r = statistics.median(x_c[name])
        rows.append({
            "case": name,
            "ms": round(statistics.median(times[name]) * 1e3, 1),
            "x_c": round(r, 3),
            "x_m": round(r / m_med, 3) if m_med else "",
            "x_c per repetition": " ".join(f"{v:.3f}" for v in x_c[name]),
        })
    isa = ops.cpu_isa()
    print(f"torch {torch.__version__}, {args.threads} threads, shape {shape}, cpu level {isa.cpu if isa else '?'}, "
          f"bf16 product (auto): {auto}, available: {products}, load average {os.getloadavg()}\n")
    print(markdown(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "bench_bf16_quick" if args.quick else "bench_bf16"
    meta = {**machine_meta(), "threads": args.threads, "cpu_isa": isa._asdict() if isa else None,
            "products": products, "loadavg": os.getloadavg(), "repeats": args.repeats,
            "shape": vars(shape)}
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
