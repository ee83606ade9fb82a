/*
 * engine_test.c — unit tests of the engine core (suite 'engine'): safetensors parsing and its error paths, dtype
 * conversions, the thread pool, the KV slot allocator, the batched forward against a naive reference on tiny
 * random checkpoints written to disk (f32 / bf16 / f16, tied / untied, Qwen3 q/k norms, q/k/v/o and MLP biases,
 * GQA, shards with an index, llama3 RoPE), config parsing and what it refuses, the byte-level BPE tokenizer on
 * hand-made tokenizer.json files (merge order, added tokens, round trips, bad input, pre-tokenizer chains and
 * Split behaviors, the BOS template, refused stages), sampling and logprobs, chat templates. The shipped model's reference data (engine/testdata/) is checked by
 * model_test.c.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "attnx_engine.h"
#include "testmodel.h"

/* ---- safetensors ------------------------------------------------------------------------------------- */

/* Build a file: 8-byte length, header, data. */
static size_t mk_st(uint8_t *buf, const char *hdr, const void *data, size_t dlen)
{
	size_t hl = strlen(hdr);
	for (int i = 0; i < 8; i++)
		buf[i] = (uint8_t)(hl >> (8 * i));
	memcpy(buf + 8, hdr, hl);
	memcpy(buf + 8 + hl, data, dlen);
	return 8 + hl + dlen;
}

static void test_st_valid(void **state)
{
	uint8_t buf[512];
	float data[6] = {1, 2, 3, 4, 5, 6};
	size_t n = mk_st(buf, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},\"__metadata__\":{}}", data,
			 sizeof data);
	ax_st *st;
	assert_int_equal(ax_st_open_mem(&st, buf, n), 0);
	assert_int_equal(ax_st_count(st), 1);
	const ax_st_tensor *t = ax_st_find(st, "a");
	assert_non_null(t);
	assert_int_equal(t->ndim, 2);
	assert_int_equal(t->shape[1], 3);
	float v5; /* the tensor's bytes need not be 4-byte aligned in this hand-made file */
	memcpy(&v5, (const uint8_t *)t->data + 5 * sizeof v5, sizeof v5);
	assert_float_equal(v5, 6.0f, 0);
	assert_null(ax_st_find(st, "b"));
	ax_st_close(st);
}

static void test_st_errors(void **state)
{
	static const char *bad[] = {
		"not json",
		"[1,2]",
		"{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,28]}}",   /* past the end */
		"{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}",   /* size ≠ shape */
		"{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[8,4]}}",    /* end < begin */
		"{\"a\":{\"dtype\":\"Q4\",\"shape\":[2,3],\"data_offsets\":[0,24]}}",    /* unknown dtype */
		"{\"a\":{\"dtype\":\"F32\",\"shape\":[-2,3],\"data_offsets\":[0,24]}}",  /* negative dim */
		"{\"a\":{\"dtype\":\"F32\",\"shape\":\"x\",\"data_offsets\":[0,24]}}",
		"{\"a\":3}",
	};
	uint8_t buf[512];
	float data[6] = {0};
	ax_st *st;
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		size_t n = mk_st(buf, bad[i], data, sizeof data);
		assert_int_equal(ax_st_open_mem(&st, buf, n), -EPROTO);
	}
	/* truncated: header length larger than the file, and a file shorter than 8 bytes */
	size_t n = mk_st(buf, "{}", data, 0);
	assert_int_equal(ax_st_open_mem(&st, buf, n - 1), -EPROTO);
	assert_int_equal(ax_st_open_mem(&st, buf, 5), -EPROTO);
	assert_int_equal(ax_st_open(&st, "/nonexistent/model.safetensors"), -ENOENT);
}

static void test_dtype_conv(void **state)
{
	static const float vals[] = {0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f, 3.14159f, -1e-3f};
	for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
		float h = ax_f16_to_f32(ax_f32_to_f16(vals[i]));
		assert_true(fabsf(h - vals[i]) <= fabsf(vals[i]) * 1e-3f + 1e-7f);
		float b = ax_bf16_to_f32(ax_f32_to_bf16(vals[i]));
		assert_true(fabsf(b - vals[i]) <= fabsf(vals[i]) * 8e-3f);
	}
	/* round to nearest even, and exactness of representable values */
	assert_int_equal(ax_f32_to_bf16(1.0f), 0x3f80);
	assert_int_equal(ax_f32_to_f16(1.0f), 0x3c00);
	assert_float_equal(ax_f16_to_f32(0x0001), 5.9604645e-08f, 0);
	assert_true(isinf(ax_f16_to_f32(ax_f32_to_f16(1e6f))));
}

/* ---- pool -------------------------------------------------------------------------------------------- */

typedef struct sum_job {
	int *hits;
} sum_job;

static void mark(void *ctx, int i0, int i1, int tid)
{
	sum_job *j = ctx;
	for (int i = i0; i < i1; i++)
		j->hits[i]++;
}

static void test_pool(void **state)
{
	ax_pool *p;
	assert_int_equal(ax_pool_open(&p, 4), 0);
	int hits[1000];
	for (int round = 0; round < 50; round++) {
		int n = 1 + round * 19;
		memset(hits, 0, sizeof hits);
		sum_job j = {hits};
		ax_pool_run(p, mark, &j, n);
		for (int i = 0; i < n; i++)
			assert_int_equal(hits[i], 1);
	}
	ax_pool_close(p);
	ax_pool_close(NULL);
}

