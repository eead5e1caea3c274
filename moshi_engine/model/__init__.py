"""The model: where the weights come from and how N conversation slots over them are stepped.

- `checkpoint`: a Hugging Face repo, a checkpoint directory or `tiny` -> moshi's CheckpointInfo;
  `tiny`: the builder of the offline checkpoint in `assets/`.
- `batched`: N slots as the rows of one batched Mimi + LMGen, and the thread that steps them;
  `rowsampling` (each row samples with its own settings and generator) and `cpukernels`
  (cheaper CPU computations of two of Mimi's layers) serve it.
- `loading`: weights on a device, and warm slots over them; `sizing`: how many slots a GPU holds
  (plain arithmetic, no torch: app.py uses it at deploy time).
- `process` and `child`: the same slots stepped in a process of their own, over a pipe.

It knows nothing of sessions, transports or the page: it imports only the package's
vocabulary (`audio`, `conversation`, `timings`). Importing this package imports nothing heavy.
"""
