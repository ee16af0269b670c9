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

from mi_crow.hooks.hook import Controller, Detector, Hook, HookError, HookType

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


def _check_replacement(hook: Hook, layer: str, value: Any) -> torch.Tensor | None:
    if value is None or isinstance(value, torch.Tensor):
        return value
    raise HookError(
        hook,
        layer,
        TypeError(f"modify_activations must return a torch.Tensor or None, got {type(value).__name__}"),
    )


def _call_hook(hook: Hook, layer: str, module: nn.Module, inputs: Any, output: Any) -> torch.Tensor | None:
    try:
        if isinstance(hook, Controller):
            return _check_replacement(hook, layer, hook.modify_activations(module, inputs, output))
        if isinstance(hook, Detector):
            hook.process_activations(module, inputs, output)
            return None
        raise TypeError(f"a hook must be a Detector or a Controller, got {type(hook).__name__}")
    except HookError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the hook and layer named, original chained
        raise HookError(hook, layer, exc) from exc


def make_torch_hook(
    hook: Hook, layer: str, is_active: Callable[[Hook], bool]
) -> tuple[Callable[..., Any], bool]:
    """Build the torch callback that runs ``hook`` on a module.

    Args:
        hook: the mi_crow hook.
        layer: the layer's dotted name, for error messages.
        is_active: called on every forward; the hook runs only when it returns True (it checks ``hook.enabled`` and
            whether controllers are switched off for this pass).

    Returns:
        ``(callback, is_pre)``: register it with ``module.register_forward_pre_hook(callback, with_kwargs=True)``
        when ``is_pre`` is True, else with ``module.register_forward_hook(callback)``.
    """
    if hook.hook_type == HookType.PRE_FORWARD:

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not is_active(hook):
                return None
            main, where = _main_input(args, kwargs)
            hook.call_kwargs = kwargs
            try:
                new = _call_hook(hook, layer, module, main, None)
            finally:
                hook.call_kwargs = None
            if new is None:
                return None
            if where is None:
                raise HookError(hook, layer, TypeError("the module was called without a tensor input to replace"))
            if isinstance(where, int):
                return (new, *args[1:]), kwargs
            return args, {**kwargs, where: new}

        return pre_hook, True

    def forward_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not is_active(hook):
            return None
        new = _call_hook(hook, layer, module, args, unwrap_main_tensor(output))
        if new is None:
            return None
        return replace_main_tensor(output, new)

    return forward_hook, False
