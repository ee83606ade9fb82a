/*
 * scan.c — walking msgpack bytes without decoding them: the structural pre-check of a frame (ax__mp_scan) and
 * skipping values (ax__mp_skip).
 *
 * Why a pre-check: a frame is delivered record by record, and a frame that is not even well-formed msgpack must
 * deliver none (-EBADMSG before the first callback), so the whole frame is proven complete and well formed before
 * any record is decoded. The walk (no allocation, iterative, O(len)) also proves that every container declares no
 * more entries than there are bytes left (each entry takes at least one byte) and that nesting is shallow. One
 * table says what each head byte is; scalars whose size the head byte alone fixes (fixint, fixstr, numbers, nil,
 * booleans, fixext: nearly every value of a record) cost a lookup, a bounds check and an add. The values still
 * to walk at the current level live in a register; outer levels wait on a 16-deep stack. The decoder (unpack.c)
 * still bounds-checks every read on its own. The same walk tells a recording reader (ax_frame_span) whether bytes
 * are missing (the value is not complete yet) or wrong.
 */
#include "proto_internal.h"

#include <errno.h>

static uint64_t be(const uint8_t *p, int n)
{
	uint64_t v = 0;
	for (int i = 0; i < n; i++)
		v = (v << 8) | p[i];
	return v;
}

#define FIXSTR8(b) [b] = (b) & 0x1f, [b + 1] = (b + 1) & 0x1f, [b + 2] = (b + 2) & 0x1f, [b + 3] = (b + 3) & 0x1f, \
	[b + 4] = (b + 4) & 0x1f, [b + 5] = (b + 5) & 0x1f, [b + 6] = (b + 6) & 0x1f, [b + 7] = (b + 7) & 0x1f
const int8_t ax__mp_head[256] = {
	[0x00 ... 0x7f] = 0, [0xe0 ... 0xff] = 0,   /* fixints */
	[0x80 ... 0x8f] = AX__H_FIXMAP, [0x90 ... 0x9f] = AX__H_FIXARRAY,
	FIXSTR8(0xa0), FIXSTR8(0xa8), FIXSTR8(0xb0), FIXSTR8(0xb8),
	[0xc0] = 0, [0xc1] = AX__H_BAD, [0xc2] = 0, [0xc3] = 0,
	[0xc4 ... 0xc9] = AX__H_VAR,                /* bin8/16/32, ext8/16/32 */
	[0xca] = 4, [0xcb] = 8, [0xcc] = 1, [0xcd] = 2, [0xce] = 4, [0xcf] = 8,
	[0xd0] = 1, [0xd1] = 2, [0xd2] = 4, [0xd3] = 8,
	[0xd4] = 2, [0xd5] = 3, [0xd6] = 5, [0xd7] = 9, [0xd8] = 17, /* fixext: type byte + data */
	[0xd9 ... 0xdb] = AX__H_VAR,                /* str8/16/32 */
	[0xdc ... 0xdf] = AX__H_BIG,                /* array16/32, map16/32 */
};

/* A head that is not a fixed-size scalar (b taken, *pp after it): moves *pp past a variable-size scalar or past a
 * container's header, setting *entries (values inside: 2 per map pair). 0 scalar, 1 container, -EAGAIN (the bytes
 * end first, or a container claims more entries than bytes follow), -EBADMSG (0xc1). */
static int step_slow(uint8_t b, int h, const uint8_t **pp, const uint8_t *end, uint64_t *entries)
{
	const uint8_t *p = *pp;
	size_t left = (size_t)(end - p);
	uint64_t n;
	int lb;
	switch (h) {
	case AX__H_FIXMAP: n = 2 * (uint64_t)(b & 0x0f); break;
	case AX__H_FIXARRAY: n = b & 0x0f; break;
	case AX__H_VAR: { /* 0xc4..c6 bin, 0xc7..c9 ext (+ type byte), 0xd9..db str */
		int idx = b >= 0xd9 ? b - 0xd9 : (b - 0xc4) % 3;
		lb = 1 << idx;
		if ((size_t)lb > left)
			return -EAGAIN;
		n = be(p, lb) + (b >= 0xc7 && b <= 0xc9);
		if (n > left - (size_t)lb)
			return -EAGAIN;
		*pp = p + lb + n;
		return 0;
	}
	case AX__H_BIG:
		lb = (b & 1) ? 4 : 2;
		if ((size_t)lb > left)
			return -EAGAIN;
		n = be(p, lb) << (b >= 0xde);
		p += lb;
		left -= (size_t)lb;
		break;
	default: return -EBADMSG; /* 0xc1 */
	}
	if (n > left)
		return -EAGAIN;
	*pp = p;
	*entries = n;
	return 1;
}

/* The walk: 0, -EAGAIN (the bytes end before the value does), -EBADMSG (0xc1, nesting too deep). */
static int scan(const uint8_t *d, size_t len, size_t *end)
{
	uint64_t outer[AX__MAX_DEPTH]; /* values left at the enclosing levels */
	uint64_t rem = 1;              /* values left at this level */
	int depth = 0;
	const uint8_t *p = d, *e = d + len;
	for (;;) {
		if (rem == 0) {
			if (depth == 0)
				break;
			rem = outer[--depth];
			continue;
		}
		rem--;
		if (p == e)
			return -EAGAIN;
		uint8_t b = *p++;
		/* The next object's address depends on this one's size: keep that chain short for the common heads
		 * (a size computed from the byte itself, not loaded from the table). */
		if ((uint8_t)(b - 0xa0) < 0x20) { /* fixstr: keys, names */
			if ((size_t)(b & 0x1f) > (size_t)(e - p))
				return -EAGAIN;
			p += b & 0x1f;
			continue;
		}
		int h = ax__mp_head[b];
		if (h >= 0) {
			if ((size_t)h > (size_t)(e - p))
				return -EAGAIN;
			p += h;
			continue;
		}
		uint64_t entries;
		int rc = step_slow(b, h, &p, e, &entries);
		if (rc < 0)
			return rc;
		if (rc == 1) {
			if (depth == AX__MAX_DEPTH)
				return -EBADMSG;
			outer[depth++] = rem;
			rem = entries;
		}
	}
	*end = (size_t)(p - d);
	return 0;
}

int ax__mp_scan(const uint8_t *d, size_t len, size_t *end)
{
	int rc = scan(d, len, end);
	return rc == -EAGAIN ? -EBADMSG : rc;
}

int ax_frame_span(const void *data, size_t len, size_t *frame_len)
{
	size_t end;
	if (!data || len == 0)
		return 0;
	int rc = scan(data, len, &end);
	if (rc == -EAGAIN)
		return 0;
	if (rc < 0)
		return rc;
	*frame_len = end;
	return 1;
}

const uint8_t *ax__mp_skip(const uint8_t *p, const uint8_t *end, uint64_t n)
{
	while (n) {
		n--;
		if (p == end)
			return NULL;
		uint8_t b = *p++;
		int h = ax__mp_head[b];
		if (h >= 0) {
			if ((size_t)h > (size_t)(end - p))
				return NULL;
			p += h;
			continue;
		}
		uint64_t entries;
		int rc = step_slow(b, h, &p, end, &entries);
		if (rc < 0)
			return NULL;
		if (rc == 1)
			n += entries; /* entries ≤ bytes left, so n stays far from overflowing */
	}
	return p;
}
