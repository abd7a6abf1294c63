"""The cost model against published Megatron-LM runs and against its own definitions.

The published numbers are in tests/data/published_runs.yaml with their sources. The A100
preset's three efficiencies were fitted on three of those runs (see scripts/fit_cluster.py and
docs/planner.md); every run must be predicted within 10%.
"""

from __future__ import annotations

import math

import pytest

from model.config import GPTConfig
from planner.cluster import ClusterError, Link, cluster_from_dict, load_cluster
from planner.device import Device
from planner.estimate import CostModel
from planner.memory import layer_activation_bytes
from planner.ops import Shape
from planner.published import best_estimate, load_runs
from planner.search import SearchSpace, plan
from planner.workload import MEGATRON, MICROTRON, Candidate, Workload
from training.compat import Strategy

RUNS = load_runs()
A100 = load_cluster("a100-80gb-selene")
MEGATRON_A100 = CostModel(A100, MEGATRON)
TABLE1 = [run for run in RUNS if run.tflops_per_gpu is not None]
TABLE5 = [run for run in RUNS if run.step_s is not None]


@pytest.mark.parametrize("run", TABLE1, ids=lambda r: r.name)
def test_megatron_2021_table1_within_10_percent(run):
    estimate = best_estimate(MEGATRON_A100, run)
    error = run.relative_error(estimate)
    assert abs(error) <= 0.10, (f"{run.name}: predicted {run.predicted(estimate):.1f} TFLOP/s per GPU, "
                                f"published {run.published}, error {error:+.1%}")


@pytest.mark.parametrize("run", TABLE5, ids=lambda r: r.name)
def test_korthikanti_2022_table5_within_10_percent(run):
    estimate = best_estimate(MEGATRON_A100, run)
    error = run.relative_error(estimate)
    assert abs(error) <= 0.10, (f"{run.name}: predicted {estimate.step_s:.2f} s per iteration, "
                                f"published {run.published} s, error {error:+.1%}")


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r.name)
def test_published_layout_fits_and_is_ranked(run):
    published = best_estimate(MEGATRON_A100, run)
    assert published.fits, (f"{run.name}: the published layout needs {published.memory.total / 2**30:.1f} "
                            f"GiB per device")

    # Megatron-LM's schedules and the run's recomputation and sequence parallelism; no ZeRO-1.
    strategy = run.layouts[0].strategy
    space = SearchSpace(schedules=("1f1b", "interleaved-1f1b"), recompute=(strategy.recompute,),
                        sequence_parallel=(strategy.sequence_parallel,), zero1=(False,),
                        micro_batch_sizes=(1, 2, 4, 8))
    result = plan(run.workload, MEGATRON_A100, run.layouts[0].devices, keep=3, space=space)
    top = result.ranked[:3]
    assert len(top) == 3
    ranked = any(e.candidate in run.layouts for e in top)
    assert ranked or top[-1].step_s <= published.step_s, (
        f"{run.name}: the planner's third ({top[-1].candidate.describe()}, {top[-1].step_s:.2f} s) is "
        f"slower than the published layout ({published.candidate.describe()}, {published.step_s:.2f} s)")


# ----------------------------------------------------------------------------------------------
# Definitions


def test_flop_counts_match_the_papers():
    model = GPTConfig(vocab_size=51200, n_positions=2048, n_embd=6144, n_layer=40, n_head=48)
    w = Workload(model, 2048, 1024)
    b, s, l, h, v = 1024, 2048, 40, 6144, 51200
    assert w.model_flops() == pytest.approx(72 * b * s * l * h * h * (1 + s / (6 * h) + v / (12 * h * l)))
    assert w.megatron_flops() == pytest.approx(96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h)))


@pytest.mark.parametrize("tp", [1, 8])
def test_activation_count_matches_korthikanti(tp):
    h, a, s, b = 6144, 64, 2048, 4
    shape = Shape(micro_batch=b, seq_len=s, hidden=h, heads=a, ffn=4 * h, vocab=51200, tp=tp,
                  sequence_parallel=False, dtype="fp16", dropout=True)
    sp = Shape(**{**shape.__dict__, "sequence_parallel": True})
    sbh = s * b * h
    scores = 5 * a * s / (h * tp)
    assert layer_activation_bytes(shape, MEGATRON) == pytest.approx(sbh * (10 + 24 / tp + scores))
    assert layer_activation_bytes(shape, MEGATRON, "selective") == pytest.approx(sbh * (10 + 24 / tp))
    assert layer_activation_bytes(shape, MEGATRON, "full") == pytest.approx(2 * sbh)
    if tp > 1:
        assert layer_activation_bytes(sp, MEGATRON) == pytest.approx(sbh * (34 / tp + scores))
        assert layer_activation_bytes(sp, MEGATRON, "selective") == pytest.approx(34 * sbh / tp)


@pytest.mark.parametrize("tp,pp,schedule,v", [(1, 1, "1f1b", 1), (2, 1, "1f1b", 1), (1, 2, "1f1b", 1),
                                              (2, 2, "zb-v", 2), (1, 2, "interleaved-1f1b", 2)])
