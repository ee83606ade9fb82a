/*
 * attn_cuda_plan.h — the host half of a CUDA backend run, in plain C (also valid C++): from a batch of jobs to
 * the tables the kernels read, and from the downloaded flags and results back to per-job codes and rows.
 * attn_cuda.cu drives it with real device memory; attn_cuda_logic_test.c drives it with host memory and the
 * emulated CTAs of attn_cuda_logic.h. Internal to capture/.
 *
 * A plan owns growable host tables (kept across runs: a warm context allocates nothing) and describes one run:
 * pass A (mean_logit, heads, mean_prob's logsumexp pass) and pass B (mean_prob's probability pass), each with
 * its pass-jobs, work items grouped into per-instance segments (one split launch each) and merge rows; and a
 * layout of one scratch buffer: [tables: uploaded][flags, results: downloaded][head lse, split states: device
 * only]. Both passes' split states start at the same offset (pass B runs after pass A's merge, their last
 * reader).
 */
#ifndef ATTNX_CAPTURE_ATTN_CUDA_PLAN_H
#define ATTNX_CAPTURE_ATTN_CUDA_PLAN_H

#include <stdlib.h>

#include "attn_cuda_logic.h"

#define AXC_N_INST 40 /* key dtypes (5) × index dtypes (2) × head dims (64, 128, 256, other) */

/* One split launch: work items [begin, begin + count), all of instance inst; Q area and largest head dim. */
typedef struct axc_segment {
	uint32_t inst, begin, count, qcap, dmax;
} axc_segment;

typedef struct axc_pass {
	uint32_t pj0, npj;    /* pass-jobs */
	uint32_t wk0, nwk;    /* work items */
	uint32_t mr0, nmr;    /* merge rows */
	uint64_t states, entries;
	axc_segment seg[AXC_N_INST];
	uint32_t nseg;
} axc_pass;

/* Byte offsets into the scratch buffer; the host staging holds [0, off_dev). */
typedef struct axc_layout {
	size_t jobs, chunks, rh, work, mrows; /* uploaded: [0, up) */
	size_t flags, res;                    /* downloaded: [up, up + down) */
	size_t up, down, off_dev;
	size_t lse, m, s, cnt, val, pos;      /* device only */
	size_t total;
} axc_layout;

typedef struct axc_plan {
	axc_job *pj;
	size_t pj_cap;
	axc_chunk *ch;
	size_t ch_cap;
	int32_t *rh;
	size_t rh_cap;
	axc_work *wk;
	size_t wk_cap;
	axc_mrow *mr;
	size_t mr_cap;
	uint32_t *roff;       /* [n] first output row of each job */
	size_t roff_cap;
	uint32_t npj, nch, nrh, nwk, nmr, nlse, n;
	uint64_t rows;        /* output rows of the batch */
	axc_pass A, B;
	axc_layout L;
	int32_t out_row[4096], mark[4096]; /* axc_rows scratch (H_q ≤ 4096) */
} axc_plan;

static inline void axc_plan_free(axc_plan *p)
{
	if (!p)
		return;
	free(p->pj);
	free(p->ch);
	free(p->rh);
	free(p->wk);
	free(p->mr);
	free(p->roff);
	free(p);
}

/* Make *ptr hold n elements of size esz (contents kept). */
static inline int axc_grow(void **ptr, size_t *cap, size_t n, size_t esz)
{
	if (n <= *cap)
		return 0;
	size_t c = *cap ? *cap : 64;
	while (c < n)
		c *= 2;
	void *q = realloc(*ptr, c * esz);
	if (!q)
		return -ENOMEM;
	*ptr = q;
	*cap = c;
	return 0;
}

/* Instance of a pass-job (key dtype, index dtype, head-dim class): the order of attn_cuda.cu's kernel table. */
static inline uint32_t axc_inst(const axc_job *jb)
{
	uint32_t dc = jb->D == 64 ? 0 : jb->D == 128 ? 1 : jb->D == 256 ? 2 : 3;
	return (jb->kdt - AX_DTYPE_F32) * 8 + (jb->idt == AX_DTYPE_I64 ? 4 : 0) + dc;
}

static inline void axc_set_mrow(axc_mrow *m, uint32_t job, uint32_t row, uint64_t out, int32_t head_id)
{
	m->job = job;
	m->row = row;
	m->out = (int32_t)out;
	m->head_id = head_id;
}

