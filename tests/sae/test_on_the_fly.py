"""Training on the fly: the stream's vectors against the model's own hidden states (padding never reaches the SAE),
the outlier rule over each forward batch, bit-for-bit resume, and the errors for bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mi_crow.errors import UserInputError
from mi_crow.mechanistic.sae import SaeTrainer, SaeTrainingConfig, TopKSae
from mi_crow.mechanistic.sae.outliers import attention_sink_mask
from mi_crow.mechanistic.sae.train.on_the_fly import ModelActivationStream
from mi_crow.store import LocalStore
from mi_crow.testing import SAMPLE_TEXTS, make_tiny_llama_lm

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = "model.layers.1"
MAX_LENGTH = 24


@pytest.fixture(scope="module")
def lm():
    return make_tiny_llama_lm()


def _reference_vectors(lm, texts: list[str]) -> torch.Tensor:
    """The layer's output at every real token, one text at a time (no padding at all), from the HF model's
    ``hidden_states`` (entry 2 is the output of block 1)."""
    rows = []
    for text in texts:
        enc = lm.tokenizer([text], return_tensors="pt", truncation=True, max_length=MAX_LENGTH)
        with torch.no_grad():
            out = lm.model(**enc, output_hidden_states=True)
        rows.append(out.hidden_states[2][0])
    return torch.cat(rows)


def _epoch(stream: ModelActivationStream, epoch: int = 0) -> list[torch.Tensor]:
    return [batch.clone() for batch in stream.reader(epoch, LAYER)]


def test_stream_yields_exactly_the_real_tokens_shuffled(lm):
    texts = SAMPLE_TEXTS[:10]
    ref = _reference_vectors(lm, texts)
    # Blocks of ~3 forward batches: several blocks, carries between them.
    stream = ModelActivationStream(lm, texts, [LAYER], batch_size=8, forward_batch_size=3, max_length=MAX_LENGTH,
                                   buffer_bytes=2 * 60 * 32 * 4, seed=5)
    assert stream.real_tokens == stream.n_tokens == ref.shape[0]  # no outlier rule: no sink to plan for
    assert len(stream.blocks) > 1
    batches = _epoch(stream)
    got = torch.cat(batches)
    assert all(b.shape == (8, 32) for b in batches)
    # Every token but the last (< one batch) leftover rows of the epoch, each once: match each yielded row to its
    # nearest reference row, and no reference row twice.
    assert got.shape[0] == (ref.shape[0] // 8) * 8
    # Identical reference rows (the BOS token starts every text) form one class with its multiplicity.
    same = torch.cdist(ref, ref) < 1e-4
    cls = same.int().argmax(dim=1)  # the first row equal to each row
    dist = torch.cdist(got, ref)
    assert float(dist.min(dim=1).values.max()) < 1e-4
    used = torch.bincount(cls[dist.argmin(dim=1)], minlength=ref.shape[0])
    assert bool((used <= torch.bincount(cls, minlength=ref.shape[0])).all())
    # Shuffled: not in text order.
    nearest = dist.argmin(dim=1)
    assert not torch.equal(nearest, torch.sort(nearest).values)
    # Deterministic: the same stream gives the same epoch; another epoch another order.
    again = torch.cat(_epoch(stream))
    assert torch.equal(got, again)
    assert not torch.equal(got, torch.cat(_epoch(stream, 1)))


def test_sinks_are_left_out_by_the_outlier_rule_over_each_forward_batch(lm):
    texts = SAMPLE_TEXTS[:8]
    module = lm.layers.get_module(LAYER)

    def plant_sinks(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, 0] *= 1000.0  # the first token of every text (right padding: position 0 is real)
        return output

    handle = module.register_forward_hook(plant_sinks)
    try:
        stream = ModelActivationStream(lm, texts, [LAYER], batch_size=4, forward_batch_size=4,
                                       max_length=MAX_LENGTH, buffer_bytes=1 << 20, outlier_norm_factor=10.0)
        reader = stream.reader(0, LAYER)
        got = torch.cat([b.clone() for b in reader])
        outliers = reader.take_outliers()
    finally:
        handle.remove()
    # Reference: the rule applied to each forward batch's real tokens, by hand.
    expected = 0
    for start in range(0, len(texts), 4):
        enc = lm.tokenize(texts[start:start + 4], max_length=MAX_LENGTH)
        with torch.no_grad():
            hidden = lm.model(**enc, output_hidden_states=True).hidden_states[2]
        hidden[:, 0] *= 1000.0
        expected += int(attention_sink_mask(hidden, enc["attention_mask"], factor=10.0).sum())
    assert expected == len(texts)
    assert outliers == expected
    assert got.shape[0] == ((stream.real_tokens - expected) // 4) * 4
    assert stream.n_tokens == stream.real_tokens - len(texts)  # planned: one sink per text
    assert float(got.norm(dim=1).max()) < 10.0 * float(got.norm(dim=1).median())


def _config(**kw) -> SaeTrainingConfig:
    base = dict(epochs=2, batch_size=16, log_every=5, checkpoint_every=10, training_run_id="otf", progress=False,
                b_dec_init_tokens=64, seed=3)
    base.update(kw)
    return SaeTrainingConfig(**base)


def _train(lm, store, texts, **kw):
    sae = TopKSae(n_latents=64, n_inputs=32, k=4)
    trainer = SaeTrainer(sae, store)
    options = dict(forward_batch_size=4, max_length=MAX_LENGTH, buffer_bytes=2 * 100 * 32 * 4)
    callbacks = kw.pop("callbacks", ())
    result = trainer.train_from_model(lm, texts, LAYER, _config(**kw), callbacks=callbacks, **options)
    return sae, result


def _history(result):
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in result.history]


def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(lm, tmp_path):
    texts = SAMPLE_TEXTS
    ref_sae, ref = _train(lm, LocalStore(tmp_path / "a"), texts)
    assert ref.steps == ref.config.n_tokens // 16 if ref.config.n_tokens else ref.steps > 30

    class Stop(Exception):
        pass

    def stop_at(step):
        def callback(info):
            if info.step == step:
                raise Stop

        return callback

    store = LocalStore(tmp_path / "b")
    with pytest.raises(Stop):
        _train(lm, store, texts, callbacks=[stop_at(17)])  # the checkpoint is at step 10
    with pytest.raises(Stop):
        _train(lm, store, texts, resume=True, callbacks=[stop_at(23)])  # resumed at 10, checkpoint at 20
    sae, result = _train(lm, store, texts, resume=True)
    assert result.resumed_from_step == 20
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(ref_sae, name)), name
    assert _history(result) == _history(ref)
    assert result.tokens == ref.tokens and result.steps == ref.steps
    assert TopKSae.load(store, "otf").metadata["layer"] == LAYER


def test_resume_with_another_dataset_names_what_differs(lm, tmp_path):
    store = LocalStore(tmp_path)

    def stop(info):
        if info.step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(lm, store, SAMPLE_TEXTS, callbacks=[stop])
    other = SAMPLE_TEXTS[:-1] + ["a different last text"]
    with pytest.raises(UserInputError, match=r"dataset_sha256") as info:
        _train(lm, store, other, resume=True)
    assert "n_texts" not in str(info.value)  # only what differs is named
    with pytest.raises(UserInputError, match=r"max_length: 24 -> 20"):
        sae = TopKSae(n_latents=64, n_inputs=32, k=4)
        SaeTrainer(sae, store).train_from_model(lm, SAMPLE_TEXTS, LAYER, _config(resume=True), forward_batch_size=4,
                                                max_length=20, buffer_bytes=2 * 100 * 32 * 4)


def test_bad_input(lm):
    sae = TopKSae(n_latents=64, n_inputs=32, k=4)
    quiet = _config(checkpoint_every=None, save_sae=False)
    with pytest.raises(UserInputError, match=r"buffer_bytes=1000 .*fewer than one batch of batch_size=16"):
        SaeTrainer(sae).train_from_model(lm, SAMPLE_TEXTS, LAYER, quiet, buffer_bytes=1000)
    with pytest.raises(UserInputError, match="SaeGrid"):
        SaeTrainer(sae).train_from_model(lm, SAMPLE_TEXTS, [1, 2], quiet)
    with pytest.raises(UserInputError, match="n_inputs=16"):
        SaeTrainer(TopKSae(n_latents=64, n_inputs=16, k=4)).train_from_model(lm, SAMPLE_TEXTS, LAYER, quiet)
    with pytest.raises(UserInputError, match="dataset must be a non-empty"):
        SaeTrainer(sae).train_from_model(lm, [], LAYER, quiet)
    with pytest.raises(UserInputError, match="need a store"):
        SaeTrainer(sae).train_from_model(lm, SAMPLE_TEXTS, LAYER, _config())


# ------------------------------------------------------------------------------------------------ trainer overhead
def test_outlier_rule_on_row_norms_decides_as_on_the_rows():
    """The trainer applies the rule to ``[B, 1]`` row norms (one pass over x): same decision as on x itself."""
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e-3, 1e3):
        x = torch.randn(512, 64, generator=g) * scale
        x[torch.randint(0, 512, (9,), generator=g)] *= torch.linspace(5, 50, 9).unsqueeze(1)
        ref = attention_sink_mask(x, factor=10.0)
        got = attention_sink_mask(x.norm(dim=1).unsqueeze(1), factor=10.0)
        assert torch.equal(got, ref) and int(ref.sum()) > 0


def test_history_file_written_at_checkpoints_and_the_end_when_writes_are_spaced(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    writes = []
    original = LocalStore.put_json

    def counting(self, key, value):
        if key.endswith("training_history.json"):
            writes.append(len(value))
        return original(self, key, value)

    monkeypatch.setattr(LocalStore, "put_json", counting)
    x = torch.randn(16 * 40, 32, generator=torch.Generator().manual_seed(1))
    config = SaeTrainingConfig(n_tokens=16 * 40, batch_size=16, log_every=2, checkpoint_every=10, progress=False,
                               b_dec_init_tokens=64, training_run_id="h", save_sae=False)
    trainer = SaeTrainer(TopKSae(n_latents=64, n_inputs=32, k=4), store)
    trainer.HISTORY_WRITE_SPACING = 1e12  # never due by time: only the forced writes remain
    result = trainer.train_on_tensor(x, config)
    # Records every 2 steps (20); the file at the first record (no write timed yet), at the checkpoints (steps 10,
    # 20, 30) and at the end (step 40).
    assert writes == [1, 5, 10, 15, 20]
    assert store.get_json("runs/h/training_history.json") == json.loads(json.dumps(result.history))
    writes.clear()
    trainer = SaeTrainer(TopKSae(n_latents=64, n_inputs=32, k=4), store)
    trainer.HISTORY_WRITE_SPACING = 0.0  # always due: every record is written
    trainer.train_on_tensor(x, dataclasses.replace(config, training_run_id="h2"))
    assert writes == list(range(1, 21))


def test_the_stream_is_the_shuffle_buffer_sealed_at_its_block_boundaries(lm):
    """One implementation: `mi_crow.store.ShuffleBuffer` pushed the stream's forward batches, sealed where the
    stream's blocks end, pops the batches the stream yields, bit for bit (two layers: one permutation for both)."""
    from mi_crow.store import ShuffleBuffer

    texts = SAMPLE_TEXTS[:10]
    layers = ["model.layers.0", LAYER]
    stream = ModelActivationStream(lm, texts, layers, batch_size=8, forward_batch_size=3, max_length=MAX_LENGTH,
                                   buffer_bytes=2 * 60 * 64 * 4, seed=5)
    assert len(stream.blocks) > 2
    got = [dict(batch) for batch in stream.reader(1)]
    buf = ShuffleBuffer({name: 32 for name in layers}, 8, buffer_bytes=1 << 20, seed=5, epoch=1)
    popped = []
    with torch.no_grad():
        for first, last in stream.blocks:
            for start in range(first, last, 3):
                vectors, _ = stream._forward_vectors(texts[start:min(start + 3, last)])
                assert buf.push(vectors) == vectors[LAYER].shape[0]
            buf.seal()
            while (batch := buf.pop()) is not None:
                popped.append(batch)
    assert len(popped) == len(got) == stream.real_tokens // 8
    for a, b in zip(popped, got):
        assert all(torch.equal(a[name], b[name]) for name in layers)
