"""``HuggingFaceDataset``: texts from the ``datasets`` library (Hub datasets, local data files, saved datasets)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mi_crow.datasets.base import BaseDataset, sample_indices
from mi_crow.errors import ArgumentTypeError, NotSupportedError, UserInputError
from mi_crow.validation import check_int, fail

logger = logging.getLogger(__name__)

_TRUE = {"1", "ON", "YES", "TRUE"}


class DatasetUnavailableOfflineError(UserInputError, ConnectionError):
    """A Hub dataset name that cannot be resolved without network access."""


def _offline() -> bool:
    if any(os.environ.get(var, "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    try:
        import datasets.config

        return bool(datasets.config.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def _is_saved_dataset(path: Path) -> bool:
    # Layout written by Dataset.save_to_disk / DatasetDict.save_to_disk.
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                   and (path / "dataset_info.json").is_file())
    )


def _packaged_builders() -> set[str]:
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        return set(_PACKAGED_DATASETS_MODULES)
    except ImportError:  # a datasets release that moved the table: the common builders still count as local
        return {"json", "csv", "text", "parquet", "arrow", "pandas"}


class HuggingFaceDataset(BaseDataset):
    """Texts from one column of a ``datasets`` dataset.

    ``name`` may be a Hub dataset id, a packaged builder used with local files (``"json"``, ``"csv"``, ``"text"``,
    ``"parquet"`` with ``data_files=...``), a local folder of data files, or a folder written by
    ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (detected and opened with ``load_from_disk``).

    Args:
        name: dataset id, builder name or local path.
        split: split to use (``"train"``; slicing syntax such as ``"train[:100]"`` works for ``load_dataset``).
        text_field: column holding the texts.
        streaming: iterate without downloading/materialising the whole dataset (``len()`` is then unknown).
        limit: use at most this many rows.
        **load_dataset_kwargs: passed to ``datasets.load_dataset`` (``data_files``, ``data_dir``, ``revision``...).

    Raises:
        ValueError: ``text_field`` is not a column (columns listed), unknown split of a saved dataset, empty data.
        DatasetUnavailableOfflineError: a Hub name while offline or without network (suggests a local path).
        TypeError: a bad argument type, or a text value that is not a string (row index named, while iterating).
    """

    def __init__(
        self,
        name: str | os.PathLike[str],
        split: str = "train",
        text_field: str = "text",
        streaming: bool = False,
        limit: int | None = None,
        **load_dataset_kwargs: Any,
    ) -> None:
        if not isinstance(name, (str, os.PathLike)):
            raise ArgumentTypeError(
                f"name must be a str (dataset id, builder or path), got {type(name).__name__} ({name!r})"
            )
        if not isinstance(split, str):
            raise ArgumentTypeError(f"split must be a str, got {type(split).__name__} ({split!r})")
        if not isinstance(text_field, str):
            raise ArgumentTypeError(f"text_field must be a str, got {type(text_field).__name__} ({text_field!r})")
        if check_int(limit, "limit", allow_none=True) is not None and limit < 1:
            raise fail("limit", "> 0", limit)
        self.name = os.fspath(name)
        self.split = split
        self.text_field = text_field
        self.streaming = bool(streaming)
        self.limit = limit
        self.load_dataset_kwargs = dict(load_dataset_kwargs)
        self._data = self._open()
        self._check_columns()
        if not self.streaming and len(self._data) == 0:
            raise UserInputError(f"dataset {self.name!r} (split {split!r}) has no rows")

    # ------------------------------------------------------------------ loading
    def _open(self) -> Any:
        import datasets

        path = Path(self.name).expanduser()
        if _is_saved_dataset(path):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if self.split not in data:
                    raise UserInputError(
                        f"split {self.split!r} not in the dataset saved at {str(path)!r}; available splits: "
                        f"{sorted(data)}"
                    )
                data = data[self.split]
            if self.streaming:
                data = data.to_iterable_dataset()
            return self._apply_limit(data)

        local = path.exists() or self.name in _packaged_builders()
        try:
            data = datasets.load_dataset(self.name, split=self.split, streaming=self.streaming,
                                         **self.load_dataset_kwargs)
        except (ConnectionError, FileNotFoundError, OSError) as exc:
            if local:
                raise
            reason = "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if _offline() else "no network access"
            raise DatasetUnavailableOfflineError(
                f"name {self.name!r} is a Hugging Face Hub dataset that cannot be loaded: {reason} and it is not in "
                f"the local cache ({type(exc).__name__}: {exc}). Use local data instead, e.g. "
                "HuggingFaceDataset('json', data_files='data.jsonl'), HuggingFaceDataset('text', data_files='a.txt'), "
                "a folder written by Dataset.save_to_disk, or TextDataset.from_jsonl(path)."
            ) from exc
        except StopIteration as exc:  # some builders (json) fail this way on an empty file
            raise UserInputError(f"dataset {self.name!r} (split {self.split!r}) has no rows") from exc
        except ValueError as exc:
            # datasets reports an unknown split or an empty source as a bare ValueError; add which dataset it was.
            raise UserInputError(f"dataset {self.name!r} (split {self.split!r}) could not be loaded: {exc}") from exc
        return self._apply_limit(data)

    def _apply_limit(self, data: Any) -> Any:
        if self.limit is None:
            return data
        if self.streaming:
            return data.take(self.limit)
        return data.select(range(min(self.limit, len(data))))

    def _columns(self) -> list[str] | None:
        columns = getattr(self._data, "column_names", None)
        if columns is None and getattr(self._data, "features", None) is not None:
            columns = list(self._data.features)
        return list(columns) if columns is not None else None

    def _check_columns(self) -> None:
        columns = self._columns()
        if columns is None:  # a streaming source without declared features: look at the first row
            first = next(iter(self._data), None)
            if first is None:
                raise UserInputError(f"dataset {self.name!r} (split {self.split!r}) has no rows")
            columns = list(first)
        if self.text_field not in columns:
            raise UserInputError(
                f"text_field {self.text_field!r} is not a column of dataset {self.name!r} (split {self.split!r}); "
                f"available columns: {columns}"
            )

    # ------------------------------------------------------------------ access
    @property
    def data(self) -> Any:
        """The underlying ``datasets.Dataset`` (or ``IterableDataset`` when streaming)."""
        return self._data

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError(f"the length of streaming {self.describe()} is not known")
        return len(self._data)

    def __iter__(self) -> Iterator[str]:
        index = 0
        if self.streaming:
            rows: Iterator[str] = (row[self.text_field] for row in self._data)
        else:
            # Column chunks instead of per-row dicts: far fewer Python objects per text.
            rows = (t for chunk in self._data.select_columns([self.text_field]).iter(batch_size=1024)
                    for t in chunk[self.text_field])
        for text in rows:
            if not isinstance(text, str):
                raise ArgumentTypeError(
                    f"row {index} of dataset {self.name!r}: field {self.text_field!r} must be a str, "
                    f"got {type(text).__name__} ({text!r:.80})"
                )
            yield text
            index += 1

    def random_sample(self, n: int, seed: int | None = None) -> HuggingFaceDataset:
        """A dataset of ``n`` rows drawn uniformly without replacement (same seed, same rows).

        Args:
            n: how many texts, ``1 <= n <= len(self)``.
            seed: seed of the draw; ``None``: a fresh draw each time.

        Returns:
            A ``HuggingFaceDataset`` over the drawn rows, in the order drawn.

        Raises:
            NotSupportedError: a streaming dataset (its length is not known).
        """
        if self.streaming:
            raise NotSupportedError("random_sample needs the dataset's length: open it with streaming=False")
        indices = sample_indices(len(self._data), n, seed)
        sample = object.__new__(type(self))
        sample.__dict__.update(self.__dict__)
        sample._data = self._data.select(indices)
        sample.limit = None
        sample.sample = {"n": len(indices), "seed": seed}
        return sample

    def describe(self) -> str:
        parts = [f"name={self.name!r}", f"split={self.split!r}", f"text_field={self.text_field!r}"]
        if self.streaming:
            parts.append("streaming=True")
        if self.limit is not None:
            parts.append(f"limit={self.limit}")
        if getattr(self, "sample", None) is not None:
            parts.append(f"random_sample={self.sample}")
        for key in ("data_files", "data_dir", "revision"):
            if key in self.load_dataset_kwargs:
                parts.append(f"{key}={self.load_dataset_kwargs[key]!r}")
        if not self.streaming:
            parts.append(f"n_texts={len(self._data)}")
        return f"HuggingFaceDataset({', '.join(parts)})"
