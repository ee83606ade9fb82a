"""ctypes mirror of attnx_shm.h (the wire structs, the export API and the attach API) and the library loader.

Struct layouts are checked against the C sizes (512/256/160/128 bytes) at import, so a header change that is not
mirrored here fails loudly instead of corrupting a segment. Standard library only: no torch needed here.
"""
import ctypes
import ctypes.util
import os

u8, u32, i32, u64, f32 = ctypes.c_uint8, ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64, ctypes.c_float

SHM_RID_MAX = 96
DEFAULT_NAME = "/attnx.engine"

DTYPES = {"f32": 1, "f16": 2, "bf16": 3, "fp8_e4m3": 4, "fp8_e5m2": 5, "i32": 6, "i64": 7}
DTYPE_SIZE = {1: 4, 2: 2, 3: 2, 4: 1, 5: 1, 6: 4, 7: 8}
BUF_K_POOL, BUF_Q_RING, BUF_INDEX_TOKEN, BUF_INDEX_PAGED = 1, 2, 3, 4
LOC_HOST, LOC_CUDA_IPC, LOC_CUDA_VMM = 1, 2, 3
STEP_BEGIN, STEP_FORWARD, STEP_END = 1, 2, 3
STEP_F_PREFILL = 1
END_REASONS = {"stop": 1, "length": 2, "abort": 3, "error": 4}
FEAT_WAKE, FEAT_RECYCLE = 1 << 0, 1 << 1  # ax_shm_header.features (AX_SHM_FEAT_*)


class ShmBuffer(ctypes.Structure):
    _fields_ = [("kind", u32), ("loc", u32), ("dtype", u32), ("layer", i32), ("ndim", u32), ("device", i32),
                ("dim", u64 * 4), ("stride", u64 * 4), ("offset", u64), ("bytes", u64), ("scale", f32),
                ("pad0", u32), ("handle", u8 * 64), ("vmm_socket", ctypes.c_char * 64), ("reserved", u8 * 16)]


class ShmRequest(ctypes.Structure):
    _fields_ = [("state", u32), ("prompt_len", u32), ("req_id", u64), ("prompt_pos", u64), ("begin_ns", u64),
                ("rid", ctypes.c_char * SHM_RID_MAX), ("freed_step", u64), ("reserved", u8 * 24)]


class ShmStep(ctypes.Structure):
    _fields_ = [("seq", u64), ("kind", u32), ("flags", u32), ("req_id", u64), ("req_slot", u32), ("n_tokens", u32),
                ("pos0", u64), ("seq_len", u64), ("index_row", u32), ("decode_step", u32), ("q_row", u64),
                ("layers", u64 * 2), ("tok_pos", u64), ("end_reason", u32), ("index_buf", u32), ("t_ns", u64),
                ("reserved", u8 * 24)]


class ShmHeader(ctypes.Structure):
    _fields_ = [("magic", u64), ("version", u32), ("header_size", u32), ("segment_size", u64), ("generation", u64),
                ("engine_pid", u32), ("rank", u32), ("world_size", u32), ("state", u32),
                ("engine", ctypes.c_char * 32), ("model", ctypes.c_char * 96),
                ("n_layers", u32), ("n_q_heads", u32), ("n_kv_heads", u32), ("head_offset", u32),
                ("n_q_heads_total", u32), ("head_dim", u32), ("q_dtype", u32), ("k_dtype", u32), ("scale", f32),
                ("logit_cap", f32), ("window", i32), ("max_ctx", u32),
                ("buf_off", u64), ("buf_cap", u32), ("buf_count", u32), ("req_off", u64), ("req_cap", u32),
                ("ring_cap", u32), ("ring_off", u64), ("arena_off", u64), ("arena_cap", u64), ("data_off", u64),
                ("data_size", u64), ("ring_head", u64), ("ring_dropped", u64), ("arena_head", u64), ("q_head", u64),
                ("heartbeat_ns", u64), ("data_used", u64), ("next_req_id", u64), ("reqs_dropped", u64),
                ("consumer_tail", u64), ("consumer_pid", u64), ("consumer_heartbeat_ns", u64),
                ("want_layers", u64 * 2), ("want_prefill", u32), ("reserved_u32", u32),
                ("consumer_wait", u32), ("features", u32), ("steps_started", u64), ("consumer_done", u64),
                ("consumer_features", u32), ("reserved_u32b", u32), ("reserved", u8 * 72)]


class ExportConfig(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("engine", ctypes.c_char_p), ("model", ctypes.c_char_p),
                ("rank", u32), ("world_size", u32), ("n_layers", u32), ("n_q_heads", u32), ("n_kv_heads", u32),
                ("head_offset", u32), ("n_q_heads_total", u32), ("head_dim", u32), ("q_dtype", u32),
                ("k_dtype", u32), ("scale", f32), ("logit_cap", f32), ("window", i32), ("max_ctx", u32),
                ("buf_cap", u32), ("req_cap", u32), ("ring_cap", u32), ("arena_cap", u64), ("data_size", u64)]


