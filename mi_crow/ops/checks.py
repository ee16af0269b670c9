"""Argument checks shared by the public ops (:mod:`mi_crow.ops.functional`) and the Triton launchers.

Built on :mod:`mi_crow.validation`, so a mistake raises the package's one exception hierarchy: a wrong type is an
:class:`~mi_crow.errors.ArgumentTypeError` (both ``TypeError`` and ``ValueError``), a wrong value a
:class:`~mi_crow.errors.UserInputError` (``ValueError``). Every message starts with the op's name, then reads
``"<argument> must <rule>, got <value>"``. Imports torch, :mod:`mi_crow.errors` and :mod:`mi_crow.validation` only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.validation import check_tensor, fail, fail_type

#: Floating dtypes every op accepts (float64 is served by the references).
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FLOAT_NAMES = "float32, bfloat16, float16 or float64"


def tensor(op: str, name: str, value: Any, ndim: int, *, floating: bool = False) -> Tensor:
    """A tensor with ``ndim`` dimensions (and one of :data:`FLOAT_DTYPES` when ``floating``)."""
    t = check_tensor(value, f"{op}: {name}")
    if t.dim() != ndim:
        raise fail(f"{op}: {name}", f"{ndim}-D", t)
    if floating and t.dtype not in FLOAT_DTYPES:
        raise fail_type(f"{op}: {name}", FLOAT_NAMES, t)
    return t


def int_in_range(op: str, name: str, value: Any, low: int, high: int, *, expected: str | None = None) -> int:
    """An int (not a bool) in ``[low, high]``; ``expected`` replaces the default wording ``"in [low, high]"``."""
    if isinstance(value, bool) or not isinstance(value, int):
        # The type is named even for a float (validation.describe shows 4.0 alone): "an int, got float 4.0".
        raise ArgumentTypeError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise fail(f"{op}: {name}", expected or f"in [{low}, {high}]", value)
    return value


def float_dtype(op: str, name: str, value: Any) -> torch.dtype | None:
    """One of :data:`FLOAT_DTYPES`, or None."""
    if value is not None and value not in FLOAT_DTYPES:
        raise ArgumentTypeError(
            f"{op}: {name} must be torch.float32, torch.bfloat16, torch.float16, torch.float64 or None, got {value!r}"
        )
    return value


def same_device(op: str, ref_name: str, ref: Tensor, **tensors: Tensor | None) -> None:
    """Every given tensor (None entries skipped) on ``ref``'s device."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise UserInputError(
                f"{op}: all tensors must be on one device, but {name} is on {t.device} and {ref_name} on {ref.device}"
            )
