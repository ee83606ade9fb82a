/*
 * unpack.c — ax_frame_decode / ax_record_unpack: a bounds-checked cursor over the msgpack bytes.
 *
 * One decode call: ax__mp_scan first proves the bytes are one complete, well-formed, shallow msgpack object with
 * nothing after it (so a broken frame delivers no record at all). Then a cursor walks the root array; every record
 * map is seen by fields.c through ax__val: a value is read where it lies (the head byte says its type; integers and
 * floats are converted, strings point into the caller's bytes, containers carry their entry count and a pointer to
 * their first entry), arrays are iterated in order, maps pair by pair, and whatever fields.c did not consume is
 * skipped by counting values (ax__mp_skip). Every read is checked against the end of the bytes, even though the
 * scan already proved them, so a bug here cannot read past the caller's buffer. One stack-resident ax_record is
 * reused for every record of the frame; nothing is allocated except a req's prompt (fields.c).
 *
 * Types as the previous msgpack-c decoder saw them (unpack_mpc.c, the differential test's reference): every
 * integer encoding that holds a value ≥ 0 is AX_V_UINT, a negative one AX_V_INT; float32 and float64 are AX_V_FLOAT;
 * str8/16/32 and fixstr are AX_V_STR; nil, booleans, bin and ext are AX_V_OTHER.
 *
 * Errors: -EMSGSIZE (over AX_PROTO_MAX_FRAME bytes or AX_PROTO_MAX_RECORDS records), -EBADMSG (bytes / structure,
 * an element of the frame that is not a map), -EPROTO (a record's fields), -ENOMEM (a prompt).
 */
#include "proto_internal.h"

#include <errno.h>
#include <string.h>

static void mp_next(ax__val *arr, ax__val *out);
static int mp_each(ax__val *map, ax__kv_fn fn, void *arg);
static int mp_f32s(ax__val *arr, float *out);
static int mp_u32s(ax__val *arr, int64_t *out);

static inline uint64_t be(const uint8_t *p, int n)
{
	uint64_t v = 0;
	for (int i = 0; i < n; i++)
		v = (v << 8) | p[i];
	return v;
}

/* Big-endian loads of known width (one load and a byte swap, not a loop). */
static inline uint16_t be16(const uint8_t *p)
{
	uint16_t v;
	memcpy(&v, p, 2);
	return __builtin_bswap16(v);
}

static inline uint32_t be32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return __builtin_bswap32(v);
}

static inline uint64_t be64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return __builtin_bswap64(v);
}

static inline void set_int(ax__val *v, int64_t i)
{
	if (i >= 0) {
		v->kind = AX_V_UINT;
		v->u = (uint64_t)i;
	} else {
		v->kind = AX_V_INT;
		v->i = i;
	}
}

static void set_container(ax__val *v, int kind, uint64_t n, const uint8_t *first, const uint8_t *end)
{
	v->kind = kind;
	v->n = (size_t)n;
	v->obj = first;
	v->end = end;
	v->idx = 0;
	if (kind == AX_V_ARRAY) {
		v->next = mp_next;
		v->f32s = mp_f32s;
		v->u32s = mp_u32s;
	} else
		v->each = mp_each;
}

/* Fixed-size scalar classes by head byte (a dense switch on these is one indirect jump). */
enum { C_OTHER, C_POSFIX, C_NEGFIX, C_FIXSTR, C_F32, C_F64, C_U8, C_U16, C_U32, C_U64, C_I8, C_I16, C_I32, C_I64 };
static const uint8_t scalar_class[256] = {
	[0x00 ... 0x7f] = C_POSFIX, [0xe0 ... 0xff] = C_NEGFIX, [0xa0 ... 0xbf] = C_FIXSTR,
	[0xca] = C_F32, [0xcb] = C_F64, [0xcc] = C_U8, [0xcd] = C_U16, [0xce] = C_U32, [0xcf] = C_U64,
	[0xd0] = C_I8, [0xd1] = C_I16, [0xd2] = C_I32, [0xd3] = C_I64,
	/* nil, booleans, fixext: C_OTHER */
};

