"""Public functional API of the accelerated TopK SAE ops.

These wrappers validate arguments (:mod:`mi_crow.ops.checks`: the package's ``ArgumentTypeError`` /
``UserInputError``, so ``TypeError``/``ValueError``, naming the op, the argument and the value) and call the
``mi_crow`` custom ops; the dispatcher picks the kernel from the tensors' device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.ops import checks
from mi_crow.ops.index_bounds import known_in_range, record_bound

class TopKCode(NamedTuple):
    """A sparse TopK code.

    Attributes:
        values: ``[tokens, k]`` after ReLU (may be 0), sorted descending per row.
        indices: ``[tokens, k]`` int64 latent indices.
        aux_values: ``[tokens, k_aux]`` top-k_aux among the dead latents (after ReLU), or None.
        aux_indices: ``[tokens, k_aux]`` int64, or None. Padding slots (fewer dead latents than ``k_aux``) hold
            value 0 and index 0.
    """

    values: Tensor
    indices: Tensor
    aux_values: Tensor | None = None
    aux_indices: Tensor | None = None


def _check_code(fn: str, prefix: str, values: object, indices: object) -> None:
    # A sparse code: float values [tokens, k] and int64 indices of the same shape; prefix is "" or "aux_".
    v = checks.tensor(fn, f"{prefix}values", values, 2, floating=True)
    i = checks.tensor(fn, f"{prefix}indices", indices, 2)
    if i.dtype != torch.int64:
        raise ArgumentTypeError(f"{fn}: {prefix}indices must have dtype torch.int64, got {i.dtype}")
    if i.shape != v.shape:
        raise UserInputError(
            f"{fn}: {prefix}indices must have the shape of {prefix}values {tuple(v.shape)}, got {tuple(i.shape)}"
        )


def _check_index_range(fn: str, name: str, indices: Tensor, n: int) -> None:
    # On CPU only: on an accelerator it would force a device sync on every call (the launchers check there). Skipped
    # for indices an op produced or checked and nobody wrote to since (mi_crow.ops.index_bounds).
    if (
        indices.device.type == "cpu"
        and indices.numel() > 0
        and not torch.compiler.is_compiling()
        and not known_in_range(indices, n)
    ):
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise UserInputError(f"{fn}: {name} must lie in [0, {n}) (n_latents of W_dec), got {bad}")
        record_bound(indices, n)


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    *,
    compute_dtype: torch.dtype | None = None,
) -> TopKCode:
    """Fused encode + top-k: ``relu(topk((x - b_dec) @ W_enc.T + b_enc, k))``.

    Precision, the same on every backend: the biases are cast to ``x.dtype``; ``x - b_dec`` is computed in
    ``x.dtype``, then it and ``W_enc`` are rounded to the product's dtype (``compute_dtype``, or ``x.dtype``);
    the product is accumulated in float32, ``b_enc`` added in float32, the latents ranked on that float32
    result, and only the values rounded, once, to ``x.dtype``. So fp32 master weights with
    ``compute_dtype=torch.bfloat16`` run a bf16 product (AMX on CPUs that have it) and get fp32 values; the
    low-precision copies are not kept for backward, and every gradient is computed in ``x.dtype``. On the fused
    kernels the full ``[tokens, n_latents]`` pre-activation matrix is never materialised. Differentiable w.r.t.
    ``x``, ``W_enc``, ``b_enc`` and ``b_dec`` through ``values`` and ``aux_values``.

    Ranking, the same on every backend: larger first, and NaN above every number, as in ``torch.topk``. A token
    whose pre-activations contain NaN gets its NaN latents first (their values NaN: the ReLU keeps NaN, as
    ``torch.relu`` does), then its best numbers; ``-inf`` entries fill the remaining slots (value 0) when nothing
    better is left. The ``k`` indices of a row are always distinct latents. The fused kernels break ties, NaN
    with NaN included, by the lower latent index (a stable descending sort); the reference leaves the order of
    ties to ``torch.topk``. The aux code follows the same rule among the dead latents.

    Args:
        x: ``[tokens, d_in]`` inputs (callers flatten leading dimensions).
        W_enc: ``[n_latents, d_in]`` encoder weight, same dtype as ``x``.
        b_enc: ``[n_latents]`` encoder bias.
        b_dec: ``[d_in]`` decoder bias, subtracted from ``x`` before encoding.
        k: active latents per token, ``1 <= k <= n_latents``.
        dead_mask: optional ``[n_latents]`` bool, True for dead latents (for the AuxK loss).
        k_aux: auxiliary latents per token chosen among dead latents, ``0 <= k_aux <= n_latents``.
        compute_dtype: dtype of the encoder product: float32, bfloat16, float16, float64 or None (``x.dtype``).

    Returns:
        :class:`TopKCode` with ``values``/``indices`` ``[tokens, k]`` and, when ``dead_mask`` is given and
        ``k_aux > 0``, ``aux_values``/``aux_indices`` ``[tokens, k_aux]`` (else None).
    """
    fn = "topk_encode"
    for name, t, ndim in (("x", x, 2), ("W_enc", W_enc, 2), ("b_enc", b_enc, 1), ("b_dec", b_dec, 1)):
        checks.tensor(fn, name, t, ndim, floating=True)
    n, d = W_enc.shape
    if x.shape[1] != d:
        raise UserInputError(
            f"{fn}: x must have d_in = W_enc.shape[1] = {d} columns, got x of shape {tuple(x.shape)}"
        )
    if b_enc.shape[0] != n:
        raise UserInputError(f"{fn}: b_enc must have shape [{n}] (n_latents), got {tuple(b_enc.shape)}")
    if b_dec.shape[0] != d:
        raise UserInputError(f"{fn}: b_dec must have shape [{d}] (d_in), got {tuple(b_dec.shape)}")
    if W_enc.dtype != x.dtype:
        raise ArgumentTypeError(
            f"{fn}: W_enc must have the dtype of x ({x.dtype}) because the product runs in x.dtype, "
            f"got {W_enc.dtype}; cast one of them"
        )
    checks.int_in_range(fn, "k", k, 1, n)
    checks.int_in_range(fn, "k_aux", k_aux, 0, n)
    if dead_mask is not None:
        if not isinstance(dead_mask, Tensor):
            raise ArgumentTypeError(
                f"{fn}: dead_mask must be a bool Tensor or None, got {type(dead_mask).__name__}"
            )
        if dead_mask.dtype != torch.bool:
            raise ArgumentTypeError(f"{fn}: dead_mask must have dtype torch.bool, got {dead_mask.dtype}")
        if dead_mask.shape != (n,):
            raise UserInputError(f"{fn}: dead_mask must have shape [{n}] (n_latents), got {tuple(dead_mask.shape)}")
    checks.same_device(fn, "x", x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec, dead_mask=dead_mask)
    checks.float_dtype(fn, "compute_dtype", compute_dtype)
    if b_enc.dtype != x.dtype:
        b_enc = b_enc.to(x.dtype)
    if b_dec.dtype != x.dtype:
        b_dec = b_dec.to(x.dtype)
    if dead_mask is None or k_aux == 0:
        dead_mask, k_aux = None, 0
    if compute_dtype == x.dtype:
        compute_dtype = None
    values, indices, aux_values, aux_indices = torch.ops.mi_crow.topk_encode(
        x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, compute_dtype
    )
    if not torch.compiler.is_compiling():
        # Every backend emits latents of [0, n) (an empty aux slot is latent 0): the decodes need not check them.
        record_bound(indices, n)
        record_bound(aux_indices, n)
    if dead_mask is None:
        return TopKCode(values, indices, None, None)
    return TopKCode(values, indices, aux_values, aux_indices)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Sparse decode: ``x_hat[b] = b_dec + sum_j values[b, j] * W_dec[indices[b, j]]``.

    Gathers ``k'`` decoder rows per token instead of a dense ``[tokens, n_latents] @ W_dec`` product. Values
    and ``b_dec`` are cast to ``W_dec.dtype``. Differentiable w.r.t. ``values``, ``W_dec`` and ``b_dec``; the
    decoder-weight gradient is a scatter-add over the active rows only.

    Args:
        values: ``[tokens, k']`` code values (any ``k'``, e.g. a modified code with extra latents).
        indices: ``[tokens, k']`` int64 latent indices in ``[0, n_latents)``.
        W_dec: ``[n_latents, d_in]`` decoder weight.
        b_dec: ``[d_in]`` decoder bias.

    Returns:
        ``[tokens, d_in]`` reconstruction in ``W_dec.dtype``.
    """
    fn = "sparse_decode"
    _check_code(fn, "", values, indices)
    checks.tensor(fn, "W_dec", W_dec, 2, floating=True)
    checks.tensor(fn, "b_dec", b_dec, 1, floating=True)
    if b_dec.shape[0] != W_dec.shape[1]:
        raise UserInputError(f"{fn}: b_dec must have shape [{W_dec.shape[1]}] (d_in), got {tuple(b_dec.shape)}")
    checks.same_device(fn, "W_dec", W_dec, values=values, indices=indices, b_dec=b_dec)
    _check_index_range(fn, "indices", indices, W_dec.shape[0])
    if values.dtype != W_dec.dtype:
        values = values.to(W_dec.dtype)
    if b_dec.dtype != W_dec.dtype:
        b_dec = b_dec.to(W_dec.dtype)
    return torch.ops.mi_crow.sparse_decode(values, indices, W_dec, b_dec)


