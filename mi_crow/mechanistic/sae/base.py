"""`SaeBase`: what every sparse dictionary of mi_crow shares (TopK, BatchTopK, Matryoshka, JumpReLU SAEs and
transcoders).

An SAE here is ``code = select(pre)`` with ``pre = (x - shift) @ W_enc.T + b_enc`` (``shift`` is ``b_dec`` for an
autoencoder, zero for a transcoder) and ``x_hat = b_dec + sum_j values_j * W_dec[indices_j]``. Only the selection
differs between the architectures (the ``selection`` attribute):

- ``"topk"``: the ``k`` largest pre-activations of each token (after ReLU), on the fused `mi_crow.ops.topk_encode`;
- ``"batchtopk"``: at training time the ``k * B`` largest of the whole batch (see ``batchtopk.py``); at inference
  the latents whose activation exceeds one global threshold (a 0-d ``threshold`` buffer, estimated while
  training), so inference does not depend on the batch; before any estimate (``threshold`` is NaN) it falls back
  to the per-token top-k;
- ``"jumprelu"``: the latents whose pre-activation exceeds their own threshold (an ``[n_latents]`` ``threshold``
  buffer; a global threshold is stored expanded to ``[n_latents]``).

Both threshold selections run on the same fused op as TopK (see `threshold_encode`): the threshold is folded into
the encoder bias, so the fused top-k ranks ``pre - threshold`` and the active latents are exactly those ranked
above 0; the width starts at ``k`` and doubles while some token has all its slots active, so the result is exact
and the dense ``[tokens, n_latents]`` matrix is never built.

The base holds the parameters, the hook behaviour (`Controller`), encode/decode plumbing, and saving/loading with
the architecture recorded in ``config.json`` (``"architecture"``); `load_sae` returns the class it names.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

import mi_crow
from mi_crow import ops
from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.hooks import Controller, HookType
from mi_crow.mechanistic.sae.concepts import AutoencoderConcepts
from mi_crow.mechanistic.sae.keys import CONFIG_FILE, check_sae_id
from mi_crow.mechanistic.sae.linear_view import LinearView
from mi_crow.mechanistic.sae.outliers import attention_sink_mask
from mi_crow.mechanistic.sae.saving import SaeFiles, load_sae as _load_files, locate_folder, read_config, save_sae
from mi_crow.ops.memory import empty_huge
from mi_crow.store.base import Store
from mi_crow.store.errors import StoreKeyNotFoundError
from mi_crow.validation import check_choice, check_positive_int, fail, fail_type, resolve_synonym

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.config import SaeTrainingConfig
    from mi_crow.mechanistic.sae.train import TrainingResult

__all__ = ["ARCHITECTURES", "SaeBase", "SaeOutput", "SparseCode", "load_sae", "threshold_encode"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MODES = ("observe", "replace")
SELECTIONS = ("topk", "batchtopk", "jumprelu")

#: architecture name (``config.json``'s ``"architecture"``) -> class; filled by `SaeBase.__init_subclass__`.
ARCHITECTURES: dict[str, type[SaeBase]] = {}


class SparseCode(NamedTuple):
    """A sparse code: the active latents of each token.

    Attributes:
        values: ``[..., k]`` activations (after ReLU / threshold; may be 0 in padding slots), sorted descending.
        indices: ``[..., k]`` int64 latent indices (distinct within a token).
    """

    values: Tensor
    indices: Tensor


class SaeOutput(NamedTuple):
    """Result of an SAE's ``forward``.

    Attributes:
        reconstruction: ``[..., n_outputs]`` decoded input (for a transcoder: the predicted target).
        code: the `SparseCode` (``[..., k]`` values and indices).
    """

    reconstruction: Tensor
    code: SparseCode


def threshold_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, shift: Tensor, threshold: Tensor, k_start: int
) -> tuple[Tensor, Tensor]:
    """JumpReLU selection on the fused top-k op: the latents with ``pre > threshold``, their values ``pre``.

    ``pre = (x - shift) @ W_enc.T + b_enc``. The threshold is folded into the bias: the fused op ranks
    ``pre - threshold`` and keeps ``relu`` of it, so a slot is active exactly when its value is ``> 0``. Starting from
    ``k_start`` slots, the width doubles while some token has every slot active (it might have more), up to
    ``n_latents``; the result is therefore exact whatever the number of active latents, and the dense
    ``[tokens, n_latents]`` matrix is never formed. An active value is ``(pre - threshold) + threshold``, which equals
    ``pre`` up to one rounding.

    Args:
        x: ``[B, d_in]``.
        W_enc: ``[n, d_in]``; b_enc: ``[n]``; shift: ``[d_in]`` subtracted from ``x`` first.
        threshold: ``[n]`` per-latent thresholds (a 0-d tensor is broadcast).
        k_start: first width tried (clamped to ``[1, n]``).

    Returns:
        ``(values [B, w], indices [B, w])`` with ``w`` the largest number of active latents of a token (at least 1),
        values sorted descending; inactive slots hold value 0 (and a distinct, inactive latent's index).
    """
    n = W_enc.shape[0]
    thr = threshold.to(device=b_enc.device, dtype=b_enc.dtype).expand(n)
    bias = b_enc - thr
    k = max(1, min(int(k_start), n))
    while True:
        code = ops.topk_encode(x, W_enc, bias, shift, k)
        if k == n or x.shape[0] == 0 or not bool((code.values[:, -1] > 0).any()):
            break
        k = min(2 * k, n)
    active = code.values > 0
    values = torch.where(active, code.values + thr[code.indices].to(code.values.dtype), torch.zeros_like(code.values))
    width = max(1, int(active.sum(dim=1).max())) if x.shape[0] else 1
    values, order = values.sort(dim=1, descending=True, stable=True)
    indices = code.indices.gather(1, order)
    return values[:, :width].contiguous(), indices[:, :width].contiguous()


class SaeBase(nn.Module, Controller):
    """Base of the SAE family: parameters, encode/decode plumbing, the hook, saving and loading.

    Subclasses set ``architecture`` (the name recorded in ``config.json``), choose the ``selection`` and may add
    keyword arguments (`_arch_config` / `_init_kwargs_from_config` round-trip them through ``config.json``).

    Attached to a layer (``lm.attach_sae(sae, layer)``) the SAE encodes every token of the layer's output:
    - ``mode="observe"`` (default) and no concept manipulation: the output is returned untouched (bit-exact); the
      codes only feed concept tracking;
    - with manipulations (``sae.concepts``): ``output + decode(modified code) - decode(code)``, so the
      reconstruction error is kept and only the change is added;
    - ``mode="replace"``: the output is replaced by the reconstruction (of the modified code, if any).
    The SAE computes in its own dtype and casts its result back to the layer's dtype (bf16 models work).

    Args:
        n_latents: dictionary size ``n`` (positive int).
        n_inputs: input width ``d_in`` (positive int).
        k: active latents per token, ``1 <= k <= n_latents`` (for threshold selections: the first width tried).
        device: where the parameters live.
        dtype: floating dtype of the parameters.
        n_outputs: decoder width ``d_out`` (default ``n_inputs``; differs for transcoders).
        mode: ``"observe"`` or ``"replace"``.
        layer_signature: the layer this SAE belongs to (set by ``lm.attach_sae``; also saved with the SAE).
        hook_id: the hook id (random when omitted).

    Parameters: ``W_enc [n, d_in]``, ``b_enc [n]``, ``W_dec [n, d_out]``, ``b_dec [d_out]``; threshold selections add
    the ``threshold`` buffer (saved in ``model.pt`` with the parameters).
    """

    architecture: ClassVar[str] = ""
    selection: str = "topk"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("architecture")
        if name:
            ARCHITECTURES[name] = cls

    def __init__(
        self,
        n_latents: int,
        n_inputs: int,
        k: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        n_outputs: int | None = None,
        mode: str = "observe",
        layer_signature: str | int | None = None,
        hook_id: str | None = None,
    ) -> None:
        cls_name = type(self).__name__
        if n_outputs is None:
            n_outputs = n_inputs
        for name, value in (("n_latents", n_latents), ("n_inputs", n_inputs), ("n_outputs", n_outputs), ("k", k)):
            check_positive_int(value, f"{cls_name}: {name}")
        if k > n_latents:
            raise fail(f"{cls_name}: k", f"<= n_latents={n_latents}", k)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise fail_type(f"{cls_name}: dtype", "a floating torch.dtype", dtype)
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise fail(f"{cls_name}: device", "a torch device or its name", device) from exc
        nn.Module.__init__(self)
        Controller.__init__(self, layer_signature=layer_signature, hook_type=HookType.FORWARD, hook_id=hook_id)
        self.n_latents = n_latents
        self.n_inputs = n_inputs
        self.n_outputs = n_outputs
        self.k = k
        self.mode = mode
        self.W_enc = nn.Parameter(empty_huge(n_latents, n_inputs, device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n_latents, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(empty_huge(n_latents, n_outputs, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(n_outputs, device=device, dtype=dtype))
        self._init_extra(device, dtype)
        self.reset_parameters()
        # What the SAE was trained on; written to config.json by `save`.
        self.metadata: dict[str, Any] = {
            "layer": layer_signature,
            "model_id": None,
            "activation_run_id": None,
            "training_run_id": None,
        }
        self.outlier_norm_factor: float | None = None
        # The concepts package reads the SAE through its attributes only and never imports this module.
        self.concepts = AutoencoderConcepts(self)

    def _init_extra(self, device: torch.device, dtype: torch.dtype) -> None:
        """Register the selection's buffers (``threshold``) and any extra parameter; called before
        `reset_parameters`."""
        if self.selection == "batchtopk":
            # One global threshold, 0-d; NaN until training has estimated it (then encode falls back to top-k).
            self.register_buffer("threshold", torch.full((), float("nan"), device=device, dtype=dtype))
        elif self.selection == "jumprelu":
            # Per latent; a global threshold is stored expanded to [n_latents].
            self.register_buffer("threshold", torch.zeros(self.n_latents, device=device, dtype=dtype))

    # -- construction helpers ---------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw fresh weights: random unit-norm decoder rows, encoder = decoder transpose, zero biases.

        Args:
            generator: optional CPU generator for reproducible weights (the global RNG otherwise).
        """
        if self.W_enc.is_meta:  # no values to draw (a shape-only SAE, e.g. a latent shard being assembled)
            return
        # Drawn into W_enc itself when it is float32 on CPU (``normal_`` is what ``torch.randn`` does, so the values
        # are the same): no [n, d] temporary, which matters at 10^6 latents.
        inplace = self.W_enc.dtype == torch.float32 and self.W_enc.device.type == "cpu"
        w = self.W_enc if inplace else torch.empty(self.n_latents, self.n_inputs, dtype=torch.float32)
        w.normal_(generator=generator)
        w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if not inplace:
            self.W_enc.copy_(w)
        if self.n_outputs == self.n_inputs:
            self.W_dec.copy_(w)
        else:
            self.W_dec.zero_()
        self.b_enc.zero_()
        self.b_dec.zero_()

    # -- properties ---------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """``"observe"`` (leave the layer output unchanged unless concepts are manipulated) or ``"replace"``."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = check_choice(value, f"{type(self).__name__}.mode", _MODES)

    @property
    def encoder(self) -> LinearView:
        """The encoder as an ``nn.Linear``-like view: ``.weight`` is ``W_enc`` ``[n_latents, n_inputs]``, ``.bias``
        is ``b_enc`` (see `LinearView`)."""
        return LinearView(self, "encoder")

    @property
    def decoder(self) -> LinearView:
        """The decoder as an ``nn.Linear(n_latents, n_outputs)``-like view: ``.weight`` is ``W_dec.T``
        ``[n_outputs, n_latents]``, ``.bias`` is ``b_dec`` (see `LinearView`)."""
        return LinearView(self, "decoder")

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the parameters (the dtype the SAE computes in)."""
        return self.W_dec.dtype

    @property
    def is_transcoder(self) -> bool:
        """True when the SAE predicts another activation than its input (no ``b_dec`` shift of the input)."""
        return False

    # -- core ---------------------------------------------------------------------------------------------------
    def _check_input(self, x: Any, name: str = "x") -> Tensor:
        cls_name = type(self).__name__
        if not isinstance(x, Tensor):
            raise fail_type(f"{cls_name}: {name}", "a torch.Tensor", x)
        if not x.is_floating_point():
            raise fail_type(f"{cls_name}: {name}", "a floating tensor", x)
        if x.dim() == 0 or x.shape[-1] != self.n_inputs:
            raise UserInputError(
                f"{cls_name}: {name} must have shape [..., n_inputs={self.n_inputs}], got {tuple(x.shape)}"
            )
        return x.to(device=self.device, dtype=self.dtype)

    def _weights(self, *names: str) -> tuple[Tensor, ...]:
        # Without grad mode (inference, hooks) the autograd wrapper of the ops would be pure overhead.
        if torch.is_grad_enabled():
            return tuple(getattr(self, name) for name in names)
        return tuple(getattr(self, name).detach() for name in names)

    def encoder_shift(self) -> Tensor:
        """``[n_inputs]`` vector subtracted from the input before encoding: ``b_dec`` for an autoencoder, zeros for a
        transcoder."""
        if self.is_transcoder:
            return torch.zeros(self.n_inputs, device=self.device, dtype=self.dtype)
        return self._weights("b_dec")[0]

    def has_threshold(self) -> bool:
        """Whether inference selects by threshold (JumpReLU, or BatchTopK once its threshold is estimated)."""
        if self.selection == "jumprelu":
            return True
        if self.selection == "batchtopk":
            return bool(torch.isfinite(self.threshold).all())
        return False

    def encode_flat(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """Inference selection of ``flat [B, n_inputs]`` (already checked and cast): ``(values, indices)``."""
        W_enc, b_enc = self._weights("W_enc", "b_enc")
        shift = self.encoder_shift()
        if self.has_threshold():
            return threshold_encode(flat, W_enc, b_enc, shift, self.threshold.detach(), self.k)
        code = ops.topk_encode(flat, W_enc, b_enc, shift, self.k)
        return code.values, code.indices

    def encode(self, x: Tensor) -> SparseCode:
        """Encode inputs into their sparse code (the inference selection of the architecture).

        Args:
            x: ``[..., n_inputs]`` inputs (any leading shape; cast to the SAE's device and dtype).

        Returns:
            `SparseCode` with ``values [..., w]`` (sorted descending) and ``indices [..., w]`` int64: ``w = k`` for
            TopK; for a threshold selection ``w`` is the largest number of active latents of a token in ``x``,
            the other tokens' extra slots holding value 0.
        """
        x = self._check_input(x)
        lead = x.shape[:-1]
        values, indices = self.encode_flat(x.reshape(-1, self.n_inputs))
        w = values.shape[-1]
        return SparseCode(values.reshape(*lead, w), indices.reshape(*lead, w))

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
        cls_name = type(self).__name__
        try:
            values, indices = code[0], code[1]
        except (TypeError, IndexError, KeyError):
            raise fail_type(f"{cls_name}: code", "a SparseCode or a (values, indices) pair", code) from None
        if not isinstance(values, Tensor) or not isinstance(indices, Tensor):
            raise fail_type(f"{cls_name}: code", "a pair of tensors (values, indices)", code)
        if values.shape != indices.shape or values.dim() == 0:
            raise UserInputError(
                f"{cls_name}: code values and indices must have the same shape [..., k], got "
                f"{tuple(values.shape)} and {tuple(indices.shape)}"
            )
        if indices.dtype != torch.int64:
            raise fail_type(f"{cls_name}: code indices", "an int64 tensor", indices)
        return values, indices

    def decode(self, code: SparseCode | tuple[Tensor, Tensor]) -> Tensor:
        """Reconstruct from a sparse code (any number of active latents ``k'``).

        Args:
            code: ``values [..., k']`` and int64 ``indices [..., k']``.

        Returns:
            ``[..., n_outputs]`` reconstruction ``b_dec + sum_j values_j * W_dec[indices_j]`` in the SAE's dtype.
        """
        values, indices = self._unpack_code(code)
        lead = values.shape[:-1]
        kk = values.shape[-1]
        flat_v = values.reshape(-1, kk).to(device=self.device, dtype=self.dtype)
        flat_i = indices.reshape(-1, kk).to(self.device)
        W_dec, b_dec = self._weights("W_dec", "b_dec")
        out = ops.sparse_decode(flat_v, flat_i, W_dec, b_dec)
        return out.reshape(*lead, self.n_outputs)

    def predict(self, x: Tensor, code: SparseCode) -> Tensor:
        """The output for input ``x`` with code ``code``: ``decode(code)`` (a skip transcoder adds its linear
        term)."""
        return self.decode(code)

    def forward(self, x: Tensor) -> SaeOutput:
        """Encode and decode.

        Args:
            x: ``[..., n_inputs]``.

        Returns:
            `SaeOutput` with ``reconstruction [..., n_outputs]`` and ``code``.
        """
        code = self.encode(x)
        return SaeOutput(self.predict(x, code), code)

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
        cls_name = type(self).__name__
        if not isinstance(output, Tensor):
            raise fail_type(f"{cls_name}: the hooked layer's output", "a tensor", output)
        if output.shape[-1] != self.n_inputs:
            raise UserInputError(
                f"{cls_name}: layer output width {output.shape[-1]} does not match the SAE's "
                f"n_inputs={self.n_inputs}"
            )
        hooked = self._hook_code(output)
        if hooked is None:
            return None
        code, x, keep, modified = hooked
        if modified is None:
            new = self.decode(code)
        else:
            new_recon = self.decode(SparseCode(modified[0], modified[1]))
            # Only the change is added in observe mode, so the SAE's reconstruction error stays in the stream.
            new = new_recon if self.mode == "replace" else x + (new_recon - self.decode(code))
        if keep is not None:
            new = torch.where(keep.unsqueeze(-1), new, x)
        return new.to(device=output.device, dtype=output.dtype)

    def _hook_code(self, source: Tensor) -> tuple[SparseCode, Tensor, Tensor | None, Any] | None:
        """The part of the hook every architecture shares: encode ``source`` (the activation the SAE reads), feed
        top-text tracking, apply the concept manipulations.

        Returns:
            None when the hook has nothing to do (observe mode with nothing manipulated: the encoder is skipped
            when nothing would use the code), else ``(code, x, keep, modified)``: ``x`` is ``source`` in the SAE's
            dtype and device, ``keep`` the inlier mask (or None), ``modified`` the manipulated ``(values,
            indices)`` or None.
        """
        concepts = self.concepts
        if self.mode == "observe" and not concepts.tracking_enabled and not concepts.has_manipulations:
            return None
        code = self.encode(source)
        x = source.to(device=self.device, dtype=self.dtype)
        keep = self.inlier_mask(x)
        if concepts.tracking_enabled:
            concepts.observe(_zero_outliers(code.values, keep), code.indices, self.context)
        modified = concepts.modify_code(code.values, code.indices, x=x)
        if modified is None and self.mode == "observe":
            return None
        return code, x, keep, modified

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
        layer_signature: str | None = None,
        config: SaeTrainingConfig | None = None,
        *,
        layer: str | None = None,
        **kwargs: Any,
    ) -> SaeBase | TrainingResult:
        """Train this SAE on a stored activation run, or set the module's training flag.

        ``sae.train(store, run_id, layer_signature, config)`` is ``SaeTrainer(sae).train(store, run_id,
        layer_signature, config)`` (keywords work too; ``layer`` is a synonym of ``layer_signature``).
        ``sae.train()`` / ``sae.train(False)`` keep their ``nn.Module`` meaning (``eval()`` relies on it).

        Args:
            store: the store holding ``activations/<run_id>/`` (or a bool: nn.Module training mode).
            run_id: activation run to train on.
            layer_signature: layer name inside the run.
            config: `SaeTrainingConfig` (defaults when None).
            layer: synonym of ``layer_signature``.
            **kwargs: passed to `SaeTrainer.train` (e.g. ``callbacks``).

        Returns:
            `TrainingResult` when training, else ``self``.
        """
        cls_name = type(self).__name__
        if "mode" in kwargs:  # nn.Module.train(mode=...) spelled as a keyword
            return nn.Module.train(self, bool(kwargs.pop("mode")))
        layer_signature = resolve_synonym("layer_signature", layer_signature, "layer", layer)
        if isinstance(store, bool):
            if run_id is not None or layer_signature is not None or config is not None:
                raise UserInputError(
                    f"{cls_name}.train: training needs the store, got store={store!r} with run_id={run_id!r}"
                )
            return nn.Module.train(self, store)
        # The trainer imports this module; importing it here keeps the dependency one-way at import time.
        from mi_crow.mechanistic.sae.train import SaeTrainer

        if run_id is None or layer_signature is None:
            raise UserInputError(
                f"{cls_name}.train: run_id and layer_signature are required, got run_id={run_id!r}, "
                f"layer_signature={layer_signature!r}"
            )
        return SaeTrainer(self).train(store, run_id, layer_signature, config, **kwargs)

    # -- persistence ----------------------------------------------------------------------------------------------
    def _arch_config(self) -> dict[str, Any]:
        """Architecture-specific constructor arguments recorded in ``config.json`` (JSON values)."""
        return {}

    @classmethod
    def _init_kwargs_from_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Constructor keywords rebuilt from `_arch_config`'s entries of a ``config.json``."""
        return {}

    def config_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this SAE (written to ``config.json`` by `save`)."""
        dtype_name = str(self.dtype).replace("torch.", "")
        config = {
            "class": type(self).__name__,
            "architecture": self.architecture,
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
        config.update(self._arch_config())
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], dtype: torch.dtype) -> SaeBase:
        """An SAE of this class with the sizes of a ``config.json`` document (weights freshly drawn)."""
        return cls(
            config["n_latents"],
            config["n_inputs"],
            config["k"],
            device="cpu",
            dtype=dtype,
            mode=config.get("mode", "observe"),
            layer_signature=config.get("layer"),
            **cls._init_kwargs_from_config(config),
        )

    def save(
        self,
        store: Store | str | None = None,
        sae_id: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> str | Path:
        """Save weights, configuration and concepts, in a store or in a plain folder (atomically, file by file).

        Call shapes:

        - ``sae.save(store, sae_id)``: to ``sae_models/<sae_id>/`` of the store; returns that key.
        - ``sae.save(name=..., path=...)`` (or ``sae.save(name, path)``): to the folder ``<path>/<name>/`` (``path``
          defaults to the current directory); returns that folder. It is laid out like a store's SAE folder, so
          ``load_sae(<path>/<name>)`` (or ``TopKSae.load``, for a TopK SAE) reads it back.

        Files: ``model.pt`` (the state dict: ``W_enc, b_enc, W_dec, b_dec`` and the architecture's extra tensors,
        e.g. ``threshold``, ``W_skip``: tensors only, readable with ``torch.load(..., weights_only=True)`` and
        ``sae.load_state_dict``), ``config.json`` (with ``"architecture"``) and ``concepts.json`` (concept names and
        manipulations). A ``model.safetensors`` left by an earlier version is removed.

        Args:
            store: the destination store (or, in the folder form, the name given positionally).
            sae_id: name of the saved SAE in the store: one folder name (or, in the folder form, the path given
                positionally).
            name: the SAE's name: the folder's name in the folder form, a synonym of ``sae_id`` in the store form.
            path: parent folder of the folder form.

        Returns:
            The store key of the SAE's folder, or the folder's path.

        Raises:
            UserInputError: a missing or malformed name (not one folder name: ``"a/b"``, ``".."``, ``""``), a store
                together with ``path``, or ``sae_id`` and ``name`` given with different values.
        """
        cls_name = type(self).__name__
        if isinstance(store, Store):
            if path is not None:
                raise UserInputError(
                    f"{cls_name}.save: path is for saving to a folder, not with a store; got a store and "
                    f"path={path!r}"
                )
            files = SaeFiles.in_store(store, resolve_synonym("sae_id", sae_id, "name", name))
            target: str | Path = files.key()
        else:
            if store is not None and not isinstance(store, str):
                raise ArgumentTypeError(
                    f"{cls_name}.save: the first argument must be a Store (sae.save(store, sae_id)) or a name "
                    f"(sae.save(name=..., path=...)), got {type(store).__name__}"
                )
            # sae.save(name, path) positionally: the two slots carry the name and the folder.
            name = resolve_synonym("name", name, "the first positional argument", store)
            path = resolve_synonym("path", path, "the second positional argument", sae_id)
            if path is not None and not isinstance(path, (str, os.PathLike)):
                raise ArgumentTypeError(
                    f"{cls_name}.save: path must be a str or os.PathLike, got {type(path).__name__}"
                )
            target = (Path.cwd() if path is None else Path(path)) / check_sae_id(name)
            files = SaeFiles.in_folder(target)
        save_sae(self, files)
        return target

    @classmethod
    def load(
        cls,
        store: Store | str | os.PathLike[str] | None = None,
        sae_id: str | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        device: str | torch.device | None = None,
        manipulations: bool = False,
    ) -> Any:
        """Load an SAE saved by `save`, as the class its ``config.json`` records (``"architecture"``; folders of
        earlier versions, without it, are TopK SAEs).

        Call shapes:

        - ``Cls.load(store, sae_id)``: from ``sae_models/<sae_id>/`` of the store.
        - ``Cls.load(path)`` (or ``path=...``): from a folder holding ``config.json`` and ``model.pt``, or from
          that ``model.pt`` itself. ``<dir>/<name>.pt`` where only the folder ``<dir>/<name>/`` exists (what
          ``sae.save(name=..., path=<dir>)`` writes) loads that folder.

        ``SaeBase.load`` (and `load_sae`) accept any architecture; ``TopKSae.load`` a TopK SAE,
        ``JumpReLUSae.load`` a JumpReLU SAE, and so on (a saved architecture of another class is refused, naming
        it).

        Args:
            store: the store it was saved to, or a path (then ``sae_id`` is omitted).
            sae_id: name it was saved under.
            path: the folder or its ``model.pt`` (keyword form of the path).
            device: where to put the parameters (CPU when None).
            manipulations: apply the steering saved with the SAE. Without it a loaded SAE leaves a plain forward
                unchanged; the saved manipulations wait in ``sae.concepts.saved_manipulations``
                (``sae.concepts.apply_saved_manipulations()`` applies them later).

        Returns:
            The SAE, identical (bit-exact weights, same configuration and metadata) to the saved one.

        Raises:
            StoreKeyNotFoundError (a ``FileNotFoundError``): no such SAE / missing file; the message names it.
            CorruptStoreFileError (a ``ValueError``): the weights file holds anything but tensors (refused by
                ``weights_only=True``) or does not decode, or the files do not describe an SAE; the message names
                the file.
            UserInputError: bad arguments, or the saved architecture is not one of this class.
        """
        cls_name = cls.__name__
        if path is not None:
            if store is not None:
                raise UserInputError(
                    f"{cls_name}.load: give either a store and sae_id or path, got store={store!r} and path={path!r}"
                )
            store = path
        if isinstance(store, (str, os.PathLike)):
            if sae_id is not None:
                raise UserInputError(
                    f"{cls_name}.load: pass either a store and sae_id or a folder path, got path {store!r} and "
                    f"sae_id={sae_id!r}"
                )
            folder, model_file = locate_folder(Path(store))
            files = SaeFiles.in_folder(folder)
            return _load_files(cls._resolve_class(files), files, device=device, model_file=model_file,
                               manipulations=manipulations)
        if not isinstance(store, Store):
            raise ArgumentTypeError(
                f"{cls_name}.load: the first argument must be a Store or a path, got {type(store).__name__}"
            )
        if sae_id is None:
            raise UserInputError(f"{cls_name}.load: sae_id is required when loading from a store, got sae_id=None")
        files = SaeFiles.in_store(store, sae_id)
        if not files.exists(CONFIG_FILE):
            raise StoreKeyNotFoundError(
                f"{cls_name}.load: no saved SAE {sae_id!r} in the store (missing {files.where(CONFIG_FILE)})"
            )
        return _load_files(cls._resolve_class(files), files, device=device, manipulations=manipulations)

    @classmethod
    def _resolve_class(cls, files: SaeFiles) -> type[SaeBase]:
        """The class named by the folder's ``config.json`` (it must be ``cls`` or a subclass)."""
        config = read_config(files, cls.__name__)
        arch = config.get("architecture", "topk") if isinstance(config, dict) else "topk"
        target = ARCHITECTURES.get(arch) if isinstance(arch, str) else None
        if target is None:
            from mi_crow.store.errors import CorruptStoreFileError

            raise CorruptStoreFileError(
                f"{cls.__name__}.load: {files.where(CONFIG_FILE)} names an unknown architecture {arch!r}; expected "
                f"one of {sorted(ARCHITECTURES)}"
            )
        if not issubclass(target, cls):
            raise UserInputError(
                f"{cls.__name__}.load: the SAE at {files.where()} is a {target.__name__} (architecture {arch!r}), "
                f"not a {cls.__name__}; load it with mi_crow.mechanistic.sae.load_sae or {target.__name__}.load"
            )
        return target

    @classmethod
    def load_from_dir(cls, path: str | os.PathLike[str], *, device: str | torch.device | None = None) -> Any:
        """``Cls.load(path)``: load from a plain folder (``config.json`` with ``model.pt``, or the
        ``model.safetensors`` of earlier versions) or its weights file.

        Args:
            path: the folder (e.g. ``<store>/sae_models/<sae_id>``) or its ``model.pt``.
            device: where to put the parameters (CPU when None).
        """
        return cls.load(path=path, device=device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> Any:
        """Load an SAE saved by SAELens, sparsify, dictionary_learning, circuit-tracer or mi_crow (format detected),
        as the class of its architecture; a file of an architecture that is not this class (or a subclass) is
        refused. Keywords and errors: `mi_crow.mechanistic.sae.interop.load_pretrained`."""
        from mi_crow.mechanistic.sae.interop import load_pretrained

        return load_pretrained(path, expected=cls, **kwargs)

    def export(self, path: str | os.PathLike[str], format: str = "sae_lens", **kwargs: Any) -> Path:
        """Write this SAE as ``"sae_lens"``, ``"sparsify"``, ``"dictionary_learning"`` or ``"circuit_tracer"``
        files those libraries load (`mi_crow.mechanistic.sae.interop.export_sae`); returns the folder."""
        from mi_crow.mechanistic.sae.interop import export_sae

        return export_sae(self, path, format, **kwargs)

    def extra_repr(self) -> str:
        out = f"n_latents={self.n_latents}, n_inputs={self.n_inputs}"
        if self.n_outputs != self.n_inputs:
            out += f", n_outputs={self.n_outputs}"
        return out + f", k={self.k}, mode={self.mode!r}"

    def __repr__(self) -> str:  # Hook.__repr__ would hide the module view
        return nn.Module.__repr__(self)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm in place (rows of norm 0 are left as they are)."""
        norms = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))

    def default_lr(self, budget_tokens: int | None = None) -> float:
        """The trainer's default peak learning rate for this dictionary size and a run of ``budget_tokens`` tokens
        (`mi_crow.mechanistic.sae.train.schedule.default_lr`, the rule `SaeTrainer` uses when
        ``SaeTrainingConfig.lr`` is None).

        Without a budget: the rule's floor, OpenAI's width rule ``2e-4 / sqrt(n_latents / 2**14)``, which is what
        runs long enough (tens of millions of tokens and more) get; shorter runs get a higher rate.
        """
        from mi_crow.mechanistic.sae.train.schedule import default_lr, width_lr

        return width_lr(self.n_latents) if budget_tokens is None else default_lr(self.n_latents, budget_tokens)


def load_sae(
    store_or_path: Store | str | os.PathLike[str],
    sae_id: str | None = None,
    *,
    device: str | torch.device | None = None,
    manipulations: bool = False,
) -> SaeBase:
    """Load any saved SAE as the class its ``config.json`` records (`TopKSae`, `BatchTopKSae`, `MatryoshkaSae`,
    `JumpReLUSae`, `Transcoder`).

    Args:
        store_or_path: a store (then ``sae_id`` names the SAE) or a saved SAE's folder / its ``model.pt``.
        sae_id: the SAE's name in the store.
        device: where to put the parameters (CPU when None).
        manipulations: apply the steering saved with the SAE (see `SaeBase.load`).

    Returns:
        The SAE (see `SaeBase.load`).
    """
    # Every architecture registers itself on import; the package's __init__ imports them all.
    import mi_crow.mechanistic.sae  # noqa: F401

    return SaeBase.load(store_or_path, sae_id, device=device, manipulations=manipulations)


def _zero_outliers(values: Tensor, keep: Tensor | None) -> Tensor:
    """``values [..., k]`` with the entries of tokens where ``keep [...]`` is False set to 0."""
    if keep is None:
        return values
    return values * keep.to(device=values.device, dtype=values.dtype).unsqueeze(-1)
