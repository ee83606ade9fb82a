#!/usr/bin/env python3
"""The SGLang hook's host-side logic without torch or a GPU (suite 'python', CI).

attnx.sglang_hook imports torch only inside its functions; this test puts a minimal stand-in for torch in
sys.modules (tensors are address + shape + strides, nothing is computed) and replaces the two CUDA-touching calls —
attnx.cuda.register (CUDA IPC entries) and attnx.graph.GraphExporter (the kernels) — with recorders. The real
Exporter (libattnx-export, host) is used, so the segment configuration the hook derives is validated by the C
library. What is checked: the hook specs SGLang would register; set-up from a ForwardBatch (shape, TP rank and head
offset from the environment, fp8 K pools exported with the fp8 dtype and the layer's k_scale, the index table, the
Q ring); BEGIN only for rids new in an extend batch, with the right device addresses (req_pool_indices[b], the
extend chunk's ids), prompt length and radix prefix; the step arguments for extend and decode (row / seq_len /
token / padding vectors with their addresses and strides); one Q copy per layer with [tokens, H, D] strides,
layer 0's through the fused step_begin_q; publish after the last layer only; END on the wrapped
ReqToTokenPool.free on the forward stream, never on a graph-capture stream, followed by one step start per free
(rule 9); and that an exception inside the hook disables export without reaching the model.
"""
import os
import sys
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# ---- a stand-in for the parts of torch the hook touches ---------------------------------------------------------


class DType:
    def __init__(self, name, size, fp):
        self.name, self.itemsize, self.is_floating_point = name, size, fp

    def __str__(self):
        return "torch." + self.name

    __repr__ = __str__


fake_torch = types.ModuleType("torch")
for _n, _s, _f in (("float32", 4, True), ("float16", 2, True), ("bfloat16", 2, True), ("int32", 4, False),
                   ("int64", 8, False), ("uint8", 1, False), ("float8_e4m3fn", 1, True)):
    setattr(fake_torch, _n, DType(_n, _s, _f))
_next_ptr = [0x7f0000000000]


