"""Question: does the store's cost per batch stay flat at 100k batches, how many bytes does a run take, and how fast
does the reader stream it?

Three measurements, each through the public store API (no model: synthetic activations):

1. **Scale** -- ``--batches`` (100k) small format-2 batches (``--tokens`` real tokens x ``--d`` in bfloat16, token
   ids, 1 layer) written with ``store.write_packed_batch``; the wall time and the CPU time (``thread_time``, less
   sensitive to other jobs on a shared machine) of every call are recorded, and the median and mean of the first
   1,000 are compared with the last 1,000 (target: within 10%). Because the load of a shared machine drifts over
   the minutes between the two windows, a paired measurement follows: 1,000 more batches of the 100k-batch run
   alternate call by call with the first 1,000 batches of a fresh run, and the ratio of their medians is the cost
   of a batch at 100k batches against at 0 under the same load. The same paired probe (``--probe`` batches a side)
   runs every ``--probe-every`` batches along the run, so a real growth of the cost shows as a rising ratio while
   load drift does not (the probe's own batches of the big run are left out of the first/last windows). CPU time
   (``thread_time``) is reported beside wall time everywhere. The same is done for format 1
   (``write_activation_batch``, which rewrote ``meta.json`` per batch) over ``--v1-batches`` batches, to show what
   was fixed. Then the one-off costs at the end: ``finish_packed_run`` (index + meta), reading the records from the
   index, and rebuilding them from the markers (what a reader does after a crash).
2. **Bytes on disk** -- a run of realistic shards (``--shards`` x ``--shard-tokens`` tokens, d=576, bfloat16):
   bytes of the layer files, and of the whole run folder, against real tokens x d x 2 (+ 4 bytes of token id per
   token). Apparent sizes (``st_size``) and allocated blocks (``st_blocks``) both.
3. **Reader** -- one shuffled epoch of that run with ``store.activation_reader`` (batch 4096, float32 out, the
   default 1 GiB byte-sized buffer with read-ahead) against the least work that gives the same vectors (each file
   loaded with ``safetensors.load_file`` and converted to float32, in order) and against reading the files' bytes
   (the disk/page-cache speed): tokens/s and MB/s. Files are in the page cache (just written).

``fsync`` is off for the scale run (it measures the store's own work, not the disk's flush latency, which is the
same per batch whatever the run size; put ``--dir`` on a tmpfs such as /dev/shm to leave the disk out entirely)
and on for the bytes/reader run. Usage:
``python benchmarks/bench_store_scale.py [--quick] [--dir /path]``; writes
``benchmarks/results/bench_store_scale[_quick].json``. On a loaded, shared machine single calls are noisy: compare
the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_meta  # noqa: E402

from mi_crow.store import LocalStore  # noqa: E402

LAYER = "model.layers.3"


def _summary(times: list[float], window: int) -> dict:
    first, last = times[:window], times[-window:]
    out = {
        "batches": len(times),
        "window": window,
        "first_median_us": statistics.median(first) * 1e6,
        "last_median_us": statistics.median(last) * 1e6,
        "first_mean_us": statistics.fmean(first) * 1e6,
        "last_mean_us": statistics.fmean(last) * 1e6,
    }
    out["last_vs_first_median"] = out["last_median_us"] / out["first_median_us"]
    out["last_vs_first_mean"] = out["last_mean_us"] / out["first_mean_us"]
    return out


def _paired(store: LocalStore, big_run: str, first_index: int, fresh_run: str, n: int, d: int, acts, offsets,
            ids) -> dict:
    """``n`` batches appended to ``big_run`` (from ``first_index``) alternating call by call with the first ``n``
    batches of a new run ``fresh_run``: both face the same machine load, so the ratio of their medians is the cost
    of a batch at the big run's size against at 0, drift removed. Wall and CPU (thread) time both."""
    store.create_packed_run(fresh_run, {"bench": "store_scale"}, {LAYER: d}, torch.bfloat16)
    walls: dict[str, list[float]] = {"big": [], "fresh": []}
    cpus: dict[str, list[float]] = {"big": [], "fresh": []}
    for j in range(n):
        # Alternate which goes first, so that neither always follows the other's page-cache / allocator state.
        pair = (("big", big_run, first_index + j), ("fresh", fresh_run, j))
        for name, run, index in (pair if j % 2 == 0 else pair[::-1]):
            start, start_cpu = time.perf_counter(), time.thread_time()
            store.write_packed_batch(run, index, acts, offsets, ids, forward_batches=[index])
            cpus[name].append(time.thread_time() - start_cpu)
            walls[name].append(time.perf_counter() - start)
    med = statistics.median
    return {"at_n_median_us": med(walls["big"]) * 1e6, "at_0_median_us": med(walls["fresh"]) * 1e6,
            "at_n_vs_at_0_median": med(walls["big"]) / med(walls["fresh"]),
            "at_n_vs_at_0_mean": statistics.fmean(walls["big"]) / statistics.fmean(walls["fresh"]),
            "cpu_at_n_median_us": med(cpus["big"]) * 1e6, "cpu_at_0_median_us": med(cpus["fresh"]) * 1e6,
            "cpu_at_n_vs_at_0_median": med(cpus["big"]) / med(cpus["fresh"])}


