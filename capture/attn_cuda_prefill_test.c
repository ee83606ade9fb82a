/*
 * attn_cuda_prefill_test.c — the prefill path's host half (attn_cuda_prefill.h) on the CPU: grouping of a batch into
 * blocks (a table of batches: chains, caps, gaps, duplicates, every parameter that must match, jobs the path must
 * never take, the daemon's interleaved order), plan invariants over random batches (every placed job in exactly one
 * block row, splits covering each block's keys in multiples of 16, split and list prefixes, logsumexp slots shared by
 * mean_prob's two passes, the layout), and the finish (row flags to codes, -ERANGE over -EDOM; compact entries to
 * ax_attn_result rows: positions lo + offset, head ids, k = min(top_k, visible keys), padding past k). No GPU.
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

#include <cmocka.h>

#include "attn_cuda_prefill.h"

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

static _Alignas(16) uint16_t g_q[64][64 * 128];
static _Alignas(16) uint16_t g_k[2][16];
static int32_t g_index[2][8];

/* An eligible job of "request" req (its own pool and index row) at position pos. */
static ax_attn_job job(int req, uint64_t pos, uint32_t mode, uint32_t H)
{
	ax_attn_job j;
	memset(&j, 0, sizeof j);
	j.q = g_q[pos % 64], j.q_dtype = AX_DTYPE_BF16;
	j.k = g_k[req], j.k_dtype = AX_DTYPE_BF16, j.k_scale = 1;
	j.k_stride[0] = 8 * 128, j.k_stride[1] = 128, j.k_stride[2] = 1;
	j.n_slots = 1u << 20;
	j.index = g_index[req], j.index_dtype = AX_DTYPE_I32;
	j.position = pos;
	j.n_q_heads = H, j.n_kv_heads = 8, j.head_dim = 128;
	j.scale = 0.088f;
	j.mode = mode;
	j.top_k = 10;
	return j;
}

/* Changes applied to one job of a batch. */
enum { M_NONE, M_MODE, M_TOPK, M_SCALE, M_WINDOW, M_OFFSET, M_SLOTS, M_IDT, M_STRIDE, M_F32, M_PAGED, M_LIST,
       M_QDT, M_CAP };

static void mutate(ax_attn_job *j, int m)
{
	static const int32_t heads[2] = {0, 1};
	switch (m) {
	case M_MODE: j->mode = AX_MODE_MEAN_PROB; break;
	case M_TOPK: j->top_k = 11; break;
	case M_SCALE: j->scale = 0.089f; break;
	case M_WINDOW: j->window = 1000; break;
	case M_OFFSET: j->head_offset = 8; break;
	case M_SLOTS: j->n_slots -= 1; break;
	case M_IDT: j->index_dtype = AX_DTYPE_I64; break;
	case M_STRIDE: j->k_stride[0] = 16 * 128; break;
	case M_F32: j->k_dtype = j->q_dtype = AX_DTYPE_F32; break;
	case M_PAGED: j->index_kind = AX_ATTN_INDEX_PAGED, j->block_size = 16, j->n_blocks = 100, j->n_slots = 0; break;
	case M_LIST: j->mode = AX_MODE_HEADS, j->heads = heads, j->n_heads = 2; break;
	case M_QDT: j->q_dtype = AX_DTYPE_F16; break;
	case M_CAP: j->logit_cap = 30; break;
	}
}

struct gcase {
	const char *name;
	uint32_t n;            /* jobs: request req[i] at position pos[i] */
	int req[20];
	uint64_t pos[20];
	uint32_t H, rows_cap;
	int mut_at, mut;       /* job mut_at gets mutation mut (M_NONE: none) */
	const char *want;      /* blocks as job lists: "0 1 2|3 4" ('-' = nothing placed) */
	uint32_t min_rows;     /* the planner's min_rows knob (0: any block) */
	uint32_t mode;         /* the jobs' mode (0: mean_logit) */
};

