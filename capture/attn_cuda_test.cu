/*
 * attn_cuda_test.cu — GPU test and benchmark of the CUDA backend (attn_cuda.h). Prints TAP; exits 77 (SKIP)
 * where no CUDA device is found, 0 when every test passes, 1 otherwise. Needs nothing but the CUDA runtime and
 * attn_cpu.c (no cmocka, no nng), so scripts/gpu-test builds it on a bare CUDA machine:
 *   gcc -O2 -c capture/attn_cpu.c -Icapture -Iproto -Ishm -Icommon
 *   nvcc -O2 -std=c++17 -arch=sm_90 capture/attn_cuda_test.cu capture/attn_cuda.cu attn_cpu.o -I...
 *
 * Test mode (default): every case gets fresh random inputs (attn_cuda_testdata.h: planted high-scoring keys, an
 * exact tie, shuffled slots, garbage index values outside the window), copied to the device; outputs are
 * poisoned before each run; each result is checked against the float64 reference (k, head_id, positions with
 * near-ties allowed as the kernel lab allows them, logits and logsumexp within 1e-3, ties lowest position
 * first, no NaN) and against ax_attn_cpu on the same host data. Cases: the small feature table (every dtype,
 * head_dim 64/80/100/128/256/512, GQA groups 1..80, i32/i64, window, cap, top_k 1..64, n 1..5000), larger
 * shapes up to 100K keys, all of them in one batch between invalid jobs, 128 requests × layers × modes in one
 * batch, the error table (-ERANGE, -EDOM, -EINVAL, -EOPNOTSUPP, each between two valid jobs), a warm repeat
 * (bitwise identical results), an event wait, and API edges. AX_TEST_SEED=N repeats a run.
 *
 * --small: only the small feature table and the error table (for compute-sanitizer memcheck / racecheck).
 * --bench: bf16, H_q 32, H_kv 8, D 128, top-10, the issue's shapes and modes, request sets rotated over >= 200 MB
 * so no repeat reads keys from a warm L2; medians of repeats against a streaming read of the same bytes timed with
 * events in the same run (the floor). Columns: end to end (host clock around the default context's synchronous
 * ax_attn_cuda_run: from the call to results on the host), the fast path's kernels alone (CUDA events around its
 * launches), and a context opened with AX_ATTN_CUDA_FAST=0 (generic only), end to end.
 * --sweep: the fast path's planner knobs (attn_cuda_fast.h, axf_knobs) over a small grid on the bench's shapes,
 * each knob set checked against the generic path's rows; the best set per shape and mode last (see sweep()).
 * The fast path block (cudafast) compares both paths on every eligible case, also under two other knob sets (the
 * separate heads merge, split caps, several waves); see fast_tests.
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
#include "attn_cuda_logic.h" /* the device's conversions, checked against attn_cpu.c's */
#include "attn_cuda_fast.h" /* fast-path block (cudafast) */
#include "attn_cuda_testdata.h"
#include "attn_paged_testdata.h" /* paged block (owner: paged) */

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define TOL 1e-3

