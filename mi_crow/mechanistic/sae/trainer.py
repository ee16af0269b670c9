"""Old home of the trainer; it lives in the :mod:`mi_crow.mechanistic.sae.train` package now.

Kept so that ``from mi_crow.mechanistic.sae.trainer import SaeTrainer`` (and the other names) keeps working.
"""

from mi_crow.mechanistic.sae import train as _train
from mi_crow.mechanistic.sae.train import (
    LossOutput,
    NonFiniteTrainingError,
    SaeTrainer,
    SaeTrainingConfig,
    StepInfo,
    TrainingResult,
    lr_at_step,
)
from mi_crow.mechanistic.sae.train.checkpoint import CHECKPOINT_FILE, CHECKPOINT_FORMAT
from mi_crow.mechanistic.sae.train.trainer import HISTORY_FILE, RUN_CONFIG_FILE

__all__ = [*_train.__all__, "CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "HISTORY_FILE", "RUN_CONFIG_FILE"]
