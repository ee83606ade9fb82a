/*
 * attn_cpu.c — the CPU backend of the capture's compute interface (attn.h): exact top-k attention of one query
 * row over every visible key, plus the record conversion and the f16/bf16 helpers.
 *
 * How it works. The job is validated first (shape, dtypes, top_k, heads) and every visible index value is
 * checked against the pool (-ERANGE) before any key is touched. The query heads the job needs become "virtual
 * rows" of f32 in the scratch, grouped by KV head and with the softmax scale folded in; mean_logit without a
 * logit cap collapses each GQA group into one row (mean_h q_h·k = (mean_h q_h)·k), so it costs H_kv·D
 * multiply-adds per key instead of H_q·D. Keys are then processed in blocks of AX_BLOCK positions, two keys per
 * pass: each key row is read once, converted to f32 in registers (bf16/f16/fp8 with bit operations) and dotted
 * against every virtual row of its KV head's group, filling a score tile [rows, block]. Per block, each row (or
 * their mean) feeds an online logsumexp (running max in f32, block sums in f32 lanes, the total in f64) and a
 * sorted top-k array (insertion, skipped when the block max cannot enter). mean_prob needs each head's
 * logsumexp before it can average probabilities, so its scores are kept in the scratch (or, past store_cap
 * bytes, recomputed in a second pass over the keys) and a second sweep computes
 * log p_j = log mean_h exp(s_hj − lse_h) in the log domain (no underflow to −inf). Keys are visited in
 * increasing position, so a strict ">" in the top-k insertion breaks ties by the lower position.
 *
 * Paged jobs (vLLM block tables) differ only in where a key row is (key_at): block index[j / bs] at row j % bs, a
 * shift and a mask when bs is a power of two; check_index checks the block ids of every block holding a visible key.
 *
 * Inputs that are NaN or infinite (in Q, or in any key element the job reads: they make a dot product
 * non-finite) make the job fail with -EDOM rather than produce a record; the check is one multiply-add per
 * score (x·0 is 0 only for finite x).
 *
 * Speed (capture/BENCH.md): the hot loops use GCC vector types of 8 floats, which gcc maps to one AVX register
 * or two SSE ones, with no fast-math; the hot functions are compiled for x86-64-v3 (AVX2+FMA) and for the
 * baseline via target_clones, so no -march is needed. 16-bit keys are converted 16 at a time from one 32-byte
 * load (even and odd halves, with Q stored in the same order); key rows are prefetched (prefetcht2) 8 keys ahead,
 * which matters for shuffled slots. Buffers must be aligned to their element size.
 */
/* The 32-byte vector helpers below are always inlined: no call passes a vector across the ABI. */
#pragma GCC diagnostic ignored "-Wpsabi"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attn.h"
#include "attnx_shm.h"

#define AX_BLOCK 128            /* keys per score tile */
#ifndef AX_PREFETCH
#define AX_PREFETCH 8           /* keys ahead whose rows are prefetched */
#endif
#ifndef AX_PF_STEP
#define AX_PF_STEP 64           /* bytes between prefetches within a key head */
#endif
#ifndef AX_PF_HINT
#define AX_PF_HINT 1            /* __builtin_prefetch locality: prefetcht2 measured best (capture/BENCH.md) */
#endif
#define AX_MAX_HEADS 4096       /* sanity caps on the job shape */
#define AX_MAX_HEAD_DIM 4096
#define AX_STORE_CAP_DEFAULT (64u << 20) /* bytes of mean_prob scores kept instead of a second pass */

/* AX_NO_CLONES builds the baseline code only: the test suite runs it too, so the clone that machines without
 * AVX2 take is tested on machines with it. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__) && \
	!defined(AX_NO_CLONES)
#define AX_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define AX_HOT
#endif
#define AX_INLINE inline __attribute__((always_inline))

struct ax_attn_scratch {
	float *q;          /* [rows, D] virtual query rows, f32, scale folded in */
	float *qs;         /* [H_q, D] the job's Q in f32 */
	float *tile;       /* [rows, tstride] scores of a block (or of all keys for mean_prob) */
	float *red;        /* [2, AX_BLOCK] reduced rows: mean logit, or max_h and Σ_h exp for mean_prob */
	float *max;        /* [rows] running maxima of the online logsumexp (then, for mean_prob, lse) */
	double *sum;       /* [rows] running sums of the online logsumexp */
	uint32_t *vhead;   /* [rows] local query head of each virtual row */
	int32_t *outrow;   /* [rows] heads mode: output row of each virtual row */
	int32_t *hmap;     /* [H_q] heads mode: virtual row of each query head, -1 if not selected */
	uint32_t *gbeg;    /* [H_kv + 1] virtual rows of KV head g are gbeg[g] .. gbeg[g+1]-1 */
	size_t cap_q, cap_qs, cap_tile, cap_red, cap_max, cap_sum, cap_vhead, cap_outrow, cap_hmap, cap_gbeg;
	size_t store_cap;  /* bytes of mean_prob scores kept in `tile` before falling back to two passes */
};

/* Everything one job needs, derived once. */
typedef struct plan {
	const ax_attn_job *job;
	uint32_t H, Hkv, G, D;     /* query heads, KV heads, group size, head dim */
	uint32_t rows;             /* virtual rows */
	uint32_t trows;            /* tile rows: 1 when collapsed, else rows */
	int collapsed;             /* mean_logit without cap: one row per KV head */
	uint64_t start, n;         /* first visible key position, visible keys */
	size_t esize;              /* bytes per key element */
	const char *kbase;
	uint64_t s0, s1;           /* byte strides: slot (paged: row of a block), kv head */
	int paged;                 /* index is a block-table row (AX_ATTN_INDEX_PAGED) */
	uint64_t bs, sb;           /* paged: block size, byte stride between blocks */
	int bshift;                /* paged: log2(bs) when bs is a power of two, else -1 (a division per key) */
} plan;

/* ---- conversions ---------------------------------------------------------------------------------------- */

static AX_INLINE float u2f(uint32_t u)
{
	float f;
	memcpy(&f, &u, sizeof f);
	return f;
}

static AX_INLINE uint32_t f2u(float f)
{
	uint32_t u;
	memcpy(&u, &f, sizeof u);
	return u;
}

static AX_INLINE float bf16_f32(uint16_t b)
{
	return u2f((uint32_t)b << 16);
}

/* Branch-free: the f16 exponent/mantissa moved into f32 position and rescaled by 2^(127-15) is exact for normal
 * and subnormal halves; an all-ones exponent becomes inf/NaN with its payload. */
static AX_INLINE float f16_f32(uint16_t h)
{
	uint32_t em = h & 0x7fffu;
	uint32_t u = f2u(u2f(em << 13) * 0x1p112f);
	u |= em >= 0x7c00u ? 0x7f800000u : 0u;
	return u2f(u | ((uint32_t)(h & 0x8000u) << 16));
}

