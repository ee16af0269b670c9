"""torch.library.opcheck for every op (schema, autograd registration, fake tensor, AOT dispatch) and one
torch.compile(fullgraph=True) smoke test."""

from __future__ import annotations

import pytest
import torch

import mi_crow.ops as ops

from ._helpers import dead_mask, make_encoder


def _enc_args(with_aux: bool) -> tuple:
    x, W, be, bd = (t.requires_grad_(True) for t in make_encoder(5, 48, 67, seed=4))
    return (x, W, be, bd, 4, dead_mask(67) if with_aux else None, 6 if with_aux else 0)


def _code_args() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 4, generator=g), torch.randint(0, 67, (5, 4), generator=g)


@pytest.mark.parametrize("with_aux", [False, True])
def test_opcheck_topk_encode(with_aux):
    torch.library.opcheck(torch.ops.mi_crow.topk_encode.default, _enc_args(with_aux))


def test_opcheck_decode_ops():
    values, indices = _code_args()
    W = torch.randn(67, 48, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    grad = torch.randn(5, 48, requires_grad=True)
    torch.library.opcheck(torch.ops.mi_crow.sparse_decode.default, (values.requires_grad_(True), indices, W, b))
    torch.library.opcheck(torch.ops.mi_crow.gather_dot.default, (grad, indices, W))
    torch.library.opcheck(torch.ops.mi_crow.scatter_rows.default, (values, indices, grad, 67))
    torch.library.opcheck(torch.ops.mi_crow.sparse_decode_backward.default, (grad, values, indices, W))


@pytest.mark.parametrize("k_aux", [0, 6])
def test_opcheck_decode_with_aux_ops(k_aux):
    values, indices = _code_args()
    g = torch.Generator().manual_seed(1)
    aux_values = torch.randn(5, k_aux, generator=g)
    aux_indices = torch.randint(0, 67, (5, k_aux), generator=g)
    W = torch.randn(67, 48, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    grad = torch.randn(5, 48, requires_grad=True)
    aux_grad = torch.randn(5, 48, requires_grad=True)
    torch.library.opcheck(
        torch.ops.mi_crow.sparse_decode_with_aux.default,
        (values.requires_grad_(True), indices, aux_values.requires_grad_(True), aux_indices, W, b),
    )
    torch.library.opcheck(
        torch.ops.mi_crow.sparse_decode_with_aux_backward.default,
        (grad, values, indices, aux_grad, aux_values, aux_indices, W),
    )


def test_compile_fullgraph_step_matches_eager():
    x, W_enc, b_enc, b_dec = make_encoder(9, 48, 100, seed=6)
    W_dec = W_enc.clone()
    dead = dead_mask(100)

    def step(x, W_enc, b_enc, W_dec, b_dec):
        code = ops.topk_encode(x, W_enc, b_enc, b_dec, 4, dead, 8)
        x_hat = ops.sparse_decode(code.values, code.indices, W_dec, b_dec)
        aux = ops.sparse_decode(code.aux_values, code.aux_indices, W_dec, torch.zeros_like(b_dec))
        return (x_hat - x).pow(2).mean() + aux.pow(2).mean()

    # aot_eager traces the whole graph (dynamo fullgraph + AOTAutograd through the fake kernels and the
    # registered backward) without the ~30 s C++ codegen of inductor on a 2-core machine.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_params = [t.clone().requires_grad_(True) for t in (W_enc, b_enc, W_dec, b_dec)]
    comp_params = [t.clone().requires_grad_(True) for t in (W_enc, b_enc, W_dec, b_dec)]
    loss_e = step(x, eager_params[0], eager_params[1], eager_params[2], eager_params[3])
    loss_c = compiled(x, comp_params[0], comp_params[1], comp_params[2], comp_params[3])
    torch.testing.assert_close(loss_c, loss_e)
    loss_e.backward()
    loss_c.backward()
    for a, b in zip(comp_params, eager_params):
        torch.testing.assert_close(a.grad, b.grad)


def test_compile_fullgraph_step_with_aux_decode_matches_eager():
    x, W_enc, b_enc, b_dec = make_encoder(9, 48, 100, seed=7)
    W_dec = W_enc.clone()
    dead = dead_mask(100)

    def step(x, W_enc, b_enc, W_dec, b_dec):
        code = ops.topk_encode(x, W_enc, b_enc, b_dec, 4, dead, 8)
        x_hat, aux = ops.sparse_decode_with_aux(code.values, code.indices, code.aux_values, code.aux_indices, W_dec,
                                                b_dec)
        return (x_hat - x).pow(2).mean() + (aux - (x - x_hat).detach()).pow(2).mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_params = [t.clone().requires_grad_(True) for t in (W_enc, b_enc, W_dec, b_dec)]
    comp_params = [t.clone().requires_grad_(True) for t in (W_enc, b_enc, W_dec, b_dec)]
    loss_e = step(x, *eager_params)
    loss_c = compiled(x, *comp_params)
    torch.testing.assert_close(loss_c, loss_e)
    loss_e.backward()
    loss_c.backward()
    for a, b in zip(comp_params, eager_params):
        torch.testing.assert_close(a.grad, b.grad)
