"""Each op (through the dispatcher: the C++ kernel on CPU when built) against its reference.

Sizes cover powers of two and odd widths, latent counts that are not a multiple of the kernel's tile (2048),
k from 1 to 128 and B = 1 (which takes the latent-split path) and odd. fp32 uses tight tolerances; bf16/fp16
are judged against PyTorch's own error in that dtype.
"""

from __future__ import annotations

import pytest
import torch

import mi_crow.ops as ops
from mi_crow.ops import (
    gather_dot_ref,
    scatter_rows_ref,
    sparse_decode_ref,
    sparse_decode_with_aux_backward_ref,
    topk_encode_ref,
)

from ._helpers import check_topk_choice, dead_mask, dense_code, make_encoder, pre_activations

SHAPES = [  # (B, d, n, k, k_aux)
    (1, 48, 2100, 1, 3),
    (1, 64, 4099, 128, 256),
    (7, 96, 301, 32, 64),
    (257, 64, 2049, 7, 16),
    (33, 48, 4096, 128, 100),
]
LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("B,d,n,k,k_aux", SHAPES)
def test_topk_encode_fp32(B, d, n, k, k_aux):
    x, W, be, bd = make_encoder(B, d, n, seed=B + n)
    dead = dead_mask(n)
    code = ops.topk_encode(x, W, be, bd, k, dead, k_aux)
    ref = topk_encode_ref(x, W, be, bd, k, dead, k_aux)
    torch.testing.assert_close(code.values, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(code.aux_values, ref[2], atol=1e-5, rtol=1e-5)
    pre = pre_activations(x, W, be, bd)
    check_topk_choice(code.values, code.indices, pre, atol=1e-4)
    check_topk_choice(code.aux_values, code.aux_indices, pre, atol=1e-4, allowed=dead)
    assert code.indices.dtype == torch.int64 and code.aux_indices.dtype == torch.int64


def test_topk_encode_without_aux_returns_none():
    x, W, be, bd = make_encoder(5, 48, 300)
    code = ops.topk_encode(x, W, be, bd, 8)
    ref = topk_encode_ref(x, W, be, bd, 8, None, 0)
    assert code.aux_values is None and code.aux_indices is None
    torch.testing.assert_close(code.values, ref[0], atol=1e-5, rtol=1e-5)
    raw = torch.ops.mi_crow.topk_encode(x, W, be, bd, 8, dead_mask(300), 0)
    assert raw[2].shape == (5, 0) and raw[3].shape == (5, 0)


def test_topk_encode_pads_aux_with_zero_index_zero():
    x, W, be, bd = make_encoder(9, 48, 2500)
    dead = torch.zeros(2500, dtype=torch.bool)
    dead[[5, 2049, 2499]] = True  # dead latents in two different tiles
    code = ops.topk_encode(x, W, be, bd, 4, dead, 8)
    ref = topk_encode_ref(x, W, be, bd, 4, dead, 8)
    torch.testing.assert_close(code.aux_values, ref[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(code.aux_indices[:, 3:], ref[3][:, 3:])
    assert set(code.aux_indices[:, :3].flatten().tolist()) <= {5, 2049, 2499}


def test_topk_encode_values_are_relu_clipped():
    x, W, be, bd = make_encoder(11, 48, 64)
    be = be - 10.0  # almost every pre-activation negative: the top-k must still be filled, with zeros
    code = ops.topk_encode(x, W, be, bd, 16)
    assert bool((code.values >= 0).all()) and bool((code.values == 0).any())
    check_topk_choice(code.values, code.indices, pre_activations(x, W, be, bd), atol=1e-4)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("B,d,n,k", [(1, 64, 2100, 32), (65, 96, 2049, 16)])
def test_topk_encode_low_precision(dtype, B, d, n, k):
    x, W, be, bd = make_encoder(B, d, n, dtype=dtype, seed=5)
    dead = dead_mask(n)
    code = ops.topk_encode(x, W, be, bd, k, dead, 24)
    truth = topk_encode_ref(*(t.double() for t in (x, W, be, bd)), k, dead, 24)
    torch_lp = topk_encode_ref(x, W, be, bd, k, dead, 24)
    assert code.values.dtype == dtype
    for got, lp, ref in ((code.values, torch_lp[0], truth[0]), (code.aux_values, torch_lp[2], truth[2])):
        err = (got.double() - ref).abs().max().item()
        torch_err = (lp.double() - ref).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, f"kernel error {err} vs PyTorch {dtype} error {torch_err}"


def _code(B: int, k: int, n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, k, generator=g, dtype=torch.float64).abs().to(dtype)
    indices = torch.randint(0, n, (B, k), generator=g)  # repeats allowed: a modified code may repeat latents
    return values, indices


DECODE_SHAPES = [(1, 1, 48, 37), (7, 32, 64, 4099), (31, 128, 96, 300), (64, 5, 48, 7)]


@pytest.mark.parametrize("B,k,d,n", DECODE_SHAPES)
def test_sparse_decode_fp32(B, k, d, n):
    values, indices = _code(B, k, n, torch.float32, seed=B)
    W = torch.randn(n, d)
    b = torch.randn(d)
    out = ops.sparse_decode(values, indices, W, b)
    torch.testing.assert_close(out, sparse_decode_ref(values, indices, W, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), dense_code(values, indices, n) @ W.double() + b.double(),
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("B,k,d,n", DECODE_SHAPES)
def test_gather_dot_and_scatter_rows_fp32(B, k, d, n):
    values, indices = _code(B, k, n, torch.float32, seed=B + 1)
    W = torch.randn(n, d)
    grad = torch.randn(B, d)
    gd = torch.ops.mi_crow.gather_dot(grad, indices, W)
    torch.testing.assert_close(gd, gather_dot_ref(grad, indices, W), atol=1e-4, rtol=1e-5)
    sr = torch.ops.mi_crow.scatter_rows(values, indices, grad, n)
    torch.testing.assert_close(sr, scatter_rows_ref(values, indices, grad, n), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("B,k,d,n", DECODE_SHAPES)
def test_sparse_decode_backward_matches_its_two_references(B, k, d, n):
    values, indices = _code(B, k, n, torch.float32, seed=B + 2)
    W = torch.randn(n, d)
    grad = torch.randn(B, d)
    gv, gw = torch.ops.mi_crow.sparse_decode_backward(grad, values, indices, W)
    torch.testing.assert_close(gv, gather_dot_ref(grad, indices, W), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gw, scatter_rows_ref(values, indices, grad, n), atol=1e-4, rtol=1e-5)


def test_scatter_rows_is_deterministic():
    values, indices = _code(301, 64, 50, torch.float32, seed=9)  # heavy collisions on few latents
    x = torch.randn(301, 96)
    first = torch.ops.mi_crow.scatter_rows(values, indices, x, 50)
    for _ in range(3):
        assert torch.equal(torch.ops.mi_crow.scatter_rows(values, indices, x, 50), first)


@pytest.mark.parametrize("dtype", LOW)
def test_decode_ops_low_precision(dtype):
    B, k, d, n = 33, 32, 96, 1000
    values, indices = _code(B, k, n, dtype, seed=4)
    W = torch.randn(n, d).to(dtype)
    b = torch.randn(d).to(dtype)
    grad = torch.randn(B, d).to(dtype)
    Z = dense_code(values, indices, n)
    cases = [  # (kernel result, PyTorch in dtype, float64 truth)
        (ops.sparse_decode(values, indices, W, b),
         Z.to(dtype) @ W + b,
         Z @ W.double() + b.double()),
        (torch.ops.mi_crow.gather_dot(grad, indices, W),
         (grad @ W.t()).gather(1, indices),
         (grad.double() @ W.double().t()).gather(1, indices)),
        (torch.ops.mi_crow.scatter_rows(values, indices, grad, n),
         Z.to(dtype).t() @ grad,
         Z.t() @ grad.double()),
        (torch.ops.mi_crow.sparse_decode_backward(grad, values, indices, W)[0],
         (grad @ W.t()).gather(1, indices),
         (grad.double() @ W.double().t()).gather(1, indices)),
        (torch.ops.mi_crow.sparse_decode_backward(grad, values, indices, W)[1],
         Z.to(dtype).t() @ grad,
         Z.t() @ grad.double()),
    ]
    for got, lp, truth in cases:
        assert got.dtype == dtype
        err = (got.double() - truth).abs().max().item()
        torch_err = (lp.double() - truth).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, f"kernel error {err} vs PyTorch {dtype} error {torch_err}"


# ---------------------------------------------------------------------------------------------------------------
# sparse_decode_with_aux and its fused backward (main + aux code, one decoder gradient)
# ---------------------------------------------------------------------------------------------------------------
WITH_AUX_SHAPES = [  # (B, k, k_aux, d, n)
    (1, 1, 0, 48, 37),
    (1, 128, 256, 64, 4099),
    (7, 32, 64, 96, 301),
    (31, 5, 256, 48, 1000),
    (64, 128, 3, 96, 7),  # every latent selected many times, by both codes
    (33, 16, 0, 64, 2049),
    (0, 4, 8, 64, 50),
]


def _aux_case(B: int, k: int, k_aux: int, d: int, n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    values, indices = _code(B, k, n, dtype, seed)
    aux_values, aux_indices = _code(B, k_aux, n, dtype, seed + 1)
    if k_aux >= 2 and k >= 1:
        aux_indices[:, 0] = indices[:, 0]  # the same latent in the main and the aux code of a token
        aux_indices[:, 1] = aux_indices[:, 0]  # and twice within the aux code
    g = torch.Generator().manual_seed(seed + 2)
    W = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype)
    aux_grad = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype)
    return grad, values, indices, aux_grad, aux_values, aux_indices, W


def _aux_truth(grad, values, indices, aux_grad, aux_values, aux_indices, W):  # type: ignore[no-untyped-def]
    """Float64 dense gradients: (grad_values, aux_grad_values, grad_W_dec)."""
    n = W.shape[0]
    G, Ga, W64 = grad.double(), aux_grad.double(), W.double()
    Z, Za = dense_code(values, indices, n), dense_code(aux_values, aux_indices, n)
    return (
        (G @ W64.t()).gather(1, indices),
        (Ga @ W64.t()).gather(1, aux_indices),
        Z.t() @ G + Za.t() @ Ga,
    )


@pytest.mark.parametrize("B,k,k_aux,d,n", WITH_AUX_SHAPES)
def test_sparse_decode_with_aux_backward_fp32(B, k, k_aux, d, n):
    case = _aux_case(B, k, k_aux, d, n, torch.float32, seed=B + k + k_aux)
    got = torch.ops.mi_crow.sparse_decode_with_aux_backward(*case)
    ref = sparse_decode_with_aux_backward_ref(*case)
    truth = _aux_truth(*case)
    for name, a, r, t in zip(("grad_values", "aux_grad_values", "grad_W_dec"), got, ref, truth):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-5, msg=name)
        torch.testing.assert_close(a.double(), t, atol=1e-4, rtol=1e-5, msg=name)


@pytest.mark.parametrize("B,k,k_aux,d,n", WITH_AUX_SHAPES)
def test_sparse_decode_with_aux_is_two_sparse_decodes(B, k, k_aux, d, n):
    _, values, indices, _, aux_values, aux_indices, W = _aux_case(B, k, k_aux, d, n, torch.float32, seed=3)
    b = torch.randn(d)
    x_hat, aux_hat = ops.sparse_decode_with_aux(values, indices, aux_values, aux_indices, W, b)
    assert torch.equal(x_hat, ops.sparse_decode(values, indices, W, b))
    assert torch.equal(aux_hat, ops.sparse_decode(aux_values, aux_indices, W, torch.zeros_like(b)))


def test_sparse_decode_with_aux_backward_float64():
    case = _aux_case(19, 9, 40, 48, 123, torch.float64, seed=7)
    for name, a, t in zip(("grad_values", "aux_grad_values", "grad_W_dec"),
                          torch.ops.mi_crow.sparse_decode_with_aux_backward(*case), _aux_truth(*case)):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, t, atol=1e-12, rtol=1e-12, msg=name)


def test_sparse_decode_with_aux_backward_is_deterministic():
    # Heavy collisions on few latents, and the same result whatever the number of threads.
    case = _aux_case(301, 64, 200, 96, 50, torch.float32, seed=9)
    first = torch.ops.mi_crow.sparse_decode_with_aux_backward(*case)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, threads):
            torch.set_num_threads(n_threads)
            again = torch.ops.mi_crow.sparse_decode_with_aux_backward(*case)
            assert all(torch.equal(a, b) for a, b in zip(again, first)), f"differs with {n_threads} threads"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", LOW)
def test_sparse_decode_with_aux_backward_low_precision(dtype):
    case = _aux_case(33, 32, 96, 96, 1000, dtype, seed=4)
    grad, values, indices, aux_grad, aux_values, aux_indices, W = case
    Z, Za = dense_code(values, indices, 1000).to(dtype), dense_code(aux_values, aux_indices, 1000).to(dtype)
    torch_lp = (  # plain PyTorch in dtype
        (grad @ W.t()).gather(1, indices),
        (aux_grad @ W.t()).gather(1, aux_indices),
        Z.t() @ grad + Za.t() @ aux_grad,
    )
    got = torch.ops.mi_crow.sparse_decode_with_aux_backward(*case)
    for name, a, lp, truth in zip(("grad_values", "aux_grad_values", "grad_W_dec"), got, torch_lp, _aux_truth(*case)):
        assert a.dtype == dtype, name
        err = (a.double() - truth).abs().max().item()
        torch_err = (lp.double() - truth).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, f"{name}: kernel error {err} vs PyTorch {dtype} error {torch_err}"
