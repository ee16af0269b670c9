"""TopKSae as a module: construction checks, encode/decode against a dense PyTorch reference, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from mi_crow.mechanistic.sae import SaeOutput, SparseCode, TopKSae


def _random_sae(n: int = 48, d: int = 12, k: int = 5, seed: int = 0, dtype: torch.dtype = torch.float32) -> TopKSae:
    torch.manual_seed(seed)
    sae = TopKSae(n, d, k, dtype=dtype)
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_(std=0.1)
        sae.b_dec.normal_(std=0.5)
    return sae


def _dense_reference(sae: TopKSae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense code and reconstruction computed with plain torch in float64."""
    W_enc, b_enc = sae.W_enc.double(), sae.b_enc.double()
    W_dec, b_dec = sae.W_dec.double(), sae.b_dec.double()
    flat = x.reshape(-1, sae.n_inputs).double()
    pre = (flat - b_dec) @ W_enc.T + b_enc
    top = pre.topk(sae.k, dim=1)
    dense = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    recon = dense @ W_dec + b_dec
    lead = x.shape[:-1]
    return dense.reshape(*lead, sae.n_latents), recon.reshape(*lead, sae.n_inputs)


@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12), (3, 1, 4, 12)])
def test_encode_decode_match_dense_reference(shape):
    sae = _random_sae()
    x = torch.randn(*shape)
    out = sae(x)
    assert isinstance(out, SaeOutput) and isinstance(out.code, SparseCode)
    assert out.code.values.shape == (*shape[:-1], sae.k)
    assert out.code.indices.shape == (*shape[:-1], sae.k)
    assert out.code.indices.dtype == torch.int64
    assert out.reconstruction.shape == x.shape
    dense_ref, recon_ref = _dense_reference(sae, x)
    # Compared through the dense view and the decoded output: both independent of top-k tie order.
    torch.testing.assert_close(sae.encode_dense(x).double(), dense_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.reconstruction.double(), recon_ref, rtol=1e-5, atol=1e-5)
    assert (out.code.values[..., :-1] >= out.code.values[..., 1:]).all(), "values must be sorted descending"
    assert (out.code.values >= 0).all()


def test_decode_accepts_extra_latents_and_plain_tuples():
    sae = _random_sae()
    x = torch.randn(4, 3, 12)
    code = sae.encode(x)
    extra_idx = torch.full((4, 3, 1), 7, dtype=torch.int64)
    extra_val = torch.full((4, 3, 1), 2.0)
    values = torch.cat([code.values, extra_val], dim=-1)
    indices = torch.cat([code.indices, extra_idx], dim=-1)
    got = sae.decode((values, indices))
    expected = sae.decode(code) + 2.0 * sae.W_dec[7].detach()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_parameters_shapes_and_unit_norm_decoder():
    sae = TopKSae(40, 10, 3)
    names = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert names == {"W_enc": (40, 10), "b_enc": (40,), "W_dec": (40, 10), "b_dec": (10,)}
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))
    # The encoder starts as the decoder's transpose ([n, d] layout: equal matrices).
    assert torch.equal(sae.W_enc, sae.W_dec)


def test_gradients_flow_to_all_parameters():
    sae = _random_sae()
    x = torch.randn(16, 12)
    out = sae(x)
    (out.reconstruction - x).pow(2).sum().backward()
    for name, param in sae.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_nn_module_train_flag_still_works():
    sae = TopKSae(8, 4, 2)
    assert sae.eval() is sae and sae.training is False
    assert sae.train() is sae and sae.training is True
    assert sae.train(mode=False) is sae and sae.training is False
    parent = torch.nn.Sequential(sae).eval()
    assert parent.training is False and sae.training is False


@pytest.mark.parametrize(
    ("args", "exc", "fragment"),
    [
        ((0, 8, 1), ValueError, "n_latents"),
        ((-4, 8, 1), ValueError, "n_latents"),
        ((8.0, 8, 1), TypeError, "n_latents"),
        ((True, 8, 1), TypeError, "n_latents"),
        ((16, 0, 1), ValueError, "n_inputs"),
        ((16, "8", 1), TypeError, "n_inputs"),
        ((16, 8, 0), ValueError, "k"),
        ((16, 8, 17), ValueError, "k must be <= n_latents=16"),
        ((16, 8, None), TypeError, "k"),
    ],
)
def test_bad_construction_arguments(args, exc, fragment):
    with pytest.raises(exc, match=fragment):
        TopKSae(*args)


