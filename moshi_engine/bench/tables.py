"""The report's measurement sections in markdown: frame budget, end to end, idle, capacity,
and ours against moshi's server. Each takes every document and says, per run,
what was measured or why not; the method of each measurement is written next
to its numbers.
"""

from __future__ import annotations

from ..timings import STAGES
from .documents import (
    FRAME_MS,
    STAGE_NAMES,
    fmt_ms,
    fmt_p,
    fmt_ratio,
    fmt_signed,
    kept_up,
    markdown_table,
    measured,
    not_measured,
    run_label,
    transport_name,
    transport_runs,
)
from .stats import OTHER


def frame_budget_section(runs: list[tuple[int, dict]]) -> list[str]:
    lines = [
        "## Frame budget",
        "",
        "Each stream sends the speech assets in real time, one 80 ms frame of Ogg Opus at a time, and times",
        "every frame from leaving the client to the first byte of its answer (the answer to frame *i* is",
        "what the step on frame *i* outputs; the first frame's step outputs nothing, so every frame but the",
        "first is answered). The server records",
        "how long each stage took for each frame: Opus decode and encode where the transport runs them,",
        "Mimi encode, LM step and Mimi decode on the model's stepping thread, in the model process",
        "(CUDA-synchronised on a GPU).",
        "",
        "**Everything else** is derived frame by frame: a frame's end-to-end time minus its five stages.",
        "The five series are paired with the end-to-end times from the last frame backwards (the last",
        "answer belongs to the last frame; one Opus decode, Mimi encode and LM step per input frame, one",
        "Mimi decode and Opus encode per answer), on a run of one session whose timings were cleared",
        "before it. Each stage runs strictly inside its frame's interval, so the remainder is never",
        "negative when the pairing is right: the count of frames where it is (beyond 0.05 ms of timer",
        "slack) is reported as a check, and is 0 in every run below unless a row says otherwise. What",
        "remains is queues, thread hand-offs, asyncio scheduling, websocket framing and loopback TCP on both",
        "sides, and the client's wakeup. Percentiles are taken per row, so p50 and p95 rows do not add up;",
        "the mean column does.",
        "",
        "- **session**: the engine in the benchmark's process through `MoshiSession`, with Opus decode",
        "  before and Opus encode after, as the server does them, but no web stack: a frame starts when its",
        "  bytes are handed to the decoder and ends when its answer's Opus bytes are ready to send.",
        "- **websocket /api/chat**: our server (uvicorn) in a child process, the client in the benchmark's",
        "  process: nothing shared but the machine. The **bare websocket echo** row is the same stream",
        "  through the same web stack (Starlette on uvicorn, same client) to an endpoint that echoes each",
        "  frame back at once with no model: the part of \"everything else\" that is the websocket round",
        "  trip itself; the rest is our queues, tasks and thread hand-offs, and the hop to the model",
        "  process and back (a socket pair, a message each way).",
        "",
    ]
    for index, doc in runs:
        entries = transport_runs(doc, "frame")
        skipped = [entry for entry in (doc["sections"].get("frame") or {}).get("runs", []) if entry not in entries]
        if not entries and not skipped:
            lines += [f"### Run {index + 1}: {run_label(doc)}", "", f"Frame budget {not_measured(doc, 'frame')}.", ""]
            continue
        for entry in entries:
            lines += [f"### Run {index + 1}: {run_label(doc)}, {transport_name(entry)}", ""]
            rows = []
            for stage in (*STAGES, OTHER):
                numbers = entry[OTHER] if stage == OTHER else entry["stages"].get(stage)
                if numbers is None:
                    rows.append([STAGE_NAMES[stage], "not on this path", "", "", ""])
                    continue
                rows.append([STAGE_NAMES[stage], fmt_ms(numbers["p50_ms"]), fmt_ms(numbers["p95_ms"]),
                             fmt_ms(numbers["mean_ms"]), f"{100 * numbers['mean_ms'] / FRAME_MS:.1f} %"])
            for name, key in (("**end to end**", "e2e"), ("model (Mimi + LM)", "model"),
                              ("outside the model", "outside_model"), ("bare websocket echo", "websocket_echo")):
                numbers = entry.get(key)
                if numbers is None:
                    continue
                rows.append([name, fmt_ms(numbers["p50_ms"]), fmt_ms(numbers["p95_ms"]), fmt_ms(numbers["mean_ms"]),
                             f"{100 * numbers['mean_ms'] / FRAME_MS:.1f} %"])
            lines += markdown_table(["stage", "p50 ms", "p95 ms", "mean ms", "of 80 ms (mean)"], rows)
            note = f"{entry['frames']} frames"
            if entry["misaligned_frames"]:
                note += f"; {entry['misaligned_frames']} frame(s) failed the pairing check: treat the split with care"
            lines += [note + ".", ""]
        for entry in skipped:
            reason = entry.get("skipped") or entry.get("error")
            lines += [f"Run {index + 1}, {entry.get('transport', '')}: not measured ({reason}).", ""]
    return lines


