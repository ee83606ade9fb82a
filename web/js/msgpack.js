// msgpack.js — a small msgpack decoder (and the encoder the tests use), enough for attnx recordings.
//
// An `attnx-tail --record` file is a plain concatenation of frames, each frame one msgpack array of record maps
// (tail/README.md). decodeAll() reads such a stream value by value. The decoder works on a DataView over the bytes,
// refuses truncated input, containers that claim more entries than bytes remain, and nesting deeper than 32, with
// an Error that names the offset; it never allocates from an untrusted length before checking it against the input.
// Map keys become object keys (strings; other key types are stringified); 64-bit integers become Numbers (exact to
// 2^53), ext values become null.

const MAX_DEPTH = 32;
const utf8 = new TextDecoder('utf-8');

export class MsgpackError extends Error {}

class Reader {
  constructor(bytes) {
    this.b = bytes;
    this.v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.o = 0;
  }
  need(n) {
    if (this.o + n > this.b.length) throw new MsgpackError(`truncated at byte ${this.o} (need ${n} more)`);
  }
  u8() { this.need(1); return this.b[this.o++]; }
  u16() { this.need(2); const x = this.v.getUint16(this.o); this.o += 2; return x; }
  u32() { this.need(4); const x = this.v.getUint32(this.o); this.o += 4; return x; }
  i8() { this.need(1); const x = this.v.getInt8(this.o); this.o += 1; return x; }
  i16() { this.need(2); const x = this.v.getInt16(this.o); this.o += 2; return x; }
  i32() { this.need(4); const x = this.v.getInt32(this.o); this.o += 4; return x; }
  u64() { this.need(8); const x = this.v.getBigUint64(this.o); this.o += 8; return Number(x); }
  i64() { this.need(8); const x = this.v.getBigInt64(this.o); this.o += 8; return Number(x); }
  f32() { this.need(4); const x = this.v.getFloat32(this.o); this.o += 4; return x; }
  f64() { this.need(8); const x = this.v.getFloat64(this.o); this.o += 8; return x; }
  str(n) { this.need(n); const s = utf8.decode(this.b.subarray(this.o, this.o + n)); this.o += n; return s; }
  bin(n) { this.need(n); const s = this.b.slice(this.o, this.o + n); this.o += n; return s; }
  // Every element takes at least one byte: a count beyond the bytes left is a lie.
  count(n, per) {
    if (n * per > this.b.length - this.o) throw new MsgpackError(`container of ${n} at byte ${this.o} exceeds the input`);
    return n;
  }
}

function array(r, n, depth) {
  r.count(n, 1);
  const a = new Array(n);
  for (let i = 0; i < n; i++) a[i] = value(r, depth + 1);
  return a;
}

function map(r, n, depth) {
  r.count(n, 2);
  const o = {};
  for (let i = 0; i < n; i++) {
    const k = value(r, depth + 1);
    o[typeof k === 'string' ? k : String(k)] = value(r, depth + 1);
  }
  return o;
}

function ext(r, n) { r.u8(); r.bin(n); return null; }

function value(r, depth) {
  if (depth > MAX_DEPTH) throw new MsgpackError(`nesting deeper than ${MAX_DEPTH} at byte ${r.o}`);
  const c = r.u8();
  if (c <= 0x7f) return c;
  if (c >= 0xe0) return c - 0x100;
  if ((c & 0xf0) === 0x80) return map(r, c & 0x0f, depth);
  if ((c & 0xf0) === 0x90) return array(r, c & 0x0f, depth);
  if ((c & 0xe0) === 0xa0) return r.str(c & 0x1f);
  switch (c) {
    case 0xc0: return null;
    case 0xc2: return false;
    case 0xc3: return true;
    case 0xc4: return r.bin(r.u8());
    case 0xc5: return r.bin(r.u16());
    case 0xc6: return r.bin(r.u32());
    case 0xc7: return ext(r, r.u8());
    case 0xc8: return ext(r, r.u16());
    case 0xc9: return ext(r, r.u32());
    case 0xca: return r.f32();
    case 0xcb: return r.f64();
    case 0xcc: return r.u8();
    case 0xcd: return r.u16();
    case 0xce: return r.u32();
    case 0xcf: return r.u64();
    case 0xd0: return r.i8();
    case 0xd1: return r.i16();
    case 0xd2: return r.i32();
    case 0xd3: return r.i64();
    case 0xd4: return ext(r, 1);
    case 0xd5: return ext(r, 2);
    case 0xd6: return ext(r, 4);
    case 0xd7: return ext(r, 8);
    case 0xd8: return ext(r, 16);
    case 0xd9: return r.str(r.u8());
    case 0xda: return r.str(r.u16());
    case 0xdb: return r.str(r.u32());
    case 0xdc: return array(r, r.u16(), depth);
    case 0xdd: return array(r, r.u32(), depth);
    case 0xde: return map(r, r.u16(), depth);
    case 0xdf: return map(r, r.u32(), depth);
  }
  throw new MsgpackError(`invalid type byte 0x${c.toString(16)} at byte ${r.o - 1}`);
}

