// run.mjs — browser tests of the explorer page (web/) against the real relay, capture and engine.
//
//   node tests/browser/run.mjs [--build DIR] [--engine engine|producer] [--screenshots] [--only NAME]
//
// Each test drives Debian's chromium (playwright-core, headless) on the page the relay serves, and checks what the
// page shows against data the test gets on its own: the raw SSE body of the page's request (captured from the
// network), curl, attnx-tail's msgpack recording, a generated 50,000-token recording. It prints one line per test
// and finally "N passed, N failed"; exit status 1 if any failed. --screenshots writes web/screenshots/*.png.

import fs from 'node:fs';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { Stack, launchBrowser } from './harness.mjs';
import { writeLong } from './gen.mjs';
import { decodeAll } from '../../web/js/msgpack.js';
import { runUnit } from './unit.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const args = process.argv.slice(2);
const opt = (name, def) => { const i = args.indexOf(name); return i >= 0 ? args[i + 1] : def; };
const build = path.resolve(root, opt('--build', process.env.AX_BUILD_DIR || 'build'));
const engineKind = opt('--engine', fs.existsSync(path.join(build, 'engine/attnx-engine')) ? 'engine' : 'producer');
const shots = args.includes('--screenshots') || process.env.AX_SCREENSHOTS === '1';
const only = opt('--only', null);

const sleep = ms => new Promise(r => setTimeout(r, ms));
function assert(c, msg) { if (!c) throw new Error(msg); }
function eqSets(a, b, what) {
  const x = [...new Set(a)].sort((p, q) => p - q), y = [...new Set(b)].sort((p, q) => p - q);
  assert(JSON.stringify(x) === JSON.stringify(y), `${what}: page [${x}] vs expected [${y}]`);
}

/** Entries (top-level = the top layer, what the page shows by default) and texts of a streamed chat reply. */
function parseSse(text) {
  const out = { entries: new Map(), gen: [], chunks: 0, prompt: new Map() };
  for (const line of text.split('\n')) {
    if (!line.startsWith('data: ') || line === 'data: [DONE]') continue;
    const j = JSON.parse(line.slice(6));
    out.chunks++;
    const c0 = j.choices && j.choices[0];
    if (!c0) continue;
    const d = c0.delta || {};
    for (const e of d.prompt_attention || []) out.prompt.set(e.position, e);
    for (const e of d.attention_tokens || []) out.entries.set(e.position, e);
    const lp = c0.logprobs && c0.logprobs.content;
    if (lp && lp.length) for (const t of lp) out.gen.push(t.token);
    else if (d.content) out.gen.push(d.content);
  }
  return out;
}

const tests = [];
const test = (name, fn) => tests.push({ name, fn });
const ctx = {};

async function setInputs(page, o) {
  for (const [id, v] of Object.entries(o)) {
    const el = await page.$(`#${id}`);
    const type = await el.evaluate(e => e.type || e.tagName);
    if (type === 'checkbox') await el.setChecked(!!v);
    else if (type === 'select-one') await el.selectOption(String(v));
    else await el.fill(String(v));
  }
  await settle(page);
}

/** Wait until the page has drawn the frame that follows the last change. */
const settle = page => page.evaluate(() => new Promise(r => requestAnimationFrame(() => setTimeout(r, 0))));

/** Run a prompt in the page, watch chips appear, return the SSE body the page received and what the DOM showed. */
async function runPrompt(page, prompt, inputs) {
  await setInputs(page, { prompt, ...inputs });
  await page.evaluate(() => {
    window.__counts = [];
    const rows = document.getElementById('rows');
    window.__obs?.disconnect();
    window.__obs = new MutationObserver(() => {
      const n = rows.querySelectorAll('.tok').length;
      const c = window.__counts;
      if (!c.length || c[c.length - 1].n !== n) c.push({ n, t: performance.now() });
    });
    window.__obs.observe(rows, { childList: true, subtree: true });
  });
  const respP = page.waitForResponse(r => r.url().endsWith('/v1/chat/completions') || r.url().endsWith('/v1/completions'));
  await page.click('#run');
  const resp = await respP;
  await page.waitForFunction(() => window.axExplorer.session && window.axExplorer.session.ended && !window.axExplorer.streaming,
    null, { timeout: 60000 });
  const body = await resp.text();
  await sleep(150);
  const counts = await page.evaluate(() => { window.__obs.disconnect(); return window.__counts; });
  return { sse: parseSse(body), counts, rid: resp.headers()['x-attnx-rid'] };
}

