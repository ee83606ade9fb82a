#!/usr/bin/env python3
"""attnx Python binding on host memory, end to end and on its error paths (standard library only).

End to end: this script plays an engine through attnx.Exporter — host K pools (one per layer, slots scattered
through an index table), a host Q ring, one request with a prompt and decode steps — while the real
attnx-capture (CPU backend, heads mode, every layer, prompt rows too) computes from the segment, the real
attnx-relay forwards its records to its feed and the real attnx-tail prints them as JSON lines. Every captured
(position, layer, head) is compared with a float64 brute force over the same f32 values: top-k positions exactly,
logits and logsumexp within 1e-3, token ids, decode steps, prefill flags, no duplicates, the `end` record.

Error paths: bad names and configs, bad buffers, unknown requests, a full ring (descriptors dropped, counted, and
reported to the consumer as lost), a name held by a live engine, and a capture killed with SIGKILL (the engine's
steps stay fast and ax_export_wanted reports nobody).

Usage: test_export_host.py CAPTURE RELAY TAIL   (ATTNX_LIB_DIR = the build's shm/ folder)
"""
import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import attnx  # noqa: E402
from attnx import _ffi  # noqa: E402
from proc_util import read_records, stop  # noqa: E402
from attnx.consumer import Attached  # noqa: E402

L, HQ, HKV, D, SLOTS, QROWS, CTX, TOPK = 3, 4, 2, 16, 128, 256, 64, 5
PID = os.getpid()


def shm_name(tag):
    return "/attnx.pyt%d%s" % (PID, tag)


def model_cfg(**over):
    c = dict(n_layers=L, n_q_heads=HQ, n_kv_heads=HKV, head_dim=D, q_dtype="f32", k_dtype="f32", max_ctx=CTX,
             data_size=1 << 20)
    c.update(over)
    return c


def wait_wish(ex, want, timeout):
    """Wait until the exporter sees the capture's wish `want` ((layers mask, prefill)). A capture that attached but
    has not yet said what it wants shows (0, False), and it stores its mask and its prefill flag one after the other:
    waiting for any truthy wanted() raced the capture (a fresh-clone CI run at 7c1735f, under load)."""
    end = time.time() + timeout
    w = None
    while time.time() < end:
        w = ex.wanted()
        if w == want:
            return
        time.sleep(0.02)
    raise AssertionError("the capture's wish: %r after %ss, want %r" % (w, timeout, want))


def wait_for(pred, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError("timed out waiting for " + what)


def expect_errno(fn, code, what):
    try:
        fn()
    except attnx.AttnxError as e:
        assert e.errno == code, "%s: errno %d, expected %d" % (what, e.errno, code)
        return
    raise AssertionError("%s: no error raised" % what)


# ---- a tiny engine ---------------------------------------------------------------------------------------------

class Engine:
    """Writes K and Q as a real engine would: K of position p at slot index[row][p] of every layer's pool."""

    def __init__(self, ex, rng):
        self.ex, self.rng = ex, rng
        self.k = [ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_K_POOL, "f32", (SLOTS, HKV, D), layer=l))
                  for l in range(L)]
        self.q = ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_Q_RING, "f32", (QROWS, HQ, D)))
        self.ix = ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_INDEX_TOKEN, "i32", (4, CTX)))
        self.kf = [b.view.cast("f") for b in self.k]
        self.qf = self.q.view.cast("f")
        self.ixi = self.ix.view.cast("i")
        self.row = 1
        self.slots = rng.sample(range(SLOTS), CTX)
        for p, s in enumerate(self.slots):
            self.ixi[self.row * CTX + p] = s
        self.keys = {}     # (layer, pos) -> [HKV][D] as written (f32-rounded)
        self.queries = {}  # (layer, pos) -> [HQ][D]

    def f32(self, x):
        return _ffi.ctypes.c_float(x).value

    def write_k(self, pos):
        s = self.slots[pos]
        for l in range(L):
            vals = [[self.f32(self.rng.uniform(-1, 1)) for _ in range(D)] for _ in range(HKV)]
            for h in range(HKV):
                for d in range(D):
                    self.kf[l][(s * HKV + h) * D + d] = vals[h][d]
            self.keys[(l, pos)] = vals

    def forward(self, req, pos0, toks, decode_step, prefill, mask):
        for i in range(len(toks)):
            self.write_k(pos0 + i)
        layers = attnx.layer_list(mask)
        q_row = 0
        if layers:
            q_row, ptr = self.ex.q_reserve(self.q.index, len(toks) * len(layers))
            base = (ptr - self.q.ptr) // 4
            for t in range(len(toks)):
                for li, l in enumerate(layers):
                    vals = [[self.f32(self.rng.uniform(-1.5, 1.5)) for _ in range(D)] for _ in range(HQ)]
                    off = base + (t * len(layers) + li) * HQ * D
                    for h in range(HQ):
                        for d in range(D):
                            self.qf[off + h * D + d] = vals[h][d]
                    self.queries[(l, pos0 + t)] = vals
        return self.ex.step(req, pos0, toks, self.ix.index, self.row, decode_step, q_row,
                            (mask & (2 ** 64 - 1), mask >> 64), prefill)


