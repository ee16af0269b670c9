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

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.base import SaeBase, SparseCode
from mi_crow.validation import check_bool, check_tensor, fail_type, resolve_synonym

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.config import SaeTrainingConfig
    from mi_crow.mechanistic.sae.train import StepInfo, TrainingResult
    from mi_crow.store import Store

__all__ = ["PairedReader", "Transcoder"]


class PairedReader:
    """Two activation readers of one run read in step (same seed, same token order), yielding ``[B, d_in + d_out]``
    rows ``[input | target]``: the batch layout a `Transcoder` trains on.

    ``d_in`` is the input reader's width (what the trainer compares with ``n_inputs``); ``n_tokens`` its count.
    """

    def __init__(self, inputs: Any, targets: Any) -> None:
        self.inputs = inputs
        self.targets = targets
        self.n_tokens = inputs.n_tokens
        self.d_in = inputs.d_in
        if getattr(targets, "n_tokens", self.n_tokens) != self.n_tokens:
            raise UserInputError(
                f"Transcoder: the input and target layers hold different token counts ({self.n_tokens} and "
                f"{targets.n_tokens}); they must come from one activation run"
            )

    def __iter__(self) -> Iterator[Tensor]:
        for x, y in zip(self.inputs, self.targets, strict=True):
            yield torch.cat([x, y.to(x.dtype)], dim=1)

    def state_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs.state_dict(), "targets": self.targets.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inputs.load_state_dict(state["inputs"])
        self.targets.load_state_dict(state["targets"])


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
        hooked = self._hook_code(x_in)
        if hooked is None:
            return None
        code, x, keep, modified = hooked
        y = output.to(device=self.device, dtype=self.dtype)
        if modified is None:
            new = self.predict(x, code)
        elif self.mode == "replace":
            new = self.predict(x, SparseCode(modified[0], modified[1]))
        else:
            # Observe: the output plus the change the manipulation makes to the prediction (the skip term and the
            # decoder bias cancel in the difference).
            new = y + (self.decode(SparseCode(modified[0], modified[1])) - self.decode(code))
        if keep is not None:
            new = torch.where(keep.unsqueeze(-1), new, y)
        return new.to(device=output.device, dtype=output.dtype)

    # -- training -------------------------------------------------------------------------------------------------
    def train(  # type: ignore[override]
        self,
        store: Store | bool = True,
        run_id: str | None = None,
        layer_signature: str | None = None,
        config: SaeTrainingConfig | None = None,
        *,
        target_layer: str | None = None,
        layer: str | None = None,
        callbacks: Sequence[Callable[[StepInfo], None]] = (),
    ) -> Transcoder | TrainingResult:
        """Train on a stored activation run holding both the input layer and the target layer (saved from the same
        forward passes, e.g. ``lm.save_activations(..., layers=[input, target])``), or set the module's training
        flag (``tc.train()`` / ``tc.train(False)``).

        The two layers are read in step (same seed, so the same token order) and trained through `SaeTrainer`
        (`SaeTrainer.train_from_reader`): the encoder reads the input, the decoder (and skip term) predicts the
        target, the FVU is against the target's variance, and the decoder starts at zero and keeps free row norms.

        Args:
            store: the store (or a bool: nn.Module training mode).
            run_id: the activation run.
            layer_signature: the input layer (``layer`` is a synonym).
            config: `SaeTrainingConfig`.
            target_layer: the target layer (required).
            callbacks: as for `SaeTrainer.train`.

        Raises:
            UserInputError: unknown run, a run that lacks the input or the target layer, or a layer whose width
                differs from ``n_inputs`` / ``n_outputs`` (each names the argument and the value).
        """
        if isinstance(store, bool):
            return nn.Module.train(self, store)
        from mi_crow.mechanistic.sae.train import SaeTrainer
        from mi_crow.mechanistic.sae.train.trainer import _stored_layer_name

        layer_signature = resolve_synonym("layer_signature", layer_signature, "layer", layer)
        if run_id is None or layer_signature is None or target_layer is None:
            raise UserInputError(
                f"Transcoder.train: run_id, layer_signature and target_layer are required, got run_id={run_id!r}, "
                f"layer_signature={layer_signature!r}, target_layer={target_layer!r}"
            )
        trainer = SaeTrainer(self, store)
        config = trainer._check_config(config)
        runs = store.list_runs()
        if run_id not in runs:
            raise UserInputError(f"Transcoder.train: unknown activation run_id {run_id!r}; runs in the store: {runs}")
        meta = store.read_run_meta(run_id)
        dims = meta.get("layer_dims", {})
        names = {}
        for arg, name, width, what in (("layer_signature", layer_signature, self.n_inputs, "n_inputs"),
                                       ("target_layer", target_layer, self.n_outputs, "n_outputs")):
            stored = _stored_layer_name(name, dims)
            if stored not in dims:
                raise UserInputError(
                    f"Transcoder.train: {arg}={name!r} is not stored in run {run_id!r}; stored layers: {sorted(dims)}"
                    + (" (save both layers from the same forward passes)" if arg == "target_layer" else "")
                )
            if int(dims[stored]) != width:
                raise UserInputError(
                    f"Transcoder.train: {arg}={name!r} of run {run_id!r} has width {dims[stored]} but the transcoder "
                    f"has {what}={width}"
                )
            names[arg] = stored

        def reader(name: str, batch: int, **kwargs: Any) -> Any:
            return store.activation_reader(run_id, name, batch, dtype=self.dtype, **kwargs)

        def factory(epoch: int) -> PairedReader:
            kwargs: dict[str, Any] = {"shuffle": config.shuffle, "seed": config.seed + epoch, "drop_last": True}
            if config.shuffle_buffer_tokens is not None:
                kwargs["buffer_tokens"] = config.shuffle_buffer_tokens
            return PairedReader(reader(names["layer_signature"], config.batch_size, **kwargs),
                                reader(names["target_layer"], config.batch_size, **kwargs))

        def sample() -> PairedReader:
            size = config.b_dec_init_tokens
            kwargs = {"shuffle": True, "seed": config.seed, "buffer_tokens": size, "drop_last": False}
            batch = min(config.batch_size, size)
            return PairedReader(reader(names["layer_signature"], batch, **kwargs),
                                reader(names["target_layer"], batch, **kwargs))

        self.metadata["target_layer"] = names["target_layer"]
        return trainer.train_from_reader(
            factory, config, run_id=run_id, layer=names["layer_signature"],
            model_id=meta.get("model_id", meta.get("model_name")), callbacks=callbacks, sample_reader=sample,
        )

    def train_on_tensors(
        self,
        inputs: Tensor,
        targets: Tensor,
        config: SaeTrainingConfig | None = None,
        *,
        callbacks: Sequence[Callable[[StepInfo], None]] = (),
    ) -> TrainingResult:
        """Train on in-memory paired activations through `SaeTrainer` (same recipe as `train`).

        Args:
            inputs: ``[tokens, n_inputs]``; targets: ``[tokens, n_outputs]`` (row ``i`` of both from one token).
        """
        from mi_crow.mechanistic.sae.data import TensorActivationReader
        from mi_crow.mechanistic.sae.train import SaeTrainer

        check_tensor(inputs, "Transcoder.train_on_tensors: inputs", ndim=2, shape=(None, self.n_inputs))
        check_tensor(targets, "Transcoder.train_on_tensors: targets", ndim=2, shape=(inputs.shape[0], self.n_outputs))
        trainer = SaeTrainer(self)
        config = trainer._check_config(config)
        both = torch.cat([inputs, targets.to(inputs.dtype)], dim=1)

        def factory(epoch: int) -> Any:
            r = TensorActivationReader(both, config.batch_size, shuffle=config.shuffle, seed=config.seed + epoch,
                                       drop_last=True)
            r.d_in = self.n_inputs  # the trainer checks the encoder's width; rows carry [input | target]
            return r

        return trainer.train_from_reader(factory, config, callbacks=callbacks)

    def _arch_config(self) -> dict[str, Any]:
        return {"target_layer": self.metadata.get("target_layer"), "n_outputs": self.n_outputs, "skip": self.skip, "batch_topk": self.batch_topk}

    @classmethod
    def from_config(cls, config: dict[str, Any], dtype: torch.dtype) -> Transcoder:
        out = cls(
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
        out.metadata["target_layer"] = config.get("target_layer")
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", skip={self.skip}, batch_topk={self.batch_topk}"
