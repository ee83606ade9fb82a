/*
 * attn_cuda_fast_test.c — the CUDA fast path's host half (attn_cuda_fast.h) on the CPU: no GPU, no nvcc needed
 * to build it (gcc, cmocka). What the GPU runs (attn_cuda_fast.cu's kernels) is not exercised here: the GPU test
 * (attn_cuda_test.cu) compares it with the generic path and the float64 reference.
 *
 * Cases: eligibility (a table of jobs, each with the reason it must be refused or 0); the split planner (per-job
 * floors and the one-wave base split) against linear searches over random length sets and knob sets; whole plans of
 * random mixed batches against their invariants (codes, launch order, mean_prob's two pass-jobs sharing logsumexp
 * slots with the first launched before the second, splits covering every key, partial rows and entries disjoint and in
 * bounds, tickets, result rows, a layout of aligned, disjoint regions, split flag words, an upload only for launches
 * with a table); the planner's knobs (each pass-job's floor and the launch's base split against linear searches,
 * random knob sets in whole plans, the shapes under knobs, the environment parser); the flags → codes step
 * (-ERANGE winning over -EDOM, a job's code the OR of its pass-jobs' flag words, compact rows expanded only for
 * successful jobs, empty entries and entries past k as (-1, -inf)); and the dispatcher, with both runners backed by
 * ax_attn_cpu on host data: uniform batches go to one runner untouched, mixed ones are split (the fast runner sees
 * only eligible jobs, the generic one the rest, invalid jobs included) and scattered back to exactly what ax_attn_cpu
 * returns for the whole batch; a runner's whole-batch error comes back.
 * AX_TEST_SEED=N repeats a run (the seed is printed).
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

#include "attn.h"
#include "attn_cuda_fast.h"
#include "attn_cuda_testdata.h"

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* ---- eligibility ------------------------------------------------------------------------------------------------ */

static _Alignas(64) uint16_t fake_q[64 * 128];
static _Alignas(64) uint16_t fake_k[16];
static _Alignas(64) int32_t fake_index[4];
static int32_t one_head[1] = {0};

/* The lab's shape: bf16, H_q 32, H_kv 8, D 128, contiguous pool, top-10. Pointers only need to be aligned. */
static ax_attn_job base_job(void)
{
	ax_attn_job j;
	memset(&j, 0, sizeof j);
	j.q = fake_q, j.q_dtype = AX_DTYPE_BF16;
	j.k = fake_k, j.k_dtype = AX_DTYPE_BF16, j.k_scale = 1;
	j.k_stride[0] = 8 * 128, j.k_stride[1] = 128, j.k_stride[2] = 1, j.n_slots = 1000;
	j.index = fake_index, j.index_dtype = AX_DTYPE_I32;
	j.position = 4095;
	j.n_q_heads = 32, j.n_kv_heads = 8, j.head_dim = 128;
	j.scale = 0.088f;
	j.mode = AX_MODE_MEAN_LOGIT, j.top_k = 10;
	return j;
}

enum { X_NONE, X_F16, X_F32, X_QF32, X_E4M3, X_D64, X_HKV16, X_G16, X_G8, X_HKV1_S1, X_S1, X_KMIS, X_QMIS, X_S0ODD,
       X_CAP, X_LIST, X_HEADS, X_PROB, X_SCALE2, X_SCALENEG, X_TOPK0, X_TOPK64, X_I64, X_LONG, X_LONG_WINDOW,
       X_HKV3_G5, X_DTYPE_BAD };

static const struct elig_case {
	const char *name;
	int what;
	int why;
} elig_cases[] = {
	{"lab shape", X_NONE, AXF_OK},
	{"f16 keys and Q", X_F16, AXF_OK},
	{"f32 keys", X_F32, AXF_NO_DTYPE},
	{"f32 Q with bf16 keys", X_QF32, AXF_NO_DTYPE},
	{"fp8 keys", X_E4M3, AXF_NO_DTYPE},
	{"head_dim 64", X_D64, AXF_NO_DIM},
	{"H_kv 16", X_HKV16, AXF_NO_HEADS},
	{"group 16", X_G16, AXF_NO_HEADS},
	{"group 8", X_G8, AXF_OK},
	{"H_kv 1, any head stride", X_HKV1_S1, AXF_OK},
	{"KV heads not contiguous", X_S1, AXF_NO_LAYOUT},
	{"K pool 8-byte aligned only", X_KMIS, AXF_NO_LAYOUT},
	{"Q 8-byte aligned only", X_QMIS, AXF_NO_LAYOUT},
	{"slot stride not 16 bytes", X_S0ODD, AXF_NO_LAYOUT},
	{"logit cap", X_CAP, AXF_NO_CAP},
	{"heads with a head list", X_LIST, AXF_NO_LIST},
	{"heads, all heads", X_HEADS, AXF_OK},
	{"mean_prob", X_PROB, AXF_OK},
	{"scale 2", X_SCALE2, AXF_NO_SCALE},
	{"scale -0.5", X_SCALENEG, AXF_OK},
	{"top_k 0 (invalid)", X_TOPK0, AXF_NO_INVALID},
	{"top_k 64", X_TOPK64, AXF_OK},
	{"i64 index", X_I64, AXF_OK},
	{"2^31 visible keys", X_LONG, AXF_NO_LONG},
	{"2^31 keys, window 2^20", X_LONG_WINDOW, AXF_OK},
	{"H_kv 3, group 5", X_HKV3_G5, AXF_OK},
	{"index dtype f32 (invalid)", X_DTYPE_BAD, AXF_NO_INVALID},
};

static ax_attn_job elig_job(int what)
{
	ax_attn_job j = base_job();
	switch (what) {
	case X_F16: j.k_dtype = j.q_dtype = AX_DTYPE_F16; break;
	case X_F32: j.k_dtype = j.q_dtype = AX_DTYPE_F32; break;
	case X_QF32: j.q_dtype = AX_DTYPE_F32; break;
	case X_E4M3: j.k_dtype = AX_DTYPE_FP8_E4M3; break;
	case X_D64: j.head_dim = 64, j.k_stride[0] = 8 * 64, j.k_stride[1] = 64; break;
	case X_HKV16: j.n_kv_heads = 16, j.n_q_heads = 32, j.k_stride[0] = 16 * 128; break;
	case X_G16: j.n_q_heads = 128; break;
	case X_G8: j.n_q_heads = 64; break;
	case X_HKV1_S1: j.n_kv_heads = 1, j.n_q_heads = 8, j.k_stride[1] = 4096, j.k_stride[0] = 200; break;
	case X_S1: j.k_stride[1] = 136, j.k_stride[0] = 8 * 136; break;
	case X_KMIS: j.k = (const char *)fake_k + 8; break;
	case X_QMIS: j.q = (const char *)fake_q + 8; break;
	case X_S0ODD: j.k_stride[0] = 8 * 128 + 4; break;
	case X_CAP: j.logit_cap = 30; break;
	case X_LIST: j.mode = AX_MODE_HEADS, j.heads = one_head, j.n_heads = 1; break;
	case X_HEADS: j.mode = AX_MODE_HEADS; break;
	case X_PROB: j.mode = AX_MODE_MEAN_PROB; break;
	case X_SCALE2: j.scale = 2; break;
	case X_SCALENEG: j.scale = -0.5f; break;
	case X_TOPK0: j.top_k = 0; break;
	case X_TOPK64: j.top_k = 64; break;
	case X_I64: j.index_dtype = AX_DTYPE_I64; break;
	case X_LONG: j.position = ((uint64_t)1 << 31) - 1; break;
	case X_LONG_WINDOW: j.position = ((uint64_t)1 << 31) - 1, j.window = 1 << 20; break;
	case X_HKV3_G5: j.n_kv_heads = 3, j.n_q_heads = 15, j.k_stride[0] = 3 * 128; break;
	case X_DTYPE_BAD: j.index_dtype = AX_DTYPE_F32; break;
	}
	return j;
}

/* axc_check_job's alignment and extent checks (session 16: powers of two in place of divisions): a pointer not
 * aligned to its element size (this backend's own rule; attn_cpu only assumes it) and a pool whose farthest byte
 * passes 2^62 (attn_cpu's rule: it says -EINVAL too, before it reads anything) are -EINVAL; one step inside each
 * limit is valid. */
static void test_check_limits(void **state)
{
	(void)state;
	static const struct { uint32_t kdt, qdt, idt; size_t qoff, koff, ioff; uint64_t s0, slots; int want; } cs[] = {
		{AX_DTYPE_BF16, AX_DTYPE_BF16, AX_DTYPE_I32, 1, 0, 0, 1024, 1000, -EINVAL},
		{AX_DTYPE_BF16, AX_DTYPE_F32, AX_DTYPE_I32, 2, 0, 0, 1024, 1000, -EINVAL},
		{AX_DTYPE_BF16, AX_DTYPE_F32, AX_DTYPE_I32, 4, 0, 0, 1024, 1000, 0},
		{AX_DTYPE_BF16, AX_DTYPE_BF16, AX_DTYPE_I32, 0, 1, 0, 1024, 1000, -EINVAL},
		{AX_DTYPE_F32, AX_DTYPE_F32, AX_DTYPE_I32, 0, 2, 0, 1024, 1000, -EINVAL},
		{AX_DTYPE_FP8_E4M3, AX_DTYPE_BF16, AX_DTYPE_I32, 0, 1, 0, 1024, 1000, 0},
		{AX_DTYPE_BF16, AX_DTYPE_BF16, AX_DTYPE_I32, 0, 0, 2, 1024, 1000, -EINVAL},
		{AX_DTYPE_BF16, AX_DTYPE_BF16, AX_DTYPE_I64, 0, 0, 4, 1024, 1000, -EINVAL},
		{AX_DTYPE_BF16, AX_DTYPE_BF16, AX_DTYPE_I64, 0, 0, 8, 1024, 1000, 0},
		/* k_stride[0] · n_slots against 2^62 / element size */
		{AX_DTYPE_BF16, AX_DTYPE_BF16, AX_DTYPE_I32, 0, 0, 0, 1ull << 40, 1ull << 21, 0},
		{AX_DTYPE_BF16, AX_DTYPE_BF16, AX_DTYPE_I32, 0, 0, 0, 1ull << 40, (1ull << 21) + 1, -EINVAL},
		{AX_DTYPE_FP8_E5M2, AX_DTYPE_BF16, AX_DTYPE_I32, 0, 0, 0, 1ull << 40, 1ull << 22, 0},
		{AX_DTYPE_FP8_E5M2, AX_DTYPE_BF16, AX_DTYPE_I32, 0, 0, 0, 1ull << 40, (1ull << 22) + 1, -EINVAL},
		{AX_DTYPE_F32, AX_DTYPE_F32, AX_DTYPE_I32, 0, 0, 0, 1ull << 40, 1ull << 20, 0},
		{AX_DTYPE_F32, AX_DTYPE_F32, AX_DTYPE_I32, 0, 0, 0, 1ull << 40, (1ull << 20) + 1, -EINVAL},
	};
	ax_attn_scratch *sc = ax_attn_scratch_new();
	ax_attn_result out[1];
	assert_non_null(sc);
	for (size_t i = 0; i < ARRAY_LEN(cs); i++) {
		ax_attn_job j = base_job();
		j.k_dtype = cs[i].kdt, j.q_dtype = cs[i].qdt, j.index_dtype = cs[i].idt;
		j.q = (const char *)fake_q + 8 + cs[i].qoff;
		j.k = (const char *)fake_k + 8 + cs[i].koff;
		j.index = (const char *)fake_index + cs[i].ioff;
		j.k_stride[0] = cs[i].s0, j.n_slots = cs[i].slots;
		const int got = axc_check_job(&j);
		if (got != cs[i].want)
			fail_msg("case %zu: axc_check_job %d, want %d", i, got, cs[i].want);
		if (cs[i].want && cs[i].slots > 1000) /* the extents: attn_cpu's own check */
			if (ax_attn_cpu(&j, sc, out) != cs[i].want)
				fail_msg("case %zu: ax_attn_cpu does not say %d", i, cs[i].want);
	}
	ax_attn_scratch_free(sc);
}

