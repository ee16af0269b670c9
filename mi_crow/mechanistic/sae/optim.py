"""Optimizer steps taken inside backward, one parameter at a time.

A plain step (``loss.backward(); optimizer.step()``) holds every parameter's gradient at once. For a TopK SAE the
two weight gradients are dense ``[n_latents, d_in]`` matrices, each as large as the weight itself, so at the end of
backward the step holds two extra copies of the dictionary. `step_in_backward` instead steps each parameter the
moment autograd has finished accumulating its gradient and frees that gradient at once: the decoder is stepped
(and renormalised) before the encoder's gradient exists, so at most one weight gradient is alive at any time.

The update is the same as a plain step: Adam (and the other ``torch.optim`` optimizers) update each parameter from
its own gradient and state only, and ``optimizer.step()`` skips parameters whose gradient is None, so calling it
once per ready parameter updates each parameter exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.validation import fail_type

__all__ = ["step_in_backward"]

ParamHook = Callable[[Tensor], None]


@contextmanager
def step_in_backward(
    optimizer: torch.optim.Optimizer,
    *,
    before_step: Mapping[Tensor, ParamHook] | None = None,
    after_step: Mapping[Tensor, ParamHook] | None = None,
) -> Iterator[None]:
    """Within the block, every ``backward`` steps ``optimizer`` on each parameter as soon as its gradient is ready.

    Each parameter of ``optimizer`` gets a post-accumulate-grad hook that runs ``before_step[p](p)`` (e.g. a
    projection of the gradient), steps the optimizer (only ``p`` has a gradient at that moment, so only ``p`` is
    updated), sets ``p.grad = None`` and runs ``after_step[p](p)`` (e.g. a renormalisation). The hooks are removed
    when the block exits, also on error.

    Requirements: every parameter's gradient must be None when backward starts (``zero_grad(set_to_none=True)``),
    and a parameter must not be needed by a backward node that runs after its own gradient is complete (autograd
    raises its in-place-modification error if one is). Learning-rate changes must be made before backward.

    Args:
        optimizer: the optimizer whose parameters are stepped.
        before_step: parameter -> function called with the parameter (gradient set) right before its step.
        after_step: parameter -> function called with the parameter right after its step (gradient freed).

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
        ValueError: a key of ``before_step``/``after_step`` is not a parameter of ``optimizer``, or a parameter
            already has a gradient.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise fail_type("step_in_backward: optimizer", "a torch.optim.Optimizer", optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = {id(p) for p in params}
    # Keyed by id: a tensor's == is elementwise, so tensors make poor dict keys.
    before = {id(p): fn for p, fn in (before_step or {}).items()}
    after = {id(p): fn for p, fn in (after_step or {}).items()}
    for name, hooks in (("before_step", before_step or {}), ("after_step", after_step or {})):
        for p in hooks:
            if id(p) not in ids:
                raise UserInputError(
                    f"step_in_backward: every key of {name} must be a parameter of the optimizer, got a tensor of "
                    f"shape {tuple(p.shape)} that is not"
                )
    for p in params:
        if p.grad is not None:
            raise UserInputError(
                f"step_in_backward: parameter of shape {tuple(p.shape)} already has a gradient; call "
                "optimizer.zero_grad(set_to_none=True) before backward"
            )

    def hook(p: Tensor) -> None:
        fn = before.get(id(p))
        if fn is not None:
            fn(p)
        optimizer.step()
        p.grad = None
        fn = after.get(id(p))
        if fn is not None:
            fn(p)

    handles = [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