const state = page => page.evaluate(() => {
  const s = window.axExplorer.session;
  return s && { n: s.n, P: s.P, rid: s.rid, texts: s.texts.slice(0, s.n), layers: s.layerList() };
});

// ------------------------------------------------------------------ tests

test('page loads from / with no request outside its origin, connects and detects the model', async ({ page, stack }) => {
  await page.goto(`${stack.base}/`);
  await page.waitForFunction(() => document.getElementById('conn').textContent === 'connected', null, { timeout: 15000 });
  const model = (await (await fetch(`${stack.base}/v1/models`)).json()).data[0].id;
  await page.waitForFunction(m => document.getElementById('model').textContent === m, model, { timeout: 10000 });
  assert(page.url().endsWith('/explorer.html'), `/ forwards to explorer.html (at ${page.url()})`);
});

test('stream: tokens and attention appear while the reply is generated', async ({ page, stack }) => {
  const r = await runPrompt(page, 'What is 347 + 586?', { 'max-tokens': 80, temperature: 0, 'top-k': 5, mode: 'mean_logit', 'capture-layers': 'last', threshold: 0.05 });
  ctx.run1 = r;
  const s = await state(page);
  assert(r.sse.gen.length > 10, `reply has ${r.sse.gen.length} tokens`);
  assert(s.n === s.P + r.sse.gen.length, `page shows ${s.n} positions, expected P ${s.P} + ${r.sse.gen.length}`);
  assert(JSON.stringify(s.texts.slice(s.P)) === JSON.stringify(r.sse.gen), 'generated texts match the SSE tokens');
  const grow = r.counts.filter(c => c.n > s.P);
  assert(grow.length >= 3, `chips appeared in ${grow.length} steps (streaming needs ≥ 3): ${JSON.stringify(r.counts.map(c => c.n))}`);
  assert(grow[grow.length - 1].t - grow[0].t > 20, 'token chips appeared over time, not at once');
  const entries = await page.evaluate(() => window.axExplorer.session.nRecords);
  assert(entries >= r.sse.entries.size, `page holds ${entries} entries, SSE carried ${r.sse.entries.size}`);
  assert(r.rid && s.rid === r.rid, `session rid ${s.rid} is the relay's X-Attnx-Rid ${r.rid}`);
});

test('click a generated token: highlighted targets are exactly its entry\'s top-k positions', async ({ page }) => {
  const { sse } = ctx.run1;
  const P = (await state(page)).P;
  const cands = [...sse.entries.keys()].filter(p => p >= P).sort((a, b) => a - b);
  const picks = [cands[1], cands[Math.floor(cands.length / 2)], cands[cands.length - 1]];
  for (const p of picks) {
    await page.click(`#rows .tok[data-pos="${p}"]`);
    const e = sse.entries.get(p);
    const dom = await page.$$eval('#rows .tok.tgt', els => els.map(x => +x.dataset.pos));
    eqSets(dom, e.token_positions, `position ${p}: highlighted chips`);
    const rows = await page.$$eval('#side-list .r', els => els.map(x => +x.dataset.pos));
    eqSets(rows, e.token_positions, `position ${p}: "Attends to" rows`);
    const sel = await page.$$eval('#rows .tok.sel', els => els.map(x => +x.dataset.pos));
    eqSets(sel, [p], 'selected chip');
    // rows are ranked by score, and the percentages are the entry's scores
    const first = await page.$eval('#side-list .r .num', x => x.firstChild.textContent);
    assert(Math.abs(parseFloat(first) - 100 * e.attention_scores[0]) < 0.06, `top row ${first} vs score ${e.attention_scores[0]}`);
    // true probability and top-k mass are shown
    const mass = await page.$eval('#sel-mass', x => parseFloat(x.textContent));
    assert(Math.abs(mass - 100 * e.topk_mass) < 0.06, `top-k mass ${mass} vs ${e.topk_mass}`);
    // "Attended by": every later query whose entry names p
    const expect = [...sse.entries.values()].filter(x => x.position !== p && x.token_positions.includes(p)).map(x => x.position);
    await page.click('#tab-by');
    const by = await page.$$eval('#side-list .r', els => els.map(x => +x.dataset.pos));
    eqSets(by.filter(x => x !== p), expect, `position ${p}: "Attended by" rows`);
    const src = await page.$$eval('#rows .tok.src', els => els.map(x => +x.dataset.pos));
    eqSets(src.filter(x => x !== p), expect, `position ${p}: source chips`);
    await page.click('#tab-to');
  }
  const ms = await page.evaluate(() => window.axExplorer.perf.clickMs);
  assert(ms < 50, `click took ${ms} ms`);
});

