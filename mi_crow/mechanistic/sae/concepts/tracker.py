"""Discovery: each SAE neuron's top texts and firing statistics, collected batch by batch.

While tracking is on, every forward pass through a model with the SAE attached updates, for every neuron, the
``top_k`` texts that activate it most, with the activation, the token position and the token where it fired, plus
per-neuron firing statistics. The update is vectorised (no Python loop over neurons, tokens or texts): one
``scatter_reduce`` builds the per-(text, neuron) maxima of a batch and one ``topk`` over ``[buffer | candidates]``
merges them into persistent ``[n_latents, top_k]`` buffers, run only on the neurons whose best candidate beats their
weakest entry. Memory is O(n_latents * top_k) (plus one batch's ``[batch, n_latents]`` scratch) whatever the dataset
size.

Tracking semantics (documented choices):

* Only real tokens count: positions with ``attention_mask == 0`` or ``special_tokens_mask == True`` are dropped
  before anything else, and a neuron "fires" on a token when its activation there is ``> 0``.
* One entry per (neuron, text): the text's strongest token for that neuron (the earliest token on an exact tie).
* ``token_position`` counts the text's own tokens as the model saw them (special tokens such as BOS included,
  padding excluded), so it does not depend on the batch size or the padding side.
* Texts are deduplicated by identity (string equality): a text seen again (a second run over the same data, or a
  duplicate inside a dataset) updates its existing entry instead of adding a second one; the stronger activation
  is kept.
* Only texts that some buffer refers to are kept. The text table is pruned whenever it has grown to twice its size
  after the previous prune (and at least 1024 entries), so it holds at most about ``2 * n_latents * top_k`` texts
  and usually far fewer; pruning is amortised O(1) per text.
* Statistics (:class:`NeuronStats`) count every tracked forward: a text seen twice counts twice there.
* During ``generate`` only the forward over the prompt is tracked (``generation_step`` 0); the tokens generated
  afterwards are not part of the context's texts. A forward whose shape does not match its batch context is not
  tracked either (with a one-time warning).
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.validation import check_positive_int

logger = logging.getLogger(__name__)

__all__ = ["NeuronStats", "TopText", "TopTextTracker"]

_MIN_TEXT_TABLE = 1024


class TopText(NamedTuple):
    """One entry of a neuron's top-text list."""

    text: str
    """The full text the activation came from."""
    activation: float
    """The neuron's activation at its strongest token in this text."""
    token_position: int
    """Position of that token among the text's tokens (padding excluded, special tokens included)."""
    token: str
    """That token as the tokenizer spells it (``tokenizer.convert_ids_to_tokens``)."""
    token_id: int
    """That token's id."""


class NeuronStats(NamedTuple):
    """Per-neuron statistics over every real token seen while tracking was on. Tensors are on the CPU."""

    tokens_seen: int
    """Number of real (non-padding, non-special) tokens seen."""
    firing_count: Tensor
    """``[n_latents]`` int64: tokens on which the neuron was active (in the top-k with a value > 0)."""
    firing_rate: Tensor
    """``[n_latents]`` float64: ``firing_count / tokens_seen`` (0 before any token)."""
    mean_activation: Tensor
    """``[n_latents]`` float64: mean activation over the tokens where it fired (0 if it never fired)."""
    max_activation: Tensor
    """``[n_latents]`` float32: largest activation seen (0 if it never fired)."""




