"""lm.activations.save: values against plain forwards, early stop, streaming, resume after interruption, bad input."""

from __future__ import annotations

import os

import pytest
import torch

from mi_crow.datasets import TextDataset
from mi_crow.hooks import Detector, FunctionController, HookError
from mi_crow.testing import make_tiny_llama_lm


def _reference_hidden(lm, texts, blocks, batch_size, max_length=128):
    """Per batch: {block: hidden_states[block + 1]} from a plain forward with output_hidden_states, mask, ids."""
    out = []
    for start in range(0, len(texts), batch_size):
        result, enc = lm.inference.execute_inference(
            texts[start : start + batch_size], max_length=max_length, output_hidden_states=True
        )
        hidden = {block: result.hidden_states[block + 1] for block in blocks}
        out.append((hidden, enc["attention_mask"], enc["input_ids"]))
    return out


def _batch_files(store, run_id, index):
    root = store.path(f"activations/{run_id}/batch_{index}")
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def test_saved_activations_equal_plain_forward(tiny_lm, sample_texts):
    store = tiny_lm.store
    run_id = tiny_lm.activations.save(sample_texts, [1, 0], batch_size=5, max_length=64, progress=False)
    assert store.list_batches(run_id) == [0, 1, 2, 3, 4]
    names = tiny_lm.layers.block_names
    reference = _reference_hidden(tiny_lm, sample_texts, (0, 1), 5, 64)
    for index, (hidden, mask, ids) in enumerate(reference):
        for block in (0, 1):
            batch = store.load_batch(run_id, index, names[block])
            assert torch.equal(batch.attention_mask, mask)
            real = mask.bool()
            # Format 2 stores real tokens only: the padded view holds them at their positions and zeros elsewhere.
            torch.testing.assert_close(batch.activations[real], hidden[block][real])
            assert (batch.activations[~real] == 0).all()
        assert torch.equal(store.load_batch_extra(run_id, index)["input_ids"], ids)
    meta = store.read_run_meta(run_id)
    assert meta["model_id"] == tiny_lm.model_id
    assert meta["layers"] == [names[1], names[0]]
    assert meta["d"] == {names[0]: 32, names[1]: 32}
    assert meta["dtype"] == "float32" and meta["batch_size"] == 5 and meta["max_length"] == 64
    assert "n_texts=24" in meta["dataset"]
    assert meta["n_tokens"] == sum(int(m.sum()) for _, m, _ in reference)


def test_save_sublayer_and_last_block_equal_torch_hook_reference(tiny_gpt2, sample_texts):
    layers = ["transformer.h.1.mlp", "transformer.h.2"]
    ref = {name: [] for name in layers}
    handles = [
        tiny_gpt2.layers.get_module(name).register_forward_hook(
            lambda m, a, out, name=name: ref[name].append(out.detach().clone())
        )
        for name in layers
    ]
    tiny_gpt2.inference.execute_inference(sample_texts, batch_size=8)
    for handle in handles:
        handle.remove()
    run_id = tiny_gpt2.activations.save(sample_texts, layers, batch_size=8, progress=False)
    for name in layers:
        for index in range(3):
            got = tiny_gpt2.store.load_batch(run_id, index, name)
            real = got.attention_mask.bool()
            torch.testing.assert_close(got.activations[real], ref[name][index][real])


def test_forward_stops_after_deepest_requested_layer(tiny_lm, sample_texts):
    tiny_lm.layers.width(0)  # the one-off shape probe (a full forward) happens before counting starts
    calls = {"block1": 0, "block2": 0, "head": 0}
    modules = {"block1": tiny_lm.layers.get_module(1), "block2": tiny_lm.layers.get_module(2)}
    modules["head"] = tiny_lm.model.get_output_embeddings()

    def counter(key):
        def hook(module, args, output):
            calls[key] += 1

        return hook

    handles = [m.register_forward_hook(counter(k)) for k, m in modules.items()]
    tiny_lm.activations.save(sample_texts, [1, 0], batch_size=6, progress=False)
    assert calls == {"block1": 4, "block2": 0, "head": 0}
    tiny_lm.forwards(sample_texts[:2])
    assert calls == {"block1": 5, "block2": 1, "head": 1}
    for handle in handles:
        handle.remove()
    assert tiny_lm.layers.get_hooks() == []


