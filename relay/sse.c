/*
 * sse.c — incremental Server-Sent-Events parser for upstream streams (the WHATWG event-stream format, reduced to
 * what OpenAI streams use).
 *
 * Bytes arrive in arbitrary pieces from libcurl. Complete lines (ended by \n, \r\n or \r) are processed; a partial
 * line is carried to the next feed. `data:` lines accumulate (joined by \n); a blank line dispatches the event.
 * Comments (":...") and other fields (event, id, retry) are ignored: the relay re-emits events as plain data.
 */
#include "relay_int.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define SSE_MAX_LINE (16u << 20)

void ax__sse_init(ax_sse *s)
{
	memset(s, 0, sizeof *s);
}

void ax__sse_fini(ax_sse *s)
{
	free(s->line);
	free(s->data);
	memset(s, 0, sizeof *s);
}

static int grow(char **buf, size_t *cap, size_t need)
{
	if (need <= *cap)
		return 0;
	if (need > SSE_MAX_LINE)
		return -EMSGSIZE;
	size_t c = *cap ? *cap : 256;
	while (c < need)
		c *= 2;
	char *p = realloc(*buf, c);
	if (!p)
		return -ENOMEM;
	*buf = p;
	*cap = c;
	return 0;
}

static int dispatch(ax_sse *s, ax_sse_cb cb, void *arg)
{
	if (!s->has_data)
		return 0;
	s->has_data = 0;
	size_t n = s->dlen;
	s->dlen = 0;
	s->data[n] = '\0';
	return cb(s->data, n, arg);
}

/* One complete line (without its terminator). */
static int line(ax_sse *s, const char *p, size_t n, ax_sse_cb cb, void *arg)
{
	if (n == 0)
		return dispatch(s, cb, arg);
	if (n < 5 || memcmp(p, "data", 4) != 0 || (p[4] != ':'))
		return 0; /* comment or another field */
	p += 5;
	n -= 5;
	if (n && *p == ' ') {
		p++;
		n--;
	}
	int rc = grow(&s->data, &s->dcap, s->dlen + n + 2);
	if (rc)
		return rc;
	if (s->has_data)
		s->data[s->dlen++] = '\n';
	memcpy(s->data + s->dlen, p, n);
	s->dlen += n;
	s->has_data = 1;
	return 0;
}

int ax__sse_feed(ax_sse *s, const char *p, size_t n, ax_sse_cb cb, void *arg)
{
	size_t i = 0;
	if (s->last_cr && n && p[0] == '\n')
		i = 1;
	s->last_cr = n && p[n - 1] == '\r';
	while (i < n) {
		const char *e = memchr(p + i, '\n', n - i);
		const char *r = memchr(p + i, '\r', e ? (size_t)(e - (p + i)) : n - i);
		if (r)
			e = r;
		if (!e) { /* partial line: carry it */
			int rc = grow(&s->line, &s->lcap, s->llen + (n - i) + 1);
			if (rc)
				return rc;
			memcpy(s->line + s->llen, p + i, n - i);
			s->llen += n - i;
			return 0;
		}
		size_t m = (size_t)(e - (p + i));
		int rc;
		if (s->llen) {
			if ((rc = grow(&s->line, &s->lcap, s->llen + m + 1)))
				return rc;
			memcpy(s->line + s->llen, p + i, m);
			rc = line(s, s->line, s->llen + m, cb, arg);
			s->llen = 0;
		} else {
			rc = line(s, p + i, m, cb, arg);
		}
		if (rc)
			return rc;
		i += m + 1;
		if (*e == '\r' && i < n && p[i] == '\n')
			i++;
	}
	return 0;
}

int ax__sse_finish(ax_sse *s, ax_sse_cb cb, void *arg)
{
	int rc = 0;
	if (s->llen) {
		rc = line(s, s->line, s->llen, cb, arg);
		s->llen = 0;
	}
	if (!rc)
		rc = dispatch(s, cb, arg);
	return rc;
}
