/*
 * merge_test.c — the attention merge: alignment of entries to chunks (token i ≥ 1 → position P+i-1, token 0 →
 * prompt_attention), the bounded hold, late entries in an extra chunk, chunk order kept, several layers, heads
 * mode, completions placement, non-streamed bodies, the end of stream waiting for due entries, a prompt length
 * learnt late, token counting from usage, non-JSON events passed through; the row of a stop token (finish-only
 * chunk), a usage-only chunk's entries, rows no chunk carried (sent before DONE), policy stride / max_tokens,
 * per-token texts from logprobs, and non-streamed entry texts (with the relay's own logprobs stripped); several
 * captures' (TP ranks') `end`s, all of the live ones awaited.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "relay_int.h"

#define MS 1000000ull
#define WAIT (50 * MS)

typedef struct out {
	json_t *ev[32]; /* chunks (objects) or strings for RAW */
	int n;
	int done;
} out;

static int collect(int what, const char *text, size_t len, void *arg)
{
	out *o = arg;
	if (what == AX_MOUT_DONE) {
		o->done++;
		return 0;
	}
	assert_false(o->done); /* nothing after DONE */
	assert_true(o->n < 32);
	o->ev[o->n++] = what == AX_MOUT_RAW ? json_stringn(text, len) : json_loadb(text, len, JSON_ALLOW_NUL, NULL);
	assert_non_null(o->ev[o->n - 1]);
	return 0;
}

static void out_free(out *o)
{
	for (int i = 0; i < o->n; i++)
		json_decref(o->ev[i]);
	memset(o, 0, sizeof *o);
}

static ax_rec_attn attn(int64_t pos, int32_t layer, int32_t head, int mode)
{
	ax_rec_attn a;
	memset(&a, 0, sizeof a);
	a.position = pos;
	a.token_id = 1000 + pos;
	a.layer_id = layer;
	a.head_id = head;
	a.mode = (uint32_t)mode;
	a.k = 2;
	a.token_positions[0] = pos;
	a.token_positions[1] = 0;
	a.topk_logits[0] = 2.0f;
	a.topk_logits[1] = 1.0f;
	a.attention_scores[0] = 0.75f;
	a.attention_scores[1] = 0.25f;
	a.logsumexp_all = 3.5;
	a.topk_mass = 0.5;
	a.prefill = pos < 5;
	a.decode_step = pos < 5 ? 0 : pos - 4;
	return a;
}

static void add(ax_merge *m, int64_t pos)
{
	ax_rec_attn a = attn(pos, 7, -1, AX_MODE_MEAN_LOGIT);
	assert_int_equal(ax__merge_add(m, &a), 0);
}

static void chunk(ax_merge *m, const char *content, uint64_t t)
{
	char b[256];
	if (content)
		snprintf(b, sizeof b,
			 "{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,"
			 "\"delta\":{\"content\":\"%s\"},\"finish_reason\":null}]}",
			 content);
	else
		snprintf(b, sizeof b, "{\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}");
	assert_int_equal(ax__merge_chunk(m, b, strlen(b), t), 0);
}

static ax_merge *chat(uint32_t expected, int want_prompt)
{
	ax_merge_cfg cfg = {.kind = AX_RK_CHAT, .stream = 1, .want_prompt = want_prompt, .expected = expected,
			    .wait_ns = WAIT};
	ax_merge *m = ax__merge_new(&cfg);
	assert_non_null(m);
	return m;
}

static json_t *delta(out *o, int i)
{
	return json_object_get(json_array_get(json_object_get(o->ev[i], "choices"), 0), "delta");
}

static json_int_t pos_of(json_t *entries, size_t i)
{
	return json_integer_value(json_object_get(json_array_get(entries, i), "position"));
}

/* P = 5, rows 4..6 captured, chunks: role, "A", `second`, "C"; upstream done; everything polled into *o. */
static ax_merge *three_tokens(out *o, const char *second)
{
	ax_merge *m = chat(1, 0);
	ax__merge_set_prompt_len(m, 5);
	for (int p = 4; p <= 6; p++)
		add(m, p);
	chunk(m, NULL, 0);
	chunk(m, "A", 0);
	chunk(m, second, 0);
	chunk(m, "C", 0);
	ax__merge_upstream_done(m, 0);
	assert_int_equal(ax__merge_poll(m, 1, collect, o), 0);
	assert_int_equal(o->n, 4);
	return m;
}

/* A token whose text is a NUL byte (byte-level vocabularies have one; the engine sends it as "\u0000", as
 * tokenizers' decode gives it): the chunk is merged like any other, its content kept, and the next chunk carries
 * the entry of that token's position. */
