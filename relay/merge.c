/*
 * merge.c — one request's attention store and the merge of attention entries into OpenAI responses.
 *
 * Records are kept per absolute position in `slots` (a growable array indexed by position), each slot holding one
 * compact copy per (layer, head). A position is complete when it holds `expected` records (layers × heads the
 * request asked for) or when the captures said `end`.
 *
 * Streams: chunks enter a FIFO with their arrival time and the generated-token indices they carry (one per chunk
 * with text, or the logprobs count, or the growth of usage.completion_tokens). The FIFO head leaves when every
 * position it should carry is complete or when it has waited cfg.wait_ns; it never overtakes another chunk, so
 * tokens keep their order. Alignment (DESIGN §4): the chunk carrying generated token i ≥ 1 carries position P+i-1,
 * the chunk carrying token 0 carries `prompt_attention` (P-1, and the other prompt rows that are present).
 * Once a chunk has left, every position it should have carried is "due"; records that arrive for due positions
 * are collected in `late` and leave as an extra chunk (empty content, attention entries only) at the next poll.
 * After the upstream's end the stream's DONE waits, within the same bound, for due positions to complete; then
 * every record still unsent, whatever its position, leaves in one last extra chunk, so the stream delivers every
 * row the captures produced for it (rows no chunk carried included) before DONE.
 * The stop token: engines sample it (its forward P+n-1 ran, and usage.completion_tokens counts it) but do not show
 * it, so its chunk is the one with finish_reason "stop" and no text. Such a chunk counts as one token unless usage
 * or logprobs say otherwise; it carries P+n-1 like any token chunk. A usage-only chunk (choices: []) that counts
 * tokens has no place for entries: they go in an extra chunk just before it.
 *
 * Several captures (one per TP rank, each with its own heads) each send an `end`: the merge counts which capture
 * slots have (`ends`) against the live ones (`live`), and the captures are done only when all live ones have ended,
 * so one rank's early `end` never cuts off another rank's records still on their way.
 * Non-streamed bodies wait the same way, then get choices[0].attention_tokens (positions P..P+n-2) and
 * choices[0].prompt_attention; entry texts come from the body's logprobs (the relay asks the upstream for them when
 * the client did not, and strips them again: see ax__merge_body). Entries render the top (highest) layer at the top level for seed clients and all
 * layers under "layers"; heads mode adds "heads". Everything runs on the relay's loop thread.
 */
#include "relay_int.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "attnx_common.h"

#define MAX_POSITION (1ll << 26)
/* Most generated tokens one upstream chunk may claim (usage deltas above it are an upstream fault, clamped). */
#define MAX_CHUNK_TOKENS 65536
#define DUMP_FLAGS (JSON_COMPACT | JSON_REAL_PRECISION(9))

typedef struct mrec {
	int32_t layer, head;
	uint32_t mode, k, prefill;
	int sent;
	int64_t decode_step, token_id;
	double lse, mass;
	int64_t *pos;
	float *logit, *score;
} mrec;

typedef struct mslot {
	mrec **r;
	uint32_t n, cap;
} mslot;

typedef struct mchunk {
	struct mchunk *next;
	json_t *j;        /* parsed chunk, or NULL for a raw (non-JSON) event */
	char *raw;
	size_t rawlen;
	uint64_t t;       /* arrival */
	int64_t tok0;     /* first generated-token index it carries */
	uint32_t ntok;
} mchunk;

struct ax_merge {
	ax_merge_cfg cfg;
	int64_t P;                /* prompt length, -1 unknown */
	mslot *slots;
	size_t nslots;
	mchunk *head, *tail;
	int64_t tokens_seen;      /* tokens assigned to chunks so far */
	int64_t tokens_emitted;   /* tokens in chunks that left */
	int first_emitted;        /* the token-0 chunk left */
	int64_t *late;            /* due positions that got records after their chunk left */
	size_t nlate, clate;
	char **texts;             /* text of generated token i (one-token chunks) */
	size_t ntexts, texts_cap; /* texts_cap doubles: a chunk may stand for 65536 tokens (one push each) */
	json_t *tmpl;             /* id/object/created/model of the last chunk, for extra chunks */
	int up_done, done_emitted, cap_end;
	uint64_t ends, live;       /* capture slots that sent `end`; capture slots that count */
	uint64_t t_done;
	uint64_t late_entries;
	json_t *body;             /* non-stream body */
	int strip_lp;             /* the relay added logprobs upstream: null them in the merged body */
	uint64_t t_body;
	int64_t body_ntok;
};

