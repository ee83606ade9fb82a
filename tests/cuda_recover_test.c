/*
 * cuda_recover_test.c — the capture's CUDA backend (capture/backend_cuda.c, built with AX_CAPTURE_CUDA) recovering
 * from device errors, on the emulated device of capture_emul.c (kernels on the CPU, shm objects standing in for
 * CUDA IPC allocations, injectable sticky and clearable errors).
 *
 * Each case exports a small segment whose Q ring, K pool and index table are CUDA_IPC entries of emulated
 * allocations, attaches the backend, checks one batch against ax_attn_cpu on the test's own mapping, injects an
 * error and follows the recovery the capture loop drives: the failed batch's jobs come back with -EIO, a sticky
 * error resets the device only after every mapping and context was closed (the emulator counts a reset with
 * anything open as a leak), jobs holding the old addresses never reach the device again, ax__cuda_be_lost asks
 * for a fresh attachment (at once, or after the backoff while the device stays broken, without retrying in
 * between), and after it the batch gives the right results again. Without the recovery the device stays broken
 * and every later batch fails: the cases fail.
 *
 * Also: a device whose resets never recover (what an H200 does) must say it needs a new process
 * (ax__cuda_be_need_new_process, the daemon's cue to re-execute itself) and keep the backoff for a user that cannot;
 * the test-only fault (ATTNX_CUDA_FAULT_AFTER, armed per process image through ATTNX_CAPTURE_REEXEC and
 * ATTNX_CUDA_FAULT_IMAGES) must replace exactly the batch it names and take the real fault's path; and the re-exec
 * bookkeeping (parse, next delay, format) is checked on a table of values, garbage included.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmocka.h>

#include "attn.h"
#include "attnx_common.h"
#include "attnx_shm.h"
#include "attnx_shm_cuda.h"
#include "backend_cuda.h"

/* capture_emul.c's test hooks */
void ax_emul_inject(long sticky_in, int reset_fails, long transient_in);
void ax_emul_counts(unsigned long *runs, unsigned long *resets, unsigned long *leaks, unsigned long *bad);

enum { HQ = 2, HKV = 1, D = 8, SLOTS = 16, QROWS = 4, IROWS = 2, CTX = 16, POS = 9 };

typedef struct dev_alloc {
	char name[64];
	float *p;   /* the test's mapping (the "engine" side) */
	size_t bytes;
} dev_alloc;

typedef struct fx {
	char seg[64];
	ax_export *ex;
	ax_shm *shm;
	dev_alloc q, k, ix;
	int32_t qi, ki, ii;
	ax__cuda_be *be;
	ax_attn_scratch *scr;
} fx;

static int mk_alloc(dev_alloc *a, const char *tag, size_t bytes)
{
	snprintf(a->name, sizeof a->name, "/attnx.recover.%d.%s", (int)getpid(), tag);
	shm_unlink(a->name);
	int fd = shm_open(a->name, O_RDWR | O_CREAT | O_EXCL, 0600);
	if (fd < 0 || ftruncate(fd, (off_t)bytes) != 0)
		return -1;
	a->p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	a->bytes = bytes;
	return a->p == MAP_FAILED ? -1 : 0;
}

static int add_entry(fx *f, const dev_alloc *a, uint32_t kind, int32_t layer, uint64_t d0, uint64_t d1, uint64_t d2,
		     uint32_t dtype, int32_t *index)
{
	ax_shm_buffer b;
	memset(&b, 0, sizeof b);
	b.kind = kind, b.layer = layer, b.dtype = dtype, b.scale = 1, b.device = -1;
	b.ndim = d2 ? 3 : 2;
	b.dim[0] = d0, b.dim[1] = d1, b.dim[2] = d2;
	uint8_t h[64] = {'A', 'X', 'E', 'M'};
	snprintf((char *)h + 4, sizeof h - 4, "%.59s", a->name);
	if (ax_cuda_entry_set_ipc(&b, 0, h, sizeof h, 0, a->bytes) != 0)
		return -1;
	uint32_t i = 0;
	int rc = ax_export_add_device_buffer(f->ex, &b, &i);
	*index = (int32_t)i;
	return rc;
}

