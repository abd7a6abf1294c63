"""Profile microtron's training step on a sweep's workload with torch.profiler.

    python benchmarks/profile_step.py benchmarks/sweeps/peers.yaml --tp 2 --pp 2 --out runs/profile

Each rank trains the warm-up steps, then profiles `--steps` steps and writes, per rank, the
operator table sorted by self CPU time (`rank<N>.txt`) and a Chrome trace (`rank<N>.json`, which
Perfetto and chrome://tracing open).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Import from the repository root, not from this folder, whose module names are not unique
# (the rank processes inherit this path).
ROOT = Path(__file__).resolve().parent.parent
sys.path = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "benchmarks")]

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from benchmarks.sweep import SweepError, load_sweep  # noqa: E402
from benchmarks.workload import Workload, corpus_tokens  # noqa: E402
from parallel.launch import run_ranks, set_label  # noqa: E402
from parallel.mesh import Mesh  # noqa: E402
from training.trainer import Trainer  # noqa: E402

log = logging.getLogger("microtron.benchmarks")


def profile_job(rank: int, world_size: int, layout: dict, workload_dict: dict, steps: int,
                out: str) -> None:
    workload = Workload.from_dict(workload_dict)
    config = workload.run_config(**layout)
    mesh = Mesh(config.layout.mesh, rank)
    set_label(mesh.describe())
    trainer = Trainer(config, mesh, corpus_tokens(config.data.path))
    for _ in range(workload.warmup_steps):
        trainer.train_step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as profiler:
        for _ in range(steps):
            with record_function("train_step"):
                trainer.train_step()
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    Path(out, f"rank{rank}.txt").write_text(f"{mesh.describe()} {layout}\n{table}\n")
    profiler.export_chrome_trace(str(Path(out, f"rank{rank}.json")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="profile_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="sweep YAML whose (first) workload to train")
    parser.add_argument("--workload", help="workload name (default: the first in the file)")
    parser.add_argument("--out", required=True, help="folder for the tables and traces")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--micro-batches", type=int, help="default: the workload's")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps after the warm-up")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        sweep = load_sweep(args.sweep)
    except (OSError, SweepError) as error:
        log.error("%s", error)
        return 2
    workload = sweep.workloads[args.workload or next(iter(sweep.workloads))]
    layout = {"tp": args.tp, "pp": args.pp, "dp": args.dp, "schedule": args.schedule,
              "micro_batches": args.micro_batches, "threads": args.threads}
    workload.run_config(**layout)  # rejects an invalid layout before any rank starts
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run_ranks(profile_job, args.tp * args.pp * args.dp,
              (layout, workload.to_dict(), args.steps, args.out), threads_per_rank=args.threads)
    log.info("wrote rank<N>.txt and rank<N>.json in %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
