"""``mi-crow train``: an SAE of the family (``--arch topk|batchtopk|matryoshka``) or a transcoder
(``--transcoder-target LAYER [--skip]``) on a saved activation run (resumable with ``--resume``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from mi_crow.cli.common import check_run, open_store, put_cli_info, run_layer, say
from mi_crow.errors import UserInputError

if TYPE_CHECKING:  # pragma: no cover
    from mi_crow.mechanistic.sae import TopKSae


def train_step(store: Any, run_id: str, layer: str, n_latents: int, k: int, sae_id: str, *, tokens: int | None,
               epochs: float | None, batch_size: int, lr: float | None, seed: int,
               model_id: str | None, resume: bool = False, checkpoint_every: int | None = 50,
               arch: str = "topk", matryoshka_sizes: list[int] | None = None,
               transcoder_target: str | None = None, skip: bool = False,
               ) -> tuple[TopKSae, Any]:
    """Train an SAE (``arch``) or a transcoder on a stored run; saves it as ``sae_models/<sae_id>`` and the history
    under ``runs/``.

    The training run is named like the SAE; with ``resume`` an interrupted run continues from its last checkpoint
    (a run without checkpoint starts from scratch).
    """
    from mi_crow.mechanistic.sae import (
        BatchTopKSae,
        MatryoshkaSae,
        SaeTrainer,
        SaeTrainingConfig,
        TopKSae,
        Transcoder,
    )

    dims = store.read_run_meta(run_id)["layer_dims"]
    d = int(dims[layer])
    if k > n_latents:
        raise UserInputError(f"--k {k} must not exceed --n-latents {n_latents}")
    if skip and transcoder_target is None:
        raise UserInputError("--skip needs --transcoder-target LAYER (a skip term belongs to a transcoder)")
    if matryoshka_sizes is not None and arch != "matryoshka":
        raise UserInputError(f"--matryoshka-sizes needs --arch matryoshka, got --arch {arch}")
    sae: Any
    if transcoder_target is not None:
        if arch == "matryoshka":
            raise UserInputError("--transcoder-target works with --arch topk or batchtopk, got --arch matryoshka")
        if transcoder_target not in dims:
            raise UserInputError(
                f"--transcoder-target {transcoder_target!r} is not stored in run {run_id!r}; stored layers: "
                f"{sorted(dims)} (save the input and the target layer in one run)"
            )
        sae = Transcoder(n_latents, d, int(dims[transcoder_target]), k, skip=skip, batch_topk=arch == "batchtopk")
    elif arch == "batchtopk":
        sae = BatchTopKSae(n_latents=n_latents, n_inputs=d, k=k)
    elif arch == "matryoshka":
        sizes = matryoshka_sizes or default_matryoshka_sizes(n_latents)
        try:
            sae = MatryoshkaSae(n_latents, d, k, sizes)
        except (ValueError, TypeError) as exc:
            raise UserInputError(f"--matryoshka-sizes {','.join(map(str, sizes))}: {exc}") from None
    else:
        sae = TopKSae(n_latents=n_latents, n_inputs=d, k=k)
    config = SaeTrainingConfig(
        n_tokens=tokens, epochs=epochs if tokens is None else None, batch_size=batch_size, lr=lr, seed=seed,
        training_run_id=sae_id, sae_id=sae_id, log_every=5, checkpoint_every=checkpoint_every, resume=resume,
        b_dec_init_tokens=min(8192, batch_size * 8), progress=True,
    )
    if transcoder_target is not None:
        result = sae.train(store, run_id, layer, config, target_layer=transcoder_target)
    else:
        result = SaeTrainer(sae, store).train(run_id, layer, config)
    put_cli_info(store, sae_id, model=model_id, layer=layer, activation_run=run_id,
                 training_run=result.training_run_id, n_latents=n_latents, k=k)
    return sae, result


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


def run(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    run_id = check_run(store, args.run_id)
    layer = run_layer(store, run_id, args.layer)
    d = int(store.read_run_meta(run_id)["layer_dims"][layer])
    n_latents = args.n_latents or 8 * d
    arch = getattr(args, "arch", "topk")
    target = getattr(args, "transcoder_target", None)
    kind = f"tc-{arch}" if target is not None else arch
    sae_id = args.sae_id or f"{run_id}-{kind}{args.k}-n{n_latents}"
    model_id = store.read_run_meta(run_id).get("model_id")
    sae, result = train_step(store, run_id, layer, n_latents, args.k, sae_id, tokens=args.tokens,
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             model_id=model_id, resume=args.resume, arch=arch,
                             matryoshka_sizes=parse_sizes(getattr(args, "matryoshka_sizes", None)),
                             transcoder_target=target, skip=getattr(args, "skip", False))
    if result.resumed_from_step is not None:
        say(f"resumed from the checkpoint at step {result.resumed_from_step}")
    last = result.history[-1] if result.history else {}
    what = "SAE" if type(sae).__name__ == "TopKSae" else type(sae).__name__
    say(f"trained {what} {sae_id!r} (n_latents={n_latents}, k={args.k}) on {result.tokens} tokens in {result.steps} "
        f"steps: " + ", ".join(f"{k}={last[k]:.4g}" for k in ("fvu", "l0", "dead_fraction") if last.get(k) is not None))
    say(f"saved to {store.location(f'sae_models/{sae_id}')}")
    return 0
