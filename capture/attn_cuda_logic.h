/*
 * attn_cuda_logic.h — the CUDA backend's algorithm (attn_cuda.cu) as __host__ __device__ code, so that a CPU
 * test (attn_cuda_logic_test.c, built with gcc where no GPU exists) runs the very code the kernels run.
 * Internal to capture/: included by attn_cuda.cu and the tests only.
 *
 * How it works. A batch of user jobs (attn.h) becomes "pass-jobs" (axc_job): mean_logit and heads jobs one
 * each, a mean_prob job two (AXC_PJ_LSE: every head's logsumexp; AXC_PJ_PROB: p_j = mean_h exp(s_hj − lse_h),
 * which needs the first pass's result). The visible keys of a pass-job are cut into splits of split_len keys;
 * one CTA (axc_split_cta) runs one split: it walks the split in tiles of AXC_TILE keys; per tile it loads the
 * slots, or for paged jobs (vLLM block tables) the block ids, as element offsets of the key rows (an out-of-pool
 * slot or block: AXC_F_RANGE, the tile is not read), then per "chunk" (≤ AXC_CHUNK computed rows of
 * one KV head g) stages the tile's keys of head g as f32 in shared memory ([AXC_TILE][D+1]: the +1 keeps the
 * per-key reads conflict-free), computes the scores s = (w·q_h)·k (w = scale · k_scale; non-finite: AXC_F_DOM;
 * then the tanh cap) and feeds them to the split's state: heads / lse rows get a per-row online logsumexp and a
 * sorted top-k list (axc_row_tile); mean modes reduce the rows per key first (sum, or a per-key online
 * logsumexp of s − lse_h) and push one value per key. States live in device scratch (axc_state: m, s, count,
 * K entries per split and row). A merge CTA per output row (axc_merge_row) then combines the splits exactly:
 * logsumexp in float64; top-k by a bar (the best k-th entry of any full split list: no entry worse than it can
 * be in the top k), a sweep that gathers every entry at least as good as the bar into a bounded buffer, and a
 * rank (count of better entries) for each survivor; if the buffer overflows, the k-th best of what it holds is
 * a tighter bar and the sweep repeats. The order is total — higher value first, then lower position — so ties go
 * to the lower position however entries arrive.
 *
 * Threads. The CTA drivers are written once for both targets: AXC_PHASE(tid, nth) { body } is the body run by
 * the calling thread on the GPU and a loop over tid = 0..nth-1 on the host; AXC_SYNC() is __syncthreads() or
 * nothing; AXC_SYNC_ANY(x) is __syncthreads_or(x) (uniform result, every thread's reads done before anyone
 * writes again) or x. Rules the drivers keep: code outside phases depends only on arguments and on values read
 * through AXC_SYNC_ANY or written before a barrier and never again; a phase body skips with `continue`, never
 * `break`/`return`; within one phase no two threads write the same shared word except through AXC_ATOMIC_*.
 */
#ifndef ATTNX_CAPTURE_ATTN_CUDA_LOGIC_H
#define ATTNX_CAPTURE_ATTN_CUDA_LOGIC_H

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "attn.h"
#include "attnx_shm.h"

#ifdef __CUDACC__
#define AXC_HD static __host__ __device__ __forceinline__
#else
#define AXC_HD static inline
#endif

#if defined(__CUDA_ARCH__)
#define AXC_PHASE(tid, nth) for (uint32_t tid = threadIdx.x, axc_once_ = 1; axc_once_; axc_once_ = 0)
#define AXC_SYNC() __syncthreads()
#define AXC_SYNC_ANY(x) __syncthreads_or((x) != 0)
#define AXC_ATOMIC_ADD(p, v) atomicAdd((p), (v))
#define AXC_ATOMIC_OR(p, v) atomicOr((p), (v))
#else
/* Host: a phase's threads one after another, thread AXC_EMU_TID(i, nth) i-th. The test permutes that order
 * (reversed, strided) and requires identical results: a phase whose outcome depends on the order of its threads
 * reads what another thread of the same phase writes, which on the GPU is a race. */
#ifndef AXC_EMU_TID
#define AXC_EMU_TID(i, nth) (i)
#endif
#define AXC_PHASE(tid, nth)                                                                                   \
	for (uint32_t axc_i_ = 0, tid = 0; axc_i_ < (nth) && ((tid = AXC_EMU_TID(axc_i_, (nth))), 1); axc_i_++)
/* The host's stand-in for the 16-byte __ldg (the test checks the address is 16-byte aligned, as the GPU needs). */
#ifndef AXC_EMU_LOAD16
#define AXC_EMU_LOAD16(w, p) memcpy((w), (p), 16)
#endif
#define AXC_SYNC() ((void)0)
#define AXC_SYNC_ANY(x) ((x) != 0)
#define AXC_ATOMIC_ADD(p, v) axc_host_add((p), (v))
#define AXC_ATOMIC_OR(p, v) axc_host_or((p), (v))
static inline uint32_t axc_host_add(uint32_t *p, uint32_t v)
{
	uint32_t o = *p;
	*p = o + v;
	return o;
}
static inline uint32_t axc_host_or(uint32_t *p, uint32_t v)
{
	uint32_t o = *p;
	*p = o | v;
	return o;
}
#endif

#define AXC_TILE 32               /* keys per tile */
#define AXC_CHUNK 32              /* computed rows per chunk (all of one KV head) */
#define AXC_VS (AXC_TILE + 1)     /* row stride of the score tile (padded: per-row reads conflict-free) */
#define AXC_SPLIT_THREADS 256     /* threads per split CTA (a multiple of AXC_TILE) */
#define AXC_MERGE_THREADS 256     /* threads per merge CTA */
#define AXC_MERGE_CAP 1024        /* merge buffer entries (> AXC_MAX_K) */
#define AXC_MAX_K AX_ATTN_MAX_TOPK
#define AXC_MAX_D 512             /* largest head_dim this backend runs (attn_cpu: 4096) */
#define AXC_QCAP 16384            /* floats of Q kept for a whole split (else staged per chunk) */
#define AXC_MAX_SPLITS 4096       /* splits per pass-job */
#define AXC_MIN_SPLIT 128         /* keys per split, at least (a multiple of AXC_TILE) */

