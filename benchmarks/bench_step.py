"""Question: how close is one TopK SAE training step with mi_crow.ops to the hardware floor on this CPU?

One step = forward (encode + top-k, decode), MSE (+ AuxK), backward, ``torch.optim.Adam(fused=True)`` step.
Per shape, in the same process, on one thread: (c) is timed with ``torch.utils.benchmark.Timer.blocked_autorange``
(median after warm-up); every other case runs 3-5 times after a warm-up, each run right after a run of (c), and
its ratio to (c) is the median of those paired ratios (robust to the machine's speed drifting over minutes):

* ``(c) encoder product fp32``: ``x @ W_enc.T`` alone -- the unit every ratio is expressed in;
* ``(a) naive dense step``: dense pre-activations, ``torch.topk``, dense code, dense decode, autograd;
* ``sparsify-style step``: dense pre-activations + ``torch.topk``, ``embedding_bag`` decode (autograd backward);
* ``floor``: encoder product + ``torch.topk`` + the fused Adam step on ready gradients (no decode, no backward);
* ``mi_crow step fp32`` / ``bf16 encoder`` (the product ``cpu_isa().bf16_gemm`` names, recorded in the JSON's meta;
  ``benchmarks/bench_bf16.py`` compares every available bf16 product and ``torch.matmul`` in bf16) / ``AuxK``
  (k_aux = 256, half of the latents dead), stepped as
  `SaeTrainer` steps: Adam updates each parameter inside backward as soon as its gradient is complete
  (`step_in_backward`), so at most one dense weight gradient is alive. The baselines step after backward.

Before timing, every step variant's loss and gradients are checked against the dense autograd step on a slice of
the batch. Memory is measured in a fresh subprocess per case from the kernel's peak-RSS counter (VmHWM, reset
through ``/proc/self/clear_refs``): the step's peak above the resident parameters + Adam state (gradients count
as step memory: none outlives a step), once as the process normally runs and once with glibc's caching of freed
blocks turned off (``step_peak_live_MiB``: what the step's tensors need). Full mode also trains a d=768, n=262144 SAE for two steps and reports the whole process's peak RSS.

Usage: ``python benchmarks/bench_step.py [--quick]``; prints a Markdown table and writes
``benchmarks/results/bench_step[_quick].json`` and ``.csv``.
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
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from mi_crow.mechanistic.sae.optim import step_in_backward
from mi_crow.ops import backends, cpu_isa, sparse_decode, sparse_decode_with_aux, topk_encode
from mi_crow.ops.memory import empty_huge

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, Shape, machine_meta, markdown, median_seconds, write_csv  # noqa: E402

FULL = [Shape(4096, 768, 32768, 32), Shape(4096, 2048, 65536, 32)]
QUICK = [Shape(512, 128, 4096, 32, 64), Shape(257, 96, 2049, 16, 32)]
BIG_MEMORY = Shape(4096, 768, 262144, 32)


class Sae:
    """Bare TopK SAE parameters (fp32 master weights) and a fused Adam over them."""

    def __init__(self, shape: Shape, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(shape.n, shape.d, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        # The weights live in huge pages, as TopKSae's do (fewer TLB misses in the random row gathers).
        self.W_enc = torch.nn.Parameter(empty_huge(shape.n, shape.d).copy_(W_dec))
        self.b_enc = torch.nn.Parameter(torch.zeros(shape.n))
        self.W_dec = torch.nn.Parameter(empty_huge(shape.n, shape.d).copy_(W_dec))
        self.b_dec = torch.nn.Parameter(torch.zeros(shape.d))
        self.params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        self.opt = torch.optim.Adam(self.params, lr=1e-4, fused=True)

    def state_bytes(self, with_grads: bool) -> int:
        total = sum(p.numel() * p.element_size() for p in self.params)
        for st in self.opt.state.values():
            total += sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor))
        if with_grads:
            total += sum(p.numel() * p.element_size() for p in self.params)
        return total


# ----------------------------------------------------------------------------------------------------------------
# Loss functions of the step variants (each returns the loss; the caller runs backward and Adam)
# ----------------------------------------------------------------------------------------------------------------
def loss_fast(sae: Sae, x: torch.Tensor, k: int, encode_dtype: torch.dtype = torch.float32,
              dead: torch.Tensor | None = None, k_aux: int = 0) -> torch.Tensor:
    code = topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, k, dead, k_aux, compute_dtype=encode_dtype)
    if code.aux_values is None:
        x_hat = sparse_decode(code.values, code.indices, sae.W_dec, sae.b_dec)
        return (x_hat - x).pow(2).sum(-1).mean()
    # AuxK: both decodes in one op, whose backward gives W_dec a single gradient (one pass over its rows).
    x_hat, e_hat = sparse_decode_with_aux(
        code.values, code.indices, code.aux_values, code.aux_indices, sae.W_dec, sae.b_dec
    )
    loss = (x_hat - x).pow(2).sum(-1).mean()
    e = (x - x_hat).detach()
    return loss + (e_hat - e).pow(2).sum(-1).mean() / 32


def loss_dense(sae: Sae, x: torch.Tensor, k: int, dead: torch.Tensor | None = None, k_aux: int = 0) -> torch.Tensor:
    pre = (x - sae.b_dec) @ sae.W_enc.t() + sae.b_enc
    top = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    x_hat = z @ sae.W_dec + sae.b_dec
    loss = (x_hat - x).pow(2).sum(-1).mean()
    if dead is not None and k_aux > 0:
        aux = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
        z_aux = torch.zeros_like(pre).scatter(1, aux.indices, torch.relu(aux.values.masked_fill(aux.values.isinf(), 0)))
        e = (x - x_hat).detach()
        loss = loss + (z_aux @ sae.W_dec - e).pow(2).sum(-1).mean() / 32
    return loss


def loss_sparsify(sae: Sae, x: torch.Tensor, k: int) -> torch.Tensor:
    pre = (x - sae.b_dec) @ sae.W_enc.t() + sae.b_enc
    top = pre.topk(k, dim=1)
    x_hat = F.embedding_bag(top.indices, sae.W_dec, per_sample_weights=torch.relu(top.values), mode="sum")
    return (x_hat + sae.b_dec - x).pow(2).sum(-1).mean()


def train_step(sae: Sae, loss_fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """A plain step: backward, then Adam on all gradients (the baselines)."""
    loss = loss_fn(sae, *args, **kwargs)
    loss.backward()
    sae.opt.step()
    sae.opt.zero_grad(set_to_none=True)


def train_step_in_backward(sae: Sae, loss_fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """mi_crow's step, as SaeTrainer takes it: Adam steps each parameter inside backward (`step_in_backward`)."""
    loss = loss_fn(sae, *args, **kwargs)
    with step_in_backward(sae.opt):
        loss.backward()


