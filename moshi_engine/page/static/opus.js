// Opus in the browser, as Ogg pages in and out: what the websocket carries.
//
// Two backends behind one interface:
// - "webcodecs": the browser's own AudioEncoder / AudioDecoder (bare packets),
//   framed by ogg.js. Browsers that have it expose it in secure contexts only.
// - "wasm": libopus compiled to WebAssembly by opus-recorder (vendor/opus-recorder,
//   MIT and BSD licensed), run in workers; the same library moshi's own web
//   client uses. Its encoder writes Ogg pages itself; its decoder takes whole pages.
// Both are loaded from this package's static files: nothing is fetched from
// elsewhere, so the page works offline on localhost.

import { OggOpusWriter, OggReader, GRANULE_RATE, isOpusHead, isOpusTags, opusHead, opusPacketSamples } from "./ogg.js";
import { Resampler } from "./resample.js";

export const SAMPLE_RATE = 24000; // Mimi's rate: what Moshi hears and speaks
export const FRAME_SIZE = 1920; // one Moshi step: 80 ms
const PACKET_US = 20000; // 20 ms Opus packets, four to a page: one page per Moshi frame
const FRAMES_PER_PAGE = 4;
const VENDOR = new URL("./vendor/opus-recorder/", import.meta.url);

const ENCODER_CONFIG = {
  codec: "opus",
  sampleRate: SAMPLE_RATE,
  numberOfChannels: 1,
  opus: { frameDuration: PACKET_US },
};
const DECODER_CONFIG = { codec: "opus", sampleRate: SAMPLE_RATE, numberOfChannels: 1 };

/** Whether this browser encodes and decodes 24 kHz mono Opus with WebCodecs. */
export async function webCodecsOpus() {
  if (typeof AudioEncoder !== "function" || typeof AudioDecoder !== "function") return false;
  try {
    const [enc, dec] = await Promise.all([
      AudioEncoder.isConfigSupported(ENCODER_CONFIG),
      AudioDecoder.isConfigSupported(DECODER_CONFIG),
    ]);
    return Boolean(enc.supported && dec.supported);
  } catch {
    return false;
  }
}

/** "webcodecs" where the browser can, else "wasm"; `prefer` forces one ("auto" chooses). */
export async function chooseBackend(prefer = "auto") {
  if (prefer === "wasm") return "wasm";
  const native = await webCodecsOpus();
  if (prefer === "webcodecs" && !native) throw new Error("this browser has no WebCodecs Opus (AudioEncoder / AudioDecoder)");
  return native ? "webcodecs" : "wasm";
}

/**
 * pcm (Float32Array at 24 kHz, any length; Moshi frames of 1920 in practice) in,
 * Ogg Opus out through `onPage(bytes, samples)`: `samples` is how much 24 kHz audio
 * the bytes carry. The first call carries the two header pages too.
 */
export async function createEncoder(backend, { onPage, onError = console.error }) {
  const encoder = backend === "webcodecs" ? new WebCodecsEncoder(onPage, onError) : new WasmEncoder(onPage, onError);
  await encoder.ready;
  return encoder;
}

/**
 * Ogg Opus bytes (in chunks of any size: the server's `\x01` payloads) in, pcm
 * (Float32Array, 24 kHz mono) out through `onPcm`. Throws OggError on bytes that
 * are not Ogg.
 */
export async function createDecoder(backend, { onPcm, onError = console.error }) {
  const decoder = backend === "webcodecs" ? new WebCodecsDecoder(onPcm, onError) : new WasmDecoder(onPcm, onError);
  await decoder.ready;
  return decoder;
}

class WebCodecsEncoder {
  constructor(onPage, onError) {
    this.backend = "webcodecs";
    this.onPage = onPage;
    this.timestamp = 0;
    this.writer = null;
    this.headers = null;
    this.emitted = 0; // granule of the last page handed out
    this.encoder = new AudioEncoder({
      output: (chunk, metadata) => this.#packet(chunk, metadata),
      error: (error) => onError(error),
    });
    this.encoder.configure(ENCODER_CONFIG);
    this.ready = Promise.resolve();
  }

