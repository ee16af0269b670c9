"""The global selection of BatchTopK on the GPU: per-token counts of the ``total`` largest candidates of a batch.

`batch_topk_select_triton(values [B, c], total)` returns what `mi_crow.ops.batch_topk.batch_topk_select` returns
(``[B]`` int64 counts summing to ``total``; rows sorted descending, so token ``b`` keeps its first ``counts[b]``
candidates) without sorting or ranking the ``B * c`` candidates:

1. radix bisection for the ``total``-th largest value ``tau``: each value is mapped to an order-preserving int32
   key (the float's bits with the magnitude bits of negatives flipped, as in the encode's keys); 32 rounds halve
   the key interval ``[lo, hi]`` keeping ``count(key >= lo) >= total``. A round is two launches: `_count_kernel`
   (a grid over the flattened candidates; each program counts its keys ``>= mid`` and adds the count atomically)
   and `_bisect_kernel` (one program: moves ``lo`` or ``hi``, clears the counter). The interval lives on the
   device, so the 32 rounds run without a host synchronisation; after them ``lo`` is the key of ``tau``.
2. `_row_count_kernel`: per token, how many of its candidates are ``> tau`` and how many ``== tau``;
3. the ties at ``tau`` go to the first tokens that hold them (a cumulative sum over ``[B]``), so the counts sum to
   ``total`` exactly: the result equals the dense top-``total`` up to the order of ties.

Work: ``33 * B * c`` key comparisons and no ``[B * c]`` temporary (``torch.topk`` over the flattened candidates
would sort-select a copy of them). The launcher takes CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mi_crow.ops.triton.common import check_tensor

__all__ = ["batch_topk_select_triton"]

_BLOCK = 1024
_ROWS = 64


@triton.jit
def _ordered_key(v):
    """float32 -> int32 whose integer order is the float order (NaN above +inf, -0.0 equal to +0.0)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = tl.where(v != v, 0x7FC00000, bits)
    bits = tl.where(bits == -(2**31), 0, bits)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _count_kernel(values_ptr, numel, state_ptr, BLOCK: tl.constexpr):
    """state = [lo, hi, counter] (int64): counter += #{keys >= mid}, mid = lo + (hi - lo + 1) // 2."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    v = tl.load(values_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    key = _ordered_key(v).to(tl.int64)
    lo = tl.load(state_ptr)
    hi = tl.load(state_ptr + 1)
    mid = lo + (hi - lo + 1) // 2
    hits = tl.sum(((key >= mid) & inside).to(tl.int64), axis=0)
    tl.atomic_add(state_ptr + 2, hits)


@triton.jit
def _bisect_kernel(state_ptr, total):
    """Keep ``count(key >= lo) >= total``: lo = mid where the count at mid reaches total, else hi = mid - 1."""
    lo = tl.load(state_ptr)
    hi = tl.load(state_ptr + 1)
    count = tl.load(state_ptr + 2)
    mid = lo + (hi - lo + 1) // 2
    enough = count >= total
    tl.store(state_ptr, tl.where(enough, mid, lo))
    tl.store(state_ptr + 1, tl.where(enough, hi, mid - 1))
    tl.store(state_ptr + 2, count * 0)


@triton.jit
def _row_count_kernel(values_ptr, B, C, stride, state_ptr, gt_ptr, eq_ptr, ROWS: tl.constexpr,
                      COLS: tl.constexpr):
    """Per row: how many keys are ``> tau`` and ``== tau`` (tau = state[0], the total-th largest key)."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    tau = tl.load(state_ptr)
    gt = tl.zeros([ROWS], dtype=tl.int64)
    eq = tl.zeros([ROWS], dtype=tl.int64)
    for start in range(0, C, COLS):
        cols = start + tl.arange(0, COLS)
        inside = (rows[:, None] < B) & (cols[None, :] < C)
        v = tl.load(values_ptr + rows[:, None] * stride + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        key = _ordered_key(v).to(tl.int64)
        gt += tl.sum(((key > tau) & inside).to(tl.int64), axis=1)
        eq += tl.sum(((key == tau) & inside).to(tl.int64), axis=1)
    tl.store(gt_ptr + rows, gt, mask=rows < B)
    tl.store(eq_ptr + rows, eq, mask=rows < B)


def batch_topk_select_triton(values: torch.Tensor, total: int) -> torch.Tensor:
    """Per-token counts of the ``total`` largest entries of ``values [B, c]`` (rows sorted descending).

    Same contract as `mi_crow.ops.batch_topk.batch_topk_select`; see the module docstring for the method.
    """
    fn = "batch_topk_select_triton"
    values = check_tensor(fn, "values", values, 2, floating=True)
    B, C = values.shape
    dev = values.device
    if total >= B * C:
        return torch.full((B,), C, dtype=torch.int64, device=dev)
    if total <= 0 or B == 0:
        return torch.zeros((B,), dtype=torch.int64, device=dev)
    values = values.contiguous()
    state = torch.tensor([-(2**31), 2**31 - 1, 0], dtype=torch.int64, device=dev)
    numel = B * C
    grid = (triton.cdiv(numel, _BLOCK),)
    for _ in range(32):  # the key interval has 2**32 values: 32 halvings leave one
        _count_kernel[grid](values, numel, state, BLOCK=_BLOCK)
        _bisect_kernel[(1,)](state, total)
    gt = torch.empty(B, dtype=torch.int64, device=dev)
    eq = torch.empty(B, dtype=torch.int64, device=dev)
    cols = min(128, triton.next_power_of_2(C))
    _row_count_kernel[(triton.cdiv(B, _ROWS),)](values, B, C, values.stride(0), state, gt, eq, ROWS=_ROWS,
                                                COLS=cols)
    # The ties at tau, in token order, fill what the strictly larger values leave of total.
    need = total - gt.sum()
    before = eq.cumsum(0) - eq
    return gt + (need - before).clamp(min=0).minimum(eq)
