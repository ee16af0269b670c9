"""The built-in hooks under the module paths of the original mi-crow layout (one module per class).

Each module re-exports the class from :mod:`mi_crow.hooks`; there is one implementation.
"""

from mi_crow.hooks.implementations.function_controller import FunctionController
from mi_crow.hooks.implementations.layer_activation_detector import LayerActivationDetector
from mi_crow.hooks.implementations.model_input_detector import ModelInputDetector
from mi_crow.hooks.implementations.model_output_detector import ModelOutputDetector

__all__ = ["FunctionController", "LayerActivationDetector", "ModelInputDetector", "ModelOutputDetector"]
