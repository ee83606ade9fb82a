/*
 * proto_test.c — cmocka tests of the record schema: round trips of every record type through msgpack and JSON,
 * frames of many records, and the decoder's error paths (truncation at every byte, oversized frames, unknown
 * types, every required field removed, mistyped and out-of-range fields, arrays over their caps, trailing bytes),
 * the validation rules, and the batcher's count / bytes / deadline flushes and frame headers.
 *
 * Removal and mistyping are generic: a valid record is packed, unpacked with msgpack-c, and re-packed with one key
 * dropped or one value replaced, so every field of every type is covered without a hand-written frame per case.
 */
#include "attnx_common.h"
#include "attnx_proto.h"
#include "proto_internal.h"

#include <errno.h>
#include <stdio.h>
#include <float.h>
#include <jansson.h>
#include <math.h>
#include <msgpack.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* ---- sample records ---- */
static void fill_topk(ax_rec_attn *a, const float *logits, const int64_t *pos, uint32_t k, double lse)
{
	double z = 0;
	a->k = k;
	for (uint32_t i = 0; i < k; i++)
		z += exp((double)logits[i] - logits[0]);
	a->topk_mass = 0;
	for (uint32_t i = 0; i < k; i++) {
		a->topk_logits[i] = logits[i];
		a->token_positions[i] = pos[i];
		a->attention_scores[i] = (float)(exp((double)logits[i] - logits[0]) / z);
		a->topk_mass += exp((double)logits[i] - lse);
	}
	a->logsumexp_all = lse;
}

static void sample(ax_record *r, int which)
{
	static const float lg[5] = {3.5f, 2.25f, 2.25f, 1.0f, -0.5f};
	static const int64_t ps[5] = {10, 3, 7, 0, 12};
	static const int32_t prompt[4] = {1, 200, 70000, 0};
	int types[] = {AX_REC_HELLO, AX_REC_REQ, AX_REC_ATTN, AX_REC_ATTN, AX_REC_ATTN, AX_REC_END,
		       AX_REC_GAP, AX_REC_GAP, AX_REC_STATS, AX_REC_POLICY, AX_REC_POLICY};
	ax_record_init(r, types[which]);
	strcpy(r->src, "capture:host:123:0");
	r->seq = 1000 + (uint64_t)which;
	r->ts_ns = which % 2 ? 1700000000123456789ull : 0;
	switch (which) {
	case 0: {
		ax_rec_hello *h = &r->u.hello;
		strcpy(h->engine, "attnx-engine"), strcpy(h->model, "qwen3 \"0.6b\"\n\xc3\xa9"), strcpy(h->backend, "cpu");
		h->rank = 1, h->world_size = 2, h->n_layers = 28, h->n_q_heads = 16, h->n_kv_heads = 8;
		h->head_offset = 16, h->head_dim = 128, h->top_k = 5, h->mode = AX_MODE_MEAN_LOGIT;
		h->n_layer_ids = 2, h->layer_ids[0] = 0, h->layer_ids[1] = 27, h->generation = 1234567890123ull;
		break;
	}
	case 1:
		strcpy(r->rid, "ax-0123456789abcdef");
		r->u.req.prompt_len = 4;
		r->u.req.prompt = malloc(sizeof(prompt));
		memcpy(r->u.req.prompt, prompt, sizeof(prompt));
		break;
	case 2: case 3: case 4: {
		ax_rec_attn *a = &r->u.attn;
		strcpy(r->rid, "ax-0123456789abcdef");
		a->position = 12, a->decode_step = 3, a->token_id = 151643, a->layer_id = 27;
		a->mode = which == 2 ? AX_MODE_MEAN_LOGIT : which == 3 ? AX_MODE_HEADS : AX_MODE_MEAN_PROB;
		a->head_id = which == 3 ? 7 : -1;
		a->prefill = which == 3;
		fill_topk(a, lg, ps, which == 4 ? 1 : 5, which == 4 ? 0.0 : 5.0);
		if (which == 4)
			a->topk_logits[0] = -0.25f, a->topk_mass = exp(-0.25), a->token_id = 0;
		break;
	}
	case 5:
		strcpy(r->rid, "ax-1"), strcpy(r->u.end.reason, "stop"), r->u.end.tokens = 42;
		break;
	case 6: case 7:
		strcpy(r->u.gap.what, "records"), strcpy(r->u.gap.reason, "send_full");
		r->u.gap.count = 10, r->u.gap.from_seq = 100, r->u.gap.to_seq = 110;
		if (which == 7)
			strcpy(r->rid, "ax-2");
		break;
	case 8:
		r->u.stats.n = 2;
		strcpy(r->u.stats.kv[0].name, "records_sent"), r->u.stats.kv[0].value = 5;
		strcpy(r->u.stats.kv[1].name, "gaps"), r->u.stats.kv[1].value = 0;
		break;
	case 9: case 10: {
		ax_rec_policy *p = &r->u.policy;
		strcpy(r->rid, "ax-3");
		p->top_k = 10, p->mode = which == 9 ? AX_MODE_HEADS : 0, p->stride = 2, p->max_tokens = 100;
		p->prompt = 1, p->ttl_ms = 60000;
		p->n_layer_ids = 2, p->layer_ids[0] = 0, p->layer_ids[1] = 27;
		p->n_head_ids = which == 9 ? 3 : 0, p->head_ids[0] = 1, p->head_ids[1] = 2, p->head_ids[2] = 3;
		break;
	}
	}
}
#define N_SAMPLES 11

static void assert_ids_equal(const int32_t *a, uint32_t na, const int32_t *b, uint32_t nb)
{
	assert_int_equal(na, nb);
	if (na)
		assert_memory_equal(a, b, na * sizeof(*a));
}

static void assert_attn_equal(const ax_rec_attn *a, const ax_rec_attn *b)
{
	assert_int_equal(a->position, b->position);
	assert_int_equal(a->decode_step, b->decode_step);
	assert_int_equal(a->token_id, b->token_id);
	assert_int_equal(a->layer_id, b->layer_id);
	assert_int_equal(a->mode, b->mode);
	assert_int_equal(a->head_id, b->head_id);
	assert_int_equal(a->k, b->k);
	assert_int_equal(a->prefill, b->prefill);
	for (uint32_t i = 0; i < a->k; i++) {
		assert_int_equal(a->token_positions[i], b->token_positions[i]);
		assert_true(a->topk_logits[i] == b->topk_logits[i]);
		assert_true(a->attention_scores[i] == b->attention_scores[i]);
	}
	assert_true(a->logsumexp_all == b->logsumexp_all);
	assert_true(a->topk_mass == b->topk_mass);
}

