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
"""
import ctypes
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

SKIP = 77


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


def start_consumer(shm, out, layers="all", prefill=True, ends=1, timeout=120, topk=0):
    """topk 0: every head's full probabilities; k > 0: each head's top-k (positions, probabilities); -1: drain
    descriptors only (no attention computed: for the benchmark)."""
    cmd = [sys.executable, os.path.join(HERE, "gpu_common.py"), "consume", shm, out, layers,
           "1" if prefill else "0", str(ends), str(timeout), str(topk)]
    return subprocess.Popen(cmd)


def wait_wanted(gx, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if gx.enabled():
            return gx.enabled()
        time.sleep(0.02)
    raise AssertionError("no consumer became visible to the exporter")


def load(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


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


def consume(shm, out, layers, prefill, ends, timeout, topk):
    import torch

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
    snap = att.snapshot
    L = snap.n_layers
    mask = (1 << L) - 1 if layers == "all" else sum(1 << int(x) for x in layers.split(","))
    att.set_wanted(mask, prefill)
    mapped = _importer(att)
    bufs = att.buffers()
    kpool = {b.layer: i for i, b in enumerate(bufs) if b.kind == _ffi.BUF_K_POOL}
    qbuf = next(i for i, b in enumerate(bufs) if b.kind == _ffi.BUF_Q_RING)
    cache = {}

    def tensor(i):
        if i not in cache:
            cache[i] = _tensor(torch, mapped(i), bufs[i])
        return cache[i]

    rids, n_end = {}, 0
    H, Hkv, scale = snap.n_q_heads, snap.n_kv_heads, snap.scale
    g = H // Hkv
    with open(out, "w") as f:
        while n_end < ends and time.time() < deadline:
            s, lost = att.next()
            if lost:
                f.write(json.dumps({"t": "lost", "count": lost}) + "\n")
            if s is None:
                time.sleep(0.0005)
                continue
            if s.kind == _ffi.STEP_BEGIN:
                r = att.request(s.req_slot, s.req_id)
                rids[s.req_id] = r.rid.decode()
                f.write(json.dumps({"t": "begin", "rid": rids[s.req_id], "prompt_len": r.prompt_len,
                                    "prompt": att.tokens(r.prompt_pos, r.prompt_len)}) + "\n")
                continue
            if s.kind == _ffi.STEP_END:
                n_end += 1
                f.write(json.dumps({"t": "end", "rid": rids.get(s.req_id), "reason": s.end_reason}) + "\n")
                continue
            toks = att.tokens(s.tok_pos, s.n_tokens)
            lay = [l for l in range(128) if (s.layers[l >> 6] >> (l & 63)) & 1]
            f.write(json.dumps({"t": "step", "rid": rids.get(s.req_id), "pos0": s.pos0, "n": s.n_tokens,
                                "seq_len": s.seq_len, "decode_step": s.decode_step, "prefill": s.flags & 1,
                                "tokens": toks, "layers": lay, "row": s.index_row}) + "\n")
            if not lay or topk < 0:
                continue
            Q = tensor(qbuf)
            ix = tensor(s.index_buf)[s.index_row]
            for t in range(s.n_tokens):
                p = s.pos0 + t
                slots = ix[:p + 1].long()
                for li, l in enumerate(lay):
                    q = Q[(s.q_row + t * len(lay) + li) % Q.shape[0]].double()  # [H, D]
                    k = tensor(kpool[l])[slots].double()                        # [p+1, Hkv, D]
                    if bufs[kpool[l]].dtype in (4, 5):
                        k = k * bufs[kpool[l]].scale
                    k = k.repeat_interleave(g, dim=1)                          # [p+1, H, D]
                    logits = torch.einsum("hd,jhd->hj", q, k) * scale
                    probs = torch.softmax(logits, dim=-1)
                    rec = {"t": "attn", "rid": rids.get(s.req_id), "position": p, "layer": l, "token": toks[t],
                           "lse": torch.logsumexp(logits, -1).cpu().tolist()}
                    if topk > 0:
                        v, i = torch.topk(probs, min(topk, p + 1), dim=-1)
                        rec["top_pos"], rec["top_prob"] = i.cpu().tolist(), v.cpu().tolist()
                    else:
                        rec["probs"] = probs.cpu().tolist()
                    f.write(json.dumps(rec) + "\n")
            f.flush()
    att.close()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "consume":
        a = sys.argv[2:]
        consume(a[0], a[1], a[2], a[3] == "1", int(a[4]), float(a[5]), int(a[6]) if len(a) > 6 else 0)
    else:
        print(__doc__)
        sys.exit(2)
