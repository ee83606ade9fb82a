/*
 * cuda_sticky_gpu.cu — the real recovery ops (shm/cuda_ops.c, ax_cuda_recovery_real) against a real GPU: what the
 * capture's backend relies on after a kernel faults (capture/README.md, "Sticky CUDA errors").
 *
 * In order, in one process: a clearable error (an impossible cudaMalloc) must be classified not sticky and leave
 * the device usable; a kernel storing to an unmapped address (cudaErrorIllegalAddress) must be classified sticky
 * and must really break later calls; device_reset must then bring the device back, which a fresh allocation, a
 * kernel and a CUDA IPC round trip of our own allocation confirm. If the reset does not recover the device (the
 * CUDA documentation says a sticky error may need a new process) the test fails saying so: the capture then only
 * retries with backoff and a supervisor restart is needed. Exit 77 (skip) without a device. Suite `gpu`.
 * NOT RUN YET: written in a session without a GPU.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>

#include <cuda_runtime_api.h>

#include "attnx_shm_cuda.h"

#define CHECK(c, ...)                                                                                                  \
	do {                                                                                                           \
		if (!(c)) {                                                                                            \
			fprintf(stderr, "cuda_sticky_gpu: FAIL line %d: ", __LINE__);                                  \
			fprintf(stderr, __VA_ARGS__);                                                                  \
			fprintf(stderr, "\n");                                                                         \
			return 1;                                                                                      \
		}                                                                                                      \
	} while (0)

__global__ void store(int *p, int v) { *p = v; }

/* A small allocation, a kernel writing it, the value read back: the device works. */
static int device_works(void)
{
	int *d = NULL, h = 0;
	if (cudaMalloc(&d, sizeof *d) != cudaSuccess)
		return 0;
	store<<<1, 1>>>(d, 42);
	int ok = cudaMemcpy(&h, d, sizeof h, cudaMemcpyDeviceToHost) == cudaSuccess && h == 42;
	cudaFree(d);
	return ok;
}

int main(void)
{
	int n = 0;
	if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
		fprintf(stderr, "cuda_sticky_gpu: no CUDA device: skipped\n");
		return 77;
	}
	const ax_cuda_recovery_ops *ops = ax_cuda_recovery_real();
	CHECK(ops && ops->device_sticky && ops->device_reset, "no recovery ops");
	CHECK(cudaSetDevice(0) == cudaSuccess && device_works(), "device 0 unusable before the test");

	void *huge = NULL; /* clearable: cudaErrorMemoryAllocation */
	CHECK(cudaMalloc(&huge, (size_t)1 << 62) != cudaSuccess, "a 4 EiB allocation succeeded");
	CHECK(ops->device_sticky(ops->ctx, 0) == 0, "a failed allocation classified sticky (%s)", ops->last_error(ops->ctx));
	CHECK(device_works(), "device unusable after a clearable error");

	store<<<1, 1>>>((int *)(uintptr_t)0x10, 1); /* an illegal address: sticky */
	cudaError_t e = cudaDeviceSynchronize();
	fprintf(stderr, "cuda_sticky_gpu: faulting kernel: %s\n", cudaGetErrorName(e));
	CHECK(e != cudaSuccess, "a store to 0x10 did not fault");
	int st = ops->device_sticky(ops->ctx, 0);
	CHECK(st != 0, "the fault classified clearable");
	CHECK(!device_works(), "the device still works after the fault: the error was not sticky after all");

	int rc = ops->device_reset(ops->ctx, 0);
	CHECK(rc == 0, "cudaDeviceReset did not recover the device (%d: %s): the capture will only retry with backoff; "
	      "a sticky error needs a new process here", rc, ops->last_error(ops->ctx));
	CHECK(device_works(), "device unusable after a successful reset");
	CHECK(ops->device_sticky(ops->ctx, 0) == 0, "classified sticky after the reset");

	int *d = NULL; /* IPC still works in the new context (the capture re-imports through it) */
	cudaIpcMemHandle_t h;
	CHECK(cudaMalloc(&d, 1 << 20) == cudaSuccess && cudaIpcGetMemHandle(&h, d) == cudaSuccess,
	      "IPC handle after the reset");
	cudaFree(d);
	fprintf(stderr, "cuda_sticky_gpu: PASS (clearable error kept, sticky error recovered by cudaDeviceReset)\n");
	return 0;
}
