"""Watching the server run: its Prometheus metrics (`metrics`: the families `/metrics` serves,
each conversation counted and timed) and its log (`logs`: every line about a conversation
carries its id; readable text or JSON lines). Below the model: its process logs the same way."""
