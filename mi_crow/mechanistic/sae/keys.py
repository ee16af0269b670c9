"""Where a saved SAE lives in a store: ``sae_models/<sae_id>/<file>``, and the one check of ``sae_id``.

Both ``TopKSae.save``/``load`` and ``sae.concepts.save``/``load`` build their keys here, so an id one accepts the
other accepts too. Imports only the validation layer, so ``sae.py`` and the concepts package can both use it.
"""

from __future__ import annotations

from typing import Any

from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.validation import check_identifier, fail, fail_type

__all__ = ["CONCEPTS_FILE", "CONFIG_FILE", "MODEL_FILE", "check_sae_id", "sae_key"]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CONCEPTS_FILE = "concepts.json"

_SAE_ID_RULE = (
    "a non-empty relative name: one folder name (no '/', '\\' or control characters, not starting with '.', "
    "at most 255 characters)"
)


def check_sae_id(sae_id: Any) -> str:
    """``sae_id`` if it is a valid store key segment (:func:`mi_crow.validation.check_identifier` decides).

    Raises:
        ArgumentTypeError: not a str.
        UserInputError: not one folder name (``"a/b"``, ``"../x"``, ``""``, ``".hidden"``).
    """
    try:
        return check_identifier(sae_id, "sae_id")
    except ArgumentTypeError:
        raise fail_type("sae_id", _SAE_ID_RULE, sae_id) from None
    except UserInputError:
        # The rule is check_identifier's; the wording says what an SAE id is.
        raise fail("sae_id", _SAE_ID_RULE, sae_id) from None


def sae_key(sae_id: Any, name: str = "") -> str:
    """Store key of a file of a saved SAE: ``sae_models/<sae_id>/<name>`` (the folder when ``name`` is empty)."""
    sae_id = check_sae_id(sae_id)
    return f"sae_models/{sae_id}/{name}" if name else f"sae_models/{sae_id}"