static void assert_record_equal(const ax_record *a, const ax_record *b)
{
	assert_int_equal(a->type, b->type);
	assert_int_equal(a->v, b->v);
	assert_string_equal(a->src, b->src);
	assert_int_equal(a->seq, b->seq);
	assert_int_equal(a->ts_ns, b->ts_ns);
	assert_string_equal(a->rid, b->rid);
	switch (a->type) {
	case AX_REC_HELLO: {
		const ax_rec_hello *x = &a->u.hello, *y = &b->u.hello;
		assert_string_equal(x->engine, y->engine);
		assert_string_equal(x->model, y->model);
		assert_string_equal(x->backend, y->backend);
		assert_memory_equal(&x->rank, &y->rank, offsetof(ax_rec_hello, n_layer_ids) - offsetof(ax_rec_hello, rank));
		assert_ids_equal(x->layer_ids, x->n_layer_ids, y->layer_ids, y->n_layer_ids);
		assert_int_equal(x->generation, y->generation);
		break;
	}
	case AX_REC_REQ:
		assert_ids_equal(a->u.req.prompt, a->u.req.prompt_len, b->u.req.prompt, b->u.req.prompt_len);
		break;
	case AX_REC_ATTN: assert_attn_equal(&a->u.attn, &b->u.attn); break;
	case AX_REC_END:
		assert_string_equal(a->u.end.reason, b->u.end.reason);
		assert_int_equal(a->u.end.tokens, b->u.end.tokens);
		break;
	case AX_REC_GAP:
		assert_string_equal(a->u.gap.what, b->u.gap.what);
		assert_string_equal(a->u.gap.reason, b->u.gap.reason);
		assert_memory_equal(&a->u.gap.count, &b->u.gap.count, 3 * sizeof(uint64_t));
		break;
	case AX_REC_STATS:
		assert_int_equal(a->u.stats.n, b->u.stats.n);
		for (uint32_t i = 0; i < a->u.stats.n; i++) {
			assert_string_equal(a->u.stats.kv[i].name, b->u.stats.kv[i].name);
			assert_int_equal(a->u.stats.kv[i].value, b->u.stats.kv[i].value);
		}
		break;
	case AX_REC_POLICY: {
		const ax_rec_policy *x = &a->u.policy, *y = &b->u.policy;
		assert_memory_equal(x, y, offsetof(ax_rec_policy, n_layer_ids));
		assert_ids_equal(x->layer_ids, x->n_layer_ids, y->layer_ids, y->n_layer_ids);
		assert_ids_equal(x->head_ids, x->n_head_ids, y->head_ids, y->n_head_ids);
		assert_int_equal(x->ttl_ms, y->ttl_ms);
		break;
	}
	}
}

/* ---- frames ---- */
static void frame_header(ax_buf *b, uint32_t n)
{
	uint8_t h[5] = {0xdd, (uint8_t)(n >> 24), (uint8_t)(n >> 16), (uint8_t)(n >> 8), (uint8_t)n};
	assert_int_equal(ax_buf_append(b, h, 5), 0);
}

/* A frame holding one record's packed bytes. */
static void frame_of_bytes(ax_buf *f, const void *p, size_t n)
{
	ax_buf_init(f);
	frame_header(f, 1);
	assert_int_equal(ax_buf_append(f, p, n), 0);
}

struct collect {
	int n, stop_at, take_prompt;
	ax_record last;
};

static int collect_cb(const ax_record *r, void *arg)
{
	struct collect *c = arg;
	c->n++;
	c->last = *r;
	if (c->take_prompt && r->type == AX_REC_REQ) {
		c->last.u.req.prompt = r->u.req.prompt;
		((ax_record *)r)->u.req.prompt = NULL; /* the header allows taking ownership */
	} else if (r->type == AX_REC_REQ) {
		c->last.u.req.prompt = NULL, c->last.u.req.prompt_len = 0;
	}
	return c->stop_at && c->n == c->stop_at ? 7 : 0;
}

static int decode_one(const ax_buf *f)
{
	return ax_frame_decode(f->data, f->len, NULL, NULL);
}

/* ---- round trips ---- */
static void test_roundtrip_msgpack(void **state)
{
	for (int w = 0; w < N_SAMPLES; w++) {
		ax_record r, d;
		ax_buf b, f;
		sample(&r, w);
		ax_buf_init(&b);
		assert_int_equal(ax_record_pack(&r, &b), 0);
		/* single map */
		int rc = ax_record_unpack(b.data, b.len, &d);
		if (rc != 0)
			fail_msg("sample %d: %d", w, rc);
		assert_record_equal(&r, &d);
		ax_record_fini(&d);
		/* in a frame, taking ownership of the prompt */
		frame_of_bytes(&f, b.data, b.len);
		struct collect c = {.take_prompt = 1};
		assert_int_equal(ax_frame_decode(f.data, f.len, collect_cb, &c), 1);
		assert_record_equal(&r, &c.last);
		ax_record_fini(&c.last);
		ax_buf_fini(&f);
		ax_buf_fini(&b);
		ax_record_fini(&r);
	}
}

static void test_roundtrip_json(void **state)
{
	for (int w = 0; w < N_SAMPLES; w++) {
		ax_record r, d;
		ax_buf b;
		json_error_t err;
		sample(&r, w);
		ax_buf_init(&b);
		assert_int_equal(ax_record_json(&r, &b), 0);
		json_t *j = json_loadb((const char *)b.data, b.len, 0, &err);
		assert_non_null(j);
		assert_int_equal(ax_record_from_json(j, &d), 0);
		assert_record_equal(&r, &d);
		ax_record_fini(&d);
		json_decref(j);
		assert_int_equal(ax_record_to_json_t(&r, &j), 0);
		assert_int_equal(ax_record_from_json(j, &d), 0);
		assert_record_equal(&r, &d);
		ax_record_fini(&d);
		json_decref(j);
		ax_buf_fini(&b);
		ax_record_fini(&r);
	}
}

