"""Triton kernels for the ``mi_crow`` SAE ops (the CUDA implementations).

Each op has a ``_<op>_kernel`` Triton kernel and a ``<op>_triton`` launcher with exactly the op's schema
signature: plain functions that take and return tensors. ``mi_crow.ops`` registers the launchers for the CUDA
dispatch key; importing this module requires ``triton`` (the registration code imports it inside ``try``).

The launchers accept CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` is set before triton is imported
(that is how the kernels are checked on machines without a GPU). Float tensors may be float32, bfloat16 or
float16; every kernel accumulates in float32. Output dtypes follow the references in :mod:`mi_crow.ops.reference`.
float64 inputs (used by ``gradcheck``) are served by those references, since the kernels rank and accumulate in
float32.

Design notes (why the kernels look the way they do):

* ``topk_encode`` never materialises the ``[tokens, n_latents]`` pre-activation matrix. A program owns a block of
  rows and a contiguous slice of latents; it computes one ``[BLOCK_B, BLOCK_N]`` tile of pre-activations at a
  time with ``tl.dot`` and merges the tile into a running top-k buffer held in registers. So that a bitonic
  network over plain integers carries indices, each candidate is packed into one int64 key: the float's bits
  mapped to an order-preserving int32 in the high word, ``INT32_MAX - index`` in the low word (ties go to the
  lower index, as a stable descending sort would). A merge takes the tile's own top-k (bitonic top-k) and
  combines it with the running buffer by one bitonic merge. A tile whose best candidate cannot enter any row's
  buffer skips the merge. When there are few row blocks, the latents are split across programs (for occupancy)
  and a second small kernel merges the ``[tokens, splits, K_PAD]`` candidate keys — ``splits * K_PAD`` keys per
  token, far below ``n_latents``. The optional AuxK top-k among dead latents is a second buffer filled in the
  same pass. A tile holds at most 2048 keys (16 rows minimum), and k, k_aux at most 256: beyond that, register
  use and the unrolled network outgrow the GPU, and a chunked PyTorch path with ``[tokens, 4096]`` scratch serves
  the call.
* ``scatter_rows`` is deterministic: the launcher sorts the ``(token, slot)`` pairs by latent (a stable sort of
  ``tokens * k`` indices), and one program per (latent, column block) sums its contiguous segment in a fixed
  order. No atomics, so results are bit-for-bit reproducible.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mi_crow.ops import reference

__all__ = [
    "topk_encode_triton",
    "sparse_decode_triton",
    "gather_dot_triton",
    "scatter_rows_triton",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Largest k (and k_aux) the fused encode keeps in registers. Beyond it the sorting network's unrolled code and
# register footprint grow past what compiles in reasonable time, so a chunked PyTorch path serves the call.
_MAX_FUSED_K = 256
# Latents per matrix product on the chunked path: bounds its scratch to [tokens, _CHUNK_LATENTS].
_CHUNK_LATENTS = 4096
# Keys per [BLOCK_B, BLOCK_N] tile held by one program of the fused encode (int64 each).
_TILE_KEYS = 2048


# --------------------------------------------------------------------------------------------------------------
# Input checks shared by the launchers
# --------------------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_tensor(op: str, name: str, t: object, ndim: int, *, floating: bool) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if floating and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if not floating and t.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be int64, got {t.dtype}")
    if not t.is_cuda and not _interpreting():
        raise ValueError(
            f"{op}: {name} must be a CUDA tensor (or run with TRITON_INTERPRET=1 for CPU tensors), "
            f"got device {t.device}"
        )
    return t


def _check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


def _check_index_range(op: str, name: str, indices: torch.Tensor, n: int) -> None:
    # One reduction and one host sync: an out-of-range index would otherwise be an illegal memory access.
    if indices.numel() == 0:
        return
    lo, hi = torch.aminmax(indices)
    lo_i, hi_i = int(lo), int(hi)
    if lo_i < 0 or hi_i >= n:
        raise ValueError(f"{op}: {name} must lie in [0, {n}), got values in [{lo_i}, {hi_i}]")


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    # Interpreter: a few programs are enough to exercise the split-and-merge path.
    return 4


# --------------------------------------------------------------------------------------------------------------
# topk_encode
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """Round float32 v to dtype, to nearest even, and return it in dtype."""
    if dtype == tl.bfloat16:
        # Done on the bits because the interpreter truncates float32 -> bfloat16 casts; a GPU rounds to nearest
        # even, which is what this computes, so both paths agree with PyTorch's rounding. (A NaN is passed through:
        # adding the rounding bias to its bits could carry into the sign.)
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True)).to(dtype)
    else:
        return v.to(dtype)


@triton.jit
def _float_to_key(pre, cols):
    """Pack float32 values [R, C] and int latent indices [C] into order-preserving int64 keys [R, C].

    Every NaN (either sign, any payload) becomes the positive quiet NaN, whose key lies above that of +inf, so NaN
    ranks first as in torch.topk and NaNs tie (the lower index wins); -0.0 becomes +0.0 so the zeros tie too.
    """
    bits = pre.to(tl.int32, bitcast=True)
    bits = tl.where(pre != pre, 0x7FC00000, bits)
    bits = tl.where(bits == -(2**31), 0, bits)
    # Negative floats order backwards as integers; flipping their magnitude bits fixes that.
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    low = (0x7FFFFFFF - cols).to(tl.int64)
    return (ordered.to(tl.int64) << 32) | low[None, :]


# The top-k below is a bitonic network on a [2] * log2(size) "hypercube" view of a [rows, cols] block: bit j
# of a flat position is one axis, and a compare-and-swap across bit j is a max and a min over that size-2 axis.
# (Triton's own tl.sort/tl.topk pair partners with an xor reduction, which the interpreter evaluates one element
# at a time in Python; max/min reductions stay vectorised there and compile to the same shuffles on a GPU.)


@triton.constexpr_function
def _log2(v):
    return int(v).bit_length() - 1


@triton.jit
def _bit(n_dims: tl.constexpr, j: tl.constexpr):
    """0/1 along the axis of bit j of a hypercube with n_dims axes (broadcastable)."""
    return tl.reshape(tl.arange(0, 2), [1] * (n_dims - 1 - j) + [2] + [1] * j)


@triton.jit
def _compare_swap(h, n_dims: tl.constexpr, j: tl.constexpr, flip):
    """Order each pair differing in bit j: ascending where flip == 0, descending where flip == 1."""
    axis: tl.constexpr = n_dims - 1 - j
    hi = tl.max(h, axis=axis, keep_dims=True)
    lo = tl.min(h, axis=axis, keep_dims=True)
    return tl.where((_bit(n_dims, j) ^ flip) != 0, hi, lo)


@triton.jit
def _bitonic_stage(h, n_dims: tl.constexpr, s: tl.constexpr, flip):
    """Sort every bitonic run of 2**s consecutive elements (direction per element from flip)."""
    for i in tl.static_range(s):
        h = _compare_swap(h, n_dims, s - 1 - i, flip)
    return h


@triton.jit
def _sorted_topk(x, K: tl.constexpr, DESCENDING: tl.constexpr):
    """Top-K of each row of x [R, C] (R, C, K powers of two, K <= C), sorted in the requested direction."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    n_dims: tl.constexpr = _log2(R * C)
    log_c: tl.constexpr = _log2(C)
    log_k: tl.constexpr = _log2(K)
    h = tl.reshape(x, [2] * n_dims)
    # Sort runs of K, alternating ascending/descending by bit log_k so that neighbouring runs form bitonic pairs
    # (or in the final direction when one run is the whole row).
    for s in tl.static_range(1, log_k + 1):
        if s < log_c:
            h = _bitonic_stage(h, n_dims, s, _bit(n_dims, s))
        else:
            h = _bitonic_stage(h, n_dims, s, DESCENDING)
    # Halve the row until K remain: the elementwise max of an ascending and a descending run holds the K largest
    # of the pair as a bitonic run, which one merge stage sorts again.
    # (A constexpr cannot be rebound inside a static loop, hence the repeated n_dims - r - 1.)
    for r in tl.static_range(log_c - log_k):
        h = tl.max(h, axis=n_dims - r - 1 - log_k)
        if r + 1 < log_c - log_k:
            h = _bitonic_stage(h, n_dims - r - 1, log_k, _bit(n_dims - r - 1, log_k))
        else:
            h = _bitonic_stage(h, n_dims - r - 1, log_k, DESCENDING)
    return tl.reshape(h, [R, K])


