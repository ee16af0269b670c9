"""Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors, checked against the
plain-PyTorch references of ``mi_crow.ops.reference``.

The interpreter only works when ``TRITON_INTERPRET=1`` is set before ``triton`` itself is imported (triton's own
``tl.max``/``tl.sum`` are JIT functions created at import), and ``import mi_crow.ops`` imports triton in this
process. So the launchers run in one worker subprocess started with the variable set; each test sends it the
call (tensors serialised with ``torch.save``) and gets the result, or the exception type and message, back.
Argument checks happen before any kernel launch, so the bad-input tests call this process's module directly.

Top-k comparisons do not depend on tie order: the kernel's indices must select the same pre-activation values as
the reference's top-k, values must equal relu(pre) at those indices, and indices are distinct per row. Low
precision is judged against PyTorch's own error in the same dtype (both measured against a float64 reference).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from mi_crow.ops.reference import (  # noqa: E402
    gather_dot_ref,
    scatter_rows_ref,
    sparse_decode_ref,
    topk_encode_ref,
)

from ._triton_worker import InterpretedKernels as _InterpretedKernels  # noqa: E402

LOW_PRECISION = [torch.bfloat16, torch.float16]

@pytest.fixture(scope="module")
def tk() -> Iterator[_InterpretedKernels]:
    worker = _InterpretedKernels()
    try:
        assert worker.call("kernel_kind") == "InterpretedFunction"
        yield worker
    finally:
        worker.close()


@pytest.fixture
def tk_local(monkeypatch: pytest.MonkeyPatch) -> Any:
    """This process's module, for argument checks (they raise before any kernel is launched)."""
    import mi_crow.ops.triton_kernels as module

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return module


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _encoder(B: int, d: int, n: int, dtype: torch.dtype, seed: int):  # type: ignore[no-untyped-def]
    g = _gen(seed)
    x = torch.randn(B, d, generator=g).to(dtype)
    W = (torch.randn(n, d, generator=g) / d**0.5).to(dtype)
    b_enc = (0.3 * torch.randn(n, generator=g)).to(dtype)
    b_dec = (0.2 * torch.randn(d, generator=g)).to(dtype)
    return x, W, b_enc, b_dec


def _pre64(x, W, b_enc, b_dec) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return (x.double() - b_dec.double()) @ W.double().T + b_enc.double()


def _check_selection(
    values: torch.Tensor,
    indices: torch.Tensor,
    pre: torch.Tensor,
    k: int,
    atol: float,
    candidates: torch.Tensor | None = None,
) -> None:
    """Tie-order-independent check of a top-k result against float64 pre-activations [B, n].

    ``candidates`` ([n] bool) restricts the choice (the dead latents of the aux code).
    """
    B = pre.shape[0]
    assert values.shape == (B, k) and indices.shape == (B, k)
    assert indices.dtype == torch.int64
    pool = pre if candidates is None else pre.masked_fill(~candidates, float("-inf"))
    n_real = k if candidates is None else min(k, int(candidates.sum()))
    ref_top = pool.topk(n_real, dim=1).values
    real_idx = indices[:, :n_real]
    assert bool(((real_idx >= 0) & (real_idx < pre.shape[1])).all())
    if candidates is not None:
        assert bool(candidates[real_idx].all()), "an aux index points to a latent that is not dead"
    # Distinct latents per row.
    assert bool((real_idx.sort(dim=1).values.diff(dim=1) != 0).all())
    picked = pre.gather(1, real_idx)
    torch.testing.assert_close(picked, ref_top, atol=atol, rtol=0)
    torch.testing.assert_close(values[:, :n_real].double(), picked.clamp_min(0), atol=atol, rtol=0)
    # Sorted descending.
    assert bool((values.double().diff(dim=1) <= 0).all())
    if n_real < k:  # padding: value 0 at index 0, as the reference documents
        assert bool((values[:, n_real:] == 0).all()) and bool((indices[:, n_real:] == 0).all())


