"""Per-rank memory and communication of distributed SAE training (gloo on CPU, ranks forked on this machine).

Question: how much memory does each rank hold, and how many bytes does each rank put into collectives per step, for
a TopK SAE with n = 2^18 and 2^20 latents at d = 768, in one process and on 2 ranks (latent-sharded and
data-parallel)?

Measured per rank (``--sizes`` that fit in this machine's memory):

- ``param_bytes`` / ``optimizer_bytes``: the parameters and the Adam moments this rank holds while it trains (read
  from the tensors themselves in a step callback);
- ``peak_rss_gb``: the peak resident memory of the rank's process over the whole run (initialisation included:
  every rank builds the caller's full SAE, which the trainer frees weight by weight as it copies its slice; the
  slice's initial rows are drawn without a full-size tensor) and ``steady_rss_gb``: the peak over steps 2..N
  (parameters, moments, the one transient gradient, activations), both sampled every 5 ms from
  ``/proc/self/status``. By default the run stops right after its last step, before the trainer gathers the whole
  trained SAE back onto every rank (``--final-gather`` includes it: at n = 2^20 that is 3.2 GB per matrix on every
  rank, more than two ranks of one 24 GiB machine can add to their training state);
- ``comm_bytes_per_step``: the payload this rank passes to all-reduce / all-gather per optimizer step
  (`distributed.comm_bytes`; the wire traffic depends on gloo's / NCCL's algorithm);
- ``step_s``: seconds per step (noisy: a shared, loaded 2-core machine).

For sizes that do not fit (``--account``), the parameter and optimizer bytes are computed from the same slice rule
the trainer uses (`Layout.latent_slice`) and the communication from the formula the measured sizes confirm; those
rows say ``"measured": false``.

Run: ``python benchmarks/bench_distributed.py`` (default: measure 2^18, account 2^20); results in
``benchmarks/results/bench_distributed.json``. n = 2^20 at d = 768, 1 rank and 2 latent-sharded ranks (about
22.5 GB in either case: 19.3 GB of parameters and Adam moments plus one 3.2 GB gradient, in one process or split
over two; the data-parallel layout would need 19.3 GB per rank and is accounted, not run)::

    python benchmarks/bench_distributed.py --sizes 20 --layouts single,latents --account 20 \
        --out benchmarks/results/bench_distributed_2e20.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae  # noqa: E402
from mi_crow.mechanistic.sae.train import distributed  # noqa: E402

GB = 1e9


class RssSampler:
    """Peak VmRSS of this process, sampled every ``period`` seconds in a thread; ``mark()`` starts a second peak."""

    def __init__(self, period: float = 0.005) -> None:
        self.peak = 0
        self.since_mark = 0
        self.marked = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self, period: float) -> None:
        while not self._stop:
            value = self.rss()
            self.peak = max(self.peak, value)
            if self.marked:
                self.since_mark = max(self.since_mark, value)
            time.sleep(period)

    def mark(self) -> None:
        self.since_mark = self.rss()
        self.marked = True

    def unmark(self) -> None:
        self.marked = False

    def stop(self) -> None:
        self._stop = True
        self._thread.join()


class _Stop(Exception):
    """Raised by the last step's callback: the run ends before the final gather of the slices."""


def run_case(rank: int, world: int, n: int, d: int, k: int, batch: int, steps: int, parallel: str | None,
             final_gather: bool = False) -> dict:
    sampler = RssSampler()
    torch.manual_seed(0)
    x = torch.randn(batch * steps, d)
    sae = TopKSae(n, d, k)
    config = SaeTrainingConfig(batch_size=batch, n_tokens=batch * steps, lr=1e-4, warmup_steps=0, log_every=1,
                               checkpoint_every=None, save_sae=False, progress=False, b_dec_init_tokens=batch,
                               dead_window_tokens=batch, parallel=parallel)
    seen: dict = {"t": []}

    def callback(info):
        seen["t"].append(time.perf_counter())
        if info.step == 1:
            trainer = info.trainer
            params = [trainer.sae.W_enc, trainer.sae.b_enc, trainer.sae.W_dec, trainer.sae.b_dec]
            seen["param_bytes"] = sum(p.numel() * p.element_size() for p in params)
            seen["optimizer_bytes"] = sum(
                t.numel() * t.element_size()
                for state in trainer.optimizer.state.values() for t in state.values() if torch.is_tensor(t)
            )
            seen["comm0"] = distributed.comm_bytes()
            sampler.mark()
        if info.step == steps:
            seen["comm1"] = distributed.comm_bytes()
            sampler.unmark()  # the steps' window ends here (before the final gather of the slices)
            if not final_gather:
                raise _Stop

    distributed.reset_comm_bytes()
    try:
        SaeTrainer(sae).train_on_tensor(x, config, callbacks=[callback])
    except _Stop:
        pass
    sampler.stop()
    times = seen["t"]
    return {
        "n_latents": n, "d": d, "k": k, "batch_size": batch, "layout": parallel or "single", "world_size": world,
        "rank": rank, "measured": True, "final_gather": final_gather,
        "param_bytes": seen["param_bytes"], "optimizer_bytes": seen["optimizer_bytes"],
        "state_gb": (seen["param_bytes"] + seen["optimizer_bytes"]) / GB,
        "peak_rss_gb": sampler.peak / GB, "steady_rss_gb": sampler.since_mark / GB,
        "comm_bytes_per_step": (seen["comm1"] - seen["comm0"]) / max(1, steps - 1),
        "step_s": (times[-1] - times[0]) / max(1, steps - 1),
    }


