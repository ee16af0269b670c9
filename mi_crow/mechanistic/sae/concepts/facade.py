"""`AutoencoderConcepts`: the one object behind ``sae.concepts`` (discovery, naming, steering, persistence).

It owns a :class:`~mi_crow.mechanistic.sae.concepts.tracker.TopTextTracker` (discovery), a
:class:`~mi_crow.mechanistic.sae.concepts.dictionary.ConceptDictionary` (naming) and a
:class:`~mi_crow.mechanistic.sae.concepts.steering.Steering` (manipulations), and turns the SAE's batch context into
what each of them needs. It refers to the SAE only through its attributes (``n_latents``, ``context``), so this
package never imports the SAE module.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.concepts.dictionary import Concept, ConceptDictionary
from mi_crow.mechanistic.sae.concepts.export import write_top_texts_csv, write_top_texts_json
from mi_crow.mechanistic.sae.concepts.persistence import read_document, write_document
from mi_crow.mechanistic.sae.concepts.steering import Steering
from mi_crow.mechanistic.sae.concepts.tracker import NeuronStats, TopText, TopTextTracker
from mi_crow.validation import check_positive_int, fail_type

logger = logging.getLogger(__name__)

__all__ = ["AutoencoderConcepts"]


class AutoencoderConcepts:
    """Concept discovery, naming and steering for one SAE (``sae.concepts``).

    Args:
        sae: the SAE; needs ``n_latents`` and, for steering through ``modify_code``, nothing else. Its hook calls
            :meth:`observe` (when :attr:`tracking_enabled`) and :meth:`modify_code` on every forward.

    Attributes:
        dictionary: the :class:`ConceptDictionary` of named neurons.
    """

    def __init__(self, sae: Any) -> None:
        self.sae = sae
        self._dictionary: ConceptDictionary | None = None
        self._tracker: TopTextTracker | None = None
        self._tracking = False
        self._warned_shape = False
        self._steering = Steering(sae)

    # ------------------------------------------------------------------ basics
    @property
    def n_latents(self) -> int:
        """Number of latents of the SAE."""
        return int(self.sae.n_latents)

    @property
    def dictionary(self) -> ConceptDictionary:
        """The concept dictionary (created empty on first use)."""
        if self._dictionary is None or self._dictionary.n_latents != self.n_latents:
            self._dictionary = ConceptDictionary(self.n_latents)
        return self._dictionary

    @dictionary.setter
    def dictionary(self, value: ConceptDictionary) -> None:
        if not isinstance(value, ConceptDictionary):
            raise fail_type("dictionary", "a ConceptDictionary", value)
        if value.n_latents != self.n_latents:
            raise UserInputError(
                f"dictionary is for n_latents={value.n_latents}, but the SAE has n_latents={self.n_latents}"
            )
        self._dictionary = value

    def _resolve(self, neuron_idx_or_name: int | str) -> int:
        return self.dictionary.resolve(neuron_idx_or_name)

    # ------------------------------------------------------------------ tracking
    @property
    def tracking_enabled(self) -> bool:
        """Whether forwards through the attached SAE update the top texts."""
        return self._tracking

    @property
    def top_k(self) -> int | None:
        """Texts kept per neuron, or ``None`` if tracking was never enabled."""
        return None if self._tracker is None else self._tracker.top_k

    def enable_text_tracking(self, top_k: int = 10) -> None:
        """Start collecting each neuron's top ``top_k`` texts during inference.

        Re-enabling with the same ``top_k`` continues from what was collected; a different ``top_k`` starts
        afresh.

        Args:
            top_k: texts kept per neuron, a positive int.

        Raises:
            ArgumentTypeError / UserInputError: ``top_k`` is not a positive int.
        """
        top_k = check_positive_int(top_k, "top_k")
        if self._tracker is None or self._tracker.top_k != top_k or self._tracker.n_latents != self.n_latents:
            if self._tracker is not None:
                logger.info("top_k changed from %d to %d: tracking starts afresh", self._tracker.top_k, top_k)
            self._tracker = TopTextTracker(self.n_latents, top_k)
        self._tracking = True

    def disable_text_tracking(self) -> None:
        """Stop updating; what was collected stays available."""
        self._tracking = False

    def reset_tracking(self) -> None:
        """Forget all collected top texts and statistics (tracking stays on or off as it was)."""
        if self._tracker is not None:
            self._tracker.reset()

    def observe(self, values: Tensor, indices: Tensor, context: Any) -> None:
        """Update the top texts from one forward's sparse code. Called by the SAE's hook.

        Args:
            values: ``[batch, seq, k]`` code values.
            indices: ``[batch, seq, k]`` int64 latent indices.
            context: the ``BatchContext`` the LanguageModel set on the SAE (``texts``, ``input_ids``,
                ``attention_mask``, ``special_tokens_mask``, ``tokenizer``).

        Raises:
            RuntimeError: tracking is on but ``context`` is ``None`` (the SAE runs outside a LanguageModel, so
                there are no texts to attribute activations to).
            ValueError: ``values`` is not ``[batch, seq, k]`` or the context's batch does not match.
        """
        if not self._tracking or self._tracker is None:
            return
        if context is not None and (getattr(context, "generation_step", None) or 0) >= 1:
            # Generated tokens are not part of the context's texts.
            return
        if context is None:
            raise RuntimeError(
                "text tracking is enabled but the SAE has no batch context: attach it to a LanguageModel with "
                "lm.attach_sae(sae, layer) and run inference through the LanguageModel (or call "
                "sae.concepts.disable_text_tracking())"
            )
        if values.dim() != 3:
            raise UserInputError(f"values must be [batch, seq, k], got shape {tuple(values.shape)}")
        b, s, _ = values.shape
        input_ids = context.input_ids
        if input_ids is None or tuple(input_ids.shape) != (b, s):
            got = None if input_ids is None else tuple(input_ids.shape)
            if not self._warned_shape:
                logger.warning(
                    "not tracking a forward whose tokens %s do not match the batch context %s (e.g. a cached "
                    "generation step)", (b, s), got,
                )
                self._warned_shape = True
            return
        texts = list(context.texts)
        if len(texts) != b:
            raise UserInputError(f"context.texts has {len(texts)} texts but the batch has {b} rows")
        device = values.device
        attention = getattr(context, "attention_mask", None)
        attention = (
            torch.ones((b, s), dtype=torch.bool, device=device) if attention is None
            else attention.to(device=device).bool()
        )
        valid = attention
        special = getattr(context, "special_tokens_mask", None)
        if special is not None:
            valid = valid & ~special.to(device=device).bool()
        text_positions = attention.to(torch.int64).cumsum(dim=1) - 1
        tokenizer = getattr(context, "tokenizer", None)
        if tokenizer is not None:
            self._tracker.tokenizer = tokenizer
        self._tracker.update(values, indices, texts, input_ids.to(device), valid, text_positions)

    def get_top_texts(self, neuron_idx: int | str | None = None) -> list[list[TopText]] | list[TopText]:
        """The collected top texts.

        Args:
            neuron_idx: a neuron index or concept name for one neuron's list, ``None`` for all neurons.

        Returns:
            For one neuron, a list of :class:`TopText` strongest first (at most ``top_k``; fewer if the neuron
            fired in fewer texts). For all neurons, a list of ``n_latents`` such lists.

        Raises:
            RuntimeError: tracking was never enabled.
        """
        tracker = self._require_tracker()
        if neuron_idx is None:
            return tracker.top_texts()
        return tracker.top_texts([self._resolve(neuron_idx)])[0]

    def neuron_stats(self) -> NeuronStats:
        """Firing count and rate, mean activation when active, maximum activation, per neuron.

        Raises:
            RuntimeError: tracking was never enabled.
        """
        return self._require_tracker().stats()

    def _require_tracker(self) -> TopTextTracker:
        if self._tracker is None:
            raise RuntimeError("no tracking data: call sae.concepts.enable_text_tracking(top_k) and run inference")
        return self._tracker

    def export_top_texts_json(self, path: str | os.PathLike[str], include_empty: bool = False) -> Path:
        """Write the top texts and statistics as JSON.

        Layout: ``{"n_latents", "top_k", "tokens_seen", "neurons": [{"neuron", "name", "firing_count",
        "mean_activation", "max_activation", "top_texts": [{"text", "activation", "token_position", "token",
        "token_id"}, ...]}, ...]}``; neurons with no entry are left out unless ``include_empty``.

        Returns:
            The path written (atomically).
        """
        return write_top_texts_json(path, self._require_tracker(), self.dictionary, include_empty)

    def export_top_texts_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write one CSV row per (neuron, rank): ``neuron,name,rank,activation,token_position,token,token_id,text``.

        Returns:
            The path written (atomically).
        """
        return write_top_texts_csv(path, self._require_tracker(), self.dictionary)

    # ------------------------------------------------------------------ dictionary
    def name_concept(self, neuron_idx: int, name: str, notes: str = "") -> Concept:
        """Name a neuron (see :meth:`ConceptDictionary.add`). Returns the stored :class:`Concept`."""
        return self.dictionary.add(neuron_idx, name, notes)

    def find_concept(self, name: str) -> int:
        """The neuron index of a named concept; ``ValueError`` for an unknown name."""
        return self.dictionary.index_of(name)

    def import_csv(self, path: str | os.PathLike[str], replace: bool = False) -> int:
        """Import names from a ``neuron,name[,notes]`` CSV (see :meth:`ConceptDictionary.import_csv`)."""
        return self.dictionary.import_csv(path, replace=replace)

    def save_dictionary(self, target: Any, sae_id: str | None = None) -> str | Path:
        """Save the concept dictionary (and, for the record, the current manipulations) as JSON.

        The document is ``{"version", "n_latents", "concepts": [{"neuron", "name", "notes"}], "manipulations":
        <get_manipulation_config()>}``.

        Args:
            target: a store (``put_json``) — then it goes to ``sae_models/<sae_id>/concepts.json`` — or a file path.
            sae_id: required with a store, not allowed with a path.

        Returns:
            The store key or the path written.
        """
        data = self.dictionary.to_dict()
        data["manipulations"] = self.get_manipulation_config()
        return write_document(target, sae_id, data)

    def load_dictionary(self, source: Any, sae_id: str | None = None) -> ConceptDictionary:
        """Load the concept dictionary saved by :meth:`save_dictionary`, replacing the current one.

        Manipulations in the file are not applied (use :meth:`load` for both).

        Args:
            source: a store (``get_json``; reads ``sae_models/<sae_id>/concepts.json``) or a file path.
            sae_id: required with a store.

        Returns:
            The loaded dictionary (also set as :attr:`dictionary`).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is malformed or for a different ``n_latents`` (the message names the file).
        """
        data, where = read_document(source, sae_id)
        try:
            loaded = ConceptDictionary.from_dict(data, self.n_latents)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        self._dictionary = loaded
        return loaded

    def save(self, store: Any, sae_id: str) -> str:
        """Save the dictionary and the manipulations beside the SAE: ``sae_models/<sae_id>/concepts.json``.

        Returns:
            The store key.
        """
        return str(self.save_dictionary(store, sae_id))

    def load(self, store: Any, sae_id: str) -> ConceptDictionary:
        """Load ``sae_models/<sae_id>/concepts.json`` from a store: the dictionary and the saved manipulations.

        Returns:
            The loaded dictionary.
        """
        data, where = read_document(store, sae_id)
        previous = self._dictionary
        loaded = self.load_dictionary(store, sae_id)
        manipulations = data.get("manipulations") if isinstance(data, dict) else None
        if manipulations is not None:
            try:
                self.load_manipulation_config(manipulations)
            except (TypeError, ValueError) as exc:
                self._dictionary = previous
                raise type(exc)(f"{where}: {exc}") from None
        return loaded

    # ------------------------------------------------------------------ manipulation
    def manipulate_concept(self, neuron_idx_or_name: int | str, scale: float) -> None:
        """Scale a neuron's activation wherever it fires (1.5 amplifies, 0.5 suppresses, 0 ablates).

        Only tokens where the neuron is among the top-k active latents change: scaling a neuron that did not
        fire does nothing (use :meth:`add_concept` to inject it). Setting a neuron again replaces its scale.

        Args:
            neuron_idx_or_name: neuron index or concept name.
            scale: a finite real number ``>= 0``.

        Raises:
            TypeError / ValueError: bad neuron (out of range, unknown name) or scale (negative, non-numeric).
        """
        self._steering.set_scale(self._resolve(neuron_idx_or_name), scale)

    def add_concept(
        self,
        neuron_idx_or_name: int | str,
        activation: float,
        positions: Sequence[int] | None = None,
    ) -> None:
        """Add ``activation`` of a neuron to the SAE code (steering along its decoder direction).

        The layer output changes by ``activation * W_dec[neuron]`` at the chosen tokens, whether or not the neuron
        fired there. Adding the same neuron again replaces its previous addition.

        Positions: ``None`` means every token of every forward pass. Otherwise a list of token positions within
        each text, as in tracking's ``token_position`` (padding excluded, special tokens counted; negative values
        count from the text's end, ``-1`` is its last token). Positions past a text's length are ignored. During
        ``generate`` the text grows: each generated token is the text's newest token, so ``[-1]`` steers the
        prompt's last token and then every generated token, and a position ``p >= len(prompt)`` steers the
        generated token that lands there. Without a batch context describing the forward (the SAE used outside a
        LanguageModel), positions index the forward's own sequence axis (``dim=-2`` of the code).

        Args:
            neuron_idx_or_name: neuron index or concept name.
            activation: finite real number (negative values push the other way).
            positions: ``None`` or a non-empty sequence of ints.

        Raises:
            TypeError / ValueError: bad neuron, non-numeric or non-finite activation, bad positions.
        """
        self._steering.set_addition(self._resolve(neuron_idx_or_name), activation, positions)

    def reset_manipulations(self) -> None:
        """Remove every scale and addition: the attached SAE leaves the model unchanged again."""
        self._steering.reset()

    @property
    def has_manipulations(self) -> bool:
        """Whether any scale or addition is set."""
        return self._steering.active

    def get_manipulation_config(self) -> dict[str, Any]:
        """The current manipulations as a JSON-able dict (loadable with :meth:`load_manipulation_config`).

        Layout: ``{"version": 1, "scales": [{"neuron", "name", "scale"}], "additions": [{"neuron", "name",
        "activation", "positions"}]}`` sorted by neuron; ``name`` is the concept name or ``None``.
        """
        return self._steering.to_config(self.dictionary)

    def load_manipulation_config(self, config: dict[str, Any]) -> None:
        """Replace the current manipulations with ``config`` (from :meth:`get_manipulation_config`).

        Each entry needs ``neuron`` or, if absent, a ``name`` from the dictionary. Everything is checked before
        anything changes.

        Raises:
            TypeError / ValueError: malformed config; the message names the entry.
        """
        self._steering.load_config(config, self.dictionary.resolve)

    def modify_code(self, values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor] | None:
        """Apply the manipulations to a sparse code. Called by the SAE's hook.

        Args:
            values: ``[batch, seq, k]`` (or ``[tokens, k]``) code values.
            indices: same shape, int64 latent indices.

        Returns:
            ``None`` when no manipulation is set (the SAE then leaves the layer output alone); else
            ``(values2, indices2)`` of shape ``[..., k + n_additions]``: the values multiplied by each manipulated
            neuron's scale where its index appears, followed by one column per :meth:`add_concept` neuron holding
            its added activation (0 at tokens it does not apply to). The SAE adds
            ``decode(values2, indices2) - decode(values, indices)`` to the layer output.
        """
        return self._steering.modify_code(values, indices)

    def __repr__(self) -> str:
        return (
            f"AutoencoderConcepts(n_latents={self.n_latents}, tracking={self._tracking}, top_k={self.top_k}, "
            f"named={len(self.dictionary)}, scales={len(self._steering.scales)}, "
            f"additions={len(self._steering.additions)})"
        )
