"""Capture side of the segment from Python (ax_shm_*): for tests, diagnostics and reference consumers. The real
consumer is attnx-capture; this wrapper exists so a test can look at exactly what an engine published, through
the same validating C code the capture uses."""
import ctypes

from . import _ffi
from ._ffi import ShmRequest, ShmStep, check


class Attached:
    def __init__(self, name=_ffi.DEFAULT_NAME):
        self._l = _ffi.lib()
        h = ctypes.c_void_p()
        check("ax_shm_attach", self._l.ax_shm_attach(ctypes.byref(h), name.encode()))
        self._h = h
        self.snapshot = self._l.ax_shm_snapshot(h).contents

    def close(self):
        if self._h:
            self._l.ax_shm_detach(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_wanted(self, mask, prefill=False):
        m = (_ffi.u64 * 2)(mask & (2 ** 64 - 1), mask >> 64)
        self._l.ax_shm_set_wanted(self._h, m, 1 if prefill else 0)

    def next(self):
        """(descriptor or None, lost count); raises AttnxError for a rejected (-EBADMSG) or stale segment."""
        s, lost = ShmStep(), _ffi.u64()
        rc = self._l.ax_shm_next(self._h, ctypes.byref(s), ctypes.byref(lost))
        check("ax_shm_next", rc)
        return (s if rc == 1 else None), lost.value

    def tokens(self, pos, n):
        out = (ctypes.c_int32 * max(1, n))()
        check("ax_shm_read_tokens", self._l.ax_shm_read_tokens(self._h, pos, n, out))
        return list(out[:n])

    def request(self, slot, req_id):
        r = ShmRequest()
        check("ax_shm_read_request", self._l.ax_shm_read_request(self._h, slot, req_id, ctypes.byref(r)))
        return r

    def buffers(self):
        n = _ffi.u32()
        p = self._l.ax_shm_buffers(self._h, ctypes.byref(n))
        return [p[i] for i in range(n.value)]

    def stats(self):
        s = _ffi.ShmStats()
        self._l.ax_shm_get_stats(self._h, ctypes.byref(s))
        return {k: getattr(s, k) for k in ("taken", "rejected", "torn", "lost")}
