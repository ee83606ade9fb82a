/*
 * attn_cuda_prefill.h — the CUDA backend's prefill path (attn_cuda_prefill.cu): many query rows of one request
 * and layer computed in one pass over their keys on the tensor cores. Internal to capture/: attn_cuda.cu's
 * dispatch hook, the GPU test and the CPU tests include it.
 *
 * The daemon (backend_cuda.c, capture.c) sends a prompt's rows as separate jobs: for each token t, one job per
 * captured layer, so the rows of one layer are not adjacent in the batch; they share the K pool, the index row
 * and every parameter, have consecutive positions, and their Q rows sit at a constant stride of a ring that may
 * wrap (so the plan keeps a Q pointer per row). This header is the path's host half in plain C (also valid C++),
 * which attn_cuda_prefill_test.c runs without a GPU:
 *   - grouping (axp_group): jobs the decode fast path accepts (axf_eligible: bf16/f16, D 128, H_kv ≤ 8, G ≤ 8, no
 *     cap, no head list, token index rows) are chained by (K pool, index row, position) through a hash table:
 *     job b continues job a when every parameter matches and b's position is a's + 1. Chains are cut into
 *     blocks of 2 .. R rows of nearly equal size (R = min(rows cap, AXP_MAXL / H_q, AXP_MAX_ROWS)); a chain of
 *     one row stays with the other paths. In the mean modes, blocks of fewer than min_rows rows
 *     (AX_PREFILL_MIN_ROWS, default 8) stay there too: run 10 (H200, capture/README.md "CUDA prefill path")
 *     measured mean_logit blocks of 4 rows at 0.80-0.86× the decode fast path and blocks of 8 at 1.3-1.6×
 *     (heads: 4-row blocks 2.24×, so heads chains are not gated); so mean-mode chains whose cap is below
 *     min_rows (H_q 64) or that are shorter are left alone, and a chain whose nearly equal blocks would fall
 *     below it is cut into full blocks of R rows, its remainder left to the other paths.
 *   - the plan (axp_plan_build): each block becomes one pass-block (mean_prob: two, a per-(row, head)
 *     logsumexp pass and the probability pass); pass A holds every first pass, pass B mean_prob's second.
 *     A block's keys are the union of its rows' visible ranges, [lo, p_last]; it is split into chunks (a
 *     multiple of AXP_TS keys, at least min_keys, at most AXP_MAX_SPLITS splits per block, total CTAs about
 *     `target`); one CTA per (pass-block, split) writes a partial row per list (row × head in heads mode, row
 *     otherwise): its logsumexp and top-k over the split's keys that the row sees; a merge launch (one warp per
 *     list) merges the splits exactly.
 *   - the finish (axp_plan_finish): per-row flag words to codes (-ERANGE over -EDOM) and the compact results to
 *     ax_attn_result rows at the usual offsets.
 * Kernels, driver and dispatch are in attn_cuda_prefill.cu.
 *
 * Positions inside the kernels are 32-bit offsets from the block's first key (lo); results carry lo + offset.
 */
#ifndef ATTNX_CAPTURE_ATTN_CUDA_PREFILL_H
#define ATTNX_CAPTURE_ATTN_CUDA_PREFILL_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attn.h"
#include "attn_cuda_fast.h" /* axf_why_not (eligibility), AXF_M_* modes, axf_ent, AXF_ROWS_SM, axc_grow */

#if defined(__CUDACC__)
#define AXP_HD static __host__ __device__ __forceinline__
#else
#define AXP_HD static inline
#endif

#define AXP_TS 16          /* keys per stage (the m16n8k16 M dimension) */
#define AXP_NT 256         /* threads per CTA: 8 warps, warp w scores KV head w */
#define AXP_NW 8
#define AXP_MAXL 256       /* lists (rows × heads) per block: one list per thread */
#define AXP_MAX_ROWS 64    /* rows per block */
#define AXP_MAX_SPLITS 256 /* splits per block */
#define AXP_SUB 16         /* mean modes: sub-lists per row and split (thread (r, kk) takes keys ≡ kk mod 16) */
#define AXP_SMEM_MAX 232448u /* the most dynamic shared memory of an sm_90 block (227 KB) */
#define AXP_QS 320         /* bytes of a Q column in shared memory (256 + 64: ≡ 16 words mod 32) */
#define AXP_SCS 21         /* floats of a score row (16 keys + 5, odd: the heads owners' 32 rows in 32 banks; mma writes and mean reads at most 2-way) */
#define AXP_ROWS_DEFAULT 16 /* rows per block unless AX_PREFILL_ROWS says otherwise */
#define AXP_MIN_KEYS_DEFAULT 64
#define AXP_MIN_ROWS_DEFAULT 8 /* least rows per block unless AX_PREFILL_MIN_ROWS says otherwise */

/* One pass-block (device table). Row r of the block is row row0 + r of the row tables (Q pointer, flag word);
 * its position is p0 + r and it sees keys [max(0, p0 + r + 1 - window) (window > 0), p0 + r]. */