static int setup(void **state)
{
	fx *f = calloc(1, sizeof *f);
	assert_non_null(f);
	snprintf(f->seg, sizeof f->seg, "/attnx.recover.%d", (int)getpid());
	ax_export_config c;
	memset(&c, 0, sizeof c);
	c.name = f->seg, c.engine = "recover-test", c.model = "m", c.world_size = 1;
	c.n_layers = 1, c.n_q_heads = HQ, c.n_kv_heads = HKV, c.n_q_heads_total = HQ, c.head_dim = D;
	c.q_dtype = AX_DTYPE_F32, c.k_dtype = AX_DTYPE_F32, c.scale = 0.35f, c.max_ctx = CTX;
	c.ring_cap = 64, c.req_cap = 8, c.arena_cap = 4096, c.data_size = 65536;
	assert_int_equal(ax_export_open(&f->ex, &c), 0);
	assert_int_equal(mk_alloc(&f->q, "q", (size_t)QROWS * HQ * D * 4), 0);
	assert_int_equal(mk_alloc(&f->k, "k", (size_t)SLOTS * HKV * D * 4), 0);
	assert_int_equal(mk_alloc(&f->ix, "ix", (size_t)IROWS * CTX * 4), 0);
	for (size_t i = 0; i < f->q.bytes / 4; i++)
		f->q.p[i] = (float)((i * 7919) % 23) / 7.0f - 1.5f;
	for (size_t i = 0; i < f->k.bytes / 4; i++)
		f->k.p[i] = (float)((i * 104729) % 31) / 9.0f - 1.7f;
	int32_t *ix = (int32_t *)f->ix.p;
	for (int j = 0; j < CTX; j++)
		ix[j] = (j * 5 + 3) % SLOTS; /* row 0: key j lives in a scattered slot */
	assert_int_equal(add_entry(f, &f->k, AX_BUF_K_POOL, 0, SLOTS, HKV, D, AX_DTYPE_F32, &f->ki), 0);
	assert_int_equal(add_entry(f, &f->q, AX_BUF_Q_RING, -1, QROWS, HQ, D, AX_DTYPE_F32, &f->qi), 0);
	assert_int_equal(add_entry(f, &f->ix, AX_BUF_INDEX_TOKEN, -1, IROWS, CTX, 0, AX_DTYPE_I32, &f->ii), 0);
	assert_int_equal(ax_shm_attach(&f->shm, f->seg), 0);
	assert_int_equal(ax__cuda_be_open(&f->be, 0), 0);
	assert_int_equal(ax__cuda_be_attach(f->be, f->shm, -1), 0);
	f->scr = ax_attn_scratch_new();
	assert_non_null(f->scr);
	ax_emul_inject(-1, 0, -1);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	fx *f = *state;
	ax__cuda_be_close(f->be);
	ax_shm_detach(f->shm);
	ax_export_close(f->ex);
	dev_alloc *as[] = {&f->q, &f->k, &f->ix};
	for (int i = 0; i < 3; i++) {
		munmap(as[i]->p, as[i]->bytes);
		shm_unlink(as[i]->name);
	}
	ax_attn_scratch_free(f->scr);
	ax_emul_inject(-1, 0, -1);
	free(f);
	return 0;
}

/* The job for Q row `row` over the whole pool, with the given bases (device or host addresses). */
static ax_attn_job job_at(uint64_t q, uint64_t k, uint64_t ix, uint32_t row)
{
	ax_attn_job j;
	memset(&j, 0, sizeof j);
	j.q = (const void *)(uintptr_t)(q + (uint64_t)row * HQ * D * 4);
	j.q_dtype = AX_DTYPE_F32;
	j.k = (const void *)(uintptr_t)k;
	j.k_dtype = AX_DTYPE_F32;
	j.k_scale = 1;
	j.k_stride[0] = HKV * D, j.k_stride[1] = D, j.k_stride[2] = 1;
	j.n_slots = SLOTS;
	j.index = (const void *)(uintptr_t)ix;
	j.index_dtype = AX_DTYPE_I32;
	j.position = POS;
	j.n_q_heads = HQ, j.n_kv_heads = HKV, j.head_dim = D;
	j.scale = 0.35f;
	j.mode = AX_MODE_MEAN_LOGIT;
	j.top_k = 4;
	return j;
}

