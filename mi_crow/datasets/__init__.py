"""Text datasets that feed activation saving and inference.

``TextDataset`` holds texts in memory (from a list or local ``.txt``/``.jsonl``/``.csv`` files);
``HuggingFaceDataset`` reads a column of a ``datasets`` dataset (Hub, local data files, ``save_to_disk`` folders).
``ClassificationDataset`` pairs texts with labels. All iterate over strings and in batches (``iter_batches``) and
describe themselves for run metadata.
"""

from mi_crow.datasets.base import BaseDataset
from mi_crow.datasets.classification import ClassificationDataset
from mi_crow.datasets.huggingface import DatasetUnavailableOfflineError, HuggingFaceDataset
from mi_crow.datasets.text import TextDataset

__all__ = [
    "BaseDataset",
    "ClassificationDataset",
    "DatasetUnavailableOfflineError",
    "HuggingFaceDataset",
    "TextDataset",
]
