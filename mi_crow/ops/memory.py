"""Large CPU tensors backed by transparent huge pages.

The SAE hot path reads decoder and encoder rows at random (k or k_aux rows per token out of ``n_latents``). With
4 KiB pages nearly every such row read also misses the TLB; with 2 MiB pages it rarely does (about 20% faster
random row gathers measured on this project's machine). On Linux with transparent huge pages in "madvise" mode, a
region gets huge pages only if it is marked with ``madvise(MADV_HUGEPAGE)`` before it is first written, so
`empty_huge` marks a fresh, untouched ``torch.empty`` tensor. The C++ kernels do the same for the large gradients
they allocate (``csrc/hugepages.h``). Everywhere else (other systems, GPUs, small tensors) this is plain
``torch.empty``.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

__all__ = ["empty_huge"]

_HUGE = 2 << 20
_MIN_BYTES = 8 * _HUGE
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_madvise = None
if sys.platform.startswith("linux") and _MADV_HUGEPAGE is not None:
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # no libc symbol: plain pages
        _madvise = None


def empty_huge(*size: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.empty(*size, dtype=dtype, device=device)``, backed by huge pages where that is possible.

    Only CPU tensors of at least 16 MiB on Linux are marked; the request is best effort (the kernel may still use
    small pages), and the contents are uninitialised as with ``torch.empty``.
    """
    t = torch.empty(*size, dtype=dtype, device=device)
    if _madvise is None or t.device.type != "cpu":
        return t
    nbytes = t.numel() * t.element_size()
    if nbytes < _MIN_BYTES:
        return t
    start = t.data_ptr()
    begin = (start + _HUGE - 1) & ~(_HUGE - 1)
    end = (start + nbytes) & ~(_HUGE - 1)
    if end > begin:
        _madvise(begin, end - begin, _MADV_HUGEPAGE)  # best effort: a failure leaves small pages
    return t