static const struct gcase g_group[] = {
	{"chain of 9, cap 8: 5 + 4", 9, {0}, {10, 11, 12, 13, 14, 15, 16, 17, 18}, 32, 8, 0, M_NONE, "0 1 2 3 4|5 6 7 8", 0, 0},
	{"one row: not placed", 1, {0}, {5}, 32, 16, 0, M_NONE, "-", 0, 0},
	{"two requests interleaved", 6, {0, 1, 0, 1, 0, 1}, {3, 3, 4, 4, 5, 5}, 32, 16, 0, M_NONE, "0 2 4|1 3 5", 0, 0},
	{"a gap", 5, {0}, {1, 2, 4, 5, 6}, 32, 16, 0, M_NONE, "0 1|2 3 4", 0, 0},
	{"descending order", 4, {0}, {9, 8, 7, 6}, 32, 16, 0, M_NONE, "3 2 1 0", 0, 0},
	{"duplicate position", 4, {0}, {1, 2, 2, 3}, 32, 16, 0, M_NONE, "0 1 3", 0, 0},
	/* the first of two jobs at one position not eligible: the second (eligible) chains (axp_insert, session 13) */
	{"duplicate position, the first not eligible", 4, {0}, {1, 2, 2, 3}, 32, 16, 1, M_F32, "0 2 3", 0, 0},
	{"duplicate position, the second not eligible", 4, {0}, {1, 2, 2, 3}, 32, 16, 2, M_F32, "0 1 3", 0, 0},
	{"H 64: 4 rows a block", 10, {0}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, 64, 64, 0, M_NONE, "0 1 2 3|4 5 6|7 8 9", 0, 0},
	{"H 8: cap 16", 5, {0}, {0, 1, 2, 3, 4}, 8, 16, 0, M_NONE, "0 1 2 3 4", 0, 0},
	{"H 8: 16 rows a block at most", 20, {0}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19}, 8, 64,
	 0, M_NONE, "0 1 2 3 4 5 6 7 8 9|10 11 12 13 14 15 16 17 18 19", 0, 0},
	{"mode differs", 5, {0}, {0, 1, 2, 3, 4}, 32, 16, 2, M_MODE, "0 1|3 4", 0, 0},
	{"top_k differs", 5, {0}, {0, 1, 2, 3, 4}, 32, 16, 2, M_TOPK, "0 1|3 4", 0, 0},
	{"scale differs", 5, {0}, {0, 1, 2, 3, 4}, 32, 16, 2, M_SCALE, "0 1|3 4", 0, 0},
	{"window differs", 5, {0}, {0, 1, 2, 3, 4}, 32, 16, 2, M_WINDOW, "0 1|3 4", 0, 0},
	{"head offset differs", 5, {0}, {0, 1, 2, 3, 4}, 32, 16, 2, M_OFFSET, "0 1|3 4", 0, 0},
	{"n_slots differs", 5, {0}, {0, 1, 2, 3, 4}, 32, 16, 2, M_SLOTS, "0 1|3 4", 0, 0},
	{"index dtype differs", 5, {0}, {0, 1, 2, 3, 4}, 32, 16, 2, M_IDT, "0 1|3 4", 0, 0},
	{"slot stride differs", 5, {0}, {0, 1, 2, 3, 4}, 32, 16, 2, M_STRIDE, "0 1|3 4", 0, 0},
	{"f32 (not the fast shapes)", 5, {0}, {0, 1, 2, 3, 4}, 32, 16, 2, M_F32, "0 1|3 4", 0, 0},
	{"paged", 5, {0}, {0, 1, 2, 3, 4}, 32, 16, 2, M_PAGED, "0 1|3 4", 0, 0},
	{"heads list", 5, {0}, {0, 1, 2, 3, 4}, 32, 16, 2, M_LIST, "0 1|3 4", 0, 0},
	{"Q dtype differs (not eligible)", 5, {0}, {0, 1, 2, 3, 4}, 32, 16, 2, M_QDT, "0 1|3 4", 0, 0},
	{"logit cap", 5, {0}, {0, 1, 2, 3, 4}, 32, 16, 2, M_CAP, "0 1|3 4", 0, 0},
	{"last row differs", 3, {0}, {0, 1, 2}, 32, 16, 2, M_TOPK, "0 1", 0, 0},
	/* min_rows (AX_PREFILL_MIN_ROWS, default 8): blocks that small stay on the decode path */
	{"min 8, chain of 16, cap 8: 8 + 8", 16, {0}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, 32, 16, 0,
	 M_NONE, "0 1 2 3 4 5 6 7|8 9 10 11 12 13 14 15", 8, 0},
	{"min 8, chain of 9, cap 8: one full block, row 8 left", 9, {0}, {10, 11, 12, 13, 14, 15, 16, 17, 18}, 32, 8, 0,
	 M_NONE, "0 1 2 3 4 5 6 7", 8, 0},
	{"min 8, chain of 20: 8 + 8, 4 left", 20, {0}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19},
	 32, 16, 0, M_NONE, "0 1 2 3 4 5 6 7|8 9 10 11 12 13 14 15", 8, 0},
	{"min 8, chain of 7: left", 7, {0}, {0, 1, 2, 3, 4, 5, 6}, 32, 16, 0, M_NONE, "-", 8, 0},
	{"min 8, H 64 (cap 4): left", 10, {0}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, 64, 64, 0, M_NONE, "-", 8, 0},
	{"min 8, H 64 mean_prob: left", 10, {0}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, 64, 64, 0, M_NONE, "-", 8,
	 AX_MODE_MEAN_PROB},
	{"min 8, H 64 heads (not gated): 4 + 3 + 3", 10, {0}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, 64, 64, 0, M_NONE,
	 "0 1 2 3|4 5 6|7 8 9", 8, AX_MODE_HEADS},
	{"min 8, heads chain of 5 (not gated)", 5, {0}, {0, 1, 2, 3, 4}, 32, 16, 0, M_NONE, "0 1 2 3 4", 8, AX_MODE_HEADS},
	{"min 8, H 8, chain of 20: 10 + 10", 20, {0}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19},
	 8, 64, 0, M_NONE, "0 1 2 3 4 5 6 7 8 9|10 11 12 13 14 15 16 17 18 19", 8, 0},
	{"min 3, chain of 5, cap 4: 3 + 2 would be small: 4, row 4 left", 5, {0}, {0, 1, 2, 3, 4}, 32, 4, 0, M_NONE,
	 "0 1 2 3", 3, 0},
};

