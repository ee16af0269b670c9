"""``FunctionController`` under its original mi-crow module path (defined in :mod:`mi_crow.hooks.controllers`)."""

from mi_crow.hooks.controllers import FunctionController

__all__ = ["FunctionController"]
