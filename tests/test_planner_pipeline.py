"""The planner's compiled pipeline evaluation equals the schedule simulator exactly, and its
lower bounds never exceed what they bound."""

from __future__ import annotations

import random

import pytest

from model.config import GPTConfig
from parallel.pipeline.schedules import SCHEDULES, VIRTUAL_STAGES, build_schedule
from parallel.pipeline.simulate import Costs, simulate
from planner.cluster import cluster_from_dict
from planner.estimate import CostModel
from planner.pipeline import compile_schedule, memory_events, peak_memory, pipeline_times, shared_core_times
from planner.search import SearchSpace, candidates
from planner.workload import MEGATRON, MICROTRON, Workload


def _random_cases(seed: int, count: int):
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        name = rng.choice(list(SCHEDULES))
        p = rng.choice([1, 2, 3, 4, 5, 8])
        v = VIRTUAL_STAGES[name] or rng.choice([2, 3])
        m = rng.choice([1, 2, p, 2 * p - 1, 2 * p + 1, 3 * p, 5])
        if name == "dualpipev" and m < 2 * p - 1:
            continue
        n = p * v
        costs = ([rng.uniform(0.5, 2) for _ in range(n)], [rng.uniform(0.5, 2.5) for _ in range(n)],
                 [rng.uniform(0.1, 1.5) for _ in range(n)], rng.choice([0.0, rng.uniform(0, 0.7)]))
        memory = ([rng.uniform(1, 5) for _ in range(n)], [rng.uniform(0, 3) for _ in range(n)])
        cases.append((name, p, v, m, costs, memory))
    return cases


@pytest.mark.parametrize("case", _random_cases(0, 120), ids=lambda c: f"{c[0]}-p{c[1]}-v{c[2]}-m{c[3]}")
def test_compiled_evaluation_equals_simulator(case):
    name, p, v, m, (forward, backward_input, backward_weight, transfer), (activation, weight) = case
    expected = simulate(build_schedule(name, p, m, v),
                        Costs(forward, backward_input, backward_weight, transfer, activation, weight))
    times = pipeline_times(compile_schedule(name, p, m, v), forward, backward_input, backward_weight, transfer)
    assert times.makespan == pytest.approx(expected.makespan, abs=1e-9)
    assert times.busy == pytest.approx(expected.busy, abs=1e-9)
    assert times.first_start == pytest.approx(expected.first_start, abs=1e-9)
    assert times.last_end == pytest.approx(expected.last_end, abs=1e-9)
    peaks = peak_memory(memory_events(name, p, m, v), activation, weight)
    assert peaks == pytest.approx(expected.peak_bytes, abs=1e-9)


_CLUSTER = cluster_from_dict({
    "name": "test", "devices_per_node": 4, "nodes": 4, "memory_gib": 16,
    "peak_tflops": {"float32": 10, "bf16": 100, "float64": 5, "fp16": 100}, "memory_bandwidth_gb_s": 500,
    "intra_node": {"bandwidth_gb_s": 100, "latency_us": 5}, "inter_node": {"bandwidth_gb_s": 10, "latency_us": 10},
    "efficiency": {"gemm": 0.7, "memory": 0.8, "network": 0.9},
})


@pytest.mark.parametrize("implementation", [MICROTRON, MEGATRON], ids=lambda i: i.name)
def test_lower_bounds_hold(implementation):
    model = CostModel(_CLUSTER, implementation)
    workload = Workload(GPTConfig(vocab_size=1000, n_positions=256, n_embd=256, n_layer=8, n_head=8,
                                  dropout=0.1), seq_len=256, global_batch=32, dtype="bf16")
    rng = random.Random(1)
    pool = list(candidates(workload, 16, SearchSpace(include_declared=True)))
    for candidate in rng.sample(pool, 150):
        estimate = model.estimate(workload, candidate)
        assert model.lower_bound(workload, candidate) <= estimate.step_s * (1 + 1e-12), candidate.describe()
        assert model.memory_lower_bound(workload, candidate).total <= estimate.memory.total * (1 + 1e-12)
        assert sum(estimate.components.values()) == pytest.approx(estimate.step_s)
        assert min(estimate.components.values()) >= -1e-12, candidate.describe()


def test_shared_cores_change_nothing_at_equal_speed():
    compiled = compile_schedule("1f1b", 3, 5, 1)
    times = pipeline_times(compiled, [1.0, 1.5, 1.0], [1.0, 1.0, 2.0], [0.5, 0.5, 0.5], 0.2)
    same = shared_core_times(compiled, times, [1.0, 1.0, 1.0, 1.0])
    assert same.makespan == pytest.approx(times.makespan)
    assert same.busy == pytest.approx(times.busy)


def test_shared_cores_speed_up_lone_work():
    # GPipe on 2 ranks, 1 micro-batch: the ranks never compute at once, so at slowdown 0.5 for
    # one computing rank every action takes half as long, and the transfers stay as they are.
    compiled = compile_schedule("gpipe", 2, 1, 1)
    times = pipeline_times(compiled, [1.0, 1.0], [2.0, 2.0], [0.0, 0.0], 0.25)
    assert times.makespan == pytest.approx(6.5)
    faster = shared_core_times(compiled, times, [1.0, 0.5, 1.0])
    assert faster.makespan == pytest.approx(3.5)
    assert faster.busy == pytest.approx([1.5, 1.5])