/* Queue one job per Q row through the backend's current mappings (addresses given, or mapped now). */
static int queue_rows(fx *f, const uint64_t *addr)
{
	uint64_t a[3];
	if (addr) {
		memcpy(a, addr, sizeof a);
	} else {
		int rc;
		if ((rc = ax__cuda_be_map(f->be, (uint32_t)f->qi, &a[0])) != 0 ||
		    (rc = ax__cuda_be_map(f->be, (uint32_t)f->ki, &a[1])) != 0 ||
		    (rc = ax__cuda_be_map(f->be, (uint32_t)f->ii, &a[2])) != 0)
			return rc;
	}
	for (uint32_t r = 0; r < QROWS; r++) {
		ax__item *it = ax__cuda_be_reserve(f->be);
		assert_non_null(it);
		it->job = job_at(a[0], a[1], a[2], r);
		it->n_res = 1;
		ax__cuda_be_commit(f->be);
	}
	return 0;
}

/* Run the batch; on success every job must equal ax_attn_cpu on the test's own mapping. Returns the run's rc. */
static int run_check(fx *f)
{
	ax__item *items;
	uint32_t n;
	int rv = ax__cuda_be_run(f->be, &items, &n);
	assert_int_equal(n, QROWS);
	for (uint32_t r = 0; r < n; r++) {
		if (rv != 0) {
			assert_int_equal(items[r].err, rv);
			continue;
		}
		assert_int_equal(items[r].err, 0);
		ax_attn_job hj = job_at((uint64_t)(uintptr_t)f->q.p, (uint64_t)(uintptr_t)f->k.p,
					(uint64_t)(uintptr_t)f->ix.p, r);
		ax_attn_result want;
		assert_int_equal(ax_attn_cpu(&hj, f->scr, &want), 0);
		assert_int_equal(items[r].res[0].k, want.k);
		assert_memory_equal(items[r].res[0].pos, want.pos, want.k * sizeof want.pos[0]);
		assert_memory_equal(items[r].res[0].logit, want.logit, want.k * sizeof want.logit[0]);
	}
	return rv;
}

/* What the capture loop does when ax__cuda_be_lost says so: detach (dropping every address), attach afresh. */
static void reattach(fx *f)
{
	ax__cuda_be_detach(f->be);
	assert_int_equal(ax__cuda_be_attach(f->be, f->shm, -1), 0);
}

static void counts(unsigned long *runs, unsigned long *resets, unsigned long *leaks)
{
	unsigned long bad;
	ax_emul_counts(runs, resets, leaks, &bad);
	assert_int_equal(bad, 0);
}

typedef struct rcase {
	const char *name;
	long sticky_in;   /* inject: the n-th run from now faults for good (0: broken now, before the imports) */
	int reset_fails;  /* resets that leave the device broken */
	long transient_in;/* the n-th run from now fails once, clearably */
	/* expected */
	int sticky;       /* a sticky error is seen */
} rcase;

static const rcase cases[] = {
	{"sticky_in_batch", 1, 0, -1, 1},
	{"sticky_in_import", 0, 0, -1, 1},
	{"sticky_reset_fails_twice", 1, 2, -1, 1},
	{"transient_in_batch", -1, 0, 1, 0},
};

static const rcase *g_case;

