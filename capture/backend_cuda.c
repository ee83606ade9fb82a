/*
 * backend_cuda.c — the capture's CUDA backend (backend_cuda.h): imported engine buffers plus a batch of jobs run
 * with one ax_attn_cuda_run.
 *
 * One backend lives as long as the capture (its context and stream are expensive); each attachment gets a fresh
 * importer (shm/attnx_shm_cuda.h), closed on detach, so an engine restart unmaps the old engine's allocations
 * before the new segment is read. The batch is an array of ax__item: the loop fills the job with device addresses
 * (Q row in the engine's Q ring, the layer's K pool, the request's index row), and a run copies the jobs into one
 * array, sizes the contiguous result array (rows of job i start at the sum of the rows before it), waits on the GPU
 * for the engine's step event, runs, and scatters results and per-job codes back into the items.
 *
 * Sticky CUDA errors (backend_cuda.h, "Recovery"): a failed batch or import is classified through the ops'
 * device_sticky; a sticky one releases the context and the importer, resets the device and marks the backend
 * stale until the capture attaches afresh (ax__cuda_be_lost), so no device address of the old mappings is ever
 * handed to the GPU again. The state is three flags: stale (addresses held by the capture are dead), broken (the
 * device failed its probe: a new process is needed, ax__cuda_be_need_new_process; retried with backoff meanwhile),
 * and the streak of resets since the last good batch. A test-only fault (ATTNX_CUDA_FAULT_AFTER) replaces one
 * batch by the ops' inject_fault and then takes exactly the path a real fault takes.
 *
 * Built two ways: with AX_CAPTURE_CUDA (the build has CUDA and the kernels behind capture/attn_cuda.h) and
 * without, where every entry point reports -ENOTSUP with the reason. The re-exec bookkeeping (pure) is in both.
 * Ran on an H200 (3a279e1): batches, imports, events. Not yet on a GPU: the sticky path, the fault injection.
 */
#include "backend_cuda.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attnx_common.h"
#include "attnx_config.h"

/* ---- re-exec bookkeeping (both builds; backend_cuda.h) ------------------------------------------------------ */

#define REEXEC_WINDOW_S 60
#define REEXEC_MAX_DELAY_MS 60000ull

int ax__cuda_be_reexec_parse(const char *env, ax__cuda_be_reexec *out)
{
	memset(out, 0, sizeof *out);
	if (env == NULL || env[0] == '\0')
		return 0;
	unsigned long long v[3];
	int used = 0;
	if (strspn(env, "0123456789 ") != strlen(env) || env[0] == ' ' ||
	    sscanf(env, "%llu %llu %llu%n", &v[0], &v[1], &v[2], &used) != 3 || env[used] != '\0' ||
	    v[0] > UINT32_MAX || v[2] > UINT32_MAX)
		return -EINVAL;
	out->count = (uint32_t)v[0];
	out->window_s = v[1];
	out->in_window = (uint32_t)v[2];
	return 0;
}

uint64_t ax__cuda_be_reexec_next(ax__cuda_be_reexec *r, uint64_t now_s)
{
	if (r->in_window == 0 || now_s < r->window_s || now_s - r->window_s >= REEXEC_WINDOW_S) {
		r->window_s = now_s;
		r->in_window = 0;
	}
	if (r->count < UINT32_MAX)
		r->count++;
	if (r->in_window < UINT32_MAX)
		r->in_window++;
	if (r->in_window <= AX_REEXEC_FREE)
		return 0;
	uint32_t sh = r->in_window - AX_REEXEC_FREE - 1;
	return sh >= 6 ? REEXEC_MAX_DELAY_MS : (1000ull << sh < REEXEC_MAX_DELAY_MS ? 1000ull << sh : REEXEC_MAX_DELAY_MS);
}

int ax__cuda_be_reexec_format(const ax__cuda_be_reexec *r, char *buf, size_t n)
{
	int len = snprintf(buf, n, "%" PRIu32 " %" PRIu64 " %" PRIu32, r->count, r->window_s, r->in_window);
	return len < 0 || (size_t)len >= n ? -ENOSPC : len;
}

