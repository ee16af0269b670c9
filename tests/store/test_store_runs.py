"""Activation runs: write then read back exactly, meta records, atomicity of batches, errors naming paths."""

from __future__ import annotations

import os
import re

import pytest
import torch

from mi_crow.store import CorruptStoreFileError, LocalStore, RunNotFoundError, StoreKeyNotFoundError

LAYERS = ("model.layers.0", "transformer.h.1.mlp")


def _batch(seed: int, b: int = 3, seq: int = 6, d: int = 5, lengths: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    acts = {layer: torch.randn(b, seq, d + i, generator=g) for i, layer in enumerate(LAYERS)}
    lengths = lengths or [seq - (j % 3) for j in range(b)]
    mask = torch.zeros(b, seq, dtype=torch.long)
    for j, n in enumerate(lengths):
        mask[j, :n] = 1
    return acts, mask


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store", fsync=False)


def test_write_read_back_exact(store: LocalStore):
    meta = {"model_id": "tiny-gpt2", "layers": list(LAYERS), "dtype": "float32", "dataset": "TextDataset(n=9)"}
    store.write_run_meta("run-a", meta)
    written = {}
    for i in range(3):
        acts, mask = _batch(i)
        store.write_activation_batch("run-a", i, acts, mask, extra={"input_ids": torch.arange(18).reshape(3, 6) + i})
        written[i] = (acts, mask)
    assert store.list_runs() == ["run-a"]
    assert store.list_batches("run-a") == [0, 1, 2]
    assert store.list_layers("run-a") == sorted(LAYERS)
    for i, (acts, mask) in written.items():
        for layer in LAYERS:
            back = store.load_batch("run-a", i, layer)
            assert back.activations.dtype == acts[layer].dtype and torch.equal(back.activations, acts[layer])
            assert back.attention_mask.dtype == mask.dtype and torch.equal(back.attention_mask, mask)
        assert torch.equal(store.load_batch_extra("run-a", i)["input_ids"], torch.arange(18).reshape(3, 6) + i)
        assert store.path(f"activations/run-a/batch_{i}/model.layers.0/activations.safetensors").is_file()
    got = store.read_run_meta("run-a")
    for k, v in meta.items():
        assert got[k] == v
    assert got["complete_batches"] == [0, 1, 2]
    assert got["batch_tokens"] == {str(i): int(m.sum()) for i, (_, m) in written.items()}
    assert got["n_tokens"] == sum(int(m.sum()) for _, m in written.values())
    assert got["batch_shapes"] == {str(i): [3, 6] for i in range(3)}
    assert got["layer_dims"] == {"model.layers.0": 5, "transformer.h.1.mlp": 6}
    assert got["layer_dtypes"] == {layer: "float32" for layer in LAYERS}


def test_bfloat16_and_bool_mask_roundtrip(store: LocalStore):
    acts = {"h.0": torch.randn(2, 4, 3).to(torch.bfloat16)}
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    store.write_activation_batch("r", 0, acts, mask)
    back = store.load_batch("r", 0, "h.0")
    assert back.activations.dtype == torch.bfloat16 and torch.equal(back.activations, acts["h.0"])
    assert torch.equal(back.attention_mask, mask)
    assert store.read_run_meta("r")["n_tokens"] == 6 and store.load_batch_extra("r", 0) == {}


def test_rewriting_meta_keeps_batch_records(store: LocalStore):
    acts, mask = _batch(0)
    store.write_run_meta("r", {"model_id": "m1"})
    store.write_activation_batch("r", 0, acts, mask)
    # A resumed save rewrites its metadata; it must not forget completed batches, even if it passes stale records.
    store.write_run_meta("r", {"model_id": "m1", "note": "resumed", "complete_batches": [], "n_tokens": 0})
    meta = store.read_run_meta("r")
    assert meta["note"] == "resumed" and meta["complete_batches"] == [0] and meta["n_tokens"] == int(mask.sum())
    assert store.list_batches("r") == [0]


def test_batches_out_of_order_and_rewrite(store: LocalStore):
    for i in (4, 1, 2):
        store.write_activation_batch("r", i, *_batch(i))
    assert store.list_batches("r") == [1, 2, 4]
    acts, mask = _batch(99)
    store.write_activation_batch("r", 2, acts, mask)
    assert torch.equal(store.load_batch("r", 2, LAYERS[1]).activations, acts[LAYERS[1]])
    assert store.list_batches("r") == [1, 2, 4]


def test_missing_run_names_run_and_store(store: LocalStore):
    with pytest.raises(RunNotFoundError, match=re.escape(str(store.base_path))) as info:
        store.read_run_meta("nope")
    assert "'nope'" in str(info.value)
    with pytest.raises(RunNotFoundError, match="nope"):
        store.list_batches("nope")
    with pytest.raises(RunNotFoundError, match="nope"):
        store.load_batch("nope", 0, "h")


def test_crash_between_layer_files_leaves_no_visible_batch(store: LocalStore, monkeypatch):
    store.write_activation_batch("r", 0, *_batch(0))
    real_replace = os.replace
    calls = {"n": 0}

    def crash_on_second(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # first layer file renamed, second layer file still a temp file
            raise KeyboardInterrupt("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        store.write_activation_batch("r", 1, *_batch(1))
    monkeypatch.undo()
    assert store.path("activations/r/batch_1/model.layers.0/activations.safetensors").is_file()
    assert not store.path("activations/r/batch_1/transformer.h.1.mlp/activations.safetensors").exists()
    assert store.list_batches("r") == [0]
    with pytest.raises(ValueError, match="batch_index 1 is not a complete batch"):
        store.load_batch("r", 1, "model.layers.0")
    reader = store.activation_reader("r", "model.layers.0", 1, shuffle=False, drop_last=False)
    assert sum(b.shape[0] for b in reader) == store.read_run_meta("r")["n_tokens"] == int(_batch(0)[1].sum())


def test_crash_before_meta_mark_leaves_batch_unlisted(store: LocalStore, monkeypatch):
    store.write_activation_batch("r", 0, *_batch(0))
    original = LocalStore.put_json

    def crash_on_meta(self, key, obj):
        if key.endswith("meta.json"):
            raise KeyboardInterrupt("simulated crash after the files, before the mark")
        original(self, key, obj)

    monkeypatch.setattr(LocalStore, "put_json", crash_on_meta)
    with pytest.raises(KeyboardInterrupt):
        store.write_activation_batch("r", 1, *_batch(1))
    monkeypatch.undo()
    for layer in LAYERS:  # every file is there, but the batch does not count
        assert store.path(f"activations/r/batch_1/{layer}/activations.safetensors").is_file()
    assert store.list_batches("r") == [0]
    assert store.read_run_meta("r")["n_tokens"] == int(_batch(0)[1].sum())


def test_missing_and_corrupt_batch_file_errors_name_the_path(store: LocalStore):
    store.write_activation_batch("r", 0, *_batch(0))
    store.write_activation_batch("r", 1, *_batch(1))
    p0 = store.path("activations/r/batch_0/model.layers.0/activations.safetensors")
    p0.unlink()
    with pytest.raises(StoreKeyNotFoundError, match=re.escape(str(p0))):
        store.load_batch("r", 0, "model.layers.0")
    p1 = store.path("activations/r/batch_1/model.layers.0/activations.safetensors")
    p1.write_bytes(p1.read_bytes()[:50])
    with pytest.raises(CorruptStoreFileError, match=re.escape(str(p1))):
        store.load_batch("r", 1, "model.layers.0")
    store.put_tensors("activations/r/batch_1/transformer.h.1.mlp/activations.safetensors", {"other": torch.ones(2)})
    with pytest.raises(CorruptStoreFileError, match="must hold tensors 'activations' and 'attention_mask'"):
        store.load_batch("r", 1, "transformer.h.1.mlp")
    store.path("activations/r/meta.json").write_text("{truncated")
    with pytest.raises(CorruptStoreFileError, match=re.escape(str(store.path("activations/r/meta.json")))):
        store.list_batches("r")


def test_unknown_layer_lists_stored_layers(store: LocalStore):
    store.write_activation_batch("r", 0, *_batch(0))
    with pytest.raises(ValueError, match=r"layer 'model.layers.9' is not stored.*model.layers.0"):
        store.load_batch("r", 0, "model.layers.9")


@pytest.mark.parametrize(
    ("call", "exc", "pattern"),
    [
        (lambda s, a, m: s.write_activation_batch("a/b", 0, a, m), ValueError, "run_id must be a non-empty name"),
        (lambda s, a, m: s.write_activation_batch(".hidden", 0, a, m), ValueError, "run_id"),
        (lambda s, a, m: s.write_activation_batch(7, 0, a, m), TypeError, "run_id must be a str"),
        (lambda s, a, m: s.write_activation_batch("r", -1, a, m), ValueError, "batch_index must be >= 0, got -1"),
        (lambda s, a, m: s.write_activation_batch("r", True, a, m), TypeError, "batch_index must be an int"),
        (lambda s, a, m: s.write_activation_batch("r", 0, {}, m), ValueError, "activations must be a non-empty"),
        (lambda s, a, m: s.write_activation_batch("r", 0, {"h/0": a["model.layers.0"]}, m), ValueError,
         "layer name must be"),
        (lambda s, a, m: s.write_activation_batch("r", 0, {"h": [1.0]}, m), TypeError,
         r"activations\['h'\] must be a Tensor"),
        (lambda s, a, m: s.write_activation_batch("r", 0, {"h": torch.ones(3, 6)}, m), ValueError,
         r"must have shape \[b, seq, d\] matching attention_mask \[3, 6\], got \[3, 6\]"),
        (lambda s, a, m: s.write_activation_batch("r", 0, {"h": torch.ones(3, 5, 2)}, m), ValueError,
         r"got \[3, 5, 2\]"),
        (lambda s, a, m: s.write_activation_batch("r", 0, a, m[0]), ValueError,
         r"attention_mask must have shape \[b, seq\], got \[6\]"),
        (lambda s, a, m: s.write_activation_batch("r", 0, a, m.float()), TypeError,
         "attention_mask must be an integer or bool tensor"),
        (lambda s, a, m: s.write_activation_batch("r", 0, a, m * 2), ValueError, "only 0 and 1"),
        (lambda s, a, m: s.write_activation_batch("r", 0, a, m.tolist()), TypeError, "attention_mask must be a Tensor"),
        (lambda s, a, m: s.write_activation_batch("r", 0, a, m, extra={"ids": [1]}), TypeError, "extra must be"),
        (lambda s, a, m: s.write_run_meta("r", ["not", "a", "dict"]), TypeError, "meta must be a mapping"),
        (lambda s, a, m: s.write_run_meta("r", {"obj": object()}), TypeError, "not JSON-serialisable"),
        (lambda s, a, m: s.load_batch("r", 0, "h/0"), ValueError, "layer must be"),
    ],
)
def test_bad_input(store: LocalStore, call, exc, pattern):
    acts, mask = _batch(0)
    with pytest.raises(exc, match=pattern):
        call(store, acts, mask)
    assert not store.list_batches("r") if store.run_exists("r") else True


def test_width_change_between_batches_refused(store: LocalStore):
    store.write_activation_batch("r", 0, {"h": torch.ones(1, 2, 4)}, torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"activations\['h'\] has width d=5 but earlier batches .* d=4"):
        store.write_activation_batch("r", 1, {"h": torch.ones(1, 2, 5)}, torch.ones(1, 2, dtype=torch.long))
    assert store.list_batches("r") == [0]


def test_delete_run(store: LocalStore):
    store.write_activation_batch("r", 0, *_batch(0))
    store.write_activation_batch("s", 0, *_batch(0))
    store.delete_run("r")
    assert store.list_runs() == ["s"]


def test_later_batch_with_other_layers_refused(store: LocalStore):
    acts, mask = _batch(0)
    store.write_activation_batch("r", 0, acts, mask)
    with pytest.raises(ValueError, match=r"same layers as the earlier batches.*expected \['model.layers.0', "
                                         r"'transformer.h.1.mlp'\], got \['model.layers.0'\]"):
        store.write_activation_batch("r", 1, {"model.layers.0": acts["model.layers.0"]}, mask)
    assert store.list_batches("r") == [0]
