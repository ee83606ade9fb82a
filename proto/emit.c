/*
 * emit.c — the encoding half of the schema: which keys a record of each type carries, in which order, with which
 * value types. pack.c (msgpack) and json.c (JSON text) both run records through here, so the two wire forms have
 * the same field names and the same optional-field rules by construction.
 *
 * Every record: t, v, src, seq, then ts when non-zero, then rid where the type has one (gap: when non-empty),
 * then the type's own fields. Map sizes are counted up front because msgpack maps carry their length first.
 */
#include "proto_internal.h"

#include <string.h>

#define TRY(x)                  \
	do {                    \
		int rc_ = (x);  \
		if (rc_)        \
			return rc_; \
	} while (0)

/* Helpers: one key and its value. */
static inline int kv_u64(const ax__emitter *e, void *c, const char *k, uint64_t v)
{
	TRY(e->key(c, k, strlen(k)));
	return e->u64(c, v);
}

static inline int kv_i64(const ax__emitter *e, void *c, const char *k, int64_t v)
{
	TRY(e->key(c, k, strlen(k)));
	return e->i64(c, v);
}

static inline int kv_f64(const ax__emitter *e, void *c, const char *k, double v)
{
	TRY(e->key(c, k, strlen(k)));
	return e->f64(c, v);
}

static inline int kv_str(const ax__emitter *e, void *c, const char *k, const char *v)
{
	TRY(e->key(c, k, strlen(k)));
	return e->str(c, v);
}

static inline int kv_ids(const ax__emitter *e, void *c, const char *k, const int32_t *ids, uint32_t n)
{
	TRY(e->key(c, k, strlen(k)));
	TRY(e->array(c, n));
	for (uint32_t i = 0; i < n; i++)
		TRY(e->i64(c, ids[i]));
	return e->end(c);
}

static bool has_rid(const ax_record *r)
{
	return r->type != AX_REC_HELLO && r->type != AX_REC_STATS && (r->type != AX_REC_GAP || r->rid[0]);
}

/* Pairs in the type's own part of the map. */
static uint32_t body_pairs(const ax_record *r)
{
	switch (r->type) {
	case AX_REC_HELLO: return 14;
	case AX_REC_REQ: return 2;
	case AX_REC_ATTN:
		return 10 + (r->u.attn.mode == AX_MODE_HEADS) + (r->u.attn.prefill != 0);
	case AX_REC_END: return 2;
	case AX_REC_GAP: return 5;
	case AX_REC_STATS: return 1;
	case AX_REC_POLICY: return 7 + (r->u.policy.mode != 0);
	}
	return 0;
}

static int emit_hello(const ax_rec_hello *h, const ax__emitter *e, void *c)
{
	TRY(kv_str(e, c, "engine", h->engine));
	TRY(kv_str(e, c, "model", h->model));
	TRY(kv_str(e, c, "backend", h->backend));
	TRY(kv_u64(e, c, "rank", h->rank));
	TRY(kv_u64(e, c, "world_size", h->world_size));
	TRY(kv_u64(e, c, "n_layers", h->n_layers));
	TRY(kv_u64(e, c, "n_q_heads", h->n_q_heads));
	TRY(kv_u64(e, c, "n_kv_heads", h->n_kv_heads));
	TRY(kv_u64(e, c, "head_offset", h->head_offset));
	TRY(kv_u64(e, c, "head_dim", h->head_dim));
	TRY(kv_u64(e, c, "top_k", h->top_k));
	TRY(kv_str(e, c, "mode", ax_mode_name(h->mode)));
	TRY(kv_ids(e, c, "layers", h->layer_ids, h->n_layer_ids));
	return kv_u64(e, c, "generation", h->generation);
}

static int emit_req(const ax_rec_req *q, const ax__emitter *e, void *c)
{
	TRY(kv_ids(e, c, "prompt", q->prompt, q->prompt_len));
	return kv_u64(e, c, "prompt_len", q->prompt_len);
}

