"""The ``lazytensor`` command line: ``lazytensor demo`` and ``lazytensor serve``.

Each subcommand is a small function taking the parsed arguments; :func:`main` is the console
entry point declared in ``pyproject.toml`` and also what ``python -m lazytensor`` runs.

Example::

    lazytensor demo --local
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

#: Whether ``lazytensor demo`` runs remotely (through an embedded server) unless ``--local``
#: is given. Local until the server exists.
DEMO_REMOTE_BY_DEFAULT = True


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the chosen subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # the server parses its own options, in any order, and --help
        from lazytensor_server.app import main as serve  # the client never imports the server

        raise SystemExit(serve(argv[1:]))
    args = _parser().parse_args(argv)
    args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazytensor",
        description="Lazy tracing for interpretability: record interventions on a model, "
        "run them locally or on a server.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="force MLP neurons of a small built-in Llama and show clean vs forced top-5 tokens",
        description="Run the neuron-forcing experiment on a small random-weight Llama and "
        "print a table of clean vs forced next-token predictions.",
    )
    demo.add_argument("--local", action="store_true", help="run in this process, without a server")
    demo.set_defaults(run=_demo)

    commands.add_parser(  # listed in --help; main() hands its arguments to the server
        "serve",
        help="serve models to lazytensor clients over ZeroMQ (see `lazytensor serve --help`)",
        add_help=False,
    )

    return parser


def _demo(args: argparse.Namespace) -> None:
    from . import demo

    demo.main(remote=DEMO_REMOTE_BY_DEFAULT and not args.local)