class T:
    """Address, shape and element strides; slicing along dim 0 and view() as the hook uses them."""

    def __init__(self, shape, dtype, ptr=None, strides=None, device="cuda:0"):
        self.shape, self.dtype = tuple(shape), dtype
        if strides is None:
            strides, acc = [], 1
            for n in reversed(self.shape):
                strides.insert(0, acc)
                acc *= n
        self._strides = tuple(strides)
        if ptr is None:
            ptr = _next_ptr[0]
            _next_ptr[0] += 1 << 24
        self.ptr, self.device = ptr, types.SimpleNamespace(index=0)

    def data_ptr(self):
        return self.ptr

    def element_size(self):
        return self.dtype.itemsize

    def dim(self):
        return len(self.shape)

    def stride(self, i=None):
        return self._strides if i is None else self._strides[i]

    def numel(self):
        n = 1
        for x in self.shape:
            n *= x
        return n

    def __getitem__(self, sl):
        assert isinstance(sl, slice) and sl.step is None
        a, b = sl.start or 0, self.shape[0] if sl.stop is None else min(sl.stop, self.shape[0])
        return T((b - a,) + self.shape[1:], self.dtype, self.ptr + a * self._strides[0] * self.element_size(),
                 self._strides)

    def view(self, *shape):
        assert len(shape) == 3 and self.dim() == 2 and self._strides[1] == 1
        if -1 in shape and self.numel() == 0:  # as torch: -1 is ambiguous for an empty tensor
            raise RuntimeError("cannot reshape tensor of 0 elements into shape %r" % (shape,))
        assert shape[0] == self.shape[0] and shape[1] * shape[2] in (self.shape[1], -shape[2])
        return T((self.shape[0], self.shape[1] // shape[2], shape[2]), self.dtype, self.ptr,
                 (self._strides[0], shape[2], 1))


def _zeros(shape, dtype=None, device=None):
    return T(shape, dtype or fake_torch.float32)


fake_torch.zeros = _zeros
_capturing = [False]
_stream = [types.SimpleNamespace(cuda_stream=0x1000, name="forward")]
fake_torch.cuda = types.SimpleNamespace(current_stream=lambda: _stream[0],
                                        is_current_stream_capturing=lambda: _capturing[0])
sys.modules["torch"] = fake_torch

import attnx.cuda  # noqa: E402
import attnx.graph  # noqa: E402
from attnx import _ffi  # noqa: E402
from attnx import sglang_hook as sh  # noqa: E402

# ---- recorders ------------------------------------------------------------------------------------------------

calls = []
registered = []


def fake_register(ex, t, kind, **kw):
    registered.append((kind, t, kw))
    return len(registered) - 1


class FakeGraph:
    def __init__(self, exporter, q_ring, qbuf, index_buf, map_rows, max_batch):
        self.max_batch = min(max_batch, 1024)
        calls.append(("open", qbuf, index_buf, map_rows, self.max_batch))

    def request_begin(self, rid, tokens, prompt_len=None, skip=0, row=0, row_tensor=None, stream=None):
        calls.append(("begin", rid, tokens.data_ptr(), tokens.numel(), prompt_len, skip, row_tensor.data_ptr()))

    def request_end(self, row, reason="stop", stream=None):
        calls.append(("end", row, reason, stream.name if stream else None))

    def step_begin(self, a, stream=None):
        def iv(v):
            return (v.p, v.bytes, v.stride) if v.p else None

        calls.append(("step", a.n_rows, a.flags, iv(a.row), iv(a.seq_end), iv(a.n_tok), a.n_tok_const,
                      iv(a.in_off), iv(a.pad), a.pad_value, a.tokens, a.token_bytes, a.tok_stride_b,
                      a.tok_stride_t))

    def step_begin_q(self, a, layer, q, st_b, st_t, st_h, stream=None):
        """As libattnx-export-graph: step_begin, then export_q of `layer` (one kernel when small)."""
        calls.append(("fused", layer))
        self.step_begin(a, stream)
        self.export_q(layer, q, st_b, st_t, st_h, stream)

    def export_q(self, layer, q, st_b, st_t, st_h, stream=None):
        calls.append(("q", layer, q.data_ptr(), st_b, st_t, st_h))

    def step_start(self, stream=None):
        calls.append(("start", stream.name if stream else None))

    def publish(self, stream=None):
        calls.append(("publish",))

    def set_layers(self, layers=None):
        calls.append(("set_layers", layers))

    def enabled(self):
        return None


attnx.cuda.register = fake_register
attnx.graph.GraphExporter = FakeGraph

# ---- SGLang-shaped objects -------------------------------------------------------------------------------------

L, HQ, HKV, D, ROWS, CTX = 3, 8, 2, 64, 4, 128


class Mode:
    def __init__(self, m):
        self.m = m

    def is_idle(self):
        return self.m == "idle"

    def is_decode(self):
        return self.m == "decode"

    def is_extend(self):
        return self.m in ("extend", "verify")

    def is_target_verify(self):
        return self.m == "verify"


class Attn:
    def __init__(self, layer):
        self.layer_id, self.tp_q_head_num, self.tp_k_head_num, self.head_dim = layer, HQ, HKV, D
        self.scaling, self.logit_cap, self.sliding_window_size = D ** -0.5, 0.0, -1
        self.k_scale = types.SimpleNamespace(item=lambda: 0.5)  # a 1-element tensor's item()


class ReqPool:
    def __init__(self):
        self.req_to_token = T((ROWS, CTX), fake_torch.int32)
        self.freed = []

    def free(self, idx):
        self.freed.append(idx)


kpool = types.SimpleNamespace(k_buffer=[T((1001, HKV, D), fake_torch.uint8) for _ in range(L)], layer_num=L,
                              dtype=fake_torch.float8_e4m3fn, start_layer=0)
rpool = ReqPool()


def fb(mode, n_rows, tokens, rids=None, pre=None, ext=None):
    i64, i32 = fake_torch.int64, fake_torch.int32
    f = types.SimpleNamespace(forward_mode=Mode(mode), batch_size=n_rows, input_ids=T((tokens,), i64),
                              req_pool_indices=T((n_rows,), i64), seq_lens=T((n_rows,), i64),
                              out_cache_loc=T((tokens,), i64), rids=rids, extend_prefix_lens_cpu=pre,
                              extend_seq_lens_cpu=ext, extend_seq_lens=T((n_rows,), i32),
                              extend_start_loc=T((n_rows,), i32), token_to_kv_pool=kpool, req_to_token_pool=rpool)
    return f


def forward(mods, pre, post, f, tokens):
    for l, m in enumerate(mods):
        qkv = T((tokens, (HQ + 2 * HKV) * D), fake_torch.bfloat16)
        q = T((tokens, HQ * D), fake_torch.bfloat16, qkv.ptr, (qkv.stride(0), 1))
        pre(m, (q, None, None, f), {})
        post(m, (q, None, None, f), None)


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


def main():
    os.environ["ATTNX_TP_RANK"], os.environ["ATTNX_TP_SIZE"] = "1", "2"
    specs = __import__("json").loads(sh.forward_hooks_json("/attnx.sgt%d" % os.getpid()))
    pre = sh.pre_hook_factory(specs[0]["config"])
    post = sh.post_hook_factory(specs[1].get("config"))
    mods = [Attn(l) for l in range(L)]
    out = []

    # 1. extend: two new requests (one with a radix prefix of 3) — set-up, BEGINs, step, Q per layer, publish
    f = fb("extend", 2, 9, rids=["r0", "r1"], pre=[0, 3], ext=[5, 4])
    forward(mods, pre, post, f, 9)
    st = sh._state
    expect(st.ready and not st.disabled, "set-up failed")
    h = st.ex.header
    expect((h.rank, h.world_size, h.head_offset, h.n_q_heads_total) == (1, 2, HQ, 2 * HQ), "TP fields")
    expect(st.ex.name.endswith(".1"), "rank 1 segment name %s" % st.ex.name)
    expect((h.q_dtype, h.k_dtype, h.max_ctx) == (_ffi.DTYPES["bf16"], _ffi.DTYPES["fp8_e4m3"], CTX), "dtypes/ctx")
    kinds = [(k, kw.get("dtype"), kw.get("scale"), kw.get("layer")) for k, t, kw in registered]
    expect(kinds[:2] == [(_ffi.BUF_Q_RING, None, None, None), (_ffi.BUF_INDEX_TOKEN, None, None, None)],
           "Q ring and index registered first: %r" % kinds[:2])
    expect(kinds[2:] == [(_ffi.BUF_K_POOL, "fp8_e4m3", 0.5, l) for l in range(L)], "K pools %r" % kinds[2:])
    expect(registered[1][1] is rpool.req_to_token, "the index table is SGLang's req_to_token itself")
    b = [c for c in calls if c[0] == "begin"]
    ids, rpi = f.input_ids.ptr, f.req_pool_indices.ptr
    expect(b == [("begin", "r0", ids, 5, 5, 0, rpi), ("begin", "r1", ids + 5 * 8, 4, 7, 3, rpi + 8)],
           "BEGINs %r" % b)
    s = [c for c in calls if c[0] == "step"]
    expect(s == [("step", 2, 1, (rpi, 8, 1), (f.seq_lens.ptr, 8, 1), (f.extend_seq_lens.ptr, 4, 1), 0,
                  (f.extend_start_loc.ptr, 4, 1), None, 0, ids, 8, 0, 1)], "extend step %r" % s)
    q = [c for c in calls if c[0] == "q"]
    expect([c[1] for c in q] == list(range(L)) and all(c[3:] == (0, (HQ + 2 * HKV) * D, D) for c in q),
           "Q copies %r" % q)
    expect([c for c in calls if c[0] == "fused"] == [("fused", 0)] and
           calls.index(("fused", 0)) < calls.index(s[0]), "layer 0's Q rides on the step's begin: %r" % calls)
    expect([c[0] for c in calls].count("publish") == 1 and calls[-1] == ("publish",), "one publish, last")
    out.append("extend: set-up, 2 BEGINs, step, %d Q copies, publish" % len(q))

    # 2. a continuing chunk of r1 and a new r2: only r2 begins
    del calls[:]
    f = fb("extend", 2, 6, rids=["r1", "r2"], pre=[7, 0], ext=[3, 3])
    forward(mods, pre, post, f, 6)
    b = [c[1] for c in calls if c[0] == "begin"]
    expect(b == ["r2"], "only the new rid begins: %r" % b)

    # 3. decode captured in a CUDA graph (padding marked by out_cache_loc == 0); ENDs never on the capture stream
    del calls[:]
    _capturing[0], _stream[0] = True, types.SimpleNamespace(cuda_stream=0x2000, name="capture")
    f = fb("decode", 8, 8)
    forward(mods, pre, post, f, 8)
    _capturing[0], _stream[0] = False, types.SimpleNamespace(cuda_stream=0x1000, name="forward")
    s = [c for c in calls if c[0] == "step"]
    expect(s == [("step", 8, 0, (f.req_pool_indices.ptr, 8, 1), (f.seq_lens.ptr, 8, 1), None, 1, None,
                  (f.out_cache_loc.ptr, 8, 1), 0, f.input_ids.ptr, 8, 1, 1)], "decode step %r" % s)
    q = [c for c in calls if c[0] == "q"]
    row = (HQ + 2 * HKV) * D
    expect([c[1] for c in q] == list(range(L)) and all(c[3:] == (row, row, D) for c in q),
           "decode Q copies: row b's Q at q[b] (batch stride = token stride): %r" % q)
    expect(st.stream.name == "forward", "the END stream must stay the forward stream, got %s" % st.stream.name)
    rpool.free(2)
    rpool.free([0, 3])
    ends = [c for c in calls if c[0] in ("end", "start")]
    expect(ends == [("end", 2, "stop", "forward"), ("start", "forward"), ("end", 0, "stop", "forward"),
                    ("end", 3, "stop", "forward"), ("start", "forward")],
           "ENDs, each free followed by one step start on the forward stream (rule 9): %r" % ends)
    expect(rpool.freed == [2, [0, 3]], "the original free still runs")
    # newer SGLang frees with the Req: its rid may come back (a retracted request re-prefilled) and begins again
    del calls[:]
    req = types.SimpleNamespace(req_pool_idx=1, rid="r1")
    rpool.free(req)
    expect([c for c in calls if c[0] in ("end", "start")] == [("end", 1, "stop", "forward"), ("start", "forward")],
           "free(Req) %r" % calls)
    del calls[:]
    forward(mods, pre, post, fb("extend", 2, 6, rids=["r1", "r2"], pre=[2, 0], ext=[4, 2]), 6)
    expect([c[1] for c in calls if c[0] == "begin"] == ["r1"], "r1 re-prefilled after free(Req) begins again, "
           "r2 (still running) does not: %r" % [c for c in calls if c[0] == "begin"])
    out.append("decode under capture: padding vector, ENDs and their step start on the forward stream")

    # 3b. "layers" in the config: no Q copy for the other layers (layer 0's rides on the set-up, skipped on the GPU)
    del calls[:]
    st.export_layers = {2}
    forward(mods, pre, post, fb("decode", 2, 2), 2)
    st.export_layers = None
    expect([c[1] for c in calls if c[0] == "q"] == [0, 2], "layers {2}: Q copies %r" % calls)
    out.append("export layers {2}: one Q-copy kernel besides the set-up's")

    # 4. speculative verify and idle batches export nothing
    del calls[:]
    forward(mods, pre, post, fb("verify", 2, 4, rids=["r9", "r8"], pre=[1, 1], ext=[2, 2]), 4)
    forward(mods, pre, post, fb("idle", 0, 0), 0)
    expect(not [c for c in calls if c[0] in ("step", "q", "publish", "begin")], "verify/idle exported %r" % calls)
    expect(not st.disabled, "an idle batch (0 tokens) or a verify batch disabled export")

    # 5. an exception inside the hook disables export and never reaches the model
    del calls[:]
    bad = fb("decode", 2, 2)
    bad.req_pool_indices = T((2,), fake_torch.float32)  # metadata the kernels cannot take: ivec() raises
    forward(mods, pre, post, bad, 2)
    expect(st.disabled, "export not disabled after an error")
    del calls[:]
    forward(mods, pre, post, fb("decode", 2, 2), 2)
    expect(not calls, "calls after disabling: %r" % calls)
    out.append("verify/idle skipped; an error disables export quietly")
    st.ex.close()
    for o in out:
        print("ok - " + o)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AssertionError as e:
        print("not ok - %s" % e)
        sys.exit(1)
