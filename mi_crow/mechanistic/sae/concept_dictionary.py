"""Old home of the concept dictionary; it lives in :mod:`mi_crow.mechanistic.sae.concepts.dictionary` now.

Kept so that ``from mi_crow.mechanistic.sae.concept_dictionary import ConceptDictionary`` keeps working.
"""

from mi_crow.mechanistic.sae.concepts.dictionary import Concept, ConceptDictionary, check_neuron_index

__all__ = ["Concept", "ConceptDictionary", "check_neuron_index"]