#ifdef AX_CAPTURE_CUDA

#include "attn_cuda.h"
#include "attnx_shm_cuda.h"

#define TAG "capture-cuda"

struct ax__cuda_be {
	int device;
	ax_attn_cuda *ctx;          /* NULL after a batch-level failure: reopened at the next run */
	ax_shm_cuda *imp;           /* importer of the current attachment, or NULL */
	int32_t event_buf;
	ax__item *items;            /* the batch: [AX_CUDA_BATCH_MAX] */
	uint32_t n;
	ax_attn_job *jobs;          /* [AX_CUDA_BATCH_MAX] staging for ax_attn_cuda_run */
	int *rc;                    /* [AX_CUDA_BATCH_MAX] */
	ax_attn_result *res;        /* contiguous results, res_cap rows (from ctx: ax_attn_cuda_results_alloc) */
	uint32_t res_cap;
	uint64_t busy_ns;
	int warned_no_event;
	char err[160];
	const ax_shm *shm;          /* the current attachment, or NULL */
	const ax_cuda_recovery_ops *ops; /* device_sticky / device_reset (NULL: no classification) */
	int stale;                  /* a reset closed the mappings whose addresses the capture holds */
	int broken;                 /* the device failed its probe after a reset: retried at retry_ns */
	uint64_t retry_ns;
	uint32_t streak;            /* resets since the last good batch */
	ax__cuda_be_recovery rs;
	int64_t fault_after;        /* test only: the batch after this many faults (-1: none; AX_CUDA_FAULT_ENV) */
	uint64_t runs;              /* batches attempted on the device, for fault_after */
};

#define BACKOFF_FIRST_NS (100 * 1000000ull)
#define BACKOFF_MAX_NS (30 * 1000000000ull)

int ax__cuda_be_devices(void)
{
	int n = ax_attn_cuda_devices();
	return n > 0 ? n : -ENODEV;
}

const char *ax__cuda_be_why(void)
{
	return ax__cuda_be_devices() > 0 ? "available" : "no CUDA device or driver on this machine";
}

/* The test-only fault (backend_cuda.h): armed in the first ATTNX_CUDA_FAULT_IMAGES images only. */
static void arm_fault(ax__cuda_be *b)
{
	const char *after = getenv(AX_CUDA_FAULT_ENV), *images = getenv(AX_CUDA_FAULT_IMAGES_ENV);
	ax__cuda_be_reexec re;
	b->fault_after = -1;
	if (after == NULL || after[0] < '0' || after[0] > '9')
		return;
	ax__cuda_be_reexec_parse(getenv(AX_REEXEC_ENV), &re);
	long n_images = images && images[0] >= '0' && images[0] <= '9' ? strtol(images, NULL, 10) : 1;
	if ((long)re.count >= n_images)
		return;
	b->fault_after = strtoll(after, NULL, 10);
	ax_log(AX_LOG_WARN, TAG, "TEST ONLY: %s=%lld: batch %lld on device %d will fault (sticky) instead of running",
	       AX_CUDA_FAULT_ENV, (long long)b->fault_after, (long long)b->fault_after + 1, b->device);
}

int ax__cuda_be_open(ax__cuda_be **out, int device)
{
	ax__cuda_be *b = calloc(1, sizeof *b);
	if (b == NULL)
		return -ENOMEM;
	b->device = device;
	b->event_buf = -1;
	b->ops = ax_cuda_recovery_real();
	arm_fault(b);
	b->items = calloc(AX_CUDA_BATCH_MAX, sizeof *b->items);
	b->jobs = calloc(AX_CUDA_BATCH_MAX, sizeof *b->jobs);
	b->rc = calloc(AX_CUDA_BATCH_MAX, sizeof *b->rc);
	int rv = -ENOMEM;
	if (b->items == NULL || b->jobs == NULL || b->rc == NULL)
		goto fail;
	if ((rv = ax_attn_cuda_open(&b->ctx, device)) < 0) {
		ax_log(AX_LOG_ERROR, TAG, "cannot open device %d: %s", device, ax_attn_cuda_strerror(NULL));
		goto fail;
	}
	*out = b;
	return 0;
fail:
	ax__cuda_be_close(b);
	return rv;
}

