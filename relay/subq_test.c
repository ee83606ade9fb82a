/*
 * subq_test.c — WebSocket client queues and filters: FIFO order, overflow drops the oldest and reports the count
 * before the next item (the writer's cue for a `gap` record), close wakes a waiting consumer, a blocked consumer
 * in another thread, refcounts, subscribe parsing (good and bad messages) and matching.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "relay_int.h"

static ax_blob *blob(int i)
{
	char s[16];
	int n = snprintf(s, sizeof s, "%d", i);
	return ax__blob_new(s, (size_t)n, 0, 0);
}

static void fifo(void **state)
{
	ax_subq q;
	assert_int_equal(ax__subq_init(&q, 4), 0);
	for (int i = 0; i < 3; i++) {
		ax_blob *b = blob(i);
		assert_int_equal(ax__subq_push(&q, b), 0);
		ax__blob_unref(b);
	}
	for (int i = 0; i < 3; i++) {
		ax_blob *b;
		uint64_t d;
		assert_int_equal(ax__subq_pop(&q, 0, &b, &d), 1);
		assert_int_equal(d, 0);
		assert_int_equal(atoi(b->data), i);
		ax__blob_unref(b);
	}
	ax_blob *b;
	uint64_t d;
	assert_int_equal(ax__subq_pop(&q, 0, &b, &d), 0); /* empty: timeout */
	assert_int_equal(ax__subq_pop(&q, 20, &b, &d), 0);
	ax__subq_fini(&q);
}

static void overflow_gap(void **state)
{
	ax_subq q;
	assert_int_equal(ax__subq_init(&q, 3), 0);
	int dropped = 0;
	for (int i = 0; i < 10; i++) {
		ax_blob *b = blob(i);
		dropped += ax__subq_push(&q, b);
		ax__blob_unref(b);
	}
	assert_int_equal(dropped, 7);
	ax_blob *b;
	uint64_t d;
	assert_int_equal(ax__subq_pop(&q, 0, &b, &d), 1); /* the loss comes first */
	assert_null(b);
	assert_int_equal(d, 7);
	for (int i = 7; i < 10; i++) { /* then the newest records, in order */
		assert_int_equal(ax__subq_pop(&q, 0, &b, &d), 1);
		assert_int_equal(d, 0);
		assert_int_equal(atoi(b->data), i);
		ax__blob_unref(b);
	}
	assert_int_equal(q.dropped_total, 7);
	ax__subq_fini(&q); /* also frees what would still be queued */
}

static void *consumer(void *arg)
{
	ax_subq *q = arg;
	ax_blob *b;
	uint64_t d;
	long got = 0;
	int rc;
	while ((rc = ax__subq_pop(q, -1, &b, &d)) >= 0)
		if (b) {
			got++;
			ax__blob_unref(b);
		}
	return (void *)got;
}

static void close_wakes_consumer(void **state)
{
	ax_subq q;
	pthread_t th;
	assert_int_equal(ax__subq_init(&q, 64), 0);
	assert_int_equal(pthread_create(&th, NULL, consumer, &q), 0);
	for (int i = 0; i < 5; i++) {
		ax_blob *b = blob(i);
		ax__subq_push(&q, b);
		ax__blob_unref(b);
	}
	usleep(20000);
	ax__subq_close(&q);
	void *got;
	pthread_join(th, &got);
	assert_int_equal((long)got, 5);
	ax_blob *b = blob(9);
	assert_int_equal(ax__subq_push(&q, b), -EPIPE);
	ax__blob_unref(b);
	ax__subq_fini(&q);
	assert_int_equal(ax__subq_init(&q, 0), -EINVAL);
}

static void shared_blob(void **state)
{
	ax_subq a, b;
	ax__subq_init(&a, 2);
	ax__subq_init(&b, 2);
	ax_blob *x = blob(1);
	ax__subq_push(&a, x);
	ax__subq_push(&b, x);
	assert_int_equal(atomic_load(&x->refs), 3);
	ax__blob_unref(x);
	ax__subq_fini(&a);
	ax__subq_fini(&b); /* the last reference frees it (ASan checks) */
}

