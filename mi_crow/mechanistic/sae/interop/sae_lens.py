"""SAELens' folder format: ``cfg.json`` + ``sae_weights.safetensors`` (what ``SAE.save_model`` writes and
``SAE.load_from_disk`` reads).

Weights: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``; JumpReLU adds
``threshold [d_sae]``; skip transcoders ``W_skip [d_out, d_in]``. ``cfg.json`` (SAELens >= 6): ``architecture``
(``standard``, ``topk``, ``jumprelu``, ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``; BatchTopK SAEs are
saved as ``jumprelu`` with their one threshold repeated), ``d_in``, ``d_sae`` (``d_out`` for transcoders), ``dtype``,
``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, ``k`` and
``rescale_acts_by_decoder_norm`` (topk) and ``metadata`` (``hook_name``, ``model_name``, ``sae_lens_version``, ...).
Configs of SAELens < 6 keep ``hook_name`` (or ``hook_point``) and ``model_name`` at the top level and spell TopK as
``activation_fn_str: "topk"`` with ``activation_fn_kwargs: {"k": ...}``.

Folded on load: ``rescale_acts_by_decoder_norm`` (pre-activations times decoder row norms, then decoded through unit
rows), ``normalize_activations: "expected_average_only_in"`` with the factor of ``activation_scaler.json``,
``apply_b_dec_to_input: false``, and an old ``scaling_factor`` tensor. Per-token normalizations
(``constant_norm_rescale``, ``layer_norm``) and per-head SAEs (``hook_z``) cannot be folded into weights and are
refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mi_crow.errors import NotSupportedError
from mi_crow.mechanistic.sae.interop.files import read_json, read_safetensors, write_json, write_safetensors
from mi_crow.mechanistic.sae.interop.parts import SaeParts
from mi_crow.store.errors import CorruptStoreFileError

__all__ = ["CFG_FILE", "WEIGHTS_FILE", "read_sae_lens", "write_sae_lens"]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"
# The config layout written here is SAELens 6's; its loader reads configs without a version as pre-6.
FORMAT_VERSION = "6.0.0"

_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "torch.float32": torch.float32, "torch.float64": torch.float64, "torch.float16": torch.float16,
    "torch.bfloat16": torch.bfloat16,
}
_TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder")


def _version_tuple(text: Any) -> tuple[int, ...]:
    if not isinstance(text, str):
        return ()
    out = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _normalized_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """One flat view of a SAELens 6 or older config: architecture, k, hook_name, model_name, ... at the top."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = cfg.get("sae_lens_version") or meta.get("sae_lens_version")
    flat = dict(cfg)
    flat.update({k: v for k, v in meta.items() if k not in flat})
    if not version or _version_tuple(version) < (6,):
        if "hook_name" not in flat and "hook_point" in flat:
            flat["hook_name"] = flat["hook_point"]
        activation = flat.get("activation_fn") or flat.get("activation_fn_str") or "relu"
        kwargs = flat.get("activation_fn_kwargs") or {}
        flat.setdefault("architecture", "standard")
        if activation == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
            flat["architecture"] = "topk"
            flat["k"] = kwargs["k"]
        elif activation not in ("relu", "topk"):
            raise NotSupportedError(f"not supported yet: SAELens activation_fn {activation!r}")
        if isinstance(flat.get("normalize_activations"), bool):
            flat["normalize_activations"] = "expected_average_only_in" if flat["normalize_activations"] else "none"
    flat.setdefault("apply_b_dec_to_input", True)
    if flat.get("normalize_activations") is None:
        flat["normalize_activations"] = "none"
    return flat


