"""Saving and loading a `TopKSae`, in a store (``sae_models/<sae_id>/``) or in a plain folder.

Layout (the seed's, the same in both places)::

    <folder>/model.pt        the state dict W_enc, b_enc, W_dec, b_dec (tensors only; torch.load(weights_only=True))
    <folder>/config.json     `TopKSae.config_dict`: sizes, dtype, mode, what the SAE was trained on
    <folder>/concepts.json   the concepts' dictionary and manipulations

Folders written by earlier versions hold ``model.safetensors`` instead of ``model.pt``; they still load.

`SaeFiles` gives one interface over both places (read/write/delete a file by name, its location for messages), so
`save_sae` and `load_sae` are written once; `state_to_bytes` / `state_from_bytes` are the only code that encodes
and decodes the weights. The functions take the SAE class as an argument (``cls``) rather than importing it, so
that ``sae.py`` can import this module and nothing here imports ``sae.py``.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mi_crow.mechanistic.sae.keys import (
    CONCEPTS_FILE,
    CONFIG_FILE,
    LEGACY_MODEL_FILE,
    MODEL_FILE,
    check_sae_id,
    sae_key,
)
from mi_crow.store.errors import CorruptStoreFileError, StoreKeyNotFoundError
from mi_crow.store.local import atomic_write

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.base import SaeBase as TopKSae
    from mi_crow.store import Store

__all__ = [
    "PARAM_NAMES",
    "SaeFiles",
    "load_sae",
    "locate_folder",
    "read_config",
    "sae_from_parts",
    "save_sae",
    "state_from_bytes",
    "state_to_bytes",
]

logger = logging.getLogger(__name__)

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SaeFiles:
    """The folder of one saved SAE, in a store or on the filesystem.

    Build it with :meth:`in_store` or :meth:`in_folder`; then every file is addressed by its name (``"model.pt"``).
    """

    def __init__(self, store: Store | None, sae_id: str | None, folder: Path | None) -> None:
        self.store = store
        self.sae_id = sae_id
        self.folder = folder

    @classmethod
    def in_store(cls, store: Store, sae_id: str) -> SaeFiles:
        """``sae_models/<sae_id>/`` of ``store`` (``sae_id`` is checked)."""
        return cls(store, check_sae_id(sae_id), None)

    @classmethod
    def in_folder(cls, folder: str | os.PathLike[str]) -> SaeFiles:
        """A plain folder."""
        return cls(None, None, Path(folder))

    def key(self, name: str = "") -> str:
        """Store key of ``name`` (store form only)."""
        assert self.sae_id is not None
        return sae_key(self.sae_id, name)

    def where(self, name: str = "") -> str:
        """Full location of file ``name`` (or of the folder) for messages."""
        if self.store is not None:
            return self.store.location(self.key(name))
        assert self.folder is not None
        return str(self.folder / name) if name else str(self.folder)

    def exists(self, name: str) -> bool:
        """Whether file ``name`` exists."""
        if self.store is not None:
            return self.store.exists(self.key(name))
        assert self.folder is not None
        return (self.folder / name).is_file()

    def read(self, name: str) -> bytes:
        """The bytes of file ``name``; a missing file raises `StoreKeyNotFoundError` (a ``FileNotFoundError``)
        naming its location."""
        if self.store is not None:
            return self.store.get_bytes(self.key(name))
        assert self.folder is not None
        path = self.folder / name
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StoreKeyNotFoundError(f"missing file {str(path)!r}") from None

    def write(self, name: str, data: bytes) -> None:
        """Write file ``name`` atomically (temporary file, then rename)."""
        if self.store is not None:
            self.store.put_bytes(self.key(name), data)
            return
        assert self.folder is not None

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                handle.write(data)

        atomic_write(self.folder / name, write)

    def delete(self, name: str) -> None:
        """Remove file ``name`` if it exists."""
        if self.store is not None:
            self.store.delete(self.key(name))
            return
        assert self.folder is not None
        (self.folder / name).unlink(missing_ok=True)

    def concepts_target(self) -> tuple[Any, str | None]:
        """``(target, sae_id)`` for ``sae.concepts.save`` / ``load``: the store and the id, or the file path."""
        if self.store is not None:
            return self.store, self.sae_id
        assert self.folder is not None
        return self.folder / CONCEPTS_FILE, None


def save_sae(sae: TopKSae, files: SaeFiles) -> None:
    """Write ``sae`` into ``files`` (see `TopKSae.save`): ``model.pt``, ``config.json``, ``concepts.json``; a
    ``model.safetensors`` of an earlier version is removed, since a stale copy of older weights could only
    mislead."""
    # The state dict: the four parameters, then the architecture's extra tensors (threshold, W_skip...).
    files.write(MODEL_FILE, state_to_bytes(dict(sae.state_dict())))
    # No trailing newline: a config.json cut short anywhere never parses, so truncation is always reported.
    files.write(CONFIG_FILE, json.dumps(sae.config_dict(), indent=2).encode("utf-8"))
    if files.exists(LEGACY_MODEL_FILE):
        files.delete(LEGACY_MODEL_FILE)
    sae.concepts.save(*files.concepts_target())
    logger.info("saved SAE to %s", files.where())


def load_sae(
    cls: type[TopKSae],
    files: SaeFiles,
    *,
    device: str | torch.device | None = None,
    model_file: str | None = None,
    manipulations: bool = False,
) -> TopKSae:
    """Load what `save_sae` wrote (see `TopKSae.load`): the config, the weights (``model.pt``, else the legacy
    ``model.safetensors``, or ``model_file`` when given) and the concepts (the saved manipulations are applied
    only with ``manipulations=True``; otherwise they wait in ``sae.concepts.saved_manipulations``).

    Raises:
        StoreKeyNotFoundError: a missing file (named).
        CorruptStoreFileError: a file that does not decode or does not describe an SAE (named).
    """
    config = read_config(files, cls.__name__)
    if model_file is None:
        model_file = next((f for f in (MODEL_FILE, LEGACY_MODEL_FILE) if files.exists(f)), None)
        if model_file is None:
            raise StoreKeyNotFoundError(
                f"TopKSae.load: missing file {files.where(MODEL_FILE)} (nor a {LEGACY_MODEL_FILE} of an earlier "
                f"version)"
            )
    model_where = files.where(model_file)
    tensors = state_from_bytes(files.read(model_file), model_where, safetensors=model_file.endswith(".safetensors"))
    sae = sae_from_parts(cls, config, tensors, files.where(), device, model_where)
    if files.exists(CONCEPTS_FILE):
        sae.concepts.load(*files.concepts_target(), manipulations=manipulations)
    return sae


def read_config(files: SaeFiles, who: str = "TopKSae") -> Any:
    """The decoded ``config.json`` of ``files`` (any JSON value; `sae_from_parts` checks it is an object).

    Raises:
        StoreKeyNotFoundError: no ``config.json``.
        CorruptStoreFileError: it is not valid JSON (the message names the file).
    """
    raw = files.read(CONFIG_FILE)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptStoreFileError(f"{who}.load: {files.where(CONFIG_FILE)} is not valid JSON: {exc}") from exc


def locate_folder(path: Path) -> tuple[Path, str | None]:
    """The saved SAE's folder for a user's path and, when the path names a file in it, that file's name (else
    None: the default weights file)."""
    if path.is_file():
        return path.parent, path.name
    if not path.exists() and path.suffix == ".pt" and path.with_suffix("").is_dir():
        # sae.save(name="x", path=d) writes the folder d/x/; the original project's notebooks load "d/x.pt".
        return path.with_suffix(""), None
    return path, None


def sae_from_parts(
    cls: type[TopKSae],
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    where: str,
    device: str | torch.device | None,
    model_where: str | None = None,
) -> TopKSae:
    """Build an SAE of class ``cls`` from a ``config.json`` document and the saved tensors.

    Args:
        cls: the SAE class.
        config: the ``config.json`` document.
        tensors: name -> tensor from the weights file.
        where: the SAE's folder, for messages.
        device: where to put the parameters (CPU when None).
        model_where: the weights file, for messages (default ``<where>/model.pt``).

    Raises:
        CorruptStoreFileError: the config lacks keys or names an unknown dtype, a tensor is missing or has a shape
            or dtype other than the config implies (the message names the file).
    """
    model_where = model_where or f"{where}/{MODEL_FILE}"
    if not isinstance(config, dict):
        raise CorruptStoreFileError(f"TopKSae.load: {where}/{CONFIG_FILE} must hold a JSON object")
    missing = [key for key in ("n_latents", "n_inputs", "k", "dtype") if key not in config]
    if missing:
        raise CorruptStoreFileError(f"TopKSae.load: {where}/{CONFIG_FILE} lacks the keys {missing}")
    if config["dtype"] not in _DTYPES:
        raise CorruptStoreFileError(
            f"TopKSae.load: {where}/{CONFIG_FILE} has an unknown dtype {config['dtype']!r}"
        )
    try:
        sae = cls.from_config(config, _DTYPES[config["dtype"]])
    except (TypeError, ValueError, KeyError) as exc:
        raise CorruptStoreFileError(
            f"{cls.__name__}.load: {where}/{CONFIG_FILE} does not describe a {cls.__name__}: {exc}"
        ) from exc
    # The parameters and the architecture's buffers (threshold...): every entry of the fresh SAE's state dict.
    names = list(sae.state_dict())
    absent = [name for name in names if name not in tensors]
    if absent:
        raise CorruptStoreFileError(f"{cls.__name__}.load: {model_where} lacks the tensors {absent}")
    with torch.no_grad():
        for name in names:
            param = sae.get_parameter(name) if name in dict(sae.named_parameters()) else sae.get_buffer(name)
            tensor = tensors[name]
            if tuple(tensor.shape) != tuple(param.shape) or tensor.dtype != param.dtype:
                raise CorruptStoreFileError(
                    f"{cls.__name__}.load: tensor {name} in {model_where} has shape {tuple(tensor.shape)} "
                    f"{tensor.dtype}, expected {tuple(param.shape)} {param.dtype} from {CONFIG_FILE}"
                )
            param.copy_(tensor)
    for key in ("model_id", "activation_run_id", "training_run_id", "layer"):
        sae.metadata[key] = config.get(key)
    sae.outlier_norm_factor = config.get("outlier_norm_factor")
    if device is not None:
        sae.to(device)
    return sae


def state_to_bytes(tensors: dict[str, Tensor]) -> bytes:
    """Encode a state dict (name -> tensor) as a ``torch.save`` file that ``torch.load(weights_only=True)`` reads.

    Each tensor is saved with its own compact storage (a view of a larger buffer would otherwise drag the whole
    buffer into the file).
    """
    compact = {}
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu")
        if not t.is_contiguous() or t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone(memory_format=torch.contiguous_format)
        compact[name] = t
    buffer = io.BytesIO()
    torch.save(compact, buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes, where: str, *, safetensors: bool = False) -> dict[str, Tensor]:
    """Decode a weights file: a ``torch.save`` state dict read with ``weights_only=True`` (or, for legacy folders,
    a safetensors file). Never runs pickled code.

    Args:
        data: the file's bytes.
        where: the file's location, named in every error.
        safetensors: decode as safetensors instead.

    Returns:
        name -> CPU tensor.

    Raises:
        CorruptStoreFileError: the file does not decode with ``weights_only=True`` (it holds pickled objects, or is
            truncated), or it holds anything but a flat mapping of names to tensors.
    """
    try:
        if safetensors:
            from safetensors.torch import load as load_safetensors

            obj: Any = load_safetensors(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...; safetensors its own types
        raise CorruptStoreFileError(
            f"cannot load {where} as a state dict of tensors (read with weights_only=True, no pickled objects "
            f"allowed): {_short_reason(exc)}"
        ) from exc
    if not isinstance(obj, dict):
        raise CorruptStoreFileError(
            f"{where} must hold a state dict (name -> tensor), got {type(obj).__name__}"
        )
    bad = [f"{name!r}: {type(value).__name__}" for name, value in obj.items()
           if not isinstance(name, str) or not isinstance(value, Tensor)]
    if bad:
        raise CorruptStoreFileError(
            f"{where} must hold only tensors (name -> tensor), got non-tensor entries {', '.join(bad[:5])}"
        )
    return obj


def _short_reason(exc: Exception) -> str:
    """The line of torch's long weights-only refusal that says what was refused (the whole text otherwise)."""
    text = str(exc)
    for line in text.splitlines():
        if "WeightsUnpickler error" in line:
            return line.strip().split(". Please use")[0]
    return text
