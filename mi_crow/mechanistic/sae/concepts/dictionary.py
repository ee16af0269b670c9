"""The concept dictionary: SAE neuron index -> human-given name and notes.

A researcher reads a neuron's top texts, decides what it means and names it. Names are unique within one
dictionary so that a name can stand in for the neuron index everywhere (``manipulate_concept("cats", 0.0)``).
The dictionary is saved as JSON (next to the SAE in a store, or at a plain path) and can be imported from a CSV
file a person edited in a spreadsheet.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import numbers
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.store.errors import CorruptStoreFileError, StoreKeyNotFoundError
from mi_crow.store.local import atomic_write
from mi_crow.validation import check_positive_int

logger = logging.getLogger(__name__)

__all__ = ["Concept", "ConceptDictionary", "check_neuron_index"]

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Concept:
    """One named neuron."""

    neuron: int
    """Index of the SAE latent, in ``[0, n_latents)``."""
    name: str
    """Unique, non-empty name of the concept."""
    notes: str = ""
    """Free text: evidence, caveats, who named it."""


def check_neuron_index(neuron_idx: Any, n_latents: int, arg: str = "neuron_idx") -> int:
    """Validate a neuron index and return it as a plain ``int``.

    Args:
        neuron_idx: the candidate index (``int`` or any integer-like object such as ``numpy.int64``; not ``bool``).
        n_latents: number of SAE latents; valid indices are ``0 .. n_latents - 1``.
        arg: argument name used in the error message.

    Returns:
        The index as ``int``.

    Raises:
        TypeError: not an integer.
        ValueError: outside ``[0, n_latents)``.
    """
    if isinstance(neuron_idx, bool):
        raise ArgumentTypeError(f"{arg} must be an int neuron index, got bool {neuron_idx!r}")
    try:
        idx = operator.index(neuron_idx)
    except TypeError:
        raise ArgumentTypeError(
            f"{arg} must be an int neuron index, got {type(neuron_idx).__name__} {neuron_idx!r}"
        ) from None
    if not 0 <= idx < n_latents:
        raise UserInputError(f"{arg} must be in [0, {n_latents}) (the SAE has {n_latents} latents), got {idx}")
    return idx


def _atomic_write_text(path: Path, text: str) -> None:
    # Write beside the target and rename so that a crash never leaves a half-written file that looks valid.
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)

    atomic_write(path, write)


class ConceptDictionary:
    """Neuron index -> :class:`Concept` (name and notes), with lookup by name.

    Args:
        n_latents: number of latents of the SAE the dictionary describes; indices are checked against it.

    Names are unique: naming a second neuron with a name already in use raises ``ValueError`` (rename or
    ``remove`` the first one). Renaming a neuron replaces its old entry.
    """

    def __init__(self, n_latents: int) -> None:
        self.n_latents = check_positive_int(n_latents, "n_latents")
        self._by_neuron: dict[int, Concept] = {}
        self._by_name: dict[str, int] = {}

    # ------------------------------------------------------------------ editing
    def add(self, neuron_idx: int, name: str, notes: str = "") -> Concept:
        """Name a neuron (or rename it).

        Args:
            neuron_idx: latent index in ``[0, n_latents)``.
            name: non-empty name, unique in this dictionary (surrounding whitespace is stripped).
            notes: free text.

        Returns:
            The stored :class:`Concept`.

        Raises:
            TypeError / ValueError: bad index, empty or non-string name, name used by another neuron.
        """
        idx = check_neuron_index(neuron_idx, self.n_latents)
        if not isinstance(name, str):
            raise ArgumentTypeError(f"name must be a str, got {type(name).__name__} {name!r}")
        clean = name.strip()
        if not clean:
            raise UserInputError(f"name must be a non-empty string, got {name!r}")
        if not isinstance(notes, str):
            raise ArgumentTypeError(f"notes must be a str, got {type(notes).__name__} {notes!r}")
        owner = self._by_name.get(clean)
        if owner is not None and owner != idx:
            raise UserInputError(f"name {clean!r} is already used by neuron {owner}; names must be unique")
        old = self._by_neuron.get(idx)
        if old is not None:
            del self._by_name[old.name]
        concept = Concept(idx, clean, notes)
        self._by_neuron[idx] = concept
        self._by_name[clean] = idx
        return concept

    def remove(self, neuron_idx: int) -> None:
        """Forget the name of a neuron (no error when it has none)."""
        idx = check_neuron_index(neuron_idx, self.n_latents)
        old = self._by_neuron.pop(idx, None)
        if old is not None:
            del self._by_name[old.name]

    def clear(self) -> None:
        """Remove every entry."""
        self._by_neuron.clear()
        self._by_name.clear()

    # ------------------------------------------------------------------ lookup
    def get(self, neuron_idx: int) -> Concept | None:
        """The concept of a neuron, or ``None`` when it is unnamed."""
        return self._by_neuron.get(check_neuron_index(neuron_idx, self.n_latents))

    def name_of(self, neuron_idx: int) -> str | None:
        """The name of a neuron, or ``None`` when it is unnamed."""
        concept = self.get(neuron_idx)
        return None if concept is None else concept.name

    def index_of(self, name: str) -> int:
        """The neuron index of a named concept.

        Raises:
            TypeError: ``name`` is not a string.
            ValueError: no concept has that name (the message lists a few known names).
        """
        if not isinstance(name, str):
            raise ArgumentTypeError(f"name must be a str, got {type(name).__name__} {name!r}")
        idx = self._by_name.get(name.strip())
        if idx is None:
            known = sorted(self._by_name)
            shown = ", ".join(repr(n) for n in known[:10]) + (", ..." if len(known) > 10 else "")
            raise UserInputError(
                f"unknown concept name {name!r}; known names: {shown or '(none: name neurons with name_concept)'}"
            )
        return idx

    def resolve(self, neuron_idx_or_name: int | str, arg: str = "neuron_idx_or_name") -> int:
        """Turn a neuron index or a concept name into a checked neuron index."""
        if isinstance(neuron_idx_or_name, str):
            return self.index_of(neuron_idx_or_name)
        return check_neuron_index(neuron_idx_or_name, self.n_latents, arg)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return item.strip() in self._by_name
        if isinstance(item, numbers.Integral) and not isinstance(item, bool):
            return int(item) in self._by_neuron
        return False

    def __len__(self) -> int:
        return len(self._by_neuron)

    def __iter__(self) -> Iterator[Concept]:
        return iter(sorted(self._by_neuron.values(), key=lambda c: c.neuron))

    def items(self) -> list[Concept]:
        """All concepts sorted by neuron index."""
        return list(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConceptDictionary):
            return NotImplemented
        return self.n_latents == other.n_latents and self._by_neuron == other._by_neuron

    def __repr__(self) -> str:
        return f"ConceptDictionary(n_latents={self.n_latents}, named={len(self)})"

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"version", "n_latents", "concepts": [{"neuron", "name", "notes"}, ...]}``."""
        return {
            "version": _FORMAT_VERSION,
            "n_latents": self.n_latents,
            "concepts": [{"neuron": c.neuron, "name": c.name, "notes": c.notes} for c in self],
        }

    @classmethod
    def from_dict(cls, data: Any, n_latents: int | None = None) -> "ConceptDictionary":
        """Build a dictionary from :meth:`to_dict` output.

        Args:
            data: the mapping.
            n_latents: expected number of latents; when given it must equal ``data["n_latents"]``.

        Raises:
            ValueError / TypeError: malformed data (the message names the entry), or an ``n_latents`` mismatch.
        """
        if not isinstance(data, dict) or "concepts" not in data or "n_latents" not in data:
            raise UserInputError("concept dictionary data must be a dict with keys 'n_latents' and 'concepts'")
        stored_n = data["n_latents"]
        if n_latents is not None and stored_n != n_latents:
            raise UserInputError(
                f"concept dictionary is for an SAE with n_latents={stored_n}, but this SAE has n_latents={n_latents}"
            )
        out = cls(stored_n)
        entries = data["concepts"]
        if not isinstance(entries, list):
            raise UserInputError(f"concept dictionary 'concepts' must be a list, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "neuron" not in entry or "name" not in entry:
                raise UserInputError(f"concept dictionary entry {i} must have 'neuron' and 'name', got {entry!r}")
            try:
                out.add(entry["neuron"], entry["name"], entry.get("notes", "") or "")
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"concept dictionary entry {i}: {exc}") from None
        return out

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the dictionary as JSON to ``path`` atomically; returns the path."""
        target = Path(path)
        _atomic_write_text(target, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return target

    @classmethod
    def load_json(cls, path: str | os.PathLike[str], n_latents: int | None = None) -> "ConceptDictionary":
        """Read a dictionary written by :meth:`save_json`.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file is not valid JSON or not a concept dictionary (the path is named).
        """
        source = Path(path)
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreKeyNotFoundError(f"concept dictionary file not found: {source}") from None
        except json.JSONDecodeError as exc:
            raise CorruptStoreFileError(f"concept dictionary file {source} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data, n_latents)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{source}: {exc}") from None

    def import_csv(self, path: str | os.PathLike[str], replace: bool = False) -> int:
        """Import names from a CSV file with a header row and columns ``neuron,name[,notes]``.

        All rows are checked before anything changes, so a bad file leaves the dictionary as it was. Rows whose
        name is empty are skipped (a spreadsheet with unnamed neurons is normal). Row numbers in errors count the
        header as row 1, as a spreadsheet shows them.

        Args:
            path: the CSV file (UTF-8, a BOM is accepted).
            replace: drop all existing entries first instead of merging (entries in the file win on conflict).

        Returns:
            The number of concepts imported.

        Raises:
            FileNotFoundError: no such file.
            ValueError: missing ``neuron``/``name`` columns, or a bad row (non-integer or out-of-range neuron, the
                same neuron or name twice in the file); the message names the row.
        """
        source = Path(path)
        try:
            text = source.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise StoreKeyNotFoundError(f"concept CSV file not found: {source}") from None
        reader = csv.DictReader(text.splitlines())
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "neuron" not in fields or "name" not in fields:
            raise UserInputError(
                f"concept CSV {source} must have a header with columns 'neuron' and 'name' (and optionally "
                f"'notes'), got {reader.fieldnames!r}"
            )
        key = {f.strip().lower(): f for f in (reader.fieldnames or [])}
        parsed: list[tuple[int, str, str]] = []
        seen_neurons: dict[int, int] = {}
        seen_names: dict[str, int] = {}
        for row_no, row in enumerate(reader, start=2):
            raw_neuron = (row.get(key["neuron"]) or "").strip()
            name = (row.get(key["name"]) or "").strip()
            notes = (row.get(key["notes"]) or "").strip() if "notes" in key else ""
            if not name:
                continue
            try:
                neuron = int(raw_neuron)
            except ValueError:
                raise UserInputError(
                    f"concept CSV {source} row {row_no}: neuron must be an integer, got {raw_neuron!r}"
                ) from None
            if not 0 <= neuron < self.n_latents:
                raise UserInputError(
                    f"concept CSV {source} row {row_no}: neuron must be in [0, {self.n_latents}), got {neuron}"
                )
            if neuron in seen_neurons:
                raise UserInputError(
                    f"concept CSV {source} row {row_no}: neuron {neuron} already named in row {seen_neurons[neuron]}"
                )
            if name in seen_names:
                raise UserInputError(
                    f"concept CSV {source} row {row_no}: name {name!r} already used in row {seen_names[name]}"
                )
            seen_neurons[neuron] = row_no
            seen_names[name] = row_no
            parsed.append((neuron, name, notes))

        staged = ConceptDictionary(self.n_latents)
        if not replace:
            for c in self:
                # Entries from the file override existing ones for the same neuron or the same name.
                if c.neuron not in seen_neurons and c.name not in seen_names:
                    staged.add(c.neuron, c.name, c.notes)
        for neuron, name, notes in parsed:
            staged.add(neuron, name, notes)
        self._by_neuron = staged._by_neuron
        self._by_name = staged._by_name
        logger.info("imported %d concepts from %s", len(parsed), source)
        return len(parsed)

    def export_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write ``neuron,name,notes`` rows (the format :meth:`import_csv` reads); returns the path."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["neuron", "name", "notes"])
        for c in self:
            writer.writerow([c.neuron, c.name, c.notes])
        target = Path(path)
        _atomic_write_text(target, buf.getvalue())
        return target
