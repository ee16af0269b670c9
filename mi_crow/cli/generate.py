"""``mi-crow generate``: text from a model, and the same prompts with SAE features steered."""

from __future__ import annotations

import argparse
import math
import re
from typing import TYPE_CHECKING, Callable, Sequence

from mi_crow.cli.common import (
    check_fits,
    cli_info,
    load_model,
    load_sae,
    open_store,
    parse_layer,
    resolve_layer,
    say,
)
from mi_crow.errors import UserInputError

if TYPE_CHECKING:  # pragma: no cover
    from mi_crow.mechanistic.sae import TopKSae


def _parse_assignments(items: Sequence[str], flag: str, number: Callable[[str], float]) -> list[tuple[str, float]]:
    out = []
    for item in items:
        left, sep, right = item.partition("=")
        if not sep or not left.strip():
            raise UserInputError(f"{flag} {item!r}: expected NEURON=VALUE, e.g. {flag} 123=4.0")
        try:
            value = number(right)
        except ValueError:
            raise UserInputError(f"{flag} {item!r}: {right!r} is not a number") from None
        if not math.isfinite(value):
            raise UserInputError(f"{flag} {item!r}: the value must be finite")
        out.append((left.strip(), value))
    return out


def _neuron(sae: TopKSae, key: str, flag: str) -> int | str:
    if re.fullmatch(r"\d+", key):
        idx = int(key)
        if idx >= sae.n_latents:
            raise UserInputError(f"{flag}: neuron {idx} is out of range; the SAE has n_latents={sae.n_latents}")
        return idx
    return key  # a concept name, resolved by the concepts dictionary


def run(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    lm = load_model(args.model, store=store)
    prompts = args.prompt or ["The history of the city"]
    steering = args.steer or args.add or args.clamp or args.cap or args.saved_steering
    if not steering:
        for p, text in zip(prompts, lm.generate(prompts, max_new_tokens=args.max_new_tokens)):
            say(f"{p}{text}")
        return 0
    if not args.sae_id:
        raise UserInputError("--sae-id is required with --steer/--add/--clamp/--cap/--saved-steering")
    sae = load_sae(store, args.sae_id)
    info = cli_info(store, args.sae_id)
    layer = resolve_layer(lm, parse_layer(args.layer) if args.layer else (info.get("layer") or
                                                                          sae.metadata.get("layer")))
    check_fits(lm, sae, layer)
    steer = _parse_assignments(args.steer, "--steer", float)
    edits = [(flag, mode, _parse_assignments(items, flag, float))
             for flag, mode, items in (("--add", "add", args.add), ("--clamp", "clamp", args.clamp),
                                       ("--cap", "cap", args.cap))]
    for key, scale in steer:
        if scale < 0:
            raise UserInputError(f"--steer {key}={scale}: the scale must be >= 0 (1.5 amplifies, 0 ablates)")
    # Loading never applies saved steering: "plain" below is the model itself.
    if sae.concepts.has_manipulations:
        sae.concepts.reset_manipulations()
    hook_id = lm.attach_sae(sae, layer)
    try:
        plain = lm.generate(prompts, max_new_tokens=args.max_new_tokens)
        if args.saved_steering:
            sae.concepts.apply_saved_manipulations()
        for key, scale in steer:
            sae.concepts.manipulate_concept(_neuron(sae, key, "--steer"), scale)
        for flag, mode, items in edits:
            for key, value in items:
                amount = {"strength": value} if args.relative else {"value": value}
                sae.concepts.steer(_neuron(sae, key, flag), mode, positions=args.positions,
                                   exclude_special=args.exclude_special, **amount)
        steered = lm.generate(prompts, max_new_tokens=args.max_new_tokens)
    finally:
        sae.concepts.reset_manipulations()
        lm.layers.unregister_hook(hook_id)
    unit = "x|resid|" if args.relative else ""
    label = ", ".join([f"{k}x{v:g}" for k, v in steer]
                      + [f"{mode} {k}={v:g}{unit}" for _, mode, items in edits for k, v in items]
                      + (["saved steering"] if args.saved_steering else []))
    for p, a, b in zip(prompts, plain, steered):
        say(f"prompt:   {p}\nplain:    {a}\nsteered ({label}): {b}\n")
    return 0
