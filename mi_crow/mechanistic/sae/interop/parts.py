"""`SaeParts`: an SAE as the other libraries store it, in one convention every reader and writer goes through.

Convention (``n`` latents, ``d_in`` input width, ``d_out`` output width; ``d_out == d_in`` for an SAE)::

    x_enc = x - b_dec   if centered   else x                  # [..., d_in]
    pre   = x_enc @ W_enc.T + b_enc                           # [..., n]
    acts  = activation(pre)                                   # topk / jumprelu / relu / batchtopk (below)
    out   = acts @ W_dec + b_dec (+ x @ W_skip.T)             # [..., d_out]

Activations, as the libraries define them at inference:

- ``"topk"``: keep the ``k`` largest of ``relu(pre)`` (mi_crow, sparsify, dictionary_learning; SAELens takes the
  top ``k`` of ``pre`` and then applies ReLU, which gives the same dense code);
- ``"jumprelu"``: ``relu(pre) * (pre > threshold)`` per latent (SAELens, dictionary_learning; circuit-tracer's
  ``pre * (pre > threshold)`` is the same for thresholds >= 0);
- ``"relu"``: ``relu(pre)`` (SAELens ``standard``, dictionary_learning ``AutoEncoder``; a JumpReLU with threshold 0);
- ``"batchtopk"``: at inference ``relu(pre) * (relu(pre) > threshold)`` with one threshold for all latents
  (dictionary_learning ``BatchTopKSAE``); ``k`` is the training sparsity.

Readers fold anything else a format applies (input normalization by a constant, decoder-norm rescaling, the decoder
bias applied or not) into these tensors, and writers unfold what their format needs, so every conversion is written
once per format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from mi_crow.errors import NotSupportedError, UserInputError
from mi_crow.store.errors import CorruptStoreFileError

__all__ = ["ARCHITECTURES", "SaeParts", "parts_from_sae", "sae_from_parts"]

logger = logging.getLogger(__name__)

ARCHITECTURES = ("topk", "jumprelu", "relu", "batchtopk")


@dataclass
class SaeParts:
    """The tensors and settings of an SAE or transcoder in the convention of this module's docstring.

    Attributes:
        architecture: one of `ARCHITECTURES`.
        W_enc: ``[n, d_in]``.
        b_enc: ``[n]``.
        W_dec: ``[n, d_out]``.
        b_dec: ``[d_out]``.
        centered: the encoder reads ``x - b_dec`` (needs ``d_in == d_out``).
        k: active latents (``topk``; the training sparsity of ``batchtopk``).
        threshold: ``[n]`` (``jumprelu``, and ``batchtopk`` where all entries are equal), else None.
        W_skip: ``[d_out, d_in]`` linear skip connection of a skip transcoder, else None.
        transcoder: reads one place and writes another (``hook_name`` -> ``hook_name_out``).
        hook_name / hook_name_out: where it reads / writes, as the file names it (TransformerLens, module path...).
        model_name: the model the file says it was trained on.
        source: format and file, for messages.
        notes: what a reader folded (shown in logs and kept in the SAE's metadata).
    """

    architecture: str
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    centered: bool = True
    k: int | None = None
    threshold: Tensor | None = None
    W_skip: Tensor | None = None
    transcoder: bool = False
    hook_name: str | None = None
    hook_name_out: str | None = None
    model_name: str | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def n_latents(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def check(self) -> SaeParts:
        """Raise `CorruptStoreFileError` (naming `source`) when the shapes or settings contradict each other."""
        where = self.source or "the SAE"
        if self.architecture not in ARCHITECTURES:
            raise NotSupportedError(f"{where}: not supported yet: architecture {self.architecture!r}")
        if self.W_enc.dim() != 2 or self.W_dec.dim() != 2:
            raise CorruptStoreFileError(
                f"{where}: encoder and decoder must be matrices, got W_enc {tuple(self.W_enc.shape)} and W_dec "
                f"{tuple(self.W_dec.shape)}"
            )
        n, d_in, d_out = self.n_latents, self.d_in, self.d_out
        expected = {"W_dec": (n, d_out), "b_enc": (n,), "b_dec": (d_out,)}
        if self.threshold is not None:
            expected["threshold"] = (n,)
        if self.W_skip is not None:
            expected["W_skip"] = (d_out, d_in)
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise CorruptStoreFileError(
                    f"{where}: {name} has shape {got}, but W_enc {tuple(self.W_enc.shape)} implies {shape}"
                )
        if self.centered and d_in != d_out:
            raise CorruptStoreFileError(
                f"{where}: the encoder subtracts b_dec [{d_out}] from inputs of width {d_in}"
            )
        if self.architecture in ("topk", "batchtopk"):
            if not isinstance(self.k, int) or isinstance(self.k, bool) or not 1 <= self.k <= n:
                raise CorruptStoreFileError(f"{where}: k must be an int in 1..{n} (the latents), got {self.k!r}")
        if self.architecture in ("jumprelu", "batchtopk") and self.threshold is None:
            raise CorruptStoreFileError(f"{where}: a {self.architecture} SAE needs a threshold")
        return self

    def float64(self) -> SaeParts:
        """A copy with every tensor in float64 (folds are computed there, then cast back once)."""
        def up(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(torch.float64)

        return replace(self, W_enc=up(self.W_enc), b_enc=up(self.b_enc), W_dec=up(self.W_dec), b_dec=up(self.b_dec),
                       threshold=up(self.threshold), W_skip=up(self.W_skip), notes=list(self.notes))

    def to(self, dtype: torch.dtype) -> SaeParts:
        """A copy with every tensor cast to ``dtype`` (contiguous, on the CPU)."""
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to("cpu", dtype).contiguous()

        return replace(self, W_enc=cast(self.W_enc), b_enc=cast(self.b_enc), W_dec=cast(self.W_dec),
                       b_dec=cast(self.b_dec), threshold=cast(self.threshold), W_skip=cast(self.W_skip),
                       notes=list(self.notes))

    def with_centered(self, centered: bool) -> SaeParts:
        """The same function with the encoder reading ``x - b_dec`` (True) or ``x`` (False).

        ``(x - b_dec) @ W_enc.T + b_enc == x @ W_enc.T + (b_enc - W_enc @ b_dec)``; computed in float64.
        """
        if centered == self.centered:
            return self
        if self.d_in != self.d_out:
            raise NotSupportedError(
                f"{self.source or 'the SAE'}: cannot make the encoder subtract b_dec: input width {self.d_in} differs "
                f"from the output width {self.d_out}"
            )
        shift = self.W_enc.to(torch.float64) @ self.b_dec.to(torch.float64)
        b_enc = self.b_enc.to(torch.float64) + (shift if centered else -shift)
        return replace(self, b_enc=b_enc.to(self.b_enc.dtype), centered=centered, notes=list(self.notes))

    # -- reference semantics (used by tests and the interop benchmark) --------------------------------------------
    def encode_dense(self, x: Tensor) -> Tensor:
        """``[..., d_in] -> [..., n]`` dense code by the formula of the module docstring (plain PyTorch)."""
        x = x.to(self.W_enc.dtype)
        x_enc = x - self.b_dec if self.centered else x
        pre = x_enc @ self.W_enc.T + self.b_enc
        relu = pre.clamp_min(0)
        if self.architecture == "topk":
            top = relu.topk(self.k, dim=-1)
            return torch.zeros_like(relu).scatter(-1, top.indices, top.values)
        if self.architecture == "relu":
            return relu
        if self.architecture == "jumprelu":
            return relu * (pre > self.threshold)
        return relu * (relu > self.threshold)  # batchtopk at inference

    def decode_dense(self, acts: Tensor, x: Tensor | None = None) -> Tensor:
        """``[..., n] -> [..., d_out]``; ``x`` feeds the skip connection when there is one."""
        out = acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise UserInputError("decode_dense: a skip transcoder needs the input x as well")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
        return out


# -- our classes <-> parts ------------------------------------------------------------------------------------------
def _family_classes() -> dict[str, type]:
    """The SAE classes of this installation by architecture (the family classes when they exist)."""
    from mi_crow.mechanistic.sae.sae import TopKSae

    classes: dict[str, type] = {"topk": TopKSae}
    try:  # the JumpReLU / BatchTopK / Transcoder family (another work item) may not be installed yet
        import mi_crow.mechanistic.sae as sae_pkg

        for arch, name in (("jumprelu", "JumpReLUSae"), ("relu", "JumpReLUSae"), ("batchtopk", "BatchTopKSae"),
                           ("transcoder", "Transcoder")):
            cls = getattr(sae_pkg, name, None)
            if cls is not None:
                classes[arch] = cls
    except ImportError:  # pragma: no cover - the package itself always imports
        pass
    return classes


def parts_from_sae(sae: Any) -> SaeParts:
    """The `SaeParts` of one of our SAEs (a copy of its tensors, detached, on the CPU, in its dtype).

    Raises:
        NotSupportedError: an SAE class this module does not know.
    """
    from mi_crow.mechanistic.sae.sae import TopKSae

    def t(name: str) -> Tensor:
        return getattr(sae, name).detach().to("cpu").clone()

    meta = dict(getattr(sae, "metadata", {}) or {})
    layer = meta.get("layer") if meta.get("layer") is not None else getattr(sae, "layer_signature", None)
    common = dict(hook_name=None if layer is None else str(layer), model_name=meta.get("model_id"),
                  source=f"{type(sae).__name__}")
    if type(sae) is TopKSae or (isinstance(sae, TopKSae) and not hasattr(sae, "threshold")):
        return SaeParts("topk", t("W_enc"), t("b_enc"), t("W_dec"), t("b_dec"), centered=True, k=int(sae.k),
                        **common).check()
    raise NotSupportedError(
        f"export: not supported yet: SAE class {type(sae).__name__} (this version exports TopKSae)"
    )


def sae_from_parts(parts: SaeParts, *, dtype: torch.dtype | None = None, device: Any = None,
                   expected: type | None = None) -> Any:
    """Build our SAE for ``parts`` (the class of its architecture).

    Args:
        parts: checked parts.
        dtype: the SAE's dtype (default: the parts' dtype).
        device: where to put it (CPU when None).
        expected: the class ``from_pretrained`` was called on; a file of another architecture is refused unless
            it is a base class of the right one.

    Raises:
        NotSupportedError: an architecture or a transcoder this installation does not run yet ("not supported yet:
            <architecture>").
        UserInputError: the file holds another architecture than ``expected``.
    """
    parts.check()
    classes = _family_classes()
    arch = "transcoder" if parts.transcoder or parts.W_skip is not None else parts.architecture
    where = parts.source or "the file"
    cls = classes.get(arch)
    if cls is None:
        kind = f"transcoder ({parts.architecture})" if arch == "transcoder" else parts.architecture
        raise NotSupportedError(f"{where}: not supported yet: {kind} (this installation runs: {sorted(classes)})")
    if expected is not None and not issubclass(cls, expected):
        raise UserInputError(
            f"{where} holds a {parts.architecture} {'transcoder' if arch == 'transcoder' else 'SAE'}, which loads as "
            f"{cls.__name__}, not {expected.__name__}; call {cls.__name__}.from_pretrained (or the base class)"
        )
    dtype = dtype or parts.dtype
    if arch == "topk":
        p = parts.with_centered(True).to(dtype)
        sae = cls(p.n_latents, p.d_in, p.k, dtype=dtype)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(getattr(p, name))
    else:  # pragma: no cover - wired when the family classes exist
        sae = _family_from_parts(cls, arch, parts, dtype)
    sae.metadata["model_id"] = parts.model_name
    sae.metadata["source"] = parts.source
    if parts.notes:
        sae.metadata["import_notes"] = list(parts.notes)
        for note in parts.notes:
            logger.info("%s: %s", where, note)
    if device is not None:
        sae.to(device)
    return sae


def _family_from_parts(cls: type, arch: str, parts: SaeParts, dtype: torch.dtype) -> Any:  # pragma: no cover
    raise NotSupportedError(f"{parts.source}: not supported yet: {arch}")
