"""LanguageModel: loading, padding, layers, inference, generation, SAE attachment, bad input."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from mi_crow.hooks import Controller, Detector, FunctionController, LayerActivationDetector
from mi_crow.language_model import LanguageModel
from mi_crow.testing import build_tokenizer, make_tiny_gpt2_model, make_tiny_llama_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world!",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Birds sing.",
]


# ------------------------------------------------------------------------------------------------- padding
def test_batched_inference_equals_one_text_at_a_time(tiny_lm):
    out, enc = tiny_lm.inference.execute_inference(TEXTS, output_hidden_states=True)
    mask = enc["attention_mask"]
    assert (mask == 0).any(), "the batch must actually contain padding"
    assert tiny_lm.tokenizer.pad_token is not None
    for i, text in enumerate(TEXTS):
        single, single_enc = tiny_lm.inference.execute_inference([text], output_hidden_states=True)
        n = int(single_enc["attention_mask"].sum())
        assert int(mask[i].sum()) == n
        # right padding: the real tokens of every text sit at positions 0..n-1
        assert torch.equal(enc["input_ids"][i, :n], single_enc["input_ids"][0])
        torch.testing.assert_close(out.logits[i, :n], single.logits[0], atol=1e-5, rtol=1e-4)
        for layer in range(len(out.hidden_states)):
            torch.testing.assert_close(
                out.hidden_states[layer][i, :n], single.hidden_states[layer][0], atol=1e-5, rtol=1e-4
            )


def test_llama_tokenizer_keeps_its_bos_and_padding_side(tiny_llama):
    tok = tiny_llama.tokenizer
    assert tok.padding_side == "left"  # the user's setting is left alone; forwards pad right explicitly
    _, enc = tiny_llama.inference.execute_inference(TEXTS)
    assert (enc["input_ids"][:, 0] == tok.bos_token_id).all()
    assert enc["attention_mask"][:, 0].all()


def test_pad_token_added_when_tokenizer_has_none():
    gpt2_tok = build_tokenizer("gpt2")
    assert gpt2_tok.pad_token is None
    lm = LanguageModel(make_tiny_gpt2_model(gpt2_tok), gpt2_tok)
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token
    assert lm.model.config.pad_token_id == lm.tokenizer.eos_token_id


def test_pad_token_created_and_embeddings_resized_without_eos_or_unk():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    base = build_tokenizer("gpt2")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(base.backend_tokenizer.to_str()))
    assert tok.pad_token is None and tok.eos_token is None and tok.unk_token is None
    model = make_tiny_gpt2_model(base)
    vocab = model.get_input_embeddings().num_embeddings
    lm = LanguageModel(model, tok)
    assert lm.tokenizer.pad_token == "<pad>"
    assert lm.model.get_input_embeddings().num_embeddings == len(tok) > vocab
    out, enc = lm.inference.execute_inference(TEXTS[:2])
    assert (enc["input_ids"] == lm.tokenizer.pad_token_id).any() and torch.isfinite(out.logits).all()


# -------------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_from_huggingface_local_directory_roundtrip(tmp_path, style):
    tok = build_tokenizer(style)
    model = make_tiny_gpt2_model(tok) if style == "gpt2" else make_tiny_llama_model(tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    original = LanguageModel(model, build_tokenizer(style))
    loaded = LanguageModel.from_huggingface(tmp_path / "m", dtype="float32")
    assert loaded.model_id == str(tmp_path / "m")
    assert loaded.layers.list_layers() == original.layers.list_layers()
    torch.testing.assert_close(loaded.forwards(TEXTS).logits, original.forwards(TEXTS).logits)
    half = LanguageModel.from_huggingface(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_from_huggingface_hub_name_offline_says_so_and_suggests_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as info:
        LanguageModel.from_huggingface("mi-crow-test/definitely-not-a-model-xyz")
    message = str(info.value)
    assert "'mi-crow-test/definitely-not-a-model-xyz'" in message
    assert "offline" in message and "local directory" in message


def test_from_huggingface_bad_local_directory_and_arguments(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is a local directory but no model could be loaded"):
        LanguageModel.from_huggingface(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"dtype must be a torch.dtype or one of .* got 'float13'"):
        LanguageModel.from_huggingface(tmp_path / "empty", dtype="float13")
    with pytest.raises(TypeError, match=r"model_params must be a dict or None, got list"):
        LanguageModel.from_huggingface(tmp_path / "empty", model_params=[1])


def test_constructor_rejects_bad_arguments():
    tok = build_tokenizer("gpt2")
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module .* got str"):
        LanguageModel("gpt2", tok)
    with pytest.raises(TypeError, match=r"tokenizer must be a HuggingFace tokenizer, got int"):
        LanguageModel(make_tiny_gpt2_model(tok), 5)
    with pytest.raises(ValueError, match=r"device must be .* got 'gpu:7'"):
        LanguageModel(make_tiny_gpt2_model(tok), tok, device="gpu:7")


# --------------------------------------------------------------------------------------------------- layers
def test_list_layers_are_named_modules(tiny_lm):
    names = [n for n, _ in tiny_lm.model.named_modules() if n]
    assert tiny_lm.layers.list_layers() == names
    blocks = tiny_lm.layers.block_names
    assert len(blocks) == tiny_lm.model.config.num_hidden_layers == 3
    for i, name in enumerate(blocks):
        assert tiny_lm.layers.resolve(i) == name
        assert tiny_lm.layers.get_module(i) is dict(tiny_lm.model.named_modules())[name]
    assert tiny_lm.layers.resolve(-1) == blocks[-1]
    assert tiny_lm.layers.resolve(blocks[1]) == blocks[1]


def test_resolve_errors(tiny_gpt2):
    with pytest.raises(ValueError, match=r"layer=3 is out of range: .* 3 transformer blocks, valid indices are 0..2"):
        tiny_gpt2.layers.resolve(3)
    with pytest.raises(ValueError, match=r"layer=-4 is out of range"):
        tiny_gpt2.layers.resolve(-4)
    with pytest.raises(ValueError) as info:
        tiny_gpt2.layers.resolve("transformer.h.O")
    assert "'transformer.h.O'" in str(info.value) and "'transformer.h.0'" in str(info.value)
    with pytest.raises(ValueError, match=r"closest valid names: \['transformer.h.1.mlp'"):
        tiny_gpt2.layers.resolve("transformer.h.1.mpl")
    with pytest.raises(TypeError, match=r"layer must be a str .* got 1.5"):
        tiny_gpt2.layers.resolve(1.5)
    with pytest.raises(TypeError, match=r"got True"):
        tiny_gpt2.layers.resolve(True)


def test_width_and_print_tree(tiny_lm):
    assert tiny_lm.layers.width(0) == tiny_lm.model.config.hidden_size == 32
    assert tiny_lm.layers.output_shape(-1) == ("batch", "seq", 32)
    lm_head = [n for n in tiny_lm.layers.list_layers() if n.endswith("lm_head")][0]
    assert tiny_lm.layers.width(lm_head) == len(tiny_lm.tokenizer)
    mlp = [n for n in tiny_lm.layers.list_layers() if n.endswith(".mlp")][0]
    assert tiny_lm.layers.width(mlp) == 32
    buffer = io.StringIO()
    text = tiny_lm.layers.print_tree(file=buffer)
    assert text == buffer.getvalue()
    for i, name in enumerate(tiny_lm.layers.block_names):
        assert f"{name} (" in text and f"-> [batch, seq, 32]  <- block {i}" in text
    shallow = tiny_lm.layers.print_tree(max_depth=1, file=io.StringIO())
    assert tiny_lm.layers.block_names[0] not in shallow


def test_register_and_unregister(tiny_gpt2):
    det = LayerActivationDetector(0, hook_id="d0")
    assert tiny_gpt2.layers.register_hook(None, det) == "d0"
    assert det.layer_signature == "transformer.h.0"
    assert tiny_gpt2.layers.get_hooks(0) == [det] and tiny_gpt2.layers.get_hooks(1) == []
    with pytest.raises(ValueError, match=r"a hook with id 'd0' is already registered"):
        tiny_gpt2.layers.register_hook(1, LayerActivationDetector(1, hook_id="d0"))
    with pytest.raises(TypeError, match=r"hook must be a mi_crow.hooks.Hook .* got function"):
        tiny_gpt2.layers.register_hook(0, lambda m, i, o: None)
    tiny_gpt2.layers.unregister_hook("d0")
    tiny_gpt2.forwards(TEXTS)
    assert det.activations is None
    # Issue 10: unregister_hook of an unknown id returns False (as documented) and never raises.
    assert tiny_gpt2.layers.unregister_hook("d0") is False


# ----------------------------------------------------------------------------------------------- inference
def test_execute_inference_in_batches_matches_one_pass(tiny_gpt2):
    # Issue 11 defect 6: one return shape whatever batch_size is (this test asserted the (list, list) form).
    full, full_enc = tiny_gpt2.inference.execute_inference(TEXTS)
    out, enc = tiny_gpt2.inference.execute_inference(TEXTS, batch_size=3)
    assert out.logits.shape == full.logits.shape and enc["input_ids"].shape == full_enc["input_ids"].shape
    assert torch.equal(enc["input_ids"], full_enc["input_ids"])
    assert torch.equal(enc["attention_mask"], full_enc["attention_mask"])
    for row in range(len(TEXTS)):
        n = int(enc["attention_mask"][row].sum())
        torch.testing.assert_close(out.logits[row, :n], full.logits[row, :n], atol=1e-5, rtol=1e-4)


def test_max_length_truncates(tiny_gpt2):
    out, enc = tiny_gpt2.inference.execute_inference(TEXTS, max_length=4)
    assert enc["input_ids"].shape[1] == 4 and out.logits.shape[:2] == (4, 4)


def test_inference_bad_input(tiny_gpt2):
    with pytest.raises(ValueError, match=r"texts must contain at least one text, got an empty list"):
        tiny_gpt2.inference.execute_inference([])
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int: 7"):
        tiny_gpt2.inference.execute_inference(["a", 7])
    with pytest.raises(TypeError, match=r"texts must be a list of str, got int"):
        tiny_gpt2.forwards(3)
    with pytest.raises(ValueError, match=r"batch_size must be a positive int or None, got 0"):
        tiny_gpt2.inference.execute_inference(["a"], batch_size=0)
    with pytest.raises(ValueError, match=r"max_new_tokens must be a positive int, got -1"):
        tiny_gpt2.generate(["a"], max_new_tokens=-1)


# ---------------------------------------------------------------------------------------------- generation
def _greedy_reference(lm, text, steps):
    """Independent greedy decoding: full forward over the growing sequence, argmax, no cache, no generate()."""
    ids = lm.tokenizer([text], return_tensors="pt")["input_ids"]
    for _ in range(steps):
        with torch.no_grad():
            logits = lm.model(input_ids=ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -steps:]


def test_generate_equals_greedy_reference_and_batching(tiny_lm):
    steps = 6
    prompts = TEXTS[:3]
    batched = tiny_lm.generate(prompts, max_new_tokens=steps, eos_token_id=None)
    assert isinstance(batched, list) and len(batched) == len(prompts)
    for prompt, got in zip(prompts, batched):
        ref_ids = _greedy_reference(tiny_lm, prompt, steps)
        assert got == tiny_lm.tokenizer.decode(ref_ids, skip_special_tokens=True)
        assert tiny_lm.generate([prompt], max_new_tokens=steps, eos_token_id=None) == [got]


def test_generate_with_controller_differs_and_hooks_see_each_step(tiny_lm):
    prompts = TEXTS[:2]
    plain = tiny_lm.generate(prompts, max_new_tokens=8, eos_token_id=None)

    class StepRecorder(Detector):
        def __init__(self):
            super().__init__(1)
            self.steps = []

        def process_activations(self, module, inputs, output):
            ctx = self.context
            self.steps.append((ctx.generation_step, tuple(ctx.input_ids.shape), tuple(ctx.attention_mask.shape),
                               tuple(output.shape[:2]), ctx.texts))

    rec = StepRecorder()
    push = torch.randn(32, generator=torch.Generator().manual_seed(1)) * 20
    with tiny_lm.layers.hooks([FunctionController(lambda h: h + push, layer_signature=1), rec]):
        steered = tiny_lm.generate(prompts, max_new_tokens=8, eos_token_id=None)
    assert steered != plain
    assert [s[0] for s in rec.steps] == list(range(8))
    for step, ids_shape, mask_shape, out_shape, texts in rec.steps:
        assert ids_shape == mask_shape == out_shape  # context lines up with what the hook sees
        assert texts == prompts
    assert rec.steps[0][1][1] > 1 and rec.steps[1][1] == (2, 1)
    assert tiny_lm.generate(prompts, max_new_tokens=8, eos_token_id=None) == plain
    assert rec.context is None


def test_generate_with_controllers_off(tiny_gpt2):
    plain = tiny_gpt2.generate(TEXTS[:2], max_new_tokens=5, eos_token_id=None)
    with tiny_gpt2.layers.hooks({0: FunctionController(lambda h: h * 50)}):
        assert tiny_gpt2.generate(TEXTS[:2], max_new_tokens=5, eos_token_id=None, with_controllers=False) == plain


# ------------------------------------------------------------------------------------------------------ SAE
class _FakeSae(nn.Module, Controller):
    """Just the surface attach_sae relies on: an nn.Module Controller with n_inputs."""

    def __init__(self, n_inputs):
        nn.Module.__init__(self)
        Controller.__init__(self)
        self.n_inputs = n_inputs
        self.scale = nn.Parameter(torch.full((n_inputs,), 2.0))

    def modify_activations(self, module, inputs, output):
        return output * self.scale


def test_attach_and_detach_sae(tiny_lm):
    baseline = tiny_lm.forwards(TEXTS).logits
    sae = _FakeSae(32)
    hook_id = tiny_lm.attach_sae(sae, 1)
    assert hook_id == sae.id and tiny_lm.layers.get_hooks(1) == [sae]
    assert sae.scale.device == tiny_lm.layers.layer_device(1)
    assert (tiny_lm.forwards(TEXTS).logits - baseline).abs().max() > 1e-4
    tiny_lm.detach_sae(sae)
    torch.testing.assert_close(tiny_lm.forwards(TEXTS).logits, baseline)
    with pytest.raises(ValueError, match=r"is not attached"):
        tiny_lm.detach_sae(sae)


def test_attach_sae_width_mismatch_names_both_numbers(tiny_gpt2):
    with pytest.raises(ValueError, match=r"sae.n_inputs=48 does not match the width of layer 'transformer.h.1', which is 32"):
        tiny_gpt2.attach_sae(_FakeSae(48), 1)
    with pytest.raises(TypeError, match=r"sae must be a mi_crow hook"):
        tiny_gpt2.attach_sae(nn.Linear(2, 2), 1)
    assert tiny_gpt2.layers.get_hooks() == []


def test_iter_inference_streams_batches_with_context(tiny_gpt2):
    starts = []

    class Recorder(Detector):
        def on_batch_start(self, context):
            super().on_batch_start(context)
            starts.append(list(context.texts))

        def process_activations(self, module, inputs, output):
            pass

    with tiny_gpt2.layers.hooks(Recorder(0)):
        sizes = [enc["input_ids"].shape[0] for _, enc in tiny_gpt2.inference.iter_inference(TEXTS, batch_size=3)]
    assert sizes == [3, 1]
    assert starts == [TEXTS[:3], TEXTS[3:]]
    assert tiny_gpt2.layers.get_hooks() == []
