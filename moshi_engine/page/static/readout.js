// The live readout during a conversation: how far behind real time Moshi's voice arrives, as
// this browser sees it, and the time left before the server's session limit.
//
// Over WebRTC the numbers are the browser's own (getStats()): the jitter buffer's delay of
// Moshi's audio over the last interval (jitterBufferDelay / jitterBufferEmittedCount, both
// cumulative, so their change since the last reading) plus half the round trip of the ICE
// candidate pair in use. Over the websocket it is the audio queued in the page's player,
// waiting to be heard. The countdown starts when the conversation does: over WebRTC with
// Moshi's first audio packet (FastRTC sends none while the visitor waits in line), over the
// websocket at the server's handshake. A minute before the limit it says so where it stays
// visible, until the conversation ends; the server's ending sentence says the rest.

import { fill } from "./page-words.js";

const READ_EVERY_MS = 500;

/** "m:ss" for a number of seconds (never negative). */
export function clock(seconds) {
  const s = Math.max(0, Math.ceil(seconds));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

/** The jitter buffer's delay in ms over the last interval, from two inbound-rtp readings. */
function jitterMs(now, before) {
  if (!now || !now.jitterBufferEmittedCount) return null;
  const emitted = now.jitterBufferEmittedCount - (before?.jitterBufferEmittedCount ?? 0);
  const delay = now.jitterBufferDelay - (before?.jitterBufferDelay ?? 0);
  if (emitted > 0) return (1000 * delay) / emitted;
  return (1000 * now.jitterBufferDelay) / now.jitterBufferEmittedCount;
}

export class Readout {
  /**
   * `root`: the element (or a function finding it: Gradio renders it late) holding .moshi-readout (with .moshi-readout-behind and
   * .moshi-readout-left) and .moshi-readout-warning; `words`: endings.READOUT_WORDS (with
   * the limit filled in); `limitS`: the session limit.
   */
  constructor(root, words, limitS) {
    this.root = root;
    this.words = words;
    this.limitS = limitS;
    this.timer = null;
    this.source = null;
    this.reset();
  }

  reset() {
    // What the page shows, also for tests: null until known.
    this.state = { transport: null, behindMs: null, jitterMs: null, rttMs: null, leftS: null, lastMinute: false,
      reconnecting: false };
    this.startedAt = null;
    this.lastInbound = null;
  }

  /** A WebRTC conversation on `pc` began (it may wait in line first). */
  watchWebrtc(pc) {
    this.#begin("webrtc", { pc });
  }

  /** A websocket conversation (a MoshiSocket) began; call `talking()` once the server took it. */
  watchWebsocket(socket) {
    this.#begin("websocket", { socket });
  }

  /** The conversation proper started: the countdown runs from now. */
  talking() {
    this.startedAt ??= performance.now();
  }

  /** The conversation's connection is lost and being taken up again (true), or back (false). */
  reconnecting(lost) {
    this.state.reconnecting = lost;
    if (this.source) this.#show();
  }

  /** The conversation ended: the readout goes away. */
  stop() {
    clearInterval(this.timer);
    this.timer = null;
    this.source = null;
    this.#element(".moshi-readout").hidden = true;
    this.#element(".moshi-readout-warning").hidden = true;
  }

  #begin(transport, source) {
    this.stop();
    this.reset();
    this.state.transport = transport;
    this.source = source;
    this.timer = setInterval(() => this.#read().catch((error) => console.warn("readout:", error)), READ_EVERY_MS);
  }

  async #read() {
    const source = this.source;
    if (!source) return;
    if (source.pc) await this.#readWebrtc(source.pc);
    else await this.#readWebsocket(source.socket);
    if (this.source !== source) return; // stopped meanwhile
    this.#show();
  }

  async #readWebrtc(pc) {
    if (pc.connectionState === "closed") return;
    const stats = await pc.getStats();
    let inbound = null;
    let pair = null;
    const pairs = new Map();
    let selected = null;
    stats.forEach((report) => {
      if (report.type === "inbound-rtp" && report.kind === "audio") inbound = report;
      if (report.type === "candidate-pair") pairs.set(report.id, report);
      if (report.type === "transport" && report.selectedCandidatePairId) selected = report.selectedCandidatePairId;
    });
    pair = pairs.get(selected) ?? [...pairs.values()].find((p) => p.nominated && p.state === "succeeded") ?? null;
    if (inbound?.packetsReceived > 0) this.talking(); // Moshi's voice has started to arrive
    const jitter = jitterMs(inbound, this.lastInbound);
    this.lastInbound = inbound
      ? { jitterBufferDelay: inbound.jitterBufferDelay ?? 0, jitterBufferEmittedCount: inbound.jitterBufferEmittedCount ?? 0 }
      : null;
    const rtt = typeof pair?.currentRoundTripTime === "number" ? 1000 * pair.currentRoundTripTime : null;
    this.state.jitterMs = jitter;
    this.state.rttMs = rtt;
    this.state.behindMs = jitter === null ? null : jitter + (rtt ?? 0) / 2;
  }

  async #readWebsocket(socket) {
    if (socket.state === "live") this.talking();
    this.state.reconnecting = socket.state === "reconnecting";
    const player = socket.player && socket.state === "live" ? await socket.player.stats() : null;
    this.state.behindMs = player ? (1000 * player.queuedSamples) / player.sampleRate : null;
  }

  #show() {
    const state = this.state;
    if (this.startedAt !== null) state.leftS = Math.max(0, this.limitS - (performance.now() - this.startedAt) / 1000);
    state.lastMinute = state.leftS !== null && state.leftS <= 60;
    const ms = (x) => String(Math.round(x));
    let behind = "";
    if (state.reconnecting) {
      behind = this.words.reconnecting;
    } else if (state.behindMs !== null) {
      if (state.transport === "webrtc") {
        behind = fill(this.words.behindWebrtc, { ms: ms(state.behindMs), jitter: ms(state.jitterMs),
          rtt: state.rttMs === null ? "?" : ms(state.rttMs) });
      } else {
        behind = fill(this.words.behindWebsocket, { ms: ms(state.behindMs) });
      }
    }
    const left = state.leftS === null ? "" : fill(this.words.left, { time: clock(state.leftS) });
    this.#element(".moshi-readout-behind").textContent = behind;
    this.#element(".moshi-readout-left").textContent = left;
    this.#element(".moshi-readout").hidden = !behind && !left;
    const warning = this.#element(".moshi-readout-warning");
    warning.textContent = state.lastMinute ? this.words.lastMinute : "";
    warning.hidden = !state.lastMinute;
  }

  #element(selector) {
    const root = typeof this.root === "function" ? this.root() : this.root;
    return root?.querySelector(selector) ?? document.createElement("p");
  }
}
