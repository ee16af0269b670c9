"""TransformerLens-style hook names and the module paths of HuggingFace models, in both directions.

SAEs trained with SAELens, circuit-tracer or on Neuronpedia name the place they read with a TransformerLens hook
name (``blocks.5.hook_resid_post``); sparsify names a module relative to the base model (``layers.5``,
``layers.5.mlp``); mi_crow attaches an SAE to a module of the HuggingFace model (``model.layers.5``) and reads that
module's output. This module translates between them for the GPT-2, Llama (SmolLM, Mistral), Gemma (1, 2, 3),
Qwen (2, 3) and GPT-NeoX (Pythia) families.

A name resolves to a `HookPoint`: a module path and whether the activation is that module's ``output`` or its
``input``. Most TransformerLens names are a module's output; a few are only a module's input, because HuggingFace
computes them inline (``hook_resid_mid``, the sum ``resid_pre + attn_out``, is the input of the pre-MLP norm).
Note the off-by-one: ``blocks.L.hook_resid_pre`` is the input of block ``L``, i.e. the output of block ``L - 1``
(and, for ``L = 0``, of the embedding).

TransformerLens hook names covered (``L`` a block index): ``hook_embed``, ``blocks.L.hook_resid_pre``,
``blocks.L.hook_resid_mid``, ``blocks.L.hook_resid_post``, ``blocks.L.hook_attn_out``, ``blocks.L.hook_mlp_in``,
``blocks.L.hook_mlp_out``, ``blocks.L.ln1.hook_normalized``, ``blocks.L.ln2.hook_normalized``,
``blocks.L.mlp.hook_in`` / ``blocks.L.mlp.hook_out`` (circuit-tracer's MLP input and output), ``ln_final.hook_normalized``.

``lnX.hook_normalized`` is a norm's output *before* its weight and bias in TransformerLens (checked against
TransformerLens 3.9 in ``benchmarks/interop_check.py``), while the HuggingFace norm module returns it after them:
`tl_to_hook` points at the norm module, and `norm_affine` gives the ``(weight, bias)`` that relate the two
(``y = x * weight + bias``; Gemma's norms scale by ``1 + weight``), which the SAE loader folds into the encoder.
`module_to_tl` never names a norm's output ``hook_normalized`` for that reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mi_crow.errors import NotSupportedError, UserInputError

__all__ = [
    "FAMILIES",
    "HookPoint",
    "family_from_model",
    "family_from_name",
    "hook_width",
    "is_normalized_hook",
    "module_to_tl",
    "norm_affine",
    "resolve_hook",
    "tl_to_hook",
]


@dataclass(frozen=True)
class HookPoint:
    """Where an activation lives in a HuggingFace model.

    Attributes:
        module: dotted module path (``model.layers.5.mlp``); ``""`` is the whole model.
        side: ``"output"`` (what the module returns; where mi_crow's SAEs attach) or ``"input"`` (its first
            argument).
    """

    module: str
    side: str = "output"


@dataclass(frozen=True)
class _Layout:
    """Module names of one model family (paths relative to the causal-LM class)."""

    base: str  # the base model, e.g. "model" (sparsify names modules relative to it)
    blocks: str  # the ModuleList of transformer blocks
    embed: str  # token embedding (TransformerLens hook_embed)
    resid_pre0: str | None  # a module whose output is the input of block 0; None: it is computed inline
    ln1: str  # pre-attention norm, inside a block
    ln2: str  # pre-MLP norm, inside a block
    attn_out: str  # the module whose output is TransformerLens' attn_out
    mlp: str  # the MLP module
    mlp_out: str  # the module whose output is TransformerLens' mlp_out
    final_norm: str
    parallel: bool = False  # attention and MLP read the same input (GPT-NeoX): there is no resid_mid


_LLAMA = _Layout(
    base="model", blocks="model.layers", embed="model.embed_tokens", resid_pre0="model.embed_tokens",
    ln1="input_layernorm", ln2="post_attention_layernorm", attn_out="self_attn", mlp="mlp", mlp_out="mlp",
    final_norm="model.norm",
)
# Gemma scales the embeddings by sqrt(d_model) in the model's forward, so no module outputs block 0's input.
_GEMMA = _Layout(
    base="model", blocks="model.layers", embed="model.embed_tokens", resid_pre0=None,
    ln1="input_layernorm", ln2="post_attention_layernorm", attn_out="self_attn", mlp="mlp", mlp_out="mlp",
    final_norm="model.norm",
)
# Gemma 2 and 3 norm the attention and MLP outputs before adding them (TransformerLens' attn_out / mlp_out are
# after those norms) and norm the MLP input with pre_feedforward_layernorm.
_GEMMA2 = _Layout(
    base="model", blocks="model.layers", embed="model.embed_tokens", resid_pre0=None,
    ln1="input_layernorm", ln2="pre_feedforward_layernorm", attn_out="post_attention_layernorm", mlp="mlp",
    mlp_out="post_feedforward_layernorm", final_norm="model.norm",
)
# Gemma 3's embedding module applies the scale itself.
_GEMMA3 = _Layout(
    base="model", blocks="model.layers", embed="model.embed_tokens", resid_pre0="model.embed_tokens",
    ln1="input_layernorm", ln2="pre_feedforward_layernorm", attn_out="post_attention_layernorm", mlp="mlp",
    mlp_out="post_feedforward_layernorm", final_norm="model.norm",
)
_GPT2 = _Layout(
    base="transformer", blocks="transformer.h", embed="transformer.wte", resid_pre0="transformer.drop",
    ln1="ln_1", ln2="ln_2", attn_out="attn", mlp="mlp", mlp_out="mlp", final_norm="transformer.ln_f",
)
_NEOX = _Layout(
    base="gpt_neox", blocks="gpt_neox.layers", embed="gpt_neox.embed_in", resid_pre0="gpt_neox.emb_dropout",
    ln1="input_layernorm", ln2="post_attention_layernorm", attn_out="attention", mlp="mlp", mlp_out="mlp",
    final_norm="gpt_neox.final_layer_norm", parallel=True,
)

#: HuggingFace ``config.model_type`` -> family layout.
FAMILIES: dict[str, _Layout] = {
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _GEMMA,
    "gemma2": _GEMMA2,
    "gemma3": _GEMMA3,
    "gemma3_text": _GEMMA3,
    "gpt_neox": _NEOX,
}

# Model names (hub ids) -> family, for files that name their model but come without it. Checked in order.
_NAME_PATTERNS = (
    (re.compile(r"gemma[-_]?3", re.I), "gemma3"),
    (re.compile(r"gemma[-_]?2", re.I), "gemma2"),
    (re.compile(r"gemma", re.I), "gemma"),
    (re.compile(r"qwen[-_]?3", re.I), "qwen3"),
    (re.compile(r"qwen", re.I), "qwen2"),
    (re.compile(r"llama|smollm|mistral", re.I), "llama"),
    (re.compile(r"pythia|gpt[-_]?neox", re.I), "gpt_neox"),
    (re.compile(r"gpt2|gpt-2", re.I), "gpt2"),
)

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_SUFFIXES = (
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_in", "hook_mlp_out",
    "ln1.hook_normalized", "ln2.hook_normalized", "mlp.hook_in", "mlp.hook_out",
)


def family_from_name(model_name: str | None) -> str | None:
    """The family of a model from its hub name (``"google/gemma-2-2b"`` -> ``"gemma2"``), or None if unknown."""
    if not model_name:
        return None
    for pattern, family in _NAME_PATTERNS:
        if pattern.search(model_name):
            return family
    return None


def _hf_model(model: Any) -> Any:
    """The HuggingFace model inside a LanguageModel (or the model itself)."""
    return getattr(model, "model", model) if hasattr(model, "layers") and hasattr(model, "tokenizer") else model


def family_from_model(model: Any) -> str | None:
    """The family of a LanguageModel or HuggingFace model from ``config.model_type`` (None if not covered)."""
    config = getattr(_hf_model(model), "config", None)
    model_type = getattr(config, "model_type", None)
    return model_type if model_type in FAMILIES else None


def _layout(family: str) -> _Layout:
    try:
        return FAMILIES[family]
    except KeyError:
        raise NotSupportedError(
            f"no hook-name map for the model family {family!r}; families covered: {sorted(FAMILIES)}"
        ) from None


def tl_to_hook(hook_name: str, family: str) -> HookPoint:
    """The `HookPoint` of a TransformerLens hook name in a model family.

    Args:
        hook_name: e.g. ``"blocks.5.hook_resid_post"``, ``"blocks.0.hook_resid_pre"``, ``"hook_embed"``.
        family: a key of `FAMILIES` (``"gpt2"``, ``"llama"``, ``"gemma2"``, ...).

    Raises:
        UserInputError: not a TransformerLens hook name this map covers (the message lists the covered ones).
        NotSupportedError: an unknown family, or a hook that exists in TransformerLens but has no counterpart in
            this family's HuggingFace modules (``hook_resid_mid`` of a parallel-attention model, say).
    """
    layout = _layout(family)
    if hook_name == "hook_embed":
        return HookPoint(layout.embed)
    if hook_name == "ln_final.hook_normalized":
        return HookPoint(layout.final_norm)
    match = _BLOCK_HOOK.match(hook_name)
    if match is None or match.group(2) not in _BLOCK_SUFFIXES:
        raise UserInputError(
            f"hook_name={hook_name!r} is not a TransformerLens hook name this map covers; covered: 'hook_embed', "
            f"'ln_final.hook_normalized' and 'blocks.<L>.<name>' with <name> one of {list(_BLOCK_SUFFIXES)}"
        )
    layer, suffix = int(match.group(1)), match.group(2)
    block = f"{layout.blocks}.{layer}"
    if suffix == "hook_resid_post":
        return HookPoint(block)
    if suffix == "hook_resid_pre":
        if layer > 0:
            return HookPoint(f"{layout.blocks}.{layer - 1}")
        if layout.resid_pre0 is not None:
            return HookPoint(layout.resid_pre0)
        return HookPoint(block, "input")
    if suffix in ("hook_resid_mid", "hook_mlp_in"):
        if layout.parallel:
            raise NotSupportedError(
                f"hook_name={hook_name!r}: models of the family {family!r} run attention and MLP in parallel, so "
                f"there is no residual stream between them"
            )
        return HookPoint(f"{block}.{layout.ln2}", "input")
    if suffix == "hook_attn_out":
        return HookPoint(f"{block}.{layout.attn_out}")
    if suffix == "hook_mlp_out":
        return HookPoint(f"{block}.{layout.mlp_out}")
    if suffix == "ln1.hook_normalized":
        return HookPoint(f"{block}.{layout.ln1}")
    if suffix == "ln2.hook_normalized":
        return HookPoint(f"{block}.{layout.ln2}")
    if suffix == "mlp.hook_in":
        return HookPoint(f"{block}.{layout.mlp}", "input")
    return HookPoint(f"{block}.{layout.mlp}")  # mlp.hook_out


def module_to_tl(module: str, family: str, side: str = "output") -> str | None:
    """The TransformerLens hook name of a module's output (or input), or None when none corresponds.

    A block's output is named ``blocks.L.hook_resid_post`` (it is also ``blocks.L+1.hook_resid_pre``); an MLP
    module whose output is also the block's ``mlp_out`` is named ``blocks.L.hook_mlp_out``.
    """
    layout = _layout(family)
    if side == "output":
        if module == layout.embed and module != layout.resid_pre0:
            return "hook_embed"
        if module == layout.resid_pre0:
            return "blocks.0.hook_resid_pre"
    prefix = layout.blocks + "."
    if not module.startswith(prefix):
        return None
    rest = module[len(prefix):]
    index, _, sub = rest.partition(".")
    if not index.isdigit():
        return None
    # Preference order where two names share a module: resid_post over resid_pre, mlp_out over mlp.hook_out.
    # lnX.hook_normalized is left out: it is the norm's output before its weight (see the module docstring).
    for suffix in ("hook_resid_post", "hook_mlp_out", "hook_attn_out", "hook_resid_mid", "mlp.hook_in",
                   "mlp.hook_out"):
        name = f"blocks.{index}.{suffix}"
        try:
            point = tl_to_hook(name, family)
        except NotSupportedError:
            continue
        if point == HookPoint(module, side):
            return name
    return None


def _modules(model: Any) -> dict[str, Any] | None:
    hf = _hf_model(model)
    named = getattr(hf, "named_modules", None)
    return dict(named()) if callable(named) else None


def resolve_hook(name: str, *, model: Any = None, family: str | None = None) -> HookPoint:
    """Resolve a hook name of any of the spellings above to a `HookPoint`, checked against ``model`` when given.

    Tried in order: a dotted module path of the model (mi_crow's own names); a path relative to the base model
    (sparsify's ``layers.5``); a TransformerLens hook name (with the family of ``model``, or ``family``).

    Args:
        name: the hook name.
        model: a LanguageModel or HuggingFace model (optional): the module must exist in it.
        family: the model family when no model is given (see `family_from_name`).

    Raises:
        UserInputError: the name is none of these, or names a module the model does not have (the message gives the
            module path it resolved to and the number of blocks).
    """
    if not isinstance(name, str) or not name:
        raise UserInputError(f"hook name must be a non-empty str, got {name!r}")
    modules = _modules(model) if model is not None else None
    if model is not None:
        family = family_from_model(model) or family
    if modules is not None and name in modules:
        return HookPoint(name)
    if family is not None and family in FAMILIES:
        layout = FAMILIES[family]
        relative = f"{layout.base}.{name}"
        if modules is not None and relative in modules:
            return HookPoint(relative)
        if modules is None and re.match(r"^(layers|h)\.\d+(\.|$)", name):
            return HookPoint(relative)
    looks_tl = name == "hook_embed" or name.startswith("blocks.") or name.startswith("ln_final.")
    if looks_tl:
        if family is None:
            raise UserInputError(
                f"hook name {name!r} is a TransformerLens name; to map it to a module the model family must be "
                f"known (pass the model, or a file that names it); families covered: {sorted(FAMILIES)}"
            )
        point = tl_to_hook(name, family)
        if modules is not None and point.module not in modules:
            raise UserInputError(
                f"hook name {name!r} maps to module {point.module!r}, which is not in the model "
                f"({_block_count(modules, FAMILIES[family])} transformer blocks)"
            )
        return point
    if modules is not None:
        raise UserInputError(
            f"hook name {name!r} is not in the model: neither a module path (e.g. {next(iter(_sample(modules)))!r}), "
            f"a path relative to the base model, nor a TransformerLens hook name"
        )
    # Without a model a module path cannot be checked; take it as given.
    return HookPoint(name)


def _sample(modules: dict[str, Any]) -> list[str]:
    names = [n for n in modules if n]
    return names[len(names) // 2 : len(names) // 2 + 1] or [""]


def _block_count(modules: dict[str, Any], layout: _Layout) -> int:
    blocks = modules.get(layout.blocks)
    try:
        return len(blocks)  # type: ignore[arg-type]
    except TypeError:
        return 0


def hook_width(model: Any, point: HookPoint) -> int | None:
    """The width of the activation at ``point`` in a LanguageModel (None when it cannot be told).

    Outputs are measured by the LanguageModel's shape probe; inputs of modules are the model's hidden size
    (every input this map produces is a residual-stream or normalized residual-stream tensor).
    """
    if point.side == "output" and hasattr(model, "layers") and hasattr(model.layers, "width"):
        return int(model.layers.width(point.module))
    config = getattr(_hf_model(model), "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


_NORMALIZED = re.compile(r"(^|\.)(ln1|ln2|ln_final)\.hook_normalized$")


def is_normalized_hook(hook_name: str | None) -> bool:
    """Whether a TransformerLens name is a norm's ``hook_normalized`` (the output before the norm's weight)."""
    return bool(hook_name) and bool(_NORMALIZED.search(hook_name))  # type: ignore[arg-type]


def norm_affine(model: Any, module: str, family: str | None) -> tuple[Any, Any]:
    """``(weight, bias)`` with ``module's output = normalized * weight + bias`` (bias None for RMS norms).

    Gemma's RMS norms multiply by ``1 + weight``; the others by ``weight``.

    Raises:
        UserInputError: the module is not a norm of the model (no ``weight``).
    """
    mod = _modules(model).get(module) if _modules(model) is not None else None  # type: ignore[union-attr]
    weight = getattr(mod, "weight", None)
    if weight is None:
        raise UserInputError(f"module {module!r} is not a norm with a weight in the model")
    weight = weight.detach()
    if family in ("gemma", "gemma2", "gemma3", "gemma3_text"):
        weight = 1.0 + weight.float()
    bias = getattr(mod, "bias", None)
    return weight, None if bias is None else bias.detach()