typedef struct axp_blk {
	const void *k;       /* K pool base (16-byte aligned); row of slot s: H_kv·128 elements at s·s0 */
	const void *index;   /* index row: slot of position j at index[j] */
	uint64_t s0;         /* slot stride in elements */
	uint64_t n_slots;
	uint64_t lo;         /* first key of the block: row 0's first visible position */
	uint64_t p0;         /* position of row 0 */
	uint64_t part0;      /* partial row of (list l, split s, sub-list q < subs): part0 + (l·S + s)·subs + q */
	uint64_t ent0;       /* its K entries: ent0 + ((l·S + s)·subs + q)·K .. +K */
	uint64_t rent0;      /* result entries of list l: rent0 + l·K .. +K */
	uint32_t n;          /* keys of the block: p0 + R - lo */
	uint32_t chunk, S;   /* keys per split (a multiple of AXP_TS), splits */
	uint32_t R, H, Hkv, G, K;
	uint32_t mode;       /* AXF_M_HEADS (also mean_prob's logsumexp pass, K 0), AXF_M_LOGIT, AXF_M_PROB */
	uint32_t f16;        /* 1: f16 keys and queries, 0: bf16 */
	uint32_t idt;        /* AX_DTYPE_I32 / AX_DTYPE_I64 */
	int32_t window;
	uint32_t row0;
	int32_t res0;        /* first result list (lse at res_lse[res0 + l]), or -1 (logsumexp pass) */
	int32_t lse_out;     /* logsumexp pass: list l = (r, h) writes lse[lse_out + l]; else -1 */
	uint32_t lse_in;     /* probability pass: row r head h reads lse[lse_in + r·H + h] */
	float scale, inv_h;
} axp_blk;

/* Everything a launch reads (a __grid_constant__ parameter). */
typedef struct axp_args {
	const axp_blk *blk;      /* this pass's pass-blocks */
	const uint32_t *so;      /* [nb + 1] first CTA of each pass-block */
	const uint32_t *mo;      /* [nb + 1] first list of each pass-block (merge: one warp per list) */
	uint32_t nb;
	uint32_t smem;           /* dynamic shared memory of the split launch: the most any pass-block needs */
	const void *const *qptr; /* [rows] Q row [H, 128] of each row (16-byte aligned) */
	uint32_t *rflags;        /* [rows] AXF_F_* per row, zeroed before the launches */
	float *lse;              /* per-(row, head) logsumexps of mean_prob blocks */
	float *part_lse;         /* [partial rows] */
	float *part_s;           /* [partial entries] */
	int32_t *part_p;         /* [partial entries], -1 = empty */
	float *res_lse;          /* [result lists] */
	axf_ent *res_ent;        /* [result entries]: offset from lo, -1 = empty */
} axp_args;

/* Dynamic shared memory of a split CTA, laid out from its own pass-block (nq = R·H Q columns and score rows, R rows,
 * K list entries): the key stage, the owners' top-k lists (AXP_NT threads × K entries, values then offsets,
 * entry e of thread t at e·AXP_NT + t: conflict-free), Q columns, scores, mean_prob's logsumexps, row flags. One
 * set of expressions for the kernel, the launch and the planner. */
AXP_HD size_t axp_al16(size_t x)
{
	return (x + 15) & ~(size_t)15;
}
AXP_HD size_t axp_off_list(void) { return axp_al16((size_t)AXP_TS * AXF_ROWS_SM); }
AXP_HD size_t axp_off_qs(uint32_t K) { return axp_off_list() + (size_t)AXP_NT * K * 8; }
AXP_HD size_t axp_off_sc(uint32_t K, uint32_t nq) { return axp_off_qs(K) + (size_t)nq * AXP_QS; }
AXP_HD size_t axp_off_lse(uint32_t K, uint32_t nq) { return axp_off_sc(K, nq) + axp_al16((size_t)nq * AXP_SCS * 4); }
AXP_HD size_t axp_off_fl(uint32_t K, uint32_t nq) { return axp_off_lse(K, nq) + axp_al16((size_t)nq * 4); }
AXP_HD size_t axp_smem(uint32_t nq, uint32_t R, uint32_t K)
{
	return axp_off_fl(K, nq) + axp_al16((size_t)R * 4);
}

/* Knobs (environment, read once per state): rows per block, least keys per split, CTAs a pass aims for. */
typedef struct axp_knobs {
	uint32_t rows;     /* AX_PREFILL_ROWS: rows per block at most (2 .. AXP_MAX_ROWS; 0: as many as fit) */
	uint32_t min_keys; /* AX_PREFILL_MIN_KEYS: least keys per split */
	uint32_t target;   /* CTAs a pass is planned for (the driver: SMs × occupancy × AX_PREFILL_WAVES) */
	uint32_t min_rows; /* AX_PREFILL_MIN_ROWS: least rows per block in the mean modes (0 or 1: any block) */
} axp_knobs;

typedef struct axp_layout {
	size_t blk, so, mo, qptr, up;          /* uploaded tables */
	size_t rflags, res_lse, res_ent, down; /* downloaded results: [rflags, down) */
	size_t lse, part_lse, part_s, part_p, total; /* device only */
} axp_layout;

