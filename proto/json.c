/*
 * json.c — records as JSON, with the msgpack field names (ax__record_emit drives both).
 *
 * ax_record_json writes text directly: strings are escaped per RFC 8259 (validation already guarantees UTF-8
 * without NUL), integers exactly, float32 values with the fewest digits (≤ 9) that read back to the same float,
 * float64 values with the fewest (≤ 17) that read back to the same double (fmt.c: no printf, no strtod); NaN/Inf
 * cannot reach here (validation). Bytes go straight into the caller's buffer, which grows only when full.
 * ax_record_to_json_t parses that text with jansson, so the two can never disagree. ax_record_from_json walks a
 * jansson object through the same field decoder as msgpack (fields.c), so it accepts and rejects the same things.
 */
#include "proto_internal.h"

#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

/* ---- text writer ---- */
#define JW_DEPTH 8
struct jw {
	ax_buf *b;
	int depth;
	uint8_t count[JW_DEPTH]; /* 0 = nothing written yet at this level */
	char close[JW_DEPTH];    /* '}' or ']' */
	uint8_t after_key;
};

static inline int put(struct jw *w, const char *s, size_t n)
{
	ax_buf *b = w->b;
	if (b->cap - b->len < n)
		return ax_buf_append(b, s, n);
	memcpy(b->data + b->len, s, n);
	b->len += n;
	return 0;
}

/* Separator before a value or key. */
static int sep(struct jw *w)
{
	if (w->after_key) {
		w->after_key = 0;
		return 0;
	}
	if (w->depth > 0 && w->count[w->depth - 1]++)
		return put(w, ",", 1);
	return 0;
}

static int open_c(struct jw *w, char c)
{
	if (sep(w) || w->depth == JW_DEPTH)
		return -ENOMEM;
	w->count[w->depth] = 0;
	w->close[w->depth++] = c == '{' ? '}' : ']';
	return put(w, &c, 1);
}

static int jw_map(void *c, uint32_t n) { return open_c(c, '{'); }
static int jw_array(void *c, uint32_t n) { return open_c(c, '['); }

static int jw_end(void *c)
{
	struct jw *w = c;
	w->depth--;
	return put(w, &w->close[w->depth], 1);
}

/* Bytes a JSON string cannot hold as they are: controls, '"' and '\\' (NUL ends the string). */
static const uint8_t needs_escape[256] = {[0x00 ... 0x1f] = 1, ['"'] = 1, ['\\'] = 1};

static int put_escaped_slow(struct jw *w, const char *s)
{
	static const char hex[] = "0123456789abcdef";
	for (const char *run = s;; s++) {
		unsigned char ch = (unsigned char)*s;
		if (!needs_escape[ch])
			continue;
		if (put(w, run, (size_t)(s - run)))
			return -ENOMEM;
		if (ch == 0)
			break;
		char e[6] = {'\\', 'u', '0', '0', hex[ch >> 4], hex[ch & 15]};
		const char *short_ = ch == '"' ? "\\\"" : ch == '\\' ? "\\\\" : ch == '\n' ? "\\n" : ch == '\t' ? "\\t" :
				     ch == '\r' ? "\\r" : NULL;
		if (short_ ? put(w, short_, 2) : put(w, e, 6))
			return -ENOMEM;
		run = s + 1;
	}
	return put(w, "\"", 1);
}

/* Names and ids are plain ASCII almost always: one pass finds the end, one copy writes the string. */
static int put_escaped(struct jw *w, const char *s)
{
	size_t n = 0;
	while (!needs_escape[(unsigned char)s[n]])
		n++;
	if (put(w, "\"", 1))
		return -ENOMEM;
	if (s[n] != 0)
		return put_escaped_slow(w, s);
	if (put(w, s, n))
		return -ENOMEM;
	return put(w, "\"", 1);
}

static int jw_str(void *c, const char *s)
{
	return sep(c) ? -ENOMEM : put_escaped(c, s);
}

static int jw_key(void *c, const char *k, size_t n)
{
	struct jw *w = c;
	if (jw_str(c, k) || put(w, ":", 1))
		return -ENOMEM;
	w->after_key = 1;
	return 0;
}

/* Room for one number right in the output buffer (fmt.c writes there directly), after its separator. */
static char *num_room(struct jw *w)
{
	ax_buf *b = w->b;
	if (sep(w) || (b->cap - b->len < AX__FMT_ROOM && ax_buf_reserve(b, AX__FMT_ROOM) < 0))
		return NULL;
	return (char *)b->data + b->len;
}

