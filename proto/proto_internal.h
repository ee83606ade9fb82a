/*
 * proto_internal.h — what the proto files share and nobody else sees.
 *
 * One schema, two directions, three representations. Encoding walks a record once through an emitter (a small
 * table of "write a map / key / number / string / array" callbacks): pack.c plugs in msgpack_packer, json.c a JSON
 * text writer, so the two outputs cannot disagree on names or on which fields are present. Decoding turns each
 * value into an ax__val (a scalar, or an array/map with accessors) — unpack.c from msgpack_object, json.c from
 * json_t — and fields.c applies them to the record, checks required fields, then ax_record_validate runs.
 */
#ifndef ATTNX_PROTO_INTERNAL_H
#define ATTNX_PROTO_INTERNAL_H

#include "attnx_proto.h"

#include <stdbool.h>

/* ---- encoding ---- */
typedef struct ax__emitter {
	int (*map)(void *ctx, uint32_t n);        /* begin a map of n pairs */
	int (*array)(void *ctx, uint32_t n);      /* begin an array of n values */
	int (*end)(void *ctx);                    /* close the innermost map or array */
	int (*key)(void *ctx, const char *k, size_t n);
	int (*u64)(void *ctx, uint64_t v);
	int (*i64)(void *ctx, int64_t v);
	int (*f32)(void *ctx, float v);
	int (*f64)(void *ctx, double v);
	int (*str)(void *ctx, const char *s);
} ax__emitter;

/* Emit a record that passed ax_record_validate. Returns 0 or the first non-zero emitter result. */
int ax__record_emit(const ax_record *r, const ax__emitter *e, void *ctx);

/* ---- decoding ---- */
enum ax__vkind { AX_V_UINT, AX_V_INT, AX_V_FLOAT, AX_V_STR, AX_V_ARRAY, AX_V_MAP, AX_V_OTHER };

typedef struct ax__val ax__val;
typedef int (*ax__kv_fn)(const ax__val *k, const ax__val *v, void *arg);
struct ax__val {
	int kind;          /* enum ax__vkind; AX_V_INT only for negative integers */
	uint64_t u;        /* AX_V_UINT */
	int64_t i;         /* AX_V_INT */
	double f;          /* AX_V_FLOAT */
	const char *s;     /* AX_V_STR: not NUL-terminated */
	size_t n;          /* AX_V_STR bytes, AX_V_ARRAY / AX_V_MAP entries */
	const void *obj;   /* the representation's own object (msgpack_object * / json_t *) */
	void (*at)(const ax__val *arr, size_t i, ax__val *out); /* AX_V_ARRAY: element i < n */
	int (*each)(const ax__val *map, ax__kv_fn fn, void *arg); /* AX_V_MAP: stops at fn's first non-zero */
};

/* Decode one map into *r. `find` looks one key up (1 found, 0 not; used for `t`, which may come anywhere).
 * Returns 0, -EPROTO or -ENOMEM; *r may hold an allocated prompt either way: the caller runs ax_record_fini. */
int ax__record_from_map(const ax__val *map, int (*find)(const ax__val *, const char *, ax__val *), ax_record *r);

/* Structural check of one msgpack object at data[0..len): well-formed, complete, containers no longer than the
 * bytes left, nesting ≤ AX__MAX_DEPTH. Sets *end (bytes used) and *n_slots (msgpack_object slots the unpacker
 * will allocate). 0 or -EBADMSG. */
#define AX__MAX_DEPTH 16
int ax__mp_scan(const uint8_t *data, size_t len, size_t *end, size_t *n_slots);

/* UTF-8 check of a NUL-terminated string of at most `cap` bytes including the NUL: 1 valid. */
bool ax__str_ok(const char *s, size_t cap, bool nonempty);

#endif
