"""The ``asgi-delegation`` command: ``bench``, ``doctor`` and ``dev-server``.

Exit codes: 0 success, 1 a check or measurement failed, 2 usage error (argparse's own).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import _bench, _dev_server, _doctor

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_COMMANDS = {
    "bench": (_bench, "measure validation and token exchange, on an embedded server or yours"),
    "doctor": (_doctor, "check a deployment step by step, and say how to fix what fails"),
    "dev-server": (_dev_server, "run a local authorization server for development"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="asgi-delegation",
        description="Delegated access for ASGI applications: measure, diagnose, develop.",
        epilog="Exit codes: 0 ok, 1 a check failed, 2 usage error.",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in _COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
