/*
 * pool.c — a fixed pthread pool for data-parallel loops (matmul rows, attention heads).
 *
 * The caller of ax_pool_run is worker 0; workers 1..n-1 wait for a new generation of work, take chunks of
 * [0, n) from a shared counter (AX_POOL_GRABS per worker, so a worker that was preempted — by attnx-capture,
 * by another user's process — takes fewer and the others do its share instead of waiting for it), and count
 * down `pending`; the caller takes chunks too and then waits for pending to reach zero. One job at a time (the
 * scheduler thread is the only caller).
 *
 * A forward pass posts ~10 jobs per layer, each a few to a few hundred microseconds long, so the hand-off must
 * cost far less than a futex sleep and wake-up (tens of microseconds, milliseconds on a busy machine). Both
 * sides therefore spin for a short while (AX_POOL_SPIN_NS) on the atomic generation / pending counters and only
 * then sleep on a condition variable. Lost wake-ups are excluded Dekker-style: the poster stores the counter and
 * then reads the sleeper count, the sleeper increments the sleeper count and then re-reads the counter, all
 * seq_cst, and the broadcast happens under the mutex the sleeper checks under.
 *
 * Active workers (ax_pool_set_active): a job may use fewer workers than the pool has, so the engine can leave a
 * core to a consumer process (attnx-capture) while one is attached, and take it back when it goes. The job's
 * worker count travels in the low bits of the generation word (`gen` = seq << 16 | n), so a worker that sees a
 * generation also sees how many workers that job counted in `pending`: a worker with tid ≥ n neither runs nor
 * counts down, and can never mistake a job it was not counted in for one it was. Workers above the active count
 * park on `idle` (a plain condition-variable sleep, no spinning: the core is someone else's now) until
 * ax_pool_set_active raises the count or the pool closes.
 */
#include "attnx_engine.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#ifndef AX_POOL_SPIN_NS /* -D for experiments (BENCH.md: a shorter spin next to a capture) */
#define AX_POOL_SPIN_NS 100000 /* 100 µs: longer than the gaps inside a forward, shorter than a step's idle */
#endif
#ifndef AX_POOL_GRABS /* -D for experiments */
#define AX_POOL_GRABS 4        /* chunks per worker and job: balance against one atomic add per chunk */
#endif
#define AX_GEN_SHIFT 16        /* low bits of `gen`: the job's worker count (≤ 256) */

struct ax_pool {
	int n;                 /* workers including the caller */
	pthread_t *th;
	pthread_mutex_t mu;
	pthread_cond_t go, done, idle;
	atomic_uint_fast64_t gen; /* job generation << AX_GEN_SHIFT | the job's worker count */
	atomic_int active;     /* workers the next jobs use (1..n); written by the caller between jobs */
	atomic_int pending;    /* workers still running the current job */
	atomic_int sleepers;   /* workers asleep (or about to be) on `go` */
	atomic_int caller_asleep; /* the caller sleeps (or is about to) on `done` */
	atomic_int quit;
	ax_pool_fn fn;
	void *ctx;
	int items;
	int grain;             /* items per chunk */
	atomic_int next;       /* first item not yet taken */
};

typedef struct worker_arg {
	ax_pool *p;
	int tid;
} worker_arg;

/* Take chunks of the current job until none is left. */
static void run_chunks(ax_pool *p, int tid)
{
	int items = p->items, grain = p->grain;
	for (;;) {
		int i0 = atomic_fetch_add(&p->next, grain);
		if (i0 >= items)
			return;
		p->fn(p->ctx, i0, i0 + grain < items ? i0 + grain : items, tid);
	}
}

static uint64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#endif
}

/* Spin until done(p) or AX_POOL_SPIN_NS passed; returns 1 if done. After the first ~2 µs each round yields
 * the CPU, so on an oversubscribed machine the thread being waited for can run on this core. */
static int spin_until(int (*done)(ax_pool *), ax_pool *p)
{
	uint64_t t0 = mono_ns();
	for (int i = 0;; i++) {
		if (done(p))
			return 1;
		if (i < 256) {
			cpu_relax();
			continue;
		}
		sched_yield();
		if (mono_ns() - t0 > AX_POOL_SPIN_NS)
			return 0;
	}
}

static _Thread_local uint64_t tl_seen; /* the generation word this worker last saw (0: none yet; jobs start at 1 << 16) */

static int new_work(ax_pool *p) { return atomic_load(&p->gen) != tl_seen || atomic_load(&p->quit); }
static int all_done(ax_pool *p) { return atomic_load(&p->pending) == 0; }

/* A worker above the active count sleeps here until it is needed again (or the pool closes). */
static void park_while_inactive(ax_pool *p, int tid)
{
	if (tid < atomic_load(&p->active) || atomic_load(&p->quit))
		return;
	pthread_mutex_lock(&p->mu);
	while (tid >= atomic_load(&p->active) && !atomic_load(&p->quit))
		pthread_cond_wait(&p->idle, &p->mu);
	pthread_mutex_unlock(&p->mu);
}

