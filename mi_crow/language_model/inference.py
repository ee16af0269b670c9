"""Forward passes and generation through a LanguageModel, with the batch context set on every hook."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mi_crow.hooks import BatchContext

if TYPE_CHECKING:
    from transformers import BatchEncoding

    from mi_crow.language_model.language_model import LanguageModel

__all__ = ["InferenceEngine", "check_texts"]

logger = logging.getLogger(__name__)


def check_texts(texts: Any, name: str = "texts") -> list[str]:
    """Validate a list of texts (a single str is wrapped in a list).

    Raises:
        TypeError: not a str or a sequence of str (the first offending item is named).
        ValueError: an empty sequence.
    """
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} must contain at least one text, got an empty {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(text).__name__}: {text!r}")
    return texts


def _check_positive_int(value: Any, name: str, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


class InferenceEngine:
    """Runs forward passes and generation for a LanguageModel (``lm.inference``).

    Every model forward it runs is framed by ``on_batch_start(BatchContext)`` / ``on_batch_end()`` on all
    registered hooks. Texts are padded on the right for forward passes (position ``i`` is the ``i``-th token of
    every text) and on the left for generation; explicit position ids are passed so padding never shifts
    positions, which makes batched results equal one-text-at-a-time results.

    Args:
        lm: the owning LanguageModel.
    """

    def __init__(self, lm: LanguageModel) -> None:
        self._lm = lm

    # ------------------------------------------------------------------------------------------- plumbing
    def make_context(
        self, texts: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor, step: int | None = None
    ) -> BatchContext:
        """Build the ``BatchContext`` hooks receive for a batch."""
        special = self._lm.special_token_ids.to(input_ids.device)
        special_mask = torch.isin(input_ids, special) | (attention_mask == 0)
        return BatchContext(
            texts=texts,
            input_ids=input_ids,
            attention_mask=attention_mask,
            special_tokens_mask=special_mask,
            tokenizer=self._lm.tokenizer,
            generation_step=step,
        )

    def model_inputs(self, encodings: BatchEncoding) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model: ids and mask on the model's device plus padding-proof position ids."""
        device = self._lm.device
        ids = encodings["input_ids"].to(device)
        mask = encodings["attention_mask"].to(device)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self._lm._accepts_position_ids:
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return inputs

    def forward_batch(
        self,
        texts: list[str],
        max_length: int | None = None,
        with_controllers: bool = True,
        **forward_kwargs: Any,
    ) -> tuple[Any, BatchEncoding]:
        """One forward pass over one batch of texts, with the batch context set on every hook.

        Args:
            texts: the batch.
            max_length: truncate each text to this many tokens (``None``: the model's maximum).
            with_controllers: ``False`` skips every registered ``Controller`` for this pass (detectors still run).
            **forward_kwargs: passed to the model (e.g. ``output_hidden_states=True``).

        Returns:
            ``(outputs, encodings)``: the model output (``logits [batch, seq, vocab]``) and the tokenizer's
            ``BatchEncoding`` (``input_ids``, ``attention_mask`` ``[batch, seq]``, on the CPU).
        """
        encodings = self._lm.tokenize(texts, max_length=max_length, padding_side="right")
        return self.forward_encoded(texts, encodings, with_controllers, **forward_kwargs), encodings

    def forward_encoded(
        self, texts: list[str], encodings: BatchEncoding, with_controllers: bool = True, **forward_kwargs: Any
    ) -> Any:
        """One forward pass over an already tokenized batch (see ``forward_batch``); returns the model output."""
        inputs = self.model_inputs(encodings)
        context = self.make_context(texts, inputs["input_ids"], inputs["attention_mask"])
        forward_kwargs.setdefault("use_cache", False)
        previous = self._lm._controllers_enabled
        self._lm._controllers_enabled = previous and bool(with_controllers)
        self._lm._batch_start(context)
        try:
            with torch.no_grad():
                outputs = self._lm.model(**inputs, **forward_kwargs)
        finally:
            self._lm._batch_end()
            self._lm._controllers_enabled = previous
        return outputs

    # ----------------------------------------------------------------------------------------- public API
    def iter_inference(
        self,
        texts: Sequence[str],
        batch_size: int = 16,
        max_length: int | None = None,
        with_controllers: bool = True,
        **forward_kwargs: Any,
    ) -> Iterator[tuple[Any, BatchEncoding]]:
        """Forward passes over ``texts`` in batches, yielding ``(outputs, encodings)`` per batch.

        Nothing is kept between batches, so memory is bounded by one batch (use it to run hooks such as concept
        tracking over many texts).
        """
        texts = check_texts(texts)
        batch_size = _check_positive_int(batch_size, "batch_size", allow_none=False)
        for start in range(0, len(texts), batch_size):
            yield self.forward_batch(texts[start : start + batch_size], max_length, with_controllers, **forward_kwargs)

    def execute_inference(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        with_controllers: bool = True,
        **forward_kwargs: Any,
    ) -> tuple[Any, BatchEncoding] | tuple[list[Any], list[BatchEncoding]]:
        """Run the model over texts with all registered hooks active.

        Args:
            texts: a list of str (a single str is accepted).
            batch_size: ``None`` (or ``>= len(texts)``): one forward pass over all texts. Otherwise several passes.
            max_length: truncate each text to this many tokens (``None``: the model's maximum).
            with_controllers: ``False`` runs without any registered ``Controller`` (detectors still run).
            **forward_kwargs: passed to the model's forward (e.g. ``output_hidden_states=True``).

        Returns:
            For one pass: ``(outputs, encodings)`` with ``outputs.logits`` ``[batch, seq, vocab]`` and the
            right-padded ``encodings`` (``input_ids``, ``attention_mask`` ``[batch, seq]``). For several passes:
            ``(list of outputs, list of encodings)``, one entry per batch.
        """
        texts = check_texts(texts)
        batch_size = _check_positive_int(batch_size, "batch_size")
        max_length = _check_positive_int(max_length, "max_length")
        if batch_size is None or batch_size >= len(texts):
            return self.forward_batch(texts, max_length, with_controllers, **forward_kwargs)
        outputs, encodings = [], []
        for out, enc in self.iter_inference(texts, batch_size, max_length, with_controllers, **forward_kwargs):
            outputs.append(out)
            encodings.append(enc)
        return outputs, encodings

    def generate(
        self,
        texts: Sequence[str],
        max_new_tokens: int = 20,
        do_sample: bool = False,
        with_controllers: bool = True,
        max_length: int | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Generate continuations autoregressively with the registered hooks active (so controllers steer).

        Every model forward during generation is a batch for the hooks: step 0 is the prompt (``context.input_ids``
        is the left-padded prompt ``[batch, prompt_len]``); from step 1 on the context holds the ids fed in that step
        (``[batch, 1]`` with a KV cache) and the matching slice of the attention mask, so they line up with the
        hidden states the hooks see. ``context.texts`` is always the prompts and ``context.generation_step`` the step.

        Args:
            texts: the prompts.
            max_new_tokens: how many tokens to generate at most.
            do_sample: sample instead of greedy decoding.
            with_controllers: ``False`` generates without any registered ``Controller``.
            max_length: truncate each prompt to this many tokens.
            **generate_kwargs: passed to ``model.generate`` (``temperature``, ``top_p``, ...).

        Returns:
            The generated continuations (new tokens only, special tokens removed), one str per prompt.
        """
        texts = check_texts(texts)
        _check_positive_int(max_new_tokens, "max_new_tokens", allow_none=False)
        max_length = _check_positive_int(max_length, "max_length")
        lm = self._lm
        encodings = lm.tokenize(texts, max_length=max_length, padding_side="left")
        ids = encodings["input_ids"].to(lm.device)
        mask = encodings["attention_mask"].to(lm.device)
        step = {"n": 0, "started": False}

        def frame_step(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            step_ids = kwargs.get("input_ids", args[0] if args else None)
            if not isinstance(step_ids, torch.Tensor):
                return
            full_mask = kwargs.get("attention_mask")
            if isinstance(full_mask, torch.Tensor) and full_mask.dim() == 2:
                step_mask = full_mask[:, -step_ids.shape[-1] :]
            else:
                step_mask = torch.ones_like(step_ids)
            if step["started"]:
                lm._batch_end()
            lm._batch_start(self.make_context(texts, step_ids, step_mask, step=step["n"]))
            step["started"] = True
            step["n"] += 1

        # Prepended so the context is set before any user hook on the whole model runs.
        handle = lm.model.register_forward_pre_hook(frame_step, with_kwargs=True, prepend=True)
        previous = lm._controllers_enabled
        lm._controllers_enabled = previous and bool(with_controllers)
        generate_kwargs.setdefault("pad_token_id", lm.tokenizer.pad_token_id)
        try:
            with torch.no_grad():
                sequences = lm.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    **generate_kwargs,
                )
        finally:
            handle.remove()
            if step["started"]:
                lm._batch_end()
            lm._controllers_enabled = previous
        if not isinstance(sequences, torch.Tensor):
            sequences = sequences.sequences
        new_tokens = sequences[:, ids.shape[1] :]
        return lm.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
