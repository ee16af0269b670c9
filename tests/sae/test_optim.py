"""`step_in_backward`: the same update as backward-then-step, with at most one weight gradient alive at a time."""

from __future__ import annotations

import pytest
import torch

from mi_crow.mechanistic.sae.optim import step_in_backward
from mi_crow.ops import sparse_decode, topk_encode


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(300, 24, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return [
        torch.nn.Parameter(W_dec.clone() + 0.01 * torch.randn(300, 24, generator=g)),  # W_enc
        torch.nn.Parameter(0.01 * torch.randn(300, generator=g)),  # b_enc
        torch.nn.Parameter(W_dec),  # W_dec
        torch.nn.Parameter(0.01 * torch.randn(24, generator=g)),  # b_dec
    ]


def _loss(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    W_enc, b_enc, W_dec, b_dec = params
    dead = torch.arange(300) % 2 == 0
    code = topk_encode(x, W_enc, b_enc, b_dec, 8, dead, 16)
    x_hat = sparse_decode(code.values, code.indices, W_dec, b_dec)
    e_hat = sparse_decode(code.aux_values, code.aux_indices, W_dec, torch.zeros_like(b_dec))
    return (x_hat - x).pow(2).sum() + ((x - x_hat).detach() - e_hat).pow(2).sum() / 32


def _project(W: torch.Tensor) -> None:
    with torch.no_grad():
        W.grad.addcmul_((W.grad * W).sum(1, keepdim=True), W, value=-1.0)


def _renormalise(W: torch.Tensor) -> None:
    with torch.no_grad():
        W.div_(W.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("fused", [True, False])
def test_step_in_backward_equals_backward_then_step(fused):
    ref, fast = _params(), _params()
    opt_ref = torch.optim.Adam(ref, lr=1e-2, fused=fused, foreach=None if fused else False)
    opt_fast = torch.optim.Adam(fast, lr=1e-2, fused=fused, foreach=None if fused else False)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(37, 24, generator=g)
        opt_ref.zero_grad(set_to_none=True)
        _loss(ref, x).backward()
        _project(ref[2])
        opt_ref.step()
        _renormalise(ref[2])

        opt_fast.zero_grad(set_to_none=True)
        with step_in_backward(opt_fast, before_step={fast[2]: _project}, after_step={fast[2]: _renormalise}):
            _loss(fast, x).backward()
        for a, b in zip(ref, fast):
            assert torch.equal(a, b)
        assert all(p.grad is None for p in fast)
    # The optimizer state is the same too (so checkpoints do not depend on how the step was taken).
    for a, b in zip(ref, fast):
        for key, value in opt_ref.state[a].items():
            assert torch.equal(value, opt_fast.state[b][key]), key


def test_at_most_one_weight_gradient_alive():
    params = _params()
    opt = torch.optim.Adam(params, lr=1e-3)
    alive = []

    def record(_p: torch.Tensor) -> None:
        alive.append(sum(q.grad is not None for q in params))

    with step_in_backward(opt, before_step={p: record for p in params}):
        _loss(params, torch.randn(16, 24)).backward()
    assert alive == [1, 1, 1, 1]
    # Hooks are gone after the block: a plain backward leaves gradients in place.
    _loss(params, torch.randn(16, 24)).backward()
    assert all(p.grad is not None for p in params)


def test_step_in_backward_rejects_bad_input():
    params = _params()
    opt = torch.optim.Adam(params, lr=1e-3)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        with step_in_backward("adam"):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="before_step must be a parameter"):
        with step_in_backward(opt, before_step={torch.zeros(3): _project}):
            pass
    params[0].grad = torch.zeros_like(params[0])
    with pytest.raises(ValueError, match=r"shape \(300, 24\) already has a gradient"):
        with step_in_backward(opt):
            pass
