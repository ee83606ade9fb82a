/*
 * backend_cuda.h — the capture daemon's CUDA backend: the engine's GPU buffers imported for one attachment, and a
 * batch of attention jobs run together on the GPU (many requests and layers in one ax_attn_cuda_run call).
 * Internal to capture/ (capture.c is the only user).
 *
 * Jobs are queued as ax__item (pool.h) so the loop turns finished ones into records with the same code, in the
 * same order, as CPU jobs: the batch is run when the loop drains its queue (once per pump of the step ring), when
 * it is full, and before any other record is queued behind it. The items are never given to the CPU workers.
 *
 * Availability: the backend is compiled in only when the build has CUDA and the kernels (attn_cuda.h's
 * ax_attn_cuda_*; AX_CAPTURE_CUDA defined by capture/meson.build). Otherwise every call that would need it returns
 * -ENOTSUP and ax__cuda_be_why says why.
 *
 * Threads: one backend is used by the capture loop thread only.
 */
#ifndef ATTNX_CAPTURE_BACKEND_CUDA_H
#define ATTNX_CAPTURE_BACKEND_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "attnx_shm.h"
#include "pool.h"

#define AX_CUDA_BATCH_MAX 2048 /* jobs per ax_attn_cuda_run call */

typedef struct ax__cuda_be ax__cuda_be;

/* CUDA devices usable by the backend (> 0), -ENOTSUP (not in this build) or -ENODEV (no device / driver). */
int ax__cuda_be_devices(void);
/* Why the backend is unavailable (build or machine), for the error message. Never NULL. */
const char *ax__cuda_be_why(void);

/* A backend on `device` (its own CUDA context stream). Returns 0, -ENOTSUP, -ENODEV, -ENOMEM or -EIO. */
int ax__cuda_be_open(ax__cuda_be **out, int device);
/* Close (detaching first). Accepts NULL. */
void ax__cuda_be_close(ax__cuda_be *b);
int ax__cuda_be_device(const ax__cuda_be *b);

/* Start importing the CUDA buffers of attached segment `shm`; `event_buf` is the buffer-table index whose IPC
 * event the batch waits for on the GPU before each run (the Q ring's; -1 = none). Returns 0, -ENOMEM, -EINVAL. */
int ax__cuda_be_attach(ax__cuda_be *b, const ax_shm *shm, int32_t event_buf);
/* Close every imported allocation and event (the batch must be empty: run it first). Safe when not attached. */
void ax__cuda_be_detach(ax__cuda_be *b);
/* Device address of buffer `index`'s first byte (imported on first use). Returns 0 or the importer's error
 * (-ERANGE: the entry overruns its allocation; -EINVAL: a HOST entry; -ENOENT, -EIO, ...). */
int ax__cuda_be_map(ax__cuda_be *b, uint32_t index, uint64_t *dptr);
/* Entries the importer rejected, allocations opened. */
void ax__cuda_be_counts(const ax__cuda_be *b, uint64_t *rejected, uint64_t *allocations);
/* Why the last import failed. Never NULL. */
const char *ax__cuda_be_import_error(const ax__cuda_be *b);

/* The next batch slot to fill (its job's q, k and index DEVICE addresses), or NULL when the batch is full (run it
 * first). Results room is the caller's (ax__pool_item_results). */
ax__item *ax__cuda_be_reserve(ax__cuda_be *b);
/* Add the slot returned by ax__cuda_be_reserve to the batch. */
void ax__cuda_be_commit(ax__cuda_be *b);
/* Jobs waiting in the batch. */
uint32_t ax__cuda_be_pending(const ax__cuda_be *b);

/*
 * Run every queued job: wait (on the GPU) for the engine's event, one ax_attn_cuda_run, results into each item's
 * `res` and `err` (the job's own rc; -EIO for all of them when the batch failed as a whole). The batch is empty
 * afterwards; *items / *n give the jobs just run, valid until the next reserve. Returns 0, or the batch-level error
 * (-EIO, -ENOMEM) after which the context is reopened at the next run.
 */
int ax__cuda_be_run(ax__cuda_be *b, ax__item **items, uint32_t *n);
/*
 * Recovery from a sticky CUDA error (an illegal address in a kernel reading a dead engine's mapping, a launch
 * failure: every later call on the device fails until cudaDeviceReset). A batch-level -EIO from the run, or an
 * -EIO from an import, is classified through the ops' device_sticky (attnx_shm_cuda.h). Not sticky: the error is
 * cleared, the context reopened at the next run, the mappings kept. Sticky: logged, then the context, the importer
 * (every IPC / VMM mapping and event, through ax_shm_cuda_close) are released, the device is reset and probed,
 * and the backend turns `stale`: the capture still holds device addresses of the closed mappings (its Q ring and
 * K pool bases), so from then on every run fails its jobs with -EIO without touching the GPU, every map answers
 * -EIO, and ax__cuda_be_lost tells the capture to leave the attachment and attach afresh (a fresh importer: the
 * engine may have restarted meanwhile). A device that fails its probe after the reset stays `broken`: on real
 * hardware (an H200, driver 580, CUDA 13) the reset never brings it back in the same process, as the CUDA
 * documentation warns, so ax__cuda_be_need_new_process says 1 and the daemon re-executes itself (main.c; the
 * capture returns AX_CAPTURE_REEXEC). A user that cannot (the library in a test thread, a failed exec) keeps the
 * retries from ax__cuda_be_lost with a backoff (none for the first reset of a streak, then 100 ms doubling to
 * 30 s; the streak ends with a good batch). Nothing exits, nothing spins.
 *
 * Why one reset before a re-exec: the release and the reset are needed anyway (a re-exec should not leave IPC
 * mappings of the engine's memory open any longer than it must), they cost milliseconds, and a driver whose reset
 * does recover keeps the process, its records' seq numbering and its warm context.
 */
