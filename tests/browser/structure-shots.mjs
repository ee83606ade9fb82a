// structure-shots.mjs — screenshots of the shipped model's attention structure in the explorer page, for
// engine/README.md (issue 3's quality bar: "show it with attnx-tail output and a screenshot").
//
//   node tests/browser/structure-shots.mjs [--build DIR] [--out DIR]
//
// It starts attnx-engine with engine/models/attnx-tiny, attnx-relay serving web/, attnx-capture and attnx-tail on
// private ports, ipc paths and an shm name (harness.mjs's Stack), opens the explorer in Debian's headless chromium
// at 1280×800 and runs the two greedy chats of engine/tools/show-attention with mode "per head" and capture "all"
// (the page's policy puts the capture in heads mode for every layer and head). For each it selects the head the
// README names, clicks the query position that shows the structure, checks that the page shows what the request's
// own SSE entry for that (position, layer, head) says — the highlighted chips are its top-k positions and the top
// target is the expected prompt token — and only then writes the PNG:
//
//   structure-addition.png  "What is 347 + 586?", layer 2 head 3, the trace's " " before the second units operand:
//                           it attends to the "6" of 586 in the prompt.
//   structure-lookup.png    the seven-line key: value list, layer 3 head 1, the trace's first value digit "7":
//                           writing the next digit, it attends to the "3" on the line "rown5: 733" of the listing.
//
// Exit status 1 (and no PNG for that case) when the page or the model does not show the structure.

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { Stack, launchBrowser } from './harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const args = process.argv.slice(2);
const opt = (name, def) => { const i = args.indexOf(name); return i >= 0 ? args[i + 1] : def; };
const build = path.resolve(root, opt('--build', process.env.AX_BUILD_DIR || 'build'));
const outDir = path.resolve(root, opt('--out', 'web/screenshots'));

// The prompts of engine/tools/show-attention (ADD, KV).
const KV_LINES = ['mqze3: 417', 'bafo7: 902', 'tlik1: 256', 'rown5: 733', 'gesp0: 618', 'hvuc8: 145', 'dxaw2: 389'];
const CASES = [
  {
    name: 'addition',
    prompt: 'What is 347 + 586?',
    layer: 2, head: 3,
    // the first generated position whose next token is the units column's second operand ("6") ...
    pick: (t, P) => afterLabel(t, P, 'units', 2),
    // ... must attend most to the "6" of "586" in the prompt
    want: (t, P, p) => promptDigit(t, P, t[p + 1], 1),
  },
  {
    name: 'lookup',
    prompt: 'Here is a list of keys and values.\n' + KV_LINES.join('\n') + '\nWhat is the value of rown5?',
    layer: 3, head: 1,
    // the trace's first value digit "7" of "rown5: 733" (the query that writes the second digit) ...
    pick: (t, P) => traceValueDigit(t, P),
    // ... must attend most to the second digit of "733" on the listing's rown5 line
    want: (t, P) => listingValueDigit(t, P, 1),
  },
];

function assert(c, msg) { if (!c) throw new Error(msg); }
const sleep = ms => new Promise(r => setTimeout(r, ms));
const settle = page => page.evaluate(() => new Promise(r => requestAnimationFrame(() => setTimeout(r, 0))));

/** Position of the n-th space-token after the first trace text `label` (the query that writes the n-th operand). */
function afterLabel(t, P, label, n) {
  const at = t.findIndex((x, i) => i >= P && x != null && x.includes(label));
  assert(at >= 0, `no "${label}" in the trace`);
  // operands are the 1st and 2nd digit tokens after the label ("units: 7 + 6 ...")
  const digits = [];
  for (let p = at; p + 1 < t.length && digits.length < n; p++) if (/^\d$/.test(t[p + 1])) digits.push(p);
  assert(digits.length === n, `fewer than ${n} digits after "${label}"`);
  return digits[n - 1];
}

/** Prompt position of digit `d` in the `k`-th number (0-based) of the prompt. */
function promptDigit(t, P, d, k) {
  const nums = [];
  for (let p = 0; p < P; p++) {
    if (!/^\d$/.test(t[p])) continue;
    if (p > 0 && /^\d$/.test(t[p - 1])) nums[nums.length - 1].push(p); else nums.push([p]);
  }
  const hit = (nums[k] || []).find(p => t[p] === d);
  assert(hit != null, `digit "${d}" not in prompt number ${k}`);
  return hit;
}

/** Prompt position of the `i`-th value digit on the listing line "rown5: 733". */
function listingValueDigit(t, P, i) {
  for (let p = 0; p < P; p++) {
    if (!(t[p] === 'r' && t[p + 1] === 'own' && t[p + 2] === '5' && t[p + 3] === ':')) continue;
    const ds = [];
    for (let q = p + 4; q < P && ds.length < 3; q++) if (/^\d$/.test(t[q])) ds.push(q);
    return ds[i];
  }
  throw new Error('no "rown5:" line in the prompt');
}

/** The trace position of the first digit of rown5's value ("7"), after "rown5:" inside <think>. */
function traceValueDigit(t, P) {
  const end = t.indexOf('</think>', P);
  for (let p = P; p < end; p++) {
    if (t[p + 1] === ':' && t[p] === '5' && t[p - 1] === 'own') {
      for (let q = p + 2; q < end; q++) if (/^\d$/.test(t[q])) return q;
    }
  }
  throw new Error('no "rown5: <value>" in the trace');
}

/** Fill the page's settings, like run.mjs's setInputs. */
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

