"""saprmarks/dictionary_learning's folder: ``ae.pt`` (a state dict, read with ``torch.load(weights_only=True)``) and
``config.json`` (``{"trainer": {"dict_class", "activation_dim", "dict_size", "k", "layer", "lm_name",
"submodule_name", ...}, "buffer": {...}}``).

State dicts by ``dict_class``:

- ``AutoEncoderTopK`` and ``BatchTopKSAE``: ``encoder.weight [n, d]``, ``encoder.bias [n]``, ``decoder.weight [d, n]``
  (``nn.Linear(n, d)``), ``b_dec [d]``, ``k`` (int scalar), ``threshold`` (float scalar; ``-1`` until set). TopK
  encodes ``topk(relu(encoder(x - b_dec)))``; BatchTopK at inference ``relu(pre) * (relu(pre) > threshold)``. Both
  decode ``decoder(f) + b_dec``. The two have the same keys, so ``config.json`` is needed to tell them apart.
- ``JumpReluAutoEncoder``: ``W_enc [d, n]``, ``b_enc [n]``, ``W_dec [n, d]``, ``b_dec [d]``, ``threshold [n]``;
  encodes ``relu(pre * (pre > threshold))`` with ``pre = x @ W_enc + b_enc`` (no ``b_dec`` subtracted).
- ``AutoEncoder`` (ReLU): ``bias [d]``, ``encoder.weight``, ``encoder.bias``, ``decoder.weight [d, n]``; encodes
  ``relu(encoder(x - bias))``, decodes ``decoder(f) + bias``.

Files written by an interrupted run hold ``{"ae": state_dict, "norm_factor": ..., ...}`` with the biases not yet
rescaled by the activation norm factor; that rescaling (``scale_biases``) is applied on load. ``submodule_name``
``resid_post_layer_<L>`` (the library's convention) names ``blocks.<L>.hook_resid_post``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mi_crow.errors import NotSupportedError
from mi_crow.mechanistic.sae.interop.files import read_json, read_torch_weights, write_json, write_torch
from mi_crow.mechanistic.sae.interop.parts import SaeParts
from mi_crow.store.errors import CorruptStoreFileError

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "read_dictionary_learning", "write_dictionary_learning"]

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
_SUBMODULE = re.compile(r"^(resid_post|resid_pre|resid_mid|mlp_out|attn_out)_layer_(\d+)$")


def _tensor(state: dict[str, Any], name: str, where: Path) -> Tensor:
    value = state.get(name)
    if not isinstance(value, Tensor):
        raise CorruptStoreFileError(f"{where} lacks the tensor {name!r} (has {sorted(state)})")
    return value


def _hook_from_trainer(trainer: dict[str, Any]) -> str | None:
    submodule = trainer.get("submodule_name")
    if isinstance(submodule, str):
        match = _SUBMODULE.match(submodule)
        if match:
            return f"blocks.{match.group(2)}.hook_{match.group(1)}"
    return None


def read_dictionary_learning(folder: Path, weights_file: str = WEIGHTS_FILE) -> SaeParts:
    """Read a dictionary_learning folder into `SaeParts`.

    Raises:
        StoreKeyNotFoundError: ``ae.pt`` missing.
        CorruptStoreFileError: pickled objects in ``ae.pt`` (refused by ``weights_only=True``), missing tensors, or
            a ``config.json`` that contradicts the weights (the field is named).
        NotSupportedError: a dictionary class this version does not run (gated, Matryoshka...), or TopK/BatchTopK
            weights without the ``config.json`` that says which.
    """
    weights_path = folder / weights_file
    obj = read_torch_weights(weights_path)
    state: dict[str, Any] = obj
    norm_factor = None
    if isinstance(obj.get("ae"), dict):  # the backup an interrupted run leaves
        state = obj["ae"]
        norm_factor = obj.get("norm_factor")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file() and folder.name == "checkpoints":
        config_path = folder.parent / CONFIG_FILE  # <run>/checkpoints/ae_<step>.pt beside <run>/config.json
    config = read_json(config_path) if config_path.is_file() else {}
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    if not trainer and isinstance(obj.get("config"), dict):
        trainer = obj["config"]
    dict_class = trainer.get("dict_class")
    source = f"dictionary_learning {dict_class or 'dictionary'} {folder}"
    notes: list[str] = []

    keys = set(state)
    if {"encoder.weight", "decoder.weight", "b_dec", "k"} <= keys:
        if dict_class not in ("AutoEncoderTopK", "BatchTopKSAE"):
            if dict_class is None:
                raise NotSupportedError(
                    f"{weights_path} holds TopK-style weights (k, threshold) shared by AutoEncoderTopK and "
                    f"BatchTopKSAE; {config_path} (trainer.dict_class) is needed to tell which"
                )
            raise NotSupportedError(f"{config_path}: not supported yet: dict_class {dict_class!r}")
        W_enc = _tensor(state, "encoder.weight", weights_path)
        n = int(W_enc.shape[0])
        k_tensor = _tensor(state, "k", weights_path)
        k = int(k_tensor.item())
        threshold = None
        arch = "topk"
        if dict_class == "BatchTopKSAE":
            arch = "batchtopk"
            t = _tensor(state, "threshold", weights_path).reshape(-1)
            threshold = t.to(W_enc.dtype).expand(n).clone() if t.numel() == 1 else t.to(W_enc.dtype)
        parts = SaeParts(arch, W_enc, _tensor(state, "encoder.bias", weights_path),
                         _tensor(state, "decoder.weight", weights_path).T.contiguous(),
                         _tensor(state, "b_dec", weights_path), centered=True, k=k, threshold=threshold)
    elif {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} <= keys and "k" not in keys:
        if dict_class not in (None, "JumpReluAutoEncoder"):
            raise NotSupportedError(f"{config_path}: not supported yet: dict_class {dict_class!r}")
        parts = SaeParts("jumprelu", _tensor(state, "W_enc", weights_path).T.contiguous(),
                         _tensor(state, "b_enc", weights_path), _tensor(state, "W_dec", weights_path),
                         _tensor(state, "b_dec", weights_path), centered=False,
                         threshold=_tensor(state, "threshold", weights_path))
    elif {"bias", "encoder.weight", "encoder.bias", "decoder.weight"} <= keys:
        parts = SaeParts("relu", _tensor(state, "encoder.weight", weights_path),
                         _tensor(state, "encoder.bias", weights_path),
                         _tensor(state, "decoder.weight", weights_path).T.contiguous(),
                         _tensor(state, "bias", weights_path), centered=True)
    elif {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"} <= keys:  # AutoEncoderNew
        parts = SaeParts("relu", _tensor(state, "encoder.weight", weights_path),
                         _tensor(state, "encoder.bias", weights_path),
                         _tensor(state, "decoder.weight", weights_path).T.contiguous(),
                         _tensor(state, "decoder.bias", weights_path), centered=False)
    else:
        raise NotSupportedError(
            f"{weights_path}: not supported yet: dict_class {dict_class!r} with tensors {sorted(keys)} (read: "
            f"AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder, AutoEncoder)"
        )
    parts.source = source
    parts.notes = notes
    parts.check()
    for field, value in (("activation_dim", parts.d_in), ("dict_size", parts.n_latents), ("k", parts.k)):
        given = trainer.get(field)
        if given is not None and value is not None and given != value:
            raise CorruptStoreFileError(
                f"{config_path}: trainer.{field} is {given!r} but {weights_path} implies {value!r}"
            )
    if isinstance(norm_factor, (int, float)) and not isinstance(norm_factor, bool) and norm_factor != 1:
        s = float(norm_factor)
        parts = parts.float64()
        parts.b_enc = parts.b_enc * s
        parts.b_dec = parts.b_dec * s
        if parts.threshold is not None and (parts.architecture == "jumprelu" or bool((parts.threshold >= 0).all())):
            parts.threshold = parts.threshold * s
        parts = parts.to(_weights_dtype(state))
        parts.notes.append(f"rescaled the biases by the run's norm_factor {s!r} (the checkpoint predates it)")
    parts.hook_name = _hook_from_trainer(trainer)
    if parts.hook_name is None and trainer.get("submodule_name") is not None:
        parts.notes.append(f"submodule_name {trainer.get('submodule_name')!r} names no TransformerLens hook; "
                           f"the layer is left unset")
    lm_name = trainer.get("lm_name")
    parts.model_name = lm_name if isinstance(lm_name, str) else None
    return parts.check()


def _weights_dtype(state: dict[str, Any]) -> torch.dtype:
    """The dtype of the dictionary's weights (its first floating tensor)."""
    for value in state.values():
        if isinstance(value, Tensor) and value.is_floating_point() and value.dim() == 2:
            return value.dtype
    return torch.float32


