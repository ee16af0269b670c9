"""The run-time choice of the low-precision encoder product (``csrc/lowp_gemm.h``).

Every product this machine can run (``fp32``: widened operands, always; ``mkl``: where torch exports MKL's
mixed-precision GEMMs; ``onednn``: on CPUs with bf16 instructions) must keep the ``compute_dtype`` contract: the
top-k of the rounded operands' product accumulated in float32, against a float64 ground truth and the PyTorch
reference, on shapes that take every branch of the kernel (token blocks split across threads or latents split
across threads, a short last token block, a short last latent tile, the aux code, odd ``d``). The automatic choice
must follow the CPU: oneDNN exactly where the CPU has bf16 instructions, the widened product elsewhere.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import mi_crow.ops as ops
from mi_crow.errors import UserInputError
from mi_crow.ops import registration, topk_encode_ref

from ._helpers import check_topk_choice, dead_mask, make_encoder

EXT = registration.EXTENSION
needs_lowp = pytest.mark.skipif(
    EXT is None or not hasattr(EXT, "request_lowp_gemm"),
    reason="the C++ extension is not loaded (CI requires it: MI_CROW_REQUIRE_EXTENSION=1)",
)


@contextlib.contextmanager
def lowp_gemm(name: str):  # type: ignore[no-untyped-def]
    """Run the block with ``name`` requested; yields the product bf16 actually uses."""
    try:
        yield EXT.request_lowp_gemm(name)
    finally:
        EXT.request_lowp_gemm(os.environ.get("MI_CROW_LOWP_GEMM", "auto") or "auto")


def _available(name: str) -> bool:
    with lowp_gemm(name) as used:
        return used == name


def _rounded_pre(x, W, be, bd, dtype):  # type: ignore[no-untyped-def]
    return (x - bd).to(dtype).double() @ W.to(dtype).double().t() + be.double()


PRODUCTS = ["fp32", "mkl", "onednn"]
# (B, d, n, k, k_aux, threads): 2 threads with 600 tokens -> token blocks split; 1 block and 2 threads with
# n > 2 tiles -> latents split; n not a multiple of the tile (2048) or of a oneDNN strip (64); d odd.
SHAPES = [
    (600, 64, 4200, 16, 24, 2),
    (40, 48, 4500, 8, 16, 2),
    (300, 32, 2100, 5, 0, 1),
    (33, 31, 700, 4, 8, 1),
]


# oneDNN serves bf16 only (fp16 uses mkl or fp32), so that pair is not a case.
PRODUCT_DTYPES = [(p, dt) for p in PRODUCTS for dt in (torch.bfloat16, torch.float16)
                  if not (p == "onednn" and dt == torch.float16)]


@needs_lowp
@pytest.mark.parametrize("product,dtype", PRODUCT_DTYPES)
@pytest.mark.parametrize("B,d,n,k,k_aux,threads", SHAPES)
def test_every_available_product_keeps_the_contract(product, dtype, B, d, n, k, k_aux, threads):
    if not _available(product):
        pytest.skip(f"{product} is not available on this machine ({ops.cpu_isa()})")
    x, W, be, bd = make_encoder(B, d, n, seed=B + n)
    dead = dead_mask(n) if k_aux else None
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with lowp_gemm(product):
            code = ops.topk_encode(x, W, be, bd, k, dead, k_aux, compute_dtype=dtype)
    finally:
        torch.set_num_threads(prev)
    pre = _rounded_pre(x, W, be, bd, dtype)
    check_topk_choice(code.values, code.indices, pre, atol=1e-4)
    ref = topk_encode_ref(x, W, be, bd, k, dead, k_aux, dtype)
    torch.testing.assert_close(code.values, ref[0], atol=1e-4, rtol=1e-4)
    if k_aux:
        check_topk_choice(code.aux_values, code.aux_indices, pre, atol=1e-4, allowed=dead)
        torch.testing.assert_close(code.aux_values, ref[2], atol=1e-4, rtol=1e-4)


@needs_lowp
def test_products_agree_with_each_other():
    # Each is the exact product of the rounded operands summed in float32, in its own order: the values agree to
    # float32 rounding of the sums, and on this tie-free data the chosen latents are the same.
    x, W, be, bd = make_encoder(300, 96, 2500, seed=7)
    results = {}
    for product in PRODUCTS:
        if _available(product):
            with lowp_gemm(product):
                results[product] = ops.topk_encode(x, W, be, bd, 12, compute_dtype=torch.bfloat16)
    assert "fp32" in results
    base = results.pop("fp32")
    for name, code in results.items():
        torch.testing.assert_close(code.values, base.values, atol=1e-5, rtol=1e-5, msg=name)
        assert torch.equal(code.indices, base.indices), name


@needs_lowp
def test_automatic_choice_follows_the_cpu():
    info = ops.cpu_isa()
    assert info.bf16_gemm in ("onednn", "mkl", "fp32") and info.fp16_gemm in ("mkl", "fp32")
    with lowp_gemm("auto") as used:
        if info.selected in ("avx512bf16", "amx"):
            # bf16 instructions: oneDNN's micro-kernel (its self-check must pass on such a CPU).
            assert used == "onednn", info
        else:
            # No bf16 instructions: oneDNN is never used, and neither is MKL's slow mixed-precision path.
            assert used == "fp32", info
    # A product that cannot run here falls back to the automatic choice instead of failing.
    if info.selected not in ("avx512bf16", "amx"):
        with lowp_gemm("onednn") as used:
            assert used == "fp32"


@needs_lowp
def test_request_names_are_checked():
    with pytest.raises(ValueError, match="request_lowp_gemm: name must be auto, onednn, mkl or fp32, got 'cublas'"):
        EXT.request_lowp_gemm("cublas")


@needs_lowp
def test_environment_switch_is_read_and_checked(monkeypatch):
    # The switch is read at import by registration._select_lowp_gemm; call it as the import does.
    try:
        monkeypatch.setenv("MI_CROW_LOWP_GEMM", "fp32")
        registration._select_lowp_gemm()
        assert ops.cpu_isa().bf16_gemm == "fp32"
        monkeypatch.setenv("MI_CROW_LOWP_GEMM", "fastest")
        with pytest.raises(UserInputError, match="MI_CROW_LOWP_GEMM.*'fastest'"):
            registration._select_lowp_gemm()
    finally:
        EXT.request_lowp_gemm("auto")