#define AXC_F_RANGE 1u            /* flag: an index value outside the pool */
#define AXC_F_DOM 2u              /* flag: NaN/inf in Q or a key, or an overflowing score */

enum axc_pass_mode { AXC_PJ_LOGIT = 1, AXC_PJ_PROB = 2, AXC_PJ_HEADS = 3, AXC_PJ_LSE = 4 };

/* One pass-job (device table). Pointers are device addresses on the GPU (host addresses in the CPU test). */
typedef struct axc_job {
	const void *q;        /* [H, D] query row, dtype qdt */
	const void *k;        /* K pool base, dtype kdt; element (slot, g, d) at slot·s0 + g·s1 + d; paged: element
				 (j, g, d) at index[j / bs]·sb + (j % bs)·s0 + g·s1 + d */
	const void *index;    /* index row, dtype idt: slot of key j (paged: block of key j at index[j / bs]) */
	uint64_t s0, s1;      /* element strides: slot (paged: row of a block), KV head */
	uint64_t n_slots;     /* index values must be below this: slots in the pool (paged: blocks) */
	uint64_t start, n;    /* visible keys: positions start .. start+n-1 (n ≥ 1) */
	uint64_t split_len;   /* keys per split (the last one may be shorter) */
	uint64_t state0;      /* first state (axc_state m/s/cnt index) of split 0 */
	uint64_t ent0;        /* first list entry of state0 (entries of state i: ent0 + (i − state0)·K ..) */
	uint32_t H, Hkv, G, D;        /* query heads, KV heads, group size, head dim */
	uint32_t qdt, kdt, idt, mode; /* dtypes (enum ax_dtype); mode: enum axc_pass_mode */
	uint32_t K;           /* list length (0: logsumexp only) */
	uint32_t R;           /* computed rows (query heads used), ascending heads in row_head[row0 ..] */
	uint32_t row0;        /* first row in the row_head table */
	uint32_t chunk0, n_chunks; /* chunks in the chunk table */
	uint32_t n_splits;    /* splits of this pass-job */
	uint32_t lse0;        /* AXC_PJ_PROB: lse of head h at lse[lse0 + h]; AXC_PJ_LSE: where merge writes it */
	uint32_t flag;        /* flag word (one per user job) */
	uint32_t vec;         /* key rows 16-byte aligned: 16-byte loads */
	uint32_t q_all;       /* R·D ≤ AXC_QCAP: Q staged once per split */
	uint32_t collapsed;   /* mean_logit without cap: one row per KV head, q = (w/H)·Σ_group q_h (as attn_cpu) */
	float w;              /* scale · k_scale (fp8) folded into Q */
	float cap;            /* tanh cap (0: none) */
	uint64_t sb;          /* paged: element stride between blocks */
	uint32_t bs;          /* paged: block size (0: a token index row) */
	uint32_t pad_;
} axc_job;

typedef struct axc_chunk {
	uint32_t g;           /* KV head */
	uint32_t row0, n;     /* job-local computed rows row0 .. row0+n-1, n ≤ AXC_CHUNK */
	uint32_t pad;
} axc_chunk;

typedef struct axc_work {
	uint32_t job, split;  /* one split CTA */
} axc_work;

typedef struct axc_mrow {
	uint32_t job;         /* pass-job */
	uint32_t row;         /* computed row (heads / lse; 0 for mean modes) */
	int32_t out;          /* result index (or lse index for AXC_PJ_LSE) */
	int32_t head_id;      /* head_id of the result (-1 in mean modes) */
} axc_mrow;

typedef struct axc_state {
	float *m, *s;         /* [states] online logsumexp: running max, Σ exp(x − m) */
	uint32_t *cnt;        /* [states] entries in the list */
	float *val;           /* [entries] list values, best first */
	int64_t *pos;         /* [entries] list positions */
} axc_state;

/* Everything a pass's kernels read (passed by value). */
typedef struct axc_args {
	const axc_job *jobs;
	const axc_chunk *chunks;
	const int32_t *row_head; /* query head of each computed row */
	const axc_work *work;    /* this launch's split CTAs */
	const axc_mrow *mrows;   /* this pass's merge rows */
	axc_state st;
	float *lse;              /* per-head logsumexps of mean_prob jobs */
	uint32_t *flags;         /* per user job: AXC_F_* */
	ax_attn_result *res;     /* results */
	uint32_t qcap;           /* floats of the Q area in shared memory */
} axc_args;

/* ---- conversions (bit-exact with attn_cpu.c's) ---------------------------------------------------------------- */

AXC_HD float axc_u2f(uint32_t u)
{
	float f;
	memcpy(&f, &u, sizeof f);
	return f;
}

AXC_HD uint32_t axc_f2u(float f)
{
	uint32_t u;
	memcpy(&u, &f, sizeof u);
	return u;
}

AXC_HD float axc_bf16(uint16_t b)
{
	return axc_u2f((uint32_t)b << 16);
}

/* The exponent/mantissa moved into f32 position and rescaled by 2^112: exact for normal and subnormal halves.
 * A subnormal half (and a small fp8 code) passes through an f32 subnormal here, which flush-to-zero would lose:
 * never build this with --use_fast_math / -ftz=true (nvcc defines no macro to check; attn_cuda_test decodes
 * every code on the device and compares). */
AXC_HD float axc_f16(uint16_t h)
{
	uint32_t em = h & 0x7fffu;
	uint32_t u = axc_f2u(axc_u2f(em << 13) * 0x1p112f);
	u |= em >= 0x7c00u ? 0x7f800000u : 0u;
	return axc_u2f(u | ((uint32_t)(h & 0x8000u) << 16));
}