/* The blocks as text, in the plan's order. */
static void blocks_text(const axp_plan *p, char *buf, size_t len)
{
	size_t o = 0;
	buf[0] = 0;
	if (p->nblocks == 0) {
		snprintf(buf, len, "-");
		return;
	}
	for (uint32_t b = 0; b < p->nblocks; b++)
		for (uint32_t r = p->bf[b]; r < p->bf[b + 1]; r++)
			o += (size_t)snprintf(buf + o, len - o, "%s%u", r == p->bf[b] ? (b ? "|" : "") : " ", p->rj[r]);
}

static void test_grouping(void **state)
{
	(void)state;
	for (size_t c = 0; c < ARRAY_LEN(g_group); c++) {
		const struct gcase *g = &g_group[c];
		ax_attn_job jobs[20];
		for (uint32_t i = 0; i < g->n; i++)
			jobs[i] = job(g->req[i], g->pos[i], g->mode ? g->mode : AX_MODE_MEAN_LOGIT, g->H);
		mutate(&jobs[g->mut_at], g->mut);
		axp_plan *p = calloc(1, sizeof *p);
		assert_non_null(p);
		p->kn.rows = g->rows_cap, p->kn.min_rows = g->min_rows;
		assert_int_equal(axp_group(p, jobs, g->n), 0);
		char got[128];
		blocks_text(p, got, sizeof got);
		if (strcmp(got, g->want) != 0)
			fail_msg("%s: blocks \"%s\", want \"%s\"", g->name, got, g->want);
		for (uint32_t i = 0; i < g->n; i++) { /* in[] agrees with the blocks */
			int seen = 0;
			for (uint32_t r = 0; r < p->nrows; r++)
				seen += p->rj[r] == i;
			assert_int_equal(seen, p->in[i]);
		}
		axp_plan_free(p);
	}
}

