"""libattnx-export-graph emulated on the host, for CPU runs of the adapters' GPU tests (`--cpu`).

`HostGraph` has attnx.graph.GraphExporter's API and export_graph.cu's semantics: a request map (row → request id,
prompt length) where a BEGIN on a row that still holds a request first ENDs it (abort); a step's set-up reads the
step's metadata through the raw addresses of its StepArgs (CPU tensors, so host addresses, read with ctypes when
the "kernel" runs: a replayed recording sees the static tensors' values of that moment, as a replayed CUDA graph
does), skips padded rows and rows holding no request, grows a row's prompt length for chunked prefill, exports
every token of a prefill row when the consumer wants prefill rows (else its last), decode_step = pos0 + 1 −
prompt length, Q rows token-major and layer-minor in one unwrapped run of the Q ring; the publish writes each valid
row's token ids and FORWARD after the last layer. Rule 9: every step set-up and step_start counts a step start,
every END stores freed_step (libattnx-export does both).

What differs from the GPU: descriptors, request entries and header counters are written by libattnx-export's host
producer (its request-table slots, its seqlock), not by kernels; streams are ignored. `Recorder` stands in for CUDA
graph capture: while it captures, every "kernel" (HostGraph's calls, and whatever the test's model routes through
`Recorder.run`) is recorded as a closure instead of run; `replay()` runs them in order. `host_register` replaces
attnx.cuda.register: the tensor becomes a host buffer of the segment (its contents copied, then the tensor itself
re-pointed at the segment's bytes), so the engine's later writes land where the consumer reads them, live.
"""
import contextlib
import ctypes

from attnx import _ffi
from attnx.export import layer_list, make_buffer

PREFILL = 1
TORCH_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "i32": "int32", "i64": "int64",
                "fp8_e4m3": "uint8", "fp8_e5m2": "uint8"}


class Recorder:
    """CUDA graph capture, emulated: `with rec.capture() as g:` records; g.replay() runs the recording."""

    def __init__(self):
        self.ops = None

    @property
    def capturing(self):
        return self.ops is not None

    def run(self, fn):
        if self.ops is not None:
            self.ops.append(fn)
        else:
            fn()

    @contextlib.contextmanager
    def capture(self):
        g = Recording([])
        self.ops = g.ops
        try:
            yield g
        finally:
            self.ops = None


class Recording:
    def __init__(self, ops):
        self.ops = ops

    def replay(self):
        for fn in self.ops:
            fn()


recorder = Recorder()


def _dtype_name(t):
    return str(t.dtype).replace("torch.", "").replace("float32", "f32").replace("float16", "f16") \
        .replace("bfloat16", "bf16").replace("int32", "i32").replace("int64", "i64")


def host_register(ex, t, kind, layer=-1, dtype=None, scale=1.0, shape=None, strides=None):
    """attnx.cuda.register for CPU tensors: a host buffer holding the tensor, which from then on lives there.
    shape/strides (elements) describe the entry as another view of the tensor's bytes, as attnx.hf does for a
    static cache [B, H_kv, max_len, D] seen as a K pool [slots, H_kv, D]; that view must span the tensor exactly."""
    import torch

    if not t.is_contiguous() or (shape is None) != (strides is None):
        raise ValueError("host_register: a contiguous tensor, as it is or with both shape and strides")
    name = dtype or _dtype_name(t)
    hb = ex.add_host_buffer(make_buffer(kind, name, tuple(shape or t.shape), layer=layer, strides=strides,
                                        scale=scale))
    if hb.nbytes != t.numel() * t.element_size():
        raise ValueError("host_register: the entry spans %d bytes, the tensor %d" % (hb.nbytes,
                                                                                     t.numel() * t.element_size()))
    flat = torch.frombuffer(hb.view, dtype=t.dtype, count=t.numel())
    flat.copy_(t.reshape(-1))
    t.set_(flat.view(t.shape))  # t now shares the segment's bytes (same shape, contiguous strides)
    return hb.index


def _ivec(v, b, dflt):
    if not v.p:
        return dflt
    addr = v.p + b * v.stride * v.bytes
    x = (ctypes.c_int64 if v.bytes == 8 else ctypes.c_int32).from_address(addr).value
    return x + v.add


