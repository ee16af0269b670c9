"""`load_pretrained` and `export_sae`: the two entry points behind ``TopKSae.from_pretrained`` and ``sae.export``."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from mi_crow.errors import ArgumentTypeError, NotSupportedError, UserInputError
from mi_crow.language_model.hook_names import (
    HookPoint,
    family_from_model,
    family_from_name,
    hook_width,
    is_normalized_hook,
    module_to_tl,
    norm_affine,
    resolve_hook,
)
from mi_crow.mechanistic.sae.interop import circuit_tracer as ct
from mi_crow.mechanistic.sae.interop import dictionary_learning as dl
from mi_crow.mechanistic.sae.interop import sae_lens as sl
from mi_crow.mechanistic.sae.interop import sparsify as sp
from mi_crow.mechanistic.sae.interop.parts import SaeParts, parts_from_sae, sae_from_parts
from mi_crow.store.errors import StoreKeyNotFoundError

__all__ = ["EXPORT_FORMATS", "LOAD_FORMATS", "detect_format", "export_sae", "load_pretrained"]

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("sae_lens", "sparsify", "dictionary_learning", "circuit_tracer", "mi_crow")
EXPORT_FORMATS = ("sae_lens", "sparsify", "dictionary_learning", "circuit_tracer")

# What each format's folder holds, in the order they are tried (also the list an error shows).
_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sae_lens", (sl.CFG_FILE, sl.WEIGHTS_FILE)),
    ("sparsify", (sp.CFG_FILE, sp.WEIGHTS_FILE)),
    ("dictionary_learning", (dl.WEIGHTS_FILE,)),
    ("mi_crow", ("config.json", "model.pt")),
    ("mi_crow", ("config.json", "model.safetensors")),
    ("circuit_tracer", (ct.CONFIG_FILE, "layer_<L>.safetensors")),
)
_LAYER_FILE = re.compile(r"^layer_\d+\.safetensors$")


def _looked_for() -> str:
    return "; ".join(f"{fmt}: {' + '.join(files)}" for fmt, files in _SIGNATURES)


def detect_format(path: str | os.PathLike[str]) -> tuple[str, Path, Path | None]:
    """Which format a folder (or a file in it) is in.

    Returns:
        ``(format, folder, file)``: ``file`` is the weights file the path named, or None for the folder's default.

    Raises:
        StoreKeyNotFoundError: the path does not exist.
        UserInputError: a folder in none of the formats (the message lists the files looked for, and the hook-point
            folders of a sparsify run when it is one).
    """
    path = Path(path)
    if path.is_file():
        folder, name = path.parent, path.name
        if name in (sl.CFG_FILE, sl.WEIGHTS_FILE) and (folder / sl.WEIGHTS_FILE).is_file():
            return "sae_lens", folder, None
        if name in (sp.CFG_FILE, sp.WEIGHTS_FILE) and (folder / sp.WEIGHTS_FILE).is_file():
            return "sparsify", folder, None
        if _LAYER_FILE.match(name) and (folder / ct.CONFIG_FILE).is_file():
            return "circuit_tracer", folder, path
        if name in ("model.pt", "model.safetensors") and (folder / "config.json").is_file():
            return "mi_crow", folder, path
        if name.endswith(".pt"):
            # dictionary_learning keeps checkpoints as <run>/checkpoints/ae_<step>.pt beside <run>/config.json.
            if (folder / dl.CONFIG_FILE).is_file() or name == dl.WEIGHTS_FILE:
                return "dictionary_learning", folder, path
            if folder.name == "checkpoints" and (folder.parent / dl.CONFIG_FILE).is_file():
                return "dictionary_learning", folder, path
        raise UserInputError(
            f"path {str(path)!r} is a file of none of the formats; looked for (format: files) {_looked_for()}"
        )
    if not path.exists():
        raise StoreKeyNotFoundError(f"no such file or folder {str(path)!r}")
    if not path.is_dir():
        raise UserInputError(f"path {str(path)!r} is neither a file nor a folder")
    for fmt, files in _SIGNATURES:
        if fmt == "circuit_tracer":
            if (path / ct.CONFIG_FILE).is_file() and any(_LAYER_FILE.match(p.name) for p in path.iterdir()):
                return fmt, path, None
        elif all((path / f).is_file() for f in files):
            return fmt, path, None
    hook_points = sorted(p.name for p in path.iterdir()
                         if p.is_dir() and (p / sp.CFG_FILE).is_file() and (p / sp.WEIGHTS_FILE).is_file())
    if hook_points:
        raise UserInputError(
            f"{str(path)!r} is a sparsify run with one folder per hook point: load one of them, e.g. "
            f"{str(path / hook_points[0])!r} (hook points: {hook_points})"
        )
    present = sorted(p.name for p in path.iterdir())[:12]
    raise UserInputError(
        f"folder {str(path)!r} is in none of the formats: looked for (format: files) {_looked_for()}; the folder "
        f"holds {present}"
    )


def _resolve_points(parts: SaeParts, fmt: str, model: Any) -> tuple[HookPoint | None, HookPoint | None]:
    """Where the SAE reads (and, for a transcoder, writes). None when it cannot be told without the model."""
    family = family_from_model(model) if model is not None else None
    family = family or family_from_name(parts.model_name)

    def one(name: str | None, side: str | None) -> HookPoint | None:
        if not name:
            return None
        try:
            point = resolve_hook(name, model=model, family=family)
        except UserInputError:
            if model is not None:
                raise
            logger.info("%s: hook %r not mapped to a module without the model", parts.source, name)
            return None
        return HookPoint(point.module, side) if side else point

    if fmt == "sparsify" and model is None and family is None:
        # A sparsify folder names a module relative to the base model, whose prefix only the model tells.
        return None, None
    if fmt == "sparsify" and parts.transcoder:
        # sparsify transcoders read the input of the module named by the folder and predict its output.
        return one(parts.hook_name, "input"), one(parts.hook_name_out, "output")
    return one(parts.hook_name, None), one(parts.hook_name_out, None) if parts.transcoder else None


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    expected: type | None = None,
    model: Any = None,
    layer: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    format: str | None = None,
) -> Any:
    """Load an SAE saved by SAELens, sparsify, dictionary_learning, circuit-tracer or mi_crow.

    Args:
        path: the SAE's folder, or its weights file.
        expected: the class asked for (``TopKSae.from_pretrained``): a file of another architecture is refused.
        model: a LanguageModel (optional): the hook name must exist in it and its width must match the SAE's.
        layer: the layer of a circuit-tracer transcoder set to load.
        device: where to put the SAE (CPU when None).
        dtype: the SAE's dtype (default: the file's).
        format: skip detection (one of `LOAD_FORMATS`).

    Returns:
        The SAE (`TopKSae`, or the family class of its architecture), with ``layer_signature`` set to the module
        whose output it reads when the hook name could be mapped, and ``metadata`` holding ``model_id``,
        ``hook_name``, ``hook_point``, ``source`` and what was folded (``import_notes``).

    Raises:
        StoreKeyNotFoundError: the path does not exist or a file of the format is missing.
        UserInputError: a folder in none of the formats (the files looked for are listed), a hook name that is not in
            ``model``, or a width that differs from the layer's.
        CorruptStoreFileError: a config that contradicts the weights (the field and file are named), or a ``.pt``
            holding pickled objects.
        NotSupportedError: an architecture this installation does not run ("not supported yet: ...").
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"path must be a str or os.PathLike, got {type(path).__name__}: {path!r}")
    if format is not None and format not in LOAD_FORMATS:
        raise UserInputError(f"format must be one of {list(LOAD_FORMATS)}, got {format!r}")
    detected, folder, file = detect_format(path)
    fmt = format or detected
    if fmt == "mi_crow":
        from mi_crow.mechanistic.sae.base import SaeBase

        cls = expected or SaeBase  # SaeBase.load returns the class its config.json names
        sae = cls.load(path=file or folder, device=device)
        if dtype is not None:
            sae.to(dtype=dtype)
        if model is not None and sae.layer_signature is not None:
            _check_width(model, HookPoint(str(sae.layer_signature)), sae.n_inputs, str(sae.layer_signature))
        return sae
    readers: dict[str, Callable[[], SaeParts]] = {
        "sae_lens": lambda: sl.read_sae_lens(folder),
        "sparsify": lambda: sp.read_sparsify(folder),
        "dictionary_learning": lambda: dl.read_dictionary_learning(folder, file.name if file else dl.WEIGHTS_FILE),
        "circuit_tracer": lambda: ct.read_circuit_tracer(folder, layer=layer, file=file),
    }
    parts = readers[fmt]()
    point_in, point_out = _resolve_points(parts, fmt, model)
    family = (family_from_model(model) if model is not None else None) or family_from_name(parts.model_name)
    norm_note = None
    if point_in is not None and is_normalized_hook(parts.hook_name):
        if model is None:
            norm_note = (f"hook {parts.hook_name!r} is the norm's output before its weight (TransformerLens), while "
                         f"{point_in.module!r} returns it after; pass model= to fold the weight in. The layer is "
                         f"left unset")
            point_in = None
        else:
            weight, bias = norm_affine(model, point_in.module, family)
            parts = parts.read_through_affine(weight, bias, output_too=not parts.transcoder)
    if point_out is not None and is_normalized_hook(parts.hook_name_out):
        norm_note = f"output hook {parts.hook_name_out!r} is a norm's output before its weight; the layer is left unset"
        point_out = None
    if model is not None:
        if point_in is not None:
            _check_width(model, point_in, parts.d_in, parts.hook_name)
        if point_out is not None:
            _check_width(model, point_out, parts.d_out, parts.hook_name_out)
    sae = sae_from_parts(parts, dtype=dtype, device=device, expected=expected)
    if norm_note is not None:
        sae.metadata.setdefault("import_notes", []).append(norm_note)
    if parts.transcoder:
        attach = _transcoder_module(point_in, point_out, family)
        if attach is None and point_in is not None and point_out is not None:
            sae.metadata.setdefault("import_notes", []).append(
                f"the transcoder reads {point_in} and writes {point_out}: not the input and output of one module, so "
                f"it cannot be attached as one hook; its layer is left unset")
    else:
        attach = point_in.module if point_in is not None and point_in.side == "output" else None
        if point_in is not None and point_in.side == "input":
            sae.metadata.setdefault("import_notes", []).append(
                f"hook {parts.hook_name!r} is the input of {point_in.module!r}, which no module outputs; SAEs attach "
                f"to a module's output, so the layer is left unset")
    if attach is not None:
        sae.layer_signature = attach
        sae.metadata["layer"] = attach
    sae.metadata["hook_name"] = parts.hook_name
    sae.metadata["hook_point"] = None if point_in is None else {"module": point_in.module, "side": point_in.side}
    if parts.transcoder:
        sae.metadata["hook_name_out"] = parts.hook_name_out
        sae.metadata["hook_point_out"] = (None if point_out is None
                                          else {"module": point_out.module, "side": point_out.side})
    return sae