/* OCP e4m3fn: no infinities, S.1111.111 is NaN; bias 7. */
AXC_HD float axc_e4m3(uint8_t b)
{
	uint32_t em = b & 0x7fu;
	uint32_t u = axc_f2u(axc_u2f(em << 20) * 0x1p120f);
	u = em == 0x7fu ? 0x7fc00000u : u;
	return axc_u2f(u | ((uint32_t)(b & 0x80u) << 24));
}

AXC_HD float axc_e5m2(uint8_t b)
{
	return axc_f16((uint16_t)(b << 8));
}

AXC_HD uint32_t axc_esize(uint32_t dt)
{
	return dt == AX_DTYPE_F32 || dt == AX_DTYPE_I32 ? 4
	       : dt == AX_DTYPE_F16 || dt == AX_DTYPE_BF16 ? 2
	       : dt == AX_DTYPE_FP8_E4M3 || dt == AX_DTYPE_FP8_E5M2 ? 1
	       : dt == AX_DTYPE_I64 ? 8 : 0;
}

/* Element i of a float array of dtype dt (f32, f16, bf16, fp8) as f32. */
AXC_HD float axc_elem(const void *p, uint32_t dt, uint64_t i)
{
	switch (dt) {
	case AX_DTYPE_F16:
		return axc_f16(((const uint16_t *)p)[i]);
	case AX_DTYPE_BF16:
		return axc_bf16(((const uint16_t *)p)[i]);
	case AX_DTYPE_FP8_E4M3:
		return axc_e4m3(((const uint8_t *)p)[i]);
	case AX_DTYPE_FP8_E5M2:
		return axc_e5m2(((const uint8_t *)p)[i]);
	default:
		return ((const float *)p)[i];
	}
}

/* 16 bytes of keys (4 words, little-endian) of dtype dt as 16 / esize floats at out. */
AXC_HD void axc_decode16(const uint32_t w[4], uint32_t dt, float *out)
{
	for (int i = 0; i < 4; i++) {
		uint32_t x = w[i];
		switch (dt) {
		case AX_DTYPE_F16:
		case AX_DTYPE_BF16:
			out[2 * i] = dt == AX_DTYPE_F16 ? axc_f16((uint16_t)x) : axc_bf16((uint16_t)x);
			out[2 * i + 1] = dt == AX_DTYPE_F16 ? axc_f16((uint16_t)(x >> 16)) : axc_bf16((uint16_t)(x >> 16));
			break;
		case AX_DTYPE_FP8_E4M3:
		case AX_DTYPE_FP8_E5M2:
			for (int b = 0; b < 4; b++) {
				uint8_t v = (uint8_t)(x >> (8 * b));
				out[4 * i + b] = dt == AX_DTYPE_FP8_E4M3 ? axc_e4m3(v) : axc_e5m2(v);
			}
			break;
		default:
			out[i] = axc_u2f(x);
			break;
		}
	}
}

/* Slot of key j: the index value read as a signed integer then as unsigned (negative values are out of range). */
AXC_HD uint64_t axc_slot(const void *index, uint32_t idt, uint64_t j)
{
	if (idt == AX_DTYPE_I32)
		return (uint64_t)(int64_t)((const int32_t *)index)[j];
	return (uint64_t)((const int64_t *)index)[j];
}

AXC_HD int axc_finite(float x)
{
	return x - x == 0.0f; /* false for NaN and ±inf */
}

AXC_HD float axc_softcap(float s, float cap)
{
	return cap * tanhf(s / cap);
}

/* ---- ranking, top-k lists and logsumexp ------------------------------------------------------------------------ */

/* (a, ap) ranks before (b, bp): higher value, then lower position. */
AXC_HD int axc_better(float a, int64_t ap, float b, int64_t bp)
{
	return a > b || (a == b && ap < bp);
}

/* Insert (v, p) into the sorted list val/pos of *cnt ≤ K entries; no-op when the list is full and (v, p) does not
 * rank before its last entry. Returns 1 if inserted. */
AXC_HD int axc_topk_insert(float *val, int64_t *pos, uint32_t *cnt, uint32_t K, float v, int64_t p)
{
	uint32_t i;
	if (*cnt < K) {
		i = (*cnt)++;
	} else {
		if (K == 0 || !axc_better(v, p, val[K - 1], pos[K - 1]))
			return 0;
		i = K - 1;
	}
	while (i > 0 && axc_better(v, p, val[i - 1], pos[i - 1])) {
		val[i] = val[i - 1];
		pos[i] = pos[i - 1];
		i--;
	}
	val[i] = v;
	pos[i] = p;
	return 1;
}

/* Online logsumexp in f32: (m, s) represents m + log s; start from (-inf, 0). x must not be NaN; x = -inf adds
 * nothing (mean_prob's s − lse_h overflows to -inf when scores reach ±1.7e38, and exp(-inf − -inf) is NaN). */
AXC_HD void axc_lse_add(float *m, float *s, float x)
{
	if (x > *m) {
		*s = *s * expf(*m - x) + 1.0f;
		*m = x;
	} else if (x != -INFINITY) {
		*s += expf(x - *m);
	}
}

/* Entry base of state `si` (a global state index) of pass-job jb. */
AXC_HD uint64_t axc_ent(const axc_job *jb, uint64_t si)
{
	return jb->ent0 + (si - jb->state0) * jb->K;
}

/* States per split: one per computed row (heads, lse) or one (mean modes). */
AXC_HD uint32_t axc_srows(const axc_job *jb)
{
	return jb->mode == AXC_PJ_HEADS || jb->mode == AXC_PJ_LSE ? jb->R : 1;
}

/* Feed nt values v[t·vstride] at positions pos0 + t (in order) to state si. */
AXC_HD void axc_row_tile(const axc_state *st, const axc_job *jb, uint64_t si, const float *v, uint32_t vstride,
			 uint32_t nt, uint64_t pos0)
{
	float m = st->m[si], s = st->s[si];
	uint32_t cnt = st->cnt[si];
	uint64_t e = axc_ent(jb, si);
	for (uint32_t t = 0; t < nt; t++) {
		float x = v[t * vstride];
		axc_lse_add(&m, &s, x);
		if (jb->K)
			axc_topk_insert(st->val + e, st->pos + e, &cnt, jb->K, x, (int64_t)(pos0 + t));
	}
	st->m[si] = m;
	st->s[si] = s;
	st->cnt[si] = cnt;
}