static void nul_text(void **state)
{
	out o = {0};
	ax_merge *m = three_tokens(&o, "\\u0000");
	for (int i = 0; i < 4; i++)
		assert_true(json_is_object(o.ev[i])); /* merged, not passed through raw */
	json_t *c = json_object_get(delta(&o, 2), "content");
	assert_int_equal(json_string_length(c), 1);
	assert_int_equal(json_string_value(c)[0], 0);
	assert_int_equal(json_array_size(json_object_get(delta(&o, 2), "attention_tokens")), 1);
	assert_int_equal(pos_of(json_object_get(delta(&o, 3), "attention_tokens"), 0), 6);
	out_free(&o);
	ax__merge_free(m);
	(void)state;
}

/* P = 5; tokens A B C; the A chunk carries prompt_attention [4], B carries 5, C carries 6. */
static void alignment(void **state)
{
	out o = {0};
	ax_merge *m = three_tokens(&o, "B");
	assert_int_equal(o.done, 1);
	assert_null(json_object_get(delta(&o, 0), "attention_tokens"));
	json_t *pa = json_object_get(delta(&o, 1), "prompt_attention");
	assert_int_equal(json_array_size(pa), 1);
	assert_int_equal(pos_of(pa, 0), 4);
	assert_null(json_object_get(delta(&o, 1), "attention_tokens"));
	json_t *b = json_object_get(delta(&o, 2), "attention_tokens");
	assert_int_equal(json_array_size(b), 1);
	json_t *e = json_array_get(b, 0);
	assert_int_equal(pos_of(b, 0), 5);
	assert_int_equal(json_integer_value(json_object_get(e, "token_id")), 1005);
	assert_string_equal(json_string_value(json_object_get(e, "text")), "A"); /* the token at position 5 is g0 */
	assert_int_equal(json_integer_value(json_object_get(e, "layer_id")), 7);
	assert_string_equal(json_string_value(json_object_get(e, "mode")), "mean_logit");
	assert_int_equal(json_array_size(json_object_get(e, "token_positions")), 2);
	assert_true(json_real_value(json_array_get(json_object_get(e, "attention_scores"), 0)) == 0.75);
	assert_true(json_real_value(json_object_get(e, "logsumexp_all")) == 3.5);
	assert_null(json_object_get(e, "layers"));
	assert_int_equal(pos_of(json_object_get(delta(&o, 3), "attention_tokens"), 0), 6);
	assert_string_equal(json_string_value(json_object_get(delta(&o, 3), "content")), "C");
	out_free(&o);
	ax__merge_free(m);
}

/* A chunk waits for its entry, and leaves as soon as it arrives. */
static void hold_then_release(void **state)
{
	ax_merge *m = chat(1, 0);
	out o = {0};
	ax__merge_set_prompt_len(m, 5);
	add(m, 4);
	chunk(m, "A", 0);
	chunk(m, "B", 10 * MS);
	int64_t next = ax__merge_poll(m, 11 * MS, collect, &o);
	assert_int_equal(o.n, 1);                    /* A went, B waits for position 5 */
	assert_int_equal(next, (int64_t)(10 * MS + WAIT)); /* the hold ends 50 ms after B arrived */
	add(m, 5);
	ax__merge_poll(m, 12 * MS, collect, &o);
	assert_int_equal(o.n, 2);
	assert_int_equal(pos_of(json_object_get(delta(&o, 1), "attention_tokens"), 0), 5);
	assert_int_equal(ax__merge_late_entries(m), 0);
	out_free(&o);
	ax__merge_free(m);
}

/* The hold ends without the entry; it comes later in an extra chunk; B is never dropped and C never overtakes. */
static void late_entry(void **state)
{
	ax_merge *m = chat(1, 0);
	out o = {0};
	ax__merge_set_prompt_len(m, 5);
	add(m, 4);
	add(m, 6); /* C's entry is there, B's is not */
	chunk(m, "A", 0);
	chunk(m, "B", 0);
	chunk(m, "C", 1 * MS);
	ax__merge_poll(m, 2 * MS, collect, &o);
	assert_int_equal(o.n, 1); /* C waits behind B */
	ax__merge_poll(m, WAIT, collect, &o);
	assert_int_equal(o.n, 3);
	assert_null(json_object_get(delta(&o, 1), "attention_tokens"));
	assert_string_equal(json_string_value(json_object_get(delta(&o, 1), "content")), "B");
	assert_int_equal(pos_of(json_object_get(delta(&o, 2), "attention_tokens"), 0), 6);
	add(m, 5);
	ax__merge_poll(m, WAIT + 1, collect, &o);
	assert_int_equal(o.n, 4);
	json_t *d = delta(&o, 3);
	assert_string_equal(json_string_value(json_object_get(d, "content")), "");
	assert_int_equal(pos_of(json_object_get(d, "attention_tokens"), 0), 5);
	assert_string_equal(json_string_value(json_object_get(o.ev[3], "id")), "c1"); /* same stream id */
	assert_int_equal(ax__merge_late_entries(m), 1);
	out_free(&o);
	ax__merge_free(m);
}