def test_save_streams_the_dataset_batch_by_batch(tiny_gpt2, sample_texts):
    class CountingDataset:
        def __init__(self, texts):
            self.texts_seen = 0
            self._texts = texts

        def iter_batches(self, batch_size):
            for start in range(0, len(self._texts), batch_size):
                self.texts_seen += 1
                yield self._texts[start : start + batch_size]

        def describe(self):
            return "counting"

    dataset = CountingDataset(sample_texts)
    seen_at_write = []
    store = tiny_gpt2.store
    original = store.write_packed_batch

    def spy(run_id, index, *args, **kwargs):
        seen_at_write.append((index, dataset.texts_seen))
        return original(run_id, index, *args, **kwargs)

    store.write_packed_batch = spy
    tiny_gpt2.activations.save(dataset, 0, batch_size=4, progress=False)
    # batch i is written while at most batch i+1 has been read (the writer overlaps the next forward): memory
    # holds two batches at most, never the dataset
    assert [index for index, _ in seen_at_write] == list(range(6))
    assert all(index + 1 <= seen <= index + 2 for index, seen in seen_at_write)


def test_save_dtype_and_dataset_object(tiny_gpt2, sample_texts):
    dataset = TextDataset(sample_texts, name="sample")
    run_id = tiny_gpt2.activations.save(dataset, "transformer.h.0", run_id="bf16", batch_size=12, dtype="bfloat16",
                                        progress=False)
    assert run_id == "bf16"
    meta = tiny_gpt2.store.read_run_meta(run_id)
    assert meta["dtype"] == "bfloat16" and "sample" in meta["dataset"]
    ref = _reference_hidden(tiny_gpt2, sample_texts, (0,), 12)
    for index, (hidden, _, _) in enumerate(ref):
        got, mask = tiny_gpt2.store.load_batch(run_id, index, "transformer.h.0")
        assert got.dtype == torch.bfloat16
        real = mask.bool()
        assert torch.equal(got[real], hidden[0].to(torch.bfloat16)[real])
    # stored packed in bf16: 2 bytes per value of a real token (plus the safetensors header)
    path = tiny_gpt2.store.path(f"activations/{run_id}/batch_0/transformer.h.0/activations.safetensors")
    n_real = tiny_gpt2.store.read_run_meta(run_id)["batch_tokens"]["0"]
    assert n_real * 32 * 2 < path.stat().st_size < n_real * 32 * 2 + 1024


def test_save_with_controller_saves_controlled_activations(tiny_gpt2, sample_texts):
    with tiny_gpt2.layers.hooks({0: FunctionController(lambda h: h * 0 + 3.0)}):
        run_id = tiny_gpt2.activations.save(sample_texts[:4], 0, batch_size=4, progress=False)
    batch = tiny_gpt2.store.load_batch(run_id, 0, "transformer.h.0")
    real = batch.attention_mask.bool()
    assert torch.equal(batch.activations[real], torch.full_like(batch.activations[real], 3.0))


def test_progress_bar_counts_tokens(tiny_gpt2, sample_texts, capsys):
    tiny_gpt2.activations.save(sample_texts[:4], 0, batch_size=2, run_id="bar", progress=True)
    err = capsys.readouterr().err
    assert "saving bar" in err and "tok" in err


# --------------------------------------------------------------------------------------------------- resume
class _FailOnBatch(Detector):
    """Raises inside the forward pass of the given batch (0-based), simulating a crash mid-run."""

    def __init__(self, layer, fail_at):
        super().__init__(layer)
        self.fail_at = fail_at
        self.batches = -1

    def on_batch_start(self, context):
        super().on_batch_start(context)
        self.batches += 1

    def process_activations(self, module, inputs, output):
        if self.batches == self.fail_at:
            raise KeyError("simulated crash")


