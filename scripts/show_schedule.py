"""Draw a pipeline schedule as a timeline, simulated and optionally from a recorded run.

    python scripts/show_schedule.py --schedule zb-h1 --pp 4 --micro-batches 8 --out zb-h1.png
    python scripts/show_schedule.py --schedule 1f1b --pp 4 --micro-batches 8 --record \\
        --out 1f1b.png --trace 1f1b.json

The simulation uses --costs (forward, input backward, weight backward, transfer, per stage;
default equal unit costs). With --record the script also trains the tiny-but-not-trivial model of
--set options on local gloo ranks, records the last step, and prints the recorded bubble next to
the simulator's replay of that run's own measured action times; the picture then shows the
simulated and the recorded timeline side by side, and --trace writes the recorded run as a
Chrome trace JSON that Perfetto (ui.perfetto.dev) opens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from parallel.pipeline.draw import draw_timelines  # noqa: E402
from parallel.pipeline.simulate import Costs, simulate  # noqa: E402
from parallel.pipeline.sources import prepare_schedule  # noqa: E402
from parallel.pipeline.trace import measured_costs, recorded_result, write_chrome_trace  # noqa: E402

# The model and batch of a recorded run: enough work per action (tens of milliseconds on one CPU
# thread) that timer noise stays small next to it.
RECORD_DEFAULTS = {
    "model.n_layer": 8, "model.n_embd": 256, "model.n_head": 8, "model.n_positions": 128,
    "model.dropout": 0.0, "train.seq_len": 128, "train.dtype": "float32", "train.steps": 2,
    "run.out": None, "run.progress": False, "run.sample_tokens": 0,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", default="1f1b", help="a zoo name, a .yaml/.csv table, or "
                                                           "package.module:function")
    parser.add_argument("--pp", type=int, default=4, help="pipeline ranks")
    parser.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step")
    parser.add_argument("--virtual-stages", type=int, default=None,
                        help="stages per rank (default: 2 for zb-v, dualpipev and "
                             "interleaved-1f1b, else 1)")
    parser.add_argument("--costs", default="1,1,1,0",
                        help="forward,input-backward,weight-backward,transfer time per stage")
    parser.add_argument("--record", action="store_true", help="also record a real run on gloo")
    parser.add_argument("--steps", type=int, default=2, help="steps of the recorded run; the "
                                                             "last one is recorded")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config key of the recorded run, such as model.n_embd=128")
    parser.add_argument("--out", help="picture to write, .png or .svg")
    parser.add_argument("--trace", help="Chrome trace JSON to write (the recorded run, or the "
                                        "simulation without --record)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    virtual = args.virtual_stages or (2 if args.schedule in ("zb-v", "dualpipev",
                                                             "interleaved-1f1b") else 1)
    schedule = prepare_schedule(args.schedule, args.pp, args.micro_batches, virtual)
    forward, backward_input, backward_weight, transfer = (float(x) for x in args.costs.split(","))
    costs = Costs.uniform(schedule.num_stages, forward / virtual, backward_input / virtual,
                          backward_weight / virtual, transfer)
    simulated = simulate(schedule, costs)
    print(f"simulated with costs {args.costs}:\n{simulated.summary()}")
    panels = [(f"{schedule.name}, simulated (equal costs)", simulated, "units")]

    if args.record:
        recorded, replay = _record(args, virtual)
        print(f"recorded run:\n{recorded.summary()}")
        print(f"simulator replaying the recorded action times:\n{replay.summary()}")
        print(f"bubble fraction: recorded {recorded.bubble_fraction:.4f}, simulated "
              f"{replay.bubble_fraction:.4f}, difference "
              f"{recorded.bubble_fraction - replay.bubble_fraction:+.4f}")
        panels.append((f"{schedule.name}, recorded on gloo", _in_ms(recorded), "ms"))
        if args.trace:
            write_chrome_trace(args.trace, recorded)
    elif args.trace:
        write_chrome_trace(args.trace, simulated, time_unit_s=1e-3)

    if args.out:
        try:
            draw_timelines(panels, args.out)
        except RuntimeError as error:  # matplotlib is missing
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    return 0


def _record(args, virtual: int):
    from training.config import load_run_config, validate
    from training.recording import record_run

    overrides = dict(RECORD_DEFAULTS)
    overrides.update({"layout.pp": args.pp, "layout.schedule": args.schedule,
                      "layout.micro_batches": args.micro_batches, "layout.virtual_stages": virtual,
                      "train.global_batch": 4 * args.micro_batches})
    for item in args.set:
        key, _, text = item.partition("=")
        overrides[key] = yaml.safe_load(text)
    config = load_run_config(None, overrides)
    validate(config)
    schedule, records = record_run(config, args.steps)
    recorded = recorded_result(schedule, records)
    replay = simulate(schedule, measured_costs(records))
    return recorded, replay


def _in_ms(result):
    from parallel.pipeline.simulate import Interval, SimulationResult

    scale = 1e3
    intervals = [Interval(i.rank, i.action, i.start * scale, i.end * scale) for i in result.intervals]
    return SimulationResult(result.schedule, intervals, [b * scale for b in result.busy],
                            [s * scale for s in result.first_start],
                            [e * scale for e in result.last_end], result.peak_bytes,
                            result.peak_stash)


if __name__ == "__main__":
    sys.exit(main())