static int emit_topk(const ax_rec_attn *a, const ax__emitter *e, void *c)
{
	TRY(e->key(c, "token_positions", 15));
	TRY(e->array(c, a->k));
	for (uint32_t i = 0; i < a->k; i++)
		TRY(e->i64(c, a->token_positions[i]));
	TRY(e->end(c));
	TRY(e->key(c, "topk_logits", 11));
	TRY(e->array(c, a->k));
	for (uint32_t i = 0; i < a->k; i++)
		TRY(e->f32(c, a->topk_logits[i]));
	TRY(e->end(c));
	TRY(e->key(c, "attention_scores", 16));
	TRY(e->array(c, a->k));
	for (uint32_t i = 0; i < a->k; i++)
		TRY(e->f32(c, a->attention_scores[i]));
	return e->end(c);
}

static int emit_attn(const ax_rec_attn *a, const ax__emitter *e, void *c)
{
	TRY(kv_i64(e, c, "position", a->position));
	TRY(kv_i64(e, c, "decode_step", a->decode_step));
	TRY(kv_i64(e, c, "token_id", a->token_id));
	TRY(kv_i64(e, c, "layer_id", a->layer_id));
	TRY(kv_str(e, c, "mode", ax_mode_name(a->mode)));
	if (a->mode == AX_MODE_HEADS)
		TRY(kv_i64(e, c, "head_id", a->head_id));
	TRY(emit_topk(a, e, c));
	TRY(kv_f64(e, c, "logsumexp_all", a->logsumexp_all));
	TRY(kv_f64(e, c, "topk_mass", a->topk_mass));
	if (a->prefill)
		TRY(kv_u64(e, c, "prefill", a->prefill));
	return 0;
}

static int emit_gap(const ax_rec_gap *g, const ax__emitter *e, void *c)
{
	TRY(kv_str(e, c, "what", g->what));
	TRY(kv_str(e, c, "reason", g->reason));
	TRY(kv_u64(e, c, "count", g->count));
	TRY(kv_u64(e, c, "from_seq", g->from_seq));
	return kv_u64(e, c, "to_seq", g->to_seq);
}

static int emit_stats(const ax_rec_stats *s, const ax__emitter *e, void *c)
{
	TRY(e->key(c, "counters", 8));
	TRY(e->map(c, s->n));
	for (uint32_t i = 0; i < s->n; i++)
		TRY(kv_u64(e, c, s->kv[i].name, s->kv[i].value));
	return e->end(c);
}

static int emit_policy(const ax_rec_policy *p, const ax__emitter *e, void *c)
{
	TRY(kv_u64(e, c, "top_k", p->top_k));
	if (p->mode)
		TRY(kv_str(e, c, "mode", ax_mode_name(p->mode)));
	TRY(kv_u64(e, c, "stride", p->stride));
	TRY(kv_u64(e, c, "max_tokens", p->max_tokens));
	TRY(kv_u64(e, c, "prompt", p->prompt));
	TRY(kv_ids(e, c, "layers", p->layer_ids, p->n_layer_ids));
	TRY(kv_ids(e, c, "heads", p->head_ids, p->n_head_ids));
	return kv_u64(e, c, "ttl_ms", p->ttl_ms);
}

static int emit_body(const ax_record *r, const ax__emitter *e, void *c)
{
	switch (r->type) {
	case AX_REC_HELLO: return emit_hello(&r->u.hello, e, c);
	case AX_REC_REQ: return emit_req(&r->u.req, e, c);
	case AX_REC_ATTN: return emit_attn(&r->u.attn, e, c);
	case AX_REC_END:
		TRY(kv_str(e, c, "reason", r->u.end.reason));
		return kv_u64(e, c, "tokens", r->u.end.tokens);
	case AX_REC_GAP: return emit_gap(&r->u.gap, e, c);
	case AX_REC_STATS: return emit_stats(&r->u.stats, e, c);
	case AX_REC_POLICY: return emit_policy(&r->u.policy, e, c);
	}
	return 0;
}

int ax__record_emit(const ax_record *r, const ax__emitter *e, void *c)
{
	uint32_t pairs = 4 + (r->ts_ns != 0) + has_rid(r) + body_pairs(r);
	TRY(e->map(c, pairs));
	TRY(kv_str(e, c, "t", ax_rec_type_name(r->type)));
	TRY(kv_u64(e, c, "v", r->v));
	TRY(kv_str(e, c, "src", r->src));
	TRY(kv_u64(e, c, "seq", r->seq));
	if (r->ts_ns)
		TRY(kv_u64(e, c, "ts", r->ts_ns));
	if (has_rid(r))
		TRY(kv_str(e, c, "rid", r->rid));
	TRY(emit_body(r, e, c));
	return e->end(c);
}
