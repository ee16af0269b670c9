"""Question: what does a build of the C++ extension cost or save on this CPU, op by op, next to another build?

Runs ``bench_ops.py``'s mi_crow cases (the ops are checked against the references first) once per build and repeat,
each in a fresh process that imports this checkout's ``mi_crow`` with the given ``_C`` library in place of the
built one. Builds take turns within every repeat, so a machine whose speed drifts (a shared VM) does not favour
one build; a case's time for a build is the median over the repeats, and the ratio is that time over the first
build's. With one thread (the default) a case is timed by the thread's CPU time (median of at least five calls),
which other processes on a loaded machine do not inflate; with more threads, by wall time as in bench_ops.py.

Usage::

    python benchmarks/bench_builds.py --build portable=mi_crow/_C.cpython-311-x86_64-linux-gnu.so \\
        --build native=/tmp/native/_C.cpython-311-x86_64-linux-gnu.so [--build NAME=PATH:ISA] \\
        [--repeats 3] [--threads 1] [--quick]

``NAME=PATH:ISA`` runs that library with ``MI_CROW_CPU_ISA=ISA`` (e.g. ``:baseline`` to time the portable
baseline kernels on a CPU that has AVX-512). Prints a Markdown table and writes
``benchmarks/results/bench_builds[_quick].json`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, markdown, write_csv  # noqa: E402

_CHILD = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads({threads})
sys.path.insert(0, {bench!r})
import bench_ops
import mi_crow.ops as ops

def cpu_median(fn, min_run_time):
    # The calling thread's CPU time: with one intra-op thread that is all the work, and other processes on a
    # shared machine do not add to it (they still share caches and memory bandwidth).
    fn()
    times = []
    while sum(times) < min_run_time or len(times) < 5:
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times)

if {cpu_time}:
    bench_ops.median_seconds = cpu_median
assert ops.backends("cpu")["topk_encode"] == "cpp", ops.backends("cpu")
rows = []
for shape in (bench_ops.QUICK if {quick} else bench_ops.FULL):
    rows += bench_ops.run_shape(shape, {quick}, mi_crow_only=True)
info = ops.cpu_isa()
print(json.dumps({{"rows": rows, "cpu_isa": info._asdict() if info else None}}))
"""


def _overlay(library: Path, where: Path) -> Path:
    """A copy of this checkout's mi_crow package with ``library`` as its ``_C``."""
    package = where / "mi_crow"
    shutil.copytree(ROOT / "mi_crow", package, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copy(library, package / library.name)
    return where


def _run(path: Path, isa: str | None, threads: int, quick: bool) -> dict:
    cpu_time = threads == 1
    env = {k: v for k, v in os.environ.items() if not k.startswith("MI_CROW_")}
    env["PYTHONPATH"] = str(path)
    env["OMP_NUM_THREADS"] = str(threads)
    if isa:
        env["MI_CROW_CPU_ISA"] = isa
    code = _CHILD.format(threads=threads, bench=str(HERE), quick=quick, cpu_time=cpu_time)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=path, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="append", required=True, help="NAME=PATH[:ISA] of a _C library")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads; with 1 (the default) the time is the thread's CPU time, not wall time")
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    args = parser.parse_args()
    builds = []
    for spec in args.build:
        name, _, rest = spec.partition("=")
        path, _, isa = rest.partition(":")
        builds.append((name, Path(path).resolve(), isa or None))

    times: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    isas: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        overlays = {name: _overlay(lib, Path(tmp) / name) for name, lib, _ in builds}
        for repeat in range(args.repeats):
            for name, _, isa in builds:
                result = _run(overlays[name], isa, args.threads, args.quick)
                isas[name] = result["cpu_isa"]
                for row in result["rows"]:
                    key = (row["shape"], row["op"], row["implementation"])
                    times.setdefault(key, {}).setdefault(name, []).append(row["ms"])
                print(f"repeat {repeat + 1}/{args.repeats}: {name} done", file=sys.stderr)

    first = builds[0][0]
    rows = []
    for (shape, op, impl), per_build in times.items():
        row = {"shape": shape, "op": op, "implementation": impl}
        base = statistics.median(per_build[first])
        for name, _, _ in builds:
            ms = statistics.median(per_build[name])
            row[f"{name} ms"] = round(ms, 2)
            if name != first:
                row[f"{name} / {first}"] = round(ms / base, 3)
        rows.append(row)
    clock = "thread CPU time" if args.threads == 1 else "wall time"
    print(f"{args.threads} thread(s), {clock}, {args.repeats} repeats, median ms; builds: "
          + "; ".join(f"{n} = {lib.name}" + (f" with MI_CROW_CPU_ISA={i}" if i else "") + f" ({isas.get(n)})"
                      for n, lib, i in builds) + "\n")
    print(markdown(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "bench_builds_quick" if args.quick else "bench_builds"
    meta = {"threads": args.threads, "repeats": args.repeats, "clock": clock,
            "builds": {n: {"library": str(lib), "isa": i, "cpu_isa": isas.get(n)} for n, lib, i in builds}}
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    write_csv(RESULTS / f"{stem}.csv", rows, list(rows[0]))


if __name__ == "__main__":
    main()