typedef struct axp_plan {
	axp_knobs kn;
	uint32_t n;                 /* jobs of the batch */
	uint32_t *roff;             /* [n] first result row of each job */
	size_t roff_cap;
	int32_t *succ;              /* [n] grouping: the job continuing job i's chain, or -1 */
	size_t succ_cap;
	uint8_t *head;              /* [n] grouping: 1 = job i has a predecessor */
	size_t head_cap;
	uint8_t *el;                /* [n] grouping: axp_eligible(job i) once known (axp_el): 0 not yet, 1 yes, 2 no */
	size_t el_cap;
	int32_t *ht;                /* grouping: hash table of job indices, -1 empty */
	size_t ht_cap;
	uint8_t *in;                /* [n] 1 = job i runs here */
	size_t in_cap;
	uint32_t *rj;               /* [rows] job of each row */
	size_t rj_cap;
	const void **qp;            /* [rows] Q pointer of each row */
	size_t qp_cap;
	uint32_t *bf;               /* [blocks] first row of each block (+1 entry: the end) */
	size_t bf_cap;
	uint32_t nrows, nblocks;
	axp_blk *pb;                /* pass-blocks: pass A [0, npa), pass B [npa, npb) */
	size_t pb_cap;
	uint32_t npb, npa;
	uint32_t *so;               /* pass A's [npa + 1], then pass B's [npb - npa + 1] */
	size_t so_cap;
	uint32_t *mo;               /* same shape as so */
	size_t mo_cap;
	uint32_t ctas[2], lists[2], smem[2];
	uint64_t parts, ents, nlse, nres, nrent;
	axp_layout lay;
	ax_attn_result empty;
} axp_plan;

static inline void axp_plan_free(axp_plan *p)
{
	if (!p)
		return;
	free(p->roff);
	free(p->succ);
	free(p->head);
	free(p->el);
	free(p->ht);
	free(p->in);
	free(p->rj);
	free(p->qp);
	free(p->bf);
	free(p->pb);
	free(p->so);
	free(p->mo);
	free(p);
}

/* ---- grouping ------------------------------------------------------------------------------------------------- */

/* Whether the prefill path may run job j at all: the fast path's shapes, a token index row. */
static inline int axp_eligible(const ax_attn_job *j)
{
	return j->index_kind == AX_ATTN_INDEX_TOKEN && axf_why_not(j) == AXF_OK;
}

/* Whether job b continues job a (both eligible): the same request and layer (pool, index row, every parameter)
 * at the next position. */
static inline int axp_follows(const ax_attn_job *a, const ax_attn_job *b)
{
	return a->k == b->k && a->index == b->index && b->position == a->position + 1 && a->q_dtype == b->q_dtype &&
	       a->k_dtype == b->k_dtype && a->k_stride[0] == b->k_stride[0] && a->k_stride[1] == b->k_stride[1] &&
	       a->k_stride[2] == b->k_stride[2] && a->n_slots == b->n_slots && a->index_dtype == b->index_dtype &&
	       a->window == b->window && a->n_q_heads == b->n_q_heads && a->n_kv_heads == b->n_kv_heads &&
	       a->head_dim == b->head_dim && a->head_offset == b->head_offset &&
	       memcmp(&a->scale, &b->scale, sizeof a->scale) == 0 && a->logit_cap == b->logit_cap &&
	       a->mode == b->mode && a->top_k == b->top_k && a->heads == NULL && b->heads == NULL &&
	       a->index_kind == b->index_kind;
}

static inline uint64_t axp_hash(const void *k, const void *index, uint64_t pos)
{
	uint64_t h = (uint64_t)(uintptr_t)k * 0x9e3779b97f4a7c15ull ^ (uint64_t)(uintptr_t)index * 0xbf58476d1ce4e5b9ull;
	h ^= pos * 0x94d049bb133111ebull;
	return h ^ (h >> 29);
}

/* axp_eligible(&jobs[i]), computed at most once per grouping (p->el): a decode batch, where no job has a
 * successor, is grouped without validating any job (the fast runner's plan validates each once; session 13). */
static inline int axp_el(axp_plan *p, const ax_attn_job *jobs, int32_t i)
{
	if (!p->el[i])
		p->el[i] = axp_eligible(&jobs[i]) ? 1 : 2;
	return p->el[i] == 1;
}

/* The canonical job of (k, index, pos): the first eligible one inserted (or, when none of them is, the first
 * one: it chains with nothing), or -1. */
static inline int32_t axp_lookup(const axp_plan *p, const ax_attn_job *jobs, const void *k, const void *index,
				 uint64_t pos)
{
	const size_t m = p->ht_cap - 1;
	for (size_t s = axp_hash(k, index, pos) & m;; s = (s + 1) & m) {
		int32_t i = p->ht[s];
		if (i < 0)
			return -1;
		if (jobs[i].k == k && jobs[i].index == index && jobs[i].position == pos)
			return i;
	}
}

static inline void axp_insert(axp_plan *p, const ax_attn_job *jobs, int32_t i)
{
	const size_t m = p->ht_cap - 1;
	for (size_t s = axp_hash(jobs[i].k, jobs[i].index, jobs[i].position) & m;; s = (s + 1) & m) {
		int32_t o = p->ht[s];
		if (o < 0) {
			p->ht[s] = i;
			return;
		}
		if (jobs[o].k == jobs[i].k && jobs[o].index == jobs[i].index && jobs[o].position == jobs[i].position) {
			/* a duplicate key: the first eligible one is canonical, the others never chain */
			if (!axp_el(p, jobs, o) && axp_el(p, jobs, i))
				p->ht[s] = i;
			return;
		}
	}
}

/* Rows per block for jobs with H query heads and top-k K under a rows cap: R·H lists (heads) and R·AXP_SUB
 * sub-lists (mean modes) are at most one per thread, and the CTA's shared memory fits (the lists take
 * AXP_NT·K·8 bytes: K 64 leaves room for R·H ≤ 172). */
