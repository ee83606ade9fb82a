/*
 * tail_core.c — filters, per-source seq hole tracking and msgpack stream framing for attnx-tail.
 *
 * The hole tracker keeps a small array of pending holes per source. A forward jump in seq opens a hole; a gap record
 * trims holes (a range may split one hole in two); late records trim them too. Holes are reported only when they
 * outlive the grace period or at flush, so a gap record that follows its hole (the usual order: the sender learns of
 * the loss, then says so) silences it. See tail_core.h for the rules. Recordings are split with proto's
 * ax_frame_span (a walk over the bytes, no allocation), and frame headers are written by hand.
 */
#include "tail_core.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


/* ---- filters ---------------------------------------------------------------------------------------------- */

int ax_tail_filter_add_rid(ax_tail_filter *f, const char *rid)
{
	if (f->n_rids >= AX_TAIL_MAX_FILTER)
		return -ENOSPC;
	if (!rid[0] || strlen(rid) >= AX_PROTO_STR)
		return -EINVAL;
	strcpy(f->rids[f->n_rids++], rid);
	return 0;
}

int ax_tail_filter_add_layer(ax_tail_filter *f, const char *layer)
{
	char *end;
	long v;

	if (f->n_layers >= AX_TAIL_MAX_FILTER)
		return -ENOSPC;
	errno = 0;
	v = strtol(layer, &end, 10);
	if (errno || end == layer || *end || v < 0 || v > INT32_MAX)
		return -EINVAL;
	f->layers[f->n_layers++] = (int32_t)v;
	return 0;
}

int ax_tail_filter_add_type(ax_tail_filter *f, const char *type)
{
	int t = ax_rec_type_parse(type);

	if (t < 0)
		return -EINVAL;
	if (f->n_types >= AX_TAIL_MAX_FILTER)
		return -ENOSPC;
	f->types[f->n_types++] = t;
	return 0;
}

int ax_tail_filter_active(const ax_tail_filter *f)
{
	return f->n_rids || f->n_layers || f->n_types;
}

static int has_rid(int type)
{
	return type == AX_REC_REQ || type == AX_REC_ATTN || type == AX_REC_END || type == AX_REC_POLICY;
}

int ax_tail_filter_match(const ax_tail_filter *f, const ax_record *r)
{
	uint32_t i;
	int ok;

	if (f->n_types) {
		for (ok = 0, i = 0; i < f->n_types && !ok; i++)
			ok = f->types[i] == r->type;
		if (!ok)
			return 0;
	}
	if (f->n_rids && has_rid(r->type)) {
		for (ok = 0, i = 0; i < f->n_rids && !ok; i++)
			ok = !strcmp(f->rids[i], r->rid);
		if (!ok)
			return 0;
	}
	if (f->n_layers && r->type == AX_REC_ATTN) {
		for (ok = 0, i = 0; i < f->n_layers && !ok; i++)
			ok = f->layers[i] == r->u.attn.layer_id;
		if (!ok)
			return 0;
	}
	return 1;
}

/* ---- seq hole tracking ------------------------------------------------------------------------------------ */

void ax_tail_seq_init(ax_tail_seq *t, ax_tail_hole_cb cb, void *arg)
{
	memset(t, 0, sizeof *t);
	t->grace_ns = 1000000000ull;
	t->restart_window = 65536;
	t->cb = cb;
	t->cb_arg = arg;
}

void ax_tail_seq_fini(ax_tail_seq *t)
{
	free(t->srcs);
	t->srcs = NULL;
	t->n = t->cap = 0;
}

const ax_tail_src *ax_tail_seq_find(const ax_tail_seq *t, const char *src)
{
	for (uint32_t i = 0; i < t->n; i++)
		if (!strcmp(t->srcs[i].src, src))
			return &t->srcs[i];
	return NULL;
}

static ax_tail_src *src_get(ax_tail_seq *t, const char *src, int *fresh)
{
	ax_tail_src *s = (ax_tail_src *)ax_tail_seq_find(t, src);

	*fresh = 0;
	if (s)
		return s;
	if (t->n == t->cap) {
		uint32_t cap = t->cap ? 2 * t->cap : 8;
		ax_tail_src *n = realloc(t->srcs, cap * sizeof *n);
		if (!n)
			return NULL;
		t->srcs = n;
		t->cap = cap;
	}
	s = &t->srcs[t->n++];
	memset(s, 0, sizeof *s);
	snprintf(s->src, sizeof s->src, "%s", src);
	*fresh = 1;
	return s;
}

static void hole_drop(ax_tail_src *s, uint32_t i)
{
	memmove(&s->pending[i], &s->pending[i + 1], (s->n_pending - i - 1) * sizeof s->pending[0]);
	s->n_pending--;
}

static void hole_report(ax_tail_seq *t, ax_tail_src *s, uint32_t i)
{
	ax_tail_hole *h = &s->pending[i];

	s->holes++;
	s->lost += h->to - h->from;
	if (t->cb)
		t->cb(s->src, h->from, h->to, t->cb_arg);
	hole_drop(s, i);
}