/* ------------------------------------------------------------------ store */

ax_merge *ax__merge_new(const ax_merge_cfg *cfg)
{
	ax_merge *m = calloc(1, sizeof *m);
	if (!m)
		return NULL;
	m->cfg = *cfg;
	if (!m->cfg.expected)
		m->cfg.expected = 1;
	m->P = -1;
	m->body_ntok = -1;
	return m;
}

static void chunk_free(mchunk *c)
{
	json_decref(c->j);
	free(c->raw);
	free(c);
}

void ax__merge_free(ax_merge *m)
{
	if (!m)
		return;
	for (size_t i = 0; i < m->nslots; i++) {
		for (uint32_t k = 0; k < m->slots[i].n; k++)
			free(m->slots[i].r[k]);
		free(m->slots[i].r);
	}
	free(m->slots);
	for (mchunk *c = m->head, *n; c; c = n) {
		n = c->next;
		chunk_free(c);
	}
	for (size_t i = 0; i < m->ntexts; i++)
		free(m->texts[i]);
	free(m->texts);
	free(m->late);
	json_decref(m->tmpl);
	json_decref(m->body);
	free(m);
}

void ax__merge_set_expected(ax_merge *m, uint32_t expected)
{
	m->cfg.expected = expected ? expected : 1;
}

int64_t ax__merge_prompt_len(const ax_merge *m)
{
	return m->P;
}

uint64_t ax__merge_late_entries(const ax_merge *m)
{
	return m->late_entries;
}

void ax__merge_capture_end(ax_merge *m)
{
	m->cap_end = 1;
}

static void sources_check(ax_merge *m)
{
	if (m->ends && !(m->live & ~m->ends))
		m->cap_end = 1;
}

void ax__merge_source_end(ax_merge *m, int slot, uint64_t live)
{
	if (slot < 0 || slot >= 64) {
		m->cap_end = 1;
		return;
	}
	m->ends |= 1ull << slot;
	m->live = live;
	sources_check(m);
}

void ax__merge_set_sources(ax_merge *m, uint64_t live)
{
	m->live = live;
	sources_check(m);
}

static mslot *slot_at(ax_merge *m, int64_t p)
{
	return (p >= 0 && (size_t)p < m->nslots) ? &m->slots[p] : NULL;
}

static int slot_grow(ax_merge *m, int64_t p)
{
	if ((size_t)p < m->nslots)
		return 0;
	size_t n = m->nslots ? m->nslots : 64;
	while (n <= (size_t)p)
		n *= 2;
	mslot *s = realloc(m->slots, n * sizeof *s);
	if (!s)
		return -ENOMEM;
	memset(s + m->nslots, 0, (n - m->nslots) * sizeof *s);
	m->slots = s;
	m->nslots = n;
	return 0;
}

static mrec *rec_copy(const ax_rec_attn *a)
{
	uint32_t k = a->k > AX_PROTO_MAX_TOPK ? AX_PROTO_MAX_TOPK : a->k;
	mrec *r = malloc(sizeof *r + k * (sizeof(int64_t) + 2 * sizeof(float)));
	if (!r)
		return NULL;
	*r = (mrec){.layer = a->layer_id, .head = a->mode == AX_MODE_HEADS ? a->head_id : -1, .mode = a->mode,
		    .k = k, .prefill = a->prefill, .decode_step = a->decode_step, .token_id = a->token_id,
		    .lse = a->logsumexp_all, .mass = a->topk_mass};
	r->pos = (int64_t *)(r + 1);
	r->logit = (float *)(r->pos + k);
	r->score = r->logit + k;
	memcpy(r->pos, a->token_positions, k * sizeof(int64_t));
	memcpy(r->logit, a->topk_logits, k * sizeof(float));
	memcpy(r->score, a->attention_scores, k * sizeof(float));
	return r;
}

/* Positions below this bound have had their chunk leave (so new records for them are late). */
static int64_t due_bound(const ax_merge *m)
{
	if (m->P < 0 || !m->first_emitted)
		return 0;
	return m->P + (m->tokens_emitted > 0 ? m->tokens_emitted - 1 : 0);
}

