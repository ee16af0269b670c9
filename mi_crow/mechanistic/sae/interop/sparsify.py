"""EleutherAI sparsify's per-hook-point folder: ``cfg.json`` + ``sae.safetensors`` (``SparseCoder.save_to_disk`` /
``load_from_disk``).

A training run writes one folder per hook point, named after the module relative to the base model (``layers.6``,
``layers.6.mlp``), beside the run's ``config.json``. Weights: ``encoder.weight [n, d_in]``, ``encoder.bias [n]``,
``W_dec [n, d_in]``, ``b_dec [d_in]`` and, with ``skip_connection``, ``W_skip [d_in, d_in]``. ``cfg.json``:
``d_in``, ``activation`` (``topk``; ``groupmax`` is not supported), ``k``, ``num_latents`` (0: ``d_in *
expansion_factor``), ``expansion_factor``, ``normalize_decoder``, ``multi_topk``, ``skip_connection``, ``transcode``.

An SAE encodes ``topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias))`` of the module's output; a transcoder
(``transcode: true``) reads the module's *input* without subtracting ``b_dec`` and predicts its output, plus
``x @ W_skip.T`` with a skip connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mi_crow.errors import NotSupportedError
from mi_crow.mechanistic.sae.interop.files import read_json, read_safetensors, write_json, write_safetensors
from mi_crow.mechanistic.sae.interop.parts import SaeParts
from mi_crow.store.errors import CorruptStoreFileError

__all__ = ["CFG_FILE", "WEIGHTS_FILE", "read_sparsify", "write_sparsify"]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def _flag(cfg: dict[str, Any], name: str, where: Path) -> bool:
    value = cfg.get(name, False)
    if not isinstance(value, bool):
        raise CorruptStoreFileError(f"{where}: field {name!r} must be true or false, got {value!r}")
    return value


def read_sparsify(folder: Path) -> SaeParts:
    """Read one sparsify hook-point folder into `SaeParts`.

    The hook point is the folder's name; the model is the ``model`` of the run's ``config.json`` one level up, when
    there is one.

    Raises:
        StoreKeyNotFoundError: a file missing.
        CorruptStoreFileError: ``cfg.json`` contradicts the weights (the field is named).
        NotSupportedError: ``activation: "groupmax"``.
    """
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg = read_json(cfg_path)
    tensors = read_safetensors(weights_path)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise NotSupportedError(f"{cfg_path}: not supported yet: activation {activation!r}")
    missing = [n for n in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if n not in tensors]
    if missing:
        raise CorruptStoreFileError(f"{weights_path} lacks the tensors {missing} (has {sorted(tensors)})")
    W_enc = tensors["encoder.weight"]
    d_in = cfg.get("d_in")
    if not isinstance(d_in, int) or isinstance(d_in, bool) or d_in <= 0:
        raise CorruptStoreFileError(f"{cfg_path}: field 'd_in' must be a positive int, got {d_in!r}")
    num_latents = cfg.get("num_latents") or 0
    n = num_latents if num_latents else d_in * int(cfg.get("expansion_factor") or 0)
    if W_enc.dim() != 2 or tuple(W_enc.shape) != (n, d_in):
        raise CorruptStoreFileError(
            f"{weights_path}: encoder.weight has shape {tuple(W_enc.shape)}, but {cfg_path} (d_in={d_in}, "
            f"num_latents={num_latents}, expansion_factor={cfg.get('expansion_factor')}) implies {(n, d_in)}"
        )
    k = cfg.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise CorruptStoreFileError(f"{cfg_path}: field 'k' must be an int in 1..{n}, got {k!r}")
    transcode = _flag(cfg, "transcode", cfg_path)
    skip = _flag(cfg, "skip_connection", cfg_path)
    if skip and "W_skip" not in tensors:
        raise CorruptStoreFileError(f"{cfg_path}: skip_connection is true but {weights_path} has no W_skip")
    if not skip and "W_skip" in tensors:
        raise CorruptStoreFileError(f"{cfg_path}: skip_connection is false but {weights_path} holds W_skip")
    run_config = folder.parent / "config.json"
    model_name = None
    if run_config.is_file():
        try:
            model_name = read_json(run_config).get("model")
        except (OSError, ValueError):
            model_name = None
    hook = folder.name
    return SaeParts(
        architecture="topk",
        W_enc=W_enc,
        b_enc=tensors["encoder.bias"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        centered=not transcode,
        k=k,
        W_skip=tensors.get("W_skip"),
        transcoder=transcode,
        hook_name=hook,
        hook_name_out=hook if transcode else None,
        model_name=model_name if isinstance(model_name, str) else None,
        source=f"sparsify {'transcoder' if transcode else 'SAE'} {folder}",
    ).check()


def write_sparsify(parts: SaeParts, folder: Path) -> list[Path]:
    """Write ``parts`` as a sparsify hook-point folder (name the folder after the hook point, e.g. ``layers.6``).

    Raises:
        NotSupportedError: anything but TopK, or a transcoder whose output width differs from its input width.
    """
    p = parts.check()
    if p.architecture != "topk":
        raise NotSupportedError(f"export sparsify: sparsify runs TopK only, not {p.architecture}")
    if p.d_in != p.d_out:
        raise NotSupportedError(
            f"export sparsify: sparsify stores b_dec with the input width; this transcoder maps {p.d_in} -> {p.d_out}"
        )
    p = p.with_centered(not p.transcoder)
    tensors = {"encoder.weight": p.W_enc, "encoder.bias": p.b_enc, "W_dec": p.W_dec, "b_dec": p.b_dec}
    if p.W_skip is not None:
        tensors["W_skip"] = p.W_skip
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, p.n_latents // p.d_in),
        "normalize_decoder": True,
        "num_latents": p.n_latents,
        "k": p.k,
        "multi_topk": False,
        "skip_connection": p.W_skip is not None,
        "transcode": bool(p.transcoder),
        "d_in": p.d_in,
    }
    folder.mkdir(parents=True, exist_ok=True)
    return [write_safetensors(folder / WEIGHTS_FILE, tensors), write_json(folder / CFG_FILE, cfg, indent=None)]
