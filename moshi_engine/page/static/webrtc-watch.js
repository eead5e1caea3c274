// Watching FastRTC's WebRTC attempts from outside its component, and giving one up.
//
// FastRTC's audio component creates an RTCPeerConnection when the visitor presses Talk and
// shows "Connecting" until its `connectionState` is "connected". Where no ICE candidate pair
// can ever work (a strict NAT and no TURN server) Chromium stays "checking" forever and so
// does the page. The component offers no hook, but it looks `RTCPeerConnection` up on
// `window` each time, so a subclass installed there sees every connection it makes.

/**
 * Install a subclass of `window.RTCPeerConnection` that hands every new connection to
 * `onCreate(pc)` (after the native constructor, before its creator adds any listener, so
 * that listeners added in `onCreate` run first). Returns false when the browser has none.
 */
export function watchPeerConnections(onCreate) {
  const Native = window.RTCPeerConnection;
  if (typeof Native !== "function") return false;
  window.RTCPeerConnection = class WatchedPeerConnection extends Native {
    constructor(...args) {
      super(...args);
      try {
        onCreate(this);
      } catch (error) {
        console.error("watching a peer connection failed:", error);
      }
    }
  };
  return true;
}

/** The ICE username fragment of a connection's offer (null before it has one). */
export function offerUfrag(pc) {
  const sdp = pc.localDescription?.sdp ?? "";
  return sdp.match(/^a=ice-ufrag:(\S+)\r?$/m)?.[1] ?? null;
}

/**
 * One WebRTC attempt of FastRTC's component, from creation to connected, failed or given up.
 *
 * Callbacks: `onConnected()`, `onFailed(event)` (ICE or the connection failed: the event is
 * the connection's own, so a listener may stop FastRTC's from seeing it), `onTimeout()`
 * (not connected `timeoutMs` after the server answered the offer, or after creation if no
 * answer came), `onEnded()` (closed or failed after it connected, or closed by its creator),
 * `onUnreachable()` (soon after the answer, no connectivity check has been answered either way:
 * UDP is blocked, or no path exists; the page need not wait out `timeoutMs`),
 * `onInterrupted()` and `onRecovered()` (a connected call fell silent: no packet of Moshi's
 * voice for QUIET_MS, which streams every 20 ms while it talks, or ICE went "disconnected";
 * and it came back by itself).
 * States: "connecting" -> "connected" | "failed" | "abandoned" | "ended".
 *
 * A connected connection that goes "disconnected" is not over: an outage (a lift, a tunnel, a
 * wifi roam) ends, and ICE finds its way back on its own, as the server keeps its slot for the
 * reconnect grace. FastRTC's component ends the call on "disconnected", so that state change is
 * kept from its listener (ours runs first) until the connection fails, closes or `end()`s.
 */
const PROBE_MIN_MS = 600;
const PROBE_AGAIN_MS = 300;
// Silence this long on a call that had sound is an interruption, seconds before ICE says
// "disconnected" (the server calls it so after 1.5 s): a handover has that much more of the grace.
const QUIET_MS = 2000;
const LISTEN_EVERY_MS = 500;

export class WebRTCAttempt {
  constructor(pc, { timeoutMs = 5000, abandonUrl = null } = {}) {
    this.pc = pc;
    this.timeoutMs = timeoutMs;
    this.abandonUrl = abandonUrl;
    this.state = "connecting";
    this.times = { created: performance.now(), answered: null, connected: null, ended: null };
    this.onConnected = this.onFailed = this.onTimeout = this.onEnded = this.onInterrupted = this.onRecovered = null;
    this.interrupted = false;
    this.timer = null;
    this.probe = null;
    this.listening = null;
    this.abandonPosted = false;
    const changed = (event) => this.#changed(event);
    const setLocalDescription = pc.setLocalDescription.bind(pc);
    pc.setLocalDescription = (...args) => {
      this.times.offered ??= performance.now(); // the offer leaves for the server about now
      return setLocalDescription(...args);
    };
    pc.addEventListener("connectionstatechange", changed);
    pc.addEventListener("iceconnectionstatechange", changed);
    // The clock restarts at the answer: fetching TURN credentials and the server's own ICE
    // gathering happen before it, and do not say whether a path exists.
    const setRemoteDescription = pc.setRemoteDescription.bind(pc);
    pc.setRemoteDescription = (...args) => {
      this.times.answered ??= performance.now();
      if (this.state === "connecting") {
        this.#arm();
        this.#armProbe();
      }
      if (this.state === "abandoned") this.#postAbandon(); // the server's side exists only now
      return setRemoteDescription(...args);
    };
    // close() fires no state change; FastRTC closes the connection when a conversation ends.
    const close = pc.close.bind(pc);
    pc.close = () => {
      close();
      if (this.state === "connecting" || this.state === "connected") this.#ended();
    };
    this.#arm();
  }

  /**
   * Once the server answered, a working path shows within a few round trips: some connectivity
   * check gets an answer, or the server's checks arrive. The signalling's own round trip (offer
   * to answer, the server's gathering included) bounds a round trip from above, so twice it,
   * and at least PROBE_MIN_MS, is the wait before asking whether anything came through.
   */
  #armProbe() {
    clearTimeout(this.probe);
    const signalling = this.times.answered - (this.times.offered ?? this.times.created);
    const wait = Math.max(PROBE_MIN_MS, 2 * signalling);
    this.probe = setTimeout(() => this.#checkPath().catch((error) => console.warn("ICE probe:", error)), wait);
  }

