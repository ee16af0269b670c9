"""The references are the specification: check them against independent dense formulations."""

from __future__ import annotations

import pytest
import torch

from mi_crow.ops import (
    gather_dot_ref,
    scatter_rows_ref,
    sparse_decode_ref,
    sparse_decode_with_aux_backward_ref,
    sparse_decode_with_aux_ref,
    topk_encode_ref,
)

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


def test_decode_with_aux_refs_match_dense():
    g = torch.Generator().manual_seed(4)
    B, k, k_aux, n, d = 11, 6, 13, 41, 48
    values = torch.randn(B, k, dtype=torch.float64, generator=g)
    indices = torch.randint(0, n, (B, k), generator=g)
    aux_values = torch.randn(B, k_aux, dtype=torch.float64, generator=g)
    aux_indices = torch.randint(0, n, (B, k_aux), generator=g)
    aux_indices[:, 0] = indices[:, 0]  # one latent in both codes: its decoder gradient gets both terms
    W = torch.randn(n, d, dtype=torch.float64, generator=g)
    b = torch.randn(d, dtype=torch.float64, generator=g)
    grad = torch.randn(B, d, dtype=torch.float64, generator=g)
    aux_grad = torch.randn(B, d, dtype=torch.float64, generator=g)
    Z, Za = dense_code(values, indices, n), dense_code(aux_values, aux_indices, n)
    x_hat, aux_hat = sparse_decode_with_aux_ref(values, indices, aux_values, aux_indices, W, b)
    torch.testing.assert_close(x_hat, Z @ W + b)
    torch.testing.assert_close(aux_hat, Za @ W)
    gv, gav, gw = sparse_decode_with_aux_backward_ref(grad, values, indices, aux_grad, aux_values, aux_indices, W)
    torch.testing.assert_close(gv, (grad @ W.t()).gather(1, indices))
    torch.testing.assert_close(gav, (aux_grad @ W.t()).gather(1, aux_indices))
    torch.testing.assert_close(gw, Z.t() @ grad + Za.t() @ aux_grad)