static uint64_t g_rand = 88172645463325252ull;
static uint32_t rnd(uint32_t n)
{
	g_rand ^= g_rand << 13, g_rand ^= g_rand >> 7, g_rand ^= g_rand << 17;
	return (uint32_t)(g_rand % n);
}

/* Random batches: prompts of random length/rows/modes/windows, some singles, shuffled. */
static void test_plan_invariants(void **state)
{
	(void)state;
	static const uint32_t modes[3] = {AX_MODE_MEAN_LOGIT, AX_MODE_MEAN_PROB, AX_MODE_HEADS};
	for (int it = 0; it < 200; it++) {
		ax_attn_job jobs[200];
		uint32_t n = 0;
		const int nreq = 1 + (int)rnd(2);
		for (int rq = 0; rq < nreq; rq++) {
			const uint32_t mode = modes[rnd(3)], H = rnd(2) ? 32 : 64, rows = 1 + rnd(90);
			const uint64_t P = rows + rnd(5000);
			const int32_t win = rnd(3) == 0 ? (int32_t)(1 + rnd(700)) : 0;
			for (uint32_t r = 0; r < rows && n < 200; r++) {
				jobs[n] = job(rq, P - rows + r, mode, H);
				jobs[n].window = win;
				n++;
			}
		}
		for (uint32_t i = n - 1; i > 0; i--) { /* any order */
			uint32_t k = rnd(i + 1);
			ax_attn_job x = jobs[i];
			jobs[i] = jobs[k], jobs[k] = x;
		}
		axp_plan *p = calloc(1, sizeof *p);
		assert_non_null(p);
		p->kn.rows = 2 + rnd(40), p->kn.min_keys = 16 * (1 + rnd(8)), p->kn.target = 1 + rnd(2000);
		p->kn.min_rows = rnd(2) ? 0 : 1 + rnd(12);
		int rc[200];
		for (uint32_t i = 0; i < n; i++)
			rc[i] = 99;
		assert_int_equal(axp_plan_build(p, jobs, n, rc), 0);
		uint32_t seen[200] = {0};
		for (uint32_t r = 0; r < p->nrows; r++)
			seen[p->rj[r]]++;
		for (uint32_t i = 0; i < n; i++) {
			assert_int_equal(seen[i], p->in[i]);
			assert_int_equal(rc[i], p->in[i] ? 0 : 99);
		}
		for (uint32_t b = 0; b < p->nblocks; b++) { /* rows consecutive, within the caps */
			const ax_attn_job *j0 = &jobs[p->rj[p->bf[b]]];
			const uint32_t R = p->bf[b + 1] - p->bf[b], cap = axp_rows_cap(p->kn.rows, j0->n_q_heads, j0->top_k);
			assert_true(R >= (cap >= 3 ? 2u : 1u) && R <= cap); /* cap 2 splits an odd chain into 2s and a 1 */
			assert_true(R >= p->kn.min_rows || j0->mode == AX_MODE_HEADS); /* mean modes: smaller stay off */
			for (uint32_t r = p->bf[b] + 1; r < p->bf[b + 1]; r++)
				assert_true(axp_follows(&jobs[p->rj[r - 1]], &jobs[p->rj[r]]));
		}
		uint64_t lse_a = 0, lse_b = 0, parts = 0;
		for (uint32_t k = 0; k < p->npb; k++) {
			const axp_blk *x = &p->pb[k];
			const int ps = k >= p->npa;
			const uint32_t so0 = ps ? p->npa + 1 : 0, kk = ps ? k - p->npa : k;
			assert_true(x->chunk % AXP_TS == 0 && x->chunk >= AXP_TS);
			assert_true(x->S >= 1 && x->S <= AXP_MAX_SPLITS);
			assert_true((uint64_t)x->chunk * (x->S - 1) < x->n && (uint64_t)x->chunk * x->S >= x->n);
			assert_int_equal(p->so[so0 + kk + 1] - p->so[so0 + kk], x->S);
			assert_int_equal(p->mo[so0 + kk + 1] - p->mo[so0 + kk], x->R * axp_lists_per_row(x));
			assert_int_equal(x->part0, parts);
			parts += (uint64_t)x->R * axp_lists_per_row(x) * x->S * axp_subs(x);
			assert_true(axp_smem(x->R * x->H, x->R, x->K) <= p->smem[ps] && p->smem[ps] <= AXP_SMEM_MAX);
			assert_int_equal(x->n, x->p0 + x->R - x->lo);
			if (x->lse_out >= 0) { /* logsumexp pass: pass A, K 0, slots in order */
				assert_int_equal(ps, 0);
				assert_int_equal(x->K, 0);
				assert_int_equal((uint64_t)x->lse_out, lse_a);
				lse_a += (uint64_t)x->R * x->H;
			}
			if (x->mode == AXF_M_PROB) {
				assert_int_equal(ps, 1);
				assert_int_equal(x->lse_in, lse_b);
				lse_b += (uint64_t)x->R * x->H;
			}
		}
		assert_int_equal(lse_a, lse_b);
		assert_int_equal(lse_a, p->nlse);
		assert_int_equal(parts, p->parts);
		assert_true(p->lay.up <= p->lay.rflags && p->lay.down <= p->lay.lse && p->lay.part_p <= p->lay.total);
		axp_plan_free(p);
	}
}

