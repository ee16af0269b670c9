"""Shared input builders and tie-independent checks for the ops tests."""

from __future__ import annotations

import torch
from torch import Tensor


def make_encoder(B: int, d: int, n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Tensor, ...]:
    """Continuous random x [B, d], W_enc [n, d], b_enc [n], b_dec [d] (ties have probability ~0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    W = torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    b_enc = torch.randn(n, generator=g, dtype=torch.float64) * 0.1
    b_dec = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    return tuple(t.to(dtype) for t in (x, W, b_enc, b_dec))


def dead_mask(n: int, frac: float = 0.5, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) < frac


def pre_activations(x: Tensor, W: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """Float64 pre-activations: the ground truth the kernel's choice of latents is judged against."""
    return (x.double() - b_dec.double()) @ W.double().t() + b_enc.double()


def dense_code(values: Tensor, indices: Tensor, n: int) -> Tensor:
    """Scatter a sparse code into a dense [B, n] float64 matrix (independent of tie order)."""
    return torch.zeros(values.shape[0], n, dtype=torch.float64).scatter_add(1, indices, values.double())


def check_topk_choice(values: Tensor, indices: Tensor, pre: Tensor, atol: float, allowed: Tensor | None = None) -> None:
    """Tie-independent check of a top-k choice against float64 pre-activations.

    The chosen entries must be distinct, their values must be relu(pre) at the chosen latents, and no latent left
    out (among ``allowed``) may beat the smallest chosen one by more than ``atol``.
    """
    B, k = indices.shape
    pre_a = pre if allowed is None else pre.masked_fill(~allowed, float("-inf"))
    for b in range(B):
        assert len(set(indices[b].tolist())) == k, f"row {b}: repeated indices {indices[b].tolist()}"
    chosen = pre.gather(1, indices)
    torch.testing.assert_close(values.double(), chosen.clamp_min(0), atol=atol, rtol=0)
    if allowed is not None:
        assert bool(allowed[indices].all()), "aux code picked a latent outside dead_mask"
    left_out = pre_a.scatter(1, indices, float("-inf"))
    assert bool((left_out.max(1).values <= chosen.min(1).values + atol).all()), "a better latent was left out"
    assert bool((values[:, :-1] >= values[:, 1:]).all()), "values are not sorted descending"
