"""Gradients: gradcheck in float64, and a full TopK + AuxK training step against dense autograd."""

from __future__ import annotations

import pytest
import torch

import mi_crow.ops as ops
from mi_crow.ops import scatter_rows_ref

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


def _losses_fused(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux):
    # The same losses as _losses_fast with both decodes in sparse_decode_with_aux (one W_dec gradient).
    code = ops.topk_encode(x, W_enc, b_enc, b_dec, k, dead, k_aux)
    x_hat, e_hat = ops.sparse_decode_with_aux(
        code.values, code.indices, code.aux_values, code.aux_indices, W_dec, b_dec
    )
    mse = (x_hat - x).pow(2).mean()
    e = (x - x_hat).detach()
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


@pytest.mark.parametrize("losses_fast", [_losses_fast, _losses_fused], ids=["two_decodes", "decode_with_aux"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_full_step_with_auxk_matches_dense_autograd(dtype, tol, losses_fast):
    B, d, n, k, k_aux = 37, 48, 2100, 8, 16
    x, W_enc, b_enc, b_dec = make_encoder(B, d, n, dtype, seed=11)
    W_dec = (W_enc * 1.3).contiguous()
    dead = dead_mask(n)
    params_f = _leaf(W_enc, b_enc, W_dec, b_dec)
    params_d = _leaf(W_enc, b_enc, W_dec, b_dec)
    xf, xd = _leaf(x, x)
    mse_f, aux_f = losses_fast(xf, *params_f[:2], *params_f[2:], k, dead, k_aux)
    mse_d, aux_d = _losses_dense(xd, *params_d[:2], *params_d[2:], k, dead, k_aux)
    torch.testing.assert_close(mse_f, mse_d, atol=tol, rtol=tol)
    torch.testing.assert_close(aux_f, aux_d, atol=tol, rtol=tol)
    (mse_f + 0.5 * aux_f).backward()
    (mse_d + 0.5 * aux_d).backward()
    for name, a, b in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec"], [xf, *params_f], [xd, *params_d]):
        scale = b.grad.abs().max().item()
        torch.testing.assert_close(a.grad, b.grad, atol=tol * max(scale, 1.0), rtol=tol, msg=f"grad of {name}")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_auxk_step_gradients_with_aux_decode_equal_two_decodes(dtype, tol):
    # Same losses (bitwise: the forward runs the same sparse_decode kernel twice), and the same gradients; W_dec's
    # differs only by rounding, since the fused backward sums both codes' slots in one accumulator.
    B, d, n, k, k_aux = 57, 64, 1500, 16, 64
    x, W_enc, b_enc, b_dec = make_encoder(B, d, n, dtype, seed=12)
    W_dec = (W_enc * 0.7).contiguous()
    dead = dead_mask(n, frac=0.3)
    params_a = _leaf(W_enc, b_enc, W_dec, b_dec)
    params_b = _leaf(W_enc, b_enc, W_dec, b_dec)
    mse_a, aux_a = _losses_fused(x, *params_a, k, dead, k_aux)
    mse_b, aux_b = _losses_fast(x, *params_b, k, dead, k_aux)
    assert torch.equal(mse_a, mse_b) and torch.equal(aux_a, aux_b)
    (mse_a + aux_a / 32).backward()
    (mse_b + aux_b / 32).backward()
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec"], params_a, params_b):
        scale = b.grad.abs().max().item()
        torch.testing.assert_close(a.grad, b.grad, atol=tol * scale, rtol=tol, msg=f"grad of {name}")


def test_gradcheck_sparse_decode_with_aux():
    g = torch.Generator().manual_seed(5)
    values = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    indices = torch.randint(0, 7, (4, 3), generator=g)
    aux_values = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    aux_indices = torch.randint(0, 7, (4, 5), generator=g)
    aux_indices[:, 0] = indices[:, 0]
    W = torch.randn(7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    fn = lambda v, av, W, b: torch.ops.mi_crow.sparse_decode_with_aux(v, indices, av, aux_indices, W, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (values, aux_values, W, b))
    assert torch.autograd.gradgradcheck(fn, (values, aux_values, W, b))
    grad = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    aux_grad = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    bwd = lambda g, v, ag, av, W: torch.ops.mi_crow.sparse_decode_with_aux_backward(  # noqa: E731
        g, v, indices, ag, av, aux_indices, W
    )
    assert torch.autograd.gradcheck(bwd, (grad, values, aux_grad, aux_values, W))


def test_sparse_decode_with_aux_computes_only_requested_gradients():
    g = torch.Generator().manual_seed(6)
    values, aux_values = torch.rand(5, 3, generator=g), torch.rand(5, 4, generator=g)
    indices, aux_indices = torch.randint(0, 9, (5, 3), generator=g), torch.randint(0, 9, (5, 4), generator=g)
    W, b = torch.randn(9, 48, generator=g), torch.randn(48, generator=g)

    def grads(wanted: set[str], use_aux_output: bool = True) -> dict[str, torch.Tensor | None]:
        leaves = {"values": values, "aux_values": aux_values, "W_dec": W, "b_dec": b}
        leaves = {name: t.clone().requires_grad_(name in wanted) for name, t in leaves.items()}
        x_hat, aux_hat = ops.sparse_decode_with_aux(
            leaves["values"], indices, leaves["aux_values"], aux_indices, leaves["W_dec"], leaves["b_dec"]
        )
        loss = x_hat.pow(2).sum() + (aux_hat.pow(2).sum() if use_aux_output else 0)
        loss.backward()
        return {name: t.grad for name, t in leaves.items()}

    full = grads({"values", "aux_values", "W_dec", "b_dec"})
    for wanted in ({"W_dec"}, {"aux_values"}, {"values", "b_dec"}, {"values", "aux_values"}):
        got = grads(wanted)
        for name, grad in got.items():
            if name in wanted:
                torch.testing.assert_close(grad, full[name], atol=1e-5, rtol=1e-5, msg=name)
            else:
                assert grad is None, f"{name} got a gradient it did not ask for"
    # Only x_hat used: the aux code gets no gradient and W_dec only the main code's.
    main_only = grads({"values", "aux_values", "W_dec"}, use_aux_output=False)
    assert main_only["aux_values"] is None or bool((main_only["aux_values"] == 0).all())
    main_grad_w = scatter_rows_ref(values, indices, 2 * ops.sparse_decode(values, indices, W, b), 9)
    torch.testing.assert_close(main_only["W_dec"], main_grad_w, atol=1e-4, rtol=1e-5)


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