/* Two layers: a position is complete with both; the top layer is at top level, both under "layers". */
static void several_layers(void **state)
{
	ax_merge *m = chat(2, 0);
	out o = {0};
	ax__merge_set_prompt_len(m, 5);
	ax_rec_attn a = attn(4, 3, -1, AX_MODE_MEAN_LOGIT), b = attn(4, 7, -1, AX_MODE_MEAN_LOGIT);
	b.logsumexp_all = 9.0;
	assert_int_equal(ax__merge_add(m, &a), 0);
	chunk(m, "A", 0);
	ax__merge_poll(m, 1, collect, &o);
	assert_int_equal(o.n, 0); /* one of two layers: waits */
	assert_int_equal(ax__merge_add(m, &b), 0);
	ax__merge_poll(m, 2, collect, &o);
	assert_int_equal(o.n, 1);
	json_t *e = json_array_get(json_object_get(delta(&o, 0), "prompt_attention"), 0);
	assert_int_equal(json_integer_value(json_object_get(e, "layer_id")), 7);
	assert_true(json_real_value(json_object_get(e, "logsumexp_all")) == 9.0);
	json_t *layers = json_object_get(e, "layers");
	assert_int_equal(json_object_size(layers), 2);
	assert_true(json_real_value(json_object_get(json_object_get(layers, "3"), "logsumexp_all")) == 3.5);
	assert_int_equal(json_integer_value(json_object_get(json_object_get(layers, "7"), "layer_id")), 7);
	out_free(&o);
	ax__merge_free(m);
}

static void heads_mode(void **state)
{
	ax_merge *m = chat(2, 0);
	out o = {0};
	ax__merge_set_prompt_len(m, 5);
	ax_rec_attn h1 = attn(4, 2, 1, AX_MODE_HEADS), h0 = attn(4, 2, 0, AX_MODE_HEADS);
	h1.logsumexp_all = 1.0;
	ax__merge_add(m, &h1);
	ax__merge_add(m, &h0);
	chunk(m, "A", 0);
	ax__merge_poll(m, 1, collect, &o);
	assert_int_equal(o.n, 1);
	json_t *e = json_array_get(json_object_get(delta(&o, 0), "prompt_attention"), 0);
	assert_string_equal(json_string_value(json_object_get(e, "mode")), "heads");
	assert_int_equal(json_integer_value(json_object_get(e, "head_id")), 0); /* lowest head at top level */
	json_t *heads = json_object_get(e, "heads");
	assert_int_equal(json_array_size(heads), 2);
	assert_int_equal(json_integer_value(json_object_get(json_array_get(heads, 1), "head_id")), 1);
	assert_true(json_real_value(json_object_get(json_array_get(heads, 1), "logsumexp_all")) == 1.0);
	assert_non_null(json_object_get(json_object_get(json_object_get(e, "layers"), "2"), "heads"));
	out_free(&o);
	ax__merge_free(m);
}

/* Completions streams carry entries in choices[0] itself; token counts come from logprobs when present. */
static void completions_stream(void **state)
{
	ax_merge_cfg cfg = {.kind = AX_RK_COMPLETION, .stream = 1, .expected = 1, .wait_ns = WAIT};
	ax_merge *m = ax__merge_new(&cfg);
	out o = {0};
	ax__merge_set_prompt_len(m, 5);
	add(m, 4);
	add(m, 5);
	add(m, 6);
	const char *c1 = "{\"choices\":[{\"index\":0,\"text\":\"AB\",\"logprobs\":{\"tokens\":[\"A\",\"B\"]}}]}";
	const char *c2 = "{\"choices\":[{\"index\":0,\"text\":\"C\"}]}";
	ax__merge_chunk(m, c1, strlen(c1), 0);
	ax__merge_chunk(m, c2, strlen(c2), 0);
	ax__merge_poll(m, 1, collect, &o);
	assert_int_equal(o.n, 2);
	json_t *c0 = json_array_get(json_object_get(o.ev[0], "choices"), 0);
	assert_int_equal(pos_of(json_object_get(c0, "prompt_attention"), 0), 4);
	assert_int_equal(pos_of(json_object_get(c0, "attention_tokens"), 0), 5); /* token 1 (B) → P */
	json_t *c1j = json_array_get(json_object_get(o.ev[1], "choices"), 0);
	assert_int_equal(pos_of(json_object_get(c1j, "attention_tokens"), 0), 6);
	out_free(&o);
	ax__merge_free(m);
}

