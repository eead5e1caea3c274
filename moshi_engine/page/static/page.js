// The voice chat page's own script: talk over WebRTC when it connects, over this server's
// /api/chat websocket when it does not.
//
// The visitor presses FastRTC's Talk button as always. FastRTC then makes an
// RTCPeerConnection, which this script watches (webrtc-watch.js). If it has not connected
// a few seconds after the server answered the offer, or ICE fails, or the browser has no
// WebRTC at all, the page gives that attempt up (the server drops its side at once) and
// carries the same conversation over the websocket instead (moshi-socket.js: Opus in the
// browser, the microphone with echo cancellation, a bounded player), with the page's
// sampling controls, its transcript box, the waiting line's messages and a recording
// made in the browser. `?transport=websocket` goes there at once, `?transport=webrtc`
// never does; `?webrtc_timeout=seconds` changes how long WebRTC may take.
//
// Python renders the settings and every sentence into the page's head as JSON
// (moshi_engine/page/pagescript.py), so the words here are only this script's own: which
// transport is in use. Everything tests and the benchmark read is on `window.moshiPage`.

import { BLOCKING, MicrophoneWatch } from "./microphone.js";
import { chatUrl, MoshiSocket } from "./moshi-socket.js";
import { SAMPLE_RATE } from "./opus.js";
import { PageWords } from "./page-words.js";
import { Readout } from "./readout.js";
import { Recording, recordingName } from "./recording.js";
import { offerUfrag, tellServer, watchPeerConnections, WebRTCAttempt } from "./webrtc-watch.js";
import { keepGradioStreams, reopenGradioStreams } from "./gradio-stream.js";

keepGradioStreams(); // before Gradio opens its event stream: one that a handover can move

const CONFIG = JSON.parse(document.getElementById("moshi-page-config").textContent);
const WORDS = new PageWords(CONFIG.words, CONFIG.reasons);
const TALK = "#moshi-webrtc button[aria-label='start stream']";
const SAMPLING_INPUTS = { temp: "moshi-temp", top_k: "moshi-top-k", temp_text: "moshi-temp-text",
  top_k_text: "moshi-top-k-text", seed: "moshi-seed" };

const query = new URLSearchParams(location.search);
const asked = query.get("transport");
const MODE = asked === "webrtc" || asked === "websocket" ? asked : "auto";
if (asked && MODE === "auto") console.warn(`?transport=${asked} is neither webrtc nor websocket: trying both`);
const timeoutS = Number(query.get("webrtc_timeout"));
const TIMEOUT_MS = 1000 * (timeoutS > 0 ? timeoutS : CONFIG.webrtcTimeoutS);
const CAN_FALL_BACK = Boolean(CONFIG.chat); // a page in front of a remote Moshi has no /api/chat

// What the status line says; "why" names each case.
const STATUS = {
  auto: "Talks over WebRTC, or over this page's websocket where WebRTC cannot connect.",
  autoWebrtcOnly: "Talks over WebRTC.",
  forcedWebsocket: "Talks over this page's websocket (?transport=websocket).",
  forcedWebrtc: "Talks over WebRTC only (?transport=webrtc): no websocket fallback.",
  connecting: "Connecting over WebRTC…",
  webrtc: "Talking over WebRTC.",
  webrtcEnded: "The last conversation went over WebRTC.",
  timeout: "WebRTC could not connect, so this conversation goes over the page's websocket.",
  unreachable: "WebRTC found no way through this network (UDP blocked, no TURN server), so this conversation goes over the page's websocket.",
  failed: "WebRTC failed to connect, so this conversation goes over the page's websocket.",
  failedBefore: "WebRTC could not connect earlier, so this conversation goes over the page's websocket.",
  noWebrtc: "This browser has no WebRTC, so this conversation goes over the page's websocket.",
  forced: "Talking over the page's websocket (?transport=websocket).",
  stillTrying: `WebRTC has not connected after ${TIMEOUT_MS / 1000} s; still trying, as ?transport=webrtc asks.`,
  stillTryingNoFallback:
    `WebRTC has not connected after ${TIMEOUT_MS / 1000} s; still trying (this page has no websocket to fall back to).`,
  webrtcFailedNoFallback: "WebRTC failed to connect.",
  cancelled: "The WebRTC attempt was cancelled.",
  noWebsocket: "This page has no websocket to talk over (it serves a Moshi that runs elsewhere).",
  noWebrtcNoFallback: "This browser has no WebRTC, and this page has no other way to talk.",
  noWebrtcForced: "This browser has no WebRTC, and ?transport=webrtc rules out the websocket.",
};

