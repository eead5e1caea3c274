// Both sides of a conversation on the page's websocket path, kept in the browser and saved
// as a stereo WAV that never leaves it: the person on the left, Moshi on the right, 16-bit
// at 24 kHz, aligned as heard. A port of moshi_engine/page/recording.py (the WebRTC path's
// recording, made on the server), with the same rule and the same samples, so that a
// download sounds the same whichever transport carried the conversation.

import { SAMPLE_RATE } from "./opus.js";

/** recording.py's pcm_to_int16: clip to [-1, 1], times 32767 in float32, toward zero. */
export function pcmToInt16(pcm) {
  const out = new Int16Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) {
    const x = Math.min(1, Math.max(-1, pcm[i]));
    out[i] = Math.trunc(Math.fround(x * 32767)); // numpy multiplies float32 by float32
  }
  return out;
}

/**
 * The microphone is the clock: its samples (those sent to Moshi) are appended, and the
 * recording lasts exactly as long as they do. A chunk of Moshi's voice starts where the
 * microphone is when it is handed to the player, or right after Moshi's previous chunk if
 * that one is still playing (the player plays them back to back), so a reply sits just
 * after the speech it answers. What would have played after the end was never heard.
 */
export class Recording {
  constructor() {
    this.person = [];
    this.moshi = []; // [start sample, Int16Array]
    this.personSamples = 0;
    this.moshiEnd = 0;
  }

  addPerson(pcm) {
    this.person.push(pcmToInt16(pcm));
    this.personSamples += pcm.length;
  }

  /** Place a chunk of Moshi's pcm; returns the sample where it starts. */
  addMoshi(pcm) {
    const start = Math.max(this.personSamples, this.moshiEnd);
    this.moshi.push([start, pcmToInt16(pcm)]);
    this.moshiEnd = start + pcm.length;
    return start;
  }

  get seconds() {
    return this.personSamples / SAMPLE_RATE;
  }

  /** Interleaved int16 [left, right, left, right, ...]: the person left, Moshi right. */
  stereo() {
    const n = this.personSamples;
    const out = new Int16Array(2 * n);
    let at = 0;
    for (const chunk of this.person) {
      for (let i = 0; i < chunk.length; i++) out[2 * (at + i)] = chunk[i];
      at += chunk.length;
    }
    for (const [start, chunk] of this.moshi) {
      const heard = Math.min(chunk.length, Math.max(0, n - start));
      for (let i = 0; i < heard; i++) out[2 * (start + i) + 1] = chunk[i];
    }
    return out;
  }

  /** The recording as a 16-bit stereo WAV file. */
  wav() {
    return new Blob([wavBytes(this.stereo(), 2, SAMPLE_RATE)], { type: "audio/wav" });
  }
}

/** A canonical 44-byte-header PCM WAV of interleaved int16 `samples`, as Python's wave module writes it. */
export function wavBytes(samples, channels, sampleRate) {
  const data = samples.length * 2;
  const bytes = new Uint8Array(44 + data);
  const view = new DataView(bytes.buffer);
  const ascii = (at, text) => [...text].forEach((c, i) => (bytes[at + i] = c.charCodeAt(0)));
  ascii(0, "RIFF");
  view.setUint32(4, 36 + data, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  view.setUint32(16, 16, true); // PCM format chunk size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, channels, true);
  view.setUint32(24, sampleRate, true);
  view.setUint32(28, sampleRate * channels * 2, true); // bytes per second
  view.setUint16(32, channels * 2, true); // bytes per frame
  view.setUint16(34, 16, true); // bits per sample
  ascii(36, "data");
  view.setUint32(40, data, true);
  for (let i = 0; i < samples.length; i++) view.setInt16(44 + 2 * i, samples[i], true);
  return bytes;
}

/**
 * A file name like the WebRTC path's: moshi-conversation-YYYYmmdd-HHMMSS-xxxxxxxx.wav (local time),
 * with the voice's name after "moshi-conversation-" on a page that offers several; xxxxxxxx is
 * the conversation's id from the server (random if it sent none).
 */
export function recordingName(startedAt = new Date(), voice = null, id = null) {
  const two = (n) => String(n).padStart(2, "0");
  const d = startedAt;
  const day = `${d.getFullYear()}${two(d.getMonth() + 1)}${two(d.getDate())}`;
  const stamp = `${day}-${two(d.getHours())}${two(d.getMinutes())}${two(d.getSeconds())}`;
  const tag = id ?? Array.from(crypto.getRandomValues(new Uint8Array(4)), (b) => b.toString(16).padStart(2, "0")).join("");
  return `moshi-conversation-${voice ? `${voice}-` : ""}${stamp}-${tag}.wav`;
}
