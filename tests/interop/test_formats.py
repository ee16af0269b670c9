"""Loading SAEs in the other libraries' formats, checked against each library's documented formula computed here by
hand, and exporting ours so that it loads back identically.

The fixtures are built in code with the file names, tensor names, shapes and config fields of SAELens 6 (and < 6),
sparsify and dictionary_learning. The reference functions below restate each library's inference code
(``sae_lens/saes/topk_sae.py`` + ``SAE.process_sae_in``; ``sparsify/sparse_coder.py`` + ``fused_encoder.py``;
``dictionary_learning/trainers/top_k.py``) in plain PyTorch, independently of mi_crow's conversion code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mi_crow.errors import NotSupportedError, UserInputError
from mi_crow.mechanistic.sae import TopKSae
from mi_crow.store.errors import CorruptStoreFileError

N, D, K = 48, 12, 5


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _inputs(seed: int = 99) -> torch.Tensor:
    return _rand(20, D, seed=seed) * 2.0


# -- the libraries' formulas ---------------------------------------------------------------------------------------
def sae_lens_topk(x, W_enc, b_enc, W_dec, b_dec, k, *, apply_b_dec=True, rescale=False, scale=None):
    """SAELens TopKSAE.encode/decode (W_enc [d_in, d_sae]); ``scale`` is expected_average_only_in's factor."""
    sae_in = x * scale if scale is not None else x
    sae_in = sae_in - b_dec * apply_b_dec
    hidden_pre = sae_in @ W_enc + b_enc
    if rescale:
        hidden_pre = hidden_pre * W_dec.norm(dim=-1)
    top = torch.topk(hidden_pre, k, dim=-1)
    acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())
    dec_acts = acts / W_dec.norm(dim=-1) if rescale else acts
    out = dec_acts @ W_dec + b_dec
    return acts, (out / scale if scale is not None else out)


def sparsify_topk(x, enc_w, enc_b, W_dec, b_dec, k):
    pre = torch.relu(torch.nn.functional.linear(x - b_dec, enc_w, enc_b))
    values, indices = pre.topk(k, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, indices, values)
    return acts, acts @ W_dec + b_dec


def dictionary_learning_topk(x, enc_w, enc_b, dec_w, b_dec, k):
    post_relu = torch.relu(torch.nn.functional.linear(x - b_dec, enc_w, enc_b))
    top = post_relu.topk(k, dim=-1)
    acts = torch.zeros_like(post_relu).scatter(-1, top.indices, top.values)
    return acts, torch.nn.functional.linear(acts, dec_w) + b_dec


def _check(sae: TopKSae, x: torch.Tensor, acts: torch.Tensor, out: torch.Tensor, tol: float = 1e-5) -> None:
    got = sae.encode_dense(x)
    torch.testing.assert_close(got, acts, rtol=tol, atol=tol)
    torch.testing.assert_close(sae.decode(sae.encode(x)), out, rtol=tol, atol=tol)


# -- fixtures in each format -----------------------------------------------------------------------------------------
def write_sae_lens_v6(folder: Path, *, apply_b_dec=True, rescale=False, normalize="none", seed=0, **extra) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    W_enc, b_enc = _rand(D, N, seed=seed), _rand(N, seed=seed + 1) * 0.1
    W_dec, b_dec = _rand(N, D, seed=seed + 2) * 0.5, _rand(D, seed=seed + 3)
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec},
              str(folder / "sae_weights.safetensors"))
    cfg = {
        "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": normalize, "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.5.1", "model_name": "gpt2", "hook_name": "blocks.1.hook_resid_pre",
                     "hook_head_index": None, "prepend_bos": True},
        "architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": rescale,
    }
    cfg.update(extra)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)


