"""Store format 2: packed batches round trip, O(1) completion markers, crash recovery from markers, markers that
disagree with files, dtype refusal, the byte-sized reader buffer and the ShuffleBuffer."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mi_crow.store import CorruptStoreFileError, LocalStore, ShuffleBuffer

LAYERS = {"model.layers.1": 4, "model.layers.2": 3}
PAD = 7


def _texts(g: torch.Generator, n_texts: int, max_len: int = 6) -> list[int]:
    return torch.randint(1, max_len + 1, (n_texts,), generator=g).tolist()


def _write(store: LocalStore, run: str = "r", n_batches: int = 5, dtype=torch.float32, seed: int = 0,
           finish: bool = True) -> dict[int, dict]:
    """Write a packed run; returns, per batch, what was written (the independent record)."""
    g = torch.Generator().manual_seed(seed)
    store.create_packed_run(run, {"model_id": "m", "pad_token_id": PAD}, LAYERS, dtype)
    written, next_text = {}, 0
    for i in range(n_batches):
        lengths = _texts(g, 1 + i % 3)
        n = sum(lengths)
        offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        acts = {layer: torch.randn(n, d, generator=g).to(dtype) for layer, d in LAYERS.items()}
        ids = torch.randint(10, 100, (n,), generator=g)
        text_ids = torch.arange(next_text, next_text + len(lengths))
        next_text += len(lengths)
        store.write_packed_batch(run, i, acts, offsets, ids, text_ids=text_ids, forward_batches=[i])
        written[i] = {"acts": acts, "lengths": lengths, "ids": ids, "text_ids": text_ids.tolist()}
    if finish:
        store.finish_packed_run(run)
    return written


def _padded(packed: torch.Tensor, lengths: list[int], fill=0) -> torch.Tensor:
    """Hand-built right-padded view of a packed tensor."""
    out = packed.new_full((len(lengths), max(lengths), *packed.shape[1:]), fill)
    start = 0
    for row, n in enumerate(lengths):
        out[row, :n] = packed[start:start + n]
        start += n
    return out


@pytest.mark.parametrize("finish", [True, False], ids=["finished", "markers-only"])
def test_round_trip_records_and_padded_view(store, finish):
    written = _write(store, finish=finish)
    meta = store.read_run_meta("r")
    assert meta["store_format"] == 2 and meta["status"] == ("complete" if finish else "writing")
    assert meta["complete_batches"] == list(range(5)) == store.list_run_batches("r")
    assert meta["batch_tokens"] == {str(i): sum(w["lengths"]) for i, w in written.items()}
    assert meta["batch_shapes"] == {str(i): [len(w["lengths"]), max(w["lengths"])] for i, w in written.items()}
    assert meta["n_tokens"] == sum(sum(w["lengths"]) for w in written.values())
    assert meta["sample_count"] == sum(len(w["lengths"]) for w in written.values()) and meta["batch_count"] == 5
    assert meta["layer_dims"] == LAYERS and meta["layer_dtypes"] == {k: "float32" for k in LAYERS}
    for i, w in written.items():
        for layer in LAYERS:
            acts, mask = store.load_batch("r", i, layer)
            assert torch.equal(acts, _padded(w["acts"][layer], w["lengths"]))
            assert torch.equal(mask, _padded(torch.ones(sum(w["lengths"]), dtype=torch.int64), w["lengths"]))
            assert torch.equal(store.read_tokens("r", i, layer), w["acts"][layer])
        batch = store.get_run_batch("r", i)
        assert torch.equal(batch.extra["input_ids"], _padded(w["ids"], w["lengths"], fill=PAD))
        assert torch.equal(store.load_batch_extra("r", i)["input_ids"], batch.extra["input_ids"])
        assert store.batch_text_indices("r", i) == w["text_ids"]


def test_batches_touch_only_their_own_files(store, monkeypatch):
    """Completion is one marker per batch: meta.json is written when the run starts and when it ends, never per
    batch, and no file of another batch is rewritten."""
    puts = []
    real = LocalStore.put_bytes
    monkeypatch.setattr(LocalStore, "put_bytes", lambda self, key, data: (puts.append(key), real(self, key, data)))
    real_tensors = LocalStore.put_tensors
    monkeypatch.setattr(LocalStore, "put_tensors",
                        lambda self, key, t, metadata=None: (puts.append(key), real_tensors(self, key, t, metadata)))
    _write(store, n_batches=4)
    meta_writes = [k for k in puts if k.endswith("meta.json")]
    assert len(meta_writes) == 2  # create + finish
    per_batch = [k for k in puts if "/batch_" in k]
    assert len(per_batch) == 4 * (len(LAYERS) + 2)  # layer files, tokens, marker
    for i in range(4):
        assert sum(f"/batch_{i}/" in k for k in per_batch) == len(LAYERS) + 2


def test_crash_recovery_ignores_unmarked_batches_and_resume_rewrites(store):
    written = _write(store, n_batches=3, finish=False)
    # batch 3 was in flight: its layer file is there, its marker is not
    store.put_tensors("activations/r/batch_3/model.layers.1/activations.safetensors", {"activations": torch.ones(2, 4)})
    assert store.list_batches("r") == [0, 1, 2]
    reader = store.activation_reader("r", "model.layers.2", 1, shuffle=False, drop_last=False, buffer_tokens=3)
    got = torch.cat(list(reader))
    assert torch.equal(got, torch.cat([written[i]["acts"]["model.layers.2"] for i in range(3)]))
    # a resumed writer restarts the run (same dtype), rewrites batch 3 and finishes
    store.create_packed_run("r", {"model_id": "m"}, LAYERS, torch.float32)
    acts = {layer: torch.zeros(1, d) for layer, d in LAYERS.items()}
    store.write_packed_batch("r", 3, acts, torch.tensor([0, 1]), torch.tensor([5]))
    store.finish_packed_run("r")
    assert store.list_batches("r") == [0, 1, 2, 3] and store.read_run_meta("r")["status"] == "complete"
    assert torch.equal(store.load_batch("r", 3, "model.layers.1").activations, torch.zeros(1, 1, 4))


def test_markers_disagreeing_with_files_are_clear_errors(store):
    _write(store, n_batches=3, finish=False)
    marker = store.path("activations/r/batch_1/complete.json")
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "n_tokens": record["n_tokens"] + 1}))
    layer_file = store.path("activations/r/batch_1/model.layers.1/activations.safetensors")
    with pytest.raises(CorruptStoreFileError, match=re.escape(str(layer_file)) + r".* real tokens, its completion "
                                                     r"marker says"):
        store.load_batch("r", 1, "model.layers.1")
    with pytest.raises(CorruptStoreFileError, match="real tokens, its completion marker says"):
        list(store.activation_reader("r", "model.layers.1", 2, shuffle=False, buffer_tokens=100))
    marker.write_text(json.dumps(record))
    layer_file.unlink()
    with pytest.raises(CorruptStoreFileError, match=r"recorded complete but .*batch_1.*is missing"):
        store.load_batch("r", 1, "model.layers.1")
    # a marker copied into another batch's folder
    store.path("activations/r/batch_2/complete.json").write_text(json.dumps(record))
    with pytest.raises(CorruptStoreFileError, match=r"marker of batch 1 but lies in the folder of batch 2"):
        store.read_run_meta("r")
    store.path("activations/r/batch_0/complete.json").write_text("{\"batch_index\": 0}")
    with pytest.raises(CorruptStoreFileError, match=r"batch_0.complete.json is not a valid batch completion record"):
        store.list_batches("r")


def test_finished_run_without_index_is_reported(store):
    _write(store, n_batches=2)
    store.delete("activations/r/index.json")
    with pytest.raises(CorruptStoreFileError, match=r"says the run is complete but .*index.json is missing"):
        store.read_run_meta("r")


def test_dtype_and_format_mixing_refused(store):
    _write(store, n_batches=1, dtype=torch.bfloat16)
    assert store.read_run_meta("r")["layer_dtypes"]["model.layers.1"] == "bfloat16"
    with pytest.raises(ValueError, match=r"run 'r' is stored in dtype bfloat16, this save asks for float16"):
        store.create_packed_run("r", {}, LAYERS, torch.float16)
    acts = {layer: torch.zeros(1, d) for layer, d in LAYERS.items()}
    with pytest.raises(ValueError, match=r"has dtype float32 but run 'r' is stored in bfloat16"):
        store.write_packed_batch("r", 1, acts, torch.tensor([0, 1]), torch.tensor([5]))
    with pytest.raises(ValueError, match=r"packed \(format 2\) run: write its batches with write_packed_batch"):
        store.write_activation_batch("r", 1, {"model.layers.1": torch.zeros(1, 1, 4)}, torch.ones(1, 1, dtype=torch.long))
    store.write_activation_batch("old", 0, {"model.layers.1": torch.zeros(1, 2, 4)}, torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"run 'old' exists as a format-1 \(padded\) run"):
        store.create_packed_run("old", {}, LAYERS, torch.float32)
    with pytest.raises(ValueError, match=r"dtype must be a storage dtype"):
        store.create_packed_run("x", {}, LAYERS, torch.float64)
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing from 0"):
        store.write_packed_batch("r", 1, acts, torch.tensor([1, 1]), torch.tensor([5]))


def test_bytes_on_disk_are_tokens_times_d_times_dtype(store):
    written = _write(store, n_batches=3, dtype=torch.bfloat16)
    for i, w in written.items():
        for layer, d in LAYERS.items():
            size = store.path(f"activations/r/batch_{i}/{layer}/activations.safetensors").stat().st_size
            payload = sum(w["lengths"]) * d * 2
            assert payload < size <= payload + 512  # the header only


def test_reader_over_packed_run_and_byte_sized_buffer(store):
    written = _write(store, n_batches=6)
    all_tokens = torch.cat([w["acts"]["model.layers.1"] for w in written.values()])
    row = 4 * 4  # d=4 float32
    reader = store.activation_reader("r", "model.layers.1", 3, buffer_bytes=10 * row, prefetch=False, seed=2,
                                     drop_last=False)
    assert reader.buffer_tokens == 10
    got = torch.cat(list(reader))
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, all_tokens.tolist()))
    assert reader.peak_buffered_tokens <= max(10, 3 - 1 + max(sum(w["lengths"]) for w in written.values()))
    # with read-ahead the two groups share the bytes
    assert store.activation_reader("r", "model.layers.1", 3, buffer_bytes=10 * row).buffer_tokens == 5
    # the default: 1 GiB
    assert store.activation_reader("r", "model.layers.1", 3, prefetch=False).buffer_tokens == (1 << 30) // row
    with pytest.raises(ValueError, match=r"buffer_bytes=40 holds 2 token vectors of d=4 in float32 \(16 bytes each\)"
                                         r", fewer than one batch of batch_size=3"):
        store.activation_reader("r", "model.layers.1", 3, buffer_bytes=40, prefetch=False)
    with pytest.raises(ValueError, match=r"halved: the read-ahead buffer"):
        store.activation_reader("r", "model.layers.1", 3, buffer_bytes=80)
    with pytest.raises(ValueError, match=r"buffer_tokens or buffer_bytes, not both"):
        store.activation_reader("r", "model.layers.1", 3, buffer_bytes=800, buffer_tokens=10)


def test_reader_gives_the_same_stream_from_format_1_and_format_2(store):
    written = _write(store, n_batches=6)
    for i, w in written.items():  # the same content written in format 1
        acts = {layer: _padded(w["acts"][layer], w["lengths"]) for layer in LAYERS}
        mask = _padded(torch.ones(sum(w["lengths"]), dtype=torch.int64), w["lengths"])
        store.write_activation_batch("v1", i, acts, mask)
    kwargs = dict(buffer_tokens=7, seed=3, epochs=2, drop_last=False)
    a = list(store.activation_reader("r", "model.layers.2", 4, **kwargs))
    b = list(store.activation_reader("v1", "model.layers.2", 4, **kwargs))
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_shuffle_buffer_pops_every_vector_once():
    d, bs = 3, 4
    buf = ShuffleBuffer(d, bs, buffer_bytes=10 * d * 4, seed=1)
    assert buf.capacity == 10
    pushed = torch.arange(57 * d, dtype=torch.float32).reshape(57, d)
    popped, left = [], pushed
    while left.shape[0]:
        left = left[buf.push(left):]
        assert buf.size <= buf.capacity
        while buf.full:
            popped.append(buf.pop())
            assert popped[-1].shape == (bs, d)
    while (batch := buf.pop(drain=True)) is not None:
        popped.append(batch)
    out = torch.cat(popped)
    assert sorted(out[:, 0].tolist()) == pushed[:, 0].tolist()
    assert torch.equal(out[:, 1], out[:, 0] + 1)  # rows stay whole
    assert out[:, 0].tolist() != pushed[:, 0].tolist()  # mixed
    again = ShuffleBuffer(d, bs, buffer_bytes=10 * d * 4, seed=1)
    again.push(pushed[:10])
    first = ShuffleBuffer(d, bs, buffer_bytes=10 * d * 4, seed=1)
    first.push(pushed[:10])
    assert torch.equal(again.pop(), first.pop())  # seeded
    with pytest.raises(ValueError, match=r"buffer_bytes=24 holds 1 token vectors of d=3 in float32.*one half is "
                                         r"served while the other fills.*batch_size=4"):
        ShuffleBuffer(d, bs, buffer_bytes=24)
    with pytest.raises(ValueError, match=r"vectors must have shape \[n, 3\], got \[2, 4\]"):
        buf.push(torch.zeros(2, 4))


def _feed(buf, pushed):
    """Push ``pushed`` through ``buf`` as the module docstring's loop does; the popped batches, each with the
    buffer's position after it."""
    out, left = [], pushed
    while left.shape[0]:
        left = left[buf.push(left):]
        while buf.full and (batch := buf.pop()) is not None:  # None: a replayed block's batches were all taken
            out.append((batch, buf.position()))
    while (batch := buf.pop(drain=True)) is not None:
        out.append((batch, buf.position()))
    return out


