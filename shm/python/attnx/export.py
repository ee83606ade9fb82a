"""Engine side of the segment from Python: a thin wrapper over libattnx-export (ax_export_*).

An `Exporter` owns one segment (one per engine process / TP rank). Host buffers (K pools, Q ring, index table
in the segment's data region) come back as `HostBuffer`s whose `.view` is a writable memoryview of their bytes;
CUDA buffers are added from a filled `ShmBuffer` (see attnx.cuda for torch tensors). Requests, Q-ring rows and
steps map one to one onto the C calls. The producer never blocks: a full ring or request table is reported by a
return value (and counted in the header), never raised, because an engine must carry on.
Thread-safety: one thread per Exporter, as in C.
"""
import ctypes

from . import _ffi
from ._ffi import ShmBuffer, ShmStep, check

_NO_RETRY = -11  # -EAGAIN


def _dtype(d):
    if isinstance(d, int):
        return d
    if d not in _ffi.DTYPES:
        raise ValueError("attnx: unknown dtype %r (one of %s)" % (d, ", ".join(_ffi.DTYPES)))
    return _ffi.DTYPES[d]


def make_buffer(kind, dtype, shape, layer=-1, strides=None, scale=1.0, loc=_ffi.LOC_HOST):
    """A buffer-table entry. shape/strides outermost first, strides in elements (None = contiguous)."""
    if not 1 <= len(shape) <= 4:
        raise ValueError("attnx: 1..4 dims, got %r" % (shape,))
    b = ShmBuffer()
    b.kind, b.loc, b.dtype, b.layer, b.ndim, b.scale = kind, loc, _dtype(dtype), layer, len(shape), scale
    for i, n in enumerate(shape):
        b.dim[i] = int(n)
    if strides is not None:
        for i, s in enumerate(strides):
            b.stride[i] = int(s)
    return b


def block_table_desc(rows, max_blocks, block_size, loc=_ffi.LOC_HOST):
    """A paged block table's entry (ax_shm_block_table_desc): i32 [rows, max_blocks] of block_size, contiguous;
    key position p of row r is in block table[r][p // block_size]. For a device table set the location (attnx.cuda)
    and add it with Exporter.add_device_buffer; a host table is simpler with Exporter.add_block_table."""
    b = ShmBuffer()
    check("ax_shm_block_table_desc", _ffi.lib().ax_shm_block_table_desc(ctypes.byref(b), rows, max_blocks,
                                                                         block_size))
    b.loc = loc
    return b


def paged_kpool_desc(layer, dtype, blocks, block_size, n_kv_heads, head_dim, loc=_ffi.LOC_HOST):
    """Layer `layer`'s paged K pool entry (ax_shm_paged_kpool_desc): [blocks, block_size, H_kv, D], contiguous
    (vLLM's NHD layout; for HND set .stride afterwards), scale 1 (set .scale for fp8)."""
    b = ShmBuffer()
    check("ax_shm_paged_kpool_desc", _ffi.lib().ax_shm_paged_kpool_desc(ctypes.byref(b), layer, _dtype(dtype), blocks,
                                                                         block_size, n_kv_heads, head_dim))
    b.loc = loc
    return b


def block_size(desc):
    """The block size of a block table (dim[2]) or of a 4-D K pool (dim[1]); 0 for any other entry."""
    return _ffi.lib().ax_shm_block_size(ctypes.byref(desc))


class HostBuffer:
    """A buffer in the segment's data region: .index (buffer table), .ptr (address), .nbytes, .view."""

    def __init__(self, index, ptr, desc):
        self.index, self.ptr, self.desc, self.nbytes = index, ptr, desc, desc.bytes
        self.view = memoryview((ctypes.c_char * desc.bytes).from_address(ptr)).cast("B")


