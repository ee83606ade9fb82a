#!/usr/bin/env python3
"""The Hugging Face hook's host logic (attnx.hf) on the CPU: which kernels it enqueues, in which order, with which
arguments — no GPU, no transformers. Needs torch (CPU is enough; exit 77 without it): hf.py computes its index
table and reads query/key strides with real tensors.

A stand-in for the three pieces of transformers the hook touches (AttentionInterface, ALL_ATTENTION_FUNCTIONS, the
model's forward pre-hooks and set_attn_implementation) drives it the way a Llama/Qwen3 forward does: the forward
pre-hook, then per layer the static-cache update (this step's keys written into `key`) and the attention function
with position_ids. attnx.cuda.register and attnx.graph.GraphExporter are replaced by recorders (the real host
Exporter is used, so the segment configuration is validated by the C library). What is checked:
  * warm-up registers one K pool per layer as [B·H_kv·max_len, H_kv, D] with strides (D, max_len·D, 1);
  * prefill: ENDs for active rows, one step start, BEGIN per row, then, fused (default), layer 0's begin_q, a Q
    copy per middle layer and the last layer's Q copy + publish BEFORE its attention runs (its keys are in the
    cache already): `layers` kernels per step; the step arguments (rows, seq_end from position_ids, tokens);
  * decode: no step start, no BEGIN, `layers` kernels; fuse=False: step_begin, a copy per layer, publish after the
    last attention (layers + 2, and the pre-hook's start only for a prefill);
  * every attention output is the inner attention's own; set_enabled(False) leaves the model running its inner
    attention with no attnx call at all, set_enabled(True) restores the hook; an error in the export path disables
    export and never reaches the model.
Then test_gpu_hf.py's hf_case end to end on the CPU: the same stand-in model, HFExporter over host buffers of the
segment with libattnx-export-graph emulated (host_graph.py), the real reference consumer (gpu_common.py consume ...
cpu, a second process) started after the warm-up, gpu_common.wait_wanted, a prefill and decode steps, end_all; every
(request, position, layer) row must come exactly once with the token id, decode step and probabilities of the
stand-in's own Q and cached K (float64 softmax, 1e-6). Twice on one exporter: all layers with prefill, then layer 1
without prefill (the second consumer finds the first one's wish in the header). This is how test_gpu_hf lost every
row on the GPU after d3f5a42 (the consumer started CUDA between its attach and set_wanted; wait_wanted returned on
the attach): on that gpu_common.py the first run gets 0 rows.
"""
import os
import sys
import tempfile
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
try:
    import torch
except ImportError:
    print("SKIP: no torch")
    sys.exit(77)

import attnx.cuda  # noqa: E402
from attnx import _ffi  # noqa: E402

L, HQ, HKV, D, B, LMAX = 4, 4, 2, 8, 2, 32
calls = []

# ---- transformers stand-in ---------------------------------------------------------------------------------------

ALL = {}


def sdpa(module, query, key, value, attention_mask, **kw):
    calls.append(("inner", module.layer_idx))
    return ("out", module.layer_idx, query.shape)


ALL["sdpa"] = sdpa
tf = types.ModuleType("transformers")
tf.AttentionInterface = types.SimpleNamespace(register=lambda name, fn: ALL.__setitem__(name, fn))
tf_mu = types.ModuleType("transformers.modeling_utils")
tf_mu.ALL_ATTENTION_FUNCTIONS = ALL
sys.modules["transformers"], sys.modules["transformers.modeling_utils"] = tf, tf_mu


class Handle:
    def __init__(self, hooks, fn):
        self.hooks, self.fn = hooks, fn

    def remove(self):
        self.hooks.remove(self.fn)