test('true probability weighting and the sink toggle', async ({ page }) => {
  const { sse } = ctx.run1;
  const p = [...sse.entries.keys()].sort((a, b) => a - b).at(-2);
  const e = sse.entries.get(p);
  await page.click(`#rows .tok[data-pos="${p}"]`);
  await setInputs(page, { weight: 'prob' });
  const probs = e.topk_logits.map(l => Math.exp(l - e.logsumexp_all));
  const top = await page.$eval('#side-list .r .num', x => parseFloat(x.firstChild.textContent));
  assert(Math.abs(top - 100 * Math.max(...probs)) < 0.06, `true prob row ${top} vs ${Math.max(...probs)}`);
  await setInputs(page, { weight: 'score', sink: true });
  const dom = await page.$$eval('#rows .tok.tgt', els => els.map(x => +x.dataset.pos));
  eqSets(dom, e.token_positions.filter(t => t !== 0), 'targets without the sink');
  await setInputs(page, { sink: false });
});

test('segments: Prompt / Thinking / Response split on <think> … </think>', async ({ page }) => {
  const s = await state(page);
  const heads = await page.$$eval('#rows .seg-h', els => els.map(x => x.textContent));
  const think = s.texts.indexOf('<think>', s.P), endThink = s.texts.indexOf('</think>', s.P);
  assert(think >= s.P && endThink > think, `reply has <think> (${think}) and </think> (${endThink})`);
  assert(/Prompt/.test(heads[0]) && /Thinking/.test(heads[1]) && /Response/.test(heads[2]), `segments: ${heads}`);
  assert(heads[1].includes(`positions ${think}–${endThink}`), `Thinking covers ${think}–${endThink}: ${heads[1]}`);
  // collapsing Thinking hides its chips, expanding shows them again
  await page.locator('#rows .seg-h').nth(1).click();
  const hidden = await page.$$(`#rows .tok[data-pos="${think + 1}"]`);
  assert(hidden.length === 0, 'collapsed Thinking hides its tokens');
  await page.locator('#rows .seg-h').nth(1).click();
  assert((await page.$$(`#rows .tok[data-pos="${think + 1}"]`)).length === 1, 'expanding shows them again');
});

test('word-level aggregation merges tokens into words and aggregates their links', async ({ page }) => {
  const { sse } = ctx.run1;
  const nTok = (await page.$$('#rows .tok')).length;
  await page.keyboard.press('w');
  await settle(page);
  const starts = await page.$$eval('#rows .tok', els => els.map(x => +x.dataset.pos));
  assert(starts.length < nTok, `words: ${starts.length} chips, tokens: ${nTok}`);
  const word = await page.$$eval('#rows .tok[data-end]', els => els.map(x => [+x.dataset.pos, +x.dataset.end]));
  const pick = word.find(([a, b]) => [...Array(b - a).keys()].some(i => sse.entries.has(a + i)) && a > 25);
  assert(pick, 'a multi-token word with attention entries');
  await page.click(`#rows .tok[data-pos="${pick[0]}"]`);
  const unitOf = t => starts.filter(s => s <= t).at(-1);
  const expect = [];
  for (let q = pick[0]; q < pick[1]; q++) if (sse.entries.has(q)) expect.push(...sse.entries.get(q).token_positions.map(unitOf));
  const dom = await page.$$eval('#rows .tok.tgt', els => els.map(x => +x.dataset.pos));
  eqSets(dom, expect, `word ${pick[0]}–${pick[1] - 1}: highlighted words`);
  await page.keyboard.press('w');
  await settle(page);
  assert((await page.$$('#rows .tok')).length === nTok, 'back to tokens');
});