#define CK(x)                                                                                                 \
	do {                                                                                                  \
		cudaError_t e_ = (x);                                                                         \
		if (e_ != cudaSuccess) {                                                                      \
			printf("Bail out! %s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
			exit(1);                                                                              \
		}                                                                                             \
	} while (0)

static int g_tests, g_failed, g_near;

static void tap(int ok, const char *fmt, ...)
{
	va_list ap;
	g_tests++;
	g_failed += !ok;
	printf("%s %d - ", ok ? "ok" : "not ok", g_tests);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

/* ---- device copies of a job's inputs --------------------------------------------------------------------------- */

typedef struct djob {
	void *q, *kbase, *index; /* the pool starts t->koff bytes into kbase, as in the host data */
	ax_attn_job job; /* device pointers */
} djob;

static void dj_make(const tdata *t, djob *d)
{
	CK(cudaMalloc(&d->q, t->qbytes));
	CK(cudaMalloc(&d->kbase, t->kbytes + t->koff));
	CK(cudaMalloc(&d->index, t->ibytes));
	CK(cudaMemcpy(d->q, t->q, t->qbytes, cudaMemcpyHostToDevice));
	CK(cudaMemcpy((char *)d->kbase + t->koff, t->k, t->kbytes, cudaMemcpyHostToDevice));
	CK(cudaMemcpy(d->index, t->index, t->ibytes, cudaMemcpyHostToDevice));
	d->job = t->job;
	d->job.q = d->q, d->job.k = (char *)d->kbase + t->koff, d->job.index = d->index;
}

static void dj_free(djob *d)
{
	cudaFree(d->q);
	cudaFree(d->kbase);
	cudaFree(d->index);
	memset(d, 0, sizeof *d);
}

/* A run with poisoned outputs (NaN logits, -1 positions and k) and rc[] set to a value no run returns. */
static int gpu_run(ax_attn_cuda *c, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, uint32_t rows, int *rc)
{
	memset(out, 0xff, rows * sizeof *out);
	for (uint32_t i = 0; i < n; i++)
		rc[i] = 12345;
	return ax_attn_cuda_run(c, jobs, n, out, rc);
}

/* Rows of one job against the float64 reference and against ax_attn_cpu on the host data. */
static int check_rows(const ax_attn_job *host_job, const ax_attn_result *got, char *why, size_t len)
{
	tref ref;
	td_ref(host_job, &ref);
	int r = td_check(&ref, host_job->top_k, got, TOL, &g_near, why, len);
	for (uint32_t i = 0; r == 0 && i < ref.rows; i++) /* attn_cuda.h: entries past k are (-1, -inf) */
		for (uint32_t e = got[i].k; r == 0 && e < AX_ATTN_MAX_TOPK; e++)
			if (got[i].pos[e] != -1 || got[i].logit[e] != -INFINITY)
				r = td_fail(why, len, "row %u entry %u past k: (%lld, %g)", i, e, (long long)got[i].pos[e],
					    got[i].logit[e]);
	if (r == 0) {
		ax_attn_scratch *s = ax_attn_scratch_new();
		ax_attn_result *cpu = (ax_attn_result *)calloc(ref.rows, sizeof *cpu);
		int cr = ax_attn_cpu(host_job, s, cpu);
		if (cr != 0)
			r = td_fail(why, len, "ax_attn_cpu returned %d", cr);
		for (uint32_t i = 0; r == 0 && i < ref.rows; i++) {
			if (cpu[i].k != got[i].k)
				r = td_fail(why, len, "row %u: k %u, ax_attn_cpu %u", i, got[i].k, cpu[i].k);
			for (uint32_t e = 0; r == 0 && e < got[i].k; e++)
				if (got[i].pos[e] != cpu[i].pos[e] &&
				    !(fabs(got[i].logit[e] - cpu[i].logit[e]) <= 1e-5 * fmax(1, fabs(cpu[i].logit[e]))))
					r = td_fail(why, len, "row %u entry %u: position %lld, ax_attn_cpu %lld", i, e,
						    (long long)got[i].pos[e], (long long)cpu[i].pos[e]);
		}
		free(cpu);
		ax_attn_scratch_free(s);
	}
	td_ref_free(&ref);
	return r;
}

/* ---- tests ------------------------------------------------------------------------------------------------------- */

static const tcase big_cases[] = {
	/* name, mode, kdt, qdt, idt, D, H, Hkv, top_k, n_keys, window, cap, n_heads, heads, tie, pad */
	{"logit bf16 D128 G4 32K", ML, BF, BF, I32, 128, 32, 8, 10, 32768, 0, 0, 0, {0}, 1, 0},
	{"heads bf16 D128 G4 i64 100K top-64", HD, BF, BF, I64, 128, 8, 2, 64, 100000, 0, 0, 0, {0}, 1, 0},
	{"prob bf16 D128 G8 20K", MP, BF, BF, I32, 128, 32, 4, 10, 20000, 0, 0, 0, {0}, 1, 0},
	{"logit f16 D256 G8 window 30K cap 50 (50K)", ML, F16, F16, I32, 256, 16, 2, 64, 50000, 30000, 50, 0, {0},
	 1, 0},
	{"heads e4m3 D64 G1 i64 10K top-1", HD, E4, BF, I64, 64, 8, 8, 1, 10000, 0, 0, 0, {0}, 1, 0},
	{"prob e5m2 D64 G4 8K top-64", MP, E5, F32, I32, 64, 16, 4, 64, 8000, 0, 0, 0, {0}, 1, 0},
	{"logit f32 D128 G8 i64 padded 12K", ML, F32, F32, I64, 128, 16, 2, 10, 12000, 0, 0, 0, {0}, 1, 1},
	{"heads bf16 D256 G4 list 9K", HD, BF, BF, I32, 256, 16, 4, 10, 9000, 0, 0, 4, {15, 0, 7, 7}, 1, 0},
	{"logit bf16 D64 n = k = 64", ML, BF, BF, I32, 64, 8, 2, 64, 64, 0, 0, 0, {0}, 1, 0},
	{"heads bf16 D128 n 33 (a partial tile)", HD, BF, BF, I32, 128, 32, 8, 10, 33, 0, 0, 0, {0}, 1, 0},
	{"prob f16 D128 G1 window 4096 cap (70K)", MP, F16, F16, I64, 128, 8, 8, 10, 70000, 4096, 30, 0, {0}, 1, 0},
	{"heads bf16 D64 G4 1M keys", HD, BF, BF, I64, 64, 4, 1, 10, 1048576, 0, 0, 0, {0}, 1, 0},
};

/* Each case alone. */
static void test_cases(ax_attn_cuda *c, const tcase *cs, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		tdata t;
		djob d;
		char why[256] = "";
		td_make(&cs[i], &t);
		dj_make(&t, &d);
		uint32_t rows = ax_attn_rows(&t.job);
		ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
		int rc, r = gpu_run(c, &d.job, 1, out, rows, &rc);
		int ok = r == 0 && rc == 0;
		if (!ok)
			snprintf(why, sizeof why, "run %d (%s), rc %d", r, ax_attn_cuda_strerror(c), rc);
		else
			ok = check_rows(&t.job, out, why, sizeof why) == 0;
		tap(ok, "%s%s%s", cs[i].name, ok ? "" : ": ", why);
		free(out);
		dj_free(&d);
		td_free(&t);
	}
}

/* Everything in one batch between invalid jobs; twice (a warm context: bitwise identical results). */
static void test_batch(ax_attn_cuda *c)
{
	size_t ns = ARRAY_LEN(td_cases), nb = ARRAY_LEN(big_cases), n = ns + nb, nj = 2 * n + 1;
	tdata *t = (tdata *)calloc(n, sizeof *t);
	djob *d = (djob *)calloc(n, sizeof *d);
	ax_attn_job *jobs = (ax_attn_job *)calloc(nj, sizeof *jobs);
	uint32_t *off = (uint32_t *)calloc(nj, sizeof *off), rows = 0;
	int *rc = (int *)calloc(nj, sizeof *rc);
	for (size_t i = 0; i < n; i++) {
		td_make(i < ns ? &td_cases[i] : &big_cases[i - ns], &t[i]);
		dj_make(&t[i], &d[i]);
		jobs[2 * i] = d[i].job;
		jobs[2 * i + 1] = d[i].job;
		jobs[2 * i + 1].top_k = 0; /* -EINVAL */
	}
	jobs[2 * n] = d[0].job;
	jobs[2 * n].head_dim = 1024; /* -EOPNOTSUPP (never launched: its buffers are too small) */
	for (size_t i = 0; i < nj; i++)
		off[i] = rows, rows += ax_attn_rows(&jobs[i]);
	ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
	ax_attn_result *again = (ax_attn_result *)malloc(rows * sizeof *out);
	int r = gpu_run(c, jobs, (uint32_t)nj, out, rows, rc);
	char why[256] = "";
	int ok = r == 0 && rc[2 * n] == -EOPNOTSUPP;
	if (!ok)
		snprintf(why, sizeof why, "run %d (%s), rc of the D 1024 job %d", r, ax_attn_cuda_strerror(c), rc[2 * n]);
	for (size_t i = 0; ok && i < n; i++) {
		if (rc[2 * i] != 0 || rc[2 * i + 1] != -EINVAL) {
			snprintf(why, sizeof why, "job %zu: rc %d / %d", i, rc[2 * i], rc[2 * i + 1]);
			ok = 0;
		} else if (check_rows(&t[i].job, out + off[2 * i], why, sizeof why)) {
			ok = 0;
		}
	}
	tap(ok, "%zu jobs of every shape in one batch, between invalid ones%s%s", nj, ok ? "" : ": ", why);
	r = gpu_run(c, jobs, (uint32_t)nj, again, rows, rc);
	int same = r == 0;
	for (size_t i = 0; same && i < n; i++)
		same = memcmp(out + off[2 * i], again + off[2 * i], ax_attn_rows(&jobs[2 * i]) * sizeof *out) == 0;
	tap(same, "the same batch again on the warm context: bitwise identical");
	for (size_t i = 0; i < n; i++) {
		dj_free(&d[i]);
		td_free(&t[i]);
	}
	free(out), free(again), free(t), free(d), free(jobs), free(off), free(rc);
}

/* 128 requests: 64 requests × 2 layers, modes and lengths mixed, fresh inputs each, one batch. */
static void test_requests(ax_attn_cuda *c)
{
	enum { NREQ = 128 };
	static const uint32_t modes[3] = {ML, HD, MP};
	tcase cs[NREQ];
	tdata *t = (tdata *)calloc(NREQ, sizeof *t);
	djob *d = (djob *)calloc(NREQ, sizeof *d);
	ax_attn_job jobs[NREQ];
	uint32_t off[NREQ], rows = 0;
	int rc[NREQ];
	for (int i = 0; i < NREQ; i++) {
		tcase x = {"request", modes[i % 3], (uint32_t)BF, (uint32_t)BF, (uint32_t)I32, 128, 32, 8,
			   i % 5 == 0 ? 64u : 10u, 1 + td_u64() % 3000, 0, 0, 0, {0}, i % 2, 0};
		cs[i] = x;
		td_make(&cs[i], &t[i]);
		dj_make(&t[i], &d[i]);
		jobs[i] = d[i].job;
		off[i] = rows, rows += ax_attn_rows(&jobs[i]);
	}
	ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
	int r = gpu_run(c, jobs, NREQ, out, rows, rc);
	char why[256] = "";
	int ok = r == 0;
	if (!ok)
		snprintf(why, sizeof why, "run %d (%s)", r, ax_attn_cuda_strerror(c));
	for (int i = 0; ok && i < NREQ; i++) {
		if (rc[i] != 0)
			snprintf(why, sizeof why, "request %d: rc %d", i, rc[i]), ok = 0;
		else if (check_rows(&t[i].job, out + off[i], why, sizeof why))
			ok = 0;
	}
	tap(ok, "128 requests × modes × lengths 1..3000 in one batch%s%s", ok ? "" : ": ", why);
	for (int i = 0; i < NREQ; i++) {
		dj_free(&d[i]);
		td_free(&t[i]);
	}
	free(out), free(t), free(d);
}

/* Each error case between two valid jobs: the code, the CPU backend's agreement, the neighbours unharmed. */
static void test_errors(ax_attn_cuda *c)
{
	for (size_t i = 0; i < ARRAY_LEN(td_errors); i++) {
		const td_error *e = &td_errors[i];
		tcase tc = {e->name, e->mode, BF, BF, (uint32_t)(i % 2 ? I64 : I32), 64, 4, 2, 5, 2000, e->window, 0, e->n_heads,
			    {e->heads[0], e->heads[1]}, 0, 0};
		tdata t, okd;
		djob d, dok;
		td_make(&tc, &t);
		td_make(&tc, &okd);
		td_corrupt(&t, e->what);
		dj_make(&t, &d);
		dj_make(&okd, &dok);
		ax_attn_job jobs[3] = {dok.job, d.job, dok.job};
		uint32_t r0 = ax_attn_rows(&okd.job), r1 = ax_attn_rows(&t.job), rows = 2 * r0 + r1;
		ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
		int rc[3], r = gpu_run(c, jobs, 3, out, rows, rc);
		char why[256] = "";
		int ok = r == 0 && rc[1] == e->want && rc[0] == 0 && rc[2] == 0;
		if (!ok)
			snprintf(why, sizeof why, "run %d, rc %d %d %d, want 0 %d 0", r, rc[0], rc[1], rc[2], e->want);
		if (ok && e->what != E_D1024) {
			ax_attn_scratch *s = ax_attn_scratch_new();
			ax_attn_result *cpu = (ax_attn_result *)calloc(r1 ? r1 : 1, sizeof *cpu);
			int cr = ax_attn_cpu(&t.job, s, cpu);
			if (cr != e->want)
				snprintf(why, sizeof why, "ax_attn_cpu returned %d", cr), ok = 0;
			free(cpu);
			ax_attn_scratch_free(s);
		}
		if (ok && (check_rows(&okd.job, out, why, sizeof why) || check_rows(&okd.job, out + r0 + r1, why, sizeof why)))
			ok = 0;
		tap(ok, "error: %s%s%s", e->name, ok ? "" : ": ", why);
		free(out);
		dj_free(&d);
		dj_free(&dok);
		td_free(&t);
		td_free(&okd);
	}
}

/* Every f16 / bf16 / fp8 code decoded on the device (axc_*: subnormals need the default -ftz=false, the bit casts
 * nvcc's memcpy) bitwise equal to attn_cpu.c's decoders on the host; NaN codes only NaN. */
__global__ void decode_all(float *out)
{
	uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
	if (i < 65536) {
		out[i] = axc_f16((uint16_t)i);
		out[65536 + i] = axc_bf16((uint16_t)i);
	}
	if (i < 256) {
		out[131072 + i] = axc_e4m3((uint8_t)i);
		out[131328 + i] = axc_e5m2((uint8_t)i);
	}
}

static void test_decoders(void)
{
	const size_t n = 131584;
	float *d, *h = (float *)malloc(n * sizeof *h);
	CK(cudaMalloc(&d, n * sizeof *d));
	decode_all<<<65536 / 256, 256>>>(d);
	CK(cudaGetLastError());
	CK(cudaMemcpy(h, d, n * sizeof *d, cudaMemcpyDeviceToHost));
	int bad = -1;
	for (size_t i = 0; i < n && bad < 0; i++) {
		float want = i < 65536    ? ax_f16_to_f32((uint16_t)i)
			     : i < 131072 ? ax_bf16_to_f32((uint16_t)(i - 65536))
			     : i < 131328 ? ax_fp8_e4m3_to_f32((uint8_t)(i - 131072))
					  : ax_fp8_e5m2_to_f32((uint8_t)(i - 131328));
		uint32_t a, b;
		memcpy(&a, &h[i], 4), memcpy(&b, &want, 4);
		if (isnan(want) ? !isnan(h[i]) : a != b)
			bad = (int)i;
	}
	tap(bad < 0, "device decoders: every f16/bf16/fp8 code as attn_cpu.c's%s%d", bad < 0 ? "" : ": first bad entry ",
	    bad);
	cudaFree(d);
	free(h);
}

/* Scores near ±FLT_MAX in mean_prob (attn_cuda_testdata.h's td_make_extreme): 0 and the reference's rows, as
 * ax_attn_cpu, not -EDOM. */
static void test_extreme(ax_attn_cuda *c)
{
	tdata t;
	djob d;
	char why[256] = "";
	td_make_extreme(&t);
	dj_make(&t, &d);
	ax_attn_result out[1];
	int rc, r = gpu_run(c, &d.job, 1, out, 1, &rc);
	int ok = r == 0 && rc == 0;
	if (!ok)
		snprintf(why, sizeof why, "run %d (%s), rc %d", r, ax_attn_cuda_strerror(c), rc);
	else
		ok = check_rows(&t.job, out, why, sizeof why) == 0;
	tap(ok, "mean_prob with scores at +-2e38 (s - lse = -inf in one head)%s%s", ok ? "" : ": ", why);
	dj_free(&d);
	td_free(&t);
}

__global__ void spin_kernel(unsigned long long cycles)
{
	unsigned long long t0 = clock64();
	while (clock64() - t0 < cycles)
		;
}

/* The context waits for an event recorded on another stream; API edges. */
static void test_api(ax_attn_cuda *c)
{
	cudaStream_t side;
	cudaEvent_t ev;
	CK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
	CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
	spin_kernel<<<1, 1, 0, side>>>(1000000);
	CK(cudaEventRecord(ev, side));
	tdata t;
	djob d;
	td_make(&td_cases[0], &t);
	dj_make(&t, &d);
	ax_attn_result out[1];
	int rc = 1, w = ax_attn_cuda_wait_event(c, ev);
	int r = gpu_run(c, &d.job, 1, out, 1, &rc);
	char why[256] = "";
	int ok = w == 0 && r == 0 && rc == 0 && check_rows(&t.job, out, why, sizeof why) == 0;
	tap(ok, "wait for an event of another stream, then run%s%s", ok ? "" : ": ", why);
	CK(cudaStreamSynchronize(side));
	tap(ax_attn_cuda_wait_event(c, NULL) == -EINVAL, "wait_event(NULL): -EINVAL");
	tap(ax_attn_cuda_run(c, NULL, 0, NULL, NULL) == 0, "run of 0 jobs: 0");
	tap(ax_attn_cuda_run(c, &d.job, 1, NULL, &rc) == -EINVAL, "run without out: -EINVAL");
	tap(ax_attn_cuda_run(NULL, &d.job, 1, out, &rc) == -EINVAL, "run without a context: -EINVAL");
	ax_attn_cuda *x = NULL;
	tap(ax_attn_cuda_open(&x, -1) == -ENODEV && x == NULL, "open device -1: -ENODEV");
	tap(ax_attn_cuda_open(&x, ax_attn_cuda_devices()) == -ENODEV, "open device past the last: -ENODEV");
	ax_attn_cuda_close(NULL);
	tap(ax_attn_cuda_strerror(NULL) != NULL && ax_attn_cuda_strerror(c) != NULL, "strerror never NULL");
	/* result rows from the context (session 18): mapped buffers while the fast state has slots (8), then ordinary
	 * memory; a run into either is exact; a pointer not the state's is not freed by it */
	tap(ax_attn_cuda_results_alloc(NULL, 1) == NULL && ax_attn_cuda_results_alloc(c, 0) == NULL,
	    "results_alloc without a context or rows: NULL");
	ax_attn_fast *fs = ax__attn_cuda_fast_state(c);
	ax_attn_result *rb[AXF_ZB_MAX + 1];
	int mapped = 0, runs_ok = 1;
	for (int i = 0; i <= AXF_ZB_MAX; i++) {
		rb[i] = ax_attn_cuda_results_alloc(c, 2);
		unsigned int fl = 0;
		mapped += rb[i] && cudaHostGetFlags(&fl, rb[i]) == cudaSuccess && (fl & cudaHostAllocMapped);
		cudaGetLastError(); /* (ordinary memory: not the runtime's) */
		memset(rb[i], 0xff, 2 * sizeof *rb[i]);
		rc = 1;
		runs_ok &= gpu_run(c, &d.job, 1, rb[i] + 1, 1, &rc) == 0 && rc == 0 &&
			   check_rows(&t.job, rb[i] + 1, why, sizeof why) == 0;
	}
	tap(runs_ok && mapped == (fs ? AXF_ZB_MAX : 0), "results_alloc: %d mapped buffers of %d, runs into each exact%s%s",
	    mapped, AXF_ZB_MAX + 1, runs_ok ? "" : ": ", runs_ok ? "" : why);
	tap(!fs || ax__attn_fast_results_free(fs, out) == 0, "fast state's results_free of memory not its own: 0");
	for (int i = 0; i <= AXF_ZB_MAX; i++)
		ax_attn_cuda_results_free(c, rb[i]);
	ax_attn_cuda_results_free(c, NULL);
	dj_free(&d);
	td_free(&t);
	cudaEventDestroy(ev);
	cudaStreamDestroy(side);
}

/* ==== paged block (vLLM block tables, attn.h's AX_ATTN_INDEX_PAGED; owner: paged) ============================== */
/*
 * Every small case as a paged job (attn_paged_testdata.h: block sizes 1, 16, 48 and 256 in turn, NHD and HND pools,
 * poison wherever nothing may be read), in one batch with its token twin (paged batches run the generic path whole):
 * the paged rows against the float64 reference and ax_attn_cpu (check_rows), and bit for bit equal to the twin's;
 * then a visible block id past the pool (-ERANGE, the twin unaffected).
 */
static void paged_case(ax_attn_cuda *c, const tcase *tc, uint32_t bs, int hnd, int spoil)
{
	tdata t;
	tpaged p;
	djob d;
	char why[256] = "";
	td_make(tc, &t);
	dj_make(&t, &d);
	tp_make(&t, bs, hnd, &p);
	if (spoil)
		p.table[t.job.position / bs] = (int32_t)p.blocks;
	void *dk, *dt;
	CK(cudaMalloc(&dk, p.kbytes));
	CK(cudaMalloc(&dt, p.tbytes));
	CK(cudaMemcpy(dk, p.k, p.kbytes, cudaMemcpyHostToDevice));
	CK(cudaMemcpy(dt, p.table, p.tbytes, cudaMemcpyHostToDevice));
	ax_attn_job jobs[2] = {d.job, p.job};
	jobs[1].q = d.job.q, jobs[1].k = dk, jobs[1].index = dt;
	uint32_t rows = ax_attn_rows(&t.job);
	ax_attn_result *out = (ax_attn_result *)malloc(2 * rows * sizeof *out);
	int rc[2], r = gpu_run(c, jobs, 2, out, 2 * rows, rc);
	int ok = r == 0 && rc[0] == 0 && rc[1] == (spoil ? -ERANGE : 0);
	if (!ok)
		snprintf(why, sizeof why, "run %d (%s), rc %d %d", r, ax_attn_cuda_strerror(c), rc[0], rc[1]);
	else if (!spoil && check_rows(&t.job, out + rows, why, sizeof why) == 0 && !tp_same_rows(out, out + rows, rows))
		snprintf(why, sizeof why, "paged rows differ from the token twin's");
	ok = ok && !why[0];
	tap(ok, "paged bs %u%s%s: %s%s%s", bs, hnd == TP_HND ? " HND" : hnd == TP_KV ? " K/V" : "", spoil ? " bad block id" : "", tc->name, ok ? "" : ": ",
	    why);
	free(out);
	cudaFree(dk);
	cudaFree(dt);
	tp_free(&p);
	dj_free(&d);
	td_free(&t);
}

static void test_paged(ax_attn_cuda *c)
{
	static const uint32_t bss[4] = {1, 16, 48, 256};
	for (size_t i = 0; i < ARRAY_LEN(td_cases); i++)
		paged_case(c, &td_cases[i], bss[i % 4], (int)(i % 3), 0); /* NHD, HND, K/V interleaved */
	paged_case(c, &td_cases[0], 16, 0, 1);
	paged_case(c, &td_cases[2], 48, 1, 1);
}

/* ==== fast path block (attn_cuda_fast.cu; owner: cudafast) =================================================== */
/*
 * The fast path (bf16/f16, D 128, H_kv ≤ 8, group ≤ 8, no cap, no head list) against the generic path: every
 * eligible case of the tables (the small and big ones above and fast_cases below) runs through
 * ax__attn_fast_run directly and through a context opened with AX_ATTN_CUDA_FAST=0 (the generic path only);
 * both must match the float64 reference and each other (same codes, k, head_id, positions up to near-ties,
 * logits and logsumexp within TOL). Also: all of them in one fast batch, the same batch again (bitwise
 * identical: deterministic), and the error table at head_dim 128 through the fast path. The ordinary tests
 * above go through the dispatch hook of ax_attn_cuda_run, so their eligible cases run the fast path too.
 */
static const tcase fast_cases[] = {
	/* name, mode, kdt, qdt, idt, D, H, Hkv, top_k, n_keys, window, cap, n_heads, heads, tie, pad */
	{"fast logit bf16 32/8 4K", ML, BF, BF, I32, 128, 32, 8, 10, 4096, 0, 0, 0, {0}, 1, 0},
	{"fast heads bf16 32/8 10K", HD, BF, BF, I32, 128, 32, 8, 10, 10000, 0, 0, 0, {0}, 1, 0},
	{"fast prob bf16 32/8 6K", MP, BF, BF, I32, 128, 32, 8, 10, 6000, 0, 0, 0, {0}, 1, 0},
	{"fast logit f16 G1 i64 top-64", ML, F16, F16, I64, 128, 8, 8, 64, 3000, 0, 0, 0, {0}, 1, 0},
	{"fast heads f16 G8 H_kv 1 top-33", HD, F16, F16, I32, 128, 8, 1, 33, 2000, 0, 0, 0, {0}, 1, 0},
	{"fast heads bf16 G5 H_kv 3 i64", HD, BF, BF, I64, 128, 15, 3, 12, 1500, 0, 0, 0, {0}, 1, 0},
	{"fast prob bf16 G8 window 700", MP, BF, BF, I32, 128, 16, 2, 10, 5000, 700, 0, 0, {0}, 1, 0},
	{"fast logit G3 H_kv 5 n 17", ML, BF, BF, I32, 128, 15, 5, 10, 17, 0, 0, 0, {0}, 1, 0},
	{"fast heads n 1", HD, BF, BF, I32, 128, 4, 2, 5, 1, 0, 0, 0, {0}, 0, 0},
	{"fast heads n < k", HD, BF, BF, I64, 128, 8, 4, 64, 40, 0, 0, 0, {0}, 1, 0},
	{"fast prob top-64 G2", MP, BF, BF, I32, 128, 4, 2, 64, 3000, 0, 0, 0, {0}, 1, 0},
	{"fast logit window 1", ML, BF, BF, I32, 128, 8, 2, 3, 500, 1, 0, 0, {0}, 0, 0},
	{"fast logit bf16 32/8 200K", ML, BF, BF, I32, 128, 32, 8, 10, 200000, 0, 0, 0, {0}, 1, 0},
	{"fast heads bf16 32/8 window 50K (120K)", HD, BF, BF, I64, 128, 32, 8, 10, 120000, 50000, 0, 0, {0}, 1, 0},
};

/* A context with the fast path off (the environment is read when a context opens). */
static ax_attn_cuda *open_generic(void)
{
	const char *old = getenv("AX_ATTN_CUDA_FAST");
	char *keep = old ? strdup(old) : NULL;
	setenv("AX_ATTN_CUDA_FAST", "0", 1);
	ax_attn_cuda *g = NULL;
	int r = ax_attn_cuda_open(&g, 0);
	if (keep)
		setenv("AX_ATTN_CUDA_FAST", keep, 1), free(keep);
	else
		unsetenv("AX_ATTN_CUDA_FAST");
	return r ? NULL : g;
}

/* Fast rows against generic rows: codes were equal; k, head_id, positions (a swap only between logits within
 * 1e-5), logits and logsumexp within TOL, entries past k both (-1, -inf). *maxd: largest logit difference. */
static int fast_same(const ax_attn_result *f, const ax_attn_result *g, uint32_t rows, double *maxd, char *why,
		     size_t len)
{
	for (uint32_t r = 0; r < rows; r++) {
		if (f[r].k != g[r].k || f[r].head_id != g[r].head_id)
			return td_fail(why, len, "row %u: k %u / %u, head_id %d / %d (fast / generic)", r, f[r].k, g[r].k,
				       f[r].head_id, g[r].head_id);
		if (!(fabs(f[r].lse - g[r].lse) <= TOL))
			return td_fail(why, len, "row %u: lse %.9g / %.9g", r, f[r].lse, g[r].lse);
		for (uint32_t e = 0; e < AX_ATTN_MAX_TOPK; e++) {
			if (e >= f[r].k) {
				if (f[r].pos[e] != -1 || f[r].logit[e] != -INFINITY || g[r].pos[e] != -1)
					return td_fail(why, len, "row %u entry %u past k: %lld / %lld", r, e,
						       (long long)f[r].pos[e], (long long)g[r].pos[e]);
				continue;
			}
			double d = fabs((double)f[r].logit[e] - g[r].logit[e]);
			*maxd = d > *maxd ? d : *maxd;
			if (!(d <= TOL))
				return td_fail(why, len, "row %u entry %u: logit %.9g / %.9g", r, e, f[r].logit[e],
					       g[r].logit[e]);
			if (f[r].pos[e] != g[r].pos[e] && !(d <= 1e-5 * fmax(1, fabs(g[r].logit[e]))))
				return td_fail(why, len, "row %u entry %u: position %lld / %lld", r, e,
					       (long long)f[r].pos[e], (long long)g[r].pos[e]);
		}
	}
	return 0;
}

/* Jobs through the fast path and the generic context: codes, reference, agreement. */
static void fast_compare(ax_attn_fast *f, ax_attn_cuda *g, const char *name, const tdata *t, const ax_attn_job *jobs,
			 uint32_t n)
{
	uint32_t rows = 0;
	for (uint32_t i = 0; i < n; i++)
		rows += ax_attn_rows(&jobs[i]);
	/* every other comparison: the fast rows in the state's own mapped buffer, written by the kernels directly
	 * (ax__attn_fast_results_alloc, session 18), poisoned as the malloc'd ones are */
	static unsigned calls;
	ax_attn_result *zo = calls++ % 2 ? ax__attn_fast_results_alloc(f, rows) : NULL;
	ax_attn_result *fo = zo ? zo : (ax_attn_result *)malloc(rows * sizeof *fo);
	ax_attn_result *go = (ax_attn_result *)malloc(rows * sizeof *go);
	int *frc = (int *)malloc(n * sizeof *frc), *grc = (int *)malloc(n * sizeof *grc);
	memset(fo, 0xff, rows * sizeof *fo);
	for (uint32_t i = 0; i < n; i++)
		frc[i] = 12345;
	int fr = ax__attn_fast_run(f, jobs, n, fo, frc), gr = gpu_run(g, jobs, n, go, rows, grc);
	char why[256] = "";
	double maxd = 0;
	int ok = fr == 0 && gr == 0;
	if (!ok)
		snprintf(why, sizeof why, "fast run %d (cuda error %d), generic run %d", fr, ax__attn_fast_take_error(f), gr);
	for (uint32_t i = 0, o = 0; ok && i < n; o += ax_attn_rows(&jobs[i]), i++) {
		if (frc[i] != 0 || grc[i] != 0)
			snprintf(why, sizeof why, "job %u: rc %d / %d (fast / generic)", i, frc[i], grc[i]), ok = 0;
		else if (check_rows(&t[i].job, fo + o, why, sizeof why) || fast_same(fo + o, go + o, ax_attn_rows(&jobs[i]),
										   &maxd, why, sizeof why))
			ok = 0;
	}
	tap(ok, "fast = generic: %s%s (largest logit difference %.2g)%s%s", name, zo ? " (rows by the GPU)" : "", maxd,
	    ok ? "" : ": ", why);
	if (!zo)
		free(fo);
	else if (ax__attn_fast_results_free(f, zo) != 1)
		tap(0, "fast = generic: %s: its result buffer was not the state's", name);
	free(go), free(frc), free(grc);
}

/* Whether a case can be eligible (checked before paying for its inputs; the job is checked again after). */
static int fast_candidate(const tcase *c)
{
	return c->D == 128 && (c->kdt == BF || c->kdt == F16) && c->qdt == c->kdt && c->cap == 0 && !c->pad &&
	       !(c->mode == HD && c->n_heads) && c->Hkv <= 8 && c->H / c->Hkv <= 8;
}

/* Every eligible case of a table with at most max_keys keys, alone; returns how many ran. */
static int fast_table(ax_attn_fast *f, ax_attn_cuda *g, const tcase *cs, size_t n, uint64_t max_keys)
{
	int ran = 0;
	for (size_t i = 0; i < n; i++) {
		tdata t;
		djob d;
		if (!fast_candidate(&cs[i]) || cs[i].n_keys > max_keys)
			continue;
		td_make(&cs[i], &t);
		dj_make(&t, &d);
		if (ax__attn_fast_eligible(&d.job)) {
			fast_compare(f, g, cs[i].name, &t, &d.job, 1);
			ran++;
		}
		dj_free(&d);
		td_free(&t);
	}
	return ran;
}

/* All fast cases in one batch; then again: bitwise identical. */
static void fast_batch(ax_attn_fast *f, ax_attn_cuda *g)
{
	size_t n = ARRAY_LEN(fast_cases);
	tdata *t = (tdata *)calloc(n, sizeof *t);
	djob *d = (djob *)calloc(n, sizeof *d);
	ax_attn_job *jobs = (ax_attn_job *)calloc(n, sizeof *jobs);
	uint32_t rows = 0;
	for (size_t i = 0; i < n; i++) {
		td_make(&fast_cases[i], &t[i]);
		dj_make(&t[i], &d[i]);
		jobs[i] = d[i].job;
		rows += ax_attn_rows(&jobs[i]);
	}
	fast_compare(f, g, "every fast case in one batch", t, jobs, (uint32_t)n);
	ax_attn_result *a = (ax_attn_result *)malloc(rows * sizeof *a), *b = (ax_attn_result *)malloc(rows * sizeof *b);
	int *rc = (int *)calloc(n, sizeof *rc);
	int r1 = ax__attn_fast_run(f, jobs, (uint32_t)n, a, rc), r2 = ax__attn_fast_run(f, jobs, (uint32_t)n, b, rc);
	tap(r1 == 0 && r2 == 0 && memcmp(a, b, rows * sizeof *a) == 0, "fast path: the same batch twice, bitwise identical");
	for (size_t i = 0; i < n; i++) {
		dj_free(&d[i]);
		td_free(&t[i]);
	}
	free(a), free(b), free(rc), free(t), free(d), free(jobs);
}

/* Errors only the fast path's own checks catch (its table, beside td_errors): non-finite keys in every mode and
 * KV head, NaN in Q with all heads reported; and NaN outside the window, which must not matter. */
static const td_error fast_error_cases[] = {
	{"inf in a visible key, heads", E_K_INF, HD, 0, {0}, 0, -EDOM},
	{"NaN in Q, heads (all heads)", E_Q_NAN_UNLISTED, HD, 0, {0}, 0, -EDOM},
	{"NaN in Q, mean_logit", E_Q_NAN_UNLISTED, ML, 0, {0}, 0, -EDOM},
	{"NaN in Q, mean_prob", E_Q_NAN_UNLISTED, MP, 0, {0}, 0, -EDOM},
	{"NaN in a visible key of KV head 1, mean_logit", E_K_NAN_UNUSED, ML, 0, {0}, 0, -EDOM},
	{"NaN in a visible key of KV head 1, heads", E_K_NAN_UNUSED, HD, 0, {0}, 0, -EDOM},
	{"NaN in keys outside the window, heads", E_K_NAN_OUTSIDE, HD, 0, {0}, 100, 0},
	{"NaN in keys outside the window, mean_prob", E_K_NAN_OUTSIDE, MP, 0, {0}, 300, 0},
};

/* The error tables at head_dim 128 through the fast path (the cases it takes), each between two valid jobs. */
static void fast_errors(ax_attn_fast *f)
{
	const size_t nt = ARRAY_LEN(td_errors), nx = ARRAY_LEN(fast_error_cases);
	for (size_t i = 0; i < nt + nx; i++) {
		const td_error *e = i < nt ? &td_errors[i] : &fast_error_cases[i - nt];
		tcase tc = {e->name, e->mode, BF, BF, (uint32_t)(i % 2 ? I64 : I32), 128, 4, 2, 5, 2000, e->window, 0,
			    e->n_heads, {e->heads[0], e->heads[1]}, 0, 0};
		tdata t, okd;
		djob d, dok;
		td_make(&tc, &t);
		td_make(&tc, &okd);
		td_corrupt(&t, e->what);
		dj_make(&t, &d);
		dj_make(&okd, &dok);
		if (!ax__attn_fast_eligible(&d.job) || !ax__attn_fast_eligible(&dok.job)) {
			dj_free(&d), dj_free(&dok), td_free(&t), td_free(&okd);
			continue;
		}
		ax_attn_job jobs[3] = {dok.job, d.job, dok.job};
		uint32_t r0 = ax_attn_rows(&okd.job), r1 = ax_attn_rows(&t.job), rows = 2 * r0 + r1;
		ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
		int rc[3] = {1, 1, 1}, r = ax__attn_fast_run(f, jobs, 3, out, rc);
		char why[256] = "";
		int ok = r == 0 && rc[1] == e->want && rc[0] == 0 && rc[2] == 0;
		if (!ok)
			snprintf(why, sizeof why, "run %d, rc %d %d %d, want 0 %d 0", r, rc[0], rc[1], rc[2], e->want);
		if (ok && (check_rows(&okd.job, out, why, sizeof why) || check_rows(&okd.job, out + r0 + r1, why, sizeof why)))
			ok = 0;
		tap(ok, "fast error: %s%s%s", e->name, ok ? "" : ": ", why);
		free(out);
		dj_free(&d), dj_free(&dok), td_free(&t), td_free(&okd);
	}
}

static void fast_tests(int small)
{
	cudaStream_t s;
	CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
	ax_attn_fast *f = NULL;
	int r = ax__attn_fast_new(&f, 0, s);
	ax_attn_cuda *g = open_generic();
	if (r || !f || !g) {
		printf("ok %d - # SKIP fast path: not available here (new %d, %s; generic context %s)\n", ++g_tests, r,
		       f ? "on" : "off: AX_ATTN_CUDA_FAST=0, not sm_90, or no sm_90 kernels", g ? "open" : "failed");
	} else {
		uint64_t lim = small ? 3000 : UINT64_MAX; /* --small: short cases only (compute-sanitizer is slow) */
		int ran = fast_table(f, g, fast_cases, ARRAY_LEN(fast_cases), lim);
		ran += fast_table(f, g, td_cases, ARRAY_LEN(td_cases), lim);
		if (!small) {
			ran += fast_table(f, g, big_cases, ARRAY_LEN(big_cases), lim);
			fast_batch(f, g);
		}
		fast_errors(f);
		/* again under other planner knobs: short splits everywhere with heads lists merged by their last CTA
		 * (the defaults merge them in the separate launch); then several waves (CTAs per SM over the
		 * occupancy), a split cap, the separate merge from 3 splits on (launches mixing last-CTA merges and
		 * merge CTAs: both kinds of units of the completion word) a row per warp, with the completion word and
		 * programmatic dependent launches */
		axf_knobs keep;
		ax__attn_fast_knobs(f, &keep, NULL);
		axf_knobs alt[3] = {{0, 16, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
				    {6, 32, 0, 48, 9, 3, 3, 1, 1, 1024, 4, 64, 1, 40, 1, 0, 64, 0}, keep};
		/* mean_prob from its scores (session 14; on by default since session 15 for runs of ≥ 16K mean_prob keys:
		 * here for every run) */
		alt[2].spin = 1, alt[2].pdl = 1, alt[2].prob_scores = 64, alt[2].prob_scores_min = 0;
		const uint64_t miss0 = ax__attn_fast_spin_misses(f);
		for (int a = 0; a < 3; a++) {
			ax__attn_fast_knobs(f, NULL, &alt[a]);
			printf("# fast path under knobs cps %u mink %u maxs %u minkh %u maxsh %u mergeh %u cpsh %u spin %u "
			       "pdl %u mergew %u threads %u hmerge %u graph %u tail %u/%u scores %u MiB from %u keys\n",
			       alt[a].ctas_per_sm, alt[a].min_keys, alt[a].max_splits, alt[a].min_keys_heads,
			       alt[a].max_splits_heads, alt[a].merge_heads, alt[a].ctas_per_sm_heads, alt[a].spin, alt[a].pdl,
			       alt[a].merge_warp, alt[a].threads, alt[a].host_merge, alt[a].graph, alt[a].tail, alt[a].tail_blk,
			       alt[a].prob_scores, alt[a].prob_scores_min);
			/* cases up to 20K keys (the 120K / 200K float64 references take seconds each: the defaults' table
			 * above has them) */
			ran += fast_table(f, g, fast_cases, ARRAY_LEN(fast_cases), lim < 20000 ? lim : 20000);
			if (!small)
				fast_batch(f, g);
			if (a == 2)
				fast_errors(f); /* error codes through the completion word's wait */
		}
		if (!small) { /* ≥ AXF_POOL_MIN_ROWS rows: prefill and finish on 4 host threads (knob threads) */
			axf_knobs k4 = keep;
			k4.threads = 4, k4.spin = 1;
			ax__attn_fast_knobs(f, NULL, &k4);
			enum { NP = 24 };
			tdata t[NP];
			djob d[NP];
			ax_attn_job jobs[NP];
			for (int i = 0; i < NP; i++) {
				const tcase c = {"pool", (uint32_t)(i % 5 == 2 ? ML : HD), BF, BF, I32, 128, 32, 8, 10, (uint64_t)(1500 + 97 * i), 0, 0, 0, {0}, 1, 0};
				td_make(&c, &t[i]);
				dj_make(&t[i], &d[i]);
				jobs[i] = d[i].job;
			}
			fast_compare(f, g, "24 jobs (~620 rows) with knobs threads 4, spin 1", t, jobs, NP);
			for (int i = 0; i < NP; i++)
				dj_free(&d[i]), td_free(&t[i]);
		}
		const uint64_t miss = ax__attn_fast_spin_misses(f) - miss0;
		tap(miss == 0, "fast path, knob spin: every wait ended on the completion word (%llu ended on the stream)",
		    (unsigned long long)miss);
		ax__attn_fast_knobs(f, NULL, &keep);
		/* no room for mean_prob's scores (session 15: knob prob_scores, on by default from 16384 keys): a scratch
		 * limit of the scores' own size; the run is planned again on the two passes over K and still right */
		int fb_ran = small; /* (--small: not run) */
		for (size_t i = 0; !small && i < ARRAY_LEN(big_cases); i++) {
			const tcase *c = &big_cases[i];
			if (c->mode != MP || c->n_keys < keep.prob_scores_min || c->n_keys > 20000 || !keep.prob_scores)
				continue;
			fb_ran = 1;
			tdata t;
			djob d;
			td_make(c, &t);
			dj_make(&t, &d);
			char name[160];
			const uint64_t fb0 = ax__attn_fast_sc_fallbacks(f);
			fast_compare(f, g, c->name, &t, &d.job, 1); /* with its scores */
			const uint64_t fb1 = ax__attn_fast_sc_fallbacks(f);
			ax__attn_fast_limit_scratch(f, (size_t)axf_sc_floats(c->n_keys, c->H) * 4);
			snprintf(name, sizeof name, "%s, no room for its scores", c->name);
			fast_compare(f, g, name, &t, &d.job, 1);
			ax__attn_fast_limit_scratch(f, 0);
			const uint64_t fb2 = ax__attn_fast_sc_fallbacks(f);
			tap(fb1 == fb0 && fb2 > fb1, "%s: planned again without its scores only when they had no room (%llu, %llu)",
			    c->name, (unsigned long long)(fb1 - fb0), (unsigned long long)(fb2 - fb1));
			dj_free(&d);
			td_free(&t);
			break;
		}
		if (!fb_ran)
			tap(0, "no room for mean_prob's scores: no mean_prob case of 16K-20K keys to run it on (knobs %u MiB from "
			       "%u keys)", keep.prob_scores, keep.prob_scores_min);
		printf("# fast path: %d eligible cases compared with the generic path\n", ran);
	}
	ax__attn_fast_free(f);
	ax_attn_cuda_close(g);
	cudaStreamDestroy(s);
}
/* ==== end of fast path block ======================================================================================= */

/* ---- benchmark ----------------------------------------------------------------------------------------------------- */

__global__ void fill_bf16(uint16_t *k, size_t n, uint64_t seed)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
		uint64_t z = (i + 1) * 0x9e3779b97f4a7c15ull ^ seed;
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
		z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
		float f = (float)((z >> 40) & 0xffff) / 32768.0f - 1.0f; /* [-1, 1) */
		k[i] = (uint16_t)(__float_as_uint(f) >> 16);
	}
}

