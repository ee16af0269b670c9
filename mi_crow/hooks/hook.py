"""Hook base classes: the objects a LanguageModel calls around and inside every forward pass it runs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

__all__ = ["BatchContext", "Controller", "Detector", "Hook", "HookError", "HookType"]


class HookType(str, Enum):
    """Where a hook runs: after a module's forward (``FORWARD``) or before it (``PRE_FORWARD``)."""

    FORWARD = "forward"
    PRE_FORWARD = "pre_forward"


@dataclass
class BatchContext:
    """What the LanguageModel knows about the batch a forward pass is running on.

    Set on every registered hook (``on_batch_start``) before each model forward the LanguageModel runs.

    Attributes:
        texts: the batch's texts, ``len(texts) == batch``.
        input_ids: ``[batch, seq]`` token ids fed to the model in this forward.
        attention_mask: ``[batch, seq]``, 1 for real tokens, 0 for padding.
        special_tokens_mask: ``[batch, seq]`` bool, True for BOS/EOS/pad and other special ids.
        tokenizer: the tokenizer, to turn ids into token strings (``convert_ids_to_tokens``).
        generation_step: ``None`` outside ``generate``. During ``generate``, 0 for the forward over the prompt and
            ``n`` for the forward that produces the ``n+1``-th new token; from step 1 on (with a KV cache),
            ``input_ids``/``attention_mask`` cover only the tokens fed in that step, so they always line up with
            the hidden states the hooks see.
    """

    texts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    special_tokens_mask: torch.Tensor
    tokenizer: Any
    generation_step: int | None = None


class HookError(RuntimeError):
    """An exception raised inside a hook, re-raised with the hook and the layer named.

    The original exception is chained (``__cause__``) and kept in ``original``.
    """

    def __init__(self, hook: Hook, layer: str, original: BaseException) -> None:
        self.hook_id = hook.id
        self.hook_class = type(hook).__name__
        self.layer = layer
        self.original = original
        super().__init__(
            f"hook {self.hook_class}(id={self.hook_id!r}) on layer {layer!r} raised "
            f"{type(original).__name__}: {original}"
        )


def _check_hook_type(hook_type: HookType | str) -> HookType:
    try:
        return HookType(hook_type)
    except ValueError:
        valid = [t.value for t in HookType]
        raise ValueError(f"hook_type must be one of {valid}, got {hook_type!r}") from None


class Hook:
    """Base of every hook: an id, a layer, a type and an on/off switch.

    ``__init__`` deliberately never calls ``super().__init__()``: a subclass that is also an ``nn.Module`` (such as
    an SAE) calls ``nn.Module.__init__(self)`` first and then ``Hook.__init__(self, ...)``. Hooks never define
    ``__call__`` either, because ``nn.Module`` owns it.

    Args:
        layer_signature: the layer to attach to: a dotted module name, an int (i-th transformer block), or ``None``
            (the whole model for the model-level detectors, or "given at registration").
        hook_type: ``HookType.FORWARD`` (after the module runs) or ``HookType.PRE_FORWARD`` (before).
        hook_id: a unique id; a random one is made when omitted.
    """

    def __init__(
        self,
        layer_signature: str | int | None = None,
        hook_type: HookType | str = HookType.FORWARD,
        hook_id: str | None = None,
    ) -> None:
        if layer_signature is not None and not isinstance(layer_signature, (str, int)):
            raise TypeError(
                f"layer_signature must be a str, an int or None, got {type(layer_signature).__name__}: "
                f"{layer_signature!r}"
            )
        if hook_id is not None and (not isinstance(hook_id, str) or not hook_id):
            raise ValueError(f"hook_id must be a non-empty str or None, got {hook_id!r}")
        self.layer_signature: str | int | None = layer_signature
        self.hook_type: HookType = _check_hook_type(hook_type)
        self.id: str = hook_id if hook_id is not None else f"{type(self).__name__}-{uuid.uuid4().hex[:12]}"
        self.enabled: bool = True
        self.context: BatchContext | None = None
        # Keyword arguments of the current call, set by the LanguageModel for PRE_FORWARD hooks (the model-level
        # input detector reads the attention mask from here).
        self.call_kwargs: dict[str, Any] | None = None

    def enable(self) -> None:
        """Turn the hook on (hooks start enabled)."""
        self.enabled = True

    def disable(self) -> None:
        """Turn the hook off: it stays registered but is skipped."""
        self.enabled = False

    def on_batch_start(self, context: BatchContext) -> None:
        """Called before each forward pass the LanguageModel runs; stores ``context`` in ``self.context``."""
        self.context = context

    def on_batch_end(self) -> None:
        """Called after each forward pass the LanguageModel runs (also when it raised)."""
        self.context = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(id={self.id!r}, layer={self.layer_signature!r}, "
            f"type={self.hook_type.value}, enabled={self.enabled})"
        )


class Detector(Hook):
    """A hook that observes and never changes the forward pass.

    Subclasses implement ``process_activations``; whatever they keep must be a copy (``detach().clone()``), never a
    view that a later controller could alter.
    """

    def process_activations(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Observe one call of the module.

        Args:
            module: the hooked module.
            inputs: for ``PRE_FORWARD`` hooks the first positional tensor (or the main tensor keyword argument);
                for ``FORWARD`` hooks the module's positional inputs as a tuple.
            output: for ``FORWARD`` hooks the hidden-state tensor (the first element of a tuple output, the logits
                of a model output); ``None`` for ``PRE_FORWARD`` hooks.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement process_activations")


class Controller(Hook):
    """A hook that may replace a module's output (``FORWARD``) or its main input (``PRE_FORWARD``)."""

    def modify_activations(self, module: nn.Module, inputs: Any, output: Any) -> torch.Tensor | None:
        """Return a replacement tensor, or ``None`` to leave the activations unchanged.

        Args:
            module: the hooked module.
            inputs: as in ``Detector.process_activations``.
            output: as in ``Detector.process_activations``.

        Returns:
            For ``FORWARD``: a tensor with the shape of ``output`` (it replaces the hidden state; the rest of a tuple
            output is passed through). For ``PRE_FORWARD``: a tensor replacing ``inputs``. Or ``None``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement modify_activations")
