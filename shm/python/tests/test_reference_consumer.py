#!/usr/bin/env python3
"""The GPU tests' reference consumer (gpu_common.py consume) on the CPU, in drain mode (standard library only).

Why: session 3's first GPU run of test_gpu_sglang_shape.py stopped for 60 s at "the consumer did not get there"
while waiting for B's END. The consumer had taken the END and written its line, but flushed its output only after
attention rows, so the line sat in its file buffer while the engine, waiting for it, published nothing more. This
test plays the engine through attnx.Exporter on host memory and checks, while the consumer keeps running, that
every line it wrote for an idle engine is on disk within a second: its `ready` line (the wish it announced), BEGIN /
FORWARD / END of a request, a request whose END comes alone, lost descriptors after the consumer was stopped (ring
full). It also checks that drain mode imports no torch (a `torch` that raises on import is first on its path), the
`exit` line, and that gpu_common.wait_for_record reports on a timeout what the consumer wrote, whether it runs, and
the explain() text, and gives up at once when the consumer has exited. Fails on the consumer as it was at 3a279e1.

Usage: test_reference_consumer.py   (ATTNX_LIB_DIR = the build's shm/ folder)
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import attnx  # noqa: E402
from attnx import _ffi  # noqa: E402
from gpu_common import load, start_consumer, wait_for_record  # noqa: E402
from proc_util import stop  # noqa: E402

L, HQ, HKV, D, CTX, RING = 2, 2, 1, 8, 64, 16
results = []


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


def lines_within(path, pred, timeout):
    """The consumer's lines once one satisfies pred (None after timeout): what a waiting test can see."""
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(path):
            got = load(path)
            if any(pred(r) for r in got):
                return got
        time.sleep(0.02)
    return None


class Engine:
    def __init__(self, name):
        self.ex = attnx.Exporter(name, engine="refcons", model="m", n_layers=L, n_q_heads=HQ, n_kv_heads=HKV,
                                 head_dim=D, q_dtype="f32", k_dtype="f32", max_ctx=CTX, ring_cap=RING,
                                 data_size=1 << 20)
        for l in range(L):
            self.ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_K_POOL, "f32", (256, HKV, D), layer=l))
        self.q = self.ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_Q_RING, "f32", (256, HQ, D)))
        self.ix = self.ex.add_host_buffer(attnx.make_buffer(_ffi.BUF_INDEX_TOKEN, "i32", (4, CTX)))

    def forward(self, req, pos0, toks, decode_step, prefill):
        row, _ = self.ex.q_reserve(self.q.index, len(toks) * L)
        return self.ex.step(req, pos0, toks, self.ix.index, 1, decode_step, row, ((1 << L) - 1, 0), prefill)


