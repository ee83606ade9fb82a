#!/usr/bin/env python3
"""GPU test of the SGLang hook (attnx.sglang_hook) on buffers shaped and recycled exactly as SGLang's — exit 77
without torch / CUDA. Run once (H200, 2026-11-27, 3a279e1): it stopped at "the consumer did not get there" while
waiting for B's END — the reference consumer had the END line in its file buffer (gpu_common flushed only after
attention rows); it now flushes when idle, and a wait that times out prints what the consumer wrote and the
exporter's counters. Nothing after that first wait has run on a GPU yet; scripts/gpu-test runs it.

`--cpu` (test_sglang_shape_cpu.py) runs the same scenario on the CPU: the graph kernels emulated by host_graph.py,
the tensors moved into host buffers of the segment, the graph capture recorded and replayed as closures. It passes
(189 rows, worst 0); its first run found that every SGLang decode row but the first exported row 0's Q (the hook
gave decode Q a batch stride of 0) and that waits could read a half-written line.
SGLang itself is not installed anywhere here; this drives the hook factories the way SGLang's hook_manager
registers them (forward_pre with kwargs + forward on RadixAttention-like modules).

Shapes as SGLang: K pools k_buffer[l] [slots + 1, H_kv, D] (slot 0 = the padding slot), req_to_token [rows, ctx]
int32, ForwardBatch fields req_pool_indices / seq_lens / out_cache_loc / input_ids (int64), extend_seq_lens /
extend_start_loc (int32), extend_prefix_lens_cpu / extend_seq_lens_cpu / rids (host lists), q a strided slice of a
fused qkv [tokens, (H_q + 2 H_kv) D]. K is written by the "attention" module itself (so it is in the pool when
the post hook publishes). Scenario: requests A, B (eager extend, whole prompts), C (radix prefix of 4 positions
shared with A), decode as a CUDA graph of batch 4 replayed with 3 real rows (the padded row has out_cache_loc 0
and a stale req_pool_idx of a live request), B freed (END) and its req_pool row recycled by D, decode again, E
begins on A's row without a free (END abort on the GPU), the rest freed. The reference consumer's probabilities
must equal float64 ones from the test's own copies of Q and K for every exported (request, position, layer),
each exactly once, with BEGIN/END rids and reasons in order, and nothing for padded rows.
"""
import os
import random
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_common import load, require_gpu, start_consumer, wait_for_record  # noqa: E402

CPU = "--cpu" in sys.argv[1:]
if CPU:  # the same scenario on the CPU: libattnx-export-graph emulated (host_graph.py), host buffers, CPU torch
    try:
        import torch
    except ImportError:
        print("SKIP: no torch")
        sys.exit(77)
    import types as _types

    import attnx.cuda
    import attnx.export
    import attnx.graph
    from host_graph import HostGraph, host_register, recorder

    class _BigExporter(attnx.export.Exporter):  # host buffers need a data region; the hook asks for none
        def __init__(self, *a, **kw):
            kw["data_size"] = 64 << 20
            super().__init__(*a, **kw)

    attnx.cuda.register, attnx.graph.GraphExporter, attnx.export.Exporter = host_register, HostGraph, _BigExporter
    torch.cuda.current_stream = lambda: _types.SimpleNamespace(cuda_stream=0)
    torch.cuda.is_current_stream_capturing = lambda: recorder.capturing
    torch.cuda.synchronize = lambda: None
else:
    torch = require_gpu()
from attnx import sglang_hook as sh  # noqa: E402

L, HQ, HKV, D, SLOTS, ROWS, CTX, BS = 3, 8, 2, 64, 4096, 3, 256, 4
dev = "cpu" if CPU else "cuda"
failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)
        print("FAIL: " + msg)


class Mode:
    def __init__(self, m):
        self.m = m

    def is_idle(self):
        return self.m == "idle"

    def is_decode(self):
        return self.m == "decode"

    def is_extend(self):
        return self.m == "extend"

    def is_target_verify(self):
        return False


class KVPool:  # MHATokenToKVPool's attributes the hook reads
    def __init__(self):
        self.k_buffer = [torch.zeros((SLOTS + 1, HKV, D), device=dev) for _ in range(L)]
        self.layer_num, self.dtype, self.start_layer = L, torch.float32, 0


class ReqPool:  # ReqToTokenPool
    def __init__(self):
        self.req_to_token = torch.zeros((ROWS, CTX), dtype=torch.int32, device=dev)
        self.free_slots = list(range(ROWS))

    def alloc(self, n):
        out, self.free_slots = self.free_slots[:n], self.free_slots[n:]
        return out

    def free(self, idx):
        self.free_slots.extend([idx] if isinstance(idx, int) else idx)