typedef struct tid_job {
	int *hits;
	int want;           /* active workers: each one's first chunk waits (≤ 5 s) until all have arrived */
	atomic_int arrived;
	atomic_int tids[8]; /* items run per worker */
} tid_job;

/* Chunks are taken, not assigned, so on a busy machine the caller could take every chunk of a tiny job before
 * the workers wake; waiting for all active workers in their first chunk proves each of them joins the job (a
 * worker that never comes makes the job last 5 s and the check below fail, instead of hanging). */
static void mark_tid(void *ctx, int i0, int i1, int tid)
{
	tid_job *j = ctx;
	for (int i = i0; i < i1; i++)
		j->hits[i]++;
	if (atomic_fetch_add(&j->tids[tid], i1 - i0) == 0)
		atomic_fetch_add(&j->arrived, 1);
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	do {
		if (atomic_load(&j->arrived) >= j->want)
			return;
		sched_yield();
		clock_gettime(CLOCK_MONOTONIC, &t);
	} while (t.tv_sec - t0.tv_sec < 5);
}

/* ax_pool_set_active: a job runs on exactly workers 0..active-1 (each item once), the others never run, and
 * the count goes down and back up (the engine's capture-attached / detached switch) any number of times. */
static void test_pool_active(void **state)
{
	static const struct { int set, want; } steps[] = {
		{4, 4}, {3, 3}, {1, 1}, {2, 2}, {4, 4}, {0, 1}, {9, 4}, {3, 3}, {3, 3}, {4, 4}, {2, 2}, {-5, 1}, {4, 4},
	};
	ax_pool *p;
	assert_int_equal(ax_pool_open(&p, 4), 0);
	assert_int_equal(ax_pool_active(p), 4);
	int hits[400];
	for (size_t k = 0; k < sizeof steps / sizeof steps[0]; k++) {
		assert_int_equal(ax_pool_set_active(p, steps[k].set), steps[k].want);
		assert_int_equal(ax_pool_active(p), steps[k].want);
		for (int round = 0; round < 20; round++) {
			int n = 40 + round * 17;
			tid_job j = {.hits = hits, .want = steps[k].want};
			memset(hits, 0, sizeof hits);
			ax_pool_run(p, mark_tid, &j, n);
			for (int i = 0; i < n; i++)
				assert_int_equal(hits[i], 1);
			for (int t = 0; t < 4; t++) { /* every active worker joined, the parked ones never ran */
				if (t < steps[k].want)
					assert_true(atomic_load(&j.tids[t]) > 0);
				else
					assert_int_equal(atomic_load(&j.tids[t]), 0);
			}
		}
	}
	assert_int_equal(ax_pool_set_active(NULL, 3), 1);
	assert_int_equal(ax_pool_active(NULL), 1);
	ax_pool_close(p);
}

/* ---- KV slots ---------------------------------------------------------------------------------------- */

static void test_kv_slots(void **state)
{
	ax_kv *kv;
	ax_kv_config c = {.n_layers = 2, .n_kv_heads = 1, .head_dim = 4, .slots = 10, .rows = 2, .ctx = 8};
	assert_int_equal(ax_kv_open(&kv, &c), 0);
	assert_int_equal(ax_kv_alloc(kv, 0, 0, 6), 0);
	assert_int_equal(ax_kv_free_slots(kv), 4);
	assert_int_equal(ax_kv_alloc(kv, 1, 0, 5), -ENOSPC);
	assert_int_equal(ax_kv_alloc(kv, 1, 0, 9), -EINVAL); /* past ctx */
	assert_int_equal(ax_kv_alloc(kv, 2, 0, 1), -EINVAL); /* no such row */
	assert_int_equal(ax_kv_alloc(kv, 1, 0, 4), 0);
	/* all slots distinct */
	int seen[10] = {0};
	for (int r = 0; r < 2; r++)
		for (int p = 0; p < (r ? 4 : 6); p++)
			seen[ax_kv_index_row(kv, r)[p]]++;
	for (int i = 0; i < 10; i++)
		assert_int_equal(seen[i], 1);
	ax_kv_release(kv, 0, 6);
	assert_int_equal(ax_kv_free_slots(kv), 6);
	assert_int_equal(ax_kv_index_row(kv, 0)[0], -1);
	ax_kv_close(kv);
	c.slots = 0;
	assert_int_equal(ax_kv_open(&kv, &c), -EINVAL);
}

/* ---- forward vs reference ---------------------------------------------------------------------------- */

typedef struct fwd_case {
	const char *name;
	tm_spec spec;
	int threads;
} fwd_case;

