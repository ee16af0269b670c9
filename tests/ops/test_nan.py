"""NaN (and infinite) pre-activations in ``topk_encode``: one semantics on every backend, that of ``torch.topk``.

NaN ranks above every number: a token whose pre-activations contain NaN gets its NaN latents first (values NaN,
the ReLU keeps NaN), then its best numbers; ``-inf`` entries are still chosen when nothing better is left; a row's
indices are distinct whatever its values. The aux code applies the same rule among the dead latents, with padding
(value 0, index 0) only for slots beyond the number of dead latents. The fused kernels (C++, Triton) also order
ties -- NaN with NaN included -- by the lower latent index, so for them the exact indices are checked; for the
reference and the chunked Triton path (both ``torch.topk``) the check does not depend on tie order.

Inputs are small integers, so every finite pre-activation is exact in every dtype and whatever the summation
order, and equal values really are equal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

import mi_crow.ops as ops
from mi_crow.ops import topk_encode_ref

NAN, INF = float("nan"), float("inf")


def _integer_encoder(B: int, d: int, n: int, seed: int, levels: int = 2) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-levels, levels + 1, (B, d), generator=g).double()
    W = torch.randint(-levels, levels + 1, (n, d), generator=g).double()
    return x, W, torch.zeros(n, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)


# Each case: (B, d, n, seed) -> (x, W_enc, b_enc, b_dec) in float64 with NaN/inf planted.
def _one_nan(B: int, d: int, n: int, seed: int) -> tuple[Tensor, ...]:
    x, W, be, bd = _integer_encoder(B, d, n, seed)
    be[n // 2 + 1] = NAN  # one NaN per row, in the middle of the latents
    return x, W, be, bd


def _many_nan(B: int, d: int, n: int, seed: int) -> tuple[Tensor, ...]:
    x, W, be, bd = _integer_encoder(B, d, n, seed)
    be[torch.arange(3, n, max(1, n // 400))] = NAN  # more NaN latents than k: every value NaN
    return x, W, be, bd


def _row_nan(B: int, d: int, n: int, seed: int) -> tuple[Tensor, ...]:
    x, W, be, bd = _integer_encoder(B, d, n, seed)
    x[B // 2] = NAN  # a whole token NaN (the old C++ kernel gave it k copies of latent 0)
    be[[7, n - 1]] = NAN
    return x, W, be, bd


def _nan_and_ties(B: int, d: int, n: int, seed: int) -> tuple[Tensor, ...]:
    x, W, be, bd = _integer_encoder(B, d, n, seed, levels=1)  # values in a narrow range: many exact ties
    be[[2, 5, n // 3, n - 2]] = NAN  # fewer NaN latents than k
    return x, W, be, bd


def _inf_row(B: int, d: int, n: int, seed: int) -> tuple[Tensor, ...]:
    # x[0, 0] = inf: row 0 is +inf where W[:, 0] = 1, -inf where it is -1 and NaN (inf * 0, a negative NaN on
    # x86) where it is 0. Here three latents are +inf, two NaN, the rest -inf: the code must still fill k slots
    # with distinct latents, the -inf ones included.
    x, W, be, bd = _integer_encoder(B, d, n, seed)
    W[:, 0] = -1.0
    W[[4, n // 2, n - 3], 0] = 1.0
    W[[9, n - 5], 0] = 0.0
    x[0, 0] = INF
    return x, W, be, bd


CASES: dict[str, Callable[..., tuple[Tensor, ...]]] = {
    "one_nan": _one_nan,
    "many_nan": _many_nan,
    "row_nan": _row_nan,
    "nan_and_ties": _nan_and_ties,
    "inf_row": _inf_row,
}


def _dead(n: int, seed: int, few: bool) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    dead = torch.rand(n, generator=g) < (0.01 if few else 0.5)
    # Some NaN/inf latents of every case are dead, so the aux code meets them too.
    dead[[2, 7, 9, n // 2, n // 2 + 1, n - 1]] = True
    return dead


def _pre(x: Tensor, W: Tensor, be: Tensor, bd: Tensor) -> Tensor:
    # Row by row in float64: exact for the finite entries, NaN/inf where the IEEE rules put them.
    return torch.stack([((xr - bd)[None, :] * W).sum(1) + be for xr in x])


def _stable_order(pre_row: Tensor, pool: Tensor) -> Tensor:
    """Latents of ``pool`` in the fused kernels' order: NaN first, then descending, ties by the lower index."""
    vals = pre_row[pool]
    key = torch.where(torch.isnan(vals), torch.full_like(vals, INF), vals)
    nan_first = torch.isnan(vals).to(torch.int8)
    # Two stable sorts: by value descending, then by NaN-ness descending (keeps the value order within groups).
    order = torch.sort(key, descending=True, stable=True).indices
    order = order[torch.sort(nan_first[order], descending=True, stable=True).indices]
    return pool[order]


