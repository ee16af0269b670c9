"""Steering state: per-neuron scales and additions, and how they rewrite an SAE code.

``manipulate_concept`` scales a neuron's activation where it fires (1.5 amplifies, 0.5 suppresses, 0 ablates) and
``add_concept`` adds a chosen activation of a neuron (its decoder direction) wherever the user asks. The SAE applies
them through :meth:`Steering.modify_code`, adding only ``decode(modified code) - decode(code)`` to the layer output
so the model's own reconstruction error is kept. Neuron names are resolved by the facade
(:class:`~mi_crow.mechanistic.sae.concepts.facade.AutoencoderConcepts`); this module sees neuron indices only.
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

__all__ = ["CONFIG_VERSION", "Steering"]

CONFIG_VERSION = 1


@dataclass(frozen=True)
class _Addition:
    activation: float
    positions: tuple[int, ...] | None


def _check_finite_number(value: Any, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{arg} must be a real number, got {type(value).__name__} {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise UserInputError(f"{arg} must be finite, got {out}")
    return out


class Steering:
    """The scales and additions set on one SAE, and the code rewrite they imply.

    Args:
        sae: the SAE; ``n_latents`` sizes the scale table and ``context`` (its current batch context, if any) tells
            :meth:`modify_code` where each token sits in its text.
    """

    def __init__(self, sae: Any) -> None:
        self.sae = sae
        self.scales: dict[int, float] = {}
        self.additions: dict[int, _Addition] = {}
        self._scale_tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._prompt_lengths: Tensor | None = None

    # ------------------------------------------------------------------ editing
    def set_scale(self, neuron: int, scale: Any) -> None:
        """Scale ``neuron`` (an already checked index) by ``scale``, a finite real ``>= 0``."""
        value = _check_finite_number(scale, "scale")
        if value < 0:
            raise UserInputError(f"scale must be >= 0 (1.5 amplifies, 0.5 suppresses, 0 ablates), got {value}")
        self.scales[neuron] = value
        self._scale_tables.clear()

    def set_addition(self, neuron: int, activation: Any, positions: Sequence[int] | None) -> None:
        """Add ``activation`` of ``neuron`` (an already checked index) at ``positions`` (``None``: every token)."""
        value = _check_finite_number(activation, "activation")
        pos: tuple[int, ...] | None = None
        if positions is not None:
            if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence):
                raise ArgumentTypeError(f"positions must be None or a sequence of ints, got {type(positions).__name__}")
            if len(positions) == 0:
                raise UserInputError("positions must be None (every token) or a non-empty sequence of ints, got []")
            checked = []
            for p in positions:
                if isinstance(p, bool) or not isinstance(p, numbers.Integral):
                    raise ArgumentTypeError(f"positions must contain ints, got {type(p).__name__} {p!r}")
                checked.append(int(p))
            pos = tuple(sorted(set(checked)))
        self.additions[neuron] = _Addition(value, pos)

    def reset(self) -> None:
        """Remove every scale and addition."""
        self.scales.clear()
        self.additions.clear()
        self._scale_tables.clear()

    @property
    def active(self) -> bool:
        """Whether any scale or addition is set."""
        return bool(self.scales or self.additions)

    # ------------------------------------------------------------------ config
    def to_config(self, names: ConceptDictionary) -> dict[str, Any]:
        """The manipulations as a JSON-able dict; ``names`` gives each neuron's concept name (or ``None``)."""
        return {
            "version": CONFIG_VERSION,
            "scales": [
                {"neuron": i, "name": names.name_of(i), "scale": s} for i, s in sorted(self.scales.items())
            ],
            "additions": [
                {
                    "neuron": i,
                    "name": names.name_of(i),
                    "activation": a.activation,
                    "positions": None if a.positions is None else list(a.positions),
                }
                for i, a in sorted(self.additions.items())
            ],
        }

    def load_config(self, config: Any, resolve: Callable[[int | str], int]) -> None:
        """Replace the manipulations with ``config`` (from :meth:`to_config`), checking everything first.

        Args:
            config: the dict.
            resolve: turns an entry's ``neuron`` (or, when absent, its ``name``) into a checked neuron index.

        Raises:
            TypeError / ValueError: malformed config; the message names the entry.
        """
        if not isinstance(config, dict):
            raise ArgumentTypeError(f"config must be a dict, got {type(config).__name__}")
        unknown = set(config) - {"version", "scales", "additions"}
        if unknown:
            raise UserInputError(f"config has unknown keys {sorted(unknown)}; expected 'version', 'scales', 'additions'")
        if config.get("version", CONFIG_VERSION) != CONFIG_VERSION:
            raise UserInputError(f"config version must be {CONFIG_VERSION}, got {config.get('version')!r}")
        staged = Steering(self.sae)
        for section in ("scales", "additions"):
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
                    else:
                        if "activation" not in entry:
                            raise UserInputError(f"missing 'activation' in {entry!r}")
                        staged.set_addition(resolve(target), entry["activation"], entry.get("positions"))
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"{where}: {exc}") from None
        self.scales = staged.scales
        self.additions = staged.additions
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
        """Apply the manipulations to a sparse code (see ``AutoencoderConcepts.modify_code``).

        Args:
            values: ``[batch, seq, k]`` (or ``[tokens, k]``) code values.
            indices: same shape, int64 latent indices.

        Returns:
            ``None`` when nothing is set, else ``(values2, indices2)`` of shape ``[..., k + n_additions]``.
        """
        if not self.scales and not self.additions:
            return None
        if values.dim() < 2 or indices.shape != values.shape:
            raise UserInputError(
                f"values and indices must have the same shape [..., k]; got {tuple(values.shape)} and "
                f"{tuple(indices.shape)}"
            )
        new_values = values
        new_indices = indices
        if self.scales:
            table = self._scale_table(values.device, values.dtype)
            new_values = values * table[indices]
        if self.additions:
            lead = values.shape[:-1]
            device = values.device
            cols_v = []
            for neuron, add in sorted(self.additions.items()):
                if add.positions is None:
                    col = torch.full(lead, add.activation, dtype=values.dtype, device=device)
                else:
                    mask = self._addition_mask(add.positions, lead, device)
                    col = mask.to(values.dtype) * add.activation
                cols_v.append(col)
            add_idx = torch.tensor(sorted(self.additions), dtype=indices.dtype, device=device)
            new_values = torch.cat([new_values, torch.stack(cols_v, dim=-1)], dim=-1)
            new_indices = torch.cat([indices, add_idx.expand(*lead, -1)], dim=-1)
        return new_values, new_indices
