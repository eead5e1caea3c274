"""Real servers on free loopback ports, each in its own thread, for end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import torch
import uvicorn


def _bound_socket(send_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer is not None:  # accepted connections inherit it (and lose autotuning)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serve_asgi(app, send_buffer: int | None = None):
    """Serve an ASGI app with uvicorn; yields its base URL (http://127.0.0.1:PORT).

    `send_buffer` caps the kernel's send buffer of each connection, so that a test
    can fill it with a few hundred kB instead of the megabytes loopback allows.
    """
    sock = _bound_socket(send_buffer)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws_max_size=16 * 1024 * 1024))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def serve_aiohttp(app):
    """Serve an aiohttp Application (moshi's reference server) from a thread with grad off."""
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
