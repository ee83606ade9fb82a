// tokens.js — the token view: chips in collapsible segments, virtualised, with curves to the selection's links.
//
// The page lays chips out itself instead of letting the browser flow 50,000 inline elements: every chip's width is
// the canvas-measured width of its text in the chip font (cached per text) plus padding, lines break greedily and
// after a newline token, and the result is a list of rows (segment headers and token lines) with a y each. Only
// the rows inside the viewport (± OVERSCAN px) exist in the DOM; scrolling re-renders that window as one HTML string.
// Highlights (selected, targets, sources) live in a map unit → weight and are applied to whichever chips exist, so
// a selection touches O(links) elements, never the whole sequence. Curves are SVG paths in content coordinates
// computed from the layout, so links to off-screen tokens are drawn too.
//
// A "unit" is a token, or a word when word aggregation is on (Session.units); chips carry data-pos (first position)
// and data-u (unit index).

import { visible, isSpecial, isWhitespace, esc } from './text.js';

const LINE_H = 24, SEG_H = 28, PAD = 4, BORDER = 1, GAP = 3, OVERSCAN = 240, MAX_CURVES = 96;
const FONT = '13px ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace';
const FONT_SPECIAL = '11px ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace';

export class TokenView {
  constructor(app) {
    this.app = app;
    this.scroller = document.getElementById('tokens');
    this.inner = document.getElementById('tokens-inner');
    this.rowsEl = document.getElementById('rows');
    this.svg = document.getElementById('curves');
    this.ctx = document.createElement('canvas').getContext('2d');
    this.wcache = new Map();
    this.collapsed = new Set();
    this.L = null;
    this.range = [-1, -1];
    this.els = new Map();
    this.marked = [];
    this.hl = null;         // {sel: Set(units), t: Map(u → w), s: Float32Array(units) of source weights}
    this.curves = null;     // {from: u, out: [[u, w]], in: [[u, w]]}
    this.width = 0;
    let raf = 0;
    this.scroller.addEventListener('scroll', () => {
      if (!raf) raf = requestAnimationFrame(() => { raf = 0; this.paint(); });
    });
    new ResizeObserver(() => {
      if (this.inner.clientWidth !== this.width) { this.relayout(); this.paint(true); this.drawCurves(); }
    }).observe(this.scroller);
    this.rowsEl.addEventListener('click', ev => this.onClick(ev));
  }

  onClick(ev) {
    const h = ev.target.closest('.seg-h');
    if (h) {
      const k = h.dataset.seg;
      if (this.collapsed.has(k)) this.collapsed.delete(k); else this.collapsed.add(k);
      this.relayout(); this.paint(true); this.drawCurves();
      return;
    }
    const c = ev.target.closest('.tok');
    if (c) this.app.select(+c.dataset.pos, ev);
  }

  measure(text, special) {
    const key = special ? '\u0001' + text : text;
    let w = this.wcache.get(key);
    if (w === undefined) {
      this.ctx.font = special ? FONT_SPECIAL : FONT;
      w = Math.ceil(this.ctx.measureText(text).width) + 2 * PAD + 2 * BORDER;
      this.wcache.set(key, w);
    }
    return w;
  }

  unitText(s, U, u) {
    const a = U.start[u], b = U.start[u + 1];
    if (b - a === 1) return s.texts[a];
    let t = '';
    for (let p = a; p < b; p++) { const x = s.texts[p]; if (x == null) return null; t += x; }
    return t;
  }

  /** Recompute the layout for the app's session, units and scrub limit. */
  relayout() {
    const s = this.app.session;
    this.width = this.inner.clientWidth;
    if (!s) { this.L = null; this.inner.style.height = '0px'; return; }
    const U = s.units(this.app.words);
    const limit = this.app.limit ?? s.n;
    const W = Math.max(120, this.width);
    const nu = U.nu;
    const unitX = new Float32Array(nu), unitW = new Float32Array(nu), unitRow = new Int32Array(nu).fill(-1);
    const disp = new Array(nu), cls = new Array(nu);
    const rowY = [], rowKind = [], rowA = [], rowB = [], rowSeg = [];
    let y = 0;
    const segs = s.segments();
    for (let si = 0; si < segs.length; si++) {
      const g = segs[si];
      if (g.a >= limit) break;
      const segKey = `${g.kind}:${g.a}`;
      const u0 = U.unitOf[g.a], u1 = g.b >= s.n ? nu : U.unitOf[g.b];
      rowY.push(y); rowKind.push(1); rowA.push(u0); rowB.push(u1); rowSeg.push(si);
      y += SEG_H;
      if (this.collapsed.has(segKey)) continue;
      let x = 0, rowStart = u0, newline = false;
      const pushRow = end => { rowY.push(y); rowKind.push(0); rowA.push(rowStart); rowB.push(end); rowSeg.push(si); y += LINE_H; };
      let u = u0;
      for (; u < u1 && U.start[u] < limit; u++) {
        const text = this.unitText(s, U, u);
        const p = U.start[u];
        const special = text != null && isSpecial(text);
        const shown = visible(text, s.ids[p]);
        const w = Math.min(W, this.measure(shown, special));
        if ((x > 0 && x + w > W) || newline) { pushRow(u); rowStart = u; x = 0; }
        unitX[u] = x; unitW[u] = w; unitRow[u] = rowY.length;
        disp[u] = shown;
        cls[u] = (g.kind === 'prompt' ? '' : g.kind === 'think' ? ' think' : ' gen') + (special ? ' special' : '') +
          (text != null && isWhitespace(text) ? ' ws' : '');
        x += w + GAP;
        newline = text != null && text.endsWith('\n');
      }
      if (u > rowStart) pushRow(u);
      y += 4;
    }
    this.L = { U, segs, unitX, unitW, unitRow, disp, cls, rowY, rowKind, rowA, rowB, rowSeg, height: y, limit };
    this.inner.style.height = `${y + 16}px`;
    this.svg.setAttribute('width', this.width);
    this.svg.setAttribute('height', y + 16);
  }

