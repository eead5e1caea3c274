// Streaming sample-rate conversion of mono pcm, for the two places the browser
// hands us audio at a rate we did not ask for: a microphone context not at 24 kHz,
// and WebCodecs' Opus decoder, which in Chromium always outputs 48 kHz.
// Speech only needs to survive it: a low-pass below the target's Nyquist when
// going down (so nothing aliases), then linear interpolation.

/** RBJ biquad low-pass coefficients (Butterworth Q), normalised by a0. */
function lowPass(cutoff, rate) {
  const w = (2 * Math.PI * cutoff) / rate;
  const alpha = Math.sin(w) / (2 * Math.SQRT1_2);
  const cos = Math.cos(w);
  const a0 = 1 + alpha;
  return { b0: (1 - cos) / 2 / a0, b1: (1 - cos) / a0, b2: (1 - cos) / 2 / a0, a1: (-2 * cos) / a0, a2: (1 - alpha) / a0 };
}

export class Resampler {
  constructor(fromRate, toRate) {
    this.fromRate = fromRate;
    this.toRate = toRate;
    this.step = fromRate / toRate; // input samples per output sample
    this.filter = this.step > 1 ? lowPass(0.45 * toRate, fromRate) : null;
    this.z1 = this.z2 = 0; // filter state (transposed direct form II)
    this.position = 0; // where the next output sample falls, in the current block's input samples
    this.previous = 0; // the previous block's last (filtered) sample
  }

  /** Resample one block (Float32Array); the state carries over to the next block. */
  process(input) {
    if (this.step === 1) return input;
    const x = this.filter ? this.#filtered(input) : input;
    const n = x.length;
    const out = new Float32Array(Math.max(0, Math.floor((n - 1 - this.position) / this.step) + 1));
    let written = 0;
    // position may lie in [-1, 0): between the previous block's last sample and this one's first
    while (this.position <= n - 1 && written < out.length) {
      const i = Math.floor(this.position);
      const fraction = this.position - i;
      const a = i < 0 ? this.previous : x[i];
      const b = i + 1 < n ? x[i + 1] : a;
      out[written++] = a + fraction * (b - a);
      this.position += this.step;
    }
    this.position -= n;
    if (n) this.previous = x[n - 1];
    return written === out.length ? out : out.subarray(0, written);
  }

  #filtered(input) {
    const { b0, b1, b2, a1, a2 } = this.filter;
    const out = new Float32Array(input.length);
    for (let i = 0; i < input.length; i++) {
      const x = input[i];
      const y = b0 * x + this.z1;
      this.z1 = b1 * x - a1 * y + this.z2;
      this.z2 = b2 * x - a2 * y;
      out[i] = y;
    }
    return out;
  }
}
