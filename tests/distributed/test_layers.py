"""One SAE per layer per rank: any number of layers per rank, any widths; each layer's SAE equals the one a single
process trains on that layer."""

from __future__ import annotations

from pathlib import Path

import torch

from mi_crow.mechanistic.sae.train.distributed import assign_layers
from tests.distributed.conftest import launch, ok, training_config

LAYERS = {"h.0": 8, "h.1": 12, "h.2": 16}  # three layers of three widths on two ranks


def _write_run(store_path: Path) -> None:
    from mi_crow.store import LocalStore

    store = LocalStore(store_path, fsync=False)
    store.write_run_meta("acts", {"model_id": "test"})
    g = torch.Generator().manual_seed(1)
    for batch in range(4):
        acts = {name: torch.randn(4, 32, d, generator=g) + 1.0 for name, d in LAYERS.items()}
        store.write_activation_batch("acts", batch, acts, torch.ones(4, 32, dtype=torch.long))


def _saes() -> dict:
    from mi_crow.mechanistic.sae import TopKSae

    torch.manual_seed(0)
    return {name: TopKSae(4 * d, d, 3) for name, d in LAYERS.items()}


def _layers_run(rank: int, world: int, store: str) -> dict:
    from mi_crow.mechanistic.sae.train.distributed import train_layers
    from mi_crow.store import LocalStore

    config = training_config(parallel="layers", training_run_id="multi", save_sae=True, n_tokens=64 * 4,
                             dead_window_tokens=None)
    results = train_layers(LocalStore(Path(store), fsync=False), "acts", _saes(), config)
    return sorted(results)


def test_assign_layers_balances_without_divisibility():
    assert assign_layers({"a": 5, "b": 3, "c": 3}, 2) == [["a"], ["b", "c"]]
    assert assign_layers({"a": 1}, 3) == [["a"], [], []]
    plan = assign_layers({f"l{i}": i + 1 for i in range(7)}, 3)
    assert sorted(sum(plan, [])) == sorted(f"l{i}" for i in range(7))


def test_layers_spread_over_ranks_equal_single_process(tmp_path):
    from mi_crow.mechanistic.sae import SaeTrainer, TopKSae
    from mi_crow.store import LocalStore

    _write_run(tmp_path / "store")
    got = ok(launch(_layers_run, tmp_path, str(tmp_path / "store")))
    assert got == [["h.2"], ["h.0", "h.1"]]  # the widest layer alone, the two narrower ones together
    store = LocalStore(tmp_path / "store", fsync=False)
    for name, sae in _saes().items():
        config = training_config(training_run_id=f"solo-{name.replace('.', '_')}", save_sae=False,
                                 n_tokens=64 * 4, dead_window_tokens=None)
        SaeTrainer(sae, store).train("acts", name, config)
        saved = TopKSae.load(store, f"multi-{name.replace('.', '_')}")
        for weight in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(saved, weight), getattr(sae, weight), atol=1e-6, rtol=0)
