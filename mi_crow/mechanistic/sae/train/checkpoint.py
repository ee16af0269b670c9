"""Checkpoint I/O: everything a run needs to continue bit for bit.

Single-process runs: ``runs/<training_run_id>/checkpoint.pt``, a ``torch.save`` dict (format 1): ``format, config,
total_steps, activation_run_id, layer, sae_shape, sae {W_enc, b_enc, W_dec, b_dec}, optimizer, tokens_since_fired,
step, epoch, tokens_seen, batches_seen, nonfinite_batches, outlier_tokens, history, input_scale, reader, window,
rng {torch[, cuda]}``.

Distributed runs (``parallel`` set; ``dcp_checkpoint.py``): the tensors as a ``torch.distributed.checkpoint`` folder
``runs/<id>/checkpoint/step-<N>/`` (each rank writes its shards; JSON metadata, no pickle) and everything else in
``runs/<id>/checkpoint.json``, written by rank 0 once every shard is on disk.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.config import SaeTrainingConfig
from mi_crow.mechanistic.sae.train.metrics import MetricsWindow
from mi_crow.mechanistic.sae.train.results import ActivationReader
from mi_crow.mechanistic.sae.train.state import TrainingPlan, TrainingState
from mi_crow.mechanistic.sae.train import dcp_checkpoint
from mi_crow.store.errors import CorruptStoreFileError

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.sae import TopKSae
    from mi_crow.store import Store

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "build_checkpoint",
    "check_checkpoint",
    "read_checkpoint",
    "restore_checkpoint",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
_SAE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
# Config fields that may differ between an interrupted run and its resumption.
_RESUME_FREE_FIELDS = {"resume", "progress", "checkpoint_every", "log_every", "extra", "save_sae", "sae_id",
                       "use_wandb", "wandb_project", "wandb_run_name", "rank", "world_size", "parallel"}


def _sae_shape(sae: TopKSae) -> list[int]:
    return [sae.n_latents, sae.n_inputs, sae.k]


def write_checkpoint(
    store: Store,
    plan: TrainingPlan,
    config: SaeTrainingConfig,
    sae: TopKSae,
    optimizer: torch.optim.Optimizer,
    tokens_since_fired: torch.Tensor,
    state: TrainingState,
    reader: ActivationReader,
    window: MetricsWindow,
) -> None:
    """Write the run's checkpoint (replacing the previous one) through the store (every rank calls it in a
    distributed run)."""
    if config.parallel is not None:
        dcp_checkpoint.write(store, plan, config, sae, optimizer, tokens_since_fired, state, reader, window)
        return
    checkpoint = build_checkpoint(plan, config, sae, optimizer, tokens_since_fired, state, reader.state_dict(), window)
    key = f"{plan.prefix}/{CHECKPOINT_FILE}"
    store.put_torch(key, checkpoint)
    logger.debug("checkpoint at step %d written to %s", state.step, key)


def build_checkpoint(
    plan: TrainingPlan,
    config: SaeTrainingConfig,
    sae: TopKSae,
    optimizer: torch.optim.Optimizer,
    tokens_since_fired: torch.Tensor,
    state: TrainingState,
    reader_state: dict[str, Any],
    window: MetricsWindow,
) -> dict[str, Any]:
    """The checkpoint dict `write_checkpoint` writes (a grid of SAEs keeps one per SAE in its grid checkpoint)."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "total_steps": plan.total_steps,
        "activation_run_id": plan.run_id,
        "layer": plan.layer,
        "sae_shape": _sae_shape(sae),
        # The whole state dict: the four parameters and an architecture's extras (threshold, W_skip).
        "sae": {name: t.detach().cpu().clone() for name, t in sae.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "tokens_since_fired": tokens_since_fired.cpu().clone(),
        **state.to_checkpoint(),
        "reader": reader_state,
        "window": window.to_checkpoint(),
        "rng": rng,
    }


def read_checkpoint(store: Store, plan: TrainingPlan) -> dict[str, Any] | None:
    """The run's checkpoint, or None (logged) when there is none yet."""
    distributed = dcp_checkpoint.read(store, plan)
    if distributed is not None:
        return distributed
    key = f"{plan.prefix}/{CHECKPOINT_FILE}"
    if store.exists(key):
        return store.get_torch(key)
    logger.info("resume: no checkpoint at %s; starting run %s from scratch", key, plan.training_run_id)
    return None


def check_checkpoint(checkpoint: Any, sae: TopKSae, config: SaeTrainingConfig, plan: TrainingPlan) -> None:
    """Check that ``checkpoint`` continues this run: same format, SAE shape, activations and configuration.

    Raises:
        CorruptStoreFileError: not a checkpoint of this format.
        UserInputError: naming what differs (SAE shape, activations, configuration).
    """
    dcp_checkpoint.check_layout(checkpoint, config, plan)
    if isinstance(checkpoint, dict) and checkpoint.get("format") == dcp_checkpoint.FORMAT:
        checkpoint = {**checkpoint, "format": CHECKPOINT_FORMAT}  # the same checks below
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CorruptStoreFileError(
            f"SaeTrainer: the checkpoint {plan.prefix}/{CHECKPOINT_FILE} to resume from has an unknown format"
        )
    shape = _sae_shape(sae)
    if config.parallel == "latents":  # sae is this rank's slice
        shape[0] *= config.world_size
    if list(checkpoint["sae_shape"]) != shape:
        raise UserInputError(
            f"SaeTrainer: cannot resume: the checkpoint is for an SAE with [n_latents, n_inputs, k]="
            f"{list(checkpoint['sae_shape'])}, this SAE has {shape}"
        )
    run_id, layer = plan.run_id, plan.layer
    if checkpoint.get("activation_run_id") != run_id or checkpoint.get("layer") != layer:
        raise UserInputError(
            f"SaeTrainer: cannot resume: the checkpoint trains on run {checkpoint.get('activation_run_id')!r} "
            f"layer {checkpoint.get('layer')!r}, not run {run_id!r} layer {layer!r}"
        )
    # A field the checkpoint does not know (added in a later version) had its default value then.
    saved = {**SaeTrainingConfig().to_dict(), **checkpoint["config"]}
    current = config.to_dict()
    # A field added after the checkpoint was written had its default then.
    defaults = SaeTrainingConfig().to_dict()
    differing = sorted(
        name for name in current
        if name not in _RESUME_FREE_FIELDS and saved.get(name, defaults[name]) != current[name]
    )
    if differing:
        details = ", ".join(f"{name}: {saved.get(name)!r} -> {current[name]!r}" for name in differing)
        raise UserInputError(f"SaeTrainer: cannot resume with a different configuration ({details})")


def restore_checkpoint(
    checkpoint: dict[str, Any], sae: TopKSae, optimizer: torch.optim.Optimizer
) -> tuple[torch.Tensor, TrainingState]:
    """Put the SAE weights, optimizer state and RNG state of a checked checkpoint back.

    Returns:
        ``(tokens_since_fired on the SAE's device, the saved TrainingState)``.
    """
    if checkpoint.get("format") == dcp_checkpoint.FORMAT:
        return dcp_checkpoint.restore(checkpoint, sae, optimizer)
    with torch.no_grad():
        for name, tensor in checkpoint["sae"].items():
            getattr(sae, name).copy_(tensor)
    optimizer.load_state_dict(checkpoint["optimizer"])
    tokens_since_fired = checkpoint["tokens_since_fired"].to(sae.device)
    state = TrainingState.from_checkpoint(checkpoint)
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if torch.cuda.is_available() and "cuda" in checkpoint["rng"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return tokens_since_fired, state
