"""Built-in controllers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mi_crow.hooks.hook import Controller, HookType

__all__ = ["FunctionController"]


class FunctionController(Controller):
    """Applies a function to a layer's hidden state (``FORWARD``) or main input (``PRE_FORWARD``).

    Args:
        fn: ``fn(x) -> Tensor | None`` with ``x`` the hidden state (``[batch, seq, d]`` for a transformer block);
            the returned tensor replaces it, ``None`` leaves it unchanged.
        layer_signature: the layer: a dotted module name, an int (i-th transformer block), or ``None`` if given at
            registration.
        hook_type: ``FORWARD`` or ``PRE_FORWARD``.
        hook_id: optional unique id.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor | None],
        layer_signature: str | int | None = None,
        hook_type: HookType | str = HookType.FORWARD,
        hook_id: str | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}: {fn!r}")
        super().__init__(layer_signature, hook_type, hook_id)
        self.fn = fn

    def modify_activations(self, module: nn.Module, inputs: Any, output: Any) -> torch.Tensor | None:
        """Return ``fn`` of the output (``FORWARD``) or of the main input (``PRE_FORWARD``)."""
        x = inputs if self.hook_type == HookType.PRE_FORWARD else output
        return self.fn(x)
