"""Graph-safe export from Python: a ctypes binding of libattnx-export-graph (attnx_export_graph.h).

`GraphExporter` wraps one ax_graph: the segment of an `Exporter` mapped into the GPU's address space, and the
kernels that begin/end requests and export steps on the caller's stream (torch.cuda.current_stream() unless a
stream is given). Every step call only enqueues a small kernel, so a hook that calls them inside
torch.cuda.graph() capture records them, and each replay re-runs them with whatever the engine's static tensors
(positions, token ids, request rows) hold at that moment.

Tensors passed as step metadata must keep their address for as long as a graph that captured them is replayed
(they are graph inputs anyway). Needs torch and a CUDA build of attnx (libattnx-export-graph.so).
"""
import ctypes

from . import _ffi

PREFILL = 1
MAX_BATCH = 1024
# Kernel variants (attnx_export_graph.h ax_graph_debug): DBG_* break a guarantee and serve the cost measurement
# (tests/bench_gpu_export.py); OPT_* are candidate layouts that keep every guarantee.
DBG_EMPTY, DBG_FENCE_GPU, DBG_NO_QCOPY, DBG_SEG_DEV, DBG_CTL_DEV, OPT_FEWER, OPT_SMALL = (1 << i for i in range(7))


class IVec(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("bytes", ctypes.c_int32), ("pad0", ctypes.c_int32),
                ("stride", ctypes.c_int64), ("add", ctypes.c_int64)]


