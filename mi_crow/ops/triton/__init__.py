"""Triton kernels for the ``mi_crow`` SAE ops (the CUDA implementations), one module per op family.

- :mod:`.encode`: ``topk_encode`` (the fused encode + running top-k, and its chunked path for large k);
- :mod:`.sorting`: the sortable keys and the bitonic top-k network the encode keeps in registers;
- :mod:`.decode`: ``sparse_decode``;
- :mod:`.backward`: ``gather_dot`` and ``scatter_rows``, the decoder's gradients;
- :mod:`.common`: argument checks (on :mod:`mi_crow.ops.checks`), launch sizes and in-kernel rounding.

Each op has a ``_<op>_kernel`` Triton kernel and a ``<op>_triton`` launcher with exactly the op's schema
signature: plain functions that take and return tensors. ``mi_crow.ops`` registers the launchers for the CUDA
dispatch key; importing this package requires ``triton`` (the registration code imports it inside ``try``).

The launchers accept CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` is set before triton is imported
(that is how the kernels are checked on machines without a GPU). Float tensors may be float32, bfloat16 or
float16; every kernel accumulates in float32. Output dtypes follow the references in :mod:`mi_crow.ops.reference`.
float64 inputs (used by ``gradcheck``) are served by those references, since the kernels rank and accumulate in
float32.
"""

from mi_crow.ops.triton.backward import gather_dot_triton, scatter_rows_triton
from mi_crow.ops.triton.decode import sparse_decode_triton
from mi_crow.ops.triton.encode import topk_encode_triton

__all__ = [
    "gather_dot_triton",
    "scatter_rows_triton",
    "sparse_decode_triton",
    "topk_encode_triton",
]
