// gen.mjs — synthetic recordings for the browser tests: a long request (50,000 positions by default) as JSON lines
// in the page's own format (records with prompt_text / output_text), with a top-k entry per query position that
// mixes the patterns real models show (sink at 0, self, previous tokens, a few far keys), valid per
// proto/README.md (logits non-increasing, scores a softmax over the top-k, mass = Σ exp(logit − lse)).

import fs from 'node:fs';

const WORDS = ['the', ' model', ' attends', ' to', ' a', ' token', ',', ' and', ' then', ' writes', '.', '\n', ' sum',
  ' of', ' 347', ' +', ' 586', ' =', ' 933', ' value', ' key', ':', ' list', ' carry', ' one'];

function rng(seed) {
  let s = seed >>> 0;
  return () => ((s = (s * 1664525 + 1013904223) >>> 0) / 4294967296);
}

/** Write the recording to file; returns {P, n, rid, entry(p)} where entry gives the written top-k of p. */
export function writeLong(file, n = 50000, P = 2000, k = 10) {
  const r = rng(12345), rid = 'ax-long000000000001';
  const ids = [], texts = [];
  for (let p = 0; p < n; p++) {
    const w = p === P ? '<think>' : p === P + 500 ? '</think>' : WORDS[Math.floor(r() * WORDS.length)];
    texts.push(w); ids.push(p === P ? 4096 : p === P + 500 ? 4097 : 100 + WORDS.indexOf(w));
  }
  const fd = fs.openSync(file, 'w');
  const out = [];
  const flush = () => { fs.writeSync(fd, out.join('')); out.length = 0; };
  out.push(JSON.stringify({ t: 'req', v: 1, src: 'web', seq: 0, rid, prompt: ids.slice(0, P), prompt_len: P,
    prompt_text: texts.slice(0, P), model: 'synthetic' }) + '\n');
  const entries = new Map();
  let seq = 1;
  for (let q = P - 1; q < n; q++) {
    const set = new Set([0, q]);
    for (let d = 1; d <= 3 && set.size < k; d++) if (q - d >= 0) set.add(q - d);
    while (set.size < Math.min(k, q + 1)) set.add(Math.floor(r() * (q + 1)));
    const pos = [...set];
    const logit = pos.map(t => (t === 0 ? 9 : t === q ? 6 : 4) + 3 * r());
    const order = pos.map((_, i) => i).sort((a, b) => logit[b] - logit[a] || pos[a] - pos[b]);
    const tp = order.map(i => pos[i]), tl = order.map(i => Math.fround(logit[i]));
    const mx = tl[0], se = tl.reduce((s, l) => s + Math.exp(l - mx), 0);
    const lse = mx + Math.log(se) + Math.log(1 + r()); // the rest of the keys hold the remaining mass
    const scores = tl.map(l => Math.fround(Math.exp(l - mx) / se));
    const mass = tl.reduce((s, l) => s + Math.exp(l - lse), 0);
    const rec = { t: 'attn', v: 1, src: 'web', seq: seq++, rid, position: q, decode_step: q >= P ? q - P : 0,
      token_id: ids[q], layer_id: 5, mode: 'mean_logit', token_positions: tp, topk_logits: tl, attention_scores: scores,
      logsumexp_all: lse, topk_mass: mass };
    if (q < P) rec.prefill = 1;
    entries.set(q, tp);
    out.push(JSON.stringify(rec) + '\n');
    if (out.length >= 2000) flush();
  }
  out.push(JSON.stringify({ t: 'end', v: 1, src: 'web', seq: seq++, rid, reason: 'length', tokens: n,
    output: ids.slice(P), output_text: texts.slice(P) }) + '\n');
  flush();
  fs.closeSync(fd);
  return { P, n, rid, entries };
}