/* ---- the split CTA ------------------------------------------------------------------------------------------------ */

typedef struct axc_split_sm {
	uint64_t koff[AXC_TILE];  /* element offset of each tile key's row (KV head 0) in the pool */
	float acc[AXC_TILE];      /* mean_logit: Σ_h s_hj; then the key's value */
	float pm[AXC_TILE];       /* mean_prob: per-key online logsumexp over heads of s_hj − lse_h */
	float pe[AXC_TILE];
} axc_split_sm;

/* Floats of dynamic shared memory a split CTA needs: Q area, key tile [AXC_TILE][D+1], scores [AXC_CHUNK][AXC_VS]. */
AXC_HD uint32_t axc_split_dyn_floats(uint32_t qcap, uint32_t D)
{
	return qcap + AXC_TILE * (D + 1) + AXC_CHUNK * AXC_VS;
}

/* Stage Q rows r0 .. r0+nr-1 (job-local computed rows) as w·q in f32 at qs [nr][D]. Returns AXC_F_DOM if a
 * value this thread staged is not finite, else 0. */
AXC_HD uint32_t axc_stage_q(const axc_args *a, const axc_job *jb, uint32_t r0, uint32_t nr, uint32_t D, float *qs,
			    uint32_t tid, uint32_t nth)
{
	uint32_t f = 0;
	for (uint32_t i = tid; i < nr * D; i += nth) {
		uint32_t r = i / D, d = i % D;
		uint32_t h = (uint32_t)a->row_head[jb->row0 + r0 + r];
		float x;
		if (jb->collapsed) { /* h = g·G: the group's sum, then w/H (attn_cpu's order) */
			x = 0;
			for (uint32_t k = h; k < h + jb->G; k++)
				x += axc_elem(jb->q, jb->qdt, (uint64_t)k * D + d);
			x *= jb->w / (float)jb->H;
		} else {
			x = jb->w * axc_elem(jb->q, jb->qdt, (uint64_t)h * D + d);
		}
		if (!axc_finite(x)) {
			f = AXC_F_DOM;
			x = 0;
		}
		qs[i] = x;
	}
	return f;
}

/* Stage the keys of KV head g of the tile's nt keys as f32 at ks [AXC_TILE][D+1]. */
AXC_HD void axc_stage_k(const axc_job *jb, uint32_t g, uint32_t nt, uint32_t kdt, uint32_t D, float *ks,
			const axc_split_sm *sm, uint32_t tid, uint32_t nth)
{
	const char *kb = (const char *)jb->k;
	uint32_t esz = axc_esize(kdt);
	if (jb->vec) {
		uint32_t epc = 16 / esz, cpr = D / epc; /* elements per 16 bytes, 16-byte pieces per row */
		for (uint32_t i = tid; i < nt * cpr; i += nth) {
			uint32_t t = i / cpr, c = i % cpr;
			uint64_t el = sm->koff[t] + (uint64_t)g * jb->s1 + (uint64_t)c * epc;
			uint32_t w[4];
#if defined(__CUDA_ARCH__)
			uint4 v = __ldg((const uint4 *)(kb + el * esz));
			w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
#else
			AXC_EMU_LOAD16(w, kb + el * esz);
#endif
			float f[16];
			axc_decode16(w, kdt, f);
			for (uint32_t e = 0; e < epc; e++)
				ks[t * (D + 1) + c * epc + e] = f[e];
		}
		return;
	}
	for (uint32_t i = tid; i < nt * D; i += nth) {
		uint32_t t = i / D, d = i % D;
		ks[t * (D + 1) + d] = axc_elem(kb, kdt, sm->koff[t] + (uint64_t)g * jb->s1 + d);
	}
}

/* Scores of chunk rows (qb [n][D]) against the tile's keys (ks) into vs [AXC_CHUNK][AXC_VS], capped. Thread
 * tid takes key tid % AXC_TILE and rows tid / AXC_TILE + i·(nth / AXC_TILE). Returns AXC_F_DOM if one of its
 * scores is not finite (checked before the cap, which would hide an infinity), else 0. */
AXC_HD uint32_t axc_scores(const axc_job *jb, const axc_chunk *ch, uint32_t nt, uint32_t D, const float *qb,
			   const float *ks, float *vs, uint32_t tid, uint32_t nth)
{
	uint32_t t = tid % AXC_TILE, nrw = nth / AXC_TILE, f = 0;
	if (t >= nt)
		return 0;
	const float *kr = ks + t * (D + 1);
	for (uint32_t r = tid / AXC_TILE; r < ch->n; r += nrw) {
		const float *qr = qb + r * D;
		float acc = 0;
		for (uint32_t d = 0; d < D; d++)
			acc = fmaf(qr[d], kr[d], acc);
		if (!axc_finite(acc)) {
			f = AXC_F_DOM;
			acc = 0;
		}
		vs[r * AXC_VS + t] = jb->cap > 0 ? axc_softcap(acc, jb->cap) : acc;
	}
	return f;
}

/* Fold one chunk's scores into the split: per-row states (heads, lse) or per-key reductions (mean modes). */
AXC_HD void axc_fold(const axc_args *a, const axc_job *jb, const axc_chunk *ch, uint64_t sbase, uint32_t nt,
		     uint64_t t0, const float *vs, axc_split_sm *sm, uint32_t tid)
{
	if (jb->mode == AXC_PJ_HEADS || jb->mode == AXC_PJ_LSE) {
		if (tid < ch->n)
			axc_row_tile(&a->st, jb, sbase + ch->row0 + tid, vs + tid * AXC_VS, 1, nt, t0);
		return;
	}
	if (tid >= nt)
		return;
	if (jb->mode == AXC_PJ_LOGIT) {
		float sum = 0;
		for (uint32_t r = 0; r < ch->n; r++)
			sum += vs[r * AXC_VS + tid];
		sm->acc[tid] += sum;
		return;
	}
	for (uint32_t r = 0; r < ch->n; r++) {
		uint32_t h = (uint32_t)a->row_head[jb->row0 + ch->row0 + r];
		axc_lse_add(&sm->pm[tid], &sm->pe[tid], vs[r * AXC_VS + tid] - a->lse[jb->lse0 + h]);
	}
}

