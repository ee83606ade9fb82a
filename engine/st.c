/*
 * st.c — safetensors reader.
 *
 * A .safetensors file is an 8-byte little-endian header length N, N bytes of JSON ({"name": {"dtype": "BF16",
 * "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {...}}), then the raw tensor bytes; offsets are
 * relative to the end of the header. We mmap the file read-only, parse the header with jansson, and check every
 * tensor's extent against the file and its byte count against shape × dtype size, so nothing later can read
 * outside the mapping. Tensors keep their stored dtype; the matmuls convert rows on the fly.
 */
#include "attnx_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct ax_st {
	void *map;       /* mmap'd file, or NULL for a caller's buffer */
	size_t map_len;
	ax_st_tensor *t;
	size_t n;
};

float ax_bf16_to_f32(uint16_t h)
{
	uint32_t u = (uint32_t)h << 16;
	float f;
	memcpy(&f, &u, 4);
	return f;
}

float ax_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
	if (exp == 0) {
		if (man == 0) {
			u = sign;
		} else { /* subnormal: normalise */
			exp = 127 - 15 + 1;
			while (!(man & 0x400)) {
				man <<= 1;
				exp--;
			}
			u = sign | (exp << 23) | ((man & 0x3ff) << 13);
		}
	} else if (exp == 31) {
		u = sign | 0x7f800000u | (man << 13);
	} else {
		u = sign | ((exp + 127 - 15) << 23) | (man << 13);
	}
	float f;
	memcpy(&f, &u, 4);
	return f;
}

uint16_t ax_f32_to_bf16(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
	u += 0x7fffu + ((u >> 16) & 1);
	return (uint16_t)(u >> 16);
}

uint16_t ax_f32_to_f16(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	uint32_t sign = (u >> 16) & 0x8000, a = u & 0x7fffffffu;
	if (a > 0x7f800000u)
		return (uint16_t)(sign | 0x7e00);
	if (a >= 0x477ff000u) /* rounds to ≥ 65520: inf */
		return (uint16_t)(sign | 0x7c00);
	if (a < 0x38800000u) { /* subnormal half: value = a * 2^24 rounded */
		float v;
		memcpy(&v, &a, 4);
		v = v * 16777216.0f; /* exact scaling into [0, 1024) */
		uint32_t m = (uint32_t)v;
		float rem = v - (float)m;
		if (rem > 0.5f || (rem == 0.5f && (m & 1)))
			m++;
		return (uint16_t)(sign | m);
	}
	uint32_t r = a + 0xfffu + ((a >> 13) & 1) - (112u << 23);
	return (uint16_t)(sign | (r >> 13));
}

static int dtype_of(const char *s, size_t *size)
{
	if (!strcmp(s, "F32")) {
		*size = 4;
		return AX_ST_F32;
	}
	if (!strcmp(s, "F16")) {
		*size = 2;
		return AX_ST_F16;
	}
	if (!strcmp(s, "BF16")) {
		*size = 2;
		return AX_ST_BF16;
	}
	static const struct { const char *n; size_t s; } other[] = {
		{"F64", 8}, {"I64", 8}, {"U64", 8}, {"I32", 4}, {"U32", 4}, {"I16", 2}, {"U16", 2},
		{"I8", 1}, {"U8", 1}, {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
	};
	for (size_t i = 0; i < sizeof other / sizeof other[0]; i++)
		if (!strcmp(s, other[i].n)) {
			*size = other[i].s;
			return AX_ST_OTHER;
		}
	return -1;
}

/* Fill one tensor entry from its JSON description; data region is [base, base+avail). */
static int parse_tensor(ax_st_tensor *t, const char *name, json_t *d, const uint8_t *base, size_t avail)
{
	json_t *dt = json_object_get(d, "dtype"), *sh = json_object_get(d, "shape");
	json_t *off = json_object_get(d, "data_offsets");
	size_t esize;
	if (!json_is_string(dt) || !json_is_array(sh) || !json_is_array(off) || json_array_size(off) != 2)
		return -EPROTO;
	int dtype = dtype_of(json_string_value(dt), &esize);
	if (dtype < 0 || json_array_size(sh) > 4)
		return -EPROTO;
	t->dtype = (uint32_t)dtype;
	t->ndim = (uint32_t)json_array_size(sh);
	uint64_t count = 1;
	for (uint32_t i = 0; i < t->ndim; i++) {
		json_t *v = json_array_get(sh, i);
		if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > (1ll << 40))
			return -EPROTO;
		t->shape[i] = json_integer_value(v);
		count *= (uint64_t)t->shape[i];
		if (count > (1ull << 40))
			return -EPROTO;
	}
	json_t *b = json_array_get(off, 0), *e = json_array_get(off, 1);
	if (!json_is_integer(b) || !json_is_integer(e))
		return -EPROTO;
	json_int_t bv = json_integer_value(b), ev = json_integer_value(e);
	if (bv < 0 || ev < bv || (uint64_t)ev > avail || (uint64_t)(ev - bv) != count * esize)
		return -EPROTO;
	t->data = base + bv;
	t->bytes = (size_t)(ev - bv);
	t->name = strdup(name);
	return t->name ? 0 : -ENOMEM;
}

