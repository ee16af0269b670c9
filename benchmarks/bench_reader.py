"""Question: what does streaming activations from the store cost, next to the SAE training step it feeds?

For each case a run of stored batches (padded ``[b, seq, d]`` files, ~75% real tokens) is written to a temporary
``LocalStore``; then, with ``torch.utils.benchmark.Timer.blocked_autorange`` (median after warm-up):

* ``step``: one bare TopK SAE training step (``mi_crow.ops.topk_encode`` + ``sparse_decode``, MSE, backward, Adam)
  on a ``[batch, d]`` batch -- the work the reader has to keep up with;
* ``reader``: one epoch of ``store.activation_reader`` (shuffled, default and small shuffle buffer; unshuffled),
  divided by the number of batches -- time per batch delivered, file reading and padding removal included;
* ``in-memory``: a random ``index_select`` batch from a tensor already in RAM (the floor for any data path).

Before timing, the reader's output is checked against the stored data (each real token exactly once per epoch).
The files sit in the page cache (just written); a cold disk adds its read bandwidth on top.

Usage: ``python benchmarks/bench_reader.py [--quick]``; writes ``benchmarks/results/bench_reader.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from mi_crow.ops import TopKCode, backends, sparse_decode, topk_encode
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


FULL = [Case(d=576, n_latents=4608, k=32, batch=4096, n_files=24, rows=16, seq=256)]
QUICK = [Case(d=64, n_latents=512, k=16, batch=512, n_files=12, rows=8, seq=64)]


def write_run(store: LocalStore, case: Case) -> int:
    g = torch.Generator().manual_seed(0)
    n_tokens = 0
    for i in range(case.n_files):
        lengths = torch.randint(case.seq // 2, case.seq + 1, (case.rows,), generator=g)
        mask = (torch.arange(case.seq)[None, :] < lengths[:, None]).long()
        acts = torch.randn(case.rows, case.seq, case.d, generator=g)
        store.write_activation_batch("bench", i, {LAYER: acts}, mask)
        n_tokens += int(mask.sum())
    return n_tokens


def check_reader(store: LocalStore, case: Case) -> None:
    """Reader output == stored real tokens as a multiset (compared via sorted row sums and a checksum)."""
    stored = []
    for i in store.list_batches("bench"):
        acts, mask = store.load_batch("bench", i, LAYER)
        stored.append(acts[mask.bool()])
    want = torch.cat(stored)
    got = torch.cat(list(store.activation_reader("bench", LAYER, case.batch, drop_last=False)))
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.equal(got.sum(1).sort().values, want.sum(1).sort().values)
    assert torch.allclose(got.sum(0), want.sum(0), rtol=1e-4, atol=1e-2)


def plain_encode(x, W_enc, b_enc, b_dec, k):
    values, indices = ((x - b_dec) @ W_enc.T + b_enc).topk(k, dim=-1)
    return TopKCode(values.relu(), indices, None, None)


def plain_decode(values, indices, W_dec, b_dec):
    return torch.nn.functional.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec


def make_step(case: Case, encode=topk_encode, decode=sparse_decode):
    g = torch.Generator().manual_seed(1)
    W_dec = torch.randn(case.n_latents, case.d, generator=g)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).requires_grad_()
    W_enc = W_dec.detach().clone().requires_grad_()
    b_enc = torch.zeros(case.n_latents, requires_grad=True)
    b_dec = torch.zeros(case.d, requires_grad=True)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=1e-4)
    x = torch.randn(case.batch, case.d, generator=g)

    def step() -> None:
        code = encode(x, W_enc, b_enc, b_dec, case.k)
        recon = decode(code.values, code.indices, W_dec, b_dec)
        loss = (recon - x).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_median(fn, min_run_time: float) -> float:
    fn()  # warm-up: first-call allocations, page cache, kernel selection
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def run_case(case: Case, min_run_time: float) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp, fsync=False)
        n_tokens = write_run(store, case)
        check_reader(store, case)
        n_batches = n_tokens // case.batch
        step_impl = "mi_crow.ops"
        try:
            step_s = time_median(make_step(case), min_run_time)
        except RuntimeError as exc:  # keep the data-path figures even when the ops layer is broken meanwhile
            step_impl = f"plain PyTorch topk + embedding_bag (mi_crow.ops failed: {str(exc)[:80]})"
            step_s = time_median(make_step(case, plain_encode, plain_decode), min_run_time)

        resident = torch.randn(n_tokens, case.d)

        def in_memory() -> None:
            resident.index_select(0, torch.randint(0, n_tokens, (case.batch,)))

        rows = [{"path": "in-memory index_select", "s_per_batch": time_median(in_memory, min_run_time)}]
        variants = [("reader shuffled, buffer 2^18", dict(shuffle=True, buffer_tokens=2**18)),
                    ("reader shuffled, buffer 2^15", dict(shuffle=True, buffer_tokens=2**15)),
                    ("reader shuffled, buffer 2^15, prefetch", dict(shuffle=True, buffer_tokens=2**15, prefetch=True)),
                    ("reader unshuffled", dict(shuffle=False))]
        for label, kwargs in variants:
            def epoch(kwargs=kwargs) -> None:
                for _ in store.activation_reader("bench", LAYER, case.batch, **kwargs):
                    pass

            rows.append({"path": label, "s_per_batch": time_median(epoch, min_run_time) / n_batches})
        for row in rows:
            row.update(asdict(case), n_tokens=n_tokens, step_s=step_s, step_impl=step_impl,
                       tokens_per_s=case.batch / row["s_per_batch"], overhead_vs_step=row["s_per_batch"] / step_s)
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short timing (smoke run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases, min_run_time = (QUICK, 0.2) if args.quick else (FULL, 2.0)
    results = [row for case in cases for row in run_case(case, min_run_time)]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ops backends {backends()}")
    print(f"SAE step implemented with: {results[0]['step_impl']}\n")
    print("| d | n_latents | k | batch | run tokens | data path | ms/batch | Mtok/s | SAE step ms | cost vs step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['d']} | {r['n_latents']} | {r['k']} | {r['batch']} | {r['n_tokens']} | {r['path']} | "
              f"{r['s_per_batch'] * 1e3:.2f} | {r['tokens_per_s'] / 1e6:.2f} | {r['step_s'] * 1e3:.1f} | "
              f"{r['overhead_vs_step'] * 100:.1f}% |")
    out = Path(__file__).resolve().parent / "results" / ("bench_reader_quick.json" if args.quick else "bench_reader.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "backends": backends(), "results": results},
                              indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