/* OCP e4m3 (the "fn" variant: no infinities, S.1111.111 is NaN), bias 7. */
static AX_INLINE float e4m3_f32(uint8_t b)
{
	uint32_t em = b & 0x7fu;
	uint32_t u = f2u(u2f(em << 20) * 0x1p120f);
	u = em == 0x7fu ? 0x7fc00000u : u;
	return u2f(u | ((uint32_t)(b & 0x80u) << 24));
}

/* e5m2 is the top byte of an f16. */
static AX_INLINE float e5m2_f32(uint8_t b)
{
	return f16_f32((uint16_t)(b << 8));
}

float ax_f16_to_f32(uint16_t h)
{
	return f16_f32(h);
}

float ax_bf16_to_f32(uint16_t b)
{
	return bf16_f32(b);
}

float ax_fp8_e4m3_to_f32(uint8_t b)
{
	return e4m3_f32(b);
}

float ax_fp8_e5m2_to_f32(uint8_t b)
{
	return e5m2_f32(b);
}

uint16_t ax_f32_to_bf16(float f)
{
	uint32_t u = f2u(f);
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN (quiet) */
	u += 0x7fffu + ((u >> 16) & 1u);       /* round to nearest even; overflow carries into inf */
	return (uint16_t)(u >> 16);
}

uint16_t ax_f32_to_f16(float f)
{
	uint32_t u = f2u(f);
	uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
	u &= 0x7fffffffu;
	if (u >= 0x7f800000u)                   /* inf / NaN */
		return sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u);
	if (u >= 0x477ff000u)                   /* ≥ 65520 rounds to inf */
		return sign | 0x7c00u;
	if (u < 0x38800000u) {                  /* below 2^-14: subnormal half; let the FPU round at 2^-24 */
		float t = u2f(u) + 0.5f;
		return sign | (uint16_t)(f2u(t) - 0x3f000000u);
	}
	u += 0xc8000fffu + ((u >> 13) & 1u);   /* rebias 127 → 15 (wraps mod 2^32), round to nearest even */
	return sign | (uint16_t)(u >> 13);
}

/* ---- vector helpers --------------------------------------------------------------------------------------- */

/* exp for x ≤ ~88 (Cephes polynomial, ~2 ulp): no branches, so loops over it vectorise. x below -87.3 is
 * clamped, returning ~1e-38 instead of 0, which no sum here can see. */
static AX_INLINE float ax_expf(float x)
{
	x = x < -87.3f ? -87.3f : x;
	x = x > 88.3f ? 88.3f : x;
	float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
	float r = x - n * 0.693359375f;
	r = r - n * -2.12194440e-4f;
	float p = 1.9875691500e-4f;
	p = p * r + 1.3981999507e-3f;
	p = p * r + 8.3334519073e-3f;
	p = p * r + 4.1665795894e-2f;
	p = p * r + 1.6666665459e-1f;
	p = p * r + 5.0000001201e-1f;
	p = p * r * r + r + 1.0f;
	return p * u2f((uint32_t)((int32_t)n + 127) << 23);
}

/* cap·tanh(s/cap) without cancellation: Taylor series below |x| = 0.2, (1-e)/(1+e) with e = exp(-2|x|) above. */
static AX_INLINE float ax_softcap(float s, float cap, float inv_cap)
{
	float x = s * inv_cap;
	float a = fabsf(x);
	float x2 = x * x;
	float small = x * (1.0f + x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315 + x2 * (62.0f / 2835)))));
	float e = ax_expf(-2.0f * a);
	float big = copysignf((1.0f - e) / (1.0f + e), x);
	return cap * (a < 0.2f ? small : big);
}


/* ---- scores ----------------------------------------------------------------------------------------------- */

/* Eight lanes of f32 (one AVX register, two SSE registers in the baseline clone) and the integer shapes the key
 * conversions go through. GCC vector extensions: the conversions are the scalar bit operations above, lane-wise. */
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint8_t v8b __attribute__((vector_size(8)));

static AX_INLINE v8f ld8(const float *p)
{
	v8f v;
	memcpy(&v, p, sizeof v);
	return v;
}

static AX_INLINE v8f f16x8(v8u h)
{
	v8u em = h & 0x7fffu;
	v8u u = (v8u)((v8f)(em << 13) * 0x1p112f);
	u |= (v8u)(em >= 0x7c00u) & 0x7f800000u;
	return (v8f)(u | ((h & 0x8000u) << 16));
}

/* Eight key elements at p, of dtype dt (a constant where this is inlined), as f32. */
static AX_INLINE v8f key8(const char *p, uint32_t dt)
{
	if (dt == AX_DTYPE_BF16 || dt == AX_DTYPE_F16) {
		v8h h;
		memcpy(&h, p, sizeof h);
		v8u u = __builtin_convertvector(h, v8u);
		return dt == AX_DTYPE_BF16 ? (v8f)(u << 16) : f16x8(u);
	}
	if (dt == AX_DTYPE_FP8_E4M3 || dt == AX_DTYPE_FP8_E5M2) {
		v8b b;
		memcpy(&b, p, sizeof b);
		v8u u = __builtin_convertvector(b, v8u);
		if (dt == AX_DTYPE_FP8_E5M2)
			return f16x8(u << 8);
		v8u em = u & 0x7fu;
		v8u r = (v8u)((v8f)(em << 20) * 0x1p120f);
		v8u nan = (v8u)(em == 0x7fu);
		r = (nan & 0x7fc00000u) | (~nan & r);
		return (v8f)(r | ((u & 0x80u) << 24));
	}
	return ld8((const float *)p);
}

/* Bytes per key element; a constant where dt is. */
static AX_INLINE size_t dt_size(uint32_t dt)
{
	return dt == AX_DTYPE_F32 ? 4 : dt == AX_DTYPE_BF16 || dt == AX_DTYPE_F16 ? 2 : 1;
}

/* 16-bit keys are converted 16 at a time from one 32-byte load: the low halves of the eight u32 words are the
 * even elements, the high halves the odd ones. The query rows are stored in the same order (even8, odd8 per
 * full 16-element chunk; see build_rows), so the dot product needs no shuffle. */
static AX_INLINE int paired(uint32_t dt)
{
	return dt == AX_DTYPE_BF16 || dt == AX_DTYPE_F16;
}

static AX_INLINE void key16(const char *p, uint32_t dt, v8f *even, v8f *odd)
{
	if (!paired(dt)) {
		*even = key8(p, dt);
		*odd = key8(p + 8 * dt_size(dt), dt);
		return;
	}
	v8u u;
	memcpy(&u, p, sizeof u);
	if (dt == AX_DTYPE_BF16) {
		*even = (v8f)(u << 16);
		*odd = (v8f)(u & 0xffff0000u);
	} else {
		*even = f16x8(u & 0xffffu);
		*odd = f16x8(u >> 16);
	}
}

