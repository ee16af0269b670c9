"""What ``sae.concepts.get_top_texts()`` hands out: `TopText` entries in a `TopTexts` table.

Two readings of the same objects are supported, because code is written against both:

* the original mi-crow documents a mapping ``{neuron_idx: [(text, activation), ...]}``: ``top.get(42, [])``,
  ``for neuron, texts in top.items()``, ``for text, activation in texts``;
* mi_crow's own code (the report, the CLI, the exports) reads a list indexed by neuron, ``len(top) == n_latents``,
  with entries carrying ``.text``, ``.activation``, ``.token_position``, ``.token`` and ``.token_id``.

`TopTexts` is a ``list`` (one list per neuron, empty for neurons that never fired) with the mapping methods
``keys()``, ``values()``, ``items()``, ``get()`` and ``in`` over the neurons that fired. Iterating it and ``len()``
keep their list meaning. `TopText` is a ``(text, activation)`` tuple that also carries the token position, the
token and its id as attributes.
"""

from __future__ import annotations

import operator
from typing import Any, Iterator

__all__ = ["TopText", "TopTexts"]


class TopText(tuple):
    """One entry of a neuron's top-text list.

    It is the pair ``(text, activation)``: ``text, activation = entry``, ``entry[0]``, ``len(entry) == 2``,
    ``json.dumps(entry)`` gives ``[text, activation]``, and it equals the plain tuple ``(text, activation)``. It also
    has the attributes below and ``_asdict()`` with all five fields. Two entries compare equal when all five fields
    do. Immutable.

    Args:
        text: the full text the activation came from.
        activation: the neuron's activation at its strongest token in this text.
        token_position: position of that token among the text's tokens (padding excluded, special tokens included).
        token: that token as the tokenizer spells it (``tokenizer.convert_ids_to_tokens``).
        token_id: that token's id.
    """

    _fields = ("text", "activation", "token_position", "token", "token_id")

    def __new__(cls, text: str, activation: float, token_position: int, token: str, token_id: int) -> TopText:
        entry = super().__new__(cls, (text, activation))
        # The pair lives in the tuple; the other fields beside it, so unpacking yields exactly two values.
        entry.__dict__.update(token_position=token_position, token=token, token_id=token_id)
        return entry

    @property
    def text(self) -> str:
        """The full text the activation came from."""
        return tuple.__getitem__(self, 0)

    @property
    def activation(self) -> float:
        """The neuron's activation at its strongest token in this text."""
        return tuple.__getitem__(self, 1)

    token_position: int
    """Position of that token among the text's tokens (padding excluded, special tokens included)."""
    token: str
    """That token as the tokenizer spells it."""
    token_id: int
    """That token's id."""

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"TopText is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"TopText is immutable: cannot delete {name!r}")

    def _astuple(self) -> tuple[str, float, int, str, int]:
        return (self.text, self.activation, self.token_position, self.token, self.token_id)

    def _asdict(self) -> dict[str, Any]:
        """All five fields: ``{"text", "activation", "token_position", "token", "token_id"}``."""
        return dict(zip(self._fields, self._astuple()))

    def _replace(self, **changes: Any) -> TopText:
        """A copy with some fields changed."""
        fields = self._asdict()
        unknown = set(changes) - set(fields)
        if unknown:
            raise ValueError(f"TopText has no fields {sorted(unknown)}; fields are {list(self._fields)}")
        fields.update(changes)
        return TopText(**fields)

    def __getnewargs__(self) -> tuple[str, float, int, str, int]:
        return self._astuple()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TopText):
            return self._astuple() == other._astuple()
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    # Equal entries have equal pairs, and an entry equal to a plain pair hashes like it.
    __hash__ = tuple.__hash__

    def __repr__(self) -> str:
        return (
            f"TopText(text={self.text!r}, activation={self.activation!r}, token_position={self.token_position!r}, "
            f"token={self.token!r}, token_id={self.token_id!r})"
        )


def _neuron_key(key: Any) -> int | None:
    """``key`` as a neuron index (an int, numpy ints included, not a bool), or None."""
    if isinstance(key, bool):
        return None
    try:
        return operator.index(key)
    except TypeError:
        return None


class TopTexts(list):
    """Every neuron's top texts: a list indexed by neuron that is also a mapping over the neurons that fired.

    As a list: ``len(top) == n_latents``; ``top[i]`` is neuron ``i``'s list of `TopText`, strongest first (empty if
    it never fired); iteration yields those lists in neuron order.

    As a mapping ``{neuron_idx: [TopText, ...]}``: ``keys()``, ``values()``, ``items()`` and ``get(i, default)``
    cover only neurons with at least one entry (ascending), and ``i in top`` for an int ``i`` tells whether neuron
    ``i`` fired. `to_dict` gives a plain dict.
    """

    def keys(self) -> list[int]:
        """Indices of the neurons with at least one entry, ascending."""
        return [i for i, entries in enumerate(self) if entries]

    def values(self) -> list[list[TopText]]:
        """The non-empty lists, in neuron order."""
        return [entries for entries in self if entries]

    def items(self) -> list[tuple[int, list[TopText]]]:
        """``(neuron_idx, entries)`` for the neurons with at least one entry, ascending."""
        return [(i, entries) for i, entries in enumerate(self) if entries]

    def get(self, neuron_idx: Any, default: Any = None) -> Any:
        """Neuron ``neuron_idx``'s entries, or ``default`` when it has none (or is not a valid index)."""
        idx = _neuron_key(neuron_idx)
        if idx is None or not 0 <= idx < len(self) or not self[idx]:
            return default
        return self[idx]

    def __contains__(self, item: object) -> bool:
        idx = _neuron_key(item)
        if idx is not None:
            return 0 <= idx < len(self) and bool(self[idx])
        return list.__contains__(self, item)

    def to_dict(self) -> dict[int, list[TopText]]:
        """``{neuron_idx: entries}`` for the neurons that fired."""
        return dict(self.items())

    def __iter__(self) -> Iterator[list[TopText]]:  # the list meaning, spelled out for readers of the mapping API
        return list.__iter__(self)