  encode(pcm) {
    if (this.encoder.state !== "configured") return;
    const data = new AudioData({
      format: "f32",
      sampleRate: SAMPLE_RATE,
      numberOfFrames: pcm.length,
      numberOfChannels: 1,
      timestamp: Math.round((this.timestamp * 1e6) / SAMPLE_RATE),
      data: pcm,
    });
    this.timestamp += pcm.length;
    this.encoder.encode(data);
    data.close();
  }

  #packet(chunk, metadata) {
    if (!this.writer) {
      // Chromium describes its stream with an OpusHead (its pre-skip); keep it when given.
      const description = metadata?.decoderConfig?.description;
      const head = description && isOpusHead(new Uint8Array(description)) ? new Uint8Array(description) : opusHead();
      this.writer = new OggOpusWriter({ head, pageSamples: FRAMES_PER_PAGE * (GRANULE_RATE * PACKET_US) / 1e6 });
      this.headers = this.writer.headers();
    }
    const packet = new Uint8Array(chunk.byteLength);
    chunk.copyTo(packet);
    const page = this.writer.push(packet);
    if (page) this.#emit(page);
  }

  #emit(page) {
    const samples = (this.writer.granule - this.emitted) * (SAMPLE_RATE / GRANULE_RATE);
    this.emitted = this.writer.granule;
    if (this.headers) {
      const bytes = new Uint8Array(this.headers.length + page.length);
      bytes.set(this.headers);
      bytes.set(page, this.headers.length);
      this.headers = null;
      page = bytes;
    }
    this.onPage(page, samples);
  }

  close() {
    if (this.encoder.state !== "closed") this.encoder.close();
  }
}

class WebCodecsDecoder {
  constructor(onPcm, onError) {
    this.backend = "webcodecs";
    this.reader = new OggReader();
    this.timestamp = 0;
    this.resampler = null;
    this.decoder = new AudioDecoder({
      output: (audio) => {
        const pcm = new Float32Array(audio.numberOfFrames);
        const rate = audio.sampleRate;
        audio.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
        audio.close();
        if (rate === SAMPLE_RATE) return onPcm(pcm);
        // Chromium decodes Opus at 48 kHz whatever the configured rate
        if (this.resampler?.fromRate !== rate) this.resampler = new Resampler(rate, SAMPLE_RATE);
        onPcm(this.resampler.process(pcm));
      },
      error: (error) => onError(error),
    });
    // No description: the server's OpusHead asks for an 80 ms pre-skip that its own
    // reader does not apply either; this is a live stream, not a file.
    this.decoder.configure(DECODER_CONFIG);
    this.ready = Promise.resolve();
  }

  decode(bytes) {
    for (const page of this.reader.push(bytes)) {
      for (const packet of page.packets) {
        if (isOpusHead(packet) || isOpusTags(packet) || this.decoder.state !== "configured") continue;
        const samples = opusPacketSamples(packet);
        this.decoder.decode(new EncodedAudioChunk({
          type: "key",
          timestamp: Math.round((this.timestamp * 1e6) / GRANULE_RATE),
          duration: Math.round((samples * 1e6) / GRANULE_RATE),
          data: packet,
        }));
        this.timestamp += samples;
      }
    }
  }

  close() {
    if (this.decoder.state !== "closed") this.decoder.close();
  }
}

