/*
 * attn_cuda_testdata.h — inputs and an independent float64 reference for the CUDA backend's tests (the CPU test
 * of the kernel logic and the GPU test). Plain C, also valid C++; test code only (fails fast on malloc failure).
 *
 * A case (tcase) becomes one job's host inputs (tdata): fresh random Q and keys (uniform in [-1, 1], never all
 * zeros; fp8 keys are random finite codes of magnitude ≤ 4), a K pool with more slots than keys addressed
 * through a shuffled index row (positions outside the window hold out-of-pool garbage, which must never be
 * read), a few planted high-scoring keys (their elements ±1, ±1.5, ±2 with the sign of the group's mean query)
 * and, when asked, an exact tie: a second slot holding a byte copy of the strongest planted key at a later
 * position. The reference (td_ref) computes every s_hj in double with plain loops from attn_cpu's public
 * conversions, the cap, the mode's values, logsumexp and a full sort. td_check accepts a result when k and
 * head_id match, each entry i holds a distinct position whose reference value equals the reference's i-th or is
 * within 1e-5·max(1, |v|) of it (a near-tie, counted), its logit is within tol of the reference value at that
 * position, entries with equal logits come lowest position first, and the logsumexp is within tol; NaN never
 * passes.
 */
#ifndef ATTNX_CAPTURE_ATTN_CUDA_TESTDATA_H
#define ATTNX_CAPTURE_ATTN_CUDA_TESTDATA_H

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn.h"
#include "attnx_shm.h"

typedef struct tcase {
	const char *name;
	uint32_t mode, kdt, qdt, idt; /* enum ax_mode, key dtype, query dtype, index dtype */
	uint32_t D, H, Hkv, top_k;
	uint64_t n_keys;              /* position = n_keys - 1 */
	int32_t window;               /* 0: all keys */
	float cap;                    /* tanh cap, 0: none */
	uint32_t n_heads;             /* heads mode: listed heads (0: all) */
	int32_t heads[8];
	int tie;                      /* plant an exact tie */
	int pad;                      /* 1: pad the pool's strides (rows not 16-byte aligned); 2: the pool starts one
	                               * element past a 16-byte boundary (strides unpadded) */
} tcase;

typedef struct tdata {
	void *q, *k, *index;          /* host inputs */
	size_t qbytes, kbytes, ibytes;
	size_t koff;                  /* k = kbase + koff (the pool's offset in its allocation) */
	void *kbase;
	uint64_t slots;
	ax_attn_job job;              /* pointers are the host buffers above */
	int64_t tie_pos[2];           /* the tied positions (-1 if none) */
} tdata;

typedef struct tref {
	uint32_t rows;
	uint64_t start, n;
	double *v;                    /* [rows][n] value of each visible key (position start + j) */
	double *lse;                  /* [rows] */
	int64_t *order;               /* [rows][min(top_k, n)] the exact top-k positions */
	int32_t *head_id;             /* [rows] */
} tref;

static uint64_t td_state = 0x1234567ull;

