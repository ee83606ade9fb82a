/*
 * attn_cuda.cu — the capture's CUDA compute backend (attn_cuda.h): exact top-k attention for a batch of jobs in
 * one launch per pass, results identical to ax_attn_cpu up to fp32 rounding.
 *
 * How it works. The algorithm itself lives in attn_cuda_logic.h as __host__ __device__ code (split CTA, merge
 * CTA, validation, rows, chunks, split plan), which a CPU test runs; this file is the host driver and the
 * kernels that call it. A run: every job is validated on the host (-EINVAL / -EOPNOTSUPP: never launched); the
 * valid ones become pass-jobs (mean_prob: a logsumexp pass, then the probability pass); one split length is
 * chosen per pass so the whole batch makes about 4 CTAs per SM; the tables (pass-jobs, chunks, rows, work
 * items, merge rows) are written into pinned staging and copied up with one cudaMemcpyAsync; then per pass one
 * split launch per (key dtype, index dtype, head dim) instance present (one in a uniform batch) and one merge
 * launch; the flags and results come back with one copy, and the call waits for its stream once. Device
 * scratch and pinned staging are one buffer each, grown to the largest batch seen (at most
 * AX_ATTN_CUDA_MAX_SCRATCH on the device): a warm context allocates nothing. Everything runs on the context's
 * own non-blocking stream.
 *
 * Nothing here has run on a GPU yet (see capture/README.md, "CUDA backend"): the kernel logic has been run on
 * the CPU only, through attn_cuda_logic_test.c.
 */
#include <cuda_runtime.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "attn.h"
}
#include "attn_cuda.h"
#include "attn_cuda_logic.h"
#include "attn_cuda_plan.h"
#include "attn_cuda_fast.h" /* the fast path (cudafast): see ax_attn_cuda_run */
#include "attn_cuda_prefill.h" /* the prefill path (prefill): see ax_attn_cuda_run */

#define AXC_CTAS_PER_SM 4       /* split planning target */

/* ---- kernels ----------------------------------------------------------------------------------------------------- */

template <uint32_t KDT, uint32_t IDT, uint32_t DC>
__global__ void __launch_bounds__(AXC_SPLIT_THREADS) axc_split_kernel(axc_args a)
{
	__shared__ axc_split_sm sm;
	extern __shared__ __align__(16) float axc_dyn[];
	axc_split_cta(&a, blockIdx.x, blockDim.x, &sm, axc_dyn, KDT, IDT, DC);
}

__global__ void __launch_bounds__(AXC_MERGE_THREADS) axc_merge_kernel(axc_args a, uint32_t cap)
{
	__shared__ axc_merge_sm sm;
	axc_merge_row(&a, blockIdx.x, blockDim.x, cap, &sm);
}

typedef void (*axc_kfn)(axc_args);
#define AXC_KD(K, I)                                                                                          \
	axc_split_kernel<K, I, 64>, axc_split_kernel<K, I, 128>, axc_split_kernel<K, I, 256>,                 \
		axc_split_kernel<K, I, 0>
#define AXC_KI(K) AXC_KD(K, AX_DTYPE_I32), AXC_KD(K, AX_DTYPE_I64)
static const axc_kfn axc_kernels[AXC_N_INST] = {AXC_KI(AX_DTYPE_F32), AXC_KI(AX_DTYPE_F16), AXC_KI(AX_DTYPE_BF16),
						AXC_KI(AX_DTYPE_FP8_E4M3), AXC_KI(AX_DTYPE_FP8_E5M2)};

/* ---- the context --------------------------------------------------------------------------------------------------- */

struct ax_attn_cuda {
	int device, sms;
	cudaStream_t stream;
	cudaError_t err;
	char *dbuf;                /* device scratch */
	size_t dcap;
	char *hbuf;                /* pinned staging: tables up, flags and results down */
	size_t hcap;
	int smem_set[AXC_N_INST];  /* dynamic shared memory each instance is allowed (opt-in attribute) */
	axc_plan *plan;            /* host tables, grown to the largest batch seen */
	ax_attn_fast *fast;        /* the fast path (attn_cuda_fast.cu); NULL when off (AX_ATTN_CUDA_FAST=0, not sm_90) */
	ax_attn_prefill *prefill;  /* the prefill path (attn_cuda_prefill.cu); NULL when off (AX_ATTN_CUDA_PREFILL=0) */
};

static cudaError_t g_open_err = cudaSuccess;

static int cuda_fail(ax_attn_cuda *c, cudaError_t e)
{
	c->err = e;
	return e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO;
}

int ax_attn_cuda_devices(void)
{
	int n = 0;
	if (cudaGetDeviceCount(&n) != cudaSuccess || n <= 0) {
		cudaGetLastError(); /* clear: "no device" is not an error here */
		return -ENODEV;
	}
	return n;
}