def check_code(values: Tensor, indices: Tensor, pre: Tensor, k: int, *, allowed: Tensor | None, exact: bool) -> None:
    """Check one code (main when ``allowed`` is None, aux otherwise) against float64 ``pre`` [B, n]."""
    B, n = pre.shape
    assert values.shape == (B, k) and indices.shape == (B, k) and indices.dtype == torch.int64
    pool_all = torch.arange(n) if allowed is None else allowed.nonzero().squeeze(1)
    n_real = min(k, pool_all.numel())
    for b in range(B):
        v, i = values[b].double(), indices[b]
        chosen = i[:n_real]
        assert len(set(chosen.tolist())) == n_real, f"row {b}: repeated latents {chosen.tolist()}"
        assert bool(torch.isin(chosen, pool_all).all()), f"row {b}: latent outside the pool {chosen.tolist()}"
        row = pre[b]
        is_nan = torch.isnan(row)
        n_nan = min(int(is_nan[pool_all].sum()), n_real)
        # NaN first, exactly as many as the pool has (up to k), at NaN latents.
        assert bool(torch.isnan(v[:n_nan]).all()), f"row {b}: expected {n_nan} NaN values first, got {v.tolist()}"
        assert bool(is_nan[chosen[:n_nan]].all())
        assert not bool(torch.isnan(v[n_nan:]).any()), f"row {b}: NaN after the first {n_nan} values"
        # Then the best numbers, whatever their tie order: the chosen pre-activations are the top ones.
        rest = chosen[n_nan:]
        finite_pool = pool_all[~is_nan[pool_all]]
        want = row[finite_pool].sort(descending=True).values[: n_real - n_nan]
        assert torch.equal(row[rest], want), f"row {b}: {row[rest].tolist()} is not the top {want.tolist()}"
        assert torch.equal(v[n_nan:n_real], row[rest].clamp_min(0)), f"row {b}: values are not relu(pre)"
        # Padding beyond the pool (aux code only).
        assert bool((v[n_real:] == 0).all()) and bool((i[n_real:] == 0).all())
        if exact:
            assert torch.equal(chosen, _stable_order(row, pool_all)[:n_real]), f"row {b}: not in stable order"


def check_encode(code: tuple[Tensor, ...], pre: Tensor, k: int, dead: Tensor, k_aux: int, exact: bool) -> None:
    values, indices, aux_values, aux_indices = code
    check_code(values, indices, pre, k, allowed=None, exact=exact)
    check_code(aux_values, aux_indices, pre, k_aux, allowed=dead, exact=exact)


def _case(name: str, B: int, d: int, n: int, few_dead: bool) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    seed = B * 31 + n + len(name)
    inputs = CASES[name](B, d, n, seed)
    return inputs, _dead(n, seed, few_dead), _pre(*inputs)


