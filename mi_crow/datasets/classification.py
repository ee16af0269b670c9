"""``ClassificationDataset``: texts with a category each (rows of dicts or a ``datasets.Dataset``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from mi_crow.datasets.text import TextDataset, hf_columns, is_hf_dataset
from mi_crow.errors import ArgumentTypeError, UserInputError

__all__ = ["ClassificationDataset"]


class ClassificationDataset(TextDataset):
    """Texts with labels. Iterates over the texts like a ``TextDataset`` (so it feeds saving and inference as is).

    Args:
        data: a ``datasets.Dataset`` or an iterable of rows (mappings) holding ``text_field`` and ``category_field``.
        store: kept as ``self.store``.
        text_field: the column / key holding the text.
        category_field: the column / key holding the label.
        name: identifier stored in run metadata.

    Attributes:
        texts: the texts, in order.
        categories: the label of each text (``categories[i]`` belongs to ``texts[i]``).

    Raises:
        ValueError: no rows, or a field missing (the available fields are listed).
        TypeError: a row that is not a mapping, or a text that is not a ``str``.
    """

    def __init__(
        self,
        data: Any,
        store: Any = None,
        text_field: str = "text",
        category_field: str = "label",
        *,
        name: str | None = None,
    ) -> None:
        if is_hf_dataset(data):
            columns = hf_columns(data, {"text_field": text_field, "category_field": category_field})
            texts, categories = columns["text_field"], columns["category_field"]
        else:
            texts, categories = _from_rows(data, text_field, category_field)
        super().__init__(texts, name=name if name is not None else f"classification[{text_field!r}]", store=store)
        self.text_field = text_field
        self.category_field = category_field
        self.categories: list[Any] = list(categories)

    def get_categories(self) -> list[Any]:
        """The distinct labels, sorted (in order of first appearance when the labels cannot be compared)."""
        unique = list(dict.fromkeys(self.categories))
        try:
            return sorted(unique)
        except TypeError:
            return unique

    def iter_items(self) -> Iterator[tuple[str, Any]]:
        """``(text, category)`` pairs in order."""
        return iter(zip(self.texts, self.categories))

    def describe(self) -> str:
        return (f"ClassificationDataset(name={self.name!r}, n_texts={len(self.texts)}, "
                f"n_categories={len(self.get_categories())})")

    def _subset(self, indices: list[int], name: str) -> ClassificationDataset:
        rows = [{self.text_field: self.texts[i], self.category_field: self.categories[i]} for i in indices]
        return ClassificationDataset(rows, self.store, self.text_field, self.category_field, name=name)


def _from_rows(rows: Iterable[Any], text_field: str, category_field: str) -> tuple[list[Any], list[Any]]:
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
        raise ArgumentTypeError(
            f"data must be a datasets.Dataset or a list of rows (dicts), got {type(rows).__name__}"
        )
    texts, categories = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ArgumentTypeError(f"data[{i}] must be a mapping (a row), got {type(row).__name__} ({row!r:.80})")
        for argument, field in (("text_field", text_field), ("category_field", category_field)):
            if field not in row:
                raise UserInputError(
                    f"{argument} {field!r} is not a field of data[{i}]; available fields: {sorted(row)}"
                )
        texts.append(row[text_field])
        categories.append(row[category_field])
    return texts, categories
