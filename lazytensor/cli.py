"""The ``lazytensor`` command line: ``lazytensor demo``, ``lazytensor serve``, ``lazytensor keys``.

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

    keys = commands.add_parser(
        "keys",
        help="make keys for a server (see `lazytensor keys curve --help`)",
        description="Make keys for a lazytensor server.",
    )
    kinds = keys.add_subparsers(dest="kind", required=True, metavar="KIND")
    curve = kinds.add_parser(
        "curve",
        help="a CurveZMQ key pair: PATH.key (public) and PATH.key_secret (secret, mode 0600)",
        description="Write a new CurveZMQ key pair as ZeroMQ certificates: PATH.key holds the "
        "public key (give it out: a server's to its clients as server_key, a client's to the "
        "server's --curve-clients folder), PATH.key_secret both keys (keep it: a server's for "
        "--curve-secret, a client's for client_secret).",
    )
    curve.add_argument("path", metavar="PATH", help="where to write, without the extension")
    curve.set_defaults(run=_curve_keys)

    return parser


def _curve_keys(args: argparse.Namespace) -> None:
    from .protocol import curve

    try:
        public, secret = curve.create(args.path)
    except FileExistsError as exc:
        raise SystemExit(f"lazytensor keys curve: {exc}") from None
    print(f"public key {curve.public_key(public).decode()} written to {public}")
    print(f"secret key written to {secret} (keep it private)")


def _demo(args: argparse.Namespace) -> None:
    from . import demo

    demo.main(remote=DEMO_REMOTE_BY_DEFAULT and not args.local)
