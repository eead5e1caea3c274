"""Real servers on free loopback ports: in a thread (for tests) or in a child process (for measurements).

`serve_asgi` / `serve_aiohttp` run a server in a thread of this process, which
is what end-to-end tests want. The benchmark wants the opposite: a server that
shares no GIL and no CPU accounting with the client measuring it, as a remote
user would see it. `server_process` runs our app or moshi's reference server in
a child process (spawned, so CUDA works there too) and talks to it over a pipe:
its pid (for psutil), and our engine's per-stage timings, which only that
process can read.

The web stack (uvicorn, aiohttp) is imported only inside the functions that
serve, so this module loads on a GPU machine that has none of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import socket
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from ..timings import STAGES

log = logging.getLogger(__name__)

OURS = "ours"
REFERENCE = "reference"
ECHO = "echo"  # the same web stack with no model: the floor under "everything else"


def _bound_socket(send_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer is not None:  # accepted connections inherit it (and lose autotuning)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serve_asgi(app, send_buffer: int | None = None, tls: tuple[Path, Path] | None = None):
    """Serve an ASGI app with uvicorn; yields its base URL (http://127.0.0.1:PORT, or https://
    with `tls`: a certificate and its key).

    `send_buffer` caps the kernel's send buffer of each connection, so that a test
    can fill it with a few hundred kB instead of the megabytes loopback allows.
    """
    import uvicorn

    sock = _bound_socket(send_buffer)
    port = sock.getsockname()[1]
    certfile, keyfile = tls or (None, None)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws_max_size=16 * 1024 * 1024,
                                           ssl_certfile=certfile, ssl_keyfile=keyfile))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    # uvicorn offers no startup event to wait on; this runs once, before anything is measured.
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def serve_aiohttp(app):
    """Serve an aiohttp Application (moshi's reference server) from a thread with grad off."""
    import torch

    sock = _bound_socket()
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        from aiohttp import web

        runner = web.AppRunner(app)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        ready.set()
        await stop.wait()
        await runner.cleanup()

    def run() -> None:
        torch.set_grad_enabled(False)  # moshi's server runs its model inside this loop
        loop.run_until_complete(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("aiohttp did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        sock.close()


def echo_app():
    """An ASGI app on our web stack (Starlette websockets on uvicorn) that answers `/api/chat`
    as Moshi would, with no model: the handshake, then each audio message echoed back at
    once as an audio message, except the first (Moshi answers every frame but the first).
    Its latency is what the websocket round trip alone costs."""
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    from ..wire.protocol import HANDSHAKE, Protocol, audio_message, client_audio

    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_bytes(HANDSHAKE)
        first = True
        try:
            while True:
                ogg = client_audio(Protocol.MOSHI, await ws.receive_bytes())
                if not first:
                    await ws.send_bytes(audio_message(ogg))
                first = False
        except WebSocketDisconnect:
            pass

    return Starlette(routes=[WebSocketRoute(Protocol.MOSHI.path, echo)])


@dataclasses.dataclass
class ServerProcess:
    """A server running in a child process: its kind, base URL, pid, slots and whether the page is mounted."""

    kind: str
    url: str
    pid: int
    sessions: int
    page: bool
    engine_info: dict  # ours: model, device, dtype, parameters; empty for moshi's server
    _conn: Connection
    watching: bool = True  # ours: its metrics and conversation log on, as deployed

    def stage_samples_ms(self) -> dict[str, np.ndarray]:
        """Our engine's recent per-stage durations (ms, oldest first), as `/status` sees them."""
        return {stage: np.asarray(ms, dtype=np.float64) for stage, ms in self._ask("timings").items()}

    def clear_timings(self) -> None:
        self._ask("clear")

    def status(self) -> dict:
        """Our engine's `/status` body, read over the pipe."""
        return self._ask("status")

    def wait_idle(self) -> None:
        """Return once every conversation slot is free.

        A client's close completes when the server echoes the close frame, which can
        be before the server has seen the disconnect and released the slot; a next
        connection made at once could then be refused with 1013. So each measurement
        waits for this first (moshi's server needs no such wait: it queues connections).
        """
        if self.kind == OURS and self._ask("wait_idle"):
            raise RuntimeError("the server still has sessions open 30 s after its clients left")

    def _ask(self, command: str):
        if self.kind != OURS:
            raise ValueError(f"the {self.kind} server keeps no stage timings")
        self._conn.send(command)
        return self._conn.recv()


@contextlib.contextmanager
def server_process(kind: str, model: str, device: str, sessions: int = 1, page: bool = False,
                   queue: int | None = None, start_timeout_s: float = 900.0, model_process: bool = True,
                   watching: bool = True):
    """Run our API (`kind="ours"`, `sessions` conversation slots, and the page with its WebRTC
    route when `page`), moshi's reference server (`kind="reference"`, one conversation at a
    time by design) over `model`, or `echo_app` (`kind="echo"`, no model) in a child process.
    `queue` sets our waiting line's places (None: the engine's default); `model_process=False`
    steps our model in a thread of the server's process instead of a process of its own.
    `watching` is ours as deployed: its metrics observed, and every INFO line about a
    conversation formatted as the app's log would (then dropped: the bench's output keeps to
    warnings); without it, neither (what watching costs is the difference).

    Yields a ServerProcess once the model is loaded, warm and listening on loopback;
    stops the child on exit. The child's stdout goes to /dev/null: moshi's server
    prints a line per text token, which would otherwise flood the benchmark's output.
    """
    if page and not watching:
        raise ValueError("the page's conversations are always watched; compare watching over the API alone")
    context = multiprocessing.get_context("spawn")
    conn, child_conn = context.Pipe()
    process = context.Process(
        target=_serve_in_child,
        # the child's routine INFO lines (every session's end, aiohttp's access log) are noise here
        args=(kind, model, device, sessions, page, queue, model_process, watching, child_conn,
              logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING),
        name=f"bench-{kind}-server",
        daemon=True,
    )
    process.start()
    child_conn.close()
    try:
        if not conn.poll(start_timeout_s):
            raise RuntimeError(f"the {kind} server did not start within {start_timeout_s:.0f} s")
        status, *detail = conn.recv()
        if status != "ready":
            raise RuntimeError(f"the {kind} server failed to start:\n{detail[0]}")
        url, pid, engine_info = detail
        log.info("%s server (%d slot(s)%s) listening at %s, pid %d", kind, sessions, ", page" if page else "",
                 url, pid)
        yield ServerProcess(kind, url, pid, sessions, page, engine_info, conn, watching)
    finally:
        with contextlib.suppress(OSError):
            conn.send("stop")
        process.join(timeout=30)
        if process.is_alive():
            log.warning("the %s server did not stop; terminating it", kind)
            process.terminate()
            process.join(timeout=10)
        conn.close()


def _serve_in_child(kind: str, model: str, device: str, sessions: int, page: bool, queue: int | None,
                    model_process: bool, watching: bool, conn: Connection, level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if watching and kind == OURS:
        _log_as_deployed(level)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    ready = False
    try:
        engine = voices = None
        if kind == OURS:
            from ..engine import load_voices
            from ..wire.server import create_api

            # `model` may list several voices, each with `sessions` slots of its own
            voices = load_voices(model, device=device, sessions=sessions, model_process=model_process,
                                 **({} if queue is None else {"queue": queue}))
            engine = voices.default  # its stage timings and info; status and idleness are every voice's
            if page:
                from ..web import create_app

                serving = serve_asgi(create_app(voices))
            else:
                serving = serve_asgi(create_api(voices, watching=watching))
        elif kind == REFERENCE:
            from ..wire.reference import reference_app

            serving = serve_aiohttp(reference_app(model, device=device))
        elif kind == ECHO:
            serving = serve_asgi(echo_app())
        else:
            raise ValueError(f"unknown server kind {kind!r}")
        with serving as url:
            info = dataclasses.asdict(engine.info) if engine is not None else {}
            conn.send(("ready", url, os.getpid(), info))
            ready = True
            while (command := conn.recv()) != "stop":
                if command == "timings":
                    conn.send({stage: engine.timings.samples_ms(stage).tolist() for stage in STAGES})
                elif command == "clear":
                    engine.timings.clear()
                    conn.send(None)
                elif command == "status":
                    conn.send(voices.status())
                elif command == "wait_idle":
                    # The engine has no event for "all released"; this runs between measurements, never in one.
                    deadline = time.monotonic() + 30
                    while voices.active and time.monotonic() < deadline:
                        time.sleep(0.005)
                    conn.send(voices.active)
        if engine is not None:
            voices.close()
    except EOFError:
        pass  # the benchmark went away; so do we
    except BaseException:
        if not ready:
            conn.send(("failed", traceback.format_exc()))
        raise


def _log_as_deployed(level: int) -> None:
    """INFO lines formatted as the app formats them (`configure_logging`'s text), into /dev/null;
    the child's stderr still gets `level` and above only."""
    from ..watch.logs import TextFormatter

    root = logging.getLogger()
    for handler in root.handlers:
        handler.setLevel(level)
    deployed = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    deployed.setFormatter(TextFormatter())
    root.addHandler(deployed)
    root.setLevel(min(level, logging.INFO))