static int late_push(ax_merge *m, int64_t p)
{
	for (size_t i = 0; i < m->nlate; i++)
		if (m->late[i] == p)
			return 0;
	if (m->nlate == m->clate) {
		size_t c = m->clate ? m->clate * 2 : 16;
		int64_t *l = realloc(m->late, c * sizeof *l);
		if (!l)
			return -ENOMEM;
		m->late = l;
		m->clate = c;
	}
	m->late[m->nlate++] = p;
	return 0;
}

int ax__merge_add(ax_merge *m, const ax_rec_attn *a)
{
	if (a->position < 0 || a->position >= MAX_POSITION)
		return -EINVAL;
	int rc = slot_grow(m, a->position);
	if (rc)
		return rc;
	mslot *s = &m->slots[a->position];
	mrec *r = rec_copy(a);
	if (!r)
		return -ENOMEM;
	for (uint32_t i = 0; i < s->n; i++) {
		if (s->r[i]->layer == r->layer && s->r[i]->head == r->head) { /* a repeat replaces, unless sent */
			if (s->r[i]->sent) {
				free(r);
				return 0;
			}
			free(s->r[i]);
			s->r[i] = r;
			return 0;
		}
	}
	if (s->n == s->cap) {
		uint32_t c = s->cap ? s->cap * 2 : 2;
		mrec **v = realloc(s->r, c * sizeof *v);
		if (!v) {
			free(r);
			return -ENOMEM;
		}
		s->r = v;
		s->cap = c;
	}
	s->r[s->n++] = r;
	if (!m->cfg.stream || a->position >= due_bound(m))
		return 0;
	return late_push(m, a->position);
}

/* Queue every due position that holds unsent records (after P became known late). */
static void requeue_due(ax_merge *m)
{
	int64_t b = due_bound(m);
	for (int64_t p = 0; p < b && (size_t)p < m->nslots; p++)
		for (uint32_t i = 0; i < m->slots[p].n; i++)
			if (!m->slots[p].r[i]->sent) {
				late_push(m, p);
				break;
			}
}

void ax__merge_set_prompt_len(ax_merge *m, int64_t P)
{
	if (m->P >= 0 || P <= 0 || P >= MAX_POSITION)
		return;
	m->P = P;
	if (m->cfg.stream)
		requeue_due(m);
}

/* The policy tells the captures not to capture generated row p (stride, max_tokens): nothing will come for it. */
static int never_comes(const ax_merge *m, int64_t p)
{
	if (m->P < 0 || p < m->P - 1)
		return 0;
	uint64_t i = (uint64_t)(p - (m->P - 1)); /* generated token this row samples */
	uint32_t st = m->cfg.stride > 1 ? m->cfg.stride : 1;
	if (i % st)
		return 1;
	return m->cfg.max_tokens && i / st >= m->cfg.max_tokens;
}

static int complete(const ax_merge *m, int64_t p)
{
	if (m->cap_end || never_comes(m, p))
		return 1;
	const mslot *s = (p >= 0 && (size_t)p < m->nslots) ? &m->slots[p] : NULL;
	return s && s->n >= m->cfg.expected;
}

/* Every row in [lo, hi) is complete. Rows past the slot table hold nothing, so there the answer is whether the
 * policy skips all of them: found in O(1), so bounds taken from an upstream (usage counts) cost nothing. */
static int range_complete(const ax_merge *m, int64_t lo, int64_t hi)
{
	if (m->cap_end)
		return 1;
	if (lo < 0)
		lo = 0;
	int64_t mid = hi < (int64_t)m->nslots ? hi : (int64_t)m->nslots;
	for (int64_t p = lo; p < mid; p++)
		if (!complete(m, p))
			return 0;
	int64_t p = lo > mid ? lo : mid;
	if (p >= hi)
		return 1;
	if (m->P < 0 || p < m->P - 1)
		return 0; /* a prompt row (or P unknown): it comes */
	uint64_t st = m->cfg.stride > 1 ? m->cfg.stride : 1;
	uint64_t i = (uint64_t)(p - (m->P - 1));
	uint64_t first = (i + st - 1) / st; /* first sampled generated index at or after p */
	if (m->cfg.max_tokens && first >= m->cfg.max_tokens)
		return 1;
	return (int64_t)(first * st) >= hi - (m->P - 1);
}

/* ------------------------------------------------------------------ rendering */