# ---------------------------------------------------------------------------------------------------------------
# C++ kernel (through the dispatcher: the reference where the extension is off) and the reference itself
# ---------------------------------------------------------------------------------------------------------------
CPU_SHAPES = [  # (B, d, n, k, k_aux, few_dead): one token block, the latent-split path (B = 1), several tiles
    (37, 16, 4100, 12, 20, False),
    (1, 16, 6150, 40, 64, False),
    (5, 16, 2100, 6, 48, True),  # about 26 dead latents for 48 aux slots: padding
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("B,d,n,k,k_aux,few_dead", CPU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_kernel_nan_semantics(case, B, d, n, k, k_aux, few_dead, dtype):
    inputs, dead, pre = _case(case, B, d, n, few_dead)
    code = ops.topk_encode(*(t.to(dtype) for t in inputs), k, dead, k_aux)
    assert code.values.dtype == dtype
    exact = ops.backends("cpu")["topk_encode"] == "cpp"
    check_encode(tuple(code), pre, k, dead, k_aux, exact=exact)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_nan_semantics_with_compute_dtype(case, compute_dtype):
    B, d, n, k, k_aux = 9, 16, 3000, 10, 24
    inputs, dead, pre = _case(case, B, d, n, False)
    code = ops.topk_encode(*(t.float() for t in inputs), k, dead, k_aux, compute_dtype=compute_dtype)
    check_encode(tuple(code), pre, k, dead, k_aux, exact=ops.backends("cpu")["topk_encode"] == "cpp")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_reference_nan_semantics(case, dtype):
    B, d, n, k, k_aux = 6, 16, 700, 9, 30
    inputs, dead, pre = _case(case, B, d, n, False)
    code = topk_encode_ref(*(t.to(dtype) for t in inputs), k, dead, k_aux)
    check_encode(code, pre, k, dead, k_aux, exact=False)


def test_cpu_kernel_all_nan_batch_gives_the_first_k_latents():
    # The defect as reported: every pre-activation NaN gave k copies of latent 0 with value 0.
    x = torch.full((3, 16), NAN)
    W = torch.ones(50, 16)
    code = ops.topk_encode(x, W, torch.zeros(50), torch.zeros(16), 5, torch.ones(50, dtype=torch.bool), 4)
    assert bool(torch.isnan(code.values).all()) and bool(torch.isnan(code.aux_values).all())
    for idx in (code.indices, code.aux_indices):
        assert all(len(set(row.tolist())) == idx.shape[1] for row in idx)
    if ops.backends("cpu")["topk_encode"] == "cpp":
        assert torch.equal(code.indices, torch.arange(5).expand(3, 5))


# ---------------------------------------------------------------------------------------------------------------
# Triton, under the interpreter
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tk() -> Iterator[object]:
    pytest.importorskip("triton", reason="triton is not installed")
    from ._triton_worker import start_worker

    worker = start_worker()
    try:
        yield worker
    finally:
        worker.close()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_nan_semantics(tk, case, dtype):
    B, d, n, k, k_aux = 5, 16, 300, 6, 12
    inputs, dead, pre = _case(case, B, d, n, False)
    code = tk.topk_encode_triton(*(t.to(dtype) for t in inputs), k, dead, k_aux)
    check_encode(code, pre, k, dead, k_aux, exact=True)


@pytest.mark.parametrize("case", ["row_nan", "inf_row"])
def test_triton_nan_semantics_with_compute_dtype_and_padding(tk, case):
    B, d, n, k, k_aux = 4, 16, 200, 5, 16
    inputs, dead, pre = _case(case, B, d, n, True)
    code = tk.topk_encode_triton(*(t.float() for t in inputs), k, dead, k_aux, torch.bfloat16)
    check_encode(code, pre, k, dead, k_aux, exact=True)


@pytest.mark.parametrize("case", ["many_nan", "row_nan", "inf_row"])
def test_triton_chunked_path_nan_semantics(tk, case):
    # k above the fused kernel's limit: the chunked torch.topk path (tie order unspecified there).
    B, d, n, k, k_aux = 3, 16, 4200, 260, 270
    inputs, dead, pre = _case(case, B, d, n, False)
    code = tk.topk_encode_triton(*(t.float() for t in inputs), k, dead, k_aux)
    check_encode(code, pre, k, dead, k_aux, exact=False)