def reference(eng, layer, head, pos, scale):
    """float64 top-k and logsumexp of head `head` at query position pos over keys 0..pos."""
    q = eng.queries[(layer, pos)][head]
    kvh = head // (HQ // HKV)
    s = [scale * sum(q[d] * eng.keys[(layer, j)][kvh][d] for d in range(D)) for j in range(pos + 1)]
    m = max(s)
    lse = m + math.log(sum(math.exp(x - m) for x in s))
    order = sorted(range(pos + 1), key=lambda j: (-s[j], j))[:TOPK]
    return order, [s[j] for j in order], lse


# ---- end to end ------------------------------------------------------------------------------------------------

def start(cmd, out=subprocess.DEVNULL):
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, start_new_session=False)




def case_end_to_end(capture, relay, tail):
    d = tempfile.mkdtemp(prefix="attnx-pyt")
    rec, pol, feed = ("ipc://%s/%s.sock" % (d, n) for n in ("rec", "pol", "feed"))
    name = shm_name("e2e")
    procs = []
    tail_out = open(os.path.join(d, "tail.jsonl"), "w")
    ex = attnx.Exporter(name, engine="pytest", model="pytest-tiny", **model_cfg())
    try:
        procs.append(start([relay, "--listen", "127.0.0.1:0", "--records", rec, "--policy", pol, "--feed", feed,
                            "--upstream", "http://127.0.0.1:9", "--log-level", "warn"]))
        # The relay's sockets first, then its subscriber: a tail that dialled while the relay was still binding
        # was seen never to connect in this test (not investigated further).
        wait_for(lambda: all(os.path.exists(a[len("ipc://"):]) for a in (rec, feed)), 10, "the relay's sockets")
        time.sleep(0.2)
        procs.append(start([tail, "--feed", feed, "--timeout", "30000"], out=tail_out))
        time.sleep(0.3)
        rng = random.Random(1234)
        eng = Engine(ex, rng)
        procs.append(start([capture, "--shm", name, "--records", rec, "--policy", "", "--mode", "heads",
                            "--layers", "all", "--top-k", str(TOPK), "--prefill", "--threads", "1",
                            "--stats-interval", "0", "--log-level", "warn"]))
        mask = (1 << L) - 1  # --layers all --prefill
        wait_wish(ex, (mask, True), 10)
        wait_for(lambda: any(r.get("t") == "hello" for r in read_records(tail_out.name)), 10,
                 "the capture's hello on the relay feed")
        rid = "ax-%016x" % rng.getrandbits(64)
        prompt = [rng.randrange(1000) for _ in range(6)]
        req = ex.request_begin(rid, prompt)
        assert req, "request_begin"
        assert eng.forward(req, 0, prompt, 0, True, mask)
        gen = []
        for i in range(4):
            tok = rng.randrange(1000)
            gen.append(tok)
            assert eng.forward(req, len(prompt) + i, [tok], i + 1, False, mask)
        assert ex.request_end(req, "stop")
        wait_for(lambda: any(r.get("t") == "end" and r.get("rid") == rid for r in read_records(tail_out.name)),
                 15, "the end record")
        recs = [r for r in read_records(tail_out.name) if r.get("t") == "attn" and r.get("rid") == rid]
        toks = prompt + gen
        positions = len(toks)
        seen = {}
        scale = 1.0 / math.sqrt(D)
        for r in recs:
            key = (r["position"], r["layer_id"], r["head_id"])
            assert key not in seen, "duplicate record %r" % (key,)
            seen[key] = r
            p, l, h = key
            order, logits, lse = reference(eng, l, h, p, scale)
            assert r["token_positions"] == order, "%r: positions %r, expected %r" % (key, r["token_positions"], order)
            for a, b in zip(r["topk_logits"], logits):
                assert abs(a - b) < 1e-3, "%r: logit %g vs %g" % (key, a, b)
            assert abs(r["logsumexp_all"] - lse) < 1e-3, "%r: lse %g vs %g" % (key, r["logsumexp_all"], lse)
            assert r["token_id"] == toks[p], "%r: token %r vs %r" % (key, r["token_id"], toks[p])
            assert r["mode"] == "heads"
            assert bool(r.get("prefill", 0)) == (p < len(prompt)), "%r: prefill flag" % (key,)
            if p >= len(prompt):
                assert r["decode_step"] == p - len(prompt) + 1, "%r: decode_step %r" % (key, r["decode_step"])
        expected = {(p, l, h) for p in range(positions) for l in range(L) for h in range(HQ)}
        missing = expected - set(seen)
        assert not missing, "missing records: %r" % sorted(missing)[:8]
        return "%d attn records checked against float64" % len(recs)
    finally:
        for p in reversed(procs):
            stop(p)
        tail_out.close()
        ex.close()


