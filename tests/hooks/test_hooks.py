"""Hooks: base classes, built-in detectors/controllers, composition order, copies, errors, context scoping.

References are computed independently with plain ``torch`` forward hooks or ``output_hidden_states``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mi_crow.hooks import (
    BatchContext,
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
from mi_crow.hooks.dispatch import make_torch_hook, replace_main_tensor, unwrap_main_tensor

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world!", "A cat sat on the mat."]


def _logits_with_raw_hook(lm, layer_name, fn):
    """Reference: run the bare HF model with a plain torch forward hook applying ``fn`` to the block output."""
    module = dict(lm.model.named_modules())[layer_name]
    handle = module.register_forward_hook(lambda m, a, out: fn(out))
    try:
        enc = lm.tokenize(TEXTS)
        with torch.no_grad():
            return lm.model(**lm.inference.model_inputs(enc), use_cache=False).logits
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------- base classes
def test_hook_ids_are_unique_and_types_checked():
    a, b = FunctionController(lambda x: x), FunctionController(lambda x: x)
    assert a.id != b.id
    assert a.hook_type is HookType.FORWARD and a.enabled
    assert FunctionController(lambda x: x, hook_type="pre_forward").hook_type is HookType.PRE_FORWARD
    with pytest.raises(ValueError, match=r"hook_type must be one of .*'sideways'"):
        FunctionController(lambda x: x, hook_type="sideways")
    with pytest.raises(TypeError, match=r"layer_signature must be .* float"):
        LayerActivationDetector(1.5)
    with pytest.raises(ValueError, match=r"layer_signature must name a layer"):
        LayerActivationDetector(None)
    with pytest.raises(TypeError, match=r"fn must be callable, got int"):
        FunctionController(3)
    with pytest.raises(ValueError, match=r"hook_id must be a non-empty str"):
        FunctionController(lambda x: x, hook_id="")
    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype"):
        LayerActivationDetector(0, dtype="float32")


def test_abstract_methods_raise_not_implemented():
    with pytest.raises(NotImplementedError, match="Detector must implement"):
        Detector().process_activations(None, None, None)
    with pytest.raises(NotImplementedError, match="Controller must implement"):
        Controller().modify_activations(None, None, None)


def test_unwrap_and_replace_handle_tensors_tuples_lists_and_mappings():
    x, y, extra = torch.randn(2, 3), torch.randn(2, 3), torch.randn(4)
    assert unwrap_main_tensor(x) is x
    assert unwrap_main_tensor((x, extra)) is x
    assert unwrap_main_tensor({"logits": x, "other": extra}) is x
    out = replace_main_tensor((x, extra, None), y)
    assert isinstance(out, tuple) and out[0] is y and out[1] is extra and out[2] is None
    out = replace_main_tensor([x, extra], y)
    assert isinstance(out, list) and out[0] is y and out[1] is extra
    mapping = {"last_hidden_state": x, "extra": extra}
    assert replace_main_tensor(mapping, y)["last_hidden_state"] is y and mapping["extra"] is extra
    with pytest.raises(TypeError, match="cannot replace the main tensor .* str"):
        replace_main_tensor("text", y)


class _TupleBlock(nn.Module):
    """Mimics an HF block that returns (hidden_state, attention_weights)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x), x.sum(-1)


def test_controller_on_tuple_output_replaces_hidden_state_and_passes_the_rest():
    block = _TupleBlock()
    x = torch.randn(2, 3, 4)
    ref_hidden, ref_aux = block(x)
    ctrl = FunctionController(lambda h: h * 3 + 1)
    callback, is_pre = make_torch_hook(ctrl, "block", lambda h: h.enabled)
    assert not is_pre
    handle = block.register_forward_hook(callback)
    hidden, aux = block(x)
    handle.remove()
    torch.testing.assert_close(hidden, ref_hidden * 3 + 1)
    torch.testing.assert_close(aux, ref_aux)


def test_pre_forward_controller_on_plain_module_replaces_input():
    block = _TupleBlock()
    x = torch.randn(2, 3, 4)
    ctrl = FunctionController(lambda inp: inp * 0, hook_type=HookType.PRE_FORWARD)
    callback, is_pre = make_torch_hook(ctrl, "block", lambda h: True)
    assert is_pre
    handle = block.register_forward_pre_hook(callback, with_kwargs=True)
    hidden, _ = block(x)
    handle.remove()
    torch.testing.assert_close(hidden, block.lin(torch.zeros_like(x)))


# ------------------------------------------------------------------------------------------------ detectors
def test_layer_detector_captures_block_output_equal_to_hidden_states(tiny_lm):
    det = tiny_lm.layers.register_hook(0, LayerActivationDetector(0))
    detector = tiny_lm.layers.get_hooks()[0]
    out, enc = tiny_lm.inference.execute_inference(TEXTS, output_hidden_states=True)
    assert detector.id == det
    torch.testing.assert_close(detector.activations, out.hidden_states[1])
    assert detector.activations.shape == (len(TEXTS), enc["input_ids"].shape[1], 32)


