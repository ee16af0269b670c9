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

    def read_through_affine(self, weight: Tensor, bias: Tensor | None, *, output_too: bool) -> SaeParts:
        """The same function for inputs ``y = x * weight + bias`` instead of ``x`` (computed in float64).

        TransformerLens' ``lnX.hook_normalized`` is a norm's output *before* its weight and bias, while the
        HuggingFace norm module returns ``x * weight + bias``; an SAE trained on the former reads the latter
        through ``x = (y - bias) / weight``. With ``output_too`` (an SAE whose output is that same activation) the
        decoder is mapped forward too: ``y_hat = x_hat * weight + bias``.

        Raises:
            NotSupportedError: a weight with zeros (the map is not invertible).
        """
        w = weight.detach().to("cpu", torch.float64).reshape(-1)
        b = torch.zeros_like(w) if bias is None else bias.detach().to("cpu", torch.float64).reshape(-1)
        if w.numel() != self.d_in or b.numel() != self.d_in:
            raise UserInputError(f"{self.source}: the norm has width {w.numel()}, the SAE reads {self.d_in}")
        if bool((w == 0).any()):
            raise NotSupportedError(f"{self.source}: the norm's weight has zeros; its input cannot be recovered")
        p = self.float64()
        if output_too and p.d_out != p.d_in:
            raise NotSupportedError(f"{self.source}: the output width differs from the input width")
        if p.centered:
            # (x - c) with x = (y - b) / w  ==  (y - (b + w * c)) / w; the same vector centres the decoder.
            p.W_enc = p.W_enc / w
            p.b_dec = b + w * p.b_dec
            if output_too:
                p.W_dec = p.W_dec * w
            else:
                raise NotSupportedError(f"{self.source}: a centred encoder whose output is elsewhere")
        else:
            p.W_enc = p.W_enc / w
            p.b_enc = p.b_enc - p.W_enc @ b
            if p.W_skip is not None:
                p.W_skip = p.W_skip / w
                p.b_dec = p.b_dec - p.W_skip @ b
            if output_too:
                p.W_dec = p.W_dec * w
                p.b_dec = p.b_dec * w + b
        p.notes.append("folded the norm's weight and bias into the encoder (TransformerLens' hook_normalized "
                       "is the norm's output before them)")
        return p.to(self.dtype)

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
def _uniform(threshold: Tensor) -> bool:
    flat = threshold.reshape(-1)
    return bool((flat == flat[0]).all())


def parts_from_sae(sae: Any) -> SaeParts:
    """The `SaeParts` of one of our SAEs (copies of its tensors, detached, on the CPU, in its dtype).

    A BatchTopK selection (BatchTopK, Matryoshka, BatchTopK transcoders) whose threshold is not estimated yet infers
    with the per-token top-k, so it is exported as TopK; once estimated, as ``batchtopk`` with that threshold.

    Raises:
        NotSupportedError: an SAE class this module does not know, or a JumpReLU SAE with negative thresholds (it
            lets negative pre-activations through, which the ReLU-first JumpReLU of the other libraries cannot).
    """
    from mi_crow.mechanistic.sae.base import SaeBase

    if not isinstance(sae, SaeBase):
        raise NotSupportedError(f"export: not supported yet: SAE class {type(sae).__name__}")

    def t(name: str) -> Tensor:
        return getattr(sae, name).detach().to("cpu").clone()

    meta = dict(getattr(sae, "metadata", {}) or {})
    layer = meta.get("layer") if meta.get("layer") is not None else getattr(sae, "layer_signature", None)
    transcoder = bool(sae.is_transcoder)
    selection = getattr(sae, "selection", "topk")
    threshold = None
    if selection == "jumprelu":
        arch, threshold = "jumprelu", t("threshold").reshape(-1).expand(sae.n_latents).clone()
        if bool((threshold < 0).any()):
            raise NotSupportedError(
                f"export: {type(sae).__name__} has negative thresholds, which pass negative pre-activations; the "
                f"JumpReLU of the other formats applies a ReLU first"
            )
    elif selection == "batchtopk" and sae.has_threshold():
        arch, threshold = "batchtopk", t("threshold").reshape(-1).expand(sae.n_latents).clone()
    else:
        arch = "topk"
    W_skip = getattr(sae, "W_skip", None)
    parts = SaeParts(
        arch, t("W_enc"), t("b_enc"), t("W_dec"), t("b_dec"), centered=not transcoder, k=int(sae.k),
        threshold=threshold, W_skip=None if W_skip is None else W_skip.detach().to("cpu").clone(),
        transcoder=transcoder, hook_name=None if layer is None else str(layer),
        model_name=meta.get("model_id"), source=type(sae).__name__,
    )
    # A transcoder hooks the module whose output it predicts and reads that module's input: both are named by the
    # module here, and the exporter spells them as that module's input and output.
    parts.hook_name_out = parts.hook_name if transcoder else None
    return parts.check()


