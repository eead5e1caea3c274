"""Moshi voice chat engine: everything app.py wires, nothing of Modal.

Leaves first, transports last:

- `audio` (pcm facts), `codec` (Ogg Opus), `protocol` (bytes on the wire),
  `conversation` (outputs, errors, sampling, limits: what every transport drives)
- `checkpoint` (HF repo, directory or `tiny` -> moshi's CheckpointInfo), `tiny` (the
  offline checkpoint's builder), `rowsampling` (LMGen sampling each batch row on its own),
  `model` (N conversation slots as rows of one batched Moshi, and the thread that steps
  them), `modelprocess` (the same slots stepped in a process of their own, over a pipe),
  `session` (a conversation on a leased slot), `engine` (`load_engine`)
- transports: `server` (/status, /ws, /api/chat), `client` (RemoteSession, CLI),
  `rtc` + `ice` + `recording` (the FastRTC handler), `ui` (the Gradio page),
  `web` (the one app factory), `reference` (moshi's own server), `bench`
- `browser` + `static/`: the browser's own Opus websocket client (ES modules, served at
  `/moshi-static`), for pages that talk over `/api/chat` instead of WebRTC
"""
