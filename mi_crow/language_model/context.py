"""``lm.context``: one object that hands a LanguageModel's parts to code that only has the context."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from mi_crow.language_model.language_model import LanguageModel

__all__ = ["LanguageModelContext"]


class LanguageModelContext:
    """A live view of a LanguageModel's parts (``lm.context``): it always reflects the model's current attributes.

    Attributes:
        language_model: the LanguageModel.
        model: the wrapped ``nn.Module``.
        tokenizer: its tokenizer.
        store: the store activations are saved to (or ``None``).
        device: the model's device.
        model_id: the model's name.
    """

    def __init__(self, language_model: LanguageModel) -> None:
        self._lm = language_model

    @property
    def language_model(self) -> LanguageModel:
        """The LanguageModel this context belongs to."""
        return self._lm

    @property
    def model(self) -> nn.Module:
        """The wrapped model."""
        return self._lm.model

    @property
    def tokenizer(self) -> Any:
        """The tokenizer."""
        return self._lm.tokenizer

    @property
    def store(self) -> Any:
        """The store (``None`` when the model has none)."""
        return self._lm.store

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self._lm.device

    @property
    def model_id(self) -> str:
        """The model's name, recorded with saved activations."""
        return self._lm.model_id

    def __repr__(self) -> str:
        return f"LanguageModelContext(model_id={self.model_id!r}, device={self.device}, store={self.store!r})"
