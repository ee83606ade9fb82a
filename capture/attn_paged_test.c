/*
 * attn_paged_test.c — paged addressing (vLLM block tables, attn.h's AX_ATTN_INDEX_PAGED) on the CPU backend and on
 * the CUDA backend's algorithm emulated on the CPU (attn_cuda_logic.h + attn_cuda_plan.h, as attn_cuda_logic_test.c
 * runs them). Usage: attn_paged_test cpu | emu (meson registers both).
 *
 * Every case of attn_cuda_testdata.h's table becomes a paged job (attn_paged_testdata.h: shuffled block ids, block
 * sizes 1, 16, 256 and 48 (not a power of two), NHD, HND and K/V-interleaved pools, poison wherever a correct
 * backend must not read) and must give (a) the float64 reference of the token job holding the same key bytes (top-k
 * set, ties by lower position, logits and logsumexp within 1e-3) and (b) bit for bit what the same backend gives the
 * token job.
 * Error cases: block ids past the pool, negative, at the window's first visible block (-ERANGE before any key is
 * read), an infinite key (-EDOM), bad block sizes, n_blocks, n_slots, strides, index kinds and dtypes (-EINVAL);
 * the emulated backend also runs everything as one batch mixed with token jobs. AX_TEST_SEED=N repeats a run.
 */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

static uint32_t g_misaligned; /* emulated 16-byte loads from addresses that are not 16-byte aligned */

static void emu_load16(uint32_t w[4], const void *p)
{
	g_misaligned += (uintptr_t)p % 16 != 0;
	memcpy(w, p, 16);
}
#define AXC_EMU_LOAD16(w, p) emu_load16((w), (p))

#include "attn.h"
#include "attn_cuda_plan.h"
#include "attn_paged_testdata.h"

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define TOL 1e-3

static int g_emu; /* 1: the emulated CUDA backend, 0: ax_attn_cpu */
static ax_attn_scratch *g_scratch;

/* ---- the emulated CUDA backend (attn_cuda_logic_test.c's emulator, default thread counts) ------------------------ */

static void emu_pass(const axc_plan *p, char *d, const axc_pass *P)
{
	axc_split_sm *sm = malloc(sizeof *sm);
	axc_merge_sm *msm = malloc(sizeof *msm);
	assert_non_null(sm);
	assert_non_null(msm);
	for (uint32_t i = 0; i < P->nseg; i++) {
		const axc_segment *sg = &P->seg[i];
		axc_args a = axc_plan_seg_args(p, d, P, sg);
		uint32_t kdt = sg->inst / 8 + AX_DTYPE_F32, idt = sg->inst % 8 >= 4 ? AX_DTYPE_I64 : AX_DTYPE_I32;
		static const uint32_t dcs[4] = {64, 128, 256, 0};
		float *dyn = malloc(axc_split_dyn_floats(sg->qcap, sg->dmax) * sizeof(float));
		assert_non_null(dyn);
		for (uint32_t cta = 0; cta < sg->count; cta++) {
			memset(sm, 0xa5, sizeof *sm); /* shared memory is garbage at launch */
			axc_split_cta(&a, cta, AXC_SPLIT_THREADS, sm, dyn, kdt, idt, dcs[sg->inst % 4]);
		}
		free(dyn);
	}
	axc_args a = axc_plan_args(p, d, P);
	for (uint32_t r = 0; r < P->nmr; r++) {
		memset(msm, 0xa5, sizeof *msm);
		axc_merge_row(&a, r, AXC_MERGE_THREADS, AXC_MERGE_CAP, msm);
	}
	free(sm);
	free(msm);
}

static int emu_run(const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc)
{
	axc_plan *p = calloc(1, sizeof *p);
	assert_non_null(p);
	int r = axc_plan_build(p, jobs, n, rc, 528);
	if (r == 0 && p->A.npj) {
		char *d = aligned_alloc(256, (p->L.total + 255) / 256 * 256);
		assert_non_null(d);
		memset(d, 0xa5, p->L.total); /* device memory is garbage: results poisoned */
		axc_plan_tables(p, d);
		memset(d + p->L.flags, 0, n * sizeof(uint32_t));
		emu_pass(p, d, &p->A);
		emu_pass(p, d, &p->B);
		axc_plan_finish(p, d, jobs, out, rc);
		free(d);
	}
	axc_plan_free(p);
	return r;
}

