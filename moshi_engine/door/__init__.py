"""The door: who may talk, and who waits for a slot.

- `line`: the waiting line, first come, first served, for conversations that find every
  slot taken (places, timeout, position and estimated wait as the line moves).
- `access`: the access token of a private deployment, and each browser's identity cookie.

The transports and the engine ask the door; it asks nothing of them and knows nothing of
the model: it imports only the package's vocabulary (`conversation`).
"""
