"""Saving layer activations over a dataset into a store, resumably, one forward pass per batch."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mi_crow.hooks import LayerActivationDetector

if TYPE_CHECKING:
    from mi_crow.language_model.language_model import LanguageModel

__all__ = ["LanguageModelActivations", "SAVE_FORMAT_VERSION"]

logger = logging.getLogger(__name__)

SAVE_FORMAT_VERSION = 1

# Fields of meta.json that must agree before a run is resumed: anything else would mix incompatible batches.
_RESUME_KEYS = ("model_id", "layers", "dtype", "batch_size", "max_length", "dataset", "dataset_sha256")


class _StopForward(Exception):
    """Raised from a hook once every requested layer has run, so later layers and the LM head never run."""


class _TextListDataset:
    """The minimal dataset protocol over a list, used when ``mi_crow.datasets`` is not available."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def iter_batches(self, batch_size: int) -> Iterator[list[str]]:
        for start in range(0, len(self.texts), batch_size):
            yield self.texts[start : start + batch_size]

    def describe(self) -> dict[str, Any]:
        return {"type": "TextDataset", "n_texts": len(self.texts)}


def _as_dataset(dataset_or_texts: Any) -> Any:
    from mi_crow.language_model.inference import check_texts

    if hasattr(dataset_or_texts, "iter_batches"):
        return dataset_or_texts
    if isinstance(dataset_or_texts, str) or not isinstance(dataset_or_texts, Sequence):
        raise TypeError(
            "dataset_or_texts must be a list of str or a mi_crow dataset (with iter_batches), got "
            f"{type(dataset_or_texts).__name__}"
        )
    texts = check_texts(dataset_or_texts, "dataset_or_texts")
    try:
        from mi_crow.datasets import TextDataset
    except ImportError:
        return _TextListDataset(texts)
    return TextDataset(texts=texts)


