"""circuit-tracer's per-layer transcoder set: ``config.yaml`` + ``layer_<L>.safetensors``.

``config.yaml`` (what ``circuit_tracer.utils.hf_utils.load_transcoders`` reads): ``model_kind: transcoder_set``,
``feature_input_hook`` and ``feature_output_hook`` (TransformerLens hook names without the ``blocks.<L>.`` prefix,
e.g. ``mlp.hook_in`` / ``hook_mlp_out``), optionally ``model_name``, ``activation`` (``topk`` with ``k``, or
``relu``; left out, a file with ``activation_function.threshold`` is a JumpReLU) and ``transcoders`` (a list of
files; left out, the ``layer_*.safetensors`` of the repository are used). A set must cover layers ``0..L``.

Each ``layer_<L>.safetensors`` holds ``W_enc [n, d_in]``, ``b_enc [n]``, ``W_dec [n, d_out]``, ``b_dec [d_out]``,
optionally ``W_skip [d_out, d_in]`` and ``activation_function.threshold [n]``. The encoder reads the input as is
(``pre = x @ W_enc.T + b_enc``, no ``b_dec`` subtracted); JumpReLU is ``pre * (pre > threshold)``; circuit-tracer's
TopK keeps the ``k`` largest pre-activations without a ReLU, which equals mi_crow's TopK whenever at least ``k``
pre-activations are positive (a token with fewer would get negative entries there and zeros here).

Checked against circuit-tracer 0.5.0 (``benchmarks/interop_check.py``): its ``load_transcoder_set`` reads JumpReLU
and ReLU layer files as written here, but has no ``activation`` argument yet, so a TopK set is only run as TopK by
circuit-tracer versions that read ``activation: topk`` and ``k`` from ``config.yaml`` (its main branch); 0.5.0 would
run it as ReLU. BatchTopK transcoders (a threshold) are written as JumpReLU files and need no such support.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any


from mi_crow.errors import NotSupportedError, UserInputError
from mi_crow.mechanistic.sae.interop.files import read_safetensors, write_safetensors
from mi_crow.mechanistic.sae.interop.parts import SaeParts
from mi_crow.store.atomic import atomic_write_text
from mi_crow.store.errors import CorruptStoreFileError, StoreKeyNotFoundError

__all__ = ["CONFIG_FILE", "layer_file", "read_circuit_tracer", "read_config_yaml", "write_circuit_tracer"]

CONFIG_FILE = "config.yaml"
logger = logging.getLogger(__name__)
_LAYER = re.compile(r"^layer_(\d+)\.safetensors$")


def layer_file(layer: int) -> str:
    """The file name of one layer's transcoder."""
    return f"layer_{layer}.safetensors"


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid YAML double-quoted scalar