class Attn(torch.nn.Module):  # RadixAttention: forward(q, k, v, forward_batch); K written inside
    def __init__(self, layer, pool):
        super().__init__()
        self.layer_id, self.tp_q_head_num, self.tp_k_head_num, self.head_dim = layer, HQ, HKV, D
        self.scaling, self.logit_cap, self.sliding_window_size, self.k_scale = D ** -0.5, 0.0, -1, None
        self.pool = pool
        self.ax_hooks = None

    def __call__(self, *args, **kw):
        if self.ax_hooks is None:
            return super().__call__(*args, **kw)
        pre, post = self.ax_hooks  # torch < 2.0 has no with_kwargs pre hooks: call them as torch 2 does
        pre(self, args, kw)
        out = self.forward(*args, **kw)
        post(self, args, out)
        return out

    def forward(self, q, k, v, forward_batch, save_kv_cache=True):
        def write(kb=self.pool.k_buffer[self.layer_id], loc=forward_batch.out_cache_loc, k=k):
            kb[loc] = k.view(-1, HKV, D)

        if CPU:
            recorder.run(write)  # a "kernel" of the emulated graph
        else:
            write()
        return q


class World:
    def __init__(self, shm):
        self.pool, self.rpool = KVPool(), ReqPool()
        self.mods = [Attn(l, self.pool) for l in range(L)]
        cfg = {"shm": shm, "q_rows": 1 << (12 if CPU else 15)}
        for m in self.mods:  # what hook_manager.register_forward_hooks does for the two specs
            if CPU and torch.__version__ < "2":
                m.ax_hooks = (sh.pre_hook_factory(cfg), sh.post_hook_factory(cfg))
                continue
            m.register_forward_pre_hook(sh.pre_hook_factory(cfg), with_kwargs=True)
            m.register_forward_hook(sh.post_hook_factory(cfg))
        self.next_slot = 1
        self.reqs = {}   # rid -> dict(row, tokens, slots)
        self.q = {}      # (rid, pos, layer) -> [HQ, D] float64
        self.rng = random.Random(3)

    def slots(self, n):
        s = list(range(self.next_slot, self.next_slot + n))
        self.next_slot += n
        return s

    def forward(self, fb, rows_tokens):
        """rows_tokens: [(rid, positions)] in batch order (None for a padded row); writes Q refs."""
        T = fb.input_ids.shape[0]
        for l, m in enumerate(self.mods):
            qkv = torch.randn((T, (HQ + 2 * HKV) * D), device=dev)
            q, k = qkv[:, :HQ * D], qkv[:, HQ * D:(HQ + HKV) * D]
            t = 0
            for rid, positions in rows_tokens:
                for p in positions:
                    if rid is not None:
                        self.q[(rid, p, l)] = q[t].view(HQ, D).double().clone()
                    t += 1
            m(q, k, None, fb)

    def extend(self, batch):
        """batch: [(rid, tokens, prefix_from_rid or None, prefix_len)]; eager, as SGLang's prefill."""
        ids, rpis, lens, locs, ext, pre, rids, rt = [], [], [], [], [], [], [], []
        for rid, toks, src, plen in batch:
            row = self.rpool.alloc(1)[0]
            slots = (self.reqs[src]["slots"][:plen] if src else []) + self.slots(len(toks) - plen)
            self.reqs[rid] = {"row": row, "tokens": list(toks), "slots": slots, "P": len(toks)}
            self.rpool.req_to_token[row, :len(slots)] = torch.tensor(slots, dtype=torch.int32, device=dev)
            ids += toks[plen:]
            rpis.append(row)
            lens.append(len(toks))
            locs += slots[plen:]
            ext.append(len(toks) - plen)
            pre.append(plen)
            rids.append(rid)
            rt.append((rid, range(plen, len(toks))))
        start = [sum(ext[:i]) for i in range(len(ext))]
        fb = types.SimpleNamespace(
            forward_mode=Mode("extend"), batch_size=len(batch), rids=rids,
            input_ids=torch.tensor(ids, device=dev), req_pool_indices=torch.tensor(rpis, device=dev),
            seq_lens=torch.tensor(lens, device=dev), out_cache_loc=torch.tensor(locs, device=dev),
            extend_seq_lens=torch.tensor(ext, dtype=torch.int32, device=dev),
            extend_start_loc=torch.tensor(start, dtype=torch.int32, device=dev),
            extend_prefix_lens_cpu=pre, extend_seq_lens_cpu=ext,
            token_to_kv_pool=self.pool, req_to_token_pool=self.rpool)
        self.forward(fb, rt)

    def decode_graph(self):
        """Static decode buffers of batch BS and a captured graph over them (as SGLang's CudaGraphRunner)."""
        z = lambda: torch.zeros(BS, dtype=torch.int64, device=dev)  # noqa: E731
        self.s = types.SimpleNamespace(forward_mode=Mode("decode"), batch_size=BS, input_ids=z(),
                                       req_pool_indices=z(), seq_lens=torch.ones(BS, dtype=torch.int64, device=dev),
                                       out_cache_loc=z(), token_to_kv_pool=self.pool, req_to_token_pool=self.rpool)
        self.qkv_s = [torch.zeros((BS, (HQ + 2 * HKV) * D), device=dev) for _ in range(L)]
        if CPU:
            with recorder.capture() as g:
                for l, m in enumerate(self.mods):
                    m(self.qkv_s[l][:, :HQ * D], self.qkv_s[l][:, HQ * D:(HQ + HKV) * D], None, self.s)
        else:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for l, m in enumerate(self.mods):
                    m(self.qkv_s[l][:, :HQ * D], self.qkv_s[l][:, HQ * D:(HQ + HKV) * D], None, self.s)
        self.g = g

    def decode_step(self, rids, stale_row):
        """One replay with len(rids) real rows; padded rows keep a stale req_pool_idx (stale_row)."""
        s = self.s
        s.seq_lens.fill_(1)
        s.out_cache_loc.zero_()
        s.req_pool_indices.fill_(stale_row)
        for b, rid in enumerate(rids):
            r = self.reqs[rid]
            tok = self.rng.randrange(1000)
            pos = len(r["tokens"])
            slot = self.slots(1)[0]
            r["tokens"].append(tok)
            r["slots"].append(slot)
            self.rpool.req_to_token[r["row"], pos] = slot
            s.input_ids[b], s.req_pool_indices[b], s.seq_lens[b], s.out_cache_loc[b] = tok, r["row"], pos + 1, slot
        for l in range(L):
            self.qkv_s[l].copy_(torch.randn_like(self.qkv_s[l]))
            for b, rid in enumerate(rids):
                self.q[(rid, len(self.reqs[rid]["tokens"]) - 1, l)] = \
                    self.qkv_s[l][b, :HQ * D].view(HQ, D).double().clone()
        self.g.replay()


