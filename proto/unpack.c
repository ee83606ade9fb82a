/*
 * unpack.c — ax_frame_decode / ax_record_unpack on top of msgpack-c.
 *
 * One decode call: ax__mp_scan proves the bytes are one complete, sanely sized msgpack object with nothing after
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

static void mp_val(const msgpack_object *o, ax__val *v);

static void mp_at(const ax__val *arr, size_t i, ax__val *out)
{
	const msgpack_object *o = arr->obj;
	mp_val(&o->via.array.ptr[i], out);
}

static int mp_each(const ax__val *map, ax__kv_fn fn, void *arg)
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
	case MSGPACK_OBJECT_ARRAY: v->kind = AX_V_ARRAY; v->n = o->via.array.size; v->at = mp_at; break;
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
	if (ax__mp_scan(data, len, &end, &slots) < 0 || end != len)
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

int ax_frame_decode(const void *data, size_t len, ax_record_cb cb, void *arg)
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

int ax_record_unpack(const void *data, size_t len, ax_record *r)
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