def test_interrupted_save_resumes_and_equals_uninterrupted(tiny_lm, sample_texts):
    store = tiny_lm.store
    layers = [0, 2]
    names = [tiny_lm.layers.resolve(layer) for layer in layers]
    full = tiny_lm.activations.save(sample_texts, layers, run_id="full", batch_size=4, progress=False)

    failing = _FailOnBatch(1, fail_at=3)
    tiny_lm.layers.register_hook(None, failing)
    with pytest.raises(HookError, match=r"_FailOnBatch.*simulated crash"):
        tiny_lm.activations.save(sample_texts, layers, run_id="resumed", batch_size=4, progress=False)
    tiny_lm.layers.unregister_hook(failing)
    assert store.list_batches("resumed") == [0, 1, 2]
    assert [h for h in tiny_lm.layers.get_hooks()] == []
    before = {i: _batch_files(store, "resumed", i) for i in range(3)}
    assert all(len(files) == len(names) + 2 for files in before.values())  # one file per layer, tokens, marker

    assert tiny_lm.activations.save(sample_texts, layers, run_id="resumed", batch_size=4, progress=False) == "resumed"
    assert store.list_batches("resumed") == store.list_batches(full) == list(range(6))
    for i in range(3):
        assert _batch_files(store, "resumed", i) == before[i]  # completed batches untouched: bytes and mtimes
    for i in range(6):
        for name in names:
            a, b = store.load_batch("resumed", i, name), store.load_batch(full, i, name)
            assert torch.equal(a.activations, b.activations) and torch.equal(a.attention_mask, b.attention_mask)
    assert store.read_run_meta("resumed")["n_tokens"] == store.read_run_meta(full)["n_tokens"]

    # a finished run re-run is a no-op that rewrites nothing
    snapshot = {i: _batch_files(store, "resumed", i) for i in range(6)}
    tiny_lm.activations.save(sample_texts, layers, run_id="resumed", batch_size=4, progress=False)
    assert {i: _batch_files(store, "resumed", i) for i in range(6)} == snapshot


def test_keyboard_interrupt_mid_batch_leaves_no_partial_batch(tiny_gpt2, sample_texts):
    calls = {"n": 0}

    def interrupt(h):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return None

    with tiny_gpt2.layers.hooks({0: FunctionController(interrupt)}):
        with pytest.raises(KeyboardInterrupt):
            tiny_gpt2.activations.save(sample_texts, 0, run_id="kb", batch_size=8, progress=False)
    assert tiny_gpt2.store.list_batches("kb") == [0]
    assert tiny_gpt2.layers.get_hooks() == []
    tiny_gpt2.activations.save(sample_texts, 0, run_id="kb", batch_size=8, progress=False)
    assert tiny_gpt2.store.list_batches("kb") == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ bad input
def test_existing_run_with_different_settings_is_refused(tiny_gpt2, sample_texts):
    tiny_gpt2.activations.save(sample_texts, 0, run_id="r", batch_size=8, progress=False)
    files = _batch_files(tiny_gpt2.store, "r", 0)
    with pytest.raises(ValueError, match=r"run_id='r' already exists .* different layers: stored \['transformer.h.0'\], requested \['transformer.h.1'\]"):
        tiny_gpt2.activations.save(sample_texts, 1, run_id="r", batch_size=8, progress=False)
    with pytest.raises(ValueError, match=r"run_id='r' already exists .* different batch_size"):
        tiny_gpt2.activations.save(sample_texts, 0, run_id="r", batch_size=4, progress=False)
    with pytest.raises(ValueError, match=r"run_id='r' already exists .* different dtype"):
        tiny_gpt2.activations.save(sample_texts, 0, run_id="r", batch_size=8, dtype=torch.float16, progress=False)
    with pytest.raises(ValueError, match=r"run_id='r' already exists .* different dataset_sha256"):
        tiny_gpt2.activations.save(sample_texts[::-1], 0, run_id="r", batch_size=8, progress=False)
    llama = make_tiny_llama_lm(store=tiny_gpt2.store)
    with pytest.raises(ValueError, match=r"run_id='r' already exists .* different model_id: stored 'tiny-gpt2-seed0', requested 'tiny-llama-seed0'"):
        llama.activations.save(sample_texts, 0, run_id="r", batch_size=8, progress=False)
    assert _batch_files(tiny_gpt2.store, "r", 0) == files


