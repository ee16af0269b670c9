"""Question: how fast do the default model's forward and activation saving run in float32 and in bfloat16 here?

The embedded SmolLM2-135M-Instruct (``mi_crow.defaults.load_default_model``), 16 texts x 128 tokens (paragraphs of
the default corpus with at least 128 tokens, so no padding), 2 threads. Per dtype (float32, bfloat16) and in the
same process, each repetition times, one after the other:

* ``forward``: the bare model forward up to the saved layer (stopped there by a hook, as saving stops), under
  ``torch.inference_mode`` -- what saving cannot go below;
* ``forward (full)``: the whole forward, LM head included;
* ``save``: ``lm.activations.save`` of the same 16 texts at the demo's layer (the middle block) into a fresh run of
  a ``LocalStore`` in a temporary folder (fsync as the CLI uses it).

Reported: tokens/s (median over repetitions), ``save / forward`` overhead, and ``bf16 save / fp32 save`` (the
issue's target: activation saving >= 1.8x today's fp32 tokens/s on a bf16-capable CPU, and saving's overhead over a
bare forward in the same dtype <= 10%). The policy's choice (``preferred_model_dtype("cpu")``) and the CPU level
(``mi_crow.ops.cpu_isa()``) are recorded: on a CPU without bf16 matrix instructions bf16 is expected to be slower
and the policy keeps float32.

Usage: ``python benchmarks/bench_forward.py [--repeats 5] [--threads 2] [--texts 16] [--tokens 128]``; prints a
Markdown table and writes ``benchmarks/results/bench_forward.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import mi_crow.ops as ops
from mi_crow.defaults import default_corpus_paragraphs, load_default_model, preferred_model_dtype
from mi_crow.store import LocalStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_meta, markdown  # noqa: E402


class _Stop(Exception):
    """Raised by the hook that ends a forward at the saved layer."""


def _stop(*_args: object) -> None:
    raise _Stop


def pick_texts(lm, count: int, tokens: int) -> list[str]:  # type: ignore[no-untyped-def]
    texts = []
    for paragraph in default_corpus_paragraphs():
        if len(lm.tokenizer(paragraph)["input_ids"]) >= tokens:
            texts.append(paragraph)
            if len(texts) == count:
                return texts
    raise RuntimeError(f"the default corpus has fewer than {count} paragraphs of {tokens} tokens")


def time_dtype(dtype: torch.dtype, repeats: int, count: int, tokens: int, root: Path) -> dict:
    lm = load_default_model(dtype=dtype, store=LocalStore(root / str(dtype).replace("torch.", "")))
    layer = lm.layers.resolve(lm.layers.num_blocks // 2)
    texts = pick_texts(lm, count, tokens)
    enc = lm.tokenize(texts, max_length=tokens)
    n_tokens = int(enc["attention_mask"].sum())
    module = lm.layers.get_module(layer)

    def forward(full: bool) -> None:
        handle = None if full else module.register_forward_hook(_stop)
        try:
            with torch.inference_mode():
                lm.model(**enc)
        except _Stop:
            pass
        finally:
            if handle is not None:
                handle.remove()

    def save() -> None:
        lm.activations.save(texts, layer, batch_size=count, max_length=tokens, progress=False)

    cases = {"forward": lambda: forward(False), "forward (full)": lambda: forward(True), "save": save}
    for fn in cases.values():
        fn()  # warm-up: oneDNN primitives, allocator, the store's folders
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {"layer": layer, "tokens": n_tokens, "times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.float32, torch.bfloat16):
            results[str(dtype).replace("torch.", "")] = time_dtype(dtype, args.repeats, args.texts, args.tokens,
                                                                   Path(tmp))
    rows = []
    tok_s = {}
    for name, r in results.items():
        med = {case: statistics.median(ts) for case, ts in r["times"].items()}
        for case, t in med.items():
            tok_s[(name, case)] = r["tokens"] / t
        for case, t in med.items():
            row = {"dtype": name, "case": case, "median_s": round(t, 3), "tokens_per_s": round(r["tokens"] / t, 1)}
            if case == "save":
                row["save_over_forward"] = round(med["save"] / med["forward"], 3)
            rows.append(row)
    ratios = {
        "bf16_save_over_fp32_save_tokens_per_s": round(tok_s[("bfloat16", "save")] / tok_s[("float32", "save")], 3),
        "bf16_forward_over_fp32_forward_tokens_per_s": round(
            tok_s[("bfloat16", "forward")] / tok_s[("float32", "forward")], 3),
        "fp32_save_overhead": round(tok_s[("float32", "forward")] / tok_s[("float32", "save")] - 1, 3),
        "bf16_save_overhead": round(tok_s[("bfloat16", "forward")] / tok_s[("bfloat16", "save")] - 1, 3),
    }
    isa = ops.cpu_isa()
    policy = str(preferred_model_dtype("cpu")).replace("torch.", "")
    print(f"torch {torch.__version__}, {args.threads} threads, {args.texts} texts x {args.tokens} tokens, "
          f"cpu level {isa.cpu if isa else 'unknown'}, policy: {policy}, load average {os.getloadavg()}\n")
    print(markdown(rows))
    print("\n" + "\n".join(f"{k}: {v}" for k, v in ratios.items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {**machine_meta(), "threads": args.threads, "cpu_isa": isa._asdict() if isa else None,
            "preferred_model_dtype": policy, "loadavg": os.getloadavg(), "texts": args.texts, "tokens": args.tokens}
    out = {"meta": meta, "rows": rows, "ratios": ratios,
           "raw_seconds": {k: v["times"] for k, v in results.items()}, "layer": results["float32"]["layer"]}
    (RESULTS / "bench_forward.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
