"""Configuration of TopK sparse-autoencoder training.

`SaeTrainingConfig` holds every knob of `SaeTrainer`. It validates itself on construction (naming the field and the
value that is wrong) and round-trips through JSON so that the configuration of a run is saved beside its history,
its checkpoints and the trained SAE.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from mi_crow.errors import UserInputError
from mi_crow.validation import (
    check_bool,
    check_choice,
    check_identifier,
    check_non_negative_int,
    check_positive_int,
    check_real,
    check_str,
    fail,
    fail_type,
)

__all__ = ["DEAD_WINDOW_FRACTION", "SaeTrainingConfig", "dead_window_for"]

_LR_DECAYS = ("none", "linear", "cosine")
_B_DEC_INITS = ("geometric_median", "mean", "zeros", "keep")
_ENCODE_DTYPES = ("float32", "bfloat16")
_OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for_loop")
_PARALLEL = ("data", "latents", "layers")


#: The automatic dead window (``dead_window_tokens=None``) as a fraction of the run's token budget.
DEAD_WINDOW_FRACTION = 0.1
#: OpenAI's dead window, the automatic one's upper bound.
MAX_DEAD_WINDOW_TOKENS = 10_000_000


def dead_window_for(config: "SaeTrainingConfig", budget_tokens: int) -> int:
    """The dead-latent window of a run of ``budget_tokens`` tokens: ``config.dead_window_tokens`` or, when that is
    None, ``DEAD_WINDOW_FRACTION`` of the budget, at least one batch and at most 10M tokens.

    Raises:
        UserInputError: an explicit window larger than the budget (no latent could ever be found dead).
    """
    if config.dead_window_tokens is None:
        return max(config.batch_size, min(MAX_DEAD_WINDOW_TOKENS, int(DEAD_WINDOW_FRACTION * budget_tokens)))
    if config.dead_window_tokens > budget_tokens:
        raise fail(_arg("dead_window_tokens"), f"at most the run's token budget, {budget_tokens} (no latent could ever "
                   "be found dead)", config.dead_window_tokens)
    return config.dead_window_tokens


def _arg(field: str) -> str:
    """How error messages name a field."""
    return f"SaeTrainingConfig.{field}"


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SaeTrainingConfig:
    """Every knob of TopK SAE training (see `SaeTrainer`).

    The defaults follow OpenAI's "Scaling and evaluating sparse autoencoders" (Gao et al., 2024): Adam (with a learning
    rate from a sweep of our own, see ``lr``), MSE plus AuxK on dead latents with coefficient 1/32 and ``k_aux = d_in / 2``,
    unit-norm decoder rows, decoder bias initialised to the geometric median of the data and the encoder initialised as
    the decoder's transpose.

    Raises:
        UserInputError (a ``ValueError``) / ArgumentTypeError (also a ``TypeError``): from ``__post_init__`` when a
            field has a wrong value or type; the message names the field, the value and what was expected.
    """

    n_tokens: int | None = None
    """Token budget: train for ``n_tokens // batch_size`` optimizer steps (the data is repeated, reshuffled, if the run
    is shorter; skipped non-finite batches do not count). Mutually exclusive with ``epochs``; when both are None, one
    epoch over the run is used."""

    epochs: float | None = None
    """Number of passes over the activation run (fractions allowed): ``int(epochs * (run tokens // batch_size))``
    optimizer steps. Mutually exclusive with ``n_tokens``."""

    batch_size: int = 4096
    """Tokens (activation vectors) per optimizer step."""

    lr: float | None = None
    """Peak learning rate. None uses `mi_crow.mechanistic.sae.train.schedule.default_lr` of the dictionary size and
    the run's token budget: ``1.97e-3 * (n_latents / 2**14) ** 0.049 * (budget / 2**20) ** -0.435`` (fitted by
    ``benchmarks/bench_lr_sweep.py``), never below OpenAI's ``2e-4 / sqrt(n_latents / 2**14)``."""

    warmup_steps: int | None = None
    """Steps of linear learning-rate warm-up from 0. None means ``min(1000, total_steps // 20)``."""

    lr_decay: str = "linear"
    """Learning-rate decay after ``lr_decay_start``: ``"none"``, ``"linear"`` or ``"cosine"``."""

    lr_decay_start: float = 0.8
    """Fraction of the total steps after which the learning rate starts to decay (in [0, 1])."""

    lr_final_fraction: float = 0.0
    """Learning rate at the last step as a fraction of the peak (in [0, 1])."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2), each in [0, 1)."""

    adam_eps: float = 6.25e-10
    """Adam's epsilon (OpenAI's value)."""

    optimizer_impl: str = "auto"
    """Adam implementation: ``"fused"``, ``"foreach"``, ``"for_loop"`` or ``"auto"`` (fused where torch offers it for
    the parameters' device and dtype, else foreach)."""

    auxk_coef: float = 1.0 / 32.0
    """Weight of the AuxK loss (0 turns it off)."""

    k_aux: int | None = None
    """Number of dead latents used by the AuxK loss. None means ``n_inputs // 2`` (capped at ``n_latents``)."""

    dead_window_tokens: int | None = None
    """A latent is dead when it has not been active (value > 0) on any of the last ``dead_window_tokens`` tokens; AuxK
    trains the dead ones. None scales the window to the run: ``DEAD_WINDOW_FRACTION`` (1/10) of the token budget,
    at least one batch and at most OpenAI's 10M tokens, so AuxK works in every run, short ones included. Until that
    many tokens have been trained on, no latent can be called dead: the history's ``dead_fraction`` is None ("not
    yet measurable") until then. Must not exceed the budget."""

    normalize_decoder: bool = True
    """Keep decoder rows at unit norm: the gradient component along each row is removed before the optimizer step and
    the rows are renormalised after it."""

    b_dec_init: str = "geometric_median"
    """Decoder-bias initialisation from a sample of the data: ``"geometric_median"``, ``"mean"``, ``"zeros"``, or
    ``"keep"`` (leave the SAE's current ``b_dec``; for fine-tuning with ``reinit_weights=False``)."""

    b_dec_init_tokens: int = 32768
    """Size of the data sample used for ``b_dec_init``."""

    init_encoder_from_decoder: bool = True
    """Initialise the encoder weight as the decoder's transpose (``W_enc = W_dec`` in the [n_latents, d_in] layout).
    False: a fresh random encoder when ``reinit_weights`` is on, the SAE's current encoder when it is off."""

    reinit_weights: bool = True
    """Draw fresh unit-norm decoder rows (and zero ``b_enc``) from ``seed`` before training. False keeps the SAE's
    current decoder and encoder bias; ``b_dec_init`` and ``init_encoder_from_decoder`` still apply (to keep every
    weight, e.g. to fine-tune a trained SAE, also set ``b_dec_init="keep"`` and ``init_encoder_from_decoder=False``)."""

    seed: int = 0
    """Seed of the weight initialisation and of the data shuffling."""

    encode_dtype: str = "float32"
    """dtype of the encoder matrix product: ``"float32"`` or ``"bfloat16"`` (x - b_dec and the encoder weights are
    rounded for that product only, inside the op; the master weights, every gradient, the decoder and the optimizer
    stay in the SAE's dtype). ``"bfloat16"`` is about 2.5x faster per step on CPUs with AMX."""

    normalize_inputs: bool = False
    """Train on inputs multiplied by one scalar ``s`` chosen so that their mean squared norm is ``n_inputs``
    (estimated on the ``b_dec_init`` sample), which makes the learning rate independent of the layer's scale. At the
    end of training the scalar is folded into the weights (``b_enc`` and ``b_dec`` divided by ``s``; latent values
    come out in the raw scale), so the trained SAE takes raw activations like any other."""

    k_anneal_fraction: float = 0.0
    """Fraction of the steps over which the number of active latents decays linearly from ``k_anneal_start`` to the
    SAE's ``k`` (0 turns annealing off). Starting wide lets more latents receive gradient early on."""

    k_anneal_start: int | None = None
    """Active latents at the first step when annealing; None means ``min(n_latents, 4 * k)``."""

    topk_by_decoder_norm: bool = False
    """Select the top-k latents by ``pre-activation * ||W_dec row||`` and decode with unit-norm rows, i.e. treat the
    decoder as if it were normalised (matters with ``normalize_decoder=False``, where row norms drift). The norms are
    folded into the weights at the end of training, so the saved SAE behaves the same under a plain top-k."""

    outlier_norm_factor: float | None = 10.0
    """Tokens whose norm exceeds this multiple of the median norm of the batch's tokens (`attention_sink_mask`, the
    one outlier rule) are left out of training (counted as ``outlier_tokens`` in the history) and later passed
    through unchanged by the SAE's hook and by `evaluate`.
    Attention-sink positions of many LMs (often the first token, with norms ~100x the others) would otherwise
    dominate the variance and the loss. None keeps every token."""

    shuffle: bool = True
    """Shuffle tokens across the run's files (through the store reader's shuffle buffer)."""

    shuffle_buffer_tokens: int | None = None
    """Size of the reader's shuffle buffer in tokens; None uses the store's default."""

    log_every: int = 50
    """Record metrics in the history (and the progress bar) every this many steps."""

    checkpoint_every: int | None = 1000
    """Write a checkpoint every this many steps; None turns checkpointing off."""

    resume: bool = False
    """Continue from the last checkpoint of ``training_run_id`` (which must then be given). Without a checkpoint the
    run starts from scratch."""

    training_run_id: str | None = None
    """Name of the training run (``runs/<training_run_id>/``). None generates one."""

    sae_id: str | None = None
    """Name under which the trained SAE is saved (``sae_models/<sae_id>/``). None uses the training run id."""

    save_sae: bool = True
    """Save the SAE to the store at the end of training."""

    max_nonfinite_fraction: float = 0.01
    """Batches with NaN/Inf activations (or a non-finite loss) are skipped; training stops with an error once the
    skipped fraction exceeds this value (checked after ``nonfinite_grace_batches`` batches and at the end)."""

    nonfinite_grace_batches: int = 100
    """Number of batches seen before ``max_nonfinite_fraction`` is enforced during training."""

    progress: bool = True
    """Show a tqdm progress bar with the live metrics."""

    l1_lambda: float = 0.0
    """Weight of an L1 penalty on the codes, added to the loss: ``l1_lambda * mean(|code|)`` with the mean over
    every token and every latent of the dense code (``sum |values| / (tokens * n_latents)``). 0 (the default) adds
    nothing; TopK already fixes the sparsity, so this is for the original mi-crow recipes that set it."""

    use_wandb: bool = False
    """Log the training history (every log record, and the run's configuration) to Weights & Biases. Needs the
    ``wandb`` package (``pip install wandb`` or ``pip install 'mi_crow[wandb]'``); ``WANDB_MODE=offline`` writes a
    local run without network."""

    wandb_project: str | None = None
    """W&B project name (None: ``WANDB_PROJECT`` or ``"mi_crow"``)."""

    wandb_run_name: str | None = None
    """W&B run name (None: the training run id)."""

    rank: int = 0
    """This process's rank in the ``torch.distributed`` group (``parallel`` set). Left at 0 together with
    ``world_size=1`` under an initialised process group, both are taken from the group; given explicitly, they must
    match it."""

    world_size: int = 1
    """Number of processes of the ``torch.distributed`` group (``parallel`` set); see ``rank``."""

    parallel: str | None = None
    """Distributed layout (needs an initialised ``torch.distributed`` process group, e.g. under ``torchrun``):
    ``"data"`` (each rank trains the same SAE on a disjoint slice of every global batch of ``batch_size`` tokens;
    gradients and statistics are summed over ranks), ``"latents"`` (each rank owns a contiguous slice of the latents
    and their Adam state and sees the whole batch), ``"layers"`` (one SAE per layer, layers spread over the ranks; see
    ``mi_crow.mechanistic.sae.train.distributed.train_layers``). None: single-process training."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata saved with the configuration (e.g. notes about the experiment)."""

    def __post_init__(self) -> None:
        if isinstance(self.adam_betas, list):
            self.adam_betas = tuple(self.adam_betas)  # JSON has no tuples
        positive_int = ("batch_size", "b_dec_init_tokens", "log_every", "nonfinite_grace_batches")
        optional_positive_int = ("n_tokens", "k_aux", "shuffle_buffer_tokens", "checkpoint_every", "dead_window_tokens",
                                 "k_anneal_start")
        for name in positive_int + optional_positive_int:
            check_positive_int(getattr(self, name), _arg(name), allow_none=name in optional_positive_int)
        check_real(self.epochs, _arg("epochs"), minimum=0.0, min_inclusive=False, allow_none=True)
        if self.n_tokens is not None and self.epochs is not None:
            raise UserInputError(
                f"SaeTrainingConfig: give either n_tokens or epochs, not both "
                f"(got n_tokens={self.n_tokens!r}, epochs={self.epochs!r})"
            )
        if self.n_tokens is not None and self.n_tokens < self.batch_size:
            raise fail(_arg("n_tokens"), f"at least batch_size={self.batch_size} (one step)", self.n_tokens)
        if self.n_tokens is not None and self.dead_window_tokens is not None and self.dead_window_tokens > self.n_tokens:
            raise fail(_arg("dead_window_tokens"), f"at most the token budget n_tokens={self.n_tokens} (no latent "
                       "could ever be found dead)", self.dead_window_tokens)
        check_real(self.k_anneal_fraction, _arg("k_anneal_fraction"), minimum=0.0, maximum=1.0)
        for name in ("lr", "adam_eps"):
            check_real(getattr(self, name), _arg(name), minimum=0.0, min_inclusive=False, allow_none=name == "lr")
        check_non_negative_int(self.warmup_steps, _arg("warmup_steps"), allow_none=True)
        for name in ("lr_decay_start", "lr_final_fraction", "max_nonfinite_fraction"):
            check_real(getattr(self, name), _arg(name), minimum=0.0, maximum=1.0)
        betas = self.adam_betas
        if not isinstance(betas, tuple):
            raise fail_type(_arg("adam_betas"), "two numbers in [0, 1)", betas)
        if len(betas) != 2 or not all(_is_real(b) and 0.0 <= b < 1.0 for b in betas):
            raise fail(_arg("adam_betas"), "two numbers in [0, 1)", betas)
        check_real(self.auxk_coef, _arg("auxk_coef"), minimum=0.0)
        check_non_negative_int(self.seed, _arg("seed"))
        check_real(self.outlier_norm_factor, _arg("outlier_norm_factor"), minimum=1.0, min_inclusive=False,
                   allow_none=True)
        for name, choices in (("lr_decay", _LR_DECAYS), ("optimizer_impl", _OPTIMIZER_IMPLS),
                              ("b_dec_init", _B_DEC_INITS), ("encode_dtype", _ENCODE_DTYPES)):
            check_choice(getattr(self, name), _arg(name), choices)
        for name in ("normalize_decoder", "init_encoder_from_decoder", "reinit_weights", "shuffle", "resume",
                     "save_sae", "progress", "normalize_inputs", "topk_by_decoder_norm"):
            check_bool(getattr(self, name), _arg(name))
        # Both name store folders (runs/<training_run_id>/, sae_models/<sae_id>/): one rule for every store key.
        for name in ("training_run_id", "sae_id"):
            if getattr(self, name) is not None:
                check_identifier(getattr(self, name), _arg(name))
        if self.resume and self.training_run_id is None:
            raise UserInputError(
                "SaeTrainingConfig.resume=True needs training_run_id (the run to continue), got training_run_id=None"
            )
        check_positive_int(self.world_size, _arg("world_size"))
        check_non_negative_int(self.rank, _arg("rank"))
        if self.rank >= self.world_size:
            raise fail(_arg("rank"), f"less than world_size={self.world_size}", self.rank)
        if self.parallel is not None:
            check_choice(self.parallel, _arg("parallel"), _PARALLEL)
        elif self.world_size != 1:
            raise fail(_arg("world_size"), "1 without a distributed layout (set parallel='data', 'latents' or "
                       "'layers' to train on several processes)", self.world_size)
        if self.parallel == "data" and self.batch_size % self.world_size:
            raise fail(_arg("batch_size"), f"a multiple of world_size={self.world_size} (data-parallel training "
                       "splits every global batch evenly over the ranks)", self.batch_size)
        if not isinstance(self.extra, dict):
            raise fail_type(_arg("extra"), "a dict", self.extra)
        check_real(self.l1_lambda, _arg("l1_lambda"), minimum=0.0)
        check_bool(self.use_wandb, _arg("use_wandb"))
        check_str(self.wandb_project, _arg("wandb_project"), allow_none=True)
        check_str(self.wandb_run_name, _arg("wandb_run_name"), allow_none=True)

    # -- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Returns the configuration as a JSON-compatible dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out

    def to_json(self) -> str:
        """Returns the configuration as a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SaeTrainingConfig:
        """Builds a configuration from `to_dict` output.

        Raises:
            ValueError: ``data`` has keys that are not fields of the configuration (named in the message).
        """
        if not isinstance(data, dict):
            raise fail_type("SaeTrainingConfig.from_dict: data", "a dict", data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserInputError(f"SaeTrainingConfig.from_dict: unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> SaeTrainingConfig:
        """Builds a configuration from `to_json` output."""
        return cls.from_dict(json.loads(text))

