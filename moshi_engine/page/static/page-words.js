// The sentences the page shows for its websocket path, filled from the templates that
// Python renders into the page (moshi_engine/page/endings.py `page_words`, through
// pagescript.py): the words live in endings.py alone, and this file only fills in
// the numbers, exactly as endings.py does (tests/test_page_fallback.py compares them).

/** `template` with each `{name}` replaced by `values[name]` (no other syntax). */
export function fill(template, values) {
  return template.replace(/\{(\w+)\}/g, (whole, name) => (name in values ? String(values[name]) : whole));
}

/** Python's round(): halves go to the even neighbour, so both paths say the same number. */
export function roundHalfEven(x) {
  const floor = Math.floor(x);
  const diff = x - floor;
  if (diff > 0.5) return floor + 1;
  if (diff < 0.5) return floor;
  return floor % 2 === 0 ? floor : floor + 1;
}

/** Python's f"{x:g}" for the numbers the page meets (whole and short decimal seconds). */
function shortNumber(x) {
  return String(Number(x.toPrecision(6)));
}

export class PageWords {
  constructor(words, reasons = {}) {
    this.words = words;
    this.reasons = reasons;
  }

  minutes(n) {
    return fill(n === 1 ? this.words.minute : this.words.minutes, { n });
  }

  /** endings.duration_words */
  duration(seconds) {
    if (seconds >= 60 && seconds % 60 === 0) return this.minutes(Math.floor(seconds / 60));
    return fill(this.words.seconds, { n: shortNumber(seconds) });
  }

  /** endings.line_message, from the server's place-in-line metadata {position, waiting, eta_s}. */
  line({ position, eta_s: etaS = 0 }) {
    const wait = etaS < 60
      ? this.words.waitSoon
      : fill(this.words.waitAbout, { minutes: this.minutes(roundHalfEven(etaS / 60)) });
    const place = this.words.ordinals[position - 1] ?? `${position}`;
    return fill(this.words.line, { place, wait });
  }

  /** endings.MICROPHONE_WORDS[problem], with the server's `host` and `port` as the browser reached it. */
  microphone(problem, { host, port }) {
    return fill(this.words.microphone[problem] ?? "", { host, port });
  }

  get leftLine() {
    return this.words.leftLine;
  }

  /**
   * The ending sentence of a conversation over /api/chat, as the WebRTC path would say it:
   * `code` and `reason` of the close, `byUser` when this page closed it (Stop),
   * `queued` while it waited in line and never talked, `seconds` of microphone audio sent.
   */
  ending({ code, reason = "", byUser = false, queued = false, seconds = 0 }) {
    const e = this.words.endings;
    const error = (detail) => fill(e.error, { detail });
    if (byUser) {
      if (queued) return this.leftLine;
      // Python rounds the seconds heard to whole ones (rtc.py); so does this.
      return seconds > 0 ? fill(e.stoppedAfter, { detail: this.duration(roundHalfEven(seconds)) }) : e.stopped;
    }
    switch (code) {
      case 1000:
        if (reason === this.reasons.timeLimit) return e.timeLimit;
        return seconds > 0 ? fill(e.stoppedAfter, { detail: this.duration(roundHalfEven(seconds)) }) : e.stopped;
      case 1008:
        if (reason === this.reasons.lost) return e.lost;
        return reason === this.reasons.idle ? e.idle : error(reason || "the server refused the conversation");
      case 1012:
        return e.restart;
      case 1013:
        // waited in line, and no slot freed up; or no slot and no place in line at all
        return queued ? e.lineTimeout : e.busy;
      case 1011:
        return error(reason || "the server failed");
      case 1006:
        return error("the connection to Moshi was lost");
      default:
        return error(reason || `the connection closed with code ${code}`);
    }
  }
}
