"""Gradients: gradcheck in float64, and a full TopK + AuxK training step against dense autograd."""

from __future__ import annotations

import pytest
import torch

import mi_crow.ops as ops

from ._helpers import dead_mask, make_encoder


def _leaf(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def test_gradcheck_topk_encode_with_aux():
    x, W, be, bd = _leaf(*make_encoder(3, 6, 11, torch.float64, seed=2))
    dead = dead_mask(11)
    fn = lambda x, W, be, bd: torch.ops.mi_crow.topk_encode(x, W, be, bd, 3, dead, 2)[0::2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, W, be, bd))


def test_gradcheck_sparse_decode():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    indices = torch.randint(0, 7, (4, 3), generator=g)
    W = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.mi_crow.sparse_decode, (values, indices, W, b))


def test_gradcheck_gather_dot_and_scatter_rows():
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    coef = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    indices = torch.randint(0, 6, (4, 3), generator=g)
    W = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.mi_crow.gather_dot, (grad, indices, W))
    assert torch.autograd.gradcheck(lambda c, x: torch.ops.mi_crow.scatter_rows(c, indices, x, 6), (coef, grad))
    fused = lambda g, c, W: torch.ops.mi_crow.sparse_decode_backward(g, c, indices, W)  # noqa: E731
    assert torch.autograd.gradcheck(fused, (grad, coef, W))
    # Second order: the backward is built from the ops themselves, so it is differentiable too.
    assert torch.autograd.gradgradcheck(torch.ops.mi_crow.sparse_decode, (coef, indices, W, grad[0]))


def _losses_fast(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux):
    code = ops.topk_encode(x, W_enc, b_enc, b_dec, k, dead, k_aux)
    x_hat = ops.sparse_decode(code.values, code.indices, W_dec, b_dec)
    mse = (x_hat - x).pow(2).mean()
    # AuxK: the dead latents reconstruct the residual; the decoder bias is already in x_hat.
    e = (x - x_hat).detach()
    e_hat = ops.sparse_decode(code.aux_values, code.aux_indices, W_dec, torch.zeros_like(b_dec))
    return mse, (e_hat - e).pow(2).mean()


def _losses_dense(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux):
    pre = (x - b_dec) @ W_enc.t() + b_enc
    top = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    x_hat = z @ W_dec + b_dec
    mse = (x_hat - x).pow(2).mean()
    aux_top = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, aux_top.indices, torch.relu(aux_top.values))
    e = (x - x_hat).detach()
    return mse, (z_aux @ W_dec - e).pow(2).mean()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_full_step_with_auxk_matches_dense_autograd(dtype, tol):
    B, d, n, k, k_aux = 37, 48, 2100, 8, 16
    x, W_enc, b_enc, b_dec = make_encoder(B, d, n, dtype, seed=11)
    W_dec = (W_enc * 1.3).contiguous()
    dead = dead_mask(n)
    params_f = _leaf(W_enc, b_enc, W_dec, b_dec)
    params_d = _leaf(W_enc, b_enc, W_dec, b_dec)
    xf, xd = _leaf(x, x)
    mse_f, aux_f = _losses_fast(xf, *params_f[:2], *params_f[2:], k, dead, k_aux)
    mse_d, aux_d = _losses_dense(xd, *params_d[:2], *params_d[2:], k, dead, k_aux)
    torch.testing.assert_close(mse_f, mse_d, atol=tol, rtol=tol)
    torch.testing.assert_close(aux_f, aux_d, atol=tol, rtol=tol)
    (mse_f + 0.5 * aux_f).backward()
    (mse_d + 0.5 * aux_d).backward()
    for name, a, b in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec"], [xf, *params_f], [xd, *params_d]):
        scale = b.grad.abs().max().item()
        torch.testing.assert_close(a.grad, b.grad, atol=tol * max(scale, 1.0), rtol=tol, msg=f"grad of {name}")


def test_auxk_loss_reaches_the_encoder():
    B, d, n, k, k_aux = 16, 48, 300, 4, 8
    x, W_enc, b_enc, b_dec = make_encoder(B, d, n, torch.float64, seed=3)
    dead = dead_mask(n)
    W_enc, b_enc = _leaf(W_enc, b_enc)
    W_dec = torch.randn(n, d, dtype=torch.float64)
    code = ops.topk_encode(x, W_enc, b_enc, b_dec, k, dead, k_aux)
    e_hat = ops.sparse_decode(code.aux_values, code.aux_indices, W_dec, torch.zeros_like(b_dec))
    e_hat.pow(2).sum().backward()
    active_aux = code.aux_indices[code.aux_values > 0].unique()
    assert active_aux.numel() > 0
    assert bool(dead[active_aux].all())
    row_norm = W_enc.grad.norm(dim=1)
    assert bool((row_norm[active_aux] > 0).all()), "AuxK gradient did not reach the dead latents' encoder rows"
    assert bool((b_enc.grad[active_aux] != 0).all())
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[active_aux] = False
    assert bool((row_norm[untouched] == 0).all()), "AuxK gradient leaked into latents it did not select"


def test_backward_computes_only_requested_gradients():
    x, W_enc, b_enc, b_dec = make_encoder(9, 48, 100)
    W_enc = W_enc.requires_grad_(True)
    code = ops.topk_encode(x, W_enc, b_enc, b_dec, 5)
    code.values.sum().backward()
    assert W_enc.grad is not None and x.grad is None and b_enc.grad is None and b_dec.grad is None
    dense = torch.zeros(9, 100).scatter(1, code.indices, torch.ones(9, 5) * (code.values > 0))
    torch.testing.assert_close(W_enc.grad, dense.t() @ (x - b_dec), atol=1e-5, rtol=1e-5)
