/*
 * fields.c — the decoding half of the schema: from a map of values (msgpack or JSON, seen through ax__val) to an
 * ax_record. Keys are matched by length then memcmp (no hashing, no allocation); each known key is applied when
 * it belongs to the record's type and ignored otherwise, like any unknown key. Every field a type requires is
 * tracked in a bit mask and checked at the end; then the cross-field rules (equal top-k array lengths,
 * prompt_len = len(prompt), head_id exactly in heads mode) and ax_record_validate. Any failure is -EPROTO.
 *
 * Integers are accepted in any msgpack integer encoding (or a JSON integer) and range-checked against the field;
 * float fields also take integers. Strings must fit their fixed field and contain no NUL.
 */
#include "proto_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>


#define B(f) (UINT64_C(1) << (f))

static int field_of(const char *k, size_t n)
{
	switch (n) {
	case 1:
		if (memcmp(k, "t", 1) == 0)
			return AX__F_T;
		if (memcmp(k, "v", 1) == 0)
			return AX__F_V;
		break;
	case 2:
		if (memcmp(k, "ts", 2) == 0)
			return AX__F_TS;
		break;
	case 3:
		if (memcmp(k, "src", 3) == 0)
			return AX__F_SRC;
		if (memcmp(k, "seq", 3) == 0)
			return AX__F_SEQ;
		if (memcmp(k, "rid", 3) == 0)
			return AX__F_RID;
		break;
	case 4:
		if (memcmp(k, "mode", 4) == 0)
			return AX__F_MODE;
		if (memcmp(k, "what", 4) == 0)
			return AX__F_WHAT;
		if (memcmp(k, "rank", 4) == 0)
			return AX__F_RANK;
		break;
	case 5:
		if (memcmp(k, "count", 5) == 0)
			return AX__F_COUNT;
		if (memcmp(k, "top_k", 5) == 0)
			return AX__F_TOP_K;
		if (memcmp(k, "heads", 5) == 0)
			return AX__F_HEADS;
		if (memcmp(k, "model", 5) == 0)
			return AX__F_MODEL;
		break;
	case 6:
		if (memcmp(k, "prompt", 6) == 0)
			return AX__F_PROMPT;
		if (memcmp(k, "reason", 6) == 0)
			return AX__F_REASON;
		if (memcmp(k, "tokens", 6) == 0)
			return AX__F_TOKENS;
		if (memcmp(k, "to_seq", 6) == 0)
			return AX__F_TO_SEQ;
		if (memcmp(k, "stride", 6) == 0)
			return AX__F_STRIDE;
		if (memcmp(k, "layers", 6) == 0)
			return AX__F_LAYERS;
		if (memcmp(k, "ttl_ms", 6) == 0)
			return AX__F_TTL_MS;
		if (memcmp(k, "engine", 6) == 0)
			return AX__F_ENGINE;
		break;
	case 7:
		if (memcmp(k, "head_id", 7) == 0)
			return AX__F_HEAD_ID;
		if (memcmp(k, "prefill", 7) == 0)
			return AX__F_PREFILL;
		if (memcmp(k, "backend", 7) == 0)
			return AX__F_BACKEND;
		break;
	case 8:
		if (memcmp(k, "position", 8) == 0)
			return AX__F_POSITION;
		if (memcmp(k, "token_id", 8) == 0)
			return AX__F_TOKEN_ID;
		if (memcmp(k, "layer_id", 8) == 0)
			return AX__F_LAYER_ID;
		if (memcmp(k, "from_seq", 8) == 0)
			return AX__F_FROM_SEQ;
		if (memcmp(k, "counters", 8) == 0)
			return AX__F_COUNTERS;
		if (memcmp(k, "n_layers", 8) == 0)
			return AX__F_N_LAYERS;
		if (memcmp(k, "head_dim", 8) == 0)
			return AX__F_HEAD_DIM;
		break;
	case 9:
		if (memcmp(k, "topk_mass", 9) == 0)
			return AX__F_TOPK_MASS;
		if (memcmp(k, "n_q_heads", 9) == 0)
			return AX__F_N_Q_HEADS;
		break;
	case 10:
		if (memcmp(k, "prompt_len", 10) == 0)
			return AX__F_PROMPT_LEN;
		if (memcmp(k, "max_tokens", 10) == 0)
			return AX__F_MAX_TOKENS;
		if (memcmp(k, "world_size", 10) == 0)
			return AX__F_WORLD_SIZE;
		if (memcmp(k, "n_kv_heads", 10) == 0)
			return AX__F_N_KV_HEADS;
		if (memcmp(k, "generation", 10) == 0)
			return AX__F_GENERATION;
		break;
	case 11:
		if (memcmp(k, "decode_step", 11) == 0)
			return AX__F_DECODE_STEP;
		if (memcmp(k, "topk_logits", 11) == 0)
			return AX__F_TOPK_LOGITS;
		if (memcmp(k, "head_offset", 11) == 0)
			return AX__F_HEAD_OFFSET;
		break;
	case 13:
		if (memcmp(k, "logsumexp_all", 13) == 0)
			return AX__F_LOGSUMEXP_ALL;
		break;
	case 15:
		if (memcmp(k, "token_positions", 15) == 0)
			return AX__F_TOKEN_POSITIONS;
		break;
	case 16:
		if (memcmp(k, "attention_scores", 16) == 0)
			return AX__F_ATTENTION_SCORES;
		break;
	}
	return -1;
}

