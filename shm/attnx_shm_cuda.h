/*
 * attnx_shm_cuda.h — CUDA buffers in the shm protocol (DESIGN §2): how buffer-table entries of location
 * AX_LOC_CUDA_IPC and AX_LOC_CUDA_VMM are filled by an engine and opened by a capture.
 *
 * Three layers, so that everything except the CUDA calls themselves is plain C and unit-tested without a GPU:
 *   1. Entry helpers (cuda_handle.c, plain C): IPC handle bytes (raw, or PyTorch's versioned shareable handle),
 *      the optional IPC event handle an entry carries, VMM allocation ids, extent checks.
 *   2. VMM fd passing (vmm_fd.c, plain C): a small server thread the engine starts on a Unix socket
 *      (SOCK_SEQPACKET), answering "allocation id → POSIX fd (SCM_RIGHTS) + size + event handle"; the capture's
 *      client call. Peers of another uid are refused.
 *   3. The capture-side importer (cuda_import.c, plain C over an ax_cuda_ops table) that maps each entry once,
 *      shares one mapping between entries of the same allocation, validates extents before handing out a device
 *      address, counts rejected entries and unmaps everything on close. The real ops (cuda_ops.c, CUDA runtime +
 *      driver API) exist only in CUDA builds (ax_cuda_ops_real); tests drive the importer through fake ops.
 *
 * Entry conventions (documented in shm/README.md, "CUDA entries"):
 *   CUDA_IPC: handle[0..63] = cudaIpcMemHandle_t of the BASE allocation, offset = byte offset of the tensor in it,
 *             bytes = bytes reachable from offset, device = the engine's ordinal (informational: the capture opens
 *             on its own --device). vmm_socket[0..63] = an optional cudaIpcEventHandle_t (all zero = none), an
 *             interprocess event the engine records after each step's K and Q writes.
 *   CUDA_VMM: handle[0..7] = allocation id (native-endian uint64), vmm_socket = the server's socket path. The
 *             server's reply carries the fd, the allocation size and an optional event handle.
 *
 * Thread-safety: the entry helpers are pure; a server is safe to use from any thread; an importer belongs to one
 * thread (the capture loop).
 */
#ifndef ATTNX_SHM_CUDA_H
#define ATTNX_SHM_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "attnx_shm.h"

