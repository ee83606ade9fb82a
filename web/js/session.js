// session.js — one request's tokens and attention, whatever it came from (a streamed reply, the /ws feed, a file).
//
// Everything enters as attnx records (proto/README.md): `req` gives the prompt ids, `attn` one top-k entry of one
// (position, layer[, head]), `end` the reason. Positions are absolute over prompt + output (DESIGN §1): the entry of
// position p is the forward whose query is the token at p. Entries are stored per key — "L5" for a layer in a mean
// mode, "L5h3" for one head, and "L5h*" for the mean over the captured heads of a layer, computed on demand from
// the head entries (mean of their true probabilities, so it reads like mode mean_prob). `version` grows with every
// change so views redraw only when needed.
//
// For "attended by" a reverse index per key (key position → query positions) is built incrementally from the
// key's append log, so streaming adds cost O(k) per entry and a selection never scans all entries.

import { startsWord } from './text.js';

export const SEG_NAMES = { prompt: 'Prompt', think: 'Thinking', response: 'Response' };

export class Session {
  constructor(rid, origin) {
    this.rid = rid || '';
    this.origin = origin;      // 'stream' | 'live' | 'file'
    this.P = -1;               // prompt length, -1 unknown
    this.ids = [];             // token id at each position (undefined unknown)
    this.texts = [];           // token text at each position (undefined unknown)
    this.n = 0;                // positions known
    this.layers = new Set();
    this.heads = new Map();    // layer → Set(head ids)
    this.store = new Map();    // key → entries by position
    this.logs = new Map();     // key → positions in arrival order
    this.revs = new Map();     // key → {lists, done}
    this.mode = null;
    this.ended = false;
    this.reason = null;
    this.version = 0;
    this.nRecords = 0;
    this.src = '';
    this.t0 = Date.now();
    this.tLast = this.t0;
    this.meta = {};            // model, prompt, settings (saved with the recording)
    this._seg = null;
    this._units = null;
  }

  grow(n) { if (n > this.n) { this.n = n; this.version++; } }

  setPrompt(ids, texts) {
    this.P = ids.length;
    for (let i = 0; i < ids.length; i++) {
      this.ids[i] = ids[i];
      if (texts && texts[i] != null) this.texts[i] = texts[i];
    }
    this.grow(ids.length);
    this.version++;
  }

  setToken(pos, id, text) {
    if (id != null && id >= 0) setDense(this.ids, pos, id);
    if (text != null) setDense(this.texts, pos, text);
    this.grow(pos + 1);
    this.version++;
  }

  /** Ingest one record (any type; unknown ones are ignored). */
  add(rec) {
    this.nRecords++;
    this.tLast = Date.now();
    if (rec.src && !this.src) this.src = rec.src;
    switch (rec.t) {
      case 'req':
        this.setPrompt(rec.prompt || [], rec.prompt_text);
        if (rec.model) this.meta.model = rec.model;
        if (rec.request) this.meta.request = rec.request;
        break;
      case 'attn': this.addAttn(rec); break;
      case 'end':
        this.ended = true;
        this.reason = rec.reason;
        if (Array.isArray(rec.output) && this.P >= 0)
          rec.output.forEach((id, i) => this.setToken(this.P + i, id, rec.output_text ? rec.output_text[i] : null));
        if (rec.tokens) this.grow(rec.tokens);
        this.version++;
        break;
    }
  }

  addAttn(rec) {
    const p = rec.position;
    if (!(p >= 0) || !Array.isArray(rec.token_positions)) return;
    if (rec.token_id >= 0 && this.ids[p] == null) setDense(this.ids, p, rec.token_id);
    if (rec.text != null && this.texts[p] == null) setDense(this.texts, p, rec.text);
    if (this.P < 0 && !rec.prefill && rec.decode_step >= 0) this.P = p - rec.decode_step;
    const e = {
      pos: rec.token_positions, score: rec.attention_scores, logit: rec.topk_logits,
      lse: rec.logsumexp_all, mass: rec.topk_mass, step: rec.decode_step, prefill: !!rec.prefill,
      token_id: rec.token_id,
    };
    const layer = rec.layer_id;
    this.layers.add(layer);
    this.mode = rec.mode || this.mode;
    if (rec.head_id != null) {
      let hs = this.heads.get(layer);
      if (!hs) this.heads.set(layer, hs = new Set());
      hs.add(rec.head_id);
      this.put(`L${layer}h${rec.head_id}`, p, e);
      const mean = `L${layer}h*`;
      setDense(this.table(mean), p, undefined); // recomputed on demand
      this.log(mean).push(p);
    } else {
      this.put(`L${layer}`, p, e);
    }
    let max = p + 1;
    for (const t of e.pos) if (t + 1 > max) max = t + 1;
    this.grow(max);
    this.version++;
  }