def write_sparsify(folder: Path, seed=0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    t = {"encoder.weight": _rand(N, D, seed=seed), "encoder.bias": _rand(N, seed=seed + 1) * 0.1,
         "W_dec": _rand(N, D, seed=seed + 2) * 0.5, "b_dec": _rand(D, seed=seed + 3)}
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": N, "k": K,
        "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}))
    return t


def write_dictionary_learning(folder: Path, dict_class="AutoEncoderTopK", seed=0, config=True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    state = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(-1.0),
             "decoder.weight": _rand(D, N, seed=seed + 2) * 0.5, "encoder.weight": _rand(N, D, seed=seed),
             "encoder.bias": _rand(N, seed=seed + 1) * 0.1, "b_dec": _rand(D, seed=seed + 3)}
    torch.save(state, folder / "ae.pt")
    if config:
        (folder / "config.json").write_text(json.dumps({"trainer": {
            "trainer_class": "TopKTrainer", "dict_class": dict_class, "activation_dim": D, "dict_size": N, "k": K,
            "layer": 2, "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "resid_post_layer_2"}}))
    return state


# -- loaders against the formulas -----------------------------------------------------------------------------------
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("rescale", [False, True])
def test_sae_lens_topk_matches_its_formula(tmp_path, apply_b_dec, rescale):
    t = write_sae_lens_v6(tmp_path / "s", apply_b_dec=apply_b_dec, rescale=rescale)
    sae = TopKSae.from_pretrained(tmp_path / "s")
    x = _inputs()
    acts, out = sae_lens_topk(x, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], K, apply_b_dec=apply_b_dec,
                              rescale=rescale)
    _check(sae, x, acts, out)
    # GPT-2's hook_resid_pre of block 1 is the output of block 0.
    assert sae.layer_signature == "transformer.h.0"
    assert sae.metadata["hook_name"] == "blocks.1.hook_resid_pre"
    assert sae.metadata["model_id"] == "gpt2"


def test_sae_lens_expected_average_only_in_is_folded(tmp_path):
    t = write_sae_lens_v6(tmp_path / "s", normalize="expected_average_only_in")
    (tmp_path / "s" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.37}))
    sae = TopKSae.from_pretrained(tmp_path / "s")
    x = _inputs()
    acts, out = sae_lens_topk(x, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], K, scale=0.37)
    _check(sae, x, acts, out)


def test_sae_lens_before_6_topk_config(tmp_path):
    folder = tmp_path / "old"
    t = write_sae_lens_v6(folder)
    cfg = {"d_in": D, "d_sae": N, "dtype": "float32", "model_name": "gpt2", "hook_point": "blocks.2.hook_resid_post",
           "hook_point_layer": 2, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
           "apply_b_dec_to_input": True, "normalize_activations": False, "sae_lens_training_version": "3.5.0"}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = TopKSae.from_pretrained(folder)
    x = _inputs()
    _check(sae, x, *sae_lens_topk(x, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], K))
    assert sae.layer_signature == "transformer.h.2"


def test_sparsify_matches_its_formula(tmp_path):
    t = write_sparsify(tmp_path / "run" / "layers.1")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M"}))
    sae = TopKSae.from_pretrained(tmp_path / "run" / "layers.1")
    x = _inputs()
    _check(sae, x, *sparsify_topk(x, t["encoder.weight"], t["encoder.bias"], t["W_dec"], t["b_dec"], K))
    assert sae.layer_signature == "model.layers.1"  # a Llama-family name: sparsify's path under the base model


def test_dictionary_learning_topk_matches_its_formula(tmp_path):
    s = write_dictionary_learning(tmp_path / "dl")
    sae = TopKSae.from_pretrained(tmp_path / "dl" / "ae.pt")
    x = _inputs()
    _check(sae, x, *dictionary_learning_topk(x, s["encoder.weight"], s["encoder.bias"], s["decoder.weight"],
                                             s["b_dec"], K))
    assert sae.metadata["hook_name"] == "blocks.2.hook_resid_post"
    assert sae.layer_signature == "gpt_neox.layers.2"


# -- round trips -----------------------------------------------------------------------------------------------------
def _our_sae(seed: int = 3, dtype=torch.float32) -> TopKSae:
    sae = TopKSae(N, D, K, dtype=dtype)
    with torch.no_grad():
        sae.W_enc.copy_(_rand(N, D, seed=seed))
        sae.b_enc.copy_(_rand(N, seed=seed + 1) * 0.1)
        sae.b_dec.copy_(_rand(D, seed=seed + 2))
    sae.layer_signature = "model.layers.1"
    sae.metadata.update(layer="model.layers.1", model_id="HuggingFaceTB/SmolLM2-135M")
    return sae