/* One job on the backend under test; returns its code. */
static int run1(const ax_attn_job *job, ax_attn_result *out)
{
	memset(out, 0xff, ax_attn_rows(job) * sizeof *out);
	if (!g_emu)
		return ax_attn_cpu(job, g_scratch, out);
	int rc = 12345;
	assert_int_equal(emu_run(job, 1, out, &rc), 0);
	return rc;
}

/* ---- cases ------------------------------------------------------------------------------------------------------- */

static const struct {
	uint32_t bs;
	int layout; /* TP_NHD, TP_HND, TP_KV */
} layouts[] = {{1, TP_NHD}, {16, TP_NHD}, {256, TP_NHD}, {16, TP_HND}, {48, TP_HND}, {256, TP_HND}, {16, TP_KV}};
static const char *const layout_names[] = {"", " HND", " K/V"};

/* Case c with layout l: the paged job against the reference and against the token job, bit for bit. */
static void check_case(const tcase *c, size_t l)
{
	tdata t;
	tpaged p;
	tref ref;
	char why[256] = "";
	int near = 0;
	td_make(c, &t);
	tp_make(&t, layouts[l].bs, layouts[l].layout, &p);
	uint32_t rows = ax_attn_rows(&t.job);
	ax_attn_result *tok = calloc(rows, sizeof *tok), *pg = calloc(rows, sizeof *pg);
	assert_non_null(tok);
	assert_non_null(pg);
	int rt = run1(&t.job, tok), rp = run1(&p.job, pg);
	if (rt != 0 || rp != 0)
		fail_msg("%s, bs %u%s: token job %d, paged job %d", c->name, layouts[l].bs,
			 layout_names[layouts[l].layout], rt, rp);
	td_ref(&t.job, &ref);
	if (td_check(&ref, c->top_k, pg, TOL, &near, why, sizeof why) != 0)
		fail_msg("%s, bs %u%s: %s", c->name, layouts[l].bs, layout_names[layouts[l].layout], why);
	if (!tp_same_rows(tok, pg, rows))
		fail_msg("%s, bs %u%s: paged rows differ from the token job's", c->name, layouts[l].bs,
			 layout_names[layouts[l].layout]);
	td_ref_free(&ref);
	free(tok);
	free(pg);
	tp_free(&p);
	td_free(&t);
}

/* CPU: every case in every layout. Emulated: every case in one layout (rotating), the slow emulator's budget. */
static void test_cases(void **state)
{
	(void)state;
	for (size_t i = 0; i < ARRAY_LEN(td_cases); i++)
		for (size_t l = 0; l < ARRAY_LEN(layouts); l++)
			if (!g_emu || l == i % ARRAY_LEN(layouts))
				check_case(&td_cases[i], l);
	assert_int_equal(g_misaligned, 0);
}

/* ---- errors ------------------------------------------------------------------------------------------------------ */

typedef struct perr {
	const char *name;
	void (*spoil)(tpaged *p, uint64_t start, uint64_t last_cell);
	int32_t window;
	int want;
} perr;

