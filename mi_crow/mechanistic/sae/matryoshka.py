"""`MatryoshkaSae`: Matryoshka SAE (Bussmann et al., 2025; Nabeshima, 2024): nested prefixes of the dictionary
each reconstruct the input, the loss sums the prefix losses.

The latents are ordered in groups ``group_sizes`` (summing to ``n_latents``); prefix ``m`` is the first
``group_sizes[0] + ... + group_sizes[m]`` latents. With a sparse code, the reconstruction of prefix ``m`` is the
sparse decode of the code with the slots of later latents masked to 0. Selection per token (TopK) or per batch
(BatchTopK, the default, with a threshold at inference).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.base import SaeBase
from mi_crow.validation import check_bool, fail_type

__all__ = ["MatryoshkaSae", "check_group_sizes"]


def check_group_sizes(group_sizes: Any, n_latents: int, argument: str = "MatryoshkaSae: group_sizes") -> list[int]:
    """``group_sizes`` as a list of positive ints summing to ``n_latents`` (so the prefixes strictly increase).

    Raises:
        ArgumentTypeError: not a sequence of ints.
        UserInputError: empty, a size < 1 (a prefix that does not increase) or a sum other than ``n_latents``.
    """
    if isinstance(group_sizes, (str, bytes)) or not isinstance(group_sizes, Sequence):
        raise fail_type(argument, "a sequence of positive ints summing to n_latents", group_sizes)
    sizes = list(group_sizes)
    if not sizes:
        raise UserInputError(f"{argument} must hold at least one group size, got {group_sizes!r}")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int):
            raise fail_type(argument, "a sequence of ints", group_sizes)
        if s < 1:
            raise UserInputError(
                f"{argument} must be positive group sizes (each prefix strictly larger than the last), got "
                f"{sizes!r}"
            )
    if sum(sizes) != n_latents:
        raise UserInputError(
            f"{argument} must sum to n_latents={n_latents} (they are the sizes of the groups, not the prefix widths), "
            f"got {sizes!r} summing to {sum(sizes)}"
        )
    return sizes


class MatryoshkaSae(SaeBase):
    """Matryoshka SAE: the loss sums the reconstruction losses of nested prefixes of the dictionary.

    Parameters as in `TopKSae`; with ``batch_topk=True`` (default) a 0-d ``threshold`` buffer as in `BatchTopKSae`.
    Inference is that of the selection (threshold, or per-token top-k); the groups only matter for training.

    Args:
        n_latents, n_inputs, k: as for `TopKSae`.
        group_sizes: sizes of the nested groups, positive, summing to ``n_latents``; prefix ``m`` is the first
            ``sum(group_sizes[:m + 1])`` latents.
        batch_topk: BatchTopK selection (else per-token TopK).
        device, dtype, mode, layer_signature, hook_id: as for `TopKSae`.
    """

    architecture: ClassVar[str] = "matryoshka"

    def __init__(
        self,
        n_latents: int,
        n_inputs: int,
        k: int,
        group_sizes: Sequence[int],
        batch_topk: bool = True,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        mode: str = "observe",
        layer_signature: str | int | None = None,
        hook_id: str | None = None,
    ) -> None:
        self.batch_topk = check_bool(batch_topk, "MatryoshkaSae: batch_topk")
        self.selection = "batchtopk" if self.batch_topk else "topk"
        super().__init__(
            n_latents, n_inputs, k, device, dtype, mode=mode, layer_signature=layer_signature, hook_id=hook_id
        )
        self.group_sizes = check_group_sizes(group_sizes, n_latents)

    @property
    def prefix_sizes(self) -> list[int]:
        """Cumulative widths of the nested prefixes (the last is ``n_latents``)."""
        out, total = [], 0
        for s in self.group_sizes:
            total += s
            out.append(total)
        return out

    def _arch_config(self) -> dict[str, Any]:
        return {"group_sizes": list(self.group_sizes), "batch_topk": self.batch_topk}

    @classmethod
    def from_config(cls, config: dict[str, Any], dtype: torch.dtype) -> MatryoshkaSae:
        return cls(
            config["n_latents"],
            config["n_inputs"],
            config["k"],
            config["group_sizes"],
            batch_topk=bool(config.get("batch_topk", True)),
            dtype=dtype,
            mode=config.get("mode", "observe"),
            layer_signature=config.get("layer"),
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_sizes={self.group_sizes}, batch_topk={self.batch_topk}"
