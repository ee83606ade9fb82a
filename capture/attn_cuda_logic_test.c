/*
 * attn_cuda_logic_test.c — the CUDA backend's algorithm run on the CPU (no GPU, no nvcc needed to build it):
 * attn_cuda_logic.h's split and merge CTAs are emulated (each phase run for every thread in turn, which is
 * what the barriers between phases guarantee on the GPU) over tables built by attn_cuda_plan.h, exactly as
 * attn_cuda.cu lays them out, with host memory in place of device memory.
 *
 * Cases: the conversions against attn_cpu's (every f16/bf16/fp8 code, and the 16-byte decoder); top-k insertion
 * and the merge against brute force (ties, every arrival order, buffers small enough to force repeated sweeps);
 * rows, chunks and the split plan against their definitions; host validation against ax_attn_cpu's return codes;
 * then whole emulated runs (one job per case, and all cases in one batch) against the float64 reference of
 * attn_cuda_testdata.h and against ax_attn_cpu on the same host data, with varying emulated thread counts, split
 * counts and merge buffers; error cases (-ERANGE, -EDOM, -EINVAL, -EOPNOTSUPP, mixed with valid jobs).
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

/* Hooks of attn_cuda_logic.h's host emulation (before it is included): the order of a phase's threads, and the
 * 16-byte key loads, which must be 16-byte aligned (the GPU's __ldg of a uint4 faults otherwise; memcpy would not). */
static uint32_t g_order;      /* 0: threads ascending, 1: descending, 2: strided */
static uint32_t g_misaligned; /* 16-byte loads from addresses that are not 16-byte aligned */

static uint32_t emu_tid(uint32_t i, uint32_t nth)
{
	if (g_order == 1)
		return nth - 1 - i;
	if (g_order == 2) {
		uint32_t step = nth % 37 ? 37 : 41; /* coprime with nth (no emulated count is a multiple of both) */
		return (uint32_t)((uint64_t)i * step % nth);
	}
	return i;
}

static void emu_load16(uint32_t w[4], const void *p)
{
	g_misaligned += (uintptr_t)p % 16 != 0;
	memcpy(w, p, 16);
}

#define AXC_EMU_TID(i, nth) emu_tid((i), (nth))
#define AXC_EMU_LOAD16(w, p) emu_load16((w), (p))

#include "attn.h"
#include "attn_cuda_plan.h"
#include "attn_cuda_testdata.h"

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define TOL 1e-3

/* ---- the emulator ------------------------------------------------------------------------------------------------ */

typedef struct emu_opts {
	uint32_t nth;        /* threads of an emulated split CTA (multiple of AXC_TILE) */
	uint32_t mth;        /* threads of an emulated merge CTA */
	uint32_t target;     /* split CTAs per pass (the GPU: 4 × SMs) */
	uint32_t cap;        /* merge buffer */
} emu_opts;

#define EMU_GUARD 64 /* floats checked past a split CTA's dynamic shared memory */

static const emu_opts emu_default = {AXC_SPLIT_THREADS, AXC_MERGE_THREADS, 528, AXC_MERGE_CAP};

static void emu_pass(const axc_plan *p, char *d, const axc_pass *P, const emu_opts *o)
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
		size_t nf = axc_split_dyn_floats(sg->qcap, sg->dmax);
		float *dyn = malloc((nf + EMU_GUARD) * sizeof(float));
		assert_non_null(dyn);
		for (uint32_t cta = 0; cta < sg->count; cta++) {
			for (size_t f = 0; f < nf + EMU_GUARD; f++)
				dyn[f] = NAN; /* shared memory is garbage at launch */
			memset(dyn + nf, 0x5a, EMU_GUARD * sizeof(float)); /* past the launch's dynamic size */
			memset(sm, 0xa5, sizeof *sm);
			axc_split_cta(&a, cta, o->nth, sm, dyn, kdt, idt, dcs[sg->inst % 4]);
			for (size_t f = nf; f < nf + EMU_GUARD; f++)
				if (axc_f2u(dyn[f]) != 0x5a5a5a5au)
					fail_msg("split CTA %u wrote past its %zu floats of dynamic shared memory", cta, nf);
		}
		free(dyn);
	}
	axc_args a = axc_plan_args(p, d, P);
	for (uint32_t r = 0; r < P->nmr; r++) {
		memset(msm, 0xa5, sizeof *msm);
		axc_merge_row(&a, r, o->mth, o->cap, msm);
	}
	free(sm);
	free(msm);
}

/* An emulated ax_attn_cuda_run (host pointers in the jobs). */
static int emu_run(const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc, const emu_opts *o)
{
	axc_plan *p = calloc(1, sizeof *p);
	assert_non_null(p);
	int r = axc_plan_build(p, jobs, n, rc, o->target);
	if (r == 0 && p->A.npj) {
		char *d = aligned_alloc(256, p->L.total);
		assert_non_null(d);
		memset(d, 0xa5, p->L.total); /* device memory is garbage: results poisoned */
		axc_plan_tables(p, d);
		memset(d + p->L.flags, 0, n * sizeof(uint32_t));
		emu_pass(p, d, &p->A, o);
		emu_pass(p, d, &p->B, o);
		axc_plan_finish(p, d, jobs, out, rc);
		free(d);
	}
	axc_plan_free(p);
	return r;
}

