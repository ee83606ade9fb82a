/*
 * record.c — record names, life cycle and the semantic rules every record obeys (ax_record_validate).
 *
 * Validation runs on both sides: the encoder refuses to put an invalid record on the wire and the decoder refuses
 * to hand one to a consumer, so every consumer can rely on the rules below without re-checking. The rules are
 * those a consumer would otherwise trip over: counts within their arrays, finite numbers, top-k best first, key
 * positions inside 0..position, strings that are NUL-terminated UTF-8 (so JSON rendering cannot fail), and every
 * integer within int64 (so JSON readers that use signed 64-bit integers, jansson among them, read it exactly).
 * Uniqueness of key positions is implied for ties only (O(k²) otherwise, not checked).
 */
#include "proto_internal.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const type_names[] = {
	[AX_REC_HELLO] = "hello", [AX_REC_REQ] = "req", [AX_REC_ATTN] = "attn", [AX_REC_END] = "end",
	[AX_REC_GAP] = "gap", [AX_REC_STATS] = "stats", [AX_REC_POLICY] = "policy",
};
static const char *const mode_names[] = {
	[AX_MODE_MEAN_LOGIT] = "mean_logit", [AX_MODE_MEAN_PROB] = "mean_prob", [AX_MODE_HEADS] = "heads",
};

const char *ax_rec_type_name(int type)
{
	if (type < AX_REC_HELLO || type > AX_REC_POLICY)
		return NULL;
	return type_names[type];
}

int ax_rec_type_parse(const char *name)
{
	for (int t = AX_REC_HELLO; name && t <= AX_REC_POLICY; t++)
		if (strcmp(name, type_names[t]) == 0)
			return t;
	return -EINVAL;
}

const char *ax_mode_name(int mode)
{
	if (mode < AX_MODE_MEAN_LOGIT || mode > AX_MODE_HEADS)
		return NULL;
	return mode_names[mode];
}

int ax_mode_parse(const char *name)
{
	for (int m = AX_MODE_MEAN_LOGIT; name && m <= AX_MODE_HEADS; m++)
		if (strcmp(name, mode_names[m]) == 0)
			return m;
	return -EINVAL;
}

void ax_record_init(ax_record *r, int type)
{
	memset(r, 0, sizeof(*r));
	r->type = type;
	r->v = AX_PROTO_VERSION;
	if (type == AX_REC_ATTN)
		r->u.attn.head_id = -1;
}

void ax_record_fini(ax_record *r)
{
	if (!r)
		return;
	if (r->type == AX_REC_REQ) {
		free(r->u.req.prompt);
		r->u.req.prompt = NULL;
		r->u.req.prompt_len = 0;
	}
}

bool ax__str_ok(const char *s, size_t cap, bool nonempty)
{
	size_t n = strnlen(s, cap);
	if (n == cap || (nonempty && n == 0))
		return false;
	const uint8_t *p = (const uint8_t *)s, *e = p + n;
	uint64_t high = 0;
	size_t j = 0;
	for (; j + 8 <= n; j += 8) { /* ASCII, the common case: 8 bytes at a time, no per-byte decoding */
		uint64_t w;
		memcpy(&w, p + j, 8);
		high |= w;
	}
	for (; j < n; j++)
		high |= p[j];
	if (!(high & 0x8080808080808080ull))
		return true;
	while (p < e) {
		if (*p < 0x80) {
			p++;
			continue;
		}
		int more = (*p & 0xe0) == 0xc0 ? 1 : (*p & 0xf0) == 0xe0 ? 2 : (*p & 0xf8) == 0xf0 ? 3 : -1;
		if (more < 0 || e - p <= more || *p == 0xc0 || *p == 0xc1 || *p > 0xf4)
			return false;
		uint32_t c = *p & (0x3f >> more);
		for (int i = 1; i <= more; i++) {
			if ((p[i] & 0xc0) != 0x80)
				return false;
			c = (c << 6) | (p[i] & 0x3f);
		}
		/* overlong forms, surrogates, beyond U+10FFFF */
		if ((more == 2 && c < 0x800) || (more == 3 && (c < 0x10000 || c > 0x10ffff)) ||
		    (c >= 0xd800 && c <= 0xdfff))
			return false;
		p += more + 1;
	}
	return true;
}

#define I64MAX ((uint64_t)INT64_MAX)

static int ids_ok(const int32_t *ids, uint32_t n, uint32_t cap)
{
	if (n > cap)
		return 0;
	for (uint32_t i = 0; i < n; i++)
		if (ids[i] < 0)
			return 0;
	return 1;
}

static int validate_hello(const ax_rec_hello *h)
{
	if (!ax__str_ok(h->engine, sizeof(h->engine), false) || !ax__str_ok(h->model, sizeof(h->model), false) ||
	    !ax__str_ok(h->backend, sizeof(h->backend), false))
		return -EINVAL;
	if (h->world_size < 1 || h->rank >= h->world_size || h->top_k > AX_PROTO_MAX_TOPK || !ax_mode_name(h->mode))
		return -EINVAL;
	if (!ids_ok(h->layer_ids, h->n_layer_ids, AX_PROTO_MAX_LIST) || h->generation > I64MAX)
		return -EINVAL;
	return 0;
}