class Model:
    """Llama/Qwen3's forward as the hook sees it: pre-hooks, then per layer cache update and attention."""

    def __init__(self):
        self.config = types.SimpleNamespace(num_hidden_layers=L, num_attention_heads=HQ, num_key_value_heads=HKV,
                                            head_dim=D, hidden_size=HQ * D, _name_or_path="fake")
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.impl, self.hooks, self.post_hooks = "sdpa", [], []
        self.layers = [types.SimpleNamespace(layer_idx=l) for l in range(L)]
        self.k = [torch.zeros(B, HKV, LMAX, D) for _ in range(L)]
        self.v = [torch.zeros(B, HKV, LMAX, D) for _ in range(L)]
        self.record = None  # a list: (cache_position, layer, query) of every attention call is appended to it

    def register_forward_pre_hook(self, fn, with_kwargs=False):
        assert with_kwargs
        self.hooks.append(fn)
        return Handle(self.hooks, fn)

    def register_forward_hook(self, fn, always_call=False):
        self.post_hooks.append(fn)
        return Handle(self.post_hooks, fn)

    def set_attn_implementation(self, name):
        self.impl = name

    def __call__(self, input_ids=None, past_key_values=None, use_cache=True, cache_position=None, position_ids=None):
        kw = dict(input_ids=input_ids, past_key_values=past_key_values, cache_position=cache_position,
                  position_ids=position_ids)
        for h in list(self.hooks):
            h(self, (), kw)
        S = input_ids.shape[1]
        pos = position_ids if position_ids is not None else cache_position[None].expand(B, -1)
        outs = []
        for l, m in enumerate(self.layers):
            q = torch.randn(B, S, HQ, D).transpose(1, 2)  # [B, H, S, D] as Llama's view + transpose
            calls.append(("kv", l))                       # the cache update, before the attention function
            self.k[l][:, :, cache_position] = torch.randn(B, HKV, S, D)
            if self.record is not None:
                self.record.append((cache_position.clone(), l, q.clone()))
            outs.append(ALL[self.impl](m, q, self.k[l], self.v[l], None, position_ids=pos))
        for h in list(self.post_hooks):
            h(self, (), outs)
        return outs


# ---- recorders -------------------------------------------------------------------------------------------------

registered = []


def fake_register(ex, t, kind, **kw):
    registered.append((kind, tuple(t.shape), kw))
    return len(registered) - 1


def iv(v):
    return (v.p, v.bytes, v.stride, v.add) if v.p else None


where = []  # (kernel, stream name) of every FakeGraph call: "main" = the engine's current stream (stream None)


def on(kind, stream):
    where.append((kind, getattr(stream, "name", "main")))


class FakeGraph:
    def __init__(self, exporter, q_ring, qbuf, index_buf, map_rows, max_batch):
        self.max_batch = max_batch
        calls.append(("open", map_rows, max_batch))

    def step_start(self, stream=None):
        on("start", stream)
        calls.append(("start",))

    def request_begin(self, rid, tokens, prompt_len=None, skip=0, row=0, row_tensor=None, stream=None):
        on("begin", stream)
        calls.append(("begin", row, rid, tokens.tolist(), prompt_len))

    def request_end(self, row, reason="stop", stream=None):
        on("end", stream)
        calls.append(("end", row, reason))

    def _args(self, a):
        return (a.n_rows, a.flags, a.n_tok_const, iv(a.seq_end), a.tokens, a.token_bytes, a.tok_stride_b,
                a.tok_stride_t)

    def step_begin(self, a, stream=None):
        on("step_begin", stream)
        calls.append(("step_begin",) + self._args(a))

    def step_begin_q(self, a, layer, q, st_b, st_t, st_h, stream=None):
        on("begin_q", stream)
        calls.append(("begin_q", layer) + self._args(a) + ((st_b, st_t, st_h),))

    def export_q(self, layer, q, st_b, st_t, st_h, stream=None):
        on("q", stream)
        calls.append(("q", layer, (st_b, st_t, st_h)))

    def export_q_publish(self, layer, q, st_b, st_t, st_h, stream=None):
        on("q_publish", stream)
        calls.append(("q_publish", layer, (st_b, st_t, st_h)))

    def step_all(self, a, layers, qs, st_b, st_t, st_h, stream=None):
        on("all", stream)
        calls.append(("all",) + self._args(a) + (list(layers), [q.data_ptr() for q in qs], (st_b, st_t, st_h)))

    def publish(self, stream=None):
        on("publish", stream)
        calls.append(("publish",))

    def set_layers(self, layers=None):
        calls.append(("set_layers", layers))

    def close(self):
        calls.append(("close",))


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


def kernels(cs):
    return [c[0] for c in cs if c[0] in ("start", "step_begin", "begin_q", "q", "q_publish", "publish", "end", "all")]