static void test_json_text(void **state)
{
	ax_record r;
	ax_buf b;
	sample(&r, 5);
	r.ts_ns = 5;
	ax_buf_init(&b);
	assert_int_equal(ax_record_json(&r, &b), 0);
	const char *want = "{\"t\":\"end\",\"v\":1,\"src\":\"capture:host:123:0\",\"seq\":1005,\"ts\":5,\"rid\":\"ax-1\","
			   "\"reason\":\"stop\",\"tokens\":42}";
	assert_int_equal(b.len, strlen(want));
	assert_memory_equal(b.data, want, b.len);
	/* escapes and float formatting */
	ax_buf_reset(&b);
	sample(&r, 0);
	assert_int_equal(ax_record_json(&r, &b), 0);
	assert_int_equal(ax_buf_append(&b, "", 1), 0);
	assert_non_null(strstr((char *)b.data, "\"model\":\"qwen3 \\\"0.6b\\\"\\n\xc3\xa9\""));
	ax_buf_reset(&b);
	sample(&r, 2);
	r.u.attn.topk_logits[0] = 3.5f;
	assert_int_equal(ax_record_json(&r, &b), 0);
	assert_int_equal(ax_buf_append(&b, "", 1), 0);
	assert_non_null(strstr((char *)b.data, "\"topk_logits\":[3.5,2.25,2.25,1,-0.5]"));
	assert_non_null(strstr((char *)b.data, "\"token_positions\":[10,3,7,0,12]"));
	assert_null(strstr((char *)b.data, "head_id"));
	assert_null(strstr((char *)b.data, "prefill"));
	/* negative zero stays a negative-zero real; a subnormal float32 reads back through a double */
	ax_buf_reset(&b);
	r.u.attn.topk_logits[4] = -0.0f;
	r.u.attn.logsumexp_all = -0.0;
	r.u.attn.topk_logits[3] = 2.30472e-41f;
	assert_int_equal(ax_record_json(&r, &b), 0);
	json_t *j = json_loadb((const char *)b.data, b.len, 0, NULL);
	assert_non_null(j);
	ax_record d;
	assert_int_equal(ax_record_from_json(j, &d), 0);
	assert_true(signbit(d.u.attn.topk_logits[4]) && signbit(d.u.attn.logsumexp_all));
	assert_true(d.u.attn.topk_logits[3] == 2.30472e-41f);
	json_decref(j);
	ax_buf_fini(&b);
}

static void test_many_records(void **state)
{
	ax_batch bt;
	ax_batch_init(&bt);
	bt.max_records = 5000;
	bt.max_bytes = AX_PROTO_MAX_FRAME;
	for (int i = 0; i < 3000; i++) {
		ax_record r;
		sample(&r, 2 + i % 3);
		r.seq = (uint64_t)i;
		assert_int_equal(ax_batch_add(&bt, &r), 0);
	}
	const uint8_t *p;
	size_t n;
	assert_int_equal(ax_batch_finish(&bt, &p, &n), 3000);
	struct collect c = {0};
	assert_int_equal(ax_frame_decode(p, n, collect_cb, &c), 3000);
	assert_int_equal(c.last.seq, 2999);
	c = (struct collect){.stop_at = 2};
	assert_int_equal(ax_frame_decode(p, n, collect_cb, &c), 7); /* the callback's stop value */
	assert_int_equal(c.n, 2);
	ax_batch_fini(&bt);
}

/* ---- malformed frames ---- */
static void test_truncated(void **state)
{
	for (int w = 0; w < N_SAMPLES; w++) {
		ax_record r;
		ax_buf b, f;
		sample(&r, w);
		ax_buf_init(&b);
		assert_int_equal(ax_record_pack(&r, &b), 0);
		frame_of_bytes(&f, b.data, b.len);
		for (size_t cut = 0; cut < f.len; cut++) {
			struct collect c = {0};
			assert_int_equal(ax_frame_decode(f.data, cut, collect_cb, &c), -EBADMSG);
			assert_int_equal(c.n, 0);
		}
		for (size_t cut = 0; cut < b.len; cut++) {
			ax_record d;
			assert_int_equal(ax_record_unpack(b.data, cut, &d), -EBADMSG);
			ax_record_fini(&d);
		}
		ax_buf_fini(&f);
		ax_buf_fini(&b);
		ax_record_fini(&r);
	}
}

static void test_bad_bytes(void **state)
{
	static const struct {
		const char *name;
		const char *bytes;
		size_t len;
		int want;
	} cases[] = {
		{"empty", "", 0, -EBADMSG},
		{"never-used byte", "\xc1", 1, -EBADMSG},
		{"map at the root", "\x80", 1, -EBADMSG},
		{"array of ints", "\x91\x01", 2, -EBADMSG},
		{"array of arrays", "\x91\x90", 2, -EBADMSG},
		{"trailing byte", "\x90\x00", 2, -EBADMSG},
		{"empty frame", "\x90", 1, 0},
		{"4G-entry array claim", "\xdd\xff\xff\xff\xff\x80", 6, -EBADMSG},
		{"4G-pair map claim", "\x91\xdf\xff\xff\xff\xff", 6, -EBADMSG},
		{"4G-byte string claim", "\x91\xdb\xff\xff\xff\xff", 6, -EBADMSG},
		{"deep nesting", "\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x91\x90", 19, -EBADMSG},
		{"map without t", "\x91\x81\xa1v\x01", 5, -EPROTO},
		{"t not a string", "\x91\x81\xa1t\x01", 5, -EPROTO},
		{"unknown type", "\x91\x81\xa1t\xa5" "bogus", 10, -EPROTO},
		{"known type, nothing else", "\x91\x81\xa1t\xa3" "end", 8, -EPROTO},
	};
	for (size_t i = 0; i < AX_ARRAY_LEN(cases); i++) {
		int rc = ax_frame_decode(cases[i].bytes, cases[i].len, NULL, NULL);
		if (rc != cases[i].want)
			fail_msg("%s: got %d, want %d", cases[i].name, rc, cases[i].want);
	}
}

static void test_oversized(void **state)
{
	size_t n = AX_PROTO_MAX_FRAME + 1;
	uint8_t *big = calloc(1, n);
	assert_non_null(big);
	big[0] = 0x90;
	assert_int_equal(ax_frame_decode(big, n, NULL, NULL), -EMSGSIZE);
	ax_record r;
	assert_int_equal(ax_record_unpack(big, n, &r), -EMSGSIZE);
	/* too many records: AX_PROTO_MAX_RECORDS + 1 empty maps */
	uint32_t m = AX_PROTO_MAX_RECORDS + 1;
	big[0] = 0xdd, big[1] = (uint8_t)(m >> 24), big[2] = (uint8_t)(m >> 16), big[3] = (uint8_t)(m >> 8), big[4] = (uint8_t)m;
	memset(big + 5, 0x80, m);
	assert_int_equal(ax_frame_decode(big, 5 + m, NULL, NULL), -EMSGSIZE);
	free(big);
}

/* Re-pack the map in `packed` with key `drop` left out, or its value replaced by `repl` (when non-NULL). */
static void rewrite(const ax_buf *packed, uint32_t drop, const msgpack_object *repl, ax_buf *out, char *key, size_t ksz)
{
	msgpack_zone z;
	msgpack_object o;
	msgpack_packer pk;
	msgpack_sbuffer sb;
	msgpack_zone_init(&z, 4096);
	assert_int_equal(msgpack_unpack((const char *)packed->data, packed->len, NULL, &z, &o), MSGPACK_UNPACK_SUCCESS);
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, o.via.map.size - (repl ? 0 : 1));
	for (uint32_t i = 0; i < o.via.map.size; i++) {
		msgpack_object_kv *kv = &o.via.map.ptr[i];
		if (i == drop) {
			snprintf(key, ksz, "%.*s", (int)kv->key.via.str.size, kv->key.via.str.ptr);
			if (!repl)
				continue;
		}
		msgpack_pack_object(&pk, kv->key);
		msgpack_pack_object(&pk, i == drop ? *repl : kv->val);
	}
	frame_of_bytes(out, sb.data, sb.size);
	msgpack_sbuffer_destroy(&sb);
	msgpack_zone_destroy(&z);
}