test('the per-layer summary sets the layer filter', async ({ page }) => {
  const rows = await page.$$eval('#layer-rows tr', els => els.map(x => x.dataset.layer));
  assert(rows.length >= 1, 'one row per captured layer');
  await page.click(`#layer-rows tr[data-layer="${rows[0]}"]`);
  await settle(page);
  assert(await page.$eval('#layer', x => x.value) === rows[0], 'layer filter follows the clicked row');
  await page.click(`#layer-rows tr[data-layer="${rows.at(-1)}"]`);
  await settle(page);
});

test('live monitor shows a request sent by another client (curl) and follows it', async ({ page, stack }) => {
  await page.click('#view-live');
  const hdr = path.join(stack.dir, 'curl.hdr'), out = path.join(stack.dir, 'curl.sse');
  const body = JSON.stringify({ messages: [{ role: 'user', content: 'Copy this exactly: the cat sat on the mat' }],
    max_tokens: 40, temperature: 0, stream: true, return_attention_tokens: true });
  await new Promise((ok, bad) => execFile('curl', ['-sN', '-D', hdr, '-o', out, `${stack.base}/v1/chat/completions`,
    '-H', 'Content-Type: application/json', '-d', body], e => (e ? bad(e) : ok())));
  const rid = /x-attnx-rid:\s*(\S+)/i.exec(fs.readFileSync(hdr, 'utf8'))[1];
  ctx.curlRid = rid;
  await page.waitForSelector(`#live-rows tr[data-rid="${rid}"]`, { timeout: 10000 });
  await page.click(`#live-rows button[data-watch="${rid}"]`);
  await page.waitForFunction(r => { const s = window.axExplorer.session; return s && s.rid === r && s.ended && s.n > s.P; }, rid, { timeout: 10000 });
  const sse = parseSse(fs.readFileSync(out, 'utf8'));
  const s = await state(page);
  const p = [...sse.entries.keys()].sort((a, b) => a - b)[3];
  await page.click(`#rows .tok[data-pos="${p}"]`);
  const dom = await page.$$eval('#rows .tok.tgt', els => els.map(x => +x.dataset.pos));
  eqSets(dom, sse.entries.get(p).token_positions, `live request, position ${p}`);
  // token texts come from /v1/detokenize; wait until they are in
  await page.waitForFunction(() => { const s = window.axExplorer.session; for (let p = 0; p < s.n - 1; p++) if (s.texts[p] == null) return false; return true; }, null, { timeout: 10000 });
  const s2 = await state(page);
  assert(s2.texts.slice(s.P, s.P + 5).join('') === sse.gen.slice(0, 5).join(''), `live texts ${JSON.stringify(s2.texts.slice(s.P, s.P + 5))} vs ${JSON.stringify(sse.gen.slice(0, 5))}`);
});

