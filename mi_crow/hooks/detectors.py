"""Built-in detectors: capture copies of a layer's activations, the model's inputs, or its logits."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mi_crow.hooks.hook import Detector, HookType

__all__ = ["LayerActivationDetector", "ModelInputDetector", "ModelOutputDetector"]


def _check_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}: {dtype!r}")
    return dtype


def _copy(tensor: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> torch.Tensor:
    """An independent copy: later in-place edits of the forward's tensors cannot reach it."""
    out = tensor.detach()
    if dtype is None and device is None:
        return out.clone()
    return out.to(dtype=dtype or out.dtype, device=device or out.device, copy=True)


class LayerActivationDetector(Detector):
    """Captures a copy of one layer's output (or, as ``PRE_FORWARD``, of its main input) on every call.

    Args:
        layer_signature: the layer: a dotted module name or an int (i-th transformer block).
        hook_type: ``FORWARD`` (capture the output hidden state) or ``PRE_FORWARD`` (capture the input).
        hook_id: optional unique id.
        dtype: store the copy in this dtype (``None``: the activation's dtype).
        device: store the copy on this device (``None``: where the activation is), e.g. ``"cpu"``.
        accumulate: also keep every capture in ``self.history`` (e.g. one entry per generation step). Off by
            default so that memory stays bounded by one call.

    Attributes:
        activations: the last capture, ``[batch, seq, d]`` for a transformer block, or ``None``.
        history: every capture since the last ``clear()`` when ``accumulate`` is on.
    """

    def __init__(
        self,
        layer_signature: str | int,
        hook_type: HookType | str = HookType.FORWARD,
        hook_id: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        accumulate: bool = False,
    ) -> None:
        if layer_signature is None:
            raise ValueError("layer_signature must name a layer (a dotted module name or an int), got None")
        super().__init__(layer_signature, hook_type, hook_id)
        self.dtype = _check_dtype(dtype)
        self.device = device
        self.accumulate = bool(accumulate)
        self.activations: torch.Tensor | None = None
        self.history: list[torch.Tensor] = []

    def process_activations(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Copy the output (``FORWARD``) or the main input (``PRE_FORWARD``) of the module."""
        tensor = inputs if self.hook_type == HookType.PRE_FORWARD else output
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"expected the layer to produce a tensor, got {type(tensor).__name__}")
        self.activations = _copy(tensor, self.dtype, self.device)
        if self.accumulate:
            self.history.append(self.activations)

    def clear(self) -> None:
        """Forget all captures."""
        self.activations = None
        self.history = []


class ModelInputDetector(Detector):
    """Captures the ``input_ids`` and ``attention_mask`` the model is called with.

    Registered before the whole model (``PRE_FORWARD`` on the root module, ``layer_signature=None``). When the
    model is called without an attention mask, the mask of the LanguageModel's batch context is used if its shape
    matches, else an all-ones mask.

    Attributes:
        input_ids: ``[batch, seq]`` int64, last call.
        attention_mask: ``[batch, seq]``, last call.
    """

    def __init__(self, hook_id: str | None = None) -> None:
        super().__init__(None, HookType.PRE_FORWARD, hook_id)
        self.input_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None

    def process_activations(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Copy the ids and the mask of this model call."""
        kwargs = self.call_kwargs or {}
        ids = kwargs.get("input_ids", inputs)
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"expected the model to be called with input_ids as a tensor, got {type(ids).__name__}")
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor):
            ctx_mask = self.context.attention_mask if self.context is not None else None
            if isinstance(ctx_mask, torch.Tensor) and ctx_mask.shape == ids.shape:
                mask = ctx_mask
            else:
                mask = torch.ones_like(ids)
        self.input_ids = ids.detach().clone()
        # During cached generation the model gets the mask of the whole sequence so far; keep the part that lines
        # up with the ids of this call.
        self.attention_mask = mask.detach()[..., -ids.shape[-1] :].clone()


class ModelOutputDetector(Detector):
    """Captures the logits of every model call (``FORWARD`` on the root module, ``layer_signature=None``).

    Args:
        hook_id: optional unique id.
        dtype: store the logits in this dtype (``None``: as produced).
        device: store them on this device (``None``: where they are).

    Attributes:
        logits: ``[batch, seq, vocab]`` of the last call.
    """

    def __init__(
        self, hook_id: str | None = None, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        super().__init__(None, HookType.FORWARD, hook_id)
        self.dtype = _check_dtype(dtype)
        self.device = device
        self.logits: torch.Tensor | None = None

    def process_activations(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Copy the logits (the main tensor of the model output)."""
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"expected the model output to hold logits, got {type(output).__name__}")
        self.logits = _copy(output, self.dtype, self.device)
