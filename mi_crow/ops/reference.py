"""Plain-PyTorch references of the ``mi_crow`` ops: the specification, the fallback and the benchmark baseline.

Each function has exactly the signature of its op (see :mod:`mi_crow.ops.schemas`) and is differentiable by
ordinary autograd when called directly. Low-precision inputs are accumulated in float32 and the result is cast
back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Bounds the [chunk, k, d] temporary of gather_dot_ref, so the fallback never needs a [B*k, d] buffer at once.
_GATHER_CHUNK_ELEMENTS = 1 << 22


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def topk_encode_ref(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    dead_mask: Tensor | None,
    k_aux: int,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Encode and keep the top-k latents per token.

    ``pre = (x - b_dec) @ W_enc.T + b_enc`` and ``values = relu(topk(pre, k))`` sorted descending, with the
    precision contract every backend keeps: ``x - b_dec`` is computed in ``x.dtype``, then it and ``W_enc`` are
    rounded to the product's dtype (``compute_dtype``, or ``x.dtype`` when None); the product is accumulated in
    float32 (float64 for float64 operands), ``b_enc`` is added in that precision, the latents are ranked on that
    result, and only the values are rounded, to ``x.dtype``. (So bfloat16 inputs are ranked on float32
    pre-activations, not on ones rounded to bfloat16.)

    The auxiliary code is the top-``k_aux`` of ``pre`` among latents where ``dead_mask`` is True (ReLU applied).
    When fewer than ``k_aux`` latents are dead, the missing slots hold value 0 and index 0 (a padding slot has
    value 0, so it contributes nothing to a decode and receives no gradient).

    NaN ranks above every number, as in ``torch.topk``: a token whose pre-activations contain NaN gets its NaN
    latents first (values NaN; ReLU keeps NaN), then the best numbers; the indices of a row are distinct whatever
    its values (NaN, ``-inf``, ties). Which of several tied latents is chosen is not specified here (the fused
    kernels take the lower index).

    Args:
        x: ``[B, d]`` inputs.
        W_enc: ``[n, d]`` encoder weight.
        b_enc: ``[n]`` encoder bias.
        b_dec: ``[d]`` decoder bias, subtracted from ``x`` first.
        k: active latents per token, ``1 <= k <= n``.
        dead_mask: ``[n]`` bool or None.
        k_aux: auxiliary latents per token, ``0 <= k_aux <= n``.
        compute_dtype: dtype of the encoder product (None: ``x.dtype``).

    Returns:
        ``(values [B, k], indices [B, k] int64, aux_values [B, k_aux], aux_indices [B, k_aux] int64)``; the aux
        tensors are ``[B, 0]`` when ``k_aux == 0`` or ``dead_mask`` is None.
    """
    cd = x.dtype if compute_dtype is None else compute_dtype
    acc = _acc_dtype(cd)
    if cd == acc and x.dtype == acc:
        pre = (x - b_dec) @ W_enc.t() + b_enc
    else:
        # Exact widening of the rounded operands, so the product is the low-precision one accumulated in acc.
        xc = (x - b_dec).to(cd).to(acc)
        pre = xc @ W_enc.to(cd).to(acc).t() + b_enc.to(acc)
    top = pre.topk(k, dim=1, sorted=True)
    values = torch.relu(top.values).to(x.dtype)
    indices = top.indices
    B = x.shape[0]
    if dead_mask is None or k_aux == 0:
        return values, indices, x.new_empty((B, 0)), indices.new_empty((B, 0))
    # The top-k among the dead columns themselves (not over pre with live latents masked to -inf, which would
    # tie with a dead latent whose pre-activation is -inf); slots beyond the number of dead latents are padding.
    dead_idx = dead_mask.to(torch.bool).nonzero().squeeze(1)
    take = min(k_aux, int(dead_idx.numel()))
    aux = pre.index_select(1, dead_idx).topk(take, dim=1, sorted=True)
    aux_values = torch.cat([torch.relu(aux.values), pre.new_zeros((B, k_aux - take))], dim=1).to(x.dtype)
    aux_indices = torch.cat([dead_idx[aux.indices], indices.new_zeros((B, k_aux - take))], dim=1)
    return values, indices, aux_values, aux_indices