  table(key) {
    let a = this.store.get(key);
    if (!a) this.store.set(key, a = []);
    return a;
  }
  log(key) {
    let a = this.logs.get(key);
    if (!a) this.logs.set(key, a = []);
    return a;
  }
  put(key, p, e) { setDense(this.table(key), p, e); this.log(key).push(p); }

  /** Layers sorted ascending. */
  layerList() { return [...this.layers].sort((a, b) => a - b); }
  headList(layer) { return [...(this.heads.get(layer) || [])].sort((a, b) => a - b); }

  /** Store key for a view {layer, head}; head null = the layer's own entries or the mean over its heads. */
  keyOf(view) {
    if (view.layer == null) return null;
    if (view.head != null) return `L${view.layer}h${view.head}`;
    if (this.store.has(`L${view.layer}`)) return `L${view.layer}`;
    return this.heads.has(view.layer) ? `L${view.layer}h*` : `L${view.layer}`;
  }

  /** Entry of position p under key, or null. */
  entry(p, key) {
    const a = this.store.get(key);
    if (!a) return null;
    let e = a[p];
    if (e === undefined && key.endsWith('h*') && p < a.length) e = a[p] = this.meanOfHeads(p, +key.slice(1, -2));
    return e || null;
  }

  meanOfHeads(p, layer) {
    const acc = new Map();
    let nh = 0, k = 0, step = 0, prefill = false;
    for (const h of this.heads.get(layer) || []) {
      const e = this.entry(p, `L${layer}h${h}`);
      if (!e) continue;
      nh++;
      k = Math.max(k, e.pos.length);
      step = e.step; prefill = e.prefill;
      for (let i = 0; i < e.pos.length; i++)
        acc.set(e.pos[i], (acc.get(e.pos[i]) || 0) + Math.exp(e.logit[i] - e.lse));
    }
    if (!nh) return false;
    const items = [...acc].map(([t, s]) => [t, s / nh]).sort((a, b) => b[1] - a[1] || a[0] - b[0]).slice(0, k);
    const sum = items.reduce((s, x) => s + x[1], 0) || 1;
    return {
      pos: items.map(x => x[0]), score: items.map(x => x[1] / sum), logit: items.map(x => Math.log(x[1])),
      lse: 0, mass: sum, step, prefill, heads: nh,
    };
  }

  /** Reverse index of key: lists[t] = [q, score, prob, q, score, prob, …] for every query q whose entry names key
   *  position t (score = its top-k score, prob = its true probability), and s0[q] / p0[q] = the score / probability
   *  q gives to position 0 (for the sink toggle). For a mean-of-heads key (whose entries change while heads arrive)
   *  lists hold q only (stride 1) and callers read the entries. A q may repeat; callers dedupe. */
  reverse(key) {
    let r = this.revs.get(key);
    const mean = key.endsWith('h*');
    if (!r) this.revs.set(key, r = { lists: [], done: 0, stride: mean ? 1 : 3, s0: [], p0: [] });
    const log = this.logs.get(key) || [];
    for (; r.done < log.length; r.done++) {
      const q = log[r.done];
      const e = this.entry(q, key);
      if (!e) continue;
      if (!mean) { setDense(r.s0, q, 0); setDense(r.p0, q, 0); }
      for (let i = 0; i < e.pos.length; i++) {
        const t = e.pos[i];
        while (r.lists.length <= t) r.lists.push(null);
        const l = r.lists[t] || (r.lists[t] = []);
        if (mean) { l.push(q); continue; }
        const p = Math.exp(e.logit[i] - e.lse);
        l.push(q, e.score[i], p);
        if (t === 0) { r.s0[q] = e.score[i]; r.p0[q] = p; }
      }
    }
    return r;
  }

  /** Positions with an entry under key (ascending). */
  positions(key) {
    const a = this.store.get(key) || [];
    const out = [];
    if (key && key.endsWith('h*')) {
      for (const p of new Set(this.logs.get(key) || [])) out.push(p);
      return out.sort((x, y) => x - y);
    }
    a.forEach((e, p) => { if (e) out.push(p); });
    return out;
  }