def test_detector_capture_is_a_copy_a_later_inplace_controller_cannot_alter(tiny_gpt2):
    layer = "transformer.h.1"
    # Independent reference: the block output cloned by a plain torch hook on an unhooked run.
    ref = {}
    module = tiny_gpt2.layers.get_module(layer)
    handle = module.register_forward_hook(lambda m, a, out: ref.setdefault("x", out.detach().clone()))
    tiny_gpt2.forwards(TEXTS)
    handle.remove()

    detector = LayerActivationDetector(layer)

    def zero_in_place(h):
        h.mul_(0.0)
        return None

    with tiny_gpt2.layers.hooks([detector, FunctionController(zero_in_place, layer_signature=layer)]):
        tiny_gpt2.forwards(TEXTS)
    assert detector.activations.abs().sum() > 0
    torch.testing.assert_close(detector.activations, ref["x"])


def test_detector_dtype_device_and_accumulate(tiny_gpt2):
    detector = LayerActivationDetector(1, dtype=torch.bfloat16, device="cpu", accumulate=True)
    with tiny_gpt2.layers.hooks([detector]):
        out, _ = tiny_gpt2.inference.execute_inference(TEXTS, output_hidden_states=True)
        tiny_gpt2.forwards(TEXTS[:1])
    assert detector.activations.dtype == torch.bfloat16
    assert len(detector.history) == 2
    torch.testing.assert_close(detector.history[0], out.hidden_states[2].to(torch.bfloat16))
    detector.clear()
    assert detector.activations is None and detector.history == []


def test_pre_forward_detector_sees_block_input_equal_to_previous_output(tiny_lm):
    pre = LayerActivationDetector(1, hook_type=HookType.PRE_FORWARD)
    post = LayerActivationDetector(0)
    with tiny_lm.layers.hooks([pre, post]):
        tiny_lm.forwards(TEXTS)
    torch.testing.assert_close(pre.activations, post.activations)


def test_model_input_and_output_detectors(tiny_lm):
    inp, outp = ModelInputDetector(), ModelOutputDetector()
    with tiny_lm.layers.hooks([inp, outp]):
        out, enc = tiny_lm.inference.execute_inference(TEXTS)
    assert torch.equal(inp.input_ids, enc["input_ids"])
    assert torch.equal(inp.attention_mask, enc["attention_mask"])
    torch.testing.assert_close(outp.logits, out.logits)
    assert outp.logits.data_ptr() != out.logits.data_ptr()


# ---------------------------------------------------------------------------------------------- controllers
def test_controller_changes_logits_exactly_like_a_plain_torch_hook(tiny_lm):
    layer = tiny_lm.layers.resolve(1)
    shift = torch.linspace(-2, 2, 32)
    baseline = tiny_lm.forwards(TEXTS).logits
    ref = _logits_with_raw_hook(tiny_lm, layer, lambda out: out + shift)
    with tiny_lm.layers.hooks({1: FunctionController(lambda h: h + shift)}):
        steered = tiny_lm.forwards(TEXTS).logits
    assert (steered - baseline).abs().max() > 1e-3
    torch.testing.assert_close(steered, ref)
    torch.testing.assert_close(tiny_lm.forwards(TEXTS).logits, baseline)


def test_hooks_on_one_layer_compose_in_registration_order(tiny_gpt2):
    layer = "transformer.h.0"
    # A non-constant shift: LayerNorm would cancel a constant one and hide the order.
    v = torch.linspace(-1.0, 1.0, 32)
    add = FunctionController(lambda h: h + v, layer_signature=layer)
    mul = FunctionController(lambda h: h * 2.0, layer_signature=layer)
    before, between, after = (LayerActivationDetector(layer) for _ in range(3))
    with tiny_gpt2.layers.hooks([before, add, between, mul, after]):
        first = tiny_gpt2.forwards(TEXTS).logits
    torch.testing.assert_close(between.activations, before.activations + v)
    torch.testing.assert_close(after.activations, (before.activations + v) * 2.0)
    torch.testing.assert_close(first, _logits_with_raw_hook(tiny_gpt2, layer, lambda o: (o + v) * 2.0))
    with tiny_gpt2.layers.hooks([mul, add]):
        second = tiny_gpt2.forwards(TEXTS).logits
    torch.testing.assert_close(second, _logits_with_raw_hook(tiny_gpt2, layer, lambda o: o * 2.0 + v))
    assert (first - second).abs().max() > 1e-4


def test_pre_forward_controller_equals_forward_controller_on_previous_block(tiny_lm):
    f = lambda h: h * 0.5 - 1.0  # noqa: E731
    with tiny_lm.layers.hooks([FunctionController(f, layer_signature=2, hook_type="pre_forward")]):
        pre = tiny_lm.forwards(TEXTS).logits
    with tiny_lm.layers.hooks([FunctionController(f, layer_signature=1)]):
        post = tiny_lm.forwards(TEXTS).logits
    torch.testing.assert_close(pre, post)


