/*
 * attn_cpu_test.c — tests of the CPU attention backend (attn.h) against an independent float64 brute force.
 *
 * Each case in `cases` builds fresh random inputs (seeded per run: the seed is printed, AX_TEST_SEED=N repeats
 * it): Q [H_q, D] and a K pool with more slots than keys, addressed through a shuffled i32 or i64 index row, with
 * a few planted high-scoring keys (and, for tie cases, byte-identical copies of the best one). f16/bf16/fp8 inputs
 * are decoded by this file's own decoders (plain field arithmetic, ldexp) so the reference sees exactly the
 * values the kernel sees. The reference computes every s_hj = scale·q_h·k_j in double with plain loops, the cap,
 * the mode's values, logsumexp and a full sort, and nothing is shared with attn_cpu.c. A result must have the
 * reference's k, logits and logsumexp within 1e-5·max(1, |ref|), and the reference's positions in order: a
 * position may differ from the reference only where the two values are distinct but within that tolerance (an
 * fp32 near-tie); exact ties must come lowest position first. Error paths (bad slots, dtypes, shapes, top_k,
 * heads, NaN/Inf inputs) are a second table. Every result also becomes a record that must pass proto's
 * ax_record_validate. Conversions are checked exhaustively (decode) and on random plus
 * halfway values (encode).
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "attn.h"
#include "attnx_shm.h"

#define TOL 1e-5
#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

static uint64_t g_seed;
static uint64_t g_rng;
static ax_attn_scratch *g_scratch; /* one scratch for every case: it must grow and shrink between jobs */

/* ---- random numbers ---------------------------------------------------------------------------------------- */

