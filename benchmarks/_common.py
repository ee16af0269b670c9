"""Helpers shared by the benchmark scripts: the SAE shape, the results folder, timing and table/CSV writing.

The scripts run as ``python benchmarks/<name>.py``; they import this module as ``_common`` after putting the
``benchmarks`` folder on ``sys.path``. It imports only torch (never ``mi_crow.ops``), so
``bench_triton_ops.py --interpret`` can still set ``TRITON_INTERPRET`` before Triton is first imported.
"""

from __future__ import annotations

import csv
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Shape:
    batch: int
    d: int
    n: int
    k: int
    k_aux: int = 256


def median_seconds(fn, min_run_time: float) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()  # warm-up (also initialises optimizer state and the oneDNN/MKL caches)
    once = time.perf_counter() - start
    timer = Timer("fn()", globals={"fn": fn})
    # At least ~3 runs even for the slowest variant.
    return timer.blocked_autorange(min_run_time=max(min_run_time, 3 * once)).median


def markdown(rows: list[dict]) -> str:
    """A Markdown table with the keys of the first row as columns (a key missing in a row gives an empty cell)."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def machine_meta() -> dict:
    """torch version, intra-op threads and processor name, for a result file's ``meta``."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()}


def write_csv(path: Path, rows: Iterable[dict], fieldnames: list[str]) -> None:
    """Write ``rows`` to ``path`` as CSV with a header of ``fieldnames``."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
