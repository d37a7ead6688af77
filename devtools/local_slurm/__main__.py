"""Command line: ``python -m devtools.local_slurm start | status | stop --dir D``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from devtools.local_slurm.cluster import cluster_status, start_cluster, stop_cluster
from devtools.local_slurm.layout import ClusterError


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.local_slurm", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a cluster; prints the exports for the clients")
    start.add_argument("--dir", required=True, type=Path, help="cluster directory (created)")
    start.add_argument(
        "--port-base", type=int, default=None, help="first of 4 ports (default: free)"
    )
    start.add_argument("--cpus", type=int, default=None, help="node CPUs (default: os.cpu_count())")
    start.add_argument("--timeout", type=float, default=60.0, help="start timeout in seconds")
    for name, text in (("stop", "stop the cluster"), ("status", "show daemons and node state")):
        sub.add_parser(name, help=text).add_argument("--dir", required=True, type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m devtools.local_slurm``."""
    args = _parse_args(argv)
    try:
        if args.command == "start":
            cluster = start_cluster(args.dir, args.port_base, args.cpus, args.timeout)
            for key, value in cluster.env.items():
                print(f"export {key}={shlex.quote(value)}")
            return 0
        if args.command == "stop":
            stop_cluster(args.dir)
            return 0
        status = cluster_status(args.dir)
        print(json.dumps(status, indent=2))
        daemons = status["daemons"]
        return 0 if isinstance(daemons, dict) and all(daemons.values()) else 1
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
