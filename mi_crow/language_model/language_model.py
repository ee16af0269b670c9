"""The LanguageModel wrapper: a HuggingFace causal LM, its tokenizer, hooks, inference and activation saving."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mi_crow.defaults import preferred_model_dtype
from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.hooks import BatchContext, Hook
from mi_crow.language_model.activations import LanguageModelActivations
from mi_crow.language_model.context import LanguageModelContext
from mi_crow.language_model.inference import InferenceEngine
from mi_crow.language_model.layers import LanguageModelLayers
from mi_crow.validation import check_dtype, resolve_synonym

__all__ = ["LanguageModel", "parse_dtype"]

logger = logging.getLogger(__name__)


def parse_dtype(dtype: torch.dtype | str | None, name: str = "dtype") -> torch.dtype | None:
    """A ``torch.dtype``, its name (``"bfloat16"``, ``"torch.float16"``) or ``None`` (the shared ``check_dtype``)."""
    return check_dtype(dtype, name, allow_none=True)


def _parse_device(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise UserInputError(
            f"device must be a torch.device or a device string like 'cpu' or 'cuda:0', got {device!r}"
        ) from None


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False


class LanguageModel:
    """A causal language model with its tokenizer, layers, hooks, inference and activation saving.

    Args:
        model: a causal LM (``nn.Module``; a HuggingFace ``PreTrainedModel`` such as GPT-2 or Llama). Put in eval
            mode.
        tokenizer: its tokenizer (a HuggingFace tokenizer). A tokenizer without a pad token gets one: the EOS
            token, else the UNK token, else a new ``<pad>`` token (the embeddings are resized then).
        store: where ``activations.save`` writes (a ``mi_crow.store.Store``), or ``None``.
        device: move the model there (``None``: leave it where it is).
        model_id: a name recorded with saved activations (default: the config's ``name_or_path`` or the class name).

    Attributes:
        model, tokenizer, store, device, model_id: as above.
        layers: ``LanguageModelLayers`` (names, resolution, shapes, hooks).
        inference: ``InferenceEngine`` (``execute_inference``, ``generate``).
        activations: ``LanguageModelActivations`` (``save``).
        context: ``LanguageModelContext``, a live view of ``language_model``, ``model``, ``tokenizer``, ``store``,
            ``device`` and ``model_id``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        store: Any = None,
        device: torch.device | str | None = None,
        model_id: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(
                f"model must be a torch.nn.Module (a HuggingFace causal LM), got {type(model).__name__}"
            )
        if not callable(tokenizer) or not hasattr(tokenizer, "convert_ids_to_tokens"):
            raise ArgumentTypeError(f"tokenizer must be a HuggingFace tokenizer, got {type(tokenizer).__name__}")
        if model_id is not None and not isinstance(model_id, str):
            raise ArgumentTypeError(f"model_id must be a str or None, got {type(model_id).__name__}: {model_id!r}")
        parsed_device = _parse_device(device)
        if parsed_device is not None:
            model = model.to(parsed_device)
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self._ensure_pad_token()
        self.device: torch.device = parsed_device or _first_device(model)
        config = getattr(model, "config", None)
        self.model_id: str = model_id or getattr(config, "name_or_path", "") or type(model).__name__
        self._accepts_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        self._controllers_enabled = True
        self.special_token_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.layers = LanguageModelLayers(self)
        self.inference = InferenceEngine(self)
        self.activations = LanguageModelActivations(self)
        self.context = LanguageModelContext(self)

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_huggingface(
        cls,
        name_or_path: str | os.PathLike[str],
        store: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        tokenizer_params: dict[str, Any] | None = None,
        model_params: dict[str, Any] | None = None,
    ) -> LanguageModel:
        """Load a causal LM and its tokenizer with ``transformers``' Auto classes.

        Args:
            name_or_path: a local directory (works offline) or a hub name (needs it cached or a network).
            store: the store for ``activations.save``.
            device: where to put the model (``None``: CPU).
            dtype: model weights dtype (``torch.bfloat16``, ``"float16"``, ...; ``None``: float32; ``"auto"``:
                bfloat16 where the device runs it faster, else float32, see
                :func:`mi_crow.defaults.preferred_model_dtype`).
            tokenizer_params: extra keyword arguments for ``AutoTokenizer.from_pretrained``.
            model_params: extra keyword arguments for ``AutoModelForCausalLM.from_pretrained``.

        Returns:
            The LanguageModel, ``model_id`` set to ``name_or_path``.

        Raises:
            ValueError: the model cannot be loaded; for a hub name that cannot be resolved (e.g. offline), the
                message says so and suggests passing a local directory.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
            raise ArgumentTypeError(f"name_or_path must be a hub name or a local directory, got {name_or_path!r}")
        for arg, value in (("tokenizer_params", tokenizer_params), ("model_params", model_params)):
            if value is not None and not isinstance(value, dict):
                raise ArgumentTypeError(f"{arg} must be a dict or None, got {type(value).__name__}: {value!r}")
        if isinstance(dtype, str) and dtype.strip().lower() == "auto":
            torch_dtype = preferred_model_dtype(device)
        else:
            torch_dtype = parse_dtype(dtype)
        name = str(name_or_path)
        is_local = Path(name).is_dir()
        model_kwargs = dict(model_params or {})
        tokenizer_kwargs = dict(tokenizer_params or {})
        if torch_dtype is not None:
            model_kwargs.setdefault("dtype", torch_dtype)
        offline = _hub_offline()
        if offline:
            # huggingface_hub reads HF_HUB_OFFLINE once at import; honour a later setting without network retries.
            model_kwargs.setdefault("local_files_only", True)
            tokenizer_kwargs.setdefault("local_files_only", True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, **tokenizer_kwargs)
            model = AutoModelForCausalLM.from_pretrained(name, **model_kwargs)
        except (OSError, ValueError) as exc:
            if is_local:
                raise UserInputError(
                    f"name_or_path={name!r} is a local directory but no model could be loaded from it: {exc}"
                ) from exc
            if not isinstance(exc, OSError):
                raise
            where = (
                "the HuggingFace hub is offline (HF_HUB_OFFLINE is set) and it is not in the local cache"
                if offline
                else "it is neither a local directory nor a model the HuggingFace hub could provide"
            )
            raise UserInputError(
                f"name_or_path={name!r} cannot be resolved: {where}. Pass the path of a local directory holding the "
                f"model (config.json, weights, tokenizer files) instead, e.g. one saved with save_pretrained()."
            ) from exc
        return cls(model, tokenizer, store=store, device=device if device is not None else "cpu", model_id=name)

    def _ensure_pad_token(self) -> None:
        tok = self.tokenizer
        if tok.pad_token is None:
            if tok.eos_token is not None:
                tok.pad_token = tok.eos_token
            elif getattr(tok, "unk_token", None) is not None:
                tok.pad_token = tok.unk_token
            else:
                tok.add_special_tokens({"pad_token": "<pad>"})
                embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
                if embeddings is not None and len(tok) > embeddings.num_embeddings:
                    self.model.resize_token_embeddings(len(tok))
            logger.info("tokenizer had no pad token; using %r", tok.pad_token)
        config = getattr(self.model, "config", None)
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tok.pad_token_id
        gen_config = getattr(self.model, "generation_config", None)
        if gen_config is not None and getattr(gen_config, "pad_token_id", None) is None:
            gen_config.pad_token_id = tok.pad_token_id

    # ----------------------------------------------------------------------------------------- tokenizing
    @property
    def max_length(self) -> int | None:
        """The longest input the model takes (from its config), used when no ``max_length`` is given."""
        config = getattr(self.model, "config", None)
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def tokenize(self, texts: list[str], max_length: int | None = None, padding_side: str = "right") -> Any:
        """Tokenize a batch with padding to the longest text and truncation to ``max_length``.

        Returns:
            A ``BatchEncoding`` with ``input_ids`` and ``attention_mask`` ``[batch, seq]`` (CPU tensors).
        """
        limit = max_length if max_length is not None else self.max_length
        return self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=limit is not None,
            max_length=limit,
            padding_side=padding_side,
        )

    # ------------------------------------------------------------------------------------ hook framing
    def _batch_start(self, context: BatchContext) -> None:
        for hook in self.layers.get_hooks():
            hook.on_batch_start(context)

    def _batch_end(self) -> None:
        for hook in self.layers.get_hooks():
            hook.on_batch_end()

    # ------------------------------------------------------------------------------------------ shortcuts
    def forwards(self, texts: list[str], **kwargs: Any) -> Any:
        """Model outputs for ``texts`` (``outputs.logits [n_texts, seq, vocab]`` whatever ``batch_size`` is); see
        ``inference.execute_inference``."""
        return self.inference.execute_inference(texts, **kwargs)[0]

    def generate(self, texts: list[str], max_new_tokens: int = 20, do_sample: bool = False, **kwargs: Any) -> list[str]:
        """Generate continuations with the hooks active; returns only the new text. See ``inference.generate``."""
        return self.inference.generate(texts, max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs)

    # ------------------------------------------------------------------------------------------------ SAE
    def attach_sae(
        self, sae: Hook, layer_signature: str | int | None = None, *, layer: str | int | None = None
    ) -> str:
        """Attach an SAE (a ``Controller`` that is also an ``nn.Module`` with ``n_inputs``) to a layer's output.

        The same as ``lm.layers.register_hook(layer_signature, sae)``: that one registration path checks that the
        SAE's ``n_inputs`` equals the layer's width and moves the SAE to the layer's device.

        Args:
            sae: the SAE.
            layer_signature: the layer (dotted or flattened name, block index); ``layer=`` is a keyword synonym.
                ``None``: the SAE's own ``layer_signature``.

        Returns:
            The hook id.
        """
        if not isinstance(sae, Hook):
            raise ArgumentTypeError(f"sae must be a mi_crow hook (e.g. TopKSae), got {type(sae).__name__}")
        if getattr(sae, "n_inputs", None) is None:
            raise ArgumentTypeError(
                f"sae must have an n_inputs attribute (its input width), got {type(sae).__name__}"
            )
        layer_signature = resolve_synonym("layer_signature", layer_signature, "layer", layer, sae.layer_signature)
        if layer_signature is None:
            raise UserInputError(
                "layer_signature must name the layer to attach the SAE to (the SAE carries none), got None"
            )
        return self.layers.register_hook(layer_signature, sae)

    def detach_sae(self, sae: Hook) -> None:
        """Remove an SAE attached with ``attach_sae`` (or registered with ``layers.register_hook``)."""
        if not isinstance(sae, Hook) or not self.layers.is_registered(sae):
            raise UserInputError(f"sae {getattr(sae, 'id', sae)!r} is not attached to this model")
        self.layers.unregister_hook(sae)

    def __repr__(self) -> str:
        return f"LanguageModel(model_id={self.model_id!r}, blocks={self.layers.num_blocks}, device={self.device})"


def _first_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
