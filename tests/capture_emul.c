/*
 * capture_emul.c — an emulated GPU for attnx-capture-emul, the capture daemon built with its CUDA backend
 * (backend_cuda.c, AX_CAPTURE_CUDA) but with these definitions of attn_cuda.h's ax_attn_cuda_* and of
 * ax_cuda_ops_real() in place of the kernels and the CUDA calls. It lets the capture's CUDA path — attach-time
 * import through the real importer, batching, flushes, record order, detach — run on a CPU against
 * gpu_engine_emul's "device" allocations (named shm objects; handle = "AXEM" + name).
 *
 * It is strict where the GPU is, or stricter: opening one handle twice fails (older CUDA refused it; CUDA 13
 * reference-counts it, and the importer opens each allocation once either way), every job's Q row,
 * index row and K pool must lie inside an imported mapping (else the job fails with -EFAULT and a message), and a
 * run before any wait on the engine's event is counted and reported at exit. Results come from ax_attn_cpu, so the
 * comparison against --backend cpu must be exact. A test fixture: never a user-facing backend.
 *
 * Sticky errors (backend_cuda.h, "Recovery"): ax_emul_inject (tests) or AX_EMUL_STICKY_AT_RUN=N (the daemon)
 * makes the N-th run fault like a kernel reading freed memory: from then on every run, open, import and wait
 * fails with -EIO and device_sticky says 1, until device_reset — which first checks, as the real device would
 * make necessary, that every mapping and context was closed (else counted as a leak and the mappings torn down
 * under the holder), and can be made to fail a few times (AX_EMUL_RESET_FAILS=n) to exercise the backoff, or for
 * good (AX_EMUL_RESET_FAILS=-1: "reset does not recover", what an H200 with driver 580 / CUDA 13 does), which makes
 * the daemon re-execute itself. inject_fault (the backend's ATTNX_CUDA_FAULT_AFTER) breaks the device the same way.
 * The emulated device's state is the process's: a re-executed daemon finds a fresh, working one, as on a GPU —
 * except in the image named by AX_EMUL_OPEN_FAILS_IN_IMAGE=n (ATTNX_CAPTURE_REEXEC's count n), where every open
 * fails as if the driver were still tearing down the previous image's context (the daemon must re-execute again).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "attn.h"
#include "attn_cuda.h"
#include "attnx_shm_cuda.h"

/* ---- imported mappings ------------------------------------------------------------------------------------ */

typedef struct mapping {
	char name[64];
	uint8_t *base;
	uint64_t size;
} mapping;

static mapping g_maps[64];
static int g_nmaps;
static char g_err[160] = "no error";
static unsigned long g_runs, g_runs_unwaited, g_waits, g_bad_addr;
static long g_sticky_at = -1, g_transient_at = -1; /* run numbers (g_runs) that fault */
static int g_sticky, g_reset_fails, g_ctx_open;
static unsigned long g_resets, g_reset_leaks, g_ok_since_reset; /* good runs since the last reset */

/* Tests: the run `sticky_in` runs from now faults for good (0: the device is broken now; < 0: never); the next
 * `reset_fails` resets fail (< 0: every reset); the run `transient_in` runs from now fails once with a clearable
 * error. */
void ax_emul_inject(long sticky_in, int reset_fails, long transient_in);
void ax_emul_inject(long sticky_in, int reset_fails, long transient_in)
{
	g_sticky = sticky_in == 0;
	g_sticky_at = sticky_in > 0 ? (long)g_runs + sticky_in : -1;
	g_transient_at = transient_in > 0 ? (long)g_runs + transient_in : -1;
	g_reset_fails = reset_fails;
}
/* Tests: runs made, resets, resets made while something was still open, jobs outside the imported memory. */
void ax_emul_counts(unsigned long *runs, unsigned long *resets, unsigned long *leaks, unsigned long *bad);
void ax_emul_counts(unsigned long *runs, unsigned long *resets, unsigned long *leaks, unsigned long *bad)
{
	*runs = g_runs, *resets = g_resets, *leaks = g_reset_leaks, *bad = g_bad_addr;
}