static void test_eligibility(void **state)
{
	(void)state;
	for (size_t i = 0; i < ARRAY_LEN(elig_cases); i++) {
		ax_attn_job j = elig_job(elig_cases[i].what);
		int why = axf_why_not(&j);
		if (why != elig_cases[i].why)
			fail_msg("%s: reason %d, want %d", elig_cases[i].name, why, elig_cases[i].why);
		assert_int_equal(axf_eligible(&j), elig_cases[i].why == AXF_OK);
	}
}

/* ---- the split planner ------------------------------------------------------------------------------------------ */

/* The knobs' floor of one pass-job, by its definition. */
static uint32_t lo_brute(const axf_knobs *kn, uint64_t n, int lists)
{
	uint64_t mink = lists ? kn->min_keys_heads : kn->min_keys, maxs = lists ? kn->max_splits_heads : kn->max_splits;
	if (!maxs || maxs > AXF_MAX_SPLITS)
		maxs = AXF_MAX_SPLITS;
	uint64_t c = AXF_TS;
	while (c < n && (c < mink || axf_splits(n, c) > maxs)) /* the least multiple of AXF_TS meeting both */
		c += AXF_TS;                                    /* or one split */
	return (uint32_t)c;
}

/* A random knob set: each knob 0 (off) a third of the time. */
static axf_knobs rand_knobs(void)
{
	axf_knobs k;
	memset(&k, 0, sizeof k);
	uint32_t *f[13] = {&k.ctas_per_sm,      &k.min_keys,    &k.max_splits,       &k.min_keys_heads,
			   &k.max_splits_heads, &k.merge_heads, &k.ctas_per_sm_heads, &k.merge_warp,
			   &k.host_merge,       &k.spin,        &k.raw_heads,   &k.prob_scores, &k.prob_scores_min};
	static const uint32_t lim[13] = {9, 5000, 1500, 5000, 1500, 300, 9, 100, 600, 2, 9000, 4, 60000};
	for (int i = 0; i < 13; i++)
		*f[i] = td_u64() % 3 == 0 ? 0 : (uint32_t)(td_u64() % lim[i]);
	return k;
}

