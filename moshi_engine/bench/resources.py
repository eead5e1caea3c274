"""What the sections share: the run's settings, the speech load, an engine in this process,
servers in child processes, and the CPU accounting of a process.

Loading a model is the slow part of a benchmark, so one engine and one server
of each kind live for the whole run and are only reloaded when a section needs
another number of conversation slots (capacity, batch) or its memory back (a
full-size model on one GPU cannot hold the in-process engine and a server's at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import importlib.util
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from .serve import ECHO, OURS, REFERENCE, ServerProcess, server_process
from .stats import RealTimeCriterion
from .streams import StreamRun, speech_pages

log = logging.getLogger(__name__)

WEB_STACK = ("fastapi", "uvicorn", "websockets")
PAGE_STACK = ("gradio", "fastrtc", "aiortc", "httpx")
BROWSER_STACK = ("playwright",)
REFERENCE_STACK = ("aiohttp", "websockets")


def missing_packages(names: tuple[str, ...]) -> str | None:
    """None if every package imports, else a reason naming the missing ones (for `skipped`)."""
    missing = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):  # a broken or blocked install counts as missing
            missing.append(name)
    return f"not installed here: {', '.join(missing)}" if missing else None


@dataclass(frozen=True)
class BenchConfig:
    """The knobs of one benchmark run (the CLI's flags)."""

    model: str = "tiny"
    device: str = "auto"
    frames: int = 125  # 10 s of speech per stream
    transport: str = "auto"  # capacity: "session" (no web stack), "websocket", "webrtc", a list, or auto
    max_sessions: int = 32  # the capacity ramp stops here
    batch_slots: int = 16  # the engine's slots when comparing stepping policies (batch section)
    idle_s: float = 3.0  # each idle CPU window
    tail_s: float = 2.0  # how long a client waits for the next answer before giving up
    compare_rounds: int = 4  # ours against moshi's server: alternating rounds (small machines are noisy)
    in_process: bool = False  # our server steps its model in a thread of its own process (to compare)
    criterion: RealTimeCriterion = field(default_factory=RealTimeCriterion)
    network_profiles: str = "loopback,wifi,4g,poor,satellite"  # the network section's, comma-separated
    network_holds: str = ""  # profiles to hold a WebRTC call on until the session limit (10 min each)

    def capacity_transports(self) -> tuple[str, ...]:
        """The capacity clients: as asked (comma-separated), or for auto websockets and WebRTC
        where the web stack (and the page's) is installed, else in-process sessions."""
        if self.transport != "auto":
            return tuple(name.strip() for name in self.transport.split(",") if name.strip())
        if missing_packages(WEB_STACK):
            return ("session",)
        return ("websocket",) if missing_packages(PAGE_STACK) else ("websocket", "webrtc")


def cpu_counters(pid: int | None = None, children: bool = True) -> tuple[float, float, int | None]:
    """(wall s, CPU s of all the threads of the process and (with `children`) of its children
    (our server's model process), context switches of all those threads).

    On Linux both come from /proc/PID/task/*: schedstat's run time in nanoseconds
    (psutil's CPU times tick in 10 ms, too coarse for an idle process over a few
    seconds) and the voluntary and involuntary context switches of every thread
    (psutil counts the main thread's only, and servers here run their loops in
    other threads). A loop that polls wakes up hundreds of times a second; one
    that waits, almost never. Elsewhere: psutil's CPU times and no switches.
    """
    import psutil

    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)] if pid is not None and children else [root]
    if not Path(f"/proc/{root.pid}/task/{root.pid}/schedstat").is_file():
        cpu = 0.0
        for process in processes:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                cpu += times.user + times.system
        return time.perf_counter(), cpu, None
    run_ns = switches = 0
    for process in processes:
        with contextlib.suppress(OSError):  # a child may end while we read
            for task in Path(f"/proc/{process.pid}/task").iterdir():
                with contextlib.suppress(OSError, ValueError):  # a thread may end while we read
                    run_ns += int((task / "schedstat").read_text().split()[0])
                    for line in (task / "status").read_text().splitlines():
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            switches += int(line.split()[1])
    return time.perf_counter(), run_ns / 1e9, switches


def cpu_usage(before: tuple, after: tuple) -> dict:
    """CPU % (of one core) and wakeups per second between two `cpu_counters` readings."""
    wall = after[0] - before[0]
    cpu = max(0.0, after[1] - before[1])  # a thread that ended takes its time with it
    usage = {"seconds": round(wall, 2), "cpu_percent": round(100.0 * cpu / wall, 3)}
    usage["wakeups_per_s"] = None if before[2] is None else round((after[2] - before[2]) / wall, 1)
    return usage


