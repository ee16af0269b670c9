"""`evaluate`: how well an SAE reconstructs a layer and how much of the model's loss survives splicing it in."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.mechanistic.sae.sae import TopKSae
from mi_crow.validation import check_positive_int, fail, fail_type

if TYPE_CHECKING:
    from mi_crow.language_model import LanguageModel

__all__ = ["evaluate"]

logger = logging.getLogger(__name__)


def _text_batches(dataset_or_texts: Any, batch_size: int) -> Iterator[list[str]]:
    if hasattr(dataset_or_texts, "iter_batches"):
        yield from (list(batch) for batch in dataset_or_texts.iter_batches(batch_size))
        return
    if isinstance(dataset_or_texts, str) or not isinstance(dataset_or_texts, Sequence):
        raise ArgumentTypeError(
            "evaluate: dataset_or_texts must be a list of str or a mi_crow dataset (with iter_batches), got "
            f"{type(dataset_or_texts).__name__}"
        )
    bad = [i for i, t in enumerate(dataset_or_texts) if not isinstance(t, str)]
    if bad:
        raise ArgumentTypeError(
            f"evaluate: dataset_or_texts must hold str only; item {bad[0]} is "
            f"{type(dataset_or_texts[bad[0]]).__name__}"
        )
    for start in range(0, len(dataset_or_texts), batch_size):
        yield list(dataset_or_texts[start : start + batch_size])


def _hidden(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _lm_loss_sums(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over positions whose input and target are both real tokens."""
    mask = (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)
    targets = input_ids[:, 1:].to(logits.device)
    pred = logits[:, :-1].float()
    losses = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1), reduction="none")
    mask = mask.to(losses.device).reshape(-1)
    return float(losses[mask].double().sum()), int(mask.sum())


