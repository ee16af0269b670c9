"""Training a `TopKSae` on stored activations: `SaeTrainer` with `SaeTrainingConfig`, returning a `TrainingResult`.

One thing per module: ``step.py`` (losses and one optimizer step), ``trainer.py`` (the run: plan, resume, loop,
logging, saving), ``state.py`` (the run's plan and its checkpointed progress), ``metrics.py`` (the logging window),
``batches.py`` (batches over epochs), ``checkpoint.py`` (checkpoint I/O), ``init.py`` (weight initialisation),
``schedule.py`` (the learning rate, its default, k-annealing), ``results.py`` (the records handed back),
``on_the_fly.py`` (training straight from the model: the producer thread and its shuffle buffer), ``grid.py`` (many
SAEs from one pass), ``distributed.py`` (the data-parallel, latent-sharded and per-layer layouts on
``torch.distributed``) and ``dcp_checkpoint.py`` (checkpoints of distributed runs through ``torch.distributed.checkpoint``).

The trainer imports the SAE module; ``sae.py`` does not import this package at import time (see ``TopKSae.train``).
"""

from mi_crow.mechanistic.sae.config import SaeTrainingConfig
from mi_crow.mechanistic.sae.train.distributed import DistributedTrainingError, train_layers
from mi_crow.mechanistic.sae.train.results import LossOutput, NonFiniteTrainingError, StepInfo, TrainingResult
from mi_crow.mechanistic.sae.train.schedule import lr_at_step
from mi_crow.mechanistic.sae.train.trainer import SaeTrainer
from mi_crow.mechanistic.sae.train.grid import SaeGrid  # noqa: E402 - imports the trainer

__all__ = [
    "DistributedTrainingError",
    "LossOutput",
    "NonFiniteTrainingError",
    "SaeGrid",
    "SaeTrainer",
    "SaeTrainingConfig",
    "StepInfo",
    "TrainingResult",
    "lr_at_step",
    "train_layers",
]
