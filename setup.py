"""Builds the C++ extension ``mi_crow._C`` from ``csrc/``.

Install PyTorch first, then build against it without build isolation, so the extension is compiled for the torch
that will run it (and pip never pulls another one)::

    pip install torch
    pip install --no-build-isolation .          # or -e . for a checkout; or: python setup.py build_ext --inplace

Portability: on x86-64 the extension is built for a portable baseline (``-march=x86-64-v2``, no AVX), and the
kernel files are compiled a second time for AVX-512 (``csrc/isa/avx512/``); the CPU's flags pick one build at
run time (``csrc/isa.h``; ``MI_CROW_CPU_ISA`` asks for a lower one). So a wheel or image built on one machine runs
on another. ``MI_CROW_NATIVE=1`` builds the baseline for the building machine instead (``-march=native``): it may
not run on other CPUs.

CPU kernels (``csrc/*.cpp``) are always built. The CUDA C++ decoder-gradient kernel (``csrc/cuda/*.cu``) is
added only where a CUDA toolkit and a CUDA build of torch are both present (``MI_CROW_NO_CUDA=1`` leaves it out).
"""

from __future__ import annotations

import glob
import os
import platform
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))

_NO_TORCH = """
mi_crow: building the C++ extension needs PyTorch, and none was found ({error}).
Install torch first (the build compiles against it), then build without isolation so pip uses that torch:

    pip install torch
    pip install --no-build-isolation .

(A plain `pip install .` builds in an isolated environment that has no torch: mi_crow does not list torch as a
build requirement on purpose, so that the extension is never compiled against a different torch than the one it
runs with.)
"""


def is_x86_64() -> bool:
    """Whether the build targets x86-64 (the only architecture with an AVX-512 build of the kernels)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def native_build(env: dict[str, str] | None = None) -> bool:
    """``MI_CROW_NATIVE=1``: compile the baseline for the building CPU (-march=native)."""
    return (os.environ if env is None else env).get("MI_CROW_NATIVE", "0").strip() == "1"


def cxx_flags(env: dict[str, str] | None = None) -> list[str]:
    """The C++ compiler flags of every translation unit (the AVX-512 build adds its target in the source)."""
    # torch >= 2.10 headers use C++20 features (bit-field initialisers).
    flags = ["-O3", "-std=c++20", "-fopenmp"]
    if native_build(env):
        flags.append("-march=native")
    elif is_x86_64():
        # SSE4.2/POPCNT, no AVX: every x86-64 server and desktop CPU since about 2009 runs it.
        flags += ["-march=x86-64-v2", "-mtune=generic"]
    return flags


def cpu_sources() -> list[str]:
    """The kernel files (baseline build, which registers the ops) and, on x86-64, their AVX-512 builds."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if is_x86_64():
        # Listed after the baseline objects, so that the linker keeps the baseline copy of any inline function
        # both builds emit (isa.h keeps such functions out of the AVX-512 region; this is belt and braces).
        sources += sorted(glob.glob(os.path.join("csrc", "isa", "avx512", "*.cpp")))
    return sources


def _extension(torch, cpp_extension):  # type: ignore[no-untyped-def]
    sources = cpu_sources()
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    extra = {"cxx": cxx_flags()}
    macros = [("MI_CROW_NATIVE_BUILD", "1")] if native_build() else []
    with_cuda = (
        bool(cuda_sources)
        and cpp_extension.CUDA_HOME is not None
        and torch.version.cuda is not None
        and os.environ.get("MI_CROW_NO_CUDA", "0") != "1"
    )
    if with_cuda:
        extra["nvcc"] = ["-O3", "-std=c++17"]
        return cpp_extension.CUDAExtension(
            "mi_crow._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            define_macros=[*macros, ("MI_CROW_WITH_CUDA", "1")],
            py_limited_api=False,
        )
    return cpp_extension.CppExtension(
        "mi_crow._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=macros,
        py_limited_api=False,
    )


if __name__ == "__main__":  # (also under pip: setuptools runs this file as __main__)
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        sys.exit(_NO_TORCH.format(error=exc))
    from setuptools import setup

    setup(
        ext_modules=[_extension(torch, cpp_extension)],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )
