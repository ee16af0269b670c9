"""The index-range check runs once per index tensor: skipped for indices an op produced or already checked and that
nobody wrote to since, and run again after any write (mi_crow.ops.index_bounds)."""

from __future__ import annotations

import pytest
import torch

from mi_crow.errors import UserInputError
from mi_crow.ops import functional as F
from mi_crow.ops.index_bounds import known_in_range, record_bound


def _sae(n: int = 64, d: int = 16, B: int = 8, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g)
    W_enc = torch.randn(n, d, generator=g) / d**0.5
    W_dec = torch.randn(n, d, generator=g) / d**0.5
    return x, W_enc, torch.zeros(n), torch.zeros(d), W_dec


class _CountingReductions:
    """Counts the min/max reductions the CPU range check runs (by wrapping Tensor.min)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = torch.Tensor.min

        def counting(t, *args, **kwargs):  # type: ignore[no-untyped-def]
            if t.dtype == torch.int64 and not args and not kwargs:
                self.calls += 1
            return original(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "min", counting)


def test_record_and_invalidate_by_write() -> None:
    idx = torch.tensor([[0, 3], [2, 1]])
    assert not known_in_range(idx, 4)
    record_bound(idx, 4)
    assert known_in_range(idx, 4) and known_in_range(idx, 10)
    assert not known_in_range(idx, 3)  # checked against a larger width than asked now
    idx[0, 0] = 2  # an in-place write bumps the version counter
    assert not known_in_range(idx, 4)
    record_bound(idx, 4)
    idx.detach()[1, 1] = 0  # a write through a detached alias shares the counter
    assert not known_in_range(idx, 4)
    record_bound(idx, 4)
    assert not known_in_range(idx[:1], 4)  # another tensor object: checked again
    assert not known_in_range(idx.clone(), 4)


def test_inference_tensors_are_always_checked() -> None:
    with torch.inference_mode():
        idx = torch.tensor([[0, 1]])
        record_bound(idx, 4)
        assert not known_in_range(idx, 4)


def test_encode_indices_skip_the_decode_check(monkeypatch: pytest.MonkeyPatch) -> None:
    x, W_enc, b_enc, b_dec, W_dec = _sae()
    code = F.topk_encode(x, W_enc, b_enc, b_dec, 4)
    counter = _CountingReductions(monkeypatch)
    out = F.sparse_decode(code.values, code.indices, W_dec, b_dec)
    assert counter.calls == 0
    reference = b_dec + (code.values.unsqueeze(-1) * W_dec[code.indices]).sum(1)
    torch.testing.assert_close(out, reference)


def test_user_indices_are_checked_once_then_again_after_a_write(monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, _, b_dec, W_dec = _sae()
    values = torch.ones(2, 2)
    idx = torch.tensor([[0, 5], [7, 63]])
    counter = _CountingReductions(monkeypatch)
    F.sparse_decode(values, idx, W_dec, b_dec)
    F.sparse_decode(values, idx, W_dec, b_dec)
    assert counter.calls == 1
    idx[1, 1] = 64  # out of range for n = 64, written after the check
    with pytest.raises(UserInputError, match="indices must lie in"):
        F.sparse_decode(values, idx, W_dec, b_dec)
    assert counter.calls == 2


def test_a_wider_bound_does_not_pass_a_narrower_decoder() -> None:
    x, W_enc, b_enc, b_dec, _ = _sae(n=64)
    code = F.topk_encode(x, W_enc, b_enc, b_dec, 8)
    narrow = torch.randn(16, 16)  # n = 16 < 64: the encode's bound does not cover it
    if int(code.indices.max()) < 16:
        pytest.fail("test data must select a latent >= 16")
    with pytest.raises(UserInputError, match="indices must lie in"):
        F.sparse_decode(code.values, code.indices, narrow, b_dec)


def test_training_step_gradients_unchanged_by_skipping() -> None:
    """The same encode -> decode -> backward with the record and with fresh, checked copies of the indices."""
    x, W_enc, b_enc, b_dec, W_dec = _sae(seed=3)
    grads = []
    for fresh in (False, True):
        Wd = W_dec.clone().requires_grad_(True)
        code = F.topk_encode(x, W_enc, b_enc, b_dec, 4)
        indices = code.indices.clone() if fresh else code.indices
        F.sparse_decode(code.values, indices, Wd, b_dec).pow(2).sum().backward()
        grads.append(Wd.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_triton_launchers_skip_the_host_sync_for_encode_indices() -> None:
    """Under the Triton interpreter: the encode's indices pass decode, gather_dot and scatter_rows without one
    aminmax (a host sync on a GPU); a write into them brings the check back, which catches the bad index."""
    pytest.importorskip("triton", reason="triton is not installed")
    from ._triton_worker import start_worker

    x, W_enc, b_enc, b_dec, W_dec = _sae(n=64, d=16, B=8, seed=5)
    worker = start_worker()
    try:
        clean, after_write, error = worker.call("range_checks", x, W_enc, b_enc, b_dec, W_dec, 4, 64)
    finally:
        worker.close()
    assert clean == 0
    assert after_write == 1
    assert "indices must lie in [0, 64)" in error
