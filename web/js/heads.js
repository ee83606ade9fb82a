// heads.js — the layer × head grid (BertViz's "model view" on sparse top-k): one thumbnail per captured
// (layer, head), plus each layer's own or mean map. A thumbnail is that head's query × key map binned to 64 × 64;
// under it, three per-head metrics researchers use to classify heads: previous-token share, sink share (position 0)
// and mean distance, all from true probabilities. Clicking a thumbnail focuses it (layer and head filters) and
// switches to the token view. Without a per-head capture the grid shows one thumbnail per layer.

const SIZE = 64;

function stats(s, key, N) {
  let prev = 0, sink = 0, dist = 0, n = 0;
  for (const q of s.positions(key)) {
    if (q >= N) continue;
    const e = s.entry(q, key);
    if (!e) continue;
    n++;
    let m = 0;
    for (let i = 0; i < e.pos.length; i++) {
      const p = Math.exp(e.logit[i] - e.lse), t = e.pos[i];
      if (t === q - 1) prev += p;
      if (t === 0) sink += p;
      dist += p * (q - t); m += p;
    }
  }
  return n ? { prev: prev / n, sink: sink / n, dist: dist / n, n } : null;
}

function thumb(cv, s, key, N, color) {
  cv.width = SIZE; cv.height = SIZE;
  const g = cv.getContext('2d');
  const img = g.createImageData(SIZE, SIZE), d = img.data, buf = new Float32Array(SIZE * SIZE);
  const sc = SIZE / Math.max(1, N);
  for (const q of s.positions(key)) {
    if (q >= N) continue;
    const e = s.entry(q, key);
    if (!e) continue;
    const r = Math.min(SIZE - 1, Math.floor(q * sc));
    for (let i = 0; i < e.pos.length; i++) {
      const c = Math.min(SIZE - 1, Math.floor(e.pos[i] * sc)), w = e.score[i];
      if (w > buf[r * SIZE + c]) buf[r * SIZE + c] = w;
    }
  }
  for (let i = 0; i < buf.length; i++) {
    const a = buf[i] > 0 ? Math.min(1, 0.2 + 0.8 * Math.sqrt(buf[i])) : 0;
    d[i * 4] = color[0]; d[i * 4 + 1] = color[1]; d[i * 4 + 2] = color[2]; d[i * 4 + 3] = Math.round(a * 255);
  }
  g.putImageData(img, 0, 0);
}

export class HeadsView {
  constructor(app) {
    this.app = app;
    this.el = document.getElementById('heads');
    this.info = document.getElementById('heads-info');
    this.el.addEventListener('click', ev => {
      const c = ev.target.closest('.cell');
      if (!c) return;
      this.app.setView(+c.dataset.layer, c.dataset.head === '' ? null : +c.dataset.head);
      this.app.showView('tokens');
    });
  }

  draw() {
    const s = this.app.session, el = this.el;
    el.innerHTML = '';
    if (!s || !s.layers.size) { el.innerHTML = '<div class="msg">Nothing to show yet.</div>'; return; }
    const N = Math.min(this.app.limit ?? s.n, s.n);
    const layers = s.layerList();
    const maxHeads = Math.max(0, ...layers.map(l => s.headList(l).length));
    const hasHeads = maxHeads > 0;
    el.style.gridTemplateColumns = `48px repeat(${hasHeads ? maxHeads + 1 : Math.min(layers.length, 8)}, minmax(72px, 110px))`;
    const css = getComputedStyle(document.documentElement);
    const c = document.createElement('canvas').getContext('2d');
    c.fillStyle = css.getPropertyValue('--tgt').trim();
    const hex = c.fillStyle, color = [1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16));
    const cur = this.app.viewSel;
    const cell = (layer, head, label) => {
      const key = head == null ? s.keyOf({ layer, head: null }) : `L${layer}h${head}`;
      const d = document.createElement('div');
      d.className = 'cell' + (cur.layer === layer && cur.head === head ? ' on' : '');
      d.dataset.layer = layer; d.dataset.head = head == null ? '' : head;
      const cv = document.createElement('canvas');
      thumb(cv, s, key, N, color);
      const st = stats(s, key, N);
      d.title = `layer ${layer}${head == null ? '' : `, head ${head}`}` + (st ? `\nprevious token ${(st.prev * 100).toFixed(1)}%\nsink ${(st.sink * 100).toFixed(1)}%\nmean distance ${st.dist.toFixed(1)}` : '');
      d.append(cv, Object.assign(document.createElement('div'), {
        textContent: `${label}` + (st ? ` · prev ${(st.prev * 100).toFixed(0)}% · sink ${(st.sink * 100).toFixed(0)}%` : ''),
      }));
      return d;
    };
    if (!hasHeads) {
      el.append(Object.assign(document.createElement('div'), { className: 'rowlab', textContent: 'layers' }));
      for (const l of layers) el.append(cell(l, null, `L${l}`));
      this.info.textContent = ' — no per-head capture in this request (run with mode “per head” for the full grid).';
      return;
    }
    this.info.textContent = ` — ${layers.length} layer(s) × ${maxHeads} head(s).`;
    for (const l of layers) {
      el.append(Object.assign(document.createElement('div'), { className: 'rowlab', textContent: `L${l}` }));
      el.append(cell(l, null, 'mean'));
      const hs = s.headList(l);
      for (let i = 0; i < maxHeads; i++) {
        if (i < hs.length) el.append(cell(l, hs[i], `h${hs[i]}`));
        else el.append(document.createElement('div'));
      }
    }
  }
}
