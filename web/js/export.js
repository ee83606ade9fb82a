// export.js — the current view as SVG or PNG, made in the page (nothing leaves it).
//
// Tokens: an SVG of the chips in the viewport with their current colours and the curves (TokenView.toSvg); the PNG
// is that SVG drawn onto a canvas at the device pixel ratio. Matrix: the canvas itself (PNG), or an SVG wrapping it
// as an image. Heads: the thumbnails composed on one canvas with their labels.

export function download(blob, name) {
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

function colors() {
  const cs = getComputedStyle(document.documentElement), v = n => cs.getPropertyValue(n).trim();
  return { bg: v('--bg'), fg: v('--fg'), muted: v('--muted'), chip: v('--chip'), tgt: v('--tgt'), src: v('--src') };
}

function headsCanvas() {
  const cells = [...document.querySelectorAll('#heads .cell')];
  const cols = Math.max(1, getComputedStyle(document.getElementById('heads')).gridTemplateColumns.split(' ').length - 1);
  const S = 96, pad = 6, rows = Math.ceil(cells.length / cols);
  const cv = document.createElement('canvas');
  cv.width = cols * (S + pad) + pad; cv.height = rows * (S + 20 + pad) + pad;
  const g = cv.getContext('2d'), c = colors();
  g.fillStyle = c.bg; g.fillRect(0, 0, cv.width, cv.height);
  g.imageSmoothingEnabled = false;
  cells.forEach((cell, i) => {
    const x = pad + (i % cols) * (S + pad), y = pad + Math.floor(i / cols) * (S + 20 + pad);
    g.drawImage(cell.querySelector('canvas'), x, y, S, S);
    g.strokeStyle = c.muted; g.strokeRect(x + 0.5, y + 0.5, S - 1, S - 1);
    g.fillStyle = c.fg; g.font = '10px sans-serif';
    g.fillText(`L${cell.dataset.layer} ${cell.dataset.head === '' ? 'mean' : 'h' + cell.dataset.head}`, x, y + S + 12);
  });
  return cv;
}

function viewSvg(app) {
  if (app.view === 'matrix' || app.view === 'heads') {
    const cv = app.view === 'matrix' ? document.getElementById('matrix') : headsCanvas();
    const w = cv.clientWidth || cv.width, h = cv.clientHeight || cv.height;
    return `<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="${w}" height="${h}"><image width="${w}" height="${h}" href="${cv.toDataURL('image/png')}"/></svg>`;
  }
  return app.tokens.toSvg(colors());
}

function name(app, ext) {
  const s = app.session;
  return `attnx-${s && s.rid ? s.rid : 'view'}-${app.view}${app.selPos >= 0 ? `-pos${app.selPos}` : ''}.${ext}`;
}

export function exportSvg(app) {
  download(new Blob([viewSvg(app)], { type: 'image/svg+xml' }), name(app, 'svg'));
}

export async function exportPng(app) {
  let cv;
  if (app.view === 'matrix') cv = document.getElementById('matrix');
  else if (app.view === 'heads') cv = headsCanvas();
  else {
    const svg = viewSvg(app);
    const img = new Image();
    const url = URL.createObjectURL(new Blob([svg], { type: 'image/svg+xml' }));
    await new Promise((ok, bad) => { img.onload = ok; img.onerror = bad; img.src = url; });
    const dpr = window.devicePixelRatio || 1;
    cv = document.createElement('canvas');
    cv.width = Math.round(img.width * dpr); cv.height = Math.round(img.height * dpr);
    const g = cv.getContext('2d');
    g.scale(dpr, dpr);
    g.drawImage(img, 0, 0);
    URL.revokeObjectURL(url);
  }
  const blob = await new Promise(ok => cv.toBlob(ok, 'image/png'));
  download(blob, name(app, 'png'));
}
