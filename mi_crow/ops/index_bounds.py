"""Index tensors already known to lie in range, so the ops skip their range check for indices they produced.

A launcher that gathers rows by index must not read past the weight, so it checks ``0 <= indices < n`` before the
kernel runs: one reduction over the indices and, on an accelerator, one host sync. Most indices an op receives were
produced by another op (``topk_encode``'s codes, or indices a decode already checked and saved for its backward),
so the check would be repeated on every call of a training step. Instead, an op that produces or checks indices
records the bound on the tensor object, with the tensor's version counter at that moment, and a later check of
the same, unmodified tensor against a width at least that large is skipped.

What invalidates the record: an in-place write through the tensor or any view or ``detach()`` of it (they share
the version counter), and any other tensor object (a slice, a copy, ``.to(...)`` makes a new object without the
record). Not covered: a write through ``tensor.data``, which PyTorch does not count; inference tensors carry no
version counter, so their indices are always checked.
"""

from __future__ import annotations

import torch

__all__ = ["known_in_range", "record_bound"]

_ATTR = "_mi_crow_index_bound"


def _version(indices: torch.Tensor) -> int | None:
    try:
        return int(indices._version)
    except RuntimeError:  # an inference tensor: no version counter
        return None


def record_bound(indices: torch.Tensor, bound: int) -> torch.Tensor:
    """Record that every entry of ``indices`` lies in ``[0, bound)`` (as it is now); returns ``indices``."""
    version = _version(indices)
    if version is not None:
        setattr(indices, _ATTR, (version, int(bound)))
    return indices


def known_in_range(indices: torch.Tensor, n: int) -> bool:
    """Whether ``indices`` is known, without looking at its values, to lie in ``[0, n)``."""
    record = getattr(indices, _ATTR, None)
    if record is None:
        return False
    version = _version(indices)
    return version is not None and record[0] == version and record[1] <= n
