/*
 * attnx_engine.h — attnx-engine, a small reference inference server for the Llama / Qwen3 family on the CPU.
 *
 * Layers, bottom up (each one a file of engine/):
 *   st.c       safetensors reader: mmap a file, parse its JSON header (jansson), look tensors up by name.
 *   pool.c     a fixed pthread pool that splits a range of work items (matmul output rows) over the cores.
 *   model.c    config.json + weights → a model; the batched forward pass over token-level KV slots.
 *   kv.c       the KV cache: per-layer K and V pools [slots, H_kv, D] f32 and a token-level index table
 *              [rows, ctx] (SGLang's req_to_token); K pools and the index table may live in memory the caller
 *              provides (the shm export region), which is how the exported K IS the engine's cache.
 *   tok.c      byte-level BPE from tokenizer.json (GPT-2 byte map, merges, the pre-tokenizer regex through
 *              PCRE2, added / special tokens).
 *   sample.c   greedy / temperature / top-k / top-p sampling with a per-request seeded generator; logprobs.
 *   chat.c     chat templates (ChatML with Qwen3's <think>, Llama 3) rendered to a prompt string.
 *   sched.c    the engine: requests, continuous batching on one scheduler thread, export hooks.
 *   server.c   the OpenAI-compatible HTTP front end (civetweb).
 *
 * Conventions: functions return 0 (or a count) on success and a negative errno on failure. Objects are opaque
 * and come in _open/_close pairs; _close accepts NULL. Thread-safety is stated per function.
 */
#ifndef ATTNX_ENGINE_H
#define ATTNX_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------------------------
 * safetensors (st.c)
 */
enum ax_st_dtype { AX_ST_F32 = 1, AX_ST_F16 = 2, AX_ST_BF16 = 3, AX_ST_OTHER = 99 };

typedef struct ax_st_tensor {
	char *name;        /* tensor name (owned by the ax_st) */
	uint32_t dtype;    /* enum ax_st_dtype */
	uint32_t ndim;     /* 0..4 */
	int64_t shape[4];  /* outermost first */
	const void *data;  /* into the mapping; valid until ax_st_close */
	size_t bytes;      /* data bytes */
} ax_st_tensor;

typedef struct ax_st ax_st;

/* Map a .safetensors file read-only and parse its header. Returns 0, -ENOENT, -EPROTO (malformed header:
 * bad length, bad JSON, offsets outside the file, size not matching shape·dtype), -ENOMEM. */
int ax_st_open(ax_st **out, const char *path);
/* Same over a memory buffer the caller keeps alive (tests, fuzzing). */
int ax_st_open_mem(ax_st **out, const void *buf, size_t len);
void ax_st_close(ax_st *st);
/* Tensor by name, or NULL. Thread-safe (read-only). */
const ax_st_tensor *ax_st_find(const ax_st *st, const char *name);
size_t ax_st_count(const ax_st *st);
const ax_st_tensor *ax_st_at(const ax_st *st, size_t i);

/* bf16 / f16 → f32 (exact). */
float ax_bf16_to_f32(uint16_t h);
float ax_f16_to_f32(uint16_t h);
uint16_t ax_f32_to_bf16(float f); /* round to nearest even */
uint16_t ax_f32_to_f16(float f);  /* round to nearest even */

/* ---------------------------------------------------------------------------------------------------------
 * thread pool (pool.c)
 */
typedef struct ax_pool ax_pool;
/* Work function: process items [i0, i1) on worker `tid` (0..threads-1). */
typedef void (*ax_pool_fn)(void *ctx, int i0, int i1, int tid);
/* Start `threads` - 1 workers (the caller is worker 0). threads ≤ 0 means the number of online cores. */
int ax_pool_open(ax_pool **out, int threads);
void ax_pool_close(ax_pool *p);
int ax_pool_threads(const ax_pool *p);
/* Split [0, n) into chunks that the active workers take from a shared counter (fn may be called several times
 * per worker and job, with per-worker scratch indexed by tid; every item exactly once); return when all are done. Only one thread may
 * call ax_pool_run at a time (the scheduler). p may be NULL: then fn runs inline. */