static inline uint32_t axp_rows_cap(uint32_t cap, uint32_t H, uint32_t K)
{
	uint32_t r = AXP_MAXL / (H > AXP_SUB ? H : AXP_SUB);
	r = r < AXP_MAX_ROWS ? r : AXP_MAX_ROWS;
	r = cap && cap < r ? cap : r;
	while (r > 1 && axp_smem(r * H, r, K) > AXP_SMEM_MAX)
		r--;
	return r;
}

/* Append a block of `len` rows starting at chain job i; returns the job after it. */
static inline int32_t axp_add_block(axp_plan *p, const ax_attn_job *jobs, int32_t i, uint32_t len)
{
	p->bf[p->nblocks++] = p->nrows;
	for (uint32_t r = 0; r < len; r++, i = p->succ[i]) {
		p->rj[p->nrows] = (uint32_t)i;
		p->qp[p->nrows++] = jobs[i].q;
		p->in[i] = 1;
	}
	p->bf[p->nblocks] = p->nrows;
	return i;
}

/*
 * Group the batch into blocks (p->bf, p->rj, p->qp; p->in[i] = 1 for each job placed in a block). Blocks keep
 * their chain's order (positions increasing); a chain of len rows becomes ceil(len / R) blocks of nearly equal
 * size (each ≥ 2 rows when R ≥ 3; a cap of 2 leaves one block of 1 row in an odd chain). Returns 0 or -ENOMEM.
 */
static inline int axp_group(axp_plan *p, const ax_attn_job *jobs, uint32_t n)
{
	size_t hc = 16;
	while (hc < 2 * (size_t)n)
		hc *= 2;
	if (axc_grow((void **)&p->succ, &p->succ_cap, n ? n : 1, sizeof *p->succ) ||
	    axc_grow((void **)&p->head, &p->head_cap, n ? n : 1, 1) || axc_grow((void **)&p->el, &p->el_cap, n ? n : 1, 1) ||
	    axc_grow((void **)&p->in, &p->in_cap, n ? n : 1, 1) ||
	    axc_grow((void **)&p->rj, &p->rj_cap, n ? n : 1, sizeof *p->rj) ||
	    axc_grow((void **)&p->qp, &p->qp_cap, n ? n : 1, sizeof *p->qp) ||
	    axc_grow((void **)&p->bf, &p->bf_cap, (size_t)n + 1, sizeof *p->bf) ||
	    axc_grow((void **)&p->ht, &p->ht_cap, hc, sizeof *p->ht))
		return -ENOMEM;
	p->ht_cap = hc; /* the table uses exactly hc slots (a power of two) */
	memset(p->ht, 0xff, hc * sizeof *p->ht);
	memset(p->in, 0, n);
	memset(p->head, 0, n);
	memset(p->el, 0, n);
	p->nrows = p->nblocks = 0;
	p->bf[0] = 0;
	for (uint32_t i = 0; i < n; i++) {
		p->succ[i] = -1;
		if (jobs[i].index_kind == AX_ATTN_INDEX_TOKEN)
			axp_insert(p, jobs, (int32_t)i);
	}
	for (uint32_t i = 0; i < n; i++) { /* canonical jobs only: each job has at most one predecessor */
		const ax_attn_job *a = &jobs[i];
		if (a->index_kind != AX_ATTN_INDEX_TOKEN || axp_lookup(p, jobs, a->k, a->index, a->position) != (int32_t)i)
			continue;
		int32_t b = axp_lookup(p, jobs, a->k, a->index, a->position + 1);
		if (b >= 0 && axp_el(p, jobs, (int32_t)i) && axp_el(p, jobs, b) && axp_follows(a, &jobs[b]))
			p->succ[i] = b, p->head[b] = 1;
	}
	for (uint32_t i = 0; i < n; i++) {
		if (p->head[i] || p->succ[i] < 0)
			continue; /* not a chain head, or a chain of one row */
		uint32_t len = 0;
		for (int32_t j = (int32_t)i; j >= 0; j = p->succ[j])
			len++;
		const uint32_t cap = axp_rows_cap(p->kn.rows, jobs[i].n_q_heads, jobs[i].top_k),
			       m = jobs[i].mode == AX_MODE_HEADS ? 0 : p->kn.min_rows; /* heads blocks pay at any size */
		if (cap < m || len < m)
			continue; /* blocks this small are slower than the decode path: left to it */
		uint32_t nb = (len + cap - 1) / cap;
		int32_t j = (int32_t)i;
		if (len / nb < m) { /* nearly equal blocks would be too small: full blocks, the rest left alone */
			for (uint32_t b = 0; b < len / cap; b++)
				j = axp_add_block(p, jobs, j, cap);
			continue;
		}
		for (uint32_t b = 0; b < nb; b++)
			j = axp_add_block(p, jobs, j, len / nb + (b < len % nb));
	}
	return 0;
}

/* ---- the plan ------------------------------------------------------------------------------------------------- */

/* Visible keys of a job as [start, position]. */
AXP_HD uint64_t axp_first_key(uint64_t pos, int32_t window)
{
	return window > 0 && pos + 1 > (uint64_t)window ? pos + 1 - (uint64_t)window : 0;
}

/* Lists per row of a pass-block: one per head in heads mode (and the logsumexp pass), else one. */
AXP_HD uint32_t axp_lists_per_row(const axp_blk *b)
{
	return b->mode == AXF_M_HEADS ? b->H : 1;
}

/* Partial lists per list and split: heads 1 (thread (r, h) takes every key), mean modes AXP_SUB (thread (r, kk)
 * takes the keys ≡ kk mod 16 of its row). */
