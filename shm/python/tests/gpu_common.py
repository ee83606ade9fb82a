#!/usr/bin/env python3
"""Shared pieces of the GPU tests of the attnx Python adapters (run by scripts/gpu-test; exit 77 = SKIP here).

`require_gpu()` exits 77 when torch, CUDA or a device is missing. The *reference consumer* (`python3
gpu_common.py consume SHM OUT.jsonl ...`, started as a separate process because CUDA IPC handles cannot be opened
by the process that made them) attaches to a segment through libattnx-export's own validating consumer API,
imports the CUDA buffers through libattnx-export-cuda's importer (the capture's import path), and for every
FORWARD descriptor computes, in float64 with torch, every head's full attention probabilities over keys 0..p read
through the engine's index table — one JSON line per (position, layer) with the step's token id, decode step and
prefill flag. It checks nothing itself: the tests compare its lines with transformers' eager attention. It is a
second consumer, not attnx-capture: when attnx-capture (--backend cuda), attnx-relay and attnx-tail are built
(AX_BUILD_DIR), test_gpu_hf.py also runs them.

Its output: a first line `ready` (the layer mask and prefill flag it asked for, written once it has asked), then
`begin`, `end`, `step` (one per FORWARD, with its layers and q_row), `attn` (one per row and layer), `lost`, and a
last `exit` line (END count, whether it timed out, ax_shm_get_stats). It flushes whenever the ring is empty and
every FLUSH_S while busy, so a test may wait for a line while the engine idles (`wait_for_record`, which on a
timeout reports what the consumer did write). It brings CUDA up before it tells the engine what it wants, so the
engine's first exported step never races the consumer's CUDA start-up; until then it wants nothing.

The engine side must wait for that wish, not for the consumer's arrival: ax_shm_attach makes a consumer live to
the exporter at once (pid and heartbeat), with the wish the header already holds (none, or what the previous
consumer asked for), and a step exported under "none" names no layer, so no `attn` line comes of it. That is how
test_gpu_hf lost every row after d3f5a42 put CUDA's start (seconds) between the attach and set_wanted: its
wait_wanted returned on (0, False), the whole generate() ran while the consumer started CUDA. So the consumer
clears the leftover wish right after attaching, and `wait_wanted(gx, out=...)` returns only once the consumer's
`ready` line is written and the exporter sees that mask (test_hf_hook_logic.py replays it on the CPU).
topk -1 (drain) imports neither torch nor the CUDA library: `test_reference_consumer.py` runs it on the CPU
against a host segment.
"""
import ctypes
import errno
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

SKIP = 77
FLUSH_S = 0.1  # the reference consumer flushes its output at least this often while busy (and whenever idle)


def require_gpu(devices=1):
    """torch, or exit 77 without torch, `devices` CUDA devices or the attnx CUDA libraries."""
    try:
        import torch
    except ImportError:
        print("SKIP: no torch")
        sys.exit(SKIP)
    if not torch.cuda.is_available() or torch.cuda.device_count() < devices:
        print("SKIP: no CUDA device" if devices == 1 else "SKIP: fewer than %d CUDA devices" % devices)
        sys.exit(SKIP)
    try:
        from attnx import cuda, graph

        graph.glib()
        cuda.clib()
    except OSError as e:
        print("SKIP: attnx CUDA libraries not built: %s" % e)
        sys.exit(SKIP)
    return torch


def start_consumer(shm, out, layers="all", prefill=True, ends=1, timeout=120, topk=0, cpu=False):
    """topk 0: every head's full probabilities; k > 0: each head's top-k (positions, probabilities); -1: drain
    descriptors only (no attention computed: for the benchmark). cpu: the buffers are host buffers of the segment
    (tests' --cpu runs, host_graph.py), read in place with CPU torch."""
    cmd = [sys.executable, os.path.join(HERE, "gpu_common.py"), "consume", shm, out, layers,
           "1" if prefill else "0", str(ends), str(timeout), str(topk), "cpu" if cpu else "cuda"]
    return subprocess.Popen(cmd)


def _ready(out):
    """(layers mask, prefill) of the consumer's `ready` line in `out`, or None before it is written."""
    if out is None or not os.path.exists(out):
        return None
    r = next((r for r in load(out) if r["t"] == "ready"), None)
    return (r["layers"], bool(r["prefill"])) if r else None