/* ---- conversions ------------------------------------------------------------------------------------------------- */

static int same_float(float a, float b)
{
	return (isnan(a) && isnan(b)) || axc_f2u(a) == axc_f2u(b);
}

static void test_decoders(void **state)
{
	(void)state;
	for (uint32_t h = 0; h < 65536; h++) {
		assert_true(same_float(axc_f16((uint16_t)h), ax_f16_to_f32((uint16_t)h)));
		assert_true(same_float(axc_bf16((uint16_t)h), ax_bf16_to_f32((uint16_t)h)));
	}
	for (uint32_t b = 0; b < 256; b++) {
		assert_true(same_float(axc_e4m3((uint8_t)b), ax_fp8_e4m3_to_f32((uint8_t)b)));
		assert_true(same_float(axc_e5m2((uint8_t)b), ax_fp8_e5m2_to_f32((uint8_t)b)));
	}
	assert_true(isnan(axc_e4m3(0x7f)) && isnan(axc_e4m3(0xff)));
	assert_true(isinf(axc_e5m2(0x7c)) && isnan(axc_e5m2(0x7d)));
	assert_true(!axc_finite(NAN) && !axc_finite(INFINITY) && !axc_finite(-INFINITY) && axc_finite(3e38f));
}

static void test_decode16(void **state)
{
	(void)state;
	static const uint32_t dts[] = {AX_DTYPE_F32, AX_DTYPE_F16, AX_DTYPE_BF16, AX_DTYPE_FP8_E4M3,
				       AX_DTYPE_FP8_E5M2};
	for (int rep = 0; rep < 2000; rep++) {
		uint32_t w[4] = {(uint32_t)td_u64(), (uint32_t)td_u64(), (uint32_t)td_u64(), (uint32_t)td_u64()};
		for (size_t t = 0; t < ARRAY_LEN(dts); t++) {
			float f[16];
			axc_decode16(w, dts[t], f);
			uint32_t epc = 16 / axc_esize(dts[t]);
			for (uint32_t e = 0; e < epc; e++)
				assert_true(same_float(f[e], axc_elem(w, dts[t], e)));
		}
	}
	int64_t i64[2] = {-1, 5};
	int32_t i32[2] = {-1, 5};
	assert_true(axc_slot(i32, AX_DTYPE_I32, 0) == UINT64_MAX && axc_slot(i32, AX_DTYPE_I32, 1) == 5);
	assert_true(axc_slot(i64, AX_DTYPE_I64, 0) == UINT64_MAX && axc_slot(i64, AX_DTYPE_I64, 1) == 5);
}

/* ---- top-k lists, logsumexp, merge --------------------------------------------------------------------------------- */

/* Brute force: the first k of (v, p) sorted by value desc, position asc. */
static void brute_topk(const float *v, const int64_t *p, uint32_t n, uint32_t k, float *ov, int64_t *op, uint32_t *on)
{
	uint32_t c = 0;
	char *used = calloc(n ? n : 1, 1);
	assert_non_null(used);
	while (c < k && c < n) {
		int b = -1;
		for (uint32_t i = 0; i < n; i++)
			if (!used[i] && (b < 0 || axc_better(v[i], p[i], v[b], p[b])))
				b = (int)i;
		used[b] = 1;
		ov[c] = v[b];
		op[c++] = p[b];
	}
	*on = c;
	free(used);
}

static void test_topk_insert(void **state)
{
	(void)state;
	static const uint32_t ks[] = {1, 2, 10, 64};
	static const uint32_t ns[] = {1, 5, 64, 65, 300};
	for (size_t a = 0; a < ARRAY_LEN(ks); a++)
		for (size_t b = 0; b < ARRAY_LEN(ns); b++)
			for (int rep = 0; rep < 20; rep++) {
				uint32_t n = ns[b], K = ks[a], cnt = 0, bn;
				float v[300], lv[64], bv[64];
				int64_t p[300], lp[64], bp[64];
				for (uint32_t i = 0; i < n; i++) {
					v[i] = (float)(td_u64() % 7); /* many exact ties */
					p[i] = (int64_t)i;
				}
				for (uint32_t i = n; i-- > 1;) { /* any arrival order */
					uint32_t j = (uint32_t)(td_u64() % (i + 1));
					float tv = v[i];
					int64_t tp = p[i];
					v[i] = v[j], p[i] = p[j], v[j] = tv, p[j] = tp;
				}
				for (uint32_t i = 0; i < n; i++)
					axc_topk_insert(lv, lp, &cnt, K, v[i], p[i]);
				brute_topk(v, p, n, K, bv, bp, &bn);
				assert_int_equal(cnt, bn);
				for (uint32_t i = 0; i < cnt; i++) {
					assert_true(lv[i] == bv[i]);
					assert_int_equal(lp[i], bp[i]);
				}
			}
	float v1[1];
	int64_t p1[1];
	uint32_t c0 = 0;
	assert_int_equal(axc_topk_insert(v1, p1, &c0, 0, 1.0f, 0), 0); /* K = 0: nothing kept */
	assert_int_equal(c0, 0);
}