/* Mean modes, after every chunk of a tile: one value per key (mean logit, or log p_j), pushed in position order.
 * Returns AXC_F_DOM if a value is not finite. */
AXC_HD uint32_t axc_mean_push(const axc_args *a, const axc_job *jb, uint64_t sbase, uint32_t nt, uint64_t t0,
			      axc_split_sm *sm)
{
	uint32_t f = 0;
	float inv_h = jb->collapsed ? 1.0f : 1.0f / (float)jb->H, log_h = logf((float)jb->H);
	for (uint32_t t = 0; t < nt; t++) {
		float v = jb->mode == AXC_PJ_LOGIT ? sm->acc[t] * inv_h : sm->pm[t] + (logf(sm->pe[t]) - log_h);
		if (!axc_finite(v)) { /* a sum of finite scores can still overflow */
			f = AXC_F_DOM;
			v = 0;
		}
		sm->acc[t] = v;
	}
	axc_row_tile(&a->st, jb, sbase, sm->acc, 1, nt, t0);
	return f;
}

/* Phase body of the init: the split's states empty; split 0 also checks all of Q (attn_cpu rejects a non-finite
 * Q even in heads it does not report); Q staged once when it fits. Returns AXC_F_DOM or 0. */
AXC_HD uint32_t axc_split_init(const axc_args *a, const axc_job *jb, uint32_t split, uint64_t sbase, uint32_t D,
			       float *qs, uint32_t tid, uint32_t nth)
{
	uint32_t f = 0;
	for (uint32_t r = tid; r < axc_srows(jb); r += nth) {
		a->st.m[sbase + r] = -INFINITY;
		a->st.s[sbase + r] = 0;
		a->st.cnt[sbase + r] = 0;
	}
	for (uint64_t i = tid; split == 0 && i < (uint64_t)jb->H * D; i += nth)
		if (!axc_finite(axc_elem(jb->q, jb->qdt, i)))
			f = AXC_F_DOM;
	if (jb->q_all)
		f |= axc_stage_q(a, jb, 0, jb->R, D, qs, tid, nth);
	return f;
}

/* Phase body: the row offsets of the tile's keys (an out-of-pool slot or block: AXC_F_RANGE, and offset 0 so
 * nothing outside is read) and the per-key accumulators reset. A paged key j reads cell j / bs of the block table
 * (the cells of the blocks holding visible keys, no other). */
AXC_HD uint32_t axc_tile_slots(const axc_job *jb, uint64_t t0, uint32_t nt, uint32_t idt, axc_split_sm *sm,
			       uint32_t tid)
{
	uint32_t f = 0;
	if (tid < nt) {
		uint64_t j = t0 + tid;
		uint64_t v = axc_slot(jb->index, idt, jb->bs ? j / jb->bs : j);
		uint64_t off = jb->bs ? v * jb->sb + (j % jb->bs) * jb->s0 : v * jb->s0;
		if (v >= jb->n_slots) {
			f = AXC_F_RANGE;
			off = 0;
		}
		sm->koff[tid] = off;
	}
	if (tid < AXC_TILE) {
		sm->acc[tid] = 0;
		sm->pm[tid] = -INFINITY;
		sm->pe[tid] = 0;
	}
	return f;
}

/*
 * One split CTA: work item `cta` of a->work, nth threads (a multiple of AXC_TILE), shared memory sm and dyn
 * (axc_split_dyn_floats(a->qcap, D) floats). kdt, idt and Dc are the job's key dtype, index dtype and head dim
 * (Dc = 0: the job's D), constants where the kernel is instantiated. Flags go to a->flags[jb->flag]. `seen` is
 * per thread on the GPU (what this thread found; AXC_SYNC_ANY ORs them) and the OR over all threads on the
 * host. Only AXC_F_RANGE stops the split (no key past the pool is read); after AXC_F_DOM it runs on, so every
 * index value is still checked and -ERANGE wins as in attn_cpu.
 */
