"""``Detector`` under its original mi-crow module path (defined in :mod:`mi_crow.hooks.hook`)."""

from mi_crow.hooks.hook import Detector

__all__ = ["Detector"]
