"""Kernel registration for the ``mi_crow`` ops: reference, C++ extension, Triton, fakes and autograd.

Import order matters and is fixed here: schemas are defined first, then the reference is registered as the
backend-agnostic kernel (``CompositeExplicitAutograd``), then ``mi_crow._C`` is loaded (its
``TORCH_LIBRARY_IMPL`` blocks add CPU kernels, and CUDA C++ kernels where it was built with CUDA), then the
Triton launchers are registered for CUDA for every op the extension did not already cover. A device-specific
kernel always wins over the composite one, so the dispatcher picks the fastest available path from the tensors.

Environment switches (read once, at import):

- ``MI_CROW_DISABLE_EXTENSION=1``: do not load ``mi_crow._C``; CPU uses the reference.
- ``MI_CROW_DISABLE_TRITON=1``: do not register Triton kernels; CUDA uses the reference.
- ``MI_CROW_REQUIRE_EXTENSION=1``: a missing or broken ``mi_crow._C`` raises ``ImportError``.
- ``MI_CROW_CPU_ISA=baseline|avx512|avx512bf16|amx``: the highest instruction-set level the C++ CPU kernels may
  use (clamped to what the CPU supports; default: the best it supports). See :func:`cpu_isa`.
- ``MI_CROW_LOWP_GEMM=auto|onednn|mkl|fp32``: the matrix product behind a bf16 / fp16 encoder on CPU (default
  ``auto``: oneDNN's bf16 micro-kernel where the CPU has bf16 instructions, else the exact widened float32
  product). A product this machine cannot run falls back to the automatic choice. See :func:`cpu_isa`.

Autocast: ``topk_encode`` has an ``AutocastCPU`` and an ``AutocastCUDA`` kernel. Inside
``torch.autocast(device, dtype=torch.bfloat16)`` (or float16) a float32 ``topk_encode`` without a
``compute_dtype`` runs with ``compute_dtype`` = the autocast dtype: the encoder product in low precision, values,
gradients and master weights in float32, exactly as an explicit ``compute_dtype`` would.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from mi_crow.ops import reference
from mi_crow.ops.schemas import LIB, OP_NAMES, qualname
from mi_crow.validation import check_choice

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


# ---------------------------------------------------------------------------------------------------------------
# Reference kernels (every device without a specific kernel)
# ---------------------------------------------------------------------------------------------------------------
_REFERENCES = {
    "topk_encode": reference.topk_encode_ref,
    "sparse_decode": reference.sparse_decode_ref,
    "gather_dot": reference.gather_dot_ref,
    "scatter_rows": reference.scatter_rows_ref,
    "sparse_decode_backward": reference.sparse_decode_backward_ref,
    "sparse_decode_with_aux": reference.sparse_decode_with_aux_ref,
    "sparse_decode_with_aux_backward": reference.sparse_decode_with_aux_backward_ref,
}
for _name, _fn in _REFERENCES.items():
    LIB.impl(_name, _fn, "CompositeExplicitAutograd")


# ---------------------------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes only, for torch.compile and FakeTensor tracing
# ---------------------------------------------------------------------------------------------------------------
@torch.library.register_fake(qualname("topk_encode"))
def _topk_encode_fake(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    dead_mask: Tensor | None,
    k_aux: int,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B = x.shape[0]
    ka = k_aux if dead_mask is not None else 0
    return (
        x.new_empty((B, k)),
        x.new_empty((B, k), dtype=torch.int64),
        x.new_empty((B, ka)),
        x.new_empty((B, ka), dtype=torch.int64),
    )


@torch.library.register_fake(qualname("sparse_decode"))
def _sparse_decode_fake(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    return W_dec.new_empty((values.shape[0], W_dec.shape[1]))


@torch.library.register_fake(qualname("gather_dot"))
def _gather_dot_fake(grad_out: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    return grad_out.new_empty((indices.shape[0], indices.shape[1]))


@torch.library.register_fake(qualname("scatter_rows"))
def _scatter_rows_fake(coef: Tensor, indices: Tensor, x: Tensor, n: int) -> Tensor:
    return x.new_empty((n, x.shape[1]))


@torch.library.register_fake(qualname("sparse_decode_backward"))
def _sparse_decode_backward_fake(
    grad_out: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor
) -> tuple[Tensor, Tensor]:
    return values.new_empty(values.shape), W_dec.new_empty(W_dec.shape)


@torch.library.register_fake(qualname("sparse_decode_with_aux"))
def _sparse_decode_with_aux_fake(
    values: Tensor, indices: Tensor, aux_values: Tensor, aux_indices: Tensor, W_dec: Tensor, b_dec: Tensor
) -> tuple[Tensor, Tensor]:
    d = W_dec.shape[1]
    return W_dec.new_empty((values.shape[0], d)), W_dec.new_empty((aux_values.shape[0], d))


@torch.library.register_fake(qualname("sparse_decode_with_aux_backward"))
def _sparse_decode_with_aux_backward_fake(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    aux_grad_out: Tensor,
    aux_values: Tensor,
    aux_indices: Tensor,
    W_dec: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    return values.new_empty(values.shape), aux_values.new_empty(aux_values.shape), W_dec.new_empty(W_dec.shape)


# ---------------------------------------------------------------------------------------------------------------
# Autograd: every backward is expressed with the ops themselves, so it runs on the same fast kernels and never
# builds a dense [B, n] matrix or a [B*k, d] temporary.
# ---------------------------------------------------------------------------------------------------------------
def _sum_rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.sum(0, dtype=acc).to(dtype)


def _topk_encode_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, W_enc, b_enc, b_dec, _k, _dead_mask, _k_aux, _compute_dtype = inputs
    values, indices, aux_values, aux_indices = output
    ctx.save_for_backward(x, W_enc, b_dec, values, indices, aux_values, aux_indices)
    ctx.b_enc_dtype = b_enc.dtype


def _topk_encode_backward(ctx, grad_values, _gi, grad_aux_values, _gai):  # type: ignore[no-untyped-def]
    x, W_enc, b_dec, values, indices, aux_values, aux_indices = ctx.saved_tensors
    need_x, need_w, need_be, need_bd = ctx.needs_input_grad[:4]
    n = W_enc.shape[0]
    coefs, idxs = [], []
    # ReLU gradient: a slot whose value was clipped to 0 (or an aux padding slot) passes nothing back.
    if grad_values is not None:
        coefs.append(grad_values * (values > 0))
        idxs.append(indices)
    if grad_aux_values is not None and aux_values.shape[1] > 0:
        coefs.append(grad_aux_values * (aux_values > 0))
        idxs.append(aux_indices)
    grad_x = grad_w = grad_be = grad_bd = None
    if not coefs:
        return grad_x, grad_w, grad_be, grad_bd, None, None, None, None
    grad_pre = coefs[0] if len(coefs) == 1 else torch.cat(coefs, dim=1)
    idx = idxs[0] if len(idxs) == 1 else torch.cat(idxs, dim=1)
    grad_pre = grad_pre.to(x.dtype)
    if need_w:
        grad_w = torch.ops.mi_crow.scatter_rows(grad_pre, idx, x - b_dec, n)
    acc = torch.float64 if grad_pre.dtype == torch.float64 else torch.float32
    grad_be_acc = None
    if need_be or (need_bd and not need_x):
        grad_be_acc = torch.zeros(n, dtype=acc, device=grad_pre.device)
        grad_be_acc = grad_be_acc.index_add(0, idx.reshape(-1), grad_pre.reshape(-1).to(acc))
        if need_be:
            grad_be = grad_be_acc.to(ctx.b_enc_dtype)
    if need_x:
        zero_bias = W_enc.new_zeros((W_enc.shape[1],))
        gx = torch.ops.mi_crow.sparse_decode(grad_pre, idx, W_enc, zero_bias)
        grad_x = gx.to(x.dtype)
        if need_bd:
            grad_bd = -_sum_rows(gx, b_dec.dtype)
    elif need_bd:
        # sum_b grad_x[b] = sum_b sum_j grad_pre[b, j] W_enc[idx[b, j]] = grad_b_enc @ W_enc: one pass over W_enc
        # instead of gathering B * k rows (x itself is data and needs no gradient in training).
        grad_bd = -(grad_be_acc.to(W_enc.dtype) @ W_enc).to(b_dec.dtype)
    return grad_x, grad_w, grad_be, grad_bd, None, None, None, None


def _sparse_decode_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    values, indices, W_dec, b_dec = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.b_dec_dtype = b_dec.dtype


def _decode_grads(
    grad_out: Tensor | None, values: Tensor, indices: Tensor, W_dec: Tensor, need_v: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    # The values and W_dec gradients of one sparse_decode (grad_out already in W_dec.dtype), only those asked for.
    grad_v = grad_w = None
    if grad_out is None:
        return grad_v, grad_w
    if need_v and need_w:
        grad_v, grad_w = torch.ops.mi_crow.sparse_decode_backward(
            grad_out, values.to(grad_out.dtype), indices, W_dec
        )
        grad_v = grad_v.to(values.dtype)
    elif need_v:
        grad_v = torch.ops.mi_crow.gather_dot(grad_out, indices, W_dec).to(values.dtype)
    elif need_w:
        grad_w = torch.ops.mi_crow.scatter_rows(values.to(grad_out.dtype), indices, grad_out, W_dec.shape[0])
    return grad_v, grad_w


def _sparse_decode_backward(ctx, grad_out):  # type: ignore[no-untyped-def]
    values, indices, W_dec = ctx.saved_tensors
    need_v, _, need_w, need_b = ctx.needs_input_grad
    grad_out = grad_out.to(W_dec.dtype)
    grad_v, grad_w = _decode_grads(grad_out, values, indices, W_dec, need_v, need_w)
    grad_b = _sum_rows(grad_out, ctx.b_dec_dtype) if need_b else None
    return grad_v, None, grad_w, grad_b


def _gather_dot_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    grad_out, indices, W = inputs
    ctx.save_for_backward(grad_out, indices, W)


def _gather_dot_backward(ctx, grad):  # type: ignore[no-untyped-def]
    g, indices, W = ctx.saved_tensors
    need_g, _, need_w = ctx.needs_input_grad
    grad_g = grad_w = None
    if need_g:
        grad_g = torch.ops.mi_crow.sparse_decode(grad.to(W.dtype), indices, W, W.new_zeros((W.shape[1],)))
        grad_g = grad_g.to(g.dtype)
    if need_w:
        grad_w = torch.ops.mi_crow.scatter_rows(grad.to(g.dtype), indices, g, W.shape[0]).to(W.dtype)
    return grad_g, None, grad_w


def _scatter_rows_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    coef, indices, x, _n = inputs
    ctx.save_for_backward(coef, indices, x)


def _scatter_rows_backward(ctx, grad):  # type: ignore[no-untyped-def]
    coef, indices, x = ctx.saved_tensors
    need_c, _, need_x, _ = ctx.needs_input_grad
    grad_c = grad_x = None
    grad = grad.to(x.dtype)
    if need_c:
        grad_c = torch.ops.mi_crow.gather_dot(x, indices, grad).to(coef.dtype)
    if need_x:
        grad_x = torch.ops.mi_crow.sparse_decode(coef.to(x.dtype), indices, grad, grad.new_zeros((grad.shape[1],)))
    return grad_c, None, grad_x, None


def _decode_backward_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    grad_out, values, indices, W_dec = inputs
    ctx.save_for_backward(grad_out, values, indices, W_dec)


def _decode_backward_grads(
    g: Tensor,
    values: Tensor,
    indices: Tensor,
    W: Tensor,
    gg_values: Tensor | None,
    gg_W: Tensor | None,
    need_g: bool,
    need_v: bool,
    need_w: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    # Second order of one code: grad_values = gather_dot(g, indices, W) and grad_W = scatter_rows(values, indices,
    # g) are bilinear, so their gradients w.r.t. g, values and W are again ops.
    zero = W.new_zeros((W.shape[1],))
    grad_g = grad_v = grad_w = None
    if need_g:
        grad_g = torch.zeros_like(g)
        if gg_values is not None:
            grad_g = grad_g + torch.ops.mi_crow.sparse_decode(gg_values.to(W.dtype), indices, W, zero)
        if gg_W is not None:
            grad_g = grad_g + torch.ops.mi_crow.sparse_decode(values, indices, gg_W.to(W.dtype), zero)
    if need_v and gg_W is not None:
        grad_v = torch.ops.mi_crow.gather_dot(g, indices, gg_W.to(g.dtype)).to(values.dtype)
    if need_w and gg_values is not None:
        grad_w = torch.ops.mi_crow.scatter_rows(gg_values.to(g.dtype), indices, g, W.shape[0]).to(W.dtype)
    return grad_g, grad_v, grad_w


def _decode_backward_backward(ctx, gg_values, gg_W):  # type: ignore[no-untyped-def]
    # Double backward of sparse_decode.
    g, values, indices, W = ctx.saved_tensors
    need_g, need_v, _, need_w = ctx.needs_input_grad
    grad_g, grad_v, grad_w = _decode_backward_grads(g, values, indices, W, gg_values, gg_W, need_g, need_v, need_w)
    return grad_g, grad_v, None, grad_w


def _sparse_decode_with_aux_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    values, indices, aux_values, aux_indices, W_dec, b_dec = inputs
    ctx.save_for_backward(values, indices, aux_values, aux_indices, W_dec)
    ctx.b_dec_dtype = b_dec.dtype


def _sparse_decode_with_aux_backward(ctx, grad_out, aux_grad_out):  # type: ignore[no-untyped-def]
    values, indices, aux_values, aux_indices, W_dec = ctx.saved_tensors
    need_v, _, need_av, _, need_w, need_b = ctx.needs_input_grad
    grad_v = grad_av = grad_w = grad_b = None
    if grad_out is not None:
        grad_out = grad_out.to(W_dec.dtype)
    if aux_grad_out is not None:
        aux_grad_out = aux_grad_out.to(W_dec.dtype)
    if need_w and grad_out is not None and aux_grad_out is not None:
        # The AuxK step: one pass over the decoder rows gives one W_dec gradient for both codes. The value
        # gradients are dots with rows that pass has already loaded, so they come along even when not asked.
        gv, gav, grad_w = torch.ops.mi_crow.sparse_decode_with_aux_backward(
            grad_out, values.to(W_dec.dtype), indices, aux_grad_out, aux_values.to(W_dec.dtype), aux_indices, W_dec
        )
        grad_v = gv.to(values.dtype) if need_v else None
        grad_av = gav.to(aux_values.dtype) if need_av else None
    else:
        # Only one output is used, or W_dec needs no gradient: each code on its own, as sparse_decode does (so at
        # most one of the two W_dec gradients exists).
        grad_v, main_w = _decode_grads(grad_out, values, indices, W_dec, need_v, need_w)
        grad_av, aux_w = _decode_grads(aux_grad_out, aux_values, aux_indices, W_dec, need_av, need_w)
        grad_w = main_w if main_w is not None else aux_w
    if need_b and grad_out is not None:
        grad_b = _sum_rows(grad_out, ctx.b_dec_dtype)
    return grad_v, None, grad_av, None, grad_w, grad_b


def _decode_with_aux_backward_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    grad_out, values, indices, aux_grad_out, aux_values, aux_indices, W_dec = inputs
    ctx.save_for_backward(grad_out, values, indices, aux_grad_out, aux_values, aux_indices, W_dec)


def _decode_with_aux_backward_backward(ctx, gg_values, gg_aux_values, gg_W):  # type: ignore[no-untyped-def]
    # Double backward of sparse_decode_with_aux: the fused op is the sum of two single-code backwards sharing W,
    # so its gradient is the sum of their two double backwards (W's gradient gets both terms).
    g, values, indices, ag, aux_values, aux_indices, W = ctx.saved_tensors
    need_g, need_v, _, need_ag, need_av, _, need_w = ctx.needs_input_grad
    grad_g, grad_v, grad_w = _decode_backward_grads(g, values, indices, W, gg_values, gg_W, need_g, need_v, need_w)
    grad_ag, grad_av, aux_grad_w = _decode_backward_grads(
        ag, aux_values, aux_indices, W, gg_aux_values, gg_W, need_ag, need_av, need_w
    )
    if aux_grad_w is not None:
        grad_w = aux_grad_w if grad_w is None else grad_w + aux_grad_w
    return grad_g, grad_v, None, grad_ag, grad_av, None, grad_w


torch.library.register_autograd(
    qualname("topk_encode"), _topk_encode_backward, setup_context=_topk_encode_setup
)
torch.library.register_autograd(
    qualname("sparse_decode_backward"), _decode_backward_backward, setup_context=_decode_backward_setup
)
torch.library.register_autograd(
    qualname("sparse_decode"), _sparse_decode_backward, setup_context=_sparse_decode_setup
)
torch.library.register_autograd(
    qualname("sparse_decode_with_aux_backward"),
    _decode_with_aux_backward_backward,
    setup_context=_decode_with_aux_backward_setup,
)
torch.library.register_autograd(
    qualname("sparse_decode_with_aux"), _sparse_decode_with_aux_backward, setup_context=_sparse_decode_with_aux_setup
)
torch.library.register_autograd(qualname("gather_dot"), _gather_dot_backward, setup_context=_gather_dot_setup)
torch.library.register_autograd(
    qualname("scatter_rows"), _scatter_rows_backward, setup_context=_scatter_rows_setup
)


# ---------------------------------------------------------------------------------------------------------------
# Autocast: inside torch.autocast(device, dtype=bf16/fp16) a float32 topk_encode asks for the low-precision
# encoder product through its compute_dtype, so values, gradients and master weights stay float32 (casting the
# inputs, as torch.library.register_autocast does, would give bf16 values and round the weights' gradients).
# The Autocast keys are dispatched before Autograd, so the op is recorded for backward with that compute_dtype.
# ---------------------------------------------------------------------------------------------------------------
AUTOCAST_DEVICES: tuple[str, ...] = ("cpu", "cuda")


def _autocast_compute_dtype(x: Tensor, compute_dtype: torch.dtype | None, device_type: str) -> torch.dtype | None:
    # Autocast lowers float32 work only (as torch's own autocast leaves float64 alone); an explicit compute_dtype
    # is kept.
    if compute_dtype is not None or x.dtype != torch.float32 or not torch.is_autocast_enabled(device_type):
        return compute_dtype
    return torch.get_autocast_dtype(device_type)


def _register_topk_encode_autocast(device_type: str) -> None:
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    op = torch.ops.mi_crow.topk_encode.default

    def run(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, compute_dtype=None):  # type: ignore[no-untyped-def]
        cd = _autocast_compute_dtype(x, compute_dtype, device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, cd)

    def kernel(_keyset, *args, **kwargs):  # type: ignore[no-untyped-def]
        return run(*args, **kwargs)

    LIB.impl("topk_encode", kernel, key_name, with_keyset=True)
    # The Python dispatcher (torch.compile tracing) looks for a Python kernel on the op itself.
    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key, None)
    op.py_impl(key)(run)


for _device_type in AUTOCAST_DEVICES:
    if torch._C._is_autocast_available(_device_type):
        _register_topk_encode_autocast(_device_type)


# ---------------------------------------------------------------------------------------------------------------
# Native kernels
# ---------------------------------------------------------------------------------------------------------------
def _load_extension() -> ModuleType | None:
    if _flag("MI_CROW_DISABLE_EXTENSION"):
        if _flag("MI_CROW_REQUIRE_EXTENSION"):
            raise ImportError(
                "mi_crow.ops: MI_CROW_REQUIRE_EXTENSION=1 and MI_CROW_DISABLE_EXTENSION=1 contradict each other; "
                "unset one of them"
            )
        logger.info("mi_crow._C disabled by MI_CROW_DISABLE_EXTENSION; CPU ops use the PyTorch reference")
        return None
    try:
        return importlib.import_module("mi_crow._C")
    except ImportError as exc:
        if _flag("MI_CROW_REQUIRE_EXTENSION"):
            raise ImportError(
                "mi_crow.ops: MI_CROW_REQUIRE_EXTENSION=1 but the C++ extension mi_crow._C could not be loaded "
                f"({exc}); build it with `pip install --no-build-isolation -e .` or "
                "`python setup.py build_ext --inplace`"
            ) from exc
        logger.warning("mi_crow._C could not be loaded (%s); CPU ops use the PyTorch reference", exc)
        return None


EXTENSION: ModuleType | None = _load_extension()

#: Instruction-set levels of the C++ CPU kernels, lowest first (``csrc/isa.h``).
CPU_ISA_LEVELS: tuple[str, ...] = ("baseline", "avx512", "avx512bf16", "amx")


class CpuIsa(NamedTuple):
    """Which instruction-set level the C++ CPU kernels run at (see :func:`cpu_isa`)."""

    cpu: str
    """The best level this CPU and its OS support: ``"baseline"``, ``"avx512"`` (AVX-512 F/BW/DQ/VL/CD),
    ``"avx512bf16"`` (and AVX512_BF16) or ``"amx"`` (and AMX-TILE/AMX-BF16)."""
    selected: str
    """The level in use: ``cpu``, or a lower one asked for with ``MI_CROW_CPU_ISA``."""
    kernels: str
    """The build of mi_crow's kernels that runs: ``"baseline"`` or ``"avx512"``. The two upper levels run the
    AVX-512 build: no mi_crow kernel has code of its own for them; what they change is the bf16 encoder product
    (``bf16_gemm``: oneDNN's bf16 micro-kernel, which uses AVX512-BF16 or AMX)."""
    native: bool
    """Whether the extension was built with ``MI_CROW_NATIVE=1`` (``-march=native``: not portable)."""
    baseline_target: str
    """The vector extension the baseline build was compiled with: ``""`` for the portable build (SSE4.2, no AVX),
    more for a native build."""
    bf16_gemm: str = "unknown"
    """The matrix product behind a bf16 encoder (``compute_dtype=torch.bfloat16``): ``"onednn"`` (oneDNN's bf16
    micro-kernel: AVX512_BF16 or AMX instructions), ``"mkl"`` (MKL's bf16 GEMM) or ``"fp32"`` (the operands
    widened to float32, exact, on CPUs without bf16 instructions). ``"unknown"`` for an older build."""
    fp16_gemm: str = "unknown"
    """The same for a float16 encoder (``"mkl"`` or ``"fp32"``)."""


def _select_cpu_isa() -> None:
    requested = os.environ.get("MI_CROW_CPU_ISA", "").strip().lower()
    if not requested:
        return
    check_choice(requested, "MI_CROW_CPU_ISA", CPU_ISA_LEVELS)
    if EXTENSION is None or not hasattr(EXTENSION, "request_cpu_isa"):
        return
    selected = EXTENSION.request_cpu_isa(requested)
    if selected != requested:
        logger.info("MI_CROW_CPU_ISA=%s is above what this CPU supports; the CPU kernels use %s", requested, selected)


_select_cpu_isa()

#: Products a bf16 / fp16 encoder may use (``csrc/lowp_gemm.h``); ``auto`` picks the fastest available.
LOWP_GEMMS: tuple[str, ...] = ("auto", "onednn", "mkl", "fp32")


def _select_lowp_gemm() -> None:
    requested = os.environ.get("MI_CROW_LOWP_GEMM", "").strip().lower()
    if not requested:
        return
    check_choice(requested, "MI_CROW_LOWP_GEMM", LOWP_GEMMS)
    if EXTENSION is None or not hasattr(EXTENSION, "request_lowp_gemm"):
        return
    used = EXTENSION.request_lowp_gemm(requested)
    if requested != "auto" and used != requested:
        logger.info("MI_CROW_LOWP_GEMM=%s is not available on this machine; bf16 encoders use %s", requested, used)


_select_lowp_gemm()


def cpu_isa() -> CpuIsa | None:
    """Report the instruction-set level of the C++ CPU kernels (nothing is printed).

    The extension is built for a portable baseline and, on x86-64, a second time for AVX-512; the CPU's flags pick
    the build at run time, and ``MI_CROW_CPU_ISA`` (read at import) can ask for a lower level.

    Returns:
        A :class:`CpuIsa`, or None when the C++ extension is not loaded (or is an older build without levels).
    """
    if EXTENSION is None or not hasattr(EXTENSION, "cpu_isa"):
        return None
    return CpuIsa(**EXTENSION.cpu_isa())


def _has_kernel(op: str, key: str) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname(op), key))


