"""The training losses of the SAE family beyond the plain TopK SAE (which keeps its own path in ``step.py``).

`family_losses` computes a step's `LossOutput` for any `SaeBase`:

- selection: per-token top-k (`mi_crow.ops.topk_encode`) or BatchTopK over the batch
  (`mi_crow.ops.batch_topk.batch_topk_encode`, never ``[B, n]``); BatchTopK also updates the SAE's running
  ``threshold`` (an exponential moving average of the smallest positive value the batch selection keeps);
- Matryoshka: the prefix reconstructions as masked sparse decodes: each group's slots are decoded on their own
  (rows of one group only, all in one `sparse_decode` call, so one decoder gradient), and the groups'
  contributions summed cumulatively, ``x_hat_m = b_dec + sum_{g <= m} contribution_g``; the loss is the sum of the
  prefix FVUs, computed by one autograd node with a written-out backward (see
  `mi_crow.mechanistic.sae.matryoshka.matryoshka_prefix_sse`; `matryoshka_reconstructions` returns the prefix
  reconstructions themselves);
- transcoders: the batch rows are ``[x | y]`` (input, then target): the encoder reads ``x`` without the ``b_dec``
  shift, the decoder (plus the skip term) predicts ``y``, and the FVU is against ``y``'s variance.

The FVU, AuxK and L1 terms follow ``step.py``'s TopK recipe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mi_crow import ops
from mi_crow.errors import NotSupportedError
from mi_crow.ops.batch_topk import batch_topk_encode
from mi_crow.mechanistic.sae.matryoshka import matryoshka_prefix_sse
from mi_crow.mechanistic.sae.train.results import LossOutput

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.train.step import SaeStepper

__all__ = ["THRESHOLD_MOMENTUM", "family_losses", "matryoshka_reconstructions"]

#: Weight of the past in the running BatchTopK threshold (the new batch's minimum gets ``1 - momentum``).
THRESHOLD_MOMENTUM = 0.99


def _sum_sq(t: Tensor) -> Tensor:
    flat = t.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return torch.dot(flat, flat)


def matryoshka_reconstructions(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, prefix_sizes: list[int], chunk: int | None = None
) -> Tensor:
    """The reconstructions of every nested prefix from one sparse code, as masked sparse decodes in one call.

    Each token's slots are sorted by group and cut into rows of ``chunk`` slots that hold one group only (the
    last row of a group is padded with value 0); one `sparse_decode` of those rows gives partial sums that are
    added per (token, group), and a cumulative sum over the groups gives the prefixes. So the decode touches about
    ``w + G * chunk / 2`` slots per token instead of ``G * w`` for a mask per prefix, and the decoder gets a
    single gradient.

    Args:
        values: ``[B, w]`` code values; indices: ``[B, w]`` int64.
        W_dec: ``[n, d]``; b_dec: ``[d]``.
        prefix_sizes: increasing prefix widths, the last ``n``.
        chunk: slots per decode row (default ``max(4, w // 8)``).

    Returns:
        ``[B, G, d]``: row ``m`` decodes only the latents ``< prefix_sizes[m]`` (plus ``b_dec``).
    """
    B, w = values.shape
    G = len(prefix_sizes)
    dev = indices.device
    chunk = chunk or max(4, w // 8)
    with torch.no_grad():
        bounds = torch.tensor(prefix_sizes, device=dev, dtype=torch.int64)
        group = torch.bucketize(indices, bounds, right=True)  # [B, w] in 0..G-1
        g_sorted, order = group.sort(dim=1, stable=True)
        counts = torch.zeros(B, G, dtype=torch.int64, device=dev).scatter_add_(1, group, torch.ones_like(group))
        starts = counts.cumsum(1) - counts
        rank = torch.arange(w, device=dev).unsqueeze(0) - starts.gather(1, g_sorted)  # place within its group
        n_chunks = (counts + chunk - 1) // chunk  # [B, G]
        flat_chunks = n_chunks.reshape(-1)
        offsets = flat_chunks.cumsum(0) - flat_chunks
        R = int(flat_chunks.sum())
        seg = torch.arange(B, device=dev).unsqueeze(1) * G + g_sorted  # (token, group) of each sorted slot
        row = offsets[seg] + torch.div(rank, chunk, rounding_mode="floor")
        col = rank % chunk
        row_segment = torch.repeat_interleave(torch.arange(B * G, device=dev), flat_chunks)
        I = torch.zeros(R, chunk, dtype=torch.int64, device=dev)
        I[row, col] = indices.gather(1, order)
    V = values.new_zeros(R, chunk).index_put((row, col), values.gather(1, order))
    parts = ops.sparse_decode(V, I, W_dec, torch.zeros_like(b_dec))  # [R, d]
    per_group = parts.new_zeros(B * G, parts.shape[1]).index_add(0, row_segment, parts).view(B, G, -1)
    return per_group.cumsum(dim=1) + b_dec


def family_losses(
    stepper: SaeStepper,
    x: Tensor,
    *,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    auxk_coef: float = 1.0 / 32.0,
    encode_dtype: torch.dtype | None = None,
    l1_lambda: float = 0.0,
    k: int | None = None,
    topk_by_decoder_norm: bool = False,
) -> LossOutput:
    """Forward pass and losses of one batch for any SAE of the family (see the module docstring).

    Arguments as `SaeStepper.compute_losses`; for a transcoder ``x`` is ``[B, n_inputs + n_outputs]``.
    """
    sae: Any = stepper.sae
    if sae.selection == "jumprelu":
        raise NotSupportedError(
            "SaeTrainer: a JumpReLUSae is for inference only; train a TopKSae or BatchTopKSae and export it with "
            "JumpReLUSae.from_sae"
        )
    k = sae.k if k is None else k
    if sae.is_transcoder:
        inp, target = x[:, : sae.n_inputs], x[:, sae.n_inputs :]
        shift = torch.zeros(sae.n_inputs, device=x.device, dtype=x.dtype)
    else:
        inp, target = x, x
        shift = sae.b_dec
    W_enc, b_enc, W_dec = sae.W_enc, sae.b_enc, sae.W_dec
    if topk_by_decoder_norm:
        norms = W_dec.norm(dim=1).clamp_min(1e-12)
        W_enc, b_enc, W_dec = W_enc * norms.unsqueeze(1), b_enc * norms, W_dec / norms.unsqueeze(1)
    use_aux = dead_mask is not None and k_aux > 0 and auxk_coef > 0
    enc_dtype = encode_dtype or sae.dtype
    compute_dtype = enc_dtype if enc_dtype != sae.dtype else None
    if sae.selection == "batchtopk":
        code = batch_topk_encode(
            inp, W_enc, b_enc, shift, k, dead_mask if use_aux else None, k_aux if use_aux else 0,
            compute_dtype=compute_dtype, **stepper._batch_topk_seams(),  # dist: one selection over every rank
        )
        _update_threshold(stepper, sae, code.threshold)
    else:
        code = ops.topk_encode(
            inp, W_enc, b_enc, shift, k, dead_mask if use_aux else None, k_aux if use_aux else 0,
            compute_dtype=compute_dtype,
        )
    values = code.values.to(sae.dtype)
    indices = code.indices
    skip = sae.skip_term(inp) if getattr(sae, "W_skip", None) is not None else None
    total_var = stepper._centered_sum_sq(target)
    prefixes = getattr(sae, "prefix_sizes", None)
    e_hat = None
    if prefixes is not None and len(prefixes) > 1:
        # Every prefix reconstructs the target minus the skip term; one fused node (see matryoshka_prefix_sse).
        goal = target if skip is None else target - skip
        prefix_sse, err = matryoshka_prefix_sse(values, indices, W_dec, sae.b_dec, goal, prefixes)
        prefix_sse = stepper._all_reduce_sum(prefix_sse)  # dist: over every rank's tokens (the logged mse too)
        prefix_fvu = prefix_sse / total_var
        loss = prefix_fvu.sum()
        sse = prefix_sse[-1]
        fvu = prefix_fvu[-1]
        if use_aux and code.aux_values is not None:
            e_hat = ops.sparse_decode(
                code.aux_values.to(sae.dtype), code.aux_indices, W_dec, torch.zeros_like(sae.b_dec)
            )
    else:
        if use_aux and code.aux_values is not None:
            x_hat, e_hat = ops.sparse_decode_with_aux(
                values, indices, code.aux_values.to(sae.dtype), code.aux_indices, W_dec, sae.b_dec
            )
        else:
            x_hat = ops.sparse_decode(values, indices, W_dec, sae.b_dec)
        if skip is not None:
            x_hat = x_hat + skip
        err = target - x_hat
        sse = stepper._all_reduce_sum(_sum_sq(err))  # dist: over every rank's tokens (the logged mse too)
        fvu = sse / total_var
        loss = fvu
    auxk = x.new_zeros(())
    if e_hat is not None:
        residual = err.detach()
        aux_sse = stepper._all_reduce_sum(_sum_sq(residual - e_hat))
        auxk = torch.nan_to_num(aux_sse / stepper._centered_sum_sq(residual), nan=0.0, posinf=0.0, neginf=0.0)
        loss = loss + auxk_coef * auxk
    active = values > 0
    count = stepper._all_reduce_sum(torch.tensor(x.shape[0], dtype=torch.int64, device=x.device))
    l1_source = values if l1_lambda > 0 else values.detach()
    l1 = stepper._all_reduce_sum(l1_source.abs().sum(dtype=torch.float32)) / (count * sae.n_latents)
    if l1_lambda > 0:
        loss = loss + l1_lambda * l1.to(loss.dtype)
    l0 = stepper._all_reduce_sum(active.sum(dtype=torch.float32)) / count
    hits = torch.zeros(sae.n_latents, dtype=torch.int32, device=x.device)
    hits.index_add_(0, indices.reshape(-1), active.reshape(-1).to(torch.int32))
    fired = stepper._all_reduce_max(hits > 0)
    return LossOutput(loss, fvu.detach(), sse.detach(), auxk.detach(), l0, fired, int(count), l1.detach())


@torch.no_grad()
def _update_threshold(stepper: SaeStepper, sae: Any, batch_min: Tensor) -> None:
    """Running threshold: EMA of the smallest positive selected value (the first batch sets it).

    Only while the module is in training mode (``sae.training``), so evaluation passes leave it alone."""
    if not sae.training:
        return
    # Data-parallel ranks agree on the smallest value of all ranks (a min is a max of negatives); a rank with no
    # positive selected value (NaN) still takes part, with +inf.
    batch_min = torch.nan_to_num(batch_min.to(sae.threshold.dtype), nan=float("inf"))
    batch_min = -stepper._all_reduce_max(-batch_min)
    if not bool(torch.isfinite(batch_min)):
        return
    if bool(torch.isnan(sae.threshold)):
        sae.threshold.copy_(batch_min)
    else:
        sae.threshold.mul_(THRESHOLD_MOMENTUM).add_(batch_min, alpha=1.0 - THRESHOLD_MOMENTUM)
