/*
 * kv.c — the KV cache: token-level slots, as SGLang's req_to_token pool.
 *
 * Every layer has a K pool and a V pool of `slots` token slots, each [H_kv, D] f32. A request owns one row of
 * the index table; index[row][pos] is the slot holding the key/value of its token at `pos` (-1: none). Slots come
 * from a free stack, so a request's keys can sit anywhere in the pool, exactly the indirection a capture must
 * follow. K pools and the index table may be memory the caller provides (the shm export region): the engine then
 * writes its keys straight into the exported buffers and nothing is ever copied for the capture.
 * Single-threaded: only the scheduler thread touches it.
 */
#include "attnx_engine.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct ax_kv {
	ax_kv_config c;
	float **k, **v;
	int k_owned;
	int32_t *index;
	int index_owned;
	uint32_t *free_stack; /* free slots; top at n_free - 1 */
	uint32_t n_free;
};

int ax_kv_open(ax_kv **out, const ax_kv_config *cfg)
{
	if (cfg->n_layers <= 0 || cfg->n_kv_heads <= 0 || cfg->head_dim <= 0 || cfg->slots == 0 || cfg->rows <= 0 ||
	    cfg->ctx <= 0)
		return -EINVAL;
	ax_kv *kv = calloc(1, sizeof *kv);
	if (!kv)
		return -ENOMEM;
	kv->c = *cfg;
	size_t per = (size_t)cfg->slots * cfg->n_kv_heads * cfg->head_dim;
	kv->k = calloc((size_t)cfg->n_layers, sizeof *kv->k);
	kv->v = calloc((size_t)cfg->n_layers, sizeof *kv->v);
	kv->free_stack = malloc(cfg->slots * sizeof *kv->free_stack);
	if (!kv->k || !kv->v || !kv->free_stack)
		goto fail;
	kv->k_owned = cfg->k_ext == NULL;
	for (int l = 0; l < cfg->n_layers; l++) {
		kv->k[l] = cfg->k_ext ? cfg->k_ext[l] : calloc(per, sizeof(float));
		kv->v[l] = calloc(per, sizeof(float));
		if (!kv->k[l] || !kv->v[l])
			goto fail;
	}
	kv->index_owned = cfg->index_ext == NULL;
	kv->index = cfg->index_ext ? cfg->index_ext : malloc((size_t)cfg->rows * cfg->ctx * sizeof(int32_t));
	if (!kv->index)
		goto fail;
	for (size_t i = 0; i < (size_t)cfg->rows * cfg->ctx; i++)
		kv->index[i] = -1;
	/* Slot 0 on top of the stack: a lone request gets slots 0, 1, 2, ... */
	for (uint32_t i = 0; i < cfg->slots; i++)
		kv->free_stack[i] = cfg->slots - 1 - i;
	kv->n_free = cfg->slots;
	*out = kv;
	return 0;
fail:
	ax_kv_close(kv);
	return -ENOMEM;
}

void ax_kv_close(ax_kv *kv)
{
	if (!kv)
		return;
	for (int l = 0; kv->k && l < kv->c.n_layers; l++)
		if (kv->k_owned)
			free(kv->k[l]);
	for (int l = 0; kv->v && l < kv->c.n_layers; l++)
		free(kv->v[l]);
	free(kv->k);
	free(kv->v);
	if (kv->index_owned)
		free(kv->index);
	free(kv->free_stack);
	free(kv);
}

int ax_kv_alloc(ax_kv *kv, int row, int pos0, int n)
{
	if (row < 0 || row >= kv->c.rows || pos0 < 0 || n < 0 || pos0 + n > kv->c.ctx)
		return -EINVAL;
	if ((uint32_t)n > kv->n_free)
		return -ENOSPC;
	int32_t *r = kv->index + (size_t)row * kv->c.ctx;
	for (int p = pos0; p < pos0 + n; p++)
		if (r[p] < 0)
			r[p] = (int32_t)kv->free_stack[--kv->n_free];
	return 0;
}

void ax_kv_release(ax_kv *kv, int row, int len)
{
	if (row < 0 || row >= kv->c.rows)
		return;
	if (len > kv->c.ctx)
		len = kv->c.ctx;
	int32_t *r = kv->index + (size_t)row * kv->c.ctx;
	for (int p = 0; p < len; p++) {
		if (r[p] >= 0)
			kv->free_stack[kv->n_free++] = (uint32_t)r[p];
		r[p] = -1;
	}
}

uint32_t ax_kv_free_slots(const ax_kv *kv) { return kv->n_free; }
const int32_t *ax_kv_index_row(const ax_kv *kv, int row) { return kv->index + (size_t)row * kv->c.ctx; }
float *ax_kv_k(ax_kv *kv, int layer) { return kv->k[layer]; }
float *ax_kv_v(ax_kv *kv, int layer) { return kv->v[layer]; }
