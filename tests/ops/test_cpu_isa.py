"""The portable build of the C++ extension and its run-time choice of instruction set (``csrc/isa.h``).

(a) the level reported is the one /proc/cpuinfo's flags imply, and AMX is never selected on a CPU without it;
(b) the baseline build (``MI_CROW_CPU_ISA=baseline``, in a subprocess) gives the AVX-512 build's results: the
    same top-k exactly (both select on the same float32 pre-activations with exact key comparisons), the decoder
    ops within float32 rounding (the AVX-512 rows sum in a different order, with FMA);
(c) setup.py does not pass -march=native unless asked, the loaded build's baseline has no AVX, and no function of
    the built library outside ``mi_crow::isa_avx512`` contains an AVX or AVX-512 instruction.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mi_crow.ops as ops
from mi_crow.ops import registration

ROOT = Path(__file__).resolve().parents[2]
X86 = platform.machine().lower() in ("x86_64", "amd64")

needs_extension = pytest.mark.skipif(
    ops.cpu_isa() is None, reason="the C++ extension is not loaded (CI requires it: MI_CROW_REQUIRE_EXTENSION=1)"
)
needs_x86 = pytest.mark.skipif(not X86, reason="instruction-set levels exist on x86-64 only")

# What each level needs, as /proc/cpuinfo names the flags (the AVX-512 build's target in isa.h).
AVX512_FLAGS = {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx2", "fma", "f16c", "bmi1", "bmi2",
                "popcnt"}


def _cpuinfo_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    assert match, "no flags line in /proc/cpuinfo"
    return set(match.group(1).split())


def _cpuinfo_level(flags: set[str]) -> str:
    if not AVX512_FLAGS <= flags:
        return "baseline"
    if "avx512_bf16" not in flags:
        return "avx512"
    return "amx" if {"amx_tile", "amx_bf16"} <= flags else "avx512bf16"


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    switches = ("MI_CROW_CPU_ISA", "MI_CROW_DISABLE_EXTENSION", "MI_CROW_REQUIRE_EXTENSION")
    full_env = {k: v for k, v in os.environ.items() if k not in switches}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=600,
        cwd=ROOT,
    )


# ---------------------------------------------------------------------------------------------------------------
# (a) the choice of level
# ---------------------------------------------------------------------------------------------------------------
@needs_extension
@needs_x86
@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc/cpuinfo (Linux)")
def test_detected_level_matches_cpuinfo():
    info = ops.cpu_isa()
    assert info.cpu == _cpuinfo_level(_cpuinfo_flags())
    if "MI_CROW_CPU_ISA" not in os.environ:
        assert info.selected == info.cpu
    assert info.kernels == ("baseline" if info.selected == "baseline" else "avx512")


@needs_extension
@needs_x86
@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc/cpuinfo (Linux)")
def test_amx_is_selected_only_on_a_cpu_with_amx():
    has_amx = {"amx_tile", "amx_bf16"} <= _cpuinfo_flags()
    out = _run("import mi_crow.ops as ops; print(tuple(ops.cpu_isa()[:3]))", MI_CROW_CPU_ISA="amx")
    assert out.returncode == 0, out.stderr
    cpu, selected, kernels = ast.literal_eval(out.stdout.strip())
    assert (selected == "amx") == has_amx
    assert selected == cpu  # a request above the CPU is clamped to it
    assert kernels == ("baseline" if cpu == "baseline" else "avx512")


@needs_extension
@pytest.mark.parametrize("level", registration.CPU_ISA_LEVELS)
def test_requests_are_clamped_to_the_cpu(level):
    out = _run("import mi_crow.ops as ops; print(tuple(ops.cpu_isa()[:3]))", MI_CROW_CPU_ISA=level.upper())
    assert out.returncode == 0, out.stderr
    cpu, selected, kernels = ast.literal_eval(out.stdout.strip())
    order = registration.CPU_ISA_LEVELS
    assert selected == order[min(order.index(level), order.index(cpu))]
    assert kernels == ("baseline" if selected == "baseline" else "avx512")


def test_unknown_level_is_an_import_error_naming_the_switch():
    out = _run("import mi_crow.ops", MI_CROW_CPU_ISA="avx2")
    assert out.returncode != 0
    assert "MI_CROW_CPU_ISA must be one of ['baseline', 'avx512', 'avx512bf16', 'amx'], got 'avx2'" in out.stderr


# ---------------------------------------------------------------------------------------------------------------
# (b) the baseline build gives the AVX-512 build's results
# ---------------------------------------------------------------------------------------------------------------
_CASES = r"""
import torch
import mi_crow.ops as ops