const page = (window.moshiPage = {
  mode: MODE,
  timeoutMs: TIMEOUT_MS,
  hasWebRTC: typeof window.RTCPeerConnection === "function",
  why: null, // the last STATUS key shown
  transport: null, // "webrtc" or "websocket": what carries (or carried) the last conversation
  attempts: [], // every WebRTC attempt: {state, times, fellBack}
  attempt: null, // the WebRTC attempt in progress
  socket: null, // the websocket conversation's MoshiSocket (kept after it ends, for its stats)
  recording: null, // ... and its Recording
  conversation: null, // the websocket conversation in progress: {socket, recording, stop()}
  fallbacks: 0,
  webrtcFailed: false, // once true, later conversations go straight to the websocket (auto mode)
  microphone: undefined, // why this page cannot have a microphone (microphone.js), null if it can
  peerConnections: new Set(), // FastRTC's connections not yet closed
  conversationId: null, // the server's id of the last websocket conversation (WebRTC's: in its details)
  resuming: null, // a handover under way: {token, until, startedAt}, while a new connection takes the call up
  handovers: 0, // calls taken up on a new connection
  streamsMoved: 0, // Gradio event streams carried on a new connection after a handover
});
// How late Moshi's voice arrives and the time left, during a conversation (readout.js).
const readout = (page.readout = new Readout(() => $("#moshi-transport"), CONFIG.words.readout, CONFIG.sessionLimitS));

// ## The page's elements (Gradio renders them after this script may have run)

const $ = (selector) => document.querySelector(selector);

function setStatus(why) {
  page.why = why;
  const element = $("#moshi-transport .moshi-transport-status");
  if (element) element.textContent = STATUS[why];
}

function showMessage(text) {
  const element = $("#moshi-transport .moshi-transport-message");
  if (element) element.textContent = text;
}

function showStop(shown) {
  const button = $("#moshi-transport .moshi-transport-stop");
  if (button) button.hidden = !shown;
  if (shown) document.body.dataset.moshiTransport = "websocket";
  else delete document.body.dataset.moshiTransport;
}

/**
 * Say why the page cannot have a microphone (or nothing, once it can) where it stays visible,
 * and hide the button that would not work while the problem lasts (body[data-moshi-microphone]).
 */
function showMicrophone() {
  const problem = page.microphone;
  if (problem && BLOCKING.has(problem)) document.body.dataset.moshiMicrophone = problem;
  else delete document.body.dataset.moshiMicrophone;
  const element = $("#moshi-microphone .moshi-microphone-problem");
  if (!element) return false;
  const port = location.port || (location.protocol === "https:" ? "443" : "80");
  // `code` in the sentence (commands, addresses) is shown as code
  const parts = problem ? WORDS.microphone(problem, { host: location.hostname, port }).split("`") : [];
  element.replaceChildren(...parts.map((part, index) => {
    if (index % 2 === 0) return document.createTextNode(part);
    const code = document.createElement("code");
    code.textContent = part;
    return code;
  }));
  return true;
}

function setTranscript(text) {
  const box = $("#moshi-transcript textarea");
  if (!box) return;
  box.value = text;
  // Gradio's textbox keeps its own copy of the value; an input event brings it along, so
  // that a later update from the server (a WebRTC conversation's start) starts from it.
  box.dispatchEvent(new Event("input", { bubbles: true }));
  box.scrollTop = box.scrollHeight;
}

function appendTranscript(piece) {
  // as the WebRTC path shows it: Moshi's words so far, without the first piece's leading space
  setTranscript((($("#moshi-transcript textarea")?.value ?? "") + piece).trimStart());
}

let recordingUrl = null;

function removeRecording() {
  document.querySelectorAll("#moshi-recording [data-moshi-websocket]").forEach((element) => element.remove());
  if (recordingUrl) URL.revokeObjectURL(recordingUrl);
  recordingUrl = null;
}