/** Decode exactly one value; throws MsgpackError on malformed, truncated or trailing bytes. */
export function decode(bytes) {
  const r = new Reader(bytes);
  const v = value(r, 0);
  if (r.o !== bytes.length) throw new MsgpackError(`${bytes.length - r.o} bytes after the value`);
  return v;
}

/** Decode a stream of concatenated values. Calls onValue(v) per value; returns the number of values.
 *  A cut in the middle of a value throws MsgpackError after the complete values were delivered. */
export function decodeAll(bytes, onValue) {
  const r = new Reader(bytes);
  let n = 0;
  while (r.o < bytes.length) {
    onValue(value(r, 0));
    n++;
  }
  return n;
}

// ---- encoder (used by the tests to write tail-format recordings; floats are float64, ints the smallest form)

const utf8e = new TextEncoder();

export function encode(v) {
  const out = [];
  put(out, v);
  let len = 0;
  for (const p of out) len += p.length;
  const b = new Uint8Array(len);
  let o = 0;
  for (const p of out) { b.set(p, o); o += p.length; }
  return b;
}

function head(out, n, fix, fixMax, c16, c32) {
  if (n <= fixMax) out.push(Uint8Array.of(fix | n));
  else if (n < 0x10000) out.push(Uint8Array.of(c16, n >> 8, n & 255));
  else out.push(Uint8Array.of(c32, n >>> 24, (n >> 16) & 255, (n >> 8) & 255, n & 255));
}

function putInt(out, v) {
  if (v >= 0 && v <= 0x7f) return out.push(Uint8Array.of(v));
  if (v < 0 && v >= -32) return out.push(Uint8Array.of(v & 0xff));
  const b = new Uint8Array(9);
  const d = new DataView(b.buffer);
  if (v >= 0 && v < 0x100) { b[0] = 0xcc; b[1] = v; return out.push(b.subarray(0, 2)); }
  if (v >= 0 && v < 0x10000) { b[0] = 0xcd; d.setUint16(1, v); return out.push(b.subarray(0, 3)); }
  if (v >= 0 && v < 0x100000000) { b[0] = 0xce; d.setUint32(1, v); return out.push(b.subarray(0, 5)); }
  if (v >= -0x80000000 && v < 0) { b[0] = 0xd2; d.setInt32(1, v); return out.push(b.subarray(0, 5)); }
  b[0] = 0xd3; d.setBigInt64(1, BigInt(v)); return out.push(b);
}

function put(out, v) {
  if (v === null || v === undefined) return out.push(Uint8Array.of(0xc0));
  if (v === true || v === false) return out.push(Uint8Array.of(v ? 0xc3 : 0xc2));
  if (typeof v === 'number') {
    if (Number.isInteger(v) && !Object.is(v, -0)) return putInt(out, v);
    const b = new Uint8Array(9); b[0] = 0xcb; new DataView(b.buffer).setFloat64(1, v); return out.push(b);
  }
  if (typeof v === 'string') {
    const s = utf8e.encode(v);
    if (s.length < 32) out.push(Uint8Array.of(0xa0 | s.length));
    else if (s.length < 256) out.push(Uint8Array.of(0xd9, s.length));
    else head(out, s.length, 0, -1, 0xda, 0xdb);
    return out.push(s);
  }
  if (Array.isArray(v) || ArrayBuffer.isView(v)) {
    head(out, v.length, 0x90, 15, 0xdc, 0xdd);
    for (const x of v) put(out, x);
    return;
  }
  const keys = Object.keys(v).filter(k => v[k] !== undefined);
  head(out, keys.length, 0x80, 15, 0xde, 0xdf);
  for (const k of keys) { put(out, k); put(out, v[k]); }
}
