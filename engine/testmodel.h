/*
 * testmodel.h — test helper: a tiny random-weight Llama/Qwen3 model written as a real checkpoint directory
 * (config.json + model.safetensors), and a naive reference forward over the same weights.
 *
 * The reference is deliberately the dumbest correct code: whole-sequence recompute, double accumulators, no
 * cache, no batching, no threads. The engine's batched, chunked, slot-indirected forward must agree with it.
 * Weights are drawn from a seeded generator and rounded to the stored dtype, so both sides see identical values.
 */
#ifndef ATTNX_ENGINE_TESTMODEL_H
#define ATTNX_ENGINE_TESTMODEL_H

#include <stdint.h>

typedef struct tm_spec {
	int layers, hidden, heads, kv_heads, head_dim, ffn, vocab;
	int qk_norm;   /* Qwen3 q/k norms */
	int tie;       /* tied embeddings (no lm_head.weight) */
	int bias;      /* q/k/v biases (Qwen2 style) */
	uint32_t dtype; /* enum ax_st_dtype */
	float theta;
	uint64_t seed;
	int o_bias;    /* o_proj bias (Llama / Qwen3 attention_bias) */
	int mlp_bias;  /* gate / up / down biases (Llama mlp_bias) */
	int shards;    /* ≥ 2: model-0000k-of-0000n.safetensors + model.safetensors.index.json */
	int llama3_rope; /* rope_scaling llama3: factor 8, low 1, high 4, original_max_position_embeddings 64 */
	int lm_head_too; /* tied, but lm_head.weight written anyway (random: must be ignored) */
} tm_spec;

typedef struct tm_layer {
	float *an, *wq, *wk, *wv, *wo, *bq, *bk, *bv, *bo, *qn, *kn, *fn, *g, *u, *d, *bg, *bu, *bd;
} tm_layer;

typedef struct tm_model {
	tm_spec s;
	float *embed, *norm, *lm_head; /* lm_head aliases embed when tied */
	float *decoy;                  /* lm_head_too: the lm_head.weight written beside tied embeddings */
	tm_layer *L;
} tm_model;

/* Draw the weights. Returns 0 or -ENOMEM. */
int tm_make(tm_model *m, const tm_spec *s);
void tm_free(tm_model *m);
/* Write config.json and model.safetensors (or shards + index) into dir (created). Returns 0 or -errno. */
int tm_write(const tm_model *m, const char *dir);
/* logits [n, vocab] for every position of tokens[0..n). */
void tm_ref_forward(const tm_model *m, const int32_t *tokens, int n, float *logits);
/* Remove the files tm_write wrote, and dir. */
void tm_remove(const char *dir);

#endif
