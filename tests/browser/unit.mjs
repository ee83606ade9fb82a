// unit.mjs — node unit tests of the page's data modules (no browser): the msgpack decoder on good, cut and hostile
// input, recording parsing, the session's alignment and reverse index, weights with the sink toggle, and token
// text decoding. run.mjs runs these first; each case is a row of a table.

import { decode, decodeAll, encode, MsgpackError } from '../../web/js/msgpack.js';
import { parseRecording, sessionsOf, sessionRecords, entryRecords } from '../../web/js/records.js';
import { Session, edgesOf, sourcesOf, sourcesByUnit } from '../../web/js/session.js';
import { pieceToText, visible, startsWord } from '../../web/js/text.js';

const u8 = (...b) => Uint8Array.from(b);
const attn = (p, step, pos, logits, lse, extra = {}) => {
  const m = Math.max(...logits), z = logits.reduce((s, l) => s + Math.exp(l - m), 0);
  return { t: 'attn', v: 1, src: 'c', seq: p, rid: 'ax-1', position: p, decode_step: step, token_id: 100 + p, layer_id: 3,
    mode: 'mean_logit', token_positions: pos, topk_logits: logits, attention_scores: logits.map(l => Math.exp(l - m) / z),
    logsumexp_all: lse, topk_mass: logits.reduce((s, l) => s + Math.exp(l - lse), 0), ...extra };
};

/** A session of n positions whose entries (from position 1 on) name k positions each, always 0 (the sink, so it
 *  has more than 800 sources and the top-400 cut runs) and q itself, the rest random; weights random. */
