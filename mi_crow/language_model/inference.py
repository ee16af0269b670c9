"""Forward passes and generation through a LanguageModel, with the batch context set on every hook."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mi_crow.errors import ArgumentTypeError, NotSupportedError, UserInputError
from mi_crow.hooks import BatchContext
from mi_crow.validation import check_positive_int

if TYPE_CHECKING:
    from transformers import BatchEncoding

    from mi_crow.language_model.language_model import LanguageModel

__all__ = ["InferenceEngine", "check_texts", "stitch_batches"]

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
        raise ArgumentTypeError(f"{name} must be a list of str, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise UserInputError(f"{name} must contain at least one text, got an empty {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ArgumentTypeError(f"{name}[{i}] must be a str, got {type(text).__name__}: {text!r}")
    return texts


def _cat_padded(tensors: list[torch.Tensor], pad_value: float | int) -> torch.Tensor:
    """Concatenate along dim 0, padding every other dim at its end to the largest size (``pad_value``)."""
    if any(t.dim() != tensors[0].dim() for t in tensors):
        raise NotSupportedError(f"cannot stitch tensors of different ranks {[t.dim() for t in tensors]}")
    rest = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    total = sum(t.shape[0] for t in tensors)
    out = tensors[0].new_full((total, *rest), pad_value)
    row = 0
    for t in tensors:
        out[(slice(row, row + t.shape[0]), *(slice(0, n) for n in t.shape[1:]))] = t
        row += t.shape[0]
    return out


def _stitch_value(key: str, values: list[Any]) -> Any:
    first = values[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor) and first.dim() >= 1:
        return _cat_padded(values, 0)
    if isinstance(first, (tuple, list)) and all(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in first):
        return type(first)(_cat_padded(list(group), 0) for group in zip(*values))
    raise NotSupportedError(
        f"cannot join the model output field {key!r} ({type(first).__name__}) across batches; run with "
        "batch_size=None (one forward pass) or use iter_inference to get one output per batch"
    )


def stitch_batches(outputs: list[Any], encodings: list[Any], pad_token_id: int | None) -> tuple[Any, Any]:
    """Join per-batch model outputs and encodings into one output and one encoding over all the texts.

    Batches are right-padded (position ``j`` is token ``j`` of every text), so joining pads every batch at its end
    to the longest sequence of all: rows keep their order, real tokens keep their positions and values.

    Args:
        outputs: per-batch model outputs (a HF ``ModelOutput`` / mapping of tensors and tuples of tensors, or a
            tensor), each with the batch as dim 0.
        encodings: per-batch ``BatchEncoding`` (``input_ids``, ``attention_mask`` ``[batch, seq]``).
        pad_token_id: fills ``input_ids`` past a text's end.

    Returns:
        ``(outputs, encodings)`` of the same types: ``logits [n_texts, max_seq, vocab]``, ``hidden_states`` /
        ``attentions`` tuples joined element by element; ``input_ids`` padded with ``pad_token_id``,
        ``attention_mask`` and every other tensor with 0. Positions past a text's end hold 0 in the joined
        tensors of the shorter batches (in a single pass they hold whatever the model computed on padding).

    Raises:
        NotSupportedError: an output field that has no batch dimension (e.g. a ``loss``, a KV cache).
    """
    if len(outputs) == 1:
        return outputs[0], encodings[0]
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        joined: Any = _cat_padded(outputs, 0)
    elif isinstance(first, Mapping):
        fields = {key: _stitch_value(key, [o[key] for o in outputs]) for key in first.keys()}
        joined = type(first)(**fields)
    else:
        raise NotSupportedError(f"cannot join model outputs of type {type(first).__name__} across batches")
    data = {}
    for key in encodings[0].keys():
        values = [e[key] for e in encodings]
        pad = pad_token_id if key == "input_ids" and pad_token_id is not None else 0
        data[key] = _cat_padded(values, pad) if isinstance(values[0], torch.Tensor) else values
    return joined, type(encodings[0])(data)


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
            language_model=self._lm,
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

    def _request_hidden_states(self, kwargs: dict[str, Any]) -> None:
        """Ask the model for its hidden states when a registered hook needs them (``ModelOutputDetector`` with
        ``save_output_hidden_state=True``)."""
        if any(getattr(hook, "wants_hidden_states", False) for hook in self._lm.layers.get_hooks()):
            kwargs.setdefault("output_hidden_states", True)

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
        self._request_hidden_states(forward_kwargs)
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
        batch_size = check_positive_int(batch_size, "batch_size")
        max_length = check_positive_int(max_length, "max_length", allow_none=True)
        for start in range(0, len(texts), batch_size):
            yield self.forward_batch(texts[start : start + batch_size], max_length, with_controllers, **forward_kwargs)

    def _run_batches(
        self, batches: Iterable[list[str]], max_length: int | None, with_controllers: bool, **forward_kwargs: Any
    ) -> tuple[Any, BatchEncoding]:
        """One forward pass per batch, joined into one ``(outputs, encodings)`` (see ``stitch_batches``)."""
        outputs, encodings = [], []
        for batch in batches:
            out, enc = self.forward_batch(batch, max_length, with_controllers, **forward_kwargs)
            outputs.append(out)
            encodings.append(enc)
        if not outputs:
            raise UserInputError("the input yielded no texts to run the model on")
        return stitch_batches(outputs, encodings, self._lm.tokenizer.pad_token_id)

    def execute_inference(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        with_controllers: bool = True,
        **forward_kwargs: Any,
    ) -> tuple[Any, BatchEncoding]:
        """Run the model over texts with all registered hooks active.

        Args:
            texts: a list of str (a single str is accepted).
            batch_size: texts per forward pass; ``None`` (or ``>= len(texts)``): one pass over all texts. The
                result has the same shape either way.
            max_length: truncate each text to this many tokens (``None``: the model's maximum).
            with_controllers: ``False`` runs without any registered ``Controller`` (detectors still run).
            **forward_kwargs: passed to the model's forward (e.g. ``output_hidden_states=True``).

        Returns:
            ``(outputs, encodings)`` over all texts whatever ``batch_size`` is: ``outputs.logits``
            ``[n_texts, seq, vocab]`` and the right-padded ``encodings`` (``input_ids``, ``attention_mask``
            ``[n_texts, seq]``), ``seq`` the longest text. With several batches they are joined by
            ``stitch_batches``; values at real tokens equal those of one pass over all texts (up to float
            rounding), positions past a text's end hold 0 where a shorter batch was padded.
        """
        texts = check_texts(texts)
        batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
        max_length = check_positive_int(max_length, "max_length", allow_none=True)
        step = len(texts) if batch_size is None else batch_size
        batches = (texts[start : start + step] for start in range(0, len(texts), step))
        return self._run_batches(batches, max_length, with_controllers, **forward_kwargs)

    def infer_texts(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        with_controllers: bool = True,
        **forward_kwargs: Any,
    ) -> Any:
        """The model outputs for ``texts`` (``execute_inference(...)[0]``: ``logits [n_texts, seq, vocab]``)."""
        return self.execute_inference(texts, batch_size, max_length, with_controllers, **forward_kwargs)[0]

    def infer_dataset(
        self,
        dataset: Any,
        batch_size: int = 16,
        max_length: int | None = None,
        with_controllers: bool = True,
        **forward_kwargs: Any,
    ) -> Any:
        """The model outputs over a dataset, one forward pass per ``batch_size`` texts, joined like
        ``execute_inference`` (``logits [n_texts, seq, vocab]``).

        Args:
            dataset: a mi_crow dataset (anything with ``iter_batches(batch_size)``) or a list of str.
            batch_size: texts per forward pass.
            max_length, with_controllers, **forward_kwargs: as in ``execute_inference``.

        All outputs are kept until the end; to stream a large dataset through hooks, use ``iter_inference``.
        """
        batch_size = check_positive_int(batch_size, "batch_size")
        max_length = check_positive_int(max_length, "max_length", allow_none=True)
        if hasattr(dataset, "iter_batches"):
            batches: Iterable[list[str]] = dataset.iter_batches(batch_size)
        else:
            texts = check_texts(dataset, "dataset")
            batches = (texts[start : start + batch_size] for start in range(0, len(texts), batch_size))
        return self._run_batches(batches, max_length, with_controllers, **forward_kwargs)[0]

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
        check_positive_int(max_new_tokens, "max_new_tokens")
        max_length = check_positive_int(max_length, "max_length", allow_none=True)
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
        self._request_hidden_states(generate_kwargs)
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