def end_to_end_section(runs: list[tuple[int, dict]]) -> list[str]:
    rows, notes = [], []
    for index, doc in runs:
        result = measured(doc, "e2e")
        if result is None:
            notes.append(f"Run {index + 1}: {not_measured(doc, 'e2e')}.")
            continue
        for path, numbers in result["paths"].items():
            latency = numbers["latency"]
            rtf = numbers["real_time_factor"]
            rows.append([f"run {index + 1}", f"`{path}`", fmt_ms(latency["p50_ms"]), fmt_ms(latency["p95_ms"]),
                         fmt_ms(latency["max_ms"]), fmt_ms(numbers["time_to_first_audio_ms"]),
                         "–" if rtf is None else f"{rtf:.3f}", f"{numbers['throughput_fps']:.1f}",
                         f"{numbers['answered']}/{numbers['frames'] - 1}"])
    return [
        "## End to end over loopback",
        "",
        "Our server in a child process, a websocket client in the benchmark's process, real speech in real",
        "time. **Latency**: from an input frame leaving the client to the first byte of its answer.",
        "**First audio**: from the first frame leaving to the first byte of the first answer; Moshi answers",
        "from the second frame on, so this includes one frame (80 ms) of waiting for input. **Real-time",
        "factor**: sending the same recording as fast as the server takes it, the wall time until its last",
        "answer over the recording's duration (below 1 is faster than real time); **frames/s** is the same",
        "run's answer rate.",
        "",
        *markdown_table(["run", "path", "p50 ms", "p95 ms", "max ms", "first audio ms", "real-time factor",
                         "frames/s", "answered"], rows),
        *(note for item in notes for note in (item, "")),
    ]


def idle_section(runs: list[tuple[int, dict]]) -> list[str]:
    rows, notes = [], []
    for index, doc in runs:
        entries = transport_runs(doc, "idle")
        if not entries:
            notes.append(f"Run {index + 1}: {not_measured(doc, 'idle')}.")
        for entry in entries:
            base, session = entry["baseline"], entry["session"]
            rows.append([f"run {index + 1}", transport_name(entry), f"{base['cpu_percent']:.3f}",
                         f"{session['cpu_percent']:.3f}", fmt_signed(entry["session_cpu_percent"], 3),
                         f"{_wakeups(base)} → {_wakeups(session)}", f"{session['seconds']:g}"])
    return [
        "## Idle session",
        "",
        "CPU time of the process that runs the model, while nothing happens: first with no session, then",
        "with a session open (on the websocket: connected, handshake received) that is sent nothing.",
        "CPU is summed over all the process's threads from the kernel's per-thread run time; wakeups are",
        "the threads' context switches per second. The baseline of the websocket server includes",
        "uvicorn's own 10 Hz housekeeping tick.",
        "",
        *markdown_table(["run", "transport", "CPU % no session", "CPU % silent session", "difference",
                 "wakeups/s", "window s"], rows),
        *(note for item in notes for note in (item, "")),
    ]


def _wakeups(usage: dict) -> str:
    return "–" if usage.get("wakeups_per_s") is None else f"{usage['wakeups_per_s']:g}"


