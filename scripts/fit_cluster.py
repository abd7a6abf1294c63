"""Fit a GPU cluster's efficiencies to published Megatron-LM runs, and show every run's error.

    python scripts/fit_cluster.py                                  # the fit of the a100 preset
    python scripts/fit_cluster.py --write

Searches the three efficiencies of `configs/clusters/<cluster>.yaml` (GEMM, memory, network) for
the values that minimize the largest relative error on the --fit runs, at most three (see
planner.published.fit_efficiency). Then prints the error of every run of
tests/data/published_runs.yaml. --write stores the fitted values in the cluster file.

The default runs span both papers, small to large hidden sizes and the three kinds of layout:
"1.7B" (Narayanan et al. 2021, Table 1: no model parallelism, 32-way data parallel), "145.6B"
(the same table: tp 8, pp 8, 24-way data parallel across nodes) and "530B full" (Korthikanti
et al. 2022, Table 5: tp 8, pp 35, full recomputation).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.cluster import cluster_path, load_cluster  # noqa: E402
from planner.estimate import CostModel  # noqa: E402
from planner.published import best_estimate, fit_efficiency, load_runs  # noqa: E402
from planner.workload import MEGATRON  # noqa: E402

FIT_RUNS = "1.7B,145.6B,530B full"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", default="a100-80gb-selene", help="cluster preset or YAML file")
    parser.add_argument("--fit", default=FIT_RUNS, help=f"comma-separated runs to fit on (default {FIT_RUNS!r})")
    parser.add_argument("--write", action="store_true", help="store the fitted efficiencies in the cluster file")
    args = parser.parse_args(argv)

    runs = load_runs()
    names = [n.strip() for n in args.fit.split(",") if n.strip()]
    by_name = {run.name: run for run in runs}
    unknown = [n for n in names if n not in by_name]
    if unknown or len(names) > 3:
        print(f"error: --fit takes at most three of {list(by_name)}; got {names}", file=sys.stderr)
        return 2
    cluster = load_cluster(args.cluster)
    efficiency = fit_efficiency(cluster, [by_name[n] for n in names])
    print(f"fitted on {names}: gemm {efficiency.gemm:.2f}, memory {efficiency.memory:.2f}, "
          f"network {efficiency.network:.2f}")

    model = CostModel(dataclasses.replace(cluster, efficiency=efficiency), MEGATRON)
    print(f"{'run':16} {'published':>10} {'predicted':>10} {'error':>7}  layout")
    for run in runs:
        estimate = best_estimate(model, run)
        unit = "TFLOP/s" if run.tflops_per_gpu is not None else "s"
        mark = " (fit)" if run.name in names else ""
        print(f"{run.name:16} {run.published:>8.2f}{unit[0]:>2} {run.predicted(estimate):>9.2f}{unit[0]} "
              f"{run.relative_error(estimate):+7.1%}  {estimate.candidate.describe()}{mark}")
    if args.write:
        path = cluster_path(args.cluster)
        text = path.read_text()
        line = (f"efficiency: {{gemm: {efficiency.gemm:.2f}, memory: {efficiency.memory:.2f}, "
                f"network: {efficiency.network:.2f}}}")
        path.write_text(re.sub(r"^efficiency: .*$", line, text, flags=re.M))
    return 0


if __name__ == "__main__":
    sys.exit(main())