def test_save_bad_input(tiny_gpt2, sample_texts):
    save = tiny_gpt2.activations.save
    with pytest.raises(ValueError, match=r"dataset_or_texts must contain at least one text, got an empty list"):
        save([], 0)

    class Empty:
        def iter_batches(self, batch_size):
            return iter(())

        def describe(self):
            return "empty"

    with pytest.raises(ValueError, match=r"dataset_or_texts is empty: Empty yielded no texts"):
        save(Empty(), 0)
    with pytest.raises(TypeError, match=r"dataset_or_texts\[1\] must be a str, got int"):
        save(["a", 1], 0)
    with pytest.raises(TypeError, match=r"dataset_or_texts must be a list of str or a mi_crow dataset .* got str"):
        save("just one text", 0)
    with pytest.raises(ValueError, match=r"layer=7 is out of range"):
        save(sample_texts, [0, 7])
    with pytest.raises(ValueError, match=r"layer='transformer.h.9' is not a layer"):
        save(sample_texts, "transformer.h.9")
    with pytest.raises(ValueError, match=r"layers must name at least one layer, got \[\]"):
        save(sample_texts, [])
    with pytest.raises(ValueError, match=r"batch_size must be a positive int, got 0"):
        save(sample_texts, 0, batch_size=0)
    with pytest.raises(ValueError, match=r"max_length must be a positive int, got 'long'"):
        save(sample_texts, 0, max_length="long")
    with pytest.raises(ValueError, match=r"run_id must be a non-empty str without '/'.*got 'a/b'"):
        save(sample_texts, 0, run_id="a/b")
    with pytest.raises(ValueError, match=r"dtype must be a torch.dtype or one of .* got 'int8'"):
        save(sample_texts, 0, dtype="int8")
    assert tiny_gpt2.store.list_runs() == []
    tiny_gpt2.store = None
    with pytest.raises(ValueError, match=r"lm.store is None"):
        save(sample_texts, 0)
    assert not os.environ.get("MI_CROW_TEST_SENTINEL")


def test_failed_write_surfaces_and_resume_completes(tiny_gpt2, sample_texts):
    store = tiny_gpt2.store
    original = store.write_packed_batch

    def flaky(run_id, index, *args, **kwargs):
        if index == 2:
            raise OSError("disk full (simulated)")
        return original(run_id, index, *args, **kwargs)

    store.write_packed_batch = flaky
    with pytest.raises(OSError, match="disk full"):
        tiny_gpt2.activations.save(sample_texts, 0, run_id="w", batch_size=4, progress=False)
    assert store.list_batches("w") == [0, 1]
    store.write_packed_batch = original
    tiny_gpt2.activations.save(sample_texts, 0, run_id="w", batch_size=4, progress=False)
    assert store.list_batches("w") == list(range(6))


# ------------------------------------------------------------------------------------------- store format 2
def _by_text(store, run_id, layer):
    """Text index -> (token ids, vectors) of a run, through the padded view and the store's text mapping."""
    out = {}
    for i in store.list_batches(run_id):
        acts, mask = store.load_batch(run_id, i, layer)
        ids = store.load_batch_extra(run_id, i)["input_ids"]
        for row, text in enumerate(store.batch_text_indices(run_id, i)):
            n = int(mask[row].sum())
            out[text] = (ids[row, :n], acts[row, :n])
    return out


