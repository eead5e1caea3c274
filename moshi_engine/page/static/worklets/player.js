// Moshi's voice on the audio thread: a bounded queue of 24 kHz pcm that catches up.
//
// Moshi speaks in real time, so audio arriving faster than it plays means the
// network or the decoder stalled and then caught up. Playing the backlog would
// keep that delay for the rest of the conversation; instead:
// - past `maxSamples` queued, the oldest audio is dropped down to `keepSamples`;
// - and a smaller backlog that was never needed is trimmed: when the queue never
//   fell below `slackSamples` for a whole `windowSamples` of playback, the oldest
//   audio above that slack is dropped. Latency returns to what the jitter needs.
// Playback starts (and restarts after running dry) once `startSamples` are
// queued. Counters for tests and the page come back on request ({type: "stats"}).

const FADE = 128; // one render quantum: a short ramp where playback starts, stops or skips

class MoshiPlayer extends AudioWorkletProcessor {
  constructor({ processorOptions = {} }) {
    super();
    const ms = (value) => Math.round((value * sampleRate) / 1000);
    this.startSamples = ms(processorOptions.startMs ?? 80);
    this.maxSamples = ms(processorOptions.maxMs ?? 300);
    this.keepSamples = Math.min(this.maxSamples, ms(processorOptions.keepMs ?? 160));
    this.slackSamples = ms(processorOptions.slackMs ?? 40);
    this.windowSamples = ms(processorOptions.windowMs ?? 1000);
    this.#reset();
    this.port.onmessage = ({ data }) => {
      if (data.type === "pcm") this.#push(data.pcm);
      else if (data.type === "stats") this.port.postMessage({ type: "stats", id: data.id, stats: this.#stats() });
      else if (data.type === "reset") this.#reset();
    };
  }

  #reset() {
    this.queue = []; // Float32Array chunks, oldest first
    this.offset = 0; // samples of queue[0] already played
    this.queued = 0;
    this.playing = false;
    this.fadeIn = false;
    this.announced = false;
    this.#newWindow();
    this.counters = {
      framesReceived: 0,
      samplesReceived: 0,
      framesPlayed: 0, // chunks played to their end
      samplesPlayed: 0,
      droppedSamples: 0, // by either rule
      drops: 0, // times the queue overflowed
      trims: 0, // times an unneeded backlog was trimmed
      underruns: 0,
      maxQueuedSamples: 0,
      energy: 0, // sum of squares of the samples played
    };
  }

  #stats() {
    return { ...this.counters, queuedSamples: this.queued, playing: this.playing, sampleRate };
  }

  #newWindow() {
    this.windowPlayed = 0;
    this.windowLowest = Infinity;
  }

  #push(pcm) {
    this.queue.push(pcm);
    this.queued += pcm.length;
    this.counters.framesReceived++;
    this.counters.samplesReceived += pcm.length;
    if (this.queued > this.maxSamples) {
      this.counters.drops++;
      this.#drop(this.queued - this.keepSamples);
    }
    this.counters.maxQueuedSamples = Math.max(this.counters.maxQueuedSamples, this.queued);
  }

  /** Drop the oldest `count` samples; the next quantum fades in over the splice. */
  #drop(count) {
    this.counters.droppedSamples += count;
    this.queued -= count;
    while (count > 0) {
      const take = Math.min(count, this.queue[0].length - this.offset);
      this.offset += take;
      count -= take;
      if (this.offset === this.queue[0].length) {
        this.queue.shift();
        this.offset = 0;
      }
    }
    this.fadeIn = true;
  }

  #trim(written) {
    this.windowLowest = Math.min(this.windowLowest, this.queued);
    this.windowPlayed += written;
    if (this.windowPlayed < this.windowSamples) return;
    if (this.windowLowest > this.slackSamples) {
      this.counters.trims++;
      this.#drop(this.windowLowest - this.slackSamples);
    }
    this.#newWindow();
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.queued >= this.startSamples) {
      this.playing = true;
      this.fadeIn = true;
    }
    if (!this.playing) return true;
    let written = 0;
    while (written < out.length && this.queue.length) {
      const chunk = this.queue[0];
      const take = Math.min(chunk.length - this.offset, out.length - written);
      out.set(chunk.subarray(this.offset, this.offset + take), written);
      this.offset += take;
      written += take;
      if (this.offset === chunk.length) {
        this.queue.shift();
        this.offset = 0;
        this.counters.framesPlayed++;
      }
    }
    this.queued -= written;
    if (this.fadeIn) {
      for (let i = 0; i < Math.min(FADE, written); i++) out[i] *= i / FADE;
      this.fadeIn = false;
    }
    if (written < out.length) {
      // ran dry: fade out what there was and wait for startSamples again
      for (let i = 0; i < written; i++) out[i] *= (written - i) / written;
      this.playing = false;
      this.counters.underruns++;
      this.#newWindow();
    } else {
      this.#trim(written);
    }
    for (let i = 0; i < written; i++) this.counters.energy += out[i] * out[i];
    this.counters.samplesPlayed += written;
    if (written && !this.announced) {
      this.announced = true;
      this.port.postMessage({ type: "playing", contextTime: currentTime });
    }
    // copy to every other output channel (a stereo destination)
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    return true;
  }
}

registerProcessor("moshi-player", MoshiPlayer);
