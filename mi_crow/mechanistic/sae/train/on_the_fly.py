"""Training straight from the model: forwards on a producer thread feed a bounded, byte-sized token-shuffle buffer.

`ModelActivationStream` runs the language model over a list of texts, ``forward_batch_size`` texts per forward
pass (stopped as soon as the deepest requested layer has run), and turns each pass into clean token vectors:
padding is dropped (only positions where the attention mask is 1 are kept) and attention sinks are left out by the
one outlier rule (`attention_sink_mask` over the real tokens of the forward batch). With several layers a token
left out of one layer is left out of all of them, so every layer's stream holds the same tokens in the same order.

The vectors are grouped into *blocks*: consecutive forward batches until the block holds
``buffer_bytes // 2`` bytes (over all layers, in the SAE's dtype). A block is shuffled as a whole (one permutation
for all layers, from a generator seeded by ``(seed, epoch, block)``) and cut into training batches; the rows left
over (fewer than one batch) are carried into the next block. The producer fills block ``i + 1`` while the trainer
consumes block ``i``, so memory holds at most two blocks: ``buffer_bytes`` in all (a block may pass its half by less
than one forward batch: blocks end at whole forward batches). The shuffle of a block is `mi_crow.store.shuffle`'s
(`shuffle_block`, `block_seed`): the same two-half buffer as `mi_crow.store.ShuffleBuffer`, which fed these forward
batches and sealed at these block boundaries yields these batches.

Block boundaries depend only on the texts' token counts (computed once by the tokenizer), so the stream is a pure
function of ``(texts, model, layers, max_length, forward_batch_size, buffer_bytes, seed, epoch)``. A reader's
position -- block, batches consumed in it, and the rows carried into it -- is all a checkpoint needs: a resumed run
recomputes the block's forwards and continues with the next unconsumed batch, bit for bit (interrupting loses at
most the forwards of the block in progress, never a trained step). Resuming with a different dataset (or model,
layers, max_length, batching) is refused by `StreamReader.load_state_dict`, naming what differs.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.mechanistic.sae.outliers import attention_sink_mask
from mi_crow.store.shuffle import ShuffledBlock, block_seed, shuffle_block
from mi_crow.validation import check_positive_int, check_texts

if TYPE_CHECKING:
    from mi_crow.language_model import LanguageModel

__all__ = ["DEFAULT_BUFFER_BYTES", "ModelActivationStream", "StreamReader", "texts_of"]

logger = logging.getLogger(__name__)

#: Default size of the shuffle buffer (two blocks together).
DEFAULT_BUFFER_BYTES = 1 << 30

STREAM_STATE_KIND = "model_stream"


class _StopForward(Exception):
    """Raised from a hook once every requested layer has run, so later layers and the LM head never run."""


class _Cancelled(Exception):
    """The reader that asked for a block stopped while it was being made."""


# One stream forward at a time in the process: the capture hooks sit on the model's modules for the duration of a
# forward, and another stream's forward (a reader abandoned but still finishing, a grid beside a single run) must not
# run through them.
_FORWARD_LOCK = threading.Lock()


def texts_of(dataset: Any, argument: str = "dataset") -> list[str]:
    """The texts of a list of str or a mi_crow dataset (anything iterable over str, e.g. `TextDataset`)."""
    if isinstance(dataset, (str, bytes)):
        raise ArgumentTypeError(f"{argument} must be a list of str or a mi_crow dataset, got a single {type(dataset).__name__}")
    texts = getattr(dataset, "texts", None)
    if not isinstance(texts, list):
        try:
            texts = list(dataset)
        except TypeError:
            raise ArgumentTypeError(
                f"{argument} must be a list of str or a mi_crow dataset, got {type(dataset).__name__}"
            ) from None
    texts = check_texts(texts, argument)
    if not texts:
        raise UserInputError(f"{argument} is empty: no texts to train on")
    return texts


def _fingerprint(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


class ModelActivationStream:
    """Clean, shuffled token vectors of some layers of a model over a list of texts, epoch after epoch.

    Args:
        lm: the `LanguageModel` (its registered hooks and controllers stay active, as when saving activations).
        texts: the texts, in the order they are read.
        layers: resolved layer names.
        batch_size: rows per training batch.
        forward_batch_size: texts per forward pass.
        max_length: tokens per text (truncation).
        buffer_bytes: bytes of the shuffle buffer (two blocks).
        seed: seed of the shuffles.
        dtype, device: of the produced vectors (the SAE's).
        outlier_norm_factor: the outlier rule's factor (None: no token is a sink).

    Raises:
        UserInputError: a buffer smaller than two batches, a bad size, or texts without a token.
    """

    def __init__(
        self,
        lm: LanguageModel,
        texts: list[str],
        layers: Sequence[str],
        *,
        batch_size: int,
        forward_batch_size: int = 16,
        max_length: int = 128,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        outlier_norm_factor: float | None = None,
    ) -> None:
        self.lm = lm
        self.texts = texts
        self.layers = list(layers)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.forward_batch_size = check_positive_int(forward_batch_size, "forward_batch_size")
        self.max_length = check_positive_int(max_length, "max_length")
        self.buffer_bytes = check_positive_int(buffer_bytes, "buffer_bytes")
        self.seed = int(seed)
        self.dtype = dtype
        self.device = torch.device(device)
        self.outlier_norm_factor = outlier_norm_factor
        self.widths = {name: int(lm.layers.width(name)) for name in self.layers}
        row_bytes = sum(self.widths.values()) * torch.empty((), dtype=dtype).element_size()
        block_rows = (self.buffer_bytes // 2) // row_bytes
        if block_rows < self.batch_size:
            raise UserInputError(
                f"buffer_bytes={self.buffer_bytes} holds {block_rows} token vectors per half (two halves: one trained "
                f"on, one filled), fewer than one batch of batch_size={self.batch_size} ({row_bytes} bytes per token "
                f"over layers {self.layers}); expected buffer_bytes >= {2 * self.batch_size * row_bytes}"
            )
        self.block_rows = block_rows
        lengths = [len(ids) for ids in lm.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]]
        self.real_tokens = int(sum(lengths))
        if self.real_tokens == 0:
            raise UserInputError("dataset: the texts hold no token")
        # What an epoch plans with (steps = n_tokens // batch_size): the real tokens less one sink per text when the
        # outlier rule is on (models park about one sink per text, at its start). Planning with more tokens than an
        # epoch yields would start the next epoch -- a whole buffer half of forwards -- for a batch or two.
        self.n_tokens = max(1, self.real_tokens - (len(texts) if outlier_norm_factor is not None else 0))
        # Blocks: whole forward batches until a block reaches block_rows planned tokens.
        self.blocks: list[tuple[int, int]] = []
        start, rows = 0, 0
        for first in range(0, len(texts), self.forward_batch_size):
            last = min(first + self.forward_batch_size, len(texts))
            rows += sum(lengths[first:last])
            if rows >= block_rows:
                self.blocks.append((start, last))
                start, rows = last, 0
        if start < len(texts):
            self.blocks.append((start, len(texts)))
        self.identity = {
            "model_id": getattr(lm, "model_id", None),
            "layers": list(self.layers),
            "dataset_sha256": _fingerprint(texts),
            "n_texts": len(texts),
            "max_length": self.max_length,
            "forward_batch_size": self.forward_batch_size,
            "buffer_bytes": self.buffer_bytes,
            "batch_size": self.batch_size,
            "dtype": str(dtype).removeprefix("torch."),
        }
        self._first_block: ShuffledBlock | None = None  # block 0 of epoch 0 when a sample made it before training

    # -- readers -------------------------------------------------------------------------------------------------
    def reader(self, epoch: int, layer: str | None = None) -> StreamReader:
        """The reader of one epoch: batches of ``layer`` (a ``[batch_size, d]`` tensor), or of every layer (a dict
        ``layer -> tensor``) when ``layer`` is None."""
        if layer is not None and layer not in self.widths:
            raise UserInputError(f"layer {layer!r} is not one of the stream's layers {self.layers}")
        return StreamReader(self, epoch, layer)

    def sample(self, layer: str) -> Iterator[Tensor]:
        """Vectors of ``layer`` to initialise ``b_dec`` from: block 0 of epoch 0, made now and kept, so that the
        epoch-0 reader uses it instead of running those forwards again."""
        if self._first_block is None:
            self._first_block = self._make_block(0, 0, None)
        block = self._first_block
        # The block's batches in their shuffled order (or, when it holds less than a batch, its carried-out rows).
        yield block.batch_rows(layer) if block.n_batches else block.carry_out[layer]

    # -- producing -----------------------------------------------------------------------------------------------
    def _forward_vectors(self, texts: list[str]) -> tuple[dict[str, Tensor], int]:
        """One forward pass: the kept token vectors of each layer ``[tokens, d]`` and the number of sinks."""
        lm = self.lm
        captured: dict[str, Tensor] = {}

        me = threading.get_ident()

        def hook_for(name: str):
            def hook(module: Any, args: Any, output: Any) -> None:
                if threading.get_ident() != me:  # another thread's forward of the same model
                    return
                tensor = output[0] if isinstance(output, (tuple, list)) else output
                captured[name] = tensor.detach()
                if len(captured) == len(self.layers):
                    raise _StopForward

            return hook

        encodings = lm.tokenize(texts, max_length=self.max_length, padding_side="right")
        handles = [lm.layers.get_module(name).register_forward_hook(hook_for(name)) for name in self.layers]
        try:
            lm.inference.forward_encoded(texts, encodings)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in self.layers if name not in captured]
        if missing:
            raise RuntimeError(f"layers {missing} did not run during the forward pass")
        mask = encodings["attention_mask"]
        keep = mask.to(self.device) != 0
        real = int(keep.sum())
        for name in self.layers:
            acts = captured[name]
            keep = keep & ~attention_sink_mask(acts, mask.to(acts.device), factor=self.outlier_norm_factor).to(
                self.device
            )
        out = {name: captured[name].to(self.device)[keep].to(self.dtype) for name in self.layers}
        return out, real - int(keep.sum())

    def _make_block(self, epoch: int, index: int, carry_in: dict[str, Tensor] | None,
                    stop: threading.Event | None = None) -> ShuffledBlock:
        if epoch == 0 and index == 0 and carry_in is None and self._first_block is not None:
            block, self._first_block = self._first_block, None
            return block
        first, last = self.blocks[index]
        parts: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        outliers = 0
        with torch.no_grad():
            for start in range(first, last, self.forward_batch_size):
                if stop is not None and stop.is_set():
                    raise _Cancelled
                with _FORWARD_LOCK:
                    vectors, sinks = self._forward_vectors(self.texts[start:min(start + self.forward_batch_size,
                                                                                last)])
                outliers += sinks
                for name in self.layers:
                    parts[name].append(vectors[name])
        return shuffle_block(index, parts, self.batch_size, block_seed(self.seed, epoch, index), carry_in,
                             outliers=outliers)


class StreamReader:
    """One epoch of a `ModelActivationStream` (the reader protocol of the trainer: ``n_tokens``, ``d_in``,
    iteration, ``state_dict`` / ``load_state_dict``).

    Iterating starts the producer thread; it stops when the epoch ends, when iteration is abandoned, or on an error
    (re-raised here). Attributes the trainer reads: ``filters_outliers`` (True: the batches are already free of
    sinks and padding) and `take_outliers` (tokens left out since the last call).
    """

    filters_outliers = True

    def __init__(self, stream: ModelActivationStream, epoch: int, layer: str | None) -> None:
        self.stream = stream
        self.epoch = epoch
        self.layer = layer
        self.n_tokens = stream.n_tokens
        self.d_in = stream.widths[layer] if layer is not None else dict(stream.widths)
        self._block = 0
        self._consumed = 0
        self._carry: dict[str, Tensor] | None = None
        self._resumed = False
        self._outliers = 0

    def take_outliers(self) -> int:
        """Tokens left out as sinks in the blocks started since the last call."""
        n, self._outliers = self._outliers, 0
        return n

    def state_dict(self) -> dict[str, Any]:
        """The position: the block being consumed, its batches already consumed, the rows carried into it."""
        return {
            "kind": STREAM_STATE_KIND,
            "source": dict(self.stream.identity),
            "epoch": self.epoch,
            "block": self._block,
            "consumed": self._consumed,
            "carry": None if self._carry is None else {k: v.cpu().clone() for k, v in self._carry.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict` of the same stream.

        Raises:
            UserInputError: the state belongs to another kind of reader, or to a stream over other texts, another
                model, other layers or other batching (each differing field named).
        """
        if not isinstance(state, dict) or state.get("kind") != STREAM_STATE_KIND:
            raise UserInputError(
                "cannot resume: the checkpoint was not written by training from a model (it reads a stored "
                "activation run); train from the stored run instead, or start a new training_run_id"
            )
        saved, current = state["source"], self.stream.identity
        differing = [key for key in current if saved.get(key) != current[key]]
        if differing:
            details = ", ".join(
                f"{key}: {_short(saved.get(key))} -> {_short(current[key])}" for key in differing
            )
            raise UserInputError(
                f"cannot resume the on-the-fly training run: the checkpoint was written with a different "
                f"{' and '.join(differing)} ({details}); resume with the same dataset and settings, or start a new "
                f"training_run_id"
            )
        self._block = int(state["block"])
        self._consumed = int(state["consumed"])
        carry = state.get("carry")
        self._carry = None if carry is None else {k: v.to(self.stream.device) for k, v in carry.items()}
        self._resumed = True

    def __iter__(self) -> Iterator[Any]:
        stream = self.stream
        blocks: queue.Queue[Any] = queue.Queue()
        slots = threading.Semaphore(2)  # the block being consumed + the one being filled
        stop = threading.Event()
        start_block, start_carry = self._block, self._carry
        done = object()

        def produce() -> None:
            carry = start_carry
            try:
                for index in range(start_block, len(stream.blocks)):
                    while not slots.acquire(timeout=0.1):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    block = stream._make_block(self.epoch, index, carry, stop)
                    carry = block.carry_out
                    blocks.put(block)
                blocks.put(done)
            except _Cancelled:
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
                blocks.put(exc)

        thread = threading.Thread(target=produce, name=f"mi_crow-stream-{uuid.uuid4().hex[:6]}", daemon=True)
        thread.start()
        try:
            while True:
                item = blocks.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                skip = self._consumed if self._resumed and item.index == self._block else 0
                if not skip:
                    self._outliers += item.outliers
                self._resumed = False
                self._block, self._carry = item.index, item.carry_in
                for j in range(skip, item.n_batches):
                    self._consumed = j + 1
                    yield item.batch(j, self.layer)
                # The block is done: the next one starts with nothing consumed and this one's leftover rows.
                self._block, self._consumed, self._carry = item.index + 1, 0, item.carry_out
                del item
                slots.release()
        finally:
            stop.set()
            slots.release()
            slots.release()
            thread.join(timeout=60)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
