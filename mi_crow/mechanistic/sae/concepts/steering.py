"""Steering state: per-neuron edits of an SAE code, and how they rewrite it.

Five modes, all along the SAE's own latents (the facade,
:class:`~mi_crow.mechanistic.sae.concepts.facade.AutoencoderConcepts`, names them for users):

- ``scale``: multiply a neuron's activation where it fires (1.5 amplifies, 0.5 suppresses);
- ``ablate``: scale 0 (the neuron's contribution is removed where it fires);
- ``add``: add ``value`` of a neuron (``value * W_dec[neuron]``) at the chosen tokens, whether or not it fired;
- ``clamp``: set the neuron's activation to ``value`` at the chosen tokens (what it had is replaced);
- ``cap``: the projection cap: where the residual's projection onto the neuron's unit decoder direction exceeds
  ``value``, remove the excess, so the projection is at most ``value``.

``add``, ``clamp`` and ``cap`` take their value either absolute or ``relative`` to each token's residual norm at
that layer (``value * ||x_t||``: 0.5 adds half the residual's norm along the direction), apply at chosen positions
or everywhere, and can leave special tokens (BOS, chat markers; padding always) alone.

The SAE applies them through :meth:`Steering.modify_code`, adding only ``decode(modified code) - decode(code)`` to
the layer output so the model's own reconstruction error is kept. This module sees neuron indices only.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from mi_crow.errors import ArgumentTypeError, UserInputError

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.concepts.dictionary import ConceptDictionary

__all__ = ["CONFIG_VERSION", "EDIT_MODES", "MODES", "Edit", "Steering"]

CONFIG_VERSION = 2
MODES = ("scale", "ablate", "add", "clamp", "cap")
EDIT_MODES = ("add", "clamp", "cap")
_SECTIONS = {"add": "additions", "clamp": "clamps", "cap": "caps"}


@dataclass(frozen=True)
class Edit:
    """One ``add`` / ``clamp`` / ``cap`` edit of a neuron.

    Attributes:
        mode: ``"add"``, ``"clamp"`` or ``"cap"``.
        value: the activation added / the clamped activation / the cap on the projection (absolute, or a multiple of
            the token's residual norm when ``relative``).
        positions: token positions within each text (negative: from its end), or ``None`` for every token.
        relative: ``value`` is a multiple of each token's residual norm.
        exclude_special: leave special tokens (and padding) unchanged.
    """

    mode: str
    value: float
    positions: tuple[int, ...] | None = None
    relative: bool = False
    exclude_special: bool = False

    @property
    def activation(self) -> float:
        """``value`` under the name the additions of version 1 used."""
        return self.value


def _check_finite_number(value: Any, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{arg} must be a real number, got {type(value).__name__} {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise UserInputError(f"{arg} must be finite, got {out}")
    return out


def _check_positions(positions: Any) -> tuple[int, ...] | None:
    if positions is None:
        return None
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence):
        raise ArgumentTypeError(f"positions must be None or a sequence of ints, got {type(positions).__name__}")
    if len(positions) == 0:
        raise UserInputError("positions must be None (every token) or a non-empty sequence of ints, got []")
    checked = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, numbers.Integral):
            raise ArgumentTypeError(f"positions must contain ints, got {type(p).__name__} {p!r}")
        checked.append(int(p))
    return tuple(sorted(set(checked)))


def _check_flag(value: Any, arg: str) -> bool:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{arg} must be True or False, got {type(value).__name__} {value!r}")
    return value


class Steering:
    """The scales and edits set on one SAE, and the code rewrite they imply.

    Args:
        sae: the SAE; ``n_latents`` sizes the scale table, ``W_dec`` gives the directions for relative values and
            the cap, and ``context`` (its current batch context, if any) tells :meth:`modify_code` where each token
            sits in its text.
    """

    def __init__(self, sae: Any) -> None:
        self.sae = sae
        self.scales: dict[int, float] = {}
        self.edits: dict[int, Edit] = {}
        self._scale_tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._prompt_lengths: Tensor | None = None
        self.row_scales: Tensor | None = None
        """``[batch]`` multipliers of every ``add`` / ``clamp`` / ``cap`` value, one per text of the batch (None:
        all 1). A sweep of strengths then runs as one batch: rows of strength ``s`` carry the value 1 times ``s``
        (``evaluate_steering`` does this). Applies only to forwards whose batch has exactly that many texts."""
        self.row_masks: dict[int, Tensor] | None = None
        """Per edited neuron, a ``[batch]`` bool mask of the texts its edit applies to (None, or a neuron not in it:
        every text). Several features then run as one batch, each steering its own rows
        (``evaluate_steering_many`` does this). Applies only to forwards whose batch has exactly that many texts."""

    # ------------------------------------------------------------------ editing
    def set_scale(self, neuron: int, scale: Any) -> None:
        """Scale ``neuron`` (an already checked index) by ``scale``, a finite real ``>= 0``."""
        value = _check_finite_number(scale, "scale")
        if value < 0:
            raise UserInputError(f"scale must be >= 0 (1.5 amplifies, 0.5 suppresses, 0 ablates), got {value}")
        self.scales[neuron] = value
        self._scale_tables.clear()

    def set_edit(self, neuron: int, mode: str, value: Any, positions: Sequence[int] | None = None, *,
                 relative: bool = False, exclude_special: bool = False) -> Edit:
        """Set the ``add`` / ``clamp`` / ``cap`` edit of ``neuron`` (an already checked index), replacing any
        earlier edit of it. Returns the stored :class:`Edit`."""
        if mode not in EDIT_MODES:
            raise UserInputError(f"mode must be one of {list(EDIT_MODES)}, got {mode!r}")
        name = {"add": "activation", "clamp": "value", "cap": "cap"}[mode]
        number = _check_finite_number(value, "strength" if relative else name)
        if mode == "cap" and number < 0 and relative:
            raise UserInputError(f"a relative cap must be >= 0 (a fraction of the residual norm), got {number}")
        edit = Edit(mode, number, _check_positions(positions), _check_flag(relative, "relative"),
                    _check_flag(exclude_special, "exclude_special"))
        self.edits[neuron] = edit
        return edit

    def set_addition(self, neuron: int, activation: Any, positions: Sequence[int] | None) -> None:
        """Add ``activation`` of ``neuron`` (an already checked index) at ``positions`` (``None``: every token)."""
        self.set_edit(neuron, "add", activation, positions)

    @property
    def additions(self) -> dict[int, Edit]:
        """The ``add`` edits, by neuron."""
        return {n: e for n, e in self.edits.items() if e.mode == "add"}

    def reset(self) -> None:
        """Remove every scale and edit (and the per-text ``row_scales`` and ``row_masks``)."""
        self.scales.clear()
        self.edits.clear()
        self.row_scales = None
        self.row_masks = None
        self._scale_tables.clear()

    def remove_scale(self, neuron: int) -> None:
        """Forget the scale of ``neuron`` (no error when it has none): it passes unchanged again."""
        if self.scales.pop(neuron, None) is not None:
            self._scale_tables.clear()

    def set_scales(self, scales: dict[int, float]) -> None:
        """Replace every scale with ``scales`` (already checked indices and values); edits stay."""
        self.scales = {neuron: scale for neuron, scale in scales.items() if scale != 1.0}
        self._scale_tables.clear()

    @property
    def active(self) -> bool:
        """Whether any scale or edit is set."""
        return bool(self.scales or self.edits)

    # ------------------------------------------------------------------ config
    def to_config(self, names: ConceptDictionary) -> dict[str, Any]:
        """The manipulations as a JSON-able dict; ``names`` gives each neuron's concept name (or ``None``)."""
        config: dict[str, Any] = {
            "version": CONFIG_VERSION,
            "scales": [
                {"neuron": i, "name": names.name_of(i), "scale": s} for i, s in sorted(self.scales.items())
            ],
        }
        for mode, section in _SECTIONS.items():
            key = "activation" if mode == "add" else "value"
            config[section] = [
                {
                    "neuron": i,
                    "name": names.name_of(i),
                    key: e.value,
                    "positions": None if e.positions is None else list(e.positions),
                    "relative": e.relative,
                    "exclude_special": e.exclude_special,
                }
                for i, e in sorted(self.edits.items()) if e.mode == mode
            ]
        return config

    def load_config(self, config: Any, resolve: Callable[[int | str], int]) -> None:
        """Replace the manipulations with ``config`` (from :meth:`to_config`, version 1 or 2), checking everything
        first.

        Args:
            config: the dict.
            resolve: turns an entry's ``neuron`` (or, when absent, its ``name``) into a checked neuron index.

        Raises:
            TypeError / ValueError: malformed config; the message names the entry.
        """
        if not isinstance(config, dict):
            raise ArgumentTypeError(f"config must be a dict, got {type(config).__name__}")
        allowed = {"version", "scales", *_SECTIONS.values()}
        unknown = set(config) - allowed
        if unknown:
            raise UserInputError(f"config has unknown keys {sorted(unknown)}; expected {sorted(allowed)}")
        if config.get("version", CONFIG_VERSION) not in (1, CONFIG_VERSION):
            raise UserInputError(f"config version must be 1 or {CONFIG_VERSION}, got {config.get('version')!r}")
        staged = Steering(self.sae)
        for section in ("scales", *_SECTIONS.values()):
            entries = config.get(section, [])
            if not isinstance(entries, list):
                raise ArgumentTypeError(f"config[{section!r}] must be a list, got {type(entries).__name__}")
            for i, entry in enumerate(entries):
                where = f"config[{section!r}][{i}]"
                if not isinstance(entry, dict):
                    raise ArgumentTypeError(f"{where} must be a dict, got {type(entry).__name__}")
                target = entry.get("neuron")
                if target is None:
                    target = entry.get("name")
                if target is None:
                    raise UserInputError(f"{where} needs a 'neuron' (or a 'name'), got {entry!r}")
                try:
                    if section == "scales":
                        if "scale" not in entry:
                            raise UserInputError(f"missing 'scale' in {entry!r}")
                        staged.set_scale(resolve(target), entry["scale"])
                        continue
                    mode = next(m for m, s in _SECTIONS.items() if s == section)
                    key = "activation" if mode == "add" else "value"
                    if key not in entry:
                        raise UserInputError(f"missing {key!r} in {entry!r}")
                    staged.set_edit(resolve(target), mode, entry[key], entry.get("positions"),
                                    relative=entry.get("relative", False),
                                    exclude_special=entry.get("exclude_special", False))
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"{where}: {exc}") from None
        self.scales = staged.scales
        self.edits = staged.edits
        self._scale_tables.clear()

    # ------------------------------------------------------------------ applying
    def _scale_table(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        table = self._scale_tables.get(key)
        if table is None:
            table = torch.ones(int(self.sae.n_latents), dtype=dtype)
            if self.scales:
                idx = torch.tensor(list(self.scales), dtype=torch.int64)
                table[idx] = torch.tensor(list(self.scales.values()), dtype=dtype)
            table = table.to(device)
            self._scale_tables[key] = table
        return table

    def _token_layout(self, lead: torch.Size, device: torch.device) -> tuple[Tensor, Tensor, Tensor, bool] | None:
        """Where the tokens of this forward sit in their texts, from the SAE's batch context.

        Returns ``(text_pos [b, s], text_len [b, 1], real [b, s], growing)`` or ``None`` when the context does not
        describe this forward; ``growing`` is True during generation (texts grow past what a position may name).

        During generation step ``n >= 1`` the texts hold the prompt (lengths recorded at step 0) and ``n``
        generated tokens; the forward is fed the last ``s`` of them: one with a KV cache, all of them without.
        The tokens before the fed ones are ``prompt + n - (real fed tokens)``, which covers both.
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
            return text_pos, length, real, False
        if step == 0:
            self._prompt_lengths = length.clone()
            return text_pos, length, real, True
        prompt = self._prompt_lengths
        if prompt is None or prompt.shape[0] != lead[0] or prompt.device != device:
            return None
        total = prompt + step
        before = total - length
        return text_pos + before, total, real, True

    def _position_mask(self, positions: tuple[int, ...], lead: torch.Size, device: torch.device) -> Tensor:
        """``lead``-shaped bool mask (``[batch, seq]`` or ``[tokens]``) of the tokens an edit applies to.

        Raises:
            UserInputError: in a forward that is not part of a generation, a position that names no token of any
                text (or, without a batch context, lies outside the sequence axis).
        """
        want = torch.tensor(positions, dtype=torch.int64, device=device)
        layout = self._token_layout(lead, device)
        if layout is not None:
            text_pos, length, real, growing = layout
            # Negative positions count from each text's own end.
            target = torch.where(want < 0, want.view(1, 1, -1) + length.unsqueeze(-1), want.view(1, 1, -1))
            hits = (text_pos.unsqueeze(-1) == target) & real.unsqueeze(-1)  # [b, s, n_positions]
            if not growing:
                missed = ~hits.flatten(0, 1).any(dim=0)
                if bool(missed.any()):
                    bad = [p for p, m in zip(positions, missed.tolist()) if m]
                    raise UserInputError(
                        f"positions {bad} are outside every text of this forward (text lengths "
                        f"{length.flatten().tolist()}); positions count tokens within a text, -1 is its last token"
                    )
            return hits.any(dim=-1)
        seq = lead[-1]
        bad = [p for p in positions if not -seq <= p < seq]
        if bad:
            raise UserInputError(f"positions {bad} are outside the sequence of {seq} tokens of this forward")
        target = torch.where(want < 0, want + seq, want)
        hit = (torch.arange(seq, device=device).unsqueeze(-1) == target).any(dim=-1)  # [seq]
        return hit.expand(lead)

    # Kept under its old name: tests and callers of version 1 use it.
    _addition_mask = _position_mask

    def _edit_mask(self, edit: Edit, lead: torch.Size, device: torch.device) -> Tensor | None:
        """Where ``edit`` applies (``None``: everywhere)."""
        mask = None if edit.positions is None else self._position_mask(edit.positions, lead, device)
        if edit.exclude_special:
            context = getattr(self.sae, "context", None)
            special = getattr(context, "special_tokens_mask", None) if context is not None else None
            if isinstance(special, Tensor) and tuple(special.shape) == tuple(lead):
                keep = ~special.to(device=device).bool()
                mask = keep if mask is None else mask & keep
        return mask

    def _row_factor(self, lead: torch.Size, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``row_scales`` shaped to broadcast over ``lead`` (``[batch, seq]``)."""
        scales = self.row_scales
        if scales is None or len(lead) != 2 or scales.shape[0] != lead[0]:
            raise UserInputError(
                f"row_scales holds {None if scales is None else scales.shape[0]} values but this forward's code has "
                f"leading shape {tuple(lead)}; per-text scales need a [batch, seq] code with one value per text"
            )
        return scales.to(device=device, dtype=dtype).view(-1, 1)

    def _row_mask(self, neuron: int, lead: torch.Size, device: torch.device) -> Tensor | None:
        """``row_masks[neuron]`` broadcast to ``lead`` (``[batch, seq]``), or None when the edit applies to every
        text."""
        masks = self.row_masks
        if masks is None or neuron not in masks:
            return None
        rows = masks[neuron]
        if len(lead) != 2 or rows.shape != (lead[0],):
            raise UserInputError(
                f"row_masks[{neuron}] holds {tuple(rows.shape)} values but this forward's code has leading shape "
                f"{tuple(lead)}; per-text masks need a [batch, seq] code with one value per text"
            )
        return rows.to(device=device, dtype=torch.bool).view(-1, 1).expand(lead)

    def modify_code(self, values: Tensor, indices: Tensor, x: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """Apply the manipulations to a sparse code (see ``AutoencoderConcepts.modify_code``).

        Args:
            values: ``[batch, seq, k]`` (or ``[tokens, k]``) code values.
            indices: same shape, int64 latent indices.
            x: ``[..., n_inputs]`` the encoded residual (needed by relative values and by caps).

        Returns:
            ``None`` when nothing is set, else ``(values2, indices2)`` of shape ``[..., k + n_edits]``.
        """
        if not self.scales and not self.edits:
            return None
        if values.dim() < 2 or indices.shape != values.shape:
            raise UserInputError(
                f"values and indices must have the same shape [..., k]; got {tuple(values.shape)} and "
                f"{tuple(indices.shape)}"
            )
        new_values = values
        if self.scales:
            table = self._scale_table(values.device, values.dtype)
            new_values = values * table[indices]
        if not self.edits:
            return new_values, indices
        lead = values.shape[:-1]
        device, dtype = values.device, values.dtype
        needs_x = any(e.relative or e.mode == "cap" for e in self.edits.values())
        if needs_x:
            if x is None or tuple(x.shape[:-1]) != tuple(lead):
                raise UserInputError(
                    "relative strengths and projection caps need the residual x of shape [..., n_inputs] matching "
                    f"the code's leading shape {tuple(lead)}, got {None if x is None else tuple(x.shape)}"
                )
            x = x.to(device=device, dtype=dtype)
            x_norm = x.norm(dim=-1)
        neurons = sorted(self.edits)
        if needs_x:
            W = self.sae.W_dec.detach()
            rows = W[torch.tensor(neurons, dtype=torch.int64, device=W.device)].to(device=device, dtype=dtype)
            row_norms = rows.norm(dim=-1).clamp_min(1e-12)  # [n_edits]
        cols = []
        for j, neuron in enumerate(neurons):
            edit = self.edits[neuron]
            mask = self._edit_mask(edit, lead, device)
            rows_on = self._row_mask(neuron, lead, device)
            if rows_on is not None:
                mask = rows_on if mask is None else mask & rows_on
            amount = torch.full(lead, edit.value, dtype=dtype, device=device)
            if self.row_scales is not None:
                amount = amount * self._row_factor(lead, device, dtype)
            if edit.relative:
                amount = amount * x_norm
            if edit.mode == "add":
                # value * W_dec[j]: a relative value means a vector of norm value * ||x||.
                col = amount / row_norms[j] if edit.relative else amount
            elif edit.mode == "clamp":
                present = indices == neuron
                if mask is not None:
                    present = present & mask.unsqueeze(-1)
                new_values = torch.where(present, torch.zeros((), dtype=dtype, device=device), new_values)
                col = amount / row_norms[j] if edit.relative else amount
            else:  # cap: remove the excess of the projection onto the unit direction
                projection = (x @ rows[j]) / row_norms[j]
                col = -(projection - amount).clamp_min(0) / row_norms[j]
            if mask is not None:
                col = col * mask.to(dtype)
            cols.append(col)
        add_idx = torch.tensor(neurons, dtype=indices.dtype, device=device)
        new_values = torch.cat([new_values, torch.stack(cols, dim=-1)], dim=-1)
        new_indices = torch.cat([indices, add_idx.expand(*lead, -1)], dim=-1)
        return new_values, new_indices
