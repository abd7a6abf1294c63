"""Cluster descriptions: devices, nodes, peak throughput, memory and the links between devices.

A cluster is a YAML file in `configs/clusters/` (or any path). Units are in the key names:

    name: a100-80gb-selene
    description: ...
    devices_per_node: 8          # GPUs per node, or local ranks on a CPU machine
    nodes: 420
    memory_gib: 80               # per device
    peak_tflops: {bf16: 312, fp16: 312, float32: 19.5, float64: 19.5}
    memory_bandwidth_gb_s: 2039  # per device; GB = 1e9 bytes
    intra_node: {bandwidth_gb_s: 300, latency_us: 3}   # per device and direction
    inter_node: {bandwidth_gb_s: 25, latency_us: 5}
    efficiency: {gemm: 0.63, memory: 0.7, network: 0.8}

`efficiency` scales the peaks: the fraction of peak FLOP/s that large matrix multiplications
reach, of memory bandwidth that memory-bound kernels reach, and of link bandwidth that
collectives reach. A calibrated cluster (`scripts/calibrate.py`) adds measured tables, which
replace these roofline estimates:
  gemm_gflops: matmul throughput by shape and dtype;
  kernels_ns_per_element: elementwise kernels, by tensor size;
  attention_gflops: fused attention, forward and backward;
  collectives: bandwidth and latency per collective;
  op_overhead_us and optimizer_ns_per_parameter;
  speed_by_active_devices: how much faster a rank computes while fewer ranks compute, on a
    machine whose ranks share cores.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CLUSTER_DIR = Path(__file__).resolve().parent.parent / "configs" / "clusters"

_REQUIRED = ("name", "devices_per_node", "nodes", "memory_gib", "peak_tflops",
             "memory_bandwidth_gb_s", "intra_node", "inter_node")
_OPTIONAL = ("description", "source", "efficiency", "gemm_gflops", "kernels_ns_per_element",
             "attention_gflops", "collectives", "op_overhead_us", "optimizer_ns_per_parameter",
             "speed_by_active_devices", "calibration")
DTYPES = ("float32", "float64", "bf16", "fp16")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "send")


class ClusterError(ValueError):
    """An invalid or missing cluster description."""


@dataclass(frozen=True)
class Link:
    """A link between two devices: bandwidth in bytes/s per direction, latency in seconds."""

    bandwidth: float
    latency: float


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak that kernels and collectives reach (see the module docstring)."""

    gemm: float = 1.0
    memory: float = 1.0
    network: float = 1.0


