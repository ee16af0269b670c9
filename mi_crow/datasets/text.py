"""``TextDataset``: texts held in memory, from a list or from local ``.txt`` / ``.jsonl`` / ``.csv`` files."""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, overload

from mi_crow.datasets.base import BaseDataset, sample_indices
from mi_crow.datasets.huggingface import HuggingFaceDataset
from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.validation import resolve_synonym

__all__ = ["TextDataset", "is_hf_dataset", "hf_columns"]

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


def _existing_file(path: object, argument: str = "path") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"{argument} must be a str or os.PathLike, got {type(path).__name__} ({path!r})")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{argument} {str(p)!r} does not exist or is not a file")
    return p


def is_hf_dataset(value: object) -> bool:
    """Whether ``value`` is a ``datasets`` dataset (``Dataset``, ``IterableDataset`` or ``DatasetDict``)."""
    return type(value).__module__.split(".")[0] == "datasets" and hasattr(value, "column_names")


def hf_columns(data: Any, fields: dict[str, str]) -> dict[str, list[Any]]:
    """Columns of a ``datasets`` dataset, by argument name: ``{"text_field": "text"}`` -> ``{"text_field": [...]}``.

    Raises:
        ValueError: a ``DatasetDict`` (a split must be chosen) or a field that is not a column (columns listed).
    """
    columns = data.column_names
    if isinstance(columns, dict):
        raise UserInputError(
            f"got a DatasetDict with splits {sorted(columns)}: pass one split, e.g. dataset['train']"
        )
    if columns is None:  # a streaming dataset without declared features: read the rows
        rows = list(data)
        columns = list(rows[0]) if rows else []
        get = lambda field: [row[field] for row in rows]  # noqa: E731
    else:
        get = lambda field: list(data[field])  # noqa: E731
    out = {}
    for argument, field in fields.items():
        if not isinstance(field, str):
            raise ArgumentTypeError(f"{argument} must be a str, got {type(field).__name__} ({field!r})")
        if field not in columns:
            raise UserInputError(f"{argument} {field!r} is not a column of the dataset; available columns: {columns}")
        out[argument] = get(field)
    return out