static int sticky_fail(void)
{
	snprintf(g_err, sizeof g_err, "emul: an illegal memory access was encountered (injected sticky error)");
	return -EIO;
}

static int inside(const void *p, uint64_t bytes)
{
	uintptr_t a = (uintptr_t)p;
	for (int i = 0; i < g_nmaps; i++)
		if (a >= (uintptr_t)g_maps[i].base && a + bytes <= (uintptr_t)g_maps[i].base + g_maps[i].size)
			return 1;
	return 0;
}

static int em_ipc_open(void *ctx, int device, const uint8_t h[64], uint64_t *base, uint64_t *size)
{
	(void)ctx, (void)device;
	char name[64];
	if (g_sticky)
		return sticky_fail();
	if (memcmp(h, "AXEM", 4) != 0 || memchr(h + 4, 0, 60) == NULL) {
		snprintf(g_err, sizeof g_err, "emul: not an emulated IPC handle");
		return -EIO;
	}
	snprintf(name, sizeof name, "%s", (const char *)h + 4);
	for (int i = 0; i < g_nmaps; i++) {
		if (strcmp(g_maps[i].name, name) == 0) {
			snprintf(g_err, sizeof g_err, "emul: %s opened twice (the importer opens each allocation once)", name);
			return -EIO;
		}
		int old = strcmp(g_maps[i].name, "vmm") != 0 ? shm_open(g_maps[i].name, O_RDONLY, 0) : 0;
		if (old < 0) { /* the engine freed it: an importer of a previous attachment was never closed */
			fprintf(stderr, "capture_emul: %s still mapped after its engine freed it\n", g_maps[i].name);
			snprintf(g_err, sizeof g_err, "emul: stale mapping %.100s", g_maps[i].name);
			return -EIO;
		}
		if (old > 0)
			close(old);
	}
	int fd = shm_open(name, O_RDONLY, 0);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) != 0 || g_nmaps == 64) {
		snprintf(g_err, sizeof g_err, "emul: cannot open %s", name);
		if (fd >= 0)
			close(fd);
		return -EIO;
	}
	void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
	close(fd);
	if (p == MAP_FAILED)
		return -EIO;
	mapping *m = &g_maps[g_nmaps++];
	snprintf(m->name, sizeof m->name, "%s", name);
	m->base = p;
	m->size = (uint64_t)st.st_size;
	*base = (uint64_t)(uintptr_t)p;
	*size = m->size;
	return 0;
}

static void unmap_at(uint64_t base)
{
	for (int i = 0; i < g_nmaps; i++)
		if ((uint64_t)(uintptr_t)g_maps[i].base == base) {
			munmap(g_maps[i].base, g_maps[i].size);
			g_maps[i] = g_maps[--g_nmaps];
			return;
		}
}

static void em_ipc_close(void *ctx, int device, uint64_t base) { (void)ctx, (void)device, unmap_at(base); }

static int em_vmm_map(void *ctx, int device, int fd, uint64_t size, uint64_t *base)
{
	(void)ctx, (void)device;
	if (g_sticky)
		return sticky_fail();
	void *p = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED || g_nmaps == 64)
		return -EIO;
	mapping *m = &g_maps[g_nmaps++];
	snprintf(m->name, sizeof m->name, "vmm");
	m->base = p;
	m->size = size;
	*base = (uint64_t)(uintptr_t)p;
	return 0;
}

static void em_vmm_unmap(void *ctx, int device, uint64_t base, uint64_t size)
{
	(void)ctx, (void)device, (void)size;
	unmap_at(base);
}

static int em_event_open(void *ctx, int device, const uint8_t h[64], void **ev)
{
	(void)ctx, (void)device;
	if (g_sticky)
		return sticky_fail();
	if (memcmp(h, "AXEV", 4) != 0)
		return -EIO;
	*ev = (void *)&g_waits; /* any stable non-NULL tag */
	return 0;
}