def explain():
    """The exporter's side, for a timeout: header counters, the device counters, what the kernels see."""
    st = sh._state
    if st is None or not getattr(st, "ready", False):
        return "exporter: not set up"
    h = st.ex.header
    hd = {k: getattr(h, k) for k in ("ring_head", "ring_dropped", "arena_head", "q_head", "consumer_tail",
                                      "consumer_pid", "steps_started", "features", "consumer_done")}
    torch.cuda.synchronize()
    return "exporter header %r\ndevice counters %r\nenabled %r, hook disabled %r" % (
        hd, st.g.stats(), st.g.enabled(), st.disabled)


def main():
    global cons
    shm = "/attnx.gputests%d" % os.getpid()
    w = World(shm)
    rng = random.Random(5)
    toks = lambda n: [rng.randrange(1000) for _ in range(n)]  # noqa: E731
    # SGLang's start-up: a warm-up extend with no request known to attnx (registers every layer's K pool), then
    # the decode graph capture.
    w.extend([("warmup", toks(4), None, 0)])
    w.rpool.free(w.reqs.pop("warmup")["row"])
    w.decode_graph()
    out = tempfile.mktemp(suffix=".jsonl")
    cons = start_consumer(shm, out, ends=5, timeout=300, cpu=CPU)
    end = time.time() + 60
    while (sh._state.g.enabled() or (0, False))[1] is not True:  # the layers and the prefill rows wanted
        if time.time() > end or cons.poll() is not None:
            raise AssertionError("the consumer never asked for rows (rc %r)\n%s" % (cons.poll(), explain()))
        time.sleep(0.02)
    a = toks(10)
    w.extend([("A", a, None, 0), ("B", toks(7), None, 0)])
    w.extend([("C", a[:4] + toks(5), "A", 4)])
    for _ in range(5):
        w.decode_step(["A", "B", "C"], stale_row=w.reqs["A"]["row"])
    torch.cuda.synchronize()
    w.rpool.free(w.reqs["B"]["row"])  # the wrapped free publishes END for B
    wait_for_record(out, lambda r: r["t"] == "end" and r["rid"] == "B", 60, "B's END", cons, explain)
    w.extend([("D", toks(6), None, 0)])
    check(w.reqs["D"]["row"] == w.reqs["B"]["row"], "D did not recycle B's row (test set-up)")
    for _ in range(5):
        w.decode_step(["A", "C", "D"], stale_row=w.reqs["C"]["row"])
    torch.cuda.synchronize()
    # The consumer reads index rows when it gets to a step: let it finish A before A's row is rewritten.
    last_a = len(w.reqs["A"]["tokens"]) - 1
    wait_for_record(out, lambda r: r["t"] == "attn" and r["rid"] == "A" and r["position"] == last_a and
                    r["layer"] == L - 1, 60, "A's last row", cons, explain)
    # E takes A's row without A being freed (a missed free): the GPU ends A (abort) before E begins.
    w.rpool.free_slots.insert(0, w.reqs["A"]["row"])
    w.extend([("E", toks(5), None, 0)])
    torch.cuda.synchronize()
    for rid in ("C", "D", "E"):
        w.rpool.free(w.reqs[rid]["row"])
    torch.cuda.synchronize()
    cons.wait(300)
    lines = load(out)
    ex = next((r for r in lines if r["t"] == "exit"), None)
    check(ex is not None and not ex["timed_out"], "the consumer ended early: %r\n%s" % (ex, explain()))
    begins = [(r["rid"], r["prompt_len"]) for r in lines if r["t"] == "begin"]
    check([b[0] for b in begins] == ["A", "B", "C", "D", "E"], "BEGINs %r" % begins)
    cb = next((r for r in lines if r["t"] == "begin" and r["rid"] == "C"), None)
    check(cb is not None and cb["prompt"][:4] == [0] * 4 and cb["prompt"][4:] == w.reqs["C"]["tokens"][4:9],
          "C's BEGIN prompt (radix prefix as zeros, then its own ids)")
    ends = [(r["rid"], r["reason"]) for r in lines if r["t"] == "end"]
    check(ends == [("B", 1), ("A", 3), ("C", 1), ("D", 1), ("E", 1)], "ENDs %r" % ends)
    expected = set()
    for rid, r in w.reqs.items():
        first = 4 if rid == "C" else 0
        expected |= {(rid, p, l) for p in range(first, len(r["tokens"])) for l in range(L)}
    seen, worst, bad = set(), 0.0, []
    for r in lines:
        if r["t"] != "attn":
            continue
        key = (r["rid"], r["position"], r["layer"])
        check(key not in seen, "duplicate %r" % (key,))
        seen.add(key)
        rid, p, l = key
        req = w.reqs[rid]
        check(r["token"] == req["tokens"][p], "%r: token %r" % (key, r["token"]))
        k = torch.stack([w.pool.k_buffer[l][s].double() for s in req["slots"][:p + 1]])  # [p+1, HKV, D]
        k = k.repeat_interleave(HQ // HKV, dim=1)
        ref = torch.softmax(torch.einsum("hd,jhd->hj", w.q[key], k) * D ** -0.5, dim=-1)
        got = torch.tensor(r["probs"], dtype=torch.float64, device=dev)
        diff = (got - ref).abs().max().item()
        if diff > 1e-5:
            bad.append((key, diff))
        worst = max(worst, diff)
    check(seen == expected, "%d rows exported, %d expected; unexpected %r missing %r" %
          (len(seen), len(expected), sorted(seen - expected)[:4], sorted(expected - seen)[:4]))
    check(worst < 1e-5, "worst |p - reference| %.3g; %d rows off, first %r" % (worst, len(bad), sorted({(k[0], k[1]) for k, _ in bad})))
    steps = [r for r in lines if r["t"] == "step" and not r["prefill"]]
    for s in steps:
        P = w.reqs[s["rid"]]["P"]
        check(s["decode_step"] == s["pos0"] - P + 1, "decode_step %r at %r of %s" % (s["decode_step"], s["pos0"],
                                                                                     s["rid"]))
    print("sglang-shaped: %d rows, %d steps, worst %.2e" % (len(seen), len(steps), worst))
    print("FAILED: %d" % len(failures) if failures else "PASS")
    return 1 if failures else 0


cons = None

if __name__ == "__main__":
    try:
        rc = main()
    finally:
        if cons is not None and cons.poll() is None:
            cons.kill()  # a failed wait leaves it running until its own timeout
    sys.exit(rc)
