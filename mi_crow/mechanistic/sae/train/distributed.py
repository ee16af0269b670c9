"""Distributed SAE training on ``torch.distributed`` (launched by ``torchrun``): data-parallel, latent-sharded and
one-SAE-per-layer layouts.

Layouts (``SaeTrainingConfig.parallel``):

- ``"data"``: every rank holds the whole SAE and its Adam state and trains on its own slice of each global batch of
  ``batch_size`` tokens (rank ``r`` takes rows ``[r B/W, (r+1) B/W)`` of the batch a single process would take, so
  the run equals the single-process run up to the order of the sums). Every data-dependent reduction goes through
  the stepper's ``_all_reduce_*`` seams: the loss numerators and denominators, the token count, L0 and L1, the
  fired-latent mask (dead counters), the non-finite flag, the outlier median (over the norms of every rank's
  tokens) and the ``b_dec`` initialisation sample (the union of the ranks' rows). Gradients are summed over ranks
  with bucketed all-reduces in the ``before_step`` hook of `step_in_backward`, just before each parameter's step.
- ``"latents"``: rank ``r`` owns latents ``[r n/W, (r+1) n/W)`` (encoder rows, encoder bias, decoder rows and their
  Adam state; ``b_dec`` is replicated) and sees the whole batch. Each rank runs the fused top-k on its slice, the
  global top-k per token is chosen from an all-gather of the ``k`` candidates of every rank (``k W`` values per
  token, never ``[B, n]``), the reconstruction is the all-reduced sum of the ranks' partial sparse decodes, and
  each rank steps only its slice. AuxK works the same way with ``k_aux`` candidates.
- ``"layers"``: `train_layers` spreads the SAEs of several layers over the ranks (any number per rank, any
  widths); each rank trains its SAEs as single-process runs.

Collectives run on the default process group; a failed or timed-out collective (a rank died) raises
`DistributedTrainingError` instead of hanging (set the group's ``timeout`` when initialising it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from mi_crow import ops
from mi_crow.errors import DistributedError, UserInputError
from mi_crow.mechanistic.sae.config import SaeTrainingConfig
from mi_crow.mechanistic.sae.data import TensorActivationReader
from mi_crow.mechanistic.sae.train.results import ActivationReader, LossOutput, ReaderFactory
from mi_crow.ops.batch_topk import batch_topk_encode
from mi_crow.validation import fail

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.sae import TopKSae
    from mi_crow.mechanistic.sae.train.step import SaeStepper
    from mi_crow.store import Store

__all__ = [
    "BUCKET_ELEMENTS",
    "DistributedTrainingError",
    "Layout",
    "assign_layers",
    "comm_bytes",
    "init_from_env",
    "reset_comm_bytes",
    "train_layers",
]

logger = logging.getLogger(__name__)

#: Elements per gradient all-reduce bucket (16 MiB of float32): large gradients are reduced in such pieces, all
#: launched before the first is waited for.
BUCKET_ELEMENTS = 1 << 22

# Config fields that may differ between ranks (everything else must be equal on every rank).
_RANK_LOCAL_FIELDS = ("rank", "progress")

_COMM = {"bytes": 0}


def comm_bytes() -> int:
    """Bytes this process has sent into collectives through this module since `reset_comm_bytes` (the payload of
    each all-reduce / all-gather / broadcast, not the wire traffic of the algorithm gloo or NCCL picks)."""
    return _COMM["bytes"]


def reset_comm_bytes() -> None:
    """Set the `comm_bytes` counter to 0."""
    _COMM["bytes"] = 0


class DistributedTrainingError(DistributedError):
    """A collective failed: another rank stopped (crashed, was killed) or did not answer within the process group's
    timeout. The run's last checkpoint stays; ``resume=True`` on every rank continues from it."""


