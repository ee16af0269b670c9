"""The Triton kernels' former single module, kept as an import path: they now live in :mod:`mi_crow.ops.triton`
(one module per op family). The launchers, and the kernels and helpers that tests and benchmarks reach for, are
re-exported here under their old names."""

from mi_crow.ops.triton import gather_dot_triton, scatter_rows_triton, sparse_decode_triton, topk_encode_triton
from mi_crow.ops.triton.backward import _gather_dot_kernel, _scatter_rows_kernel  # noqa: F401
from mi_crow.ops.triton.common import next_pow2 as _next_pow2  # noqa: F401
from mi_crow.ops.triton.decode import _sparse_decode_kernel  # noqa: F401
from mi_crow.ops.triton.encode import _topk_encode_kernel, _topk_finalize_kernel  # noqa: F401
from mi_crow.ops.triton.encode import encode_blocks as _encode_blocks  # noqa: F401

__all__ = ["gather_dot_triton", "scatter_rows_triton", "sparse_decode_triton", "topk_encode_triton"]