def test_bad_dtype_device_and_mode():
    with pytest.raises(TypeError, match="dtype"):
        TopKSae(8, 4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="device"):
        TopKSae(8, 4, 2, device="not-a-device")
    with pytest.raises(ValueError, match="mode"):
        TopKSae(8, 4, 2, mode="splice")
    sae = TopKSae(8, 4, 2)
    with pytest.raises(ValueError, match="mode"):
        sae.mode = "additive"


def test_bad_encode_and_decode_inputs():
    sae = TopKSae(8, 4, 2)
    with pytest.raises(ValueError, match=r"n_inputs=4.*\(3, 5\)"):
        sae.encode(torch.randn(3, 5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        sae.encode([[0.0] * 4])
    with pytest.raises(TypeError, match="floating"):
        sae.encode(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="same shape"):
        sae.decode((torch.ones(3, 2), torch.zeros(3, 1, dtype=torch.int64)))
    with pytest.raises(TypeError, match="int64"):
        sae.decode((torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.int32)))


def test_save_load_roundtrip_is_bit_exact(store):
    sae = _random_sae(n=32, d=8, k=3, seed=3)
    sae.metadata.update(layer="transformer.h.1", model_id="tiny", training_run_id="run-x", activation_run_id="acts")
    sae.mode = "replace"
    key = sae.save(store, "my_sae")
    assert key == "sae_models/my_sae"

    files = set(store.list("sae_models/my_sae"))
    assert {"sae_models/my_sae/model.pt", "sae_models/my_sae/config.json"} <= files
    config = json.loads((store.base_path / "sae_models/my_sae/config.json").read_text())
    assert config["n_latents"] == 32 and config["n_inputs"] == 8 and config["k"] == 3
    assert config["dtype"] == "float32" and config["layer"] == "transformer.h.1" and config["model_id"] == "tiny"
    assert config["training_run_id"] == "run-x" and "mi_crow_version" in config
    # Weights are a plain state dict: loadable without unpickling anything.
    raw = torch.load(store.base_path / "sae_models/my_sae/model.pt", weights_only=True)
    assert set(raw) == {"W_enc", "b_enc", "W_dec", "b_dec"}

    x = torch.randn(5, 8)
    for loaded in (
        TopKSae.load(store, "my_sae"),
        TopKSae.load_from_dir(store.base_path / "sae_models/my_sae"),
        TopKSae.load(str(store.base_path / "sae_models/my_sae")),
    ):
        for name, param in sae.named_parameters():
            assert torch.equal(param, getattr(loaded, name)), name
        assert (loaded.n_latents, loaded.n_inputs, loaded.k, loaded.dtype) == (32, 8, 3, torch.float32)
        assert loaded.mode == "replace"
        assert loaded.metadata == sae.metadata
        assert loaded.config_dict() == sae.config_dict()
        assert torch.equal(loaded(x).reconstruction, sae(x).reconstruction)


def test_save_load_bf16(store):
    sae = _random_sae(n=16, d=8, k=2, dtype=torch.bfloat16)
    sae.save(store, "bf")
    loaded = TopKSae.load(store, "bf")
    assert loaded.dtype == torch.bfloat16
    for name, param in sae.named_parameters():
        assert torch.equal(param, getattr(loaded, name))


def test_load_errors(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        TopKSae.load(store, "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        TopKSae.load_from_dir(tmp_path / "empty")
    with pytest.raises(ValueError, match="sae_id"):
        TopKSae.load(store, None)
    with pytest.raises(ValueError, match="sae_id"):
        TopKSae(8, 4, 2).save(store, "../escape")
    sae = TopKSae(8, 4, 2)
    sae.save(store, "broken")
    store.put_json("sae_models/broken/config.json", {"n_latents": 8, "n_inputs": 5, "k": 2, "dtype": "float32"})
    with pytest.raises(ValueError, match="W_enc.*shape"):
        TopKSae.load(store, "broken")
    store.put_json("sae_models/broken/config.json", {"n_latents": 8, "k": 2})
    with pytest.raises(ValueError, match="n_inputs"):
        TopKSae.load(store, "broken")


def test_concepts_are_saved_and_loaded_with_the_sae(store):
    sae = _random_sae(n=32, d=8, k=3)
    sae.concepts.name_concept(5, "rivers", "fires on water words")
    sae.concepts.manipulate_concept("rivers", 2.0)
    sae.save(store, "named")
    assert store.exists("sae_models/named/concepts.json")
    loaded = TopKSae.load(store, "named")
    assert loaded.concepts.find_concept("rivers") == 5
    # Saved steering is applied only on request (issue 17).
    assert loaded.concepts.get_manipulation_config() == {}
    loaded = TopKSae.load(store, "named", manipulations=True)
    assert loaded.concepts.get_manipulation_config() == sae.concepts.get_manipulation_config()