static void run_case(void **state)
{
	fx *f = *state;
	const rcase *c = g_case;
	unsigned long runs0, resets0, leaks, runs1, resets1;
	uint64_t q_old = 0;
	if (c->sticky_in != 0) { /* a good batch first, through mappings that will go stale */
		assert_int_equal(queue_rows(f, NULL), 0);
		assert_int_equal(run_check(f), 0);
		assert_int_equal(ax__cuda_be_map(f->be, (uint32_t)f->qi, &q_old), 0);
	}
	counts(&runs0, &resets0, &leaks);
	ax_emul_inject(c->sticky_in, c->reset_fails, c->transient_in);

	/* The failure: a batch (its jobs come back -EIO) or an import (-EIO). */
	if (c->sticky_in == 0) {
		assert_int_equal(queue_rows(f, NULL), -EIO);
	} else {
		assert_int_equal(queue_rows(f, NULL), 0);
		assert_int_equal(run_check(f), -EIO);
	}
	uint64_t t = ax_now_ns();
	ax__cuda_be_recovery rs;
	ax__cuda_be_recovery_get(f->be, &rs);
	counts(&runs1, &resets1, &leaks);
	assert_int_equal(leaks, 0); /* nothing was open when the device was reset */
	if (!c->sticky) {           /* cleared: same mappings, no reset, no re-attach, the next batch is right */
		assert_int_equal(rs.transient, 1);
		assert_int_equal(rs.sticky + rs.resets, 0);
		assert_int_equal(ax__cuda_be_lost(f->be, t), 0);
		assert_int_equal(queue_rows(f, NULL), 0);
		assert_int_equal(run_check(f), 0);
		return;
	}
	assert_int_equal(rs.sticky, 1);
	assert_int_equal(rs.resets, 1);
	assert_int_equal(resets1 - resets0, c->reset_fails ? 0 : 1);
	assert_int_equal(ax__cuda_be_need_new_process(f->be), c->reset_fails != 0);

	/* Until the capture attaches afresh: no import, and jobs holding the old addresses never reach the device. */
	uint64_t d;
	assert_int_equal(ax__cuda_be_map(f->be, (uint32_t)f->ki, &d), -EIO);
	if (q_old) {
		uint64_t old[3] = {q_old, 0, 0};
		assert_int_equal(ax__cuda_be_map(f->be, (uint32_t)f->qi, &d), -EIO);
		queue_rows(f, old);
		assert_int_equal(run_check(f), -EIO);
		unsigned long runs2, resets2;
		counts(&runs2, &resets2, &leaks);
		assert_int_equal(runs2, runs1);
	}

	/* A device that stays broken (the first reset above failed too) is retried after a backoff, never between. */
	for (int i = 0; i + 1 < c->reset_fails; i++) {
		assert_int_equal(ax__cuda_be_lost(f->be, t), 0);
		ax__cuda_be_recovery_get(f->be, &rs);
		uint64_t before = rs.resets;
		assert_int_equal(ax__cuda_be_lost(f->be, t), 0); /* same instant: no new attempt */
		ax__cuda_be_recovery_get(f->be, &rs);
		assert_int_equal(rs.resets, before);
		t += 31ull * 1000000000ull; /* past any backoff */
	}
	assert_int_equal(ax__cuda_be_lost(f->be, t), 1);
	ax__cuda_be_recovery_get(f->be, &rs);
	assert_int_equal(rs.reset_failed, (uint64_t)c->reset_fails);
	assert_int_equal(rs.resets, 1u + (uint64_t)c->reset_fails);
	assert_int_equal(rs.reattaches, 1);
	assert_true(rs.lost_jobs >= (c->sticky_in ? QROWS : 0u));

	/* Attached afresh: imports again, right results, and nothing left to recover. */
	assert_int_equal(ax__cuda_be_need_new_process(f->be), 0);
	reattach(f);
	assert_int_equal(queue_rows(f, NULL), 0);
	assert_int_equal(run_check(f), 0);
	assert_int_equal(ax__cuda_be_lost(f->be, t + 100ull * 1000000000ull), 0);
	counts(&runs1, &resets1, &leaks);
	assert_int_equal(leaks, 0);
	assert_int_equal(resets1 - resets0, 1);
}

/* Resets never recover (an H200, driver 580): the backend says a new process is needed, keeps retrying with a
 * growing backoff (never between), never asks for a re-attach, and never hands the device a job. */
