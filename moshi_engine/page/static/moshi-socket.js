// A conversation with Moshi over the server's /api/chat websocket, from the browser:
// microphone -> Opus -> websocket -> Opus -> speaker, plus Moshi's words.
//
//   const socket = new MoshiSocket({ sampling: { seed: 42 }, onText: (piece) => ..., onClose: (code, reason) => ... });
//   await socket.start();   // from a click: asks for the microphone, connects
//   ...
//   await socket.stop();
//
// The protocol (moshi's, README "The Opus websocket server"): the server sends
// 0x00 when the conversation is ready; then the client sends 0x01 + Ogg Opus,
// and the server 0x01 + Ogg Opus and 0x02 + UTF-8 text. While a server with a
// waiting line (`?queue=1`) holds the client, it sends 0x04 + JSON metadata such
// as {"queue": {"position": 2, "waiting": 3, "eta_s": 180}}. Sampling parameters
// ride on the URL query.
//
// When the server tells the conversation's resume token (metadata {"conversation": {"resume":
// ...}}), a connection that drops or goes quiet for RECONNECT_AFTER_MS (an outage, a new
// address) is taken up again: state "reconnecting", new websockets with ?resume=TOKEN until
// one is greeted with the handshake (the same conversation, in its slot), for RESUME_FOR_MS
// at most; the server's refusal or its grace ends it. What the microphone hears meanwhile is
// not sent: it would be stale by the time it arrived.

import { Microphone, MICROPHONE_CONSTRAINTS, Player } from "./audio.js";
import { chooseBackend, createDecoder, createEncoder, FRAME_SIZE, SAMPLE_RATE } from "./opus.js";

export const KIND = Object.freeze({
  HANDSHAKE: 0,
  AUDIO: 1,
  TEXT: 2,
  CONTROL: 3,
  METADATA: 4,
  ERROR: 5, // moshi's Rust server: a message for the user
  PING: 6,
  COLORED_TEXT: 7, // moshi's Rust server: a color byte, then text
});

export const SAMPLING_KEYS = ["seed", "temp", "top_k", "temp_text", "top_k_text"];
const MAX_LAGS = 500;
const STATS_TIMEOUT_MS = 500;
// A live conversation hears from the server every 80 ms: this long without a word, the link is down.
const RECONNECT_AFTER_MS = 2500;
const RESUME_FOR_MS = 20000; // the server's grace decides (15 s by default); this bounds the trying
const RESUME_ATTEMPT_MS = 1000; // each try's own time, at least (three times the first connect's)
const WATCH_EVERY_MS = 250;
const RECONNECTING = 4000; // close code of a connection given up for another (protocol.py CloseCode)

/**
 * The websocket URL of a server's /api/chat: `server` is a ws(s):// or http(s)://
 * URL (a bare origin means its /api/chat), or nothing for this page's own server.
 * Set `sampling` keys ride on the query, `queue` adds queue=1, and `voice` picks one of the server's voices.
 */
export function chatUrl(server = null, { sampling = {}, queue = false, voice = null } = {}) {
  const url = new URL(server ?? "/api/chat", location.href);
  if (url.protocol === "http:") url.protocol = "ws:";
  if (url.protocol === "https:") url.protocol = "wss:";
  if (url.pathname === "/" || url.pathname === "") url.pathname = "/api/chat";
  for (const key of SAMPLING_KEYS) {
    const value = sampling[key];
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, String(value));
  }
  if (queue) url.searchParams.set("queue", "1");
  if (voice) url.searchParams.set("voice", voice);
  return url.href;
}

/** A sentence for the user about a close code of /api/chat (README's table). */
export function describeClose(code, reason = "") {
  const why = reason ? ` (${reason})` : "";
  switch (code) {
    case 1000:
      return `The conversation ended${why}.`;
    case 1001:
      return "The server is shutting down; try again in a minute.";
    case 1003:
    case 1007:
    case 1009:
      return `The server could not understand this page's audio${why}. Reload the page and try again.`;
    case 1008:
      return `The server ended the conversation${why}.`;
    case 1011:
      return `Moshi failed${why}. Try again.`;
    case 1012:
      return `Moshi is restarting${why}. Try again in a minute.`;
    case 1013:
      return `Moshi is busy${why}. Try again in a moment.`;
    default:
      return `The connection to Moshi was lost (code ${code}${reason ? `, ${reason}` : ""}).`;
  }
}

/** A close reason fits 123 bytes of UTF-8, or close() throws. */
function closeReason(text) {
  const encoder = new TextEncoder();
  while (encoder.encode(text).length > 123) text = text.slice(0, -1);
  return text;
}

function percentiles(values) {
  if (!values.length) return { p50: null, p95: null, mean: null, count: 0 };
  const sorted = [...values].sort((a, b) => a - b);
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  return { p50: at(0.5), p95: at(0.95), mean: values.reduce((a, b) => a + b, 0) / values.length, count: values.length };
}