/* The end waits for due entries within the bound; the captures' end releases it at once. */
static void done_waits(void **state)
{
	ax_merge *m = chat(1, 0);
	out o = {0};
	ax__merge_set_prompt_len(m, 5);
	add(m, 4);
	chunk(m, "A", 0);
	chunk(m, "B", 0);
	ax__merge_poll(m, WAIT, collect, &o); /* B leaves without its entry */
	assert_int_equal(o.n, 2);
	ax__merge_upstream_done(m, WAIT);
	assert_int_equal(ax__merge_poll(m, WAIT + 1, collect, &o), (int64_t)(2 * WAIT));
	assert_int_equal(o.done, 0);
	add(m, 5);
	ax__merge_poll(m, WAIT + 2, collect, &o);
	assert_int_equal(o.n, 3); /* the late entry, then the end */
	assert_int_equal(o.done, 1);
	out_free(&o);
	ax__merge_free(m);

	m = chat(1, 0);
	ax__merge_set_prompt_len(m, 5);
	chunk(m, "A", 0);
	ax__merge_upstream_done(m, 0);
	assert_true(ax__merge_poll(m, 1, collect, &o) > 0);
	ax__merge_capture_end(m);
	ax__merge_poll(m, 2, collect, &o);
	assert_int_equal(o.n, 1);
	assert_int_equal(o.done, 1);
	out_free(&o);
	ax__merge_free(m);
}

/* Without P, chunks leave after the hold; once P is known the entries follow as late ones. */
static void prompt_len_late(void **state)
{
	ax_merge *m = chat(1, 0);
	out o = {0};
	add(m, 4);
	add(m, 5);
	chunk(m, "A", 0);
	chunk(m, "B", 0);
	ax__merge_poll(m, 1, collect, &o);
	assert_int_equal(o.n, 0);
	ax__merge_poll(m, WAIT, collect, &o);
	assert_int_equal(o.n, 2);
	ax__merge_set_prompt_len(m, 5);
	ax__merge_poll(m, WAIT + 1, collect, &o);
	assert_int_equal(o.n, 3);
	json_t *d = delta(&o, 2);
	assert_int_equal(pos_of(json_object_get(d, "prompt_attention"), 0), 4);
	assert_int_equal(pos_of(json_object_get(d, "attention_tokens"), 0), 5);
	out_free(&o);
	ax__merge_free(m);
}

/* usage.completion_tokens on every chunk counts tokens (even ones with empty text); P from usage. */
static void usage_counting(void **state)
{
	ax_merge *m = chat(1, 0);
	out o = {0};
	add(m, 4);
	add(m, 5);
	add(m, 6);
	const char *c[] = {
		"{\"choices\":[{\"delta\":{\"content\":\"\"}}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}",
		"{\"choices\":[{\"delta\":{\"content\":\"xy\"}}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3}}",
	};
	ax__merge_chunk(m, c[0], strlen(c[0]), 0);
	ax__merge_chunk(m, c[1], strlen(c[1]), 0);
	ax__merge_poll(m, 1, collect, &o);
	assert_int_equal(o.n, 2);
	assert_int_equal(pos_of(json_object_get(delta(&o, 0), "prompt_attention"), 0), 4);
	json_t *at = json_object_get(delta(&o, 1), "attention_tokens");
	assert_int_equal(json_array_size(at), 2);
	assert_int_equal(pos_of(at, 0), 5);
	assert_int_equal(pos_of(at, 1), 6);
	out_free(&o);
	ax__merge_free(m);
}

/* Prompt rows asked for: the token-0 chunk waits for all of them and carries them in order. */
static void prompt_rows(void **state)
{
	ax_merge *m = chat(1, 1);
	out o = {0};
	ax__merge_set_prompt_len(m, 3);
	add(m, 2);
	add(m, 0);
	chunk(m, "A", 0);
	ax__merge_poll(m, 1, collect, &o);
	assert_int_equal(o.n, 0);
	add(m, 1);
	ax__merge_poll(m, 2, collect, &o);
	json_t *pa = json_object_get(delta(&o, 0), "prompt_attention");
	assert_int_equal(json_array_size(pa), 3);
	for (int i = 0; i < 3; i++)
		assert_int_equal(pos_of(pa, (size_t)i), i);
	out_free(&o);
	ax__merge_free(m);
}

static void raw_events_keep_order(void **state)
{
	ax_merge *m = chat(1, 0);
	out o = {0};
	ax__merge_set_prompt_len(m, 5);
	chunk(m, "A", 0);
	assert_int_equal(ax__merge_chunk(m, "not json", 8, 0), 0);
	ax__merge_poll(m, 1, collect, &o);
	assert_int_equal(o.n, 0); /* the raw event waits behind A */
	add(m, 4);
	ax__merge_poll(m, 2, collect, &o);
	assert_int_equal(o.n, 2);
	assert_string_equal(json_string_value(o.ev[1]), "not json");
	out_free(&o);
	ax__merge_free(m);
}

