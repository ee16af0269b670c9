"""The backends agree: for every op and every dtype an op accepts, the C++ CPU kernel (``torch.ops.mi_crow.*`` on
CPU tensors), the Triton launchers under the interpreter, and the plain-PyTorch references give the same result.

What is compared does not depend on tie order (continuous random inputs): sorted top-k values, the dense scatter
of a code, decoded outputs and gradients. float32 is held to float32-level tolerances. bfloat16/float16 are
judged against PyTorch's own error in that dtype (the same computation written in plain PyTorch, in the dtype):
every backend's error from the float64 result is at most twice PyTorch's, and so is the gap between any two
backends. ``topk_encode`` is also held to its precision contract (operands rounded to the product's dtype,
products accumulated in float32, bias added in float32, values rounded once to ``x.dtype``): against the float64
pre-activations of the rounded operands, every backend is off by float32 rounding plus half an ulp of the output.

Ops without a Triton launcher of their own run on CUDA as compositions of ops that have one (see
``registration.py``); the Triton column composes the same launchers here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from mi_crow.ops import gather_dot_ref, scatter_rows_ref, sparse_decode_ref, topk_encode_ref

from ._helpers import dead_mask, dense_code, make_encoder

pytest.importorskip("triton", reason="triton is not installed")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WIDTHS = [48, 64]  # an odd multiple of 16 and a power of two


@pytest.fixture(scope="module")
def tk() -> Iterator[Any]:
    from ._triton_worker import start_worker

    worker = start_worker()
    try:
        yield worker
    finally:
        worker.close()


def _judge(results: dict[str, Tensor], exact: Tensor, plain: Tensor, what: str) -> None:
    """Every backend close to ``exact`` (float64) and to each other; ``plain`` is PyTorch's own result, in the
    dtype whose precision is being judged (the product's, for topk_encode with a compute_dtype)."""
    dtype = plain.dtype
    names = list(results)
    if dtype == torch.float32:
        scale = max(1.0, float(exact.abs().max()))
        for name in names:
            torch.testing.assert_close(
                results[name].double(), exact, atol=2e-6 * scale, rtol=1e-5, msg=f"{what}: {name} vs float64"
            )
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                torch.testing.assert_close(
                    results[a], results[b], atol=2e-6 * scale, rtol=1e-5, msg=f"{what}: {a} vs {b}"
                )
        return
    torch_err = float((plain.double() - exact).abs().max())
    assert torch_err > 0, f"{what}: PyTorch's {dtype} result is exact; the comparison would prove nothing"
    for name in names:
        err = float((results[name].double() - exact).abs().max())
        assert err <= 2 * torch_err, f"{what}: {name} error {err:.3g} > 2 x PyTorch's {dtype} error {torch_err:.3g}"
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            gap = float((results[a].double() - results[b].double()).abs().max())
            assert gap <= 2 * torch_err, f"{what}: {a} vs {b} differ by {gap:.3g} (PyTorch's error {torch_err:.3g})"


def _code(B: int, k: int, n: int, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, k, generator=g, dtype=torch.float64).to(dtype)
    indices = torch.randint(0, n, (B, k), generator=g)  # repeats included: a modified code may repeat latents
    return values, indices


def _rows(*shape: int, dtype: torch.dtype, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# topk_encode
# ---------------------------------------------------------------------------------------------------------------
def _plain_topk(pre: Tensor, k: int, dead: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    dead_idx = dead.nonzero().squeeze(1)
    return pre.topk(k, dim=1).values.relu(), pre[:, dead_idx].topk(k_aux, dim=1).values.relu()


ENCODE_CASES = [  # (x dtype, compute_dtype)
    (torch.float32, None),
    (torch.bfloat16, None),
    (torch.float16, None),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
]


@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("dtype,compute_dtype", ENCODE_CASES)
def test_topk_encode_backends_agree(tk, dtype, compute_dtype, d):
    B, n, k, k_aux = 9, 333, 12, 20
    x, W, be, bd = make_encoder(B, d, n, dtype=dtype, seed=d + 7)
    dead = dead_mask(n, seed=d)
    codes = {
        "cpu": torch.ops.mi_crow.topk_encode(x, W, be, bd, k, dead, k_aux, compute_dtype),
        "triton": tk.topk_encode_triton(x, W, be, bd, k, dead, k_aux, compute_dtype),
        "reference": topk_encode_ref(x, W, be, bd, k, dead, k_aux, compute_dtype),
    }
    for name, code in codes.items():
        assert code[0].dtype == dtype and code[2].dtype == dtype, name
        assert code[1].shape == (B, k) and code[3].shape == (B, k_aux), name

    cd = dtype if compute_dtype is None else compute_dtype
    exact = (x.double() - bd.double()) @ W.double().t() + be.double()
    exact_v, exact_av = _plain_topk(exact, k, dead, k_aux)
    # PyTorch's own: the same formula in the product's dtype.
    plain = (x - bd).to(cd) @ W.to(cd).t() + be.to(cd)
    plain_v, plain_av = _plain_topk(plain, k, dead, k_aux)
    _judge({name: c[0] for name, c in codes.items()}, exact_v, plain_v, "values")
    _judge({name: c[2] for name, c in codes.items()}, exact_av, plain_av, "aux values")
    # The dense scatter of the codes: the backends share the rounded operands and the float32 ranking, so they
    # pick the same latents (continuous inputs: no near-ties at float32 resolution).
    dense = {name: dense_code(c[0], c[1], n) for name, c in codes.items()}
    aux_dense = {name: dense_code(c[2], c[3], n) for name, c in codes.items()}
    names = list(codes)
    tol = 0 if dtype == torch.float32 else float(torch.finfo(dtype).eps) * float(exact_v.abs().max())
    # (x's dtype sets the tolerance: the backends' codes differ by their values' final rounding at most.)
    for a, b in zip(names, names[1:]):
        torch.testing.assert_close(dense[a], dense[b], atol=tol + 1e-5, rtol=0, msg=f"dense code: {a} vs {b}")
        torch.testing.assert_close(aux_dense[a], aux_dense[b], atol=tol + 1e-5, rtol=0, msg=f"aux code: {a} vs {b}")

    # The precision contract, against the float64 pre-activations of the rounded operands.
    xr, Wr = (x - bd).to(cd).double(), W.to(cd).double()
    rounded = xr @ Wr.t() + be.double()
    u = torch.finfo(torch.float32).eps / 2
    gamma = (d + 1) * u / (1 - (d + 1) * u)
    fp32_err = gamma * float((xr.abs() @ Wr.abs().t() + be.double().abs()).max()) + u * float(rounded.abs().max())
    half_ulp = float(torch.finfo(dtype).eps) / 2
    want_v, want_av = _plain_topk(rounded, k, dead, k_aux)
    for name, code in codes.items():
        for got, want in ((code[0], want_v), (code[2], want_av)):
            bound = fp32_err + half_ulp * want.abs()
            excess = float(((got.double() - want).abs() - bound).max())
            assert excess <= 0, f"{name}: {dtype}/{cd} values off the contract by {excess:.3g} beyond the bound"


# ---------------------------------------------------------------------------------------------------------------
# The decoder ops and their gradients
# ---------------------------------------------------------------------------------------------------------------
B, K, K_AUX, N = 9, 24, 40, 300


def _decode_inputs(dtype: torch.dtype, d: int) -> dict[str, Tensor]:
    v, i = _code(B, K, N, dtype, seed=d)
    av, ai = _code(B, K_AUX, N, dtype, seed=d + 1)
    return dict(
        v=v, i=i, av=av, ai=ai,
        W=_rows(N, d, dtype=dtype, seed=d + 2), b=_rows(d, dtype=dtype, seed=d + 3),
        g=_rows(B, d, dtype=dtype, seed=d + 4), ag=_rows(B, d, dtype=dtype, seed=d + 5),
    )


def _f64(t: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: (v.double() if v.is_floating_point() else v) for k, v in t.items()}


# PyTorch's own low-precision versions: gather, multiply and sum in the dtype.
def _plain_decode(v: Tensor, i: Tensor, W: Tensor, b: Tensor) -> Tensor:
    return b + (v[:, :, None] * W[i]).sum(dim=1)


def _plain_gather_dot(g: Tensor, i: Tensor, W: Tensor) -> Tensor:
    return (W[i] * g[:, None, :]).sum(dim=-1)


def _plain_scatter(c: Tensor, i: Tensor, x: Tensor, n: int) -> Tensor:
    d = x.shape[1]
    return torch.zeros(n, d, dtype=x.dtype).index_add_(0, i.reshape(-1), (c[:, :, None] * x[:, None, :]).reshape(-1, d))


# Each op: name -> (cpu, triton(tk), reference, plain), each a function of the inputs dict returning a tuple.
Impl = Callable[..., tuple[Tensor, ...]]
OPS: dict[str, tuple[Impl, Impl, Impl, Impl]] = {
    "sparse_decode": (
        lambda t: (torch.ops.mi_crow.sparse_decode(t["v"], t["i"], t["W"], t["b"]),),
        lambda tk, t: (tk.sparse_decode_triton(t["v"], t["i"], t["W"], t["b"]),),
        lambda t: (sparse_decode_ref(t["v"], t["i"], t["W"], t["b"]),),
        lambda t: (_plain_decode(t["v"], t["i"], t["W"], t["b"]),),
    ),
    "gather_dot": (
        lambda t: (torch.ops.mi_crow.gather_dot(t["g"], t["i"], t["W"]),),
        lambda tk, t: (tk.gather_dot_triton(t["g"], t["i"], t["W"]),),
        lambda t: (gather_dot_ref(t["g"], t["i"], t["W"]),),
        lambda t: (_plain_gather_dot(t["g"], t["i"], t["W"]),),
    ),
    "scatter_rows": (
        lambda t: (torch.ops.mi_crow.scatter_rows(t["v"], t["i"], t["g"], N),),
        lambda tk, t: (tk.scatter_rows_triton(t["v"], t["i"], t["g"], N),),
        lambda t: (scatter_rows_ref(t["v"], t["i"], t["g"], N),),
        lambda t: (_plain_scatter(t["v"], t["i"], t["g"], N),),
    ),
    "sparse_decode_backward": (
        lambda t: torch.ops.mi_crow.sparse_decode_backward(t["g"], t["v"], t["i"], t["W"]),
        lambda tk, t: (tk.gather_dot_triton(t["g"], t["i"], t["W"]), tk.scatter_rows_triton(t["v"], t["i"], t["g"], N)),
        lambda t: (gather_dot_ref(t["g"], t["i"], t["W"]), scatter_rows_ref(t["v"], t["i"], t["g"], N)),
        lambda t: (_plain_gather_dot(t["g"], t["i"], t["W"]), _plain_scatter(t["v"], t["i"], t["g"], N)),
    ),
    "sparse_decode_with_aux": (
        lambda t: torch.ops.mi_crow.sparse_decode_with_aux(t["v"], t["i"], t["av"], t["ai"], t["W"], t["b"]),
        lambda tk, t: (
            tk.sparse_decode_triton(t["v"], t["i"], t["W"], t["b"]),
            tk.sparse_decode_triton(t["av"], t["ai"], t["W"], torch.zeros_like(t["b"])),
        ),
        lambda t: (
            sparse_decode_ref(t["v"], t["i"], t["W"], t["b"]),
            sparse_decode_ref(t["av"], t["ai"], t["W"], torch.zeros_like(t["b"])),
        ),
        lambda t: (_plain_decode(t["v"], t["i"], t["W"], t["b"]), _plain_decode(t["av"], t["ai"], t["W"], 0 * t["b"])),
    ),
    "sparse_decode_with_aux_backward": (
        lambda t: torch.ops.mi_crow.sparse_decode_with_aux_backward(
            t["g"], t["v"], t["i"], t["ag"], t["av"], t["ai"], t["W"]
        ),
        lambda tk, t: (
            tk.gather_dot_triton(t["g"], t["i"], t["W"]),
            tk.gather_dot_triton(t["ag"], t["ai"], t["W"]),
            tk.scatter_rows_triton(t["v"], t["i"], t["g"], N) + tk.scatter_rows_triton(t["av"], t["ai"], t["ag"], N),
        ),
        lambda t: (
            gather_dot_ref(t["g"], t["i"], t["W"]),
            gather_dot_ref(t["ag"], t["ai"], t["W"]),
            scatter_rows_ref(t["v"], t["i"], t["g"], N) + scatter_rows_ref(t["av"], t["ai"], t["ag"], N),
        ),
        lambda t: (
            _plain_gather_dot(t["g"], t["i"], t["W"]),
            _plain_gather_dot(t["ag"], t["ai"], t["W"]),
            _plain_scatter(t["v"], t["i"], t["g"], N) + _plain_scatter(t["av"], t["ai"], t["ag"], N),
        ),
    ),
}


@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", list(OPS))
def test_decoder_ops_backends_agree(tk, op, dtype, d):
    cpu, triton_impl, ref, plain = OPS[op]
    t = _decode_inputs(dtype, d)
    results = {"cpu": cpu(t), "triton": triton_impl(tk, t), "reference": ref(t)}
    exact = ref(_f64(t))
    plain_out = plain(t)
    for j, want in enumerate(exact):
        outs = {name: r[j] for name, r in results.items()}
        for name, out in outs.items():
            assert out.dtype == dtype and out.shape == want.shape, (op, name, j)
        _judge(outs, want, plain_out[j], f"{op} output {j}")
