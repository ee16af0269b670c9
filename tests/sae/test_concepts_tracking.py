"""Top-text tracking on synthetic sparse codes, checked against a brute-force reference in plain Python."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch

from mi_crow.hooks import BatchContext
from mi_crow.mechanistic.sae.concepts import AutoencoderConcepts, TopTextTracker

PAD_ID = 0
BOS_ID = 1


class FakeTokenizer:
    def convert_ids_to_tokens(self, ids):
        return [f"tok{i}" for i in ids]


def make_corpus(n_texts: int, n_latents: int, k: int, seed: int, min_len: int = 2, max_len: int = 9):
    """Per-text codes as a model would give them, position 0 being a BOS special token."""
    g = torch.Generator().manual_seed(seed)
    corpus = []
    for t in range(n_texts):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        values = torch.rand(length, k, generator=g) * 5
        values[torch.rand(length, k, generator=g) < 0.25] = 0.0  # ReLU zeros inside the top-k
        indices = torch.rand(length, n_latents, generator=g).topk(k, dim=1).indices
        ids = torch.randint(2, 500, (length,), generator=g)
        ids[0] = BOS_ID
        corpus.append({"text": f"text number {t} seed {seed}", "values": values, "indices": indices, "ids": ids})
    return corpus


def reference_top_texts(corpus, n_latents: int, top_k: int):
    """neuron -> [(text, activation, position, token_id)] strongest first, in plain Python."""
    best: dict[int, dict[str, tuple[float, int, int]]] = {n: {} for n in range(n_latents)}
    for item in corpus:
        vals = item["values"].tolist()
        idxs = item["indices"].tolist()
        ids = item["ids"].tolist()
        for pos in range(1, len(vals)):  # position 0 is BOS: special, never counts
            for v, j in zip(vals[pos], idxs[pos]):
                if v <= 0:
                    continue
                cur = best[j].get(item["text"])
                if cur is None or v > cur[0]:
                    best[j][item["text"]] = (v, pos, ids[pos])
    out = {}
    for n in range(n_latents):
        entries = sorted(((v, text, p, tok) for text, (v, p, tok) in best[n].items()), key=lambda e: -e[0])
        out[n] = [(text, v, p, tok) for v, text, p, tok in entries[:top_k]]
    return out


def reference_stats(corpus, n_latents: int):
    count = [0] * n_latents
    total = [0.0] * n_latents
    peak = [0.0] * n_latents
    seen = 0
    for item in corpus:
        vals = item["values"].tolist()
        idxs = item["indices"].tolist()
        for pos in range(1, len(vals)):
            seen += 1
            for v, j in zip(vals[pos], idxs[pos]):
                if v > 0:
                    count[j] += 1
                    total[j] += v
                    peak[j] = max(peak[j], v)
    return seen, count, total, peak


def make_batch(items, side: str, n_latents: int, k: int, garbage_seed: int = 123):
    """Pad a list of per-text codes into [b, seq, k]; padding positions get large junk codes that must be ignored."""
    g = torch.Generator().manual_seed(garbage_seed)
    b = len(items)
    s = max(len(it["ids"]) for it in items)
    values = torch.rand(b, s, k, generator=g) * 100 + 50
    indices = torch.rand(b, s, n_latents, generator=g).topk(k, dim=2).indices
    input_ids = torch.full((b, s), PAD_ID, dtype=torch.int64)
    attention = torch.zeros(b, s, dtype=torch.int64)
    for r, it in enumerate(items):
        length = len(it["ids"])
        sl = slice(0, length) if side == "right" else slice(s - length, s)
        values[r, sl] = it["values"]
        indices[r, sl] = it["indices"]
        input_ids[r, sl] = it["ids"]
        attention[r, sl] = 1
    special = (input_ids == PAD_ID) | (input_ids == BOS_ID)
    # Special (BOS) positions also get junk: they must not count either.
    values[input_ids == BOS_ID] = 1000.0
    context = BatchContext(
        texts=[it["text"] for it in items],
        input_ids=input_ids,
        attention_mask=attention,
        special_tokens_mask=special,
        tokenizer=FakeTokenizer(),
    )
    return values, indices, context


def run_tracking(corpus, n_latents, k, top_k, batch_size, side):
    concepts = AutoencoderConcepts(SimpleNamespace(n_latents=n_latents))
    concepts.enable_text_tracking(top_k=top_k)
    for start in range(0, len(corpus), batch_size):
        values, indices, context = make_batch(corpus[start:start + batch_size], side, n_latents, k, start)
        concepts.observe(values, indices, context)
    return concepts


def as_tuples(records):
    return [(r.text, r.activation, r.token_position, r.token_id) for r in records]


def assert_matches_reference(concepts, reference, n_latents):
    tops = concepts.get_top_texts()
    assert len(tops) == n_latents
    for n in range(n_latents):
        got = as_tuples(tops[n])
        want = reference[n]
        assert [g[0] for g in got] == [w[0] for w in want], f"neuron {n}"
        assert [g[2:] for g in got] == [w[2:] for w in want], f"neuron {n}"
        torch.testing.assert_close(torch.tensor([g[1] for g in got]), torch.tensor([w[1] for w in want]))


N_LATENTS, K, TOP_K = 24, 4, 3


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(20, N_LATENTS, K, seed=0)


@pytest.mark.parametrize("batch_size,side", [(1, "right"), (3, "right"), (4, "left"), (7, "left"), (20, "right")])
def test_tracking_matches_bruteforce_reference(corpus, batch_size, side):
    concepts = run_tracking(corpus, N_LATENTS, K, TOP_K, batch_size, side)
    assert_matches_reference(concepts, reference_top_texts(corpus, N_LATENTS, TOP_K), N_LATENTS)


def test_token_strings_come_from_the_context_tokenizer(corpus):
    concepts = run_tracking(corpus, N_LATENTS, K, TOP_K, 5, "left")
    records = [r for recs in concepts.get_top_texts() for r in recs]
    assert records
    assert all(r.token == f"tok{r.token_id}" for r in records)
    texts = {it["text"]: it for it in corpus}
    for r in records:
        assert int(texts[r.text]["ids"][r.token_position]) == r.token_id


def test_statistics_match_reference(corpus):
    concepts = run_tracking(corpus, N_LATENTS, K, TOP_K, 6, "left")
    seen, count, total, peak = reference_stats(corpus, N_LATENTS)
    stats = concepts.neuron_stats()
    assert stats.tokens_seen == seen
    assert stats.firing_count.tolist() == count
    want_mean = torch.tensor([t / c if c else 0.0 for t, c in zip(total, count)], dtype=torch.float64)
    torch.testing.assert_close(stats.mean_activation, want_mean)
    torch.testing.assert_close(stats.max_activation, torch.tensor(peak, dtype=torch.float32))
    torch.testing.assert_close(stats.firing_rate, torch.tensor(count, dtype=torch.float64) / seen)


def test_padding_and_special_tokens_never_count(corpus):
    concepts = run_tracking(corpus, N_LATENTS, K, TOP_K, 4, "left")
    records = [r for recs in concepts.get_top_texts() for r in recs]
    # The junk written at padding (>= 50) and BOS (1000) positions is far above any real value (< 5).
    assert max(r.activation for r in records) < 5.0
    assert all(r.token_position >= 1 and r.token_id not in (PAD_ID, BOS_ID) for r in records)
    assert float(concepts.neuron_stats().max_activation.max()) < 5.0


def test_seeing_the_same_texts_again_keeps_one_entry_per_text(corpus):
    once = run_tracking(corpus, N_LATENTS, K, TOP_K, 5, "right")
    twice = AutoencoderConcepts(SimpleNamespace(n_latents=N_LATENTS))
    twice.enable_text_tracking(top_k=TOP_K)
    # A second pass with a different batching, and a batch that contains the same text twice.
    for start in range(0, len(corpus), 5):
        twice.observe(*make_batch(corpus[start:start + 5], "right", N_LATENTS, K, start))
    for start in range(0, len(corpus), 3):
        chunk = corpus[start:start + 3]
        twice.observe(*make_batch(chunk + chunk[:1], "left", N_LATENTS, K, start))
    assert [as_tuples(r) for r in twice.get_top_texts()] == [as_tuples(r) for r in once.get_top_texts()]
    for recs in twice.get_top_texts():
        assert len({r.text for r in recs}) == len(recs)


def test_text_table_stays_bounded_and_results_stay_exact():
    n_latents, k, top_k = 6, 2, 2
    corpus = make_corpus(1500, n_latents, k, seed=7, min_len=2, max_len=3)
    concepts = AutoencoderConcepts(SimpleNamespace(n_latents=n_latents))
    concepts.enable_text_tracking(top_k=top_k)
    peak_stored = 0
    for start in range(0, len(corpus), 50):
        concepts.observe(*make_batch(corpus[start:start + 50], "right", n_latents, k, start))
        peak_stored = max(peak_stored, concepts._tracker.n_texts_stored)
    # Pruning keeps the table within max(1024, 2 * referenced) plus one batch of new texts.
    assert peak_stored <= 1024 + 50
    assert peak_stored < len(corpus)
    assert_matches_reference(concepts, reference_top_texts(corpus, n_latents, top_k), n_latents)


def test_top_texts_for_one_neuron_by_index_and_by_name(corpus):
    concepts = run_tracking(corpus, N_LATENTS, K, TOP_K, 5, "right")
    concepts.name_concept(5, "five")
    assert as_tuples(concepts.get_top_texts(5)) == as_tuples(concepts.get_top_texts()[5])
    assert as_tuples(concepts.get_top_texts("five")) == as_tuples(concepts.get_top_texts()[5])
    with pytest.raises(ValueError, match="neuron_idx_or_name"):
        concepts.get_top_texts(N_LATENTS)
    with pytest.raises(ValueError, match="unknown concept name 'nope'"):
        concepts.get_top_texts("nope")


def test_disable_keeps_results_and_reset_clears(corpus):
    concepts = run_tracking(corpus[:10], N_LATENTS, K, TOP_K, 5, "right")
    before = [as_tuples(r) for r in concepts.get_top_texts()]
    concepts.disable_text_tracking()
    assert not concepts.tracking_enabled
    concepts.observe(*make_batch(corpus[10:], "right", N_LATENTS, K))
    assert [as_tuples(r) for r in concepts.get_top_texts()] == before
    concepts.enable_text_tracking(top_k=TOP_K)  # same top_k: continues
    assert [as_tuples(r) for r in concepts.get_top_texts()] == before
    concepts.reset_tracking()
    assert concepts.tracking_enabled
    assert all(r == [] for r in concepts.get_top_texts())
    assert concepts.neuron_stats().tokens_seen == 0


def test_generation_steps_after_the_prompt_are_not_tracked(corpus):
    concepts = AutoencoderConcepts(SimpleNamespace(n_latents=N_LATENTS))
    concepts.enable_text_tracking(top_k=TOP_K)
    values, indices, context = make_batch(corpus[:4], "left", N_LATENTS, K)
    context.generation_step = 3
    concepts.observe(values, indices, context)
    assert all(r == [] for r in concepts.get_top_texts())


def test_exports_round_trip(corpus, tmp_path):
    concepts = run_tracking(corpus, N_LATENTS, K, TOP_K, 5, "right")
    concepts.name_concept(2, "two")
    tops = concepts.get_top_texts()
    stats = concepts.neuron_stats()

    data = json.loads(concepts.export_top_texts_json(tmp_path / "top.json").read_text(encoding="utf-8"))
    assert data["top_k"] == TOP_K and data["tokens_seen"] == stats.tokens_seen
    by_neuron = {row["neuron"]: row for row in data["neurons"]}
    assert set(by_neuron) == {n for n in range(N_LATENTS) if tops[n]}
    assert by_neuron[2]["name"] == "two"
    for n, row in by_neuron.items():
        assert [(t["text"], t["activation"], t["token_position"], t["token"]) for t in row["top_texts"]] == [
            (r.text, r.activation, r.token_position, r.token) for r in tops[n]
        ]
        assert row["firing_count"] == int(stats.firing_count[n])

    with open(concepts.export_top_texts_csv(tmp_path / "top.csv"), newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sum(len(t) for t in tops)
    for row in rows:
        rec = tops[int(row["neuron"])][int(row["rank"])]
        assert (row["text"], float(row["activation"]), int(row["token_position"]), row["token"]) == (
            rec.text, rec.activation, rec.token_position, rec.token
        )


def test_tracking_without_a_context_is_a_clear_error(corpus):
    concepts = AutoencoderConcepts(SimpleNamespace(n_latents=N_LATENTS))
    values, indices, _ = make_batch(corpus[:2], "right", N_LATENTS, K)
    concepts.observe(values, indices, None)  # tracking off: nothing to do, no error
    concepts.enable_text_tracking(top_k=2)
    with pytest.raises(RuntimeError, match="attach it to a LanguageModel"):
        concepts.observe(values, indices, None)


def test_results_before_tracking_is_enabled_are_an_error():
    concepts = AutoencoderConcepts(SimpleNamespace(n_latents=N_LATENTS))
    with pytest.raises(RuntimeError, match="enable_text_tracking"):
        concepts.get_top_texts()
    with pytest.raises(RuntimeError, match="enable_text_tracking"):
        concepts.neuron_stats()


@pytest.mark.parametrize("top_k,exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("3", TypeError),
                                       (True, TypeError), (None, TypeError)])
def test_bad_top_k(top_k, exc):
    concepts = AutoencoderConcepts(SimpleNamespace(n_latents=N_LATENTS))
    with pytest.raises(exc, match="top_k"):
        concepts.enable_text_tracking(top_k=top_k)
    assert not concepts.tracking_enabled


def test_context_that_does_not_match_the_batch_is_an_error(corpus):
    concepts = AutoencoderConcepts(SimpleNamespace(n_latents=N_LATENTS))
    concepts.enable_text_tracking(top_k=2)
    values, indices, context = make_batch(corpus[:3], "right", N_LATENTS, K)
    context.texts = context.texts[:2]
    with pytest.raises(ValueError, match="context.texts has 2 texts but the batch has 3 rows"):
        concepts.observe(values, indices, context)
    with pytest.raises(ValueError, match=r"values must be \[batch, seq, k\]"):
        concepts.observe(values[0], indices[0], context)


def test_tracker_memory_does_not_grow_with_the_data():
    tracker = TopTextTracker(n_latents=8, top_k=3)
    corpus = make_corpus(30, 8, 2, seed=3)
    for start in range(0, 30, 10):
        values, indices, context = make_batch(corpus[start:start + 10], "right", 8, 2)
        valid = context.attention_mask.bool() & ~context.special_tokens_mask
        tracker.update(values, indices, context.texts, context.input_ids, valid,
                       context.attention_mask.cumsum(1) - 1)
        assert tracker.values.shape == tracker.text_ids.shape == tracker.positions.shape == (8, 3)
    finite = torch.isfinite(tracker.values)
    assert bool((tracker.text_ids[finite] >= 0).all()) and bool((tracker.text_ids[~finite] == -1).all())
    assert not math.isnan(float(tracker.values[finite].sum()))


def test_ties_pick_the_earliest_token():
    concepts = AutoencoderConcepts(SimpleNamespace(n_latents=4))
    concepts.enable_text_tracking(top_k=2)
    values = torch.tensor([[[0.0, 0.0], [2.0, 1.0], [2.0, 0.5], [1.0, 0.0]]])
    indices = torch.tensor([[[0, 1], [3, 2], [3, 1], [3, 0]]])
    ids = torch.tensor([[1, 10, 11, 12]])
    ctx = BatchContext(["t"], ids, torch.ones(1, 4, dtype=torch.int64), ids == 1, FakeTokenizer())
    concepts.observe(values, indices, ctx)
    assert as_tuples(concepts.get_top_texts(3)) == [("t", 2.0, 1, 10)]
    assert as_tuples(concepts.get_top_texts(1)) == [("t", 0.5, 2, 11)]
    assert concepts.get_top_texts(0) == []  # value 0 (and the BOS position) is not firing