static uint32_t n_keys(const ax_buf *packed)
{
	uint8_t b = packed->data[0];
	return b >= 0x80 && b <= 0x8f ? b & 0x0f : (uint32_t)packed->data[1] << 8 | packed->data[2];
}

static int optional_key(const char *k, const ax_record *r)
{
	return !strcmp(k, "ts") || !strcmp(k, "prefill") || (r->type == AX_REC_GAP && !strcmp(k, "rid")) ||
	       (r->type == AX_REC_POLICY && !strcmp(k, "mode"));
}

static void test_each_field_missing(void **state)
{
	for (int w = 0; w < N_SAMPLES; w++) {
		ax_record r;
		ax_buf b;
		sample(&r, w);
		ax_buf_init(&b);
		assert_int_equal(ax_record_pack(&r, &b), 0);
		for (uint32_t i = 0; i < n_keys(&b); i++) {
			ax_buf f;
			char key[32];
			rewrite(&b, i, NULL, &f, key, sizeof(key));
			int want = optional_key(key, &r) ? 1 : -EPROTO;
			int rc = decode_one(&f);
			if (rc != want)
				fail_msg("sample %d without %s: got %d, want %d", w, key, rc, want);
			ax_buf_fini(&f);
		}
		ax_buf_fini(&b);
		ax_record_fini(&r);
	}
}

/* Every field of every type replaced by each of: nil, a string, a map, -1 and a float. Only the replacements
 * of the same kind that the field's range allows may decode. */
static int legal_replacement(const char *key, size_t x)
{
	static const char *const strings[] = {"src", "rid", "engine", "model", "backend", "reason", "what"};
	for (size_t i = 0; x == 1 && i < AX_ARRAY_LEN(strings); i++)
		if (!strcmp(key, strings[i]))
			return 1;
	return (x == 4 && (!strcmp(key, "logsumexp_all") || !strcmp(key, "topk_mass"))) ||
	       (x == 3 && (!strcmp(key, "token_id") || !strcmp(key, "logsumexp_all"))) ||
	       (x == 2 && !strcmp(key, "counters"));
}

static void test_each_field_mistyped(void **state)
{
	msgpack_object wrong[5];
	memset(wrong, 0, sizeof(wrong));
	wrong[0].type = MSGPACK_OBJECT_NIL;
	wrong[1].type = MSGPACK_OBJECT_STR, wrong[1].via.str.ptr = "zz", wrong[1].via.str.size = 2;
	wrong[2].type = MSGPACK_OBJECT_MAP;
	wrong[3].type = MSGPACK_OBJECT_NEGATIVE_INTEGER, wrong[3].via.i64 = -1;
	wrong[4].type = MSGPACK_OBJECT_FLOAT64, wrong[4].via.f64 = 0.5;
	for (int w = 0; w < N_SAMPLES; w++) {
		ax_record r;
		ax_buf b;
		sample(&r, w);
		ax_buf_init(&b);
		assert_int_equal(ax_record_pack(&r, &b), 0);
		for (uint32_t i = 0; i < n_keys(&b); i++) {
			for (size_t x = 0; x < AX_ARRAY_LEN(wrong); x++) {
				ax_buf f;
				char key[32];
				rewrite(&b, i, &wrong[x], &f, key, sizeof(key));
				int rc = decode_one(&f);
				int legal = legal_replacement(key, x);
				if (legal ? rc < 0 : rc != -EPROTO)
					fail_msg("sample %d, %s replaced by kind %zu: got %d", w, key, x, rc);
				ax_buf_fini(&f);
			}
		}
		ax_buf_fini(&b);
		ax_record_fini(&r);
	}
}

/* ---- hand-built attn maps: encodings the decoder must accept or refuse ---- */
enum { AT_INT8 = 1, AT_F64 = 2, AT_INTS_AS_FLOATS = 4, AT_UNKNOWN_KEYS = 8, AT_SHORT_SCORES = 16, AT_K65 = 32,
       AT_TOKEN_NEG1 = 64, AT_POS_FLOAT = 128, AT_LAYER_HUGE = 256, AT_DUP_KEY = 512 };

static void pk_key(msgpack_packer *pk, const char *k)
{
	msgpack_pack_str(pk, strlen(k));
	msgpack_pack_str_body(pk, k, strlen(k));
}

static void build_attn(msgpack_sbuffer *sb, int opt)
{
	msgpack_packer pk;
	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	uint32_t k = opt & AT_K65 ? 65 : 1;
	msgpack_pack_array(&pk, 1);
	msgpack_pack_map(&pk, 15 + (opt & AT_UNKNOWN_KEYS ? 2 : 0) + (opt & AT_DUP_KEY ? 1 : 0));
	pk_key(&pk, "t"), msgpack_pack_str(&pk, 4), msgpack_pack_str_body(&pk, "attn", 4);
	if (opt & AT_UNKNOWN_KEYS) {
		pk_key(&pk, "future"), msgpack_pack_map(&pk, 1), msgpack_pack_nil(&pk), msgpack_pack_true(&pk);
		msgpack_pack_int(&pk, 5), msgpack_pack_str(&pk, 1), msgpack_pack_str_body(&pk, "x", 1);
	}
	pk_key(&pk, "v");
	if (opt & AT_INT8) {
		const char i8[] = {(char)0xd0, 1}; /* int8 1 */
		msgpack_pack_str_body(&pk, i8, 2); /* raw bytes */
	} else {
		msgpack_pack_uint8(&pk, 1);
	}
	pk_key(&pk, "src"), msgpack_pack_str(&pk, 1), msgpack_pack_str_body(&pk, "s", 1);
	pk_key(&pk, "seq"), msgpack_pack_uint64(&pk, 9);
	pk_key(&pk, "rid"), msgpack_pack_str(&pk, 1), msgpack_pack_str_body(&pk, "r", 1);
	pk_key(&pk, "position"), msgpack_pack_int64(&pk, 100);
	if (opt & AT_DUP_KEY)
		pk_key(&pk, "position"), msgpack_pack_int64(&pk, 80);
	pk_key(&pk, "decode_step"), msgpack_pack_int64(&pk, 0);
	pk_key(&pk, "token_id"), msgpack_pack_int64(&pk, opt & AT_TOKEN_NEG1 ? -1 : 5);
	pk_key(&pk, "layer_id");
	if (opt & AT_LAYER_HUGE)
		msgpack_pack_int64(&pk, INT64_C(1) << 40);
	else
		msgpack_pack_int64(&pk, 2);
	pk_key(&pk, "mode"), msgpack_pack_str(&pk, 10), msgpack_pack_str_body(&pk, "mean_logit", 10);
	pk_key(&pk, "token_positions"), msgpack_pack_array(&pk, k);
	for (uint32_t i = 0; i < k; i++)
		if (opt & AT_POS_FLOAT)
			msgpack_pack_double(&pk, (double)i);
		else
			msgpack_pack_int64(&pk, i);
	pk_key(&pk, "topk_logits"), msgpack_pack_array(&pk, k);
	for (uint32_t i = 0; i < k; i++)
		if (opt & AT_F64)
			msgpack_pack_double(&pk, 1.0 - i);
		else if (opt & AT_INTS_AS_FLOATS)
			msgpack_pack_int(&pk, 1 - (int)i);
		else
			msgpack_pack_float(&pk, 1.0f - (float)i);
	pk_key(&pk, "attention_scores"), msgpack_pack_array(&pk, opt & AT_SHORT_SCORES ? 0 : k);
	for (uint32_t i = 0; i < (opt & AT_SHORT_SCORES ? 0 : k); i++)
		if (opt & AT_INTS_AS_FLOATS)
			msgpack_pack_int(&pk, i == 0);
		else
			msgpack_pack_float(&pk, i == 0 ? 1.0f : 0.0f);
	pk_key(&pk, "logsumexp_all");
	if (opt & AT_INTS_AS_FLOATS)
		msgpack_pack_int(&pk, 3);
	else
		msgpack_pack_double(&pk, 3.0);
	pk_key(&pk, "topk_mass"), msgpack_pack_float(&pk, 0.25f);
}

