"""The documented run API: ``list_run_batches``, ``get_run_batch``, ``get_run_metadata`` and the ``sample_count`` /
``batch_count`` records of ``meta.json``, checked against what was written."""

from __future__ import annotations

import math

import pytest
import torch

from mi_crow.store import CorruptStoreFileError, LocalStore, RunBatch, RunNotFoundError

LAYERS = ("model.layers.0", "model.layers.2.mlp")


def _batch(seed: int, b: int, seq: int = 5):
    g = torch.Generator().manual_seed(seed)
    acts = {layer: torch.randn(b, seq, 4 + i, generator=g) for i, layer in enumerate(LAYERS)}
    mask = torch.ones(b, seq, dtype=torch.long)
    mask[0, seq - 2:] = 0
    ids = torch.randint(0, 100, (b, seq), generator=g)
    return acts, mask, ids


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store", fsync=False)


def test_run_api_returns_what_was_written(store: LocalStore):
    store.write_run_meta("r", {"model_id": "m", "note": "hello"})
    written = {}
    for index, b in ((3, 2), (0, 4), (1, 1)):  # out of order, uneven batch sizes
        acts, mask, ids = _batch(index, b)
        store.write_activation_batch("r", index, acts, mask, extra={"input_ids": ids})
        written[index] = (acts, mask, ids)
    assert store.list_run_batches("r") == [0, 1, 3]
    for index, (acts, mask, ids) in written.items():
        batch = store.get_run_batch("r", index)
        assert isinstance(batch, RunBatch)
        assert sorted(batch.activations) == sorted(LAYERS)
        for layer in LAYERS:
            assert batch.activations[layer].dtype == acts[layer].dtype
            assert torch.equal(batch.activations[layer], acts[layer])
        assert torch.equal(batch.attention_mask, mask) and batch.attention_mask.dtype == mask.dtype
        assert batch.extra.keys() == {"input_ids"} and torch.equal(batch.extra["input_ids"], ids)
    meta = store.get_run_metadata("r")
    assert meta["model_id"] == "m" and meta["note"] == "hello"
    assert meta["sample_count"] == 2 + 4 + 1 and meta["batch_count"] == 3
    assert meta["n_tokens"] == sum(int(m.sum()) for _, m, _ in written.values())
    # The records are in the file itself, not only computed on reading.
    on_disk = store.get_json("activations/r/meta.json")
    assert on_disk["sample_count"] == 7 and on_disk["batch_count"] == 3


def test_get_run_batch_refuses_incomplete_batches_and_missing_runs(store: LocalStore):
    acts, mask, _ = _batch(0, 2)
    store.write_activation_batch("r", 0, acts, mask)
    # Files of batch 1 on disk but never marked complete: an interrupted write.
    store.put_tensors("activations/r/batch_1/model.layers.0/activations.safetensors",
                      {"activations": acts[LAYERS[0]], "attention_mask": mask})
    assert store.list_run_batches("r") == [0]
    with pytest.raises(ValueError, match=r"batch_index 1 is not a complete batch of run 'r' \(complete batches: "
                                         r"\[0\]\)"):
        store.get_run_batch("r", 1)
    with pytest.raises(RunNotFoundError, match="nope"):
        store.get_run_batch("nope", 0)
    with pytest.raises(RunNotFoundError, match="nope"):
        store.list_run_batches("nope")
    assert store.get_run_batch("r", 0).extra == {}


def test_get_run_batch_reports_a_layer_file_with_another_mask(store: LocalStore):
    acts, mask, _ = _batch(0, 2)
    store.write_activation_batch("r", 0, acts, mask)
    path = store.path(f"activations/r/batch_0/{LAYERS[1]}/activations.safetensors")
    store.put_tensors(f"activations/r/batch_0/{LAYERS[1]}/activations.safetensors",
                      {"activations": acts[LAYERS[1]], "attention_mask": torch.ones_like(mask)})
    with pytest.raises(CorruptStoreFileError, match=str(path)):
        store.get_run_batch("r", 0)


def test_counts_of_runs_written_before_they_were_recorded(store: LocalStore):
    for index, b in ((0, 3), (1, 2)):
        acts, mask, _ = _batch(index, b)
        store.write_activation_batch("r", index, acts, mask)
    old = store.get_json("activations/r/meta.json")
    del old["sample_count"], old["batch_count"]
    store.put_json("activations/r/meta.json", old)
    meta = store.get_run_metadata("r")
    assert meta["sample_count"] == 5 and meta["batch_count"] == 2


def test_malformed_records_are_reported_with_the_path(store: LocalStore):
    acts, mask, _ = _batch(0, 2)
    store.write_activation_batch("r", 0, acts, mask)
    meta = store.get_json("activations/r/meta.json")
    meta["batch_tokens"] = {}  # batch 0 complete but without a token count
    store.put_json("activations/r/meta.json", meta)
    with pytest.raises(CorruptStoreFileError, match=str(store.path("activations/r/meta.json"))):
        store.get_run_metadata("r")


def test_an_interrupted_rewrite_of_a_complete_batch_leaves_it_incomplete(store: LocalStore, monkeypatch):
    acts, mask, _ = _batch(0, 2)
    store.write_activation_batch("r", 0, acts, mask)
    store.write_activation_batch("r", 1, *_batch(1, 2)[:2])
    new_acts, new_mask, _ = _batch(9, 2)
    real_put = store.put_tensors
    calls = []

    def crash_on_second_layer(key, tensors, metadata=None):
        calls.append(key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_put(key, tensors, metadata)

    monkeypatch.setattr(store, "put_tensors", crash_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        store.write_activation_batch("r", 0, new_acts, new_mask)
    monkeypatch.undo()
    # Batch 0 now has one new and one old layer file: it must not count as complete.
    assert store.list_run_batches("r") == [1]
    assert store.get_run_metadata("r")["sample_count"] == 2
    store.write_activation_batch("r", 0, new_acts, new_mask)  # re-running completes it
    batch = store.get_run_batch("r", 0)
    assert all(torch.equal(batch.activations[layer], new_acts[layer]) for layer in LAYERS)


def test_saved_run_through_the_run_api_matches_a_forward_hook(tiny_gpt2, sample_texts):
    store = tiny_gpt2.store
    layers = ["transformer.h.0", "transformer.h.2.mlp"]
    texts = sample_texts[:11]
    run_id = tiny_gpt2.activations.save(texts, layers, batch_size=4, max_length=16, progress=False)
    meta = store.get_run_metadata(run_id)
    assert meta["sample_count"] == len(texts) and meta["batch_count"] == math.ceil(len(texts) / 4)
    assert store.list_run_batches(run_id) == [0, 1, 2]

    captured: dict[str, torch.Tensor] = {}
    handles = [tiny_gpt2.layers.get_module(name).register_forward_hook(
        lambda m, a, out, name=name: captured.__setitem__(name, (out[0] if isinstance(out, tuple) else out).detach()))
        for name in layers]
    try:
        for index in store.list_run_batches(run_id):
            chunk = texts[4 * index: 4 * index + 4]
            enc = tiny_gpt2.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=16)
            with torch.no_grad():
                tiny_gpt2.model(**enc)
            batch = store.get_run_batch(run_id, index)
            assert torch.equal(batch.attention_mask, enc["attention_mask"])
            assert torch.equal(batch.extra["input_ids"], enc["input_ids"])
            real = enc["attention_mask"].bool()  # padding positions are not part of the contract
            for name in layers:
                assert batch.activations[name].shape == captured[name].shape
                torch.testing.assert_close(batch.activations[name][real], captured[name][real])
    finally:
        for handle in handles:
            handle.remove()
