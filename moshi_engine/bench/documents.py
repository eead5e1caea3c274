"""Reading result documents (the benchmark's JSON) and formatting their numbers, for the report and plot.

A document holds what one run measured; a section or per-transport entry that
was not measured carries `skipped` (with the reason) or `error` instead of
numbers, and these helpers turn that into words rather than numbers.
"""

from __future__ import annotations

from .stats import OTHER

STAGE_NAMES = {
    "opus_decode": "Opus decode",
    "mimi_encode": "Mimi encode",
    "lm_step": "LM step",
    "mimi_decode": "Mimi decode",
    "opus_encode": "Opus encode",
    OTHER: "everything else",
}
FRAME_MS = 80.0


def is_gpu(doc: dict) -> bool:
    return (doc.get("engine") or {}).get("device", "").startswith("cuda")


def run_label(doc: dict) -> str:
    """Short name of a run for tables and the plot: model and what it ran on."""
    engine = doc.get("engine") or {}
    model = engine.get("model") or doc["config"]["model"]
    machine = doc["machine"]
    if is_gpu(doc) and machine.get("gpu"):
        where = machine["gpu"]["name"]
    else:
        where = f"CPU ({machine['cpu']}, {machine['cpu_cores']} cores)"
    return f"{model} on {where}"


def measured(doc: dict, name: str) -> dict | None:
    """A section's result, or None when the run did not measure it (skipped, failed, absent)."""
    result = doc["sections"].get(name)
    if not result or "skipped" in result or "error" in result:
        return None
    return result


def transport_runs(doc: dict, name: str) -> list[dict]:
    """The measured per-transport entries of `frame` or `idle`."""
    result = doc["sections"].get(name) or {}
    return [run for run in result.get("runs", []) if "skipped" not in run and "error" not in run]


def selected(doc: dict, name: str) -> bool:
    """Whether the run was asked for this section (`--sections`); a run that was not asked says
    nothing of it in the report."""
    return name in doc["sections"]


def selected_runs(documents: list[dict], name: str) -> list[tuple[int, dict]]:
    """The runs that were asked for section `name`, each with its index among all the report's
    runs (its "run N"): what a section of the report is given."""
    return [(index, doc) for index, doc in enumerate(documents) if selected(doc, name)]


def not_measured(doc: dict, name: str) -> str:
    result = doc["sections"].get(name)
    if result is None:
        return "not selected in this run"
    if "skipped" in result:
        return f"skipped ({result['skipped']})"
    if "error" in result:
        return f"failed ({result['error']})"
    return "not measured"


def transport_name(run: dict) -> str:
    return f"websocket {run['path']}" if run.get("path") else "session (no web stack)"


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def fmt_signed(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{round(value, digits) + 0.0:+.{digits}f}"  # + 0.0 turns -0.0 into 0.0


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def fmt_p(numbers: dict) -> str:
    """"p50 X, p95 Y ms" of a `summarize` result."""
    return f"p50 {fmt_ms(numbers['p50_ms'])}, p95 {fmt_ms(numbers['p95_ms'])} ms"


def kept_up(capacity_result: dict) -> int:
    """The most conversations of a capacity run whose every frame was answered with no growing
    delay, whatever their p95 (0 where levels are judged otherwise, as over WebRTC)."""
    bound = capacity_result["criterion"].get("drift_bound_ms", 0.0)
    return max((level["sessions"] for level in capacity_result["levels"]
                if level.get("answered") is not None and level["answered"] == level["expected"]
                and level["drift_ms"] <= bound), default=0)
