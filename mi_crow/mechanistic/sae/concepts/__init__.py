"""Concepts: what each SAE neuron responds to, names for neurons, and steering the model through them.

All reached through ``sae.concepts`` (an :class:`AutoencoderConcepts`, in ``facade.py``):

* **Discovery** (``tracker.py``, :class:`TopTextTracker`): every neuron's top texts and firing statistics,
  collected during inference, handed out as ``top_texts.py``'s :class:`TopTexts` of :class:`TopText` entries;
  ``export.py`` writes them as JSON or CSV.
* **Naming** (``dictionary.py``, :class:`ConceptDictionary`): neuron -> name and notes, saved as
  ``sae_models/<sae_id>/concepts.json`` in a store (or any path), importable from CSV.
* **Steering** (``steering.py``): scale, ablate, add, clamp or cap a neuron (values absolute or relative to the
  residual norm, at chosen positions, special tokens excluded on request); ``evaluation.py`` measures whether it
  worked (:func:`evaluate_steering`), ``logit_lens.py`` gives the tokens a feature promotes and suppresses, and
  ``steer_choice.py`` picks a feature whose steering a reader can see.
* **Replay** (``replay.py``, :func:`track_from_run`): top texts from a stored activation run, without the model.
"""

from mi_crow.mechanistic.sae.concepts.dictionary import Concept, ConceptDictionary, check_neuron_index
from mi_crow.mechanistic.sae.concepts.facade import AutoencoderConcepts
from mi_crow.mechanistic.sae.concepts.evaluation import (
    SteeringEvaluation,
    SteeringPoint,
    evaluate_steering,
    evaluate_steering_many,
)
from mi_crow.mechanistic.sae.concepts.logit_lens import LogitLens, feature_logit_lens
from mi_crow.mechanistic.sae.concepts.replay import track_from_run
from mi_crow.mechanistic.sae.concepts.steer_choice import (
    choose_by_sweep,
    choose_steering_feature,
    generate_steered,
    lens_candidates,
    steering_candidates,
)
from mi_crow.mechanistic.sae.concepts.top_texts import TopText, TopTexts
from mi_crow.mechanistic.sae.concepts.tracker import NeuronStats, TopTextTracker

__all__ = [
    "AutoencoderConcepts",
    "Concept",
    "ConceptDictionary",
    "LogitLens",
    "SteeringEvaluation",
    "SteeringPoint",
    "NeuronStats",
    "TopText",
    "TopTextTracker",
    "TopTexts",
    "check_neuron_index",
    "choose_by_sweep",
    "choose_steering_feature",
    "evaluate_steering",
    "evaluate_steering_many",
    "feature_logit_lens",
    "generate_steered",
    "lens_candidates",
    "steering_candidates",
    "track_from_run",
]
