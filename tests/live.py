"""Real servers on free loopback ports, each in its own thread, for end-to-end tests.

The helpers live in `moshi_engine.bench.serve`, beside the child-process servers
that the benchmark measures, so that tests and benchmark serve the same way.
"""

from moshi_engine.bench.serve import serve_aiohttp, serve_asgi

__all__ = ["serve_aiohttp", "serve_asgi"]
