"""DOCUMENTED_API.md, "LanguageModel and layers": loading, context, layer names in both spellings, hook
registration calls, inference return shapes, SAE attachment through both documented routes."""

from __future__ import annotations

import io

import pytest
import torch

from mi_crow.hooks import Controller, Detector, FunctionController, HookType, LayerActivationDetector
from mi_crow.hooks import ModelInputDetector, ModelOutputDetector
from mi_crow.language_model import LanguageModel
from mi_crow.testing import SAMPLE_TEXTS, build_tokenizer, make_tiny_gpt2_model

TEXTS = SAMPLE_TEXTS[:7]


# -------------------------------------------------------------------------------------------- loading, context
def test_from_huggingface_with_store_and_device_and_the_context(tmp_path, store):
    tok = build_tokenizer("gpt2")
    model = make_tiny_gpt2_model(tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    lm = LanguageModel.from_huggingface(str(tmp_path / "m"), store=store, device="cpu")
    assert lm.model_id == str(tmp_path / "m")
    ctx = lm.context
    assert ctx.language_model is lm and ctx.model is lm.model and ctx.tokenizer is lm.tokenizer
    assert ctx.store is store and ctx.device == torch.device("cpu") and ctx.model_id == lm.model_id
    lm.store = None
    assert lm.context.store is None  # a live view, not a copy


# ---------------------------------------------------------------------------------------------------- layers
def test_flattened_names_resolve_to_the_same_modules(tiny_lm):
    modules = dict(tiny_lm.model.named_modules())
    prefix = type(tiny_lm.model).__name__.lower()
    for dotted in tiny_lm.layers.list_layers():
        flat = prefix + "_" + dotted.replace(".", "_")  # the rule, written out independently
        assert tiny_lm.layers.get_module(flat) is modules[dotted]
        assert tiny_lm.layers.resolve(flat) == dotted
        assert tiny_lm.layers.name_to_layer[flat] is modules[dotted]
        assert tiny_lm.layers.name_to_layer[dotted] is modules[dotted]
    assert tiny_lm.layers.get_module("gpt2lmheadmodel_transformer_h_0_mlp_c_fc" if prefix == "gpt2lmheadmodel"
                                     else "llamaforcausallm_model_layers_0_mlp_up_proj") is not None


def test_list_get_and_print_layer_names(tiny_gpt2):
    names = [n for n, _ in tiny_gpt2.model.named_modules() if n]
    assert tiny_gpt2.layers.list_layers() == names == tiny_gpt2.layers.get_layer_names()
    buffer = io.StringIO()
    text = tiny_gpt2.layers.print_layer_names(file=buffer)
    assert text == buffer.getvalue()
    lines = text.splitlines()
    assert len(lines) == len(names)
    for line, name in zip(lines, names):
        assert line.split() == [name, "gpt2lmheadmodel_" + name.replace(".", "_")]


def test_unknown_flattened_name_lists_the_closest_names_in_both_spellings(tiny_gpt2):
    with pytest.raises(ValueError) as info:
        tiny_gpt2.layers.resolve("gpt2lmheadmodel_transformer_h_0_mlp_c_fcc")
    message = str(info.value)
    assert "'gpt2lmheadmodel_transformer_h_0_mlp_c_fcc'" in message
    assert "'transformer.h.0.mlp.c_fc'" in message and "'gpt2lmheadmodel_transformer_h_0_mlp_c_fc'" in message
    with pytest.raises(ValueError) as info:
        tiny_gpt2.layers.resolve("transformer.h.0.mlp.c_fcc")
    assert "'transformer.h.0.mlp.c_fc'" in str(info.value)
    assert "'gpt2lmheadmodel_transformer_h_0_mlp_c_fc'" in str(info.value)


# ----------------------------------------------------------------------------------------------------- hooks
def test_register_hook_call_shapes_return_the_id(tiny_gpt2):
    layers = tiny_gpt2.layers
    a = LayerActivationDetector(layer_signature=0, hook_id="a")
    b = LayerActivationDetector(layer_signature=0, hook_id="b")
    c = LayerActivationDetector(layer_signature=0, hook_id="c")
    assert layers.register_hook("transformer.h.1", a) == "a"
    assert layers.register_hook(layer_signature="gpt2lmheadmodel_transformer_h_1", hook=b) == "b"
    assert layers.register_hook(layer="transformer.h.0", hook=c) == "c"  # our older keyword
    assert (a.layer_signature, b.layer_signature, c.layer_signature) == ("transformer.h.1",) * 2 + ("transformer.h.0",)
    out, _ = tiny_gpt2.inference.execute_inference(TEXTS, output_hidden_states=True)
    torch.testing.assert_close(a.get_captured(), out.hidden_states[2])
    torch.testing.assert_close(b.get_captured(), out.hidden_states[2])
    torch.testing.assert_close(c.get_captured(), out.hidden_states[1])


def test_register_hook_third_argument_overrides_the_hook_type(tiny_gpt2):
    # As a PRE_FORWARD hook on block 2, a detector sees block 2's input = block 1's output.
    det = LayerActivationDetector(layer_signature=2)
    assert det.hook_type is HookType.FORWARD
    tiny_gpt2.layers.register_hook(2, det, "PRE_FORWARD")
    out, _ = tiny_gpt2.inference.execute_inference(TEXTS, output_hidden_states=True)
    assert det.hook_type is HookType.PRE_FORWARD
    torch.testing.assert_close(det.get_captured(), out.hidden_states[2])
    other = LayerActivationDetector(layer_signature=2)
    tiny_gpt2.layers.register_hook(layer_signature=2, hook=other, hook_type=HookType.PRE_FORWARD)
    tiny_gpt2.forwards(TEXTS)
    torch.testing.assert_close(other.get_captured(), det.get_captured())


def test_synonyms_given_twice_with_different_values_name_both(tiny_gpt2):
    det = LayerActivationDetector(layer_signature=0)
    with pytest.raises(ValueError, match=r"layer_signature and layer .*layer_signature=0 and layer=1"):
        tiny_gpt2.layers.register_hook(layer_signature=0, layer=1, hook=det)
    assert tiny_gpt2.layers.register_hook(layer_signature=0, layer=0, hook=det) == det.id  # same value: fine
    with pytest.raises(ValueError, match=r"layer_signature and layer"):
        tiny_gpt2.layers.get_hooks(layer_signature=0, layer=1)
    with pytest.raises(ValueError, match=r"layer_signature and layer"):
        tiny_gpt2.attach_sae(_Width32Sae(), layer_signature=0, layer=1)


def test_unregister_enable_disable_and_queries(tiny_gpt2):
    layers = tiny_gpt2.layers
    det = LayerActivationDetector(layer_signature=0, hook_id="det")
    ctrl = FunctionController(1, lambda h: h * 3.0, hook_id="ctrl")
    pre = FunctionController(2, lambda h: h, hook_type="pre_forward", hook_id="pre")
    for hook in (det, ctrl, pre):
        layers.register_hook(None, hook)
    assert layers.get_hooks() == [det, ctrl, pre]
    assert layers.get_hooks(layer_signature=1) == [ctrl] and layers.get_hooks(0) == [det]
    assert layers.get_hooks("gpt2lmheadmodel_transformer_h_2") == [pre]
    assert layers.get_hooks(hook_type=HookType.PRE_FORWARD) == [pre]
    assert layers.get_hooks(layer_signature=1, hook_type="forward") == [ctrl]
    assert layers.get_detectors() == [det] and layers.get_controllers() == [ctrl, pre]

    baseline = tiny_gpt2.forwards(TEXTS, with_controllers=False).logits
    assert layers.disable_hook("ctrl") is True and not ctrl.is_enabled()
    torch.testing.assert_close(tiny_gpt2.forwards(TEXTS).logits, baseline)
    assert layers.enable_hook("ctrl") is True and ctrl.is_enabled()
    assert (tiny_gpt2.forwards(TEXTS).logits - baseline).abs().max() > 1e-3
    assert layers.enable_hook("nope") is False and layers.disable_hook("nope") is False

    assert layers.unregister_hook("ctrl") is True
    assert layers.unregister_hook(det) is True  # the hook object works too
    assert layers.unregister_hook("ctrl") is False  # unknown id: False, never raises
    assert layers.unregister_hook(det) is False
    assert layers.unregister_hook(hook_id="pre") is True
    assert layers.get_hooks() == []
    torch.testing.assert_close(tiny_gpt2.forwards(TEXTS).logits, baseline)


def test_input_and_output_signatures_for_the_model_level_detectors(tiny_gpt2):
    inp, out_det = ModelInputDetector(layer_signature=None), ModelOutputDetector(layer_signature=None)
    tiny_gpt2.layers.register_hook("input", inp)
    tiny_gpt2.layers.register_hook("output", out_det)
    assert inp.layer_signature == "input" and out_det.layer_signature == "output"
    assert tiny_gpt2.layers.get_hooks("input") == [inp] and tiny_gpt2.layers.get_hooks("output") == [out_det]
    out, enc = tiny_gpt2.inference.execute_inference(TEXTS)
    assert torch.equal(inp.get_captured_input_ids(), enc["input_ids"])
    torch.testing.assert_close(out_det.get_captured_output_logits(), out.logits)


# ------------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 50])
def test_execute_inference_has_one_shape_whatever_the_batch_size(tiny_lm, batch_size):
    full, full_enc = tiny_lm.inference.execute_inference(TEXTS, output_hidden_states=True)
    out, enc = tiny_lm.inference.execute_inference(TEXTS, batch_size=batch_size, output_hidden_states=True)
    assert type(out) is type(full)
    assert out.logits.shape == full.logits.shape
    assert torch.equal(enc["input_ids"], full_enc["input_ids"])
    assert torch.equal(enc["attention_mask"], full_enc["attention_mask"])
    assert len(out.hidden_states) == len(full.hidden_states)
    for row, text in enumerate(TEXTS):
        n = int(full_enc["attention_mask"][row].sum())
        # independent reference: the text alone
        single, _ = tiny_lm.inference.execute_inference([text])
        torch.testing.assert_close(out.logits[row, :n], single.logits[0, :n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.logits[row, :n], full.logits[row, :n], atol=1e-5, rtol=1e-4)
        for layer in range(len(full.hidden_states)):
            torch.testing.assert_close(out.hidden_states[layer][row, :n], full.hidden_states[layer][row, :n],
                                       atol=1e-5, rtol=1e-4)


def test_forwards_infer_texts_and_infer_dataset_return_the_outputs(tiny_gpt2):
    from mi_crow.datasets import TextDataset

    reference, enc = tiny_gpt2.inference.execute_inference(TEXTS, batch_size=3)
    for logits in (
        tiny_gpt2.forwards(TEXTS).logits,
        tiny_gpt2.forwards(texts=TEXTS, batch_size=2).logits,
        tiny_gpt2.inference.infer_texts(TEXTS, batch_size=4).logits,
        tiny_gpt2.inference.infer_dataset(TextDataset(texts=TEXTS), batch_size=3).logits,
        tiny_gpt2.inference.infer_dataset(TEXTS, batch_size=5).logits,
    ):
        assert logits.shape == reference.logits.shape
        for row in range(len(TEXTS)):
            n = int(enc["attention_mask"][row].sum())
            torch.testing.assert_close(logits[row, :n], reference.logits[row, :n], atol=1e-5, rtol=1e-4)


def test_with_controllers_false_and_generate(tiny_gpt2):
    baseline = tiny_gpt2.forwards(TEXTS).logits
    tiny_gpt2.layers.register_hook(0, FunctionController(0, lambda h: h * 20.0))
    out, _ = tiny_gpt2.inference.execute_inference(TEXTS, with_controllers=True)
    assert (out.logits - baseline).abs().max() > 1e-3
    off, enc = tiny_gpt2.inference.execute_inference(TEXTS, with_controllers=False, batch_size=2)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(off.logits[real], baseline[real], atol=1e-5, rtol=1e-4)
    texts = tiny_gpt2.generate(TEXTS[:2], max_new_tokens=4, eos_token_id=None)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert texts == tiny_gpt2.inference.generate(TEXTS[:2], max_new_tokens=4, eos_token_id=None)
    assert texts != tiny_gpt2.generate(TEXTS[:2], max_new_tokens=4, eos_token_id=None, with_controllers=False)


# ------------------------------------------------------------------------------------------------------ SAEs
class _Width32Sae(torch.nn.Module, Controller):
    def __init__(self):
        torch.nn.Module.__init__(self)
        Controller.__init__(self)
        self.n_inputs = 32

    def modify_activations(self, module, inputs, output):
        return None


def test_attach_sae_keyword_and_positional_and_detach(tiny_gpt2):
    from mi_crow.mechanistic.sae import TopKSae

    sae = TopKSae(n_latents=48, n_inputs=32, k=4)
    assert tiny_gpt2.attach_sae(sae, layer_signature="transformer.h.1") == sae.id
    assert tiny_gpt2.layers.get_hooks(1) == [sae]
    tiny_gpt2.detach_sae(sae)
    assert tiny_gpt2.layers.get_hooks() == []
    assert tiny_gpt2.attach_sae(sae, "gpt2lmheadmodel_transformer_h_2") == sae.id
    assert tiny_gpt2.layers.get_hooks(2) == [sae]
    tiny_gpt2.detach_sae(sae)
    with pytest.raises(ValueError, match=r"sae.n_inputs=48 does not match the width of layer 'transformer.h.1'"):
        tiny_gpt2.layers.register_hook(1, TopKSae(n_latents=48, n_inputs=48, k=4))
    assert tiny_gpt2.layers.get_hooks() == []


def _tracked_top_texts(lm, route):
    from mi_crow.mechanistic.sae import TopKSae

    torch.manual_seed(0)
    sae = TopKSae(n_latents=48, n_inputs=32, k=4)
    sae.concepts.enable_text_tracking(top_k=3)
    if route == "attach_sae":
        lm.attach_sae(sae, layer_signature="transformer.h.1")
    else:
        lm.layers.register_hook("transformer.h.1", sae)
    lm.forwards(SAMPLE_TEXTS, batch_size=5)
    lm.inference.execute_inference(SAMPLE_TEXTS[:9], batch_size=4)
    return sae.concepts.get_top_texts()


def test_register_hook_with_an_sae_equals_attach_sae_text_tracking_included(tiny_gpt2):
    via_attach = _tracked_top_texts(tiny_gpt2, "attach_sae")
    via_register = _tracked_top_texts(tiny_gpt2, "register_hook")

    def as_rows(top):
        return sorted((i, r.text, r.token_position, round(float(r.activation), 6))
                      for i, recs in enumerate(top) for r in recs)

    rows = as_rows(via_attach)
    assert rows and as_rows(via_register) == rows
    assert {text for _, text, _, _ in rows} <= set(SAMPLE_TEXTS)