static int rec_cmp(const void *a, const void *b)
{
	const mrec *x = *(mrec *const *)a, *y = *(mrec *const *)b;
	if (x->layer != y->layer)
		return x->layer < y->layer ? -1 : 1;
	return (x->head > y->head) - (x->head < y->head);
}

/* The numeric fields of one record into o. */
static void rec_fields(json_t *o, const mrec *r)
{
	json_t *tp = json_array(), *sc = json_array(), *lg = json_array();
	for (uint32_t i = 0; i < r->k; i++) {
		json_array_append_new(tp, json_integer(r->pos[i]));
		json_array_append_new(sc, json_real(r->score[i]));
		json_array_append_new(lg, json_real(r->logit[i]));
	}
	json_object_set_new(o, "token_positions", tp);
	json_object_set_new(o, "attention_scores", sc);
	json_object_set_new(o, "topk_logits", lg);
	json_object_set_new(o, "logsumexp_all", json_real(r->lse));
	json_object_set_new(o, "topk_mass", json_real(r->mass));
}

static json_t *head_list(mrec **rs, uint32_t lo, uint32_t hi)
{
	json_t *a = json_array();
	for (uint32_t i = lo; i < hi; i++) {
		json_t *h = json_object();
		json_object_set_new(h, "head_id", json_integer(rs[i]->head));
		rec_fields(h, rs[i]);
		json_array_append_new(a, h);
	}
	return a;
}

/* {"<layer>": {layer_id, mode, fields [, heads]}} over sorted records. */
static json_t *layer_map(mrec **rs, uint32_t n)
{
	json_t *map = json_object();
	for (uint32_t i = 0; i < n;) {
		uint32_t j = i;
		while (j < n && rs[j]->layer == rs[i]->layer)
			j++;
		json_t *l = json_object();
		char key[16];
		snprintf(key, sizeof key, "%d", rs[i]->layer);
		json_object_set_new(l, "layer_id", json_integer(rs[i]->layer));
		json_object_set_new(l, "mode", json_string(ax_mode_name((int)rs[i]->mode) ?: "unknown"));
		rec_fields(l, rs[i]);
		if (rs[i]->mode == AX_MODE_HEADS)
			json_object_set_new(l, "heads", head_list(rs, i, j));
		json_object_set_new(map, key, l);
		i = j;
	}
	return map;
}

static const char *token_text(const ax_merge *m, int64_t p)
{
	if (m->P < 0 || p < m->P || (size_t)(p - m->P) >= m->ntexts)
		return NULL;
	return m->texts[p - m->P];
}

/* One entry from n records of position p (sorted here). */
static json_t *entry_json(const ax_merge *m, int64_t p, mrec **rs, uint32_t n)
{
	qsort(rs, n, sizeof *rs, rec_cmp);
	uint32_t top = n - 1;
	while (top > 0 && rs[top - 1]->layer == rs[n - 1]->layer)
		top--;
	const mrec *t = rs[top];
	json_t *o = json_object();
	json_object_set_new(o, "position", json_integer(p));
	json_object_set_new(o, "token_id", json_integer(t->token_id));
	const char *txt = token_text(m, p);
	if (txt)
		json_object_set_new(o, "text", json_string(txt));
	rec_fields(o, t);
	json_object_set_new(o, "layer_id", json_integer(t->layer));
	json_object_set_new(o, "decode_step", json_integer(t->decode_step));
	json_object_set_new(o, "mode", json_string(ax_mode_name((int)t->mode) ?: "unknown"));
	if (t->prefill)
		json_object_set_new(o, "prefill", json_true());
	int heads = t->mode == AX_MODE_HEADS;
	if (heads) {
		json_object_set_new(o, "head_id", json_integer(t->head));
		json_object_set_new(o, "heads", head_list(rs, top, n));
	}
	if (heads || rs[0]->layer != t->layer)
		json_object_set_new(o, "layers", layer_map(rs, n));
	return o;
}

/* Entry of the unsent records of p (marking them sent), appended to arr. Returns 1 if one was added. */
static int take_entry(ax_merge *m, int64_t p, json_t *arr)
{
	mslot *s = slot_at(m, p);
	if (!s || !s->n)
		return 0;
	mrec *sel[s->n];
	uint32_t n = 0;
	for (uint32_t i = 0; i < s->n; i++)
		if (!s->r[i]->sent) {
			sel[n++] = s->r[i];
			s->r[i]->sent = 1;
		}
	if (!n)
		return 0;
	json_array_append_new(arr, entry_json(m, p, sel, n));
	return 1;
}