static void test_lse_online(void **state)
{
	(void)state;
	for (int rep = 0; rep < 200; rep++) {
		uint32_t n = 1 + (uint32_t)(td_u64() % 500);
		float m = -INFINITY, s = 0;
		double mx = -INFINITY, sum = 0, x[500];
		for (uint32_t i = 0; i < n; i++) {
			x[i] = (float)(td_uni() * (rep % 2 ? 80 : 3)); /* wide spreads too */
			axc_lse_add(&m, &s, (float)x[i]);
			mx = x[i] > mx ? x[i] : mx;
		}
		for (uint32_t i = 0; i < n; i++)
			sum += exp(x[i] - mx);
		assert_true(fabs(((double)m + log(s)) - (mx + log(sum))) < 1e-5 * fmax(1, fabs(mx)));
	}
}

/* The merge CTA over synthetic split states: S splits of len keys, values with ties, every buffer size. */
static void test_merge(void **state)
{
	(void)state;
	static const struct {
		uint32_t S, len, K, cap, mth, levels;
	} cs[] = {
		{1, 5, 10, 1024, 256, 3},   {3, 200, 10, 11, 32, 5},    {64, 100, 64, 65, 256, 1000},
		{64, 100, 64, 70, 7, 4},    {200, 32, 10, 1024, 256, 0}, {5, 50, 1, 2, 1, 2},
		{17, 64, 33, 34, 64, 50},   {1, 1, 64, 1024, 256, 0},    {300, 128, 64, 1024, 256, 1u << 30},
	};
	for (size_t c = 0; c < ARRAY_LEN(cs); c++) {
		uint32_t S = cs[c].S, len = cs[c].len, K = cs[c].K, n = S * len;
		axc_job jb;
		memset(&jb, 0, sizeof jb);
		jb.mode = AXC_PJ_LOGIT, jb.K = K, jb.R = 1, jb.n_splits = S, jb.n = n;
		axc_state st = {malloc(S * 4), malloc(S * 4), malloc(S * 4), malloc((size_t)S * K * 4),
				malloc((size_t)S * K * 8)};
		float *v = malloc(n * sizeof(float)), ov[64], bv[64];
		int64_t *p = malloc(n * sizeof(int64_t)), op[64];
		double mx = -INFINITY, sum = 0;
		for (uint32_t i = 0; i < n; i++) {
			v[i] = cs[c].levels ? (float)(td_u64() % cs[c].levels) * 0.25f : (float)td_uni();
			p[i] = (int64_t)i;
			mx = v[i] > mx ? v[i] : mx;
		}
		for (uint32_t i = 0; i < n; i++)
			sum += exp((double)v[i] - mx);
		for (uint32_t s = 0; s < S; s++) {
			st.m[s] = -INFINITY, st.s[s] = 0, st.cnt[s] = 0;
			axc_row_tile(&st, &jb, s, v + s * len, 1, len, (uint64_t)s * len);
		}
		axc_mrow mr = {0, 0, 0, -1};
		ax_attn_result res;
		memset(&res, 0xa5, sizeof res);
		axc_args a;
		memset(&a, 0, sizeof a);
		a.jobs = &jb, a.mrows = &mr, a.st = st, a.res = &res;
		axc_merge_sm *msm = malloc(sizeof *msm);
		memset(msm, 0xa5, sizeof *msm);
		axc_merge_row(&a, 0, cs[c].mth, cs[c].cap, msm);
		uint32_t bn;
		brute_topk(v, p, n, K, bv, op, &bn);
		assert_int_equal(res.k, bn);
		for (uint32_t i = 0; i < bn; i++) {
			assert_true(res.logit[i] == bv[i]);
			assert_int_equal(res.pos[i], op[i]);
		}
		for (uint32_t i = bn; i < AXC_MAX_K; i++)
			assert_true(res.pos[i] == -1 && res.logit[i] == -INFINITY);
		assert_true(fabs(res.lse - (mx + log(sum))) < 1e-5 * fmax(1, fabs(mx)));
		assert_int_equal(res.head_id, -1);
		(void)ov;
		free(msm);
		free(v);
		free(p);
		free(st.m), free(st.s), free(st.cnt), free(st.val), free(st.pos);
	}
}

/* ---- rows, chunks, split plan, validation ------------------------------------------------------------------------- */

