"""The benchmark runner: sweep files, the PyTorch peers' losses, and the files it writes.

The end-to-end test runs a sweep of the tiny model through `benchmarks/run.py`, so every peer
must reproduce microtron's losses for its row to be reported. It asserts nothing about time.
"""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from benchmarks import report, run
from benchmarks.results import loss_mismatch
from benchmarks.sweep import SweepError, load_sweep

TINY_WORKLOAD = {
    "model": {"vocab_size": 256, "n_positions": 32, "n_embd": 32, "n_layer": 4, "n_head": 4},
    "global_batch": 8, "micro_batches": 4, "seq_len": 32,
}


def _write_sweep(tmp_path, points, **extra):
    path = tmp_path / "sweep.yaml"
    values = {"warmup_steps": 1, "timed_steps": 2, "workloads": {"tiny": TINY_WORKLOAD},
              "points": points, **extra}
    path.write_text(yaml.safe_dump(values))
    return path


def test_sweep_expands_lists(tmp_path):
    path = _write_sweep(tmp_path, [
        {"impl": "microtron", "pp": 2, "schedule": ["1f1b", "gpipe"], "threads": [1, 2]},
        {"impl": "microtron", "pp": 2, "layers_per_stage": [3, 1]},
        {"impl": "microtron", "pp": 2, "layers_per_stage": [[3, 1], [1, 3]]},
    ])
    points = load_sweep(path).points
    assert len(points) == 4 + 1 + 2
    assert [p.schedule for p in points[:4]] == ["1f1b", "1f1b", "gpipe", "gpipe"]
    assert [p.threads for p in points[:4]] == [1, 2, 1, 2]
    assert points[4].layers_per_stage == (3, 1)
    assert [p.layers_per_stage for p in points[5:]] == [(3, 1), (1, 3)]
    assert points[0].label == "microtron pp2 1f1b, 1 thread per rank"


@pytest.mark.parametrize("point,message", [
    ({"impl": "megatron"}, "impl='megatron' is unknown"),
    ({"impl": "microtron", "tp": 3}, "n_head=4 is not divisible by tp=3"),
    ({"impl": "torch-pipelining", "pp": 2, "schedule": "zb-h9"}, "schedule='zb-h9' is not one of"),
    ({"impl": "torch", "pp": 2}, "pp=2 is not supported by torch"),
    ({"impl": "microtron", "colour": "red"}, "unknown key(s) ['colour']"),
], ids=["impl", "layout", "peer-schedule", "peer-axis", "key"])
def test_sweep_rejects_invalid_points(tmp_path, point, message):
    with pytest.raises(SweepError) as error:
        load_sweep(_write_sweep(tmp_path, [point]))
    assert message in str(error.value)


def test_loss_mismatch_names_the_step():
    assert loss_mismatch([2.0, 1.5], [2.0, 1.5], 2) is None
    assert loss_mismatch([2.0, 1.5], [2.0, 1.5 * (1 + 1e-6)], 2) is None
    assert loss_mismatch([2.0, 1.5], [2.0, 1.5, 1.4], 2) is None
    message = loss_mismatch([2.0, 1.6], [2.0, 1.5], 2)
    assert message is not None
    assert message.startswith("step 1:")
    assert loss_mismatch([2.0], [2.0, 1.5], 2) == "1 losses against 2 of microtron; 2 needed"


def test_runner_checks_peers_and_writes_reports(tmp_path):
    sweep = _write_sweep(tmp_path, [
        {"impl": "torch", "threads": 1},
        {"impl": "torch-pipelining", "pp": 2, "schedule": ["1f1b", "interleaved-1f1b"]},
        {"impl": "torch-tp", "tp": 2},
        {"impl": "microtron", "tp": 2},
    ])
    out = tmp_path / "out"
    assert run.main([str(sweep), "--out", str(out), "--rounds", "2", "--timeout-s", "60"]) == 0

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    for row in rows:
        assert row["status"] == "ok", row["label"]
        assert float(row["step_s"]) > 0, row["label"]
        assert float(row["mfu"]) > 0, row["label"]
        assert len(row["peak_memory_mib"].split()) == int(row["ranks"]), row["label"]
        assert len(row["step_s_rounds"].split()) == 2, row["label"]
    microtron_tp = next(r for r in rows if r["label"].startswith("microtron tp2"))
    assert len(microtron_tp["comm_share"].split()) == 2
    assert float(microtron_tp["comm_mib_per_step"].split()[0]) > 0

    results = json.loads((out / "results.json").read_text())
    assert {t["target"] for t in results["targets"]} >= {"tp=2", "pp=2 1F1B, same split"}
    text = (out / "results.md").read_text()
    assert "## tiny" in text
    assert "## Targets" in text
    assert "python benchmarks/run.py" in text


def test_report_without_plots_says_so():
    text = report.markdown([], {"command": "x"}, [])
    assert "No plots: matplotlib is not installed" in text
