"""The references are the specification: check them against independent dense formulations."""

from __future__ import annotations

import pytest
import torch

from mi_crow.ops import gather_dot_ref, scatter_rows_ref, sparse_decode_ref, topk_encode_ref

from ._helpers import check_topk_choice, dead_mask, dense_code, make_encoder, pre_activations


@pytest.mark.parametrize("B,d,n,k", [(1, 48, 37, 1), (9, 64, 100, 7), (17, 96, 301, 32)])
def test_topk_encode_ref_matches_dense_definition(B, d, n, k):
    x, W, be, bd = make_encoder(B, d, n, torch.float64)
    dead = dead_mask(n)
    values, indices, aux_v, aux_i = topk_encode_ref(x, W, be, bd, k, dead, 5)
    pre = pre_activations(x, W, be, bd)
    check_topk_choice(values, indices, pre, atol=1e-12)
    check_topk_choice(aux_v, aux_i, pre, atol=1e-12, allowed=dead)


def test_topk_encode_ref_pads_aux_when_few_dead():
    x, W, be, bd = make_encoder(5, 48, 40, torch.float64)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[[3, 7]] = True
    _, _, aux_v, aux_i = topk_encode_ref(x, W, be, bd, 4, dead, 6)
    assert aux_v.shape == (5, 6)
    assert set(aux_i[:, :2].flatten().tolist()) <= {3, 7}
    assert bool((aux_v[:, 2:] == 0).all()) and bool((aux_i[:, 2:] == 0).all())


def test_topk_encode_ref_aux_is_empty_without_mask():
    x, W, be, bd = make_encoder(3, 48, 40)
    _, _, aux_v, aux_i = topk_encode_ref(x, W, be, bd, 4, None, 8)
    assert aux_v.shape == (3, 0) and aux_i.shape == (3, 0) and aux_i.dtype == torch.int64


def test_decode_gather_scatter_refs_match_dense():
    g = torch.Generator().manual_seed(3)
    B, k, n, d = 13, 9, 57, 48
    values = torch.randn(B, k, dtype=torch.float64, generator=g)
    indices = torch.randint(0, n, (B, k), generator=g)  # repeats on purpose: scatter must add them up
    W = torch.randn(n, d, dtype=torch.float64, generator=g)
    b = torch.randn(d, dtype=torch.float64, generator=g)
    grad = torch.randn(B, d, dtype=torch.float64, generator=g)
    Z = dense_code(values, indices, n)
    torch.testing.assert_close(sparse_decode_ref(values, indices, W, b), Z @ W + b)
    torch.testing.assert_close(gather_dot_ref(grad, indices, W), (grad @ W.t()).gather(1, indices))
    torch.testing.assert_close(scatter_rows_ref(values, indices, grad, n), Z.t() @ grad)