static void *worker(void *arg)
{
	worker_arg *wa = arg;
	ax_pool *p = wa->p;
	int tid = wa->tid;
	free(wa);
	tl_seen = 0;
	for (;;) {
		park_while_inactive(p, tid);
		if (!spin_until(new_work, p)) {
			pthread_mutex_lock(&p->mu);
			atomic_fetch_add(&p->sleepers, 1);
			while (!new_work(p))
				pthread_cond_wait(&p->go, &p->mu);
			atomic_fetch_sub(&p->sleepers, 1);
			pthread_mutex_unlock(&p->mu);
		}
		if (atomic_load(&p->quit))
			break;
		tl_seen = atomic_load(&p->gen);
		int jn = (int)(tl_seen & ((1u << AX_GEN_SHIFT) - 1));
		if (tid >= jn)
			continue; /* not counted in this job (fewer active workers): park or wait for the next */
		run_chunks(p, tid);
		if (atomic_fetch_sub(&p->pending, 1) == 1 && atomic_load(&p->caller_asleep)) {
			pthread_mutex_lock(&p->mu);
			pthread_cond_signal(&p->done);
			pthread_mutex_unlock(&p->mu);
		}
	}
	return NULL;
}

int ax_pool_open(ax_pool **out, int threads)
{
	if (threads <= 0) {
		long c = sysconf(_SC_NPROCESSORS_ONLN);
		threads = c > 0 ? (int)c : 1;
	}
	if (threads > 256)
		threads = 256;
	ax_pool *p = calloc(1, sizeof *p);
	if (!p)
		return -ENOMEM;
	p->n = threads;
	p->th = calloc((size_t)threads, sizeof *p->th);
	if (!p->th) {
		free(p);
		return -ENOMEM;
	}
	pthread_mutex_init(&p->mu, NULL);
	pthread_cond_init(&p->go, NULL);
	pthread_cond_init(&p->done, NULL);
	pthread_cond_init(&p->idle, NULL);
	atomic_store(&p->active, threads);
	for (int i = 1; i < threads; i++) {
		worker_arg *wa = malloc(sizeof *wa);
		if (wa) {
			wa->p = p;
			wa->tid = i;
		}
		if (!wa || pthread_create(&p->th[i], NULL, worker, wa)) {
			free(wa);
			p->n = i; /* run with the workers we have */
			atomic_store(&p->active, i);
			break;
		}
	}
	*out = p;
	return 0;
}

void ax_pool_close(ax_pool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->mu);
	atomic_store(&p->quit, 1);
	pthread_cond_broadcast(&p->go);
	pthread_cond_broadcast(&p->idle);
	pthread_mutex_unlock(&p->mu);
	for (int i = 1; i < p->n; i++)
		pthread_join(p->th[i], NULL);
	pthread_cond_destroy(&p->go);
	pthread_cond_destroy(&p->done);
	pthread_cond_destroy(&p->idle);
	pthread_mutex_destroy(&p->mu);
	free(p->th);
	free(p);
}

int ax_pool_threads(const ax_pool *p) { return p ? p->n : 1; }

int ax_pool_active(const ax_pool *p) { return p ? atomic_load(&((ax_pool *)p)->active) : 1; }

int ax_pool_set_active(ax_pool *p, int n)
{
	if (!p)
		return 1;
	if (n < 1)
		n = 1;
	if (n > p->n)
		n = p->n;
	int was = atomic_load(&p->active);
	if (n == was)
		return n;
	pthread_mutex_lock(&p->mu);
	atomic_store(&p->active, n);
	if (n > was) /* wake the parked workers that are needed again */
		pthread_cond_broadcast(&p->idle);
	pthread_mutex_unlock(&p->mu);
	return n;
}

void ax_pool_run(ax_pool *p, ax_pool_fn fn, void *ctx, int n)
{
	if (n <= 0)
		return;
	int jn = p ? atomic_load(&p->active) : 1;
	if (jn == 1 || n == 1) {
		fn(ctx, 0, n, 0);
		return;
	}
	/* Workers read fn/ctx/items only after they see the new generation (seq_cst store below). */
	p->fn = fn;
	p->ctx = ctx;
	p->items = n;
	p->grain = (n + jn * AX_POOL_GRABS - 1) / (jn * AX_POOL_GRABS);
	atomic_store(&p->next, 0);
	atomic_store(&p->pending, jn - 1);
	uint64_t g = atomic_load(&p->gen) >> AX_GEN_SHIFT;
	atomic_store(&p->gen, (g + 1) << AX_GEN_SHIFT | (uint64_t)jn);
	if (atomic_load(&p->sleepers) > 0) {
		pthread_mutex_lock(&p->mu);
		pthread_cond_broadcast(&p->go);
		pthread_mutex_unlock(&p->mu);
	}
	run_chunks(p, 0);
	if (!spin_until(all_done, p)) {
		pthread_mutex_lock(&p->mu);
		atomic_store(&p->caller_asleep, 1);
		while (!all_done(p))
			pthread_cond_wait(&p->done, &p->mu);
		atomic_store(&p->caller_asleep, 0);
		pthread_mutex_unlock(&p->mu);
	}
}
