"""The ``mi-crow`` command line."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("mi-crow: no subcommands yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
