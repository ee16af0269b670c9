"""Many SAEs per pass: one read of a stored run (or one model forward per batch) feeds a grid of SAEs.

`SaeGrid` holds members (an SAE, its layer and its `SaeTrainingConfig`), e.g. the product of layers x k x widths x
seeds (`SaeGrid.product`). Each member is a `SaeTrainer` with its own optimizer, dead-latent counters, training run
(``runs/<training_run_id>/config.json``, ``training_history.json``) and saved SAE; the grid reads each batch once
and hands it to every member on that layer in turn.

Checkpoints: the grid writes one file, ``runs/<grid_id>/grid_checkpoint.pt``, holding every member's checkpoint (the
same dict a single run writes) and the shared reader's position, replaced atomically: members can never be left at
different steps by an interruption. ``resume=True`` (in the members' configs) continues all of them from it.

At the end the grid writes its L0/FVU points (the last log record of each member: the window mean over the last
``log_every`` steps) to ``sae_models/<grid_id>.frontier.json``, next to the SAEs; `mi_crow.report.frontier`
renders them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae.config import SaeTrainingConfig
from mi_crow.mechanistic.sae.outliers import attention_sink_mask
from mi_crow.mechanistic.sae.sae import TopKSae
from mi_crow.mechanistic.sae.train.batches import EpochBatches
from mi_crow.mechanistic.sae.train.checkpoint import build_checkpoint
from mi_crow.mechanistic.sae.train.on_the_fly import DEFAULT_BUFFER_BYTES
from mi_crow.mechanistic.sae.train.results import TrainingResult
from mi_crow.mechanistic.sae.train.state import TrainingPlan, TrainingState
from mi_crow.mechanistic.sae.train.trainer import SaeTrainer, _Session
from mi_crow.store.base import Store
from mi_crow.store.errors import CorruptStoreFileError
from mi_crow.validation import check_identifier, fail, fail_type

__all__ = ["FRONTIER_SUFFIX", "GRID_CHECKPOINT_FILE", "GridMember", "GridResult", "SaeGrid"]

logger = logging.getLogger(__name__)

GRID_CHECKPOINT_FILE = "grid_checkpoint.pt"
GRID_CHECKPOINT_FORMAT = 1
FRONTIER_SUFFIX = ".frontier.json"
# Config fields the members of a grid must share: they read the same batches for the same number of steps.
_SHARED_FIELDS = ("batch_size", "n_tokens", "epochs", "shuffle", "shuffle_buffer_tokens", "checkpoint_every",
                  "resume", "outlier_norm_factor")


@dataclass
class GridMember:
    """One SAE of a grid: the SAE, the layer it reads, its training config (with its own ``training_run_id``)."""

    sae: TopKSae
    layer: str
    config: SaeTrainingConfig


@dataclass
class GridResult:
    """What `SaeGrid.train` hands back: each member's `TrainingResult` (in member order) and the frontier points
    (``sae_id``, ``layer``, ``k``, ``n_latents``, ``seed``, ``l0``, ``fvu``, ``tokens`` per member)."""

    grid_id: str
    results: list[TrainingResult]
    points: list[dict[str, Any]]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


class _View:
    """What a member's plan and `EpochBatches` see of the shared reader: its size and width, nothing to read."""

    def __init__(self, n_tokens: int, d_in: int) -> None:
        self.n_tokens, self.d_in = n_tokens, d_in

    def __iter__(self) -> Iterator[Tensor]:  # pragma: no cover - members never iterate
        raise RuntimeError("a grid member does not read by itself")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class _Filtered:
    """Stands for the shared reader in a member's step: whether it applied the outlier rule and the sinks it left
    out in the batch at hand (the same count for every member)."""

    def __init__(self, filters_outliers: bool) -> None:
        self.filters_outliers = filters_outliers
        self.count = 0

    def take_outliers(self) -> int:
        return self.count