/* The floors (axf_lo_chunk) and the base split (axf_plan_base) against their definitions by linear search. */
static void test_plan_base(void **state)
{
	(void)state;
	uint32_t nk[200], lo[200];
	for (int it = 0; it < 2000; it++) {
		axf_knobs kn = rand_knobs();
		uint32_t nj = 1 + (uint32_t)(td_u64() % (it % 3 == 0 ? 200 : 10)), R = 1 + (uint32_t)(td_u64() % 600);
		uint32_t lim = it % 3 == 0 ? 5000 : it % 3 == 1 ? 40000 : 300;
		uint32_t mx = 0;
		for (uint32_t i = 0; i < nj; i++) {
			nk[i] = 1 + (uint32_t)(td_u64() % lim);
			int lists = (int)(td_u64() % 2);
			lo[i] = axf_lo_chunk(&kn, nk[i], lists);
			uint32_t want = lo_brute(&kn, nk[i], lists);
			if (lo[i] != want)
				fail_msg("floor of n %u (lists %d): %u, by search %u", nk[i], lists, lo[i], want);
			assert_int_equal(lo[i] % AXF_TS, 0);
			assert_true(axf_splits(nk[i], lo[i]) <= AXF_MAX_SPLITS);
			mx = nk[i] > mx ? nk[i] : mx;
		}
		uint32_t b = axf_plan_base(nk, lo, nj, R), c = AXF_TS, top = (mx + AXF_TS - 1) / AXF_TS * AXF_TS;
		while (c < top && axf_total_splits_lo(nk, lo, nj, c) > R)
			c += AXF_TS;
		if (b != c)
			fail_msg("iteration %d: base %u, by search %u (nj %u, R %u)", it, b, c, nj, R);
		if (nj <= R)
			assert_true(axf_total_splits_lo(nk, lo, nj, b) <= R); /* one wave whenever one split each fits */
	}
	/* long jobs (up to 2^22 keys), many of them: the base by its two sides (it fits, one unit less does not) */
	axf_knobs none0 = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
	for (int it = 0; it < 300; it++) {
		uint32_t nj = 1 + (uint32_t)(td_u64() % 300), R = 1 + (uint32_t)(td_u64() % 600);
		for (uint32_t i = 0; i < nj; i++) {
			nk[i % 200] = 1 + (uint32_t)(td_u64() % (1u << 22));
			lo[i % 200] = axf_lo_chunk(&none0, nk[i % 200], 0);
		}
		nj = nj > 200 ? 200 : nj;
		uint32_t b = axf_plan_base(nk, lo, nj, R);
		assert_int_equal(b % AXF_TS, 0);
		if (nj <= R)
			assert_true(axf_total_splits_lo(nk, lo, nj, b) <= R);
		if (b > AXF_TS)
			assert_true(axf_total_splits_lo(nk, lo, nj, b - AXF_TS) > R);
		for (uint32_t i = 0; i < nj; i++)
			assert_true(axf_splits(nk[i], b > lo[i] ? b : lo[i]) <= AXF_MAX_SPLITS);
	}
	/* the shapes on an H100 (132 SMs × 2), the lab's planner: one wave */
	uint32_t one[1] = {1u << 20}, one_lo[1] = {axf_lo_chunk(&none0, 1u << 20, 0)};
	assert_true(axf_total_splits_lo(one, one_lo, 1, axf_plan_base(one, one_lo, 1, 264)) <= 264);
	uint32_t many[64], many_lo[64];
	for (int i = 0; i < 64; i++)
		many[i] = 4096, many_lo[i] = axf_lo_chunk(&none0, 4096, 0);
	assert_int_equal(axf_plan_base(many, many_lo, 64, 264), 1024); /* 4 splits each: 256 CTAs */
	/* the knobs' edges: huge floors give one split; caps hold */
	axf_knobs big = {0, 1u << 30, 0, 1u << 30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
	assert_int_equal(axf_lo_chunk(&big, 1000, 0), 1008);
	assert_int_equal(axf_lo_chunk(&big, 1, 1), AXF_TS);
	axf_knobs cap = {0, 0, 3, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
	assert_int_equal(axf_splits(4096, axf_lo_chunk(&cap, 4096, 0)), 3);
	assert_int_equal(axf_splits(4096, axf_lo_chunk(&cap, 4096, 1)), 7);
	axf_knobs none = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
	assert_int_equal(axf_lo_chunk(&none, 1u << 30, 1), (1u << 30) / AXF_MAX_SPLITS);
}

/* The knobs from the environment: set, garbage ignored, unset kept. */
static void test_knobs_env(void **state)
{
	(void)state;
	axf_knobs k = AXF_KNOBS_DEFAULT, d = AXF_KNOBS_DEFAULT;
	setenv("AX_FAST_CTAS_PER_SM", "4", 1);
	setenv("AX_FAST_MIN_SPLIT_KEYS", "12x", 1);
	setenv("AX_FAST_MAX_SPLITS", "-3", 1);
	setenv("AX_FAST_MIN_SPLIT_KEYS_HEADS", "99999999999", 1);
	setenv("AX_FAST_MAX_SPLITS_HEADS", "16", 1);
	setenv("AX_FAST_MERGE_HEADS", "0", 1);
	setenv("AX_FAST_CTAS_PER_SM_HEADS", "3", 1);
	setenv("AX_FAST_SPIN", "1", 1);
	setenv("AX_FAST_PDL", "x1", 1);
	setenv("AX_FAST_MERGE_WARP", "7", 1);
	setenv("AX_FAST_THREADS", "4", 1);
	setenv("AX_FAST_HOST_MERGE", "0", 1);
	setenv("AX_FAST_GRAPH", "1", 1);
	setenv("AX_FAST_TAIL", "20", 1);
	setenv("AX_FAST_TAIL_BLK", "4b", 1);
	setenv("AX_FAST_RAW_HEADS", "2048", 1);
	setenv("AX_FAST_PROB_SCORES", "0", 1);
	setenv("AX_FAST_PROB_SCORES_MIN", "100", 1);
	axf_knobs_env(&k);
	assert_int_equal(k.prob_scores, 0);
	assert_int_equal(d.prob_scores, 512);
	assert_int_equal(k.prob_scores_min, 100);
	assert_int_equal(d.prob_scores_min, 16384);
	assert_int_equal(k.raw_heads, 2048);
	assert_int_equal(d.raw_heads, 4096);
	assert_int_equal(k.tail, 20);
	assert_int_equal(k.tail_blk, d.tail_blk);
	assert_int_equal(d.tail, 15);
	assert_int_equal(d.tail_blk, 4);
	assert_int_equal(k.graph, 1);
	assert_int_equal(d.graph, 16384);
	assert_int_equal(k.host_merge, 0);
	assert_int_equal(d.host_merge, 256);
	assert_int_equal(k.spin, 1);
	assert_int_equal(k.pdl, d.pdl);
	assert_int_equal(k.merge_warp, 7);
	assert_int_equal(k.threads, 4);
	assert_int_equal(d.threads, 6);
	assert_int_equal(k.ctas_per_sm_heads, 3);
	assert_int_equal(k.ctas_per_sm, 4);
	assert_int_equal(k.min_keys, d.min_keys);
	assert_int_equal(k.max_splits, d.max_splits);
	assert_int_equal(k.min_keys_heads, d.min_keys_heads);
	assert_int_equal(k.max_splits_heads, 16);
	assert_int_equal(k.merge_heads, 0);
	const char *names[] = {"AX_FAST_CTAS_PER_SM", "AX_FAST_MIN_SPLIT_KEYS", "AX_FAST_MAX_SPLITS",
			       "AX_FAST_MIN_SPLIT_KEYS_HEADS", "AX_FAST_MAX_SPLITS_HEADS", "AX_FAST_MERGE_HEADS",
			       "AX_FAST_CTAS_PER_SM_HEADS", "AX_FAST_SPIN", "AX_FAST_PDL", "AX_FAST_MERGE_WARP",
			       "AX_FAST_THREADS", "AX_FAST_HOST_MERGE", "AX_FAST_GRAPH", "AX_FAST_TAIL", "AX_FAST_TAIL_BLK",
			       "AX_FAST_RAW_HEADS", "AX_FAST_PROB_SCORES", "AX_FAST_PROB_SCORES_MIN"};
	for (size_t i = 0; i < ARRAY_LEN(names); i++)
		unsetenv(names[i]);
	axf_knobs e = d;
	axf_knobs_env(&e);
	assert_memory_equal(&e, &d, sizeof d);
}

/* ---- whole plans ------------------------------------------------------------------------------------------------ */

/* A random job over fake pointers (plans never read them): eligible most of the time. */
static ax_attn_job rand_job(void)
{
	static const uint32_t modes[3] = {AX_MODE_MEAN_LOGIT, AX_MODE_HEADS, AX_MODE_MEAN_PROB};
	static const uint32_t hkv[5] = {1, 2, 3, 4, 8};
	ax_attn_job j = base_job();
	j.mode = modes[td_u64() % 3];
	j.n_kv_heads = hkv[td_u64() % 5];
	j.n_q_heads = j.n_kv_heads * (1 + (uint32_t)(td_u64() % 8));
	j.k_stride[0] = j.n_kv_heads * 128 + (td_u64() % 3) * 8;
	j.k_dtype = j.q_dtype = td_u64() % 2 ? AX_DTYPE_BF16 : AX_DTYPE_F16;
	j.index_dtype = td_u64() % 2 ? AX_DTYPE_I32 : AX_DTYPE_I64;
	j.top_k = 1 + (uint32_t)(td_u64() % 64);
	j.position = td_u64() % (td_u64() % 4 == 0 ? 2000000 : 5000);
	j.window = td_u64() % 5 == 0 ? (int32_t)(1 + td_u64() % 3000) : 0;
	j.head_offset = (uint32_t)(td_u64() % 100);
	switch (td_u64() % 12) { /* a few refused ones */
	case 0: j.logit_cap = 10; break;
	case 1: j.top_k = 0; break;
	case 2: j.k_dtype = AX_DTYPE_F32, j.q_dtype = AX_DTYPE_F32; break;
	default: break;
	}
	return j;
}

/* Every invariant of a plan of jobs[0 .. n). */
static void check_plan(const axf_plan *p, const ax_attn_job *jobs, uint32_t n, const int *rc, uint32_t R)
{
	uint64_t rows = 0, rents = 0, scs = 0;
	uint32_t want_pj = 0;
	/* knob prob_scores: mean_prob jobs get scores in job order while they fit, whole blocks of 8 keys of H rounded
	 * up to 4 floats */
	uint64_t *want_sc = calloc(n + 1, sizeof *want_sc), pkeys = 0;
	assert_non_null(want_sc);
	for (uint32_t i = 0; i < n; i++) {
		uint64_t st, nv;
		want_sc[i] = UINT64_MAX;
		if (rc[i] != 0 || jobs[i].mode != AX_MODE_MEAN_PROB)
			continue;
		axc_visible(&jobs[i], &st, &nv);
		pkeys += nv;
		const uint64_t f = (nv + 7) / 8 * 8 * ((jobs[i].n_q_heads + 3) / 4 * 4);
		if (scs + f <= (uint64_t)(p->kn.prob_scores < 512 ? p->kn.prob_scores : 512) * 1024 * 1024 / 4)
			want_sc[i] = scs, scs += f;
	}
	if (pkeys < p->kn.prob_scores_min) /* knob prob_scores_min: the run's mean_prob keys together */
		for (uint32_t i = 0; i < n; i++)
			want_sc[i] = UINT64_MAX, scs = 0;
	assert_int_equal(p->scs, scs);
	for (uint32_t i = 0; i < n; i++) {
		int why = axf_why_not(&jobs[i]);
		int want = why == AXF_OK ? 0 : why == AXF_NO_INVALID ? axc_check_job(&jobs[i]) : -EOPNOTSUPP;
		assert_int_equal(rc[i], want);
		assert_true(why != AXF_NO_INVALID || want != 0);
		assert_int_equal(p->roff[i], rows);
		assert_int_equal(p->eoff[i], rents);
		rows += axc_out_rows(&jobs[i]);
		rents += rc[i] == 0 ? (uint64_t)axc_out_rows(&jobs[i]) * axf_kout(&jobs[i]) : 0;
		want_pj += rc[i] == 0 ? (jobs[i].mode == AX_MODE_MEAN_PROB ? 2 : 1) : 0;
	}
	assert_int_equal(p->rows, rows);
	assert_int_equal(p->rents, rents);
	assert_int_equal(p->njb, want_pj);
	/* launches: each pass-job in exactly one, instances in launch order, contiguous */
	uint32_t next = 0, ord = 0, so = 0;
	uint64_t parts = 0, ents = 0, units = 0, hparts = 0, hents = 0;
	char *lse_used = calloc(p->njb + 1, 1); /* logsumexp pass-jobs whose probability pass was seen */
	char *ticket = calloc(p->njb + 1, 1);
	assert_non_null(lse_used);
	assert_non_null(ticket);
	for (uint32_t l = 0; l < p->nl; l++) {
		const axf_launch *L = &p->L[l];
		while (ord < AXF_N_INST && axf_launch_order[ord] != L->inst)
			ord++;
		assert_true(ord < AXF_N_INST); /* in launch order, each instance once */
		ord++;
		assert_int_equal(L->j0, next);
		assert_int_equal(L->so0, so);
		assert_true(L->nj > 0);
		uint32_t mode = axf_inst_mode(L->inst), ctas = 0, mg = 0, base = 0, msplits = 0, few = 1;
		/* raw (knob raw_heads): the launch's heads lists all short enough, k ≤ AXF_TS, one wave of 16-key splits,
		 * each merged apart by one CTA, a thread a split (≤ 256) — then all of them raw, else none */
		int any_lists = 0, raw = mode == AXF_M_HEADS && p->kn.raw_heads && p->kn.merge_heads;
		uint64_t raw_ctas = 0;
		for (uint32_t k = 0; k < L->nj; k++) {
			const axf_job *jb = &p->jb[L->j0 + k];
			const uint64_t S16 = (jb->n + AXF_TS - 1) / AXF_TS;
			any_lists |= axf_lists(mode, jb->K);
			raw &= jb->K >= 1 && jb->K <= AXF_TS && jb->n <= p->kn.raw_heads && S16 >= p->kn.merge_heads &&
			       S16 <= AXF_NW * 32;
			raw_ctas += S16;
		}
		const uint32_t RL = any_lists && p->res_lists ? p->res_lists : R;
		raw &= raw_ctas <= RL;
		uint64_t hm_splits = 0; /* the launch's splits in all */
		for (uint32_t k = 0; k < L->nj; k++)
			hm_splits += p->jb[L->j0 + k].S;
		for (uint32_t k = 0; k < L->nj; k++) {
			const axf_job *jb = &p->jb[L->j0 + k];
			const ax_attn_job *j = &jobs[jb->flag];
			uint64_t start, nv;
			axc_visible(j, &start, &nv);
			assert_true(jb->flag < n && rc[jb->flag] == 0);
			const int sc = want_sc[jb->flag] != UINT64_MAX;
			assert_int_equal(axf_inst(mode, j->k_dtype, j->n_q_heads / j->n_kv_heads, axf_pass_k(j, mode), sc),
					 L->inst);
			assert_true(!sc || L->inst >= 12); /* the scores' own instances */
			assert_int_equal(jb->scw, sc ? (jb->H + 3) / 4 * 4 : 0);
			assert_int_equal(jb->sc0, sc ? want_sc[jb->flag] : 0);
			assert_int_equal(jb->start, start);
			assert_int_equal(jb->n, nv);
			assert_int_equal(jb->G * jb->Hkv, jb->H);
			assert_int_equal(jb->chunk % AXF_TS, 0);
			assert_int_equal(jb->S, (jb->n + jb->chunk - 1) / jb->chunk);
			assert_true(jb->S >= 1 && jb->S <= AXF_MAX_SPLITS && (uint64_t)(jb->S - 1) * jb->chunk < jb->n);
			assert_true(jb->S <= AXF_MERGE_CAP);
			/* the tail (knob tail): equal static shares of ≥ 1 stage, the rest (≥ 1 stage) in blocks of at least
			 * tail_blk stages, one logsumexp partial each besides the splits' (≤ AXF_MAX_SPLITS a row) */
			const uint32_t nst = (jb->n + AXF_TS - 1) / AXF_TS;
			if (jb->tblk) {
				assert_true(p->kn.tail > 0 && jb->tss >= 1 && jb->lse_out < 0); /* not a logsumexp pass */
				assert_true(mode != AXF_M_PROB); /* nor a probability pass (session 18) */
				assert_int_equal(jb->tail0, jb->tss * jb->S);
				assert_true(jb->tail0 < nst && nst >= (uint64_t)AXF_TAIL_MIN * jb->S);
				/* blocks of tail_blk stages, at most the tail's share of a split, at least what keeps
				 * S + tblk ≤ AXF_MAX_SPLITS, at most the whole tail */
				const uint32_t rest = nst - jb->tail0, blk = p->kn.tail_blk ? p->kn.tail_blk : 1;
				const uint32_t share = rest / jb->S ? rest / jb->S : 1;
				const uint32_t least = (rest + AXF_MAX_SPLITS - jb->S - 1) / (AXF_MAX_SPLITS - jb->S);
				uint32_t want = blk < share ? blk : share;
				want = want > least ? want : least;
				assert_int_equal(jb->tstg, want < rest ? want : rest);
				assert_int_equal(jb->tblk, (nst - jb->tail0 + jb->tstg - 1) / jb->tstg);
				assert_true(jb->S + jb->tblk <= AXF_MAX_SPLITS);
			} else { /* none: off, short splits, no room for a block's partial, or shares that leave no tail */
				const uint32_t pct = p->kn.tail < 90 ? p->kn.tail : 90;
				const uint64_t tss = (uint64_t)nst * (100 - pct) / 100 / jb->S;
				assert_true(!pct || jb->lse_out >= 0 || mode == AXF_M_PROB || nst < (uint64_t)AXF_TAIL_MIN * jb->S ||
					    jb->S >= AXF_MAX_SPLITS || tss == 0 || tss * jb->S >= nst);
			}
			/* the knobs: at least the floor; above it, the launch's one base split */
			const int lists = axf_lists(mode, jb->K);
			const uint32_t lo = axf_lo_chunk(&p->kn, jb->n, lists);
			const uint32_t maxs = lists ? p->kn.max_splits_heads : p->kn.max_splits;
			assert_int_equal(jb->raw, raw);
			assert_int_equal(L->raw, raw);
			if (raw) /* splits of one stage, whatever the floors; merged apart; no tail */
				assert_true(jb->chunk == AXF_TS && jb->sepm && jb->tblk == 0);
			assert_true(raw || jb->chunk >= lo);
			assert_true(raw || !maxs || jb->S <= maxs);
			assert_true(raw || jb->S == 1 || jb->chunk >= (lists ? p->kn.min_keys_heads : p->kn.min_keys));
			if (jb->chunk > lo && !raw) {
				assert_true(base == 0 || base == jb->chunk);
				base = jb->chunk;
			}
			const uint32_t mh = p->kn.merge_heads;
			assert_int_equal(jb->sepm, lists && mh && jb->S >= mh);
			if (jb->sepm && jb->H > mg)
				mg = jb->H;
			if (jb->sepm && jb->S > msplits)
				msplits = jb->S;
			if (jb->sepm && (jb->K == 0 || jb->S * jb->K > AXF_FEW_ENTS))
				few = 0;
			if (jb->res >= 0)
				assert_int_equal(jb->rent, p->eoff[jb->flag]);
			assert_int_equal(p->so[L->so0 + k], ctas);
			ctas += jb->S;
			/* host merge: a mean_logit or probability pass-job alone in its launch, few enough splits, spin off; its partials
			 * in the staging's own regions (in plan order), not a unit of the completion count */
			const uint32_t hmk = p->kn.host_merge;
			assert_int_equal(L->hm, (mode == AXF_M_LOGIT || mode == AXF_M_PROB) && L->nj == 1 && !p->kn.spin &&
							hmk && hm_splits <= hmk);
			assert_int_equal(jb->hm, L->hm);
			if (jb->hm) {
				assert_int_equal(jb->part0, hparts);
				assert_int_equal(jb->pf0, hparts);
				assert_int_equal(jb->ent0, hents);
				hparts += jb->S + jb->tblk;
				hents += (uint64_t)jb->S * jb->K;
			} else {
				if (raw) /* its scores read as 16-byte vectors */
					ents = (ents + 3) / 4 * 4;
				assert_int_equal(jb->part0, parts);
				assert_int_equal(jb->ent0, ents);
				parts += (uint64_t)axf_prows(jb, mode) * (jb->S + jb->tblk);
				ents += (uint64_t)axf_prows(jb, mode) * jb->S * (raw ? AXF_TS : jb->K);
			}
			assert_false(ticket[jb->ticket]);
			ticket[jb->ticket] = 1;
			/* its last CTA merges it: one unit of the completion count (a logsumexp pass has no merge: its
			 * probability pass reduces its partials, session 22) */
			units += !jb->sepm && !jb->hm && jb->lse_out < 0;
			assert_true(jb->kout == (jb->K < jb->n ? jb->K : jb->n));
			if (j->mode == AX_MODE_MEAN_PROB && mode == AXF_M_HEADS) { /* logsumexp pass: before the second */
				assert_int_equal(jb->K, 0);
				assert_int_equal(jb->res, -1);
				assert_int_equal(jb->lse_out, 0);
			} else {
				assert_int_equal(jb->lse_out, -1);
				assert_int_equal(jb->res, (int32_t)p->roff[jb->flag]);
				assert_int_equal(jb->K, j->top_k);
				if (mode == AXF_M_PROB) {
					/* it reduces that pass's partials and ORs its flag words (session 22): the same user
					 * job's logsumexp pass-job, planned before it (an earlier launch), its only reader */
					uint32_t lk = 0;
					while (lk < p->njb && !(p->jb[lk].flag == jb->flag && p->jb[lk].lse_out >= 0))
						lk++;
					assert_true(lk < (uint32_t)(jb - p->jb));
					const axf_job *lj = &p->jb[lk];
					assert_true(jb->lpart0 == lj->part0 && jb->lpf0 == lj->pf0 && jb->lS == lj->S);
					assert_true(lj->tblk == 0 && jb->lticket == lj->ticket && !lj->hm);
					assert_false(lse_used[lk]);
					lse_used[lk] = 1;
				}
			}
			assert_true(jb->scale == j->scale && jb->head_offset == j->head_offset);
			assert_true(jb->q == j->q && jb->k == j->k && jb->index == j->index && jb->idt == j->index_dtype);
		}
		assert_int_equal(p->so[L->so0 + L->nj], ctas);
		assert_int_equal(L->ctas, ctas);
		/* merge CTAs: a row each, or a row per warp when every merged pass-job has ≤ merge_warp splits */
		const uint32_t rpc = mg && msplits <= p->kn.merge_warp && !raw ? AXF_NW : 1;
		assert_int_equal(L->mrpc, rpc);
		/* the few-list merge kernel: a row per warp, every merged pass-job's lists ≤ AXF_FEW_ENTS entries in all */
		assert_int_equal(L->few, rpc == AXF_NW && few);
		assert_true(!L->few || !L->raw);
		assert_int_equal(L->mg, (mg + rpc - 1) / rpc);
		assert_true((uint64_t)L->mg * L->mrpc >= mg && (L->mg == 0 || (L->mg - 1) * L->mrpc < mg));
		units += (uint64_t)L->nj * L->mg; /* every merge CTA is a unit, also those with nothing to merge */
		/* one wave whenever one split per pass-job fits (launches with heads lists: their own wave size) */
		if (L->nj <= RL)
			assert_true(ctas <= RL);
		next += L->nj, so += L->nj + 1;
	}
	assert_int_equal(next, p->njb);
	assert_int_equal(so, p->nso);
	assert_int_equal(p->parts, parts);
	assert_int_equal(p->entries, ents);
	assert_int_equal(p->hparts, hparts);
	assert_int_equal(p->hents, hents);
	assert_int_equal(p->units, units);
	for (uint32_t k = 0; k < p->njb; k++) /* every logsumexp pass-job has its probability pass */
		assert_int_equal(lse_used[k], p->jb[k].lse_out >= 0);
	/* layout: aligned, disjoint, in this order, large enough */
	const axf_layout *y = &p->lay;
	size_t off[] = {y->jobs, y->so,  y->pflags,   y->rlse, y->rent, y->hlse,   y->hpf,     y->hps,     y->hpp,
			y->part_lse, y->part_s, y->part_p, y->part_f, y->total};
	size_t need[] = {p->njb * sizeof(axf_job), p->nso * 4, p->njb * 4, p->rows * 4, p->rents * sizeof(axf_ent),
			 p->hparts * 4, p->hparts * 4, p->hents * 4, p->hents * 4, p->parts * 4,
			 p->entries * 4, p->entries * 4, p->pfl * 4};
	for (size_t i = 0; i + 1 < ARRAY_LEN(off); i++) {
		assert_int_equal(off[i] % 256, 0);
		assert_true(off[i] + need[i] <= off[i + 1]);
	}
	assert_int_equal(y->up, y->pflags); /* the upload: the tables only */
	assert_int_equal(y->off_dev, y->part_lse); /* the results in the staging, written by the kernels */
	/* split flag words: one per split, disjoint; the upload only when a launch has a table */
	uint64_t pfl = 0;
	uint32_t any_table = 0;
	for (uint32_t k = 0; k < p->njb; k++) {
		assert_int_equal(p->jb[k].ticket, k);
		if (p->jb[k].hm) /* its flag words in the staging (checked above) */
			continue;
		assert_int_equal(p->jb[k].pf0, pfl);
		pfl += p->jb[k].S;
	}
	for (uint32_t l = 0; l < p->nl; l++)
		any_table |= p->L[l].nj > 1;
	assert_int_equal(p->pfl, pfl);
	assert_int_equal(p->upload, any_table);
	free(lse_used);
	free(ticket);
	free(want_sc);
}

static void test_plans(void **state)
{
	(void)state;
	axf_plan *p = calloc(1, sizeof *p);
	assert_non_null(p);
	enum { MAXN = 200 };
	ax_attn_job jobs[MAXN];
	int rc[MAXN];
	const axf_knobs def = AXF_KNOBS_DEFAULT, none = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
	for (int it = 0; it < 600; it++) {
		uint32_t n = 1 + (uint32_t)(td_u64() % (it % 5 == 0 ? MAXN : 8));
		uint32_t R = it % 7 == 0 ? 1 : 8 + (uint32_t)(td_u64() % 600);
		p->kn = it % 3 == 0 ? none : it % 3 == 1 ? def : rand_knobs();
		p->res_lists = it % 4 == 3 ? 1 + (uint32_t)(td_u64() % 300) : 0;
		for (uint32_t i = 0; i < n; i++)
			jobs[i] = rand_job();
		assert_int_equal(axf_plan_build(p, jobs, n, rc, R), 0);
		check_plan(p, jobs, n, rc, R);
	}
	p->kn = none;
	p->res_lists = 0;
	/* knob prob_scores (session 14): 1 MiB holds one 6K-key job's scores (6144 × 32 floats = 768 KiB), not two;
	 * the first gets them (the scores' instances), the second runs its two passes over K, the heads job neither */
	p->kn.prob_scores = 1;
	for (int i = 0; i < 3; i++)
		jobs[i] = elig_job(i == 1 ? X_HEADS : X_PROB), jobs[i].position = 6143;
	assert_int_equal(axf_plan_build(p, jobs, 3, rc, 264), 0);
	check_plan(p, jobs, 3, rc, 264);
	assert_int_equal(p->scs, 6144 * 32);
	for (uint32_t k = 0, got = 0; k < p->njb; k++) {
		const axf_job *jb = &p->jb[k];
		assert_int_equal(jb->scw, jb->flag == 0 ? 32 : 0);
		got += jb->scw != 0;
		if (k == p->njb - 1)
			assert_int_equal(got, 2); /* both passes of job 0 */
	}
	assert_true(p->lay.sc >= p->lay.part_f && p->lay.total - p->lay.sc >= p->scs * 4);
	/* knob prob_scores_min (session 15): the two mean_prob jobs' 12288 keys give scores at 12288, none at 12289 */
	for (uint32_t m = 12288; m <= 12289; m++) {
		p->kn.prob_scores_min = m;
		assert_int_equal(axf_plan_build(p, jobs, 3, rc, 264), 0);
		check_plan(p, jobs, 3, rc, 264);
		assert_int_equal(p->scs, m == 12288 ? 6144 * 32 : 0);
		for (uint32_t k = 0; k < p->njb; k++)
			assert_int_equal(p->jb[k].scw, m == 12288 && p->jb[k].flag == 0 ? 32 : 0);
	}
	p->kn.prob_scores = 0, p->kn.prob_scores_min = 0;
	/* a batch of nothing eligible: no launch */
	jobs[0] = elig_job(X_CAP);
	jobs[1] = elig_job(X_TOPK0);
	assert_int_equal(axf_plan_build(p, jobs, 2, rc, 264), 0);
	assert_int_equal(p->nl, 0);
	assert_int_equal(rc[0], -EOPNOTSUPP);
	assert_int_equal(rc[1], -EINVAL);
	/* the lab's shape: one launch, one wave (1M keys over 264 CTAs) */
	jobs[0] = elig_job(X_NONE);
	jobs[0].position = (1u << 20) - 1;
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 264), 0);
	assert_int_equal(p->nl, 1);
	assert_true(p->L[0].ctas <= 264 && p->L[0].ctas >= 200);
	/* the shapes under knobs (H100: 132 SMs): heads lists capped and merged separately, short requests
	 * in a few longer splits, several waves when asked */
	axf_knobs k = {0, 256, 0, 512, 16, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
	p->kn = k;
	jobs[0] = elig_job(X_HEADS); /* 4K keys */
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 264), 0);
	assert_int_equal(p->jb[0].chunk, 512);
	assert_int_equal(p->jb[0].S, 8);
	assert_int_equal(p->jb[0].sepm, 1);
	assert_int_equal(p->L[0].mg, 32); /* 32 rows, one per merge CTA (8 splits > merge_warp 0) */
	assert_int_equal(p->L[0].mrpc, 1);
	check_plan(p, jobs, 1, rc, 264);
	p->kn.merge_warp = 8; /* 8 splits: a row per warp, 4 CTAs */
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 264), 0);
	assert_int_equal(p->L[0].mg, 4);
	assert_int_equal(p->L[0].mrpc, AXF_NW);
	assert_int_equal(p->units, 4);
	check_plan(p, jobs, 1, rc, 264);
	p->kn.merge_warp = 0;
	jobs[0].position = (1u << 17) - 1; /* 128K keys: 16 splits (the cap), not 256 */
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 264), 0);
	assert_int_equal(p->jb[0].S, 16);
	jobs[0] = elig_job(X_NONE); /* mean_logit 4K: 16 splits of 256 */
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 264), 0);
	assert_int_equal(p->jb[0].S, 16);
	assert_int_equal(p->jb[0].sepm, 0);
	assert_int_equal(p->L[0].mg, 0);
	jobs[0].position = (1u << 17) - 1; /* 128K over 4 waves of 264: the floor of 256 keys binds */
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 4 * 264), 0);
	assert_int_equal(p->jb[0].chunk, 256);
	assert_int_equal(p->jb[0].S, 512);
	p->kn.min_keys = 0; /* without it: 128 keys, 1024 splits */
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 4 * 264), 0);
	assert_int_equal(p->jb[0].chunk, 128);
	assert_int_equal(p->jb[0].S, 1024);
	for (int i = 0; i < 64; i++) { /* 64 × 4K heads: 4 splits each (1024 keys), below the cap */
		jobs[i] = elig_job(X_HEADS);
	}
	assert_int_equal(axf_plan_build(p, jobs, 64, rc, 264), 0);
	assert_int_equal(p->nl, 1);
	assert_int_equal(p->jb[0].S, 4);
	assert_int_equal(p->jb[0].sepm, 0);
	check_plan(p, jobs, 64, rc, 264);
	p->res_lists = 132; /* heads lists on one CTA per SM: 64 × 4K in 2 splits each */
	jobs[63] = elig_job(X_PROB); /* its logsumexp pass-job shares the heads launch: the launch has lists */
	assert_int_equal(axf_plan_build(p, jobs, 64, rc, 264), 0);
	assert_int_equal(p->jb[0].S, 2);
	assert_int_equal(p->L[0].ctas, 128);
	check_plan(p, jobs, 64, rc, 264);
	p->res_lists = 0;
	/* few lists (session 12): 64 × 4K heads at the defaults, 4 splits of top-10 each, go to the few-list merge
	 * kernel; at top-17 (68 entries) or in 7 splits (70) they do not */
	{
		const axf_knobs d0 = AXF_KNOBS_DEFAULT;
		p->kn = d0;
		for (int i = 0; i < 64; i++)
			jobs[i] = elig_job(X_HEADS);
		assert_int_equal(axf_plan_build(p, jobs, 64, rc, 264), 0);
		assert_true(p->nl == 1 && p->jb[0].S == 4 && p->jb[0].sepm && p->L[0].mrpc == AXF_NW && p->L[0].few);
		check_plan(p, jobs, 64, rc, 264);
		jobs[5].top_k = 17;
		assert_int_equal(axf_plan_build(p, jobs, 64, rc, 264), 0);
		assert_true(p->nl == 1 && p->L[0].mrpc == AXF_NW && !p->L[0].few);
		check_plan(p, jobs, 64, rc, 264);
		jobs[5].top_k = 10;
		assert_int_equal(axf_plan_build(p, jobs, 64, rc, 448), 0);
		assert_true(p->nl == 1 && p->jb[0].S == 7 && !p->L[0].few);
		check_plan(p, jobs, 64, rc, 448);
	}
	/* a tail (session 9): 128K heads at the defaults with 15% in blocks of 4 stages; 1M mean_logit with blocks
	 * raised so that splits and blocks stay ≤ AXF_MAX_SPLITS; 4K: too short a split for one */
	const axf_knobs dflt = AXF_KNOBS_DEFAULT;
	/* raw (session 11): one 4K heads request at the defaults goes in 256 one-stage splits, a merge CTA a row;
	 * not in a smaller wave, not with k > 16, not two of them (512 splits), not with the knob below 4096 */
	p->kn = dflt;
	jobs[0] = elig_job(X_HEADS);
	assert_int_equal(jobs[0].top_k, 10);
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 264), 0);
	assert_true(p->jb[0].raw && p->jb[0].chunk == AXF_TS && p->jb[0].S == 256 && p->jb[0].sepm);
	assert_true(p->L[0].mg == 32 && p->L[0].mrpc == 1 && p->entries == 32 * 256 * AXF_TS);
	check_plan(p, jobs, 1, rc, 264);
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 255), 0);
	assert_true(!p->jb[0].raw && p->jb[0].chunk == 32);
	check_plan(p, jobs, 1, rc, 255);
	jobs[1] = jobs[0];
	assert_int_equal(axf_plan_build(p, jobs, 2, rc, 264), 0);
	assert_true(!p->jb[0].raw && !p->jb[1].raw);
	check_plan(p, jobs, 2, rc, 264);
	jobs[0].top_k = 17;
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 264), 0);
	assert_false(p->jb[0].raw);
	jobs[0].top_k = 16;
	p->kn.raw_heads = 4095;
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 264), 0);
	assert_false(p->jb[0].raw);
	p->kn = dflt;
	p->kn.tail = 15, p->kn.tail_blk = 4;
	jobs[0] = elig_job(X_HEADS);
	jobs[0].position = (1u << 17) - 1;
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 264), 0);
	assert_int_equal(p->jb[0].S, 256);
	assert_int_equal(p->jb[0].tss, 27); /* ⌊8192 · 0.85 / 256⌋ */
	assert_int_equal(p->jb[0].tail0, 27 * 256);
	assert_int_equal(p->jb[0].tstg, 4);
	assert_int_equal(p->jb[0].tblk, (8192 - 27 * 256) / 4);
	check_plan(p, jobs, 1, rc, 264);
	jobs[0] = elig_job(X_NONE);
	jobs[0].position = (1u << 20) - 1;
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 264), 0);
	assert_int_equal(p->jb[0].S, 264);
	assert_int_equal(p->jb[0].tss, 211);
	assert_int_equal(p->jb[0].tstg, 13); /* 9832 stages left, room for 760 blocks */
	assert_int_equal(p->jb[0].tblk, 757);
	check_plan(p, jobs, 1, rc, 264);
	jobs[0].position = 4095;
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 264), 0);
	assert_int_equal(p->jb[0].tblk, 0);
	check_plan(p, jobs, 1, rc, 264);
	/* 32K heads (session 17): 256 splits of 6 static stages leave 512 tail stages, 2 a split: blocks of 2, not 4
	 * (128 blocks of 4 went to half the CTAs) */
	jobs[0] = elig_job(X_HEADS);
	jobs[0].position = (1u << 15) - 1;
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 264), 0);
	assert_int_equal(p->jb[0].S, 256);
	assert_int_equal(p->jb[0].tss, 6);
	assert_int_equal(p->jb[0].tstg, 2);
	assert_int_equal(p->jb[0].tblk, 256);
	check_plan(p, jobs, 1, rc, 264);
	jobs[0] = elig_job(X_NONE);
	p->kn.tail_blk = 1u << 28; /* a huge block: the tail's share of a split (9832 / 264 = 37 stages) */
	jobs[0].position = (1u << 20) - 1;
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 264), 0);
	assert_int_equal(p->jb[0].tstg, 37);
	assert_int_equal(p->jb[0].tblk, (9832 + 36) / 37);
	check_plan(p, jobs, 1, rc, 264);
	jobs[0].position = (1u << 20) - 1; /* one split: the whole tail in one block (32-bit ends never wrap) */
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 1), 0);
	assert_int_equal(p->jb[0].S, 1);
	assert_true(p->jb[0].tblk == 1 && p->jb[0].tstg == 65536 - p->jb[0].tail0);
	check_plan(p, jobs, 1, rc, 1);
	p->kn.tail = 95; /* capped at 90% */
	assert_int_equal(axf_plan_build(p, jobs, 1, rc, 264), 0);
	assert_int_equal(p->jb[0].tss, 65536 / 10 / 264);
	check_plan(p, jobs, 1, rc, 264);
	/* knob graph (session 10): the defaults send runs of ≤ 16384 keys as one graph launch — a 4K request, an 8K
	 * mean_prob (two passes of 8192), not 8K + 1 of mean_prob nor 128K; 0 never, 1 always */
	p->kn = dflt;
	assert_int_equal(p->kn.graph, 16384);
	const struct {
		int what;
		uint64_t pos;
		uint64_t keys;
		int graph;
	} gr[] = {{X_HEADS, 4095, 4096, 1}, {X_NONE, 4095, 4096, 1}, {X_PROB, 8191, 16384, 1},
		  {X_PROB, 8192, 16386, 0}, {X_HEADS, 16383, 16384, 1}, {X_HEADS, (1u << 17) - 1, 1u << 17, 0}};
	for (size_t i = 0; i < ARRAY_LEN(gr); i++) {
		jobs[0] = elig_job(gr[i].what);
		jobs[0].position = gr[i].pos;
		p->kn.graph = 16384;
		assert_int_equal(axf_plan_build(p, jobs, 1, rc, 264), 0);
		assert_int_equal(axf_plan_keys(p), gr[i].keys);
		assert_int_equal(axf_plan_graph(p), gr[i].graph);
		p->kn.graph = 0;
		assert_int_equal(axf_plan_graph(p), 0);
		p->kn.graph = 1;
		assert_int_equal(axf_plan_graph(p), 1);
		p->kn.graph = (uint32_t)gr[i].keys - 1; /* the bound is inclusive */
		assert_int_equal(axf_plan_graph(p), gr[i].keys - 1 > 1 ? 0 : 1);
	}
	jobs[0] = elig_job(X_HEADS), jobs[1] = elig_job(X_NONE); /* two requests of 4K and 8K: 12288 keys */
	jobs[0].position = 4095, jobs[1].position = 8191;
	p->kn.graph = 16384;
	assert_int_equal(axf_plan_build(p, jobs, 2, rc, 264), 0);
	assert_int_equal(axf_plan_keys(p), 12288);
	assert_int_equal(axf_plan_graph(p), 1);
	p->kn.graph = 12287;
	assert_int_equal(axf_plan_graph(p), 0);
	axf_plan_free(p);
}

