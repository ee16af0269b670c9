"""HuggingFaceDataset offline: json/text/csv builders, save_to_disk folders, streaming, limit, errors."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")

from mi_crow.datasets import BaseDataset, DatasetUnavailableOfflineError, HuggingFaceDataset  # noqa: E402
from mi_crow.testing import offline_hub  # noqa: E402

TEXTS = [f"sentence {i} about things" for i in range(9)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network: put both datasets and huggingface_hub into offline mode."""
    offline_hub(monkeypatch)


@pytest.fixture
def jsonl(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text("".join(json.dumps({"text": t, "label": i}) + "\n" for i, t in enumerate(TEXTS)))
    return p


def test_json_builder(jsonl, tmp_path):
    ds = HuggingFaceDataset("json", data_files=str(jsonl), cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds, BaseDataset)
    assert list(ds) == TEXTS and len(ds) == 9
    assert [t for b in ds.iter_batches(4) for t in b] == TEXTS and [len(b) for b in ds.iter_batches(4)] == [4, 4, 1]
    assert "name='json'" in ds.describe() and str(jsonl) in ds.describe() and "n_texts=9" in ds.describe()


def test_text_and_csv_builders(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(TEXTS) + "\n")
    assert list(HuggingFaceDataset("text", data_files=str(txt), cache_dir=str(tmp_path / "c1"))) == TEXTS
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("id,body\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(TEXTS)))
    ds = HuggingFaceDataset("csv", data_files=str(csv_path), text_field="body", cache_dir=str(tmp_path / "c2"))
    assert list(ds) == TEXTS


def test_limit_and_streaming(jsonl, tmp_path):
    cache = str(tmp_path / "cache")
    limited = HuggingFaceDataset("json", data_files=str(jsonl), limit=4, cache_dir=cache)
    assert list(limited) == TEXTS[:4] and len(limited) == 4
    assert list(HuggingFaceDataset("json", data_files=str(jsonl), limit=100, cache_dir=cache)) == TEXTS
    streamed = HuggingFaceDataset("json", data_files=str(jsonl), streaming=True, limit=5)
    assert list(streamed) == TEXTS[:5]
    assert list(streamed) == TEXTS[:5]  # iterable more than once
    assert [len(b) for b in streamed.iter_batches(2)] == [2, 2, 1]
    with pytest.raises(TypeError, match="length of streaming"):
        len(streamed)
    assert list(HuggingFaceDataset("json", data_files=str(jsonl), streaming=True)) == TEXTS


def test_save_to_disk_dataset_and_dict(tmp_path):
    ds = datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(9))})
    ds.save_to_disk(str(tmp_path / "one"))
    assert list(HuggingFaceDataset(str(tmp_path / "one"))) == TEXTS
    assert list(HuggingFaceDataset(tmp_path / "one", limit=2)) == TEXTS[:2]  # a Path works too
    assert list(HuggingFaceDataset(str(tmp_path / "one"), streaming=True)) == TEXTS
    datasets.DatasetDict({"train": ds, "validation": ds.select([1, 3])}).save_to_disk(str(tmp_path / "dict"))
    assert list(HuggingFaceDataset(str(tmp_path / "dict"), split="validation")) == [TEXTS[1], TEXTS[3]]
    with pytest.raises(ValueError, match=r"split 'test' not in the dataset saved at .*available splits: \['train', 'validation'\]"):
        HuggingFaceDataset(str(tmp_path / "dict"), split="test")


def test_missing_text_field_names_field_and_columns(jsonl, tmp_path):
    with pytest.raises(ValueError, match=r"text_field 'content' is not a column.*available columns: \['text', 'label'\]"):
        HuggingFaceDataset("json", data_files=str(jsonl), text_field="content", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"text_field 'content' is not a column"):
        HuggingFaceDataset("json", data_files=str(jsonl), text_field="content", streaming=True)


def test_non_string_values_reported_with_row(jsonl, tmp_path):
    ds = HuggingFaceDataset("json", data_files=str(jsonl), text_field="label", cache_dir=str(tmp_path / "c"))
    with pytest.raises(TypeError, match=r"row 0 of dataset 'json': field 'label' must be a str, got int"):
        list(ds)


@pytest.mark.parametrize(("builder", "content"), [("json", ""), ("csv", "text\n")])
def test_empty_data_file(tmp_path, builder, content):
    p = tmp_path / f"empty.{builder}"
    p.write_text(content)
    with pytest.raises(ValueError, match=f"dataset '{builder}' \\(split 'train'\\)"):
        HuggingFaceDataset(builder, data_files=str(p), cache_dir=str(tmp_path / "c"))


def test_unknown_split_of_builder(jsonl, tmp_path):
    with pytest.raises(ValueError, match=r"dataset 'json' \(split 'test'\) could not be loaded"):
        HuggingFaceDataset("json", data_files=str(jsonl), split="test", cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_name_offline_says_so_and_suggests_local(tmp_path, streaming):
    with pytest.raises(DatasetUnavailableOfflineError, match="offline") as info:
        HuggingFaceDataset("someone/surely-not-cached-dataset", streaming=streaming, cache_dir=str(tmp_path / "c"))
    message = str(info.value)
    assert "'someone/surely-not-cached-dataset'" in message and "save_to_disk" in message
    assert "data_files" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConnectionError)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        (dict(name=3), TypeError, "name must be a str"),
        (dict(split=0), TypeError, "split must be a str, got int"),
        (dict(text_field=None), TypeError, "text_field must be a str, got NoneType"),
        (dict(limit=0), ValueError, "limit must be > 0, got 0"),
        (dict(limit="5"), TypeError, "limit must be an int"),
    ],
)
def test_bad_arguments(jsonl, kwargs, exc, pattern):
    args = dict(name="json", data_files=str(jsonl)) | kwargs
    with pytest.raises(exc, match=pattern):
        HuggingFaceDataset(**args)


def test_local_missing_data_file_is_not_reported_as_offline(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        HuggingFaceDataset("json", data_files=str(tmp_path / "missing.jsonl"), cache_dir=str(tmp_path / "c"))
    assert not isinstance(info.value, DatasetUnavailableOfflineError)


def test_local_folder_of_data_files(jsonl, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text(jsonl.read_text())
    assert list(HuggingFaceDataset(str(folder), cache_dir=str(tmp_path / "c"))) == TEXTS
