"""The top-k network of the fused encode: sortable int64 keys and a bitonic top-k over them, in registers.

So that a network over plain integers carries indices, each candidate is packed into one int64 key: the float's
bits mapped to an order-preserving int32 in the high word, ``INT32_MAX - index`` in the low word (ties go to the
lower index, as a stable descending sort would). NaN ranks above every number.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def float_to_key(pre, cols):
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
def sorted_topk(x, K: tl.constexpr, DESCENDING: tl.constexpr):
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
def merge_sorted(best, cand_ascending):
    """Top-K, sorted descending, of the union of best [R, K] (descending) and cand_ascending [R, K]."""
    R: tl.constexpr = best.shape[0]
    K: tl.constexpr = best.shape[1]
    # max of a descending and an ascending run is exactly the K largest of the union, as a bitonic run.
    top = tl.maximum(best, cand_ascending)
    n_dims: tl.constexpr = _log2(R * K)
    h = _bitonic_stage(tl.reshape(top, [2] * n_dims), n_dims, _log2(K), 1)
    return tl.reshape(h, [R, K])


@triton.jit
def merge_topk(best, keys, K: tl.constexpr):
    """Top-K (sorted descending) of the union of a running buffer best [R, K] and candidates keys [R, C >= K]."""
    return merge_sorted(best, sorted_topk(keys, K, False))