static void non_stream(void **state)
{
	ax_merge_cfg cfg = {.kind = AX_RK_CHAT, .stream = 0, .expected = 1, .wait_ns = WAIT};
	ax_merge *m = ax__merge_new(&cfg);
	const char *body = "{\"id\":\"x\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"ABC\"}}],"
			   "\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3}}";
	char *outb;
	size_t n;
	uint64_t dl = 0;
	add(m, 4);
	add(m, 5);
	assert_int_equal(ax__merge_body(m, "[1]", 3, 0, 0), -EBADMSG);
	assert_int_equal(ax__merge_body(m, body, strlen(body), 0, 0), 0);
	assert_int_equal(ax__merge_body_take(m, 1, &outb, &n, &dl), 0); /* position 6 missing */
	assert_int_equal(dl, WAIT);
	add(m, 6);
	add(m, 7); /* the forward after the last token: not part of the response */
	assert_int_equal(ax__merge_body_take(m, 2, &outb, &n, &dl), 1);
	json_t *j = json_loadb(outb, n, 0, NULL);
	json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
	json_t *at = json_object_get(c0, "attention_tokens");
	assert_int_equal(json_array_size(at), 2);
	assert_int_equal(pos_of(at, 0), 5);
	assert_int_equal(pos_of(at, 1), 6);
	assert_int_equal(pos_of(json_object_get(c0, "prompt_attention"), 0), 4);
	assert_string_equal(json_string_value(json_object_get(json_object_get(c0, "message"), "content")), "ABC");
	json_decref(j);
	free(outb);
	ax__merge_free(m);
}

static void non_stream_timeout(void **state)
{
	ax_merge_cfg cfg = {.kind = AX_RK_COMPLETION, .stream = 0, .expected = 1, .wait_ns = WAIT};
	ax_merge *m = ax__merge_new(&cfg);
	const char *body = "{\"choices\":[{\"text\":\"AB\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}";
	char *outb;
	size_t n;
	uint64_t dl;
	add(m, 4);
	ax__merge_body(m, body, strlen(body), 0, 0);
	assert_int_equal(ax__merge_body_take(m, WAIT, &outb, &n, &dl), 1);
	json_t *j = json_loadb(outb, n, 0, NULL);
	json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
	assert_int_equal(json_array_size(json_object_get(c0, "attention_tokens")), 0); /* present, empty */
	assert_int_equal(json_array_size(json_object_get(c0, "prompt_attention")), 1);
	json_decref(j);
	free(outb);
	ax__merge_free(m);
}

static void bad_records(void **state)
{
	ax_merge *m = chat(1, 0);
	ax_rec_attn a = attn(-1, 0, -1, AX_MODE_MEAN_LOGIT);
	assert_int_equal(ax__merge_add(m, &a), -EINVAL);
	a.position = 1ll << 40;
	assert_int_equal(ax__merge_add(m, &a), -EINVAL);
	ax__merge_free(m);
	ax__merge_free(NULL);
}

static void raw_chunk(ax_merge *m, const char *json)
{
	assert_int_equal(ax__merge_chunk(m, json, strlen(json), 0), 0);
}

/* The stream ends on a stop token (sampled by the forward at P+n-1, not shown): the engine's last chunk has only
 * finish_reason "stop". It stands for that token, waits for row P+n-1 like any token chunk and carries it. */
static void stop_token_row(void **state)
{
	ax_merge *m = chat(1, 0);
	out o = {0};
	ax__merge_set_prompt_len(m, 5);
	add(m, 4);
	add(m, 5);
	chunk(m, "A", 0);
	chunk(m, "B", 0);
	raw_chunk(m, "{\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}");
	ax__merge_upstream_done(m, 0);
	assert_true(ax__merge_poll(m, 1, collect, &o) > 0); /* the finish chunk waits for row 6 */
	assert_int_equal(o.n, 2);
	add(m, 6);
	assert_int_equal(ax__merge_poll(m, 2, collect, &o), 0);
	assert_int_equal(o.n, 3);
	assert_int_equal(o.done, 1);
	json_t *at = json_object_get(delta(&o, 2), "attention_tokens");
	assert_int_equal(json_array_size(at), 1);
	assert_int_equal(pos_of(at, 0), 6);
	/* the token at position 6 is g1 ("B") */
	assert_string_equal(json_string_value(json_object_get(json_array_get(at, 0), "text")), "B");
	assert_string_equal(json_string_value(json_object_get(json_array_get(json_object_get(o.ev[2], "choices"), 0),
							      "finish_reason")),
			    "stop");
	out_free(&o);
	ax__merge_free(m);

	/* "length" ends on a shown token: no row after it is waited for */
	m = chat(1, 0);
	ax__merge_set_prompt_len(m, 5);
	add(m, 4);
	chunk(m, "A", 0);
	raw_chunk(m, "{\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}");
	ax__merge_upstream_done(m, 0);
	assert_int_equal(ax__merge_poll(m, 1, collect, &o), 0);
	assert_int_equal(o.n, 2);
	assert_int_equal(o.done, 1);
	out_free(&o);
	ax__merge_free(m);
}

