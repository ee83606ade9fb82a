/*
 * gpu_engine.cu — the GPU test engine of issue 4: gpu_engine_core's SGLang-shaped engine with its buffers in GPU
 * memory (cudaMalloc), exported by CUDA IPC through libattnx-export (ax_cuda_fill_ipc: base allocation + offset),
 * its uploads ordered on one stream, and an interprocess event recorded after each step (its handle in the Q ring
 * entry) so the capture's stream waits for the step on the GPU. No host synchronisation per step.
 *
 * Usage: gpu_engine ATTNX_CAPTURE ATTNX_CAPTURE MODE [SEED]: the first capture reads the GPU segment with
 * --backend cuda, the second the identical host segment with --backend cpu; the records must agree
 * (gpu_engine_core.c). Exit 77 (meson SKIP) when cudaGetDeviceCount finds no device.
 * NOT RUN YET: written and compiled in a session without a GPU.
 */
#include <cerrno>
#include <cstdio>
#include <cstring>

#include <cuda_runtime.h>

#include "attnx_shm_cuda.h"
#include "gpu_engine_core.h"

namespace {

struct gpu {
	cudaStream_t stream = nullptr;
	cudaEvent_t event = nullptr;
	void *allocs[16] = {};
	int n = 0;       /* allocations made (live or retired) */
};

int fail(cudaError_t e, const char *what)
{
	std::fprintf(stderr, "gpu_engine: %s: %s\n", what, cudaGetErrorString(e));
	return -EIO;
}

int g_alloc(void *ctx, uint64_t bytes, uint64_t *dptr)
{
	gpu *g = static_cast<gpu *>(ctx);
	if (g->n == 16)
		return -ENOMEM;
	void *p = nullptr;
	cudaError_t e = cudaMalloc(&p, bytes);
	if (e == cudaSuccess) /* on the engine's (non-blocking) stream, ordered before the uploads */
		e = cudaMemsetAsync(p, 0, bytes, g->stream);
	if (e != cudaSuccess)
		return fail(e, "cudaMalloc");
	g->allocs[g->n++] = p;
	*dptr = reinterpret_cast<uint64_t>(p);
	return 0;
}

int g_upload(void *ctx, uint64_t dst, const void *src, uint64_t bytes)
{
	gpu *g = static_cast<gpu *>(ctx);
	/* pageable source: the call returns once `src` is staged, so the engine may reuse it at once */
	cudaError_t e = cudaMemcpyAsync(reinterpret_cast<void *>(dst), src, bytes, cudaMemcpyHostToDevice, g->stream);
	return e == cudaSuccess ? 0 : fail(e, "cudaMemcpyAsync");
}

int g_entry(void *ctx, ax_shm_buffer *b, uint64_t dptr, uint64_t bytes)
{
	(void)ctx;
	int rc = ax_cuda_fill_ipc(b, reinterpret_cast<const void *>(dptr), bytes);
	if (rc)
		std::fprintf(stderr, "gpu_engine: ax_cuda_fill_ipc: %d\n", rc);
	return rc;
}

int g_event(void *ctx, uint8_t out[64])
{
	gpu *g = static_cast<gpu *>(ctx);
	return ax_cuda_event_handle(g->event, out);
}

int g_step_done(void *ctx)
{
	gpu *g = static_cast<gpu *>(ctx);
	cudaError_t e = cudaEventRecord(g->event, g->stream);
	return e == cudaSuccess ? 0 : fail(e, "cudaEventRecord");
}

/* An engine restart: the old allocations are retired, not freed — cudaFree of memory that an importer still has
 * open (the capture closes it only when it notices the restart) is undefined behaviour. Freed at release. */
void g_free_all(void *ctx) { (void)ctx; }

void g_release(void *ctx)
{
	gpu *g = static_cast<gpu *>(ctx);
	cudaStreamSynchronize(g->stream);
	for (int i = 0; i < g->n; i++)
		cudaFree(g->allocs[i]);
	g->n = 0;
	cudaEventDestroy(g->event);
	cudaStreamDestroy(g->stream);
}

} // namespace

int main(int argc, char **argv)
{
	int n = 0;
	if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
		std::fprintf(stderr, "gpu_engine: no CUDA device: SKIP\n");
		return 77;
	}
	static gpu g;
	cudaError_t e = cudaSetDevice(0);
	if (e == cudaSuccess)
		e = cudaStreamCreateWithFlags(&g.stream, cudaStreamNonBlocking);
	if (e == cudaSuccess)
		e = cudaEventCreateWithFlags(&g.event, cudaEventInterprocess | cudaEventDisableTiming);
	if (e != cudaSuccess)
		return fail(e, "setup"), 1;
	ge_dev_ops ops;
	std::memset(&ops, 0, sizeof ops);
	ops.ctx = &g;
	ops.name = "cuda";
	ops.alloc = g_alloc;
	ops.upload = g_upload;
	ops.entry = g_entry;
	ops.event_handle = g_event;
	ops.step_done = g_step_done;
	ops.free_all = g_free_all;
	ops.release = g_release;
	return ge_main(argc, argv, &ops);
}
