"""DOCUMENTED_API.md, "Datasets": TextDataset over lists and ``datasets.Dataset``, ``from_huggingface`` offline,
``random_sample``, ClassificationDataset; every result compared with the source rows."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")

from mi_crow.datasets import BaseDataset, ClassificationDataset, HuggingFaceDataset, TextDataset  # noqa: E402
from mi_crow.testing import offline_hub  # noqa: E402

TEXTS = [f"sentence {i} about {'cats' if i % 3 else 'dogs'}" for i in range(12)]
LABELS = ["dogs" if i % 3 == 0 else "cats" for i in range(12)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network: put both datasets and huggingface_hub into offline mode."""
    offline_hub(monkeypatch)


@pytest.fixture
def hf_dataset():
    return datasets.Dataset.from_dict({"content": TEXTS, "label": LABELS, "id": list(range(12))})


@pytest.fixture
def jsonl(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in zip(TEXTS, LABELS)))
    return p


def test_text_dataset_from_a_list(store):
    ds = TextDataset(texts=TEXTS)
    assert list(ds) == TEXTS and len(ds) == 12 and isinstance(ds, BaseDataset)
    assert [t for batch in ds.iter_batches(5) for t in batch] == TEXTS


def test_text_dataset_wraps_a_datasets_dataset(hf_dataset, store):
    ds = TextDataset(hf_dataset, store=store, text_field="content")
    assert ds.texts == TEXTS and ds.store is store
    with pytest.raises(ValueError, match=r"text_field 'text' is not a column .*\['content', 'label', 'id'\]"):
        TextDataset(hf_dataset)
    split = datasets.DatasetDict({"train": hf_dataset})
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train'\].*dataset\['train'\]"):
        TextDataset(split, text_field="content")
    assert TextDataset(split["train"], text_field="content").texts == TEXTS


def test_from_huggingface_offline_with_local_files_and_saved_datasets(jsonl, tmp_path, store, hf_dataset):
    ds = TextDataset.from_huggingface("json", split="train", store=store, text_field="text", limit=None,
                                      data_files=str(jsonl), cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds, TextDataset) and ds.texts == TEXTS and ds.store is store
    limited = TextDataset.from_huggingface("json", data_files=str(jsonl), limit=5, cache_dir=str(tmp_path / "c2"))
    assert limited.texts == TEXTS[:5]
    hf_dataset.save_to_disk(str(tmp_path / "saved"))
    saved = TextDataset.from_huggingface(str(tmp_path / "saved"), text_field="content")
    assert saved.texts == TEXTS
    with pytest.raises(ValueError, match=r"name and dataset_name"):
        TextDataset.from_huggingface("json", dataset_name="csv", data_files=str(jsonl))


def test_random_sample_draws_n_distinct_texts_reproducibly():
    ds = TextDataset(texts=TEXTS)
    sample = ds.random_sample(5, seed=3)
    assert isinstance(sample, TextDataset) and len(sample) == 5
    assert len(set(sample.texts)) == 5 and set(sample.texts) <= set(TEXTS)
    assert ds.random_sample(5, seed=3).texts == sample.texts
    assert sorted(ds.random_sample(12, seed=0).texts) == sorted(TEXTS)  # n = len: a permutation
    draws = {tuple(ds.random_sample(3).texts) for _ in range(20)}  # seed=None: fresh draws
    assert len(draws) > 1
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 12\], got 13"):
        ds.random_sample(13)
    with pytest.raises(TypeError, match=r"n must be an int"):
        ds.random_sample("3")


def test_hugging_face_dataset_random_sample(jsonl, tmp_path):
    ds = HuggingFaceDataset("json", data_files=str(jsonl), cache_dir=str(tmp_path / "cache"))
    sample = ds.random_sample(4, seed=1)
    assert len(sample) == 4 and len(set(sample)) == 4 and set(sample) <= set(TEXTS)
    assert list(ds.random_sample(4, seed=1)) == list(sample)
    assert list(ds) == TEXTS  # the source is untouched
    assert "random_sample" in sample.describe()


def test_classification_dataset_from_rows_and_from_a_datasets_dataset(hf_dataset, store):
    rows = [{"text": t, "label": lab} for t, lab in zip(TEXTS, LABELS)]
    from_rows = ClassificationDataset(rows, store=store, text_field="text", category_field="label")
    from_hf = ClassificationDataset(hf_dataset, store=store, text_field="content", category_field="label")
    for ds in (from_rows, from_hf):
        assert list(ds) == TEXTS and len(ds) == 12  # iterable like a TextDataset
        assert [t for batch in ds.iter_batches(5) for t in batch] == TEXTS
        assert ds.get_categories() == ["cats", "dogs"]
        assert list(ds.iter_items()) == list(zip(TEXTS, LABELS))
    sample = from_rows.random_sample(6, seed=2)
    assert isinstance(sample, ClassificationDataset)
    assert all(LABELS[TEXTS.index(t)] == c for t, c in sample.iter_items())
    with pytest.raises(ValueError, match=r"category_field 'topic' is not a field of data\[0\]"):
        ClassificationDataset(rows, category_field="topic")
    with pytest.raises(ValueError, match=r"category_field 'topic' is not a column"):
        ClassificationDataset(hf_dataset, text_field="content", category_field="topic")


def test_classification_dataset_feeds_activation_saving(tiny_gpt2, hf_dataset):
    ds = ClassificationDataset(hf_dataset, text_field="content")
    run_id = tiny_gpt2.activations.save(dataset=ds, layer_signature=0, batch_size=5, progress=False)
    assert tiny_gpt2.store.read_run_meta(run_id)["sample_count"] == 12