/* Flags and compact results in a fake staging buffer → codes and rows. */
static void test_finish(void **state)
{
	(void)state;
	ax_attn_job jobs[4];
	for (int i = 0; i < 4; i++) {
		jobs[i] = job(0, 20 + (uint64_t)i, AX_MODE_HEADS, 8);
		jobs[i].window = 3; /* row i sees 3 keys: 19 + i - 1 .. 21 + i */
		jobs[i].top_k = 5;
		jobs[i].head_offset = 40;
	}
	axp_plan *p = calloc(1, sizeof *p);
	assert_non_null(p);
	p->kn.rows = 16, p->kn.min_keys = 16, p->kn.target = 100;
	int rc[4] = {7, 7, 7, 7};
	assert_int_equal(axp_plan_build(p, jobs, 4, rc), 0);
	assert_int_equal(p->nblocks, 1);
	const axp_blk *b = &p->pb[0];
	assert_int_equal(b->lo, 18);
	char *h = calloc(1, p->lay.down);
	uint32_t *fl = (uint32_t *)(h + p->lay.rflags);
	fl[1] = AXF_F_DOM, fl[2] = AXF_F_DOM | AXF_F_RANGE;
	float *lse = (float *)(h + p->lay.res_lse);
	axf_ent *e = (axf_ent *)(h + p->lay.res_ent);
	for (uint32_t l = 0; l < 4 * 8; l++) {
		lse[l] = (float)l;
		for (uint32_t k = 0; k < 5; k++)
			e[l * 5 + k] = (axf_ent){(float)(10 - k), k < 3 ? (int32_t)((l / 8) + 2 - k) : -1};
	}
	ax_attn_result out[32];
	memset(out, 0x5a, sizeof out);
	axp_plan_prefill_rows(p, jobs, out);
	axp_plan_finish(p, h, jobs, out, rc);
	assert_int_equal(rc[0], 0);
	assert_int_equal(rc[1], -EDOM);
	assert_int_equal(rc[2], -ERANGE);
	assert_int_equal(rc[3], 0);
	for (int i = 0; i < 4; i += 3)
		for (uint32_t hh = 0; hh < 8; hh++) {
			const ax_attn_result *o = &out[i * 8 + hh];
			assert_int_equal(o->head_id, 40 + (int)hh);
			assert_int_equal(o->k, 3); /* min(top_k 5, 3 visible keys) */
			assert_true(o->lse == (double)(i * 8 + hh));
			for (uint32_t k = 0; k < 3; k++) {
				assert_int_equal(o->pos[k], 18 + i + 2 - (int)k);
				assert_true(o->logit[k] == (float)(10 - k));
			}
			for (uint32_t k = 3; k < AX_ATTN_MAX_TOPK; k++)
				assert_true(o->pos[k] == -1 && o->logit[k] == -INFINITY);
		}
	free(h);
	axp_plan_free(p);
}

