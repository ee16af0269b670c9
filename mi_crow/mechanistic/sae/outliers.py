"""The one rule that decides which tokens are attention sinks (norm outliers) for SAE training, hooks and evaluation.

Many language models park a few tokens (often the first of each text) at norms tens to thousands of times the
others'. An SAE cannot reconstruct them and they would dominate the variance, so mi_crow leaves them out of training,
passes them through its hook unchanged and keeps them out of the statistics. Everything that needs the decision
calls `attention_sink_mask`, so a token is a sink (or not) in the same way everywhere.

The reference set is the real (non-padding) tokens of the batch at hand, all rows together: a token is a sink when
its L2 norm exceeds ``factor`` times the median norm of those tokens. Per-row medians would let a one-token text be
its own reference (so its sink is never caught), and padding in the reference would drag the median to whatever the
model leaves at padded positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mi_crow.validation import check_real, check_tensor, fail

__all__ = ["attention_sink_mask"]


@torch.no_grad()
def attention_sink_mask(x: Tensor, attention_mask: Tensor | None = None, *, factor: float | None) -> Tensor:
    """Which tokens are attention sinks: real tokens whose norm exceeds ``factor`` x the median real-token norm.

    The median is taken over every real token of ``x`` at once (all rows of a ``[batch, seq, d]`` batch together),
    as ``torch.median`` takes it: the lower of the two middle values for an even count. A token exactly at
    ``factor`` times the median is not a sink. Padding is never a sink and never part of the reference.

    Args:
        x: ``[..., d]`` token vectors (e.g. ``[tokens, d]`` or ``[batch, seq, d]``), any floating dtype or device.
        attention_mask: ``[...]`` (``x``'s leading shape) with nonzero / True at real tokens; None means every
            token is real.
        factor: the multiple of the median norm above which a token is a sink (a number > 1), or None: no token
            is a sink.

    Returns:
        ``[...]`` bool on ``x``'s device, True at sinks. All False when there is no real token.

    Raises:
        UserInputError / ArgumentTypeError: ``x`` is not a floating tensor with a last dimension, ``attention_mask``
            does not have ``x``'s leading shape, or ``factor`` is not None or a number > 1.
    """
    check_tensor(x, "x", floating=True)
    if x.dim() == 0:
        raise fail("x", "a [..., d] tensor", x)
    check_real(factor, "factor", minimum=1.0, min_inclusive=False, allow_none=True)
    lead = x.shape[:-1]
    if attention_mask is not None:
        check_tensor(attention_mask, "attention_mask")
        if attention_mask.shape != lead:
            raise fail("attention_mask", f"a tensor of x's leading shape {list(lead)}", attention_mask)
    if factor is None:
        return torch.zeros(lead, dtype=torch.bool, device=x.device)
    norms = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32).norm(dim=-1)
    real = torch.ones_like(norms, dtype=torch.bool) if attention_mask is None else attention_mask.to(x.device) != 0
    reference = norms[real]
    if reference.numel() == 0:
        return torch.zeros(lead, dtype=torch.bool, device=x.device)
    return real & (norms > factor * reference.median())
