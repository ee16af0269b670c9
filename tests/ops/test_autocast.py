"""``torch.autocast`` engages the low-precision encoder product of ``topk_encode``.

Inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` a float32 ``topk_encode`` must compute exactly what an
explicit ``compute_dtype=torch.bfloat16`` computes (values, indices, gradients), which differs from the float32
result; float64 work, an explicit ``compute_dtype`` and code outside the region are left alone. The same through
``TopKSae`` and a training step's losses and gradients.
"""

from __future__ import annotations

import pytest
import torch

import mi_crow.ops as ops
from mi_crow.mechanistic.sae.sae import TopKSae
from mi_crow.mechanistic.sae.train.step import SaeStepper

from ._helpers import dead_mask, make_encoder

LOW = [torch.bfloat16, torch.float16]


def _same_code(a, b) -> bool:  # type: ignore[no-untyped-def]
    return torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("dtype", LOW)
def test_autocast_runs_the_low_precision_product(dtype):
    x, W, be, bd = make_encoder(70, 64, 2100, seed=11)
    dead = dead_mask(2100)
    explicit = ops.topk_encode(x, W, be, bd, 16, dead, 24, compute_dtype=dtype)
    full = ops.topk_encode(x, W, be, bd, 16, dead, 24)
    with torch.autocast("cpu", dtype=dtype):
        auto = ops.topk_encode(x, W, be, bd, 16, dead, 24)
    assert auto.values.dtype == torch.float32
    assert _same_code(auto, explicit)
    assert torch.equal(auto.aux_values, explicit.aux_values) and torch.equal(auto.aux_indices, explicit.aux_indices)
    # The low-precision product really ran: the values differ from the float32 ones.
    assert not torch.equal(auto.values, full.values)
    # Outside the region, float32 again.
    assert _same_code(ops.topk_encode(x, W, be, bd, 16, dead, 24), full)


def test_autocast_gradients_are_the_explicit_ones():
    B, d, n, k = 40, 48, 900, 8
    x, W, be, bd = make_encoder(B, d, n, seed=5)
    be = be + 2.0  # every chosen value positive: no ReLU edge
    R = torch.randn(B, k, generator=torch.Generator().manual_seed(2))

    def grads(autocast: bool, compute_dtype):  # type: ignore[no-untyped-def]
        params = [t.clone().requires_grad_() for t in (x, W, be, bd)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            code = ops.topk_encode(*params, k, compute_dtype=compute_dtype)
        (code.values * R).sum().backward()
        return [p.grad for p in params]

    auto, explicit = grads(True, None), grads(False, torch.bfloat16)
    for a, e in zip(auto, explicit):
        assert a.dtype == torch.float32
        assert torch.equal(a, e)


def test_autocast_leaves_float64_and_explicit_dtypes_alone():
    x, W, be, bd = make_encoder(20, 32, 500, dtype=torch.float64, seed=3)
    plain = ops.topk_encode(x, W, be, bd, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ops.topk_encode(x, W, be, bd, 6)
    assert auto.values.dtype == torch.float64 and _same_code(auto, plain)

    x, W, be, bd = (t.float() for t in (x, W, be, bd))
    fp16 = ops.topk_encode(x, W, be, bd, 6, compute_dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = ops.topk_encode(x, W, be, bd, 6, compute_dtype=torch.float16)
    assert _same_code(kept, fp16)


def test_autocast_through_the_sae_and_a_training_step():
    torch.manual_seed(0)
    sae = TopKSae(n_latents=1500, n_inputs=64, k=8)
    x = torch.randn(96, 64)
    with torch.no_grad():
        explicit = ops.topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, 8, compute_dtype=torch.bfloat16)
        full = sae.encode(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae(x)
    assert torch.equal(out.code.values, explicit.values) and torch.equal(out.code.indices, explicit.indices)
    assert not torch.equal(out.code.values, full.values)
    assert out.reconstruction.dtype == torch.float32

    # A step's losses and gradients under autocast are those of encode_dtype=bfloat16.
    stepper = SaeStepper(sae)

    def loss_and_grads(autocast: bool, encode_dtype):  # type: ignore[no-untyped-def]
        sae.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = stepper.compute_losses(x, encode_dtype=encode_dtype).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]

    loss_a, grads_a = loss_and_grads(True, None)
    loss_e, grads_e = loss_and_grads(False, torch.bfloat16)
    loss_f, _ = loss_and_grads(False, None)
    assert torch.equal(loss_a, loss_e) and not torch.equal(loss_a, loss_f)
    for a, e in zip(grads_a, grads_e):
        assert torch.equal(a, e)


def test_autocast_kernels_are_registered_for_cpu_and_cuda():
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("mi_crow::topk_encode", key), key