  /** Render the rows in the viewport; force re-renders even if the row range did not change. */
  paint(force) {
    const L = this.L;
    if (!L) { this.rowsEl.innerHTML = ''; this.els.clear(); this.range = [-1, -1]; return; }
    const top = this.scroller.scrollTop - OVERSCAN, bot = this.scroller.scrollTop + this.scroller.clientHeight + OVERSCAN;
    const r0 = Math.max(0, upper(L.rowY, top) - 1), r1 = Math.min(L.rowY.length, upper(L.rowY, bot));
    if (!force && r0 === this.range[0] && r1 === this.range[1]) return;
    this.range = [r0, r1];
    const s = this.app.session, key = this.app.key(), parts = [];
    const hasEntry = key ? (s.store.get(key) || []) : [];
    const meanKey = key && key.endsWith('h*') ? s.logs.get(key) : null;
    const meanSet = meanKey && this._meanSetFor(meanKey);
    for (let r = r0; r < r1; r++) {
      if (L.rowKind[r] === 1) {
        const g = L.segs[L.rowSeg[r]];
        const k = `${g.kind}:${g.a}`;
        const n = Math.min(g.b, L.limit) - g.a;
        parts.push(`<div class="seg-h" data-seg="${k}" style="top:${L.rowY[r]}px">${this.collapsed.has(k) ? '▸' : '▾'} ${g.name}<small>${n} token${n === 1 ? '' : 's'} · positions ${g.a}–${g.a + n - 1}</small></div>`);
        continue;
      }
      parts.push(`<div class="row" style="top:${L.rowY[r]}px">`);
      for (let u = L.rowA[r]; u < L.rowB[r]; u++) {
        const p = L.U.start[u], pe = L.U.start[u + 1];
        let has = false;
        for (let q = p; q < pe && !has; q++) has = meanSet ? meanSet.has(q) : !!hasEntry[q];
        const title = pe - p > 1 ? ` data-end="${pe}"` : '';
        parts.push(`<span class="tok${L.cls[u]}${has ? '' : ' noattn'}" data-pos="${p}" data-u="${u}"${title} style="left:${L.unitX[u]}px;width:${L.unitW[u]}px">${esc(L.disp[u])}</span>`);
      }
      parts.push('</div>');
    }
    this.rowsEl.innerHTML = parts.join('');
    this.els.clear();
    for (const el of this.rowsEl.getElementsByClassName('tok')) this.els.set(+el.dataset.u, el);
    this.marked = [];
    this.applyHighlight();
  }

  _meanSetFor(log) {
    if (this._ms && this._ms.log === log && this._ms.n === log.length) return this._ms.set;
    this._ms = { log, n: log.length, set: new Set(log) };
    return this._ms.set;
  }

  /** Set the highlight (units) and curves, and apply them to the rendered chips. */
  setHighlight(hl, curves) {
    this.hl = hl;
    this.curves = curves;
    this.applyHighlight();
    this.drawCurves();
  }

  applyHighlight() {
    for (const el of this.marked) { el.classList.remove('sel', 'tgt', 'src'); el.style.removeProperty('--w'); }
    this.marked = [];
    const hl = this.hl;
    if (!hl) return;
    const mark = (u, c, w) => {
      const el = this.els.get(u);
      if (!el) return;
      el.classList.add(c);
      if (w != null) el.style.setProperty('--w', Math.min(1, w).toFixed(3));
      this.marked.push(el);
    };
    for (const [u, w] of hl.t) mark(u, 'tgt', w);
    const sw = hl.s;
    for (const [u, el] of this.els) {
      const w = sw[u];
      if (w > 0) { el.classList.add('src'); el.style.setProperty('--w', Math.min(1, w).toFixed(3)); this.marked.push(el); }
    }
    for (const u of hl.sel) mark(u, 'sel');
  }

  anchor(u) {
    const L = this.L;
    if (!L || u >= L.unitRow.length || L.unitRow[u] < 0) return null;
    return { x: L.unitX[u] + L.unitW[u] / 2, y: L.rowY[L.unitRow[u]] };
  }

