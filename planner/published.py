"""Published Megatron-LM runs as planner workloads and layouts, and the fit of a cluster's
efficiencies to them.

The rows come from `tests/data/published_runs.yaml` (Narayanan et al. 2021, Table 1; Korthikanti
et al. 2022, Table 5). Some settings are not printed: the micro-batch size and interleaving
degree of the 2021 table, and the interleaving of the 1T run of 2022. There a row stands for
every value that Megatron-LM allows, and the layout that the cost model predicts fastest is
taken, because the authors tuned these settings.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import yaml

from model.config import GPTConfig
from planner.cluster import Cluster, Efficiency
from planner.estimate import CostModel, Estimate
from planner.workload import MEGATRON, Candidate, Workload
from training.compat import Strategy

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "published_runs.yaml"
SEQ_LEN, VOCAB = 2048, 51200
MICRO_BATCH_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class PublishedRun:
    """One published measurement: the workload, the layouts it may have used, and the number.

    `tflops_per_gpu` (eq. 3 FLOPs of Narayanan et al. 2021) or `step_s` is given.
    """

    name: str
    workload: Workload
    layouts: tuple[Candidate, ...]
    tflops_per_gpu: float | None = None
    step_s: float | None = None

    def predicted(self, estimate: Estimate) -> float:
        """Return the prediction in the unit of the published number."""
        if self.tflops_per_gpu is not None:
            return estimate.flops_per_device(self.workload.megatron_flops()) / 1e12
        return estimate.step_s

    @property
    def published(self) -> float:
        return self.tflops_per_gpu if self.tflops_per_gpu is not None else self.step_s

    def relative_error(self, estimate: Estimate) -> float:
        return self.predicted(estimate) / self.published - 1


def load_runs(path: Path = DATA) -> list[PublishedRun]:
    with open(path) as f:
        data = yaml.safe_load(f)
    runs = [_megatron_2021(row) for row in data["megatron_2021_table1"]["rows"]]
    for row in data["korthikanti_2022_table5"]["rows"]:
        runs += _korthikanti_2022(row)
    return runs


def _model(heads: int, hidden: int, layers: int) -> GPTConfig:
    # Dropout 0.1, as in the papers' runs; it keeps the attention scores in memory.
    return GPTConfig(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=hidden, n_layer=layers, n_head=heads,
                     dropout=0.1)


def _megatron_2021(row) -> PublishedRun:
    params, heads, hidden, layers, tp, pp, gpus, batch, tflops = row
    workload = Workload(_model(heads, hidden, layers), SEQ_LEN, batch, "fp16")
    dp = gpus // (tp * pp)
    layouts = []
    for b in MICRO_BATCH_SIZES:
        if (batch // dp) % b:
            continue
        m = batch // dp // b
        # Every row used the interleaved schedule, which Megatron-LM runs with m a multiple of pp.
        options = [1] if pp == 1 else [v for v in range(2, layers // pp + 1)
                                       if (layers // pp) % v == 0 and m % pp == 0]
        for v in options:
            schedule = "1f1b" if v == 1 else "interleaved-1f1b"
            layouts.append(Candidate(tp, pp, dp, b, m, Strategy(schedule=schedule, virtual_stages=v,
                                                                 recompute="full", dtype="fp16")))
    return PublishedRun(f"{params}B", workload, tuple(layouts), tflops_per_gpu=float(tflops))


def _korthikanti_2022(row) -> list[PublishedRun]:
    name, heads, hidden, layers, tp, pp, gpus, batch, b, v, full_s, selective_s = row
    workload = Workload(_model(heads, hidden, layers), SEQ_LEN, batch, "fp16")
    options = [v] if v is not None else [u for u in range(1, layers // pp + 1) if (layers // pp) % u == 0]
    runs = []
    for recompute, sequence_parallel, seconds in (("full", False, full_s), ("selective", True, selective_s)):
        layouts = tuple(
            Candidate(tp, pp, 1, b, batch // b, Strategy(
                schedule="1f1b" if u == 1 else "interleaved-1f1b", virtual_stages=u,
                sequence_parallel=sequence_parallel, recompute=recompute, dtype="fp16"))
            for u in options)
        runs.append(PublishedRun(f"{name} {recompute}", workload, layouts, step_s=float(seconds)))
    return runs


def best_estimate(model: CostModel, run: PublishedRun) -> Estimate:
    """Return the estimate of the run's layout that the model predicts fastest."""
    return min((model.estimate(run.workload, c) for c in run.layouts), key=lambda e: e.step_s)


# ----------------------------------------------------------------------------------------------
# Fitting


def fit_efficiency(cluster: Cluster, runs: list[PublishedRun], start: Efficiency = Efficiency(0.7, 0.7, 0.8),
                   step: float = 0.08, rounds: int = 4) -> Efficiency:
    """Return the efficiencies that minimize the largest relative error of the Megatron-LM cost
    model on `runs`.

    The search evaluates a 3 x 3 x 3 grid around `start`, then repeats around the best point
    with half the step, `rounds` times. Every value stays in (0, 1].
    """
    def worst(efficiency: Efficiency) -> float:
        model = CostModel(dataclasses.replace(cluster, efficiency=efficiency), MEGATRON)
        return max(abs(run.relative_error(best_estimate(model, run))) for run in runs)

    best, best_error = start, worst(start)
    for _ in range(rounds):
        centre = best
        for gemm, memory, network in itertools.product(*(
                [min(1.0, max(0.05, value + d * step)) for d in (-1, 0, 1)]
                for value in (centre.gemm, centre.memory, centre.network))):
            efficiency = Efficiency(round(gemm, 4), round(memory, 4), round(network, 4))
            error = worst(efficiency)
            if error < best_error:
                best, best_error = efficiency, error
        step /= 2
    return best