static void reset_never_recovers(void **state)
{
	fx *f = *state;
	assert_int_equal(queue_rows(f, NULL), 0);
	assert_int_equal(run_check(f), 0);
	ax_emul_inject(1, -1, -1);
	assert_int_equal(queue_rows(f, NULL), 0);
	assert_int_equal(run_check(f), -EIO);
	assert_int_equal(ax__cuda_be_need_new_process(f->be), 1);
	unsigned long runs0, runs1, resets0, resets, leaks;
	counts(&runs0, &resets0, &leaks);
	assert_int_equal(leaks, 0);
	uint64_t t = ax_now_ns();
	ax__cuda_be_recovery rs;
	for (int i = 0; i < 5; i++) {
		assert_int_equal(ax__cuda_be_lost(f->be, t), 0);
		ax__cuda_be_recovery_get(f->be, &rs);
		uint64_t before = rs.resets;
		assert_int_equal(ax__cuda_be_lost(f->be, t), 0); /* same instant: no new attempt */
		ax__cuda_be_recovery_get(f->be, &rs);
		assert_int_equal(rs.resets, before);
		t += 31ull * 1000000000ull;
	}
	assert_int_equal(rs.reattaches, 0);
	assert_int_equal(rs.reset_failed, rs.resets);
	assert_true(rs.resets >= 5);
	assert_int_equal(ax__cuda_be_need_new_process(f->be), 1);
	uint64_t d;
	assert_int_equal(ax__cuda_be_map(f->be, (uint32_t)f->ki, &d), -EIO);
	counts(&runs1, &resets, &leaks);
	assert_int_equal(runs1, runs0);
	assert_int_equal(leaks, 0);
	assert_int_equal(resets, resets0); /* the emulator counts successful resets only */
}

/* Reopen the fixture's backend with the environment as set now (the fault is armed at open). */
static void reopen(fx *f)
{
	ax__cuda_be_close(f->be);
	assert_int_equal(ax__cuda_be_open(&f->be, 0), 0);
	assert_int_equal(ax__cuda_be_attach(f->be, f->shm, -1), 0);
}

/* ATTNX_CUDA_FAULT_AFTER=2: two good batches, the third faults (sticky, the real path: reset, re-attach), then good
 * again; armed once per image; not armed in a re-executed image unless ATTNX_CUDA_FAULT_IMAGES says so. */
static void fault_env(void **state)
{
	fx *f = *state;
	const struct { const char *reexec, *images; int armed; } t[] = {
		{NULL, NULL, 1}, {"1 100 1", NULL, 0}, {"1 100 1", "2", 1}, {"2 100 2", "2", 0}, {"garbage", NULL, 1},
	};
	for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
		setenv("ATTNX_CUDA_FAULT_AFTER", "2", 1);
		t[i].reexec ? setenv("ATTNX_CAPTURE_REEXEC", t[i].reexec, 1) : unsetenv("ATTNX_CAPTURE_REEXEC");
		t[i].images ? setenv("ATTNX_CUDA_FAULT_IMAGES", t[i].images, 1) : unsetenv("ATTNX_CUDA_FAULT_IMAGES");
		reopen(f);
		unsetenv("ATTNX_CUDA_FAULT_AFTER");
		unsetenv("ATTNX_CAPTURE_REEXEC");
		unsetenv("ATTNX_CUDA_FAULT_IMAGES");
		for (int b = 0; b < 2; b++) {
			assert_int_equal(queue_rows(f, NULL), 0);
			assert_int_equal(run_check(f), 0);
		}
		assert_int_equal(queue_rows(f, NULL), 0);
		assert_int_equal(run_check(f), t[i].armed ? -EIO : 0);
		ax__cuda_be_recovery rs;
		ax__cuda_be_recovery_get(f->be, &rs);
		assert_int_equal(rs.faults, (uint64_t)t[i].armed);
		assert_int_equal(rs.sticky, (uint64_t)t[i].armed);
		assert_int_equal(rs.resets, (uint64_t)t[i].armed);
		assert_int_equal(ax__cuda_be_lost(f->be, ax_now_ns()), t[i].armed);
		if (t[i].armed)
			reattach(f);
		for (int b = 0; b < 3; b++) { /* once per image: never again */
			assert_int_equal(queue_rows(f, NULL), 0);
			assert_int_equal(run_check(f), 0);
		}
	}
}

