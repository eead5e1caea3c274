"""The same checkpoint in full precision and in 8 bits (its twin made as Kyutai makes its q8
repos), and what a shorter context saves a slot.

- **memory**: the weights' bytes, and one slot's streaming state (counted from its tensors:
  Mimi's buffers, the KV cache, LMGen's delays) at the checkpoint's context and at half of it.
- **step time**: an engine over each model's weights stepping all B rows, for B in
  `batches` (1, 8, 16 on a CPU; 1 to 32 on a GPU), and at the largest B again with every slot's
  window at half the context, in `compare_rounds` rounds that alternate which model goes first,
  so that the machine's drift hits both alike; the rounds pooled.
- **capacity** of each model, ramped as the capacity section ramps: over websockets (each
  model's server), or in-process sessions where the run's capacity goes without the web stack
  (a GPU run); one after the other, minutes apart: the interleaved step times compare the two
  more fairly.

On a CPU the full-precision model is float32 and bitsandbytes' int8 matrix product a plain
float32 one after quantizing each activation row; on a GPU bf16 against cuBLASLt's int8 kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import numpy as np

from ..model.loading import lm_context
from .batch import STEP_BATCHES, _time_steps
from .capacity import capacity
from .resources import WEB_STACK, Bench, missing_packages
from .stats import summarize
from .streams import SPEECH_DIR, SPEECH_FILES

log = logging.getLogger(__name__)

TWINS = {"tiny": "tiny-q8", "random": "random-q8"}  # a model and its 8-bit twin
CPU_BATCHES = (1, 8, 16)


def precision(bench: Bench) -> dict:
    from ..audio import FRAME_SIZE, read_wav
    from ..engine import load_engine
    from ..model.loading import load_weights

    config = bench.config
    twin = TWINS.get(config.model)
    if twin is None:
        return {"skipped": f"no 8-bit twin of {config.model} to compare with (one of {', '.join(TWINS)})"}
    bench.stop_servers()
    bench.release_engine(weights=True)
    models = (config.model, twin)
    weights = {model: load_weights(model, config.device) for model in models}
    on_gpu = weights[config.model].device.type == "cuda"
    batches = [b for b in (STEP_BATCHES if on_gpu else CPU_BATCHES) if b <= config.max_sessions]
    speech = np.concatenate([read_wav(SPEECH_DIR / name) for name in SPEECH_FILES])
    frames = [speech[(i * FRAME_SIZE) % (speech.size - FRAME_SIZE):][:FRAME_SIZE] for i in range(max(batches))]

    memory = {model: _memory(w) for model, w in weights.items()}
    context = memory[config.model]["context"]
    # Every batch at the checkpoint's context, and the largest again at half of it.
    runs = [(batch, context) for batch in batches] + [(max(batches), context // 2)]
    steps: dict[str, dict[tuple[int, int], list[float]]] = {model: {run: [] for run in runs} for model in models}
    rounds = []
    for round_index in range(config.compare_rounds):
        order = list(models) if round_index % 2 == 0 else list(reversed(models))
        for model in order:
            for batch, window in runs:
                here = {"round": round_index + 1, "model": model, "batch": batch, "context": window}
                try:
                    with _window(weights[model].lm, window):
                        engine = load_engine(sessions=batch, weights=weights[model], warmup_frames=2)
                        try:
                            durations = engine.model.run(_time_steps, frames[:batch], list(range(batch)))
                        finally:
                            engine.close()
                except Exception as error:  # a batch that does not fit beside both models: said, not fatal
                    rounds.append({**here, "error": f"{type(error).__name__}: {str(error).splitlines()[-1]}"})
                    continue
                steps[model][batch, window] += durations
                rounds.append({**here, "step": summarize(durations)})
                log.info("precision round %d, %s at batch %d, context %d: step p50 %.1f ms", round_index + 1, model,
                         batch, window, rounds[-1]["step"]["p50_ms"])
    weights.clear()  # the servers below load their own

    # Over websockets where the run's capacity goes over them; in-process sessions where it does
    # not (a GPU machine: a server per level would load 15 GB each time).
    transport = "websocket" if "websocket" in config.capacity_transports() else "session"
    capacities = {}
    for model in models:
        if transport == "websocket" and missing_packages(WEB_STACK):
            capacities[model] = {"skipped": missing_packages(WEB_STACK)}
            continue
        own = Bench(dataclasses.replace(config, model=model))
        try:
            capacities[model] = capacity(own, transport)
        finally:
            own.close()
        log.info("capacity of %s (%s): %d", model, transport, capacities[model]["capacity"])
    return {
        "models": list(models),
        "batches": batches,
        "memory": memory,
        "rounds": rounds,
        # At the checkpoint's context by batch, and the largest batch at half of it.
        "steps": {model: {str(batch): summarize(by_run[batch, context]) for batch in batches if by_run[batch, context]}
                  for model, by_run in steps.items()},
        "half_context": {model: {"context": context // 2, "batch": max(batches),
                                 **({"step": summarize(by_run[runs[-1]])} if by_run[runs[-1]] else {})}
                         for model, by_run in steps.items()},
        "capacity": capacities,
    }


@contextlib.contextmanager
def _window(lm, steps: int):
    """The LM's attention window at `steps` while inside: what `--context` sets at load (a slot's
    KV cache is sized when its state is made, and attention masks by the same number)."""
    context = lm_context(lm)
    for layer in lm.transformer.layers:
        layer.self_attn.context = steps
    try:
        yield
    finally:
        for layer in lm.transformer.layers:
            layer.self_attn.context = context


def _memory(weights) -> dict:
    """Bytes of the weights, and of one slot at the context and at half of it."""
    from ..model.memory import counted_slot_bytes

    lm = weights.lm
    context = lm_context(lm)
    slot = {}
    for steps in (context, context // 2):
        with _window(lm, steps):
            slot[str(steps)] = counted_slot_bytes(weights.mimi, lm)
    held = sum(tensor.numel() * tensor.element_size() for tensor in lm.state_dict().values())
    return {"precision": weights.precision, "lm_bytes": held, "context": context, "slot_bytes": slot}


def precision_section(runs: list[tuple[int, dict]]) -> list[str]:
    """The report's table: each model's memory, its step time by batch (rounds pooled), and its
    capacity over websockets."""
    from .documents import fmt_ms, markdown_table, measured, not_measured

    lines = [
        "## Full precision against 8 bits, and a shorter context",
        "",
        "The run's checkpoint and its 8-bit twin (every Linear layer of the LM int8, as in Kyutai's q8",
        "repos: `tiny-q8` beside `tiny`, `random-q8` beside `random`). Memory is the LM's weights and one",
        "slot's streaming state counted from its tensors (the KV cache is nearly all of it) at the",
        "checkpoint's context and at half of it. Step time: an engine stepping all its rows, at the",
        "checkpoint's context and, at the largest batch, at half of it too, in rounds that alternate which",
        "model goes first, pooled (p50 / p95 ms). Capacity: over websockets, each model's server ramped as",
        "in the capacity section, one after the other.",
        "",
    ]
    rows, notes = [], []
    for index, doc in runs:
        result = measured(doc, "precision")
        if result is None:
            notes.append(f"Run {index + 1}: {not_measured(doc, 'precision')}.")
            continue
        for model in result["models"]:
            memory = result["memory"][model]
            slots = ", ".join(f"{int(steps)} steps: {size / 1024:,.0f} kB"
                              for steps, size in memory["slot_bytes"].items())
            steps = "; ".join(f"{batch}: {fmt_ms(s['p50_ms'])} / {fmt_ms(s['p95_ms'])}"
                              for batch, s in result["steps"][model].items())
            half = result.get("half_context", {}).get(model, {})  # runs before it was measured have none
            if "step" in half:
                steps += (f"; {half['batch']} at {half['context']} steps: "
                          f"{fmt_ms(half['step']['p50_ms'])} / {fmt_ms(half['step']['p95_ms'])}")
            found = result["capacity"].get(model, {})
            capacity_text = (f"{found['capacity']} ({found['transport']})" if "capacity" in found
                             else found.get("skipped", "not measured"))
            rows.append([f"run {index + 1}", f"`{model}` ({memory['precision']})",
                         f"{memory['lm_bytes'] / 1e6:,.2f} MB", slots, steps, capacity_text])
    lines += markdown_table(["run", "model", "LM weights", "one slot", "step by batch, p50 / p95 ms",
                             "conversations in real time"], rows)
    lines += [note for item in notes for note in (item, "")]
    return lines
