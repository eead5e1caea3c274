"""What a second voice costs: the same k real-time conversations on one voice with k slots, and
on two voices with k / 2 slots each, on one machine.

Both voices are the run's checkpoint (`tiny,tiny`: voices `tiny` and `tiny-2`), so that what
differs is only the second voice itself: its own copy of the weights, its own model process
stepping its own batch beside the first one's, not another model's speed. Each setting is our
server in a child process with the clients of `/api/chat?voice=...` taking the voices in turn,
staggered as in the capacity section and judged by the run's real-time criterion; with the
server's CPU (its model processes included) and its resident memory, every process of it summed.
"""

from __future__ import annotations

import functools
import logging

from ..audio import FRAME_SECONDS
from ..wire.protocol import Protocol
from .resources import OURS, Bench, cpu_counters, cpu_usage, resident_bytes
from .sections import websocket_url
from .serve import server_process
from .streams import stream_websocket

log = logging.getLogger(__name__)


def voices(bench: Bench) -> dict:
    import asyncio

    config = bench.config
    conversations = max(2, config.batch_slots - config.batch_slots % 2)
    bench.stop_servers()
    bench.release_engine(weights=True)
    settings = []
    for models, slots in ((config.model, conversations), (f"{config.model},{config.model}", conversations // 2)):
        with server_process(OURS, models, config.device, slots, model_process=not config.in_process) as server:
            status = server.status()
            names = [voice["name"] for voice in status.get("voices", [])] or [status["model"]]
            memory = resident_bytes(server.pid)
            streams = [functools.partial(stream_websocket, websocket_url(server, Protocol.MOSHI.path)
                                         + (f"?voice={names[index % len(names)]}" if len(names) > 1 else ""),
                                         bench.pages, True, tail_s=config.tail_s,
                                         offset_s=index * FRAME_SECONDS / conversations)
                       for index in range(conversations)]

            async def together(streams=streams, pid=server.pid):
                before = cpu_counters(pid)
                runs = await asyncio.gather(*(stream() for stream in streams))
                return list(runs), cpu_usage(before, cpu_counters(pid))

            runs, usage = asyncio.run(together())
            judged = config.criterion.judge(runs)
            settings.append({"voices": names, "slots_per_voice": slots, "conversations": conversations,
                             **judged, "server_cpu_percent": usage["cpu_percent"],
                             "resident_bytes": memory, "resident_bytes_after": resident_bytes(server.pid)})
            log.info("voices %s, %d slot(s) each, %d conversations: p95 %.1f ms, %s", ",".join(names), slots,
                     conversations, judged["latency"]["p95_ms"],
                     "real time" if judged["keeps_real_time"] else "; ".join(judged["failures"]))
    return {"model": config.model, "conversations": conversations, "criterion": config.criterion.describe(),
            "settings": settings}


def voices_section(runs: list[tuple[int, dict]]) -> list[str]:
    """The report's table: one voice against two for the same conversations."""
    from .documents import fmt_ms, markdown_table, measured, not_measured

    lines = [
        "## Two voices on one machine",
        "",
        "The same k real-time conversations over `/api/chat` on one voice with k slots, then on two",
        "voices of the run's checkpoint (`tiny,tiny`) with k / 2 slots each, the clients taking the",
        "voices in turn (`?voice=`). The second voice is a second copy of the weights and a second",
        "model process stepping its own batch: its cost is the memory (resident, every process of the",
        "server summed, loaded and after the run) and the latency of two smaller batches stepped side",
        "by side instead of one. On a GPU, size each voice's slots with `--sessions auto` (README).",
        "",
    ]
    rows, notes = [], []
    for index, doc in runs:
        result = measured(doc, "voices")
        if result is None:
            notes.append(f"Run {index + 1}: {not_measured(doc, 'voices')}.")
            continue
        for setting in result["settings"]:
            latency = setting["latency"]
            rows.append([f"run {index + 1}", ", ".join(f"`{name}`" for name in setting["voices"]),
                         str(setting["slots_per_voice"]), str(setting["conversations"]),
                         f"{fmt_ms(latency['p50_ms'])} / {fmt_ms(latency['p95_ms'])}",
                         "yes" if setting["keeps_real_time"] else "no: " + "; ".join(setting["failures"]),
                         f"{setting['server_cpu_percent']:.0f} %",
                         f"{setting['resident_bytes'] / 2**20:,.0f} / "
                         f"{setting['resident_bytes_after'] / 2**20:,.0f} MiB"])
    lines += markdown_table(["run", "voices", "slots each", "conversations", "latency p50 / p95 ms",
                             "real time", "server CPU", "server memory, loaded / after"], rows)
    lines += [note for item in notes for note in (item, "")]
    return lines
