/*
 * cuda_ops.c — the CUDA calls behind attnx_shm_cuda.h: the capture importer's ax_cuda_ops (IPC memory handles,
 * VMM fds, IPC events) and the engine-side helpers that fill CUDA_IPC entries. CUDA builds only.
 *
 * Kept deliberately thin: every decision (which entries share an allocation, extents, what is rejected) is made in
 * the plain-C files that CPU tests cover; here each function is one CUDA sequence with its error converted to a
 * negative errno at this edge (-ENODEV for a missing device, -ERANGE for a size that does not fit the allocation's
 * granularity, -EIO for anything else, with the CUDA text kept for ax_shm_cuda_last_error).
 *
 * Runtime API where it has the call (IPC handles, events, device selection, which also makes the device's primary
 * context current), driver API for what only it has (cuMemGetAddressRange, the cuMem* VMM calls).
 * VMM imports are mapped read-only when the driver allows it (read-write otherwise): the capture never writes.
 * Ran on an H200 (driver 580.159.04, CUDA 13, 3a279e1) through the GPU tests: import, events, device_sticky; there
 * device_reset's probe failed after an illegal address (a new process is needed). inject_fault (tests only) ran
 * on two H100 machines (2026-11-27, trees e8187c5 and e1ec643): the daemon's sticky scenario faulted, re-executed
 * and resumed.
 */
#include "attnx_shm_cuda.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include <cuda.h>
#include <cuda_runtime_api.h>

static __thread char g_err[256] = "no error";

/* Driver entry points, resolved through the runtime (cudaGetDriverEntryPointByVersion) instead of linking
 * libcuda: a binary built with CUDA must still start on a machine without the driver (CI, CPU-only hosts). */
