/*
 * attn_cuda_prefill_testdata.h — inputs of the prefill path's tests (the emulator test and the GPU test): one
 * "layer" of a prompt = a K pool [slots, H_kv, 128] (bf16 or f16, random in [-1, 1], never all zeros), a
 * shuffled index row of P positions, and `rows` query rows for positions P - rows .. P - 1, each its own job.
 * Index entries before the block's first visible key are out-of-pool garbage (never read). Q rows are a shared
 * random base plus per-row noise, and three keys inside the rows' range are planted with the sign of the group's
 * mean query (strengths 2, 1.5, 1), so rows that see them rank them first; `tie` plants an exact byte copy of the
 * strongest at another position; `flat` makes every key a copy of one before planting (ties everywhere: lists
 * full of equal values that later, stronger keys must evict from the highest position down). Plain C, also valid C++; test code only (fails fast on malloc failure). Checks
 * use attn_cuda_testdata.h's float64 reference (td_ref, td_check) per row.
 */
#ifndef ATTNX_CAPTURE_ATTN_CUDA_PREFILL_TESTDATA_H
#define ATTNX_CAPTURE_ATTN_CUDA_PREFILL_TESTDATA_H

#include "attn_cuda_testdata.h"

typedef struct pcase {
	const char *name;
	uint32_t mode, dt, idt;  /* enum ax_mode, key = query dtype (bf16 / f16), index dtype */
	uint32_t H, Hkv, top_k;
	uint64_t P;              /* keys of the last row = P (its position P - 1) */
	uint32_t rows;           /* query rows: positions P - rows .. P - 1 */
	int32_t window;
	int tie;
	int flat;                /* 1: every key a byte copy of one key (all scores of a row tie) before planting */
} pcase;

typedef struct pdata {
	void *q, *k, *index;     /* host inputs: q [rows][H][128], k [slots][H_kv][128], index [P] */
	size_t qbytes, kbytes, ibytes;
	uint64_t slots;
	uint32_t rows;
	ax_attn_job *jobs;       /* [rows], pointers into the host buffers */
} pdata;

static void pd_make(const pcase *c, pdata *t)
{
	enum { D = 128 };
	memset(t, 0, sizeof *t);
	const uint32_t G = c->H / c->Hkv;
	const uint64_t P = c->P, slots = P + P / 3 + 7, s0 = (uint64_t)c->Hkv * D;
	const uint64_t p_first = P - c->rows;
	const uint64_t lo = c->window > 0 && p_first + 1 > (uint64_t)c->window ? p_first + 1 - (uint64_t)c->window : 0;
	t->slots = slots, t->rows = c->rows;
	t->qbytes = (size_t)c->rows * c->H * D * 2, t->kbytes = (size_t)slots * s0 * 2;
	t->ibytes = (size_t)P * td_esize(c->idt);
	t->q = td_alloc(t->qbytes), t->k = td_alloc(t->kbytes), t->index = td_alloc(t->ibytes);
	float *base = (float *)td_alloc((size_t)c->H * D * sizeof(float));
	for (uint32_t i = 0; i < c->H * D; i++)
		base[i] = (float)td_uni();
	for (uint32_t r = 0; r < c->rows; r++)
		for (uint32_t i = 0; i < c->H * D; i++)
			td_enc(t->q, c->dt, (uint64_t)r * c->H * D + i, base[i] + 0.5f * (float)td_uni());
	for (uint64_t i = 0; i < slots * s0; i++)
		td_rand(t->k, c->dt, i);
	for (uint64_t sl = 1; c->flat && sl < slots; sl++)
		memcpy((char *)t->k + sl * s0 * 2, t->k, s0 * 2);
	uint64_t *perm = (uint64_t *)td_alloc(slots * sizeof *perm);
	for (uint64_t s = 0; s < slots; s++)
		perm[s] = s;
	for (uint64_t s = slots - 1; s > 0; s--) {
		uint64_t r = td_u64() % (s + 1), x = perm[s];
		perm[s] = perm[r], perm[r] = x;
	}
	for (uint64_t j = 0; j < P; j++) {
		int64_t v = j >= lo ? (int64_t)perm[j] : (j % 2 ? -3 : (int64_t)slots + 11);
		if (c->idt == AX_DTYPE_I32)
			((int32_t *)t->index)[j] = (int32_t)v;
		else
			((int64_t *)t->index)[j] = v;
	}
	static const float str[3] = {2.0f, 1.5f, 1.0f};
	const uint64_t vis = P - lo;
	uint64_t first = 0;
	for (int p = 0; p < 3; p++) {
		const uint64_t j = lo + td_u64() % vis, slot = perm[j];
		if (p == 0)
			first = j;
		for (uint32_t g = 0; g < c->Hkv; g++)
			for (uint32_t d = 0; d < D; d++) {
				double m = 0;
				for (uint32_t h = g * G; h < (g + 1) * G; h++)
					m += base[h * D + d];
				td_enc(t->k, c->dt, slot * s0 + g * D + d, m >= 0 ? str[p] : -str[p]);
			}
	}
	if (c->tie && vis >= 2) { /* a byte copy of the strongest at another position (may overwrite a weaker one) */
		uint64_t j2 = lo + td_u64() % vis;
		while (j2 == first)
			j2 = lo + td_u64() % vis;
		memcpy((char *)t->k + perm[j2] * s0 * 2, (char *)t->k + perm[first] * s0 * 2, s0 * 2);
	}
	free(perm);
	free(base);
	t->jobs = (ax_attn_job *)td_alloc(c->rows * sizeof *t->jobs);
	for (uint32_t r = 0; r < c->rows; r++) {
		ax_attn_job *jb = &t->jobs[r];
		memset(jb, 0, sizeof *jb);
		jb->q = (const char *)t->q + (size_t)r * c->H * D * 2, jb->q_dtype = c->dt;
		jb->k = t->k, jb->k_dtype = c->dt, jb->k_scale = 1.0f;
		jb->k_stride[0] = s0, jb->k_stride[1] = D, jb->k_stride[2] = 1;
		jb->n_slots = slots;
		jb->index = t->index, jb->index_dtype = c->idt;
		jb->position = p_first + r;
		jb->window = c->window;
		jb->n_q_heads = c->H, jb->n_kv_heads = c->Hkv, jb->head_dim = D;
		jb->head_offset = 100;
		jb->scale = (float)(1.0 / sqrt((double)D));
		jb->mode = c->mode;
		jb->top_k = c->top_k;
	}
}

