"""Compare the planner's predicted step times with measured ones on this machine.

    python scripts/check_predictions.py --rounds 3 --out docs/planner-check.json
    python scripts/check_predictions.py --train-py --rounds 1     # one scripts/train.py run per point

The workload is the reference one: 8 layers, hidden 256, 8 heads, sequence 128, global batch 32
(8 micro-batches of 4), vocabulary 4096 (the byte-level corpus with model.vocab_size=4096),
float32, on 2 ranks of one thread each. The points are the 2-rank layouts: tp 2, dp 2, and pp 2
under every schedule of the zoo, plus the planner's first choice.

The script calibrates (scripts/calibrate.py --quick) and runs the planner for its first choice.
Then each of --rounds rounds trains every point in one 2-rank job, one step of each in turn (in
a rotating order), --warmup untimed and --steps timed steps each, timing each step as
scripts/train.py does and keeping the slowest rank's time, and calibrates again. Interleaving
matters on a machine that other work shares: its speed changes from one minute to the next, and
interleaved points see the same changes. A point's measured time is the median of its timed
steps; its predicted time is the median of the predictions of all calibrations, which sample the
machine over the same period as the steps. Right before each step the job also probes the
machine's speed (the matmul rate of one rank alone and of both ranks at once, as calibration
measures it); the "probed" column scales the first calibration's compute to each probe.

With --train-py each round instead runs scripts/train.py --log-json once per point: what a user
would run, but each point sees a different machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.config import GPTConfig  # noqa: E402
from parallel.launch import run_ranks  # noqa: E402
from planner.calibrate import active_rates  # noqa: E402
from planner.cluster import load_cluster  # noqa: E402
from planner.estimate import CostModel  # noqa: E402
from planner.search import plan  # noqa: E402
from planner.workload import Candidate, Workload  # noqa: E402
from training.compat import Strategy  # noqa: E402

MODEL = GPTConfig(vocab_size=4096, n_positions=128, n_embd=256, n_layer=8, n_head=8)
WORKLOAD = Workload(MODEL, seq_len=128, global_batch=32, dtype="float32")


def _point(tp=1, pp=1, dp=1, b=4, schedule="1f1b", v=1) -> Candidate:
    m = WORKLOAD.global_batch // (dp * b)
    return Candidate(tp, pp, dp, b, m, Strategy(schedule=schedule, virtual_stages=v))


POINTS = [_point(tp=2), _point(dp=2)] + [
    _point(pp=2, schedule=name, v=v) for name, v in (
        ("1f1b", 1), ("gpipe", 1), ("zb-h1", 1), ("zb-h2", 1), ("interleaved-1f1b", 2), ("zb-v", 2),
        ("dualpipev", 2))]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="measurement rounds (default 3)")
    parser.add_argument("--steps", type=int, default=6,
                        help="timed steps per point and round, after the warm-up (default 6)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps of each point in each round (default 2)")
    parser.add_argument("--train-py", action="store_true",
                        help="measure each point with its own scripts/train.py run instead")
    parser.add_argument("--out", help="write every number as JSON here")
    return parser.parse_args(argv)


def run_overrides(candidate: Candidate, steps: int) -> dict[str, object]:
    """Return the run config overrides that train `candidate` on the reference workload."""
    defaults = GPTConfig().to_dict()
    overrides = {f"model.{k}": v for k, v in MODEL.to_dict().items() if v != defaults[k]}
    overrides.update({"train.seq_len": WORKLOAD.seq_len, "train.global_batch": WORKLOAD.global_batch,
                      "train.steps": steps, "train.eval_interval": 0, "train.eval_batches": 1,
                      "run.sample_tokens": 0, "run.out": None, "run.progress": False,
                      "run.threads_per_rank": 1})
    overrides.update(candidate.overrides())
    return overrides


def calibrate(path: Path) -> dict:
    """Calibrate into `path`; return the load averages around it."""
    before = os.getloadavg()[0]
    subprocess.run([sys.executable, str(ROOT / "scripts" / "calibrate.py"), "--quick", "--ranks", "2",
                    "--dtypes", "float32", "--name", "this-machine", "--out", str(path)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"path": str(path), "load_average": [before, os.getloadavg()[0]]}


# ----------------------------------------------------------------------------------------------
# Measurement


def interleaved_job(rank: int, world_size: int, overrides_list: list[dict], steps: int,
                    first_index: int) -> list[list[dict]]:
    """Train every point on these ranks, one step of each in turn; return each step's time and
    the machine's speed probed right before it (`planner.calibrate.active_rates`)."""
    from parallel.mesh import Mesh
    from training.config import load_run_config, validate
    from training.data import load_corpus
    from training.trainer import Trainer

    tokens = load_corpus(None).tokens
    trainers = []
    for overrides in overrides_list:
        config = load_run_config(None, overrides)
        validate(config)
        trainers.append(Trainer(config, Mesh(config.layout.mesh, rank), tokens))
    records: list[list[dict]] = [[] for _ in trainers]
    for step in range(steps):
        shift = (first_index + step) % len(trainers)
        for index in list(range(shift, len(trainers))) + list(range(shift)):
            rates = torch.tensor([r or 0.0 for r in active_rates(rank, world_size)])
            dist.all_reduce(rates, op=dist.ReduceOp.MAX)
            dist.barrier()
            start = time.perf_counter()
            trainers[index].train_step()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            records[index].append({"step_s": float(elapsed), "probe_gflops": (rates / 1e9).tolist()})
    return records


