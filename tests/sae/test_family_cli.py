"""``mi-crow train --arch ... --matryoshka-sizes ... --transcoder-target LAYER --skip`` on a small stored run."""

from __future__ import annotations

import re

import pytest
import torch

from mi_crow import cli
from mi_crow.mechanistic.sae import BatchTopKSae, MatryoshkaSae, Transcoder, load_sae
from mi_crow.store import LocalStore


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("family_cli") / "st"
    store = LocalStore(path)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        x = torch.randn(8, 32, 16, generator=g)
        store.write_activation_batch("r", i, {"blk.mlp_in": x, "blk.mlp": torch.tanh(x[..., :12])},
                                     torch.ones(8, 32, dtype=torch.int64))
    return path


def _train(capsys, store_path, *extra):
    code = cli.main(["train", "--store", str(store_path), "--run-id", "r", "--layer", "blk.mlp_in", "--n-latents",
                     "64", "--k", "4", "--epochs", "1", "--batch-size", "128", *extra])
    return code, capsys.readouterr().err


def test_cli_trains_each_architecture(capsys, store_path):
    assert _train(capsys, store_path, "--arch", "batchtopk", "--sae-id", "b")[0] == 0
    assert _train(capsys, store_path, "--arch", "matryoshka", "--matryoshka-sizes", "8,24,32", "--sae-id", "m")[0] == 0
    assert _train(capsys, store_path, "--transcoder-target", "blk.mlp", "--skip", "--sae-id", "t")[0] == 0
    store = LocalStore(store_path)
    b, m, t = load_sae(store, "b"), load_sae(store, "m"), load_sae(store, "t")
    assert type(b) is BatchTopKSae and torch.isfinite(b.threshold)
    assert type(m) is MatryoshkaSae and m.group_sizes == [8, 24, 32]
    assert type(t) is Transcoder and t.skip and t.n_outputs == 12 and t.metadata["target_layer"] == "blk.mlp"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--arch", "matryoshka", "--matryoshka-sizes", "8,24"], r"--matryoshka-sizes 8,24: .*sum to n_latents=64"),
        (["--arch", "matryoshka", "--matryoshka-sizes", "8,x"], "--matryoshka-sizes must be comma-separated"),
        (["--matryoshka-sizes", "32,32"], "--matryoshka-sizes needs --arch matryoshka"),
        (["--transcoder-target", "nope"], r"--transcoder-target 'nope' is not stored in run 'r'"),
        (["--skip"], "--skip needs --transcoder-target"),
    ],
)
def test_cli_bad_input_is_named(capsys, store_path, extra, message):
    code, err = _train(capsys, store_path, *extra)
    assert code == 2
    assert re.search(message, err), err