#define COMMON_REQ (B(AX__F_T) | B(AX__F_V) | B(AX__F_SRC) | B(AX__F_SEQ))
static const uint64_t required[] = {
	[AX_REC_HELLO] = B(AX__F_ENGINE) | B(AX__F_MODEL) | B(AX__F_BACKEND) | B(AX__F_RANK) | B(AX__F_WORLD_SIZE) | B(AX__F_N_LAYERS) |
			 B(AX__F_N_Q_HEADS) | B(AX__F_N_KV_HEADS) | B(AX__F_HEAD_OFFSET) | B(AX__F_HEAD_DIM) | B(AX__F_TOP_K) | B(AX__F_MODE) |
			 B(AX__F_LAYERS) | B(AX__F_GENERATION),
	[AX_REC_REQ] = B(AX__F_RID) | B(AX__F_PROMPT) | B(AX__F_PROMPT_LEN),
	[AX_REC_ATTN] = B(AX__F_RID) | B(AX__F_POSITION) | B(AX__F_DECODE_STEP) | B(AX__F_TOKEN_ID) | B(AX__F_LAYER_ID) | B(AX__F_MODE) |
			B(AX__F_TOKEN_POSITIONS) | B(AX__F_TOPK_LOGITS) | B(AX__F_ATTENTION_SCORES) | B(AX__F_LOGSUMEXP_ALL) |
			B(AX__F_TOPK_MASS),
	[AX_REC_END] = B(AX__F_RID) | B(AX__F_REASON) | B(AX__F_TOKENS),
	[AX_REC_GAP] = B(AX__F_WHAT) | B(AX__F_REASON) | B(AX__F_COUNT) | B(AX__F_FROM_SEQ) | B(AX__F_TO_SEQ),
	[AX_REC_STATS] = B(AX__F_COUNTERS),
	[AX_REC_POLICY] = B(AX__F_RID) | B(AX__F_TOP_K) | B(AX__F_STRIDE) | B(AX__F_MAX_TOKENS) | B(AX__F_PROMPT) | B(AX__F_LAYERS) |
			  B(AX__F_HEADS) | B(AX__F_TTL_MS),
};
static const uint64_t optional[] = {
	[AX_REC_ATTN] = B(AX__F_HEAD_ID) | B(AX__F_PREFILL),
	[AX_REC_GAP] = B(AX__F_RID),
	[AX_REC_POLICY] = B(AX__F_MODE),
};



/* ---- value conversions: 0 or -EPROTO ---- */
static int get_u(const ax__val *v, uint64_t max, uint64_t *out)
{
	if (v->kind != AX_V_UINT || v->u > max)
		return -EPROTO;
	*out = v->u;
	return 0;
}

static int get_u32(const ax__val *v, uint32_t *out)
{
	uint64_t u;
	int rc = get_u(v, UINT32_MAX, &u);
	if (rc == 0)
		*out = (uint32_t)u;
	return rc;
}

static int get_i(const ax__val *v, int64_t min, int64_t max, int64_t *out)
{
	if (v->kind == AX_V_UINT && v->u <= (uint64_t)max)
		*out = (int64_t)v->u;
	else if (v->kind == AX_V_INT && v->i >= min && v->i <= max)
		*out = v->i;
	else
		return -EPROTO;
	return 0;
}

static int get_i32(const ax__val *v, int32_t *out)
{
	int64_t i;
	int rc = get_i(v, INT32_MIN, INT32_MAX, &i);
	if (rc == 0)
		*out = (int32_t)i;
	return rc;
}

