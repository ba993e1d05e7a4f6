"""`python -m metaif.demo [--out DIR]`: an alias of `metaif demo` (see `metaif demo --help`)."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from .cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