def floor_step(sae: Sae, x: torch.Tensor, k: int, grads: list[torch.Tensor]) -> None:
    with torch.no_grad():
        (x @ sae.W_enc.t()).topk(k, dim=1)
    for p, g in zip(sae.params, grads):
        p.grad = g
    sae.opt.step()


# ----------------------------------------------------------------------------------------------------------------
# Correctness gate: every variant must agree with the dense autograd step before it is timed
# ----------------------------------------------------------------------------------------------------------------
def check_against_dense(sae: Sae, x: torch.Tensor, shape: Shape, dead: torch.Tensor) -> None:
    xs = x[:64]
    variants = {
        "fp32": (lambda: loss_fast(sae, xs, shape.k), lambda: loss_dense(sae, xs, shape.k), 1e-4),
        "auxk": (lambda: loss_fast(sae, xs, shape.k, dead=dead, k_aux=shape.k_aux),
                 lambda: loss_dense(sae, xs, shape.k, dead, shape.k_aux), 1e-4),
        "sparsify": (lambda: loss_sparsify(sae, xs, shape.k), lambda: loss_dense(sae, xs, shape.k), 1e-4),
    }
    for name, (fast, dense, tol) in variants.items():
        grads = []
        for fn in (fast, dense):
            sae.opt.zero_grad(set_to_none=True)
            loss = fn()
            loss.backward()
            grads.append([loss.detach()] + [p.grad.clone() for p in sae.params])
        sae.opt.zero_grad(set_to_none=True)
        for a, b in zip(*grads):
            scale = max(b.abs().max().item(), 1e-12)
            err = (a - b).abs().max().item() / scale
            if err > tol:
                raise AssertionError(f"{name} step disagrees with dense autograd: relative error {err:.2e}")
    # bf16 encoder: same code as an fp32 encoder run on bf16-rounded inputs (tie-free, so the choice must match
    # up to latents whose bf16 pre-activations are nearly equal); check the loss, which ignores tie order.
    lb = loss_fast(sae, xs, shape.k, torch.bfloat16).item()
    lf = loss_fast(sae, xs, shape.k).item()
    if abs(lb - lf) > 0.05 * abs(lf) + 1e-6:
        raise AssertionError(f"bf16-encoder step loss {lb} is far from the fp32 step loss {lf}")


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
def time_shape(shape: Shape, quick: bool) -> list[dict]:
    min_run = 0.3 if quick else 3.0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape.batch, shape.d, generator=g)
    dead = torch.rand(shape.n, generator=g) < 0.5
    sae = Sae(shape)
    check_against_dense(sae, x, shape, dead)

    product = lambda: x @ sae.W_enc.t()  # noqa: E731
    c = median_seconds(product, min_run)
    grads = [torch.randn_like(p) * 1e-3 for p in sae.params]
    cases = [
        ("floor: product + topk + fused Adam", lambda: floor_step(sae, x, shape.k, grads), 5),
        ("(a) naive dense step", lambda: train_step(sae, loss_dense, x, shape.k), 3),
        ("sparsify-style step", lambda: train_step(sae, loss_sparsify, x, shape.k), 3),
        ("mi_crow step fp32", lambda: train_step_in_backward(sae, loss_fast, x, shape.k), 5),
        ("mi_crow step bf16 encoder", lambda: train_step_in_backward(sae, loss_fast, x, shape.k, torch.bfloat16), 5),
        (f"mi_crow step AuxK (k_aux={shape.k_aux}, 1/2 dead)",
         lambda: train_step_in_backward(sae, loss_fast, x, shape.k, dead=dead, k_aux=shape.k_aux), 5),
    ]
    rows = [("(c) encoder product fp32", c, 1.0)]
    for name, fn, pairs in cases:
        t, ratio = paired_ratio(fn, product, pairs if not quick else 3)
        sae.opt.zero_grad(set_to_none=True)
        rows.append((name, t, ratio))
    dense = next(t for name, t, _ in rows if name == "(a) naive dense step")
    out = []
    for name, t, ratio in rows:
        out.append({
            "shape": f"B={shape.batch} d={shape.d} n={shape.n} k={shape.k}",
            "case": name,
            "ms": round(t * 1e3, 2),
            "x_c": round(ratio, 3),
            "dense_over_this": round(dense / t, 2),
        })
    return out


