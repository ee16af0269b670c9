"""The per-feature dashboard of the report (issue 17): logit lens, quantile examples, co-firing, nearest decoder
directions and the steering measurement, checked in the page data against independent computations and in a real
headless browser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mi_crow.report import compute_feature_stats, write_feature_report


class ToySae:
    """relu(x W^T) then top-k, with a decoder: enough for the statistics, co-firing and decoder neighbours."""

    def __init__(self, n_latents: int = 16, n_inputs: int = 6, k: int = 3) -> None:
        g = torch.Generator().manual_seed(0)
        self.n_latents, self.n_inputs, self.k = n_latents, n_inputs, k
        self.W = torch.randn(n_latents, n_inputs, generator=g)
        self.W_dec = torch.randn(n_latents, n_inputs, generator=g)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(x @ self.W.T)
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def encode(self, x: torch.Tensor):
        return torch.relu(x @ self.W.T).topk(self.k, dim=-1)


LENS = {0: {"promoted": [" food", "Food", " foods"], "promoted_logits": [3.0, 2.5, 2.0],
            "suppressed": [" war", " battle"], "suppressed_logits": [-2.0, -1.5]}}
STEERING = {0: {"mode": "add", "best_strength": 1.0, "prompts": ["I like", "We went"],
                "plain": {"strength": None, "feature_active": 0.0, "promoted_rate": 0.0, "loss": 1.2, "loss_rise": 0.0,
                          "kl": 0.0, "passes": False, "continuations": [" it", " home"]},
                "points": [{"strength": 0.5, "feature_active": 0.5, "promoted_rate": 0.5, "loss": 1.5,
                            "loss_rise": 0.3, "kl": 0.2, "passes": False},
                           {"strength": 1.0, "feature_active": 1.0, "promoted_rate": 1.0, "loss": 1.9,
                            "loss_rise": 0.7, "kl": 0.9, "passes": True}],
                "best": {"continuations": [" food a lot", " to eat food"]}}}
QUANTILE = {0: [{"text": "some weak food text", "activation": 0.2, "token_position": 2, "token": " food",
                 "quantile": 0.1},
                {"text": "strong foods here", "activation": 2.0, "token_position": 1, "token": " foods",
                 "quantile": 0.9}]}


def _page_data(path: Path) -> dict:
    raw = re.search(r'<script id="report-data" type="application/json">(.*?)</script>',
                    path.read_text(encoding="utf-8"), re.S).group(1)
    return json.loads(raw)


def _build(tmp_path: Path):
    sae = ToySae()
    x = torch.randn(400, sae.n_inputs, generator=torch.Generator().manual_seed(1))
    stats = compute_feature_stats(sae, [x[:150], x[150:]], cofire_tokens=300, cofire_top=3)
    out = write_feature_report(tmp_path / "dash.html", sae, feature_stats=stats, logit_lens=LENS, steering=STEERING,
                               quantile_examples=QUANTILE, nearest=3, initial_feature=0)
    return out, sae, x, stats


def test_dashboard_data_matches_independent_computations(tmp_path) -> None:
    out, sae, x, stats = _build(tmp_path)
    data = _page_data(out)
    # Co-firing on the first 300 tokens, from the dense code.
    fired = (sae.dense(x[:300]) > 0).numpy()
    for f in range(sae.n_latents):
        own = fired[:, f].sum()
        got = data["cofire"].get(str(f), [])
        if own == 0:
            assert got == []
            continue
        shares = (fired[fired[:, f]].sum(0) / own)
        shares[f] = -1
        want = sorted(shares[shares > 0], reverse=True)[:3]
        assert [s for _, s in got] == pytest.approx(want, abs=1e-4)
        for j, s in got:
            assert shares[j] == pytest.approx(s, abs=1e-4)
    # Nearest decoder directions by cosine, against numpy.
    w = sae.W_dec.numpy() / np.linalg.norm(sae.W_dec.numpy(), axis=1, keepdims=True)
    cos = w @ w.T
    np.fill_diagonal(cos, -2)
    for f in range(sae.n_latents):
        assert [j for j, _ in data["nearest"][str(f)]] == list(np.argsort(-cos[f])[:3])
    assert data["lens"]["0"][0] == [" food", "Food", " foods"] and data["features"][0]["p"] == " food"
    assert data["steering"]["0"]["steered_texts"] == [" food a lot", " to eat food"]
    tid, start, end, score, shown, q = data["quantile"]["0"][1]
    assert data["texts"][tid][start:end] == "foods" and score == 2.0 and q == 0.9


@pytest.mark.parametrize("kwargs, match", [
    ({"logit_lens": {99: {"promoted": []}}}, "99"),
    ({"logit_lens": [1, 2]}, "logit_lens must be"),
    ({"steering": {16: {}}}, "16"),
    ({"quantile_examples": {20: [{"text": "a", "activation": 1.0}]}}, "20"),
])
def test_dashboard_bad_input(tmp_path, kwargs, match) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        write_feature_report(tmp_path / "r.html", ToySae(), **kwargs)


@pytest.mark.browser
def test_dashboard_in_headless_chromium(tmp_path, browser) -> None:
    out, sae, _, stats = _build(tmp_path)
    data = _page_data(out)
    page = browser.new_page()
    page.send("Page.navigate", url=out.resolve().as_uri())
    page.wait_event("Page.loadEventFired")
    assert page.eval("document.body.getAttribute('data-ready')") == "1"
    texts = page.eval("Array.from(document.querySelectorAll('#feature-detail .promoted .chip'))"
                      ".map(function (c) { return c.textContent; })")
    assert texts == [" food", "Food", " foods"]
    assert page.eval("document.querySelectorAll('#feature-detail .suppressed .chip').length") == 2
    rows = page.eval("Array.from(document.querySelectorAll('#feature-detail table.sweep tr'))"
                     ".map(function (r) { return r.className; })")
    assert len(rows) == 4 and rows[3] == "chosen"  # header, plain, 0.5, 1.0 (the chosen)
    steered = page.eval("Array.from(document.querySelectorAll('#feature-detail .steered'))"
                        ".map(function (d) { return d.textContent; })")
    assert steered == ["steered food a lot", "steered to eat food"]
    marks = page.eval("Array.from(document.querySelectorAll('#feature-detail ul.quantiles mark.tok'))"
                      ".map(function (m) { return m.textContent; })")
    assert marks == ["food", "foods"]
    assert "density" in page.eval("document.querySelector('#feature-detail .density').textContent")
    # A co-firing link opens that feature.
    first = data["cofire"]["0"][0][0]
    page.click("#feature-detail .cofire a.feat")
    assert page.eval("document.querySelector('#feature-detail h3').textContent").startswith(f"Feature {first}")
    near = page.eval("Array.from(document.querySelectorAll('#feature-detail .nearest a.feat'))"
                     ".map(function (a) { return +a.getAttribute('data-feature'); })")
    assert near == [j for j, _ in data["nearest"][str(first)]]
    assert page.errors() == []
    page.ws.close()
