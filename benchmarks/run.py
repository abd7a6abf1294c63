"""Run a benchmark sweep and write its results.

    python benchmarks/run.py benchmarks/sweeps/peers.yaml --out runs/bench

Every point of the sweep runs as its own job of new local processes (one per rank, gloo on the
CPU). Before the points, one process per distinct core count measures the matmul peak that MFU is
reported against. microtron's single-process model gives the reference losses of each workload;
each point's losses are checked against them before its time is reported. The output folder
receives results.csv, results.md, results.json and the PNG plots, rewritten after every point.
With `--rounds N` the whole sweep runs N times and each point reports its fastest round, so
that a burst of load from other processes spoils one round of a point rather than its result.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

# Import from the repository root, not from this folder, whose module names are not unique
# (the rank processes inherit this path).
ROOT = Path(__file__).resolve().parent.parent
sys.path = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "benchmarks")]

import torch  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.microtron_job import microtron_job  # noqa: E402
from benchmarks.peers import JOBS  # noqa: E402
from benchmarks.results import loss_mismatch, summarize  # noqa: E402
from benchmarks.sweep import Point, SweepError, load_sweep  # noqa: E402
from benchmarks.workload import DTYPES  # noqa: E402
from parallel.launch import RankFailure, run_ranks  # noqa: E402

log = logging.getLogger("microtron.benchmarks")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="sweep YAML file, such as benchmarks/sweeps/peers.yaml")
    parser.add_argument("--out", required=True, help="folder for results.csv, results.md and plots")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only the points whose label contains TEXT (repeatable)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every point this many times, round after round, and report "
                             "its fastest round (default 1)")
    parser.add_argument("--timeout-s", type=float, default=300.0,
                        help="process-group timeout of each job in seconds (default 300)")
    return parser.parse_args(argv)


def matmul_peak_job(rank: int, world_size: int, dtype_name: str) -> float:
    """Return the best FLOP/s of square matmuls on this process's threads."""
    dtype = DTYPES[dtype_name]
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        c = torch.mm(a, b)
        repeats = max(1, int(1e10 / (2 * n**3)))
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                torch.mm(a, b, out=c)
            best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best


def machine_context(argv: list[str]) -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "command": "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in argv),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{model}, {os.cpu_count()} cores visible, {platform.system()}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load average at start (1 min)": f"{os.getloadavg()[0]:.2f}",
        "CPU pressure at start": cpu_pressure(),
    }


def cpu_pressure() -> str:
    """Return Linux's CPU pressure: the share of time some runnable task waited for a core,
    over the last 60 s. A busy machine shows tens of percent; an idle one, almost none."""
    try:
        with open("/proc/pressure/cpu") as f:
            fields = dict(item.split("=") for item in f.readline().split()[1:])
        return f"{fields['avg60']}% (some, avg60)"
    except (OSError, KeyError, ValueError):
        return "not available"


def _order(points: list[Point]) -> list[Point]:
    """Put microtron's single-process points first: the first of them gives the reference losses."""
    return sorted(points, key=lambda p: not (p.impl == "microtron" and p.world_size == 1))


def _run_point(point: Point, workload, timeout_s: float):
    job = microtron_job if point.impl == "microtron" else JOBS[point.impl]
    return run_ranks(job, point.world_size, (point.job_args(), workload.to_dict()),
                     timeout_s=timeout_s, threads_per_rank=point.threads)


def _reference_losses(workload, timeout_s: float) -> list[float]:
    point = Point(workload=workload.name, impl="microtron")
    log.info("%s: reference losses from %s", workload.name, point.label)
    return _run_point(point, workload, timeout_s)[0]["losses"]


