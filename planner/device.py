"""Time of one kernel on one device: matrix multiplications, attention and elementwise kernels.

Two sources, chosen per kernel:
  measured: a calibrated cluster contains matmul throughput by shape, attention throughput and
    seconds per element of each elementwise kernel, measured on the machine itself;
  roofline: otherwise a kernel takes the longer of its FLOPs at the peak times the GEMM
    efficiency and its memory traffic at the memory bandwidth times the memory efficiency.
    The roofline is what makes GEMM efficiency depend on shape: a multiplication with a small
    dimension moves many bytes per FLOP and runs below the compute peak.
"""

from __future__ import annotations

import bisect
import functools
import math

from planner.cluster import Cluster

BYTES = {"float32": 4, "float64": 8, "bf16": 2, "fp16": 2}

# Elementwise kernels: memory accesses per element, in elements of the kernel's dtype, for the
# roofline. Masks of dropout add one byte per element on top (see `MASK_BYTES`).
KERNEL_ACCESSES = {
    "add": 3,  # two inputs, one output
    "copy": 2,
    "reduce": 1,  # a sum over rows, such as a bias gradient
    "layer_norm_forward": 2,
    "layer_norm_backward": 4,  # input, output gradient, input gradient, weight-gradient partials
    "gelu_forward": 2,
    "gelu_backward": 3,
    "softmax_forward": 2,
    "softmax_backward": 3,
    "dropout_forward": 2,
    "dropout_backward": 2,
    "embedding_forward": 2,
    "embedding_backward": 3,
}
MASK_BYTES = {"dropout_forward": 1, "dropout_backward": 1}


class Device:
    """Kernel times of one device of `cluster`."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self._gemm_grids = {dtype: _Grid(rows) for dtype, rows in (cluster.gemm_flops or {}).items()}

    # ------------------------------------------------------------------------------------------

    @functools.lru_cache(maxsize=None)
    def gemm(self, m: int, n: int, k: int, dtype: str) -> float:
        """Return the seconds of an (m x k) by (k x n) matrix multiplication."""
        if min(m, n, k) <= 0:
            return 0.0
        flops = 2.0 * m * n * k
        grid = self._gemm_grids.get(dtype)
        if grid is not None:
            return flops / grid.rate(m, n, k)
        compute = flops / (self.cluster.peak(dtype) * self.cluster.efficiency.gemm)
        traffic = BYTES[dtype] * (m * k + k * n + m * n)
        return max(compute, traffic / self._memory_rate())

    def attention(self, batch_heads: int, seq: int, head_dim: int, dtype: str, backward: bool) -> float:
        """Return the seconds of a fused (flash) causal attention kernel over `batch_heads`
        independent heads, forward or backward.

        FLOPs follow Megatron-LM's count with no causal halving: 4 b a s^2 d forward (the
        scores and the weighted values), twice that backward.
        """
        flops = 4.0 * batch_heads * seq * seq * head_dim * (2 if backward else 1)
        table = (self.cluster.attention_flops or {}).get("backward" if backward else "forward")
        if table:
            return flops / _nearest_rate(table, seq, head_dim)
        # A fused kernel reads q, k, v and writes the output (and their gradients backward).
        traffic = BYTES[dtype] * batch_heads * seq * head_dim * (8 if backward else 4)
        compute = flops / (self.cluster.peak(dtype) * self.cluster.efficiency.gemm)
        return max(compute, traffic / self._memory_rate())

    def elementwise(self, kernel: str, elements: float, dtype: str) -> float:
        """Return the seconds of an elementwise kernel over `elements` values of `dtype`."""
        if elements <= 0:
            return 0.0
        table = (self.cluster.kernel_seconds or {}).get(kernel)
        if table:
            # Measured in float32 at several sizes (caches make small tensors cheaper per
            # element); other widths scale with their bytes.
            scaled = elements * BYTES[dtype] / 4
            return _interpolate(table, scaled) * scaled
        traffic = elements * (KERNEL_ACCESSES[kernel] * BYTES[dtype] + MASK_BYTES.get(kernel, 0))
        return traffic / self._memory_rate()

    def optimizer_step(self, parameters: float, param_bytes: int) -> float:
        """Return the seconds of the gradient norm, clipping and the AdamW update of
        `parameters` values.

        Per parameter the step reads the gradient twice (norm, clipping), writes it once, and
        reads and writes the parameter and both moments: 10 accesses.
        """
        if self.cluster.optimizer_seconds_per_parameter is not None:
            return self.cluster.optimizer_seconds_per_parameter * parameters * param_bytes / 4
        return 10 * param_bytes * parameters / self._memory_rate()

    def _memory_rate(self) -> float:
        return self.cluster.memory_bandwidth * self.cluster.efficiency.memory


class _Grid:
    """Measured matmul throughput on a grid of (m, n, k), interpolated in log2 space.

    The grid is the product of the measured m, n and k values. Throughput between grid points
    is interpolated multilinearly in log2 of each dimension, and clamped outside the grid.
    """

    def __init__(self, rows: list[tuple[int, int, int, float]]):
        self.ms = sorted({r[0] for r in rows})
        self.ns = sorted({r[1] for r in rows})
        self.ks = sorted({r[2] for r in rows})
        self.table = {(m, n, k): rate for m, n, k, rate in rows}
        missing = [(m, n, k) for m in self.ms for n in self.ns for k in self.ks
                   if (m, n, k) not in self.table]
        if missing:
            raise ValueError(f"the measured matmul grid lacks {len(missing)} shape(s), such as "
                             f"{missing[0]}; measure every (m, n, k) of the grid")

    def rate(self, m: int, n: int, k: int) -> float:
        log_rate = 0.0
        for m0, wm in _bracket(self.ms, m):
            for n0, wn in _bracket(self.ns, n):
                for k0, wk in _bracket(self.ks, k):
                    log_rate += wm * wn * wk * math.log(self.table[(m0, n0, k0)])
        return math.exp(log_rate)


def _bracket(values: list[int], x: int) -> list[tuple[int, float]]:
    """Return the grid values around x with their interpolation weights (in log2 space)."""
    if x <= values[0]:
        return [(values[0], 1.0)]
    if x >= values[-1]:
        return [(values[-1], 1.0)]
    i = bisect.bisect_right(values, x)
    low, high = values[i - 1], values[i]
    t = (math.log2(x) - math.log2(low)) / (math.log2(high) - math.log2(low))
    return [(low, 1.0 - t), (high, t)]


def _interpolate(table: list[tuple[int, float]], x: float) -> float:
    """Return the value at x of a table of (size, value), linear in log2(size), clamped."""
    if x <= table[0][0]:
        return table[0][1]
    if x >= table[-1][0]:
        return table[-1][1]
    i = bisect.bisect_right([size for size, _ in table], x)
    (x0, y0), (x1, y1) = table[i - 1], table[i]
    t = (math.log2(x) - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
    return y0 + t * (y1 - y0)


def _nearest_rate(table: list[tuple[int, int, float]], seq: int, head_dim: int) -> float:
    """Return the measured rate of the (seq, head_dim) point nearest in log2 space."""
    def distance(row):
        return abs(math.log2(row[0] / seq)) + abs(math.log2(row[1] / head_dim))
    return min(table, key=distance)[2]
