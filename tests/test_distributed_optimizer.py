"""The distributed optimizer (ZeRO-1) takes the single-process step, keeps 1/dp of the optimizer
state per rank, and saves and loads layout-free state across layouts."""

from __future__ import annotations

import pytest
import torch

from parallel.mesh import Layout
from tests.helpers import assert_params_close, make_trainer, reference, run_job

ZERO = {"train.distributed_optimizer": True}


def _zero_job(rank, world_size, overrides, steps):
    trainer = make_trainer(rank, overrides)
    losses, norms, params = [], [], {}
    for _ in range(steps):
        stats = trainer.train_step()
        losses.append(stats.loss)
        norms.append(stats.grad_norm)
        if trainer.step in (1, 3):
            params[trainer.step] = trainer.gather_model()
    wte = dict(trainer.named_params).get("transformer.wte.weight")
    local_elements = sum(p.numel() for p in trainer.params)
    return {"losses": losses, "norms": norms, "params": params, "pp_rank": trainer.mesh.pp_rank,
            "wte": None if wte is None else wte.detach().clone(),
            "state_bytes": trainer.optimizer.state_bytes(),
            "replicated_state_bytes": 2 * local_elements * 8,  # two float64 moments per element
            "segments": len(trainer.optimizer.segments)}


def test_zero1_tp2_pp2_dp2_matches_single_process():
    overrides = {"layout.tp": 2, "layout.pp": 2, "layout.dp": 2, "layout.micro_batches": 2, **ZERO}
    results = run_job(_zero_job, Layout(tp=2, pp=2, dp=2), overrides, 3)
    expected = reference(overrides)
    for rank, result in enumerate(results):
        assert result["losses"] == pytest.approx(expected["losses"], rel=1e-10), f"rank {rank}"
        assert result["norms"] == pytest.approx(expected["norms"], rel=1e-10), f"rank {rank}"
    for step in (1, 3):
        assert_params_close(results[0]["params"][step], expected["params"][step])

    for rank, result in enumerate(results):
        share = result["replicated_state_bytes"] / 2
        step_counters = 4 * result["segments"]
        assert share <= result["state_bytes"] <= share * 1.01 + step_counters, (
            f"rank {rank}: {result['state_bytes']} bytes of optimizer state, expected about {share}")

    first = [r["wte"] for r in results if r["pp_rank"] == 0]
    last = [r["wte"] for r in results if r["pp_rank"] == 1]
    for a, b in zip(first, last):
        assert torch.equal(a, b), "the two copies of the tied embedding differ"


def _train_and_gather_job(rank, world_size, overrides, steps):
    trainer = make_trainer(rank, overrides)
    for _ in range(steps):
        trainer.train_step()
    return {"model": trainer.gather_model(), "optimizer": trainer.gather_optimizer()}


def _resume_job(rank, world_size, overrides, saved, start_step):
    trainer = make_trainer(rank, overrides)
    trainer.load_model(saved["model"])
    trainer.load_optimizer(saved["optimizer"])
    trainer.step = start_step
    trainer.train_step()
    return trainer.gather_model()


def test_zero1_checkpoints_reshard_across_layouts():
    expected = reference({}, steps=3)["params"][3]
    single = _train_and_gather_job(0, 1, {}, 2)

    # Saved with ZeRO-1 over (tp1, pp2, dp2): the same full state as the single-process model.
    zero_layout = {"layout.pp": 2, "layout.dp": 2, "layout.micro_batches": 2, **ZERO}
    saved = run_job(_train_and_gather_job, Layout(pp=2, dp=2), zero_layout, 2)[0]
    for name, value in single["optimizer"].items():
        torch.testing.assert_close(saved["optimizer"][name], value, rtol=1e-9, atol=1e-15,
                                   msg=lambda m, n=name: f"{n}: {m}")

    # ZeRO-1 state loaded into the single-process model, and single-process state into ZeRO-1
    # over (tp2, pp1, dp2): both continue exactly as the uninterrupted run.
    assert_params_close(_resume_job(0, 1, {}, saved, 2), expected)
    other_layout = {"layout.tp": 2, "layout.dp": 2, **ZERO}
    resumed = run_job(_resume_job, Layout(tp=2, dp=2), other_layout, single, 2)[0]
    assert_params_close(resumed, expected)


def _many_buckets_job(rank, world_size):
    from parallel.distributed_optimizer import DistributedOptimizer
    from parallel.mesh import Mesh

    mesh = Mesh(Layout(dp=world_size), rank)
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (4, 4), (3,), (2, 9)]
    initial = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    grads = [[torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
             for _ in range(world_size)]
    options = {"lr": 0.1, "betas": (0.9, 0.95), "eps": 1e-8}

    sharded = [torch.nn.Parameter(t.clone()) for t in initial]
    # Buckets of about 40 bytes (five float64 elements): several buckets, whose dp chunks cut
    # through parameters.
    optimizer = DistributedOptimizer([{"params": sharded[:3], "weight_decay": 0.1},
                                      {"params": sharded[3:], "weight_decay": 0.0}],
                                     mesh.dp, torch.optim.AdamW, bucket_bytes=40, **options)
    replicated = [torch.nn.Parameter(t.clone()) for t in initial]
    reference_optimizer = torch.optim.AdamW([{"params": replicated[:3], "weight_decay": 0.1},
                                             {"params": replicated[3:], "weight_decay": 0.0}], **options)
    for _ in range(2):
        optimizer.grads.zero()
        for param, grad in zip(sharded, grads[rank]):
            param.grad.add_(grad)
        optimizer.reduce_gradients()
        optimizer.step()
        for param, *per_rank in zip(replicated, *grads):
            param.grad = sum(per_rank) / world_size
        reference_optimizer.step()
    partial = [s for s in optimizer.segments if s.end - s.start < s.param.numel()]
    return {"buckets": len(optimizer.grads.bucket_ranges), "partial_segments": len(partial),
            "sharded": [p.detach().clone() for p in sharded],
            "replicated": [p.detach().clone() for p in replicated]}


def test_zero1_shards_cut_through_parameters():
    for rank, result in enumerate(run_job(_many_buckets_job, Layout(dp=2))):
        assert result["buckets"] > 2, "the test needs several buckets"
        assert result["partial_segments"] > 0, "no shard cuts through a parameter"
        for index, (actual, expected) in enumerate(zip(result["sharded"], result["replicated"])):
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14,
                                       msg=lambda m, i=index: f"rank {rank}, parameter {i}: {m}")
