"""ActivationSampler: examples across each feature's activation range, checked against a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch

from mi_crow.mechanistic.sae.concepts.quantiles import ActivationSampler

N, K, B, S = 7, 3, 4, 6


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(B, S, K, generator=g) * torch.tensor([0.02, 1.0, 30.0]).view(1, 1, K)
    values[0, 0, 0] = 0.0  # a zero entry never counts
    indices = torch.rand(B, S, N, generator=g).topk(K, dim=-1).indices
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, 4:] = False
    ids = torch.randint(0, 50, (B, S), generator=g)
    return values, indices, valid, ids


def test_samples_are_real_tokens_of_their_bin_and_counts_match_a_histogram():
    sampler = ActivationSampler(N, n_bins=6, log10_range=(-3.0, 3.0), seed=1)
    seen = {}  # (feature, bin) -> list of (text, position, value, token id)
    for b in range(3):
        values, indices, valid, ids = batch(b)
        text_index = torch.arange(b * B, (b + 1) * B)
        positions = torch.arange(S).expand(B, S)
        sampler.update(values, indices, valid, text_index, positions, ids)
        for r in range(B):
            for s in range(S):
                for j in range(K):
                    v = float(values[r, s, j])
                    if not valid[r, s] or v <= 0:
                        continue
                    bin_ = min(max(math.floor((math.log10(v) + 3.0) / 1.0), 0), 5)
                    seen.setdefault((int(indices[r, s, j]), bin_), []).append((b * B + r, s, v, int(ids[r, s])))
    counts = sampler.count.view(N, 6)
    for f in range(N):
        for bin_ in range(6):
            entries = seen.get((f, bin_), [])
            assert int(counts[f, bin_]) == len(entries)
            slot = f * 6 + bin_
            if entries:
                got = (int(sampler.text[slot]), int(sampler.position[slot]), float(sampler.value[slot]),
                       int(sampler.token_id[slot]))
                assert any(got[:2] == e[:2] and got[2] == pytest.approx(e[2]) and got[3] == e[3] for e in entries)
            else:
                assert int(sampler.text[slot]) == -1


def test_examples_follow_the_quantiles():
    sampler = ActivationSampler(N, n_bins=6, seed=0)
    for b in range(3):
        values, indices, valid, ids = batch(b)
        sampler.update(values, indices, valid, torch.arange(b * B, (b + 1) * B), torch.arange(S).expand(B, S), ids)
    texts = [f"text {i}" for i in range(3 * B)]
    examples = sampler.examples(texts, quantiles=(0.05, 0.5, 0.95))
    counts = sampler.count.view(N, 6)
    for f, rows in examples.items():
        assert rows, f
        acts = [r["activation"] for r in rows]
        assert acts == sorted(acts)  # weakest first
        for r in rows:
            assert r["text"] in texts and 0 < r["quantile"] <= 1
        # The 50% example comes from the bin holding the median token.
        cum = counts[f].cumsum(0)
        median_bin = int(torch.searchsorted(cum, torch.tensor(math.ceil(0.5 * int(cum[-1])))))
        lo = 10 ** (-3.0 + median_bin)
        assert any(lo <= r["activation"] < lo * 10 or median_bin in (0, 5) for r in rows if r["quantile"] == 0.5)
    with pytest.raises(ValueError, match="quantiles"):
        sampler.examples(texts, quantiles=(0.0,))