def wait_wanted(gx, timeout=60, out=None, cons=None):
    """Wait until gx (a GraphExporter, or anything with its enabled()) sees a consumer that wants some layer: a
    non-empty mask, since a consumer that has attached but not yet said what it wants shows as (0, False), and
    steps exported then carry no Q rows. With `out` (the reference consumer's output), also until its `ready` line
    is written and the mask and prefill flag gx sees are the ones it announced there (not a wish a previous
    consumer left in the header). cons: its Popen, to give up when it exits. Returns (mask, prefill)."""
    end, want, seen = time.time() + timeout, None, None
    while time.time() < end:
        want = want or _ready(out)
        seen = gx.enabled()
        if seen and seen[0] and (out is None or seen == want):
            return seen
        if cons is not None and cons.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError("no consumer's wish became visible to the exporter in %d s: it sees %r; the consumer's "
                         "ready line %r%s" % (timeout, seen, want, "" if cons is None else ", consumer %s" % (
                             "running" if cons.poll() is None else "exited rc=%s" % cons.returncode)))


def load(path):
    """The JSON lines of a consumer's output. A line still being written (no newline yet: the consumer's buffer
    flushes mid-line when a row's probabilities outgrow it) is left for the next read."""
    with open(path) as f:
        text = f.read()
    return [json.loads(l) for l in text.split("\n")[:-1] if l.strip()]


def tail_lines(path, n=12):
    """The last n lines of a file (for a failure message); '' when it does not exist."""
    try:
        with open(path) as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def consumer_report(lines, n_steps=6):
    """What a reference consumer wrote, for a failure message: line counts by kind, its ready and exit lines, the
    first step lines (position, tokens, layers, q_row) and the positions its attn lines cover."""
    counts = {}
    for r in lines:
        counts[r["t"]] = counts.get(r["t"], 0) + 1
    out = ["consumer lines: %s" % (", ".join("%s %d" % kv for kv in sorted(counts.items())) or "none")]
    for kind in ("ready", "exit"):
        r = next((r for r in lines if r["t"] == kind), None)
        out.append("  %s: %s" % (kind, json.dumps(r) if r else "(none)"))
    for r in [r for r in lines if r["t"] == "step"][:n_steps]:
        out.append("  step rid %s pos0 %s n %s prefill %s decode_step %s layers %s q_row %s row %s" % (
            r.get("rid"), r.get("pos0"), r.get("n"), r.get("prefill"), r.get("decode_step"), r.get("layers"),
            r.get("q_row"), r.get("row")))
    pos = sorted({r["position"] for r in lines if r["t"] == "attn"})
    if pos:
        out.append("  attn positions %d..%d (%d distinct)" % (pos[0], pos[-1], len(pos)))
    return "\n".join(out)


def wait_for_record(path, pred, timeout=60, what="a record", cons=None, explain=None):
    """Wait until the consumer's output at `path` holds a record satisfying pred. On a timeout raise an
    AssertionError that says what the consumer DID write (its last lines), whether it is still running, and
    whatever explain() returns (the exporter's counters): a future failure explains itself."""
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(path) and any(pred(r) for r in load(path)):
            return
        if cons is not None and cons.poll() is not None and not any(pred(r) for r in load(path)):
            break  # it exited: no point waiting
        time.sleep(0.05)
    msg = ["the consumer did not write %s in %d s" % (what, timeout)]
    if cons is not None:
        msg.append("consumer: %s" % ("running" if cons.poll() is None else "exited rc=%s" % cons.returncode))
    msg.append("its last lines (%s):\n%s" % (path, tail_lines(path) or "(none)"))
    if explain is not None:
        try:
            msg.append(explain())
        except Exception as e:  # the diagnostics must not hide the failure
            msg.append("(explain failed: %s)" % e)
    raise AssertionError("\n".join(msg))


# ---- the reference consumer -----------------------------------------------------------------------------------

