/*
 * ref_model.h — an independent float64 reference of a Llama / Qwen3 checkpoint for the end-to-end tests: it
 * recomputes, from the weights on disk, the query and key rows every attention record is made of, and from them
 * the exact attention scores of DESIGN §1 (mean_logit, mean_prob, heads).
 *
 * It shares nothing with attnx-engine's forward (only the safetensors reader maps the file): whole-sequence
 * recompute in double precision, no KV cache, no batching, no threads, its own config parsing, dtype conversion,
 * RMSNorm, RoPE and SwiGLU, written from the Hugging Face definitions (rotate_half RoPE with
 * inv_freq = theta^(-2i/D), Qwen3's per-head q/k RMSNorm before RoPE, tied or untied lm_head).
 */
#ifndef ATTNX_TESTS_REF_MODEL_H
#define ATTNX_TESTS_REF_MODEL_H

#include <stdint.h>

typedef struct ref_model ref_model;

typedef struct ref_shape {
	int layers, hidden, heads, kv_heads, head_dim, ffn, vocab;
} ref_shape;

/* Load config.json and model.safetensors (f32, f16 or bf16) of `dir`. Returns 0, -ENOENT, -EPROTO (a missing or
 * misshaped tensor, an unsupported setting), -ENOMEM. Free with ref_model_close (accepts NULL). */
int ref_model_open(ref_model **out, const char *dir);
void ref_model_close(ref_model *m);
const ref_shape *ref_model_shape(const ref_model *m);

/*
 * Run tokens[0..n) through the model (one causal sequence). Afterwards ref_q / ref_k give the rows of every
 * layer and position, and logits [n, vocab] are written when `logits` is not NULL. Replaces the previous run's
 * results. Returns 0, -EINVAL (token out of range), -ENOMEM.
 */
int ref_model_run(ref_model *m, const int32_t *tokens, int n, double *logits);
/* q after q_norm and RoPE: [heads, head_dim] of layer l at position p of the last run; k: [kv_heads, head_dim]. */
const double *ref_q(const ref_model *m, int layer, int pos);
const double *ref_k(const ref_model *m, int layer, int pos);

enum ref_mode { REF_MEAN_LOGIT = 0, REF_MEAN_PROB = 1, REF_HEADS = 2 };

/*
 * Scores of query position p over keys 0..p in layer `layer` (DESIGN §1), from the last run:
 *   REF_MEAN_LOGIT  s[j] = mean_h scale·q_h·k_j            *lse = logsumexp_j s[j]
 *   REF_MEAN_PROB   s[j] = log mean_h softmax_h(..)[j]     *lse = 0
 *   REF_HEADS       s[j] = scale·q_head·k_j                *lse = that head's logsumexp
 * s holds p+1 values. scale = 1/sqrt(head_dim). GQA: query head h reads KV head h / (heads / kv_heads).
 */
void ref_scores(const ref_model *m, int layer, int pos, int mode, int head, double *s, double *lse);

#endif