static uint64_t td_u64(void)
{
	uint64_t z = (td_state += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static double td_uni(void)
{
	return (double)(td_u64() >> 11) * 0x1p-53 * 2.0 - 1.0;
}

static void *td_alloc(size_t n)
{
	void *p = aligned_alloc(64, (n + 63) / 64 * 64);
	if (!p) {
		fprintf(stderr, "out of memory\n");
		exit(1);
	}
	return p;
}

static size_t td_esize(uint32_t dt)
{
	return dt == AX_DTYPE_F32 || dt == AX_DTYPE_I32 ? 4 : dt == AX_DTYPE_I64 ? 8 : dt <= AX_DTYPE_BF16 ? 2 : 1;
}

static double td_dec(const void *p, uint32_t dt, uint64_t i)
{
	switch (dt) {
	case AX_DTYPE_F16:
		return ax_f16_to_f32(((const uint16_t *)p)[i]);
	case AX_DTYPE_BF16:
		return ax_bf16_to_f32(((const uint16_t *)p)[i]);
	case AX_DTYPE_FP8_E4M3:
		return ax_fp8_e4m3_to_f32(((const uint8_t *)p)[i]);
	case AX_DTYPE_FP8_E5M2:
		return ax_fp8_e5m2_to_f32(((const uint8_t *)p)[i]);
	default:
		return ((const float *)p)[i];
	}
}

/* Store x at element i of dtype dt (fp8: the nearest finite code). */
static void td_enc(void *p, uint32_t dt, uint64_t i, float x)
{
	if (dt == AX_DTYPE_F32) {
		((float *)p)[i] = x;
	} else if (dt == AX_DTYPE_F16) {
		((uint16_t *)p)[i] = ax_f32_to_f16(x);
	} else if (dt == AX_DTYPE_BF16) {
		((uint16_t *)p)[i] = ax_f32_to_bf16(x);
	} else {
		int best = 0;
		double bd = INFINITY;
		for (int b = 0; b < 256; b++) {
			float v = dt == AX_DTYPE_FP8_E4M3 ? ax_fp8_e4m3_to_f32((uint8_t)b) : ax_fp8_e5m2_to_f32((uint8_t)b);
			if (isfinite(v) && fabs(v - x) < bd)
				bd = fabs(v - x), best = b;
		}
		((uint8_t *)p)[i] = (uint8_t)best;
	}
}

/* A random finite value of magnitude ≤ 4 in dtype dt at element i. */
static void td_rand(void *p, uint32_t dt, uint64_t i)
{
	if (dt != AX_DTYPE_FP8_E4M3 && dt != AX_DTYPE_FP8_E5M2) {
		td_enc(p, dt, i, (float)td_uni());
		return;
	}
	for (;;) {
		uint8_t b = (uint8_t)td_u64();
		float v = dt == AX_DTYPE_FP8_E4M3 ? ax_fp8_e4m3_to_f32(b) : ax_fp8_e5m2_to_f32(b);
		if (isfinite(v) && fabsf(v) <= 4) {
			((uint8_t *)p)[i] = b;
			return;
		}
	}
}

/* Inputs of one case. Index entries outside the window are out-of-pool garbage. */
static void td_make(const tcase *c, tdata *t)
{
	memset(t, 0, sizeof *t);
	uint32_t G = c->H / c->Hkv;
	uint64_t n = c->n_keys, slots = n + n / 3 + 7;
	uint64_t s1 = c->D + (c->pad == 1 ? 3 : 0), s0 = c->Hkv * s1 + (c->pad == 1 ? 5 : 0);
	size_t kes = td_esize(c->kdt), ies = td_esize(c->idt);
	t->slots = slots;
	t->qbytes = (size_t)c->H * c->D * td_esize(c->qdt);
	t->kbytes = (size_t)slots * s0 * kes;
	t->ibytes = (size_t)n * ies;
	t->q = td_alloc(t->qbytes);
	t->koff = c->pad == 2 ? kes : 0;
	t->kbase = td_alloc(t->kbytes + t->koff);
	t->k = (char *)t->kbase + t->koff;
	t->index = td_alloc(t->ibytes);
	memset(t->k, 0x7f, t->kbytes); /* padding: e4m3 NaN, a huge value otherwise: never read */
	for (uint64_t i = 0; i < (uint64_t)c->H * c->D; i++)
		td_rand(t->q, c->qdt, i);
	for (uint64_t s = 0; s < slots; s++)
		for (uint32_t g = 0; g < c->Hkv; g++)
			for (uint32_t d = 0; d < c->D; d++)
				td_rand(t->k, c->kdt, s * s0 + g * s1 + d);
	/* shuffled slots */
	uint64_t *perm = (uint64_t *)td_alloc(slots * sizeof *perm);
	for (uint64_t s = 0; s < slots; s++)
		perm[s] = s;
	for (uint64_t s = slots - 1; s > 0; s--) {
		uint64_t r = td_u64() % (s + 1), x = perm[s];
		perm[s] = perm[r], perm[r] = x;
	}
	uint64_t start = c->window > 0 && n > (uint64_t)c->window ? n - (uint64_t)c->window : 0;
	for (uint64_t j = 0; j < n; j++) {
		int64_t v = j >= start ? (int64_t)perm[j] : (j % 2 ? -3 : (int64_t)slots + 11);
		if (c->idt == AX_DTYPE_I32)
			((int32_t *)t->index)[j] = (int32_t)v;
		else
			((int64_t *)t->index)[j] = v;
	}
	/* planted keys: up to 3 visible positions, strengths 2, 1.5, 1 */
	static const float str[3] = {2.0f, 1.5f, 1.0f};
	uint64_t vis = n - start, taken[4];
	int ntaken = 0;
	t->tie_pos[0] = t->tie_pos[1] = -1;
	for (int p = 0; p < 3 && (uint64_t)p < vis; p++) {
		/* distinct positions: a later planted key must not overwrite the strongest one or its tie copy */
		uint64_t j = start + td_u64() % vis, slot;
		for (int u = 0; u < ntaken && vis > (uint64_t)ntaken; u++)
			if (taken[u] == j)
				j = start + td_u64() % vis, u = -1;
		slot = perm[j];
		taken[ntaken++] = j;
		for (uint32_t g = 0; g < c->Hkv; g++)
			for (uint32_t d = 0; d < c->D; d++) {
				double m = 0;
				for (uint32_t h = g * G; h < (g + 1) * G; h++)
					m += td_dec(t->q, c->qdt, (uint64_t)h * c->D + d);
				td_enc(t->k, c->kdt, slot * s0 + g * s1 + d, m >= 0 ? str[p] : -str[p]);
			}
		if (p == 0 && c->tie && vis >= 2) {
			/* a byte copy of this key at another visible position: an exact tie */
			uint64_t j2 = start + td_u64() % vis;
			while (j2 == j)
				j2 = start + td_u64() % vis;
			memcpy((char *)t->k + perm[j2] * s0 * kes, (char *)t->k + slot * s0 * kes, s0 * kes);
			taken[ntaken++] = j2;
			t->tie_pos[0] = (int64_t)(j < j2 ? j : j2);
			t->tie_pos[1] = (int64_t)(j < j2 ? j2 : j);
		}
	}
	free(perm);
	ax_attn_job *jb = &t->job;
	memset(jb, 0, sizeof *jb);
	jb->q = t->q, jb->q_dtype = c->qdt;
	jb->k = t->k, jb->k_dtype = c->kdt;
	jb->k_scale = c->kdt == AX_DTYPE_FP8_E4M3 || c->kdt == AX_DTYPE_FP8_E5M2 ? 0.5f : 1.0f;
	jb->k_stride[0] = s0, jb->k_stride[1] = s1, jb->k_stride[2] = 1;
	jb->n_slots = slots;
	jb->index = t->index, jb->index_dtype = c->idt;
	jb->position = n - 1;
	jb->window = c->window;
	jb->n_q_heads = c->H, jb->n_kv_heads = c->Hkv, jb->head_dim = c->D;
	jb->head_offset = 100;
	jb->scale = (float)(1.0 / sqrt((double)c->D));
	jb->logit_cap = c->cap;
	jb->mode = c->mode;
	jb->top_k = c->top_k;
	jb->heads = c->n_heads ? c->heads : NULL;
	jb->n_heads = c->n_heads;
}

/*
 * mean_prob with scores at ±2e38 (finite): H 2, H_kv 1, D 64, f32, scale 1, 300 keys in slots 0..299. Head 0's
 * query is (2e38, 0, ...) and every key's element 0 is -1 except key 123's (+1), so head 0's logsumexp is 2e38
 * and s_0j − lse_0 overflows to -inf for every other key, while head 1 (random query) keeps every p_j finite:
 * a valid job (ax_attn_cpu returns 0; key 123 is the top entry) whose per-key logsumexp over heads starts at -inf.
 */
static void td_make_extreme(tdata *t)
{
	enum { H = 2, D = 64, N = 300 };
	memset(t, 0, sizeof *t);
	t->slots = N;
	t->qbytes = H * D * sizeof(float), t->kbytes = (size_t)N * D * sizeof(float), t->ibytes = N * sizeof(int32_t);
	t->q = td_alloc(t->qbytes), t->kbase = t->k = td_alloc(t->kbytes), t->index = td_alloc(t->ibytes);
	float *q = (float *)t->q, *k = (float *)t->k;
	for (uint32_t d = 0; d < D; d++)
		q[d] = d == 0 ? 2e38f : 0.0f, q[D + d] = (float)td_uni();
	for (uint32_t j = 0; j < N; j++) {
		for (uint32_t d = 0; d < D; d++)
			k[j * D + d] = d == 0 ? (j == 123 ? 1.0f : -1.0f) : (float)td_uni();
		((int32_t *)t->index)[j] = (int32_t)j;
	}
	t->tie_pos[0] = t->tie_pos[1] = -1;
	ax_attn_job *jb = &t->job;
	jb->q = t->q, jb->q_dtype = AX_DTYPE_F32, jb->k = t->k, jb->k_dtype = AX_DTYPE_F32, jb->k_scale = 1;
	jb->k_stride[0] = D, jb->k_stride[1] = D, jb->k_stride[2] = 1, jb->n_slots = N;
	jb->index = t->index, jb->index_dtype = AX_DTYPE_I32, jb->position = N - 1;
	jb->n_q_heads = H, jb->n_kv_heads = 1, jb->head_dim = D, jb->scale = 1, jb->mode = AX_MODE_MEAN_PROB;
	jb->top_k = 5;
}

static void td_free(tdata *t)
{
	free(t->q);
	free(t->kbase);
	free(t->index);
	memset(t, 0, sizeof *t);
}

/* s_hj for all heads of visible key j (double). */
static void td_scores(const ax_attn_job *jb, uint64_t pos, double *s)
{
	uint32_t G = jb->n_q_heads / jb->n_kv_heads, D = jb->head_dim;
	uint64_t slot = jb->index_dtype == AX_DTYPE_I32 ? (uint64_t)(int64_t)((const int32_t *)jb->index)[pos]
							 : (uint64_t)((const int64_t *)jb->index)[pos];
	int fp8 = jb->k_dtype == AX_DTYPE_FP8_E4M3 || jb->k_dtype == AX_DTYPE_FP8_E5M2;
	double w = (double)jb->scale * (fp8 ? (double)jb->k_scale : 1.0);
	for (uint32_t h = 0; h < jb->n_q_heads; h++) {
		uint64_t base = slot * jb->k_stride[0] + (uint64_t)(h / G) * jb->k_stride[1];
		double acc = 0;
		for (uint32_t d = 0; d < D; d++)
			acc += td_dec(jb->q, jb->q_dtype, (uint64_t)h * D + d) * td_dec(jb->k, jb->k_dtype, base + d);
		acc *= w;
		s[h] = jb->logit_cap > 0 ? jb->logit_cap * tanh(acc / jb->logit_cap) : acc;
	}
}

static double td_lse(const double *v, uint64_t n)
{
	double m = -INFINITY, s = 0;
	for (uint64_t j = 0; j < n; j++)
		m = v[j] > m ? v[j] : m;
	for (uint64_t j = 0; j < n; j++)
		s += exp(v[j] - m);
	return m + log(s);
}

/* The reference of a valid job with finite inputs and in-pool visible slots. */
static void td_ref(const ax_attn_job *jb, tref *r)
{
	uint32_t H = jb->n_q_heads;
	uint64_t nk = jb->position + 1;
	r->start = jb->window > 0 && nk > (uint64_t)jb->window ? nk - (uint64_t)jb->window : 0;
	r->n = nk - r->start;
	r->rows = jb->mode != AX_MODE_HEADS ? 1 : jb->heads ? jb->n_heads : H;
	double *all = (double *)td_alloc((size_t)H * r->n * sizeof(double)); /* [H][n] */
	double *s = (double *)td_alloc(H * sizeof(double));
	for (uint64_t j = 0; j < r->n; j++) {
		td_scores(jb, r->start + j, s);
		for (uint32_t h = 0; h < H; h++)
			all[h * r->n + j] = s[h];
	}
	r->v = (double *)td_alloc((size_t)r->rows * r->n * sizeof(double));
	r->lse = (double *)td_alloc(r->rows * sizeof(double));
	r->head_id = (int32_t *)td_alloc(r->rows * sizeof(int32_t));
	if (jb->mode == AX_MODE_HEADS) {
		for (uint32_t i = 0; i < r->rows; i++) {
			uint32_t h = jb->heads ? (uint32_t)jb->heads[i] : i;
			memcpy(r->v + i * r->n, all + h * r->n, r->n * sizeof(double));
			r->lse[i] = td_lse(r->v + i * r->n, r->n);
			r->head_id[i] = (int32_t)(jb->head_offset + h);
		}
	} else if (jb->mode == AX_MODE_MEAN_LOGIT) {
		for (uint64_t j = 0; j < r->n; j++) {
			double m = 0;
			for (uint32_t h = 0; h < H; h++)
				m += all[h * r->n + j];
			r->v[j] = m / H;
		}
		r->lse[0] = td_lse(r->v, r->n);
		r->head_id[0] = -1;
	} else {
		for (uint32_t h = 0; h < H; h++)
			s[h] = td_lse(all + h * r->n, r->n);
		for (uint64_t j = 0; j < r->n; j++) {
			double p = 0;
			for (uint32_t h = 0; h < H; h++)
				p += exp(all[h * r->n + j] - s[h]);
			r->v[j] = log(p / H);
		}
		r->lse[0] = 0;
		r->head_id[0] = -1;
	}
	uint32_t k = jb->top_k < r->n ? jb->top_k : (uint32_t)r->n;
	r->order = (int64_t *)td_alloc((size_t)r->rows * (k ? k : 1) * sizeof(int64_t));
	for (uint32_t i = 0; i < r->rows; i++) {
		const double *v = r->v + i * r->n;
		int64_t *o = r->order + (size_t)i * k;
		uint32_t c = 0;
		for (uint64_t j = 0; j < r->n; j++) { /* insertion of (v desc, pos asc) into the first k */
			if (c == k && !(v[j] > v[o[k - 1] - (int64_t)r->start]))
				continue;
			uint32_t at = c < k ? c++ : k - 1;
			while (at > 0 && v[j] > v[o[at - 1] - (int64_t)r->start]) {
				o[at] = o[at - 1];
				at--;
			}
			o[at] = (int64_t)(r->start + j);
		}
	}
	free(all);
	free(s);
}

static void td_ref_free(tref *r)
{
	free(r->v);
	free(r->lse);
	free(r->order);
	free(r->head_id);
	memset(r, 0, sizeof *r);
}

static int td_fail(char *why, size_t len, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(why, len, fmt, ap);
	va_end(ap);
	return -1;
}

/* Check rows got[0 .. r->rows) against the reference; tol: logits and logsumexp. *near counts near-tie
 * substitutions. Returns 0, or -1 with a reason in why. */
static int td_check(const tref *r, uint32_t top_k, const ax_attn_result *got, double tol, int *near, char *why,
		    size_t len)
{
	uint32_t k = top_k < r->n ? top_k : (uint32_t)r->n;
	for (uint32_t i = 0; i < r->rows; i++) {
		const ax_attn_result *g = &got[i];
		const double *v = r->v + i * r->n;
		const int64_t *o = r->order + (size_t)i * k;
		if (g->k != k)
			return td_fail(why, len, "row %u: k %u, want %u", i, g->k, k);
		if (g->head_id != r->head_id[i])
			return td_fail(why, len, "row %u: head_id %d, want %d", i, g->head_id, r->head_id[i]);
		if (!(fabs(g->lse - r->lse[i]) <= tol))
			return td_fail(why, len, "row %u: lse %.9g, want %.9g", i, g->lse, r->lse[i]);
		for (uint32_t e = 0; e < k; e++) {
			int64_t p = g->pos[e];
			if (p < (int64_t)r->start || p >= (int64_t)(r->start + r->n))
				return td_fail(why, len, "row %u entry %u: position %lld not visible", i, e, (long long)p);
			for (uint32_t f = 0; f < e; f++)
				if (g->pos[f] == p)
					return td_fail(why, len, "row %u: position %lld twice", i, (long long)p);
			double want = v[o[e] - (int64_t)r->start], have = v[p - (int64_t)r->start];
			if (p != o[e]) {
				if (!(fabs(have - want) <= 1e-5 * (fabs(want) > 1 ? fabs(want) : 1)))
					return td_fail(why, len, "row %u entry %u: position %lld (%.9g), want %lld (%.9g)", i,
						       e, (long long)p, have, (long long)o[e], want);
				(*near)++;
			}
			if (!(fabs((double)g->logit[e] - have) <= tol))
				return td_fail(why, len, "row %u entry %u: logit %.9g, want %.9g", i, e, g->logit[e],
					       have);
			if (e > 0 && g->logit[e] == g->logit[e - 1] && !(g->pos[e - 1] < p))
				return td_fail(why, len, "row %u entry %u: equal logits not in position order", i, e);
			if (e > 0 && g->logit[e] > g->logit[e - 1])
				return td_fail(why, len, "row %u entry %u: not sorted", i, e);
		}
	}
	return 0;
}

#define BF AX_DTYPE_BF16
#define F16 AX_DTYPE_F16
#define F32 AX_DTYPE_F32
#define E4 AX_DTYPE_FP8_E4M3
#define E5 AX_DTYPE_FP8_E5M2
#define I32 AX_DTYPE_I32
#define I64 AX_DTYPE_I64
#define ML AX_MODE_MEAN_LOGIT
#define MP AX_MODE_MEAN_PROB
#define HD AX_MODE_HEADS

/* Small cases for every feature (the CPU test emulates each; the GPU test runs them too). */
static const tcase td_cases[] = {
	/* name, mode, kdt, qdt, idt, D, H, Hkv, top_k, n_keys, window, cap, n_heads, heads, tie, pad */
	{"logit bf16 D128 G4", ML, BF, BF, I32, 128, 32, 8, 10, 5000, 0, 0, 0, {0}, 1, 0},
	{"heads bf16 D128 list+dup", HD, BF, BF, I32, 128, 32, 8, 10, 3000, 0, 0, 4, {5, 1, 5, 30}, 1, 0},
	{"prob bf16 D128 G4", MP, BF, BF, I32, 128, 32, 8, 10, 4000, 0, 0, 0, {0}, 1, 0},
	{"logit f32 D64 G1 i64 pad", ML, F32, F32, I64, 64, 4, 4, 64, 700, 0, 0, 0, {0}, 1, 1},
	{"heads f16 D256 G8 window cap", HD, F16, F16, I32, 256, 8, 1, 64, 2000, 777, 30, 0, {0}, 1, 0},
	{"prob e4m3 D128 window k1", MP, E4, BF, I64, 128, 8, 2, 1, 1500, 1000, 0, 0, {0}, 1, 0},
	{"logit e5m2 D64 cap", ML, E5, F16, I32, 64, 16, 4, 33, 900, 0, 5, 0, {0}, 1, 0},
	{"heads bf16 D80 (runtime D)", HD, BF, BF, I32, 80, 4, 2, 7, 300, 0, 0, 0, {0}, 1, 0},
	{"logit f16 D100 unaligned rows", ML, F16, F32, I64, 100, 6, 3, 5, 257, 0, 0, 0, {0}, 1, 0},
	{"logit n=1", ML, BF, BF, I32, 128, 32, 8, 10, 1, 0, 0, 0, {0}, 0, 0},
	{"heads n<k", HD, BF, F32, I32, 64, 4, 1, 64, 37, 0, 0, 0, {0}, 1, 0},
	{"logit H160 G80 (Q per chunk)", ML, BF, BF, I32, 128, 160, 2, 10, 300, 0, 0, 0, {0}, 1, 0},
	{"prob H160 G80 cap", MP, F16, BF, I64, 128, 160, 2, 10, 200, 0, 20, 0, {0}, 1, 0},
	{"heads window 1", HD, BF, BF, I64, 64, 4, 2, 3, 50, 1, 0, 2, {3, 0}, 0, 0},
	{"prob f32 D256 G8 pad", MP, F32, F32, I32, 256, 16, 2, 64, 700, 0, 0, 0, {0}, 1, 1},
	{"heads e5m2 D512 (runtime)", HD, E5, F16, I32, 512, 2, 1, 10, 400, 0, 0, 0, {0}, 1, 0},
	{"logit fp8 e4m3 D64 pad", ML, E4, F32, I64, 64, 8, 8, 64, 3000, 2500, 0, 0, {0}, 1, 1},
	{"prob e5m2 D64 H_kv 1 pad (72-byte rows)", MP, E5, BF, I32, 64, 4, 1, 8, 600, 0, 0, 0, {0}, 1, 1},
	{"heads bf16 D128 pool at +2 bytes", HD, BF, BF, I64, 128, 8, 2, 10, 500, 0, 0, 0, {0}, 1, 2},
};

enum { E_SLOT_END, E_SLOT_NEG, E_SLOT_FIRST, E_Q_NAN_UNLISTED, E_K_INF, E_SCALE, E_BOTH, E_K_NAN_UNUSED, E_K_NAN_OUTSIDE,
       E_D1024, E_DOM_THEN_RANGE };

/* Corrupt a job's host data (before it is copied anywhere). */
static void td_corrupt(tdata *t, int what)
{
	ax_attn_job *j = &t->job;
	uint64_t last = j->position;
	int32_t *i32 = (int32_t *)t->index;
	int64_t *i64 = (int64_t *)t->index;
	uint64_t s0 = j->k_stride[0], s1 = j->k_stride[1];
	uint16_t *k16 = (uint16_t *)t->k;
	switch (what) {
	case E_SLOT_END:
		j->index_dtype == AX_DTYPE_I32 ? (void)(i32[last] = (int32_t)j->n_slots) : (void)(i64[last] = (int64_t)j->n_slots);
		break;
	case E_SLOT_NEG:
		j->index_dtype == AX_DTYPE_I32 ? (void)(i32[last / 2] = -1) : (void)(i64[last / 2] = -1);
		break;
	case E_SLOT_FIRST: {
		uint64_t first = j->window > 0 && last + 1 > (uint64_t)j->window ? last + 1 - (uint64_t)j->window : 0;
		j->index_dtype == AX_DTYPE_I32 ? (void)(i32[first] = INT32_MAX) : (void)(i64[first] = INT64_MAX);
		break;
	}
	case E_Q_NAN_UNLISTED: /* heads list {3, 0}: head 2 is not reported but Q is checked whole */
		((uint16_t *)t->q)[2 * j->head_dim + 7] = 0x7fc0;
		break;
	case E_K_INF:
	case E_K_NAN_UNUSED: {
		uint64_t pos = last / 3 * 2;
		uint64_t slot = j->index_dtype == AX_DTYPE_I32 ? (uint64_t)i32[pos] : (uint64_t)i64[pos];
		uint32_t g = what == E_K_NAN_UNUSED ? 1 : 0; /* heads list {0}, G 2: KV head 1 is never read */
		k16[slot * s0 + g * s1 + 5] = what == E_K_INF ? 0x7f80 : 0x7fc0;
		break;
	}
	case E_K_NAN_OUTSIDE: { /* every slot no visible key uses (the keys before the window among them) */
		char *used = (char *)calloc(j->n_slots, 1);
		uint64_t first = last + 1 > (uint64_t)j->window ? last + 1 - (uint64_t)j->window : 0;
		for (uint64_t p = first; p <= last; p++)
			used[j->index_dtype == AX_DTYPE_I32 ? (uint64_t)i32[p] : (uint64_t)i64[p]] = 1;
		for (uint64_t s = 0; s < j->n_slots; s++)
			if (!used[s])
				k16[s * s0 + 3] = 0x7fc0;
		free(used);
		break;
	}
	case E_SCALE:
		j->scale = 3e38f;
		break;
	case E_BOTH:
		td_corrupt(t, E_K_INF);
		td_corrupt(t, E_SLOT_END);
		break;
	case E_D1024:
		j->head_dim = 1024;
		break;
	case E_DOM_THEN_RANGE: { /* in one split (splits start at multiples of 32 ≥ 128): an inf key, then a bad slot */
		uint64_t slot = j->index_dtype == AX_DTYPE_I32 ? (uint64_t)i32[645] : (uint64_t)i64[645];
		k16[slot * s0 + 9] = 0xff80;
		j->index_dtype == AX_DTYPE_I32 ? (void)(i32[760] = -5) : (void)(i64[760] = -5);
		break;
	}
	}
}

typedef struct td_error {
	const char *name;
	int what;
	uint32_t mode, n_heads;
	int32_t heads[2];
	int32_t window;
	int want;
} td_error;

/* Error cases: a 2000-key job (bf16, D 64, H 4, H_kv 2, top-5) corrupted by td_corrupt; want is the code both
 * backends must return. */
static const td_error td_errors[] = {
	{"slot = n_slots at the end", E_SLOT_END, ML, 0, {0}, 0, -ERANGE},
	{"slot -1 in the middle", E_SLOT_NEG, HD, 0, {0}, 0, -ERANGE},
	{"slot INT_MAX at the window's start", E_SLOT_FIRST, MP, 0, {0}, 1500, -ERANGE},
	{"NaN in Q of an unlisted head", E_Q_NAN_UNLISTED, HD, 2, {3, 0}, 0, -EDOM},
	{"inf in a visible key", E_K_INF, ML, 0, {0}, 0, -EDOM},
	{"inf in a visible key, mean_prob", E_K_INF, MP, 0, {0}, 0, -EDOM},
	{"scale overflows Q", E_SCALE, HD, 0, {0}, 0, -EDOM},
	{"inf key and a bad slot: ERANGE wins", E_BOTH, HD, 0, {0}, 0, -ERANGE},
	{"NaN in a KV head no listed head uses", E_K_NAN_UNUSED, HD, 1, {0}, 0, 0},
	{"NaN in a key outside the window", E_K_NAN_OUTSIDE, ML, 0, {0}, 100, 0},
	{"head_dim 1024", E_D1024, ML, 0, {0}, 0, -EOPNOTSUPP},
	{"-inf key, then a bad slot in the same split", E_DOM_THEN_RANGE, ML, 0, {0}, 0, -ERANGE},
	{"-inf key, then a bad slot, heads", E_DOM_THEN_RANGE, HD, 0, {0}, 0, -ERANGE},
};

#endif
