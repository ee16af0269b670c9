"""SaeTrainer: planted-dictionary recovery, AuxK gradients against a dense reference, training from a stored run of a
tiny model (loss falls, history and checkpoints), exact resume, non-finite handling, bad input."""

from __future__ import annotations

import pytest
import torch

from mi_crow.mechanistic.sae import (
    NonFiniteTrainingError,
    SaeTrainer,
    SaeTrainingConfig,
    TensorActivationReader,
    TopKSae,
    geometric_median,
)

QUIET = {"progress": False, "checkpoint_every": None, "save_sae": False}


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ planted dictionary
def _planted_data(d: int, n_planted: int, k_true: int, sigma: float, n_tokens: int, seed: int = 123):
    """x = offset + sum of k_true planted unit directions with amplitudes in [0.5, 1.5] + N(0, sigma^2) noise."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_planted, d, generator=g)
    D = D / D.norm(dim=1, keepdim=True)
    support = torch.rand(n_tokens, n_planted, generator=g).argsort(dim=1)[:, :k_true]
    amp = 0.5 + torch.rand(n_tokens, k_true, generator=g)
    signal = torch.zeros(n_tokens, d).index_add_(
        0, torch.arange(n_tokens).repeat_interleave(k_true), amp.reshape(-1, 1) * D[support.reshape(-1)]
    )
    offset = torch.full((d,), 1.0)
    x = offset + signal + sigma * torch.randn(n_tokens, d, generator=g)
    return x, D, offset


def _fvu(sae: TopKSae, x: torch.Tensor) -> float:
    with torch.no_grad():
        recon = sae(x).reconstruction
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def _train_planted(x: torch.Tensor, n_latents: int, k: int) -> TopKSae:
    torch.manual_seed(0)
    sae = TopKSae(n_latents, x.shape[1], k)
    cfg = SaeTrainingConfig(batch_size=128, epochs=4, lr=1e-2, dead_window_tokens=2048, k_aux=16, log_every=16, **QUIET)
    result = SaeTrainer(sae).train_on_tensor(x, cfg)
    assert result.steps == 4 * (x.shape[0] // 128)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    return sae


def test_planted_dictionary_is_recovered_down_to_the_noise_floor():
    d, n_planted, k_true, sigma = 64, 64, 4, 0.05
    x, D, _ = _planted_data(d, n_planted, k_true, sigma, 8192)
    sae = _train_planted(x, n_latents=2 * n_planted, k=k_true)
    best_cos = (D @ sae.W_dec.detach().T).max(dim=1).values
    assert best_cos.mean() >= 0.9, best_cos
    # Noise share of the variance. An SAE that knew the dictionary and the support exactly would still leave the
    # noise outside the k_true active directions, (d - k) / d of it; allow as much again for the encoder's error.
    noise_fvu = x.shape[0] * d * sigma**2 / float((x - x.mean(0)).pow(2).sum())
    floor = (d - k_true) / d * noise_fvu
    assert _fvu(sae, x) <= 2 * floor, (_fvu(sae, x), floor)


def test_planted_dictionary_in_superposition():
    # Twice as many directions as dimensions: a linear encoder suffers interference, so the bar is recovery of the
    # directions and beating an SAE built from the planted dictionary itself (tied encoder, true offset).
    d, n_planted, k_true, sigma = 32, 64, 4, 0.05
    x, D, offset = _planted_data(d, n_planted, k_true, sigma, 8192)
    sae = _train_planted(x, n_latents=2 * n_planted, k=k_true)
    best_cos = (D @ sae.W_dec.detach().T).max(dim=1).values
    assert best_cos.mean() >= 0.9, best_cos
    oracle = TopKSae(n_planted, d, k_true)
    with torch.no_grad():
        oracle.W_dec.copy_(D)
        oracle.W_enc.copy_(D)
        oracle.b_dec.copy_(offset)
    assert _fvu(sae, x) < 0.5 * _fvu(oracle, x)


# ------------------------------------------------------------------------------------------------ AuxK gradients
def _dense_losses(params: dict[str, torch.Tensor], x, k, dead, k_aux, auxk_coef):
    pre = (x - params["b_dec"]) @ params["W_enc"].T + params["b_enc"]
    top = pre.topk(k, dim=1)
    code = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    x_hat = code @ params["W_dec"] + params["b_dec"]
    err = x - x_hat
    fvu = err.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    aux = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
    aux_code = torch.zeros_like(pre).scatter(1, aux.indices, torch.relu(aux.values))
    target = err.detach()
    auxk = (target - aux_code @ params["W_dec"]).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
    return fvu + auxk_coef * auxk, fvu, auxk


@pytest.mark.parametrize("auxk_coef", [1.0 / 32.0, 0.5])
def test_auxk_gradients_reach_encoder_and_decoder_like_dense_reference(auxk_coef):
    torch.manual_seed(1)
    n, d, k, k_aux = 64, 16, 2, 8
    sae = TopKSae(n, d, k)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.1)
        sae.b_dec.normal_(std=0.1)
    x = torch.randn(16, d)
    with torch.no_grad():
        used = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        used = torch.zeros(n, dtype=torch.bool).index_fill_(0, used.topk(k, dim=1).indices.reshape(-1), True)
    dead = ~used  # never in a top-k on this batch: only AuxK can move these latents
    assert dead.sum() >= k_aux

    trainer = SaeTrainer(sae)
    out = trainer.compute_losses(x, dead_mask=dead, k_aux=k_aux, auxk_coef=auxk_coef)
    out.loss.backward()

    ref_params = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters()}
    loss, fvu, auxk = _dense_losses(ref_params, x, k, dead, k_aux, auxk_coef)
    loss.backward()
    torch.testing.assert_close(out.loss.detach(), loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.fvu, fvu.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.auxk_loss, auxk.detach(), rtol=1e-5, atol=1e-6)
    assert float(auxk.detach()) > 0
    for name, param in sae.named_parameters():
        torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # The dead rows get gradient only through AuxK, in both the encoder and the decoder.
    assert sae.W_dec.grad[dead].abs().sum() > 0
    assert sae.W_enc.grad[dead].abs().sum() > 0
    assert sae.b_enc.grad[dead].abs().sum() > 0


def test_without_auxk_dead_latents_get_no_gradient():
    torch.manual_seed(2)
    sae = TopKSae(64, 16, 2)
    x = torch.randn(16, 16)
    with torch.no_grad():
        idx = sae.encode(x).indices
    dead = torch.ones(64, dtype=torch.bool).index_fill_(0, idx.reshape(-1), False)
    out = SaeTrainer(sae).compute_losses(x, dead_mask=dead, k_aux=8, auxk_coef=0.0)
    out.loss.backward()
    assert float(out.auxk_loss) == 0.0
    assert sae.W_dec.grad[dead].abs().sum() == 0 and sae.W_enc.grad[dead].abs().sum() == 0


def test_decoder_rows_stay_unit_norm_and_parallel_gradient_is_removed():
    torch.manual_seed(3)
    sae = TopKSae(32, 8, 3)
    trainer = SaeTrainer(sae)
    x = torch.randn(64, 8)
    trainer.compute_losses(x).loss.backward()
    trainer._remove_parallel_grad()
    along = (sae.W_dec.grad * sae.W_dec.detach()).sum(dim=1)
    torch.testing.assert_close(along, torch.zeros(32), atol=1e-6, rtol=0)
    cfg = SaeTrainingConfig(batch_size=64, n_tokens=64 * 20, lr=5e-2, **QUIET)
    trainer.train_on_tensor(torch.randn(640, 8) * 3 + 1, cfg)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ stored runs
@pytest.fixture
def gpt2_run(tiny_gpt2, sample_texts):
    """Activations of block 1 of the tiny GPT-2 over the sample texts (x3), saved in the store."""
    layer = tiny_gpt2.layers.resolve(1)
    run_id = tiny_gpt2.activations.save(
        sample_texts * 3, layers=layer, run_id="acts", batch_size=8, max_length=32, progress=False
    )
    return tiny_gpt2.store, run_id, layer, tiny_gpt2.model_id


def _run_config(**overrides) -> SaeTrainingConfig:
    base = dict(
        batch_size=64,
        n_tokens=64 * 60,
        lr=1e-2,
        warmup_steps=3,
        dead_window_tokens=128,
        k_aux=8,
        log_every=5,
        checkpoint_every=4,
        progress=False,
        b_dec_init="geometric_median",
    )
    base.update(overrides)
    return SaeTrainingConfig(**base)


def test_training_on_saved_activations_writes_history_checkpoints_and_sae(gpt2_run):
    store, run_id, layer, model_id = gpt2_run
    sae = TopKSae(128, 32, 4)
    result = sae.train(store, run_id, layer, _run_config(training_run_id="t1"))
    assert result.training_run_id == "t1" and result.sae_id == "t1" and result.steps == 60
    assert result.tokens == 60 * 64

    history = store.get_json("runs/t1/training_history.json")
    assert history == result.history and [r["step"] for r in history] == list(range(5, 61, 5))
    keys = {"step", "tokens", "loss", "mse", "fvu", "l0", "dead_fraction", "auxk_loss", "tokens_per_s", "lr"}
    assert keys <= set(history[0])
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert all(r["l0"] <= 4 for r in history) and all(0 <= r["dead_fraction"] <= 1 for r in history)
    assert any(r["auxk_loss"] > 0 for r in history), "the short dead window must switch AuxK on"

    run_config = store.get_json("runs/t1/config.json")
    assert run_config["status"] == "completed" and run_config["layer"] == layer
    assert run_config["training_config"] == _run_config(training_run_id="t1").to_dict()
    assert "fused" in run_config["optimizer"]  # CPU Adam has a fused implementation in this torch
    checkpoint = store.get_torch("runs/t1/checkpoint.pt")
    assert checkpoint["step"] == 56  # the last multiple of checkpoint_every before the end

    loaded = TopKSae.load(store, "t1")
    assert loaded.metadata["layer"] == layer and loaded.metadata["model_id"] == model_id
    assert loaded.metadata["training_run_id"] == "t1" and loaded.metadata["activation_run_id"] == run_id
    for name, param in sae.named_parameters():
        assert torch.equal(param, getattr(loaded, name))


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(gpt2_run):
    store, run_id, layer, _ = gpt2_run
    reference = TopKSae(128, 32, 4)
    full = SaeTrainer(reference, store).train(run_id, layer, _run_config(training_run_id="full"))

    def stop_at_13(info):
        if info.step == 13:
            raise _Interrupt

    interrupted = TopKSae(128, 32, 4)
    with pytest.raises(_Interrupt):
        SaeTrainer(interrupted, store).train(run_id, layer, _run_config(training_run_id="cut"), callbacks=[stop_at_13])
    assert store.get_torch("runs/cut/checkpoint.pt")["step"] == 12

    resumed_sae = TopKSae(128, 32, 4)  # fresh weights: everything must come from the checkpoint
    resumed = SaeTrainer(resumed_sae, store).train(run_id, layer, _run_config(training_run_id="cut", resume=True))
    assert resumed.resumed_from_step == 12 and resumed.steps == full.steps == 60
    for name, param in reference.named_parameters():
        assert torch.equal(param, getattr(resumed_sae, name)), name

    def strip(history):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in history]

    assert strip(resumed.history) == strip(full.history)


def test_resume_refuses_a_changed_configuration(gpt2_run):
    store, run_id, layer, _ = gpt2_run

    def stop(info):
        if info.step == 5:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        TopKSae(64, 32, 4).train(store, run_id, layer, _run_config(training_run_id="r"), callbacks=[stop])
    with pytest.raises(ValueError, match=r"lr: 0.01 -> 0.02"):
        TopKSae(64, 32, 4).train(store, run_id, layer, _run_config(training_run_id="r", resume=True, lr=2e-2))
    with pytest.raises(ValueError, match=r"\[64, 32, 4\].*\[64, 32, 8\]"):
        TopKSae(64, 32, 8).train(store, run_id, layer, _run_config(training_run_id="r", resume=True))


def test_bf16_encoder_product_trains_with_fp32_master_weights(gpt2_run):
    store, run_id, layer, _ = gpt2_run
    sae = TopKSae(64, 32, 4)
    result = sae.train(store, run_id, layer, _run_config(encode_dtype="bfloat16", checkpoint_every=None, save_sae=False))
    assert sae.W_enc.dtype == torch.float32 and sae.W_dec.dtype == torch.float32
    assert result.history[-1]["loss"] < 0.7 * result.history[0]["loss"]


def test_training_bad_input(gpt2_run):
    store, run_id, layer, _ = gpt2_run
    sae = TopKSae(64, 32, 4)
    with pytest.raises(ValueError, match="unknown activation run_id 'missing'.*acts"):
        sae.train(store, "missing", layer, _run_config())
    with pytest.raises(ValueError, match="layer 'transformer.h.9' is not stored.*transformer.h.1"):
        sae.train(store, run_id, "transformer.h.9", _run_config())
    with pytest.raises(ValueError, match="width 32 but the SAE has n_inputs=16"):
        TopKSae(64, 16, 4).train(store, run_id, layer, _run_config())
    with pytest.raises(ValueError, match="k_aux must be <= n_latents=64"):
        sae.train(store, run_id, layer, _run_config(k_aux=65))
    with pytest.raises(TypeError, match="SaeTrainingConfig"):
        sae.train(store, run_id, layer, {"lr": 1e-3})
    with pytest.raises(ValueError, match="run_id and layer"):
        sae.train(store, run_id)
    with pytest.raises(TypeError, match="TopKSae"):
        SaeTrainer(torch.nn.Linear(2, 2), store)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        SaeTrainer(sae).train_on_tensor(torch.randn(10, 32), SaeTrainingConfig(batch_size=64, **QUIET))
    with pytest.raises(ValueError, match="need a store"):
        SaeTrainer(sae).train_on_tensor(torch.randn(128, 32), SaeTrainingConfig(batch_size=64))


# ------------------------------------------------------------------------------------------------ non-finite data
def test_nonfinite_batches_are_skipped_and_counted():
    x = torch.randn(64 * 40, 8)
    x[64 * 7 + 3, 2] = float("nan")  # batch 7 (no shuffling)
    x[64 * 20, 0] = float("inf")  # batch 20
    sae = TopKSae(16, 8, 2)
    cfg = SaeTrainingConfig(batch_size=64, epochs=1, shuffle=False, max_nonfinite_fraction=0.1, **QUIET)
    result = SaeTrainer(sae).train_on_tensor(x, cfg)
    # Skipped batches do not count towards the budget: the 40 planned steps all happen (2 batches of epoch 2).
    assert result.nonfinite_batches == 2 and result.steps == 40 and result.tokens == 40 * 64
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_too_many_nonfinite_batches_raise():
    x = torch.randn(64 * 20, 8)
    x[::64] = float("nan")  # every batch
    cfg = SaeTrainingConfig(
        batch_size=64, epochs=1, shuffle=False, b_dec_init="zeros", max_nonfinite_fraction=1.0, **QUIET
    )
    with pytest.raises(NonFiniteTrainingError, match="every one of the 20 batches of epoch 0"):
        SaeTrainer(TopKSae(16, 8, 2)).train_on_tensor(x, cfg)
    x = torch.randn(64 * 20, 8)
    x[:: 2 * 64] = float("nan")  # batches 0, 2, 4, ...: checked from the 10th batch on, at the next bad one
    cfg = SaeTrainingConfig(batch_size=64, epochs=1, shuffle=False, nonfinite_grace_batches=10, **QUIET)
    with pytest.raises(NonFiniteTrainingError, match=r"6 of 11 batches.*max_nonfinite_fraction=0.01"):
        SaeTrainer(TopKSae(16, 8, 2)).train_on_tensor(x, cfg)


# ------------------------------------------------------------------------------------------------ helpers
def test_geometric_median_matches_median_in_1d_and_resists_outliers():
    values = torch.tensor([0.0, 1.0, 2.0, 3.0, 100.0]).unsqueeze(1)
    assert float(geometric_median(values)) == pytest.approx(2.0, abs=1e-4)
    g = torch.Generator().manual_seed(0)
    cloud = torch.randn(501, 4, generator=g) * 0.1 + torch.tensor([1.0, -2.0, 0.5, 3.0])
    cloud[:50] += 1000.0  # 10% gross outliers
    med = geometric_median(cloud)
    assert (med - torch.tensor([1.0, -2.0, 0.5, 3.0])).norm() < 0.2
    assert (cloud.mean(0) - torch.tensor([1.0, -2.0, 0.5, 3.0])).norm() > 50

    def cost(p):
        return float((cloud.double() - p.double()).norm(dim=1).sum())

    for delta in torch.eye(4) * 1e-2:
        assert cost(med) <= cost(med + delta) and cost(med) <= cost(med - delta)
    with pytest.raises(ValueError, match="points"):
        geometric_median(torch.empty(0, 3))


def test_tensor_reader_resumes_exactly():
    data = torch.arange(100.0).reshape(50, 2)
    full = [b.clone() for b in TensorActivationReader(data, 8, seed=3)]
    assert len(full) == 6
    reader = TensorActivationReader(data, 8, seed=3)
    it = iter(reader)
    first = [next(it) for _ in range(2)]
    state = reader.state_dict()
    again = TensorActivationReader(data, 8, seed=3)
    again.load_state_dict(state)
    rest = list(again)
    assert all(torch.equal(a, b) for a, b in zip(first + rest, full)) and len(first + rest) == 6
    with pytest.raises(ValueError, match="seed"):
        TensorActivationReader(data, 8, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        TensorActivationReader(data, 0)


@pytest.mark.parametrize("init", ["mean", "geometric_median"])
def test_decoder_bias_is_initialised_from_the_data(gpt2_run, init):
    store, run_id, layer, _ = gpt2_run
    real = []
    for index in store.list_batches(run_id):
        batch = store.load_batch(run_id, index, layer)
        real.append(batch.activations[batch.attention_mask.bool()])
    tokens = torch.cat(real).float()
    expected = tokens.mean(0) if init == "mean" else geometric_median(tokens)
    sae = TopKSae(64, 32, 4)
    # One step at a negligible learning rate: b_dec stays where the initialisation put it.
    cfg = _run_config(b_dec_init=init, b_dec_init_tokens=10_000, n_tokens=64, lr=1e-12, warmup_steps=0,
                      dead_window_tokens=64)  # a window may not exceed the budget
    sae.train(store, run_id, layer, cfg)
    torch.testing.assert_close(sae.b_dec.detach(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(sae.W_enc, sae.W_dec) or torch.allclose(sae.W_enc, sae.W_dec, atol=1e-9)


def test_norm_outliers_are_left_out_of_training_and_of_the_bias_init():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64 * 16, 8, generator=g) + 2.0
    sinks = torch.arange(0, x.shape[0], 50)  # attention-sink-like tokens with ~100x the norm
    x[sinks] = 300.0 * torch.randn(len(sinks), 8, generator=g).sign()
    inlier_mean = x[torch.ones(x.shape[0], dtype=torch.bool).index_fill_(0, sinks, False)].mean(0)
    sae = TopKSae(32, 8, 2)
    cfg = SaeTrainingConfig(batch_size=64, epochs=1, lr=1e-12, warmup_steps=0, b_dec_init="mean", **QUIET)
    result = SaeTrainer(sae).train_on_tensor(x, cfg)
    assert result.outlier_tokens == len(sinks) and result.history[-1]["outlier_tokens"] == len(sinks)
    assert result.tokens == x.shape[0] - len(sinks)
    torch.testing.assert_close(sae.b_dec.detach(), inlier_mean, rtol=1e-4, atol=1e-4)
    assert sae.outlier_norm_factor == 10.0
    kept_all = SaeTrainer(TopKSae(32, 8, 2)).train_on_tensor(
        x, SaeTrainingConfig(batch_size=64, epochs=1, outlier_norm_factor=None, **QUIET)
    )
    assert kept_all.outlier_tokens == 0 and kept_all.tokens == x.shape[0]
