/*
 * bench_attn_cpu.c — how close the CPU attention kernel comes to this machine's single-core memory bandwidth
 * (the floor of DESIGN's performance model). Run by scripts/bench-cpu-capture; not a test.
 *
 * It allocates one 512 MiB bf16 K pool (far larger than the last-level cache), measures the single-core read
 * bandwidth by summing the whole pool (best of several sweeps), then times ax_attn_cpu on one 32K-token query row
 * (H_q 32, H_kv 8, D 128, bf16 Q and K, top-10) in each mode. Consecutive jobs read disjoint 64 MiB regions of the
 * pool, so every job starts with its keys out of cache. Slots are contiguous within a region (a freshly
 * allocated request); a last line repeats mean_logit with shuffled slots. It prints the median time, the key
 * bytes per second (n·H_kv·D·2 bytes per job) and the ratio to the measured bandwidth. Options: --reps N,
 * --tokens N, --mode mean_logit|heads|mean_prob|shuffled (one line only, for profiling), --regions N (cycle
 * through fewer regions: with a small --tokens the keys stay in cache, which shows the compute-bound rate).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attn.h"
#include "attnx_shm.h"

#define POOL_BYTES ((size_t)512 << 20)
#define HQ 32
#define HKV 8
#define DIM 128

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* One read sweep over the buffer; eight independent sums keep the loads in flight. */
static uint64_t sweep(const uint64_t *p, size_t n)
{
	uint64_t a[8] = {0};
	for (size_t i = 0; i + 8 <= n; i += 8)
		for (int l = 0; l < 8; l++)
			a[l] += p[i + l];
	return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
}

static double bandwidth(const void *buf, size_t bytes, int runs, uint64_t *sink)
{
	double best = 1e30;
	for (int r = 0; r < runs; r++) {
		double t = now_s();
		*sink += sweep(buf, bytes / 8);
		t = now_s() - t;
		best = t < best ? t : best;
	}
	return (double)bytes / best / 1e9;
}

static void fill(uint16_t *k, size_t n)
{
	uint64_t x = 0x9e3779b97f4a7c15ull;
	for (size_t i = 0; i < n; i++) { /* ±[0.5, 1) with a random mantissa: finite, cheap to make */
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		k[i] = (uint16_t)((x & 0x807f) | 0x3f00);
	}
}

typedef struct bench {
	ax_attn_job job;
	int32_t *index;    /* [regions, tokens] */
	uint32_t regions, tokens;
	ax_attn_scratch *s;
} bench;

/* Median seconds of `reps` jobs, each on the next region; *best gets the fastest. */
static double time_mode(bench *b, uint32_t mode, int reps, int *err, double *best)
{
	double *t = calloc((size_t)reps, sizeof *t);
	ax_attn_result out[HQ];
	if (!t) {
		*err = -ENOMEM;
		return 0;
	}
	b->job.mode = mode;
	for (int r = -2; r < reps; r++) { /* two warm-up jobs grow the scratch */
		b->job.index = b->index + (size_t)((unsigned)(r + 2) % b->regions) * b->tokens;
		double t0 = now_s();
		int rc = ax_attn_cpu(&b->job, b->s, out);
		double dt = now_s() - t0;
		if (rc)
			*err = rc;
		if (r >= 0)
			t[r] = dt;
	}
	qsort(t, (size_t)reps, sizeof *t, cmp_double);
	double med = t[reps / 2];
	*best = t[0];
	free(t);
	return med;
}

static void cpu_model(char *out, size_t len)
{
	FILE *f = fopen("/proc/cpuinfo", "r");
	char line[256];
	snprintf(out, len, "unknown");
	while (f && fgets(line, sizeof line, f)) {
		char *c = strchr(line, ':');
		if (strncmp(line, "model name", 10) == 0 && c) {
			snprintf(out, len, "%s", c + 2);
			out[strcspn(out, "\n")] = 0;
			break;
		}
	}
	if (f)
		fclose(f);
}

static void set_index(bench *b, int shuffled)
{
	uint64_t x = 0x2545f4914f6cdd1dull;
	for (uint32_t r = 0; r < b->regions; r++) {
		int32_t *row = b->index + (size_t)r * b->tokens;
		for (uint32_t j = 0; j < b->tokens; j++)
			row[j] = (int32_t)(r * b->tokens + j);
		for (uint32_t j = b->tokens - 1; shuffled && j > 0; j--) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			uint32_t i = (uint32_t)(x % (j + 1));
			int32_t t = row[i];
			row[i] = row[j];
			row[j] = t;
		}
	}
}