# Ops whose CUDA kernel came from the C++ extension (csrc/cuda/); these take precedence over Triton.
NATIVE_CUDA_OPS: frozenset[str] = frozenset(
    op for op in OP_NAMES if EXTENSION is not None and _has_kernel(op, "CUDA")
)
NATIVE_CPU_OPS: frozenset[str] = frozenset(op for op in OP_NAMES if EXTENSION is not None and _has_kernel(op, "CPU"))


def _register_triton() -> frozenset[str]:
    if _flag("MI_CROW_DISABLE_TRITON"):
        logger.info("Triton kernels disabled by MI_CROW_DISABLE_TRITON; CUDA ops without a C++ kernel use the reference")
        return frozenset()
    try:
        import triton  # noqa: F401
    except ImportError:
        return frozenset()
    try:
        kernels = importlib.import_module("mi_crow.ops.triton")
    except Exception as exc:  # a broken optional backend must never make the package unusable
        logger.warning("mi_crow.ops.triton could not be imported (%s); CUDA uses the reference", exc)
        return frozenset()
    registered = set()
    for op in OP_NAMES:
        # Ops without a launcher (the fused decode backwards, the composite sparse_decode_with_aux) keep their
        # composite kernel, which calls the ops that do have one.
        launcher = getattr(kernels, f"{op}_triton", None)
        if launcher is None or op in NATIVE_CUDA_OPS:
            continue
        LIB.impl(op, launcher, "CUDA")
        registered.add(op)
    return frozenset(registered)