def _parse_scalar(text: str) -> Any:
    text = text.strip()
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True"):
        return True
    if text in ("false", "False"):
        return False
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'") and text.endswith("'"):
        return text[1:-1].replace("''", "'")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_config_yaml(path: Path) -> dict[str, Any]:
    """Read a transcoder-set ``config.yaml`` (PyYAML when installed, else the flat subset these files use).

    Raises:
        StoreKeyNotFoundError / CorruptStoreFileError: missing or not a mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise StoreKeyNotFoundError(f"missing file {str(path)!r}") from None
    try:
        import yaml  # type: ignore[import-untyped]

        data = yaml.safe_load(text)
    except ImportError:
        data = _parse_flat_yaml(text, path)
    except Exception as exc:  # yaml.YAMLError
        raise CorruptStoreFileError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise CorruptStoreFileError(f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def _parse_flat_yaml(text: str, path: Path) -> dict[str, Any]:
    """``key: scalar`` lines and ``key:`` followed by ``- scalar`` items (comments and blank lines ignored)."""
    data: dict[str, Any] = {}
    current: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        stripped = line.strip()
        if stripped.startswith("- ") and current is not None and line[0] in " -":
            item = stripped[2:]
            if re.match(r"^[A-Za-z_]+:\s", item):
                raise NotSupportedError(f"{path}:{number}: nested mappings in lists need PyYAML (pip install pyyaml)")
            data[current].append(_parse_scalar(item))
            continue
        match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*):(.*)$", line)
        if match is None or line[0] == " ":
            raise CorruptStoreFileError(f"{path}:{number}: cannot read {raw!r} (install PyYAML for full YAML)")
        key, rest = match.group(1), match.group(2).strip()
        if rest:
            data[key] = _parse_scalar(rest)
            current = None
        else:
            data[key] = []
            current = key
    return data


def _strip_block(hook: str | None) -> str | None:
    if hook is None:
        return None
    return re.sub(r"^blocks\.\d+\.", "", hook)


def write_circuit_tracer(layers: dict[int, SaeParts], folder: Path, *, model_name: str | None = None) -> list[Path]:
    """Write transcoders (one per layer) as a circuit-tracer transcoder set.

    Args:
        layers: layer index -> transcoder parts; all must share the architecture, ``k`` and the hooks.
        folder: the destination (``config.yaml`` and ``layer_<L>.safetensors``).
        model_name: written as ``model_name`` (default: the first transcoder's).

    Raises:
        NotSupportedError: an SAE (not a transcoder), or BatchTopK/TopK mixtures the format cannot hold.
        UserInputError: an empty set, or transcoders that disagree on hooks or activation.
    """
    if not layers:
        raise UserInputError("export circuit_tracer: no transcoders given")
    first = layers[min(layers)]
    arch, k = first.architecture, first.k
    in_hook, out_hook = _strip_block(first.hook_name), _strip_block(first.hook_name_out)
    written: list[Path] = []
    for layer, parts in sorted(layers.items()):
        p = parts.check()
        if not p.transcoder:
            raise NotSupportedError(
                f"export circuit_tracer: circuit-tracer runs transcoders (MLP input -> MLP output); layer {layer} is "
                f"an SAE"
            )
        if (p.architecture, p.k, _strip_block(p.hook_name), _strip_block(p.hook_name_out)) != (
                arch, k, in_hook, out_hook):
            raise UserInputError(
                f"export circuit_tracer: all layers must share architecture, k and hooks; layer {layer} has "
                f"{(p.architecture, p.k, p.hook_name, p.hook_name_out)}, layer {min(layers)} has "
                f"{(arch, k, first.hook_name, first.hook_name_out)}"
            )
        p = p.with_centered(False)
        tensors = {"W_enc": p.W_enc, "b_enc": p.b_enc, "W_dec": p.W_dec, "b_dec": p.b_dec}
        if p.architecture in ("jumprelu", "batchtopk"):
            assert p.threshold is not None
            # relu(pre) * (pre > t) and relu(pre) * (relu(pre) > t) both equal pre * (pre > max(t, 0)).
            tensors["activation_function.threshold"] = p.threshold.clamp_min(0)
        if p.W_skip is not None:
            tensors["W_skip"] = p.W_skip
        written.append(write_safetensors(folder / layer_file(layer), tensors))
    lines = [
        "# circuit-tracer transcoder set written by mi_crow",
        "model_kind: transcoder_set",
        f"model_name: {_yaml_scalar(model_name or first.model_name)}",
        f"feature_input_hook: {_yaml_scalar(in_hook)}",
        f"feature_output_hook: {_yaml_scalar(out_hook)}",
    ]
    if arch == "topk":
        lines += ["activation: \"topk\"", f"k: {int(k)}"]  # type: ignore[arg-type]
        logger.warning("circuit-tracer set %s is TopK: circuit-tracer versions without config.yaml 'activation' "
                       "support (0.5.0) run it as ReLU", folder)
    elif arch == "relu":
        lines.append("activation: \"relu\"")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / CONFIG_FILE, "\n".join(lines) + "\n")
    return [*written, folder / CONFIG_FILE]


def read_circuit_tracer(folder: Path, layer: int | None = None, file: Path | None = None) -> SaeParts:
    """Read one layer of a circuit-tracer transcoder set (``layer``, or the layer file ``file``).

    Raises:
        UserInputError: no layer given for a set of several layers.
        StoreKeyNotFoundError / CorruptStoreFileError: missing or inconsistent files.
    """
    config = read_config_yaml(folder / CONFIG_FILE)
    if config.get("model_kind", "transcoder_set") != "transcoder_set":
        raise NotSupportedError(f"{folder / CONFIG_FILE}: not supported yet: model_kind {config.get('model_kind')!r}")
    if file is None:
        available = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _LAYER.match(p.name)))
        if layer is None:
            if len(available) != 1:
                raise UserInputError(
                    f"{folder} is a circuit-tracer transcoder set with layers {available}: pass layer=<L> to load one"
                )
            layer = available[0]
        file = folder / layer_file(layer)
    else:
        match = _LAYER.match(file.name)
        layer = int(match.group(1)) if match else layer
    tensors = read_safetensors(file)
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in tensors]
    if missing:
        raise CorruptStoreFileError(f"{file} lacks the tensors {missing} (has {sorted(tensors)})")
    activation = config.get("activation")
    threshold = tensors.get("activation_function.threshold")
    if activation == "topk":
        arch, k = "topk", config.get("k")
        if not isinstance(k, int) or isinstance(k, bool):
            raise CorruptStoreFileError(f"{folder / CONFIG_FILE}: activation is topk but k is {k!r}")
    elif activation in (None, "relu"):
        arch, k = ("jumprelu" if threshold is not None and activation is None else "relu"), None
    else:
        raise NotSupportedError(f"{folder / CONFIG_FILE}: not supported yet: activation {activation!r}")
    in_hook, out_hook = config.get("feature_input_hook"), config.get("feature_output_hook")
    model_name = config.get("model_name")
    return SaeParts(
        architecture=arch,
        W_enc=tensors["W_enc"],
        b_enc=tensors["b_enc"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        centered=False,
        k=k,
        threshold=threshold if arch == "jumprelu" else None,
        W_skip=tensors.get("W_skip"),
        transcoder=True,
        hook_name=f"blocks.{layer}.{in_hook}" if in_hook and layer is not None else in_hook,
        hook_name_out=f"blocks.{layer}.{out_hook}" if out_hook and layer is not None else out_hook,
        model_name=model_name if isinstance(model_name, str) else None,
        source=f"circuit-tracer transcoder {file}",
    ).check()

