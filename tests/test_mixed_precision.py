"""Mixed precision: bf16/fp16 compute under autocast with fp32 master weights and gradients."""

from __future__ import annotations

import pytest
import torch

from parallel.layers import linear
from parallel.mesh import Layout
from tests.helpers import make_trainer, run_config, run_job, train_job
from training.config import ConfigError
from training.precision import DynamicLossScaler
from training.resume import resume, save_checkpoint

FP32 = {"train.dtype": "float32"}
BF16 = {**FP32, "train.mixed_precision": "bf16"}


def test_linear_under_autocast_keeps_master_dtypes():
    x = torch.randn(3, 8, requires_grad=True)
    weight = torch.randn(4, 8, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, weight, bias)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == bias.grad.dtype == torch.float32
    torch.testing.assert_close(weight.grad, torch.ones(3, 4).t() @ x.detach(), rtol=1e-2, atol=1e-2)


def test_bf16_step_close_to_fp32():
    torch.set_num_threads(1)
    fp32 = make_trainer(0, FP32)
    bf16 = make_trainer(0, BF16)
    for _ in range(3):
        expected, actual = fp32.train_step(), bf16.train_step()
        assert actual.loss == pytest.approx(expected.loss, rel=2e-2)
        assert actual.loss != expected.loss, "bf16 autocast did not change the arithmetic"
    assert all(p.dtype == torch.float32 for p in bf16.params)
    assert all(b.dtype == torch.float32 for b in bf16.grads.buffers)


def test_bf16_sequence_parallel_close_to_single_process():
    overrides = {**BF16, "layout.tp": 2, "layout.pp": 2, "layout.micro_batches": 2,
                 "layout.sequence_parallel": True}
    results = run_job(train_job, Layout(tp=2, pp=2), overrides, 3)
    torch.set_num_threads(1)
    single = train_job(0, 1, BF16, 3)
    for rank, result in enumerate(results):
        assert result["losses"] == pytest.approx(single["losses"], rel=5e-3), f"rank {rank}"


def test_fp16_overflow_skips_step_and_lowers_scale():
    torch.set_num_threads(1)
    trainer = make_trainer(0, {**FP32, "train.mixed_precision": "fp16"})
    before = {name: p.detach().clone() for name, p in trainer.named_params}
    trainer.loss_scaler.scale = 2.0**100  # the scaled fp16 gradients overflow
    stats = trainer.train_step()
    assert stats.skipped
    assert trainer.loss_scaler.scale == 2.0**99
    for name, param in trainer.named_params:
        assert torch.equal(param, before[name]), f"{name} changed in a skipped step"

    trainer.loss_scaler.scale = 2.0**10
    stats = trainer.train_step()
    assert not stats.skipped
    assert 0 < stats.loss < 10
    assert not torch.equal(dict(trainer.named_params)["transformer.wte.weight"],
                           before["transformer.wte.weight"])


def test_fp16_resume_restores_loss_scale(tmp_path):
    torch.set_num_threads(1)
    overrides = {**FP32, "train.mixed_precision": "fp16"}
    trainer = make_trainer(0, overrides)
    trainer.loss_scaler.scale = 2.0**10
    trainer.train_step()
    trainer.train_step()
    saved = trainer.loss_scaler.state_dict()
    path = save_checkpoint(trainer, trainer.config, tmp_path)

    resumed = make_trainer(0, overrides)
    assert resumed.loss_scaler.scale != saved["scale"]
    resume(resumed, resumed.config, path)
    assert resumed.loss_scaler.state_dict() == saved
    assert resumed.train_step().loss == trainer.train_step().loss


def test_loss_scaler_grows_after_interval():
    scaler = DynamicLossScaler(initial_scale=8.0, growth_interval=2)
    assert scaler.update(1.0)
    assert scaler.scale == 8.0
    assert scaler.update(1.0)
    assert scaler.scale == 16.0, "the scale doubles after growth_interval good steps"
    assert not scaler.update(float("inf"))
    assert scaler.scale == 8.0
    assert not scaler.update(float("nan"))
    assert scaler.scale == 4.0


def test_mixed_precision_config_errors():
    with pytest.raises(ConfigError, match="needs float32 master weights"):
        run_config({"train.mixed_precision": "bf16"})  # the test defaults use float64
    with pytest.raises(ConfigError, match="must be null, bf16 or fp16"):
        run_config({**FP32, "train.mixed_precision": "fp8"})