static uint64_t rnd_u64(void)
{
	uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static double rnd_uniform(void)
{
	return (double)(rnd_u64() >> 11) * 0x1p-53;
}

static double rnd_normal(void)
{
	double u = rnd_uniform() + 0x1p-60, v = rnd_uniform();
	return sqrt(-2 * log(u)) * cos(2 * M_PI * v);
}

/* ---- independent decoders and encoders ----------------------------------------------------------------------- */

static double ref_float(int sign, int exp_bits, int man_bits, int bias, uint32_t e, uint32_t m, int has_inf)
{
	double v;
	uint32_t emax = (1u << exp_bits) - 1;
	if (has_inf && e == emax)
		v = m ? NAN : INFINITY;
	else if (e == 0)
		v = ldexp((double)m, 1 - bias - man_bits);
	else
		v = ldexp(1.0 + ldexp((double)m, -man_bits), (int)e - bias);
	return sign ? -v : v;
}

static double ref_f16(uint16_t h)
{
	return ref_float(h >> 15, 5, 10, 15, (h >> 10) & 31, h & 1023, 1);
}

static double ref_bf16(uint16_t b)
{
	return ref_float(b >> 15, 8, 7, 127, (b >> 7) & 255, b & 127, 1);
}

static double ref_e4m3(uint8_t b)
{
	if ((b & 0x7f) == 0x7f)
		return NAN;
	return ref_float(b >> 7, 4, 3, 7, (b >> 3) & 15, b & 7, 0);
}

static double ref_e5m2(uint8_t b)
{
	return ref_float(b >> 7, 5, 2, 15, (b >> 2) & 31, b & 3, 1);
}

/* Round |x| to the nearest code among the positive finite codes 0..top (monotonic), ties to the even code. */
static uint32_t ref_round(double ax, uint32_t top, double (*dec)(uint32_t))
{
	uint32_t lo = 0, hi = top;
	while (lo < hi) { /* largest code with dec(code) ≤ ax */
		uint32_t mid = (lo + hi + 1) / 2;
		if (dec(mid) <= ax)
			lo = mid;
		else
			hi = mid - 1;
	}
	if (lo == top)
		return top;
	double d0 = ax - dec(lo), d1 = dec(lo + 1) - ax;
	if (d0 < d1 || (d0 == d1 && (lo & 1) == 0))
		return lo;
	return lo + 1;
}

static double dec_f16_u(uint32_t c)
{
	return ref_f16((uint16_t)c);
}

static double dec_bf16_u(uint32_t c)
{
	return ref_bf16((uint16_t)c);
}

static double dec_e4m3_u(uint32_t c)
{
	return ref_e4m3((uint8_t)c);
}

static double dec_e5m2_u(uint32_t c)
{
	return ref_e5m2((uint8_t)c);
}

/* Reference f32 → f16 / bf16, round to nearest even; overflow past the rounding boundary goes to inf. */
static uint16_t ref_enc_f16(float x)
{
	uint16_t s = signbit(x) ? 0x8000 : 0;
	double ax = fabs((double)x);
	if (isnan(x))
		return 0x7e00;
	if (ax >= 65520.0)
		return s | 0x7c00;
	return s | (uint16_t)ref_round(ax, 0x7bff, dec_f16_u);
}

static uint16_t ref_enc_bf16(float x)
{
	uint16_t s = signbit(x) ? 0x8000 : 0;
	double ax = fabs((double)x);
	double top = ref_bf16(0x7f7f), next = ldexp(1.0, 128);
	if (ax >= (top + next) / 2) /* halfway to 2^128 rounds to even: 0x7f7f is odd, so up to inf */
		return s | 0x7f80;
	return s | (uint16_t)ref_round(ax, 0x7f7f, dec_bf16_u);
}

static uint8_t enc_fp8(double x, uint32_t dtype)
{
	uint8_t s = x < 0 ? 0x80 : 0;
	if (dtype == AX_DTYPE_FP8_E4M3)
		return s | (uint8_t)ref_round(fabs(x), 0x7e, dec_e4m3_u);
	return s | (uint8_t)ref_round(fabs(x), 0x7b, dec_e5m2_u);
}

/* ---- inputs -------------------------------------------------------------------------------------------------- */

typedef struct tcase {
	const char *name;
	uint32_t mode, H, Hkv, D;
	uint32_t qdt, kdt, idt;
	uint32_t n;          /* visible keys before the window: position = n - 1 */
	int32_t window;
	float cap;
	uint32_t top_k;
	int nheads;          /* heads mode: 0 = all (NULL list), else use `heads` */
	int32_t heads[6];
	int ties;            /* plant byte-identical copies of the best key */
	int pad;             /* pad each kv head row (non-contiguous strides) */
	size_t store_cap;    /* mean_prob: 1 = force the two-pass path */
} tcase;

typedef struct fixture {
	const tcase *c;
	uint64_t n_slots;
	size_t kes;
	void *q, *k, *index;
	double *qd;       /* [H, D] decoded Q */
	double *kd;       /* [n_slots, Hkv, D] decoded K */
	int64_t *slots;   /* [n] slot of each position */
	ax_attn_job job;
} fixture;

static size_t dsize(uint32_t dt)
{
	return dt == AX_DTYPE_F32 ? 4 : dt == AX_DTYPE_F16 || dt == AX_DTYPE_BF16 ? 2 : 1;
}

/* Store x in element i of a buffer of dtype dt (scaled down by ks for fp8) and return the value stored. */
static double put(void *buf, size_t i, uint32_t dt, double x, double ks)
{
	switch (dt) {
	case AX_DTYPE_F32:
		((float *)buf)[i] = (float)x;
		return (float)x;
	case AX_DTYPE_F16:
		((uint16_t *)buf)[i] = ax_f32_to_f16((float)x);
		return ref_f16(((uint16_t *)buf)[i]);
	case AX_DTYPE_BF16:
		((uint16_t *)buf)[i] = ax_f32_to_bf16((float)x);
		return ref_bf16(((uint16_t *)buf)[i]);
	case AX_DTYPE_FP8_E4M3:
		((uint8_t *)buf)[i] = enc_fp8(x / ks, dt);
		return ref_e4m3(((uint8_t *)buf)[i]) * ks;
	default:
		((uint8_t *)buf)[i] = enc_fp8(x / ks, dt);
		return ref_e5m2(((uint8_t *)buf)[i]) * ks;
	}
}

static size_t kelem(const fixture *f, uint64_t slot, uint32_t g, uint32_t d)
{
	return slot * f->job.k_stride[0] + g * f->job.k_stride[1] + d;
}

static void set_key(fixture *f, uint64_t slot, uint32_t g, uint32_t d, double x)
{
	const tcase *c = f->c;
	f->kd[(slot * c->Hkv + g) * c->D + d] = put(f->k, kelem(f, slot, g, d), c->kdt, x, f->job.k_scale);
}

/* Key at position pos = target·sqrt(G) · (unit vector of the group's summed query): each head of the group
 * scores about `target` on it. */
static void plant(fixture *f, uint64_t pos, double target)
{
	const tcase *c = f->c;
	uint32_t G = c->H / c->Hkv;
	for (uint32_t g = 0; g < c->Hkv; g++) {
		double norm = 0, u[512];
		for (uint32_t d = 0; d < c->D; d++) {
			u[d] = 0;
			for (uint32_t h = g * G; h < (g + 1) * G; h++)
				u[d] += f->qd[h * c->D + d];
			norm += u[d] * u[d];
		}
		for (uint32_t d = 0; d < c->D; d++)
			set_key(f, (uint64_t)f->slots[pos], g, d, target * sqrt((double)G) * u[d] / sqrt(norm));
	}
}

/* Make the key at `dst` a byte copy of the key at `src`. */
static void copy_key(fixture *f, uint64_t src, uint64_t dst)
{
	const tcase *c = f->c;
	uint64_t a = (uint64_t)f->slots[src], b = (uint64_t)f->slots[dst];
	for (uint32_t g = 0; g < c->Hkv; g++) {
		memcpy((char *)f->k + kelem(f, b, g, 0) * f->kes, (char *)f->k + kelem(f, a, g, 0) * f->kes,
		       c->D * f->kes);
		memcpy(&f->kd[(b * c->Hkv + g) * c->D], &f->kd[(a * c->Hkv + g) * c->D], c->D * sizeof(double));
	}
}

static void fill_index(fixture *f)
{
	const tcase *c = f->c;
	uint64_t *perm = malloc(f->n_slots * sizeof *perm);
	assert_non_null(perm);
	for (uint64_t i = 0; i < f->n_slots; i++)
		perm[i] = i;
	for (uint64_t i = f->n_slots - 1; i > 0; i--) {
		uint64_t j = rnd_u64() % (i + 1), t = perm[i];
		perm[i] = perm[j];
		perm[j] = t;
	}
	for (uint32_t j = 0; j < c->n; j++) {
		f->slots[j] = (int64_t)perm[j];
		if (c->idt == AX_DTYPE_I32)
			((int32_t *)f->index)[j] = (int32_t)perm[j];
		else
			((int64_t *)f->index)[j] = (int64_t)perm[j];
	}
	free(perm);
}

static void fill_job(fixture *f)
{
	const tcase *c = f->c;
	ax_attn_job *job = &f->job;
	uint32_t row = c->D + (c->pad ? 8 : 0);
	memset(job, 0, sizeof *job);
	job->q = f->q;
	job->q_dtype = c->qdt;
	job->k = f->k;
	job->k_dtype = c->kdt;
	job->k_scale = c->kdt == AX_DTYPE_FP8_E4M3 || c->kdt == AX_DTYPE_FP8_E5M2 ? 0.0625f : 1.0f;
	job->k_stride[0] = (uint64_t)c->Hkv * row;
	job->k_stride[1] = row;
	job->k_stride[2] = 1;
	job->n_slots = f->n_slots;
	job->index = f->index;
	job->index_dtype = c->idt;
	job->position = c->n - 1;
	job->window = c->window;
	job->n_q_heads = c->H;
	job->n_kv_heads = c->Hkv;
	job->head_dim = c->D;
	job->head_offset = 100;
	job->scale = (float)(1.0 / sqrt((double)c->D));
	job->logit_cap = c->cap;
	job->mode = c->mode;
	job->top_k = c->top_k;
	job->heads = c->nheads ? c->heads : NULL;
	job->n_heads = (uint32_t)c->nheads;
}

static int setup_case(void **state)
{
	const tcase *c = *state;
	fixture *f = calloc(1, sizeof *f);
	if (!f)
		return -1;
	f->c = c;
	g_rng = g_seed ^ (0x51ed2701ull * (uint64_t)(uintptr_t)c->name[0]) ^ ((uint64_t)c->n << 20) ^ c->H;
	f->n_slots = c->n + 37;
	f->kes = dsize(c->kdt);
	fill_job(f);
	f->q = calloc((size_t)c->H * c->D, 4);
	f->k = calloc(f->n_slots * f->job.k_stride[0], f->kes);
	f->index = calloc(c->n, 8);
	f->qd = calloc((size_t)c->H * c->D, sizeof(double));
	f->kd = calloc(f->n_slots * c->Hkv * c->D, sizeof(double));
	f->slots = calloc(c->n, sizeof(int64_t));
	*state = f;
	if (!f->q || !f->k || !f->index || !f->qd || !f->kd || !f->slots)
		return -1;
	fill_job(f);
	for (size_t i = 0; i < (size_t)c->H * c->D; i++)
		f->qd[i] = put(f->q, i, c->qdt, rnd_normal(), 1);
	for (uint64_t s = 0; s < f->n_slots; s++)
		for (uint32_t g = 0; g < c->Hkv; g++)
			for (uint32_t d = 0; d < c->D; d++)
				set_key(f, s, g, d, rnd_normal());
	fill_index(f);
	for (int p = 0; p < 6 && c->n > 1; p++) /* planted keys at random positions, targets 3..8 */
		plant(f, rnd_u64() % c->n, 3.0 + p);
	if (c->ties && c->n >= 8) {
		uint64_t best = c->n / 2;
		plant(f, best, 10.0);
		copy_key(f, best, best - 3);
		copy_key(f, best, c->n - 1);
	}
	return 0;
}

static int teardown_case(void **state)
{
	fixture *f = *state;
	if (!f)
		return 0;
	free(f->q);
	free(f->k);
	free(f->index);
	free(f->qd);
	free(f->kd);
	free(f->slots);
	free(f);
	return 0;
}

/* ---- float64 reference ------------------------------------------------------------------------------------------ */

typedef struct refset {
	uint64_t start, n;  /* visible keys */
	double *s;          /* [H, n] capped scores */
	double *lse;        /* [H] */
} refset;

static double lse_of(const double *v, uint64_t n, size_t stride)
{
	double m = -INFINITY, sum = 0;
	for (uint64_t j = 0; j < n; j++)
		m = v[j * stride] > m ? v[j * stride] : m;
	for (uint64_t j = 0; j < n; j++)
		sum += exp(v[j * stride] - m);
	return m + log(sum);
}

static void ref_scores(const fixture *f, refset *r)
{
	const tcase *c = f->c;
	uint32_t G = c->H / c->Hkv;
	uint64_t nk = c->n;
	r->start = c->window > 0 && nk > (uint64_t)c->window ? nk - (uint64_t)c->window : 0;
	r->n = nk - r->start;
	r->s = malloc(c->H * r->n * sizeof(double));
	r->lse = malloc(c->H * sizeof(double));
	assert_non_null(r->s);
	assert_non_null(r->lse);
	double scale = (float)(1.0 / sqrt((double)c->D));
	for (uint32_t h = 0; h < c->H; h++) {
		for (uint64_t j = 0; j < r->n; j++) {
			const double *kv = &f->kd[((uint64_t)f->slots[r->start + j] * c->Hkv + h / G) * c->D];
			double dot = 0;
			for (uint32_t d = 0; d < c->D; d++)
				dot += f->qd[h * c->D + d] * kv[d];
			double s = scale * dot;
			if (c->cap > 0)
				s = c->cap * tanh(s / c->cap);
			r->s[h * r->n + j] = s;
		}
		r->lse[h] = lse_of(&r->s[h * r->n], r->n, 1);
	}
}

/* The mode's per-key values (mean logit or log p) into v [n]. */
static void ref_mean(const fixture *f, const refset *r, double *v)
{
	const tcase *c = f->c;
	for (uint64_t j = 0; j < r->n; j++) {
		double acc = 0, m = -INFINITY;
		if (c->mode == AX_MODE_MEAN_LOGIT) {
			for (uint32_t h = 0; h < c->H; h++)
				acc += r->s[h * r->n + j];
			v[j] = acc / c->H;
			continue;
		}
		for (uint32_t h = 0; h < c->H; h++)
			m = fmax(m, r->s[h * r->n + j] - r->lse[h]);
		for (uint32_t h = 0; h < c->H; h++)
			acc += exp(r->s[h * r->n + j] - r->lse[h] - m);
		v[j] = m + log(acc) - log((double)c->H);
	}
}

static const double *g_sort_v;

static int by_value(const void *a, const void *b)
{
	uint64_t i = *(const uint64_t *)a, j = *(const uint64_t *)b;
	if (g_sort_v[i] != g_sort_v[j])
		return g_sort_v[i] > g_sort_v[j] ? -1 : 1;
	return i < j ? -1 : i > j;
}

static int close_to(double got, double want)
{
	return fabs(got - want) <= TOL * fmax(1.0, fabs(want));
}

/* One result row against the reference values v [n] of visible keys and their logsumexp. */
static void check_row(const ax_attn_result *res, const refset *r, const double *v, double lse, uint32_t top_k)
{
	uint64_t *ord = malloc(r->n * sizeof *ord);
	assert_non_null(ord);
	for (uint64_t j = 0; j < r->n; j++)
		ord[j] = j;
	g_sort_v = v;
	qsort(ord, r->n, sizeof *ord, by_value);
	uint64_t k = r->n < top_k ? r->n : top_k;
	assert_int_equal(res->k, k);
	for (uint64_t i = 0; i < k; i++) {
		double want = v[ord[i]];
		if (!close_to(res->logit[i], want))
			fail_msg("rank %llu: logit %.9g, reference %.9g", (unsigned long long)i, res->logit[i], want);
		int64_t p = res->pos[i];
		assert_true(p >= (int64_t)r->start && p < (int64_t)(r->start + r->n));
		for (uint64_t e = 0; e < i; e++)
			assert_true(res->pos[e] != p);
		if ((uint64_t)p != r->start + ord[i]) { /* only a near-tie may swap; exact ties go lowest first */
			double vp = v[p - (int64_t)r->start];
			if (vp == want || !close_to(vp, want))
				fail_msg("rank %llu: position %lld (%.9g), reference %llu (%.9g)", (unsigned long long)i,
					 (long long)p, vp, (unsigned long long)(r->start + ord[i]), want);
		}
	}
	if (!close_to(res->lse, lse))
		fail_msg("logsumexp %.9g, reference %.9g", res->lse, lse);
	free(ord);
}

/* The record a result becomes must pass proto's validation (the daemon's batcher rejects anything else). */
static void check_record(const ax_attn_result *res, uint32_t mode, uint64_t position)
{
	ax_record r;
	ax_record_init(&r, AX_REC_ATTN);
	snprintf(r.src, sizeof r.src, "capture:test");
	snprintf(r.rid, sizeof r.rid, "ax-test");
	r.u.attn.position = (int64_t)position;
	r.u.attn.layer_id = 3;
	ax_attn_to_record(res, mode, &r.u.attn);
	int rc = ax_record_validate(&r);
	if (rc)
		fail_msg("ax_record_validate: %d", rc);
	double sum = 0;
	for (uint32_t i = 0; i < r.u.attn.k; i++)
		sum += r.u.attn.attention_scores[i];
	assert_true(fabs(sum - 1) < 1e-5);
	assert_true(r.u.attn.topk_mass > 0 && r.u.attn.topk_mass <= 1);
}

/* ---- kernel cases -------------------------------------------------------------------------------------------------- */

static void test_case(void **state)
{
	fixture *f = *state;
	const tcase *c = f->c;
	ax_attn_result out[8];
	refset r;
	uint32_t rows = ax_attn_rows(&f->job);
	assert_true(rows >= 1 && rows <= 8);
	ax__attn_scratch_set_store_cap(g_scratch, c->store_cap ? c->store_cap : (64u << 20));
	int rc = ax_attn_cpu(&f->job, g_scratch, out);
	if (rc)
		fail_msg("ax_attn_cpu: %d", rc);
	ref_scores(f, &r);
	double *v = malloc(r.n * sizeof *v);
	assert_non_null(v);
	if (c->mode == AX_MODE_HEADS) {
		for (uint32_t i = 0; i < rows; i++) {
			uint32_t h = c->nheads ? (uint32_t)c->heads[i] : i;
			assert_int_equal(out[i].head_id, 100 + (int32_t)h);
			for (uint64_t j = 0; j < r.n; j++)
				v[j] = r.s[h * r.n + j];
			check_row(&out[i], &r, v, r.lse[h], c->top_k);
			check_record(&out[i], c->mode, c->n - 1);
		}
	} else {
		ref_mean(f, &r, v);
		assert_int_equal(out[0].head_id, -1);
		double lse = c->mode == AX_MODE_MEAN_LOGIT ? lse_of(v, r.n, 1) : 0.0;
		check_row(&out[0], &r, v, lse, c->top_k);
		if (c->mode == AX_MODE_MEAN_PROB)
			assert_true(out[0].lse == 0.0);
		check_record(&out[0], c->mode, c->n - 1);
	}
	if (c->ties && c->n >= 8) { /* the three copies of the best key lead, lowest position first */
		assert_int_equal(out[0].pos[0], c->n / 2 - 3);
		if (c->top_k >= 2)
			assert_int_equal(out[0].pos[1], c->n / 2);
		if (c->top_k >= 3)
			assert_int_equal(out[0].pos[2], c->n - 1);
	}
	free(v);
	free(r.s);
	free(r.lse);
}

#define F32 AX_DTYPE_F32
#define F16 AX_DTYPE_F16
#define BF16 AX_DTYPE_BF16
#define E4M3 AX_DTYPE_FP8_E4M3
#define E5M2 AX_DTYPE_FP8_E5M2
#define I32 AX_DTYPE_I32
#define I64 AX_DTYPE_I64
#define ML AX_MODE_MEAN_LOGIT
#define MP AX_MODE_MEAN_PROB
#define HD AX_MODE_HEADS

static const tcase cases[] = {
	/* name                     mode H  Hkv D   qdt   kdt   idt  n     win  cap   k  nh heads        ties pad */
	{"logit mha f32 i32",        ML, 4, 4, 64, F32, F32, I32, 300, 0, 0, 5, 0, {0}, 0, 0, 0},
	{"logit gqa2 f32 i64 k64",   ML, 8, 4, 128, F32, F32, I64, 1000, 0, 0, 64, 0, {0}, 0, 1, 0},
	{"logit gqa4 bf16",          ML, 16, 4, 128, BF16, BF16, I32, 2000, 0, 0, 10, 0, {0}, 0, 0, 0},
	{"logit gqa8 f16",           ML, 32, 4, 64, F16, F16, I64, 700, 0, 0, 5, 0, {0}, 0, 0, 0},
	{"logit gqa4 cap",           ML, 8, 2, 64, F32, F32, I32, 500, 0, 30, 5, 0, {0}, 0, 0, 0},
	{"logit window",             ML, 8, 2, 64, F32, BF16, I32, 1000, 100, 0, 5, 0, {0}, 0, 0, 0},
	{"logit window+cap k64",     ML, 4, 1, 128, BF16, F16, I64, 777, 129, 20, 64, 0, {0}, 0, 1, 0},
	{"logit shorter than k",     ML, 8, 2, 64, F32, F32, I32, 3, 0, 0, 5, 0, {0}, 0, 0, 0},
	{"logit one key",            ML, 4, 2, 64, F32, F32, I64, 1, 0, 0, 1, 0, {0}, 0, 0, 0},
	{"logit ties k2",            ML, 8, 4, 64, F32, F32, I32, 400, 0, 0, 2, 0, {0}, 1, 0, 0},
	{"logit ties k5 bf16",       ML, 8, 1, 128, BF16, BF16, I64, 333, 0, 0, 5, 0, {0}, 1, 0, 0},
	{"logit bench shape",        ML, 32, 8, 128, BF16, BF16, I32, 5000, 0, 0, 10, 0, {0}, 0, 0, 0},
	{"logit q f16 k f32 block",  ML, 8, 8, 64, F16, F32, I32, 129, 0, 0, 1, 0, {0}, 0, 0, 0},
	{"logit fp8 e4m3",           ML, 8, 2, 64, F32, E4M3, I32, 400, 0, 0, 5, 0, {0}, 0, 0, 0},
	{"heads all gqa2",           HD, 4, 2, 64, F32, F32, I32, 600, 0, 0, 5, 0, {0}, 0, 0, 0},
	{"heads list dup bf16 k64",  HD, 8, 2, 128, BF16, BF16, I64, 900, 0, 0, 64, 4, {3, 0, 5, 3}, 0, 1, 0},
	{"heads gqa8 win cap k1",    HD, 16, 2, 128, F16, F16, I32, 300, 50, 20, 1, 3, {15, 1, 8}, 0, 0, 0},
	{"heads mha short",          HD, 4, 4, 64, F32, BF16, I64, 4, 0, 0, 64, 0, {0}, 0, 0, 0},
	{"heads ties",               HD, 4, 1, 64, F32, F32, I32, 256, 0, 0, 5, 1, {2}, 1, 0, 0},
	{"heads fp8 e5m2",           HD, 4, 2, 64, F32, E5M2, I64, 300, 0, 0, 5, 2, {1, 2}, 0, 0, 0},
	{"prob gqa4 f32",            MP, 8, 2, 64, F32, F32, I32, 800, 0, 0, 5, 0, {0}, 0, 0, 0},
	{"prob mha shorter bf16",    MP, 4, 4, 128, BF16, BF16, I64, 2, 0, 0, 64, 0, {0}, 0, 0, 0},
	{"prob gqa8 two-pass k64",   MP, 32, 4, 128, F32, F32, I32, 1500, 0, 0, 64, 0, {0}, 0, 0, 1},
	{"prob win cap f16",         MP, 8, 4, 64, F16, F16, I64, 1000, 300, 25, 10, 0, {0}, 0, 1, 0},
	{"prob ties",                MP, 8, 2, 64, F32, F32, I32, 500, 0, 0, 5, 0, {0}, 1, 0, 0},
	{"prob bench shape",         MP, 32, 8, 128, BF16, BF16, I64, 3000, 0, 0, 10, 0, {0}, 0, 0, 0},
	{"prob two-pass bf16 block", MP, 8, 2, 64, BF16, BF16, I32, 257, 0, 0, 5, 0, {0}, 0, 0, 1},
	/* long rows: hundreds of blocks of online logsumexp, and 40K tokens (where the seed's kernel fails) */
	{"logit 40K bf16",           ML, 8, 2, 64, BF16, BF16, I32, 40000, 0, 0, 10, 0, {0}, 0, 0, 0},
	{"heads 40K f32 k64",        HD, 4, 1, 64, F32, F32, I64, 40000, 0, 0, 64, 2, {0, 3}, 0, 0, 0},
	{"prob 40K bf16 window",     MP, 4, 2, 64, BF16, BF16, I32, 40000, 32768, 0, 10, 0, {0}, 0, 0, 0},
	/* head_dim not a multiple of 16 or 8: the 8-wide and scalar tails of every dot-product loop */
	{"logit bf16 D72",           ML, 8, 2, 72, BF16, BF16, I32, 300, 0, 0, 5, 0, {0}, 0, 0, 0},
	{"logit cap f16 D20",        ML, 4, 2, 20, F32, F16, I64, 200, 0, 10, 5, 0, {0}, 0, 1, 0},
	{"heads f16 D40",            HD, 4, 2, 40, F16, F16, I64, 200, 0, 0, 5, 0, {0}, 0, 0, 0},
	{"heads e5m2 D72",           HD, 8, 4, 72, F32, E5M2, I32, 150, 0, 0, 3, 0, {0}, 0, 0, 0},
	{"prob bf16 D36",            MP, 4, 1, 36, BF16, BF16, I32, 200, 0, 0, 5, 0, {0}, 0, 0, 0},
	{"logit f32 D100 e4m3",      ML, 4, 1, 100, F32, E4M3, I64, 90, 0, 0, 5, 0, {0}, 0, 0, 0},
};

/* ---- error paths ---------------------------------------------------------------------------------------------------- */

typedef struct ecase {
	const char *name;
	int want;
	void (*spoil)(fixture *f);
} ecase;

static void e_slot_past(fixture *f) { ((int32_t *)f->index)[7] = (int32_t)f->n_slots; }
static void e_slot_neg(fixture *f) { ((int32_t *)f->index)[0] = -1; }
static void e_slot_i64(fixture *f) { f->job.index_dtype = I64; memset(f->index, 0xff, 8 * 4); }
/* The pool ends just below the highest slot in use (the highest, not the last position's: the shuffle may put
 * slot 0 last, and a pool of 0 slots is -EINVAL, not -ERANGE). */
static void e_slot_n1(fixture *f)
{
	int64_t hi = 0;
	for (uint64_t j = 0; j < f->c->n; j++)
		hi = f->slots[j] > hi ? f->slots[j] : hi;
	f->job.n_slots = (uint64_t)hi;
}
static void e_qdt(fixture *f) { f->job.q_dtype = AX_DTYPE_I32; }
static void e_kdt(fixture *f) { f->job.k_dtype = 99; }
static void e_idt(fixture *f) { f->job.index_dtype = F32; }
static void e_topk0(fixture *f) { f->job.top_k = 0; }
static void e_topk65(fixture *f) { f->job.top_k = 65; }
static const int32_t bad_neg[] = {1, -1}, bad_big[] = {8}, ok_heads[] = {7, 0};
static void e_head_neg(fixture *f) { f->job.mode = HD; f->job.heads = bad_neg; f->job.n_heads = 2; }
static void e_head_big(fixture *f) { f->job.mode = HD; f->job.heads = bad_big; f->job.n_heads = 1; }
static void e_head_none(fixture *f) { f->job.mode = HD; f->job.heads = ok_heads; f->job.n_heads = 0; }
static void e_gqa(fixture *f) { f->job.n_kv_heads = 3; }
static void e_dim0(fixture *f) { f->job.head_dim = 0; }
static void e_stride(fixture *f) { f->job.k_stride[2] = 2; }
static void e_noq(fixture *f) { f->job.q = NULL; }
static void e_mode(fixture *f) { f->job.mode = 4; }
static void e_window(fixture *f) { f->job.window = -1; }
static void e_scale(fixture *f) { f->job.scale = NAN; }
static void e_cap(fixture *f) { f->job.logit_cap = -1; }
static void e_q_nan(fixture *f) { ((float *)f->q)[17] = NAN; }
static void e_q_inf(fixture *f) { ((float *)f->q)[0] = -INFINITY; }
static void e_q_overflow(fixture *f) { ((float *)f->q)[5] = 3e38f; f->job.scale = 10; }
static void e_k_nan(fixture *f) { ((float *)f->k)[kelem(f, (uint64_t)f->slots[f->c->n - 1], 1, 5)] = NAN; }
static void e_k_nan_prob(fixture *f) { e_k_nan(f); f->job.mode = MP; }
static void e_k_nan_heads(fixture *f) { e_k_nan(f); f->job.mode = HD; }
static void e_k_inf_cap(fixture *f)
{
	((float *)f->k)[kelem(f, (uint64_t)f->slots[200], 0, 0)] = INFINITY;
	f->job.logit_cap = 30;
}
/* Outside the window nothing is read: a NaN key or a bad slot there changes nothing. */
static void e_nan_outside(fixture *f)
{
	f->job.window = 100;
	((float *)f->k)[kelem(f, (uint64_t)f->slots[3], 0, 0)] = NAN;
	((int32_t *)f->index)[5] = -7;
}

static const tcase ecase_base = {"errors", ML, 8, 2, 64, F32, F32, I32, 300, 0, 0, 5, 0, {0}, 0, 0, 0};

static const ecase ecases[] = {
	{"slot past the pool", -ERANGE, e_slot_past},
	{"negative slot", -ERANGE, e_slot_neg},
	{"negative i64 slot", -ERANGE, e_slot_i64},
	{"pool one slot short", -ERANGE, e_slot_n1},
	{"bad q dtype", -EINVAL, e_qdt},
	{"bad k dtype", -EINVAL, e_kdt},
	{"bad index dtype", -EINVAL, e_idt},
	{"top_k 0", -EINVAL, e_topk0},
	{"top_k 65", -EINVAL, e_topk65},
	{"negative head", -EINVAL, e_head_neg},
	{"head past H_q", -EINVAL, e_head_big},
	{"empty head list", -EINVAL, e_head_none},
	{"H_q not a multiple of H_kv", -EINVAL, e_gqa},
	{"head_dim 0", -EINVAL, e_dim0},
	{"dim stride 2", -EINVAL, e_stride},
	{"no q", -EINVAL, e_noq},
	{"mode 4", -EINVAL, e_mode},
	{"negative window", -EINVAL, e_window},
	{"NaN scale", -EINVAL, e_scale},
	{"negative cap", -EINVAL, e_cap},
	{"NaN in q", -EDOM, e_q_nan},
	{"-inf in q", -EDOM, e_q_inf},
	{"scale·q overflows", -EDOM, e_q_overflow},
	{"NaN in a key", -EDOM, e_k_nan},
	{"NaN in a key, mean_prob", -EDOM, e_k_nan_prob},
	{"NaN in a key, heads", -EDOM, e_k_nan_heads},
	{"inf in a key under a cap", -EDOM, e_k_inf_cap},
	{"NaN and bad slot outside the window", 0, e_nan_outside},
};

static void test_errors(void **state)
{
	(void)state;
	for (size_t i = 0; i < ARRAY_LEN(ecases); i++) {
		void *st = (void *)&ecase_base;
		assert_int_equal(setup_case(&st), 0);
		fixture *f = st;
		ax_attn_result out[8];
		ecases[i].spoil(f);
		int rc = ax_attn_cpu(&f->job, g_scratch, out);
		teardown_case(&st);
		if (rc != ecases[i].want)
			fail_msg("%s: got %d, want %d", ecases[i].name, rc, ecases[i].want);
	}
	assert_int_equal(ax_attn_cpu(NULL, g_scratch, NULL), -EINVAL);
}

/* bf16 infinity in Q: the decoded row itself is not finite. */
static void test_bf16_inf_q(void **state)
{
	static const tcase c = {"bf16 inf", HD, 4, 2, 64, BF16, BF16, I64, 50, 0, 0, 5, 0, {0}, 0, 0, 0};
	void *st = (void *)&c;
	(void)state;
	assert_int_equal(setup_case(&st), 0);
	fixture *f = st;
	ax_attn_result out[4];
	((uint16_t *)f->q)[3] = 0x7f80;
	int rc = ax_attn_cpu(&f->job, g_scratch, out);
	((uint16_t *)f->q)[3] = 0x3f80;
	((uint16_t *)f->k)[kelem(f, (uint64_t)f->slots[10], 1, 0)] = 0xffc1; /* NaN key */
	int rc2 = ax_attn_cpu(&f->job, g_scratch, out);
	teardown_case(&st);
	assert_int_equal(rc, -EDOM);
	assert_int_equal(rc2, -EDOM);
}

/* ---- threads ----------------------------------------------------------------------------------------------------- */

/* Jobs on several threads, each with its own scratch, give bit-identical results to the same jobs run serially. */
#define N_THREADS 4
static const uint32_t thread_modes[] = {AX_MODE_MEAN_LOGIT, AX_MODE_HEADS, AX_MODE_MEAN_PROB};

typedef struct tjob {
	ax_attn_job job;              /* per-thread copy of the fixture's job */
	const ax_attn_result *want;   /* [3 modes][16 heads] serial results */
	int bad;                      /* set by the thread: an error or a differing result */
} tjob;

static void *thread_main(void *arg)
{
	tjob *t = arg;
	ax_attn_scratch *s = ax_attn_scratch_new();
	ax_attn_result out[16];
	t->bad = s == NULL;
	for (int rep = 0; rep < 3 && s; rep++)
		for (size_t m = 0; m < ARRAY_LEN(thread_modes); m++) {
			t->job.mode = thread_modes[m];
			uint32_t rows = ax_attn_rows(&t->job);
			memset(out, 0, sizeof out);
			if (ax_attn_cpu(&t->job, s, out) != 0 || memcmp(out, t->want + m * 16, rows * sizeof *out) != 0)
				t->bad = 1;
		}
	ax_attn_scratch_free(s);
	return NULL;
}

static void test_threads(void **state)
{
	static const tcase c = {"threads", HD, 16, 4, 128, BF16, BF16, I32, 3000, 0, 0, 10, 0, {0}, 0, 0, 0};
	void *st = (void *)&c;
	ax_attn_result want[3 * 16];
	tjob jobs[N_THREADS];
	pthread_t tid[N_THREADS];
	(void)state;
	assert_int_equal(setup_case(&st), 0);
	fixture *f = st;
	memset(want, 0, sizeof want);
	int rc = 0;
	for (size_t m = 0; m < ARRAY_LEN(thread_modes); m++) {
		f->job.mode = thread_modes[m];
		rc |= ax_attn_cpu(&f->job, g_scratch, want + m * 16);
	}
	int started = 0;
	for (int i = 0; i < N_THREADS && rc == 0; i++, started++) {
		jobs[i] = (tjob){.job = f->job, .want = want};
		if (pthread_create(&tid[i], NULL, thread_main, &jobs[i]) != 0)
			break;
	}
	int bad = 0;
	for (int i = 0; i < started; i++) {
		pthread_join(tid[i], NULL);
		bad |= jobs[i].bad;
	}
	teardown_case(&st);
	assert_int_equal(rc, 0);
	assert_int_equal(started, N_THREADS);
	assert_int_equal(bad, 0);
}

/* ---- record conversion ------------------------------------------------------------------------------------------------ */

static void test_to_record(void **state)
{
	ax_attn_result res = {.head_id = 107, .k = 3, .pos = {9, 2, 4}, .logit = {2.0f, 1.0f, -0.5f}, .lse = 3.25};
	ax_rec_attn rec;
	(void)state;
	memset(&rec, 0x55, sizeof rec);
	ax_attn_to_record(&res, AX_MODE_MEAN_LOGIT, &rec);
	assert_int_equal(rec.k, 3);
	assert_int_equal(rec.head_id, -1);
	assert_int_equal(rec.mode, AX_MODE_MEAN_LOGIT);
	double z = exp(2.0) + exp(1.0) + exp(-0.5), sum = 0;
	for (int i = 0; i < 3; i++) {
		assert_int_equal(rec.token_positions[i], res.pos[i]);
		assert_true(rec.topk_logits[i] == res.logit[i]);
		assert_true(fabs(rec.attention_scores[i] - exp(res.logit[i]) / z) < 1e-7);
		sum += rec.attention_scores[i];
	}
	assert_true(fabs(sum - 1) < 1e-6);
	assert_true(rec.logsumexp_all == 3.25);
	assert_true(fabs(rec.topk_mass - z / exp(3.25)) < 1e-12);

	ax_attn_to_record(&res, AX_MODE_HEADS, &rec);
	assert_int_equal(rec.head_id, 107);

	/* mean_prob: logits are log p, lse 0, mass = Σ p (clamped to 1 against rounding). */
	ax_attn_result p = {.head_id = -1, .k = 2, .pos = {0, 1}, .logit = {logf(0.75f), logf(0.25f)}, .lse = 0};
	ax_attn_to_record(&p, AX_MODE_MEAN_PROB, &rec);
	assert_true(rec.logsumexp_all == 0);
	assert_true(rec.topk_mass <= 1.0 && rec.topk_mass > 1 - 1e-6);
	assert_true(fabs(rec.attention_scores[0] - 0.75) < 1e-6);
}

/* Tie-heavy keys (zero rows: every logit 0; copies of earlier rows: equal logits at several positions) at the
 * GPU test engine's fast-path shape (bf16, H_q 16, H_kv 4, D 128), every mode, 1..300 keys, random top-k: every
 * result row must become a record the encoder accepts (ties by lower position, logits descending, finite mass).
 * Session 5's GPU run had a CPU-backend capture refuse two records once; this pins the backend's side of that. */
static void test_records_on_ties(void **state)
{
	enum { H = 16, HKV = 4, D = 128, SLOTS = 320 };
	(void)state;
	uint16_t *k = calloc((size_t)SLOTS * HKV * D, sizeof *k), *q = calloc((size_t)H * D, sizeof *q);
	int32_t *idx = calloc(SLOTS, sizeof *idx);
	ax_attn_result *out = calloc(H, sizeof *out);
	assert_true(k && q && idx && out);
	for (int it = 0; it < 400; it++) {
		const uint32_t n = 1 + (uint32_t)(rnd_u64() % 300), zero_every = 1 + (uint32_t)(rnd_u64() % 4);
		memset(k, 0, (size_t)SLOTS * HKV * D * sizeof *k);
		for (uint32_t r = 0; r < n; r++) {
			idx[r] = (int32_t)(n - 1 - r); /* slots in reverse: position order is not slot order */
			uint16_t *row = k + (size_t)idx[r] * HKV * D;
			if (rnd_u64() % zero_every == 0)
				continue;
			if (r > 0 && rnd_u64() % 2) {
				memcpy(row, k + (size_t)idx[rnd_u64() % r] * HKV * D, (size_t)HKV * D * sizeof *k);
				continue;
			}
			for (int i = 0; i < HKV * D; i++)
				row[i] = ax_f32_to_bf16((float)(rnd_u64() % 2001) / 1000.0f - 1.0f);
		}
		for (int i = 0; i < H * D; i++)
			q[i] = ax_f32_to_bf16((float)(rnd_u64() % 2001) / 1000.0f - 1.0f);
		ax_attn_job j;
		memset(&j, 0, sizeof j);
		j.q = q, j.q_dtype = AX_DTYPE_BF16, j.k = k, j.k_dtype = AX_DTYPE_BF16, j.k_scale = 1;
		j.k_stride[0] = HKV * D, j.k_stride[1] = D, j.k_stride[2] = 1, j.n_slots = SLOTS;
		j.index = idx, j.index_dtype = AX_DTYPE_I32, j.position = n - 1;
		j.n_q_heads = H, j.n_kv_heads = HKV, j.head_dim = D, j.scale = 0.088f;
		const uint32_t m = (uint32_t)(it % 3);
		j.mode = m == 0 ? AX_MODE_HEADS : m == 1 ? AX_MODE_MEAN_LOGIT : AX_MODE_MEAN_PROB;
		j.top_k = 1 + (uint32_t)(rnd_u64() % 20);
		assert_int_equal(ax_attn_cpu(&j, g_scratch, out), 0);
		for (uint32_t h = 0; h < ax_attn_rows(&j); h++)
			check_record(&out[h], j.mode, j.position);
	}
	free(k), free(q), free(idx), free(out);
}

/* A real job end to end into a record: mass and lse agree with the result. */
static void test_record_from_job(void **state)
{
	static const tcase c = {"rec", MP, 8, 2, 64, F32, F32, I32, 40, 0, 0, 64, 0, {0}, 0, 0, 0};
	void *st = (void *)&c;
	(void)state;
	assert_int_equal(setup_case(&st), 0);
	fixture *f = st;
	ax_attn_result out[1];
	ax_rec_attn rec;
	int rc = ax_attn_cpu(&f->job, g_scratch, out);
	teardown_case(&st);
	assert_int_equal(rc, 0);
	ax_attn_to_record(&out[0], AX_MODE_MEAN_PROB, &rec);
	assert_int_equal(rec.k, 40);
	assert_true(fabs(rec.topk_mass - 1.0) < 1e-5); /* every key is in the top-k: all the mass */
	for (uint32_t i = 1; i < rec.k; i++)
		assert_true(rec.topk_logits[i] <= rec.topk_logits[i - 1]);
}

/* ---- conversions -------------------------------------------------------------------------------------------------------- */

static int same(double want, float got)
{
	return isnan(want) ? isnan(got) : (double)got == want && !signbit(got) == !signbit(want);
}

static void test_decode_all(void **state)
{
	(void)state;
	for (uint32_t c = 0; c < 65536; c++) {
		if (!same(ref_f16((uint16_t)c), ax_f16_to_f32((uint16_t)c)))
			fail_msg("f16 0x%04x", c);
		if (!same(ref_bf16((uint16_t)c), ax_bf16_to_f32((uint16_t)c)))
			fail_msg("bf16 0x%04x", c);
	}
	for (uint32_t c = 0; c < 256; c++) {
		if (!same(ref_e4m3((uint8_t)c), ax_fp8_e4m3_to_f32((uint8_t)c)))
			fail_msg("e4m3 0x%02x", c);
		if (!same(ref_e5m2((uint8_t)c), ax_fp8_e5m2_to_f32((uint8_t)c)))
			fail_msg("e5m2 0x%02x", c);
	}
}

static void check_encode(float x)
{
	uint16_t h = ax_f32_to_f16(x), b = ax_f32_to_bf16(x);
	if (isnan(x)) {
		assert_true(isnan(ref_f16(h)) && isnan(ref_bf16(b)));
		return;
	}
	if (h != ref_enc_f16(x))
		fail_msg("f16 of %a: 0x%04x, want 0x%04x", x, h, ref_enc_f16(x));
	if (b != ref_enc_bf16(x))
		fail_msg("bf16 of %a: 0x%04x, want 0x%04x", x, b, ref_enc_bf16(x));
}

static void test_encode(void **state)
{
	(void)state;
	g_rng = g_seed ^ 0xe1c0de;
	for (int i = 0; i < 200000; i++) { /* random bit patterns cover every exponent, NaN and inf included */
		uint32_t u = (uint32_t)rnd_u64();
		float x;
		memcpy(&x, &u, 4);
		check_encode(x);
		check_encode((float)(rnd_normal() * ldexp(1.0, (int)(rnd_u64() % 50) - 30)));
	}
	for (uint32_t c = 0; c < 0x7bff; c++) /* every f16 halfway point (exact in f32) and its neighbours */
		for (int s = 0; s < 2; s++) {
			float mid = (float)((ref_f16((uint16_t)c) + ref_f16((uint16_t)(c + 1))) / 2) * (s ? -1 : 1);
			check_encode(mid);
			check_encode(nextafterf(mid, 0));
			check_encode(nextafterf(mid, INFINITY));
		}
	for (uint32_t c = 0; c < 0x7f7f; c += 7) { /* bf16 halfway points */
		float mid = (float)((ref_bf16((uint16_t)c) + ref_bf16((uint16_t)(c + 1))) / 2);
		check_encode(mid);
	}
	check_encode(65504.0f);
	check_encode(65519.99f);
	check_encode(65520.0f);
	check_encode(3.4028235e38f);
	check_encode(0x1p-25f);
	check_encode(0x1.8p-25f);
	check_encode(-0.0f);
}

static void test_rows(void **state)
{
	static const int32_t hs[] = {1, 2, 2};
	ax_attn_job j = {.mode = AX_MODE_MEAN_PROB, .n_q_heads = 8};
	(void)state;
	assert_int_equal(ax_attn_rows(&j), 1);
	j.mode = AX_MODE_HEADS;
	assert_int_equal(ax_attn_rows(&j), 8);
	j.heads = hs;
	j.n_heads = 3;
	assert_int_equal(ax_attn_rows(&j), 3);
	assert_int_equal(ax_attn_rows(NULL), 0);
	ax_attn_scratch_free(NULL);
}

int main(void)
{
	const char *env = getenv("AX_TEST_SEED");
	g_seed = env ? strtoull(env, NULL, 0) : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
	printf("# attn_cpu_test seed %llu (AX_TEST_SEED=%llu repeats this run)\n", (unsigned long long)g_seed,
	       (unsigned long long)g_seed);
	g_scratch = ax_attn_scratch_new();
	if (!g_scratch)
		return 1;
	struct CMUnitTest tests[ARRAY_LEN(cases) + 9];
	size_t n = 0;
	for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
		struct CMUnitTest t = {cases[i].name, test_case, setup_case, teardown_case, (void *)&cases[i]};
		tests[n++] = t;
	}
	struct CMUnitTest more[] = {
		cmocka_unit_test(test_errors),       cmocka_unit_test(test_bf16_inf_q), cmocka_unit_test(test_to_record),
		cmocka_unit_test(test_record_from_job), cmocka_unit_test(test_decode_all), cmocka_unit_test(test_encode),
		cmocka_unit_test(test_rows),         cmocka_unit_test(test_threads), cmocka_unit_test(test_records_on_ties),
	};
	for (size_t i = 0; i < ARRAY_LEN(more); i++)
		tests[n++] = more[i];
	int rc = _cmocka_run_group_tests("attn_cpu", tests, n, NULL, NULL);
	ax_attn_scratch_free(g_scratch);
	return rc;
}
