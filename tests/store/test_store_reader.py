"""ActivationReader: every real token once per epoch, no padding, mixing across files, bounded buffer, exact resume."""

from __future__ import annotations

import io
import itertools
import re
from collections import Counter

import pytest
import torch

from mi_crow.store import ActivationReader, CorruptStoreFileError, LocalStore

LAYER = "model.layers.1"
D = 4
PAD_ID = -1.0


def _write_run(store: LocalStore, n_files: int = 7, b: int = 3, seq: int = 8, seed: int = 0) -> dict[int, int]:
    """Write a run whose token vectors carry a unique id in column 0 (padding gets PAD_ID).

    Returns token id -> batch file index, the independent record of what was written.
    """
    g = torch.Generator().manual_seed(seed)
    origin: dict[int, int] = {}
    next_id = 0
    for f in range(n_files):
        lengths = torch.randint(1, seq + 1, (b,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        acts = torch.randn(b, seq, D, generator=g)
        acts[..., 0] = PAD_ID
        for row in range(b):
            for pos in range(int(lengths[row])):
                acts[row, pos, 0] = next_id
                origin[next_id] = f
                next_id += 1
        store.write_activation_batch("run", f, {LAYER: acts}, mask)
    return origin


@pytest.fixture
def run(tmp_path):
    store = LocalStore(tmp_path / "store", fsync=False)
    origin = _write_run(store)
    return store, origin


def _ids(batches: list[torch.Tensor]) -> list[int]:
    return [int(v) for b in batches for v in b[:, 0].tolist()]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("buffer_tokens", [5, 16, 10_000])
def test_every_real_token_once_no_padding(run, shuffle, buffer_tokens):
    store, origin = run
    reader = store.activation_reader("run", LAYER, 6, shuffle=shuffle, buffer_tokens=buffer_tokens, drop_last=False)
    batches = list(reader)
    ids = _ids(batches)
    assert Counter(ids) == Counter(origin.keys())  # each real token exactly once, padding never
    assert reader.n_tokens == len(origin) and reader.d_in == D
    assert all(b.shape == (6, D) for b in batches[:-1]) and 0 < batches[-1].shape[0] <= 6
    assert len(batches) == len(reader) == -(-len(origin) // 6)
    # The whole vector, not only the id, is what was written.
    written = {}
    for f in store.list_batches("run"):
        acts, mask = store.load_batch("run", f, LAYER)
        for v in acts[mask.bool()]:
            written[int(v[0])] = v
    for b in batches:
        for v in b:
            assert torch.equal(v, written[int(v[0])])


def test_drop_last_yields_only_full_batches_without_duplicates(run):
    store, origin = run
    reader = store.activation_reader("run", LAYER, 8, drop_last=True, buffer_tokens=20)
    batches = list(reader)
    ids = _ids(batches)
    assert len(batches) == len(origin) // 8 == len(reader)
    assert all(b.shape == (8, D) for b in batches)
    assert len(set(ids)) == len(ids) and set(ids) <= set(origin)


def test_unshuffled_order_is_storage_order(run):
    store, origin = run
    ids = _ids(list(store.activation_reader("run", LAYER, 5, shuffle=False, drop_last=False, buffer_tokens=7)))
    assert ids == sorted(origin)


def test_shuffle_mixes_across_files_and_depends_on_seed_and_epoch(run):
    store, origin = run
    reader = store.activation_reader("run", LAYER, 8, seed=1, epochs=2, buffer_tokens=10_000)
    batches = list(reader)
    per_epoch = len(batches) // 2
    first, second = _ids(batches[:per_epoch]), _ids(batches[per_epoch:])
    assert len({origin[i] for i in _ids(batches[:1])}) >= 3  # one batch draws from several files
    assert first != sorted(first)
    assert first != second  # a new permutation each epoch
    again = _ids(list(store.activation_reader("run", LAYER, 8, seed=1, epochs=2, buffer_tokens=10_000)))
    other = _ids(list(store.activation_reader("run", LAYER, 8, seed=2, epochs=2, buffer_tokens=10_000)))
    assert again == first + second and other != first + second


def test_small_buffer_still_mixes_files_in_a_group(run):
    store, origin = run
    reader = store.activation_reader("run", LAYER, 4, seed=0, buffer_tokens=40)
    files_per_batch = [len({origin[i] for i in b[:, 0].int().tolist()}) for b in reader]
    assert max(files_per_batch) >= 2


def test_buffer_bound_respected(tmp_path):
    store = LocalStore(tmp_path, fsync=False)
    origin = _write_run(store, n_files=40, b=2, seq=5)  # files of at most 10 tokens
    max_file = max(store.read_run_meta("run")["batch_tokens"].values())
    loads = []
    real_load = store.read_tokens

    def counting_load(run_id, index, layer, *args):
        loads.append(index)
        return real_load(run_id, index, layer, *args)

    store.read_tokens = counting_load  # type: ignore[method-assign]
    buffer_tokens = 24
    reader = store.activation_reader("run", LAYER, 4, buffer_tokens=buffer_tokens, drop_last=False, prefetch=False)
    it = iter(reader)
    next(it)
    # Before the first batch only as many files were read as fit the buffer: the run is never loaded whole.
    tokens_loaded = sum(store.read_run_meta("run")["batch_tokens"][str(i)] for i in loads)
    assert tokens_loaded <= buffer_tokens and len(loads) < 40
    rest = list(it)
    assert reader.peak_buffered_tokens <= max(buffer_tokens, 4 - 1 + max_file)
    assert reader.peak_buffered_tokens < len(origin) / 4
    assert sorted(loads) == list(range(40))  # each file read once per epoch
    assert 1 + len(rest) == len(reader)


def test_buffer_smaller_than_a_file(run):
    store, origin = run
    reader = store.activation_reader("run", LAYER, 3, buffer_tokens=1, drop_last=False)
    assert Counter(_ids(list(reader))) == Counter(origin.keys())
    max_file = max(store.read_run_meta("run")["batch_tokens"].values())
    assert reader.peak_buffered_tokens <= 3 - 1 + max_file


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("buffer_tokens", [12, 10_000])
def test_exact_resume(run, drop_last, buffer_tokens, prefetch):
    store, _ = run
    kwargs = dict(shuffle=True, buffer_tokens=buffer_tokens, seed=7, drop_last=drop_last, epochs=2, prefetch=prefetch)
    full = list(store.activation_reader("run", LAYER, 5, **kwargs))
    for n in range(0, len(full) + 1):
        reader = store.activation_reader("run", LAYER, 5, **kwargs)
        taken = list(itertools.islice(iter(reader), n))
        state = reader.state_dict()
        assert reader.batches_yielded == n
        buf = io.BytesIO()
        torch.save(state, buf)  # a trainer checkpoint goes through torch.save / torch.load(weights_only=True)
        buf.seek(0)
        restored = store.activation_reader("run", LAYER, 5, **kwargs)
        restored.load_state_dict(torch.load(buf, weights_only=True))
        rest = list(restored)
        assert len(taken) + len(rest) == len(full)
        for got, want in zip(taken + rest, full):
            assert torch.equal(got, want)


def test_resume_continues_in_same_reader_object(run):
    store, _ = run
    full = list(store.activation_reader("run", LAYER, 5, epochs=2, buffer_tokens=12))
    reader = store.activation_reader("run", LAYER, 5, epochs=2, buffer_tokens=12)
    head = list(itertools.islice(iter(reader), 4))
    tail = list(reader)  # a fresh iter() continues from the current position
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full)) and len(head + tail) == len(full)
    assert list(reader) == []
    reader.reset()
    assert all(torch.equal(a, b) for a, b in zip(list(reader), full))


def test_endless_stream(run):
    store, origin = run
    reader = store.activation_reader("run", LAYER, 5, epochs=None, drop_last=True, buffer_tokens=16)
    per_epoch = reader.batches_per_epoch
    batches = list(itertools.islice(iter(reader), 3 * per_epoch + 1))
    for e in range(3):
        ids = _ids(batches[e * per_epoch: (e + 1) * per_epoch])
        assert len(set(ids)) == len(ids) == per_epoch * 5
    assert reader.epoch == 3
    with pytest.raises(TypeError, match="endless"):
        len(reader)


def test_dtype_conversion(run):
    store, origin = run
    full = list(store.activation_reader("run", LAYER, 5, shuffle=False, drop_last=False))
    half = list(store.activation_reader("run", LAYER, 5, shuffle=False, drop_last=False, dtype=torch.bfloat16))
    assert all(h.dtype == torch.bfloat16 and torch.equal(h, f.to(torch.bfloat16)) for h, f in zip(half, full))


def test_corrupt_file_during_reading_names_path(run):
    store, _ = run
    path = store.path(f"activations/run/batch_3/{LAYER}/activations.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptStoreFileError, match=re.escape(str(path))):
        list(store.activation_reader("run", LAYER, 5, shuffle=False))


def test_file_disagreeing_with_meta_is_reported(run):
    store, _ = run
    acts, mask = store.load_batch("run", 2, LAYER)
    mask = torch.zeros_like(mask)
    mask[:, 0] = 1
    store.put_tensors(f"activations/run/batch_2/{LAYER}/activations.safetensors",
                      {"activations": acts, "attention_mask": mask})
    with pytest.raises(CorruptStoreFileError, match=r"batch_2.*real tokens, meta.json says"):
        list(store.activation_reader("run", LAYER, 5, shuffle=False))


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        (dict(batch_size=0), ValueError, "batch_size must be > 0, got 0"),
        (dict(batch_size=-3), ValueError, "batch_size must be > 0, got -3"),
        (dict(batch_size="8"), TypeError, "batch_size must be an int"),
        (dict(batch_size=10**6), ValueError, "batch_size 1000000 exceeds the"),
        (dict(buffer_tokens=0), ValueError, "buffer_tokens must be > 0, got 0"),
        (dict(epochs=0), ValueError, "epochs must be > 0, got 0"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(dtype="float16"), TypeError, "dtype must be a torch.dtype"),
        (dict(dtype=torch.int32), ValueError, "dtype must be a floating-point dtype"),
        (dict(layer="model.layers.7"), ValueError, r"layer 'model.layers.7' is not stored.*model.layers.1"),
        (dict(run_id="missing"), FileNotFoundError, "missing"),
    ],
)
def test_bad_arguments(run, kwargs, exc, pattern):
    store, _ = run
    args = dict(run_id="run", layer=LAYER, batch_size=4) | kwargs
    with pytest.raises(exc, match=pattern):
        store.activation_reader(args.pop("run_id"), args.pop("layer"), args.pop("batch_size"), **args)