def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), so stored and requested meta compare equal."""
    return json.loads(json.dumps(value, default=str))


def _fingerprint(dataset: Any) -> str | None:
    """SHA-256 of an in-memory dataset's texts, so a resume with other texts of the same count is refused."""
    texts = getattr(dataset, "texts", None)
    if not isinstance(texts, list):
        return None
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class LanguageModelActivations:
    """Saves layer activations of a LanguageModel into its store (``lm.activations``).

    Args:
        lm: the owning LanguageModel.
    """

    def __init__(self, lm: LanguageModel) -> None:
        self._lm = lm

    def save(
        self,
        dataset_or_texts: Any,
        layers: str | int | Sequence[str | int],
        run_id: str | None = None,
        batch_size: int = 16,
        max_length: int = 128,
        dtype: torch.dtype | str | None = None,
        progress: bool = True,
    ) -> str:
        """Run the model over a dataset and save the outputs of ``layers`` into the store, batch by batch.

        One forward pass per batch serves every requested layer, and it stops as soon as all of them have run, so
        later layers and the LM head never run. Registered hooks stay active (controllers included). Each batch is
        written as ``activations/<run_id>/batch_<i>/<layer>/activations.safetensors`` (``activations [b, seq, d]``
        and ``attention_mask [b, seq]``; texts right-padded, so position ``j`` is token ``j`` of every text), plus
        ``input_ids [b, seq]`` in the batch's extra tensors, and only then marked complete. Batch ``i`` is written in a
        worker thread while batch ``i+1`` runs, so memory holds at most two batches whatever the dataset size.

        Re-running with the same ``run_id`` (after an interruption) skips the complete batches, leaving their files
        untouched, and continues with the first incomplete one.

        Args:
            dataset_or_texts: a list of str or a mi_crow dataset (anything with ``iter_batches(batch_size)`` and
                ``describe()``).
            layers: a layer or a list of layers (dotted names or block indices).
            run_id: the run to write or resume (``None``: a new id).
            batch_size: texts per forward pass.
            max_length: truncate each text to this many tokens.
            dtype: store activations in this dtype (``None``: as the model produces them).
            progress: show a progress bar with tokens/s.

        Returns:
            The run id.

        Raises:
            ValueError: no store, an empty dataset, a bad layer, bad sizes, or a ``run_id`` that already exists with a
                different model, layers, dtype, batching or dataset.
        """
        lm = self._lm
        store = lm.store
        if store is None:
            raise ValueError("lm.store is None: create the LanguageModel with store=LocalStore(path) to save activations")
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        from mi_crow.language_model.language_model import parse_dtype

        save_dtype = parse_dtype(dtype)
        if run_id is not None and (not isinstance(run_id, str) or not run_id or "/" in run_id or run_id[0] == "."):
            raise ValueError(f"run_id must be a non-empty str without '/' that does not start with '.', got {run_id!r}")
        layer_list = [layers] if isinstance(layers, (str, int)) else list(layers)
        if not layer_list:
            raise ValueError(f"layers must name at least one layer, got {layers!r}")
        names: list[str] = []
        for layer in layer_list:
            name = lm.layers.resolve(layer)
            if name == "":
                raise ValueError(f"layers must be layers of the model, not the whole model, got {layer!r}")
            if name not in names:
                names.append(name)
        dataset = _as_dataset(dataset_or_texts)
        batches = iter(dataset.iter_batches(batch_size))
        first = next(batches, None)
        if first is None or len(first) == 0:
            raise ValueError(f"dataset_or_texts is empty: {type(dataset).__name__} yielded no texts")

        widths = {name: lm.layers.width(name) for name in names}
        model_dtype = next((p.dtype for p in lm.model.parameters() if p.is_floating_point()), torch.float32)
        meta = {
            "format_version": SAVE_FORMAT_VERSION,
            "model_id": lm.model_id,
            "layers": names,
            "d": widths,
            "dtype": _dtype_name(save_dtype or model_dtype),
            "dataset": _jsonable(dataset.describe()) if hasattr(dataset, "describe") else None,
            "dataset_sha256": _fingerprint(dataset),
            "batch_size": batch_size,
            "max_length": max_length,
            "padding_side": "right",
        }
        if run_id is None:
            run_id = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        done: set[int] = set()
        # One writer per run: a second process saving into the same run id gets ResourceBusyError (naming the
        # holder's pid) instead of interleaving batches; a lock left by a crashed save is taken over.
        with store.lock_run(run_id, purpose="activations.save"):
            if store.run_exists(run_id):
                stored = store.read_run_meta(run_id)
                for key in _RESUME_KEYS:
                    if _jsonable(stored.get(key)) != _jsonable(meta[key]):
                        raise ValueError(
                            f"run_id={run_id!r} already exists in the store with a different {key}: stored "
                            f"{stored.get(key)!r}, requested {meta[key]!r}. Use another run_id, or delete the run to "
                            "redo it."
                        )
                done = set(store.list_batches(run_id))
                logger.info("resuming run %r: %d complete batches kept", run_id, len(done))
            else:
                store.write_run_meta(run_id, meta)

            self._run(run_id, names, save_dtype, max_length, _chain(first, batches), done, progress)
        return run_id

    def _run(
        self,
        run_id: str,
        names: list[str],
        save_dtype: torch.dtype | None,
        max_length: int,
        batches: Iterable[list[str]],
        done: set[int],
        progress: bool,
    ) -> None:
        from tqdm.auto import tqdm

        lm = self._lm
        detectors = {
            name: LayerActivationDetector(name, dtype=save_dtype, device="cpu", hook_id=f"save-{run_id}-{name}")
            for name in names
        }
        fired: set[str] = set()

        def stopper(name: str):
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                fired.add(name)
                if len(fired) == len(names):
                    raise _StopForward

            return hook

        bar = tqdm(desc=f"saving {run_id}", unit="tok", unit_scale=True, disable=not progress, leave=False)
        n_saved = 0
        # Batch i is written by a worker thread while batch i+1 runs through the model, so file writes (and fsync)
        # overlap compute. At most one write is in flight: memory stays bounded by two batches.
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mi_crow-save")
        pending: Future[None] | None = None
        with lm.layers.hooks(list(detectors.values())):
            # Registered after the detectors so that the detectors of the last layer run before the stop.
            handles = [lm.layers.get_module(name).register_forward_hook(stopper(name)) for name in names]
            try:
                for index, texts in enumerate(batches):
                    if index in done:
                        continue
                    fired.clear()
                    for detector in detectors.values():
                        detector.clear()
                    encodings = self._forward(texts, max_length)
                    mask = encodings["attention_mask"]
                    acts = {}
                    for name, detector in detectors.items():
                        if detector.activations is None:
                            raise RuntimeError(f"layer {name!r} did not run during the forward pass of batch {index}")
                        acts[name] = detector.activations
                    if pending is not None:
                        # Surfaces a failed write before more work is done. Cleared first, so that the cleanup
                        # below does not report the same failure again as one "during an interruption".
                        previous, pending = pending, None
                        previous.result()
                    pending = writer.submit(
                        lm.store.write_activation_batch,
                        run_id,
                        index,
                        acts,
                        mask,
                        extra={"input_ids": encodings["input_ids"]},
                    )
                    n_saved += 1
                    bar.update(int(mask.sum()))
                if pending is not None:
                    previous, pending = pending, None
                    previous.result()
            finally:
                # On an interruption the batch already computed is still written in full (then marked complete),
                # so a resumed run loses at most the batch that was in the forward pass.
                if pending is not None:
                    try:
                        pending.result()
                    except Exception:  # noqa: BLE001 - the interrupting exception is the one to report
                        logger.exception("writing the last batch of run %r failed during an interruption", run_id)
                writer.shutdown(wait=True)
                for handle in handles:
                    handle.remove()
                bar.close()
        logger.info("run %r: saved %d new batches (%d already complete)", run_id, n_saved, len(done))

    def _forward(self, texts: list[str], max_length: int) -> Any:
        """One forward pass that ends early once every requested layer has produced its output."""
        lm = self._lm
        encodings = lm.tokenize(texts, max_length=max_length, padding_side="right")
        try:
            lm.inference.forward_encoded(texts, encodings)
        except _StopForward:
            pass
        return encodings


def _chain(first: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rest
