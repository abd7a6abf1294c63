"""The verifier rejects broken schedules with the grid and the rule; user schedules load."""

from __future__ import annotations

import pytest

from parallel.pipeline.actions import Action, Schedule
from parallel.pipeline.passes import add_communication, order_transfers_by_pair
from parallel.pipeline.schedules import SCHEDULES, VIRTUAL_STAGES, ScheduleError, build_schedule
from parallel.pipeline.sources import from_action_lists, load_table, prepare_schedule
from parallel.pipeline.verify import verify
from tests.helpers import run_config
from training.config import ConfigError


def _table(*rows: str) -> Schedule:
    return from_action_lists("test", [row.split() for row in rows])


def _rejects(schedule: Schedule, rule: str, marked: str, **kwargs) -> str:
    with pytest.raises(ScheduleError) as info:
        verify(schedule, **kwargs)
    message = str(info.value)
    assert rule in message
    assert f">{marked}<" in message, message
    assert "step  rank 0" in message
    return message


def test_action_text_round_trip():
    for text in ("0F0", "12B3", "1I7", "2W0", "3SF4", "1RF2", "0SB1", "5RB10"):
        assert str(Action.parse(text)) == text
    with pytest.raises(ValueError, match="cannot parse action 'F1'"):
        Action.parse("F1")


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("p,m", [(2, 3), (3, 5), (4, 9)])
def test_zoo_passes_verifier(name, p, m):
    schedule = build_schedule(name, p, m, VIRTUAL_STAGES[name] or 2)
    verify(schedule)
    verify(order_transfers_by_pair(add_communication(schedule)))
    verify(order_transfers_by_pair(add_communication(schedule, lookahead=3)))


def test_rejects_transfers_in_different_orders():
    # With receives posted one action ahead, 1F1B's stage 1 receives micro-batch 1's activations
    # before it sends micro-batch 0's gradients, while stage 0 posts them the other way round:
    # NCCL, which matches by order, would wait for ever.
    unordered = add_communication(build_schedule("1f1b", 2, 2))
    message = _rejects(unordered, "same order", "1RF1")
    assert "rank 1 posts recv of the activations of stage 0, micro-batch 1 here" in message


def test_rejects_missing_forward():
    message = _rejects(_table("0F0 0B0 0B1", "1F0 1B0 1F1 1B1"), "exactly once", ".")
    assert "0F1: forward runs 0 times" in message
    _rejects(_table("0F0 0F0 0B0", "1F0 1B0"), "exactly once", "0F0")


def test_rejects_backward_before_forward():
    _rejects(_table("0F0 0B1 0F1 0B0", "1F0 1B0 1F1 1B1"), "before its backward", "0B1")


def test_rejects_weight_before_input_backward():
    _rejects(_table("0F0 0W0 0I0", "1F0 1B0"), "I before W", "0W0")


def test_rejects_mixed_full_and_split_backward():
    _rejects(_table("0F0 0B0 0W0", "1F0 1B0"), "one B or one I and one W", "0W0")


def test_rejects_action_on_wrong_rank():
    schedule = Schedule("test", 2, 1, (0, 1), [["0F0", "1F0"], ["1B0", "0B0"]])
    schedule.actions = [[Action.parse(t) for t in acts] for acts in schedule.actions]
    _rejects(schedule, "on the rank that holds its stage", "1F0")


def test_rejects_deadlock():
    # Rank 0 waits for the gradient of micro-batch 1 before it sends micro-batch 1 forward.
    message = _rejects(_table("0F0 0B1 0F1 0B0", "1F0 1F1 1B1 1B0"), "before its backward", "0B1")
    assert "rank 0" in message
    cyclic = _table("0F0 0F1 0B1 0B0", "1F1 1F0 1B0 1B1")
    verify(cyclic)  # the order is valid on each rank and runs without a wait cycle
    blocked = _table("0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0")
    message = _rejects(blocked, "cannot deadlock", "0B0")
    assert ">1F1<" in message
    assert "waits here forever" in message