function withTimeout(promise, ms) {
  return Promise.race([promise, new Promise((resolve) => setTimeout(() => resolve(null), ms))]);
}

/**
 * One conversation over /api/chat. Options:
 * - `url`: the websocket URL (default: chatUrl(server, {sampling, queue}))
 * - `server`, `sampling` ({seed, temp, top_k, temp_text, top_k_text}), `queue` (bool)
 * - `codec`: "auto" (WebCodecs where the browser has it, else WASM), "webcodecs" or "wasm"
 * - `player`: {startMs, maxMs, keepMs, slackMs, windowMs} of the playback queue (audio.js Player)
 * - `stream`: a microphone MediaStream the page already holds (else getUserMedia)
 * - `context`: a 24 kHz AudioContext to play through, created during a click (browsers let
 *   only those start); the socket closes it when it ends. Else the socket makes its own.
 * - callbacks, also settable as properties: onReady(), onText(piece), onAudio(pcm),
 *   onMicrophone(pcm) (each 80 ms frame sent to Moshi), onQueue(info), onMetadata(object),
 *   onError(error), onState(state), onClose(code, reason)
 *
 * States: idle -> starting -> connecting -> (queued) -> live (<-> reconnecting) -> closing -> closed.
 * onClose is called once, after everything is released, when a socket was opened.
 */
export class MoshiSocket {
  constructor(options = {}) {
    this.options = { codec: "auto", player: {}, ...options };
    this.url = options.url ?? chatUrl(options.server ?? null, options);
    for (const name of ["onReady", "onText", "onAudio", "onMicrophone", "onQueue", "onMetadata", "onError", "onState",
      "onClose"]) {
      this[name] = options[name] ?? null;
    }
    this.state = "idle";
    this.backend = null; // "webcodecs" or "wasm", once started
    this.closeCode = null;
    this.closeReason = null;
    this.counters = { audioMessages: 0, textPieces: 0, sentSamples: 0, decodedSamples: 0 };
    this.times = { ready: null, firstSent: null, firstAudio: null, firstPlayed: null };
    this.frameSentAt = new Map(); // input frame index -> when its last byte was sent
    this.lags = []; // ms from an input frame sent to Moshi's answer to it decoded
    this.resumeToken = null; // what takes this conversation up on a new connection, once told
    this.resumes = 0; // times it was taken up again
    this.interruptions = 0; // times its connection was lost
    this.lastHeard = null; // when the server's last message came
    this.answerOffset = 1; // output frame j answers input frame j + answerOffset (moves at a resume)
    this.finalPlayerStats = null;
  }

  /** Ask for the microphone, load the codec, connect. Call it from a user gesture. */
  async start() {
    if (this.state !== "idle") throw new Error("a MoshiSocket starts once; make a new one");
    this.#setState("starting");
    // Created before anything is awaited, so that the click that called start lets it play.
    this.context = this.options.context ?? new AudioContext({ sampleRate: SAMPLE_RATE, latencyHint: "interactive" });
    try {
      this.backend = await chooseBackend(this.options.codec);
      this.ownStream = !this.options.stream;
      this.stream = this.options.stream ?? (await navigator.mediaDevices.getUserMedia(MICROPHONE_CONSTRAINTS));
      this.player = await Player.create(this.context, this.options.player);
      this.player.onPlaying = () => {
        this.times.firstPlayed ??= performance.now();
      };
      this.microphone = await this.#openMicrophone();
      const onError = (error) => this.#fail(error);
      this.encoder = await createEncoder(this.backend, { onPage: (ogg, samples) => this.#send(ogg, samples), onError });
      this.decoder = await createDecoder(this.backend, { onPcm: (pcm) => this.#play(pcm), onError });
      await this.context.resume();
    } catch (error) {
      await this.#release();
      this.#setState("closed");
      throw error;
    }
    if (this.state !== "starting") return; // stop() was called meanwhile
    this.#setState("connecting");
    this.connectStartedAt = performance.now();
    this.#use(new WebSocket(this.url));
    this.watchdog = setInterval(() => this.#watch(), WATCH_EVERY_MS);
  }

  #use(ws) {
    this.ws = ws;
    ws.binaryType = "arraybuffer";
    ws.onmessage = (event) => {
      if (this.ws !== ws) return;
      this.lastHeard = performance.now();
      this.#receive(event.data);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      // Dropped without a close frame (1006) while talking: the network, not the server.
      if (event.code === 1006 && this.resumeToken && (this.state === "live" || this.state === "reconnecting")) {
        this.#interrupted();
      } else {
        this.#closed(event.code, event.reason);
      }
    };
  }

  /** Let go of `ws`: 4000 says the conversation goes on elsewhere (its slot is kept), 1000 that it ends. */
  #forget(ws, code = RECONNECTING, reason = "reconnecting") {
    ws.onmessage = ws.onclose = ws.onopen = null;
    if (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN) ws.close(code, reason);
  }

  #watch() {
    const now = performance.now();
    if (this.state === "live" && this.resumeToken && this.lastHeard !== null && now - this.lastHeard > RECONNECT_AFTER_MS) {
      this.#interrupted();
    } else if (this.state === "reconnecting") {
      if (now - this.interruptedAt > RESUME_FOR_MS) {
        this.#forget(this.ws);
        this.#closed(1006, "connection lost");
      } else if (now - this.attemptStartedAt > this.attemptMs) {
        this.#attempt(); // this try found no way through: a new one
      }
    }
  }

  /** The connection is lost: try to take the conversation up again on new ones. */
  #interrupted() {
    if (this.state !== "reconnecting") {
      this.interruptions++;
      this.interruptedAt = performance.now();
      this.attemptMs = Math.max(RESUME_ATTEMPT_MS, 3 * (this.times.ready - this.connectStartedAt || 0));
      this.#setState("reconnecting");
    }
    this.#attempt();
  }

  #attempt() {
    this.#forget(this.ws);
    const url = new URL(this.url);
    url.searchParams.set("resume", this.resumeToken);
    url.searchParams.set("queue", "1");
    this.attemptStartedAt = performance.now();
    this.#use(new WebSocket(url.href));
  }