static void s_none(tpaged *p, uint64_t start, uint64_t lc) { (void)p, (void)start, (void)lc; }
static void s_end(tpaged *p, uint64_t start, uint64_t lc) { (void)start, p->table[lc] = (int32_t)p->blocks; }
static void s_neg(tpaged *p, uint64_t start, uint64_t lc) { p->table[(start / 16 + lc) / 2] = -1; }
static void s_first(tpaged *p, uint64_t start, uint64_t lc) { (void)lc, p->table[start / 16] = INT32_MAX; }
static void s_nblocks(tpaged *p, uint64_t start, uint64_t lc)
{
	(void)start, (void)lc;
	uint32_t mx = 0;
	for (uint64_t c = start / 16; c <= lc; c++)
		mx = (uint32_t)p->table[c] > mx ? (uint32_t)p->table[c] : mx;
	p->job.n_blocks = mx; /* the highest block a visible key uses is now one past the pool */
}
static void s_inf(tpaged *p, uint64_t start, uint64_t lc)
{
	(void)lc;
	uint64_t j = start + 5, b = (uint64_t)p->table[j / 16];
	((uint16_t *)p->k)[b * p->job.k_block_stride + (j % 16) * p->job.k_stride[0] + 3] = 0x7f80;
}
static void s_bs0(tpaged *p, uint64_t s, uint64_t lc) { (void)s, (void)lc, p->job.block_size = 0; }
static void s_bsbig(tpaged *p, uint64_t s, uint64_t lc)
{
	(void)s, (void)lc, p->job.block_size = AX_ATTN_MAX_BLOCK_SIZE + 1;
}
static void s_nb0(tpaged *p, uint64_t s, uint64_t lc) { (void)s, (void)lc, p->job.n_blocks = 0; }
static void s_slots(tpaged *p, uint64_t s, uint64_t lc) { (void)s, (void)lc, p->job.n_slots = 5; }
static void s_sb(tpaged *p, uint64_t s, uint64_t lc) { (void)s, (void)lc, p->job.k_block_stride = (uint64_t)1 << 61; }
static void s_s0(tpaged *p, uint64_t s, uint64_t lc) { (void)s, (void)lc, p->job.k_stride[0] = (uint64_t)1 << 58; }
static void s_kind(tpaged *p, uint64_t s, uint64_t lc) { (void)s, (void)lc, p->job.index_kind = 7; }
static void s_i64(tpaged *p, uint64_t s, uint64_t lc) { (void)s, (void)lc, p->job.index_dtype = AX_DTYPE_I64; }
static void s_token(tpaged *p, uint64_t s, uint64_t lc) { (void)s, (void)lc, p->job.index_kind = AX_ATTN_INDEX_TOKEN; }

static const perr perrs[] = {
	{"valid (the base of the cases below)", s_none, 0, 0},
	{"valid, window: garbage cells before it are never read", s_none, 1500, 0},
	{"block id = n_blocks in the last cell", s_end, 0, -ERANGE},
	{"block id -1 in the middle", s_neg, 0, -ERANGE},
	{"block id INT32_MAX at the window's first block", s_first, 1500, -ERANGE},
	{"n_blocks one short of a used block", s_nblocks, 0, -ERANGE},
	{"inf in a visible key", s_inf, 0, -EDOM},
	{"block size 0", s_bs0, 0, -EINVAL},
	{"block size past the maximum", s_bsbig, 0, -EINVAL},
	{"n_blocks 0", s_nb0, 0, -EINVAL},
	{"n_slots set on a paged job", s_slots, 0, -EINVAL},
	{"block stride past 2^62 bytes", s_sb, 0, -EINVAL},
	{"row stride past 2^62 bytes", s_s0, 0, -EINVAL},
	{"unknown index kind", s_kind, 0, -EINVAL},
	{"i64 block table", s_i64, 0, -EINVAL},
	{"a paged job read as a token job (n_slots 0)", s_token, 0, -EINVAL},
};

/* A 2000-key bf16 job (H 4, H_kv 2, D 64, top-5) with block size 16, spoiled; codes as the backend must give them,
 * and a valid job's rows equal to the reference. */
static void test_errors(void **state)
{
	(void)state;
	for (size_t i = 0; i < ARRAY_LEN(perrs); i++) {
		tcase c = {"paged errors", ML, BF, BF, I32, 64, 4, 2, 5, 2000, perrs[i].window, 0, 0, {0}, 0, 0};
		tdata t;
		tpaged p;
		td_make(&c, &t);
		tp_make(&t, 16, TP_NHD, &p);
		uint64_t start = c.window ? 2000 - (uint64_t)c.window : 0, last_cell = 1999 / 16;
		perrs[i].spoil(&p, start, last_cell);
		ax_attn_result out[1];
		int rc = run1(&p.job, out);
		if (rc != perrs[i].want)
			fail_msg("%s: %d, want %d", perrs[i].name, rc, perrs[i].want);
		if (rc == 0) {
			tref ref;
			char why[256];
			int near = 0;
			td_ref(&t.job, &ref);
			if (td_check(&ref, c.top_k, out, TOL, &near, why, sizeof why))
				fail_msg("%s: %s", perrs[i].name, why);
			td_ref_free(&ref);
		}
		tp_free(&p);
		td_free(&t);
	}
}