static const fwd_case fwd_cases[] = {
	{"qwen3 f32 tied", {2, 32, 4, 2, 16, 48, 50, 1, 1, 0, AX_ST_F32, 10000.0f, 11, 0, 0, 0, 0, 0}, 1},
	{"llama bf16 untied bias gqa4", {2, 32, 4, 1, 8, 40, 61, 0, 0, 1, AX_ST_BF16, 500000.0f, 12, 0, 0, 0, 0, 0}, 3},
	{"qwen3 f16 untied", {3, 24, 6, 3, 8, 32, 40, 1, 0, 0, AX_ST_F16, 1000000.0f, 13, 0, 0, 0, 0, 0}, 2},
	/* sizes that are not multiples of the 8-float vectors: every kernel's scalar tail */
	{"qwen3 bf16 odd sizes", {2, 20, 2, 1, 10, 36, 37, 1, 1, 0, AX_ST_BF16, 10000.0f, 14, 0, 0, 0, 0, 0}, 2},
	/* Llama's attention_bias (o_proj too) and mlp_bias, weights in 3 shards with an index */
	{"llama f16 o/mlp biases, 3 shards", {2, 32, 4, 2, 8, 40, 45, 0, 0, 1, AX_ST_F16, 10000.0f, 15, 1, 1, 3, 0, 0}, 2},
	/* Llama 3.1 rope_scaling (all three wavelength bands at D 16), tied with a stray lm_head.weight to ignore */
	{"llama bf16 llama3 rope, tied + stray lm_head", {2, 32, 4, 1, 16, 40, 53, 0, 1, 0, AX_ST_BF16, 500000.0f, 16, 0, 0, 0, 1, 1}, 2},
};

static float max_err(const float *a, const float *b, int n, float *scale)
{
	float e = 0, s = 1;
	for (int i = 0; i < n; i++) {
		e = fmaxf(e, fabsf(a[i] - b[i]));
		s = fmaxf(s, fabsf(b[i]));
	}
	*scale = s;
	return e;
}

static void mkdir_tmp(char *dir, size_t cap)
{
	snprintf(dir, cap, "/tmp/attnx-engine-test-XXXXXX");
	assert_non_null(mkdtemp(dir));
}


/* Two requests, chunked prefill interleaved with decode, slots fragmented by a third row. */
static void run_fwd_case(const fwd_case *fc)
{
	tm_model tm;
	char dir[64];
	assert_int_equal(tm_make(&tm, &fc->spec), 0);
	mkdir_tmp(dir, sizeof dir);
	assert_int_equal(tm_write(&tm, dir), 0);
	ax_model *m;
	assert_int_equal(ax_model_open(&m, dir), 0);
	const ax_model_config *c = ax_model_cfg(m);
	assert_int_equal(c->qk_norm, fc->spec.qk_norm);
	ax_kv *kv;
	ax_kv_config kc = {c->n_layers, c->n_kv_heads, c->head_dim, 64, 3, 32, NULL, NULL};
	assert_int_equal(ax_kv_open(&kv, &kc), 0);
	ax_pool *pool;
	assert_int_equal(ax_pool_open(&pool, fc->threads), 0);
	ax_fwd_scratch *s;
	assert_int_equal(ax_fwd_scratch_open(&s, m, 16, fc->threads), 0);

	int V = c->vocab;
	int32_t A[12], B[9];
	for (int i = 0; i < 12; i++)
		A[i] = (i * 7 + 3) % V;
	for (int i = 0; i < 9; i++)
		B[i] = (i * 5 + 1) % V;
	float *refA = malloc(sizeof(float) * 12 * V), *refB = malloc(sizeof(float) * 9 * V);
	float *lg = malloc(sizeof(float) * 2 * V);
	tm_ref_forward(&tm, A, 12, refA);
	tm_ref_forward(&tm, B, 9, refB);
	assert_int_equal(ax_kv_alloc(kv, 2, 0, 5), 0); /* fragment the pool */
	/* step 1: A[0..4) no logits, B[0..4) logits at pos 3 */
	assert_int_equal(ax_kv_alloc(kv, 0, 0, 4), 0);
	assert_int_equal(ax_kv_alloc(kv, 1, 0, 4), 0);
	ax_fwd_seq st1[] = {{0, 0, 4, A, 0}, {1, 0, 4, B, 1}};
	assert_int_equal(ax_model_forward(m, kv, pool, s, st1, 2, lg, NULL, NULL), 0);
	float sc, e = max_err(lg + V, refB + 3 * V, V, &sc);
	assert_true(e < 1e-4f * sc);
	ax_kv_release(kv, 2, 5);
	int pa = 4, pb = 4;
	/* then: A's prompt rest [4..7), then decode both one token a step */
	while (pa < 12 || pb < 9) {
		ax_fwd_seq seqs[2];
		int n = 0, ia = -1, ib = -1;
		if (pa < 12) {
			int len = pa == 4 ? 3 : 1;
			assert_int_equal(ax_kv_alloc(kv, 0, pa, len), 0);
			ia = n;
			seqs[n++] = (ax_fwd_seq){0, pa, len, A + pa, 1};
			pa += len;
		}
		if (pb < 9) {
			assert_int_equal(ax_kv_alloc(kv, 1, pb, 1), 0);
			ib = n;
			seqs[n++] = (ax_fwd_seq){1, pb, 1, B + pb, 1};
			pb += 1;
		}
		assert_int_equal(ax_model_forward(m, kv, pool, s, seqs, n, lg, NULL, NULL), 0);
		if (ia >= 0) {
			e = max_err(lg + (size_t)ia * V, refA + (size_t)(pa - 1) * V, V, &sc);
			assert_true(e < 1e-4f * sc);
		}
		if (ib >= 0) {
			e = max_err(lg + (size_t)ib * V, refB + (size_t)(pb - 1) * V, V, &sc);
			assert_true(e < 1e-4f * sc);
		}
	}
	/* bad input: token out of range, slot not allocated, too many tokens */
	int32_t badtok = V;
	ax_fwd_seq bad1 = {0, 12, 1, &badtok, 1};
	assert_int_equal(ax_kv_alloc(kv, 0, 12, 1), 0);
	assert_int_equal(ax_model_forward(m, kv, pool, s, &bad1, 1, lg, NULL, NULL), -EINVAL);
	ax_fwd_seq bad2 = {0, 20, 1, A, 1};
	assert_int_equal(ax_model_forward(m, kv, pool, s, &bad2, 1, lg, NULL, NULL), -EINVAL);
	int32_t many[17] = {0};
	ax_fwd_seq bad3 = {2, 0, 17, many, 1};
	assert_int_equal(ax_model_forward(m, kv, pool, s, &bad3, 1, lg, NULL, NULL), -EINVAL);

	free(refA), free(refB), free(lg);
	ax_fwd_scratch_close(s);
	ax_pool_close(pool);
	ax_kv_close(kv);
	ax_model_close(m);
	tm_remove(dir);
	tm_free(&tm);
}