class ShmStats(ctypes.Structure):
    _fields_ = [("taken", u64), ("rejected", u64), ("torn", u64), ("lost", u64)]


for _s, _n in ((ShmBuffer, 256), (ShmRequest, 160), (ShmStep, 128), (ShmHeader, 512)):
    if ctypes.sizeof(_s) != _n:  # pragma: no cover - a mirror out of date
        raise ImportError("attnx: %s is %d bytes, attnx_shm.h says %d" % (_s.__name__, ctypes.sizeof(_s), _n))
for _s, _f, _o in ((ShmHeader, "features", 412), (ShmHeader, "steps_started", 416), (ShmRequest, "freed_step", 128)):
    if getattr(_s, _f).offset != _o:  # pragma: no cover - the rule-9 words as shm/README.md places them
        raise ImportError("attnx: %s.%s at %d, attnx_shm.h says %d" % (_s.__name__, _f, getattr(_s, _f).offset, _o))

P, VP, I, U32, U64, F = ctypes.POINTER, ctypes.c_void_p, ctypes.c_int, u32, u64, f32

_PROTOS = {
    "ax_export_open": (I, [P(VP), P(ExportConfig)]),
    "ax_export_close": (None, [VP]),
    "ax_export_header": (P(ShmHeader), [VP]),
    "ax_export_add_host_buffer": (I, [VP, P(ShmBuffer), P(VP), P(U32)]),
    "ax_export_add_device_buffer": (I, [VP, P(ShmBuffer), P(U32)]),
    "ax_export_request_begin": (I, [VP, ctypes.c_char_p, P(i32), U32, P(U64)]),
    "ax_export_request_end": (I, [VP, U64, U32]),
    "ax_export_q_reserve": (I, [VP, U32, U32, P(U64), P(VP)]),
    "ax_export_step": (I, [VP, P(ShmStep), P(i32)]),
    "ax_export_wanted": (I, [VP, P(U64), P(I)]),
    "ax_export_heartbeat": (None, [VP]),
    "ax_shm_attach": (I, [P(VP), ctypes.c_char_p]),
    "ax_shm_detach": (None, [VP]),
    "ax_shm_snapshot": (P(ShmHeader), [VP]),
    "ax_shm_hdr": (P(ShmHeader), [VP]),
    "ax_shm_buffers": (P(ShmBuffer), [VP, P(U32)]),
    "ax_shm_host_ptr": (VP, [VP, U32]),
    "ax_shm_set_wanted": (None, [VP, P(U64), I]),
    "ax_shm_next": (I, [VP, P(ShmStep), P(U64)]),
    "ax_shm_read_tokens": (I, [VP, U64, U32, P(i32)]),
    "ax_shm_read_request": (I, [VP, U32, U64, P(ShmRequest)]),
    "ax_shm_check_q": (I, [VP, U64, U64, U64]),
    "ax_shm_get_stats": (None, [VP, P(ShmStats)]),
    "ax_strerror": (ctypes.c_char_p, [I]),
    "ax_export_add_block_table": (I, [VP, U64, U64, U32, P(P(i32)), P(U32)]),
    "ax_shm_block_table_desc": (I, [P(ShmBuffer), U64, U64, U32]),
    "ax_shm_paged_kpool_desc": (I, [P(ShmBuffer), i32, U32, U64, U32, U32, U32]),
    "ax_shm_block_size": (U32, [P(ShmBuffer)]),
}

_lib = None


def _candidates(name):
    env = os.environ.get("ATTNX_LIB_DIR")
    if env:
        yield os.path.join(env, name)
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(here, "..", "..", ".."))
    for d in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if d.startswith("build"):
            yield os.path.join(root, d, "shm", name)
    found = ctypes.util.find_library(name[3:].split(".so")[0])
    if found:
        yield found


def find_library(name):
    """Path of `name` (libattnx-export.so, ...): $ATTNX_LIB_DIR, then build*/shm/ of this checkout, then the
    system's library path. Raises OSError when none exists."""
    for c in _candidates(name):
        if os.path.exists(c) or not os.path.isabs(c):
            return c
    raise OSError("attnx: %s not found (build it with meson, or set ATTNX_LIB_DIR)" % name)


def lib():
    """The loaded libattnx-export (loaded once, RTLD_GLOBAL so libattnx-export-graph resolves against it)."""
    global _lib
    if _lib is None:
        path = os.environ.get("ATTNX_EXPORT_LIB") or find_library("libattnx-export.so")
        l = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        for fn, (res, args) in _PROTOS.items():
            f = getattr(l, fn)
            f.restype, f.argtypes = res, args
        _lib = l
    return _lib


def strerror(rc):
    return lib().ax_strerror(rc).decode("utf-8", "replace")


class AttnxError(OSError):
    """A libattnx-export call failed; .errno is the positive errno, .func the C function."""

    def __init__(self, func, rc):
        super().__init__(-rc, "%s: %s" % (func, strerror(rc)))
        self.func = func


def check(func, rc):
    if rc < 0:
        raise AttnxError(func, rc)
    return rc