def batch_section(runs: list[tuple[int, dict]]) -> list[str]:
    lines = [
        "## Batched steps: one model, many conversations",
        "",
        "Every conversation is a slot: a row of one batched Mimi + LMGen, stepped by one thread (here in",
        "the benchmark's own process). **Step",
        "time** is an engine with B slots stepping all B rows (Mimi encode, LM step, Mimi decode and each",
        "row's own sampling) on speech-like input, 40 times; the batch shape is fixed (CUDA graphs need",
        "it), so one row costs about what B rows cost, which the last column shows.",
        "",
        "**Stepping policy**: an engine with N slots and k = 1, N/2, N real-time conversations in one",
        "process (Opus on both sides, as the server does), each at its own phase of the 80 ms frame. *Wait*",
        "is how long a frame sits between arriving whole and its step starting, *frame* the whole frame",
        "(Opus decode to Opus encode). Policy *0 ms* steps as soon as any conversation has a frame ready;",
        "*40 ms* waits up to 40 ms after the first ready frame for the others, for fewer, fuller steps.",
        "",
    ]
    for index, doc in runs:
        result = measured(doc, "batch")
        lines += [f"### Run {index + 1}: {run_label(doc)}", ""]
        if result is None:
            lines += [f"Batched steps {not_measured(doc, 'batch')}.", ""]
            continue
        rows = []
        for entry in result["step_time"]["batches"]:
            if "error" in entry:
                rows.append([entry["batch"], "–", "–", "–", f"did not load: {entry['error']}"])
                continue
            every, one = entry["all_rows"], entry["one_row"]
            rows.append([entry["batch"], fmt_ms(every["p50_ms"]), fmt_ms(every["p95_ms"]),
                         fmt_ms(every["p50_ms"] / entry["batch"]), fmt_ms(one["p50_ms"])])
        lines += markdown_table(["batch B", "step p50 ms", "step p95 ms", "p50 ms per row", "one row stepped, p50 ms"],
                                rows)
        policy = result["policy"]
        rows = [[f"{level['gather_ms']:g} ms", level["conversations"], fmt_p(level["wait"]), fmt_p(level["step"]),
                 fmt_p(level["latency"]), f"{level['rows_per_step']:.1f}", f"{level['answered']}/{level['expected']}",
                 f"{level['cpu_percent']:.0f}"]
                for level in policy["levels"]]
        lines += [f"Stepping policy on {policy['slots']} slots:", ""]
        lines += markdown_table(["policy", "conversations", "wait for a step", "step", "frame", "rows per step",
                                 "answered", "CPU % of a core"], rows)
    return lines


def capacity_section(runs: list[tuple[int, dict]]) -> list[str]:
    lines = [
        "## Capacity",
        "",
        "k real-time clients talk at once, each in its own conversation slot of one model (the server runs",
        "with exactly k slots, as `--sessions k` would), starting 80/k ms apart as independent users would.",
        "k doubles from 1 until a level fails, then the gap to the last level that passed is bisected; the",
        "capacity is the largest k that passed. Server CPU is the server process's (all its threads, and its",
        "model process's), in % of one core, and per conversation; the web server's is its process alone",
        "(websockets or WebRTC, Opus both ways, the loops, the watching: what a GPU container's CPU serves",
        "beside the model's process), with the most memory that process held during the level; the batched",
        "step's wait and fill come from its `/status`.",
        "",
        "- **websocket**: clients of `/api/chat` streaming Ogg Opus. A level **keeps real time** when every",
        "  input frame but the first of every client is answered (a client listens until its tail runs out),",
        "  the p95 latency (frame leaving the client to the first byte of its answer) is within the bound,",
        "  and latency does not grow over the run (median of the last third minus the first third).",
        "- **webrtc**: aiortc peers on the page's WebRTC route (offer through Gradio's component server,",
        "  the page's inputs through its queue, 48 kHz speech as the microphone, paced in real time), as a",
        "  browser's front end does. RTP carries no frame numbers, so a call is judged on its own timeline:",
        "  it must receive audio for the time from its first audio to the end of its microphone, and its",
        "  audio must not fall behind real-time playback over the call. Client and server run on the same",
        "  machine here, so the clients' aiortc work competes with the server's for the cores.",
        "- **session**: sessions of an engine in the benchmark's process (no web stack), judged as websocket.",
        "",
    ]
    for index, doc in runs:
        lines += [f"### Run {index + 1}: {run_label(doc)}", ""]
        entries = transport_runs(doc, "capacity")
        if not entries:
            lines += [f"Capacity {not_measured(doc, 'capacity')}.", ""]
        for entry in (doc["sections"].get("capacity") or {}).get("runs", []):
            if entry not in entries:
                lines += [f"Capacity over {entry['transport']}: {not_measured({'sections': {'c': entry}}, 'c')}.", ""]
        for result in entries:
            lines += capacity_table(result)
    return lines