/* A scalar of fixed size (payload at p, bounds already checked) into *v. */
static inline __attribute__((always_inline)) void fixed_scalar(uint8_t b, const uint8_t *p, ax__val *v)
{
	union {
		uint32_t u;
		float f;
	} f32;
	union {
		uint64_t u;
		double f;
	} f64;
	switch (scalar_class[b]) {
	case C_POSFIX: v->kind = AX_V_UINT; v->u = b; break;
	case C_NEGFIX: v->kind = AX_V_INT; v->i = (int8_t)b; break;
	case C_FIXSTR: v->kind = AX_V_STR; v->s = (const char *)p; v->n = b & 0x1f; break;
	case C_F32: f32.u = be32(p); v->kind = AX_V_FLOAT; v->f = f32.f; break;
	case C_F64: f64.u = be64(p); v->kind = AX_V_FLOAT; v->f = f64.f; break;
	case C_U8: v->kind = AX_V_UINT; v->u = p[0]; break;
	case C_U16: v->kind = AX_V_UINT; v->u = be16(p); break;
	case C_U32: v->kind = AX_V_UINT; v->u = be32(p); break;
	case C_U64: v->kind = AX_V_UINT; v->u = be64(p); break;
	case C_I8: set_int(v, (int8_t)p[0]); break;
	case C_I16: set_int(v, (int16_t)be16(p)); break;
	case C_I32: set_int(v, (int32_t)be32(p)); break;
	case C_I64: set_int(v, (int64_t)be64(p)); break;
	default: v->kind = AX_V_OTHER; break;
	}
}

/* Containers and variable-size scalars (str8/16/32, bin, ext): see mp_read. */
static int read_slow(uint8_t b, int h, const uint8_t **pp, const uint8_t *end, ax__val *v)
{
	const uint8_t *p = *pp;
	size_t left = (size_t)(end - p);
	uint64_t n;
	int lb;
	switch (h) {
	case AX__H_FIXMAP:
	case AX__H_FIXARRAY:
		n = b & 0x0f;
		if (n << (h == AX__H_FIXMAP) > left)
			return -EBADMSG;
		set_container(v, h == AX__H_FIXMAP ? AX_V_MAP : AX_V_ARRAY, n, p, end);
		return 0;
	case AX__H_BIG: /* array16/32, map16/32 */
		lb = (b & 1) ? 4 : 2;
		if ((size_t)lb > left || (be(p, lb) << (b >= 0xde)) > left - (size_t)lb)
			return -EBADMSG;
		set_container(v, b >= 0xde ? AX_V_MAP : AX_V_ARRAY, be(p, lb), p + lb, end);
		*pp = p + lb;
		return 0;
	case AX__H_VAR:
		if (b >= 0xd9) { /* str8/16/32 */
			lb = 1 << (b - 0xd9);
			if ((size_t)lb > left || (n = be(p, lb)) > left - (size_t)lb)
				return -EBADMSG;
			v->kind = AX_V_STR;
			v->s = (const char *)p + lb;
			v->n = (size_t)n;
			*pp = p + lb + n;
			return 0;
		}
		v->kind = AX_V_OTHER; /* bin, ext */
		return (*pp = ax__mp_skip(p - 1, end, 1)) ? 0 : -EBADMSG;
	}
	return -EBADMSG;
}

/* Read the value at *pp (bounded by end) into *v: scalars whole, containers their header only (v->obj = their
 * first entry, v->idx = 0). Advances *pp past what it read. 0 or -EBADMSG (truncated, 0xc1). */
static inline __attribute__((always_inline)) int mp_read(const uint8_t **pp, const uint8_t *end, ax__val *v)
{
	const uint8_t *p = *pp;
	if (p >= end)
		return -EBADMSG;
	uint8_t b = *p++;
	int h = ax__mp_head[b];
	if (h < 0) {
		*pp = p;
		return read_slow(b, h, pp, end, v);
	}
	if ((size_t)h > (size_t)(end - p))
		return -EBADMSG;
	fixed_scalar(b, p, v);
	*pp = p + h;
	return 0;
}

/* Past the value read into v from bytes that ended at p: what next() / each() left of a container is skipped. */
static inline const uint8_t *past(const ax__val *v, const uint8_t *p)
{
	if (v->kind == AX_V_ARRAY)
		return v->idx == v->n ? v->obj : ax__mp_skip(v->obj, v->end, v->n - v->idx);
	if (v->kind == AX_V_MAP)
		return v->idx == v->n ? v->obj : ax__mp_skip(v->obj, v->end, 2 * (uint64_t)(v->n - v->idx));
	return p;
}

static void mp_next(ax__val *arr, ax__val *out)
{
	const uint8_t *p = arr->obj;
	if (arr->idx >= arr->n || mp_read(&p, arr->end, out) < 0 || !(p = past(out, p))) {
		out->kind = AX_V_OTHER;
		return;
	}
	arr->idx++;
	arr->obj = p;
}

