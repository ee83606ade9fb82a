/*
 * gpu_engine_core.h — the GPU test engine of issue 4, minus the GPU: an SGLang-shaped engine that exports the
 * same data twice, once through "device" buffers (CUDA IPC entries) and once through host buffers, runs two
 * attnx-capture processes on them (--backend cuda and --backend cpu), collects both record streams over nng and
 * checks that they agree.
 *
 * The device side is a table of operations so the same engine runs on a GPU (gpu_engine.cu: cudaMalloc, CUDA IPC,
 * an interprocess step event) and, to test the harness and the capture's CUDA path here, on an emulated device
 * (gpu_engine_emul.c: named shm objects standing in for allocations, read by attnx-capture-emul).
 */
#ifndef ATTNX_TESTS_GPU_ENGINE_CORE_H
#define ATTNX_TESTS_GPU_ENGINE_CORE_H

#include <stdint.h>

#include "attnx_shm.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ge_dev_ops {
	void *ctx;
	const char *name;  /* "cuda", "emul" */
	/* Zeroed device memory of `bytes`; *dptr its device address. 0 or a negative errno. */
	int (*alloc)(void *ctx, uint64_t bytes, uint64_t *dptr);
	/* Copy host → device, ordered on the engine's stream (no host sync needed by the caller). */
	int (*upload)(void *ctx, uint64_t dst, const void *src, uint64_t bytes);
	/* A VMM allocation (cuMemCreate) of at least `bytes`, zeroed, mapped read-write at *dptr, exported as a POSIX fd
	 * (*fd, kept open by the provider until release) of *size bytes (rounded up to the granularity). NULL where the
	 * device has none (the vmm scenario then fails). */
	int (*alloc_vmm)(void *ctx, uint64_t bytes, uint64_t *dptr, int *fd, uint64_t *size);
	/* Fill the location fields of a CUDA_IPC entry for [dptr, dptr + bytes) of an allocation made by alloc. */
	int (*entry)(void *ctx, ax_shm_buffer *b, uint64_t dptr, uint64_t bytes);
	/* The step event's IPC handle (stored in the Q ring entry); -ENOENT for none. */
	int (*event_handle)(void *ctx, uint8_t out[64]);
	/* After a step's uploads, before its descriptor is published: record the step event. */
	int (*step_done)(void *ctx);
	/* An engine restart: stop using every allocation (free it, or retire it until release where freeing memory a
	 * capture may still have open is undefined, as with CUDA IPC); keep the stream and event. */
	void (*free_all)(void *ctx);
	/* Free everything (after the captures are gone). */
	void (*release)(void *ctx);
} ge_dev_ops;

/*
 * Run the test: argv = prog DEV_CAPTURE HOST_CAPTURE MODE [SCENARIO [SEED]], SCENARIO plain (default), auto,
 * reject, restart, vmm or recycle (gpu_engine_core.c says what each checks; every run first checks the recycling
 * rule in-process). DEV_CAPTURE reads the device segment with
 * --backend cuda, HOST_CAPTURE the host segment with --backend cpu; MODE is mean_logit, mean_prob or heads.
 * Returns the process exit status: 0 pass, 1 fail (mismatches printed), 2 usage.
 */
int ge_main(int argc, char **argv, const ge_dev_ops *dev);

#ifdef __cplusplus
}
#endif
#endif