AXP_HD uint32_t axp_subs(const axp_blk *b)
{
	return b->mode == AXF_M_HEADS ? 1 : AXP_SUB;
}

static inline uint64_t axp_splits(uint64_t n, uint64_t chunk)
{
	uint64_t s = (n + chunk - 1) / chunk;
	return s ? s : 1;
}

/* The chunk of a pass-block of n keys under the base chunk: at least base, at most AXP_MAX_SPLITS splits. */
static inline uint32_t axp_chunk(uint64_t n, uint32_t base)
{
	uint64_t lo = (n + AXP_MAX_SPLITS - 1) / AXP_MAX_SPLITS;
	lo = (lo + AXP_TS - 1) / AXP_TS * AXP_TS;
	uint64_t c = base > lo ? base : lo;
	uint64_t one = (n + AXP_TS - 1) / AXP_TS * AXP_TS;
	c = c < one ? c : one;
	return (uint32_t)(c > AXP_TS ? c : AXP_TS);
}

/* The base chunk of pass-blocks [b0, b1): the shortest multiple of AXP_TS, at least min_keys, whose splits
 * number at most target (bisection; the count only falls as the chunk grows). */
static inline uint32_t axp_base(const axp_plan *p, uint32_t b0, uint32_t b1)
{
	uint64_t mx = 0;
	for (uint32_t b = b0; b < b1; b++)
		mx = p->pb[b].n > mx ? p->pb[b].n : mx;
	uint64_t lo = p->kn.min_keys > AXP_TS ? (p->kn.min_keys + AXP_TS - 1) / AXP_TS : 1;
	uint64_t hi = (mx + AXP_TS - 1) / AXP_TS;
	if (hi < lo)
		hi = lo;
	while (lo < hi) {
		uint64_t mid = lo + (hi - lo) / 2, t = 0;
		for (uint32_t b = b0; b < b1; b++)
			t += axp_splits(p->pb[b].n, axp_chunk(p->pb[b].n, (uint32_t)(mid * AXP_TS)));
		if (t <= p->kn.target)
			hi = mid;
		else
			lo = mid + 1;
	}
	return (uint32_t)(lo * AXP_TS);
}

/* Fields of the pass-block of block bi in kernel mode `mode` (splits and offsets: axp_plan_pass). */
static inline void axp_blk_fields(axp_plan *p, axp_blk *b, const ax_attn_job *jobs, uint32_t bi, uint32_t mode,
				  uint32_t lse_slot)
{
	const uint32_t row0 = p->bf[bi], R = p->bf[bi + 1] - row0;
	const ax_attn_job *j = &jobs[p->rj[row0]];
	memset(b, 0, sizeof *b);
	b->k = j->k, b->index = j->index, b->s0 = j->k_stride[0], b->n_slots = j->n_slots;
	b->p0 = j->position;
	b->lo = axp_first_key(j->position, j->window);
	b->n = (uint32_t)(j->position + R - b->lo);
	b->R = R, b->H = j->n_q_heads, b->Hkv = j->n_kv_heads, b->G = b->H / b->Hkv;
	b->K = j->top_k;
	b->mode = mode;
	b->f16 = j->k_dtype == AX_DTYPE_F16;
	b->idt = j->index_dtype;
	b->window = j->window;
	b->row0 = row0;
	b->res0 = -1, b->lse_out = -1;
	b->scale = j->scale, b->inv_h = 1.0f / (float)b->H;
	if (j->mode == AX_MODE_MEAN_PROB && mode == AXF_M_HEADS) { /* the logsumexp pass */
		b->K = 0;
		b->lse_out = (int32_t)lse_slot;
	} else {
		if (mode == AXF_M_PROB)
			b->lse_in = lse_slot;
		b->res0 = (int32_t)p->nres;
		b->rent0 = p->nrent;
		p->nres += (uint64_t)R * axp_lists_per_row(b);
		p->nrent += (uint64_t)R * axp_lists_per_row(b) * b->K;
	}
}

/* Splits, partial offsets, CTA and list prefixes of pass-blocks [b0, b1) (pass `ps`, prefixes at so0). */
static inline int axp_plan_pass(axp_plan *p, uint32_t ps, uint32_t b0, uint32_t b1, uint32_t so0)
{
	const uint32_t base = axp_base(p, b0, b1);
	uint64_t ctas = 0, lists = 0;
	p->smem[ps] = 0;
	for (uint32_t b = b0; b < b1; b++) {
		axp_blk *x = &p->pb[b];
		const uint32_t nl = x->R * axp_lists_per_row(x);
		x->chunk = axp_chunk(x->n, base);
		x->S = (uint32_t)axp_splits(x->n, x->chunk);
		x->part0 = p->parts;
		x->ent0 = p->ents;
		p->parts += (uint64_t)nl * x->S * axp_subs(x);
		p->ents += (uint64_t)nl * x->S * axp_subs(x) * x->K;
		p->so[so0 + b - b0] = (uint32_t)ctas;
		p->mo[so0 + b - b0] = (uint32_t)lists;
		ctas += x->S;
		lists += nl;
		const uint32_t sm = (uint32_t)axp_smem(x->R * x->H, x->R, x->K);
		p->smem[ps] = sm > p->smem[ps] ? sm : p->smem[ps];
	}
	if (ctas > INT32_MAX || lists > INT32_MAX)
		return -ENOMEM;
	p->so[so0 + b1 - b0] = (uint32_t)ctas;
	p->mo[so0 + b1 - b0] = (uint32_t)lists;
	p->ctas[ps] = (uint32_t)ctas;
	p->lists[ps] = (uint32_t)lists;
	return 0;
}