/* ---- flags → codes ----------------------------------------------------------------------------------------------- */

static void test_finish(void **state)
{
	(void)state;
	axf_plan *p = calloc(1, sizeof *p);
	assert_non_null(p);
	ax_attn_job jobs[5] = {elig_job(X_NONE), elig_job(X_HEADS), elig_job(X_PROB), elig_job(X_CAP),
			       elig_job(X_NONE)};
	int rc[5];
	assert_int_equal(axf_plan_build(p, jobs, 5, rc, 100), 0);
	char *h = calloc(1, p->lay.off_dev);
	assert_non_null(h);
	uint32_t *pflags = (uint32_t *)(h + p->lay.pflags), flags[5] = {0, 0, 0, 0, 0};
	float *rlse = (float *)(h + p->lay.rlse);
	axf_ent *rent = (axf_ent *)(h + p->lay.rent);
	for (uint64_t r = 0; r < p->rows; r++)
		rlse[r] = 0.5f + (float)r;
	for (uint64_t e = 0; e < p->rents; e++) /* every third entry empty */
		rent[e].x = (float)e, rent[e].p = e % 3 == 2 ? -1 : (int32_t)(7 * e);
	flags[0] = AXF_F_DOM;
	flags[1] = 0;
	flags[2] = AXF_F_DOM | AXF_F_RANGE; /* split over mean_prob's two pass-jobs below */
	flags[3] = AXF_F_RANGE; /* a job not planned: its code stays */
	flags[4] = AXF_F_RANGE;
	int seen2 = 0;
	for (uint32_t k = 0; k < p->njb; k++) { /* each pass-job's flag word; a user job's code is their OR */
		uint32_t u = p->jb[k].flag;
		pflags[k] = u == 2 ? (seen2++ ? AXF_F_RANGE : AXF_F_DOM) : flags[u];
	}
	assert_int_equal(seen2, 2);
	uint64_t rows = p->rows;
	ax_attn_result *out = calloc(rows, sizeof *out);
	assert_non_null(out);
	axf_plan_prefill(p, jobs, out); /* the driver: while the kernels run */
	for (uint64_t r = 1; r < 33; r++) /* results are written by finish, not by the prefill */
		for (uint32_t e = 0; e < 10; e++)
			assert_int_equal(out[r].pos[e], -1);
	assert_int_equal(out[34].k, 0); /* job 3: not planned, not touched */
	assert_int_equal(axf_plan_finish(p, h, jobs, out, rc), 0);
	assert_int_equal(rc[0], -EDOM);
	assert_int_equal(rc[1], 0);
	assert_int_equal(rc[2], -ERANGE);
	assert_int_equal(rc[3], -EOPNOTSUPP);
	assert_int_equal(rc[4], -ERANGE);
	uint64_t start, nv;
	axc_visible(&jobs[1], &start, &nv);
	for (uint32_t r = 0; r < 32; r++) { /* job 1 (heads, 32 rows of k 10) expanded */
		const ax_attn_result *o = &out[1 + r];
		assert_int_equal(o->k, 10);
		assert_int_equal(o->head_id, (int32_t)(jobs[1].head_offset + r));
		assert_true(o->lse == 0.5 + 1 + r);
		for (uint32_t e = 0; e < AX_ATTN_MAX_TOPK; e++) {
			uint64_t g = p->eoff[1] + (uint64_t)r * 10 + e;
			if (e < 10 && g % 3 != 2) {
				assert_int_equal(o->pos[e], (int64_t)(start + 7 * g));
				assert_true(o->logit[e] == (float)g);
			} else {
				assert_int_equal(o->pos[e], -1);
				assert_true(o->logit[e] == -INFINITY);
			}
		}
	}
	assert_int_equal(out[34].k, 0);
	free(out);
	free(h);
	axf_plan_free(p);
}

