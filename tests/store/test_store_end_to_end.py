"""A real save through LanguageModel, streamed back by the reader: exactly the model's real-token hidden states."""

from __future__ import annotations

import pytest
import torch

from mi_crow.datasets import TextDataset
from mi_crow.store import LocalStore

testing = pytest.importorskip("mi_crow.testing")


def test_reader_over_saved_run_yields_each_real_token_hidden_state_once(tmp_path):
    store = LocalStore(tmp_path / "store", fsync=False)
    lm = testing.make_tiny_gpt2_lm(store=store)
    texts = list(testing.SAMPLE_TEXTS)
    run_id = lm.activations.save(TextDataset(texts), ["transformer.h.1"], run_id="e2e", batch_size=5,
                                 max_length=32, progress=False)

    # Independent reference: every text alone (no padding at all), hidden state after block 1.
    expected = []
    with torch.no_grad():
        for text in texts:
            enc = lm.tokenizer(text, truncation=True, max_length=32, return_tensors="pt")
            out = lm.model(**enc, output_hidden_states=True)
            expected.append(out.hidden_states[2][0])
    expected = torch.cat(expected)

    reader = store.activation_reader(run_id, "transformer.h.1", 7, buffer_tokens=40, seed=1, drop_last=False)
    got = torch.cat(list(reader))
    assert reader.n_tokens == expected.shape[0] == got.shape[0]
    # Compare as multisets: order both sides by a random projection (equal rows, e.g. the same first token of
    # several texts, land side by side), then compare row by row.
    direction = torch.randn(got.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got_sorted = got[(got.double() @ direction).argsort()]
    expected_sorted = expected[(expected.double() @ direction).argsort()]
    torch.testing.assert_close(got_sorted, expected_sorted, rtol=1e-4, atol=1e-5)
    # And the stream is shuffled: not the storage order.
    assert not torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
