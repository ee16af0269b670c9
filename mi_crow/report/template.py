"""The report page: inline CSS and vanilla JavaScript, filled in by :mod:`mi_crow.report.html`.

The placeholders ``@@TITLE@@``, ``@@OVERVIEW@@`` and ``@@DATA@@`` are replaced; the data is JSON with ``<``, ``>``
and ``&`` escaped as ``\\u003c`` etc., so nothing in it can close the ``<script>`` element.
"""

PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>@@TITLE@@</title>
<style>
:root { --fg:#1f2937; --muted:#6b7280; --line:#e5e7eb; --bg:#f9fafb; --accent:#2563eb; --hl:255,122,0; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--fg); background:#fff; }
header { padding:16px 24px; border-bottom:1px solid var(--line); background:var(--bg); }
header h1 { margin:0 0 4px; font-size:20px; }
header .meta { color:var(--muted); font-size:13px; }
main { padding:16px 24px; }
h2 { font-size:16px; margin:20px 0 8px; }
.cards { display:flex; flex-wrap:wrap; gap:10px; margin-bottom:8px; }
.card { border:1px solid var(--line); border-radius:8px; padding:8px 12px; min-width:120px; background:#fff; }
.card .k { color:var(--muted); font-size:12px; }
.card .v { font-size:18px; font-weight:600; }
.charts { display:flex; flex-wrap:wrap; gap:12px; }
svg.chart { border:1px solid var(--line); border-radius:8px; background:#fff; }
svg .chart-title { font-size:13px; font-weight:600; fill:var(--fg); }
svg .tick, svg .legend { font-size:10px; fill:var(--muted); }
svg .axis-label { font-size:11px; fill:var(--muted); }
svg .muted { font-size:12px; fill:var(--muted); }
svg .grid { stroke:#eef0f3; stroke-width:1; }
svg .plot-bg { fill:#fcfcfd; }
#explorer { display:grid; grid-template-columns:minmax(380px, 1fr) minmax(420px, 1.3fr); gap:16px; align-items:start; }
.controls { display:flex; gap:10px; align-items:center; margin-bottom:8px; flex-wrap:wrap; }
#search { flex:1; min-width:200px; padding:6px 10px; border:1px solid #cbd5e1; border-radius:6px; font-size:14px; }
#count { color:var(--muted); font-size:12px; }
.table-wrap { max-height:72vh; overflow:auto; border:1px solid var(--line); border-radius:8px; }
table { border-collapse:collapse; width:100%; font-size:13px; }
th, td { padding:4px 8px; border-bottom:1px solid var(--line); text-align:left; white-space:nowrap; }
th { position:sticky; top:0; background:var(--bg); cursor:pointer; user-select:none; }
th.sorted-asc::after { content:" \25B2"; font-size:10px; }
th.sorted-desc::after { content:" \25BC"; font-size:10px; }
td.num { text-align:right; font-variant-numeric:tabular-nums; }
tbody tr { cursor:pointer; }
tbody tr:hover { background:#f1f5f9; }
tbody tr.selected { background:#dbeafe; }
tr.dead td { color:#9ca3af; }
code.tokname { background:#f3f4f6; border-radius:4px; padding:0 4px; white-space:pre; }
#feature-detail { border:1px solid var(--line); border-radius:8px; padding:12px 16px; min-height:200px; }
#feature-detail h3 { margin:0 0 6px; font-size:16px; }
.concept { display:inline-block; background:#ecfdf5; color:#065f46; border-radius:10px; padding:0 8px; font-size:12px; }
.stats-line { color:var(--muted); font-size:12px; margin-bottom:8px; }
ol.examples { padding-left:22px; margin:6px 0; }
ol.examples li { margin:0 0 8px; }
.example { font-family:ui-monospace,SFMono-Regular,Menlo,monospace; font-size:12px; white-space:pre-wrap; word-break:break-word; }
.example .tok { border-radius:3px; padding:0 1px; outline:1px solid rgba(var(--hl),0.9); }
.example .score { color:var(--muted); font-family:system-ui,sans-serif; font-size:11px; margin-left:6px; }
.muted-text { color:var(--muted); }
.chips { display:flex; flex-wrap:wrap; gap:4px; margin:2px 0 8px; }
.chip { font-family:ui-monospace,SFMono-Regular,Menlo,monospace; font-size:12px; border-radius:4px; padding:0 5px; white-space:pre; }
.chip.up { background:#dcfce7; color:#14532d; }
.chip.down { background:#fee2e2; color:#7f1d1d; }
a.feat { color:var(--accent); cursor:pointer; text-decoration:none; margin-right:8px; font-size:12px; }
table.sweep { width:auto; font-size:12px; margin:4px 0 8px; }
table.sweep td, table.sweep th { position:static; cursor:default; padding:2px 8px; }
table.sweep tr.chosen { background:#dbeafe; }
.steer-text { font-size:12px; margin:2px 0 6px; }
.steer-text b { display:inline-block; min-width:60px; }
h4 { margin:12px 0 4px; font-size:13px; }
footer { color:var(--muted); font-size:12px; padding:16px 24px; border-top:1px solid var(--line); }
</style>
</head>
<body>
<header>
<h1>@@TITLE@@</h1>
<div class="meta" id="meta"></div>
</header>
<main>
<section id="overview">
<h2>Overview</h2>
<div class="cards" id="metric-cards"></div>
<div class="charts">@@OVERVIEW@@</div>
</section>
<section>
<h2>Features</h2>
<div id="explorer">
<div>
<div class="controls">
<input id="search" type="search" placeholder="Search: index, name, top token or text" autocomplete="off">
<label><input id="hide-dead" type="checkbox"> hide dead</label>
<span id="count"></span>
</div>
<div class="table-wrap">
<table id="feature-table">
<thead><tr>
<th data-key="i">#</th><th data-key="n">name</th><th data-key="f">freq</th><th data-key="m">mean act</th>
<th data-key="x">max act</th><th data-key="t">top token</th><th data-key="p">promotes</th>
</tr></thead>
<tbody></tbody>
</table>
</div>
</div>
<div id="feature-detail"><p class="muted-text">Select a feature to see its top texts.</p></div>
</div>
</section>
</main>
<footer>Generated by mi_crow. Self-contained: no network access needed.</footer>
<script id="report-data" type="application/json">@@DATA@@</script>
<script>
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("report-data").textContent);
  var FEATURES = DATA.features;
  var BY_INDEX = {};
  FEATURES.forEach(function (f) { BY_INDEX[f.i] = f; });
  var MAX_ROWS = 600;
  var state = { search: "", sortKey: "i", sortDir: 1, hideDead: false, feature: null };

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "cls") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { if (c !== null && c !== undefined) node.appendChild(c); });
    return node;
  }
  function fmt(v) {
    if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) return "\u2013";
    if (typeof v !== "number") return String(v);
    var a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e5 || a < 1e-3) return v.toExponential(2);
    if (Number.isInteger(v)) return v.toLocaleString("en-US");
    return v.toPrecision(a >= 100 ? 5 : 3);
  }
  function fmtFreq(v) { return v > 0 ? (100 * v).toPrecision(2) + "%" : "0"; }

  function renderHeader() {
    var m = DATA.meta || {};
    var bits = [];
    ["model", "layer", "sae", "n_latents", "n_inputs", "k", "tokens", "created"].forEach(function (key) {
      if (m[key] !== undefined && m[key] !== null) bits.push(key.replace("_", " ") + ": " + fmt(m[key]));
    });
    document.getElementById("meta").textContent = bits.join(" \u00b7 ");
    var cards = document.getElementById("metric-cards");
    (DATA.cards || []).forEach(function (c) {
      cards.appendChild(el("div", { cls: "card", title: c.help || "" }, [
        el("div", { cls: "k", text: c.label }), el("div", { cls: "v", text: fmt(c.value) })]));
    });
  }

  function matches(f, q) {
    if (!q) return true;
    if (/^#?\d+$/.test(q)) return String(f.i) === q.replace("#", "");
    if (f.n && f.n.toLowerCase().indexOf(q) >= 0) return true;
    if (f.t && f.t.toLowerCase().indexOf(q) >= 0) return true;
    if (f.p && f.p.toLowerCase().indexOf(q) >= 0) return true;
    var ex = DATA.examples[f.i] || [];
    for (var j = 0; j < ex.length; j++) {
      var e = ex[j], text = DATA.texts[e[0]];
      var lo = Math.max(0, e[1] - DATA.window), hi = Math.min(text.length, e[2] + DATA.window);
      if (text.slice(lo, hi).toLowerCase().indexOf(q) >= 0) return true;
    }
    return false;
  }

  function sortValue(f, key) {
    var v = f[key];
    if (key === "n" || key === "t" || key === "p") return (v || "").toLowerCase();
    return v === null || v === undefined ? -Infinity : v;
  }

  function renderTable() {
    var q = state.search.trim().toLowerCase();
    var rows = FEATURES.filter(function (f) { return (!state.hideDead || !f.d) && matches(f, q); });
    var key = state.sortKey, dir = state.sortDir;
    rows.sort(function (a, b) {
      var va = sortValue(a, key), vb = sortValue(b, key);
      if (va < vb) return -dir;
      if (va > vb) return dir;
      return a.i - b.i;
    });
    var tbody = document.querySelector("#feature-table tbody");
    tbody.textContent = "";
    var frag = document.createDocumentFragment();
    rows.slice(0, MAX_ROWS).forEach(function (f) {
      var tr = el("tr", { "data-feature": String(f.i) }, [
        el("td", { cls: "num", text: String(f.i) }),
        el("td", { text: f.n || "" }),
        el("td", { cls: "num", text: fmtFreq(f.f) }),
        el("td", { cls: "num", text: fmt(f.m) }),
        el("td", { cls: "num", text: fmt(f.x) }),
        el("td", {}, [f.t ? el("code", { cls: "tokname", text: f.t }) : null]),
        el("td", {}, [f.p ? el("code", { cls: "tokname", text: f.p }) : null])]);
      if (f.d) tr.classList.add("dead");
      if (state.feature === f.i) tr.classList.add("selected");
      frag.appendChild(tr);
    });
    tbody.appendChild(frag);
    var shown = Math.min(rows.length, MAX_ROWS);
    document.getElementById("count").textContent = rows.length + " of " + FEATURES.length + " features" +
      (shown < rows.length ? " (first " + shown + " shown)" : "");
    document.querySelectorAll("#feature-table th").forEach(function (th) {
      th.classList.remove("sorted-asc", "sorted-desc");
      if (th.getAttribute("data-key") === key) th.classList.add(dir > 0 ? "sorted-asc" : "sorted-desc");
    });
  }

  function histogramSvg(f) {
    var NS = "http://www.w3.org/2000/svg";
    var counts = f.h || [], start = f.hs || 0, edges = DATA.hist_edges || [];
    var w = 380, h = 120, left = 36, bottom = 22, top = 8, pw = w - left - 8, ph = h - top - bottom;
    var svg = document.createElementNS(NS, "svg");
    svg.setAttribute("class", "chart feature-hist");
    svg.setAttribute("width", w); svg.setAttribute("height", h);
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    var max = Math.max.apply(null, counts.concat([0]));
    function text(x, y, s, anchor) {
      var t = document.createElementNS(NS, "text");
      t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("class", "tick");
      t.setAttribute("text-anchor", anchor || "middle"); t.textContent = s; svg.appendChild(t);
    }
    if (!counts.length || max <= 0) { text(w / 2, h / 2, "never fired"); return svg; }
    var n = counts.length, bw = pw / n;
    counts.forEach(function (c, j) {
      var r = document.createElementNS(NS, "rect"), bh = c / max * ph;
      r.setAttribute("x", left + j * bw + 0.5); r.setAttribute("y", top + ph - bh);
      r.setAttribute("width", Math.max(bw - 1, 0.5)); r.setAttribute("height", bh);
      r.setAttribute("fill", "#f97316");
      var tt = document.createElementNS(NS, "title");
      tt.textContent = c + " tokens in [" + fmt(Math.pow(10, edges[start + j])) + ", " +
        fmt(Math.pow(10, edges[start + j + 1])) + ")";
      r.appendChild(tt); svg.appendChild(r);
    });
    text(left - 4, top + 8, fmt(max), "end");
    text(left - 4, top + ph, "0", "end");
    [0, Math.floor(n / 2), n].forEach(function (j) {
      text(left + j * bw, h - 8, fmt(Math.pow(10, edges[start + j])));
    });
    return svg;
  }

  function exampleNode(e, fmax) {
    var text = DATA.texts[e[0]], s = e[1], t = e[2], score = e[3];
    var lo = Math.max(0, s - DATA.window), hi = Math.min(text.length, t + DATA.window);
    var strength = fmax > 0 ? Math.max(0, Math.min(1, score / fmax)) : 1;
    var tok = el("mark", { cls: "tok", title: "activation " + fmt(score), "data-strength": strength.toFixed(3) });
    tok.textContent = text.slice(s, t) || "\u2205";
    tok.style.backgroundColor = "rgba(" + "255,122,0" + "," + (0.15 + 0.85 * strength).toFixed(3) + ")";
    var node = el("div", { cls: "example" }, [
      document.createTextNode((lo > 0 ? "\u2026" : "") + text.slice(lo, s)), tok,
      document.createTextNode(text.slice(t, hi) + (hi < text.length ? "\u2026" : "")),
      el("span", { cls: "score", text: "act " + fmt(score) + (e[4] ? " \u00b7 token " + JSON.stringify(e[4]) : "") })]);
    return el("li", {}, [node]);
  }

  function renderDetail() {
    var box = document.getElementById("feature-detail");
    box.textContent = "";
    var f = state.feature === null ? null : BY_INDEX[state.feature];
    if (!f) { box.appendChild(el("p", { cls: "muted-text", text: "Select a feature to see its top texts." })); return; }
    var title = el("h3", { text: "Feature " + f.i + " " }, [f.n ? el("span", { cls: "concept", text: f.n }) : null]);
    box.appendChild(title);
    if (f.notes) box.appendChild(el("div", { cls: "stats-line", text: f.notes }));
    box.appendChild(el("div", { cls: "stats-line", text: "fires on " + fmtFreq(f.f) + " of tokens \u00b7 mean " +
      fmt(f.m) + " \u00b7 max " + fmt(f.x) + (f.t ? " \u00b7 top token " + JSON.stringify(f.t) : "") +
      (f.d ? " \u00b7 dead" : "") }));
    var dens = FEATURES.filter(function (g) { return g.f !== null && g.f !== undefined && g.f < f.f; }).length;
    if (f.f !== null && f.f !== undefined) box.appendChild(el("div", { cls: "stats-line density", text: "density " +
      (f.f > 0 ? "10^" + (Math.log10(f.f)).toFixed(2) : "0") + " · denser than " +
      Math.round(100 * dens / FEATURES.length) + "% of features" }));
    var lens = (DATA.lens || {})[f.i];
    if (lens) {
      box.appendChild(el("h4", { text: "Promotes (logit lens of its decoder direction)" }));
      box.appendChild(chips(lens[0], lens[1], "up", "promoted"));
      box.appendChild(el("h4", { text: "Suppresses" }));
      box.appendChild(chips(lens[2], lens[3], "down", "suppressed"));
    }
    box.appendChild(histogramSvg(f));
    var st = (DATA.steering || {})[f.i];
    if (st) box.appendChild(steeringNode(st));
    var ex = DATA.examples[f.i] || [];
    box.appendChild(el("h4", { text: "Top texts (" + ex.length + ")" }));
    var fmax = ex.reduce(function (a, e) { return Math.max(a, e[3]); }, 0);
    if (!ex.length) box.appendChild(el("p", { cls: "muted-text", text: "No tracked texts for this feature." }));
    else {
      var ol = el("ol", { cls: "examples top-texts" });
      ex.forEach(function (e) { ol.appendChild(exampleNode(e, fmax)); });
      box.appendChild(ol);
    }
    var qx = (DATA.quantile || {})[f.i] || [];
    if (qx.length) {
      var qmax = Math.max(fmax, qx.reduce(function (a, e) { return Math.max(a, e[3]); }, 0));
      box.appendChild(el("h4", { text: "Across its activation range (sampled at quantiles)" }));
      var ql = el("ul", { cls: "examples quantiles" });
      qx.forEach(function (e) {
        var li = exampleNode(e, qmax);
        li.insertBefore(el("span", { cls: "score", text: "q" + Math.round(100 * (e[5] || 0)) + " " }), li.firstChild);
        ql.appendChild(li);
      });
      box.appendChild(ql);
    }
    linkList(box, "Fires together with", (DATA.cofire || {})[f.i], function (v) {
      return (100 * v).toFixed(0) + "% of its firings"; }, "cofire");
    linkList(box, "Nearest decoder directions", (DATA.nearest || {})[f.i], function (v) {
      return "cos " + v.toFixed(2); }, "nearest");
  }

  function chips(tokens, logits, kind, cls) {
    var div = el("div", { cls: "chips " + cls });
    (tokens || []).forEach(function (t, j) {
      div.appendChild(el("span", { cls: "chip " + kind, title: "logit " + fmt((logits || [])[j]), text: t }));
    });
    return div;
  }

  function linkList(box, title, items, describe, cls) {
    if (!items || !items.length) return;
    box.appendChild(el("h4", { text: title }));
    var div = el("div", { cls: "links " + cls });
    items.forEach(function (pair) {
      var g = BY_INDEX[pair[0]];
      var a = el("a", { cls: "feat", "data-feature": String(pair[0]),
        text: "#" + pair[0] + (g && g.p ? " " + JSON.stringify(g.p) : "") + " (" + describe(pair[1]) + ")" });
      div.appendChild(a);
    });
    box.appendChild(div);
  }

  function steeringNode(st) {
    var div = el("div", { cls: "steering" });
    div.appendChild(el("h4", { text: "Steering (" + (st.mode || "add") + ", measured)" }));
    var head = el("tr", {}, ["strength", "feature active", "promoted tokens", "loss (nat/token)", "loss rise", "KL",
      "targets"].map(function (h) { return el("th", { text: h }); }));
    var rows = [head];
    [st.plain].concat(st.points || []).forEach(function (p, j) {
      var tr = el("tr", {}, [
        el("td", { text: j === 0 ? "plain" : fmt(p.strength) }),
        el("td", { cls: "num", text: (100 * p.feature_active).toFixed(0) + "%" }),
        el("td", { cls: "num", text: (100 * p.promoted_rate).toFixed(0) + "%" }),
        el("td", { cls: "num", text: fmt(p.loss) }),
        el("td", { cls: "num", text: j === 0 ? "" : (p.loss_rise >= 0 ? "+" : "") + p.loss_rise.toFixed(2) }),
        el("td", { cls: "num", text: j === 0 ? "" : fmt(p.kl) }),
        el("td", { text: j === 0 ? "" : (p.passes ? "met" : "not met") })]);
      if (j > 0 && p.strength === st.best_strength) tr.classList.add("chosen");
      rows.push(tr);
    });
    div.appendChild(el("table", { cls: "sweep" }, rows));
    (st.prompts || []).forEach(function (prompt, j) {
      div.appendChild(el("div", { cls: "steer-text" }, [el("b", { text: "prompt" }), document.createTextNode(prompt)]));
      div.appendChild(el("div", { cls: "steer-text" }, [el("b", { text: "plain" }),
        document.createTextNode((st.plain_texts || [])[j] || "")]));
      div.appendChild(el("div", { cls: "steer-text steered" }, [el("b", { text: "steered" }),
        document.createTextNode((st.steered_texts || [])[j] || "")]));
    });
    return div;
  }

  function writeHash() {
    var parts = [];
    if (state.search) parts.push("search=" + encodeURIComponent(state.search));
    if (state.feature !== null) parts.push("feature=" + state.feature);
    var h = parts.length ? "#" + parts.join("&") : " ";
    try {
      history.replaceState(null, "", h === " " ? location.pathname + location.search : h);
    } catch (err) { /* some browsers refuse replaceState on file:// pages; the hash is a convenience only */ }
  }

  function readHash() {
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var p = kv.split("="), k = p[0], v = decodeURIComponent(p.slice(1).join("=") || "");
      if (k === "search") state.search = v;
      if (k === "feature" && /^\d+$/.test(v) && BY_INDEX[+v]) state.feature = +v;
    });
  }

  function selectFeature(i) { state.feature = i; renderDetail(); renderTable(); writeHash(); }

  document.getElementById("search").addEventListener("input", function (ev) {
    state.search = ev.target.value; renderTable(); writeHash();
  });
  document.getElementById("hide-dead").addEventListener("change", function (ev) {
    state.hideDead = ev.target.checked; renderTable();
  });
  document.querySelector("#feature-table thead").addEventListener("click", function (ev) {
    var th = ev.target.closest("th");
    if (!th) return;
    var key = th.getAttribute("data-key");
    if (state.sortKey === key) state.sortDir = -state.sortDir;
    else { state.sortKey = key; state.sortDir = (key === "i" || key === "n" || key === "t" || key === "p") ? 1 : -1; }
    renderTable();
  });
  document.getElementById("feature-detail").addEventListener("click", function (ev) {
    var a = ev.target.closest("a.feat");
    if (a) selectFeature(+a.getAttribute("data-feature"));
  });
  document.querySelector("#feature-table tbody").addEventListener("click", function (ev) {
    var tr = ev.target.closest("tr");
    if (tr) selectFeature(+tr.getAttribute("data-feature"));
  });

  renderHeader();
  readHash();
  document.getElementById("search").value = state.search;
  if (state.feature === null && DATA.initial_feature !== null && DATA.initial_feature !== undefined) {
    state.feature = DATA.initial_feature;
  }
  renderTable();
  renderDetail();
  document.body.setAttribute("data-ready", "1");
})();
</script>
</body>
</html>
"""
