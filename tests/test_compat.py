"""The compatibility table: it agrees with the schedule zoo, config validation follows it, the
README shows it, and every pair of strategy values it allows trains like the single-process
model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from parallel.launch import set_label
from parallel.mesh import Layout, Mesh
from parallel.pipeline.schedules import SCHEDULES, VIRTUAL_STAGES, ScheduleError, build_schedule
from tests.helpers import assert_params_close, corpus_tokens, reference, run_config, run_job
from training import compat
from training.config import ConfigError, load_run_config, validate
from training.trainer import Trainer

README = Path(__file__).resolve().parent.parent / "README.md"
STEPS = 2


def test_table_lists_every_schedule_of_the_zoo():
    assert list(compat.SCHEDULE_RULES) == list(SCHEDULES)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_table_matches_schedule_generators(name):
    rule = compat.SCHEDULE_RULES[name]
    low, high = rule.virtual_stages
    assert VIRTUAL_STAGES[name] == (high if low == high else None)

    pp, v = 3, low
    schedule = build_schedule(name, pp, 2 * pp - 1, v)
    expected = {"contiguous": tuple(range(pp)),
                "round-robin": tuple(s % pp for s in range(pp * v)),
                "v-shape": tuple(range(pp)) + tuple(reversed(range(pp)))}[rule.placement]
    assert schedule.stage_ranks == expected
    kinds = {a.kind for actions in schedule.actions for a in actions}
    assert ("W" in kinds) == rule.split_backward
    assert rule.embedding_copies(pp) == (1 if schedule.stage_ranks[0] == schedule.stage_ranks[-1] else 2)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_table_minimum_micro_batches_matches_generator(name):
    rule = compat.SCHEDULE_RULES[name]
    pp, v = 3, rule.virtual_stages[0]
    least = rule.min_micro_batches_for(pp)
    build_schedule(name, pp, least, v)
    if least > 1:
        with pytest.raises(ScheduleError):
            build_schedule(name, pp, least - 1, v)


_VALIDATION_CASES = [(name, v, m) for name in SCHEDULES for v in (1, 2, 3) for m in (1, 3, 4)]


@pytest.mark.parametrize("name,virtual,micro_batches", _VALIDATION_CASES,
                         ids=[f"{n}-v{v}-m{m}" for n, v, m in _VALIDATION_CASES])
def test_validation_follows_table(name, virtual, micro_batches):
    overrides = {"layout.pp": 2, "layout.schedule": name, "layout.virtual_stages": virtual,
                 "layout.micro_batches": micro_batches, "train.global_batch": 12, "model.n_layer": 6}
    strategy = compat.Strategy(schedule=name, virtual_stages=virtual)
    expected = compat.problems(strategy, compat.Context(pp=2, micro_batches=micro_batches, seq_len=16))
    if not expected:
        run_config(overrides)
        return
    with pytest.raises(ConfigError) as error:
        run_config(overrides)
    for problem in expected:
        assert problem in str(error.value)


def test_declared_values_are_rejected_with_their_keys():
    strategy = compat.Strategy(sequence_parallel=True, dtype="bf16")
    problems = compat.problems(strategy, compat.Context(tp=2, seq_len=16))
    for key in ("layout.sequence_parallel", "train.mixed_precision"):
        if compat.config_has_key(key):
            assert not any(key in p for p in problems)
        else:
            assert any(key in p for p in problems), problems
    assert compat.problems(strategy, compat.Context(tp=2, seq_len=16), require_runs=False) == []


def test_sequence_split_rule():
    strategy = compat.Strategy(sequence_parallel=True)
    problems = compat.problems(strategy, compat.Context(tp=2, seq_len=15), require_runs=False)
    assert any("seq_len=15 is not divisible by tp=2" in p for p in problems)


def test_strategy_of_config():
    config = load_run_config(None, {"layout.pp": 2, "layout.schedule": "zb-v", "layout.virtual_stages": 2,
                                    "train.dtype": "float64"})
    strategy, problems = compat.strategy_of(config)
    assert problems == []
    assert strategy == compat.Strategy(schedule="zb-v", virtual_stages=2, dtype="float64")
    assert {k: v for k, v in strategy.settings().items() if compat.config_has_key(k)} == {
        "layout.schedule": "zb-v", "layout.virtual_stages": 2, "train.dtype": "float64"}


def test_unknown_dtype_is_rejected_by_validation():
    with pytest.raises(ConfigError, match="train.dtype='float16' selects no dtype setting"):
        validate(load_run_config(None, {"model.preset": "tiny", "train.dtype": "float16"}))


def test_pairwise_strategies_cover_every_pair():
    strategies = compat.pairwise_strategies(include_declared=True)
    names = ["schedule"] + [axis.name for axis in compat.AXES]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            values_a = list(compat.SCHEDULE_RULES) if a == "schedule" else compat.values(a, True)
            for x in values_a:
                for y in compat.values(b, True):
                    assert any(getattr(s, a) == x and getattr(s, b) == y for s in strategies), (a, x, b, y)


def test_readme_table_is_up_to_date():
    text = README.read_text()
    match = re.search(r"<!-- compat-table:start -->\n(.*?)\n<!-- compat-table:end -->", text, re.S)
    assert match, "README.md lacks the compat-table markers"
    assert match.group(1) == compat.markdown_table(), (
        "README.md's compatibility table is stale; run python scripts/compat_table.py")


# ----------------------------------------------------------------------------------------------
# The layout matrix: every pair of strategy values that runs, trained on real gloo ranks


# Tolerances against the single-process run, per dtype: the loss (relative) and the parameters
# (relative, absolute). AdamW's normalized step (lr 1e-2 here) turns a rounding difference in a
# near-zero gradient into a visible parameter difference, so float32 parameters get an absolute
# 1e-4.
_TOLERANCE = {"float64": (1e-10, 1e-10, 1e-12), "float32": (1e-5, 1e-3, 1e-4),
              "bf16": (2e-2, 5e-2, 5e-3), "fp16": (2e-2, 5e-2, 5e-3)}


def _matrix_case(strategy: compat.Strategy) -> tuple[tuple[int, int, int], dict]:
    """Return the mesh sizes and overrides that exercise `strategy` on pipeline ranks."""
    tp = 2 if strategy.sequence_parallel else 1
    dp = 2 if strategy.zero1 else 1
    pp = 2
    micro_batches = compat.SCHEDULE_RULES[strategy.schedule].min_micro_batches_for(pp) + 1
    overrides = {"layout.tp": tp, "layout.pp": pp, "layout.dp": dp,
                 "layout.micro_batches": micro_batches, "train.global_batch": 2 * micro_batches * dp,
                 **strategy.settings()}
    return (tp, pp, dp), overrides


def _matrix_job(rank: int, world_size: int, sizes: tuple[int, int, int], cases: list[dict]):
    tp, pp, dp = sizes
    mesh = Mesh(Layout(tp=tp, pp=pp, dp=dp), rank)
    set_label(mesh.describe())
    results = []
    for overrides in cases:
        trainer = Trainer(run_config(overrides), mesh, corpus_tokens())
        losses = [trainer.train_step().loss for _ in range(STEPS)]
        results.append({"losses": losses, "params": trainer.gather_model()})
    return results


def _matrix_groups() -> dict[tuple[int, int, int], list[tuple[compat.Strategy, dict]]]:
    groups: dict = {}
    for strategy in compat.pairwise_strategies():
        sizes, overrides = _matrix_case(strategy)
        groups.setdefault(sizes, []).append((strategy, overrides))
    return groups


_GROUPS = _matrix_groups()


@pytest.mark.parametrize("sizes", list(_GROUPS), ids=[f"tp{t}-pp{p}-dp{d}" for t, p, d in _GROUPS])
def test_pairwise_matrix_matches_single_process(sizes):
    cases = _GROUPS[sizes]
    results = run_job(_matrix_job, Layout(*sizes), sizes, [o for _, o in cases], timeout_s=180.0)
    for index, (strategy, overrides) in enumerate(cases):
        loss_rel, rel, atol = _TOLERANCE[strategy.dtype]
        expected = reference(overrides, STEPS, (STEPS,))
        for rank, per_rank in enumerate(results):
            assert per_rank[index]["losses"] == pytest.approx(expected["losses"], rel=loss_rel), \
                f"{strategy.describe()} rank {rank}"
        assert_params_close(results[0][index]["params"], expected["params"][STEPS], rtol=rel, atol=atol)
