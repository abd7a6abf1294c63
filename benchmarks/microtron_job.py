"""One benchmark point of microtron: train the workload in a layout on local gloo ranks.

Each rank trains `workload.total_steps` steps. The timed steps run inside a communication
ledger, which counts the ops and times how long the rank is blocked in them. When there is a
pipeline and its runtime can record action times (a `record` attribute), one more step runs
with recording on, for the measured bubble. That step is not timed.
"""

from __future__ import annotations

import torch

from benchmarks.workload import Workload, corpus_tokens, peak_memory_mib, reset_peak_memory, run_steps
from parallel import comm
from parallel.launch import set_label
from parallel.mesh import Mesh
from training.trainer import Trainer

P2P_OPS = ("send", "recv")


def microtron_job(rank: int, world_size: int, point: dict, workload_dict: dict) -> dict:
    """Return this rank's step times, losses, peak memory, ledger totals and action records."""
    workload = Workload.from_dict(workload_dict)
    config = workload.run_config(
        tp=point.get("tp", 1), pp=point.get("pp", 1), dp=point.get("dp", 1),
        schedule=point.get("schedule", "1f1b"), micro_batches=point.get("micro_batches"),
        virtual_stages=point.get("virtual_stages", 1),
        layers_per_stage=point.get("layers_per_stage"), threads=point.get("threads", 1),
        zero1=point.get("zero1", False))
    mesh = Mesh(config.layout.mesh, rank)
    set_label(mesh.describe())
    trainer = Trainer(config, mesh, corpus_tokens(config.data.path))
    device = torch.device("cpu")

    losses = []
    ledger = comm.Ledger()
    timed_from = workload.warmup_steps

    def step(index: int) -> None:
        if index < timed_from:
            losses.append(trainer.train_step().loss)
            return
        with comm.recording(ledger):
            losses.append(trainer.train_step().loss)

    reset_peak_memory(device)
    seconds, cpu_seconds = run_steps(step, workload)
    memory = peak_memory_mib(device)
    records = _record_last_step(trainer, losses)

    timed = len(seconds) - workload.warmup_steps
    collective = sum(t for (op, _), t in ledger.seconds.items() if op not in P2P_OPS)
    return {
        "coordinates": (mesh.tp_rank, mesh.pp_rank, mesh.dp_rank),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "losses": losses,
        "peak_memory_mib": memory,
        "collective_seconds": collective / timed,
        "p2p_seconds": ledger.total_seconds("send") / timed + ledger.total_seconds("recv") / timed,
        "comm_bytes": sum(ledger.bytes.values()) / timed,
        "ledger": ledger.rows(),
        "records": records,
        "schedule": trainer.schedule if records is not None else None,
    }


def _record_last_step(trainer: Trainer, losses: list[float]):
    """Run one more step with action recording on; return its records. Return None without
    that step when there is no pipeline or the runtime cannot record, and None after it on
    ranks other than tp 0, dp 0 (which record for their pipeline)."""
    runtime = trainer.runtime
    if trainer.config.layout.pp == 1 or not hasattr(runtime, "record"):
        return None
    runtime.record = True
    losses.append(trainer.train_step().loss)
    runtime.record = False
    if trainer.mesh.tp_rank != 0 or trainer.mesh.dp_rank != 0:
        return None
    return list(runtime.trace)