def test_state_from_different_reader_refused(run):
    store, _ = run
    state = store.activation_reader("run", LAYER, 5, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1.*seed=2"):
        store.activation_reader("run", LAYER, 5, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size=5.*batch_size=6"):
        store.activation_reader("run", LAYER, 6, seed=1).load_state_dict(state)
    store.write_activation_batch("run", 99, {LAYER: torch.ones(1, 2, D)}, torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"complete batches of run 'run' changed .*\(7 batches then, 8 now\)"):
        store.activation_reader("run", LAYER, 5, seed=1).load_state_dict(state)
    with pytest.raises(TypeError, match="state must be a dict"):
        store.activation_reader("run", LAYER, 5, seed=1).load_state_dict([1])  # type: ignore[arg-type]


def test_reader_class_is_public_and_direct_construction_works(run):
    store, origin = run
    reader = ActivationReader(store, "run", LAYER, 7, drop_last=False)
    assert sum(b.shape[0] for b in reader) == len(origin)


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("buffer_tokens", [9, 30, 10_000])
def test_prefetch_yields_identical_batches(run, drop_last, buffer_tokens):
    store, _ = run
    kwargs = dict(buffer_tokens=buffer_tokens, seed=3, drop_last=drop_last, epochs=3)
    plain = list(store.activation_reader("run", LAYER, 5, **kwargs))
    fetched = list(store.activation_reader("run", LAYER, 5, prefetch=True, **kwargs))
    assert len(plain) == len(fetched) and all(torch.equal(a, b) for a, b in zip(plain, fetched))


def test_prefetch_resume_and_early_stop(run):
    import threading

    store, _ = run
    kwargs = dict(buffer_tokens=12, seed=5, epochs=2, prefetch=True)
    full = list(store.activation_reader("run", LAYER, 5, **kwargs))
    baseline_threads = threading.active_count()
    reader = store.activation_reader("run", LAYER, 5, **kwargs)
    it = iter(reader)
    head = [next(it) for _ in range(7)]
    state = reader.state_dict()
    it.close()  # stopping early shuts the background loader down
    assert threading.active_count() == baseline_threads
    restored = store.activation_reader("run", LAYER, 5, **kwargs)
    restored.load_state_dict(state)
    tail = list(restored)
    assert len(head) + len(tail) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full))


def test_prefetch_error_in_background_reaches_caller(run):
    store, _ = run
    path = store.path(f"activations/run/batch_5/{LAYER}/activations.safetensors")
    path.write_bytes(path.read_bytes()[:64])
    with pytest.raises(CorruptStoreFileError, match=re.escape(str(path))):
        list(store.activation_reader("run", LAYER, 2, shuffle=False, buffer_tokens=8, prefetch=True))