static struct {
	CUresult (*GetErrorString)(CUresult, const char **);
	CUresult (*MemGetAddressRange)(CUdeviceptr *, size_t *, CUdeviceptr);
	CUresult (*MemImportFromShareableHandle)(CUmemGenericAllocationHandle *, void *, CUmemAllocationHandleType);
	CUresult (*MemGetAllocationPropertiesFromHandle)(CUmemAllocationProp *, CUmemGenericAllocationHandle);
	CUresult (*MemGetAllocationGranularity)(size_t *, const CUmemAllocationProp *, CUmemAllocationGranularity_flags);
	CUresult (*MemAddressReserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
	CUresult (*MemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
	CUresult (*MemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
	CUresult (*MemUnmap)(CUdeviceptr, size_t);
	CUresult (*MemAddressFree)(CUdeviceptr, size_t);
	CUresult (*MemRelease)(CUmemGenericAllocationHandle);
	CUresult (*PointerGetAttribute)(void *, CUpointer_attribute, CUdeviceptr);
} drv;
static pthread_once_t drv_once = PTHREAD_ONCE_INIT;
static int drv_ok;

/* A driver entry point to resolve: its symbol and where its address goes. */
typedef struct drv_sym {
	const char *sym;
	void **fn;
} drv_sym;

/* Resolve n entry points; 0, or -ENODEV with g_err naming the first one missing. */
static int drv_resolve_table(const drv_sym *t, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		enum cudaDriverEntryPointQueryResult q;
		if (cudaGetDriverEntryPointByVersion(t[i].sym, t[i].fn, 12000, cudaEnableDefault, &q) != cudaSuccess ||
		    q != cudaDriverEntryPointSuccess || *t[i].fn == NULL) {
			snprintf(g_err, sizeof g_err, "driver entry point %s not found", t[i].sym);
			cudaGetLastError();
			return -ENODEV;
		}
	}
	return 0;
}

static void drv_resolve(void)
{
	static const drv_sym t[] = {
		{"cuGetErrorString", (void **)&drv.GetErrorString},
		{"cuMemGetAddressRange", (void **)&drv.MemGetAddressRange},
		{"cuMemImportFromShareableHandle", (void **)&drv.MemImportFromShareableHandle},
		{"cuMemGetAllocationPropertiesFromHandle", (void **)&drv.MemGetAllocationPropertiesFromHandle},
		{"cuMemGetAllocationGranularity", (void **)&drv.MemGetAllocationGranularity},
		{"cuMemAddressReserve", (void **)&drv.MemAddressReserve},
		{"cuMemMap", (void **)&drv.MemMap},
		{"cuMemSetAccess", (void **)&drv.MemSetAccess},
		{"cuMemUnmap", (void **)&drv.MemUnmap},
		{"cuMemAddressFree", (void **)&drv.MemAddressFree},
		{"cuMemRelease", (void **)&drv.MemRelease},
		{"cuPointerGetAttribute", (void **)&drv.PointerGetAttribute},
	};
	drv_ok = drv_resolve_table(t, sizeof t / sizeof t[0]) == 0;
}

/* 0 once the driver's entry points are resolved, -ENODEV without a driver. */
static int drv_init(void)
{
	pthread_once(&drv_once, drv_resolve);
	return drv_ok ? 0 : -ENODEV;
}

static int rt_fail(cudaError_t e, const char *what)
{
	snprintf(g_err, sizeof g_err, "%s: %s", what, cudaGetErrorString(e));
	cudaGetLastError(); /* clear a non-sticky error so later calls start clean */
	return e == cudaErrorNoDevice || e == cudaErrorInvalidDevice || e == cudaErrorInsufficientDriver ? -ENODEV
													       : -EIO;
}

static int drv_fail(CUresult r, const char *what)
{
	const char *s = NULL;
	if (drv.GetErrorString == NULL || drv.GetErrorString(r, &s) != CUDA_SUCCESS || s == NULL)
		s = "unknown driver error";
	snprintf(g_err, sizeof g_err, "%s: %s", what, s);
	return r == CUDA_ERROR_NO_DEVICE || r == CUDA_ERROR_INVALID_DEVICE ? -ENODEV : -EIO;
}

/* Select the device and make sure its primary context exists (driver calls below need a current context). */
static int use_device(int device)
{
	cudaError_t e = cudaSetDevice(device);
	if (e == cudaSuccess)
		e = cudaFree(0);
	if (e != cudaSuccess)
		return rt_fail(e, "cudaSetDevice");
	return drv_init();
}

static int ipc_open(void *ctx, int device, const uint8_t handle[AX_CUDA_IPC_HANDLE_SIZE], uint64_t *base,
		    uint64_t *size)
{
	(void)ctx;
	int rc = use_device(device);
	if (rc)
		return rc;
	cudaIpcMemHandle_t h;
	memcpy(&h, handle, sizeof h);
	void *p = NULL;
	cudaError_t e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
	if (e != cudaSuccess)
		return rt_fail(e, "cudaIpcOpenMemHandle");
	CUdeviceptr b = 0;
	size_t n = 0;
	CUresult r = drv.MemGetAddressRange(&b, &n, (CUdeviceptr)(uintptr_t)p);
	if (r != CUDA_SUCCESS || b != (CUdeviceptr)(uintptr_t)p) {
		rc = r != CUDA_SUCCESS ? drv_fail(r, "cuMemGetAddressRange")
				       : (snprintf(g_err, sizeof g_err, "IPC mapping is not an allocation base"), -EIO);
		cudaIpcCloseMemHandle(p);
		return rc;
	}
	*base = (uint64_t)b;
	*size = (uint64_t)n;
	return 0;
}

static void ipc_close(void *ctx, int device, uint64_t base)
{
	(void)ctx;
	if (cudaSetDevice(device) == cudaSuccess)
		cudaIpcCloseMemHandle((void *)(uintptr_t)base);
	cudaGetLastError();
}

/* Grant `device` access to [p, p+size): read-only if the driver accepts it, else read-write. */
static CUresult set_access(CUdeviceptr p, size_t size, int device)
{
	CUmemAccessDesc ad;
	memset(&ad, 0, sizeof ad);
	ad.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
	ad.location.id = device;
	ad.flags = CU_MEM_ACCESS_FLAGS_PROT_READ;
	if (drv.MemSetAccess(p, size, &ad, 1) == CUDA_SUCCESS)
		return CUDA_SUCCESS;
	ad.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
	return drv.MemSetAccess(p, size, &ad, 1);
}

static int vmm_map(void *ctx, int device, int fd, uint64_t size, uint64_t *base)
{
	(void)ctx;
	int rc = use_device(device);
	if (rc)
		return rc;
	CUmemGenericAllocationHandle h;
	CUresult r = drv.MemImportFromShareableHandle(&h, (void *)(uintptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
	if (r != CUDA_SUCCESS)
		return drv_fail(r, "cuMemImportFromShareableHandle");
	CUmemAllocationProp prop;
	size_t gran = 0;
	CUdeviceptr p = 0;
	memset(&prop, 0, sizeof prop);
	if ((r = drv.MemGetAllocationPropertiesFromHandle(&prop, h)) != CUDA_SUCCESS ||
	    (r = drv.MemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM)) != CUDA_SUCCESS) {
		rc = drv_fail(r, "cuMemGetAllocationPropertiesFromHandle");
		goto release;
	}
	if (gran == 0 || size % gran != 0) {
		snprintf(g_err, sizeof g_err, "VMM size %llu is not a multiple of the granularity %zu",
			 (unsigned long long)size, gran);
		rc = -ERANGE;
		goto release;
	}
	if ((r = drv.MemAddressReserve(&p, (size_t)size, 0, 0, 0)) != CUDA_SUCCESS) {
		rc = drv_fail(r, "cuMemAddressReserve");
		goto release;
	}
	/* cuMemMap fails if size exceeds the allocation: the server's size claim is checked here. */
	if ((r = drv.MemMap(p, (size_t)size, 0, h, 0)) != CUDA_SUCCESS) {
		rc = drv_fail(r, "cuMemMap");
		goto free_va;
	}
	if ((r = set_access(p, (size_t)size, device)) != CUDA_SUCCESS) {
		rc = drv_fail(r, "cuMemSetAccess");
		drv.MemUnmap(p, (size_t)size);
		goto free_va;
	}
	drv.MemRelease(h); /* the mapping keeps the allocation alive until vmm_unmap */
	*base = (uint64_t)p;
	return 0;
free_va:
	drv.MemAddressFree(p, (size_t)size);
release:
	drv.MemRelease(h);
	return rc;
}

static void vmm_unmap(void *ctx, int device, uint64_t base, uint64_t size)
{
	(void)ctx;
	if (cudaSetDevice(device) != cudaSuccess)
		return;
	drv.MemUnmap((CUdeviceptr)base, (size_t)size);
	drv.MemAddressFree((CUdeviceptr)base, (size_t)size);
}

static int event_open(void *ctx, int device, const uint8_t handle[AX_CUDA_IPC_HANDLE_SIZE], void **event)
{
	(void)ctx;
	int rc = use_device(device);
	if (rc)
		return rc;
	cudaIpcEventHandle_t h;
	memcpy(&h, handle, sizeof h);
	cudaEvent_t ev = NULL;
	cudaError_t e = cudaIpcOpenEventHandle(&ev, h);
	if (e != cudaSuccess)
		return rt_fail(e, "cudaIpcOpenEventHandle");
	*event = ev;
	return 0;
}

static void event_close(void *ctx, int device, void *event)
{
	(void)ctx;
	if (cudaSetDevice(device) == cudaSuccess)
		cudaEventDestroy((cudaEvent_t)event);
	cudaGetLastError();
}

/* After a failed call: cudaGetLastError clears a non-sticky error (and returns it); a sticky one (an illegal
 * address, a launch failure: "any further CUDA work will return the same error") is returned again by the
 * synchronize probe and by cudaPeekAtLastError, which does not clear. */
static int device_sticky(void *ctx, int device)
{
	(void)ctx;
	cudaGetLastError();
	cudaError_t e = cudaSetDevice(device);
	if (e == cudaSuccess)
		e = cudaDeviceSynchronize();
	if (e == cudaSuccess)
		e = cudaPeekAtLastError();
	if (e == cudaSuccess)
		return 0;
	int rc = rt_fail(e, "device probe");
	return rc == -ENODEV ? rc : 1;
}

/* Destroy this process's primary context on `device` (every mapping, event, stream and allocation in it), then
 * probe with a fresh one. */
static int device_reset(void *ctx, int device)
{
	(void)ctx;
	/* cudaSetDevice itself may answer the sticky error: only a missing device stops the reset. */
	cudaError_t e = cudaSetDevice(device);
	if (e == cudaErrorInvalidDevice || e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
		return rt_fail(e, "cudaSetDevice");
	if ((e = cudaDeviceReset()) != cudaSuccess)
		return rt_fail(e, "cudaDeviceReset");
	cudaSetDevice(device); /* the device stays current; the call below creates its new primary context */
	cudaGetLastError();
	e = cudaFree(0);
	if (e == cudaSuccess)
		e = cudaDeviceSynchronize();
	return e == cudaSuccess ? 0 : rt_fail(e, "device probe after cudaDeviceReset");
}

static const char *last_error(void *ctx)
{
	(void)ctx;
	return g_err;
}

/* ---- test-only fault injection (ax_cuda_recovery_ops.inject_fault) ------------------------------------------
 * A one-thread kernel storing 1 to the u32 at its parameter, as PTX (ISA 7.0, sm_52: the driver JIT-compiles it
 * for any newer device; `ptxas -arch=sm_90` accepts it), loaded through the driver API so that this plain-C file
 * needs no nvcc-built code. Launched with 0x10, it faults like a kernel reading through a dead engine's mapping. */
static const char fault_ptx[] = ".version 7.0\n"
				".target sm_52\n"
				".address_size 64\n"
				".visible .entry ax_fault(.param .u64 ax_fault_p)\n"
				"{\n"
				"\t.reg .b32 %r<2>;\n"
				"\t.reg .b64 %rd<2>;\n"
				"\tld.param.u64 %rd1, [ax_fault_p];\n"
				"\tmov.u32 %r1, 1;\n"
				"\tst.global.u32 [%rd1], %r1;\n"
				"\tret;\n"
				"}\n";

static struct {
	CUresult (*ModuleLoadData)(CUmodule *, const void *);
	CUresult (*ModuleGetFunction)(CUfunction *, CUmodule, const char *);
	CUresult (*LaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
				 CUstream, void **, void **);
	CUresult (*CtxSynchronize)(void);
	CUresult (*ModuleUnload)(CUmodule);
} fdrv;

/* Resolved apart from drv: a driver without one of these must not break the importer. 0 or -ENODEV. */
static int fault_resolve(void)
{
	const drv_sym t[] = {
		{"cuModuleLoadData", (void **)&fdrv.ModuleLoadData},
		{"cuModuleGetFunction", (void **)&fdrv.ModuleGetFunction},
		{"cuLaunchKernel", (void **)&fdrv.LaunchKernel},
		{"cuCtxSynchronize", (void **)&fdrv.CtxSynchronize},
		{"cuModuleUnload", (void **)&fdrv.ModuleUnload},
	};
	return drv_resolve_table(t, sizeof t / sizeof t[0]);
}

static int inject_fault(void *ctx, int device)
{
	(void)ctx;
	int rc = use_device(device); /* the primary context, current: the one ax_attn_cuda and the mappings use */
	if (rc == 0)
		rc = fault_resolve();
	if (rc)
		return rc;
	CUmodule mod = NULL;
	CUfunction fn = NULL;
	CUresult r = fdrv.ModuleLoadData(&mod, fault_ptx);
	if (r == CUDA_SUCCESS)
		r = fdrv.ModuleGetFunction(&fn, mod, "ax_fault");
	if (r != CUDA_SUCCESS) {
		rc = drv_fail(r, "injected fault: loading the kernel");
		if (mod)
			fdrv.ModuleUnload(mod);
		return rc;
	}
	unsigned long long addr = 0x10;
	void *args[] = {&addr};
	r = fdrv.LaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, NULL, args, NULL);
	if (r == CUDA_SUCCESS)
		r = fdrv.CtxSynchronize();
	if (r != CUDA_SUCCESS) /* the expected outcome; the module dies with the context at the reset */
		return drv_fail(r, "injected fault (a kernel storing to 0x10)");
	fdrv.ModuleUnload(mod);
	snprintf(g_err, sizeof g_err, "injected fault: a store to 0x10 did not fault");
	return -EIO;
}

static const ax_cuda_ops real_ops = {
	.ctx = NULL,
	.ipc_open = ipc_open,
	.ipc_close = ipc_close,
	.vmm_map = vmm_map,
	.vmm_unmap = vmm_unmap,
	.event_open = event_open,
	.event_close = event_close,
	.last_error = last_error,
};

const ax_cuda_ops *ax_cuda_ops_real(void) { return &real_ops; }

static const ax_cuda_recovery_ops real_recovery = {
	.ctx = NULL,
	.device_sticky = device_sticky,
	.device_reset = device_reset,
	.last_error = last_error,
	.inject_fault = inject_fault,
};

const ax_cuda_recovery_ops *ax_cuda_recovery_real(void) { return &real_recovery; }

/* ---- engine side ---------------------------------------------------------------------------------------- */

static int fill_ipc_on_device(ax_shm_buffer *b, int device, const void *dptr, uint64_t bytes);

int ax_cuda_fill_ipc(ax_shm_buffer *b, const void *dptr, uint64_t bytes)
{
	struct cudaPointerAttributes at;
	cudaError_t e = cudaPointerGetAttributes(&at, dptr);
	if (e != cudaSuccess) {
		rt_fail(e, "cudaPointerGetAttributes");
		return -EINVAL;
	}
	if (at.type != cudaMemoryTypeDevice)
		return -EINVAL;
	int prev = -1;
	cudaGetDevice(&prev);
	int rc = use_device(at.device); /* the driver calls below need the pointer's context current */
	if (rc == 0)
		rc = fill_ipc_on_device(b, at.device, dptr, bytes);
	if (prev >= 0 && prev != at.device)
		cudaSetDevice(prev);
	return rc;
}

static int fill_ipc_on_device(ax_shm_buffer *b, int device, const void *dptr, uint64_t bytes)
{
	cudaError_t e;
	int ipc_ok = 0;
	CUresult r = drv.PointerGetAttribute(&ipc_ok, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
					   (CUdeviceptr)(uintptr_t)dptr);
	if (r != CUDA_SUCCESS || !ipc_ok)
		return -EINVAL; /* VMM memory: export an fd instead (ax_cuda_entry_set_vmm + ax_vmm_server_add) */
	CUdeviceptr base = 0;
	size_t size = 0;
	if ((r = drv.MemGetAddressRange(&base, &size, (CUdeviceptr)(uintptr_t)dptr)) != CUDA_SUCCESS)
		return drv_fail(r, "cuMemGetAddressRange");
	uint64_t off = (uint64_t)(uintptr_t)dptr - (uint64_t)base;
	if (bytes == 0 || bytes > size || off > size - bytes)
		return -ERANGE;
	cudaIpcMemHandle_t h;
	if ((e = cudaIpcGetMemHandle(&h, (void *)(uintptr_t)base)) != cudaSuccess)
		return rt_fail(e, "cudaIpcGetMemHandle");
	return ax_cuda_entry_set_ipc(b, device, &h, sizeof h, off, bytes);
}

int ax_cuda_event_handle(void *event, uint8_t out[AX_CUDA_IPC_HANDLE_SIZE])
{
	cudaIpcEventHandle_t h;
	cudaError_t e = cudaIpcGetEventHandle(&h, (cudaEvent_t)event);
	if (e != cudaSuccess)
		return rt_fail(e, "cudaIpcGetEventHandle");
	memcpy(out, &h, sizeof h);
	return 0;
}
