"""In-memory activation reader with the store reader's interface, and the geometric median used for ``b_dec``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.validation import check_positive_int, check_tensor, fail

__all__ = ["TensorActivationReader", "geometric_median"]


class TensorActivationReader:
    """Serve token vectors of an in-memory ``[tokens, d]`` tensor in batches, like the store's `ActivationReader`.

    One pass over the data (one epoch); shuffled with a seeded permutation; ``state_dict``/``load_state_dict``
    resume exactly after the last batch handed out. Lets `SaeTrainer.train_on_tensor` train without a store run.

    Args:
        data: ``[tokens, d]`` activations (kept by reference, never copied).
        batch_size: tokens per batch (positive int).
        shuffle: shuffle the token order.
        seed: seed of the permutation.
        drop_last: drop a final batch smaller than ``batch_size``.

    Yields:
        ``[batch_size, d]`` tensors (the last one smaller if ``drop_last`` is False).
    """

    def __init__(
        self, data: Tensor, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = True
    ) -> None:
        check_tensor(data, "TensorActivationReader: data", ndim=2, floating=True)
        check_positive_int(batch_size, "TensorActivationReader: batch_size")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.n_tokens = int(data.shape[0])
        self.d_in = int(data.shape[1])
        self._position = 0

    def _order(self) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.n_tokens)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(self.n_tokens, generator=generator)

    def __iter__(self) -> Iterator[Tensor]:
        order = self._order()
        while self._position < self.n_tokens:
            end = min(self._position + self.batch_size, self.n_tokens)
            if end - self._position < self.batch_size and self.drop_last:
                self._position = self.n_tokens
                break
            rows = order[self._position : end].to(self.data.device)
            self._position = end  # advanced before yielding so state_dict() after a batch excludes it
            yield self.data.index_select(0, rows)

    def __len__(self) -> int:
        full, rest = divmod(self.n_tokens, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def state_dict(self) -> dict[str, Any]:
        """Position in the epoch (tokens handed out), plus the settings it depends on."""
        return {"position": self._position, "seed": self.seed, "n_tokens": self.n_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the last batch handed out when ``state`` was taken.

        Raises:
            ValueError: ``state`` belongs to a reader over different data or with another seed.
        """
        if state.get("n_tokens") != self.n_tokens or state.get("seed") != self.seed:
            raise UserInputError(
                f"TensorActivationReader.load_state_dict: state is for n_tokens={state.get('n_tokens')}, "
                f"seed={state.get('seed')}, this reader has n_tokens={self.n_tokens}, seed={self.seed}"
            )
        self._position = int(state["position"])


@torch.no_grad()
def geometric_median(points: Tensor, *, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """Geometric median (the point minimising the sum of Euclidean distances) by Weiszfeld's algorithm.

    Computed in float64; robust to outliers, unlike the mean.

    Args:
        points: ``[tokens, d]``.
        max_iter: iteration cap.
        tol: stop when an update moves the estimate by less than ``tol`` times the data's scale.

    Returns:
        ``[d]`` in ``points.dtype``.
    """
    check_tensor(points, "geometric_median: points", ndim=2)
    if points.shape[0] == 0:
        raise fail("geometric_median: points", "a non-empty [tokens, d] tensor", points)
    p = points.to(torch.float64)
    guess = p.mean(dim=0)
    scale = float((p - guess).norm(dim=1).mean().clamp_min(1e-30))
    for _ in range(max_iter):
        dist = (p - guess).norm(dim=1)
        # A point sitting on the estimate would get an infinite weight; a floor keeps the iteration defined.
        weights = 1.0 / dist.clamp_min(1e-12 * scale)
        new = (weights[:, None] * p).sum(dim=0) / weights.sum()
        moved = float((new - guess).norm())
        guess = new
        if moved < tol * scale:
            break
    return guess.to(points.dtype)