def test_disabled_hook_and_with_controllers_false_skip_controllers(tiny_gpt2):
    baseline = tiny_gpt2.forwards(TEXTS).logits
    ctrl = FunctionController(lambda h: h * 10.0, layer_signature=0)
    det = LayerActivationDetector(0)
    with tiny_gpt2.layers.hooks([ctrl, det]):
        assert (tiny_gpt2.forwards(TEXTS).logits - baseline).abs().max() > 1e-3
        out, _ = tiny_gpt2.inference.execute_inference(TEXTS, with_controllers=False, output_hidden_states=True)
        torch.testing.assert_close(out.logits, baseline)
        torch.testing.assert_close(det.activations, out.hidden_states[1])  # detectors still ran
        ctrl.disable()
        torch.testing.assert_close(tiny_gpt2.forwards(TEXTS).logits, baseline)
        ctrl.enable()
        assert (tiny_gpt2.forwards(TEXTS).logits - baseline).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- errors & scoping
def test_exception_in_hook_names_hook_and_layer(tiny_lm):
    def boom(h):
        raise ValueError("bad activations")

    ctrl = FunctionController(boom, layer_signature=1, hook_id="my-boom")
    tiny_lm.layers.register_hook(None, ctrl)
    layer = tiny_lm.layers.resolve(1)
    with pytest.raises(HookError) as info:
        tiny_lm.forwards(TEXTS)
    message = str(info.value)
    assert "FunctionController" in message and "my-boom" in message and repr(layer) in message
    assert "ValueError: bad activations" in message
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.layer == layer and info.value.hook_id == "my-boom"


def test_controller_returning_non_tensor_is_reported(tiny_gpt2):
    with tiny_gpt2.layers.hooks([FunctionController(lambda h: "oops", layer_signature=0, hook_id="str-ctrl")]):
        with pytest.raises(HookError, match=r"str-ctrl.*must return a torch.Tensor or None, got str"):
            tiny_gpt2.forwards(TEXTS)


def test_context_manager_removes_hooks_even_when_forward_raises(tiny_gpt2):
    baseline = tiny_gpt2.forwards(TEXTS).logits

    def boom(h):
        raise RuntimeError("inside")

    with pytest.raises(HookError):
        with tiny_gpt2.layers.hooks({0: FunctionController(lambda h: h * 5), 1: [FunctionController(boom)]}) as ids:
            assert len(ids) == 2 and len(tiny_gpt2.layers.get_hooks()) == 2
            tiny_gpt2.forwards(TEXTS)
    assert tiny_gpt2.layers.get_hooks() == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_gpt2.model.modules())
    torch.testing.assert_close(tiny_gpt2.forwards(TEXTS).logits, baseline)


# ------------------------------------------------------------------------------------------------ batch context
class _ContextRecorder(Detector):
    def __init__(self, layer):
        super().__init__(layer)
        self.starts: list[BatchContext] = []
        self.ends = 0
        self.seen: list[tuple[BatchContext | None, tuple[int, ...]]] = []

    def on_batch_start(self, context):
        super().on_batch_start(context)
        self.starts.append(context)

    def on_batch_end(self):
        super().on_batch_end()
        self.ends += 1

    def process_activations(self, module, inputs, output):
        self.seen.append((self.context, tuple(output.shape)))


def test_batch_context_is_set_around_every_forward(tiny_llama):
    rec = _ContextRecorder(0)
    tiny_llama.layers.register_hook(None, rec)
    _, enc = tiny_llama.inference.execute_inference(TEXTS)
    assert len(rec.starts) == 1 and rec.ends == 1 and rec.context is None
    ctx = rec.seen[0][0]
    assert ctx.texts == TEXTS and ctx.generation_step is None and ctx.tokenizer is tiny_llama.tokenizer
    assert torch.equal(ctx.input_ids, enc["input_ids"]) and torch.equal(ctx.attention_mask, enc["attention_mask"])
    bos, pad = tiny_llama.tokenizer.bos_token_id, tiny_llama.tokenizer.pad_token_id
    expected_special = (enc["input_ids"] == bos) | (enc["input_ids"] == pad) | (enc["attention_mask"] == 0)
    assert torch.equal(ctx.special_tokens_mask, expected_special)
    assert ctx.special_tokens_mask[:, 0].all()  # the BOS token


def test_hook_base_defaults_store_and_clear_context():
    hook = Hook(layer_signature="x")
    ctx = BatchContext(["a"], torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.bool), None)
    hook.on_batch_start(ctx)
    assert hook.context is ctx
    hook.on_batch_end()
    assert hook.context is None
    assert "x" in repr(hook)
