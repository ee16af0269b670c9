"""Question: what does ``lm.activations.save`` cost next to a bare forward pass over the same texts?

For each model (the tiny GPT-2 from ``mi_crow.testing``; the embedded default SmolLM2-135M when
``mi_crow.defaults`` can load it) and the same texts, batch size and max length, we time one pass over the texts:

* ``bare forward``: tokenizer + ``model(**inputs)`` under ``no_grad``, no hooks, the whole model (LM head included) --
  what a user would run without mi_crow;
* ``bare forward to layer``: the same, but stopped by a plain torch hook right after the deepest saved layer -- the
  least work any saver must do, so ``save / this`` isolates what hooks, copies and file writes cost;
* ``save 1 layer``: ``lm.activations.save`` of the last transformer block into a fresh ``LocalStore`` run (fsync on,
  the store's default), progress bar off;
* ``save 3 layers``: the same with blocks 0, ``n/2`` and the last one (same deepest layer, 3x the data);
* ``save 1 layer, no fsync``: ``LocalStore(fsync=False)``, to show what durability costs.

Timing: each case runs once to warm up, then the cases take turns ``repeats`` times (so load from other processes
falls on all alike), each timed with ``torch.utils.benchmark.Timer.timeit(1)`` around one whole pass (a fresh run id
every time; the previous run is deleted outside the timed region); the median is reported as tokens/s (real, non-padding tokens). Before timing, the
saved activations of one batch are checked against ``output_hidden_states`` of a plain forward.

Targets (issue 2): save 1 layer within 10% of the bare forward on the default model; 3 layers within 5% of 1 layer.

Usage: ``python benchmarks/bench_save.py [--quick] [--no-default]``; writes ``benchmarks/results/bench_save[_quick]
.json`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.benchmark import Timer

from mi_crow.language_model import LanguageModel
from mi_crow.store import LocalStore
from mi_crow.testing import SAMPLE_TEXTS, make_tiny_gpt2_lm

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    model: str
    case: str
    layers: int
    tokens: int
    seconds: float
    tokens_per_s: float
    vs_bare: float
    vs_bare_to_layer: float
    cpu_seconds: float
    cpu_vs_bare: float


class _Stop(Exception):
    pass


def make_texts(n: int, corpus: list[str] | None) -> list[str]:
    source = corpus if corpus else SAMPLE_TEXTS
    # Join neighbouring sentences so texts are long enough for max_length truncation to matter.
    return [" ".join(source[(i * 3 + j) % len(source)] for j in range(6)) for i in range(n)]


def bare_forward(lm: LanguageModel, texts: list[str], batch_size: int, max_length: int, stop_at: str | None) -> int:
    handle = None
    if stop_at is not None:

        def stop(module: Any, args: Any, output: Any) -> None:
            raise _Stop

        handle = lm.layers.get_module(stop_at).register_forward_hook(stop)
    tokens = 0
    try:
        for start in range(0, len(texts), batch_size):
            enc = lm.tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
                padding_side="right",
            )
            tokens += int(enc["attention_mask"].sum())
            with torch.no_grad():
                try:
                    lm.model(**enc, use_cache=False)
                except _Stop:
                    pass
    finally:
        if handle is not None:
            handle.remove()
    return tokens


def median_seconds(
    fns: dict[str, Callable[[], Any]], cleanup: Callable[[], None], repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall seconds and median process CPU seconds (all threads) of one call of each function.

    The cases take turns so that load from other processes on a shared machine falls on all of them alike; CPU
    seconds are less disturbed by such load than wall time and count the writer thread's work too.
    """
    for fn in fns.values():  # warm-up
        fn()
        cleanup()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            measurement = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).timeit(1)
            cpu[name].append(time.process_time() - start)
            wall[name].append(measurement.median)
            cleanup()
    return ({n: statistics.median(v) for n, v in wall.items()}, {n: statistics.median(v) for n, v in cpu.items()})


def check_saved(lm: LanguageModel, store: LocalStore, texts: list[str], layer: int, batch_size: int,
                max_length: int) -> None:
    run_id = lm.activations.save(texts[:batch_size], layer, run_id="check", batch_size=batch_size,
                                 max_length=max_length, progress=False)
    out, enc = lm.inference.execute_inference(texts[:batch_size], max_length=max_length, output_hidden_states=True)
    name = lm.layers.resolve(layer)
    saved = store.load_batch(run_id, 0, name)
    # hidden_states[-1] of HF models is after the final norm; the block's raw output is compared for inner blocks.
    ref = out.hidden_states[lm.layers.block_names.index(name) + 1] if layer != -1 else None
    if ref is not None:  # real tokens only: format 2 stores no padding (zeros in the padded view)
        real = enc["attention_mask"].bool()
        torch.testing.assert_close(saved.activations[real], ref[real].to(saved.activations.dtype), atol=1e-4,
                                   rtol=1e-4)
    assert torch.equal(saved.attention_mask, enc["attention_mask"])
    store.delete_run(run_id)


