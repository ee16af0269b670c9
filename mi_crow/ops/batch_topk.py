"""BatchTopK selection on the fused encode: the ``k * B`` largest activations of a whole batch, never ``[B, n]``.

`batch_topk_encode` runs the fused `topk_encode` with ``c`` candidates per token (default ``4 k``), selects the
``K = k * B`` largest of the ``B * c`` candidate values in one global selection, and keeps per token the prefix of
its (descending) candidate list that was selected.

Why the candidate lists suffice (the bound): let ``tau`` be the ``K``-th largest candidate value. A token whose
``c``-th (last) candidate is *not* selected has every selected value among its candidates, and any latent it did not
list is ``<=`` its last candidate ``<= tau``, so the per-token lists contain a valid global top-``K``. A token
whose last candidate *is* selected and positive ("saturated") might hold more than ``c`` of the batch's winners:
only those tokens are encoded again with twice the candidates, and the global selection is redone, until no token is
saturated or ``c = n``. The result is therefore exact (equal to the dense top-``K`` up to the order of ties).
Since a saturated token holds ``c`` of the ``K`` winners, at most ``K / c = B k / c`` tokens are saturated at
width ``c`` (a quarter of the batch at the default ``c = 4k``), so the refinement costs at most about as much again
as the first encode, and usually nothing. Memory: the ``[B, c]`` candidate lists. Measured on SmolLM2-135M's
layer 15 (a BatchTopK SAE with n = 4608, k = 32 trained there, batches of 1024 tokens): a token's share of the
batch's winners has median 28, 90th percentile 54, 99th 83 and maximum 112, so ``4k = 128`` candidates needed no
refinement, and ``2k`` needed one and was no faster (0.155 s against 0.139 s per encode; per-token top-32: 0.126 s).

Gradients flow to ``x``, ``W_enc``, ``b_enc`` and ``b_dec`` through the selected values only, with the same
formulas as `topk_encode`'s backward (a sparse ``scatter_rows`` for ``W_enc``), on the same kernels. The Triton
path is this same composition over the CUDA kernels of ``topk_encode``/``scatter_rows``/``sparse_decode``, with the
global selection on its own Triton kernel (`mi_crow.ops.triton.batch_select`: a radix bisection for the ``K``-th
largest candidate, then per-token counts; no sort of the ``B * c`` candidates). ``encode_fn`` and ``select_fn``
let a test run both on the interpreted Triton launchers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.ops import checks

__all__ = ["BatchTopKCode", "batch_topk_encode", "batch_topk_ref", "batch_topk_select"]

# The first candidate width is this many times k (see the module docstring for why any width is exact).
DEFAULT_CANDIDATE_FACTOR = 4


class BatchTopKCode(NamedTuple):
    """The BatchTopK code of a batch.

    Attributes:
        values: ``[B, w]`` selected activations (after ReLU), sorted descending per token, 0 in unused slots; ``w``
            is the largest number of winners of a token (at least 1). Differentiable.
        indices: ``[B, w]`` int64 latent indices; those of a token's selected slots are distinct, an unused slot
            (value 0) may repeat one.
        threshold: 0-d, the smallest selected value that is positive (NaN when none is): what the running
            threshold estimate averages.
        aux_values: ``[B, k_aux]`` AuxK code among the dead latents, or None (differentiable).
        aux_indices: ``[B, k_aux]`` int64, or None.
        refinements: how many times saturated tokens were encoded again with more candidates.
    """

    values: Tensor
    indices: Tensor
    threshold: Tensor
    aux_values: Tensor | None = None
    aux_indices: Tensor | None = None
    refinements: int = 0


def batch_topk_select(values: Tensor, total: int) -> Tensor:
    """Per-token counts of the ``total`` largest entries of ``values [B, c]`` (each row sorted descending).

    Returns:
        ``[B]`` int64 counts: token ``b`` keeps its first ``counts[b]`` candidates; the counts sum to ``total``.
    """
    flat = values.reshape(-1)
    if total >= flat.numel():
        return torch.full((values.shape[0],), values.shape[1], dtype=torch.int64, device=values.device)
    top = flat.topk(total, sorted=False).indices
    return torch.bincount(top // values.shape[1], minlength=values.shape[0])


class _SelectedValues(torch.autograd.Function):
    """Identity on the selected values in forward; in backward the gradient of ``relu(pre)`` at those slots,
    with the formulas of `topk_encode`'s backward (``pre = (x - b_dec) @ W_enc.T + b_enc``)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, values, indices):  # type: ignore[no-untyped-def,override]
        ctx.save_for_backward(x, W_enc, b_dec, values, indices)
        ctx.b_enc_dtype = b_enc.dtype
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def,override]
        x, W_enc, b_dec, values, indices = ctx.saved_tensors
        need_x, need_w, need_be, need_bd = ctx.needs_input_grad[:4]
        n = W_enc.shape[0]
        grad_pre = (grad * (values > 0)).to(x.dtype)
        grad_x = grad_w = grad_be = grad_bd = None
        if need_w:
            grad_w = torch.ops.mi_crow.scatter_rows(grad_pre, indices, x - b_dec, n)
        acc = torch.float64 if grad_pre.dtype == torch.float64 else torch.float32
        grad_be_acc = None
        if need_be or (need_bd and not need_x):
            grad_be_acc = torch.zeros(n, dtype=acc, device=grad_pre.device)
            grad_be_acc = grad_be_acc.index_add(0, indices.reshape(-1), grad_pre.reshape(-1).to(acc))
            if need_be:
                grad_be = grad_be_acc.to(ctx.b_enc_dtype)
        if need_x:
            gx = torch.ops.mi_crow.sparse_decode(grad_pre, indices, W_enc, W_enc.new_zeros((W_enc.shape[1],)))
            grad_x = gx.to(x.dtype)
            if need_bd:
                grad_bd = -gx.sum(0, dtype=acc).to(b_dec.dtype)
        elif need_bd:
            assert grad_be_acc is not None
            grad_bd = -(grad_be_acc.to(W_enc.dtype) @ W_enc).to(b_dec.dtype)
        return grad_x, grad_w, grad_be, grad_bd, None, None


