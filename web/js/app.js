// app.js — the explorer's state and wiring: the shown session, view filters (layer, head, weight, sink, words,
// threshold), the selection and what it highlights, streaming runs, the live monitor, files, keyboard, themes,
// the step scrubber, exports, and the measurements the browser tests read (window.axExplorer.perf).
//
// Data flow: sources (a streamed reply, the /ws feed, a file) feed a Session; any change marks the page dirty and
// one requestAnimationFrame callback relayouts and repaints what changed (a reply streaming 100 tokens/s costs one
// layout per frame, not per chunk). A selection is computed from the session's entries and reverse index only
// (O(k) targets, O(sources) for "attended by") and applied to the few chips and rows it concerns; its cost from the
// click to the updated DOM (layout included) is measured with performance.now() and shown as "click".

import { Session, edgesOf, sourcesOf } from './session.js';
import { entryRecords, sessionRecords, toJsonLines, parseRecording, sessionsOf } from './records.js';
import { getJson, postJson, streamRequest, openFeed, detokenize, tokenText } from './api.js';
import { pieceToText } from './text.js';
import { TokenView } from './tokens.js';
import { MatrixView } from './matrix.js';
import { HeadsView } from './heads.js';
import { renderList, renderInfo, layerSummary, renderLayers } from './side.js';
import { exportPng, exportSvg, download } from './export.js';

const $ = id => document.getElementById(id);
const MAX_LIVE = 200;