static char *fake_results(const axf_plan *p, uint32_t bad);

/* Results straight into the caller's rows (session 18: axf_args.zout, p->zc): the kernels write each GPU-merged
 * row's first kout entries and logsumexp (as axf_finish_row would; here by the test, half the jobs before the
 * prefill and half after, as they land in any order), the prefill the rest of those rows, the finish only the rows
 * of host-merged jobs — every planned job's rows equal to the staging path's, byte for byte. */
static void test_finish_zc(void **state)
{
	(void)state;
	enum { N = 7 };
	ax_attn_job jobs[N] = {elig_job(X_HEADS), elig_job(X_PROB), elig_job(X_CAP),   elig_job(X_HEADS),
			       elig_job(X_NONE),  elig_job(X_TOPK64), elig_job(X_NONE)};
	jobs[3].position = 100, jobs[5].mode = AX_MODE_HEADS;
	axf_plan *p = calloc(1, sizeof *p);
	assert_non_null(p);
	p->kn.host_merge = 256; /* mean_prob's lone probability pass-job: host-merged (its rows by the finish either
				 * way); the two mean_logit jobs share a launch: merged on the GPU */
	int rc[N], rca[N], rcb[N];
	assert_int_equal(axf_plan_build(p, jobs, N, rc, 100), 0);
	char *h = fake_results(p, UINT32_MAX);
	for (uint32_t i = 0; i < N; i++)
		assert_int_equal(p->hmj[i], i == 1);
	ax_attn_result *a = malloc(p->rows * sizeof *a), *b = malloc(p->rows * sizeof *b);
	assert_non_null(a);
	assert_non_null(b);
	memset(a, 0xa5, p->rows * sizeof *a);
	memset(b, 0x5a, p->rows * sizeof *b);
	p->zc = 0;
	memcpy(rca, rc, sizeof rc);
	axf_plan_prefill(p, jobs, a);
	assert_int_equal(axf_plan_finish(p, h, jobs, a, rca), 0);
	const float *rlse = (const float *)(h + p->lay.rlse);
	const axf_ent *rent = (const axf_ent *)(h + p->lay.rent);
	p->zc = 1;
	memcpy(rcb, rc, sizeof rc);
	for (int half = 0; half < 2; half++) {
		for (uint32_t i = 0; i < N; i++) { /* "the kernels": even jobs before the prefill, odd ones after */
			if ((int)(i % 2) != half || !p->planned[i] || p->hmj[i])
				continue;
			uint64_t start, nv;
			axc_visible(&jobs[i], &start, &nv);
			const uint32_t kout = axf_kout(&jobs[i]);
			for (uint32_t r = 0; r < axc_out_rows(&jobs[i]); r++)
				axf_finish_row(&b[p->roff[i] + r], rlse[p->roff[i] + r], rent + p->eoff[i] + (uint64_t)r * kout,
					       kout, start);
		}
		if (half == 0)
			axf_plan_prefill(p, jobs, b);
	}
	assert_int_equal(axf_plan_finish(p, h, jobs, b, rcb), 0);
	assert_memory_equal(rca, rcb, sizeof rca);
	for (uint32_t i = 0; i < N; i++) {
		if (rca[i] != 0)
			continue;
		const uint32_t rows = axc_out_rows(&jobs[i]);
		for (uint32_t r = 0; r < rows; r++) /* field by field: the padding's bytes are nobody's */
			assert_true(a[p->roff[i] + r].head_id == b[p->roff[i] + r].head_id &&
				    a[p->roff[i] + r].k == b[p->roff[i] + r].k && a[p->roff[i] + r].lse == b[p->roff[i] + r].lse &&
				    memcmp(a[p->roff[i] + r].pos, b[p->roff[i] + r].pos, sizeof a->pos) == 0 &&
				    memcmp(a[p->roff[i] + r].logit, b[p->roff[i] + r].logit, sizeof a->logit) == 0);
	}
	assert_int_equal(rca[2], -EOPNOTSUPP);
	free(a), free(b), free(h);
	axf_plan_free(p);
}

