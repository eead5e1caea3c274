// The harness page: one button, the transport status, the transcript and live counters.
// Everything the tests read is on `window.moshiDemo`.

import { describeClose, MoshiSocket, SAMPLING_KEYS } from "./moshi-socket.js";

const query = new URLSearchParams(location.search);
const button = document.getElementById("start");
const status = document.getElementById("status");
const transcript = document.getElementById("transcript");
const statsLine = document.getElementById("stats");
const CODEC_NAMES = { webcodecs: "WebCodecs Opus", wasm: "Opus WASM (opus-recorder)" };

const demo = (window.moshiDemo = { socket: null, states: [], closes: [], queue: [], errors: [], texts: [] });

function say(text) {
  status.textContent = text;
}

function transport(socket) {
  return `websocket ${socket.url.replace(/\?.*$/, "")}, ${CODEC_NAMES[socket.backend] ?? "codec not chosen yet"}`;
}

async function start() {
  const sampling = Object.fromEntries(SAMPLING_KEYS.filter((k) => query.has(k)).map((k) => [k, query.get(k)]));
  transcript.textContent = "";
  const socket = new MoshiSocket({
    server: query.get("server"),
    sampling,
    queue: query.get("queue") === "1",
    codec: query.get("codec") ?? "auto",
    onState: (state) => {
      demo.states.push(state);
      say(`${state} · ${transport(socket)}`);
    },
    onReady: () => say(`live · ${transport(socket)}`),
    onQueue: (info) => {
      demo.queue.push(info);
      say(`waiting in line: position ${info.position ?? "?"} of ${info.waiting ?? "?"}` +
        (info.eta_s !== undefined ? `, about ${Math.round(info.eta_s)} s` : ""));
    },
    onText: (piece) => {
      demo.texts.push(piece);
      transcript.textContent += piece;
    },
    onError: (error) => demo.errors.push(String(error?.message ?? error)),
    onClose: (code, reason) => {
      demo.closes.push({ code, reason });
      say(describeClose(code, reason));
      button.textContent = "Start";
    },
  });
  demo.socket = socket;
  button.textContent = "Stop";
  try {
    await socket.start();
  } catch (error) {
    demo.errors.push(String(error?.message ?? error));
    say(`Could not start: ${error?.message ?? error}`);
    button.textContent = "Start";
  }
}

button.addEventListener("click", () => {
  const socket = demo.socket;
  if (socket && socket.state !== "closed") socket.stop();
  else start();
});

setInterval(async () => {
  if (!demo.socket) return;
  const s = await demo.socket.stats();
  const ms = (v) => (v === null ? "-" : `${v.toFixed(0)} ms`);
  statsLine.textContent =
    `sent ${s.secondsSent.toFixed(1)} s, decoded ${s.secondsDecoded.toFixed(1)} s, ` +
    `first audio ${ms(s.firstAudioMs)}, lag p50 ${ms(s.lagMs.p50)} p95 ${ms(s.lagMs.p95)}` +
    (s.player ? `\nplayed ${s.player.framesPlayed} chunks, queued ${(s.player.queuedSamples / 24).toFixed(0)} ms, ` +
      `dropped ${(s.player.droppedSamples / 24).toFixed(0)} ms, underruns ${s.player.underruns}` : "");
}, 500);