def forward(model, ids, pos0):
    del calls[:]
    S = ids.shape[1]
    cp = torch.arange(pos0, pos0 + S)
    pos = cp[None].expand(B, -1)
    with torch.no_grad():
        outs = model(input_ids=ids, past_key_values="cache", cache_position=cp, position_ids=pos)
    return outs, pos


def main():
    torch.cuda.synchronize = lambda: None  # close() synchronises; nothing to wait for here
    import attnx.graph

    attnx.cuda.register = fake_register
    attnx.graph.GraphExporter = FakeGraph
    import attnx.hf as hf

    hf.register, hf.GraphExporter = fake_register, FakeGraph
    model = Model()
    expect(hf.defer_default({}) is True and hf.side_default({}) == "capture" and
           hf.defer_default({"ATTNX_HF_DEFER": "0"}) is False and hf.side_default({"ATTNX_HF_SIDE": "0"}) is False and
           hf.side_default({"ATTNX_HF_SIDE": "1"}) is True, "defaults: defer, side stream while capturing")
    # the per-layer layout first (defer=False); defer_case below takes the default one
    ax = hf.HFExporter(model, "cache", batch_size=B, max_cache_len=LMAX, name="/attnx.hft%d" % os.getpid(),
                       defer=False)
    expect(ax.side == "capture", "side %r" % ax.side)
    out = []
    try:
        expect(model.impl == "attnx" and "attnx" in ALL, "the attnx attention is installed (%s)" % model.impl)
        ax.warmup()
        ks = [r for r in registered if r[0] == _ffi.BUF_K_POOL]
        expect([(r[1], r[2]["layer"], r[2]["shape"], r[2]["strides"]) for r in ks] ==
               [((B, HKV, LMAX, D), l, ((B - 1) * HKV * LMAX + LMAX, HKV, D), (D, LMAX * D, 1)) for l in range(L)],
               "K pools %r" % ks)
        out.append("warm-up: %d K pools as [slots, H_kv, D] over the static cache" % L)

        # prefill, fused
        ax.rids = ["r0", "r1"]
        ids = torch.arange(10, 10 + B * 5).view(B, 5)
        outs, pos = forward(model, ids, 0)
        k = kernels(calls)
        expect(k == ["start", "begin_q"] + ["q"] * (L - 2) + ["q_publish"], "prefill kernels %r" % k)
        b = [c for c in calls if c[0] == "begin"]
        expect(b == [("begin", 0, "r0", [10, 11, 12, 13, 14], 5), ("begin", 1, "r1", [15, 16, 17, 18, 19], 5)],
               "BEGINs %r" % b)
        bq = next(c for c in calls if c[0] == "begin_q")
        expect(bq[1:] == (0, B, 1, 5, (pos.data_ptr() + 4 * pos.stride(1) * 8, 8, pos.stride(0), 1),
                          ids.data_ptr(), 8, 5, 1, (HQ * 5 * D, HQ * D, D)),
               "prefill begin_q %r" % (bq,))
        order = [c for c in calls if c[0] in ("kv", "inner", "q_publish")]
        expect(order[-3:] == [("kv", L - 1), ("q_publish", L - 1, (HQ * 5 * D, HQ * D, D)), ("inner", L - 1)],
               "the last layer publishes after its cache update, before its attention: %r" % order[-3:])
        expect(outs == [("out", l, (B, HQ, 5, D)) for l in range(L)], "outputs are the inner attention's")
        out.append("prefill: start, BEGINs, %d kernels (begin + Q, Q, Q + publish)" % (L))

        # decode, fused: no step start, no BEGIN
        outs, pos = forward(model, torch.tensor([[7], [8]]), 5)
        k = kernels(calls)
        expect(k == ["begin_q"] + ["q"] * (L - 2) + ["q_publish"], "decode kernels %r" % k)
        bq = next(c for c in calls if c[0] == "begin_q")
        expect(bq[2:4] == (B, 0) and bq[4] == 1, "decode step args %r" % (bq,))
        out.append("decode: %d kernels per step, no step start" % L)

        # unfused (the first GPU run's layout)
        ax.fuse = False
        forward(model, torch.tensor([[7], [8]]), 6)
        k = kernels(calls)
        expect(k == ["step_begin"] + ["q"] * L + ["publish"], "unfused decode kernels %r" % k)
        expect(calls[-1] == ("publish",) and calls[-2] == ("inner", L - 1), "unfused: publish after the attention")
        ax.fuse = True
        out.append("fuse=False: %d kernels, publish after the last attention" % (L + 2))

        # export only some layers: no Q-copy kernel for the others (the device skips layer 0's and the last's copy)
        ax.set_export_layers([1, L - 1])
        expect(calls[-1] == ("set_layers", [1, L - 1]), "set_layers %r" % calls[-1:])
        forward(model, torch.tensor([[7], [8]]), 7)
        k = [(c[0], c[1]) for c in calls if c[0] in ("begin_q", "q", "q_publish")]
        expect(k == [("begin_q", 0), ("q", 1), ("q_publish", L - 1)], "layers [1, %d]: %r" % (L - 1, k))
        ax.set_export_layers(None)
        forward(model, torch.tensor([[7], [8]]), 8)
        expect(len(kernels(calls)) == L, "every layer again: %r" % kernels(calls))
        out.append("set_export_layers([1, %d]): 3 kernels per step; None: %d again" % (L - 1, L))

        # a second prefill ends the active rows first (rule 9), then one step start
        ax.rids = ["r2", "r3"]
        forward(model, torch.arange(B * 3).view(B, 3), 0)
        k = [c for c in calls if c[0] in ("end", "start", "begin")]
        expect(k == [("end", 0, "stop"), ("end", 1, "stop"), ("start",), ("begin", 0, "r2", [0, 1, 2], 3),
                     ("begin", 1, "r3", [3, 4, 5], 3)], "second prefill %r" % k)
        out.append("a new prefill: END the active rows, a step start, then BEGIN")

        # hook removed: the model's own attention, nothing from attnx; restored
        ax.set_enabled(False)
        outs, _ = forward(model, torch.tensor([[1], [2]]), 3)
        expect(model.impl == "sdpa" and not kernels(calls) and outs == [("out", l, (B, HQ, 1, D)) for l in range(L)],
               "set_enabled(False): %s %r" % (model.impl, kernels(calls)))
        ax.set_enabled(True)
        forward(model, torch.tensor([[1], [2]]), 4)
        expect(model.impl == "attnx" and len(kernels(calls)) == L, "set_enabled(True): %r" % kernels(calls))
        out.append("set_enabled(False) leaves no attnx call; set_enabled(True) restores the hook")

        out.append(side_case(hf, ax, model))
        out.append(defer_case(hf, ax, model))

        # an exception in the export path disables export; the model's outputs are unaffected
        def boom(*a, **k):
            raise RuntimeError("kernel launch failed")

        ax.g.export_q = boom
        outs, _ = forward(model, torch.tensor([[1], [2]]), 5)
        expect(ax.disabled and outs == [("out", l, (B, HQ, 1, D)) for l in range(L)], "error path")
        forward(model, torch.tensor([[1], [2]]), 6)
        expect(not kernels(calls), "calls after disabling: %r" % kernels(calls))
        out.append("an export error disables export quietly")
        out.append(cpu_model_case(hf))  # last: its exporter takes over the global "attnx" attention
    finally:
        ax.ex.close()
    out += consumer_runs(hf)
    for o in out:
        print("ok - " + o)
    return 0