static int get_f(const ax__val *v, double *out)
{
	switch (v->kind) {
	case AX_V_FLOAT: *out = v->f; return 0;
	case AX_V_UINT: *out = (double)v->u; return 0;
	case AX_V_INT: *out = (double)v->i; return 0;
	}
	return -EPROTO;
}

static int get_str(const ax__val *v, char *dst, size_t cap)
{
	if (v->kind != AX_V_STR || v->n >= cap || memchr(v->s, 0, v->n))
		return -EPROTO;
	memcpy(dst, v->s, v->n);
	dst[v->n] = 0;
	return 0;
}

static int get_mode(const ax__val *v, uint32_t *out)
{
	if (v->kind != AX_V_STR)
		return -EPROTO;
	for (int m = AX_MODE_MEAN_LOGIT; m <= AX_MODE_HEADS; m++) {
		const char *name = ax_mode_name(m);
		if (strlen(name) == v->n && memcmp(name, v->s, v->n) == 0) {
			*out = (uint32_t)m;
			return 0;
		}
	}
	return -EPROTO;
}

/* An array of non-negative int32 ids (layers, heads). */
static int get_ids(ax__val *v, int32_t *ids, uint32_t *n, uint32_t cap)
{
	if (v->kind != AX_V_ARRAY || v->n > cap)
		return -EPROTO;
	ax__val e;
	for (size_t i = 0; i < v->n; i++) {
		v->next(v, &e);
		if (get_i32(&e, &ids[i]) < 0 || ids[i] < 0)
			return -EPROTO;
	}
	*n = (uint32_t)v->n;
	return 0;
}

static int get_prompt(ax__val *v, ax_rec_req *q)
{
	if (v->kind != AX_V_ARRAY || v->n > AX_PROTO_MAX_PROMPT)
		return -EPROTO;
	free(q->prompt); /* a repeated key: the last one wins */
	q->prompt = NULL;
	q->prompt_len = 0;
	if (v->n == 0)
		return 0;
	q->prompt = malloc(v->n * sizeof(*q->prompt));
	if (!q->prompt)
		return -ENOMEM;
	q->prompt_len = (uint32_t)v->n;
	ax__val e;
	for (size_t i = 0; i < v->n; i++) {
		v->next(v, &e);
		if (get_i32(&e, &q->prompt[i]) < 0 || q->prompt[i] < 0)
			return -EPROTO;
	}
	return 0;
}

/* ---- attn ---- */
static int get_positions(ax__val *v, ax_rec_attn *a, uint32_t *n)
{
	if (v->kind != AX_V_ARRAY || v->n > AX_PROTO_MAX_TOPK)
		return -EPROTO;
	if (v->u32s && v->u32s(v, a->token_positions)) { /* all small non-negative integers: what get_i accepts */
		*n = (uint32_t)v->n;
		return 0;
	}
	ax__val e;
	for (size_t i = 0; i < v->n; i++) {
		v->next(v, &e);
		if (get_i(&e, INT64_MIN, INT64_MAX, &a->token_positions[i]) < 0)
			return -EPROTO;
	}
	*n = (uint32_t)v->n;
	return 0;
}

static int get_floats(ax__val *v, float *out, uint32_t *n)
{
	if (v->kind != AX_V_ARRAY || v->n > AX_PROTO_MAX_TOPK)
		return -EPROTO;
	if (v->f32s && v->f32s(v, out)) { /* all float32: (float)(double)x is x */
		*n = (uint32_t)v->n;
		return 0;
	}
	ax__val e;
	for (size_t i = 0; i < v->n; i++) {
		double d;
		v->next(v, &e);
		if (get_f(&e, &d) < 0)
			return -EPROTO;
		out[i] = (float)d; /* out of float range becomes inf: validation rejects it */
	}
	*n = (uint32_t)v->n;
	return 0;
}

static int apply_attn(ax__dec *d, int f, ax__val *v)
{
	ax_rec_attn *a = &d->r->u.attn;
	switch (f) {
	case AX__F_POSITION: return get_i(v, INT64_MIN, INT64_MAX, &a->position);
	case AX__F_DECODE_STEP: return get_i(v, INT64_MIN, INT64_MAX, &a->decode_step);
	case AX__F_TOKEN_ID: return get_i(v, INT64_MIN, INT64_MAX, &a->token_id);
	case AX__F_LAYER_ID: return get_i32(v, &a->layer_id);
	case AX__F_MODE: return get_mode(v, &a->mode);
	case AX__F_HEAD_ID: return get_i32(v, &a->head_id);
	case AX__F_TOKEN_POSITIONS: return get_positions(v, a, &d->n_pos);
	case AX__F_TOPK_LOGITS: return get_floats(v, a->topk_logits, &d->n_logits);
	case AX__F_ATTENTION_SCORES: return get_floats(v, a->attention_scores, &d->n_scores);
	case AX__F_LOGSUMEXP_ALL: return get_f(v, &a->logsumexp_all);
	case AX__F_TOPK_MASS: return get_f(v, &a->topk_mass);
	case AX__F_PREFILL: return get_u32(v, &a->prefill);
	}
	return 0;
}

