"""The compatibility table: it agrees with the schedule zoo, config validation follows it, the
README shows it, and every pair of strategy values it allows trains like the single-process
model."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from parallel.launch import set_label
from parallel.mesh import Layout, Mesh
from parallel.pipeline.schedules import SCHEDULES, VIRTUAL_STAGES, ScheduleError, build_schedule
from tests.helpers import (MEMORY_ONLY_KEYS, assert_params_close, corpus_tokens, make_trainer, reference,
                           run_config, run_job)
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
    # Untied embeddings are declared: the model config has no tie_word_embeddings key yet.
    assert compat.status("tied_embeddings", False) == compat.DECLARED
    strategy = compat.Strategy(tied_embeddings=False, sequence_parallel=True, dtype="bf16")
    problems = compat.problems(strategy, compat.Context(tp=2, seq_len=16))
    assert len(problems) == 1, problems
    assert "tied embeddings untied is declared" in problems[0]
    assert "model.tie_word_embeddings" in problems[0]
    assert compat.problems(strategy, compat.Context(tp=2, seq_len=16), require_runs=False) == []


def test_memory_and_precision_values_run():
    for axis in ("sequence_parallel", "recompute", "zero1", "dtype"):
        assert compat.values(axis) == compat.values(axis, include_declared=True), axis


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
    # Every key of an axis that the run config has is set, defaults included, so the settings
    # select the strategy whatever the base config contains.
    assert {k: v for k, v in strategy.settings().items() if compat.config_has_key(k)} == {
        "layout.schedule": "zb-v", "layout.virtual_stages": 2, "layout.sequence_parallel": False,
        "train.recompute": "none", "train.distributed_optimizer": False, "train.dtype": "float64",
        "train.mixed_precision": None}
    other = load_run_config(None, {"layout.sequence_parallel": True, "train.recompute": "full",
                                   "train.mixed_precision": "bf16", **strategy.settings()})
    assert compat.strategy_of(other) == (strategy, [])


def test_unknown_dtype_is_rejected_by_validation():
    with pytest.raises(ConfigError) as error:
        validate(load_run_config(None, {"model.preset": "tiny", "train.dtype": "float16"}))
    assert "train.dtype=float16 must be float32 or float64" in str(error.value)
    assert "fp16: train.dtype=float32, train.mixed_precision=fp16" in str(error.value)


def test_mixed_precision_needs_float32_weights():
    with pytest.raises(ConfigError) as error:
        validate(load_run_config(None, {"model.preset": "tiny", "train.dtype": "float64",
                                        "train.mixed_precision": "bf16"}))
    assert "selects no dtype setting because mixed precision needs float32 master weights" in str(error.value)


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


# Tolerances against the single-process run for float64 and float32: the loss and gradient norm
# (relative) and the parameters (relative, absolute). AdamW's normalized step (lr 1e-2 here) turns
# a rounding difference in a near-zero gradient into a visible parameter difference, so float32
# parameters get an absolute 1e-4.
_TOLERANCE = {"float64": (1e-10, 1e-10, 1e-12), "float32": (1e-5, 1e-3, 1e-4)}

# 16-bit compute (bf16, fp16) is compared with the single-process run in the same precision that
# splits the global batch into the same micro-batches (m x dp). With tp = 1 every 16-bit operation
# then has the same operands, and only float32 sums run in another order, so losses and gradient
# norms agree to float32 rounding. With tp > 1 a row-parallel layer adds two 16-bit partial sums,
# which rounds differently, so they agree to the compute dtype's machine epsilon (2^-7 for bf16,
# 2^-10 for fp16).
# Parameters are compared by the whole update p - p0, not elementwise. AdamW's first steps move a
# parameter by about lr whatever the size of its gradient, so an element whose gradient is within
# the rounding noise moves either way. The attention key bias is such a parameter: its gradient
# is zero in exact arithmetic, because softmax ignores a shift shared by all keys. The largest
# relative difference of the update seen on this matrix is 0.056 for bf16 and 0.011 for fp16,
# both at tp = 2.
_MIXED_TOLERANCE = {  # dtype: (loss and norm, update) at tp = 1, then at tp > 1
    "bf16": ((1e-5, 1e-2), (2**-7, 0.2)),
    "fp16": ((1e-5, 1e-2), (2**-10, 0.05)),
}


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
        stats = [trainer.train_step() for _ in range(STEPS)]
        results.append({"losses": [s.loss for s in stats], "norms": [s.grad_norm for s in stats],
                        "params": trainer.gather_model()})
    return results


@functools.lru_cache(maxsize=None)
def _same_micro_batches_run(frozen_overrides: tuple, micro_batches: int) -> dict:
    """Train the single-process model in `micro_batches` micro-batches per step, in this process;
    return the losses, gradient norms and the parameters before and after."""
    torch.set_num_threads(1)
    overrides = {k: v for k, v in frozen_overrides
                 if not k.startswith("layout.") and k not in MEMORY_ONLY_KEYS}
    trainer = make_trainer(0, {**overrides, "layout.micro_batches": micro_batches})
    before = trainer.gather_model()
    stats = [trainer.train_step() for _ in range(STEPS)]
    return {"losses": [s.loss for s in stats], "norms": [s.grad_norm for s in stats],
            "before": before, "params": trainer.gather_model()}


def _assert_matrix_case(strategy: compat.Strategy, sizes: tuple[int, int, int], overrides: dict,
                        per_rank: list[dict]) -> None:
    tp, _, dp = sizes
    case_name = strategy.describe()
    if strategy.dtype in _TOLERANCE:
        rel_loss, rtol, atol = _TOLERANCE[strategy.dtype]
        expected = reference(overrides, STEPS, (STEPS,))
        expected_params = expected["params"][STEPS]
    else:
        rel_loss, rel_update = _MIXED_TOLERANCE[strategy.dtype][tp > 1]
        expected = _same_micro_batches_run(tuple(sorted(overrides.items())),
                                           overrides["layout.micro_batches"] * dp)
    for rank, result in enumerate(per_rank):
        assert result["losses"] == pytest.approx(expected["losses"], rel=rel_loss), f"{case_name}: rank {rank}"
        assert result["norms"] == pytest.approx(expected["norms"], rel=rel_loss), f"{case_name}: rank {rank}"

    params = per_rank[0]["params"]
    if strategy.dtype in _TOLERANCE:
        assert_params_close(params, expected_params, rtol=rtol, atol=atol)
        return
    before, after = expected["before"], expected["params"]
    assert sorted(params) == sorted(after), f"{case_name}: parameter names differ from the single-process model"
    difference = torch.stack([(params[name] - after[name]).norm() for name in after]).norm()
    update = torch.stack([(after[name] - before[name]).norm() for name in after]).norm()
    assert difference <= rel_update * update, (
        f"{case_name}: the update differs from the single-process one by {float(difference / update):.3g} "
        f"of its norm, more than {rel_update}")


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
        _assert_matrix_case(strategy, sizes, overrides, [per_rank[index] for per_rank in results])
