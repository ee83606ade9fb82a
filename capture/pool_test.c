/*
 * pool_test.c — the capture's worker pool (pool.h) on its own: items come out in order, every queued job is run
 * by exactly one worker, inline jobs by none.
 *
 * The stale-claim case: with the workers asleep, more than `cap` jobs small enough to run inline at commit are
 * committed and popped (head passes next_work by more than the ring), then two long jobs are queued. Before the
 * fix in session 5 a worker reached the newest job through a stale index and a second worker claimed it again
 * (two threads writing one job's rows at once); the claim count catches that, and the rows are checked against a
 * run of the same job on this thread.
 */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "attnx_shm.h"
#include "pool.h"

enum { H = 4, HKV = 2, D = 64, BIG = 120000 };

typedef struct jobdata {
	float *k, q[H * D];
	int32_t *idx;
} jobdata;

static uint64_t g_rng = 0x51ce;
static float rndf(void)
{
	g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
	return (float)(g_rng >> 40) / (float)(1u << 24) * 2.0f - 1.0f;
}

static void data_make(jobdata *d)
{
	d->k = malloc((size_t)BIG * HKV * D * sizeof(float));
	d->idx = malloc((size_t)BIG * sizeof(int32_t));
	assert_true(d->k && d->idx);
	for (size_t i = 0; i < (size_t)BIG * HKV * D; i++)
		d->k[i] = rndf();
	for (uint32_t i = 0; i < BIG; i++)
		d->idx[i] = (int32_t)(BIG - 1 - i);
	for (int i = 0; i < H * D; i++)
		d->q[i] = rndf();
}

/* A heads job over the first n keys (n = 2: inline; n = BIG: ~31 M multiply-adds, milliseconds). */
static ax_attn_job job_of(const jobdata *d, uint32_t n)
{
	ax_attn_job j;
	memset(&j, 0, sizeof j);
	j.q = d->q, j.q_dtype = AX_DTYPE_F32, j.k = d->k, j.k_dtype = AX_DTYPE_F32, j.k_scale = 1;
	j.k_stride[0] = HKV * D, j.k_stride[1] = D, j.k_stride[2] = 1, j.n_slots = BIG;
	j.index = d->idx, j.index_dtype = AX_DTYPE_I32, j.position = n - 1;
	j.n_q_heads = H, j.n_kv_heads = HKV, j.head_dim = D, j.scale = 0.125f;
	j.mode = AX_MODE_HEADS, j.top_k = 16;
	return j;
}

static ax__item *queue_job(ax__pool *p, const ax_attn_job *j)
{
	ax__item *it = ax__pool_reserve(p);
	assert_non_null(it);
	it->kind = AX_ITEM_ATTN;
	it->job = *j;
	it->n_res = ax_attn_rows(j);
	assert_int_equal(ax__pool_item_results(it, it->n_res), 0);
	ax__pool_commit(p);
	return it;
}

/* Wait for the head item, check its rows against `want` (when given), pop it. */
static void pop_checked(ax__pool *p, const ax_attn_result *want)
{
	for (int i = 0; i < 2000 && !ax__pool_wait_head(p, 10 * 1000 * 1000ull); i++)
		;
	ax__item *it = ax__pool_head(p);
	assert_non_null(it);
	assert_int_equal(it->err, 0);
	for (uint32_t r = 0; want && r < it->n_res; r++) {
		assert_int_equal(it->res[r].k, want[r].k);
		assert_true(it->res[r].lse == want[r].lse);
		for (uint32_t e = 0; e < want[r].k; e++) {
			assert_int_equal(it->res[r].pos[e], want[r].pos[e]);
			assert_true(it->res[r].logit[e] == want[r].logit[e]);
		}
	}
	ax__pool_pop(p);
}

static void test_stale_claim(void **state)
{
	(void)state;
	jobdata d;
	data_make(&d);
	const ax_attn_job small = job_of(&d, 2), big = job_of(&d, BIG);
	ax_attn_scratch *s = ax_attn_scratch_new();
	ax_attn_result want[H];
	assert_int_equal(ax_attn_cpu(&big, s, want), 0);

	enum { CAP = 4 };
	ax__pool *p = NULL;
	assert_int_equal(ax__pool_open(&p, 2, CAP), 0);
	ax__pool_set_inline(p, 10000); /* the small jobs (2 keys × 4 heads × 64) run at commit */
	struct timespec ts = {0, 20 * 1000 * 1000};
	nanosleep(&ts, NULL); /* both workers asleep */
	for (int i = 0; i < 3 * CAP + 1; i++) { /* head passes the sleeping workers' next_work by more than CAP */
		queue_job(p, &small);
		pop_checked(p, NULL);
	}
	assert_int_equal(ax__pool_claims(p), 0);
	queue_job(p, &big);
	queue_job(p, &big);
	pop_checked(p, want);
	pop_checked(p, want);
	nanosleep(&ts, NULL); /* a worker that claimed a job twice would have started it by now */
	assert_int_equal(ax__pool_claims(p), 2);
	assert_int_equal(ax__pool_count(p), 0);
	ax__pool_close(p);
	ax_attn_scratch_free(s);
	free(d.k), free(d.idx);
}

/* Many mixed items through a small ring: order kept, every queued job claimed once, rows right. */
static void test_mixed_order(void **state)
{
	(void)state;
	jobdata d;
	data_make(&d);
	ax_attn_scratch *s = ax_attn_scratch_new();
	ax__pool *p = NULL;
	assert_int_equal(ax__pool_open(&p, 3, 8), 0);
	ax__pool_set_inline(p, 10000);
	uint64_t queued = 0;
	for (int round = 0; round < 40; round++) {
		const uint32_t n = round % 3 == 0 ? 2 : 200 + (uint32_t)round * 97;
		const ax_attn_job j = job_of(&d, n);
		ax_attn_result want[H];
		assert_int_equal(ax_attn_cpu(&j, s, want), 0);
		queue_job(p, &j);
		queued += n != 2;
		pop_checked(p, want);
	}
	assert_int_equal(ax__pool_claims(p), queued);
	ax__pool_close(p);
	ax_attn_scratch_free(s);
	free(d.k), free(d.idx);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_stale_claim),
		cmocka_unit_test(test_mixed_order),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
