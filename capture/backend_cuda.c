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
 * Built two ways: with AX_CAPTURE_CUDA (the build has CUDA and the kernels behind capture/attn_cuda.h) and
 * without, where every entry point reports -ENOTSUP with the reason.
 * NOT RUN YET: the AX_CAPTURE_CUDA half has been compiled but never executed (no GPU in the session that wrote it).
 */
#include "backend_cuda.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attnx_common.h"
#include "attnx_config.h"

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
	ax_attn_result *res;        /* contiguous results, res_cap rows */
	uint32_t res_cap;
	uint64_t busy_ns;
	int warned_no_event;
	char err[160];
};

int ax__cuda_be_devices(void)
{
	int n = ax_attn_cuda_devices();
	return n > 0 ? n : -ENODEV;
}

const char *ax__cuda_be_why(void)
{
	return ax__cuda_be_devices() > 0 ? "available" : "no CUDA device or driver on this machine";
}

int ax__cuda_be_open(ax__cuda_be **out, int device)
{
	ax__cuda_be *b = calloc(1, sizeof *b);
	if (b == NULL)
		return -ENOMEM;
	b->device = device;
	b->event_buf = -1;
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

void ax__cuda_be_close(ax__cuda_be *b)
{
	if (b == NULL)
		return;
	ax__cuda_be_detach(b);
	ax_attn_cuda_close(b->ctx);
	for (uint32_t i = 0; b->items && i < AX_CUDA_BATCH_MAX; i++)
		free(b->items[i].res);
	free(b->items);
	free(b->jobs);
	free(b->rc);
	free(b->res);
	free(b);
}

int ax__cuda_be_device(const ax__cuda_be *b) { return b->device; }

int ax__cuda_be_attach(ax__cuda_be *b, const ax_shm *shm, int32_t event_buf)
{
	ax__cuda_be_detach(b);
	int rv = ax_shm_cuda_open(&b->imp, shm, b->device, ax_cuda_ops_real());
	if (rv < 0)
		return rv;
	b->event_buf = event_buf;
	b->warned_no_event = 0;
	return 0;
}

void ax__cuda_be_detach(ax__cuda_be *b)
{
	if (b == NULL || b->imp == NULL)
		return;
	/* Kernels of the last run finished inside ax_attn_cuda_run (synchronous), so nothing reads the mappings. */
	b->n = 0;
	ax_shm_cuda_close(b->imp);
	b->imp = NULL;
	b->event_buf = -1;
}

int ax__cuda_be_map(ax__cuda_be *b, uint32_t index, uint64_t *dptr)
{
	return b->imp ? ax_shm_cuda_map(b->imp, index, dptr) : -ENOENT;
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

const char *ax__cuda_be_import_error(const ax__cuda_be *b) { return ax_shm_cuda_last_error(b ? b->imp : NULL); }

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

/* Stage the batch: job copies with their head lists re-pointed at the item (items are reused), result room. */
static int stage(ax__cuda_be *b, uint32_t *rows)
{
	uint32_t total = 0;
	for (uint32_t i = 0; i < b->n; i++) {
		b->jobs[i] = b->items[i].job;
		if (b->jobs[i].n_heads)
			b->jobs[i].heads = b->items[i].heads;
		total += ax_attn_rows(&b->jobs[i]);
	}
	if (total > b->res_cap) {
		ax_attn_result *r = realloc(b->res, (size_t)total * sizeof *r);
		if (r == NULL)
			return -ENOMEM;
		b->res = r;
		b->res_cap = total;
	}
	*rows = total;
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
	int rv = stage(b, &rows);
	if (rv == 0 && b->ctx == NULL && (rv = ax_attn_cuda_open(&b->ctx, b->device)) < 0)
		snprintf(b->err, sizeof b->err, "reopen: %s", ax_attn_cuda_strerror(NULL));
	if (rv == 0) {
		wait_engine(b);
		rv = ax_attn_cuda_run(b->ctx, b->jobs, b->n, b->res, b->rc);
		if (rv < 0) {
			snprintf(b->err, sizeof b->err, "%s", ax_attn_cuda_strerror(b->ctx));
			if (rv == -EIO) { /* possibly sticky: start over with a fresh context */
				ax_attn_cuda_close(b->ctx);
				b->ctx = NULL;
			}
		}
	}
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
const char *ax__cuda_be_strerror(const ax__cuda_be *b) { (void)b; return ax__cuda_be_why(); }

#endif