/* ---- the row pool ---------------------------------------------------------------------------------------------------- */

/* Synthetic results of plan p in a staging buffer: lse per row, entries (some empty), flags of job `bad` set. */
static char *fake_results(const axf_plan *p, uint32_t bad)
{
	char *h = calloc(1, p->lay.off_dev);
	assert_non_null(h);
	float *rlse = (float *)(h + p->lay.rlse);
	axf_ent *rent = (axf_ent *)(h + p->lay.rent);
	uint32_t *pflags = (uint32_t *)(h + p->lay.pflags);
	for (uint64_t r = 0; r < p->rows; r++)
		rlse[r] = 0.25f * (float)r;
	for (uint64_t e = 0; e < p->rents; e++)
		rent[e].x = (float)e, rent[e].p = e % 7 == 3 ? -1 : (int32_t)(e % 4000);
	for (uint32_t k = 0; k < p->njb; k++)
		pflags[k] = p->jb[k].flag == bad ? AXF_F_DOM : 0;
	return h;
}

/* Prefill and finish on 1..8 threads: the same rows and codes as on the calling thread alone (rows of every job
 * but the failed one compared whole; the pool's helpers reused across runs, fewer threads than helpers, an aborted
 * run, then a run again); fewer than AXF_POOL_MIN_ROWS rows or threads < 2: the caller alone. */
static void test_pool(void **state)
{
	(void)state;
	enum { N = 70 };
	ax_attn_job jobs[N];
	for (uint32_t i = 0; i < N; i++) {
		jobs[i] = elig_job(i % 9 == 4 ? X_PROB : i % 11 == 5 ? X_NONE : X_HEADS);
		jobs[i].position = 1000 + 37 * i;
	}
	jobs[17] = elig_job(X_CAP); /* not planned: its rows untouched */
	axf_plan *p = calloc(1, sizeof *p);
	assert_non_null(p);
	int rc1[N], rc2[N];
	assert_int_equal(axf_plan_build(p, jobs, N, rc1, 264), 0);
	assert_true(p->rows >= AXF_POOL_MIN_ROWS);
	char *h = fake_results(p, 23);
	ax_attn_result *a = calloc(p->rows, sizeof *a), *b = calloc(p->rows, sizeof *b);
	assert_non_null(a);
	assert_non_null(b);
	axf_plan_prefill(p, jobs, a);
	assert_int_equal(axf_plan_finish(p, h, jobs, a, rc1), 0);
	assert_int_equal(rc1[23], -EDOM);
	assert_int_equal(rc1[17], -EOPNOTSUPP);
	axf_pool pool;
	memset(&pool, 0, sizeof pool);
	assert_int_equal(axf_pool_ready(&pool, 8, 100), 1); /* few rows: the caller alone */
	assert_int_equal(axf_pool_ready(&pool, 1, p->rows), 1);
	static const uint32_t want[] = {4, 2, 8, 3, 8};
	for (size_t w = 0; w < ARRAY_LEN(want); w++) {
		memset(b, 0x5a, p->rows * sizeof *b);
		assert_int_equal(axf_plan_build(p, jobs, N, rc2, 264), 0);
		const uint32_t nt = axf_pool_ready(&pool, want[w], p->rows);
		assert_int_equal(nt, want[w]);
		axf_pool_start(&pool, nt, p, jobs, b, h);
		if (w == 3) { /* an aborted run: helpers released without finishing */
			axf_pool_finish(&pool, 0);
			continue;
		}
		axf_plan_codes(p, h, rc2);
		axf_pool_finish(&pool, 1);
		assert_memory_equal(rc1, rc2, sizeof rc1);
		for (uint32_t i = 0; i < N; i++)
			if (i != 23 && i != 17)
				assert_memory_equal(&a[p->roff[i]], &b[p->roff[i]], axc_out_rows(&jobs[i]) * sizeof *a);
		const ax_attn_result *u = &b[p->roff[17]];
		for (size_t k = 0; k < sizeof *u; k++)
			assert_int_equal(((const unsigned char *)u)[k], 0x5a);
	}
	assert_int_equal(pool.nth, 7);
	axf_pool_fini(&pool);
	axf_pool_fini(&pool); /* twice: harmless */
	free(a), free(b), free(h);
	axf_plan_free(p);
}

/* ---- the dispatcher ------------------------------------------------------------------------------------------------ */

typedef struct fake_runner {
	int want_eligible;      /* 1: the fast path's contract (runs the eligible jobs, leaves the others with
				 * -EOPNOTSUPP or their validation code, rows unwritten); 0: no job may be eligible or
				 * invalid (the generic side of a split batch); -1: runs any */
	int calls, fail;
	uint32_t jobs_seen;
	const ax_attn_job *last;
} fake_runner;