/* stream_options.include_usage: the usage-only chunk (choices: []) counts a token no chunk showed; its entry goes
 * in an extra chunk just before it, never lost. */
static void usage_only_chunk(void **state)
{
	ax_merge *m = chat(1, 0);
	out o = {0};
	ax__merge_set_prompt_len(m, 5);
	for (int p = 4; p <= 6; p++)
		add(m, p);
	chunk(m, "A", 0);
	chunk(m, "B", 0);
	raw_chunk(m, "{\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}");
	raw_chunk(m, "{\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3}}");
	ax__merge_upstream_done(m, 0);
	assert_int_equal(ax__merge_poll(m, 1, collect, &o), 0);
	assert_int_equal(o.n, 5);
	json_t *at = json_object_get(delta(&o, 3), "attention_tokens");
	assert_int_equal(json_array_size(at), 1);
	assert_int_equal(pos_of(at, 0), 6);
	assert_string_equal(json_string_value(json_object_get(delta(&o, 3), "content")), "");
	assert_int_equal(json_array_size(json_object_get(o.ev[4], "choices")), 0); /* the usage chunk, unchanged */
	assert_non_null(json_object_get(o.ev[4], "usage"));
	out_free(&o);
	ax__merge_free(m);
}

/* Rows no chunk carried (here after a merged last chunk) still leave before DONE, in one extra chunk. */
static void rest_before_done(void **state)
{
	ax_merge *m = chat(1, 0);
	out o = {0};
	ax__merge_set_prompt_len(m, 5);
	add(m, 4);
	chunk(m, "A", 0);
	ax__merge_upstream_done(m, 0);
	add(m, 5);
	add(m, 6);
	assert_int_equal(ax__merge_poll(m, 1, collect, &o), 0);
	assert_int_equal(o.n, 2);
	assert_int_equal(o.done, 1);
	json_t *at = json_object_get(delta(&o, 1), "attention_tokens");
	assert_int_equal(json_array_size(at), 2);
	assert_int_equal(pos_of(at, 0), 5);
	assert_int_equal(pos_of(at, 1), 6);
	assert_int_equal(ax__merge_late_entries(m), 2);
	out_free(&o);
	ax__merge_free(m);
}

/* A policy stride of 2 (rows P-1, P+1, … only): chunks of the skipped rows do not wait; nor do rows past
 * max_tokens. */
static void stride_rows(void **state)
{
	ax_merge_cfg cfg = {.kind = AX_RK_CHAT, .stream = 1, .expected = 1, .wait_ns = WAIT, .stride = 2,
			    .max_tokens = 2};
	ax_merge *m = ax__merge_new(&cfg);
	out o = {0};
	ax__merge_set_prompt_len(m, 5);
	add(m, 4);
	add(m, 6);
	chunk(m, "A", 0); /* row 4 */
	chunk(m, "B", 0); /* row 5: skipped by the stride */
	chunk(m, "C", 0); /* row 6 */
	chunk(m, "D", 0); /* row 7: skipped */
	chunk(m, "E", 0); /* row 8: past max_tokens (2 rows) */
	assert_int_equal(ax__merge_poll(m, 1, collect, &o), 0);
	assert_int_equal(o.n, 5);
	assert_int_equal(pos_of(json_object_get(delta(&o, 2), "attention_tokens"), 0), 6);
	out_free(&o);
	ax__merge_free(m);
}

/* Counts an upstream makes up (usage of 2^62 tokens, a chunk claiming 4e9) cost nothing: before the bounds were
 * clamped these loops ran for hours (libFuzzer timeout in CI). */
static void absurd_upstream_counts(void **state)
{
	ax_merge_cfg cfg = {.kind = AX_RK_CHAT, .stream = 0, .expected = 1, .wait_ns = WAIT, .stride = 2};
	ax_merge *m = ax__merge_new(&cfg);
	const char *body = "{\"choices\":[{\"message\":{\"content\":\"A\"}}],"
			   "\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4611686018427387904}}";
	char *outb;
	size_t n;
	uint64_t dl;
	add(m, 4);
	add(m, 6);
	assert_int_equal(ax__merge_body(m, body, strlen(body), 0, 0), 0);
	assert_int_equal(ax__merge_body_take(m, 1, &outb, &n, &dl), 0); /* row 8 may come */
	assert_int_equal(ax__merge_body_take(m, WAIT, &outb, &n, &dl), 1);
	json_t *j = json_loadb(outb, n, 0, NULL);
	json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
	assert_int_equal(json_array_size(json_object_get(c0, "attention_tokens")), 1);
	json_decref(j);
	free(outb);
	ax__merge_free(m);

	out o = {0};
	m = chat(1, 0);
	ax__merge_set_prompt_len(m, 5);
	add(m, 4);
	add(m, 5);
	raw_chunk(m, "{\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"completion_tokens\":4294967295}}");
	ax__merge_upstream_done(m, 0);
	assert_int_equal(ax__merge_poll(m, WAIT, collect, &o), 0);
	assert_int_equal(o.done, 1);
	assert_int_equal(pos_of(json_object_get(delta(&o, 0), "attention_tokens"), 0), 5);
	out_free(&o);
	ax__merge_free(m);
}

