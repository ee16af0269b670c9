"""DOCUMENTED_API.md, "Hooks": every call shape, checked against plain torch hooks and plain forwards."""

from __future__ import annotations

import pytest
import torch

from mi_crow.hooks import (
    Controller,
    Detector,
    FunctionController,
    Hook,
    HookError,
    HookType,
    LayerActivationDetector,
    ModelInputDetector,
    ModelOutputDetector,
)

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world!", "A cat sat on the mat."]
LAYER = "transformer.h.1"


def _main(out):
    """A block's hidden state: the output itself, or its first element when the block returns a tuple."""
    return out[0] if isinstance(out, tuple) else out


def _with_main(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _reference_logits(lm, layer, *, forward=None, pre=None):
    """Logits of the bare HF model with a plain torch forward hook (``forward(out) -> out``) or forward pre-hook
    (``pre(args) -> args``) on ``layer``."""
    module = dict(lm.model.named_modules())[layer]
    if forward is not None:
        handle = module.register_forward_hook(lambda m, a, out: forward(out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: pre(args))
    try:
        enc = lm.tokenize(TEXTS)
        with torch.no_grad():
            return lm.model(**lm.inference.model_inputs(enc), use_cache=False).logits
    finally:
        handle.remove()


def _hidden_states(lm):
    out, enc = lm.inference.execute_inference(TEXTS, with_controllers=False, output_hidden_states=True)
    return out, enc


# ------------------------------------------------------------------------------------------------ every hook
def test_every_hook_has_id_layer_type_and_switch():
    hook = LayerActivationDetector(layer_signature=LAYER, hook_id="mine")
    assert hook.id == "mine" and hook.layer_signature == LAYER and hook.hook_type is HookType.FORWARD
    assert hook.is_enabled()
    hook.disable()
    assert not hook.is_enabled()
    hook.enable()
    assert hook.is_enabled()
    other = FunctionController(LAYER, lambda x: x)
    assert other.id != hook.id and other.id  # a fresh id when none is given


def test_disabled_hook_does_not_run(tiny_gpt2):
    det = LayerActivationDetector(layer_signature=LAYER)
    tiny_gpt2.layers.register_hook(LAYER, det)
    det.disable()
    tiny_gpt2.forwards(TEXTS)
    assert det.get_captured() is None
    det.enable()
    tiny_gpt2.forwards(TEXTS)
    assert det.get_captured() is not None


# ------------------------------------------------------------------------------------- Hook._hook_fn callbacks
class _Observer(Hook):
    def __init__(self, layer):
        super().__init__(layer_signature=layer)
        self.seen = []

    def _hook_fn(self, module, inputs, output):
        # the raw module call: the positional inputs and the block's own output
        self.seen.append((self.context.language_model, type(inputs), _main(output).detach().clone()))


class _Doubler(Hook):
    def _hook_fn(self, module, inputs, output):
        return _with_main(output, _main(output) * 2.0)


def test_hook_fn_subclass_observes_with_the_language_model_reachable(tiny_gpt2):
    obs = _Observer(LAYER)
    tiny_gpt2.layers.register_hook(LAYER, obs)
    out, _ = tiny_gpt2.inference.execute_inference(TEXTS, output_hidden_states=True)
    assert len(obs.seen) == 1
    lm, inputs_type, hidden = obs.seen[0]
    assert lm is tiny_gpt2 and inputs_type is tuple
    torch.testing.assert_close(hidden, out.hidden_states[2])
    assert obs.context is None  # only set during a forward pass


def test_hook_fn_subclass_replacement_changes_logits_like_a_torch_hook(tiny_gpt2):
    reference = _reference_logits(tiny_gpt2, LAYER, forward=lambda out: _with_main(out, _main(out) * 2.0))
    baseline = tiny_gpt2.forwards(TEXTS).logits
    tiny_gpt2.layers.register_hook(LAYER, _Doubler(layer_signature=LAYER))
    steered = tiny_gpt2.forwards(TEXTS).logits
    assert (steered - baseline).abs().max() > 1e-3
    torch.testing.assert_close(steered, reference)


# ------------------------------------------------------------------------------------------------- detectors
class _NormDetector(Detector):
    """A user detector filling metadata and tensor_metadata, as the documentation shows."""

    def process_activations(self, module, inputs, output):
        self.tensor_metadata["activations"] = output.detach().clone()
        self.tensor_metadata["norms"] = output.detach().norm(dim=-1)
        self.metadata["calls"] = self.metadata.get("calls", 0) + 1


def test_detector_metadata_tensor_metadata_get_captured_and_clear(tiny_gpt2):
    det = _NormDetector(layer_signature=LAYER)
    tiny_gpt2.layers.register_hook(LAYER, det)
    out, _ = tiny_gpt2.inference.execute_inference(TEXTS, output_hidden_states=True)
    tiny_gpt2.forwards(TEXTS)
    assert det.metadata == {"calls": 2}
    torch.testing.assert_close(det.get_captured(), out.hidden_states[2])
    torch.testing.assert_close(det.tensor_metadata["norms"], out.hidden_states[2].norm(dim=-1))
    det.clear_captured()
    assert det.get_captured() is None and det.tensor_metadata == {} and det.metadata == {"calls": 2}


@pytest.mark.parametrize("layer", [1, LAYER, "gpt2lmheadmodel_transformer_h_1"])
def test_layer_activation_detector_captures_the_block_output(tiny_gpt2, layer):
    det = LayerActivationDetector(layer_signature=layer, hook_id=None)
    tiny_gpt2.layers.register_hook(layer_signature=layer, hook=det)
    out, _ = tiny_gpt2.inference.execute_inference(TEXTS, output_hidden_states=True)
    torch.testing.assert_close(det.get_captured(), out.hidden_states[2])
    assert det.tensor_metadata["activations"] is det.get_captured()
    det.clear_captured()
    assert det.get_captured() is None


def test_model_input_detector_every_option(tiny_llama):
    lm = tiny_llama
    specials = [lm.tokenizer.bos_token_id]
    det = ModelInputDetector(layer_signature="input", hook_id=None, save_input_ids=True, save_attention_mask=True,
                             save_special_token_mask=True, special_token_ids=specials)
    lm.layers.register_hook("input", det)
    lm.forwards(TEXTS)
    reference = lm.tokenizer(TEXTS, return_tensors="pt", padding=True, padding_side="right")
    assert torch.equal(det.get_captured_input_ids(), reference["input_ids"])
    assert det.tensor_metadata["inputs"] is det.tensor_metadata["input_ids"] is det.get_captured()
    assert torch.equal(det.tensor_metadata["attention_mask"], reference["attention_mask"])
    assert torch.equal(det.tensor_metadata["special_token_mask"], reference["input_ids"] == specials[0])
    assert det.tensor_metadata["special_token_mask"][:, 0].all()


def test_model_input_detector_defaults_and_switches(tiny_gpt2):
    lm = tiny_gpt2
    plain = ModelInputDetector()  # layer_signature="input"
    no_mask = ModelInputDetector(save_attention_mask=False, save_special_token_mask=True)
    for det in (plain, no_mask):
        lm.layers.register_hook(None, det)
    lm.forwards(TEXTS)
    ids = lm.tokenizer(TEXTS, return_tensors="pt", padding=True)["input_ids"]
    assert set(plain.tensor_metadata) == {"inputs", "input_ids", "attention_mask"}
    assert "attention_mask" not in no_mask.tensor_metadata
    # without explicit ids, the LanguageModel's special tokens count (GPT-2: the EOS/pad token)
    expected = torch.isin(ids, torch.tensor(sorted(set(lm.tokenizer.all_special_ids))))
    assert torch.equal(no_mask.tensor_metadata["special_token_mask"], expected)


def test_model_output_detector_logits_and_last_hidden_state(tiny_lm):
    det = ModelOutputDetector(layer_signature="output", hook_id=None, save_output_logits=True,
                              save_output_hidden_state=True)
    tiny_lm.layers.register_hook("output", det)
    out, _ = tiny_lm.inference.execute_inference(TEXTS)
    tiny_lm.layers.unregister_hook(det)
    reference, _ = _hidden_states(tiny_lm)
    torch.testing.assert_close(det.get_captured_output_logits(), reference.logits)
    assert det.tensor_metadata["outputs"] is det.tensor_metadata["output_logits"]
    torch.testing.assert_close(det.tensor_metadata["output_hidden_state"], reference.hidden_states[-1])
    # the detector's copy is independent of the returned logits
    assert det.get_captured_output_logits().data_ptr() != out.logits.data_ptr()


def test_model_output_detector_logits_only_by_default(tiny_gpt2):
    det = ModelOutputDetector()
    tiny_gpt2.layers.register_hook(None, det)
    out = tiny_gpt2.forwards(TEXTS)
    assert set(det.tensor_metadata) == {"outputs", "output_logits"}
    torch.testing.assert_close(det.get_captured(), out.logits)


# ----------------------------------------------------------------------------------------------- controllers
SHIFT = torch.linspace(-2.0, 2.0, 32)


@pytest.mark.parametrize(
    "make",
    [
        lambda f: FunctionController(LAYER, f),
        lambda f: FunctionController(layer_signature=LAYER, function=f),
        lambda f: FunctionController(LAYER, f, HookType.FORWARD, None),
        lambda f: FunctionController(f, LAYER),  # the older function-first form
        lambda f: FunctionController(layer_signature="gpt2lmheadmodel_transformer_h_1", fn=f),
    ],
    ids=["positional", "keywords", "all-positional", "function-first", "fn-keyword-flattened"],
)
def test_function_controller_changes_logits_exactly_like_a_torch_hook(tiny_gpt2, make):
    reference = _reference_logits(tiny_gpt2, LAYER, forward=lambda out: _with_main(out, _main(out) + SHIFT))
    baseline = tiny_gpt2.forwards(TEXTS).logits
    ctrl = make(lambda h: h + SHIFT)
    assert ctrl.hook_type is HookType.FORWARD
    hook_id = tiny_gpt2.layers.register_hook(None, ctrl)
    steered = tiny_gpt2.forwards(TEXTS).logits
    assert (steered - baseline).abs().max() > 1e-3
    torch.testing.assert_close(steered, reference)
    assert tiny_gpt2.layers.unregister_hook(hook_id) is True
    torch.testing.assert_close(tiny_gpt2.forwards(TEXTS).logits, baseline)


def test_function_controller_bad_call_shapes():
    with pytest.raises(ValueError, match=r"function and fn name the same argument.*function=.*fn="):
        FunctionController(LAYER, function=lambda x: x, fn=lambda x: x * 2)
    with pytest.raises(TypeError, match=r"fn must be callable, got str"):
        FunctionController(LAYER, "not a function")
    with pytest.raises(TypeError, match=r"needs a function"):
        FunctionController(LAYER)
    with pytest.raises(ValueError, match=r"layer_signature is given both positionally and by keyword"):
        FunctionController(LAYER, lambda x: x, layer_signature=0)


class _PreTupleController(Controller):
    """Replaces the positional inputs of a block with a scaled copy (returns a tuple)."""

    def __init__(self, layer, scale, as_tuple):
        super().__init__(layer_signature=layer, hook_type=HookType.PRE_FORWARD)
        self.scale, self.as_tuple = scale, as_tuple
        self.seen = None

    def modify_activations(self, module, inputs, output):
        self.seen = (type(inputs), output)
        new = inputs[0] * self.scale
        return (new, *inputs[1:]) if self.as_tuple else new


@pytest.mark.parametrize("as_tuple", [True, False], ids=["tuple", "tensor"])
def test_pre_forward_controller_gets_the_input_tuple_and_its_return_replaces_it(tiny_gpt2, as_tuple):
    # The block's main input is its first positional argument here; the reference replaces it with a raw pre-hook.
    reference = _reference_logits(tiny_gpt2, LAYER, pre=lambda args: (args[0] * 0.5, *args[1:]) if args else None)
    ctrl = _PreTupleController(LAYER, 0.5, as_tuple)
    tiny_gpt2.layers.register_hook(LAYER, ctrl)
    steered = tiny_gpt2.forwards(TEXTS).logits
    assert ctrl.seen == (tuple, None)
    torch.testing.assert_close(steered, reference)


def test_pre_forward_function_controller_equals_forward_on_previous_block(tiny_gpt2):
    f = lambda h: h * 0.5 - 1.0  # noqa: E731
    tiny_gpt2.layers.register_hook(None, FunctionController(2, f, hook_type=HookType.PRE_FORWARD, hook_id="pre"))
    pre = tiny_gpt2.forwards(TEXTS).logits
    tiny_gpt2.layers.unregister_hook("pre")
    tiny_gpt2.layers.register_hook(None, FunctionController(1, f))
    torch.testing.assert_close(pre, tiny_gpt2.forwards(TEXTS).logits)


def test_hook_error_carries_hook_id_layer_signature_and_original_error(tiny_gpt2):
    def boom(h):
        raise ArithmeticError("bad activations")

    tiny_gpt2.layers.register_hook(None, FunctionController(LAYER, boom, hook_id="boom"))
    with pytest.raises(HookError) as info:
        tiny_gpt2.forwards(TEXTS)
    err = info.value
    assert err.hook_id == "boom" and err.layer_signature == LAYER
    assert isinstance(err.original_error, ArithmeticError) and err.original_error is err.__cause__
    assert err.layer == LAYER and err.original is err.original_error  # the older attribute names


def test_model_output_detector_hidden_state_during_generation(tiny_gpt2):
    det = ModelOutputDetector(save_output_hidden_state=True)
    tiny_gpt2.layers.register_hook("output", det)
    generated = tiny_gpt2.generate(TEXTS[:2], max_new_tokens=3, eos_token_id=None)
    tiny_gpt2.layers.unregister_hook(det)
    assert generated == tiny_gpt2.generate(TEXTS[:2], max_new_tokens=3, eos_token_id=None)  # observing only
    # the last generation step feeds one token per text
    assert det.get_captured_output_logits().shape[:2] == (2, 1)
    assert det.tensor_metadata["output_hidden_state"].shape == (2, 1, 32)
    # the last hidden state feeds the LM head: it reproduces the captured logits
    logits = tiny_gpt2.model.lm_head(det.tensor_metadata["output_hidden_state"])
    torch.testing.assert_close(logits, det.get_captured_output_logits())