/* A runner backed by ax_attn_cpu on host data. */
static int cpu_runner(void *ctx, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc)
{
	fake_runner *f = ctx;
	f->calls++;
	f->jobs_seen += n;
	f->last = jobs;
	if (f->fail)
		return f->fail;
	ax_attn_scratch *s = ax_attn_scratch_new();
	assert_non_null(s);
	uint64_t o = 0;
	for (uint32_t i = 0; i < n; i++) {
		const int why = axf_why_not(&jobs[i]);
		if (f->want_eligible == 0) {
			assert_int_not_equal(why, AXF_OK);
			assert_int_not_equal(why, AXF_NO_INVALID);
		}
		if (f->want_eligible == 1 && why != AXF_OK)
			rc[i] = why == AXF_NO_INVALID ? axc_check_job(&jobs[i]) : -EOPNOTSUPP;
		else
			rc[i] = ax_attn_cpu(&jobs[i], s, out + o);
		o += ax_attn_rows(&jobs[i]);
	}
	ax_attn_scratch_free(s);
	return 0;
}

static const tcase disp_cases[] = {
	/* name, mode, kdt, qdt, idt, D, H, Hkv, top_k, n_keys, window, cap, n_heads, heads, tie, pad */
	{"logit bf16", ML, BF, BF, I32, 128, 32, 8, 10, 700, 0, 0, 0, {0}, 1, 0},
	{"heads f16 i64", HD, F16, F16, I64, 128, 16, 4, 5, 300, 0, 0, 0, {0}, 1, 0},
	{"prob bf16 window", MP, BF, BF, I32, 128, 8, 2, 7, 500, 200, 0, 0, {0}, 1, 0},
	{"logit cap (generic)", ML, BF, BF, I32, 128, 8, 2, 3, 200, 0, 20, 0, {0}, 1, 0},
	{"heads list (generic)", HD, BF, BF, I32, 128, 8, 2, 4, 150, 0, 0, 2, {3, 1}, 1, 0},
	{"logit D64 (generic)", ML, BF, BF, I32, 64, 8, 8, 6, 100, 0, 0, 0, {0}, 1, 0},
	{"heads G8 H_kv 1", HD, BF, BF, I32, 128, 8, 1, 9, 64, 0, 0, 0, {0}, 0, 0},
	{"logit f32 (generic)", ML, F32, F32, I64, 128, 4, 2, 10, 90, 0, 0, 0, {0}, 1, 1},
};

/* Rows equal where ax_attn_cpu defines them (it leaves entries past k unwritten). */
static void rows_equal(const ax_attn_result *a, const ax_attn_result *b, uint32_t nr)
{
	for (uint32_t r = 0; r < nr; r++) {
		assert_int_equal(a[r].head_id, b[r].head_id);
		assert_int_equal(a[r].k, b[r].k);
		assert_memory_equal(&a[r].lse, &b[r].lse, sizeof a[r].lse);
		assert_memory_equal(a[r].pos, b[r].pos, a[r].k * sizeof a[r].pos[0]);
		assert_memory_equal(a[r].logit, b[r].logit, a[r].k * sizeof a[r].logit[0]);
	}
}

static void run_dispatch(const uint32_t *pick, uint32_t n, int bad_job, int expect)
{
	tdata t[16];
	ax_attn_job jobs[16];
	uint32_t rows = 0;
	for (uint32_t i = 0; i < n; i++) {
		td_make(&disp_cases[pick[i]], &t[i]);
		jobs[i] = t[i].job;
		if ((int)i == bad_job)
			jobs[i].top_k = 0; /* invalid: the generic path reports it */
		rows += ax_attn_rows(&jobs[i]);
	}
	ax_attn_result *out = malloc(rows * sizeof *out), *want = malloc(rows * sizeof *want);
	int rc[16], wrc[16];
	assert_non_null(out);
	assert_non_null(want);
	uint32_t ng = 0; /* valid jobs the fast path does not run: the generic path's */
	for (uint32_t i = 0; i < n; i++) {
		const int why = axf_why_not(&jobs[i]);
		ng += why != AXF_OK && why != AXF_NO_INVALID;
	}
	fake_runner all = {-1, 0, 0, 0, NULL};
	assert_int_equal(cpu_runner(&all, jobs, n, want, wrc), 0);
	fake_runner fast = {1, 0, 0, 0, NULL}, gen = {0, 0, 0, 0, NULL};
	axf_split s;
	memset(&s, 0, sizeof s);
	memset(out, 0xff, rows * sizeof *out);
	int r = axf_dispatch(&s, jobs, n, out, rc, cpu_runner, &fast, cpu_runner, &gen);
	assert_int_equal(r, expect);
	assert_int_equal(fast.calls, 1); /* every job through the fast runner once: its plan is the one validation */
	assert_int_equal(fast.jobs_seen, n);
	assert_ptr_equal(fast.last, jobs); /* never copied */
	assert_int_equal(gen.jobs_seen, ng);
	assert_int_equal(gen.calls, ng ? 1 : 0);
	if (ng == n)
		assert_ptr_equal(gen.last, jobs); /* left whole: not copied either */
	uint32_t o = 0;
	for (uint32_t i = 0; i < n; i++) {
		assert_int_equal(rc[i], wrc[i]);
		uint32_t nr = ax_attn_rows(&jobs[i]);
		if (rc[i] == 0)
			rows_equal(out + o, want + o, nr);
		o += nr;
	}
	axf_split_fini(&s);
	free(out);
	free(want);
	for (uint32_t i = 0; i < n; i++)
		td_free(&t[i]);
}

static void test_dispatch(void **state)
{
	(void)state;
	static const uint32_t fast_only[] = {0, 1, 2, 6, 0};
	static const uint32_t generic_only[] = {3, 4, 5, 7};
	static const uint32_t mixed[] = {3, 0, 4, 1, 2, 5, 6, 7, 0, 3};
	run_dispatch(fast_only, ARRAY_LEN(fast_only), -1, 0);
	run_dispatch(generic_only, ARRAY_LEN(generic_only), -1, 0);
	run_dispatch(mixed, ARRAY_LEN(mixed), -1, 0);
	run_dispatch(mixed, ARRAY_LEN(mixed), 1, 0); /* an invalid job gets its validation code from the fast runner */
	run_dispatch(generic_only, ARRAY_LEN(generic_only), 0, 0); /* ... in a batch the fast path runs none of */
	run_dispatch(fast_only, ARRAY_LEN(fast_only), 2, 0);
	/* a runner's whole-batch error comes back */
	tdata t[2];
	td_make(&disp_cases[0], &t[0]);
	td_make(&disp_cases[3], &t[1]);
	ax_attn_job jobs[2] = {t[0].job, t[1].job};
	ax_attn_result out[2];
	int rc[2];
	axf_split s;
	memset(&s, 0, sizeof s);
	fake_runner fast = {1, 0, 0, 0, NULL}, gen = {0, 0, 0, 0, NULL};
	fast.fail = -EIO;
	assert_int_equal(axf_dispatch(&s, jobs, 2, out, rc, cpu_runner, &fast, cpu_runner, &gen), -EIO);
	assert_int_equal(gen.calls, 0);
	fast.fail = 0, gen.fail = -ENOMEM;
	assert_int_equal(axf_dispatch(&s, jobs, 2, out, rc, cpu_runner, &fast, cpu_runner, &gen), -ENOMEM);
	/* no fast runner (the fast path off): everything through the generic one */
	fake_runner any = {-1, 0, 0, 0, NULL};
	assert_int_equal(axf_dispatch(&s, jobs, 2, out, rc, NULL, NULL, cpu_runner, &any), 0);
	assert_int_equal(any.jobs_seen, 2);
	assert_int_equal(rc[0], 0);
	assert_int_equal(rc[1], 0);
	axf_split_fini(&s);
	td_free(&t[0]);
	td_free(&t[1]);
}

/* ---- constants the kernels rely on --------------------------------------------------------------------------------- */

static void test_constants(void **state)
{
	(void)state;
	assert_int_equal(AXF_ROWS_SM % 128, 64);   /* fragment loads of two rows hit different banks */
	assert_int_equal(AXF_ROWS_SM % 16, 0);     /* bulk-copy destinations 16-byte aligned */
	assert_int_equal((AXF_NS * AXF_TS * AXF_ROWS_SM) % 8, 0); /* mbarriers 8-byte aligned */
	assert_true(AXF_SMEM <= 227 * 1024);       /* per-CTA limit on sm_90 */
	assert_true(AXF_MINB * (AXF_SMEM + 1024) <= 228 * 1024); /* two CTAs per SM */
	assert_true(AXF_MERGE_CAP >= AXF_MAX_SPLITS); /* ≥ 1 staged entry per split */
	assert_int_equal(AXF_F_RANGE, AXC_F_RANGE);
	assert_int_equal(AXF_F_DOM, AXC_F_DOM);
	for (uint32_t hkv = 1; hkv <= AXF_MAX_HKV; hkv++)
		assert_int_equal(hkv * AXF_D * 2 % 16, 0); /* bulk-copy sizes */
}

/* ---- --host-bench: the host's share of a call, on this CPU ------------------------------------------------------ */

static double hb_now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

static int hb_cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* Median µs of `reps` timed calls of step(what) (after 3 untimed ones). */
enum { HB_PLAN, HB_PREFILL, HB_FINISH, HB_BOTH, HB_HMERGE };

/* Evict [p, p + n) from the CPU caches (as the GPU's writes into the mapped staging leave it), where the CPU has
 * an instruction for it. */
static void hb_flush(const char *p, size_t n)
{
#if defined(__x86_64__)
	for (size_t i = 0; i < n; i += 64)
		__builtin_ia32_clflush(p + i);
	__builtin_ia32_mfence();
#else
	(void)p, (void)n;
#endif
}
static double hb_time(int what, int reps, axf_plan *p, const ax_attn_job *jobs, uint32_t n, int *rc, char *h,
		      ax_attn_result *out)
{
	double t[512];
	reps = reps > 512 ? 512 : reps;
	for (int i = -3; i < reps; i++) {
		if (what == HB_HMERGE)
			hb_flush(h + p->lay.hlse, p->lay.off_dev - p->lay.hlse);
		if (what == HB_FINISH || what == HB_BOTH) /* the results, as the GPU leaves them */
			hb_flush(h + p->lay.pflags, p->lay.hlse - p->lay.pflags);
		double t0 = hb_now_us();
		if (what == HB_HMERGE)
			axf_plan_hmerge(p, h);
		if (what == HB_PLAN)
			axf_plan_build(p, jobs, n, rc, 264);
		if (what == HB_PREFILL || what == HB_BOTH)
			axf_plan_prefill(p, jobs, out);
		if (what == HB_FINISH || what == HB_BOTH) {
			axf_plan_finish(p, h, jobs, out, rc);
			for (uint32_t k = 0; k < n; k++) /* finish turns rc into the job codes: back to "planned" */
				rc[k] = 0;
		}
		if (i >= 0)
			t[i] = hb_now_us() - t0;
	}
	qsort(t, (size_t)reps, sizeof t[0], hb_cmp);
	return t[reps / 2];
}

/*
 * The host work of a fast call around the GPU's, for B requests of 4K keys in each mode (the bench's shapes): the
 * plan, the prefill (axf_plan_prefill: overlaps the kernels since session 4) and the finish after the GPU is done
 * (axf_plan_finish); "prefill + finish" is what the host did after the GPU before session 4 (one pass: a 784-byte
 * row copy plus the entries per row). Synthetic compact results (every entry filled). Prints one line per shape.
 */
