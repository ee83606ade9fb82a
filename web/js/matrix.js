// matrix.js — query × key view of the sparse top-k on a canvas, zoomable and pannable, for long generations.
//
// Each pixel is a bin of query rows × key columns holding the largest weight that falls in it, so a 50,000-token
// sequence draws in one pass over its entries (O(entries × k)) whatever the zoom. Colours go from the background to
// the target colour by the square root of the weight (small links stay visible). The selected query's row is
// outlined. Wheel zooms around the cursor, drag pans, double-click resets, a click selects the query under it.

const M_LEFT = 48, M_TOP = 18, M_RIGHT = 8, M_BOTTOM = 8;

function rgb(css) {
  const c = document.createElement('canvas').getContext('2d');
  c.fillStyle = css;
  const h = c.fillStyle;
  if (h.startsWith('#')) return [1, 3, 5].map(i => parseInt(h.slice(i, i + 2), 16));
  return (h.match(/\d+/g) || [0, 0, 0]).slice(0, 3).map(Number);
}

export class MatrixView {
  constructor(app) {
    this.app = app;
    this.cv = document.getElementById('matrix');
    this.info = document.getElementById('matrix-info');
    this.view = null;
    this.drag = null;
    this.cv.addEventListener('wheel', ev => this.onWheel(ev), { passive: false });
    this.cv.addEventListener('mousedown', ev => { this.drag = { x: ev.clientX, y: ev.clientY, v: { ...this.cur() }, moved: false }; });
    window.addEventListener('mousemove', ev => this.onMove(ev));
    window.addEventListener('mouseup', ev => this.onUp(ev));
    this.cv.addEventListener('dblclick', () => { this.view = null; this.draw(); });
  }

  n() { const s = this.app.session; return s ? Math.max(1, Math.min(this.app.limit ?? s.n, s.n)) : 1; }
  cur() { const N = this.n(); return this.view || { q0: 0, q1: N, k0: 0, k1: N }; }
  plot() {
    const w = this.cv.clientWidth, h = this.cv.clientHeight;
    return { x: M_LEFT, y: M_TOP, w: Math.max(10, w - M_LEFT - M_RIGHT), h: Math.max(10, h - M_TOP - M_BOTTOM) };
  }
  at(ev) {
    const r = this.cv.getBoundingClientRect(), p = this.plot(), v = this.cur();
    const fx = (ev.clientX - r.left - p.x) / p.w, fy = (ev.clientY - r.top - p.y) / p.h;
    return { fx, fy, k: v.k0 + fx * (v.k1 - v.k0), q: v.q0 + fy * (v.q1 - v.q0), inside: fx >= 0 && fx < 1 && fy >= 0 && fy < 1 };
  }

  onWheel(ev) {
    ev.preventDefault();
    const a = this.at(ev), v = this.cur(), N = this.n(), z = ev.deltaY > 0 ? 1.25 : 0.8;
    const span = (lo, hi, c) => {
      let w = Math.max(8, Math.min(N, (hi - lo) * z));
      let l = c - (c - lo) * (w / (hi - lo));
      l = Math.max(0, Math.min(N - w, l));
      return [l, l + w];
    };
    const [q0, q1] = span(v.q0, v.q1, Math.max(v.q0, Math.min(v.q1, a.q)));
    const [k0, k1] = span(v.k0, v.k1, Math.max(v.k0, Math.min(v.k1, a.k)));
    this.view = { q0, q1, k0, k1 };
    this.draw();
  }