static void test_encodings(void **state)
{
	static const struct {
		int opt, want;
	} cases[] = {
		{0, 1}, {AT_INT8, 1}, {AT_F64, 1}, {AT_INTS_AS_FLOATS, 1}, {AT_UNKNOWN_KEYS, 1}, {AT_TOKEN_NEG1, 1},
		{AT_DUP_KEY, 1}, {AT_SHORT_SCORES, -EPROTO}, {AT_K65, -EPROTO}, {AT_POS_FLOAT, -EPROTO},
		{AT_LAYER_HUGE, -EPROTO},
	};
	for (size_t i = 0; i < AX_ARRAY_LEN(cases); i++) {
		msgpack_sbuffer sb;
		msgpack_sbuffer_init(&sb);
		build_attn(&sb, cases[i].opt);
		struct collect c = {0};
		int rc = ax_frame_decode(sb.data, sb.size, collect_cb, &c);
		if (rc != cases[i].want)
			fail_msg("case %zu (opt %#x): got %d, want %d", i, cases[i].opt, rc, cases[i].want);
		if (rc == 1) {
			assert_true(c.last.u.attn.topk_logits[0] == 1.0f);
			assert_true(c.last.u.attn.logsumexp_all == 3.0);
			assert_int_equal(c.last.u.attn.position, cases[i].opt & AT_DUP_KEY ? 80 : 100);
		}
		msgpack_sbuffer_destroy(&sb);
	}
}

/* Arrays over their caps and an error in the middle of a frame. */
static void test_caps_and_midframe(void **state)
{
	ax_record r;
	ax_buf b, f;
	ax_buf_init(&b);
	/* policy with 129 layers: packed by hand via a valid policy whose list is then lengthened */
	sample(&r, 9);
	r.u.policy.n_layer_ids = AX_PROTO_MAX_LIST + 1;
	assert_int_equal(ax_record_pack(&r, &b), -EINVAL);
	assert_int_equal(b.len, 0);
	/* stats with 65 counters, built with msgpack-c */
	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, 1);
	msgpack_pack_map(&pk, 5);
	pk_key(&pk, "t"), pk_key(&pk, "stats"), pk_key(&pk, "v"), msgpack_pack_int(&pk, 1);
	pk_key(&pk, "src"), pk_key(&pk, "s"), pk_key(&pk, "seq"), msgpack_pack_int(&pk, 1);
	pk_key(&pk, "counters"), msgpack_pack_map(&pk, AX_PROTO_MAX_STATS + 1);
	for (int i = 0; i <= AX_PROTO_MAX_STATS; i++) {
		char name[16];
		snprintf(name, sizeof(name), "c%d", i);
		pk_key(&pk, name), msgpack_pack_int(&pk, i);
	}
	assert_int_equal(ax_frame_decode(sb.data, sb.size, NULL, NULL), -EPROTO);
	msgpack_sbuffer_destroy(&sb);
	/* [good, bad, good]: one record delivered, then the error */
	ax_buf_init(&f);
	frame_header(&f, 3);
	sample(&r, 5);
	assert_int_equal(ax_record_pack(&r, &f), 0);
	assert_int_equal(ax_buf_append(&f, "\x81\xa1t\xa3" "end", 7), 0);
	assert_int_equal(ax_record_pack(&r, &f), 0);
	struct collect c = {0};
	assert_int_equal(ax_frame_decode(f.data, f.len, collect_cb, &c), -EPROTO);
	assert_int_equal(c.n, 1);
	ax_buf_fini(&f);
	ax_buf_fini(&b);
}

/* ---- validation ---- */
static void v_k65(ax_record *r) { r->u.attn.k = 65; }
static void v_k0(ax_record *r) { r->u.attn.k = 0; }
static void v_nan(ax_record *r) { r->u.attn.topk_logits[2] = NAN; }
static void v_inf_lse(ax_record *r) { r->u.attn.logsumexp_all = INFINITY; }
static void v_unsorted(ax_record *r) { r->u.attn.topk_logits[3] = 3.0f; }
static void v_tie_order(ax_record *r) { r->u.attn.token_positions[1] = 8; }
static void v_pos_range(ax_record *r) { r->u.attn.token_positions[0] = 13; }
static void v_pos_neg(ax_record *r) { r->u.attn.token_positions[4] = -1; }
static void v_scores_sum(ax_record *r) { r->u.attn.attention_scores[0] *= 0.5f; }
static void v_mass(ax_record *r) { r->u.attn.topk_mass = 1.5; }
static void v_head_missing(ax_record *r) { r->u.attn.mode = AX_MODE_HEADS; }
static void v_head_extra(ax_record *r) { r->u.attn.head_id = 3; }
static void v_mode0(ax_record *r) { r->u.attn.mode = 0; }
static void v_prefill2(ax_record *r) { r->u.attn.prefill = 2; }
static void v_rid_empty(ax_record *r) { r->rid[0] = 0; }
static void v_src_empty(ax_record *r) { r->src[0] = 0; }
static void v_src_utf8(ax_record *r) { strcpy(r->src, "bad\xc3("); }
static void v_src_unterminated(ax_record *r) { memset(r->src, 'a', sizeof(r->src)); }
static void v_seq_big(ax_record *r) { r->seq = UINT64_MAX; }
static void v_version0(ax_record *r) { r->v = 0; }
static void v_type(ax_record *r) { r->type = 99; }

