"""Every schedule of the zoo trains like the single-process model.

Each job starts one set of gloo ranks for a layout and trains the tiny model in float64 for two
steps under every (schedule, micro-batch count) case of that layout, one Trainer per case on the
same mesh, so that the ranks start once for many cases. Losses, gradient norms and the full
parameters after the second step are compared with the single-process run of the same batches.
"""

from __future__ import annotations

import pytest

from parallel.mesh import Layout, Mesh
from parallel.launch import set_label
from parallel.pipeline.schedules import SCHEDULES, VIRTUAL_STAGES
from tests.helpers import assert_params_close, corpus_tokens, reference, run_config, run_job
from training.config import ConfigError
from training.trainer import Trainer

STEPS = 2
TABLE = "tests/data/schedule_1f1b_pp2_m2.yaml"


def _case(schedule: str, pp: int, micro_batches: int, dp: int = 1, tp: int = 1) -> dict:
    virtual = VIRTUAL_STAGES.get(schedule) or 2
    return {
        "layout.tp": tp, "layout.pp": pp, "layout.dp": dp, "layout.schedule": schedule,
        "layout.micro_batches": micro_batches, "layout.virtual_stages": virtual,
        # Two stages per rank on four ranks need eight layers.
        "model.n_layer": 8 if pp * virtual > 4 else 4,
        "train.global_batch": 2 * micro_batches * dp,
    }


def _admits(schedule: str, pp: int, micro_batches: int) -> bool:
    return not (schedule == "dualpipev" and micro_batches < 2 * pp - 1)


def _zoo_job(rank: int, world_size: int, sizes: tuple[int, int, int], cases: list[dict]):
    tp, pp, dp = sizes
    mesh = Mesh(Layout(tp=tp, pp=pp, dp=dp), rank)
    set_label(mesh.describe())
    results = []
    for overrides in cases:
        trainer = Trainer(run_config(overrides), mesh, corpus_tokens())
        losses, norms = [], []
        for _ in range(STEPS):
            stats = trainer.train_step()
            losses.append(stats.loss)
            norms.append(stats.grad_norm)
        results.append({"losses": losses, "norms": norms, "params": trainer.gather_model(),
                        "stash": dict(trainer.runtime.max_stashed_per_stage),
                        "pp_rank": mesh.pp_rank})
    return results


def _run_and_compare(sizes: tuple[int, int, int], cases: list[dict]):
    tp, pp, dp = sizes
    results = run_job(_zoo_job, Layout(tp=tp, pp=pp, dp=dp), sizes, cases, timeout_s=120.0)
    for index, overrides in enumerate(cases):
        label = f"{overrides['layout.schedule']} m={overrides['layout.micro_batches']}"
        expected = reference(overrides, STEPS, (STEPS,))
        for rank, per_rank in enumerate(results):
            got = per_rank[index]
            assert got["losses"] == pytest.approx(expected["losses"], rel=1e-10), f"{label} rank {rank}"
            assert got["norms"] == pytest.approx(expected["norms"], rel=1e-10), f"{label} rank {rank}"
        assert_params_close(results[0][index]["params"], expected["params"][STEPS])
    return results


@pytest.mark.parametrize("pp", [2, 4])
def test_zoo_matches_single_process(pp):
    cases = [_case(name, pp, m) for name in SCHEDULES for m in (1, pp, 2 * pp + 1)
             if _admits(name, pp, m)]
    if pp == 2:
        cases.append({**_case("1f1b", 2, 2), "layout.schedule": TABLE})
    results = _run_and_compare((1, pp, 1), cases)

    # Measured stash: stage 0 holds at most pp micro-batches under 1F1B and all m under GPipe.
    m = 2 * pp + 1
    for name, bound in (("1f1b", pp), ("gpipe", m)):
        index = cases.index(_case(name, pp, m))
        stage0 = next(r[index]["stash"][0] for r in results if r[index]["pp_rank"] == 0)
        assert stage0 == bound, f"{name}: stage 0 stashed {stage0} micro-batches, expected {bound}"


def test_zoo_with_tp_and_dp():
    picks = ["interleaved-1f1b", "zb-h1", "zb-v", "dualpipev"]
    _run_and_compare((2, 2, 1), [_case(name, 2, 5, tp=2) for name in picks])
    _run_and_compare((1, 2, 2), [_case(name, 2, m, dp=2) for name in ("zb-h2", "dualpipev", "gpipe")
                                 for m in (3,)])


@pytest.mark.parametrize("schedule,pp,micro_batches,virtual,message", [
    ("dualpipev", 2, 1, 2, "needs micro_batches >= 2 * pp - 1 = 3"),
    ("dualpipev", 4, 4, 2, "needs micro_batches >= 2 * pp - 1 = 7"),
    ("zb-v", 2, 2, 1, "runs 2 stages per rank, but virtual_stages=1"),
    ("zb-h1", 2, 2, 2, "runs one stage per rank, but virtual_stages=2"),
    ("interleaved-1f1b", 2, 2, 1, "needs virtual_stages >= 2"),
])
def test_zoo_rejects_unsupported_layouts(schedule, pp, micro_batches, virtual, message):
    overrides = {**_case(schedule, pp, micro_batches), "layout.virtual_stages": virtual}
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace("(", r"\(")):
        run_config(overrides)