void ax_pool_run(ax_pool *p, ax_pool_fn fn, void *ctx, int n);
/* Use only workers 0..n-1 for the following ax_pool_run calls (clamped to 1..threads); the others sleep without
 * spinning until the count is raised again. The caller of ax_pool_run only, between runs. Returns the count set.
 * The engine lowers it by one while a consumer (attnx-capture) is attached, to leave that process a core. */
int ax_pool_set_active(ax_pool *p, int n);
/* Workers the next ax_pool_run uses (1 for NULL). */
int ax_pool_active(const ax_pool *p);

/* ---------------------------------------------------------------------------------------------------------
 * model (model.c) and KV cache (kv.c)
 */
#define AX_MAX_EOS 8

typedef struct ax_model_config {
	char arch[64];         /* "Qwen3ForCausalLM", "LlamaForCausalLM", ... */
	char name[96];         /* model name (directory base name) */
	int n_layers;          /* num_hidden_layers */
	int hidden;            /* hidden_size */
	int n_heads;           /* num_attention_heads */
	int n_kv_heads;        /* num_key_value_heads */
	int head_dim;          /* head_dim, or hidden / n_heads */
	int ffn;               /* intermediate_size */
	int vocab;             /* vocab_size */
	int max_pos;           /* max_position_embeddings */
	float rms_eps;         /* rms_norm_eps */
	float rope_theta;      /* rope_theta */
	int tie_embeddings;    /* tie_word_embeddings */
	int qk_norm;           /* Qwen3: per-head RMSNorm of q and k before RoPE */
	int attn_bias;         /* q/k/v projections have biases (Qwen2, attention_bias) */
	int bos_id;            /* -1 if none */
	int eos_ids[AX_MAX_EOS]; /* from config.json and generation_config.json */
	int n_eos;
	int rope_type;         /* enum ax_rope_type: rope_scaling / rope_parameters' rope_type */
	float rope_factor;     /* linear, llama3: factor */
	float rope_low_freq;   /* llama3: low_freq_factor */
	float rope_high_freq;  /* llama3: high_freq_factor */
	int rope_orig_max_pos; /* llama3: original_max_position_embeddings */
	int sliding_window;    /* Mistral: every layer attends to this many positions (0: all); the engine's context
				* is clamped to it, where full attention is the same computation */
} ax_model_config;

/* RoPE frequency schemes the engine implements (others make ax_model_parse_config fail with -ENOTSUP). */
enum ax_rope_type { AX_ROPE_DEFAULT = 0, AX_ROPE_LINEAR = 1, AX_ROPE_LLAMA3 = 2 };

typedef struct ax_model ax_model;

/* Load config.json (+ generation_config.json if present) and the weights (model.safetensors, or the shards
 * of model.safetensors.index.json) of `dir`. Weights stay memory-mapped in their stored dtype (f32/f16/bf16).
 * Returns 0, -ENOENT (missing file), -EPROTO (bad config or a missing / misshaped tensor; logged),
 * -ENOTSUP (unsupported architecture feature or dtype). */
int ax_model_open(ax_model **out, const char *dir);
void ax_model_close(ax_model *m);
const ax_model_config *ax_model_cfg(const ax_model *m);
/* Parse only config.json text into cfg (exposed for tests). Returns 0, -EPROTO, or -ENOTSUP for what the forward
 * pass does not implement: a model_type other than llama / qwen3 / qwen2 / mistral, hidden_act other than silu,
 * sliding-window layers, RoPE scaling other than default / linear / llama3. */
int ax_model_parse_config(const char *json, size_t len, ax_model_config *cfg);
/* RoPE inverse frequencies for cfg (rope_theta, then rope_type's rescaling), as transformers computes them:
 * inv_freq[head_dim / 2]. Exposed for tests. */
void ax_model_rope_freqs(const ax_model_config *cfg, float *inv_freq);