@triton.jit
def _merge_sorted(best, cand_ascending):
    """Top-K, sorted descending, of the union of best [R, K] (descending) and cand_ascending [R, K]."""
    R: tl.constexpr = best.shape[0]
    K: tl.constexpr = best.shape[1]
    # max of a descending and an ascending run is exactly the K largest of the union, as a bitonic run.
    top = tl.maximum(best, cand_ascending)
    n_dims: tl.constexpr = _log2(R * K)
    h = _bitonic_stage(tl.reshape(top, [2] * n_dims), n_dims, _log2(K), 1)
    return tl.reshape(h, [R, K])


@triton.jit
def _merge_topk(best, keys, K: tl.constexpr):
    """Top-K (sorted descending) of the union of a running buffer best [R, K] and candidates keys [R, C >= K]."""
    return _merge_sorted(best, _sorted_topk(keys, K, False))


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
            xc = _round_to(xt - bd[None, :], dtype)
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
        keys = _float_to_key(pre, cols)
        keys = tl.where(col_mask[None, :], keys, -(2**63))

        # Skip the merge when no candidate of this tile beats any (real) row's current k-th best. Empty slots hold
        # the smallest int64, below every real key (even -inf or NaN ones), so a buffer fills first.
        tile_best = tl.max(keys, axis=1)
        row_floor = tl.min(best, axis=1)
        if tl.max(((tile_best > row_floor) & row_mask).to(tl.int32), axis=0) > 0:
            best = _merge_topk(best, keys, K_PAD)
        if HAS_AUX:
            dead = tl.load(dead_ptr + cols, mask=col_mask, other=0)
            aux_keys = tl.where((dead != 0)[None, :], keys, -(2**63))
            aux_tile_best = tl.max(aux_keys, axis=1)
            aux_floor = tl.min(aux_best, axis=1)
            if tl.max(((aux_tile_best > aux_floor) & row_mask).to(tl.int32), axis=0) > 0:
                aux_best = _merge_topk(aux_best, aux_keys, KA_PAD)

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
        best = _merge_sorted(best, cand)

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
    out_val = _round_to(val, values_ptr.dtype.element_ty)
    tl.store(values_ptr + rows[:, None] * k + kk[None, :], out_val, mask=out_mask)
    tl.store(indices_ptr + rows[:, None] * k + kk[None, :], idx, mask=out_mask)