def _importer(att):
    from attnx import _ffi
    from attnx.cuda import clib

    l = clib()
    l.ax_cuda_ops_real.restype = ctypes.c_void_p
    l.ax_shm_cuda_open.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    l.ax_shm_cuda_map.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint64)]
    l.ax_shm_cuda_last_error.restype = ctypes.c_char_p
    l.ax_shm_cuda_last_error.argtypes = [ctypes.c_void_p]
    h = ctypes.c_void_p()
    _ffi.check("ax_shm_cuda_open", l.ax_shm_cuda_open(ctypes.byref(h), att._h, 0, l.ax_cuda_ops_real()))

    def mapped(index):
        p = ctypes.c_uint64()
        rc = l.ax_shm_cuda_map(h, index, ctypes.byref(p))
        if rc < 0:
            raise _ffi.AttnxError("ax_shm_cuda_map(%d): %s" % (index, l.ax_shm_cuda_last_error(h).decode()), rc)
        return p.value

    return mapped


def _tensor(torch, ptr, buf):
    from attnx import _ffi
    from attnx.cuda import DeviceArray

    names = {v: k for k, v in _ffi.DTYPES.items()}
    dt = names[buf.dtype]
    shape = [buf.dim[i] for i in range(buf.ndim)]
    strides = [buf.stride[i] for i in range(buf.ndim)]
    if dt == "bf16":
        arr = DeviceArray(ptr, shape, strides, "f16")
        return torch.as_tensor(arr, device="cuda").view(torch.bfloat16)
    return torch.as_tensor(DeviceArray(ptr, shape, strides, dt), device="cuda")


def consume(shm, out, layers, prefill, ends, timeout, topk, cpu=False):
    """The reference consumer's loop (see the module doc). topk < 0 (drain) needs neither torch nor CUDA. Lines
    are flushed whenever the ring is empty and at least every FLUSH_S while it is not: a test that waits for a
    line (an END, a position) while the engine is idle must see it (session 3's first GPU run: END lines sat in
    the file buffer and test_gpu_sglang_shape waited for them for 60 s)."""
    from attnx import _ffi
    from attnx.consumer import Attached

    deadline = time.time() + timeout
    while True:
        try:
            att = Attached(shm)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    att.set_wanted(0, False)  # the attach made us live with the header's wish (a previous consumer's): none yet
    snap = att.snapshot
    L = snap.n_layers
    mask = (1 << L) - 1 if layers == "all" else sum(1 << int(x) for x in layers.split(","))
    rows = None
    if topk >= 0:  # CUDA up before we ask for rows: nothing is exported for us while it starts (seconds)
        rows = _Rows(att, snap, cpu)
    att.set_wanted(mask, prefill)
    rids, n_end, last_flush, dirty = {}, 0, time.time(), False
    with open(out, "w") as f:
        def emit(rec):
            f.write(json.dumps(rec) + "\n")

        emit({"t": "ready", "layers": mask, "prefill": bool(prefill)})  # what wait_wanted(out=...) waits for
        f.flush()

        closed = False
        while n_end < ends and time.time() < deadline:
            try:
                s, lost = att.next()
            except _ffi.AttnxError as e:
                if e.errno != errno.ESTALE:
                    raise
                closed = True  # the engine closed (or restarted) its segment: the run is over, not an error
                break
            if lost:
                emit({"t": "lost", "count": lost})
                dirty = True
            if s is None:
                if dirty:
                    f.flush()
                    dirty, last_flush = False, time.time()
                time.sleep(0.0005)
                continue
            dirty = True
            if time.time() - last_flush > FLUSH_S:
                f.flush()
                last_flush = time.time()
            if s.kind == _ffi.STEP_BEGIN:
                r = att.request(s.req_slot, s.req_id)
                rids[s.req_id] = r.rid.decode()
                emit({"t": "begin", "rid": rids[s.req_id], "prompt_len": r.prompt_len,
                      "prompt": att.tokens(r.prompt_pos, r.prompt_len)})
                continue
            if s.kind == _ffi.STEP_END:
                n_end += 1
                emit({"t": "end", "rid": rids.get(s.req_id), "reason": s.end_reason})
                continue
            toks = att.tokens(s.tok_pos, s.n_tokens)
            lay = [l for l in range(128) if (s.layers[l >> 6] >> (l & 63)) & 1]
            emit({"t": "step", "rid": rids.get(s.req_id), "pos0": s.pos0, "n": s.n_tokens, "seq_len": s.seq_len,
                  "decode_step": s.decode_step, "prefill": s.flags & 1, "tokens": toks, "layers": lay,
                  "q_row": s.q_row, "row": s.index_row})
            if lay and rows is not None:
                for rec in rows.compute(s, lay, toks, topk):
                    rec["rid"] = rids.get(s.req_id)
                    emit(rec)
        emit({"t": "exit", "ends": n_end, "timed_out": n_end < ends, "closed": closed,
              "stats": att.stats()})
    att.close()