__global__ void stream_read(const uint4 *p, size_t n, unsigned *sink)
{
	unsigned acc = 0;
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
		uint4 v = __ldg(p + i);
		acc ^= v.x ^ v.y ^ v.z ^ v.w;
	}
	if (acc == 0x12345678u)
		*sink = acc;
}

static double now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
	qsort(v, n, sizeof *v, cmp_d);
	return v[n / 2];
}

/* Median µs of a streaming read of `bytes` at p + (rep mod rot)·stride (the floor; rotated like the runs, so
 * short shapes do not read from a warm L2), events. */
static double floor_us(const void *p, size_t bytes, size_t stride, int rot, int reps)
{
	cudaEvent_t a, b;
	unsigned *sink;
	double t[64];
	CK(cudaMalloc(&sink, 4));
	CK(cudaEventCreate(&a));
	CK(cudaEventCreate(&b));
	int dev, sms;
	CK(cudaGetDevice(&dev));
	CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
	for (int r = -2; r < reps; r++) {
		const char *src = (const char *)p + (size_t)((r + 2) % rot) * stride;
		CK(cudaEventRecord(a));
		stream_read<<<sms * 8, 256>>>((const uint4 *)src, bytes / 16, sink);
		CK(cudaEventRecord(b));
		CK(cudaEventSynchronize(b));
		float ms;
		CK(cudaEventElapsedTime(&ms, a, b));
		if (r >= 0)
			t[r] = ms * 1e3;
	}
	cudaEventDestroy(a);
	cudaEventDestroy(b);
	cudaFree(sink);
	return median(t, reps);
}