/* Prompt rows 0..P-1 that hold unsent records. */
static void take_prompt(ax_merge *m, json_t *arr)
{
	for (int64_t p = 0; p < m->P && (size_t)p < m->nslots; p++)
		take_entry(m, p, arr);
}

/* Put `key: arr` into o when arr is non-empty; consumes arr. */
static void attach(json_t *o, const char *key, json_t *arr)
{
	if (o && json_is_object(o) && json_array_size(arr))
		json_object_set(o, key, arr);
	json_decref(arr);
}

/* Where entries go in a chunk: chat → choices[0].delta, completions → choices[0]. */
static json_t *target(const ax_merge *m, json_t *chunk)
{
	json_t *c0 = json_array_get(json_object_get(chunk, "choices"), 0);
	if (!json_is_object(c0))
		return NULL;
	if (m->cfg.kind != AX_RK_CHAT)
		return c0;
	json_t *d = json_object_get(c0, "delta");
	if (!json_is_object(d)) {
		d = json_object();
		json_object_set_new(c0, "delta", d);
	}
	return d;
}

/* ------------------------------------------------------------------ streams */

static int text_push(ax_merge *m, int64_t i, const char *s)
{
	if (i < 0 || (size_t)i != m->ntexts)
		return 0;
	if (m->ntexts == m->texts_cap) { /* doubling: pushing one at a time stays linear */
		size_t c = m->texts_cap ? 2 * m->texts_cap : 16;
		char **t = realloc(m->texts, c * sizeof *t);
		if (!t)
			return -ENOMEM;
		m->texts = t;
		m->texts_cap = c;
	}
	m->texts[m->ntexts++] = s ? strdup(s) : NULL;
	return 0;
}

static const char *str_or_empty(json_t *j)
{
	return json_is_string(j) ? json_string_value(j) : "";
}

static uint32_t clamp_tokens(int64_t n)
{
	return n > MAX_CHUNK_TOKENS ? MAX_CHUNK_TOKENS : (uint32_t)n;
}

/* How many generated tokens a chunk carries, and the text of one. */
static uint32_t chunk_tokens(ax_merge *m, json_t *j, char *text, size_t tlen)
{
	json_t *usage = json_object_get(j, "usage");
	json_t *pt = json_object_get(usage, "prompt_tokens");
	if (json_is_integer(pt))
		ax__merge_set_prompt_len(m, json_integer_value(pt));
	json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
	const char *a = "", *b = "";
	json_t *lp = NULL, *ja = NULL, *jb;
	if (m->cfg.kind == AX_RK_CHAT) {
		json_t *d = json_object_get(c0, "delta");
		ja = json_object_get(d, "reasoning_content");
		jb = json_object_get(d, "content");
		lp = json_object_get(json_object_get(c0, "logprobs"), "content");
	} else {
		jb = json_object_get(c0, "text");
		lp = json_object_get(json_object_get(c0, "logprobs"), "tokens");
	}
	a = str_or_empty(ja), b = str_or_empty(jb);
	/* lengths, not the C strings: a token's text may be a NUL byte ("\u0000") */
	int has_text = json_string_length(ja) > 0 || json_string_length(jb) > 0;
	snprintf(text, tlen, "%s%s", a, b);
	json_t *ct = json_object_get(usage, "completion_tokens");
	if (json_is_integer(ct) && json_integer_value(ct) >= m->tokens_seen)
		return clamp_tokens(json_integer_value(ct) - m->tokens_seen);
	if (json_is_array(lp) && json_array_size(lp))
		return clamp_tokens((int64_t)json_array_size(lp));
	if (has_text)
		return 1;
	/* No text, no count: the finish chunk of a stop token (sampled, not shown) stands for that token. */
	json_t *fr = json_object_get(c0, "finish_reason");
	return json_is_string(fr) && strcmp(json_string_value(fr), "stop") == 0 ? 1 : 0;
}

