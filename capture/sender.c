/*
 * sender.c — numbering, batching and non-blocking sending of records over nng PUSH (see sender.h).
 *
 * State: one open ax_batch (records packed, not yet a frame) and a circular queue of sealed frames, each an
 * nng_msg with the seq range it carries. The queue head is what goes out next. nng_sendmsg with NONBLOCK either
 * takes the head (nng then owns the message) or says EAGAIN (no connected relay, or its queue is full), in which
 * case the frame stays. Dropping replaces the oldest data frame(s) by a gap frame at the head (see sender.h), so
 * at most one gap frame exists and it always precedes the frames that follow the hole. Counters are updated with
 * relaxed atomics so another thread may read them.
 */
#include "sender.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <nng/nng.h>
#include <nng/protocol/pipeline0/push.h>

#include "attnx_common.h"

#define TAG "capture.send"
#define STAT_ADD(s, f, n) __atomic_fetch_add(&(s)->st.f, (n), __ATOMIC_RELAXED)

typedef struct frame {
	nng_msg *msg;
	uint64_t first_seq;  /* seq of its first record */
	uint64_t last_seq;   /* seq of its last record (a gap frame: the gap record's own seq) */
	uint32_t n;          /* records in the frame */
	int is_gap;          /* 1 = a send_full gap frame covering [gap_from, last_seq + 1) */
	uint64_t gap_from;
	uint64_t born_ns;    /* CLOCK_MONOTONIC when sealed */
} frame;

struct ax__sender {
	nng_socket sock;
	int sock_open;
	char src[AX_PROTO_STR];
	ax_batch batch;            /* records not yet sealed */
	uint64_t batch_first_seq;
	ax_batch gbatch;           /* builds gap frames */
	ax_record grec;
	frame *q;                  /* pending frames, circular */
	uint32_t cap, head, len;
	uint64_t next_seq;
	uint64_t pending_max_ns;
	int warned_full;
	ax__sender_stats st;
};

static int nng_to_errno(int rv)
{
	switch (rv) {
	case 0: return 0;
	case NNG_ENOMEM: return -ENOMEM;
	case NNG_EINVAL: return -EINVAL;
	case NNG_EADDRINVAL: return -EINVAL;
	case NNG_ENOTSUP: return -EINVAL;
	case NNG_EAGAIN: return -EAGAIN;
	default: return -EIO;
	}
}

static frame *q_at(ax__sender *s, uint32_t i) { return &s->q[(s->head + i) % s->cap]; }

static void q_pop(ax__sender *s)
{
	s->head = (s->head + 1) % s->cap;
	s->len--;
}

static nng_msg *make_msg(const uint8_t *data, size_t len)
{
	nng_msg *m;
	if (nng_msg_alloc(&m, len) != 0)
		return NULL;
	memcpy(nng_msg_body(m), data, len);
	return m;
}

/* A one-record frame holding the send_full gap for [from, to); the record takes seq to-1. */
static nng_msg *make_gap_msg(ax__sender *s, uint64_t from, uint64_t to)
{
	ax_record *r = &s->grec;
	ax_record_init(r, AX_REC_GAP);
	r->v = AX_PROTO_VERSION;
	memcpy(r->src, s->src, sizeof r->src);
	r->seq = to - 1;
	r->ts_ns = ax_wall_ns();
	snprintf(r->u.gap.what, sizeof r->u.gap.what, "records");
	snprintf(r->u.gap.reason, sizeof r->u.gap.reason, "send_full");
	r->u.gap.count = to - from;
	r->u.gap.from_seq = from;
	r->u.gap.to_seq = to;
	const uint8_t *data;
	size_t len;
	if (ax_batch_add(&s->gbatch, r) < 0 || ax_batch_finish(&s->gbatch, &data, &len) <= 0)
		return NULL;
	return make_msg(data, len);
}

