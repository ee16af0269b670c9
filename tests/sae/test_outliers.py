"""attention_sink_mask: the one outlier rule (reference set: the real tokens of the batch), by hand."""

from __future__ import annotations

import pytest
import torch

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.outliers import attention_sink_mask


def _vectors(norms: list[list[float]], d: int = 4) -> torch.Tensor:
    """[batch, seq, d] with token (b, t) = norms[b][t] * e_0 (its norm is exactly that number)."""
    x = torch.zeros(len(norms), len(norms[0]), d)
    x[..., 0] = torch.tensor(norms)
    return x


def test_flat_batch_by_hand():
    x = _vectors([[1.0, 2.0, 3.0, 40.0, 30.0]])[0]  # [tokens, d]
    # median of (1, 2, 3, 30, 40) is 3: with factor 10 the threshold is 30, kept at equality.
    assert attention_sink_mask(x, factor=10.0).tolist() == [False, False, False, True, False]
    assert attention_sink_mask(x, factor=5.0).tolist() == [False, False, False, True, True]
    assert not attention_sink_mask(x, factor=None).any()
    # an even count uses the lower middle value, like torch.median: (1, 2, 4, 100) -> 2, threshold 2 * 1.5 = 3
    even = _vectors([[1.0, 2.0, 4.0, 100.0]])[0]
    assert attention_sink_mask(even, factor=1.5).tolist() == [False, False, True, True]


def test_one_token_text_sink_is_caught_by_the_batch_reference():
    """The issue's case: a one-token text whose single token is a sink of norm 24k. A per-text median makes the token
    its own reference and keeps it; the batch's real tokens catch it."""
    norms = [[1.0, 1.5, 2.0, 1.2], [24_000.0, 0.0, 0.0, 0.0]]
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    x = _vectors(norms)
    sinks = attention_sink_mask(x, mask, factor=10.0)
    assert sinks.tolist() == [[False] * 4, [True, False, False, False]]


def test_padding_is_neither_reference_nor_sink():
    # Padded positions with norm 0 would pull a padded-in median to 0 and make every real token a "sink"; padded
    # positions with a huge norm must not be reported as sinks either.
    norms = [[1.0, 2.0, 0.0, 0.0, 0.0, 0.0], [3.0, 900.0, 0.0, 0.0, 0.0, 0.0]]
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    x = _vectors(norms)
    x[1, 5, 0] = 1e6  # garbage at a padded position
    # real norms (1, 2, 3, 900): median 2, threshold 20.
    assert attention_sink_mask(x, mask, factor=10.0).tolist() == [[False] * 6, [False, True] + [False] * 4]
    bool_mask = mask.bool()
    assert torch.equal(attention_sink_mask(x, bool_mask, factor=10.0), attention_sink_mask(x, mask, factor=10.0))
    with_padding_in_reference = attention_sink_mask(x, None, factor=10.0)  # every position real: median 0
    assert with_padding_in_reference[0, :2].all()


def test_no_real_token_and_dtypes():
    x = _vectors([[5.0, 500.0]])
    assert not attention_sink_mask(x, torch.zeros(1, 2, dtype=torch.int64), factor=2.0).any()
    for dtype in (torch.bfloat16, torch.float64):
        assert attention_sink_mask(x.to(dtype), factor=2.0).tolist() == [[False, True]]


def test_bad_input_names_the_argument():
    x = _vectors([[1.0, 2.0]])
    with pytest.raises(UserInputError, match="factor must be a finite number > 1.0 or None, got 1.0"):
        attention_sink_mask(x, factor=1.0)
    with pytest.raises(UserInputError, match=r"attention_mask must be a tensor of x's leading shape \[1, 2\]"):
        attention_sink_mask(x, torch.ones(2, 1), factor=3.0)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        attention_sink_mask(torch.ones(2, 3, dtype=torch.int64), factor=3.0)