/* ---- bench and sweep data: the issue's shape (bf16, H_q 32, H_kv 8, D 128, top-10), B requests of n keys, key
 * rows in a shuffled pool; `rot` disjoint sets of requests (each its own slots), used in turn by the repeats so
 * that a short shape's keys are not in L2 from the previous repeat (sets ≥ 200 MB together, at most 16). ---- */

enum { B_H = 32, B_HKV = 8, B_D = 128, B_K = 10, B_MAXREPS = 64 };

typedef struct bdata {
	const char *name;
	uint32_t B, rot;
	uint64_t n;
	int reps;
	uint16_t *k;            /* device pool: B·n·rot slots */
	int32_t *idx;           /* device index rows: set r, request b at (r·B + b)·n */
	void *q;
	size_t kbytes, ibytes;  /* of one set */
	double floor;           /* µs: streaming read of one set's K and index bytes */
	ax_attn_job *jobs[3];   /* per mode: rot·B jobs, set r at r·B */
	ax_attn_result *out;
	ax_attn_cuda *oc;       /* out's context (ax_attn_cuda_results_alloc), or NULL (malloc) */
	int *rc;
	uint32_t rows[3];       /* result rows of one set, per mode */
} bdata;

/* The context whose result rows the bench's request sets take (ax_attn_cuda_results_alloc: the rows written by
 * the GPU directly), or NULL (malloc: the staging and the host's copy); bench() sets it unless AX_BENCH_ZC=0. */