static void report(const char *name, double sec, double best, double key_bytes, double bw)
{
	double gbs = key_bytes / sec / 1e9;
	printf("%-20s %7.2f ms (min %6.2f)  %6.2f GB/s  %.2f of single-core bandwidth\n", name, sec * 1e3,
	       best * 1e3, gbs, gbs / bw);
}

int main(int argc, char **argv)
{
	int reps = 15;
	uint32_t tokens = 32768;
	const char *only = NULL;
	uint32_t regions = 0;
	for (int i = 1; i + 1 < argc; i += 2) {
		if (strcmp(argv[i], "--reps") == 0)
			reps = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "--mode") == 0)
			only = argv[i + 1];
		else if (strcmp(argv[i], "--regions") == 0)
			regions = (uint32_t)strtoul(argv[i + 1], NULL, 0);
		else if (strcmp(argv[i], "--tokens") == 0)
			tokens = (uint32_t)strtoul(argv[i + 1], NULL, 0);
	}
	size_t row_bytes = (size_t)HKV * DIM * 2;
	if (reps < 1 || tokens < 1 || (size_t)tokens * row_bytes > POOL_BYTES / 2) {
		fprintf(stderr, "bench_attn_cpu: bad --reps or --tokens\n");
		return 2;
	}
	bench b = {.regions = (uint32_t)(POOL_BYTES / ((size_t)tokens * row_bytes)), .tokens = tokens};
	uint64_t n_slots = (uint64_t)b.regions * tokens, sink = 0;
	if (regions > 0 && regions < b.regions)
		b.regions = regions; /* fewer regions: keys stay cached (compute-bound rate) */
	uint16_t *k = NULL, q[HQ * DIM];
	if (posix_memalign((void **)&k, 64, n_slots * row_bytes) != 0)
		return 1;
	b.index = malloc((size_t)n_slots * sizeof(int32_t));
	b.s = ax_attn_scratch_new();
	if (!b.index || !b.s)
		return 1;
	fill(k, n_slots * HKV * DIM);
	fill(q, HQ * DIM);
	set_index(&b, 0);

	char model[200];
	cpu_model(model, sizeof model);
	double bw = bandwidth(k, n_slots * row_bytes, 5, &sink);
	printf("cpu: %s\n", model);
	printf("single-core read bandwidth: %.2f GB/s (sum over %zu MiB, best of 5)\n", bw,
	       (size_t)(n_slots * row_bytes >> 20));
	printf("row: %u tokens, H_q %d, H_kv %d, D %d, bf16, top-10; %d reps, median; %u regions of %.0f MiB\n",
	       tokens, HQ, HKV, DIM, reps, b.regions, tokens * row_bytes / 1048576.0);

	b.job = (ax_attn_job){.q = q, .q_dtype = AX_DTYPE_BF16, .k = k, .k_dtype = AX_DTYPE_BF16, .k_scale = 1,
			      .k_stride = {HKV * DIM, DIM, 1}, .n_slots = n_slots, .index_dtype = AX_DTYPE_I32,
			      .position = tokens - 1, .n_q_heads = HQ, .n_kv_heads = HKV, .head_dim = DIM,
			      .scale = 0.08838834764f, .top_k = 10};
	double kb = (double)tokens * row_bytes;
	int err = 0;
	static const struct {
		const char *name, *label;
		uint32_t mode;
		int shuffled;
	} runs[] = {{"mean_logit", "mean_logit", AX_MODE_MEAN_LOGIT, 0},
		    {"heads", "heads (all 32)", AX_MODE_HEADS, 0},
		    {"mean_prob", "mean_prob", AX_MODE_MEAN_PROB, 0},
		    {"shuffled", "mean_logit shuffled", AX_MODE_MEAN_LOGIT, 1}};
	for (size_t i = 0; i < sizeof runs / sizeof runs[0]; i++) {
		if (only && strcmp(only, runs[i].name) != 0)
			continue;
		double best = 0;
		set_index(&b, runs[i].shuffled);
		double med = time_mode(&b, runs[i].mode, reps, &err, &best);
		report(runs[i].label, med, best, kb, bw);
	}
	printf("(checksum %llu)\n", (unsigned long long)(sink & 0xff));
	ax_attn_scratch_free(b.s);
	free(b.index);
	free(k);
	if (err) {
		fprintf(stderr, "bench_attn_cpu: ax_attn_cpu failed: %d\n", err);
		return 1;
	}
	return 0;
}
