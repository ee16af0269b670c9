"""``mi-crow layers``: the layers of a model (block indices and names, or the whole module tree)."""

from __future__ import annotations

import argparse
import sys

from mi_crow.cli.common import load_model, say


def run(args: argparse.Namespace) -> int:
    lm = load_model(args.model)
    blocks = lm.layers.block_names
    if args.all:
        lm.layers.print_tree(max_depth=args.depth, file=sys.stdout)
    else:
        say(f"{len(blocks)} transformer blocks (use --layer INDEX or --layer NAME; all names: --all):")
        for i, name in enumerate(blocks):
            say(f"  {i:3d}  {name}")
    if blocks:
        say(f"width: {lm.layers.width(blocks[0])}; default layer for save/demo: {len(blocks) // 2} "
            f"({blocks[len(blocks) // 2]})")
    return 0
