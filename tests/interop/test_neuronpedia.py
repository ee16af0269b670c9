"""Neuronpedia batch JSON from tracking data: per-token activation records agree with what tracking recorded, logits
with ``W_U @ W_dec`` computed here, density with the tracked counts; and the ``mi-crow export`` subcommand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mi_crow import cli
from mi_crow.cli.common import put_cli_info
from mi_crow.mechanistic.sae import TopKSae
from mi_crow.mechanistic.sae.interop.neuronpedia import neuronpedia_features, write_neuronpedia_batches
from mi_crow.testing import SAMPLE_TEXTS, build_tokenizer, make_tiny_llama_model

MAX_LEN = 24
LAYER = "model.layers.1"


def _tracked(lm, tmp_path, sae=None, layer=LAYER):
    torch.manual_seed(1)
    sae = sae if sae is not None else TopKSae(64, 32, 4)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        if sae.is_transcoder:
            sae.W_dec.normal_(0, 0.1)
    sae.layer_signature = layer
    sae.metadata["layer"] = layer
    sae.concepts.enable_text_tracking(top_k=3)
    lm.attach_sae(sae, layer)
    for _ in lm.inference.iter_inference(SAMPLE_TEXTS, batch_size=4, max_length=MAX_LEN):
        pass
    lm.detach_sae(sae)
    doc = json.loads(sae.concepts.export_top_texts_json(tmp_path / "top.json").read_text())
    sae.concepts.disable_text_tracking()
    return sae, doc


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_features_agree_with_tracking_and_weights(tiny_llama, tmp_path, kind):
    from mi_crow.mechanistic.sae import Transcoder

    if kind == "sae":
        sae, doc = _tracked(tiny_llama, tmp_path)
    else:  # a transcoder reads the MLP's input: the replay must encode that, not the MLP's output
        sae, doc = _tracked(tiny_llama, tmp_path, Transcoder(64, 32, 32, 4), "model.layers.1.mlp")
    rows = {r["neuron"]: r for r in doc["neurons"]}
    chosen = sorted(rows)[:6]
    feats = neuronpedia_features(sae, tiny_llama, doc, features=chosen, max_length=MAX_LEN, n_logits=5, bins=8)
    assert [f["feature_index"] for f in feats] == chosen
    tok = tiny_llama.tokenizer
    W_U = tiny_llama.model.get_output_embeddings().weight.detach()
    for f in feats:
        row = rows[f["feature_index"]]
        assert len(f["activations"]) == len(row["top_texts"])
        for rec, tracked in zip(f["activations"], row["top_texts"]):
            ids = tok(tracked["text"], truncation=True, max_length=MAX_LEN)["input_ids"]
            assert rec["tokens"] == tok.convert_ids_to_tokens(ids)
            assert len(rec["values"]) == len(ids)
            # The strongest token of the replayed text is the one tracking recorded, with its activation.
            assert rec["values"][tracked["token_position"]] == pytest.approx(tracked["activation"], rel=1e-4)
            assert max(rec["values"]) == pytest.approx(tracked["activation"], rel=1e-4)
        effect = W_U @ sae.W_dec.detach()[f["feature_index"]]
        top = effect.topk(5)
        assert f["pos_str"] == tok.convert_ids_to_tokens(top.indices.tolist())
        assert f["pos_values"] == pytest.approx(top.values.tolist(), rel=1e-5)
        assert f["neg_values"] == pytest.approx(effect.sort().values[:5].tolist(), rel=1e-5)
        assert f["frac_nonzero"] == pytest.approx(row["firing_count"] / doc["tokens_seen"])
        assert sum(f["logits_hist_data_bar_heights"]) == W_U.shape[0]
        n_nonzero = sum(1 for rec in f["activations"] for v in rec["values"] if v != 0)
        assert sum(f["freq_hist_data_bar_heights"]) >= n_nonzero > 0


def test_batches_have_the_importer_layout(tmp_path):
    feats = [{"feature_index": i, "activations": []} for i in range(5)]
    paths = write_neuronpedia_batches(tmp_path / "np", feats, model_id="gpt2-small", layer=3, sae_set="res-mc",
                                      batch_size=2)
    assert [p.name for p in paths] == ["batch-0.json", "batch-1.json", "batch-2.json"]
    docs = [json.loads(p.read_text()) for p in paths]
    assert all(set(d) == {"model_id", "layer", "sae_set", "features"} for d in docs)
    assert [len(d["features"]) for d in docs] == [2, 2, 1] and docs[0]["layer"] == 3
    with pytest.raises(ValueError, match="layer"):
        write_neuronpedia_batches(tmp_path / "x", feats, model_id="m", layer=-1, sae_set="s")


def test_cli_export_neuronpedia_and_sae_lens(tmp_path, capsys):
    from mi_crow.store import LocalStore

    tok = build_tokenizer("llama")
    make_tiny_llama_model(tok).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    from mi_crow.language_model import LanguageModel

    store = LocalStore(tmp_path / "st")
    lm = LanguageModel.from_huggingface(str(tmp_path / "llama"), store=store)
    sae, doc = _tracked(lm, tmp_path)
    sae.save(store, "s1")
    store.put_json("sae_models/s1/top_texts.json", doc)
    put_cli_info(store, "s1", model=str(tmp_path / "llama"), layer=LAYER)
    out = tmp_path / "np"
    code = cli.main(["export", "neuronpedia", "--store", str(tmp_path / "st"), "--sae-id", "s1", "--out", str(out),
                     "--features", "3", "--max-length", str(MAX_LEN)])
    assert code == 0, capsys.readouterr().err
    batch = json.loads((out / "batch-0.json").read_text())
    assert batch["layer"] == 1 and batch["sae_set"] == "s1" and len(batch["features"]) == 3
    busiest = sorted(doc["neurons"], key=lambda r: -r["firing_count"])[:3]
    assert {f["feature_index"] for f in batch["features"]} == {r["neuron"] for r in busiest}
    code = cli.main(["export", "sae_lens", "--store", str(tmp_path / "st"), "--sae-id", "s1", "--out",
                     str(tmp_path / "sl")])
    assert code == 0
    back = TopKSae.from_pretrained(tmp_path / "sl", model=lm)
    assert torch.equal(back.W_enc, sae.W_enc) and back.layer_signature == LAYER
    (tmp_path / "held_out.txt").write_text("\n".join(SAMPLE_TEXTS[:6]) + "\n")
    code = cli.main(["export", "saebench", "--store", str(tmp_path / "st"), "--sae-id", "s1", "--out",
                     str(tmp_path / "core.json"), "--dataset", str(tmp_path / "held_out.txt"), "--max-length", "16"])
    assert code == 0, capsys.readouterr().err
    core = json.loads((tmp_path / "core.json").read_text())
    assert core["eval_type_id"] == "core" and core["eval_result_metrics"]["sparsity"]["l0"] > 0
    code = cli.main(["export", "neuronpedia", "--store", str(tmp_path / "st"), "--sae-id", "nope"])
    assert code == 2 and "no such SAE" in capsys.readouterr().err
    assert not math.isnan(batch["features"][0]["frac_nonzero"])