/* The re-exec bookkeeping: parse (garbage counts as a first image), the delays of a burst, a new window, format. */
static void reexec_plan(void **state)
{
	(void)state;
	static const struct { const char *in; int rv; uint32_t count; uint64_t window; uint32_t in_window; } p[] = {
		{NULL, 0, 0, 0, 0},        {"", 0, 0, 0, 0},          {"1 2 3", 0, 1, 2, 3},
		{"7 123456 2", 0, 7, 123456, 2}, {"x", -EINVAL, 0, 0, 0}, {"1 2", -EINVAL, 0, 0, 0},
		{"1 2 3 4", -EINVAL, 0, 0, 0}, {"-1 2 3", -EINVAL, 0, 0, 0}, {" 1 2 3", -EINVAL, 0, 0, 0},
		{"4294967296 0 0", -EINVAL, 0, 0, 0}, {"1 2 3x", -EINVAL, 0, 0, 0}, {"1 2 -3", -EINVAL, 0, 0, 0},
	};
	for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) {
		ax__cuda_be_reexec r = {9, 9, 9};
		assert_int_equal(ax__cuda_be_reexec_parse(p[i].in, &r), p[i].rv);
		assert_int_equal(r.count, p[i].count);
		assert_int_equal(r.window_s, p[i].window);
		assert_int_equal(r.in_window, p[i].in_window);
	}
	/* A burst at t = 1000 s: three free, then 1, 2, 4, 8, 16, 32 s, then 60 s for good. */
	static const uint64_t want[] = {0, 0, 0, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000};
	ax__cuda_be_reexec r;
	assert_int_equal(ax__cuda_be_reexec_parse(NULL, &r), 0);
	for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
		assert_int_equal(ax__cuda_be_reexec_next(&r, 1000 + i), want[i]);
		assert_int_equal(r.count, i + 1);
		assert_int_equal(r.window_s, 1000);
	}
	/* A minute later: a new window, free again; the total goes on. */
	assert_int_equal(ax__cuda_be_reexec_next(&r, 1060), 0);
	assert_int_equal(r.in_window, 1);
	assert_int_equal(r.window_s, 1060);
	assert_int_equal(r.count, 13);
	/* format → parse round trip; too small a buffer */
	char buf[64];
	assert_true(ax__cuda_be_reexec_format(&r, buf, sizeof buf) > 0);
	assert_string_equal(buf, "13 1060 1");
	ax__cuda_be_reexec back;
	assert_int_equal(ax__cuda_be_reexec_parse(buf, &back), 0);
	assert_memory_equal(&back, &r, sizeof r);
	assert_int_equal(ax__cuda_be_reexec_format(&r, buf, 5), -ENOSPC);
}

#define CASE(i) \
	static void case_##i(void **s) { g_case = &cases[i]; run_case(s); }
CASE(0)
CASE(1)
CASE(2)
CASE(3)

int main(void)
{
	struct CMUnitTest t[] = {
		cmocka_unit_test_setup_teardown(case_0, setup, teardown),
		cmocka_unit_test_setup_teardown(case_1, setup, teardown),
		cmocka_unit_test_setup_teardown(case_2, setup, teardown),
		cmocka_unit_test_setup_teardown(case_3, setup, teardown),
		cmocka_unit_test_setup_teardown(reset_never_recovers, setup, teardown),
		cmocka_unit_test_setup_teardown(fault_env, setup, teardown),
		cmocka_unit_test(reexec_plan),
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
		t[i].name = cases[i].name;
	ax_log_set_level(AX_LOG_WARN);
	return cmocka_run_group_tests(t, NULL, NULL);
}