/* Emulated only: token and paged jobs of every case in one batch (one plan, shared launches), each job's rows
 * bit for bit those of its own run, and a bad paged job in the middle failing alone. */
static void test_mixed_batch(void **state)
{
	(void)state;
	enum { N = ARRAY_LEN(td_cases) };
	tdata t[N];
	tpaged p[N];
	ax_attn_job jobs[2 * N + 1];
	uint32_t rows = 0, off[2 * N + 1];
	for (size_t i = 0; i < N; i++) {
		td_make(&td_cases[i], &t[i]);
		tp_make(&t[i], layouts[(i + 1) % ARRAY_LEN(layouts)].bs, (int)(i % 3), &p[i]);
		jobs[2 * i] = t[i].job;
		jobs[2 * i + 1] = p[i].job;
	}
	jobs[2 * N] = p[0].job;
	jobs[2 * N].block_size = 0; /* invalid: -EINVAL, the rest unaffected */
	for (size_t i = 0; i < 2 * N + 1; i++)
		off[i] = rows, rows += ax_attn_rows(&jobs[i]);
	ax_attn_result *out = calloc(rows, sizeof *out), *one = calloc(64, sizeof *one);
	int rc[2 * N + 1];
	assert_non_null(out);
	assert_non_null(one);
	assert_int_equal(emu_run(jobs, 2 * N + 1, out, rc), 0);
	assert_int_equal(rc[2 * N], -EINVAL);
	for (size_t i = 0; i < 2 * N; i++) {
		if (rc[i] != 0)
			fail_msg("batch job %zu (%s): %d", i, td_cases[i / 2].name, rc[i]);
		assert_true(ax_attn_rows(&jobs[i]) <= 64);
		assert_int_equal(run1(&jobs[i], one), 0);
		if (!tp_same_rows(one, out + off[i], ax_attn_rows(&jobs[i])))
			fail_msg("batch job %zu (%s, %s) differs from its own run", i, td_cases[i / 2].name,
				 i % 2 ? "paged" : "token");
	}
	free(out);
	free(one);
	for (size_t i = 0; i < N; i++) {
		tp_free(&p[i]);
		td_free(&t[i]);
	}
}

int main(int argc, char **argv)
{
	if (argc != 2 || (strcmp(argv[1], "cpu") && strcmp(argv[1], "emu"))) {
		fprintf(stderr, "usage: %s cpu|emu\n", argv[0]);
		return 2;
	}
	g_emu = !strcmp(argv[1], "emu");
	const char *e = getenv("AX_TEST_SEED");
	uint64_t seed = e ? strtoull(e, NULL, 0) : (uint64_t)time(NULL);
	td_state = seed;
	printf("# %s, seed %llu (AX_TEST_SEED=%llu repeats it)\n", argv[1], (unsigned long long)seed,
	       (unsigned long long)seed);
	g_scratch = ax_attn_scratch_new();
	const struct CMUnitTest cpu_tests[] = {
		cmocka_unit_test(test_cases),
		cmocka_unit_test(test_errors),
	};
	const struct CMUnitTest emu_tests[] = {
		cmocka_unit_test(test_cases),
		cmocka_unit_test(test_errors),
		cmocka_unit_test(test_mixed_batch),
	};
	int r = g_emu ? cmocka_run_group_tests(emu_tests, NULL, NULL) : cmocka_run_group_tests(cpu_tests, NULL, NULL);
	ax_attn_scratch_free(g_scratch);
	return r;
}