int ax_attn_cuda_open(ax_attn_cuda **out, int device)
{
	if (!out)
		return -EINVAL;
	*out = NULL;
	int n = ax_attn_cuda_devices();
	if (n < 0 || device < 0 || device >= n)
		return -ENODEV;
	ax_attn_cuda *c = (ax_attn_cuda *)calloc(1, sizeof *c);
	axc_plan *p = (axc_plan *)calloc(1, sizeof *p);
	if (!c || !p) {
		free(c);
		free(p);
		return -ENOMEM;
	}
	c->device = device;
	c->plan = p;
	cudaError_t e = cudaSetDevice(device);
	if (e == cudaSuccess)
		e = cudaDeviceGetAttribute(&c->sms, cudaDevAttrMultiProcessorCount, device);
	if (e == cudaSuccess)
		e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
	if (e != cudaSuccess) {
		g_open_err = e;
		axc_plan_free(p);
		free(c);
		return e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO;
	}
	int fr = ax__attn_fast_new(&c->fast, device, c->stream); /* fast path hook (cudafast) */
	if (fr == 0 && (fr = ax__attn_prefill_new(&c->prefill, device, c->stream)) != 0) /* prefill hook */
		ax__attn_fast_free(c->fast);
	if (fr) {
		cudaStreamDestroy(c->stream);
		axc_plan_free(p);
		free(c);
		return fr;
	}
	*out = c;
	return 0;
}

void ax_attn_cuda_close(ax_attn_cuda *c)
{
	if (!c)
		return;
	cudaSetDevice(c->device);
	cudaStreamSynchronize(c->stream);
	ax__attn_fast_free(c->fast); /* before its stream goes */
	ax__attn_prefill_free(c->prefill);
	cudaStreamDestroy(c->stream);
	cudaFree(c->dbuf);
	cudaFreeHost(c->hbuf);
	axc_plan_free(c->plan);
	free(c);
}

int ax_attn_cuda_wait_event(ax_attn_cuda *c, void *event)
{
	if (!c || !event)
		return -EINVAL;
	cudaError_t e = cudaStreamWaitEvent(c->stream, (cudaEvent_t)event, 0);
	return e == cudaSuccess ? 0 : cuda_fail(c, e);
}

const char *ax_attn_cuda_strerror(const ax_attn_cuda *c)
{
	return cudaGetErrorString(c ? c->err : g_open_err);
}

/* ---- a run ----------------------------------------------------------------------------------------------------------- */

/* Grow the device scratch and the pinned staging to the plan's layout (contents not kept). */
static int reserve(ax_attn_cuda *c, const axc_layout *L)
{
	cudaError_t e;
	if (L->total > AX_ATTN_CUDA_MAX_SCRATCH)
		return -ENOMEM;
	if (L->total > c->dcap) {
		cudaStreamSynchronize(c->stream);
		cudaFree(c->dbuf);
		c->dbuf = NULL, c->dcap = 0;
		if ((e = cudaMalloc((void **)&c->dbuf, L->total)) != cudaSuccess)
			return cuda_fail(c, e);
		c->dcap = L->total;
	}
	if (L->off_dev > c->hcap) {
		cudaFreeHost(c->hbuf);
		c->hbuf = NULL, c->hcap = 0;
		if ((e = cudaMallocHost((void **)&c->hbuf, L->off_dev)) != cudaSuccess)
			return cuda_fail(c, e);
		c->hcap = L->off_dev;
	}
	return 0;
}

/* The split launches (one per instance present) and the merge launch of a pass. */
static int launch_pass(ax_attn_cuda *c, const axc_pass *P)
{
	cudaError_t e;
	for (uint32_t i = 0; i < P->nseg; i++) {
		const axc_segment *sg = &P->seg[i];
		axc_args a = axc_plan_seg_args(c->plan, c->dbuf, P, sg);
		size_t smem = axc_split_dyn_floats(sg->qcap, sg->dmax) * sizeof(float);
		const void *fn = (const void *)axc_kernels[sg->inst];
		if ((int)smem > c->smem_set[sg->inst]) { /* once per instance and size: past 48 KB needs the opt-in */
			e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
			if (e != cudaSuccess)
				return cuda_fail(c, e);
			c->smem_set[sg->inst] = (int)smem;
		}
		void *argv[] = {&a};
		e = cudaLaunchKernel(fn, dim3(sg->count), dim3(AXC_SPLIT_THREADS), argv, smem, c->stream);
		if (e != cudaSuccess)
			return cuda_fail(c, e);
	}
	if (P->nmr) {
		axc_args a = axc_plan_args(c->plan, c->dbuf, P);
		uint32_t cap = AXC_MERGE_CAP;
		void *argv[] = {&a, &cap};
		e = cudaLaunchKernel((const void *)axc_merge_kernel, dim3(P->nmr), dim3(AXC_MERGE_THREADS), argv, 0,
				     c->stream);
		if (e != cudaSuccess)
			return cuda_fail(c, e);
	}
	return 0;
}