/* Per-token texts of a chunk's logprobs (chat content[i].token, completions tokens[i]), when it has n of them. */
static int lp_texts(ax_merge *m, json_t *c0, int64_t tok0, uint32_t n)
{
	json_t *lp = json_object_get(c0, "logprobs");
	json_t *arr = json_object_get(lp, m->cfg.kind == AX_RK_CHAT ? "content" : "tokens");
	if (!json_is_array(arr) || json_array_size(arr) != n)
		return 0;
	for (uint32_t i = 0; i < n; i++) {
		json_t *e = json_array_get(arr, i);
		json_t *s = m->cfg.kind == AX_RK_CHAT ? json_object_get(e, "token") : e;
		if (text_push(m, tok0 + i, json_is_string(s) ? json_string_value(s) : NULL))
			return -ENOMEM;
	}
	return 1;
}

static void keep_template(ax_merge *m, json_t *j)
{
	static const char *keys[] = {"id", "object", "created", "model", "system_fingerprint"};
	json_t *t = json_object();
	for (size_t i = 0; i < AX_ARRAY_LEN(keys); i++) {
		json_t *v = json_object_get(j, keys[i]);
		if (v)
			json_object_set(t, keys[i], v);
	}
	json_decref(m->tmpl);
	m->tmpl = t;
}

int ax__merge_chunk(ax_merge *m, const char *data, size_t len, uint64_t now_ns)
{
	mchunk *c = calloc(1, sizeof *c);
	if (!c)
		return -ENOMEM;
	c->t = now_ns;
	c->j = json_loadb(data, len, JSON_ALLOW_NUL, NULL); /* a token text may be "\u0000" */
	if (!json_is_object(c->j)) {
		json_decref(c->j);
		c->j = NULL;
		c->raw = malloc(len + 1);
		if (!c->raw) {
			free(c);
			return -ENOMEM;
		}
		memcpy(c->raw, data, len);
		c->raw[len] = '\0';
		c->rawlen = len;
	} else {
		char text[1024];
		c->tok0 = m->tokens_seen;
		c->ntok = chunk_tokens(m, c->j, text, sizeof text);
		json_t *c0 = json_array_get(json_object_get(c->j, "choices"), 0);
		int own = c->ntok > 1 && lp_texts(m, c0, c->tok0, c->ntok) > 0; /* each token's own text */
		if (!own && c->ntok == 1)
			text_push(m, c->tok0, text);
		for (uint32_t i = (c->ntok == 1); !own && i < c->ntok; i++)
			text_push(m, c->tok0 + i, NULL);
		m->tokens_seen += c->ntok;
		keep_template(m, c->j);
	}
	if (m->tail)
		m->tail->next = c;
	else
		m->head = c;
	m->tail = c;
	return 0;
}

void ax__merge_upstream_done(ax_merge *m, uint64_t now_ns)
{
	if (!m->up_done) {
		m->up_done = 1;
		m->t_done = now_ns;
	}
}

/* Every position the chunk should carry is complete. */
static int chunk_ready(const ax_merge *m, const mchunk *c)
{
	if (!c->ntok)
		return 1;
	if (m->P < 0)
		return m->cap_end;
	/* token t samples from row P + t - 1: the chunk's rows are one contiguous range */
	if (!range_complete(m, m->P + c->tok0 - 1, m->P + c->tok0 + c->ntok - 1))
		return 0;
	return !(c->tok0 == 0 && m->cfg.want_prompt) || range_complete(m, 0, m->P - 1);
}

static int emit_json(json_t *j, int what, ax_merge_emit emit, void *arg)
{
	char *s = json_dumps(j, DUMP_FLAGS);
	if (!s)
		return -ENOMEM;
	int rc = emit(what, s, strlen(s), arg);
	free(s);
	return rc;
}

static int emit_extra(ax_merge *m, json_t *pa, json_t *at, ax_merge_emit emit, void *arg);

static int emit_chunk(ax_merge *m, mchunk *c, ax_merge_emit emit, void *arg)
{
	if (!c->j)
		return emit(AX_MOUT_RAW, c->raw, c->rawlen, arg);
	json_t *at = json_array(), *pa = json_array();
	for (uint32_t i = 0; i < c->ntok && m->P >= 0; i++) {
		int64_t tok = c->tok0 + i;
		if (tok == 0)
			take_prompt(m, pa);
		else if ((size_t)(m->P + tok - 1) >= m->nslots)
			break; /* nothing is held past the slot table */
		else
			take_entry(m, m->P + tok - 1, at);
	}
	if (c->ntok) {
		m->tokens_emitted = c->tok0 + c->ntok;
		if (c->tok0 == 0)
			m->first_emitted = 1;
	}
	json_t *t = target(m, c->j);
	if (!t) { /* no choices[0] (a usage-only chunk): its entries go just before it */
		int rc = emit_extra(m, pa, at, emit, arg);
		if (rc)
			return rc;
	} else {
		attach(t, "prompt_attention", pa);
		attach(t, "attention_tokens", at);
	}
	return emit_json(c->j, AX_MOUT_CHUNK, emit, arg);
}

