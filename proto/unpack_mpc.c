/*
 * unpack_mpc.c — the previous decoder, on top of msgpack-c, kept only as the reference of the differential test
 * (decode_diff.c): ax__frame_decode_mpc / ax__record_unpack_mpc behave as ax_frame_decode / ax_record_unpack did
 * before unpack.c became a cursor over the bytes. Not part of the library.
 *
 * One decode call: mpc_scan proves the bytes are one complete, sanely sized msgpack object with nothing after
 * it; msgpack_unpack then builds the object tree in a zone sized from the scan (one allocation per call; strings
 * point into the caller's bytes); each map becomes an ax_record in one stack-resident record that is reused for
 * every record of the frame (no per-record allocation except a req's prompt). Errors map to: -EMSGSIZE (over
 * AX_PROTO_MAX_FRAME bytes or AX_PROTO_MAX_RECORDS records), -EBADMSG (bytes / structure), -EPROTO (a record's
 * fields), -ENOMEM.
 */
#include "proto_internal.h"

#include <errno.h>
#include <msgpack.h>
#include <stdlib.h>
#include <string.h>

/* ---- the previous structural pre-scan (scan.c before the cursor decoder), verbatim ---- */
static uint64_t be(const uint8_t *p, int n)
{
	uint64_t v = 0;
	for (int i = 0; i < n; i++)
		v = (v << 8) | p[i];
	return v;
}

/* What one header byte says: bytes of length field (lenb), fixed payload (fixed), whether the length counts
 * payload bytes (kind 1, or 5: fixstr), array entries (2) or map pairs (3); 4 = never used (0xc1). A table: this
 * runs once per msgpack object of every frame. */
struct head {
	uint8_t lenb, fixed, kind;
};

static const struct head heads[256] = {
	[0x80 ... 0x8f] = {0, 0, 3}, [0x90 ... 0x9f] = {0, 0, 2},
	[0xa0 ... 0xbf] = {0, 0, 5}, /* fixstr: payload length in the low 5 bits */
	[0xc1] = {0, 0, 4},
	[0xc4] = {1, 0, 1}, [0xc5] = {2, 0, 1}, [0xc6] = {4, 0, 1},
	[0xc7] = {1, 1, 1}, [0xc8] = {2, 1, 1}, [0xc9] = {4, 1, 1}, /* ext: length, then a type byte */
	[0xca] = {0, 4, 0}, [0xcb] = {0, 8, 0},
	[0xcc] = {0, 1, 0}, [0xcd] = {0, 2, 0}, [0xce] = {0, 4, 0}, [0xcf] = {0, 8, 0},
	[0xd0] = {0, 1, 0}, [0xd1] = {0, 2, 0}, [0xd2] = {0, 4, 0}, [0xd3] = {0, 8, 0},
	[0xd4] = {0, 2, 0}, [0xd5] = {0, 3, 0}, [0xd6] = {0, 5, 0}, [0xd7] = {0, 9, 0}, [0xd8] = {0, 17, 0},
	[0xd9] = {1, 0, 1}, [0xda] = {2, 0, 1}, [0xdb] = {4, 0, 1},
	[0xdc] = {2, 0, 2}, [0xdd] = {4, 0, 2}, [0xde] = {2, 0, 3}, [0xdf] = {4, 0, 3},
	/* everything else (fixints, nil, bools) is one byte: {0, 0, 0} */
};

static int mpc_scan(const uint8_t *d, size_t len, size_t *end, size_t *n_slots)
{
	uint64_t left[AX__MAX_DEPTH + 1];
	int depth = 0;
	size_t off = 0, slots = 0;
	left[0] = 1;
	while (depth >= 0) {
		if (left[depth] == 0) {
			depth--;
			continue;
		}
		left[depth]--;
		if (off >= len)
			return -EBADMSG;
		uint8_t b = d[off++];
		struct head h = heads[b];
		if (h.kind == 4 || h.lenb > len - off)
			return -EBADMSG;
		uint64_t n = h.lenb ? be(d + off, h.lenb) : (b & (h.kind == 5 ? 0x1f : 0x0f));
		off += h.lenb;
		if (h.kind <= 1 || h.kind == 5) {
			uint64_t skip = h.fixed + (h.kind == 0 ? 0 : n);
			if (skip > len - off)
				return -EBADMSG;
			off += skip;
			continue;
		}
		uint64_t entries = h.kind == 3 ? 2 * n : n;
		if (entries > len - off || depth == AX__MAX_DEPTH)
			return -EBADMSG;
		slots += entries + 1; /* +1: alignment slack per container */
		left[++depth] = entries;
	}
	*end = off;
	*n_slots = slots;
	return 0;
}

static void mp_val(const msgpack_object *o, ax__val *v);

static void mp_next(ax__val *arr, ax__val *out)
{
	const msgpack_object *o = arr->obj;
	mp_val(&o->via.array.ptr[arr->idx++], out);
}

