"""The activation meter measures what model/memory.py predicts for this implementation."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel.mesh import Layout
from tests.helpers import make_trainer, run_job
from training.memory_report import ActivationMeter, measure_step

# seq_len 32 so that the s^2 attention terms matter; float32 so that bf16 autocast is allowed.
BASE = {"train.seq_len": 32, "train.dtype": "float32"}
_MODES = list(itertools.product((0.0, 0.1), ("none", "selective", "full"), (None, "bf16")))


@pytest.mark.parametrize("dropout,recompute,precision", _MODES,
                         ids=[f"dropout{d}-{r}-{p or 'fp32'}" for d, r, p in _MODES])
def test_single_process_memory_matches_prediction(dropout, recompute, precision):
    torch.set_num_threads(1)
    trainer = make_trainer(0, {**BASE, "model.dropout": dropout, "train.recompute": recompute,
                               "train.mixed_precision": precision})
    _, report = measure_step(trainer)
    measured, predicted = report.measured, report.predicted
    # The token ids are a view of the loader's (batch, seq_len + 1) window: 8 bytes per sequence
    # more than the prediction counts.
    assert measured.activations == pytest.approx(predicted.activations, rel=1e-3)
    assert measured.parameters == predicted.parameters
    assert measured.gradients == predicted.gradients
    # AdamW also keeps a 4-byte step counter per parameter tensor.
    assert predicted.optimizer <= measured.optimizer <= predicted.optimizer + 4 * len(trainer.params)


def test_recompute_modes_order_activation_bytes():
    torch.set_num_threads(1)
    peaks = {}
    for recompute in ("none", "selective", "full"):
        trainer = make_trainer(0, {**BASE, "model.dropout": 0.1, "train.recompute": recompute})
        _, report = measure_step(trainer)
        peaks[recompute] = report.measured.activations
    assert peaks["none"] > peaks["selective"] > peaks["full"]


def test_meter_counts_shared_storage_once_and_releases():
    x = torch.randn(4, 8, requires_grad=True)
    meter = ActivationMeter()
    with meter:
        e = x.exp()  # saves its output e
        z = (e * e).sum()  # saves e for each operand: one storage, counted once
    assert meter.current == e.numel() * e.element_size()
    z.backward()
    assert meter.current == 0
    assert meter.peak == e.numel() * e.element_size()


def _pipeline_memory_job(rank, world_size, overrides):
    trainer = make_trainer(rank, overrides)
    _, report = measure_step(trainer)
    return report


def test_pipeline_sequence_parallel_memory_matches_prediction():
    overrides = {**BASE, "layout.tp": 2, "layout.pp": 2, "layout.micro_batches": 4,
                 "layout.sequence_parallel": True, "train.recompute": "selective",
                 "model.dropout": 0.1}
    for report in run_job(_pipeline_memory_job, Layout(tp=2, pp=2), overrides):
        assert report.measured.activations == pytest.approx(report.predicted.activations, rel=1e-2), \
            report.label
        assert report.measured.parameters == report.predicted.parameters, report.label


ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ["--set", "model.n_layer=2", "--set", "model.n_embd=32", "--set", "model.n_head=2",
            "--set", "model.n_positions=32", "--global-batch", "8", "--set", "train.eval_interval=0",
            "--set", "train.eval_batches=1", "--set", "run.sample_tokens=0"]


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *TINY_RUN, *args],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)


def test_train_script_memory_options_and_reshard(tmp_path):
    out = tmp_path / "run"
    first = _train("--tp", "2", "--dp", "2", "--sequence-parallel", "--recompute", "selective",
                   "--mixed-precision", "bf16", "--distributed-optimizer", "--memory-report",
                   "--steps", "2", "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert "memory: sequence parallel on, recompute selective, precision bf16, distributed" in first.stderr
    assert "peak activations MiB" in first.stderr
    for label in ("[tp0 pp0 dp0]", "[tp1 pp0 dp0]", "[tp0 pp0 dp1]", "[tp1 pp0 dp1]"):
        assert label in first.stderr, f"the memory report has no row for {label}"

    # The ZeRO-1 checkpoint resumes in another layout, without the distributed optimizer.
    resumed = _train("--pp", "2", "--micro-batches", "2", "--steps", "3", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 2" in resumed.stderr
    assert "step     3/3" in resumed.stderr