static AX_INLINE float key1(const char *p, uint32_t dt)
{
	switch (dt) {
	case AX_DTYPE_BF16:
		return bf16_f32(*(const uint16_t *)p);
	case AX_DTYPE_F16:
		return f16_f32(*(const uint16_t *)p);
	case AX_DTYPE_FP8_E4M3:
		return e4m3_f32(*(const uint8_t *)p);
	case AX_DTYPE_FP8_E5M2:
		return e5m2_f32(*(const uint8_t *)p);
	default:
		return *(const float *)p;
	}
}

typedef float v4f __attribute__((vector_size(16)));

static AX_INLINE v4f half_sum(v8f v)
{
	return __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
}

static AX_INLINE float hsum8(v8f v)
{
	v4f h = half_sum(v);
	h += __builtin_shufflevector(h, h, 2, 3, 0, 1);
	return h[0] + h[1];
}

/* The four sums of a, b, c, d as one vector (transpose and add). */
static AX_INLINE v4f hsum8x4(v8f a, v8f b, v8f c, v8f d)
{
	v4f x = half_sum(a), y = half_sum(b), z = half_sum(c), w = half_sum(d);
	v4f xy = __builtin_shufflevector(x, y, 0, 4, 1, 5) + __builtin_shufflevector(x, y, 2, 6, 3, 7);
	v4f zw = __builtin_shufflevector(z, w, 0, 4, 1, 5) + __builtin_shufflevector(z, w, 2, 6, 3, 7);
	return __builtin_shufflevector(xy, zw, 0, 1, 4, 5) + __builtin_shufflevector(xy, zw, 2, 3, 6, 7);
}

/* Dot products of nh (1, 2 or 4; a constant where inlined) query rows q [nh, D] with one key head k [D] of dtype
 * dt: out[h·ostride] = q_h · k. Two accumulators per row hide the add latency; each key chunk is converted once. */
static AX_INLINE void dots(const float *restrict q, const char *restrict k, uint32_t D, uint32_t dt, int nh,
			   float *out, size_t ostride)
{
	v8f a[4][2] = {{{0}}};
	size_t esz = dt_size(dt);
	uint32_t d = 0;
	for (; d + 16 <= D; d += 16) {
		v8f k0, k1;
		key16(k + d * esz, dt, &k0, &k1);
		for (int h = 0; h < nh; h++) {
			a[h][0] += ld8(q + (size_t)h * D + d) * k0;
			a[h][1] += ld8(q + (size_t)h * D + d + 8) * k1;
		}
	}
	for (; d + 8 <= D; d += 8) {
		v8f k0 = key8(k + d * esz, dt);
		for (int h = 0; h < nh; h++)
			a[h][0] += ld8(q + (size_t)h * D + d) * k0;
	}
	float sums[4];
	if (nh == 4) {
		v4f v = hsum8x4(a[0][0] + a[0][1], a[1][0] + a[1][1], a[2][0] + a[2][1], a[3][0] + a[3][1]);
		memcpy(sums, &v, sizeof v);
	} else {
		for (int h = 0; h < nh; h++)
			sums[h] = hsum8(a[h][0] + a[h][1]);
	}
	for (int h = 0; h < nh; h++) {
		float t = sums[h];
		for (uint32_t e = d; e < D; e++)
			t += q[(size_t)h * D + e] * key1(k + e * esz, dt);
		out[(size_t)h * ostride] = t;
	}
}

/* Collapsed mean_logit: Σ_g qbar_g · k_g with the accumulators carried across KV heads (one sum per key). */
static AX_INLINE float dot_collapsed(const plan *pl, const float *restrict q, const char *restrict row, uint32_t dt)
{
	v8f a[4] = {{0}};
	float tail = 0;
	uint32_t D = pl->D;
	size_t esz = dt_size(dt);
	for (uint32_t g = 0; g < pl->Hkv; g++) {
		const char *k = row + g * pl->s1;
		const float *qg = q + (size_t)g * D;
		uint32_t d = 0;
		for (; d + 32 <= D; d += 32) {
			v8f k0, k1, k2, k3;
			key16(k + d * esz, dt, &k0, &k1);
			key16(k + (d + 16) * esz, dt, &k2, &k3);
			a[0] += ld8(qg + d) * k0;
			a[1] += ld8(qg + d + 8) * k1;
			a[2] += ld8(qg + d + 16) * k2;
			a[3] += ld8(qg + d + 24) * k3;
		}
		for (; d + 16 <= D; d += 16) {
			v8f k0, k1;
			key16(k + d * esz, dt, &k0, &k1);
			a[0] += ld8(qg + d) * k0;
			a[1] += ld8(qg + d + 8) * k1;
		}
		for (; d + 8 <= D; d += 8)
			a[2] += ld8(qg + d) * key8(k + d * esz, dt);
		for (; d < D; d++)
			tail += qg[d] * key1(k + d * esz, dt);
	}
	return hsum8((a[0] + a[1]) + (a[2] + a[3])) + tail;
}

/* Index entry i read as a signed integer then as unsigned (negative values are out of range). */
static AX_INLINE uint64_t index_at(const ax_attn_job *job, uint64_t i)
{
	if (job->index_dtype == AX_DTYPE_I32)
		return (uint64_t)(int64_t)((const int32_t *)job->index)[i];
	return (uint64_t)((const int64_t *)job->index)[i];
}

/* First byte of key j's row (KV head 0): through its slot, or its block and the row in the block. Only called for
 * visible keys, whose slots / block ids check_index has checked. */
static AX_INLINE const char *key_at(const plan *pl, uint64_t j)
{
	if (!pl->paged)
		return pl->kbase + index_at(pl->job, j) * pl->s0;
	uint64_t b = pl->bshift >= 0 ? j >> pl->bshift : j / pl->bs;
	uint64_t r = pl->bshift >= 0 ? j & (pl->bs - 1) : j % pl->bs;
	return pl->kbase + index_at(pl->job, b) * pl->sb + r * pl->s0;
}

static AX_INLINE void prefetch_key(const plan *pl, const uint32_t *gbeg, const char *row)
{
	size_t len = (size_t)pl->D * pl->esize;
	for (uint32_t g = 0; g < pl->Hkv; g++) {
		if (gbeg[g] == gbeg[g + 1])
			continue;
		for (size_t off = 0; off < len; off += AX_PF_STEP)
			__builtin_prefetch(row + g * pl->s1 + off, 0, AX_PF_HINT);
	}
}

