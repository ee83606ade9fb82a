/*
 * attn_cuda_prefill_gpu.cu — the prefill path on a GPU (TAP; exits 77 without a CUDA device): validation of every
 * row of several prompts through ax_attn_cuda_run (the prefill dispatch hook) with poisoned outputs, then a
 * benchmark against the same jobs through the existing path (a context opened with AX_ATTN_CUDA_PREFILL=0: the
 * fast path, one job per row), one table printed last.
 *
 * Validation per case (attn_cuda_prefill_testdata.h: random bf16/f16 prompts with planted keys and ties): every
 * row against ax_attn_cpu (positions up to near-ties, values within 1e-3), against the float64 reference where
 * cheap (rows × keys ≤ 2^21: every row; else every 61st row and the last), and against the existing path
 * (every row); that the rows were placed in prefill blocks (all but chains of one row); per-row error codes
 * (-ERANGE / -EDOM for the rows that see the bad key only). Also a batch of two interleaved layers plus decode jobs.
 * Bench (bf16, H_q 32, H_kv 8, D 128, top-10, an H100/H200): 512 rows of a 4K prompt and 4K rows of a 4K prompt,
 * mean_logit and heads (and GQA 8 mean_logit): median end-to-end µs of ax_attn_cuda_run over 10 runs, rows/s,
 * the prefill kernels' µs (events), the existing path's µs and the speed-up.
 * Arguments: --no-bench (validation only), --bench (bench only), --small (small cases, for sanitizers).
 * Built by scripts/gpu-test's prefill stage with plain nvcc + gcc (no project dependencies) and by meson.
 */
#include <cuda_runtime.h>

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

extern "C" {
#include "attn.h"
}
#include "attn_cuda.h"
#include "attn_cuda_prefill.h"
#include "attn_cuda_prefill_testdata.h"

static int g_tests, g_fail, g_near;

static void tap(int ok, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	g_tests++;
	g_fail += !ok;
	printf("%s %d - ", ok ? "ok" : "not ok", g_tests);
	vprintf(fmt, ap);
	printf("\n");
	fflush(stdout);
	va_end(ap);
}

