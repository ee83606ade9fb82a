/*
 * attn_paged_testdata.h — paged copies (vLLM's layout) of attn_cuda_testdata.h's token-indexed inputs, for the tests
 * of paged addressing (attn_paged_test.c on the CPU backend and the emulated CUDA logic, attn_cuda_test.cu on a
 * GPU). Plain C, also valid C++; test code only (fails fast on malloc failure).
 *
 * tp_make builds, from a case's host data (a K pool addressed through a shuffled index row), a paged pool of
 * blocks of `bs` rows in NHD ([blocks, bs, H_kv, D]), HND ([blocks, H_kv, bs, D]) or K/V-interleaved order
 * (FlashInfer's [blocks, 2, bs, H_kv, D] with K at index 0: NHD blocks twice as far apart, V poison) and a block-table
 * row with
 * shuffled block ids, and copies every visible key's bytes (all KV heads) to block table[j / bs], row j % bs. The
 * keys are byte copies, so the token job's float64 reference (td_ref) is the paged job's reference too, and a
 * backend must give the paged job exactly what it gives the token job. Everything a correct backend must never read
 * is poison: rows of keys outside the window and spare rows (0x7f bytes: e4m3 NaN, a huge value otherwise, so a
 * read shows up as -EDOM or a wrong top-k), table cells of blocks that hold no visible key (out-of-pool ids: a read
 * shows up as -ERANGE), and two cells past the row's last needed one (out-of-pool ids too).
 */
#ifndef ATTNX_CAPTURE_ATTN_PAGED_TESTDATA_H
#define ATTNX_CAPTURE_ATTN_PAGED_TESTDATA_H

#include "attn_cuda_testdata.h"

typedef struct tpaged {
	void *k;               /* the paged pool (host) */
	int32_t *table;        /* the block-table row: cells 0 .. ncells-1 */
	size_t kbytes, tbytes;
	uint64_t blocks, ncells;
	ax_attn_job job;       /* the token job with paged addressing over k and table */
} tpaged;

enum { TP_NHD = 0, TP_HND = 1, TP_KV = 2 }; /* pool layouts */

/* A paged copy of t (made by td_make) with block size bs in layout `layout` (TP_*). */
static void tp_make(const tdata *t, uint32_t bs, int layout, tpaged *p)
{
	const ax_attn_job *tj = &t->job;
	uint32_t Hkv = tj->n_kv_heads, D = tj->head_dim;
	size_t kes = td_esize(tj->k_dtype);
	uint64_t n = tj->position + 1, need = (n + bs - 1) / bs;
	uint64_t start = tj->window > 0 && n > (uint64_t)tj->window ? n - (uint64_t)tj->window : 0;
	memset(p, 0, sizeof *p);
	p->blocks = need + 3; /* spare blocks no cell names */
	p->ncells = need + 2;
	int hnd = layout == TP_HND;
	uint64_t s0 = hnd ? D : (uint64_t)Hkv * D, s1 = hnd ? (uint64_t)bs * D : D;
	uint64_t sb = (uint64_t)bs * Hkv * D * (layout == TP_KV ? 2 : 1);
	p->kbytes = p->blocks * sb * kes;
	p->tbytes = p->ncells * sizeof(int32_t);
	p->k = td_alloc(p->kbytes);
	p->table = (int32_t *)td_alloc(p->tbytes);
	memset(p->k, 0x7f, p->kbytes);
	uint64_t *perm = (uint64_t *)td_alloc(p->blocks * sizeof *perm);
	for (uint64_t b = 0; b < p->blocks; b++)
		perm[b] = b;
	for (uint64_t b = p->blocks - 1; b > 0; b--) {
		uint64_t r = td_u64() % (b + 1), x = perm[b];
		perm[b] = perm[r], perm[r] = x;
	}
	for (uint64_t c = 0; c < p->ncells; c++) {
		int visible = c < need && (c + 1) * bs > start;
		p->table[c] = visible ? (int32_t)perm[c] : (c % 2 ? -7 : (int32_t)(p->blocks + 5));
	}
	for (uint64_t j = start; j < n; j++) {
		uint64_t slot = tj->index_dtype == AX_DTYPE_I32 ? (uint64_t)(int64_t)((const int32_t *)tj->index)[j]
								 : (uint64_t)((const int64_t *)tj->index)[j];
		uint64_t dst = (uint64_t)p->table[j / bs] * sb + (j % bs) * s0;
		for (uint32_t g = 0; g < Hkv; g++)
			memcpy((char *)p->k + (dst + g * s1) * kes,
			       (const char *)tj->k + (slot * tj->k_stride[0] + g * tj->k_stride[1]) * kes, D * kes);
	}
	free(perm);
	p->job = *tj;
	p->job.k = p->k;
	p->job.k_stride[0] = s0, p->job.k_stride[1] = s1, p->job.k_stride[2] = 1;
	p->job.n_slots = 0;
	p->job.index = p->table;
	p->job.index_dtype = AX_DTYPE_I32;
	p->job.index_kind = AX_ATTN_INDEX_PAGED;
	p->job.block_size = bs;
	p->job.k_block_stride = sb;
	p->job.n_blocks = p->blocks;
}

static void tp_free(tpaged *p)
{
	free(p->k);
	free(p->table);
	memset(p, 0, sizeof *p);
}

/* Rows a and b are identical (k, head_id, lse, and the first k entries), bit for bit. */
static int tp_same_rows(const ax_attn_result *a, const ax_attn_result *b, uint32_t rows)
{
	for (uint32_t i = 0; i < rows; i++) {
		if (a[i].k != b[i].k || a[i].head_id != b[i].head_id || memcmp(&a[i].lse, &b[i].lse, sizeof a[i].lse))
			return 0;
		if (memcmp(a[i].pos, b[i].pos, a[i].k * sizeof a[i].pos[0]) ||
		    memcmp(a[i].logit, b[i].logit, a[i].k * sizeof a[i].logit[0]))
			return 0;
	}
	return 1;
}

#endif
