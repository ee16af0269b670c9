"""Layer naming, resolution, shapes, and hook registration for a LanguageModel."""

from __future__ import annotations

import difflib
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.hooks import Controller, Detector, Hook, HookType
from mi_crow.hooks.dispatch import make_torch_hook, unwrap_main_tensor
from mi_crow.hooks.hook import parse_hook_type
from mi_crow.validation import resolve_synonym

if TYPE_CHECKING:
    from mi_crow.language_model.language_model import LanguageModel

__all__ = ["LanguageModelLayers", "ROOT"]

logger = logging.getLogger(__name__)

ROOT = ""
"""The name of the whole model (the root of ``named_modules()``); model-level hooks use ``layer_signature=None``."""

#: Layer signatures that mean the whole model for the model-level detectors (``ModelInputDetector`` and
#: ``ModelOutputDetector`` carry them as their default ``layer_signature``).
MODEL_LEVEL_SIGNATURES = ("input", "output")

_PROBE_BATCH = 2
_PROBE_SEQ = 5


@dataclass
class _Registration:
    hook: Hook
    layer: str
    handle: RemovableHandle


class LanguageModelLayers:
    """The layers of a LanguageModel: names, resolution, shapes, and hooks.

    Layer names are the dotted paths of ``model.named_modules()`` (e.g. ``transformer.h.5``, ``model.layers.3.mlp``).
    The flattened names of the original mi-crow layout resolve to the same modules: the lower-cased model class name
    and the path segments joined with ``_`` (``gpt2lmheadmodel_transformer_h_0_mlp_c_fc``). An int ``i`` means the
    ``i``-th transformer block (negative ints count from the end).

    Args:
        lm: the owning LanguageModel.
    """

    def __init__(self, lm: LanguageModel) -> None:
        self._lm = lm
        self._modules: dict[str, nn.Module] = dict(lm.model.named_modules())
        self._prefix = type(lm.model).__name__.lower()
        # Flattened name -> dotted name. Two dotted names can flatten alike ("a.b_c" and "a_b.c"); such a flattened
        # name maps to None and is refused as ambiguous.
        self._flat: dict[str, str | None] = {}
        for name in self._modules:
            if name != ROOT:
                flat = self.flattened_name(name)
                self._flat[flat] = None if flat in self._flat else name
        self._blocks_name: str | None = self._find_blocks()
        self._registry: dict[str, _Registration] = {}
        self._shapes: dict[str, tuple[int, ...]] | None = None
        # While True (shape probing), registered hooks are skipped.
        self._suspended = False

    # ----------------------------------------------------------------------------------------------- names
    def _find_blocks(self) -> str | None:
        """The ModuleList holding the transformer blocks: the one whose length is the config's layer count."""
        config = getattr(self._lm.model, "config", None)
        n_layers = getattr(config, "num_hidden_layers", None)
        lists = [(name, m) for name, m in self._modules.items() if isinstance(m, nn.ModuleList) and len(m) > 0]
        for name, m in lists:
            if n_layers is not None and len(m) == n_layers:
                return name
        if lists:
            return max(lists, key=lambda item: len(item[1]))[0]
        return None

    def list_layers(self) -> list[str]:
        """All layer names (dotted), in ``named_modules()`` order (the root module, named ``""``, is left out)."""
        return [name for name in self._modules if name != ROOT]

    def get_layer_names(self) -> list[str]:
        """All layer names (dotted); the same list as ``list_layers()``."""
        return self.list_layers()

    def flattened_name(self, layer_signature: str | int) -> str:
        """The flattened spelling of a layer's name.

        E.g. ``transformer.h.0.mlp`` -> ``gpt2lmheadmodel_transformer_h_0_mlp``: the lower-cased model class name,
        then the module path segments, joined with ``_``.
        """
        if isinstance(layer_signature, str) and layer_signature in self._modules:
            name = layer_signature
        else:
            name = self.resolve(layer_signature)
        return "_".join([self._prefix, *name.split(".")]) if name else self._prefix

    @property
    def name_to_layer(self) -> dict[str, nn.Module]:
        """Layer name -> module, under both spellings (every dotted name, then every flattened name)."""
        mapping = {name: module for name, module in self._modules.items() if name != ROOT}
        mapping.update({flat: self._modules[name] for flat, name in self._flat.items() if name is not None})
        return mapping

    def print_layer_names(self, file: TextIO | None = None) -> str:
        """Print every layer's dotted name and its flattened name, one layer per line.

        Args:
            file: where to print (default ``sys.stdout``).

        Returns:
            The printed text.
        """
        names = self.list_layers()
        width = max((len(n) for n in names), default=0)
        text = "".join(f"{name:<{width}}  {self.flattened_name(name)}\n" for name in names)
        (file or sys.stdout).write(text)
        return text

    @property
    def block_names(self) -> list[str]:
        """Names of the transformer blocks, in order (what integer layers index)."""
        if self._blocks_name is None:
            return []
        prefix = f"{self._blocks_name}." if self._blocks_name else ""
        return [f"{prefix}{i}" for i in range(len(self._modules[self._blocks_name]))]

    @property
    def num_blocks(self) -> int:
        """Number of transformer blocks."""
        return len(self.block_names)

    def resolve(self, layer: str | int | None) -> str:
        """Turn a layer given by name or block index into its dotted name.

        Args:
            layer: a dotted module name, a flattened name, an int (``i``-th transformer block; ``-1`` the last), or
                ``None`` / ``""`` for the whole model.

        Returns:
            The dotted name (``""`` for the whole model).

        Raises:
            ValueError: an unknown name (the closest valid names are listed in both spellings) or an out-of-range
                index.
            TypeError: anything but a str, an int or None.
        """
        if layer is None:
            return ROOT
        if isinstance(layer, bool) or not isinstance(layer, (str, int)):
            raise ArgumentTypeError(
                f"layer must be a str (dotted module name) or an int (block index), got {layer!r}"
            )
        if isinstance(layer, int):
            blocks = self.block_names
            if not blocks:
                raise UserInputError(
                    f"layer={layer} is an index but no list of transformer blocks was found in the model"
                )
            n = len(blocks)
            if not -n <= layer < n:
                raise UserInputError(
                    f"layer={layer} is out of range: the model has {n} transformer blocks, valid indices are "
                    f"0..{n - 1} (or -{n}..-1)"
                )
            return blocks[layer]
        if layer in self._modules:
            return layer
        if layer in self._flat:
            dotted = self._flat[layer]
            if dotted is None:
                clashing = [n for n in self.list_layers() if self.flattened_name(n) == layer]
                raise UserInputError(
                    f"layer={layer!r} is ambiguous: the flattened name fits {clashing}; use a dotted name"
                )
            return dotted
        raise UserInputError(f"layer={layer!r} is not a layer of this model; {self._closest(layer)}")

    def _closest(self, layer: str) -> str:
        """The closest valid names to an unknown one, in both spellings (dotted and flattened)."""
        dotted = self.list_layers()
        if "." in layer or not layer.startswith(self._prefix):
            close = difflib.get_close_matches(layer, dotted, n=5, cutoff=0.5)
        else:
            flat = [self.flattened_name(n) for n in dotted]
            close = [dotted[flat.index(m)] for m in difflib.get_close_matches(layer, flat, n=5, cutoff=0.5)]
        if not close:
            close = dotted[:5]
            lead = "valid names start with"
        else:
            lead = "closest valid names"
        flat_close = [self.flattened_name(n) for n in close]
        return f"{lead}: {close} (flattened: {flat_close}) (see lm.layers.list_layers())"

    def get_module(self, layer: str | int | None) -> nn.Module:
        """The ``nn.Module`` of a layer (``None`` / ``""``: the whole model)."""
        return self._modules[self.resolve(layer)]

    def layer_device(self, layer: str | int | None) -> torch.device:
        """The device of a layer's first parameter or buffer (the model's device if it has none)."""
        module = self.get_module(layer)
        for tensor in (*module.parameters(), *module.buffers()):
            return tensor.device
        return self._lm.device

    # ---------------------------------------------------------------------------------------------- shapes
    def _probe_shapes(self) -> dict[str, tuple[int, ...]]:
        """Output shape of every module, from one forward over a small dummy batch (hooks suspended)."""
        if self._shapes is not None:
            return self._shapes
        shapes: dict[str, tuple[int, ...]] = {}
        handles = []

        def record(name: str):
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                tensor = unwrap_main_tensor(output)
                if isinstance(tensor, torch.Tensor) and name not in shapes:
                    shapes[name] = tuple(tensor.shape)

            return hook

        for name, module in self._modules.items():
            handles.append(module.register_forward_hook(record(name)))
        vocab = getattr(getattr(self._lm.model, "config", None), "vocab_size", None) or 2
        ids = (torch.arange(_PROBE_BATCH * _PROBE_SEQ).reshape(_PROBE_BATCH, _PROBE_SEQ) % vocab).to(self._lm.device)
        self._suspended = True
        try:
            with torch.no_grad():
                self._lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        finally:
            self._suspended = False
            for handle in handles:
                handle.remove()
        self._shapes = shapes
        return shapes

    def output_shape(self, layer: str | int | None) -> tuple[int | str, ...]:
        """Output shape of a layer with the batch and sequence axes named, e.g. ``("batch", "seq", 576)``.

        Shapes come from one forward over a dummy batch of 2 texts of 5 tokens, run once and cached.
        """
        name = self.resolve(layer)
        shape = self._probe_shapes().get(name)
        if shape is None:
            raise ValueError(f"layer={name!r} produced no tensor output in a forward pass (it may be unused)")
        return _name_axes(shape)

    def width(self, layer: str | int) -> int:
        """The hidden size at a layer's output (its last dimension), e.g. ``n_embd`` for a GPT-2 block."""
        shape = self.output_shape(layer)
        width = shape[-1]
        if not isinstance(width, int):
            raise ValueError(f"layer={self.resolve(layer)!r} has no feature dimension (output shape {shape})")
        return width

    def print_tree(self, max_depth: int | None = None, file: TextIO | None = None) -> str:
        """Print the module tree with each module's class and output shape.

        Args:
            max_depth: show modules at most this many dots deep (``None``: all).
            file: where to print (default ``sys.stdout``).

        Returns:
            The printed text.
        """
        shapes = self._probe_shapes()
        lines = [f"{type(self._lm.model).__name__} ({self._lm.model_id})"]
        for name in self.list_layers():
            depth = name.count(".") + 1
            if max_depth is not None and depth > max_depth:
                continue
            module = self._modules[name]
            shape = shapes.get(name)
            shape_text = "[" + ", ".join(str(d) for d in _name_axes(shape)) + "]" if shape else "-"
            block = ""
            if self._blocks_name is not None and name in self.block_names:
                block = f"  <- block {self.block_names.index(name)}"
            lines.append(f"{'  ' * depth}{name} ({type(module).__name__}) -> {shape_text}{block}")
        text = "\n".join(lines) + "\n"
        (file or sys.stdout).write(text)
        return text

    # ----------------------------------------------------------------------------------------------- hooks
    def _is_active(self, hook: Hook) -> bool:
        if self._suspended or not hook.enabled:
            return False
        return self._lm._controllers_enabled or not isinstance(hook, Controller)

    def _model_level(self, hook: Hook, signature: Any) -> bool:
        """Whether ``signature`` names the whole model for this hook (``"input"``/``"output"`` of the model-level
        detectors, unless the model really has a top-level module of that name)."""
        return (
            isinstance(signature, str)
            and signature in MODEL_LEVEL_SIGNATURES
            and signature not in self._modules
            and isinstance(hook, Detector)
            and hook.hook_type == (HookType.PRE_FORWARD if signature == "input" else HookType.FORWARD)
        )

    def _check_module_hook(self, hook: Hook, name: str) -> None:
        """Hooks that are modules with an input width (SAEs): check the width and move them to the layer."""
        n_inputs = getattr(hook, "n_inputs", None)
        if isinstance(n_inputs, int) and not isinstance(n_inputs, bool):
            width = self.width(name)
            # A transcoder hooks the module whose output it predicts: its output width is the one to match.
            attr = "n_outputs" if getattr(hook, "is_transcoder", False) else "n_inputs"
            expected = getattr(hook, attr)
            if expected != width:
                raise UserInputError(
                    f"sae.{attr}={expected} does not match the width of layer {name!r}, which is {width}"
                )
        if isinstance(hook, nn.Module):
            hook.to(self.layer_device(name))

    def register_hook(
        self,
        layer_signature: str | int | None = None,
        hook: Hook | None = None,
        hook_type: HookType | str | None = None,
        *,
        layer: str | int | None = None,
    ) -> str:
        """Register a hook on a layer. Hooks on one layer run in registration order.

        This is the one registration path: ``LanguageModel.attach_sae`` calls it too. A hook that is an
        ``nn.Module`` with an ``n_inputs`` width (an SAE) is checked against the layer's width and moved to the
        layer's device.

        Args:
            layer_signature: the layer (dotted or flattened name, block index, ``None`` for the hook's own
                ``layer_signature``, else the whole model). ``layer=`` is a keyword synonym.
            hook: a ``Detector``, a ``Controller`` or a ``Hook`` subclass that overrides ``_hook_fn``.
            hook_type: overrides the hook's type (``HookType`` or ``"forward"`` / ``"pre_forward"``) when given.

        Returns:
            The hook's id (use it with ``unregister_hook``).
        """
        layer_signature = resolve_synonym("layer_signature", layer_signature, "layer", layer)
        if not isinstance(hook, Hook):
            raise ArgumentTypeError(
                f"hook must be a mi_crow.hooks.Hook (Detector or Controller), got {type(hook).__name__}"
            )
        if hook.id in self._registry:
            raise UserInputError(
                f"a hook with id {hook.id!r} is already registered (on {self._registry[hook.id].layer!r})"
            )
        if hook_type is not None:
            hook.hook_type = parse_hook_type(hook_type)
        signature = layer_signature if layer_signature is not None else hook.layer_signature
        model_level = self._model_level(hook, signature)
        name = ROOT if model_level else self.resolve(signature)
        self._check_module_hook(hook, name)
        module = self._modules[name]
        callback, is_pre = make_torch_hook(hook, name, self._is_active)
        if is_pre:
            handle = module.register_forward_pre_hook(callback, with_kwargs=True)
        else:
            handle = module.register_forward_hook(callback)
        if not model_level:
            hook.layer_signature = name
        self._registry[hook.id] = _Registration(hook, name, handle)
        logger.debug("registered %r on %r", hook, name)
        return hook.id

    def _registration(self, hook_id_or_hook: Hook | str | None) -> _Registration | None:
        if isinstance(hook_id_or_hook, Hook):
            reg = self._registry.get(hook_id_or_hook.id)
            return reg if reg is not None and reg.hook is hook_id_or_hook else None
        return self._registry.get(hook_id_or_hook) if isinstance(hook_id_or_hook, str) else None

    def unregister_hook(
        self,
        hook_id_or_hook: Hook | str | None = None,
        *,
        hook_or_id: Hook | str | None = None,
        hook_id: str | None = None,
    ) -> bool:
        """Remove a registered hook, given the hook or its id.

        Args:
            hook_id_or_hook: the hook or its id (``hook_or_id=`` and ``hook_id=`` are keyword synonyms).

        Returns:
            True if it was registered and is now removed, False for an id (or hook) that is not registered.
        """
        target = resolve_synonym("hook_id_or_hook", hook_id_or_hook, "hook_or_id", hook_or_id)
        target = resolve_synonym("hook_id_or_hook", target, "hook_id", hook_id)
        reg = self._registration(target)
        if reg is None:
            logger.debug("unregister_hook: %r is not registered", getattr(target, "id", target))
            return False
        del self._registry[reg.hook.id]
        reg.handle.remove()
        return True

    def enable_hook(self, hook_id: str | Hook) -> bool:
        """Enable a registered hook; returns False for an id that is not registered."""
        reg = self._registration(hook_id)
        if reg is not None:
            reg.hook.enable()
        return reg is not None

    def disable_hook(self, hook_id: str | Hook) -> bool:
        """Disable a registered hook (it stays registered); returns False for an id that is not registered."""
        reg = self._registration(hook_id)
        if reg is not None:
            reg.hook.disable()
        return reg is not None

    def get_hooks(
        self,
        layer_signature: str | int | None = None,
        hook_type: HookType | str | None = None,
        *,
        layer: str | int | None = None,
    ) -> list[Hook]:
        """Registered hooks in registration order: all of them, those of one layer and/or of one type.

        Args:
            layer_signature: only hooks on this layer (``layer=`` is a keyword synonym); ``None``: every layer.
            hook_type: only hooks of this type; ``None``: both types.
        """
        layer_signature = resolve_synonym("layer_signature", layer_signature, "layer", layer)
        hooks = [(reg.hook, reg.layer) for reg in self._registry.values()]
        if layer_signature is not None:
            name = self.resolve(layer_signature) if layer_signature not in MODEL_LEVEL_SIGNATURES else None
            hooks = [(h, n) for h, n in hooks
                     if n == name or (name is None and n == ROOT and h.layer_signature == layer_signature)]
        if hook_type is not None:
            wanted = parse_hook_type(hook_type)
            hooks = [(h, n) for h, n in hooks if h.hook_type == wanted]
        return [h for h, _ in hooks]

    def get_detectors(self) -> list[Detector]:
        """Registered detectors, in registration order."""
        return [h for h in self.get_hooks() if isinstance(h, Detector)]

    def get_controllers(self) -> list[Controller]:
        """Registered controllers (SAEs included), in registration order."""
        return [h for h in self.get_hooks() if isinstance(h, Controller)]

    def is_registered(self, hook: Hook) -> bool:
        """Whether this hook object is registered."""
        reg = self._registry.get(hook.id)
        return reg is not None and reg.hook is hook

    @contextmanager
    def hooks(self, hooks: Mapping[str | int | None, Hook | Iterable[Hook]] | Iterable[Hook]) -> Iterator[list[str]]:
        """Register hooks for the duration of a ``with`` block; they are removed even when the block raises.

        Args:
            hooks: ``{layer: hook or [hooks]}``, or hooks that carry their own ``layer_signature``.

        Yields:
            The registered hook ids.
        """
        pairs: list[tuple[str | int | None, Hook]] = []
        if isinstance(hooks, Hook):
            pairs.append((None, hooks))
        elif isinstance(hooks, Mapping):
            for layer, value in hooks.items():
                for hook in [value] if isinstance(value, Hook) else list(value):
                    pairs.append((layer, hook))
        else:
            pairs.extend((None, hook) for hook in hooks)
        ids: list[str] = []
        try:
            for layer, hook in pairs:
                ids.append(self.register_hook(layer, hook))
            yield ids
        finally:
            for hook_id in reversed(ids):
                if hook_id in self._registry:
                    self.unregister_hook(hook_id)


def _name_axes(shape: tuple[int, ...]) -> tuple[int | str, ...]:
    named: list[int | str] = list(shape)
    if len(shape) >= 2 and shape[0] == _PROBE_BATCH and shape[1] == _PROBE_SEQ:
        named[0], named[1] = "batch", "seq"
    elif len(shape) >= 1 and shape[0] == _PROBE_BATCH * _PROBE_SEQ:
        named[0] = "batch*seq"
    return tuple(named)