function randomSession(n, k, seed) {
  let x = seed >>> 0;
  const r = () => ((x = (Math.imul(x, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  const s = new Session('ax-r', 'file');
  for (let q = 1; q < n; q++) {
    const set = new Set([0, q]);
    while (set.size < Math.min(k, q + 1)) set.add(Math.floor(r() * (q + 1)));
    const pos = [...set], logits = pos.map(() => 4 * r());
    s.add(attn(q, q, pos, logits, Math.max(...logits) + 2 + r()));
  }
  return s;
}
const sameSources = (x, y) => x.total === y.total && x.list.length === y.list.length &&
  x.list.every((o, i) => o.u === y.list[i].u && o.pos === y.list[i].pos && Math.abs(o.w - y.list[i].w) < 1e-12 &&
    Math.abs(o.score - y.list[i].score) < 1e-12 && Math.abs(o.prob - y.list[i].prob) < 1e-12) &&
  x.w.length === y.w.length && x.w.every((v, i) => v === y.w[i]);

const throwsMp = (bytes) => { try { decode(bytes); return false; } catch (e) { return e instanceof MsgpackError; } };

const frame = [attn(5, 1, [0, 5, 4], [2, 1.5, 1], 3), { t: 'end', v: 1, src: 'c', seq: 9, rid: 'ax-1', reason: 'stop', tokens: 7 }];

export const cases = [
  ['msgpack: every type decodes (fixint, ints, floats, str, bin, array, map, nil, bool)', () => {
    const v = { a: 1, b: -3, c: 300, d: -70000, e: 1.5, f: 'x'.repeat(40), g: [true, false, null], h: 2 ** 40, i: -(2 ** 40) };
    const back = decode(encode(v));
    return JSON.stringify(back) === JSON.stringify(v);
  }],
  ['msgpack: float32 and uint64 / int64 forms', () =>
    decode(u8(0xca, 0x3f, 0xc0, 0, 0)) === 1.5 && decode(u8(0xcf, 0, 0, 0, 1, 0, 0, 0, 0)) === 2 ** 32 &&
    decode(u8(0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe)) === -2],
  ['msgpack: a tail recording (frames back to back) decodes frame by frame', () => {
    const a = encode(frame), b = encode([frame[0]]);
    const both = new Uint8Array(a.length + b.length); both.set(a); both.set(b, a.length);
    const got = [];
    return decodeAll(both, v => got.push(v)) === 2 && got[0].length === 2 && got[1][0].position === 5;
  }],
  ['msgpack: truncation at every offset throws MsgpackError', () => {
    const b = encode(frame);
    for (let i = 0; i < b.length; i++) if (!throwsMp(b.subarray(0, i))) return false;
    return true;
  }],
  ['msgpack: a container claiming 2^32-1 entries throws without allocating', () => throwsMp(u8(0xdd, 0xff, 0xff, 0xff, 0xff, 1))],
  ['msgpack: a map claiming more pairs than bytes throws', () => throwsMp(u8(0xdf, 0, 1, 0, 0, 0xa1, 0x61))],
  ['msgpack: nesting deeper than 32 throws', () => throwsMp(new Uint8Array(100).fill(0x91))],
  ['msgpack: the never-used byte 0xc1 throws', () => throwsMp(u8(0xc1))],
  ['msgpack: trailing bytes after one value throw', () => throwsMp(u8(1, 2))],
  ['recording: a msgpack file cut inside its second frame keeps the first', () => {
    const a = encode(frame), b = encode(frame);
    const cut = new Uint8Array(a.length + 5); cut.set(a); cut.set(b.subarray(0, 5), a.length);
    const recs = parseRecording(cut);
    return recs.length === 2 && !!recs.truncated;
  }],
  ['recording: JSON lines (blank lines skipped) and a bad line names its number', () => {
    const ok = parseRecording(new TextEncoder().encode(frame.map(r => JSON.stringify(r)).join('\n\n') + '\n'));
    let msg = '';
    try { parseRecording(new TextEncoder().encode(`${JSON.stringify(frame[0])}\n{"t":`)); } catch (e) { msg = e.message; }
    return ok.length === 2 && /line 2/.test(msg);
  }],
  ['session: P inferred from a decode row (position − decode_step) without a req', () => {
    const s = new Session('ax-1', 'live');
    s.add(attn(7, 3, [0, 7], [1, 1], 2));
    return s.P === 4 && s.n === 8 && s.ids[7] === 107;
  }],
  ['session: reverse index lists the queries naming a key, with weights', () => {
    const s = new Session('ax-1', 'file');
    s.add({ t: 'req', v: 1, src: 'c', seq: 0, rid: 'ax-1', prompt: [1, 2, 3], prompt_len: 3 });
    s.add(attn(3, 0, [0, 2], [2, 1], 3)); s.add(attn(4, 1, [2, 4], [2, 1], 3));
    const R = s.reverse('L3');
    return R.lists[2].filter((_, i) => i % 3 === 0).join() === '3,4' && Math.abs(R.p0[3] - Math.exp(-1)) < 1e-12;
  }],
  ['session: attended-by of one token (fast path) equals the per-unit aggregation, sink on and off, score and prob, cut N', () => {
    const s = randomSession(2600, 6, 7), U = s.units(false), N = s.n;
    if (!(s.reverse('L3').lists[0].length / 3 > 800)) return false;
    for (const t of [0, 1, 5, 300, 2599, 4000])
      for (const sink of [false, true]) for (const prob of [false, true]) for (const n of [N, 1500, 3]) {
        const f = sourcesOf(s, 'L3', U, t, t + 1, n, sink, prob), g = sourcesByUnit(s, 'L3', U, t, t + 1, n, sink, prob);
        if (!sameSources(f, g)) return false;
        if (t === 0 && !sink && n === N && !(f.total === 2599 && f.list.length === 400)) return false;
      }
    return true;
  }],
  ['session: attended-by counts a position recorded twice once, with its latest entry', () => {
    const s = randomSession(50, 4, 3);
    s.add(attn(20, 20, [0, 20, 7], [3, 2, 1], 4));
    s.reverse('L3'); // indexed before the second record arrives (as while streaming)
    s.add(attn(20, 20, [7, 0, 20], [3, 2, 1], 4));
    const f = sourcesOf(s, 'L3', s.units(false), 7, 8, s.n, false, false);
    const e = s.entry(20, 'L3'), mine = f.list.filter(o => o.u === 20);
    return e.pos[0] === 7 && mine.length === 1 && mine[0].score === e.score[0] && f.w[20] === Math.fround(e.score[0]) &&
      f.total === new Set(s.reverse('L3').lists[7].filter((_, i) => i % 3 === 0)).size;
  }],
  ['session: segments split on <think> and </think> in the reply only', () => {
    const s = new Session('', 'stream');
    s.setPrompt([1, 2], ['<think>', 'x']);
    ['<think>', 'a', '</think>', 'b'].forEach((t, i) => s.setToken(2 + i, null, t));
    const g = s.segments().map(x => `${x.kind}:${x.a}-${x.b}`).join(' ');
    return g === 'prompt:0-2 think:2-5 response:5-6';
  }],
  ['session: heads mean = mean of the heads\' true probabilities', () => {
    const s = new Session('ax-1', 'live');
    s.add(attn(3, 0, [0, 1], [0, -1], 0, { mode: 'heads', head_id: 0 }));
    s.add(attn(3, 0, [1, 0], [Math.log(0.5), Math.log(0.2)], 0, { mode: 'heads', head_id: 1 }));
    const e = s.entry(3, s.keyOf({ layer: 3, head: null }));
    const p0 = (1 + 0.2) / 2, p1 = (Math.exp(-1) + 0.5) / 2;
    return e.pos[0] === 0 && Math.abs(Math.exp(e.logit[0]) - p0) < 1e-12 && Math.abs(Math.exp(e.logit[1]) - p1) < 1e-12;
  }],
  ['weights: true prob = exp(logit − lse); sink toggle drops 0 and renormalises', () => {
    const e = { pos: [0, 5, 4], score: [0.5, 0.3, 0.2], logit: [2, 1.5, 1], lse: 3 };
    const a = edgesOf(e, false, 'prob'), b = edgesOf(e, true, 'score');
    return Math.abs(a[1].prob - Math.exp(-1.5)) < 1e-12 && b.length === 2 && Math.abs(b[0].score - 0.6) < 1e-12;
  }],
  ['records: a relay entry with layers and heads becomes one record per head', () => {
    const h = (id) => ({ head_id: id, token_positions: [0], attention_scores: [1], topk_logits: [1], logsumexp_all: 1, topk_mass: 1 });
    const ent = { position: 9, token_id: 5, text: 'a', layer_id: 1, mode: 'heads', decode_step: 2, token_positions: [0],
      attention_scores: [1], topk_logits: [1], logsumexp_all: 1, topk_mass: 1,
      layers: { 0: { layer_id: 0, mode: 'heads', heads: [h(0), h(1)] }, 1: { layer_id: 1, mode: 'heads', heads: [h(0), h(1)] } } };
    const r = entryRecords('ax-1', ent);
    return r.length === 4 && r.every(x => x.head_id != null && x.position === 9 && x.text === 'a');
  }],
  ['records: session → records → session keeps tokens, texts and entries', () => {
    const s = new Session('ax-1', 'stream');
    s.setPrompt([1, 2, 3], ['a', ' b', '\n']);
    s.add(attn(3, 0, [0, 2], [2, 1], 3)); s.setToken(3, null, 'x'); s.setToken(4, null, 'y');
    s.ended = true; s.reason = 'length';
    const t = sessionsOf(sessionRecords(s), 'file')[0];
    return t.n === 5 && t.P === 3 && t.texts.join('|') === s.texts.join('|') && t.entry(3, 'L3').pos.join() === '0,2';
  }],
  ['text: byte-level pieces decode (Ġ space, Ċ newline, UTF-8 over bytes), specials stay', () =>
    pieceToText('Ġis') === ' is' && pieceToText('Ċ') === '\n' && pieceToText('Ã©') === 'é' &&
    pieceToText('<|im_end|>') === '<|im_end|>' && pieceToText('▁the') === ' the'],
  ['text: visible whitespace and word starts', () =>
    visible(' a\n') === '·a⏎' && visible(null, 7) === '#7' && startsWord(' x', 'a') && !startsWord('ing', 'walk') && startsWord(',', 'a')],
];

/** Run the table; returns [passed, failed]. */
export function runUnit(log) {
  let pass = 0, fail = 0;
  for (const [name, fn] of cases) {
    let ok = false, err = '';
    try { ok = fn() === true; } catch (e) { err = `: ${e.message}`; }
    if (ok) pass++; else fail++;
    log(`${ok ? 'ok' : 'FAIL'} - unit: ${name}${err}`);
  }
  return [pass, fail];
}