class App {
  constructor() {
    this.session = null;
    this.viewSel = { layer: null, head: null };
    this.selPos = -1;
    this.tab = 'to';
    this.limit = null;          // scrubber: positions shown (null = all)
    this.view = 'tokens';
    this.live = new Map();      // rid → Session from /ws
    this.liveWatch = null;      // rid followed from the live list
    this.ownRids = new Set();
    this.perf = { clickMs: null, frameMs: null, loadMs: null, parseMs: null, layoutMs: null, clicks: [] };
    this.readSettings();
    this.tokens = new TokenView(this);
    this.matrix = new MatrixView(this);
    this.heads = new HeadsView(this);
    this.dirty = 0;
    this.userSelected = false;
    this.wsStats = { records: 0, state: 'closed' };
    this.bind();
    this.theme(localStorage.getItem('attnx-theme') || (matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light'));
    this.connect();
  }

  // ---------------------------------------------------------------- settings and filters
  readSettings() {
    this.threshold = +$('threshold').value || 0;
    this.weight = $('weight').value;
    this.sink = $('sink').checked;
    this.words = $('words').checked;
  }

  key() { return this.session ? this.session.keyOf(this.viewSel) : null; }

  setView(layer, head) {
    this.viewSel = { layer, head };
    this.syncFilters();
    this.refresh(true);
  }

  syncFilters() {
    const s = this.session, ls = $('layer'), hs = $('head');
    const layers = s ? s.layerList() : [];
    if (s && (this.viewSel.layer == null || !s.layers.has(this.viewSel.layer)) && layers.length)
      this.viewSel = { layer: layers[layers.length - 1], head: null };
    const lopts = layers.map(l => `<option value="${l}">${l}</option>`).join('') || '<option value="">—</option>';
    if (ls.dataset.v !== lopts) { ls.innerHTML = lopts; ls.dataset.v = lopts; }
    ls.value = this.viewSel.layer ?? '';
    const heads = s && this.viewSel.layer != null ? s.headList(this.viewSel.layer) : [];
    const hopts = '<option value="">mean</option>' + heads.map(h => `<option value="${h}">${h}</option>`).join('');
    if (hs.dataset.v !== hopts) { hs.innerHTML = hopts; hs.dataset.v = hopts; }
    hs.value = this.viewSel.head ?? '';
    hs.disabled = !heads.length;
  }

  // ---------------------------------------------------------------- session
  setSession(s, keepSel) {
    this.session = s;
    this.seenVersion = -1;
    this.limit = null;
    if (!keepSel) { this.selPos = -1; this.userSelected = false; }
    this.viewSel = { layer: null, head: null };
    this.matrix.view = null;
    this.tokens.collapsed.clear();
    this.tokens.scroller.scrollTop = 0;
    $('source').textContent = s ? `${s.origin}: ${s.rid || '(no rid)'}` : '';
    this.syncFilters();
    this.resolveTexts();
    this.refresh(true);
  }

  /** Ask the relay for the texts of tokens known only by id (live requests, tail recordings). */
  resolveTexts() {
    const s = this.session;
    if (!s) return;
    const need = [];
    for (let p = 0; p < s.n; p++) {
      if (s.texts[p] != null || s.ids[p] == null || s.ids[p] < 0) continue;
      const t = tokenText(s.ids[p]);
      if (t != null) s.texts[p] = t; else if (t === undefined) need.push(s.ids[p]);
    }
    if (need.length) detokenize(need, () => { this.resolveTexts(); s.version++; this.refresh(true); });
  }

  /** Mark the page for a redraw on the next frame (all = layout too). */
  refresh(all) {
    this.dirty |= all ? 2 : 1;
    if (this.raf) return;
    this.raf = requestAnimationFrame(() => { this.raf = 0; this.render(); });
  }

  render() {
    const t0 = performance.now(), s = this.session, all = this.dirty & 2;
    this.dirty = 0;
    $('empty').classList.toggle('hide', !!s && s.n > 0);
    if (s && s.version !== this.seenVersion) {
      this.seenVersion = s.version;
      this.syncFilters();
      this.updateScrub();
      const key = this.key();
      if (key) s.reverse(key); // keep the reverse index current, so a click never builds it
    }
    this.tokens.relayout();
    this.tokens.paint(true);
    this.perf.layoutMs = performance.now() - t0;
    if (this.view === 'matrix') this.matrix.draw();
    if (this.view === 'heads') this.heads.draw();
    if (this.view === 'live') this.renderLive();
    if (s && this.follow()) this.followNewest();
    this.applySelection(false);
    this.stats(all);
  }

  follow() { return this.streaming && $('follow').checked && !this.userSelected && this.limit == null; }

  followNewest() {
    const s = this.session, key = this.key(), log = s.logs.get(key);
    if (log && log.length) this.selPos = log[log.length - 1];
  }

  stats(all) {
    const s = this.session;
    $('stat-tokens').textContent = s ? s.n : 0;
    $('stat-layers').textContent = s ? s.layers.size : 0;
    $('stat-entries').textContent = s ? s.nRecords : 0;
    if (!s) { $('stat-edges').textContent = 0; $('layer-rows').innerHTML = ''; return; }
    const now = performance.now();
    const sig = `${s.version}|${this.key()}|${this.threshold}|${this.sink}|${this.weight}|${this.limit}`;
    if (sig !== this.statSig && (!this.streaming || now - (this.statT || 0) > 400 || all)) {
      this.statSig = sig; this.statT = now;
      const key = this.key(), N = this.limit ?? s.n;
      let edges = 0;
      if (key) for (const q of s.positions(key)) {
        if (q >= N) break;
        const e = s.entry(q, key);
        if (e) for (const ed of edgesOf(e, this.sink, this.weight)) if (ed.w >= this.threshold) edges++;
      }
      $('stat-edges').textContent = edges;
      renderLayers($('layer-rows'), layerSummary(s, N), this.viewSel.layer);
    }
  }

  // ---------------------------------------------------------------- selection
  select(pos, ev) {
    const t0 = performance.now();
    const s = this.session;
    if (!s || pos < 0 || pos >= s.n) return;
    this.userSelected = true;
    this.selPos = pos;
    if (this.viewSel.layer == null) this.syncFilters();
    this.applySelection(true);
    const t1 = performance.now();
    void this.tokens.scroller.offsetHeight; // include style and layout in the measurement
    const ms = performance.now() - t0;
    this.perf.lastParts = { compute: this.perf.computeMs, apply: t1 - t0 - this.perf.computeMs, layout: performance.now() - t1 };
    this.perf.clickMs = ms;
    this.perf.clicks.push(ms);
    if (ev && ev.timeStamp) this.perf.inputMs = performance.now() - ev.timeStamp;
    $('stat-click').textContent = `${ms.toFixed(1)} ms`;
    requestAnimationFrame(() => setTimeout(() => { this.perf.frameMs = performance.now() - t0; }, 0));
    if (this.view === 'matrix') this.matrix.draw();
  }

  clearSelection() {
    this.selPos = -1;
    this.userSelected = true;
    this.applySelection(true);
    if (this.view === 'matrix') this.matrix.draw();
  }

  /** What the selection links to: {u, targets, sources, ...} for the current filters. */
  computeSelection() {
    const s = this.session, key = this.key(), pos = this.selPos;
    if (!s || pos < 0 || pos >= s.n) return null;
    const U = s.units(this.words), u = U.unitOf[pos], a = U.start[u], b = U.start[u + 1];
    const N = this.limit ?? s.n, sink = this.sink, kind = this.weight;
    const tmap = new Map();
    let nq = 0, mass = 0, first = null, shownProb = 0;
    for (let q = a; q < b; q++) {
      const e = key && s.entry(q, key);
      if (!e) continue;
      nq++; mass += e.mass; first = first || e;
      for (const ed of edgesOf(e, sink, kind)) {
        const tu = U.unitOf[ed.t];
        let o = tmap.get(tu);
        if (!o) tmap.set(tu, o = { u: tu, pos: U.start[tu], w: 0, score: 0, prob: 0 });
        o.w += ed.w; o.score += ed.score; o.prob += ed.prob;
      }
    }
    const targets = [...tmap.values()];
    if (nq > 1) for (const o of targets) { o.w /= nq; o.score /= nq; o.prob /= nq; }
    targets.sort((x, y) => y.w - x.w || x.pos - y.pos);
    for (const o of targets) shownProb += o.prob;
    const sources = key ? sourcesOf(s, key, U, a, b, N, sink, kind === 'prob') : { list: [], total: 0, w: new Float32Array(U.nu) };
    return { u, pos: a, end: b, entry: first, nq, mass: nq ? mass / nq : 0, shownProb, targets, sources: sources.list,
      srcW: sources.w, nTargets: targets.length, nSources: sources.total, key, U };
  }

  applySelection(scroll) {
    const tc = performance.now();
    const sel = this.computeSelection();
    this.perf.computeMs = performance.now() - tc;
    this.sel = sel;
    const s = this.session;
    const U = s ? s.units(this.words) : null;
    if (!sel) {
      this.tokens.setHighlight(null, null);
      renderInfo($('sel-info'), s, U, null, this);
      renderList($('side-list'), this.tab, null, 0);
      return;
    }
    const t = new Map();
    for (const o of sel.targets) t.set(o.u, o.w);
    const th = this.threshold;
    const curves = {
      from: sel.u,
      out: sel.targets.filter(o => o.w >= th && o.u !== sel.u).map(o => [o.u, o.w]),
      in: sel.sources.filter(o => o.w >= th && o.u !== sel.u).map(o => [o.u, o.w]),
    };
    this.tokens.setHighlight({ sel: new Set([sel.u]), t, s: sel.srcW }, curves);
    if (scroll) this.tokens.scrollTo(sel.u);
    renderInfo($('sel-info'), s, U, sel, this);
    const items = this.tab === 'to' ? sel.targets : sel.sources;
    renderList($('side-list'), this.tab, items, this.tab === 'to' ? sel.targets.length : sel.nSources, s, U, sel.u, th, this.weight);
  }

  /** Positions highlighted as targets / sources (for tests and scripts). */
  highlighted() {
    const sel = this.sel;
    if (!sel) return { selected: -1, targets: [], sources: [] };
    const sources = [];
    sel.srcW.forEach((w, u) => { if (w > 0) sources.push(sel.U.start[u]); });
    return { selected: sel.pos, targets: sel.targets.map(o => o.pos).sort((a, b) => a - b), sources };
  }

  moveSelection(d) {
    const s = this.session;
    if (!s || !s.n) return;
    const U = s.units(this.words), N = this.limit ?? s.n;
    if (this.selPos < 0) return this.select(d > 0 ? 0 : U.start[U.unitOf[N - 1]]);
    const u = Math.max(0, Math.min(U.unitOf[N - 1], U.unitOf[this.selPos] + d));
    this.select(U.start[u]);
  }

  // ---------------------------------------------------------------- runs
  requestBody(chat) {
    const prompt = $('prompt').value;
    const b = {
      model: this.modelId || undefined,
      max_tokens: +$('max-tokens').value || 100,
      temperature: +$('temperature').value,
      stream: true,
      stream_options: { include_usage: true },
      logprobs: true,
      return_attention_tokens: true,
      top_k_attention: +$('top-k').value || 5,
      attention_mode: $('mode').value,
      include_prompt_attention: $('prompt-attn').checked,
    };
    const layers = this.captureLayers();
    if (layers) b.attention_capture_layer_ids = layers;
    if (chat) {
      b.messages = [{ role: 'user', content: prompt }];
      b.chat_template_kwargs = { enable_thinking: $('thinking').checked };
    } else {
      b.prompt = prompt;
      b.logprobs = 0; // completions: an integer (top alternatives); 0 = the sampled tokens' own
    }
    return b;
  }

  captureLayers() {
    const v = $('capture-layers').value.trim().toLowerCase();
    if (!v || v === 'last' || v === 'default') return null;
    const n = this.caps?.n_layers || 0;
    if (v === 'all') return n ? Array.from({ length: n }, (_, i) => i) : null;
    if (v === 'auto' && n) return [...new Set([n >> 2, n >> 1, (3 * n) >> 2, n - 1])];
    const out = [];
    for (const part of v.split(/[\s,]+/)) {
      const m = /^(-?\d+)(?:-(\d+))?$/.exec(part);
      if (!m) continue;
      let a = +m[1], z = m[2] != null ? +m[2] : a;
      if (a < 0 && n) a = z = n + a;
      for (let i = a; i <= z && out.length < 128; i++) if (i >= 0) out.push(i);
    }
    return out.length ? out : null;
  }

  async run() {
    this.stop();
    const chat = $('api').value === 'chat';
    const body = this.requestBody(chat);
    const s = new Session('', 'stream');
    s.meta = { model: this.modelId, prompt: $('prompt').value, request: { ...body, messages: undefined, prompt: undefined } };
    s.logprobs = [];
    this.setSession(s);
    this.streaming = true;
    const ctl = this.ctl = new AbortController();
    $('run').disabled = true; $('stop').disabled = false;
    this.status('tokenizing…');
    try {
      const tk = await postJson('/v1/tokenize', chat ? { messages: body.messages, chat_template_kwargs: body.chat_template_kwargs } : { prompt: body.prompt }, ctl.signal);
      if (Array.isArray(tk.tokens)) s.setPrompt(tk.tokens, (tk.token_strs || []).map(pieceToText));
    } catch (e) {
      if (ctl.signal.aborted) return;
      this.status(`tokenize failed (${e.message}); prompt texts come from the attention entries`);
    }
    this.refresh(true);
    const st = { gen: 0, pending: [] };
    const t0 = performance.now();
    try {
      this.status('waiting for the first token…');
      for await (const chunk of streamRequest(chat ? '/v1/chat/completions' : '/v1/completions', body, ctl.signal,
        rid => { s.rid = rid || ''; if (rid) this.ownRids.add(rid); $('source').textContent = `stream: ${s.rid}`; })) {
        this.ingestChunk(s, chunk, chat, st);
        this.status(`streaming · ${st.gen} tokens · ${((performance.now() - t0) / 1000).toFixed(1)} s`);
        this.refresh(true);
      }
      s.ended = true;
      s.reason = s.reason || 'stop';
      this.status(`done · ${st.gen} tokens in ${((performance.now() - t0) / 1000).toFixed(2)} s · ${s.nRecords} attention records`);
    } catch (e) {
      s.ended = true; s.reason = ctl.signal.aborted ? 'abort' : 'error';
      this.status(ctl.signal.aborted ? 'stopped' : `error: ${e.message}`, !ctl.signal.aborted);
    } finally {
      if (this.ctl === ctl) { this.streaming = false; this.ctl = null; $('run').disabled = false; $('stop').disabled = true; }
      s.version++;
      this.resolveTexts();
      this.refresh(true);
    }
  }

  /** One SSE chunk: attention entries first (they can fix P), then the generated tokens it carries. */
  ingestChunk(s, chunk, chat, st) {
    const c0 = chunk.choices && chunk.choices[0];
    if (chunk.usage && chunk.usage.prompt_tokens && s.P < 0) s.P = chunk.usage.prompt_tokens;
    if (!c0) return;
    const d = chat ? (c0.delta || {}) : c0;
    for (const ent of [...(d.prompt_attention || []), ...(d.attention_tokens || [])]) {
      for (const r of entryRecords(s.rid, ent)) s.add(r);
      if (s.P < 0 && ent.prefill) s.P = Math.max(s.P, ent.position + 1);
    }
    let toks = [], lps = [];
    const lp = c0.logprobs && (c0.logprobs.content || c0.logprobs.tokens);
    if (Array.isArray(lp) && lp.length) {
      toks = lp.map(x => (typeof x === 'string' ? x : x.token));
      lps = lp.map((x, i) => (typeof x === 'object' ? x.logprob : c0.logprobs.token_logprobs?.[i]));
    } else {
      const t = (d.reasoning_content || '') + (chat ? (d.content || '') : (c0.text || ''));
      if (t) toks = [t];
    }
    for (let i = 0; i < toks.length; i++) st.pending.push([toks[i], lps[i]]);
    if (s.P >= 0) {
      for (const [t, l] of st.pending) {
        const p = s.P + st.gen++;
        s.setToken(p, null, t);
        if (l != null) s.logprobs[p] = l;
      }
      st.pending = [];
    }
    if (c0.finish_reason) s.reason = c0.finish_reason;
  }

  stop() {
    if (this.ctl) { this.ctl.abort(); }
  }

  clear() {
    this.stop();
    this.setSession(null);
    this.status('');
  }

  status(msg, err) {
    const el = $('status');
    el.textContent = msg;
    el.classList.toggle('err', !!err);
  }

  // ---------------------------------------------------------------- live monitor
  connect() {
    const badge = $('conn');
    const health = async () => {
      try {
        const h = await getJson('/healthz');
        const up = h.upstream === undefined ? true : !!(h.upstream === 'ok' || h.upstream === true || h.upstream?.ok);
        badge.className = `badge ${this.wsStats.state === 'open' ? 'on' : 'wait'}`;
        badge.textContent = this.wsStats.state === 'open' ? 'connected' : 'relay up, feed down';
        badge.title = JSON.stringify(h);
        if (!this.modelId) await this.detectModel();
        return up;
      } catch {
        badge.className = 'badge off';
        badge.textContent = 'offline';
      }
    };
    health();
    setInterval(health, 5000);
    this.feed = openFeed(r => this.onRecord(r), st => { this.wsStats.state = st; health(); this.refreshLive(); });
  }

  async detectModel() {
    try {
      const m = await getJson('/v1/models');
      this.modelId = m.data && m.data[0] && m.data[0].id;
      $('model').textContent = this.modelId || 'no model';
    } catch { $('model').textContent = 'no model'; }
    try { this.caps = await getJson('/v1/attention/capabilities'); } catch { this.caps = null; }
  }

  onRecord(r) {
    this.wsStats.records++;
    if (!r.rid || (r.t !== 'req' && r.t !== 'attn' && r.t !== 'end')) return;
    let s = this.live.get(r.rid);
    if (!s) {
      s = new Session(r.rid, 'live');
      this.live.set(r.rid, s);
      if (this.live.size > MAX_LIVE) {
        for (const [k, v] of this.live) { if (v.ended && v !== this.session) { this.live.delete(k); break; } }
      }
    }
    s.add(r);
    if (this.session === s) {
      if (r.t === 'attn' || r.t === 'req') this.pendingTexts = true;
      this.refresh(true);
    }
    this.refreshLive();
  }

  refreshLive() {
    $('live-count').textContent = this.live.size;
    if (this.view !== 'live' || this.liveT) return;
    this.liveT = setTimeout(() => { this.liveT = 0; this.renderLive(); }, 250);
  }

  renderLive() {
    if (this.pendingTexts) { this.pendingTexts = false; this.resolveTexts(); }
    $('ws-info').textContent = `/ws ${this.wsStats.state} · ${this.wsStats.records} records`;
    const now = Date.now();
    const rows = [...this.live.values()].reverse().map(s => {
      const age = ((now - s.t0) / 1000).toFixed(0);
      const state = s.ended ? `ended (${s.reason})` : (now - s.tLast < 3000 ? 'live' : 'idle');
      return `<tr data-rid="${s.rid}" class="${this.session === s ? 'cur' : ''}"><td class="rid">${s.rid}${this.ownRids.has(s.rid) ? ' <small>(this page)</small>' : ''}</td>` +
        `<td class="mono">${s.src || s.origin}</td><td>${s.P >= 0 ? s.P : '?'}</td><td>${s.n}</td><td>${s.layerList().join(',')}</td>` +
        `<td>${state}</td><td>${age}s</td><td><button data-watch="${s.rid}">Watch</button></td></tr>`;
    });
    $('live-rows').innerHTML = rows.join('') || '<tr><td colspan="8">No request seen yet. Requests sent to this relay by any client appear here.</td></tr>';
  }

  watch(rid) {
    const s = this.live.get(rid);
    if (!s) return;
    this.setSession(s);
    this.showView('tokens');
  }

  // ---------------------------------------------------------------- files
  async load(file) {
    const t0 = performance.now();
    this.status(`reading ${file.name}…`);
    try {
      const bytes = new Uint8Array(await file.arrayBuffer());
      const t1 = performance.now();
      const recs = parseRecording(bytes);
      const sessions = sessionsOf(recs, 'file');
      this.perf.parseMs = performance.now() - t1;
      if (!sessions.length) throw new Error('no request records in the file');
      for (const s of sessions) this.live.set(s.rid, s);
      const best = sessions.reduce((a, b) => (b.nRecords > a.nRecords ? b : a));
      this.setSession(best);
      const key = this.key();
      if (key) best.reverse(key);
      this.render();
      void this.tokens.scroller.offsetHeight;
      this.perf.loadMs = performance.now() - t0;
      this.status(`${file.name}: ${recs.length} records, ${sessions.length} request(s); showing ${best.rid} (${best.n} tokens) · loaded in ${this.perf.loadMs.toFixed(0)} ms` +
        (recs.truncated ? ` · the file ends inside a frame (${recs.truncated}); complete frames kept` : ''));
      this.refreshLive();
    } catch (e) {
      this.status(`cannot load ${file.name}: ${e.message}`, true);
      this.perf.loadError = e.message;
    }
  }

  save() {
    const s = this.session;
    if (!s) return this.status('nothing to save', true);
    const blob = new Blob([toJsonLines(sessionRecords(s))], { type: 'application/x-ndjson' });
    download(blob, `attnx-${s.rid || 'session'}.jsonl`);
  }

  // ---------------------------------------------------------------- views, scrubber, keys, theme
  showView(v) {
    this.view = v;
    for (const b of document.querySelectorAll('.views button')) b.classList.toggle('on', b.dataset.view === v);
    for (const p of ['tokens', 'matrix', 'heads', 'live']) $(`pane-${p}`).classList.toggle('on', p === v);
    this.refresh(true);
  }

  updateScrub() {
    const s = this.session, r = $('scrub');
    const G = s ? s.generated() : 0;
    r.max = G;
    if (this.limit == null) r.value = G;
    this.scrubLabel();
  }

  scrubLabel() {
    const s = this.session, v = +$('scrub').value;
    $('scrub-label').textContent = s ? (this.limit == null ? `all ${s.generated()} generated` : `step ${v} / ${s.generated()}`) : 'step –';
  }

  /** Show the generation as it was after step v (v generated tokens); selects the query that sampled the last. */
  scrubTo(v) {
    const s = this.session;
    if (!s || s.P < 0) return;
    const G = s.generated();
    v = Math.max(0, Math.min(G, v));
    $('scrub').value = v;
    this.limit = v >= G ? null : s.P + v;
    this.scrubLabel();
    this.tokens.relayout();
    this.tokens.paint(true);
    const q = s.P + v - 2 >= 0 && v > 0 ? s.P + v - 2 : s.P - 1;
    this.select(v >= G ? (this.selPos >= 0 ? this.selPos : q) : q);
    this.refresh(true);
  }

  play() {
    if (this.playT) { clearInterval(this.playT); this.playT = 0; $('play').textContent = '▶'; return; }
    const s = this.session;
    if (!s) return;
    let v = this.limit == null ? 0 : +$('scrub').value;
    $('play').textContent = '⏸';
    this.playT = setInterval(() => {
      v++;
      this.scrubTo(v);
      if (v >= s.generated()) this.play();
    }, 140);
  }

  theme(t) {
    document.documentElement.dataset.theme = t;
    localStorage.setItem('attnx-theme', t);
    this.refresh(true);
  }

  onKey(ev) {
    const tag = ev.target.tagName;
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); this.run(); return; }
    if (tag === 'INPUT' || tag === 'TEXTAREA' || tag === 'SELECT') { if (ev.key === 'Escape') ev.target.blur(); return; }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const s = this.session, U = s ? s.units(this.words) : null;
    const k = ev.key;
    const acts = {
      ArrowLeft: () => this.moveSelection(-1),
      ArrowRight: () => this.moveSelection(1),
      ArrowUp: () => { if (this.selPos >= 0) { const v = this.tokens.vertical(U.unitOf[this.selPos], -1); if (v >= 0) this.select(U.start[v]); } },
      ArrowDown: () => { if (this.selPos >= 0) { const v = this.tokens.vertical(U.unitOf[this.selPos], 1); if (v >= 0) this.select(U.start[v]); } },
      Home: () => s && this.select(0),
      End: () => s && this.select(U.start[U.unitOf[(this.limit ?? s.n) - 1]]),
      Escape: () => this.clearSelection(),
      t: () => this.setTab('to'), b: () => this.setTab('by'),
      '[': () => this.stepLayer(-1), ']': () => this.stepLayer(1),
      1: () => this.showView('tokens'), 2: () => this.showView('matrix'), 3: () => this.showView('heads'), 4: () => this.showView('live'),
      s: () => { $('sink').checked = !$('sink').checked; this.onSettings(); },
      w: () => { $('words').checked = !$('words').checked; this.onSettings(); },
      p: () => this.play(),
      d: () => this.theme(document.documentElement.dataset.theme === 'dark' ? 'light' : 'dark'),
      '?': () => $('help').showModal(),
    };
    const f = acts[k];
    if (f) { ev.preventDefault(); f(); }
  }

