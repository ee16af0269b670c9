"""DOCUMENTED_API.md, "SAEs, training, concepts": SaeTrainer call shapes, the history mapping, l1_lambda, W&B.

The history is checked against an independent recomputation: the SAE's weights are snapshotted after every step, and
the next step's batch is pushed through a plain-PyTorch forward of those weights (FVU, MSE, L0, the latents that
fired), which is what the record of that step must report.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mi_crow.mechanistic.sae import TopKSae
from mi_crow.mechanistic.sae.modules.topk_sae import TopKSaeTrainingConfig
from mi_crow.mechanistic.sae.train import SaeTrainer, SaeTrainingConfig

N_LATENTS, K, BATCH = 96, 4, 64
QUIET = {"progress": False, "checkpoint_every": None, "save_sae": False}


@pytest.fixture
def run(tiny_gpt2, sample_texts):
    """Block-1 activations of the tiny GPT-2 over the sample texts, saved in the store: (store, run_id, layer)."""
    layer = tiny_gpt2.layers.resolve(1)
    run_id = tiny_gpt2.activations.save(sample_texts * 2, layers=layer, run_id="acts", batch_size=8, max_length=32,
                                        progress=False)
    return tiny_gpt2.store, run_id, layer


def _config(**overrides) -> SaeTrainingConfig:
    base = dict(epochs=1, batch_size=BATCH, lr=1e-2, log_every=1, shuffle=False, outlier_norm_factor=None,
                dead_window_tokens=BATCH, k_aux=8, seed=3, **QUIET)
    base.update(overrides)
    return SaeTrainingConfig(**base)


def _sae() -> TopKSae:
    return TopKSae(n_latents=N_LATENTS, n_inputs=32, k=K, device="cpu")


def _reference_step(state: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> dict[str, float]:
    """What one step's record must say, from the weights it started with (plain PyTorch, float64)."""
    w_enc, b_enc, w_dec, b_dec = (state[n].double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    x = x.double()
    pre = F.relu(F.linear(x - b_dec, w_enc, b_enc))
    values, indices = pre.topk(k, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, indices, values)
    x_hat = dense @ w_dec + b_dec
    sse = (x - x_hat).pow(2).sum()
    fired = torch.zeros(pre.shape[-1], dtype=torch.bool)
    fired[indices[values > 0]] = True
    return {
        "fvu": float(sse / (x - x.mean(0)).pow(2).sum()),
        "mse": float(sse / x.numel()),
        "l0": float((values > 0).sum(-1).double().mean()),
        "l1": float(dense.abs().mean()),
        "dead_features": int((~fired).sum()),
    }


def _train_with_snapshots(call, store, run_id, layer, config):
    """Run ``call(callbacks)`` and return (result, the epoch's batches in order, the weights after every step)."""
    snapshots = []

    def snapshot(info) -> None:
        snapshots.append({n: p.detach().clone() for n, p in info.trainer.sae.state_dict().items()})

    result = call([snapshot])
    batches = list(store.activation_reader(run_id, layer, config.batch_size, shuffle=False, drop_last=True))
    return result, batches, snapshots


def test_documented_keyword_call_and_history_mapping(run):
    store, run_id, layer = run
    sae = _sae()
    config = _config()
    trainer = SaeTrainer(sae)  # the store comes with train()
    history, batches, snapshots = _train_with_snapshots(
        lambda cbs: trainer.train(store=store, run_id=run_id, layer_signature=layer, config=config, callbacks=cbs),
        store, run_id, layer, config,
    )
    steps = len(batches)
    assert steps >= 3 and history.steps == steps and len(snapshots) == steps
    for key in ("loss", "r2", "l0", "dead_features", "fvu", "mse"):
        assert key in history and len(history[key]) == steps, key  # log_every=1: one entry per step
    assert history["r2"][-1] == 1 - history["fvu"][-1]
    assert all(r2 == 1 - fvu for r2, fvu in zip(history["r2"], history["fvu"]))
    assert all(isinstance(d, int) for d in history["dead_features"])
    # Attribute access keeps working and agrees with the mapping.
    assert history.history[-1]["loss"] == history["loss"][-1] and history.tokens == steps * BATCH
    assert history["step"] == list(range(1, steps + 1))
    # Step t's record describes batch t under the weights left by step t - 1.
    for t in range(2, steps + 1):
        want = _reference_step(snapshots[t - 2], batches[t - 1], K)
        got = {name: history[name][t - 1] for name in want}
        for name in ("fvu", "mse", "l0", "l1"):
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-7), (t, name)
        # dead_window_tokens == one batch: dead means "did not fire on this step's batch".
        assert got["dead_features"] == want["dead_features"], t
    # The history also went to the store, as records.
    saved = store.get_json(f"runs/{history.training_run_id}/training_history.json")
    assert [r["r2"] for r in saved] == history["r2"]


def test_call_shapes_train_identically(run):
    store, run_id, layer = run
    config = _config()

    def final(train) -> tuple[dict[str, torch.Tensor], list[float]]:
        sae = _sae()
        result = train(sae)
        return {n: p.detach().clone() for n, p in sae.state_dict().items()}, result["loss"]

    shapes = {
        "keywords": lambda sae: SaeTrainer(sae).train(store=store, run_id=run_id, layer_signature=layer, config=config),
        "positional, store first": lambda sae: SaeTrainer(sae).train(store, run_id, layer, config),
        "trainer with store": lambda sae: SaeTrainer(sae, store).train(run_id, layer, config),
        "layer= synonym": lambda sae: SaeTrainer(sae, store).train(run_id, layer=layer, config=config),
        "sae.train": lambda sae: sae.train(store, run_id, layer_signature=layer, config=config),
        "flattened layer name": lambda sae: SaeTrainer(sae).train(store, run_id, "gpt2lmheadmodel_transformer_h_1",
                                                                 config),
    }
    results = {name: final(train) for name, train in shapes.items()}
    ref_state, ref_loss = results.pop("keywords")
    for name, (state, loss) in results.items():
        assert loss == ref_loss, name
        for key, tensor in state.items():
            assert torch.equal(tensor, ref_state[key]), (name, key)