def _rank_main(rank, world, port, out, args):
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    if world > 1 or args[5] is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    result = run_case(rank, world, *args)
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(result, f)
    os._exit(0)


def launch(world: int, args: tuple, tmp: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / f"case-{port}"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(out), args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    results = []
    for r in range(world):
        path = Path(f"{out}.{r}.json")
        if not path.exists():
            raise RuntimeError(f"rank {r} of {args} produced no result (exit code {procs[r].exitcode}; out of memory?)")
        results.append(json.loads(path.read_text()))
    return results


def account(n: int, d: int, k: int, batch: int, layout: str, world: int) -> list[dict]:
    """Bytes from the slice rule and the communication formula, for sizes that were not run."""
    rows = []
    for rank in range(world):
        n_local = n if layout in ("single", "data") else (lambda lo_hi: lo_hi[1] - lo_hi[0])(
            distributed.Layout("latents", rank, world).latent_slice(n))
        params = (2 * n_local * d + n_local + d) * 4
        optimizer = 2 * params + 4 * 4  # exp_avg, exp_avg_sq per parameter, one float32 step counter each
        rows.append({"n_latents": n, "d": d, "k": k, "batch_size": batch, "layout": layout, "world_size": world,
                     "rank": rank, "measured": False, "param_bytes": params, "optimizer_bytes": optimizer,
                     "state_gb": (params + optimizer) / GB,
                     "comm_bytes_per_step": comm_formula(n, d, k, batch, layout, world)})
    return rows


def comm_formula(n: int, d: int, k: int, batch: int, layout: str, world: int) -> float:
    """Payload bytes per rank per step with AuxK on (``k_aux = d / 2``, the default): data-parallel sums every
    gradient plus the batch statistics; latent-sharded gathers ``k + k_aux`` (value, index) pairs per token and sums
    the partial decodes of both codes and the b_dec gradient."""
    if world == 1 or layout == "single":
        return 0.0
    if layout == "data":
        grads = (2 * n * d + n + d) * 4
        stats = (batch // world) * 4 + n + d * 8 + 12 * 8 + 4  # norms, fired mask (uint8), means, scalars
        return float(grads + stats)
    k_aux = min(d // 2, n // world)
    gather = batch * (k + k_aux) * (4 + 8)  # values float32 + indices int64
    return float(gather + 2 * batch * d * 4 + d * 4 + 1 + 4 + 8)  # decodes, b_dec grad, dead.any(), l1, dead count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="18", help="log2 of the latent counts to run (comma-separated)")
    parser.add_argument("--account", default="18,20", help="log2 of the latent counts to account for (every layout "
                        "not measured)")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layouts", default="single,latents,data")
    parser.add_argument("--final-gather", action="store_true", help="let each run end as a training run does: the "
                        "latent slices gathered back into the whole SAE on every rank (counted in peak_rss_gb)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_distributed.json"))
    args = parser.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_distributed-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    layouts = args.layouts.split(",")
    for p in [int(s) for s in args.sizes.split(",") if s]:
        n = 1 << p
        for layout in layouts:
            world = 1 if layout == "single" else 2
            case = (n, args.d, args.k, args.batch, args.steps, None if layout == "single" else layout,
                    args.final_gather)
            print(f"n=2^{p} {layout} x{world} ...", flush=True)
            for row in launch(world, case, tmp):
                rows.append(row)
                print(f"  rank {row['rank']}: params+Adam {row['state_gb']:.3f} GB, peak RSS {row['peak_rss_gb']:.2f} "
                      f"GB (steps {row['steady_rss_gb']:.2f} GB), comm {row['comm_bytes_per_step'] / 1e6:.2f} MB/step"
                      f" (formula {comm_formula(n, args.d, args.k, args.batch, layout, world) / 1e6:.2f}), "
                      f"{row['step_s']:.2f} s/step", flush=True)
    measured = {(r["n_latents"], r["layout"]) for r in rows}
    for p in [int(s) for s in args.account.split(",") if s]:
        for layout in ("single", "latents", "data"):
            if (1 << p, layout) in measured:
                continue
            rows += account(1 << p, args.d, args.k, args.batch, layout, 1 if layout == "single" else 2)
    ratios = {}
    for p in sorted({r["n_latents"] for r in rows}):
        single = [r for r in rows if r["n_latents"] == p and r["layout"] == "single"]
        sharded = [r for r in rows if r["n_latents"] == p and r["layout"] == "latents"]
        if single and sharded:
            ratio = max(r["state_gb"] for r in sharded) / single[0]["state_gb"]
            ratios[f"2^{p.bit_length() - 1}"] = ratio
            print(f"n=2^{p.bit_length() - 1}: latent-sharded per-rank params+Adam / 1-rank = {ratio:.3f} "
                  f"({'within' if ratio <= 0.55 else 'ABOVE'} 0.55)")
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared, loaded: timings "
                       "are noisy)", "torch": torch.__version__, "backend": "gloo (CPU), ranks forked on one machine",
            "d": args.d, "k": args.k, "batch_size": args.batch, "steps": args.steps,
            "final_gather": args.final_gather}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "state_ratio_latents_2_vs_1": ratios, "rows": rows},
                                         indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
