"""``ModelOutputDetector`` under its original mi-crow module path (defined in :mod:`mi_crow.hooks.detectors`)."""

from mi_crow.hooks.detectors import ModelOutputDetector

__all__ = ["ModelOutputDetector"]
