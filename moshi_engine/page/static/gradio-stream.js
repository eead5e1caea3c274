// Gradio's event stream, kept across a handover.
//
// Gradio's client hears every event's progress and results (the transcript, the ending's
// message, the recording's link) on one long response per session, `queue/data` (server-sent
// events, read with fetch), open while any event is pending: during a WebRTC call, all along.
// When the visitor's address changes, that response's connection is dead, and nothing tells
// the client so for many minutes. So every such response is handed to Gradio through a stream
// of our own (`keepGradioStreams`), which `reopenGradioStreams` moves onto a new connection after
// a handover: the server (`event_stream.KeptEventStreams`, for a request whose take-over
// parameter says how many events the page has) carries the running stream on there from the
// first event the page missed. Only whole events pass and count, so half of one that the dead
// connection cut off is dropped (and sent again) rather than glued to the next. Events on their way into
// Gradio's queue at that moment (`KeptJoin`) are sent again on a new connection.

const STREAM_PATH = "/queue/data";
const JOIN_PATH = "/queue/join";
const kept = new Set(); // KeptStreams open
const joins = new Set(); // KeptJoins not yet answered

class KeptStream {
  constructor(realFetch, request) {
    this.fetch = realFetch;
    this.request = request;
    this.connection = null; // the AbortController of the connection read now
    this.reader = null;
    this.controller = null;
    this.events = 0; // whole events handed to Gradio: where the server goes on from after a move
  }

  async open(url) {
    const connection = new AbortController();
    const response = await this.fetch(url, {
      headers: this.request.headers,
      credentials: this.request.credentials,
      cache: "no-store",
      signal: AbortSignal.any([connection.signal, this.request.signal]), // Gradio's own abort still ends it
    });
    return { response, connection };
  }

  readable({ response, connection }) {
    return new ReadableStream({
      start: (controller) => {
        this.controller = controller;
        this.#read(response, connection);
      },
      cancel: () => this.#close(),
    });
  }

  #read(response, connection) {
    this.connection = connection;
    const reader = (this.reader = response.body.getReader());
    const decoder = new TextDecoder();
    const encoder = new TextEncoder();
    let buffer = "";
    (async () => {
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let end;
          while ((end = buffer.indexOf("\n\n")) !== -1) {
            this.controller.enqueue(encoder.encode(buffer.slice(0, end + 2)));
            this.events++;
            buffer = buffer.slice(end + 2);
          }
        }
        if (this.reader === reader) {
          kept.delete(this);
          this.controller.close(); // the server ended the stream
        }
      } catch (error) {
        if (this.reader === reader) {
          kept.delete(this);
          this.controller.error(error); // Gradio aborted it, or the network failed: as without us
        }
      }
    })();
  }

  /** Carry on over a new connection; the old one goes once the server holds the new one. */
  async reopen(takeOver) {
    if (!kept.has(this)) return false;
    const url = new URL(this.request.url);
    url.searchParams.set(takeOver, String(this.events));
    let opened;
    try {
      opened = await this.open(url);
    } catch {
      return false;
    }
    if (!opened.response.ok || !kept.has(this)) {
      opened.connection.abort();
      return false;
    }
    const old = this.connection;
    this.#read(opened.response, opened.connection);
    old.abort();
    return true;
  }

  #close() {
    kept.delete(this);
    this.reader = null;
    this.connection?.abort();
  }
}

/**
 * A request that puts an event in Gradio's queue, sent again on a new connection after a
 * handover: one that was under way on the dead path would wait for good, and Gradio starts no
 * other event of the same kind meanwhile (the status line's timer, whose ticks also show a
 * conversation's ending). The first answer wins; a tick sent twice does the same twice.
 */
class KeptJoin {
  constructor(realFetch, input, init) {
    this.fetch = realFetch;
    this.input = input;
    this.init = init;
    this.attempt = null; // the AbortController of the latest try
  }

  send() {
    return new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
      joins.add(this);
      this.#try();
    });
  }

  #try() {
    const attempt = (this.attempt = new AbortController());
    const signal = this.init?.signal ? AbortSignal.any([attempt.signal, this.init.signal]) : attempt.signal;
    this.fetch(this.input, { ...this.init, signal }).then(
      (response) => this.#settle(() => this.resolve(response)),
      (error) => this.attempt === attempt && this.#settle(() => this.reject(error)),
    );
  }

  #settle(settle) {
    if (!joins.delete(this)) return; // settled already
    settle();
  }

  again() {
    if (!joins.has(this)) return;
    const old = this.attempt;
    this.#try();
    old.abort();
  }
}

/** Hand each of Gradio's event streams to it through a KeptStream (once, before Gradio opens one). */
export function keepGradioStreams(win = window) {
  if (win.fetch.keepsGradioStreams) return;
  const realFetch = win.fetch.bind(win);
  const fetch = async (input, init) => {
    // Tell the stream from the rest without making a Request of them (that would take a body).
    const href = input instanceof Request ? input.url : String(input);
    const method = (init?.method ?? (input instanceof Request ? input.method : "GET")).toUpperCase();
    const path = new URL(href, location.href).pathname;
    if (method === "POST" && path.endsWith(JOIN_PATH) && typeof init?.body === "string") {
      return new KeptJoin(realFetch, input, init).send();
    }
    if (method !== "GET" || !path.endsWith(STREAM_PATH)) return realFetch(input, init);
    const request = new Request(input, init);
    const stream = new KeptStream(realFetch, request);
    const opened = await stream.open(request.url);
    if (!opened.response.ok || !opened.response.body) return opened.response;
    kept.add(stream);
    const { status, statusText, headers } = opened.response;
    return new Response(stream.readable(opened), { status, statusText, headers });
  };
  fetch.keepsGradioStreams = true;
  win.fetch = fetch;
}

/** Move every open event stream onto a new connection, and send again the events on their way
 * into the queue; how many streams moved. */
export async function reopenGradioStreams(takeOver) {
  for (const join of [...joins]) join.again();
  const moved = await Promise.all([...kept].map((stream) => stream.reopen(takeOver)));
  return moved.filter(Boolean).length;
}

/** How many event streams are open (for tests). */
export function openGradioStreams() {
  return kept.size;
}