static ax_attn_cuda *g_bench_zc;

static const uint32_t b_modes[3] = {ML, HD, MP};

static const char *mode_name(uint32_t m)
{
	return m == ML ? "mean_logit" : m == HD ? "heads" : "mean_prob";
}

static void bd_make(bdata *d, const char *name, uint32_t B, uint64_t n, int reps)
{
	memset(d, 0, sizeof *d);
	d->name = name, d->B = B, d->n = n, d->reps = reps;
	d->kbytes = (size_t)B * n * B_HKV * B_D * 2, d->ibytes = (size_t)B * n * 4;
	size_t want = (size_t)200 << 20;
	d->rot = (uint32_t)((want + d->kbytes - 1) / d->kbytes);
	d->rot = d->rot < 1 ? 1 : d->rot > 16 ? 16 : d->rot;
	uint64_t slots = (uint64_t)B * n * d->rot;
	CK(cudaMalloc(&d->k, d->kbytes * d->rot));
	CK(cudaMalloc(&d->idx, d->ibytes * d->rot));
	CK(cudaMalloc(&d->q, (size_t)B_H * B_D * 2));
	fill_bf16<<<1024, 256>>>(d->k, d->kbytes * d->rot / 2, td_u64());
	int32_t *h = (int32_t *)malloc(d->ibytes * d->rot);
	for (uint64_t i = 0; i < slots; i++)
		h[i] = (int32_t)i;
	for (uint64_t i = slots - 1; i > 0; i--) {
		uint64_t j = td_u64() % (i + 1);
		int32_t x = h[i];
		h[i] = h[j], h[j] = x;
	}
	uint16_t hq[B_H * B_D];
	for (uint32_t i = 0; i < B_H * B_D; i++)
		hq[i] = ax_f32_to_bf16((float)td_uni());
	CK(cudaMemcpy(d->idx, h, d->ibytes * d->rot, cudaMemcpyHostToDevice));
	CK(cudaMemcpy(d->q, hq, sizeof hq, cudaMemcpyHostToDevice));
	CK(cudaDeviceSynchronize());
	free(h);
	/* the floor: each set's slots are spread over the whole pool, so read set-sized regions in turn */
	d->floor = floor_us(d->k, d->kbytes, d->kbytes, (int)d->rot, 10) * (double)(d->kbytes + d->ibytes) / d->kbytes;
	for (int m = 0; m < 3; m++) {
		d->jobs[m] = (ax_attn_job *)calloc((size_t)B * d->rot, sizeof(ax_attn_job));
		for (uint32_t i = 0; i < B * d->rot; i++) {
			ax_attn_job *j = &d->jobs[m][i];
			j->q = d->q, j->q_dtype = BF, j->k = d->k, j->k_dtype = BF, j->k_scale = 1;
			j->k_stride[0] = B_HKV * B_D, j->k_stride[1] = B_D, j->k_stride[2] = 1, j->n_slots = slots;
			j->index = d->idx + (uint64_t)i * n, j->index_dtype = I32;
			j->position = n - 1;
			j->n_q_heads = B_H, j->n_kv_heads = B_HKV, j->head_dim = B_D;
			j->scale = 1.0f / sqrtf((float)B_D);
			j->mode = b_modes[m], j->top_k = B_K;
		}
		d->rows[m] = B * (b_modes[m] == HD ? B_H : 1);
	}
	d->oc = g_bench_zc;
	d->out = d->oc ? ax_attn_cuda_results_alloc(d->oc, (size_t)B * B_H)
		       : (ax_attn_result *)malloc((size_t)B * B_H * sizeof *d->out);
	d->rc = (int *)malloc(B * sizeof *d->rc);
}