def capacity_table(result: dict) -> list[str]:
    transport = result["transport"]
    ceiling = ""
    if result["limited_by_ceiling"]:
        ceiling = f" (the ramp stopped at its ceiling of {result['max_sessions']}: there may be room for more)"
    criterion = ", ".join(f"{key} {value:g}" for key, value in result["criterion"].items())
    lines = [f"**{transport}: {result['capacity']} concurrent conversation(s)** kept in real time{ceiling} "
             f"({criterion}).", ""]
    if kept_up(result) > result["capacity"]:
        lines[-2] += (f" Up to {kept_up(result)} the server keeps up (every frame answered, no growing delay);"
                      " past the capacity it is the p95 bound that fails.")
    rows = []
    for level in result["levels"]:
        verdict = "yes" if level["keeps_real_time"] else "no: " + "; ".join(level["failures"])
        if "server_cpu_percent" not in level:
            rows.append([level["sessions"], *("–",) * 7, verdict])
            continue
        batch = level.get("batch") or {}
        wait = batch.get("wait") or {}
        if transport == "webrtc":
            measures = [f"first audio {fmt_ms(level['time_to_first_audio']['p50_ms'])}",
                        f"jitter p95 {fmt_ms(level['lag_jitter']['p95_ms'])}", fmt_signed(level["drift_ms"]),
                        f"{level['received_ratio_min']:.0%}"]
        else:
            latency = level["latency"]
            measures = [fmt_ms(latency["p50_ms"]), fmt_ms(latency["p95_ms"]), fmt_signed(level["drift_ms"]),
                        f"{level['answered']}/{level['expected']}"]
        rows.append([level["sessions"], *measures,
                     f"{level['server_cpu_percent']:.0f} ({level['server_cpu_percent_per_session']:.1f})",
                     _web_share(level), f"{fmt_ms(wait.get('p50_ms'))} / {fmt_ms(wait.get('p95_ms'))}", verdict])
    if transport == "webrtc":
        header = ["calls", "ms to first audio (p50)", "lag jitter", "growth ms", "audio received (least)"]
    else:
        header = ["sessions", "p50 ms", "p95 ms", "growth ms", "answered"]
    return [*lines, *markdown_table([*header, "server CPU % (per conversation)",
                                     "web server: CPU % per conversation, peak MiB", "step wait p50 / p95 ms",
                                     "keeps real time"], rows)]


def _web_share(level: dict) -> str:
    """The web server's own part (its model process left out), where the run measured it."""
    if "web_cpu_percent_per_session" not in level:
        return "–"
    peak = level.get("web_peak_resident_bytes")
    return f"{level['web_cpu_percent_per_session']:.1f}" + (f", {peak / 2**20:,.0f}" if peak else "")


def door_section(runs: list[tuple[int, dict]]) -> list[str]:
    lines = [
        "## The door",
        "",
        "Over `/api/chat` to our server in a child process with one conversation slot. **Refusal**: the",
        "slot is held and the line has no place (`--queue 0`): from a newcomer's websocket opening to its",
        "1013 close. **Back to back**: a client talks briefly, hangs up and reconnects at once, 50 times;",
        "without a line a reconnect can arrive before the server has seen the last hang-up. **Hand-over**:",
        "the slot is held and one client waits in line; from the holder's close completing to the waiting",
        "client's handshake.",
        "",
    ]
    rows = []
    for index, doc in runs:
        result = measured(doc, "door")
        if result is None:
            rows.append([f"run {index + 1}", not_measured(doc, "door"), "", "", ""])
            continue
        with_line, without = result["back_to_back_with_line"], result["back_to_back_without_line"]
        rows.append([f"run {index + 1}", fmt_p(result["refusal"]), f"{with_line['refused']} of {with_line['tries']}",
                     f"{without['refused']} of {without['tries']}", fmt_p(result["hand_over"])])
    return lines + markdown_table(["run", "refusal (line full)", "back-to-back refusals, with the line",
                                   "without a line", "hand-over to the next in line"], rows)