static void test_forward_cases(void **state)
{
	for (size_t i = 0; i < sizeof fwd_cases / sizeof fwd_cases[0]; i++) {
		print_message("forward case: %s\n", fwd_cases[i].name);
		run_fwd_case(&fwd_cases[i]);
	}
}

/* What the forward pass does not compute must be refused, not run wrong; what it does must parse. */
static void check_unsupported_configs(void)
{
#define BASE "{\"num_hidden_layers\":1,\"hidden_size\":32,\"num_attention_heads\":2,\"intermediate_size\":24,\"vocab_size\":20,"
	static const struct {
		const char *json;
		int rc, rope_type;
	} cases[] = {
		{BASE "\"model_type\":\"gemma\"}", -ENOTSUP, 0},
		{BASE "\"model_type\":\"smollm3\"}", -ENOTSUP, 0},
		{BASE "\"model_type\":\"llama\",\"hidden_act\":\"gelu\"}", -ENOTSUP, 0},
		{BASE "\"model_type\":\"qwen3\",\"use_sliding_window\":true}", -ENOTSUP, 0},
		{BASE "\"layer_types\":[\"full_attention\",\"sliding_attention\"]}", -ENOTSUP, 0},
		{BASE "\"rope_scaling\":{\"rope_type\":\"dynamic\",\"factor\":2}}", -ENOTSUP, 0},
		{BASE "\"rope_scaling\":{\"type\":\"llama3\",\"factor\":8}}", -ENOTSUP, 0}, /* numbers missing */
		{BASE "\"model_type\":\"qwen3\",\"use_sliding_window\":false,\"layer_types\":[\"full_attention\"],"
		      "\"hidden_act\":\"silu\"}", 0, AX_ROPE_DEFAULT},
		{BASE "\"model_type\":\"mistral\",\"sliding_window\":null}", 0, AX_ROPE_DEFAULT},
		{BASE "\"model_type\":\"mistral\",\"sliding_window\":64}", 0, AX_ROPE_DEFAULT},
		{BASE "\"rope_scaling\":{\"type\":\"linear\",\"factor\":4}}", 0, AX_ROPE_LINEAR},
		{BASE "\"rope_parameters\":{\"rope_type\":\"llama3\",\"rope_theta\":500000.0,\"factor\":32.0,"
		      "\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192}}", 0,
		 AX_ROPE_LLAMA3},
	};
#undef BASE
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		ax_model_config c;
		int rc = ax_model_parse_config(cases[i].json, strlen(cases[i].json), &c);
		if (rc != cases[i].rc)
			print_error("config %zu: %d, want %d\n", i, rc, cases[i].rc);
		assert_int_equal(rc, cases[i].rc);
		if (!rc)
			assert_int_equal(c.rope_type, cases[i].rope_type);
	}
	/* Mistral's window is kept (and clamps the engine's context); none when null */
	ax_model_config c;
	assert_int_equal(ax_model_parse_config(cases[9].json, strlen(cases[9].json), &c), 0);
	assert_int_equal(c.sliding_window, 64);
	assert_int_equal(ax_model_parse_config(cases[8].json, strlen(cases[8].json), &c), 0);
	assert_int_equal(c.sliding_window, 0);
	/* linear scaling divides every frequency; llama3 with rope_theta from rope_parameters */
	float f[8];
	assert_int_equal(ax_model_parse_config(cases[10].json, strlen(cases[10].json), &c), 0);
	ax_model_rope_freqs(&c, f);
	assert_float_equal(f[0], 0.25f, 1e-7);
	assert_float_equal(f[1], 0.25f / powf(10000.0f, 2.0f / 16), 1e-7);
	assert_int_equal(ax_model_parse_config(cases[11].json, strlen(cases[11].json), &c), 0);
	assert_float_equal(c.rope_theta, 500000.0f, 0);
	assert_float_equal(c.rope_factor, 32.0f, 0);
	assert_int_equal(c.rope_orig_max_pos, 8192);
}

