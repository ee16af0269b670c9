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
from mi_crow.mechanistic.sae.concepts.steering import MODES, Steering, _check_finite_number
from mi_crow.mechanistic.sae.concepts.top_texts import TopText, TopTexts
from mi_crow.mechanistic.sae.concepts.tracker import NeuronStats, TopTextTracker
from mi_crow.validation import check_choice, check_positive_int, fail_type, resolve_synonym

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
        # The manipulations found by the last `load`, applied only on request (`apply_saved_manipulations`).
        self.saved_manipulations: dict[str, Any] | None = None
        # Examples across each feature's activation range, filled by `track_from_run` (an ActivationSampler).
        self.activation_sampler: Any = None

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

    def get_top_texts(self, neuron_idx: int | str | None = None) -> TopTexts | list[TopText]:
        """The collected top texts.

        Args:
            neuron_idx: a neuron index or concept name for one neuron's list, ``None`` for all neurons.

        Returns:
            For one neuron, a list of :class:`TopText` strongest first (at most ``top_k``; fewer if the neuron
            fired in fewer texts). For all neurons, a :class:`TopTexts`: a list of ``n_latents`` such lists that is
            also a mapping ``{neuron_idx: entries}`` over the neurons that fired (``.get(42, [])``, ``.items()``).
            Each entry unpacks as ``text, activation = entry`` and has ``.text``, ``.activation``,
            ``.token_position``, ``.token`` and ``.token_id``.

        Raises:
            RuntimeError: tracking was never enabled.
        """
        tracker = self._require_tracker()
        if neuron_idx is None:
            return TopTexts(tracker.top_texts())
        return tracker.top_texts([self._resolve(neuron_idx)])[0]

    def get_top_texts_for_neuron(self, neuron_idx: int | str, top_m: int | None = None) -> list[TopText]:
        """One neuron's top texts, strongest first: ``get_top_texts(neuron_idx)``, cut to the first ``top_m``.

        Args:
            neuron_idx: neuron index or concept name.
            top_m: keep at most this many entries (None: all).
        """
        if top_m is not None:
            top_m = check_positive_int(top_m, "top_m")
        entries = self.get_top_texts(neuron_idx)
        return entries if top_m is None else entries[:top_m]

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

    # The original mi-crow's names of the two exports.
    export_top_texts_to_json = export_top_texts_json
    export_top_texts_to_csv = export_top_texts_csv

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
        <manipulation_state()>}``.

        Args:
            target: a store (``put_json``) — then it goes to ``sae_models/<sae_id>/concepts.json`` — or a file path.
            sae_id: required with a store, not allowed with a path.

        Returns:
            The store key or the path written.
        """
        data = self.dictionary.to_dict()
        data["manipulations"] = self.manipulation_state()
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

    def save(self, target: Any, sae_id: str | None = None) -> str | Path:
        """Save the dictionary and the manipulations beside the SAE: ``sae_models/<sae_id>/concepts.json`` of a
        store, or a file path (then without ``sae_id``).

        Returns:
            The store key or the path written.
        """
        return self.save_dictionary(target, sae_id)

    def load(self, source: Any, sae_id: str | None = None, *, manipulations: bool = False) -> ConceptDictionary:
        """Load what :meth:`save` wrote (``sae_models/<sae_id>/concepts.json`` of a store, or a file path).

        The dictionary replaces the current one. Manipulations are state applied on request only: the saved ones
        are kept in :attr:`saved_manipulations` and applied here only with ``manipulations=True`` (or later with
        :meth:`apply_saved_manipulations`), so loading never steers the model behind the user's back.

        Args:
            source: a store or a file path.
            sae_id: required with a store.
            manipulations: also apply the saved manipulations (replacing the current ones).

        Returns:
            The loaded dictionary.
        """
        data, where = read_document(source, sae_id)
        previous = self._dictionary
        loaded = self.load_dictionary(source, sae_id)
        saved = data.get("manipulations") if isinstance(data, dict) else None
        if saved is not None:
            try:
                # Checked now (a broken file fails at load), applied only when asked.
                Steering(self.sae).load_config(saved, self.dictionary.resolve)
            except (TypeError, ValueError) as exc:
                self._dictionary = previous
                raise type(exc)(f"{where}: {exc}") from None
        self.saved_manipulations = saved
        if manipulations and saved is not None:
            self.load_manipulation_state(saved)
        return loaded

    def apply_saved_manipulations(self) -> None:
        """Apply the manipulations the last :meth:`load` found in the file (replacing the current ones).

        Raises:
            RuntimeError: nothing was loaded, or the file held no manipulations.
        """
        if self.saved_manipulations is None:
            raise RuntimeError("no saved manipulations: load a concepts file that holds some first "
                               "(TopKSae.load(...) or sae.concepts.load(...))")
        self.load_manipulation_state(self.saved_manipulations)

    # ------------------------------------------------------------------ manipulation
    def manipulate_concept(
        self,
        neuron_idx: int | str | None = None,
        scale: float | None = None,
        *,
        neuron_idx_or_name: int | str | None = None,
    ) -> None:
        """Scale a neuron's activation wherever it fires (1.5 amplifies, 0.5 suppresses, 0 ablates, 1.0 resets).

        ``manipulate_concept(neuron_idx=42, scale=1.5)``, ``manipulate_concept(42, 1.5)`` and
        ``manipulate_concept("cats", 0.0)`` (a concept name, see :meth:`name_concept`) all work;
        ``neuron_idx_or_name=`` is a keyword synonym of ``neuron_idx``.

        Only tokens where the neuron is among the top-k active latents change: scaling a neuron that did not
        fire does nothing (use :meth:`add_concept` to inject it). Setting a neuron again replaces its scale; scale
        1.0 removes it (the neuron then passes unchanged, and :meth:`get_manipulation_config` no longer lists it).

        Args:
            neuron_idx: neuron index or concept name.
            scale: a finite real number ``>= 0``.
            neuron_idx_or_name: synonym of ``neuron_idx``.

        Raises:
            TypeError / ValueError: bad neuron (out of range, unknown name) or scale (negative, non-numeric), or
                ``neuron_idx`` and ``neuron_idx_or_name`` given with different values.
        """
        idx = self._resolve(resolve_synonym("neuron_idx", neuron_idx, "neuron_idx_or_name", neuron_idx_or_name))
        self._steering.set_scale(idx, scale)
        if self._steering.scales[idx] == 1.0:
            self._steering.remove_scale(idx)

    def add_concept(
        self,
        neuron_idx_or_name: int | str,
        activation: float | None = None,
        positions: Sequence[int] | None = None,
        *,
        strength: float | None = None,
        exclude_special: bool = False,
    ) -> None:
        """Add ``activation`` of a neuron to the SAE code (steering along its decoder direction).

        The layer output changes by ``activation * W_dec[neuron]`` at the chosen tokens, whether or not the neuron
        fired there. With ``strength`` instead of ``activation`` the added vector has norm ``strength`` times each
        token's residual norm at that layer (``strength=0.5`` adds half the residual's norm along the unit
        direction), which carries over between layers and models. Adding the same neuron again replaces its
        previous edit.

        Positions: ``None`` means every token of every forward pass. Otherwise a list of token positions within
        each text, as in tracking's ``token_position`` (padding excluded, special tokens counted; negative values
        count from the text's end, ``-1`` is its last token). In a plain forward a position that names no token of
        any text is an error; a text shorter than a position is left alone. During ``generate`` (with or without
        a KV cache) the text grows: each generated token is the text's newest token, so ``[-1]`` steers the
        prompt's last token and then every generated token, and a position ``p >= len(prompt)`` steers the
        generated token that lands there. Without a batch context describing the forward (the SAE used outside a
        LanguageModel), positions index the forward's own sequence axis (``dim=-2`` of the code).

        Args:
            neuron_idx_or_name: neuron index or concept name.
            activation: finite real number (negative values push the other way).
            positions: ``None`` or a non-empty sequence of ints.
            strength: instead of ``activation``: a finite multiple of the residual norm.
            exclude_special: leave special tokens (BOS, chat markers) unchanged.

        Raises:
            TypeError / ValueError: bad neuron, non-numeric or non-finite activation, both or neither of
                ``activation`` and ``strength``, bad positions.
        """
        value, relative = _value_or_strength(activation, strength, "activation")
        self._steering.set_edit(self._resolve(neuron_idx_or_name), "add", value, positions, relative=relative,
                                exclude_special=exclude_special)

    def clamp_concept(
        self,
        neuron_idx_or_name: int | str,
        value: float | None = None,
        positions: Sequence[int] | None = None,
        *,
        strength: float | None = None,
        exclude_special: bool = False,
    ) -> None:
        """Set a neuron's activation to ``value`` at the chosen tokens (what it had there is replaced).

        Arguments as in :meth:`add_concept`; ``strength`` gives the value as a multiple of the residual norm.
        """
        value, relative = _value_or_strength(value, strength, "value")
        self._steering.set_edit(self._resolve(neuron_idx_or_name), "clamp", value, positions, relative=relative,
                                exclude_special=exclude_special)

    def cap_concept(
        self,
        neuron_idx_or_name: int | str,
        cap: float | None = None,
        positions: Sequence[int] | None = None,
        *,
        strength: float | None = None,
        exclude_special: bool = False,
    ) -> None:
        """Projection cap: wherever the residual's projection onto the neuron's unit decoder direction exceeds
        ``cap``, remove the excess (so the projection is at most ``cap``; below it nothing changes).

        Arguments as in :meth:`add_concept`; ``strength`` gives the cap as a multiple of the residual norm.
        """
        value, relative = _value_or_strength(cap, strength, "cap")
        self._steering.set_edit(self._resolve(neuron_idx_or_name), "cap", value, positions, relative=relative,
                                exclude_special=exclude_special)

    def ablate_concept(self, neuron_idx_or_name: int | str) -> None:
        """Remove a neuron's contribution wherever it fires (``manipulate_concept(neuron, 0.0)``)."""
        self.manipulate_concept(neuron_idx_or_name, 0.0)

    def steer(
        self,
        neuron_idx_or_name: int | str,
        mode: str = "add",
        value: float | None = None,
        positions: Sequence[int] | None = None,
        *,
        strength: float | None = None,
        exclude_special: bool = False,
    ) -> None:
        """One entry to every steering mode: ``"scale"`` (``value`` is the scale), ``"ablate"`` (no value),
        ``"add"``, ``"clamp"`` and ``"cap"`` (see :meth:`add_concept`, :meth:`clamp_concept`, :meth:`cap_concept`;
        ``strength`` makes the value relative to the residual norm).

        Raises:
            ValueError: an unknown mode, a value missing or given where the mode takes none; the rest as in the
                mode's own method.
        """
        mode = check_choice(mode, "mode", MODES)
        if mode in ("scale", "ablate"):
            if positions is not None or strength is not None or exclude_special:
                raise UserInputError(f"mode {mode!r} applies wherever the neuron fires: positions, strength and "
                                     f"exclude_special are for 'add', 'clamp' and 'cap'")
            if mode == "ablate":
                if value is not None:
                    raise UserInputError(f"mode 'ablate' takes no value, got value={value!r}")
                self.ablate_concept(neuron_idx_or_name)
            else:
                if value is None:
                    raise UserInputError("mode 'scale' needs value= (the scale, e.g. 1.5)")
                self.manipulate_concept(neuron_idx_or_name, value)
            return
        method = {"add": self.add_concept, "clamp": self.clamp_concept, "cap": self.cap_concept}[mode]
        method(neuron_idx_or_name, value, positions, strength=strength, exclude_special=exclude_special)

    def evaluate_steering(self, lm: Any, neuron_idx_or_name: int | str, prompts: Sequence[str],
                          strengths: Sequence[float] | None = None, **kwargs: Any) -> Any:
        """Measure steering one feature over a strength sweep (the SAE must be attached to ``lm``); see
        :func:`mi_crow.mechanistic.sae.concepts.evaluation.evaluate_steering` for the measures and keywords.

        Returns:
            A ``SteeringEvaluation`` (``.table()``, ``.to_json()``, ``.best_strength``).
        """
        from mi_crow.mechanistic.sae.concepts.evaluation import evaluate_steering

        return evaluate_steering(lm, self.sae, neuron_idx_or_name, prompts, strengths, **kwargs)

    def reset_manipulations(self) -> None:
        """Remove every scale and edit: the attached SAE leaves the model unchanged again."""
        self._steering.reset()

    @property
    def has_manipulations(self) -> bool:
        """Whether any scale or addition is set."""
        return self._steering.active

    def manipulation_state(self) -> dict[str, Any]:
        """Every manipulation as a JSON-able dict, loadable with :meth:`load_manipulation_state`; this is what
        :meth:`save` stores (and what ``load(..., manipulations=True)`` applies).

        Layout: ``{"version": 2, "scales": [{"neuron", "name", "scale"}], "additions": [{"neuron", "name",
        "activation", "positions", "relative", "exclude_special"}], "clamps": [... "value" ...], "caps": [...
        "value" ...]}`` sorted by neuron; ``name`` is the concept name or ``None``. Version 1 documents (scales and
        additions only) still load.
        """
        return self._steering.to_config(self.dictionary)

    def load_manipulation_state(self, state: dict[str, Any]) -> None:
        """Replace the current manipulations with ``state`` (from :meth:`manipulation_state`).

        Each entry needs ``neuron`` or, if absent, a ``name`` from the dictionary. Everything is checked before
        anything changes.

        Raises:
            TypeError / ValueError: malformed state; the message names the entry.
        """
        self._steering.load_config(state, self.dictionary.resolve)

    def get_manipulation_config(self) -> dict[int, float]:
        """The current scales as ``{neuron_idx: scale}``, sorted by neuron.

        Re-applied by ``for i, s in config.items(): manipulate_concept(neuron_idx=int(i), scale=s)`` (also after a
        JSON round trip, which turns the keys into strings), or by :meth:`load_manipulation_config`. Additions
        (:meth:`add_concept`) are not part of it; :meth:`manipulation_state` holds both.
        """
        return dict(sorted(self._steering.scales.items()))

    def load_manipulation_config(self, config: dict[Any, Any]) -> None:
        """Apply ``config``: the ``{neuron_idx: scale}`` of :meth:`get_manipulation_config` (keys may be digit
        strings, as after JSON) replaces every scale and keeps the additions; the full dict of
        :meth:`manipulation_state` replaces everything.

        Everything is checked before anything changes.

        Raises:
            TypeError / ValueError: malformed config; the message names the entry.
        """
        if not isinstance(config, dict) or not config or not all(_is_neuron_key(key) for key in config):
            self.load_manipulation_state(config)
            return
        staged = Steering(self.sae)
        for key, scale in config.items():
            try:
                staged.set_scale(self.dictionary.resolve(int(key)), scale)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"config[{key!r}]: {exc}") from None
        self._steering.set_scales(staged.scales)

    def load_concepts(self, concepts: dict[Any, Any]) -> ConceptDictionary:
        """Name neurons from a mapping ``{neuron_idx: name}`` (added to the dictionary; a neuron named again is
        renamed).

        Values may also be ``{"name": ..., "notes": ...}`` dicts (other keys, e.g. ``confidence``, go into the
        notes) or lists of such entries / names, as built from a curated CSV with several candidate names per
        neuron: the first entry names the neuron, the others are kept in its notes. Keys may be digit strings (as
        after JSON). Everything is checked before anything changes.

        Args:
            concepts: neuron index -> name (or entry, or list of entries).

        Returns:
            The updated :attr:`dictionary`.

        Raises:
            TypeError / ValueError: a bad index, an empty or duplicate name, a malformed entry; the message names
                the neuron.
        """
        if not isinstance(concepts, dict):
            raise TypeError(f"concepts must be a dict of neuron_idx -> name, got {type(concepts).__name__}")
        parsed: list[tuple[Any, str, str]] = []
        for key, value in concepts.items():
            try:
                name, notes = _concept_entry(value)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"concepts[{key!r}]: {exc}") from None
            parsed.append((int(key) if _is_neuron_key(key) else key, name, notes))
        staged = ConceptDictionary(self.n_latents)
        renamed = {neuron for neuron, _, _ in parsed if isinstance(neuron, int) and neuron in self.dictionary}
        for concept in self.dictionary:
            # Neurons named again drop their old names first, so names may move between them in any order.
            if concept.neuron not in renamed:
                staged.add(concept.neuron, concept.name, concept.notes)
        for neuron, name, notes in parsed:
            try:
                staged.add(neuron, name, notes)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"concepts[{neuron!r}]: {exc}") from None
        self._dictionary = staged
        return staged

    def modify_code(self, values: Tensor, indices: Tensor, x: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """Apply the manipulations to a sparse code. Called by the SAE's hook.

        Args:
            values: ``[batch, seq, k]`` (or ``[tokens, k]``) code values.
            indices: same shape, int64 latent indices.
            x: ``[..., n_inputs]`` the residual the code encodes (relative strengths and caps need it).

        Returns:
            ``None`` when no manipulation is set (the SAE then leaves the layer output alone); else
            ``(values2, indices2)`` of shape ``[..., k + n_edits]``: the values multiplied by each manipulated
            neuron's scale where its index appears (0 where a clamp replaces them), followed by one column per
            add / clamp / cap neuron holding its added activation (0 at tokens it does not apply to). The SAE adds
            ``decode(values2, indices2) - decode(values, indices)`` to the layer output.
        """
        return self._steering.modify_code(values, indices, x)

    def __repr__(self) -> str:
        return (
            f"AutoencoderConcepts(n_latents={self.n_latents}, tracking={self._tracking}, top_k={self.top_k}, "
            f"named={len(self.dictionary)}, scales={len(self._steering.scales)}, "
            f"edits={len(self._steering.edits)})"
        )


def _value_or_strength(value: Any, strength: Any, name: str) -> tuple[float, bool]:
    """``(number, relative)`` from exactly one of an absolute ``value`` and a relative ``strength``."""
    if (value is None) == (strength is None):
        raise UserInputError(
            f"give exactly one of {name} (absolute) and strength (a multiple of the residual norm), got "
            f"{name}={value!r}, strength={strength!r}"
        )
    if value is None:
        return _check_finite_number(strength, "strength"), True
    return _check_finite_number(value, name), False


def _is_neuron_key(key: Any) -> bool:
    """An int neuron index, or one written as a digit string (JSON object keys are strings)."""
    if isinstance(key, bool):
        return False
    if isinstance(key, int):
        return True
    return isinstance(key, str) and key.strip().isdigit()


def _concept_entry(value: Any) -> tuple[str, str]:
    """``(name, notes)`` from one value of :meth:`AutoencoderConcepts.load_concepts`."""
    if isinstance(value, str):
        return value, ""
    if isinstance(value, dict):
        if "name" not in value:
            raise ValueError(f"an entry must have a 'name', got {value!r}")
        notes = str(value.get("notes", "") or "")
        extra = ", ".join(f"{k}={v}" for k, v in value.items() if k not in ("name", "notes"))
        return value["name"], "; ".join(part for part in (notes, extra) if part)
    if isinstance(value, (list, tuple)) and value:
        name, notes = _concept_entry(value[0])
        others = [_concept_entry(v) for v in value[1:]]
        also = "; ".join(f"{n} ({x})" if x else n for n, x in others)
        return name, "; ".join(part for part in (notes, f"also: {also}" if also else "") if part)
    raise TypeError(f"a concept must be a name, a dict with 'name' or a non-empty list of them, got {value!r}")