# ---------------------------------------------------------------------------------------------------------------
# topk_encode
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("B", "d", "n", "k"),
    [
        (1, 48, 100, 1),  # one token, one latent, n below one tile
        (5, 64, 200, 7),  # n not a multiple of the tile, latents split across programs
        (7, 96, 257, 32),
        (3, 64, 300, 128),  # the largest k of the issue
        (129, 48, 150, 5),  # many row blocks: one latent split, partial last row block
    ],
)
def test_topk_encode_fp32_matches_reference(tk: _InterpretedKernels, B: int, d: int, n: int, k: int) -> None:
    x, W, b_enc, b_dec = _encoder(B, d, n, torch.float32, seed=B * 1000 + n + k)
    values, indices, aux_v, aux_i = tk.topk_encode_triton(x, W, b_enc, b_dec, k, None, 0)
    assert values.dtype == torch.float32
    assert aux_v.shape == (B, 0) and aux_i.shape == (B, 0) and aux_i.dtype == torch.int64
    _check_selection(values, indices, _pre64(x, W, b_enc, b_dec), k, atol=1e-5)
    ref_v, _, _, _ = topk_encode_ref(x, W, b_enc, b_dec, k, None, 0)
    torch.testing.assert_close(values, ref_v, atol=1e-5, rtol=1e-5)


def test_topk_encode_negative_pre_activations_give_zero_values_and_true_indices(tk: _InterpretedKernels) -> None:
    x, W, b_enc, b_dec = _encoder(6, 48, 90, torch.float32, seed=3)
    b_enc = b_enc - 100.0  # every pre-activation is negative: values clip to 0, the ranking must not
    values, indices, _, _ = tk.topk_encode_triton(x, W, b_enc, b_dec, 4, None, 0)
    assert bool((values == 0).all())
    _check_selection(values, indices, _pre64(x, W, b_enc, b_dec), 4, atol=1e-4)


def test_topk_encode_skips_hopeless_tiles_correctly(tk: _InterpretedKernels) -> None:
    # A steep bias ranking early latents far above later ones makes later tiles skip the merge.
    x, W, b_enc, b_dec = _encoder(4, 64, 400, torch.float32, seed=4)
    b_enc = torch.linspace(50.0, -50.0, 400)
    values, indices, _, _ = tk.topk_encode_triton(x, W, b_enc, b_dec, 8, None, 0)
    _check_selection(values, indices, _pre64(x, W, b_enc, b_dec), 8, atol=1e-4)
    assert bool((indices < 64).all())


def test_topk_encode_accepts_strided_inputs(tk: _InterpretedKernels) -> None:
    x, W, b_enc, b_dec = _encoder(5, 48, 120, torch.float32, seed=5)
    x_t = x.T.contiguous().T  # same values, column-major
    W_wide = torch.cat([W, torch.zeros_like(W)], dim=1)[:, :48]  # row stride 96
    b_enc_strided = torch.stack([b_enc, b_enc], dim=1)[:, 0]
    values, indices, _, _ = tk.topk_encode_triton(x_t, W_wide, b_enc_strided, b_dec, 6, None, 0)
    _check_selection(values, indices, _pre64(x, W, b_enc, b_dec), 6, atol=1e-5)


@pytest.mark.parametrize(
    ("B", "d", "n", "k", "k_aux", "p_dead"),
    [
        (5, 48, 200, 4, 9, 0.5),
        (3, 96, 257, 1, 64, 0.5),
        (1, 64, 130, 2, 16, 0.04),  # about 5 dead latents for 16 aux slots: padding
        (4, 64, 100, 3, 8, 0.0),  # no dead latent at all: all padding
    ],
)
def test_topk_encode_aux_matches_reference(
    tk: _InterpretedKernels, B: int, d: int, n: int, k: int, k_aux: int, p_dead: float
) -> None:
    x, W, b_enc, b_dec = _encoder(B, d, n, torch.float32, seed=n + k_aux)
    dead = torch.rand(n, generator=_gen(n)) < p_dead
    values, indices, aux_v, aux_i = tk.topk_encode_triton(x, W, b_enc, b_dec, k, dead, k_aux)
    pre = _pre64(x, W, b_enc, b_dec)
    _check_selection(values, indices, pre, k, atol=1e-5)
    assert aux_v.shape == (B, k_aux) and aux_i.dtype == torch.int64
    _check_selection(aux_v, aux_i, pre, k_aux, atol=1e-5, candidates=dead)
    ref = topk_encode_ref(x, W, b_enc, b_dec, k, dead, k_aux)
    torch.testing.assert_close(aux_v, ref[2], atol=1e-5, rtol=0)
    assert torch.equal(aux_i == 0, ref[3] == 0) or bool((aux_v > 0).all())


