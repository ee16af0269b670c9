"""JumpReLU, ReLU ("standard"), BatchTopK SAEs and transcoders in the other libraries' formats: each loader against
the library's formula computed by hand, export round trips, and the circuit-tracer transcoder set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mi_crow.errors import NotSupportedError, UserInputError
from mi_crow.mechanistic.sae import BatchTopKSae, JumpReLUSae, SaeBase, TopKSae, Transcoder
from mi_crow.mechanistic.sae.interop import SaeParts, export_sae
from mi_crow.mechanistic.sae.interop.circuit_tracer import read_circuit_tracer, write_circuit_tracer

N, D, D_OUT, K = 40, 10, 14, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _x(d: int = D) -> torch.Tensor:
    return _rand(16, d, seed=77) * 2


def _check(sae: SaeBase, x: torch.Tensor, acts: torch.Tensor, out: torch.Tensor) -> None:
    torch.testing.assert_close(sae.encode_dense(x), acts, **TOL)
    code = sae.encode(x)
    torch.testing.assert_close(sae.predict(x, code), out, **TOL)


def _sae_lens(folder: Path, arch: str, tensors: dict, **cfg_extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": tensors["W_enc"].shape[0], "d_sae": tensors["W_enc"].shape[1],
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.0", "model_name": "gpt2", "hook_name": "blocks.2.hook_resid_post"}}
    cfg.update(cfg_extra)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _ae_tensors(seed: int = 0, d_out: int = D) -> dict:
    return {"W_enc": _rand(D, N, seed=seed), "b_enc": _rand(N, seed=seed + 1) * 0.2,
            "W_dec": _rand(N, d_out, seed=seed + 2) * 0.5, "b_dec": _rand(d_out, seed=seed + 3)}


# -- SAELens --------------------------------------------------------------------------------------------------------
def test_sae_lens_jumprelu(tmp_path):
    t = _ae_tensors()
    t["threshold"] = _rand(N, seed=9).abs() * 0.5 - 0.1  # a few negative thresholds too
    _sae_lens(tmp_path / "j", "jumprelu", t)
    sae = SaeBase.from_pretrained(tmp_path / "j")
    assert type(sae) is JumpReLUSae and sae.layer_signature == "transformer.h.2"
    x = _x()
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    acts = pre.relu() * (pre > t["threshold"])  # SAELens JumpReLUSAE.encode
    _check(sae, x, acts, acts @ t["W_dec"] + t["b_dec"])
    with pytest.raises(UserInputError, match="loads as JumpReLUSae, not TopKSae"):
        TopKSae.from_pretrained(tmp_path / "j")


def test_sae_lens_standard_is_jumprelu_at_zero(tmp_path):
    t = _ae_tensors(seed=1)
    _sae_lens(tmp_path / "s", "standard", t)
    sae = JumpReLUSae.from_pretrained(tmp_path / "s")
    x = _x()
    acts = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu()
    _check(sae, x, acts, acts @ t["W_dec"] + t["b_dec"])
    assert torch.equal(sae.threshold, torch.zeros(N))


def test_sae_lens_skip_transcoder(tmp_path):
    t = _ae_tensors(seed=2, d_out=D_OUT)
    t["W_skip"] = _rand(D_OUT, D, seed=11) * 0.1
    _sae_lens(tmp_path / "tc", "skip_transcoder", t, d_out=D_OUT, apply_b_dec_to_input=False, metadata={
        "sae_lens_version": "6.54.0", "model_name": "meta-llama/Llama-3.2-1B",
        "hook_name": "blocks.3.mlp.hook_in", "hook_name_out": "blocks.3.hook_mlp_out"})
    sae = SaeBase.from_pretrained(tmp_path / "tc")
    assert type(sae) is Transcoder and sae.skip and (sae.n_inputs, sae.n_outputs) == (D, D_OUT)
    assert sae.layer_signature == "model.layers.3.mlp"  # reads the MLP's input, predicts its output
    x = _x()
    acts = (x @ t["W_enc"] + t["b_enc"]).relu()  # SAELens Transcoder: no b_dec on the input
    _check(sae, x, acts, acts @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T)


def _capture(model: torch.nn.Module, module: str) -> torch.Tensor:
    """The output of ``module`` on a fixed batch."""
    seen = []
    handle = dict(model.named_modules())[module].register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        model(input_ids=torch.arange(12).reshape(2, 6) % 60 + 1, use_cache=False)
    handle.remove()
    return seen[0]


def test_hook_normalized_is_read_through_the_norm_weight(tmp_path):
    """TransformerLens' ln2.hook_normalized is the norm's output before its weight (and bias); with the model the
    loader folds them in, so the SAE reads the HuggingFace module's output and reproduces the formula on the
    normalized input. Without the model the layer is left unset rather than attached to the wrong activation."""
    import transformers as tf

    torch.manual_seed(0)
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=D, intermediate_size=16,
                                               num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1))
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=D, n_layer=2, n_head=1, n_positions=32))
    for model in (llama, gpt2):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or "ln" in name:
                    p.add_(0.5 * torch.rand_like(p) + 0.1)
        model.eval()
    # A skip transcoder on Llama: ln2.hook_normalized -> hook_mlp_out.
    t = _ae_tensors(seed=3)
    t["W_skip"] = _rand(D, D, seed=12) * 0.1
    _sae_lens(tmp_path / "tc", "skip_transcoder", t, d_out=D, apply_b_dec_to_input=False, metadata={
        "sae_lens_version": "6.54.0", "model_name": "meta-llama/Llama-3.2-1B",
        "hook_name": "blocks.1.ln2.hook_normalized", "hook_name_out": "blocks.1.hook_mlp_out"})
    unset = SaeBase.from_pretrained(tmp_path / "tc")
    assert unset.layer_signature is None and "pass model=" in " ".join(unset.metadata["import_notes"])
    tc = SaeBase.from_pretrained(tmp_path / "tc", model=llama)
    assert tc.layer_signature == "model.layers.1.mlp"
    y = _capture(llama, "model.layers.1.post_attention_layernorm")
    x_tl = y / llama.model.layers[1].post_attention_layernorm.weight.detach()
    acts = (x_tl @ t["W_enc"] + t["b_enc"]).relu()
    _check(tc, y, acts, acts @ t["W_dec"] + t["b_dec"] + x_tl @ t["W_skip"].T)
    # A TopK SAE on GPT-2's ln2.hook_normalized (a LayerNorm: weight and bias), its output at the same place.
    s = _ae_tensors(seed=4)
    _sae_lens(tmp_path / "sae", "topk", s, k=K, metadata={"sae_lens_version": "6.54.0", "model_name": "gpt2",
                                                          "hook_name": "blocks.1.ln2.hook_normalized"})
    sae = TopKSae.from_pretrained(tmp_path / "sae", model=gpt2)
    assert sae.layer_signature == "transformer.h.1.ln_2"
    ln = gpt2.transformer.h[1].ln_2
    y = _capture(gpt2, "transformer.h.1.ln_2")
    x_tl = (y - ln.bias.detach()) / ln.weight.detach()
    pre = (x_tl - s["b_dec"]) @ s["W_enc"] + s["b_enc"]
    top = pre.topk(K, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    _check(sae, y, acts, (acts @ s["W_dec"] + s["b_dec"]) * ln.weight.detach() + ln.bias.detach())


# -- dictionary_learning --------------------------------------------------------------------------------------------
def _dl(folder: Path, state: dict, dict_class: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": dict_class, "activation_dim": D, "dict_size": N, "layer": 1, "lm_name": "gpt2",
        "submodule_name": "resid_post_layer_1"}}))


def test_dictionary_learning_batchtopk(tmp_path):
    s = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.7),
         "decoder.weight": _rand(D, N, seed=3) * 0.5, "encoder.weight": _rand(N, D, seed=4),
         "encoder.bias": _rand(N, seed=5) * 0.1, "b_dec": _rand(D, seed=6)}
    _dl(tmp_path / "b", s, "BatchTopKSAE")
    sae = SaeBase.from_pretrained(tmp_path / "b")
    assert type(sae) is BatchTopKSae and sae.k == K and float(sae.threshold) == pytest.approx(0.7)
    x = _x()
    post = torch.nn.functional.linear(x - s["b_dec"], s["encoder.weight"], s["encoder.bias"]).relu()
    acts = post * (post > 0.7)  # BatchTopKSAE.encode(use_threshold=True)
    _check(sae, x, acts, torch.nn.functional.linear(acts, s["decoder.weight"]) + s["b_dec"])


def test_dictionary_learning_jumprelu_and_relu(tmp_path):
    s = {"W_enc": _rand(D, N, seed=7), "b_enc": _rand(N, seed=8) * 0.2, "W_dec": _rand(N, D, seed=9) * 0.5,
         "b_dec": _rand(D, seed=10), "threshold": _rand(N, seed=12).abs() * 0.4}
    _dl(tmp_path / "j", s, "JumpReluAutoEncoder")
    sae = SaeBase.from_pretrained(tmp_path / "j")
    x = _x()
    pre = x @ s["W_enc"] + s["b_enc"]  # apply_b_dec_to_input is False by default
    acts = torch.relu(pre * (pre > s["threshold"]))
    _check(sae, x, acts, acts @ s["W_dec"] + s["b_dec"])
    r = {"bias": _rand(D, seed=13), "encoder.weight": _rand(N, D, seed=14), "encoder.bias": _rand(N, seed=15) * 0.1,
         "decoder.weight": _rand(D, N, seed=16) * 0.5}
    _dl(tmp_path / "r", r, "AutoEncoder")
    sae = SaeBase.from_pretrained(tmp_path / "r")
    assert type(sae) is JumpReLUSae
    acts = torch.nn.functional.linear(x - r["bias"], r["encoder.weight"], r["encoder.bias"]).relu()
    _check(sae, x, acts, torch.nn.functional.linear(acts, r["decoder.weight"]) + r["bias"])


# -- sparsify transcoders -------------------------------------------------------------------------------------------
def test_sparsify_skip_transcoder(tmp_path):
    folder = tmp_path / "run" / "layers.1.mlp"
    folder.mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M"}))
    t = {"encoder.weight": _rand(N, D, seed=20), "encoder.bias": _rand(N, seed=21) * 0.1,
         "W_dec": _rand(N, D, seed=22) * 0.5, "b_dec": _rand(D, seed=23), "W_skip": _rand(D, D, seed=24) * 0.1}
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
                                                 "num_latents": N, "k": K, "multi_topk": False,
                                                 "skip_connection": True, "transcode": True, "d_in": D}))
    sae = Transcoder.from_pretrained(folder)
    assert sae.layer_signature == "model.layers.1.mlp" and sae.skip
    x = _x()
    pre = torch.nn.functional.linear(x, t["encoder.weight"], t["encoder.bias"]).relu()  # transcode: no b_dec
    top = pre.topk(K, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    _check(sae, x, acts, acts @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T)


# -- round trips -----------------------------------------------------------------------------------------------------
def _fill(sae: SaeBase, seed: int) -> SaeBase:
    with torch.no_grad():
        sae.W_enc.copy_(_rand(*sae.W_enc.shape, seed=seed))
        sae.b_enc.copy_(_rand(*sae.b_enc.shape, seed=seed + 1) * 0.1)
        sae.W_dec.copy_(_rand(*sae.W_dec.shape, seed=seed + 2) * 0.5)
        sae.b_dec.copy_(_rand(*sae.b_dec.shape, seed=seed + 3))
        if getattr(sae, "W_skip", None) is not None:
            sae.W_skip.copy_(_rand(*sae.W_skip.shape, seed=seed + 4) * 0.1)
    sae.metadata.update(model_id="HuggingFaceTB/SmolLM2-135M")
    return sae


def _same_outputs(a: SaeBase, b: SaeBase, d: int = D, exact: bool = True) -> None:
    x = _x(d)
    tol = dict(rtol=0, atol=0) if exact else TOL
    torch.testing.assert_close(a.encode_dense(x), b.encode_dense(x), **tol)
    torch.testing.assert_close(a.predict(x, a.encode(x)), b.predict(x, b.encode(x)), **tol)


@pytest.mark.parametrize("fmt", ["sae_lens", "dictionary_learning"])
def test_jumprelu_and_batchtopk_round_trips(tmp_path, fmt):
    j = _fill(JumpReLUSae(N, D, threshold=_rand(N, seed=30).abs()), 31)
    j.layer_signature = j.metadata["layer"] = "model.layers.2"
    back = SaeBase.from_pretrained(j.export(tmp_path / f"j-{fmt}", fmt))
    assert type(back) is JumpReLUSae and torch.equal(back.threshold, j.threshold)
    assert back.layer_signature == "model.layers.2"
    # dictionary_learning's JumpReluAutoEncoder does not subtract b_dec from its input: b_dec is folded into b_enc
    # (in float64), which rounds once each way.
    _same_outputs(j, back, exact=fmt == "sae_lens")
    b = _fill(BatchTopKSae(N, D, K), 32)
    b.threshold.fill_(0.4)
    back = SaeBase.from_pretrained(b.export(tmp_path / f"b-{fmt}", fmt))
    # SAELens keeps BatchTopK SAEs as JumpReLU with the threshold repeated; dictionary_learning as BatchTopKSAE.
    assert type(back) is (JumpReLUSae if fmt == "sae_lens" else BatchTopKSae)
    _same_outputs(b, back)


@pytest.mark.parametrize("fmt", ["sparsify", "circuit_tracer"])
def test_transcoder_round_trips(tmp_path, fmt):
    tc = _fill(Transcoder(N, D, D, K, skip=True), 40)
    tc.layer_signature = tc.metadata["layer"] = "model.layers.1.mlp"
    folder = tc.export(tmp_path / "layers.1.mlp", fmt)
    back = Transcoder.from_pretrained(folder) if fmt == "sparsify" else Transcoder.from_pretrained(folder, layer=1)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"):
        assert torch.equal(getattr(back, name), getattr(tc, name)), name
    _same_outputs(tc, back)
    if fmt == "circuit_tracer":
        config = (folder / "config.yaml").read_text()
        for line in ('model_kind: transcoder_set', 'feature_input_hook: "mlp.hook_in"',
                     'feature_output_hook: "hook_mlp_out"', 'activation: "topk"', f"k: {K}"):
            assert line in config
        keys = {k: tuple(v.shape) for k, v in load_file(str(folder / "layer_1.safetensors")).items()}
        assert keys == {"W_enc": (N, D), "b_enc": (N,), "W_dec": (N, D), "b_dec": (D,), "W_skip": (D, D)}
        assert back.layer_signature == "model.layers.1.mlp"


def test_circuit_tracer_set_and_its_errors(tmp_path):
    def parts(seed: int) -> SaeParts:
        t = _ae_tensors(seed, d_out=D_OUT)
        return SaeParts("jumprelu", t["W_enc"].T.contiguous(), t["b_enc"], t["W_dec"], t["b_dec"], centered=False,
                        threshold=_rand(N, seed=seed + 5).abs(), transcoder=True, hook_name="ln2.hook_normalized",
                        hook_name_out="hook_mlp_out", model_name="google/gemma-2-2b")

    layers = {0: parts(50), 1: parts(60)}
    write_circuit_tracer(layers, tmp_path / "set")
    assert "activation" not in (tmp_path / "set" / "config.yaml").read_text()  # JumpReLU: thresholds in the files
    got = read_circuit_tracer(tmp_path / "set", layer=1)
    x = _x()
    ref = layers[1]
    pre = x @ ref.W_enc.T + ref.b_enc
    torch.testing.assert_close(got.encode_dense(x), pre * (pre > ref.threshold), **TOL)  # circuit-tracer's JumpReLU
    assert got.hook_name == "blocks.1.ln2.hook_normalized"
    with pytest.raises(UserInputError, match=r"layers \[0, 1\]: pass layer=<L>"):
        read_circuit_tracer(tmp_path / "set")
    # Per-latent thresholds cannot run as a Transcoder's one global threshold.
    with pytest.raises(NotSupportedError, match="not supported yet: jumprelu transcoder with per-latent thresholds"):
        SaeBase.from_pretrained(tmp_path / "set", layer=0)
    with pytest.raises(NotSupportedError, match="circuit-tracer runs transcoders"):
        export_sae(_fill(TopKSae(N, D, K), 70), tmp_path / "x", "circuit_tracer")
    with pytest.raises(NotSupportedError, match="SAELens has no topk transcoder"):
        _fill(Transcoder(N, D, D, K), 71).export(tmp_path / "y", "sae_lens")


def test_a_circuit_tracer_set_from_one_export_per_layer(tmp_path):
    """Exporting each layer's transcoder into one folder builds the set: layer_0, layer_1 and one config.yaml."""
    folder = tmp_path / "set"
    tcs = []
    for layer in (0, 1):
        tc = _fill(Transcoder(N, D, D, K), 80 + layer)
        tc.layer_signature = tc.metadata["layer"] = f"model.layers.{layer}.mlp"
        tc.export(folder, "circuit_tracer")
        tcs.append(tc)
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors"]
    for layer, tc in enumerate(tcs):
        back = Transcoder.from_pretrained(folder, layer=layer)
        assert back.layer_signature == f"model.layers.{layer}.mlp"
        _same_outputs(tc, back)
