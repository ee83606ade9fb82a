// records.js — between the relay's response entries, attnx records, sessions and recording files.
//
// A streamed reply's `attention_tokens` / `prompt_attention` entries (relay, DESIGN §4) are turned into the same
// `attn` records the /ws feed and attnx-tail carry (one per layer, and per head in heads mode), so one ingest path
// (Session.add) serves streams, the live feed and files.
// Recordings: JSON lines of records (what this page saves, and what `attnx-tail` prints), or the msgpack stream of
// `attnx-tail --record` (frames = arrays of records). The page's own files add keys that proto readers ignore
// (proto/README.md: unknown keys are ignored): `prompt_text`, `model`, `request` on `req`; `output`, `output_text`
// on `end`; so a saved file keeps the token texts and still reads as plain records.

import { decodeAll } from './msgpack.js';
import { Session } from './session.js';

const FIELDS = ['token_positions', 'attention_scores', 'topk_logits', 'logsumexp_all', 'topk_mass'];

function attnRecord(rid, ent, lay, head) {
  const r = { t: 'attn', v: 1, src: 'web', seq: 0, rid, position: ent.position, decode_step: ent.decode_step ?? 0,
    token_id: ent.token_id ?? -1, layer_id: lay.layer_id ?? ent.layer_id, mode: lay.mode || ent.mode || 'mean_logit' };
  if (head) r.head_id = head.head_id;
  const src = head || lay;
  for (const f of FIELDS) r[f] = src[f];
  if (ent.prefill) r.prefill = 1;
  if (ent.text != null) r.text = ent.text;
  return r;
}

/** attn records of one response entry (all its layers and heads). */
export function entryRecords(rid, ent) {
  const out = [];
  const layers = ent.layers ? Object.values(ent.layers) : [ent];
  for (const lay of layers) {
    const heads = lay.heads || (lay === ent ? null : null);
    if (heads && heads.length) for (const h of heads) out.push(attnRecord(rid, ent, lay, h));
    else if (lay === ent && ent.heads && ent.heads.length) for (const h of ent.heads) out.push(attnRecord(rid, ent, ent, h));
    else out.push(attnRecord(rid, ent, lay, null));
  }
  return out;
}

/** All records of a session, in a replayable order (req, attn by position, end). */
export function sessionRecords(s) {
  let seq = 0;
  const out = [];
  const P = Math.max(0, s.P);
  const req = { t: 'req', v: 1, src: 'web', seq: seq++, rid: s.rid, prompt: [], prompt_len: P, prompt_text: [] };
  for (let i = 0; i < P; i++) { req.prompt.push(s.ids[i] ?? 0); req.prompt_text.push(s.texts[i] ?? null); }
  if (s.meta.model) req.model = s.meta.model;
  if (s.meta.request) req.request = s.meta.request;
  out.push(req);
  const keys = [...s.store.keys()].filter(k => !k.endsWith('h*')).sort();
  const byPos = [];
  for (const k of keys) s.store.get(k).forEach((e, p) => { if (e) (byPos[p] || (byPos[p] = [])).push([k, e]); });
  byPos.forEach((list, p) => {
    for (const [k, e] of list) {
      const m = /^L(\d+)(?:h(\d+))?$/.exec(k);
      const r = { t: 'attn', v: 1, src: 'web', seq: seq++, rid: s.rid, position: p, decode_step: e.step ?? 0,
        token_id: s.ids[p] ?? -1, layer_id: +m[1], mode: m[2] != null ? 'heads' : (s.mode === 'heads' ? 'mean_logit' : s.mode || 'mean_logit') };
      if (m[2] != null) r.head_id = +m[2];
      r.token_positions = Array.from(e.pos); r.topk_logits = Array.from(e.logit);
      r.attention_scores = Array.from(e.score); r.logsumexp_all = e.lse; r.topk_mass = e.mass;
      if (e.prefill) r.prefill = 1;
      out.push(r);
    }
  });
  const end = { t: 'end', v: 1, src: 'web', seq: seq++, rid: s.rid, reason: s.reason || (s.ended ? 'stop' : 'abort'),
    tokens: s.n, output: [], output_text: [] };
  for (let p = P; p < s.n; p++) { end.output.push(s.ids[p] ?? -1); end.output_text.push(s.texts[p] ?? null); }
  out.push(end);
  return out;
}

export function toJsonLines(records) { return records.map(r => JSON.stringify(r)).join('\n') + '\n'; }

/** Records of a recording file's bytes: JSON lines / a JSON array, or a msgpack stream of frames. */
export function parseRecording(bytes) {
  let i = 0;
  while (i < bytes.length && (bytes[i] === 0x20 || bytes[i] === 0x0a || bytes[i] === 0x0d || bytes[i] === 0x09)) i++;
  const out = [];
  const push = v => {
    if (Array.isArray(v)) { for (const r of v) if (r && typeof r === 'object' && r.t) out.push(r); }
    else if (v && typeof v === 'object' && v.t) out.push(v);
  };
  if (bytes[i] === 0x7b /* { */) {
    const text = new TextDecoder().decode(bytes);
    let ln = 0;
    for (const line of text.split('\n')) {
      ln++;
      const l = line.trim();
      if (!l) continue;
      try { push(JSON.parse(l)); } catch (e) { throw new Error(`line ${ln}: ${e.message}`); }
    }
    return out;
  }
  if (bytes[i] === 0x5b /* [ */ && bytes.length > i + 1 && bytes[i + 1] !== undefined) {
    // a JSON array, unless it is msgpack (0x5b is not a msgpack array header, it is the positive fixint 91)
    try { const v = JSON.parse(new TextDecoder().decode(bytes)); push(v); return out; } catch { /* msgpack */ }
  }
  try {
    decodeAll(bytes, push);
  } catch (e) {
    // a recording cut in the middle of a frame (attnx-tail still writing, or killed): keep the complete frames
    if (!out.length) throw e;
    out.truncated = e.message;
  }
  return out;
}

/** Sessions of a record list, by rid, in order of first appearance. Records without rid are skipped. */
export function sessionsOf(records, origin) {
  const m = new Map();
  let hello = null;
  for (const r of records) {
    if (r.t === 'hello') { hello = r; continue; }
    if (!r.rid) continue;
    let s = m.get(r.rid);
    if (!s) { m.set(r.rid, s = new Session(r.rid, origin)); if (hello) s.meta.model = hello.model; }
    s.add(r);
  }
  return [...m.values()];
}