  stepLayer(d) {
    const s = this.session;
    if (!s) return;
    const ls = s.layerList(), i = ls.indexOf(this.viewSel.layer);
    if (!ls.length) return;
    this.setView(ls[Math.max(0, Math.min(ls.length - 1, i + d))], null);
  }

  setTab(t) {
    this.tab = t;
    $('tab-to').classList.toggle('on', t === 'to');
    $('tab-by').classList.toggle('on', t === 'by');
    this.applySelection(false);
  }

  onSettings() {
    this.readSettings();
    this.refresh(true);
  }

  bind() {
    $('prompt-form').addEventListener('submit', ev => { ev.preventDefault(); this.run(); });
    $('stop').addEventListener('click', () => this.stop());
    $('clear').addEventListener('click', () => this.clear());
    for (const id of ['threshold', 'weight', 'sink', 'words']) $(id).addEventListener('change', () => this.onSettings());
    $('threshold').addEventListener('input', () => this.onSettings());
    $('layer').addEventListener('change', ev => this.setView(ev.target.value === '' ? null : +ev.target.value, null));
    $('head').addEventListener('change', ev => this.setView(this.viewSel.layer, ev.target.value === '' ? null : +ev.target.value));
    for (const b of document.querySelectorAll('.views button')) b.addEventListener('click', () => this.showView(b.dataset.view));
    $('tab-to').addEventListener('click', () => this.setTab('to'));
    $('tab-by').addEventListener('click', () => this.setTab('by'));
    $('side-list').addEventListener('click', ev => {
      const r = ev.target.closest('[data-pos]');
      if (!r || !this.session) return;
      const U = this.session.units(this.words);
      this.tokens.scrollTo(U.unitOf[+r.dataset.pos], true);
    });
    $('side-list').addEventListener('dblclick', ev => { const r = ev.target.closest('[data-pos]'); if (r) this.select(+r.dataset.pos, ev); });
    $('layer-rows').addEventListener('click', ev => { const r = ev.target.closest('tr[data-layer]'); if (r) this.setView(+r.dataset.layer, null); });
    $('live-rows').addEventListener('click', ev => { const b = ev.target.closest('[data-watch]'); if (b) this.watch(b.dataset.watch); });
    $('file').addEventListener('change', ev => { const f = ev.target.files[0]; if (f) this.load(f); ev.target.value = ''; });
    $('save').addEventListener('click', () => this.save());
    $('export-png').addEventListener('click', () => exportPng(this));
    $('export-svg').addEventListener('click', () => exportSvg(this));
    $('theme').addEventListener('click', () => this.theme(document.documentElement.dataset.theme === 'dark' ? 'light' : 'dark'));
    $('help-btn').addEventListener('click', () => $('help').showModal());
    $('scrub').addEventListener('input', ev => this.scrubTo(+ev.target.value));
    $('play').addEventListener('click', () => this.play());
    document.addEventListener('keydown', ev => this.onKey(ev));
    document.addEventListener('dragover', ev => ev.preventDefault());
    document.addEventListener('drop', ev => { ev.preventDefault(); const f = ev.dataTransfer.files[0]; if (f) this.load(f); });
    window.addEventListener('resize', () => this.refresh(true));
  }
}

/** The n strongest items (by w, then position), sorted; avoids sorting tens of thousands of sources. */
function topN(items, n) {
  if (items.length > 2 * n) {
    const ws = Float64Array.from(items, o => o.w).sort();
    const cut = ws[ws.length - n];
    items = items.filter(o => o.w >= cut);
  }
  return items.sort((x, y) => y.w - x.w || x.pos - y.pos).slice(0, n);
}


window.axExplorer = new App();