AXC_HD void axc_split_cta(const axc_args *a, uint32_t cta, uint32_t nth, axc_split_sm *sm, float *dyn, uint32_t kdt,
			  uint32_t idt, uint32_t Dc)
{
	const axc_work wk = a->work[cta];
	const axc_job *jb = &a->jobs[wk.job];
	const uint32_t D = Dc ? Dc : jb->D;
	float *qs = dyn, *ks = dyn + a->qcap, *vs = ks + AXC_TILE * (D + 1);
	const uint64_t j0 = jb->start + (uint64_t)wk.split * jb->split_len;
	const uint64_t end = j0 + jb->split_len < jb->start + jb->n ? j0 + jb->split_len : jb->start + jb->n;
	const uint64_t sbase = jb->state0 + (uint64_t)wk.split * axc_srows(jb);
	const int mean = jb->mode == AXC_PJ_LOGIT || jb->mode == AXC_PJ_PROB;
	uint32_t seen = 0;

	AXC_PHASE(tid, nth) {
		seen |= axc_split_init(a, jb, wk.split, sbase, D, qs, tid, nth);
	}
	for (uint64_t t0 = j0; t0 < end; t0 += AXC_TILE) {
		const uint32_t nt = end - t0 < AXC_TILE ? (uint32_t)(end - t0) : AXC_TILE;
		AXC_PHASE(tid, nth) {
			seen |= axc_tile_slots(jb, t0, nt, idt, sm, tid);
		}
		if (AXC_SYNC_ANY(seen & AXC_F_RANGE))
			break;
		/* Per chunk c: [fold c-1 | stage c] barrier [scores c] barrier. The fold reads only vs and writes only the
		 * states and the per-key sums; the staging writes only ks and qs, which scores c-1 (before the last
		 * barrier) was the last to read; so the two share a phase and the loads overlap the fold. */
		uint32_t staged = UINT32_MAX;
		axc_chunk prev = {0, 0, 0, 0};
		for (uint32_t c = 0; c <= jb->n_chunks; c++) {
			const int last = c == jb->n_chunks;
			const axc_chunk ch = last ? prev : a->chunks[jb->chunk0 + c];
			AXC_PHASE(tid, nth) {
				if (c > 0)
					axc_fold(a, jb, &prev, sbase, nt, t0, vs, sm, tid);
				if (!last && ch.g != staged)
					axc_stage_k(jb, ch.g, nt, kdt, D, ks, sm, tid, nth);
				if (!last && !jb->q_all)
					seen |= axc_stage_q(a, jb, ch.row0, ch.n, D, qs, tid, nth);
			}
			AXC_SYNC();
			if (last)
				break;
			staged = ch.g;
			prev = ch;
			const float *qb = jb->q_all ? qs + (size_t)ch.row0 * D : qs;
			AXC_PHASE(tid, nth) {
				seen |= axc_scores(jb, &ch, nt, D, qb, ks, vs, tid, nth);
			}
			AXC_SYNC();
		}
		if (mean) {
			AXC_PHASE(tid, nth) {
				if (tid == 0)
					seen |= axc_mean_push(a, jb, sbase, nt, t0, sm);
			}
			AXC_SYNC();
		}
	}
	AXC_PHASE(tid, nth) {
		if (seen && tid < nth) /* every thread that found something (on the host: once per tid, idempotent) */
			AXC_ATOMIC_OR(&a->flags[jb->flag], seen);
	}
}

/* ---- the merge CTA ------------------------------------------------------------------------------------------------- */

typedef struct axc_merge_sm {
	float cv[AXC_MERGE_CAP];         /* survivors of a sweep */
	int64_t cp[AXC_MERGE_CAP];
	float lv[AXC_MAX_K];             /* the top k of the survivors */
	int64_t lp[AXC_MAX_K];
	float rf[AXC_MERGE_THREADS];     /* per-thread partials */
	int64_t rp[AXC_MERGE_THREADS];
	float rm[AXC_MERGE_THREADS];
	double rd[AXC_MERGE_THREADS];
	uint32_t nc, over;               /* survivors gathered, buffer overflowed */
	float barv, M;                   /* bar (value, position); max of the split maxima */
	int64_t barp;
	double lse;
} axc_merge_sm;

/* Phase body: thread tid's part of the split maxima and of the bar (best k-th of a full split list). */
AXC_HD void axc_merge_scan(const axc_args *a, const axc_job *jb, uint32_t row, axc_merge_sm *sm, uint32_t tid,
			   uint32_t nth)
{
	float m = -INFINITY, bv = -INFINITY;
	int64_t bp = INT64_MAX;
	for (uint32_t s = tid; s < jb->n_splits; s += nth) {
		uint64_t si = jb->state0 + (uint64_t)s * axc_srows(jb) + row;
		m = a->st.m[si] > m ? a->st.m[si] : m;
		if (jb->K && a->st.cnt[si] == jb->K) {
			uint64_t e = axc_ent(jb, si) + jb->K - 1;
			if (axc_better(a->st.val[e], a->st.pos[e], bv, bp))
				bv = a->st.val[e], bp = a->st.pos[e];
		}
	}
	sm->rm[tid] = m;
	sm->rf[tid] = bv;
	sm->rp[tid] = bp;
}

/* Phase body: Σ over thread tid's splits of s · exp(m − M), in f64. */
AXC_HD void axc_merge_sum(const axc_args *a, const axc_job *jb, uint32_t row, axc_merge_sm *sm, uint32_t tid,
			  uint32_t nth)
{
	double sum = 0;
	for (uint32_t s = tid; s < jb->n_splits; s += nth) {
		uint64_t si = jb->state0 + (uint64_t)s * axc_srows(jb) + row;
		if (a->st.m[si] != -INFINITY)
			sum += (double)a->st.s[si] * exp((double)a->st.m[si] - (double)sm->M);
	}
	sm->rd[tid] = sum;
}

/* Phase body: gather every list entry at least as good as the bar into cv/cp (at most cap; more sets `over`). */
AXC_HD void axc_merge_sweep(const axc_args *a, const axc_job *jb, uint32_t row, uint32_t cap, axc_merge_sm *sm,
			    uint32_t tid, uint32_t nth)
{
	uint64_t E = (uint64_t)jb->n_splits * jb->K;
	for (uint64_t e = tid; e < E; e += nth) {
		uint64_t si = jb->state0 + (e / jb->K) * axc_srows(jb) + row;
		uint32_t i = (uint32_t)(e % jb->K);
		if (i >= a->st.cnt[si])
			continue;
		uint64_t x = axc_ent(jb, si) + i;
		float v = a->st.val[x];
		int64_t p = a->st.pos[x];
		if (axc_better(sm->barv, sm->barp, v, p))
			continue;
		uint32_t at = AXC_ATOMIC_ADD(&sm->nc, 1u);
		if (at < cap) {
			sm->cv[at] = v;
			sm->cp[at] = p;
		} else {
			AXC_ATOMIC_OR(&sm->over, 1u);
		}
	}
}

/* Phase body: survivors ranked by the number of better survivors; the first K go to lv/lp in order. */
AXC_HD void axc_merge_rank(uint32_t K, uint32_t cap, axc_merge_sm *sm, uint32_t tid, uint32_t nth)
{
	uint32_t n = sm->nc < cap ? sm->nc : cap;
	for (uint32_t x = tid; x < n; x += nth) {
		uint32_t r = 0;
		for (uint32_t y = 0; y < n && r < K; y++)
			r += (uint32_t)axc_better(sm->cv[y], sm->cp[y], sm->cv[x], sm->cp[x]);
		if (r < K) {
			sm->lv[r] = sm->cv[x];
			sm->lp[r] = sm->cp[x];
		}
	}
}

