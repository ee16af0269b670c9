"""Built-in controllers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.hooks.hook import Controller, HookType, check_layer_signature
from mi_crow.validation import resolve_synonym

__all__ = ["FunctionController"]

_UNSET: Any = object()


class FunctionController(Controller):
    """Applies a function to a layer's hidden state (``FORWARD``) or main input (``PRE_FORWARD``).

    Call shapes: ``FunctionController(layer_signature, function, hook_type=HookType.FORWARD, hook_id=None)``
    (positional or keyword); ``fn=`` is a keyword synonym of ``function``. The older function-first form
    ``FunctionController(fn, layer_signature=None, hook_type=..., hook_id=None)`` is still accepted: a callable
    first positional argument is the function.

    Args:
        layer_signature: the layer: a dotted or flattened module name, an int (i-th transformer block), or ``None``
            if given at registration.
        function: ``function(x) -> Tensor | None`` with ``x`` the hidden state (``[batch, seq, d]`` for a
            transformer block) or, for ``PRE_FORWARD``, the module's main input; the returned tensor replaces it,
            ``None`` leaves it unchanged.
        hook_type: ``FORWARD`` or ``PRE_FORWARD``.
        hook_id: optional unique id.

    Raises:
        TypeError: the function is missing or not callable, or the arguments do not fit either call shape.
        ValueError: a value is given twice (positionally and by keyword, or as ``function`` and ``fn``).
    """

    def __init__(
        self,
        *args: Any,
        layer_signature: Any = _UNSET,
        function: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
        fn: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
        hook_type: Any = _UNSET,
        hook_id: Any = _UNSET,
    ) -> None:
        if len(args) > 4:
            raise ArgumentTypeError(
                f"FunctionController takes at most 4 positional arguments (layer_signature, function, hook_type, "
                f"hook_id), got {len(args)}"
            )
        # The function-first form: a callable first argument (a layer signature is never callable).
        legacy = bool(args) and callable(args[0])
        names = ("fn", "layer_signature", "hook_type", "hook_id") if legacy else (
            "layer_signature", "function", "hook_type", "hook_id")
        given = dict(zip(names, args))
        keywords = {"layer_signature": layer_signature, "hook_type": hook_type, "hook_id": hook_id}
        for name, value in keywords.items():
            if value is not _UNSET:
                if name in given:
                    raise UserInputError(f"{name} is given both positionally and by keyword, got {name}={value!r}")
                given[name] = value
        function = resolve_synonym("function", given.get("function", function), "fn", given.get("fn", fn))
        if not callable(function):
            shown = function if function is not None else (args[0] if args else None)
            hint = "" if function is not None else " (FunctionController(layer_signature, function) needs a function)"
            raise ArgumentTypeError(f"fn must be callable, got {type(shown).__name__}: {shown!r}{hint}")
        layer = check_layer_signature(given.get("layer_signature"))
        super().__init__(layer, given.get("hook_type", HookType.FORWARD), given.get("hook_id"))
        self.function = function

    @property
    def fn(self) -> Callable[[torch.Tensor], torch.Tensor | None]:
        """The function (same as ``function``)."""
        return self.function

    def modify_activations(self, module: nn.Module, inputs: Any, output: Any) -> torch.Tensor | None:
        """Return ``function`` of the output (``FORWARD``) or of the main input (``PRE_FORWARD``)."""
        if self.hook_type == HookType.PRE_FORWARD:
            return self.function(inputs[0] if isinstance(inputs, tuple) else inputs)
        return self.function(output)
