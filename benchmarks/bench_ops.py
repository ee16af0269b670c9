"""Question: what does each mi_crow op cost on this CPU, next to its plain-PyTorch reference and a dense equivalent?

Per shape, in one process, timed with ``torch.utils.benchmark.Timer.blocked_autorange`` (median after warm-up):

* ``topk_encode`` (fp32, bf16, and fp32 with AuxK k_aux = 256 over half the latents) against the encoder product
  ``x @ W_enc.T`` alone and against the reference (dense pre-activations + ``torch.topk``);
* ``sparse_decode`` against the dense decode ``Z @ W_dec`` (``Z`` the dense ``[B, n]`` code) -- the issue's
  "sparse decode at least 20x faster than dense decode at n = 32768" -- and against the ``embedding_bag`` reference;
* the backward pieces ``gather_dot``, ``scatter_rows`` and the fused ``sparse_decode_backward`` against their
  references and the dense products that autograd would run (``G @ W_dec.T`` gathered, ``Z.T @ G``);
* the AuxK step's decoder backward (main code k and aux code k_aux = 256 from the encoder's dead-latent top-k):
  ``sparse_decode_with_aux_backward`` (one pass, one decoder gradient) against two ``sparse_decode_backward``
  calls and the add of their two ``[n, d]`` gradients.

Every op's output is checked against its reference before it is timed.

Usage: ``python benchmarks/bench_ops.py [--quick]``; prints a Markdown table and writes
``benchmarks/results/bench_ops[_quick].json`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import mi_crow.ops as ops
from mi_crow.ops import (
    gather_dot_ref,
    scatter_rows_ref,
    sparse_decode_ref,
    sparse_decode_with_aux_backward_ref,
    topk_encode_ref,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, Shape, machine_meta, markdown, median_seconds, write_csv  # noqa: E402

FULL = [Shape(4096, 768, 32768, 32)]
QUICK = [Shape(512, 128, 4096, 32, 64)]


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    err = (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-12)
    if err > tol:
        raise AssertionError(f"{what}: relative error {err:.2e} against the reference")


def run_shape(s: Shape, quick: bool, mi_crow_only: bool = False) -> list[dict]:
    """Check and time every case of one shape; ``mi_crow_only`` times the mi_crow ops alone (no speedup column)."""
    min_run = 0.3 if quick else 2.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.batch, s.d, generator=g)
    W = torch.randn(s.n, s.d, generator=g) / s.d**0.5
    b_enc = torch.randn(s.n, generator=g) * 0.01
    b_dec = torch.randn(s.d, generator=g) * 0.01
    dead = torch.rand(s.n, generator=g) < 0.5
    grad = torch.randn(s.batch, s.d, generator=g)
    aux_grad = torch.randn(s.batch, s.d, generator=g)
    xb, Wb, beb, bdb = (t.bfloat16() for t in (x, W, b_enc, b_dec))

    # Correctness gate (sorted values and decoded output do not depend on tie order).
    code = ops.topk_encode(x, W, b_enc, b_dec, s.k, dead, s.k_aux)
    ref = topk_encode_ref(x, W, b_enc, b_dec, s.k, dead, s.k_aux)
    _close(code.values, ref[0], "topk_encode values")
    _close(code.aux_values, ref[2], "topk_encode aux values")
    v, idx = code.values, code.indices
    Z = torch.zeros(s.batch, s.n).scatter(1, idx, v)
    _close(ops.sparse_decode(v, idx, W, b_dec), Z @ W + b_dec, "sparse_decode")
    _close(torch.ops.mi_crow.gather_dot(grad, idx, W), gather_dot_ref(grad, idx, W), "gather_dot")
    _close(torch.ops.mi_crow.scatter_rows(v, idx, grad, s.n), scatter_rows_ref(v, idx, grad, s.n), "scatter_rows")
    fused = torch.ops.mi_crow.sparse_decode_backward(grad, v, idx, W)
    _close(fused[1], Z.t() @ grad, "sparse_decode_backward (grad W)")
    av, aidx = code.aux_values, code.aux_indices
    with_aux = torch.ops.mi_crow.sparse_decode_with_aux_backward(grad, v, idx, aux_grad, av, aidx, W)
    for got, want, what in zip(with_aux, sparse_decode_with_aux_backward_ref(grad, v, idx, aux_grad, av, aidx, W),
                               ("grad values", "aux grad values", "grad W")):
        _close(got, want, f"sparse_decode_with_aux_backward ({what})")

    def two_backwards_and_add() -> tuple[torch.Tensor, ...]:
        gv, gw = torch.ops.mi_crow.sparse_decode_backward(grad, v, idx, W)
        agv, agw = torch.ops.mi_crow.sparse_decode_backward(aux_grad, av, aidx, W)
        return gv, agv, gw + agw

    aux_group = f"grad values + W_dec, main + AuxK {s.k_aux}"
    cases: list[tuple[str, str, object]] = [
        ("encode", "x @ W_enc.T fp32 (c)", lambda: x @ W.t()),
        ("encode", "reference: dense pre + torch.topk", lambda: topk_encode_ref(x, W, b_enc, b_dec, s.k, None, 0)),
        ("encode", "mi_crow topk_encode fp32", lambda: ops.topk_encode(x, W, b_enc, b_dec, s.k)),
        ("encode", f"mi_crow topk_encode fp32 + AuxK {s.k_aux}",
         lambda: ops.topk_encode(x, W, b_enc, b_dec, s.k, dead, s.k_aux)),
        ("encode", "x @ W_enc.T bf16", lambda: xb @ Wb.t()),
        ("encode", "mi_crow topk_encode bf16", lambda: ops.topk_encode(xb, Wb, beb, bdb, s.k)),
        ("decode", "dense Z @ W_dec", lambda: Z @ W + b_dec),
        ("decode", "reference: embedding_bag", lambda: sparse_decode_ref(v, idx, W, b_dec)),
        ("decode", "mi_crow sparse_decode", lambda: ops.sparse_decode(v, idx, W, b_dec)),
        ("grad values", "dense (G @ W_dec.T).gather", lambda: (grad @ W.t()).gather(1, idx)),
        ("grad values", "reference gather_dot", lambda: gather_dot_ref(grad, idx, W)),
        ("grad values", "mi_crow gather_dot", lambda: torch.ops.mi_crow.gather_dot(grad, idx, W)),
        ("grad W_dec", "dense Z.T @ G", lambda: Z.t() @ grad),
        ("grad W_dec", "reference scatter_rows (index_add)", lambda: scatter_rows_ref(v, idx, grad, s.n)),
        ("grad W_dec", "mi_crow scatter_rows", lambda: torch.ops.mi_crow.scatter_rows(v, idx, grad, s.n)),
        ("grad values + W_dec", "mi_crow sparse_decode_backward",
         lambda: torch.ops.mi_crow.sparse_decode_backward(grad, v, idx, W)),
        (aux_group, "mi_crow sparse_decode_backward x2 + add", two_backwards_and_add),
        (aux_group, "mi_crow sparse_decode_with_aux_backward",
         lambda: torch.ops.mi_crow.sparse_decode_with_aux_backward(grad, v, idx, aux_grad, av, aidx, W)),
    ]
    if mi_crow_only:
        timed = {(grp, name): median_seconds(fn, min_run) for grp, name, fn in cases if name.startswith("mi_crow")}
        return [{"shape": f"B={s.batch} d={s.d} n={s.n} k={s.k}", "op": grp, "implementation": name,
                 "ms": round(t * 1e3, 3)} for (grp, name), t in timed.items()]
    times = {(grp, name): median_seconds(fn, min_run) for grp, name, fn in cases}
    # The fused backward replaces gather_dot + scatter_rows, so it is compared with the dense pair of products.
    first: dict[str, float] = {}
    for (grp, _), t in times.items():
        first.setdefault(grp, t)
    first["grad values + W_dec"] = first["grad values"] + first["grad W_dec"]
    # The dense products cost the same whatever k, so two codes are twice the pair (the add left out).
    first[aux_group] = 2 * first["grad values + W_dec"]
    rows = []
    for (grp, name), t in times.items():
        rows.append({
            "shape": f"B={s.batch} d={s.d} n={s.n} k={s.k}",
            "op": grp,
            "implementation": name,
            "ms": round(t * 1e3, 3),
            "speedup_vs_dense": round(first[grp] / t, 2),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    args = parser.parse_args()
    rows = []
    for s in QUICK if args.quick else FULL:
        rows += run_shape(s, args.quick)
    isa = ops.cpu_isa()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backends {ops.backends('cpu')}, "
          f"CPU kernels {isa}\n")
    print("speedup_vs_dense: the first row of each op group (the plain or dense product) / this row\n")
    print(markdown(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "bench_ops_quick" if args.quick else "bench_ops"
    meta = {**machine_meta(), "backends": ops.backends("cpu"), "cpu_isa": isa._asdict() if isa else None}
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    write_csv(RESULTS / f"{stem}.csv", rows, list(rows[0]))


if __name__ == "__main__":
    main()