def test_topk_encode_above_the_fused_limit_uses_the_chunked_path(tk: _InterpretedKernels) -> None:
    B, d, n, k, k_aux = 3, 48, 4100 + 97, 300, 260  # two latent chunks; k and k_aux above 256
    x, W, b_enc, b_dec = _encoder(B, d, n, torch.float32, seed=31)
    dead = torch.rand(n, generator=_gen(32)) < 0.3
    values, indices, aux_v, aux_i = tk.topk_encode_triton(x, W, b_enc, b_dec, k, dead, k_aux)
    pre = _pre64(x, W, b_enc, b_dec)
    _check_selection(values, indices, pre, k, atol=1e-5)
    _check_selection(aux_v, aux_i, pre, k_aux, atol=1e-5, candidates=dead)


def test_topk_encode_aux_is_empty_without_mask_or_k_aux(tk: _InterpretedKernels) -> None:
    x, W, b_enc, b_dec = _encoder(3, 48, 80, torch.float32, seed=6)
    dead = torch.ones(80, dtype=torch.bool)
    _, _, aux_v, aux_i = tk.topk_encode_triton(x, W, b_enc, b_dec, 2, None, 5)
    assert aux_v.shape == (3, 0) and aux_i.shape == (3, 0)
    _, _, aux_v, aux_i = tk.topk_encode_triton(x, W, b_enc, b_dec, 2, dead, 0)
    assert aux_v.shape == (3, 0) and aux_i.shape == (3, 0)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_topk_encode_low_precision_within_torch_error(tk: _InterpretedKernels, dtype: torch.dtype) -> None:
    B, d, n, k, k_aux = 7, 64, 200, 16, 8
    x, W, b_enc, b_dec = _encoder(B, d, n, dtype, seed=7)
    dead = torch.rand(n, generator=_gen(8)) < 0.5
    values, indices, aux_v, aux_i = tk.topk_encode_triton(x, W, b_enc, b_dec, k, dead, k_aux)
    assert values.dtype == dtype and aux_v.dtype == dtype
    pre = _pre64(x, W, b_enc, b_dec)
    exact_v = pre.topk(k, dim=1).values.clamp_min(0)
    torch_v = topk_encode_ref(x, W, b_enc, b_dec, k, dead, k_aux)[0].double()
    torch_err = (torch_v - exact_v).abs().max().item()
    kernel_err = (values.double() - exact_v).abs().max().item()
    assert kernel_err <= 2 * torch_err + 1e-6, (kernel_err, torch_err)
    # The chosen latents are near-optimal: their exact pre-activations are within PyTorch's error of the best.
    picked = pre.gather(1, indices).clamp_min(0)
    assert (picked - exact_v).abs().max().item() <= 2 * torch_err + 1e-6
    assert bool(dead[aux_i].all())


# ---------------------------------------------------------------------------------------------------------------
# sparse_decode and gather_dot
# ---------------------------------------------------------------------------------------------------------------