def bench_model(label: str, make_lm: Callable[[LocalStore], LanguageModel], texts: list[str], batch_size: int,
                max_length: int, repeats: int, workdir: Path) -> list[Row]:
    stores = {True: LocalStore(workdir / f"{label}-fsync"), False: LocalStore(workdir / f"{label}-nofsync", fsync=False)}
    lm = make_lm(stores[True])
    n = lm.layers.num_blocks
    last = lm.layers.block_names[-1]
    three = sorted({0, n // 2, n - 1})
    check_saved(lm, stores[True], texts, n // 2, batch_size, max_length)

    counter = {"i": 0}

    def cleanup() -> None:
        for store in stores.values():
            for run in store.list_runs():
                store.delete_run(run)

    def save(layers: list[int], fsync: bool) -> Callable[[], None]:
        def run() -> None:
            counter["i"] += 1
            lm.store = stores[fsync]
            lm.activations.save(texts, layers, run_id=f"bench-{counter['i']}", batch_size=batch_size,
                                max_length=max_length, progress=False)

        return run

    tokens = bare_forward(lm, texts, batch_size, max_length, None)
    cases = [
        ("bare forward", 0, lambda: bare_forward(lm, texts, batch_size, max_length, None)),
        ("bare forward to layer", 0, lambda: bare_forward(lm, texts, batch_size, max_length, last)),
        ("save 1 layer", 1, save([n - 1], True)),
        ("save 3 layers", len(three), save(three, True)),
        ("save 1 layer, no fsync", 1, save([n - 1], False)),
    ]
    seconds, cpu = median_seconds({name: fn for name, _, fn in cases}, cleanup, repeats)
    rows = []
    for name, n_layers, _ in cases:
        s, c = seconds[name], cpu[name]
        rows.append(Row(label, name, n_layers, tokens, s, tokens / s, s / seconds["bare forward"],
                        s / seconds["bare forward to layer"], c, c / cpu["bare forward"]))
    return rows


def load_default(store: LocalStore) -> LanguageModel | None:
    try:
        from mi_crow.defaults import load_default_model
    except ImportError:
        return None
    return load_default_model(store=store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: the tiny model, few texts")
    parser.add_argument("--no-default", action="store_true", help="skip the embedded default model")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per case (tiny model)")
    parser.add_argument("--default-repeats", type=int, default=3, help="timed passes per case (default model)")
    parser.add_argument("--default-texts", type=int, default=8, help="texts for the default model (batch 8, 64 tok)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--tiny-texts", type=int, default=128, help="texts for the tiny model (batch 16, 128 tok)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    repeats = args.repeats or (7 if args.quick else 5)
    corpus = None
    if not args.quick:
        try:
            from mi_crow.defaults import default_corpus_paragraphs

            corpus = default_corpus_paragraphs()
        except Exception as exc:  # noqa: BLE001 - the corpus is optional for this benchmark
            print(f"default corpus unavailable ({exc}); using mi_crow.testing.SAMPLE_TEXTS")
    rows: list[Row] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench_save-"))
    try:
        tiny_texts = make_texts(32 if args.quick else args.tiny_texts, corpus)
        rows += bench_model("tiny-gpt2 (3x32)", lambda s: make_tiny_gpt2_lm(store=s), tiny_texts, 16,
                            64 if args.quick else 128, repeats, workdir)
        if not args.no_default and not args.quick:
            probe = None
            try:
                probe = load_default(LocalStore(workdir / "probe"))
            except Exception as exc:  # noqa: BLE001 - reported, then skipped
                print(f"default model unavailable ({exc}); skipped")
            if probe is not None:
                del probe
                texts = make_texts(args.default_texts, corpus)
                rows += bench_model("SmolLM2-135M (30x576)", load_default, texts, 8, 64, args.default_repeats, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    header = ("| model | case | layers | tokens | median wall s | tokens/s | wall x bare | wall x bare to layer | "
              "median CPU s | CPU x bare |")
    print(f"torch threads: {torch.get_num_threads()}, repeats: {repeats}")
    print(header)
    print("|" + "---|" * 10)
    for r in rows:
        print(f"| {r.model} | {r.case} | {r.layers} | {r.tokens} | {r.seconds:.3f} | {r.tokens_per_s:,.0f} | "
              f"{r.vs_bare:.3f} | {r.vs_bare_to_layer:.3f} | {r.cpu_seconds:.3f} | {r.cpu_vs_bare:.3f} |")
    for model in dict.fromkeys(r.model for r in rows):
        by = {r.case: r for r in rows if r.model == model}
        one, three = by["save 1 layer"], by["save 3 layers"]
        print(f"{model}: save 1 layer = {one.vs_bare:.3f}x bare forward wall ({one.cpu_vs_bare:.3f}x CPU), "
              f"{one.vs_bare_to_layer:.3f}x forward to the layer; 3 layers = {three.seconds / one.seconds:.3f}x "
              f"1 layer wall ({three.cpu_seconds / one.cpu_seconds:.3f}x CPU)")

    RESULTS.mkdir(exist_ok=True)
    stem = "bench_save_quick" if args.quick else "bench_save"
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor(), "repeats": repeats}
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


if __name__ == "__main__":
    main()