class TextDataset(BaseDataset):
    """A list of texts in memory.

    Call shapes: ``TextDataset(texts=[...])``, ``TextDataset(hf_dataset, text_field="text")`` (a ``datasets.Dataset``
    whose ``text_field`` column holds the texts), ``TextDataset.from_huggingface(name, ...)`` and the file loaders.

    Args:
        texts: the texts (a non-empty list or other iterable of ``str``), or a ``datasets.Dataset``.
        name: identifier stored in run metadata (default ``"texts"``; the loaders use the file path).
        store: accepted for the documented call shape; kept as ``self.store`` (the texts are held in memory).
        text_field: the column holding the texts when ``texts`` is a ``datasets.Dataset``.

    Raises:
        ValueError: ``texts`` is empty, or ``text_field`` is not a column of the ``datasets.Dataset``.
        TypeError: ``texts`` is a single string or not iterable, or an item is not a ``str`` (the index is named).
    """

    def __init__(
        self,
        texts: Iterable[str] | Any,
        name: str | None = None,
        *,
        store: Any = None,
        text_field: str = "text",
    ) -> None:
        if is_hf_dataset(texts):
            texts = hf_columns(texts, {"text_field": text_field})["text_field"]
            name = name if name is not None else f"datasets.Dataset[{text_field!r}]"
        name = "texts" if name is None else name
        if isinstance(texts, (str, bytes)):
            raise ArgumentTypeError(
                f"texts must be a list of str, got a single {type(texts).__name__}: {texts[:50]!r}"
            )
        try:
            items = list(texts)
        except TypeError as exc:
            raise ArgumentTypeError(f"texts must be a list (iterable) of str, got {type(texts).__name__}") from exc
        if not items:
            raise UserInputError("texts must contain at least one text, got an empty collection")
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise ArgumentTypeError(f"texts[{i}] must be a str, got {type(item).__name__} ({item!r:.80})")
        if not isinstance(name, str):
            raise ArgumentTypeError(f"name must be a str, got {type(name).__name__}")
        self.texts: list[str] = items
        self.name = name
        self.store = store

    @classmethod
    def from_huggingface(
        cls,
        name: str | os.PathLike[str] | None = None,
        split: str = "train",
        store: Any = None,
        text_field: str = "text",
        limit: int | None = None,
        *,
        dataset_name: str | None = None,
        **load_dataset_kwargs: Any,
    ) -> TextDataset:
        """Load the ``text_field`` column of a ``datasets`` dataset into memory (see ``HuggingFaceDataset`` for
        what ``name`` may be: a Hub id, a packaged builder with ``data_files=``, a local folder, a
        ``save_to_disk`` folder; offline only local data works).

        Args:
            name: the dataset (``dataset_name=`` is a keyword synonym).
            split: the split.
            store: kept as ``self.store``.
            text_field: the column holding the texts.
            limit: use at most this many rows.
            **load_dataset_kwargs: passed to ``datasets.load_dataset``.
        """
        name = resolve_synonym("name", name, "dataset_name", dataset_name)
        source = HuggingFaceDataset(name, split=split, text_field=text_field, limit=limit, **load_dataset_kwargs)
        return cls(list(source), name=source.describe(), store=store)

    def random_sample(self, n: int, seed: int | None = None) -> TextDataset:
        """A dataset of ``n`` texts drawn uniformly without replacement (same seed, same texts, same order).

        Args:
            n: how many texts, ``1 <= n <= len(self)``.
            seed: seed of the draw; ``None``: a fresh draw each time.
        """
        indices = sample_indices(len(self.texts), n, seed)
        return self._subset(indices, f"{self.name}[random_sample(n={len(indices)}, seed={seed})]")

    def _subset(self, indices: list[int], name: str) -> TextDataset:
        return TextDataset([self.texts[i] for i in indices], name=name, store=self.store)

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts)

    def __len__(self) -> int:
        return len(self.texts)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        return self.texts[index]

    def describe(self) -> str:
        return f"TextDataset(name={self.name!r}, n_texts={len(self.texts)})"

    # ------------------------------------------------------------------ loaders
    @classmethod
    def from_txt(cls, path: str | os.PathLike[str], mode: str = "line", encoding: str = "utf-8") -> TextDataset:
        """Load a plain-text file.

        Args:
            path: the ``.txt`` file.
            mode: ``"line"``: one text per non-blank line (line breaks removed); ``"paragraph"``: one text per block
                of lines separated by blank lines (inner line breaks kept, surrounding whitespace stripped).
            encoding: file encoding.

        Raises:
            FileNotFoundError: ``path`` is not a file. ValueError: bad ``mode``, or the file has no text.
        """
        if mode not in ("line", "paragraph"):
            raise UserInputError(f"mode must be 'line' or 'paragraph', got {mode!r}")
        p = _existing_file(path)
        content = p.read_text(encoding=encoding)
        if mode == "line":
            texts = [line.rstrip("\r") for line in content.split("\n") if line.strip()]
        else:
            texts = [block.strip() for block in _PARAGRAPH_BREAK.split(content.replace("\r\n", "\n")) if block.strip()]
        if not texts:
            raise UserInputError(f"path {str(p)!r} contains no text (mode={mode!r})")
        return cls(texts, name=str(p))

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str], text_field: str = "text", encoding: str = "utf-8"
                   ) -> TextDataset:
        """Load a JSON-lines file: one JSON object per line, the text under ``text_field``.

        Raises:
            FileNotFoundError: ``path`` is not a file.
            ValueError: a line is not a JSON object, ``text_field`` is missing (the available keys are listed),
                or the file has no records.
            TypeError: a record's ``text_field`` is not a string (line number named).
        """
        if not isinstance(text_field, str):
            raise ArgumentTypeError(f"text_field must be a str, got {type(text_field).__name__}")
        p = _existing_file(path)
        texts: list[str] = []
        with p.open(encoding=encoding) as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserInputError(f"{p}:{line_no} is not valid JSON: {exc}") from exc
                if not isinstance(record, dict):
                    raise UserInputError(f"{p}:{line_no} must be a JSON object, got {type(record).__name__}")
                if text_field not in record:
                    raise UserInputError(
                        f"text_field {text_field!r} not found in {p}:{line_no}; available fields: {sorted(record)}"
                    )
                value = record[text_field]
                if not isinstance(value, str):
                    raise ArgumentTypeError(
                        f"{p}:{line_no}: field {text_field!r} must be a str, got {type(value).__name__} ({value!r:.80})"
                    )
                texts.append(value)
        if not texts:
            raise UserInputError(f"path {str(p)!r} contains no records")
        return cls(texts, name=str(p))

    @classmethod
    def from_csv(cls, path: str | os.PathLike[str], text_field: str = "text", delimiter: str = ",",
                 encoding: str = "utf-8") -> TextDataset:
        """Load a CSV file with a header row; the texts are the ``text_field`` column.

        Raises:
            FileNotFoundError: ``path`` is not a file.
            ValueError: no header, ``text_field`` not a column (the columns are listed), no rows.
        """
        if not isinstance(text_field, str):
            raise ArgumentTypeError(f"text_field must be a str, got {type(text_field).__name__}")
        p = _existing_file(path)
        with p.open(encoding=encoding, newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = reader.fieldnames
            if not columns:
                raise UserInputError(f"path {str(p)!r} has no header row")
            if text_field not in columns:
                raise UserInputError(f"text_field {text_field!r} is not a column of {p}; available columns: {columns}")
            texts = [row[text_field] if row[text_field] is not None else "" for row in reader]
        if not texts:
            raise UserInputError(f"path {str(p)!r} has a header but no rows")
        return cls(texts, name=str(p))
