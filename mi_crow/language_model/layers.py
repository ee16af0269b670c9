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

from mi_crow.errors import UserInputError
from mi_crow.hooks import Controller, Hook
from mi_crow.hooks.dispatch import make_torch_hook, unwrap_main_tensor

if TYPE_CHECKING:
    from mi_crow.language_model.language_model import LanguageModel

__all__ = ["LanguageModelLayers", "ROOT"]

logger = logging.getLogger(__name__)

ROOT = ""
"""The name of the whole model (the root of ``named_modules()``); model-level hooks use ``layer_signature=None``."""

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
    An int ``i`` means the ``i``-th transformer block (negative ints count from the end).

    Args:
        lm: the owning LanguageModel.
    """

    def __init__(self, lm: LanguageModel) -> None:
        self._lm = lm
        self._modules: dict[str, nn.Module] = dict(lm.model.named_modules())
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
        """All layer names, in ``named_modules()`` order (the root module, named ``""``, is left out)."""
        return [name for name in self._modules if name != ROOT]

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
            layer: a dotted module name, an int (``i``-th transformer block; ``-1`` the last), or ``None`` / ``""``
                for the whole model.

        Returns:
            The dotted name (``""`` for the whole model).

        Raises:
            ValueError: an unknown name (the closest valid names are listed) or an out-of-range index.
            TypeError: anything but a str, an int or None.
        """
        if layer is None:
            return ROOT
        if isinstance(layer, bool) or not isinstance(layer, (str, int)):
            raise TypeError(f"layer must be a str (dotted module name) or an int (block index), got {layer!r}")
        if isinstance(layer, int):
            blocks = self.block_names
            if not blocks:
                raise ValueError(f"layer={layer} is an index but no list of transformer blocks was found in the model")
            n = len(blocks)
            if not -n <= layer < n:
                raise UserInputError(
                    f"layer={layer} is out of range: the model has {n} transformer blocks, valid indices are "
                    f"0..{n - 1} (or -{n}..-1)"
                )
            return blocks[layer]
        if layer in self._modules:
            return layer
        close = difflib.get_close_matches(layer, self.list_layers(), n=5, cutoff=0.5)
        hint = f"closest valid names: {close}" if close else f"valid names start with: {self.list_layers()[:5]}"
        raise UserInputError(f"layer={layer!r} is not a layer of this model; {hint} (see lm.layers.list_layers())")

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

    def register_hook(self, layer: str | int | None, hook: Hook) -> str:
        """Register a hook on a layer. Hooks on one layer run in registration order.

        Args:
            layer: the layer (name, block index, ``None`` for the whole model). When ``None`` and the hook has a
                ``layer_signature``, that is used.
            hook: a ``Detector`` or ``Controller``.

        Returns:
            The hook's id (use it with ``unregister_hook``).
        """
        if not isinstance(hook, Hook):
            raise TypeError(f"hook must be a mi_crow.hooks.Hook (Detector or Controller), got {type(hook).__name__}")
        if hook.id in self._registry:
            raise ValueError(f"a hook with id {hook.id!r} is already registered (on {self._registry[hook.id].layer!r})")
        name = self.resolve(layer if layer is not None else hook.layer_signature)
        module = self._modules[name]
        callback, is_pre = make_torch_hook(hook, name, self._is_active)
        if is_pre:
            handle = module.register_forward_pre_hook(callback, with_kwargs=True)
        else:
            handle = module.register_forward_hook(callback)
        hook.layer_signature = name
        self._registry[hook.id] = _Registration(hook, name, handle)
        logger.debug("registered %r on %r", hook, name)
        return hook.id

    def unregister_hook(self, hook_or_id: Hook | str) -> None:
        """Remove a registered hook, given the hook or its id."""
        hook_id = hook_or_id.id if isinstance(hook_or_id, Hook) else hook_or_id
        reg = self._registry.pop(hook_id, None) if isinstance(hook_id, str) else None
        if reg is None:
            raise ValueError(f"hook_id={hook_id!r} is not registered; registered ids: {list(self._registry)}")
        reg.handle.remove()

    def get_hooks(self, layer: str | int | None = None) -> list[Hook]:
        """Registered hooks in registration order, all of them or those of one layer."""
        if layer is None:
            return [reg.hook for reg in self._registry.values()]
        name = self.resolve(layer)
        return [reg.hook for reg in self._registry.values() if reg.layer == name]

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