  async #checkPath() {
    if (this.state !== "connecting") return;
    let heard = false;
    let pairs = 0;
    (await this.pc.getStats()).forEach((report) => {
      if (report.type !== "candidate-pair") return;
      pairs++;
      if ((report.responsesReceived ?? 0) > 0 || (report.requestsReceived ?? 0) > 0) heard = true;
    });
    if (this.state !== "connecting" || heard) return;
    // While the browser still gathers candidates (a TURN relay, say), a path may yet come: look again.
    if (pairs === 0 || this.pc.iceGatheringState !== "complete") {
      this.probe = setTimeout(() => this.#checkPath().catch((error) => console.warn("ICE probe:", error)), PROBE_AGAIN_MS);
      return;
    }
    this.onUnreachable?.();
  }

  #arm() {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      if (this.state === "connecting") this.onTimeout?.();
    }, this.timeoutMs);
  }

  #changed(event) {
    const pc = this.pc;
    if (this.state === "connecting") {
      if (pc.connectionState === "connected") {
        clearTimeout(this.timer);
        this.state = "connected";
        this.times.connected = performance.now();
        this.#listen();
        this.onConnected?.();
      } else if (pc.connectionState === "failed" || pc.iceConnectionState === "failed") {
        clearTimeout(this.timer);
        this.state = "failed";
        this.onFailed?.(event);
      } else if (pc.connectionState === "closed" || pc.connectionState === "disconnected") {
        this.#ended();
      }
    } else if (this.state === "connected") {
      const state = pc.connectionState;
      if (state === "disconnected") {
        if (event.type === "connectionstatechange") event.stopImmediatePropagation(); // not FastRTC's to end
        this.#interrupted(true);
      } else if (state === "connected") {
        this.#interrupted(false);
      } else if (state === "closed" || state === "failed") {
        this.#ended();
      }
    }
  }

  /**
   * End a connected call from the page (its connection never came back): FastRTC's component
   * goes back to "Talk" quietly, as for a connection it saw end, and closes it.
   */
  end() {
    if (this.state !== "connected") return;
    this.#ended();
    this.#closeQuietly();
  }

  #closeQuietly() {
    const pc = this.pc;
    // Our own listener ignores it: this attempt is no longer "connecting" or "connected".
    Object.defineProperty(pc, "connectionState", { configurable: true, get: () => "disconnected" });
    pc.dispatchEvent(new Event("connectionstatechange"));
    // FastRTC closes it half a second after "disconnected"; in case a later version does not.
    setTimeout(() => pc.close(), 1000);
  }

  /** Count Moshi's packets while connected: silence after sound is an interruption. */
  #listen() {
    let packets = 0;
    let heardAt = null;
    this.listening = setInterval(async () => {
      let now = 0;
      (await this.pc.getStats()).forEach((report) => {
        if (report.type === "inbound-rtp" && report.kind === "audio") now += report.packetsReceived ?? 0;
      });
      if (this.state !== "connected") return;
      if (now > packets) {
        packets = now;
        heardAt = performance.now();
        if (this.pc.connectionState === "connected") this.#interrupted(false);
      } else if (heardAt !== null && performance.now() - heardAt >= QUIET_MS) {
        this.#interrupted(true);
      }
    }, LISTEN_EVERY_MS);
  }

  /** The call fell silent (true) or came back by itself (false): each told once. */
  #interrupted(now) {
    if (this.interrupted === now) return;
    this.interrupted = now;
    (now ? this.onInterrupted : this.onRecovered)?.();
  }

  #ended() {
    clearTimeout(this.timer);
    clearTimeout(this.probe);
    clearInterval(this.listening);
    this.state = "ended";
    this.times.ended = performance.now();
    this.onEnded?.();
  }

  /**
   * Give up on this attempt: the server closes its side now (it never started a
   * conversation, so it held no slot and no place in line, but it holds one of the page's
   * WebRTC places for 30 s otherwise), and FastRTC's component goes back to "Talk" as it
   * does for a lost connection, stopping its tracks and closing the connection, with no
   * error shown. Its state listener is told "disconnected": the one ending it handles quietly.
   */
  abandon() {
    if (this.state === "abandoned" || this.state === "ended") return;
    clearTimeout(this.timer);
    clearTimeout(this.probe);
    this.state = "abandoned";
    this.times.ended = performance.now();
    if (this.times.answered !== null) this.#postAbandon();
    this.#closeQuietly();
  }

  #postAbandon() {
    if (this.abandonPosted) return;
    this.abandonPosted = tellServer(this.abandonUrl, this.pc, "WebRTC was given up");
  }
}

/**
 * POST the ufrag of `pc`'s offer to one of the page's WebRTC routes (`url`), also when the visitor
 * leaves the page right away; whether it went (there is a route and an offer).
 */
export function tellServer(url, pc, what) {
  const ufrag = offerUfrag(pc);
  if (!url || !ufrag) return false;
  fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ ufrag }),
    keepalive: true,
  }).catch((error) => console.warn(`could not tell the server that ${what}:`, error));
  return true;
}