def scale_v2(root: Path, n_batches: int, tokens: int, d: int, window: int, probe_every: int, probe: int) -> dict:
    store = LocalStore(root, fsync=False)
    store.create_packed_run("scale", {"bench": "store_scale"}, {LAYER: d}, torch.bfloat16)
    acts = {LAYER: torch.randn(tokens, d).to(torch.bfloat16)}
    offsets = torch.tensor([0, tokens // 2, tokens])
    ids = torch.arange(tokens)
    times, cpu = [], []
    clock = time.perf_counter
    probes: dict[str, dict] = {}
    i = 0
    while i < n_batches:
        if probe_every and i and i % probe_every == 0 and f"{i}" not in probes:
            # A paired probe at this size: `probe` batches of the run (they are batches i.. of it, timed apart from
            # the series) against a fresh run's first ones; deleted afterwards.
            probes[f"{i}"] = _paired(store, "scale", i, f"probe{i}", probe, d, acts, offsets, ids)
            store.delete_run(f"probe{i}")
            i += probe
            print(f"  v2: probe at {i - probe} batches: at n / at 0 median {probes[f'{i - probe}']['at_n_vs_at_0_median']:.3f}"
                  f" wall, {probes[f'{i - probe}']['cpu_at_n_vs_at_0_median']:.3f} cpu", flush=True)
            continue
        start, start_cpu = clock(), time.thread_time()
        store.write_packed_batch("scale", i, acts, offsets, ids, forward_batches=[i])
        cpu.append(time.thread_time() - start_cpu)
        times.append(clock() - start)
        i += 1
        if i % 10000 == 0:
            print(f"  v2: {i} batches, last 1000 median {statistics.median(times[-1000:]) * 1e6:.0f} us wall, "
                  f"{statistics.median(cpu[-1000:]) * 1e6:.0f} us cpu", flush=True)
    n_batches = i
    out = _summary(times, window)
    out["probes"] = probes
    if probes:
        ratios = [p["cpu_at_n_vs_at_0_median"] for p in probes.values()]
        walls = [p["at_n_vs_at_0_median"] for p in probes.values()]
        out["probes_cpu_ratio_median"] = statistics.median(ratios)
        out["probes_wall_ratio_median"] = statistics.median(walls)
    out["cpu"] = _summary(cpu, window)
    step = max(1, n_batches // 10)
    out["cpu_median_us_per_window"] = {f"{i}-{i + window}": statistics.median(cpu[i:i + window]) * 1e6
                                      for i in range(0, n_batches - window + 1, step)}
    # Paired: the next `window` batches of this run alternate with the first `window` batches of a fresh run, so
    # both face the same machine load; the ratio is the cost of a batch at n_batches vs at 0, drift removed.
    out["paired"] = _paired(store, "scale", n_batches, "fresh", window, d, acts, offsets, ids)
    n_batches += window
    start = clock()
    rebuilt = store.read_run_meta("scale")  # status "writing": rebuilt from the markers (crash recovery)
    out["rebuild_from_markers_s"] = clock() - start
    start = clock()
    store.finish_packed_run("scale")
    out["finish_s"] = clock() - start
    start = clock()
    meta = store.read_run_meta("scale")
    out["read_records_from_index_s"] = clock() - start
    start = clock()
    store.load_batch("scale", n_batches - 1, LAYER)
    out["load_last_batch_s"] = clock() - start
    assert meta["batch_count"] == rebuilt["batch_count"] == n_batches
    assert meta["n_tokens"] == n_batches * tokens
    return out


def scale_v1(root: Path, n_batches: int, tokens: int, d: int, window: int) -> dict:
    store = LocalStore(root, fsync=False)
    acts = {LAYER: torch.randn(2, tokens // 2, d).to(torch.bfloat16)}
    mask = torch.ones(2, tokens // 2, dtype=torch.int64)
    times, cpu = [], []
    for i in range(n_batches):
        start, start_cpu = time.perf_counter(), time.thread_time()
        store.write_activation_batch("scale_v1", i, acts, mask)
        cpu.append(time.thread_time() - start_cpu)
        times.append(time.perf_counter() - start)
    return {**_summary(times, window), "cpu": _summary(cpu, window)}


def _sizes(folder: Path, pattern: str) -> tuple[int, int]:
    apparent = allocated = 0
    for path in folder.glob(pattern):
        if path.is_file():
            st = path.stat()
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def bytes_and_reader(root: Path, shards: int, shard_tokens: int, d: int) -> dict:
    store = LocalStore(root, fsync=True)
    store.create_packed_run("real", {"bench": "bytes"}, {LAYER: d}, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    n_tokens = 0
    for i in range(shards):
        lengths = torch.randint(16, 257, (shard_tokens // 128,), generator=g)
        lengths = lengths[: int((lengths.cumsum(0) <= shard_tokens).sum())]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        n = int(offsets[-1])
        store.write_packed_batch("real", i, {LAYER: torch.randn(n, d, generator=g).to(torch.bfloat16)}, offsets,
                                 torch.randint(0, 49152, (n,), generator=g))
        n_tokens += n
    store.finish_packed_run("real")
    run = root / "activations" / "real"
    payload = n_tokens * d * 2
    layer_apparent, layer_alloc = _sizes(run, f"batch_*/{LAYER}/activations.safetensors")
    all_apparent, all_alloc = _sizes(run, "**/*")
    out = {
        "shards": shards, "d": d, "n_tokens": n_tokens, "payload_bytes": payload,
        "layer_files_vs_payload": layer_apparent / payload,
        "layer_files_allocated_vs_payload": layer_alloc / payload,
        "run_vs_payload_plus_token_ids": all_apparent / (payload + 4 * n_tokens),
        "run_allocated_vs_payload_plus_token_ids": all_alloc / (payload + 4 * n_tokens),
        "run_bytes": all_apparent,
    }
    # Reader: one shuffled epoch (default 1 GiB byte-sized buffer, read-ahead), float32 out.
    files = sorted(run.glob(f"batch_*/{LAYER}/activations.safetensors"))
    start = time.perf_counter()
    raw_bytes = sum(len(f.read_bytes()) for f in files)
    bytes_s = time.perf_counter() - start
    start = time.perf_counter()
    # the least work that yields float32 vectors: load each file and convert it (no shuffle, no batching)
    raw = sum(load_file(f)["activations"].to(torch.float32).numel() for f in files)
    raw_s = time.perf_counter() - start
    reader = store.activation_reader("real", LAYER, 4096, dtype=torch.float32, seed=0)
    start = time.perf_counter()
    seen = sum(x.shape[0] for x in reader)
    read_s = time.perf_counter() - start
    assert raw == n_tokens * d and seen == (n_tokens // 4096) * 4096
    out.update({
        "reader_tokens_per_s": seen / read_s,
        "reader_MB_per_s_stored": seen * d * 2 / read_s / 1e6,
        "read_bytes_MB_per_s": raw_bytes / bytes_s / 1e6,
        "load_and_convert_tokens_per_s": n_tokens / raw_s,
        "load_and_convert_MB_per_s_stored": payload / raw_s / 1e6,
        "reader_vs_load_and_convert": (seen / read_s) / (n_tokens / raw_s),
        "reader_vs_read_bytes": (seen * d * 2 / read_s) / (raw_bytes / bytes_s),
        "reader_buffer_tokens": reader.buffer_tokens,
    })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k batches, small bytes run (a smoke test)")
    parser.add_argument("--dir", help="where to write the runs (default: a temporary folder)")
    parser.add_argument("--batches", type=int, default=100_000)
    parser.add_argument("--v1-batches", type=int, default=3_000)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per batch of the scale run")
    parser.add_argument("--d", type=int, default=64, help="width of the scale run")
    parser.add_argument("--probe-every", type=int, default=10_000,
                        help="a paired probe (at n vs a fresh run) every this many batches (0: none)")
    parser.add_argument("--probe", type=int, default=200, help="batches of each side of a probe")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.v1_batches, args.probe_every = 10_000, 2_000, 2_500
    window = min(1000, args.batches // 4)
    shards, shard_tokens = (4, 8192) if args.quick else (24, 32768)
    base = Path(tempfile.mkdtemp(prefix="bench_store_scale-", dir=args.dir))
    try:
        print(f"scale: {args.batches} format-2 batches of {args.tokens} tokens x d={args.d} bf16 in {base}")
        v2 = scale_v2(base / "v2", args.batches, args.tokens, args.d, window, args.probe_every, args.probe)
        print(json.dumps(v2, indent=1))
        print(f"format 1 for comparison: {args.v1_batches} batches")
        v1 = scale_v1(base / "v1", args.v1_batches, args.tokens, args.d, min(500, args.v1_batches // 4))
        print(json.dumps(v1, indent=1))
        shutil.rmtree(base / "v2", ignore_errors=True)
        shutil.rmtree(base / "v1", ignore_errors=True)
        print(f"bytes and reader: {shards} shards of ~{shard_tokens} tokens, d=576 bf16")
        real = bytes_and_reader(base / "real", shards, shard_tokens, 576)
        print(json.dumps(real, indent=1))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result = {
        "meta": {**machine_meta(), "cpus": os.cpu_count(), "note": "shared 2-core machine; wall times are noisy",
                 "command": "python " + " ".join(sys.argv)},
        "scale_v2": v2, "scale_v1": v1, "bytes_and_reader": real,
        "targets": {"paired_at_100k_vs_at_0_within_10pct": v2["paired"]["at_n_vs_at_0_median"] <= 1.10,
                    "paired_cpu_at_100k_vs_at_0_within_10pct": v2["paired"]["cpu_at_n_vs_at_0_median"] <= 1.10,
                    "last_vs_first_cpu_within_10pct": v2["cpu"]["last_vs_first_median"] <= 1.10,
                    "bytes_le_1.05x_plus_token_ids": real["run_vs_payload_plus_token_ids"] <= 1.05},
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_store_scale{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    print(f"per-batch store cost at {args.batches} batches vs at 0, paired (median): "
          f"{v2['paired']['at_n_vs_at_0_median']:.3f}x wall ({v2['paired']['at_0_median_us']:.0f} -> "
          f"{v2['paired']['at_n_median_us']:.0f} us), {v2['paired']['cpu_at_n_vs_at_0_median']:.3f}x cpu")
    if v2["probes"]:
        print("paired probes along the run (at n / at 0, median; cpu): " + ", ".join(
            f"{n}: {p['cpu_at_n_vs_at_0_median']:.2f}" for n, p in v2["probes"].items()))
    print(f"per-batch store cost, last 1000 vs first 1000 (median): format 2 {v2['last_vs_first_median']:.3f}x wall "
          f"({v2['first_median_us']:.0f} -> {v2['last_median_us']:.0f} us), {v2['cpu']['last_vs_first_median']:.3f}x "
          f"cpu ({v2['cpu']['first_median_us']:.0f} -> {v2['cpu']['last_median_us']:.0f} us); format 1 over {args.v1_batches} batches "
          f"{v1['last_vs_first_median']:.2f}x ({v1['first_median_us']:.0f} -> {v1['last_median_us']:.0f} us)")
    print(f"bytes: run / (tokens x d x 2 + 4 x tokens) = {real['run_vs_payload_plus_token_ids']:.4f} "
          f"(allocated {real['run_allocated_vs_payload_plus_token_ids']:.4f}); reader "
          f"{real['reader_tokens_per_s'] / 1e6:.2f} M tok/s = {real['reader_vs_load_and_convert']:.2f}x loading and "
          f"converting the files alone, {real['reader_vs_read_bytes']:.2f}x reading their bytes")


if __name__ == "__main__":
    main()
