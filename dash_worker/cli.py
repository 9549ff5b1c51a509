"""The ``dash-worker`` command line: one argparse subcommand per agent mode."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from dask.utils import parse_bytes

from dash_worker import agent, commands, serve
from dash_worker.plan import (
    CapsError,
    parse_declared_gpu,
    parse_gpu_selection,
    validate_machine_name,
)

EPILOG = """exit status: 0 done (stopped, drained, left); 1 error (gateway unreachable, invite
or token refused); 2 bad arguments or caps; 3 this machine was revoked."""


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
    parser.add_argument(
        "--name", default=None, help="the name of the one worker (with --nworkers 1; a lease)"
    )
    parser.add_argument(
        "--death-timeout",
        type=float,
        default=None,
        help="seconds a worker waits for a scheduler it lost before it exits (default: forever)",
    )
    parser.add_argument(
        "--session-worker",
        action="store_true",
        help="declare a session worker: it takes one remote session and no other work",
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


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` that turns a CapsError into argparse's own error message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except CapsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _count(minimum: int) -> Callable[[str], int]:
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more; got {value}")
        return value

    return count


def _size(text: str) -> int:
    try:
        value = parse_bytes(text.replace(" ", ""))
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"expected a size such as 16GB or 512MiB; got {text!r}"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive; got {text!r}")
    return int(value)


def _add_config_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config-dir",
        default=None,
        help="where this machine's credentials live "
        "(default: $DASH_WORKER_CONFIG_DIR, else <user config dir>/dash/worker)",
    )


def _add_join(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "join",
        help="enrol this machine with an invite, then run its workers (like start)",
        description="Probe this machine, enrol it with the gateway using a one-time invite, "
        "store its credentials, then run its workers in the foreground (as `start` does). "
        "Caps are hard limits: the workers never use more CPU cores, memory or GPUs.",
        epilog=EPILOG,
    )
    parser.add_argument("url", metavar="URL", help="the gateway's URL, as the invite gave it")
    parser.add_argument("--token", required=True, help="the one-time invite token")
    parser.add_argument(
        "--name",
        type=_checked(validate_machine_name),
        default=None,
        help="machine name (default: from the host name)",
    )
    parser.add_argument(
        "--cpus", type=_count(0), default=None, help="CPU cores to share (default: all; 0: none)"
    )
    parser.add_argument(
        "--memory", type=_size, default=None, help="memory to share, e.g. 16GB (default: all)"
    )
    parser.add_argument(
        "--gpus",
        type=_checked(parse_gpu_selection),
        default="all",
        help="GPUs to share: indices such as 0,1, 'all' (default) or 'none'",
    )
    parser.add_argument(
        "--declare-gpu",
        type=_checked(parse_declared_gpu),
        action="append",
        metavar="MODEL:VRAM",
        help="add a GPU that NVML does not report, e.g. 'NVIDIA A100-SXM4-80GB:80GB' "
        "(repeatable; indices follow the probed GPUs)",
    )
    parser.add_argument(
        "--gpu-threads",
        type=_count(1),
        default=2,
        help="threads of each GPU worker (default 2)",
    )
    parser.add_argument("--local-directory", default=None, help="scratch directory for the workers")
    parser.add_argument(
        "--host",
        default=None,
        help="interface the workers listen on (default: the one that reaches the scheduler)",
    )
    _add_config_dir(parser)
    parser.set_defaults(func=commands.join)


def _add_agent_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "start",
        help="run this enrolled machine's workers until stopped, drained or revoked",
        description="Run the workers of the machine enrolled by `join`, reconnecting by "
        "itself when the scheduler or the gateway goes away. Ctrl-C stops everything.",
        epilog=EPILOG,
    )
    _add_config_dir(parser)
    parser.set_defaults(func=commands.start)

    parser = subparsers.add_parser(
        "status",
        help="show this machine as the gateway sees it",
        description="Show this machine's record on the gateway: state, workers, caps, load.",
    )
    parser.add_argument("--json", action="store_true", help="print the record as JSON")
    _add_config_dir(parser)
    parser.set_defaults(func=commands.status)

    parser = subparsers.add_parser(
        "drain",
        help="take no new work; the running agent exits once running work is done",
        description="Ask the gateway to drain this machine: no new work starts on it; "
        "running work finishes, then the running agent exits.",
    )
    _add_config_dir(parser)
    parser.set_defaults(func=commands.drain)

    parser = subparsers.add_parser(
        "leave",
        help="remove this machine from the cluster and delete its credentials",
        description="Remove this machine from the cluster (its certificates are revoked) "
        "and delete its local credentials.",
    )
    parser.add_argument(
        "--local-only",
        action="store_true",
        help="only delete the local credentials, without telling the gateway",
    )
    _add_config_dir(parser)
    parser.set_defaults(func=commands.leave)


def build_parser() -> argparse.ArgumentParser:
    """The full ``dash-worker`` parser."""
    parser = argparse.ArgumentParser(
        prog="dash-worker", description="Contribute this machine's CPUs and GPUs to a DASH cluster."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_join(subparsers)
    _add_agent_commands(subparsers)
    _add_serve(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``dash-worker``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="[%(levelname)1.1s %(asctime)s %(name)s] %(message)s"
    )
    try:
        code = args.func(args)
    except agent.AgentExit as exc:
        print(exc.message, file=sys.stderr, flush=True)
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