/** The per-head entries of a streamed chat reply's SSE body: Map "pos/layer/head" → { positions, scores }. */
function headEntries(text) {
  const m = new Map();
  const add = e => {
    for (const [l, le] of Object.entries(e.layers || {})) {
      for (const h of le.heads || []) m.set(`${e.position}/${l}/${h.head_id}`, h);
    }
  };
  for (const line of text.split('\n')) {
    if (!line.startsWith('data: ') || line === 'data: [DONE]') continue;
    const d = JSON.parse(line.slice(6)).choices?.[0]?.delta || {};
    for (const e of d.prompt_attention || []) add(e);
    for (const e of d.attention_tokens || []) add(e);
  }
  return m;
}

async function shoot(page, c) {
  await setInputs(page, { prompt: c.prompt, 'max-tokens': 200, temperature: 0, 'top-k': 5, threshold: 0.05,
    mode: 'heads', 'capture-layers': 'all', 'prompt-attn': true, thinking: true, api: 'chat', weight: 'score', sink: false });
  const respP = page.waitForResponse(r => r.url().endsWith('/v1/chat/completions'));
  await page.click('#run');
  const resp = await respP;
  await page.waitForFunction(() => window.axExplorer.session && window.axExplorer.session.ended && !window.axExplorer.streaming,
    null, { timeout: 180000 });
  const entries = headEntries(await resp.text());
  await sleep(150);
  const { texts, P } = await page.evaluate(() => {
    const s = window.axExplorer.session;
    return { texts: s.texts.slice(0, s.n), P: s.P };
  });
  const p = c.pick(texts, P), want = c.want(texts, P, p);
  const e = entries.get(`${p}/${c.layer}/${c.head}`);
  assert(e, `${c.name}: no layer ${c.layer} head ${c.head} entry for position ${p}`);
  const top = e.token_positions[e.attention_scores.indexOf(Math.max(...e.attention_scores))];
  assert(top === want, `${c.name}: position ${p} (${JSON.stringify(texts[p])} → ${JSON.stringify(texts[p + 1])}) ` +
    `attends most to ${top} ${JSON.stringify(texts[top])}, expected ${want} ${JSON.stringify(texts[want])}`);

  await page.click('#view-tokens');
  await setInputs(page, { layer: c.layer, head: c.head });
  await page.click(`#rows .tok[data-pos="${p}"]`);
  await page.click('#tab-to');
  await settle(page);
  const tgt = await page.$$eval('#rows .tok.tgt', els => els.map(x => +x.dataset.pos).sort((a, b) => a - b));
  const exp = [...e.token_positions].sort((a, b) => a - b);
  assert(JSON.stringify(tgt) === JSON.stringify(exp), `${c.name}: page highlights [${tgt}], entry has [${exp}]`);
  const rows = await page.$$eval('#side-list .r', els => els.map(x => [+x.dataset.pos, x.querySelector('.num')?.firstChild?.textContent]));
  assert(rows.length && rows[0][0] === want, `${c.name}: side panel's first row is ${rows[0]?.[0]}, expected ${want}`);
  // keep the selected chip and its top target both on screen
  await page.evaluate(([a, b]) => {
    const ea = document.querySelector(`#rows .tok[data-pos="${a}"]`), eb = document.querySelector(`#rows .tok[data-pos="${b}"]`);
    const box = document.getElementById('tokens');
    const ya = ea.offsetTop, yb = eb.offsetTop;
    box.scrollTop = Math.max(0, Math.min(ya, yb) - 60);
  }, [p, want]);
  await settle(page);
  await sleep(200);
  const file = path.join(outDir, `structure-${c.name}.png`);
  await page.screenshot({ path: file });
  console.log(`${c.name}: P ${P}, ${texts.length - P} generated; layer ${c.layer} head ${c.head}, position ${p} ` +
    `${JSON.stringify(texts[p])} → next ${JSON.stringify(texts[p + 1])}: ` +
    rows.map(([q, pct]) => `${q} ${JSON.stringify(texts[q])} ${pct}`).join(', '));
  console.log(`  wrote ${path.relative(root, file)}`);
}

async function main() {
  for (const b of ['relay/attnx-relay', 'capture/attnx-capture', 'tail/attnx-tail', 'engine/attnx-engine']) {
    if (!fs.existsSync(path.join(build, b))) { console.error(`structure-shots: ${build}/${b} is not built`); process.exit(2); }
  }
  fs.mkdirSync(outDir, { recursive: true });
  const stack = new Stack({ root, build, engine: 'engine' });
  let browser = null, failed = 0;
  const onSig = async () => { await browser?.close().catch(() => {}); await stack.down(); process.exit(130); };
  process.on('SIGINT', onSig);
  process.on('SIGTERM', onSig);
  try {
    await stack.up();
    browser = await launchBrowser(chromium, stack.dir);
    const page = browser.pages()[0] || await browser.newPage();
    await page.goto(`${stack.base}/explorer.html`);
    await page.evaluate(() => localStorage.setItem('attnx-theme', 'light'));
    await page.reload();
    await page.waitForFunction(() => document.getElementById('conn').textContent === 'connected', null, { timeout: 15000 });
    for (const c of CASES) {
      try { await shoot(page, c); } catch (err) {
        failed++;
        console.log(`FAIL ${c.name}: ${err.message}`);
        await page.screenshot({ path: path.join(stack.dir, `fail-${c.name}.png`) }).catch(() => {});
      }
    }
  } catch (err) {
    failed++;
    console.log(`FAIL: ${err.stack || err}`);
  } finally {
    await browser?.close().catch(() => {});
    await stack.down();
  }
  if (failed) console.log(`logs: ${stack.dir}`);
  process.exit(failed ? 1 : 0);
}

main();