def _code(B: int, k: int, n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    values = torch.rand(B, k, generator=g).to(dtype)
    indices = torch.randint(0, n, (B, k), generator=g)
    return values, indices


@pytest.mark.parametrize(
    ("B", "k", "d", "n"),
    [(1, 1, 48, 10), (5, 7, 64, 100), (3, 40, 96, 77), (9, 0, 48, 5), (2, 33, 64, 3)],
)
def test_sparse_decode_fp32_matches_reference(tk: _InterpretedKernels, B: int, k: int, d: int, n: int) -> None:
    values, indices = _code(B, k, n, torch.float32, seed=B + k + d)
    g = _gen(d)
    W = torch.randn(n, d, generator=g)
    b = torch.randn(d, generator=g)
    out = tk.sparse_decode_triton(values, indices, W, b)
    assert out.shape == (B, d) and out.dtype == torch.float32
    torch.testing.assert_close(out, sparse_decode_ref(values, indices, W, b), atol=1e-5, rtol=1e-5)


def test_sparse_decode_accepts_strided_code(tk: _InterpretedKernels) -> None:
    values, indices = _code(6, 10, 50, torch.float32, seed=11)
    W = torch.randn(50, 64, generator=_gen(12))
    b = torch.randn(64, generator=_gen(13))
    out = tk.sparse_decode_triton(values[:, ::2], indices[:, ::2], W, b)
    torch.testing.assert_close(out, sparse_decode_ref(values[:, ::2], indices[:, ::2], W, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_sparse_decode_low_precision_within_torch_error(tk: _InterpretedKernels, dtype: torch.dtype) -> None:
    values, indices = _code(7, 24, 90, dtype, seed=14)
    W = torch.randn(90, 96, generator=_gen(15)).to(dtype)
    b = torch.randn(96, generator=_gen(16)).to(dtype)
    exact = sparse_decode_ref(values.double(), indices, W.double(), b.double())
    # PyTorch's own low-precision decode: gather, multiply and sum in the dtype.
    plain = b + (values[:, :, None] * W[indices]).sum(dim=1)
    out = tk.sparse_decode_triton(values, indices, W, b)
    assert out.dtype == dtype
    kernel_err = (out.double() - exact).abs().max().item()
    torch_err = (plain.double() - exact).abs().max().item()
    assert kernel_err <= 2 * torch_err, (kernel_err, torch_err)


@pytest.mark.parametrize(("B", "k", "d", "n"), [(1, 1, 48, 10), (5, 7, 64, 100), (3, 40, 96, 77), (4, 0, 64, 9)])
def test_gather_dot_fp32_matches_reference(tk: _InterpretedKernels, B: int, k: int, d: int, n: int) -> None:
    _, indices = _code(B, k, n, torch.float32, seed=B * k + d)
    g = _gen(n)
    grad = torch.randn(B, d, generator=g)
    W = torch.randn(n, d, generator=g)
    out = tk.gather_dot_triton(grad, indices, W)
    assert out.shape == (B, k) and out.dtype == torch.float32
    torch.testing.assert_close(out, gather_dot_ref(grad, indices, W), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_gather_dot_low_precision_within_torch_error(tk: _InterpretedKernels, dtype: torch.dtype) -> None:
    _, indices = _code(6, 20, 70, dtype, seed=17)
    grad = torch.randn(6, 96, generator=_gen(18)).to(dtype)
    W = torch.randn(70, 96, generator=_gen(19)).to(dtype)
    exact = gather_dot_ref(grad.double(), indices, W.double())
    plain = (W[indices] * grad[:, None, :]).sum(dim=-1)
    out = tk.gather_dot_triton(grad, indices, W)
    assert out.dtype == dtype
    kernel_err = (out.double() - exact).abs().max().item()
    torch_err = (plain.double() - exact).abs().max().item()
    assert kernel_err <= 2 * torch_err, (kernel_err, torch_err)


# ---------------------------------------------------------------------------------------------------------------
# scatter_rows
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("B", "k", "d", "n"),
    [(1, 1, 48, 10), (5, 7, 64, 100), (9, 16, 96, 13), (3, 40, 48, 4), (4, 0, 64, 6)],
)
def test_scatter_rows_fp32_matches_reference(tk: _InterpretedKernels, B: int, k: int, d: int, n: int) -> None:
    # Small n relative to B*k forces repeated latents within and across rows.
    coef, indices = _code(B, k, n, torch.float32, seed=B + k * 3 + n)
    x = torch.randn(B, d, generator=_gen(d + n))
    out = tk.scatter_rows_triton(coef, indices, x, n)
    assert out.shape == (n, d) and out.dtype == torch.float32
    torch.testing.assert_close(out, scatter_rows_ref(coef, indices, x, n), atol=1e-5, rtol=1e-5)
    unused = torch.ones(n, dtype=torch.bool)
    unused[indices.reshape(-1)] = False
    assert bool((out[unused] == 0).all())


def test_scatter_rows_is_deterministic_and_handles_repeats_in_a_row(tk: _InterpretedKernels) -> None:
    indices = torch.tensor([[3, 3, 0], [3, 1, 3]])
    coef = torch.tensor([[1.0, 2.0, -1.0], [0.5, 4.0, -2.0]])
    x = torch.randn(2, 48, generator=_gen(20))
    out = tk.scatter_rows_triton(coef, indices, x, 5)
    expected = torch.zeros(5, 48)
    expected[3] = 3.0 * x[0] - 1.5 * x[1]
    expected[0] = -1.0 * x[0]
    expected[1] = 4.0 * x[1]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    coef2, idx2 = _code(33, 16, 7, torch.float32, seed=21)
    x2 = torch.randn(33, 64, generator=_gen(22))
    first = tk.scatter_rows_triton(coef2, idx2, x2, 7)
    assert torch.equal(first, tk.scatter_rows_triton(coef2, idx2, x2, 7))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_scatter_rows_low_precision_within_torch_error(tk: _InterpretedKernels, dtype: torch.dtype) -> None:
    coef, indices = _code(40, 8, 30, dtype, seed=23)
    x = torch.randn(40, 64, generator=_gen(24)).to(dtype)
    exact = scatter_rows_ref(coef.double(), indices, x.double(), 30)
    # PyTorch's own low-precision scatter-add, accumulating in the dtype.
    plain = torch.zeros(30, 64, dtype=dtype).index_add_(
        0, indices.reshape(-1), (coef[:, :, None] * x[:, None, :]).reshape(-1, 64)
    )
    out = tk.scatter_rows_triton(coef, indices, x, 30)
    assert out.dtype == dtype
    kernel_err = (out.double() - exact).abs().max().item()
    torch_err = (plain.double() - exact).abs().max().item()
    assert kernel_err <= 2 * torch_err, (kernel_err, torch_err)


def test_float64_is_served_exactly(tk: _InterpretedKernels) -> None:
    # float64 (gradcheck) goes to the references: results must match them exactly.
    x, W, b_enc, b_dec = _encoder(3, 48, 60, torch.float64, seed=25)
    got = tk.topk_encode_triton(x, W, b_enc, b_dec, 4, None, 0)
    want = topk_encode_ref(x, W, b_enc, b_dec, 4, None, 0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    coef, indices = _code(3, 4, 60, torch.float64, seed=26)
    assert torch.equal(tk.scatter_rows_triton(coef, indices, x, 60), scatter_rows_ref(coef, indices, x, 60))


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_topk_encode_rejects_bad_input(tk_local: Any) -> None:
    x, W, b_enc, b_dec = _encoder(3, 48, 60, torch.float32, seed=27)
    enc = tk_local.topk_encode_triton
    with pytest.raises(ValueError, match="x must be 2-D"):
        enc(x[0], W, b_enc, b_dec, 2, None, 0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        enc(x.tolist(), W, b_enc, b_dec, 2, None, 0)
    with pytest.raises(TypeError, match="x must be float32"):
        enc(x.to(torch.int32), W, b_enc, b_dec, 2, None, 0)
    with pytest.raises(ValueError, match=r"W_enc must have shape \[n_latents, 48\]"):
        enc(x, W[:, :40], b_enc, b_dec, 2, None, 0)
    with pytest.raises(TypeError, match="W_enc must have the dtype of x"):
        enc(x, W.half(), b_enc, b_dec, 2, None, 0)
    with pytest.raises(ValueError, match=r"b_enc must have shape \[60\]"):
        enc(x, W, b_enc[:5], b_dec, 2, None, 0)
    with pytest.raises(ValueError, match=r"b_dec must have shape \[48\]"):
        enc(x, W, b_enc, b_dec[:5], 2, None, 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, n_latents\] = \[1, 60\], got 0"):
        enc(x, W, b_enc, b_dec, 0, None, 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, n_latents\] = \[1, 60\], got 61"):
        enc(x, W, b_enc, b_dec, 61, None, 0)
    with pytest.raises(TypeError, match="k must be an int, got float"):
        enc(x, W, b_enc, b_dec, 2.0, None, 0)
    with pytest.raises(ValueError, match=r"k_aux must be in \[0, n_latents\] = \[0, 60\], got -1"):
        enc(x, W, b_enc, b_dec, 2, None, -1)
    with pytest.raises(ValueError, match=r"k_aux must be in \[0, n_latents\] = \[0, 60\], got 61"):
        enc(x, W, b_enc, b_dec, 2, None, 61)
    with pytest.raises(ValueError, match=r"dead_mask must be a bool tensor of shape \[60\]"):
        enc(x, W, b_enc, b_dec, 2, torch.ones(59, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match="dead_mask must be a bool tensor"):
        enc(x, W, b_enc, b_dec, 2, torch.ones(60), 3)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        enc(x, W, b_enc, b_dec.to("meta"), 2, None, 0)


def test_code_ops_reject_bad_input(tk_local: Any) -> None:
    values, indices = _code(3, 4, 10, torch.float32, seed=28)
    W = torch.randn(10, 48)
    b = torch.randn(48)
    grad = torch.randn(3, 48)
    with pytest.raises(ValueError, match="values and indices must have the same shape"):
        tk_local.sparse_decode_triton(values, indices[:, :3], W, b)
    with pytest.raises(TypeError, match="indices must be int64"):
        tk_local.sparse_decode_triton(values, indices.int(), W, b)
    with pytest.raises(ValueError, match=r"b_dec must have shape \[48\]"):
        tk_local.sparse_decode_triton(values, indices, W, b[:3])
    too_big = indices.clone()
    too_big[1, 2] = 10
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\), got values in \[.*, 10\]"):
        tk_local.sparse_decode_triton(values, too_big, W, b)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\), got values in \[-1"):
        tk_local.gather_dot_triton(grad, indices - 1, W)
    with pytest.raises(ValueError, match="indices must have 3 rows"):
        tk_local.gather_dot_triton(grad, indices[:2], W)
    with pytest.raises(ValueError, match=r"W must have shape \[n_latents, 48\]"):
        tk_local.gather_dot_triton(grad, indices, W[:, :8])
    with pytest.raises(ValueError, match="coef and indices must have the same shape"):
        tk_local.scatter_rows_triton(values[:, :2], indices, grad, 10)
    with pytest.raises(ValueError, match="x must have 3 rows"):
        tk_local.scatter_rows_triton(values, indices, grad[:2], 10)
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        tk_local.scatter_rows_triton(values, indices, grad, -1)
    with pytest.raises(TypeError, match="n must be an int"):
        tk_local.scatter_rows_triton(values, indices, grad, 10.0)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
        tk_local.scatter_rows_triton(values, indices, grad, 5)


def test_cpu_tensors_are_rejected_outside_the_interpreter(tk_local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    values, indices = _code(2, 3, 10, torch.float32, seed=29)
    with pytest.raises(ValueError, match="values must be a CUDA tensor"):
        tk_local.sparse_decode_triton(values, indices, torch.randn(10, 48), torch.randn(48))
    x, W, b_enc, b_dec = _encoder(2, 48, 10, torch.float32, seed=30)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        tk_local.topk_encode_triton(x, W, b_enc, b_dec, 2, None, 0)


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for real GPUs (no GPU needed: Triton lowers to PTX and runs its bundled ptxas)
# ---------------------------------------------------------------------------------------------------------------
# The interpreter runs the kernels' arithmetic but not Triton's compiler, which has rules of its own (constexpr
# scoping, tl.dot shapes, layouts of the sorting network's reshapes). These compile each kernel, with the
# block sizes the launchers pick for the headline shapes, to a cubin for sm_80 (A100) and sm_90 (H100).


def _aot_compile(
    kernel: Any, pointers: dict[str, str], constexprs: dict[str, Any], arch: int, num_warps: int = 4
) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = pointers[param.name]
        else:
            signature[param.name] = "i64" if param.name.startswith("stride") else "i32"
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _compiled_module() -> Any:
    import triton

    import mi_crow.ops.triton_kernels as module

    if not isinstance(module._topk_encode_kernel, triton.runtime.JITFunction):
        pytest.skip("mi_crow.ops.triton_kernels was imported under TRITON_INTERPRET=1; nothing to compile")
    return module


_ENCODE_CASES = [
    # (dtype, tokens, d_in, k, k_aux, arch): the headline shapes, bf16 with AuxK, the largest k of the
    # issue. (k_aux = 256 compiles too, in about half a minute of ptxas: left out to keep this suite short.)
    ("fp32", 4096, 768, 32, 0, 80),
    ("fp32", 4096, 2048, 32, 0, 90),
    ("bf16", 4096, 768, 32, 64, 90),
    ("fp16", 4096, 768, 128, 0, 80),
]


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize(("dtype", "B", "d", "k", "k_aux", "arch"), _ENCODE_CASES)
def test_topk_encode_kernels_compile_for_gpu(dtype: str, B: int, d: int, k: int, k_aux: int, arch: int) -> None:
    module = _compiled_module()
    k_pad = module._next_pow2(k)
    ka_pad = module._next_pow2(k_aux) if k_aux else 1
    block_b, block_n, block_d, num_warps = module._encode_blocks(B, d, k_pad, ka_pad)
    pointers = {
        "x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_enc_ptr": f"*{dtype}", "b_dec_ptr": f"*{dtype}",
        "dead_ptr": "*i8", "part_ptr": "*i64", "aux_part_ptr": "*i64",
    }
    constexprs = {
        "K_PAD": k_pad, "KA_PAD": ka_pad, "HAS_AUX": k_aux > 0, "BLOCK_B": block_b, "BLOCK_N": block_n,
        "BLOCK_D": block_d, "INPUT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "DOT_IN_FP32": False,
    }
    compiled = _aot_compile(module._topk_encode_kernel, pointers, constexprs, arch, num_warps)
    assert len(compiled.asm["cubin"]) > 0
    fin = {"part_ptr": "*i64", "values_ptr": f"*{dtype}", "indices_ptr": "*i64"}
    compiled = _aot_compile(module._topk_finalize_kernel, fin, {"K_PAD": max(k_pad, ka_pad), "BLOCK_B": 16}, arch)
    assert len(compiled.asm["cubin"]) > 0


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_code_kernels_compile_for_gpu(dtype: str) -> None:
    module = _compiled_module()
    cases = [
        (module._sparse_decode_kernel,
         {"values_ptr": f"*{dtype}", "indices_ptr": "*i64", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}",
          "out_ptr": f"*{dtype}"},
         {"BLOCK_K": 32, "BLOCK_D": 128}),
        (module._gather_dot_kernel,
         {"g_ptr": f"*{dtype}", "indices_ptr": "*i64", "w_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"},
         {"BLOCK_K": 32, "BLOCK_D": 128}),
        (module._scatter_rows_kernel,
         {"coef_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "order_ptr": "*i64", "offsets_ptr": "*i64",
          "out_ptr": f"*{dtype}"},
         {"BLOCK_P": 16, "BLOCK_D": 128}),
    ]
    for kernel, pointers, constexprs in cases:
        compiled = _aot_compile(kernel, pointers, constexprs, 80)
        assert len(compiled.asm["cubin"]) > 0


@pytest.mark.parametrize("compute_dtype", LOW_PRECISION)
def test_topk_encode_compute_dtype_runs_the_product_in_low_precision(
    tk: _InterpretedKernels, compute_dtype: torch.dtype
) -> None:
    x, W, b_enc, b_dec = _encoder(6, 64, 300, torch.float32, seed=7)
    dead = torch.rand(300, generator=_gen(3)) < 0.5
    values, indices, aux_v, aux_i = tk.topk_encode_triton(x, W, b_enc, b_dec, 5, dead, 12, compute_dtype)
    assert values.dtype == torch.float32 and aux_v.dtype == torch.float32
    # The CPU contract: operands rounded to compute_dtype, products accumulated in float32, the bias added in
    # float32 and the values kept in float32. So against the float64 pre-activations of the rounded operands the
    # error is float32 rounding only: at most gamma_{d+1} * (|x_r| @ |W_r|.T + |b_enc|) (Higham's bound for a
    # float32 dot product of d terms plus one add), plus half an ulp of float32 for the value itself.
    xr, Wr = (x - b_dec).to(compute_dtype).double(), W.to(compute_dtype).double()
    rounded = xr @ Wr.t() + b_enc.double()
    u = torch.finfo(torch.float32).eps / 2
    terms = x.shape[1] + 1
    gamma = terms * u / (1 - terms * u)
    atol = gamma * float((xr.abs() @ Wr.abs().t() + b_enc.double().abs()).max()) + u * float(rounded.abs().max())
    _check_selection(values, indices, rounded, 5, atol=atol)
    _check_selection(aux_v, aux_i, rounded, 12, atol=atol, candidates=dead)
