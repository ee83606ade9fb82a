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

static int buf_write(void *data, const char *p, size_t n)
{
	return ax_buf_append(data, p, n) ? -1 : 0;
}

static int mp_map(void *c, uint32_t n) { return msgpack_pack_map(c, n); }
static int mp_array(void *c, uint32_t n) { return msgpack_pack_array(c, n); }
static int mp_end(void *c) { return 0; }
static int mp_u64(void *c, uint64_t v) { return msgpack_pack_uint64(c, v); }
static int mp_i64(void *c, int64_t v) { return msgpack_pack_int64(c, v); }
static int mp_f32(void *c, float v) { return msgpack_pack_float(c, v); }
static int mp_f64(void *c, double v) { return msgpack_pack_double(c, v); }

static int mp_str(void *c, const char *s)
{
	size_t n = strlen(s);
	int rc = msgpack_pack_str(c, n);
	return rc ? rc : msgpack_pack_str_body(c, s, n);
}

static const ax__emitter mp_emitter = {
	.map = mp_map, .array = mp_array, .end = mp_end, .key = mp_str, .u64 = mp_u64,
	.i64 = mp_i64, .f32 = mp_f32, .f64 = mp_f64, .str = mp_str,
};

int ax_record_pack(const ax_record *r, ax_buf *out)
{
	int rc = ax_record_validate(r);
	if (rc < 0)
		return rc;
	size_t mark = out->len;
	msgpack_packer pk;
	msgpack_packer_init(&pk, out, buf_write);
	if (ax__record_emit(r, &mp_emitter, &pk) != 0) {
		out->len = mark;
		return -ENOMEM;
	}
	return 0;
}
