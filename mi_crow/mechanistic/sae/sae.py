"""`TopKSae`: a TopK sparse autoencoder that is also a hook on a language-model layer."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

import mi_crow
from mi_crow import ops
from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.hooks import Controller, HookType
from mi_crow.mechanistic.sae.outliers import attention_sink_mask
from mi_crow.mechanistic.sae.concepts import AutoencoderConcepts
from mi_crow.mechanistic.sae.keys import CONFIG_FILE, check_sae_id
from mi_crow.mechanistic.sae.saving import SaeFiles, load_sae, locate_folder, save_sae
from mi_crow.ops.memory import empty_huge
from mi_crow.store.base import Store
from mi_crow.store.errors import StoreKeyNotFoundError
from mi_crow.validation import check_choice, check_positive_int, fail, fail_type, resolve_synonym

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.config import SaeTrainingConfig
    from mi_crow.mechanistic.sae.train import TrainingResult

__all__ = ["LinearView", "SaeOutput", "SparseCode", "TopKSae"]

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


class LinearView:
    """One side of a `TopKSae` seen as an ``nn.Linear``: ``.weight`` and ``.bias`` are the SAE's own parameters.

    ``sae.encoder`` and ``sae.decoder`` are such views (nothing is copied; they are not submodules, so the SAE's
    ``state_dict`` keeps its four entries ``W_enc, b_enc, W_dec, b_dec``):

    - ``sae.encoder.weight`` is ``W_enc`` itself, ``[n_latents, n_inputs]``; ``sae.encoder.bias`` is ``b_enc``
      ``[n_latents]``. The encoder reads ``x - b_dec``: ``pre = F.linear(x - sae.decoder.bias, encoder.weight,
      encoder.bias)``, then ReLU and top-k.
    - ``sae.decoder.weight`` is ``W_dec.T``, ``[n_inputs, n_latents]`` (the layout of ``nn.Linear(n_latents,
      n_inputs)``: column ``j`` is latent ``j``'s direction); ``sae.decoder.bias`` is ``b_dec`` ``[n_inputs]``, so
      ``F.linear(dense_code, decoder.weight, decoder.bias)`` is the reconstruction.

    In-place writes through ``.weight`` / ``.bias`` (under ``torch.no_grad()``, or on ``.data``) change the SAE, and
    assigning a tensor (``sae.decoder.weight = w``) copies it into the parameter after checking its shape. Assigning
    ``.data`` of ``decoder.weight`` (a transpose view) does not reach ``W_dec``; assign ``decoder.weight`` instead.

    Args:
        sae: the SAE.
        side: ``"encoder"`` or ``"decoder"``.
    """

    __slots__ = ("_sae", "_side")

    def __init__(self, sae: TopKSae, side: str) -> None:
        if side not in ("encoder", "decoder"):
            raise ValueError(f"side must be 'encoder' or 'decoder', got {side!r}")
        self._sae = sae
        self._side = side

    @property
    def in_features(self) -> int:
        """Input width of this side (``n_inputs`` for the encoder, ``n_latents`` for the decoder)."""
        return self._sae.n_inputs if self._side == "encoder" else self._sae.n_latents

    @property
    def out_features(self) -> int:
        """Output width of this side (``n_latents`` for the encoder, ``n_inputs`` for the decoder)."""
        return self._sae.n_latents if self._side == "encoder" else self._sae.n_inputs

    @property
    def weight(self) -> Tensor:
        """``[out_features, in_features]`` view of the SAE's weight (``W_enc``, or ``W_dec.T``)."""
        return self._sae.W_enc if self._side == "encoder" else self._sae.W_dec.t()

    @weight.setter
    def weight(self, value: Tensor) -> None:
        self._assign("weight", self.weight, value)

    @property
    def bias(self) -> Tensor:
        """``[out_features]``: ``b_enc`` for the encoder, ``b_dec`` for the decoder."""
        return self._sae.b_enc if self._side == "encoder" else self._sae.b_dec

    @bias.setter
    def bias(self, value: Tensor) -> None:
        self._assign("bias", self.bias, value)

    def _assign(self, name: str, target: Tensor, value: Any) -> None:
        if not isinstance(value, Tensor):
            raise TypeError(f"sae.{self._side}.{name} must be set to a torch.Tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"sae.{self._side}.{name} must be set to a tensor of shape {list(target.shape)}, got "
                f"{list(value.shape)}"
            )
        with torch.no_grad():
            target.copy_(value)

    def __repr__(self) -> str:
        return f"LinearView({self._side}: in_features={self.in_features}, out_features={self.out_features})"


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
    ``b_dec [d]``. ``sae.encoder`` / ``sae.decoder`` show them in ``nn.Linear``'s layout (`LinearView`):
    ``encoder.weight`` is ``W_enc`` ``[n, d]``, ``decoder.weight`` is ``W_dec.T`` ``[d, n]``.

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
    def encoder(self) -> LinearView:
        """The encoder as an ``nn.Linear``-like view: ``.weight`` is ``W_enc`` ``[n_latents, n_inputs]``, ``.bias``
        is ``b_enc`` (see `LinearView`)."""
        return LinearView(self, "encoder")

    @property
    def decoder(self) -> LinearView:
        """The decoder as an ``nn.Linear(n_latents, n_inputs)``-like view: ``.weight`` is ``W_dec.T``
        ``[n_inputs, n_latents]``, ``.bias`` is ``b_dec`` (see `LinearView`)."""
        return LinearView(self, "decoder")

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
        modified = concepts.modify_code(code.values, code.indices, x=x)
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
        layer_signature: str | None = None,
        config: SaeTrainingConfig | None = None,
        *,
        layer: str | None = None,
        **kwargs: Any,
    ) -> TopKSae | TrainingResult:
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
        if "mode" in kwargs:  # nn.Module.train(mode=...) spelled as a keyword
            return nn.Module.train(self, bool(kwargs.pop("mode")))
        layer_signature = resolve_synonym("layer_signature", layer_signature, "layer", layer)
        if isinstance(store, bool):
            if run_id is not None or layer_signature is not None or config is not None:
                raise UserInputError(
                    f"TopKSae.train: training needs the store, got store={store!r} with run_id={run_id!r}"
                )
            return nn.Module.train(self, store)
        # The trainer is built on this module (it imports TopKSae at import time); importing it here, when training
        # is asked for, keeps the dependency one-way at import time: sae.py never needs the train package to load.
        from mi_crow.mechanistic.sae.train import SaeTrainer

        if run_id is None or layer_signature is None:
            raise UserInputError(
                f"TopKSae.train: run_id and layer_signature are required, got run_id={run_id!r}, "
                f"layer_signature={layer_signature!r}"
            )
        return SaeTrainer(self).train(store, run_id, layer_signature, config, **kwargs)

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
          ``TopKSae.load(<path>/<name>)`` (or its ``model.pt``) reads it back.

        Files: ``model.pt`` (the state dict ``W_enc, b_enc, W_dec, b_dec``: tensors only, readable with
        ``torch.load(..., weights_only=True)`` and ``sae.load_state_dict``), ``config.json`` and ``concepts.json``
        (concept names and manipulations). A ``model.safetensors`` left by an earlier version is removed.

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
        if isinstance(store, Store):
            if path is not None:
                raise UserInputError(
                    f"TopKSae.save: path is for saving to a folder, not with a store; got a store and path={path!r}"
                )
            files = SaeFiles.in_store(store, resolve_synonym("sae_id", sae_id, "name", name))
            target: str | Path = files.key()
        else:
            if store is not None and not isinstance(store, str):
                raise ArgumentTypeError(
                    f"TopKSae.save: the first argument must be a Store (sae.save(store, sae_id)) or a name "
                    f"(sae.save(name=..., path=...)), got {type(store).__name__}"
                )
            # sae.save(name, path) positionally: the two slots carry the name and the folder.
            name = resolve_synonym("name", name, "the first positional argument", store)
            path = resolve_synonym("path", path, "the second positional argument", sae_id)
            if path is not None and not isinstance(path, (str, os.PathLike)):
                raise ArgumentTypeError(f"TopKSae.save: path must be a str or os.PathLike, got {type(path).__name__}")
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
    ) -> TopKSae:
        """Load an SAE saved by `save`.

        Call shapes:

        - ``TopKSae.load(store, sae_id)``: from ``sae_models/<sae_id>/`` of the store.
        - ``TopKSae.load(path)`` (or ``path=...``): from a folder holding ``config.json`` and ``model.pt``, or from
          that ``model.pt`` itself. ``<dir>/<name>.pt`` where only the folder ``<dir>/<name>/`` exists (what
          ``sae.save(name=..., path=<dir>)`` writes) loads that folder.

        Weights are read from ``model.pt`` with ``torch.load(weights_only=True)``, or from ``model.safetensors`` in
        folders written by earlier versions; the concept dictionary (``concepts.json``) too. Manipulations saved
        with the SAE are applied only with ``manipulations=True``: a loaded SAE leaves a plain forward unchanged
        (the saved ones wait in ``sae.concepts.saved_manipulations``; ``sae.concepts.apply_saved_manipulations()``).

        Args:
            store: the store it was saved to, or a path (then ``sae_id`` is omitted).
            sae_id: name it was saved under.
            path: the folder or its ``model.pt`` (keyword form of the path).
            device: where to put the parameters (CPU when None).
            manipulations: apply the steering saved with the SAE.

        Returns:
            The SAE, identical (bit-exact weights, same configuration and metadata) to the saved one.

        Raises:
            StoreKeyNotFoundError (a ``FileNotFoundError``): no such SAE / missing file; the message names it.
            CorruptStoreFileError (a ``ValueError``): the weights file holds anything but tensors (refused by
                ``weights_only=True``) or does not decode, or the files do not describe an SAE; the message names
                the file.
            UserInputError: bad arguments.
        """
        if path is not None:
            if store is not None:
                raise UserInputError(
                    f"TopKSae.load: give either a store and sae_id or path, got store={store!r} and path={path!r}"
                )
            store = path
        if isinstance(store, (str, os.PathLike)):
            if sae_id is not None:
                raise UserInputError(
                    f"TopKSae.load: pass either a store and sae_id or a folder path, got path {store!r} and "
                    f"sae_id={sae_id!r}"
                )
            folder, model_file = locate_folder(Path(store))
            return load_sae(cls, SaeFiles.in_folder(folder), device=device, model_file=model_file,
                            manipulations=manipulations)
        if not isinstance(store, Store):
            raise ArgumentTypeError(
                f"TopKSae.load: the first argument must be a Store or a path, got {type(store).__name__}"
            )
        if sae_id is None:
            raise UserInputError("TopKSae.load: sae_id is required when loading from a store, got sae_id=None")
        files = SaeFiles.in_store(store, sae_id)
        if not files.exists(CONFIG_FILE):
            raise StoreKeyNotFoundError(
                f"TopKSae.load: no saved SAE {sae_id!r} in the store (missing {files.where(CONFIG_FILE)})"
            )
        return load_sae(cls, files, device=device, manipulations=manipulations)

    @classmethod
    def load_from_dir(cls, path: str | os.PathLike[str], *, device: str | torch.device | None = None) -> TopKSae:
        """``TopKSae.load(path)``: load from a plain folder (``config.json`` with ``model.pt``, or the
        ``model.safetensors`` of earlier versions) or its weights file.

        Args:
            path: the folder (e.g. ``<store>/sae_models/<sae_id>``) or its ``model.pt``.
            device: where to put the parameters (CPU when None).
        """
        return cls.load(path=path, device=device)

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