def _transcoder_module(point_in: HookPoint | None, point_out: HookPoint | None, family: str | None) -> str | None:
    """The module a transcoder attaches to: the one whose output it predicts and whose input it reads."""
    if point_in is None or point_out is None or point_out.side != "output":
        return None
    if point_in == HookPoint(point_out.module, "input"):
        return point_out.module
    if family is not None:
        # The second norm's output (after its weight, folded on load) is the MLP's input.
        from mi_crow.language_model.hook_names import tl_to_hook

        match = re.match(r"^(.*)\.(\d+)\.[^.]+$", point_in.module)
        if match and point_in.side == "output":
            block = match.group(2)
            if (tl_to_hook(f"blocks.{block}.ln2.hook_normalized", family) == point_in
                    and tl_to_hook(f"blocks.{block}.mlp.hook_in", family) == HookPoint(point_out.module, "input")):
                return point_out.module
    return None


def _check_width(model: Any, point: HookPoint, width: int, hook_name: str | None) -> None:
    actual = hook_width(model, point)
    if actual is not None and actual != width:
        raise UserInputError(
            f"hook {hook_name!r} (module {point.module!r}, {point.side}) has width {actual} in the model, but the SAE "
            f"expects {width}: it was not trained on this model or place"
        )


def _export_hook(module: str | None, family: str | None, fmt: str, side: str = "output") -> str | None:
    """The hook name a format expects for our module path (TransformerLens names where the format uses them)."""
    if module is None:
        return None
    if family is None:
        return module
    if fmt == "sparsify":
        from mi_crow.language_model.hook_names import FAMILIES

        base = FAMILIES[family].base + "."
        return module[len(base):] if module.startswith(base) else module
    return module_to_tl(module, family, side) or module


