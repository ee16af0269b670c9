"""Hook base classes: the objects a LanguageModel calls around and inside every forward pass it runs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from mi_crow.errors import ArgumentTypeError
from mi_crow.validation import fail

__all__ = ["BatchContext", "Controller", "Detector", "Hook", "HookError", "HookType"]


class HookType(str, Enum):
    """Where a hook runs: after a module's forward (``FORWARD``) or before it (``PRE_FORWARD``).

    Also accepted as strings: the values ``"forward"`` / ``"pre_forward"`` and the member names ``"FORWARD"`` /
    ``"PRE_FORWARD"``.
    """

    FORWARD = "forward"
    PRE_FORWARD = "pre_forward"


def parse_hook_type(hook_type: HookType | str, argument: str = "hook_type") -> HookType:
    """A ``HookType`` from a member, its value or its name (case-insensitive)."""
    if isinstance(hook_type, HookType):
        return hook_type
    if isinstance(hook_type, str):
        try:
            return HookType(hook_type.strip().lower())
        except ValueError:
            pass
    valid = [t.value for t in HookType]
    raise fail(argument, f"one of {valid} (or a HookType)", hook_type)


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
        language_model: the ``LanguageModel`` running the forward (``None`` when a context is built by hand), so a
            hook reaches the model, its store and its layers as ``self.context.language_model``.
    """

    texts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    special_tokens_mask: torch.Tensor
    tokenizer: Any
    generation_step: int | None = None
    language_model: Any = None


class HookError(RuntimeError):
    """An exception raised inside a hook, re-raised with the hook and the layer named.

    Attributes:
        hook_id: the hook's id.
        layer_signature: the layer (dotted name) the hook runs on; ``layer`` is the same value.
        original_error: the exception the hook raised; also chained as ``__cause__`` and kept as ``original``.
        hook_class: the hook's class name.
    """

    def __init__(self, hook: Hook, layer: str, original: BaseException) -> None:
        self.hook_id = hook.id
        self.hook_class = type(hook).__name__
        self.layer_signature = layer
        self.original_error = original
        super().__init__(
            f"hook {self.hook_class}(id={self.hook_id!r}) on layer {layer!r} raised "
            f"{type(original).__name__}: {original}"
        )

    @property
    def layer(self) -> str:
        """The layer the hook runs on (same as ``layer_signature``)."""
        return self.layer_signature

    @property
    def original(self) -> BaseException:
        """The exception the hook raised (same as ``original_error``)."""
        return self.original_error


def check_layer_signature(value: Any, argument: str = "layer_signature") -> str | int | None:
    """A layer given by dotted or flattened name, block index, or ``None``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise ArgumentTypeError(
            f"{argument} must be a str, an int or None, got {type(value).__name__}: {value!r}"
        )
    return value


class Hook:
    """Base of every hook: an id, a layer, a type and an on/off switch.

    ``__init__`` deliberately never calls ``super().__init__()``: a subclass that is also an ``nn.Module`` (such as
    an SAE) calls ``nn.Module.__init__(self)`` first and then ``Hook.__init__(self, ...)``. Hooks never define
    ``__call__`` either, because ``nn.Module`` owns it.

    A direct subclass (neither ``Detector`` nor ``Controller``) overrides :meth:`_hook_fn` and runs as a plain torch
    callback: it sees the module's raw positional inputs and output and may return a replacement.

    Args:
        layer_signature: the layer to attach to: a dotted module name, a flattened name, an int (i-th transformer
            block), or ``None`` (the whole model for the model-level detectors, or "given at registration").
        hook_type: ``HookType.FORWARD`` (after the module runs) or ``HookType.PRE_FORWARD`` (before).
        hook_id: a unique id; a random one is made when omitted.

    Attributes:
        id: the hook id (``register_hook`` returns it).
        layer_signature: the layer; set to the resolved dotted name when the hook is registered.
        hook_type: a ``HookType``.
        enabled: whether it runs (see ``enable`` / ``disable`` / ``is_enabled``).
        context: the ``BatchContext`` of the forward pass in progress, ``None`` between forward passes.
    """

    def __init__(
        self,
        layer_signature: str | int | None = None,
        hook_type: HookType | str = HookType.FORWARD,
        hook_id: str | None = None,
    ) -> None:
        check_layer_signature(layer_signature)
        if hook_id is not None and (not isinstance(hook_id, str) or not hook_id):
            raise fail("hook_id", "a non-empty str or None", hook_id)
        self.layer_signature: str | int | None = layer_signature
        self.hook_type: HookType = parse_hook_type(hook_type)
        self.id: str = hook_id if hook_id is not None else f"{type(self).__name__}-{uuid.uuid4().hex[:12]}"
        self.enabled: bool = True
        self.context: BatchContext | None = None
        # Keyword arguments of the current call, set by the LanguageModel for PRE_FORWARD hooks (the model-level
        # input detector reads the attention mask from here).
        self.call_kwargs: dict[str, Any] | None = None
        # The module's whole output during a FORWARD call (a HF ModelOutput for the model-level output detector,
        # which needs more than the main tensor); None otherwise.
        self.call_output: Any = None

    def enable(self) -> None:
        """Turn the hook on (hooks start enabled)."""
        self.enabled = True

    def disable(self) -> None:
        """Turn the hook off: it stays registered but is skipped."""
        self.enabled = False

    def is_enabled(self) -> bool:
        """Whether the hook runs (``enable()`` / ``disable()`` switch it)."""
        return self.enabled

    def on_batch_start(self, context: BatchContext) -> None:
        """Called before each forward pass the LanguageModel runs; stores ``context`` in ``self.context``."""
        self.context = context

    def on_batch_end(self) -> None:
        """Called after each forward pass the LanguageModel runs (also when it raised)."""
        self.context = None

    def _hook_fn(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        """The plain-callback form of a hook, for direct ``Hook`` subclasses that override it.

        Args:
            module: the hooked module.
            inputs: the module's positional inputs (a tuple).
            output: the module's output exactly as it returned it (``FORWARD``), ``None`` for ``PRE_FORWARD``.

        Returns:
            ``None`` to leave the call unchanged, or a replacement: for ``FORWARD`` the new output (a tensor
            replaces the main tensor of a tuple or ``ModelOutput``), for ``PRE_FORWARD`` a tuple of new positional
            inputs or a tensor for the first one.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must override _hook_fn (or derive from Detector / Controller)"
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(id={self.id!r}, layer={self.layer_signature!r}, "
            f"type={self.hook_type.value}, enabled={self.enabled})"
        )


