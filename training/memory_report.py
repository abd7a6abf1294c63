"""Measure one rank's memory during a training step, next to the analytic prediction.

Four quantities per rank: parameter bytes (the storages of the parameters), gradient bytes (the
flat gradient buffers), optimizer-state bytes (AdamW's moments and step counts) and the peak of
activation bytes during the step. `model.memory` predicts each of them.

Activations are measured with torch.autograd.graph.saved_tensors_hooks, so the measurement works
on every device. Each tensor that autograd saves for backward is counted by its storage from the
moment it is saved until autograd releases it, and the peak of the running total is kept. A
storage that several saved tensors share counts once, and parameters are not counted. This is
what the activation formulas count. It leaves out tensors that live only between two ops (a
matmul output that the next op consumes), gradients in flight, and the tensors that pipeline
stages send and receive.

NOTE: with schedules that split the backward (I and W actions), the inputs and output gradients
that queued weight-gradient work keeps from I until W are neither measured nor predicted here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.memory import (
    ActivationSetting,
    optimizer_state_bytes,
    peak_activation_bytes,
    rank_parameter_count,
    stage_activation_bytes,
)


class ActivationMeter:
    """A counter of the bytes of saved tensors alive at each moment inside the block, and of
    their peak.

    Storages of `exclude` (the parameters) are not counted.
    """

    def __init__(self, exclude=()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._live: dict[int, list[int]] = {}  # storage address -> [saved tensors alive, bytes]
        self.current = 0
        self.peak = 0
        self._hooks = None

    def __enter__(self) -> "ActivationMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address in self._excluded or storage.nbytes() == 0:
            return tensor
        return _CountedTensor(self, tensor, address, storage.nbytes())

    def _acquire(self, address: int, nbytes: int) -> None:
        entry = self._live.setdefault(address, [0, nbytes])
        if entry[0] == 0:
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[0] += 1

    def _release(self, address: int) -> None:
        entry = self._live[address]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._live[address]


class _CountedTensor:
    """A saved tensor that the meter counts until autograd drops it."""

    def __init__(self, meter: ActivationMeter, tensor: torch.Tensor, address: int, nbytes: int):
        self.meter, self.tensor, self.address = meter, tensor, address
        meter._acquire(address, nbytes)

    def __del__(self):
        self.meter._release(self.address)


def _unpack(packed):
    return packed.tensor if isinstance(packed, _CountedTensor) else packed


@dataclass(frozen=True)
class MemoryBytes:
    parameters: float
    gradients: float
    optimizer: float
    activations: float  # peak during the step


@dataclass(frozen=True)
class MemoryReport:
    rank: int
    label: str  # mesh coordinates, such as [tp0 pp1 dp0]
    measured: MemoryBytes
    predicted: MemoryBytes


def measure_step(trainer):
    """Run one training step while measuring; return (StepStats, MemoryReport) of this rank."""
    meter = ActivationMeter(exclude=trainer.params)
    with meter:
        stats = trainer.train_step()
    parameter_storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in trainer.params}
    measured = MemoryBytes(
        parameters=sum(parameter_storages.values()),
        gradients=sum(b.numel() * b.element_size() for b in trainer.grads.buffers),
        optimizer=_optimizer_bytes(trainer.optimizer),
        activations=meter.peak,
    )
    report = MemoryReport(trainer.mesh.rank, trainer.mesh.describe(), measured, predict(trainer))
    return stats, report


def _optimizer_bytes(optimizer) -> int:
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    return sum(value.numel() * value.element_size()
               for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value))


def predict(trainer) -> MemoryBytes:
    """Return the analytic memory of the trainer's rank (see model.memory)."""
    config, mesh = trainer.config, trainer.mesh
    param_bytes = torch.empty((), dtype=trainer.dtype).element_size()
    count = rank_parameter_count(config.model, mesh.tp.size, trainer.layer_ranges, trainer.stages)
    setting = ActivationSetting(
        micro_batch=trainer.micro_batch,
        seq_len=config.seq_len,
        tp=mesh.tp.size,
        sequence_parallel=config.layout.sequence_parallel,
        recompute=config.train.recompute,
        recompute_layers=config.train.recompute_layers,
        param_bytes=param_bytes,
        compute_bytes=2 if trainer.autocast_dtype is not None else None,
        dropout=config.model.dropout > 0,
    )
    last = trainer.schedule.num_stages - 1
    stage_bytes = {
        stage: stage_activation_bytes(config.model, setting, len(trainer.layer_ranges[stage]),
                                      first=stage == 0, last=stage == last)
        for stage in trainer.stages
    }
    actions = [a for a in trainer.schedule.actions[mesh.pp_rank] if a.is_compute]
    return MemoryBytes(
        parameters=count * param_bytes,
        gradients=count * param_bytes,
        optimizer=optimizer_state_bytes(count, param_bytes, mesh.dp.size,
                                        config.train.distributed_optimizer),
        activations=peak_activation_bytes(stage_bytes, actions),
    )


def format_reports(reports: list[MemoryReport]) -> str:
    """Return a table of every rank's measured and predicted bytes, in MiB."""
    fields = ("parameters", "gradients", "optimizer", "activations")
    names = ("parameters MiB", "gradients MiB", "optimizer MiB", "peak activations MiB")
    lines = [
        f"{'rank':>4}  {'coordinates':<14}" + "".join(f"  {name:^19}" for name in names),
        " " * 20 + f"  {'measured':>9} {'predicted':>9}" * len(fields),
    ]
    for report in reports:
        cells = "".join(f"  {getattr(report.measured, f) / 2**20:>9.3f} {getattr(report.predicted, f) / 2**20:>9.3f}"
                        for f in fields)
        lines.append(f"{report.rank:>4}  {report.label:<14}{cells}")
    return "\n".join(lines)


def gather_reports(report: MemoryReport, world_size: int) -> list[MemoryReport] | None:
    """Return every rank's report on global rank 0 (None elsewhere). Collective over all ranks."""
    if world_size == 1:
        return [report]
    reports = [None] * world_size if report.rank == 0 else None
    dist.gather_object(report, reports, dst=0)
    return reports
