"""BatchTopK on the Triton encode kernel, run under the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors and
checked against the dense reference (the pattern of tests/ops/test_triton.py: the interpreter must be enabled
before triton is imported, so the Triton side runs in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from mi_crow.ops.batch_topk import batch_topk_ref  # noqa: E402

_SCRIPT = r"""
import sys, torch
import mi_crow.ops.triton as tk
from mi_crow.ops.triton.encode import _topk_encode_kernel
assert type(_topk_encode_kernel).__name__ == "InterpretedFunction"
from mi_crow.ops.batch_topk import batch_topk_encode
x, W, b_enc, b_dec, k, cand = torch.load(sys.argv[1], weights_only=True)
code = batch_topk_encode(x, W, b_enc, b_dec, k, candidates=cand, encode_fn=tk.topk_encode_triton)
torch.save((code.values.detach(), code.indices, code.refinements), sys.argv[2])
"""


@pytest.mark.slow
def test_batch_topk_on_the_interpreted_triton_encode_matches_reference(tmp_path):
    # Two candidates per token: the hogging token forces refinements, so the saturated-token path runs on Triton.
    candidates = 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    x[0] *= 5  # one token holds many of the batch's winners: forces refinements at width 2
    W = torch.randn(40, 8, generator=g) / 3
    b_enc = torch.randn(40, generator=g) * 0.2
    b_dec = torch.randn(8, generator=g) * 0.1
    k = 2
    src, dst = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save((x, W, b_enc, b_dec, k, candidates), src)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(src), str(dst)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    values, indices, refinements = torch.load(dst, weights_only=True)
    dense = torch.zeros(16, 40).scatter_add(1, indices, values)
    torch.testing.assert_close(dense, batch_topk_ref(x, W, b_enc, b_dec, k), atol=1e-5, rtol=1e-5)
    assert refinements > 0


_SELECT_SCRIPT = r"""
import sys, torch
from mi_crow.ops.triton.batch_select import _count_kernel, batch_topk_select_triton
import mi_crow.ops.triton as tk
assert type(_count_kernel).__name__ == "InterpretedFunction"
from mi_crow.ops.batch_topk import batch_topk_encode
cases, problem = torch.load(sys.argv[1], weights_only=True)
counts = [batch_topk_select_triton(values, total) for values, total in cases]
x, W, b_enc, b_dec, k, cand = problem
code = batch_topk_encode(x, W, b_enc, b_dec, k, candidates=cand, encode_fn=tk.topk_encode_triton,
                         select_fn=batch_topk_select_triton)
torch.save((counts, code.values.detach(), code.indices, code.refinements), sys.argv[2])
"""


def _sorted_rows(values):
    return values.sort(dim=1, descending=True).values.contiguous()


@pytest.mark.slow
def test_batch_topk_global_selection_kernel_in_the_interpreter(tmp_path):
    from mi_crow.ops.batch_topk import batch_topk_select

    g = torch.Generator().manual_seed(1)
    ties = torch.randint(0, 4, (9, 6), generator=g).float() / 2  # many ties at every threshold
    padded = torch.rand(7, 8, generator=g)
    padded[::2, 5:] = -torch.inf  # the refinement's padding slots
    signed = torch.randn(13, 5, generator=g)  # negative values: the key's flipped magnitude bits
    cases = [(_sorted_rows(ties), 17), (_sorted_rows(padded), 20), (_sorted_rows(signed), 1),
             (_sorted_rows(signed), 64), (_sorted_rows(signed), 65)]
    x = torch.randn(16, 8, generator=g)
    x[0] *= 5
    problem = (x, torch.randn(40, 8, generator=g) / 3, torch.randn(40, generator=g) * 0.2,
               torch.randn(8, generator=g) * 0.1, 2, 2)
    src, dst = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save((cases, problem), src)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _SELECT_SCRIPT, str(src), str(dst)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts, values, indices, refinements = torch.load(dst, weights_only=True)
    for (vals, total), got in zip(cases, counts):
        assert int(got.sum()) == min(total, vals.numel())
        assert bool((got >= 0).all()) and bool((got <= vals.shape[1]).all())
        # The kept prefixes hold a multiset of values equal to the reference's top-total (ties may move).
        keep = torch.arange(vals.shape[1]).unsqueeze(0) < got.unsqueeze(1)
        ref = torch.arange(vals.shape[1]).unsqueeze(0) < batch_topk_select(vals, total).unsqueeze(1)
        torch.testing.assert_close(vals[keep].sort().values, vals[ref].sort().values)
    x, W, b_enc, b_dec, k, _ = problem
    dense = torch.zeros(16, 40).scatter_add(1, indices, values)
    torch.testing.assert_close(dense, batch_topk_ref(x, W, b_enc, b_dec, k), atol=1e-5, rtol=1e-5)
    assert refinements > 0
