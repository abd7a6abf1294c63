"""Measure this machine and describe it as a cluster (see `planner.cluster`).

`scripts/calibrate.py` starts one process per local rank on gloo, the way `scripts/train.py`
starts a job. Every rank runs each measurement at the same moment, so that the numbers describe
a rank that shares the machine with the others, as it does in training. Measured:

  matmul throughput on a grid of (m, n, k) shapes, per dtype, averaged over the three forms a
    linear layer runs (x W^T, g W and g^T x);
  seconds per element of the elementwise kernels the cost model lists (`planner.device`),
    measured in float32 without autograd;
  fused attention (scaled_dot_product_attention, causal) forward and backward;
  a tiny transformer block of this code, whose time is framework overhead (per op of the cost
    model's count), and a reference block, to compare with the cost model's kernel sum;
  the optimizer step per parameter: the gradient norm, clipping and AdamW as the trainer runs
    them;
  memory bandwidth (a large copy);
  the matmul speed of a rank while only k of the ranks compute, for k = 1 .. ranks: where ranks
    share cores (with each other or with other work), one computes faster while others wait;
  all-reduce, all-gather, reduce-scatter and send/receive over gloo between the local ranks
    (on loopback), each after a matmul on every rank as in training, fitted as latency per ring
    step plus bytes over bandwidth.

Each time is the median of several samples of at least `min_seconds` each.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import statistics
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from planner.cluster import Cluster, Efficiency, Link

log = logging.getLogger("microtron")

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bf16": torch.bfloat16}
ATTENTION_SHAPES = ((128, 32), (128, 64), (512, 64))  # (sequence, head dim)


@dataclass(frozen=True)
class Settings:
    """The shapes, sizes and sample counts of a calibration."""

    grid: tuple[int, ...] = (64, 256, 1024, 2048)  # matmul m, n and k values
    kernel_elements: tuple[int, ...] = (2**16, 2**18, 2**20, 2**22)
    message_bytes: tuple[int, ...] = (2**12, 2**16, 2**19, 2**22, 2**24)
    samples: int = 5


FULL = Settings()
# About a third of the time of FULL, for calibrating right before each measurement.
QUICK = Settings(grid=(128, 512, 2048), kernel_elements=(2**16, 2**19, 2**22),
                 message_bytes=(2**14, 2**19, 2**23), samples=3)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(torch.zeros(1))


def measure_fixed(fn, reps: int, samples: int = 5) -> float:
    """Return the median seconds of one call of `fn` over `samples` batches of `reps` calls.

    Collectives use it: every rank must make the same number of calls."""
    fn()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - start) / reps)
    return statistics.median(times)


def measure(fn, min_seconds: float = 0.02, samples: int = 5) -> float:
    """Return the median seconds of one call of `fn` over `samples` timed batches."""
    fn()
    reps = 1
    while True:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or reps >= 4096:
            break
        reps = min(4096, max(reps * 2, int(reps * min_seconds / max(elapsed, 1e-9)) + 1))
    times = [elapsed / reps]
    for _ in range(samples - 1):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - start) / reps)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# Compute


class _Rotation:
    """Operands that rotate through a pool larger than the caches, with the last results kept
    alive, as in training: a layer's inputs were produced elsewhere, and autograd keeps outputs,
    so each result lands in freshly allocated memory."""

    POOL_BYTES = 32 * 2**20
    KEPT = 8

    def __init__(self, make, bytes_per_item: int):
        count = max(2, min(64, self.POOL_BYTES // max(bytes_per_item, 1)))
        self.items = [make() for _ in range(count)]
        self.index = 0
        self.kept: deque = deque(maxlen=self.KEPT)

    def run(self, fn) -> None:
        self.index = (self.index + 1) % len(self.items)
        self.kept.append(fn(*self.items[self.index]))


def gemm_grid(dtype: str, settings: Settings = FULL, min_seconds: float = 0.02) -> list[tuple[int, int, int, float]]:
    """Return (m, n, k, FLOP/s) for every shape of the grid."""
    torch_dtype = TORCH_DTYPES[dtype]
    size = torch.empty((), dtype=torch_dtype).element_size()
    rows = []
    grid = settings.grid
    samples = min(3, settings.samples)
    for m in grid:
        for n in grid:
            for k in grid:
                def make():
                    return (torch.randn(m, k, dtype=torch_dtype), torch.randn(n, k, dtype=torch_dtype),
                            torch.randn(m, n, dtype=torch_dtype))
                pool = _Rotation(make, size * (m * k + n * k + m * n))
                _barrier()
                seconds = statistics.mean([
                    measure(lambda: pool.run(lambda x, w, g: F.linear(x, w)), min_seconds, samples),  # x W^T
                    measure(lambda: pool.run(lambda x, w, g: g.matmul(w)), min_seconds, samples),  # g W
                    measure(lambda: pool.run(lambda x, w, g: g.t().matmul(x)), min_seconds, samples),  # g^T x
                ])
                rows.append((m, n, k, 2.0 * m * n * k / seconds))
    return rows


def kernel_seconds(settings: Settings = FULL) -> dict[str, list[tuple[int, float]]]:
    """Return, per elementwise kernel, (elements, seconds per element) at each size, in float32."""
    result: dict[str, list[tuple[int, float]]] = {}
    for elements in settings.kernel_elements:
        for name, seconds in _kernel_seconds_at(elements, settings.samples).items():
            result.setdefault(name, []).append((elements, seconds))
    return result


def _kernel_seconds_at(elements: int, samples: int) -> dict[str, float]:
    from parallel.cross_entropy import vocab_parallel_cross_entropy
    from parallel.dropout import GlobalSlice, hashed_dropout
    from parallel.mesh import Group

    hidden, heads, vocab = 256, 8, 4096
    rows = elements // hidden
    weight, bias = torch.ones(hidden), torch.zeros(hidden)
    where = GlobalSlice((rows, hidden), (0, 0))
    table = torch.randn(vocab, hidden)
    ids = torch.randint(0, vocab, (rows,))
    targets = torch.randint(0, vocab, (elements // vocab,))
    single = Group("calibration", [0], 0, None)

    def make():
        x, y = torch.randn(rows, hidden), torch.randn(rows, hidden)
        _, mean, rstd = torch.ops.aten.native_layer_norm(x, [hidden], weight, bias, 1e-5)
        return x, y, mean, rstd

    pool = _Rotation(make, 2 * 4 * elements)
    timed = {
        "add": lambda x, y, mean, rstd: x + y,
        "copy": lambda x, y, mean, rstd: x.view(-1, 128, heads, hidden // heads).transpose(1, 2).contiguous(),
        "reduce": lambda x, y, mean, rstd: x.sum(0),
        "layer_norm_forward": lambda x, y, mean, rstd: F.layer_norm(x, (hidden,), weight, bias),
        "layer_norm_backward": lambda x, y, mean, rstd: torch.ops.aten.native_layer_norm_backward(
            y, x, [hidden], mean, rstd, weight, bias, [True, True, True]),
        "gelu_forward": lambda x, y, mean, rstd: F.gelu(x, approximate="tanh"),
        "gelu_backward": lambda x, y, mean, rstd: torch.ops.aten.gelu_backward(y, x, approximate="tanh"),
        "dropout_forward": lambda x, y, mean, rstd: hashed_dropout(x, 0.1, 12345, where),
        "dropout_backward": lambda x, y, mean, rstd: y * (x > 0) * 1.1,
        "embedding_forward": lambda x, y, mean, rstd: F.embedding(ids, table),
        "embedding_backward": lambda x, y, mean, rstd: torch.zeros(vocab, hidden).index_add_(0, ids, y),
    }
    result = {}
    with torch.no_grad():
        for name, fn in timed.items():
            _barrier()
            result[name] = measure(lambda: pool.run(fn), samples=samples) / elements

    def make_logits():
        return (torch.randn(elements // vocab, vocab, requires_grad=True),)

    logits_pool = _Rotation(make_logits, 4 * elements)

    def forward(logits):
        with torch.no_grad():
            return vocab_parallel_cross_entropy(logits.detach(), targets, single, 0)

    def both(logits):
        vocab_parallel_cross_entropy(logits, targets, single, 0).sum().backward()
        logits.grad = None

    _barrier()
    t_forward = measure(lambda: logits_pool.run(forward), samples=samples)
    _barrier()
    t_both = measure(lambda: logits_pool.run(both), samples=samples)
    result["softmax_forward"] = t_forward / elements
    result["softmax_backward"] = max(t_both - t_forward, 0.0) / elements
    return result


def attention_rates(shapes=ATTENTION_SHAPES, dtype=torch.float32) -> dict[str, list[tuple[int, int, float]]]:
    """Return (sequence, head dim, FLOP/s) of causal fused attention, forward and backward, with
    FLOPs counted as in `planner.device.Device.attention`."""
    rates: dict[str, list[tuple[int, int, float]]] = {"forward": [], "backward": []}
    for seq, head_dim in shapes:
        batch_heads = max(1, 2**21 // (seq * head_dim))
        q, k, v = (torch.randn(1, batch_heads, seq, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))

        def forward():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def both():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        flops = 4.0 * batch_heads * seq * seq * head_dim
        _barrier()
        t_forward = measure(forward)
        _barrier()
        t_backward = max(measure(both) - t_forward, 1e-9)
        rates["forward"].append((seq, head_dim, flops / t_forward))
        rates["backward"].append((seq, head_dim, 2 * flops / t_backward))
    return rates


# Transformer blocks of this code that calibration times: a tiny one, whose time is all
# framework overhead, and a reference one, to check the kernel sum against.
TINY_BLOCK = {"micro_batch": 1, "seq_len": 16, "hidden": 32, "heads": 2}
REFERENCE_BLOCK = {"micro_batch": 2, "seq_len": 256, "hidden": 384, "heads": 6}


def block_seconds(micro_batch: int, seq_len: int, hidden: int, heads: int) -> tuple[float, float]:
    """Return the seconds of one GPT block of this code (float32, tp = 1), forward and
    forward plus backward."""
    from model.config import GPTConfig
    from model.gpt import Block, ForwardContext
    from parallel.mesh import Layout, Mesh

    config = GPTConfig(n_embd=hidden, n_head=heads, n_positions=seq_len)
    block = Block(config, Mesh(Layout(), 0).tp, 0)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.02)  # torch.empty may hold denormals, which are slow
    ctx = ForwardContext()

    def make():
        return (torch.randn(micro_batch, seq_len, hidden, requires_grad=True),)

    pool = _Rotation(make, 4 * micro_batch * seq_len * hidden)

    def forward(x):
        return block(x, ctx)

    def both(x):
        y = block(x, ctx)
        y.backward(torch.ones_like(y))
        x.grad = None

    _barrier()
    t_forward = measure(lambda: pool.run(forward), samples=3)
    _barrier()
    return t_forward, measure(lambda: pool.run(both), samples=3)


def optimizer_seconds_per_parameter(parameters: int = 2**22) -> float:
    """Return the seconds per parameter of the trainer's optimizer work in float32: the global
    gradient norm (summed in float64), clipping and a foreach AdamW step."""
    params = [torch.nn.Parameter(torch.randn(parameters // 8)) for _ in range(8)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def step():
        total = torch.zeros(1, dtype=torch.float64)
        for p in params:
            total += p.grad.double().square().sum()
        torch._foreach_mul_([p.grad for p in params], 0.5)
        optimizer.step()

    _barrier()
    return measure(step, samples=3) / parameters


PROBE_SIZE = 512  # the matmul (n x n by n x n) of `active_rates`


def active_rates(rank: int, world: int, samples: int = 3) -> list[float | None]:
    """Return this rank's matmul FLOP/s while k = 1 .. world ranks compute at once (None when
    this rank is one of the idle ones, which wait in a barrier).

    It also serves as a probe of the machine's current speed, which scripts/check_predictions.py
    compares with the value at calibration.
    """
    n = PROBE_SIZE
    x, w = torch.randn(n, n), torch.randn(n, n)
    rates: list[float | None] = []
    for active in range(1, world + 1):
        _barrier()
        if rank < active:
            rates.append(2.0 * n**3 / measure(lambda: F.linear(x, w), min_seconds=0.1, samples=samples))
        else:
            rates.append(None)
    _barrier()
    return rates


def memory_bandwidth(num_bytes: int = 2**27) -> float:
    """Return bytes per second of a large copy (read plus write)."""
    source = torch.empty(num_bytes // 4)
    target = torch.empty_like(source)
    _barrier()
    return 2 * num_bytes / measure(lambda: target.copy_(source))


# ----------------------------------------------------------------------------------------------
# Communication


def collective_fits(world: int, settings: Settings = FULL) -> dict[str, Link]:
    """Return the fitted bandwidth and latency of each collective over all ranks.

    The ranks compute between collectives, as in training: each collective follows a matmul of
    about 0.5 GFLOP on every rank, and its cost is the time of both minus the matmul alone. A
    rank that another process delayed then holds up the others, which an idle loop of
    collectives would not show.
    """
    from parallel import comm
    from parallel.mesh import Group

    rank = dist.get_rank()
    group = Group("calibration", list(range(world)), rank, dist.group.WORLD)
    x, w = torch.randn(1024, 512), torch.randn(512, 512)

    def compute():
        F.linear(x, w)

    samples: dict[str, list[tuple[float, float]]] = {op: [] for op in ("all_reduce", "all_gather",
                                                                         "reduce_scatter", "send")}
    for size in settings.message_bytes:
        n = size // 4
        tensor = torch.randn(n)
        out = torch.empty(n)
        part = torch.empty(n // world)
        timed = {
            "all_reduce": lambda: comm.all_reduce(tensor, group),
            "all_gather": lambda: comm.all_gather_into(out, tensor[:n // world], group),
            "reduce_scatter": lambda: comm.reduce_scatter_into(part, tensor, group),
            "send": lambda: _ping_pong(tensor, rank, group),
        }
        reps = max(4, min(32, 2**22 // size))
        for op, fn in timed.items():
            _barrier()
            alone = measure_fixed(compute, reps, settings.samples)
            _barrier()
            both = measure_fixed(lambda: (compute(), fn()), reps, settings.samples)
            seconds = max(both - alone, 1e-7)
            if op == "send":
                seconds /= 2  # a round trip is two one-way transfers
            samples[op].append((size, seconds))
    return {op: _fit(op, points, world) for op, points in samples.items()}


def _ping_pong(tensor: torch.Tensor, rank: int, group) -> None:
    from parallel import comm

    if rank == 0:
        comm.isend(tensor, 1, group, tag=0).wait()
        comm.irecv(tensor, 1, group, tag=1).wait()
    elif rank == 1:
        comm.irecv(tensor, 0, group, tag=0).wait()
        comm.isend(tensor, 0, group, tag=1).wait()


def _fit(op: str, points: list[tuple[float, float]], world: int) -> Link:
    """Fit seconds = steps * latency + share * bytes / bandwidth (the model of
    `Cluster.collective_time`) by least squares on the measured points."""
    n = world
    steps, share = {"all_reduce": (2 * (n - 1), 2 * (n - 1) / n), "all_gather": (n - 1, (n - 1) / n),
                    "reduce_scatter": (n - 1, (n - 1) / n), "send": (1, 1.0)}[op]
    xs = [share * size for size, _ in points]
    ys = [seconds for _, seconds in points]
    mean_x, mean_y = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    intercept = max(mean_y - slope * mean_x, 0.0)
    return Link(bandwidth=1.0 / max(slope, 1e-15), latency=intercept / steps)


# ----------------------------------------------------------------------------------------------
# The whole calibration


def calibrate_rank(rank: int, world: int, dtypes: tuple[str, ...], settings: Settings = FULL) -> dict:
    """Run every measurement on this rank; return the raw numbers."""
    result = {"gemm": {}}
    for dtype in dtypes:
        result["gemm"][dtype] = gemm_grid(dtype, settings)
    result["kernels"] = kernel_seconds(settings)
    result["attention"] = attention_rates()
    result["tiny_block"] = block_seconds(**TINY_BLOCK)
    result["reference_block"] = block_seconds(**REFERENCE_BLOCK)
    result["optimizer"] = optimizer_seconds_per_parameter()
    result["memory_bandwidth"] = memory_bandwidth()
    result["collectives"] = collective_fits(world, settings) if world > 1 else {}
    result["active_rates"] = active_rates(rank, world, settings.samples)
    return result


def _predicted_block(cluster: Cluster) -> tuple[float, float]:
    """Return the cost model's forward and forward-plus-backward seconds of the reference block."""
    from planner.device import Device
    from planner.ops import Shape, layer_work
    from planner.workload import MICROTRON

    b = REFERENCE_BLOCK
    shape = Shape(micro_batch=b["micro_batch"], seq_len=b["seq_len"], hidden=b["hidden"], heads=b["heads"],
                  ffn=4 * b["hidden"], vocab=256, tp=1, sequence_parallel=False, dtype="float32")
    device = Device(cluster)
    times = {}
    for kind, work in layer_work(shape, MICROTRON).items():
        times[kind] = (sum(c * device.gemm(m, n, k, d) for m, n, k, d, c in work.gemms)
                       + sum(device.attention(bh, s, hd, d, back) for bh, s, hd, back, d in work.attention)
                       + sum(device.elementwise(k, n, d) for k, n, d in work.kernels)
                       + work.ops * cluster.op_overhead)
    return times["F"], times["F"] + times["I"] + times["W"]


