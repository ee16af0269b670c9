"""``mi-crow steer-eval``: measure steering one SAE feature over a strength sweep (table and JSON)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mi_crow.cli.common import (
    check_fits,
    cli_info,
    load_model,
    load_sae,
    model_of_sae,
    open_store,
    parse_layer,
    resolve_layer,
    say,
)
from mi_crow.errors import UserInputError
from mi_crow.store.atomic import atomic_write_text

DEFAULT_PROMPTS = ["My favourite place to visit is", "The best thing about the weekend is",
                   "Yesterday I read an article about"]


def _feature(value: str) -> int | str:
    return int(value) if re.fullmatch(r"\d+", value.strip()) else value.strip()


def run(args: argparse.Namespace) -> int:
    from mi_crow.mechanistic.sae.concepts.evaluation import evaluate_steering

    store = open_store(args.store)
    sae = load_sae(store, args.sae_id)
    info = cli_info(store, args.sae_id)
    recorded = model_of_sae(None, info)
    model = model_of_sae(args.model, info)
    if not model:
        raise UserInputError("--model is required: the store does not say which model this SAE belongs to")
    if args.model and recorded and args.model != recorded:
        raise UserInputError(
            f"--model {args.model!r}: SAE {args.sae_id!r} was trained on model {recorded!r} (per the store), so it "
            f"cannot be attached to {args.model!r}; leave out --model or pass {recorded!r}"
        )
    lm = load_model(model, store=store)
    layer = resolve_layer(lm, parse_layer(args.layer) if args.layer else (info.get("layer") or
                                                                          sae.metadata.get("layer")))
    check_fits(lm, sae, layer)
    feature = _feature(args.feature)
    if isinstance(feature, int) and feature >= sae.n_latents:
        raise UserInputError(f"--feature {feature} is out of range; the SAE has n_latents={sae.n_latents}")
    prompts = args.prompt or DEFAULT_PROMPTS
    lm.attach_sae(sae, layer)
    try:
        result = evaluate_steering(lm, sae, feature, prompts, args.strengths, mode=args.mode,
                                   relative=not args.absolute, max_new_tokens=args.max_new_tokens)
    finally:
        lm.detach_sae(sae)
    unit = "" if args.absolute or args.mode in ("scale", "ablate") else " (multiples of the residual norm)"
    say(f"feature {result.neuron} on {layer}, mode {result.mode}{unit}; {len(prompts)} prompts, "
        f"{result.max_new_tokens} new tokens each")
    say(f"promotes: {', '.join(repr(t) for t in result.promoted_tokens)}")
    say(f"words counted in the continuations (whole words): {', '.join(repr(w) for w in result.promoted_words)}")
    say(f"suppresses: {', '.join(repr(t) for t in result.suppressed_tokens)}")
    say(result.table())
    best = result.best
    if best is not None:
        say(f"chosen strength {best.strength:g}: " + ("meets" if best.passes else "does not meet")
            + " the targets (feature active >= 80%, promoted words >= 50% and < 10% plain, loss rise < 1 "
            "nat/token)")
        for prompt, plain, steered in zip(prompts, result.plain.continuations, best.continuations):
            say(f"prompt:  {prompt!r}\nplain:   {plain!r}\nsteered: {steered!r}")
    put_steering(store, args.sae_id, result)
    if args.json:
        path = Path(args.json)
        atomic_write_text(path, result.to_json() + "\n")
        say(f"JSON: {path.resolve()}")
    return 0


def put_steering(store, sae_id: str, result) -> None:
    """Record the measurement beside the SAE (``sae_models/<sae_id>/steering.json``, one entry per feature), where
    the report finds it."""
    key = f"sae_models/{sae_id}/steering.json"
    data = store.get_json(key) if store.exists(key) else {}
    data[str(result.neuron)] = result.to_dict()
    store.put_json(key, data)