/* Phase body: the result row (or, for AXC_PJ_LSE, the head's logsumexp). */
AXC_HD void axc_merge_write(const axc_args *a, const axc_job *jb, const axc_mrow *mr, uint32_t nl, axc_merge_sm *sm,
			    uint32_t tid, uint32_t nth)
{
	if (jb->mode == AXC_PJ_LSE) {
		if (tid == 0)
			a->lse[mr->out] = (float)sm->lse;
		return;
	}
	ax_attn_result *res = &a->res[mr->out];
	for (uint32_t i = tid; i < AXC_MAX_K; i += nth) {
		res->pos[i] = i < nl ? sm->lp[i] : -1;
		res->logit[i] = i < nl ? sm->lv[i] : -INFINITY;
	}
	if (tid == 0) {
		res->head_id = mr->head_id;
		res->k = nl;
		res->lse = jb->mode == AXC_PJ_PROB ? 0.0 : sm->lse;
	}
}

/* The top-k part of a merge: sweeps until the survivors fit; returns the list length (uniform). */
AXC_HD uint32_t axc_merge_topk(const axc_args *a, const axc_job *jb, uint32_t row, uint32_t cap, axc_merge_sm *sm,
			       uint32_t nth)
{
	for (;;) {
		AXC_PHASE(tid, nth) {
			if (tid == 0)
				sm->nc = 0, sm->over = 0;
		}
		AXC_SYNC();
		AXC_PHASE(tid, nth) {
			axc_merge_sweep(a, jb, row, cap, sm, tid, nth);
		}
		AXC_SYNC();
		AXC_PHASE(tid, nth) {
			axc_merge_rank(jb->K, cap, sm, tid, nth);
		}
		if (!AXC_SYNC_ANY(sm->over))
			break;
		/* cap > K survivors were kept: their k-th best is strictly better than the old bar */
		AXC_PHASE(tid, nth) {
			if (tid == 0)
				sm->barv = sm->lv[jb->K - 1], sm->barp = sm->lp[jb->K - 1];
		}
	}
	return sm->nc < jb->K ? sm->nc : jb->K;
}

/* Reduce the per-thread partials of axc_merge_scan (thread 0). */
AXC_HD void axc_merge_reduce(axc_merge_sm *sm, uint32_t nth)
{
	float m = -INFINITY, bv = -INFINITY;
	int64_t bp = INT64_MAX;
	for (uint32_t t = 0; t < nth; t++) {
		m = sm->rm[t] > m ? sm->rm[t] : m;
		if (axc_better(sm->rf[t], sm->rp[t], bv, bp))
			bv = sm->rf[t], bp = sm->rp[t];
	}
	sm->M = m;
	sm->barv = bv;
	sm->barp = bp;
}

/*
 * One merge CTA: merge row `i` of a->mrows, nth ≤ AXC_MERGE_THREADS threads, buffer cap (≤ AXC_MERGE_CAP, > K)
 * entries. With no full split list the bar is (-inf, INT64_MAX), which every entry passes.
 */
AXC_HD void axc_merge_row(const axc_args *a, uint32_t i, uint32_t nth, uint32_t cap, axc_merge_sm *sm)
{
	const axc_mrow mr = a->mrows[i];
	const axc_job *jb = &a->jobs[mr.job];
	const uint32_t row = axc_srows(jb) > 1 ? mr.row : 0;
	AXC_PHASE(tid, nth) {
		axc_merge_scan(a, jb, row, sm, tid, nth);
	}
	AXC_SYNC();
	AXC_PHASE(tid, nth) {
		if (tid == 0)
			axc_merge_reduce(sm, nth);
	}
	AXC_SYNC();
	AXC_PHASE(tid, nth) {
		axc_merge_sum(a, jb, row, sm, tid, nth);
	}
	AXC_SYNC();
	AXC_PHASE(tid, nth) {
		if (tid == 0) {
			double t = 0;
			for (uint32_t k = 0; k < nth; k++)
				t += sm->rd[k];
			sm->lse = sm->M == -INFINITY ? -INFINITY : (double)sm->M + log(t);
		}
	}
	AXC_SYNC();
	uint32_t nl = jb->K ? axc_merge_topk(a, jb, row, cap, sm, nth) : 0;
	AXC_PHASE(tid, nth) {
		axc_merge_write(a, jb, &mr, nl, sm, tid, nth);
	}
}

/* ---- host side: validation, rows, chunks, split plan ------------------------------------------------------------- */

/* Output rows of a job (= ax_attn_rows). */
static inline uint32_t axc_out_rows(const ax_attn_job *job)
{
	if (job->mode != AX_MODE_HEADS)
		return 1;
	return job->heads ? job->n_heads : job->n_q_heads;
}

/* attn_cpu.c's check_job, exactly, then this backend's own limits: -EOPNOTSUPP for head_dim > AXC_MAX_D, -EINVAL
 * for pointers not aligned to their element size (the GPU faults on those; attn_cpu requires the same). */