test('recording round-trip: save, load, same tokens and same highlights', async ({ page, stack }) => {
  // back to the page's own streamed request
  await page.click('#view-tokens');
  const top = stack.caps.n_layers - 1;
  const r = await runPrompt(page, 'What is 125 + 250?', { 'max-tokens': 60, temperature: 0, 'capture-layers': `0,${top}` });
  const before = await state(page);
  assert(before.layers.length === 2, `two layers captured: ${before.layers}`);
  const p = [...r.sse.entries.keys()].sort((a, b) => a - b)[5];
  await page.click(`#rows .tok[data-pos="${p}"]`);
  const hl = await page.evaluate(() => window.axExplorer.highlighted());
  const [dl] = await Promise.all([page.waitForEvent('download'), page.click('#save')]);
  const file = path.join(stack.dir, 'saved.jsonl');
  await dl.saveAs(file);
  assert(fs.statSync(file).size > 1000, 'saved file is not empty');
  await page.click('#clear');
  await page.setInputFiles('#file', file);
  await page.waitForFunction(rid => window.axExplorer.session && window.axExplorer.session.rid === rid && window.axExplorer.session.origin === 'file', before.rid, { timeout: 10000 });
  const after = await state(page);
  assert(JSON.stringify(after) === JSON.stringify(before), 'tokens, texts and layers survive the round trip');
  await page.click(`#rows .tok[data-pos="${p}"]`);
  const hl2 = await page.evaluate(() => window.axExplorer.highlighted());
  assert(JSON.stringify(hl2) === JSON.stringify(hl), `highlights: ${JSON.stringify(hl2)} vs ${JSON.stringify(hl)}`);
  await setInputs(page, { layer: 0 });
  const l0 = await page.$$eval('#rows .tok.tgt', els => els.map(x => +x.dataset.pos));
  eqSets(l0, r.sse.entries.get(p).layers['0'].token_positions, 'layer 0 after loading');
  await setInputs(page, { layer: top });
});

test('attnx-tail --record msgpack recording loads', async ({ page, stack }) => {
  await stack.stopTail(); // attnx-tail writes through stdio buffers: stopping it flushes the last frames
  const bytes = fs.readFileSync(stack.recording);
  const recs = [];
  decodeAll(new Uint8Array(bytes), v => { for (const x of Array.isArray(v) ? v : [v]) recs.push(x); });
  const mine = recs.filter(x => x.rid === ctx.curlRid && x.t === 'attn');
  assert(mine.length > 10, `tail recorded ${mine.length} attn records of the curl request`);
  const f = path.join(stack.dir, 'tail-copy.msgpack');
  fs.copyFileSync(stack.recording, f);
  await page.setInputFiles('#file', f);
  await page.waitForFunction(() => window.axExplorer.session && window.axExplorer.session.origin === 'file', null, { timeout: 10000 });
  await page.click('#view-live');
  await page.click(`#live-rows button[data-watch="${ctx.curlRid}"]`);
  await page.waitForFunction(r => window.axExplorer.session.rid === r, ctx.curlRid);
  const rec = mine[Math.floor(mine.length / 2)];
  await page.click(`#rows .tok[data-pos="${rec.position}"]`);
  const dom = await page.$$eval('#rows .tok.tgt', els => els.map(x => +x.dataset.pos));
  eqSets(dom, rec.token_positions, `recorded entry of position ${rec.position}`);
});

test('keyboard: arrows move the selection, Esc clears, t/b tabs, 1–4 views, [ ] layers', async ({ page }) => {
  await page.click('#rows .tok[data-pos="5"]');
  await page.keyboard.press('ArrowRight');
  assert(await page.evaluate(() => window.axExplorer.selPos) === 6, 'ArrowRight → 6');
  await page.keyboard.press('ArrowLeft');
  await page.keyboard.press('ArrowLeft');
  assert(await page.evaluate(() => window.axExplorer.selPos) === 4, 'ArrowLeft twice → 4');
  await page.keyboard.press('b');
  assert(await page.$eval('#tab-by', x => x.classList.contains('on')), 'b → Attended by');
  await page.keyboard.press('t');
  await page.keyboard.press('Escape');
  assert(await page.evaluate(() => window.axExplorer.selPos) === -1, 'Esc clears');
  assert((await page.$$('#rows .tok.sel')).length === 0, 'no chip selected');
  await page.keyboard.press('2');
  assert(await page.$eval('#pane-matrix', x => x.classList.contains('on')), '2 → matrix');
  await page.keyboard.press('1');
  assert(await page.$eval('#pane-tokens', x => x.classList.contains('on')), '1 → tokens');
});