class _Runner:
    """Runs the points of a sweep, round after round, and keeps every round's summary."""

    def __init__(self, sweep, points: list[Point], peaks: dict, timeout_s: float):
        self.sweep = sweep
        self.points = points
        self.peaks = peaks
        self.timeout_s = timeout_s
        self.references: dict[str, list[float]] = {}
        self.summaries: dict[Point, list[dict]] = {point: [] for point in points}
        self.status: dict[Point, str] = {}

    def run(self, point: Point, where: str) -> None:
        """Run one round of `point` unless an earlier round failed; log and keep its summary."""
        if self.status.get(point, "ok") != "ok":
            return
        workload = self.sweep.workloads[point.workload]
        try:
            if point.workload not in self.references and not (
                    point.impl == "microtron" and point.world_size == 1):
                self.references[point.workload] = _reference_losses(workload, self.timeout_s)
            ranks = _run_point(point, workload, self.timeout_s)
        except RankFailure as error:
            self.status[point] = "failed: " + str(error).strip().splitlines()[-1][:200]
            log.error("%s %s failed:\n%s", where, point.label, error)
            return
        reference = self.references.setdefault(point.workload, ranks[0]["losses"])
        mismatch = loss_mismatch(ranks[0]["losses"], reference, workload.warmup_steps + 1)
        if mismatch:
            self.status[point] = f"loss mismatch: {mismatch}"
            log.error("%s %s: %s", where, point.label, self.status[point])
            return
        self.status[point] = "ok"
        summary = summarize(point, workload, ranks, self.peaks[(point.cores, workload.dtype)])
        self.summaries[point].append(summary)
        log.info("%s %s: %.3f s/step", where, point.label, summary["step_s"])

    def rows(self) -> list[dict]:
        """Return one row per point run so far: the round with the lowest step time, and the
        step time of every round.

        Other processes on the machine can only slow a round down, so the fastest round is the
        closest to what the code does on its own (the convention of Python's timeit).
        """
        rows = []
        for point in self.points:
            if point not in self.status:
                continue
            row = {"point": point, "status": self.status[point]}
            summaries = self.summaries[point]
            if summaries and row["status"] == "ok":
                row.update(min(summaries, key=lambda s: s["step_s"]))
                row["step_s_rounds"] = [s["step_s"] for s in summaries]
            rows.append(row)
        return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        sweep = load_sweep(args.sweep)
    except (OSError, SweepError) as error:
        log.error("%s", error)
        return 2
    if args.rounds < 1:
        log.error("--rounds %d must be at least 1", args.rounds)
        return 2
    points = [p for p in _order(sweep.points) if not args.only or any(t in p.label for t in args.only)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    context = machine_context(argv)
    began = time.monotonic()

    peaks = {}
    for cores, dtype in sorted({(p.cores, sweep.workloads[p.workload].dtype) for p in points}):
        peaks[(cores, dtype)] = run_ranks(matmul_peak_job, 1, (dtype,), threads_per_rank=cores)[0]
        context[f"matmul peak, {cores} core(s), {dtype}"] = f"{peaks[(cores, dtype)] / 1e9:.1f} GFLOP/s"
        log.info("matmul peak on %d core(s), %s: %.1f GFLOP/s", cores, dtype, peaks[(cores, dtype)] / 1e9)

    runner = _Runner(sweep, points, peaks, args.timeout_s)
    for round_index in range(args.rounds):
        for index, point in enumerate(points, 1):
            runner.run(point, f"[round {round_index + 1}/{args.rounds}, {index}/{len(points)}]")
            _write(out, runner.rows(), context, plots=False)

    context["sweep time"] = f"{time.monotonic() - began:.0f} s"
    context["load average at end (1 min)"] = f"{os.getloadavg()[0]:.2f}"
    context["CPU pressure at end"] = cpu_pressure()
    rows = runner.rows()
    _write(out, rows, context, plots=True)
    log.info("wrote %s", out / "results.md")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


def _write(out: Path, rows: list[dict], context: dict, plots: bool) -> None:
    report.add_baseline_ratios(rows)
    report.write_csv(out / "results.csv", rows)
    report.write_json(out / "results.json", rows, context)
    names = report.write_plots(out, rows) if plots else None
    (out / "results.md").write_text(report.markdown(rows, context, names))


if __name__ == "__main__":
    sys.exit(main())