  /** Prompt / Thinking / Response segments: [{kind, name, a, b}] over positions [a, b). */
  segments() {
    if (this._seg && this._seg.v === this.version) return this._seg.s;
    const N = this.n, P = this.P >= 0 ? Math.min(this.P, N) : 0;
    const segs = [];
    if (P > 0) segs.push({ kind: 'prompt', a: 0, b: P });
    let a = P, cur = 'response';
    for (let p = P; p < N; p++) {
      const t = this.texts[p];
      if (t == null) continue;
      if (cur !== 'think' && t.includes('<think>')) {
        if (p > a) segs.push({ kind: cur, a, b: p });
        a = p; cur = 'think';
      }
      if (cur === 'think' && t.includes('</think>')) {
        segs.push({ kind: 'think', a, b: p + 1 });
        a = p + 1; cur = 'response';
      }
    }
    if (N > a) segs.push({ kind: cur, a, b: N });
    segs.forEach(s => { s.name = SEG_NAMES[s.kind]; });
    this._seg = { v: this.version, s: segs };
    return segs;
  }

  /** Display units: tokens, or words (never across a segment). {start: Int32Array(nu + 1), unitOf: Int32Array(N), nu}. */
  units(words) {
    const u = this._units;
    if (u && u.v === this.version && u.words === words) return u;
    const N = this.n, start = new Int32Array(N + 1), unitOf = new Int32Array(N);
    const segStart = new Uint8Array(N + 1);
    for (const s of this.segments()) segStart[s.a] = 1;
    let nu = 0;
    for (let p = 0; p < N; p++) {
      if (!words || p === 0 || segStart[p] || startsWord(this.texts[p], this.texts[p - 1])) start[nu++] = p;
      unitOf[p] = nu - 1;
    }
    start[nu] = N;
    this._units = { v: this.version, words, start, unitOf, nu };
    return this._units;
  }

  /** Generated tokens so far (positions ≥ P). */
  generated() { return this.P >= 0 ? Math.max(0, this.n - this.P) : 0; }
}

/** a[p] = v, filling the gap with null so the array stays packed (V8 turns arrays written far past their end
 *  into slow dictionaries, which made every lookup of a 50,000-entry table cost microseconds). */
function setDense(a, p, v) {
  while (a.length < p) a.push(null);
  a[p] = v;
}

/** Weighted edges of an entry: [{t, score, prob, w}], best first. sink: drop position 0 and renormalise. */
export function edgesOf(e, sink, kind) {
  const n = e.pos.length, out = [];
  let restScore = 1, restProb = 1;
  if (sink) {
    const i0 = e.pos.indexOf(0);
    if (i0 >= 0) {
      restScore = 1 - e.score[i0] || 1;
      restProb = 1 - Math.exp(e.logit[i0] - e.lse) || 1;
    }
  }
  for (let i = 0; i < n; i++) {
    const t = e.pos[i];
    if (sink && t === 0) continue;
    const score = e.score[i] / restScore, prob = Math.exp(e.logit[i] - e.lse) / restProb;
    out.push({ t, score, prob, w: kind === 'prob' ? prob : score });
  }
  return out;
}

/** Weight of key t in entry e (0 if absent), with the same rules as edgesOf. */
export function weightOf(e, t, sink, kind) {
  const i = e.pos.indexOf(t);
  if (i < 0 || (sink && t === 0)) return 0;
  if (kind === 'prob') {
    let p = Math.exp(e.logit[i] - e.lse);
    if (sink) { const i0 = e.pos.indexOf(0); if (i0 >= 0) p /= (1 - Math.exp(e.logit[i0] - e.lse)) || 1; }
    return p;
  }
  let s = e.score[i];
  if (sink) { const i0 = e.pos.indexOf(0); if (i0 >= 0) s /= (1 - e.score[i0]) || 1; }
  return s;
}

/** Queries (< N) whose entries name a position in [a, b), aggregated per unit, strongest first.
 *  Returns {list: the 400 strongest, total, w: Float32Array of weights by unit (0 = not a source)}. */
export function sourcesOf(s, key, U, a, b, N, sink, byProb) {
  const R = s.reverse(key);
  if (!U.words && b === a + 1 && R.stride === 3) return sourcesOfToken(R, a, N, U.nu, sink, byProb);
  return sourcesByUnit(s, key, U, a, b, N, sink, byProb);
}

