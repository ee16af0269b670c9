"""``mi-crow train``: an SAE of the family (``--arch topk|batchtopk|matryoshka``) or a transcoder
(``--transcoder-target LAYER [--skip]``) on a saved activation run, or straight from a model's forwards (``--model``);
one SAE or a grid of TopK SAEs (several values of ``--layer``, ``--k``, ``--n-latents`` or ``--seed``) from one pass;
``--resume`` continues an interrupted run."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mi_crow.cli.common import (
    check_run,
    load_dataset,
    load_model,
    open_store,
    parse_layer,
    put_cli_info,
    resolve_layer,
    run_layer,
    sae_ids,
    say,
)
from mi_crow.errors import UserInputError

if TYPE_CHECKING:  # pragma: no cover
    from mi_crow.mechanistic.sae import TopKSae

__all__ = ["add_arguments", "build_sae", "default_matryoshka_sizes", "parse_sizes", "run", "train_step"]


def _int_list(value: str) -> list[int]:
    """``16`` or ``16,32``: positive integers."""
    out = []
    for part in value.split(","):
        try:
            n = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {value!r}") from None
        if n <= 0:
            raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {value!r}")
        out.append(n)
    return out


def _seed_list(value: str) -> list[int]:
    """``0`` or ``0,1``: non-negative integers (seeds)."""
    try:
        seeds = [int(part) for part in value.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(seed < 0 for seed in seeds):
        raise argparse.ArgumentTypeError(f"expected non-negative integers separated by commas, got {value!r}")
    return seeds


def _positive(cast: Any) -> Any:
    def parse(value: str) -> Any:
        try:
            x = cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
        if not x > 0 or x != x or x == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
        return x

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``mi-crow train`` (called by the parser)."""
    p.add_argument("--store", default="store", help="store directory (default: ./store)")
    p.add_argument("--run-id", help="activation run (default: the only run in the store)")
    p.add_argument("--layer", help="layer stored in the run (default: its only layer); with --model a layer name or "
                                   "block index (default: the middle block); several, comma-separated: a grid")
    p.add_argument("--n-latents", type=_int_list, help="number of latents (default: 8 x layer width); several: a grid")
    p.add_argument("--k", type=_int_list, default=[32], help="active latents per token (default: 32); several: a grid")
    p.add_argument("--tokens", type=_positive(int), help="token budget (default: one epoch)")
    p.add_argument("--epochs", type=_positive(float), help="passes over the run (instead of --tokens)")
    p.add_argument("--batch-size", type=_positive(int), default=1024, help="tokens per optimizer step")
    p.add_argument("--lr", type=_positive(float), help="peak learning rate (default: scaled with n_latents)")
    p.add_argument("--sae-id", help="name of the saved SAE (default: derived from the run); the prefix of a grid's")
    p.add_argument("--seed", type=_seed_list, default=[0], help="seed (default 0); several: a grid")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted training of the same --sae-id from its last checkpoint")
    p.add_argument("--checkpoint-every", type=_positive(int), default=50, help="steps between checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace an existing SAE of the same --sae-id")
    p.add_argument("--parallel", choices=["data", "latents", "layers"],
                   help="distributed layout under `torchrun --nproc_per_node=N -m mi_crow train`: data (split every "
                        "batch over the ranks), latents (split the dictionary), layers (one SAE per layer; every "
                        "layer of the run, or the comma-separated --layer list)")
    p.add_argument("--arch", choices=("topk", "batchtopk", "matryoshka"), default="topk",
                   help="topk (k per token), batchtopk (k x batch over the batch, threshold at inference) or "
                        "matryoshka (nested prefixes; BatchTopK selection)")
    p.add_argument("--matryoshka-sizes", help="group sizes of --arch matryoshka, e.g. 1024,3072,12288 (summing to "
                                              "--n-latents; default: 5 groups doubling in size)")
    p.add_argument("--transcoder-target", metavar="LAYER",
                   help="train a transcoder from --layer to this layer of the same run (e.g. an MLP's output)")
    p.add_argument("--skip", action="store_true", help="with --transcoder-target: add a linear skip term")
    # Training on the fly.
    p.add_argument("--model", help="train straight from this model's forwards ('default' or a local HuggingFace "
                                   "folder) instead of a stored run")
    p.add_argument("--dataset", help="with --model: 'default' or a .txt/.jsonl/.csv file (default: default)")
    p.add_argument("--text-field", default="text", help="column with the text in .jsonl/.csv (default: text)")
    p.add_argument("--limit", type=_positive(int), help="with --model: only the first N texts of the dataset")
    p.add_argument("--max-length", type=_positive(int), default=128, help="with --model: tokens per text")
    p.add_argument("--forward-batch-size", type=_positive(int), default=16, help="with --model: texts per forward")
    p.add_argument("--buffer-mb", type=_positive(float), default=1024.0,
                   help="with --model: shuffle buffer size in MiB (default 1024)")


