"""One validation layer: a wrong type is an ArgumentTypeError (both a TypeError and a ValueError), a wrong value a
UserInputError (a ValueError), whichever SAE entry point receives it; messages name the argument and the value."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mi_crow.errors import ArgumentTypeError, MiCrowError, UserInputError
from mi_crow.mechanistic.sae import (
    AutoencoderConcepts,
    NonFiniteTrainingError,
    SaeTrainer,
    SaeTrainingConfig,
    TensorActivationReader,
    TopKSae,
    geometric_median,
)
from mi_crow.mechanistic.sae.concepts import ConceptDictionary, TopTextTracker


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: SaeTrainingConfig(batch_size="8"), "SaeTrainingConfig.batch_size"),
        (lambda: SaeTrainingConfig(lr="1e-3"), "SaeTrainingConfig.lr"),
        (lambda: SaeTrainingConfig(shuffle=1), "SaeTrainingConfig.shuffle"),
        (lambda: SaeTrainingConfig(training_run_id=7), "SaeTrainingConfig.training_run_id"),
        (lambda: TopKSae(8, "4", 2), "n_inputs"),
        (lambda: TensorActivationReader(torch.zeros(4, 2), "2"), "batch_size"),
        (lambda: TensorActivationReader(torch.zeros(4, 2, dtype=torch.int64), 2), "data"),
        (lambda: AutoencoderConcepts(SimpleNamespace(n_latents=4)).enable_text_tracking("3"), "top_k"),
        (lambda: TopTextTracker(4, 2.0), "top_k"),
        (lambda: ConceptDictionary("4"), "n_latents"),
        (lambda: SaeTrainer(TopKSae(8, 4, 2)).train_on_tensor([[0.0] * 4], SaeTrainingConfig(progress=False)),
         "activations"),
    ],
)
def test_a_wrong_type_is_both_a_type_error_and_a_value_error(call, argument) -> None:
    with pytest.raises(ArgumentTypeError, match=f"{argument} must be") as info:
        call()
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: SaeTrainingConfig(batch_size=0), "SaeTrainingConfig.batch_size must be a positive int, got 0"),
        (lambda: SaeTrainingConfig(lr_decay="step"),
         "SaeTrainingConfig.lr_decay must be one of ['none', 'linear', 'cosine'], got 'step'"),
        (lambda: SaeTrainingConfig(lr_decay_start=1.5),
         "SaeTrainingConfig.lr_decay_start must be a finite number >= 0.0 and <= 1.0, got 1.5"),
        (lambda: SaeTrainingConfig(n_tokens=10, batch_size=64),
         "SaeTrainingConfig.n_tokens must be at least batch_size=64 (one step), got 10"),
        (lambda: TopKSae(16, 8, 17), "TopKSae: k must be <= n_latents=16, got 17"),
        (lambda: TopKSae(8, 4, 2, mode="splice"), "TopKSae.mode must be one of ['observe', 'replace'], got 'splice'"),
        (lambda: SaeTrainer(TopKSae(8, 4, 2)).train_on_tensor(torch.zeros(64, 5), SaeTrainingConfig(progress=False)),
         "SaeTrainer.train_on_tensor: activations must be a tensor of shape [*, 4]"),
    ],
)
def test_a_wrong_value_is_a_user_input_error_naming_argument_and_value(call, message) -> None:
    with pytest.raises(UserInputError) as info:
        call()
    assert not isinstance(info.value, TypeError)
    assert message in str(info.value)


def test_geometric_median_of_nothing_names_the_argument() -> None:
    with pytest.raises(UserInputError, match=r"geometric_median: points must be a non-empty \[tokens, d\] tensor"):
        geometric_median(torch.empty(0, 3))


def test_non_finite_data_is_reported_as_a_mi_crow_error() -> None:
    """A run full of NaN is a problem of the data, which the CLI reports as one line (exit status 2)."""
    x = torch.full((64, 4), float("nan"))
    with pytest.raises(NonFiniteTrainingError) as info:
        SaeTrainer(TopKSae(8, 4, 2)).train_on_tensor(
            x, SaeTrainingConfig(batch_size=16, save_sae=False, checkpoint_every=None, progress=False)
        )
    assert isinstance(info.value, MiCrowError) and isinstance(info.value, RuntimeError)
