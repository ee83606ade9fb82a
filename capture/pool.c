/*
 * pool.c — worker threads and the ordered output queue (see pool.h).
 *
 * Three monotonic counters over a ring of `cap` items, all guarded by one mutex: head (next item to pop) ≤
 * next_work (next item a worker may claim) ≤ tail (next free slot). A worker claims the item at next_work if it
 * is an ATTN item (RECORD items are skipped: they are done at commit), runs it without the lock, then marks it
 * done and signals the loop. next_work moves only while a worker scans, so items done at commit (records, inline
 * jobs) can be popped past it while every worker sleeps: a worker first raises it to head. (Until session 5 it did
 * not: after more than `cap` such items, next_work named a slot since reused by a newer index, a worker claimed the
 * newest job through the stale index and another claimed it again through the right one — two threads writing
 * one job's rows at once, seen as a top-k list with every entry twice, which the encoder refused.) Jobs take tens of microseconds to milliseconds, so one lock round trip per job is
 * cheap next to the work. Workers block every signal so SIGINT/SIGTERM reach the daemon's main thread.
 * A job below the inline threshold never reaches a worker: commit runs it on the loop thread (with the loop's own
 * scratch) and queues it done, so the per-token jobs of a small model cost no thread wake-ups at all; workers
 * skip done items. A worker that finishes a job calls the notify hook, which wakes a loop sleeping on the segment.
 */
#include "pool.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attnx_common.h"

struct ax__pool {
	pthread_mutex_t mu;
	pthread_cond_t work_cv;   /* a job was committed, or stopping */
	pthread_cond_t done_cv;   /* an item became done */
	ax__item *items;
	uint32_t cap;
	uint64_t head, next_work, tail;
	uint64_t claims;          /* jobs workers have started (each ATTN item that is not run inline: once) */
	int stopping;
	pthread_t *threads;
	uint32_t n_threads, started;
	uint64_t busy_ns;         /* atomic */
	uint64_t inline_macs;     /* jobs up to this size run at commit on the loop thread (0 = none) */
	ax_attn_scratch *loop_scratch; /* the loop thread's scratch for inline jobs, made on first use */
	void (*notify)(void *);   /* called under mu when a worker's job becomes done */
	void *notify_arg;
};

/* Multiply-adds of a job's scores: visible keys × query heads × head dim. */
static uint64_t job_macs(const ax_attn_job *j)
{
	uint64_t keys = j->position + 1;
	if (j->window > 0 && keys > (uint64_t)j->window)
		keys = (uint64_t)j->window;
	return keys * j->n_q_heads * j->head_dim;
}

static void *worker_main(void *arg)
{
	ax__pool *p = arg;
	ax_attn_scratch *scratch = ax_attn_scratch_new();
	pthread_mutex_lock(&p->mu);
	for (;;) {
		if (p->next_work < p->head) /* everything below head is done and popped: its slots may hold newer items */
			p->next_work = p->head;
		while (p->next_work < p->tail && (p->items[p->next_work % p->cap].kind != AX_ITEM_ATTN ||
						  p->items[p->next_work % p->cap].done))
			p->next_work++; /* records and inline jobs are done at commit */
		if (p->next_work == p->tail) {
			if (p->stopping)
				break;
			pthread_cond_wait(&p->work_cv, &p->mu);
			continue;
		}
		ax__item *it = &p->items[p->next_work++ % p->cap];
		p->claims++;
		pthread_mutex_unlock(&p->mu);
		uint64_t t0 = ax_now_ns();
		int err = scratch ? ax_attn_cpu(&it->job, scratch, it->res) : -ENOMEM;
		__atomic_fetch_add(&p->busy_ns, ax_now_ns() - t0, __ATOMIC_RELAXED);
		pthread_mutex_lock(&p->mu);
		it->err = err;
		it->done = 1;
		pthread_cond_signal(&p->done_cv);
		if (p->notify)
			p->notify(p->notify_arg);
	}
	pthread_mutex_unlock(&p->mu);
	ax_attn_scratch_free(scratch);
	return NULL;
}

static int start_workers(ax__pool *p)
{
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	int rv = 0;
	for (; p->started < p->n_threads; p->started++)
		if (pthread_create(&p->threads[p->started], NULL, worker_main, p) != 0) {
			rv = -EAGAIN;
			break;
		}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return rv;
}

int ax__pool_open(ax__pool **out, uint32_t n_threads, uint32_t cap)
{
	if (n_threads == 0 || cap < 2)
		return -EINVAL;
	ax__pool *p = calloc(1, sizeof *p);
	if (p == NULL)
		return -ENOMEM;
	pthread_mutex_init(&p->mu, NULL);
	pthread_cond_init(&p->work_cv, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&p->done_cv, &ca);
	pthread_condattr_destroy(&ca);
	p->cap = cap;
	p->n_threads = n_threads;
	p->items = calloc(cap, sizeof *p->items);
	p->threads = calloc(n_threads, sizeof *p->threads);
	int rv = -ENOMEM;
	if (p->items == NULL || p->threads == NULL)
		goto fail;
	if ((rv = start_workers(p)) < 0)
		goto fail;
	*out = p;
	return 0;
fail:
	ax__pool_close(p);
	return rv;
}