def _int_field(cfg: dict[str, Any], name: str, where: Path) -> int:
    value = cfg.get(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CorruptStoreFileError(f"{where}: field {name!r} must be a positive int, got {value!r}")
    return value


def read_sae_lens(folder: Path) -> SaeParts:
    """Read a SAELens folder into `SaeParts` (folds applied; see the module docstring).

    Raises:
        StoreKeyNotFoundError: ``cfg.json`` or ``sae_weights.safetensors`` missing.
        CorruptStoreFileError: a field contradicts the weights' shapes (the message names the field and the file).
        NotSupportedError: an architecture, a normalization or a reshaping this version does not run.
    """
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg = _normalized_config(read_json(cfg_path))
    tensors = read_safetensors(weights_path)
    arch = cfg.get("architecture")
    source = f"SAELens SAE {folder}"
    if arch not in ("standard", "topk", "jumprelu", "batchtopk", *_TRANSCODERS):
        raise NotSupportedError(f"{cfg_path}: not supported yet: architecture {arch!r}")
    if cfg.get("reshape_activations", "none") not in ("none", None) or cfg.get("hook_head_index") is not None:
        raise NotSupportedError(
            f"{cfg_path}: not supported yet: per-head SAEs (reshape_activations={cfg.get('reshape_activations')!r}, "
            f"hook_head_index={cfg.get('hook_head_index')!r})"
        )
    normalize = cfg["normalize_activations"]
    if normalize not in ("none", "expected_average_only_in"):
        raise NotSupportedError(
            f"{cfg_path}: not supported yet: normalize_activations={normalize!r} (a per-token normalization that "
            f"cannot be folded into the weights)"
        )
    dtype_name = cfg.get("dtype", "float32")
    if dtype_name not in _DTYPES:
        raise CorruptStoreFileError(f"{cfg_path}: field 'dtype' is {dtype_name!r}, expected one of {sorted(_DTYPES)}")
    dtype = _DTYPES[dtype_name]

    missing = [n for n in ("W_enc", "W_dec", "b_dec") if n not in tensors]
    if missing:
        raise CorruptStoreFileError(f"{weights_path} lacks the tensors {missing} (has {sorted(tensors)})")
    d_in, d_sae = _int_field(cfg, "d_in", cfg_path), _int_field(cfg, "d_sae", cfg_path)
    transcoder = arch in _TRANSCODERS
    d_out = _int_field(cfg, "d_out", cfg_path) if transcoder else d_in
    W_enc = tensors["W_enc"]
    W_dec = tensors["W_dec"]
    for name, tensor, shape in (("W_enc", W_enc, (d_in, d_sae)), ("W_dec", W_dec, (d_sae, d_out)),
                                ("b_dec", tensors["b_dec"], (d_out,))):
        if tuple(tensor.shape) != shape:
            raise CorruptStoreFileError(
                f"{weights_path}: {name} has shape {tuple(tensor.shape)}, but {cfg_path} (d_in={d_in}, "
                f"d_sae={d_sae}{f', d_out={d_out}' if transcoder else ''}) implies {shape}"
            )
    notes: list[str] = []
    b_enc = tensors.get("b_enc")
    if b_enc is None:
        b_enc = torch.zeros(d_sae, dtype=W_enc.dtype)
    threshold = tensors.get("threshold")
    if threshold is None and "log_threshold" in tensors:
        threshold = tensors["log_threshold"].exp()
    architecture = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk",
                    "transcoder": "relu", "skip_transcoder": "relu", "jumprelu_transcoder": "jumprelu"}[arch]
    k = None
    if architecture in ("topk", "batchtopk"):
        k_value = cfg.get("k")
        if isinstance(k_value, float) and k_value.is_integer():
            k_value = int(k_value)
        if not isinstance(k_value, int) or isinstance(k_value, bool):
            raise CorruptStoreFileError(f"{cfg_path}: field 'k' must be an int for architecture {arch!r}, "
                                        f"got {k_value!r}")
        k = k_value
    if architecture == "batchtopk" and threshold is None:
        raise NotSupportedError(f"{cfg_path}: a batchtopk SAE without its inference threshold cannot run")
    parts = SaeParts(
        architecture=architecture,
        W_enc=W_enc.T.contiguous(),
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=tensors["b_dec"],
        centered=bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder,
        k=k,
        threshold=threshold,
        W_skip=tensors.get("W_skip"),
        transcoder=transcoder,
        hook_name=cfg.get("hook_name"),
        hook_name_out=cfg.get("hook_name_out"),
        model_name=cfg.get("model_name"),
        source=source,
        notes=notes,
    ).float64()
    parts.check()
    if "scaling_factor" in tensors:
        factor = tensors["scaling_factor"].to(torch.float64)
        if not torch.equal(factor, torch.ones_like(factor)):
            parts.W_dec = parts.W_dec * factor.reshape(-1, 1)
            notes.append("folded the finetuning scaling_factor into W_dec")
    if cfg.get("rescale_acts_by_decoder_norm"):
        norms = parts.W_dec.norm(dim=1)
        scale = torch.where(norms > 0, norms, torch.ones_like(norms))
        parts.W_enc = parts.W_enc * scale.reshape(-1, 1)
        parts.b_enc = parts.b_enc * scale
        parts.W_dec = parts.W_dec / scale.reshape(-1, 1)
        if parts.threshold is not None:
            parts.threshold = parts.threshold * scale
        notes.append("folded rescale_acts_by_decoder_norm (decoder rows now unit norm)")
    if normalize == "expected_average_only_in":
        scaler = folder / SCALER_FILE
        factor_value = read_json(scaler).get("scaling_factor") if scaler.is_file() else cfg.get("norm_scaling_factor")
        if not isinstance(factor_value, (int, float)) or isinstance(factor_value, bool) or not factor_value > 0:
            raise NotSupportedError(
                f"{cfg_path}: normalize_activations='expected_average_only_in' needs the scaling factor, which is in "
                f"neither {scaler} nor the config's 'norm_scaling_factor' (got {factor_value!r})"
            )
        s = float(factor_value)
        # Trained on x * s: fold s into the encoder and 1/s into the decoder and its bias.
        parts.W_enc = parts.W_enc * s
        parts.W_dec = parts.W_dec / s
        parts.b_dec = parts.b_dec / s
        notes.append(f"folded the activation scaling factor {s!r}")
    return parts.to(dtype).check()