def main():
    fake = tempfile.mkdtemp()
    with open(os.path.join(fake, "torch.py"), "w") as f:
        f.write('raise ImportError("the reference consumer imported torch in drain mode")\n')
    os.environ["PYTHONPATH"] = fake + os.pathsep + os.environ.get("PYTHONPATH", "")
    name = "/attnx.refcons%d" % os.getpid()
    eng = Engine(name)
    out = tempfile.mktemp(suffix=".jsonl")
    cons = start_consumer(name, out, layers="all", prefill=True, ends=3, timeout=60, topk=-1)
    try:
        end = time.time() + 30
        while eng.ex.wanted() != ((1 << L) - 1, True):
            expect(cons.poll() is None, "the consumer exited (rc %r) before attaching" % cons.poll())
            expect(time.time() < end, "the consumer never asked for rows")
            time.sleep(0.02)

        # 1. BEGIN, a prefill FORWARD and END, then the engine idles: all three lines must reach the file.
        r1 = eng.ex.request_begin("r1", [5, 6, 7])
        expect(eng.forward(r1, 0, [5, 6, 7], 0, True), "forward dropped")
        expect(eng.ex.request_end(r1, "stop"), "END dropped")
        got = lines_within(out, lambda r: r["t"] == "end", 2.0)
        expect(got is not None, "r1's END line did not reach the file while the engine idled (consumer %s)" %
               ("running" if cons.poll() is None else "exited"))
        expect([r["t"] for r in got] == ["ready", "begin", "step", "end"], "lines %r" % got)
        expect(got[0] == {"t": "ready", "layers": (1 << L) - 1, "prefill": True}, "ready %r" % got[0])
        got = got[1:]
        expect(got[0]["rid"] == "r1" and got[0]["prompt"] == [5, 6, 7], "BEGIN %r" % got[0])
        expect((got[1]["tokens"], got[1]["layers"], got[1]["prefill"], got[1]["q_row"]) == ([5, 6, 7], [0, 1], 1, 0),
               "step %r" % got[1])
        expect(got[2] == {"t": "end", "rid": "r1", "reason": 1}, "END %r" % got[2])
        results.append("BEGIN, FORWARD, END of an idle engine on disk within 2 s")

        # 2. decode steps, then a pause, then an END alone (what test_gpu_sglang_shape waits for)
        r2 = eng.ex.request_begin("r2", [1, 2])
        for i in range(3):
            expect(eng.forward(r2, 2 + i, [9 + i], i + 1, False), "decode step dropped")
        expect(lines_within(out, lambda r: r["t"] == "step" and r["rid"] == "r2" and r["pos0"] == 4, 2.0),
               "r2's last step line not on disk")
        expect(eng.ex.request_end(r2, "length"), "END dropped")
        got = lines_within(out, lambda r: r["t"] == "end" and r["rid"] == "r2", 2.0)
        expect(got is not None and got[-1]["reason"] == 2, "r2's lone END line not on disk: %r" % got)
        results.append("an END alone after a pause on disk within 2 s")

        # 3. the consumer stopped, the ring overflows: a lost line once it runs again, flushed though idle
        cons.send_signal(signal.SIGSTOP)
        r3 = eng.ex.request_begin("r3", [3])
        sent = sum(1 for i in range(2 * RING) if eng.forward(r3, 1 + i, [i], i + 1, False))
        expect(sent == RING - 1, "%d of %d published into a ring of %d" % (sent, 2 * RING, RING))
        cons.send_signal(signal.SIGCONT)
        got = lines_within(out, lambda r: r["t"] == "lost", 2.0)
        expect(got is not None and sum(r["count"] for r in got if r["t"] == "lost") == 2 * RING - sent,
               "lost line: %r" % (got and [r for r in got if r["t"] == "lost"]))
        results.append("%d descriptors lost while stopped, reported and on disk" % (2 * RING - sent))

        # 4. the timeout report: what the consumer wrote, that it runs, explain()'s text
        try:
            wait_for_record(out, lambda r: r["t"] == "never", 0.3, "a line that never comes", cons,
                            lambda: "EXPLAINED")
            raise AssertionError("wait_for_record did not time out")
        except AssertionError as e:
            msg = str(e)
            expect("a line that never comes" in msg and "consumer: running" in msg and "EXPLAINED" in msg and
                   '"rid": "r3"' in msg, "timeout report: %s" % msg)
        results.append("a timed-out wait reports the consumer's last lines and the exporter's side")

        # 5. the third END ends the consumer with its exit line; a wait on an exited consumer gives up at once
        expect(eng.ex.request_end(r3, "stop"), "END dropped")
        cons.wait(10)
        got = load(out)
        expect(cons.returncode == 0, "consumer rc %r" % cons.returncode)
        expect(got[-1]["t"] == "exit" and got[-1]["ends"] == 3 and not got[-1]["timed_out"], "exit %r" % got[-1])
        expect(got[-1]["stats"]["taken"] == 1 + 1 + 1 + 1 + 3 + 1 + 1 + sent + 1, "stats %r" % got[-1]["stats"])
        t0 = time.time()
        try:
            wait_for_record(out, lambda r: r["t"] == "never", 30, "nothing", cons)
        except AssertionError as e:
            expect("exited rc=0" in str(e) and time.time() - t0 < 5, "exited consumer: %s" % e)
        results.append("exit line with the consumer's stats; no wait on an exited consumer")

        # 6. the engine closes its segment under a running drain consumer (the benchmarks' end): a clean exit
        # (rc 0, an exit line with closed, no traceback), not an AttnxError (-ESTALE) on stderr
        name2 = name + "b"
        eng2 = Engine(name2)
        out2 = tempfile.mktemp(suffix=".jsonl")
        err2 = out2 + ".err"
        try:
            with open(err2, "w") as ef:
                cons2 = subprocess.Popen([sys.executable, os.path.join(HERE, "gpu_common.py"), "consume", name2, out2,
                                          "all", "0", str(1 << 40), "60", "-1", "cuda"], stderr=ef)
            end = time.time() + 30
            while eng2.ex.wanted() is None:
                expect(cons2.poll() is None and time.time() < end, "the second consumer never attached")
                time.sleep(0.02)
            r = eng2.ex.request_begin("c1", [1])
            expect(eng2.forward(r, 0, [1], 0, True), "forward dropped")
            expect(lines_within(out2, lambda x: x["t"] == "step", 2.0), "the second consumer's step line")
            eng2.ex.close()
            eng2 = None
            rc = cons2.wait(10)
            with open(err2) as ef:
                err = ef.read()
            got = load(out2)
            expect(rc == 0 and "Traceback" not in err, "rc %r, stderr %r" % (rc, err[-400:]))
            expect(got[-1]["t"] == "exit" and got[-1]["closed"], "exit line %r" % got[-1])
        finally:
            if eng2 is not None:
                eng2.ex.close()
            stop(cons2)
            for p in (out2, err2):
                if os.path.exists(p):
                    os.unlink(p)
        results.append("the engine closing under a drain consumer ends it cleanly (exit line, no traceback)")
    finally:
        stop(cons)
        eng.ex.close()
        os.unlink(os.path.join(fake, "torch.py"))
        os.rmdir(fake)
        if os.path.exists(out):
            os.unlink(out)
    for r in results:
        print("ok - " + r)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AssertionError as e:
        print("not ok - %s" % e)
        sys.exit(1)