@pytest.mark.parametrize("fmt", ["sae_lens", "sparsify", "dictionary_learning"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_then_load_is_identical(tmp_path, fmt, dtype):
    sae = _our_sae(dtype=dtype)
    folder = sae.export(tmp_path / "layers.1", format=fmt)
    back = TopKSae.from_pretrained(folder)
    assert back.dtype == dtype and (back.n_latents, back.n_inputs, back.k) == (N, D, K)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
    x = _inputs().to(dtype)
    assert torch.equal(back.encode_dense(x), sae.encode_dense(x))
    assert torch.equal(back.decode(back.encode(x)), sae.decode(sae.encode(x)))
    if fmt != "sparsify":  # sparsify files do not name the model, so the module prefix is unknown without it
        assert back.layer_signature == "model.layers.1"


def test_exported_files_have_the_libraries_layout(tmp_path):
    sae = _our_sae()
    sae.export(tmp_path / "sl", "sae_lens")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K and (cfg["d_in"], cfg["d_sae"]) == (D, N)
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["sae_lens_version"].startswith("6")
    w = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == {"W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D),
                                                         "b_dec": (D,)}
    sae.export(tmp_path / "sp", "sparsify")
    w = load_file(str(tmp_path / "sp" / "sae.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == {"encoder.weight": (N, D), "encoder.bias": (N,),
                                                         "W_dec": (N, D), "b_dec": (D,)}
    sae.export(tmp_path / "dl", "dictionary_learning")
    state = torch.load(tmp_path / "dl" / "ae.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {"k": (), "threshold": (), "decoder.weight": (D, N),
                                                             "encoder.weight": (N, D), "encoder.bias": (N,),
                                                             "b_dec": (D,)}
    trainer = json.loads((tmp_path / "dl" / "config.json").read_text())["trainer"]
    assert trainer["dict_class"] == "AutoEncoderTopK" and trainer["submodule_name"] == "resid_post_layer_1"


def test_our_own_format_loads_through_from_pretrained(tmp_path):
    sae = _our_sae()
    sae.save(name="mine", path=tmp_path)
    back = TopKSae.from_pretrained(tmp_path / "mine")
    assert torch.equal(back.W_enc, sae.W_enc) and back.layer_signature == "model.layers.1"


# -- bad input ------------------------------------------------------------------------------------------------------
def test_folder_in_no_format_lists_what_was_looked_for(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "weights.bin").write_bytes(b"0")
    with pytest.raises(UserInputError) as err:
        TopKSae.from_pretrained(tmp_path / "x")
    for name in ("cfg.json + sae_weights.safetensors", "cfg.json + sae.safetensors", "ae.pt", "config.yaml"):
        assert name in str(err.value)


def test_sparsify_run_folder_points_to_its_hook_points(tmp_path):
    write_sparsify(tmp_path / "run" / "layers.0")
    write_sparsify(tmp_path / "run" / "layers.1")
    with pytest.raises(UserInputError, match=r"hook points: \['layers.0', 'layers.1'\]"):
        TopKSae.from_pretrained(tmp_path / "run")


def test_config_contradicting_shapes_names_the_field(tmp_path):
    write_sae_lens_v6(tmp_path / "s", d_sae=N + 1)
    with pytest.raises(CorruptStoreFileError, match=r"W_enc has shape \(12, 48\).*d_sae=49"):
        TopKSae.from_pretrained(tmp_path / "s")
    write_sparsify(tmp_path / "sp")
    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    cfg["num_latents"] = 64
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptStoreFileError, match="num_latents=64"):
        TopKSae.from_pretrained(tmp_path / "sp")
    write_dictionary_learning(tmp_path / "dl")
    cfg = json.loads((tmp_path / "dl" / "config.json").read_text())
    cfg["trainer"]["dict_size"] = 7
    (tmp_path / "dl" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptStoreFileError, match=r"trainer.dict_size is 7"):
        TopKSae.from_pretrained(tmp_path / "dl")


@pytest.mark.parametrize("arch", ["gated", "matryoshka_batchtopk"])
def test_unknown_architecture_is_refused(tmp_path, arch):
    write_sae_lens_v6(tmp_path / "s", architecture=arch)
    with pytest.raises(NotSupportedError, match=f"not supported yet: architecture '{arch}'"):
        TopKSae.from_pretrained(tmp_path / "s")


@pytest.mark.parametrize("normalize", ["constant_norm_rescale", "layer_norm"])
def test_per_token_normalization_is_refused(tmp_path, normalize):
    write_sae_lens_v6(tmp_path / "s", normalize=normalize)
    with pytest.raises(NotSupportedError, match=f"normalize_activations='{normalize}'"):
        TopKSae.from_pretrained(tmp_path / "s")


def test_missing_scaling_factor_is_refused(tmp_path):
    write_sae_lens_v6(tmp_path / "s", normalize="expected_average_only_in")
    with pytest.raises(NotSupportedError, match="activation_scaler.json"):
        TopKSae.from_pretrained(tmp_path / "s")


def test_topk_or_batchtopk_needs_the_config(tmp_path):
    write_dictionary_learning(tmp_path / "dl", config=False)
    with pytest.raises(NotSupportedError, match="trainer.dict_class"):
        TopKSae.from_pretrained(tmp_path / "dl")


def test_pickled_objects_in_ae_pt_are_refused(tmp_path):
    folder = tmp_path / "dl"
    write_dictionary_learning(folder)
    torch.save({"ae": {"encoder.weight": torch.zeros(2, 2)}, "config": Path("x")}, folder / "ae.pt")
    with pytest.raises(CorruptStoreFileError, match="weights_only=True"):
        TopKSae.from_pretrained(folder)


def test_hook_not_in_the_model_and_width_mismatch(tmp_path, tiny_gpt2):
    write_sae_lens_v6(tmp_path / "s")  # blocks.1.hook_resid_pre of a width-12 SAE
    cfg_path = tmp_path / "s" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["metadata"]["hook_name"] = "blocks.7.hook_resid_post"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserInputError, match=r"blocks.7.hook_resid_post.*transformer.h.7.*not in the model"):
        TopKSae.from_pretrained(tmp_path / "s", model=tiny_gpt2)
    cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_post"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserInputError, match=r"width 32 in the model, but the SAE expects 12"):
        TopKSae.from_pretrained(tmp_path / "s", model=tiny_gpt2)


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(NotSupportedError, match="circuit-tracer runs transcoders"):
        _our_sae().export(tmp_path / "ct", "circuit_tracer")
    with pytest.raises(UserInputError, match="format must be one of"):
        _our_sae().export(tmp_path / "x", "safetensors")


def test_an_input_only_hook_leaves_the_layer_unset(tmp_path):
    """hook_resid_mid is the input of the pre-MLP norm: no module outputs it, so the SAE is not given a layer."""
    write_sae_lens_v6(tmp_path / "s", metadata={"sae_lens_version": "6.5.1", "model_name": "meta-llama/Llama-3.2-1B",
                                                  "hook_name": "blocks.4.hook_resid_mid"})
    sae = TopKSae.from_pretrained(tmp_path / "s")
    assert sae.layer_signature is None
    assert sae.metadata["hook_point"] == {"module": "model.layers.4.post_attention_layernorm", "side": "input"}
    assert "layer is left unset" in sae.metadata["import_notes"][-1]


def test_dictionary_learning_checkpoint_uses_the_run_config(tmp_path):
    state = write_dictionary_learning(tmp_path / "run")
    (tmp_path / "run" / "checkpoints").mkdir()
    torch.save(state, tmp_path / "run" / "checkpoints" / "ae_1000.pt")
    sae = TopKSae.from_pretrained(tmp_path / "run" / "checkpoints" / "ae_1000.pt")
    assert torch.equal(sae.W_enc, state["encoder.weight"]) and sae.metadata["hook_name"] == "blocks.2.hook_resid_post"


def test_dictionary_learning_backup_checkpoint_gets_its_norm_factor(tmp_path):
    """An interrupted run leaves {"ae", "optimizer", "config", "norm_factor", "step"} with unscaled biases; the
    library's scale_biases(norm_factor) (encoder.bias and b_dec times the factor) is applied on load."""
    folder = tmp_path / "dl"
    state = write_dictionary_learning(folder)
    torch.save({"step": 10, "ae": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
                "config": {"dict_class": "AutoEncoderTopK"}, "norm_factor": 2.5}, folder / "ae.pt")
    sae = TopKSae.from_pretrained(folder)
    x = _inputs()
    acts, out = dictionary_learning_topk(x, state["encoder.weight"], state["encoder.bias"] * 2.5,
                                         state["decoder.weight"], state["b_dec"] * 2.5, K)
    _check(sae, x, acts, out)
    assert "norm_factor 2.5" in sae.metadata["import_notes"][0]