def test_shuffle_buffer_blocks_and_exact_replay_from_a_position():
    d, bs = 2, 4
    pushed = torch.arange(61 * d, dtype=torch.float32).reshape(61, d)
    full = _feed(ShuffleBuffer(d, bs, buffer_bytes=2 * 11 * d * 4, seed=7), pushed)
    batches = [b for b, _ in full]
    assert sum(b.shape[0] for b in batches) == 61 and sorted(torch.cat(batches)[:, 0].tolist()) == pushed[:, 0].tolist()
    # Blocks: each half (11 rows, the carried ones included) is one permutation; a block's batches hold only rows
    # pushed into it or carried into it (never rows pushed after it was sealed).
    assert full[0][1]["block"] == 0 and full[-2][1]["block"] > 2
    # Replay from the position after each batch: resume_at, then push the stream again from the position's row.
    for cut in range(len(full)):
        pos = full[cut][1]
        again = ShuffleBuffer(d, bs, buffer_bytes=2 * 11 * d * 4, seed=7)
        again.resume_at(pos)
        rest = [b for b, _ in _feed(again, pushed[pos["row"]:])]
        assert len(rest) == len(batches) - cut - 1
        assert all(torch.equal(a, b) for a, b in zip(rest, batches[cut + 1:]))
    # Several layers: one permutation for all (a row of "b" stays with its row of "a"); a seal before the half is full.
    two = ShuffleBuffer({"a": d, "b": 1}, bs, buffer_bytes=1 << 12, seed=1)
    rows = {"a": pushed, "b": pushed[:, :1] * 10}
    assert two.push(rows) == 61
    two.seal()
    out = [two.pop(drain=True) for _ in range(17)]  # 15 batches, the last row, then nothing
    assert out[-1] is None and all(torch.equal(o["b"], o["a"][:, :1] * 10) for o in out[:-1])
    with pytest.raises(ValueError, match=r"vectors must be a dict with the layers \['a', 'b'\]"):
        two.push({"a": pushed})
