"""A worker process that runs the Triton launchers under the Triton interpreter, for tests on CPU tensors.

The interpreter only works when ``TRITON_INTERPRET=1`` is set before ``triton`` itself is imported (triton's own
``tl.max``/``tl.sum`` are JIT functions created at import), and ``import mi_crow.ops`` imports triton in the test
process. So the launchers run in one worker subprocess started with the variable set; each call sends it the
arguments (tensors serialised with ``torch.save``) and gets the result, or the exception type and message, back.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from typing import Any

import torch

_WORKER = r"""
import io, os, struct, sys
import torch
protocol = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol stream
import mi_crow.ops.triton as tk
from mi_crow.ops.triton.encode import _topk_encode_kernel
requests = sys.stdin.buffer


def range_checks(x, W_enc, b_enc, b_dec, W_dec, k, bad_index):
    # How many index-range reductions (torch.aminmax) encode -> decode -> gather_dot -> scatter_rows runs on the
    # encode's own indices, and the error after writing bad_index into them.
    calls = [0]
    original = torch.aminmax

    def counting(*a, **kw):
        calls[0] += 1
        return original(*a, **kw)

    torch.aminmax = counting
    try:
        values, indices, _, _ = tk.topk_encode_triton(x, W_enc, b_enc, b_dec, k, None, 0, None)
        x_hat = tk.sparse_decode_triton(values, indices, W_dec, b_dec)
        tk.gather_dot_triton(x_hat, indices, W_dec)
        tk.scatter_rows_triton(values, indices, x_hat, W_dec.shape[0])
        clean = calls[0]
        indices[0, 0] = bad_index
        try:
            tk.sparse_decode_triton(values, indices, W_dec, b_dec)
            error = ""
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        return clean, calls[0], error
    finally:
        torch.aminmax = original
while True:
    header = requests.read(8)
    if len(header) < 8:
        break
    (size,) = struct.unpack("<Q", header)
    name, args = torch.load(io.BytesIO(requests.read(size)), weights_only=True)
    try:
        if name == "kernel_kind":
            reply = (True, type(_topk_encode_kernel).__name__)
        elif name == "range_checks":
            reply = (True, range_checks(*args))
        else:
            reply = (True, getattr(tk, name)(*args))
    except Exception as exc:
        reply = (False, (type(exc).__name__, str(exc)))
    buffer = io.BytesIO()
    torch.save(reply, buffer)
    data = buffer.getvalue()
    protocol.write(struct.pack("<Q", len(data)) + data)
    protocol.flush()
"""


class InterpretedKernels:
    """Calls ``mi_crow.ops.triton.<name>(*args)`` in a worker process running the Triton interpreter."""

    def __init__(self) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )

    def call(self, name: str, *args: Any) -> Any:
        buffer = io.BytesIO()
        torch.save((name, args), buffer)
        data = buffer.getvalue()
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(struct.pack("<Q", len(data)) + data)
        self._proc.stdin.flush()
        header = self._proc.stdout.read(8)
        if len(header) < 8:
            raise RuntimeError(f"Triton interpreter worker died (exit code {self._proc.poll()})")
        (size,) = struct.unpack("<Q", header)
        ok, payload = torch.load(io.BytesIO(self._proc.stdout.read(size)), weights_only=True)
        if not ok:
            kind, message = payload
            raise {"ValueError": ValueError, "TypeError": TypeError}.get(kind, RuntimeError)(f"{kind}: {message}")
        return payload

    def __getattr__(self, name: str) -> Any:
        if not name.endswith("_triton"):
            raise AttributeError(name)
        return lambda *args: self.call(name, *args)

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=30)


def start_worker() -> InterpretedKernels:
    """A started worker whose module really runs under the interpreter (the caller closes it)."""
    worker = InterpretedKernels()
    kind = worker.call("kernel_kind")
    if kind != "InterpretedFunction":
        worker.close()
        raise RuntimeError(f"the Triton worker did not start under the interpreter (kernel is a {kind})")
    return worker
