"""``python -m benchmarks``: run DASH's side-by-side comparisons and report them."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from . import harness, report


def _interrupt(signum: int, frame: Any) -> None:
    # Turn SIGTERM/SIGHUP into the path Ctrl-C takes, so the gateway is stopped on the way out.
    raise KeyboardInterrupt(f"signal {signum}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Compare DASH with raw Dask and ipyparallel on one real dash-gateway.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the ratios")
    parser.add_argument(
        "--only", metavar="ID,ID", help=f"run only these ({', '.join(harness.IDS)})"
    )
    args = parser.parse_args(argv)
    if args.only is not None:
        args.only = {part.strip() for part in args.only.split(",") if part.strip()}
        unknown = sorted(args.only - set(harness.IDS))
        if unknown:
            parser.error(f"unknown id(s) {', '.join(unknown)}; known: {', '.join(harness.IDS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sizes = harness.TINY if args.tiny else harness.QUICK if args.quick else harness.FULL
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        result = harness.run(sizes, args.only)
    except KeyboardInterrupt:
        print("interrupted; the gateway and every process started were stopped", file=sys.stderr)
        return 130
    print()
    print(report.table(result))
    if args.json:
        report.write_json(result, args.json)
        print(f"\nwrote {args.json}")
    if args.plot:
        report.plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 1 if any(row.get("failed") for row in result["comparisons"]) else 0


if __name__ == "__main__":
    sys.exit(main())
