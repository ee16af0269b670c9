"""`MatryoshkaSae`: Matryoshka SAE (Bussmann et al., 2025; Nabeshima, 2024): nested prefixes of the dictionary
each reconstruct the input, the loss sums the prefix losses.

The latents are ordered in groups ``group_sizes`` (summing to ``n_latents``); prefix ``m`` is the first
``group_sizes[0] + ... + group_sizes[m]`` latents. With a sparse code, the reconstruction of prefix ``m`` is the
sparse decode of the code with the slots of later latents masked to 0. Selection per token (TopK) or per batch
(BatchTopK, the default, with a threshold at inference).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple, Sequence

import torch
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.base import SaeBase
from mi_crow.validation import check_bool, fail_type

__all__ = ["MatryoshkaSae", "PrefixLayout", "check_group_sizes", "matryoshka_prefix_sse", "prefix_layout"]


def check_group_sizes(group_sizes: Any, n_latents: int, argument: str = "MatryoshkaSae: group_sizes") -> list[int]:
    """``group_sizes`` as a list of positive ints summing to ``n_latents`` (so the prefixes strictly increase).

    Raises:
        ArgumentTypeError: not a sequence of ints.
        UserInputError: empty, a size < 1 (a prefix that does not increase) or a sum other than ``n_latents``.
    """
    if isinstance(group_sizes, (str, bytes)) or not isinstance(group_sizes, Sequence):
        raise fail_type(argument, "a sequence of positive ints summing to n_latents", group_sizes)
    sizes = list(group_sizes)
    if not sizes:
        raise UserInputError(f"{argument} must hold at least one group size, got {group_sizes!r}")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int):
            raise fail_type(argument, "a sequence of ints", group_sizes)
        if s < 1:
            raise UserInputError(
                f"{argument} must be positive group sizes (each prefix strictly larger than the last), got "
                f"{sizes!r}"
            )
    if sum(sizes) != n_latents:
        raise UserInputError(
            f"{argument} must sum to n_latents={n_latents} (they are the sizes of the groups, not the prefix widths), "
            f"got {sizes!r} summing to {sum(sizes)}"
        )
    return sizes


class MatryoshkaSae(SaeBase):
    """Matryoshka SAE: the loss sums the reconstruction losses of nested prefixes of the dictionary.

    Parameters as in `TopKSae`; with ``batch_topk=True`` (default) a 0-d ``threshold`` buffer as in `BatchTopKSae`.
    Inference is that of the selection (threshold, or per-token top-k); the groups only matter for training.

    Args:
        n_latents, n_inputs, k: as for `TopKSae`.
        group_sizes: sizes of the nested groups, positive, summing to ``n_latents``; prefix ``m`` is the first
            ``sum(group_sizes[:m + 1])`` latents.
        batch_topk: BatchTopK selection (else per-token TopK).
        device, dtype, mode, layer_signature, hook_id: as for `TopKSae`.
    """

    architecture: ClassVar[str] = "matryoshka"

    def __init__(
        self,
        n_latents: int,
        n_inputs: int,
        k: int,
        group_sizes: Sequence[int],
        batch_topk: bool = True,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        mode: str = "observe",
        layer_signature: str | int | None = None,
        hook_id: str | None = None,
    ) -> None:
        self.batch_topk = check_bool(batch_topk, "MatryoshkaSae: batch_topk")
        self.selection = "batchtopk" if self.batch_topk else "topk"
        super().__init__(
            n_latents, n_inputs, k, device, dtype, mode=mode, layer_signature=layer_signature, hook_id=hook_id
        )
        self.group_sizes = check_group_sizes(group_sizes, n_latents)

    @property
    def prefix_sizes(self) -> list[int]:
        """Cumulative widths of the nested prefixes (the last is ``n_latents``)."""
        out, total = [], 0
        for s in self.group_sizes:
            total += s
            out.append(total)
        return out

    def _arch_config(self) -> dict[str, Any]:
        return {"group_sizes": list(self.group_sizes), "batch_topk": self.batch_topk}

    @classmethod
    def from_config(cls, config: dict[str, Any], dtype: torch.dtype) -> MatryoshkaSae:
        return cls(
            config["n_latents"],
            config["n_inputs"],
            config["k"],
            config["group_sizes"],
            batch_topk=bool(config.get("batch_topk", True)),
            dtype=dtype,
            mode=config.get("mode", "observe"),
            layer_signature=config.get("layer"),
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_sizes={self.group_sizes}, batch_topk={self.batch_topk}"


# -- the prefix losses as masked sparse decodes --------------------------------------------------------------------
class PrefixLayout(NamedTuple):
    """Where each active slot of a code goes in the group-pure decode rows (see `prefix_layout`).

    Attributes:
        rows, cols: ``[nnz]`` row and column of each active slot in the ``[R, chunk]`` decode matrices.
        src: ``[nnz]`` flat position (``b * w + j``) of the slot in the ``[B, w]`` code.
        indices: ``[R, chunk]`` int64 latent indices of the decode rows (0 in padding slots).
        row_segment: ``[R]`` the (group, token) segment ``g * B + b`` each row adds into.
        n_rows: ``R``.
    """

    rows: Tensor
    cols: Tensor
    src: Tensor
    indices: Tensor
    row_segment: Tensor
    n_rows: int


@torch.no_grad()
def prefix_layout(values: Tensor, indices: Tensor, prefix_sizes: Sequence[int], chunk: int) -> PrefixLayout:
    """Cut each token's active slots (value != 0) into rows of ``chunk`` slots that hold one group only.

    Slots are sorted by group per token; a (token, group) segment of ``c`` slots takes ``ceil(c / chunk)`` rows (the
    last padded with value 0). Slots whose value is 0 (BatchTopK's unused slots, ReLU zeros) are left out: they add
    nothing to any reconstruction, and the encoders' backward gives a selected 0 no gradient.
    """
    B, w = values.shape
    G = len(prefix_sizes)
    dev = indices.device
    bounds = torch.tensor(list(prefix_sizes), device=dev, dtype=torch.int64)
    group = torch.bucketize(indices, bounds, right=True)  # [B, w] in 0..G-1
    group = torch.where(values != 0, group, torch.full_like(group, G))  # inactive slots: group G, dropped
    g_sorted, order = group.sort(dim=1, stable=True)
    counts = torch.zeros(B, G + 1, dtype=torch.int64, device=dev).scatter_add_(1, group, torch.ones_like(group))
    starts = counts.cumsum(1) - counts
    rank = torch.arange(w, device=dev).unsqueeze(0) - starts.gather(1, g_sorted)  # place within its group
    n_chunks = (counts[:, :G] + chunk - 1) // chunk  # [B, G], rows in token-major order
    flat_chunks = n_chunks.reshape(-1)
    offsets = flat_chunks.cumsum(0) - flat_chunks
    R = int(flat_chunks.sum())
    kept = g_sorted < G
    tok = torch.arange(B, device=dev).unsqueeze(1).expand(B, w)[kept]
    g_kept = g_sorted[kept]
    rank_kept = rank[kept]
    rows = offsets[tok * G + g_kept] + torch.div(rank_kept, chunk, rounding_mode="floor")
    cols = rank_kept % chunk
    src = (tok * w + order[kept]).contiguous()
    I = torch.zeros(R, chunk, dtype=torch.int64, device=dev)
    I[rows, cols] = indices.reshape(-1)[src]
    # Segment of a row, numbered group-major (g * B + b) so that each prefix is a contiguous [B, d] block.
    seg = (torch.arange(G, device=dev).unsqueeze(0) * B + torch.arange(B, device=dev).unsqueeze(1)).reshape(-1)
    row_segment = torch.repeat_interleave(seg, flat_chunks, output_size=R)
    return PrefixLayout(rows, cols, src, I, row_segment, R)


class _PrefixSSE(torch.autograd.Function):
    """``sse[m] = ||target - b_dec - sum_{g <= m} contribution_g||^2`` summed over the batch, for every prefix ``m``,
    with a hand-written backward (no ``[B, G, d]`` autograd chain)."""

    @staticmethod
    def forward(ctx, values, target, W_dec, b_dec, layout, G):  # type: ignore[no-untyped-def,override]
        B, w = values.shape
        d = W_dec.shape[1]
        V = values.new_zeros(layout.n_rows, layout.indices.shape[1])
        V[layout.rows, layout.cols] = values.reshape(-1)[layout.src]
        parts = torch.ops.mi_crow.sparse_decode(V, layout.indices, W_dec, W_dec.new_zeros(d))  # [R, d]
        # S[g, b] = contribution of group g to token b, then prefix sums over g, then minus (target - b_dec).
        S = parts.new_zeros(G * B, d).index_add_(0, layout.row_segment, parts).view(G, B, d)
        del parts
        for g in range(1, G):
            S[g].add_(S[g - 1])
        S.sub_((target - b_dec).to(S.dtype).unsqueeze(0))  # S[m] = x_hat_m - target (= minus the error)
        acc = torch.float64 if S.dtype == torch.float64 else torch.float32
        flat = S.view(G, -1)
        sse = torch.stack([torch.dot(flat[m], flat[m]) if S.dtype == acc else flat[m].to(acc).pow(2).sum()
                           for m in range(G)])
        err = S[G - 1].neg()
        ctx.save_for_backward(S, V, W_dec)
        ctx.layout, ctx.G, ctx.shape = layout, G, (B, w)
        ctx.mark_non_differentiable(err)
        return sse, err

    @staticmethod
    def backward(ctx, grad_sse, _grad_err):  # type: ignore[no-untyped-def,override]
        S, V, W_dec = ctx.saved_tensors
        layout, G, (B, w) = ctx.layout, ctx.G, ctx.shape
        coef = (2 * grad_sse).to(S.dtype)
        # dL/d contribution_g = sum_{m >= g} 2 grad_sse[m] (x_hat_m - target).
        Gc = torch.empty_like(S)
        torch.mul(S[G - 1], coef[G - 1], out=Gc[G - 1])
        for g in range(G - 2, -1, -1):
            torch.addcmul(Gc[g + 1], S[g], coef[g], out=Gc[g])
        grad_values = grad_target = grad_W = grad_b = None
        need_v, need_t, need_w, need_b = ctx.needs_input_grad[:4]
        if need_t:
            grad_target = Gc[0].neg()
        if need_b:
            grad_b = Gc[0].sum(0)
        if need_v or need_w:
            grad_parts = Gc.view(G * B, S.shape[2]).index_select(0, layout.row_segment)
            grad_V, grad_W = torch.ops.mi_crow.sparse_decode_backward(grad_parts, V, layout.indices, W_dec)
            if need_v:
                grad_values = grad_V.new_zeros(B * w)
                grad_values[layout.src] = grad_V[layout.rows, layout.cols]
                grad_values = grad_values.view(B, w)
            if not need_w:
                grad_W = None
        return grad_values, grad_target, grad_W, grad_b, None, None


def matryoshka_prefix_sse(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    target: Tensor,
    prefix_sizes: Sequence[int],
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The summed squared errors of every nested prefix's reconstruction, as masked sparse decodes.

    ``x_hat_m = b_dec + sum_j values_j * W_dec[indices_j]`` over the slots whose latent is ``< prefix_sizes[m]``;
    ``sse[m] = sum_b ||target_b - x_hat_m,b||^2``. Each token's active slots are cut into group-pure rows of
    ``chunk`` slots (`prefix_layout`), decoded in one `sparse_decode` call and summed per (group, token); the prefix
    sums and the errors are formed in place in one ``[G, B, d]`` buffer, and the backward is written out (the
    gradient of group ``g`` is the running sum of the later prefixes' errors), so the only autograd node is this
    one and the decoder gets a single gradient. Never ``[B, n]``.

    Args:
        values: ``[B, w]`` code values (differentiable); indices: ``[B, w]`` int64.
        W_dec: ``[n, d]``; b_dec: ``[d]``.
        target: ``[B, d]`` what every prefix reconstructs (differentiable: a skip term may be subtracted from it).
        prefix_sizes: increasing prefix widths, the last ``n``.
        chunk: slots per decode row (default 8, and 4 more per 32 active slots per token beyond 64: rows of
            few slots add row traffic, long rows add padding).

    Returns:
        ``(sse [G], err [B, d])``: per-prefix summed squared errors (float32, float64 for float64 inputs) and the
        full dictionary's error ``target - x_hat`` (no gradient; for AuxK).

    Values of 0 are not decoded and get no value gradient (see `prefix_layout`).
    """
    B, w = values.shape
    G = len(prefix_sizes)
    if chunk is None:
        active = int((values.detach() != 0).sum()) / max(B, 1)
        chunk = max(8, 4 * math.ceil(active / 32))
    layout = prefix_layout(values.detach(), indices, prefix_sizes, chunk)
    return _PrefixSSE.apply(values, target, W_dec, b_dec, layout, G)
