"""``LayerActivationDetector`` under its original mi-crow module path (defined in :mod:`mi_crow.hooks.detectors`)."""

from mi_crow.hooks.detectors import LayerActivationDetector

__all__ = ["LayerActivationDetector"]
