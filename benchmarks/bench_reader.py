"""Question: what does streaming activations from the store add to an SAE training loop?

For each case a run of stored batches (50-100% real tokens per row; ``--format 2``, the default: packed
real tokens as ``activations.save`` writes them; ``--format 1``: padded ``[b, seq, d]`` files) is written to a
temporary ``LocalStore``. One epoch of a training loop -- a bare TopK SAE step (``mi_crow.ops.topk_encode`` +
``sparse_decode``, MSE, backward, Adam) per batch -- is then timed with each data path:

* ``in-memory``: batches gathered from a tensor already in RAM (the baseline: no file reading at all);
* ``reader ...``: ``store.activation_reader`` (shuffled with a large or a small buffer, with and without prefetch,
  unshuffled), file reading and padding removal included.

Columns: ``loop ms/batch`` is the median epoch time (the paths' epochs interleaved over several rounds, so that
drifting load hits all alike) divided by the number of batches; ``loop vs in-memory`` compares it with the in-memory
loop of the same run (target: at most +10%). ``data path alone`` is one epoch of the data path with no step
(``Timer.blocked_autorange``, median after a warm-up) per batch, and ``alone / step`` its share of one step (step =
in-memory loop minus in-memory data path): what the reader costs a step when nothing overlaps. Before timing, the
reader's output is checked against the stored data (each real token exactly once per epoch). The files sit in the
page cache (just written); a cold disk adds its read time.

Usage: ``python benchmarks/bench_reader.py [--quick] [--clock wall|cpu] [--threads N]``; writes
``benchmarks/results/bench_reader[_quick]_<clock>.json``. On a shared, oversubscribed machine wall times swing with
other people's jobs; ``--clock cpu --threads 1`` measures this process's CPU time instead (work done, not waiting).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from mi_crow.ops import backends, sparse_decode, topk_encode
from mi_crow.store import LocalStore

LAYER = "model.layers.3"


@dataclass
class Case:
    d: int
    n_latents: int
    k: int
    batch: int
    n_files: int
    rows: int
    seq: int
    small_buffer: int


FULL = [Case(d=576, n_latents=4608, k=32, batch=4096, n_files=24, rows=16, seq=256, small_buffer=2**15)]
QUICK = [Case(d=64, n_latents=512, k=16, batch=256, n_files=16, rows=8, seq=64, small_buffer=2**11)]


FORMAT = 2  # store format of the benchmark run (--format)


def write_run(store: LocalStore, case: Case) -> int:
    g = torch.Generator().manual_seed(0)
    n_tokens = 0
    if FORMAT == 2:
        store.create_packed_run("bench", {}, {LAYER: case.d}, torch.float32)
    for i in range(case.n_files):
        lengths = torch.randint(case.seq // 2, case.seq + 1, (case.rows,), generator=g)
        mask = (torch.arange(case.seq)[None, :] < lengths[:, None]).long()
        acts = torch.randn(case.rows, case.seq, case.d, generator=g)
        if FORMAT == 1:
            store.write_activation_batch("bench", i, {LAYER: acts}, mask)
        else:  # the same real tokens, packed
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            store.write_packed_batch("bench", i, {LAYER: acts[mask.bool()]}, offsets,
                                     torch.zeros(int(mask.sum()), dtype=torch.int32))
        n_tokens += int(mask.sum())
    if FORMAT == 2:
        store.finish_packed_run("bench")
    return n_tokens


def check_reader(store: LocalStore, case: Case) -> None:
    """Reader output == stored real tokens as a multiset (sorted row sums) and in total."""
    stored = []
    for i in store.list_batches("bench"):
        acts, mask = store.load_batch("bench", i, LAYER)
        stored.append(acts[mask.bool()])
    want = torch.cat(stored)
    got = torch.cat(list(store.activation_reader("bench", LAYER, case.batch, drop_last=False,
                                                 buffer_tokens=case.small_buffer, prefetch=True)))
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.equal(got.sum(1).sort().values, want.sum(1).sort().values)
    assert torch.allclose(got.sum(0), want.sum(0), rtol=1e-4, atol=1e-2)


def make_step(case: Case) -> Callable[[torch.Tensor], None]:
    g = torch.Generator().manual_seed(1)
    W_dec = torch.randn(case.n_latents, case.d, generator=g)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).requires_grad_()
    W_enc = W_dec.detach().clone().requires_grad_()
    b_enc = torch.zeros(case.n_latents, requires_grad=True)
    b_dec = torch.zeros(case.d, requires_grad=True)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=1e-4)

    def step(x: torch.Tensor) -> None:
        code = topk_encode(x, W_enc, b_enc, b_dec, case.k)
        recon = sparse_decode(code.values, code.indices, W_dec, b_dec)
        loss = (recon - x).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


CLOCK: Callable[[], float] = time.perf_counter


def time_median(fn: Callable[[], None], min_run_time: float) -> float:
    fn()  # warm-up: first-call allocations, page cache, kernel selection
    return Timer(stmt="fn()", globals={"fn": fn}, timer=CLOCK).blocked_autorange(min_run_time=min_run_time).median


def run_case(case: Case, min_run_time: float, rounds: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp, fsync=False)
        n_tokens = write_run(store, case)
        check_reader(store, case)
        n_batches = n_tokens // case.batch
        step = make_step(case)
        resident = torch.randn(n_tokens, case.d)

        def in_memory() -> Iterable[torch.Tensor]:
            perm = torch.randperm(n_tokens)
            return (resident.index_select(0, perm[i * case.batch:(i + 1) * case.batch]) for i in range(n_batches))

        paths: list[tuple[str, Callable[[], Iterable[torch.Tensor]]]] = [("in-memory", in_memory)]
        variants = [("reader shuffled, default (1 GiB, read-ahead)", dict()),
                    ("reader shuffled, buffer 2^18", dict(buffer_tokens=2**18, prefetch=False)),
                    ("reader shuffled, small buffer", dict(buffer_tokens=case.small_buffer, prefetch=False)),
                    ("reader shuffled, small buffer, prefetch", dict(buffer_tokens=case.small_buffer, prefetch=True)),
                    ("reader unshuffled, small buffer", dict(shuffle=False, buffer_tokens=case.small_buffer,
                                                             prefetch=False))]
        for label, kwargs in variants:
            paths.append((label, lambda kwargs=kwargs: store.activation_reader("bench", LAYER, case.batch, **kwargs)))

        # Loops are timed interleaved (one epoch of every path per round, median over rounds) so that drifting
        # load on a shared machine hits all paths alike; the reader alone is timed with blocked_autorange.
        loop_times: dict[str, list[float]] = {label: [] for label, _ in paths}
        for x in in_memory():  # warm-up of the step (the run's files are already in the page cache)
            step(x)
        for _ in range(rounds):
            for label, make in paths:
                def loop(make=make) -> None:
                    for x in make():
                        step(x)

                loop_times[label].append(Timer(stmt="fn()", globals={"fn": loop}, timer=CLOCK).timeit(1).median)
        rows = []
        for label, make in paths:
            def drain(make=make) -> None:
                for _ in make():
                    pass

            rows.append({"path": label, "loop_s_per_batch": statistics.median(loop_times[label]) / n_batches,
                         "loop_rounds": len(loop_times[label]),
                         "alone_s_per_batch": time_median(drain, min_run_time) / n_batches})
        base = rows[0]["loop_s_per_batch"]
        step_s = base - rows[0]["alone_s_per_batch"]
        for row in rows:
            row.update(asdict(case), n_tokens=n_tokens, n_batches=n_batches, step_s=step_s,
                       overhead=row["loop_s_per_batch"] / base - 1.0, alone_vs_step=row["alone_s_per_batch"] / step_s,
                       alone_tokens_per_s=case.batch / row["alone_s_per_batch"])
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short timing (smoke run)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (steadier on an oversubscribed shared machine)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--format", type=int, choices=[1, 2], default=2,
                        help="store format of the run read (2: packed, what activations.save writes; 1: padded)")
    args = parser.parse_args()
    global CLOCK, FORMAT
    FORMAT = args.format
    if args.clock == "cpu":
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases, min_run_time, rounds = (QUICK, 0.3, 5) if args.quick else (FULL, 2.0, 3)
    results = [row for case in cases for row in run_case(case, min_run_time, rounds)]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, clock: {args.clock}, "
          f"ops backends {backends()}\n")
    print("| d | n_latents | k | batch | run tokens | data path | loop ms/batch | loop vs in-memory "
          "| data path alone ms/batch | alone / step | alone Mtok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['d']} | {r['n_latents']} | {r['k']} | {r['batch']} | {r['n_tokens']} | {r['path']} | "
              f"{r['loop_s_per_batch'] * 1e3:.1f} | {r['overhead'] * 100:+.1f}% | "
              f"{r['alone_s_per_batch'] * 1e3:.2f} | {r['alone_vs_step'] * 100:.1f}% | "
              f"{r['alone_tokens_per_s'] / 1e6:.2f} |")
    name = f"bench_reader{'_quick' if args.quick else ''}_{args.clock}{'_format1' if args.format == 1 else ''}.json"
    out = Path(__file__).resolve().parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__, "clock": args.clock,
                               "threads": torch.get_num_threads(), "backends": backends(), "results": results},
                              indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