static int mp_each(ax__val *map, ax__kv_fn fn, void *arg)
{
	const msgpack_object *o = map->obj;
	for (uint32_t i = 0; i < o->via.map.size; i++) {
		ax__val k, v;
		mp_val(&o->via.map.ptr[i].key, &k);
		mp_val(&o->via.map.ptr[i].val, &v);
		int rc = fn(&k, &v, arg);
		if (rc)
			return rc;
	}
	return 0;
}

static int mp_find(const ax__val *map, const char *key, ax__val *out)
{
	const msgpack_object *o = map->obj;
	size_t n = strlen(key);
	for (uint32_t i = 0; i < o->via.map.size; i++) {
		const msgpack_object *k = &o->via.map.ptr[i].key;
		if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == n && memcmp(k->via.str.ptr, key, n) == 0) {
			mp_val(&o->via.map.ptr[i].val, out);
			return 1;
		}
	}
	return 0;
}

static void mp_val(const msgpack_object *o, ax__val *v)
{
	v->obj = o;
	switch (o->type) {
	case MSGPACK_OBJECT_POSITIVE_INTEGER: v->kind = AX_V_UINT; v->u = o->via.u64; break;
	case MSGPACK_OBJECT_NEGATIVE_INTEGER: v->kind = AX_V_INT; v->i = o->via.i64; break;
	case MSGPACK_OBJECT_FLOAT32:
	case MSGPACK_OBJECT_FLOAT64: v->kind = AX_V_FLOAT; v->f = o->via.f64; break;
	case MSGPACK_OBJECT_STR: v->kind = AX_V_STR; v->s = o->via.str.ptr; v->n = o->via.str.size; break;
	case MSGPACK_OBJECT_ARRAY: v->kind = AX_V_ARRAY; v->n = o->via.array.size; v->next = mp_next; v->idx = 0; v->f32s = NULL; v->u32s = NULL; break;
	case MSGPACK_OBJECT_MAP: v->kind = AX_V_MAP; v->n = o->via.map.size; v->each = mp_each; break;
	default: v->kind = AX_V_OTHER; break;
	}
}

/* Decode one map object into *r (the caller fini's *r afterwards). */
static int record_from_object(const msgpack_object *o, ax_record *r)
{
	if (o->type != MSGPACK_OBJECT_MAP)
		return -EBADMSG;
	ax__val map;
	mp_val(o, &map);
	return ax__record_from_map(&map, mp_find, r);
}

/* Scan, then unpack into `zone` (initialised here; the caller destroys it when 0 is returned). */
static int unpack_checked(const void *data, size_t len, msgpack_zone *zone, msgpack_object *root)
{
	size_t end, slots;
	if (!data || len == 0)
		return -EBADMSG;
	if (len > AX_PROTO_MAX_FRAME)
		return -EMSGSIZE;
	if (mpc_scan(data, len, &end, &slots) < 0 || end != len)
		return -EBADMSG;
	if (!msgpack_zone_init(zone, slots * sizeof(msgpack_object) + 256))
		return -ENOMEM;
	size_t off = 0;
	msgpack_unpack_return ret = msgpack_unpack(data, len, &off, zone, root);
	if (ret == MSGPACK_UNPACK_SUCCESS)
		return 0;
	msgpack_zone_destroy(zone);
	return ret == MSGPACK_UNPACK_NOMEM_ERROR ? -ENOMEM : -EBADMSG;
}

static int deliver(const msgpack_object *root, ax_record_cb cb, void *arg)
{
	ax_record r;
	ax_record_init(&r, AX_REC_ATTN);
	int rc = 0;
	uint32_t i;
	for (i = 0; i < root->via.array.size && rc == 0; i++) {
		rc = record_from_object(&root->via.array.ptr[i], &r);
		if (rc == 0 && cb)
			rc = cb(&r, arg);
		ax_record_fini(&r);
	}
	return rc ? rc : (int)i;
}

int ax__frame_decode_mpc(const void *data, size_t len, ax_record_cb cb, void *arg)
{
	msgpack_zone zone;
	msgpack_object root;
	int rc = unpack_checked(data, len, &zone, &root);
	if (rc < 0)
		return rc;
	if (root.type != MSGPACK_OBJECT_ARRAY)
		rc = -EBADMSG;
	else if (root.via.array.size > AX_PROTO_MAX_RECORDS)
		rc = -EMSGSIZE;
	else
		rc = deliver(&root, cb, arg);
	msgpack_zone_destroy(&zone);
	return rc;
}

int ax__record_unpack_mpc(const void *data, size_t len, ax_record *r)
{
	msgpack_zone zone;
	msgpack_object root;
	ax_record_init(r, AX_REC_ATTN);
	int rc = unpack_checked(data, len, &zone, &root);
	if (rc < 0)
		return rc;
	rc = record_from_object(&root, r);
	msgpack_zone_destroy(&zone);
	return rc;
}