def _op_overhead(results: list[dict]) -> float:
    """Return the overhead per framework op: the tiny block's forward and backward time, all
    overhead, over the ops the cost model counts for a layer (`Implementation.ops_per_layer`)."""
    from planner.workload import MICROTRON

    seconds = statistics.median(r["tiny_block"][1] for r in results)
    return seconds / sum(MICROTRON.ops_per_layer)


def build_cluster(results: list[dict], name: str, ranks: int, threads: int, command: str,
                  load_before: float, load_after: float) -> Cluster:
    """Combine every rank's measurements (the median over ranks) into a cluster description."""
    first = results[0]
    gemm = {}
    for dtype in first["gemm"]:
        gemm[dtype] = [(m, n, k, statistics.median(r["gemm"][dtype][i][3] for r in results))
                       for i, (m, n, k, _) in enumerate(first["gemm"][dtype])]
    kernels = {k: [(n, statistics.median(r["kernels"][k][i][1] for r in results))
                   for i, (n, _) in enumerate(first["kernels"][k])] for k in first["kernels"]}
    attention = {p: [(s, d, statistics.median(r["attention"][p][i][2] for r in results))
                     for i, (s, d, _) in enumerate(first["attention"][p])] for p in first["attention"]}
    collectives = first["collectives"]  # the same collective on every rank; rank 0's fit
    peaks = {dtype: max(rate for *_, rate in rows) for dtype, rows in gemm.items()}
    peaks.setdefault("float64", peaks.get("float32", 1e9) / 2)
    link = collectives.get("send", Link(1e9, 1e-5)) if collectives else Link(1e9, 1e-5)
    total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cluster = Cluster(
        name=name,
        description=(f"this machine: {ranks} local ranks of {threads} thread(s) on "
                     f"{os.cpu_count()} CPU core(s), {platform.processor() or platform.machine()}"),
        source="measured by scripts/calibrate.py",
        devices_per_node=ranks,
        nodes=1,
        memory_bytes=total_memory / ranks,
        peak_flops=peaks,
        memory_bandwidth=statistics.median(r["memory_bandwidth"] for r in results),
        intra_node=link,
        inter_node=link,
        efficiency=Efficiency(),
        gemm_flops=gemm,
        kernel_seconds=kernels,
        attention_flops=attention,
        collectives=dict(collectives) or None,
        op_overhead=_op_overhead(results),
        optimizer_seconds_per_parameter=statistics.median(r["optimizer"] for r in results),
        calibration={"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "torch": str(torch.__version__), "ranks": ranks, "threads_per_rank": threads,
                     "load_average_before": round(load_before, 2), "load_average_after": round(load_after, 2)},
    )
    rates = [statistics.median(r["active_rates"][k] for r in results if r["active_rates"][k] is not None)
             for k in range(ranks)]
    if ranks > 1:
        cluster.speed_by_active = [rate / rates[-1] for rate in rates]
    cluster.calibration["probe_gflops"] = [round(rate / 1e9, 2) for rate in rates]
    measured = [statistics.median(r["reference_block"][i] for r in results) for i in range(2)]
    cluster.calibration["reference_block"] = {
        **REFERENCE_BLOCK,
        "measured_ms": [round(t * 1e3, 3) for t in measured],
        "predicted_ms": [round(t * 1e3, 3) for t in _predicted_block(cluster)],
    }
    return cluster
