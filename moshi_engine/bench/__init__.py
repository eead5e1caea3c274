"""The benchmark: `python -m moshi_engine.bench` (see `__main__.py` for the command lines).

- `streams`: the load, real speech as Opus pages, streamed through an in-process
  session or a loopback websocket, timed per frame.
- `stats`: percentiles, the per-frame budget, the real-time criterion.
- `serve`: servers on loopback, in a thread (tests) or a child process (measurements).
- `resources`: the run's settings and the engine and servers its sections share.
- `sections`, `capacity`: the measurements; `runner`: one run of them, as JSON.
- `report`, `tables`, `plot`, `documents`: docs/BENCHMARKS.md and its figure from
  one or more runs' JSON.

Nothing here is imported by the serving code; the web stack is imported only by
the parts that serve or talk websockets, so the session measurements run on a
GPU machine that has none of it.
"""