void ax__pool_close(ax__pool *p)
{
	if (p == NULL)
		return;
	pthread_mutex_lock(&p->mu);
	p->stopping = 1;
	p->next_work = p->tail; /* queued jobs are abandoned: the loop has stopped consuming */
	pthread_cond_broadcast(&p->work_cv);
	pthread_mutex_unlock(&p->mu);
	for (uint32_t i = 0; i < p->started; i++)
		pthread_join(p->threads[i], NULL);
	for (uint32_t i = 0; p->items && i < p->cap; i++) {
		if (p->items[i].rec) {
			ax_record_fini(p->items[i].rec);
			free(p->items[i].rec);
		}
		free(p->items[i].res);
	}
	ax_attn_scratch_free(p->loop_scratch);
	free(p->items);
	free(p->threads);
	pthread_cond_destroy(&p->work_cv);
	pthread_cond_destroy(&p->done_cv);
	pthread_mutex_destroy(&p->mu);
	free(p);
}

ax__item *ax__pool_reserve(ax__pool *p)
{
	pthread_mutex_lock(&p->mu);
	int full = p->tail - p->head >= p->cap;
	uint64_t tail = p->tail;
	pthread_mutex_unlock(&p->mu);
	if (full)
		return NULL;
	ax__item *it = &p->items[tail % p->cap];
	it->done = 0;
	it->err = 0;
	it->n_res = 0;
	return it;
}

int ax__pool_item_results(ax__item *it, uint32_t rows)
{
	if (rows <= it->res_cap)
		return 0;
	ax_attn_result *r = realloc(it->res, (size_t)rows * sizeof *r);
	if (r == NULL)
		return -ENOMEM;
	it->res = r;
	it->res_cap = rows;
	return 0;
}

/* Run a small ATTN item now, on the loop thread (the item is not yet visible to workers). 1 if it ran. */
static int run_inline(ax__pool *p, ax__item *it)
{
	if (p->inline_macs == 0 || job_macs(&it->job) > p->inline_macs)
		return 0;
	if (p->loop_scratch == NULL && (p->loop_scratch = ax_attn_scratch_new()) == NULL)
		return 0; /* out of memory: a worker (with its own scratch) will try */
	uint64_t t0 = ax_now_ns();
	it->err = ax_attn_cpu(&it->job, p->loop_scratch, it->res);
	__atomic_fetch_add(&p->busy_ns, ax_now_ns() - t0, __ATOMIC_RELAXED);
	return 1;
}

void ax__pool_commit(ax__pool *p)
{
	/* tail is written only by this thread, so reading it unlocked here is exact. */
	ax__item *it = &p->items[p->tail % p->cap];
	int ran = it->kind == AX_ITEM_ATTN && run_inline(p, it);
	pthread_mutex_lock(&p->mu);
	if (it->kind != AX_ITEM_ATTN || ran)
		it->done = 1;
	p->tail++;
	if (it->kind == AX_ITEM_ATTN && !ran)
		pthread_cond_signal(&p->work_cv);
	pthread_mutex_unlock(&p->mu);
}

void ax__pool_set_inline(ax__pool *p, uint64_t max_macs) { p->inline_macs = max_macs; }

void ax__pool_set_notify(ax__pool *p, void (*fn)(void *arg), void *arg)
{
	pthread_mutex_lock(&p->mu);
	p->notify = fn;
	p->notify_arg = arg;
	pthread_mutex_unlock(&p->mu);
}

ax__item *ax__pool_head(ax__pool *p)
{
	pthread_mutex_lock(&p->mu);
	ax__item *it = (p->head < p->tail && p->items[p->head % p->cap].done) ? &p->items[p->head % p->cap] : NULL;
	pthread_mutex_unlock(&p->mu);
	return it;
}

void ax__pool_pop(ax__pool *p)
{
	pthread_mutex_lock(&p->mu);
	ax__item *it = &p->items[p->head % p->cap];
	ax_record *rec = it->rec;
	it->rec = NULL;
	it->kind = 0;
	p->head++;
	pthread_mutex_unlock(&p->mu);
	if (rec) {
		ax_record_fini(rec);
		free(rec);
	}
}

uint64_t ax__pool_claims(ax__pool *p)
{
	pthread_mutex_lock(&p->mu);
	uint64_t n = p->claims;
	pthread_mutex_unlock(&p->mu);
	return n;
}

uint32_t ax__pool_count(ax__pool *p)
{
	pthread_mutex_lock(&p->mu);
	uint32_t n = (uint32_t)(p->tail - p->head);
	pthread_mutex_unlock(&p->mu);
	return n;
}

int ax__pool_wait_head(ax__pool *p, uint64_t timeout_ns)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	uint64_t ns = (uint64_t)ts.tv_nsec + timeout_ns;
	ts.tv_sec += (time_t)(ns / 1000000000ull);
	ts.tv_nsec = (long)(ns % 1000000000ull);
	pthread_mutex_lock(&p->mu);
	int ready;
	while (!(ready = p->head < p->tail && p->items[p->head % p->cap].done))
		if (pthread_cond_timedwait(&p->done_cv, &p->mu, &ts) != 0)
			break;
	ready = p->head < p->tail && p->items[p->head % p->cap].done;
	pthread_mutex_unlock(&p->mu);
	return ready;
}

uint64_t ax__pool_busy_ns(ax__pool *p) { return __atomic_load_n(&p->busy_ns, __ATOMIC_RELAXED); }
