/*
 * attn_cuda_prefill_emu_test.cc — attn_cuda_prefill.cu's kernels run on the CPU, unchanged, under the SIMT
 * emulator of attn_cuda_fast_emu.h (g++, no GPU, no nvcc): the real plan and layout of attn_cuda_prefill.h, host
 * memory in place of device memory, each launch's CTAs one after the other.
 * What it checks: every row of prompts of several shapes (GQA 1/4/8, bf16/f16, i32/i64, windows, rows from
 * position 0, top-k 1..64, the three modes) against the float64 reference (attn_cuda_testdata.h: positions with
 * near-ties, logits and logsumexp within 1e-3, ties by lower position), against ax_attn_cpu (the same
 * positions up to near-ties, values within 1e-3) and against the existing generic path (attn_cuda_logic.h's
 * CTAs emulated as attn_paged_test.c does, one job per row: within 1e-4); entries past k are (-1, -inf); under three planner settings (one split per block, a few,
 * many 16-key splits; rows per block 4..64); a batch of two interleaved layers plus unrelated decode jobs (the
 * daemon's job order); error codes per row (-ERANGE for the rows that see an out-of-pool slot, -EDOM for a NaN
 * key or a NaN Q row, -ERANGE winning, rows that do not see the bad key unharmed); and, by the emulator, that
 * warp collectives are never divergent and no CTA deadlocks. What it cannot check: races, memory ordering,
 * timing (the GPU test: attn_cuda_prefill_gpu.cu, which also compares with the existing fast/generic path).
 * The decode fast path's emulated plan is not run here: its host API is internal and moving (fastlat); the
 * GPU test compares with it.
 * AX_TEST_SEED=N changes the data.
 */
#define AXP_EMU 1
#include "attn_cuda_prefill.cu"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

extern "C" {
#include <cmocka.h>
}

#include "attn_cuda_prefill_testdata.h"

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* ---- emulated runs ------------------------------------------------------------------------------------------------ */

struct pemu_arg {
	axp_args a;
	int merge;
};

static void pemu_body(void *p)
{
	const pemu_arg *x = (const pemu_arg *)p;
	if (x->merge)
		axp_merge_kernel(x->a);
	else
		axp_split_kernel(x->a);
}

static axp_knobs g_pk = {16, 64, 8, 0}; /* min_rows 0: blocks of any size (the gate: attn_cuda_prefill_test) */

/* The driver's steps with host memory: plan, tables, zeroed row flags, passes A and B, finish. Jobs not placed
 * in a block keep rc = 1. Returns the rows placed. */
static uint32_t pemu_run(const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc)
{
	axp_plan *p = (axp_plan *)calloc(1, sizeof *p);
	assert_non_null(p);
	p->kn = g_pk;
	for (uint32_t i = 0; i < n; i++)
		rc[i] = 1;
	assert_int_equal(axp_plan_build(p, jobs, n, rc), 0);
	const uint32_t rows = p->nrows;
	if (rows) {
		char *buf = (char *)aligned_alloc(256, (p->lay.total + 255) / 256 * 256);
		assert_non_null(buf);
		memset(buf, 0xa5, p->lay.total); /* garbage: nothing may depend on scratch contents */
		axp_plan_tables(p, buf);
		memset(buf + p->lay.rflags, 0, p->nrows * sizeof(uint32_t));
		for (int ps = 0; ps < 2; ps++) {
			if (!p->ctas[ps])
				continue;
			pemu_arg x = {axp_plan_args(p, buf, ps), 0};
			emu_launch(p->ctas[ps], x.a.smem, pemu_body, &x);
			x.merge = 1;
			emu_launch((p->lists[ps] + AXP_NW - 1) / AXP_NW, 16, pemu_body, &x);
		}
		axp_plan_prefill_rows(p, jobs, out);
		axp_plan_finish(p, buf, jobs, out, rc);
		free(buf);
	}
	axp_plan_free(p);
	return rows;
}

/* The existing generic path (attn_cuda_logic.h / attn_cuda_plan.h, a stable host API), emulated as
 * attn_paged_test.c does: the CTAs' logic run one after the other on the CPU, one job per row. */