def _default_select(values: Tensor, total: int) -> Tensor:
    """The global selection: the Triton radix bisection on CUDA (`mi_crow.ops.triton.batch_select`), else
    `batch_topk_select`."""
    disabled = os.environ.get("MI_CROW_DISABLE_TRITON", "").strip().lower() in {"1", "true", "yes", "on"}
    if values.is_cuda and not disabled:
        try:
            from mi_crow.ops.triton.batch_select import batch_topk_select_triton
        except ImportError:  # no triton: torch.topk serves CUDA too
            pass
        else:
            return batch_topk_select_triton(values, total)
    return batch_topk_select(values, total)


def _default_encode(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, compute_dtype):  # type: ignore[no-untyped-def]
    return torch.ops.mi_crow.topk_encode(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, compute_dtype)


def batch_topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    *,
    candidates: int | None = None,
    compute_dtype: torch.dtype | None = None,
    encode_fn: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]] | None = None,
    select_fn: Callable[[Tensor, int], Tensor] | None = None,
    any_fn: Callable[[bool], bool] | None = None,
) -> BatchTopKCode:
    """BatchTopK encode: the ``k * B`` largest of ``relu((x - b_dec) @ W_enc.T + b_enc)`` over the whole batch.

    See the module docstring for the method and why it is exact. Precision and ranking are `topk_encode`'s.

    Args:
        x: ``[B, d_in]``; W_enc: ``[n, d_in]``; b_enc: ``[n]``; b_dec: ``[d_in]`` (as for `topk_encode`).
        k: mean active latents per token; the batch keeps ``k * B``.
        dead_mask, k_aux: the AuxK code, as for `topk_encode` (per token, among dead latents).
        candidates: first candidate width per token (default ``min(n, 4 k)``); only speed depends on it.
        compute_dtype: dtype of the encoder product (as for `topk_encode`).
        encode_fn: the ``topk_encode`` kernel to use (default the dispatched op; tests pass the Triton launcher).
        select_fn, any_fn: the global selection ``(values [B, c], total) -> counts [B]`` (default: the Triton kernel
            of `mi_crow.ops.triton.batch_select` on CUDA, `batch_topk_select` elsewhere; tests pass the interpreted
            Triton launcher) and ``any_fn(flag)``, whether ``flag`` holds on any process (default: ``flag``). They
            are the seam of a selection over several processes (data-parallel ranks each holding some tokens): a
            given ``select_fn`` is called the same number of times on every process, even with ``B = 0``, and
            ``any_fn`` makes every process refine as often as the others.

    Returns:
        `BatchTopKCode`.

    Raises:
        UserInputError: ``k * B`` larger than the batch's ``B * n`` pre-activations, or a bad ``candidates``.
    """
    fn = "batch_topk_encode"
    checks.tensor(fn, "x", x, 2, floating=True)
    checks.tensor(fn, "W_enc", W_enc, 2, floating=True)
    n = W_enc.shape[0]
    B = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserInputError(f"{fn}: k must be a positive int, got {k!r}")
    if k * B > n * B or k > n:
        raise UserInputError(
            f"{fn}: k * B = {k * B} (k={k}, B={B}) is larger than the batch's pre-activation count "
            f"B * n_latents = {B * n}"
        )
    c = min(n, DEFAULT_CANDIDATE_FACTOR * k) if candidates is None else candidates
    checks.int_in_range(fn, "candidates", c, 1, n)
    c = max(c, min(k, n))
    encode = encode_fn or _default_encode
    select = select_fn or _default_select
    if b_enc.dtype != x.dtype:
        b_enc = b_enc.to(x.dtype)
    if b_dec.dtype != x.dtype:
        b_dec = b_dec.to(x.dtype)
    use_aux = dead_mask is not None and k_aux > 0
    with torch.no_grad():
        values, indices, aux_v, aux_i = encode(
            x.detach(), W_enc.detach(), b_enc.detach(), b_dec.detach(), c,
            dead_mask if use_aux else None, k_aux if use_aux else 0, compute_dtype,
        )
        total = k * B
        refinements = 0
        while True:
            if select_fn is not None:
                counts = select_fn(values, total)
            else:
                counts = select(values, total) if B else values.new_zeros((0,), dtype=torch.int64)
            # A token whose last listed candidate is 0 cannot hide a positive winner (unlisted values are <= 0).
            full = (counts == c) & (values[:, c - 1] > 0) if c < n else counts.new_zeros((B,), dtype=torch.bool)
            saturated = full.nonzero().squeeze(1)
            if not (any_fn or bool)(saturated.numel() > 0):
                break
            # Saturated tokens might hold more winners than they listed: list twice as many for them only.
            c2 = min(n, 2 * c)
            wide_v = values.new_zeros((B, c2))
            wide_i = indices.new_zeros((B, c2))
            wide_v[:, :c], wide_i[:, :c] = values, indices
            # The other tokens' extra slots must never be selected: rank them below everything.
            wide_v[:, c:] = -torch.inf
            if saturated.numel():  # (another process's tokens may be the saturated ones)
                sub = x.detach()[saturated]
                sv, si, _, _ = encode(sub, W_enc.detach(), b_enc.detach(), b_dec.detach(), c2, None, 0,
                                      compute_dtype)
                wide_v[saturated], wide_i[saturated] = sv, si
            values, indices, c = wide_v, wide_i, c2
            refinements += 1
        w = max(1, int(counts.max())) if B else 1
        keep = torch.arange(w, device=x.device).unsqueeze(0) < counts.unsqueeze(1)
        sel_v = torch.where(keep, values[:, :w], torch.zeros((), dtype=values.dtype, device=values.device))
        sel_i = indices[:, :w].contiguous()
        positive = sel_v[keep & (sel_v > 0)]
        threshold = positive.min() if positive.numel() else torch.full((), float("nan"), device=x.device)
    slots_v, slots_i = sel_v, sel_i
    if use_aux:
        slots_v = torch.cat([sel_v, aux_v], dim=1)
        slots_i = torch.cat([sel_i, aux_i], dim=1)
    out = _SelectedValues.apply(x, W_enc, b_enc, b_dec, slots_v.contiguous(), slots_i.contiguous())
    if use_aux:
        return BatchTopKCode(out[:, :w], sel_i, threshold.float(), out[:, w:], aux_i, refinements)
    return BatchTopKCode(out, sel_i, threshold.float(), None, None, refinements)


def batch_topk_ref(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> Tensor:
    """Plain-PyTorch BatchTopK (the specification): the dense ``[B, n]`` code keeping the ``k * B`` largest of
    ``relu(pre)`` over the batch (differentiable by autograd).

    Returns:
        ``[B, n]`` dense code, zeros outside the selection.
    """
    pre = (x - b_dec) @ W_enc.t() + b_enc
    act = torch.relu(pre)
    flat = act.reshape(-1)
    top = flat.topk(min(k * x.shape[0], flat.numel()), sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[top] = True
    return act * mask.view_as(act)
