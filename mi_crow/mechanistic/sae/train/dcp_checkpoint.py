"""Checkpoints of distributed runs with ``torch.distributed.checkpoint`` (DCP), without pickle.

Layout under the run's folder:

- ``checkpoint/step-<N>/``: a DCP folder. Each rank writes its own tensors (``__<rank>_*.distcp``, tensors saved
  one by one and read back with ``torch.load(weights_only=True)``); the metadata DCP would pickle is written as
  ``metadata.json`` instead (`JsonMetadataWriter` / `JsonMetadataReader`).
- ``checkpoint.json``: the format, the layout (``parallel``, ``world_size``), the step folder, the run's counters,
  history, reader position and metrics window; rank 0 writes it (atomically) after every rank's shards are written,
  so it always names a complete step folder; older step folders are deleted after it.

Tensors: ``sae.<name>`` (BatchTopK's ``sae.threshold`` too), ``optim.<name>.{step,exp_avg,exp_avg_sq}``,
``tokens_since_fired``, ``rng.torch`` and the reader's tensors (``reader.<key>``; a data-parallel rank's own carried
tokens, when it reads only its files, as ``reader.rank<r>.<key>``). Data-parallel tensors are replicated (DCP writes one copy). Latent-sharded
ones indexed by latent (``W_enc``, ``b_enc``, ``W_dec``, their Adam moments, ``tokens_since_fired``) are DTensors
sharded by rows over a CPU device mesh, so a checkpoint written by ``W`` ranks loads on any other number of ranks
(each reads the rows of its new slice); ``b_dec`` and its Adam state are replicated.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from mi_crow.errors import NotSupportedError, UserInputError
from mi_crow.mechanistic.sae.train import distributed

if TYPE_CHECKING:
    from mi_crow.mechanistic.sae.config import SaeTrainingConfig
    from mi_crow.mechanistic.sae.sae import TopKSae
    from mi_crow.mechanistic.sae.train.metrics import MetricsWindow
    from mi_crow.mechanistic.sae.train.results import ActivationReader
    from mi_crow.mechanistic.sae.train.state import TrainingPlan, TrainingState
    from mi_crow.store import Store

__all__ = ["FORMAT", "JsonMetadataReader", "JsonMetadataWriter", "check_layout", "read", "restore", "write"]

logger = logging.getLogger(__name__)

FORMAT = "mi_crow-dcp-1"
META_FILE = "checkpoint.json"
STEPS_DIR = "checkpoint"
_METADATA_JSON = "metadata.json"
_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
_LATENT_INDEXED = ("W_enc", "b_enc", "W_dec")
_MOMENTS = ("exp_avg", "exp_avg_sq")


# -- DCP metadata as JSON ----------------------------------------------------------------------------------------
def _metadata_to_json(metadata: Metadata) -> dict[str, Any]:
    tensors = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise NotSupportedError(f"distributed checkpoint: entry {fqn!r} is not a tensor (only tensors are saved)")
        tensors[fqn] = {
            "dtype": str(md.properties.dtype).removeprefix("torch."),
            "size": list(md.size),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in md.chunks],
        }
    storage = [
        {"fqn": index.fqn, "offset": None if index.offset is None else list(index.offset), "index": index.index,
         "path": info.relative_path, "file_offset": info.offset, "length": info.length,
         "transforms": None if info.transform_descriptors is None else list(info.transform_descriptors)}
        for index, info in (metadata.storage_data or {}).items()
    ]
    planner = {k: list(v) for k, v in (metadata.planner_data or {}).items()}
    return {"version": metadata.version, "tensors": tensors, "storage": storage, "planner_data": planner}


def _metadata_from_json(data: dict[str, Any]) -> Metadata:
    state = {
        fqn: TensorStorageMetadata(
            properties=TensorProperties(dtype=getattr(torch, md["dtype"])),
            size=torch.Size(md["size"]),
            chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in md["chunks"]],
        )
        for fqn, md in data["tensors"].items()
    }
    storage = {
        MetadataIndex(fqn=e["fqn"], offset=None if e["offset"] is None else torch.Size(e["offset"]), index=e["index"]):
        _StorageInfo(relative_path=e["path"], offset=e["file_offset"], length=e["length"],
                     transform_descriptors=e["transforms"])
        for e in data["storage"]
    }
    planner = {k: tuple(v) for k, v in data["planner_data"].items()}
    return Metadata(state_dict_metadata=state, planner_data=planner, storage_data=storage,
                    storage_meta=StorageMeta(), version=data["version"])


class JsonMetadataWriter(FileSystemWriter):
    """DCP's file-system writer with the global metadata written as JSON (``metadata.json``), not pickled."""

    def finish(self, metadata: Metadata, results: list[list[Any]]) -> None:
        storage = {}
        for items in results:
            storage.update({item.index: item.storage_data for item in items})
        metadata.storage_data = storage
        path = Path(self.path)
        tmp = path / f"{_METADATA_JSON}.tmp"
        tmp.write_text(json.dumps(_metadata_to_json(metadata)))
        tmp.replace(path / _METADATA_JSON)