def measure_train_py(candidate: Candidate, steps: int) -> list[float]:
    """Train `candidate` with scripts/train.py; return every step's step_s."""
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "steps.jsonl"
        overrides = {**run_overrides(candidate, steps), "run.log_json": str(log)}
        command = [sys.executable, str(ROOT / "scripts" / "train.py")]
        for key, value in overrides.items():
            command += ["--set", f"{key}={json.dumps(value)}"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return [json.loads(line)["step_s"] for line in log.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# The check


def check(args, folder: Path) -> dict:
    calibrations = [calibrate(folder / "calibration-0.yaml")]
    first = plan(WORKLOAD, CostModel(load_cluster(calibrations[0]["path"])), 2).ranked[0].candidate
    points = list(dict.fromkeys(POINTS + [first]))
    records: list[list[dict]] = [[] for _ in points]  # timed steps, over all rounds

    for round_index in range(args.rounds):
        total = args.steps + args.warmup
        if args.train_py:
            for index, candidate in enumerate(points):
                times = measure_train_py(candidate, total)[args.warmup:]
                records[index] += [{"step_s": t} for t in times]
        else:
            overrides = [run_overrides(c, total) for c in points]
            result = run_ranks(interleaved_job, 2, (overrides, total, round_index), timeout_s=1800.0)[0]
            for index, point_records in enumerate(result):
                records[index] += point_records[args.warmup:]
        calibrations.append(calibrate(folder / f"calibration-{round_index + 1}.yaml"))
        print(f"round {round_index} done", flush=True)

    clusters = [load_cluster(c["path"]) for c in calibrations]
    rows = []
    for index, candidate in enumerate(points):
        predictions = [CostModel(cluster).estimate(WORKLOAD, candidate).step_s for cluster in clusters]
        probed = [_probed_model(clusters[0], tuple(r["probe_gflops"]), clusters[0].calibration["probe_gflops"])
                  .estimate(WORKLOAD, candidate).step_s for r in records[index] if "probe_gflops" in r]
        times = [r["step_s"] for r in records[index]]
        rows.append({"layout": candidate.describe(), "planner_first": candidate == first,
                     "predicted_s": statistics.median(predictions), "predictions_s": predictions,
                     "probed_s": statistics.median(probed) if probed else None,
                     "measured_s": statistics.median(times), "step_times_s": times,
                     "probes_gflops": [r.get("probe_gflops") for r in records[index]]})
    return {"method": "train.py" if args.train_py else "interleaved", "rows": rows,
            "calibrations": [{"load_average": c["load_average"], "probe_gflops": cl.calibration["probe_gflops"],
                              "matmul_peak_gflops": cl.peak("float32") / 1e9,
                              "speed_by_active_devices": cl.speed_by_active}
                             for c, cl in zip(calibrations, clusters)]}


_MODELS: dict = {}


def _probed_model(cluster, probe: tuple[float, ...], calibrated: list[float]) -> CostModel:
    """Return the cost model of `cluster` at the speed of a later probe: compute scaled by the
    ratio of the probes with every rank computing, and `speed_by_active` from the new probe.
    Probes are rounded to 0.1 GFLOP/s so that steps share models."""
    key = tuple(round(p, 1) for p in probe)
    if key not in _MODELS:
        factor = calibrated[-1] / probe[-1]
        speeds = [p / probe[-1] for p in probe]
        _MODELS[key] = CostModel(cluster.at_speed(factor, speeds))
    return _MODELS[key]


def summarize(result: dict) -> None:
    rows = result["rows"]
    fastest = min(rows, key=lambda r: r["measured_s"])
    first = next(r for r in rows if r["planner_first"])
    print(f"\nmethod: {result['method']}; calibrations (matmul peak GFLOP/s, probe one rank / all ranks, "
          f"load average): " + "; ".join(
              f"{c['matmul_peak_gflops']:.0f}, {c['probe_gflops'][0]:.0f}/{c['probe_gflops'][-1]:.0f}, "
              f"{c['load_average'][0]:.1f}" for c in result["calibrations"]))
    print(f"{'layout':50} {'predicted':>9} {'range':>11} {'measured':>8} {'spread':>11} {'error':>7} "
          f"{'probed':>7}")
    for r in sorted(rows, key=lambda r: r["measured_s"]):
        error = r["predicted_s"] / r["measured_s"] - 1
        probed = f"{r['probed_s'] / r['measured_s'] - 1:+7.1%}" if r["probed_s"] else "-"
        spread = f"{min(r['step_times_s']):.2f}-{max(r['step_times_s']):.2f}"
        predicted = f"{min(r['predictions_s']):.2f}-{max(r['predictions_s']):.2f}"
        mark = " (planner's first)" if r["planner_first"] else ""
        print(f"{r['layout']:50} {r['predicted_s']:8.3f}s {predicted:>11} {r['measured_s']:7.3f}s "
              f"{spread:>11} {error:+7.1%} {probed:>7}{mark}")
    worst = max(abs(r["predicted_s"] / r["measured_s"] - 1) for r in rows)
    print(f"largest error {worst:.1%}; the planner's first choice measured {first['measured_s']:.3f} s, "
          f"the fastest point {fastest['measured_s']:.3f} s ({fastest['layout']}): "
          f"{first['measured_s'] / fastest['measured_s'] - 1:+.1%}")


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        result = check(args, Path(folder))
    result["date"] = time.strftime("%Y-%m-%d %H:%M")
    result["command"] = "python scripts/check_predictions.py " + " ".join(sys.argv[1:] if argv is None else argv)
    summarize(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
