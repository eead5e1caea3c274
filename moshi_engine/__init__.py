"""Moshi voice chat engine: everything app.py wires, nothing of Modal.

Five rooms, and a seam at the top (README.md, "The package", has the map):

- `model/`: where the weights come from and how N conversation slots over them are stepped.
- `door/`: who may talk (the access token) and who waits (the line).
- `wire/`: bytes on the network: the Opus websocket protocols, their server and client.
- `page/`: the Gradio/FastRTC page and the browser's own files.
- `watch/`: what is happening: Prometheus metrics and the log, with conversation ids.
- At the top: the vocabulary every room speaks (`audio`: pcm facts, `conversation`: outputs,
  errors, sampling and limits, `timings`: stage timings), a conversation on a leased slot
  (`session`), the engine that leases them (`engine`: `load_engine`), the one app factory
  (`web`), and the command-line client (`client`). `bench/` is the benchmark.
"""
