"""DOCUMENTED_API.md, "SAEs, training, concepts": the SAE object, its parameter views and its files.

Every test checks a documented call shape against an independent computation (plain ``torch.nn.functional`` on the
raw parameters, what was written to disk, ``torch.load`` of the file).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mi_crow.mechanistic.sae import TopKSae


def _sae(n: int = 24, d: int = 8, k: int = 3, seed: int = 0) -> TopKSae:
    torch.manual_seed(seed)
    sae = TopKSae(n_latents=n, n_inputs=d, k=k, device="cpu")
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    return sae


def test_documented_import_paths_give_the_same_objects():
    import mi_crow.mechanistic.sae as sae_pkg
    from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig
    from mi_crow.mechanistic.sae import train as train_pkg
    from mi_crow.mechanistic.sae.modules import TopKSae as ModulesTopKSae
    from mi_crow.mechanistic.sae.modules import TopKSaeTrainingConfig as ModulesConfig
    from mi_crow.mechanistic.sae.modules.topk_sae import TopKSae as TopKSaeFromModule
    from mi_crow.mechanistic.sae.modules.topk_sae import TopKSaeTrainingConfig

    assert ModulesTopKSae is TopKSaeFromModule is sae_pkg.TopKSae is TopKSae
    assert TopKSaeTrainingConfig is ModulesConfig is SaeTrainingConfig is train_pkg.SaeTrainingConfig
    assert SaeTrainer is train_pkg.SaeTrainer


def test_keyword_construction_and_k():
    sae = TopKSae(n_latents=32, n_inputs=8, k=4, device="cpu")
    assert (sae.n_latents, sae.n_inputs, sae.k) == (32, 8, 4)
    assert sae.device == torch.device("cpu")


def test_encoder_and_decoder_views_are_the_parameters():
    sae = _sae()
    assert sae.encoder.weight.shape == (24, 8) and sae.encoder.bias.shape == (24,)
    assert sae.decoder.weight.shape == (8, 24) and sae.decoder.bias.shape == (8,)
    # Views, not copies: same storage as the parameters.
    assert sae.encoder.weight is sae.W_enc and sae.encoder.bias is sae.b_enc
    assert sae.decoder.weight.data_ptr() == sae.W_dec.data_ptr() and torch.equal(sae.decoder.weight, sae.W_dec.t())
    assert sae.decoder.bias is sae.b_dec
    # The views are not submodules: the state dict keeps exactly the four parameters.
    assert list(sae.state_dict()) == ["W_enc", "b_enc", "W_dec", "b_dec"]
    # The documented "is it learning" check runs.
    assert sae.encoder.weight.var().item() > 0


def test_views_compute_what_the_sae_computes():
    """nn.Linear semantics of the views, checked against encode/decode."""
    sae = _sae()
    x = torch.randn(5, 8)
    pre = F.relu(F.linear(x - sae.decoder.bias, sae.encoder.weight, sae.encoder.bias)).detach()
    want = pre.topk(sae.k, dim=-1).values
    code = sae.encode(x)
    torch.testing.assert_close(code.values, want)
    dense = sae.dense(code)
    recon = F.linear(dense, sae.decoder.weight, sae.decoder.bias)
    torch.testing.assert_close(recon, sae.decode(code), rtol=1e-5, atol=1e-5)


def test_writes_through_the_views_change_the_sae():
    sae = _sae()
    x = torch.randn(4, 8)
    before = sae(x).reconstruction.detach().clone()
    direction = torch.arange(8, dtype=torch.float32)
    with torch.no_grad():
        sae.decoder.weight[:, 5] = direction
        sae.encoder.weight[2].zero_()
        sae.decoder.bias.add_(1.0)
    assert torch.equal(sae.W_dec[5], direction)
    assert torch.equal(sae.W_enc[2], torch.zeros(8))
    sae.decoder.weight.data[:, 6] = 3.0  # through .data, as training scripts do
    assert torch.equal(sae.W_dec[6], torch.full((8,), 3.0))
    # Assigning a whole tensor copies it in.
    new_w = torch.randn(8, 24)
    sae.decoder.weight = new_w
    assert torch.equal(sae.W_dec, new_w.t())
    new_b = torch.randn(24)
    sae.encoder.bias = new_b
    assert torch.equal(sae.b_enc, new_b)
    assert not torch.equal(sae(x).reconstruction, before)


def test_view_assignment_of_a_wrong_shape_names_it():
    sae = _sae()
    with pytest.raises(ValueError, match=r"sae\.decoder\.weight must be set to a tensor of shape \[8, 24\], got \[24, 8\]"):
        sae.decoder.weight = torch.zeros(24, 8)
    with pytest.raises(TypeError, match=r"sae\.encoder\.bias must be set to a torch\.Tensor, got list"):
        sae.encoder.bias = [0.0] * 24


# -- the store layout of the seed: sae_models/<sae_id>/model.pt next to config.json ---------------------------------


class _NotATensor:
    """Something a pickle can hold but weights_only=True refuses."""

    def __init__(self) -> None:
        self.payload = "arbitrary object"


def _same_outputs(a: TopKSae, b: TopKSae) -> None:
    x = torch.randn(6, a.n_inputs, generator=torch.Generator().manual_seed(1))
    ra, rb = a(x), b(x)
    assert torch.equal(ra.reconstruction, rb.reconstruction)
    assert torch.equal(ra.code.indices, rb.code.indices) and torch.equal(ra.code.values, rb.code.values)


def test_store_save_writes_model_pt_that_weights_only_load_reads(store):
    sae = _sae()
    key = sae.save(store, "s1")
    folder = store.base_path / "sae_models" / "s1"
    assert key == "sae_models/s1"
    assert (folder / "model.pt").is_file() and (folder / "config.json").is_file()
    assert not (folder / "model.safetensors").exists()
    state = torch.load(folder / "model.pt", weights_only=True)
    assert set(state) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, tensor in state.items():
        assert torch.equal(tensor, getattr(sae, name)), name
    config = json.loads((folder / "config.json").read_text())
    assert (config["n_latents"], config["n_inputs"], config["k"]) == (24, 8, 3)
    # The file is a plain state dict: a fresh SAE of the same shape takes it as it is.
    fresh = TopKSae(n_latents=24, n_inputs=8, k=3, device="cpu")
    fresh.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    _same_outputs(sae, fresh)


def test_load_from_store_folder_and_model_pt(store):
    sae = _sae(seed=2)
    sae.save(store, "s2")
    folder = store.base_path / "sae_models" / "s2"
    for loaded in (
        TopKSae.load(store, "s2"),
        TopKSae.load(folder),
        TopKSae.load(str(folder)),
        TopKSae.load(folder / "model.pt"),
        TopKSae.load(path=folder),
    ):
        assert (loaded.n_latents, loaded.n_inputs, loaded.k) == (24, 8, 3)
        _same_outputs(sae, loaded)


def test_save_name_path_round_trip(tmp_path, monkeypatch):
    sae = _sae(seed=3)
    sae.concepts.name_concept(4, "four")
    sae.concepts.manipulate_concept(neuron_idx=4, scale=0.5)
    folder = sae.save(name="my_sae", path=tmp_path)
    assert folder == tmp_path / "my_sae"
    assert sorted(p.name for p in folder.iterdir()) == ["concepts.json", "config.json", "model.pt"]
    for loaded in (TopKSae.load(folder), TopKSae.load(folder / "model.pt"), TopKSae.load(tmp_path / "my_sae.pt")):
        _same_outputs(sae, loaded)
        assert loaded.concepts.find_concept("four") == 4
        assert loaded.concepts.get_manipulation_config() == {}  # saved steering loads only on request
        assert loaded.concepts.saved_manipulations["scales"] == [{"neuron": 4, "name": "four", "scale": 0.5}]
    # Positional name and path, and the current directory when no path is given.
    assert sae.save("again", tmp_path) == tmp_path / "again"
    monkeypatch.chdir(tmp_path)
    assert sae.save(name="here") == tmp_path / "here"
    _same_outputs(sae, TopKSae.load("here"))


def test_legacy_safetensors_folders_still_load(store):
    from safetensors.torch import save_file

    sae = _sae(seed=4)
    folder = store.base_path / "sae_models" / "old"
    folder.mkdir(parents=True)
    # What earlier versions wrote: model.safetensors beside config.json.
    save_file({name: getattr(sae, name).detach().contiguous() for name in ("W_enc", "b_enc", "W_dec", "b_dec")},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(sae.config_dict()))
    for loaded in (TopKSae.load(store, "old"), TopKSae.load(folder)):
        _same_outputs(sae, loaded)
    # Saving again writes the seed's layout and drops the stale copy.
    TopKSae.load(store, "old").save(store, "old")
    assert (folder / "model.pt").is_file() and not (folder / "model.safetensors").exists()
    _same_outputs(sae, TopKSae.load(store, "old"))


def test_model_pt_with_anything_but_tensors_is_refused_with_its_path(store):
    from mi_crow.store.errors import CorruptStoreFileError

    sae = _sae(seed=5)
    sae.save(store, "evil")
    model_pt = store.base_path / "sae_models" / "evil" / "model.pt"
    state = {name: getattr(sae, name).detach() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    torch.save({**state, "extra": _NotATensor()}, model_pt)
    with pytest.raises(CorruptStoreFileError, match=rf"{model_pt}.*weights_only=True.*_NotATensor") as info:
        TopKSae.load(store, "evil")
    assert isinstance(info.value, ValueError)
    # Plain values pass weights_only but are not a state dict of tensors either.
    torch.save({**state, "note": "hello"}, model_pt)
    with pytest.raises(CorruptStoreFileError, match=rf"{model_pt} must hold only tensors.*'note': str"):
        TopKSae.load(model_pt)
    torch.save([state["W_enc"]], model_pt)
    with pytest.raises(CorruptStoreFileError, match=rf"{model_pt} must hold a state dict.*got list"):
        TopKSae.load(store, "evil")


def test_bad_save_and_load_arguments(store, tmp_path):
    sae = _sae()
    with pytest.raises(ValueError, match=r"sae_id and name .*sae_id='a' and name='b'"):
        sae.save(store, "a", name="b")
    with pytest.raises(ValueError, match="path is for saving to a folder"):
        sae.save(store, "a", path=tmp_path)
    with pytest.raises(TypeError, match="first argument must be a Store .* got int"):
        sae.save(3, "x")
    with pytest.raises(ValueError, match="sae_id is required"):
        TopKSae.load(store)
    with pytest.raises(FileNotFoundError, match="missing"):
        TopKSae.load(tmp_path / "nothing_here")
    with pytest.raises(FileNotFoundError, match="no saved SAE 'absent'"):
        TopKSae.load(store, "absent")