static int mp_f32s(ax__val *arr, float *out)
{
	const uint8_t *p = arr->obj;
	size_t n = arr->n - arr->idx;
	if ((size_t)((const uint8_t *)arr->end - p) < 5 * n)
		return 0;
	for (size_t i = 0; i < n; i++, p += 5) {
		union {
			uint32_t u;
			float f;
		} x;
		if (p[0] != 0xca)
			return 0;
		x.u = be32(p + 1);
		out[i] = x.f;
	}
	arr->obj = p;
	arr->idx = arr->n;
	return 1;
}

static int mp_u32s(ax__val *arr, int64_t *out)
{
	const uint8_t *p = arr->obj, *end = arr->end;
	size_t n = arr->n - arr->idx;
	for (size_t i = 0; i < n; i++) {
		if (p == end)
			return 0;
		uint8_t b = *p++;
		size_t w = b < 0x80 ? 0 : b == 0xcc ? 1 : b == 0xcd ? 2 : b == 0xce ? 4 : 8;
		if (w == 8 || (size_t)(end - p) < w)
			return 0;
		out[i] = w == 0 ? b : w == 1 ? p[0] : w == 2 ? be16(p) : be32(p);
		p += w;
	}
	arr->obj = p;
	arr->idx = arr->n;
	return 1;
}

/* Walk the pairs of a map, calling fn with each key and value; the map's obj / idx follow the walk. */
static int mp_each(ax__val *map, ax__kv_fn fn, void *arg)
{
	const uint8_t *p = map->obj, *end = map->end;
	while (map->idx < map->n) {
		ax__val k, v;
		if (mp_read(&p, end, &k) < 0 || !(p = past(&k, p)) || mp_read(&p, end, &v) < 0)
			return -EBADMSG;
		int rc = fn(&k, &v, arg);
		if (rc)
			return rc;
		if (!(p = past(&v, p)))
			return -EBADMSG;
		map->obj = p;
		map->idx++;
	}
	return 0;
}

/* The first value under a string key `key` (1), or 0 if there is none. */
static int mp_find(const ax__val *map, const char *key, ax__val *out)
{
	const uint8_t *p = map->obj, *end = map->end;
	size_t n = strlen(key);
	for (size_t i = map->idx; i < map->n; i++) {
		ax__val k;
		if (mp_read(&p, end, &k) < 0 || !(p = past(&k, p)) || mp_read(&p, end, out) < 0)
			return 0;
		if (k.kind == AX_V_STR && k.n == n && memcmp(k.s, key, n) == 0)
			return 1;
		if (!(p = past(out, p)))
			return 0;
	}
	return 0;
}

/*
 * The canonical attn record, in the key order emit.c writes (t first, optional keys where emit.c puts them): read
 * straight through, each key recognised by comparing its bytes (fixstr head + name) with the one expected next,
 * each value handed to fields.c's rules for that field (ax__dec_field), so the result and every error are those
 * of the general path. Anything else (another type, keys in another order, unknown or repeated keys) returns
 * NOT_CANONICAL and the general path (ax__record_from_map, which restarts the record) decodes it.
 */
#define NOT_CANONICAL 1
static const struct canon_key {
	uint8_t f, optional, len;
	char bytes[18];
} attn_keys[] = {
	{AX__F_V, 0, 2, "\xa1v"}, {AX__F_SRC, 0, 4, "\xa3src"}, {AX__F_SEQ, 0, 4, "\xa3seq"},
	{AX__F_TS, 1, 3, "\xa2ts"}, {AX__F_RID, 0, 4, "\xa3rid"}, {AX__F_POSITION, 0, 9, "\xa8position"},
	{AX__F_DECODE_STEP, 0, 12, "\xab" "decode_step"}, {AX__F_TOKEN_ID, 0, 9, "\xa8token_id"},
	{AX__F_LAYER_ID, 0, 9, "\xa8layer_id"}, {AX__F_MODE, 0, 5, "\xa4mode"}, {AX__F_HEAD_ID, 1, 8, "\xa7head_id"},
	{AX__F_TOKEN_POSITIONS, 0, 16, "\xaftoken_positions"}, {AX__F_TOPK_LOGITS, 0, 12, "\xabtopk_logits"},
	{AX__F_ATTENTION_SCORES, 0, 17, "\xb0" "attention_scores"},
	{AX__F_LOGSUMEXP_ALL, 0, 14, "\xad" "logsumexp_all"}, {AX__F_TOPK_MASS, 0, 10, "\xa9topk_mass"},
	{AX__F_PREFILL, 1, 8, "\xa7prefill"},
};