def resident_bytes(pid: int, children: bool = True) -> int:
    """The resident memory of process `pid` and (with `children`) of all its children (the model
    processes)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)] if children else [root]:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


def peak_resident_bytes(pid: int) -> int | None:
    """The most resident memory process `pid` has held in its life (Linux's VmHWM; None elsewhere)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def staggered_streams(make_stream: Callable[..., Awaitable], conversations: int,
                      pid: int | None = None) -> tuple[list, dict]:
    """Run `conversations` streams at once, `make_stream(offset_s=...)` each, started
    FRAME_SECONDS / conversations apart as independent users would rather than all on the
    same beat; returns their runs and the CPU of process `pid` (None: this one) meanwhile
    (`cpu_usage`), with its children (a server's model process) and, as `own_cpu_percent`,
    without them (the web server's part: websockets, Opus, sessions, watching)."""
    from ..audio import FRAME_SECONDS

    async def together() -> tuple[list, dict]:
        before, own_before = cpu_counters(pid), cpu_counters(pid, children=False)
        runs = await asyncio.gather(*(make_stream(offset_s=index * FRAME_SECONDS / conversations)
                                      for index in range(conversations)))
        usage = cpu_usage(before, cpu_counters(pid))
        usage["own_cpu_percent"] = cpu_usage(own_before, cpu_counters(pid, children=False))["cpu_percent"]
        return list(runs), usage

    return asyncio.run(together())


class Bench:
    """The shared resources of one run; `close()` stops every server and engine."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self._pages: list[bytes] | None = None
        self._engine = None
        self._weights = None
        self._servers: dict[str, tuple[contextlib.ExitStack, ServerProcess]] = {}
        self._runs: dict[tuple, StreamRun] = {}
        self.engine_info: dict | None = None  # model, device, dtype, parameters, once one loaded

    @property
    def pages(self) -> list[bytes]:
        """The load: `frames` frames of the speech assets as Ogg Opus, one page set per frame."""
        if self._pages is None:
            self._pages = speech_pages(self.config.frames)
        return self._pages

    @property
    def weights(self):
        """The checkpoint loaded once in this process, for every in-process engine of the run
        (a full-size model takes as long to load as a capacity level takes to run)."""
        if self._weights is None:
            from ..model.loading import load_weights

            self.stop_servers()  # their models would share the device's memory with this one
            self._weights = load_weights(self.config.model, self.config.device)
        return self._weights

    def load_engine(self, sessions: int, **options):
        """A new in-process engine with `sessions` slots over `weights`; the caller closes it."""
        from ..engine import load_engine

        self.release_engine()  # the weights serve one engine at a time
        started = time.perf_counter()
        engine = load_engine(sessions=sessions, weights=self.weights, **options)
        self.engine_info = dataclasses.asdict(engine.info)
        log.info("engine with %d slot(s) ready in %.1f s", sessions, time.perf_counter() - started)
        return engine

    def engine(self, sessions: int = 1):
        """An engine in this process with `sessions` conversation slots (rebuilt if it has other)."""
        if self._engine is None or self._engine.capacity != sessions:
            self._engine = self.load_engine(sessions)
        return self._engine

    def release_engine(self, weights: bool = False) -> None:
        """Close the in-process engine (and with `weights`, drop the weights too) and give
        their (GPU) memory back."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
        if weights:
            self._weights = None
        del engine
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def server(self, kind: str, sessions: int = 1, page: bool = False, watching: bool = True) -> ServerProcess:
        """A running server of `kind` (OURS, REFERENCE or ECHO); ours with `sessions` slots, with
        the page (its WebRTC route) mounted when `page`, and its metrics and conversation log on
        unless not `watching` (`serve.server_process`)."""
        if kind in (REFERENCE, ECHO):
            sessions = 1  # moshi's server has one model and serves one connection at a time; echo has none
        held = self._servers.get(kind)
        if held is not None and (held[1].sessions, held[1].page, held[1].watching) != (sessions, page, watching):
            self.stop_server(kind)
            held = None
        if held is None:
            if kind != ECHO:
                self.release_engine(weights=True)
            stack = contextlib.ExitStack()
            process = stack.enter_context(server_process(kind, self.config.model, self.config.device, sessions, page,
                                                         model_process=not self.config.in_process,
                                                         watching=watching or kind != OURS))
            held = self._servers[kind] = (stack, process)
            if kind == OURS:
                self.engine_info = process.engine_info
        return held[1]

    def stop_server(self, kind: str) -> None:
        held = self._servers.pop(kind, None)
        if held is not None:
            held[0].close()

    def stop_servers(self) -> None:
        for kind in list(self._servers):
            self.stop_server(kind)

    def remember(self, key: tuple, run: StreamRun) -> None:
        """Keep a stream's result so that a later section can reuse it rather than rerun it."""
        self._runs[key] = run

    def remembered(self, key: tuple) -> StreamRun | None:
        return self._runs.get(key)

    def close(self) -> None:
        self.stop_servers()
        self.release_engine(weights=True)


__all__ = ["ECHO", "OURS", "REFERENCE", "Bench", "BenchConfig", "cpu_counters", "cpu_usage", "missing_packages",
           "peak_resident_bytes", "resident_bytes", "staggered_streams"]
