"""``mi-crow train``: a TopK SAE on a saved activation run (resumable with ``--resume``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from mi_crow.cli.common import check_run, open_store, put_cli_info, run_layer, sae_ids, say
from mi_crow.errors import UserInputError

if TYPE_CHECKING:  # pragma: no cover
    from mi_crow.mechanistic.sae import TopKSae


def train_step(store: Any, run_id: str, layer: str, n_latents: int, k: int, sae_id: str, *, tokens: int | None,
               epochs: float | None, batch_size: int, lr: float | None, seed: int,
               model_id: str | None, resume: bool = False, checkpoint_every: int | None = 50,
               ) -> tuple[TopKSae, Any]:
    """Train a TopK SAE on a stored run; saves it as ``sae_models/<sae_id>`` and the history under ``runs/``.

    The training run is named like the SAE; with ``resume`` an interrupted run continues from its last checkpoint
    (a run without checkpoint starts from scratch).
    """
    from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae

    d = int(store.read_run_meta(run_id)["layer_dims"][layer])
    if k > n_latents:
        raise UserInputError(f"--k {k} must not exceed --n-latents {n_latents}")
    sae = TopKSae(n_latents=n_latents, n_inputs=d, k=k)
    config = SaeTrainingConfig(
        n_tokens=tokens, epochs=epochs if tokens is None else None, batch_size=batch_size, lr=lr, seed=seed,
        training_run_id=sae_id, sae_id=sae_id, log_every=5, checkpoint_every=checkpoint_every, resume=resume,
        b_dec_init_tokens=min(8192, batch_size * 8), progress=True,
    )
    result = SaeTrainer(sae, store).train(run_id, layer, config)
    put_cli_info(store, sae_id, model=model_id, layer=layer, activation_run=run_id,
                 training_run=result.training_run_id, n_latents=n_latents, k=k)
    return sae, result


def run(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    run_id = check_run(store, args.run_id)
    layer = run_layer(store, run_id, args.layer)
    d = int(store.read_run_meta(run_id)["layer_dims"][layer])
    n_latents = args.n_latents or 8 * d
    sae_id = args.sae_id or f"{run_id}-topk{args.k}-n{n_latents}"
    model_id = store.read_run_meta(run_id).get("model_id")
    if sae_id in sae_ids(store) and not (args.overwrite or args.resume):
        raise UserInputError(
            f"--sae-id {sae_id!r} already exists in the store; pass --overwrite to replace it, --resume to continue "
            f"its interrupted training, or another --sae-id"
        )
    sae, result = train_step(store, run_id, layer, n_latents, args.k, sae_id, tokens=args.tokens,
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             model_id=model_id, resume=args.resume)
    if result.resumed_from_step is not None:
        say(f"resumed from the checkpoint at step {result.resumed_from_step}")
    last = result.history[-1] if result.history else {}
    say(f"trained SAE {sae_id!r} (n_latents={n_latents}, k={args.k}) on {result.tokens} tokens in {result.steps} "
        f"steps: " + ", ".join(f"{k}={last[k]:.4g}" for k in ("fvu", "l0", "dead_fraction") if last.get(k) is not None))
    say(f"saved to {store.location(f'sae_models/{sae_id}')}")
    return 0
