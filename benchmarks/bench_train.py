"""Question: what does the full SAE trainer cost on top of the bare training step, and what does a fixed-budget run
on the embedded default model reach?

Part 1 -- data-path overhead. A synthetic activation run is written to a temporary LocalStore (files of
``[8, 256, d]`` with ~10% padding). At the same shape, in the same process:

* ``ops bare step``: the accelerated-ops benchmark's step (``bench_step.loss_fast`` + fused Adam) on one in-memory
  batch -- encode, decode, MSE, backward, Adam, nothing else;
* ``trainer step``: ``SaeTrainer.train_step`` on one in-memory batch -- the trainer's full recipe (FVU loss,
  dead-latent counters, decoder-gradient projection, renormalisation), no data path;
* ``full trainer``: ``SaeTrainer.train(run_id, layer, config)`` streaming the run from the store (reader, shuffle
  buffer, padding removal, casting, non-finite check, metrics, history), timed end to end; median of repeated runs.

The bare steps are timed with ``torch.utils.benchmark.Timer.blocked_autorange`` (median after warm-up). The data-path
overhead is ``trainer step tokens/s / full trainer tokens/s - 1`` (target <= 10%).

Part 2 -- default model. Activations of the middle block of the embedded SmolLM2-135M over the default corpus are
saved, an SAE with ``n = 8 * 576``, ``k = 32`` is trained for a fixed token budget, and tokens/s, FVU, L0 and the
dead fraction are reported (training history), plus `evaluate` on held-out paragraphs (FVU, L0, dead fraction,
fraction of LM loss recovered).

Usage: ``python benchmarks/bench_train.py [--quick] [--skip-default]``; prints Markdown tables and writes
``benchmarks/results/bench_train[_quick].json`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae, evaluate
from mi_crow.ops import backends
from mi_crow.store import LocalStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402  (the accelerated-ops benchmark's bare step)
from _common import RESULTS, machine_meta, write_csv  # noqa: E402

LAYER = "layer"


@dataclass
class Case:
    d: int
    n: int
    k: int
    batch: int
    run_tokens: int
    steps: int


FULL = Case(d=576, n=8 * 576, k=32, batch=4096, run_tokens=98304, steps=24)
QUICK = Case(d=128, n=1024, k=16, batch=1024, run_tokens=16384, steps=32)


def write_synthetic_run(store: LocalStore, case: Case, seed: int = 0) -> str:
    """A run of files [8, 256, d] with ~10% right padding; real tokens are heavy-tailed, like residual streams."""
    g = torch.Generator().manual_seed(seed)
    run_id = f"synthetic_d{case.d}"
    per_file, index = 0, 0
    while per_file < case.run_tokens:
        acts = torch.randn(8, 256, case.d, generator=g) * (1 + torch.rand(8, 256, 1, generator=g) * 3)
        mask = torch.ones(8, 256, dtype=torch.int64)
        lengths = 256 - torch.randint(0, 52, (8,), generator=g)
        for row, length in enumerate(lengths.tolist()):
            mask[row, length:] = 0
        store.write_activation_batch(run_id, index, {LAYER: acts}, mask)
        per_file += int(mask.sum())
        index += 1
    return run_id


def median_seconds(fn, min_run_time: float) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up outside the measurement
    # Timer defaults to one thread; the full trainer runs with torch's current setting, so the bare steps must too.
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def train_config(case: Case, **overrides) -> SaeTrainingConfig:  # type: ignore[no-untyped-def]
    base = dict(
        batch_size=case.batch,
        n_tokens=case.steps * case.batch,
        lr=1e-3,
        b_dec_init="zeros",
        log_every=max(1, case.steps // 4),
        checkpoint_every=None,
        save_sae=False,
        progress=False,
        shuffle_buffer_tokens=max(case.batch * 4, 32768),
    )
    base.update(overrides)
    return SaeTrainingConfig(**base)


def part1(case: Case, quick: bool) -> list[dict]:
    min_time = 1.0 if quick else 5.0
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "store")
        run_id = write_synthetic_run(store, case)
        x = next(iter(store.activation_reader(run_id, LAYER, case.batch, seed=1)))

        shape = bench_step.Shape(case.batch, case.d, case.n, case.k)
        ops_sae = bench_step.Sae(shape)
        ops_s = median_seconds(lambda: bench_step.train_step(ops_sae, bench_step.loss_fast, x, case.k), min_time)

        cfg = train_config(case)
        trainer = SaeTrainer(TopKSae(case.n, case.d, case.k), store)
        trainer.prepare(cfg)
        k_aux = min(case.d // 2, case.n)
        # Check the trainer's step against the dense formula before timing it.
        check = trainer.compute_losses(x[:64])
        with torch.no_grad():
            sae = trainer.sae
            pre = (x[:64] - sae.b_dec) @ sae.W_enc.T + sae.b_enc
            top = pre.topk(case.k, dim=1)
            dense = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
            ref = ((x[:64] - dense @ sae.W_dec - sae.b_dec).pow(2).sum() / (x[:64] - x[:64].mean(0)).pow(2).sum())
        torch.testing.assert_close(check.fvu, ref, rtol=1e-4, atol=1e-6)
        # Isolated step and full runs are interleaved, so a change of machine load hits both alike.
        step_times, full_times, in_loop, steady = [], [], [], []
        for _ in range(3):
            step_times.append(median_seconds(lambda: trainer.train_step(x, 1e-3, k_aux=k_aux), min_time))
            run_trainer = SaeTrainer(TopKSae(case.n, case.d, case.k), store)
            inner = run_trainer.train_step
            spent = [0.0]

            def timed(*args, _inner=inner, _spent=spent, **kwargs):  # type: ignore[no-untyped-def]
                begin = time.perf_counter()
                out = _inner(*args, **kwargs)
                _spent[0] += time.perf_counter() - begin
                return out

            run_trainer.train_step = timed  # type: ignore[method-assign]
            start = time.perf_counter()
            result = run_trainer.train(run_id, LAYER, cfg)
            full_times.append(time.perf_counter() - start)
            in_loop.append(spent[0])
            steady.extend(r["tokens_per_s"] for r in result.history[1:])
        step_s = statistics.median(step_times)
        full_s = statistics.median(full_times) / case.steps
        loop_step_s = statistics.median(in_loop) / case.steps
        # Share of the end-to-end time spent outside the optimizer step, within the same runs.
        outside = statistics.median((f - i) / i for f, i in zip(full_times, in_loop))
    shape_name = f"B={case.batch} d={case.d} n={case.n} k={case.k}"
    rows = [
        {"shape": shape_name, "case": "ops bare step (bench_step)", "ms_per_step": ops_s * 1e3},
        {"shape": shape_name, "case": "trainer step (in memory)", "ms_per_step": step_s * 1e3},
        {"shape": shape_name, "case": "full trainer from store (end to end)", "ms_per_step": full_s * 1e3},
        {"shape": shape_name, "case": "  of which inside train_step", "ms_per_step": loop_step_s * 1e3},
        {
            "shape": shape_name,
            "case": "full trainer, steady windows (median)",
            "ms_per_step": case.batch / statistics.median(steady) * 1e3 if steady else float("nan"),
        },
    ]
    for row in rows:
        row["tokens_per_s"] = case.batch / (row["ms_per_step"] / 1e3)
        row["vs_trainer_step"] = row["ms_per_step"] / (step_s * 1e3)
        row["vs_ops_step"] = row["ms_per_step"] / (ops_s * 1e3)
    rows[3]["outside_step_share"] = outside
    return rows


def part2(quick: bool, n_texts: int, eval_texts: int, epochs: int, batch: int, store_dir: str | None) -> dict:
    from mi_crow import defaults

    with tempfile.TemporaryDirectory() as tmp:
        # A given store keeps the saved activations: a re-run with the same texts resumes (skips) the saving.
        store = LocalStore(Path(store_dir) if store_dir else Path(tmp) / "store")
        lm = defaults.load_default_model(store=store)
        layer = lm.layers.resolve(lm.layers.num_blocks // 2)
        paragraphs = defaults.default_corpus_paragraphs()
        train_texts, held_out = paragraphs[:n_texts], paragraphs[n_texts : n_texts + eval_texts]
        start = time.perf_counter()
        run_id = lm.activations.save(
            train_texts, layers=layer, run_id=f"default-mid-{n_texts}", batch_size=16, max_length=128,
            progress=not quick,
        )
        save_s = time.perf_counter() - start
        run_tokens = store.read_run_meta(run_id)["n_tokens"]
        d = lm.layers.width(layer)
        budget = max(batch, (run_tokens // batch) * batch * epochs)
        cfg = SaeTrainingConfig(
            batch_size=batch,
            n_tokens=budget,
            dead_window_tokens=max(batch, budget // 4),
            log_every=max(1, budget // batch // 8),
            checkpoint_every=None,
            progress=not quick,
            training_run_id="default-model-sae",
        )
        torch.manual_seed(0)
        sae = TopKSae(8 * d, d, 32)
        start = time.perf_counter()
        result = sae.train(store, run_id, layer, cfg)
        train_s = time.perf_counter() - start
        last = result.history[-1]
        metrics = evaluate(sae, lm, held_out, layer, batch_size=16, max_length=128)
    return {
        "model": "SmolLM2-135M-Instruct (embedded GGUF)",
        "layer": layer,
        "sae": f"n={8 * d} d={d} k=32",
        "run_tokens": run_tokens,
        "save_tokens_per_s": run_tokens / save_s,
        "budget_tokens": result.tokens,
        "train_s": train_s,
        "train_tokens_per_s": result.tokens / train_s,
        "final_window": {key: last[key] for key in ("loss", "fvu", "l0", "dead_fraction", "auxk_loss", "tokens_per_s")},
        "dead_window_tokens": cfg.dead_window_tokens,
        "eval_texts": len(held_out),
        "eval": metrics,
    }


def markdown(rows: list[dict]) -> str:
    out = ["| shape | case | ms/step | tokens/s | x trainer step | x ops step |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(
            f"| {r['shape']} | {r['case']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['vs_trainer_step']:.3f} | {r['vs_ops_step']:.3f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and a tiny default-model run")
    parser.add_argument("--skip-default", action="store_true", help="skip part 2 (the embedded default model)")
    parser.add_argument("--default-texts", type=int, default=None, help="corpus paragraphs for part 2's run")
    parser.add_argument("--default-epochs", type=int, default=None, help="passes over part 2's run")
    parser.add_argument("--default-batch", type=int, default=None, help="tokens per step in part 2")
    parser.add_argument("--store", default=None, help="keep part 2's activations in this store (re-runs reuse them)")
    parser.add_argument("--skip-overhead", action="store_true", help="skip part 1")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    case = QUICK if args.quick else FULL

    rows: list[dict] = []
    overhead = outside = None
    if not args.skip_overhead:
        rows = part1(case, args.quick)
        print(f"## Trainer data-path overhead (torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
        print(markdown(rows))
        overhead = rows[2]["ms_per_step"] / rows[1]["ms_per_step"] - 1
        outside = rows[3]["outside_step_share"]
        print(f"\nFull trainer end to end vs isolated trainer step: +{overhead * 100:.1f}%")
        print(f"Time outside train_step within the same runs (data path, metrics, history): +{outside * 100:.1f}% "
              "(target <= 10%)")

    default = None
    if not args.skip_default:
        try:
            n_texts = args.default_texts or (24 if args.quick else 240)
            epochs = args.default_epochs or (1 if args.quick else 4)
            batch = args.default_batch or 1024
            default = part2(args.quick, n_texts, 8 if args.quick else 48, epochs, batch, args.store)
        except (ImportError, FileNotFoundError) as exc:
            print(f"\n(default model not available: {exc})")
    if default is not None:
        ev, fw = default["eval"], default["final_window"]
        print(f"\n## Default model: {default['model']}, {default['layer']}, SAE {default['sae']}\n")
        print("| run tokens | budget tokens | train tokens/s | FVU (last window) | L0 | dead (window) | "
              "eval FVU | eval L0 | eval dead | loss clean | loss SAE | loss zero | recovered |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(
            f"| {default['run_tokens']} | {default['budget_tokens']} | {default['train_tokens_per_s']:.0f} | "
            f"{fw['fvu']:.3f} | {fw['l0']:.1f} | {fw['dead_fraction']:.3f} | {ev['fvu']:.3f} | {ev['l0']:.1f} | "
            f"{ev['dead_fraction']:.3f} | {ev['loss_clean']:.3f} | {ev['loss_sae']:.3f} | {ev['loss_zero']:.3f} | "
            f"{ev['loss_recovered']:.3f} |"
        )

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "bench_train_quick" if args.quick else "bench_train"
    meta = {**machine_meta(), "backends": backends(), "case": asdict(case)}
    path = RESULTS / f"{stem}.json"
    # Parts run separately (--skip-overhead / --skip-default) update their own entries only.
    data = json.loads(path.read_text()) if path.exists() else {}
    if rows:
        data.update(meta_overhead=meta, overhead_vs_isolated_step=overhead, outside_step_share=outside, timing=rows)
    if default is not None:
        data.update(meta_default=meta, default_model=default)
    path.write_text(json.dumps(data, indent=2))
    if rows:
        write_csv(RESULTS / f"{stem}.csv", rows, list(rows[3]))


if __name__ == "__main__":
    main()