# ---- error paths -----------------------------------------------------------------------------------------------

def case_bad_names():
    expect_errno(lambda: attnx.Exporter("noslash", **model_cfg()), errno.EINVAL, "name without '/'")
    expect_errno(lambda: attnx.Exporter("/a/b", **model_cfg()), errno.EINVAL, "name with two '/'")
    expect_errno(lambda: attnx.Exporter("/" + "x" * 80, **model_cfg()), errno.ENAMETOOLONG, "long name")
    expect_errno(lambda: attnx.Exporter(shm_name("bad"), **model_cfg(n_q_heads=3)), errno.EINVAL,
                 "heads not a multiple of kv heads")
    for bad, exc in (({"q_dtype": "f64"}, ValueError), ({"n_layerz": 2}, TypeError)):
        try:
            attnx.Exporter(shm_name("bad"), **model_cfg(**bad))
        except exc:
            continue
        raise AssertionError("%r accepted" % (bad,))
    return "names, shapes, dtypes and fields refused"


def case_bad_buffers_and_requests():
    with attnx.Exporter(shm_name("buf"), **model_cfg()) as ex:
        expect_errno(lambda: ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_K_POOL, "f32", (8, 3, D), layer=0)),
                     errno.EINVAL, "K pool with the wrong KV heads")
        expect_errno(lambda: ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_K_POOL, "f32", (8, HKV, D), layer=L)),
                     errno.EINVAL, "K pool of a layer past the model")
        expect_errno(lambda: ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_K_POOL, "f32", (1 << 20, HKV, D),
                                                                  layer=0)), errno.ENOSPC, "data region full")
        k = ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_K_POOL, "f32", (8, HKV, D), layer=0))
        expect_errno(lambda: ex.q_reserve(k.index, 1), errno.EINVAL, "Q rows from a K pool")
        expect_errno(lambda: ex.request_begin("r" * 200, [1]), errno.EINVAL, "rid too long")
        expect_errno(lambda: ex.request_begin("", [1]), errno.EINVAL, "empty rid")
        expect_errno(lambda: ex.step(12345, 0, [1], 0, 0), errno.ENOENT, "step of an unknown request")
        expect_errno(lambda: ex.request_end(12345), errno.ENOENT, "end of an unknown request")
        expect_errno(lambda: attnx.Exporter(shm_name("buf"), **model_cfg()), errno.EEXIST,
                     "a name a live engine holds")
    return "buffers, requests and a taken name refused"