class FakeStream:
    def __init__(self, name):
        self.name = name

    def wait_event(self, ev):
        calls.append(("wait", self.name, ev.name))


class FakeEvent:
    n = 0

    def __init__(self):
        FakeEvent.n += 1
        self.name = "e%d" % FakeEvent.n

    def record(self, stream):
        calls.append(("record", self.name, stream.name))


def forked(cs, kinds):
    """Each export kernel in cs must come right after its fork: (record eN main), (wait side eN), kernel; or right
    after another kernel of the same fork (fuse=False's layer 0: begin, then its Q copy)."""
    for i, c in enumerate(cs):
        if c[0] in kinds and cs[i - 1][0] not in kinds:
            rec, wait = cs[i - 2], cs[i - 1]
            if not (rec[0] == "record" and rec[2] == "main" and wait == ("wait", "side", rec[1])):
                return "%r not forked: %r %r" % (c, rec, wait)
    return None


def side_case(hf, ax, model):
    """attnx.streams through the hook: export kernels on the side stream, each forked from the engine's stream at
    its layer; BEGIN, END and the step start on the engine's stream, before the fork; one join after the last
    layer's attention (the forward hook); fuse=False's publish forked after the last attention; side="capture"
    forks only while a graph is captured."""
    from attnx.streams import SideStreams

    ks = ("begin_q", "q", "q_publish", "step_begin", "publish")
    main = FakeStream("main")
    ax._streams = SideStreams(L + 1, lambda: FakeStream("side"), FakeEvent, lambda: main)
    ax._cuda = True  # the stand-in plays a CUDA model here, its streams the fakes above
    ax.set_side(True)
    del where[:]
    forward(model, torch.tensor([[7], [8]]), 5)
    expect(set(where) == {("begin_q", "side"), ("q", "side"), ("q_publish", "side")}, "decode on %r" % where)
    expect(forked(calls, ks) is None, forked(calls, ks))
    expect(len([c for c in calls if c[0] == "record"]) == L + 1, "L forks and one join: %r" % calls)
    last_inner = max(i for i, c in enumerate(calls) if c[0] == "inner")
    expect(calls[last_inner + 1:] == [("record", "e%d" % (L + 2), "side"), ("wait", "main", "e%d" % (L + 2))],
           "the join after the last attention: %r" % calls[last_inner:])
    expect(ax._streams.held == [] and not ax._streams.forked, "joined, nothing held")

    ax.rids = ["s0", "s1"]
    del where[:]
    forward(model, torch.arange(B * 3).view(B, 3), 0)
    expect([w for w in where if w[0] in ("end", "start", "begin")] ==
           [("end", "main")] * B + [("start", "main")] + [("begin", "main")] * B, "prefill's engine-stream calls %r"
           % where)
    first_fork = next(i for i, c in enumerate(calls) if c[0] == "record")
    expect(all(c[0] not in ("end", "start", "begin") for c in calls[first_fork:]), "BEGINs before the fork")
    expect(forked(calls, ks) is None, forked(calls, ks))

    ax.fuse = False
    del where[:]
    forward(model, torch.tensor([[7], [8]]), 3)
    ax.fuse = True
    expect(set(where) == {("step_begin", "side"), ("q", "side"), ("publish", "side")}, "unfused on %r" % where)
    i = calls.index(("publish",))
    expect(calls[i - 3] == ("inner", L - 1) and forked(calls, ks) is None, "unfused publish forked after the "
           "attention: %r" % calls[i - 3:])

    ax.set_side("capture")
    del where[:]
    forward(model, torch.tensor([[7], [8]]), 4)
    expect(set(w[1] for w in where) == {"main"} and not any(c[0] == "record" for c in calls),
           "capture mode, not capturing: in line %r" % where)
    saved = (hf.torch.cuda.is_available, hf.torch.cuda.is_current_stream_capturing)
    hf.torch.cuda.is_available, hf.torch.cuda.is_current_stream_capturing = (lambda: True), (lambda: True)
    try:
        del where[:]
        forward(model, torch.tensor([[7], [8]]), 5)
    finally:
        hf.torch.cuda.is_available, hf.torch.cuda.is_current_stream_capturing = saved
    expect(set(w[1] for w in where) == {"side"} and forked(calls, ks) is None, "capture mode, capturing: %r" % where)
    ax.set_side(False)
    ax._cuda = False
    del where[:]
    forward(model, torch.tensor([[7], [8]]), 6)
    expect(set(w[1] for w in where) == {"main"}, "side off again: %r" % where)
    return "side stream: every export kernel forked per layer, BEGIN/END/start in line, one join; 'capture' mode"


