"""The model wrapper: ``LanguageModel`` with its layers, hooks, inference, generation and activation saving."""

from mi_crow.language_model.activations import LanguageModelActivations
from mi_crow.language_model.inference import InferenceEngine
from mi_crow.language_model.language_model import LanguageModel
from mi_crow.language_model.layers import LanguageModelLayers

__all__ = ["InferenceEngine", "LanguageModel", "LanguageModelActivations", "LanguageModelLayers"]
