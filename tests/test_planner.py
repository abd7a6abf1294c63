"""The planner: exact ranking, memory rejections in numbers, layouts the trainer accepts, and the
command line."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from model.config import GPTConfig
from planner import cli
from planner.cluster import cluster_from_dict, save_cluster
from planner.estimate import CostModel
from planner.report import explain, format_text, to_json
from planner.search import SearchSpace, candidates, plan
from planner.workload import Workload
from training import compat

CLUSTER = {
    "name": "four-by-four", "devices_per_node": 4, "nodes": 4, "memory_gib": 0.005,
    "peak_tflops": {"float32": 1, "float64": 0.5, "bf16": 4, "fp16": 4}, "memory_bandwidth_gb_s": 20,
    "intra_node": {"bandwidth_gb_s": 5, "latency_us": 20}, "inter_node": {"bandwidth_gb_s": 1, "latency_us": 50},
    "efficiency": {"gemm": 0.8, "memory": 0.8, "network": 0.9},
}
MODEL = GPTConfig(vocab_size=256, n_positions=64, n_embd=64, n_layer=4, n_head=4)
WORKLOAD = Workload(MODEL, seq_len=64, global_batch=16, dtype="float32")


@pytest.fixture(scope="module")
def cost_model():
    return CostModel(cluster_from_dict(CLUSTER))


@pytest.fixture(scope="module")
def result(cost_model):
    return plan(WORKLOAD, cost_model, 8, keep=10)


def test_ranking_equals_brute_force(cost_model, result):
    every = []
    for candidate in candidates(WORKLOAD, 8):
        if cost_model.memory(WORKLOAD, candidate).total <= cost_model.cluster.memory_bytes:
            every.append(cost_model.estimate(WORKLOAD, candidate).step_s)
    every.sort()
    assert [e.step_s for e in result.ranked] == pytest.approx(every[:10], rel=1e-12)


def test_ranked_layouts_fit_and_are_sorted(result):
    times = [e.step_s for e in result.ranked]
    assert times == sorted(times)
    assert all(e.fits for e in result.ranked)


def test_trainer_accepts_every_ranked_layout(result):
    for estimate in result.ranked:
        assert compat.strategy_runs(estimate.candidate.strategy)
        cli.validate_candidate(WORKLOAD, estimate.candidate)


def test_rejections_give_numbers(result):
    assert result.rejected, "with 5 MiB per device some layouts must not fit"
    reason = result.rejected[0].reason()
    assert re.search(r"\d+\.\d MiB > 5\.1 MiB per device on pipeline rank \d", reason), reason
    assert "activations" in reason
    assert "optimizer" in reason


def test_explanation_names_components(result):
    line = explain(result.ranked[0], result.ranked[-1])
    assert "faster" in line
    assert any(name in line for name in ("compute", "communication", "bubble", "optimizer", "reduction"))


def test_report_as_text_and_json(result):
    text = format_text(result, 3, "four-by-four")
    assert "why the first is fastest" in text
    data = json.loads(json.dumps(to_json(result, 3, "four-by-four")))
    assert len(data["ranked"]) == 3
    first = data["ranked"][0]
    assert set(first["components_s"]) >= {"compute", "pipeline_bubble", "dp_comm"}
    assert first["overrides"]["layout.tp"] * first["overrides"]["layout.pp"] * first["overrides"]["layout.dp"] == 8


def test_declared_strategies_only_on_request():
    # Untied embeddings are declared (the model config has no key for them yet).
    untied = dataclasses.replace(WORKLOAD, tied_embeddings=False)
    declared = list(candidates(untied, 4, SearchSpace(include_declared=True)))
    assert declared
    assert not any(compat.strategy_runs(c.strategy) for c in declared)
    assert list(candidates(untied, 4)) == []


def test_default_search_uses_memory_and_precision_strategies():
    runnable = list(candidates(dataclasses.replace(WORKLOAD, dtype="bf16"), 8))
    assert all(compat.strategy_runs(c.strategy) for c in runnable)
    strategies = {c.strategy for c in runnable}
    assert any(s.sequence_parallel for s in strategies)
    assert {s.recompute for s in strategies} == {"none", "selective", "full"}
    assert any(s.zero1 for s in strategies)
    assert {s.dtype for s in strategies} == {"bf16"}


def test_command_line_writes_json(tmp_path, capsys):
    cluster_file = tmp_path / "cluster.yaml"
    save_cluster(cluster_from_dict(CLUSTER), cluster_file)
    out = tmp_path / "plan.json"
    code = cli.main(["--cluster", str(cluster_file), "--model", "tiny", "--devices", "4", "--global-batch", "8",
                     "--json", str(out), "--top", "3"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "the trainer accepts the first layout" in printed
    assert json.loads(out.read_text())["devices"] == 4


@pytest.mark.parametrize("args,message", [
    (["--cluster", "no-such-cluster", "--global-batch", "8"], "not found"),
    (["--cluster", "a100-80gb-selene", "--devices", "100000", "--global-batch", "8"], "must be between 1 and"),
    (["--cluster", "a100-80gb-selene", "--global-batch", "8", "--schedules", "zigzag"], "unknown schedule"),
])
def test_command_line_errors(args, message, capsys):
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
