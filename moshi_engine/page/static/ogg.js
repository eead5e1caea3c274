// Ogg framing of Opus (RFC 3533 pages, RFC 7845 Opus mapping).
//
// The websocket protocols carry Ogg Opus pages (the server reads and writes them
// with sphn), while WebCodecs' AudioEncoder and AudioDecoder speak bare Opus
// packets: this module turns packets into pages and pages back into packets.
// It knows nothing of sockets or audio devices, so it runs anywhere.

export const GRANULE_RATE = 48000; // Ogg Opus counts granule positions at 48 kHz, whatever the stream's rate

const CAPTURE = 0x5367674f; // "OggS", read little-endian
const HEADER_BYTES = 27;
const MAX_SEGMENTS = 255;
const CONTINUED = 0x01;
const FIRST_PAGE = 0x02;
const OPUS_HEAD = "OpusHead";
const OPUS_TAGS = "OpusTags";

export class OggError extends Error {
  name = "OggError";
}

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let byte = 0; byte < 256; byte++) {
    let crc = byte << 24;
    for (let bit = 0; bit < 8; bit++) crc = crc & 0x80000000 ? (crc << 1) ^ 0x04c11db7 : crc << 1;
    table[byte] = crc >>> 0;
  }
  return table;
})();

/** The Ogg page checksum: CRC-32, polynomial 0x04C11DB7, unreflected, initial value 0. */
export function oggCrc(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  return crc;
}

/** Samples at 48 kHz that one Opus packet decodes to, from its TOC byte (RFC 6716, 3.1). */
export function opusPacketSamples(packet) {
  if (packet.length < 1) return 0;
  const config = packet[0] >> 3;
  let frameSamples;
  if (config < 12) frameSamples = [480, 960, 1920, 2880][config & 3]; // SILK: 10, 20, 40, 60 ms
  else if (config < 16) frameSamples = [480, 960][config & 1]; // hybrid: 10, 20 ms
  else frameSamples = [120, 240, 480, 960][config & 3]; // CELT: 2.5, 5, 10, 20 ms
  const code = packet[0] & 3;
  const frames = code === 0 ? 1 : code < 3 ? 2 : packet.length > 1 ? packet[1] & 0x3f : 0;
  return frames * frameSamples;
}

function ascii(text) {
  return Uint8Array.from(text, (c) => c.charCodeAt(0));
}

function startsWith(bytes, text) {
  if (bytes.length < text.length) return false;
  for (let i = 0; i < text.length; i++) if (bytes[i] !== text.charCodeAt(i)) return false;
  return true;
}

export const isOpusHead = (packet) => startsWith(packet, OPUS_HEAD);
export const isOpusTags = (packet) => startsWith(packet, OPUS_TAGS);

/** The identification header of a mono or stereo Opus stream (RFC 7845, 5.1). */
export function opusHead({ channels = 1, preSkip = 312, inputRate = 24000 } = {}) {
  const head = new Uint8Array(19);
  head.set(ascii(OPUS_HEAD));
  const view = new DataView(head.buffer);
  view.setUint8(8, 1); // version
  view.setUint8(9, channels);
  view.setUint16(10, preSkip, true);
  view.setUint32(12, inputRate, true);
  view.setInt16(16, 0, true); // output gain
  view.setUint8(18, 0); // channel mapping family 0: mono or stereo
  return head;
}

/** {channels, preSkip, inputRate} of an OpusHead packet. */
export function parseOpusHead(packet) {
  if (!isOpusHead(packet) || packet.length < 19) throw new OggError("not an OpusHead packet");
  const view = new DataView(packet.buffer, packet.byteOffset, packet.byteLength);
  return { channels: view.getUint8(9), preSkip: view.getUint16(10, true), inputRate: view.getUint32(12, true) };
}

/** The comment header: a vendor string and no comments (RFC 7845, 5.2). */
export function opusTags(vendor = "moshi-engine") {
  const vendorBytes = new TextEncoder().encode(vendor);
  const tags = new Uint8Array(8 + 4 + vendorBytes.length + 4);
  tags.set(ascii(OPUS_TAGS));
  const view = new DataView(tags.buffer);
  view.setUint32(8, vendorBytes.length, true);
  tags.set(vendorBytes, 12);
  view.setUint32(12 + vendorBytes.length, 0, true);
  return tags;
}

/** One Ogg page holding whole `packets` (an array of Uint8Array). */
export function oggPage({ packets, granule, serial, sequence, headerType = 0 }) {
  const lacing = [];
  for (const packet of packets) {
    // a packet is 255-byte segments and a last one shorter than 255 (possibly empty)
    for (let left = packet.length; ; left -= 255) {
      lacing.push(Math.min(left, 255));
      if (left < 255) break;
    }
  }
  if (lacing.length > MAX_SEGMENTS) throw new OggError(`${lacing.length} segments do not fit one page`);
  const bodyBytes = packets.reduce((sum, p) => sum + p.length, 0);
  const page = new Uint8Array(HEADER_BYTES + lacing.length + bodyBytes);
  const view = new DataView(page.buffer);
  view.setUint32(0, CAPTURE, true);
  view.setUint8(4, 0); // version
  view.setUint8(5, headerType);
  view.setBigInt64(6, BigInt(granule), true);
  view.setUint32(14, serial, true);
  view.setUint32(18, sequence, true);
  view.setUint32(22, 0, true); // checksum, computed over the page with this field zeroed
  view.setUint8(26, lacing.length);
  page.set(lacing, HEADER_BYTES);
  let offset = HEADER_BYTES + lacing.length;
  for (const packet of packets) {
    page.set(packet, offset);
    offset += packet.length;
  }
  view.setUint32(22, oggCrc(page), true);
  return page;
}

