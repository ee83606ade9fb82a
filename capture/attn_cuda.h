/*
 * attn_cuda.h — the capture's CUDA compute backend: the same jobs and results as attn.h's CPU backend, run on a
 * GPU in batches (many requests, layers and modes in one call), with results identical to ax_attn_cpu (top-k
 * sets equal, ties by lower position; logits and logsumexp within 1e-3 of the float64 reference: fp32
 * accumulation). Internal to capture/ (the daemon and its tests). Compiled only where nvcc exists
 * (AX_HAVE_CUDA); a build without CUDA has no --backend cuda.
 *
 * Memory: in jobs given to ax_attn_cuda_run, `q`, `k` and `index` are DEVICE pointers valid on the context's
 * device (the caller owns them: typically imported CUDA IPC / VMM allocations of the engine); `heads` is a host
 * array. The context owns its stream, its device scratch (bounded: grown to the largest batch seen, at most
 * AX_ATTN_CUDA_MAX_SCRATCH bytes) and its pinned host staging; nothing else is allocated per call once warm.
 *
 * Threads: one context is used by one thread at a time. Contexts on the same device are independent.
 */
#ifndef ATTNX_CAPTURE_ATTN_CUDA_H
#define ATTNX_CAPTURE_ATTN_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "attn.h"

#ifdef __cplusplus
extern "C" {
#endif

#define AX_ATTN_CUDA_MAX_SCRATCH ((size_t)1 << 30) /* device scratch cap per context */

typedef struct ax_attn_cuda ax_attn_cuda;

/* Number of CUDA devices usable here (> 0), or -ENODEV (no device or no driver). Never aborts. */
int ax_attn_cuda_devices(void);

/* Create a context on `device` (its own non-blocking stream). Returns 0, -ENODEV, -ENOMEM or -EIO (a CUDA error;
 * ax_attn_cuda_strerror(NULL) tells which). */
int ax_attn_cuda_open(ax_attn_cuda **out, int device);
/* Free the context (waits for its stream). Accepts NULL. */
void ax_attn_cuda_close(ax_attn_cuda *c);

/* Make the context's next run wait, on the GPU, for `event` (a cudaEvent_t, e.g. opened from the engine's IPC
 * event handle) — no host synchronisation. Returns 0 or -EIO. */
int ax_attn_cuda_wait_event(ax_attn_cuda *c, void *event);

/*
 * Run n jobs (any mix of requests, layers, modes, dtypes and shapes) and copy the results to the host. Job i's
 * rows (ax_attn_rows(&jobs[i]) of them) are out[off_i ..], off_i = sum of the rows of jobs 0..i-1. rc[i] gets
 * job i's result: 0, -EINVAL (bad shape, dtype, mode, top_k or head index, found before launching), -ERANGE
 * (an index value outside [0, n_slots): found on the GPU, no key outside the pool is read) or -EDOM (NaN or
 * infinity in Q or a visible key, or an overflowing score); a failed job's rows are undefined.
 * Returns 0 (rc[] then tells each job), or for the whole batch -ENOMEM (scratch over the cap) or -EIO (a CUDA
 * error; the context is unusable afterwards if it was sticky — close and reopen). Synchronous on the context's
 * stream (returns when results are on the host).
 * Also, per job: -EOPNOTSUPP for a shape ax_attn_cpu accepts but this backend does not run (head_dim > 512), and
 * -EINVAL for q, k or index not aligned to their element size. -EINVAL for the whole batch when c, or (n > 0)
 * jobs, out or rc is NULL; n = 0 returns 0. In heads mode with a head list, a head listed twice gets two equal
 * rows (as in ax_attn_cpu). Entries past k in a row are (position -1, logit -inf).
 */
int ax_attn_cuda_run(ax_attn_cuda *c, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc);

/*
 * Room for `rows` result rows to pass as ax_attn_cuda_run's `out`: page-locked host memory the GPU writes the rows
 * into directly (mapped into the device; the fast path then skips its staging and its copy of the results — 64
 * requests × 32 heads: ~10 µs less host work after the GPU is done), or, where that is not available, ordinary
 * memory (any memory works as `out`; the copy is made then). NULL when c is NULL, rows is 0 or no memory is left.
 * Free each with ax_attn_cuda_results_free on the same context before closing it (closing releases the mapped ones
 * still left, not the ordinary ones).
 */
ax_attn_result *ax_attn_cuda_results_alloc(ax_attn_cuda *c, size_t rows);
void ax_attn_cuda_results_free(ax_attn_cuda *c, ax_attn_result *r);

/* The last CUDA error of `c` (or of the last failed ax_attn_cuda_open when c is NULL) as text; never NULL. */
const char *ax_attn_cuda_strerror(const ax_attn_cuda *c);

#ifdef __cplusplus
}
#endif

#endif
