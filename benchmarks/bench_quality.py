"""Question: on the same activations, budget and shape, does mi_crow's default recipe reach a lower held-out FVU than
its peers' default recipes, with fewer dead latents, and at what speed?

Data: the outputs of block 15 of the embedded SmolLM2-135M (the demo's default model and layer) over paragraphs of
the default corpus, split by text into a training and a held-out set; padding and attention sinks (the one outlier
rule, `attention_sink_mask` with factor 10 over all real tokens of each set) are removed for everyone. The tensors
are cached (``--data``), so a re-run and the peer processes reuse them.

Each library trains a TopK SAE with the same ``n``, ``k``, batch size (tokens per step) and token budget, each with
its own defaults for everything else (learning rate and schedule, AuxK, initialisation, optimizer):

* ``mi_crow``: ``SaeTrainer.train_on_tensor`` with ``SaeTrainingConfig(batch_size, n_tokens)``;
* ``sparsify`` (``eai-sparsify``): its own ``Trainer`` (default ``TrainConfig``: signum + schedule-free, no AuxK),
  fed the activations through a stand-in model whose only layer returns the activation rows named by the "token
  ids" (the trainer hooks that layer, exactly as it hooks a transformer block); the SAE is read back from the
  checkpoint the trainer writes (its schedule-free evaluation weights);
* ``sae_lens`` (``sae-lens``): its ``SAETrainer`` (default ``SAETrainerConfig``) on a ``TopKTrainingSAE`` (default
  ``TopKTrainingSAEConfig``), fed by an iterator over shuffled batches, as SAELens' own synthetic-data trainer does.

Every library's SAE then encodes the held-out set; FVU (float64, two-pass) and dead latents (never active on the
held-out set) are computed here from its reconstructions and codes, the same way for all. Peers are looked for in
this interpreter and, with ``--peer-python``, in another (e.g. a separate venv with ``pip install mi_crow[bench]``;
that process needs only torch and the peer). The script says which peers it found.

Usage: ``python benchmarks/bench_quality.py [--quick] [--peer-python PATH] [--budgets 250000,1000000,4000000]
[--libraries mi_crow,sparsify,sae_lens] [--merge]``; prints a Markdown table and writes
``benchmarks/results/bench_quality[_quick].json`` after every run (``--merge`` keeps the rows already there, so
libraries and budgets can be run in pieces, or side by side in separate processes). Each row records when it was
measured: wall time and tokens/s are only comparable between rows measured under the same machine load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

RESULTS = Path(__file__).resolve().parent / "results"
LIBRARIES = ("mi_crow", "sparsify", "sae_lens")


# -- data ---------------------------------------------------------------------------------------------------------
def build_data(path: Path, train_texts: int, eval_texts: int, max_length: int, layer_index: int,
               split: str = "order") -> None:
    """Save ``{"train": [N, d], "heldout": [M, d], "meta": ...}`` from the default model (needs mi_crow).

    ``split="order"``: the first ``train_texts`` paragraphs train, the next ``eval_texts`` are held out (the corpus is
    ordered by article, so the held-out texts are mostly other articles: held-out FVU includes a shift in topic).
    ``split="random"``: ``train_texts + eval_texts`` paragraphs drawn at random (seed 0) from the whole corpus, then
    split, as the demo holds out random paragraphs.
    """
    from mi_crow import defaults
    from mi_crow.mechanistic.sae.outliers import attention_sink_mask
    from mi_crow.store import LocalStore

    paragraphs = defaults.default_corpus_paragraphs()
    if len(paragraphs) < train_texts + eval_texts:
        raise SystemExit(f"the default corpus has {len(paragraphs)} paragraphs, fewer than {train_texts + eval_texts}")
    if split == "random":
        order = torch.randperm(len(paragraphs), generator=torch.Generator().manual_seed(0)).tolist()
        paragraphs = [paragraphs[i] for i in order[: train_texts + eval_texts]]
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "store", fsync=False)
        lm = defaults.load_default_model(store=store)
        layer = lm.layers.resolve(layer_index)
        out: dict[str, Any] = {}
        for part, texts in (("train", paragraphs[:train_texts]),
                            ("heldout", paragraphs[train_texts : train_texts + eval_texts])):
            run_id = lm.activations.save(texts, layers=layer, run_id=part, batch_size=16, max_length=max_length,
                                         progress=True)
            reader = store.activation_reader(run_id, layer, 8192, shuffle=False, drop_last=False, dtype=torch.float32)
            x = torch.cat(list(reader))
            sinks = attention_sink_mask(x, factor=10.0)
            out[part] = x[~sinks].contiguous()
            out[f"{part}_sinks"] = int(sinks.sum())
        out["meta"] = {"model": "SmolLM2-135M-Instruct (embedded GGUF)", "layer": layer, "train_texts": train_texts,
                       "eval_texts": eval_texts, "max_length": max_length, "split": split,
                       "sinks_removed": {"train": out.pop("train_sinks"), "heldout": out.pop("heldout_sinks")}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)


# -- the three trainers -------------------------------------------------------------------------------------------
def _shuffled_batches(train: Tensor, batch: int, steps: int, seed: int):
    """``steps`` batches of ``batch`` rows, epoch after epoch, each epoch a fresh permutation (last partial dropped)."""
    g = torch.Generator().manual_seed(seed)
    done = 0
    while True:
        order = torch.randperm(train.shape[0], generator=g)
        for start in range(0, train.shape[0] - batch + 1, batch):
            if done == steps:
                return
            yield order[start : start + batch]
            done += 1


def train_mi_crow(train: Tensor, heldout: Tensor, n: int, k: int, batch: int, budget: int) -> dict[str, Any]:
    from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae

    torch.manual_seed(0)
    sae = TopKSae(n, train.shape[1], k)
    cfg = SaeTrainingConfig(batch_size=batch, n_tokens=budget, progress=False, checkpoint_every=None, save_sae=False)
    start = time.perf_counter()
    SaeTrainer(sae).train_on_tensor(train, cfg)
    wall = time.perf_counter() - start
    with torch.no_grad():
        out = sae(heldout)
    return {"recon": out.reconstruction, "values": out.code.values, "indices": out.code.indices, "wall_s": wall,
            "version": __import__("mi_crow").__version__}


class _Rows(nn.Module):
    """A stand-in "transformer block" for sparsify: returns the activation rows whose indices it is given."""

    def __init__(self, data: Tensor) -> None:
        super().__init__()
        self.data = data

    def forward(self, ids: Tensor) -> Tensor:
        return self.data[ids]


class _StandIn(nn.Module):
    """What sparsify's Trainer needs of a model: ``base_model``, ``config.num_hidden_layers``, ``device``,
    ``dummy_inputs`` and a forward over ``input_ids`` that runs the hooked layer."""

    def __init__(self, data: Tensor) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Rows(data)])
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.dummy_inputs = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self.layers[0].data.device

    def forward(self, input_ids: Tensor, **_: Any) -> Tensor:
        return self.layers[0](input_ids)


def train_sparsify(train: Tensor, heldout: Tensor, n: int, k: int, batch: int, budget: int) -> dict[str, Any]:
    import sparsify
    from sparsify import SparseCoder, SparseCoderConfig, Trainer, TrainConfig

    seq = 64 if batch % 64 == 0 else 1  # "sequences" of row indices; batch_size counts sequences
    steps = budget // batch
    ids = torch.cat(list(_shuffled_batches(train, batch, steps, seed=0)))
    dataset = [{"input_ids": row} for row in ids.reshape(-1, seq)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(SparseCoderConfig(num_latents=n, k=k), batch_size=batch // seq, hookpoints=["layers.0"],
                          log_to_wandb=False, save_dir=tmp, run_name="bench")
        torch.manual_seed(0)
        start = time.perf_counter()
        trainer = Trainer(cfg, dataset, _StandIn(train))
        trainer.fit()
        wall = time.perf_counter() - start
        sae = SparseCoder.load_from_disk(f"{tmp}/bench/layers.0", device="cpu")
    with torch.no_grad():
        out = sae(heldout)
    return {"recon": out.sae_out, "values": out.latent_acts, "indices": out.latent_indices, "wall_s": wall,
            "version": getattr(sparsify, "__version__", _dist_version("eai-sparsify"))}


def train_sae_lens(train: Tensor, heldout: Tensor, n: int, k: int, batch: int, budget: int) -> dict[str, Any]:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = budget // batch
    batches = (train[idx] for idx in _shuffled_batches(train, batch, 10**12, seed=0))
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=train.shape[1], d_sae=n, k=k))
    # lr_end is filled in by SAELens' runner config (lr / 10) before it builds this one; do the same.
    lr = SAETrainerConfig.__dataclass_fields__["lr"].default
    cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr_end=lr / 10,
                           logger=LoggingConfig(log_to_wandb=False))
    start = time.perf_counter()
    SAETrainer(cfg=cfg, sae=sae, data_provider=batches).fit()
    wall = time.perf_counter() - start
    with torch.no_grad():
        feats = sae.encode(heldout)
        recon = sae.decode(feats)
    values, indices = feats.topk(k, dim=-1)
    return {"recon": recon, "values": values, "indices": indices, "wall_s": wall,
            "version": _dist_version("sae-lens")}


TRAINERS = {"mi_crow": train_mi_crow, "sparsify": train_sparsify, "sae_lens": train_sae_lens}
MODULES = {"mi_crow": "mi_crow", "sparsify": "sparsify", "sae_lens": "sae_lens"}


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# -- scoring --------------------------------------------------------------------------------------------------------
def score(heldout: Tensor, result: dict[str, Any], n: int, budget: int) -> dict[str, Any]:
    x = heldout.double()
    r = result["recon"].detach().double()
    fvu = float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    fired = torch.zeros(n, dtype=torch.bool)
    active = result["values"].detach() > 0
    fired[result["indices"].detach()[active]] = True
    return {"heldout_fvu": fvu, "dead_pct": 100.0 * float((~fired).double().mean()),
            "wall_s": result["wall_s"], "tokens_per_s": budget / result["wall_s"], "version": result["version"]}


# -- worker and driver -------------------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    data = torch.load(args.data, weights_only=True)
    budget = (args.budget // args.batch) * args.batch
    result = TRAINERS[args.worker](data["train"], data["heldout"], args.n, args.k, args.batch, budget)
    torch.save({key: value for key, value in result.items()}, args.out)


def run_library(lib: str, args: argparse.Namespace, budget: int, heldout: Tensor) -> dict[str, Any] | None:
    if importlib.util.find_spec(MODULES[lib]) is not None:
        torch.set_num_threads(args.threads)
        data = torch.load(args.data, weights_only=True)
        result = TRAINERS[lib](data["train"], data["heldout"], args.n, args.k, args.batch, budget)
        return {**score(heldout, result, args.n, budget), "where": "this interpreter"}
    if args.peer_python is None:
        return None
    probe = subprocess.run([args.peer_python, "-c", f"import {MODULES[lib]}"], capture_output=True)
    if probe.returncode != 0:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.pt"
        cmd = [args.peer_python, __file__, "--worker", lib, "--data", str(args.data), "--out", str(out),
               "--budget", str(budget), "--n", str(args.n), "--k", str(args.k), "--batch", str(args.batch),
               "--threads", str(args.threads)]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        result = torch.load(out, weights_only=True)
    return {**score(heldout, result, args.n, budget), "where": args.peer_python}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data, small SAE, one small budget")
    parser.add_argument("--data", type=Path, default=None, help="cached activation tensors (.pt); built if missing")
    parser.add_argument("--peer-python", default=None, help="python of a venv with eai-sparsify / sae-lens")
    parser.add_argument("--budgets", default=None, help="comma-separated token budgets")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--train-texts", type=int, default=None)
    parser.add_argument("--eval-texts", type=int, default=None)
    parser.add_argument("--split", choices=("order", "random"), default="order",
                        help="held-out texts: the paragraphs after the training ones (default) or a random draw "
                             "(results in bench_quality_random.json)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows already in the results file except those this run replaces (run the "
                             "libraries or budgets in pieces)")
    parser.add_argument("--worker", choices=LIBRARIES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args)
        return

    quick = args.quick
    args.n = args.n or (1024 if quick else 4608)
    args.k = args.k or (16 if quick else 32)
    train_texts = args.train_texts or (150 if quick else 1200)
    eval_texts = args.eval_texts or (30 if quick else 135)
    budgets = [int(b) for b in (args.budgets or ("60000" if quick else "250000,1000000,4000000")).split(",")]
    if args.data is None:
        from mi_crow.defaults import get_cache_dir

        suffix = "" if args.split == "order" else f"_{args.split}"
        args.data = get_cache_dir() / "bench_quality" / f"smollm2_l15_{train_texts}_{eval_texts}{suffix}.pt"
    if not args.data.exists():
        print(f"building the activation tensors into {args.data} ...", file=sys.stderr)
        build_data(args.data, train_texts, eval_texts, max_length=128, layer_index=15, split=args.split)
    data = torch.load(args.data, weights_only=True)
    heldout = data["heldout"]
    print(f"data: {data['meta']}; train {tuple(data['train'].shape)}, held-out {tuple(heldout.shape)}", file=sys.stderr)

    libs = [lib for lib in args.libraries.split(",") if lib]
    meta = {"torch": torch.__version__, "threads": args.threads, "machine": platform.processor(),
            "cpu_count": os.cpu_count(), "n": args.n, "k": args.k, "batch": args.batch,
            "train_tokens": int(data["train"].shape[0]), "heldout_tokens": int(heldout.shape[0]),
            "data": data["meta"]}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench_quality{'_quick' if quick else ''}{'_random' if args.split == 'random' else ''}.json"
    rows: list[dict[str, Any]] = []
    found: dict[str, str | None] = {}
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        if {key: old["meta"].get(key) for key in ("n", "k", "batch", "train_tokens")} != \
                {key: meta[key] for key in ("n", "k", "batch", "train_tokens")}:
            raise SystemExit(f"--merge: {path} holds another configuration ({old['meta']})")
        rows = old["rows"]
        found = dict(old["meta"].get("found") or {})
    for lib in libs:
        where = _find(lib, args)
        found[lib] = where
    print("peers found: " + ", ".join(f"{lib} ({w})" for lib, w in found.items() if w and lib != "mi_crow")
          + "; not found: " + (", ".join(lib for lib, w in found.items() if not w) or "none"), file=sys.stderr)
    for budget in budgets:
        budget = (budget // args.batch) * args.batch
        for lib in libs:
            if found[lib] is None:
                continue
            print(f"-- {lib}, {budget} tokens", file=sys.stderr)
            res = run_library(lib, args, budget, heldout)
            if res is None:
                continue
            found[lib] = f"{res['version']} ({res['where']})"
            row = {"library": lib, "budget_tokens": budget, "measured_utc": time.strftime("%Y-%m-%d %H:%M"),
                   **{k: v for k, v in res.items() if k != "where"}}
            print(json.dumps(row), file=sys.stderr)
            if args.merge and path.exists():  # another process may have added rows meanwhile
                rows = json.loads(path.read_text())["rows"]
            rows = [r for r in rows if not (r["library"] == lib and r["budget_tokens"] == budget)] + [row]
            path.write_text(json.dumps({"meta": {**meta, "found": found}, "rows": rows}, indent=2))
    if args.merge and path.exists():
        rows = json.loads(path.read_text())["rows"]
    rows.sort(key=lambda r: (r["budget_tokens"], LIBRARIES.index(r["library"])))
    missing = [lib for lib, where in found.items() if where is None]
    header = "| library | budget | held-out FVU | dead % | wall s | tokens/s |\n|---|---|---|---|---|---|"
    lines = [f"| {r['library']} | {r['budget_tokens']:,} | {r['heldout_fvu']:.4f} | {r['dead_pct']:.1f} | "
             f"{r['wall_s']:.1f} | {r['tokens_per_s']:,.0f} |" for r in rows]
    print(f"n={args.n} k={args.k} batch={args.batch}; train {data['train'].shape[0]:,} tokens, held-out "
          f"{heldout.shape[0]:,} tokens ({data['meta']['layer']})")
    print("peers found: " + ", ".join(f"{lib} {v}" for lib, v in found.items() if v and lib != "mi_crow")
          + ("; not found: " + ", ".join(missing) if missing else ""))
    print(header + "\n" + "\n".join(lines))
    path.write_text(json.dumps({"meta": {**meta, "found": found}, "rows": rows}, indent=2))
    print(f"wrote {path}")


def _find(lib: str, args: argparse.Namespace) -> str | None:
    """Where ``lib`` is importable: "this interpreter", the ``--peer-python`` path, or None."""
    if importlib.util.find_spec(MODULES[lib]) is not None:
        return "this interpreter"
    if args.peer_python is None:
        return None
    probe = subprocess.run([args.peer_python, "-c", f"import {MODULES[lib]}"], capture_output=True)
    return args.peer_python if probe.returncode == 0 else None


if __name__ == "__main__":
    main()
