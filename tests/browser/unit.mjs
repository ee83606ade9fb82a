// unit.mjs — node unit tests of the page's data modules (no browser): the msgpack decoder on good, cut and hostile
// input, recording parsing, the session's alignment and reverse index, weights with the sink toggle, and token
// text decoding. run.mjs runs these first; each case is a row of a table.

import { decode, decodeAll, encode, MsgpackError } from '../../web/js/msgpack.js';
import { parseRecording, sessionsOf, sessionRecords, entryRecords } from '../../web/js/records.js';
import { Session, edgesOf } from '../../web/js/session.js';
import { pieceToText, visible, startsWord } from '../../web/js/text.js';

const u8 = (...b) => Uint8Array.from(b);
const attn = (p, step, pos, logits, lse, extra = {}) => {
  const m = Math.max(...logits), z = logits.reduce((s, l) => s + Math.exp(l - m), 0);
  return { t: 'attn', v: 1, src: 'c', seq: p, rid: 'ax-1', position: p, decode_step: step, token_id: 100 + p, layer_id: 3,
    mode: 'mean_logit', token_positions: pos, topk_logits: logits, attention_scores: logits.map(l => Math.exp(l - m) / z),
    logsumexp_all: lse, topk_mass: logits.reduce((s, l) => s + Math.exp(l - lse), 0), ...extra };
};
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
