"""TextDataset: lists, .txt/.jsonl/.csv loaders, batched iteration and every bad-input case."""

from __future__ import annotations

import csv
import json
import re

import pytest

from mi_crow.datasets import BaseDataset, TextDataset

TEXTS = [f"text number {i}" + " word" * (i % 4) for i in range(11)]


def test_list_iteration_len_getitem_describe():
    ds = TextDataset(TEXTS)
    assert isinstance(ds, BaseDataset)
    assert list(ds) == TEXTS and len(ds) == 11 and ds[3] == TEXTS[3] and ds[2:4] == TEXTS[2:4]
    assert ds.name == "texts" and "n_texts=11" in ds.describe()
    assert TextDataset(t for t in TEXTS).texts == TEXTS  # any iterable of str


@pytest.mark.parametrize("batch_size", [1, 3, 4, 11, 50])
def test_iter_batches_partition_the_texts(batch_size):
    batches = list(TextDataset(TEXTS).iter_batches(batch_size))
    assert [t for b in batches for t in b] == TEXTS
    assert all(len(b) == batch_size for b in batches[:-1])
    assert 1 <= len(batches[-1]) <= batch_size
    assert len(batches) == -(-len(TEXTS) // batch_size)


@pytest.mark.parametrize(("batch_size", "exc"), [(0, ValueError), (-2, ValueError), ("4", TypeError),
                                                 (True, TypeError), (2.0, TypeError)])
def test_iter_batches_bad_batch_size(batch_size, exc):
    with pytest.raises(exc, match=f"batch_size must be .*{re.escape(repr(batch_size))}"):
        next(TextDataset(TEXTS).iter_batches(batch_size))


def test_bad_texts():
    with pytest.raises(ValueError, match="at least one text"):
        TextDataset([])
    with pytest.raises(TypeError, match=r"texts\[2\] must be a str, got int \(7\)"):
        TextDataset(["a", "b", 7, "d"])
    with pytest.raises(TypeError, match=r"texts\[0\] must be a str, got NoneType"):
        TextDataset([None])
    with pytest.raises(TypeError, match="single str"):
        TextDataset("just one string")
    with pytest.raises(TypeError, match="texts must be a list"):
        TextDataset(42)  # type: ignore[arg-type]


def test_from_txt_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"first line\r\n\r\nsecond line\n   \nthird  line with  spaces\n")
    ds = TextDataset.from_txt(p)
    assert list(ds) == ["first line", "second line", "third  line with  spaces"]
    assert ds.name == str(p) and str(p) in ds.describe()


def test_from_txt_paragraphs(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("Para one, line 1.\nPara one, line 2.\n\n \nPara two.\n\n\n\nPara three\nend.\n")
    assert list(TextDataset.from_txt(p, mode="paragraph")) == [
        "Para one, line 1.\nPara one, line 2.", "Para two.", "Para three\nend."]


def test_from_txt_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.txt"))):
        TextDataset.from_txt(tmp_path / "nope.txt")
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(ValueError, match=r"e.txt.*contains no text"):
        TextDataset.from_txt(tmp_path / "e.txt")
    (tmp_path / "ok.txt").write_text("x\n")
    with pytest.raises(ValueError, match="mode must be 'line' or 'paragraph', got 'sentence'"):
        TextDataset.from_txt(tmp_path / "ok.txt", mode="sentence")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        TextDataset.from_txt(3)  # type: ignore[arg-type]


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_from_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    _write_jsonl(p, [{"text": "a \"quoted\" one", "id": 1}, {"text": "ünïcode ✓", "id": 2}, {"text": "", "id": 3}])
    assert list(TextDataset.from_jsonl(p)) == ["a \"quoted\" one", "ünïcode ✓", ""]
    q = tmp_path / "b.jsonl"
    _write_jsonl(q, [{"body": "x"}, {"body": "y"}])
    assert list(TextDataset.from_jsonl(q, text_field="body")) == ["x", "y"]


def test_from_jsonl_bad_input(tmp_path):
    p = tmp_path / "d.jsonl"
    _write_jsonl(p, [{"content": "x", "id": 1}])
    with pytest.raises(ValueError, match=r"text_field 'text' not found in .*d.jsonl:1; available fields: \['content', 'id'\]"):
        TextDataset.from_jsonl(p)
    _write_jsonl(p, [{"text": "x"}, {"other": "y"}])
    with pytest.raises(ValueError, match=r"d.jsonl:2.*available fields: \['other'\]"):
        TextDataset.from_jsonl(p)
    p.write_text('{"text": "x"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2 is not valid JSON"):
        TextDataset.from_jsonl(p)
    p.write_text('["a list"]\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1 must be a JSON object"):
        TextDataset.from_jsonl(p)
    _write_jsonl(p, [{"text": 5}])
    with pytest.raises(TypeError, match=r"d.jsonl:1: field 'text' must be a str, got int"):
        TextDataset.from_jsonl(p)
    p.write_text("\n\n")
    with pytest.raises(ValueError, match="contains no records"):
        TextDataset.from_jsonl(p)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        TextDataset.from_jsonl(tmp_path / "missing.jsonl")


def test_from_csv(tmp_path):
    p = tmp_path / "d.csv"
    rows = [{"id": "1", "text": "plain"}, {"id": "2", "text": "with, a comma"}, {"id": "3", "text": "multi\nline"}]
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text"])
        w.writeheader()
        w.writerows(rows)
    assert list(TextDataset.from_csv(p)) == ["plain", "with, a comma", "multi\nline"]
    assert list(TextDataset.from_csv(p, text_field="id")) == ["1", "2", "3"]
    t = tmp_path / "d.tsv"
    t.write_text("body\tx\nhello\t1\n")
    assert list(TextDataset.from_csv(t, text_field="body", delimiter="\t")) == ["hello"]


def test_from_csv_bad_input(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("id,content\n1,x\n")
    with pytest.raises(ValueError, match=r"text_field 'text' is not a column of .*d.csv; available columns: \['id', 'content'\]"):
        TextDataset.from_csv(p)
    p.write_text("id,text\n")
    with pytest.raises(ValueError, match="has a header but no rows"):
        TextDataset.from_csv(p)
    p.write_text("")
    with pytest.raises(ValueError, match="has no header row"):
        TextDataset.from_csv(p)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        TextDataset.from_csv(tmp_path / "nope.csv")
