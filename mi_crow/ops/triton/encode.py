"""Triton ``topk_encode``: fused ``relu(top-k((x - b_dec) @ W_enc.T + b_enc))`` and the AuxK top-k.

The ``[tokens, n_latents]`` pre-activation matrix is never materialised. A program owns a block of rows and a
contiguous slice of latents; it computes one ``[BLOCK_B, BLOCK_N]`` tile of pre-activations at a time with
``tl.dot`` and merges the tile into a running top-k buffer held in registers (:mod:`.sorting`): a merge takes the
tile's own top-k (bitonic top-k) and combines it with the running buffer by one bitonic merge. A tile whose best
candidate cannot enter any row's buffer skips the merge. When there are few row blocks, the latents are split
across programs (for occupancy) and a second small kernel merges the ``[tokens, splits, K_PAD]`` candidate keys
-- ``splits * K_PAD`` keys per token, far below ``n_latents``. The optional AuxK top-k among dead latents is a
second buffer filled in the same pass. A tile holds at most 2048 keys (16 rows minimum), and k, k_aux at most
256: beyond that, register use and the unrolled network outgrow the GPU, and a chunked PyTorch path with
``[tokens, 4096]`` scratch serves the call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.ops import checks, reference
from mi_crow.ops.index_bounds import record_bound
from mi_crow.ops.triton.common import (
    check_mask,
    check_same_device,
    check_tensor,
    interpreting,
    next_pow2,
    round_to,
    target_programs,
)
from mi_crow.ops.triton.sorting import float_to_key, merge_sorted, merge_topk

# Largest k (and k_aux) the fused encode keeps in registers. Beyond it the sorting network's unrolled code and
# register footprint grow past what compiles in reasonable time, so a chunked PyTorch path serves the call.
_MAX_FUSED_K = 256
# Latents per matrix product on the chunked path: bounds its scratch to [tokens, _CHUNK_LATENTS].
_CHUNK_LATENTS = 4096
# Keys per [BLOCK_B, BLOCK_N] tile held by one program of the fused encode (int64 each).
_TILE_KEYS = 2048


@triton.jit
def _topk_encode_kernel(
    x_ptr,  # [B, d] input activations
    w_ptr,  # [n, d] encoder weight
    b_enc_ptr,  # [n] encoder bias
    b_dec_ptr,  # [d] decoder bias, subtracted from x
    dead_ptr,  # [n] int8, 1 for a dead latent (read only when HAS_AUX)
    part_ptr,  # [B, S, K_PAD] int64 candidate keys of each latent split
    aux_part_ptr,  # [B, S, KA_PAD] int64 candidate keys among dead latents (written only when HAS_AUX)
    B,
    n,
    d,
    latents_per_split,
    S,
    stride_xb,
    stride_xd,
    stride_wn,
    stride_wd,
    K_PAD: tl.constexpr,
    KA_PAD: tl.constexpr,
    HAS_AUX: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    dtype = x_ptr.dtype.element_ty

    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    # Offsets in 64 bits: tokens * d_in or n_latents * d_in may pass 2**31.
    rows64 = rows.to(tl.int64)
    n_start = pid_s * latents_per_split
    n_end = tl.minimum(n_start + latents_per_split, n)

    best = tl.full([BLOCK_B, K_PAD], -(2**63), tl.int64)
    if HAS_AUX:
        aux_best = tl.full([BLOCK_B, KA_PAD], -(2**63), tl.int64)

    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_end
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_mask = dd < d
            xt = tl.load(
                x_ptr + rows64[:, None] * stride_xb + dd[None, :] * stride_xd,
                mask=row_mask[:, None] & d_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            bd = tl.load(b_dec_ptr + dd, mask=d_mask, other=0.0).to(tl.float32)
            # Round the centred input to the input dtype, as the reference's (x - b_dec) does.
            xc = round_to(xt - bd[None, :], dtype)
            wt = tl.load(
                w_ptr + cols.to(tl.int64)[:, None] * stride_wn + dd[None, :] * stride_wd,
                mask=col_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if DOT_IN_FP32:
                # The interpreter multiplies raw bf16 bit patterns in tl.dot; exact fp32 copies give the same
                # products and fp32 accumulation that the GPU's bf16 dot computes.
                xc = xc.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xc, tl.trans(wt), acc, input_precision=INPUT_PRECISION)
        # The contract of every backend: the product accumulated in float32, plus the bias in float32, ranked in
        # float32 (only the values written out are rounded to their dtype, by the finalize kernel).
        be = tl.load(b_enc_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        pre = acc + be[None, :]
        keys = float_to_key(pre, cols)
        keys = tl.where(col_mask[None, :], keys, -(2**63))

        # Skip the merge when no candidate of this tile beats any (real) row's current k-th best. Empty slots hold
        # the smallest int64, below every real key (even -inf or NaN ones), so a buffer fills first.
        tile_best = tl.max(keys, axis=1)
        row_floor = tl.min(best, axis=1)
        if tl.max(((tile_best > row_floor) & row_mask).to(tl.int32), axis=0) > 0:
            best = merge_topk(best, keys, K_PAD)
        if HAS_AUX:
            dead = tl.load(dead_ptr + cols, mask=col_mask, other=0)
            aux_keys = tl.where((dead != 0)[None, :], keys, -(2**63))
            aux_tile_best = tl.max(aux_keys, axis=1)
            aux_floor = tl.min(aux_best, axis=1)
            if tl.max(((aux_tile_best > aux_floor) & row_mask).to(tl.int32), axis=0) > 0:
                aux_best = merge_topk(aux_best, aux_keys, KA_PAD)

    kk = tl.arange(0, K_PAD)
    tl.store(
        part_ptr + rows64[:, None] * (S * K_PAD) + pid_s * K_PAD + kk[None, :],
        best,
        mask=row_mask[:, None],
    )
    if HAS_AUX:
        ka = tl.arange(0, KA_PAD)
        tl.store(
            aux_part_ptr + rows64[:, None] * (S * KA_PAD) + pid_s * KA_PAD + ka[None, :],
            aux_best,
            mask=row_mask[:, None],
        )


@triton.jit
def _topk_finalize_kernel(
    part_ptr,  # [B, S, K_PAD] int64 candidate keys
    values_ptr,  # [B, k] output values (after ReLU)
    indices_ptr,  # [B, k] int64 output indices
    B,
    S,
    k,
    K_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_mask = rows < B
    kk = tl.arange(0, K_PAD)
    base = part_ptr + rows[:, None] * (S * K_PAD)
    best = tl.load(base + kk[None, :], mask=row_mask[:, None], other=-(2**63))
    for s in range(1, S):
        # Partials are stored descending; reading one backwards gives the ascending run the merge wants.
        cand = tl.load(base + s * K_PAD + (K_PAD - 1 - kk)[None, :], mask=row_mask[:, None], other=-(2**63))
        best = merge_sorted(best, cand)

    empty = best == -(2**63)
    hi = (best >> 32).to(tl.int32)
    bits = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    val = bits.to(tl.float32, bitcast=True)
    idx = 0x7FFFFFFF - (best & 0xFFFFFFFF)
    # An empty slot (fewer dead latents than k_aux) becomes value 0 at latent 0: it adds nothing to a decode
    # and, being 0 after ReLU, passes no gradient. The ReLU keeps NaN (tl.maximum would drop it on a GPU).
    val = tl.where(empty | (val < 0.0), 0.0, val)
    idx = tl.where(empty, 0, idx)
    out_mask = row_mask[:, None] & (kk < k)[None, :]
    out_val = round_to(val, values_ptr.dtype.element_ty)
    tl.store(values_ptr + rows[:, None] * k + kk[None, :], out_val, mask=out_mask)
    tl.store(indices_ptr + rows[:, None] * k + kk[None, :], idx, mask=out_mask)


def encode_blocks(B: int, d: int, k_pad: int, ka_pad: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_D, num_warps) of the fused encode for a problem size.

    Chosen from ptxas resource reports (cuobjdump -res-usage) of sm_80/sm_90 builds: with 4 warps the sorting
    network's keys spilled to local memory (255 registers and a stack at k = 32; minutes of ptxas at k = 128),
    with 8 warps and 32-wide d chunks the k <= 128 configurations fit in registers.
    """
    block_n = max(64, k_pad, ka_pad)  # a tile's own top-k needs at least K_PAD candidates
    block_b = 16 if B <= 16 else max(16, min(32, _TILE_KEYS // block_n))  # tl.dot needs >= 16 rows
    block_d = min(32, max(16, next_pow2(d)))
    num_warps = 16 if max(k_pad, ka_pad) >= 256 else 8
    return block_b, block_n, block_d, num_warps


def _topk_encode_chunked(
    xc: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    dead_mask: torch.Tensor | None,
    k_aux: int,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_encode for k or k_aux above the fused kernel's limit: latent chunks, running top-k with torch.topk.

    ``xc`` is ``x - b_dec`` and ``W_enc`` the weight, both already in the product's dtype; the product is taken
    in float32 plus the bias in float32 (the fused kernel's contract) and the values returned in ``out_dtype``.
    Same results and padding as the reference, with scratch bounded by ``[tokens, _CHUNK_LATENTS + k]``.
    """
    B, n = xc.shape[0], W_enc.shape[0]
    x = xc.float()
    best_v = x.new_empty((B, 0))
    best_i = torch.empty((B, 0), dtype=torch.int64, device=x.device)
    aux_v, aux_i = best_v, best_i
    for start in range(0, n, _CHUNK_LATENTS):
        end = min(n, start + _CHUNK_LATENTS)
        pre = x @ W_enc[start:end].float().T + b_enc[start:end].float()
        cols = torch.arange(start, end, device=x.device).expand(B, -1)
        both_v = torch.cat([best_v, pre], dim=1)
        top = both_v.topk(min(k, both_v.shape[1]), dim=1)
        best_i = torch.cat([best_i, cols], dim=1).gather(1, top.indices)
        best_v = top.values
        if dead_mask is not None:
            # Only the dead columns compete (masking live ones to -inf would tie them with a dead -inf).
            dead_cols = dead_mask[start:end].nonzero().squeeze(1)
            both_v = torch.cat([aux_v, pre.index_select(1, dead_cols)], dim=1)
            top = both_v.topk(min(k_aux, both_v.shape[1]), dim=1)
            aux_i = torch.cat([aux_i, (dead_cols + start).expand(B, -1)], dim=1).gather(1, top.indices)
            aux_v = top.values
    values = torch.relu(best_v).to(out_dtype)
    if dead_mask is None:
        return values, best_i, values.new_empty((B, 0)), best_i.new_empty((B, 0))
    pad = k_aux - aux_v.shape[1]  # fewer dead latents than k_aux: value 0 at index 0
    return (
        values,
        best_i,
        torch.cat([torch.relu(aux_v), aux_v.new_zeros((B, pad))], dim=1).to(out_dtype),
        torch.cat([aux_i, aux_i.new_zeros((B, pad))], dim=1),
    )


def topk_encode_triton(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    dead_mask: torch.Tensor | None,
    k_aux: int,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``relu(top-k((x - b_dec) @ W_enc.T + b_enc))`` without the ``[tokens, n_latents]`` matrix.

    Args:
        x: ``[tokens, d_in]`` input activations (float32, bfloat16 or float16); the product runs in this dtype.
        W_enc: ``[n_latents, d_in]`` encoder weight, same dtype as ``x``.
        b_enc: ``[n_latents]`` encoder bias.
        b_dec: ``[d_in]`` decoder bias, subtracted from ``x`` first.
        k: number of active latents per token, ``1 <= k <= n_latents``. Up to 256 the fused kernel serves the
            call (fastest up to 128); above, a chunked PyTorch path with bounded scratch.
        dead_mask: ``[n_latents]`` bool, True for dead latents, or None.
        k_aux: number of AuxK latents to pick among the dead ones, ``0 <= k_aux <= n_latents`` (fused up to
            256).
        compute_dtype: dtype of the product's operands (None: ``x.dtype``). ``x - b_dec`` (computed in
            ``x.dtype``) and ``W_enc`` are rounded to it for this call; as on CPU, the product is accumulated in
            float32, ``b_enc`` is added in float32, the latents are ranked on that float32 result, and only the
            values written out are rounded, to ``x.dtype``.

    Returns:
        ``(values, indices, aux_values, aux_indices)``: ``values [tokens, k]`` in ``x.dtype``, after ReLU,
        sorted descending; ``indices [tokens, k]`` int64; ``aux_values``/``aux_indices`` ``[tokens, k_aux]``
        likewise among dead latents, or ``[tokens, 0]`` when ``k_aux == 0`` or ``dead_mask`` is None. When a
        token has fewer than ``k_aux`` dead latents the tail is padded with value 0 at index 0. Ties between
        equal pre-activations go to the lower latent index.
    """
    op = "topk_encode"
    check_tensor(op, "x", x, 2, floating=True)
    check_tensor(op, "W_enc", W_enc, 2, floating=True)
    check_tensor(op, "b_enc", b_enc, 1, floating=True)
    check_tensor(op, "b_dec", b_dec, 1, floating=True)
    B, d = x.shape
    n = W_enc.shape[0]
    if W_enc.shape[1] != d:
        raise UserInputError(f"{op}: W_enc must have shape [n_latents, {d}] to match x, got {tuple(W_enc.shape)}")
    if W_enc.dtype != x.dtype:
        raise ArgumentTypeError(f"{op}: W_enc must have the dtype of x ({x.dtype}), got {W_enc.dtype}")
    if b_enc.shape[0] != n:
        raise UserInputError(f"{op}: b_enc must have shape [{n}], got {tuple(b_enc.shape)}")
    if b_dec.shape[0] != d:
        raise UserInputError(f"{op}: b_dec must have shape [{d}], got {tuple(b_dec.shape)}")
    checks.int_in_range(op, "k", k, 1, n, expected=f"in [1, n_latents] = [1, {n}]")
    checks.int_in_range(op, "k_aux", k_aux, 0, n, expected=f"in [0, n_latents] = [0, {n}]")
    check_mask(op, dead_mask, n)
    check_same_device(op, x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec, dead_mask=dead_mask)
    checks.float_dtype(op, "compute_dtype", compute_dtype)
    cd = x.dtype if compute_dtype is None else compute_dtype
    if torch.float64 in (x.dtype, cd):
        return reference.topk_encode_ref(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, compute_dtype)
    # The kernel's operands: x - b_dec and W_enc in the product's dtype. With a compute_dtype, the centring is
    # done here in x's dtype and the kernel gets a zero b_dec; the rounded copies live for this call only.
    if cd != x.dtype:
        x_in, W_in = (x - b_dec).to(cd), W_enc.to(cd)
        b_dec = torch.zeros(d, dtype=cd, device=x.device)
    else:
        x_in, W_in = x, W_enc
    has_aux = dead_mask is not None and k_aux > 0
    # The kernel indexes the bias vectors with unit stride; b_enc keeps x's dtype (it is added in float32).
    b_enc = b_enc.contiguous()
    b_dec = b_dec.contiguous()
    device = x.device
    values = torch.empty((B, k), dtype=x.dtype, device=device)
    indices = torch.empty((B, k), dtype=torch.int64, device=device)
    aux_width = k_aux if has_aux else 0
    aux_values = torch.empty((B, aux_width), dtype=x.dtype, device=device)
    aux_indices = torch.empty((B, aux_width), dtype=torch.int64, device=device)
    if B == 0:
        return values, indices, aux_values, aux_indices

    if k > _MAX_FUSED_K or (has_aux and k_aux > _MAX_FUSED_K):
        xc = x_in - b_dec if cd == x.dtype else x_in
        values, indices, aux_values, aux_indices = _topk_encode_chunked(
            xc, W_in, b_enc, k, dead_mask if has_aux else None, k_aux, x.dtype
        )
        return values, record_bound(indices, n), aux_values, record_bound(aux_indices, n)

    k_pad = next_pow2(k)
    ka_pad = next_pow2(k_aux) if has_aux else 1
    block_b, block_n, block_d, num_warps = encode_blocks(B, d, k_pad, ka_pad)
    n_row_blocks = triton.cdiv(B, block_b)
    n_tiles = triton.cdiv(n, block_n)
    splits = min(n_tiles, max(1, triton.cdiv(target_programs(device), n_row_blocks)))
    latents_per_split = triton.cdiv(n_tiles, splits) * block_n
    splits = triton.cdiv(n, latents_per_split)

    part = torch.empty((B, splits, k_pad), dtype=torch.int64, device=device)
    if has_aux:
        aux_part = torch.empty((B, splits, ka_pad), dtype=torch.int64, device=device)
        dead_i8 = dead_mask.to(torch.int8)
    else:
        aux_part = part  # never touched: HAS_AUX is a compile-time False
        dead_i8 = part
    # fp32 stays fp32 in the product (TF32 would change which latents win near the k-th place).
    dot_in_fp32 = interpreting() and cd == torch.bfloat16
    precision = "ieee" if cd == torch.float32 or dot_in_fp32 else "tf32"
    _topk_encode_kernel[(n_row_blocks, splits)](
        x_in,
        W_in,
        b_enc,
        b_dec,
        dead_i8,
        part,
        aux_part,
        B,
        n,
        d,
        latents_per_split,
        splits,
        x_in.stride(0),
        x_in.stride(1),
        W_in.stride(0),
        W_in.stride(1),
        K_PAD=k_pad,
        KA_PAD=ka_pad,
        HAS_AUX=has_aux,
        BLOCK_B=block_b,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        INPUT_PRECISION=precision,
        DOT_IN_FP32=dot_in_fp32,
        num_warps=num_warps,
    )
    fin_block = 16
    _topk_finalize_kernel[(triton.cdiv(B, fin_block),)](
        part, values, indices, B, splits, k, K_PAD=k_pad, BLOCK_B=fin_block
    )
    if has_aux:
        _topk_finalize_kernel[(triton.cdiv(B, fin_block),)](
            aux_part, aux_values, aux_indices, B, splits, k_aux, K_PAD=ka_pad, BLOCK_B=fin_block
        )
    # The kernel only emits latents of [0, n) (an empty aux slot is latent 0): later ops need not check them.
    return values, record_bound(indices, n), aux_values, record_bound(aux_indices, n)
