"""`Transcoder`: a sparse dictionary that reads one activation and predicts another (Dunefsky et al., 2024), with
an optional linear skip term (skip transcoders, Paulo et al., 2025).

``pre = x @ W_enc.T + b_enc`` (no input shift), ``code = select(pre)`` (per-token top-k, or BatchTopK) and
``y_hat = b_dec + sum_j values_j * W_dec[idx_j] (+ x @ W_skip.T)``. The decoder (and the skip matrix) start at
zero, as the literature does.

Attached to a model the transcoder hooks the module whose *output* is its target; by default it reads that module's
first input (for an MLP transcoder: hook the MLP, read its input, predict its output). ``mode="observe"`` leaves
the output untouched (the codes feed concept tracking); ``mode="replace"`` substitutes the prediction; concept
manipulations add the change of the prediction.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.base import SaeBase, SparseCode, _zero_outliers
from mi_crow.validation import check_bool, fail_type

__all__ = ["Transcoder"]


class Transcoder(SaeBase):
    """Transcoder (and skip transcoder): sparse code of ``x`` that predicts a target ``y``.

    Parameters: ``W_enc [n, d_in]``, ``b_enc [n]``, ``W_dec [n, d_out]``, ``b_dec [d_out]`` and, with
    ``skip=True``, ``W_skip [d_out, d_in]`` (the layout of ``nn.Linear(d_in, d_out).weight``). With
    ``batch_topk=True`` a 0-d ``threshold`` buffer as in `BatchTopKSae`.

    Args:
        n_latents: dictionary size ``n``.
        n_inputs: input width ``d_in``.
        n_outputs: target width ``d_out``.
        k: active latents per token (the mean, with ``batch_topk``).
        skip: add the linear skip term ``x @ W_skip.T``.
        batch_topk: train with the batch-wide selection (then infer with the threshold).
        device, dtype, mode, layer_signature, hook_id: as for `TopKSae`.
    """

    architecture: ClassVar[str] = "transcoder"

    def __init__(
        self,
        n_latents: int,
        n_inputs: int,
        n_outputs: int,
        k: int,
        skip: bool = False,
        batch_topk: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        mode: str = "observe",
        layer_signature: str | int | None = None,
        hook_id: str | None = None,
    ) -> None:
        self.skip = check_bool(skip, "Transcoder: skip")
        self.batch_topk = check_bool(batch_topk, "Transcoder: batch_topk")
        self.selection = "batchtopk" if self.batch_topk else "topk"
        super().__init__(
            n_latents, n_inputs, k, device, dtype, n_outputs=n_outputs, mode=mode, layer_signature=layer_signature,
            hook_id=hook_id,
        )

    def _init_extra(self, device: torch.device, dtype: torch.dtype) -> None:
        super()._init_extra(device, dtype)
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(self.n_outputs, self.n_inputs, device=device, dtype=dtype))
        else:
            self.W_skip = None

    @property
    def is_transcoder(self) -> bool:
        return True

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm encoder rows, zero decoder, zero skip matrix, zero biases."""
        w = torch.randn(self.n_latents, self.n_inputs, generator=generator, dtype=torch.float32)
        self.W_enc.copy_(w / w.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.W_dec.zero_()
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()

    def skip_term(self, x: Tensor) -> Tensor | None:
        """``x @ W_skip.T`` (``[..., n_outputs]``), or None without a skip matrix."""
        if self.W_skip is None:
            return None
        (W_skip,) = self._weights("W_skip")
        return x.to(device=self.device, dtype=self.dtype) @ W_skip.t()

    def predict(self, x: Tensor, code: SparseCode) -> Tensor:
        """``decode(code)`` plus the skip term of ``x``: ``[..., n_outputs]``."""
        out = self.decode(code)
        skip = self.skip_term(x)
        return out if skip is None else out + skip

    def modify_activations(self, module: nn.Module, inputs: Any, output: Any) -> Tensor | None:
        """Forward-hook body on the target module: encode its first input, predict its output.

        Returns:
            None (observe, nothing manipulated), the prediction (replace), or ``output`` plus the change of the
            prediction made by concept manipulations (observe with manipulations).
        """
        if not isinstance(output, Tensor):
            raise fail_type("Transcoder: the hooked layer's output", "a tensor", output)
        x_in = inputs[0] if isinstance(inputs, (tuple, list)) and inputs else inputs
        if not isinstance(x_in, Tensor):
            raise fail_type("Transcoder: the hooked layer's first input", "a tensor", x_in)
        if x_in.shape[-1] != self.n_inputs:
            raise UserInputError(
                f"Transcoder: the hooked layer's input width {x_in.shape[-1]} does not match n_inputs="
                f"{self.n_inputs}"
            )
        if output.shape[-1] != self.n_outputs:
            raise UserInputError(
                f"Transcoder: the hooked layer's output width {output.shape[-1]} does not match n_outputs="
                f"{self.n_outputs}"
            )
        concepts = self.concepts
        if self.mode == "observe" and not concepts.tracking_enabled and not concepts.has_manipulations:
            return None
        code = self.encode(x_in)
        x = x_in.to(device=self.device, dtype=self.dtype)
        keep = self.inlier_mask(x)
        if concepts.tracking_enabled:
            concepts.observe(_zero_outliers(code.values, keep), code.indices, self.context)
        modified = concepts.modify_code(code.values, code.indices)
        if modified is None and self.mode == "observe":
            return None
        y = output.to(device=self.device, dtype=self.dtype)
        if modified is None:
            new = self.predict(x, code)
        else:
            new_pred = self.predict(x, SparseCode(modified[0], modified[1]))
            new = new_pred if self.mode == "replace" else y + (self.decode(SparseCode(modified[0], modified[1]))
                                                               - self.decode(code))
        if keep is not None:
            new = torch.where(keep.unsqueeze(-1), new, y)
        return new.to(device=output.device, dtype=output.dtype)

    def _arch_config(self) -> dict[str, Any]:
        return {"n_outputs": self.n_outputs, "skip": self.skip, "batch_topk": self.batch_topk}

    @classmethod
    def from_config(cls, config: dict[str, Any], dtype: torch.dtype) -> Transcoder:
        return cls(
            config["n_latents"],
            config["n_inputs"],
            config["n_outputs"],
            config["k"],
            skip=bool(config.get("skip", False)),
            batch_topk=bool(config.get("batch_topk", False)),
            dtype=dtype,
            mode=config.get("mode", "observe"),
            layer_signature=config.get("layer"),
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", skip={self.skip}, batch_topk={self.batch_topk}"
