"""The feature report: statistics vs a dense reference, page contents, bad input, and a real headless browser."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mi_crow.report import FeatureStats, compute_feature_stats, histogram_chart, line_chart, write_feature_report
from mi_crow.testing import build_tokenizer

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


class ToySae:
    """A stand-in SAE: relu(x W^T) then top-k, enough for the report (which only calls encode)."""

    def __init__(self, n_latents: int = 48, n_inputs: int = 12, k: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.n_latents, self.n_inputs, self.k = n_latents, n_inputs, k
        self.W = torch.randn(n_latents, n_inputs, generator=g)
        # A column of large negative bias keeps some latents dead, as in a real SAE.
        self.b = torch.zeros(n_latents)
        self.b[-6:] = -1e4

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(x @ self.W.T + self.b)
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def encode(self, x: torch.Tensor):
        pre = torch.relu(x @ self.W.T + self.b)
        return pre.topk(self.k, dim=-1)


def test_feature_stats_match_a_dense_reference() -> None:
    sae = ToySae()
    x = torch.randn(700, sae.n_inputs, generator=torch.Generator().manual_seed(1)) * 3
    stats = compute_feature_stats(sae, [x[:256], x[256:600].reshape(4, 86, -1), x[600:]], n_bins=10,
                                  log10_range=(-2.0, 1.5))
    dense = sae.dense(x).numpy().astype(np.float64)
    assert stats.n_tokens == 700
    np.testing.assert_array_equal(stats.fire_count.numpy(), (dense > 0).sum(0))
    np.testing.assert_allclose(stats.act_sum.numpy(), dense.sum(0), rtol=1e-5)
    np.testing.assert_allclose(stats.act_max.numpy(), dense.max(0), rtol=1e-6)
    edges = np.linspace(-2.0, 1.5, 11)
    for j in range(sae.n_latents):
        logs = np.log10(dense[:, j][dense[:, j] > 0])
        ref, _ = np.histogram(np.clip(logs, -2.0, 1.5 - 1e-9), bins=edges)
        np.testing.assert_array_equal(stats.hist_counts[j].numpy(), ref)
    assert stats.dead_fraction == pytest.approx(6 / 48)
    np.testing.assert_allclose(stats.frequency.numpy(), (dense > 0).mean(0))

    capped = compute_feature_stats(sae, [x[:256], x[256:]], max_tokens=300)
    assert capped.n_tokens == 300
    np.testing.assert_array_equal(capped.fire_count.numpy(), (dense[:300] > 0).sum(0))


class ToySaeWithDecoder(ToySae):
    def __init__(self) -> None:
        super().__init__()
        self.W_dec = torch.randn(self.n_latents, self.n_inputs, generator=torch.Generator().manual_seed(5)) * 0.3

    def decode(self, code) -> torch.Tensor:
        values, indices = code
        return torch.zeros(values.shape[0], self.n_latents).scatter(-1, indices, values) @ self.W_dec


def test_feature_stats_measure_reconstruction_against_numpy() -> None:
    sae = ToySaeWithDecoder()
    x = torch.randn(300, sae.n_inputs, generator=torch.Generator().manual_seed(3)) * 2 + 1.5
    stats = compute_feature_stats(sae, [x[:100], x[100:]])
    xn = x.double().numpy()
    recon = (sae.dense(x).double() @ sae.W_dec.double()).numpy()
    err = ((xn - recon) ** 2).sum()
    assert stats.mse == pytest.approx(err / xn.size, rel=1e-5)
    assert stats.fvu == pytest.approx(err / ((xn - xn.mean(0)) ** 2).sum(), rel=1e-5)
    assert stats.l0 == pytest.approx((sae.dense(x) > 0).sum(1).double().mean().item())
    assert compute_feature_stats(ToySae(), [x]).fvu is None  # no decode: no reconstruction numbers


def test_feature_stats_bad_input() -> None:
    sae = ToySae()
    with pytest.raises(ValueError, match="n_bins"):
        compute_feature_stats(sae, [], n_bins=0)
    with pytest.raises(ValueError, match="log10_range"):
        compute_feature_stats(sae, [], log10_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="max_tokens"):
        compute_feature_stats(sae, [], max_tokens=-3)
    with pytest.raises(ValueError, match="width 5 .*n_inputs=12"):
        compute_feature_stats(sae, [torch.zeros(3, 5)])
    with pytest.raises(TypeError, match="batches must yield tensors"):
        compute_feature_stats(sae, [[1.0] * 12])


def test_svg_charts_escape_labels_and_draw_data() -> None:
    svg = line_chart({"a<b": [(0, 1.0), (1, 0.5), (2, float("nan")), (3, 0.25)]}, title="loss & <friends>")
    assert "<friends>" not in svg and "&lt;friends&gt;" in svg and "a&lt;b" in svg
    path = re.search(r'<path d="([^"]+)"', svg).group(1)
    assert path.count("L") == 2  # three finite points, the NaN is skipped
    hist = histogram_chart([3, 0, 5], [0.0, 1.0, 2.0, 3.0], title="h")
    assert len(re.findall(r"<rect [^>]*fill=\"#2563eb\"", hist)) == 2  # empty bin draws no bar
    with pytest.raises(ValueError, match="edges"):
        histogram_chart([1, 2], [0.0, 1.0], title="bad")


def _page_data(path: Path) -> dict:
    html = path.read_text(encoding="utf-8")
    raw = re.search(r'<script id="report-data" type="application/json">(.*?)</script>', html, re.S).group(1)
    return json.loads(raw)


TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "Careful: </script><script>window.__pwned = 1</script> & <b>bold</b> are only text here.",
]


def _tracked(tokenizer, text: str, word: str, activation: float) -> dict:
    """An entry as the tracker would record it: position and spelling of the token that contains ``word``."""
    enc = tokenizer(text, return_offsets_mapping=True)
    start = text.index(word)
    pos = next(p for p, (s, e) in enumerate(enc["offset_mapping"]) if s <= start < e)
    token = tokenizer.convert_ids_to_tokens(enc["input_ids"])[pos]
    span = tuple(enc["offset_mapping"][pos])
    return {"text": text, "activation": activation, "token_position": pos, "token": token, "_span": span,
            "_shown": tokenizer.convert_tokens_to_string([token])}


def _build_report(tmp_path: Path) -> tuple[Path, dict, ToySae, FeatureStats]:
    tok = build_tokenizer("gpt2")
    sae = ToySae()
    x = torch.randn(500, sae.n_inputs, generator=torch.Generator().manual_seed(2)) * 3
    stats = compute_feature_stats(sae, [x])
    top = {
        0: [_tracked(tok, TEXTS[0], "fox", 4.0), _tracked(tok, TEXTS[1], "capital", 1.0)],
        5: [_tracked(tok, TEXTS[1], "Berlin", 2.5)],
        7: [_tracked(tok, TEXTS[2], "pwned", 3.0)],
    }
    history = [{"step": s, "tokens": 256 * s, "loss": 2.0 / (s + 1), "mse": 1.5 / (s + 1), "fvu": 0.6 / (s + 1),
                "l0": 4.0, "dead_fraction": max(0.0, 0.4 - s / 20)} for s in range(12)]
    out = write_feature_report(
        tmp_path / "sub" / "report.html", sae, top_texts=top, history=history,
        eval_metrics={"fvu": 0.21, "l0": 4.0, "dead_fraction": 0.125, "loss_recovered": 0.87},
        feature_stats=stats, concepts={5: "capital cities", 0: "animals"}, tokenizer=tok,
        metadata={"model": "toy", "layer": "h.1"},
    )
    return out, top, sae, stats


def test_report_page_embeds_features_texts_and_charts(tmp_path) -> None:
    out, top, sae, stats = _build_report(tmp_path)
    html = out.read_text(encoding="utf-8")
    data = _page_data(out)
    assert len(data["features"]) == sae.n_latents
    f5 = data["features"][5]
    assert f5["n"] == "capital cities" and f5["t"] == top[5][0]["_shown"].strip()
    assert f5["t"] and "Berlin".startswith(f5["t"])
    assert f5["f"] == pytest.approx(stats.frequency[5].item())
    assert f5["x"] == pytest.approx(stats.act_max[5].item(), rel=1e-5)
    assert sum(f5.get("h", [])) == stats.fire_count[5].item()
    assert data["features"][-1]["d"] is True  # a dead feature is flagged
    # Each example's character span covers exactly the tracked token in its text (the tokenizer's offsets).
    for neuron in (0, 5, 7):
        for got, want in zip(data["examples"][str(neuron)], top[neuron]):
            tid, start, end, score, shown = got
            assert data["texts"][tid] == want["text"]
            assert (start, end) == want["_span"] and shown == want["_shown"]
            assert score == pytest.approx(want["activation"])
    assert data["texts"].count(TEXTS[1]) == 1  # texts shared by features are stored once
    # Training curves and the frequency histogram are inline SVG; nothing is fetched from elsewhere.
    assert html.count("<svg") == 6  # loss, MSE, FVU, L0, dead fraction, firing frequency
    assert "during training" in html and "firing frequency" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    # The hostile text is data only: exactly the page's own two script elements close.
    assert html.count("</script>") == 2


def test_report_accepts_tracker_export_layout(tmp_path) -> None:
    exported = {"n_latents": 4, "neurons": [{"neuron": 2, "top_texts": [
        {"text": "alpha beta gamma", "activation": 1.5, "token_position": 1, "token": "beta", "token_id": 9}]}]}
    out = write_feature_report(tmp_path / "r.html", top_texts=exported)
    data = _page_data(out)
    assert len(data["features"]) == 3
    tid, start, end, score, _ = data["examples"]["2"][0]
    assert data["texts"][tid][start:end] == "beta" and score == 1.5


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"path": 3}, TypeError, "path"),
        ({"window_chars": 0}, ValueError, "window_chars"),
        ({"max_examples": "5"}, ValueError, "max_examples"),
        ({"eval_metrics": [1, 2]}, TypeError, "eval_metrics"),
        ({"feature_stats": {"a": 1}}, TypeError, "feature_stats"),
        ({"top_texts": "text"}, TypeError, "top_texts"),
        ({"top_texts": {99: [{"text": "x", "activation": 1.0}]}}, ValueError, "99"),
        ({"concepts": {48: "too far"}}, ValueError, "48"),
        ({"history": 5}, TypeError, "history"),
        ({"initial_feature": 1000}, ValueError, "initial_feature"),
        ({"title": None}, TypeError, "title"),
    ],
)
def test_report_bad_input(tmp_path, kwargs, error, match) -> None:
    args = {"path": tmp_path / "r.html", "sae": ToySae()}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        write_feature_report(**args)


def test_report_needs_to_know_the_features(tmp_path) -> None:
    with pytest.raises(ValueError, match="needs sae, feature_stats or top_texts"):
        write_feature_report(tmp_path / "r.html")
    stats = compute_feature_stats(ToySae(n_latents=10), [torch.randn(5, 12)])
    with pytest.raises(ValueError, match="10 features .*n_latents=48"):
        write_feature_report(tmp_path / "r.html", ToySae(), feature_stats=stats)


@pytest.mark.browser
def test_report_in_headless_chromium(tmp_path, browser) -> None:
    out, top, sae, stats = _build_report(tmp_path)
    page = browser.new_page()
    page.send("Page.navigate", url=out.resolve().as_uri())
    page.wait_event("Page.loadEventFired")
    assert page.eval("document.body.getAttribute('data-ready')") == "1"

    def rows() -> list[int]:
        return page.eval("Array.from(document.querySelectorAll('#feature-table tbody tr'))"
                         ".map(function (r) { return +r.getAttribute('data-feature'); })")

    assert rows() == list(range(sae.n_latents))
    # Search filters by concept name, by top token and by text; the hostile text never ran.
    page.type_into("#search", "capital")
    assert rows() == [0, 5]  # 5 by name "capital cities", 0 by its top text about capitals
    page.eval("var s = document.getElementById('search'); s.value = ''; s.dispatchEvent(new Event('input'))")
    page.type_into("#search", "animals")
    assert rows() == [0]
    page.eval("var s = document.getElementById('search'); s.value = ''; s.dispatchEvent(new Event('input'))")
    assert page.eval("window.__pwned === undefined")

    # Sorting by frequency (descending on first click) follows the statistics.
    page.click("#feature-table th[data-key=f]")
    freq = stats.frequency.tolist()
    got = rows()
    assert [freq[i] for i in got] == sorted(freq, reverse=True)

    # Clicking a feature shows its top texts with the firing token highlighted, strongest first.
    page.click("#feature-table tbody tr[data-feature='0']")
    assert page.eval("document.querySelector('#feature-detail h3').textContent").startswith("Feature 0")
    marks = page.eval("Array.from(document.querySelectorAll('#feature-detail mark.tok')).map(function (m) {"
                      "return [m.textContent, +m.getAttribute('data-strength'),"
                      " getComputedStyle(m).backgroundColor];})")
    assert [m[0] for m in marks] == [e["text"][slice(*e["_span"])] for e in top[0]]
    assert "fox".startswith(marks[0][0].strip()) and "capital".startswith(marks[1][0].strip())
    assert marks[0][1] == 1.0 and marks[1][1] == pytest.approx(0.25, abs=1e-3)
    # Computed colours read "rgb(255, 122, 0)" at full strength and "rgba(255, 122, 0, a)" below it.
    alpha = [float(re.fullmatch(r"rgba?\(255, 122, 0(?:, ([0-9.]+))?\)", m[2]).group(1) or 1) for m in marks]
    assert alpha[0] > alpha[1]
    assert page.eval("document.querySelectorAll('#feature-detail svg.feature-hist rect').length") > 0
    assert page.eval("location.hash") == "#feature=0"

    page.click("#feature-table tbody tr[data-feature='7']")
    shown = page.eval("document.querySelector('#feature-detail .example').textContent")
    assert "</script><script>window.__pwned = 1</script>" in shown
    assert page.eval("window.__pwned === undefined")
    page.click("#feature-table tbody tr[data-feature='5']")
    assert page.eval("document.querySelector('#feature-detail .concept').textContent") == "capital cities"

    # A link to one feature and a search (the URL hash) opens the page in that state.
    linked = browser.new_page()
    linked.send("Page.navigate", url=out.resolve().as_uri() + "#search=Berlin&feature=5")
    linked.wait_event("Page.loadEventFired")
    assert linked.eval("document.getElementById('search').value") == "Berlin"
    assert linked.eval("Array.from(document.querySelectorAll('#feature-table tbody tr'))"
                       ".map(function (r) { return +r.getAttribute('data-feature'); })") == [0, 5]  # 0's text: Berlin
    assert linked.eval("document.querySelector('#feature-detail h3').textContent").startswith("Feature 5")
    assert linked.errors() == []
    linked.ws.close()

    ARTIFACTS.mkdir(exist_ok=True)
    shot = page.send("Page.captureScreenshot", format="png")
    (ARTIFACTS / "feature_report.png").write_bytes(__import__("base64").b64decode(shot["data"]))

    assert page.errors() == []
    requests = [ev["params"]["request"]["url"] for ev in page.events if ev["method"] == "Network.requestWillBeSent"]
    assert requests and all(u.startswith("file://") or u.startswith("data:") for u in requests), requests
    page.ws.close()


def test_report_from_live_concepts_of_a_real_sae(tmp_path, tiny_lm, sample_texts) -> None:
    """The objects the library hands out (TopText lists, ConceptDictionary) go straight into the report; token
    positions (BOS counted for the Llama tokenizer) land on the right characters."""
    from mi_crow.mechanistic.sae import TopKSae

    sae = TopKSae(n_latents=40, n_inputs=32, k=4)
    tiny_lm.attach_sae(sae, 1)
    sae.concepts.enable_text_tracking(top_k=3)
    tiny_lm.inference.execute_inference(sample_texts, batch_size=8)
    top = sae.concepts.get_top_texts()
    named = next(i for i, recs in enumerate(top) if recs)
    sae.concepts.name_concept(named, "first named")
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    out = write_feature_report(tmp_path / "live.html", sae, top_texts=top, concepts=sae.concepts.dictionary,
                               feature_stats=compute_feature_stats(sae, [x]), tokenizer=tiny_lm.tokenizer)
    data = _page_data(out)
    assert data["features"][named]["n"] == "first named"
    enc_cache = {}
    for neuron, records in enumerate(top):
        for got, rec in zip(data["examples"].get(str(neuron), []), records):
            tid, start, end, score, shown = got
            assert data["texts"][tid] == rec.text and score == pytest.approx(rec.activation)
            if rec.text not in enc_cache:
                enc_cache[rec.text] = tiny_lm.tokenizer(rec.text, return_offsets_mapping=True)["offset_mapping"]
            assert (start, end) == tuple(enc_cache[rec.text][rec.token_position])