/* dots() for two keys at once, sharing each query load: out[h·ostride] = q_h·ka, out[h·ostride + 1] = q_h·kb.
 * With four rows that is eight independent accumulators (enough to hide the FMA latency), with fewer rows each
 * dot gets two. */
static AX_INLINE void dots_pair(const float *restrict q, const char *restrict ka, const char *restrict kb,
				uint32_t D, uint32_t dt, int nh, float *out, size_t ostride)
{
	v8f a[4][2][2] = {{{{0}}}};
	const int split = nh < 4;
	size_t esz = dt_size(dt);
	uint32_t d = 0;
	for (; d + 16 <= D; d += 16) {
		v8f a0, a1, b0, b1;
		key16(ka + d * esz, dt, &a0, &a1);
		key16(kb + d * esz, dt, &b0, &b1);
		for (int h = 0; h < nh; h++) {
			v8f q0 = ld8(q + (size_t)h * D + d), q1 = ld8(q + (size_t)h * D + d + 8);
			a[h][0][0] += q0 * a0;
			a[h][1][0] += q0 * b0;
			a[h][0][split] += q1 * a1;
			a[h][1][split] += q1 * b1;
		}
	}
	for (; d + 8 <= D; d += 8) {
		v8f a0 = key8(ka + d * esz, dt), b0 = key8(kb + d * esz, dt);
		for (int h = 0; h < nh; h++) {
			v8f q0 = ld8(q + (size_t)h * D + d);
			a[h][0][0] += q0 * a0;
			a[h][1][0] += q0 * b0;
		}
	}
	float sa[4], sb[4];
	if (nh == 4) {
		v4f va = hsum8x4(a[0][0][0], a[1][0][0], a[2][0][0], a[3][0][0]);
		v4f vb = hsum8x4(a[0][1][0], a[1][1][0], a[2][1][0], a[3][1][0]);
		memcpy(sa, &va, sizeof va);
		memcpy(sb, &vb, sizeof vb);
	} else {
		for (int h = 0; h < nh; h++) {
			sa[h] = hsum8(a[h][0][0] + a[h][0][1]);
			sb[h] = hsum8(a[h][1][0] + a[h][1][1]);
		}
	}
	for (int h = 0; h < nh; h++) {
		for (uint32_t e = d; e < D; e++) {
			sa[h] += q[(size_t)h * D + e] * key1(ka + e * esz, dt);
			sb[h] += q[(size_t)h * D + e] * key1(kb + e * esz, dt);
		}
		out[(size_t)h * ostride] = sa[h];
		out[(size_t)h * ostride + 1] = sb[h];
	}
}

/* Every virtual row's dot products with one key (kb == NULL) or two keys (ka, kb) at tile column jj (and jj+1). */
static AX_INLINE void key_rows(const plan *pl, const ax_attn_scratch *s, const char *ra, const char *rb,
			       float *tile, size_t tstride, uint32_t jj, uint32_t dt)
{
	uint32_t D = pl->D;
	for (uint32_t g = 0; g < pl->Hkv; g++) {
		uint32_t r = s->gbeg[g], r1 = s->gbeg[g + 1];
		const char *ka = ra + g * pl->s1, *kb = rb ? rb + g * pl->s1 : NULL;
		for (; r < r1;) {
			int nh = r1 - r >= 4 ? 4 : r1 - r >= 2 ? 2 : 1;
			const float *q = s->q + (size_t)r * D;
			float *out = tile + r * tstride + jj;
			if (kb && nh == 4)
				dots_pair(q, ka, kb, D, dt, 4, out, tstride);
			else if (kb && nh == 2)
				dots_pair(q, ka, kb, D, dt, 2, out, tstride);
			else if (kb)
				dots_pair(q, ka, kb, D, dt, 1, out, tstride);
			else if (nh == 4)
				dots(q, ka, D, dt, 4, out, tstride);
			else if (nh == 2)
				dots(q, ka, D, dt, 2, out, tstride);
			else
				dots(q, ka, D, dt, 1, out, tstride);
			r += (uint32_t)nh;
		}
	}
}

/* score_block for one key dtype (a constant after inlining): keys two at a time, rows prefetched ahead. */
static AX_INLINE void score_block_dt(const plan *pl, const ax_attn_scratch *s, uint64_t j0, uint32_t nb,
				     float *tile, size_t tstride, uint32_t dt)
{
	uint64_t end = pl->start + pl->n;
	for (uint32_t jj = 0; jj < nb;) {
		uint64_t j = j0 + jj;
		int two = !pl->collapsed && jj + 1 < nb;
		for (uint64_t p = j + AX_PREFETCH; AX_PREFETCH && p < end && p <= j + AX_PREFETCH + (uint64_t)two; p++)
			prefetch_key(pl, s->gbeg, key_at(pl, p));
		const char *ra = key_at(pl, j);
		if (pl->collapsed)
			tile[jj] = dot_collapsed(pl, s->q, ra, dt);
		else
			key_rows(pl, s, ra, two ? key_at(pl, j + 1) : NULL, tile, tstride, jj, dt);
		jj += 1 + (uint32_t)two;
	}
}

/* Scores of keys j0 .. j0+nb-1 for every tile row: tile[r * tstride + jj] (one row when collapsed). */
AX_HOT static void score_block(const plan *pl, const ax_attn_scratch *s, uint64_t j0, uint32_t nb, float *tile,
			       size_t tstride)
{
	switch (pl->job->k_dtype) {
	case AX_DTYPE_BF16:
		score_block_dt(pl, s, j0, nb, tile, tstride, AX_DTYPE_BF16);
		break;
	case AX_DTYPE_F16:
		score_block_dt(pl, s, j0, nb, tile, tstride, AX_DTYPE_F16);
		break;
	case AX_DTYPE_FP8_E4M3:
		score_block_dt(pl, s, j0, nb, tile, tstride, AX_DTYPE_FP8_E4M3);
		break;
	case AX_DTYPE_FP8_E5M2:
		score_block_dt(pl, s, j0, nb, tile, tstride, AX_DTYPE_FP8_E5M2);
		break;
	default:
		score_block_dt(pl, s, j0, nb, tile, tstride, AX_DTYPE_F32);
		break;
	}
}

/* Lane-wise versions of the scalar helpers, for the row loops. sel(m, a, b) = m ? a : b per lane. */
typedef int32_t v8i __attribute__((vector_size(32)));

static AX_INLINE v8f sel(v8i m, v8f a, v8f b)
{
	return (v8f)(((v8u)m & (v8u)a) | (~(v8u)m & (v8u)b));
}

static AX_INLINE v8f splat(float x)
{
	return (v8f){x, x, x, x, x, x, x, x};
}

static AX_INLINE v8f vmax(v8f a, v8f b)
{
	return sel(a > b, a, b);
}