typedef struct ax__cuda_be_recovery {
	uint64_t sticky;       /* sticky errors (each followed by a release and a reset) */
	uint64_t transient;    /* -EIO errors that cleared (context reopened, mappings kept) */
	uint64_t resets;       /* device resets made */
	uint64_t reset_failed; /* resets after which the device still failed its probe */
	uint64_t lost_jobs;    /* jobs failed by a batch-level error or dropped while recovering */
	uint64_t reattaches;   /* times ax__cuda_be_lost asked the capture to attach afresh */
	uint64_t faults;       /* test-only faults injected (ATTNX_CUDA_FAULT_AFTER, below) */
} ax__cuda_be_recovery;
void ax__cuda_be_recovery_get(const ax__cuda_be *b, ax__cuda_be_recovery *out);
/* 1 when the capture must leave its attachment now (its device addresses died with a reset) and attach afresh;
 * 0 otherwise. Retries a broken device's reset when its backoff has passed. Call it periodically (the capture:
 * with its engine liveness check). NULL → 0. */
int ax__cuda_be_lost(ax__cuda_be *b, uint64_t now_ns);

/* 1 when the device failed its probe after a reset: only a new process gets a working device (the daemon
 * re-executes itself). 0 otherwise, NULL → 0. */
int ax__cuda_be_need_new_process(const ax__cuda_be *b);

/*
 * Test-only fault injection, read from the environment at ax__cuda_be_open: ATTNX_CUDA_FAULT_AFTER=N makes the
 * batch after N good ones fault instead of running (ax_cuda_recovery_ops.inject_fault: on a GPU, a kernel storing
 * to address 0x10, cudaErrorIllegalAddress, sticky), once per process image, and only in the first
 * ATTNX_CUDA_FAULT_IMAGES images (default 1) counted by ATTNX_CAPTURE_REEXEC below, so a re-executed daemon does
 * not fault again unless asked to. Logged as a warning when armed. Unset: nothing changes.
 */
#define AX_CUDA_FAULT_ENV "ATTNX_CUDA_FAULT_AFTER"
#define AX_CUDA_FAULT_IMAGES_ENV "ATTNX_CUDA_FAULT_IMAGES"

/*
 * Re-execution bookkeeping (both builds; main.c uses it, the backend reads the count for the fault injection).
 * The environment variable carries, into the new image, "<count> <window_s> <in_window>": re-execs of this daemon
 * so far, the start (CLOCK_MONOTONIC seconds, which survive exec) of the current one-minute window and re-execs in
 * that window. The first AX_REEXEC_FREE re-execs of a window go at once; each later one waits 1 s doubling to
 * 60 s, so a device that faults at every start costs a few re-execs a minute, never a spin.
 */
#define AX_REEXEC_ENV "ATTNX_CAPTURE_REEXEC"
#define AX_REEXEC_FREE 3
typedef struct ax__cuda_be_reexec {
	uint32_t count;     /* re-execs so far (0: the first image) */
	uint64_t window_s;  /* start of the current window, CLOCK_MONOTONIC seconds */
	uint32_t in_window; /* re-execs in that window */
} ax__cuda_be_reexec;
/* Parse the variable's value (NULL or "" → all zero). Returns 0, or -EINVAL for anything else than three decimal
 * numbers (*out zeroed: a garbled value counts as a first image). Pure. */
int ax__cuda_be_reexec_parse(const char *env, ax__cuda_be_reexec *out);
/* Account one more re-exec at `now_s` (a new window when the current one is a minute old) and return the delay
 * before it in milliseconds (0 for the first AX_REEXEC_FREE of a window, then 1000 << (n - FREE - 1), at most
 * 60000). Pure. */
uint64_t ax__cuda_be_reexec_next(ax__cuda_be_reexec *r, uint64_t now_s);
/* Write the value for the next image into buf. Returns the length, or -ENOSPC when it does not fit. Pure. */
int ax__cuda_be_reexec_format(const ax__cuda_be_reexec *r, char *buf, size_t n);

/* Nanoseconds spent in runs, runs made. */
uint64_t ax__cuda_be_busy_ns(const ax__cuda_be *b);
/* Text of the last batch-level CUDA error. Never NULL. */
const char *ax__cuda_be_strerror(const ax__cuda_be *b);

#endif