/* ---- other types ---- */
static int apply_hello(ax_rec_hello *h, int f, ax__val *v)
{
	switch (f) {
	case AX__F_ENGINE: return get_str(v, h->engine, sizeof(h->engine));
	case AX__F_MODEL: return get_str(v, h->model, sizeof(h->model));
	case AX__F_BACKEND: return get_str(v, h->backend, sizeof(h->backend));
	case AX__F_RANK: return get_u32(v, &h->rank);
	case AX__F_WORLD_SIZE: return get_u32(v, &h->world_size);
	case AX__F_N_LAYERS: return get_u32(v, &h->n_layers);
	case AX__F_N_Q_HEADS: return get_u32(v, &h->n_q_heads);
	case AX__F_N_KV_HEADS: return get_u32(v, &h->n_kv_heads);
	case AX__F_HEAD_OFFSET: return get_u32(v, &h->head_offset);
	case AX__F_HEAD_DIM: return get_u32(v, &h->head_dim);
	case AX__F_TOP_K: return get_u32(v, &h->top_k);
	case AX__F_MODE: return get_mode(v, &h->mode);
	case AX__F_LAYERS: return get_ids(v, h->layer_ids, &h->n_layer_ids, AX_PROTO_MAX_LIST);
	case AX__F_GENERATION: return get_u(v, INT64_MAX, &h->generation);
	}
	return 0;
}

static int apply_gap(ax_rec_gap *g, int f, ax__val *v)
{
	switch (f) {
	case AX__F_WHAT: return get_str(v, g->what, sizeof(g->what));
	case AX__F_REASON: return get_str(v, g->reason, sizeof(g->reason));
	case AX__F_COUNT: return get_u(v, INT64_MAX, &g->count);
	case AX__F_FROM_SEQ: return get_u(v, INT64_MAX, &g->from_seq);
	case AX__F_TO_SEQ: return get_u(v, INT64_MAX, &g->to_seq);
	}
	return 0;
}

static int apply_counter(const ax__val *k, ax__val *v, void *arg)
{
	ax_rec_stats *s = arg;
	if (s->n == AX_PROTO_MAX_STATS)
		return -EPROTO;
	ax_stat_kv *kv = &s->kv[s->n];
	if (get_str(k, kv->name, sizeof(kv->name)) < 0 || get_u(v, INT64_MAX, &kv->value) < 0)
		return -EPROTO;
	for (uint32_t i = 0; i < s->n; i++)
		if (strcmp(s->kv[i].name, kv->name) == 0)
			return -EPROTO; /* duplicate name */
	s->n++;
	return 0;
}

static int apply_stats(ax_rec_stats *s, int f, ax__val *v)
{
	if (f != AX__F_COUNTERS)
		return 0;
	if (v->kind != AX_V_MAP || v->n > AX_PROTO_MAX_STATS)
		return -EPROTO;
	s->n = 0;
	return v->each(v, apply_counter, s);
}

static int apply_policy(ax_rec_policy *p, int f, ax__val *v)
{
	switch (f) {
	case AX__F_TOP_K: return get_u32(v, &p->top_k);
	case AX__F_MODE: return get_mode(v, &p->mode);
	case AX__F_STRIDE: return get_u32(v, &p->stride);
	case AX__F_MAX_TOKENS: return get_u32(v, &p->max_tokens);
	case AX__F_PROMPT: return get_u32(v, &p->prompt);
	case AX__F_LAYERS: return get_ids(v, p->layer_ids, &p->n_layer_ids, AX_PROTO_MAX_LIST);
	case AX__F_HEADS: return get_ids(v, p->head_ids, &p->n_head_ids, AX_PROTO_MAX_LIST);
	case AX__F_TTL_MS: return get_u(v, INT64_MAX, &p->ttl_ms);
	}
	return 0;
}