static AX_INLINE v8f v8_exp(v8f x)
{
	x = vmax(x, splat(-87.3f));
	x = sel(x > 88.3f, splat(88.3f), x);
	v8f n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
	v8f r = x - n * 0.693359375f;
	r = r - n * -2.12194440e-4f;
	v8f p = r * 1.9875691500e-4f + 1.3981999507e-3f;
	p = p * r + 8.3334519073e-3f;
	p = p * r + 4.1665795894e-2f;
	p = p * r + 1.6666665459e-1f;
	p = p * r + 5.0000001201e-1f;
	p = p * r * r + r + 1.0f;
	v8i e = __builtin_convertvector(n, v8i) + 127;
	return p * (v8f)((v8u)e << 23);
}

static AX_INLINE v8f v8_softcap(v8f s, float cap, float inv_cap)
{
	v8f x = s * inv_cap;
	v8u sign = (v8u)x & 0x80000000u;
	v8f a = (v8f)((v8u)x & 0x7fffffffu);
	v8f x2 = x * x;
	v8f small = x * (1.0f + x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315 + x2 * (62.0f / 2835)))));
	v8f e = v8_exp(-2.0f * a);
	v8f big = (v8f)((v8u)((1.0f - e) / (1.0f + e)) | sign);
	return cap * sel(a < 0.2f, small, big);
}

/* Finite check and logit cap over one tile row; returns 0, or NaN if any score is not finite (x·0 is 0 only
 * for finite x). The check runs before the cap, which would map ±inf to ±cap. */
AX_HOT static float finish_row(float *t, uint32_t n, float cap)
{
	v8f z = {0};
	uint32_t i = 0;
	for (; i + 8 <= n; i += 8)
		z += ld8(t + i) * 0.0f;
	float zs = hsum8(z);
	for (; i < n; i++)
		zs += t[i] * 0.0f;
	if (cap > 0) {
		float inv = 1.0f / cap;
		for (i = 0; i + 8 <= n; i += 8) {
			v8f v = v8_softcap(ld8(t + i), cap, inv);
			memcpy(t + i, &v, sizeof v);
		}
		for (; i < n; i++)
			t[i] = ax_softcap(t[i], cap, inv);
	}
	return zs;
}

AX_HOT static float row_max(const float *t, uint32_t n)
{
	v8f m = splat(-INFINITY);
	uint32_t i = 0;
	for (; i + 8 <= n; i += 8)
		m = vmax(ld8(t + i), m);
	float r = -INFINITY;
	for (int l = 0; l < 8; l++)
		r = m[l] > r ? m[l] : r;
	for (; i < n; i++)
		r = t[i] > r ? t[i] : r;
	return r;
}

/* Σ exp(t[i] - m), lanes in f32 (a block is short), total in f64. */
AX_HOT static double row_expsum(const float *t, uint32_t n, float m)
{
	v8f a = {0};
	uint32_t i = 0;
	for (; i + 8 <= n; i += 8)
		a += v8_exp(ld8(t + i) - m);
	double s = hsum8(a);
	for (; i < n; i++)
		s += ax_expf(t[i] - m);
	return s;
}

/* acc[i] = Σ_r rows[r][i] · w over `rows` rows of stride `stride`. */
AX_HOT static void rows_sum(const float *t, size_t stride, uint32_t rows, uint32_t n, float w, float *acc)
{
	for (uint32_t i = 0; i < n; i++)
		acc[i] = 0;
	for (uint32_t r = 0; r < rows; r++)
		for (uint32_t i = 0; i < n; i++)
			acc[i] += t[r * stride + i];
	for (uint32_t i = 0; i < n; i++)
		acc[i] *= w;
}

/* The first w ≤ 8 floats at p, zero-filled. */
static AX_INLINE v8f part8(const float *p, uint32_t w)
{
	if (w == 8)
		return ld8(p);
	v8f v = {0};
	for (uint32_t l = 0; l < w; l++)
		v[l] = p[l];
	return v;
}

/* mean_prob: mx[i] = max_r (t_r[i] - lse_r), ex[i] = Σ_r exp(t_r[i] - lse_r - mx[i]). mx and ex have room for n
 * rounded up to 8. */
AX_HOT static void prob_block(const float *t, size_t stride, uint32_t rows, uint32_t n, const float *lse, float *mx,
			      float *ex)
{
	for (uint32_t i = 0; i < n; i += 8) {
		uint32_t w = n - i < 8 ? n - i : 8;
		v8f m = splat(-INFINITY), e = {0};
		for (uint32_t r = 0; r < rows; r++)
			m = vmax(part8(t + r * stride + i, w) - lse[r], m);
		for (uint32_t r = 0; r < rows; r++)
			e += v8_exp(part8(t + r * stride + i, w) - lse[r] - m);
		memcpy(mx + i, &m, sizeof m);
		memcpy(ex + i, &e, sizeof e);
	}
}

/* ---- top-k and logsumexp ------------------------------------------------------------------------------------ */

/* Insert (v, pos) into the sorted array; positions arrive increasing, so ">" keeps earlier (lower) ties first. */
static void topk_insert(ax_attn_result *res, uint32_t top_k, float v, int64_t pos)
{
	uint32_t i = res->k < top_k ? res->k++ : top_k - 1;
	while (i > 0 && v > res->logit[i - 1]) {
		res->logit[i] = res->logit[i - 1];
		res->pos[i] = res->pos[i - 1];
		i--;
	}
	res->logit[i] = v;
	res->pos[i] = pos;
}

static void topk_block(ax_attn_result *res, uint32_t top_k, const float *t, uint32_t n, uint64_t pos0, float bmax)
{
	if (res->k == top_k && !(bmax > res->logit[top_k - 1]))
		return;
	for (uint32_t i = 0; i < n; i++)
		if (res->k < top_k || t[i] > res->logit[top_k - 1])
			topk_insert(res, top_k, t[i], (int64_t)(pos0 + i));
}

/* Online logsumexp over one block; returns the block max. */
static float lse_block(float *m, double *sum, const float *t, uint32_t n)
{
	float bm = row_max(t, n);
	if (bm > *m) {
		*sum *= exp((double)*m - (double)bm);
		*m = bm;
	}
	*sum += row_expsum(t, n, *m);
	return bm;
}

/* ---- scratch ------------------------------------------------------------------------------------------------ */

ax_attn_scratch *ax_attn_scratch_new(void)
{
	ax_attn_scratch *s = calloc(1, sizeof *s);
	if (s)
		s->store_cap = AX_STORE_CAP_DEFAULT;
	return s;
}

void ax_attn_scratch_free(ax_attn_scratch *s)
{
	if (!s)
		return;
	free(s->q);
	free(s->qs);
	free(s->tile);
	free(s->red);
	free(s->max);
	free(s->sum);
	free(s->vhead);
	free(s->gbeg);
	free(s->outrow);
	free(s->hmap);
	free(s);
}