class JsonMetadataReader(FileSystemReader):
    """DCP's file-system reader for folders written by `JsonMetadataWriter` (tensors are read with
    ``torch.load(weights_only=True)``; nothing is unpickled)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = _metadata_from_json(json.loads((Path(self.path) / _METADATA_JSON).read_text()))
        metadata.storage_meta.load_id = self.load_id
        return metadata


# -- state -------------------------------------------------------------------------------------------------------
_MESH: dict[int, Any] = {}


def _mesh() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world not in _MESH:
        _MESH[world] = init_device_mesh("cpu", (world,))
    return _MESH[world]


def _sharded(local: torch.Tensor, n_total: int) -> Any:
    """``local`` (this rank's rows) as a row-sharded DTensor of ``n_total`` rows."""
    from torch.distributed.tensor import DTensor, Shard

    shape = (n_total, *local.shape[1:])
    return DTensor.from_local(local, _mesh(), [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def _tensors(sae: TopKSae, optimizer: torch.optim.Optimizer, tokens_since_fired: torch.Tensor, parallel: str,
             world: int, *, fill_optimizer: bool) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The state's tensors by DCP name (DTensors for the latent-indexed ones when sharding latents) and the Adam
    state per parameter name (created, zero, when ``fill_optimizer`` and the optimizer has none yet)."""
    n_total = sae.n_latents * (world if parallel == "latents" else 1)

    def wrap(name: str, t: torch.Tensor) -> Any:
        return _sharded(t, n_total) if parallel == "latents" and name in _LATENT_INDEXED + ("tokens",) else t

    out: dict[str, Any] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for name in _NAMES:
        p = getattr(sae, name)
        out[f"sae.{name}"] = wrap(name, p.data)
        state = optimizer.state.get(p)
        if not state and fill_optimizer:
            state = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                     **{m: torch.zeros_like(p.data, memory_format=torch.preserve_format) for m in _MOMENTS}}
        if state:
            moments[name] = state
            out[f"optim.{name}.step"] = state["step"]
            for m in _MOMENTS:
                out[f"optim.{name}.{m}"] = wrap(name, state[m])
    out["tokens_since_fired"] = wrap("tokens", tokens_since_fired)
    return out, moments


def _buffers(sae: Any) -> dict[str, torch.Tensor]:
    """The SAE's replicated buffers a resume needs (BatchTopK's running ``threshold``)."""
    threshold = getattr(sae, "threshold", None)
    return {"threshold": threshold} if isinstance(threshold, torch.Tensor) else {}


def _reader_key(key: str, rank_local: bool) -> str:
    """The DCP name of a reader tensor: ``reader.<key>`` (the same on every rank, one copy saved) or
    ``reader.rank<r>.<key>`` (this rank's own, e.g. a split reader's carried tokens)."""
    return f"reader.rank{dist.get_rank()}.{key}" if rank_local else f"reader.{key}"


def _all_gather_object(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    distributed._collective("all_gather_object", lambda: dist.all_gather_object(out, obj))
    return out


def _local_path(store: Store, key: str) -> Path:
    path = getattr(store, "path", None)
    if not callable(path):
        raise NotSupportedError(
            f"distributed checkpoints need a local store (a folder every rank can write), not {type(store).__name__}"
        )
    return Path(path(key))


def write(store: Store, plan: TrainingPlan, config: SaeTrainingConfig, sae: TopKSae,
          optimizer: torch.optim.Optimizer, tokens_since_fired: torch.Tensor, state: TrainingState,
          reader: ActivationReader, window: MetricsWindow) -> None:
    """Write the checkpoint of a distributed run (called on every rank; collective)."""
    step_key = f"{plan.prefix}/{STEPS_DIR}/step-{state.step:09d}"
    folder = _local_path(store, step_key)
    tensors, _ = _tensors(sae, optimizer, tokens_since_fired, config.parallel, config.world_size,
                          fill_optimizer=False)
    tensors["rng.torch"] = torch.get_rng_state()
    buffers = _buffers(sae)
    tensors.update({f"sae.{name}": t for name, t in buffers.items()})
    reader_state = dict(reader.state_dict())
    reader_tensors, rank_tensors = {}, {}
    rank_local = set(getattr(reader, "rank_local_state", ()))  # a split reader's own carried tokens
    for key, value in list(reader_state.items()):
        if isinstance(value, torch.Tensor):
            reader_state.pop(key)
            spec = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
            (rank_tensors if key in rank_local else reader_tensors)[key] = spec
            if value.numel():
                tensors[_reader_key(key, key in rank_local)] = value
    # Every rank's own reader tensors are named by rank; rank 0 records their shapes for the load.
    rank_specs = _all_gather_object(rank_tensors) if rank_local else None
    folder.mkdir(parents=True, exist_ok=True)
    try:
        dcp.save(tensors, storage_writer=JsonMetadataWriter(str(folder)))
    except (RuntimeError, ValueError) as exc:
        raise distributed.DistributedTrainingError(
            f"SaeTrainer: rank {dist.get_rank()}: writing the distributed checkpoint {folder} failed ({exc}); the "
            "previous checkpoint stays"
        ) from exc
    distributed.barrier()  # every rank's shards are on disk before the checkpoint record names them
    if dist.get_rank() == 0:
        n_total = sae.n_latents * (config.world_size if config.parallel == "latents" else 1)
        record = {
            "format": FORMAT,
            "parallel": config.parallel,
            "world_size": config.world_size,
            "step_dir": step_key,
            "config": config.to_dict(),
            "total_steps": plan.total_steps,
            "activation_run_id": plan.run_id,
            "layer": plan.layer,
            "sae_shape": [n_total, sae.n_inputs, sae.k],
            "sae_buffers": sorted(buffers),
            **state.to_checkpoint(),
            "reader": reader_state,
            "reader_tensors": reader_tensors,
            **({"reader_rank_tensors": rank_specs} if rank_specs is not None else {}),
            "window": window.to_checkpoint(),
        }
        store.put_json(f"{plan.prefix}/{META_FILE}", record)
        for old in _local_path(store, f"{plan.prefix}/{STEPS_DIR}").iterdir():
            if old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)
    logger.debug("distributed checkpoint at step %d written to %s", state.step, folder)


def read(store: Store, plan: TrainingPlan) -> dict[str, Any] | None:
    """The distributed checkpoint record of the run (with ``_folder``, the step folder's path), or None."""
    key = f"{plan.prefix}/{META_FILE}"
    if not store.exists(key):
        return None
    record = dict(store.get_json(key))
    record["_folder"] = str(_local_path(store, record["step_dir"])) if "step_dir" in record else None
    return record


def _describe(parallel: Any, world: Any) -> str:
    return "a single-process" if parallel is None else f"a parallel={parallel!r} run on {world} ranks, i.e. a"


def check_layout(checkpoint: Any, config: SaeTrainingConfig, plan: TrainingPlan) -> None:
    """Refuse a checkpoint written in another layout.

    Allowed: the same layout and world size, or a latent-sharded checkpoint on any number of ranks (re-sharded).

    Raises:
        UserInputError: naming both layouts.
    """
    if not isinstance(checkpoint, dict):
        return
    distributed_ckpt = checkpoint.get("format") == FORMAT
    saved = (checkpoint.get("parallel"), checkpoint.get("world_size")) if distributed_ckpt else (None, 1)
    current = (config.parallel, config.world_size)
    same = saved[0] == current[0] and (saved[1] == current[1] or saved[0] == "latents")
    if not same:
        raise UserInputError(
            f"SaeTrainer: cannot resume run {plan.training_run_id!r}: its checkpoint was written by "
            f"{_describe(*saved)} layout, this run is {_describe(*current)} layout (resume with the layout that wrote "
            "it; only latent-sharded checkpoints load on a different number of ranks)"
        )


def restore(checkpoint: dict[str, Any], sae: TopKSae, optimizer: torch.optim.Optimizer
            ) -> tuple[torch.Tensor, Any]:
    """Load a checked distributed checkpoint into this rank's SAE (slice), Adam state and RNG (collective).

    Returns:
        ``(tokens_since_fired, the saved TrainingState)``; ``checkpoint["reader"]`` gets its tensors back.
    """
    from mi_crow.mechanistic.sae.train.state import TrainingState

    parallel = checkpoint["parallel"]
    world = dist.get_world_size()
    tokens = torch.zeros(sae.n_latents, dtype=torch.int64, device=sae.device)
    tensors, moments = _tensors(sae, optimizer, tokens, parallel, world, fill_optimizer=True)
    rng = torch.get_rng_state()
    tensors["rng.torch"] = rng
    buffers = _buffers(sae)
    for name in checkpoint.get("sae_buffers", []):  # loaded in place into the SAE's buffer
        if name not in buffers:
            raise UserInputError(f"SaeTrainer: the checkpoint {checkpoint['_folder']} holds the buffer {name!r}, which "
                                 f"a {type(sae).__name__} does not have: it was written for another architecture")
        tensors[f"sae.{name}"] = buffers[name]
    reader_tensors = {}
    rank_specs = checkpoint.get("reader_rank_tensors")
    own = rank_specs[dist.get_rank()] if rank_specs else {}
    for key, spec in [*checkpoint.get("reader_tensors", {}).items(), *own.items()]:
        reader_tensors[key] = torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]))
        if reader_tensors[key].numel():
            tensors[_reader_key(key, key in own)] = reader_tensors[key]
    folder = checkpoint["_folder"]
    try:
        with torch.no_grad():
            dcp.load(tensors, storage_reader=JsonMetadataReader(folder))
    except (RuntimeError, ValueError) as exc:
        raise distributed.DistributedTrainingError(
            f"SaeTrainer: rank {dist.get_rank()}: reading the distributed checkpoint {folder} failed ({exc})"
        ) from exc
    for name, state in moments.items():
        optimizer.state[getattr(sae, name)] = state
    torch.set_rng_state(rng)
    checkpoint["reader"] = {**checkpoint["reader"], **reader_tensors}
    return tokens, TrainingState.from_checkpoint(checkpoint)
