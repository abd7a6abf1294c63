"""Record what each pipeline rank does during one training step of a real run.

`record_run` starts the ranks of a config on this machine, trains `steps` steps, records the last
one with the runtime's recorder, and returns the schedule and each pp rank's records. Scripts
compare the recording with the simulator (see `scripts/show_schedule.py`).
"""

from __future__ import annotations

import torch

from parallel.launch import run_ranks, set_label
from parallel.mesh import Mesh
from parallel.pipeline.actions import Schedule
from parallel.pipeline.runtime import Record
from parallel.pipeline.sources import prepare_schedule
from training.config import RunConfig, load_run_config
from training.data import load_corpus
from training.trainer import Trainer


def record_worker(rank: int, world_size: int, config_dict: dict, steps: int) -> dict | None:
    """Train `steps` steps on one rank and return the last step's records (tp 0, dp 0 ranks)."""
    overrides = {f"{section}.{key}": value for section, values in config_dict.items()
                 for key, value in values.items()}
    config = load_run_config(None, overrides)
    torch.set_num_threads(config.run.threads_per_rank)
    mesh = Mesh(config.layout.mesh, rank)
    set_label(mesh.describe())
    trainer = Trainer(config, mesh, load_corpus(config.data.path).tokens)
    for _ in range(steps - 1):
        trainer.train_step()
    trainer.runtime.record = True
    trainer.train_step()
    if mesh.tp_rank != 0 or mesh.dp_rank != 0:
        return None
    return {"pp_rank": mesh.pp_rank, "trace": trainer.runtime.trace}


def record_run(config: RunConfig, steps: int = 2) -> tuple[Schedule, list[list[Record]]]:
    """Run the config's layout locally on gloo; return its schedule and each pp rank's records."""
    lay = config.layout
    results = run_ranks(record_worker, lay.mesh.world_size, (config.to_dict(), steps),
                        timeout_s=config.run.timeout_s, threads_per_rank=config.run.threads_per_rank)
    records: list[list[Record]] = [[] for _ in range(lay.pp)]
    for result in results:
        if result is not None:
            records[result["pp_rank"]] = result["trace"]
    schedule = prepare_schedule(lay.schedule, lay.pp, lay.micro_batches, lay.virtual_stages,
                                lay.max_stash)
    return schedule, records