static int validate_req(const ax_rec_req *q)
{
	if (q->prompt_len > AX_PROTO_MAX_PROMPT || (q->prompt_len && !q->prompt))
		return -EINVAL;
	for (uint32_t i = 0; i < q->prompt_len; i++)
		if (q->prompt[i] < 0)
			return -EINVAL;
	return 0;
}

/* Best first: logits descending, ties by lower position; positions in 0..p; scores in [0,1] summing to 1. */
static int validate_topk(const ax_rec_attn *a)
{
	double sum = 0;
	for (uint32_t i = 0; i < a->k; i++) {
		float l = a->topk_logits[i], s = a->attention_scores[i];
		int64_t pos = a->token_positions[i];
		if (!isfinite(l) || !isfinite(s) || s < 0 || s > 1 || pos < 0 || pos > a->position)
			return -EINVAL;
		if (i > 0) {
			float pl = a->topk_logits[i - 1];
			if (l > pl || (l == pl && pos <= a->token_positions[i - 1]))
				return -EINVAL;
		}
		sum += s;
	}
	if (a->k > 0 && fabs(sum - 1.0) > 1e-3)
		return -EINVAL;
	return 0;
}

static int validate_attn(const ax_rec_attn *a)
{
	if (a->position < 0 || a->decode_step < 0 || a->token_id < -1 || a->layer_id < 0 || a->prefill > 1)
		return -EINVAL;
	if (!ax_mode_name(a->mode) || (a->mode == AX_MODE_HEADS ? a->head_id < 0 : a->head_id != -1))
		return -EINVAL;
	if (a->k < 1 || a->k > AX_PROTO_MAX_TOPK || (uint64_t)a->k > (uint64_t)a->position + 1)
		return -EINVAL;
	if (!isfinite(a->logsumexp_all) || !isfinite(a->topk_mass) || a->topk_mass < 0 || a->topk_mass > 1.001)
		return -EINVAL;
	return validate_topk(a);
}

static int validate_stats(const ax_rec_stats *s)
{
	if (s->n > AX_PROTO_MAX_STATS)
		return -EINVAL;
	for (uint32_t i = 0; i < s->n; i++)
		if (!ax__str_ok(s->kv[i].name, sizeof(s->kv[i].name), true) || s->kv[i].value > I64MAX)
			return -EINVAL;
	return 0;
}

static int validate_policy(const ax_rec_policy *p)
{
	if (p->top_k > AX_PROTO_MAX_TOPK || (p->mode && !ax_mode_name(p->mode)) || p->prompt > 1 || p->ttl_ms > I64MAX)
		return -EINVAL;
	if (!ids_ok(p->layer_ids, p->n_layer_ids, AX_PROTO_MAX_LIST) || !ids_ok(p->head_ids, p->n_head_ids, AX_PROTO_MAX_LIST))
		return -EINVAL;
	return 0;
}

static int validate_body(const ax_record *r)
{
	switch (r->type) {
	case AX_REC_HELLO: return validate_hello(&r->u.hello);
	case AX_REC_REQ: return validate_req(&r->u.req);
	case AX_REC_ATTN: return validate_attn(&r->u.attn);
	case AX_REC_END:
		return ax__str_ok(r->u.end.reason, sizeof(r->u.end.reason), true) && r->u.end.tokens <= I64MAX ? 0 : -EINVAL;
	case AX_REC_GAP: {
		const ax_rec_gap *g = &r->u.gap;
		if (!ax__str_ok(g->what, sizeof(g->what), true) || !ax__str_ok(g->reason, sizeof(g->reason), true))
			return -EINVAL;
		return g->count <= I64MAX && g->to_seq <= I64MAX && g->from_seq <= g->to_seq ? 0 : -EINVAL;
	}
	case AX_REC_STATS: return validate_stats(&r->u.stats);
	case AX_REC_POLICY: return validate_policy(&r->u.policy);
	}
	return -EINVAL;
}

/* rid: required (non-empty) on req, attn, end and policy; optional on gap; empty elsewhere. */
static int validate_rid(const ax_record *r)
{
	bool need = r->type == AX_REC_REQ || r->type == AX_REC_ATTN || r->type == AX_REC_END || r->type == AX_REC_POLICY;
	if (!ax__str_ok(r->rid, sizeof(r->rid), need))
		return -EINVAL;
	if (!need && r->type != AX_REC_GAP && r->rid[0])
		return -EINVAL;
	return 0;
}

int ax_record_validate(const ax_record *r)
{
	if (!r || !ax_rec_type_name(r->type) || r->v < 1 || r->seq > I64MAX || r->ts_ns > I64MAX)
		return -EINVAL;
	if (!ax__str_ok(r->src, sizeof(r->src), true) || validate_rid(r) < 0)
		return -EINVAL;
	return validate_body(r);
}