static void bd_free(bdata *d)
{
	for (int m = 0; m < 3; m++)
		free(d->jobs[m]);
	if (d->oc)
		ax_attn_cuda_results_free(d->oc, d->out);
	else
		free(d->out);
	free(d->rc);
	cudaFree(d->k), cudaFree(d->idx), cudaFree(d->q);
}

/* Timings of one (shape, mode) through one path: medians over the repeats (set r mod rot in turn). */
typedef struct bmeas {
	double e2e;  /* µs, host clock around the synchronous call */
	double kern; /* µs, events around the fast path's launches (-1: generic path) */
	int bad;     /* a run failed, or a job's code was not 0 */
} bmeas;

/* f: time ax__attn_fast_run (with kernel events); else c: ax_attn_cuda_run. */
static bmeas bd_time(bdata *d, int m, ax_attn_fast *f, ax_attn_cuda *c, int reps)
{
	double te[B_MAXREPS], tk[B_MAXREPS];
	bmeas r = {0, -1, 0};
	reps = reps > B_MAXREPS ? B_MAXREPS : reps;
	for (int i = -2; i < reps; i++) {
		const ax_attn_job *jobs = d->jobs[m] + (size_t)((i + 2) % d->rot) * d->B;
		double t0 = now_us();
		int x = f ? ax__attn_fast_run(f, jobs, d->B, d->out, d->rc) : ax_attn_cuda_run(c, jobs, d->B, d->out, d->rc);
		double t1 = now_us();
		for (uint32_t b = 0; b < d->B; b++)
			x |= d->rc[b];
		r.bad |= x != 0;
		if (i >= 0)
			te[i] = t1 - t0, tk[i] = f ? ax__attn_fast_kernel_us(f) : -1;
	}
	r.e2e = median(te, reps);
	r.kern = f ? median(tk, reps) : -1;
	return r;
}

static const struct bshape {
	const char *name;
	uint32_t B;
	uint64_t n;
	int reps;
} b_shapes[] = {{"1x4K", 1, 4096, 50},     {"1x32K", 1, 32768, 30},  {"1x128K", 1, 131072, 20},
		{"1x1M", 1, 1048576, 7},   {"64x4K", 64, 4096, 15},  {"8x128K", 8, 131072, 7}};

static void bench_head(const char *what)
{
	cudaDeviceProp prop;
	int dev;
	CK(cudaGetDevice(&dev));
	CK(cudaGetDeviceProperties(&prop, dev));
	printf("# %s: %s (%d SMs), bf16 H_q %u H_kv %u D %u top-%u; request sets rotated over >= 200 MB (no warm L2); "
	       "medians\n",
	       what, prop.name, prop.multiProcessorCount, B_H, B_HKV, B_D, B_K);
}

/* The variants the bench times beside the defaults (each changes one thing of the defaults): programmatic dependent
 * launch off, the completion word on, the heads merge a row per CTA always (run 8's), the host's rows on the
 * calling thread alone, no host merge, heads lists merged by each pass-job's last CTA (no merge launch), the
 * kernels as one graph launch in every run (knob graph 1) or in none (0; the default sends runs of ≤ 16384 keys as
 * one), no tail (knob tail 0: every split streams a static share). */
static const struct bvar {
	const char *name;
	uint32_t spin, pdl, mergew, threads, hmerge, mergeh, graph, tail, scores; /* ~0u: the default's */
} b_vars[] = {{"nopdl", ~0u, 0, ~0u, ~0u, ~0u, ~0u, ~0u, ~0u, ~0u},
	      {"spin", 1, ~0u, ~0u, ~0u, ~0u, ~0u, ~0u, ~0u, ~0u},
	      {"mergew0", ~0u, ~0u, 0, ~0u, ~0u, ~0u, ~0u, ~0u, ~0u},
	      {"thr0", ~0u, ~0u, ~0u, 0, ~0u, ~0u, ~0u, ~0u, ~0u},
	      {"nohm", ~0u, ~0u, ~0u, ~0u, 0, ~0u, ~0u, ~0u, ~0u},
	      {"mh0", ~0u, ~0u, ~0u, ~0u, ~0u, 0, ~0u, ~0u, ~0u},
	      {"graph", ~0u, ~0u, ~0u, ~0u, ~0u, ~0u, 1, ~0u, ~0u},
	      {"nograph", ~0u, ~0u, ~0u, ~0u, ~0u, ~0u, 0, ~0u, ~0u},
	      {"notail", ~0u, ~0u, ~0u, ~0u, ~0u, ~0u, ~0u, 0, ~0u},
	      /* mean_prob's two passes over K, without the scores (knob prob_scores 0; the default since session 15
	       * reads the scores its logsumexp pass wrote for runs of ≥ 16K mean_prob keys) */
	      {"noscores", ~0u, ~0u, ~0u, ~0u, ~0u, ~0u, ~0u, ~0u, 0}};

/* Medians of timed runs of one (shape, mode) through the fast state fe (no events): end to end and the host's
 * four parts (ax__attn_fast_host_us: launch, prefill, wait, finish). */
typedef struct bhost {
	double e2e, part[6];
	int bad;
} bhost;

static bhost bd_time_host(bdata *d, int m, ax_attn_fast *fe, int reps)
{
	double te[B_MAXREPS], tp[6][B_MAXREPS];
	bhost r;
	memset(&r, 0, sizeof r);
	reps = reps > B_MAXREPS ? B_MAXREPS : reps;
	for (int i = -2; i < reps; i++) {
		const ax_attn_job *jobs = d->jobs[m] + (size_t)((i + 2) % d->rot) * d->B;
		double t0 = now_us();
		int x = ax__attn_fast_run(fe, jobs, d->B, d->out, d->rc);
		double t1 = now_us();
		for (uint32_t b = 0; b < d->B; b++)
			x |= d->rc[b];
		r.bad |= x != 0;
		if (i < 0)
			continue;
		double h[6];
		ax__attn_fast_host_us(fe, h);
		te[i] = t1 - t0;
		for (int k = 0; k < 6; k++)
			tp[k][i] = h[k];
	}
	r.e2e = median(te, reps);
	for (int k = 0; k < 6; k++)
		r.part[k] = median(tp[k], reps);
	return r;
}

/*
 * One "gap" line: the same request sets, interleaved call by call (so drift between them cancels), through the
 * default context (ax_attn_cuda_run: the prefill grouping and the fast dispatch before the fast path), through
 * that context's own fast state directly (ax__attn_fast_run), and through the separate state fe; medians, µs.
 * Also the dispatch's eligibility pass alone (axf_eligible over the batch, host only). What separates the main
 * table's e2e column from the var lines' (session 13).
 */
static void bench_gap(bdata *d, int m, ax_attn_cuda *c, ax_attn_fast *fe)
{
	ax_attn_fast *cf = ax__attn_cuda_fast_state(c);
	if (!cf || !fe)
		return;
	double t[4][B_MAXREPS];
	int bad = 0;
	const int reps = d->reps > B_MAXREPS ? B_MAXREPS : d->reps;
	for (int i = -2; i < reps; i++) {
		const ax_attn_job *jobs = d->jobs[m] + (size_t)((i + 2) % d->rot) * d->B;
		double tt[4];
		for (int w = 0; w < 3; w++) {
			const int k = (w + i + 2) % 3; /* rotated: no path always runs first */
			const double t0 = now_us();
			int x = k == 0 ? ax_attn_cuda_run(c, jobs, d->B, d->out, d->rc)
				       : ax__attn_fast_run(k == 1 ? cf : fe, jobs, d->B, d->out, d->rc);
			tt[k] = now_us() - t0;
			for (uint32_t b = 0; b < d->B; b++)
				x |= d->rc[b];
			bad |= x != 0;
		}
		const double t0 = now_us();
		uint32_t nf = 0;
		for (uint32_t b = 0; b < d->B; b++)
			nf += (uint32_t)axf_eligible(&jobs[b]);
		tt[3] = now_us() - t0;
		bad |= nf != d->B;
		if (i >= 0)
			for (int k = 0; k < 4; k++)
				t[k][i] = tt[k];
	}
	printf("gap      %-8s %-10s context %.1f its-fast-state %.1f separate-state %.1f | eligibility pass %.2f%s\n",
	       d->name, mode_name(b_modes[m]), median(t[0], reps), median(t[1], reps), median(t[2], reps),
	       median(t[3], reps), bad ? "  RUN FAILED" : "");
	fflush(stdout);
}

/* One "var" line per variant: e2e through fe (ax__attn_fast_run, no events) with its host parts, kernel through fk
 * (events). */
static void bench_vars(bdata *d, int m, ax_attn_fast *fe, ax_attn_fast *fk, const axf_knobs *def)
{
	for (size_t v = 0; v < ARRAY_LEN(b_vars); v++) {
		axf_knobs k = *def;
		const struct bvar *b = &b_vars[v];
		if (b->scores != ~0u && b_modes[m] != AX_MODE_MEAN_PROB)
			continue;
		k.prob_scores = b->scores != ~0u ? b->scores : k.prob_scores;
		k.spin = b->spin != ~0u ? b->spin : k.spin, k.pdl = b->pdl != ~0u ? b->pdl : k.pdl;
		k.merge_warp = b->mergew != ~0u ? b->mergew : k.merge_warp;
		k.threads = b->threads != ~0u ? b->threads : k.threads;
		k.host_merge = b->hmerge != ~0u ? b->hmerge : k.host_merge;
		k.merge_heads = b->mergeh != ~0u ? b->mergeh : k.merge_heads;
		k.graph = b->graph != ~0u ? b->graph : k.graph;
		k.tail = b->tail != ~0u ? b->tail : k.tail;
		ax__attn_fast_knobs(fe, NULL, &k);
		ax__attn_fast_knobs(fk, NULL, &k);
		bhost e = bd_time_host(d, m, fe, d->reps);
		bmeas t = bd_time(d, m, fk, NULL, d->reps);
		printf("var      %-8s %-10s %-11s %9.1f %9.1f %8.2f %8.2f | host launch %.1f prefill %.1f wait %.1f finish "
		       "%.1f (plan %.1f upload %.1f)%s\n",
		       d->name, mode_name(b_modes[m]), b_vars[v].name, e.e2e, t.kern, e.e2e / d->floor, t.kern / d->floor,
		       e.part[0], e.part[1], e.part[2], e.part[3], e.part[4], e.part[5], e.bad || t.bad ? "  RUN FAILED" : "");
	}
	ax__attn_fast_knobs(fe, NULL, def);
	ax__attn_fast_knobs(fk, NULL, def);
	fflush(stdout);
}

