"""The activation meter measures what model/memory.py predicts for this implementation."""

from __future__ import annotations

import itertools

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
    # AdamW also holds a 4-byte step counter per parameter tensor.
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