# -- the layout ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How the processes of a distributed run share the work.

    Attributes:
        parallel: ``"data"``, ``"latents"`` or ``"layers"``.
        rank: this process's rank.
        world_size: number of processes.
    """

    parallel: str
    rank: int
    world_size: int

    def latent_slice(self, n_latents: int) -> tuple[int, int]:
        """``(lo, hi)``: the latents this rank owns in the latent-sharded layout."""
        per = n_latents // self.world_size
        return self.rank * per, (self.rank + 1) * per


def resolve(config: SaeTrainingConfig) -> tuple[SaeTrainingConfig, Layout | None]:
    """The configuration with this process's rank and world size, and its `Layout` (None: single-process).

    Raises:
        UserInputError: ``parallel`` is set but no process group is initialised, or ``rank``/``world_size`` were
            given and differ from the process group's.
    """
    if config.parallel is None:
        return config, None
    if not (dist.is_available() and dist.is_initialized()):
        raise UserInputError(
            f"SaeTrainingConfig.parallel={config.parallel!r} needs an initialised torch.distributed process group "
            "(run under torchrun and call torch.distributed.init_process_group(), or use "
            "`torchrun --nproc_per_node=N -m mi_crow train --parallel ...`)"
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    if (config.rank, config.world_size) == (0, 1):
        config = dataclasses.replace(config, rank=rank, world_size=world)  # re-validated by __post_init__
    elif (config.rank, config.world_size) != (rank, world):
        raise fail("SaeTrainingConfig.rank/world_size", f"the process group's rank={rank}, world_size={world} "
                   "(or leave them at 0/1 to take them from the group)", (config.rank, config.world_size))
    return config, Layout(config.parallel, rank, world)


def check_latent_layout(layout: Layout, n_latents: int, k_max: int) -> None:
    """Refuse latent counts the latent-sharded layout cannot split.

    Raises:
        UserInputError: ``n_latents`` is not a multiple of the world size, or a rank's slice has fewer latents
            than the largest ``k`` of the run (so ``n_latents < world_size * k``).
    """
    world = layout.world_size
    if n_latents % world:
        raise fail("TopKSae.n_latents", f"a multiple of the world size {world} (parallel='latents' gives every rank "
                   "the same number of latents)", n_latents)
    if n_latents < world * k_max:
        raise fail("TopKSae.n_latents", f"at least world_size x k = {world} x {k_max} = {world * k_max} "
                   "(parallel='latents': every rank proposes k candidates per token from its own slice)", n_latents)


def _digest(payload: Any) -> int:
    text = json.dumps(payload, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def check_same_config(config: SaeTrainingConfig, sae_config: dict[str, Any]) -> None:
    """All-gather a hash of the configuration (and the SAE's shape) and name what differs when the ranks disagree.

    Raises:
        UserInputError: naming each rank that differs from rank 0 and the differing fields.
    """
    payload = {
        "config": {k: v for k, v in config.to_dict().items() if k not in _RANK_LOCAL_FIELDS},
        "sae": {k: sae_config.get(k) for k in ("n_latents", "n_inputs", "k")},
    }
    mine = torch.tensor([_digest(payload)], dtype=torch.int64)
    digests = all_gather_same(mine)
    if all(int(d) == int(mine) for d in digests):
        return
    payloads: list[Any] = [None] * dist.get_world_size()
    _collective("all_gather_object", lambda: dist.all_gather_object(payloads, payload))
    problems = []
    for rank, other in enumerate(payloads):
        if rank == 0 or other == payloads[0]:
            continue
        fields = []
        for part in ("config", "sae"):
            for name in sorted(set(other[part]) | set(payloads[0][part])):
                if other[part].get(name) != payloads[0][part].get(name):
                    fields.append(f"{'SaeTrainingConfig' if part == 'config' else 'TopKSae'}.{name}: "
                                  f"{payloads[0][part].get(name)!r} on rank 0, {other[part].get(name)!r} on rank {rank}")
        problems.append("; ".join(fields))
    raise UserInputError(f"SaeTrainer: the ranks were started with different configurations ({'; '.join(problems)})")


# -- collectives -----------------------------------------------------------------------------------------------
def _collective(name: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (RuntimeError, ValueError) as exc:  # gloo/NCCL report a dead peer or a timeout as RuntimeError
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise DistributedTrainingError(
            f"SaeTrainer: rank {rank}: the collective {name} failed, most likely because another rank stopped or "
            f"did not answer within the process group's timeout ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "The last checkpoint stays; restart every rank with resume=True to continue"
        ) from exc


def _count(t: Tensor) -> None:
    _COMM["bytes"] += t.numel() * t.element_size()


def all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """``t`` reduced over every rank (a new tensor; bool is reduced as uint8, ``max`` = logical or)."""
    out = t.detach().to(torch.uint8) if t.dtype == torch.bool else t.detach().clone()
    _count(out)
    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    _collective(f"all_reduce({op})", lambda: dist.all_reduce(out, op=reduce_op))
    return out.bool() if t.dtype == torch.bool else out


def sum_with_local_grad(t: Tensor) -> Tensor:
    """The sum of ``t`` over ranks, whose gradient flows to this rank's ``t`` with coefficient 1.

    Each rank's backward then gives the gradient of the global loss with respect to its own contribution, and
    summing those over ranks (the gradient all-reduce) gives the gradient of the global loss.
    """
    total = all_reduce(t, "sum")
    return t + (total - t).detach() if t.requires_grad else total


def all_gather_same(t: Tensor) -> list[Tensor]:
    """Every rank's ``t`` (all of the same shape), in rank order."""
    t = t.detach().contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    _count(t)
    _collective("all_gather", lambda: dist.all_gather(out, t))
    return out


def all_gather_rows(t: Tensor) -> list[Tensor]:
    """Every rank's ``[m_r, ...]`` tensor (``m_r`` may differ), in rank order."""
    sizes = all_gather_same(torch.tensor([t.shape[0]], dtype=torch.int64))
    rows = [int(s) for s in sizes]
    padded = t.new_zeros((max(rows), *t.shape[1:]))
    padded[: t.shape[0]] = t.detach()
    return [g[:m] for g, m in zip(all_gather_same(padded), rows)]


def broadcast_(t: Tensor, src: int = 0) -> None:
    """Overwrite ``t`` (in place) with rank ``src``'s."""
    _count(t)
    _collective("broadcast", lambda: dist.broadcast(t, src))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (a small picklable value, e.g. a generated run name) on every rank."""
    box = [obj]
    _collective("broadcast_object_list", lambda: dist.broadcast_object_list(box, src))
    return box[0]


def barrier() -> None:
    """Wait for every rank (through a tiny all-reduce, so a dead rank fails it instead of hanging)."""
    all_reduce(torch.zeros(1))


def reduce_gradient_(p: Tensor) -> None:
    """Sum ``p.grad`` over ranks in place, in buckets of at most `BUCKET_ELEMENTS`, all in flight at once."""
    if p.grad is None:
        return
    flat = p.grad.view(-1)
    works = []
    for start in range(0, flat.numel(), BUCKET_ELEMENTS):
        bucket = flat[start : start + BUCKET_ELEMENTS]
        _count(bucket)
        works.append(_collective("all_reduce(gradient)", lambda b=bucket: dist.all_reduce(b, async_op=True)))
    for work in works:
        _collective("all_reduce(gradient).wait", work.wait)


# -- data-parallel readers -------------------------------------------------------------------------------------
class RankSliceReader:
    """This rank's part of every global batch of a reader (data-parallel).

    A stored run's reader (`mi_crow.store.reader.ActivationReader`) is `split
    <mi_crow.store.reader.ActivationReader.split>`: this rank reads only its share of each shuffle group's files and
    yields, of each global batch, the rows that come from them (the ranks' rows together are the single-process
    batch; their numbers vary around ``B/W``). Any other reader yields whole batches of which this rank keeps rows
    ``[r B/W, (r+1) B/W)`` (an in-memory `TensorActivationReader` gathers only those rows). The position and its
    ``state_dict`` are the wrapped reader's (a split reader's carried tokens are this rank's own:
    ``rank_local_state`` names them, so that checkpoints keep one copy per rank).
    """

    def __init__(self, reader: ActivationReader, layout: Layout) -> None:
        from mi_crow.store.reader import ActivationReader as StoreReader

        self.reader = reader
        self.layout = layout
        self.n_tokens = reader.n_tokens
        self.d_in = reader.d_in
        self.split = isinstance(reader, StoreReader) and layout.world_size > 1
        if self.split:
            reader.split(layout.rank, layout.world_size)
        self.rank_local_state: tuple[str, ...] = ("carry",) if self.split else ()

    def _rows(self, size: int) -> tuple[int, int]:
        if size % self.layout.world_size:
            raise fail("SaeTrainingConfig.batch_size", f"a multiple of world_size={self.layout.world_size} "
                       "(every rank takes an equal slice of each batch)", size)
        per = size // self.layout.world_size
        return self.layout.rank * per, (self.layout.rank + 1) * per

    def __iter__(self) -> Iterator[Tensor]:
        inner = self.reader
        if self.split:
            yield from inner
            return
        if type(inner) is TensorActivationReader and inner.drop_last:
            order = inner._order()
            size = inner.batch_size
            lo, hi = self._rows(size)
            while inner._position + size <= inner.n_tokens:
                rows = order[inner._position + lo : inner._position + hi].to(inner.data.device)
                inner._position += size  # advanced before yielding, as the wrapped reader does
                yield inner.data.index_select(0, rows)
            inner._position = inner.n_tokens
            return
        for batch in inner:
            lo, hi = self._rows(batch.shape[0])
            yield batch[lo:hi]

    def state_dict(self) -> dict[str, Any]:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        part = state.get("part")
        if self.split and isinstance(part, list) and len(part) == 2 and part[1] == self.layout.world_size:
            # A checkpoint's record holds rank 0's position; the other ranks' differ only in their own part
            # (their carried tokens come from their own ``reader.rank<r>.*`` tensors).
            state = {**state, "part": [self.layout.rank, self.layout.world_size]}
        self.reader.load_state_dict(state)


def slice_factory(factory: ReaderFactory, layout: Layout) -> ReaderFactory:
    """``epoch -> RankSliceReader(factory(epoch))``."""
    return lambda epoch: RankSliceReader(factory(epoch), layout)


def gathered_sample(sample_reader: Callable[[], Iterable[Tensor]], n_tokens: int, layout: Layout,
                    gather: Callable[[Tensor], list[Tensor]] | None = None) -> Callable[[], Iterable[Tensor]]:
    """The first ``n_tokens`` vectors of the sample stream, gathered from every rank back into stream order: the
    very sample a single process initialises ``b_dec`` (and the input scale) from.

    A stored run's reader is split (each rank reads only its files and keeps its rows of the first ``n_tokens``);
    any other stream is read whole by every rank, each keeping the positions ``p`` with ``p % world_size == rank``.
    """
    from mi_crow.store.reader import ActivationReader as StoreReader

    world, rank = layout.world_size, layout.rank
    stream = sample_reader()
    split = isinstance(stream, StoreReader) and world > 1
    if split:
        stream.split(rank, world)
    parts, positions, seen, d = [], [], 0, None
    for batch in stream:
        d = batch.shape[1]
        if split:
            at = seen + stream.last_batch_positions
            keep = at < n_tokens
            parts.append(batch[keep].to(device="cpu", dtype=torch.float32))
            positions.append(at[keep])
            seen += min(stream.last_batch_size, n_tokens - seen)
        else:
            take = min(batch.shape[0], n_tokens - seen)
            first = (rank - seen) % world  # the first row of this batch whose stream position is rank mod world
            parts.append(batch[first:take:world].to(device="cpu", dtype=torch.float32))
            positions.append(torch.arange(seen + first, seen + take, world))
            seen += take
        if seen >= n_tokens:
            break
    if d is None:
        raise UserInputError("SaeTrainer: the activation run yields no batch to initialise b_dec from")
    gather = gather or all_gather_rows  # the stepper's seam
    local = torch.cat(parts) if parts else torch.empty(0, d)
    where = torch.cat(positions) if positions else torch.empty(0, dtype=torch.long)
    full = torch.empty(seen, d)
    for part, at in zip(gather(local), gather(where)):
        full[at] = part
    return lambda: [full]


# -- BatchTopK over ranks ---------------------------------------------------------------------------------------
def batch_topk_select(values: Tensor, total: int, *, split_tokens: bool = True) -> Tensor:
    """`mi_crow.ops.batch_topk.batch_topk_select` over every rank's candidates: per-token counts of this rank's
    share of the ``K`` largest candidate values of all ranks (collective; called by every rank).

    The ``K``-th largest value ``tau`` is found from an all-gather of each rank's ``min(K, B_r c)`` largest values
    (``K`` floats per rank, never the dense code); every candidate above ``tau`` is kept, and the ties at ``tau``
    that complete ``K`` go to the lower ranks first (in token order). Each row of ``values`` is sorted descending,
    so the kept candidates of a token are a prefix, as the single-process selection's.

    Args:
        values: ``[B_r, c]`` this rank's candidate values.
        total: ``split_tokens``: this rank's ``k * B_r`` (``K`` is their sum: data-parallel ranks hold different
            tokens); else ``K`` itself (ranks holding different latents of the same tokens).
    """
    B, c = values.shape
    flat = values.reshape(-1)
    sums = all_reduce(torch.tensor([total if split_tokens else 0, flat.numel()], dtype=torch.int64))
    K = int(sums[0]) if split_tokens else total
    if K >= int(sums[1]):
        return torch.full((B,), c, dtype=torch.int64, device=values.device)
    local_top = flat.topk(min(K, flat.numel())).values if flat.numel() else flat
    candidates = torch.cat(all_gather_rows(local_top.float()))
    tau = candidates.topk(K).values[-1].to(values.dtype)
    greater = (values > tau).sum(dim=1)
    tied = values == tau
    counts = all_gather_same(torch.stack([greater.sum(), tied.sum()]))
    rank = dist.get_rank()
    need = K - sum(int(part[0]) for part in counts) - sum(int(part[1]) for part in counts[:rank])
    take = max(0, min(int(counts[rank][1]), need))
    rows = tied.reshape(-1).nonzero().squeeze(1)[:take] // c
    return greater + torch.bincount(rows, minlength=B)


# -- latent-sharded step ---------------------------------------------------------------------------------------
def _global_topk(values: Tensor, indices: Tensor, k: int, layout: Layout) -> tuple[Tensor, Tensor, Tensor]:
    """Choose the global top-``k`` of every token from each rank's ``[B, k_r]`` candidates.

    Returns:
        ``(chosen [B, k_r] bool: which of this rank's candidates won, values [B, k], global indices [B, k])``.
    """
    world, kr = layout.world_size, values.shape[1]
    all_v = torch.cat(all_gather_same(values), dim=1)  # [B, W k_r], rank-major: lower latents first
    all_i = torch.cat(all_gather_same(indices), dim=1)
    top = all_v.topk(min(k, world * kr), dim=1)
    won = torch.zeros_like(all_v, dtype=torch.bool).scatter_(1, top.indices, True)
    mine = won[:, layout.rank * kr : (layout.rank + 1) * kr]
    return mine, top.values, all_i.gather(1, top.indices)


def latent_losses(
    stepper: SaeStepper,
    layout: Layout,
    x: Tensor,
    *,
    dead_mask: Tensor | None,
    k_aux: int,
    auxk_coef: float,
    encode_dtype: torch.dtype | None,
    l1_lambda: float,
    k: int | None,
    topk_by_decoder_norm: bool,
) -> LossOutput:
    """`SaeStepper.compute_losses` of the latent-sharded layout (``stepper.sae`` is this rank's slice; ``x`` the
    whole batch, the same on every rank; ``dead_mask`` this rank's slice of the dead mask, None when no latent of
    any rank is dead)."""
    from mi_crow.mechanistic.sae.train.step import _sum_sq

    sae = stepper.sae
    n_local = sae.n_latents
    n_total = n_local * layout.world_size
    lo, _ = layout.latent_slice(n_total)
    W_enc, b_enc, W_dec = sae.W_enc, sae.b_enc, sae.W_dec
    if topk_by_decoder_norm:
        norms = W_dec.norm(dim=1).clamp_min(1e-12)
        W_enc, b_enc, W_dec = W_enc * norms.unsqueeze(1), b_enc * norms, W_dec / norms.unsqueeze(1)
    k = sae.k if k is None else k
    use_aux = dead_mask is not None and k_aux > 0 and auxk_coef > 0
    k_aux_local = min(k_aux, n_local)
    enc_dtype = encode_dtype or sae.dtype
    compute_dtype = enc_dtype if enc_dtype != sae.dtype else None
    batch_topk = getattr(sae, "selection", "topk") == "batchtopk"
    if batch_topk:
        # BatchTopK: the k*B largest candidates of every rank's slice, one threshold over all latents
        # (batch_topk_select over the latent ranks), so every candidate this rank keeps is a winner.
        code = batch_topk_encode(
            x, W_enc, b_enc, sae.b_dec, k, dead_mask if use_aux else None, k_aux_local if use_aux else 0,
            compute_dtype=compute_dtype,
            select_fn=lambda v, total: batch_topk_select(v, total, split_tokens=False),
            any_fn=lambda flag: bool(all_reduce(torch.tensor(flag), "max")),
        )
        _latent_threshold(sae, code.threshold)
        values = code.values.to(sae.dtype)
        mine = torch.ones_like(values, dtype=torch.bool)
        local_values = values
    else:
        code = ops.topk_encode(
            x, W_enc, b_enc, sae.b_dec, k, dead_mask if use_aux else None, k_aux_local if use_aux else 0,
            compute_dtype=compute_dtype,
        )
        values = code.values.to(sae.dtype)
        mine, g_values, _ = _global_topk(values.detach(), code.indices + lo, k, layout)
        local_values = values * mine.to(values.dtype)  # the winners keep their gradient, the losers give none
    # b_dec enters the reconstruction once: through rank 0's partial decode (the other ranks add a zero bias).
    bias = sae.b_dec if layout.rank == 0 else torch.zeros_like(sae.b_dec)
    aux_on = use_aux and code.aux_values is not None
    local_aux = None
    if aux_on:
        aux_values = code.aux_values.to(sae.dtype)
        aux_mine, _, _ = _global_topk(aux_values.detach(), code.aux_indices + lo, k_aux, layout)
        local_aux = aux_values * aux_mine.to(aux_values.dtype)
    total_var = stepper._centered_sum_sq(x)
    prefixes = getattr(stepper._full_sae, "prefix_sizes", None)
    e_hat = None
    if prefixes is not None and len(prefixes) > 1:
        # Matryoshka: each rank's partial prefix reconstructions [B, G, d] (a slot's group is that of its global
        # index: the bounds shifted by this rank's first latent), summed over ranks in one all-reduce.
        from mi_crow.mechanistic.sae.train.losses import matryoshka_reconstructions

        recons = sum_with_local_grad(
            matryoshka_reconstructions(local_values, code.indices, W_dec, bias, [p - lo for p in prefixes]))
        errs = x.unsqueeze(1) - recons
        flat = errs if errs.dtype in (torch.float32, torch.float64) else errs.float()
        prefix_sse = flat.pow(2).sum(dim=(0, 2))
        prefix_fvu = prefix_sse / total_var
        loss = prefix_fvu.sum()
        err, sse, fvu = errs[:, -1], prefix_sse[-1], prefix_fvu[-1]
        if local_aux is not None:
            e_hat = sum_with_local_grad(ops.sparse_decode(local_aux, code.aux_indices, W_dec,
                                                          torch.zeros_like(sae.b_dec)))
    else:
        if local_aux is not None:
            part_x, part_e = ops.sparse_decode_with_aux(local_values, code.indices, local_aux, code.aux_indices,
                                                        W_dec, bias)
            both = sum_with_local_grad(torch.cat([part_x, part_e]))  # one all-reduce for both decodes
            x_hat, e_hat = both[: x.shape[0]], both[x.shape[0] :]
        else:
            x_hat = sum_with_local_grad(ops.sparse_decode(local_values, code.indices, W_dec, bias))
        err = x - x_hat
        sse = _sum_sq(err)
        fvu = sse / total_var
        loss = fvu
    auxk = x.new_zeros(())
    if e_hat is not None:
        target = err.detach()
        auxk = _sum_sq(target - e_hat) / stepper._centered_sum_sq(target)
        auxk = torch.nan_to_num(auxk, nan=0.0, posinf=0.0, neginf=0.0)
        loss = loss + auxk_coef * auxk
    count = x.shape[0]
    l1_source = local_values if l1_lambda > 0 else local_values.detach()
    l1 = sum_with_local_grad(l1_source.abs().sum(dtype=torch.float32)) / (count * n_total)
    if l1_lambda > 0:
        loss = loss + l1_lambda * l1.to(loss.dtype)
    if batch_topk:
        l0 = all_reduce((values.detach() > 0).sum(dtype=torch.float32)) / count
    else:
        l0 = (g_values > 0).sum(dtype=torch.float32) / count
    active = (values.detach() > 0) & mine
    hits = torch.zeros(n_local, dtype=torch.int32, device=x.device)
    hits.index_add_(0, code.indices.reshape(-1), active.reshape(-1).to(torch.int32))
    return LossOutput(loss, fvu.detach(), sse.detach(), auxk.detach(), l0, hits > 0, count, l1.detach())


@torch.no_grad()
def _latent_threshold(sae: Any, batch_min: Tensor) -> None:
    """The BatchTopK running threshold of a latent-sharded run: the smallest positive winner over every rank's slice
    (a rank without one takes part with +inf), averaged as `losses._update_threshold` does, the same on every rank."""
    from mi_crow.mechanistic.sae.train.losses import THRESHOLD_MOMENTUM

    if not sae.training:
        return
    local = torch.nan_to_num(batch_min.to(sae.threshold.dtype), nan=float("inf"))
    smallest = -all_reduce(-local.reshape(1), "max")[0]
    if not bool(torch.isfinite(smallest)):
        return
    if bool(torch.isnan(sae.threshold)):
        sae.threshold.copy_(smallest)
    else:
        sae.threshold.mul_(THRESHOLD_MOMENTUM).add_(smallest, alpha=1.0 - THRESHOLD_MOMENTUM)


def shard_sae(full: TopKSae, layout: Layout, *, release: bool = False) -> TopKSae:
    """A `TopKSae` holding this rank's latents of ``full`` (copies), ``b_dec`` included.

    ``release``: free each of ``full``'s latent-indexed weights as soon as its rows are copied (see
    `release_latents`), so at most one slice more than ``full`` is held, never a second dictionary."""
    from mi_crow.mechanistic.sae.sae import TopKSae

    lo, hi = layout.latent_slice(full.n_latents)
    with torch.random.fork_rng(devices=[]):  # (a meta SAE draws nothing; the global RNG must not move anyway)
        extra = ({"group_sizes": [hi - lo], "batch_topk": full.batch_topk} if hasattr(full, "group_sizes") else {})
        shard = type(full)(hi - lo, full.n_inputs, full.k, device="meta", dtype=full.dtype, **extra)
    with torch.no_grad():
        for name in _LATENT_WEIGHTS:
            source = getattr(full, name)
            # New parameters in the meta ones' places (same names, same registration order).
            setattr(shard, name, torch.nn.Parameter(source.data[lo:hi].clone()))
            if release:
                source.data = source.data.new_empty((0, *source.shape[1:]))
        shard.b_dec = torch.nn.Parameter(full.b_dec.data.clone())
        if isinstance(getattr(full, "threshold", None), Tensor):  # BatchTopK: the replicated running threshold
            shard.threshold = full.threshold.clone()
    shard.train(full.training)
    return shard


_LATENT_WEIGHTS = ("W_enc", "b_enc", "W_dec")


def release_latents(full: TopKSae) -> None:
    """Free the storage of ``full``'s latent-indexed weights (the parameters stay, empty) while its shards train."""
    full.W_enc.data = full.W_enc.data.new_empty(0, full.n_inputs)
    full.b_enc.data = full.b_enc.data.new_empty(0)
    full.W_dec.data = full.W_dec.data.new_empty(0, full.n_inputs)


def unshard_into(shard: TopKSae, full: TopKSae) -> None:
    """All-gather every rank's slice back into ``full``'s parameters (same Parameter objects, full size)."""
    world = dist.get_world_size()
    with torch.no_grad():
        for name in _LATENT_WEIGHTS:
            local = getattr(shard, name).detach().contiguous()
            whole = local.new_empty((local.shape[0] * world, *local.shape[1:]))
            # Gathered straight into the row blocks of the whole tensor: no second full-size copy.
            _count(local)
            _collective("all_gather", lambda w=whole, t=local: dist.all_gather(list(w.chunk(world)), t))
            getattr(full, name).data = whole
        full.b_dec.data = shard.b_dec.detach().clone()
        if isinstance(getattr(shard, "threshold", None), Tensor):
            full.threshold.copy_(shard.threshold)


def _normal_rows(generator: torch.Generator, n: int, d: int, lo: int, hi: int) -> Tensor:
    """Rows ``[lo, hi)`` of ``torch.randn(n, d, generator=generator)`` (float32), leaving ``generator`` where that
    draw would: the rows before and after are drawn in pieces of at most 2^22 values and dropped.

    CPU normal sampling fills a tensor with uniforms in order and transforms them in blocks of 16, so pieces whose
    sizes are multiples of 16 continue the one stream exactly (``d % 16 == 0``; otherwise the whole ``[n, d]`` is
    drawn and sliced)."""
    if d % 16:
        return torch.randn(n, d, generator=generator)[lo:hi].clone()

    def skip(values: int) -> None:
        piece = (1 << 22) - (1 << 22) % d
        while values:
            step = min(values, piece)
            torch.randn(step, generator=generator)
            values -= step

    skip(lo * d)
    rows = torch.randn(hi - lo, d, generator=generator)
    skip((n - hi) * d)
    return rows


def initialise_latent_shard(shard: TopKSae, full_shape: tuple[int, int, int], config: SaeTrainingConfig,
                            sample_reader: Callable[[], Iterable[Tensor]], layout: Layout) -> float:
    """Initialise this rank's slice exactly as the single-process initialisation would initialise those latents.

    With ``reinit_weights`` the rows of this slice are drawn from the seed's stream as the single-process draw of
    the whole ``[n, d]`` would give them (`_normal_rows`: no full-size tensor); every other step of the
    initialisation is per latent or on the replicated ``b_dec``, so it runs on the slice itself.
    """
    from mi_crow.mechanistic.sae.train.init import initialise_weights

    if not config.reinit_weights:
        return initialise_weights(shard, config, sample_reader)
    n, d, _ = full_shape
    lo, hi = layout.latent_slice(n)
    # What initialise_weights does with reinit_weights, in its order: the sample's scale and b_dec (the biases
    # start from 0, as reset_parameters leaves them), then the decoder rows, then the encoder.
    with torch.no_grad():
        shard.b_enc.zero_()
        shard.b_dec.zero_()
    scale = initialise_weights(shard, dataclasses.replace(config, reinit_weights=False,
                                                          init_encoder_from_decoder=False), sample_reader)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        w = _normal_rows(generator, n, d, lo, hi)
        w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))
        shard.W_dec.copy_(w)
        if config.init_encoder_from_decoder or shard.is_transcoder:
            shard.W_enc.copy_(w)
        else:
            del w
            shard.W_enc.copy_(_normal_rows(generator, n, d, lo, hi).div_(math.sqrt(d)))
    return scale


# -- one SAE per layer per rank --------------------------------------------------------------------------------
def assign_layers(costs: dict[str, int], world_size: int) -> list[list[str]]:
    """Spread layers over ranks, largest first onto the least loaded rank (ties: the lower rank).

    Args:
        costs: layer -> its work (e.g. ``n_latents * width``); any positive numbers, any count of layers.
        world_size: number of ranks.

    Returns:
        ``world_size`` lists of layers (a rank may get none when there are fewer layers than ranks).
    """
    loads = [0] * world_size
    out: list[list[str]] = [[] for _ in range(world_size)]
    for layer in sorted(costs, key=lambda name: (-costs[name], name)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        out[rank].append(layer)
        loads[rank] += costs[layer]
    return out


def train_layers(
    store: Store,
    run_id: str,
    saes: dict[str, TopKSae],
    config: SaeTrainingConfig,
) -> dict[str, Any]:
    """Train one SAE per layer, the layers spread over the ranks of the process group (``parallel="layers"``).

    Every rank passes the same ``saes`` mapping (layer -> SAE of that layer's width; widths and latent counts may
    differ) and config; each rank trains the layers `assign_layers` gives it, one after the other, as
    single-process runs named ``<training_run_id>-<layer>`` (SAEs saved under the same names). Without a process
    group every layer is trained here.

    Returns:
        layer -> `TrainingResult` for the layers this rank trained.

    Raises:
        UserInputError: ``config.parallel`` is not ``"layers"`` (or None), ``saes`` is empty, or the ranks'
            configurations differ.
    """
    from mi_crow.mechanistic.sae.train.trainer import SaeTrainer

    if config.parallel not in (None, "layers"):
        raise fail("SaeTrainingConfig.parallel", "'layers' (or None) for train_layers", config.parallel)
    if not isinstance(saes, dict) or not saes:
        raise fail("train_layers: saes", "a non-empty dict layer -> TopKSae", saes)
    grouped = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
    if grouped:
        shapes = {layer: sae.config_dict() for layer, sae in sorted(saes.items())}
        check_same_config(dataclasses.replace(config, parallel="layers", rank=rank, world_size=world),
                          {"n_latents": json.dumps({k: v.get("n_latents") for k, v in shapes.items()}),
                           "n_inputs": json.dumps({k: v.get("n_inputs") for k, v in shapes.items()}),
                           "k": json.dumps({k: v.get("k") for k, v in shapes.items()})})
    plan = assign_layers({layer: sae.n_latents * sae.n_inputs for layer, sae in saes.items()}, world)
    base = config.training_run_id or "layers"
    results = {}
    for layer in plan[rank]:
        name = f"{base}-{_safe(layer)}"
        layer_config = dataclasses.replace(config, parallel=None, rank=0, world_size=1, training_run_id=name,
                                           sae_id=config.sae_id and f"{config.sae_id}-{_safe(layer)}",
                                           progress=config.progress and rank == 0)
        results[layer] = SaeTrainer(saes[layer], store).train(run_id, layer, layer_config)
    if grouped:
        barrier()
    return results


def _safe(layer: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in layer)


# -- launch ----------------------------------------------------------------------------------------------------
def init_from_env(timeout_s: float = 300.0) -> Layout | None:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``...) when there is one and none is initialised: NCCL when CUDA is available, else gloo.

    Returns:
        None outside torchrun (no ``WORLD_SIZE``), else a `Layout` with parallel ``""`` (rank and world size).
    """
    if "WORLD_SIZE" not in os.environ:
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Layout("", dist.get_rank(), dist.get_world_size())



def _one_value(args: Any, name: str) -> Any:
    value = getattr(args, name)
    if isinstance(value, list):
        if len(value) > 1:
            flag = "--" + name.replace("_", "-")
            raise UserInputError(f"{flag} {','.join(map(str, value))}: --parallel layers trains one SAE per layer "
                                 f"with one {flag} value")
        return value[0]
    return value


def cli_layers(store: Store, run_id: str, args: Any) -> int:
    """``mi-crow train --parallel layers``: an SAE for every layer of the run (or the comma-separated ``--layer``
    list), ``--n-latents`` each (default 8 x the layer's width), spread over the ranks by `train_layers`."""
    from mi_crow.mechanistic.sae import TopKSae

    meta = store.read_run_meta(run_id)
    stored = sorted(meta.get("layer_dims", {}))
    layers = stored if not args.layer else [name.strip() for name in str(args.layer).split(",")]
    unknown = [name for name in layers if name not in stored]
    if unknown:
        raise UserInputError(f"--layer {unknown} not stored in run {run_id!r}; stored layers: {stored}")
    # The CLI's --k, --n-latents and --seed take comma lists (a grid); one SAE per layer takes one value of each.
    k, n_latents, seed = (_one_value(args, name) for name in ("k", "n_latents", "seed"))
    saes = {}
    for name in layers:
        d = int(meta["layer_dims"][name])
        saes[name] = TopKSae(n_latents=n_latents or 8 * d, n_inputs=d, k=k)
    base = args.sae_id or f"{run_id}-topk{k}"
    config = SaeTrainingConfig(
        n_tokens=args.tokens, epochs=args.epochs if args.tokens is None else None, batch_size=args.batch_size,
        lr=args.lr, seed=seed, training_run_id=base, log_every=5, checkpoint_every=50, resume=args.resume,
        b_dec_init_tokens=min(8192, args.batch_size * 8), progress=True, parallel="layers",
    )
    results = train_layers(store, run_id, saes, config)
    for layer, result in results.items():
        print(f"rank {dist.get_rank() if dist.is_initialized() else 0}: trained SAE {result.sae_id!r} on layer "
            f"{layer!r} ({result.steps} steps)", flush=True)
    return 0