static const struct {
	const char *name;
	void (*mutate)(ax_record *r);
} vcases[] = {
	{"k > 64", v_k65}, {"k = 0", v_k0}, {"NaN logit", v_nan}, {"infinite logsumexp", v_inf_lse},
	{"unsorted logits", v_unsorted}, {"tie with higher position first", v_tie_order},
	{"key position > query position", v_pos_range}, {"negative key position", v_pos_neg},
	{"scores not summing to 1", v_scores_sum}, {"mass > 1", v_mass}, {"heads mode without head_id", v_head_missing},
	{"head_id outside heads mode", v_head_extra}, {"mode 0", v_mode0}, {"prefill 2", v_prefill2},
	{"empty rid", v_rid_empty}, {"empty src", v_src_empty}, {"src not UTF-8", v_src_utf8},
	{"src without NUL", v_src_unterminated}, {"seq over int64", v_seq_big}, {"version 0", v_version0},
	{"unknown type", v_type},
};

static void test_validation(void **state)
{
	ax_record r;
	ax_buf b;
	ax_buf_init(&b);
	sample(&r, 2);
	assert_int_equal(ax_record_validate(&r), 0);
	for (size_t i = 0; i < AX_ARRAY_LEN(vcases); i++) {
		sample(&r, 2);
		vcases[i].mutate(&r);
		if (ax_record_validate(&r) != -EINVAL)
			fail_msg("%s: accepted", vcases[i].name);
		assert_int_equal(ax_record_pack(&r, &b), -EINVAL);
		assert_int_equal(ax_record_json(&r, &b), -EINVAL);
		assert_int_equal(b.len, 0);
	}
	/* other types */
	sample(&r, 0);
	r.u.hello.rank = 2;
	assert_int_equal(ax_record_validate(&r), -EINVAL);
	sample(&r, 6);
	r.u.gap.from_seq = 200;
	assert_int_equal(ax_record_validate(&r), -EINVAL);
	sample(&r, 8);
	r.rid[0] = 'x';
	assert_int_equal(ax_record_validate(&r), -EINVAL);
	sample(&r, 9);
	r.u.policy.top_k = 65;
	assert_int_equal(ax_record_validate(&r), -EINVAL);
	sample(&r, 1);
	r.u.req.prompt[1] = -5;
	assert_int_equal(ax_record_validate(&r), -EINVAL);
	ax_record_fini(&r);
	assert_int_equal(ax_record_validate(NULL), -EINVAL);
	ax_buf_fini(&b);
}

static void test_names(void **state)
{
	for (int t = AX_REC_HELLO; t <= AX_REC_POLICY; t++)
		assert_int_equal(ax_rec_type_parse(ax_rec_type_name(t)), t);
	for (int m = AX_MODE_MEAN_LOGIT; m <= AX_MODE_HEADS; m++)
		assert_int_equal(ax_mode_parse(ax_mode_name(m)), m);
	assert_null(ax_rec_type_name(0));
	assert_null(ax_mode_name(4));
	assert_int_equal(ax_rec_type_parse("nope"), -EINVAL);
	assert_int_equal(ax_mode_parse(NULL), -EINVAL);
	ax_record_fini(NULL);
}

static void test_json_errors(void **state)
{
	static const struct {
		const char *text;
		int want;
	} cases[] = {
		{"[1]", -EBADMSG},
		{"{\"t\":\"end\",\"v\":1,\"src\":\"s\",\"seq\":1,\"rid\":\"r\",\"reason\":\"stop\"}", -EPROTO},
		{"{\"t\":\"end\",\"v\":1,\"src\":\"s\",\"seq\":1.0,\"rid\":\"r\",\"reason\":\"stop\",\"tokens\":3}", -EPROTO},
		{"{\"t\":\"end\",\"v\":1,\"src\":\"s\",\"seq\":1,\"rid\":\"r\",\"reason\":\"st\\u0000op\",\"tokens\":3}", -EPROTO},
		{"{\"t\":\"end\",\"v\":1,\"src\":\"s\",\"seq\":1,\"rid\":\"r\",\"reason\":\"stop\",\"tokens\":3,\"x\":[]}", 0},
		{"{\"t\":\"nope\"}", -EPROTO},
	};
	for (size_t i = 0; i < AX_ARRAY_LEN(cases); i++) {
		json_t *j = json_loads(cases[i].text, JSON_ALLOW_NUL, NULL);
		assert_non_null(j);
		ax_record r;
		int rc = ax_record_from_json(j, &r);
		if (rc != cases[i].want)
			fail_msg("case %zu: got %d, want %d", i, rc, cases[i].want);
		ax_record_fini(&r);
		json_decref(j);
	}
}

/* ---- batcher ---- */
static void test_batch_count_flush(void **state)
{
	static const uint32_t counts[] = {1, 15, 16, 600, 65535, 65536};
	for (size_t ci = 0; ci < AX_ARRAY_LEN(counts); ci++) {
		ax_batch bt;
		ax_record r;
		ax_batch_init(&bt);
		bt.max_records = counts[ci];
		bt.max_bytes = AX_PROTO_MAX_FRAME;
		sample(&r, 5);
		for (uint32_t i = 0; i < counts[ci]; i++)
			assert_int_equal(ax_batch_add(&bt, &r), i + 1 == counts[ci]);
		assert_true(ax_batch_due(&bt, bt.first_ns));
		if (counts[ci] == AX_PROTO_MAX_RECORDS)
			assert_int_equal(ax_batch_add(&bt, &r), -ENOBUFS);
		const uint8_t *p;
		size_t n;
		assert_int_equal(ax_batch_finish(&bt, &p, &n), counts[ci]);
		assert_int_equal(ax_frame_decode(p, n, NULL, NULL), counts[ci]);
		assert_int_equal(ax_batch_finish(&bt, &p, &n), 0);
		assert_false(ax_batch_due(&bt, UINT64_MAX));
		ax_batch_fini(&bt);
	}
}

