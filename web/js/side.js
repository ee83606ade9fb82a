// side.js — the side panel: the selected token's summary, the ranked "Attends to" / "Attended by" lists, and the
// per-layer summary table that sets the layer filter.
//
// Rows carry data-pos (the position they name); a click scrolls the token view there, a double click selects it.
// Lists show at most MAX_ROWS rows (a sink token can be attended by every later token); the rest is counted.

import { visible, esc } from './text.js';

const MAX_ROWS = 120;

const pct = x => (x * 100 >= 10 ? (x * 100).toFixed(1) : (x * 100).toFixed(2)) + '%';

function ctxHtml(s, U, u) {
  const txt = v => (v < 0 || v >= U.nu ? '' : visible(unitText(s, U, v), s.ids[U.start[v]]));
  return `<span class="c">${esc(txt(u - 1))}</span><span class="t">${esc(txt(u))}</span><span class="c">${esc(txt(u + 1))}</span>`;
}

export function unitText(s, U, u) {
  const a = U.start[u], b = U.start[u + 1];
  if (b - a === 1) return s.texts[a];
  let t = '';
  for (let p = a; p < b; p++) { if (s.texts[p] == null) return null; t += s.texts[p]; }
  return t;
}

/** Render the list of one tab. items: [{u, pos, w, score, prob}] sorted by w, total: count before truncation. */
export function renderList(el, tab, items, total, s, U, selU, threshold, weightKind) {
  el.className = `side-list ${tab}`;
  if (!items) { el.innerHTML = ''; return; }
  if (!items.length) {
    el.innerHTML = `<div class="more">${tab === 'to' ? 'No attention entry for this token in this layer.' : 'No later token attends to this one (in its top-k).'}</div>`;
    return;
  }
  const max = items[0].w || 1, parts = [];
  const selPos = U.start[selU];
  for (let i = 0; i < items.length && i < MAX_ROWS; i++) {
    const it = items[i];
    const d = tab === 'to' ? selPos - it.pos : it.pos - selPos;
    const main = weightKind === 'prob' ? it.prob : it.score, other = weightKind === 'prob' ? it.score : it.prob;
    parts.push(`<div class="r${it.w < threshold ? ' below' : ''}" data-pos="${it.pos}" data-rank="${i + 1}">` +
      `<span class="rank">${i + 1}</span><span class="ctx">${ctxHtml(s, U, it.u)}</span>` +
      `<span class="num">${pct(main)}<span class="p">${weightKind === 'prob' ? 'score' : 'prob'} ${pct(other)}</span></span>` +
      `<span></span><span class="dist">${d === 0 ? 'self' : (tab === 'to' ? `${d} back` : `${d} later`)} · pos ${it.pos}</span>` +
      `<span class="bar"><i style="width:${(100 * it.w / max).toFixed(1)}%"></i></span></div>`);
  }
  if (total > MAX_ROWS) parts.push(`<div class="more">… ${total - MAX_ROWS} more</div>`);
  el.innerHTML = parts.join('');
}

/** The selection summary. info: {pos, end, u, entry, nq, mass, lse, shownProb, nTargets, nSources, key}. */
export function renderInfo(el, s, U, info, app) {
  if (!info) { el.innerHTML = s ? 'No token selected. Click a token (or use ← →).' : 'No token selected.'; return; }
  const text = visible(unitText(s, U, info.u), s.ids[info.pos]);
  const seg = s.segments().find(g => info.pos >= g.a && info.pos < g.b);
  const e = info.entry;
  const lp = s.logprobs?.[info.pos];
  el.innerHTML = `<div><span class="tokname">${esc(text)}</span> <span class="k">pos</span> ${info.pos}${info.end - info.pos > 1 ? `–${info.end - 1}` : ''}` +
    ` <span class="k">id</span> ${s.ids[info.pos] ?? '?'} <span class="k">·</span> ${seg ? seg.name : ''}` +
    (lp != null ? ` <span class="k">sampled p</span> ${pct(Math.exp(lp))}` : '') + '</div>' +
    (e ? `<div><span class="k">layer</span> ${app.viewSel.layer}${app.viewSel.head != null ? ` <span class="k">head</span> ${app.viewSel.head}` : ''}` +
      ` <span class="k">step</span> ${e.step ?? '–'} <span class="k">top-k mass</span> <b id="sel-mass">${pct(info.mass)}</b>` +
      ` <span class="k">shown prob</span> ${pct(info.shownProb)}</div>` +
      `<div><span class="k">links</span> ${info.nTargets} out, ${info.nSources} in <span class="k">logsumexp</span> ${e.lse.toFixed(3)}${e.prefill ? ' <span class="k">(prefill row)</span>' : ''}</div>`
      : `<div class="k">No attention entry at this position in this layer${info.nSources ? '' : ''}; ${info.nSources} later token(s) attend to it.</div>`);
}

/** Per-layer summary rows (entries, mean top-k mass, mean sink probability, mean distance). */
export function layerSummary(s, N) {
  const rows = [];
  for (const l of s.layerList()) {
    const key = s.keyOf({ layer: l, head: null });
    let n = 0, mass = 0, sink = 0, dist = 0;
    for (const q of s.positions(key)) {
      if (q >= N) continue;
      const e = s.entry(q, key);
      if (!e) continue;
      n++; mass += e.mass;
      let wsum = 0, dsum = 0;
      for (let i = 0; i < e.pos.length; i++) {
        const p = Math.exp(e.logit[i] - e.lse);
        if (e.pos[i] === 0) sink += p;
        wsum += p; dsum += p * (q - e.pos[i]);
      }
      dist += wsum > 0 ? dsum / wsum : 0;
    }
    rows.push({ layer: l, n, mass: n ? mass / n : 0, sink: n ? sink / n : 0, dist: n ? dist / n : 0, heads: s.headList(l).length });
  }
  return rows;
}

export function renderLayers(el, rows, cur) {
  el.innerHTML = rows.map(r => `<tr data-layer="${r.layer}" class="${r.layer === cur ? 'on' : ''}"><td>L${r.layer}${r.heads ? ` <small>(${r.heads}h)</small>` : ''}</td><td>${r.n}</td>` +
    `<td>${pct(r.mass)}<span class="cellbar" style="width:${Math.round(30 * r.mass)}px"></span></td>` +
    `<td>${pct(r.sink)}</td><td>${r.dist.toFixed(1)}</td></tr>`).join('');
}
