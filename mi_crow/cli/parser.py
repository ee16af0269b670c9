"""The argument parser of ``mi-crow``: every subcommand and flag in one place.

Flag values are checked here (argparse reports a bad one as a usage error, exit status 2); everything that needs
the store or the model is checked by the command that runs.
"""

from __future__ import annotations

import argparse
import math

from mi_crow.cli import concepts, demo, export, generate, layers, report, save, steer_eval, train
from mi_crow.cli.common import PROG

__all__ = ["build_parser"]


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return n


def _finite_floats(value: str) -> list[float]:
    """A comma-separated list of finite numbers (``--strengths 0.5,1,2``)."""
    out = []
    for part in value.split(","):
        try:
            x = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"expected finite numbers, got {part!r} in {value!r}")
        out.append(x)
    return out


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def _int_list(value: str) -> list[int]:
    """A comma-separated list of ints (``--positions 0,-1``)."""
    try:
        return [int(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _model_arg(p: argparse.ArgumentParser, required: bool = False, default: str | None = "default") -> None:
    p.add_argument("--model", default=default, required=required,
                   help="'default' (embedded SmolLM2-135M-Instruct) or a local HuggingFace model folder")


def _data_args(p: argparse.ArgumentParser, default: str | None = "default") -> None:
    p.add_argument("--dataset", default=default,
                   help="'default' (Wikipedia sample from gensim's test data) or a .txt/.jsonl/.csv file")
    p.add_argument("--text-field", default="text", help="column with the text in .jsonl/.csv (default: text)")
    p.add_argument("--limit", type=_positive_int, help="use only the first N texts of the dataset")


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default="store", help="store directory (default: ./store)")


def _source_args(p: argparse.ArgumentParser) -> None:
    """Where activations come from: model, dataset, store and layer (``save`` and ``demo``)."""
    _model_arg(p)
    _data_args(p)
    _store_arg(p)
    p.add_argument("--layer", help="layer name or block index (default: the middle block)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mi-crow`` (all subcommands); each sets ``func``, the command's ``run``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="mi-crow: mechanistic interpretability with TopK sparse autoencoders. "
                    "`mi-crow demo` runs the whole workflow on the embedded default model and corpus.",
    )
    verbose_help = "log progress details; print the traceback of an error"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    # -v is accepted after the subcommand too (`mi-crow train ... -v`, as the error hint suggests); SUPPRESS keeps
    # a subcommand without it from resetting a -v given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    p = add("layers", "list the layers of a model")
    _model_arg(p)
    p.add_argument("--all", action="store_true", help="print the full module tree with shapes")
    p.add_argument("--depth", type=_positive_int, default=None, help="tree depth with --all")
    p.set_defaults(func=layers.run)

    p = add("save", "save activations of a layer over a dataset")
    _source_args(p)
    p.add_argument("--run-id", help="activation run id (default: derived from layer and texts); re-run to resume")
    p.add_argument("--tokens", type=_positive_int, help="stop adding texts once this many tokens are selected")
    p.add_argument("--shuffle", action="store_true", help="shuffle the texts before selecting (with --seed)")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=16, help="texts per forward pass")
    p.add_argument("--max-length", type=_positive_int, default=128, help="tokens per text (truncation)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the stored activations (default: the model's compute dtype)")
    p.add_argument("--shard-tokens", type=_positive_int,
                   help="real tokens per stored batch (whole forward batches are joined; default: one stored batch "
                        "per forward batch)")
    p.set_defaults(func=save.run)

    p = add("train", "train TopK SAEs on a saved activation run or straight from a model (--model)")
    train.add_arguments(p)
    p.set_defaults(func=train.run)

    p = add("concepts", "collect each feature's top texts (and name features)")
    _store_arg(p)
    _model_arg(p, default=None)
    _data_args(p, default=None)
    p.add_argument("--sae-id", required=True)
    p.add_argument("--run-id", help="replay a stored run instead of running the model (default: the SAE's run, "
                                    "unless --dataset is given)")
    p.add_argument("--layer", help="layer (default: the one the SAE was trained on)")
    p.add_argument("--top-k", type=_positive_int, default=10, help="texts kept per feature")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--max-length", type=_positive_int, default=128)
    p.add_argument("--name", action="append", default=[], metavar="NEURON=NAME", help="name a feature (repeatable)")
    p.add_argument("--show", type=_non_negative_int, default=5, help="print this many of the most frequent features")
    p.set_defaults(func=concepts.run)

    p = add("report", "evaluate an SAE and write the HTML feature report")
    _store_arg(p)
    _model_arg(p, default=None)
    p.add_argument("--sae-id", required=True)
    p.add_argument("--run-id", help="activation run for statistics (default: the SAE's training run)")
    p.add_argument("--layer")
    p.add_argument("--out", default="report.html", help="output HTML file (default: ./report.html)")
    p.add_argument("--eval-texts", type=_non_negative_int, default=16, help="held-out texts for the evaluation (0: skip)")
    p.add_argument("--eval-dataset", default="default",
                   help="where the evaluation texts come from: 'default' (the Wikipedia sample) or a .txt/.jsonl/.csv "
                        "file; texts the SAE's activation run was saved from are left out (default: default)")
    p.add_argument("--text-field", default="text", help="column with the text in .jsonl/.csv (default: text)")
    p.add_argument("--max-length", type=_positive_int, default=128)
    p.add_argument("--max-tokens", type=_positive_int, help="tokens of the run used for the statistics")
    p.set_defaults(func=report.run)

    p = add("generate", "generate text, optionally steering SAE features")
    _model_arg(p)
    _store_arg(p)
    p.add_argument("--prompt", action="append", help="prompt (repeatable)")
    p.add_argument("--sae-id", help="SAE to steer with")
    p.add_argument("--layer", help="layer the SAE is attached to (default: the one it was trained on)")
    p.add_argument("--steer", action="append", default=[], metavar="NEURON=SCALE",
                   help="scale a feature where it fires (1.5 amplifies, 0 ablates); NEURON may be a concept name")
    p.add_argument("--add", action="append", default=[], metavar="NEURON=ACTIVATION",
                   help="add a feature's decoder direction with this activation (with --relative: this multiple "
                        "of the residual norm)")
    p.add_argument("--clamp", action="append", default=[], metavar="NEURON=VALUE",
                   help="set a feature's activation to VALUE (with --relative: a multiple of the residual norm)")
    p.add_argument("--cap", action="append", default=[], metavar="NEURON=VALUE",
                   help="cap the residual's projection on a feature's direction at VALUE (projection cap)")
    p.add_argument("--relative", action="store_true",
                   help="--add/--clamp/--cap values are multiples of each token's residual norm")
    p.add_argument("--positions", type=_int_list, help="steer only these token positions (e.g. 0,-1)")
    p.add_argument("--exclude-special", action="store_true", help="leave special tokens unsteered")
    p.add_argument("--saved-steering", action="store_true",
                   help="also apply the manipulations saved with the SAE (never applied otherwise)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=30)
    p.set_defaults(func=generate.run)

    p = add("export", "write an SAE for SAELens, sparsify, dictionary_learning, circuit-tracer, Neuronpedia or SAEBench")
    export.add_arguments(p)
    p.set_defaults(func=export.run)
    p = add("steer-eval", "measure steering one SAE feature over a strength sweep")
    _model_arg(p, default=None)
    _store_arg(p)
    p.add_argument("--sae-id", required=True)
    p.add_argument("--layer", help="layer the SAE is attached to (default: the one it was trained on)")
    p.add_argument("--feature", required=True, help="feature index or concept name")
    p.add_argument("--prompt", action="append", help="prompt (repeatable; default: three generic prompts)")
    p.add_argument("--strengths", type=_finite_floats,
                   help="comma-separated sweep (default 0.25,0.35,0.5: multiples of the residual norm for add)")
    p.add_argument("--mode", choices=["add", "clamp", "scale", "cap", "ablate"], default="add")
    p.add_argument("--absolute", action="store_true",
                   help="strengths of add/clamp/cap are activations, not multiples of the residual norm")
    p.add_argument("--max-new-tokens", type=_positive_int, default=24)
    p.add_argument("--json", help="also write the full result as JSON to this file")
    p.set_defaults(func=steer_eval.run)

    p = add("demo", "the whole workflow on the default model and corpus")
    _source_args(p)
    p.add_argument("--tokens", type=_positive_int, help="tokens of activations to save (default 150000; quick 20000)")
    p.add_argument("--train-tokens", type=_positive_int, help="SAE training budget (default: 8 epochs of the saved run)")
    p.add_argument("--max-length", type=_positive_int, help="tokens per text (default 128; quick 64)")
    p.add_argument("--n-latents", type=_positive_int, help="SAE latents (default: 8 x layer width)")
    p.add_argument("--k", type=_positive_int, default=32, help="active latents per token (default: 32)")
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--run-id")
    p.add_argument("--sae-id")
    p.add_argument("--quick", action="store_true", help="small sizes: finishes in well under a minute on 2 cores")
    p.add_argument("--out", help="report file (default: <store>/report.html)")
    p.add_argument("--prompt", action="append",
                   help="prompt for the steering finale (repeatable; default: three generic prompts)")
    p.add_argument("--strength", type=_positive_float,
                   help="steering strength as a multiple of the residual norm (default: chosen by the sweep)")
    p.add_argument("--max-new-tokens", type=_positive_int, help="tokens generated per prompt (default 30; quick 16)")
    p.set_defaults(func=demo.run)
    return parser
