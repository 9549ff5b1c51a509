"""The ``dash-worker`` command line: one argparse subcommand per agent mode."""

from __future__ import annotations

import argparse
import logging
import sys

from dash_worker import serve


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run N Dask workers (one nanny each) connected to a scheduler over mutual TLS",
        description="Run N Dask workers (one nanny each) in this process, "
        "connected to a DASH scheduler over mutual TLS.",
    )
    parser.add_argument("--scheduler", required=True, help="scheduler address, tls://host:port")
    parser.add_argument("--nworkers", type=int, default=1, help="number of workers (default 1)")
    parser.add_argument("--nthreads", type=int, default=1, help="threads per worker (default 1)")
    parser.add_argument(
        "--memory-limit",
        default="auto",
        help="memory limit per worker: bytes, a size such as 4GB, or 'auto' (default)",
    )
    parser.add_argument("--tls-ca", required=True, help="CA certificate (PEM file)")
    parser.add_argument("--tls-cert", required=True, help="worker certificate (PEM file)")
    parser.add_argument("--tls-key", required=True, help="worker private key (PEM file)")
    parser.add_argument(
        "--name-prefix", default="worker", help="workers are named PREFIX-0, PREFIX-1, ..."
    )
    parser.add_argument("--host", default=None, help="interface the workers listen on")
    parser.add_argument("--local-directory", default=None, help="scratch directory for workers")
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process is no longer our parent (default: the parent at start; 0: never)",
    )
    parser.set_defaults(func=serve.main)


def build_parser() -> argparse.ArgumentParser:
    """The full ``dash-worker`` parser."""
    parser = argparse.ArgumentParser(
        prog="dash-worker", description="Contribute this machine's CPUs and GPUs to a DASH cluster."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_serve(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``dash-worker``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="[%(levelname)1.1s %(asctime)s %(name)s] %(message)s"
    )
    sys.exit(args.func(args))