/* The fields of a pass-job that come straight from its user job. */
static inline void axc_job_fields(axc_job *jb, const ax_attn_job *job, uint32_t i)
{
	int fp8 = job->k_dtype == AX_DTYPE_FP8_E4M3 || job->k_dtype == AX_DTYPE_FP8_E5M2;
	uint64_t kes = axc_esize(job->k_dtype);
	memset(jb, 0, sizeof *jb);
	jb->q = job->q, jb->k = job->k, jb->index = job->index;
	jb->s0 = job->k_stride[0], jb->s1 = job->k_stride[1], jb->n_slots = job->n_slots;
	axc_visible(job, &jb->start, &jb->n);
	jb->H = job->n_q_heads, jb->Hkv = job->n_kv_heads, jb->G = jb->H / jb->Hkv, jb->D = job->head_dim;
	jb->qdt = job->q_dtype, jb->kdt = job->k_dtype, jb->idt = job->index_dtype;
	jb->mode = job->mode == AX_MODE_MEAN_LOGIT ? AXC_PJ_LOGIT
		   : job->mode == AX_MODE_HEADS    ? AXC_PJ_HEADS
						   : AXC_PJ_LSE;
	jb->K = jb->mode == AXC_PJ_LSE ? 0 : job->top_k;
	jb->flag = i;
	if (job->index_kind == AX_ATTN_INDEX_PAGED) /* block ids are checked against n_blocks */
		jb->bs = job->block_size, jb->sb = job->k_block_stride, jb->n_slots = job->n_blocks;
	jb->vec = (uintptr_t)job->k % 16 == 0 && jb->s0 * kes % 16 == 0 && (jb->Hkv == 1 || jb->s1 * kes % 16 == 0) &&
		  jb->D * kes % 16 == 0 && (jb->bs == 0 || jb->sb * kes % 16 == 0);
	jb->w = (float)((double)job->scale * (fp8 ? job->k_scale : 1.0));
	jb->cap = job->logit_cap;
}

/* Append valid job i's pass-A pass-job with its rows, chunks and merge rows. */
static inline int axc_add_pass_a(axc_plan *p, const ax_attn_job *job, uint32_t i)
{
	uint32_t H = job->n_q_heads, rows = axc_out_rows(job);
	if (axc_grow((void **)&p->pj, &p->pj_cap, p->npj + 1, sizeof *p->pj) ||
	    axc_grow((void **)&p->rh, &p->rh_cap, p->nrh + H, sizeof *p->rh) ||
	    axc_grow((void **)&p->ch, &p->ch_cap, p->nch + H, sizeof *p->ch) ||
	    axc_grow((void **)&p->mr, &p->mr_cap, p->nmr + (rows > H ? rows : H), sizeof *p->mr))
		return -ENOMEM;
	axc_job *jb = &p->pj[p->npj];
	axc_job_fields(jb, job, i);
	jb->row0 = p->nrh;
	jb->R = axc_rows(job, p->rh + p->nrh, p->out_row, p->mark);
	jb->collapsed = jb->mode == AXC_PJ_LOGIT && jb->cap == 0;
	if (jb->collapsed) { /* one row per KV head, named by its group's first head */
		jb->R = jb->Hkv;
		for (uint32_t g = 0; g < jb->Hkv; g++)
			p->rh[p->nrh + g] = (int32_t)(g * jb->G);
	}
	jb->chunk0 = p->nch;
	jb->n_chunks = axc_chunks(p->rh + p->nrh, jb->R, jb->G, p->ch + p->nch);
	jb->q_all = (uint64_t)jb->R * jb->D <= AXC_QCAP;
	axc_mrow *m = p->mr + p->nmr;
	if (jb->mode == AXC_PJ_LSE) {
		jb->lse0 = p->nlse;
		for (uint32_t r = 0; r < H; r++)
			axc_set_mrow(&m[r], p->npj, r, p->nlse + r, -1);
		p->nlse += H, p->nmr += H;
	} else if (jb->mode == AXC_PJ_HEADS) {
		for (uint32_t o = 0; o < rows; o++) {
			uint32_t r = (uint32_t)p->out_row[o];
			axc_set_mrow(&m[o], p->npj, r, (uint64_t)p->roff[i] + o,
				     (int32_t)(job->head_offset + (uint32_t)p->rh[p->nrh + r]));
		}
		p->nmr += rows;
	} else {
		axc_set_mrow(&m[0], p->npj, 0, p->roff[i], -1);
		p->nmr += 1;
	}
	p->nrh += jb->R, p->nch += jb->n_chunks, p->npj += 1;
	return 0;
}

/* Pass B: the probability pass of each mean_prob job of pass A (same rows and chunks, its lse table). */
static inline int axc_add_pass_b(axc_plan *p, const ax_attn_job *jobs)
{
	for (uint32_t a = p->A.pj0; a < p->A.pj0 + p->A.npj; a++) {
		if (p->pj[a].mode != AXC_PJ_LSE)
			continue;
		if (axc_grow((void **)&p->pj, &p->pj_cap, p->npj + 1, sizeof *p->pj) ||
		    axc_grow((void **)&p->mr, &p->mr_cap, p->nmr + 1, sizeof *p->mr))
			return -ENOMEM;
		axc_job *jb = &p->pj[p->npj];
		*jb = p->pj[a];
		jb->mode = AXC_PJ_PROB;
		jb->K = jobs[jb->flag].top_k;
		axc_set_mrow(&p->mr[p->nmr], p->npj, 0, p->roff[jb->flag], -1);
		p->npj += 1, p->nmr += 1;
	}
	return 0;
}