/* n (2..17) bytes at p equal k (18 bytes, zero padded)? Word compares instead of a memcmp call. */
static inline int key_eq(const uint8_t *p, const char *k, size_t n)
{
	uint64_t a, b;
	if (n < 8) {
		uint32_t x, y;
		if (n < 4)
			return p[0] == (uint8_t)k[0] && p[1] == (uint8_t)k[1] && (n == 2 || p[2] == (uint8_t)k[2]);
		memcpy(&x, p, 4), memcpy(&y, k, 4);
		if (x != y)
			return 0;
		memcpy(&x, p + n - 4, 4), memcpy(&y, k + n - 4, 4);
		return x == y;
	}
	memcpy(&a, p, 8), memcpy(&b, k, 8);
	if (a != b)
		return 0;
	if (n > 16) {
		memcpy(&a, p + 8, 8), memcpy(&b, k + 8, 8);
		if (a != b)
			return 0;
	}
	memcpy(&a, p + n - 8, 8), memcpy(&b, k + n - 8, 8);
	return a == b;
}

static int canonical_attn(ax__val *map, ax_record *r)
{
	const uint8_t *p = map->obj, *end = map->end;
	size_t pairs = 1;
	if (map->n < 1 || end - p < 7 || memcmp(p, "\xa1t\xa4" "attn", 7) != 0)
		return NOT_CANONICAL;
	p += 7;
	ax__dec d;
	ax__dec_begin(&d, r, AX_REC_ATTN);
	for (size_t i = 0; i < sizeof attn_keys / sizeof attn_keys[0] && pairs < map->n; i++) {
		const struct canon_key *k = &attn_keys[i];
		if ((size_t)(end - p) < k->len || !key_eq(p, k->bytes, k->len)) {
			if (k->optional)
				continue;
			return NOT_CANONICAL;
		}
		p += k->len;
		ax__val v;
		if (mp_read(&p, end, &v) < 0)
			return -EBADMSG;
		int rc = ax__dec_field(&d, k->f, &v);
		if (rc)
			return rc;
		if (!(p = past(&v, p)))
			return -EBADMSG;
		pairs++;
	}
	if (pairs != map->n)
		return NOT_CANONICAL;
	map->obj = p;
	map->idx = map->n;
	return ax__dec_finish(&d);
}

/* Decode the map at *pp into *r and move *pp past it (the caller fini's *r afterwards). */
static int record_at(const uint8_t **pp, const uint8_t *end, ax_record *r)
{
	ax__val map;
	if (mp_read(pp, end, &map) < 0 || map.kind != AX_V_MAP)
		return -EBADMSG;
	int rc = canonical_attn(&map, r);
	if (rc == NOT_CANONICAL) {
		map.obj = *pp; /* from the first pair again */
		map.idx = 0;
		rc = ax__record_from_map(&map, mp_find, r);
	}
	if (rc == 0 && !(*pp = past(&map, *pp)))
		rc = -EBADMSG;
	return rc;
}

/* The frame's checks before any record is decoded: 0 or -EBADMSG / -EMSGSIZE. */
static int check_bytes(const void *data, size_t len)
{
	size_t used;
	if (!data || len == 0)
		return -EBADMSG;
	if (len > AX_PROTO_MAX_FRAME)
		return -EMSGSIZE;
	if (ax__mp_scan(data, len, &used) < 0 || used != len)
		return -EBADMSG;
	return 0;
}

int ax_frame_decode(const void *data, size_t len, ax_record_cb cb, void *arg)
{
	int rc = check_bytes(data, len);
	if (rc < 0)
		return rc;
	const uint8_t *p = data, *end = p + len;
	ax__val root;
	if (mp_read(&p, end, &root) < 0 || root.kind != AX_V_ARRAY)
		return -EBADMSG;
	if (root.n > AX_PROTO_MAX_RECORDS)
		return -EMSGSIZE;
	ax_record r;
	ax_record_init(&r, AX_REC_ATTN);
	size_t i;
	for (i = 0; i < root.n && rc == 0; i++) {
		rc = record_at(&p, end, &r);
		if (rc == 0 && cb)
			rc = cb(&r, arg);
		ax_record_fini(&r);
	}
	return rc ? rc : (int)i;
}

int ax_record_unpack(const void *data, size_t len, ax_record *r)
{
	ax_record_init(r, AX_REC_ATTN);
	int rc = check_bytes(data, len);
	if (rc < 0)
		return rc;
	const uint8_t *p = data;
	return record_at(&p, p + len, r);
}
