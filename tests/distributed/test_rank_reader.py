"""Per-rank reading of a stored run (data-parallel): ``ActivationReader.split(rank, world)`` loads only that rank's
files, and the ranks' batches together are exactly the unsplit reader's batches (same tokens, positions given by
``last_batch_positions``), through shuffle groups with carried tokens, resumes and several epochs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mi_crow.store import LocalStore


def _write(path, n_files: int = 9, d: int = 6) -> LocalStore:
    store = LocalStore(path, fsync=False)
    store.write_run_meta("acts", {"model_id": "test"})
    g = torch.Generator().manual_seed(0)
    for i in range(n_files):
        seq = 3 + (i * 5) % 7  # files of different sizes, with padding
        acts = torch.randn(2, seq, d, generator=g)
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[1, seq - 1 - i % 3 :] = 0
        store.write_activation_batch("acts", i, {"h": acts}, mask)
    return store


class _Counting:
    """The store, counting ``read_tokens`` per batch file."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self.reads: Counter[int] = Counter()

    def read_tokens(self, run_id, batch_index, layer, *args, **kwargs):
        self.reads[batch_index] += 1
        return self.store.read_tokens(run_id, batch_index, layer, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.store, name)


def _reader(store, **kw):
    from mi_crow.store.reader import ActivationReader

    args = dict(batch_size=8, buffer_tokens=20, seed=5, epochs=2)
    args.update(kw)
    return ActivationReader(store, "acts", "h", **args)


def _split_batches(store, world: int, **kw) -> tuple[list[list[tuple[torch.Tensor, torch.Tensor, int]]], list]:
    out, counters = [], []
    for rank in range(world):
        counting = _Counting(store)
        reader = _reader(counting, **kw)
        reader.split(rank, world)
        out.append([(b, reader.last_batch_positions.clone(), reader.last_batch_size) for b in reader])
        counters.append(counting.reads)
    return out, counters


def _assemble(parts: list[tuple[torch.Tensor, torch.Tensor, int]]) -> torch.Tensor:
    size = parts[0][2]
    assert all(p[2] == size for p in parts)
    full = torch.full((size, parts[0][0].shape[1]), float("nan"))
    for rows, positions, _ in parts:
        assert torch.isnan(full[positions]).all()  # no position given twice
        full[positions] = rows
    return full


@pytest.mark.parametrize("kw", [dict(), dict(shuffle=False), dict(prefetch=False), dict(drop_last=False),
                                dict(buffer_tokens=1000)])
@pytest.mark.parametrize("world", [2, 3])
def test_split_batches_make_up_the_unsplit_batches(tmp_path, kw, world):
    store = _write(tmp_path)
    want = list(_reader(store, **kw))
    got, counters = _split_batches(store, world, **kw)
    assert all(len(g) == len(want) for g in got)
    for j, batch in enumerate(want):
        torch.testing.assert_close(_assemble([g[j] for g in got]), batch, rtol=0, atol=0)
    # Each rank reads only its own files: together the ranks read each file as often as one unsplit reader does
    # (once per epoch), so no file is read by two ranks in an epoch.
    total: Counter = Counter()
    for reads in counters:
        total.update(reads)
    unsplit = _Counting(store)
    list(_reader(unsplit, **kw))
    assert total == unsplit.reads


def test_split_reads_a_disjoint_share_of_the_files(tmp_path):
    store = _write(tmp_path)
    got, counters = _split_batches(store, 2, epochs=1, buffer_tokens=1000)
    assert set(counters[0]).isdisjoint(counters[1])
    assert set(counters[0]) | set(counters[1]) == set(range(9))
    # The division is by tokens: with the run in one shuffle group neither rank holds much more than half of it.
    rows = [sum(b.shape[0] for b, _, _ in g) for g in got]
    assert abs(rows[0] - rows[1]) <= 0.25 * sum(rows)


def test_split_reader_resumes_from_its_state(tmp_path):
    store = _write(tmp_path)
    for rank in range(2):
        reader = _reader(store)
        reader.split(rank, 2)
        full = [b.clone() for b in reader]
        first = _reader(store)
        first.split(rank, 2)
        it = iter(first)
        for _ in range(5):
            next(it)
        state = first.state_dict()
        again = _reader(store)
        again.split(rank, 2)
        again.load_state_dict(state)
        rest = list(again)
        assert len(rest) == len(full) - 5
        for a, b in zip(rest, full[5:]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_split_state_is_refused_by_an_unsplit_reader_and_split_checks_its_arguments(tmp_path):
    store = _write(tmp_path)
    reader = _reader(store)
    reader.split(1, 2)
    state = reader.state_dict()
    with pytest.raises(ValueError, match="part"):
        _reader(store).load_state_dict(state)
    with pytest.raises(ValueError, match="rank"):
        _reader(store).split(2, 2)
    used = _reader(store)
    next(iter(used))
    with pytest.raises(ValueError, match="before reading"):
        used.split(0, 2)
