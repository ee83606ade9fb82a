/*
 * buf.c — ax_buf, the growable byte buffer every encoder appends to. Capacity doubles (from 256 bytes), so a
 * reused buffer stops allocating once it has seen its largest frame.
 */
#include "attnx_proto.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

void ax_buf_init(ax_buf *b)
{
	b->data = NULL;
	b->len = b->cap = 0;
}

void ax_buf_fini(ax_buf *b)
{
	if (!b)
		return;
	free(b->data);
	ax_buf_init(b);
}

void ax_buf_reset(ax_buf *b)
{
	b->len = 0;
}

/* Make room for n more bytes. 0 or -ENOMEM. */
int ax_buf_reserve(ax_buf *b, size_t n)
{
	if (n <= b->cap - b->len)
		return 0;
	if (n > SIZE_MAX / 2 - b->len)
		return -ENOMEM;
	size_t cap = b->cap ? b->cap : 256;
	while (cap - b->len < n)
		cap *= 2;
	uint8_t *d = realloc(b->data, cap);
	if (!d)
		return -ENOMEM;
	b->data = d;
	b->cap = cap;
	return 0;
}

int ax_buf_append(ax_buf *b, const void *p, size_t n)
{
	if (n == 0)
		return 0;
	int rc = ax_buf_reserve(b, n);
	if (rc < 0)
		return rc;
	memcpy(b->data + b->len, p, n);
	b->len += n;
	return 0;
}
