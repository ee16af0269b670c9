"""Hooks: detectors observe a layer, controllers change it; a LanguageModel runs them inside its forward passes."""

from mi_crow.hooks.controllers import FunctionController
from mi_crow.hooks.detectors import LayerActivationDetector, ModelInputDetector, ModelOutputDetector
from mi_crow.hooks.hook import BatchContext, Controller, Detector, Hook, HookError, HookType

__all__ = [
    "BatchContext",
    "Controller",
    "Detector",
    "FunctionController",
    "Hook",
    "HookError",
    "HookType",
    "LayerActivationDetector",
    "ModelInputDetector",
    "ModelOutputDetector",
]
