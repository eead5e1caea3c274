// The microphone side of the audio thread: cut what the microphone hears into
// Moshi frames (1920 samples of 24 kHz mono, 80 ms) and post each to the page.
//
// At a 24 kHz AudioContext the browser has already resampled the microphone; a
// context at another rate (some browsers refuse to connect a microphone to a
// context at another rate than the device's) is resampled here.

import { Resampler } from "../resample.js";

const TARGET_RATE = 24000;
const FRAME_SIZE = 1920;

class MoshiCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new Resampler(sampleRate, TARGET_RATE);
    this.frame = new Float32Array(FRAME_SIZE);
    this.filled = 0;
    this.running = true;
    this.port.onmessage = ({ data }) => {
      if (data === "stop") this.running = false;
    };
  }

  process(inputs) {
    const channels = inputs[0];
    if (channels && channels.length) this.#take(this.resampler.process(this.#mono(channels)));
    return this.running;
  }

  #mono(channels) {
    if (channels.length === 1) return channels[0];
    const out = new Float32Array(channels[0].length);
    for (const channel of channels) for (let i = 0; i < out.length; i++) out[i] += channel[i] / channels.length;
    return out;
  }

  #take(samples) {
    let offset = 0;
    while (offset < samples.length) {
      const take = Math.min(FRAME_SIZE - this.filled, samples.length - offset);
      this.frame.set(samples.subarray(offset, offset + take), this.filled);
      this.filled += take;
      offset += take;
      if (this.filled === FRAME_SIZE) {
        this.port.postMessage(this.frame, [this.frame.buffer]);
        this.frame = new Float32Array(FRAME_SIZE);
        this.filled = 0;
      }
    }
  }
}

registerProcessor("moshi-capture", MoshiCapture);
