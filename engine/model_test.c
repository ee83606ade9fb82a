/*
 * model_test.c — the shipped model (engine/models/attnx-tiny) against reference data that Hugging Face produced
 * once on the GPU machine (engine/testdata/, written by scripts/train-tiny-model):
 *   - tokenizer: ids of every string equal HF tokenizers' ids, decode gives HF's text back, and the chat template
 *     rendered in C equals HF's apply_chat_template text and ids (with and without thinking);
 *   - forward: logits of rows of one prompt within 1e-3 of transformers' f32 eager forward;
 *   - greedy: 64 argmax tokens equal transformers' (EOS not special).
 * Runs from the engine/ source directory (meson sets workdir).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attnx_engine.h"

#define MODEL_DIR "models/attnx-tiny"

static int32_t *json_ids(json_t *arr, size_t *n)
{
	*n = json_array_size(arr);
	int32_t *v = malloc((*n + 1) * sizeof *v);
	for (size_t i = 0; i < *n; i++)
		v[i] = (int32_t)json_integer_value(json_array_get(arr, i));
	return v;
}

static void check_encode(const ax_tok *t, const char *text, int parse_special, json_t *want)
{
	int32_t *ids;
	int n = ax_tok_encode(t, text, strlen(text), parse_special, &ids);
	size_t wn;
	int32_t *w = json_ids(want, &wn);
	if (n != (int)wn)
		print_error("text %s: %d ids, want %zu\n", text, n, wn);
	assert_int_equal(n, (int)wn);
	for (int i = 0; i < n; i++)
		assert_int_equal(ids[i], w[i]);
	free(ids);
	free(w);
}

static void test_tokenizer_vs_hf(void **state)
{
	ax_tok *t;
	assert_int_equal(ax_tok_open(&t, MODEL_DIR "/tokenizer.json"), 0);
	json_t *d = json_load_file("testdata/tokenizer_ids.json", 0, NULL);
	assert_non_null(d);
	json_t *strs = json_object_get(d, "strings"), *ids = json_object_get(d, "ids"), *dec = json_object_get(d, "decoded");
	assert_true(json_array_size(strs) > 10);
	for (size_t i = 0; i < json_array_size(strs); i++) {
		const char *s = json_string_value(json_array_get(strs, i));
		check_encode(t, s, 1, json_array_get(ids, i));
		size_t n;
		int32_t *v = json_ids(json_array_get(ids, i), &n);
		char *back;
		assert_true(ax_tok_decode(t, v, n, 0, &back) >= 0);
		assert_string_equal(back, json_string_value(json_array_get(dec, i)));
		free(back);
		free(v);
	}
	/* the chat template, rendered in C, tokenized with special tokens */
	json_t *chat = json_object_get(d, "chat"), *msgs = json_object_get(chat, "messages");
	ax_chat_msg m[8];
	size_t nm = json_array_size(msgs);
	for (size_t i = 0; i < nm && i < 8; i++) {
		m[i].role = json_string_value(json_object_get(json_array_get(msgs, i), "role"));
		m[i].content = json_string_value(json_object_get(json_array_get(msgs, i), "content"));
	}
	char *txt;
	assert_int_equal(ax_chat_style_for(t), AX_CHAT_CHATML);
	assert_true(ax_chat_render(AX_CHAT_CHATML, m, nm, 1, 1, &txt) > 0);
	assert_string_equal(txt, json_string_value(json_object_get(chat, "text")));
	check_encode(t, txt, 1, json_object_get(chat, "ids"));
	free(txt);
	assert_true(ax_chat_render(AX_CHAT_CHATML, m, nm, 1, 0, &txt) > 0);
	assert_string_equal(txt, json_string_value(json_object_get(chat, "text_no_thinking")));
	free(txt);
	json_decref(d);
	ax_tok_close(t);
}

typedef struct rig {
	ax_model *m;
	ax_kv *kv;
	ax_pool *pool;
	ax_fwd_scratch *s;
	float *lg;
} rig;

static void rig_open(rig *r)
{
	assert_int_equal(ax_model_open(&r->m, MODEL_DIR), 0);
	const ax_model_config *c = ax_model_cfg(r->m);
	assert_int_equal(c->n_heads / c->n_kv_heads >= 2, 1);
	ax_kv_config kc = {c->n_layers, c->n_kv_heads, c->head_dim, 512, 1, 512, NULL, NULL};
	assert_int_equal(ax_kv_open(&r->kv, &kc), 0);
	assert_int_equal(ax_pool_open(&r->pool, 2), 0);
	assert_int_equal(ax_fwd_scratch_open(&r->s, r->m, 128, 2), 0);
	r->lg = malloc(sizeof(float) * c->vocab);
}

static void rig_close(rig *r)
{
	free(r->lg);
	ax_fwd_scratch_close(r->s);
	ax_pool_close(r->pool);
	ax_kv_close(r->kv);
	ax_model_close(r->m);
}

/* Run tokens [pos0, pos0+n) and return the last one's logits in r->lg. */
static void step(rig *r, const int32_t *tok, int pos0, int n)
{
	assert_int_equal(ax_kv_alloc(r->kv, 0, pos0, n), 0);
	ax_fwd_seq q = {0, pos0, n, tok + pos0, 1};
	assert_int_equal(ax_model_forward(r->m, r->kv, r->pool, r->s, &q, 1, r->lg, NULL, NULL), 0);
}

static void check_case(json_t *cs)
{
	rig r;
	rig_open(&r);
	int V = ax_model_cfg(r.m)->vocab;
	size_t n;
	int32_t *ids = json_ids(json_object_get(cs, "ids"), &n);
	int32_t *all = malloc((n + 64) * sizeof *all);
	memcpy(all, ids, n * sizeof *ids);
	json_t *rows = json_object_get(cs, "rows"), *logits = json_object_get(cs, "logits");
	int pos = 0;
	float worst = 0;
	for (size_t k = 0; k < json_array_size(rows); k++) {
		int row = (int)json_integer_value(json_array_get(rows, k));
		step(&r, all, pos, row + 1 - pos);
		pos = row + 1;
		json_t *want = json_array_get(logits, k);
		assert_int_equal((int)json_array_size(want), V);
		for (int i = 0; i < V; i++)
			worst = fmaxf(worst, fabsf(r.lg[i] - (float)json_number_value(json_array_get(want, i))));
	}
	print_message("max abs logit error vs transformers: %.2e\n", worst);
	assert_true(worst <= 1e-3f);
	assert_int_equal(pos, (int)n);
	/* greedy 64 from the prompt's last logits */
	size_t gn;
	int32_t *greedy = json_ids(json_object_get(cs, "greedy64"), &gn);
	for (size_t g = 0; g < gn; g++) {
		ax_sample_params sp = {0, 1, 0};
		int id = ax_sample(r.lg, V, &sp, NULL, NULL);
		if (id != greedy[g])
			print_error("greedy token %zu: %d, want %d\n", g, id, greedy[g]);
		assert_int_equal(id, greedy[g]);
		all[n + g] = id;
		step(&r, all, (int)(n + g), 1);
	}
	free(greedy);
	free(all);
	free(ids);
	rig_close(&r);
}

static void test_forward_vs_hf(void **state)
{
	json_t *d = json_load_file("testdata/reference_logits.json", 0, NULL);
	assert_non_null(d);
	const char *name;
	json_t *cs;
	json_object_foreach(json_object_get(d, "cases"), name, cs)
	{
		print_message("case %s\n", name);
		check_case(cs);
	}
	json_decref(d);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_tokenizer_vs_hf),
		cmocka_unit_test(test_forward_vs_hf),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