/* Split plan of a pass (split length, states, entries) and its work items grouped into segments. */
static inline int axc_plan_pass(axc_plan *p, axc_pass *P, uint32_t target)
{
	uint64_t total = 0, longest = 0, sbase = 0, ebase = 0;
	for (uint32_t j = P->pj0; j < P->pj0 + P->npj; j++) {
		total += p->pj[j].n;
		longest = p->pj[j].n > longest ? p->pj[j].n : longest;
	}
	uint64_t L = axc_split_len(total, longest, target);
	for (uint32_t j = P->pj0; j < P->pj0 + P->npj; j++) {
		axc_job *jb = &p->pj[j];
		jb->split_len = L;
		jb->n_splits = axc_n_splits(jb->n, L);
		jb->state0 = sbase;
		jb->ent0 = ebase;
		sbase += (uint64_t)jb->n_splits * axc_srows(jb);
		ebase += (uint64_t)jb->n_splits * axc_srows(jb) * jb->K;
	}
	P->states = sbase, P->entries = ebase, P->wk0 = p->nwk, P->nseg = 0;
	for (uint32_t inst = 0; inst < AXC_N_INST; inst++) {
		axc_segment sg = {inst, p->nwk, 0, 0, 0};
		for (uint32_t j = P->pj0; j < P->pj0 + P->npj; j++) {
			const axc_job *jb = &p->pj[j];
			if (axc_inst(jb) != inst)
				continue;
			if (axc_grow((void **)&p->wk, &p->wk_cap, (size_t)p->nwk + jb->n_splits, sizeof *p->wk))
				return -ENOMEM;
			for (uint32_t s = 0; s < jb->n_splits; s++) {
				p->wk[p->nwk].job = j;
				p->wk[p->nwk++].split = s;
			}
			uint32_t q = jb->q_all ? jb->R * jb->D : AXC_CHUNK * jb->D;
			sg.qcap = q > sg.qcap ? q : sg.qcap;
			sg.dmax = jb->D > sg.dmax ? jb->D : sg.dmax;
		}
		sg.count = p->nwk - sg.begin;
		if (sg.count)
			P->seg[P->nseg++] = sg;
	}
	P->nwk = p->nwk - P->wk0;
	return 0;
}

static inline size_t axc_al(size_t x)
{
	return (x + 255) & ~(size_t)255;
}

static inline void axc_make_layout(axc_plan *p)
{
	axc_layout *L = &p->L;
	uint64_t states = p->A.states > p->B.states ? p->A.states : p->B.states;
	uint64_t entries = p->A.entries > p->B.entries ? p->A.entries : p->B.entries;
	size_t o = 0;
	L->jobs = o, o += axc_al(p->npj * sizeof(axc_job));
	L->chunks = o, o += axc_al(p->nch * sizeof(axc_chunk));
	L->rh = o, o += axc_al(p->nrh * sizeof(int32_t));
	L->work = o, o += axc_al(p->nwk * sizeof(axc_work));
	L->mrows = o, o += axc_al(p->nmr * sizeof(axc_mrow));
	L->up = o;
	L->flags = o, o += axc_al(p->n * sizeof(uint32_t));
	L->res = o, o += axc_al(p->rows * sizeof(ax_attn_result));
	L->down = o - L->up;
	L->off_dev = o;
	L->lse = o, o += axc_al(p->nlse * sizeof(float));
	L->m = o, o += axc_al(states * sizeof(float));
	L->s = o, o += axc_al(states * sizeof(float));
	L->cnt = o, o += axc_al(states * sizeof(uint32_t));
	L->val = o, o += axc_al(entries * sizeof(float));
	L->pos = o, o += axc_al(entries * sizeof(int64_t));
	L->total = o;
}

/*
 * Plan a run of n jobs: rc[i] = host validation of job i (0, -EINVAL, -EOPNOTSUPP), output row offsets, both
 * passes, about `target` split CTAs per pass, the layout. Returns 0 or -ENOMEM (tables, or more than 2^31
 * output rows). p->A.npj == 0 means nothing to launch.
 */
