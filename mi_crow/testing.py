"""Tiny models and tokenizers built in code, for tests, benchmarks and smoke runs without any network.

``make_tiny_gpt2_lm()`` and ``make_tiny_llama_lm()`` return a ready ``LanguageModel`` over a randomly initialised
(seeded) GPT-2 or Llama with a byte-level BPE tokenizer trained on ``SAMPLE_TEXTS`` in a few milliseconds. The GPT-2
tokenizer has no pad token and pads on the right, as GPT-2's does; the Llama-style one prepends a BOS token and
pads on the left, as Llama tokenizers do.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from mi_crow.language_model import LanguageModel

__all__ = [
    "SAMPLE_TEXTS",
    "build_tokenizer",
    "make_tiny_gpt2_lm",
    "make_tiny_gpt2_model",
    "make_tiny_llama_lm",
    "make_tiny_llama_model",
    "offline_hub",
]

SAMPLE_TEXTS: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    "A cat sat on the mat.",
    "Hello world!",
    "Sparse autoencoders find interpretable features in language models.",
    "The river flows past the old mill and into the sea.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "She sells sea shells by the sea shore.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "The weather today is sunny with a light breeze from the west.",
    "Neurons in the network respond to dates, names and numbers.",
    "I like green tea.",
    "Mechanistic interpretability studies the circuits inside a trained model.",
    "The train to the north leaves at seven in the morning.",
    "Water boils at one hundred degrees at sea level.",
    "He wrote a long letter to his sister about the mountains.",
    "Birds sing.",
    "The museum opens on Monday and closes late on Friday evenings.",
    "Numbers like 42 and 1999 appear in many old books.",
    "Children played in the park until the sun went down.",
    "The library keeps maps, letters and photographs from the last century.",
    "Cold winds blow across the hills in winter.",
    "Every model has layers, and every layer has a width.",
    "Good morning, how are you today?",
    "The recipe needs flour, sugar, eggs and a little salt.",
]

_GPT2_EOS = "<|endoftext|>"
_LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")


@functools.lru_cache(maxsize=4)
def _tokenizer_json(style: str, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>" if style == "llama" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [_GPT2_EOS] if style == "gpt2" else list(_LLAMA_SPECIALS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SAMPLE_TEXTS * 4, trainer)
    if style == "llama":
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def build_tokenizer(style: Literal["gpt2", "llama"] = "gpt2", vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A fresh tokenizer built offline.

    Args:
        style: ``"gpt2"`` (EOS = BOS = ``<|endoftext|>``, no pad token, right padding) or ``"llama"`` (``<s>``
            prepended, ``</s>`` EOS, ``<unk>``, no pad token, left padding).
        vocab_size: BPE vocabulary size (the byte alphabet alone is 256 tokens).

    Returns:
        A ``PreTrainedTokenizerFast``; every call returns a new object, so tests may change it freely.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if style not in ("gpt2", "llama"):
        raise ValueError(f"style must be 'gpt2' or 'llama', got {style!r}")
    backend = Tokenizer.from_str(_tokenizer_json(style, vocab_size))
    if style == "gpt2":
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token=_GPT2_EOS, eos_token=_GPT2_EOS, padding_side="right"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def make_tiny_gpt2_model(
    tokenizer: Any, n_layer: int = 3, n_embd: int = 32, n_head: int = 4, n_positions: int = 128, seed: int = 0
) -> PreTrainedModel:
    """A seeded random ``GPT2LMHeadModel`` in eval mode whose vocabulary matches ``tokenizer``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def make_tiny_llama_model(
    tokenizer: Any,
    num_hidden_layers: int = 3,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 128,
    seed: int = 0,
) -> PreTrainedModel:
    """A seeded random ``LlamaForCausalLM`` (grouped-query attention) in eval mode matching ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def make_tiny_gpt2_lm(store: Any = None, seed: int = 0, **model_kwargs: Any) -> LanguageModel:
    """A ``LanguageModel`` over a tiny GPT-2 (default: 3 blocks, width 32, 4 heads) with a local tokenizer.

    Args:
        store: optional store for ``lm.activations.save``.
        seed: weight initialisation seed.
        **model_kwargs: passed to ``make_tiny_gpt2_model`` (``n_layer``, ``n_embd``, ``n_head``, ``n_positions``).
    """
    from mi_crow.language_model import LanguageModel

    tokenizer = build_tokenizer("gpt2")
    model = make_tiny_gpt2_model(tokenizer, seed=seed, **model_kwargs)
    return LanguageModel(model, tokenizer, store=store, model_id=f"tiny-gpt2-seed{seed}")


def make_tiny_llama_lm(store: Any = None, seed: int = 0, **model_kwargs: Any) -> LanguageModel:
    """A ``LanguageModel`` over a tiny Llama (default: 3 layers, width 32, 4 heads, 2 KV heads) with a local
    Llama-style tokenizer (BOS, left padding).

    Args:
        store: optional store for ``lm.activations.save``.
        seed: weight initialisation seed.
        **model_kwargs: passed to ``make_tiny_llama_model``.
    """
    from mi_crow.language_model import LanguageModel

    tokenizer = build_tokenizer("llama")
    model = make_tiny_llama_model(tokenizer, seed=seed, **model_kwargs)
    return LanguageModel(model, tokenizer, store=store, model_id=f"tiny-llama-seed{seed}")


def offline_hub(monkeypatch: Any) -> None:
    """Put ``huggingface_hub`` and ``datasets`` into offline mode for one test, so nothing can reach the network.

    Args:
        monkeypatch: pytest's ``monkeypatch`` fixture (the settings are undone after the test).
    """
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