static inline size_t axp_al(size_t x)
{
	return (x + 255) & ~(size_t)255;
}

static inline void axp_make_layout(axp_plan *p)
{
	axp_layout *L = &p->lay;
	size_t o = 0;
	L->blk = o, o += axp_al(p->npb * sizeof(axp_blk));
	L->so = o, o += axp_al(((size_t)p->npb + 2) * sizeof(uint32_t));
	L->mo = o, o += axp_al(((size_t)p->npb + 2) * sizeof(uint32_t));
	L->qptr = o, o += axp_al(p->nrows * sizeof(void *));
	L->up = o;
	L->rflags = o, o += axp_al(p->nrows * sizeof(uint32_t));
	L->res_lse = o, o += axp_al(p->nres * sizeof(float));
	L->res_ent = o, o += axp_al(p->nrent * sizeof(axf_ent));
	L->down = o;
	L->lse = o, o += axp_al(p->nlse * sizeof(float));
	L->part_lse = o, o += axp_al(p->parts * sizeof(float));
	L->part_s = o, o += axp_al(p->ents * sizeof(float));
	L->part_p = o, o += axp_al(p->ents * sizeof(int32_t));
	L->total = o;
}

/*
 * Plan a batch: group it (axp_group), then one pass-block per block (mean_prob: its logsumexp pass in pass A,
 * its probability pass in pass B), splits and layout. rc[i] = 0 for each job placed in a block (p->in[i]); other
 * jobs' rc are left alone (the dispatcher runs them elsewhere). Returns 0 or -ENOMEM.
 */
static inline int axp_plan_build(axp_plan *p, const ax_attn_job *jobs, uint32_t n, int *rc)
{
	p->n = n, p->npb = p->npa = 0, p->parts = p->ents = p->nlse = p->nres = p->nrent = 0;
	p->ctas[0] = p->ctas[1] = p->lists[0] = p->lists[1] = 0;
	int r = axp_group(p, jobs, n);
	if (r)
		return r;
	uint64_t rows = 0;
	if (axc_grow((void **)&p->roff, &p->roff_cap, n ? n : 1, sizeof *p->roff))
		return -ENOMEM;
	for (uint32_t i = 0; i < n; i++) {
		p->roff[i] = (uint32_t)rows;
		rows += axc_out_rows(&jobs[i]);
		if (p->in[i])
			rc[i] = 0;
	}
	if (rows > INT32_MAX)
		return -ENOMEM;
	if (axc_grow((void **)&p->pb, &p->pb_cap, 2 * (size_t)p->nblocks + 1, sizeof *p->pb) ||
	    axc_grow((void **)&p->so, &p->so_cap, 2 * (size_t)p->nblocks + 2, sizeof *p->so) ||
	    axc_grow((void **)&p->mo, &p->mo_cap, 2 * (size_t)p->nblocks + 2, sizeof *p->mo))
		return -ENOMEM;
	for (int pass = 0; pass < 2; pass++) {
		uint64_t slot = 0; /* both passes of a mean_prob block name the same logsumexp slots */
		for (uint32_t bi = 0; bi < p->nblocks; bi++) {
			const ax_attn_job *j = &jobs[p->rj[p->bf[bi]]];
			const uint32_t mode = pass == 1 ? (j->mode == AX_MODE_MEAN_PROB ? AXF_M_PROB : 0)
						: j->mode == AX_MODE_MEAN_LOGIT ? AXF_M_LOGIT : AXF_M_HEADS;
			if (!mode)
				continue;
			axp_blk_fields(p, &p->pb[p->npb++], jobs, bi, mode, (uint32_t)slot);
			if (j->mode == AX_MODE_MEAN_PROB)
				slot += (uint64_t)(p->bf[bi + 1] - p->bf[bi]) * j->n_q_heads;
		}
		if (pass == 0)
			p->npa = p->npb, p->nlse = slot;
	}
	if ((r = axp_plan_pass(p, 0, 0, p->npa, 0)) != 0 || (r = axp_plan_pass(p, 1, p->npa, p->npb, p->npa + 1)) != 0)
		return r;
	axp_make_layout(p);
	return 0;
}

/* The tables into the staging buffer h at their layout offsets ([0, lay.up) goes up in one copy). */
static inline void axp_plan_tables(const axp_plan *p, char *h)
{
	memcpy(h + p->lay.blk, p->pb, p->npb * sizeof(axp_blk));
	memcpy(h + p->lay.so, p->so, ((size_t)p->npb + 2) * sizeof(uint32_t));
	memcpy(h + p->lay.mo, p->mo, ((size_t)p->npb + 2) * sizeof(uint32_t));
	memcpy(h + p->lay.qptr, p->qp, p->nrows * sizeof(void *));
}

