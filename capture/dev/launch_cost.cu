/*
 * launch_cost.cu — kernel lab tool (session 8): what one call of the fast path cannot go below on this machine,
 * the host and GPU cost of launching a kernel and learning that it ended, measured apart from any attention work.
 *
 * Why: issue 4 asks for one 4K request in ≤ 20 µs end to end. The fast path's 1 × 4K call spends ~5 µs in its launch
 * call and ~13-17 µs waiting (RESULTS.md, run 38's var lines) for ~5-9 µs of streaming loops; this tool measures the
 * parts that do not depend on the kernels' work: a launch call (cudaLaunchKernel, cudaLaunchKernelExC with the
 * programmatic-serialization attribute the merge launches use, a CUDA graph's parameter update + launch), with a
 * parameter block of 8 bytes and of the fast path's size (axf_args, ~320 bytes), and the round trip of a call —
 * launch, then learn the end by cudaStreamSynchronize or by spinning on a word the kernel writes into mapped pinned
 * memory (the fast path's knob spin) — for one CTA and for a grid shaped like the fast path's (264 CTAs of 256
 * threads, 115 KB of dynamic shared memory each). Medians of 2000 calls after 200 of warm-up, µs on the host clock.
 *
 * Build: nvcc -O2 -gencode arch=compute_90,code=sm_90 -o launch_cost capture/dev/launch_cost.cu
 * Exit 77 (skip) without a GPU.
 */
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

template <int N> struct blob {
	unsigned char b[N];
};

/* The kernel: thread 0 of CTA 0 writes seq into *flag (mapped pinned memory) with a system-scope release, after the
 * kernel before it when launched as a programmatic dependent; the rest return at once. */
template <int N> __global__ void k_flag(const __grid_constant__ blob<N> p, uint32_t *flag, uint32_t seq)
{
	if (blockIdx.x == 0 && threadIdx.x == 0 && flag) {
		asm volatile("griddepcontrol.wait;" ::: "memory"); /* a programmatic dependent: after the kernel before */
		__threadfence_system();
		asm volatile("st.release.sys.u32 [%0], %1;" ::"l"(flag), "r"(seq + p.b[0]) : "memory");
	}
}

static double now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmpd(const void *a, const void *b)
{
	const double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
	qsort(v, n, sizeof *v, cmpd);
	return v[n / 2];
}

#define CK(x)                                                                                                   \
	do {                                                                                                    \
		cudaError_t e_ = (x);                                                                           \
		if (e_ != cudaSuccess) {                                                                        \
			fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_));                                \
			return 1;                                                                               \
		}                                                                                               \
	} while (0)

enum { WARM = 200, REPS = 2000, NT = 256 };
static const size_t SMEM = 115 * 1024;

/* One measurement: `how` 0 = cudaLaunchKernel, 1 = cudaLaunchKernelExC + programmatic serialization, 2 = graph
 * (kernel node parameters updated, then cudaGraphLaunch), 3 = cudaLaunchKernelExC without attributes; two kernels
 * (a split launch and its merge launch; the second writes the word): 4 = cudaLaunchKernel then cudaLaunchKernelExC
 * + programmatic serialization (the fast path's heads calls), 5 = a graph of both (an edge between them; both
 * nodes' parameters updated each call); `wait` 0 = none (host time of the launch calls alone),
 * 1 = cudaStreamSynchronize, 2 = spin on the mapped word. */