#define CK(x)                                                                                                 \
	do {                                                                                                  \
		cudaError_t e_ = (x);                                                                         \
		if (e_ != cudaSuccess) {                                                                      \
			printf("Bail out! %s: %s\n", #x, cudaGetErrorString(e_));                              \
			exit(1);                                                                              \
		}                                                                                             \
	} while (0)

/* A prompt's inputs on the device; the jobs point there. */
struct dprompt {
	pdata t;
	void *q, *k, *index;
};

static void dp_make(const pcase *c, dprompt *d)
{
	pd_make(c, &d->t);
	CK(cudaMalloc(&d->q, d->t.qbytes));
	CK(cudaMalloc(&d->k, d->t.kbytes));
	CK(cudaMalloc(&d->index, d->t.ibytes));
	CK(cudaMemcpy(d->q, d->t.q, d->t.qbytes, cudaMemcpyHostToDevice));
	CK(cudaMemcpy(d->k, d->t.k, d->t.kbytes, cudaMemcpyHostToDevice));
	CK(cudaMemcpy(d->index, d->t.index, d->t.ibytes, cudaMemcpyHostToDevice));
}

static void dp_upload(dprompt *d) /* after host-side corruption */
{
	CK(cudaMemcpy(d->q, d->t.q, d->t.qbytes, cudaMemcpyHostToDevice));
	CK(cudaMemcpy(d->k, d->t.k, d->t.kbytes, cudaMemcpyHostToDevice));
	CK(cudaMemcpy(d->index, d->t.index, d->t.ibytes, cudaMemcpyHostToDevice));
}

static void dp_free(dprompt *d)
{
	cudaFree(d->q);
	cudaFree(d->k);
	cudaFree(d->index);
	pd_free(&d->t);
}

/* Device jobs of a prompt (host jobs rebased). */
static ax_attn_job *dp_jobs(const dprompt *d)
{
	ax_attn_job *j = (ax_attn_job *)malloc(d->t.rows * sizeof *j);
	memcpy(j, d->t.jobs, d->t.rows * sizeof *j);
	for (uint32_t r = 0; r < d->t.rows; r++) {
		j[r].q = (char *)d->q + ((const char *)d->t.jobs[r].q - (const char *)d->t.q);
		j[r].k = d->k;
		j[r].index = d->index;
	}
	return j;
}

static uint64_t rows_of(const ax_attn_job *jobs, uint32_t n, uint32_t *roff)
{
	uint64_t rows = 0;
	for (uint32_t i = 0; i < n; i++)
		roff[i] = (uint32_t)rows, rows += ax_attn_rows(&jobs[i]);
	return rows;
}

static ax_attn_cuda *g_on, *g_off, *g_on4; /* prefill path on / off (the existing path) / 4 rows a block */

/* Run n device jobs on ctx with poisoned outputs. */
static int run(ax_attn_cuda *ctx, const ax_attn_job *dj, uint32_t n, ax_attn_result *out, uint64_t rows, int *rc)
{
	memset(out, 0x5a, rows * sizeof *out);
	for (uint32_t i = 0; i < n; i++)
		rc[i] = 12345;
	return ax_attn_cuda_run(ctx, dj, n, out, rc);
}

/* Validate a batch: dj = device jobs, hj = the same jobs on host buffers (references). want_placed: rows the
 * prefill path must have placed. Returns failures. */
static int validate(const char *name, const ax_attn_job *dj, const ax_attn_job *hj, uint32_t n, uint32_t want_placed,
		    int float64_every)
{
	uint32_t *roff = (uint32_t *)malloc(n * sizeof *roff);
	const uint64_t rows = rows_of(hj, n, roff);
	ax_attn_result *a = (ax_attn_result *)malloc(rows * sizeof *a), *b = (ax_attn_result *)malloc(rows * sizeof *b);
	ax_attn_result *cpu = (ax_attn_result *)malloc(64 * sizeof *cpu);
	int *rc = (int *)malloc(n * sizeof *rc), *rcb = (int *)malloc(n * sizeof *rcb);
	ax_attn_scratch *s = ax_attn_scratch_new();
	int ra = run(g_on, dj, n, a, rows, rc), rb = run(g_off, dj, n, b, rows, rcb), bad = 0;
	uint32_t placed = ax__attn_prefill_last_rows(ax__attn_cuda_prefill_state(g_on));
	char why[256] = "";
	if (ra || rb) {
		tap(0, "%s: ax_attn_cuda_run %d / existing path %d (%s)", name, ra, rb, ax_attn_cuda_strerror(g_on));
		bad = 1;
	}
	for (uint32_t i = 0; !bad && i < n; i++) {
		const uint32_t nr = ax_attn_rows(&hj[i]);
		if (rc[i] != 0 || rcb[i] != 0) {
			snprintf(why, sizeof why, "job %u: rc %d, existing path %d", i, rc[i], rcb[i]);
			bad = 1;
		} else if (ax_attn_cpu(&hj[i], s, cpu) != 0 || pd_same(a + roff[i], cpu, nr, 1e-3, why, sizeof why)) {
			bad = 1;
		} else if (pd_same(a + roff[i], b + roff[i], nr, 1e-3, why, sizeof why)) {
			bad = 1;
		} else if ((float64_every <= 1 || i % float64_every == 0 || i == n - 1) &&
			   pd_check_row(&hj[i], a + roff[i], &g_near, why, sizeof why)) {
			bad = 1;
		}
		for (uint32_t r = 0; !bad && r < nr; r++)
			for (uint32_t e = a[roff[i] + r].k; !bad && e < AX_ATTN_MAX_TOPK; e++)
				if (a[roff[i] + r].pos[e] != -1 || a[roff[i] + r].logit[e] != -INFINITY) {
					snprintf(why, sizeof why, "job %u row %u entry %u past k", i, r, e);
					bad = 1;
				}
		if (bad) {
			char w2[300];
			snprintf(w2, sizeof w2, "job %u (position %llu): %s", i, (unsigned long long)hj[i].position, why);
			memcpy(why, w2, sizeof why - 1);
			why[sizeof why - 1] = 0;
		}
	}
	if (!bad && placed != want_placed) {
		snprintf(why, sizeof why, "%u rows placed in prefill blocks, want %u", placed, want_placed);
		bad = 1;
	}
	if (!(ra || rb))
		tap(!bad, "%s: %u jobs, %llu result rows, %u placed%s%s", name, n, (unsigned long long)rows, placed,
		    bad ? ": " : "", bad ? why : "");
	ax_attn_scratch_free(s);
	free(roff);
	free(a);
	free(b);
	free(cpu);
	free(rc);
	free(rcb);
	return bad;
}

static const pcase g_cases[] = {
	/* name, mode, dt, idt, H, Hkv, top_k, P, rows, window, tie */
	{"P512 all rows heads G4", AX_MODE_HEADS, BF, I32, 32, 8, 10, 512, 512, 0, 1},
	{"P512 all rows logit G4", AX_MODE_MEAN_LOGIT, BF, I32, 32, 8, 10, 512, 512, 0, 1},
	{"P512 all rows prob G4", AX_MODE_MEAN_PROB, BF, I32, 32, 8, 10, 512, 512, 0, 1},
	{"P4K 64 rows logit G4", AX_MODE_MEAN_LOGIT, BF, I32, 32, 8, 10, 4096, 64, 0, 1},
	{"P4K 64 rows heads G8 f16 i64", AX_MODE_HEADS, F16, I64, 64, 8, 10, 4096, 64, 0, 1},
	{"P4K 16 rows prob G8 f16 window 1000", AX_MODE_MEAN_PROB, F16, I64, 64, 8, 10, 4096, 16, 1000, 1},
	{"P2K 33 rows heads G8 k64 window 300", AX_MODE_HEADS, BF, I32, 16, 2, 64, 2048, 33, 300, 1},
	{"P1K 64 rows prob G1 H8 k33 (16 rows a block)", AX_MODE_MEAN_PROB, F16, I32, 8, 8, 33, 1024, 64, 0, 1},
	{"P1K 50 rows heads G2 H16 (16 rows a block)", AX_MODE_HEADS, BF, I64, 16, 8, 10, 1024, 50, 200, 1},
	{"P4K 2 rows logit k1", AX_MODE_MEAN_LOGIT, BF, I32, 32, 8, 1, 4096, 2, 0, 0},
	{"P4K 1 row (not placed)", AX_MODE_MEAN_LOGIT, BF, I32, 32, 8, 10, 4096, 1, 0, 0},
	{"P1K 40 rows heads, every key equal but 3 (ties)", AX_MODE_HEADS, BF, I32, 32, 8, 10, 1024, 40, 0, 0, 1},
	{"P4K 4096 rows logit G4", AX_MODE_MEAN_LOGIT, BF, I32, 32, 8, 10, 4096, 4096, 0, 1},
	{"P4K 4096 rows heads G4 window 512", AX_MODE_HEADS, BF, I32, 32, 8, 10, 4096, 4096, 512, 1},
};

static const pcase g_small[] = {
	{"small heads G4", AX_MODE_HEADS, BF, I32, 32, 8, 10, 300, 40, 0, 1},
	{"small prob G8 window", AX_MODE_MEAN_PROB, F16, I64, 16, 2, 20, 300, 21, 100, 1},
};

static void test_case(const pcase *c)
{
	dprompt d;
	dp_make(c, &d);
	ax_attn_job *dj = dp_jobs(&d);
	const uint64_t work = (uint64_t)c->rows * c->P;
	validate(c->name, dj, d.t.jobs, c->rows, c->rows >= 2 ? c->rows : 0, work <= (1u << 21) ? 1 : 61);
	free(dj);
	dp_free(&d);
}

/* Two layers interleaved token-major plus decode jobs of another request (the daemon's order). */
static void test_interleaved(void)
{
	const pcase a = {"layer a", AX_MODE_HEADS, BF, I32, 32, 8, 10, 1000, 100, 0, 1};
	const pcase b = {"layer b", AX_MODE_MEAN_LOGIT, BF, I32, 32, 8, 10, 1000, 100, 0, 1};
	const pcase c = {"decode", AX_MODE_MEAN_PROB, BF, I32, 32, 8, 10, 3000, 1, 0, 1};
	dprompt da, db, dc;
	dp_make(&a, &da);
	dp_make(&b, &db);
	dp_make(&c, &dc);
	ax_attn_job *ja = dp_jobs(&da), *jb = dp_jobs(&db), *jc = dp_jobs(&dc);
	ax_attn_job dj[201], hj[201];
	uint32_t n = 0;
	for (uint32_t r = 0; r < 100; r++) {
		dj[n] = ja[r], hj[n++] = da.t.jobs[r];
		dj[n] = jb[r], hj[n++] = db.t.jobs[r];
		if (r == 50)
			dj[n] = jc[0], hj[n++] = dc.t.jobs[0];
	}
	validate("interleaved layers + a decode job", dj, hj, n, 200, 7);
	free(ja);
	free(jb);
	free(jc);
	dp_free(&da);
	dp_free(&db);
	dp_free(&dc);
}

/* Per-row codes: a NaN key at position at2, an out-of-pool slot at `at` > at2 (-ERANGE wins from there), an inf in
 * Q row 5. */
static void test_errors(void)
{
	const pcase c = {"errors", AX_MODE_HEADS, BF, I64, 32, 8, 10, 600, 64, 0, 0};
	dprompt d;
	dp_make(&c, &d);
	const uint64_t at = 580, at2 = 550;
	int64_t *ix = (int64_t *)d.t.index;
	((uint16_t *)d.t.k)[(uint64_t)ix[at2] * 8 * 128 + 9] = 0x7fc0;
	ix[at] = -1;
	((uint16_t *)d.t.q)[(size_t)5 * 32 * 128 + 100] = 0x7f80; /* +inf */
	dp_upload(&d);
	ax_attn_job *dj = dp_jobs(&d);
	ax_attn_result *out = (ax_attn_result *)malloc((size_t)c.rows * 32 * sizeof *out);
	int rc[64], bad = 0;
	int r = run(g_on, dj, c.rows, out, (uint64_t)c.rows * 32, rc);
	char why[200] = "";
	ax_attn_scratch *s = ax_attn_scratch_new();
	ax_attn_result cpu[32];
	for (uint32_t i = 0; r == 0 && !bad && i < c.rows; i++) {
		const uint64_t pos = d.t.jobs[i].position;
		const int want = pos >= at ? -ERANGE : (i == 5 || pos >= at2) ? -EDOM : 0;
		if (rc[i] != want)
			bad = 1, snprintf(why, sizeof why, "row %u (position %llu): rc %d, want %d", i,
					  (unsigned long long)pos, rc[i], want);
		else if (want == 0 && (ax_attn_cpu(&d.t.jobs[i], s, cpu) || pd_same(out + (size_t)i * 32, cpu, 32, 1e-3, why, sizeof why)))
			bad = 1;
	}
	tap(r == 0 && !bad, "error codes per row (-ERANGE, -EDOM, Q inf, unharmed rows): %s", r ? "run failed" : why);
	ax_attn_scratch_free(s);
	free(out);
	free(dj);
	dp_free(&d);
}

/* ---- bench ----------------------------------------------------------------------------------------------------- */

static double now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* Median µs of ax_attn_cuda_run over `reps` runs (after 2 warm-ups); *kus: median prefill kernel µs (or -1). */
static double bench_ctx(ax_attn_cuda *ctx, const ax_attn_job *dj, uint32_t n, ax_attn_result *out, int *rc, int reps,
			double *kus)
{
	double t[16], k[16];
	ax_attn_prefill *pf = ax__attn_cuda_prefill_state(ctx);
	if (pf)
		ax__attn_prefill_timing(pf, 1);
	for (int i = 0; i < reps + 2; i++) {
		double t0 = now_us();
		int r = ax_attn_cuda_run(ctx, dj, n, out, rc);
		double t1 = now_us();
		if (r) {
			printf("# bench: RUN FAILED %d (%s)\n", r, ax_attn_cuda_strerror(ctx));
			return -1;
		}
		if (i >= 2)
			t[i - 2] = t1 - t0, k[i - 2] = pf ? ax__attn_prefill_kernel_us(pf) : -1;
	}
	qsort(t, reps, sizeof *t, cmp_d);
	qsort(k, reps, sizeof *k, cmp_d);
	*kus = k[reps / 2];
	return t[reps / 2];
}

struct bcase {
	const char *name;
	uint32_t mode, H, Hkv;
	uint64_t P;
	uint32_t rows;
	int rows4;     /* 1: the prefill context with AX_PREFILL_ROWS=4 (the planner's rows knob) */
};

static const bcase g_bench[] = {
	{"512 rows of 4K, mean_logit", AX_MODE_MEAN_LOGIT, 32, 8, 4096, 512, 0},
	{"512 rows of 4K, heads", AX_MODE_HEADS, 32, 8, 4096, 512, 0},
	{"512 rows of 4K, mean_prob", AX_MODE_MEAN_PROB, 32, 8, 4096, 512, 0},
	{"4K rows of 4K, mean_logit", AX_MODE_MEAN_LOGIT, 32, 8, 4096, 4096, 0},
	{"4K rows of 4K, heads", AX_MODE_HEADS, 32, 8, 4096, 4096, 0},
	{"4K rows of 4K, mean_logit GQA 8", AX_MODE_MEAN_LOGIT, 64, 8, 4096, 4096, 0},
	{"4K rows of 4K, mean_logit, 4 rows/blk", AX_MODE_MEAN_LOGIT, 32, 8, 4096, 4096, 1},
	{"4K rows of 4K, heads, 4 rows/blk", AX_MODE_HEADS, 32, 8, 4096, 4096, 1},
};

static void bench(void)
{
	char lines[16][220];
	int nl = 0;
	cudaDeviceProp prop;
	CK(cudaGetDeviceProperties(&prop, 0));
	for (size_t b = 0; b < sizeof g_bench / sizeof g_bench[0]; b++) {
		const bcase *B = &g_bench[b];
		const pcase c = {B->name, B->mode, BF, I32, B->H, B->Hkv, 10, B->P, B->rows, 0, 0};
		dprompt d;
		dp_make(&c, &d);
		ax_attn_job *dj = dp_jobs(&d);
		uint32_t *roff = (uint32_t *)malloc(c.rows * sizeof *roff);
		const uint64_t rows = rows_of(d.t.jobs, c.rows, roff);
		ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
		int *rc = (int *)malloc(c.rows * sizeof *rc);
		double kon = -1, koff = -1;
		const double on = bench_ctx(B->rows4 ? g_on4 : g_on, dj, c.rows, out, rc, 10, &kon);
		const double off = bench_ctx(g_off, dj, c.rows, out, rc, 10, &koff);
		snprintf(lines[nl++], sizeof lines[0], "| %-38s | %6u | %10.1f | %10.1f | %12.3g | %10.1f | %6.2fx |", B->name,
			 B->rows, on, kon, on > 0 ? B->rows / (on * 1e-6) : 0, off, on > 0 ? off / on : 0);
		free(roff);
		free(out);
		free(rc);
		free(dj);
		dp_free(&d);
	}
	printf("==== prefill bench (%s, bf16, D 128, top-10; median of 10; µs per ax_attn_cuda_run, end to end) ====\n",
	       prop.name);
	printf("| %-38s | %6s | %10s | %10s | %12s | %10s | %7s |\n", "case", "rows", "prefill", "kernels", "rows/s",
	       "existing", "speedup");
	printf("|%s|\n", "----------------------------------------|--------|------------|------------|--------------|------------|---------");
	for (int i = 0; i < nl; i++)
		printf("%s\n", lines[i]);
}

int main(int argc, char **argv)
{
	int do_val = 1, do_bench = 1, small = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--no-bench"))
			do_bench = 0;
		else if (!strcmp(argv[i], "--bench"))
			do_val = 0;
		else if (!strcmp(argv[i], "--small"))
			small = 1, do_bench = 0;
	}
	if (ax_attn_cuda_devices() <= 0) {
		printf("1..0 # SKIP no CUDA device\n");
		return 77;
	}
	/* Every block size is validated (and the small-block bench rows measure what the default's min_rows gate,
	 * AX_PREFILL_MIN_ROWS = 8, keeps off this path): blocks of 2 rows and more, as before the gate. */
	setenv("AX_PREFILL_MIN_ROWS", "1", 1);
	int r = ax_attn_cuda_open(&g_on, 0);
	setenv("AX_ATTN_CUDA_PREFILL", "0", 1);
	int r2 = ax_attn_cuda_open(&g_off, 0);
	unsetenv("AX_ATTN_CUDA_PREFILL");
	setenv("AX_PREFILL_ROWS", "4", 1);
	int r3 = ax_attn_cuda_open(&g_on4, 0);
	unsetenv("AX_PREFILL_ROWS");
	if (r || r2 || r3) {
		printf("Bail out! ax_attn_cuda_open: %d / %d / %d (%s)\n", r, r2, r3, ax_attn_cuda_strerror(NULL));
		return 1;
	}
	if (!ax__attn_cuda_prefill_state(g_on)) {
		printf("Bail out! the prefill path is off on this device (not sm_90, or kernels not built for it)\n");
		return 1;
	}
	if (do_val) {
		if (small) {
			for (size_t i = 0; i < sizeof g_small / sizeof g_small[0]; i++)
				test_case(&g_small[i]);
		} else {
			for (size_t i = 0; i < sizeof g_cases / sizeof g_cases[0]; i++)
				test_case(&g_cases[i]);
			test_interleaved();
		}
		test_errors();
		printf("# attn_cuda_prefill_gpu: %d/%d passed, near-tie substitutions %d\n", g_tests - g_fail, g_tests,
		       g_near);
	}
	if (do_bench && g_fail == 0)
		bench();
	printf("1..%d\n", g_tests);
	ax_attn_cuda_close(g_on);
	ax_attn_cuda_close(g_off);
	ax_attn_cuda_close(g_on4);
	return g_fail ? 1 : 0;
}
