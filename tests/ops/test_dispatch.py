"""Dispatch layer: which backend serves each op, and the environment switches (run in subprocesses so the
switches are read by a fresh import)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mi_crow.ops as ops
from mi_crow.ops import registration

from ._helpers import dead_mask, make_encoder

OPS = (
    "topk_encode",
    "sparse_decode",
    "gather_dot",
    "scatter_rows",
    "sparse_decode_backward",
    "sparse_decode_with_aux",
    "sparse_decode_with_aux_backward",
)
_SWITCHES = ("MI_CROW_DISABLE_EXTENSION", "MI_CROW_DISABLE_TRITON", "MI_CROW_REQUIRE_EXTENSION")


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in _SWITCHES}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=300
    )


def test_cpu_backend_is_cpp_exactly_when_the_extension_loaded():
    # sparse_decode_with_aux is a composite of two sparse_decode calls: it reports the C++ kernel they run on.
    expected = "cpp" if registration.EXTENSION is not None else "reference"
    assert ops.backends("cpu") == {op: expected for op in OPS}
    if os.environ.get("MI_CROW_REQUIRE_EXTENSION") == "1":
        assert expected == "cpp"


def test_backends_reports_every_device_type():
    for device in ("cpu", "cuda", "mps"):
        report = ops.backends(device)
        assert set(report) == set(OPS)
        assert set(report.values()) <= {"cpp", "cuda", "triton", "reference"}
    assert set(ops.backends("mps").values()) == {"reference"}
    with pytest.raises(TypeError, match="device_type"):
        ops.backends(0)  # type: ignore[arg-type]


def test_disable_extension_uses_reference_with_same_results(tmp_path: Path):
    x, W, be, bd = make_encoder(19, 48, 2100, seed=8)
    dead = dead_mask(2100)
    code = ops.topk_encode(x, W, be, bd, 6, dead, 12)
    x_hat = ops.sparse_decode(code.values, code.indices, W, bd)
    grads = torch.randn(2, *x.shape)
    fused = torch.ops.mi_crow.sparse_decode_with_aux_backward(
        grads[0], code.values, code.indices, grads[1], code.aux_values, code.aux_indices, W
    )
    torch.save({"inputs": (x, W, be, bd, dead), "values": code.values, "aux": code.aux_values, "x_hat": x_hat,
                "grads": grads, "fused": fused}, tmp_path / "case.pt")
    out = _run(
        f"""
        import torch, mi_crow.ops as ops
        from mi_crow.ops import registration
        assert registration.EXTENSION is None
        assert set(ops.backends("cpu").values()) == {{"reference"}}, ops.backends("cpu")
        case = torch.load({str(tmp_path / "case.pt")!r})
        x, W, be, bd, dead = case["inputs"]
        code = ops.topk_encode(x, W, be, bd, 6, dead, 12)
        torch.testing.assert_close(code.values, case["values"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(code.aux_values, case["aux"], atol=1e-5, rtol=1e-5)
        x_hat = ops.sparse_decode(code.values, code.indices, W, bd)
        torch.testing.assert_close(x_hat, case["x_hat"], atol=1e-4, rtol=1e-5)
        x_hat2, aux_hat = ops.sparse_decode_with_aux(code.values, code.indices, code.aux_values, code.aux_indices,
                                                     W, bd)
        torch.testing.assert_close(x_hat2, case["x_hat"], atol=1e-4, rtol=1e-5)
        g = case["grads"]
        fused = torch.ops.mi_crow.sparse_decode_with_aux_backward(
            g[0], code.values, code.indices, g[1], code.aux_values, code.aux_indices, W
        )
        for got, want in zip(fused, case["fused"]):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        print("OK")
        """,
        MI_CROW_DISABLE_EXTENSION="1",
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


def test_require_extension_makes_a_missing_extension_an_error():
    # sys.modules[name] = None makes `import mi_crow._C` fail as if the extension had not been built.
    code = """
        import sys
        sys.modules["mi_crow._C"] = None
        import mi_crow.ops
        """
    out = _run(code, MI_CROW_REQUIRE_EXTENSION="1")
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "MI_CROW_REQUIRE_EXTENSION" in out.stderr
    # Without the switch the same situation falls back to the reference.
    out = _run(code + "print(sorted(set(mi_crow.ops.backends('cpu').values())))\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['reference']"


def test_disable_triton_switch():
    out = _run(
        """
        import mi_crow.ops as ops
        from mi_crow.ops import registration
        print(sorted(registration.TRITON_OPS), sorted(set(ops.backends("cuda").values()) - {"cuda"}))
        """,
        MI_CROW_DISABLE_TRITON="1",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] ['reference']"


def test_triton_registered_for_cuda_when_available():
    try:
        import triton  # noqa: F401
        import mi_crow.ops.triton_kernels  # noqa: F401
    except ImportError:
        assert registration.TRITON_OPS == frozenset()
        return
    if os.environ.get("MI_CROW_DISABLE_TRITON") == "1":
        assert registration.TRITON_OPS == frozenset()
        return
    report = ops.backends("cuda")
    for op in OPS[:4]:
        assert report[op] == ("cuda" if op in registration.NATIVE_CUDA_OPS else "triton")
    # The fused decode backwards have no Triton twin: their references compose the ops that do.
    assert report["sparse_decode_backward"] == "reference"
    assert report["sparse_decode_with_aux_backward"] == "reference"
    # The composite decode runs the sparse_decode kernel twice, and says so.
    assert report["sparse_decode_with_aux"] == report["sparse_decode"]
    assert "sparse_decode_with_aux" not in registration.TRITON_OPS


def test_import_does_not_pull_in_transformers():
    out = _run("import sys, mi_crow.ops; print('transformers' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