/**
 * Opus packets in, Ogg pages out: the two header pages first, then a page each time
 * `pageSamples` (48 kHz) of audio have gathered. Moshi steps 80 ms frames, so the
 * default page is 80 ms: one page per frame, sent as soon as the frame is encoded.
 */
export class OggOpusWriter {
  constructor({ head = opusHead(), serial = (Math.random() * 2 ** 32) >>> 0, pageSamples = 3840 } = {}) {
    this.head = head;
    this.serial = serial;
    this.pageSamples = pageSamples;
    this.sequence = 0;
    this.granule = 0;
    this.pending = [];
    this.pendingSamples = 0;
    this.pendingSegments = 0;
  }

  /** Both header pages (OpusHead, then OpusTags), as one byte array. */
  headers() {
    if (this.sequence !== 0) throw new OggError("the headers were already written");
    const first = this.#page([this.head], FIRST_PAGE);
    const second = this.#page([opusTags()], 0);
    const bytes = new Uint8Array(first.length + second.length);
    bytes.set(first);
    bytes.set(second, first.length);
    return bytes;
  }

  /** Add one packet; returns a finished page (Uint8Array) or null. */
  push(packet) {
    const segments = Math.floor(packet.length / 255) + 1;
    let early = null;
    if (this.pendingSegments + segments > MAX_SEGMENTS) early = this.flush();
    this.pending.push(packet);
    this.pendingSegments += segments;
    this.pendingSamples += opusPacketSamples(packet);
    if (early) return early; // rare: huge packets; the next push completes the next page
    return this.pendingSamples >= this.pageSamples ? this.flush() : null;
  }

  /** The page of the packets gathered so far (null if none). */
  flush() {
    if (!this.pending.length) return null;
    this.granule += this.pendingSamples;
    const page = this.#page(this.pending, 0);
    this.pending = [];
    this.pendingSamples = 0;
    this.pendingSegments = 0;
    return page;
  }

  #page(packets, headerType) {
    const granule = headerType & FIRST_PAGE || isOpusTags(packets[0]) ? 0 : this.granule;
    return oggPage({ packets, granule, serial: this.serial, sequence: this.sequence++, headerType });
  }
}

/**
 * Ogg bytes in, in chunks of any size; whole, checked pages out, each with the
 * packets it completes (a packet may span pages). A bad capture pattern,
 * version or checksum throws OggError: the stream cannot be trusted after it.
 */
export class OggReader {
  constructor() {
    this.buffer = new Uint8Array(0);
    this.partial = []; // segments of a packet continued on the next page
  }

  /** Feed bytes; returns the pages completed by them: [{headerType, granule, serial, sequence, packets, bytes}]. */
  push(bytes) {
    this.buffer = concat([this.buffer, bytes]);
    const pages = [];
    let start = 0;
    for (;;) {
      const length = this.#pageLength(start);
      if (length === null) break;
      pages.push(this.#parse(this.buffer.subarray(start, start + length)));
      start += length;
    }
    this.buffer = this.buffer.slice(start);
    return pages;
  }

  #pageLength(start) {
    const buffer = this.buffer;
    const available = buffer.length - start;
    if (available < HEADER_BYTES) return null;
    const view = new DataView(buffer.buffer, buffer.byteOffset + start);
    if (view.getUint32(0, true) !== CAPTURE) throw new OggError("not an Ogg page: no 'OggS' capture pattern");
    if (view.getUint8(4) !== 0) throw new OggError(`unsupported Ogg version ${view.getUint8(4)}`);
    const segments = view.getUint8(26);
    if (available < HEADER_BYTES + segments) return null;
    let length = HEADER_BYTES + segments;
    for (let i = 0; i < segments; i++) length += buffer[start + HEADER_BYTES + i];
    return available < length ? null : length;
  }

  #parse(page) {
    const view = new DataView(page.buffer, page.byteOffset, page.byteLength);
    const copy = page.slice();
    copy.fill(0, 22, 26);
    if (oggCrc(copy) !== view.getUint32(22, true)) throw new OggError("corrupt Ogg page: checksum mismatch");
    const headerType = view.getUint8(5);
    const segments = view.getUint8(26);
    if (!(headerType & CONTINUED)) this.partial = [];
    const packets = [];
    let offset = HEADER_BYTES + segments;
    for (let i = 0; i < segments; i++) {
      const size = page[HEADER_BYTES + i];
      this.partial.push(page.subarray(offset, offset + size));
      offset += size;
      if (size < 255) {
        packets.push(concat(this.partial));
        this.partial = [];
      }
    }
    return {
      headerType,
      granule: Number(view.getBigInt64(6, true)),
      serial: view.getUint32(14, true),
      sequence: view.getUint32(18, true),
      packets,
      bytes: page,
    };
  }
}

function concat(arrays) {
  if (arrays.length === 1) return arrays[0].slice();
  const out = new Uint8Array(arrays.reduce((sum, a) => sum + a.length, 0));
  let offset = 0;
  for (const a of arrays) {
    out.set(a, offset);
    offset += a.length;
  }
  return out;
}