def _encode_blocks(B: int, d: int, k_pad: int, ka_pad: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_D, num_warps) of the fused encode for a problem size.

    Chosen from ptxas resource reports (cuobjdump -res-usage) of sm_80/sm_90 builds: with 4 warps the sorting
    network's keys spilled to local memory (255 registers and a stack at k = 32; minutes of ptxas at k = 128),
    with 8 warps and 32-wide d chunks the k <= 128 configurations fit in registers.
    """
    block_n = max(64, k_pad, ka_pad)  # a tile's own top-k needs at least K_PAD candidates
    block_b = 16 if B <= 16 else max(16, min(32, _TILE_KEYS // block_n))  # tl.dot needs >= 16 rows
    block_d = min(32, max(16, _next_pow2(d)))
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
    _check_tensor(op, "x", x, 2, floating=True)
    _check_tensor(op, "W_enc", W_enc, 2, floating=True)
    _check_tensor(op, "b_enc", b_enc, 1, floating=True)
    _check_tensor(op, "b_dec", b_dec, 1, floating=True)
    B, d = x.shape
    n = W_enc.shape[0]
    if W_enc.shape[1] != d:
        raise ValueError(f"{op}: W_enc must have shape [n_latents, {d}] to match x, got {tuple(W_enc.shape)}")
    if W_enc.dtype != x.dtype:
        raise TypeError(f"{op}: W_enc must have the dtype of x ({x.dtype}), got {W_enc.dtype}")
    if b_enc.shape[0] != n:
        raise ValueError(f"{op}: b_enc must have shape [{n}], got {tuple(b_enc.shape)}")
    if b_dec.shape[0] != d:
        raise ValueError(f"{op}: b_dec must have shape [{d}], got {tuple(b_dec.shape)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{op}: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"{op}: k must be in [1, n_latents] = [1, {n}], got {k}")
    if isinstance(k_aux, bool) or not isinstance(k_aux, int):
        raise TypeError(f"{op}: k_aux must be an int, got {type(k_aux).__name__}")
    if not 0 <= k_aux <= n:
        raise ValueError(f"{op}: k_aux must be in [0, n_latents] = [0, {n}], got {k_aux}")
    if dead_mask is not None:
        if not isinstance(dead_mask, torch.Tensor):
            raise TypeError(f"{op}: dead_mask must be a torch.Tensor or None, got {type(dead_mask).__name__}")
        if dead_mask.dtype != torch.bool or dead_mask.shape != (n,):
            raise ValueError(
                f"{op}: dead_mask must be a bool tensor of shape [{n}], "
                f"got {dead_mask.dtype} of shape {tuple(dead_mask.shape)}"
            )
        _check_same_device(op, x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec, dead_mask=dead_mask)
    else:
        _check_same_device(op, x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec)

    if compute_dtype is not None and compute_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: compute_dtype must be float32, bfloat16, float16, float64 or None, got {compute_dtype}")
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
        return _topk_encode_chunked(xc, W_in, b_enc, k, dead_mask if has_aux else None, k_aux, x.dtype)

    k_pad = _next_pow2(k)
    ka_pad = _next_pow2(k_aux) if has_aux else 1
    block_b, block_n, block_d, num_warps = _encode_blocks(B, d, k_pad, ka_pad)
    n_row_blocks = triton.cdiv(B, block_b)
    n_tiles = triton.cdiv(n, block_n)
    splits = min(n_tiles, max(1, triton.cdiv(_target_programs(device), n_row_blocks)))
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
    dot_in_fp32 = _interpreting() and cd == torch.bfloat16
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
    return values, indices, aux_values, aux_indices


# --------------------------------------------------------------------------------------------------------------
# sparse_decode and gather_dot
# --------------------------------------------------------------------------------------------------------------


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
    tl.store(out_ptr + row * d + dd, _round_to(acc, out_ptr.dtype.element_ty), mask=d_mask)


def _check_code(op: str, values: torch.Tensor, indices: torch.Tensor) -> None:
    _check_tensor(op, "values", values, 2, floating=True)
    _check_tensor(op, "indices", indices, 2, floating=False)
    if values.shape != indices.shape:
        raise ValueError(
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
    _check_tensor(op, "W_dec", W_dec, 2, floating=True)
    _check_tensor(op, "b_dec", b_dec, 1, floating=True)
    n, d = W_dec.shape
    if b_dec.shape[0] != d:
        raise ValueError(f"{op}: b_dec must have shape [{d}] to match W_dec, got {tuple(b_dec.shape)}")
    _check_same_device(op, values=values, indices=indices, W_dec=W_dec, b_dec=b_dec)
    _check_index_range(op, "indices", indices, n)
    if torch.float64 in (values.dtype, W_dec.dtype, b_dec.dtype):
        return reference.sparse_decode_ref(values, indices, W_dec, b_dec)
    B, K = values.shape
    b_dec = b_dec.contiguous()
    out = torch.empty((B, d), dtype=W_dec.dtype, device=values.device)
    if B == 0 or d == 0:
        return out
    block_d = min(128, max(16, _next_pow2(d)))
    block_k = min(32, max(1, _next_pow2(K)))
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
    tl.store(out_ptr + row * K + kk, _round_to(acc, out_ptr.dtype.element_ty), mask=k_mask)


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
    _check_tensor(op, "grad_out", grad_out, 2, floating=True)
    _check_tensor(op, "indices", indices, 2, floating=False)
    _check_tensor(op, "W", W, 2, floating=True)
    B, d = grad_out.shape
    if indices.shape[0] != B:
        raise ValueError(f"{op}: indices must have {B} rows to match grad_out, got shape {tuple(indices.shape)}")
    if W.shape[1] != d:
        raise ValueError(f"{op}: W must have shape [n_latents, {d}] to match grad_out, got {tuple(W.shape)}")
    _check_same_device(op, grad_out=grad_out, indices=indices, W=W)
    n = W.shape[0]
    _check_index_range(op, "indices", indices, n)
    if torch.float64 in (grad_out.dtype, W.dtype):
        return reference.gather_dot_ref(grad_out, indices, W)
    K = indices.shape[1]
    out = torch.empty((B, K), dtype=grad_out.dtype, device=grad_out.device)
    if B == 0 or K == 0:
        return out
    block_k = min(32, max(1, _next_pow2(K)))
    block_d = min(128, max(16, _next_pow2(d)))
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


# --------------------------------------------------------------------------------------------------------------
# scatter_rows
# --------------------------------------------------------------------------------------------------------------


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
    tl.store(out_ptr + latent * d + dd, _round_to(acc, out_ptr.dtype.element_ty), mask=d_mask)


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
    _check_tensor(op, "coef", coef, 2, floating=True)
    _check_tensor(op, "indices", indices, 2, floating=False)
    _check_tensor(op, "x", x, 2, floating=True)
    if coef.shape != indices.shape:
        raise ValueError(
            f"{op}: coef and indices must have the same shape, got {tuple(coef.shape)} and {tuple(indices.shape)}"
        )
    if x.shape[0] != coef.shape[0]:
        raise ValueError(f"{op}: x must have {coef.shape[0]} rows to match coef, got shape {tuple(x.shape)}")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{op}: n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"{op}: n must be >= 0, got {n}")
    _check_same_device(op, coef=coef, indices=indices, x=x)
    _check_index_range(op, "indices", indices, n)
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
    block_d = min(128, max(16, _next_pow2(d)))
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