static inline int axc_plan_build(axc_plan *p, const ax_attn_job *jobs, uint32_t n, int *rc, uint32_t target)
{
	int r;
	if (axc_grow((void **)&p->roff, &p->roff_cap, n, sizeof *p->roff))
		return -ENOMEM;
	p->n = n;
	p->rows = 0;
	for (uint32_t i = 0; i < n; i++) {
		p->roff[i] = (uint32_t)p->rows;
		p->rows += axc_out_rows(&jobs[i]);
		rc[i] = axc_check_job(&jobs[i]);
	}
	if (p->rows > INT32_MAX)
		return -ENOMEM;
	p->npj = p->nch = p->nrh = p->nwk = p->nmr = p->nlse = 0;
	memset(&p->A, 0, sizeof p->A);
	memset(&p->B, 0, sizeof p->B);
	for (uint32_t i = 0; i < n; i++)
		if (rc[i] == 0 && (r = axc_add_pass_a(p, &jobs[i], i)) != 0)
			return r;
	p->A.npj = p->npj, p->A.nmr = p->nmr;
	p->B.pj0 = p->npj, p->B.mr0 = p->nmr;
	if ((r = axc_add_pass_b(p, jobs)) != 0)
		return r;
	p->B.npj = p->npj - p->B.pj0, p->B.nmr = p->nmr - p->B.mr0;
	if ((r = axc_plan_pass(p, &p->A, target)) != 0 || (r = axc_plan_pass(p, &p->B, target)) != 0)
		return r;
	axc_make_layout(p);
	return 0;
}

/* 1 if a job of the batch reads keys through a block table (the fast path reads token index rows only, so
 * ax_attn_cuda_run sends such a batch to the generic path whole). */
static inline int axc_any_paged(const ax_attn_job *jobs, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		if (jobs[i].index_kind != AX_ATTN_INDEX_TOKEN)
			return 1;
	return 0;
}

/* The tables into the staging buffer h (which holds at least L.off_dev bytes), at their layout offsets. */
static inline void axc_plan_tables(const axc_plan *p, char *h)
{
	memcpy(h + p->L.jobs, p->pj, p->npj * sizeof(axc_job));
	memcpy(h + p->L.chunks, p->ch, p->nch * sizeof(axc_chunk));
	memcpy(h + p->L.rh, p->rh, p->nrh * sizeof(int32_t));
	memcpy(h + p->L.work, p->wk, p->nwk * sizeof(axc_work));
	memcpy(h + p->L.mrows, p->mr, p->nmr * sizeof(axc_mrow));
}

/* The kernels' argument block of pass P over scratch buffer d (qcap and work are set per split launch). */
static inline axc_args axc_plan_args(const axc_plan *p, char *d, const axc_pass *P)
{
	const axc_layout *L = &p->L;
	axc_args a;
	memset(&a, 0, sizeof a);
	a.jobs = (const axc_job *)(d + L->jobs);
	a.chunks = (const axc_chunk *)(d + L->chunks);
	a.row_head = (const int32_t *)(d + L->rh);
	a.work = (const axc_work *)(d + L->work) + P->wk0;
	a.mrows = (const axc_mrow *)(d + L->mrows) + P->mr0;
	a.st.m = (float *)(d + L->m);
	a.st.s = (float *)(d + L->s);
	a.st.cnt = (uint32_t *)(d + L->cnt);
	a.st.val = (float *)(d + L->val);
	a.st.pos = (int64_t *)(d + L->pos);
	a.lse = (float *)(d + L->lse);
	a.flags = (uint32_t *)(d + L->flags);
	a.res = (ax_attn_result *)(d + L->res);
	return a;
}

/* The argument block of split launch sg of pass P. */
static inline axc_args axc_plan_seg_args(const axc_plan *p, char *d, const axc_pass *P, const axc_segment *sg)
{
	axc_args a = axc_plan_args(p, d, P);
	a.work = (const axc_work *)(d + p->L.work) + sg->begin;
	a.qcap = sg->qcap;
	return a;
}

/* From the downloaded part of the staging buffer h: each launched job's code (-ERANGE wins over -EDOM, as in
 * attn_cpu, which checks the index first) and, where 0, its rows copied to out. */
static inline void axc_plan_finish(const axc_plan *p, const char *h, const ax_attn_job *jobs, ax_attn_result *out,
				   int *rc)
{
	const uint32_t *flags = (const uint32_t *)(h + p->L.flags);
	const ax_attn_result *res = (const ax_attn_result *)(h + p->L.res);
	for (uint32_t i = 0; i < p->n; i++) {
		if (rc[i] != 0)
			continue;
		rc[i] = flags[i] & AXC_F_RANGE ? -ERANGE : flags[i] & AXC_F_DOM ? -EDOM : 0;
		if (rc[i] == 0)
			memcpy(out + p->roff[i], res + p->roff[i], axc_out_rows(&jobs[i]) * sizeof *out);
	}
}

#endif