static int jw_u64(void *c, uint64_t v)
{
	struct jw *w = c;
	char *o = num_room(w);
	return o ? (w->b->len += ax__fmt_u64(v, o), 0) : -ENOMEM;
}

static int jw_i64(void *c, int64_t v)
{
	struct jw *w = c;
	char *o = num_room(w);
	return o ? (w->b->len += ax__fmt_i64(v, o), 0) : -ENOMEM;
}

/* Shortest text that reads back as the same number (fmt.c); JSON readers parse a double, then a float32 field
 * narrows it, and fmt.c checks float32 text that way. -0 is written "-0.0" so that it stays a negative zero real
 * and does not read back as the integer 0. */
static int jw_f32(void *c, float v)
{
	struct jw *w = c;
	char *o = num_room(w);
	return o ? (w->b->len += ax__fmt_f32(v, o), 0) : -ENOMEM;
}

static int jw_f64(void *c, double v)
{
	struct jw *w = c;
	char *o = num_room(w);
	return o ? (w->b->len += ax__fmt_f64(v, o), 0) : -ENOMEM;
}

static const ax__emitter json_emitter = {
	.map = jw_map, .array = jw_array, .end = jw_end, .key = jw_key, .u64 = jw_u64,
	.i64 = jw_i64, .f32 = jw_f32, .f64 = jw_f64, .str = jw_str,
};

int ax__record_json_emit(const ax_record *r, ax_buf *out)
{
	size_t mark = out->len;
	struct jw w = {.b = out};
	if (ax_buf_reserve(out, 1024) < 0) /* one record's usual size: the writes below then rarely check twice */
		return -ENOMEM;
	if (ax__record_emit(r, &json_emitter, &w) != 0) {
		out->len = mark;
		return -ENOMEM;
	}
	return 0;
}

/*
 * attn records, the bulk of every feed, are written straight into the buffer: one reservation for the largest
 * possible record, literal key runs copied as constants, numbers formatted in place. The text is the emitter's
 * byte for byte (same keys, order and optional-key rules as emit.c); proto_test compares the two on many records.
 */
#define LIT(o, s) (memcpy((o), (s), sizeof(s) - 1), (o) + sizeof(s) - 1)
#define ATTN_MAX (1024 + 2 * 6 * AX_PROTO_STR + AX_PROTO_MAX_TOPK * 3 * 32) /* keys, escaped strings, arrays */

static char *str_at(char *o, const char *s)
{
	static const char hex[] = "0123456789abcdef";
	*o++ = '"';
	for (;; s++) {
		unsigned char ch = (unsigned char)*s;
		if (!needs_escape[ch]) {
			*o++ = (char)ch;
			continue;
		}
		if (ch == 0)
			break;
		*o++ = '\\';
		switch (ch) {
		case '"': *o++ = '"'; break;
		case '\\': *o++ = '\\'; break;
		case '\n': *o++ = 'n'; break;
		case '\t': *o++ = 't'; break;
		case '\r': *o++ = 'r'; break;
		default: o = LIT(o, "u00"), *o++ = hex[ch >> 4], *o++ = hex[ch & 15]; break;
		}
	}
	*o++ = '"';
	return o;
}

static char *f32s_at(char *o, const float *v, uint32_t k)
{
	*o++ = '[';
	for (uint32_t i = 0; i < k; i++) {
		if (i)
			*o++ = ',';
		o += ax__fmt_f32(v[i], o);
	}
	*o++ = ']';
	return o;
}

