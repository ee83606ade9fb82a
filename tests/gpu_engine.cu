/*
 * gpu_engine.cu — the GPU test engine of issue 4: gpu_engine_core's SGLang-shaped engine with its buffers in GPU
 * memory (cudaMalloc), exported by CUDA IPC through libattnx-export (ax_cuda_fill_ipc: base allocation + offset),
 * its uploads ordered on one stream, and an interprocess event recorded after each step (its handle in the Q ring
 * entry) so the capture's stream waits for the step on the GPU. No host synchronisation per step. In the vmm
 * scenario the buffers are cuMemCreate allocations exported as POSIX fds (driver API, resolved through the runtime
 * so this program still starts, and exits 77, on a machine without the driver).
 *
 * Usage: gpu_engine ATTNX_CAPTURE ATTNX_CAPTURE MODE [SEED]: the first capture reads the GPU segment with
 * --backend cuda, the second the identical host segment with --backend cpu; the records must agree
 * (gpu_engine_core.c). Exit 77 (meson SKIP) when cudaGetDeviceCount finds no device.
 * Passed on an H200 (3a279e1) and on H100s (e8187c5, e1ec643), 2026-11-27: every scenario of scripts/gpu-test.
 */
#include <cerrno>
#include <cstdio>
#include <cstring>

#include <unistd.h>

#include <cuda.h>
#include <cuda_runtime.h>

#include "attnx_shm_cuda.h"
#include "gpu_engine_core.h"

namespace {

struct vmm_alloc {
	CUdeviceptr p;
	size_t size;
	CUmemGenericAllocationHandle h;
	int fd;
};

struct gpu {
	cudaStream_t stream = nullptr;
	cudaEvent_t event = nullptr;
	void *allocs[16] = {};
	int n = 0;       /* allocations made (live or retired) */
	vmm_alloc vmms[8] = {};
	int nv = 0;
};

struct {
	CUresult (*MemCreate)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long);
	CUresult (*MemGetAllocationGranularity)(size_t *, const CUmemAllocationProp *, CUmemAllocationGranularity_flags);
	CUresult (*MemAddressReserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
	CUresult (*MemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
	CUresult (*MemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
	CUresult (*MemExportToShareableHandle)(void *, CUmemGenericAllocationHandle, CUmemAllocationHandleType,
					       unsigned long long);
	CUresult (*MemUnmap)(CUdeviceptr, size_t);
	CUresult (*MemAddressFree)(CUdeviceptr, size_t);
	CUresult (*MemRelease)(CUmemGenericAllocationHandle);
} drv;

bool drv_resolve()
{
	const struct {
		const char *sym;
		void **fn;
	} t[] = {
		{"cuMemCreate", reinterpret_cast<void **>(&drv.MemCreate)},
		{"cuMemGetAllocationGranularity", reinterpret_cast<void **>(&drv.MemGetAllocationGranularity)},
		{"cuMemAddressReserve", reinterpret_cast<void **>(&drv.MemAddressReserve)},
		{"cuMemMap", reinterpret_cast<void **>(&drv.MemMap)},
		{"cuMemSetAccess", reinterpret_cast<void **>(&drv.MemSetAccess)},
		{"cuMemExportToShareableHandle", reinterpret_cast<void **>(&drv.MemExportToShareableHandle)},
		{"cuMemUnmap", reinterpret_cast<void **>(&drv.MemUnmap)},
		{"cuMemAddressFree", reinterpret_cast<void **>(&drv.MemAddressFree)},
		{"cuMemRelease", reinterpret_cast<void **>(&drv.MemRelease)},
	};
	for (const auto &e : t) {
		cudaDriverEntryPointQueryResult q;
		if (cudaGetDriverEntryPointByVersion(e.sym, e.fn, 12000, cudaEnableDefault, &q) != cudaSuccess ||
		    q != cudaDriverEntryPointSuccess || *e.fn == nullptr) {
			std::fprintf(stderr, "gpu_engine: driver entry point %s not found\n", e.sym);
			return false;
		}
	}
	return true;
}

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

/* cuMemCreate (pinned device memory, POSIX-fd shareable), mapped read-write here, exported as an fd. */
int g_alloc_vmm(void *ctx, uint64_t bytes, uint64_t *dptr, int *fd, uint64_t *size)
{
	gpu *g = static_cast<gpu *>(ctx);
	static bool resolved = drv_resolve();
	if (!resolved || g->nv == 8)
		return -ENODEV;
	CUmemAllocationProp prop;
	std::memset(&prop, 0, sizeof prop);
	prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
	prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
	prop.location.id = 0;
	prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
	size_t gran = 0;
	if (drv.MemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM) != CUDA_SUCCESS || !gran)
		return -EIO;
	vmm_alloc &v = g->vmms[g->nv];
	v.size = (bytes + gran - 1) / gran * gran;
	v.fd = -1;
	CUmemAccessDesc ad;
	std::memset(&ad, 0, sizeof ad);
	ad.location = prop.location;
	ad.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
	if (drv.MemCreate(&v.h, v.size, &prop, 0) != CUDA_SUCCESS) {
		std::fprintf(stderr, "gpu_engine: cuMemCreate failed\n");
		return -EIO;
	}
	if (drv.MemAddressReserve(&v.p, v.size, 0, 0, 0) != CUDA_SUCCESS || drv.MemMap(v.p, v.size, 0, v.h, 0) != CUDA_SUCCESS ||
	    drv.MemSetAccess(v.p, v.size, &ad, 1) != CUDA_SUCCESS ||
	    drv.MemExportToShareableHandle(&v.fd, v.h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0) != CUDA_SUCCESS) {
		std::fprintf(stderr, "gpu_engine: VMM reserve/map/access/export failed\n");
		return -EIO; /* the test fails; release() does not know this allocation: leaked until exit */
	}
	g->nv++;
	cudaError_t e = cudaMemsetAsync(reinterpret_cast<void *>(v.p), 0, v.size, g->stream);
	if (e != cudaSuccess)
		return fail(e, "cudaMemsetAsync (VMM)");
	*dptr = v.p;
	*fd = v.fd;
	*size = v.size;
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
	for (int i = 0; i < g->nv; i++) {
		vmm_alloc &v = g->vmms[i];
		drv.MemUnmap(v.p, v.size);
		drv.MemAddressFree(v.p, v.size);
		drv.MemRelease(v.h);
		close(v.fd);
	}
	g->nv = 0;
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
	ops.alloc_vmm = g_alloc_vmm;
	ops.upload = g_upload;
	ops.entry = g_entry;
	ops.event_handle = g_event;
	ops.step_done = g_step_done;
	ops.free_all = g_free_all;
	ops.release = g_release;
	return ge_main(argc, argv, &ops);
}