class TopTextTracker:
    """Per-neuron top-k texts and firing statistics, updated batch by batch with tensor operations only.

    Args:
        n_latents: number of SAE latents.
        top_k: how many texts to keep per neuron.

    Buffers (allocated on the device of the first batch):
        ``values [n_latents, top_k]`` float32, descending, ``-inf`` for empty slots; ``text_ids``, ``positions``,
        ``token_ids`` ``[n_latents, top_k]`` int64 (``-1`` text id for empty slots).
    """

    def __init__(self, n_latents: int, top_k: int) -> None:
        self.n_latents = check_positive_int(n_latents, "n_latents")
        self.top_k = check_positive_int(top_k, "top_k")
        self.tokenizer: Any = None
        self._device: torch.device | None = None
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        self.values: Tensor | None = None
        self.text_ids: Tensor | None = None
        self.positions: Tensor | None = None
        self.token_ids: Tensor | None = None
        self._fire_count: Tensor | None = None
        self._act_sum: Tensor | None = None
        self._act_max: Tensor | None = None
        self._tokens_seen: Tensor | None = None
        self._text_to_id: dict[str, int] = {}
        self._id_to_text: dict[int, str] = {}
        self._next_text_id = 0
        self._prune_at = _MIN_TEXT_TABLE

    def reset(self) -> None:
        """Forget everything seen so far (keeps ``top_k``)."""
        self._reset_buffers()

    @property
    def n_texts_stored(self) -> int:
        """Number of distinct texts currently held in the text table."""
        return len(self._id_to_text)

    def _allocate(self, device: torch.device) -> None:
        n, t = self.n_latents, self.top_k
        self._device = device
        self.values = torch.full((n, t), -math.inf, dtype=torch.float32, device=device)
        self.text_ids = torch.full((n, t), -1, dtype=torch.int64, device=device)
        self.positions = torch.zeros((n, t), dtype=torch.int64, device=device)
        self.token_ids = torch.zeros((n, t), dtype=torch.int64, device=device)
        self._fire_count = torch.zeros(n, dtype=torch.int64, device=device)
        self._act_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self._act_max = torch.zeros(n, dtype=torch.float32, device=device)
        self._tokens_seen = torch.zeros((), dtype=torch.int64, device=device)

    def _assign_text_ids(self, texts: Sequence[str]) -> tuple[list[int], bool]:
        # A dict lookup per text is the price of deduplicating by text identity; it is O(batch) Python work on
        # strings, not on activations, and the tensor update below has no per-text loop.
        ids: list[int] = []
        maybe_duplicate = False
        for text in texts:
            tid = self._text_to_id.get(text)
            if tid is None:
                tid = self._next_text_id
                self._next_text_id += 1
                self._text_to_id[text] = tid
                self._id_to_text[tid] = text
            else:
                maybe_duplicate = True
            ids.append(tid)
        return ids, maybe_duplicate

    @torch.no_grad()
    def update(
        self,
        values: Tensor,
        indices: Tensor,
        texts: Sequence[str],
        input_ids: Tensor,
        valid_mask: Tensor,
        text_positions: Tensor,
    ) -> None:
        """Merge one batch of sparse codes into the buffers.

        Args:
            values: ``[batch, seq, k]`` code values (any float dtype).
            indices: ``[batch, seq, k]`` latent indices (integer) in ``[0, n_latents)``.
            texts: ``batch`` texts, one per row.
            input_ids: ``[batch, seq]`` token ids the model saw.
            valid_mask: ``[batch, seq]`` bool, True for tokens that count (not padding, not special).
            text_positions: ``[batch, seq]`` int64 position of each token within its own text.
        """
        if values.dim() != 3 or indices.shape != values.shape:
            raise UserInputError(
                f"values and indices must both be [batch, seq, k]; got {tuple(values.shape)} and "
                f"{tuple(indices.shape)}"
            )
        b, s, k = values.shape
        if len(texts) != b:
            raise UserInputError(f"texts must have one entry per batch row ({b}), got {len(texts)}")
        for name, t in (("input_ids", input_ids), ("valid_mask", valid_mask), ("text_positions", text_positions)):
            if tuple(t.shape) != (b, s):
                raise UserInputError(f"{name} must have shape [batch, seq] = {[b, s]}, got {list(t.shape)}")
        device = values.device
        if self.values is None:
            self._allocate(device)
        elif self._device != device:
            raise UserInputError(f"tracking buffers live on {self._device}, but this batch is on {device}")
        if b == 0 or s == 0:
            return
        n, top = self.n_latents, self.top_k

        v = values.detach().to(torch.float32)
        idx = indices.detach().to(torch.int64)
        valid = valid_mask.to(device=device, dtype=torch.bool)
        active = valid.unsqueeze(-1) & (v > 0)
        v = torch.where(active, v, torch.zeros((), dtype=v.dtype, device=device))
        flat_idx = idx.reshape(-1)
        flat_v = v.reshape(-1)
        flat_active = active.reshape(-1)

        # Statistics, in the same pass. Within one token the k indices are distinct, so counting active
        # (token, latent) entries counts tokens.
        self._fire_count.index_add_(0, flat_idx, flat_active.to(torch.int64))
        self._act_sum.index_add_(0, flat_idx, flat_v.to(torch.float64))
        self._act_max.scatter_reduce_(0, flat_idx, flat_v, reduce="amax")
        self._tokens_seen += valid.sum()

        # Per (row, latent) maximum over the row's tokens, then the earliest token that reaches it.
        rows = torch.arange(b, device=device).view(b, 1, 1)
        key = (rows * n + idx).reshape(-1)
        best = torch.zeros(b * n, dtype=torch.float32, device=device)
        best.scatter_reduce_(0, key, flat_v, reduce="amax")
        seq_pos = torch.arange(s, device=device).view(1, s, 1).expand(b, s, k).reshape(-1)
        is_winner = flat_active & (flat_v == best[key])
        best_pos = torch.full((b * n,), s, dtype=torch.int64, device=device)
        best_pos.scatter_reduce_(
            0, key, torch.where(is_winner, seq_pos, torch.full_like(seq_pos, s)), reduce="amin"
        )

        batch_ids_list, maybe_duplicate = self._assign_text_ids(texts)
        if len(set(batch_ids_list)) != b:
            maybe_duplicate = True
        batch_ids = torch.tensor(batch_ids_list, dtype=torch.int64, device=device)

        # Only neurons whose best candidate beats their current weakest entry can change, so the merge runs on
        # those rows alone: after warm-up that is a small fraction of n_latents. A text seen before can only
        # replace its own entry with a stronger activation, which then also beats the weakest entry.
        best = best.view(b, n)
        best_max = best.amax(dim=0)  # [n]
        rows_to_merge = ((best_max > 0) & (best_max > self.values[:, top - 1])).nonzero().squeeze(1)  # [u]
        if rows_to_merge.numel() > 0:
            self._merge_rows(rows_to_merge, best, best_pos.view(b, n), batch_ids, maybe_duplicate,
                             input_ids.to(device), text_positions.to(device), s)

        if len(self._id_to_text) > self._prune_at:
            self._prune_texts()

    def _merge_rows(
        self,
        rows: Tensor,
        best: Tensor,
        best_pos: Tensor,
        batch_ids: Tensor,
        maybe_duplicate: bool,
        input_ids: Tensor,
        text_positions: Tensor,
        s: int,
    ) -> None:
        """One top-k over ``[buffer | candidates]`` for the neurons in ``rows`` (``[u]``); ``best``/``best_pos``
        are the batch's per-(text, neuron) maxima and their seq positions, ``[batch, n_latents]``."""
        top = self.top_k
        u, b = rows.numel(), best.shape[0]
        # index_select/take rather than advanced indexing: much cheaper on CPU for these shapes.
        cand_v = best.index_select(1, rows).t()  # [u, b]
        cand_v = torch.where(cand_v > 0, cand_v, torch.full((), -math.inf, device=cand_v.device))
        cand_seq = best_pos.index_select(1, rows).t().clamp(max=s - 1)  # [u, b] seq position of each candidate
        flat = cand_seq + torch.arange(b, device=rows.device).view(1, b) * s
        all_ids = torch.cat([self.text_ids.index_select(0, rows), batch_ids.view(1, b).expand(u, b)], dim=1)
        all_v = torch.cat([self.values.index_select(0, rows), cand_v], dim=1)  # [u, top + b]
        if maybe_duplicate:
            all_v = self._drop_duplicate_texts(all_v, all_ids)
        top_v, top_j = all_v.topk(top, dim=1)  # sorted descending
        all_pos = torch.cat([self.positions.index_select(0, rows), text_positions.take(flat)], dim=1)
        all_tok = torch.cat([self.token_ids.index_select(0, rows), input_ids.take(flat)], dim=1)
        new_ids = all_ids.gather(1, top_j)
        new_ids.masked_fill_(torch.isinf(top_v), -1)
        self.values.index_copy_(0, rows, top_v)
        self.text_ids.index_copy_(0, rows, new_ids)
        self.positions.index_copy_(0, rows, all_pos.gather(1, top_j))
        self.token_ids.index_copy_(0, rows, all_tok.gather(1, top_j))

    @staticmethod
    def _drop_duplicate_texts(all_v: Tensor, all_ids: Tensor) -> Tensor:
        """Keep, per row, only the strongest entry of each text id; the others become ``-inf``."""
        # Stable sorts: first by value (descending), then by id; the first entry of each id group is its maximum
        # and, on equal values, the buffer entry (buffer columns come first) is kept.
        order_v = torch.sort(all_v, dim=1, descending=True, stable=True).indices
        ids_v = all_ids.gather(1, order_v)
        order_id = torch.sort(ids_v, dim=1, stable=True).indices
        ids_sorted = ids_v.gather(1, order_id)
        first = torch.ones_like(ids_sorted, dtype=torch.bool)
        first[:, 1:] = ids_sorted[:, 1:] != ids_sorted[:, :-1]
        keep = torch.zeros_like(first)
        keep.scatter_(1, order_v.gather(1, order_id), first)
        return torch.where(keep, all_v, torch.full((), -math.inf, device=all_v.device))

    def _prune_texts(self) -> None:
        referenced = torch.unique(self.text_ids)
        keep = {int(t) for t in referenced.tolist() if t >= 0}
        self._id_to_text = {tid: txt for tid, txt in self._id_to_text.items() if tid in keep}
        self._text_to_id = {txt: tid for tid, txt in self._id_to_text.items()}
        self._prune_at = max(_MIN_TEXT_TABLE, 2 * len(self._id_to_text))
        logger.debug("pruned text table to %d texts", len(self._id_to_text))

    def _token_strings(self, token_ids: list[int]) -> dict[int, str]:
        unique = sorted(set(token_ids))
        if not unique:
            return {}
        if self.tokenizer is None:
            return {t: str(t) for t in unique}
        tokens = self.tokenizer.convert_ids_to_tokens(unique)
        return {t: (str(tok) if tok is not None else str(t)) for t, tok in zip(unique, tokens)}

    def top_texts(self, neurons: Sequence[int] | None = None) -> list[list[TopText]]:
        """Top-text records for the given neurons (all when ``None``), strongest first; empty slots omitted."""
        if self.values is None:
            count = self.n_latents if neurons is None else len(neurons)
            return [[] for _ in range(count)]
        sel = slice(None) if neurons is None else torch.tensor(list(neurons), dtype=torch.int64)
        if isinstance(sel, Tensor):
            sel = sel.to(self.values.device)
        vals = self.values[sel].cpu().tolist()
        ids = self.text_ids[sel].cpu().tolist()
        pos = self.positions[sel].cpu().tolist()
        toks = self.token_ids[sel].cpu().tolist()
        token_str = self._token_strings([t for row_ids, row_toks in zip(ids, toks)
                                         for i, t in zip(row_ids, row_toks) if i >= 0])
        out: list[list[TopText]] = []
        for row_v, row_i, row_p, row_t in zip(vals, ids, pos, toks):
            out.append(
                [
                    TopText(self._id_to_text[i], v, p, token_str[t], t)
                    for v, i, p, t in zip(row_v, row_i, row_p, row_t)
                    if i >= 0
                ]
            )
        return out

    def stats(self) -> NeuronStats:
        """Per-neuron statistics (see :class:`NeuronStats`)."""
        n = self.n_latents
        if self.values is None:
            zeros64 = torch.zeros(n, dtype=torch.float64)
            return NeuronStats(0, torch.zeros(n, dtype=torch.int64), zeros64, zeros64.clone(),
                               torch.zeros(n, dtype=torch.float32))
        count = self._fire_count.cpu()
        seen = int(self._tokens_seen.item())
        rate = count.to(torch.float64) / seen if seen else torch.zeros(n, dtype=torch.float64)
        mean = torch.where(count > 0, self._act_sum.cpu() / count.clamp(min=1).to(torch.float64),
                           torch.zeros((), dtype=torch.float64))
        return NeuronStats(seen, count, rate, mean, self._act_max.cpu().clone())