static void test_model_errors(void **state)
{
	ax_model *m;
	assert_int_equal(ax_model_open(&m, "/nonexistent"), -ENOENT);
	tm_spec sp = {1, 16, 2, 1, 8, 24, 20, 0, 1, 0, AX_ST_F32, 10000.0f, 5, 0, 0, 0, 0, 0};
	tm_model tm;
	char dir[64], p[128];
	assert_int_equal(tm_make(&tm, &sp), 0);
	mkdir_tmp(dir, sizeof dir);
	assert_int_equal(tm_write(&tm, dir), 0);
	/* config disagrees with the tensors: a shape check must catch it */
	snprintf(p, sizeof p, "%s/config.json", dir);
	FILE *f = fopen(p, "w");
	fputs("{\"num_hidden_layers\":1,\"hidden_size\":32,\"num_attention_heads\":2,\"intermediate_size\":24,"
	      "\"vocab_size\":20,\"tie_word_embeddings\":true}",
	      f);
	fclose(f);
	assert_int_equal(ax_model_open(&m, dir), -EPROTO);
	/* garbage config */
	f = fopen(p, "w");
	fputs("{\"num_hidden_layers\": \"x\"", f);
	fclose(f);
	assert_int_equal(ax_model_open(&m, dir), -EPROTO);
	tm_remove(dir);
	tm_free(&tm);
	ax_model_config c;
	const char *rs = "{\"num_hidden_layers\":1,\"hidden_size\":32,\"num_attention_heads\":2,\"intermediate_size\":24,"
			 "\"vocab_size\":20,\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4}}";
	assert_int_equal(ax_model_parse_config(rs, strlen(rs), &c), -ENOTSUP);
	const char *eos = "{\"num_hidden_layers\":1,\"hidden_size\":32,\"num_attention_heads\":2,\"intermediate_size\":24,"
			  "\"vocab_size\":20,\"eos_token_id\":[5,7,5]}";
	assert_int_equal(ax_model_parse_config(eos, strlen(eos), &c), 0);
	assert_float_equal(c.rope_theta, 10000.0f, 0);
	const char *v5 = "{\"num_hidden_layers\":1,\"hidden_size\":32,\"num_attention_heads\":2,\"intermediate_size\":24,"
			 "\"vocab_size\":20,\"rope_parameters\":{\"rope_theta\":123.0,\"rope_type\":\"default\"}}";
	assert_int_equal(ax_model_parse_config(v5, strlen(v5), &c), 0);
	assert_float_equal(c.rope_theta, 123.0f, 0);
	const char *v5y = "{\"num_hidden_layers\":1,\"hidden_size\":32,\"num_attention_heads\":2,\"intermediate_size\":24,"
			  "\"vocab_size\":20,\"rope_parameters\":{\"rope_theta\":123.0,\"rope_type\":\"yarn\"}}";
	assert_int_equal(ax_model_parse_config(v5y, strlen(v5y), &c), -ENOTSUP);
	assert_int_equal(ax_model_parse_config(eos, strlen(eos), &c), 0);
	assert_int_equal(c.n_eos, 2);
	check_unsupported_configs();
	assert_int_equal(c.head_dim, 16);
	assert_int_equal(c.n_kv_heads, 2);
}

/* ---- tokenizer --------------------------------------------------------------------------------------- */

/* GPT-2 bytes_to_unicode, written independently of tok.c. */
static void byte_char(int b, char *out)
{
	int n = 0, cp = -1;
	for (int i = 0; i < 256; i++) {
		int keep = (i >= 33 && i <= 126) || (i >= 161 && i <= 172) || (i >= 174);
		int c = keep ? i : 256 + n++;
		if (i == b)
			cp = c;
	}
	if (cp < 0x80) {
		out[0] = (char)cp;
		out[1] = 0;
	} else {
		out[0] = (char)(0xc0 | (cp >> 6));
		out[1] = (char)(0x80 | (cp & 0x3f));
		out[2] = 0;
	}
}

#define QWEN2_RE                                                                                                 \
	"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"  \
	"\\s+(?!\\S)|\\s+"

/* ids: byte b → b; merges 256..; added 300.. */
static char *mk_tokenizer_json(void)
{
	json_t *vocab = json_object();
	char bc[4];
	for (int b = 0; b < 256; b++) {
		byte_char(b, bc);
		json_object_set_new(vocab, bc, json_integer(b));
	}
	static const char *merged[] = {"Ġt", "he", "Ġthe", "ll", "ell"};
	for (int i = 0; i < 5; i++)
		json_object_set_new(vocab, merged[i], json_integer(256 + i));
	json_t *merges = json_pack("[s,s,s,s,s]", "Ġ t", "h e", "Ġt he", "l l", "e ll");
	json_t *added = json_pack("[{s:i,s:s,s:b},{s:i,s:s,s:b},{s:i,s:s,s:b}]", "id", 300, "content", "<|im_start|>",
				  "special", 1, "id", 301, "content", "<|im_end|>", "special", 1, "id", 302, "content",
				  "<think>", "special", 0);
	json_t *root = json_pack("{s:o,s:{s:s,s:[{s:s,s:{s:s},s:s,s:b},{s:s,s:b,s:b}]},s:{s:s,s:o,s:o}}", "added_tokens",
				 added, "pre_tokenizer", "type", "Sequence", "pretokenizers", "type", "Split", "pattern",
				 "Regex", QWEN2_RE, "behavior", "Isolated", "invert", 0, "type", "ByteLevel",
				 "add_prefix_space", 0, "use_regex", 0, "model", "type", "BPE", "vocab", vocab, "merges",
				 merges);
	char *s = json_dumps(root, 0);
	json_decref(root);
	return s;
}

static int setup_tok(void **state)
{
	char *js = mk_tokenizer_json();
	ax_tok *t;
	int rc = ax_tok_open_mem(&t, js, strlen(js));
	free(js);
	*state = t;
	return rc;
}