static inline int axc_check_job(const ax_attn_job *job)
{
	uint32_t kes = axc_esize(job->k_dtype);
	int fp8 = job->k_dtype == AX_DTYPE_FP8_E4M3 || job->k_dtype == AX_DTYPE_FP8_E5M2;
	if (!job->q || !job->k || !job->index)
		return -EINVAL;
	if (job->q_dtype != AX_DTYPE_F32 && job->q_dtype != AX_DTYPE_F16 && job->q_dtype != AX_DTYPE_BF16)
		return -EINVAL;
	if (kes == 0 || job->k_dtype == AX_DTYPE_I32 || job->k_dtype == AX_DTYPE_I64 ||
	    (job->index_dtype != AX_DTYPE_I32 && job->index_dtype != AX_DTYPE_I64))
		return -EINVAL;
	if (job->n_q_heads == 0 || job->n_q_heads > 4096 || job->n_kv_heads == 0 ||
	    job->n_q_heads % job->n_kv_heads != 0 || job->head_dim == 0 || job->head_dim > 4096)
		return -EINVAL;
	if (job->mode < AX_MODE_MEAN_LOGIT || job->mode > AX_MODE_HEADS || job->top_k == 0 ||
	    job->top_k > AX_ATTN_MAX_TOPK || job->window < 0 || job->position >= ((uint64_t)1 << 40))
		return -EINVAL;
	if (!isfinite(job->scale) || !isfinite(job->logit_cap) || job->logit_cap < 0)
		return -EINVAL;
	if (fp8 && (!isfinite(job->k_scale) || job->k_scale == 0))
		return -EINVAL;
	if (job->k_stride[2] != 1)
		return -EINVAL;
	/* a > ⌊L / b⌋ exactly when a·b > L (b > 0): 128-bit products instead of 64-bit divisions (this runs for every
	 * job of every call; the fast path's planner checks each job once) */
	uint64_t lim = ((uint64_t)1 << 62) >> __builtin_ctz(kes), q = lim / 4; /* (element sizes are powers of 2) */
#define AXC_OVER(a, b, L) ((unsigned __int128)(a) * (b) > (L))
	if (job->index_kind == AX_ATTN_INDEX_PAGED) { /* each term of the farthest element below lim / 4 */
		if (job->n_slots != 0 || job->index_dtype != AX_DTYPE_I32 || job->n_blocks == 0 || job->block_size == 0 ||
		    job->block_size > AX_ATTN_MAX_BLOCK_SIZE || AXC_OVER(job->k_block_stride, job->n_blocks, q) ||
		    AXC_OVER(job->k_stride[0], job->block_size, q) || AXC_OVER(job->k_stride[1], job->n_kv_heads, q))
			return -EINVAL;
	} else if (job->index_kind != AX_ATTN_INDEX_TOKEN || job->n_slots == 0 ||
		   AXC_OVER(job->k_stride[0], job->n_slots, lim) || AXC_OVER(job->k_stride[1], job->n_kv_heads, lim)) {
		return -EINVAL;
	}
#undef AXC_OVER
	if (job->mode == AX_MODE_HEADS && job->heads) {
		if (job->n_heads == 0 || job->n_heads > 4096)
			return -EINVAL;
		for (uint32_t i = 0; i < job->n_heads; i++)
			if (job->heads[i] < 0 || (uint32_t)job->heads[i] >= job->n_q_heads)
				return -EINVAL;
	}
	if (((uintptr_t)job->q & (axc_esize(job->q_dtype) - 1)) || ((uintptr_t)job->k & (kes - 1)) ||
	    ((uintptr_t)job->index & (axc_esize(job->index_dtype) - 1)))
		return -EINVAL;
	if (job->head_dim > AXC_MAX_D)
		return -EOPNOTSUPP;
	return 0;
}

/* Visible keys of a job: positions *start .. *start + *n - 1. */
static inline void axc_visible(const ax_attn_job *job, uint64_t *start, uint64_t *n)
{
	uint64_t nk = job->position + 1;
	*start = job->window > 0 && nk > (uint64_t)job->window ? nk - (uint64_t)job->window : 0;
	*n = nk - *start;
}

/*
 * Computed rows of a valid job: the query heads it needs, ascending, at row_head[0 .. return-1] (all H_q heads,
 * or the distinct listed ones in heads mode). out_row[i] (for each output row i of a heads-mode job) gets the
 * computed row of its head. mark has room for H_q entries (scratch).
 */
static inline uint32_t axc_rows(const ax_attn_job *job, int32_t *row_head, int32_t *out_row, int32_t *mark)
{
	uint32_t H = job->n_q_heads, R = 0;
	int list = job->mode == AX_MODE_HEADS && job->heads;
	for (uint32_t h = 0; h < H; h++)
		mark[h] = list ? -1 : 0;
	for (uint32_t i = 0; list && i < job->n_heads; i++)
		mark[job->heads[i]] = 0;
	for (uint32_t h = 0; h < H; h++)
		if (mark[h] == 0) {
			mark[h] = (int32_t)R;
			row_head[R++] = (int32_t)h;
		}
	for (uint32_t i = 0; job->mode == AX_MODE_HEADS && i < axc_out_rows(job); i++)
		out_row[i] = mark[list ? job->heads[i] : (int32_t)i];
	return R;
}

/* Chunks of R computed rows (ascending heads, group size G): runs of ≤ AXC_CHUNK rows of one KV head. */
static inline uint32_t axc_chunks(const int32_t *row_head, uint32_t R, uint32_t G, axc_chunk *out)
{
	uint32_t n = 0;
	for (uint32_t r = 0; r < R;) {
		uint32_t g = (uint32_t)row_head[r] / G, e = r + 1;
		while (e < R && (uint32_t)row_head[e] / G == g && e - r < AXC_CHUNK)
			e++;
		out[n].g = g;
		out[n].row0 = r;
		out[n].n = e - r;
		out[n].pad = 0;
		n++;
		r = e;
	}
	return n;
}

/*
 * Split length for a pass: about `target` CTAs over `total` visible keys, at least AXC_MIN_SPLIT keys, a
 * multiple of AXC_TILE, and long enough that the longest job (longest keys) has at most AXC_MAX_SPLITS splits.
 */
static inline uint64_t axc_split_len(uint64_t total, uint64_t longest, uint32_t target)
{
	uint64_t L = (total + target - 1) / (target ? target : 1);
	uint64_t Lmin = (longest + AXC_MAX_SPLITS - 1) / AXC_MAX_SPLITS;
	L = L > Lmin ? L : Lmin;
	L = L > AXC_MIN_SPLIT ? L : AXC_MIN_SPLIT;
	return (L + AXC_TILE - 1) / AXC_TILE * AXC_TILE;
}

static inline uint32_t axc_n_splits(uint64_t n, uint64_t L)
{
	return (uint32_t)((n + L - 1) / L);
}

#endif
