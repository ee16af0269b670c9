"""DOCUMENTED_API.md, "Saving activations": the keyword call shape, sample_limit, shard_size,
save_activations_dataset, meta.json's sample_count / batch_count; stored tensors checked text by text against
plain one-text forwards."""

from __future__ import annotations

import pytest
import torch

from mi_crow.datasets import TextDataset
from mi_crow.hooks import FunctionController, HookError
from mi_crow.testing import SAMPLE_TEXTS

MAX_LENGTH = 64


_REFERENCES: dict[tuple[int, str], tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}


def _reference(lm, text, block):
    """Independent reference for one text: its token ids and block output from a one-text forward (cached per
    model object and text)."""
    key = (id(lm), text)
    if key not in _REFERENCES:
        out, enc = lm.inference.execute_inference([text], max_length=MAX_LENGTH, output_hidden_states=True)
        _REFERENCES[key] = (enc["input_ids"][0], tuple(h[0] for h in out.hidden_states))
    ids, hidden = _REFERENCES[key]
    return ids, hidden[block + 1]


@pytest.fixture(autouse=True)
def _fresh_references():
    yield
    _REFERENCES.clear()


def _check_batches_hold(lm, run_id, texts, shard, block):
    """Stored batch i holds exactly texts[i*shard:(i+1)*shard], each equal to its one-text reference."""
    store = lm.store
    name = lm.layers.resolve(block)
    n_batches = -(-len(texts) // shard)
    assert store.list_batches(run_id) == list(range(n_batches))
    for i in range(n_batches):
        chunk = texts[i * shard : (i + 1) * shard]
        batch = store.load_batch(run_id, i, name)
        ids = store.load_batch_extra(run_id, i)["input_ids"]
        assert batch.activations.shape[0] == len(chunk) == ids.shape[0]
        for row, text in enumerate(chunk):
            ref_ids, ref_hidden = _reference(lm, text, block)
            n = len(ref_ids)
            assert int(batch.attention_mask[row].sum()) == n and batch.attention_mask[row, :n].all()
            assert torch.equal(ids[row, :n], ref_ids)
            torch.testing.assert_close(batch.activations[row, :n], ref_hidden, atol=1e-5, rtol=1e-4)
    meta = store.read_run_meta(run_id)
    assert meta["sample_count"] == len(texts) and meta["batch_count"] == n_batches


def test_documented_keyword_form_with_sample_limit(tiny_lm):
    run_id = tiny_lm.activations.save(layer_signature=1, dataset=TextDataset(texts=SAMPLE_TEXTS), sample_limit=10,
                                      batch_size=4, shard_size=None, run_id=None, max_length=MAX_LENGTH,
                                      progress=False)
    assert isinstance(run_id, str) and run_id in tiny_lm.store.list_runs()
    _check_batches_hold(tiny_lm, run_id, SAMPLE_TEXTS[:10], 4, 1)
    assert [tiny_lm.store.read_run_meta(run_id)["batch_shapes"][str(i)][0] for i in range(3)] == [4, 4, 2]


@pytest.mark.parametrize(("batch_size", "shard_size"), [(4, 6), (6, 4), (5, 2), (3, 24)],
                         ids=["join", "split", "split-uneven", "one-shard"])
def test_shard_size_groups_exactly_the_texts(tiny_gpt2, batch_size, shard_size):
    run_id = tiny_gpt2.activations.save(layer_signature=[1, "gpt2lmheadmodel_transformer_h_0"],
                                        dataset=SAMPLE_TEXTS, batch_size=batch_size, shard_size=shard_size,
                                        run_id="sharded", max_length=MAX_LENGTH, progress=False)
    for block in (0, 1):
        _check_batches_hold(tiny_gpt2, run_id, SAMPLE_TEXTS, shard_size, block)
    meta = tiny_gpt2.store.read_run_meta(run_id)
    assert meta["batch_size"] == batch_size and meta["shard_size"] == shard_size
    # padding past each text's end is zero in re-grouped batches
    batch = tiny_gpt2.store.load_batch(run_id, 0, "transformer.h.1")
    assert (batch.activations[batch.attention_mask == 0] == 0).all()


def test_sample_limit_with_shard_size(tiny_gpt2):
    run_id = tiny_gpt2.activations.save(layer_signature=1, dataset=SAMPLE_TEXTS, sample_limit=11, batch_size=4,
                                        shard_size=5, max_length=MAX_LENGTH, progress=False)
    _check_batches_hold(tiny_gpt2, run_id, SAMPLE_TEXTS[:11], 5, 1)


def test_save_activations_dataset_and_positional_form_are_the_same_operation(tiny_gpt2, store):
    a = tiny_gpt2.activations.save_activations_dataset(dataset=SAMPLE_TEXTS[:9], layer_signature=1, batch_size=4,
                                                       run_id="a", progress=False)
    b = tiny_gpt2.activations.save(SAMPLE_TEXTS[:9], 1, run_id="b", batch_size=4, progress=False)
    c = tiny_gpt2.activations.save(dataset_or_texts=SAMPLE_TEXTS[:9], layers=[1], run_id="c", batch_size=4,
                                   progress=False)
    assert (a, b, c) == ("a", "b", "c")
    for i in range(3):
        ref = store.load_batch("b", i, "transformer.h.1")
        for other in ("a", "c"):
            got = store.load_batch(other, i, "transformer.h.1")
            assert torch.equal(got.activations, ref.activations) and torch.equal(got.attention_mask, ref.attention_mask)
    for run in ("a", "b", "c"):
        meta = store.read_run_meta(run)
        assert (meta["sample_count"], meta["batch_count"]) == (9, 3)


def test_names_given_twice_and_bad_values(tiny_gpt2):
    save = tiny_gpt2.activations.save
    with pytest.raises(ValueError, match=r"layer_signature and layers name the same .*layer_signature=1.*layers=0"):
        save(SAMPLE_TEXTS, 0, layer_signature=1)
    with pytest.raises(ValueError, match=r"dataset and dataset_or_texts name the same argument"):
        save(SAMPLE_TEXTS, 0, dataset=SAMPLE_TEXTS[:3])
    with pytest.raises(ValueError, match=r"sample_limit must be a positive int or None, got 0"):
        save(dataset=SAMPLE_TEXTS, layer_signature=0, sample_limit=0)
    with pytest.raises(ValueError, match=r"shard_size must be a positive int or None, got -1"):
        save(dataset=SAMPLE_TEXTS, layer_signature=0, shard_size=-1)
    with pytest.raises(ValueError, match=r"layer_signature must name at least one layer, got \[\]"):
        save(dataset=SAMPLE_TEXTS, layer_signature=[])
    with pytest.raises(ValueError, match=r"dataset is empty: _Empty yielded no texts"):
        save(dataset=_Empty(), layer_signature=0)
    with pytest.raises(ValueError, match=r"layer='gpt2lmheadmodel_transformer_h_7' is not a layer"):
        save(dataset=SAMPLE_TEXTS, layer_signature="gpt2lmheadmodel_transformer_h_7")
    assert tiny_gpt2.store.list_runs() == []


class _Empty:
    def iter_batches(self, batch_size):
        return iter(())

    def describe(self):
        return "empty"


def test_interrupted_sharded_save_resumes_and_equals_uninterrupted(tiny_gpt2, store):
    kwargs = dict(layer_signature=[0, 1], dataset=SAMPLE_TEXTS, batch_size=4, shard_size=6, max_length=MAX_LENGTH,
                  progress=False)
    tiny_gpt2.activations.save(run_id="full", **kwargs)
    calls = {"n": 0}

    def crash_in_fourth_forward(hidden):  # texts 12..15: stored batch 2 (texts 12..17) is not complete yet
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyError("simulated crash")

    failing = FunctionController(0, crash_in_fourth_forward)
    tiny_gpt2.layers.register_hook(None, failing)
    with pytest.raises(HookError, match="simulated crash"):
        tiny_gpt2.activations.save(run_id="resumed", **kwargs)
    assert tiny_gpt2.layers.unregister_hook(failing) is True
    assert store.list_batches("resumed") == [0, 1]
    assert store.read_run_meta("resumed")["sample_count"] == 12
    with pytest.raises(ValueError, match=r"different shard_size"):
        tiny_gpt2.activations.save(run_id="resumed", **{**kwargs, "shard_size": 4})
    tiny_gpt2.activations.save(run_id="resumed", **kwargs)
    assert store.list_batches("resumed") == store.list_batches("full") == [0, 1, 2, 3]
    for i in range(4):
        for name in ("transformer.h.0", "transformer.h.1"):
            a, b = store.load_batch("resumed", i, name), store.load_batch("full", i, name)
            assert torch.equal(a.activations, b.activations) and torch.equal(a.attention_mask, b.attention_mask)
    assert store.read_run_meta("resumed")["sample_count"] == 24