static int apply_body(ax__dec *d, int f, ax__val *v)
{
	ax_record *r = d->r;
	switch (r->type) {
	case AX_REC_ATTN: return apply_attn(d, f, v);
	case AX_REC_HELLO: return apply_hello(&r->u.hello, f, v);
	case AX_REC_REQ:
		if (f == AX__F_PROMPT)
			return get_prompt(v, &r->u.req);
		return get_u(v, UINT32_MAX, &d->prompt_len);
	case AX_REC_END:
		if (f == AX__F_REASON)
			return get_str(v, r->u.end.reason, sizeof(r->u.end.reason));
		return get_u(v, INT64_MAX, &r->u.end.tokens);
	case AX_REC_GAP: return apply_gap(&r->u.gap, f, v);
	case AX_REC_STATS: return apply_stats(&r->u.stats, f, v);
	case AX_REC_POLICY: return apply_policy(&r->u.policy, f, v);
	}
	return 0;
}

int ax__dec_field(ax__dec *d, int f, ax__val *v)
{
	uint64_t bit = B(f);
	if (f == AX__F_T || !((COMMON_REQ | B(AX__F_TS) | required[d->r->type] | optional[d->r->type]) & bit))
		return 0; /* `t` was read first; a known name that this type does not use: ignored like any unknown key */
	d->seen |= bit;
	switch (f) {
	case AX__F_V: return get_u32(v, &d->r->v);
	case AX__F_SRC: return get_str(v, d->r->src, sizeof(d->r->src));
	case AX__F_SEQ: return get_u(v, INT64_MAX, &d->r->seq);
	case AX__F_TS: return get_u(v, INT64_MAX, &d->r->ts_ns);
	case AX__F_RID: return get_str(v, d->r->rid, sizeof(d->r->rid));
	}
	return apply_body(d, f, v);
}

static int apply_pair(const ax__val *k, ax__val *v, void *arg)
{
	if (k->kind != AX_V_STR)
		return 0;
	int f = field_of(k->s, k->n);
	return f < 0 ? 0 : ax__dec_field(arg, f, v);
}

/* Clear what the previous record left. The attn arrays are left alone (k bounds them): an 8 KiB memset per
 * record would cost more than decoding it. */
static void reset(ax_record *r, int type)
{
	r->type = type;
	r->v = 0;
	r->seq = r->ts_ns = 0;
	r->src[0] = r->rid[0] = 0;
	if (type != AX_REC_ATTN) {
		memset(&r->u, 0, sizeof(r->u));
		return;
	}
	ax_rec_attn *a = &r->u.attn;
	a->position = a->decode_step = a->token_id = 0;
	a->layer_id = 0;
	a->mode = a->k = a->prefill = 0;
	a->head_id = -1;
	a->logsumexp_all = a->topk_mass = 0;
}

int ax__dec_finish(ax__dec *d)
{
	ax_record *r = d->r;
	uint64_t need = COMMON_REQ | required[r->type];
	if (r->type == AX_REC_ATTN) {
		if (r->u.attn.mode == AX_MODE_HEADS)
			need |= B(AX__F_HEAD_ID);
		if (d->n_pos != d->n_logits || d->n_pos != d->n_scores)
			return -EPROTO;
		r->u.attn.k = d->n_pos;
	}
	if ((d->seen & need) != need)
		return -EPROTO;
	if (r->type == AX_REC_REQ && d->prompt_len != r->u.req.prompt_len)
		return -EPROTO;
	return ax_record_validate(r) < 0 ? -EPROTO : 0;
}

void ax__dec_begin(ax__dec *d, ax_record *r, int type)
{
	reset(r, type);
	*d = (ax__dec){.r = r, .seen = B(AX__F_T)};
}

int ax__record_from_map(ax__val *map, int (*find)(const ax__val *, const char *, ax__val *), ax_record *r)
{
	ax__val tv;
	int type = -1;
	if (find(map, "t", &tv) && tv.kind == AX_V_STR)
		for (int t = AX_REC_HELLO; t <= AX_REC_POLICY && type < 0; t++)
			if (strlen(ax_rec_type_name(t)) == tv.n && memcmp(ax_rec_type_name(t), tv.s, tv.n) == 0)
				type = t;
	if (type < 0) {
		reset(r, AX_REC_HELLO);
		return -EPROTO;
	}
	ax__dec d;
	ax__dec_begin(&d, r, type);
	int rc = map->each(map, apply_pair, &d);
	if (rc)
		return rc < 0 ? rc : -EPROTO;
	return ax__dec_finish(&d);
}