/* Remove [from, to) from the pending holes; returns how many missing seqs it accounted for. */
static uint64_t holes_cut(ax_tail_seq *t, ax_tail_src *s, uint64_t from, uint64_t to)
{
	uint64_t cut = 0;

	for (uint32_t i = 0; i < s->n_pending;) {
		ax_tail_hole *h = &s->pending[i];
		uint64_t lo = from > h->from ? from : h->from, hi = to < h->to ? to : h->to;
		if (lo >= hi) {
			i++;
			continue;
		}
		cut += hi - lo;
		if (lo == h->from && hi == h->to) {
			hole_drop(s, i);
			continue;
		}
		if (lo == h->from) {
			h->from = hi;
		} else if (hi == h->to) {
			h->to = lo;
		} else if (s->n_pending < AX_TAIL_MAX_PENDING) { /* split */
			memmove(&s->pending[i + 2], &s->pending[i + 1], (s->n_pending - i - 1) * sizeof *h);
			s->pending[i + 1] = (ax_tail_hole){hi, h->to, h->seen_ns};
			h->to = lo;
			s->n_pending++;
			i++;
		} else { /* no room to split: the right part is reported now as uncovered, the left stays pending */
			s->holes++;
			s->lost += h->to - hi;
			if (t->cb)
				t->cb(s->src, hi, h->to, t->cb_arg);
			h->to = lo;
		}
		i++;
	}
	return cut;
}

/* A gap record about "records" without a seq range covers up to `count` pending seqs, oldest first. */
static uint64_t holes_cut_count(ax_tail_src *s, uint64_t count)
{
	uint64_t cut = 0;

	while (count && s->n_pending) {
		ax_tail_hole *h = &s->pending[0];
		uint64_t n = h->to - h->from < count ? h->to - h->from : count;
		h->from += n;
		count -= n;
		cut += n;
		if (h->from == h->to)
			hole_drop(s, 0);
	}
	return cut;
}

static void observe_gap(ax_tail_seq *t, ax_tail_src *s, const ax_rec_gap *g)
{
	s->gaps++;
	if (g->to_seq > g->from_seq)
		s->covered += holes_cut(t, s, g->from_seq, g->to_seq);
	else if (!strcmp(g->what, "records"))
		s->covered += holes_cut_count(s, g->count);
}

static void hole_open(ax_tail_seq *t, ax_tail_src *s, uint64_t from, uint64_t to, uint64_t now_ns)
{
	if (s->n_pending == AX_TAIL_MAX_PENDING)
		hole_report(t, s, 0);
	s->pending[s->n_pending++] = (ax_tail_hole){from, to, now_ns};
}

static void observe_seq(ax_tail_seq *t, ax_tail_src *s, uint64_t seq, uint64_t now_ns)
{
	if (seq == s->next) {
		s->next++;
	} else if (seq > s->next) {
		hole_open(t, s, s->next, seq, now_ns);
		s->next = seq + 1;
	} else if (s->next - seq > t->restart_window) {
		s->restarts++;
		s->next = seq + 1;
	} else if (holes_cut(t, s, seq, seq + 1)) {
		s->late++;
	} else {
		s->dups++;
	}
}

int ax_tail_seq_observe(ax_tail_seq *t, const ax_record *r, uint64_t now_ns)
{
	int fresh;
	ax_tail_src *s = src_get(t, r->src, &fresh);

	if (!s)
		return -ENOMEM;
	s->records++;
	if (fresh) {
		s->first_seq = r->seq;
		s->next = r->seq + 1;
	} else {
		observe_seq(t, s, r->seq, now_ns);
	}
	if (r->type == AX_REC_GAP)
		observe_gap(t, s, &r->u.gap);
	return 0;
}

int ax_tail_seq_expire(ax_tail_seq *t, uint64_t now_ns, int all)
{
	int reported = 0;

	for (uint32_t i = 0; i < t->n; i++) {
		ax_tail_src *s = &t->srcs[i];
		while (s->n_pending && (all || now_ns - s->pending[0].seen_ns >= t->grace_ns)) {
			hole_report(t, s, 0);
			reported++;
		}
	}
	return reported;
}

/* ---- msgpack stream framing ------------------------------------------------------------------------------- */

int ax_tail_next_frame(const void *data, size_t len, size_t *frame_len)
{
	return ax_frame_span(data, len, frame_len);
}

int ax_tail_frame_wrap(const ax_buf *body, uint32_t count, ax_buf *out)
{
	uint8_t h[5];
	size_t n;

	if (count < 16) { /* the smallest msgpack array header, as ax_batch writes */
		h[0] = (uint8_t)(0x90 | count);
		n = 1;
	} else if (count <= 0xffff) {
		h[0] = 0xdc, h[1] = (uint8_t)(count >> 8), h[2] = (uint8_t)count;
		n = 3;
	} else {
		h[0] = 0xdd, h[1] = (uint8_t)(count >> 24), h[2] = (uint8_t)(count >> 16);
		h[3] = (uint8_t)(count >> 8), h[4] = (uint8_t)count;
		n = 5;
	}
	if (ax_buf_append(out, h, n))
		return -ENOMEM;
	return body->len ? ax_buf_append(out, body->data, body->len) : 0;
}
