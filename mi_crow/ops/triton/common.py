"""What the Triton launchers share: argument checks, launch-size helpers and float rounding inside kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.ops import checks
from mi_crow.ops.index_bounds import known_in_range, record_bound
from mi_crow.validation import fail, fail_type


def interpreting() -> bool:
    """Whether the launchers run under the Triton interpreter (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_tensor(op: str, name: str, t: object, ndim: int, *, floating: bool) -> torch.Tensor:
    """A float (``floating``) or int64 tensor with ``ndim`` dims, on CUDA unless interpreting."""
    t = checks.tensor(op, name, t, ndim, floating=floating)
    if not floating and t.dtype != torch.int64:
        raise fail_type(f"{op}: {name}", "int64", t)
    if not t.is_cuda and not interpreting():
        raise fail(f"{op}: {name}", "a CUDA tensor (or run with TRITON_INTERPRET=1 for CPU tensors)", t)
    return t


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """All tensors (None entries skipped) on the first one's device."""
    (ref_name, ref), *_ = tensors.items()
    checks.same_device(op, ref_name, ref, **tensors)


def check_index_range(op: str, name: str, indices: torch.Tensor, n: int) -> None:
    """Indices in ``[0, n)``, where an out-of-range index would otherwise be an illegal memory access.

    One reduction and one host sync, skipped for indices an op produced or already checked and nobody has written
    to since (:mod:`mi_crow.ops.index_bounds`): a training step's encode -> decode -> backward checks nothing."""
    if indices.numel() == 0 or known_in_range(indices, n):
        return
    lo, hi = torch.aminmax(indices)
    lo_i, hi_i = int(lo), int(hi)
    if lo_i < 0 or hi_i >= n:
        raise UserInputError(f"{op}: {name} must lie in [0, {n}), got values in [{lo_i}, {hi_i}]")
    record_bound(indices, n)


def check_mask(op: str, dead_mask: object, n: int) -> None:
    """None, or a bool tensor of shape ``[n]``."""
    if dead_mask is None:
        return
    if not isinstance(dead_mask, torch.Tensor):
        raise ArgumentTypeError(f"{op}: dead_mask must be a torch.Tensor or None, got {type(dead_mask).__name__}")
    if dead_mask.dtype != torch.bool:
        raise fail_type(f"{op}: dead_mask", f"a bool tensor of shape [{n}]", dead_mask)
    if dead_mask.shape != (n,):
        raise fail(f"{op}: dead_mask", f"a bool tensor of shape [{n}]", dead_mask)


def next_pow2(v: int) -> int:
    """The smallest power of two >= v (1 for v <= 1)."""
    return 1 << max(0, (v - 1).bit_length())


def target_programs(device: torch.device) -> int:
    """How many programs keep the device busy (a few SMs' worth per SM)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    # Interpreter: a few programs are enough to exercise the split-and-merge path.
    return 4


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """Round float32 v to dtype, to nearest even, and return it in dtype."""
    if dtype == tl.bfloat16:
        # Done on the bits because the interpreter truncates float32 -> bfloat16 casts; a GPU rounds to nearest
        # even, which is what this computes, so both paths agree with PyTorch's rounding. (A NaN is passed through:
        # adding the rounding bias to its bits could carry into the sign.)
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True)).to(dtype)
    else:
        return v.to(dtype)
