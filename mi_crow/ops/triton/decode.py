"""Triton ``sparse_decode``: ``x_hat[b] = b_dec + sum_j values[b, j] * W_dec[indices[b, j]]``, k rows gathered
per token instead of a dense ``[tokens, n_latents] @ W_dec`` product."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mi_crow.errors import UserInputError
from mi_crow.ops import reference
from mi_crow.ops.triton.common import check_index_range, check_same_device, check_tensor, next_pow2, round_to


@triton.jit
def _sparse_decode_kernel(
    values_ptr,  # [B, K] code values
    indices_ptr,  # [B, K] int64 latent indices
    w_ptr,  # [n, d] decoder weight
    b_ptr,  # [d] decoder bias
    out_ptr,  # [B, d] reconstruction (contiguous)
    K,
    d,
    stride_vb,
    stride_vk,
    stride_ib,
    stride_ik,
    stride_wn,
    stride_wd,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = dd < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < K
        idx = tl.load(indices_ptr + row * stride_ib + kk * stride_ik, mask=k_mask, other=0)
        v = tl.load(values_ptr + row * stride_vb + kk * stride_vk, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + idx[:, None] * stride_wn + dd[None, :] * stride_wd,
            mask=k_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(v[:, None] * w, axis=0)
    acc += tl.load(b_ptr + dd, mask=d_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * d + dd, round_to(acc, out_ptr.dtype.element_ty), mask=d_mask)


def _check_code(op: str, values: torch.Tensor, indices: torch.Tensor) -> None:
    check_tensor(op, "values", values, 2, floating=True)
    check_tensor(op, "indices", indices, 2, floating=False)
    if values.shape != indices.shape:
        raise UserInputError(
            f"{op}: values and indices must have the same shape, got {tuple(values.shape)} and "
            f"{tuple(indices.shape)}"
        )


def sparse_decode_triton(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor
) -> torch.Tensor:
    """Sparse decode: ``x_hat[b] = b_dec + sum_j values[b, j] * W_dec[indices[b, j]]``.

    Args:
        values: ``[tokens, k]`` code values (any k, including 0).
        indices: ``[tokens, k]`` int64 latent indices in ``[0, n_latents)``.
        W_dec: ``[n_latents, d_in]`` decoder weight.
        b_dec: ``[d_in]`` decoder bias.

    Returns:
        ``x_hat [tokens, d_in]`` in ``W_dec.dtype``, accumulated in float32.
    """
    op = "sparse_decode"
    _check_code(op, values, indices)
    check_tensor(op, "W_dec", W_dec, 2, floating=True)
    check_tensor(op, "b_dec", b_dec, 1, floating=True)
    n, d = W_dec.shape
    if b_dec.shape[0] != d:
        raise UserInputError(f"{op}: b_dec must have shape [{d}] to match W_dec, got {tuple(b_dec.shape)}")
    check_same_device(op, values=values, indices=indices, W_dec=W_dec, b_dec=b_dec)
    check_index_range(op, "indices", indices, n)
    if torch.float64 in (values.dtype, W_dec.dtype, b_dec.dtype):
        return reference.sparse_decode_ref(values, indices, W_dec, b_dec)
    B, K = values.shape
    b_dec = b_dec.contiguous()
    out = torch.empty((B, d), dtype=W_dec.dtype, device=values.device)
    if B == 0 or d == 0:
        return out
    block_d = min(128, max(16, next_pow2(d)))
    block_k = min(32, max(1, next_pow2(K)))
    _sparse_decode_kernel[(B, triton.cdiv(d, block_d))](
        values,
        indices,
        W_dec,
        b_dec,
        out,
        K,
        d,
        values.stride(0),
        values.stride(1),
        indices.stride(0),
        indices.stride(1),
        W_dec.stride(0),
        W_dec.stride(1),
        BLOCK_K=block_k,
        BLOCK_D=block_d,
    )
    return out
