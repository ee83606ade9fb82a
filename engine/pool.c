/*
 * pool.c — a fixed pthread pool for data-parallel loops (matmul rows, attention heads).
 *
 * The caller of ax_pool_run is worker 0; workers 1..n-1 sleep on a condition variable until a new generation
 * of work is posted, take their contiguous chunk of [0, n), and count down `pending`; the caller runs its own
 * chunk and then waits for pending to reach zero. One job at a time (the scheduler thread is the only caller),
 * so the job fields need no more than the mutex that publishes them.
 */
#include "attnx_engine.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

struct ax_pool {
	int n;                 /* workers including the caller */
	pthread_t *th;
	pthread_mutex_t mu;
	pthread_cond_t go, done;
	uint64_t gen;          /* job generation */
	int pending;           /* workers still running the current job */
	int quit;
	ax_pool_fn fn;
	void *ctx;
	int items;
};

typedef struct worker_arg {
	ax_pool *p;
	int tid;
} worker_arg;

static void chunk(int items, int n, int tid, int *i0, int *i1)
{
	int base = items / n, rem = items % n;
	*i0 = tid * base + (tid < rem ? tid : rem);
	*i1 = *i0 + base + (tid < rem ? 1 : 0);
}

static void *worker(void *arg)
{
	worker_arg *wa = arg;
	ax_pool *p = wa->p;
	int tid = wa->tid;
	free(wa);
	uint64_t seen = 0;
	pthread_mutex_lock(&p->mu);
	for (;;) {
		while (!p->quit && p->gen == seen)
			pthread_cond_wait(&p->go, &p->mu);
		if (p->quit)
			break;
		seen = p->gen;
		ax_pool_fn fn = p->fn;
		void *ctx = p->ctx;
		int i0, i1;
		chunk(p->items, p->n, tid, &i0, &i1);
		pthread_mutex_unlock(&p->mu);
		if (i1 > i0)
			fn(ctx, i0, i1, tid);
		pthread_mutex_lock(&p->mu);
		if (--p->pending == 0)
			pthread_cond_signal(&p->done);
	}
	pthread_mutex_unlock(&p->mu);
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
	for (int i = 1; i < threads; i++) {
		worker_arg *wa = malloc(sizeof *wa);
		if (wa) {
			wa->p = p;
			wa->tid = i;
		}
		if (!wa || pthread_create(&p->th[i], NULL, worker, wa)) {
			free(wa);
			p->n = i; /* run with the workers we have */
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
	p->quit = 1;
	pthread_cond_broadcast(&p->go);
	pthread_mutex_unlock(&p->mu);
	for (int i = 1; i < p->n; i++)
		pthread_join(p->th[i], NULL);
	pthread_cond_destroy(&p->go);
	pthread_cond_destroy(&p->done);
	pthread_mutex_destroy(&p->mu);
	free(p->th);
	free(p);
}

int ax_pool_threads(const ax_pool *p) { return p ? p->n : 1; }

void ax_pool_run(ax_pool *p, ax_pool_fn fn, void *ctx, int n)
{
	if (n <= 0)
		return;
	if (!p || p->n == 1 || n == 1) {
		fn(ctx, 0, n, 0);
		return;
	}
	pthread_mutex_lock(&p->mu);
	p->fn = fn;
	p->ctx = ctx;
	p->items = n;
	p->pending = p->n - 1;
	p->gen++;
	pthread_cond_broadcast(&p->go);
	pthread_mutex_unlock(&p->mu);
	int i0, i1;
	chunk(n, p->n, 0, &i0, &i1);
	if (i1 > i0)
		fn(ctx, i0, i1, 0);
	pthread_mutex_lock(&p->mu);
	while (p->pending > 0)
		pthread_cond_wait(&p->done, &p->mu);
	pthread_mutex_unlock(&p->mu);
}