static int parse_all(ax_st *st, const uint8_t *buf, size_t len)
{
	if (len < 8)
		return -EPROTO;
	uint64_t hlen = 0;
	for (int i = 7; i >= 0; i--)
		hlen = (hlen << 8) | buf[i];
	if (hlen > len - 8 || hlen > (100u << 20))
		return -EPROTO;
	json_error_t jerr;
	json_t *root = json_loadb((const char *)buf + 8, hlen, 0, &jerr);
	if (!json_is_object(root)) {
		json_decref(root);
		return -EPROTO;
	}
	st->t = calloc(json_object_size(root) + 1, sizeof *st->t);
	int rc = st->t ? 0 : -ENOMEM;
	const char *key;
	json_t *val;
	json_object_foreach(root, key, val) {
		if (rc)
			break;
		if (!strcmp(key, "__metadata__"))
			continue;
		if (!json_is_object(val)) {
			rc = -EPROTO;
			break;
		}
		rc = parse_tensor(&st->t[st->n], key, val, buf + 8 + hlen, len - 8 - hlen);
		if (!rc)
			st->n++;
	}
	json_decref(root);
	return rc;
}

int ax_st_open_mem(ax_st **out, const void *buf, size_t len)
{
	ax_st *st = calloc(1, sizeof *st);
	if (!st)
		return -ENOMEM;
	int rc = parse_all(st, buf, len);
	if (rc) {
		ax_st_close(st);
		return rc;
	}
	*out = st;
	return 0;
}

int ax_st_open(ax_st **out, const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	struct stat sb;
	int rc = 0;
	void *map = MAP_FAILED;
	if (fstat(fd, &sb) < 0) {
		rc = -errno;
		goto fail;
	}
	if (sb.st_size < 8) {
		rc = -EPROTO;
		goto fail;
	}
	map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (map == MAP_FAILED) {
		rc = -errno;
		goto fail;
	}
	close(fd);
	fd = -1;
	rc = ax_st_open_mem(out, map, (size_t)sb.st_size);
	if (rc)
		goto fail;
	(*out)->map = map;
	(*out)->map_len = (size_t)sb.st_size;
	return 0;
fail:
	if (map != MAP_FAILED)
		munmap(map, (size_t)sb.st_size);
	if (fd >= 0)
		close(fd);
	return rc;
}

void ax_st_close(ax_st *st)
{
	if (!st)
		return;
	for (size_t i = 0; i < st->n; i++)
		free(st->t[i].name);
	free(st->t);
	if (st->map)
		munmap(st->map, st->map_len);
	free(st);
}

const ax_st_tensor *ax_st_find(const ax_st *st, const char *name)
{
	for (size_t i = 0; i < st->n; i++)
		if (!strcmp(st->t[i].name, name))
			return &st->t[i];
	return NULL;
}

size_t ax_st_count(const ax_st *st) { return st->n; }
const ax_st_tensor *ax_st_at(const ax_st *st, size_t i) { return i < st->n ? &st->t[i] : NULL; }
