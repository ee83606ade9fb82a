// harness.mjs — starts what the browser tests need and stops it again: an engine (attnx-engine with the shipped
// tiny model, or attnx-test-producer), attnx-relay serving web/, attnx-capture, and attnx-tail --record, on unique
// ports, ipc paths and shm names so the tests run beside a live demo or other tests; then chromium (Debian's
// /usr/bin/chromium, headless, fresh profile) through playwright-core.
//
// Every child is killed with SIGTERM (then SIGKILL after 3 s) by pid in reverse start order; logs stay in the run's
// temporary directory, which is printed when a test fails.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

function onePort() {
  return new Promise((ok, bad) => {
    const s = net.createServer();
    s.once('error', bad);
    s.listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => ok(p)); });
  });
}

// A free port, never one this process was given before: two picks in a row can get the same port (its socket is
// closed in between), and then the engine and the relay of one stack would both try to listen on it (the C e2e
// tests hit it in CI, session 16).
const given = new Set();
export async function freePort() {
  for (let tries = 0; tries < 100; tries++) {
    const p = await onePort();
    if (!given.has(p)) { given.add(p); return p; }
  }
  throw new Error('no free port that was not handed out before');
}

const sleep = ms => new Promise(r => setTimeout(r, ms));

async function waitHttp(url, seconds, child) {
  const end = Date.now() + seconds * 1000;
  while (Date.now() < end) {
    if (child && child.exitCode != null) throw new Error(`${url}: process exited (${child.exitCode})`);
    try { const r = await fetch(url); if (r.ok) return; } catch { /* not yet */ }
    await sleep(100);
  }
  throw new Error(`${url} did not answer in ${seconds} s`);
}

export class Stack {
  constructor({ root, build, engine }) {
    this.root = root;
    this.build = build;
    this.engineKind = engine;
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'attnx-browser-'));
    this.children = [];
  }

  start(name, bin, args) {
    const log = fs.openSync(path.join(this.dir, `${name}.log`), 'a');
    const c = spawn(bin, args, { cwd: this.root, stdio: ['ignore', log, log] });
    c.name = name;
    this.children.push(c);
    return c;
  }

  async up() {
    const b = p => path.join(this.build, p);
    this.enginePort = await freePort();
    this.relayPort = await freePort();
    this.shm = `/attnx.browser${process.pid}`;
    const rec = `ipc://${this.dir}/records.sock`, pol = `ipc://${this.dir}/policy.sock`;
    this.feed = `ipc://${this.dir}/feed.sock`;
    const listen = `127.0.0.1:${this.enginePort}`;
    let eng;
    if (this.engineKind === 'engine') {
      eng = this.start('engine', b('engine/attnx-engine'), ['--model', path.join(this.root, 'engine/models/attnx-tiny'),
        '--listen', listen, '--shm', this.shm, '--threads', '1',
        // paced so tokens visibly stream: unpaced, the tiny model can finish a reply within one frame of the page
        '--max-steps-per-s', '100']);
    } else {
      eng = this.start('engine', b('tests/attnx-test-producer'), ['--listen', listen, '--shm', this.shm, '--tokens-per-s', '40']);
    }
    await waitHttp(`http://${listen}/v1/models`, 60, eng);
    const relay = this.start('relay', b('relay/attnx-relay'), ['--listen', `127.0.0.1:${this.relayPort}`,
      '--upstream', `http://${listen}`, '--records', rec, '--policy', pol, '--feed', this.feed,
      '--web', path.join(this.root, 'web'), '--attention-wait-ms', '200']);
    this.base = `http://127.0.0.1:${this.relayPort}`;
    await waitHttp(`${this.base}/healthz`, 30, relay);
    this.start('capture', b('capture/attnx-capture'), ['--shm', this.shm, '--records', rec, '--policy', pol, '--threads', '1']);
    this.recording = path.join(this.dir, 'tail.msgpack');
    this.start('tail', b('tail/attnx-tail'), ['--feed', this.feed, '--record', this.recording]);
    // the capture has attached when the relay has its hello
    const end = Date.now() + 20000;
    while (Date.now() < end) {
      const c = await (await fetch(`${this.base}/v1/attention/capabilities`)).json();
      if (c.n_layers > 0) { this.caps = c; break; }
      await sleep(100);
    }
    if (!this.caps) throw new Error('the capture did not say hello to the relay');
    await sleep(700); // the capture subscribes to policies (the relay republishes every 500 ms)
  }

  async stopTail() {
    const c = this.children.find(x => x.name === 'tail');
    if (!c || c.exitCode != null || c.signalCode != null) return;
    c.kill('SIGTERM');
    await new Promise(r => c.once('exit', r));
  }

  async down() {
    for (const c of [...this.children].reverse()) {
      if (c.exitCode != null || c.signalCode != null) continue;
      c.kill('SIGTERM');
      const t = setTimeout(() => c.kill('SIGKILL'), 3000);
      await new Promise(r => c.once('exit', r));
      clearTimeout(t);
    }
  }
}

export async function launchBrowser(chromium, dir) {
  const profile = fs.mkdtempSync(path.join(dir, 'profile-'));
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.AX_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1280, height: 800 },
    acceptDownloads: true,
  });
  return ctx;
}
