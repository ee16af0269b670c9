"""One validation layer for the whole package: every argument check, one message format.

Each ``check_*`` returns the (possibly normalised) value or raises an error whose message reads
``"<argument> must be <expected>, got <value>"``: the argument's name, what was expected, and the value given.
A wrong *type* raises :class:`~mi_crow.errors.ArgumentTypeError` (both a ``TypeError`` and a ``ValueError``), a
wrong *value* raises :class:`~mi_crow.errors.UserInputError` (a ``ValueError``), so the same mistake is the same
exception wherever it is made.

Imports only torch and :mod:`mi_crow.errors`, so every layer of the package (the ops included) may use it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any, TypeVar

import torch

from mi_crow.errors import ArgumentTypeError, UserInputError

__all__ = [
    "DTYPE_NAMES",
    "check_bool",
    "check_choice",
    "check_dtype",
    "check_identifier",
    "check_int",
    "check_non_negative_int",
    "check_positive_int",
    "check_real",
    "check_str",
    "check_tensor",
    "check_texts",
    "describe",
    "fail",
    "fail_type",
    "resolve_synonym",
]

T = TypeVar("T")

#: Names accepted for dtypes (also with a ``torch.`` prefix).
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


def describe(value: Any) -> str:
    """How a value is shown in an error message: its repr (shortened), with its type when that is not obvious."""
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={list(value.shape)}, dtype={value.dtype}, device={value.device})"
    text = repr(value)
    if len(text) > 120:
        text = text[:117] + "..."
    if value is None or isinstance(value, (bool, int, float, str)):
        return text
    return f"{type(value).__name__} {text}"


def fail(argument: str, expected: str, value: Any) -> UserInputError:
    """The error for a wrong value (returned, for the caller to ``raise``)."""
    return UserInputError(f"{argument} must be {expected}, got {describe(value)}")


def fail_type(argument: str, expected: str, value: Any) -> ArgumentTypeError:
    """The error for a wrong type (returned, for the caller to ``raise``)."""
    return ArgumentTypeError(f"{argument} must be {expected}, got {describe(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(
    value: Any,
    argument: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
) -> int | None:
    """An int (not a bool) in ``[minimum, maximum]``; ``None`` passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    if not _is_int(value):
        expected = "an int" + (" or None" if allow_none else "")
        raise fail_type(argument, expected, value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if maximum is None:
            expected = f"an int >= {minimum}"
        elif minimum is None:
            expected = f"an int <= {maximum}"
        else:
            expected = f"an int in [{minimum}, {maximum}]"
        raise fail(argument, expected + (" or None" if allow_none else ""), value)
    return int(value)


def check_positive_int(value: Any, argument: str, *, allow_none: bool = False) -> int | None:
    """An int >= 1 (``None`` passes when ``allow_none``)."""
    if value is None and allow_none:
        return None
    expected = "a positive int" + (" or None" if allow_none else "")
    if not _is_int(value):
        raise fail_type(argument, expected, value)
    if value < 1:
        raise fail(argument, expected, value)
    return int(value)


def check_non_negative_int(value: Any, argument: str, *, allow_none: bool = False) -> int | None:
    """An int >= 0 (``None`` passes when ``allow_none``)."""
    if value is None and allow_none:
        return None
    expected = "an int >= 0" + (" or None" if allow_none else "")
    if not _is_int(value):
        raise fail_type(argument, expected, value)
    if value < 0:
        raise fail(argument, expected, value)
    return int(value)


def check_real(
    value: Any,
    argument: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
    allow_none: bool = False,
) -> float | None:
    """A finite real number (int or float, not bool) within the given bounds."""
    if value is None and allow_none:
        return None
    lo = "" if minimum is None else (f">= {minimum}" if min_inclusive else f"> {minimum}")
    hi = "" if maximum is None else (f"<= {maximum}" if max_inclusive else f"< {maximum}")
    bounds = " and ".join(b for b in (lo, hi) if b)
    expected = "a finite number" + (f" {bounds}" if bounds else "") + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail_type(argument, expected, value)
    v = float(value)
    if not math.isfinite(v):
        raise fail(argument, expected, value)
    if minimum is not None and (v < minimum or (not min_inclusive and v == minimum)):
        raise fail(argument, expected, value)
    if maximum is not None and (v > maximum or (not max_inclusive and v == maximum)):
        raise fail(argument, expected, value)
    return v


def check_bool(value: Any, argument: str) -> bool:
    """A real ``bool`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise fail_type(argument, "a bool", value)
    return value


def check_str(value: Any, argument: str, *, allow_empty: bool = False, allow_none: bool = False) -> str | None:
    """A string (non-empty unless ``allow_empty``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise fail_type(argument, "a str" + (" or None" if allow_none else ""), value)
    if not allow_empty and not value:
        raise fail(argument, "a non-empty str", value)
    return value


def check_choice(value: Any, argument: str, choices: Collection[T]) -> T:
    """One of ``choices`` (compared with ``==``); the message lists them."""
    try:
        ok = value in choices
    except TypeError:  # unhashable value against a set
        ok = False
    if not ok:
        raise fail(argument, f"one of {list(choices)!r}", value)
    return value


def check_dtype(
    value: Any,
    argument: str = "dtype",
    *,
    allowed: Collection[torch.dtype] | None = None,
    allow_none: bool = False,
) -> torch.dtype | None:
    """A ``torch.dtype`` or its name (``"bfloat16"``, ``"bf16"``, ``"torch.float16"``), optionally restricted to
    ``allowed``; returns the ``torch.dtype``."""
    if value is None and allow_none:
        return None
    names = sorted({n for n, d in DTYPE_NAMES.items() if allowed is None or d in allowed})
    expected = "a torch.dtype or one of " + repr(names) + (" or None" if allow_none else "")
    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        dtype = DTYPE_NAMES.get(value.strip().lower().removeprefix("torch."))
        if dtype is None:
            raise fail(argument, expected, value)
    else:
        raise fail_type(argument, expected, value)
    if allowed is not None and dtype not in allowed:
        raise fail(argument, "one of " + ", ".join(str(d) for d in allowed), value)
    return dtype


def check_tensor(
    value: Any,
    argument: str,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Collection[torch.dtype] | None = None,
    floating: bool | None = None,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """A ``torch.Tensor`` with the given number of dims, dtype family and shape (``None`` in ``shape`` = any)."""
    if not isinstance(value, torch.Tensor):
        raise fail_type(argument, "a torch.Tensor", value)
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in dims:
            want = " or ".join(str(d) for d in dims)
            raise fail(argument, f"a {want}-D tensor", value)
    if floating is True and not value.is_floating_point():
        raise fail_type(argument, "a floating-point tensor", value)
    if floating is False and value.is_floating_point():
        raise fail_type(argument, "an integer or bool tensor", value)
    if dtypes is not None and value.dtype not in dtypes:
        raise fail_type(argument, "a tensor of dtype " + " or ".join(str(d) for d in dtypes), value)
    if shape is not None:
        if value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise fail(argument, f"a tensor of shape {want}", value)
    return value


def check_texts(value: Any, argument: str = "texts") -> list[str]:
    """A non-empty sequence of strings (a single string is wrapped in a list)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence):
        raise fail_type(argument, "a str or a list of str", value)
    texts = list(value)
    if not texts:
        raise fail(argument, "a non-empty list of str", value)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise fail_type(f"{argument}[{i}]", "a str", text)
    return texts


def check_identifier(value: Any, argument: str) -> str:
    """A store key segment (run id, layer name, SAE id, concept-set id): one folder name, never a path.

    A non-empty string of at most 255 characters without ``/``, ``\\``, control characters or a leading ``.``.
    One rule for every key the package writes, so anything one ``save`` accepts every other accepts too.
    """
    if not isinstance(value, str):
        raise fail_type(argument, "a str", value)
    if (
        not value
        or len(value) > 255
        or value.startswith(".")
        or "/" in value
        or "\\" in value
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        raise fail(
            argument,
            "a non-empty name usable as one folder name (no '/', '\\' or control characters, not starting with "
            "'.', at most 255 characters)",
            value,
        )
    return value


def resolve_synonym(
    canonical_name: str, canonical_value: Any, alias_name: str, alias_value: Any, default: Any = None
) -> Any:
    """One argument accepted under two names (a documented spelling and ours): return the value given.

    ``None`` means "not given" for both names. Given under both names with different values, it is an error that
    names both; the same value twice is accepted.

    Args:
        canonical_name: the name the API documents as canonical (e.g. ``"layer_signature"``).
        canonical_value: what was passed under it.
        alias_name: the other accepted name (e.g. ``"layers"``).
        alias_value: what was passed under it.
        default: returned when neither was given.

    Raises:
        UserInputError: both names given with different values.
    """
    if canonical_value is None:
        return default if alias_value is None else alias_value
    if alias_value is None or alias_value is canonical_value:
        return canonical_value
    try:
        same = bool(canonical_value == alias_value)
    except Exception:  # noqa: BLE001 - tensors and other objects without a plain truth value count as different
        same = False
    if not same:
        raise UserInputError(
            f"{canonical_name} and {alias_name} name the same argument; give only one of them, got "
            f"{canonical_name}={describe(canonical_value)} and {alias_name}={describe(alias_value)}"
        )
    return canonical_value