void ax__attn_scratch_set_store_cap(ax_attn_scratch *s, size_t bytes)
{
	s->store_cap = bytes;
}

/* Make *p hold at least `bytes` (64-byte aligned, contents not kept). */
static int grow(void **p, size_t *cap, size_t bytes)
{
	if (bytes <= *cap)
		return 0;
	void *n = NULL;
	if (posix_memalign(&n, 64, bytes) != 0)
		return -ENOMEM;
	free(*p);
	*p = n;
	*cap = bytes;
	return 0;
}

static int scratch_reserve(ax_attn_scratch *s, const plan *pl, size_t tile_floats)
{
	size_t rows = pl->rows;
	int rc = grow((void **)&s->q, &s->cap_q, rows * pl->D * sizeof(float));
	rc = rc ? rc : grow((void **)&s->qs, &s->cap_qs, (size_t)pl->H * pl->D * sizeof(float));
	rc = rc ? rc : grow((void **)&s->tile, &s->cap_tile, tile_floats * sizeof(float));
	rc = rc ? rc : grow((void **)&s->red, &s->cap_red, 2 * AX_BLOCK * sizeof(float));
	rc = rc ? rc : grow((void **)&s->max, &s->cap_max, rows * sizeof(float));
	rc = rc ? rc : grow((void **)&s->sum, &s->cap_sum, rows * sizeof(double));
	rc = rc ? rc : grow((void **)&s->vhead, &s->cap_vhead, rows * sizeof(uint32_t));
	rc = rc ? rc : grow((void **)&s->outrow, &s->cap_outrow, rows * sizeof(int32_t));
	rc = rc ? rc : grow((void **)&s->hmap, &s->cap_hmap, (size_t)pl->H * sizeof(int32_t));
	rc = rc ? rc : grow((void **)&s->gbeg, &s->cap_gbeg, ((size_t)pl->Hkv + 1) * sizeof(uint32_t));
	return rc;
}

/* ---- job validation and the plan ------------------------------------------------------------------------------ */

static size_t key_esize(uint32_t dtype)
{
	switch (dtype) {
	case AX_DTYPE_F32:
		return 4;
	case AX_DTYPE_F16:
	case AX_DTYPE_BF16:
		return 2;
	case AX_DTYPE_FP8_E4M3:
	case AX_DTYPE_FP8_E5M2:
		return 1;
	default:
		return 0;
	}
}

static int is_fp8(uint32_t dtype)
{
	return dtype == AX_DTYPE_FP8_E4M3 || dtype == AX_DTYPE_FP8_E5M2;
}

static int check_heads(const ax_attn_job *job)
{
	if (job->mode != AX_MODE_HEADS || !job->heads)
		return 0;
	if (job->n_heads == 0 || job->n_heads > AX_MAX_HEADS)
		return -EINVAL;
	for (uint32_t i = 0; i < job->n_heads; i++)
		if (job->heads[i] < 0 || (uint32_t)job->heads[i] >= job->n_q_heads)
			return -EINVAL;
	return 0;
}

static int check_job(const ax_attn_job *job)
{
	if (!job || !job->q || !job->k || !job->index)
		return -EINVAL;
	if (job->q_dtype != AX_DTYPE_F32 && job->q_dtype != AX_DTYPE_F16 && job->q_dtype != AX_DTYPE_BF16)
		return -EINVAL;
	if (key_esize(job->k_dtype) == 0 || (job->index_dtype != AX_DTYPE_I32 && job->index_dtype != AX_DTYPE_I64))
		return -EINVAL;
	if (job->n_q_heads == 0 || job->n_q_heads > AX_MAX_HEADS || job->n_kv_heads == 0 ||
	    job->n_q_heads % job->n_kv_heads != 0 || job->head_dim == 0 || job->head_dim > AX_MAX_HEAD_DIM)
		return -EINVAL;
	if (job->mode < AX_MODE_MEAN_LOGIT || job->mode > AX_MODE_HEADS || job->top_k == 0 ||
	    job->top_k > AX_ATTN_MAX_TOPK || job->window < 0 || job->position >= ((uint64_t)1 << 40))
		return -EINVAL;
	if (!isfinite(job->scale) || !isfinite(job->logit_cap) || job->logit_cap < 0)
		return -EINVAL;
	if (is_fp8(job->k_dtype) && (!isfinite(job->k_scale) || job->k_scale == 0))
		return -EINVAL;
	if (job->k_stride[2] != 1)
		return -EINVAL;
	uint64_t lim = ((uint64_t)1 << 62) / key_esize(job->k_dtype);
	if (job->index_kind == AX_ATTN_INDEX_PAGED) {
		/* (n_blocks-1)·sb + (bs-1)·s0 + (H_kv-1)·s1 + D elements, each term below lim/4. */
		uint64_t q = lim / 4;
		if (job->n_slots != 0 || job->index_dtype != AX_DTYPE_I32 || job->n_blocks == 0 || job->block_size == 0 ||
		    job->block_size > AX_ATTN_MAX_BLOCK_SIZE || job->k_block_stride > q / job->n_blocks ||
		    job->k_stride[0] > q / job->block_size || job->k_stride[1] > q / job->n_kv_heads)
			return -EINVAL;
		return check_heads(job);
	}
	/* The farthest element must be addressable: (n_slots-1)·s0 + (H_kv-1)·s1 + D elements. */
	if (job->index_kind != AX_ATTN_INDEX_TOKEN || job->n_slots == 0 || job->k_stride[0] > lim / job->n_slots ||
	    job->k_stride[1] > lim / job->n_kv_heads)
		return -EINVAL;
	return check_heads(job);
}

static void plan_init(plan *pl, const ax_attn_job *job)
{
	pl->job = job;
	pl->H = job->n_q_heads;
	pl->Hkv = job->n_kv_heads;
	pl->G = pl->H / pl->Hkv;
	pl->D = job->head_dim;
	uint64_t nk = job->position + 1;
	pl->start = job->window > 0 && nk > (uint64_t)job->window ? nk - (uint64_t)job->window : 0;
	pl->n = nk - pl->start;
	pl->collapsed = job->mode == AX_MODE_MEAN_LOGIT && job->logit_cap == 0;
	pl->rows = pl->collapsed ? pl->Hkv : job->mode == AX_MODE_HEADS && job->heads ? 0 : pl->H;
	pl->esize = key_esize(job->k_dtype);
	pl->kbase = job->k;
	pl->s0 = job->k_stride[0] * pl->esize;
	pl->s1 = job->k_stride[1] * pl->esize;
	pl->paged = job->index_kind == AX_ATTN_INDEX_PAGED;
	pl->bs = pl->paged ? job->block_size : 1;
	pl->sb = job->k_block_stride * pl->esize;
	pl->bshift = (pl->bs & (pl->bs - 1)) == 0 ? __builtin_ctzll(pl->bs) : -1;
}

