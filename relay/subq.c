/*
 * subq.c — what a WebSocket client is sent: refcounted message blobs, the bounded per-client queue, and the
 * subscribe filter.
 *
 * The loop thread renders a record once (JSON text or msgpack) into a blob and pushes a reference into the queue
 * of every client whose filter matches. A queue is a fixed ring: pushing never blocks; when the ring is full the
 * oldest blob is dropped and counted, and the client's writer thread, which pops, learns the count before its next
 * item so that it can send a `gap` record first. A slow client therefore loses its own oldest records and never
 * holds up the loop or the other clients.
 */
#include "relay_int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

ax_blob *ax__blob_new(const void *p, size_t len, int binary, uint64_t t_ns)
{
	ax_blob *b = malloc(sizeof *b + len + 1);
	if (!b)
		return NULL;
	atomic_init(&b->refs, 1);
	b->binary = binary;
	b->t_ns = t_ns;
	b->len = len;
	memcpy(b->data, p, len);
	b->data[len] = '\0';
	return b;
}

void ax__blob_ref(ax_blob *b)
{
	atomic_fetch_add(&b->refs, 1);
}

void ax__blob_unref(ax_blob *b)
{
	if (b && atomic_fetch_sub(&b->refs, 1) == 1)
		free(b);
}

int ax__subq_init(ax_subq *q, uint32_t cap)
{
	memset(q, 0, sizeof *q);
	if (cap == 0)
		return -EINVAL;
	q->ring = calloc(cap, sizeof *q->ring);
	if (!q->ring)
		return -ENOMEM;
	q->cap = cap;
	pthread_mutex_init(&q->mu, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&q->cv, &ca);
	pthread_condattr_destroy(&ca);
	return 0;
}

void ax__subq_fini(ax_subq *q)
{
	if (!q->ring)
		return;
	for (uint32_t i = 0; i < q->count; i++)
		ax__blob_unref(q->ring[(q->head + i) % q->cap]);
	free(q->ring);
	pthread_mutex_destroy(&q->mu);
	pthread_cond_destroy(&q->cv);
	memset(q, 0, sizeof *q);
}

int ax__subq_push(ax_subq *q, ax_blob *b)
{
	int dropped = 0;
	pthread_mutex_lock(&q->mu);
	if (q->closed) {
		pthread_mutex_unlock(&q->mu);
		return -EPIPE;
	}
	if (q->count == q->cap) {
		ax__blob_unref(q->ring[q->head]);
		q->head = (q->head + 1) % q->cap;
		q->count--;
		q->dropped++;
		q->dropped_total++;
		dropped = 1;
	}
	ax__blob_ref(b);
	q->ring[(q->head + q->count) % q->cap] = b;
	q->count++;
	pthread_cond_signal(&q->cv);
	pthread_mutex_unlock(&q->mu);
	return dropped;
}

static void deadline_after(struct timespec *ts, int ms)
{
	clock_gettime(CLOCK_MONOTONIC, ts);
	ts->tv_sec += ms / 1000;
	ts->tv_nsec += (long)(ms % 1000) * 1000000L;
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
}

int ax__subq_pop(ax_subq *q, int timeout_ms, ax_blob **out, uint64_t *dropped)
{
	struct timespec ts;
	int rc = 0;
	*out = NULL;
	*dropped = 0;
	if (timeout_ms >= 0)
		deadline_after(&ts, timeout_ms);
	pthread_mutex_lock(&q->mu);
	while (!q->count && !q->dropped && !q->closed && rc == 0)
		rc = timeout_ms < 0 ? pthread_cond_wait(&q->cv, &q->mu) : pthread_cond_timedwait(&q->cv, &q->mu, &ts);
	if (q->dropped) {
		*dropped = q->dropped;
		q->dropped = 0;
		rc = 1;
	} else if (q->count) {
		*out = q->ring[q->head];
		q->head = (q->head + 1) % q->cap;
		q->count--;
		rc = 1;
	} else {
		rc = q->closed ? -EPIPE : 0;
	}
	pthread_mutex_unlock(&q->mu);
	return rc;
}

void ax__subq_close(ax_subq *q)
{
	pthread_mutex_lock(&q->mu);
	q->closed = 1;
	pthread_cond_broadcast(&q->cv);
	pthread_mutex_unlock(&q->mu);
}

/* ------------------------------------------------------------------ subscribe filter */

static int filter_fail(char *err, size_t errlen, const char *what)
{
	if (err && errlen)
		snprintf(err, errlen, "%s", what);
	return -EINVAL;
}