static void json_attn(const ax_record *r, ax_buf *out)
{
	const ax_rec_attn *a = &r->u.attn;
	char *o = (char *)out->data + out->len;
	o = LIT(o, "{\"t\":\"attn\",\"v\":");
	o += ax__fmt_u64(r->v, o);
	o = str_at(LIT(o, ",\"src\":"), r->src);
	o = LIT(o, ",\"seq\":");
	o += ax__fmt_u64(r->seq, o);
	if (r->ts_ns) {
		o = LIT(o, ",\"ts\":");
		o += ax__fmt_u64(r->ts_ns, o);
	}
	o = str_at(LIT(o, ",\"rid\":"), r->rid);
	o = LIT(o, ",\"position\":");
	o += ax__fmt_i64(a->position, o);
	o = LIT(o, ",\"decode_step\":");
	o += ax__fmt_i64(a->decode_step, o);
	o = LIT(o, ",\"token_id\":");
	o += ax__fmt_i64(a->token_id, o);
	o = LIT(o, ",\"layer_id\":");
	o += ax__fmt_i64(a->layer_id, o);
	o = str_at(LIT(o, ",\"mode\":"), ax_mode_name(a->mode));
	if (a->mode == AX_MODE_HEADS) {
		o = LIT(o, ",\"head_id\":");
		o += ax__fmt_i64(a->head_id, o);
	}
	o = LIT(o, ",\"token_positions\":[");
	for (uint32_t i = 0; i < a->k; i++) {
		if (i)
			*o++ = ',';
		o += ax__fmt_i64(a->token_positions[i], o);
	}
	o = f32s_at(LIT(o, "],\"topk_logits\":"), a->topk_logits, a->k);
	o = f32s_at(LIT(o, ",\"attention_scores\":"), a->attention_scores, a->k);
	o = LIT(o, ",\"logsumexp_all\":");
	o += ax__fmt_f64(a->logsumexp_all, o);
	o = LIT(o, ",\"topk_mass\":");
	o += ax__fmt_f64(a->topk_mass, o);
	if (a->prefill) {
		o = LIT(o, ",\"prefill\":");
		o += ax__fmt_u64(a->prefill, o);
	}
	*o++ = '}';
	out->len = (size_t)((uint8_t *)o - out->data);
}

int ax_record_json(const ax_record *r, ax_buf *out)
{
	int rc = ax_record_validate(r);
	if (rc < 0)
		return rc;
	if (r->type != AX_REC_ATTN)
		return ax__record_json_emit(r, out);
	if (ax_buf_reserve(out, ATTN_MAX) < 0)
		return -ENOMEM;
	json_attn(r, out);
	return 0;
}

int ax_record_to_json_t(const ax_record *r, json_t **out)
{
	ax_buf b;
	ax_buf_init(&b);
	*out = NULL;
	int rc = ax_record_json(r, &b);
	if (rc == 0) {
		*out = json_loadb((const char *)b.data, b.len, JSON_DISABLE_EOF_CHECK, NULL);
		rc = *out ? 0 : -ENOMEM; /* the text is valid JSON by construction: failure is memory */
	}
	ax_buf_fini(&b);
	return rc;
}

/* ---- JSON → record ---- */
static void js_val(const json_t *j, ax__val *v);

static void js_next(ax__val *arr, ax__val *out)
{
	js_val(json_array_get(arr->obj, arr->idx++), out);
}

static int js_each(ax__val *map, ax__kv_fn fn, void *arg)
{
	const char *key;
	json_t *val;
	json_object_foreach((json_t *)map->obj, key, val) {
		ax__val k = {.kind = AX_V_STR, .s = key, .n = strlen(key)}, v;
		js_val(val, &v);
		int rc = fn(&k, &v, arg);
		if (rc)
			return rc;
	}
	return 0;
}

static int js_find(const ax__val *map, const char *key, ax__val *out)
{
	const json_t *j = json_object_get(map->obj, key);
	if (!j)
		return 0;
	js_val(j, out);
	return 1;
}

static void js_val(const json_t *j, ax__val *v)
{
	v->obj = j;
	switch (json_typeof(j)) {
	case JSON_INTEGER: {
		json_int_t i = json_integer_value(j);
		if (i >= 0) {
			v->kind = AX_V_UINT;
			v->u = (uint64_t)i;
		} else {
			v->kind = AX_V_INT;
			v->i = i;
		}
		break;
	}
	case JSON_REAL: v->kind = AX_V_FLOAT; v->f = json_real_value(j); break;
	case JSON_STRING: v->kind = AX_V_STR; v->s = json_string_value(j); v->n = json_string_length(j); break;
	case JSON_ARRAY: v->kind = AX_V_ARRAY; v->n = json_array_size(j); v->next = js_next; v->idx = 0; v->f32s = NULL; v->u32s = NULL; break;
	case JSON_OBJECT: v->kind = AX_V_MAP; v->n = json_object_size(j); v->each = js_each; break;
	default: v->kind = AX_V_OTHER; break;
	}
}

int ax_record_from_json(const json_t *obj, ax_record *r)
{
	ax_record_init(r, AX_REC_ATTN);
	if (!json_is_object(obj))
		return -EBADMSG;
	ax__val map;
	js_val(obj, &map);
	return ax__record_from_map(&map, js_find, r);
}