/* Drop the oldest data frame (merging a gap frame at the head into the new gap) and put a gap frame first. */
static void drop_oldest(ax__sender *s, uint64_t now_ns)
{
	if (s->len == 0 || (s->len == 1 && q_at(s, 0)->is_gap))
		return;
	uint64_t from = q_at(s, 0)->is_gap ? q_at(s, 0)->gap_from : q_at(s, 0)->first_seq;
	if (q_at(s, 0)->is_gap) {
		nng_msg_free(q_at(s, 0)->msg);
		q_pop(s);
	}
	frame *d = q_at(s, 0);
	uint64_t to = d->last_seq + 1;
	STAT_ADD(s, dropped, d->n);
	STAT_ADD(s, dropped_frames, 1);
	nng_msg_free(d->msg);
	q_pop(s);
	if (!s->warned_full) {
		ax_log(AX_LOG_WARN, TAG, "relay not taking records: dropping oldest (seq %llu..%llu)",
		       (unsigned long long)from, (unsigned long long)(to - 1));
		s->warned_full = 1;
	}
	nng_msg *m = make_gap_msg(s, from, to);
	if (m == NULL) {
		ax_log(AX_LOG_ERROR, TAG, "cannot build a gap frame: records %llu..%llu lost unreported",
		       (unsigned long long)from, (unsigned long long)(to - 1));
		return;
	}
	STAT_ADD(s, gaps, 1);
	s->head = (s->head + s->cap - 1) % s->cap;
	s->len++;
	*q_at(s, 0) = (frame){.msg = m, .first_seq = to - 1, .last_seq = to - 1, .n = 1, .is_gap = 1,
			      .gap_from = from, .born_ns = now_ns};
}

/* Send pending frames, head first, while nng takes them. */
static void try_send(ax__sender *s)
{
	while (s->len > 0) {
		frame *h = q_at(s, 0);
		int rv = nng_sendmsg(s->sock, h->msg, NNG_FLAG_NONBLOCK);
		if (rv == 0) {
			STAT_ADD(s, frames, 1);
			STAT_ADD(s, sent_records, h->n);
			if (s->warned_full && !h->is_gap)
				s->warned_full = 0;
			q_pop(s);
			continue;
		}
		if (rv == NNG_EAGAIN || rv == NNG_ETIMEDOUT)
			return;
		ax_log(AX_LOG_ERROR, TAG, "nng send: %s", nng_strerror(rv));
		if (h->is_gap) {
			nng_msg_free(h->msg);
			q_pop(s);
		} else {
			drop_oldest(s, ax_now_ns());
		}
		return;
	}
}

/* Turn the open batch into a pending frame. */
static void seal(ax__sender *s, uint64_t now_ns)
{
	const uint8_t *data;
	size_t len;
	int n = ax_batch_finish(&s->batch, &data, &len);
	if (n <= 0)
		return;
	/* Dropping a data frame puts a gap frame in its place; a second drop merges them and frees a slot. */
	for (int i = 0; i < 2 && s->len == s->cap; i++)
		drop_oldest(s, now_ns);
	frame f = {.first_seq = s->batch_first_seq, .last_seq = s->batch_first_seq + (uint64_t)n - 1,
		   .n = (uint32_t)n, .born_ns = now_ns};
	f.msg = make_msg(data, len);
	if (f.msg == NULL || s->len == s->cap) {
		/* Out of memory (or, unreachable with cap ≥ 2, no room after a drop): the hole stays unreported. */
		ax_log(AX_LOG_ERROR, TAG, "cannot queue a frame of %d records (seq %llu..)", n,
		       (unsigned long long)f.first_seq);
		if (f.msg)
			nng_msg_free(f.msg);
		STAT_ADD(s, dropped, (uint64_t)n);
		return;
	}
	*q_at(s, s->len) = f;
	s->len++;
}

int ax__sender_open(ax__sender **out, const ax__sender_cfg *cfg)
{
	if (cfg->addr == NULL || cfg->src == NULL || cfg->max_pending < 2 || strlen(cfg->src) >= AX_PROTO_STR)
		return -EINVAL;
	ax__sender *s = calloc(1, sizeof *s);
	int rv = -ENOMEM;
	if (s == NULL)
		return -ENOMEM;
	s->q = calloc(cfg->max_pending, sizeof *s->q);
	if (s->q == NULL)
		goto fail;
	s->cap = cfg->max_pending;
	s->pending_max_ns = cfg->pending_max_ns;
	memcpy(s->src, cfg->src, strlen(cfg->src) + 1);
	ax_batch_init(&s->batch);
	ax_batch_init(&s->gbatch);
	if (cfg->batch_records)
		s->batch.max_records = cfg->batch_records;
	if (cfg->batch_bytes)
		s->batch.max_bytes = cfg->batch_bytes;
	if (cfg->batch_delay_ns)
		s->batch.max_delay_ns = cfg->batch_delay_ns;
	if ((rv = nng_to_errno(nng_push0_open(&s->sock))) < 0)
		goto fail;
	s->sock_open = 1;
	nng_socket_set_ms(s->sock, NNG_OPT_RECONNMINT, 50);
	nng_socket_set_ms(s->sock, NNG_OPT_RECONNMAXT, 500);
	int nrv = nng_dial(s->sock, cfg->addr, NULL, NNG_FLAG_NONBLOCK);
	if (nrv != 0) {
		ax_log(AX_LOG_ERROR, TAG, "cannot dial %s: %s", cfg->addr, nng_strerror(nrv));
		rv = nng_to_errno(nrv);
		goto fail;
	}
	*out = s;
	return 0;
fail:
	ax__sender_close(s);
	return rv;
}

