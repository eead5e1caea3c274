// The benchmark's probe in the voice chat page (an init script: it runs before the page's
// own scripts). It times both of the page's paths with one method where it can:
//
// - when Talk was pressed (a capturing click listener);
// - WebRTC: the first outbound packet, the first inbound packet and the first inbound audio
//   with energy, polled from getStats() every POLL_MS from the click on;
// - a drain probe on either path: stop feeding the microphone to the transport, and time how
//   long Moshi's answers keep arriving. Moshi answers each 80 ms frame once the next one is
//   in, so what still arrives after the input stopped is exactly what was in flight: the
//   time from the last input sent to the last answer received is the steady one-way-and-back
//   delay of the pipeline (network, queues, model, codecs), before any playback buffering;
// - the playback buffering: WebRTC's jitter buffer (getStats' jitterBufferDelay over
//   jitterBufferEmittedCount, between two readings), the websocket player's queue.
//
// Everything is read by moshi_engine/bench/browser.py through `window.moshiProbe`.

(() => {
  const POLL_MS = 10;
  const probe = (window.moshiProbe = {
    talkAt: null,
    pcs: [],
    firstOutboundAt: null,
    firstInboundAt: null,
    firstEnergyAt: null,
  });

  const Native = window.RTCPeerConnection;
  if (typeof Native === "function") {
    window.RTCPeerConnection = class extends Native {
      constructor(...args) {
        super(...args);
        probe.pcs.push(this);
      }
    };
  }

  async function inbound(pc) {
    let found = null;
    (await pc.getStats()).forEach((report) => {
      if (report.type === "inbound-rtp" && report.kind === "audio") found = report;
    });
    return found;
  }

  async function outbound(pc) {
    let found = null;
    (await pc.getStats()).forEach((report) => {
      if (report.type === "outbound-rtp" && report.kind === "audio") found = report;
    });
    return found;
  }

  /** Poll the newest peer connection until its first inbound audio with energy (or 60 s). */
  async function watchFirstAudio() {
    const until = performance.now() + 60_000;
    while (probe.firstEnergyAt === null && performance.now() < until) {
      const pc = probe.pcs.at(-1);
      if (pc) {
        const now = performance.now();
        const [sent, received] = await Promise.all([outbound(pc), inbound(pc)]);
        if (sent?.packetsSent > 0) probe.firstOutboundAt ??= now;
        if (received?.packetsReceived > 0) probe.firstInboundAt ??= now;
        if (received?.totalAudioEnergy > 0) probe.firstEnergyAt ??= now;
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }

  window.addEventListener(
    "click",
    (event) => {
      const target = event.target instanceof Element ? event.target : null;
      const talk = target?.closest("#moshi-webrtc button[aria-label='start stream']");
      if (!talk || probe.talkAt !== null) return;
      probe.talkAt = performance.now();
      watchFirstAudio();
    },
    true,
  );

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  /** WebRTC: stop sending the microphone for `ms`; returns the drain (ms) and resumes. */
  probe.drainWebRTC = async (ms) => {
    const pc = probe.pcs.at(-1);
    const sender = pc.getSenders().find((s) => s.track?.kind === "audio");
    const track = sender.track;
    await sender.replaceTrack(null);
    const stoppedAt = performance.now();
    await sleep(ms);
    const last = (await inbound(pc)).lastPacketReceivedTimestamp; // ms on the performance.timeOrigin clock's epoch
    await sender.replaceTrack(track);
    return last - performance.timeOrigin - stoppedAt;
  };

  /** WebRTC: the mean time a sample spent in the jitter buffer since the last call (ms). */
  let lastJitter = null;
  probe.jitterBufferMs = async () => {
    const report = await inbound(probe.pcs.at(-1));
    const now = { delay: report.jitterBufferDelay, count: report.jitterBufferEmittedCount };
    const before = lastJitter;
    lastJitter = now;
    if (!before || now.count <= before.count) return null;
    return (1000 * (now.delay - before.delay)) / (now.count - before.count);
  };

  /** Websocket: note when each message is sent and each answer decoded (call once it is live). */
  probe.watchSocket = () => {
    const socket = window.moshiPage.socket;
    const send = socket.ws.send.bind(socket.ws);
    socket.ws.send = (message) => {
      probe.lastSentAt = performance.now();
      send(message);
    };
    const onAudio = socket.onAudio;
    socket.onAudio = (pcm) => {
      probe.lastAudioAt = performance.now();
      onAudio?.(pcm);
    };
  };

  /** Websocket: stop feeding the microphone to the socket for `ms`; returns the drain (ms) and resumes. */
  probe.drainWebsocket = async (ms) => {
    const microphone = window.moshiPage.socket.microphone;
    const onFrame = microphone.onFrame;
    microphone.onFrame = null;
    await sleep(ms);
    const drain = probe.lastAudioAt - probe.lastSentAt;
    microphone.onFrame = onFrame;
    return drain;
  };
})();