static int teardown_tok(void **state)
{
	ax_tok_close(*state);
	return 0;
}

static void test_tok_ids(void **state)
{
	const ax_tok *t = *state;
	char sp[4];
	byte_char(' ', sp);
	int32_t G = ax_tok_find(t, sp); /* "Ġ" */
	assert_int_equal(G, ' ');
	struct {
		const char *text;
		int parse_special;
		int n;
		int32_t ids[12];
	} cases[] = {
		{"the hello", 0, 6, {'t', 257, ' ', 257, 259, 'o'}},
		{" the", 0, 1, {258}},
		{"<|im_start|>the", 1, 3, {300, 't', 257}},
		{"<|im_start|>", 0, 12, {'<', '|', 'i', 'm', '_', 's', 't', 'a', 'r', 't', '|', '>'}},
		{"<think>x", 0, 2, {302, 'x'}},
		{"a12", 0, 3, {'a', '1', '2'}},
		{"", 0, 0, {0}},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		int32_t *ids;
		int n = ax_tok_encode(t, cases[i].text, strlen(cases[i].text), cases[i].parse_special, &ids);
		assert_int_equal(n, cases[i].n);
		for (int k = 0; k < n; k++)
			assert_int_equal(ids[k], cases[i].ids[k]);
		free(ids);
	}
}

static void test_tok_roundtrip(void **state)
{
	const ax_tok *t = *state;
	static const char *texts[] = {
		"Hello, world! The  quick\tbrown fox.\n\nNew paragraph.",
		"naïve café — 東京 🙂 ü",
		"<|im_start|>user\nWhat is 123+456?<|im_end|>\n<think>\n</think>",
		"   leading spaces and trailing   ",
		"it's we'll THEY'RE 3.14159 x=y+z;",
	};
	for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
		int32_t *ids;
		char *back;
		int n = ax_tok_encode(t, texts[i], strlen(texts[i]), 1, &ids);
		assert_true(n > 0);
		int len = ax_tok_decode(t, ids, (size_t)n, 0, &back);
		assert_int_equal(len, (int)strlen(texts[i]));
		assert_string_equal(back, texts[i]);
		free(back);
		free(ids);
	}
	/* skip_special drops special tokens only */
	int32_t ids[] = {300, 't', 257, 302, 301};
	char *out;
	assert_int_equal(ax_tok_decode(t, ids, 5, 1, &out), 10);
	assert_string_equal(out, "the<think>");
	free(out);
	int32_t bad[] = {5000};
	assert_int_equal(ax_tok_decode(t, bad, 1, 0, &out), -EINVAL);
}

/* A byte-level tokenizer (ids: byte b → b, then the merges' results 256.., added <s> 300 and </s> 301) with the
 * given pre-tokenizer, normalizer and post-processor (each NULL for none; references stolen). */
static int open_tok(ax_tok **t, json_t *pre, json_t *norm, json_t *post, const char *const *merges, int n_merges)
{
	json_t *vocab = json_object(), *ml = json_array();
	char bc[4];
	for (int b = 0; b < 256; b++) {
		byte_char(b, bc);
		json_object_set_new(vocab, bc, json_integer(b));
	}
	for (int i = 0; i < n_merges; i++) {
		char merged[16];
		const char *sp = strchr(merges[i], ' ');
		snprintf(merged, sizeof merged, "%.*s%s", (int)(sp - merges[i]), merges[i], sp + 1);
		json_object_set_new(vocab, merged, json_integer(256 + i));
		json_array_append_new(ml, json_string(merges[i]));
	}
	json_t *root = json_pack("{s:[{s:i,s:s,s:b},{s:i,s:s,s:b}],s:{s:s,s:o,s:o},s:{s:s}}", "added_tokens", "id", 300,
				 "content", "<s>", "special", 1, "id", 301, "content", "</s>", "special", 1, "model", "type",
				 "BPE", "vocab", vocab, "merges", ml, "decoder", "type", "ByteLevel");
	json_object_set_new(root, "pre_tokenizer", pre ? pre : json_null());
	json_object_set_new(root, "normalizer", norm ? norm : json_null());
	json_object_set_new(root, "post_processor", post ? post : json_null());
	char *js = json_dumps(root, 0);
	json_decref(root);
	int rc = ax_tok_open_mem(t, js, strlen(js));
	free(js);
	return rc;
}

static json_t *byte_level(int use_regex)
{
	return json_pack("{s:s,s:b,s:b,s:b}", "type", "ByteLevel", "add_prefix_space", 0, "trim_offsets", 1, "use_regex",
			 use_regex);
}

static void expect_ids(const ax_tok *t, const char *text, int prompt, const int32_t *want, int n_want)
{
	int32_t *ids;
	int n = prompt ? ax_tok_encode_prompt(t, text, strlen(text), &ids) : ax_tok_encode(t, text, strlen(text), 0, &ids);
	if (n != n_want)
		print_error("'%s': %d ids, want %d\n", text, n, n_want);
	assert_int_equal(n, n_want);
	for (int i = 0; i < n; i++)
		assert_int_equal(ids[i], want[i]);
	free(ids);
}