test('matrix view draws the top-k map and a click selects the query row', async ({ page }) => {
  await page.click('#view-matrix');
  await sleep(200);
  const lit = await page.evaluate(() => {
    const cv = document.getElementById('matrix'), g = cv.getContext('2d');
    const d = g.getImageData(0, 0, cv.width, cv.height).data, bg = d.slice(0, 3);
    let n = 0;
    for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - bg[0]) + Math.abs(d[i + 1] - bg[1]) + Math.abs(d[i + 2] - bg[2]) > 60) n++;
    return n;
  });
  assert(lit > 50, `matrix has ${lit} lit pixels`);
  const box = await page.$eval('#matrix', x => { const r = x.getBoundingClientRect(); return { x: r.x, y: r.y, w: r.width, h: r.height }; });
  await page.mouse.click(box.x + 48 + 10, box.y + 18 + (box.h - 26) * 0.9);
  const sel = await page.evaluate(() => window.axExplorer.selPos);
  const n = await page.evaluate(() => window.axExplorer.session.n);
  assert(sel > n * 0.8 && sel < n, `click near the bottom selects a late query (${sel} of ${n})`);
  ctx.matrixSel = true;
  await page.click('#view-tokens');
});

test('heads mode: layer × head grid, click focuses a head', async ({ page, stack }) => {
  const r = await runPrompt(page, 'What is 111 + 222?', { 'max-tokens': 24, temperature: 0, mode: 'heads', 'capture-layers': 'all' });
  const L = stack.caps.n_layers, H = stack.caps.n_heads;
  await page.click('#view-heads');
  await settle(page);
  const cells = await page.$$('#heads .cell');
  assert(cells.length === L * (H + 1), `${cells.length} cells for ${L} layers × (${H} heads + mean)`);
  await page.click(`#heads .cell[data-layer="2"][data-head="3"]`);
  assert(await page.$eval('#pane-tokens', x => x.classList.contains('on')), 'focusing a head shows the tokens');
  assert(await page.$eval('#layer', x => x.value) === '2' && await page.$eval('#head', x => x.value) === '3', 'layer 2 head 3 selected');
  const p = [...r.sse.entries.keys()].sort((a, b) => a - b)[4];
  await page.click(`#rows .tok[data-pos="${p}"]`);
  const head = r.sse.entries.get(p).layers['2'].heads.find(h => h.head_id === 3);
  const dom = await page.$$eval('#rows .tok.tgt', els => els.map(x => +x.dataset.pos));
  eqSets(dom, head.token_positions, `layer 2 head 3, position ${p}`);
  ctx.headsDone = true;
});

test('step scrubber replays the generation', async ({ page }) => {
  const s = await state(page);
  await page.$eval('#scrub', (x) => { x.value = 5; x.dispatchEvent(new Event('input')); });
  const shown = await page.$$eval('#rows .tok', els => Math.max(...els.map(x => +x.dataset.pos)));
  assert(shown === s.P + 4, `step 5 shows positions up to ${s.P + 4}, page shows ${shown}`);
  assert(await page.evaluate(() => window.axExplorer.selPos) === s.P + 3, 'the query that sampled the newest token is selected');
  await page.$eval('#scrub', x => { x.value = x.max; x.dispatchEvent(new Event('input')); });
  const all = await page.$$eval('#rows .tok', els => els.length);
  assert(all === s.n, `the end of the scrubber shows everything (${all} of ${s.n})`);
});

test('export PNG and SVG, themes', async ({ page, stack }) => {
  for (const [btn, ext, magic] of [['#export-png', 'png', '\x89PNG'], ['#export-svg', 'svg', '<svg']]) {
    const [dl] = await Promise.all([page.waitForEvent('download'), page.click(btn)]);
    const f = path.join(stack.dir, `export.${ext}`);
    await dl.saveAs(f);
    const head = fs.readFileSync(f).subarray(0, 4).toString('latin1');
    assert(head.startsWith(magic.slice(0, 4)), `${ext} export starts with ${JSON.stringify(head)}`);
  }
  const t0 = await page.evaluate(() => document.documentElement.dataset.theme);
  await page.click('#theme');
  const t1 = await page.evaluate(() => document.documentElement.dataset.theme);
  assert(t0 !== t1 && ['light', 'dark'].includes(t1), `theme ${t0} → ${t1}`);
  await page.click('#theme');
});