static void test_batch_bytes_deadline(void **state)
{
	ax_batch bt;
	ax_record r;
	ax_batch_init(&bt);
	assert_int_equal(bt.max_records, 512);
	bt.max_bytes = 300;
	sample(&r, 2);
	/* an invalid record adds nothing */
	r.u.attn.k = 0;
	assert_int_equal(ax_batch_add(&bt, &r), -EINVAL);
	assert_int_equal(bt.count, 0);
	sample(&r, 2);
	assert_int_equal(ax_batch_add(&bt, &r), 0); /* ~200 bytes */
	assert_false(ax_batch_due(&bt, bt.first_ns));
	assert_false(ax_batch_due(&bt, bt.first_ns + bt.max_delay_ns - 1));
	assert_true(ax_batch_due(&bt, bt.first_ns + bt.max_delay_ns));
	assert_int_equal(ax_batch_add(&bt, &r), 1); /* over 300 bytes */
	assert_true(ax_batch_due(&bt, bt.first_ns));
	const uint8_t *p;
	size_t n;
	assert_int_equal(ax_batch_finish(&bt, &p, &n), 2);
	struct collect c = {0};
	assert_int_equal(ax_frame_decode(p, n, collect_cb, &c), 2);
	assert_record_equal(&r, &c.last);
	/* the batch is reusable and the deadline restarts with its next first record */
	assert_int_equal(ax_batch_add(&bt, &r), 0);
	assert_int_equal(ax_batch_finish(&bt, &p, &n), 1);
	assert_int_equal(ax_frame_decode(p, n, NULL, NULL), 1);
	ax_batch_fini(&bt);
	ax_batch_fini(NULL);
}

/* A req whose prompt alone exceeds the frame cap is refused (-EMSGSIZE), the batch keeps what it had. */
static void test_batch_giant_record(void **state)
{
	ax_batch bt;
	ax_record r, small;
	ax_batch_init(&bt);
	sample(&small, 5);
	assert_int_equal(ax_batch_add(&bt, &small), 0);
	sample(&r, 1);
	free(r.u.req.prompt);
	r.u.req.prompt_len = AX_PROTO_MAX_PROMPT;
	r.u.req.prompt = malloc(sizeof(int32_t) * AX_PROTO_MAX_PROMPT);
	for (uint32_t i = 0; i < AX_PROTO_MAX_PROMPT; i++)
		r.u.req.prompt[i] = 100000; /* 5 bytes each: 20 MiB */
	assert_int_equal(ax_batch_add(&bt, &r), -EMSGSIZE);
	ax_record_fini(&r);
	const uint8_t *p;
	size_t n;
	assert_int_equal(ax_batch_finish(&bt, &p, &n), 1);
	assert_int_equal(ax_frame_decode(p, n, NULL, NULL), 1);
	ax_batch_fini(&bt);
}

/* ax_record_json writes attn records directly: byte for byte what the emitter writes, whatever the options. */
static void test_json_attn_direct(void **state)
{
	static const char *srcs[] = {"capture:gen:1:0", "a\"b\\c\n\t\x01\x1f", "caf\xc3\xa9 \xe2\x82\xac", "relay"};
	uint64_t x = 0x9e3779b97f4a7c15ull;
	ax_buf a, b;
	ax_buf_init(&a);
	ax_buf_init(&b);
	for (int n = 0; n < 3000; n++) {
		ax_record r;
		ax_record_init(&r, AX_REC_ATTN);
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		snprintf(r.src, sizeof r.src, "%s", srcs[x % 4]);
		snprintf(r.rid, sizeof r.rid, "%s%d", srcs[(x >> 2) % 4], n);
		r.seq = x >> 1;
		r.ts_ns = (x & 8) ? x >> 2 : 0;
		r.v = 1 + (uint32_t)(x % 3);
		ax_rec_attn *t = &r.u.attn;
		t->mode = 1 + (uint32_t)((x >> 5) % 3);
		t->head_id = t->mode == AX_MODE_HEADS ? (int32_t)((x >> 7) % 64) : -1;
		t->prefill = (uint32_t)((x >> 9) & 1);
		t->k = 1 + (uint32_t)((x >> 11) % 64);
		t->position = (int64_t)((x >> 20) % 100000) + t->k;
		t->decode_step = (int64_t)((x >> 30) % 1000);
		t->token_id = (int64_t)((x >> 40) % 200000) - 1;
		t->layer_id = (int32_t)((x >> 50) % 80);
		for (uint32_t i = 0; i < t->k; i++) {
			t->token_positions[i] = (int64_t)i * (t->position / t->k);
			t->topk_logits[i] = 30.0f - (float)i * 0.37f - (float)(x % 1000) * 1e-4f;
			t->attention_scores[i] = 1.0f / (float)t->k;
		}
		t->logsumexp_all = ldexp((double)(x >> 11), -50) - 1e3;
		t->topk_mass = (double)(x % 1000003) / 1000003.0;
		assert_int_equal(ax_record_validate(&r), 0);
		ax_buf_reset(&a);
		ax_buf_reset(&b);
		assert_int_equal(ax_record_json(&r, &a), 0);
		assert_int_equal(ax__record_json_emit(&r, &b), 0);
		assert_int_equal(a.len, b.len);
		assert_memory_equal(a.data, b.data, a.len);
	}
	ax_buf_fini(&a);
	ax_buf_fini(&b);
}

/* ax_frame_span: where a frame ends in a recording; truncation is "need more", bad bytes an error. */
static void test_frame_span(void **state)
{
	ax_batch bt;
	ax_record r;
	const uint8_t *p;
	size_t n, len, got;
	ax_buf two;
	ax_batch_init(&bt);
	ax_buf_init(&two);
	for (int i = 0; i < 40; i++) {
		sample(&r, i % 7);
		assert_true(ax_batch_add(&bt, &r) >= 0);
		ax_record_fini(&r);
	}
	assert_int_equal(ax_batch_finish(&bt, &p, &len), 40);
	ax_buf_append(&two, p, len);
	ax_buf_append(&two, p, len);
	assert_int_equal(ax_frame_span(two.data, two.len, &got), 1);
	assert_int_equal(got, len);
	for (n = 0; n < len; n++) /* every strict prefix: incomplete, never an error */
		assert_int_equal(ax_frame_span(two.data, n, &got), 0);
	static const uint8_t bad[] = {0x91, 0xc1}, huge[] = {0xdd, 0xff, 0xff, 0xff, 0xff, 0x80};
	assert_int_equal(ax_frame_span(bad, sizeof bad, &got), -EBADMSG);
	assert_int_equal(ax_frame_span(huge, sizeof huge, &got), 0); /* claims more than follows: need more */
	uint8_t deep[40];
	memset(deep, 0x91, sizeof deep); /* 39 nested one-element arrays, then an integer */
	deep[39] = 0x01;
	assert_int_equal(ax_frame_span(deep, sizeof deep, &got), -EBADMSG);
	assert_int_equal(ax_frame_span(deep + 40 - 17, 17, &got), 1); /* 16 deep: accepted */
	ax_buf_fini(&two);
	ax_batch_fini(&bt);
}