def _filter_outliers(batch: Tensor, factor: float, dtype: Any, device: Any) -> tuple[Tensor, _Filtered] | None:
    """The trainer's outlier rule on one batch (`SaeTrainer._train_batch`: row norms, `attention_sink_mask` on them,
    the sinks left out): the kept rows and a reader stand-in that reports the sinks; None when the batch is not
    finite."""
    x = batch.to(device=device, dtype=dtype, non_blocking=True)
    norms = (x.norm(dim=1) if x.dtype in (torch.float32, torch.float64)
             else torch.linalg.vector_norm(x, dim=1, dtype=torch.float32))
    sinks = attention_sink_mask(norms.unsqueeze(1), factor=factor)
    total, n_out = torch.stack([norms.sum(), sinks.sum(dtype=norms.dtype)]).tolist()
    if not math.isfinite(total):
        return None
    source = _Filtered(True)
    source.count = int(n_out)
    return (x[~sinks] if n_out else x), source


class _LayerReaders:
    """Several per-layer readers of a stored run in lockstep (same seed, same order): batches as dicts."""

    def __init__(self, readers: dict[str, Any]) -> None:
        self.readers = readers
        self.n_tokens = min(r.n_tokens for r in readers.values())
        self.d_in = {name: r.d_in for name, r in readers.items()}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        names = list(self.readers)
        for batches in zip(*(self.readers[name] for name in names)):
            yield dict(zip(names, batches))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "layer_readers", "readers": {name: r.state_dict() for name, r in self.readers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "layer_readers" or sorted(state["readers"]) != sorted(self.readers):
            raise UserInputError(
                f"cannot resume the grid: its checkpoint reads layers {sorted(state.get('readers', {}))}, this grid "
                f"reads {sorted(self.readers)}"
            )
        for name, reader in self.readers.items():
            reader.load_state_dict(state["readers"][name])


class SaeGrid:
    """A grid of SAEs trained together from one pass over the data.

    Args:
        members: the `GridMember` s (or ``(sae, layer, config)`` tuples); each config needs its own
            ``training_run_id`` (`product` names them). The members must share ``batch_size``, ``n_tokens``,
            ``epochs``, ``shuffle``, ``checkpoint_every``, ``resume`` and ``outlier_norm_factor``.
        store: where runs, checkpoints and SAEs go (None: no checkpoints, nothing saved).
        grid_id: name of the grid (its checkpoint folder ``runs/<grid_id>/`` and frontier file).
    """

    def __init__(self, members: Sequence[Any], store: Store | None = None, grid_id: str = "grid") -> None:
        self.members = [m if isinstance(m, GridMember) else GridMember(*m) for m in members]
        if not self.members:
            raise UserInputError("SaeGrid: members must hold at least one SAE, got none")
        if store is not None and not isinstance(store, Store):
            raise fail_type("SaeGrid: store", "a Store or None", store)
        self.store = store
        self.grid_id = check_identifier(grid_id, "SaeGrid: grid_id")
        first = self.members[0].config
        ids = []
        for member in self.members:
            if not isinstance(member.sae, TopKSae):
                raise fail_type("SaeGrid: member sae", "a TopKSae", member.sae)
            if not isinstance(member.config, SaeTrainingConfig):
                raise fail_type("SaeGrid: member config", "a SaeTrainingConfig", member.config)
            for name in _SHARED_FIELDS:
                if getattr(member.config, name) != getattr(first, name):
                    raise UserInputError(
                        f"SaeGrid: every member must have the same {name} (they read the same batches), got "
                        f"{getattr(first, name)!r} and {getattr(member.config, name)!r}"
                    )
            ids.append(member.config.training_run_id)
        if None in ids or len(set(ids)) != len(ids):
            raise UserInputError(f"SaeGrid: every member needs its own training_run_id, got {ids}")

    @classmethod
    def product(
        cls,
        widths: dict[str, int],
        *,
        k: Sequence[int],
        n_latents: Sequence[int],
        seed: Sequence[int] = (0,),
        config: SaeTrainingConfig | None = None,
        store: Store | None = None,
        grid_id: str = "grid",
        resume: bool | None = None,
    ) -> SaeGrid:
        """The grid of every ``(layer, k, n_latents, seed)``: an SAE ``n_latents x widths[layer]`` with top-``k``,
        trained with ``config`` (``seed`` replaced; run and SAE named ``<grid_id>-<layer>-k<k>-n<n>-s<seed>``).

        Args:
            widths: layer name -> its width (``lm.layers.width(layer)`` or the stored run's ``layer_dims``).
            k, n_latents, seed: the values of each axis.
            config: the shared settings (default `SaeTrainingConfig()`).
            store, grid_id: as in the constructor.
            resume: continue the grid from its checkpoint (None: ``config.resume``; a shared config cannot say
                ``resume=True`` itself, having no ``training_run_id``).
        """
        base = config if config is not None else SaeTrainingConfig()
        if not isinstance(base, SaeTrainingConfig):
            raise fail_type("SaeGrid.product: config", "a SaeTrainingConfig or None", base)
        for name, values in (("k", k), ("n_latents", n_latents), ("seed", seed), ("widths", list(widths))):
            if len(values) == 0:
                raise fail(f"SaeGrid.product: {name}", "at least one value", values)
        members = []
        for layer, d in widths.items():
            for k_ in k:
                for n in n_latents:
                    if k_ > n:
                        raise fail("SaeGrid.product: k", f"<= every n_latents (got n_latents={n})", k_)
                    for s in seed:
                        name = f"{grid_id}-{_slug(layer)}-k{k_}-n{n}-s{s}"
                        member_config = dataclasses.replace(base, seed=s, training_run_id=name, sae_id=name,
                                                            resume=base.resume if resume is None else bool(resume))
                        members.append(GridMember(TopKSae(n_latents=n, n_inputs=int(d), k=k_), layer, member_config))
        return cls(members, store=store, grid_id=grid_id)

    # -- entry points --------------------------------------------------------------------------------------------
    def train(self, run_id: str, store: Store | None = None) -> GridResult:
        """Train every member from one read of activation run ``run_id`` (one reader per stored layer, all with the
        same order).

        Raises:
            UserInputError: unknown run or layer, a width that does not match a member's SAE, no store.
        """
        store = self._store(store)
        check_identifier(run_id, "SaeGrid.train: run_id")
        if run_id not in store.list_runs():
            raise UserInputError(f"SaeGrid.train: unknown activation run_id {run_id!r}; runs: {store.list_runs()}")
        meta = store.read_run_meta(run_id)
        dims = meta.get("layer_dims", {})
        for member in self.members:
            if member.layer not in dims:
                raise UserInputError(
                    f"SaeGrid.train: layer {member.layer!r} is not stored in run {run_id!r}; stored: {sorted(dims)}"
                )
            if int(dims[member.layer]) != member.sae.n_inputs:
                raise UserInputError(
                    f"SaeGrid.train: layer {member.layer!r} has width {dims[member.layer]} but SAE "
                    f"{member.config.training_run_id!r} has n_inputs={member.sae.n_inputs}"
                )
        config = self.members[0].config
        layers = list(dict.fromkeys(m.layer for m in self.members))
        dtype = self.members[0].sae.dtype

        def factory(epoch: int) -> _LayerReaders:
            kwargs: dict[str, Any] = {"shuffle": config.shuffle, "seed": config.seed + epoch, "dtype": dtype,
                                      "drop_last": True}
            if config.shuffle_buffer_tokens is not None:
                kwargs["buffer_tokens"] = config.shuffle_buffer_tokens
            return _LayerReaders({name: store.activation_reader(run_id, name, config.batch_size, **kwargs)
                                  for name in layers})

        # Members with the same layer, seed, sample size and dtype initialise b_dec from the same sample: it is read
        # once (the tokens the initialisation takes) and handed to each of them; dropped once every member started.
        cache: dict[tuple[Any, ...], list[Tensor]] = {}

        def sample(member: GridMember):
            size = member.config.b_dec_init_tokens
            key = (member.layer, member.config.seed, size, member.sae.dtype)

            def read() -> Iterator[Tensor]:
                if key not in cache:
                    reader = store.activation_reader(
                        run_id, member.layer, min(config.batch_size, size), shuffle=True, seed=member.config.seed,
                        dtype=member.sae.dtype, buffer_tokens=size, drop_last=False,
                    )
                    batches, have = [], 0
                    for batch in reader:
                        batches.append(batch)
                        have += batch.shape[0]
                        if have >= size:
                            break
                    cache[key] = batches
                return iter(cache[key])

            return read

        model_id = meta.get("model_id", meta.get("model_name"))
        return self._run(factory, {id(m): sample(m) for m in self.members}, run_id, model_id, filtered=False,
                         started=cache.clear)

    def train_from_model(
        self,
        lm: Any,
        dataset: Any,
        *,
        forward_batch_size: int = 16,
        max_length: int = 128,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> GridResult:
        """Train every member from one forward pass per batch of texts (every member layer captured at once; see
        `SaeTrainer.train_from_model` for the stream, its buffer and its resume rules)."""
        from mi_crow.mechanistic.sae.train.on_the_fly import ModelActivationStream, texts_of

        self._store(self.store, required=False)
        resolved = {m.layer: lm.layers.resolve(m.layer) for m in self.members}
        for member in self.members:
            member.layer = resolved[member.layer]
            width = int(lm.layers.width(member.layer))
            if width != member.sae.n_inputs:
                raise UserInputError(
                    f"SaeGrid.train_from_model: layer {member.layer!r} has width {width} but SAE "
                    f"{member.config.training_run_id!r} has n_inputs={member.sae.n_inputs}"
                )
        config = self.members[0].config
        first = self.members[0].sae
        stream = ModelActivationStream(
            lm, texts_of(dataset), list(dict.fromkeys(m.layer for m in self.members)), batch_size=config.batch_size,
            forward_batch_size=forward_batch_size, max_length=max_length, buffer_bytes=buffer_bytes, seed=config.seed,
            dtype=first.dtype, device=first.device, outlier_norm_factor=config.outlier_norm_factor,
        )
        samples = {id(m): (lambda layer=m.layer: stream.sample(layer)) for m in self.members}
        return self._run(lambda epoch: stream.reader(epoch), samples, None, getattr(lm, "model_id", None),
                         filtered=True)

    # -- the run -------------------------------------------------------------------------------------------------
    def _store(self, store: Store | None, required: bool = True) -> Store | None:
        if store is not None:
            if not isinstance(store, Store):
                raise fail_type("SaeGrid.train: store", "a Store", store)
            self.store = store
        config = self.members[0].config
        if self.store is None and (required or config.checkpoint_every is not None or config.resume
                                   or any(m.config.save_sae for m in self.members)):
            raise UserInputError(
                "SaeGrid: no store; pass SaeGrid(members, store) (training from a model without one needs "
                "checkpoint_every=None, resume=False and save_sae=False in every member's config)"
            )
        return self.store

    def _run(self, factory: Any, samples: dict[int, Any], run_id: str | None, model_id: str | None,
             *, filtered: bool, started: Any = None) -> GridResult:
        store = self.store
        config = self.members[0].config
        reader = factory(0)
        trainers, plans = [], []
        for member in self.members:
            trainer = SaeTrainer(member.sae, store)
            trainer.config = trainer._check_config(member.config)
            d_in = reader.d_in[member.layer]
            plans.append(TrainingPlan.make(trainer.config, member.sae, _View(reader.n_tokens, d_in), run_id,
                                           member.layer, model_id))
            trainers.append(trainer)
        steps = {plan.training_run_id: plan.total_steps for plan in plans}
        if len(set(steps.values())) != 1:
            raise UserInputError(f"SaeGrid: the members plan different numbers of steps: {steps}")
        total = plans[0].total_steps
        with contextlib.ExitStack() as locks:
            if store is not None:
                locks.enter_context(store.lock_run(self.grid_id, kind="training", purpose="grid training"))
                for plan in plans:
                    locks.enter_context(store.lock_run(plan.training_run_id, kind="training", purpose="grid training"))
            saved = self._read_checkpoint() if config.resume else None
            sessions: list[_Session] = []
            for member, trainer, plan in zip(self.members, trainers, plans):
                entry = None if saved is None else saved["members"].get(plan.training_run_id)
                if saved is not None and entry is None:
                    raise UserInputError(
                        f"cannot resume the grid {self.grid_id!r}: its checkpoint has no member "
                        f"{plan.training_run_id!r} (members: {sorted(saved['members'])})"
                    )
                view = _View(reader.n_tokens, reader.d_in[member.layer])
                sessions.append(trainer._open(plan, lambda epoch, v=view: v, view, samples[id(member)], (), None,
                                              checkpoint=entry))
            if started is not None:
                started()
            grid_state = TrainingState()
            reader_state = None
            if saved is not None:
                grid_state.epoch, grid_state.step = int(saved["epoch"]), int(saved["step"])
                reader_state = saved["reader"]
            batches = EpochBatches(factory, grid_state, reader, reader_state)
            proxy = _Filtered(filtered)
            shared = None if filtered else self._shared_filter()
            failed = True
            try:
                while any(s.state.step < total for s in sessions):
                    batch = batches.next()
                    reader_now = batches.reader
                    proxy.count = reader_now.take_outliers() if filtered else 0
                    # A stored run's batch: the outlier rule (and the dtype conversion) once per layer for every
                    # member, as each member's step would apply it (a non-finite batch goes to the members as it is:
                    # each skips it).
                    inputs = {}
                    for layer in dict.fromkeys(m.layer for m in self.members):
                        inputs[layer] = (batch[layer], proxy)
                        if shared is not None:
                            done = _filter_outliers(batch[layer], *shared)
                            if done is not None:
                                inputs[layer] = done
                    for member, trainer, session in zip(self.members, trainers, sessions):
                        if session.state.step < total:
                            x, source = inputs[member.layer]
                            trainer._advance(session, x, source, checkpoints=False)
                    grid_state.step += 1
                    every = config.checkpoint_every
                    if (store is not None and every is not None and grid_state.step % every == 0
                            and any(s.state.step < total for s in sessions)):
                        self._write_checkpoint(trainers, sessions, grid_state, reader_now)
                results = [trainer._finish(session.plan, session.state, session.run_config)
                           for trainer, session in zip(trainers, sessions)]
                failed = False
            finally:
                for trainer, session in zip(trainers, sessions):
                    trainer._close(session, failed)
        points = [self._point(member, result) for member, result in zip(self.members, results)]
        if store is not None:
            store.put_json(f"sae_models/{self.grid_id}{FRONTIER_SUFFIX}",
                           {"grid_id": self.grid_id, "activation_run_id": run_id, "model_id": model_id,
                            "points": points})
        return GridResult(self.grid_id, results, points)

    def _shared_filter(self) -> tuple[float, Any, Any] | None:
        """``(factor, dtype, device)`` when every member applies the same outlier rule to the same tensors (then
        the grid applies it once per layer), else None."""
        factor = self.members[0].config.outlier_norm_factor
        kinds = {(m.sae.dtype, m.sae.device) for m in self.members}
        if factor is None or len(kinds) != 1:
            return None
        dtype, device = next(iter(kinds))
        return factor, dtype, device

    @staticmethod
    def _point(member: GridMember, result: TrainingResult) -> dict[str, Any]:
        last = result.history[-1] if result.history else {}
        return {"sae_id": result.sae_id or result.training_run_id, "training_run_id": result.training_run_id,
                "layer": member.layer, "k": member.sae.k, "n_latents": member.sae.n_latents,
                "seed": member.config.seed, "l0": last.get("l0"), "fvu": last.get("fvu"), "tokens": result.tokens}

    def _checkpoint_key(self) -> str:
        return f"runs/{self.grid_id}/{GRID_CHECKPOINT_FILE}"

    def _read_checkpoint(self) -> dict[str, Any] | None:
        assert self.store is not None
        key = self._checkpoint_key()
        if not self.store.exists(key):
            logger.info("resume: no grid checkpoint at %s; starting grid %s from scratch", key, self.grid_id)
            return None
        saved = self.store.get_torch(key)
        if not isinstance(saved, dict) or saved.get("format") != GRID_CHECKPOINT_FORMAT:
            raise CorruptStoreFileError(f"SaeGrid: the grid checkpoint {key} has an unknown format")
        return saved

    def _write_checkpoint(self, trainers: list[SaeTrainer], sessions: list[_Session], grid_state: TrainingState,
                          reader: Any) -> None:
        assert self.store is not None
        reader_state = reader.state_dict()
        members = {}
        for trainer, session in zip(trainers, sessions):
            session.state.epoch = grid_state.epoch
            members[session.plan.training_run_id] = build_checkpoint(
                session.plan, trainer.config, trainer.sae, trainer.optimizer, trainer.tokens_since_fired,
                session.state, {}, session.window)
        self.store.put_torch(self._checkpoint_key(), {
            "format": GRID_CHECKPOINT_FORMAT, "grid_id": self.grid_id, "epoch": grid_state.epoch,
            "step": grid_state.step, "reader": reader_state, "members": members,
        })