static void em_event_close(void *ctx, int device, void *ev) { (void)ctx, (void)device, (void)ev; }
static const char *em_last_error(void *ctx) { (void)ctx; return g_err; }

static int em_device_sticky(void *ctx, int device) { (void)ctx, (void)device; return g_sticky; }

static int em_device_reset(void *ctx, int device)
{
	(void)ctx, (void)device;
	if (g_nmaps || g_ctx_open) { /* the reset unmaps them under their holder */
		fprintf(stderr, "capture_emul: device reset with %d mappings and %d contexts still open\n", g_nmaps,
			g_ctx_open);
		g_reset_leaks++;
		while (g_nmaps)
			unmap_at((uint64_t)(uintptr_t)g_maps[0].base);
	}
	if (g_reset_fails != 0) {
		g_reset_fails -= g_reset_fails > 0;
		snprintf(g_err, sizeof g_err, "emul: device probe after cudaDeviceReset: CUDA-capable device(s) is/are busy "
			 "or unavailable (injected%s)", g_reset_fails < 0 ? ": resets never recover" : "");
		return -EIO;
	}
	g_sticky = 0;
	g_resets++;
	g_ok_since_reset = 0;
	return 0;
}

static int em_inject_fault(void *ctx, int device)
{
	(void)ctx, (void)device;
	g_sticky = 1;
	snprintf(g_err, sizeof g_err, "emul: an illegal memory access was encountered (ATTNX_CUDA_FAULT_AFTER)");
	return -EIO;
}

static const ax_cuda_ops emul_ops = {NULL, em_ipc_open, em_ipc_close, em_vmm_map, em_vmm_unmap, em_event_open,
				     em_event_close, em_last_error};
static const ax_cuda_recovery_ops emul_recovery = {NULL, em_device_sticky, em_device_reset, em_last_error,
						   em_inject_fault};

const ax_cuda_recovery_ops *ax_cuda_recovery_real(void) { return &emul_recovery; }

const ax_cuda_ops *ax_cuda_ops_real(void) { return &emul_ops; }

/* ---- the "kernels" ----------------------------------------------------------------------------------------- */

#define EMUL_RES_MAX 8
struct ax_attn_cuda {
	ax_attn_scratch *scratch;
	int waited;
	ax_attn_result *res[EMUL_RES_MAX]; /* result room it gave (ax_attn_cuda_results_alloc), freed with it */
};

static void report(void)
{
	fprintf(stderr, "capture_emul: %lu runs, %lu event waits, %lu runs without a wait, %lu jobs outside the "
		"imported memory, %lu device resets, %lu with something still open, %lu good runs since the last reset\n",
		g_runs, g_waits, g_runs_unwaited, g_bad_addr, g_resets, g_reset_leaks, g_ok_since_reset);
}

int ax_attn_cuda_devices(void) { return getenv("AX_EMUL_NO_DEVICE") ? -ENODEV : 1; }

int ax_attn_cuda_open(ax_attn_cuda **out, int device)
{
	if (device != 0)
		return -ENODEV;
	static int env_read;
	if (!env_read++) {
		const char *at = getenv("AX_EMUL_STICKY_AT_RUN"), *rf = getenv("AX_EMUL_RESET_FAILS");
		g_sticky_at = at ? atol(at) : g_sticky_at;
		g_reset_fails = rf ? atoi(rf) : g_reset_fails;
	}
	const char *of = getenv("AX_EMUL_OPEN_FAILS_IN_IMAGE"), *rx = getenv("ATTNX_CAPTURE_REEXEC");
	if (of && rx && atol(rx) == atol(of)) { /* the driver still tearing down the previous image's context */
		snprintf(g_err, sizeof g_err, "emul: CUDA-capable device(s) is/are busy or unavailable "
			 "(AX_EMUL_OPEN_FAILS_IN_IMAGE)");
		return -EIO;
	}
	if (g_sticky)
		return sticky_fail();
	ax_attn_cuda *c = calloc(1, sizeof *c);
	if (c == NULL || (c->scratch = ax_attn_scratch_new()) == NULL) {
		free(c);
		return -ENOMEM;
	}
	static int registered;
	if (!registered++)
		atexit(report);
	g_ctx_open++;
	*out = c;
	return 0;
}