def cpu_model_case(hf):
    """A model on the CPU of a machine with CUDA (the GPU machine's run of this very test, 59d905b): the default
    side="capture" and set_side(True) make no stream (torch.cuda.Stream(device=cpu) raises) and run in line."""
    saved = hf.torch.cuda.is_available, hf.torch.cuda.is_current_stream_capturing
    hf.torch.cuda.is_available, hf.torch.cuda.is_current_stream_capturing = (lambda: True), (lambda: True)
    m = Model()
    cx = None
    try:
        cx = hf.HFExporter(m, "cache", batch_size=B, max_cache_len=LMAX, name="/attnx.hfcpu%d" % os.getpid())
        cx.set_side(True)
        del where[:]
        forward(m, torch.tensor([[7], [8]]), 1)
        expect(cx.side is True and cx._streams.side is None and {w[1] for w in where} == {"main"} and
               not any(c[0] == "record" for c in calls), "a CPU model in line: %r" % where)
    finally:
        hf.torch.cuda.is_available, hf.torch.cuda.is_current_stream_capturing = saved
        if cx is not None:
            cx.ex.close()
    return "a CPU model on a machine with CUDA: no side stream made, in line (side='capture' default, side=True)"


def defer_case(hf, ax, model):
    """defer=True: a decode step is one call at the last layer, after its cache update and before its attention,
    with every exported layer's Q (the tensors the attention functions got, held until then); a prefill keeps the
    per-layer kernels; exportable layers narrow the list; a step whose Q tensors would hold more than
    DEFER_MAX_BYTES stays per layer; on the side stream one fork (the last layer's) and the join."""
    from attnx.streams import SideStreams

    ax.defer = True
    seen = []
    model.record = seen
    forward(model, torch.tensor([[7], [8]]), 5)
    model.record = None
    k = kernels(calls)
    expect(k == ["all"], "decode in defer mode: %r" % k)
    a = next(c for c in calls if c[0] == "all")
    expect(a[9] == list(range(L)) and a[1:3] == (B, 0) and a[11] == (HQ * D, HQ * D, D), "step_all args %r" % (a,))
    order = [c[0] for c in calls if c[0] in ("kv", "inner", "all")]
    expect(order[-3:] == ["kv", "all", "inner"], "one call after the last cache update, before its attention: %r"
           % order)
    ax.rids = ["d0", "d1"]
    forward(model, torch.arange(B * 3).view(B, 3), 0)
    k = kernels(calls)
    expect(k == ["end"] * B + ["start", "begin_q"] + ["q"] * (L - 2) + ["q_publish"], "prefill in defer mode %r" % k)
    ax.set_export_layers([1, L - 1])
    forward(model, torch.tensor([[7], [8]]), 3)
    a = next(c for c in calls if c[0] == "all")
    expect(a[9] == [1, L - 1], "exported layers only: %r" % (a[9],))
    ax.set_export_layers(None)
    saved, hf.DEFER_MAX_BYTES = hf.DEFER_MAX_BYTES, B * HQ * D * 4 * L - 1  # one byte short of holding every layer
    try:
        forward(model, torch.tensor([[7], [8]]), 4)
    finally:
        hf.DEFER_MAX_BYTES = saved
    expect(kernels(calls) == ["begin_q"] + ["q"] * (L - 2) + ["q_publish"], "past DEFER_MAX_BYTES: per layer %r" %
           kernels(calls))
    main = FakeStream("main")
    ax._streams = SideStreams(L + 1, lambda: FakeStream("side"), FakeEvent, lambda: main)
    ax._cuda = True  # the stand-in plays a CUDA model here, its streams the fakes above
    ax.set_side(True)
    del where[:]
    forward(model, torch.tensor([[7], [8]]), 4)
    expect(where == [("all", "side")] and len([c for c in calls if c[0] == "record"]) == 2 and
           forked(calls, ("all",)) is None, "defer on the side stream: %r %r" % (where, calls))
    ax.set_side(False)
    ax._cuda = False
    ax.defer = False
    forward(model, torch.tensor([[7], [8]]), 5)
    expect(kernels(calls) == ["begin_q"] + ["q"] * (L - 2) + ["q_publish"], "defer off again %r" % kernels(calls))
    return "defer: a decode step is one call at the last layer with every exported layer's Q; prefill per layer"