static void gemu_pass(const axc_plan *p, char *d, const axc_pass *P)
{
	axc_split_sm *sm = (axc_split_sm *)malloc(sizeof *sm);
	axc_merge_sm *msm = (axc_merge_sm *)malloc(sizeof *msm);
	assert_non_null(sm);
	assert_non_null(msm);
	for (uint32_t i = 0; i < P->nseg; i++) {
		const axc_segment *sg = &P->seg[i];
		axc_args a = axc_plan_seg_args(p, d, P, sg);
		const uint32_t kdt = sg->inst / 8 + AX_DTYPE_F32, idt = sg->inst % 8 >= 4 ? AX_DTYPE_I64 : AX_DTYPE_I32;
		static const uint32_t dcs[4] = {64, 128, 256, 0};
		float *dyn = (float *)malloc(axc_split_dyn_floats(sg->qcap, sg->dmax) * sizeof(float));
		assert_non_null(dyn);
		for (uint32_t cta = 0; cta < sg->count; cta++) {
			memset(sm, 0xa5, sizeof *sm);
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

static void gemu_run(const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc)
{
	axc_plan *p = (axc_plan *)calloc(1, sizeof *p);
	assert_non_null(p);
	assert_int_equal(axc_plan_build(p, jobs, n, rc, 528), 0);
	if (p->A.npj) {
		char *d = (char *)aligned_alloc(256, (p->L.total + 255) / 256 * 256);
		assert_non_null(d);
		memset(d, 0xa5, p->L.total);
		axc_plan_tables(p, d);
		memset(d + p->L.flags, 0, n * sizeof(uint32_t));
		gemu_pass(p, d, &p->A);
		gemu_pass(p, d, &p->B);
		axc_plan_finish(p, d, jobs, out, rc);
		free(d);
	}
	axc_plan_free(p);
}

/* ---- checks ---------------------------------------------------------------------------------------------------- */

static int g_near;

static uint64_t rows_of(const ax_attn_job *jobs, uint32_t n, uint32_t *roff)
{
	uint64_t rows = 0;
	for (uint32_t i = 0; i < n; i++)
		roff[i] = (uint32_t)rows, rows += ax_attn_rows(&jobs[i]);
	return rows;
}

/* Job i's rows: float64 reference, ax_attn_cpu, the (-1, -inf) padding past k. */
static int g_strict; /* 1: positions exactly the float64 reference's (exact ties there: byte-identical keys; not
		      * ax_attn_cpu's, whose fp32 sums may round equal keys differently) */

static void check_row(const ax_attn_job *jb, const ax_attn_result *got, const char *name, uint32_t i)
{
	char why[256] = "";
	int r = pd_check_row(jb, got, &g_near, why, sizeof why);
	const uint32_t rows = ax_attn_rows(jb);
	if (r == 0) {
		ax_attn_scratch *s = ax_attn_scratch_new();
		ax_attn_result *cpu = (ax_attn_result *)calloc(rows, sizeof *cpu);
		assert_int_equal(ax_attn_cpu(jb, s, cpu), 0);
		r = pd_same(got, cpu, rows, 1e-3, why, sizeof why);
		if (r == 0 && g_strict) {
			tref ref;
			td_ref(jb, &ref);
			const uint32_t kk = jb->top_k < ref.n ? jb->top_k : (uint32_t)ref.n;
			for (uint32_t k = 0; r == 0 && k < rows; k++)
				for (uint32_t e = 0; r == 0 && e < kk; e++)
					if (got[k].pos[e] != ref.order[(size_t)k * kk + e])
						r = td_fail(why, sizeof why, "row %u entry %u: position %lld, float64 %lld (exact tie)",
							    k, e, (long long)got[k].pos[e], (long long)ref.order[(size_t)k * kk + e]);
			td_ref_free(&ref);
		}
		for (uint32_t k = 0; r == 0 && k < rows; k++)
			for (uint32_t e = got[k].k; r == 0 && e < AX_ATTN_MAX_TOPK; e++)
				if (got[k].pos[e] != -1 || got[k].logit[e] != -INFINITY)
					r = td_fail(why, sizeof why, "row %u entry %u past k: %lld", k, e,
						    (long long)got[k].pos[e]);
		free(cpu);
		ax_attn_scratch_free(s);
	}
	if (r)
		fail_msg("%s: job %u (position %llu): %s", name, i, (unsigned long long)jb->position, why);
}

/* Run jobs through the emulated prefill path (want_placed of them must be placed); check every placed row
 * against float64, ax_attn_cpu and the emulated generic path. */
static void check_batch(const ax_attn_job *jobs, uint32_t n, const char *name, uint32_t want_placed)
{
	uint32_t *roff = (uint32_t *)calloc(n, sizeof *roff);
	const uint64_t rows = rows_of(jobs, n, roff);
	ax_attn_result *got = (ax_attn_result *)calloc(rows, sizeof *got), *gen = (ax_attn_result *)calloc(rows, sizeof *gen);
	int *rc = (int *)calloc(n, sizeof *rc), *grc = (int *)calloc(n, sizeof *grc);
	memset(got, 0x5a, rows * sizeof *got); /* poisoned: unwritten entries fail */
	assert_int_equal(pemu_run(jobs, n, got, rc), want_placed);
	gemu_run(jobs, n, gen, grc);
	for (uint32_t i = 0; i < n; i++) {
		if (rc[i] == 1) /* not placed: the other paths' job */
			continue;
		if (rc[i] != 0)
			fail_msg("%s: job %u: rc %d", name, i, rc[i]);
		check_row(&jobs[i], got + roff[i], name, i);
		char why[256] = "";
		assert_int_equal(grc[i], 0);
		if (pd_same(got + roff[i], gen + roff[i], ax_attn_rows(&jobs[i]), 1e-4, why, sizeof why))
			fail_msg("%s: job %u vs the generic path: %s", name, i, why);
	}
	free(roff);
	free(got);
	free(gen);
	free(rc);
	free(grc);
}

/* ---- cases ------------------------------------------------------------------------------------------------------ */

static const pcase p_cases[] = {
	/* name, mode, dt, idt, H, Hkv, top_k, P, rows, window, tie */
	{"heads bf16 G4 k10", AX_MODE_HEADS, BF, I32, 32, 8, 10, 200, 20, 0, 1, 0},
	{"logit bf16 G4 k10", AX_MODE_MEAN_LOGIT, BF, I32, 32, 8, 10, 300, 17, 0, 1, 0},
	{"prob bf16 G4 k10", AX_MODE_MEAN_PROB, BF, I32, 32, 8, 10, 150, 9, 0, 1, 0},
	{"heads f16 G8 k64 window i64", AX_MODE_HEADS, F16, I64, 16, 2, 64, 120, 12, 50, 1, 0},
	{"logit f16 H64 G8 window (4 rows a block)", AX_MODE_MEAN_LOGIT, F16, I32, 64, 8, 5, 100, 9, 40, 0, 0},
	{"prob f16 G1 k33 window i64", AX_MODE_MEAN_PROB, F16, I64, 8, 8, 33, 90, 40, 30, 1, 0},
	{"heads G4 H_kv1 k1 from position 0", AX_MODE_HEADS, BF, I32, 4, 1, 1, 40, 40, 0, 1, 0},
	{"logit 3 keys", AX_MODE_MEAN_LOGIT, BF, I64, 32, 8, 10, 3, 3, 0, 0, 0},
	{"prob G2 window 1", AX_MODE_MEAN_PROB, BF, I32, 4, 2, 3, 30, 6, 1, 0, 0},
	{"heads flat (ties everywhere) k5", AX_MODE_HEADS, BF, I32, 8, 2, 5, 150, 10, 0, 0, 1},
	{"logit flat (ties everywhere) k7", AX_MODE_MEAN_LOGIT, F16, I64, 16, 4, 7, 200, 9, 0, 0, 1},
};

static const axp_knobs p_knobs[] = {
	{16, 64, 8, 0},      /* a few splits */
	{4, 16, 100000, 0},  /* many 16-key splits, small blocks */
	{64, 1u << 20, 1, 0} /* one split per block, blocks as large as fit */
};

static void test_cases(void **state)
{
	(void)state;
	for (size_t k = 0; k < ARRAY_LEN(p_knobs); k++)
		for (size_t c = 0; c < ARRAY_LEN(p_cases); c++) {
			pdata t;
			pd_make(&p_cases[c], &t);
			g_pk = p_knobs[k];
			g_strict = p_cases[c].flat;
			char name[160];
			snprintf(name, sizeof name, "%s (knobs %zu)", p_cases[c].name, k);
			check_batch(t.jobs, t.rows, name, t.rows);
			pd_free(&t);
		}
	g_pk = p_knobs[0];
	g_strict = 0;
}

/* The daemon's order: token-major, two layers interleaved, plus decode jobs of another request and a job the
 * fast path does not take (f32): the prefill rows are found and placed, the others left alone. */
static void test_interleaved(void **state)
{
	(void)state;
	const pcase a = {"layer a", AX_MODE_HEADS, BF, I32, 32, 8, 10, 160, 11, 0, 1, 0};
	const pcase b = {"layer b", AX_MODE_MEAN_LOGIT, BF, I32, 32, 8, 7, 160, 11, 0, 0, 0};
	const pcase d = {"decode", AX_MODE_MEAN_LOGIT, BF, I32, 32, 8, 10, 90, 1, 0, 0, 0};
	pdata ta, tb, td;
	pd_make(&a, &ta);
	pd_make(&b, &tb);
	pd_make(&d, &td);
	ax_attn_job jobs[32];
	uint32_t n = 0;
	for (uint32_t r = 0; r < 11; r++) {
		jobs[n++] = ta.jobs[r];
		jobs[n++] = tb.jobs[r];
		if (r == 5)
			jobs[n++] = td.jobs[0];
	}
	check_batch(jobs, n, "interleaved", 22);
	pd_free(&ta);
	pd_free(&tb);
	pd_free(&td);
}

/* Errors per row: kind 0: slot out of the pool at position `at`; 1: NaN in that key; 2: NaN in Q row `at`;
 * 3: both 0 and 1 (-ERANGE wins). Rows that see the key fail, the others are checked as usual. */
struct perr {
	const char *name;
	int kind;
	uint64_t at;     /* a position (kinds 0, 1, 3) or a row (kind 2) */
	int32_t window;
};

static const perr p_errors[] = {
	{"slot past the pool", 0, 95, 0},
	{"NaN key", 1, 97, 0},
	{"NaN in Q row 3", 2, 3, 0},
	{"range wins", 3, 92, 0},
	{"slot past the pool, window", 0, 88, 8},
	{"NaN key before some windows", 1, 85, 10},
};

static void test_errors(void **state)
{
	(void)state;
	for (size_t c = 0; c < ARRAY_LEN(p_errors); c++) {
		const perr *E = &p_errors[c];
		const pcase pc = {E->name, AX_MODE_HEADS, BF, I64, 16, 4, 8, 100, 16, E->window, 0, 0};
		pdata t;
		pd_make(&pc, &t);
		uint16_t *k = (uint16_t *)t.k;
		int64_t *ix = (int64_t *)t.index;
		if (E->kind == 1 || E->kind == 3)
			k[(uint64_t)ix[E->at] * 4 * 128 + 5] = 0x7fc0; /* bf16 NaN */
		if (E->kind == 0 || E->kind == 3)
			ix[E->at] = (int64_t)t.slots + 5;
		if (E->kind == 2)
			((uint16_t *)t.q)[(size_t)E->at * 16 * 128 + 77] = 0x7fc0;
		ax_attn_result *got = (ax_attn_result *)calloc((size_t)t.rows * 16, sizeof *got);
		int rc[16];
		assert_int_equal(pemu_run(t.jobs, t.rows, got, rc), t.rows);
		for (uint32_t r = 0; r < t.rows; r++) {
			const ax_attn_job *jb = &t.jobs[r];
			const uint64_t first = axp_first_key(jb->position, jb->window);
			const int sees = E->kind != 2 && E->at >= first && E->at <= jb->position;
			const int want = E->kind == 2 ? (r == E->at ? -EDOM : 0)
					 : !sees      ? 0
					 : E->kind == 1 ? -EDOM
							: -ERANGE;
			if (rc[r] != want)
				fail_msg("%s: row %u (position %llu): rc %d, want %d", E->name, r,
					 (unsigned long long)jb->position, rc[r], want);
			if (want == 0)
				check_row(jb, got + (size_t)r * 16, E->name, r);
		}
		free(got);
		pd_free(&t);
	}
}

int main(void)
{
	const char *seed = getenv("AX_TEST_SEED");
	if (seed)
		td_state = strtoull(seed, NULL, 10);
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_cases),
		cmocka_unit_test(test_interleaved),
		cmocka_unit_test(test_errors),
	};
	int r = cmocka_run_group_tests(tests, NULL, NULL);
	printf("# near-tie substitutions: %d\n", g_near);
	return r;
}