def overrides_hook_fn(hook: Hook) -> bool:
    """Whether ``hook``'s class replaces ``Hook._hook_fn`` (then it runs as a plain callback)."""
    return type(hook)._hook_fn is not Hook._hook_fn


class Detector(Hook):
    """A hook that observes and never changes the forward pass.

    Subclasses implement ``process_activations`` and keep what they capture in ``tensor_metadata`` (tensors) and
    ``metadata`` (scalars and small objects). Whatever they keep must be a copy (``detach().clone()``), never a view
    that a later controller could alter.

    Attributes:
        metadata: a dict of scalars and small objects the detector fills.
        tensor_metadata: a dict of tensors the detector fills; its ``captured_key`` entry is the main capture.
    """

    #: The ``tensor_metadata`` entry ``get_captured()`` returns.
    captured_key: str = "activations"

    def __init__(
        self,
        layer_signature: str | int | None = None,
        hook_type: HookType | str = HookType.FORWARD,
        hook_id: str | None = None,
    ) -> None:
        Hook.__init__(self, layer_signature, hook_type, hook_id)
        self.metadata: dict[str, Any] = {}
        self.tensor_metadata: dict[str, torch.Tensor] = {}

    def process_activations(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Observe one call of the module.

        Args:
            module: the hooked module.
            inputs: the module's positional inputs as a tuple. For ``PRE_FORWARD`` hooks on a module called with
                its main tensor as a keyword (``input_ids=...``, ``hidden_states=...``), a 1-tuple holding it.
            output: for ``FORWARD`` hooks the hidden-state tensor (the first element of a tuple output, the logits
                of a model output); ``None`` for ``PRE_FORWARD`` hooks.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement process_activations")

    def get_captured(self) -> torch.Tensor | None:
        """The main capture of the last call (``tensor_metadata[captured_key]``), or ``None``."""
        return self.tensor_metadata.get(self.captured_key)

    def clear_captured(self) -> None:
        """Drop every captured tensor (``tensor_metadata`` is emptied; ``metadata`` is kept)."""
        self.tensor_metadata.clear()


class Controller(Hook):
    """A hook that may replace a module's output (``FORWARD``) or its inputs (``PRE_FORWARD``)."""

    def modify_activations(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        """Return a replacement, or ``None`` to leave the activations unchanged.

        Args:
            module: the hooked module.
            inputs: the module's positional inputs as a tuple (see ``Detector.process_activations``).
            output: for ``FORWARD`` hooks the hidden-state tensor; ``None`` for ``PRE_FORWARD`` hooks.

        Returns:
            For ``FORWARD``: a tensor with the shape of ``output`` (it replaces the hidden state; the rest of a tuple
            output is passed through). For ``PRE_FORWARD``: a tuple that replaces the positional inputs, or a tensor
            that replaces the first one. Or ``None``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement modify_activations")