def paired_ratio(fn, product, pairs: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(median seconds of ``fn``, median of ``fn``'s time over the encoder product's time right before it).

    On a shared machine the speed drifts over minutes; pairing each run with a run of (c) taken just before it
    makes the ratio independent of that drift. One thread, as ``torch.utils.benchmark.Timer`` times (c).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn()  # warm-up: optimizer state, allocator and BLAS caches
        times, ratios = [], []
        for _ in range(pairs):
            start = time.perf_counter()
            product()
            tc = time.perf_counter() - start
            start = time.perf_counter()
            fn()
            t = time.perf_counter() - start
            times.append(t)
            ratios.append(t / tc)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times), statistics.median(ratios)


# ----------------------------------------------------------------------------------------------------------------
# Memory (fresh subprocess per case, peak RSS from the kernel)
# ----------------------------------------------------------------------------------------------------------------
def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(shape: Shape, variant: str) -> dict:
    torch.manual_seed(0)
    x = torch.randn(shape.batch, shape.d)
    dead = torch.rand(shape.n) < 0.5
    sae = Sae(shape)
    kwargs = {"fp32": {}, "bf16": {"encode_dtype": torch.bfloat16},
              "auxk": {"dead": dead, "k_aux": shape.k_aux}}.get(variant)
    fn, step = (loss_dense, train_step) if variant == "dense" else (loss_fast, train_step_in_backward)
    if variant == "dense":
        kwargs = {}
    step(sae, fn, x, shape.k, **kwargs)  # creates the Adam state
    # The baseline is parameters + Adam state alone: blocks the warm-up step freed into the C heap are handed back
    # first, so memory the step reuses from there is counted as step memory.
    ctypes.CDLL(None).malloc_trim(0)
    base = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    step(sae, fn, x, shape.k, **kwargs)
    peak = _rss_bytes("VmHWM")
    return {"process_peak_GiB": round(peak / 2**30, 3), "step_MiB": round((peak - base) / 2**20, 1)}


