"""Every layout computes what the single-process model computes.

Each case trains the tiny model in float64 on real gloo ranks and compares the loss and the full
updated parameters after one and after three optimizer steps with the single-process run of the
same global batches.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from parallel.mesh import Layout
from tests.helpers import (assert_matches_reference, assert_params_close, make_trainer, reference,
                           run_job, train_job)


def _layout_overrides(tp=1, pp=1, dp=1, schedule="1f1b", micro_batches=None, **extra):
    overrides = {"layout.tp": tp, "layout.pp": pp, "layout.dp": dp, "layout.schedule": schedule,
                 "layout.micro_batches": micro_batches or max(1, 2 * pp // dp)}
    overrides.update(extra)
    return overrides


_MATRIX = [
    (tp, pp, dp, schedule)
    for tp, pp, dp in itertools.product((1, 2), (1, 2), (1, 2))
    for schedule in ("1f1b", "gpipe")
    if not (pp == 1 and schedule == "gpipe")  # with one stage both schedules are the same list
] + [(4, 1, 1, "1f1b"), (1, 4, 1, "1f1b"), (1, 4, 1, "gpipe")]


@pytest.mark.parametrize("tp,pp,dp,schedule", _MATRIX,
                         ids=[f"tp{t}-pp{p}-dp{d}-{s}" for t, p, d, s in _MATRIX])
def test_layout_matches_single_process(tp, pp, dp, schedule):
    assert_matches_reference(_layout_overrides(tp, pp, dp, schedule))


@pytest.mark.parametrize("micro_batches", [1, 2, 4, 8], ids=lambda m: f"m{m}")
def test_micro_batch_counts_around_pp(micro_batches):
    # pp=4: fewer micro-batches than stages, one, equal, and more.
    assert_matches_reference(_layout_overrides(pp=4, micro_batches=micro_batches), steps=1)


def test_uneven_layers_per_stage():
    overrides = _layout_overrides(pp=2, micro_batches=3, **{"model.n_layer": 5,
                                                            "train.global_batch": 6})
    assert_matches_reference(overrides, steps=1)
    explicit = _layout_overrides(pp=2, micro_batches=2, **{"layout.layers_per_stage": [1, 3]})
    assert_matches_reference(explicit, steps=1)


def _tied_copies_job(rank, world_size, overrides, steps):
    trainer = make_trainer(rank, overrides)
    copies = []
    for _ in range(steps):
        trainer.train_step()
        wte = dict(trainer.named_params).get("transformer.wte.weight")
        copies.append(None if wte is None else wte.detach().clone())
    return {"pp_rank": trainer.mesh.pp_rank, "copies": copies}


@pytest.mark.parametrize("pp", [2, 3])
def test_tied_embedding_copies_stay_bitwise_equal(pp):
    overrides = _layout_overrides(pp=pp, micro_batches=pp, **{"model.n_layer": 3,
                                                              "train.global_batch": 6})
    results = run_job(_tied_copies_job, Layout(pp=pp), overrides, 3)
    first = next(r for r in results if r["pp_rank"] == 0)
    last = next(r for r in results if r["pp_rank"] == pp - 1)
    for step, (a, b) in enumerate(zip(first["copies"], last["copies"])):
        assert torch.equal(a, b), f"the two embedding copies differ after step {step + 1}"
    if pp == 3:
        middle = next(r for r in results if r["pp_rank"] == 1)
        assert middle["copies"][0] is None, "a middle stage must not hold the embedding"
    assert_matches_reference(overrides, steps=3)


def test_grad_norm_matches_single_process():
    overrides = _layout_overrides(tp=2, pp=2)
    results = run_job(train_job, Layout(tp=2, pp=2), overrides, 3)
    expected = reference(overrides)
    for rank, result in enumerate(results):
        assert result["norms"] == pytest.approx(expected["norms"], rel=1e-10), f"rank {rank}"


def _replica_job(rank, world_size, overrides):
    trainer = make_trainer(rank, overrides)
    trainer.train_step()
    local_inputs = torch.cat(trainer._inputs)
    return {"dp_rank": trainer.mesh.dp_rank, "inputs": local_inputs,
            "params": {n: p.detach().clone() for n, p in trainer.named_params}}


def test_dp_replicas_identical_with_different_data():
    results = run_job(_replica_job, Layout(dp=2), _layout_overrides(dp=2, micro_batches=2))
    a, b = results
    assert not torch.equal(a["inputs"], b["inputs"]), "dp replicas must see different sequences"
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), f"{name} differs between replicas"


def _eval_between_steps_job(rank, world_size, overrides, evaluate: bool):
    trainer = make_trainer(rank, overrides)
    losses, val = [], []
    for _ in range(3):
        losses.append(trainer.train_step().loss)
        if evaluate:
            val.append(trainer.evaluate())
    return {"losses": losses, "val": val, "params": trainer.gather_model()}


def test_evaluation_changes_nothing_about_training():
    overrides = _layout_overrides(tp=2, pp=2, **{"model.dropout": 0.1})
    with_eval = run_job(_eval_between_steps_job, Layout(tp=2, pp=2), overrides, True)[0]
    without = run_job(_eval_between_steps_job, Layout(tp=2, pp=2), overrides, False)[0]
    assert with_eval["losses"] == without["losses"]
    assert len(with_eval["val"]) == 3 and all(v > 0 for v in with_eval["val"])
    for name in without["params"]:
        assert torch.equal(with_eval["params"][name], without["params"][name]), name


def _overlap_job(rank, world_size, overrides, steps):
    trainer = make_trainer(rank, overrides)
    losses = [trainer.train_step().loss for _ in range(steps)]
    return {"losses": losses, "params": trainer.gather_model(),
            "started_in_backward": trainer.grads.buckets_started_in_backward,
            "buckets": len(trainer.grads.buckets)}


_OVERLAP_CASES = [(1, 1, "1f1b"), (1, 2, "1f1b"), (2, 2, "zb-h1"), (1, 2, "zb-v")]


@pytest.mark.parametrize("tp,pp,schedule", _OVERLAP_CASES,
                         ids=[f"tp{t}-pp{p}-{s}" for t, p, s in _OVERLAP_CASES])
def test_dp_reduction_overlapped_with_backward(tp, pp, schedule):
    # Buckets of a few KiB, so that most of them start during the last backward passes. The first
    # step counts gradient contributions, so only steps 2 and 3 overlap.
    extra = {"train.grad_bucket_mb": 0.01}
    if schedule == "zb-v":
        extra["layout.virtual_stages"] = 2
    overrides = _layout_overrides(tp=tp, pp=pp, dp=2, schedule=schedule, micro_batches=2 * pp, **extra)
    layout = Layout(tp, pp, 2)
    results = run_job(_overlap_job, layout, overrides, 3)
    expected = reference(overrides, 3)
    for rank, result in enumerate(results):
        assert result["losses"] == pytest.approx(expected["losses"], rel=1e-10), f"rank {rank}"
        assert 0 < result["started_in_backward"] <= result["buckets"], f"rank {rank}"
    assert_params_close(results[0]["params"], expected["params"][3])