/* Close the context, and the result room it gave (ax_attn_cuda_results_alloc: its own mapped memory). */
static void ctx_close(ax__cuda_be *b)
{
	ax_attn_cuda_results_free(b->ctx, b->res);
	b->res = NULL;
	b->res_cap = 0;
	ax_attn_cuda_close(b->ctx);
	b->ctx = NULL;
}

void ax__cuda_be_close(ax__cuda_be *b)
{
	if (b == NULL)
		return;
	ax__cuda_be_detach(b);
	ctx_close(b);
	for (uint32_t i = 0; b->items && i < AX_CUDA_BATCH_MAX; i++)
		free(b->items[i].res);
	free(b->items);
	free(b->jobs);
	free(b->rc);
	free(b);
}

int ax__cuda_be_device(const ax__cuda_be *b) { return b->device; }

int ax__cuda_be_attach(ax__cuda_be *b, const ax_shm *shm, int32_t event_buf)
{
	ax__cuda_be_detach(b);
	int rv = ax_shm_cuda_open(&b->imp, shm, b->device, ax_cuda_ops_real());
	if (rv < 0)
		return rv;
	b->shm = shm;
	b->event_buf = event_buf;
	b->warned_no_event = 0;
	return 0;
}

void ax__cuda_be_detach(ax__cuda_be *b)
{
	if (b == NULL)
		return;
	b->shm = NULL;
	b->stale = 0; /* the capture dropped the addresses it held with the attachment */
	if (b->imp == NULL)
		return;
	/* Kernels of the last run finished inside ax_attn_cuda_run (synchronous), so nothing reads the mappings. */
	b->n = 0;
	ax_shm_cuda_close(b->imp);
	b->imp = NULL;
	b->event_buf = -1;
}

/* Backoff before the next attempt of a streak: none for the first reset, then 100 ms doubling to 30 s. */
static uint64_t backoff_ns(uint32_t streak)
{
	if (streak <= 1)
		return 0;
	uint32_t sh = streak - 2 < 16 ? streak - 2 : 16;
	uint64_t d = BACKOFF_FIRST_NS << sh;
	return d < BACKOFF_MAX_NS ? d : BACKOFF_MAX_NS;
}

/* Reset the device (everything on it already released) and reopen the context; `broken` if either fails. */
static void reset_device(ax__cuda_be *b, uint64_t now)
{
	b->rs.resets++;
	int rv = b->ops->device_reset(b->ops->ctx, b->device);
	if (rv == 0 && (rv = ax_attn_cuda_open(&b->ctx, b->device)) != 0)
		snprintf(b->err, sizeof b->err, "reopen after reset: %s", ax_attn_cuda_strerror(NULL));
	else if (rv != 0)
		snprintf(b->err, sizeof b->err, "device reset: %s", b->ops->last_error(b->ops->ctx));
	b->broken = rv != 0;
	b->retry_ns = now + backoff_ns(b->streak);
	if (b->broken && b->rs.reset_failed++ % 100 == 0)
		ax_log(AX_LOG_ERROR, TAG, "device %d still unusable after reset %llu (%s): only a new process gets it "
		       "back (the daemon re-executes itself; otherwise the reset is retried in %llu ms, capturing nothing "
		       "meanwhile)", b->device, (unsigned long long)b->rs.resets, b->err,
		       (unsigned long long)(b->retry_ns - now) / 1000000);
	else if (!b->broken)
		ax_log(AX_LOG_INFO, TAG, "device %d reset (reset %llu); importing the engine's buffers afresh", b->device,
		       (unsigned long long)b->rs.resets);
}