test('50,000-token recording loads and a click updates in under 50 ms', async ({ page, stack }) => {
  const file = path.join(stack.dir, 'long.jsonl');
  const g = writeLong(file, 50000, 2000, 10);
  await page.click('#view-tokens');
  await page.setInputFiles('#file', file);
  await page.waitForFunction(rid => window.axExplorer.session && window.axExplorer.session.rid === rid, g.rid, { timeout: 60000 });
  const perf = await page.evaluate(() => window.axExplorer.perf);
  const n = await page.evaluate(() => window.axExplorer.session.n);
  assert(n === 50000, `${n} positions loaded`);
  const chips = await page.$$eval('#rows .tok', els => els.length);
  assert(chips > 50 && chips < 5000, `only the visible chips are in the DOM (${chips})`);
  const times = [], partsAll = [];
  for (const p of [25000, 2001, 49990, 0]) {
    await page.evaluate(pos => { const a = window.axExplorer; a.tokens.scrollTo(a.session.units(a.words).unitOf[pos]); }, p);
    await sleep(50);
    await page.click(`#rows .tok[data-pos="${p}"]`);
    const [ms, parts] = await page.evaluate(() => [window.axExplorer.perf.clickMs, window.axExplorer.perf.lastParts]);
    times.push(ms);
    partsAll.push(parts);
    if (g.entries.has(p)) {
      const dom = await page.evaluate(() => window.axExplorer.highlighted().targets);
      eqSets(dom, g.entries.get(p), `position ${p}`);
    }
  }
  await sleep(100);
  const frame = await page.evaluate(() => window.axExplorer.perf.frameMs);
  console.log(`    load ${perf.loadMs.toFixed(0)} ms (parse ${perf.parseMs.toFixed(0)} ms), clicks ${times.map(t => t.toFixed(1)).join(' / ')} ms (positions 25000, 2001, 49990, 0 = the sink, attended by every query), last click to next frame ${frame?.toFixed(1)} ms`);
  console.log(`    clicks as compute + apply + layout: ${partsAll.map(x => `${x.compute.toFixed(1)}+${x.apply.toFixed(1)}+${x.layout.toFixed(1)}`).join(' / ')} ms`);
  for (const t of times) assert(t < 50, `click took ${t.toFixed(1)} ms`);
  ctx.long = true;
});

// ------------------------------------------------------------------ screenshots (--screenshots)

async function screenshots(page, stack) {
  const dir = path.join(root, 'web/screenshots');
  fs.mkdirSync(dir, { recursive: true });
  await page.goto(`${stack.base}/explorer.html`);
  await page.evaluate(() => localStorage.setItem('attnx-theme', 'light'));
  await page.reload();
  await page.waitForFunction(() => document.getElementById('conn').textContent === 'connected');
  const r = await runPrompt(page, 'What is 347 + 586?', { 'max-tokens': 100, temperature: 0, mode: 'mean_logit', 'capture-layers': 'all', 'prompt-attn': true });
  const p = [...r.sse.entries.keys()].sort((a, b) => a - b)[Math.floor(r.sse.entries.size * 0.75)];
  await page.click(`#rows .tok[data-pos="${p}"]`);
  await page.screenshot({ path: path.join(dir, 'tokens.png') });
  await page.click('#tab-by');
  await page.click('#theme');
  await page.screenshot({ path: path.join(dir, 'tokens-dark.png') });
  await page.click('#theme');
  await page.click('#tab-to');
  await page.click('#view-matrix');
  await sleep(200);
  await page.screenshot({ path: path.join(dir, 'matrix.png') });
  await runPrompt(page, 'What is 347 + 586?', { 'max-tokens': 100, temperature: 0, mode: 'heads', 'capture-layers': 'all' });
  await page.click('#view-heads');
  await sleep(200);
  await page.screenshot({ path: path.join(dir, 'heads.png') });
  await page.click('#view-live');
  await sleep(400);
  await page.screenshot({ path: path.join(dir, 'live.png') });
  const file = path.join(stack.dir, 'long-shot.jsonl');
  writeLong(file, 50000, 2000, 10);
  await page.click('#view-tokens');
  await page.setInputFiles('#file', file);
  await page.waitForFunction(() => window.axExplorer.session && window.axExplorer.session.n === 50000, null, { timeout: 60000 });
  await page.evaluate(() => { const a = window.axExplorer; a.tokens.scrollTo(a.session.units(false).unitOf[30000]); });
  await sleep(100);
  await page.click('#rows .tok[data-pos="30000"]');
  await page.screenshot({ path: path.join(dir, 'long-50k.png') });
  console.log(`screenshots in ${dir}`);
}

