// Whether this page can have a microphone, and if not, why: known as soon as the page loads and
// kept up to date, so that the page says so where it stays visible and does not offer a button
// that cannot work.
//
// - "insecure": not a secure context (plain http from another machine): browsers give such a page
//   no `navigator.mediaDevices` at all, nor the websocket path's AudioWorklet.
// - "denied": the microphone is blocked for this site (the permission says so, or a request failed
//   that way); it lasts until the permission changes.
// - "missing": the browser sees no audio input; it lasts until a device appears.
// - "dismissed" (a prompt closed without an answer) and "unreadable" (another application holds the
//   microphone): learned from a request that failed; pressing the button again may work.
//
// Every getUserMedia call of the page (FastRTC's component's, whose own error is a toast that
// fades, and the websocket path's) goes through a wrapper that learns from its failures.

/** The problems after which the page hides its button until something changes. */
export const BLOCKING = new Set(["insecure", "denied", "missing"]);

export class MicrophoneWatch {
  constructor(onChange) {
    this.onChange = onChange; // (problem or null) => void, on every change
    this.problem = undefined; // null: none known; undefined: not checked yet
    this.permission = null; // PermissionStatus of "microphone", where the browser has one
    this.failure = null; // what the last failed request said, until something changes
  }

  /** Look once now, then follow permission and device changes and every request's outcome. */
  async start() {
    if (!window.isSecureContext || typeof navigator.mediaDevices?.getUserMedia !== "function") {
      this.#set("insecure");
      return this.problem;
    }
    this.#wrapGetUserMedia();
    navigator.mediaDevices.addEventListener?.("devicechange", () => this.#recheck());
    try {
      this.permission = await navigator.permissions.query({ name: "microphone" });
      this.permission.addEventListener("change", () => this.#recheck());
    } catch {
      this.permission = null; // not every browser can be asked about the microphone
    }
    await this.check();
    return this.problem;
  }

  /** Work the problem out again from the permission, the devices and the last failure. */
  async check() {
    if (this.permission?.state === "denied") return this.#set("denied");
    let inputs = null;
    try {
      inputs = (await navigator.mediaDevices.enumerateDevices()).filter((device) => device.kind === "audioinput");
    } catch {
      inputs = null; // cannot tell: say nothing about devices
    }
    if (inputs !== null && inputs.length === 0) return this.#set("missing");
    if (this.failure === "denied" && this.permission?.state === "granted") this.failure = null;
    this.#set(this.failure);
  }

  #recheck() {
    this.failure = null; // a new permission or new devices: an old failure says nothing now
    this.check();
  }

  #set(problem) {
    if (problem === this.problem) return;
    this.problem = problem;
    try {
      this.onChange(problem);
    } catch (error) {
      console.error("showing the microphone's state failed:", error);
    }
  }

  #wrapGetUserMedia() {
    const devices = navigator.mediaDevices;
    const native = devices.getUserMedia.bind(devices);
    devices.getUserMedia = async (constraints) => {
      try {
        const stream = await native(constraints);
        if (constraints?.audio && this.failure) {
          this.failure = null;
          this.check();
        }
        return stream;
      } catch (error) {
        if (constraints?.audio) this.#failed(error);
        throw error;
      }
    };
  }

  async #failed(error) {
    const name = error?.name;
    if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
      // A closed prompt fails the same way as a refusal; the permission tells them apart.
      let state = this.permission?.state;
      try {
        state = (await navigator.permissions.query({ name: "microphone" })).state;
      } catch {
        // no permission to ask about: take the failure at its word
      }
      this.failure = state === "prompt" ? "dismissed" : "denied";
    } else if (name === "NotFoundError" || name === "OverconstrainedError" || name === "DevicesNotFoundError") {
      this.failure = "missing";
    } else if (name === "NotReadableError" || name === "AbortError" || name === "TrackStartError") {
      this.failure = "unreadable";
    } else {
      return;
    }
    this.#set(this.failure);
  }
}