def write_dictionary_learning(parts: SaeParts, folder: Path) -> list[Path]:
    """Write ``parts`` as a dictionary_learning folder (``ae.pt`` + ``config.json``) its classes load.

    Raises:
        NotSupportedError: transcoders, or a BatchTopK whose latents have different thresholds.
    """
    p = parts.check()
    if p.transcoder or p.W_skip is not None:
        raise NotSupportedError("export dictionary_learning: transcoders are not supported by this exporter")
    trainer: dict[str, Any] = {"activation_dim": p.d_in, "dict_size": p.n_latents, "lm_name": p.model_name}
    match = re.match(r"^blocks\.(\d+)\.hook_(resid_post|resid_pre|resid_mid|mlp_out|attn_out)$", p.hook_name or "")
    if match:
        trainer["layer"] = int(match.group(1))
        trainer["submodule_name"] = f"{match.group(2)}_layer_{match.group(1)}"
    else:
        trainer["layer"] = None
        trainer["submodule_name"] = p.hook_name
    if p.architecture in ("topk", "batchtopk"):
        p = p.with_centered(True)
        if p.architecture == "topk":
            threshold = torch.tensor(-1.0, dtype=torch.float32)
            trainer.update(dict_class="AutoEncoderTopK", trainer_class="TopKTrainer", k=p.k)
        else:
            assert p.threshold is not None
            if not bool((p.threshold == p.threshold[0]).all()):
                raise NotSupportedError(
                    "export dictionary_learning: BatchTopKSAE keeps one threshold; this SAE's latents differ"
                )
            threshold = p.threshold[0].to(torch.float32).clone()
            trainer.update(dict_class="BatchTopKSAE", trainer_class="BatchTopKTrainer", k=p.k)
        state = {"k": torch.tensor(p.k, dtype=torch.int32), "threshold": threshold,
                 "decoder.weight": p.W_dec.T, "encoder.weight": p.W_enc, "encoder.bias": p.b_enc, "b_dec": p.b_dec}
    elif p.architecture == "jumprelu":
        p = p.with_centered(False)  # JumpReluAutoEncoder does not subtract b_dec unless told to
        state = {"W_enc": p.W_enc.T, "b_enc": p.b_enc, "W_dec": p.W_dec, "b_dec": p.b_dec, "threshold": p.threshold}
        trainer.update(dict_class="JumpReluAutoEncoder", trainer_class="JumpReluTrainer")
    else:  # relu
        p = p.with_centered(True)
        state = {"bias": p.b_dec, "encoder.weight": p.W_enc, "encoder.bias": p.b_enc, "decoder.weight": p.W_dec.T}
        trainer.update(dict_class="AutoEncoder", trainer_class="StandardTrainer")
    trainer["exported_by"] = "mi_crow"
    folder.mkdir(parents=True, exist_ok=True)
    return [write_torch(folder / WEIGHTS_FILE, state), write_json(folder / CONFIG_FILE, {"trainer": trainer})]
