"""The concept dictionary: naming, lookup, JSON/store round trips, CSV import and its errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mi_crow.mechanistic.sae.concept_dictionary import ConceptDictionary
from mi_crow.mechanistic.sae.concepts import AutoencoderConcepts
from mi_crow.store import LocalStore

N = 10


def make_concepts(n: int = N) -> AutoencoderConcepts:
    return AutoencoderConcepts(SimpleNamespace(n_latents=n))


def test_name_lookup_rename_and_remove():
    concepts = make_concepts()
    concepts.name_concept(3, "cats", notes="fires on feline words")
    concepts.name_concept(7, " dates ")
    d = concepts.dictionary
    assert concepts.find_concept("cats") == 3 and d.index_of("dates") == 7
    assert d.get(3).notes == "fires on feline words" and d.name_of(7) == "dates"
    assert d.name_of(0) is None and len(d) == 2 and "cats" in d and 3 in d and 4 not in d
    concepts.name_concept(3, "felines")  # rename frees the old name
    assert d.index_of("felines") == 3 and "cats" not in d
    concepts.name_concept(5, "cats")
    with pytest.raises(ValueError, match="name 'cats' is already used by neuron 5"):
        concepts.name_concept(6, "cats")
    d.remove(5)
    assert "cats" not in d and len(d) == 2
    assert [c.neuron for c in d] == [3, 7]


@pytest.mark.parametrize(
    "neuron,name,exc,match",
    [
        (N, "x", ValueError, r"neuron_idx must be in \[0, 10\).*got 10"),
        (-1, "x", ValueError, r"got -1"),
        ("3", "x", TypeError, "neuron_idx must be an int"),
        (2.0, "x", TypeError, "neuron_idx must be an int"),
        (True, "x", TypeError, "got bool"),
        (1, "", ValueError, "name must be a non-empty string"),
        (1, "   ", ValueError, "name must be a non-empty string"),
        (1, 5, TypeError, "name must be a str"),
    ],
)
def test_bad_names_and_indices(neuron, name, exc, match):
    concepts = make_concepts()
    with pytest.raises(exc, match=match):
        concepts.name_concept(neuron, name)
    assert len(concepts.dictionary) == 0


def test_unknown_name_lists_known_names():
    concepts = make_concepts()
    concepts.name_concept(1, "alpha")
    with pytest.raises(ValueError, match=r"unknown concept name 'beta'; known names: 'alpha'"):
        concepts.find_concept("beta")
    with pytest.raises(TypeError, match="name must be a str"):
        concepts.find_concept(3)


def test_json_path_round_trip(tmp_path):
    concepts = make_concepts()
    concepts.name_concept(0, "zero", "the first")
    concepts.name_concept(9, "nine — ünïcode", "notes, with \"quotes\"")
    path = concepts.save_dictionary(tmp_path / "sub" / "concepts.json")
    other = make_concepts()
    loaded = other.load_dictionary(path)
    assert loaded == concepts.dictionary and other.dictionary is loaded
    assert ConceptDictionary.load_json(path) == concepts.dictionary
    # A plain dictionary file (save_json) loads the same way.
    concepts.dictionary.save_json(tmp_path / "plain.json")
    assert make_concepts().load_dictionary(tmp_path / "plain.json") == concepts.dictionary


def test_store_round_trip_next_to_the_sae(tmp_path):
    store = LocalStore(tmp_path / "store")
    concepts = make_concepts()
    concepts.name_concept(4, "rivers")
    concepts.manipulate_concept("rivers", 0.5)
    concepts.add_concept(2, -1.25, positions=[0, -1])
    key = concepts.save(store, "my_sae")
    assert key == "sae_models/my_sae/concepts.json"
    assert (tmp_path / "store" / "sae_models" / "my_sae" / "concepts.json").is_file()
    other = make_concepts()
    other.load(store, "my_sae")
    # Loading names the neurons but steers nothing until asked (issue 17).
    assert other.dictionary == concepts.dictionary and not other.has_manipulations
    assert other.saved_manipulations == concepts.manipulation_state()
    other.apply_saved_manipulations()
    assert other.manipulation_state() == concepts.manipulation_state()
    again = make_concepts()
    again.load(store, "my_sae", manipulations=True)
    assert again.manipulation_state() == concepts.manipulation_state()
    # load_dictionary restores names only.
    third = make_concepts()
    third.load_dictionary(store, "my_sae")
    assert third.dictionary == concepts.dictionary and not third.has_manipulations


def test_load_errors_name_the_file(tmp_path):
    concepts = make_concepts()
    concepts.name_concept(1, "one")
    path = concepts.save_dictionary(tmp_path / "c.json")
    with pytest.raises(ValueError, match="n_latents=10, but this SAE has n_latents=12"):
        make_concepts(12).load_dictionary(path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        make_concepts().load_dictionary(bad)
    entry = tmp_path / "entry.json"
    entry.write_text(json.dumps({"n_latents": N, "concepts": [{"neuron": 1, "name": "a"}, {"neuron": 99,
                                                                                        "name": "b"}]}))
    with pytest.raises(ValueError, match=r"entry.json: concept dictionary entry 1: neuron_idx must be in"):
        make_concepts().load_dictionary(entry)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        make_concepts().load_dictionary(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="sae_id is only used with a store"):
        concepts.save_dictionary(tmp_path / "x.json", sae_id="abc")
    with pytest.raises(ValueError, match="sae_id must be a non-empty relative name"):
        concepts.save(LocalStore(tmp_path / "s"), "../escape")
    with pytest.raises(TypeError, match="target must be a Store or a path"):
        concepts.save_dictionary(42)


def test_import_csv(tmp_path):
    path = tmp_path / "names.csv"
    path.write_text(
        "\ufeffneuron,name,notes\n"
        "2,cats,\"likes cats, dogs\"\n"
        "5,rivers,\n"
        "6,,\n"  # an unnamed neuron in the spreadsheet: skipped
        "\n"
        "8,numbers,digits\n",
        encoding="utf-8",
    )
    concepts = make_concepts()
    concepts.name_concept(2, "old name")
    concepts.name_concept(3, "kept")
    assert concepts.import_csv(path) == 3
    d = concepts.dictionary
    assert [(c.neuron, c.name, c.notes) for c in d] == [
        (2, "cats", "likes cats, dogs"), (3, "kept", ""), (5, "rivers", ""), (8, "numbers", "digits")
    ]
    # Without a notes column, and replacing what was there.
    two = tmp_path / "two.csv"
    two.write_text("Name,Neuron\nfoo,1\n", encoding="utf-8")
    assert concepts.import_csv(two, replace=True) == 1
    assert [(c.neuron, c.name) for c in concepts.dictionary] == [(1, "foo")]
    # Round trip through export_csv.
    concepts.dictionary.export_csv(tmp_path / "out.csv")
    again = make_concepts()
    again.import_csv(tmp_path / "out.csv")
    assert again.dictionary == concepts.dictionary


@pytest.mark.parametrize(
    "body,match",
    [
        ("neuron,name\n1,a\nx,b\n", r"row 3: neuron must be an integer, got 'x'"),
        ("neuron,name\n1,a\n10,b\n", r"row 3: neuron must be in \[0, 10\), got 10"),
        ("neuron,name\n-2,a\n", r"row 2: neuron must be in \[0, 10\), got -2"),
        ("neuron,name\n1,a\n1,b\n", r"row 3: neuron 1 already named in row 2"),
        ("neuron,name\n1,a\n2,a\n", r"row 3: name 'a' already used in row 2"),
        ("neuron,name\n,a\n", r"row 2: neuron must be an integer, got ''"),
        ("idx,label\n1,a\n", r"must have a header with columns 'neuron' and 'name'"),
    ],
)
def test_import_csv_bad_rows(tmp_path, body, match):
    path = tmp_path / "bad.csv"
    path.write_text(body, encoding="utf-8")
    concepts = make_concepts()
    concepts.name_concept(0, "before")
    with pytest.raises(ValueError, match=match):
        concepts.import_csv(path)
    assert [(c.neuron, c.name) for c in concepts.dictionary] == [(0, "before")]


def test_import_csv_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        make_concepts().import_csv(tmp_path / "nope.csv")


def test_dictionary_rejects_bad_n_latents():
    with pytest.raises(ValueError, match="n_latents must be a positive int"):
        ConceptDictionary(0)