def case_full_ring():
    with attnx.Exporter(shm_name("ring"), **model_cfg(ring_cap=4)) as ex:
        ix = ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_INDEX_TOKEN, "i32", (2, CTX)))
        with Attached(shm_name("ring")) as c:
            req = ex.request_begin("ax-ring", [1, 2])  # descriptor 1 of 4
            results = [ex.step(req, 2 + i, [7], ix.index, 0, i + 1) for i in range(10)]
            assert results == [True] * 3 + [False] * 7, results
            assert ex.counters()["ring_dropped"] == 7
            got, lost = [], 0
            while True:
                s, n = c.next()
                lost += n
                if s is None:
                    break
                got.append((s.kind, s.pos0))
            assert got == [(1, 0), (2, 2), (2, 3), (2, 4)], got
            assert lost == 7, "consumer told of %d lost descriptors" % lost
            assert ex.step(req, 12, [7], ix.index, 0, 11), "space again once the consumer read"
    return "3 steps published, 7 dropped and counted, 7 reported lost"


def case_dead_capture(capture):
    name = shm_name("dead")
    with attnx.Exporter(name, **model_cfg(ring_cap=16)) as ex:
        ix = ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_INDEX_TOKEN, "i32", (2, CTX)))
        ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_K_POOL, "f32", (CTX, HKV, D), layer=0))
        # a Q ring: the capture attaches only to a segment that has one (before it, the engine is still
        # registering its buffers)
        ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_Q_RING, "f32", (QROWS, HQ, D)))
        p = start([capture, "--shm", name, "--records", "ipc:///nonexistent/attnx-pyt.sock", "--policy", "",
                   "--stats-interval", "0", "--log-level", "error"])
        try:
            wait_for(lambda: ex.wanted(), 10, "the capture to attach")
            p.send_signal(signal.SIGKILL)
            p.wait()
            wait_for(lambda: ex.wanted() is None, 2, "ax_export_wanted to notice the dead capture")
            req = ex.request_begin("ax-dead", [1])
            worst, t0 = 0.0, time.perf_counter()
            for i in range(5000):
                a = time.perf_counter()
                ex.step(req, 1 + (i % (CTX - 2)), [3], ix.index, 0, i + 1)
                worst = max(worst, time.perf_counter() - a)
            total = time.perf_counter() - t0
            assert ex.counters()["ring_dropped"] > 4900
            assert worst < 0.05 and total < 10, "steps took %.3f s (worst %.4f s)" % (total, worst)
        finally:
            stop(p)
    return "5000 steps after SIGKILL, worst %.2f ms, nobody wanted" % (worst * 1e3)