class HostGraph:
    """GraphExporter's calls on the host (see the module doc). q_ring must already live in the segment."""

    def __init__(self, exporter, q_ring, qbuf, index_buf, map_rows, max_batch):
        self.ex, self.q_ring, self.qbuf, self.index_buf = exporter, q_ring, qbuf, index_buf
        self.map_rows, self.max_batch = map_rows, min(max_batch, 1024)
        h = exporter.header
        self.H, self.D, self.L = h.n_q_heads, h.head_dim, h.n_layers
        self.esize = q_ring.element_size()
        self.map = {}  # row -> [req_id, prompt_len]
        self.rows, self.active, self.layers, self.q_base = [], False, [], 0
        self.steps = self.steps_dropped = 0
        self.layer_set = (1 << self.L) - 1
        self._l = _ffi.lib()
        self._l.ax_export_step_start.argtypes = [ctypes.c_void_p]
        self._l.ax_export_step_start(exporter.handle)  # ax_graph_open does this: AX_SHM_FEAT_RECYCLE

    # ---- requests ---------------------------------------------------------------------------------------------

    def request_begin(self, rid, tokens, prompt_len=None, skip=0, row=0, row_tensor=None, stream=None):
        ids = [int(x) for x in tokens.reshape(-1).tolist()] if tokens is not None else []
        n = prompt_len if prompt_len is not None else skip + len(ids)
        rp = row_tensor.data_ptr() if row_tensor is not None else None
        rb = row_tensor.element_size() if row_tensor is not None else 0
        rid = rid.decode() if isinstance(rid, bytes) else rid

        def k_begin():
            r = row if rp is None else (ctypes.c_int64 if rb == 8 else ctypes.c_int32).from_address(rp).value
            if not 0 <= r < self.map_rows:
                return
            self._end_row(r, "abort")  # a recycled row whose END was missed
            req = self.ex.request_begin(rid, [0] * skip + ids[:n - skip])
            if req is not None:
                self.map[r] = [req, n]

        recorder.run(k_begin)

    def _end_row(self, row, reason):
        m = self.map.pop(row, None)
        if m is not None:
            self.ex.request_end(m[0], reason)

    def request_end(self, row, reason="stop", stream=None):
        recorder.run(lambda: self._end_row(row, reason))

    def step_start(self, stream=None):
        recorder.run(lambda: self._l.ax_export_step_start(self.ex.handle))

    # ---- steps ----------------------------------------------------------------------------------------------

    def step_begin(self, args, stream=None):
        from attnx.graph import StepArgs

        a = StepArgs.from_buffer_copy(args)
        self._n_rows, self._last = a.n_rows, a
        recorder.run(lambda: self._setup(a))
        return 0

    def _setup(self, a):
        self._l.ax_export_step_start(self.ex.handle)
        w = self.ex.wanted()
        layers = layer_list(w[0] & self.layer_set) if w else []
        want_prefill = bool(w and w[1])
        rows = []
        for b in range(a.n_rows):
            r = self._row(a, b, want_prefill)
            rows.append(r if w else None)
        total = sum((r["n"] - r["q_first"]) * len(layers) for r in rows if r)
        self.rows, self.active, self.layers = rows, bool(w), layers
        if not w:
            return
        self.steps += 1
        if total > self.q_ring.shape[0]:
            self.steps_dropped += 1
            self.layers = []
        elif total:
            self.q_base, _ = self.ex.q_reserve(self.qbuf, total)
        off = 0
        for r in rows:
            if r:
                r["q_off"] = off
                off += (r["n"] - r["q_first"]) * len(self.layers)

    def _row(self, a, b, want_prefill):
        mrow = _ivec(a.row, b, b)
        n = _ivec(a.n_tok, b, a.n_tok_const)
        end = _ivec(a.seq_end, b, -1)
        if a.pad.p and _ivec(a.pad, b, 0) == a.pad_value:
            return None
        if mrow < 0 or mrow >= self.map_rows or n < 1 or end < n or end > self.ex.header.max_ctx:
            return None
        m = self.map.get(mrow)
        if m is None:
            return None
        pos0 = end - n
        prefill = bool(a.flags & PREFILL) and (n > 1 or pos0 < m[1])
        if prefill and end > m[1]:
            m[1] = end  # chunked prefill: the prompt is known up to here
        return {"req": m[0], "mrow": mrow, "n": n, "pos0": pos0, "prefill": prefill,
                "q_first": n - 1 if prefill and not want_prefill else 0,
                "decode_step": 0 if prefill else max(0, pos0 + 1 - m[1]), "in_off": _ivec(a.in_off, b, 0)}

    def export_q(self, layer, q, st_b, st_t, st_h, stream=None):
        src = q.data_ptr()
        recorder.run(lambda: self._copy(layer, src, st_b, st_t, st_h))
        return 0

    def _copy(self, layer, src, st_b, st_t, st_h):
        if not self.active or layer not in self.layers:
            return
        li, nl, es, rows_n = self.layers.index(layer), len(self.layers), self.esize, self.q_ring.shape[0]
        ring = self.q_ring.data_ptr()
        for b, r in enumerate(self.rows):
            if not r:
                continue
            for t in range(r["n"] - r["q_first"]):
                tok = r["in_off"] + r["q_first"] + t
                row = (self.q_base + r["q_off"] + t * nl + li) % rows_n
                for h in range(self.H):
                    s = src + (b * st_b + tok * st_t + h * st_h) * es
                    ctypes.memmove(ring + (row * self.H + h) * self.D * es, s, self.D * es)

    def step_begin_q(self, args, layer, q, st_b, st_t, st_h, stream=None):
        self.step_begin(args)
        return self.export_q(layer, q, st_b, st_t, st_h)

    def export_q_publish(self, layer, q, st_b, st_t, st_h, stream=None):
        self.export_q(layer, q, st_b, st_t, st_h)
        return self.publish()

    def step_all(self, args, layers, qs, st_b, st_t, st_h, stream=None):
        """ax_graph_step_all: the set-up, every listed layer's copy, the publish (what k_step_all does in one)."""
        if len(layers) != len(qs):
            raise ValueError("attnx: %d layers for %d Q tensors" % (len(layers), len(qs)))
        self.step_begin(args)
        for l, q in zip(layers, qs):
            self.export_q(l, q, st_b, st_t, st_h)
        return self.publish()

    def publish(self, stream=None):
        a = self._last
        recorder.run(lambda: self._publish(a))
        return 0

    def _publish(self, a):
        if not self.active:
            return
        width = ctypes.c_int64 if a.token_bytes == 8 else ctypes.c_int32
        mask = sum(1 << l for l in self.layers)
        for b, r in enumerate(self.rows):
            if not r:
                continue
            toks = []
            for i in range(r["n"] - r["q_first"]):
                ti = b * a.tok_stride_b + (r["in_off"] + r["q_first"] + i) * a.tok_stride_t
                toks.append(int(width.from_address(a.tokens + ti * a.token_bytes).value))
            self.ex.step(r["req"], r["pos0"] + r["q_first"], toks, self.index_buf, r["mrow"], r["decode_step"],
                         self.q_base + r["q_off"] if self.layers else 0, (mask & (2 ** 64 - 1), mask >> 64),
                         r["prefill"])
        self.active = False  # a publish without a fresh step set-up publishes nothing

    def set_layers(self, layers=None):
        m = sum(1 << l for l in layers or ()) & ((1 << self.L) - 1)
        if layers and not m:
            raise ValueError("set_layers: no layer of the model")
        self.layer_set = m or (1 << self.L) - 1

    # ---- diagnostics ----------------------------------------------------------------------------------------

    def enabled(self):
        return self.ex.wanted()

    def stats(self):
        h = self.ex.header
        return {"ring_head": h.ring_head, "ring_dropped": h.ring_dropped, "arena_head": h.arena_head,
                "q_head": h.q_head, "next_req_id": h.next_req_id, "steps": self.steps,
                "steps_dropped": self.steps_dropped}

    def close(self):
        pass