/**
 * The websocket path's recording as a Blob link where the WebRTC path puts its own: it never
 * leaves this browser. Its details below it, as the WebRTC path's (ui.details_html): the
 * conversation's id, as in the server's log and the file's name.
 */
function offerRecording(recording, startedAt, voice = null, id = null) {
  const block = $("#moshi-recording");
  if (!block) return false;
  removeRecording();
  recordingUrl = URL.createObjectURL(recording.wav());
  const link = document.createElement("a");
  link.href = recordingUrl;
  link.download = recordingName(startedAt, voice, id);
  link.textContent = WORDS.words.recordingLink;
  link.dataset.moshiWebsocket = "";
  const where = block.querySelector(".prose") ?? block;
  where.append(link);
  if (id) {
    const details = document.createElement("details");
    details.className = "moshi-details";
    details.dataset.moshiWebsocket = "";
    const summary = document.createElement("summary");
    summary.textContent = WORDS.words.detailsSummary;
    const [before, after] = WORDS.words.detailsId.split("{id}");
    const code = document.createElement("code");
    code.textContent = id;
    const text = document.createElement("p");
    text.append(before, code, after ?? "");
    details.append(summary, text);
    where.append(details);
  }
  return true;
}

function readSampling() {
  const sampling = {};
  for (const [key, id] of Object.entries(SAMPLING_INPUTS)) {
    const value = Number($(`#${id} input[type=number]`)?.value ?? NaN);
    if (!Number.isFinite(value)) continue; // the server's default
    if (key === "seed") {
      if (value >= 0) sampling.seed = Math.round(value); // -1: a random seed
    } else {
      sampling[key] = key.startsWith("top_k") ? Math.round(value) : value;
    }
  }
  return sampling;
}

/** The voice picked on a page that offers several (null: the server's default, the only one). */
function readVoice() {
  const picker = $("#moshi-voice");
  if (!picker || picker.closest("[hidden], .hidden") || !picker.offsetParent) return null;
  return picker.querySelector("input[type=radio]:checked")?.value || null;
}

// ## The websocket path

async function talkOverWebsocket(why, context = null) {
  removeRecording();
  showMessage("");
  setTranscript("");
  page.transport = "websocket";
  setStatus(why);
  showStop(true);
  const recording = new Recording();
  const startedAt = new Date();
  const voice = readVoice();
  let queued = false;
  let live = false;
  let byUser = false;
  page.conversationId = null;
  const finish = (sentence) => {
    if (page.conversation?.socket !== socket) return;
    page.conversation = null;
    showStop(false);
    readout.stop();
    if (recording.personSamples && offerRecording(recording, startedAt, voice, page.conversationId)) {
      sentence += WORDS.words.recordingReady;
    }
    showMessage(sentence);
  };
  const socket = new MoshiSocket({
    url: chatUrl(CONFIG.chat, { sampling: readSampling(), queue: true, voice }),
    context,
    onQueue: (info) => {
      queued = true;
      showMessage(WORDS.line(info));
    },
    onReady: () => {
      live = true;
      readout.talking();
      showMessage("");
    },
    onMetadata: (metadata) => {
      const id = metadata?.conversation?.id;
      if (typeof id === "string" && /^[0-9a-z]{1,32}$/i.test(id)) page.conversationId = id;
    },
    onState: (state) => {
      // The countdown keeps going while the connection is taken up again (moshi-socket.js).
      if (state === "reconnecting") showMessage(WORDS.words.reconnecting);
      else if (state === "live" && socket.resumes) showMessage("");
    },
    onText: appendTranscript,
    onMicrophone: (pcm) => recording.addPerson(pcm),
    onAudio: (pcm) => recording.addMoshi(pcm),
    onError: (error) => console.warn("websocket conversation:", error),
    onClose: (code, reason) =>
      finish(WORDS.ending({ code, reason, byUser, queued: queued && !live, seconds: recording.seconds })),
  });
  page.socket = socket;
  page.recording = recording;
  readout.watchWebsocket(socket);
  page.conversation = {
    socket,
    recording,
    stop: () => {
      byUser = true;
      return socket.stop();
    },
  };
  try {
    await socket.start();
  } catch (error) {
    console.error("the websocket conversation could not start:", error);
    finish(WORDS.ending({ code: 1011, reason: `could not start: ${error?.message ?? error}` }));
  }
}