  /** A new connection took the conversation up: new Ogg streams both ways. */
  async #resumed() {
    this.resumes++;
    const onError = (error) => this.#fail(error);
    this.encoder?.close();
    this.decoder?.close();
    this.encoder = await createEncoder(this.backend, { onPage: (ogg, samples) => this.#send(ogg, samples), onError });
    this.decoder = await createDecoder(this.backend, { onPcm: (pcm) => this.#play(pcm), onError });
    // What was in flight is gone both ways: the next answer is to the next frame sent.
    const sent = Math.floor(this.counters.sentSamples / FRAME_SIZE);
    const decoded = Math.floor(this.counters.decodedSamples / FRAME_SIZE);
    this.answerOffset = sent - decoded + 1;
    this.frameSentAt.clear();
    if (this.state === "reconnecting") this.#setState("live");
  }

  /** End the conversation (the server frees its slot) and release the microphone and audio. */
  async stop(reason = "stopped by the user") {
    if (this.state === "closed" || this.state === "closing") return;
    const ws = this.ws;
    const reconnecting = this.state === "reconnecting";
    this.#setState("closing");
    if (reconnecting) {
      this.#forget(ws, 1000, closeReason(reason)); // a try under way hears the close; else the server's grace frees the slot
      await this.#closed(1000, reason);
      return;
    }
    if (!ws) {
      await this.#release();
      this.#setState("closed");
      return;
    }
    this.microphone?.close(); // no more audio while the close handshake runs
    if (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN) ws.close(1000, closeReason(reason));
    await new Promise((resolve) => {
      if (this.state === "closed") resolve();
      else this.stopped = resolve;
    });
  }

  /** Counters and timings: what was sent and received, lag, and the player's counters. */
  async stats() {
    const player = this.player && this.state !== "closed" ? await withTimeout(this.player.stats(), STATS_TIMEOUT_MS) : null;
    const c = this.counters;
    const since = (t) => (t !== null && this.times.firstSent !== null ? t - this.times.firstSent : null);
    return {
      state: this.state,
      backend: this.backend,
      url: this.url,
      closeCode: this.closeCode,
      closeReason: this.closeReason,
      framesCaptured: this.microphone?.frames ?? 0,
      framesSent: c.sentSamples / FRAME_SIZE,
      secondsSent: c.sentSamples / SAMPLE_RATE,
      audioMessages: c.audioMessages,
      textPieces: c.textPieces,
      secondsDecoded: c.decodedSamples / SAMPLE_RATE,
      firstAudioMs: since(this.times.firstAudio), // first mic frame sent -> Moshi's first audio decoded
      firstPlayedMs: since(this.times.firstPlayed), // ... -> its first sample handed to the speaker
      lagMs: percentiles(this.lags), // an input frame sent -> Moshi's answer to it decoded
      interruptions: this.interruptions, // times the connection was lost
      resumes: this.resumes, // ... and taken up again on a new one
      player: player ?? this.finalPlayerStats,
    };
  }

  #setState(state) {
    this.state = state;
    this.onState?.(state);
  }

  async #openMicrophone() {
    const onFrame = (pcm) => this.#frame(pcm);
    try {
      return await Microphone.open(this.context, { stream: this.stream, onFrame });
    } catch (error) {
      // Some browsers (Firefox) refuse to connect a microphone to a context at another
      // rate than the device's: capture at the device's rate, the worklet resamples.
      console.warn("capturing at the device's rate:", error);
      this.captureContext = new AudioContext();
      return await Microphone.open(this.captureContext, { stream: this.stream, onFrame });
    }
  }

  #frame(pcm) {
    // Frames captured before the handshake (or while queued) are not Moshi's to hear.
    if (this.state !== "live") return;
    this.onMicrophone?.(pcm); // before encoding: the WASM encoder takes the buffer away
    this.encoder.encode(pcm);
  }

