"""Helpers of the distributed tests: 2-process gloo groups on 127.0.0.1, forked from the test process.

Forking (not spawning) lets the ranks reuse the test process's imported torch and mi_crow, so a group starts in well
under a second. Each rank runs ``fn(rank, world, *args)`` and its return value (or its exception, as text) comes
back through a file; the parent waits with a timeout and kills ranks that outlive it, so a hang fails the test
instead of blocking the suite.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

# Imported here, once, so that the forked ranks inherit them instead of each importing them again (seconds each).
import torch.distributed.checkpoint  # noqa: F401
import torch.distributed.tensor  # noqa: F401
from torch.distributed.device_mesh import init_device_mesh  # noqa: F401

from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae  # noqa: F401
from mi_crow.mechanistic.sae.train import dcp_checkpoint, distributed  # noqa: F401
from mi_crow.store import LocalStore  # noqa: F401

#: The gloo timeout of every test group: a rank waiting on a dead peer fails after at most this long.
GLOO_TIMEOUT_S = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str, fn: Callable[..., Any], args: tuple[Any, ...],
               gloo_timeout: float) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=gloo_timeout))
        result: Any = {"ok": fn(rank, world, *args)}
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = {"error": f"{type(exc).__name__}: {exc}", "type": type(exc).__name__,
                  "traceback": traceback.format_exc()}
    torch.save(result, f"{out}/rank{rank}.pt")
    os._exit(0)  # no atexit / process-group teardown that could wait on a dead peer


def launch(fn: Callable[..., Any], tmp: Path, *args: Any, world: int = 2, timeout: float = 60.0,
           gloo_timeout: float = GLOO_TIMEOUT_S, hang_ok: tuple[int, ...] = ()) -> list[dict]:
    """Run ``fn(rank, world, *args)`` on ``world`` forked ranks of a fresh gloo group; one result dict per rank:
    ``{"ok": value}``, ``{"error": text, "type": name}`` or ``{"missing": True}`` (the rank died without one, or
    is one of ``hang_ok`` and was still running after ``timeout``: then it is killed)."""
    out = tmp / f"ranks-{free_port()}"
    out.mkdir()
    port = free_port()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(out), fn, args, gloo_timeout)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for i, p in enumerate(procs):
        if i not in hang_ok:
            p.join(max(0.0, deadline - time.monotonic()))
    for i in hang_ok:  # once the others are done, a stuck rank gets only a moment more
        procs[i].join(min(1.0, max(0.0, deadline - time.monotonic())))
    hung = [i for i, p in enumerate(procs) if p.is_alive() and i not in hang_ok]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        pytest.fail(f"ranks {hung} were still running after {timeout} s")
    results = []
    for r in range(world):
        path = out / f"rank{r}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else {"missing": True})
    return results


def ok(results: list[dict]) -> list[Any]:
    """The values of successful ranks (fails the test with the first rank's traceback otherwise)."""
    for r, res in enumerate(results):
        if "ok" not in res:
            pytest.fail(f"rank {r} failed: {res.get('traceback') or res}")
    return [res["ok"] for res in results]


def activations(n: int = 1536, d: int = 16, seed: int = 0) -> torch.Tensor:
    """Anisotropic Gaussian activations far from the origin, with an attention-sink-like outlier every 97 tokens."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.2, 3.0, d)
    x = torch.randn(n, d, generator=g) * scales + 2.0
    x[::97] *= 40.0
    return x


def training_config(**overrides: Any):
    from mi_crow.mechanistic.sae import SaeTrainingConfig

    base = dict(batch_size=64, n_tokens=64 * 12, lr=2e-3, warmup_steps=2, log_every=4, checkpoint_every=None,
                save_sae=False, progress=False, b_dec_init_tokens=200, dead_window_tokens=128, k_aux=6, seed=3)
    base.update(overrides)
    return SaeTrainingConfig(**base)


def make_sae(n_latents: int = 96, d: int = 16, k: int = 4):
    from mi_crow.mechanistic.sae import TopKSae

    return TopKSae(n_latents, d, k)


def train(config, x: torch.Tensor | None = None, store_path: Path | None = None, n_latents: int = 96,
          callbacks=()) -> dict[str, Any]:
    """Train a fresh SAE on ``x`` and return its weights, history and dead counters."""
    from mi_crow.mechanistic.sae import SaeTrainer
    from mi_crow.store import LocalStore

    store = LocalStore(store_path, fsync=False) if store_path is not None else None
    sae = make_sae(n_latents)
    trainer = SaeTrainer(sae, store)
    result = trainer.train_on_tensor(activations() if x is None else x, config, callbacks=callbacks)
    return {
        "weights": {k: v.detach().clone() for k, v in sae.state_dict().items()},
        "history": result.history,
        "tokens_since_fired": trainer.tokens_since_fired.clone(),
        "steps": result.steps,
        "resumed_from": result.resumed_from_step,
        "outliers": result.outlier_tokens,
    }


def assert_same_run(got: dict[str, Any], want: dict[str, Any], *, atol: float = 1e-5) -> None:
    """Equal up to the order of the sums: weights within ``atol`` (float32, unit-scale weights after a dozen steps),
    history numbers within a relative 1e-5, counts exactly."""
    for name, tensor in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
    assert len(got["history"]) == len(want["history"])
    for a, b in zip(got["history"], want["history"]):
        assert a.keys() == b.keys()
        for key in a:
            if key == "tokens_per_s":
                continue
            if isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a, b)
            else:
                assert a[key] == b[key], (key, a, b)


@pytest.fixture(scope="session", autouse=True)
def _warm_parent():
    """The reference training in the test process before any fork: the first training of a process pays seconds
    of one-time set-up, which forked ranks then inherit instead of each paying it again."""
    reference()


_REFERENCE: dict[str, Any] = {}


def reference() -> dict[str, Any]:
    """The single-process run of the default `training_config` (computed once per session; read-only)."""
    if "run" not in _REFERENCE:
        _REFERENCE["run"] = train(training_config())
    return _REFERENCE["run"]
