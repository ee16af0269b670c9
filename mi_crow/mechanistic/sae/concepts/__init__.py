"""Concepts: what each SAE neuron responds to, names for neurons, and steering the model through them.

All reached through ``sae.concepts`` (an :class:`AutoencoderConcepts`, in ``facade.py``):

* **Discovery** (``tracker.py``, :class:`TopTextTracker`): every neuron's top texts and firing statistics,
  collected during inference; ``export.py`` writes them as JSON or CSV.
* **Naming** (``dictionary.py``, :class:`ConceptDictionary`): neuron -> name and notes, saved as
  ``sae_models/<sae_id>/concepts.json`` in a store (or any path), importable from CSV.
* **Steering** (``steering.py``): scale a neuron where it fires, or add its decoder direction where asked;
  ``steer_choice.py`` picks a feature whose steering a reader can see.
* **Replay** (``replay.py``, :func:`track_from_run`): top texts from a stored activation run, without the model.
"""

from mi_crow.mechanistic.sae.concepts.dictionary import Concept, ConceptDictionary, check_neuron_index
from mi_crow.mechanistic.sae.concepts.facade import AutoencoderConcepts
from mi_crow.mechanistic.sae.concepts.replay import track_from_run
from mi_crow.mechanistic.sae.concepts.steer_choice import (
    choose_steering_feature,
    generate_steered,
    steering_candidates,
)
from mi_crow.mechanistic.sae.concepts.tracker import NeuronStats, TopText, TopTextTracker

__all__ = [
    "AutoencoderConcepts",
    "Concept",
    "ConceptDictionary",
    "NeuronStats",
    "TopText",
    "TopTextTracker",
    "check_neuron_index",
    "choose_steering_feature",
    "generate_steered",
    "steering_candidates",
    "track_from_run",
]