/* ---- fmt.c: number text ---- */
static void test_fmt_table(void **state)
{
	static const struct {
		float v;
		const char *text;
	} f32[] = {
		{0.0f, "0"}, {-0.0f, "-0.0"}, {1.0f, "1"}, {-2.5f, "-2.5"}, {0.1f, "0.1"}, {0.5761169f, "0.5761169"},
		{0.21194156f, "0.21194156"}, {1e-4f, "0.0001"}, {1e-5f, "1e-05"}, {1.5e-5f, "1.5e-05"},
		{123456.0f, "123456"}, {1234567.0f, "1234567"}, {1e7f, "1e+07"}, {33672428.0f, "33672428"},
		{16777216.0f, "16777216"}, {FLT_MAX, "3.4028235e+38"}, {FLT_MIN, "1.1754944e-38"},
		{1.4e-45f, "1e-45"}, {3.0f, "3"}, {1e10f, "1e+10"},
		{7.038531e-26f, "7.0385307e-26"}, /* 7.038531e-26 is shorter, but (float)strtod misreads it */
	};
	static const struct {
		double v;
		const char *text;
	} f64[] = {
		{0.0, "0"}, {-0.0, "-0.0"}, {0.3, "0.3"}, {0.1 + 0.2, "0.30000000000000004"}, {7.25, "7.25"},
		{-7.25, "-7.25"}, {1e21, "1e+21"}, {1e15, "1e+15"}, {123456789012345.0, "123456789012345"},
		{1234567890123456.0, "1234567890123456"}, {5e-324, "5e-324"}, {1e-323, "1e-323"},
		{DBL_MAX, "1.7976931348623157e+308"}, {DBL_MIN, "2.2250738585072014e-308"}, {1e-5, "1e-05"},
		{0.00012345, "0.00012345"}, {9007199254740993.0, "9007199254740992"}, {1e23, "1e+23"},
		{5.551115123125783e-17, "5.551115123125783e-17"},
	};
	char t[AX__FMT_ROOM];
	for (size_t i = 0; i < sizeof f32 / sizeof f32[0]; i++) {
		t[ax__fmt_f32(f32[i].v, t)] = 0;
		assert_string_equal(t, f32[i].text);
	}
	for (size_t i = 0; i < sizeof f64 / sizeof f64[0]; i++) {
		t[ax__fmt_f64(f64[i].v, t)] = 0;
		assert_string_equal(t, f64[i].text);
	}
	static const struct {
		int64_t v;
		const char *text;
	} ints[] = {{0, "0"}, {9, "9"}, {10, "10"}, {-1, "-1"}, {99, "99"}, {100, "100"}, {1234567, "1234567"},
		    {INT64_MAX, "9223372036854775807"}, {INT64_MIN, "-9223372036854775808"}};
	for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
		t[ax__fmt_i64(ints[i].v, t)] = 0;
		assert_string_equal(t, ints[i].text);
	}
	t[ax__fmt_u64(UINT64_MAX, t)] = 0;
	assert_string_equal(t, "18446744073709551615");
}

/* Text of v reads back as v (float32: as JSON readers do, strtod then narrowing), and printf's correctly rounded
 * decimal with one digit fewer does not: shortest. */
static int sig_digits(const char *t)
{
	int n = 0, lead = 1, dot = strchr(t, '.') != NULL, last_nz = 0;
	for (; *t && *t != 'e'; t++) {
		if (*t < '0' || *t > '9' || (lead && *t == '0'))
			continue;
		lead = 0;
		n++;
		if (*t != '0')
			last_nz = n;
	}
	return dot ? n : last_nz; /* an integer's trailing zeros are not significant */
}

static void check_f32_text(float v)
{
	char t[AX__FMT_ROOM], r[48];
	t[ax__fmt_f32(v, t)] = 0;
	float a = (float)strtod(t, NULL), b = strtof(t, NULL);
	assert_memory_equal(&a, &v, 4);
	assert_memory_equal(&b, &v, 4);
	int d = sig_digits(t);
	if (d > 1) {
		snprintf(r, sizeof r, "%.*e", d - 2, (double)v);
		assert_false((float)strtod(r, NULL) == v);
	}
}

static void check_f64_text(double v)
{
	char t[AX__FMT_ROOM], r[48];
	t[ax__fmt_f64(v, t)] = 0;
	double a = strtod(t, NULL);
	assert_memory_equal(&a, &v, 8);
	int d = sig_digits(t);
	if (d > 1) {
		snprintf(r, sizeof r, "%.*e", d - 2, v);
		assert_false(strtod(r, NULL) == v);
	}
}

static void test_fmt_roundtrip(void **state)
{
	uint64_t x = 0x243f6a8885a308d3ull;
	for (int i = 0; i < 300000; i++) { /* random bit patterns */
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		uint32_t b32 = (uint32_t)x;
		float f;
		double d;
		memcpy(&f, &b32, 4);
		memcpy(&d, &x, 8);
		if (isfinite(f))
			check_f32_text(f);
		if (isfinite(d) && i % 3 == 0)
			check_f64_text(d);
	}
	check_f32_text(7.038531e-26f); /* the shortest text, 7.038531e-26, fails the double-then-float reading */
	check_f32_text(-7.038531e-26f);
	for (int e = -149; e <= 127; e++) { /* powers of two (lopsided intervals) and their neighbours */
		float p = ldexpf(1.0f, e);
		check_f32_text(p);
		check_f32_text(nextafterf(p, 0));
		check_f32_text(nextafterf(p, INFINITY));
	}
	for (int e = -1074; e <= 1023; e++) {
		double p = ldexp(1.0, e);
		check_f64_text(p);
		check_f64_text(nextafter(p, 0));
		if (e < 1023)
			check_f64_text(nextafter(p, INFINITY));
	}
	for (uint32_t c = 1; c < 4096; c++) { /* small subnormals: few significant bits */
		float f;
		memcpy(&f, &c, 4);
		check_f32_text(f);
		uint64_t c64 = c;
		double d;
		memcpy(&d, &c64, 8);
		check_f64_text(d);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_roundtrip_msgpack),
		cmocka_unit_test(test_roundtrip_json),
		cmocka_unit_test(test_json_text),
		cmocka_unit_test(test_many_records),
		cmocka_unit_test(test_truncated),
		cmocka_unit_test(test_bad_bytes),
		cmocka_unit_test(test_oversized),
		cmocka_unit_test(test_each_field_missing),
		cmocka_unit_test(test_each_field_mistyped),
		cmocka_unit_test(test_encodings),
		cmocka_unit_test(test_caps_and_midframe),
		cmocka_unit_test(test_validation),
		cmocka_unit_test(test_names),
		cmocka_unit_test(test_json_errors),
		cmocka_unit_test(test_batch_count_flush),
		cmocka_unit_test(test_batch_bytes_deadline),
		cmocka_unit_test(test_batch_giant_record),
		cmocka_unit_test(test_json_attn_direct),
		cmocka_unit_test(test_frame_span),
		cmocka_unit_test(test_fmt_table),
		cmocka_unit_test(test_fmt_roundtrip),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
