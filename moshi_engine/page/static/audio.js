// The page's side of the audio worklets: the microphone, cut into Moshi frames,
// and the player of Moshi's voice with its bounded queue.

import { FRAME_SIZE, SAMPLE_RATE } from "./opus.js";

/** What the microphone is asked for: the browser's echo canceller keeps Moshi from hearing itself. */
export const MICROPHONE_CONSTRAINTS = {
  audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
};

const WORKLETS = new URL("./worklets/", import.meta.url);
const loaded = new WeakMap(); // AudioContext -> Map(module name -> Promise)

function loadWorklet(context, name) {
  if (!loaded.has(context)) loaded.set(context, new Map());
  const modules = loaded.get(context);
  if (!modules.has(name)) modules.set(name, context.audioWorklet.addModule(new URL(name, WORKLETS)));
  return modules.get(name);
}

/**
 * Plays 24 kHz pcm as it arrives, through worklets/player.js: playback starts
 * once `startMs` are queued; past `maxMs` the oldest audio is dropped down to
 * `keepMs`; when the queue stayed above `slackMs` for `windowMs` of playback, the
 * oldest audio above `slackMs` is dropped. `context` must run at 24 kHz (it may
 * be an OfflineAudioContext).
 */
export class Player {
  static async create(context, { startMs = 80, maxMs = 300, keepMs = 160, slackMs = 40, windowMs = 1000 } = {}) {
    if (context.sampleRate !== SAMPLE_RATE) throw new Error(`the player needs a ${SAMPLE_RATE} Hz AudioContext`);
    await loadWorklet(context, "player.js");
    const node = new AudioWorkletNode(context, "moshi-player", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { startMs, maxMs, keepMs, slackMs, windowMs },
    });
    node.connect(context.destination);
    return new Player(node);
  }

  constructor(node) {
    this.node = node;
    this.onPlaying = null; // (contextTime) => {}: the first sample went out
    this.requests = new Map();
    this.nextId = 0;
    node.port.onmessage = ({ data }) => {
      if (data.type === "stats") {
        this.requests.get(data.id)?.(data.stats);
        this.requests.delete(data.id);
      } else if (data.type === "playing") {
        this.onPlaying?.(data.contextTime);
      }
    };
  }

  /** Queue pcm (Float32Array, 24 kHz mono); the array is handed over to the audio thread. */
  push(pcm) {
    this.node.port.postMessage({ type: "pcm", pcm }, [pcm.buffer]);
  }

  /** The worklet's counters: {framesReceived, samplesReceived, framesPlayed, samplesPlayed,
   * droppedSamples, drops, trims, underruns, queuedSamples, maxQueuedSamples, energy, playing, sampleRate}. */
  stats() {
    const id = this.nextId++;
    return new Promise((resolve) => {
      this.requests.set(id, resolve);
      this.node.port.postMessage({ type: "stats", id });
    });
  }

  reset() {
    this.node.port.postMessage({ type: "reset" });
  }

  close() {
    this.node.disconnect();
    this.node.port.onmessage = null;
  }
}

/**
 * The microphone as 80 ms frames of 24 kHz mono (Float32Array of 1920) through
 * `onFrame`, from worklets/capture.js. `stream` is a MediaStream already opened
 * (else getUserMedia with MICROPHONE_CONSTRAINTS); `context` any AudioContext:
 * at 24 kHz the browser resamples, at another rate the worklet does.
 */
export class Microphone {
  static async open(context, { stream = null, onFrame = null } = {}) {
    const owned = !stream;
    stream = stream ?? (await navigator.mediaDevices.getUserMedia(MICROPHONE_CONSTRAINTS));
    try {
      await loadWorklet(context, "capture.js");
      const source = context.createMediaStreamSource(stream);
      const node = new AudioWorkletNode(context, "moshi-capture", { numberOfInputs: 1, numberOfOutputs: 1 });
      source.connect(node);
      // a node nobody listens to may not be pulled: connect it (it outputs silence)
      node.connect(context.destination);
      return new Microphone(stream, owned, source, node, onFrame);
    } catch (error) {
      if (owned) stream.getTracks().forEach((track) => track.stop());
      throw error;
    }
  }

  constructor(stream, owned, source, node, onFrame) {
    this.stream = stream;
    this.owned = owned;
    this.source = source;
    this.node = node;
    this.onFrame = onFrame; // (Float32Array of FRAME_SIZE) => {}
    this.frames = 0;
    node.port.onmessage = ({ data }) => {
      this.frames++;
      this.onFrame?.(data);
    };
  }

  /** Seconds of audio captured so far. */
  get seconds() {
    return (this.frames * FRAME_SIZE) / SAMPLE_RATE;
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    this.node.port.postMessage("stop");
    this.node.port.onmessage = null;
    this.source.disconnect();
    this.node.disconnect();
    if (this.owned) this.stream.getTracks().forEach((track) => track.stop());
  }
}
