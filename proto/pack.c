/*
 * pack.c — ax_record_pack: a record as one msgpack map, written straight into the caller's ax_buf through a
 * msgpack_packer whose write callback appends to the buffer (no intermediate sbuffer, no per-record allocation
 * once the buffer has grown). Integers take msgpack-c's smallest encoding; topk_logits / attention_scores are
 * float32, logsumexp_all / topk_mass float64. On failure the buffer is restored to its length before the call.
 */
#include "proto_internal.h"

#include <errno.h>
#include <msgpack.h>
#include <string.h>

/* The packer writes many pieces of a few bytes: copy inline when they fit (ax_record_pack reserved a bound). */
static int buf_write(void *data, const char *p, size_t n)
{
	ax_buf *b = data;
	if (__builtin_expect(n > b->cap - b->len, 0) && ax_buf_reserve(b, n) < 0)
		return -1;
	uint8_t *d = b->data + b->len;
	switch (n) { /* headers and numbers: fixed small sizes the compiler copies inline */
	case 1: d[0] = (uint8_t)p[0]; break;
	case 2: memcpy(d, p, 2); break;
	case 3: memcpy(d, p, 3); break;
	case 5: memcpy(d, p, 5); break;
	case 9: memcpy(d, p, 9); break;
	default: memcpy(d, p, n); break;
	}
	b->len += n;
	return 0;
}

/* An upper bound of a record's packed size: every fixed string and array at its cap, 9 bytes a number. */
static size_t size_bound(const ax_record *r)
{
	size_t n = 3 * AX_PROTO_STR + 512;
	switch (r->type) {
	case AX_REC_HELLO: return n + 2 * AX_PROTO_STR + 9 * AX_PROTO_MAX_LIST;
	case AX_REC_REQ: return n + 5 * (size_t)r->u.req.prompt_len;
	case AX_REC_ATTN: return n + 19 * (size_t)r->u.attn.k;
	case AX_REC_STATS: return n + 60 * AX_PROTO_MAX_STATS;
	case AX_REC_POLICY: return n + 18 * AX_PROTO_MAX_LIST;
	}
	return n;
}

static int mp_map(void *c, uint32_t n) { return msgpack_pack_map(c, n); }
static int mp_array(void *c, uint32_t n) { return msgpack_pack_array(c, n); }
static int mp_end(void *c) { return 0; }
static int mp_u64(void *c, uint64_t v) { return msgpack_pack_uint64(c, v); }
static int mp_i64(void *c, int64_t v) { return msgpack_pack_int64(c, v); }
static int mp_f32(void *c, float v) { return msgpack_pack_float(c, v); }
static int mp_f64(void *c, double v) { return msgpack_pack_double(c, v); }

static int mp_key(void *c, const char *s, size_t n)
{
	int rc = msgpack_pack_str(c, n);
	return rc ? rc : msgpack_pack_str_body(c, s, n);
}

static int mp_str(void *c, const char *s)
{
	return mp_key(c, s, strlen(s));
}

static const ax__emitter mp_emitter = {
	.map = mp_map, .array = mp_array, .end = mp_end, .key = mp_key, .u64 = mp_u64,
	.i64 = mp_i64, .f32 = mp_f32, .f64 = mp_f64, .str = mp_str,
};

int ax_record_pack(const ax_record *r, ax_buf *out)
{
	int rc = ax_record_validate(r);
	if (rc < 0)
		return rc;
	size_t mark = out->len;
	if (ax_buf_reserve(out, size_bound(r)) < 0)
		return -ENOMEM;
	msgpack_packer pk;
	msgpack_packer_init(&pk, out, buf_write);
	if (ax__record_emit(r, &mp_emitter, &pk) != 0) {
		out->len = mark;
		return -ENOMEM;
	}
	return 0;
}