static void test_rows_chunks(void **state)
{
	(void)state;
	static int32_t mark[4096], out_row[4096], rh[4096];
	axc_chunk ch[4096];
	for (int rep = 0; rep < 300; rep++) {
		ax_attn_job job;
		memset(&job, 0, sizeof job);
		uint32_t Hkv = 1u << (td_u64() % 4), G = 1 + (uint32_t)(td_u64() % 70), H = Hkv * G;
		int32_t heads[12];
		job.n_q_heads = H, job.n_kv_heads = Hkv;
		job.mode = (uint32_t)(1 + td_u64() % 3);
		uint32_t nh = (uint32_t)(td_u64() % 12);
		for (uint32_t i = 0; i < nh; i++)
			heads[i] = (int32_t)(td_u64() % H);
		if (job.mode == AX_MODE_HEADS && nh)
			job.heads = heads, job.n_heads = nh;
		uint32_t R = axc_rows(&job, rh, out_row, mark);
		/* rows: the distinct needed heads, ascending */
		char need[4096] = {0};
		uint32_t want = 0;
		for (uint32_t h = 0; h < H; h++)
			need[h] = !job.heads;
		for (uint32_t i = 0; job.heads && i < nh; i++)
			need[heads[i]] = 1;
		for (uint32_t h = 0; h < H; h++)
			want += need[h];
		assert_int_equal(R, want);
		for (uint32_t r = 0; r < R; r++) {
			assert_true(need[rh[r]]);
			assert_true(r == 0 || rh[r] > rh[r - 1]);
		}
		for (uint32_t o = 0; job.mode == AX_MODE_HEADS && o < axc_out_rows(&job); o++)
			assert_int_equal(rh[out_row[o]], job.heads ? heads[o] : (int32_t)o);
		/* chunks: cover the rows in order, one KV head each, at most AXC_CHUNK rows */
		uint32_t nc = axc_chunks(rh, R, G, ch), next = 0;
		for (uint32_t c = 0; c < nc; c++) {
			assert_int_equal(ch[c].row0, next);
			assert_true(ch[c].n >= 1 && ch[c].n <= AXC_CHUNK);
			for (uint32_t r = ch[c].row0; r < ch[c].row0 + ch[c].n; r++)
				assert_int_equal((uint32_t)rh[r] / G, ch[c].g);
			next += ch[c].n;
		}
		assert_int_equal(next, R);
	}
}

static void test_split_plan(void **state)
{
	(void)state;
	static const struct {
		uint64_t total, longest;
		uint32_t target;
	} cs[] = {{1, 1, 528}, {4096, 4096, 528}, {1 << 20, 1 << 20, 528}, {(uint64_t)1 << 40, (uint64_t)1 << 40, 528},
		  {64 * 4096, 4096, 1}, {1000, 37, 100000}, {(uint64_t)8 << 17, 1 << 17, 264}};
	for (size_t c = 0; c < ARRAY_LEN(cs); c++) {
		uint64_t L = axc_split_len(cs[c].total, cs[c].longest, cs[c].target);
		assert_true(L >= AXC_MIN_SPLIT && L % AXC_TILE == 0);
		assert_true(axc_n_splits(cs[c].longest, L) <= AXC_MAX_SPLITS);
		/* no longer than the target asks, unless the minimum or the split cap demands it */
		assert_true(L == AXC_MIN_SPLIT || L < (cs[c].total + cs[c].target - 1) / cs[c].target + AXC_TILE ||
			    L < (cs[c].longest + AXC_MAX_SPLITS - 1) / AXC_MAX_SPLITS + AXC_TILE);
		/* every key in exactly one split */
		uint64_t n = cs[c].longest, S = axc_n_splits(n, L);
		assert_true(S * L >= n && (S - 1) * L < n);
	}
}

/* A valid job over real host data (kept for the error cases). */
static tdata g_base;

static void make_base(void)
{
	static const tcase c = {"base", AX_MODE_HEADS, AX_DTYPE_BF16, AX_DTYPE_BF16, AX_DTYPE_I32, 64, 8, 2, 5, 300,
				0, 0, 0, {0}, 0, 0};
	td_make(&c, &g_base);
}

typedef void (*mutate_fn)(ax_attn_job *j);
static int32_t g_bad_heads[2] = {1, 8};
static void m_none(ax_attn_job *j) { (void)j; }
static void m_null_q(ax_attn_job *j) { j->q = NULL; }
static void m_qdt(ax_attn_job *j) { j->q_dtype = AX_DTYPE_FP8_E4M3; }
static void m_kdt(ax_attn_job *j) { j->k_dtype = AX_DTYPE_I32; }
static void m_kdt9(ax_attn_job *j) { j->k_dtype = 9; }
static void m_idt(ax_attn_job *j) { j->index_dtype = AX_DTYPE_F32; }
static void m_h0(ax_attn_job *j) { j->n_q_heads = 0; }
static void m_hmod(ax_attn_job *j) { j->n_kv_heads = 3; }
static void m_d0(ax_attn_job *j) { j->head_dim = 0; }
static void m_d5000(ax_attn_job *j) { j->head_dim = 5000; }
static void m_mode0(ax_attn_job *j) { j->mode = 0; }
static void m_mode4(ax_attn_job *j) { j->mode = 4; }
static void m_k0(ax_attn_job *j) { j->top_k = 0; }
static void m_k65(ax_attn_job *j) { j->top_k = 65; }
static void m_win(ax_attn_job *j) { j->window = -1; }
static void m_pos(ax_attn_job *j) { j->position = (uint64_t)1 << 40; }
static void m_scale(ax_attn_job *j) { j->scale = NAN; }
static void m_cap(ax_attn_job *j) { j->logit_cap = -1; }
static void m_fp8s(ax_attn_job *j) { j->k_dtype = AX_DTYPE_FP8_E4M3, j->k_scale = 0; }
static void m_stride2(ax_attn_job *j) { j->k_stride[2] = 2; }
static void m_slots0(ax_attn_job *j) { j->n_slots = 0; }
static void m_hugestride(ax_attn_job *j) { j->k_stride[0] = (uint64_t)1 << 62; }
static void m_heads_bad(ax_attn_job *j) { j->heads = g_bad_heads, j->n_heads = 2; }
static void m_heads_n0(ax_attn_job *j) { j->heads = g_bad_heads, j->n_heads = 0; }

