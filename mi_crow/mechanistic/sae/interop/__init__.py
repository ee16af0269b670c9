"""Speak the field's formats: load SAEs saved by SAELens, sparsify, dictionary_learning and circuit-tracer, export
ours to them, and publish features to Neuronpedia.

- `load_pretrained` (behind ``TopKSae.from_pretrained``) detects the format of a folder, folds what the format applies
  at run time (activation scaling, decoder-norm rescaling, the decoder bias on the input) into the weights and maps
  the file's hook name to our module (`mi_crow.language_model.hook_names`).
- `export_sae` (behind ``sae.export``) writes files those libraries load themselves.
- `SaeParts` is the one convention every reader and writer goes through (see ``parts.py``).
- ``neuronpedia.py`` writes the per-feature batch JSON files of Neuronpedia's importer.

Every ``.pt`` file is read with ``torch.load(weights_only=True)``; nothing here unpickles objects.
"""

from mi_crow.mechanistic.sae.interop.api import EXPORT_FORMATS, LOAD_FORMATS, detect_format, export_sae, load_pretrained
from mi_crow.mechanistic.sae.interop.parts import ARCHITECTURES, SaeParts, parts_from_sae, sae_from_parts

__all__ = [
    "ARCHITECTURES",
    "EXPORT_FORMATS",
    "LOAD_FORMATS",
    "SaeParts",
    "detect_format",
    "export_sae",
    "load_pretrained",
    "parts_from_sae",
    "sae_from_parts",
]
