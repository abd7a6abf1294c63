"""Measure this machine and write it as a cluster description for the planner.

    python scripts/calibrate.py                       # writes configs/clusters/this-machine.yaml
    python scripts/calibrate.py --ranks 2 --dtypes float32,float64 --out my-machine.yaml

Starts --ranks local processes on gloo with --threads-per-rank threads each, as scripts/train.py
does, and measures matmul throughput by shape, elementwise kernels, attention, the optimizer
step, memory bandwidth, and gloo collectives and point-to-point transfers between the ranks over
loopback (see planner/calibrate.py). Takes about a minute on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parallel.launch import run_ranks  # noqa: E402
from planner.calibrate import FULL, QUICK, TORCH_DTYPES, build_cluster, calibrate_rank  # noqa: E402
from planner.cluster import CLUSTER_DIR, Link, save_cluster  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=os.cpu_count() or 1,
                        help="local ranks to start, the devices of the cluster (default: one per core)")
    parser.add_argument("--threads-per-rank", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--dtypes", default="float32,float64",
                        help=f"comma-separated matmul dtypes to measure, of {list(TORCH_DTYPES)} "
                             f"(default float32,float64)")
    parser.add_argument("--quick", action="store_true",
                        help="measure fewer shapes and sizes, about a third of the time")
    parser.add_argument("--name", default="this-machine", help="cluster name (default this-machine)")
    parser.add_argument("--out", help="YAML file to write (default configs/clusters/NAME.yaml)")
    parser.add_argument("--raw", help="also write every rank's raw measurements to this JSON file")
    parser.add_argument("--from-raw", help="build the cluster from raw measurements written by --raw "
                                           "instead of measuring")
    return parser.parse_args(argv)


def _collectives_to_json(result: dict) -> dict:
    fits = {op: [link.bandwidth, link.latency] for op, link in result["collectives"].items()}
    return {**result, "collectives": fits}


def _collectives_from_json(result: dict) -> dict:
    fits = {op: Link(*values) for op, values in result["collectives"].items()}
    return {**result, "collectives": fits}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    unknown = sorted(set(dtypes) - set(TORCH_DTYPES))
    if unknown or args.ranks < 1 or args.threads_per_rank < 1:
        print(f"error: --dtypes must name {list(TORCH_DTYPES)} (got {unknown or dtypes}); --ranks and "
              f"--threads-per-rank must be at least 1", file=sys.stderr)
        return 2
    if args.from_raw:
        with open(args.from_raw) as f:
            raw = json.load(f)
        results, load_before, load_after = raw["results"], raw["load_before"], raw["load_after"]
        results = [_collectives_from_json(r) for r in results]
    else:
        load_before = os.getloadavg()[0]
        settings = QUICK if args.quick else FULL
        results = run_ranks(calibrate_rank, args.ranks, (dtypes, settings), timeout_s=600.0,
                            threads_per_rank=args.threads_per_rank)
        load_after = os.getloadavg()[0]
    if args.raw:
        with open(args.raw, "w") as f:
            json.dump({"results": [_collectives_to_json(r) for r in results], "load_before": load_before,
                       "load_after": load_after}, f)
    command = "python scripts/calibrate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cluster = build_cluster(results, args.name, args.ranks, args.threads_per_rank, command.strip(),
                            load_before, load_after)
    out = Path(args.out) if args.out else CLUSTER_DIR / f"{args.name}.yaml"
    save_cluster(cluster, out)
    fits = ", ".join(f"{op} {link.bandwidth / 1e9:.2f} GB/s + {link.latency * 1e6:.0f} us"
                     for op, link in (cluster.collectives or {}).items())
    logging.info("wrote %s: matmul peak %s GFLOP/s; %s; load average %.1f -> %.1f", out,
                 {d: round(f / 1e9, 1) for d, f in cluster.peak_flops.items()}, fits, load_before, load_after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
