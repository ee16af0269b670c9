"""topk_encode with ``compute_dtype``: a low-precision encoder product on full-precision master weights.

The choice of latents must be the top-k of the pre-activations of the *rounded* operands, the values come back
in x's dtype, and every gradient is the full-precision one: computed from x and W_enc themselves, never from
the rounded copies (which the op does not keep).
"""

from __future__ import annotations

import pytest
import torch

import mi_crow.ops as ops
from mi_crow.ops import topk_encode_ref

from ._helpers import check_topk_choice, dead_mask, make_encoder

LOW = [torch.bfloat16, torch.float16]


def _rounded_pre(x, W, be, bd, dtype):  # type: ignore[no-untyped-def]
    """Float64 pre-activations of the operands rounded to ``dtype`` (the bias stays exact)."""
    return (x - bd).to(dtype).double() @ W.to(dtype).double().t() + be.double()


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("B,d,n,k,k_aux", [(1, 64, 2100, 32, 40), (65, 96, 2049, 16, 24), (7, 48, 300, 5, 0)])
def test_compute_dtype_selects_on_the_rounded_product(dtype, B, d, n, k, k_aux):
    x, W, be, bd = make_encoder(B, d, n, seed=B + k)
    dead = dead_mask(n) if k_aux else None
    code = ops.topk_encode(x, W, be, bd, k, dead, k_aux, compute_dtype=dtype)
    assert code.values.dtype == torch.float32
    pre = _rounded_pre(x, W, be, bd, dtype)
    check_topk_choice(code.values, code.indices, pre, atol=1e-4)
    ref = topk_encode_ref(x, W, be, bd, k, dead, k_aux, dtype)
    torch.testing.assert_close(code.values, ref[0], atol=1e-4, rtol=1e-4)
    if k_aux:
        check_topk_choice(code.aux_values, code.aux_indices, pre, atol=1e-4, allowed=dead)
        torch.testing.assert_close(code.aux_values, ref[2], atol=1e-4, rtol=1e-4)


def test_compute_dtype_equal_to_x_dtype_is_the_plain_op():
    x, W, be, bd = make_encoder(9, 48, 500)
    a = ops.topk_encode(x, W, be, bd, 8, compute_dtype=torch.float32)
    b = ops.topk_encode(x, W, be, bd, 8)
    assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)


def test_compute_dtype_gradients_are_full_precision():
    B, d, n, k, k_aux = 33, 48, 700, 6, 10
    x, W, be, bd = make_encoder(B, d, n, seed=3)
    be = be + 2.0  # every chosen pre-activation positive: no ReLU edge to disagree about
    dead = dead_mask(n)
    g = torch.Generator().manual_seed(4)
    R, Ra = torch.randn(B, k, generator=g), torch.randn(B, k_aux, generator=g)

    params = [t.clone().requires_grad_() for t in (W, be, bd)]
    code = ops.topk_encode(x, *params[:1], params[1], params[2], k, dead, k_aux, compute_dtype=torch.bfloat16)
    ((code.values * R).sum() + (code.aux_values * Ra).sum()).backward()

    # Reference: the same latents, their values recomputed densely in float32 with autograd.
    ref_params = [t.clone().requires_grad_() for t in (W, be, bd)]
    pre = (x - ref_params[2]) @ ref_params[0].t() + ref_params[1]
    loss = (pre.gather(1, code.indices).relu() * R).sum() + (pre.gather(1, code.aux_indices).relu() * Ra).sum()
    loss.backward()
    for got, ref, name in zip(params, ref_params, ("W_enc", "b_enc", "b_dec")):
        assert got.grad.dtype == torch.float32, name
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_compute_dtype_opcheck():
    x, W, be, bd = make_encoder(5, 48, 300)
    args = (x, W.requires_grad_(), be, bd, 4, dead_mask(300), 8, torch.bfloat16)
    torch.library.opcheck(torch.ops.mi_crow.topk_encode.default, args)


def test_compute_dtype_rejects_a_non_float_dtype():
    x, W, be, bd = make_encoder(2, 48, 100)
    with pytest.raises(TypeError, match=r"compute_dtype must be .*got torch.int32"):
        ops.topk_encode(x, W, be, bd, 4, compute_dtype=torch.int32)