def train_step(store: Any, run_id: str, layer: str, n_latents: int, k: int, sae_id: str, *, tokens: int | None,
               epochs: float | None, batch_size: int, lr: float | None, seed: int,
               model_id: str | None, resume: bool = False, checkpoint_every: int | None = 50,
               arch: str = "topk", matryoshka_sizes: list[int] | None = None,
               transcoder_target: str | None = None, skip: bool = False, parallel: str | None = None,
               ) -> tuple[TopKSae, Any]:
    """Train an SAE (``arch``) or a transcoder on a stored run; saves it as ``sae_models/<sae_id>`` and the history
    under ``runs/`` (``parallel``: the distributed layout under torchrun, see `SaeTrainingConfig.parallel`).

    The training run is named like the SAE; with ``resume`` an interrupted run continues from its last checkpoint
    (a run without checkpoint starts from scratch).
    """
    from mi_crow.mechanistic.sae import SaeTrainer

    dims = store.read_run_meta(run_id)["layer_dims"]
    if k > n_latents:
        raise UserInputError(f"--k {k} must not exceed --n-latents {n_latents}")
    if transcoder_target is not None and transcoder_target not in dims:
        raise UserInputError(
            f"--transcoder-target {transcoder_target!r} is not stored in run {run_id!r}; stored layers: "
            f"{sorted(dims)} (save the input and the target layer in one run)"
        )
    target_width = int(dims[transcoder_target]) if transcoder_target is not None else None
    sae = build_sae(arch, n_latents, int(dims[layer]), k, matryoshka_sizes, target_width, skip)
    config = _config(tokens, epochs, batch_size, lr, seed, sae_id, checkpoint_every, resume, progress=True,
                     parallel=parallel)
    if transcoder_target is not None:
        result = sae.train(store, run_id, layer, config, target_layer=transcoder_target)
    else:
        result = SaeTrainer(sae, store).train(run_id, layer, config)
    put_cli_info(store, sae_id, model=model_id, layer=layer, activation_run=run_id,
                 training_run=result.training_run_id, n_latents=n_latents, k=k)
    return sae, result


def build_sae(arch: str, n_latents: int, d: int, k: int, matryoshka_sizes: list[int] | None = None,
              target_width: int | None = None, skip: bool = False) -> Any:
    """The untrained SAE of ``--arch`` (a `Transcoder` when ``target_width`` is given), with the CLI's errors."""
    from mi_crow.mechanistic.sae import BatchTopKSae, MatryoshkaSae, TopKSae, Transcoder

    if skip and target_width is None:
        raise UserInputError("--skip needs --transcoder-target LAYER (a skip term belongs to a transcoder)")
    if matryoshka_sizes is not None and arch != "matryoshka":
        raise UserInputError(f"--matryoshka-sizes needs --arch matryoshka, got --arch {arch}")
    if target_width is not None:
        if arch == "matryoshka":
            raise UserInputError("--transcoder-target works with --arch topk or batchtopk, got --arch matryoshka")
        return Transcoder(n_latents, d, target_width, k, skip=skip, batch_topk=arch == "batchtopk")
    if arch == "batchtopk":
        return BatchTopKSae(n_latents=n_latents, n_inputs=d, k=k)
    if arch == "matryoshka":
        sizes = matryoshka_sizes or default_matryoshka_sizes(n_latents)
        try:
            return MatryoshkaSae(n_latents, d, k, sizes)
        except (ValueError, TypeError) as exc:
            raise UserInputError(f"--matryoshka-sizes {','.join(map(str, sizes))}: {exc}") from None
    return TopKSae(n_latents=n_latents, n_inputs=d, k=k)


def default_matryoshka_sizes(n_latents: int, groups: int = 5) -> list[int]:
    """``groups`` group sizes doubling in size and summing to ``n_latents`` (fewer when ``n_latents`` is small)."""
    groups = max(1, min(groups, n_latents.bit_length()))
    unit = n_latents // (2**groups - 1)
    while unit == 0 and groups > 1:
        groups -= 1
        unit = n_latents // (2**groups - 1)
    sizes = [unit * 2**g for g in range(groups)] if unit else [n_latents]
    sizes[-1] += n_latents - sum(sizes)
    return sizes