typedef struct ax_kv ax_kv;
typedef struct ax_kv_config {
	int n_layers, n_kv_heads, head_dim;
	uint32_t slots;       /* token slots in every pool */
	int rows;             /* index-table rows (concurrent requests) */
	int ctx;              /* index-table columns (longest sequence) */
	float **k_ext;        /* optional: n_layers pointers to [slots, H_kv, D] f32 K pools owned by the caller */
	int32_t *index_ext;   /* optional: [rows, ctx] i32 index table owned by the caller */
} ax_kv_config;
/* Returns 0, -EINVAL, -ENOMEM. */
int ax_kv_open(ax_kv **out, const ax_kv_config *cfg);
void ax_kv_close(ax_kv *kv);
/* Give row `row` slots for positions [pos0, pos0+n). Returns 0 or -ENOSPC (no free slots; nothing taken),
 * -EINVAL (row/positions out of range). Not thread-safe (scheduler thread). */
int ax_kv_alloc(ax_kv *kv, int row, int pos0, int n);
/* Return the slots of positions [0, len) of `row` to the free list. */
void ax_kv_release(ax_kv *kv, int row, int len);
uint32_t ax_kv_free_slots(const ax_kv *kv);
const int32_t *ax_kv_index_row(const ax_kv *kv, int row);
float *ax_kv_k(ax_kv *kv, int layer); /* [slots, H_kv, D] */
float *ax_kv_v(ax_kv *kv, int layer);

/* One sequence's part of a batched forward: n tokens at positions pos0.. of the request in index row `row`
 * (slots already allocated). Its last token's logits are written when want_logits. */
typedef struct ax_fwd_seq {
	int row;
	int pos0;
	int n;
	const int32_t *tokens;
	int want_logits;
} ax_fwd_seq;

/* Called after the query rows of layer `layer` are final (after q_norm and RoPE): q is [T, H_q, D] f32 for the
 * T tokens of the step, in the order of the seqs. Runs on the scheduler thread; must not block. */
typedef void (*ax_q_hook)(void *ctx, int layer, const float *q, int T);

typedef struct ax_fwd_scratch ax_fwd_scratch;
/* Scratch buffers for steps of up to max_tokens tokens. Returns 0 or -ENOMEM. */
int ax_fwd_scratch_open(ax_fwd_scratch **out, const ax_model *m, int max_tokens, int threads);
void ax_fwd_scratch_close(ax_fwd_scratch *s);

/*
 * One forward step over n_seqs sequences (sum of n ≤ the scratch's max_tokens). Writes K/V of every token into
 * the cache, and logits [n_seqs, vocab] (rows of seqs without want_logits are left untouched).
 * Returns 0 or -EINVAL (token id out of range, too many tokens). Runs on the calling thread + pool.
 */
int ax_model_forward(const ax_model *m, ax_kv *kv, ax_pool *pool, ax_fwd_scratch *s, const ax_fwd_seq *seqs,
		     int n_seqs, float *logits, ax_q_hook hook, void *hook_ctx);

/* ---------------------------------------------------------------------------------------------------------
 * tokenizer (tok.c)
 */
typedef struct ax_tok ax_tok;
/* Load a tokenizer.json (model.type "BPE" with a ByteLevel pre-tokenizer / decoder). Returns 0, -ENOENT,
 * -EPROTO (malformed), -ENOTSUP (not byte-level BPE, or a normalizer / pre-tokenizer stage tok.c does not
 * implement: refused rather than tokenizing differently from HF), -ENOMEM. */
int ax_tok_open(ax_tok **out, const char *path);
int ax_tok_open_mem(ax_tok **out, const char *json, size_t len);
void ax_tok_close(ax_tok *t);
int ax_tok_vocab_size(const ax_tok *t); /* 1 + the largest id */
/* Encode UTF-8 text. Added tokens are matched first (special ones only when parse_special). *ids is malloc'd
 * (caller frees). Returns the number of ids or a negative errno. Thread-safe. */
