"""The simulator reproduces the closed-form bubbles and the Zero Bubble paper's bubble rates.

Closed forms, with equal unit costs and no transfer time, as bubble time over ideal time:
GPipe and 1F1B (p - 1) / m (Narayanan et al. 2021); interleaved 1F1B (p - 1) / (v m) for m a
multiple of p; ZB-H1 (p - 1)(T_F + T_I - T_W) / (m (T_F + T_I + T_W)) and ZB-H2 zero
(Qi et al. 2024, "Zero Bubble Pipeline Parallelism", Table 2).
"""

from __future__ import annotations

import pytest

from model.config import GPTConfig
from model.memory import activation_bytes_per_layer, weight_grad_bytes_per_layer
from parallel.pipeline.passes import add_communication
from parallel.pipeline.schedules import build_schedule
from parallel.pipeline.simulate import Costs, simulate

# Qi et al. 2024, Table 9 (profiled times in ms: T_F, T_B for the input gradient, T_W, T_comm)
# and Table 5 (bubble rates of 1F1B, ZB-H1 and ZB-H2), by (model, p, m).
ZERO_BUBBLE_TABLES = [
    ("1.5B", 8, 24, 18.522, 18.086, 9.337, 0.601, 0.2431, 0.1585, 0.1083),
    ("1.5B", 8, 32, 18.513, 18.086, 9.331, 0.626, 0.1985, 0.1242, 0.0837),
    ("1.5B", 8, 64, 18.546, 18.097, 9.321, 0.762, 0.1240, 0.0674, 0.0444),
    ("6.2B", 8, 24, 29.718, 29.444, 19.927, 0.527, 0.2347, 0.1323, 0.0698),
    ("6.2B", 8, 32, 29.802, 29.428, 19.530, 0.577, 0.1898, 0.1045, 0.0559),
    ("6.2B", 8, 64, 29.935, 29.621, 19.388, 0.535, 0.1091, 0.0554, 0.0294),
    ("14.6B", 16, 48, 11.347, 11.248, 8.132, 0.377, 0.2552, 0.1397, 0.0672),
    ("14.6B", 16, 64, 11.307, 11.254, 8.101, 0.379, 0.2082, 0.1088, 0.0516),
    ("14.6B", 16, 128, 11.325, 11.308, 8.109, 0.378, 0.1251, 0.0576, 0.0266),
    ("28.3B", 32, 96, 10.419, 10.207, 7.715, 0.408, 0.2646, 0.1421, 0.0641),
    ("28.3B", 32, 128, 10.408, 10.204, 7.703, 0.408, 0.2168, 0.1106, 0.0490),
    ("28.3B", 32, 256, 10.402, 10.248, 7.698, 0.460, 0.1352, 0.0594, 0.0257),
]


def _unit(name: str, p: int, m: int, v: int = 1):
    schedule = build_schedule(name, p, m, v)
    return simulate(schedule, Costs.uniform(schedule.num_stages))


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 1), (2, 5), (4, 4), (4, 9), (8, 24)])
def test_gpipe_and_1f1b_bubble_closed_form(name, p, m):
    assert _unit(name, p, m).bubble_fraction == pytest.approx((p - 1) / m, abs=1e-12)


@pytest.mark.parametrize("p,v,m", [(2, 2, 2), (2, 3, 6), (4, 2, 4), (4, 2, 8), (4, 3, 12), (8, 2, 16)])
def test_interleaved_bubble_closed_form(p, v, m):
    assert _unit("interleaved-1f1b", p, m, v).bubble_fraction == pytest.approx(
        (p - 1) / (v * m), abs=1e-12)


@pytest.mark.parametrize("p,m", [(2, 2), (4, 4), (4, 8), (8, 8), (8, 24)])
def test_zb_h1_bubble_closed_form(p, m):
    t_f = t_i = t_w = 1.0
    bubble = (p - 1) * (t_f + t_i - t_w)
    assert _unit("zb-h1", p, m).bubble_fraction == pytest.approx(
        bubble / (m * (t_f + t_i + t_w)), abs=1e-12)