static void test_check_job(void **state)
{
	(void)state;
	static const struct {
		const char *name;
		mutate_fn f;
	} cs[] = {{"valid", m_none},       {"q NULL", m_null_q},  {"q dtype", m_qdt},     {"k dtype i32", m_kdt},
		  {"k dtype 9", m_kdt9},   {"index dtype", m_idt}, {"H 0", m_h0},         {"H % Hkv", m_hmod},
		  {"D 0", m_d0},           {"D 5000", m_d5000},   {"mode 0", m_mode0},   {"mode 4", m_mode4},
		  {"top_k 0", m_k0},       {"top_k 65", m_k65},   {"window -1", m_win},  {"position 2^40", m_pos},
		  {"scale NaN", m_scale},  {"cap < 0", m_cap},    {"fp8 scale 0", m_fp8s}, {"dim stride 2", m_stride2},
		  {"0 slots", m_slots0},   {"stride overflow", m_hugestride}, {"head 8 of 8", m_heads_bad},
		  {"heads list empty", m_heads_n0}};
	ax_attn_scratch *s = ax_attn_scratch_new();
	ax_attn_result out[8];
	for (size_t c = 0; c < ARRAY_LEN(cs); c++) {
		ax_attn_job j = g_base.job;
		cs[c].f(&j);
		int want = ax_attn_cpu(&j, s, out), got = axc_check_job(&j);
		if (got != want)
			fail_msg("%s: axc_check_job %d, ax_attn_cpu %d", cs[c].name, got, want);
	}
	/* this backend's own limits */
	ax_attn_job j = g_base.job;
	j.head_dim = 1024;
	assert_int_equal(axc_check_job(&j), -EOPNOTSUPP);
	j = g_base.job;
	j.k = (const char *)j.k + 1; /* bf16 at an odd address */
	assert_int_equal(axc_check_job(&j), -EINVAL);
	/* the stride limits at their edges (attn_cpu's ⌊L / b⌋ bounds; axc_check_job compares products): the last
	 * valid stride passes, one more fails (not run on the CPU: a passing job would be read) */
	const uint64_t lim = ((uint64_t)1 << 62) / 2, q = lim / 4; /* bf16 keys */
	j = g_base.job;
	j.k_stride[0] = lim / j.n_slots;
	assert_int_equal(axc_check_job(&j), 0);
	j.k_stride[0]++;
	assert_int_equal(axc_check_job(&j), -EINVAL);
	j = g_base.job;
	j.k_stride[1] = lim / j.n_kv_heads;
	assert_int_equal(axc_check_job(&j), 0);
	j.k_stride[1]++;
	assert_int_equal(axc_check_job(&j), -EINVAL);
	ax_attn_job pj = g_base.job;
	pj.index_kind = AX_ATTN_INDEX_PAGED, pj.n_slots = 0, pj.index_dtype = AX_DTYPE_I32;
	pj.n_blocks = 3, pj.block_size = 7, pj.k_block_stride = 7 * pj.k_stride[0];
	assert_int_equal(axc_check_job(&pj), 0);
	for (int t = 0; t < 3; t++) {
		j = pj;
		uint64_t *f = t == 0 ? &j.k_block_stride : &j.k_stride[t - 1];
		*f = q / (t == 0 ? j.n_blocks : t == 1 ? j.block_size : j.n_kv_heads);
		assert_int_equal(axc_check_job(&j), 0);
		++*f;
		assert_int_equal(axc_check_job(&j), -EINVAL);
	}
	ax_attn_scratch_free(s);
}

/* ---- whole emulated runs ------------------------------------------------------------------------------------------- */

static const emu_opts g_opts[] = {
	{AXC_SPLIT_THREADS, AXC_MERGE_THREADS, 528, AXC_MERGE_CAP}, /* an H100-sized plan */
	{64, 32, 4, 70},                                            /* few, long splits; small merge buffer */
	{32, 1, 100000, 65},                                        /* the shortest splits; one merge thread */
};

/* The run of `n` jobs again under the other thread orders: the same codes and bitwise the same rows. */
static void check_orders(const char *name, const ax_attn_job *jobs, uint32_t n, const ax_attn_result *want,
			 const int *want_rc, const emu_opts *o)
{
	uint32_t rows = 0;
	for (uint32_t i = 0; i < n; i++)
		rows += ax_attn_rows(&jobs[i]);
	ax_attn_result *got = malloc(rows * sizeof *got);
	int *rc = malloc(n * sizeof *rc);
	assert_non_null(got);
	assert_non_null(rc);
	for (g_order = 1; g_order <= 2; g_order++) {
		memset(got, 0xff, rows * sizeof *got);
		assert_int_equal(emu_run(jobs, n, got, rc, o), 0);
		for (uint32_t i = 0, r = 0; i < n; r += ax_attn_rows(&jobs[i]), i++) {
			if (rc[i] != want_rc[i])
				fail_msg("%s: job %u rc %d with threads in order %u, %d ascending", name, i, rc[i], g_order,
					 want_rc[i]);
			if (rc[i] == 0 && memcmp(got + r, want + r, ax_attn_rows(&jobs[i]) * sizeof *got) != 0)
				fail_msg("%s: job %u: rows differ with threads in order %u (a race on the GPU)", name, i,
					 g_order);
		}
	}
	g_order = 0;
	assert_int_equal(g_misaligned, 0);
	free(got);
	free(rc);
}

