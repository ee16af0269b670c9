"""The fused top-k under exact ties and long candidate streams (the CPU kernel's running selection).

Integer-valued inputs make every pre-activation exact in float32, so equal values really are equal whatever order
the BLAS sums in. The contract is that of a stable descending sort: among equal values the lower latent index
wins, for the main code and for the aux code alike, and -0.0 ties with +0.0.
"""

from __future__ import annotations

import pytest
import torch

import mi_crow.ops as ops


def _integer_encoder(B: int, d: int, n: int, seed: int, levels: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-levels, levels + 1, (B, d), generator=g).float()
    W = torch.randint(-levels, levels + 1, (n, d), generator=g).float()
    return x, W, torch.zeros(n), torch.zeros(d)


def _stable_top(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Exact scores: a stable descending sort gives the lowest index first among equal values.
    order = torch.sort(pre, dim=1, descending=True, stable=True)
    return order.values[:, :k].clamp_min(0), order.indices[:, :k]


@pytest.mark.parametrize(
    "B,d,n,k,k_aux,levels",
    [
        (64, 48, 5000, 128, 256, 1),  # many exact ties, across tiles, buffers compacted many times
        (1, 48, 6150, 32, 300, 1),  # B = 1: the latent-split path, segments merged at the end
        (33, 16, 4099, 64, 512, 0),  # every pre-activation is 0 (levels 0): pure tie-breaking by index
        (300, 64, 2049, 7, 64, 3),
    ],
)
def test_topk_encode_breaks_ties_by_lowest_index(B, d, n, k, k_aux, levels):
    x, W, be, bd = _integer_encoder(B, d, n, seed=B + n, levels=levels)
    g = torch.Generator().manual_seed(n)
    dead = torch.rand(n, generator=g) < 0.5
    code = ops.topk_encode(x, W, be, bd, k, dead, k_aux)
    pre = x.double() @ W.double().t()  # exact: small integers
    values, indices = _stable_top(pre, k)
    assert torch.equal(code.indices, indices)
    assert torch.equal(code.values, values.float())
    masked = pre.masked_fill(~dead, float("-inf"))
    aux_values, aux_indices = _stable_top(masked, k_aux)
    assert torch.equal(code.aux_indices, aux_indices)
    assert torch.equal(code.aux_values, aux_values.float())


def test_topk_encode_negative_zero_ties_with_zero():
    # x = 0 gives pre-activations +0.0 or -0.0 depending on summation; with b_enc = -0.0 on some latents the
    # kernel must still treat them all as equal and pick the lowest indices.
    B, d, n, k = 5, 48, 3000, 40
    x = torch.zeros(B, d)
    W = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    be = torch.zeros(n)
    be[::3] = -0.0
    code = ops.topk_encode(x, W, be, torch.zeros(d), k)
    assert torch.equal(code.indices, torch.arange(k).expand(B, k))
    assert bool((code.values == 0).all())