// ------------------------------------------------------------------ main

async function main() {
  for (const b of ['relay/attnx-relay', 'capture/attnx-capture', 'tail/attnx-tail',
    engineKind === 'engine' ? 'engine/attnx-engine' : 'tests/attnx-test-producer']) {
    if (!fs.existsSync(path.join(build, b))) { console.error(`run.mjs: ${build}/${b} is not built`); process.exit(2); }
  }
  const stack = new Stack({ root, build, engine: engineKind });
  let [pass, fail] = only ? [0, 0] : runUnit(console.log);
  let browser = null;
  const onSig = async () => { await browser?.close().catch(() => {}); await stack.down(); process.exit(130); };
  process.on('SIGINT', onSig);
  process.on('SIGTERM', onSig);
  try {
    console.log(`browser tests: engine ${engineKind}, build ${build}, logs ${stack.dir}`);
    await stack.up();
    browser = await launchBrowser(chromium, stack.dir);
    const page = browser.pages()[0] || await browser.newPage();
    const errors = [], foreign = [];
    page.on('pageerror', e => errors.push(e.message));
    page.on('request', rq => {
      const u = rq.url();
      if (!u.startsWith(stack.base) && !u.startsWith('data:') && !u.startsWith('blob:') && !u.startsWith(stack.base.replace('http', 'ws'))) foreign.push(u);
    });
    for (const t of tests) {
      if (only && !t.name.includes(only) && !t.name.startsWith('page loads')) continue;
      if (engineKind !== 'engine' && /segments|word-level/.test(t.name)) { console.log(`skip - ${t.name} (needs attnx-engine's tokenizer and <think> replies)`); continue; }
      const t0 = Date.now();
      try {
        await Promise.race([t.fn({ page, stack }), sleep(120000).then(() => { throw new Error('timeout (120 s)'); })]);
        if (errors.length) throw new Error(`page errors: ${errors.splice(0).join('; ')}`);
        pass++;
        console.log(`ok - ${t.name} (${Date.now() - t0} ms)`);
      } catch (e) {
        fail++;
        console.log(`FAIL - ${t.name}: ${e.message.split('\n')[0]}`);
        await page.screenshot({ path: path.join(stack.dir, `fail-${tests.indexOf(t)}.png`) }).catch(() => {});
      }
    }
    if (foreign.length) { fail++; console.log(`FAIL - requests left the page's origin: ${foreign.slice(0, 5).join(', ')}`); }
    else { pass++; console.log('ok - no request left the page\'s origin'); }
    if (shots) await screenshots(page, stack);
  } catch (e) {
    fail++;
    console.log(`FAIL - setup: ${e.message}`);
  } finally {
    await browser?.close().catch(() => {});
    await stack.down();
  }
  if (fail) console.log(`logs and failure screenshots: ${stack.dir}`);
  else fs.rmSync(stack.dir, { recursive: true, force: true });
  console.log(`${pass} passed, ${fail} failed`);
  process.exit(fail ? 1 : 0);
}

main();