# ---- test_gpu_hf's hf_case on the CPU: host buffers, emulated kernels, the real reference consumer ------------

P, N = 5, 4  # prompt length; decode steps after the prefill (positions 0 .. P + N - 1 are fed)


def reference(model, record, b, p, l):
    """[HQ, p + 1] probabilities of row b's query at position p in layer l: its Q as the model made it, the keys
    0..p in the cache now, float64, GQA heads mapped as the consumer maps them (repeat_interleave)."""
    for cp, layer, q in record:
        hit = (cp == p).nonzero()
        if layer == l and len(hit):
            qv = q[b, :, int(hit[0]), :].double()                                        # [HQ, D]
            k = model.k[l][b, :, :p + 1, :].double().repeat_interleave(HQ // HKV, dim=0)   # [HQ, p + 1, D]
            return torch.softmax(torch.einsum("hd,hjd->hj", qv, k) * D ** -0.5, dim=-1)
    raise AssertionError("no query recorded for position %d layer %d" % (p, l))


def generate(model, ax, rids, seqs):
    """What generate() does to the hook: a prefill forward of the prompts, then N one-token forwards; end_all."""
    ax.rids = list(rids)
    forward(model, torch.tensor([s[:P] for s in seqs]), 0)
    for i in range(N):
        forward(model, torch.tensor([[s[P + i]] for s in seqs]), P + i)
    ax.end_all()


def check_run(lines, model, record, rids, seqs, layers, prefill, what):
    """Every (rid, position, layer) row exactly once, right token and probabilities; decode steps numbered."""
    import gpu_common

    def fail(msg):
        raise AssertionError("%s: %s\n%s" % (what, msg, gpu_common.consumer_report(lines)))

    first = 0 if prefill else P - 1
    want = {(rid, p, l) for rid in rids for p in range(first, P + N) for l in layers}
    seen, worst = set(), 0.0
    for r in lines:
        if r["t"] == "lost":
            fail("descriptors lost")
        if r["t"] != "attn":
            continue
        key = (r["rid"], r["position"], r["layer"])
        if key in seen or key not in want:
            fail("%s row %r" % ("duplicate" if key in seen else "unexpected", key))
        seen.add(key)
        b = rids.index(r["rid"])
        if r["token"] != seqs[b][r["position"]]:
            fail("token at %r is %r, expected %r" % (key, r["token"], seqs[b][r["position"]]))
        got = torch.tensor(r["probs"], dtype=torch.float64)
        worst = max(worst, (got - reference(model, record, b, r["position"], r["layer"])).abs().max().item())
    if seen != want:
        fail("%d of %d (rid, position, layer) rows; missing %r" % (len(seen), len(want), sorted(want - seen)[:5]))
    if worst > 1e-6:
        fail("worst |p - reference| %.3g" % worst)
    for s in (r for r in lines if r["t"] == "step" and not r["prefill"]):
        if s["decode_step"] != s["pos0"] - P + 1:
            fail("decode_step %d at %d" % (s["decode_step"], s["pos0"]))
    return len(seen), worst


def consumer_runs(hf):
    import attnx.export
    import gpu_common
    from host_graph import HostGraph, host_register

    class BigExporter(attnx.export.Exporter):  # host buffers need a data region; the hook asks for none
        def __init__(self, *a, **kw):
            kw["data_size"] = 16 << 20
            super().__init__(*a, **kw)

    hf.register, hf.GraphExporter, hf.Exporter = host_register, HostGraph, BigExporter
    torch.manual_seed(3)
    model = Model()
    shm = "/attnx.hfc%d" % os.getpid()
    ax = hf.HFExporter(model, "cache", batch_size=B, max_cache_len=LMAX, name=shm, q_rows=1024)
    res, cons, out = [], None, None
    try:
        ax.warmup()
        for run, (layers, prefill, defer) in enumerate(((list(range(L)), True, False), ([1], False, False),
                                                        (list(range(L)), True, True))):
            ax.defer = defer  # the third run: decode steps as one call at the last layer (step_all)
            out = tempfile.mktemp(suffix=".jsonl")
            cons = gpu_common.start_consumer(shm, out, layers=",".join(map(str, layers)), prefill=prefill, ends=B,
                                             timeout=60, cpu=True)
            gpu_common.wait_wanted(ax.g, out=out, cons=cons)  # as test_gpu_hf does
            rids = ["c%d-%d" % (run, b) for b in range(B)]
            seqs = [[100 * (run + 1) + 10 * b + i for i in range(P + N)] for b in range(B)]
            model.record = []
            generate(model, ax, rids, seqs)
            cons.wait(60)
            lines = gpu_common.load(out)
            n, worst = check_run(lines, model, model.record, rids, seqs, layers, prefill,
                                 "consumer run %d (layers %s, prefill %s)" % (run + 1, layers, prefill))
            os.unlink(out)
            res.append("reference consumer, layers %s, prefill %s%s: all %d (rid, position, layer) rows once, "
                       "worst |p - reference| %.1e" % (layers, prefill, ", defer" if defer else "", n, worst))
    finally:
        if cons is not None and cons.poll() is None:
            cons.kill()
            cons.wait()
        ax.close()
    return res


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AssertionError as e:
        print("not ok - %s" % e)
        sys.exit(1)
