"""What a feature does to the output: the logit lens of its decoder direction.

A feature's decoder direction ``W_dec[j]``, read out through the model's final norm and unembedding, gives the
tokens it promotes (largest logits) and suppresses (smallest). The norm is applied as the model would apply it to
a residual that points along the direction, and the part the norm adds to every input (a LayerNorm's bias) is
subtracted, so only the direction's own effect is ranked. Scale does not matter: RMSNorm and LayerNorm divide it
out.

:func:`feature_logit_lens` computes it for any set of features (chunked: ``[chunk, vocab]`` at a time);
:func:`coherence` scores how much a feature's promoted tokens agree on one word, the property that makes its
steering visible in text.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mi_crow.errors import UserInputError
from mi_crow.validation import check_positive_int

__all__ = ["LogitLens", "coherence", "feature_logit_lens", "final_norm_and_unembedding", "normalize_token",
           "readable_words", "vocab_texts"]

_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm", "norm_f")
_STOPWORDS = frozenset(
    "the and for that with was were are this from which its his her their they them has have had not but also "
    "been who whom when where what into than then there these those such other more most some many any all one "
    "two can may would could should will being over after before about between during under while both each "
    "you your our out very just like only even well much".split()
)


@dataclass
class LogitLens:
    """Promoted and suppressed tokens of some features.

    Attributes:
        neurons: the feature indices, one row each.
        promoted_ids: ``[n, top]`` int64 token ids with the largest logits, largest first.
        promoted_logits: ``[n, top]`` their logits (of a unit-RMS residual along the direction).
        suppressed_ids: ``[n, top]`` int64 token ids with the smallest logits, smallest first.
        suppressed_logits: ``[n, top]`` their logits.
        promoted: per feature, the promoted tokens as text (``tokenizer.convert_tokens_to_string``).
        suppressed: per feature, the suppressed tokens as text.
    """

    neurons: list[int]
    promoted_ids: Tensor
    promoted_logits: Tensor
    suppressed_ids: Tensor
    suppressed_logits: Tensor
    promoted: list[list[str]]
    suppressed: list[list[str]]

    def row(self, neuron: int) -> int:
        """Row of ``neuron`` in this result."""
        try:
            return self.neurons.index(int(neuron))
        except ValueError:
            raise UserInputError(f"neuron {neuron} is not among the {len(self.neurons)} features of this logit "
                                 f"lens") from None


def final_norm_and_unembedding(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """The final norm (``None`` if the model has none that can be found) and the unembedding of a causal LM.

    Raises:
        UserInputError: the model has no output embeddings (not a language-model head).
    """
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(unembed, nn.Module):
        raise UserInputError(f"the model {type(model).__name__} has no output embeddings: the logit lens needs a "
                             f"language-model head")
    base = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
    for holder in (base, getattr(base, "decoder", None), model):
        if holder is None:
            continue
        for name in _NORM_NAMES:
            norm = getattr(holder, name, None)
            if isinstance(norm, nn.Module):
                return norm, unembed
    return None, unembed


_VOCAB_TEXTS: dict[int, tuple[Any, list[str]]] = {}


def vocab_texts(tokenizer: Any) -> list[str]:
    """Every vocabulary id's text (``convert_tokens_to_string`` of its token), computed once per tokenizer."""
    key = id(tokenizer)
    cached = _VOCAB_TEXTS.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    out = []
    for t in tokens:
        try:
            out.append(str(tokenizer.convert_tokens_to_string([t])) if t is not None else "")
        except Exception:  # noqa: BLE001 - a lone byte piece may not decode; show the raw piece
            out.append(str(t))
    _VOCAB_TEXTS.clear()  # one tokenizer at a time: the table is ~1 MB per 50k tokens
    _VOCAB_TEXTS[key] = (tokenizer, out)
    return out


def _token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    table = vocab_texts(tokenizer)
    return [table[i] if 0 <= i < len(table) else "" for i in ids]