#ifdef __cplusplus
extern "C" {
#endif

#define AX_CUDA_IPC_HANDLE_SIZE 64 /* sizeof(cudaIpcMemHandle_t) and sizeof(cudaIpcEventHandle_t) */

/* ----------------------------------------------------------------------------------------------------------
 * 1. Entry helpers (plain C, pure).
 */

/*
 * Turn handle bytes as an engine has them into a raw cudaIpcMemHandle_t (out, 64 bytes).
 * Accepted: 64 bytes (a raw handle; also what torch ≤ 2.0 shares), or PyTorch's shareable handle (torch ≥ 2.1,
 * `storage._share_cuda_()[1]`): 66 bytes = version byte (1, 2 or 3) + type byte 'c' (a cudaMalloc block) + the
 * raw handle. Detection is by length and the two prefix bytes only. Type 'e' (expandable segments, whose payload
 * is a list of VMM handles) returns -ENOTSUP; any other length or prefix -EINVAL.
 */
int ax_cuda_ipc_handle_parse(const void *bytes, size_t len, uint8_t out[AX_CUDA_IPC_HANDLE_SIZE]);

/* Fill a CUDA_IPC entry's location fields: loc, device, handle (via ax_cuda_ipc_handle_parse), offset, bytes.
 * Kind, dtype and shape are the caller's. Returns 0 or the parse error. */
int ax_cuda_entry_set_ipc(ax_shm_buffer *b, int device, const void *handle, size_t handle_len, uint64_t offset,
			  uint64_t bytes);

/* Store (ev64 != NULL) or clear (NULL) the IPC event handle of a CUDA_IPC entry. -EINVAL for another loc. */
int ax_cuda_entry_set_event(ax_shm_buffer *b, const void *ev64);
/* Copy a CUDA_IPC entry's event handle: 1 (out filled), 0 (none: all zero), -EINVAL (not a CUDA_IPC entry). */
int ax_cuda_entry_event(const ax_shm_buffer *b, uint8_t out[AX_CUDA_IPC_HANDLE_SIZE]);

/* Fill a CUDA_VMM entry's location fields. Returns 0, or -ENAMETOOLONG / -EINVAL (empty socket path). */
int ax_cuda_entry_set_vmm(ax_shm_buffer *b, int device, uint64_t alloc_id, const char *socket_path,
			  uint64_t offset, uint64_t bytes);
/* The allocation id of a CUDA_VMM entry. */
uint64_t ax_cuda_entry_vmm_id(const ax_shm_buffer *b);

/* Does [offset, offset + bytes) of the entry lie inside an allocation of alloc_bytes? 0 or -ERANGE (also on
 * overflow or bytes == 0). */
int ax_cuda_check_extent(const ax_shm_buffer *b, uint64_t alloc_bytes);

/* ----------------------------------------------------------------------------------------------------------
 * 2. VMM fd passing (plain C). Wire format, one datagram each way on a SOCK_SEQPACKET Unix socket:
 *    client → server: ax_vmm_request; server → client: ax_vmm_reply, with exactly one fd (SCM_RIGHTS) when
 *    status == 0 and none otherwise. The server closes the connection after one reply.
 */
#define AX_VMM_MAGIC 0x4d565841u /* "AXVM" little-endian */
#define AX_VMM_VERSION 1u

typedef struct ax_vmm_request {
	uint32_t magic;   /* AX_VMM_MAGIC */
	uint32_t version; /* AX_VMM_VERSION */
	uint64_t id;      /* allocation id (the entry's handle[0..7]) */
} ax_vmm_request;     /* 16 bytes */

typedef struct ax_vmm_reply {
	uint32_t magic;   /* AX_VMM_MAGIC */
	int32_t status;   /* 0, or a negative errno (-ENOENT: unknown id; -EPROTO: bad request) */
	uint64_t id;      /* the id asked for */
	uint64_t size;    /* allocation size in bytes (status 0) */
	int32_t device;   /* device ordinal of the allocation in the engine */
	uint32_t flags;   /* bit 0: `event` holds a cudaIpcEventHandle_t */
	uint8_t event[AX_CUDA_IPC_HANDLE_SIZE]; /* optional interprocess event recorded after each step */
} ax_vmm_reply;       /* 96 bytes */

enum { AX_VMM_F_EVENT = 1u << 0 };

/* Check a request datagram of `len` bytes (what the server does with every datagram it receives): exact size,
 * magic, version. Returns 0 and sets *id, or -EPROTO. Pure. */
int ax_vmm_request_check(const void *buf, size_t len, uint64_t *id);

/* Check a reply datagram of `len` bytes that arrived with `nfds` descriptors for request `id`: size, magic, id,
 * status (returned when negative), one fd exactly when status is 0, size > 0, known flags.
 * Returns 0, the reply's negative status, or -EPROTO. Pure. */
int ax_vmm_reply_check(const ax_vmm_reply *r, size_t len, uint64_t id, int nfds);

typedef struct ax_vmm_server ax_vmm_server;

/*
 * Engine side: bind `path` (a stale socket file there is replaced; mode 0600), listen, and serve requests on a
 * thread of its own. Returns 0, -ENAMETOOLONG, -EADDRINUSE (a live server answers there), or a negative errno
 * from socket/bind/listen/pthread_create. One request per connection; a peer that sends nothing within 1 s, sends
 * garbage, or dies is dropped without affecting others.
 */
int ax_vmm_server_start(ax_vmm_server **out, const char *path);
/* Offer allocation `id`: the server keeps a dup() of `fd` (the caller keeps its own), its size, device and an
 * optional event handle (NULL = none). Returns 0, -EEXIST (id taken), -EINVAL (fd < 0, size 0), -ENOMEM, or
 * -errno from dup. Thread-safe. */
int ax_vmm_server_add(ax_vmm_server *s, uint64_t id, int fd, uint64_t size, int device, const void *event64);
/* Withdraw `id` (closes the server's dup). Returns 0 or -ENOENT. Thread-safe. */
int ax_vmm_server_remove(ax_vmm_server *s, uint64_t id);
/* Requests answered with an fd, and requests refused (bad, unknown id, foreign uid). Thread-safe. */
void ax_vmm_server_counts(ax_vmm_server *s, uint64_t *served, uint64_t *refused);
/* Stop the thread, close every fd, unlink the socket. Accepts NULL. */
void ax_vmm_server_stop(ax_vmm_server *s);

/*
 * Capture side: ask the server at `path` for allocation `id`. On success *fd is a new descriptor (close-on-exec;
 * the caller closes it) and *info the reply. Returns 0, -ENOENT (no server there, or unknown id), -ETIMEDOUT,
 * -EPROTO (malformed or truncated reply, wrong fd count: any fd received is closed), -ENAMETOOLONG, or -errno.
 * Thread-safe.
 */
int ax_vmm_fetch(const char *path, uint64_t id, uint32_t timeout_ms, int *fd, ax_vmm_reply *info);

/* ----------------------------------------------------------------------------------------------------------
 * 3. Capture-side importer.
 */

/* The CUDA calls the importer needs. Each returns 0 or a negative errno (-EIO for a CUDA error, -ENODEV). */
typedef struct ax_cuda_ops {
	void *ctx;
	/* Open an IPC memory handle on `device`: *base = the allocation's base address, *size = its size. */
	int (*ipc_open)(void *ctx, int device, const uint8_t handle[AX_CUDA_IPC_HANDLE_SIZE], uint64_t *base,
			uint64_t *size);
	void (*ipc_close)(void *ctx, int device, uint64_t base);
	/* Import a VMM fd (not consumed: the caller closes it), reserve `size` bytes of address space, map the whole
	 * allocation and grant read access on `device`. */
	int (*vmm_map)(void *ctx, int device, int fd, uint64_t size, uint64_t *base);
	void (*vmm_unmap)(void *ctx, int device, uint64_t base, uint64_t size);
	/* Open an IPC event handle: *event is a cudaEvent_t. */
	int (*event_open)(void *ctx, int device, const uint8_t handle[AX_CUDA_IPC_HANDLE_SIZE], void **event);
	void (*event_close)(void *ctx, int device, void *event);
	/* Text of the last failure (never NULL). */
	const char *(*last_error)(void *ctx);
} ax_cuda_ops;

/* The CUDA runtime/driver implementation; NULL in a build without CUDA (AX_HAVE_CUDA 0). Defined in cuda_ops.c,
 * which is linked only into CUDA builds (shm_cudart_dep). */
const ax_cuda_ops *ax_cuda_ops_real(void);

/* Recovery from a failed CUDA call (the capture's backend; a table of its own so ax_cuda_ops stays as it was).
 * device_sticky: after a call on `device` failed, clear the error if it can be cleared (cudaGetLastError) and
 * probe the context (cudaDeviceSynchronize, cudaPeekAtLastError): 0 = the error is gone (the context, mappings
 * and events are still good), 1 = sticky (every later call fails until cudaDeviceReset: the caller must close
 * everything it opened on the device first), negative errno = the device cannot be queried (treat as sticky).
 * device_reset: cudaDeviceReset of `device` — call it only after closing every context, mapping and event this
 * process opened there, since the reset invalidates them all — then a probe: 0 = usable again, -EIO / -ENODEV =
 * still broken (try again later; per the CUDA documentation a sticky error may need a new process, and on an
 * H200 with driver 580 / CUDA 13 the probe after the reset does fail: the capture then re-executes itself).
 * last_error: text of the last failure (never NULL).
 * inject_fault (tests only; may be NULL): break `device` the way a kernel reading a dead engine's mapping does —
 * the real one launches a one-thread kernel (PTX, loaded through the driver API, so no nvcc-built code is needed
 * here) that stores to address 0x10, and waits for it: cudaErrorIllegalAddress, sticky. Returns -EIO with the
 * fault's text in last_error (the expected outcome), -ENODEV, or -EIO "did not fault" if the store went through. */
typedef struct ax_cuda_recovery_ops {
	void *ctx;
	int (*device_sticky)(void *ctx, int device);
	int (*device_reset)(void *ctx, int device);
	const char *(*last_error)(void *ctx);
	int (*inject_fault)(void *ctx, int device);
} ax_cuda_recovery_ops;
/* The CUDA runtime implementation (cuda_ops.c, CUDA builds only). */
const ax_cuda_recovery_ops *ax_cuda_recovery_real(void);

typedef struct ax_shm_cuda ax_shm_cuda;

/* An importer for the CUDA entries of attached segment `shm`, opening them on `device` through `ops`. Nothing is
 * opened yet. The importer must be closed before `shm` is detached. Returns 0, -EINVAL or -ENOMEM. */
int ax_shm_cuda_open(ax_shm_cuda **out, const ax_shm *shm, int device, const ax_cuda_ops *ops);

/*
 * The device address of buffer `index`'s first byte (base + offset), opening its allocation on first use (IPC:
 * once per distinct handle; VMM: once per socket + id, the fd fetched from the engine's server and closed after
 * the import). The extent [offset, offset + bytes) is checked against the allocation's real size first; an entry
 * that fails (bad extent, unopenable handle, dead server) is rejected, counted once, remembered and never read.
 * Returns 0, -ENOENT (no such valid entry), -EINVAL (a HOST entry), -ERANGE (extent), or the open's error.
 */
int ax_shm_cuda_map(ax_shm_cuda *c, uint32_t index, uint64_t *dptr);

/* The IPC event of buffer `index` (opened on first use; *event a cudaEvent_t). Returns 1, 0 (the entry carries
 * none) or a negative errno (the entry itself is unusable, or the event would not open). */
int ax_shm_cuda_event(ax_shm_cuda *c, uint32_t index, void **event);

typedef struct ax_shm_cuda_stats {
	uint64_t allocations; /* distinct allocations opened */
	uint64_t entries;     /* entries mapped */
	uint64_t rejected;    /* entries rejected (counted once each) */
	uint64_t events;      /* events opened */
} ax_shm_cuda_stats;
void ax_shm_cuda_get_stats(const ax_shm_cuda *c, ax_shm_cuda_stats *out);
/* Why the last open failed (the ops' text), for logs. Never NULL. */
const char *ax_shm_cuda_last_error(const ax_shm_cuda *c);

/* Close every event and allocation this importer opened (in reverse order), free it. Accepts NULL. */
void ax_shm_cuda_close(ax_shm_cuda *c);

/* ----------------------------------------------------------------------------------------------------------
 * 4. Engine-side CUDA helpers (cuda_ops.c; CUDA builds only, in libattnx-export-cuda).
 */

/* Fill a CUDA_IPC entry for `bytes` bytes of cudaMalloc'ed memory at device address `dptr`: the base allocation
 * (cuMemGetAddressRange), its IPC handle, offset = dptr - base, the pointer's device. Returns 0, -EINVAL (not
 * device memory / VMM memory, which has no IPC handle: use ax_cuda_entry_set_vmm), -ERANGE (bytes past the
 * allocation) or -EIO. */
int ax_cuda_fill_ipc(ax_shm_buffer *b, const void *dptr, uint64_t bytes);
/* The IPC handle of `event` (a cudaEvent_t created with cudaEventInterprocess | cudaEventDisableTiming).
 * Returns 0 or -EIO. */
int ax_cuda_event_handle(void *event, uint8_t out[AX_CUDA_IPC_HANDLE_SIZE]);

#ifdef __cplusplus
}
#endif
#endif
