"""torch CUDA tensors as buffer-table entries (CUDA IPC), and a view of a consumer's imported buffers.

register(exporter, tensor, kind, ...) describes `tensor` (shape and strides in elements, as torch reports them)
and fills the entry's location from the tensor's BASE allocation: torch's `storage._share_cuda_()` gives the
allocation's IPC handle (raw 64 bytes, or torch ≥ 2.1's prefixed form, parsed by libattnx-export-cuda's
ax_cuda_entry_set_ipc) and the storage's byte offset in it; the tensor's own storage offset is added. Where torch
cannot share the storage (expandable segments: VMM memory), ax_cuda_fill_ipc is tried on the raw pointer, and
otherwise the error is raised: VMM export through attnx's fd server is not wired to torch here (see README).

Needs torch and libattnx-export-cuda.so (a CUDA build of attnx).
"""
import ctypes

from . import _ffi
from .export import make_buffer

_clib = None

TORCH_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float8_e4m3fn": "fp8_e4m3",
                "float8_e5m2": "fp8_e5m2", "int32": "i32", "int64": "i64"}


def clib():
    global _clib
    if _clib is None:
        _ffi.lib()
        l = ctypes.CDLL(_ffi.find_library("libattnx-export-cuda.so"))
        P = ctypes.POINTER
        l.ax_cuda_entry_set_ipc.restype = ctypes.c_int
        l.ax_cuda_entry_set_ipc.argtypes = [P(_ffi.ShmBuffer), ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t,
                                            ctypes.c_uint64, ctypes.c_uint64]
        l.ax_cuda_fill_ipc.restype = ctypes.c_int
        l.ax_cuda_fill_ipc.argtypes = [P(_ffi.ShmBuffer), ctypes.c_void_p, ctypes.c_uint64]
        _clib = l
    return _clib


def dtype_name(t):
    name = str(t.dtype).replace("torch.", "")
    if name not in TORCH_DTYPES:
        raise TypeError("attnx: no attnx dtype for %s (pass dtype=, e.g. for fp8 stored as uint8)" % t.dtype)
    return TORCH_DTYPES[name]


def extent_bytes(shape, strides, esize):
    """Bytes spanned by a strided view from its first element."""
    return (sum((n - 1) * s for n, s in zip(shape, strides)) + 1) * esize


def describe(t, kind, layer=-1, dtype=None, shape=None, strides=None, scale=1.0):
    """The entry for tensor t (shape/strides default to the tensor's) with its CUDA IPC location filled."""
    shape = tuple(shape if shape is not None else t.shape)
    strides = tuple(strides if strides is not None else t.stride())
    dt = dtype or dtype_name(t)
    esize = _ffi.DTYPE_SIZE[_ffi.DTYPES[dt]]
    if esize != t.element_size():
        raise TypeError("attnx: dtype %s is %d bytes, the tensor's elements %d" % (dt, esize, t.element_size()))
    desc = make_buffer(kind, dt, shape, layer=layer, strides=strides, scale=scale, loc=_ffi.LOC_CUDA_IPC)
    nbytes = extent_bytes(shape, strides, esize)
    desc.bytes = nbytes
    l = clib()
    storage = t.untyped_storage()
    try:
        info = storage._share_cuda_()
        device, handle, _size, storage_off = info[0], info[1], info[2], info[3]
        off = storage_off + t.storage_offset() * t.element_size()
        rc = l.ax_cuda_entry_set_ipc(ctypes.byref(desc), device, bytes(handle), len(handle), off, nbytes)
    except (RuntimeError, AttributeError):
        rc = l.ax_cuda_fill_ipc(ctypes.byref(desc), ctypes.c_void_p(t.data_ptr()), nbytes)
    _ffi.check("CUDA IPC entry for a %s tensor" % (tuple(t.shape),), rc)
    return desc


def register(exporter, t, kind, **kw):
    """Add tensor t to exporter's buffer table as a CUDA IPC entry; returns its index. The tensor must stay
    allocated (at the same address) while the segment is open."""
    return exporter.add_device_buffer(describe(t, kind, **kw))


class DeviceArray:
    """A raw device address as something torch.as_tensor accepts (__cuda_array_interface__ v2)."""

    TYPESTR = {"f32": "<f4", "f16": "<f2", "bf16": "<i2", "i32": "<i4", "i64": "<i8", "fp8_e4m3": "|u1",
               "fp8_e5m2": "|u1"}

    def __init__(self, ptr, shape, strides_elems, dtype):
        esize = _ffi.DTYPE_SIZE[_ffi.DTYPES[dtype]]
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": self.TYPESTR[dtype],
                                         "data": (ptr, False), "version": 2,
                                         "strides": tuple(s * esize for s in strides_elems)}