def test_shard_tokens_joins_whole_forward_batches(tiny_gpt2, sample_texts):
    store = tiny_gpt2.store
    per_batch = tiny_gpt2.activations.save(sample_texts, 1, run_id="per", batch_size=3, progress=False)
    joined = tiny_gpt2.activations.save(sample_texts, 1, run_id="joined", batch_size=3, shard_tokens=100,
                                        progress=False)
    records = store.batch_records(joined)
    assert [r["batch_index"] for r in records] == list(range(len(records))) and len(records) < 8
    assert sum((r["forward_batches"] for r in records), []) == list(range(8))  # whole forward batches, in order
    tokens = [r["n_tokens"] for r in records]
    assert all(n >= 100 for n in tokens[:-1]) and sum(tokens) == store.read_run_meta(per_batch)["n_tokens"]
    a, b = _by_text(store, joined, "transformer.h.1"), _by_text(store, per_batch, "transformer.h.1")
    assert sorted(a) == sorted(b) == list(range(len(sample_texts)))
    for text in b:
        assert torch.equal(a[text][0], b[text][0]) and torch.equal(a[text][1], b[text][1])
    ref = _reference_hidden(tiny_gpt2, sample_texts[:1], (1,), 1)[0][0][1][0]
    torch.testing.assert_close(a[0][1], ref)
    with pytest.raises(ValueError, match=r"give shard_size .* or shard_tokens .* not both"):
        tiny_gpt2.activations.save(sample_texts, 1, shard_size=4, shard_tokens=40, progress=False)
    with pytest.raises(ValueError, match=r"already exists .* different shard_tokens: stored 100, requested 200"):
        tiny_gpt2.activations.save(sample_texts, 1, run_id="joined", batch_size=3, shard_tokens=200, progress=False)


def test_default_storage_dtype_is_the_models_and_another_dtype_is_refused(tiny_gpt2, sample_texts):
    tiny_gpt2.model.to(torch.bfloat16)  # what a bf16 forward policy does to the parameters
    run_id = tiny_gpt2.activations.save(sample_texts[:6], 0, run_id="b", batch_size=3, progress=False)
    meta = tiny_gpt2.store.read_run_meta(run_id)
    assert meta["dtype"] == meta["storage_dtype"] == "bfloat16" and meta["layer_dtypes"] == {
        "transformer.h.0": "bfloat16"}
    assert tiny_gpt2.store.load_batch(run_id, 0, "transformer.h.0").activations.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"run_id='b' already exists .* different dtype: stored 'bfloat16', "
                                         r"requested 'float16'"):
        tiny_gpt2.activations.save(sample_texts[:6], 0, run_id="b", batch_size=3, dtype="float16", progress=False)


def test_a_format_1_run_is_resumed_in_format_1(tiny_gpt2, sample_texts):
    """A run a previous version saved (padded files, records in meta.json) continues in its own format."""
    store = tiny_gpt2.store
    tiny_gpt2.activations.save(sample_texts[:8], 0, run_id="new", batch_size=4, progress=False)
    full = store.load_batch("new", 1, "transformer.h.0")
    # the same run written in format 1, with its second batch missing
    first = store.load_batch("new", 0, "transformer.h.0")
    meta = {k: v for k, v in store.read_run_meta("new").items() if k not in ("store_format", "status",
                                                                              "storage_dtype")}
    meta["format_version"] = 1
    store.write_activation_batch("old", 0, {"transformer.h.0": first.activations}, first.attention_mask,
                                 extra=store.load_batch_extra("new", 0))
    store.write_run_meta("old", meta)
    tiny_gpt2.activations.save(sample_texts[:8], 0, run_id="old", batch_size=4, progress=False)
    assert store.run_format("old") == 1 and store.list_batches("old") == [0, 1]
    got = store.load_batch("old", 1, "transformer.h.0")
    real = got.attention_mask.bool()
    assert torch.equal(got.attention_mask, full.attention_mask)
    assert torch.equal(got.activations[real], full.activations[real])