/* The pre-tokenizer chain: SmolLM's Digits + ByteLevel regex, every Split behavior, the BOS template. */
static void test_tok_pipeline(void **state)
{
	(void)state;
	ax_tok *t;
	/* merges: "12" 256, "Ġ1" 257, "ab" 258, "abc" 259 */
	static const char *const dm[] = {"1 2", "\xc4\xa0 1", "a b", "ab c"};
	static const struct {
		int digits; /* 0: none (GPT-2 regex alone), 1: individual, 2: runs */
		int n;
		int32_t ids[6];
	} dc[] = {
		{0, 3, {259, ' ', 256}}, /* "abc", " 12": "1 2" outranks "Ġ 1" */
		{1, 4, {259, ' ', '1', '2'}}, /* "abc " | "1" | "2", then "abc" | " " */
		{2, 3, {259, ' ', 256}},      /* "abc " | "12" */
	};
	for (size_t i = 0; i < sizeof dc / sizeof dc[0]; i++) {
		json_t *pre = dc[i].digits ? json_pack("{s:s,s:[{s:s,s:b},o]}", "type", "Sequence", "pretokenizers", "type",
						       "Digits", "individual_digits", dc[i].digits == 1, byte_level(1))
					   : byte_level(1);
		assert_int_equal(open_tok(&t, pre, NULL, NULL, dm, 4), 0);
		expect_ids(t, "abc 12", 0, dc[i].ids, dc[i].n);
		ax_tok_close(t);
	}
	/* Split on "-" (a String pattern) with each behavior; merges "a-" 256, "-b" 257, "--" 258 */
	static const char *const sm[] = {"a -", "- b", "- -"};
	static const struct {
		const char *behavior;
		int invert, n;
		int32_t ids[6];
	} sc[] = {
		{"Isolated", 0, 6, {'a', '-', 'b', '-', '-', 'c'}},
		{"Removed", 0, 3, {'a', 'b', 'c'}},
		{"MergedWithPrevious", 0, 5, {256, 'b', '-', '-', 'c'}}, /* "a-" "b-" "-" "c" */
		{"MergedWithNext", 0, 5, {'a', 257, '-', '-', 'c'}},     /* "a" "-b" "-" "-c" */
		{"Contiguous", 0, 5, {'a', '-', 'b', 258, 'c'}},        /* "a" "-" "b" "--" "c" */
		{"Removed", 1, 3, {'-', '-', '-'}},                     /* invert: the letters are the delimiters */
	};
	for (size_t i = 0; i < sizeof sc / sizeof sc[0]; i++) {
		json_t *pre = json_pack("{s:s,s:[{s:s,s:{s:s},s:s,s:b},o]}", "type", "Sequence", "pretokenizers", "type",
					"Split", "pattern", "String", "-", "behavior", sc[i].behavior, "invert", sc[i].invert,
					byte_level(0));
		assert_int_equal(open_tok(&t, pre, NULL, NULL, sm, 3), 0);
		print_message("split %s%s\n", sc[i].behavior, sc[i].invert ? " inverted" : "");
		expect_ids(t, "a-b--c", 0, sc[i].ids, sc[i].n);
		ax_tok_close(t);
	}
	/* Llama 3's post-processor: <s> before (and here </s> after) a prompt, nothing for plain encode */
	json_t *post = json_pack("{s:s,s:[{s:s,s:b},{s:s,s:[{s:{s:s,s:i}},{s:{s:s,s:i}},{s:{s:s,s:i}}],s:{s:{s:[i]},s:{s:[i]}}}]}",
				 "type", "Sequence", "processors", "type", "ByteLevel", "trim_offsets", 0, "type",
				 "TemplateProcessing", "single", "SpecialToken", "id", "<s>", "type_id", 0, "Sequence", "id", "A",
				 "type_id", 0, "SpecialToken", "id", "</s>", "type_id", 0, "special_tokens", "<s>", "ids", 300,
				 "</s>", "ids", 301);
	assert_int_equal(open_tok(&t, byte_level(1), json_pack("{s:s}", "type", "NFC"), post, dm, 4), 0);
	expect_ids(t, "abc", 1, (const int32_t[]){300, 259, 301}, 3);
	expect_ids(t, "abc", 0, (const int32_t[]){259}, 1);
	expect_ids(t, "", 1, (const int32_t[]){300, 301}, 2);
	ax_tok_close(t);
	/* what tok.c does not implement is refused, not run differently from HF */
	json_t *refused[] = {
		json_pack("{s:s,s:s}", "type", "Metaspace", "replacement", "_"),
		json_pack("{s:s,s:b,s:b}", "type", "ByteLevel", "add_prefix_space", 1, "use_regex", 1),
		json_pack("{s:s,s:{s:s},s:s}", "type", "Split", "pattern", "String", "-", "behavior", "Sideways"),
		json_pack("{s:s,s:[{s:s}]}", "type", "Sequence", "pretokenizers", "type", "Whitespace"),
	};
	for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++)
		assert_int_equal(open_tok(&t, refused[i], NULL, NULL, dm, 4), -ENOTSUP);
	assert_int_equal(open_tok(&t, byte_level(1), json_pack("{s:s}", "type", "Lowercase"), NULL, dm, 4), -ENOTSUP);
	assert_int_equal(open_tok(&t, byte_level(1), json_pack("{s:s,s:[{s:s},{s:s}]}", "type", "Sequence", "normalizers",
							      "type", "NFC", "type", "NFKC"), NULL, dm, 4), -ENOTSUP);
	assert_int_equal(open_tok(&t, json_pack("{s:s,s:{s:s}}", "type", "Split", "pattern", "Regex", "(unclosed"), NULL,
				  NULL, dm, 4), -EPROTO);
}