// ## Watching WebRTC

// A WebRTC connection lost for longer than the server's grace is over: the page says so this
// long after the grace (the server's own word cannot come over a connection that is gone).
const LOST_MARGIN_S = 3;
let talkPressedAt = null; // Talk went to FastRTC; its connection is not made yet
const TALK_STARTS_MS = 10_000; // FastRTC makes its connection well within this of the click
let primedContext = null; // an AudioContext made during that click, for a fallback later

// ## Handover: the same conversation on a new WebRTC connection
//
// When the visitor's address changes (wifi to 4G), the call's path is dead for good, and aiortc
// cannot restart ICE. The server answers the page's requests while the call stays silent: then
// the page ends the call quietly and presses Talk again with the conversation's resume token
// (`#moshi-resume`, among the inputs the server reads), and the server's new connection takes the
// conversation up in its slot. An outage is told apart by the server not answering either.
const RESUME_INPUT = "#moshi-resume textarea, #moshi-resume input";
const HANDOVER_CONFIRM_MS = 3000; // the server answered while the call stayed silent this long
const PROBE_EVERY_MS = 1000;

/** The conversation's resume token, from the server ("": the server answered, with none yet; null: no answer). */
async function resumeToken(pc) {
  if (!CONFIG.resume) return null;
  try {
    const response = await fetch(CONFIG.resume, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ ufrag: offerUfrag(pc) }),
      signal: AbortSignal.timeout(PROBE_EVERY_MS * 2),
    });
    if (!response.ok) return null;
    return (await response.json()).token ?? "";
  } catch {
    return null;
  }
}

/** Learn the connected call's token once its conversation has started. */
async function keepToken(attempt) {
  while (attempt.state === "connected" && !attempt.token) {
    const token = await resumeToken(attempt.pc);
    if (token) attempt.token = token;
    else await new Promise((resolve) => setTimeout(resolve, PROBE_EVERY_MS));
  }
}

/**
 * Tell the server that the visitor stopped this call: it ends the conversation at once. The
 * closing connection alone cannot say so: FastRTC stops sending half a second before it closes,
 * and a call that fell silent keeps its slot for a handover.
 */
function tellStopped(pc) {
  tellServer(CONFIG.stop, pc, "the call was stopped");
}

function setResumeInput(value) {
  const box = $(RESUME_INPUT);
  if (!box) return false;
  box.value = value;
  box.dispatchEvent(new Event("input", { bubbles: true })); // Gradio keeps its own copy of the value
  return true;
}

/** While the call is interrupted: if the server answers and the call stays silent, hand it over. */
function watchForHandover(attempt) {
  let answeringSince = null;
  const timer = setInterval(async () => {
    if (!attempt.interrupted || attempt.state !== "connected") return clearInterval(timer);
    const answered = (await resumeToken(attempt.pc)) !== null;
    if (!attempt.interrupted || attempt.state !== "connected") return clearInterval(timer);
    if (!answered) {
      answeringSince = null;
      return;
    }
    answeringSince ??= performance.now();
    if (attempt.token && performance.now() - answeringSince >= HANDOVER_CONFIRM_MS) {
      clearInterval(timer);
      handOver(attempt);
    }
  }, PROBE_EVERY_MS);
}

async function handOver(attempt) {
  page.resuming = { token: attempt.token, until: attempt.interruptedAt + 1000 * CONFIG.reconnectGraceS,
    startedAt: readout.startedAt }; // the countdown goes on from the conversation's start
  attempt.end(); // FastRTC's component goes back to Talk, quietly
  // Gradio's event stream (the transcript, the ending) was on the dead path too: carry it on.
  page.streamsMoved += await reopenGradioStreams(CONFIG.takeOver);
  pressTalkAgain();
}