template <int N>
static int measure(cudaStream_t st, uint32_t *flag_h, uint32_t *flag_d, int ctas, int how, int wait, double *out)
{
	static double t[REPS];
	blob<N> p;
	memset(&p, 0, sizeof p);
	uint32_t seq = 0;
	void *argv[3];
	uint32_t *fl = wait == 2 ? flag_d : NULL;
	argv[0] = &p, argv[1] = &fl, argv[2] = &seq;
	CK(cudaFuncSetAttribute((const void *)k_flag<N>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SMEM));
	uint32_t *none = NULL;
	void *argv0[3] = {&p, &none, &seq}; /* the first of two kernels: no word */
	cudaGraph_t g = NULL;
	cudaGraphExec_t ge = NULL;
	cudaGraphNode_t node = NULL, node0 = NULL;
	cudaKernelNodeParams kp = {}, kp0;
	kp.func = (void *)k_flag<N>, kp.gridDim = dim3(ctas), kp.blockDim = dim3(NT), kp.sharedMemBytes = SMEM;
	kp.kernelParams = argv;
	kp0 = kp;
	kp0.kernelParams = argv0;
	if (how == 2 || how == 5) {
		CK(cudaGraphCreate(&g, 0));
		if (how == 5)
			CK(cudaGraphAddKernelNode(&node0, g, NULL, 0, &kp0));
		CK(cudaGraphAddKernelNode(&node, g, node0 ? &node0 : NULL, node0 ? 1 : 0, &kp));
		CK(cudaGraphInstantiate(&ge, g, 0));
	}
	cudaLaunchAttribute at[1];
	at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
	at[0].val.programmaticStreamSerializationAllowed = 1;
	cudaLaunchConfig_t cfg = {};
	cfg.gridDim = dim3(ctas), cfg.blockDim = dim3(NT), cfg.dynamicSmemBytes = SMEM, cfg.stream = st;
	cfg.attrs = at, cfg.numAttrs = 1;
	for (int i = 0; i < WARM + REPS; i++) {
		seq++;
		const double t0 = now_us();
		if (how == 0)
			CK(cudaLaunchKernel((const void *)k_flag<N>, dim3(ctas), dim3(NT), argv, SMEM, st));
		else if (how == 1)
			CK(cudaLaunchKernelExC(&cfg, (const void *)k_flag<N>, argv));
		else if (how == 3) {
			cfg.numAttrs = 0;
			CK(cudaLaunchKernelExC(&cfg, (const void *)k_flag<N>, argv));
			cfg.numAttrs = 1;
		} else if (how == 4) {
			CK(cudaLaunchKernel((const void *)k_flag<N>, dim3(ctas), dim3(NT), argv0, SMEM, st));
			CK(cudaLaunchKernelExC(&cfg, (const void *)k_flag<N>, argv));
		} else {
			if (how == 5)
				CK(cudaGraphExecKernelNodeSetParams(ge, node0, &kp0));
			CK(cudaGraphExecKernelNodeSetParams(ge, node, &kp));
			CK(cudaGraphLaunch(ge, st));
		}
		if (wait == 1)
			CK(cudaStreamSynchronize(st));
		else if (wait == 2)
			while (__atomic_load_n(flag_h, __ATOMIC_ACQUIRE) != seq)
				;
		const double t1 = now_us();
		if (wait == 0)
			CK(cudaStreamSynchronize(st)); /* outside the timed part: the next call starts on an idle GPU */
		if (i >= WARM)
			t[i - WARM] = t1 - t0;
	}
	CK(cudaStreamSynchronize(st));
	if (ge)
		cudaGraphExecDestroy(ge);
	if (g)
		cudaGraphDestroy(g);
	*out = median(t, REPS);
	return 0;
}

int main(void)
{
	int n = 0;
	if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
		printf("launch_cost: no GPU (skip)\n");
		return 77;
	}
	cudaDeviceProp prop;
	CK(cudaGetDeviceProperties(&prop, 0));
	cudaStream_t st;
	CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
	uint32_t *flag_h, *flag_d;
	CK(cudaHostAlloc((void **)&flag_h, 64, cudaHostAllocMapped));
	*flag_h = 0;
	CK(cudaHostGetDevicePointer((void **)&flag_d, flag_h, 0));
	const int big = 2 * prop.multiProcessorCount;
	printf("# launch_cost: %s, %d SMs; medians of %d calls, µs on the host clock\n", prop.name,
	       prop.multiProcessorCount, REPS);
	printf("%-40s %10s %10s %10s\n", "launch / param bytes / CTAs", "call", "+sync", "+spin");
	static const char *hows[6] = {"cudaLaunchKernel",   "cudaLaunchKernelExC+pdl", "graph setparams+launch",
				      "cudaLaunchKernelExC", "2 kernels: Kernel+ExC+pdl", "2 kernels: graph"};
	for (int how = 0; how < 6; how++)
		for (int shape = 0; shape < 4; shape++) {
			const int pb = shape & 1 ? 320 : 8, ctas = shape & 2 ? big : 1;
			double r[3];
			for (int w = 0; w < 3; w++) {
				*flag_h = 0;
				if ((pb == 8 ? measure<8>(st, flag_h, flag_d, ctas, how, w, &r[w])
					     : measure<320>(st, flag_h, flag_d, ctas, how, w, &r[w])) != 0)
					return 1;
			}
			char name[64];
			snprintf(name, sizeof name, "%s/%d/%d", hows[how], pb, ctas);
			printf("%-40s %10.2f %10.2f %10.2f\n", name, r[0], r[1], r[2]);
		}
	return 0;
}
