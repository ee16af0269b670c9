"""Triton kernels of the decoder's gradients: ``gather_dot`` (the gradient to the code values) and
``scatter_rows`` (the gradient to the decoder weight, and to the encoder weight on active latents).

``scatter_rows`` is deterministic: the launcher sorts the ``(token, slot)`` pairs by latent (a stable sort of
``tokens * k`` indices), and one program per (latent, column block) sums its contiguous segment in a fixed order.
No atomics, so results are bit-for-bit reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mi_crow.errors import UserInputError
from mi_crow.ops import checks, reference
from mi_crow.ops.triton.common import check_index_range, check_same_device, check_tensor, next_pow2, round_to


@triton.jit
def _gather_dot_kernel(
    g_ptr,  # [B, d] output gradient
    indices_ptr,  # [B, K] int64 latent indices
    w_ptr,  # [n, d] weight whose rows are gathered
    out_ptr,  # [B, K] dot products (contiguous)
    K,
    d,
    stride_gb,
    stride_gd,
    stride_ib,
    stride_ik,
    stride_wn,
    stride_wd,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = kk < K
    idx = tl.load(indices_ptr + row * stride_ib + kk * stride_ik, mask=k_mask, other=0)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < d
        g = tl.load(g_ptr + row * stride_gb + dd * stride_gd, mask=d_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + idx[:, None] * stride_wn + dd[None, :] * stride_wd,
            mask=k_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(out_ptr + row * K + kk, round_to(acc, out_ptr.dtype.element_ty), mask=k_mask)


def gather_dot_triton(grad_out: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Gathered dot products ``out[b, j] = <grad_out[b], W[indices[b, j]]>`` (the gradient to code values).

    Args:
        grad_out: ``[tokens, d_in]`` gradient of the reconstruction.
        indices: ``[tokens, k]`` int64 latent indices in ``[0, n_latents)``.
        W: ``[n_latents, d_in]`` weight whose rows are gathered (the decoder weight).

    Returns:
        ``[tokens, k]`` in ``grad_out.dtype``, accumulated in float32.
    """
    op = "gather_dot"
    check_tensor(op, "grad_out", grad_out, 2, floating=True)
    check_tensor(op, "indices", indices, 2, floating=False)
    check_tensor(op, "W", W, 2, floating=True)
    B, d = grad_out.shape
    if indices.shape[0] != B:
        raise UserInputError(f"{op}: indices must have {B} rows to match grad_out, got shape {tuple(indices.shape)}")
    if W.shape[1] != d:
        raise UserInputError(f"{op}: W must have shape [n_latents, {d}] to match grad_out, got {tuple(W.shape)}")
    check_same_device(op, grad_out=grad_out, indices=indices, W=W)
    n = W.shape[0]
    check_index_range(op, "indices", indices, n)
    if torch.float64 in (grad_out.dtype, W.dtype):
        return reference.gather_dot_ref(grad_out, indices, W)
    K = indices.shape[1]
    out = torch.empty((B, K), dtype=grad_out.dtype, device=grad_out.device)
    if B == 0 or K == 0:
        return out
    block_k = min(32, max(1, next_pow2(K)))
    block_d = min(128, max(16, next_pow2(d)))
    _gather_dot_kernel[(B, triton.cdiv(K, block_k))](
        grad_out,
        indices,
        W,
        out,
        K,
        d,
        grad_out.stride(0),
        grad_out.stride(1),
        indices.stride(0),
        indices.stride(1),
        W.stride(0),
        W.stride(1),
        BLOCK_K=block_k,
        BLOCK_D=block_d,
    )
    return out


@triton.jit
def _scatter_rows_kernel(
    coef_ptr,  # [B * K] coefficients, contiguous
    x_ptr,  # [B, d] rows to scatter
    order_ptr,  # [B * K] int64 flat (token, slot) positions sorted by latent
    offsets_ptr,  # [n + 1] int64 start of each latent's segment in order
    out_ptr,  # [n, d] result (contiguous)
    K,
    d,
    stride_xb,
    stride_xd,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    latent = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = dd < d
    start = tl.load(offsets_ptr + latent)
    end = tl.load(offsets_ptr + latent + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        p_mask = pp < end
        flat = tl.load(order_ptr + pp, mask=p_mask, other=0)
        c = tl.load(coef_ptr + flat, mask=p_mask, other=0.0).to(tl.float32)
        token = flat // K
        xv = tl.load(
            x_ptr + token[:, None] * stride_xb + dd[None, :] * stride_xd,
            mask=p_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(c[:, None] * xv, axis=0)
    tl.store(out_ptr + latent * d + dd, round_to(acc, out_ptr.dtype.element_ty), mask=d_mask)


def scatter_rows_triton(coef: torch.Tensor, indices: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """Deterministic scatter-add of scaled rows: ``out[i] = sum_{(b, j): indices[b, j] == i} coef[b, j] * x[b]``.

    Serves the decoder-weight gradient (``coef = values``, ``x = grad_out``) and the encoder-weight gradient on
    active latents (``coef = grad_pre``, ``x = x - b_dec``). Contributions are grouped by latent after a stable
    sort and summed in a fixed order: no atomics, reproducible bit for bit.

    Args:
        coef: ``[tokens, k]`` coefficients.
        indices: ``[tokens, k]`` int64 latent indices in ``[0, n)``.
        x: ``[tokens, d_in]`` rows to scatter.
        n: number of output rows (latents), ``n >= 0``.

    Returns:
        ``[n, d_in]`` in ``x.dtype``, accumulated in float32; rows no index points to are zero.
    """
    op = "scatter_rows"
    check_tensor(op, "coef", coef, 2, floating=True)
    check_tensor(op, "indices", indices, 2, floating=False)
    check_tensor(op, "x", x, 2, floating=True)
    if coef.shape != indices.shape:
        raise UserInputError(
            f"{op}: coef and indices must have the same shape, got {tuple(coef.shape)} and {tuple(indices.shape)}"
        )
    if x.shape[0] != coef.shape[0]:
        raise UserInputError(f"{op}: x must have {coef.shape[0]} rows to match coef, got shape {tuple(x.shape)}")
    checks.int_in_range(op, "n", n, 0, 2**63 - 1, expected=">= 0")
    check_same_device(op, coef=coef, indices=indices, x=x)
    check_index_range(op, "indices", indices, n)
    if torch.float64 in (coef.dtype, x.dtype):
        return reference.scatter_rows_ref(coef, indices, x, n)
    B, K = coef.shape
    d = x.shape[1]
    out = torch.empty((n, d), dtype=x.dtype, device=x.device)
    if n == 0 or d == 0:
        return out
    flat_idx = indices.reshape(-1)
    sorted_idx, order = torch.sort(flat_idx, stable=True)
    offsets = torch.searchsorted(sorted_idx, torch.arange(n + 1, device=x.device, dtype=torch.int64))
    coef_flat = coef.contiguous().reshape(-1)
    block_d = min(128, max(16, next_pow2(d)))
    _scatter_rows_kernel[(n, triton.cdiv(d, block_d))](
        coef_flat,
        x,
        order,
        offsets,
        out,
        K,
        d,
        x.stride(0),
        x.stride(1),
        BLOCK_P=16,
        BLOCK_D=block_d,
    )
    return out
