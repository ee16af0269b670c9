"""The SAE family's shared base: JumpReLU inference against a dense reference, the threshold selections, the
architecture recorded in config.json and `load_sae` dispatching on it."""

from __future__ import annotations

import json

import pytest
import torch

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae import (
    BatchTopKSae,
    JumpReLUSae,
    MatryoshkaSae,
    SaeBase,
    Transcoder,
    load_sae,
)
from mi_crow.mechanistic.sae.sae import LinearView, SaeOutput, SparseCode, TopKSae


def _fill(sae: SaeBase, seed: int = 0) -> SaeBase:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae


def _dense_jumprelu(x: torch.Tensor, sae: SaeBase, thr: torch.Tensor) -> torch.Tensor:
    """Independent reference: the dense pre-activation, masked by the threshold."""
    pre = (x - sae.b_dec) @ sae.W_enc.t() + sae.b_enc
    return torch.where(pre > thr, pre, torch.zeros_like(pre))


def test_jumprelu_encode_matches_dense_reference_per_latent_thresholds():
    sae = _fill(JumpReLUSae(96, 12, k=2))  # k=2 is far below the L0: the width must grow to be exact
    thr = torch.rand(96, generator=torch.Generator().manual_seed(1)) * 0.8
    sae.set_threshold(thr)
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        code = sae.encode(x)
        dense = sae.dense(code)
        expected = _dense_jumprelu(x, sae, thr)
    assert (expected > 0).sum(1).max() > 2
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(dense != 0, expected != 0)
    # The width is the largest L0 of a token; values sorted descending.
    assert code.values.shape[-1] == int((expected != 0).sum(1).max())
    assert torch.all(code.values[:, :-1] >= code.values[:, 1:])
    # Decode through the sparse path equals the dense product.
    recon = sae.decode(code)
    torch.testing.assert_close(recon, expected @ sae.W_dec.detach() + sae.b_dec.detach(), atol=1e-5, rtol=1e-5)


def test_jumprelu_global_threshold_is_stored_expanded_and_leading_dims_kept():
    sae = _fill(JumpReLUSae(32, 8, threshold=0.3))
    assert sae.threshold.shape == (32,) and torch.all(sae.threshold == 0.3)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        out = sae(x)
        expected = _dense_jumprelu(x.reshape(-1, 8), sae, torch.full((32,), 0.3))
    assert isinstance(out, SaeOutput)
    assert out.reconstruction.shape == (2, 3, 8)
    torch.testing.assert_close(sae.dense(out.code).reshape(-1, 32), expected, atol=1e-5, rtol=1e-5)


def test_jumprelu_token_with_nothing_active_gets_zero_slot():
    sae = _fill(JumpReLUSae(16, 4))
    sae.set_threshold(1e6)
    with torch.no_grad():
        code = sae.encode(torch.randn(3, 4))
    assert code.values.shape == (3, 1) and torch.all(code.values == 0)


def test_jumprelu_load_state_dict_fills_it_and_bad_threshold_is_named():
    src = _fill(JumpReLUSae(20, 6, threshold=0.1), seed=3)
    dst = JumpReLUSae(20, 6)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.threshold, src.threshold) and torch.equal(dst.W_enc, src.W_enc)
    with pytest.raises(UserInputError, match="threshold"):
        dst.set_threshold(torch.zeros(3))
    with pytest.raises(UserInputError, match="threshold"):
        dst.set_threshold(float("nan"))


def test_batchtopk_threshold_nan_falls_back_to_topk_then_thresholds():
    sae = _fill(BatchTopKSae(48, 10, 3))
    assert sae.threshold.dim() == 0 and torch.isnan(sae.threshold)
    x = torch.randn(25, 10)
    with torch.no_grad():
        ref = TopKSae(48, 10, 3)
        ref.load_state_dict({k: v for k, v in sae.state_dict().items() if k != "threshold"})
        assert torch.equal(sae.encode(x).indices, ref.encode(x).indices)
        sae.threshold.fill_(0.4)
        dense = sae.encode_dense(x)
    torch.testing.assert_close(dense, _dense_jumprelu(x, sae, torch.tensor(0.4)).relu(), atol=1e-5, rtol=1e-5)


def test_jumprelu_from_batchtopk_and_topk():
    bt = _fill(BatchTopKSae(30, 7, 2))
    with pytest.raises(UserInputError, match="threshold"):
        JumpReLUSae.from_sae(bt)
    bt.threshold.fill_(0.25)
    j = JumpReLUSae.from_sae(bt)
    x = torch.randn(9, 7)
    with torch.no_grad():
        torch.testing.assert_close(j.encode_dense(x), bt.encode_dense(x))
    tk = _fill(TopKSae(30, 7, 2), seed=5)
    per_latent = torch.linspace(0.0, 1.0, 30)
    j2 = JumpReLUSae.from_sae(tk, per_latent)
    assert torch.equal(j2.threshold, per_latent) and torch.equal(j2.W_dec, tk.W_dec)


ALL = [
    lambda: TopKSae(40, 8, 3),
    lambda: BatchTopKSae(40, 8, 3),
    lambda: JumpReLUSae(40, 8, threshold=0.2),
    lambda: MatryoshkaSae(40, 8, 3, [4, 12, 24]),
    lambda: MatryoshkaSae(40, 8, 3, [20, 20], batch_topk=False),
    lambda: Transcoder(40, 8, 6, 3),
    lambda: Transcoder(40, 8, 6, 3, skip=True, batch_topk=True),
]