/* One "trace" line: medians over the repeats of where a run's time goes on the GPU (ax__attn_fast_trace: global
 * timer at points of the kernels, µs after the first split CTA started; "-" where the run has no such point), and
 * the kernel time (events) of the same runs. ft: a state with tracing and timing on, the default knobs. */
static void bench_trace(bdata *d, int m, ax_attn_fast *ft)
{
	enum { NF = AXF_TR_N - 1 };
	static const char *const names[NF] = {"start-last", "data-first", "data-last", "loop-first", "loop-last",
					      "merge-first", "merge-last", "merge-done", "mk-start", "mk-last",
					      "mk-go", "mk-done", "m-load", "m-bar", "m-scan", "wloop-last", "epi-last"};
	double v[NF][B_MAXREPS], kern[B_MAXREPS], pc[5][B_MAXREPS];
	int nv[NF] = {0}, reps = d->reps > B_MAXREPS ? B_MAXREPS : d->reps, bad = 0, npc = 0;
	for (int i = -2; i < reps; i++) {
		const ax_attn_job *jobs = d->jobs[m] + (size_t)((i + 2) % d->rot) * d->B;
		int x = ax__attn_fast_run(ft, jobs, d->B, d->out, d->rc);
		for (uint32_t b = 0; b < d->B; b++)
			x |= d->rc[b];
		bad |= x != 0;
		if (i < 0)
			continue;
		static unsigned long long t[AXF_TR_ALL];
		ax__attn_fast_trace_get(ft, t);
		/* the split CTAs' own loop ends: percentiles over the CTAs of this run */
		static double ce[AXF_TR_CTAS];
		int nce = 0;
		for (int b = 0; b < AXF_TR_CTAS; b++)
			if (t[AXF_TR_N + b] != 0 && t[AXF_TR_N + b] >= t[0])
				ce[nce++] = (double)(t[AXF_TR_N + b] - t[0]) * 1e-3;
		if (nce) {
			qsort(ce, (size_t)nce, sizeof *ce, cmp_d);
			for (int q = 0; q < 5; q++)
				pc[q][npc] = ce[(size_t)((nce - 1) * q / 4)];
			npc++;
		}
		kern[i] = ax__attn_fast_kernel_us(ft);
		for (int f = 0; f < NF; f++) {
			const unsigned long long x1 = t[f + 1];
			if (x1 != 0 && x1 != ~0ull && x1 >= t[0])
				v[f][nv[f]++] = (double)(x1 - t[0]) * 1e-3;
		}
	}
	printf("trace    %-8s %-10s kern %7.1f |", d->name, mode_name(b_modes[m]), median(kern, reps));
	for (int f = 0; f < NF; f++) {
		if (nv[f])
			printf(" %s %.1f", names[f], median(v[f], nv[f]));
		else
			printf(" %s -", names[f]);
	}
	if (npc) /* medians over the runs of each percentile */
		printf(" | cta-ends min %.1f q1 %.1f med %.1f q3 %.1f max %.1f", median(pc[0], npc), median(pc[1], npc),
		       median(pc[2], npc), median(pc[3], npc), median(pc[4], npc));
	printf("%s\n", bad ? "  RUN FAILED" : "");
	fflush(stdout);
}

/*
 * --bench: per shape and mode, the default context's ax_attn_cuda_run end to end (host clock: plan, upload,
 * launches, download, expansion of the rows, one synchronisation — what a caller waits for), the fast path's
 * kernels alone (events around its launches, same knobs as the default context), the floor, and the generic
 * path (a context with AX_ATTN_CUDA_FAST=0) end to end. Then, per shape and mode, "var" lines: the fast path
 * alone (ax__attn_fast_run, end to end without events, and kernel with events) under the variants of b_vars.
 */
/* Is `name` an entry of the comma-separated `list`? */
static int bench_listed(const char *list, const char *name)
{
	const size_t n = strlen(name);
	for (const char *p = list; *p;) {
		const char *e = strchr(p, ',');
		const size_t len = e ? (size_t)(e - p) : strlen(p);
		if (len == n && strncmp(p, name, n) == 0)
			return 1;
		p += len + (e != NULL);
	}
	return 0;
}

static int bench(ax_attn_cuda *c)
{
	ax_attn_cuda *cg = open_generic();
	cudaStream_t s;
	CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
	ax_attn_fast *f = NULL, *fe = NULL, *ft = NULL;
	if (ax__attn_fast_new(&f, 0, s) != 0 || !f || ax__attn_fast_timing(f, 1) != 0 || ax__attn_fast_new(&fe, 0, s) != 0)
		printf("# fast path not available here: kernel column empty\n");
	if (ax__attn_fast_new(&ft, 0, s) != 0 || !ft || ax__attn_fast_timing(ft, 1) != 0 || ax__attn_fast_trace(ft, 1) != 0)
		ft = NULL;
	/* AX_BENCH_ZC=0: the result rows in malloc'd memory (the staging and the host's copy, as before session 18);
	 * else in the default context's own (ax_attn_cuda_results_alloc), as attnx-capture takes them */
	const char *zc_env = getenv("AX_BENCH_ZC");
	g_bench_zc = zc_env && strcmp(zc_env, "0") == 0 ? NULL : c;
	axf_knobs kn = {};
	ax__attn_fast_knobs(f, &kn, NULL);
	bench_head("bench");
	printf("# e2e = ax_attn_cuda_run (default context) on the host clock; kernel = the fast path's launches (events; "
	       "knobs cps %u mink %u maxs %u minkh %u maxsh %u mergeh %u cpsh %u spin %u pdl %u mergew %u threads %u "
	       "hmerge %u graph %u tail %u/%u scores %u MiB from %u keys); generic = AX_ATTN_CUDA_FAST=0, e2e\n",
	       kn.ctas_per_sm, kn.min_keys, kn.max_splits, kn.min_keys_heads, kn.max_splits_heads, kn.merge_heads,
	       kn.ctas_per_sm_heads, kn.spin, kn.pdl, kn.merge_warp, kn.threads, kn.host_merge, kn.graph, kn.tail,
	       kn.tail_blk, kn.prob_scores, kn.prob_scores_min);
	printf("# result rows: %s\n", g_bench_zc ? "the default context's (ax_attn_cuda_results_alloc: written by the GPU)"
						 : "malloc'd (AX_BENCH_ZC=0: staged, copied by the host)");
	printf("# var lines: shape mode variant fast-e2e-us kern-us e2e-xfl kern-xfl (ax__attn_fast_run alone: no "
	       "dispatch; e2e without events; each variant = the defaults with one change, see b_vars) | the host's "
	       "parts of that e2e (medians, µs): plan+upload+launch calls, prefill, wait, finish (the first's plan and "
	       "upload call)\n");
	printf("# gap lines: e2e µs, medians of calls interleaved call by call: through the default context "
	       "(ax_attn_cuda_run), its own fast state (ax__attn_fast_run), the var lines' separate state; and the fast "
	       "dispatch's eligibility pass alone (bench_gap)\n");
	printf("# trace lines: the default knobs, medians, µs after the first split CTA's start (GPU global timer): last "
	       "split CTA start, first stage's keys in (first/last CTA), streaming loops ended (first/last), last-CTA "
	       "merges started (first/last) and done (last), merge kernel CTAs started (first/last), past their "
	       "grid-dependency wait (last), done (last); a row merge's (either kind) loads staged, bar set, survivors "
	       "counted (last); any warp's loop ended (last), a split CTA's partial rows written (last); cta-ends: the split CTAs' own "
	       "loop ends (their last warp's; the last split launch's), quartiles over the CTAs\n");
	printf("%-8s %-10s %9s %9s %9s %8s %8s %10s %8s\n", "shape", "mode", "e2e us", "kern us", "floor us",
	       "e2e xfl", "kern xfl", "generic us", "gen xfl");
	/* AX_BENCH_SHAPES="1x128K,1x1M" (say): only those shapes; AX_BENCH_BRIEF=1: the main table's fast columns only
	 * (no generic run, no var or trace lines) — for A/B runs of two builds in little device time; AX_BENCH_GAP=1
	 * adds the gap lines (bench_gap) to a brief run. */
	const char *only = getenv("AX_BENCH_SHAPES"), *brief_env = getenv("AX_BENCH_BRIEF");
	const int brief = brief_env && strcmp(brief_env, "1") == 0;
	const char *gap_env = getenv("AX_BENCH_GAP"); /* 1: the gap lines in brief runs too */
	const int gap = gap_env && strcmp(gap_env, "1") == 0;
	for (size_t i = 0; i < ARRAY_LEN(b_shapes); i++) {
		if (only && !bench_listed(only, b_shapes[i].name))
			continue;
		bdata d;
		bd_make(&d, b_shapes[i].name, b_shapes[i].B, b_shapes[i].n, b_shapes[i].reps);
		for (int m = 0; m < 3; m++) {
			bmeas e = bd_time(&d, m, NULL, c, d.reps);
			bmeas k = f ? bd_time(&d, m, f, NULL, d.reps) : bmeas{0, -1, 0};
			bmeas g = cg && !brief ? bd_time(&d, m, NULL, cg, d.reps < 10 ? d.reps : 10) : bmeas{0, -1, 0};
			printf("%-8s %-10s %9.1f %9.1f %9.1f %8.2f %8.2f %10.1f %8.2f%s\n", d.name, mode_name(b_modes[m]),
			       e.e2e, k.kern, d.floor, e.e2e / d.floor, k.kern / d.floor, g.e2e, g.e2e / d.floor,
			       e.bad || k.bad || g.bad ? "  RUN FAILED" : "");
			fflush(stdout);
			if (fe && (!brief || gap))
				bench_gap(&d, m, c, fe);
			if (f && fe && !brief)
				bench_vars(&d, m, fe, f, &kn);
			if (ft && !brief)
				bench_trace(&d, m, ft);
		}
		bd_free(&d);
	}
	g_bench_zc = NULL;
	ax__attn_fast_free(f);
	ax__attn_fast_free(fe);
	ax__attn_fast_free(ft);
	cudaStreamDestroy(s);
	ax_attn_cuda_close(cg);
	return 0;
}