def test_rank_parameters_add_up_to_the_model(tp, pp, schedule, v):
    config = GPTConfig(vocab_size=1000, n_positions=64, n_embd=64, n_layer=4, n_head=4)
    workload = Workload(config, 64, 8)
    candidate = Candidate(tp, pp, 1, 1, 8, Strategy(schedule=schedule, virtual_stages=v))
    per_rank = CostModel(A100).rank_parameters(workload, candidate)
    h, padded = config.n_embd, -(-config.vocab_size // tp) * tp
    # TP splits all but the LayerNorms and row-parallel biases (6h per layer, 2h at the end),
    # and a non-V pipeline keeps a second copy of the tied embedding on its last rank.
    replicated = 6 * h * config.n_layer + 2 * h + config.n_positions * h
    split = config.num_parameters() - replicated - config.vocab_size * h + padded * h
    copies = 2 if pp > 1 and schedule != "zb-v" else 1
    assert sum(per_rank) * tp == pytest.approx(split + replicated * tp + (copies - 1) * padded * h)


def test_ring_collective_times():
    cluster = A100
    link = Link(100e9, 2e-6)
    size = 64e6
    bandwidth = 100e9 * cluster.efficiency.network
    assert cluster.collective_time("all_reduce", size, 8, link) == pytest.approx(14 * 2e-6 + 1.75 * size / bandwidth)
    assert cluster.collective_time("all_gather", size, 8, link) == pytest.approx(7 * 2e-6 + 0.875 * size / bandwidth)
    assert cluster.collective_time("send", size, 2, link) == pytest.approx(2e-6 + size / bandwidth)
    assert cluster.collective_time("all_reduce", size, 1, link) == 0.0


def test_group_links_by_placement():
    inside = A100.group_link(list(range(8)))
    assert inside == A100.intra_node
    one_per_node = A100.group_link([0, 8, 16, 24])
    assert one_per_node.bandwidth == A100.inter_node.bandwidth
    four_per_node = A100.group_link([0, 2, 4, 6, 8, 10, 12, 14])
    assert four_per_node.bandwidth == min(A100.intra_node.bandwidth, 4 * A100.inter_node.bandwidth)


def test_roofline_gemm_efficiency_depends_on_shape():
    device = Device(A100)
    big = 2 * 8192 ** 3 / device.gemm(8192, 8192, 8192, "fp16")
    thin = 2 * 8192 * 8192 * 16 / device.gemm(8192, 8192, 16, "fp16")
    assert big == pytest.approx(A100.peak("fp16") * A100.efficiency.gemm)
    assert thin < 0.2 * big


def test_measured_gemm_grid_is_interpolated():
    rows = [(m, n, k, 1e9 * (1 + math.log2(m) + math.log2(n) + math.log2(k)))
            for m in (64, 256) for n in (64, 256) for k in (64, 256)]
    cluster = cluster_from_dict({**_MINIMAL, "gemm_gflops": {"float32": [[m, n, k, g / 1e9] for m, n, k, g in rows]}})
    device = Device(cluster)
    for m, n, k, rate in rows:
        assert 2 * m * n * k / device.gemm(m, n, k, "float32") == pytest.approx(rate)
    middle = 2 * 128 ** 3 / device.gemm(128, 128, 128, "float32")
    assert 1e9 * (1 + 6 * 3) < middle < 1e9 * (1 + 8 * 3)


_MINIMAL = {"name": "x", "devices_per_node": 2, "nodes": 1, "memory_gib": 8, "peak_tflops": {"float32": 0.1},
            "memory_bandwidth_gb_s": 10, "intra_node": {"bandwidth_gb_s": 1, "latency_us": 50},
            "inter_node": {"bandwidth_gb_s": 1, "latency_us": 50}}


@pytest.mark.parametrize("change,message", [
    ({"nodes": 0}, "nodes=0 must be a whole number"),
    ({"efficiency": {"gemm": 1.5}}, r"efficiency.gemm=1.5 must be in \(0, 1\]"),
    ({"peak_tflops": {"int8": 1}}, "unknown dtype"),
    ({"intra_node": {"bandwidth_gb_s": 1}}, "intra_node must be a mapping with bandwidth_gb_s and latency_us"),
    ({"color": "red"}, r"unknown key\(s\) \['color'\]"),
])
def test_invalid_cluster_is_rejected(change, message):
    with pytest.raises(ClusterError, match=message):
        cluster_from_dict({**_MINIMAL, **change})


def test_missing_cluster_names_presets():
    with pytest.raises(ClusterError, match="a100-80gb-selene"):
        load_cluster("no-such-cluster")


def test_microtron_and_megatron_differ_where_they_should():
    workload = Workload(GPTConfig(vocab_size=1000, n_positions=512, n_embd=512, n_layer=4, n_head=8,
                                  dropout=0.1), 512, 16, "fp16")
    candidate = Candidate(2, 2, 1, 2, 8, Strategy(dtype="fp16"))
    microtron = CostModel(A100, MICROTRON).estimate(workload, candidate)
    megatron = MEGATRON_A100.estimate(workload, candidate)
    # Unfused kernels cost more time; float32 gradients and no stored masks change memory.
    assert microtron.components["compute"] > megatron.components["compute"]
    assert microtron.memory.grads == 2 * megatron.memory.grads