static int run_generic(ax_attn_cuda *c, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc)
{
	if (!c || (n && (!jobs || !out || !rc)))
		return -EINVAL;
	if (n == 0)
		return 0;
	axc_plan *p = c->plan;
	int r = axc_plan_build(p, jobs, n, rc, (uint32_t)c->sms * AXC_CTAS_PER_SM);
	if (r || p->A.npj == 0)
		return r;
	cudaError_t e = cudaSetDevice(c->device);
	if (e != cudaSuccess)
		return cuda_fail(c, e);
	if ((r = reserve(c, &p->L)) != 0)
		return r;
	axc_plan_tables(p, c->hbuf);
	e = cudaMemcpyAsync(c->dbuf, c->hbuf, p->L.up, cudaMemcpyHostToDevice, c->stream);
	if (e == cudaSuccess)
		e = cudaMemsetAsync(c->dbuf + p->L.flags, 0, n * sizeof(uint32_t), c->stream);
	if (e != cudaSuccess)
		r = cuda_fail(c, e);
	if (r || (r = launch_pass(c, &p->A)) != 0 || (r = launch_pass(c, &p->B)) != 0) {
		cudaStreamSynchronize(c->stream); /* the next run rewrites the staging the upload may still read */
		return r;
	}
	e = cudaMemcpyAsync(c->hbuf + p->L.up, c->dbuf + p->L.up, p->L.down, cudaMemcpyDeviceToHost, c->stream);
	if (e == cudaSuccess)
		e = cudaStreamSynchronize(c->stream);
	if (e != cudaSuccess)
		return cuda_fail(c, e);
	axc_plan_finish(p, c->hbuf, jobs, out, rc);
	return 0;
}

/* ---- fast path hook (cudafast) --------------------------------------------------------------------------------------- */

static int generic_runner(void *ctx, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc)
{
	return run_generic((ax_attn_cuda *)ctx, jobs, n, out, rc);
}

/* Fast, then generic: the runner the prefill dispatch hands the jobs it does not place. */
static int rest_runner(void *ctx, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc)
{
	ax_attn_cuda *c = (ax_attn_cuda *)ctx;
	return ax__attn_fast_dispatch(c->fast, jobs, n, out, rc, generic_runner, c);
}

ax_attn_result *ax_attn_cuda_results_alloc(ax_attn_cuda *c, size_t rows)
{
	if (!c || rows == 0 || rows > SIZE_MAX / sizeof(ax_attn_result))
		return NULL;
	ax_attn_result *r = ax__attn_fast_results_alloc(c->fast, rows);
	return r ? r : (ax_attn_result *)calloc(rows, sizeof *r);
}

void ax_attn_cuda_results_free(ax_attn_cuda *c, ax_attn_result *r)
{
	if (r && !ax__attn_fast_results_free(c ? c->fast : NULL, r))
		free(r);
}

ax_attn_fast *ax__attn_cuda_fast_state(ax_attn_cuda *c)
{
	return c ? c->fast : NULL;
}

ax_attn_prefill *ax__attn_cuda_prefill_state(ax_attn_cuda *c)
{
	return c ? c->prefill : NULL;
}

/* Prefill rows (attn_cuda_prefill.h: fast-path shapes, ≥ 2 consecutive positions of one request and layer) run on
 * the prefill path; of the rest, eligible jobs (attn_cuda_fast.h: bf16/f16, D 128, H_kv <= 8, group <= 8, no cap,
 * no head list) run on the fast path, the others on the generic path above; a mixed batch is split and scattered
 * back (axp_dispatch, axf_dispatch). */
int ax_attn_cuda_run(ax_attn_cuda *c, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc)
{
	if (!c || (n && (!jobs || !out || !rc)))
		return -EINVAL;
	if (n == 0)
		return 0;
	if (axc_any_paged(jobs, n)) /* paged jobs (block tables): the generic path only; attn_cuda_fast.h reads token rows */
		return run_generic(c, jobs, n, out, rc);
	int r = ax__attn_prefill_dispatch(c->prefill, jobs, n, out, rc, rest_runner, c);
	cudaError_t fe = (cudaError_t)ax__attn_fast_take_error(c->fast);
	cudaError_t pe = (cudaError_t)ax__attn_prefill_take_error(c->prefill);
	if (fe != cudaSuccess)
		c->err = fe;
	if (pe != cudaSuccess)
		c->err = pe;
	return r;
}
