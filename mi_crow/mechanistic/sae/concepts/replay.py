"""Top texts from a stored activation run, without running the model again.

A run saved by ``lm.activations.save`` holds each batch's layer activations and token ids. Encoding those
activations with the SAE and feeding the codes to ``sae.concepts`` with the batch's context gives exactly what a
forward pass with the SAE attached would have given (the same tokens, the same code, the same masks), at the cost
of an encoder pass instead of a model pass.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.concepts.quantiles import ActivationSampler

__all__ = ["track_from_run"]


def track_from_run(
    lm: Any,
    sae: Any,
    run_id: str,
    layer: str,
    texts: Sequence[str],
    top_k: int,
    *,
    progress: bool = False,
    sample_quantiles: bool = True,
) -> int:
    """Collect ``sae.concepts``' top texts by replaying a stored activation run through the SAE.

    Turns text tracking on (``sae.concepts.enable_text_tracking(top_k)``) and observes every complete batch of the
    run; tracking stays on afterwards, as after live inference.

    Args:
        lm: the ``LanguageModel`` the run was saved with; its ``store`` holds the run, its tokenizer checks the texts
            and builds each batch's context (special tokens, token strings).
        sae: the ``TopKSae`` whose concepts are collected; ``n_inputs`` must be the layer's width.
        run_id: the activation run in ``lm.store``.
        layer: the layer stored in the run.
        texts: the run's texts in the order they were saved (``store.batch_text_indices(run_id, i)`` says which
            texts batch ``i`` holds).
        top_k: texts kept per feature.
        progress: show a progress bar over the batches.
        sample_quantiles: also sample examples across each feature's activation range into a fresh
            ``sae.concepts.activation_sampler`` (an :class:`~mi_crow.mechanistic.sae.concepts.quantiles.
            ActivationSampler` whose text indices point into ``texts``).

    Returns:
        The number of real (non-padding) tokens observed.

    Raises:
        UserInputError: ``texts`` are not the run's texts (the first batch's token ids differ, or a batch's size or
            token ids do not match).
    """
    from tqdm.auto import tqdm  # a progress bar only for callers that ask for one

    store = lm.store
    meta = store.read_run_meta(run_id)
    max_length = int(meta["max_length"])
    texts = list(texts)
    sae.concepts.enable_text_tracking(top_k=top_k)
    sampler = ActivationSampler(sae.n_latents) if sample_quantiles else None
    sae.concepts.activation_sampler = sampler
    seen = 0
    batches = store.list_batches(run_id)
    with torch.no_grad():
        for i in tqdm(batches, desc="top texts", unit="batch", disable=None if progress else True):
            text_rows = store.batch_text_indices(run_id, i)  # format 2 batches may hold any texts of the dataset
            batch_texts = [texts[j] for j in text_rows if j < len(texts)]
            acts, mask = store.load_batch(run_id, i, layer)
            ids = store.load_batch_extra(run_id, i).get("input_ids")
            if ids is None or len(batch_texts) != acts.shape[0]:
                raise UserInputError(
                    f"run {run_id!r} batch {i} does not match the dataset given; pass the same --dataset"
                )
            if i == batches[0]:
                check = lm.tokenize(batch_texts, max_length=max_length, padding_side="right")["input_ids"]
                if tuple(check.shape) != tuple(ids.shape) or not torch.equal(check, ids):
                    raise UserInputError(f"the texts given are not the texts of run {run_id!r}; pass the same "
                                         f"--dataset and --limit as when it was saved")
            code = sae.encode(acts.to(sae.dtype))
            context = lm.inference.make_context(batch_texts, ids, mask)
            inliers = sae.inlier_values(acts, code.values, mask)
            sae.concepts.observe(inliers, code.indices, context)
            if sampler is not None:
                real = mask.bool()
                valid = real & ~context.special_tokens_mask.to(real.device).bool()
                rows = torch.as_tensor(list(text_rows), dtype=torch.long)  # the dataset index of each text
                sampler.update(inliers, code.indices, valid, rows, real.long().cumsum(dim=1) - 1, ids)
            seen += int(mask.sum())
    return seen