def write_sae_lens(parts: SaeParts, folder: Path) -> list[Path]:
    """Write ``parts`` as a SAELens 6 folder (``cfg.json`` + ``sae_weights.safetensors``).

    Raises:
        NotSupportedError: what SAELens has no architecture for (TopK or BatchTopK transcoders, JumpReLU skip
            transcoders).
    """
    p = parts.check()
    if p.transcoder or p.W_skip is not None:
        if p.architecture == "relu":
            arch = "skip_transcoder" if p.W_skip is not None else "transcoder"
        elif p.architecture == "jumprelu" and p.W_skip is None:
            arch = "jumprelu_transcoder"
        else:
            raise NotSupportedError(
                f"export sae_lens: SAELens has no {p.architecture} transcoder{' with a skip connection' if p.W_skip is not None else ''}"
            )
        p = p.with_centered(False)
    else:
        arch = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[p.architecture]
    tensors: dict[str, Tensor] = {"W_enc": p.W_enc.T, "b_enc": p.b_enc, "W_dec": p.W_dec, "b_dec": p.b_dec}
    if arch in ("jumprelu", "jumprelu_transcoder"):
        # SAELens saves BatchTopK as JumpReLU: relu(pre) * (pre > t) equals relu(pre) * (relu(pre) > t) for any t.
        tensors["threshold"] = p.threshold
    if p.W_skip is not None:
        tensors["W_skip"] = p.W_skip
    metadata: dict[str, Any] = {
        "sae_lens_version": FORMAT_VERSION,
        "sae_lens_training_version": FORMAT_VERSION,
        "model_name": p.model_name,
        "hook_name": p.hook_name,
        "hook_head_index": None,
        "model_class_name": "HookedTransformer",
        "model_from_pretrained_kwargs": {},
        "prepend_bos": True,
        "exported_by": "mi_crow",
    }
    if p.transcoder:
        metadata["hook_name_out"] = p.hook_name_out
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": p.d_in,
        "d_sae": p.n_latents,
        "dtype": str(p.dtype).replace("torch.", ""),
        "device": "cpu",
        "apply_b_dec_to_input": bool(p.centered),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if arch == "topk":
        cfg["k"] = p.k
        cfg["rescale_acts_by_decoder_norm"] = False
    if p.transcoder:
        cfg["d_out"] = p.d_out
    folder.mkdir(parents=True, exist_ok=True)
    return [write_safetensors(folder / WEIGHTS_FILE, tensors), write_json(folder / CFG_FILE, cfg)]