class Exporter:
    """Create the segment. Keyword arguments are ax_export_config's fields (n_layers, n_q_heads, n_kv_heads,
    head_dim, q_dtype, k_dtype, max_ctx, data_size, ...); dtypes may be names ("f32", "bf16")."""

    def __init__(self, name=_ffi.DEFAULT_NAME, engine="python", model="", **cfg):
        self._l = _ffi.lib()
        c = _ffi.ExportConfig()
        self._keep = [s.encode() if isinstance(s, str) else s for s in (name, engine, model)]
        c.name, c.engine, c.model = self._keep
        c.world_size = 1
        c.scale = 0.0
        for k, v in cfg.items():
            if not hasattr(c, k) or k in ("name", "engine", "model"):
                raise TypeError("attnx: unknown config field %r" % k)
            setattr(c, k, _dtype(v) if k in ("q_dtype", "k_dtype") else v)
        h = ctypes.c_void_p()
        check("ax_export_open", self._l.ax_export_open(ctypes.byref(h), ctypes.byref(c)))
        self._h = h
        self.name = name
        self.header = self._l.ax_export_header(h).contents

    def close(self):
        if self._h:
            self._l.ax_export_close(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def handle(self):
        """The ax_export pointer (for libattnx-export-graph)."""
        if not self._h:
            raise ValueError("attnx: exporter closed")
        return self._h

    def add_host_buffer(self, desc):
        ptr, idx = ctypes.c_void_p(), _ffi.u32()
        check("ax_export_add_host_buffer",
              self._l.ax_export_add_host_buffer(self.handle, ctypes.byref(desc), ctypes.byref(ptr), ctypes.byref(idx)))
        full = _ffi.lib().ax_export_header(self.handle).contents  # bytes were completed by the library
        buf = (ShmBuffer * full.buf_cap).from_address(ctypes.addressof(full) + full.buf_off)[idx.value]
        return HostBuffer(idx.value, ptr.value, buf)

    def add_block_table(self, rows, max_blocks, block_size):
        """A host block table i32 [rows, max_blocks] of `block_size` in the data region, zeroed
        (ax_export_add_block_table). Returns a HostBuffer: .index for FORWARDs' index_buf, .view its bytes; row r's
        cells are .cells[r * max_blocks : (r + 1) * max_blocks] (an int32 memoryview). The engine writes a row's
        block ids for positions 0 .. seq_len - 1 before publishing a step that reads them (shm/README rule 9 before
        rewriting a row or a block it freed)."""
        ptr, idx = ctypes.POINTER(ctypes.c_int32)(), _ffi.u32()
        check("ax_export_add_block_table", self._l.ax_export_add_block_table(self.handle, rows, max_blocks, block_size,
                                                                            ctypes.byref(ptr), ctypes.byref(idx)))
        full = self.header
        buf = (ShmBuffer * full.buf_cap).from_address(ctypes.addressof(full) + full.buf_off)[idx.value]
        hb = HostBuffer(idx.value, ctypes.cast(ptr, ctypes.c_void_p).value, buf)
        hb.cells = hb.view.cast("i")
        return hb

    def add_device_buffer(self, desc):
        idx = _ffi.u32()
        check("ax_export_add_device_buffer",
              self._l.ax_export_add_device_buffer(self.handle, ctypes.byref(desc), ctypes.byref(idx)))
        return idx.value

    def request_begin(self, rid, prompt):
        """Announce a request. Returns its 64-bit id, or None when the request table is full (the engine goes on
        without exporting it). A dropped BEGIN (ring full) still returns the id: later steps may be published."""
        rid_b = rid.encode() if isinstance(rid, str) else rid
        arr = (ctypes.c_int32 * max(1, len(prompt)))(*prompt)
        rq = _ffi.u64()
        rc = self._l.ax_export_request_begin(self.handle, rid_b, arr, len(prompt), ctypes.byref(rq))
        if rc == -28:  # -ENOSPC
            return None
        if rc not in (0, _NO_RETRY):
            check("ax_export_request_begin", rc)
        return rq.value

    def request_end(self, req_id, reason="stop"):
        """Publish END. Returns False if the END descriptor was dropped (ring full), True otherwise."""
        rc = self._l.ax_export_request_end(self.handle, req_id, _ffi.END_REASONS.get(reason, reason))
        if rc == _NO_RETRY:
            return False
        check("ax_export_request_end", rc)
        return True

    def q_reserve(self, qbuf, rows):
        """Reserve `rows` Q-ring rows of host Q ring `qbuf`: (monotonic first row, address to write them)."""
        row, ptr = _ffi.u64(), ctypes.c_void_p()
        check("ax_export_q_reserve", self._l.ax_export_q_reserve(self.handle, qbuf, rows, ctypes.byref(row),
                                                                 ctypes.byref(ptr)))
        return row.value, ptr.value

    def step(self, req_id, pos0, tokens, index_buf, index_row, decode_step=0, q_row=0, layers=(0, 0),
             prefill=False):
        """Publish one FORWARD for len(tokens) query tokens at pos0... Returns True, or False when the ring was
        full (dropped and counted: the engine must carry on)."""
        s = ShmStep()
        s.req_id, s.n_tokens, s.pos0, s.seq_len = req_id, len(tokens), pos0, pos0 + len(tokens)
        s.index_buf, s.index_row, s.decode_step, s.q_row = index_buf, index_row, decode_step, q_row
        s.layers[0], s.layers[1] = layers
        s.flags = _ffi.STEP_F_PREFILL if prefill else 0
        arr = (ctypes.c_int32 * len(tokens))(*tokens)
        rc = self._l.ax_export_step(self.handle, ctypes.byref(s), arr)
        if rc == _NO_RETRY:
            return False
        check("ax_export_step", rc)
        return True

    def wanted(self):
        """(layers mask as one int, prefill bool), or None when no capture is attached and alive."""
        m = (_ffi.u64 * 2)()
        p = ctypes.c_int()
        if self._l.ax_export_wanted(self.handle, m, ctypes.byref(p)) <= 0:
            return None
        return m[0] | (m[1] << 64), bool(p.value)

    def heartbeat(self):
        self._l.ax_export_heartbeat(self.handle)

    def counters(self):
        """Producer counters from the header: ring_head, ring_dropped, arena_head, q_head, reqs_dropped."""
        h = self.header
        return {k: getattr(h, k) for k in ("ring_head", "ring_dropped", "arena_head", "q_head", "reqs_dropped",
                                           "consumer_pid", "consumer_tail")}


def layer_list(mask):
    """Set bits of a layer mask, ascending (the Q-row order of a step)."""
    out, l = [], 0
    while mask >> l:
        if (mask >> l) & 1:
            out.append(l)
        l += 1
    return out
