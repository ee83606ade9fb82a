/*
 * scan.c — a structural pre-check of msgpack bytes before msgpack-c unpacks them.
 *
 * Why: msgpack-c allocates a container's slots when it reads the container's header, so 5 bytes claiming an
 * array of 4 billion entries make it ask for ~96 GiB before noticing the input is short. This walk (no
 * allocation, iterative, O(len)) proves the object is complete and well formed, that every container declares no
 * more entries than there are bytes left (each entry takes at least one byte, so what msgpack-c allocates is
 * bounded by the input size), and that nesting is shallow; it also counts the slots msgpack-c will allocate so
 * the caller can size the zone in one chunk.
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

/* What one header byte says: bytes of length field (lenb), fixed payload (fixed), whether the length counts
 * payload bytes (kind 1), array entries (2) or map pairs (3). */
struct head {
	uint8_t lenb, fixed, kind;
};

static struct head head_of(uint8_t b)
{
	if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3)
		return (struct head){0, 0, 0};
	if (b <= 0x8f)
		return (struct head){0, 0, 3};
	if (b <= 0x9f)
		return (struct head){0, 0, 2};
	if (b <= 0xbf)
		return (struct head){0, (uint8_t)(b & 0x1f), 0};
	switch (b) {
	case 0xc4: case 0xd9: return (struct head){1, 0, 1};
	case 0xc5: case 0xda: return (struct head){2, 0, 1};
	case 0xc6: case 0xdb: return (struct head){4, 0, 1};
	case 0xc7: return (struct head){1, 1, 1}; /* ext: length, then a type byte */
	case 0xc8: return (struct head){2, 1, 1};
	case 0xc9: return (struct head){4, 1, 1};
	case 0xca: return (struct head){0, 4, 0};
	case 0xcb: return (struct head){0, 8, 0};
	case 0xcc: case 0xd0: return (struct head){0, 1, 0};
	case 0xcd: case 0xd1: return (struct head){0, 2, 0};
	case 0xce: case 0xd2: return (struct head){0, 4, 0};
	case 0xcf: case 0xd3: return (struct head){0, 8, 0};
	case 0xd4: return (struct head){0, 2, 0};
	case 0xd5: return (struct head){0, 3, 0};
	case 0xd6: return (struct head){0, 5, 0};
	case 0xd7: return (struct head){0, 9, 0};
	case 0xd8: return (struct head){0, 17, 0};
	case 0xdc: return (struct head){2, 0, 2};
	case 0xdd: return (struct head){4, 0, 2};
	case 0xde: return (struct head){2, 0, 3};
	case 0xdf: return (struct head){4, 0, 3};
	}
	return (struct head){0, 0, 255}; /* 0xc1: never used */
}

int ax__mp_scan(const uint8_t *d, size_t len, size_t *end, size_t *n_slots)
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
		struct head h = head_of(b);
		if (h.kind == 255 || h.lenb > len - off)
			return -EBADMSG;
		uint64_t n = h.lenb ? be(d + off, h.lenb) : (b & 0x0f);
		off += h.lenb;
		if (h.kind <= 1) {
			uint64_t skip = h.fixed + (h.kind == 1 ? n : 0);
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