/** Press Talk once FastRTC's component shows it again, with the resume token among the inputs. */
function pressTalkAgain() {
  const resuming = page.resuming;
  if (!resuming) return;
  if (performance.now() > resuming.until) {
    page.resuming = null;
    setResumeInput("");
    showMessage(WORDS.words.endings.lost);
    return;
  }
  const button = $(TALK);
  if (!button || !setResumeInput(resuming.token)) {
    setTimeout(pressTalkAgain, 100);
    return;
  }
  button.click();
  showMessage(WORDS.words.reconnecting);
}

function onPeerConnection(pc) {
  page.peerConnections.add(pc);
  pc.addEventListener("connectionstatechange", () => {
    if (pc.connectionState === "closed") page.peerConnections.delete(pc);
  });
  if (MODE === "websocket") return;
  const attempt = new WebRTCAttempt(pc, { timeoutMs: TIMEOUT_MS, abandonUrl: CONFIG.abandon });
  const record = { state: "connecting", times: attempt.times, fellBack: false };
  page.attempts.push(record);
  page.attempt = attempt;
  talkPressedAt = null;
  setStatus("connecting");
  const settle = () => {
    record.state = attempt.state;
    if (page.attempt === attempt && !["connecting", "connected"].includes(attempt.state)) page.attempt = null;
  };
  const resuming = page.resuming; // this connection takes a conversation up (a handover)
  attempt.onConnected = () => {
    settle();
    page.transport = "webrtc";
    setStatus("webrtc");
    closePrimedContext();
    readout.watchWebrtc(pc);
    if (resuming && page.resuming === resuming) {
      readout.startedAt = resuming.startedAt;
      page.resuming = null;
      page.handovers++;
      showMessage("");
    }
    // The server reads the inputs, the resume token among them, once the call is up: empty it
    // once this call's own conversation has a token (it has taken the old one up by then).
    keepToken(attempt).then(() => page.resuming || setResumeInput(""));
  };
  let lostTimer = null;
  attempt.onInterrupted = () => {
    // The server keeps the slot for the grace: so does the page, then it gives up.
    attempt.interruptedAt = performance.now();
    showMessage(WORDS.words.reconnecting);
    readout.reconnecting(true);
    lostTimer = setTimeout(() => {
      attempt.end();
      showMessage(WORDS.words.endings.lost);
    }, 1000 * (CONFIG.reconnectGraceS + LOST_MARGIN_S));
    watchForHandover(attempt);
  };
  attempt.onRecovered = () => {
    clearTimeout(lostTimer);
    showMessage("");
    readout.reconnecting(false);
  };
  attempt.onEnded = () => {
    clearTimeout(lostTimer);
    readout.reconnecting(false);
    settle();
    if (readout.source?.pc === pc) readout.stop();
    if (page.transport === "webrtc" && page.why === "webrtc") setStatus("webrtcEnded");
    if (page.why === "connecting") setStatus("cancelled");
    closePrimedContext();
  };
  const giveUp = (why) => {
    if (resuming && page.resuming === resuming) {
      // Taking a conversation up: try WebRTC again until the grace runs out (its slot is WebRTC's).
      attempt.abandon();
      settle();
      setTimeout(pressTalkAgain, PROBE_EVERY_MS);
      return;
    }
    if (MODE === "auto" && CAN_FALL_BACK) {
      attempt.abandon();
      record.fellBack = true;
      page.fallbacks++;
      page.webrtcFailed = true;
      settle();
      const context = primedContext;
      primedContext = null;
      talkOverWebsocket(why, context);
    } else {
      settle();
      setStatus(why === "failed" ? "webrtcFailedNoFallback" : CAN_FALL_BACK ? "stillTrying" : "stillTryingNoFallback");
      if (why === "failed") closePrimedContext();
    }
  };
  attempt.onTimeout = () => giveUp("timeout");
  // Nothing came through soon after the answer: where the page can fall back, it does not wait out the timeout.
  attempt.onUnreachable = () => {
    if ((MODE === "auto" && CAN_FALL_BACK) || resuming) giveUp("unreachable");
  };
  attempt.onFailed = (event) => {
    // FastRTC would show "Connection failed!" for a failure the page recovers from.
    if (((MODE === "auto" && CAN_FALL_BACK) || resuming) && event.type === "connectionstatechange") {
      event.stopImmediatePropagation();
    }
    giveUp("failed");
  };
}

