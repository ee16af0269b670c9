"""Accelerated TopK sparse-autoencoder ops (``torch.ops.mi_crow.*``).

Public API: :func:`topk_encode`, :func:`sparse_decode`, :func:`sparse_decode_with_aux` (the AuxK step's two
decodes with one decoder gradient), :class:`TopKCode`, :class:`DecodeWithAux`, :func:`backends`, :func:`cpu_isa`
(the instruction-set level of the C++ CPU kernels), and the plain PyTorch references ``*_ref``. Kernels are chosen
by device through the dispatcher: the C++ extension on CPU, Triton (and a CUDA C++ decoder-gradient kernel where
built) on CUDA, the reference everywhere else. See :mod:`mi_crow.ops.registration` for the environment switches.
"""

from mi_crow.ops import schemas as _schemas  # noqa: F401  (defines the op schemas before anything registers)
from mi_crow.ops.functional import DecodeWithAux, TopKCode, sparse_decode, sparse_decode_with_aux, topk_encode
from mi_crow.ops.reference import (
    gather_dot_ref,
    scatter_rows_ref,
    sparse_decode_backward_ref,
    sparse_decode_ref,
    sparse_decode_with_aux_backward_ref,
    sparse_decode_with_aux_ref,
    topk_encode_ref,
)
from mi_crow.ops.registration import CpuIsa, backends, cpu_isa

__all__ = [
    "CpuIsa",
    "DecodeWithAux",
    "TopKCode",
    "backends",
    "cpu_isa",
    "gather_dot_ref",
    "scatter_rows_ref",
    "sparse_decode",
    "sparse_decode_backward_ref",
    "sparse_decode_ref",
    "sparse_decode_with_aux",
    "sparse_decode_with_aux_backward_ref",
    "sparse_decode_with_aux_ref",
    "topk_encode",
    "topk_encode_ref",
]