TRITON_OPS: frozenset[str] = _register_triton()

# Ops whose only kernel is a composite that calls another op on every device: they run on that op's backend.
COMPOSITE_OPS: dict[str, str] = {"sparse_decode_with_aux": "sparse_decode"}


def backends(device_type: str = "cpu") -> dict[str, str]:
    """Report which implementation serves each op on a device type.

    Args:
        device_type: ``"cpu"``, ``"cuda"`` or any other torch device type (e.g. ``"mps"``).

    Returns:
        Op name -> ``"cpp"`` (C++ CPU kernel), ``"cuda"`` (CUDA C++ kernel), ``"triton"`` or ``"reference"``.
        An op in ``COMPOSITE_OPS`` (``sparse_decode_with_aux``: two ``sparse_decode`` calls) reports the backend of
        the op it calls, since that is the kernel that runs.
    """
    if not isinstance(device_type, str):
        raise TypeError(f"backends: device_type must be a str such as 'cpu' or 'cuda', got {device_type!r}")
    device_type = torch.device(device_type).type
    result = {}
    for op in OP_NAMES:
        runs = COMPOSITE_OPS.get(op, op)
        if device_type == "cpu" and runs in NATIVE_CPU_OPS:
            result[op] = "cpp"
        elif device_type == "cuda" and runs in NATIVE_CUDA_OPS:
            result[op] = "cuda"
        elif device_type == "cuda" and runs in TRITON_OPS:
            result[op] = "triton"
        else:
            result[op] = "reference"
    return result