/* Heads mode with a list: the virtual rows are the distinct selected heads, ascending. */
static uint32_t count_selected(const ax_attn_job *job, int32_t *hmap)
{
	for (uint32_t h = 0; h < job->n_q_heads; h++)
		hmap[h] = -1;
	for (uint32_t i = 0; i < job->n_heads; i++)
		hmap[job->heads[i]] = 0;
	uint32_t rows = 0;
	for (uint32_t h = 0; h < job->n_q_heads; h++)
		if (hmap[h] == 0)
			hmap[h] = (int32_t)rows++;
	return rows;
}

/* Every visible index value must name a slot of the pool (paged: every block holding a visible key, a block of
 * the pool); checked before any key is read. */
static int check_index(const plan *pl)
{
	uint64_t first = pl->start / pl->bs, last = (pl->start + pl->n - 1) / pl->bs;
	uint64_t lim = pl->paged ? pl->job->n_blocks : pl->job->n_slots;
	for (uint64_t i = first; i <= last; i++)
		if (index_at(pl->job, i) >= lim)
			return -ERANGE;
	return 0;
}

/* Q [H_q, D] as f32 into dst: one typed loop per dtype (vectorised). */
static void q_to_f32(const ax_attn_job *job, size_t n, float *restrict dst)
{
	const uint16_t *h = job->q;
	switch (job->q_dtype) {
	case AX_DTYPE_F16:
		for (size_t i = 0; i < n; i++)
			dst[i] = f16_f32(h[i]);
		break;
	case AX_DTYPE_BF16:
		for (size_t i = 0; i < n; i++)
			dst[i] = bf16_f32(h[i]);
		break;
	default:
		memcpy(dst, job->q, n * sizeof *dst);
		break;
	}
}

/* Reorder each full 16-element chunk of a query row as its 8 even elements, then its 8 odd ones (key16). */
static void pair_order(float *q, uint32_t D)
{
	for (uint32_t d = 0; d + 16 <= D; d += 16) {
		float t[16];
		for (int l = 0; l < 8; l++) {
			t[l] = q[d + 2 * l];
			t[8 + l] = q[d + 2 * l + 1];
		}
		memcpy(q + d, t, sizeof t);
	}
}

/* Virtual query rows in f32 with the scale folded in, grouped by KV head (gbeg). -EDOM on a non-finite Q. */
static int build_rows(const plan *pl, ax_attn_scratch *s)
{
	const ax_attn_job *job = pl->job;
	uint32_t D = pl->D;
	float w = (float)((double)job->scale * (is_fp8(job->k_dtype) ? job->k_scale : 1.0));
	q_to_f32(job, (size_t)pl->H * D, s->qs);
	if (finish_row(s->qs, pl->H * D, 0) != 0)
		return -EDOM;
	for (uint32_t g = 0; g <= pl->Hkv; g++)
		s->gbeg[g] = 0;
	for (uint32_t r = 0, h = 0; h < pl->H && !pl->collapsed; h++) {
		if (job->mode == AX_MODE_HEADS && job->heads && s->hmap[h] < 0)
			continue;
		s->vhead[r] = h;
		for (uint32_t d = 0; d < D; d++)
			s->q[(size_t)r * D + d] = w * s->qs[(size_t)h * D + d];
		s->gbeg[h / pl->G + 1]++;
		r++;
	}
	for (uint32_t g = 0; g < pl->Hkv && pl->collapsed; g++) { /* mean over the group's heads, then the scale */
		float *qg = s->q + (size_t)g * D;
		s->vhead[g] = g * pl->G;
		s->gbeg[g + 1] = 1;
		memcpy(qg, s->qs + (size_t)g * pl->G * D, D * sizeof *qg);
		for (uint32_t h = g * pl->G + 1; h < (g + 1) * pl->G; h++)
			for (uint32_t d = 0; d < D; d++)
				qg[d] += s->qs[(size_t)h * D + d];
		for (uint32_t d = 0; d < D; d++)
			qg[d] *= w / (float)pl->H;
	}
	for (uint32_t g = 0; g < pl->Hkv; g++)
		s->gbeg[g + 1] += s->gbeg[g];
	if (finish_row(s->q, pl->rows * D, 0) != 0) /* the scale can overflow */
		return -EDOM;
	if (paired(job->k_dtype))
		for (uint32_t r = 0; r < pl->rows; r++)
			pair_order(s->q + (size_t)r * D, D);
	return 0;
}

/* ---- the three modes -------------------------------------------------------------------------------------------- */

static void result_init(ax_attn_result *res, int32_t head_id)
{
	res->head_id = head_id;
	res->k = 0;
	res->lse = 0;
}

/* Scores of one block for every virtual row, checked and capped. */
static int block_scores(const plan *pl, ax_attn_scratch *s, uint64_t j0, uint32_t nb, float *tile, size_t tstride)
{
	score_block(pl, s, j0, nb, tile, tstride);
	float bad = 0;
	for (uint32_t r = 0; r < pl->trows; r++)
		bad += finish_row(tile + r * tstride, nb, pl->job->logit_cap);
	return bad == 0 ? 0 : -EDOM;
}

static uint32_t block_len(const plan *pl, uint64_t j0)
{
	uint64_t left = pl->start + pl->n - j0;
	return left < AX_BLOCK ? (uint32_t)left : AX_BLOCK;
}

static int run_mean_logit(const plan *pl, ax_attn_scratch *s, ax_attn_result *res)
{
	float m = -INFINITY;
	double sum = 0;
	float w = pl->collapsed ? 1.0f : 1.0f / (float)pl->H;
	result_init(res, -1);
	for (uint64_t j0 = pl->start; j0 < pl->start + pl->n; j0 += AX_BLOCK) {
		uint32_t nb = block_len(pl, j0);
		int rc = block_scores(pl, s, j0, nb, s->tile, AX_BLOCK);
		if (rc)
			return rc;
		rows_sum(s->tile, AX_BLOCK, pl->trows, nb, w, s->red);
		float bm = lse_block(&m, &sum, s->red, nb);
		topk_block(res, pl->job->top_k, s->red, nb, j0, bm);
	}
	res->lse = (double)m + log(sum);
	return 0;
}

