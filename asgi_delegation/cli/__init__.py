"""The ``asgi-delegation`` command: ``bench``, ``doctor`` and ``dev-server``.

Exit codes: 0 success, 1 a check or measurement failed, 2 usage error (argparse's own).

The commands print reports of their own; the library's log records (a failed token request, a
denied exchange) would repeat them on stderr through logging's last-resort handler, so they
are shown only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

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
        sub.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="also print the library's log records (INFO and above) on stderr",
        )
        sub.set_defaults(run=module.run)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with _library_logging(verbose=args.verbose):
            return int(args.run(args))
    except KeyboardInterrupt:
        return EXIT_FAILED


@contextlib.contextmanager
def _library_logging(*, verbose: bool) -> Iterator[None]:
    """The library's records go to stderr with ``verbose``, else nowhere; as it was after
    (``main`` also runs inside other programs, tests among them)."""
    library = logging.getLogger("asgi_delegation")
    handler: logging.Handler
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.NullHandler()  # a handler at all: the last-resort one stays silent
    saved = library.level, library.propagate
    library.addHandler(handler)
    library.setLevel(logging.INFO if verbose else logging.WARNING)
    library.propagate = False
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.setLevel(saved[0])
        library.propagate = saved[1]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
