"""Adapters between mi_crow hooks and ``torch.nn.Module`` hook callbacks.

A LanguageModel registers one torch hook per mi_crow hook; torch runs a module's hooks in registration order and
feeds each forward hook the output returned by the previous one, which is what makes several hooks on one layer
compose in order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

from mi_crow.hooks.hook import Controller, Detector, Hook, HookError, HookType, overrides_hook_fn

__all__ = ["make_torch_hook", "replace_main_tensor", "unwrap_main_tensor"]

# Keyword arguments that carry a module's main input when it is not passed positionally (HF models are called
# with input_ids=..., some blocks with hidden_states=...).
_MAIN_INPUT_KWARGS = ("hidden_states", "input_ids", "inputs_embeds", "x", "input")
# Fields of a HF ModelOutput that hold the main tensor, in order of preference.
_MAIN_OUTPUT_KEYS = ("logits", "last_hidden_state", "hidden_states")


def unwrap_main_tensor(output: Any) -> Any:
    """Return the main tensor of a module output.

    Args:
        output: a tensor, a tuple/list whose first element is the hidden state (HF blocks), or a mapping such as a
            HF ``ModelOutput`` (``logits`` or ``last_hidden_state`` is taken).

    Returns:
        The tensor, or ``output`` itself when no tensor can be found.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in _MAIN_OUTPUT_KEYS:
            value = output.get(key)
            if isinstance(value, torch.Tensor):
                return value
        for value in output.values():
            if isinstance(value, torch.Tensor):
                return value
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output


def replace_main_tensor(output: Any, new: torch.Tensor) -> Any:
    """Put ``new`` where ``unwrap_main_tensor`` found the main tensor, passing everything else through.

    Args:
        output: the original module output (tensor, tuple/list, or mapping).
        new: the replacement tensor.

    Returns:
        An output of the same structure with the main tensor replaced.
    """
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, MutableMapping):
        for key in (*_MAIN_OUTPUT_KEYS, *output.keys()):
            if isinstance(output.get(key), torch.Tensor):
                output[key] = new
                return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (new, *output[1:])
    if isinstance(output, list) and output and isinstance(output[0], torch.Tensor):
        return [new, *output[1:]]
    raise TypeError(f"cannot replace the main tensor of a module output of type {type(output).__name__}")


def _main_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, str | int | None]:
    """Find a module call's main input tensor and where it came from (a position or a keyword)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], 0
    for name in _MAIN_INPUT_KWARGS:
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name], name
    return None, None


def _pre_inputs(args: tuple[Any, ...], main: Any, where: str | int | None) -> tuple[Any, ...]:
    """The positional inputs a PRE_FORWARD hook sees: ``args``, or ``(main,)`` when the main tensor came by keyword."""
    return (main,) if isinstance(where, str) else args


def _check_replacement(hook: Hook, layer: str, value: Any, allow_tuple: bool) -> Any:
    if value is None or isinstance(value, torch.Tensor):
        return value
    if allow_tuple and isinstance(value, tuple):
        return value
    expected = "a torch.Tensor, a tuple or None" if allow_tuple else "a torch.Tensor or None"
    raise HookError(
        hook,
        layer,
        TypeError(f"modify_activations must return {expected}, got {type(value).__name__}"),
    )


def _call_hook(hook: Hook, layer: str, module: nn.Module, inputs: Any, output: Any) -> Any:
    """Run one mi_crow hook; returns its replacement (or None), with any exception wrapped in a HookError."""
    try:
        if overrides_hook_fn(hook):
            return hook._hook_fn(module, inputs, output)
        if isinstance(hook, Controller):
            value = hook.modify_activations(module, inputs, output)
            return _check_replacement(hook, layer, value, allow_tuple=hook.hook_type == HookType.PRE_FORWARD)
        if isinstance(hook, Detector):
            hook.process_activations(module, inputs, output)
            return None
        raise TypeError(
            f"a hook must be a Detector, a Controller or a Hook that overrides _hook_fn, got {type(hook).__name__}"
        )
    except HookError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the hook and layer named, original chained
        raise HookError(hook, layer, exc) from exc


def _replace_pre_inputs(
    hook: Hook, layer: str, new: Any, args: tuple[Any, ...], kwargs: dict[str, Any], where: str | int | None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Apply a PRE_FORWARD replacement: a tuple replaces the positional inputs, a tensor the main input."""
    if isinstance(new, tuple):
        if not isinstance(where, str):
            return new, kwargs
        if len(new) != 1:
            raise HookError(hook, layer, ValueError(
                f"the module's main input came as the keyword {where!r}: return one tensor or a 1-tuple, got a "
                f"tuple of {len(new)}"
            ))
        new = new[0]
    if where is None:
        raise HookError(hook, layer, TypeError("the module was called without a tensor input to replace"))
    if isinstance(where, int):
        return (new, *args[1:]), kwargs
    return args, {**kwargs, where: new}


def make_torch_hook(
    hook: Hook, layer: str, is_active: Callable[[Hook], bool]
) -> tuple[Callable[..., Any], bool]:
    """Build the torch callback that runs ``hook`` on a module.

    Detectors and controllers see the main tensor of a forward output (the hidden state of a block's tuple, the
    logits of a model output) and return a replacement for it; a plain ``Hook`` subclass that overrides
    ``_hook_fn`` sees the raw output and returns a replacement for it (a tensor still replaces the main tensor).
    Every PRE_FORWARD hook sees the positional inputs as a tuple (see ``Detector.process_activations``).

    Args:
        hook: the mi_crow hook.
        layer: the layer's dotted name, for error messages.
        is_active: called on every forward; the hook runs only when it returns True (it checks ``hook.enabled`` and
            whether controllers are switched off for this pass).

    Returns:
        ``(callback, is_pre)``: register it with ``module.register_forward_pre_hook(callback, with_kwargs=True)``
        when ``is_pre`` is True, else with ``module.register_forward_hook(callback)``.
    """
    raw = overrides_hook_fn(hook)
    if hook.hook_type == HookType.PRE_FORWARD:

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not is_active(hook):
                return None
            main, where = _main_input(args, kwargs)
            hook.call_kwargs = kwargs
            try:
                new = _call_hook(hook, layer, module, args if raw else _pre_inputs(args, main, where), None)
            finally:
                hook.call_kwargs = None
            if new is None:
                return None
            return _replace_pre_inputs(hook, layer, new, args, kwargs, where)

        return pre_hook, True

    def forward_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not is_active(hook):
            return None
        hook.call_output = output
        try:
            new = _call_hook(hook, layer, module, args, output if raw else unwrap_main_tensor(output))
        finally:
            hook.call_output = None
        if new is None:
            return None
        if raw and not isinstance(new, torch.Tensor):
            return new
        return replace_main_tensor(output, new)

    return forward_hook, False