def export_sae(
    sae: Any,
    path: str | os.PathLike[str],
    format: str = "sae_lens",
    *,
    model: Any = None,
    model_name: str | None = None,
    hook_name: str | None = None,
) -> Path:
    """Write ``sae`` in another library's format, as files that library loads itself.

    Args:
        sae: the SAE (a `TopKSae`, or a family class).
        path: the destination folder (created). For sparsify, name it after the hook point (``layers.6``), as
            sparsify runs do.
        format: one of `EXPORT_FORMATS`.
        model: the LanguageModel it belongs to (optional): gives the model family for the hook name.
        model_name: the model's hub name written into the files (default: the SAE's ``metadata["model_id"]``).
        hook_name: the hook name written into the files (default: the TransformerLens name of the SAE's layer when
            the family is known, else the module path).

    Returns:
        The folder written.

    Raises:
        UserInputError: an unknown format.
        NotSupportedError: what the target format cannot hold (a ReLU SAE for sparsify, an SAE for circuit-tracer...).
    """
    if format not in EXPORT_FORMATS:
        raise UserInputError(f"format must be one of {list(EXPORT_FORMATS)}, got {format!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"path must be a str or os.PathLike, got {type(path).__name__}: {path!r}")
    parts = parts_from_sae(sae)
    if model_name is not None:
        parts.model_name = model_name
    if parts.model_name is None and model is not None:
        parts.model_name = getattr(model, "model_id", None)
    family = (family_from_model(model) if model is not None else None) or family_from_name(parts.model_name)
    if hook_name is not None:
        parts.hook_name = hook_name
    else:
        side_in = "input" if parts.transcoder else "output"
        parts.hook_name = _export_hook(parts.hook_name, family, format, side_in)
        parts.hook_name_out = _export_hook(parts.hook_name_out, family, format)
    folder = Path(path)
    if format == "sae_lens":
        sl.write_sae_lens(parts, folder)
    elif format == "sparsify":
        sp.write_sparsify(parts, folder)
    elif format == "dictionary_learning":
        dl.write_dictionary_learning(parts, folder)
    else:
        if not parts.transcoder:
            raise NotSupportedError(
                f"export circuit_tracer: circuit-tracer runs transcoders (MLP input -> MLP output), and "
                f"{type(sae).__name__} is an SAE; export SAEs as sae_lens, sparsify or dictionary_learning"
            )
        ct.write_circuit_tracer({_layer_index(parts.hook_name): parts}, folder, model_name=parts.model_name)
    logger.info("exported %s to %s as %s", type(sae).__name__, folder, format)
    return folder


def _layer_index(hook: str | None) -> int:
    match = re.match(r"^blocks\.(\d+)\.", hook or "") or re.search(r"\.(\d+)(\.|$)", hook or "")
    if match is None:
        raise UserInputError(
            f"export circuit_tracer: cannot tell the layer of hook {hook!r}; pass hook_name='blocks.<L>.<hook>'"
        )
    return int(match.group(1))