@torch.no_grad()
def feature_logit_lens(
    lm: Any,
    sae: Any,
    neurons: Sequence[int] | None = None,
    top: int = 10,
    chunk: int = 256,
) -> LogitLens:
    """The tokens each feature's decoder direction promotes and suppresses through the final norm and unembedding.

    Args:
        lm: the ``LanguageModel`` (its ``model`` and ``tokenizer``).
        sae: the SAE (``W_dec [n_latents, n_inputs]``); ``n_inputs`` must be the model's hidden size.
        neurons: the features (default: all).
        top: tokens kept per side.
        chunk: features per matrix product (memory ``chunk * vocab`` floats).

    Returns:
        A :class:`LogitLens`.

    Raises:
        UserInputError: a neuron out of range, or an SAE whose width is not the model's hidden size.
    """
    top = check_positive_int(top, "top")
    chunk = check_positive_int(chunk, "chunk")
    n_latents = int(sae.n_latents)
    if neurons is None:
        neurons = list(range(n_latents))
    neurons = [int(n) for n in neurons]
    bad = [n for n in neurons if not 0 <= n < n_latents]
    if bad:
        raise UserInputError(f"neurons {bad[:5]} are out of range [0, {n_latents})")
    norm, unembed = final_norm_and_unembedding(lm.model)
    weight = unembed.weight
    if weight.shape[-1] != sae.n_inputs:
        raise UserInputError(f"the SAE has n_inputs={sae.n_inputs} but the model's unembedding reads width "
                             f"{weight.shape[-1]}: the logit lens needs an SAE on the residual stream")
    device, dtype = weight.device, weight.dtype
    top = min(top, int(weight.shape[0]))
    d = int(sae.n_inputs)

    def read_out(h: Tensor) -> Tensor:
        return unembed(norm(h) if norm is not None else h).float()

    zero = torch.zeros(1, d, device=device, dtype=dtype)
    baseline = read_out(zero)  # what the norm's bias and the head's bias give any input
    p_ids, p_logits, s_ids, s_logits = [], [], [], []
    for start in range(0, len(neurons), chunk):
        idx = torch.tensor(neurons[start:start + chunk], dtype=torch.int64)
        rows = sae.W_dec.detach()[idx.to(sae.W_dec.device)].to(device=device, dtype=dtype)
        rms = rows.float().pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
        logits = read_out((rows.float() / rms).to(dtype)) - baseline  # [chunk, vocab]
        hi = logits.topk(top, dim=-1)
        lo = logits.topk(top, dim=-1, largest=False)
        p_ids.append(hi.indices.cpu())
        p_logits.append(hi.values.cpu())
        s_ids.append(lo.indices.cpu())
        s_logits.append(lo.values.cpu())
    promoted_ids = torch.cat(p_ids) if p_ids else torch.zeros(0, top, dtype=torch.int64)
    suppressed_ids = torch.cat(s_ids) if s_ids else torch.zeros(0, top, dtype=torch.int64)
    tokenizer = lm.tokenizer
    return LogitLens(
        neurons=neurons,
        promoted_ids=promoted_ids,
        promoted_logits=torch.cat(p_logits) if p_logits else torch.zeros(0, top),
        suppressed_ids=suppressed_ids,
        suppressed_logits=torch.cat(s_logits) if s_logits else torch.zeros(0, top),
        promoted=[_token_texts(tokenizer, row) for row in promoted_ids.tolist()],
        suppressed=[_token_texts(tokenizer, row) for row in suppressed_ids.tolist()],
    )


def normalize_token(text: str) -> str:
    """A token's text reduced to what a reader would call its word: lower case, letters only."""
    return re.sub(r"[^a-z]", "", text.lower())


def readable_words(tokens: Sequence[str]) -> list[str]:
    """The words a reader would recognise among ``tokens``: each reduced with :func:`normalize_token`, kept when it
    has three or more letters and is not a stopword; first occurrence order, no repeats."""
    out: list[str] = []
    for t in tokens:
        w = normalize_token(t)
        if len(w) >= 3 and w not in _STOPWORDS and w not in out:
            out.append(w)
    return out


def coherence(tokens: Sequence[str]) -> tuple[float, str]:
    """How much a feature's promoted tokens agree on one readable word.

    Tokens are reduced with :func:`normalize_token`; two agree when they share their first four letters (so
    "wedding", " Wedding" and "weddings" agree). The score is the share of the tokens in the largest such group
    of words of three or more letters that are not stopwords; the group's most frequent form (the highest ranked
    on a tie) is its word.

    Args:
        tokens: the promoted tokens, highest first.

    Returns:
        ``(score in [0, 1], word)``; ``(0.0, "")`` when no token is a readable word.
    """
    words = [normalize_token(t) for t in tokens]
    readable = [w for w in words if len(w) >= 3 and w not in _STOPWORDS]
    if not readable or not tokens:
        return 0.0, ""
    groups = Counter(w[:4] for w in readable)
    stem, size = max(groups.items(), key=lambda item: (item[1], -next(i for i, w in enumerate(readable)
                                                                       if w[:4] == item[0])))
    members = [w for w in readable if w[:4] == stem]
    word = Counter(members).most_common(1)[0][0]
    return size / len(tokens), word