/** opus-recorder's encoder worker: pcm in, its own Ogg pages out (20 ms frames, 4 to a page). */
class WasmEncoder {
  constructor(onPage, onError) {
    this.backend = "wasm";
    this.onPage = onPage;
    this.headers = [];
    this.granule = 0;
    this.worker = new Worker(new URL("encoderWorker.min.js", VENDOR));
    this.ready = new Promise((resolve, reject) => {
      this.worker.onerror = (event) => {
        const error = new Error(`Opus encoder worker: ${event.message}`);
        if (this.started) onError(error);
        else reject(error); // createEncoder / createDecoder throws it
      };
      this.worker.onmessage = ({ data }) => {
        if (data.message === "ready") {
          this.worker.postMessage({ command: "getHeaderPages" });
          this.started = true;
          resolve();
        } else if (data.message === "page") {
          this.#page(data.page, data.samplePosition);
        }
      };
    });
    this.worker.postMessage({
      command: "init",
      encoderSampleRate: SAMPLE_RATE,
      originalSampleRate: SAMPLE_RATE, // the microphone is already at 24 kHz: no resampling
      encoderFrameSize: PACKET_US / 1000,
      maxFramesPerPage: FRAMES_PER_PAGE,
      numberOfChannels: 1,
      encoderApplication: 2049, // OPUS_APPLICATION_AUDIO
      encoderComplexity: 5,
      resampleQuality: 3,
      streamPages: true,
    });
  }

  encode(pcm) {
    this.worker.postMessage({ command: "encode", buffers: [pcm] });
  }

  #page(page, granule) {
    if (granule === 0) {
      this.headers.push(page); // OpusHead, OpusTags: sent with the first audio page
      return;
    }
    const samples = (granule - this.granule) * (SAMPLE_RATE / GRANULE_RATE);
    this.granule = granule;
    if (this.headers.length) {
      const parts = [...this.headers, page];
      page = new Uint8Array(parts.reduce((sum, p) => sum + p.length, 0));
      let offset = 0;
      for (const part of parts) {
        page.set(part, offset);
        offset += part.length;
      }
      this.headers = [];
    }
    this.onPage(page, samples);
  }

  close() {
    this.worker.terminate();
  }
}

/** An Ogg Opus stream of one 40 ms packet of silence (a TOC byte alone: an empty SILK frame). */
function silentStream() {
  const writer = new OggOpusWriter({ pageSamples: 1920 });
  const headers = writer.headers();
  const page = writer.push(Uint8Array.of(0x10)); // config 2: SILK narrowband, 40 ms
  const bytes = new Uint8Array(headers.length + page.length);
  bytes.set(headers);
  bytes.set(page, headers.length);
  return bytes;
}

/** opus-recorder's decoder worker, fed one whole, checked page at a time (ogg.js splits them). */
class WasmDecoder {
  constructor(onPcm, onError) {
    this.backend = "wasm";
    this.reader = new OggReader();
    this.worker = new Worker(new URL("decoderWorker.min.js", VENDOR));
    this.ready = new Promise((resolve, reject) => {
      this.worker.onerror = (event) => {
        const error = new Error(`Opus decoder worker: ${event.message}`);
        if (this.started) onError(error);
        else reject(error); // createEncoder / createDecoder throws it
      };
      this.worker.onmessage = ({ data }) => {
        if (!this.started) {
          this.started = true; // that was the warm-up's silence, not Moshi
          resolve();
        } else if (data && data[0]?.length) {
          onPcm(data[0]);
        }
      };
    });
    this.worker.postMessage({
      command: "init",
      decoderSampleRate: SAMPLE_RATE,
      outputBufferSampleRate: SAMPLE_RATE,
      bufferLength: 960, // 40 ms, the server's packet: each packet comes out as soon as it is decoded
      resampleQuality: 0,
    });
    // The worker compiles its WebAssembly on first use, which took ~0.4 s on a 2-core machine:
    // a silent stream now moves that before the conversation. The server's first page
    // (a new stream) resets the decoder.
    this.worker.postMessage({ command: "decode", pages: silentStream() });
  }

  decode(bytes) {
    for (const page of this.reader.push(bytes)) {
      this.worker.postMessage({ command: "decode", pages: page.bytes.slice() });
    }
  }

  close() {
    this.worker.terminate();
  }
}
