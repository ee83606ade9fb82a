/*
 * batch.c — ax_batch: records packed once into a frame body, the frame header written in front at the end.
 *
 * The body buffer starts with AX__HDR (5) reserved bytes, the size of the largest msgpack array header
 * (array32). ax_batch_finish writes the smallest header that fits the count right-aligned into that gap, swaps
 * the body and frame buffers (no copy of the packed records) and hands out a pointer to where the header begins.
 * A batch is full at max_records records or max_bytes body bytes; ax_batch_due adds the deadline; the frame never
 * exceeds AX_PROTO_MAX_FRAME bytes or AX_PROTO_MAX_RECORDS records (ax_batch_add refuses instead).
 */
#include "proto_internal.h"

#include "attnx_common.h"

#include <errno.h>

#define AX__HDR 5

void ax_batch_init(ax_batch *b)
{
	ax_buf_init(&b->body);
	ax_buf_init(&b->frame);
	b->count = 0;
	b->max_records = 512;
	b->max_bytes = 256u << 10;
	b->max_delay_ns = 1000000;
	b->first_ns = 0;
}

void ax_batch_fini(ax_batch *b)
{
	if (!b)
		return;
	ax_buf_fini(&b->body);
	ax_buf_fini(&b->frame);
	b->count = 0;
}

static int full(const ax_batch *b)
{
	uint32_t max_rec = b->max_records && b->max_records < AX_PROTO_MAX_RECORDS ? b->max_records : AX_PROTO_MAX_RECORDS;
	size_t max_bytes = b->max_bytes && b->max_bytes < AX_PROTO_MAX_FRAME ? b->max_bytes : AX_PROTO_MAX_FRAME;
	return b->count >= max_rec || b->body.len - AX__HDR >= max_bytes;
}

int ax_batch_add(ax_batch *b, const ax_record *r)
{
	if (b->count >= AX_PROTO_MAX_RECORDS)
		return -ENOBUFS;
	if (b->count == 0) {
		b->body.len = 0;
		int rc = ax_buf_reserve(&b->body, AX__HDR);
		if (rc < 0)
			return rc;
		b->body.len = AX__HDR;
	}
	size_t mark = b->body.len;
	int rc = ax_record_pack(r, &b->body);
	if (rc == 0 && b->body.len > AX_PROTO_MAX_FRAME) {
		b->body.len = mark;
		rc = -EMSGSIZE;
	}
	if (rc < 0)
		return rc;
	if (b->count++ == 0)
		b->first_ns = ax_now_ns();
	return full(b);
}

int ax_batch_due(const ax_batch *b, uint64_t now_ns)
{
	if (b->count == 0)
		return 0;
	return full(b) || (now_ns >= b->first_ns && now_ns - b->first_ns >= b->max_delay_ns);
}

int ax_batch_finish(ax_batch *b, const uint8_t **data, size_t *len)
{
	uint32_t n = b->count;
	if (n == 0) {
		*data = NULL;
		*len = 0;
		return 0;
	}
	uint8_t *p = b->body.data;
	size_t off;
	if (n <= 15) {
		off = 4;
		p[4] = (uint8_t)(0x90 | n);
	} else if (n <= 0xffff) {
		off = 2;
		p[2] = 0xdc, p[3] = (uint8_t)(n >> 8), p[4] = (uint8_t)n;
	} else {
		off = 0;
		p[0] = 0xdd, p[1] = (uint8_t)(n >> 24), p[2] = (uint8_t)(n >> 16), p[3] = (uint8_t)(n >> 8), p[4] = (uint8_t)n;
	}
	ax_buf t = b->frame;
	b->frame = b->body;
	b->body = t;
	b->body.len = 0;
	b->count = 0;
	*data = b->frame.data + off;
	*len = b->frame.len - off;
	return (int)n;
}