  onMove(ev) {
    if (this.drag) {
      const d = this.drag, p = this.plot(), N = this.n();
      const dx = ev.clientX - d.x, dy = ev.clientY - d.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) d.moved = true;
      if (d.moved) {
        const sk = (d.v.k1 - d.v.k0) / p.w, sq = (d.v.q1 - d.v.q0) / p.h;
        const ok = Math.max(0, Math.min(N - (d.v.k1 - d.v.k0), d.v.k0 - dx * sk));
        const oq = Math.max(0, Math.min(N - (d.v.q1 - d.v.q0), d.v.q0 - dy * sq));
        this.view = { k0: ok, k1: ok + d.v.k1 - d.v.k0, q0: oq, q1: oq + d.v.q1 - d.v.q0 };
        this.draw();
      }
      return;
    }
    if (ev.target !== this.cv) return;
    const a = this.at(ev);
    if (!a.inside) { this.info.textContent = ''; return; }
    const q = Math.floor(a.q), k = Math.floor(a.k), s = this.app.session;
    const e = s && s.entry(q, this.app.key());
    const i = e ? e.pos.indexOf(k) : -1;
    this.info.textContent = `query ${q} → key ${k}` + (i >= 0 ? `: score ${(e.score[i] * 100).toFixed(1)}%, prob ${(Math.exp(e.logit[i] - e.lse) * 100).toFixed(2)}%` : '');
  }

  onUp(ev) {
    const d = this.drag;
    this.drag = null;
    if (!d || d.moved || ev.target !== this.cv) return;
    const a = this.at(ev);
    if (a.inside) this.app.select(Math.floor(a.q), ev);
  }

  draw() {
    const cv = this.cv, dpr = window.devicePixelRatio || 1;
    const W = cv.clientWidth, H = cv.clientHeight;
    if (!W || !H) return;
    cv.width = Math.round(W * dpr); cv.height = Math.round(H * dpr);
    const g = cv.getContext('2d');
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    const css = getComputedStyle(document.documentElement);
    const bg = css.getPropertyValue('--bg').trim(), fg = css.getPropertyValue('--muted').trim();
    g.fillStyle = bg; g.fillRect(0, 0, W, H);
    const s = this.app.session, key = this.app.key();
    if (!s || !key) return;
    const p = this.plot(), v = this.cur();
    const pw = Math.max(1, Math.floor(p.w * dpr)), ph = Math.max(1, Math.floor(p.h * dpr));
    const buf = new Float32Array(pw * ph);
    const sq = ph / (v.q1 - v.q0), sk = pw / (v.k1 - v.k0);
    const sink = this.app.sink, kind = this.app.weight;
    const table = s.store.get(key) || [];
    const q0 = Math.floor(v.q0), q1 = Math.min(Math.ceil(v.q1), this.n());
    for (let q = q0; q < q1; q++) {
      const e = key.endsWith('h*') ? s.entry(q, key) : table[q];
      if (!e) continue;
      const row = Math.floor((q - v.q0) * sq);
      if (row < 0 || row >= ph) continue;
      let r0 = 1, p0 = 1;
      if (sink) { const i0 = e.pos.indexOf(0); if (i0 >= 0) { r0 = 1 - e.score[i0] || 1; p0 = 1 - Math.exp(e.logit[i0] - e.lse) || 1; } }
      const rowEnd = Math.min(ph, Math.max(row + 1, Math.floor((q + 1 - v.q0) * sq)));
      for (let i = 0; i < e.pos.length; i++) {
        const t = e.pos[i];
        if (t < v.k0 || t >= v.k1 || (sink && t === 0)) continue;
        const w = kind === 'prob' ? Math.exp(e.logit[i] - e.lse) / p0 : e.score[i] / r0;
        const c0 = Math.floor((t - v.k0) * sk), c1 = Math.min(pw, Math.max(c0 + 1, Math.floor((t + 1 - v.k0) * sk)));
        for (let rr = row; rr < rowEnd; rr++)
          for (let c = c0; c < c1; c++) { const o = rr * pw + c; if (w > buf[o]) buf[o] = w; }
      }
    }
    const img = g.createImageData(pw, ph), d = img.data;
    const [br, bgc, bb] = rgb(bg), [tr, tg, tb] = rgb(css.getPropertyValue('--tgt').trim());
    for (let i = 0; i < buf.length; i++) {
      const a = buf[i] > 0 ? Math.min(1, 0.15 + 0.85 * Math.sqrt(buf[i])) : 0;
      d[i * 4] = br + (tr - br) * a; d[i * 4 + 1] = bgc + (tg - bgc) * a; d[i * 4 + 2] = bb + (tb - bb) * a; d[i * 4 + 3] = 255;
    }
    g.setTransform(1, 0, 0, 1, 0, 0);
    g.putImageData(img, Math.round(p.x * dpr), Math.round(p.y * dpr));
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.strokeStyle = fg; g.lineWidth = 1; g.strokeRect(p.x - 0.5, p.y - 0.5, p.w + 1, p.h + 1);
    g.fillStyle = fg; g.font = '10px sans-serif';
    g.fillText(`key ${Math.floor(v.k0)}…${Math.ceil(v.k1) - 1}`, p.x, 12);
    g.save(); g.translate(12, p.y + p.h); g.rotate(-Math.PI / 2); g.fillText(`query ${Math.floor(v.q0)}…${Math.ceil(v.q1) - 1}`, 0, 0); g.restore();
    if (s.P > 0 && s.P > v.k0 && s.P < v.k1) {
      const x = p.x + (s.P - v.k0) * (p.w / (v.k1 - v.k0));
      g.strokeStyle = fg; g.setLineDash([3, 3]); g.beginPath(); g.moveTo(x, p.y); g.lineTo(x, p.y + p.h); g.stroke(); g.setLineDash([]);
    }
    const sel = this.app.selPos;
    if (sel >= 0 && sel >= v.q0 && sel < v.q1) {
      const y = p.y + (sel - v.q0) * (p.h / (v.q1 - v.q0));
      g.strokeStyle = css.getPropertyValue('--src').trim(); g.lineWidth = 1.5;
      g.strokeRect(p.x - 2, y - 1, p.w + 4, Math.max(2, p.h / (v.q1 - v.q0)) + 2);
    }
  }
}