/* The argument block of pass ps (0: A, 1: B) over device scratch d. */
static inline axp_args axp_plan_args(const axp_plan *p, char *d, int ps)
{
	const axp_layout *y = &p->lay;
	const uint32_t b0 = ps ? p->npa : 0, so0 = ps ? p->npa + 1 : 0;
	axp_args a;
	memset(&a, 0, sizeof a);
	a.blk = (const axp_blk *)(d + y->blk) + b0;
	a.so = (const uint32_t *)(d + y->so) + so0;
	a.mo = (const uint32_t *)(d + y->mo) + so0;
	a.nb = ps ? p->npb - p->npa : p->npa;
	a.smem = p->smem[ps];
	a.qptr = (const void *const *)(d + y->qptr);
	a.rflags = (uint32_t *)(d + y->rflags);
	a.lse = (float *)(d + y->lse);
	a.part_lse = (float *)(d + y->part_lse);
	a.part_s = (float *)(d + y->part_s);
	a.part_p = (int32_t *)(d + y->part_p);
	a.res_lse = (float *)(d + y->res_lse);
	a.res_ent = (axf_ent *)(d + y->res_ent);
	return a;
}

/* Entries of row r of pass-block b: min(top_k, keys the row sees). */
static inline uint32_t axp_kout(const axp_blk *b, uint32_t r)
{
	const uint64_t pos = b->p0 + r, nv = pos + 1 - axp_first_key(pos, b->window);
	return b->K < nv ? b->K : (uint32_t)nv;
}

/* Runs BODY for every result row of result pass-blocks [k0, k1): row r of pass-block b, list l, output row o
 * (of job i), head_id. */
#define AXP_FOR_ROWS(p, jobs, out, k0, k1, BODY)                                                                 \
	for (uint32_t k_ = (k0); k_ < (k1); k_++) {                                                               \
		const axp_blk *b = &(p)->pb[k_];                                                                  \
		if (b->res0 < 0)                                                                                  \
			continue;                                                                                 \
		for (uint32_t r = 0; r < b->R; r++) {                                                             \
			const uint32_t i = (p)->rj[b->row0 + r], nl = b->mode == AXF_M_HEADS ? b->H : 1;          \
			for (uint32_t hh = 0; hh < nl; hh++) {                                                    \
				const uint32_t l = r * nl + hh;                                                   \
				ax_attn_result *o = (out) + (p)->roff[i] + hh;                                    \
				const int32_t head_id = b->mode == AXF_M_HEADS ? (int32_t)((jobs)[i].head_offset + hh) : -1; \
				BODY                                                                              \
			}                                                                                         \
		}                                                                                                 \
	}

/* The template half of result pass-blocks [k0, k1) (axp_plan_prefill_rows; p->empty made). */
static inline void axp_prefill_range(const axp_plan *p, const ax_attn_job *jobs, ax_attn_result *out, uint32_t k0,
				     uint32_t k1)
{
	AXP_FOR_ROWS(p, jobs, out, k0, k1, {
		(void)l;
		memcpy(o, &p->empty, sizeof *o);
		o->head_id = head_id;
		o->k = axp_kout(b, r);
	})
}

/* The result half of result pass-blocks [k0, k1) (axp_plan_finish; codes known). */
static inline void axp_finish_range(const axp_plan *p, const char *h, const ax_attn_job *jobs, ax_attn_result *out,
				    const int *rc, uint32_t k0, uint32_t k1)
{
	const float *lse = (const float *)(h + p->lay.res_lse);
	const axf_ent *ent = (const axf_ent *)(h + p->lay.res_ent);
	AXP_FOR_ROWS(p, jobs, out, k0, k1, {
		(void)head_id;
		if (rc[i] != 0)
			continue;
		const axf_ent *e = ent + b->rent0 + (uint64_t)l * b->K;
		o->lse = (double)lse[b->res0 + l];
		for (uint32_t x = 0; x < o->k; x++) {
			const int ok = e[x].p >= 0;
			o->pos[x] = ok ? (int64_t)(b->lo + (uint64_t)e[x].p) : -1;
			o->logit[x] = ok ? e[x].x : -INFINITY;
		}
	})
}

static inline void axp_make_empty(axp_plan *p)
{
	memset(&p->empty, 0, sizeof p->empty);
	for (uint32_t e = 0; e < AX_ATTN_MAX_TOPK; e++)
		p->empty.pos[e] = -1, p->empty.logit[e] = -INFINITY;
}

/* Each placed job's code from its row's flag word (-ERANGE over -EDOM). */
static inline void axp_codes(const axp_plan *p, const char *h, int *rc)
{
	const uint32_t *fl = (const uint32_t *)(h + p->lay.rflags);
	for (uint32_t r = 0; r < p->nrows; r++) {
		const uint32_t f = fl[r], i = p->rj[r];
		rc[i] = f & AXF_F_RANGE ? -ERANGE : f & AXF_F_DOM ? -EDOM : 0;
	}
}

/*
 * The half of the expansion that does not depend on the results, done while the kernels run (the driver calls it
 * after the launches, before it waits): every result row of every placed job gets its head_id, k, lse 0 and every
 * entry (-1, -inf) (one copy of a 784-byte template each: 100 MB for 4K heads rows of H_q 32). axp_plan_finish then
 * writes only the logsumexp and the first k entries of the rows whose job succeeded.
 */
static inline void axp_plan_prefill_rows(axp_plan *p, const ax_attn_job *jobs, ax_attn_result *out)
{
	axp_make_empty(p);
	axp_prefill_range(p, jobs, out, 0, p->npb);
}

/* From the downloaded results in h (the staging at the layout's offsets; rows prefilled by axp_plan_prefill_rows):
 * each placed job's code and, where 0, its rows' logsumexps and entries. */