/* A CUDA call failed with -EIO during `what`. Not sticky: 0. Sticky: release the context and every mapping and
 * event, reset the device, mark the addresses the capture holds stale; 1. Without the ops' hooks: 0 (the old
 * behaviour: the context is reopened at the next run). */
static int device_error(ax__cuda_be *b, const char *what)
{
	if (b->ops == NULL || b->ops->device_sticky == NULL || b->ops->device_reset == NULL)
		return 0;
	if (b->ops->device_sticky(b->ops->ctx, b->device) == 0) {
		b->rs.transient++;
		return 0;
	}
	if (b->rs.sticky++ % 100 == 0) /* the first, then every 100th */
		ax_log(AX_LOG_ERROR, TAG, "sticky CUDA error during %s on device %d (%s): releasing the context and every "
		       "imported mapping and event, resetting the device, attaching afresh", what, b->device, b->err);
	ctx_close(b);
	ax_shm_cuda_close(b->imp); /* every IPC / VMM mapping and event: none survives the reset */
	b->imp = NULL;
	b->stale = b->shm != NULL;
	b->streak++;
	reset_device(b, ax_now_ns());
	return 1;
}

int ax__cuda_be_lost(ax__cuda_be *b, uint64_t now_ns)
{
	if (b == NULL || (!b->stale && !b->broken) || now_ns < b->retry_ns)
		return 0;
	if (b->broken) {
		b->streak++;
		reset_device(b, now_ns);
		if (b->broken)
			return 0;
	}
	b->rs.reattaches++;
	return 1;
}

void ax__cuda_be_recovery_get(const ax__cuda_be *b, ax__cuda_be_recovery *out)
{
	memset(out, 0, sizeof *out);
	if (b)
		*out = b->rs;
}

int ax__cuda_be_need_new_process(const ax__cuda_be *b) { return b != NULL && b->broken; }

int ax__cuda_be_map(ax__cuda_be *b, uint32_t index, uint64_t *dptr)
{
	if (b->stale || b->broken)
		return -EIO;
	if (b->imp == NULL)
		return -ENOENT;
	ax_shm_cuda_stats st0, st1;
	ax_shm_cuda_get_stats(b->imp, &st0);
	int rv = ax_shm_cuda_map(b->imp, index, dptr);
	if (rv == -EIO) {
		ax_shm_cuda_get_stats(b->imp, &st1);
		if (st1.rejected != st0.rejected) { /* a fresh failure, not a remembered rejection */
			snprintf(b->err, sizeof b->err, "import: %s", ax_shm_cuda_last_error(b->imp));
			device_error(b, "an import");
		}
	}
	return rv;
}

void ax__cuda_be_counts(const ax__cuda_be *b, uint64_t *rejected, uint64_t *allocations)
{
	ax_shm_cuda_stats st = {0};
	if (b && b->imp)
		ax_shm_cuda_get_stats(b->imp, &st);
	if (rejected)
		*rejected = st.rejected;
	if (allocations)
		*allocations = st.allocations;
}

const char *ax__cuda_be_import_error(const ax__cuda_be *b)
{
	if (b && (b->stale || b->broken))
		return b->broken ? "the CUDA device is being reset after a sticky error"
				 : "the mappings were released by a CUDA device reset (attaching afresh)";
	return ax_shm_cuda_last_error(b ? b->imp : NULL);
}

ax__item *ax__cuda_be_reserve(ax__cuda_be *b)
{
	if (b->n >= AX_CUDA_BATCH_MAX)
		return NULL;
	ax__item *it = &b->items[b->n];
	it->done = 0;
	it->err = 0;
	it->n_res = 0;
	it->rec = NULL;
	return it;
}

void ax__cuda_be_commit(ax__cuda_be *b) { b->n++; }

uint32_t ax__cuda_be_pending(const ax__cuda_be *b) { return b ? b->n : 0; }

