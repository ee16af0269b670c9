"""Examples of each feature across its activation range, not only its top texts.

:class:`ActivationSampler` keeps, for every (feature, activation bin) pair, one token drawn uniformly at random
among all the tokens that fell in that bin (a size-one reservoir per slot, by random priorities: the entry with the
largest priority seen wins), and counts the tokens per slot. Bins are log10-spaced, as in the report's activation
histograms. :meth:`ActivationSampler.examples` then picks, per feature, the example of the bin that holds each
asked quantile of the feature's activation distribution (10%, 30%, 50%, 70%, 90% by default), so a reader sees
weak, typical and strong activations. Vectorised: one ``scatter_reduce`` per batch, no loop over features or
tokens; memory ``O(n_latents * n_bins)``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.validation import check_positive_int

__all__ = ["ActivationSampler"]


class ActivationSampler:
    """One random example per (feature, log-activation bin), with counts.

    Args:
        n_latents: number of features.
        n_bins: bins over ``log10_range`` (values outside are clipped into the end bins).
        log10_range: ``(lo, hi)`` of log10(activation).
        seed: seed of the priorities (reproducible sampling).
    """

    def __init__(self, n_latents: int, n_bins: int = 24, log10_range: tuple[float, float] = (-3.0, 3.0),
                 seed: int = 0) -> None:
        self.n_latents = check_positive_int(n_latents, "n_latents")
        self.n_bins = check_positive_int(n_bins, "n_bins")
        lo, hi = (float(v) for v in log10_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise UserInputError(f"log10_range must be two finite numbers lo < hi, got {log10_range!r}")
        self.lo, self.hi = lo, hi
        slots = self.n_latents * self.n_bins
        self.priority = torch.full((slots,), -math.inf)
        self.count = torch.zeros(slots, dtype=torch.int64)
        self.text = torch.full((slots,), -1, dtype=torch.int64)
        self.position = torch.zeros(slots, dtype=torch.int64)
        self.token_id = torch.zeros(slots, dtype=torch.int64)
        self.value = torch.zeros(slots, dtype=torch.float32)
        self._generator = torch.Generator().manual_seed(int(seed))

    @torch.no_grad()
    def update(self, values: Tensor, indices: Tensor, valid: Tensor, text_index: Tensor, positions: Tensor,
               token_ids: Tensor) -> None:
        """Add one batch.

        Args:
            values: ``[batch, seq, k]`` code values.
            indices: ``[batch, seq, k]`` feature indices.
            valid: ``[batch, seq]`` bool, tokens that count (real, not special, not outliers).
            text_index: ``[batch]`` int64, each row's index in the caller's list of texts.
            positions: ``[batch, seq]`` int64 position of each token within its text.
            token_ids: ``[batch, seq]`` token ids.
        """
        if values.dim() != 3 or indices.shape != values.shape:
            raise UserInputError(f"values and indices must be [batch, seq, k], got {tuple(values.shape)} and "
                                 f"{tuple(indices.shape)}")
        b, s, k = values.shape
        v = values.detach().float().cpu()
        active = (valid.cpu().bool().unsqueeze(-1) & (v > 0)).reshape(-1)
        if not bool(active.any()):
            return
        v = v.reshape(-1)[active]
        feature = indices.cpu().reshape(-1)[active]
        width = (self.hi - self.lo) / self.n_bins
        bins = ((v.log10() - self.lo) / width).floor().clamp(0, self.n_bins - 1).long()
        slot = feature * self.n_bins + bins
        token = torch.arange(b * s).view(b, s, 1).expand(b, s, k).reshape(-1)[active]
        self.count.index_add_(0, slot, torch.ones_like(slot))
        priority = torch.rand(slot.shape[0], generator=self._generator)
        best = torch.full_like(self.priority, -math.inf)
        best.scatter_reduce_(0, slot, priority, reduce="amax")
        won = priority == best[slot]
        won &= priority > self.priority[slot]
        win_slot = slot[won]
        win_token = token[won]
        rows, cols = win_token // s, win_token % s
        self.priority[win_slot] = priority[won]
        self.value[win_slot] = v[won]
        self.text[win_slot] = text_index.cpu().long()[rows]
        self.position[win_slot] = positions.cpu().long()[rows, cols]
        self.token_id[win_slot] = token_ids.cpu().long()[rows, cols]

    def examples(self, texts: Sequence[str], tokenizer: Any = None, features: Sequence[int] | None = None,
                 quantiles: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)) -> dict[int, list[dict[str, Any]]]:
        """Per feature, one example per asked quantile of its activations (duplicates merged), weakest first.

        Args:
            texts: the texts the ``text_index`` values of :meth:`update` point into.
            tokenizer: turns token ids into token strings (optional).
            features: which features (default: every feature with a sample).
            quantiles: the quantiles, each in ``(0, 1]``.

        Returns:
            ``{feature: [{"text", "activation", "token_position", "token", "token_id", "quantile"}]}``.
        """
        for q in quantiles:
            if not 0 < float(q) <= 1:
                raise UserInputError(f"quantiles must lie in (0, 1], got {q!r}")
        counts = self.count.view(self.n_latents, self.n_bins)
        totals = counts.sum(dim=1)
        if features is None:
            features = torch.nonzero(totals > 0).flatten().tolist()
        cum = counts.cumsum(dim=1)
        out: dict[int, list[dict[str, Any]]] = {}
        for f in features:
            total = int(totals[f])
            if total == 0:
                continue
            chosen: dict[int, float] = {}
            for q in quantiles:
                b = int(torch.searchsorted(cum[f], torch.tensor(max(1, math.ceil(q * total)))))
                chosen.setdefault(min(b, self.n_bins - 1), float(q))
            rows = []
            for b, q in sorted(chosen.items()):
                slot = f * self.n_bins + b
                tid = int(self.text[slot])
                if tid < 0 or tid >= len(texts):
                    continue
                token_id = int(self.token_id[slot])
                token = tokenizer.convert_ids_to_tokens(token_id) if tokenizer is not None else None
                rows.append({"text": texts[tid], "activation": float(self.value[slot]),
                             "token_position": int(self.position[slot]), "token": token, "token_id": token_id,
                             "quantile": q})
            out[int(f)] = rows
        return out
