"""The report's figure: the frame budget, the capacity ramp, and ours against moshi's server.

Drawn with matplotlib's Agg backend (no display needed) from the same documents
as the markdown; a panel whose numbers no run measured says so instead.
"""

from __future__ import annotations

from pathlib import Path

from ..timings import STAGES
from .documents import FRAME_MS, STAGE_NAMES, is_gpu, measured, transport_runs
from .stats import OTHER

GPU_FRAME_TARGET_MS = 40.0  # the full-size frame on an H100
COLORS = {"opus_decode": "#8da0cb", "mimi_encode": "#66c2a5", "lm_step": "#fc8d62", "mimi_decode": "#a6d854",
          "opus_encode": "#e78ac3", OTHER: "#b3b3b3"}


def draw_plot(documents: list[dict], path: Path, labels: list[str]) -> None:
    """Write a PNG of three panels for `documents` (run i is labelled `labels[i]`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1.5, 1, 1]})
    _frame_panel(axes[0], documents)
    _capacity_panel(axes[1], documents, labels)
    _compare_panel(axes[2], documents)
    figure.suptitle("Moshi serving benchmark: " + "; ".join(f"run {i + 1} = {label}" for i, label in enumerate(labels)),
                    fontsize=10)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _empty(ax, title: str, why: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


def _frame_panel(ax, documents: list[dict]) -> None:
    title = "Where the 80 ms frame goes (mean per frame)"
    bars = []
    for index, doc in enumerate(documents):
        for entry in (doc["sections"].get("frame") or {}).get("runs", []):
            if "stages" in entry:
                where = f"websocket {entry['path']}" if entry.get("path") else "session"
                bars.append((f"run {index + 1}\n{where}", entry))
    if not bars:
        _empty(ax, title, "frame budget not measured")
        return
    for row, (_, entry) in enumerate(bars):
        left = 0.0
        for stage in (*STAGES, OTHER):
            numbers = entry[OTHER] if stage == OTHER else entry["stages"].get(stage)
            if numbers is None:
                continue
            width = numbers["mean_ms"]
            ax.barh(row, width, left=left, color=COLORS[stage], edgecolor="white",
                    label=STAGE_NAMES[stage] if row == 0 else None)
            left += width
        ax.text(left + 0.5, row, f"{left:.1f} ms", va="center", fontsize=8)
    lines = [(FRAME_MS, "80 ms: one frame", "--")]
    if any(is_gpu(doc) for doc in documents):
        lines.append((GPU_FRAME_TARGET_MS, "40 ms: GPU target", ":"))
    for x, text, style in lines:
        ax.axvline(x, color="#d62728", linestyle=style, linewidth=1)
        ax.text(x, 1.0, text, color="#d62728", fontsize=8, ha="center", va="bottom",
                transform=ax.get_xaxis_transform())
    ax.set_yticks(range(len(bars)), [name for name, _ in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, FRAME_MS * 1.15)
    ax.set_xlabel("ms")
    ax.set_title(title, pad=16)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=6, frameon=False)


def _capacity_panel(ax, documents: list[dict], labels: list[str]) -> None:
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator

    title = "Concurrent real-time conversations"
    drawn = False
    bound = None
    tried: set[int] = set()
    for index, doc in enumerate(documents):
        for result in transport_runs(doc, "capacity"):
            # frame latency exists where frames can be paired with answers (not over WebRTC)
            levels = [level for level in result["levels"] if level.get("latency")]
            if not levels:
                continue
            bound = result["criterion"]["p95_bound_ms"]
            xs = [level["sessions"] for level in levels]
            tried.update(xs)
            ys = [max(level["latency"]["p95_ms"], 0.1) for level in levels]
            label = f"run {index + 1}, {result['transport']} (capacity {result['capacity']})"
            _capacity_line(ax, xs, ys, levels, label)
            drawn = True
    if not drawn:
        _empty(ax, title, "capacity not measured")
        return
    ax.axhline(bound, color="#d62728", linestyle="--", linewidth=1)
    ax.text(0.01, bound, f" p95 bound {bound:g} ms", color="#d62728", fontsize=8, va="bottom",
            transform=ax.get_yaxis_transform())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    # the ramp's powers of two (and the top level tried): the bisected levels in between would overlap
    ticks = {k for k in tried if k & (k - 1) == 0} | {max(tried)}
    ax.xaxis.set_major_locator(FixedLocator(sorted(ticks)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%d"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("concurrent conversations (filled: kept real time)")
    ax.set_ylabel("p95 latency, ms")
    ax.set_title(title)
    ax.legend(fontsize=8)


def _capacity_line(ax, xs: list[int], ys: list[float], levels: list[dict], label: str) -> None:
    line, = ax.plot(xs, ys, linestyle=":", linewidth=1, label=label)
    for x, y, level in zip(xs, ys, levels, strict=True):
        ax.plot(x, y, "o", color=line.get_color(), markerfacecolor=line.get_color() if level["keeps_real_time"]
                else "white")


def _compare_panel(ax, documents: list[dict]) -> None:
    """Per metric, each run's ours / moshi's server (1 = as fast), a bar per run."""
    title = "Ours vs moshi's server, same checkpoint"
    groups = []
    for index, doc in enumerate(documents):
        result = measured(doc, "compare")
        if result:
            groups.append((index, result))
    if not groups:
        _empty(ax, title, "comparison not measured")
        return
    metrics = (("latency p50", lambda r: r["latency"]["p50_ms"]),
               ("latency p95", lambda r: r["latency"]["p95_ms"]),
               ("throughput", lambda r: r["throughput_fps"]))
    width = 0.8 / len(groups)
    top = 1.0
    for slot, (index, result) in enumerate(groups):
        xs, ratios = [], []
        for position, (_, value) in enumerate(metrics):
            reference = value(result["reference"])
            xs.append(position + (slot - (len(groups) - 1) / 2) * width)
            ratios.append(value(result["ours"]) / reference if reference else 0.0)
        ax.bar(xs, ratios, width * 0.9, color=f"C{index}", label=f"run {index + 1}")
        top = max(top, *ratios)
        for x, ratio in zip(xs, ratios, strict=True):
            ax.text(x, ratio, f"{ratio:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="#333333", linewidth=0.8)
    ax.set_ylim(0, top * 1.3)
    ax.set_xticks(range(len(metrics)), [name for name, _ in metrics], fontsize=8)
    ax.set_ylabel("ours / moshi's server (1: the same)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", ncol=len(groups), frameon=False)