/* Check rows against the reference and against ax_attn_cpu on the same data. */
static void check_rows(const tcase *c, const ax_attn_job *job, const ax_attn_result *got, int *near)
{
	tref ref;
	char why[256];
	td_ref(job, &ref);
	if (td_check(&ref, job->top_k, got, TOL, near, why, sizeof why))
		fail_msg("%s: vs float64: %s", c->name, why);
	for (uint32_t r = 0; r < ref.rows; r++) /* attn_cuda.h: entries past k are (-1, -inf) */
		for (uint32_t e = got[r].k; e < AX_ATTN_MAX_TOPK; e++)
			if (got[r].pos[e] != -1 || got[r].logit[e] != -INFINITY)
				fail_msg("%s row %u entry %u past k: (%lld, %g)", c->name, r, e, (long long)got[r].pos[e],
					 got[r].logit[e]);
	ax_attn_scratch *s = ax_attn_scratch_new();
	ax_attn_result *cpu = calloc(ref.rows, sizeof *cpu);
	assert_int_equal(ax_attn_cpu(job, s, cpu), 0);
	if (td_check(&ref, job->top_k, cpu, TOL, near, why, sizeof why))
		fail_msg("%s: ax_attn_cpu vs float64: %s", c->name, why);
	for (uint32_t r = 0; r < ref.rows; r++) {
		assert_int_equal(got[r].k, cpu[r].k);
		for (uint32_t e = 0; e < got[r].k; e++)
			if (got[r].pos[e] != cpu[r].pos[e] &&
			    !(fabs(got[r].logit[e] - cpu[r].logit[e]) <= 1e-5 * fmax(1, fabs(cpu[r].logit[e]))))
				fail_msg("%s row %u entry %u: %lld, ax_attn_cpu %lld", c->name, r, e,
					 (long long)got[r].pos[e], (long long)cpu[r].pos[e]);
	}
	free(cpu);
	ax_attn_scratch_free(s);
	td_ref_free(&ref);
}

static void test_emulated_cases(void **state)
{
	(void)state;
	int near = 0;
	for (size_t c = 0; c < ARRAY_LEN(td_cases); c++)
		for (size_t o = 0; o < ARRAY_LEN(g_opts); o++) {
			if (o > 0 && td_cases[c].n_keys > 3000)
				continue; /* the long cases once */
			tdata t;
			td_make(&td_cases[c], &t);
			uint32_t rows = ax_attn_rows(&t.job);
			ax_attn_result *out = malloc(rows * sizeof *out);
			memset(out, 0xff, rows * sizeof *out); /* poisoned: NaN logits, -1 everywhere */
			int rc = 1;
			assert_int_equal(emu_run(&t.job, 1, out, &rc, &g_opts[o]), 0);
			if (rc != 0)
				fail_msg("%s (opts %zu): rc %d", td_cases[c].name, o, rc);
			check_rows(&td_cases[c], &t.job, out, &near);
			check_orders(td_cases[c].name, &t.job, 1, out, &rc, &g_opts[o]);
			if (t.tie_pos[0] >= 0 && td_cases[c].mode != HD) { /* the tie: lower position right before */
				int i0 = -1, i1 = -1;
				for (uint32_t e = 0; e < out[0].k; e++) {
					i0 = out[0].pos[e] == t.tie_pos[0] ? (int)e : i0;
					i1 = out[0].pos[e] == t.tie_pos[1] ? (int)e : i1;
				}
				if (i0 != 0 || (out[0].k > 1 && i1 != 1))
					fail_msg("%s: the tied keys at %d and %d of the list, want 0 and 1", td_cases[c].name,
						 i0, i1);
			}
			free(out);
			td_free(&t);
		}
	print_message("near-tie substitutions: %d\n", near);
}

/* Long jobs under a plan with hundreds of 128-key splits per job (merges of ~30,000 list entries per row). */
static void test_emulated_long(void **state)
{
	(void)state;
	static const tcase cs[] = {
		{"heads bf16 D64 G4 60K top-64", HD, BF, BF, I64, 64, 8, 2, 64, 60000, 0, 0, 0, {0}, 1, 0},
		{"prob f16 D64 G2 window 40K (50K) top-10", MP, F16, BF, I32, 64, 4, 2, 10, 50000, 40000, 0, 0, {0}, 1, 0},
		{"logit e4m3 D128 G8 cap 30K", ML, E4, F16, I32, 128, 16, 2, 10, 30000, 0, 10, 0, {0}, 1, 0},
	};
	emu_opts o = emu_default;
	o.target = 4096;
	int near = 0;
	for (size_t c = 0; c < ARRAY_LEN(cs); c++) {
		tdata t;
		td_make(&cs[c], &t);
		uint32_t rows = ax_attn_rows(&t.job);
		ax_attn_result *out = malloc(rows * sizeof *out);
		memset(out, 0xff, rows * sizeof *out);
		int rc = 1;
		assert_int_equal(emu_run(&t.job, 1, out, &rc, &o), 0);
		if (rc != 0)
			fail_msg("%s: rc %d", cs[c].name, rc);
		check_rows(&cs[c], &t.job, out, &near);
		check_orders(cs[c].name, &t.job, 1, out, &rc, &o);
		free(out);
		td_free(&t);
	}
}

