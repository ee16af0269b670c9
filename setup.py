"""Builds the C++ extension ``mi_crow._C`` from ``csrc/``.

CPU kernels (``csrc/*.cpp``) are always built. The CUDA C++ decoder-gradient kernel (``csrc/cuda/*.cu``) is
added only where a CUDA toolkit and a CUDA build of torch are both present. Build with
``pip install --no-build-isolation -e .`` after installing torch, so pip never pulls a CUDA build of torch.
"""

import glob
import os

from setuptools import setup

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # torch >= 2.10 headers use C++20 features (bit-field initialisers).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    if os.environ.get("MI_CROW_NATIVE", "1") == "1":
        # The kernels are built on the machine that runs them; AVX-512/AMX code paths need this.
        cxx_flags.append("-march=native")
    extra = {"cxx": cxx_flags}
    with_cuda = (
        bool(cuda_sources)
        and cpp_extension.CUDA_HOME is not None
        and __import__("torch").version.cuda is not None
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
            define_macros=[("MI_CROW_WITH_CUDA", "1")],
            py_limited_api=False,
        )
    return cpp_extension.CppExtension(
        "mi_crow._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
