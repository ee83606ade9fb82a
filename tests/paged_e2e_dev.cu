/*
 * paged_e2e_dev.cu — the GPU half of paged_e2e_gpu (paged_e2e_test.c built with PE_CUDA): device memory for the
 * engine's buffers, synchronous uploads, CUDA IPC entries (ax_cuda_fill_ipc: base allocation + offset). Every call
 * returns 0 or a negative errno; nothing here aborts.
 */
#include <cuda_runtime.h>

#include <errno.h>
#include <stdint.h>

extern "C" {
#include "attnx_shm.h"
#include "attnx_shm_cuda.h"

int pe_dev_init(void);
int pe_dev_alloc(uint64_t bytes, uint64_t *dptr);
int pe_dev_upload(uint64_t dst, const void *src, uint64_t bytes);
int pe_dev_entry(ax_shm_buffer *b, uint64_t dptr, uint64_t bytes);
void pe_dev_free(uint64_t dptr);
}

/* -ENODEV where no device (or no driver) is found. */
int pe_dev_init(void)
{
	int n = 0;
	if (cudaGetDeviceCount(&n) != cudaSuccess || n <= 0) {
		cudaGetLastError();
		return -ENODEV;
	}
	return cudaSetDevice(0) == cudaSuccess ? 0 : -EIO;
}

/* Zeroed device memory (its own allocation: one IPC handle per buffer). */
int pe_dev_alloc(uint64_t bytes, uint64_t *dptr)
{
	void *p = nullptr;
	if (cudaMalloc(&p, bytes) != cudaSuccess)
		return -ENOMEM;
	if (cudaMemset(p, 0, bytes) != cudaSuccess) {
		cudaFree(p);
		return -EIO;
	}
	*dptr = (uint64_t)(uintptr_t)p;
	return 0;
}

/* Synchronous: the bytes are on the device when it returns (before the step's descriptor is published). */
int pe_dev_upload(uint64_t dst, const void *src, uint64_t bytes)
{
	return cudaMemcpy((void *)(uintptr_t)dst, src, bytes, cudaMemcpyHostToDevice) == cudaSuccess ? 0 : -EIO;
}

int pe_dev_entry(ax_shm_buffer *b, uint64_t dptr, uint64_t bytes)
{
	return ax_cuda_fill_ipc(b, (const void *)(uintptr_t)dptr, bytes);
}

void pe_dev_free(uint64_t dptr)
{
	cudaFree((void *)(uintptr_t)dptr);
}