/* All cases in one batch, between invalid jobs: one run, several instances, both passes. */
static void test_emulated_batch(void **state)
{
	(void)state;
	size_t n = ARRAY_LEN(td_cases);
	tdata t[ARRAY_LEN(td_cases)];
	ax_attn_job jobs[2 * ARRAY_LEN(td_cases)];
	int rc[2 * ARRAY_LEN(td_cases)], near = 0;
	uint32_t rows = 0, off[2 * ARRAY_LEN(td_cases)];
	for (size_t c = 0; c < n; c++) {
		td_make(&td_cases[c], &t[c]);
		jobs[2 * c] = t[c].job;
		jobs[2 * c + 1] = t[c].job;
		jobs[2 * c + 1].top_k = 0; /* invalid */
	}
	for (size_t i = 0; i < 2 * n; i++)
		off[i] = rows, rows += ax_attn_rows(&jobs[i]);
	ax_attn_result *out = malloc(rows * sizeof *out);
	memset(out, 0xff, rows * sizeof *out);
	emu_opts o = emu_default;
	o.target = 64;
	assert_int_equal(emu_run(jobs, (uint32_t)(2 * n), out, rc, &o), 0);
	for (size_t c = 0; c < n; c++) {
		assert_int_equal(rc[2 * c + 1], -EINVAL);
		if (rc[2 * c] != 0)
			fail_msg("%s: rc %d", td_cases[c].name, rc[2 * c]);
		check_rows(&td_cases[c], &jobs[2 * c], out + off[2 * c], &near);
	}
	check_orders("batch", jobs, (uint32_t)(2 * n), out, rc, &o);
	for (size_t c = 0; c < n; c++)
		td_free(&t[c]);
	free(out);
}

/* Random jobs (every dtype, head_dim, GQA shape, mode, head list, window, cap, top-k, length, stride layout) in
 * one batch under a random plan (threads, split count, merge buffer and threads), several rounds. */
static void test_emulated_random(void **state)
{
	(void)state;
	enum { NJ = 24, ROUNDS = 4 };
	static const uint32_t kdts[] = {F32, F16, BF, E4, E5}, qdts[] = {F32, F16, BF}, Ds[] = {64, 128, 256, 80, 96, 48};
	static const uint32_t nths[] = {32, 64, 96, 256};
	for (int round = 0; round < ROUNDS; round++) {
		tcase cs[NJ];
		tdata t[NJ];
		ax_attn_job jobs[NJ];
		int rc[NJ], near = 0;
		uint32_t rows = 0, off[NJ];
		char names[NJ][96];
		for (int i = 0; i < NJ; i++) {
			tcase *c = &cs[i];
			memset(c, 0, sizeof *c);
			c->mode = 1 + (uint32_t)(td_u64() % 3);
			c->kdt = kdts[td_u64() % 5], c->qdt = qdts[td_u64() % 3];
			c->idt = td_u64() % 2 ? I64 : I32;
			c->D = Ds[td_u64() % 6];
			c->Hkv = 1 + (uint32_t)(td_u64() % 4);
			c->H = c->Hkv * (1 + (uint32_t)(td_u64() % 9));
			c->top_k = 1 + (uint32_t)(td_u64() % 64);
			c->n_keys = 1 + td_u64() % (td_u64() % 4 ? 700 : 3000);
			c->window = td_u64() % 3 ? 0 : 1 + (int32_t)(td_u64() % 800);
			c->cap = td_u64() % 3 ? 0 : 5.0f + (float)(td_u64() % 40);
			if (c->mode == HD && td_u64() % 2) {
				c->n_heads = 1 + (uint32_t)(td_u64() % 8);
				for (uint32_t h = 0; h < c->n_heads; h++)
					c->heads[h] = (int32_t)(td_u64() % c->H);
			}
			c->tie = (int)(td_u64() % 2);
			c->pad = (int)(td_u64() % 3);
			snprintf(names[i], sizeof names[i], "random %d.%d: mode %u k%u q%u i%u D%u H%u/%u top%u n%llu w%d cap%g",
				 round, i, c->mode, c->kdt, c->qdt, c->idt, c->D, c->H, c->Hkv, c->top_k,
				 (unsigned long long)c->n_keys, c->window, c->cap);
			c->name = names[i];
			td_make(c, &t[i]);
			jobs[i] = t[i].job;
			off[i] = rows, rows += ax_attn_rows(&jobs[i]);
		}
		emu_opts o;
		o.nth = nths[td_u64() % 4];
		o.mth = 1 + (uint32_t)(td_u64() % AXC_MERGE_THREADS);
		o.target = 1 + (uint32_t)(td_u64() % 2000);
		o.cap = AXC_MAX_K + 1 + (uint32_t)(td_u64() % (AXC_MERGE_CAP - AXC_MAX_K));
		ax_attn_result *out = malloc(rows * sizeof *out);
		memset(out, 0xff, rows * sizeof *out);
		assert_int_equal(emu_run(jobs, NJ, out, rc, &o), 0);
		for (int i = 0; i < NJ; i++) {
			if (rc[i] != 0)
				fail_msg("%s: rc %d (plan nth %u mth %u target %u cap %u)", cs[i].name, rc[i], o.nth, o.mth,
					 o.target, o.cap);
			check_rows(&cs[i], &jobs[i], out + off[i], &near);
		}
		check_orders("random batch", jobs, NJ, out, rc, &o);
		for (int i = 0; i < NJ; i++)
			td_free(&t[i]);
		free(out);
	}
}