def sae_from_parts(parts: SaeParts, *, dtype: torch.dtype | None = None, device: Any = None,
                   expected: type | None = None) -> Any:
    """Build our SAE for ``parts``: the class of its architecture.

    ``topk`` -> `TopKSae`; ``jumprelu`` and ``relu`` -> `JumpReLUSae` (ReLU is threshold 0; a negative threshold of a
    ReLU-first JumpReLU is raised to 0, which selects the same latents); ``batchtopk`` -> `BatchTopKSae` with its
    threshold; transcoders -> `Transcoder` (TopK; BatchTopK, ReLU or a JumpReLU with one threshold run as its
    threshold selection, ``batch_topk=True``).

    Args:
        parts: checked parts.
        dtype: the SAE's dtype (default: the parts' dtype).
        device: where to put it (CPU when None).
        expected: the class ``from_pretrained`` was called on; a file that loads as another class is refused.

    Raises:
        NotSupportedError: what no class runs yet ("not supported yet: ..."), e.g. a JumpReLU transcoder with
            per-latent thresholds, or an autoencoder with a skip connection.
        UserInputError: the file holds another architecture than ``expected``.
    """
    from mi_crow.mechanistic.sae import BatchTopKSae, JumpReLUSae, TopKSae, Transcoder

    parts.check()
    where = parts.source or "the file"
    dtype = dtype or parts.dtype
    thr = None if parts.threshold is None else parts.threshold.to(torch.float64).clamp_min(0)
    if parts.transcoder:
        if parts.architecture != "topk" and parts.architecture != "relu" and not _uniform(thr):
            raise NotSupportedError(
                f"{where}: not supported yet: {parts.architecture} transcoder with per-latent thresholds"
            )
        cls: type = Transcoder
    elif parts.W_skip is not None:
        raise NotSupportedError(f"{where}: not supported yet: an autoencoder with a skip connection")
    elif parts.architecture == "topk":
        cls = TopKSae
    elif parts.architecture == "batchtopk" and _uniform(thr):
        cls = BatchTopKSae
    else:
        cls = JumpReLUSae
    if expected is not None and not issubclass(cls, expected):
        kind = f"{parts.architecture} {'transcoder' if parts.transcoder else 'SAE'}"
        raise UserInputError(
            f"{where} holds a {kind}, which loads as {cls.__name__}, not {expected.__name__}; call "
            f"{cls.__name__}.from_pretrained (or SaeBase.from_pretrained)"
        )
    p = parts.with_centered(not parts.transcoder).to(dtype)
    k = p.k if p.k is not None else min(64, p.n_latents)
    if cls is Transcoder:
        sae = Transcoder(p.n_latents, p.d_in, p.d_out, k, skip=p.W_skip is not None,
                         batch_topk=p.architecture != "topk", dtype=dtype)
    elif cls is JumpReLUSae:
        sae = JumpReLUSae(p.n_latents, p.d_in, k, dtype=dtype)
    else:
        sae = cls(p.n_latents, p.d_in, k, dtype=dtype)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(getattr(p, name))
        if p.W_skip is not None:
            sae.W_skip.copy_(p.W_skip)
        if cls is JumpReLUSae:
            sae.set_threshold(thr if thr is not None else 0.0)
        elif p.architecture != "topk":  # threshold selections of BatchTopKSae / Transcoder: one global value
            sae.threshold.fill_(float(thr.reshape(-1)[0]) if thr is not None else 0.0)
    if parts.threshold is not None and bool((parts.threshold < 0).any()):
        parts.notes.append("thresholds below 0 raised to 0 (same latents: the format applies a ReLU first)")
    sae.metadata["model_id"] = parts.model_name
    sae.metadata["source"] = parts.source
    if parts.notes:
        sae.metadata["import_notes"] = list(parts.notes)
        for note in parts.notes:
            logger.info("%s: %s", where, note)
    if device is not None:
        sae.to(device)
    return sae