class _Rows:
    """Attention of a FORWARD's rows in float64 with torch, from the engine's CUDA buffers (CUDA IPC, through
    libattnx-export-cuda's importer), or with cpu from host buffers of the segment, in place."""

    def __init__(self, att, snap, cpu=False):
        import torch

        from attnx import _ffi

        self.torch, self.att, self.cpu = torch, att, cpu
        if not cpu:
            torch.zeros(1, device="cuda")  # the CUDA context now, not at the first step
            self.mapped = _importer(att)
        self.H, self.Hkv, self.scale = snap.n_q_heads, snap.n_kv_heads, snap.scale
        self.fp8 = (_ffi.DTYPES["fp8_e4m3"], _ffi.DTYPES["fp8_e5m2"])
        self.cache = {}

    def tensor(self, i):
        if i not in self.cache:
            b = self.att.buffers()[i]
            self.cache[i] = self._host(i, b) if self.cpu else _tensor(self.torch, self.mapped(i), b)
        return self.cache[i]

    def _host(self, i, b):
        from attnx import _ffi

        names = {v: k for k, v in _ffi.DTYPES.items()}
        dt = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "i32": "int32",
              "i64": "int64"}[names[b.dtype]]  # fp8 host pools: not needed by any --cpu test (KeyError)
        ptr = self.att._l.ax_shm_host_ptr(self.att._h, i)
        if not ptr:
            raise RuntimeError("buffer %d is not a host buffer" % i)
        raw = (ctypes.c_char * b.bytes).from_address(ptr)
        flat = self.torch.frombuffer(raw, dtype=getattr(self.torch, dt))
        return flat.as_strided([b.dim[k] for k in range(b.ndim)], [b.stride[k] for k in range(b.ndim)])

    def compute(self, s, lay, toks, topk):
        from attnx import _ffi

        torch = self.torch
        bufs = self.att.buffers()
        kpool = {b.layer: i for i, b in enumerate(bufs) if b.kind == _ffi.BUF_K_POOL}
        qbuf = next(i for i, b in enumerate(bufs) if b.kind == _ffi.BUF_Q_RING)
        Q, ix = self.tensor(qbuf), self.tensor(s.index_buf)[s.index_row]
        g = self.H // self.Hkv
        for t in range(s.n_tokens):
            p = s.pos0 + t
            slots = ix[:p + 1].long()
            for li, l in enumerate(lay):
                q = Q[(s.q_row + t * len(lay) + li) % Q.shape[0]].double()  # [H, D]
                k = self.tensor(kpool[l])[slots].double()                  # [p+1, Hkv, D]
                if bufs[kpool[l]].dtype in self.fp8:
                    k = k * bufs[kpool[l]].scale
                k = k.repeat_interleave(g, dim=1)                           # [p+1, H, D]
                logits = torch.einsum("hd,jhd->hj", q, k) * self.scale
                probs = torch.softmax(logits, dim=-1)
                rec = {"t": "attn", "position": p, "layer": l, "token": toks[t],
                       "lse": torch.logsumexp(logits, -1).cpu().tolist()}
                if topk > 0:
                    v, i = torch.topk(probs, min(topk, p + 1), dim=-1)
                    rec["top_pos"], rec["top_prob"] = i.cpu().tolist(), v.cpu().tolist()
                else:
                    rec["probs"] = probs.cpu().tolist()
                yield rec


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "consume":
        a = sys.argv[2:]
        consume(a[0], a[1], a[2], a[3] == "1", int(a[4]), float(a[5]), int(a[6]) if len(a) > 6 else 0,
                len(a) > 7 and a[7] == "cpu")
    else:
        print(__doc__)
        sys.exit(2)