/* The expansion on several threads writes exactly what one thread writes (9600 heads rows: past the threshold). */
static void test_expand_parallel(void **state)
{
	(void)state;
	enum { N = 300 };
	ax_attn_job *jobs = calloc(N, sizeof *jobs);
	assert_non_null(jobs);
	for (uint32_t i = 0; i < N; i++) {
		jobs[i] = job((int)(i % 2), 100 + i / 2, AX_MODE_HEADS, 32);
		jobs[i].top_k = 5 + (i % 2);
		jobs[i].window = i % 2 ? 0 : 40;
	}
	axp_plan *p = calloc(1, sizeof *p);
	assert_non_null(p);
	p->kn.rows = 8, p->kn.min_keys = 64, p->kn.target = 500;
	int rc[N], rc2[N];
	assert_int_equal(axp_plan_build(p, jobs, N, rc), 0);
	assert_true(p->nres >= AXP_PAR_MIN_ROWS);
	char *h = calloc(1, p->lay.down);
	assert_non_null(h);
	uint32_t *fl = (uint32_t *)(h + p->lay.rflags);
	float *lse = (float *)(h + p->lay.res_lse);
	axf_ent *e = (axf_ent *)(h + p->lay.res_ent);
	for (uint32_t r = 0; r < p->nrows; r++)
		fl[r] = r % 37 == 5 ? AXF_F_DOM : 0;
	for (uint64_t l = 0; l < p->nres; l++)
		lse[l] = (float)rnd(1000);
	for (uint64_t x = 0; x < p->nrent; x++)
		e[x] = (axf_ent){(float)rnd(100), (int32_t)rnd(40)};
	const size_t bytes = (size_t)N * 32 * sizeof(ax_attn_result);
	ax_attn_result *a = malloc(bytes), *b = malloc(bytes);
	assert_non_null(a);
	assert_non_null(b);
	memset(a, 0x77, bytes);
	axp_plan_prefill_rows(p, jobs, a);
	axp_plan_finish(p, h, jobs, a, rc);
	static const uint32_t threads[] = {2, 3, 4, 16, 40};
	for (size_t t = 0; t < ARRAY_LEN(threads); t++) {
		uint32_t bounds[AXP_MAX_THREADS + 1];
		const uint32_t T = threads[t] > AXP_MAX_THREADS ? AXP_MAX_THREADS : threads[t];
		axp_split_ranges(p, T, bounds);
		assert_int_equal(bounds[0], 0);
		assert_int_equal(bounds[T], p->npb);
		for (uint32_t k = 0; k < T; k++)
			assert_true(bounds[k] <= bounds[k + 1]);
		memset(b, 0x77, bytes);
		axp_make_empty(p);
		axp_expand_par(p, jobs, b, NULL, NULL, threads[t]);
		axp_codes(p, h, rc2);
		axp_expand_par(p, jobs, b, h, rc2, threads[t]);
		assert_memory_equal(rc, rc2, sizeof rc);
		assert_memory_equal(a, b, bytes);
	}
	free(a);
	free(b);
	free(h);
	free(jobs);
	axp_plan_free(p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_grouping),
		cmocka_unit_test(test_plan_invariants),
		cmocka_unit_test(test_finish),
		cmocka_unit_test(test_expand_parallel),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
