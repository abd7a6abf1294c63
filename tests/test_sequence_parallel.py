"""Sequence parallelism computes what the single-process model computes, with the same
communication volume as plain tensor parallelism in the forward pass."""

from __future__ import annotations

import pytest
import torch

from parallel import comm
from parallel.mesh import Layout
from parallel.weight_grad import deferring_weight_grads, run_deferred
from tests.helpers import assert_matches_reference, make_trainer, run_config, run_job
from training.config import ConfigError


# zb-h1 splits each backward into I and W actions, whose deferred weight gradients need the
# all-gathered sequence.
@pytest.mark.parametrize("tp,schedule", [(2, "zb-h1"), (4, "1f1b")])
def test_sequence_parallel_matches_single_process(tp, schedule):
    assert_matches_reference({"layout.tp": tp, "layout.pp": 2, "layout.micro_batches": 4,
                              "layout.schedule": schedule, "layout.sequence_parallel": True})


def _wire_elements(ledger: comm.Ledger, tp: int) -> float:
    """Elements each rank sends in ring collectives over the tp group: an all-reduce of N sends
    2 (tp - 1) / tp N, an all-gather or reduce-scatter of N sends (tp - 1) / tp N."""
    share = (tp - 1) / tp
    return share * (2 * ledger.total_elements("all_reduce", "tp")
                    + ledger.total_elements("all_gather", "tp")
                    + ledger.total_elements("reduce_scatter", "tp"))


def _communication_job(rank, world_size):
    volumes = {}
    for sequence_parallel in (False, True):
        trainer = make_trainer(rank, {"layout.tp": 2, "layout.sequence_parallel": sequence_parallel})
        with comm.recording(comm.Ledger()) as ledger:
            trainer.evaluate()
        volumes[sequence_parallel] = _wire_elements(ledger, 2)
    return volumes


def test_sequence_parallel_forward_volume_equals_all_reduce():
    volumes = run_job(_communication_job, Layout(tp=2))[0]
    assert volumes[True] == volumes[False]


def _deferred_grads_job(rank, world_size):
    trainer = make_trainer(rank, {"layout.tp": 2, "layout.sequence_parallel": True})
    trainer.compute_gradients()
    direct = {name: p.grad.clone() for name, p in trainer.named_params}

    queue = []
    with deferring_weight_grads(queue):
        trainer.compute_gradients()
    pending = len(queue)
    qkv_before = dict(trainer.named_params)["transformer.h.0.attn.c_attn.weight"].grad.clone()
    run_deferred(queue)
    deferred = {name: p.grad.clone() for name, p in trainer.named_params}
    return {"direct": direct, "deferred": deferred, "pending": pending, "qkv_before": qkv_before}


def test_sequence_parallel_deferred_weight_grads():
    for result in run_job(_deferred_grads_job, Layout(tp=2)):
        assert result["pending"] > 0, "no weight gradient was deferred"
        assert torch.count_nonzero(result["qkv_before"]) == 0, "a deferred gradient ran early"
        for name, grad in result["direct"].items():
            torch.testing.assert_close(result["deferred"][name], grad, rtol=1e-12, atol=1e-14,
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_sequence_parallel_rejects_indivisible_seq_len():
    with pytest.raises(ConfigError, match="seq_len=15 is not divisible by tp=2"):
        run_config({"layout.tp": 2, "layout.sequence_parallel": True, "train.seq_len": 15})