int ax_tok_encode(const ax_tok *t, const char *text, size_t len, int parse_special, int32_t **ids);
/* ax_tok_encode (special tokens parsed) with the special tokens the tokenizer's post-processor puts around a
 * single sequence (TemplateProcessing), as HF's encode(add_special_tokens=True) does: Llama 3's <|begin_of_text|>
 * first; nothing for Qwen's. What a completions prompt string gets. Same returns; thread-safe. */
int ax_tok_encode_prompt(const ax_tok *t, const char *text, size_t len, int32_t **ids);
/* Decode ids to UTF-8 bytes (malloc'd, NUL-terminated; caller frees); special tokens skipped when
 * skip_special. Invalid UTF-8 sequences are passed through as bytes. Returns the byte count or -errno. */
int ax_tok_decode(const ax_tok *t, const int32_t *ids, size_t n, int skip_special, char **out);
/* The raw bytes of one token (byte-level decoded) into buf (cap bytes); returns its length (may exceed cap:
 * then truncated) or -EINVAL for an unknown id. */
int ax_tok_token_bytes(const ax_tok *t, int32_t id, char *buf, size_t cap);
/* The vocabulary string of a token as stored (GPT-2 byte-mapped), or NULL. */
const char *ax_tok_piece(const ax_tok *t, int32_t id);
/* Id of a token string (vocab or added token), or -ENOENT. */
int ax_tok_find(const ax_tok *t, const char *piece);
int ax_tok_is_special(const ax_tok *t, int32_t id);

/* ---------------------------------------------------------------------------------------------------------
 * sampling (sample.c)
 */
typedef struct ax_sample_params {
	float temperature; /* ≤ 0: greedy */
	float top_p;       /* (0, 1]; 1 = off */
	int top_k;         /* ≤ 0 = off */
} ax_sample_params;

/* splitmix64-seeded xoshiro-like state: one per request. */
uint64_t ax_rng_next(uint64_t *state);
/* Sample a token from logits [vocab]. `work` holds 2·vocab floats + vocab ints of scratch (ax_sample_work_size
 * bytes). Greedy picks the lowest index among equal maxima. Returns the id. Thread-safe given its own work. */
size_t ax_sample_work_size(int vocab);
int ax_sample(const float *logits, int vocab, const ax_sample_params *p, uint64_t *rng, void *work);
/* Log-softmax value of `id`, and the k best (id, logprob) pairs, sorted best first. Returns k used. */
float ax_logprob_of(const float *logits, int vocab, int id);
int ax_top_logprobs(const float *logits, int vocab, int k, int32_t *ids, float *lps);

/* ---------------------------------------------------------------------------------------------------------
 * chat templates (chat.c)
 */
enum ax_chat_style { AX_CHAT_CHATML = 1, AX_CHAT_LLAMA3 = 2 };
typedef struct ax_chat_msg {
	const char *role;    /* "system", "user", "assistant", "tool" */
	const char *content; /* UTF-8 */
} ax_chat_msg;
/* Pick the style from the tokenizer's special tokens (<|start_header_id|> → Llama 3, else ChatML). */
int ax_chat_style_for(const ax_tok *t);
/* Render messages + the assistant generation prompt. enable_thinking = 0 adds Qwen3's empty
 * "<think>\n\n</think>\n\n" block. *out malloc'd. Returns its length, -EINVAL (unknown role), -ENOMEM. */
int ax_chat_render(int style, const ax_chat_msg *msgs, size_t n, int add_generation_prompt, int enable_thinking,
		   char **out);

/* ---------------------------------------------------------------------------------------------------------
 * the engine: requests and the scheduler (sched.c)
 */
typedef struct ax_engine ax_engine;
typedef struct ax_engine_config {
	const char *model_dir;
	int threads;       /* ≤ 0: all cores */
	int max_batch;     /* concurrent requests (index-table rows); default 8 */
	int ctx;           /* longest sequence; default min(max_pos, 4096) */
	int prefill_chunk; /* prompt tokens per request per step; default 256 */
	const char *shm_name; /* NULL = AX_SHM_DEFAULT_NAME */
	int no_export;     /* 1: no shm segment */
	int max_steps_per_s; /* pace: at most this many forward steps a second (0 = as fast as the cores go); lets a
			      * demo or a test watch tokens stream on a machine where the tiny model is too fast */
	int spare_core;    /* while a consumer (attnx-capture) is attached, run the forward on one thread fewer,
			    * leaving it a core: 0 = only when threads ≤ 0 (the default) and there are ≥ 4 cores,
			    * 1 = whenever there are ≥ 2 threads, -1 = never. Checked once per step; all threads
			    * come back when it detaches. */
} ax_engine_config;