/* Rows past the slot table: complete exactly when the policy skips every one of them (stride, max_tokens). */
static void rows_past_table(void **state)
{
	for (int cap = 0; cap < 2; cap++) {
		ax_merge_cfg cfg = {.kind = AX_RK_CHAT, .expected = 1, .wait_ns = WAIT, .stride = 2, .max_tokens = cap ? 30 : 0};
		ax_merge *m = ax__merge_new(&cfg);
		const char *body = "{\"choices\":[{\"message\":{\"content\":\"A\"}}],"
				   "\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1000}}";
		char *outb = NULL;
		size_t n;
		uint64_t dl;
		for (int p = 4; p < 64; p += 2) /* every sampled row the 64-slot table holds */
			add(m, p);
		assert_int_equal(ax__merge_body(m, body, strlen(body), 0, 0), 0);
		/* with max_tokens 30 the rows from 64 on (generated index 60 = 30 strides) never come */
		assert_int_equal(ax__merge_body_take(m, 1, &outb, &n, &dl), cap ? 1 : 0);
		free(outb);
		ax__merge_free(m);
	}
}

/* Tokens counted by logprobs: each entry gets its own token's text, not NULL. */
static void logprob_texts(void **state)
{
	ax_merge *m = chat(1, 0);
	out o = {0};
	ax__merge_set_prompt_len(m, 5);
	for (int p = 4; p <= 6; p++)
		add(m, p);
	raw_chunk(m, "{\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"logprobs\":{\"content\":[{\"token\":\"H\"},"
		     "{\"token\":\"i\"}]}}]}");
	raw_chunk(m, "{\"choices\":[{\"delta\":{\"content\":\"!\"},\"logprobs\":{\"content\":[{\"token\":\"!\"}]}}]}");
	ax__merge_poll(m, 1, collect, &o);
	assert_int_equal(o.n, 2);
	json_t *a0 = json_object_get(delta(&o, 0), "attention_tokens"), *a1 = json_object_get(delta(&o, 1), "attention_tokens");
	assert_int_equal(pos_of(a0, 0), 5);
	assert_string_equal(json_string_value(json_object_get(json_array_get(a0, 0), "text")), "H");
	assert_int_equal(pos_of(a1, 0), 6);
	assert_string_equal(json_string_value(json_object_get(json_array_get(a1, 0), "text")), "i");
	out_free(&o);
	ax__merge_free(m);
}

/* Non-streamed bodies: every entry has its token's text, from the logprobs the relay asked for; with
 * strip_logprobs the body goes out with logprobs null (the client did not ask for them). Chat and completions. */
static void non_stream_texts(void **state)
{
	static const struct {
		int kind, strip;
		const char *body;
	} cases[] = {
		{AX_RK_CHAT, 1,
		 "{\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"ABC\"},\"logprobs\":{\"content\":"
		 "[{\"token\":\"A\",\"logprob\":-1},{\"token\":\"B\",\"logprob\":-1},{\"token\":\"C\",\"logprob\":-1}]},"
		 "\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4}}"},
		{AX_RK_CHAT, 0,
		 "{\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"ABC\"},\"logprobs\":{\"content\":"
		 "[{\"token\":\"A\",\"logprob\":-1},{\"token\":\"B\",\"logprob\":-1},{\"token\":\"C\",\"logprob\":-1}]},"
		 "\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4}}"},
		{AX_RK_COMPLETION, 1,
		 "{\"choices\":[{\"index\":0,\"text\":\"ABC\",\"logprobs\":{\"tokens\":[\"A\",\"B\",\"C\"],\"token_logprobs\":"
		 "[-1,-1,-1],\"top_logprobs\":[{},{},{}],\"text_offset\":[0,1,2]},\"finish_reason\":\"stop\"}],"
		 "\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4}}"},
	};
	for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
		ax_merge_cfg cfg = {.kind = cases[k].kind, .stream = 0, .expected = 1, .wait_ns = WAIT};
		ax_merge *m = ax__merge_new(&cfg);
		char *outb;
		size_t n;
		uint64_t dl;
		for (int p = 4; p <= 7; p++) /* 7: the row that sampled the stop token */
			add(m, p);
		assert_int_equal(ax__merge_body(m, cases[k].body, strlen(cases[k].body), 0, cases[k].strip), 0);
		assert_int_equal(ax__merge_body_take(m, 1, &outb, &n, &dl), 1);
		json_t *j = json_loadb(outb, n, 0, NULL);
		json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
		json_t *at = json_object_get(c0, "attention_tokens");
		assert_int_equal(json_array_size(at), 3);
		for (int i = 0; i < 3; i++) {
			char want[2] = {(char)('A' + i), 0};
			assert_int_equal(pos_of(at, (size_t)i), 5 + i);
			assert_string_equal(json_string_value(json_object_get(json_array_get(at, (size_t)i), "text")), want);
		}
		assert_int_equal(json_is_null(json_object_get(c0, "logprobs")), cases[k].strip);
		json_decref(j);
		free(outb);
		ax__merge_free(m);
	}
}