void ax_attn_cuda_close(ax_attn_cuda *c)
{
	if (c == NULL)
		return;
	ax_attn_scratch_free(c->scratch);
	for (int i = 0; i < EMUL_RES_MAX; i++)
		free(c->res[i]);
	free(c);
	g_ctx_open--;
}

int ax_attn_cuda_wait_event(ax_attn_cuda *c, void *event)
{
	if (event == NULL || g_sticky)
		return -EIO;
	c->waited = 1;
	g_waits++;
	return 0;
}

/* Does every byte the job reads lie in imported memory? (Q row, index row, first and last K slot row; paged: the
 * block-table cells of keys 0..position and the last row of the last block.) */
static int job_in_device_memory(const ax_attn_job *j)
{
	size_t qs = ax_dtype_size(j->q_dtype), ks = ax_dtype_size(j->k_dtype), is = ax_dtype_size(j->index_dtype);
	uint64_t krow = (j->k_stride[1] * (j->n_kv_heads - 1) + j->head_dim) * ks, cells = j->position + 1, last;
	if (j->index_kind == AX_ATTN_INDEX_PAGED) {
		if (j->block_size == 0 || j->n_blocks == 0)
			return 0;
		cells = (j->position + j->block_size) / j->block_size;
		last = (j->n_blocks - 1) * j->k_block_stride + (uint64_t)(j->block_size - 1) * j->k_stride[0];
	} else {
		if (j->n_slots == 0)
			return 0;
		last = (j->n_slots - 1) * j->k_stride[0];
	}
	return inside(j->q, (uint64_t)j->n_q_heads * j->head_dim * qs) && inside(j->index, cells * is) &&
	       inside(j->k, krow) && inside((const uint8_t *)j->k + last * ks, krow);
}

int ax_attn_cuda_run(ax_attn_cuda *c, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc)
{
	g_runs++;
	g_sticky |= (long)g_runs == g_sticky_at; /* a kernel faults: the context is broken for good */
	if (g_sticky)
		return sticky_fail();
	if ((long)g_runs == g_transient_at) {
		snprintf(g_err, sizeof g_err, "emul: launch out of resources (injected, clearable)");
		return -EIO;
	}
	g_runs_unwaited += !c->waited;
	g_ok_since_reset++;
	c->waited = 0;
	uint32_t off = 0;
	for (uint32_t i = 0; i < n; i++) {
		if (!job_in_device_memory(&jobs[i])) {
			g_bad_addr++;
			fprintf(stderr, "capture_emul: job %u reads outside the imported allocations\n", i);
			rc[i] = -EFAULT;
		} else {
			rc[i] = ax_attn_cpu(&jobs[i], c->scratch, out + off);
		}
		off += ax_attn_rows(&jobs[i]);
	}
	return 0;
}

/* Result room, as on the GPU (attn_cuda.h): the first EMUL_RES_MAX live buffers are the context's (closing it frees
 * those left), more are ordinary memory (the caller's to free). */
ax_attn_result *ax_attn_cuda_results_alloc(ax_attn_cuda *c, size_t rows)
{
	if (c == NULL || rows == 0)
		return NULL;
	for (int i = 0; i < EMUL_RES_MAX; i++) {
		if (c->res[i] == NULL)
			return c->res[i] = calloc(rows, sizeof(ax_attn_result));
	}
	return calloc(rows, sizeof(ax_attn_result));
}

void ax_attn_cuda_results_free(ax_attn_cuda *c, ax_attn_result *r)
{
	for (int i = 0; c && r && i < EMUL_RES_MAX; i++)
		if (c->res[i] == r)
			c->res[i] = NULL;
	free(r);
}

const char *ax_attn_cuda_strerror(const ax_attn_cuda *c)
{
	(void)c;
	return g_err;
}