static inline void axp_plan_finish(axp_plan *p, const char *h, const ax_attn_job *jobs, ax_attn_result *out, int *rc)
{
	axp_codes(p, h, rc);
	axp_finish_range(p, h, jobs, out, rc, 0, p->npb);
}

/* ---- the expansion on several host threads (large batches: 4K heads rows are 100 MB of ax_attn_result) ---------- */

#define AXP_MAX_THREADS 16
#define AXP_PAR_MIN_ROWS 8192 /* result rows below which one thread does it (thread start-up ~20 µs each) */

/* Split pass-blocks [0, npb) into T ranges of about equal result rows: bounds[0] = 0 .. bounds[T] = npb. */
static inline void axp_split_ranges(const axp_plan *p, uint32_t T, uint32_t *bounds)
{
	uint64_t done = 0;
	uint32_t t = 1;
	bounds[0] = 0;
	for (uint32_t k = 0; k < p->npb && t < T; k++) {
		const axp_blk *b = &p->pb[k];
		done += b->res0 < 0 ? 0 : (uint64_t)b->R * axp_lists_per_row(b);
		while (t < T && done * T >= (uint64_t)t * p->nres)
			bounds[t++] = k + 1;
	}
	while (t <= T)
		bounds[t++] = p->npb;
}

typedef struct axp_par {
	const axp_plan *p;
	const ax_attn_job *jobs;
	ax_attn_result *out;
	const char *h;        /* NULL: the template half; else the result half from this staging */
	const int *rc;
	uint32_t k0, k1;
} axp_par;

static void *axp_par_main(void *x)
{
	const axp_par *a = (const axp_par *)x;
	if (a->h)
		axp_finish_range(a->p, a->h, a->jobs, a->out, a->rc, a->k0, a->k1);
	else
		axp_prefill_range(a->p, a->jobs, a->out, a->k0, a->k1);
	return NULL;
}

/* One half of the expansion (h NULL: the template half; else the result half, codes in rc) on up to `threads`
 * threads (the caller's included; a thread that fails to start leaves its range to the caller). */
static inline void axp_expand_par(const axp_plan *p, const ax_attn_job *jobs, ax_attn_result *out, const char *h,
				  const int *rc, uint32_t threads)
{
	uint32_t T = threads < 1 ? 1 : threads > AXP_MAX_THREADS ? AXP_MAX_THREADS : threads;
	if (p->nres < AXP_PAR_MIN_ROWS)
		T = 1;
	uint32_t bounds[AXP_MAX_THREADS + 1];
	axp_split_ranges(p, T, bounds);
	axp_par a[AXP_MAX_THREADS];
	pthread_t th[AXP_MAX_THREADS];
	int started[AXP_MAX_THREADS] = {0};
	for (uint32_t t = 0; t < T; t++) {
		axp_par x = {p, jobs, out, h, rc, bounds[t], bounds[t + 1]};
		a[t] = x;
		if (t > 0 && bounds[t] < bounds[t + 1])
			started[t] = pthread_create(&th[t], NULL, axp_par_main, &a[t]) == 0;
	}
	axp_par_main(&a[0]);
	for (uint32_t t = 1; t < T; t++) {
		if (started[t])
			pthread_join(th[t], NULL);
		else
			axp_par_main(&a[t]);
	}
}

/* ---- the driver (attn_cuda_prefill.cu) ------------------------------------------------------------------------ */

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ax_attn_prefill ax_attn_prefill;

/*
 * Prefill state for a context on `device` running on `stream` (the caller's cudaStream_t, kept until
 * ax__attn_prefill_free). *out = NULL with 0 when the path is off: AX_ATTN_CUDA_PREFILL=0, a device before sm_90,
 * kernels not built for it, or a failing query. Knobs from AX_PREFILL_ROWS, AX_PREFILL_MIN_ROWS and
 * AX_PREFILL_MIN_KEYS. Returns 0, -EINVAL (out NULL) or -ENOMEM.
 */
int ax__attn_prefill_new(ax_attn_prefill **out, int device, void *stream);
void ax__attn_prefill_free(ax_attn_prefill *pf); /* waits for the stream; accepts NULL */

/*
 * Run a batch: the jobs that group into prefill blocks on the prefill kernels, the others through `rest` (the
 * fast/generic dispatch: attn_cuda.h's ax_attn_cuda_run contract), compacted and scattered back. pf NULL: all
 * through rest. Returns 0 (rc[] tells each job) or a whole-batch -ENOMEM / -EIO.
 */
int ax__attn_prefill_dispatch(ax_attn_prefill *pf, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc,
			      axf_runner rest, void *rctx);

/* The last CUDA error of the path (a cudaError_t), then cleared; 0 when none. */
int ax__attn_prefill_take_error(ax_attn_prefill *pf);

/* Timing for benchmarks: with on, each run records events around its launches; kernel_us = the last run's
 * launches in µs (-1: off or none). Rows placed in blocks by the last run: ax__attn_prefill_last_rows. */
int ax__attn_prefill_timing(ax_attn_prefill *pf, int on);
float ax__attn_prefill_kernel_us(const ax_attn_prefill *pf);
uint32_t ax__attn_prefill_last_rows(const ax_attn_prefill *pf);

/* The prefill state of a context (attn_cuda.cu; NULL when the path is off), for tests and benchmarks. */
struct ax_attn_cuda;
ax_attn_prefill *ax__attn_cuda_prefill_state(struct ax_attn_cuda *c);

#ifdef __cplusplus
}
#endif

#endif
