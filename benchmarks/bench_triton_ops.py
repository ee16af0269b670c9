"""Question: on a CUDA GPU, how fast are mi_crow's Triton kernels (and the CUDA C++ scatter_rows) against the
plain-PyTorch references they replace, and how much memory does the fused encode save?

Per shape and dtype, in one process, each implementation is first checked against the reference, then timed
with ``triton.testing.do_bench(..., return_mode="median")`` (warm-up, then the median of repeated runs):

* ``topk_encode``: fused Triton encode + top-k (no ``[tokens, n_latents]`` matrix) vs the reference (dense
  product + ``torch.topk``), with and without AuxK (k_aux = 256, half of the latents dead); also the peak CUDA
  memory above the inputs of each;
* ``sparse_decode``: Triton vs the reference (``embedding_bag``) vs a dense decode (dense code @ W_dec);
* ``gather_dot``: Triton vs the reference;
* ``scatter_rows``: Triton vs the CUDA C++ kernel (when the extension was built with CUDA) vs the reference
  (``index_add``) vs the dense decoder gradient (dense code.T @ grad).

Ratios are ``reference time / implementation time`` measured in the same run. Without a CUDA device nothing can
be measured (the kernels are verified on CPU by tests/ops/test_triton.py under the Triton interpreter); the
script then says so and records that in the result file.

Usage: ``python benchmarks/bench_triton_ops.py [--quick]``; prints a Markdown table and writes
``benchmarks/results/bench_triton_ops[_quick].json`` and ``.csv``. ``--interpret`` runs the same code path on CPU
under the Triton interpreter at tiny shapes (a smoke test of this script; its times mean nothing and nothing is
written).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, Shape, write_csv  # noqa: E402

FULL = [Shape(4096, 768, 32768, 32), Shape(4096, 2048, 65536, 32)]
QUICK = [Shape(512, 128, 4096, 32, 64), Shape(257, 96, 2049, 16, 32)]
INTERPRET = [Shape(33, 48, 300, 8, 16)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    impl: str
    ms: float
    speedup_vs_reference: float
    peak_mib: float | None = None


def _bench(fn: Callable[[], object]) -> float:
    if not torch.cuda.is_available():  # --interpret smoke run
        from torch.utils.benchmark import Timer

        return Timer("fn()", globals={"fn": fn}).timeit(1).median * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, return_mode="median"))


def _peak_mib(fn: Callable[[], object]) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def _check_close(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item() + 1e-6
    if err > tol * scale:
        raise SystemExit(f"{name}: result differs from the reference (max abs error {err:.3g}, scale {scale:.3g})")


def run_shape(shape: Shape, dtype_name: str, dev: torch.device) -> list[Row]:
    from mi_crow.ops import reference
    from mi_crow.ops import triton_kernels as tk
    from mi_crow.ops.registration import NATIVE_CUDA_OPS

    dtype = DTYPES[dtype_name]
    g = torch.Generator(device=dev).manual_seed(0)
    B, d, n, k = shape.batch, shape.d, shape.n, shape.k
    label = f"B={B} d={d} n={n} k={k}"
    x = torch.randn(B, d, device=dev, generator=g).to(dtype)
    W = (torch.randn(n, d, device=dev, generator=g) / d**0.5).to(dtype)
    b_enc = torch.zeros(n, device=dev, dtype=dtype)
    b_dec = torch.zeros(d, device=dev, dtype=dtype)
    dead = torch.rand(n, device=dev, generator=g) < 0.5
    rows: list[Row] = []

    def add(op: str, impl: str, fn: Callable[[], object], ref_ms: float | None, peak: bool = False) -> float:
        ms = _bench(fn)
        rows.append(
            Row(op, label, dtype_name, impl, ms, (ref_ms / ms) if ref_ms else 1.0, _peak_mib(fn) if peak else None)
        )
        return ms

    # topk_encode, without and with AuxK. Compare tie-independently: the sorted top values.
    for k_aux, mask in ((0, None), (shape.k_aux, dead)):
        op = "topk_encode" if k_aux == 0 else f"topk_encode+aux{k_aux}"
        got = tk.topk_encode_triton(x, W, b_enc, b_dec, k, mask, k_aux)
        want = reference.topk_encode_ref(x, W, b_enc, b_dec, k, mask, k_aux)
        _check_close(op, got[0], want[0], dtype)
        if k_aux:
            _check_close(op + " aux", got[2], want[2], dtype)
        ref_ms = add(op, "reference (dense + torch.topk)",
                     lambda m=mask, a=k_aux: reference.topk_encode_ref(x, W, b_enc, b_dec, k, m, a), None, peak=True)
        add(op, "triton fused", lambda m=mask, a=k_aux: tk.topk_encode_triton(x, W, b_enc, b_dec, k, m, a), ref_ms,
            peak=True)

    values, indices, _, _ = tk.topk_encode_triton(x, W, b_enc, b_dec, k, None, 0)
    grad = torch.randn(B, d, device=dev, generator=g).to(dtype)
    dense_code = torch.zeros(B, n, device=dev, dtype=dtype).scatter_(1, indices, values)

    _check_close("sparse_decode", tk.sparse_decode_triton(values, indices, W, b_dec),
                 reference.sparse_decode_ref(values, indices, W, b_dec), dtype)
    ref_ms = add("sparse_decode", "reference (embedding_bag)",
                 lambda: reference.sparse_decode_ref(values, indices, W, b_dec), None)
    add("sparse_decode", "dense decode (code @ W_dec)", lambda: dense_code @ W + b_dec, ref_ms)
    add("sparse_decode", "triton", lambda: tk.sparse_decode_triton(values, indices, W, b_dec), ref_ms)

    want = reference.gather_dot_ref(grad, indices, W)
    _check_close("gather_dot", tk.gather_dot_triton(grad, indices, W), want, dtype)
    ref_ms = add("gather_dot", "reference", lambda: reference.gather_dot_ref(grad, indices, W), None)
    add("gather_dot", "triton", lambda: tk.gather_dot_triton(grad, indices, W), ref_ms)

    want = reference.scatter_rows_ref(values, indices, grad, n)
    _check_close("scatter_rows", tk.scatter_rows_triton(values, indices, grad, n), want, dtype)
    ref_ms = add("scatter_rows", "reference (index_add)",
                 lambda: reference.scatter_rows_ref(values, indices, grad, n), None)
    add("scatter_rows", "dense (code.T @ grad)", lambda: dense_code.T @ grad, ref_ms)
    add("scatter_rows", "triton", lambda: tk.scatter_rows_triton(values, indices, grad, n), ref_ms)
    if "scatter_rows" in NATIVE_CUDA_OPS:
        _check_close("scatter_rows cuda", torch.ops.mi_crow.scatter_rows(values, indices, grad, n), want, dtype)
        add("scatter_rows", "cuda c++", lambda: torch.ops.mi_crow.scatter_rows(values, indices, grad, n), ref_ms)
    return rows


def _table(rows: list[Row]) -> str:
    lines = [
        "| op | shape | dtype | implementation | median ms | speed-up vs reference | peak MiB |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        peak = "" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        lines.append(
            f"| {r.op} | {r.shape} | {r.dtype} | {r.impl} | {r.ms:.3f} | {r.speedup_vs_reference:.2f}x | {peak} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--interpret", action="store_true", help="CPU smoke run under the Triton interpreter")
    args = parser.parse_args(argv)
    if args.interpret:
        # Must be set before triton is first imported (mi_crow.ops imports it).
        os.environ["TRITON_INTERPRET"] = "1"
        rows = [r for dt in DTYPES for r in run_shape(INTERPRET[0], dt, torch.device("cpu"))]
        print("Triton interpreter on CPU: a check that this script runs; the times are NOT performance.\n")
        print(_table(rows))
        return 0
    suffix = "_quick" if args.quick else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "quick": args.quick}

    if not torch.cuda.is_available():
        message = (
            "No CUDA device: nothing measured. The Triton kernels are checked for correctness on CPU by "
            "tests/ops/test_triton.py (TRITON_INTERPRET=1) and compiled for sm_80/sm_90 there; the CUDA C++ kernel "
            "is compile-checked by tests/ops/test_cuda_compile.py."
        )
        print(message)
        (RESULTS / f"bench_triton_ops{suffix}.json").write_text(
            json.dumps({"meta": meta, "status": "not measured: no CUDA device", "rows": []}, indent=2) + "\n"
        )
        return 0

    meta["device"] = torch.cuda.get_device_name()
    rows: list[Row] = []
    for shape in QUICK if args.quick else FULL:
        for dtype_name in DTYPES:
            rows.extend(run_shape(shape, dtype_name, torch.device("cuda")))
    print(_table(rows))
    (RESULTS / f"bench_triton_ops{suffix}.json").write_text(
        json.dumps({"meta": meta, "status": "measured", "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
    )
    write_csv(RESULTS / f"bench_triton_ops{suffix}.csv", (asdict(r) for r in rows), list(asdict(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
