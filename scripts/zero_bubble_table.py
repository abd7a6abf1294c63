"""Replay the Zero Bubble paper's profiled times and print its bubble rates beside the simulator's.

Qi et al. 2024, "Zero Bubble Pipeline Parallelism" (arXiv 2401.10241): Table 9 gives the measured
T_F, T_B (input gradient), T_W and T_comm in ms of each setup, Table 5 the bubble rates
(1 - compute time / step time) computed from them. The paper's 1F1B runs one backward pass of
T_B + T_W. For 1F1B-I the paper uses one transformer layer per chunk, with one layer fewer on the
first and last stage: (layers + 2) / p chunks per rank, each costing 1 / v of the stage times;
transfer times stay T_comm per transfer.

    python scripts/zero_bubble_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parallel.pipeline.schedules import build_schedule  # noqa: E402
from parallel.pipeline.simulate import Costs, simulate  # noqa: E402

# (model, layers, p, m, T_F, T_B, T_W, T_comm, Table 5: 1F1B, 1F1B-I, ZB-H1, ZB-H2)
ROWS = [
    ("1.5B", 22, 8, 24, 18.522, 18.086, 9.337, 0.601, 0.2431, 0.1055, 0.1585, 0.1083),
    ("1.5B", 22, 8, 32, 18.513, 18.086, 9.331, 0.626, 0.1985, 0.0818, 0.1242, 0.0837),
    ("1.5B", 22, 8, 64, 18.546, 18.097, 9.321, 0.762, 0.1240, 0.0443, 0.0674, 0.0444),
    ("6.2B", 30, 8, 24, 29.718, 29.444, 19.927, 0.527, 0.2347, 0.0808, 0.1323, 0.0698),
    ("6.2B", 30, 8, 32, 29.802, 29.428, 19.530, 0.577, 0.1898, 0.0628, 0.1045, 0.0559),
    ("6.2B", 30, 8, 64, 29.935, 29.621, 19.388, 0.535, 0.1091, 0.0320, 0.0554, 0.0294),
    ("14.6B", 46, 16, 48, 11.347, 11.248, 8.132, 0.377, 0.2552, 0.1104, 0.1397, 0.0672),
    ("14.6B", 46, 16, 64, 11.307, 11.254, 8.101, 0.379, 0.2082, 0.0852, 0.1088, 0.0516),
    ("14.6B", 46, 16, 128, 11.325, 11.308, 8.109, 0.378, 0.1251, 0.0445, 0.0576, 0.0266),
    ("28.3B", 62, 32, 96, 10.419, 10.207, 7.715, 0.408, 0.2646, 0.1493, 0.1421, 0.0641),
    ("28.3B", 62, 32, 128, 10.408, 10.204, 7.703, 0.408, 0.2168, 0.1164, 0.1106, 0.0490),
    ("28.3B", 62, 32, 256, 10.402, 10.248, 7.698, 0.460, 0.1352, 0.0624, 0.0594, 0.0257),
]


def main() -> int:
    print("model   p    m |  1F1B sim / paper | 1F1B-I sim / paper (v) |  ZB-H1 sim / paper |"
          "  ZB-H2 sim / paper")
    for model, layers, p, m, t_f, t_b, t_w, t_comm, *paper in ROWS:
        one_f_one_b, interleaved, zb_h1, zb_h2 = paper
        costs = Costs.uniform(p, t_f, t_b, t_w, t_comm)
        rates = {name: simulate(build_schedule(name, p, m), costs).bubble_rate
                 for name in ("1f1b", "zb-h1", "zb-h2")}
        v = (layers + 2) // p
        chunked = Costs.uniform(p * v, t_f / v, t_b / v, t_w / v, t_comm)
        rate_i = simulate(build_schedule("interleaved-1f1b", p, m, v), chunked).bubble_rate
        print(f"{model:6} {p:2} {m:4} | {rates['1f1b']:.4f} / {one_f_one_b:.4f}    | "
              f"{rate_i:.4f} / {interleaved:.4f} ({v})    | {rates['zb-h1']:.4f} / {zb_h1:.4f}   | "
              f"{rates['zb-h2']:.4f} / {zb_h2:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
