"""Random layouts and schedules: whatever the verifier accepts runs exactly.

Cases draw pp, the schedule, virtual stages, micro-batches, an uneven split of the layers and a
stash bound at random from a fixed seed. For each case the verifier runs first; every accepted
case trains one step on real gloo ranks with the runtime recording, and must give the loss, the
gradients and the updated parameters of the single-process model, execute exactly its action
lists, and leave no weight-gradient work queued.
"""

from __future__ import annotations

import random

import pytest
import torch

from parallel.launch import set_label
from parallel.mesh import Layout, Mesh
from parallel.pipeline.schedules import SCHEDULES, VIRTUAL_STAGES, ScheduleError
from parallel.pipeline.sources import prepare_schedule
from tests.helpers import assert_params_close, corpus_tokens, run_config, run_job
from training import state
from training.trainer import Trainer

CASES_PER_PP = 6


def _random_cases(pp: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    while len(cases) < CASES_PER_PP:
        name = rng.choice(sorted(SCHEDULES))
        virtual = VIRTUAL_STAGES[name] or rng.choice([2, 3])
        micro_batches = rng.randint(1, 2 * pp + 2)
        num_stages = pp * virtual
        n_layer = num_stages + rng.randint(0, 3)
        split = _random_split(rng, n_layer, num_stages)
        max_stash = rng.choice([None, pp, 2 * pp])
        try:
            prepare_schedule(name, pp, micro_batches, virtual, max_stash)
        except ScheduleError:
            continue  # rejected cases never run
        cases.append({
            "layout.pp": pp, "layout.schedule": name, "layout.virtual_stages": virtual,
            "layout.micro_batches": micro_batches, "layout.layers_per_stage": split,
            "layout.max_stash": max_stash, "model.n_layer": n_layer,
            "train.global_batch": micro_batches * rng.choice([1, 2]),
        })
    return cases


def _random_split(rng: random.Random, n_layer: int, num_stages: int) -> list[int]:
    """Return a random split of n_layer layers over the stages, at least one layer each."""
    split = [1] * num_stages
    for _ in range(n_layer - num_stages):
        split[rng.randrange(num_stages)] += 1
    return split


def _gather_grads(trainer: Trainer) -> dict | None:
    grads = []
    for name, param in trainer.named_params:
        grad = param.grad.detach().clone()
        if hasattr(param, "tp_shard"):
            grad.tp_shard = param.tp_shard
        grads.append((name, grad))
    return state.gather_model(grads, trainer.mesh)


def _one_step(trainer: Trainer) -> dict:
    trainer.runtime.record = True
    stats = trainer.train_step()
    executed = [record.action for record in trainer.runtime.trace]
    return {"loss": stats.loss, "norm": stats.grad_norm, "grads": _gather_grads(trainer),
            "params": trainer.gather_model(), "executed": executed,
            "expected": trainer.schedule.actions[trainer.mesh.pp_rank],
            "pending": trainer.runtime.pending_weight_grads}


def _cases_job(rank: int, world_size: int, pp: int, cases: list[dict]):
    mesh = Mesh(Layout(pp=pp), rank)
    set_label(mesh.describe())
    return [_one_step(Trainer(run_config(overrides), mesh, corpus_tokens())) for overrides in cases]


def _single_process(overrides: dict) -> dict:
    torch.set_num_threads(1)
    layout_free = {k: v for k, v in overrides.items() if not k.startswith("layout.")}
    config = run_config(layout_free)
    return _one_step(Trainer(config, Mesh(Layout(), 0), corpus_tokens()))


@pytest.mark.parametrize("pp,seed", [(2, 11), (3, 12), (4, 13)])
def test_random_schedules_run_exactly(pp, seed):
    cases = _random_cases(pp, seed)
    results = run_job(_cases_job, Layout(pp=pp), pp, cases, timeout_s=120.0)
    for index, overrides in enumerate(cases):
        label = ", ".join(f"{k.split('.')[1]}={v}" for k, v in overrides.items())
        expected = _single_process(overrides)
        for rank, per_rank in enumerate(results):
            got = per_rank[index]
            assert got["executed"] == got["expected"], f"{label}: rank {rank} trace differs"
            assert got["pending"] == 0, f"{label}: rank {rank} left weight gradients queued"
            assert got["loss"] == pytest.approx(expected["loss"], rel=1e-10), label
            assert got["norm"] == pytest.approx(expected["norm"], rel=1e-10), label
        assert_params_close(results[0][index]["grads"], expected["grads"])
        assert_params_close(results[0][index]["params"], expected["params"])