def test_topk_training_config_is_the_config():
    config = TopKSaeTrainingConfig(epochs=2, batch_size=32, lr=1e-3, l1_lambda=1e-4, use_wandb=False,
                                   wandb_project=None, wandb_run_name=None)
    assert isinstance(config, SaeTrainingConfig) and config.l1_lambda == 1e-4 and config.epochs == 2


def test_l1_penalty_loss_and_gradient_match_a_hand_computation():
    torch.manual_seed(0)
    sae = TopKSae(n_latents=40, n_inputs=12, k=5)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(50, 12)
    lam = 0.3
    trainer = SaeTrainer(sae)
    out = trainer.compute_losses(x, l1_lambda=lam)
    out.loss.backward()
    got_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}

    # Hand computation in float64: FVU plus lam * mean |dense code| (over tokens and latents).
    params = {n: p.detach().double().requires_grad_(True) for n, p in sae.named_parameters()}
    xd = x.double()
    pre = F.relu(F.linear(xd - params["b_dec"], params["W_enc"], params["b_enc"]))
    values, indices = pre.topk(5, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, indices, values)
    x_hat = dense @ params["W_dec"] + params["b_dec"]
    fvu = (xd - x_hat).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum()
    l1 = dense.abs().mean()
    loss = fvu + lam * l1
    loss.backward()
    assert float(out.loss.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert float(out.l1) == pytest.approx(float(l1.detach()), rel=1e-5)
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad.double(), params[name].grad, rtol=1e-4, atol=1e-6, msg=name)

    # Off (the default), the loss is the FVU itself: no penalty term is added.
    sae.zero_grad()
    off = trainer.compute_losses(x)
    assert torch.equal(off.loss, off.fvu) and float(off.l1) == pytest.approx(float(l1.detach()), rel=1e-5)


def test_l1_lambda_enters_the_logged_loss(run):
    store, run_id, layer = run
    lam = 0.05
    result = SaeTrainer(_sae()).train(store, run_id, layer, _config(l1_lambda=lam, auxk_coef=0.0))
    for loss, fvu, l1 in zip(result["loss"], result["fvu"], result["l1"]):
        assert l1 > 0 and loss == pytest.approx(fvu + lam * l1, rel=1e-6)


# -- Weights & Biases ----------------------------------------------------------------------------------------------


def _wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline W&B run file (a LevelDB-style log: 32 KiB blocks of chunks with a
    7-byte header ``crc32, length, type``; types 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    block, pos, payloads, partial = 32768, 7, [], b""  # the file starts with a 7-byte ":W&B" header
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            payloads.append(partial + chunk)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def test_wandb_offline_run_logs_the_history(run, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install 'mi_crow[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    store, run_id, layer = run
    config = _config(use_wandb=True, wandb_project="mi-crow-docs", wandb_run_name="docs-run", log_every=2)
    result = SaeTrainer(_sae()).train(store=store, run_id=run_id, layer_signature=layer, config=config)
    # The run is finished; W&B's background service writes the offline file out asynchronously, and stopping the
    # service is how to wait for it.
    wandb.teardown()

    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    records = _wandb_records(run_files[0])
    meta = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert meta.project == "mi-crow-docs" and meta.display_name == "docs-run"
    logged = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            logged[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    assert sorted(logged) == result["step"]
    for record in result.history:
        want = {k: v for k, v in record.items() if k != "step"}
        assert logged[record["step"]] == pytest.approx(want, rel=1e-12), record["step"]


def test_wandb_missing_names_the_pip_command(run, monkeypatch):
    store, run_id, layer = run
    monkeypatch.setitem(sys.modules, "wandb", None)  # "import wandb" now raises ImportError
    with pytest.raises(ImportError, match=r"pip install wandb .*pip install 'mi_crow\[wandb\]'"):
        SaeTrainer(_sae()).train(store, run_id, layer, _config(use_wandb=True))
    assert not store.list("runs")  # it failed before any training work


# -- bad input -----------------------------------------------------------------------------------------------------


def test_bad_training_arguments(run):
    store, run_id, layer = run
    trainer = SaeTrainer(_sae())
    with pytest.raises(ValueError, match=r"layer_signature and layer .*layer_signature='transformer.h.1' and "
                                         r"layer='transformer.h.0'"):
        trainer.train(store, run_id, layer, _config(), layer="transformer.h.0")
    with pytest.raises(ValueError, match="run_id given both positionally"):
        trainer.train(store, run_id, layer, run_id="other")
    with pytest.raises(TypeError, match="first argument must be a Store .* or a run id .* got int"):
        trainer.train(3, run_id, layer)
    with pytest.raises(ValueError, match="run_id and layer_signature are required"):
        trainer.train(store, run_id)
    with pytest.raises(ValueError, match="no store"):
        SaeTrainer(_sae()).train(run_id, layer, _config())
    with pytest.raises(ValueError, match=r"SaeTrainingConfig\.l1_lambda must be a finite number >= 0.0, got -0.1"):
        SaeTrainingConfig(l1_lambda=-0.1)
    with pytest.raises(TypeError, match=r"SaeTrainingConfig\.use_wandb must be a bool, got 'yes'"):
        SaeTrainingConfig(use_wandb="yes")
