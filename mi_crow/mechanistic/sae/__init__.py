"""TopK sparse autoencoders: the model (`TopKSae`), its training (`SaeTrainer`, `SaeTrainingConfig`), evaluation
(`evaluate`) and concepts (`AutoencoderConcepts`, in the ``concepts`` package)."""

from mi_crow.mechanistic.sae.concepts import AutoencoderConcepts
from mi_crow.mechanistic.sae.config import SaeTrainingConfig
from mi_crow.mechanistic.sae.data import TensorActivationReader, geometric_median
from mi_crow.mechanistic.sae.evaluate import evaluate
from mi_crow.mechanistic.sae.sae import SaeOutput, SparseCode, TopKSae
from mi_crow.mechanistic.sae.train import (
    LossOutput,
    NonFiniteTrainingError,
    SaeTrainer,
    StepInfo,
    TrainingResult,
    lr_at_step,
)

__all__ = [
    "AutoencoderConcepts",
    "LossOutput",
    "NonFiniteTrainingError",
    "SaeOutput",
    "SaeTrainer",
    "SaeTrainingConfig",
    "SparseCode",
    "StepInfo",
    "TensorActivationReader",
    "TopKSae",
    "TrainingResult",
    "evaluate",
    "geometric_median",
    "lr_at_step",
]

