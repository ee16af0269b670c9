"""Accelerated TopK sparse-autoencoder ops (``torch.ops.mi_crow.*``).

Public API: :func:`topk_encode`, :func:`sparse_decode`, :class:`TopKCode`, :func:`backends`, and the plain
PyTorch references ``*_ref``. Kernels are chosen by device through the dispatcher: the C++ extension on CPU,
Triton (and a CUDA C++ decoder-gradient kernel where built) on CUDA, the reference everywhere else. See
:mod:`mi_crow.ops.registration` for the environment switches.
"""

from mi_crow.ops import schemas as _schemas  # noqa: F401  (defines the op schemas before anything registers)
from mi_crow.ops.functional import TopKCode, sparse_decode, topk_encode
from mi_crow.ops.reference import (
    gather_dot_ref,
    scatter_rows_ref,
    sparse_decode_backward_ref,
    sparse_decode_ref,
    topk_encode_ref,
)
from mi_crow.ops.registration import backends

__all__ = [
    "TopKCode",
    "backends",
    "gather_dot_ref",
    "scatter_rows_ref",
    "sparse_decode",
    "sparse_decode_backward_ref",
    "sparse_decode_ref",
    "topk_encode",
    "topk_encode_ref",
]
