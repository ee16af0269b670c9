"""Bad input gets a clear TypeError/ValueError naming the argument and the value."""

from __future__ import annotations

import pytest
import torch

import mi_crow.ops as ops
from mi_crow.ops import registration

from ._helpers import make_encoder

n, d = 40, 48


@pytest.fixture
def enc():
    return make_encoder(5, d, n)


ENCODE_CASES = [  # (description, mutate(args dict), exception, message fragment)
    ("x not a tensor", lambda a: a.update(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    ("x 3-D", lambda a: a.update(x=a["x"][None]), ValueError, "x must be 2-D"),
    ("x wrong width", lambda a: a.update(x=a["x"][:, :-1]), ValueError, "x must have d_in"),
    ("x integer", lambda a: a.update(x=a["x"].long()), TypeError, "x must be float32"),
    ("W_enc 1-D", lambda a: a.update(W_enc=a["W_enc"][0]), ValueError, "W_enc must be 2-D"),
    ("W_enc dtype", lambda a: a.update(W_enc=a["W_enc"].double()), TypeError, "W_enc must have the dtype of x"),
    ("b_enc shape", lambda a: a.update(b_enc=a["b_enc"][:-1]), ValueError, "b_enc must have shape [40]"),
    ("b_dec shape", lambda a: a.update(b_dec=a["b_dec"][:-1]), ValueError, "b_dec must have shape [48]"),
    ("k zero", lambda a: a.update(k=0), ValueError, "k must be in [1, 40], got 0"),
    ("k too big", lambda a: a.update(k=41), ValueError, "k must be in [1, 40], got 41"),
    ("k float", lambda a: a.update(k=4.0), TypeError, "k must be an int"),
    ("k bool", lambda a: a.update(k=True), TypeError, "k must be an int"),
    ("k_aux negative", lambda a: a.update(k_aux=-1), ValueError, "k_aux must be in [0, 40], got -1"),
    ("k_aux too big", lambda a: a.update(k_aux=41, dead_mask=torch.ones(n, dtype=torch.bool)), ValueError,
     "k_aux must be in [0, 40], got 41"),
    ("dead_mask dtype", lambda a: a.update(dead_mask=torch.ones(n)), TypeError, "dead_mask must have dtype"),
    ("dead_mask shape", lambda a: a.update(dead_mask=torch.ones(n + 1, dtype=torch.bool)), ValueError,
     "dead_mask must have shape [40]"),
    ("dead_mask list", lambda a: a.update(dead_mask=[True] * n), TypeError, "dead_mask must be a bool Tensor"),
    ("device mismatch", lambda a: a.update(b_dec=a["b_dec"].to("meta")), ValueError, "b_dec is on meta"),
]


@pytest.mark.parametrize("desc,mutate,exc,msg", ENCODE_CASES, ids=[c[0] for c in ENCODE_CASES])
def test_topk_encode_rejects(enc, desc, mutate, exc, msg):
    x, W, be, bd = enc
    args = dict(x=x, W_enc=W, b_enc=be, b_dec=bd, k=4, dead_mask=None, k_aux=0)
    mutate(args)
    with pytest.raises(exc) as info:
        ops.topk_encode(**args)
    assert msg in str(info.value)
    assert "topk_encode" in str(info.value)


@pytest.fixture
def dec():
    g = torch.Generator().manual_seed(0)
    return dict(
        values=torch.rand(5, 4, generator=g),
        indices=torch.randint(0, n, (5, 4), generator=g),
        W_dec=torch.randn(n, d, generator=g),
        b_dec=torch.randn(d, generator=g),
    )


DECODE_CASES = [
    ("values not a tensor", lambda a: a.update(values=1.0), TypeError, "values must be a torch.Tensor"),
    ("values 1-D", lambda a: a.update(values=a["values"][0]), ValueError, "values must be 2-D"),
    ("indices int32", lambda a: a.update(indices=a["indices"].int()), TypeError, "indices must have dtype torch.int64"),
    ("indices shape", lambda a: a.update(indices=a["indices"][:, :2]), ValueError, "indices must have the shape"),
    ("index too large", lambda a: a["indices"].__setitem__((0, 0), n), ValueError, "indices must lie in [0, 40)"),
    ("index negative", lambda a: a["indices"].__setitem__((1, 1), -1), ValueError, "got -1"),
    ("W_dec integer", lambda a: a.update(W_dec=a["W_dec"].long()), TypeError, "W_dec must be float32"),
    ("b_dec shape", lambda a: a.update(b_dec=a["b_dec"][:3]), ValueError, "b_dec must have shape [48]"),
    ("device mismatch", lambda a: a.update(values=a["values"].to("meta")), ValueError, "values is on meta"),
]


@pytest.mark.parametrize("desc,mutate,exc,msg", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_sparse_decode_rejects(dec, desc, mutate, exc, msg):
    mutate(dec)
    with pytest.raises(exc) as info:
        ops.sparse_decode(**dec)
    assert msg in str(info.value)
    assert "sparse_decode" in str(info.value)


@pytest.fixture
def dec_aux(dec):
    g = torch.Generator().manual_seed(1)
    return dict(
        values=dec["values"],
        indices=dec["indices"],
        aux_values=torch.rand(5, 6, generator=g),
        aux_indices=torch.randint(0, n, (5, 6), generator=g),
        W_dec=dec["W_dec"],
        b_dec=dec["b_dec"],
    )


DECODE_WITH_AUX_CASES = [
    *DECODE_CASES,
    ("aux_values not a tensor", lambda a: a.update(aux_values=None), TypeError, "aux_values must be a torch.Tensor"),
    ("aux_values 3-D", lambda a: a.update(aux_values=a["aux_values"][None]), ValueError, "aux_values must be 2-D"),
    ("aux_values integer", lambda a: a.update(aux_values=a["aux_values"].long()), TypeError,
     "aux_values must be float32"),
    ("aux_indices int32", lambda a: a.update(aux_indices=a["aux_indices"].int()), TypeError,
     "aux_indices must have dtype torch.int64, got torch.int32"),
    ("aux_indices shape", lambda a: a.update(aux_indices=a["aux_indices"][:, :2]), ValueError,
     "aux_indices must have the shape of aux_values (5, 6), got (5, 2)"),
    ("aux rows", lambda a: a.update(aux_values=a["aux_values"][:3], aux_indices=a["aux_indices"][:3]), ValueError,
     "aux_values must have 5 rows (the tokens of values), got shape (3, 6)"),
    ("aux index too large", lambda a: a["aux_indices"].__setitem__((2, 3), n + 2), ValueError,
     "aux_indices must lie in [0, 40) (n_latents of W_dec), got 42"),
    ("aux index negative", lambda a: a["aux_indices"].__setitem__((0, 5), -3), ValueError,
     "aux_indices must lie in [0, 40) (n_latents of W_dec), got -3"),
    ("aux device mismatch", lambda a: a.update(aux_indices=a["aux_indices"].to("meta")), ValueError,
     "aux_indices is on meta"),
]


@pytest.mark.parametrize("desc,mutate,exc,msg", DECODE_WITH_AUX_CASES, ids=[c[0] for c in DECODE_WITH_AUX_CASES])
def test_sparse_decode_with_aux_rejects(dec_aux, desc, mutate, exc, msg):
    mutate(dec_aux)
    with pytest.raises(exc) as info:
        ops.sparse_decode_with_aux(**dec_aux)
    assert msg in str(info.value)
    assert "sparse_decode_with_aux" in str(info.value)


def test_raw_ops_reject_bad_input_with_named_arguments():
    # The C++ kernels check too, for callers that use torch.ops.mi_crow.* directly.
    if registration.EXTENSION is None:
        pytest.skip("checks of the C++ kernels; the extension is not loaded (CI requires it)")
    W = torch.randn(n, d)
    with pytest.raises(ValueError, match="indices must lie in"):
        torch.ops.mi_crow.gather_dot(torch.randn(2, d), torch.tensor([[0, n]]).expand(2, 2), W)
    with pytest.raises((TypeError, RuntimeError), match="coef"):
        torch.ops.mi_crow.scatter_rows(torch.randn(2, 2).double(), torch.zeros(2, 2, dtype=torch.long),
                                       torch.randn(2, d), n)
    with pytest.raises((ValueError, RuntimeError), match="k must be in"):
        torch.ops.mi_crow.topk_encode(torch.randn(2, d), W, torch.randn(n), torch.randn(d), 0, None, 0)


def test_raw_decode_with_aux_backward_rejects_bad_input_with_named_arguments():
    if registration.EXTENSION is None:
        pytest.skip("checks of the C++ kernels; the extension is not loaded (CI requires it)")
    op = torch.ops.mi_crow.sparse_decode_with_aux_backward
    g = torch.Generator().manual_seed(2)
    good = dict(
        grad_out=torch.randn(3, d, generator=g),
        values=torch.rand(3, 2, generator=g),
        indices=torch.randint(0, n, (3, 2), generator=g),
        aux_grad_out=torch.randn(3, d, generator=g),
        aux_values=torch.rand(3, 4, generator=g),
        aux_indices=torch.randint(0, n, (3, 4), generator=g),
        W_dec=torch.randn(n, d, generator=g),
    )
    cases = [  # (changes, exception, message)
        (dict(aux_indices=torch.full((3, 4), n)), ValueError,
         f"sparse_decode_with_aux_backward: aux_indices must lie in [0, {n}), got {n} at flat position 0"),
        (dict(indices=torch.full((3, 2), -1)), ValueError, "indices must lie in [0, 40), got -1"),
        (dict(aux_indices=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "aux_indices must be int64, got Int"),
        (dict(aux_values=torch.rand(3, 4).double()), TypeError,
         "aux_values must have the dtype of W_dec (Float), got Double"),
        (dict(aux_grad_out=torch.randn(3, d + 1)), ValueError, f"aux_grad_out must have shape [3, {d}], got [3, 49]"),
        (dict(aux_indices=torch.zeros(3, 5, dtype=torch.long)), ValueError,
         "aux_indices must have the shape of aux_values [3, 4], got [3, 5]"),
        (dict(aux_values=torch.rand(2, 4), aux_indices=torch.zeros(2, 4, dtype=torch.long)), ValueError,
         "aux_values must have 3 rows (the rows of values), got shape [2, 4]"),
        (dict(W_dec=torch.randn(n, d).long()), TypeError, "W_dec must be float32, bfloat16, float16 or float64"),
        (dict(aux_values=torch.rand(3 * 4)), ValueError, "aux_values must be 2-D, got shape [12]"),
    ]
    for changes, exc, msg in cases:
        with pytest.raises(exc) as info:
            op(**{**good, **changes})
        assert msg in str(info.value), (changes, str(info.value))


def test_mixed_precision_biases_are_cast_to_x_dtype(enc):
    x, W, be, bd = enc
    code = ops.topk_encode(x.bfloat16(), W.bfloat16(), be, bd, 4)
    assert code.values.dtype == torch.bfloat16
    out = ops.sparse_decode(code.values, code.indices, W, bd)
    assert out.dtype == torch.float32