/** sourcesOf in general: links aggregated per unit (words, several positions, the mean of heads). */
export function sourcesByUnit(s, key, U, a, b, N, sink, byProb) {
  const R = s.reverse(key), rev = R.lists, st = R.stride;
  const w = new Float32Array(U.nu), sc = new Float64Array(U.nu), pr = new Float64Array(U.nu), cnt = new Int32Array(U.nu);
  const lastQ = new Int32Array(U.nu).fill(-1), units = [];
  for (let t = a; t < b; t++) {
    const list = rev[t];
    if (!list || (sink && t === 0)) continue;
    let last = -1;
    for (let j = 0; j < list.length; j += st) {
      const q = list[j];
      if (q >= N || q === last) continue;
      last = q;
      let vs, vp;
      if (st === 3) {
        vs = list[j + 1]; vp = list[j + 2];
        if (sink) { vs /= (1 - R.s0[q]) || 1; vp /= (1 - R.p0[q]) || 1; }
      } else {
        const e = s.entry(q, key), pos = e.pos;
        let i = -1, i0 = -1;
        for (let x = 0; x < pos.length; x++) { if (pos[x] === t) i = x; if (pos[x] === 0) i0 = x; }
        if (i < 0) continue;
        vs = e.score[i]; vp = Math.exp(e.logit[i] - e.lse);
        if (sink && i0 >= 0) { vs /= (1 - e.score[i0]) || 1; vp /= (1 - Math.exp(e.logit[i0] - e.lse)) || 1; }
      }
      const su = U.unitOf[q];
      if (!cnt[su]) units.push(su);
      if (lastQ[su] !== q) { cnt[su]++; lastQ[su] = q; }
      sc[su] += vs; pr[su] += vp;
    }
  }
  const n = units.length;
  const ws = new Float64Array(n);
  for (let k = 0; k < n; k++) {
    const u = units[k], c = cnt[u];
    if (c > 1) { sc[u] /= c; pr[u] /= c; }
    w[u] = ws[k] = byProb ? pr[u] : sc[u];
  }
  const cut = n > 800 ? topCut(ws, 400) : -1;
  const list = [];
  for (let k = 0; k < n; k++) {
    const u = units[k];
    if (ws[k] >= cut) list.push({ u, pos: U.start[u], w: ws[k], score: sc[u], prob: pr[u] });
  }
  list.sort((x, y) => y.w - x.w || x.pos - y.pos);
  if (list.length > 400) list.length = 400;
  return { list, total: n, w };
}

/** sourcesOf for one token of a per-layer (stride 3) reverse index, with token units: every source is its own
 *  unit, so there is nothing to aggregate. This is the click on a sink that every query attends to (tens of
 *  thousands of sources), and the first such click runs before the JIT has optimised anything, so the loops do
 *  as little as they can: one pass sets the weights and the maximum, one fills topCut's histogram, one collects. */
export function sourcesOfToken(R, t, N, nu, sink, byProb) {
  const w = new Float32Array(nu), list = R.lists[t];
  if (!list || (sink && t === 0)) return { list: [], total: 0, w };
  const off = byProb ? 2 : 1, z = byProb ? R.p0 : R.s0, at = new Int32Array(nu);
  const js = new Int32Array(list.length / 3), ws = new Float64Array(list.length / 3);
  let n = 0, max = 0;
  for (let j = 0; j < list.length; j += 3) {
    const q = list[j];
    if (q >= N) continue;
    let v = list[j + off];
    if (sink) v /= (1 - z[q]) || 1;
    if (v > max) max = v;
    w[q] = v;
    const i = at[q] - 1; // a position recorded twice counts once, with its latest entry
    if (i >= 0) { ws[i] = v; js[i] = j; continue; }
    ws[n] = v; js[n++] = j; at[q] = n;
  }
  const cut = n > 800 ? topCut(ws.subarray(0, n), 400, max) : -1;
  const keep = [];
  for (let k = 0; k < n; k++) {
    if (ws[k] < cut) continue;
    const j = js[k], q = list[j];
    let vs = list[j + 1], vp = list[j + 2];
    if (sink) { vs /= (1 - R.s0[q]) || 1; vp /= (1 - R.p0[q]) || 1; }
    keep.push({ u: q, pos: q, w: ws[k], score: vs, prob: vp });
  }
  keep.sort((x, y) => y.w - x.w || x.pos - y.pos);
  if (keep.length > 400) keep.length = 400;
  return { list: keep, total: n, w };
}

/** A value v such that at least n and few more of ws are ≥ v: one pass into 4096 buckets, after one for the
 *  maximum unless the caller knows it (max: at least every value of ws). */
function topCut(ws, n, max = -1) {
  if (max < 0)
    for (let i = 0; i < ws.length; i++) if (ws[i] > max) max = ws[i];
  if (!(max > 0)) return -1;
  const B = 4096, h = new Int32Array(B), sc = (B - 1) / max;
  for (let i = 0; i < ws.length; i++) h[Math.floor(ws[i] * sc)]++;
  let c = 0, b = B - 1;
  for (; b > 0; b--) { c += h[b]; if (c >= n) break; }
  return b / sc;
}
