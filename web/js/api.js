// api.js — everything the page asks of the relay (same origin only): models, health, tokenize, per-token
// detokenize (cached, a few at a time), streamed chat/completions with attention (SSE over fetch), and the /ws feed.
//
// A bearer token given as ?token=… in the page's URL is sent on every request (Authorization header; ?token= on
// /ws, which browsers cannot give headers).

const params = new URLSearchParams(location.search);
const TOKEN = params.get('token');

function headers(json) {
  const h = {};
  if (json) h['Content-Type'] = 'application/json';
  if (TOKEN) h.Authorization = `Bearer ${TOKEN}`;
  return h;
}

export async function getJson(path) {
  const r = await fetch(path, { headers: headers(false) });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

export async function postJson(path, body, signal) {
  const r = await fetch(path, { method: 'POST', headers: headers(true), body: JSON.stringify(body), signal });
  if (!r.ok) {
    let msg = `HTTP ${r.status}`;
    try { const j = await r.json(); msg = j.error?.message || msg; } catch { /* not JSON */ }
    throw new Error(`${path}: ${msg}`);
  }
  return r.json();
}

// ---- detokenize, one id at a time (the only way to get a token's own text from ids), cached for the page's life
const detokCache = new Map();
const detokQueue = [];
let detokBusy = 0;
const DETOK_PAR = 4;

export function tokenText(id) { return detokCache.get(id); }

/** Resolve the texts of ids not cached yet; onDone() once all asked ones are in (or failed). */
export function detokenize(ids, onDone) {
  const want = [...new Set(ids)].filter(id => id >= 0 && !detokCache.has(id));
  if (!want.length) return;
  let left = want.length;
  for (const id of want) {
    detokCache.set(id, undefined);
    detokQueue.push(id);
  }
  const finish = () => { if (--left === 0) onDone(); };
  const pump = () => {
    while (detokBusy < DETOK_PAR && detokQueue.length) {
      const id = detokQueue.shift();
      detokBusy++;
      postJson('/v1/detokenize', { tokens: [id] })
        .then(j => detokCache.set(id, typeof j.prompt === 'string' ? j.prompt : (j.text ?? null)))
        .catch(() => detokCache.set(id, null))
        .finally(() => { detokBusy--; finish(); pump(); });
    }
  };
  pump();
}

/** POST a streaming request and yield each SSE data payload parsed as JSON. onOpen(rid) when headers arrive. */
export async function* streamRequest(path, body, signal, onOpen) {
  const r = await fetch(path, { method: 'POST', headers: headers(true), body: JSON.stringify(body), signal });
  if (!r.ok) {
    let msg = `HTTP ${r.status}`;
    try { const j = await r.json(); msg = j.error?.message || msg; } catch { /* not JSON */ }
    throw new Error(msg);
  }
  onOpen?.(r.headers.get('X-Attnx-Rid'));
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    if (buf.includes('\r')) buf = buf.replace(/\r\n/g, '\n');
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const ev = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const data = ev.split('\n').filter(l => l.startsWith('data:')).map(l => l.slice(5).replace(/^ /, '')).join('\n');
      if (!data) continue;
      if (data === '[DONE]') return;
      let j;
      try { j = JSON.parse(data); } catch { continue; }
      if (j.error) throw new Error(j.error.message || 'stream error');
      yield j;
    }
  }
}

/** The /ws feed: calls onRecords(list) per message batch and onState('open'|'closed'); reconnects every 2 s. */
export function openFeed(onRecord, onState) {
  let ws = null, stopped = false;
  const connect = () => {
    const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws${TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : ''}`;
    ws = new WebSocket(url);
    ws.onopen = () => onState('open');
    ws.onclose = () => { onState('closed'); if (!stopped) setTimeout(connect, 2000); };
    ws.onerror = () => {};
    ws.onmessage = ev => {
      if (typeof ev.data !== 'string') return;
      let j;
      try { j = JSON.parse(ev.data); } catch { return; }
      if (Array.isArray(j)) j.forEach(onRecord); else if (j && j.t) onRecord(j);
    };
  };
  connect();
  return { close() { stopped = true; ws?.close(); } };
}