/* An extra chunk (empty content, finish_reason null, the stream's id) carrying pa and at; consumes both. Nothing
 * is emitted when both are empty. */
static int emit_extra(ax_merge *m, json_t *pa, json_t *at, ax_merge_emit emit, void *arg)
{
	if (!json_array_size(at) && !json_array_size(pa)) {
		json_decref(at);
		json_decref(pa);
		return 0;
	}
	json_t *ch = m->tmpl ? json_deep_copy(m->tmpl) : json_object();
	json_t *c0 = json_object(), *t = c0;
	json_object_set_new(c0, "index", json_integer(0));
	if (m->cfg.kind == AX_RK_CHAT) {
		t = json_object();
		json_object_set_new(t, "content", json_string(""));
		json_object_set_new(c0, "delta", t);
	} else {
		json_object_set_new(c0, "text", json_string(""));
	}
	json_object_set_new(c0, "finish_reason", json_null());
	attach(t, "prompt_attention", pa);
	attach(t, "attention_tokens", at);
	json_t *choices = json_array();
	json_array_append_new(choices, c0);
	json_object_set_new(ch, "choices", choices);
	int rc = emit_json(ch, AX_MOUT_CHUNK, emit, arg);
	json_decref(ch);
	return rc;
}

/* An extra chunk with the late entries. */
static int emit_late(ax_merge *m, ax_merge_emit emit, void *arg)
{
	if (!m->nlate)
		return 0;
	json_t *at = json_array(), *pa = json_array();
	for (size_t i = 0; i < m->nlate; i++)
		take_entry(m, m->late[i], m->late[i] < m->P ? pa : at);
	m->nlate = 0;
	m->late_entries += json_array_size(at) + json_array_size(pa);
	return emit_extra(m, pa, at, emit, arg);
}

/* 1 when slot p holds a record not sent yet; *prefill tells that record's kind. */
static int unsent(const ax_merge *m, size_t p, int *prefill)
{
	const mslot *s = &m->slots[p];
	for (uint32_t i = 0; i < s->n; i++)
		if (!s->r[i]->sent) {
			*prefill = (int)s->r[i]->prefill;
			return 1;
		}
	return 0;
}

/* Before DONE: every record not sent yet, in position order, in one extra chunk (prompt rows — below P, or flagged
 * prefill while P is unknown — in prompt_attention). */
static int emit_rest(ax_merge *m, ax_merge_emit emit, void *arg)
{
	json_t *at = json_array(), *pa = json_array();
	int pf;
	for (size_t p = 0; p < m->nslots; p++)
		if (unsent(m, p, &pf))
			take_entry(m, (int64_t)p, (m->P >= 0 ? (int64_t)p < m->P : pf) ? pa : at);
	m->late_entries += json_array_size(at) + json_array_size(pa);
	return emit_extra(m, pa, at, emit, arg);
}

/* Every due position is complete (the stream's end need not wait any more). */
static int all_due_complete(const ax_merge *m)
{
	if (m->cap_end)
		return 1;
	if (m->tokens_emitted == 0)
		return 1;
	if (m->P < 0)
		return 0;
	return range_complete(m, m->cfg.want_prompt ? 0 : m->P - 1, due_bound(m));
}