/* A list field: absent/null → untouched; else an array of at most AX_FILTER_MAX items. */
static json_t *list_field(json_t *o, const char *key, int *bad)
{
	json_t *a = json_object_get(o, key);
	if (!a || json_is_null(a))
		return NULL;
	if (!json_is_array(a) || json_array_size(a) > AX_FILTER_MAX) {
		*bad = 1;
		return NULL;
	}
	return a;
}

static int parse_lists(json_t *o, ax_filter *f, char *err, size_t errlen)
{
	int bad = 0;
	size_t i;
	json_t *e, *a;
	if ((a = list_field(o, "rids", &bad)))
		json_array_foreach(a, i, e) {
			if (!json_is_string(e) || strlen(json_string_value(e)) >= AX_PROTO_STR)
				return filter_fail(err, errlen, "'rids' must be a list of strings");
			snprintf(f->rids[f->n_rids++], AX_PROTO_STR, "%s", json_string_value(e));
		}
	if ((a = list_field(o, "layers", &bad)))
		json_array_foreach(a, i, e) {
			if (!json_is_integer(e))
				return filter_fail(err, errlen, "'layers' must be a list of integers");
			f->layers[f->n_layers++] = (int32_t)json_integer_value(e);
		}
	if ((a = list_field(o, "modes", &bad)))
		json_array_foreach(a, i, e) {
			int m = json_is_string(e) ? ax_mode_parse(json_string_value(e)) : -EINVAL;
			if (m < 0)
				return filter_fail(err, errlen, "'modes' must list mean_logit, mean_prob or heads");
			f->modes[f->n_modes++] = (uint32_t)m;
		}
	if ((a = list_field(o, "types", &bad)))
		json_array_foreach(a, i, e) {
			int t = json_is_string(e) ? ax_rec_type_parse(json_string_value(e)) : -EINVAL;
			if (t < 0)
				return filter_fail(err, errlen, "'types' must list record type names");
			f->types[f->n_types++] = (uint32_t)t;
		}
	return bad ? filter_fail(err, errlen, "filter lists must be arrays of at most 64 items") : 0;
}

int ax__filter_parse(const char *text, size_t len, ax_filter *f, char *err, size_t errlen)
{
	memset(f, 0, sizeof *f);
	json_t *o = json_loadb(text, len, 0, NULL);
	int rc = -EBADMSG;
	if (!json_is_object(o)) {
		filter_fail(err, errlen, "subscribe message must be a JSON object");
		goto done;
	}
	json_t *t = json_object_get(o, "type");
	if (t && (!json_is_string(t) || strcmp(json_string_value(t), "subscribe") != 0)) {
		rc = filter_fail(err, errlen, "'type' must be \"subscribe\"");
		goto done;
	}
	json_t *fmt = json_object_get(o, "format");
	if (fmt && !json_is_null(fmt)) {
		const char *s = json_is_string(fmt) ? json_string_value(fmt) : "";
		if (strcmp(s, "msgpack") != 0 && strcmp(s, "json") != 0) {
			rc = filter_fail(err, errlen, "'format' must be \"json\" or \"msgpack\"");
			goto done;
		}
		f->msgpack = strcmp(s, "msgpack") == 0;
	}
	rc = parse_lists(o, f, err, errlen);
done:
	json_decref(o);
	if (rc)
		memset(f, 0, sizeof *f);
	return rc;
}

int ax__filter_empty(const ax_filter *f)
{
	return !f->n_rids && !f->n_layers && !f->n_modes && !f->n_types;
}

static int has_rid(int type)
{
	return type == AX_REC_REQ || type == AX_REC_ATTN || type == AX_REC_END || type == AX_REC_POLICY;
}

int ax__filter_match(const ax_filter *f, const ax_record *r)
{
	uint32_t i;
	if (f->n_types) {
		for (i = 0; i < f->n_types && f->types[i] != (uint32_t)r->type; i++)
			;
		if (i == f->n_types)
			return 0;
	}
	if (f->n_rids && has_rid(r->type)) {
		for (i = 0; i < f->n_rids && strcmp(f->rids[i], r->rid) != 0; i++)
			;
		if (i == f->n_rids)
			return 0;
	}
	if (r->type != AX_REC_ATTN)
		return 1;
	if (f->n_layers) {
		for (i = 0; i < f->n_layers && f->layers[i] != r->u.attn.layer_id; i++)
			;
		if (i == f->n_layers)
			return 0;
	}
	if (f->n_modes) {
		for (i = 0; i < f->n_modes && f->modes[i] != r->u.attn.mode; i++)
			;
		if (i == f->n_modes)
			return 0;
	}
	return 1;
}