/* Stage the batch: job copies with their head lists re-pointed at the item (items are reused). */
static void stage(ax__cuda_be *b, uint32_t *rows)
{
	uint32_t total = 0;
	for (uint32_t i = 0; i < b->n; i++) {
		b->jobs[i] = b->items[i].job;
		if (b->jobs[i].n_heads)
			b->jobs[i].heads = b->items[i].heads;
		total += ax_attn_rows(&b->jobs[i]);
	}
	*rows = total;
}

/* Result room for `rows` rows from the open context: memory its GPU writes the rows into directly where it can
 * (ax_attn_cuda_results_alloc), grown to the largest batch and kept with the context. */
static int room(ax__cuda_be *b, uint32_t rows)
{
	if (rows <= b->res_cap)
		return 0;
	ax_attn_result *r = ax_attn_cuda_results_alloc(b->ctx, rows);
	if (r == NULL)
		return -ENOMEM;
	ax_attn_cuda_results_free(b->ctx, b->res);
	b->res = r;
	b->res_cap = rows;
	return 0;
}

/* Wait on the GPU for the engine's latest step (its IPC event), if the engine exports one. */
static void wait_engine(ax__cuda_be *b)
{
	void *ev = NULL;
	int rv = b->event_buf >= 0 ? ax_shm_cuda_event(b->imp, (uint32_t)b->event_buf, &ev) : 0;
	if (rv == 1) {
		if (ax_attn_cuda_wait_event(b->ctx, ev) == 0)
			return;
		rv = -EIO;
	}
	if (!b->warned_no_event) {
		ax_log(AX_LOG_WARN, TAG, "the engine exports no usable step event (%s): GPU reads are not ordered after "
		       "its writes", rv == 0 ? "none in the Q ring entry" : ax_shm_cuda_last_error(b->imp));
		b->warned_no_event = 1;
	}
}

/* The armed test fault is due: fault the device instead of running the batch (once per image). -EIO. */
static int inject_fault(ax__cuda_be *b)
{
	b->fault_after = -1;
	b->rs.faults++;
	if (b->ops == NULL || b->ops->inject_fault == NULL) {
		snprintf(b->err, sizeof b->err, "injected fault: these ops cannot fault the device");
		return -EIO;
	}
	int rv = b->ops->inject_fault(b->ops->ctx, b->device);
	snprintf(b->err, sizeof b->err, "%s", b->ops->last_error(b->ops->ctx));
	ax_log(AX_LOG_WARN, TAG, "TEST ONLY: fault injected on device %d after %llu batches: %s", b->device,
	       (unsigned long long)b->runs - 1, b->err);
	return rv < 0 ? rv : -EIO;
}

/* Results of the run back into the items; every item is done. */
static void scatter(ax__cuda_be *b, int batch_rc)
{
	uint32_t off = 0;
	for (uint32_t i = 0; i < b->n; i++) {
		ax__item *it = &b->items[i];
		uint32_t rows = ax_attn_rows(&b->jobs[i]);
		it->err = batch_rc ? batch_rc : b->rc[i];
		if (it->err == 0 && ax__pool_item_results(it, rows) == 0)
			memcpy(it->res, b->res + off, (size_t)rows * sizeof *it->res);
		else if (it->err == 0)
			it->err = -ENOMEM;
		it->n_res = rows;
		it->done = 1;
		off += rows;
	}
}

