"""`python -m moshi_engine.bench`: measure, save the JSON, render the report.

    python -m moshi_engine.bench --json cpu.json --report docs/BENCHMARKS.md     # measure here, render
    python -m moshi_engine.bench --model random --device cuda --transport session \\
        --sections frame,idle,capacity --json gpu.json                           # on a GPU machine
    python -m moshi_engine.bench --report docs/BENCHMARKS.md cpu.json gpu.json   # render only
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .resources import BenchConfig
from .runner import SECTIONS, run_benchmark
from .stats import RealTimeCriterion


def _parser() -> argparse.ArgumentParser:
    defaults, criterion = BenchConfig(), RealTimeCriterion()
    parser = argparse.ArgumentParser(
        prog="python -m moshi_engine.bench",
        description="Benchmark Moshi serving: where the 80 ms frame goes, loopback latency, idle CPU, "
        "concurrent sessions in real time, and our server against moshi's reference server. "
        "Given JSON result files, renders the report from them instead of measuring.",
    )
    parser.add_argument("results", nargs="*", type=Path, help="render --report from these JSON files (no measuring)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {','.join(SECTIONS)}")
    parser.add_argument("--model", default=defaults.model, help="tiny, random (full-size, random weights), "
                        "a HF repo id or a checkpoint directory")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--frames", type=int, default=defaults.frames, help="80 ms frames per stream")
    parser.add_argument("--transport", default=defaults.transport,
                        help="capacity clients, comma-separated: session (in process), websocket, webrtc "
                        "(aiortc peers on the page); auto: websocket and webrtc when the web stack is installed, "
                        "else session")
    parser.add_argument("--max-sessions", type=int, default=defaults.max_sessions,
                        help="capacity ramp ceiling, and the largest batch the step-time series tries")
    parser.add_argument("--batch-slots", type=int, default=defaults.batch_slots,
                        help="slots of the engine on which the stepping policies are compared, and the "
                             "conversations of the stepping section")
    parser.add_argument("--idle-seconds", type=float, default=defaults.idle_s, help="each idle CPU window")
    parser.add_argument("--p95-bound-ms", type=float, default=criterion.p95_bound_ms,
                        help="capacity: a level keeps real time while its p95 latency is at most this")
    parser.add_argument("--drift-bound-ms", type=float, default=criterion.drift_bound_ms,
                        help="capacity: ... and its median latency grows by at most this over the run")
    parser.add_argument("--compare-rounds", type=int, default=defaults.compare_rounds,
                        help="ours against moshi's server, and the model process against the thread: rounds "
                             "of both, alternating which goes first")
    parser.add_argument("--in-process", action="store_true",
                        help="our server steps its model in a thread of its own process, not in a process of "
                             "its own (to compare the two)")
    parser.add_argument("--network-profiles", default=defaults.network_profiles,
                        help="the network section's emulated links, comma-separated")
    parser.add_argument("--network-hold", default=defaults.network_holds, metavar="PROFILES",
                        help="the network section also holds a WebRTC call on each of these links until the "
                             "session limit ends it (10 minutes each)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--report", type=Path, help="write the markdown report here (its plot beside it)")
    parser.add_argument("--plot", type=Path, help="the plot's path (default: benchmarks.png beside the report)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    from .report import render_report, summary_lines

    if args.results:
        if not args.report:
            print("error: JSON files given but no --report to render them into", file=sys.stderr)
            return 2
        documents = [json.loads(path.read_text()) for path in args.results]
    else:
        chosen = tuple(name.strip() for name in args.sections.split(",") if name.strip())
        config = BenchConfig(
            model=args.model, device=args.device, frames=args.frames, transport=args.transport,
            max_sessions=args.max_sessions, batch_slots=args.batch_slots, idle_s=args.idle_seconds,
            compare_rounds=args.compare_rounds, in_process=args.in_process,
            network_profiles=args.network_profiles, network_holds=args.network_hold,
            criterion=RealTimeCriterion(args.p95_bound_ms, args.drift_bound_ms),
        )

        def save(document: dict) -> None:
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(document, indent=1) + "\n")

        try:
            document = run_benchmark(config, chosen, on_progress=save)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        save(document)
        print("\n".join(summary_lines(document)))
        documents = [document]
    if args.report:
        plot = render_report(documents, args.report, args.plot)
        print(f"report: {args.report} (plot: {plot})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