/* Several captures (TP ranks) each send `end`: the stream's DONE waits until every live capture has (ends from slots
 * not live, or a live set that shrinks to those that ended, complete it too); a chunk is held the same way. */
static void source_ends(void **state)
{
	(void)state;
	enum { END, LIVE };
	static const struct {
		const char *what;
		int n;
		struct { int op, slot; uint64_t live; int done_after; } ev[4];
	} cases[] = {
		{"one capture", 1, {{END, 0, 0x1, 1}}},
		{"two ranks, rank 0 first", 2, {{END, 0, 0x3, 0}, {END, 1, 0x3, 1}}},
		{"two ranks, rank 1 first", 2, {{END, 1, 0x3, 0}, {END, 0, 0x3, 1}}},
		{"a repeated end of one rank", 3, {{END, 0, 0x3, 0}, {END, 0, 0x3, 0}, {END, 1, 0x3, 1}}},
		{"the other rank's connection closed", 2, {{END, 0, 0x3, 0}, {LIVE, 0, 0x1, 1}}},
		{"a rank said hello meanwhile", 3, {{END, 0, 0x1, 1}, {LIVE, 0, 0x3, 1}, {END, 1, 0x3, 1}}},
		{"an end from a capture not live", 2, {{END, 5, 0x3, 0}, {END, 0, 0x3, 0}}},
		{"no live capture known", 1, {{END, 2, 0x0, 1}}},
		{"slot out of range", 1, {{END, 64, 0x3, 1}}},
		{"sources only, no end", 1, {{LIVE, 0, 0x3, 0}}},
	};
	for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
		ax_merge *m = chat(2, 0);
		out o = {0};
		ax__merge_set_prompt_len(m, 5);
		ax_rec_attn a = attn(4, 0, 0, AX_MODE_HEADS); /* rank 0's head of row P-1; rank 1's head 1 never comes */
		assert_int_equal(ax__merge_add(m, &a), 0);
		chunk(m, "A", 0);
		ax__merge_upstream_done(m, 0);
		for (int i = 0; i < cases[k].n; i++) {
			if (cases[k].ev[i].op == END)
				ax__merge_source_end(m, cases[k].ev[i].slot, cases[k].ev[i].live);
			else
				ax__merge_set_sources(m, cases[k].ev[i].live);
			ax__merge_poll(m, 1 + (uint64_t)i, collect, &o); /* well within the hold */
			if (o.done != cases[k].ev[i].done_after)
				fail_msg("%s: after event %d, done %d", cases[k].what, i, o.done);
			assert_int_equal(o.n, o.done); /* the chunk A leaves with DONE, not before */
		}
		out_free(&o);
		ax__merge_free(m);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(alignment),          cmocka_unit_test(nul_text),          cmocka_unit_test(hold_then_release),
		cmocka_unit_test(late_entry),         cmocka_unit_test(several_layers),
		cmocka_unit_test(heads_mode),         cmocka_unit_test(completions_stream),
		cmocka_unit_test(done_waits),         cmocka_unit_test(prompt_len_late),
		cmocka_unit_test(usage_counting),     cmocka_unit_test(prompt_rows),
		cmocka_unit_test(raw_events_keep_order), cmocka_unit_test(non_stream),
		cmocka_unit_test(non_stream_timeout), cmocka_unit_test(bad_records),
		cmocka_unit_test(stop_token_row),     cmocka_unit_test(usage_only_chunk),
		cmocka_unit_test(rest_before_done),   cmocka_unit_test(stride_rows),
		cmocka_unit_test(logprob_texts),      cmocka_unit_test(non_stream_texts),
		cmocka_unit_test(absurd_upstream_counts), cmocka_unit_test(rows_past_table),
		cmocka_unit_test(source_ends),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