static void test_tok_errors(void **state)
{
	const ax_tok *t = *state;
	int32_t *ids;
	const char inv[] = "ab\xff\xfe";
	assert_int_equal(ax_tok_encode(t, inv, 4, 0, &ids), -EILSEQ);
	ax_tok *t2;
	assert_int_equal(ax_tok_open_mem(&t2, "{", 1), -EPROTO);
	const char *wp = "{\"model\":{\"type\":\"WordPiece\",\"vocab\":{}}}";
	assert_int_equal(ax_tok_open_mem(&t2, wp, strlen(wp)), -ENOTSUP);
	const char *badmerge = "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[3]}}";
	assert_int_equal(ax_tok_open_mem(&t2, badmerge, strlen(badmerge)), -EPROTO);
	assert_int_equal(ax_tok_open(&t2, "/nonexistent/tokenizer.json"), -ENOENT);
}

/* ---- sampling ---------------------------------------------------------------------------------------- */

static void test_sampling(void **state)
{
	float lg[6] = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f, -3.0f};
	void *work = malloc(ax_sample_work_size(6));
	uint64_t rng = 42;
	ax_sample_params greedy = {0, 1, 0};
	assert_int_equal(ax_sample(lg, 6, &greedy, &rng, work), 1); /* lowest index among ties */
	ax_sample_params nucleus = {1.0f, 0.01f, 0};
	for (int i = 0; i < 20; i++) {
		int id = ax_sample(lg, 6, &nucleus, &rng, work);
		assert_true(id == 1 || id == 3);
	}
	/* a seed reproduces; the distribution roughly follows softmax */
	ax_sample_params warm = {1.0f, 1.0f, 0};
	uint64_t r1 = 7, r2 = 7;
	int counts[6] = {0};
	for (int i = 0; i < 4000; i++) {
		int a = ax_sample(lg, 6, &warm, &r1, work), b = ax_sample(lg, 6, &warm, &r2, work);
		assert_int_equal(a, b);
		counts[a]++;
	}
	float z = 0;
	for (int i = 0; i < 6; i++)
		z += expf(lg[i]);
	for (int i = 0; i < 6; i++)
		assert_true(fabsf(counts[i] / 4000.0f - expf(lg[i]) / z) < 0.03f);
	ax_sample_params topk = {1.0f, 1.0f, 2};
	for (int i = 0; i < 50; i++) {
		int id = ax_sample(lg, 6, &topk, &rng, work);
		assert_true(id == 1 || id == 3);
	}
	int32_t ids[3];
	float lps[3];
	assert_int_equal(ax_top_logprobs(lg, 6, 3, ids, lps), 3);
	assert_int_equal(ids[0], 1);
	assert_int_equal(ids[1], 3);
	assert_int_equal(ids[2], 4);
	assert_true(lps[0] >= lps[1] && lps[1] >= lps[2]);
	assert_float_equal(lps[0], ax_logprob_of(lg, 6, 1), 1e-6);
	float tot = 0;
	for (int i = 0; i < 6; i++)
		tot += expf(ax_logprob_of(lg, 6, i));
	assert_float_equal(tot, 1.0f, 1e-5);
	assert_true(isinf(ax_logprob_of(lg, 6, 6)));
	free(work);
}

/* ---- chat -------------------------------------------------------------------------------------------- */

static void test_chat(void **state)
{
	ax_chat_msg msgs[] = {{"system", "Be brief."}, {"user", "Hi"}};
	char *out;
	int n = ax_chat_render(AX_CHAT_CHATML, msgs, 2, 1, 1, &out);
	assert_string_equal(out, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
				 "<|im_start|>assistant\n");
	assert_int_equal(n, (int)strlen(out));
	free(out);
	ax_chat_render(AX_CHAT_CHATML, msgs + 1, 1, 1, 0, &out);
	assert_string_equal(out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
	free(out);
	ax_chat_render(AX_CHAT_LLAMA3, msgs + 1, 1, 1, 1, &out);
	assert_string_equal(out, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
				 "<|start_header_id|>assistant<|end_header_id|>\n\n");
	free(out);
	ax_chat_msg bad[] = {{"wizard", "x"}};
	assert_int_equal(ax_chat_render(AX_CHAT_CHATML, bad, 1, 1, 1, &out), -EINVAL);
	ax_chat_msg nul[] = {{"user", NULL}};
	assert_int_equal(ax_chat_render(AX_CHAT_CHATML, nul, 1, 1, 1, &out), -EINVAL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_st_valid),
		cmocka_unit_test(test_st_errors),
		cmocka_unit_test(test_dtype_conv),
		cmocka_unit_test(test_pool),
		cmocka_unit_test(test_pool_active),
		cmocka_unit_test(test_kv_slots),
		cmocka_unit_test(test_forward_cases),
		cmocka_unit_test(test_model_errors),
		cmocka_unit_test_setup_teardown(test_tok_ids, setup_tok, teardown_tok),
		cmocka_unit_test_setup_teardown(test_tok_roundtrip, setup_tok, teardown_tok),
		cmocka_unit_test_setup_teardown(test_tok_errors, setup_tok, teardown_tok),
		cmocka_unit_test(test_tok_pipeline),
		cmocka_unit_test(test_sampling),
		cmocka_unit_test(test_chat),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
