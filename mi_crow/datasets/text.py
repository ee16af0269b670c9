"""``TextDataset``: texts held in memory, from a list or from local ``.txt`` / ``.jsonl`` / ``.csv`` files."""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import overload

from mi_crow.datasets.base import BaseDataset
from mi_crow.errors import UserInputError

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


def _existing_file(path: object, argument: str = "path") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a str or os.PathLike, got {type(path).__name__} ({path!r})")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{argument} {str(p)!r} does not exist or is not a file")
    return p


class TextDataset(BaseDataset):
    """A list of texts in memory.

    Args:
        texts: the texts; a non-empty list (or other iterable) of ``str``.
        name: identifier stored in run metadata (default ``"texts"``; the loaders use the file path).

    Raises:
        ValueError: ``texts`` is empty.
        TypeError: ``texts`` is a single string or not iterable, or an item is not a ``str`` (the index is named).
    """

    def __init__(self, texts: Iterable[str], name: str = "texts") -> None:
        if isinstance(texts, (str, bytes)):
            raise TypeError(f"texts must be a list of str, got a single {type(texts).__name__}: {texts[:50]!r}")
        try:
            items = list(texts)
        except TypeError as exc:
            raise TypeError(f"texts must be a list (iterable) of str, got {type(texts).__name__}") from exc
        if not items:
            raise ValueError("texts must contain at least one text, got an empty collection")
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(item).__name__} ({item!r:.80})")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self.texts: list[str] = items
        self.name = name

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
            raise ValueError(f"mode must be 'line' or 'paragraph', got {mode!r}")
        p = _existing_file(path)
        content = p.read_text(encoding=encoding)
        if mode == "line":
            texts = [line.rstrip("\r") for line in content.split("\n") if line.strip()]
        else:
            texts = [block.strip() for block in _PARAGRAPH_BREAK.split(content.replace("\r\n", "\n")) if block.strip()]
        if not texts:
            raise ValueError(f"path {str(p)!r} contains no text (mode={mode!r})")
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
            raise TypeError(f"text_field must be a str, got {type(text_field).__name__}")
        p = _existing_file(path)
        texts: list[str] = []
        with p.open(encoding=encoding) as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p}:{line_no} is not valid JSON: {exc}") from exc
                if not isinstance(record, dict):
                    raise ValueError(f"{p}:{line_no} must be a JSON object, got {type(record).__name__}")
                if text_field not in record:
                    raise UserInputError(
                        f"text_field {text_field!r} not found in {p}:{line_no}; available fields: {sorted(record)}"
                    )
                value = record[text_field]
                if not isinstance(value, str):
                    raise TypeError(
                        f"{p}:{line_no}: field {text_field!r} must be a str, got {type(value).__name__} ({value!r:.80})"
                    )
                texts.append(value)
        if not texts:
            raise ValueError(f"path {str(p)!r} contains no records")
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
            raise TypeError(f"text_field must be a str, got {type(text_field).__name__}")
        p = _existing_file(path)
        with p.open(encoding=encoding, newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = reader.fieldnames
            if not columns:
                raise ValueError(f"path {str(p)!r} has no header row")
            if text_field not in columns:
                raise UserInputError(f"text_field {text_field!r} is not a column of {p}; available columns: {columns}")
            texts = [row[text_field] if row[text_field] is not None else "" for row in reader]
        if not texts:
            raise ValueError(f"path {str(p)!r} has a header but no rows")
        return cls(texts, name=str(p))