#define AX_MAX_TOP_LOGPROBS 20
#define AX_MAX_STOP_IDS 16

typedef struct ax_gen_params {
	int max_tokens;    /* ≥ 1 */
	ax_sample_params sp;
	uint64_t seed;
	int has_seed;      /* 0: seeded from the clock */
	int logprobs;      /* 1: report the sampled token's logprob */
	int top_logprobs;  /* 0..AX_MAX_TOP_LOGPROBS */
	int ignore_eos;
	int n_stop_ids;
	int32_t stop_ids[AX_MAX_STOP_IDS]; /* extra stop token ids */
} ax_gen_params;

enum ax_finish { AX_FINISH_NONE = 0, AX_FINISH_STOP = 1, AX_FINISH_LENGTH = 2, AX_FINISH_ABORT = 3,
		 AX_FINISH_ERROR = 4 };

/* One generated token (or only the finish, token = -1). */
typedef struct ax_gen_event {
	int32_t token;
	float logprob;
	int n_top;
	int32_t top_ids[AX_MAX_TOP_LOGPROBS];
	float top_lps[AX_MAX_TOP_LOGPROBS];
	int finish;        /* enum ax_finish; set on the last event of a request */
	int stop_token;    /* 1 if `token` is the stop token that finished it (not shown to clients) */
} ax_gen_event;

typedef struct ax_req ax_req;

/* Load the model and tokenizer, create the KV cache (in the export segment unless no_export), start the
 * scheduler thread. Returns 0 or a negative errno (logged). */
int ax_engine_open(ax_engine **out, const ax_engine_config *cfg);
/* Stop the scheduler (pending requests end with AX_FINISH_ABORT), free everything. Accepts NULL. */
void ax_engine_close(ax_engine *e);
const ax_model_config *ax_engine_model_cfg(const ax_engine *e);
const ax_tok *ax_engine_tok(const ax_engine *e);
int ax_engine_ctx(const ax_engine *e);
int ax_engine_exporting(const ax_engine *e);
/* Compute threads the latest forward step used (all of them before the first step). Thread-safe. */
int ax_engine_threads(const ax_engine *e);

/* Queue a request. rid may be NULL (one is made). The prompt is copied. *out holds a reference the caller
 * releases with ax_req_release. Returns 0, -EINVAL (empty prompt, bad params), -E2BIG (prompt + max_tokens
 * longer than the context), -ESHUTDOWN. Thread-safe. */
int ax_engine_submit(ax_engine *e, const char *rid, const int32_t *prompt, int n, const ax_gen_params *p,
		     ax_req **out);
/* Wait for the next event (timeout_ms < 0: forever). Returns 1 with *ev, 0 on timeout, -ENODATA after the
 * finishing event was taken. Thread-safe for one consumer. */
int ax_req_next(ax_req *r, ax_gen_event *ev, int timeout_ms);
/* Ask the scheduler to end the request (AX_FINISH_ABORT). Thread-safe, idempotent. */
void ax_req_cancel(ax_req *r);
const char *ax_req_rid(const ax_req *r);
int ax_req_prompt_len(const ax_req *r);
void ax_req_release(ax_req *r);

/* ---------------------------------------------------------------------------------------------------------
 * HTTP server (server.c)
 */
typedef struct ax_server ax_server;
/* Serve `e` on listen ("127.0.0.1:8000"). Returns 0, -EADDRINUSE / -EINVAL (civetweb refused). */
int ax_server_open(ax_server **out, ax_engine *e, const char *listen, int http_threads);
void ax_server_close(ax_server *s);

#ifdef __cplusplus
}
#endif
#endif