function closePrimedContext() {
  primedContext?.close().catch(() => {});
  primedContext = null;
}

/** An AudioContext made while the click is still being handled, which browsers let play. */
function primeContext() {
  closePrimedContext();
  try {
    primedContext = new AudioContext({ sampleRate: SAMPLE_RATE, latencyHint: "interactive" });
  } catch (error) {
    console.warn("no AudioContext for a fallback:", error);
  }
  return primedContext;
}

// ## The Talk button

function swallow(event) {
  event.preventDefault();
  event.stopImmediatePropagation();
}

/** Every click on FastRTC's Talk button comes here first (a capturing listener on window). */
function onClick(event) {
  const button = event.target instanceof Element ? event.target.closest(TALK) : null;
  if (!button) return;
  if (page.conversation) {
    swallow(event); // (the button is hidden meanwhile) a second conversation would start
    page.conversation.stop();
    return;
  }
  const starting = talkPressedAt !== null && performance.now() - talkPressedAt < TALK_STARTS_MS;
  if (page.attempt?.state === "connecting" || starting) {
    // FastRTC's button reads "Connecting" now, and pressing it would start a second
    // connection beside the first: cancel this one instead.
    swallow(event);
    page.attempt?.abandon();
    talkPressedAt = null;
    setStatus("cancelled");
    closePrimedContext();
    return;
  }
  if (page.attempt?.state === "connected") {
    tellStopped(page.attempt.pc); // FastRTC's Stop: it stops the call, the server ends its conversation
    return;
  }
  const websocket = (why) => {
    swallow(event);
    if (!CAN_FALL_BACK) {
      setStatus(why === "noWebrtc" ? "noWebrtcNoFallback" : "noWebsocket");
      return;
    }
    talkOverWebsocket(why, primeContext());
  };
  if (MODE === "websocket") return websocket("forced");
  if (!page.hasWebRTC) {
    // FastRTC would fail without a word
    if (MODE === "auto") return websocket("noWebrtc");
    swallow(event);
    return setStatus("noWebrtcForced");
  }
  if (MODE === "auto" && page.webrtcFailed && CAN_FALL_BACK) return websocket("failedBefore");
  // FastRTC's turn: it makes its connection in a moment (onPeerConnection).
  talkPressedAt = performance.now();
  showMessage("");
  removeRecording();
  if (MODE === "auto" && CAN_FALL_BACK) primeContext();
}

window.addEventListener("click", onClick, true);
watchPeerConnections(onPeerConnection);

// A visitor who closes the tab (or leaves the page) ends the conversation at once. Left to
// itself the browser drops the peer connection without a word, and the server would hold the
// slot until its idle limit; a closed connection is noticed at once. The websocket closes by
// itself with the page.
window.addEventListener("pagehide", () => {
  for (const pc of page.peerConnections) {
    tellStopped(pc);
    pc.close();
  }
  page.peerConnections.clear();
  page.conversation?.stop();
});

new MicrophoneWatch((problem) => {
  page.microphone = problem;
  showMicrophone();
}).start();

document.addEventListener("click", (event) => {
  if (event.target instanceof Element && event.target.closest("#moshi-transport .moshi-transport-stop")) {
    page.conversation?.stop();
  }
});

// The status line's first words, once Gradio has rendered it.
function initialStatus() {
  if (MODE === "websocket") return "forcedWebsocket";
  if (MODE === "webrtc") return page.hasWebRTC ? "forcedWebrtc" : "noWebrtcForced";
  if (!page.hasWebRTC) return CAN_FALL_BACK ? "noWebrtc" : "noWebrtcNoFallback";
  return CAN_FALL_BACK ? "auto" : "autoWebrtcOnly";
}

function showInitialStatus() {
  if (!$("#moshi-transport .moshi-transport-status") || !$("#moshi-microphone .moshi-microphone-problem")) return false;
  if (page.why === null) setStatus(initialStatus());
  showMicrophone();
  page.ready = true;
  return true;
}
if (!showInitialStatus()) {
  const observer = new MutationObserver(() => showInitialStatus() && observer.disconnect());
  observer.observe(document.body, { childList: true, subtree: true });
}