def measure_memory(shape: Shape, variant: str) -> dict:
    """Two fresh children: as the process runs normally (glibc keeps freed [B, d]-sized blocks in its heap, so
    RSS also counts memory the step no longer uses), and with every allocation of 1 MiB or more mapped and
    unmapped on its own (MALLOC_MMAP_THRESHOLD_), so RSS follows the live large tensors."""
    runs = {}
    for name, extra in (("glibc", {}), ("live", {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})):
        cmd = [sys.executable, __file__, "--memory-child", json.dumps([asdict(shape), variant])]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **extra})
        if out.returncode != 0:
            raise RuntimeError(f"memory child failed: {out.stderr[-2000:]}")
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "shape": f"B={shape.batch} d={shape.d} n={shape.n} k={shape.k}",
        "variant": variant,
        "process_peak_GiB": runs["glibc"]["process_peak_GiB"],
        "step_peak_MiB": runs["glibc"]["step_MiB"],
        "step_peak_live_MiB": runs["live"]["step_MiB"],
        "quarter_BxN_fp32_MiB": round(shape.batch * shape.n * 4 / 4 / 2**20, 1),
    }


# ----------------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds, for CI and development)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        shape_d, variant = json.loads(args.memory_child)
        print(json.dumps(memory_child(Shape(**shape_d), variant)))
        return

    shapes = QUICK if args.quick else FULL
    timing = []
    for shape in shapes:
        timing += time_shape(shape, args.quick)
    memory = []
    for shape in shapes[:1]:
        for variant in ("fp32", "bf16", "auxk", "dense"):
            memory.append(measure_memory(shape, variant))
    if not args.quick:
        memory.append(measure_memory(BIG_MEMORY, "fp32"))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backends {backends('cpu')}\n")
    print("### Training step (median; x_c = time / (c) encoder product fp32; dense_over_this = (a) / time)\n")
    print(markdown(timing))
    print("\n### Memory (peak RSS of one step, fresh process)\n")
    print(markdown(memory))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "bench_step_quick" if args.quick else "bench_step"
    isa = cpu_isa()
    meta = {**machine_meta(), "backends": backends("cpu"), "cpu_isa": isa._asdict() if isa else None}
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "timing": timing, "memory": memory}, indent=2))
    write_csv(RESULTS / f"{stem}.csv", timing, list(timing[0]))


if __name__ == "__main__":
    main()
