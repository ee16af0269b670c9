"""Saving and loading a `TopKSae`: ``sae_models/<sae_id>/`` with ``model.safetensors`` (the four parameters, no
pickled code), ``config.json`` (`TopKSae.config_dict`) and ``concepts.json`` (the concepts' dictionary and
manipulations).

The functions take the SAE class as an argument (``cls``) rather than importing it, so that ``sae.py`` can import
this module and nothing here imports ``sae.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.keys import CONCEPTS_FILE, CONFIG_FILE, MODEL_FILE, sae_key
from mi_crow.store.errors import CorruptStoreFileError, StoreKeyNotFoundError

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.sae import TopKSae
    from mi_crow.store import Store

__all__ = ["PARAM_NAMES", "load_sae", "load_sae_from_dir", "sae_from_parts", "save_sae"]

logger = logging.getLogger(__name__)

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_sae(sae: TopKSae, store: Store, sae_id: str) -> str:
    """Write ``sae`` to ``sae_models/<sae_id>/`` through the store (see `TopKSae.save`); returns the folder's key."""
    folder = sae_key(sae_id)
    tensors = {name: getattr(sae, name).detach().to("cpu").contiguous() for name in PARAM_NAMES}
    store.put_tensors(sae_key(sae_id, MODEL_FILE), tensors, metadata={"format": "mi_crow.TopKSae"})
    store.put_json(sae_key(sae_id, CONFIG_FILE), sae.config_dict())
    sae.concepts.save(store, sae_id)
    logger.info("saved SAE to %s", folder)
    return folder


def sae_from_parts(
    cls: type[TopKSae],
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    where: str,
    device: str | torch.device | None,
) -> TopKSae:
    """Build an SAE of class ``cls`` from a ``config.json`` document and the saved tensors.

    Raises:
        CorruptStoreFileError: the config lacks keys or names an unknown dtype, a tensor is missing or has a shape
            or dtype other than the config implies (``where`` names the folder).
    """
    if not isinstance(config, dict):
        raise CorruptStoreFileError(f"TopKSae.load: {where}/{CONFIG_FILE} must hold a JSON object")
    missing = [key for key in ("n_latents", "n_inputs", "k", "dtype") if key not in config]
    if missing:
        raise CorruptStoreFileError(f"TopKSae.load: {where}/{CONFIG_FILE} lacks the keys {missing}")
    if config["dtype"] not in _DTYPES:
        raise CorruptStoreFileError(
            f"TopKSae.load: {where}/{CONFIG_FILE} has an unknown dtype {config['dtype']!r}"
        )
    sae = cls(
        config["n_latents"],
        config["n_inputs"],
        config["k"],
        device="cpu",
        dtype=_DTYPES[config["dtype"]],
        mode=config.get("mode", "observe"),
        layer_signature=config.get("layer"),
    )
    absent = [name for name in PARAM_NAMES if name not in tensors]
    if absent:
        raise CorruptStoreFileError(f"TopKSae.load: {where}/{MODEL_FILE} lacks the tensors {absent}")
    with torch.no_grad():
        for name in PARAM_NAMES:
            param = getattr(sae, name)
            tensor = tensors[name]
            if tuple(tensor.shape) != tuple(param.shape) or tensor.dtype != param.dtype:
                raise CorruptStoreFileError(
                    f"TopKSae.load: tensor {name} in {where}/{MODEL_FILE} has shape {tuple(tensor.shape)} "
                    f"{tensor.dtype}, expected {tuple(param.shape)} {param.dtype} from {CONFIG_FILE}"
                )
            param.copy_(tensor)
    for key in ("model_id", "activation_run_id", "training_run_id", "layer"):
        sae.metadata[key] = config.get(key)
    sae.outlier_norm_factor = config.get("outlier_norm_factor")
    if device is not None:
        sae.to(device)
    return sae


def load_sae(
    cls: type[TopKSae], store: Store | str | Path, sae_id: str | None, *, device: str | torch.device | None
) -> TopKSae:
    """Load what `save_sae` wrote (see `TopKSae.load`)."""
    if isinstance(store, (str, Path)):
        if sae_id is not None:
            raise UserInputError(
                f"TopKSae.load: pass either a store and sae_id or a folder path, got path {store!r} and "
                f"sae_id={sae_id!r}"
            )
        return load_sae_from_dir(cls, store, device=device)
    if sae_id is None:
        raise UserInputError("TopKSae.load: sae_id is required when loading from a store")
    where = sae_key(sae_id)
    if not store.exists(sae_key(sae_id, CONFIG_FILE)):
        raise StoreKeyNotFoundError(
            f"TopKSae.load: no saved SAE {sae_id!r} in the store (missing {where}/{CONFIG_FILE})"
        )
    config = store.get_json(sae_key(sae_id, CONFIG_FILE))
    tensors = store.get_tensors(sae_key(sae_id, MODEL_FILE))
    sae = sae_from_parts(cls, config, tensors, where, device)
    if store.exists(sae_key(sae_id, CONCEPTS_FILE)):
        sae.concepts.load(store, sae_id)
    return sae


def load_sae_from_dir(cls: type[TopKSae], path: str | Path, *, device: str | torch.device | None) -> TopKSae:
    """Load an SAE from a plain folder holding ``model.safetensors`` and ``config.json`` (see
    `TopKSae.load_from_dir`)."""
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    model_path = folder / MODEL_FILE
    for file in (config_path, model_path):
        if not file.is_file():
            raise StoreKeyNotFoundError(f"TopKSae.load_from_dir: missing file {file}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CorruptStoreFileError(f"TopKSae.load_from_dir: {config_path} is not valid JSON: {exc}") from exc
    try:
        tensors = load_file(str(model_path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CorruptStoreFileError(f"TopKSae.load_from_dir: cannot read {model_path}: {exc}") from exc
    return sae_from_parts(cls, config, tensors, str(folder), device)