int ax__sender_add(ax__sender *s, ax_record *r)
{
	r->v = AX_PROTO_VERSION;
	memcpy(r->src, s->src, sizeof r->src);
	r->seq = s->next_seq;
	r->ts_ns = ax_wall_ns();
	if (s->batch.count == 0)
		s->batch_first_seq = s->next_seq;
	int rv = ax_batch_add(&s->batch, r);
	if ((rv == -EMSGSIZE || rv == -ENOBUFS) && s->batch.count > 0) { /* the frame is full: seal, retry */
		seal(s, ax_now_ns());
		try_send(s);
		s->batch_first_seq = s->next_seq;
		rv = ax_batch_add(&s->batch, r);
	}
	if (rv < 0) {
		STAT_ADD(s, rejected, 1);
		return rv;
	}
	s->next_seq++;
	STAT_ADD(s, records, 1);
	if (rv == 1) {
		seal(s, ax_now_ns());
		try_send(s);
	}
	return 0;
}

void ax__sender_poll(ax__sender *s, uint64_t now_ns)
{
	if (ax_batch_due(&s->batch, now_ns))
		seal(s, now_ns);
	try_send(s);
	while (s->pending_max_ns && s->len > 0) {
		frame *old = q_at(s, 0)->is_gap ? (s->len > 1 ? q_at(s, 1) : NULL) : q_at(s, 0);
		/* A frame sealed after the caller read its clock is newer than now_ns: young, not 2^64 ns old. */
		if (old == NULL || now_ns <= old->born_ns || now_ns - old->born_ns <= s->pending_max_ns)
			break;
		drop_oldest(s, now_ns);
	}
}

uint32_t ax__sender_flush(ax__sender *s, uint64_t timeout_ns)
{
	uint64_t deadline = ax_now_ns() + timeout_ns;
	seal(s, ax_now_ns());
	for (;;) {
		try_send(s);
		if (s->len == 0 || ax_now_ns() >= deadline)
			return s->len;
		struct timespec ts = {0, 1000000};
		nanosleep(&ts, NULL);
	}
}

/* Frames nng refused (no relay yet, or its queue full) are offered again this often while the loop sleeps. */
#define RETRY_NS 2000000ull

uint64_t ax__sender_due_in(const ax__sender *s, uint64_t now_ns)
{
	uint64_t t = s->len ? RETRY_NS : UINT64_MAX;
	if (s->batch.count) {
		uint64_t due = s->batch.first_ns + s->batch.max_delay_ns;
		uint64_t d = due > now_ns ? due - now_ns : 0;
		if (d < t)
			t = d;
	}
	return t;
}

uint32_t ax__sender_pending(const ax__sender *s) { return s->len; }

uint64_t ax__sender_next_seq(const ax__sender *s) { return s->next_seq; }

void ax__sender_get_stats(const ax__sender *s, ax__sender_stats *out)
{
	const uint64_t *src = (const uint64_t *)&s->st;
	uint64_t *dst = (uint64_t *)out;
	for (size_t i = 0; i < sizeof *out / sizeof(uint64_t); i++)
		dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

void ax__sender_close(ax__sender *s)
{
	if (s == NULL)
		return;
	uint64_t lost = 0;
	for (uint32_t i = 0; i < s->len; i++) {
		lost += q_at(s, i)->is_gap ? 0 : q_at(s, i)->n;
		nng_msg_free(q_at(s, i)->msg);
	}
	lost += s->batch.count;
	if (lost)
		ax_log(AX_LOG_WARN, TAG, "closing with %llu records the relay never took",
		       (unsigned long long)lost);
	if (s->sock_open)
		nng_close(s->sock);
	ax_batch_fini(&s->batch);
	ax_batch_fini(&s->gbatch);
	free(s->q);
	free(s);
}