def sparse_decode_ref(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Decode a sparse code: ``x_hat[b] = b_dec + sum_j values[b, j] * W_dec[indices[b, j]]``.

    Args:
        values: ``[B, k']`` code values.
        indices: ``[B, k']`` int64 latent indices.
        W_dec: ``[n, d]`` decoder weight.
        b_dec: ``[d]`` decoder bias.

    Returns:
        ``[B, d]`` reconstruction in ``W_dec.dtype``.
    """
    acc = _acc_dtype(W_dec.dtype)
    if values.shape[1] == 0:
        return (b_dec.to(acc).expand(values.shape[0], -1)).to(W_dec.dtype).clone()
    out = F.embedding_bag(indices, W_dec.to(acc), per_sample_weights=values.to(acc), mode="sum")
    return (out + b_dec.to(acc)).to(W_dec.dtype)


def gather_dot_ref(grad_out: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """Dot each token's vector with its selected rows: ``out[b, j] = <grad_out[b], W[indices[b, j]]>``.

    This is the gradient of :func:`sparse_decode_ref` with respect to ``values``.

    Args:
        grad_out: ``[B, d]``.
        indices: ``[B, k]`` int64.
        W: ``[n, d]``.

    Returns:
        ``[B, k]`` in ``grad_out.dtype``.
    """
    acc = _acc_dtype(grad_out.dtype)
    B, k = indices.shape
    d = grad_out.shape[1]
    chunk = max(1, _GATHER_CHUNK_ELEMENTS // max(1, k * d))
    parts = []
    for start in range(0, B, chunk):
        rows = W[indices[start : start + chunk]].to(acc)  # [chunk, k, d]
        parts.append(torch.einsum("bkd,bd->bk", rows, grad_out[start : start + chunk].to(acc)))
    if not parts:
        return grad_out.new_empty((0, k))
    return torch.cat(parts).to(grad_out.dtype)


def scatter_rows_ref(coef: Tensor, indices: Tensor, x: Tensor, n: int) -> Tensor:
    """Scatter-add scaled token vectors into latent rows.

    ``out[i] = sum over (b, j) with indices[b, j] == i of coef[b, j] * x[b]``. With ``coef = values`` and
    ``x = grad_out`` this is the decoder-weight gradient of :func:`sparse_decode_ref`.

    Args:
        coef: ``[B, k]``.
        indices: ``[B, k]`` int64.
        x: ``[B, d]``.
        n: number of output rows.

    Returns:
        ``[n, d]`` in ``x.dtype``.
    """
    acc = _acc_dtype(x.dtype)
    out = torch.zeros((n, x.shape[1]), dtype=acc, device=x.device)
    xa = x.to(acc)
    ca = coef.to(acc)
    # One column of the code at a time keeps the temporary at [B, d] instead of [B*k, d].
    for j in range(indices.shape[1]):
        out = out.index_add(0, indices[:, j], xa * ca[:, j : j + 1])
    return out.to(x.dtype)


def sparse_decode_backward_ref(
    grad_out: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor
) -> tuple[Tensor, Tensor]:
    """Both gradients of :func:`sparse_decode_ref` given the output gradient.

    Composes the ``gather_dot`` and ``scatter_rows`` ops, so on a device with kernels for those it runs on them.

    Args:
        grad_out: ``[B, d]`` gradient of the reconstruction.
        values: ``[B, k]`` code values.
        indices: ``[B, k]`` int64.
        W_dec: ``[n, d]`` decoder weight.

    Returns:
        ``(grad_values [B, k], grad_W_dec [n, d])``.
    """
    grad_values = torch.ops.mi_crow.gather_dot(grad_out, indices, W_dec)
    grad_W = torch.ops.mi_crow.scatter_rows(values, indices, grad_out, W_dec.shape[0])
    return grad_values, grad_W


def sparse_decode_with_aux_ref(
    values: Tensor, indices: Tensor, aux_values: Tensor, aux_indices: Tensor, W_dec: Tensor, b_dec: Tensor
) -> tuple[Tensor, Tensor]:
    """The two decodes of an AuxK step from one decoder: the main code with the bias, the aux code without.

    ``x_hat[b] = b_dec + sum_j values[b, j] * W_dec[indices[b, j]]`` and
    ``aux_hat[b] = sum_j aux_values[b, j] * W_dec[aux_indices[b, j]]``. Calls the ``sparse_decode`` op twice,
    so on a device with a kernel for it this runs on that kernel. The point of the op is its backward
    (``sparse_decode_with_aux_backward``), which gives one decoder gradient for both codes.

    Args:
        values: ``[B, k]`` main code values.
        indices: ``[B, k]`` int64.
        aux_values: ``[B, k_aux]`` auxiliary code values.
        aux_indices: ``[B, k_aux]`` int64.
        W_dec: ``[n, d]`` decoder weight.
        b_dec: ``[d]`` decoder bias (used by ``x_hat`` only).

    Returns:
        ``(x_hat [B, d], aux_hat [B, d])`` in ``W_dec.dtype``.
    """
    x_hat = torch.ops.mi_crow.sparse_decode(values, indices, W_dec, b_dec)
    zero_bias = torch.zeros_like(b_dec)
    aux_hat = torch.ops.mi_crow.sparse_decode(aux_values, aux_indices, W_dec, zero_bias)
    return x_hat, aux_hat


def sparse_decode_with_aux_backward_ref(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    aux_grad_out: Tensor,
    aux_values: Tensor,
    aux_indices: Tensor,
    W_dec: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """All gradients of :func:`sparse_decode_with_aux_ref` given both output gradients (bias excluded).

    ``grad_values[b, j] = <grad_out[b], W_dec[indices[b, j]]>``,
    ``aux_grad_values[b, j] = <aux_grad_out[b], W_dec[aux_indices[b, j]]>``, and ``grad_W_dec`` sums the
    decoder-weight gradients of both codes. Composes two ``sparse_decode_backward`` calls and adds them.

    Args:
        grad_out: ``[B, d]`` gradient of ``x_hat``.
        values: ``[B, k]``.
        indices: ``[B, k]`` int64.
        aux_grad_out: ``[B, d]`` gradient of ``aux_hat``.
        aux_values: ``[B, k_aux]``.
        aux_indices: ``[B, k_aux]`` int64.
        W_dec: ``[n, d]`` decoder weight.

    Returns:
        ``(grad_values [B, k], aux_grad_values [B, k_aux], grad_W_dec [n, d])``.
    """
    grad_values, grad_W = torch.ops.mi_crow.sparse_decode_backward(grad_out, values, indices, W_dec)
    aux_grad_values, aux_grad_W = torch.ops.mi_crow.sparse_decode_backward(
        aux_grad_out, aux_values, aux_indices, W_dec
    )
    return grad_values, aux_grad_values, grad_W + aux_grad_W