@dataclass
class Cluster:
    name: str
    devices_per_node: int
    nodes: int
    memory_bytes: float  # per device
    peak_flops: dict[str, float]  # per compute dtype, FLOP/s
    memory_bandwidth: float  # bytes/s
    intra_node: Link
    inter_node: Link
    efficiency: Efficiency = field(default_factory=Efficiency)
    description: str = ""
    source: str = ""
    # Measured tables of a calibrated cluster (None: roofline estimates from the peaks).
    gemm_flops: dict[str, list[tuple[int, int, int, float]]] | None = None  # dtype -> (m, n, k, FLOP/s)
    # kernel -> (elements, seconds per float32 element) at the measured sizes
    kernel_seconds: dict[str, list[tuple[int, float]]] | None = None
    attention_flops: dict[str, list[tuple[int, int, float]]] | None = None  # pass -> (s, head_dim, FLOP/s)
    collectives: dict[str, Link] | None = None  # op -> fitted bandwidth and latency
    op_overhead: float = 0.0  # seconds per framework op launched, beyond the kernel
    optimizer_seconds_per_parameter: float | None = None
    # Entry k - 1: the compute speed of a device while k devices of its node compute at once,
    # relative to all of them computing. Measured where devices share CPU cores; None where
    # they do not.
    speed_by_active: list[float] | None = None
    calibration: dict = field(default_factory=dict)

    def slowdown(self, active: int) -> float:
        """Return the factor by which compute with `active` devices of a node computing takes
        longer than the measured tables give, which were measured with every device computing."""
        if not self.speed_by_active or active < 1:
            return 1.0
        return 1.0 / self.speed_by_active[min(active, len(self.speed_by_active)) - 1]

    @property
    def devices(self) -> int:
        return self.devices_per_node * self.nodes

    def peak(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise ClusterError(f"cluster {self.name!r} gives no peak_tflops for dtype {dtype!r}; "
                               f"it has {sorted(self.peak_flops)}")
        return self.peak_flops[dtype]

    def at_speed(self, factor: float, speed_by_active: list[float] | None) -> "Cluster":
        """Return a copy whose compute takes `factor` times as long as measured (communication
        unchanged), with the given `speed_by_active`: the machine measured again later, when
        other work shares its cores differently."""
        def rates(table):
            return None if table is None else {key: [(*row[:-1], row[-1] / factor) for row in rows]
                                               for key, rows in table.items()}
        return dataclasses.replace(
            self,
            peak_flops={k: v / factor for k, v in self.peak_flops.items()},
            gemm_flops=rates(self.gemm_flops),
            attention_flops=rates(self.attention_flops),
            kernel_seconds=None if self.kernel_seconds is None else {
                k: [(n, t * factor) for n, t in rows] for k, rows in self.kernel_seconds.items()},
            op_overhead=self.op_overhead * factor,
            optimizer_seconds_per_parameter=(None if self.optimizer_seconds_per_parameter is None
                                             else self.optimizer_seconds_per_parameter * factor),
            speed_by_active=speed_by_active,
        )

    # ------------------------------------------------------------------------------------------
    # Placement of groups

    def node_of(self, rank: int) -> int:
        return rank // self.devices_per_node

    def group_link(self, ranks: list[int]) -> Link:
        """Return the effective link of a ring over `ranks` (global ranks, devices numbered
        node by node).

        Inside one node the ring runs over the intra-node link. Across nodes, a group with k
        members on each node runs k rings side by side, one through each member's network
        interface. Its bandwidth is therefore k times the inter-node bandwidth, capped by the
        intra-node bandwidth because the rings also cross the node's own links.
        """
        nodes: dict[int, int] = {}
        for rank in ranks:
            nodes[self.node_of(rank)] = nodes.get(self.node_of(rank), 0) + 1
        if len(nodes) == 1:
            return self.intra_node
        members_per_node = min(nodes.values())
        bandwidth = min(self.intra_node.bandwidth, members_per_node * self.inter_node.bandwidth)
        return Link(bandwidth, self.inter_node.latency)

    def pair_link(self, a: int, b: int) -> Link:
        return self.intra_node if self.node_of(a) == self.node_of(b) else self.inter_node

    # ------------------------------------------------------------------------------------------
    # Communication times

    def collective_time(self, op: str, num_bytes: float, group_size: int, link: Link) -> float:
        """Return the seconds of one ring collective over `group_size` members.

        `num_bytes` follows the ledger of `parallel.comm`: the tensor handed to the op (for an
        all-gather the gathered output, for a reduce-scatter the full input). Per member, a ring
        all-reduce sends 2 (n - 1) / n of it in 2 (n - 1) steps. An all-gather or reduce-scatter
        sends (n - 1) / n of it in n - 1 steps, and a send all of it in one step.
        """
        if group_size <= 1 and op != "send":
            return 0.0
        n = group_size
        steps, share = {"all_reduce": (2 * (n - 1), 2 * (n - 1) / n),
                        "all_gather": (n - 1, (n - 1) / n),
                        "reduce_scatter": (n - 1, (n - 1) / n),
                        "send": (1, 1.0)}[op]
        bandwidth, latency = self._fitted(op, link)
        return steps * latency + share * num_bytes / bandwidth

    def _fitted(self, op: str, link: Link) -> tuple[float, float]:
        """Return (bandwidth, latency) for `op` on `link`: measured on a calibrated machine,
        else the link's bandwidth times the network efficiency."""
        if self.collectives and op in self.collectives and link is self.intra_node:
            fit = self.collectives[op]
            return fit.bandwidth, fit.latency
        return link.bandwidth * self.efficiency.network, link.latency


# ----------------------------------------------------------------------------------------------
# Reading and writing


def cluster_path(spec: str | Path) -> Path:
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml"):
        path = CLUSTER_DIR / f"{spec}.yaml"
    return path


def load_cluster(spec: str | Path) -> Cluster:
    """Read a cluster from a preset name in configs/clusters or a YAML path."""
    path = cluster_path(spec)
    if not path.is_file():
        presets = sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml"))
        raise ClusterError(f"cluster {str(spec)!r} not found (looked for {path}); use a YAML path "
                           f"or one of the presets {presets}")
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ClusterError(f"{path}: expected a mapping of cluster fields")
    try:
        return cluster_from_dict(data)
    except ClusterError as error:
        raise ClusterError(f"{path}: {error}") from None


def cluster_from_dict(data: dict) -> Cluster:
    missing = [key for key in _REQUIRED if key not in data]
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        raise ClusterError(f"missing key(s) {missing} and unknown key(s) {unknown}; a cluster has "
                           f"{list(_REQUIRED)} and optionally {list(_OPTIONAL)}")
    peaks = {str(k): float(v) * 1e12 for k, v in data["peak_tflops"].items()}
    bad = sorted(set(peaks) - set(DTYPES))
    if bad:
        raise ClusterError(f"peak_tflops has unknown dtype(s) {bad}; use {list(DTYPES)}")
    cluster = Cluster(
        name=str(data["name"]),
        devices_per_node=_positive_int(data, "devices_per_node"),
        nodes=_positive_int(data, "nodes"),
        memory_bytes=_positive(data["memory_gib"], "memory_gib") * 2**30,
        peak_flops=peaks,
        memory_bandwidth=_positive(data["memory_bandwidth_gb_s"], "memory_bandwidth_gb_s") * 1e9,
        intra_node=_link(data["intra_node"], "intra_node"),
        inter_node=_link(data["inter_node"], "inter_node"),
        efficiency=Efficiency(**{k: _fraction(v, f"efficiency.{k}")
                                 for k, v in (data.get("efficiency") or {}).items()}),
        description=str(data.get("description", "")),
        source=str(data.get("source", "")),
        op_overhead=float(data.get("op_overhead_us", 0.0)) * 1e-6,
        calibration=dict(data.get("calibration") or {}),
    )
    if "gemm_gflops" in data:
        cluster.gemm_flops = {dtype: [(int(m), int(n), int(k), float(g) * 1e9) for m, n, k, g in rows]
                              for dtype, rows in data["gemm_gflops"].items()}
    if "kernels_ns_per_element" in data:
        cluster.kernel_seconds = {k: [(int(n), float(ns) * 1e-9) for n, ns in rows]
                                  for k, rows in data["kernels_ns_per_element"].items()}
    if "attention_gflops" in data:
        cluster.attention_flops = {name: [(int(s), int(d), float(g) * 1e9) for s, d, g in rows]
                                   for name, rows in data["attention_gflops"].items()}
    if "collectives" in data:
        cluster.collectives = {op: _link(values, f"collectives.{op}")
                               for op, values in data["collectives"].items()}
        bad = sorted(set(cluster.collectives) - set(COLLECTIVES))
        if bad:
            raise ClusterError(f"collectives has unknown op(s) {bad}; use {list(COLLECTIVES)}")
    if "optimizer_ns_per_parameter" in data:
        cluster.optimizer_seconds_per_parameter = float(data["optimizer_ns_per_parameter"]) * 1e-9
    if "speed_by_active_devices" in data:
        cluster.speed_by_active = [_positive(v, "speed_by_active_devices") for v in data["speed_by_active_devices"]]
    return cluster


def cluster_to_dict(cluster: Cluster) -> dict:
    """Return the YAML mapping of `cluster` (the inverse of `cluster_from_dict`)."""
    data = {
        "name": cluster.name,
        "description": cluster.description,
        "source": cluster.source,
        "devices_per_node": cluster.devices_per_node,
        "nodes": cluster.nodes,
        "memory_gib": round(cluster.memory_bytes / 2**30, 3),
        "peak_tflops": {k: _round(v / 1e12) for k, v in cluster.peak_flops.items()},
        "memory_bandwidth_gb_s": _round(cluster.memory_bandwidth / 1e9),
        "intra_node": _link_dict(cluster.intra_node),
        "inter_node": _link_dict(cluster.inter_node),
        "efficiency": {"gemm": cluster.efficiency.gemm, "memory": cluster.efficiency.memory,
                       "network": cluster.efficiency.network},
    }
    if cluster.gemm_flops:
        data["gemm_gflops"] = {dtype: [[m, n, k, _round(f / 1e9)] for m, n, k, f in rows]
                               for dtype, rows in cluster.gemm_flops.items()}
    if cluster.kernel_seconds:
        data["kernels_ns_per_element"] = {k: [[n, _round(v * 1e9)] for n, v in rows]
                                          for k, rows in cluster.kernel_seconds.items()}
    if cluster.attention_flops:
        data["attention_gflops"] = {name: [[s, d, _round(f / 1e9)] for s, d, f in rows]
                                    for name, rows in cluster.attention_flops.items()}
    if cluster.collectives:
        data["collectives"] = {op: _link_dict(link) for op, link in cluster.collectives.items()}
    if cluster.op_overhead:
        data["op_overhead_us"] = _round(cluster.op_overhead * 1e6)
    if cluster.optimizer_seconds_per_parameter is not None:
        data["optimizer_ns_per_parameter"] = _round(cluster.optimizer_seconds_per_parameter * 1e9)
    if cluster.speed_by_active:
        data["speed_by_active_devices"] = [_round(v) for v in cluster.speed_by_active]
    if cluster.calibration:
        data["calibration"] = cluster.calibration
    return data


def save_cluster(cluster: Cluster, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cluster_to_dict(cluster), f, sort_keys=False, default_flow_style=None, width=100)


def _round(value: float) -> float:
    """Round to 4 significant digits, for readable YAML."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, 3 - int(math.floor(math.log10(abs(value)))))


def _link(values, name: str) -> Link:
    if not isinstance(values, dict) or set(values) != {"bandwidth_gb_s", "latency_us"}:
        raise ClusterError(f"{name} must be a mapping with bandwidth_gb_s and latency_us, got {values!r}")
    return Link(_positive(values["bandwidth_gb_s"], f"{name}.bandwidth_gb_s") * 1e9,
                float(values["latency_us"]) * 1e-6)


def _link_dict(link: Link) -> dict:
    return {"bandwidth_gb_s": _round(link.bandwidth / 1e9), "latency_us": _round(link.latency * 1e6)}


def _positive(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ClusterError(f"{name}={value!r} must be a number") from None
    if not number > 0:
        raise ClusterError(f"{name}={value!r} must be positive")
    return number


def _positive_int(data: dict, name: str) -> int:
    value = data[name]
    if not isinstance(value, int) or value < 1:
        raise ClusterError(f"{name}={value!r} must be a whole number, at least 1")
    return value


def _fraction(value, name: str) -> float:
    number = _positive(value, name)
    if number > 1:
        raise ClusterError(f"{name}={value!r} must be in (0, 1]")
    return number