@pytest.mark.parametrize("make", ALL)
def test_save_load_round_trip_records_architecture(make, tmp_path):
    sae = _fill(make(), seed=7)
    if hasattr(sae, "threshold") and sae.threshold.dim() == 0:
        sae.threshold.fill_(0.05)
    folder = sae.save(name="s", path=tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == sae.architecture and config["class"] == type(sae).__name__
    loaded = load_sae(folder)
    assert type(loaded) is type(sae)
    assert loaded.config_dict() == sae.config_dict()
    sd, ld = sae.state_dict(), loaded.state_dict()
    assert list(sd) == list(ld)
    for name in sd:
        assert torch.equal(sd[name], ld[name]), name
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x).reconstruction, sae(x).reconstruction)
    # The class's own load works too, and the base's.
    assert type(type(sae).load(folder)) is type(sae)
    assert type(SaeBase.load(path=folder)) is type(sae)


def test_load_sae_from_store_and_topk_load_refuses_other_architecture(tmp_path):
    from mi_crow.store import LocalStore

    store = LocalStore(tmp_path / "store")
    j = _fill(JumpReLUSae(16, 4, threshold=0.1))
    j.save(store, "jr")
    assert type(load_sae(store, "jr")) is JumpReLUSae
    with pytest.raises(UserInputError, match="JumpReLUSae"):
        TopKSae.load(store, "jr")
    TopKSae(16, 4, 2).save(store, "tk")
    assert type(load_sae(store, "tk")) is TopKSae


def test_old_config_without_architecture_loads_as_topk(tmp_path):
    sae = _fill(TopKSae(16, 4, 2))
    folder = sae.save(name="old", path=tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["architecture"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_sae(folder)
    assert type(loaded) is TopKSae and torch.equal(loaded.W_enc, sae.W_enc)


def test_transcoder_shapes_views_and_zero_decoder():
    t = Transcoder(32, 10, 6, 4, skip=True)
    assert t.W_enc.shape == (32, 10) and t.W_dec.shape == (32, 6) and t.b_dec.shape == (6,)
    assert t.W_skip.shape == (6, 10)
    assert torch.all(t.W_dec == 0) and torch.all(t.W_skip == 0)
    assert isinstance(t.decoder, LinearView) and t.decoder.weight.shape == (6, 32)
    assert t.decoder.out_features == 6 and t.encoder.in_features == 10
    _fill(t)
    x = torch.randn(7, 10)
    with torch.no_grad():
        out = t(x)
        # Reference: no input shift; dense top-k; decode plus skip.
        pre = x @ t.W_enc.t() + t.b_enc
        top = pre.topk(4, dim=1)
        dense = torch.zeros(7, 32).scatter(1, top.indices, top.values.relu())
        expected = dense @ t.W_dec + t.b_dec + x @ t.W_skip.t()
    torch.testing.assert_close(out.reconstruction, expected, atol=1e-5, rtol=1e-5)
    assert isinstance(out.code, SparseCode)


def test_transcoder_hook_replace_substitutes_prediction_observe_leaves_output():
    t = _fill(Transcoder(12, 5, 3, 2, skip=True))
    lin = torch.nn.Linear(5, 3)
    x = torch.randn(4, 5)
    with torch.no_grad():
        y = lin(x)
        assert t.modify_activations(lin, (x,), y) is None
        t.mode = "replace"
        out = t.modify_activations(lin, (x,), y)
        torch.testing.assert_close(out, t(x).reconstruction)
    with pytest.raises(UserInputError, match="n_outputs"):
        t.modify_activations(lin, (x,), torch.randn(4, 7))


def test_bad_construction_arguments_are_named():
    with pytest.raises(UserInputError, match="group_sizes.*sum to n_latents=40"):
        MatryoshkaSae(40, 8, 3, [8, 16])
    with pytest.raises(UserInputError, match="group_sizes"):
        MatryoshkaSae(40, 8, 3, [40, 0])
    with pytest.raises(UserInputError, match="k"):
        BatchTopKSae(8, 4, 9)
    with pytest.raises(TypeError, match="skip"):
        Transcoder(8, 4, 4, 2, skip="yes")


def test_topk_exported_as_jumprelu_with_estimated_thresholds():
    from mi_crow.mechanistic.sae.jumprelu import estimate_thresholds

    sae = _fill(TopKSae(40, 8, 3), seed=11)
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(12))
    thr = estimate_thresholds(sae, x)
    assert thr.shape == (40,)
    j = JumpReLUSae.from_sae(sae, thr)
    with torch.no_grad():
        topk_dense = sae.encode_dense(x)
        jr_dense = j.encode_dense(x)
    # Per-latent thresholds sit just below each latent's smallest kept value: every kept latent still fires,
    # with the same value.
    kept = topk_dense > 0
    assert bool((jr_dense[kept] > 0).all())
    torch.testing.assert_close(jr_dense[kept], topk_dense[kept], atol=1e-5, rtol=1e-5)
    g = estimate_thresholds(sae, x, per_latent=False)
    assert g.dim() == 0 and float(g) == pytest.approx(float(topk_dense[kept].min()))


def test_training_a_jumprelu_sae_is_refused_with_a_clear_error():
    from mi_crow.errors import NotSupportedError
    from mi_crow.mechanistic.sae import SaeTrainer

    with pytest.raises(NotSupportedError, match="JumpReLUSae is for inference only"):
        SaeTrainer(JumpReLUSae(8, 4)).compute_losses(torch.randn(3, 4))
