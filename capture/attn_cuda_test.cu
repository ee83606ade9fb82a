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
 * --bench: bf16, H_q 32, H_kv 8, D 128, top-10, the issue's shapes and modes; host clock around each
 * (synchronous) ax_attn_cuda_run, median of repeats, against a streaming read of the same bytes timed with
 * events in the same run (the floor). Two columns: the default context (the fast path, attn_cuda_fast.cu, serves
 * these shapes through ax_attn_cuda_run's dispatch) and a context opened with AX_ATTN_CUDA_FAST=0 (generic only).
 * The fast path block (cudafast) compares both paths on every eligible case; see fast_tests.
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
	dj_free(&d);
	td_free(&t);
	cudaEventDestroy(ev);
	cudaStreamDestroy(side);
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
	ax_attn_result *fo = (ax_attn_result *)malloc(rows * sizeof *fo), *go = (ax_attn_result *)malloc(rows * sizeof *go);
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
	tap(ok, "fast = generic: %s (largest logit difference %.2g)%s%s", name, maxd, ok ? "" : ": ", why);
	free(fo), free(go), free(frc), free(grc);
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

/* Median µs of a streaming read of `bytes` (the floor), events. */
static double floor_us(const void *p, size_t bytes, int reps)
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
		CK(cudaEventRecord(a));
		stream_read<<<sms * 8, 256>>>((const uint4 *)p, bytes / 16, sink);
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

static int bench(ax_attn_cuda *c)
{
	static const struct {
		const char *name;
		uint32_t B;
		uint64_t n;
		int reps;
	} shapes[] = {{"1 x 4K", 1, 4096, 50}, {"1 x 32K", 1, 32768, 30}, {"1 x 128K", 1, 131072, 20},
		      {"1 x 1M", 1, 1048576, 7}, {"64 x 4K", 64, 4096, 15}, {"8 x 128K", 8, 131072, 7}};
	static const uint32_t modes[3] = {ML, HD, MP};
	const uint32_t H = 32, Hkv = 8, D = 128, K = 10;
	cudaDeviceProp prop;
	int dev;
	CK(cudaGetDevice(&dev));
	CK(cudaGetDeviceProperties(&prop, dev));
	ax_attn_cuda *cg = open_generic(); /* fast path block (cudafast): the generic path beside the dispatched one */
	printf("# bench: %s, bf16 H_q %u H_kv %u D %u top-%u; host clock around ax_attn_cuda_run "
	       "(synchronous: plan, upload, kernels, download), median; 'us' = the default context (fast path for "
	       "these shapes unless AX_ATTN_CUDA_FAST=0), 'generic us' = a context with AX_ATTN_CUDA_FAST=0\n",
	       prop.name, H, Hkv, D, K);
	printf("%-10s %-10s %12s %10s %12s %9s %12s %9s\n", "shape", "mode", "us", "GB/s", "floor us", "x floor",
	       "generic us", "x floor");
	for (size_t s = 0; s < ARRAY_LEN(shapes); s++) {
		uint64_t keys = shapes[s].B * shapes[s].n;
		size_t kbytes = keys * Hkv * D * 2, ibytes = keys * 4;
		uint16_t *k;
		int32_t *idx;
		void *q;
		CK(cudaMalloc(&k, kbytes));
		CK(cudaMalloc(&idx, ibytes));
		CK(cudaMalloc(&q, (size_t)H * D * 2));
		fill_bf16<<<1024, 256>>>(k, kbytes / 2, td_u64());
		int32_t *hidx = (int32_t *)malloc(ibytes);
		for (uint64_t i = 0; i < keys; i++)
			hidx[i] = (int32_t)i;
		for (uint64_t i = keys - 1; i > 0; i--) {
			uint64_t j = td_u64() % (i + 1);
			int32_t x = hidx[i];
			hidx[i] = hidx[j], hidx[j] = x;
		}
		uint16_t hq[32 * 128];
		for (uint32_t i = 0; i < H * D; i++)
			hq[i] = ax_f32_to_bf16((float)td_uni());
		CK(cudaMemcpy(idx, hidx, ibytes, cudaMemcpyHostToDevice));
		CK(cudaMemcpy(q, hq, sizeof hq, cudaMemcpyHostToDevice));
		CK(cudaDeviceSynchronize());
		double fl = floor_us(k, kbytes, 10) * (double)(kbytes + ibytes) / kbytes; /* K and index bytes */
		for (int m = 0; m < 3; m++) {
			ax_attn_job *jobs = (ax_attn_job *)calloc(shapes[s].B, sizeof *jobs);
			for (uint32_t b = 0; b < shapes[s].B; b++) {
				ax_attn_job *j = &jobs[b];
				j->q = q, j->q_dtype = BF, j->k = k, j->k_dtype = BF, j->k_scale = 1;
				j->k_stride[0] = Hkv * D, j->k_stride[1] = D, j->k_stride[2] = 1, j->n_slots = keys;
				j->index = idx + b * shapes[s].n, j->index_dtype = I32;
				j->position = shapes[s].n - 1;
				j->n_q_heads = H, j->n_kv_heads = Hkv, j->head_dim = D;
				j->scale = 1.0f / sqrtf((float)D);
				j->mode = modes[m], j->top_k = K;
			}
			uint32_t rows = shapes[s].B * (modes[m] == HD ? H : 1);
			ax_attn_result *out = (ax_attn_result *)malloc(rows * sizeof *out);
			int *rc = (int *)malloc(shapes[s].B * sizeof *rc);
			double t[64], us2[2] = {0, 0};
			int reps = shapes[s].reps, bad = 0;
			for (int which = 0; which < 2; which++) {
				ax_attn_cuda *cx = which == 0 ? c : cg;
				if (!cx)
					continue;
				for (int r = -2; r < reps; r++) {
					double t0 = now_us();
					int x = ax_attn_cuda_run(cx, jobs, shapes[s].B, out, rc);
					double t1 = now_us();
					bad |= x != 0 || rc[0] != 0;
					if (r >= 0)
						t[r] = t1 - t0;
				}
				us2[which] = median(t, reps);
			}
			double us = us2[0];
			printf("%-10s %-10s %12.1f %10.1f %12.1f %9.2f %12.1f %9.2f%s\n", shapes[s].name,
			       modes[m] == ML ? "mean_logit" : modes[m] == HD ? "heads" : "mean_prob", us,
			       (double)(kbytes + ibytes) / us / 1e3, fl, us / fl, us2[1], us2[1] / fl,
			       bad ? "  RUN FAILED" : "");
			fflush(stdout);
			free(out), free(rc), free(jobs);
		}
		free(hidx);
		cudaFree(k), cudaFree(idx), cudaFree(q);
	}
	ax_attn_cuda_close(cg);
	return 0;
}

int main(int argc, char **argv)
{
	int do_bench = argc > 1 && strcmp(argv[1], "--bench") == 0;
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
	test_decoders();
	test_cases(c, td_cases, ARRAY_LEN(td_cases));
	if (!small) {
		test_cases(c, big_cases, ARRAY_LEN(big_cases));
		test_batch(c);
		test_requests(c);
	}
	test_errors(c);
	test_extreme(c);
	if (!small)
		test_api(c);
	fast_tests(small); /* fast path block (cudafast) */
	ax_attn_cuda_close(c);
	printf("1..%d\n", g_tests);
	printf("# attn_cuda_test: %d/%d passed, %d near-tie substitutions, seed %llu\n", g_tests - g_failed, g_tests,
	       g_near, (unsigned long long)seed);
	return g_failed ? 1 : 0;
}