def page_section(runs: list[tuple[int, dict]]) -> list[str]:
    lines = [
        "## The page's two paths",
        "",
        "The voice chat page itself in Chromium (fake microphone, loopback, one slot), once per path:",
        "**webrtc** (`?transport=webrtc`), **websocket** (`?transport=websocket`: Opus in the browser over",
        "`/api/chat`), and **fallback** (an init script keeps every ICE candidate from the peer connection,",
        "as a strict NAT without TURN would: the page gives WebRTC its wait, then switches to the websocket",
        "by itself). *Talk to first audio*: from pressing Talk to Moshi's first audio in the page (WebRTC:",
        "the first inbound audio with energy in `getStats()`; websocket: the first audio decoded). *Drain*:",
        "the page stops feeding its microphone and times from the last input sent to the last answer",
        "received: what was in flight (on WebRTC the input stops mid-frame, so it reads up to 60 ms short).",
        "*Playback buffer*: WebRTC's jitter buffer, or the websocket player's median queue. *Lag* is drain",
        "plus playback buffer, without the audio devices.",
        "",
    ]
    rows = []
    for index, doc in runs:
        result = measured(doc, "page")
        if result is None:
            rows.append([f"run {index + 1}", not_measured(doc, "page"), "", "", "", ""])
            continue
        for path, numbers in result["paths"].items():
            rows.append([f"run {index + 1}", path, fmt_ms(numbers["talk_to_first_audio_ms"]),
                         f"{fmt_ms(numbers['drain_ms']['p50'])} ({len(numbers['drain_ms']['values'])})",
                         fmt_ms(numbers["playout_ms"]), fmt_ms(numbers["lag_ms"])])
    return lines + markdown_table(["run", "path", "Talk to first audio ms", "drain p50 ms (probes)",
                                   "playback buffer ms", "lag ms"], rows)


def compare_section(runs: list[tuple[int, dict]]) -> list[str]:
    lines = [
        "## Side by side with moshi's reference server",
        "",
        "The same tiny checkpoint behind our `/api/chat` and behind moshi's own server (`moshi/server.py`'s",
        "`ServerState.handle_chat` on aiohttp), each in its own child process, driven by the same client",
        "with the same speech: in real time (per-frame latency, pooled over the rounds) and as fast as each",
        "server takes it (throughput, the mean of the rounds). Each round runs both servers back to back,",
        "alternating which goes first. moshi's server runs the model inside its event loop and serves one",
        "connection at a time; ours steps the model in a process of its own (a thread of the server's with",
        "`--in-process`) so that its loop stays free for other connections, which costs a hand-off each",
        "way. moshi's server prints a line per text",
        "token: the benchmark sends its servers' output to /dev/null.",
        "",
    ]
    rows, notes = [], []
    for index, doc in runs:
        result = measured(doc, "compare")
        if result is None:
            notes.append(f"Run {index + 1}: {not_measured(doc, 'compare')}.")
            continue
        ours, reference, ratios = result["ours"], result["reference"], result["ratios"]
        for name, key, ratio in (("latency p50 (ms)", "p50_ms", "latency_p50"),
                                 ("latency p95 (ms)", "p95_ms", "latency_p95")):
            rows.append([f"run {index + 1}", name, fmt_ms(ours["latency"][key]), fmt_ms(reference["latency"][key]),
                         fmt_ratio(ratios[ratio])])
        rows.append([f"run {index + 1}", "throughput (frames/s)", f"{ours['throughput_fps']:.1f}",
                     f"{reference['throughput_fps']:.1f}", fmt_ratio(ratios["throughput"])])
        rows.append([f"run {index + 1}", "rounds, frames answered in real time",
                     f"{ours.get('rounds', 1)}, {ours['answered']}", f"{reference.get('rounds', 1)}, "
                     f"{reference['answered']}", ""])
    lines += markdown_table(["run", "", "ours", "moshi's server", "ours / moshi's"], rows)
    lines += [note for item in notes for note in (item, "")]
    lines += ["For latency a ratio below 1 means ours answers sooner; for throughput above 1 means ours does more.", ""]
    return lines