int ax__cuda_be_run(ax__cuda_be *b, ax__item **items, uint32_t *n)
{
	*items = b->items;
	*n = b->n;
	if (b->n == 0)
		return 0;
	uint64_t t0 = ax_now_ns();
	uint32_t rows = 0;
	int rv = 0;
	stage(b, &rows);
	if (b->stale || b->broken || b->imp == NULL) /* addresses of released mappings: never run */
		rv = -EIO;
	if (rv == 0 && b->ctx == NULL && (rv = ax_attn_cuda_open(&b->ctx, b->device)) < 0) {
		snprintf(b->err, sizeof b->err, "reopen: %s", ax_attn_cuda_strerror(NULL));
		if (rv == -EIO)
			device_error(b, "a context reopen");
	}
	if (rv == 0 && (rv = room(b, rows)) < 0)
		snprintf(b->err, sizeof b->err, "no memory for %u result rows", rows);
	if (rv == 0) {
		wait_engine(b);
		if (b->fault_after >= 0 && b->runs++ == (uint64_t)b->fault_after) {
			rv = inject_fault(b);
		} else {
			rv = ax_attn_cuda_run(b->ctx, b->jobs, b->n, b->res, b->rc);
			if (rv < 0)
				snprintf(b->err, sizeof b->err, "%s", ax_attn_cuda_strerror(b->ctx));
		}
		if (rv < 0) {
			if (rv == -EIO && device_error(b, "a batch") == 0) /* not sticky: a fresh context anyway */
				ctx_close(b);
		}
	}
	if (rv == 0)
		b->streak = 0;
	else
		b->rs.lost_jobs += b->n;
	scatter(b, rv);
	b->n = 0;
	b->busy_ns += ax_now_ns() - t0;
	return rv;
}

uint64_t ax__cuda_be_busy_ns(const ax__cuda_be *b) { return b ? b->busy_ns : 0; }

const char *ax__cuda_be_strerror(const ax__cuda_be *b) { return b && b->err[0] ? b->err : "no error"; }

#else /* !AX_CAPTURE_CUDA: the build has no CUDA backend; nothing here can be opened. */

int ax__cuda_be_devices(void) { return -ENOTSUP; }

const char *ax__cuda_be_why(void)
{
	return AX_HAVE_CUDA ? "this build has CUDA but not the capture kernels (capture/attn_cuda.cu)"
			    : "this build has no CUDA support (configure with -Dcuda=enabled on a machine with nvcc)";
}

int ax__cuda_be_open(ax__cuda_be **out, int device)
{
	(void)out, (void)device;
	return -ENOTSUP;
}
void ax__cuda_be_close(ax__cuda_be *b) { (void)b; }
int ax__cuda_be_device(const ax__cuda_be *b) { (void)b; return -1; }
int ax__cuda_be_attach(ax__cuda_be *b, const ax_shm *shm, int32_t event_buf)
{
	(void)b, (void)shm, (void)event_buf;
	return -ENOTSUP;
}
void ax__cuda_be_detach(ax__cuda_be *b) { (void)b; }
int ax__cuda_be_map(ax__cuda_be *b, uint32_t index, uint64_t *dptr)
{
	(void)b, (void)index, (void)dptr;
	return -ENOTSUP;
}
void ax__cuda_be_counts(const ax__cuda_be *b, uint64_t *rejected, uint64_t *allocations)
{
	(void)b;
	if (rejected)
		*rejected = 0;
	if (allocations)
		*allocations = 0;
}
const char *ax__cuda_be_import_error(const ax__cuda_be *b) { (void)b; return ax__cuda_be_why(); }
ax__item *ax__cuda_be_reserve(ax__cuda_be *b) { (void)b; return NULL; }
void ax__cuda_be_commit(ax__cuda_be *b) { (void)b; }
uint32_t ax__cuda_be_pending(const ax__cuda_be *b) { (void)b; return 0; }
int ax__cuda_be_run(ax__cuda_be *b, ax__item **items, uint32_t *n)
{
	(void)b;
	*items = NULL;
	*n = 0;
	return 0;
}
uint64_t ax__cuda_be_busy_ns(const ax__cuda_be *b) { (void)b; return 0; }
void ax__cuda_be_recovery_get(const ax__cuda_be *b, ax__cuda_be_recovery *out)
{
	(void)b;
	memset(out, 0, sizeof *out);
}
int ax__cuda_be_lost(ax__cuda_be *b, uint64_t now_ns) { (void)b, (void)now_ns; return 0; }
int ax__cuda_be_need_new_process(const ax__cuda_be *b) { (void)b; return 0; }
const char *ax__cuda_be_strerror(const ax__cuda_be *b) { (void)b; return ax__cuda_be_why(); }

#endif