static void pd_free(pdata *t)
{
	free(t->q);
	free(t->k);
	free(t->index);
	free(t->jobs);
	memset(t, 0, sizeof *t);
}

/* Point the jobs (and their Q rows, copied at the same offsets) at device copies: q, k, index device bases. */
static void pd_rebase(pdata *t, void *q, void *k, void *index)
{
	for (uint32_t r = 0; r < t->rows; r++) {
		ax_attn_job *jb = &t->jobs[r];
		jb->q = (char *)q + ((const char *)jb->q - (const char *)t->q);
		jb->k = k;
		jb->index = index;
	}
}

/* Rows of job `jb`'s result (got) against the float64 reference; 0 or -1 with why. */
static int pd_check_row(const ax_attn_job *jb, const ax_attn_result *got, int *near, char *why, size_t len)
{
	tref ref;
	td_ref(jb, &ref);
	int r = td_check(&ref, jb->top_k, got, 1e-3, near, why, len);
	td_ref_free(&ref);
	return r;
}

/* Two results of the same job agree: k, head ids, positions (or a near tie: values within 1e-5·max(1, |v|)),
 * logits within tol, logsumexp within tol. */
static int pd_same(const ax_attn_result *a, const ax_attn_result *b, uint32_t rows, double tol, char *why, size_t len)
{
	for (uint32_t i = 0; i < rows; i++) {
		if (a[i].k != b[i].k || a[i].head_id != b[i].head_id)
			return td_fail(why, len, "row %u: k %u/%u head %d/%d", i, a[i].k, b[i].k, a[i].head_id,
				       b[i].head_id);
		if (!(fabs(a[i].lse - b[i].lse) <= tol))
			return td_fail(why, len, "row %u: lse %.9g vs %.9g", i, a[i].lse, b[i].lse);
		for (uint32_t e = 0; e < a[i].k; e++) {
			if (!(fabs((double)a[i].logit[e] - b[i].logit[e]) <= tol))
				return td_fail(why, len, "row %u entry %u: logit %.9g vs %.9g", i, e, a[i].logit[e],
					       b[i].logit[e]);
			if (a[i].pos[e] != b[i].pos[e] &&
			    !(fabs((double)a[i].logit[e] - b[i].logit[e]) <= 1e-5 * fmax(1.0, fabs(a[i].logit[e]))))
				return td_fail(why, len, "row %u entry %u: position %lld vs %lld", i, e,
					       (long long)a[i].pos[e], (long long)b[i].pos[e]);
		}
	}
	return 0;
}

#endif