static int run_heads(const plan *pl, ax_attn_scratch *s, ax_attn_result *out)
{
	const ax_attn_job *job = pl->job;
	for (uint32_t r = 0; r < pl->rows; r++) {
		s->max[r] = -INFINITY;
		s->sum[r] = 0;
		result_init(&out[s->outrow[r]], (int32_t)(job->head_offset + s->vhead[r]));
	}
	for (uint64_t j0 = pl->start; j0 < pl->start + pl->n; j0 += AX_BLOCK) {
		uint32_t nb = block_len(pl, j0);
		int rc = block_scores(pl, s, j0, nb, s->tile, AX_BLOCK);
		if (rc)
			return rc;
		for (uint32_t r = 0; r < pl->rows; r++) {
			const float *t = s->tile + (size_t)r * AX_BLOCK;
			float bm = lse_block(&s->max[r], &s->sum[r], t, nb);
			topk_block(&out[s->outrow[r]], job->top_k, t, nb, j0, bm);
		}
	}
	for (uint32_t r = 0; r < pl->rows; r++)
		out[s->outrow[r]].lse = (double)s->max[r] + log(s->sum[r]);
	/* A head listed twice gets a copy of its first row. */
	for (uint32_t i = 0; job->heads && i < job->n_heads; i++) {
		int32_t first = s->outrow[s->hmap[job->heads[i]]];
		if ((uint32_t)first != i)
			out[i] = out[first];
	}
	return 0;
}

/* mean_prob, second sweep over one block: log p_j = max + log Σ_h exp(·) − log H, top-k of it. L ≤ max, so keys
 * whose max cannot beat the current k-th entry skip the log. */
static void prob_topk(const plan *pl, ax_attn_scratch *s, const float *t, size_t tstride, uint64_t j0, uint32_t nb,
		      ax_attn_result *res)
{
	float *mx = s->red, *ex = s->red + AX_BLOCK;
	uint32_t top_k = pl->job->top_k;
	float log_h = logf((float)pl->H);
	prob_block(t, tstride, pl->rows, nb, s->max, mx, ex);
	for (uint32_t i = 0; i < nb; i++) {
		if (res->k == top_k && !(mx[i] + 1e-3f > res->logit[top_k - 1]))
			continue;
		float l = mx[i] + (logf(ex[i]) - log_h);
		if (res->k < top_k || l > res->logit[top_k - 1])
			topk_insert(res, top_k, l, (int64_t)(j0 + i));
	}
}

static int run_mean_prob(const plan *pl, ax_attn_scratch *s, ax_attn_result *res, int stored)
{
	size_t tstride = stored ? pl->n : AX_BLOCK;
	for (uint32_t r = 0; r < pl->rows; r++) {
		s->max[r] = -INFINITY;
		s->sum[r] = 0;
	}
	result_init(res, -1);
	for (uint64_t j0 = pl->start; j0 < pl->start + pl->n; j0 += AX_BLOCK) {
		uint32_t nb = block_len(pl, j0);
		float *t = stored ? s->tile + (j0 - pl->start) : s->tile;
		int rc = block_scores(pl, s, j0, nb, t, tstride);
		if (rc)
			return rc;
		for (uint32_t r = 0; r < pl->rows; r++)
			lse_block(&s->max[r], &s->sum[r], t + r * tstride, nb);
	}
	for (uint32_t r = 0; r < pl->rows; r++)
		s->max[r] = (float)((double)s->max[r] + log(s->sum[r]));
	for (uint64_t j0 = pl->start; j0 < pl->start + pl->n; j0 += AX_BLOCK) {
		uint32_t nb = block_len(pl, j0);
		float *t = stored ? s->tile + (j0 - pl->start) : s->tile;
		if (!stored) {
			int rc = block_scores(pl, s, j0, nb, t, tstride);
			if (rc)
				return rc;
		}
		prob_topk(pl, s, t, tstride, j0, nb, res);
	}
	res->lse = 0;
	return 0;
}

/* ---- public entry points ------------------------------------------------------------------------------------------ */

uint32_t ax_attn_rows(const ax_attn_job *job)
{
	if (!job)
		return 0;
	if (job->mode != AX_MODE_HEADS)
		return 1;
	return job->heads ? job->n_heads : job->n_q_heads;
}

/* Heads mode: virtual rows and where each one's result goes. */
static void map_heads(plan *pl, ax_attn_scratch *s)
{
	const ax_attn_job *job = pl->job;
	if (!job->heads) {
		for (uint32_t h = 0; h < pl->H; h++)
			s->hmap[h] = (int32_t)h;
		pl->rows = pl->H;
	} else {
		pl->rows = count_selected(job, s->hmap);
	}
	for (uint32_t i = ax_attn_rows(job); i-- > 0;)
		s->outrow[s->hmap[job->heads ? (uint32_t)job->heads[i] : i]] = (int32_t)i;
}

int ax_attn_cpu(const ax_attn_job *job, ax_attn_scratch *s, ax_attn_result *out)
{
	plan pl;
	if (!s || !out)
		return -EINVAL;
	int rc = check_job(job);
	if (rc)
		return rc;
	plan_init(&pl, job);
	rc = check_index(&pl);
	if (rc)
		return rc;
	if (job->mode == AX_MODE_HEADS && job->heads)
		pl.rows = job->n_heads; /* upper bound until the distinct heads are counted */
	int stored = job->mode == AX_MODE_MEAN_PROB && (size_t)pl.rows * pl.n * sizeof(float) <= s->store_cap;
	rc = scratch_reserve(s, &pl, (size_t)pl.rows * (stored ? pl.n : AX_BLOCK));
	if (rc)
		return rc;
	if (job->mode == AX_MODE_HEADS)
		map_heads(&pl, s);
	pl.trows = pl.collapsed ? 1 : pl.rows;
	rc = build_rows(&pl, s);
	if (rc)
		return rc;
	switch (job->mode) {
	case AX_MODE_MEAN_LOGIT:
		return run_mean_logit(&pl, s, out);
	case AX_MODE_HEADS:
		return run_heads(&pl, s, out);
	default:
		return run_mean_prob(&pl, s, out, stored);
	}
}

void ax_attn_to_record(const ax_attn_result *res, uint32_t mode, ax_rec_attn *rec)
{
	double lse = mode == AX_MODE_MEAN_PROB ? 0.0 : res->lse;
	double m = res->k ? res->logit[0] : 0, z = 0, mass = 0;
	for (uint32_t i = 1; i < res->k; i++)
		m = res->logit[i] > m ? res->logit[i] : m;
	for (uint32_t i = 0; i < res->k; i++)
		z += exp((double)res->logit[i] - m);
	rec->mode = mode;
	rec->head_id = mode == AX_MODE_HEADS ? res->head_id : -1;
	rec->k = res->k;
	for (uint32_t i = 0; i < res->k; i++) {
		rec->token_positions[i] = res->pos[i];
		rec->topk_logits[i] = res->logit[i];
		rec->attention_scores[i] = (float)(exp((double)res->logit[i] - m) / z);
		mass += exp((double)res->logit[i] - lse);
	}
	rec->logsumexp_all = lse;
	rec->topk_mass = mass > 1.0 ? 1.0 : mass; /* a probability: rounding may not push it past 1 */
}
