"""The one place where the ``mi_crow`` operator schemas are declared.

Every implementation (reference, C++ CPU, Triton, CUDA C++) registers a kernel for exactly these signatures.
Shapes: tokens ``B``, input width ``d``, latents ``n``, active ``k``.
"""

from __future__ import annotations

import torch

NAMESPACE = "mi_crow"

SCHEMAS: dict[str, str] = {
    # x [B, d], W_enc [n, d], b_enc [n], b_dec [d] -> values [B, k], indices [B, k] int64,
    # aux_values [B, k_aux], aux_indices [B, k_aux] (both [B, 0] when k_aux == 0 or dead_mask is None).
    "topk_encode": (
        "topk_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor b_dec, int k, Tensor? dead_mask, int k_aux,"
        " ScalarType? compute_dtype=None)"
        " -> (Tensor values, Tensor indices, Tensor aux_values, Tensor aux_indices)"
    ),
    # values [B, k'], indices [B, k'] int64, W_dec [n, d], b_dec [d] -> x_hat [B, d]
    "sparse_decode": "sparse_decode(Tensor values, Tensor indices, Tensor W_dec, Tensor b_dec) -> Tensor",
    # grad_out [B, d], indices [B, k], W [n, d] -> [B, k]
    "gather_dot": "gather_dot(Tensor grad_out, Tensor indices, Tensor W) -> Tensor",
    # coef [B, k], indices [B, k], x [B, d] -> [n, d]
    "scatter_rows": "scatter_rows(Tensor coef, Tensor indices, Tensor x, int n) -> Tensor",
    # Both gradients of sparse_decode in one pass (CPU kernel groups by latent; elsewhere the reference composes
    # gather_dot and scatter_rows, so it runs on their kernels):
    # grad_out [B, d], values [B, k], indices [B, k], W_dec [n, d] -> grad_values [B, k], grad_W_dec [n, d]
    "sparse_decode_backward": (
        "sparse_decode_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor W_dec)"
        " -> (Tensor grad_values, Tensor grad_W_dec)"
    ),
    # The AuxK step's two decodes of one W_dec, so that their backward is one op with one decoder gradient:
    # values/indices [B, k], aux_values/aux_indices [B, k_aux], W_dec [n, d], b_dec [d]
    # -> x_hat [B, d] (with b_dec), aux_hat [B, d] (no bias). A composite of two sparse_decode calls.
    "sparse_decode_with_aux": (
        "sparse_decode_with_aux(Tensor values, Tensor indices, Tensor aux_values, Tensor aux_indices,"
        " Tensor W_dec, Tensor b_dec) -> (Tensor x_hat, Tensor aux_hat)"
    ),
    # Its gradients in one pass (CPU kernel groups both codes' slots by latent; elsewhere the reference adds two
    # sparse_decode_backward results): grad_out/aux_grad_out [B, d] -> grad_values [B, k],
    # aux_grad_values [B, k_aux], grad_W_dec [n, d] (main and aux contributions summed).
    "sparse_decode_with_aux_backward": (
        "sparse_decode_with_aux_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor aux_grad_out,"
        " Tensor aux_values, Tensor aux_indices, Tensor W_dec)"
        " -> (Tensor grad_values, Tensor aux_grad_values, Tensor grad_W_dec)"
    ),
}

OP_NAMES: tuple[str, ...] = tuple(SCHEMAS)

# Kept alive for the life of the process: dropping a Library object unregisters what it defined.
LIB = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    LIB.define(_schema)


def qualname(op: str) -> str:
    """Return the fully qualified operator name, e.g. ``"mi_crow::topk_encode"``."""
    return f"{NAMESPACE}::{op}"
