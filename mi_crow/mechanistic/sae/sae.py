"""`TopKSae`: a TopK sparse autoencoder that is also a hook on a language-model layer."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

import mi_crow
from mi_crow import ops
from mi_crow.errors import UserInputError
from mi_crow.hooks import Controller, HookType
from mi_crow.mechanistic.sae.outliers import attention_sink_mask
from mi_crow.mechanistic.sae.concepts import AutoencoderConcepts
from mi_crow.mechanistic.sae.saving import load_sae, load_sae_from_dir, save_sae
from mi_crow.ops.memory import empty_huge
from mi_crow.validation import check_choice, check_positive_int, fail, fail_type

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.config import SaeTrainingConfig
    from mi_crow.mechanistic.sae.train import TrainingResult
    from mi_crow.store import Store

__all__ = ["SaeOutput", "SparseCode", "TopKSae"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MODES = ("observe", "replace")


class SparseCode(NamedTuple):
    """A TopK code: the ``k`` active latents of each token.

    Attributes:
        values: ``[..., k]`` activations after ReLU (may be 0), sorted descending.
        indices: ``[..., k]`` int64 latent indices.
    """

    values: Tensor
    indices: Tensor


class SaeOutput(NamedTuple):
    """Result of `TopKSae.forward`.

    Attributes:
        reconstruction: ``[..., n_inputs]`` decoded input.
        code: the `SparseCode` (``[..., k]`` values and indices).
    """

    reconstruction: Tensor
    code: SparseCode


class TopKSae(nn.Module, Controller):
    """TopK sparse autoencoder (Gao et al., 2024) that can be attached to a layer as a forward hook.

    ``code = topk(relu((x - b_dec) @ W_enc.T + b_enc), k)`` and ``x_hat = b_dec + sum_j values_j * W_dec[idx_j]``.
    The encoder, top-k and sparse decoder run on the `mi_crow.ops` kernels (C++ on CPU, Triton on CUDA).

    Attached to a layer (``lm.attach_sae(sae, layer)``) the SAE encodes every token of the layer's output:
    - ``mode="observe"`` (default) and no concept manipulation: the output is returned untouched (bit-exact); the
      codes only feed concept tracking;
    - with manipulations (``sae.concepts``): ``output + decode(modified code) - decode(code)``, so the
      reconstruction error is kept and only the change is added;
    - ``mode="replace"``: the output is replaced by the reconstruction (of the modified code, if any).
    The SAE computes in its own dtype and casts its result back to the layer's dtype (bf16 models work).

    Args:
        n_latents: dictionary size ``n`` (positive int).
        n_inputs: input width ``d`` (positive int), the hidden size of the layer it reads.
        k: active latents per token, ``1 <= k <= n_latents``; used everywhere (encode, training, hooks).
        device: where the parameters live.
        dtype: floating dtype of the parameters.
        mode: ``"observe"`` or ``"replace"`` (see above).
        layer_signature: the layer this SAE belongs to (set by ``lm.attach_sae``; also saved with the SAE).
        hook_id: the hook id (random when omitted).

    Parameters (``nn.Parameter``): ``W_enc [n, d]``, ``b_enc [n]``, ``W_dec [n, d]`` with unit-norm rows,
    ``b_dec [d]``.

    Raises:
        TypeError / ValueError: a size is not a positive int, ``k > n_latents``, an unknown mode or a non-floating
            dtype.
    """

    def __init__(
        self,
        n_latents: int,
        n_inputs: int,
        k: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        mode: str = "observe",
        layer_signature: str | int | None = None,
        hook_id: str | None = None,
    ) -> None:
        for name, value in (("n_latents", n_latents), ("n_inputs", n_inputs), ("k", k)):
            check_positive_int(value, f"TopKSae: {name}")
        if k > n_latents:
            raise fail("TopKSae: k", f"<= n_latents={n_latents}", k)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise fail_type("TopKSae: dtype", "a floating torch.dtype", dtype)
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise fail("TopKSae: device", "a torch device or its name", device) from exc
        nn.Module.__init__(self)
        Controller.__init__(self, layer_signature=layer_signature, hook_type=HookType.FORWARD, hook_id=hook_id)
        self.n_latents = n_latents
        self.n_inputs = n_inputs
        self.k = k
        self.mode = mode
        self.W_enc = nn.Parameter(empty_huge(n_latents, n_inputs, device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n_latents, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(empty_huge(n_latents, n_inputs, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(n_inputs, device=device, dtype=dtype))
        self.reset_parameters()
        # What the SAE was trained on; written to config.json by `save`.
        self.metadata: dict[str, Any] = {
            "layer": layer_signature,
            "model_id": None,
            "activation_run_id": None,
            "training_run_id": None,
        }
        self.outlier_norm_factor: float | None = None
        # The concepts package reads the SAE through its attributes only and never imports this module, so the
        # import above is one-way.
        self.concepts = AutoencoderConcepts(self)

    # -- construction helpers ---------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw fresh weights: random unit-norm decoder rows, encoder = decoder transpose, zero biases.

        Args:
            generator: optional CPU generator for reproducible weights (the global RNG otherwise).
        """
        w = torch.randn(self.n_latents, self.n_inputs, generator=generator, dtype=torch.float32)
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # -- properties ---------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """``"observe"`` (leave the layer output unchanged unless concepts are manipulated) or ``"replace"``."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = check_choice(value, "TopKSae.mode", _MODES)

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the parameters (the dtype the SAE computes in)."""
        return self.W_dec.dtype

    # -- core ---------------------------------------------------------------------------------------------------
    def _check_input(self, x: Any, name: str = "x") -> Tensor:
        if not isinstance(x, Tensor):
            raise fail_type(f"TopKSae: {name}", "a torch.Tensor", x)
        if not x.is_floating_point():
            raise fail_type(f"TopKSae: {name}", "a floating tensor", x)
        if x.dim() == 0 or x.shape[-1] != self.n_inputs:
            raise UserInputError(
                f"TopKSae: {name} must have shape [..., n_inputs={self.n_inputs}], got {tuple(x.shape)}"
            )
        return x.to(device=self.device, dtype=self.dtype)

    def _weights(self, *names: str) -> tuple[Tensor, ...]:
        # Without grad mode (inference, hooks) the autograd wrapper of the ops would be pure overhead.
        if torch.is_grad_enabled():
            return tuple(getattr(self, name) for name in names)
        return tuple(getattr(self, name).detach() for name in names)

    def encode(self, x: Tensor) -> SparseCode:
        """Encode inputs into their TopK code.

        Args:
            x: ``[..., n_inputs]`` inputs (any leading shape; cast to the SAE's device and dtype).

        Returns:
            `SparseCode` with ``values [..., k]`` (after ReLU, sorted descending) and ``indices [..., k]`` int64.
        """
        x = self._check_input(x)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.n_inputs)
        W_enc, b_enc, b_dec = self._weights("W_enc", "b_enc", "b_dec")
        code = ops.topk_encode(flat, W_enc, b_enc, b_dec, self.k)
        return SparseCode(code.values.reshape(*lead, self.k), code.indices.reshape(*lead, self.k))

    def dense(self, code: SparseCode | tuple[Tensor, Tensor]) -> Tensor:
        """Dense view of a sparse code.

        Args:
            code: values and indices ``[..., k']``.

        Returns:
            ``[..., n_latents]`` with the code values scattered at their indices, zeros elsewhere.
        """
        values, indices = self._unpack_code(code)
        out = values.new_zeros(*values.shape[:-1], self.n_latents)
        return out.scatter_add(-1, indices, values)

    def encode_dense(self, x: Tensor) -> Tensor:
        """``dense(encode(x))``: ``[..., n_inputs]`` -> ``[..., n_latents]``."""
        return self.dense(self.encode(x))

    def _unpack_code(self, code: Any) -> tuple[Tensor, Tensor]:
        try:
            values, indices = code[0], code[1]
        except (TypeError, IndexError, KeyError):
            raise fail_type("TopKSae: code", "a SparseCode or a (values, indices) pair", code) from None
        if not isinstance(values, Tensor) or not isinstance(indices, Tensor):
            raise fail_type("TopKSae: code", "a pair of tensors (values, indices)", code)
        if values.shape != indices.shape or values.dim() == 0:
            raise UserInputError(
                f"TopKSae: code values and indices must have the same shape [..., k], got "
                f"{tuple(values.shape)} and {tuple(indices.shape)}"
            )
        if indices.dtype != torch.int64:
            raise fail_type("TopKSae: code indices", "an int64 tensor", indices)
        return values, indices

    def decode(self, code: SparseCode | tuple[Tensor, Tensor]) -> Tensor:
        """Reconstruct from a sparse code (any number of active latents ``k'``).

        Args:
            code: ``values [..., k']`` and int64 ``indices [..., k']``.

        Returns:
            ``[..., n_inputs]`` reconstruction ``b_dec + sum_j values_j * W_dec[indices_j]`` in the SAE's dtype.
        """
        values, indices = self._unpack_code(code)
        lead = values.shape[:-1]
        kk = values.shape[-1]
        flat_v = values.reshape(-1, kk).to(device=self.device, dtype=self.dtype)
        flat_i = indices.reshape(-1, kk).to(self.device)
        W_dec, b_dec = self._weights("W_dec", "b_dec")
        out = ops.sparse_decode(flat_v, flat_i, W_dec, b_dec)
        return out.reshape(*lead, self.n_inputs)

    def forward(self, x: Tensor) -> SaeOutput:
        """Encode and decode.

        Args:
            x: ``[..., n_inputs]``.

        Returns:
            `SaeOutput` with ``reconstruction [..., n_inputs]`` and ``code`` (``[..., k]``).
        """
        code = self.encode(x)
        return SaeOutput(self.decode(code), code)

    # -- hook -----------------------------------------------------------------------------------------------------
    def modify_activations(self, module: nn.Module, inputs: Any, output: Any) -> Tensor | None:
        """Forward-hook body (see the class docstring for the three behaviours).

        Args:
            module: the hooked layer.
            inputs: the layer's inputs (unused).
            output: ``[batch, seq, n_inputs]`` (or any ``[..., n_inputs]``) hidden state of the layer.

        Returns:
            None (observe, nothing manipulated) or a tensor of ``output``'s shape, dtype and device.
        """
        if not isinstance(output, Tensor):
            raise fail_type("TopKSae: the hooked layer's output", "a tensor", output)
        if output.shape[-1] != self.n_inputs:
            raise UserInputError(
                f"TopKSae: layer output width {output.shape[-1]} does not match the SAE's n_inputs={self.n_inputs}"
            )
        concepts = self.concepts
        if self.mode == "observe" and not concepts.tracking_enabled and not concepts.has_manipulations:
            return None  # nothing would use the code: skip the encoder entirely
        code = self.encode(output)
        x = output.to(device=self.device, dtype=self.dtype)
        keep = self.inlier_mask(x)
        if concepts.tracking_enabled:
            concepts.observe(_zero_outliers(code.values, keep), code.indices, self.context)
        modified = concepts.modify_code(code.values, code.indices)
        if modified is None and self.mode == "observe":
            return None
        if modified is None:
            new = self.decode(code)
        else:
            new_recon = self.decode(SparseCode(modified[0], modified[1]))
            # Only the change is added in observe mode, so the SAE's reconstruction error stays in the stream.
            new = new_recon if self.mode == "replace" else x + (new_recon - self.decode(code))
        if keep is not None:
            new = torch.where(keep.unsqueeze(-1), new, x)
        return new.to(device=output.device, dtype=output.dtype)

    def inlier_values(self, x: Tensor, values: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Code values with the outlier tokens' entries set to 0, for statistics and top-text tracking.

        The SAE was not trained on outlier tokens (attention sinks, see `inlier_mask`); their codes are huge and
        meaningless and would otherwise fill every neuron's top texts.

        Args:
            x: ``[..., n_inputs]`` the encoded activations.
            values: ``[..., k]`` their code values.
            attention_mask: ``[...]`` real tokens (nonzero) of ``x``, as for `inlier_mask`.

        Returns:
            ``[..., k]`` values, zero at outlier tokens (``values`` itself when no factor is set).
        """
        return _zero_outliers(values, self.inlier_mask(x, attention_mask))

    def inlier_mask(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor | None:
        """Tokens the SAE acts on, given `outlier_norm_factor` (None: all of them).

        The one outlier rule (`attention_sink_mask`): a token is left alone when it is a real token whose norm
        exceeds ``outlier_norm_factor`` times the median norm of the batch's real tokens, all rows together.

        Args:
            x: ``[..., n_inputs]`` activations.
            attention_mask: ``[...]`` nonzero at real tokens. None: taken from the batch context of the forward pass
                the SAE is hooked into when its shape matches (so padding is never part of the reference), else
                every token counts as real.

        Returns:
            ``[...]`` bool, False at attention sinks (padding is never one), or None when no factor is set.
        """
        if self.outlier_norm_factor is None:
            return None
        if attention_mask is None:
            context_mask = getattr(self.context, "attention_mask", None) if self.context is not None else None
            if isinstance(context_mask, Tensor) and tuple(context_mask.shape) == tuple(x.shape[:-1]):
                attention_mask = context_mask
        if attention_mask is not None:
            attention_mask = attention_mask.to(x.device)
        return ~attention_sink_mask(x, attention_mask, factor=self.outlier_norm_factor)

    # -- nn.Module.train doubles as the training entry point ---------------------------------------------------
    def train(  # type: ignore[override]
        self,
        store: Store | bool = True,
        run_id: str | None = None,
        layer: str | None = None,
        config: SaeTrainingConfig | None = None,
        **kwargs: Any,
    ) -> TopKSae | TrainingResult:
        """Train this SAE on a stored activation run, or set the module's training flag.

        ``sae.train(store, run_id, layer, config)`` is ``SaeTrainer(sae, store).train(run_id, layer, config)``.
        ``sae.train()`` / ``sae.train(False)`` keep their ``nn.Module`` meaning (``eval()`` relies on it).

        Args:
            store: the store holding ``activations/<run_id>/`` (or a bool: nn.Module training mode).
            run_id: activation run to train on.
            layer: layer name inside the run.
            config: `SaeTrainingConfig` (defaults when None).
            **kwargs: passed to `SaeTrainer.train` (e.g. ``callbacks``).

        Returns:
            `TrainingResult` when training, else ``self``.
        """
        if "mode" in kwargs:  # nn.Module.train(mode=...) spelled as a keyword
            return nn.Module.train(self, bool(kwargs.pop("mode")))
        if isinstance(store, bool):
            return nn.Module.train(self, store)
        # The trainer is built on this module (it imports TopKSae at import time); importing it here, when training
        # is asked for, keeps the dependency one-way at import time: sae.py never needs the train package to load.
        from mi_crow.mechanistic.sae.train import SaeTrainer

        if run_id is None or layer is None:
            raise UserInputError(
                f"TopKSae.train: run_id and layer are required, got run_id={run_id!r}, layer={layer!r}"
            )
        return SaeTrainer(self, store).train(run_id, layer, config, **kwargs)

    # -- persistence ----------------------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this SAE (written to ``config.json`` by `save`)."""
        dtype_name = str(self.dtype).replace("torch.", "")
        return {
            "class": type(self).__name__,
            "format_version": FORMAT_VERSION,
            "n_latents": self.n_latents,
            "n_inputs": self.n_inputs,
            "k": self.k,
            "dtype": dtype_name,
            "mode": self.mode,
            "layer": self.metadata.get("layer"),
            "model_id": self.metadata.get("model_id"),
            "activation_run_id": self.metadata.get("activation_run_id"),
            "training_run_id": self.metadata.get("training_run_id"),
            "outlier_norm_factor": self.outlier_norm_factor,
            "mi_crow_version": mi_crow.__version__,
        }

    def save(self, store: Store, sae_id: str) -> str:
        """Save weights and configuration to ``sae_models/<sae_id>/`` (atomically, through the store).

        Writes ``model.safetensors`` (W_enc, b_enc, W_dec, b_dec: no pickled code) and ``config.json``; the concept
        dictionary and manipulations too.

        Args:
            store: the destination store.
            sae_id: name of the saved SAE: one folder name (the rule of every store key).

        Returns:
            The store key of the SAE's folder.

        Raises:
            UserInputError: ``sae_id`` is not one folder name (``"a/b"``, ``".."``, ``""``).
        """
        return save_sae(self, store, sae_id)

    @classmethod
    def load(
        cls,
        store: Store | str | Path,
        sae_id: str | None = None,
        *,
        device: str | torch.device | None = None,
    ) -> TopKSae:
        """Load an SAE saved by `save`.

        Args:
            store: the store it was saved to, or a plain folder (then ``sae_id`` is omitted, see `load_from_dir`).
            sae_id: name it was saved under.
            device: where to put the parameters (CPU when None).

        Returns:
            The SAE, identical (bit-exact weights, same configuration and metadata) to the saved one.

        Raises:
            StoreKeyNotFoundError: no SAE saved under ``sae_id``.
            CorruptStoreFileError: its files do not describe an SAE.
        """
        return load_sae(cls, store, sae_id, device=device)

    @classmethod
    def load_from_dir(cls, path: str | Path, *, device: str | torch.device | None = None) -> TopKSae:
        """Load an SAE from a plain folder holding ``model.safetensors`` and ``config.json``.

        Args:
            path: the folder (e.g. ``<store>/sae_models/<sae_id>``).
            device: where to put the parameters (CPU when None).
        """
        return load_sae_from_dir(cls, path, device=device)

    def extra_repr(self) -> str:
        return f"n_latents={self.n_latents}, n_inputs={self.n_inputs}, k={self.k}, mode={self.mode!r}"

    def __repr__(self) -> str:  # Hook.__repr__ would hide the module view
        return nn.Module.__repr__(self)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm in place (rows of norm 0 are left as they are)."""
        norms = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))

    def default_lr(self) -> float:
        """OpenAI's learning rate for this dictionary size: ``2e-4 / sqrt(n_latents / 2**14)``."""
        return 2e-4 / math.sqrt(self.n_latents / 2**14)


def _zero_outliers(values: Tensor, keep: Tensor | None) -> Tensor:
    """``values [..., k]`` with the entries of tokens where ``keep [...]`` is False set to 0."""
    if keep is None:
        return values
    return values * keep.to(device=values.device, dtype=values.dtype).unsqueeze(-1)