static int host_bench(void)
{
	static const struct { uint32_t B, mode; const char *name; } sh[] = {
		{1, AX_MODE_MEAN_LOGIT, "1x4K mean_logit"}, {1, AX_MODE_HEADS, "1x4K heads"},
		{64, AX_MODE_MEAN_LOGIT, "64x4K mean_logit"}, {64, AX_MODE_HEADS, "64x4K heads"},
		{64, AX_MODE_MEAN_PROB, "64x4K mean_prob"}};
	printf("# host-bench: µs on this CPU, medians; post-GPU work before session 4 = prefill + finish, after = "
	       "finish; hmerge = the host merge of host-merged pass-jobs (axf_plan_hmerge); the finish and the host "
	       "merge read results evicted from the caches first (as the GPU's writes leave them)\n"
	       "%-18s %6s %9s %9s %9s %15s %9s\n",
	       "shape", "rows", "plan", "prefill", "finish", "prefill+finish", "hmerge");
	for (size_t s = 0; s < ARRAY_LEN(sh); s++) {
		const uint32_t B = sh[s].B;
		ax_attn_job *jobs = calloc(B, sizeof *jobs);
		int *rc = calloc(B, sizeof *rc);
		axf_plan *p = calloc(1, sizeof *p);
		if (!jobs || !rc || !p)
			return 1;
		const axf_knobs d = AXF_KNOBS_DEFAULT;
		p->kn = d;
		for (uint32_t b = 0; b < B; b++)
			jobs[b] = base_job(), jobs[b].mode = sh[s].mode;
		if (axf_plan_build(p, jobs, B, rc, 264) != 0)
			return 1;
		char *h = calloc(1, p->lay.off_dev);
		ax_attn_result *out = calloc(p->rows, sizeof *out);
		if (!h || !out)
			return 1;
		axf_ent *e = (axf_ent *)(h + p->lay.rent);
		for (uint64_t i = 0; i < p->rents; i++)
			e[i].x = (float)i, e[i].p = (int32_t)(i % 4096);
		const int reps = B > 1 ? 200 : 500;
		double tp = hb_time(HB_PLAN, reps, p, jobs, B, rc, h, out);
		double tf = hb_time(HB_PREFILL, reps, p, jobs, B, rc, h, out);
		double tn = hb_time(HB_FINISH, reps, p, jobs, B, rc, h, out);
		double tb = hb_time(HB_BOTH, reps, p, jobs, B, rc, h, out);
		/* host-merged partials: every split full, sorted, offsets within the split */
		for (uint64_t i = 0; i < p->hents; i++)
			((float *)(h + p->lay.hps))[i] = (float)(1000 - (int)(i % 10) - (int)(i / 10 % 97)),
			((int32_t *)(h + p->lay.hpp))[i] = (int32_t)i;
		double th = p->hparts ? hb_time(HB_HMERGE, reps, p, jobs, B, rc, h, out) : 0.0;
		printf("%-18s %6llu %9.2f %9.2f %9.2f %15.2f %9.2f\n", sh[s].name, (unsigned long long)p->rows, tp, tf, tn, tb,
		       th);
		free(h), free(out), free(jobs), free(rc);
		axf_plan_free(p);
	}
	return 0;
}

/* qsort order of (value, offset) pairs: value descending, then offset ascending. */
static int hm_cmp(const void *a, const void *b)
{
	const axf_ent *x = a, *y = b;
	if (x->x != y->x)
		return x->x > y->x ? -1 : 1;
	return (x->p > y->p) - (x->p < y->p);
}

/*
 * The host merge (axf_hmerge_job) against a brute force: single mean_logit jobs, and every third iteration a
 * mean_prob job (its probability pass-job: logsumexp 0 whatever the partials say; session 13), planned with the
 * default knobs (host-merged: one launch of one pass-job), the staging's hm regions filled with random split lists — sorted, with
 * empty tails, values on a coarse grid so ties are common, a split now and then empty or with only its first
 * entry — and logsumexps (some -inf); the result entries must be the kout best of all entries by (value
 * descending, offset ascending), the logsumexp within 2e-6 (relative) of the double one, the flag word the OR
 * (and a flagged pass-job's rows left alone). A mutation of the tie order fails it.
 */
/* A random logsumexp partial (-inf one time in 5), added to the float64 running logsumexp (m, sum). */
static float hm_lse_part(double *m, double *sum)
{
	const float v = td_u64() % 5 == 0 ? -INFINITY : (float)(td_uni() * 20.0);
	if (v != -INFINITY) {
		const double x = v;
		if (x > *m)
			*sum = *sum * exp(*m - x) + 1, *m = x;
		else
			*sum += exp(x - *m);
	}
	return v;
}

static void test_hmerge(void **state)
{
	(void)state;
	uint64_t tails = 0, probs = 0;
	for (int it = 0; it < 300; it++) {
		axf_plan *p = calloc(1, sizeof *p);
		assert_non_null(p);
		const axf_knobs d = AXF_KNOBS_DEFAULT;
		p->kn = d;
		ax_attn_job j = base_job();
		const int prob = it % 3 == 2;
		j.mode = prob ? AX_MODE_MEAN_PROB : AX_MODE_MEAN_LOGIT;
		j.top_k = 1 + (uint32_t)(td_u64() % 64);
		j.position = (td_u64() % 3 == 0 ? 20 : 200) + td_u64() % 7992; /* ≤ 8192 keys: ≤ 256 splits of ≥ 32 */
		int rc = 0;
		assert_int_equal(axf_plan_build(p, &j, 1, &rc, 1 + (uint32_t)(td_u64() % 264)), 0);
		assert_int_equal(p->nl, prob ? 2 : 1); /* mean_prob: its logsumexp pass (merged on the GPU) first */
		const axf_launch *L = &p->L[p->nl - 1];
		assert_int_equal(axf_inst_mode(L->inst), prob ? AXF_M_PROB : AXF_M_LOGIT);
		assert_int_equal(L->hm, 1);
		assert_int_equal(p->L[0].hm, !prob);
		const axf_job *jb = &p->jb[L->j0];
		assert_int_equal(jb->hm, 1);
		probs += prob;
		char *h = calloc(1, p->lay.off_dev);
		assert_non_null(h);
		float *pl = (float *)(h + p->lay.hlse);
		uint32_t *pf = (uint32_t *)(h + p->lay.hpf);
		float *ps = (float *)(h + p->lay.hps);
		int32_t *pp = (int32_t *)(h + p->lay.hpp);
		const uint32_t S = jb->S, K = jb->K, kout = jb->kout;
		axf_ent *all = calloc((size_t)S * K + 1, sizeof *all);
		assert_non_null(all);
		size_t na = 0;
		double m = -INFINITY, sum = 0;
		const int flagged = it % 10 == 9;
		for (uint32_t i = 0; i < S; i++) {
			const uint32_t cut = td_u64() % 3 == 0 ? (uint32_t)(td_u64() % K) : 0;
			const uint32_t fill = td_u64() % 8 == 0 ? (uint32_t)(td_u64() % 2) : K - cut;
			float v = (float)(td_u64() % 40) * 0.25f;
			for (uint32_t e = 0; e < K; e++) {
				if (e < fill) {
					ps[(size_t)i * K + e] = v;
					pp[(size_t)i * K + e] = (int32_t)(i * jb->chunk + td_u64() % jb->chunk);
					all[na].x = v, all[na].p = pp[(size_t)i * K + e], na++;
					v -= (float)(td_u64() % 3) * 0.25f; /* non-increasing: ties within a list too */
				} else {
					ps[(size_t)i * K + e] = -INFINITY, pp[(size_t)i * K + e] = -1;
				}
			}
			/* within a list, equal values must come in ascending offset order (the kernels' order) */
			for (uint32_t e = 1; e < fill; e++)
				for (uint32_t q = e; q > 0 && ps[(size_t)i * K + q] == ps[(size_t)i * K + q - 1] &&
						    pp[(size_t)i * K + q] < pp[(size_t)i * K + q - 1]; q--) {
					const int32_t t = pp[(size_t)i * K + q];
					pp[(size_t)i * K + q] = pp[(size_t)i * K + q - 1], pp[(size_t)i * K + q - 1] = t;
				}
			pl[i] = hm_lse_part(&m, &sum);
			pf[i] = flagged && i == S / 2 ? AXF_F_DOM : 0;
		}
		for (uint32_t i = S; i < S + jb->tblk; i++) { /* the tail blocks' logsumexp partials (knob tail) */
			pl[i] = hm_lse_part(&m, &sum);
			tails++;
		}
		/* offsets of different splits are in different ranges, so the brute force's order is total */
		qsort(all, na, sizeof *all, hm_cmp);
		axf_ent *got = (axf_ent *)(h + p->lay.rent) + jb->rent;
		for (uint32_t e = 0; e < kout; e++)
			got[e].x = 12345.f, got[e].p = 777;
		axf_plan_hmerge(p, h);
		const uint32_t flags = ((const uint32_t *)(h + p->lay.pflags))[jb->ticket];
		assert_int_equal(flags, flagged ? AXF_F_DOM : 0u);
		if (flagged) {
			assert_true(got[0].x == 12345.f && got[0].p == 777); /* left alone */
		} else {
			for (uint32_t e = 0; e < kout; e++) {
				const float wx = e < na ? all[e].x : -INFINITY;
				const int32_t wp = e < na ? all[e].p : -1;
				if (got[e].x != wx || got[e].p != wp)
					fail_msg("it %d (S %u K %u kout %u) entry %u: got (%g, %d), want (%g, %d)", it, S, K, kout, e,
						 (double)got[e].x, got[e].p, (double)wx, wp);
			}
			const float lse = ((const float *)(h + p->lay.rlse))[jb->res];
			if (prob)
				assert_true(lse == 0.f); /* as the GPU merge reports mean_prob's */
			else if (m == -INFINITY)
				assert_true(lse == -INFINITY);
			else
				assert_true(fabs((double)lse - (m + log(sum))) <= 2e-6 * (1 + fabs(m)));
		}
		free(all), free(h);
		axf_plan_free(p);
	}
	assert_true(tails > 0); /* the defaults' tail reached some of these plans */
	assert_true(probs > 0);
}

static int setup(void **state)
{
	(void)state;
	const char *e = getenv("AX_TEST_SEED");
	td_state = e ? strtoull(e, NULL, 0) : (uint64_t)time(NULL);
	printf("# seed %llu (AX_TEST_SEED=%llu repeats it)\n", (unsigned long long)td_state,
	       (unsigned long long)td_state);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "--host-bench") == 0)
		return host_bench();
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_constants), cmocka_unit_test(test_eligibility), cmocka_unit_test(test_check_limits), cmocka_unit_test(test_plan_base),
		cmocka_unit_test(test_knobs_env), cmocka_unit_test(test_plans),
		cmocka_unit_test(test_finish),    cmocka_unit_test(test_finish_zc), cmocka_unit_test(test_pool), cmocka_unit_test(test_dispatch),
		cmocka_unit_test(test_hmerge),
	};
	return cmocka_run_group_tests(tests, setup, NULL);
}
