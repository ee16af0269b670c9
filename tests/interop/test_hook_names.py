"""The TransformerLens hook-name map, checked against the definitions of the names on tiny HuggingFace models.

TransformerLens defines ``resid_mid = resid_pre + attn_out`` and ``resid_post = resid_mid + mlp_out``, with
``resid_pre`` the input of block ``L``. One forward pass records every module's input and output; the activations the
map points at must satisfy those identities in each family (GPT-2, Llama, Qwen 2, Gemma 2, Gemma 3), which pins
down the off-by-one of ``hook_resid_pre`` and the Gemma 2/3 post-norms.
"""

from __future__ import annotations

import pytest
import torch

from mi_crow.errors import NotSupportedError, UserInputError
from mi_crow.language_model.hook_names import (
    HookPoint,
    family_from_model,
    family_from_name,
    module_to_tl,
    resolve_hook,
    tl_to_hook,
)

N_LAYERS = 2


def _tiny(family: str) -> torch.nn.Module:
    import transformers as tf

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=N_LAYERS,
                 num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    if family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=N_LAYERS, n_head=2, n_positions=32))
    elif family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**small))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**small))
    elif family == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(head_dim=8, **small))
    else:
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(head_dim=8, **small))
    # Non-trivial norm weights, so a norm's input and output cannot be confused.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _record(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        def pre(m, args, kwargs, name=name):
            first = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            if isinstance(first, torch.Tensor) and name not in inputs:
                inputs[name] = first.detach().clone()

        def post(m, args, out, name=name):
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(out, torch.Tensor) and name not in outputs:
                outputs[name] = out.detach().clone()

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    ids = torch.arange(12).reshape(2, 6) % 60 + 1
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    for h in handles:
        h.remove()
    return inputs, outputs


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gemma2", "gemma3"])
def test_hook_names_satisfy_transformer_lens_definitions(family):
    model = _tiny(family)
    fam = family_from_model(model)
    assert fam == {"gemma3": "gemma3_text"}.get(family, family)
    inputs, outputs = _record(model)

    def value(name: str) -> torch.Tensor:
        point = tl_to_hook(name, fam)
        return (outputs if point.side == "output" else inputs)[point.module]

    n_blocks = len(dict(model.named_modules())[tl_to_hook("blocks.0.hook_resid_post", fam).module.rsplit(".", 1)[0]])
    assert n_blocks >= N_LAYERS
    for layer in range(N_LAYERS):
        block = tl_to_hook(f"blocks.{layer}.hook_resid_post", fam).module
        pre, mid, post = (value(f"blocks.{layer}.hook_resid_{s}") for s in ("pre", "mid", "post"))
        torch.testing.assert_close(pre, inputs[block], rtol=0, atol=0)  # resid_pre L is the input of block L
        torch.testing.assert_close(mid, pre + value(f"blocks.{layer}.hook_attn_out"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(post, mid + value(f"blocks.{layer}.hook_mlp_out"), rtol=1e-5, atol=1e-5)
        # The MLP reads the second norm's output.
        torch.testing.assert_close(value(f"blocks.{layer}.mlp.hook_in"), value(f"blocks.{layer}.ln2.hook_normalized"),
                                   rtol=0, atol=0)
        assert value(f"blocks.{layer}.hook_mlp_in") is mid or torch.equal(value(f"blocks.{layer}.hook_mlp_in"), mid)


def test_resid_pre_off_by_one_and_reverse_map():
    assert tl_to_hook("blocks.3.hook_resid_pre", "llama") == HookPoint("model.layers.2")
    assert tl_to_hook("blocks.0.hook_resid_pre", "gpt2") == HookPoint("transformer.drop")
    assert tl_to_hook("blocks.0.hook_resid_pre", "gemma2") == HookPoint("model.layers.0", "input")
    assert tl_to_hook("blocks.4.hook_mlp_out", "gemma2") == HookPoint("model.layers.4.post_feedforward_layernorm")
    assert tl_to_hook("blocks.4.hook_mlp_out", "qwen2") == HookPoint("model.layers.4.mlp")
    assert module_to_tl("model.layers.2", "llama") == "blocks.2.hook_resid_post"
    assert module_to_tl("model.layers.2.mlp", "llama") == "blocks.2.hook_mlp_out"
    assert module_to_tl("model.layers.2.mlp", "gemma2") == "blocks.2.mlp.hook_out"
    # A norm's output is after its weight; TransformerLens' hook_normalized is before it: never named so.
    assert module_to_tl("transformer.h.1.ln_2", "gpt2") is None
    assert module_to_tl("transformer.h.1.mlp", "gpt2", side="input") == "blocks.1.mlp.hook_in"
    assert module_to_tl("model.embed_tokens", "llama") == "blocks.0.hook_resid_pre"
    assert module_to_tl("model.layers.2.self_attn.q_proj", "llama") is None


def test_family_from_name():
    assert family_from_name("google/gemma-2-2b") == "gemma2"
    assert family_from_name("google/gemma-3-1b-pt") == "gemma3"
    assert family_from_name("meta-llama/Llama-3.2-1B") == "llama"
    assert family_from_name("Qwen/Qwen2.5-0.5B") == "qwen2"
    assert family_from_name("gpt2-small") == "gpt2"
    assert family_from_name("EleutherAI/pythia-70m-deduped") == "gpt_neox"
    assert family_from_name("my-own-model") is None


def test_resolve_hook_against_a_model(tiny_llama):
    assert resolve_hook("blocks.1.hook_resid_post", model=tiny_llama) == HookPoint("model.layers.1")
    assert resolve_hook("layers.1", model=tiny_llama) == HookPoint("model.layers.1")  # sparsify's spelling
    assert resolve_hook("model.layers.1.mlp", model=tiny_llama) == HookPoint("model.layers.1.mlp")
    with pytest.raises(UserInputError, match=r"maps to module 'model.layers.9'.*not in the model \(3 transformer"):
        resolve_hook("blocks.9.hook_resid_post", model=tiny_llama)
    with pytest.raises(UserInputError, match="not in the model"):
        resolve_hook("decoder.stack.1", model=tiny_llama)
    with pytest.raises(UserInputError, match="is not a TransformerLens hook name this map covers"):
        resolve_hook("blocks.1.attn.hook_z", model=tiny_llama)


def test_unknown_family_and_parallel_models():
    with pytest.raises(NotSupportedError, match="families covered"):
        tl_to_hook("blocks.0.hook_resid_post", "t5")
    with pytest.raises(NotSupportedError, match="in parallel"):
        tl_to_hook("blocks.0.hook_resid_mid", "gpt_neox")
    with pytest.raises(UserInputError, match="model family must be known"):
        resolve_hook("blocks.0.hook_resid_post")


def test_an_imported_sae_attaches_where_its_hook_name_says(tmp_path, tiny_gpt2):
    """A SAELens SAE on ``blocks.1.hook_resid_pre`` replaces the input of block 1 (attached to block 0's output):
    the logits equal those of a pre-hook on block 1 that substitutes the SAE's reconstruction by hand."""
    import json

    from safetensors.torch import save_file

    from mi_crow.mechanistic.sae import TopKSae

    d, n, k = 32, 64, 4
    g = torch.Generator().manual_seed(0)
    tensors = {"W_enc": torch.randn(d, n, generator=g) * 0.2, "b_enc": torch.zeros(n),
               "W_dec": torch.randn(n, d, generator=g) * 0.2, "b_dec": torch.randn(d, generator=g) * 0.1}
    (tmp_path / "s").mkdir()
    save_file(tensors, str(tmp_path / "s" / "sae_weights.safetensors"))
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": d, "d_sae": n, "k": k, "dtype": "float32", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "metadata": {"sae_lens_version": "6.1.0", "model_name": "whatever",
                                                      "hook_name": "blocks.1.hook_resid_pre"}}))
    sae = TopKSae.from_pretrained(tmp_path / "s", model=tiny_gpt2)
    assert sae.layer_signature == "transformer.h.0"
    sae.mode = "replace"
    enc = tiny_gpt2.tokenize(["the cat sat on the mat", "a dog"])
    hf = tiny_gpt2.model

    def manual(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
        top = pre.topk(k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        new = acts @ tensors["W_dec"] + tensors["b_dec"]
        return ((new,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    with torch.no_grad():
        handle = dict(hf.named_modules())["transformer.h.1"].register_forward_pre_hook(manual, with_kwargs=True)
        try:
            expected = hf(**enc).logits
        finally:
            handle.remove()
        hook_id = tiny_gpt2.attach_sae(sae)
        try:
            got = hf(**enc).logits
        finally:
            tiny_gpt2.layers.unregister_hook(hook_id)
        plain = hf(**enc).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the substitution is visible in the logits


def test_an_imported_transcoder_replaces_the_mlp(tmp_path, tiny_llama):
    """A sparsify transcoder of ``layers.1.mlp`` hooks ``model.layers.1.mlp``: reads its input, predicts its
    output (checked against a hook that substitutes the transcoder's formula by hand)."""
    import json

    from safetensors.torch import save_file

    from mi_crow.mechanistic.sae import SaeBase

    d, n, k = 32, 64, 4
    g = torch.Generator().manual_seed(1)
    t = {"encoder.weight": torch.randn(n, d, generator=g) * 0.3, "encoder.bias": torch.zeros(n),
         "W_dec": torch.randn(n, d, generator=g) * 0.1, "b_dec": torch.randn(d, generator=g) * 0.01}
    folder = tmp_path / "layers.1.mlp"
    folder.mkdir()
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": n, "k": k, "d_in": d,
                                                 "transcode": True, "skip_connection": False}))
    tc = SaeBase.from_pretrained(folder, model=tiny_llama)
    assert tc.layer_signature == "model.layers.1.mlp"
    tc.mode = "replace"
    hf = tiny_llama.model
    enc = tiny_llama.tokenize(["the cat sat on the mat", "a dog"])

    def manual(module, args, output):
        pre = torch.relu(args[0] @ t["encoder.weight"].T + t["encoder.bias"])
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values) @ t["W_dec"] + t["b_dec"]

    with torch.no_grad():
        handle = dict(hf.named_modules())["model.layers.1.mlp"].register_forward_hook(manual)
        try:
            expected = hf(**enc).logits
        finally:
            handle.remove()
        hook_id = tiny_llama.attach_sae(tc)
        try:
            got = hf(**enc).logits
        finally:
            tiny_llama.layers.unregister_hook(hook_id)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