static const struct {
	const char *msg;
	int rc;
} filters[] = {
	{"{\"type\":\"subscribe\"}", 0},
	{"{\"type\":\"subscribe\",\"rids\":[\"a\"],\"layers\":[1,2],\"modes\":[\"heads\"],\"types\":[\"attn\"],"
	 "\"format\":\"msgpack\"}",
	 0},
	{"{}", 0},
	{"nope", -EBADMSG},
	{"[]", -EBADMSG},
	{"{\"type\":\"unsubscribe\"}", -EINVAL},
	{"{\"rids\":\"a\"}", -EINVAL},
	{"{\"rids\":[1]}", -EINVAL},
	{"{\"layers\":[\"x\"]}", -EINVAL},
	{"{\"modes\":[\"max\"]}", -EINVAL},
	{"{\"types\":[\"bogus\"]}", -EINVAL},
	{"{\"format\":\"xml\"}", -EINVAL},
};

static void filter_parse(void **state)
{
	for (size_t i = 0; i < sizeof filters / sizeof *filters; i++) {
		ax_filter f;
		char err[128] = "";
		int rc = ax__filter_parse(filters[i].msg, strlen(filters[i].msg), &f, err, sizeof err);
		if (rc != filters[i].rc)
			fail_msg("case %zu (%s): %d, want %d", i, filters[i].msg, rc, filters[i].rc);
		if (rc)
			assert_true(strlen(err) > 0);
	}
	ax_filter f;
	const char *m = filters[1].msg;
	assert_int_equal(ax__filter_parse(m, strlen(m), &f, NULL, 0), 0);
	assert_true(f.msgpack);
	assert_int_equal(f.n_layers, 2);
	assert_false(ax__filter_empty(&f));
}

static void filter_match(void **state)
{
	ax_filter f;
	const char *m = "{\"rids\":[\"r1\"],\"layers\":[3],\"modes\":[\"mean_logit\"]}";
	assert_int_equal(ax__filter_parse(m, strlen(m), &f, NULL, 0), 0);
	ax_record r;
	ax_record_init(&r, AX_REC_ATTN);
	snprintf(r.rid, sizeof r.rid, "r1");
	r.u.attn.layer_id = 3;
	r.u.attn.mode = AX_MODE_MEAN_LOGIT;
	assert_true(ax__filter_match(&f, &r));
	r.u.attn.layer_id = 4;
	assert_false(ax__filter_match(&f, &r));
	r.u.attn.layer_id = 3;
	r.u.attn.mode = AX_MODE_HEADS;
	assert_false(ax__filter_match(&f, &r));
	r.u.attn.mode = AX_MODE_MEAN_LOGIT;
	snprintf(r.rid, sizeof r.rid, "r2");
	assert_false(ax__filter_match(&f, &r));
	ax_record h;
	ax_record_init(&h, AX_REC_HELLO); /* no rid, no layer: lists do not apply */
	assert_true(ax__filter_match(&f, &h));
	ax_record e;
	ax_record_init(&e, AX_REC_END);
	snprintf(e.rid, sizeof e.rid, "r1");
	assert_true(ax__filter_match(&f, &e));
	const char *t = "{\"types\":[\"gap\"]}";
	assert_int_equal(ax__filter_parse(t, strlen(t), &f, NULL, 0), 0);
	assert_false(ax__filter_match(&f, &h));
	ax_record g;
	ax_record_init(&g, AX_REC_GAP);
	assert_true(ax__filter_match(&f, &g));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(fifo),         cmocka_unit_test(overflow_gap), cmocka_unit_test(close_wakes_consumer),
		cmocka_unit_test(shared_blob),  cmocka_unit_test(filter_parse), cmocka_unit_test(filter_match),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
