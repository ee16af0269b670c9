"""``mi-crow train --parallel`` inside a process group (as under torchrun), and the guard against several torchrun
processes without a layout."""

from __future__ import annotations

import transformers  # noqa: F401  # the CLI imports it (logging set-up): once here, not again in each rank

from mi_crow.cli import main  # imported before the ranks fork, so they do not each import the CLI's modules
from tests.distributed.conftest import launch, ok
from tests.distributed.test_layers import _write_run

ARGS = ["train", "--n-latents", "48", "--k", "4", "--batch-size", "64", "--tokens", "256", "--run-id", "acts",
        "--layer", "h.1"]


def _cli(rank: int, world: int, store: str) -> int:
    return main([*ARGS, "--store", store, "--sae-id", "cli-dp", "--parallel", "data"])


def test_cli_data_parallel_in_a_process_group(tmp_path, capsys):
    from mi_crow.mechanistic.sae import TopKSae
    from mi_crow.store import LocalStore

    _write_run(tmp_path / "store")
    assert ok(launch(_cli, tmp_path, str(tmp_path / "store"))) == [0, 0]
    sae = TopKSae.load(LocalStore(tmp_path / "store"), "cli-dp")
    assert (sae.n_latents, sae.n_inputs, sae.k) == (48, 12, 4)


def test_cli_under_torchrun_needs_a_layout(tmp_path, monkeypatch, capsys):
    _write_run(tmp_path / "store")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*ARGS, "--store", str(tmp_path / "store")]) == 2
    assert "pass --parallel data, --parallel latents or --parallel layers" in capsys.readouterr().err