int64_t ax__merge_poll(ax_merge *m, uint64_t now_ns, ax_merge_emit emit, void *arg)
{
	int rc;
	if (m->done_emitted)
		return 0;
	while (m->head) {
		mchunk *c = m->head;
		if (!chunk_ready(m, c) && now_ns < c->t + m->cfg.wait_ns)
			break;
		m->head = c->next;
		if (!m->head)
			m->tail = NULL;
		rc = emit_chunk(m, c, emit, arg);
		chunk_free(c);
		if (rc)
			return rc < 0 ? rc : -ECANCELED;
	}
	if ((rc = emit_late(m, emit, arg)))
		return rc < 0 ? rc : -ECANCELED;
	if (m->head)
		return (int64_t)(m->head->t + m->cfg.wait_ns);
	if (!m->up_done)
		return 0;
	if (!all_due_complete(m) && now_ns < m->t_done + m->cfg.wait_ns)
		return (int64_t)(m->t_done + m->cfg.wait_ns);
	if ((rc = emit_rest(m, emit, arg)))
		return rc < 0 ? rc : -ECANCELED;
	m->done_emitted = 1;
	rc = emit(AX_MOUT_DONE, NULL, 0, arg);
	return rc ? (rc < 0 ? rc : -ECANCELED) : 0;
}

/* ------------------------------------------------------------------ non-streamed bodies */

/* Token texts from logprobs, when the client asked for them. */
static void body_texts(ax_merge *m, json_t *c0)
{
	json_t *lp = json_object_get(c0, "logprobs");
	json_t *arr = json_object_get(lp, m->cfg.kind == AX_RK_CHAT ? "content" : "tokens");
	size_t i;
	json_t *e;
	json_array_foreach(arr, i, e) {
		json_t *s = m->cfg.kind == AX_RK_CHAT ? json_object_get(e, "token") : e;
		text_push(m, (int64_t)i, json_is_string(s) ? json_string_value(s) : NULL);
	}
}

int ax__merge_body(ax_merge *m, const char *body, size_t len, uint64_t now_ns, int strip_logprobs)
{
	json_t *j = json_loadb(body, len, JSON_ALLOW_NUL, NULL);
	if (!json_is_object(j)) {
		json_decref(j);
		return -EBADMSG;
	}
	json_t *usage = json_object_get(j, "usage");
	json_t *pt = json_object_get(usage, "prompt_tokens"), *ct = json_object_get(usage, "completion_tokens");
	if (json_is_integer(pt))
		ax__merge_set_prompt_len(m, json_integer_value(pt));
	if (json_is_integer(ct) && json_integer_value(ct) >= 0)
		m->body_ntok = json_integer_value(ct) < MAX_POSITION ? json_integer_value(ct) : MAX_POSITION;
	body_texts(m, json_array_get(json_object_get(j, "choices"), 0));
	json_decref(m->body);
	m->body = j;
	m->t_body = now_ns;
	m->strip_lp = strip_logprobs;
	return 0;
}

static int body_ready(const ax_merge *m)
{
	if (m->cap_end)
		return 1;
	if (m->P < 0 || m->body_ntok < 0)
		return 0;
	return range_complete(m, m->cfg.want_prompt ? 0 : m->P - 1, m->P + m->body_ntok - 1);
}

int ax__merge_body_take(ax_merge *m, uint64_t now_ns, char **out, size_t *out_len, uint64_t *deadline_ns)
{
	*out = NULL;
	*out_len = 0;
	if (!m->body)
		return -EINVAL;
	if (!body_ready(m) && now_ns < m->t_body + m->cfg.wait_ns) {
		*deadline_ns = m->t_body + m->cfg.wait_ns;
		return 0;
	}
	json_t *at = json_array(), *pa = json_array();
	if (m->P >= 0) {
		take_prompt(m, pa);
		int64_t end = m->body_ntok >= 0 ? m->P + m->body_ntok - 1 : (int64_t)m->nslots;
		if (end > (int64_t)m->nslots)
			end = (int64_t)m->nslots;
		for (int64_t p = m->P; p < end; p++)
			take_entry(m, p, at);
	}
	if (m->strip_lp) { /* the client did not ask for logprobs: as the upstream would have answered */
		size_t i;
		json_t *c;
		json_array_foreach(json_object_get(m->body, "choices"), i, c)
			if (json_is_object(c) && json_object_get(c, "logprobs"))
				json_object_set_new(c, "logprobs", json_null());
	}
	json_t *c0 = json_array_get(json_object_get(m->body, "choices"), 0);
	if (json_is_object(c0)) {
		json_object_set(c0, "attention_tokens", at);
		if (json_array_size(pa))
			json_object_set(c0, "prompt_attention", pa);
	}
	json_decref(at);
	json_decref(pa);
	*out = json_dumps(m->body, DUMP_FLAGS);
	if (!*out)
		return -ENOMEM;
	*out_len = strlen(*out);
	return 1;
}
