"""The wire: Moshi's conversations as bytes on the network.

- `protocol`: the bytes of `/ws` (QuiLLMan's) and `/api/chat` (moshi's), close codes, sampling
  on the URL; `codec`: Ogg Opus in and out. Both are leaves: they import nothing of the package
  but its vocabulary.
- `server`: the FastAPI app of `/status`, `/ws` and `/api/chat` over a local engine.
- `remote`: the client (`RemoteSession`, a conversation on a server elsewhere, and `exchange`);
  `relay`: a page's `/api/chat` carried byte for byte to a Moshi elsewhere.
- `reference`: moshi's own reference server, built from a checkpoint as ours is (for the
  interoperability tests and the benchmark).

The wire serves sessions of the engine and asks the door who may enter; it knows nothing
of the page.
"""
