"""SaeTrainingConfig: validation of every field, JSON round trip, documented fields, LR schedule."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math

import pytest

from mi_crow.mechanistic.sae import SaeTrainingConfig, lr_at_step
from mi_crow.mechanistic.sae import config as config_module


def test_json_roundtrip_keeps_every_field():
    cfg = SaeTrainingConfig(
        n_tokens=10_000,
        batch_size=128,
        lr=3e-4,
        warmup_steps=5,
        lr_decay="cosine",
        adam_betas=(0.8, 0.99),
        k_aux=7,
        encode_dtype="bfloat16",
        b_dec_init="mean",
        training_run_id="run-1",
        resume=True,
        extra={"note": "x"},
    )
    back = SaeTrainingConfig.from_json(cfg.to_json())
    assert back == cfg
    assert isinstance(back.adam_betas, tuple)


def test_every_field_has_a_docstring():
    source = inspect.getsource(config_module.SaeTrainingConfig)
    body = ast.parse(source).body[0].body
    documented = set()
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            if isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                documented.add(node.target.id)
    fields = {f.name for f in dataclasses.fields(SaeTrainingConfig)}
    assert fields == documented


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"n_tokens": 0}, "n_tokens"),
        ({"n_tokens": 10, "batch_size": 64}, "n_tokens must be at least batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": float("nan")}, "epochs"),
        ({"epochs": 1, "n_tokens": 1000}, "either n_tokens or epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"lr_decay": "step"}, "lr_decay"),
        ({"lr_decay_start": 1.5}, "lr_decay_start"),
        ({"lr_final_fraction": -0.1}, "lr_final_fraction"),
        ({"adam_betas": (0.9,)}, "adam_betas"),
        ({"adam_betas": (0.9, 1.0)}, "adam_betas"),
        ({"adam_eps": 0}, "adam_eps"),
        ({"optimizer_impl": "sgd"}, "optimizer_impl"),
        ({"auxk_coef": -1.0}, "auxk_coef"),
        ({"k_aux": 0}, "k_aux"),
        ({"dead_window_tokens": 0}, "dead_window_tokens"),
        ({"normalize_decoder": "yes"}, "normalize_decoder"),
        ({"b_dec_init": "median"}, "b_dec_init"),
        ({"b_dec_init_tokens": 0}, "b_dec_init_tokens"),
        ({"seed": -1}, "seed"),
        ({"outlier_norm_factor": 1.0}, "outlier_norm_factor"),
        ({"outlier_norm_factor": "big"}, "outlier_norm_factor"),
        ({"encode_dtype": "float16"}, "encode_dtype"),
        ({"log_every": 0}, "log_every"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"resume": True}, "training_run_id"),
        ({"training_run_id": "a/b"}, "training_run_id"),
        ({"sae_id": ""}, "sae_id"),
        ({"max_nonfinite_fraction": 2.0}, "max_nonfinite_fraction"),
        ({"nonfinite_grace_batches": 0}, "nonfinite_grace_batches"),
        ({"world_size": 2}, "world_size"),
        ({"rank": 1}, "rank"),
        ({"extra": []}, "extra"),
    ],
)
def test_bad_fields_are_named(kwargs, fragment):
    with pytest.raises((ValueError, TypeError), match=fragment) as info:
        SaeTrainingConfig(**kwargs)
    # The offending value is in the message too.
    value = next(iter(kwargs.values())) if len(kwargs) == 1 else None
    if value is not None and not isinstance(value, (dict, list)) and not (isinstance(value, float) and math.isnan(value)):
        assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown fields.*learning_rate"):
        SaeTrainingConfig.from_dict({"learning_rate": 1e-3})


def test_lr_schedule_warmup_constant_decay():
    cfg = SaeTrainingConfig(lr_decay="linear", lr_decay_start=0.5, lr_final_fraction=0.1)
    total, peak, warm = 100, 1.0, 10
    lrs = [lr_at_step(s, total, peak, warm, cfg) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(lr == pytest.approx(1.0) for lr in lrs[10:50])
    # the final fraction is reached one step after the last one (the last step still moves the weights)
    assert lr_at_step(total, total, peak, warm, cfg) == pytest.approx(0.1) and lrs[-1] > 0.1
    assert all(a >= b for a, b in zip(lrs[50:], lrs[51:]))
    cos = SaeTrainingConfig(lr_decay="cosine", lr_decay_start=0.0, lr_final_fraction=0.0)
    assert lr_at_step(0, 11, 2.0, 0, cos) == pytest.approx(2.0)
    assert lr_at_step(5, 10, 2.0, 0, cos) == pytest.approx(1.0)
    assert lr_at_step(10, 10, 2.0, 0, cos) == pytest.approx(0.0, abs=1e-12)
    flat = SaeTrainingConfig(lr_decay="none")
    assert lr_at_step(99, 100, 2.0, 0, flat) == 2.0