def case_block_tables():
    """Paged engines' buffers through the Python bindings: a host block table (ax_export_add_block_table), the
    entry helpers (block table, paged K pool, block_size), what the consumer sees of them, steps through the table
    and the errors."""
    import ctypes

    name = shm_name("paged")
    bs, mb = 4, 8
    for bad in ((0, mb, bs), (4, 0, bs), (4, mb, 0), (4, mb, 65537)):
        expect_errno(lambda: attnx.block_table_desc(*bad), errno.EINVAL, "block table entry %r" % (bad,))
    expect_errno(lambda: attnx.paged_kpool_desc(0, "i32", 16, bs, HKV, D), errno.EINVAL, "an i32 K pool")
    d = attnx.block_table_desc(4, mb, bs)
    assert (d.kind, d.dtype, d.ndim, tuple(d.dim[:3]), d.bytes) == (
        _ffi.BUF_INDEX_PAGED, _ffi.DTYPES["i32"], 2, (4, mb, bs), 4 * mb * 4), "entry %r" % (tuple(d.dim),)
    with attnx.Exporter(name, **model_cfg()) as ex:
        for bad in ((0, mb, bs), (4, mb, 0), (4, mb, 65537)):
            expect_errno(lambda: ex.add_block_table(*bad), errno.EINVAL, "block table %r" % (bad,))
        expect_errno(lambda: ex.add_block_table(1 << 20, 1 << 10, bs), errno.ENOSPC, "a table past the data region")
        bt = ex.add_block_table(4, mb, bs)
        kp = ex.add_host_buffer(attnx.paged_kpool_desc(0, "f32", 16, bs, HKV, D))
        tok = ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_INDEX_TOKEN, "i32", (2, CTX)))
        assert len(bt.cells) == 4 * mb and not any(bt.cells), "a new table is zeroed"
        assert (attnx.block_size(bt.desc), attnx.block_size(kp.desc), attnx.block_size(tok.desc)) == (bs, bs, 0)
        bt.cells[1 * mb + 0], bt.cells[1 * mb + 1] = 5, 3  # row 1: positions 0-3 in block 5, 4-7 in block 3
        with Attached(name) as c:
            b = c.buffers()[bt.index]
            assert b.kind == _ffi.BUF_INDEX_PAGED and tuple(b.dim[:3]) == (4, mb, bs), "the consumer's entry"
            row = (ctypes.c_int32 * mb).from_address(c._l.ax_shm_host_ptr(c._h, bt.index) + 4 * mb)
            assert list(row[:3]) == [5, 3, 0], "the consumer reads row 1 as %r" % list(row)
            req = ex.request_begin("ax-paged", [1] * 6)
            assert ex.step(req, 6, [7], bt.index, 1, 1), "a step through 2 blocks"
            expect_errno(lambda: ex.step(req, mb * bs, [7], bt.index, 1, 2), errno.EINVAL,
                         "a step needing %d blocks of a %d-block row" % (mb + 1, mb))
            got = []
            while True:
                s, _ = c.next()
                if s is None:
                    break
                got.append((s.kind, s.index_buf, s.index_row, s.seq_len))
            assert got == [(_ffi.STEP_BEGIN, 0, 0, 0), (_ffi.STEP_FORWARD, bt.index, 1, 7)], got
    return "host block table (zeroed, shared with the consumer), entry helpers, steps through it, %d errors" % 10


def case_modules_without_torch():
    """The graph binding's structs and the SGLang hook's JSON load without torch (their CUDA parts import it
    lazily); the struct sizes are asserted against the C header at import."""
    import json as _json

    from attnx import graph, sglang_hook

    specs = _json.loads(sglang_hook.forward_hooks_json("/attnx.x"))
    assert [s["hook_type"] for s in specs] == ["forward_pre", "forward"] and specs[0]["with_kwargs"]
    assert specs[0]["hook_factory"] == "attnx.sglang_hook:pre_hook_factory"
    assert graph.PREFILL == 1 and graph.MAX_BATCH == 1024
    return "attnx.graph and attnx.sglang_hook import; ctypes mirrors match the C sizes"


def main():
    if len(sys.argv) != 4:
        print(__doc__)
        return 2
    capture, relay, tail = sys.argv[1:]
    cases = [("bad names and configs", case_bad_names),
             ("bad buffers and requests", case_bad_buffers_and_requests),
             ("full ring", case_full_ring),
             ("modules without torch", case_modules_without_torch),
             ("block tables", case_block_tables),
             ("dead capture", lambda: case_dead_capture(capture)),
             ("end to end: capture, relay, tail", lambda: case_end_to_end(capture, relay, tail))]
    failed = 0
    print("1..%d" % len(cases))
    for i, (what, fn) in enumerate(cases, 1):
        try:
            note = fn()
            print("ok %d - %s: %s" % (i, what, note))
        except Exception as e:  # report and go on: every case runs
            failed += 1
            print("not ok %d - %s: %s: %s" % (i, what, type(e).__name__, e))
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