def integer_encoder(B, d, n, seed, levels):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-levels, levels + 1, (B, d), generator=g).float()
    W = torch.randint(-levels, levels + 1, (n, d), generator=g).float()
    return x, W, torch.zeros(n), torch.zeros(d)

def continuous(B, d, n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, d, generator=g), torch.randn(n, d, generator=g) / d**0.5, 0.1 * torch.randn(n, generator=g),
            0.1 * torch.randn(d, generator=g))

def cases():
    out = {}
    dead = torch.rand(4100, generator=torch.Generator().manual_seed(3)) < 0.5
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for B in (37, 1, 300):  # one token block, the latent-split path, two token blocks
            x, W, be, bd = (t.to(dtype) for t in continuous(B, 64, 4100, seed=B))
            out[f"encode/{dtype}/{B}"] = tuple(ops.topk_encode(x, W, be, bd, 32, dead, 128))
    x, W, be, bd = integer_encoder(64, 48, 4100, seed=5, levels=1)  # exact ties everywhere
    out["encode/ties"] = tuple(ops.topk_encode(x, W, be, bd, 64, dead, 256))
    x[3] = float("nan")
    x[5, 0] = float("inf")
    be[[7, 2100]] = float("nan")
    out["encode/nan"] = tuple(ops.topk_encode(x, W, be, bd, 16, dead, 40))
    x, W, be, bd = continuous(33, 64, 4100, seed=9)
    out["encode/compute_bf16"] = tuple(ops.topk_encode(x, W, be, bd, 24, dead, 64, compute_dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.bfloat16):
        for d in (48, 64, 77):  # the vector body, and a scalar tail
            v = torch.randn(50, 32, generator=g).to(dtype)
            i = torch.randint(0, 700, (50, 32), generator=g)
            av = torch.randn(50, 64, generator=g).to(dtype)
            ai = torch.randint(0, 700, (50, 64), generator=g)
            W = torch.randn(700, d, generator=g).to(dtype)
            b = torch.randn(d, generator=g).to(dtype)
            gr = torch.randn(50, d, generator=g).to(dtype)
            agr = torch.randn(50, d, generator=g).to(dtype)
            key = f"{dtype}/{d}"
            out[f"decode/{key}"] = (torch.ops.mi_crow.sparse_decode(v, i, W, b),)
            out[f"gather_dot/{key}"] = (torch.ops.mi_crow.gather_dot(gr, i, W),)
            out[f"scatter_rows/{key}"] = (torch.ops.mi_crow.scatter_rows(v, i, gr, 700),)
            out[f"decode_backward/{key}"] = tuple(torch.ops.mi_crow.sparse_decode_backward(gr, v, i, W))
            out[f"with_aux_backward/{key}"] = tuple(
                torch.ops.mi_crow.sparse_decode_with_aux_backward(gr, v, i, agr, av, ai, W))
    return out
"""


@needs_extension
@needs_x86
def test_baseline_build_gives_the_avx512_builds_results(tmp_path):
    info = ops.cpu_isa()
    if info.kernels != "avx512":
        pytest.skip(f"this CPU runs the baseline build only ({info.cpu}); there is no second build to compare")
    path = tmp_path / "baseline.pt"
    out = _run(
        _CASES
        + f"""
assert ops.cpu_isa().kernels == "baseline", ops.cpu_isa()
torch.save(cases(), {str(path)!r})
""",
        MI_CROW_CPU_ISA="baseline",
    )
    assert out.returncode == 0, out.stderr
    baseline = torch.load(path)
    namespace: dict = {}
    exec(_CASES, namespace)
    fast = namespace["cases"]()
    assert set(fast) == set(baseline)
    for key, results in fast.items():
        for j, (got, want) in enumerate(zip(baseline[key], results)):
            what = f"{key} output {j}"
            assert got.dtype == want.dtype and got.shape == want.shape, what
            if key.startswith("encode"):
                # Top-k: both builds rank the same float32 numbers with exact comparisons.
                assert torch.equal(got, want) or (
                    got.is_floating_point() and torch.equal(got.isnan(), want.isnan())
                    and torch.equal(got.nan_to_num(), want.nan_to_num())
                ), what
            elif want.dtype == torch.float32:
                # Decoder ops: float32 sums in a different order (and with FMA): float32 rounding apart.
                scale = float(want.abs().max())
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * scale, msg=what)
            else:
                # bf16 outputs: the float32 sums above, each rounded once: at most one bf16 unit apart.
                ulp = float(torch.finfo(want.dtype).eps) * want.double().abs().clamp_min(1e-3)
                assert bool(((got.double() - want.double()).abs() <= ulp).all()), what


# ---------------------------------------------------------------------------------------------------------------
# (c) the build: no -march=native by default, no AVX outside the AVX-512 build
# ---------------------------------------------------------------------------------------------------------------
def _setup_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("mi_crow_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only as __main__
    return module


def test_setup_does_not_build_for_the_building_cpu_unless_asked():
    setup = _setup_module()
    flags = setup.cxx_flags({})
    assert not any(f.startswith("-march=native") or f.startswith("-mcpu=native") for f in flags), flags
    assert "-march=native" in setup.cxx_flags({"MI_CROW_NATIVE": "1"})
    if X86:
        assert "-march=x86-64-v2" in flags
        sources = setup.cpu_sources()
        avx512 = [s for s in sources if "avx512" in s]
        # One AVX-512 build per kernel file, linked after every baseline object.
        kernels = sorted(Path(s).name for s in sources if s.endswith("_cpu.cpp") and "isa" not in s)
        assert sorted(Path(s).name for s in avx512) == kernels
        assert sources.index(avx512[0]) > max(i for i, s in enumerate(sources) if "avx512" not in s)


def test_setup_fails_clearly_without_torch(tmp_path):
    # A stand-in `torch` that cannot be imported, as in an isolated build environment without torch.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "setup.py", "--version"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert out.returncode != 0
    assert "needs PyTorch" in out.stderr and "--no-build-isolation" in out.stderr
    assert "Traceback" not in out.stderr


@needs_extension
def test_loaded_build_is_portable():
    info = ops.cpu_isa()
    if info.native:
        pytest.skip("this extension was built with MI_CROW_NATIVE=1 (-march=native) on purpose")
    assert info.baseline_target == ""


@needs_extension
@needs_x86
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_no_avx_instruction_outside_the_avx512_build():
    if ops.cpu_isa().native:
        pytest.skip("this extension was built with MI_CROW_NATIVE=1 (-march=native) on purpose")
    so = registration.EXTENSION.__file__
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", so], capture_output=True, text=True,
                             check=True, timeout=300).stdout
    # A ymm/zmm or AVX-512 mask register, or a VEX-encoded (v-prefixed) instruction on xmm registers.
    avx = re.compile(r"%[yz]mm\d+|%k[0-7]\b|\bv[a-z0-9]+\s+.*%xmm")
    function, inside, outside = "", 0, {}
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif avx.search(line):
            if "mi_crow::isa_avx512::" in function:
                inside += 1
            else:
                outside.setdefault(function, line.strip())
    assert inside > 0, "the AVX-512 build is missing from the library"
    assert not outside, f"AVX code outside mi_crow::isa_avx512 (would not run on every x86-64 CPU): {outside}"


def test_cpu_isa_is_none_without_the_extension():
    out = _run("import mi_crow.ops as ops; print(ops.cpu_isa())", MI_CROW_DISABLE_EXTENSION="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"
