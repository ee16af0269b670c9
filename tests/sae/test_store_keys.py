"""One rule for every store key the SAE code writes: SAE ids (weights and concepts), training run ids.

``sae.concepts.save(store, "a/b")`` used to write ``sae_models/a/b/concepts.json`` while ``TopKSae.save`` refused
the same id; both now go through ``mi_crow.validation.check_identifier``.
"""

from __future__ import annotations

import pytest
import torch

from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae
from mi_crow.store import LocalStore

BAD_IDS = ["a/b", "a\\b", "../escape", "..", ".hidden", "", "tab\there", "x" * 256]


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def _files(store: LocalStore) -> list[str]:
    return sorted(p.relative_to(store.base_path).as_posix() for p in store.base_path.rglob("*") if p.is_file())


@pytest.mark.parametrize("sae_id", BAD_IDS)
def test_concepts_and_sae_refuse_the_same_ids_the_same_way(store, sae_id) -> None:
    sae = TopKSae(8, 4, 2)
    sae.concepts.name_concept(1, "one")
    with pytest.raises(UserInputError, match="sae_id must be") as concepts_error:
        sae.concepts.save(store, sae_id)
    with pytest.raises(UserInputError, match="sae_id must be") as sae_error:
        sae.save(store, sae_id)
    assert type(concepts_error.value) is type(sae_error.value)
    assert str(concepts_error.value) == str(sae_error.value)
    assert repr(sae_id)[:60] in str(sae_error.value)  # the value is named (repr, possibly shortened)
    for call in (lambda: sae.concepts.load(store, sae_id), lambda: TopKSae.load(store, sae_id)):
        with pytest.raises(UserInputError, match="sae_id must be"):
            call()
    assert _files(store) == []  # nothing was written anywhere


def test_a_non_string_id_is_an_argument_type_error_for_both(store) -> None:
    sae = TopKSae(8, 4, 2)
    for call in (lambda: sae.concepts.save(store, 5), lambda: sae.save(store, 5)):
        with pytest.raises(ArgumentTypeError, match="sae_id must be .*got 5"):
            call()


@pytest.mark.parametrize("sae_id", ["s1", "my-sae.v2", "topk32_n4096", "a b"])
def test_ids_accepted_by_one_are_accepted_by_the_other(store, sae_id) -> None:
    sae = TopKSae(8, 4, 2)
    sae.concepts.name_concept(3, "three")
    assert sae.concepts.save(store, sae_id) == f"sae_models/{sae_id}/concepts.json"
    assert sae.save(store, sae_id) == f"sae_models/{sae_id}"
    loaded = TopKSae.load(store, sae_id)
    assert loaded.concepts.dictionary.name_of(3) == "three"
    assert torch.equal(loaded.W_dec, sae.W_dec)


@pytest.mark.parametrize("field", ["training_run_id", "sae_id"])
@pytest.mark.parametrize("value", ["a/b", ".hidden", ""])
def test_training_run_and_sae_ids_in_the_config_follow_the_same_rule(field, value) -> None:
    with pytest.raises(UserInputError, match=f"SaeTrainingConfig.{field} must be"):
        SaeTrainingConfig(**{field: value})


def test_the_activation_run_id_given_to_train_follows_the_same_rule(store) -> None:
    trainer = SaeTrainer(TopKSae(8, 4, 2), store)
    with pytest.raises(UserInputError, match="run_id must be"):
        trainer.train("a/b", "layer", SaeTrainingConfig(progress=False))
