"""``mi_crow.mechanistic.sae.modules.topk_sae``: the documented import path of `TopKSae` and its training config.

``TopKSaeTrainingConfig`` is another name of `SaeTrainingConfig` (one class): ``k`` belongs to the SAE
(``TopKSae(n_latents=, n_inputs=, k=)``), so the training configuration needs no TopK-specific fields.
"""

from mi_crow.mechanistic.sae.config import SaeTrainingConfig
from mi_crow.mechanistic.sae.sae import TopKSae

TopKSaeTrainingConfig = SaeTrainingConfig

__all__ = ["SaeTrainingConfig", "TopKSae", "TopKSaeTrainingConfig"]