  drawCurves() {
    const c = this.curves;
    if (!c || !this.L) { this.svg.innerHTML = ''; return; }
    const a = this.anchor(c.from);
    if (!a) { this.svg.innerHTML = ''; return; }
    const parts = [];
    const curve = (u, w, out) => {
      const b = this.anchor(u);
      if (!b || u === c.from) return;
      const dx = Math.abs(b.x - a.x), dy = Math.abs(b.y - a.y);
      const h = 16 + Math.min(140, dx * 0.22 + dy * 0.35);
      const y1 = out ? a.y + 2 : a.y + 22, y2 = out ? b.y + 2 : b.y + 22, d = out ? -h : h;
      parts.push(`<path class="${out ? 'out' : 'in'}" data-pos="${this.L.U.start[u]}" d="M${a.x} ${y1}C${a.x} ${y1 + d} ${b.x} ${y2 + d} ${b.x} ${y2}" stroke-width="${(1 + 4 * w).toFixed(2)}" stroke-opacity="${(0.25 + 0.75 * Math.min(1, w)).toFixed(2)}"/>`);
    };
    c.out.slice(0, MAX_CURVES).forEach(([u, w]) => curve(u, w, true));
    c.in.slice(0, MAX_CURVES).forEach(([u, w]) => curve(u, w, false));
    this.svg.innerHTML = parts.join('');
  }

  /** Scroll so unit u is in view (centred when it is outside); flash it. */
  scrollTo(u, flash) {
    const L = this.L;
    if (!L || L.unitRow[u] < 0) return;
    const y = L.rowY[L.unitRow[u]], st = this.scroller.scrollTop, h = this.scroller.clientHeight;
    if (y < st + 10 || y > st + h - 40) this.scroller.scrollTop = y - h / 2;
    this.paint();
    if (flash) {
      const el = this.els.get(u);
      if (el) { el.classList.remove('flash'); void el.offsetWidth; el.classList.add('flash'); }
    }
  }

  /** The unit on the line above (dir −1) or below (+1) closest in x, or -1. */
  vertical(u, dir) {
    const L = this.L;
    if (!L || L.unitRow[u] < 0) return -1;
    let r = L.unitRow[u] + dir;
    while (r >= 0 && r < L.rowY.length && L.rowKind[r] !== 0) r += dir;
    if (r < 0 || r >= L.rowY.length) return -1;
    const x = L.unitX[u] + L.unitW[u] / 2;
    let best = L.rowA[r], bd = Infinity;
    for (let v = L.rowA[r]; v < L.rowB[r]; v++) {
      const d = Math.abs(L.unitX[v] + L.unitW[v] / 2 - x);
      if (d < bd) { bd = d; best = v; }
    }
    return best;
  }

  /** The rendered view as SVG text (chips in the viewport, curves), for export. */
  toSvg(colors) {
    const L = this.L;
    const st = this.scroller.scrollTop, h = this.scroller.clientHeight, w = this.width + 20;
    const out = [`<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}" viewBox="0 ${st} ${w} ${h}">`,
      `<rect x="0" y="${st}" width="${w}" height="${h}" fill="${colors.bg}"/>`, '<g transform="translate(10 0)">'];
    if (L) {
      for (let r = this.range[0]; r >= 0 && r < this.range[1]; r++) {
        const y = L.rowY[r];
        if (y + LINE_H < st || y > st + h) continue;
        if (L.rowKind[r] === 1) {
          const g = L.segs[L.rowSeg[r]];
          out.push(`<text x="0" y="${y + 18}" font-family="sans-serif" font-size="13" font-weight="600" fill="${colors.muted}">${esc(g.name)}</text>`);
          continue;
        }
        for (let u = L.rowA[r]; u < L.rowB[r]; u++) {
          const el = this.els.get(u);
          const cs = el ? getComputedStyle(el) : null;
          const fill = cs ? cs.backgroundColor : colors.chip, fg = cs ? cs.color : colors.fg;
          out.push(`<rect x="${L.unitX[u]}" y="${y + 2}" width="${L.unitW[u]}" height="20" rx="3" fill="${fill}"/>`,
            `<text x="${L.unitX[u] + PAD + BORDER}" y="${y + 16}" font-family="monospace" font-size="13" fill="${fg}" xml:space="preserve">${esc(L.disp[u])}</text>`);
        }
      }
    }
    out.push('</g><g transform="translate(10 0)">');
    for (const p of this.svg.querySelectorAll('path')) {
      const out_ = p.classList.contains('out');
      out.push(`<path d="${p.getAttribute('d')}" fill="none" stroke="${out_ ? colors.tgt : colors.src}" stroke-width="${p.getAttribute('stroke-width')}" stroke-opacity="${p.getAttribute('stroke-opacity')}"/>`);
    }
    out.push('</g></svg>');
    return out.join('');
  }
}

/** First index i with a[i] > v (a ascending). */
function upper(a, v) {
  let lo = 0, hi = a.length;
  while (lo < hi) { const m = (lo + hi) >> 1; if (a[m] <= v) lo = m + 1; else hi = m; }
  return lo;
}
