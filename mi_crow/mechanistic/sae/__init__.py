"""Sparse autoencoders: the models (`TopKSae`, `BatchTopKSae`, `MatryoshkaSae`, `JumpReLUSae`, `Transcoder`, on one
base `SaeBase`; `load_sae` loads any of them), its training (`SaeTrainer`, `SaeTrainingConfig`), evaluation
(`evaluate`, SAEBench's core metrics in ``metrics.py``, `to_saebench_core`), the one outlier rule
(`attention_sink_mask`), a synthetic ground truth (``synthetic.py``) and concepts (`AutoencoderConcepts`, in the
``concepts`` package)."""

from mi_crow.mechanistic.sae.concepts import AutoencoderConcepts
from mi_crow.mechanistic.sae.config import SaeTrainingConfig
from mi_crow.mechanistic.sae.data import TensorActivationReader, geometric_median
from mi_crow.mechanistic.sae.evaluate import (
    EvaluationResult,
    evaluate,
    held_out_texts,
    save_saebench_core,
    to_saebench_core,
)
from mi_crow.mechanistic.sae.outliers import attention_sink_mask
from mi_crow.mechanistic.sae.sae import SaeOutput, SparseCode, TopKSae
from mi_crow.mechanistic.sae.base import SaeBase, load_sae
from mi_crow.mechanistic.sae.batchtopk import BatchTopKSae
from mi_crow.mechanistic.sae.jumprelu import JumpReLUSae
from mi_crow.mechanistic.sae.matryoshka import MatryoshkaSae
from mi_crow.mechanistic.sae.transcoder import Transcoder
from mi_crow.mechanistic.sae.train import (
    LossOutput,
    NonFiniteTrainingError,
    SaeGrid,
    SaeTrainer,
    StepInfo,
    TrainingResult,
    lr_at_step,
)

__all__ = [
    "AutoencoderConcepts",
    "BatchTopKSae",
    "JumpReLUSae",
    "MatryoshkaSae",
    "SaeBase",
    "Transcoder",
    "load_sae",
    "EvaluationResult",
    "LossOutput",
    "NonFiniteTrainingError",
    "SaeGrid",
    "SaeOutput",
    "SaeTrainer",
    "SaeTrainingConfig",
    "SparseCode",
    "StepInfo",
    "TensorActivationReader",
    "TopKSae",
    "TrainingResult",
    "attention_sink_mask",
    "evaluate",
    "geometric_median",
    "held_out_texts",
    "lr_at_step",
    "save_saebench_core",
    "to_saebench_core",
]