/* Scores near ±FLT_MAX: a head's s − lse is -inf for most keys, the other head keeps p_j finite (as in
 * ax_attn_cpu: 0, not -EDOM). */
static void test_emulated_extreme(void **state)
{
	(void)state;
	tdata t;
	tcase c;
	memset(&c, 0, sizeof c);
	c.name = "mean_prob, s - lse = -inf in one head";
	td_make_extreme(&t);
	ax_attn_result out[1];
	int rc = 1, near = 0;
	for (size_t o = 0; o < ARRAY_LEN(g_opts); o++) {
		memset(out, 0xff, sizeof out);
		assert_int_equal(emu_run(&t.job, 1, out, &rc, &g_opts[o]), 0);
		if (rc != 0)
			fail_msg("%s (opts %zu): rc %d, ax_attn_cpu 0", c.name, o, rc);
		check_rows(&c, &t.job, out, &near);
		assert_int_equal(out[0].pos[0], 123);
	}
	td_free(&t);
}

/* ---- error cases ----------------------------------------------------------------------------------------------------- */

static void test_emulated_errors(void **state)
{
	(void)state;
	const td_error *cs = td_errors;
	for (size_t c = 0; c < ARRAY_LEN(td_errors); c++) {
		tcase tc = {cs[c].name, cs[c].mode, BF, BF, c % 2 ? I64 : I32, 64, 4, 2, 5, 2000, cs[c].window, 0,
			    cs[c].n_heads, {cs[c].heads[0], cs[c].heads[1]}, 0, 0};
		tdata t, ok;
		td_make(&tc, &t);
		td_make(&tc, &ok);
		td_corrupt(&t, cs[c].what);
		ax_attn_job jobs[3] = {ok.job, t.job, ok.job};
		uint32_t r0 = ax_attn_rows(&ok.job), r1 = ax_attn_rows(&t.job);
		ax_attn_result *out = calloc(2 * r0 + r1, sizeof *out);
		int rc[3];
		emu_opts o = emu_default;
		o.target = 40; /* several splits: the bad key or slot is in one of them */
		assert_int_equal(emu_run(jobs, 3, out, rc, &o), 0);
		if (rc[1] != cs[c].want)
			fail_msg("%s: rc %d, want %d", cs[c].name, rc[1], cs[c].want);
		if (cs[c].what != E_D1024) { /* the CPU backend agrees */
			ax_attn_scratch *s = ax_attn_scratch_new();
			ax_attn_result *cpu = calloc(r1, sizeof *cpu);
			assert_int_equal(ax_attn_cpu(&t.job, s, cpu), cs[c].want);
			free(cpu);
			ax_attn_scratch_free(s);
		}
		int near = 0;
		assert_int_equal(rc[0], 0);
		assert_int_equal(rc[2], 0);
		check_rows(&tc, &ok.job, out, &near);
		check_rows(&tc, &ok.job, out + r0 + r1, &near);
		check_orders(cs[c].name, jobs, 3, out, rc, &o);
		free(out);
		td_free(&t);
		td_free(&ok);
	}
}

static int setup(void **state)
{
	(void)state;
	const char *e = getenv("AX_TEST_SEED");
	uint64_t seed = e ? strtoull(e, NULL, 0) : (uint64_t)time(NULL);
	td_state = seed;
	printf("# seed %llu (AX_TEST_SEED=%llu repeats it)\n", (unsigned long long)seed, (unsigned long long)seed);
	make_base();
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	td_free(&g_base);
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_decoders),       cmocka_unit_test(test_decode16),
		cmocka_unit_test(test_topk_insert),    cmocka_unit_test(test_lse_online),
		cmocka_unit_test(test_merge),          cmocka_unit_test(test_rows_chunks),
		cmocka_unit_test(test_split_plan),     cmocka_unit_test(test_check_job),
		cmocka_unit_test(test_emulated_cases), cmocka_unit_test(test_emulated_long),
		cmocka_unit_test(test_emulated_batch),  cmocka_unit_test(test_emulated_random),
		cmocka_unit_test(test_emulated_extreme),
		cmocka_unit_test(test_emulated_errors),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
