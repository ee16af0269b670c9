"""``main``: parse the command line, run the subcommand, and turn what escapes it into an exit status.

The error model (issue 11, defect 4):

* a :class:`~mi_crow.errors.MiCrowError` (bad input, a missing or corrupt file, a missing default package) is the
  user's to fix: one line ``mi-crow <command>: error: <message>``, exit status 2;
* a bad flag is reported by argparse, also with status 2;
* Ctrl-C: a hint to run the same command again (every long step resumes), status 130;
* anything else is a bug in mi_crow or a library below it: ``mi-crow <command>: internal error: <type>: <message>
  (re-run with -v for the traceback)``, status 1.

With ``-v`` the traceback is printed as well (for user errors too).
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Sequence

from mi_crow.cli.common import PROG
from mi_crow.cli.parser import build_parser
from mi_crow.errors import MiCrowError

__all__ = ["main"]

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # transformers' per-load progress bars and notices drown the CLI's own progress output.
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mi-crow``; returns the exit status (0 ok, 1 internal error, 2 user error, 130 interrupted).

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USER_ERROR
    verbose = bool(args.verbose)
    _configure_logging(verbose)
    where = f"{PROG} {args.command}"
    try:
        return int(args.func(args) or EXIT_OK)
    except MiCrowError as exc:
        if verbose:
            traceback.print_exc(file=sys.stderr)
        print(f"{where}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"\n{where}: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last resort: report a bug as one, not as bad input
        if verbose:
            traceback.print_exc(file=sys.stderr)
            print(f"{where}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            print(f"{where}: internal error: {type(exc).__name__}: {exc} (re-run with -v for the traceback)",
                  file=sys.stderr)
        return EXIT_INTERNAL_ERROR
