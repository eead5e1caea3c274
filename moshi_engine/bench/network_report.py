"""The report's `network` section (bench/network.py's results): a table per run, and its plot
(network.png beside the report): the lag each profile adds over loopback, per path, and what
the browser concealed of Moshi's audio over WebRTC."""

from __future__ import annotations

from pathlib import Path

from .documents import fmt_ms, markdown_table, measured, not_measured
from .network import EVENT_ORDER, PATHS, PROFILE_ORDER

PATH_NAMES = {"webrtc": "WebRTC (Chromium)", "websocket": "websocket (Chromium)", "client": "websocket (our client)"}
PLOT_NAME = "network.png"
CONCEALED_GOAL = 0.03  # on 4g, outside outages


def lag(cell: dict) -> tuple[float | None, float | None]:
    """A path's steady lag, p50 and p95 where measured (the page's WebRTC path: drain + playout only)."""
    if "error" in cell:
        return None, None
    if isinstance(cell.get("lag_ms"), dict):  # our client: per frame
        return cell["lag_ms"]["p50"], cell["lag_ms"]["p95"]
    frames = cell.get("frame_lag_ms") or {}
    p95 = None
    if frames.get("p50") is not None and frames.get("p95") is not None and cell.get("lag_ms") is not None:
        p95 = cell["lag_ms"] + frames["p95"] - frames["p50"]  # the page's lag, with the frames' spread
    return cell.get("lag_ms"), p95


def first_audio(cell: dict) -> float | None:
    return cell.get("talk_to_first_audio_ms", cell.get("first_audio_ms"))


def _event(cell: dict, name: str) -> str:
    event = (cell.get("events") or {}).get(name)
    if event is None:
        return "not tried"
    if not event["survived"]:
        return "**ended**"
    how = "resumed" if event["resumed"] else "recovered"
    back = f", lag back in {event['lag_back_s']:.2f} s" if event.get("lag_back_s") is not None else ""
    return f"yes ({how}{back})"


def network_section(runs: list[tuple[int, dict]]) -> list[str]:
    lines = [
        "## The visitor on the internet",
        "",
        "`python app.py --model tiny --min-step-ms 65` (each step as long as a real Moshi's at a full",
        "batch) in one network namespace, the visitor in another, joined by the project's emulated link",
        "(`moshi_engine/bench/netem.py`): **wifi** 5±2 ms each way, 0.1% loss; **4g** 40±10 ms, 1%;",
        "**poor** 150±40 ms, 3%; **satellite** 300±20 ms, 0.5%; **loopback** the baseline. Paths: the page",
        "over WebRTC and over its websocket in Chromium, and our websocket client. *First audio*: from",
        "Talk (the page) or from the first frame sent (the client). *Lag*: the page's drain plus playback",
        "buffer (`page` section), the client's per frame; p95 where measured. *Added*: over loopback's.",
        "*Concealed*: what Chromium's decoder made up of Moshi's audio over WebRTC (`getStats()`), in the",
        "steady window. Then, on the same conversation: a 3 s outage, a 10 s outage and a handover (the",
        "visitor's address changes), each survived or not, and how soon the server saw the lag back to",
        "normal after it (`moshi_lag_recovery_seconds`). Each page visitor is a Chromium of its own:",
        "one Chromium follows the first change of its interface's address but not a second (its next",
        "connection still gathers the old address), so one browser for every row failed each WebRTC",
        "handover after the first.",
        "",
    ]
    notes = []
    for index, doc in runs:
        result = measured(doc, "network")
        if result is None:
            notes.append(f"Run {index + 1}: {not_measured(doc, 'network')}.")
            continue
        profiles = result["profiles"]
        base = profiles.get("loopback", {})
        rows = []
        for profile in [p for p in PROFILE_ORDER if p in profiles] + [p for p in profiles if p not in PROFILE_ORDER]:
            for path in [p for p in PATHS if p in profiles[profile]]:
                cell = profiles[profile][path]
                if "error" in cell:
                    rows.append([profile, PATH_NAMES.get(path, path), f"failed: {cell['error']}", "", "", "", "", "",
                                 ""])
                    continue
                p50, p95 = lag(cell)
                base_p50 = lag(base[path])[0] if path in base else None
                added = fmt_ms(p50 - base_p50) if p50 is not None and base_p50 is not None and profile != "loopback" \
                    else ""
                concealed = cell.get("concealed_share")
                rows.append([profile, PATH_NAMES.get(path, path), fmt_ms(first_audio(cell)),
                             f"{fmt_ms(p50)} / {fmt_ms(p95)}", added,
                             f"{100 * concealed:.1f} %" if concealed is not None else "",
                             *[_event(cell, name) for name in EVENT_ORDER]])
        if rows:
            lines += [f"Run {index + 1}, the model stepping at least {result.get('min_step_ms', 0):g} ms:", ""]
            lines += markdown_table(["profile", "path", "first audio ms", "lag p50 / p95 ms", "added ms",
                                     "concealed", "3 s outage", "10 s outage", "handover"], rows)
            lines += ["", f"![lag added and audio concealed by profile]({PLOT_NAME})", ""]
        if result.get("holds"):
            lines += _holds(index, result["holds"])
    return lines + ([*notes, ""] if notes else [])


def _holds(index: int, holds: dict) -> list[str]:
    """Calls kept talking until the server ended them: the session limit, if the link held."""
    rows = []
    for profile, held in holds.items():
        if "error" in held:
            rows.append([profile, f"failed: {held['error']}", "", "", ""])
            continue
        concealed = held.get("concealed_share")
        rows.append([profile, f"{held['held_s']:.0f} s", ", ".join(held["ended_by"] or ["not by the server"]),
                     f"{held['interruptions']:g}", f"{100 * concealed:.1f} %" if concealed is not None else ""])
    return [f"Run {index + 1}: a WebRTC call kept talking until the server ended it (its session limit is",
            "600 s): how long it was live in the browser, what ended it, the interruptions the server saw, and",
            "what Chromium concealed of Moshi's audio over the call.", "",
            *markdown_table(["profile", "live", "ended by", "interruptions", "concealed"], rows), ""]


def draw_network_plot(documents: list[dict], path: Path) -> bool:
    """network.png for the last document that measured the section's profiles; False if none did."""
    results = [measured(doc, "network") for doc in documents]
    results = [result for result in results if result is not None and result.get("profiles")]  # not a hold alone
    if not results:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = results[-1]["profiles"]
    names = [p for p in PROFILE_ORDER if p in profiles]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(PATHS)
    for offset, route in enumerate(PATHS):
        values = [lag(profiles[name].get(route, {"error": ""}))[0] for name in names]
        xs = [i + (offset - (len(PATHS) - 1) / 2) * width for i in range(len(names))]
        left.bar(xs, [v if v is not None else 0 for v in values], width, label=PATH_NAMES[route])
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("steady lag p50, ms")
    left.set_title("Moshi's answers, behind each link (the model steps 65 ms)")
    left.legend(fontsize=8)
    shares = [profiles[name].get("webrtc", {}).get("concealed_share") for name in names]
    right.bar(names, [100 * s if s is not None else 0 for s in shares], color="#fc8d62")
    right.axhline(100 * CONCEALED_GOAL, color="#444444", linestyle="--", linewidth=1, label="goal on 4g: 3 %")
    right.set_ylabel("% of Moshi's audio concealed")
    right.set_title("WebRTC: concealed in Chromium")
    right.legend(fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True
