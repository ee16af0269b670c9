"""Where and how the concepts document (dictionary + manipulations) is stored: ``sae_models/<sae_id>/concepts.json``
in a store, or a plain JSON file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.concepts.dictionary import _atomic_write_text
from mi_crow.mechanistic.sae.keys import CONCEPTS_FILE, sae_key
from mi_crow.store.errors import CorruptStoreFileError, StoreKeyNotFoundError
from mi_crow.validation import fail_type

__all__ = ["read_document", "store_key", "write_document"]


def store_key(sae_id: Any) -> str:
    """Store key of the concepts document of the SAE saved as ``sae_id``: the folder ``TopKSae.save`` uses, with
    the same check of ``sae_id`` (:func:`mi_crow.mechanistic.sae.keys.check_sae_id`)."""
    return sae_key(sae_id, CONCEPTS_FILE)


def write_document(target: Any, sae_id: str | None, data: dict[str, Any]) -> str | Path:
    """Write ``data`` to a store (``put_json``, under :func:`store_key`) or, without ``sae_id``, to a file path.

    Returns:
        The store key or the path written.
    """
    if hasattr(target, "put_json"):
        key = store_key(sae_id)
        target.put_json(key, data)
        return key
    if sae_id is not None:
        raise UserInputError(f"sae_id is only used with a store; got a path {target!r} and sae_id={sae_id!r}")
    if not isinstance(target, (str, os.PathLike)):
        raise fail_type("target", "a Store or a path", target)
    path = Path(target)
    _atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def read_document(source: Any, sae_id: str | None) -> tuple[Any, str]:
    """Read what :func:`write_document` wrote; returns ``(data, where)`` with ``where`` the key or path, for
    error messages."""
    if hasattr(source, "get_json"):
        key = store_key(sae_id)
        return source.get_json(key), key
    if sae_id is not None:
        raise UserInputError(f"sae_id is only used with a store; got a path {source!r} and sae_id={sae_id!r}")
    if not isinstance(source, (str, os.PathLike)):
        raise fail_type("source", "a Store or a path", source)
    path = Path(source)
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except FileNotFoundError:
        raise StoreKeyNotFoundError(f"concept dictionary file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise CorruptStoreFileError(f"concept dictionary file {path} is not valid JSON: {exc}") from None
