"""The SAE classes under the module path the original mi-crow documents (``mi_crow.mechanistic.sae.modules``).

Thin re-exports: `TopKSae` is :class:`mi_crow.mechanistic.sae.TopKSae` and `TopKSaeTrainingConfig` is
:class:`mi_crow.mechanistic.sae.SaeTrainingConfig` (the same objects, not copies or subclasses).
"""

from mi_crow.mechanistic.sae.modules.topk_sae import TopKSae, TopKSaeTrainingConfig

__all__ = ["TopKSae", "TopKSaeTrainingConfig"]