@torch.no_grad()
def evaluate(
    sae: TopKSae,
    lm: LanguageModel,
    dataset_or_texts: Any,
    layer: str | int | None = None,
    *,
    batch_size: int = 8,
    max_length: int | None = 128,
    progress: bool = False,
    outlier_norm_factor: float | None | str = "sae",
) -> dict[str, float]:
    """Evaluate an SAE on a layer of a language model over a set of texts.

    Three forward passes per batch, all without the model's registered controllers (so an attached, steered SAE
    or other controllers do not disturb the measurement): clean; with the layer's output replaced by the SAE's
    reconstruction (the plain SAE, no concept manipulation); and with the layer's output zeroed. Padding is masked
    everywhere: reconstruction statistics count real tokens only, the LM loss counts next-token predictions whose
    input and target are both real tokens, averaged over all such predictions of the dataset.

    Args:
        sae: the SAE (moved to the layer's device for the call).
        lm: the LanguageModel.
        dataset_or_texts: a list of str or a mi_crow dataset (anything with ``iter_batches(batch_size)``).
        layer: layer name or block index; defaults to the layer recorded in ``sae.metadata`` (set by training).
        batch_size: texts per forward pass.
        max_length: truncate texts to this many tokens (None = the model's maximum).
        progress: show a progress bar.
        outlier_norm_factor: real tokens whose norm exceeds this multiple of the median norm of their text's real
            tokens (attention sinks) are left unchanged in the spliced and the zero-ablated passes and out of the
            reconstruction statistics, as in training. ``"sae"`` uses the SAE's own ``outlier_norm_factor``; None
            acts on every token.

    Returns:
        A dict with ``fvu`` (sum of squared errors / sum of squared deviations from the mean over all real tokens),
        ``mse`` (per element), ``l0`` (mean active latents per token), ``dead_fraction`` (latents never active on
        the evaluation set), ``loss_clean``, ``loss_sae``, ``loss_zero`` (mean next-token cross-entropy in nats),
        ``loss_recovered`` = ``(loss_zero - loss_sae) / (loss_zero - loss_clean)``, ``delta_loss`` =
        ``loss_sae - loss_clean``, ``n_tokens`` (real tokens the SAE acted on), ``n_outlier_tokens`` and
        ``n_predictions``.

    Raises:
        TypeError / ValueError: bad arguments, no layer known, an SAE width different from the layer's (both
            numbers named), no text.
    """
    if not isinstance(sae, TopKSae):
        raise fail_type("evaluate: sae", "a TopKSae", sae)
    check_positive_int(batch_size, "evaluate: batch_size")
    check_positive_int(max_length, "evaluate: max_length", allow_none=True)
    if not (hasattr(lm, "layers") and hasattr(lm, "inference") and hasattr(lm, "tokenize")):
        raise fail_type("evaluate: lm", "a mi_crow LanguageModel", lm)
    if layer is None:
        layer = sae.metadata.get("layer")
        if layer is None:
            raise UserInputError("evaluate: layer is None and the SAE records no layer; pass layer=")
    name = lm.layers.resolve(layer)
    width = lm.layers.width(name)
    if width != sae.n_inputs:
        raise UserInputError(
            f"evaluate: sae.n_inputs={sae.n_inputs} does not match the width of layer {name!r}, {width}"
        )
    if outlier_norm_factor == "sae":
        outlier_norm_factor = sae.outlier_norm_factor
    if outlier_norm_factor is not None and (
        isinstance(outlier_norm_factor, (str, bool)) or not isinstance(outlier_norm_factor, (int, float))
        or not outlier_norm_factor > 1
    ):
        raise fail("evaluate: outlier_norm_factor", "'sae', None or a number > 1", outlier_norm_factor)
    module = lm.layers.get_module(name)
    sae.to(lm.layers.layer_device(name))

    stats = {
        "sse": torch.zeros((), dtype=torch.float64),
        "sum_x": torch.zeros(sae.n_inputs, dtype=torch.float64),
        "sum_sq": torch.zeros((), dtype=torch.float64),
        "active": torch.zeros((), dtype=torch.float64),
        "fired": torch.zeros(sae.n_latents, dtype=torch.bool),
    }
    n_tokens = 0
    n_outliers = 0
    mask_holder: dict[str, Tensor] = {}

    def acted_on(hidden: Tensor) -> Tensor:
        """[batch, seq] bool: real tokens that are not norm outliers of their text."""
        real = mask_holder["mask"].to(hidden.device).bool()
        if outlier_norm_factor is None:
            return real
        norms = hidden.detach().float().norm(dim=-1).masked_fill(~real, float("nan"))
        median = norms.nanmedian(dim=1, keepdim=True).values
        return real & (norms <= outlier_norm_factor * median)

    def splice(module_: Any, args: Any, output: Any) -> Any:
        nonlocal n_tokens, n_outliers
        hidden = _hidden(output)
        out = sae(hidden)
        real = acted_on(hidden)
        n_outliers += int(mask_holder["mask"].bool().sum()) - int(real.sum())
        x = hidden[real].double().cpu()
        recon = torch.where(real.unsqueeze(-1), out.reconstruction.to(hidden.dtype), hidden)
        err = x - recon[real].double().cpu()
        values = out.code.values[real]
        indices = out.code.indices[real]
        stats["sse"] += err.pow(2).sum()
        stats["sum_x"] += x.sum(dim=0)
        stats["sum_sq"] += x.pow(2).sum()
        active = values > 0
        stats["active"] += float(active.sum())
        stats["fired"][indices[active].cpu()] = True
        n_tokens += int(x.shape[0])
        return _with_hidden(output, recon)

    def zero(module_: Any, args: Any, output: Any) -> Any:
        hidden = _hidden(output)
        return _with_hidden(output, torch.where(acted_on(hidden).unsqueeze(-1), torch.zeros_like(hidden), hidden))

    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_pred = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"evaluate SAE on {name}", unit="text")
    for texts in _text_batches(dataset_or_texts, batch_size):
        if not texts:
            continue
        encodings = lm.tokenize(texts, max_length=max_length, padding_side="right")
        mask_holder["mask"] = encodings["attention_mask"]
        passes: tuple[tuple[str, Callable[..., Any] | None], ...] = (("clean", None), ("sae", splice), ("zero", zero))
        for label, hook in passes:
            handle = module.register_forward_hook(hook) if hook is not None else None
            try:
                outputs = lm.inference.forward_encoded(texts, encodings, with_controllers=False)
            finally:
                if handle is not None:
                    handle.remove()
            total, count = _lm_loss_sums(outputs.logits, encodings["input_ids"], encodings["attention_mask"])
            sums[label] += total
            if label == "clean":
                n_pred += count
        if bar is not None:
            bar.update(len(texts))
    if bar is not None:
        bar.close()
    if n_tokens == 0:
        raise UserInputError("evaluate: dataset_or_texts yielded no tokens")
    if n_pred == 0:
        raise UserInputError("evaluate: no next-token prediction to score (every text is a single token)")

    mean = stats["sum_x"] / n_tokens
    total_var = float(stats["sum_sq"] - n_tokens * mean.pow(2).sum())
    loss_clean, loss_sae, loss_zero = (sums[key] / n_pred for key in ("clean", "sae", "zero"))
    gap = loss_zero - loss_clean
    if abs(gap) < 1e-12:
        logger.warning("evaluate: zero-ablating %s does not change the loss; loss_recovered is undefined", name)
    return {
        "fvu": float(stats["sse"]) / total_var if total_var > 0 else float("nan"),
        "mse": float(stats["sse"]) / (n_tokens * sae.n_inputs),
        "l0": float(stats["active"]) / n_tokens,
        "dead_fraction": 1.0 - float(stats["fired"].float().mean()),
        "loss_clean": loss_clean,
        "loss_sae": loss_sae,
        "loss_zero": loss_zero,
        "loss_recovered": (loss_zero - loss_sae) / gap if abs(gap) >= 1e-12 else float("nan"),
        "delta_loss": loss_sae - loss_clean,
        "n_tokens": float(n_tokens),
        "n_outlier_tokens": float(n_outliers),
        "n_predictions": float(n_pred),
    }
