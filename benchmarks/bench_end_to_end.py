"""Question: end to end at the demo's shape (d=576, n=4608, k=32, batch 1024 tokens), how many tokens/s does SAE
training reach -- against the real sparsify on the same tensor, straight from the model (on the fly) against the
model forward alone and the SAE training alone, and for a grid of 8 SAEs from one pass against 8 separate runs?

Parts (one process each for the peers; everything in float32 on the CPU unless the machine has a GPU):

1. ``sae alone``: ``SaeTrainer.train_on_tensor`` over a fixed ``[T, 576]`` tensor (the whole call: setup,
   ``b_dec`` initialisation, every step, logging), and ``sparsify`` (``eai-sparsify``, its default ``Trainer``, fed
   the same tensor through the stand-in model of ``bench_quality.py``) on the same tensor, budget and batch, in the
   peers' interpreter (``--peer-python``, default ``/tmp/peers/bin/python``), one after the other at each budget of
   ``--budgets``; both report wall and CPU (process) seconds and the held-out FVU on 4,096 other tokens. A fit
   ``fixed + per_step * steps`` over the budgets gives each library's set-up and step cost, and from them the ratio
   at the demo's budget (8 epochs of 150k tokens, 1,171 steps: what "end to end" means for the demo; a run of a few dozen
   steps weighs the set-up far more than the demo does). On a machine shared with other jobs the CPU times (with ``--threads 1``) are the robust
   figure; wall times move with the load. ``--check-init`` also trains mi_crow with the reference geometric median
   (``data.geometric_median``) in place of ``b_dec_median``, to show the held-out FVU does not change. Both processes
   import ``torch._dynamo`` before timing (a one-off import of seconds that ``torch.optim`` triggers on first use).
2. ``forward alone``: the embedded SmolLM2-135M over paragraphs of the default corpus, ``forward_batch_size`` texts
   per pass, stopped after block 15 (what the on-the-fly producer runs), padding and sinks removed.
   ``on the fly``: ``SaeTrainer.train_from_model`` over the same texts (one epoch), tokens trained / wall.
3. ``grid``: 8 SAEs (k in {16, 32} x n in {4608, 9216} x seed in {0, 1}) with `SaeGrid` from one pass, against the
   same 8 trained one after the other -- from the model on the fly (the pass is the forward) and from a stored run
   (the pass is the read).

   ``grid_synthetic``: the stored-run half without the model (a format-2 run of the synthetic tensor), with the
   CPU time inside the members' steps against the rest (what sharing the read can save at most).

The tensor of part 1 is synthetic (a mixture of 2,000 random unit directions with 32 active per token, plus an
offset and noise): the speed of the step does not depend on the values. Timings on a shared machine are noisy: the
script prints the machine load (``os.getloadavg``) before and after each part.

Usage: ``python benchmarks/bench_end_to_end.py [--quick] [--parts sae,otf,grid,grid_synthetic] [--budgets 8192,65536]
[--threads 1] [--check-init] [--peer-python PATH]``; prints
Markdown tables and writes ``benchmarks/results/bench_end_to_end[_quick].json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
D, N, K, BATCH = 576, 4608, 32, 1024
LAYER_INDEX = 15


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def synthetic(tokens: int, d: int = D, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(2000, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.randint(0, 2000, (tokens, 32), generator=g)
    amp = torch.rand(tokens, 32, generator=g)
    x = torch.einsum("tk,tkd->td", amp, atoms[idx]) + 0.5 + 0.1 * torch.randn(tokens, d, generator=g)
    return x.contiguous()


# -- part 1 -----------------------------------------------------------------------------------------------------------
#: The demo's training budget: 8 epochs of its 150k saved tokens (``mi-crow demo``: ``n_run * 8``).
DEMO_BUDGET = 8 * 150_000


def _heldout_fvu(heldout: torch.Tensor, recon: torch.Tensor) -> float:
    x, r = heldout.double(), recon.detach().double()
    return float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def worker(args: argparse.Namespace) -> None:
    """Runs in the peers' interpreter: sparsify on the tensor in ``--data``; prints the wall and the held-out FVU as
    JSON."""
    import torch._dynamo  # noqa: F401 - see the module docstring

    import types

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    import bench_quality

    # train_sparsify times Trainer(...) + fit() with two perf_counter() calls: record the process's CPU time at
    # the same two moments.
    cpu: list[float] = []

    def perf_counter() -> float:
        cpu.append(time.process_time())
        return time.perf_counter()

    bench_quality.time = types.SimpleNamespace(perf_counter=perf_counter)
    data = torch.load(args.data, weights_only=True)
    result = bench_quality.train_sparsify(data["train"], data["heldout"], N, K, BATCH, args.budget)
    print(json.dumps({"wall_s": result["wall_s"], "cpu_s": cpu[1] - cpu[0], "version": result["version"],
                      "heldout_fvu": _heldout_fvu(data["heldout"], result["recon"])}))


def mi_crow_alone(x: torch.Tensor, budget: int, heldout: torch.Tensor | None = None,
                  reference_median: bool = False) -> dict[str, Any]:
    """``train_on_tensor`` on ``x`` for ``budget`` tokens (wall of the whole call); ``reference_median``: initialise
    ``b_dec`` with the reference `geometric_median` (the implementation before ``b_dec_median``) instead."""
    import contextlib
    from unittest import mock

    import torch._dynamo  # noqa: F401

    from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae, geometric_median

    cfg = SaeTrainingConfig(batch_size=BATCH, n_tokens=budget, progress=False, checkpoint_every=None, save_sae=False)
    sae = TopKSae(N, D, K)
    patch = (mock.patch("mi_crow.mechanistic.sae.train.init.b_dec_median", lambda p: geometric_median(p))
             if reference_median else contextlib.nullcontext())
    with patch:
        start, cpu = time.perf_counter(), time.process_time()
        result = SaeTrainer(sae).train_on_tensor(x, cfg)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    row = {"wall_s": wall, "cpu_s": cpu, "tokens": result.tokens, "tokens_per_s": result.tokens / wall}
    if heldout is not None:
        with torch.no_grad():
            row["heldout_fvu"] = _heldout_fvu(heldout, sae(heldout).reconstruction)
    return row


def _sparsify(args: argparse.Namespace, x: torch.Tensor, heldout: torch.Tensor, budget: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.pt"
        torch.save({"train": x, "heldout": heldout}, data)
        done = subprocess.run([args.peer_python, __file__, "--worker", "--data", str(data), "--budget", str(budget),
                               "--threads", str(args.threads)], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    res = json.loads(done.stdout.strip().splitlines()[-1])
    return {**res, "tokens_per_s": budget / res["wall_s"]}


def _fit(budgets: list[int], walls: list[float]) -> dict[str, float] | None:
    """Least-squares ``wall = fixed + per_step * steps`` over the budgets (None with one budget)."""
    if len(budgets) < 2:
        return None
    steps = [b // BATCH for b in budgets]
    n = len(steps)
    ms, mw = sum(steps) / n, sum(walls) / n
    per_step = sum((s - ms) * (w - mw) for s, w in zip(steps, walls)) / sum((s - ms) ** 2 for s in steps)
    return {"fixed_s": mw - per_step * ms, "per_step_s": per_step}


def part_sae(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Both libraries at each budget, interleaved (mi_crow, sparsify, mi_crow, ...) so that a change of the
    machine's load falls on both; the walls give a fit ``fixed + per_step * steps`` per library, which gives the
    ratio at the demo's budget (``DEMO_BUDGET`` tokens) -- the budget that "end to end" means."""
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else [args.budget]
    heldout = synthetic(4096, seed=1)
    peer = args.peer_python if args.peer_python and Path(args.peer_python).exists() else None
    rows = []
    for budget in budgets:
        # The demo trains 8 epochs of its 150k tokens: a budget above --tensor-tokens trains epochs of that tensor.
        x = synthetic(min(budget, args.tensor_tokens or budget))
        load0 = _load()
        row: dict[str, Any] = {"budget_tokens": budget, "steps": budget // BATCH, "tensor_tokens": x.shape[0]}
        mine = mi_crow_alone(x, budget, heldout)
        row.update(mi_crow_wall_s=mine["wall_s"], mi_crow_cpu_s=mine["cpu_s"],
                   mi_crow_tokens_per_s=mine["tokens_per_s"], mi_crow_heldout_fvu=mine["heldout_fvu"])
        if args.check_init:
            ref = mi_crow_alone(x, budget, heldout, reference_median=True)
            row.update(mi_crow_reference_median_wall_s=ref["wall_s"], mi_crow_reference_median_cpu_s=ref["cpu_s"],
                       mi_crow_reference_median_heldout_fvu=ref["heldout_fvu"])
        if peer:
            res = _sparsify(args, x, heldout, budget)
            if "error" in res:
                row["sparsify_error"] = res["error"]
            else:
                row.update(sparsify_version=res["version"], sparsify_wall_s=res["wall_s"],
                           sparsify_cpu_s=res["cpu_s"], sparsify_tokens_per_s=res["tokens_per_s"],
                           sparsify_heldout_fvu=res["heldout_fvu"],
                           speedup_vs_sparsify=mine["tokens_per_s"] / res["tokens_per_s"],
                           cpu_speedup_vs_sparsify=res["cpu_s"] / mine["cpu_s"])
        row["load_before_after"] = [load0, _load()]
        rows.append(row)
    summary: dict[str, Any] = {"rows": rows, "demo_budget_tokens": DEMO_BUDGET, "threads": args.threads}
    steps = DEMO_BUDGET // BATCH
    for clock in ("wall", "cpu"):
        fits = {"mi_crow": _fit(budgets, [r[f"mi_crow_{clock}_s"] for r in rows])}
        if all(f"sparsify_{clock}_s" in r for r in rows):
            fits["sparsify"] = _fit(budgets, [r[f"sparsify_{clock}_s"] for r in rows])
        summary[f"{clock}_fits"] = fits
        if fits["mi_crow"] and fits.get("sparsify"):
            predicted = {lib: f["fixed_s"] + f["per_step_s"] * steps for lib, f in fits.items()}
            summary[f"demo_budget_predicted_{clock}_s"] = predicted
            summary[f"demo_budget_{clock}_speedup_vs_sparsify"] = predicted["sparsify"] / predicted["mi_crow"]
            summary[f"per_step_{clock}_speedup_vs_sparsify"] = (fits["sparsify"]["per_step_s"]
                                                                / fits["mi_crow"]["per_step_s"])
    out["sae_alone"] = summary
    print("\n### SAE training alone (fp32, same tensor, held-out FVU on 4,096 other tokens)\n")
    print(f"{args.threads} thread(s); wall and CPU (process) seconds of the training call; ratio: sparsify / mi_crow\n")
    print("| budget (steps) | mi_crow wall s | CPU s | FVU | sparsify wall s | CPU s | FVU | ratio wall | ratio CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = (f"{r['sparsify_wall_s']:.1f} | {r['sparsify_cpu_s']:.1f} | {r['sparsify_heldout_fvu']:.4f} | "
              f"{r['speedup_vs_sparsify']:.2f}x | {r['cpu_speedup_vs_sparsify']:.2f}x" if "sparsify_wall_s" in r
              else "not run | | | |")
        print(f"| {r['budget_tokens']:,} ({r['steps']}) | {r['mi_crow_wall_s']:.1f} | {r['mi_crow_cpu_s']:.1f} "
              f"| {r['mi_crow_heldout_fvu']:.4f} | {sp} |")
        if "mi_crow_reference_median_heldout_fvu" in r:
            print(f"|   mi_crow, reference median | {r['mi_crow_reference_median_wall_s']:.1f} | "
                  f"{r['mi_crow_reference_median_cpu_s']:.1f} | {r['mi_crow_reference_median_heldout_fvu']:.4f} "
                  f"| | | | | |")
        if "sparsify_error" in r:
            print(f"\nsparsify failed: {r['sparsify_error'][-300:]}")
    for clock in ("wall", "cpu"):
        for lib, f in summary[f"{clock}_fits"].items():
            if f:
                print(f"\n{lib} ({clock}): fixed {f['fixed_s']:.1f} s + {f['per_step_s']:.3f} s/step")
        if f"demo_budget_{clock}_speedup_vs_sparsify" in summary:
            print(f"\nat the demo's budget ({DEMO_BUDGET:,} tokens, {steps} steps, {clock} fits): mi_crow / sparsify "
                  f"{summary[f'demo_budget_{clock}_speedup_vs_sparsify']:.2f}x; per step "
                  f"{summary[f'per_step_{clock}_speedup_vs_sparsify']:.2f}x (target >= 2.5x)")


# -- parts 2 and 3 -------------------------------------------------------------------------------------------------------
def _model_and_texts(n_texts: int) -> tuple[Any, list[str], str]:
    from mi_crow import defaults
    from mi_crow.language_model import LanguageModel

    lm = LanguageModel.from_huggingface(str(defaults.default_model_path()))
    texts = list(defaults.default_corpus_paragraphs())[:n_texts]
    return lm, texts, lm.layers.resolve(LAYER_INDEX)


def part_otf(args: argparse.Namespace, out: dict[str, Any]) -> None:
    import torch._dynamo  # noqa: F401

    from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae
    from mi_crow.mechanistic.sae.train.on_the_fly import ModelActivationStream

    lm, texts, layer = _model_and_texts(args.texts)
    load0 = _load()
    stream = ModelActivationStream(lm, texts, [layer], batch_size=BATCH, forward_batch_size=16, max_length=128)
    start, kept = time.perf_counter(), 0
    with torch.no_grad():
        for i in range(0, len(texts), 16):
            vectors, _ = stream._forward_vectors(texts[i:i + 16])
            kept += vectors[layer].shape[0]
    forward_wall = time.perf_counter() - start
    forward_tps = kept / forward_wall
    x = synthetic(max(kept, BATCH * 4))
    budget = (kept // BATCH) * BATCH
    sae_alone = mi_crow_alone(x, budget)
    cfg = SaeTrainingConfig(batch_size=BATCH, epochs=1.0, progress=False, checkpoint_every=None, save_sae=False)
    start = time.perf_counter()
    result = SaeTrainer(TopKSae(N, D, K)).train_from_model(lm, texts, layer, cfg, forward_batch_size=16,
                                                            max_length=128)
    otf_wall = time.perf_counter() - start
    otf_tps = result.tokens / otf_wall
    slower = min(forward_tps, sae_alone["tokens_per_s"])
    row = {"texts": len(texts), "real_tokens_kept": kept, "forward_tokens_per_s": forward_tps,
           "sae_alone_tokens_per_s": sae_alone["tokens_per_s"], "on_the_fly_tokens_per_s": otf_tps,
           "on_the_fly_tokens": result.tokens, "on_the_fly_wall_s": otf_wall,
           "on_the_fly_vs_slower": otf_tps / slower, "load_before_after": [load0, _load()]}
    out["on_the_fly"] = row
    print("\n### On the fly (SmolLM2-135M block 15, fp32, forward batch 16 x <=128 tokens)\n")
    print("| path | tokens/s |\n|---|---|")
    print(f"| model forward alone | {forward_tps:,.0f} |\n| SAE training alone | {sae_alone['tokens_per_s']:,.0f} |")
    print(f"| on the fly | {otf_tps:,.0f} |")
    print(f"\non the fly / slower of the two: {row['on_the_fly_vs_slower']:.2f} (target >= 0.90)")


def _grid_members(base: Any, ks=(16, 32), ns=(4608, 9216), seeds=(0, 1)) -> list[tuple[int, int, int]]:
    return [(k, n, s) for k in ks for n in ns for s in seeds]


def part_grid(args: argparse.Namespace, out: dict[str, Any]) -> None:
    import torch._dynamo  # noqa: F401

    from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae
    from mi_crow.mechanistic.sae.train.grid import SaeGrid
    from mi_crow.store import LocalStore

    lm, texts, layer = _model_and_texts(args.grid_texts)
    base = SaeTrainingConfig(batch_size=BATCH, epochs=1.0, progress=False, checkpoint_every=None, save_sae=False)
    combos = _grid_members(base)
    rows: dict[str, Any] = {"members": len(combos), "texts": len(texts), "load_before": _load()}
    # From the model: one forward pass for the grid against one per SAE.
    grid = SaeGrid.product({layer: D}, k=[16, 32], n_latents=[4608, 9216], seed=[0, 1], config=base)
    start = time.perf_counter()
    grid.train_from_model(lm, texts, forward_batch_size=16, max_length=128)
    rows["model_grid_wall_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for k, n, s in combos:
        cfg = dataclasses.replace(base, seed=s)
        SaeTrainer(TopKSae(n, D, k)).train_from_model(lm, texts, layer, cfg, forward_batch_size=16, max_length=128)
    rows["model_separate_wall_s"] = time.perf_counter() - start
    rows["model_ratio"] = rows["model_grid_wall_s"] / rows["model_separate_wall_s"]
    # From a stored run: one read for the grid against one per SAE.
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp)
        lm.store = store
        lm.activations.save(texts, layer, run_id="r", batch_size=16, max_length=128, progress=False)
        base_s = dataclasses.replace(base, save_sae=False)
        grid = SaeGrid.product({layer: D}, k=[16, 32], n_latents=[4608, 9216], seed=[0, 1], config=base_s,
                               store=store, grid_id="g")
        start = time.perf_counter()
        grid.train("r")
        rows["stored_grid_wall_s"] = time.perf_counter() - start
        start = time.perf_counter()
        for k, n, s in combos:
            cfg = dataclasses.replace(base_s, seed=s, training_run_id=f"sep-{k}-{n}-{s}")
            SaeTrainer(TopKSae(n, D, k), store).train("r", layer, cfg)
        rows["stored_separate_wall_s"] = time.perf_counter() - start
    rows["stored_ratio"] = rows["stored_grid_wall_s"] / rows["stored_separate_wall_s"]
    rows["load_after"] = _load()
    out["grid"] = rows
    print(f"\n### Grid of {len(combos)} SAEs (k 16/32 x n 4608/9216 x seed 0/1), one pass vs separate runs\n")
    print("| source | grid s | 8 separate s | ratio |\n|---|---|---|---|")
    print(f"| model (on the fly) | {rows['model_grid_wall_s']:.1f} | {rows['model_separate_wall_s']:.1f} | "
          f"{rows['model_ratio']:.2f} |")
    print(f"| stored run | {rows['stored_grid_wall_s']:.1f} | {rows['stored_separate_wall_s']:.1f} | "
          f"{rows['stored_ratio']:.2f} |")
    print("\n(target: <= 0.60)")


def part_grid_synthetic(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """The stored-run half of part 3 without the model: a format-2 run of the synthetic tensor (fp32, 16 batches of
    ``budget / 16`` tokens), the grid of 8 against the 8 separate runs, and where the grid's time goes: the members'
    steps (`SaeTrainer.train_step`) against everything else (reading, shuffling, the outlier rule, set-up)."""
    import torch._dynamo  # noqa: F401
    from unittest import mock

    from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae
    from mi_crow.mechanistic.sae.train.grid import SaeGrid
    from mi_crow.store import LocalStore

    layer = "model.layers.15"
    budget = args.grid_budget
    x = synthetic(budget)
    base = SaeTrainingConfig(batch_size=BATCH, epochs=1.0, progress=False, checkpoint_every=None, save_sae=False)
    combos = _grid_members(base)
    rows: dict[str, Any] = {"members": len(combos), "tokens": budget, "load_before": _load()}
    step_time = [0.0]
    real_step = SaeTrainer.train_step

    def timed_step(self, *a, **kw):
        start = time.process_time()
        try:
            return real_step(self, *a, **kw)
        finally:
            step_time[0] += time.process_time() - start

    with tempfile.TemporaryDirectory(dir=args.grid_dir) as tmp, mock.patch.object(SaeTrainer, "train_step",
                                                                                  timed_step):
        store = LocalStore(tmp, fsync=False)
        store.create_packed_run("r", {"bench": "grid"}, {layer: D}, torch.float32)
        per = budget // 16
        for i in range(16):
            rows_i = x[i * per:(i + 1) * per]
            store.write_packed_batch("r", i, {layer: rows_i}, torch.tensor([0, per]), torch.zeros(per, dtype=torch.int64))
        store.finish_packed_run("r")
        grid = SaeGrid.product({layer: D}, k=[16, 32], n_latents=[4608, 9216], seed=[0, 1], config=base,
                               store=store, grid_id="g")
        step_time[0] = 0.0
        start, cpu = time.perf_counter(), time.process_time()
        grid.train("r")
        rows["grid_wall_s"], rows["grid_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
        rows["grid_step_cpu_s"] = step_time[0]
        step_time[0] = 0.0
        start, cpu = time.perf_counter(), time.process_time()
        for k, n, s in combos:
            cfg = dataclasses.replace(base, seed=s, training_run_id=f"sep-{k}-{n}-{s}")
            SaeTrainer(TopKSae(n, D, k), store).train("r", layer, cfg)
        rows["separate_wall_s"], rows["separate_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
        rows["separate_step_cpu_s"] = step_time[0]
    for clock in ("wall", "cpu"):
        rows[f"ratio_{clock}"] = rows[f"grid_{clock}_s"] / rows[f"separate_{clock}_s"]
    rows["grid_outside_steps_cpu_fraction"] = 1 - rows["grid_step_cpu_s"] / rows["grid_cpu_s"]
    rows["separate_outside_steps_cpu_fraction"] = 1 - rows["separate_step_cpu_s"] / rows["separate_cpu_s"]
    rows["ratio_bound_if_steps_free_cpu"] = rows["grid_step_cpu_s"] / rows["separate_cpu_s"]
    rows["load_after"] = _load()
    out["grid_stored_synthetic"] = rows
    print(f"\n### Grid of {len(combos)} from a stored run of {budget:,} synthetic tokens vs 8 separate runs\n")
    print("| | grid | 8 separate | ratio |\n|---|---|---|---|")
    for clock in ("wall", "cpu"):
        print(f"| {clock} s | {rows[f'grid_{clock}_s']:.1f} | {rows[f'separate_{clock}_s']:.1f} | "
              f"{rows[f'ratio_{clock}']:.2f} |")
    print(f"| CPU s in the members' steps | {rows['grid_step_cpu_s']:.1f} | {rows['separate_step_cpu_s']:.1f} | |")
    print(f"\noutside the steps: {100 * rows['grid_outside_steps_cpu_fraction']:.1f}% of the grid's CPU time, "
          f"{100 * rows['separate_outside_steps_cpu_fraction']:.1f}% of the separate runs'; the steps alone are "
          f"{rows['ratio_bound_if_steps_free_cpu']:.2f} of the separate runs' CPU time (the grid's floor). "
          f"(target <= 0.60)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small budgets (a loaded 2-core machine)")
    parser.add_argument("--parts", default="sae,otf,grid")
    parser.add_argument("--peer-python", default="/tmp/peers/bin/python")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--budget", type=int, default=None, help="tokens of part 1 (one budget)")
    parser.add_argument("--budgets", default=None, help="tokens of part 1, comma-separated (a fit over them)")
    parser.add_argument("--tensor-tokens", type=int, default=None,
                        help="part 1: tokens of the tensor (default: the budget; the demo's is 150000, 8 epochs)")
    parser.add_argument("--check-init", action="store_true",
                        help="part 1 also trains mi_crow with the reference geometric median (held-out FVU beside)")
    parser.add_argument("--texts", type=int, default=None, help="texts of part 2")
    parser.add_argument("--grid-texts", type=int, default=None, help="texts of part 3")
    parser.add_argument("--grid-budget", type=int, default=None, help="tokens of part grid_synthetic")
    parser.add_argument("--grid-dir", default=None, help="where part grid_synthetic writes its run (e.g. /dev/shm)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    args.budget = args.budget or (BATCH * (16 if args.quick else 100))
    args.texts = args.texts or (64 if args.quick else 400)
    args.grid_texts = args.grid_texts or (48 if args.quick else 200)
    args.grid_budget = args.grid_budget or (BATCH * (16 if args.quick else 64))
    out: dict[str, Any] = {"meta": {"torch": torch.__version__, "threads": args.threads,
                                    "machine": platform.processor() or platform.machine(),
                                    "cpu_count": os.cpu_count(), "d": D, "n": N, "k": K, "batch": BATCH,
                                    "quick": args.quick}}
    parts = args.parts.split(",")
    if "sae" in parts:
        part_sae(args, out)
    if "otf" in parts:
        part_otf(args, out)
    if "grid" in parts:
        part_grid(args, out)
    if "grid_synthetic" in parts:
        part_grid_synthetic(args, out)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench_end_to_end{'_quick' if args.quick else ''}.json"
    if path.exists():  # parts run separately accumulate in one file (each part keeps its latest run)
        previous = json.loads(path.read_text())
        out = {**previous, **out, "meta": {**previous.get("meta", {}), **out["meta"]}}
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