def parse_sizes(text: str | None) -> list[int] | None:
    """``"a,b,c"`` (or spaces) as ints; a clear error naming --matryoshka-sizes otherwise."""
    if text is None:
        return None
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise UserInputError(f"--matryoshka-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes:
        raise UserInputError(f"--matryoshka-sizes must list at least one group size, got {text!r}")
    return sizes


def _config(tokens: int | None, epochs: float | None, batch_size: int, lr: float | None, seed: int,
            sae_id: str | None, checkpoint_every: int | None, resume: bool, **extra: Any) -> Any:
    from mi_crow.mechanistic.sae import SaeTrainingConfig

    return SaeTrainingConfig(
        n_tokens=tokens, epochs=epochs if tokens is None else None, batch_size=batch_size, lr=lr, seed=seed,
        training_run_id=sae_id, sae_id=sae_id, log_every=5, checkpoint_every=checkpoint_every, resume=resume,
        b_dec_init_tokens=min(8192, batch_size * 8), **extra,
    )


def _report(result: Any, sae_id: str, n_latents: int, k: int, store: Any, kind: str = "TopKSae",
            say: Any = say) -> None:
    if result.resumed_from_step is not None:
        say(f"resumed from the checkpoint at step {result.resumed_from_step}")
    last = result.history[-1] if result.history else {}
    what = "SAE" if kind == "TopKSae" else kind
    say(f"trained {what} {sae_id!r} (n_latents={n_latents}, k={k}) on {result.tokens} tokens in {result.steps} "
        f"steps: " + ", ".join(f"{m}={last[m]:.4g}" for m in ("fvu", "l0", "dead_fraction") if last.get(m) is not None))
    say(f"saved to {store.location(f'sae_models/{sae_id}')}")


def run(args: argparse.Namespace) -> int:
    if args.model is None and (args.dataset is not None or args.limit is not None):
        raise UserInputError("--dataset and --limit need --model (training on the fly); without --model, train reads "
                             "a stored run (--run-id)")
    if args.model is not None and args.run_id is not None:
        raise UserInputError("give either --model (train on the fly) or --run-id (train on a stored run), not both")
    store = open_store(args.store)
    if args.model is not None:
        if args.parallel is not None:
            raise UserInputError(f"--parallel {args.parallel} trains from a stored run (--run-id); training on the "
                                 "fly (--model) runs in one process")
        return _run_on_the_fly(args, store)
    run_id = check_run(store, args.run_id)
    # -- dist: torchrun --------------------------------------------------------------------------------------
    parallel = args.parallel
    from mi_crow.mechanistic.sae.train.distributed import cli_layers, init_from_env

    launched = init_from_env() if parallel is not None else None
    if parallel is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserInputError("mi-crow train runs under torchrun with several processes: pass --parallel data, "
                             "--parallel latents or --parallel layers")
    if parallel == "layers":
        return cli_layers(store, run_id, args)
    talk = say if launched is None or launched.rank == 0 else (lambda *_a, **_k: None)  # rank 0 reports
    # -- end dist --------------------------------------------------------------------------------------------
    layers = [run_layer(store, run_id, name) for name in _split_layers(args.layer)] or [run_layer(store, run_id, None)]
    meta = store.read_run_meta(run_id)
    widths = {layer: int(meta["layer_dims"][layer]) for layer in layers}
    model_id = meta.get("model_id")
    if _is_grid(args, layers):
        _check_grid_arch(args)
        if parallel is not None:
            raise UserInputError(f"--parallel {parallel} trains one SAE (or, with layers, one per layer); a grid of "
                                 "several --k, --n-latents or --seed values runs in one process")
        grid = _grid(args, widths, store, args.sae_id or f"{run_id}-grid")
        result = grid.train(run_id)
        return _grid_report(result, store, model_id, run_id)
    layer, d = layers[0], widths[layers[0]]
    n_latents = args.n_latents[0] if args.n_latents else 8 * d
    k = args.k[0]
    kind = f"tc-{args.arch}" if args.transcoder_target is not None else args.arch
    sae_id = args.sae_id or f"{run_id}-{kind}{k}-n{n_latents}"
    _refuse_overwrite(store, sae_id, args)
    sae, result = train_step(store, run_id, layer, n_latents, k, sae_id, tokens=args.tokens, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed[0], model_id=model_id,
                             resume=args.resume, checkpoint_every=args.checkpoint_every, arch=args.arch,
                             matryoshka_sizes=parse_sizes(args.matryoshka_sizes),
                             transcoder_target=args.transcoder_target, skip=args.skip, parallel=parallel)
    _report(result, sae_id, n_latents, k, store, type(sae).__name__, say=talk)
    return 0


def _refuse_overwrite(store: Any, sae_id: str, args: argparse.Namespace) -> None:
    """``train`` never replaces a saved SAE silently: ``--overwrite`` replaces it, ``--resume`` continues it."""
    if sae_id in sae_ids(store) and not (args.overwrite or args.resume):
        raise UserInputError(
            f"--sae-id {sae_id!r} already exists in the store; pass --overwrite to replace it, --resume to continue "
            f"its interrupted training, or another --sae-id"
        )


def _check_grid_arch(args: argparse.Namespace) -> None:
    if args.arch != "topk" or args.transcoder_target is not None or args.matryoshka_sizes is not None:
        raise UserInputError(f"a grid (several --layer, --k, --n-latents or --seed values) trains TopK SAEs; "
                             f"--arch {args.arch}"
                             + (" with --transcoder-target" if args.transcoder_target is not None else "")
                             + " trains one SAE at a time")


def _split_layers(spec: str | None) -> list[str]:
    return [] if spec is None else [part.strip() for part in spec.split(",") if part.strip()]


def _is_grid(args: argparse.Namespace, layers: list[str]) -> bool:
    return len(layers) > 1 or len(args.k) > 1 or len(args.n_latents or []) > 1 or len(args.seed) > 1


def _grid(args: argparse.Namespace, widths: dict[str, int], store: Any, grid_id: str) -> Any:
    from mi_crow.mechanistic.sae.train.grid import SaeGrid

    config = _config(args.tokens, args.epochs, args.batch_size, args.lr, 0, None, args.checkpoint_every, False,
                     progress=False)
    n_latents = args.n_latents or sorted({8 * d for d in widths.values()})
    return SaeGrid.product(widths, k=args.k, n_latents=n_latents, seed=args.seed, config=config, store=store,
                           grid_id=grid_id, resume=args.resume)


def _grid_report(result: Any, store: Any, model_id: str | None, run_id: str | None) -> int:
    from mi_crow.mechanistic.sae.train.grid import FRONTIER_SUFFIX

    for point, res in zip(result.points, result.results):
        put_cli_info(store, point["sae_id"], model=model_id, layer=point["layer"], activation_run=run_id,
                     training_run=res.training_run_id, n_latents=point["n_latents"], k=point["k"])
        say(f"{point['sae_id']}: l0={point['l0']:.4g} fvu={point['fvu']:.4g}")
    say(f"trained {len(result.results)} SAEs from one pass; L0/FVU points in "
        f"{store.location(f'sae_models/{result.grid_id}{FRONTIER_SUFFIX}')}")
    return 0


def _run_on_the_fly(args: argparse.Namespace, store: Any) -> int:
    from mi_crow.mechanistic.sae import SaeTrainer

    lm = load_model(args.model, store=store)
    specs = _split_layers(args.layer) or [None]
    layers = list(dict.fromkeys(resolve_layer(lm, parse_layer(spec)) for spec in specs))
    dataset = load_dataset(args.dataset or "default", args.limit, args.text_field)
    options = dict(forward_batch_size=args.forward_batch_size, max_length=args.max_length,
                   buffer_bytes=int(args.buffer_mb * (1 << 20)))
    widths = {layer: int(lm.layers.width(layer)) for layer in layers}
    if args.transcoder_target is not None:
        raise UserInputError("--transcoder-target trains from a stored run holding both layers (mi-crow save "
                             "--layer IN --layer OUT, then mi-crow train --run-id ...), not with --model")
    if _is_grid(args, layers):
        _check_grid_arch(args)
        grid = _grid(args, widths, store, args.sae_id or "grid")
        result = grid.train_from_model(lm, dataset, **options)
        return _grid_report(result, store, lm.model_id, None)
    layer = layers[0]
    n_latents = args.n_latents[0] if args.n_latents else 8 * widths[layer]
    k = args.k[0]
    if k > n_latents:
        raise UserInputError(f"--k {k} must not exceed --n-latents {n_latents}")
    source = Path(args.dataset).stem if args.dataset and args.dataset != "default" else "default"
    sae_id = args.sae_id or re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{source}-{layer}-{args.arch}{k}-n{n_latents}")
    _refuse_overwrite(store, sae_id, args)
    config = _config(args.tokens, args.epochs, args.batch_size, args.lr, args.seed[0], sae_id, args.checkpoint_every,
                     args.resume, progress=True)
    sae = build_sae(args.arch, n_latents, widths[layer], k, parse_sizes(args.matryoshka_sizes))
    say(f"training on the fly from {lm.model_id} layer {layer} over {len(dataset)} texts")
    result = SaeTrainer(sae, store).train_from_model(lm, dataset, layer, config, **options)
    put_cli_info(store, sae_id, model=lm.model_id, layer=layer, activation_run=None,
                 training_run=result.training_run_id, n_latents=n_latents, k=k)
    _report(result, sae_id, n_latents, k, store, type(sae).__name__)
    return 0
