/*
 * bench_forward.c — time ax_model_forward alone (no HTTP, no scheduler): decode steps at batch 1 and 8 and one
 * prefill chunk, on a checkpoint directory (default models/attnx-tiny). A dev tool for the matmul work recorded
 * in engine/BENCH.md; scripts/bench-engine measures the whole server.
 *
 *   bench_forward [--model DIR] [--threads N] [--steps N] [--prompt N]
 *
 * Each figure is the median over --steps timed forwards (after 3 warm-up ones) of tokens / wall time.
 */
#include "attnx_engine.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

typedef struct bench {
	ax_model *m;
	ax_kv *kv;
	ax_pool *pool;
	ax_fwd_scratch *s;
	float *logits;
	int ctx;
} bench;

/* Median tokens/s of `steps` forwards of `batch` sequences of n tokens each (decode: n = 1, growing pos). */
static double run(bench *b, int batch, int n, int steps)
{
	const ax_model_config *c = ax_model_cfg(b->m);
	ax_fwd_seq seqs[64];
	int32_t *toks = malloc((size_t)batch * n * sizeof *toks);
	double *t = malloc((size_t)steps * sizeof *t);
	for (int i = 0; i < batch * n; i++)
		toks[i] = 100 + (i * 37) % (c->vocab - 100);
	int pos = 0;
	for (int it = -3; it < steps; it++) {
		if (pos + n > b->ctx) {
			for (int r = 0; r < batch; r++)
				ax_kv_release(b->kv, r, b->ctx);
			pos = 0;
		}
		for (int r = 0; r < batch; r++) {
			if (ax_kv_alloc(b->kv, r, pos, n)) {
				fprintf(stderr, "kv alloc failed\n");
				exit(1);
			}
			seqs[r] = (ax_fwd_seq){r, pos, n, toks + (size_t)r * n, 1};
		}
		double t0 = now_s();
		if (ax_model_forward(b->m, b->kv, b->pool, b->s, seqs, batch, b->logits, NULL, NULL)) {
			fprintf(stderr, "forward failed\n");
			exit(1);
		}
		if (it >= 0)
			t[it] = now_s() - t0;
		pos += n;
	}
	for (int r = 0; r < batch; r++)
		ax_kv_release(b->kv, r, b->ctx);
	qsort(t, (size_t)steps, sizeof *t, cmp_d);
	double med = t[steps / 2];
	free(t);
	free(toks);
	return batch * n / med;
}

int main(int argc, char **argv)
{
	const char *dir = "models/attnx-tiny";
	int threads = 0, steps = 50, prompt = 512;
	static const struct option lo[] = {{"model", 1, 0, 'm'}, {"threads", 1, 0, 't'}, {"steps", 1, 0, 's'},
					   {"prompt", 1, 0, 'p'}, {0, 0, 0, 0}};
	int o;
	while ((o = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		if (o == 'm') dir = optarg;
		else if (o == 't') threads = atoi(optarg);
		else if (o == 's') steps = atoi(optarg);
		else if (o == 'p') prompt = atoi(optarg);
		else return 2;
	}
	bench b = {.ctx = 1024};
	if (prompt > b.ctx || steps < 1)
		return 2;
	if (ax_model_open(&b.m, dir) || ax_pool_open(&b.pool, threads)) {
		fprintf(stderr, "cannot open %s\n", dir);
		return 1;
	}
	const ax_model_config *c = ax_model_cfg(b.m);
	ax_kv_config kc = {c->n_layers, c->n_kv_heads, c->head_dim, 8u * b.ctx, 8, b.ctx, NULL, NULL};
	if (ax_kv_open(&b.kv, &kc) || ax_fwd_scratch_open(&b.s, b.m, prompt > 8 ? prompt : 8, ax_pool_threads(b.pool)))
		return 1;
	b.logits = malloc(8 * (size_t)c->vocab * sizeof(float));
	printf("%s, %d threads: decode b1 %.0f tok/s, decode b8 %.0f tok/s", dir, ax_pool_threads(b.pool),
	       run(&b, 1, 1, steps), run(&b, 8, 1, steps));
	printf(", prefill %d %.0f tok/s\n", prompt, run(&b, 1, prompt, steps / 10 > 3 ? steps / 10 : 3));
	free(b.logits);
	ax_fwd_scratch_close(b.s);
	ax_kv_close(b.kv);
	ax_pool_close(b.pool);
	ax_model_close(b.m);
	return 0;
}
