"""Transcoders and skip transcoders: the loss against an independent reference, training through SaeTrainer on
planted data (in memory and from a store run holding both layers), and the bad-input errors."""

from __future__ import annotations

import pytest
import torch

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, Transcoder, load_sae
from mi_crow.mechanistic.sae.synthetic import SyntheticConfig, make_ground_truth
from mi_crow.store import LocalStore


def _planted(n_tokens: int = 12_000):
    """x from planted features; y = the same features through another dictionary: a transcoder's ideal case."""
    truth = make_ground_truth(SyntheticConfig(d_in=24, n_features=32, mean_active=2.0, n_parents=4,
                                              children_per_parent=2, group_size=4, seed=0))
    x, acts = truth.sample(n_tokens, seed=1)
    out_dict = torch.nn.functional.normalize(torch.randn(32, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    return x, acts @ out_dict


def _config(**kw):
    base = dict(batch_size=256, epochs=3, lr=3e-3, progress=False, checkpoint_every=None, save_sae=False)
    return SaeTrainingConfig(**{**base, **kw})


def test_transcoder_loss_and_gradients_match_reference():
    torch.manual_seed(0)
    tc = Transcoder(20, 6, 4, 3, skip=True)
    with torch.no_grad():
        tc.W_dec.normal_()
        tc.W_skip.normal_()
    x, y = torch.randn(10, 6), torch.randn(10, 4)
    out = SaeTrainer(tc).compute_losses(torch.cat([x, y], 1))
    pre = x @ tc.W_enc.t() + tc.b_enc  # no b_dec shift for a transcoder
    top = pre.topk(3, dim=1)
    dense = torch.zeros(10, 20).scatter(1, top.indices, top.values.relu())
    y_hat = dense @ tc.W_dec + tc.b_dec + x @ tc.W_skip.t()
    fvu = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert float(out.fvu.detach()) == pytest.approx(float(fvu.detach()), rel=1e-5)
    # Gradients of the fused path equal autograd through the dense reference, every parameter (W_skip included).
    names = [name for name, _ in tc.named_parameters()]
    fused = torch.autograd.grad(out.loss, list(tc.parameters()))
    ref = torch.autograd.grad(fvu, list(tc.parameters()))
    for name, a, r in zip(names, fused, ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4, msg=name)
    assert float(fused[names.index("W_skip")].abs().sum()) > 0


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_trains_on_planted_pairs(skip):
    x, y = _planted()
    torch.manual_seed(0)
    tc = Transcoder(48, 24, 16, 2, skip=skip)
    assert torch.all(tc.W_dec == 0)  # decoder initialised at zero
    tc.train_on_tensors(x, y, _config())
    xt, yt = _planted(4096)
    with torch.no_grad():
        pred = tc(xt).reconstruction
    fvu = float(((yt - pred) ** 2).sum() / ((yt - yt.mean(0)) ** 2).sum())
    # The zero decoder predicts only b_dec at first (FVU about 1); one short run brings it well below.
    assert fvu < 0.5, fvu
    # Free decoder norms: the rows did not get renormalised to 1.
    norms = tc.W_dec.detach().norm(dim=1)
    assert float((norms - 1).abs().max()) > 0.05


def _store_run(tmp_path, x, y):
    store = LocalStore(tmp_path / "store")
    per = 1000
    for i in range(x.shape[0] // per):
        sl = slice(i * per, (i + 1) * per)
        store.write_activation_batch(
            "r", i, {"mlp_in": x[sl].reshape(10, 100, -1), "mlp_out": y[sl].reshape(10, 100, -1)},
            torch.ones(10, 100, dtype=torch.int64),
        )
    return store


def test_transcoder_trains_from_a_store_run_and_round_trips(tmp_path):
    x, y = _planted(8000)
    store = _store_run(tmp_path, x, y)
    torch.manual_seed(0)
    tc = Transcoder(48, 24, 16, 2, batch_topk=True)
    tc.train(store, "r", "mlp_in", _config(epochs=2), target_layer="mlp_out")
    with torch.no_grad():
        pred = tc(x[:2000]).reconstruction
    fvu = float(((y[:2000] - pred) ** 2).sum() / ((y[:2000] - y[:2000].mean(0)) ** 2).sum())
    assert fvu < 0.5, fvu
    assert torch.isfinite(tc.threshold)
    tc.save(store, "tc")
    back = load_sae(store, "tc")
    assert type(back) is Transcoder and back.metadata["target_layer"] == "mlp_out" and back.batch_topk
    # Bad input: a missing target layer, a width that differs from n_outputs.
    with pytest.raises(UserInputError, match="target_layer='nope' is not stored"):
        tc.train(store, "r", "mlp_in", _config(), target_layer="nope")
    with pytest.raises(UserInputError, match="target_layer='mlp_in'.*width 24.*n_outputs=16"):
        tc.train(store, "r", "mlp_in", _config(), target_layer="mlp_in")


def test_paired_store_readers_stay_aligned(tmp_path):
    x = torch.arange(2000 * 3, dtype=torch.float32).reshape(2000, 3)
    store = _store_run(tmp_path, x, x[:, :2] * 2)
    from mi_crow.mechanistic.sae.transcoder import PairedReader

    kw = dict(shuffle=True, seed=4, buffer_tokens=512, drop_last=True)
    reader = PairedReader(store.activation_reader("r", "mlp_in", 128, **kw),
                          store.activation_reader("r", "mlp_out", 128, **kw))
    for batch in reader:
        assert torch.equal(batch[:, 3:], batch[:, :2] * 2)


def test_mlp_transcoder_end_to_end_on_a_tiny_llama(tiny_llama, store, sample_texts):
    """Both hook points saved from one forward (the multi-layer save), trained from that run, then spliced in."""
    lm = tiny_llama
    inp, out = "model.layers.1.post_attention_layernorm", "model.layers.1.mlp"
    run = lm.activations.save(sample_texts, [inp, out], run_id="mlp", batch_size=8, max_length=24, progress=False)
    dims = store.read_run_meta(run)["layer_dims"]
    torch.manual_seed(0)
    tc = Transcoder(64, int(dims[inp]), int(dims[out]), 4, skip=True)
    tc.train(store, run, inp, _config(epochs=1, batch_size=64, b_dec_init_tokens=256), target_layer=out)
    texts = sample_texts[:4]
    clean = lm.forwards(texts).logits
    lm.attach_sae(tc, out)
    assert torch.equal(lm.forwards(texts).logits, clean)  # observe: bit-exact
    tc.mode = "replace"
    spliced = lm.forwards(texts).logits
    lm.detach_sae(tc)
    module = lm.layers.get_module(out)
    handle = module.register_forward_hook(lambda m, a, o: tc(a[0]).reconstruction.detach())
    try:
        expected = lm.forwards(texts, with_controllers=False).logits
    finally:
        handle.remove()
    assert not torch.allclose(spliced, clean)
    torch.testing.assert_close(spliced, expected, rtol=1e-5, atol=1e-5)
