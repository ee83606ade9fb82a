/*
 * sample.c — token sampling and logprobs.
 *
 * Greedy (temperature ≤ 0) is the lowest-index argmax, so it is deterministic and matches torch.argmax. Otherwise:
 * logits / temperature → softmax → optional top-k → optional top-p (nucleus: the smallest set of most likely
 * tokens whose mass reaches top_p, renormalised) → one uniform draw from the request's own generator, so a
 * request with a seed reproduces exactly whatever else is in the batch. Logprobs are the model's raw
 * log-softmax (before temperature), as vLLM reports them.
 */
#include "attnx_engine.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

uint64_t ax_rng_next(uint64_t *state)
{
	/* splitmix64: good enough for sampling, one word of state. */
	uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static float uniform(uint64_t *rng) { return (float)((ax_rng_next(rng) >> 40) * (1.0 / 16777216.0)); }

size_t ax_sample_work_size(int vocab) { return (size_t)vocab * (sizeof(float) + sizeof(int32_t)); }

static int argmax(const float *x, int n)
{
	int best = 0;
	for (int i = 1; i < n; i++)
		if (x[i] > x[best])
			best = i;
	return best;
}

static int by_prob_desc(const void *a, const void *b, void *ctx)
{
	const float *prob = ctx;
	float pa = prob[*(const int32_t *)a], pb = prob[*(const int32_t *)b];
	if (pa != pb)
		return pa < pb ? 1 : -1;
	return *(const int32_t *)a - *(const int32_t *)b;
}

int ax_sample(const float *logits, int vocab, const ax_sample_params *p, uint64_t *rng, void *work)
{
	if (p->temperature <= 0 || p->top_k == 1)
		return argmax(logits, vocab);
	float *prob = work;
	int32_t *idx = (int32_t *)(prob + vocab);
	float mx = logits[argmax(logits, vocab)], sum = 0;
	for (int i = 0; i < vocab; i++) {
		prob[i] = expf((logits[i] - mx) / p->temperature);
		sum += prob[i];
	}
	int n = vocab;
	int restrict_set = (p->top_k > 0 && p->top_k < vocab) || (p->top_p > 0 && p->top_p < 1);
	if (restrict_set) {
		/* Candidates: drop the negligible tail first so the sort stays small. */
		n = 0;
		float floor = sum * 1e-9f;
		for (int i = 0; i < vocab; i++)
			if (prob[i] >= floor)
				idx[n++] = i;
		qsort_r(idx, (size_t)n, sizeof *idx, by_prob_desc, prob);
		if (p->top_k > 0 && p->top_k < n)
			n = p->top_k;
		float kept = 0;
		for (int i = 0; i < n; i++)
			kept += prob[idx[i]];
		if (p->top_p > 0 && p->top_p < 1) {
			float acc = 0;
			int m = 0;
			while (m < n && acc < p->top_p * kept)
				acc += prob[idx[m++]];
			n = m > 0 ? m : 1;
			kept = acc > 0 ? acc : prob[idx[0]];
		}
		float r = uniform(rng) * kept;
		for (int i = 0; i < n; i++) {
			r -= prob[idx[i]];
			if (r < 0)
				return idx[i];
		}
		return idx[n - 1];
	}
	float r = uniform(rng) * sum;
	int last = 0;
	for (int i = 0; i < vocab; i++) {
		if (prob[i] > 0)
			last = i;
		r -= prob[i];
		if (r < 0)
			return i;
	}
	return last;
}

static float logsumexp(const float *x, int n)
{
	float mx = x[argmax(x, n)];
	double s = 0;
	for (int i = 0; i < n; i++)
		s += exp((double)(x[i] - mx));
	return mx + (float)log(s);
}

float ax_logprob_of(const float *logits, int vocab, int id)
{
	if (id < 0 || id >= vocab)
		return -INFINITY;
	return logits[id] - logsumexp(logits, vocab);
}

int ax_top_logprobs(const float *logits, int vocab, int k, int32_t *ids, float *lps)
{
	if (k > vocab)
		k = vocab;
	if (k <= 0)
		return 0;
	float lse = logsumexp(logits, vocab);
	int n = 0;
	/* insertion into a sorted list of k: k ≤ 20 */
	for (int i = 0; i < vocab; i++) {
		float v = logits[i];
		if (n == k && v <= logits[ids[n - 1]])
			continue;
		int j = n < k ? n++ : k - 1;
		while (j > 0 && logits[ids[j - 1]] < v) {
			ids[j] = ids[j - 1];
			j--;
		}
		ids[j] = i;
	}
	for (int i = 0; i < n; i++)
		lps[i] = logits[ids[i]] - lse;
	return n;
}