class DecodeWithAux(NamedTuple):
    """The two reconstructions of an AuxK step.

    Attributes:
        x_hat: ``[tokens, d_in]`` decode of the main code, with the decoder bias.
        aux_hat: ``[tokens, d_in]`` decode of the auxiliary code, without the bias (it reconstructs a residual).
    """

    x_hat: Tensor
    aux_hat: Tensor


def sparse_decode_with_aux(
    values: Tensor, indices: Tensor, aux_values: Tensor, aux_indices: Tensor, W_dec: Tensor, b_dec: Tensor
) -> DecodeWithAux:
    """Decode a main and an auxiliary (AuxK) code with one decoder, with one decoder gradient for both.

    ``x_hat[b] = b_dec + sum_j values[b, j] * W_dec[indices[b, j]]`` and
    ``aux_hat[b] = sum_j aux_values[b, j] * W_dec[aux_indices[b, j]]``: the same numbers as two
    :func:`sparse_decode` calls (the second with a zero bias). The difference is the backward: one fused op
    visits each decoder row once for the slots of both codes and writes a single ``[n_latents, d_in]`` gradient,
    where two decodes would build two dense gradients and add them. Values and ``b_dec`` are cast to
    ``W_dec.dtype``. Differentiable w.r.t. ``values``, ``aux_values``, ``W_dec`` and ``b_dec``.

    Args:
        values: ``[tokens, k]`` main code values.
        indices: ``[tokens, k]`` int64 latent indices in ``[0, n_latents)``.
        aux_values: ``[tokens, k_aux]`` auxiliary code values (``k_aux`` may be 0).
        aux_indices: ``[tokens, k_aux]`` int64 latent indices in ``[0, n_latents)``.
        W_dec: ``[n_latents, d_in]`` decoder weight.
        b_dec: ``[d_in]`` decoder bias (added to ``x_hat`` only).

    Returns:
        :class:`DecodeWithAux` ``(x_hat, aux_hat)``, both ``[tokens, d_in]`` in ``W_dec.dtype``.
    """
    fn = "sparse_decode_with_aux"
    _check_code(fn, "", values, indices)
    _check_code(fn, "aux_", aux_values, aux_indices)
    checks.tensor(fn, "W_dec", W_dec, 2, floating=True)
    checks.tensor(fn, "b_dec", b_dec, 1, floating=True)
    if aux_values.shape[0] != values.shape[0]:
        raise UserInputError(
            f"{fn}: aux_values must have {values.shape[0]} rows (the tokens of values), "
            f"got shape {tuple(aux_values.shape)}"
        )
    if b_dec.shape[0] != W_dec.shape[1]:
        raise UserInputError(f"{fn}: b_dec must have shape [{W_dec.shape[1]}] (d_in), got {tuple(b_dec.shape)}")
    checks.same_device(
        fn, "W_dec", W_dec, values=values, indices=indices, aux_values=aux_values, aux_indices=aux_indices, b_dec=b_dec
    )
    _check_index_range(fn, "indices", indices, W_dec.shape[0])
    _check_index_range(fn, "aux_indices", aux_indices, W_dec.shape[0])
    if values.dtype != W_dec.dtype:
        values = values.to(W_dec.dtype)
    if aux_values.dtype != W_dec.dtype:
        aux_values = aux_values.to(W_dec.dtype)
    if b_dec.dtype != W_dec.dtype:
        b_dec = b_dec.to(W_dec.dtype)
    x_hat, aux_hat = torch.ops.mi_crow.sparse_decode_with_aux(values, indices, aux_values, aux_indices, W_dec, b_dec)
    return DecodeWithAux(x_hat, aux_hat)