class StepArgs(ctypes.Structure):
    _fields_ = [("n_rows", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("row", IVec), ("seq_end", IVec),
                ("n_tok", IVec), ("n_tok_const", ctypes.c_uint32), ("pad1", ctypes.c_uint32), ("in_off", IVec),
                ("pad", IVec), ("pad_value", ctypes.c_int64), ("tokens", ctypes.c_void_p),
                ("token_bytes", ctypes.c_int32), ("pad2", ctypes.c_int32), ("tok_stride_b", ctypes.c_int64),
                ("tok_stride_t", ctypes.c_int64)]


class GraphConfig(ctypes.Structure):
    _fields_ = [("device", ctypes.c_int), ("qbuf", ctypes.c_uint32), ("q_ring", ctypes.c_void_p),
                ("q_rows", ctypes.c_uint64), ("index_buf", ctypes.c_uint32), ("map_rows", ctypes.c_uint32),
                ("max_batch", ctypes.c_uint32)]


class GraphStats(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("ring_head", "ring_dropped", "arena_head", "q_head", "next_req_id",
                                               "steps", "steps_dropped")]


for _s, _n in ((IVec, 32), (StepArgs, 216), (GraphConfig, 40), (GraphStats, 56)):
    if ctypes.sizeof(_s) != _n:  # pragma: no cover - a mirror out of date
        raise ImportError("attnx: %s is %d bytes, attnx_export_graph.h says %d" % (_s.__name__, ctypes.sizeof(_s), _n))

_glib = None


def glib():
    global _glib
    if _glib is None:
        _ffi.lib()  # libattnx-export first, RTLD_GLOBAL
        l = ctypes.CDLL(_ffi.find_library("libattnx-export-graph.so"))
        V, I, U32, P = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.POINTER
        protos = {
            "ax_graph_open": (I, [P(V), V, P(GraphConfig)]),
            "ax_graph_close": (None, [V]),
            "ax_graph_request_begin": (I, [V, V, U32, V, I, ctypes.c_char_p, V, I, U32, U32]),
            "ax_graph_request_end": (I, [V, V, U32, U32]),
            "ax_graph_step_begin": (I, [V, V, P(StepArgs)]),
            "ax_graph_export_q": (I, [V, V, U32, V, I, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]),
            "ax_graph_step_publish": (I, [V, V]),
            "ax_graph_step_start": (I, [V, V]),
            "ax_graph_step_begin_q": (I, [V, V, P(StepArgs), U32, V, I, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_int64]),
            "ax_graph_export_q_publish": (I, [V, V, U32, V, I, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]),
            "ax_graph_get_stats": (I, [V, P(GraphStats)]),
            "ax_graph_set_layers": (I, [V, P(ctypes.c_uint64)]),
            "ax_graph_enabled": (I, [V, P(ctypes.c_uint64), P(I)]),
            "ax_graph_strerror": (ctypes.c_char_p, [V]),
            "ax_graph_debug": (I, [V, ctypes.c_uint]),
            "ax_graph_step_all": (I, [V, V, P(StepArgs), U32, P(U32), P(V), I, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_int64]),
        }
        for fn, (res, args) in protos.items():
            f = getattr(l, fn)
            f.restype, f.argtypes = res, args
        _glib = l
    return _glib


def ivec(t=None, stride=1, add=0, offset=0):
    """An IVec over an int32/int64 CUDA tensor `t` (element `offset` is row 0's value); None = absent."""
    v = IVec()
    if t is None:
        return v
    if t.element_size() not in (4, 8) or t.dtype.is_floating_point:
        raise TypeError("attnx: step metadata must be int32 or int64, got %s" % t.dtype)
    v.p = t.data_ptr() + offset * t.element_size()
    v.bytes, v.stride, v.add = t.element_size(), stride, add
    return v


def _stream(stream):
    import torch

    s = stream if stream is not None else torch.cuda.current_stream()
    return ctypes.c_void_p(s.cuda_stream)


class GraphExporter:
    """Device-side producer for `exporter`'s segment. q_ring: the CUDA tensor [rows, H_q, D] registered as the
    segment's Q ring (buffer index qbuf); index_buf: the index table's buffer index; map_rows: its rows."""

    def __init__(self, exporter, q_ring, qbuf, index_buf, map_rows, max_batch):
        self._l = glib()
        self.exporter = exporter
        self.q_ring = q_ring  # kept alive: the kernels write it
        c = GraphConfig()
        c.device, c.qbuf, c.q_ring, c.q_rows = q_ring.device.index or 0, qbuf, q_ring.data_ptr(), q_ring.shape[0]
        c.index_buf, c.map_rows, c.max_batch = index_buf, map_rows, min(max_batch, MAX_BATCH)
        self.max_batch = c.max_batch
        h = ctypes.c_void_p()
        rc = self._l.ax_graph_open(ctypes.byref(h), exporter.handle, ctypes.byref(c))
        if rc < 0:
            raise _ffi.AttnxError("ax_graph_open (%s)" % self._l.ax_graph_strerror(None).decode(), rc)
        self._h = h

    def close(self):
        if self._h:
            self._l.ax_graph_close(self._h)
            self._h = None

    def _check(self, fn, rc):
        if rc < 0:
            raise _ffi.AttnxError("%s (%s)" % (fn, self._l.ax_graph_strerror(self._h).decode()), rc)
        return rc

    def request_begin(self, rid, tokens, prompt_len=None, skip=0, row=0, row_tensor=None, stream=None):
        """BEGIN on request-map row `row` (or the row held by the one-element int tensor row_tensor). tokens: a
        contiguous int32/int64 CUDA tensor with the ids of positions skip..prompt_len-1."""
        n = prompt_len if prompt_len is not None else skip + tokens.numel()
        rb = row_tensor.element_size() if row_tensor is not None else 0
        rp = row_tensor.data_ptr() if row_tensor is not None else None
        self._check("ax_graph_request_begin", self._l.ax_graph_request_begin(
            self._h, _stream(stream), row, rp, rb, rid.encode() if isinstance(rid, str) else rid,
            tokens.data_ptr() if tokens is not None and tokens.numel() else None,
            tokens.element_size() if tokens is not None else 4, n, skip))

    def request_end(self, row, reason="stop", stream=None):
        self._check("ax_graph_request_end", self._l.ax_graph_request_end(
            self._h, _stream(stream), row, _ffi.END_REASONS.get(reason, reason)))

    def step_begin(self, args, stream=None):
        return self._check("ax_graph_step_begin", self._l.ax_graph_step_begin(self._h, _stream(stream),
                                                                              ctypes.byref(args)))

    def export_q(self, layer, q, st_b, st_t, st_h, stream=None):
        """q: CUDA tensor (any view); element (b, i, h, d) at st_b*b + st_t*(in_off(b)+i) + st_h*h + d."""
        if q.stride(-1) != 1:
            raise ValueError("attnx: Q rows need a contiguous head dim")
        return self._check("ax_graph_export_q", self._l.ax_graph_export_q(
            self._h, _stream(stream), layer, q.data_ptr(), q.element_size(), st_b, st_t, st_h))

    def step_begin_q(self, args, layer, q, st_b, st_t, st_h, stream=None):
        """step_begin + export_q of `layer` (the step's first), one kernel for a small step (ax_graph_fuse)."""
        if q.stride(-1) != 1:
            raise ValueError("attnx: Q rows need a contiguous head dim")
        return self._check("ax_graph_step_begin_q", self._l.ax_graph_step_begin_q(
            self._h, _stream(stream), ctypes.byref(args), layer, q.data_ptr(), q.element_size(), st_b, st_t, st_h))

    def export_q_publish(self, layer, q, st_b, st_t, st_h, stream=None):
        """export_q of `layer` (the step's last) + publish, one kernel for a small step; only where every layer's
        keys of the step are already written (Hugging Face: the cache update runs before the attention)."""
        if q.stride(-1) != 1:
            raise ValueError("attnx: Q rows need a contiguous head dim")
        return self._check("ax_graph_export_q_publish", self._l.ax_graph_export_q_publish(
            self._h, _stream(stream), layer, q.data_ptr(), q.element_size(), st_b, st_t, st_h))

    def step_all(self, args, layers, qs, st_b, st_t, st_h, stream=None):
        """A whole step at its end (ax_graph_step_all): set-up, Q rows of layers[i] from qs[i] (same strides), publish;
        one kernel for a small step. Every layer's keys of the step must be written."""
        n = len(qs)
        if n != len(layers):
            raise ValueError("attnx: %d layers for %d Q tensors" % (len(layers), n))
        if any(q.stride(-1) != 1 for q in qs):
            raise ValueError("attnx: Q rows need a contiguous head dim")
        lv = (ctypes.c_uint32 * max(1, n))(*layers)
        pv = (ctypes.c_void_p * max(1, n))(*[q.data_ptr() for q in qs])
        es = qs[0].element_size() if n else 2
        return self._check("ax_graph_step_all", self._l.ax_graph_step_all(
            self._h, _stream(stream), ctypes.byref(args), n, lv, pv, es, st_b, st_t, st_h))

    def step_start(self, stream=None):
        """Count a step start (shm/README.md rule 9) before anything of the step writes K slots or index rows, where
        step_begin cannot come first (step_begin counts one itself)."""
        return self._check("ax_graph_step_start", self._l.ax_graph_step_start(self._h, _stream(stream)))

    def publish(self, stream=None):
        return self._check("ax_graph_step_publish", self._l.ax_graph_step_publish(self._h, _stream(stream)))

    def enabled(self):
        """(layer mask, prefill) while a live consumer wants rows, else None (as the kernels see it now)."""
        m = (ctypes.c_uint64 * 2)()
        p = ctypes.c_int()
        if self._l.ax_graph_enabled(self._h, m, ctypes.byref(p)) <= 0:
            return None
        return m[0] | (m[1] << 64), bool(p.value)

    def set_layers(self, layers=None):
        """Export Q rows of these layers only (an iterable of layer indices; None = every layer); the caller then
        skips export_q for the others. Applies to kernels enqueued or captured after the call."""
        m = (ctypes.c_uint64 * 2)()
        for l in (layers or ()):
            m[l >> 6] |= 1 << (l & 63)
        self._check("ax_graph_set_layers", self._l.ax_graph_set_layers(self._h, m))

    def debug(self, flags):
        """Kernel variant bits (DBG_* / OPT_*) for kernels enqueued or captured after the call."""
        self._check("ax_graph_debug", self._l.ax_graph_debug(self._h, flags))

    def stats(self):
        s = GraphStats()
        self._check("ax_graph_get_stats", self._l.ax_graph_get_stats(self._h, ctypes.byref(s)))
        return {n: getattr(s, n) for n, _ in GraphStats._fields_}
