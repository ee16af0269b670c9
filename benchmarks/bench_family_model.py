"""Question: on the default model, does BatchTopK beat TopK at the same mean L0 (and does its inference threshold keep
the L0 near k), and how well does a transcoder of block 15's MLP predict the MLP's output and stand in for it?

Data: one activation-saving pass of the embedded SmolLM2-135M over paragraphs of the default corpus (the first
``--train-texts`` for training, the next ``--eval-texts`` held out, ``max_length`` 128, as in ``bench_quality.py``)
stores three layers from the same forward passes: the residual stream after block 15 (``model.layers.15``), the
MLP's input (``model.layers.15.post_attention_layernorm``) and its output (``model.layers.15.mlp``). Attention sinks
(`attention_sink_mask`, factor 10, decided on the residual stream over all real tokens of each split) are removed
from all three, so the rows stay aligned token by token. The tensors are cached (``--data``, under /tmp by default).

(a) ``TopKSae`` and ``BatchTopKSae`` with the same ``n``, ``k``, batch and token budget and mi_crow's default recipe
    (``SaeTrainingConfig(batch_size, n_tokens)``) on the residual stream. On the held-out tokens: TopK's FVU (its
    L0 is k per token); BatchTopK's FVU with the batch selection over the whole held-out set (mean L0 exactly k, the
    same mean L0 as TopK), and with its inference threshold (batch-independent; its mean L0 and the ratio to k).
(b) ``Transcoder`` (MLP input -> MLP output), with and without the skip term, same ``n``, ``k``, batch and budget.
    Held-out FVU against the MLP output's variance, and the LM loss on the held-out texts with the MLP's output
    replaced by the transcoder's prediction (the transcoder attached in ``mode="replace"``; sinks, decided on the
    block's input residual with the same rule, keep the MLP's own output) against the clean loss and the loss with
    the MLP's output zero-ablated (at the same tokens): loss recovered = (zero - spliced) / (zero - clean).

Usage: ``python benchmarks/bench_family_model.py [--parts a,b] [--budget 499712] [--lr-mult 1.5] [--threads 1]``;
prints the figures and writes ``benchmarks/results/bench_family_model.json`` (a run keeps the other parts' results
already there; ``--lr-mult`` trains part (a) at that multiple of the default recipe's peak learning rate, both
architectures, and files the rows under their own key, as does a ``--budget`` other than the default). Wall times are measured on a shared CPU: rough.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_meta  # noqa: E402

BLOCK = 15
DEFAULT_BUDGET = 499712
SINK_FACTOR = 10.0


def layer_names(block: int) -> dict[str, str]:
    return {"resid": f"model.layers.{block}", "mlp_in": f"model.layers.{block}.post_attention_layernorm",
            "mlp_out": f"model.layers.{block}.mlp"}


def split_texts(train_texts: int, eval_texts: int) -> tuple[list[str], list[str]]:
    from mi_crow import defaults

    paragraphs = defaults.default_corpus_paragraphs()
    if len(paragraphs) < train_texts + eval_texts:
        raise SystemExit(f"the default corpus has {len(paragraphs)} paragraphs, fewer than {train_texts + eval_texts}")
    return paragraphs[:train_texts], paragraphs[train_texts : train_texts + eval_texts]


def build_data(path: Path, train_texts: int, eval_texts: int, max_length: int) -> None:
    """Save ``{split: {"resid", "mlp_in", "mlp_out"}, "meta"}`` (sinks removed) from one saving pass per split."""
    from mi_crow import defaults
    from mi_crow.mechanistic.sae.outliers import attention_sink_mask
    from mi_crow.store import LocalStore

    names = layer_names(BLOCK)
    splits = dict(zip(("train", "heldout"), split_texts(train_texts, eval_texts)))
    out: dict[str, Any] = {"meta": {"model": "SmolLM2-135M-Instruct (embedded GGUF)", "layers": names,
                                    "train_texts": train_texts, "eval_texts": eval_texts, "max_length": max_length,
                                    "sink_factor": SINK_FACTOR, "sinks_removed": {}}}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        store = LocalStore(Path(tmp) / "store", fsync=False)
        lm = defaults.load_default_model(store=store)
        for split, texts in splits.items():
            start = time.perf_counter()
            run_id = lm.activations.save(texts, layers=list(names.values()), run_id=split, batch_size=16,
                                         max_length=max_length, progress=False)
            tensors = {}
            for key, name in names.items():
                reader = store.activation_reader(run_id, name, 8192, shuffle=False, drop_last=False,
                                                 dtype=torch.float32)
                tensors[key] = torch.cat(list(reader))
            sinks = attention_sink_mask(tensors["resid"], factor=SINK_FACTOR)
            out[split] = {key: t[~sinks].contiguous() for key, t in tensors.items()}
            out["meta"]["sinks_removed"][split] = int(sinks.sum())
            print(f"saved {split}: {len(texts)} texts, {tensors['resid'].shape[0]} tokens, {int(sinks.sum())} sinks, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)


def fvu(target: Tensor, pred: Tensor) -> float:
    t, p = target.double(), pred.double()
    return float((t - p).pow(2).sum() / (t - t.mean(0)).pow(2).sum())


def mean_l0(values: Tensor) -> float:
    return float((values > 0).sum(dim=-1).double().mean())


def config(batch: int, budget: int, lr: float | None = None):  # type: ignore[no-untyped-def]
    from mi_crow.mechanistic.sae import SaeTrainingConfig

    return SaeTrainingConfig(batch_size=batch, n_tokens=budget, lr=lr, progress=False, checkpoint_every=None,
                             save_sae=False)


def dead_pct(indices: Tensor, values: Tensor, n: int) -> float:
    """Latents never active on the held-out set, in percent."""
    fired = torch.zeros(n, dtype=torch.bool)
    fired[indices[values > 0]] = True
    return 100.0 * float((~fired).double().mean())


# -- (a) TopK vs BatchTopK -------------------------------------------------------------------------------------------
def part_a(data: dict[str, Any], n: int, k: int, batch: int, budget: int, lr_mult: float = 1.0) -> list[dict[str, Any]]:
    from mi_crow.mechanistic.sae import BatchTopKSae, SaeTrainer, TopKSae
    from mi_crow.mechanistic.sae.train.schedule import default_lr
    from mi_crow.ops.batch_topk import batch_topk_encode

    train, heldout = data["train"]["resid"], data["heldout"]["resid"]
    rows = []
    for arch, cls in (("topk", TopKSae), ("batchtopk", BatchTopKSae)):
        torch.manual_seed(0)
        sae = cls(n, train.shape[1], k)
        start = time.perf_counter()
        lr = None if lr_mult == 1.0 else lr_mult * default_lr(n, budget)
        result = SaeTrainer(sae).train_on_tensor(train, config(batch, budget, lr))
        wall = time.perf_counter() - start
        sae.eval()
        with torch.no_grad():
            out = sae(heldout)  # TopK: per-token top-k; BatchTopK: the inference threshold
            row = {"arch": arch, "budget_tokens": budget, "lr_multiple_of_default": lr_mult,
                   "lr": lr_mult * default_lr(n, budget), "wall_s": round(wall, 1),
                   "train_final_fvu": _final(result, "fvu"),
                   "heldout_dead_pct": dead_pct(out.code.indices, out.code.values, n)}
            if arch == "topk":
                row.update({"selection": "per-token top-k", "heldout_fvu": fvu(heldout, out.reconstruction),
                            "heldout_l0": mean_l0(out.code.values)})
                rows.append(row)
                continue
            code = batch_topk_encode(heldout, sae.W_enc, sae.b_enc, sae.b_dec, k)
            recon = sae.decode((code.values, code.indices))
            rows.append({**row, "selection": "batch top-(k*B) over the held-out set",
                         "heldout_fvu": fvu(heldout, recon), "heldout_l0": mean_l0(code.values)})
            l0 = mean_l0(out.code.values)
            rows.append({**row, "selection": "inference threshold", "threshold": float(sae.threshold),
                         "batch_kth_value_heldout": float(code.threshold),
                         "heldout_fvu": fvu(heldout, out.reconstruction), "heldout_l0": l0,
                         "l0_over_k": l0 / k})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def _final(result: Any, key: str) -> float | None:
    history = getattr(result, "history", None) or []
    for entry in reversed(history):
        if isinstance(entry, dict) and key in entry:
            return float(entry[key])
    return None


# -- (b) the MLP transcoder ------------------------------------------------------------------------------------------
def lm_losses(lm: Any, texts: list[str], block: int, variants: dict[str, Any], max_length: int,
              batch_size: int = 8) -> dict[str, Any]:
    """Mean next-token loss over ``texts`` clean, with the MLP's output zeroed and with each transcoder spliced in
    (replace mode), at the non-sink real tokens; sinks are decided on the block's input residual."""
    from mi_crow.mechanistic.sae.evaluate import _lm_loss_sums
    from mi_crow.mechanistic.sae.outliers import attention_sink_mask

    names = layer_names(block)
    block_mod = lm.layers.get_module(names["resid"])
    mlp = lm.layers.get_module(names["mlp_out"])
    state: dict[str, Any] = {}

    def find_sinks(module: Any, args: Any, kwargs: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        real = state["mask"].to(hidden.device) != 0
        state["acted"] = real & ~attention_sink_mask(hidden, real, factor=SINK_FACTOR)

    def zero(module: Any, args: Any, output: Tensor) -> Tensor:
        return torch.where(state["acted"].unsqueeze(-1), torch.zeros_like(output), output)

    def splice(tc: Any):  # type: ignore[no-untyped-def]
        def hook(module: Any, args: Any, output: Tensor) -> Tensor:
            new = tc.modify_activations(module, args, output)  # replace mode: the prediction
            return torch.where(state["acted"].unsqueeze(-1), new, output)
        return hook

    passes = {"clean": None, "zero": zero, **{name: splice(tc) for name, tc in variants.items()}}
    sums = dict.fromkeys(passes, 0.0)
    count = 0
    n_sinks = 0
    pre = block_mod.register_forward_pre_hook(find_sinks, with_kwargs=True)
    try:
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            enc = lm.tokenize(chunk, max_length=max_length, padding_side="right")
            state["mask"] = enc["attention_mask"]
            for label, hook in passes.items():
                handle = mlp.register_forward_hook(hook) if hook is not None else None
                try:
                    with torch.no_grad():
                        logits = lm.inference.forward_encoded(chunk, enc, with_controllers=False).logits
                finally:
                    if handle is not None:
                        handle.remove()
                total, c = _lm_loss_sums(logits, enc["input_ids"], enc["attention_mask"])
                sums[label] += total
                if label == "clean":
                    count += c
                    n_sinks += int(((enc["attention_mask"] != 0) & ~state["acted"].cpu()).sum())
    finally:
        pre.remove()
    return {"losses": {label: s / count for label, s in sums.items()}, "n_predictions": count,
            "sink_tokens_kept": n_sinks}


def part_b(data: dict[str, Any], n: int, k: int, batch: int, budget: int, heldout_texts: list[str],
           max_length: int, skips: list[bool]) -> list[dict[str, Any]]:
    from mi_crow import defaults
    from mi_crow.mechanistic.sae import Transcoder

    tr, ho = data["train"], data["heldout"]
    rows, models = [], {}
    for skip in skips:
        torch.manual_seed(0)
        tc = Transcoder(n, tr["mlp_in"].shape[1], tr["mlp_out"].shape[1], k, skip=skip)
        start = time.perf_counter()
        result = tc.train_on_tensors(tr["mlp_in"], tr["mlp_out"], config(batch, budget))
        wall = time.perf_counter() - start
        tc.eval()
        with torch.no_grad():
            out = tc(ho["mlp_in"])
        name = "skip_transcoder" if skip else "transcoder"
        rows.append({"arch": name, "budget_tokens": budget, "wall_s": round(wall, 1),
                     "train_final_fvu": _final(result, "fvu"),
                     "heldout_fvu_vs_mlp_out_variance": fvu(ho["mlp_out"], out.reconstruction),
                     "heldout_l0": mean_l0(out.code.values)})
        print(json.dumps(rows[-1]), file=sys.stderr)
        tc.mode = "replace"
        models[name] = tc
    lm = defaults.load_default_model()
    start = time.perf_counter()
    res = lm_losses(lm, heldout_texts, BLOCK, models, max_length)
    losses = res["losses"]
    clean, zero = losses["clean"], losses["zero"]
    for row in rows:
        spliced = losses[row["arch"]]
        row.update({"loss_clean": clean, "loss_mlp_zero_ablated": zero, "loss_spliced": spliced,
                    "loss_recovered": (zero - spliced) / (zero - clean), "n_predictions": res["n_predictions"],
                    "sink_tokens_kept": res["sink_tokens_kept"]})
    print(f"LM passes over {len(heldout_texts)} texts: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for row in rows:
        row["loss_texts"] = len(heldout_texts)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="a,b", help="comma-separated: a (TopK vs BatchTopK), b (transcoder)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/mi_crow_bench_family_model/smollm2_b15.pt"))
    parser.add_argument("--train-texts", type=int, default=1200)
    parser.add_argument("--eval-texts", type=int, default=135)
    parser.add_argument("--n", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET)
    parser.add_argument("--skip", default="no,yes", help="transcoder variants: no (plain), yes (skip), or both")
    parser.add_argument("--lr-mult", type=float, default=1.0,
                        help="part a: peak learning rate as a multiple of the default recipe's (results under their "
                             "own key)")
    parser.add_argument("--loss-texts", type=int, default=None,
                        help="held-out texts for the LM-loss passes (default: all of them)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    max_length = 128
    if not args.data.exists():
        print(f"building the activation tensors into {args.data} ...", file=sys.stderr)
        build_data(args.data, args.train_texts, args.eval_texts, max_length)
    data = torch.load(args.data, weights_only=True)
    meta_data = data["meta"]
    if (meta_data["train_texts"], meta_data["eval_texts"]) != (args.train_texts, args.eval_texts):
        raise SystemExit(f"{args.data} holds another split ({meta_data}); pass another --data")
    budget = (args.budget // args.batch) * args.batch
    parts = [p for p in args.parts.split(",") if p]
    path = RESULTS / "bench_family_model.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    meta = {**machine_meta(), "cpu": "AMD EPYC (AVX2), 2 cores shared with other sessions", "n": args.n, "k": args.k,
            "batch": args.batch, "train_tokens": int(data["train"]["resid"].shape[0]),
            "heldout_tokens": int(data["heldout"]["resid"].shape[0]), "data": meta_data}
    out: dict[str, Any] = {**old, "meta": meta}
    key_a = "a_topk_vs_batchtopk" + ("" if args.lr_mult == 1.0 else f"_lr_x{args.lr_mult:g}") + \
        ("" if budget == DEFAULT_BUDGET else f"_{budget}_tokens")
    print(f"train {meta['train_tokens']:,} tokens, held-out {meta['heldout_tokens']:,} tokens; n={args.n} k={args.k} "
          f"batch={args.batch} budget={budget:,}", file=sys.stderr)
    if "a" in parts:
        rows = part_a(data, args.n, args.k, args.batch, budget, args.lr_mult)
        out[key_a] = {"measured_utc": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
    if "b" in parts:
        skips = [{"no": False, "yes": True}[s] for s in args.skip.split(",") if s]
        _, heldout_texts = split_texts(args.train_texts, args.eval_texts)
        heldout_texts = heldout_texts[: args.loss_texts]
        rows = part_b(data, args.n, args.k, args.batch, budget, heldout_texts, max_length, skips)
        out["b_transcoder"] = {"measured_utc": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
    for key in sorted(k for k in out if k != "meta"):
        if out.get(key):
            print(f"## {key} (measured {out[key]['measured_utc']} UTC)")
            for row in out[key]["rows"]:
                print(json.dumps(row))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