/* ---- --sweep: the fast path's planner knobs (attn_cuda_fast.h, axf_knobs) over a small grid ---------------------- */

/* One knob set of the grid; `modes`: bit m = b_modes[m] is affected (others are not rerun). */
typedef struct sweep_cfg {
	axf_knobs kn;
	unsigned modes;
} sweep_cfg;

/* The grid: the default; mean modes (and mean_prob's logsumexp pass) over least keys per split and CTAs per SM;
 * heads lists over least keys, a split cap, the separate merge, their own CTAs per SM. Others at the defaults. */
static uint32_t sweep_grid(sweep_cfg *g, uint32_t cap, const axf_knobs *def)
{
	uint32_t n = 0;
	static const uint32_t mink[] = {16, 32, 64, 128, 256, 512, 1024}, mink_w[] = {16, 64, 256};
	static const uint32_t cps_w[] = {3, 4, 8}, minkh[] = {16, 64, 256, 1024}, maxsh[] = {0, 8, 32}, cpsh[] = {0, 1, 4};
	g[n].kn = *def, g[n++].modes = 7;
	for (size_t a = 0; a < ARRAY_LEN(mink) && n < cap; a++) {
		g[n].kn = *def, g[n].kn.ctas_per_sm = 0, g[n].kn.min_keys = mink[a], g[n++].modes = 5;
	}
	for (size_t c = 0; c < ARRAY_LEN(cps_w); c++)
		for (size_t a = 0; a < ARRAY_LEN(mink_w) && n < cap; a++) {
			g[n].kn = *def, g[n].kn.ctas_per_sm = cps_w[c], g[n].kn.min_keys = mink_w[a], g[n++].modes = 5;
		}
	for (size_t c = 0; c < ARRAY_LEN(cpsh); c++)
		for (size_t a = 0; a < ARRAY_LEN(minkh); a++)
			for (size_t b = 0; b < ARRAY_LEN(maxsh); b++)
				for (uint32_t sep = 0; sep < 2 && n < cap; sep++) {
					g[n].kn = *def, g[n].kn.ctas_per_sm_heads = cpsh[c], g[n].kn.min_keys_heads = minkh[a];
					g[n].kn.max_splits_heads = maxsh[b], g[n].kn.merge_heads = sep, g[n++].modes = 2;
				}
	return n;
}

/* Rows of set 0 through the fast path against the generic path's rows (same codes, fast_same). */
static int sweep_check(bdata *d, int m, ax_attn_fast *f, const ax_attn_result *gen, char *why, size_t len)
{
	int x = ax__attn_fast_run(f, d->jobs[m], d->B, d->out, d->rc);
	for (uint32_t b = 0; b < d->B; b++)
		x |= d->rc[b];
	if (x)
		return snprintf(why, len, "fast run %d (cuda %d)", x, ax__attn_fast_take_error(f)), 1;
	double maxd = 0;
	return fast_same(d->out, gen, d->rows[m], &maxd, why, len) != 0;
}

/*
 * --sweep: for the bench's shapes (1 x 4K, 1 x 128K, 1 x 1M, 64 x 4K) and modes, every knob set of sweep_grid:
 * kernel µs (events), end to end µs (host clock around ax__attn_fast_run), × floor, and a check of set 0's rows
 * against the generic path's (once per shape and mode, also timed). Last, per shape and mode, the best knob set
 * by kernel time and by end-to-end time, beside the default's. Lines start with "sweep" / "best" for grep.
 */
static int sweep(void)
{
	static const int pick[] = {0, 2, 3, 4}; /* b_shapes: 1x4K, 1x128K, 1x1M, 64x4K */
	cudaStream_t s;
	CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
	ax_attn_fast *f = NULL;
	ax_attn_cuda *cg = open_generic();
	if (ax__attn_fast_new(&f, 0, s) != 0 || !f || ax__attn_fast_timing(f, 1) != 0 || !cg) {
		printf("Bail out! sweep: the fast path or the generic context is not available here\n");
		return 1;
	}
	axf_knobs def;
	ax__attn_fast_knobs(f, &def, NULL);
	static sweep_cfg grid[160];
	uint32_t ng = sweep_grid(grid, ARRAY_LEN(grid), &def);
	bench_head("sweep");
	printf("# %u knob sets; cps = CTAs per SM planned (0: occupancy), mink/maxs = least keys / most splits per split "
	       "(mean modes), minkh/maxsh = the same for heads lists, mergeh = separate heads merge from this many "
	       "splits (0 off), cpsh = CTAs per SM of launches with heads lists (0: cps); kern = launches (events), "
	       "e2e = host clock around ax__attn_fast_run\n", ng);
	printf("%-6s %-7s %-10s %4s %5s %4s %5s %5s %6s %4s %9s %9s %8s %8s %s\n", "", "shape", "mode", "cps", "mink",
	       "maxs", "minkh", "maxsh", "mergeh", "cpsh", "kern us", "e2e us", "kern xfl", "e2e xfl", "check");
	int failed = 0;
	char best[64][200];
	int nb = 0;
	for (size_t si = 0; si < ARRAY_LEN(pick); si++) {
		const struct bshape *bs = &b_shapes[pick[si]];
		bdata d;
		bd_make(&d, bs->name, bs->B, bs->n, bs->reps);
		ax_attn_result *gen = (ax_attn_result *)malloc((size_t)d.B * B_H * sizeof *gen);
		for (int m = 0; m < 3; m++) {
			int x = ax_attn_cuda_run(cg, d.jobs[m], d.B, gen, d.rc); /* set 0: the reference rows */
			for (uint32_t b = 0; b < d.B; b++)
				x |= d.rc[b];
			bmeas g = bd_time(&d, m, NULL, cg, d.reps < 5 ? d.reps : 5);
			printf("sweep  %-7s %-10s %-43s %9s %9.1f %8s %8.2f %s\n", d.name, mode_name(b_modes[m]),
			       "generic path (AX_ATTN_CUDA_FAST=0)", "-", g.e2e, "-", g.e2e / d.floor,
			       x || g.bad ? "RUN FAILED" : "ref");
			double bk = 1e30, be = 1e30, dk = 0, de = 0;
			uint32_t ik = 0, ie = 0;
			for (uint32_t c = 0; c < ng; c++) {
				if (!(grid[c].modes >> m & 1))
					continue;
				const axf_knobs *k = &grid[c].kn;
				ax__attn_fast_knobs(f, NULL, k);
				bmeas r = bd_time(&d, m, f, NULL, d.reps);
				char why[256] = "";
				int bad = r.bad || x || sweep_check(&d, m, f, gen, why, sizeof why);
				failed |= bad;
				printf("sweep  %-7s %-10s %4u %5u %4u %5u %5u %6u %4u %9.1f %9.1f %8.2f %8.2f %s%s%s\n", d.name,
				       mode_name(b_modes[m]), k->ctas_per_sm, k->min_keys, k->max_splits, k->min_keys_heads,
				       k->max_splits_heads, k->merge_heads, k->ctas_per_sm_heads, r.kern, r.e2e, r.kern / d.floor,
				       r.e2e / d.floor,
				       bad ? "FAIL " : "ok", bad ? why : "", c == 0 ? "  (default)" : "");
				fflush(stdout);
				if (c == 0)
					dk = r.kern, de = r.e2e;
				if (!bad && r.kern < bk)
					bk = r.kern, ik = c;
				if (!bad && r.e2e < be)
					be = r.e2e, ie = c;
			}
			const axf_knobs *a = &grid[ik].kn, *b = &grid[ie].kn;
			if (nb < 64)
				snprintf(best[nb++], sizeof best[0],
					 "best   %-7s %-10s floor %7.1f | default kern %7.1f e2e %7.1f | best kern %7.1f (%.2fx) "
					 "at %u/%u/%u/%u/%u/%u/%u | best e2e %7.1f at %u/%u/%u/%u/%u/%u/%u",
					 d.name, mode_name(b_modes[m]), d.floor, dk, de, bk, bk / d.floor, a->ctas_per_sm,
					 a->min_keys, a->max_splits, a->min_keys_heads, a->max_splits_heads, a->merge_heads,
					 a->ctas_per_sm_heads, be, b->ctas_per_sm, b->min_keys, b->max_splits, b->min_keys_heads,
					 b->max_splits_heads, b->merge_heads, b->ctas_per_sm_heads);
		}
		free(gen);
		bd_free(&d);
	}
	ax__attn_fast_knobs(f, NULL, &def);
	printf("# best per shape and mode (knobs as cps/mink/maxs/minkh/maxsh/mergeh/cpsh):\n");
	for (int i = 0; i < nb; i++)
		printf("%s\n", best[i]);
	printf("# sweep: %s\n", failed ? "SOME CHECKS FAILED (see FAIL lines)" : "every knob set matched the generic path");
	ax__attn_fast_free(f);
	cudaStreamDestroy(s);
	ax_attn_cuda_close(cg);
	return failed;
}

int main(int argc, char **argv)
{
	int do_bench = argc > 1 && strcmp(argv[1], "--bench") == 0;
	int do_sweep = argc > 1 && strcmp(argv[1], "--sweep") == 0; /* the fast path's planner knobs */
	int small = argc > 1 && strcmp(argv[1], "--small") == 0; /* for compute-sanitizer: small cases, errors */
	int n = ax_attn_cuda_devices();
	if (n < 0) {
		printf("1..0 # SKIP no CUDA device\n");
		return 77;
	}
	const char *e = getenv("AX_TEST_SEED");
	uint64_t seed = e ? strtoull(e, NULL, 0) : (uint64_t)time(NULL);
	td_state = seed;
	printf("# seed %llu (AX_TEST_SEED=%llu repeats it)\n", (unsigned long long)seed, (unsigned long long)seed);
	ax_attn_cuda *c = NULL;
	int r = ax_attn_cuda_open(&c, 0);
	if (r) {
		printf("Bail out! ax_attn_cuda_open: %d (%s)\n", r, ax_attn_cuda_strerror(NULL));
		return 1;
	}
	if (do_bench) {
		bench(c);
		ax_attn_cuda_close(c);
		return 0;
	}
	if (do_sweep) {
		int sr = sweep();
		ax_attn_cuda_close(c);
		return sr;
	}
	test_decoders();
	test_cases(c, td_cases, ARRAY_LEN(td_cases));
	if (!small) {
		test_cases(c, big_cases, ARRAY_LEN(big_cases));
		test_batch(c);
		test_requests(c);
	}
	test_errors(c);
	test_extreme(c);
	test_paged(c); /* paged block */
	if (!small)
		test_api(c);
	fast_tests(small); /* fast path block (cudafast) */
	ax_attn_cuda_close(c);
	printf("1..%d\n", g_tests);
	printf("# attn_cuda_test: %d/%d passed, %d near-tie substitutions, seed %llu\n", g_tests - g_failed, g_tests,
	       g_near, (unsigned long long)seed);
	return g_failed ? 1 : 0;
}
