"""Built-in detectors: capture copies of a layer's activations, the model's inputs, or its outputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mi_crow.errors import UserInputError
from mi_crow.hooks.hook import Detector, HookType
from mi_crow.validation import check_bool, fail_type

__all__ = ["LayerActivationDetector", "ModelInputDetector", "ModelOutputDetector"]

#: The layer signatures that mean "the whole model" for the model-level detectors.
MODEL_INPUT = "input"
MODEL_OUTPUT = "output"


def check_dtype_object(dtype: Any, argument: str = "dtype") -> torch.dtype | None:
    """A ``torch.dtype`` object or ``None`` (names are not accepted: a capture dtype is always spelled as a dtype)."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise fail_type(argument, "a torch.dtype or None", dtype)
    return dtype


# The name this check had before the shared validation layer.
_check_dtype = check_dtype_object


def _copy(tensor: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> torch.Tensor:
    """An independent copy: later in-place edits of the forward's tensors cannot reach it."""
    out = tensor.detach()
    if dtype is None and device is None:
        return out.clone()
    return out.to(dtype=dtype or out.dtype, device=device or out.device, copy=True)


def _model_level(layer_signature: Any, default: str) -> Any:
    """Model-level detectors take ``None``, ``""`` or their keyword (``"input"``/``"output"``) for the whole model."""
    return default if layer_signature in (None, "") else layer_signature


class LayerActivationDetector(Detector):
    """Captures a copy of one layer's output (or, as ``PRE_FORWARD``, of its main input) on every call.

    Args:
        layer_signature: the layer: a dotted or flattened module name, or an int (i-th transformer block).
        hook_type: ``FORWARD`` (capture the output hidden state) or ``PRE_FORWARD`` (capture the main input).
        hook_id: optional unique id.
        dtype: store the copy in this dtype (``None``: the activation's dtype).
        device: store the copy on this device (``None``: where the activation is), e.g. ``"cpu"``.
        accumulate: also keep every capture in ``self.history`` (e.g. one entry per generation step). Off by
            default so that memory stays bounded by one call.

    Attributes:
        activations: the last capture (``get_captured()``, ``tensor_metadata["activations"]``), ``[batch, seq, d]``
            for a transformer block, or ``None``.
        history: every capture since the last ``clear()`` when ``accumulate`` is on.
    """

    captured_key = "activations"

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
            raise UserInputError(
                "layer_signature must name a layer (a dotted module name or an int), got None"
            )
        super().__init__(layer_signature, hook_type, hook_id)
        self.dtype = check_dtype_object(dtype)
        self.device = device
        self.accumulate = bool(accumulate)
        self.history: list[torch.Tensor] = []

    @property
    def activations(self) -> torch.Tensor | None:
        """The last capture (``tensor_metadata["activations"]``)."""
        return self.tensor_metadata.get("activations")

    @activations.setter
    def activations(self, value: torch.Tensor | None) -> None:
        if value is None:
            self.tensor_metadata.pop("activations", None)
        else:
            self.tensor_metadata["activations"] = value

    def process_activations(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Copy the output (``FORWARD``) or the main input (``PRE_FORWARD``) of the module."""
        tensor = inputs[0] if self.hook_type == HookType.PRE_FORWARD and inputs else output
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"expected the layer to produce a tensor, got {type(tensor).__name__}")
        self.activations = _copy(tensor, self.dtype, self.device)
        self.metadata["activations_shape"] = tuple(self.activations.shape)
        if self.accumulate:
            self.history.append(self.activations)

    def clear_captured(self) -> None:
        """Forget all captures (the last one and the history)."""
        super().clear_captured()
        self.history = []

    def clear(self) -> None:
        """Forget all captures (same as ``clear_captured``)."""
        self.clear_captured()


class ModelInputDetector(Detector):
    """Captures the ``input_ids`` and ``attention_mask`` the model is called with.

    Registered before the whole model (``PRE_FORWARD`` on the root module). When the model is called without an
    attention mask, the mask of the LanguageModel's batch context is used if its shape matches, else an all-ones
    mask.

    Args:
        layer_signature: ``"input"`` (or ``None``): the whole model.
        hook_id: optional unique id.
        save_input_ids: keep ``tensor_metadata["input_ids"]`` (also under ``"inputs"``).
        save_attention_mask: keep ``tensor_metadata["attention_mask"]``.
        save_special_token_mask: keep ``tensor_metadata["special_token_mask"]`` (bool ``[batch, seq]``, True at
            special tokens).
        special_token_ids: the ids that count as special (``None``: the LanguageModel's special tokens, which
            include its pad token).

    Attributes:
        input_ids: ``[batch, seq]`` int64 of the last call (``get_captured()``, ``get_captured_input_ids()``).
        attention_mask: ``[batch, seq]`` of the last call.
    """

    captured_key = "input_ids"

    def __init__(
        self,
        layer_signature: str | None = MODEL_INPUT,
        hook_id: str | None = None,
        save_input_ids: bool = True,
        save_attention_mask: bool = True,
        save_special_token_mask: bool = False,
        special_token_ids: Any = None,
    ) -> None:
        super().__init__(_model_level(layer_signature, MODEL_INPUT), HookType.PRE_FORWARD, hook_id)
        self.save_input_ids = check_bool(save_input_ids, "save_input_ids")
        self.save_attention_mask = check_bool(save_attention_mask, "save_attention_mask")
        self.save_special_token_mask = check_bool(save_special_token_mask, "save_special_token_mask")
        if special_token_ids is not None:
            ids = torch.as_tensor(list(special_token_ids) if not isinstance(special_token_ids, torch.Tensor)
                                  else special_token_ids)
            if ids.dim() != 1 or ids.is_floating_point():
                raise fail_type("special_token_ids", "a list of int token ids or None", special_token_ids)
            special_token_ids = ids.long()
        self.special_token_ids: torch.Tensor | None = special_token_ids

    @property
    def input_ids(self) -> torch.Tensor | None:
        """The ``input_ids`` of the last call."""
        return self.tensor_metadata.get("input_ids")

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """The ``attention_mask`` of the last call."""
        return self.tensor_metadata.get("attention_mask")

    def get_captured_input_ids(self) -> torch.Tensor | None:
        """The ``input_ids`` of the last call, ``[batch, seq]``."""
        return self.input_ids

    def _special_ids(self) -> torch.Tensor:
        if self.special_token_ids is not None:
            return self.special_token_ids
        lm = self.context.language_model if self.context is not None else None
        if lm is None:
            raise UserInputError(
                "save_special_token_mask=True needs special_token_ids when the detector runs outside a "
                "LanguageModel forward"
            )
        return lm.special_token_ids

    def process_activations(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Copy the ids, the mask and the special-token mask of this model call."""
        kwargs = self.call_kwargs or {}
        ids = kwargs.get("input_ids", inputs[0] if inputs else None)
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"expected the model to be called with input_ids as a tensor, got {type(ids).__name__}")
        ids = ids.detach().clone()
        self.tensor_metadata.clear()
        if self.save_input_ids:
            self.tensor_metadata["input_ids"] = ids
            self.tensor_metadata["inputs"] = ids
        if self.save_attention_mask:
            mask = kwargs.get("attention_mask")
            if not isinstance(mask, torch.Tensor):
                ctx_mask = self.context.attention_mask if self.context is not None else None
                if isinstance(ctx_mask, torch.Tensor) and ctx_mask.shape == ids.shape:
                    mask = ctx_mask
                else:
                    mask = torch.ones_like(ids)
            # During cached generation the model gets the mask of the whole sequence so far; keep the part that
            # lines up with the ids of this call.
            self.tensor_metadata["attention_mask"] = mask.detach()[..., -ids.shape[-1] :].clone()
        if self.save_special_token_mask:
            self.tensor_metadata["special_token_mask"] = torch.isin(ids, self._special_ids().to(ids.device))
        self.metadata["input_shape"] = tuple(ids.shape)


class ModelOutputDetector(Detector):
    """Captures the logits (and optionally the last hidden state) of every model call.

    Registered after the whole model (``FORWARD`` on the root module).

    Args:
        layer_signature: ``"output"`` (or ``None``): the whole model.
        hook_id: optional unique id.
        save_output_logits: keep ``tensor_metadata["output_logits"]`` (also under ``"outputs"``).
        save_output_hidden_state: keep ``tensor_metadata["output_hidden_state"]``, the model's last hidden state
            ``[batch, seq, d]`` (the input of the LM head). The LanguageModel then asks the model for its hidden
            states on every forward it runs.
        dtype: store the copies in this dtype (``None``: as produced).
        device: store them on this device (``None``: where they are).

    Attributes:
        logits: ``[batch, seq, vocab]`` of the last call (``get_captured()``, ``get_captured_output_logits()``).
    """

    captured_key = "output_logits"

    def __init__(
        self,
        layer_signature: str | None = MODEL_OUTPUT,
        hook_id: str | None = None,
        save_output_logits: bool = True,
        save_output_hidden_state: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(_model_level(layer_signature, MODEL_OUTPUT), HookType.FORWARD, hook_id)
        self.save_output_logits = check_bool(save_output_logits, "save_output_logits")
        self.save_output_hidden_state = check_bool(save_output_hidden_state, "save_output_hidden_state")
        self.dtype = check_dtype_object(dtype)
        self.device = device

    @property
    def wants_hidden_states(self) -> bool:
        """Whether the forward pass must return hidden states for this detector."""
        return self.enabled and self.save_output_hidden_state

    @property
    def logits(self) -> torch.Tensor | None:
        """The logits of the last call."""
        return self.tensor_metadata.get("output_logits")

    def get_captured_output_logits(self) -> torch.Tensor | None:
        """The logits of the last call, ``[batch, seq, vocab]``."""
        return self.logits

    def get_captured_output_hidden_state(self) -> torch.Tensor | None:
        """The last hidden state of the last call, ``[batch, seq, d]``."""
        return self.tensor_metadata.get("output_hidden_state")

    def process_activations(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Copy the logits (the main tensor of the model output) and, if asked, the last hidden state."""
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"expected the model output to hold logits, got {type(output).__name__}")
        self.tensor_metadata.clear()
        if self.save_output_logits:
            logits = _copy(output, self.dtype, self.device)
            self.tensor_metadata["output_logits"] = logits
            self.tensor_metadata["outputs"] = logits
            self.metadata["output_logits_shape"] = tuple(logits.shape)
        if self.save_output_hidden_state:
            hidden = _last_hidden_state(self.call_output)
            if hidden is None:
                raise TypeError(
                    "save_output_hidden_state=True but the model output has no hidden states: run the model through "
                    "the LanguageModel (which asks for them) or pass output_hidden_states=True"
                )
            self.tensor_metadata["output_hidden_state"] = _copy(hidden, self.dtype, self.device)


def _last_hidden_state(output: Any) -> torch.Tensor | None:
    """The last hidden state of a HF model output: ``hidden_states[-1]`` or ``last_hidden_state``."""
    hidden_states = getattr(output, "hidden_states", None)
    if isinstance(hidden_states, (tuple, list)) and hidden_states and isinstance(hidden_states[-1], torch.Tensor):
        return hidden_states[-1]
    last = getattr(output, "last_hidden_state", None)
    return last if isinstance(last, torch.Tensor) else None
