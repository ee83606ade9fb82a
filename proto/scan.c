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