def test_rejects_stash_over_bound():
    gpipe = build_schedule("gpipe", 2, 4)
    message = _rejects(gpipe, "max_stash=2", "0F2", max_stash=2)
    assert "raise max_stash to at least 4" in message
    verify(build_schedule("1f1b", 2, 4), max_stash=2)


def test_rejects_receive_after_consumer():
    schedule = add_communication(build_schedule("1f1b", 2, 2))
    rank1 = schedule.actions[1]
    receive = rank1.pop(rank1.index(Action(1, "RF", 1)))
    rank1.append(receive)
    _rejects(schedule, "received once before its consumer", "1RF1")


def test_rejects_send_of_unneeded_tensor():
    schedule = add_communication(build_schedule("1f1b", 2, 2))
    schedule.actions[1].append(Action(1, "SF", 0))
    _rejects(schedule, "sent once after its producer", "1SF0")


def test_grid_error_through_config():
    with pytest.raises(ConfigError) as info:
        run_config({"layout.pp": 2, "layout.schedule": "gpipe", "layout.micro_batches": 4,
                    "layout.max_stash": 3})
    message = str(info.value)
    assert "layout.schedule='gpipe'" in message
    assert ">0F3<" in message


def test_yaml_and_csv_tables_load(tmp_path):
    yaml_path = tmp_path / "s.yaml"
    yaml_path.write_text("actions:\n  - 0F0 0F1 0I0 0W0 0I1 0W1\n  - [1F0, 1I0, 1F1, 1I1, 1W0, 1W1]\n")
    csv_path = tmp_path / "s.csv"
    csv_path.write_text("# one row per rank\n0F0,0F1,0I0,0W0,0I1,0W1\n1F0,1I0,1F1,1I1,1W0,1W1,,\n")
    for path in (yaml_path, csv_path):
        schedule = load_table(path)
        assert schedule.stage_ranks == (0, 1)
        assert schedule.num_microbatches == 2
        verify(schedule)
        prepared = prepare_schedule(str(path), 2, 2)
        assert Action(0, "SF", 0) in prepared.actions[0]


def test_table_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("0F0,0X0\n1F0,1B0\n")
    with pytest.raises(ScheduleError, match="cannot parse action '0X0'"):
        load_table(bad)
    split = tmp_path / "split.csv"
    split.write_text("0F0,0B0,1F0\n1B0\n")
    with pytest.raises(ScheduleError, match="stage 1 has actions on ranks 0 and 1"):
        load_table(split)
    with pytest.raises(ScheduleError, match="runs 2 micro-batches, but micro_batches=3"):
        prepare_schedule("tests/data/schedule_1f1b_pp2_m2.yaml", 2, 3)
    with pytest.raises(ScheduleError, match="not found"):
        prepare_schedule("missing.yaml", 2, 2)


def custom_schedule(num_ranks, num_microbatches, virtual_stages):
    """A user schedule: GPipe written as text."""
    return [[f"{r}F{mb}" for mb in range(num_microbatches)]
            + [f"{r}B{mb}" for mb in range(num_microbatches)] for r in range(num_ranks)]


def test_function_schedule_loads():
    prepared = prepare_schedule("tests.test_schedule_verifier:custom_schedule", 3, 2)
    assert prepared.stage_ranks == (0, 1, 2)
    assert [a for a in prepared.actions[1] if a.is_compute] == [
        Action.parse(t) for t in "1F0 1F1 1B0 1B1".split()]
    with pytest.raises(ScheduleError, match="cannot be loaded"):
        prepare_schedule("tests.test_schedule_verifier:missing", 2, 2)


def test_user_schedule_with_sends_is_rejected(tmp_path):
    path = tmp_path / "comm.csv"
    path.write_text("0F0,0SF0,0B0\n1RF0,1F0,1B0\n")
    with pytest.raises(ScheduleError, match="write compute actions only"):
        prepare_schedule(str(path), 2, 1)