@pytest.mark.parametrize("p,m", [(2, 3), (4, 7), (4, 8), (8, 15), (8, 24)])
def test_zb_h2_and_zb_v_have_no_bubble(p, m):
    assert _unit("zb-h2", p, m).bubble_fraction == pytest.approx(0.0, abs=1e-12)
    assert _unit("zb-v", p, m, 2).bubble_fraction == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("row", ZERO_BUBBLE_TABLES, ids=lambda r: f"{r[0]}-p{r[1]}-m{r[2]}")
def test_zero_bubble_paper_table5(row):
    _, p, m, t_f, t_b, t_w, t_comm, one_f_one_b, zb_h1, zb_h2 = row
    costs = Costs.uniform(p, t_f, t_b, t_w, t_comm)
    # The paper's 1F1B runs one backward pass (B = T_B + T_W) that sends when both parts are done.
    for name, expected in (("1f1b", one_f_one_b), ("zb-h1", zb_h1), ("zb-h2", zb_h2)):
        rate = simulate(build_schedule(name, p, m), costs).bubble_rate
        assert rate == pytest.approx(expected, abs=0.005), name


def test_simulation_with_communication_actions_matches_compute_only():
    schedule = build_schedule("zb-v", 4, 8, 2)
    costs = Costs.uniform(8, 1.0, 1.2, 0.7, transfer=0.3)
    plain = simulate(schedule, costs)
    with_comm = simulate(add_communication(schedule), costs)
    assert with_comm.makespan == pytest.approx(plain.makespan)
    assert with_comm.bubble_rate == pytest.approx(plain.bubble_rate)


def test_uneven_stages_change_the_bubble():
    even = simulate(build_schedule("1f1b", 4, 8), Costs.uniform(4))
    slow_last = Costs([1, 1, 1, 2], [1, 1, 1, 2], [1, 1, 1, 2])
    uneven = simulate(build_schedule("1f1b", 4, 8), slow_last)
    assert uneven.busy[3] == pytest.approx(2 * uneven.busy[0])
    assert uneven.makespan > even.makespan
    assert uneven.rank_bubble_fraction[0] > even.rank_bubble_fraction[0]


@pytest.mark.parametrize("name,p,m,stage0_peak", [
    ("gpipe", 4, 8, 8), ("1f1b", 4, 8, 4), ("zb-h1", 4, 8, 4), ("zb-h2", 4, 8, 7),
])
def test_peak_stash_per_schedule(name, p, m, stage0_peak):
    result = _unit(name, p, m)
    assert result.peak_stash[0] == stage0_peak
    assert max(result.peak_stash) == stage0_peak


def test_peak_memory_in_bytes_from_the_layer_formula():
    config = GPTConfig(n_layer=8, n_embd=64, n_head=4, n_positions=32)
    activation = activation_bytes_per_layer(config, micro_batch=2, seq_len=32, tp=1, dtype_bytes=4)
    weight_inputs = weight_grad_bytes_per_layer(config, micro_batch=2, seq_len=32, tp=1, dtype_bytes=4)
    layers_per_stage = 2
    costs = Costs.uniform(4, activation_bytes=[layers_per_stage * activation] * 4,
                          weight_grad_bytes=[layers_per_stage * weight_inputs] * 4)
    one_f_one_b = simulate(build_schedule("1f1b", 4, 8), costs)
    assert one_f_one_b.peak_bytes[0] == 4 * layers_per_stage * activation
    zb_h1 = simulate(build_schedule("zb-h1", 4, 8), costs)
    # The last rank defers p - 1 W actions; during an I it holds one activation and, before the
    # oldest W runs, p weight-gradient inputs.
    assert zb_h1.peak_bytes[3] == layers_per_stage * (activation + 4 * weight_inputs)


def test_activation_formula_matches_korthikanti_for_two_byte_values():
    config = GPTConfig(n_layer=1, n_embd=1024, n_head=16, n_positions=2048, dropout=0.1)
    s, b, h, a = 2048, 1, 1024, 16
    for tp in (1, 2, 8):
        expected = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))
        assert activation_bytes_per_layer(config, b, s, tp, dtype_bytes=2) == pytest.approx(expected)
    assert weight_grad_bytes_per_layer(config, b, s, 1, dtype_bytes=2) == 32 * s * b * h
