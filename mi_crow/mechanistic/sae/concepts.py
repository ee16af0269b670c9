"""Concepts: what each SAE neuron responds to, names for neurons, and steering the model through them.

Three parts, all reached through ``sae.concepts`` (an :class:`AutoencoderConcepts`):

* **Discovery** (:class:`TopTextTracker`): while tracking is on, every forward pass through a model with the SAE
  attached updates, for every neuron, the ``top_k`` texts that activate it most, with the activation, the token
  position and the token where it fired, plus per-neuron firing statistics. The update is vectorised (no Python
  loop over neurons, tokens or texts): one ``scatter_reduce`` builds the per-(text, neuron) maxima of a batch and
  one ``topk`` over ``[buffer | candidates]`` merges them into persistent ``[n_latents, top_k]`` buffers, run only
  on the neurons whose best candidate beats their weakest entry. Memory is O(n_latents * top_k) (plus one batch's
  ``[batch, n_latents]`` scratch) whatever the dataset size.
* **Naming** (:class:`~mi_crow.mechanistic.sae.concept_dictionary.ConceptDictionary`): neuron -> name and notes,
  saved as ``sae_models/<sae_id>/concepts.json`` in a store (or any path), importable from CSV.
* **Steering**: ``manipulate_concept`` scales a neuron's activation where it fires (1.5 amplifies, 0.5 suppresses,
  0 ablates) and ``add_concept`` adds a chosen activation of a neuron (its decoder direction) wherever the user
  asks. The SAE applies them through :meth:`AutoencoderConcepts.modify_code`, adding only
  ``decode(modified code) - decode(code)`` to the layer output so the model's own reconstruction error is kept.

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

import csv
import io
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from mi_crow.mechanistic.sae.concept_dictionary import (
    Concept,
    ConceptDictionary,
    _atomic_write_text,
)

logger = logging.getLogger(__name__)

__all__ = [
    "AutoencoderConcepts",
    "Concept",
    "ConceptDictionary",
    "NeuronStats",
    "TopText",
    "TopTextTracker",
]

_CONFIG_VERSION = 1
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


@dataclass(frozen=True)
class _Addition:
    activation: float
    positions: tuple[int, ...] | None


def _check_positive_int(value: Any, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{arg} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{arg} must be a positive int, got {value}")
    return int(value)


def _check_finite_number(value: Any, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg} must be a real number, got {type(value).__name__} {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{arg} must be finite, got {out}")
    return out


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
        self.n_latents = _check_positive_int(n_latents, "n_latents")
        self.top_k = _check_positive_int(top_k, "top_k")
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
            raise ValueError(
                f"values and indices must both be [batch, seq, k]; got {tuple(values.shape)} and "
                f"{tuple(indices.shape)}"
            )
        b, s, k = values.shape
        if len(texts) != b:
            raise ValueError(f"texts must have one entry per batch row ({b}), got {len(texts)}")
        for name, t in (("input_ids", input_ids), ("valid_mask", valid_mask), ("text_positions", text_positions)):
            if tuple(t.shape) != (b, s):
                raise ValueError(f"{name} must have shape [batch, seq] = {[b, s]}, got {list(t.shape)}")
        device = values.device
        if self.values is None:
            self._allocate(device)
        elif self._device != device:
            raise ValueError(f"tracking buffers live on {self._device}, but this batch is on {device}")
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


class AutoencoderConcepts:
    """Concept discovery, naming and steering for one SAE (``sae.concepts``).

    Args:
        sae: the SAE; needs ``n_latents`` and, for steering through ``modify_code``, nothing else. Its hook calls
            :meth:`observe` (when :attr:`tracking_enabled`) and :meth:`modify_code` on every forward.

    Attributes:
        dictionary: the :class:`ConceptDictionary` of named neurons.
    """

    def __init__(self, sae: Any) -> None:
        self.sae = sae
        self._dictionary: ConceptDictionary | None = None
        self._tracker: TopTextTracker | None = None
        self._tracking = False
        self._warned_shape = False
        self._scales: dict[int, float] = {}
        self._additions: dict[int, _Addition] = {}
        self._scale_tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._prompt_lengths: Tensor | None = None

    # ------------------------------------------------------------------ basics
    @property
    def n_latents(self) -> int:
        """Number of latents of the SAE."""
        return int(self.sae.n_latents)

    @property
    def dictionary(self) -> ConceptDictionary:
        """The concept dictionary (created empty on first use)."""
        if self._dictionary is None or self._dictionary.n_latents != self.n_latents:
            self._dictionary = ConceptDictionary(self.n_latents)
        return self._dictionary

    @dictionary.setter
    def dictionary(self, value: ConceptDictionary) -> None:
        if not isinstance(value, ConceptDictionary):
            raise TypeError(f"dictionary must be a ConceptDictionary, got {type(value).__name__}")
        if value.n_latents != self.n_latents:
            raise ValueError(
                f"dictionary is for n_latents={value.n_latents}, but the SAE has n_latents={self.n_latents}"
            )
        self._dictionary = value

    def _resolve(self, neuron_idx_or_name: int | str) -> int:
        return self.dictionary.resolve(neuron_idx_or_name)

    # ------------------------------------------------------------------ tracking
    @property
    def tracking_enabled(self) -> bool:
        """Whether forwards through the attached SAE update the top texts."""
        return self._tracking

    @property
    def top_k(self) -> int | None:
        """Texts kept per neuron, or ``None`` if tracking was never enabled."""
        return None if self._tracker is None else self._tracker.top_k

    def enable_text_tracking(self, top_k: int = 10) -> None:
        """Start collecting each neuron's top ``top_k`` texts during inference.

        Re-enabling with the same ``top_k`` continues from what was collected; a different ``top_k`` starts
        afresh.

        Args:
            top_k: texts kept per neuron, a positive int.

        Raises:
            TypeError / ValueError: ``top_k`` is not a positive int.
        """
        top_k = _check_positive_int(top_k, "top_k")
        if self._tracker is None or self._tracker.top_k != top_k or self._tracker.n_latents != self.n_latents:
            if self._tracker is not None:
                logger.info("top_k changed from %d to %d: tracking starts afresh", self._tracker.top_k, top_k)
            self._tracker = TopTextTracker(self.n_latents, top_k)
        self._tracking = True

    def disable_text_tracking(self) -> None:
        """Stop updating; what was collected stays available."""
        self._tracking = False

    def reset_tracking(self) -> None:
        """Forget all collected top texts and statistics (tracking stays on or off as it was)."""
        if self._tracker is not None:
            self._tracker.reset()

    def observe(self, values: Tensor, indices: Tensor, context: Any) -> None:
        """Update the top texts from one forward's sparse code. Called by the SAE's hook.

        Args:
            values: ``[batch, seq, k]`` code values.
            indices: ``[batch, seq, k]`` int64 latent indices.
            context: the ``BatchContext`` the LanguageModel set on the SAE (``texts``, ``input_ids``,
                ``attention_mask``, ``special_tokens_mask``, ``tokenizer``).

        Raises:
            RuntimeError: tracking is on but ``context`` is ``None`` (the SAE runs outside a LanguageModel, so
                there are no texts to attribute activations to).
            ValueError: ``values`` is not ``[batch, seq, k]`` or the context's batch does not match.
        """
        if not self._tracking or self._tracker is None:
            return
        if context is not None and (getattr(context, "generation_step", None) or 0) >= 1:
            # Generated tokens are not part of the context's texts.
            return
        if context is None:
            raise RuntimeError(
                "text tracking is enabled but the SAE has no batch context: attach it to a LanguageModel with "
                "lm.attach_sae(sae, layer) and run inference through the LanguageModel (or call "
                "sae.concepts.disable_text_tracking())"
            )
        if values.dim() != 3:
            raise ValueError(f"values must be [batch, seq, k], got shape {tuple(values.shape)}")
        b, s, _ = values.shape
        input_ids = context.input_ids
        if input_ids is None or tuple(input_ids.shape) != (b, s):
            got = None if input_ids is None else tuple(input_ids.shape)
            if not self._warned_shape:
                logger.warning(
                    "not tracking a forward whose tokens %s do not match the batch context %s (e.g. a cached "
                    "generation step)", (b, s), got,
                )
                self._warned_shape = True
            return
        texts = list(context.texts)
        if len(texts) != b:
            raise ValueError(f"context.texts has {len(texts)} texts but the batch has {b} rows")
        device = values.device
        attention = getattr(context, "attention_mask", None)
        attention = (
            torch.ones((b, s), dtype=torch.bool, device=device) if attention is None
            else attention.to(device=device).bool()
        )
        valid = attention
        special = getattr(context, "special_tokens_mask", None)
        if special is not None:
            valid = valid & ~special.to(device=device).bool()
        text_positions = attention.to(torch.int64).cumsum(dim=1) - 1
        tokenizer = getattr(context, "tokenizer", None)
        if tokenizer is not None:
            self._tracker.tokenizer = tokenizer
        self._tracker.update(values, indices, texts, input_ids.to(device), valid, text_positions)

    def get_top_texts(self, neuron_idx: int | str | None = None) -> list[list[TopText]] | list[TopText]:
        """The collected top texts.

        Args:
            neuron_idx: a neuron index or concept name for one neuron's list, ``None`` for all neurons.

        Returns:
            For one neuron, a list of :class:`TopText` strongest first (at most ``top_k``; fewer if the neuron
            fired in fewer texts). For all neurons, a list of ``n_latents`` such lists.

        Raises:
            RuntimeError: tracking was never enabled.
        """
        tracker = self._require_tracker()
        if neuron_idx is None:
            return tracker.top_texts()
        return tracker.top_texts([self._resolve(neuron_idx)])[0]

    def neuron_stats(self) -> NeuronStats:
        """Firing count and rate, mean activation when active, maximum activation, per neuron.

        Raises:
            RuntimeError: tracking was never enabled.
        """
        return self._require_tracker().stats()

    def _require_tracker(self) -> TopTextTracker:
        if self._tracker is None:
            raise RuntimeError("no tracking data: call sae.concepts.enable_text_tracking(top_k) and run inference")
        return self._tracker

    def _export_rows(self, include_empty: bool) -> list[dict[str, Any]]:
        tracker = self._require_tracker()
        stats = tracker.stats()
        tops = tracker.top_texts()
        count = stats.firing_count.tolist()
        mean = stats.mean_activation.tolist()
        peak = stats.max_activation.tolist()
        dictionary = self.dictionary
        rows = []
        for neuron, records in enumerate(tops):
            if not records and not include_empty:
                continue
            concept = dictionary._by_neuron.get(neuron)
            rows.append(
                {
                    "neuron": neuron,
                    "name": None if concept is None else concept.name,
                    "firing_count": count[neuron],
                    "mean_activation": mean[neuron],
                    "max_activation": peak[neuron],
                    "top_texts": [r._asdict() for r in records],
                }
            )
        return rows

    def export_top_texts_json(self, path: str | os.PathLike[str], include_empty: bool = False) -> Path:
        """Write the top texts and statistics as JSON.

        Layout: ``{"n_latents", "top_k", "tokens_seen", "neurons": [{"neuron", "name", "firing_count",
        "mean_activation", "max_activation", "top_texts": [{"text", "activation", "token_position", "token",
        "token_id"}, ...]}, ...]}``; neurons with no entry are left out unless ``include_empty``.

        Returns:
            The path written (atomically).
        """
        tracker = self._require_tracker()
        data = {
            "n_latents": self.n_latents,
            "top_k": tracker.top_k,
            "tokens_seen": tracker.stats().tokens_seen,
            "neurons": self._export_rows(include_empty),
        }
        target = Path(path)
        _atomic_write_text(target, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        return target

    def export_top_texts_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write one CSV row per (neuron, rank): ``neuron,name,rank,activation,token_position,token,token_id,text``.

        Returns:
            The path written (atomically).
        """
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["neuron", "name", "rank", "activation", "token_position", "token", "token_id", "text"])
        for row in self._export_rows(include_empty=False):
            for rank, rec in enumerate(row["top_texts"]):
                writer.writerow(
                    [row["neuron"], row["name"] or "", rank, repr(rec["activation"]), rec["token_position"],
                     rec["token"], rec["token_id"], rec["text"]]
                )
        target = Path(path)
        _atomic_write_text(target, buf.getvalue())
        return target

    # ------------------------------------------------------------------ dictionary
    def name_concept(self, neuron_idx: int, name: str, notes: str = "") -> Concept:
        """Name a neuron (see :meth:`ConceptDictionary.add`). Returns the stored :class:`Concept`."""
        return self.dictionary.add(neuron_idx, name, notes)

    def find_concept(self, name: str) -> int:
        """The neuron index of a named concept; ``ValueError`` for an unknown name."""
        return self.dictionary.index_of(name)

    def import_csv(self, path: str | os.PathLike[str], replace: bool = False) -> int:
        """Import names from a ``neuron,name[,notes]`` CSV (see :meth:`ConceptDictionary.import_csv`)."""
        return self.dictionary.import_csv(path, replace=replace)

    @staticmethod
    def _store_key(sae_id: Any) -> str:
        if not isinstance(sae_id, str) or not sae_id.strip() or sae_id.startswith("/") or ".." in sae_id.split("/"):
            raise ValueError(f"sae_id must be a non-empty relative name, got {sae_id!r}")
        return f"sae_models/{sae_id}/concepts.json"

    def _document(self) -> dict[str, Any]:
        data = self.dictionary.to_dict()
        data["manipulations"] = self.get_manipulation_config()
        return data

    def save_dictionary(self, target: Any, sae_id: str | None = None) -> str | Path:
        """Save the concept dictionary (and, for the record, the current manipulations) as JSON.

        The document is ``{"version", "n_latents", "concepts": [{"neuron", "name", "notes"}], "manipulations":
        <get_manipulation_config()>}``.

        Args:
            target: a store (``put_json``) — then it goes to ``sae_models/<sae_id>/concepts.json`` — or a file path.
            sae_id: required with a store, not allowed with a path.

        Returns:
            The store key or the path written.
        """
        data = self._document()
        if hasattr(target, "put_json"):
            key = self._store_key(sae_id)
            target.put_json(key, data)
            return key
        if sae_id is not None:
            raise ValueError(f"sae_id is only used with a store; got a path {target!r} and sae_id={sae_id!r}")
        if not isinstance(target, (str, os.PathLike)):
            raise TypeError(f"target must be a Store or a path, got {type(target).__name__}")
        path = Path(target)
        _atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        return path

    def _read_document(self, source: Any, sae_id: str | None) -> tuple[dict[str, Any], str]:
        if hasattr(source, "get_json"):
            key = self._store_key(sae_id)
            return source.get_json(key), key
        if sae_id is not None:
            raise ValueError(f"sae_id is only used with a store; got a path {source!r} and sae_id={sae_id!r}")
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"source must be a Store or a path, got {type(source).__name__}")
        path = Path(source)
        try:
            return json.loads(path.read_text(encoding="utf-8")), str(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"concept dictionary file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"concept dictionary file {path} is not valid JSON: {exc}") from None

    def load_dictionary(self, source: Any, sae_id: str | None = None) -> ConceptDictionary:
        """Load the concept dictionary saved by :meth:`save_dictionary`, replacing the current one.

        Manipulations in the file are not applied (use :meth:`load` for both).

        Args:
            source: a store (``get_json``; reads ``sae_models/<sae_id>/concepts.json``) or a file path.
            sae_id: required with a store.

        Returns:
            The loaded dictionary (also set as :attr:`dictionary`).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is malformed or for a different ``n_latents`` (the message names the file).
        """
        data, where = self._read_document(source, sae_id)
        try:
            loaded = ConceptDictionary.from_dict(data, self.n_latents)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        self._dictionary = loaded
        return loaded

    def save(self, store: Any, sae_id: str) -> str:
        """Save the dictionary and the manipulations beside the SAE: ``sae_models/<sae_id>/concepts.json``.

        Returns:
            The store key.
        """
        return str(self.save_dictionary(store, sae_id))

    def load(self, store: Any, sae_id: str) -> ConceptDictionary:
        """Load ``sae_models/<sae_id>/concepts.json`` from a store: the dictionary and the saved manipulations.

        Returns:
            The loaded dictionary.
        """
        data, where = self._read_document(store, sae_id)
        previous = self._dictionary
        loaded = self.load_dictionary(store, sae_id)
        manipulations = data.get("manipulations") if isinstance(data, dict) else None
        if manipulations is not None:
            try:
                self.load_manipulation_config(manipulations)
            except (TypeError, ValueError) as exc:
                self._dictionary = previous
                raise type(exc)(f"{where}: {exc}") from None
        return loaded

    # ------------------------------------------------------------------ manipulation
    def manipulate_concept(self, neuron_idx_or_name: int | str, scale: float) -> None:
        """Scale a neuron's activation wherever it fires (1.5 amplifies, 0.5 suppresses, 0 ablates).

        Only tokens where the neuron is among the top-k active latents change: scaling a neuron that did not
        fire does nothing (use :meth:`add_concept` to inject it). Setting a neuron again replaces its scale.

        Args:
            neuron_idx_or_name: neuron index or concept name.
            scale: a finite real number ``>= 0``.

        Raises:
            TypeError / ValueError: bad neuron (out of range, unknown name) or scale (negative, non-numeric).
        """
        neuron = self._resolve(neuron_idx_or_name)
        value = _check_finite_number(scale, "scale")
        if value < 0:
            raise ValueError(f"scale must be >= 0 (1.5 amplifies, 0.5 suppresses, 0 ablates), got {value}")
        self._scales[neuron] = value
        self._scale_tables.clear()

    def add_concept(
        self,
        neuron_idx_or_name: int | str,
        activation: float,
        positions: Sequence[int] | None = None,
    ) -> None:
        """Add ``activation`` of a neuron to the SAE code (steering along its decoder direction).

        The layer output changes by ``activation * W_dec[neuron]`` at the chosen tokens, whether or not the neuron
        fired there. Adding the same neuron again replaces its previous addition.

        Positions: ``None`` means every token of every forward pass. Otherwise a list of token positions within
        each text, as in tracking's ``token_position`` (padding excluded, special tokens counted; negative values
        count from the text's end, ``-1`` is its last token). Positions past a text's length are ignored. During
        ``generate`` the text grows: each generated token is the text's newest token, so ``[-1]`` steers the
        prompt's last token and then every generated token, and a position ``p >= len(prompt)`` steers the
        generated token that lands there. Without a batch context describing the forward (the SAE used outside a
        LanguageModel), positions index the forward's own sequence axis (``dim=-2`` of the code).

        Args:
            neuron_idx_or_name: neuron index or concept name.
            activation: finite real number (negative values push the other way).
            positions: ``None`` or a non-empty sequence of ints.

        Raises:
            TypeError / ValueError: bad neuron, non-numeric or non-finite activation, bad positions.
        """
        neuron = self._resolve(neuron_idx_or_name)
        value = _check_finite_number(activation, "activation")
        pos: tuple[int, ...] | None = None
        if positions is not None:
            if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence):
                raise TypeError(f"positions must be None or a sequence of ints, got {type(positions).__name__}")
            if len(positions) == 0:
                raise ValueError("positions must be None (every token) or a non-empty sequence of ints, got []")
            checked = []
            for p in positions:
                if isinstance(p, bool) or not isinstance(p, numbers.Integral):
                    raise TypeError(f"positions must contain ints, got {type(p).__name__} {p!r}")
                checked.append(int(p))
            pos = tuple(sorted(set(checked)))
        self._additions[neuron] = _Addition(value, pos)

    def reset_manipulations(self) -> None:
        """Remove every scale and addition: the attached SAE leaves the model unchanged again."""
        self._scales.clear()
        self._additions.clear()
        self._scale_tables.clear()

    @property
    def has_manipulations(self) -> bool:
        """Whether any scale or addition is set."""
        return bool(self._scales or self._additions)

    def get_manipulation_config(self) -> dict[str, Any]:
        """The current manipulations as a JSON-able dict (loadable with :meth:`load_manipulation_config`).

        Layout: ``{"version": 1, "scales": [{"neuron", "name", "scale"}], "additions": [{"neuron", "name",
        "activation", "positions"}]}`` sorted by neuron; ``name`` is the concept name or ``None``.
        """
        names = self.dictionary
        return {
            "version": _CONFIG_VERSION,
            "scales": [
                {"neuron": i, "name": names.name_of(i), "scale": s} for i, s in sorted(self._scales.items())
            ],
            "additions": [
                {
                    "neuron": i,
                    "name": names.name_of(i),
                    "activation": a.activation,
                    "positions": None if a.positions is None else list(a.positions),
                }
                for i, a in sorted(self._additions.items())
            ],
        }

    def load_manipulation_config(self, config: dict[str, Any]) -> None:
        """Replace the current manipulations with ``config`` (from :meth:`get_manipulation_config`).

        Each entry needs ``neuron`` or, if absent, a ``name`` from the dictionary. Everything is checked before
        anything changes.

        Raises:
            TypeError / ValueError: malformed config; the message names the entry.
        """
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        unknown = set(config) - {"version", "scales", "additions"}
        if unknown:
            raise ValueError(f"config has unknown keys {sorted(unknown)}; expected 'version', 'scales', 'additions'")
        if config.get("version", _CONFIG_VERSION) != _CONFIG_VERSION:
            raise ValueError(f"config version must be {_CONFIG_VERSION}, got {config.get('version')!r}")
        staged = AutoencoderConcepts(self.sae)
        staged._dictionary = self.dictionary
        for section in ("scales", "additions"):
            entries = config.get(section, [])
            if not isinstance(entries, list):
                raise TypeError(f"config[{section!r}] must be a list, got {type(entries).__name__}")
            for i, entry in enumerate(entries):
                where = f"config[{section!r}][{i}]"
                if not isinstance(entry, dict):
                    raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
                target = entry.get("neuron")
                if target is None:
                    target = entry.get("name")
                if target is None:
                    raise ValueError(f"{where} needs a 'neuron' (or a 'name'), got {entry!r}")
                try:
                    if section == "scales":
                        if "scale" not in entry:
                            raise ValueError(f"missing 'scale' in {entry!r}")
                        staged.manipulate_concept(target, entry["scale"])
                    else:
                        if "activation" not in entry:
                            raise ValueError(f"missing 'activation' in {entry!r}")
                        staged.add_concept(target, entry["activation"], entry.get("positions"))
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"{where}: {exc}") from None
        self._scales = staged._scales
        self._additions = staged._additions
        self._scale_tables.clear()

    def _scale_table(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        table = self._scale_tables.get(key)
        if table is None:
            table = torch.ones(self.n_latents, dtype=dtype)
            if self._scales:
                idx = torch.tensor(list(self._scales), dtype=torch.int64)
                table[idx] = torch.tensor(list(self._scales.values()), dtype=dtype)
            table = table.to(device)
            self._scale_tables[key] = table
        return table

    def _token_layout(self, lead: torch.Size, device: torch.device) -> tuple[Tensor, Tensor, Tensor] | None:
        """Where the tokens of this forward sit in their texts, from the SAE's batch context.

        Returns ``(text_pos [b, s], text_len [b, 1], real [b, s])`` or ``None`` when the context does not describe
        this forward. During cached generation (``generation_step >= 1``) the fed tokens continue the texts whose
        prompt lengths were recorded at step 0.
        """
        context = getattr(self.sae, "context", None)
        attention = getattr(context, "attention_mask", None) if context is not None else None
        if attention is None or len(lead) != 2 or tuple(attention.shape) != tuple(lead):
            return None
        real = attention.to(device=device).bool()
        text_pos = real.to(torch.int64).cumsum(dim=1) - 1
        length = real.sum(dim=1, keepdim=True)
        step = getattr(context, "generation_step", None)
        if step is None:
            return text_pos, length, real
        if step == 0:
            self._prompt_lengths = length.clone()
            return text_pos, length, real
        prompt = self._prompt_lengths
        if prompt is None or prompt.shape[0] != lead[0] or prompt.device != device:
            return None
        offset = prompt + (step - 1)
        return text_pos + offset, length + offset, real

    def _addition_mask(self, positions: tuple[int, ...], lead: torch.Size, device: torch.device) -> Tensor:
        """``lead``-shaped bool mask (``[batch, seq]`` or ``[tokens]``) of the tokens an addition applies to."""
        want = torch.tensor(positions, dtype=torch.int64, device=device)
        layout = self._token_layout(lead, device)
        if layout is not None:
            text_pos, length, real = layout
            # Negative positions count from each text's own end.
            target = torch.where(want < 0, want.view(1, 1, -1) + length.unsqueeze(-1), want.view(1, 1, -1))
            return (text_pos.unsqueeze(-1) == target).any(dim=-1) & real
        seq = lead[-1]
        target = torch.where(want < 0, want + seq, want)
        hit = (torch.arange(seq, device=device).unsqueeze(-1) == target).any(dim=-1)  # [seq]
        return hit.expand(lead)

    def modify_code(self, values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor] | None:
        """Apply the manipulations to a sparse code. Called by the SAE's hook.

        Args:
            values: ``[batch, seq, k]`` (or ``[tokens, k]``) code values.
            indices: same shape, int64 latent indices.

        Returns:
            ``None`` when no manipulation is set (the SAE then leaves the layer output alone); else
            ``(values2, indices2)`` of shape ``[..., k + n_additions]``: the values multiplied by each manipulated
            neuron's scale where its index appears, followed by one column per :meth:`add_concept` neuron holding
            its added activation (0 at tokens it does not apply to). The SAE adds
            ``decode(values2, indices2) - decode(values, indices)`` to the layer output.
        """
        if not self._scales and not self._additions:
            return None
        if values.dim() < 2 or indices.shape != values.shape:
            raise ValueError(
                f"values and indices must have the same shape [..., k]; got {tuple(values.shape)} and "
                f"{tuple(indices.shape)}"
            )
        new_values = values
        new_indices = indices
        if self._scales:
            table = self._scale_table(values.device, values.dtype)
            new_values = values * table[indices]
        if self._additions:
            lead = values.shape[:-1]
            device = values.device
            cols_v = []
            for neuron, add in sorted(self._additions.items()):
                if add.positions is None:
                    col = torch.full(lead, add.activation, dtype=values.dtype, device=device)
                else:
                    mask = self._addition_mask(add.positions, lead, device)
                    col = mask.to(values.dtype) * add.activation
                cols_v.append(col)
            add_idx = torch.tensor(sorted(self._additions), dtype=indices.dtype, device=device)
            new_values = torch.cat([new_values, torch.stack(cols_v, dim=-1)], dim=-1)
            new_indices = torch.cat([indices, add_idx.expand(*lead, -1)], dim=-1)
        return new_values, new_indices

    def __repr__(self) -> str:
        return (
            f"AutoencoderConcepts(n_latents={self.n_latents}, tracking={self._tracking}, top_k={self.top_k}, "
            f"named={len(self.dictionary)}, scales={len(self._scales)}, additions={len(self._additions)})"
        )
