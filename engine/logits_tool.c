/*
 * logits_tool.c — engine_logits: attnx-engine's full logit vectors for given token sequences, for comparisons
 * against another implementation (scripts/check-hf-families runs it against transformers).
 *
 *   engine_logits --model DIR [--threads N] < sequences.jsonl > logits.bin
 *
 * Each input line is {"ids": [...], "prefill": P} (1 ≤ P ≤ len(ids)). All sequences run TOGETHER through
 * ax_model_forward, as the scheduler batches requests: one step holds every sequence's first P tokens (one prefill
 * chunk each), then each step holds the next token of every sequence not yet done (decode). So the logits of
 * positions P-1 … len-1 of each sequence come out, the first from the prefill path, the others from decode steps
 * next to other sequences. Output, after every step, for each sequence in the step: int32 sequence index (input
 * line), int32 position, then vocab float32 logits; host byte order. Exit status 0, 1 when the model does not load
 * or a forward fails, 2 on bad input.
 */
#include "attnx_engine.h"

#include "attnx_common.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SEQS 64

typedef struct seq {
	int32_t *ids;
	int n, prefill, done; /* done: tokens already run */
} seq;

/* One input line → s. Returns 0 or -1. */
static int parse_line(const char *line, seq *s, int vocab)
{
	json_t *o = json_loads(line, 0, NULL), *ids = json_object_get(o, "ids"), *p = json_object_get(o, "prefill");
	int ok = json_is_array(ids) && json_array_size(ids) > 0 && json_array_size(ids) < (1u << 20) &&
		 json_is_integer(p);
	memset(s, 0, sizeof *s);
	if (ok) {
		s->n = (int)json_array_size(ids);
		s->prefill = (int)json_integer_value(p);
		s->ids = malloc((size_t)s->n * sizeof *s->ids);
		ok = s->ids && s->prefill >= 1 && s->prefill <= s->n;
		for (int i = 0; ok && i < s->n; i++) {
			json_t *v = json_array_get(ids, (size_t)i);
			ok = json_is_integer(v) && json_integer_value(v) >= 0 && json_integer_value(v) < vocab;
			if (ok)
				s->ids[i] = (int32_t)json_integer_value(v);
		}
	}
	json_decref(o);
	if (!ok) {
		free(s->ids);
		s->ids = NULL;
	}
	return ok ? 0 : -1;
}

typedef struct rig {
	ax_model *m;
	ax_pool *pool;
	ax_kv *kv;
	ax_fwd_scratch *s;
	float *logits;
} rig;

/* Run every sequence to its end, writing the records. Returns 0 or a negative errno. */
static int run_all(rig *r, seq *sq, int n)
{
	int V = ax_model_cfg(r->m)->vocab, left = n, rc = 0;
	ax_fwd_seq fs[MAX_SEQS];
	int which[MAX_SEQS];
	while (left > 0 && !rc) {
		int k = 0;
		for (int i = 0; i < n && !rc; i++) {
			seq *s = &sq[i];
			if (s->done == s->n)
				continue;
			int len = s->done == 0 ? s->prefill : 1;
			rc = ax_kv_alloc(r->kv, i, s->done, len);
			fs[k] = (ax_fwd_seq){i, s->done, len, s->ids + s->done, 1};
			which[k++] = i;
		}
		if (!rc)
			rc = ax_model_forward(r->m, r->kv, r->pool, r->s, fs, k, r->logits, NULL, NULL);
		for (int j = 0; j < k && !rc; j++) {
			seq *s = &sq[which[j]];
			s->done += fs[j].n;
			int32_t hdr[2] = {which[j], s->done - 1};
			if (fwrite(hdr, sizeof hdr, 1, stdout) != 1 ||
			    fwrite(r->logits + (size_t)j * V, sizeof(float), (size_t)V, stdout) != (size_t)V)
				rc = -EIO;
			left -= s->done == s->n;
		}
	}
	return rc;
}

/* KV cache, pool and scratch for the sequences of sq on r->m (open). */
static int open_rig(rig *r, int threads, const seq *sq, int n)
{
	int total = 0, longest = 0, first = 0, rc;
	for (int i = 0; i < n; i++) {
		total += sq[i].n;
		longest = sq[i].n > longest ? sq[i].n : longest;
		first += sq[i].prefill;
	}
	const ax_model_config *c = ax_model_cfg(r->m);
	if (longest > c->max_pos)
		return -E2BIG;
	ax_kv_config kc = {c->n_layers, c->n_kv_heads, c->head_dim, (uint32_t)total, n, longest, NULL, NULL};
	if ((rc = ax_pool_open(&r->pool, threads)) || (rc = ax_kv_open(&r->kv, &kc)) ||
	    (rc = ax_fwd_scratch_open(&r->s, r->m, first > n ? first : n, ax_pool_threads(r->pool))))
		return rc;
	r->logits = malloc((size_t)n * c->vocab * sizeof(float));
	return r->logits ? 0 : -ENOMEM;
}

static void close_rig(rig *r)
{
	free(r->logits);
	ax_fwd_scratch_close(r->s);
	ax_kv_close(r->kv);
	ax_pool_close(r->pool);
	ax_model_close(r->m);
}

int main(int argc, char **argv)
{
	const char *dir = NULL;
	int threads = 0, o;
	static const struct option lo[] = {{"model", 1, 0, 'm'}, {"threads", 1, 0, 't'}, {0, 0, 0, 0}};
	while ((o = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		if (o == 'm')
			dir = optarg;
		else if (o == 't')
			threads = atoi(optarg);
		else
			return 2;
	}
	if (!dir || optind < argc) {
		fprintf(stderr, "usage: engine_logits --model DIR [--threads N] < sequences.jsonl > logits.bin\n");
		return 2;
	}
	rig r = {0};
	int rc = ax_model_open(&r.m, dir);
	if (rc) {
		fprintf(stderr, "engine_logits: cannot load %s: %s\n", dir, ax_strerror(rc));
		return 1;
	}
	const ax_model_config cfg = *ax_model_cfg(r.m);
	seq sq[MAX_SEQS];
	int n = 0, bad = 0;
	char *line = NULL;
	size_t cap = 0;
	while (!bad && getline(&line, &cap, stdin) > 0) {
		if (line[strspn(line, " \t\r\n")] == 0)
			continue;
		bad = n == MAX_SEQS || parse_line(line, &sq[n], cfg.vocab);
		n += !bad;
	}
	free(line);
	if (!bad && n > 0) {
		rc = open_rig(&r, threads, sq, n);
		if (!rc)
			rc = run_all(&r, sq, n);
		if (rc)
			fprintf(stderr, "engine_logits: %s\n", ax_strerror(rc));
	}
	close_rig(&r);
	for (int i = 0; i < n; i++)
		free(sq[i].ids);
	if (bad || n == 0) {
		fprintf(stderr, "engine_logits: input line %d: want {\"ids\": [token ids < %d], \"prefill\": 1..len}\n",
			n + 1, cfg.vocab);
		return 2;
	}
	return rc || fflush(stdout) ? 1 : 0;
}