  #send(ogg, samples) {
    if (this.ws?.readyState !== WebSocket.OPEN) return;
    const message = new Uint8Array(1 + ogg.length);
    message[0] = KIND.AUDIO;
    message.set(ogg, 1);
    this.ws.send(message);
    const now = performance.now();
    const c = this.counters;
    const before = Math.floor(c.sentSamples / FRAME_SIZE);
    c.sentSamples += samples;
    for (let frame = before; frame < Math.floor(c.sentSamples / FRAME_SIZE); frame++) this.frameSentAt.set(frame, now);
    this.times.firstSent ??= now;
  }

  #play(pcm) {
    const now = performance.now();
    const c = this.counters;
    const before = Math.floor(c.decodedSamples / FRAME_SIZE);
    c.decodedSamples += pcm.length;
    // Moshi answers every input frame but the first: output frame j answers input frame j + 1
    // (further on, after a resume dropped what was in flight).
    for (let frame = before; frame < Math.floor(c.decodedSamples / FRAME_SIZE); frame++) {
      const answered = frame + this.answerOffset;
      const sent = this.frameSentAt.get(answered);
      for (const key of this.frameSentAt.keys()) if (key <= answered) this.frameSentAt.delete(key);
      if (sent !== undefined) {
        this.lags.push(now - sent);
        if (this.lags.length > MAX_LAGS) this.lags.shift();
      }
    }
    this.times.firstAudio ??= now;
    this.onAudio?.(pcm);
    this.player?.push(pcm.slice());
  }

  #receive(data) {
    if (typeof data === "string") return; // the protocol is binary; nothing to do with text frames
    const bytes = new Uint8Array(data);
    if (!bytes.length) return;
    const payload = bytes.subarray(1);
    switch (bytes[0]) {
      case KIND.HANDSHAKE:
        if (this.state === "connecting" || this.state === "queued") {
          this.times.ready = performance.now();
          this.#setState("live");
          this.onReady?.();
        } else if (this.state === "reconnecting") {
          this.#resumed().catch((error) => this.#fail(error));
        }
        break;
      case KIND.AUDIO:
        this.counters.audioMessages++;
        try {
          this.decoder.decode(payload);
        } catch (error) {
          this.#fail(error);
        }
        break;
      case KIND.TEXT:
        this.counters.textPieces++;
        this.onText?.(new TextDecoder().decode(payload));
        break;
      case KIND.COLORED_TEXT:
        this.counters.textPieces++;
        this.onText?.(new TextDecoder().decode(payload.subarray(1)));
        break;
      case KIND.METADATA:
        this.#metadata(payload);
        break;
      case KIND.ERROR:
        this.onError?.(new Error(new TextDecoder().decode(payload)));
        break;
      default: // pings, control messages and kinds from the future: nothing to do
        break;
    }
  }

  #metadata(payload) {
    let metadata;
    try {
      metadata = JSON.parse(new TextDecoder().decode(payload));
    } catch {
      console.warn("ignoring metadata that is not JSON");
      return;
    }
    const resume = metadata?.conversation?.resume;
    if (typeof resume === "string") this.resumeToken = resume;
    if (metadata && typeof metadata === "object" && metadata.queue && typeof metadata.queue === "object") {
      if (this.state === "connecting") this.#setState("queued");
      this.onQueue?.(metadata.queue);
    }
    this.onMetadata?.(metadata);
  }

  #fail(error) {
    this.onError?.(error);
    this.stop(`client error: ${error?.message ?? error}`);
  }

  async #closed(code, reason) {
    if (this.state === "closed") return;
    clearInterval(this.watchdog);
    this.closeCode = code;
    this.closeReason = reason;
    if (this.state !== "closing") this.#setState("closing");
    await this.#release();
    this.#setState("closed");
    this.stopped?.();
    this.onClose?.(code, reason);
  }

  async #release() {
    this.microphone?.close();
    if (this.player) this.finalPlayerStats = await withTimeout(this.player.stats(), STATS_TIMEOUT_MS);
    this.encoder?.close();
    this.decoder?.close();
    this.player?.close();
    if (this.ownStream) this.stream?.getTracks().forEach((track) => track.stop());
    for (const context of [this.context, this.captureContext]) {
      if (context && context.state !== "closed") await context.close();
    }
  }
}
