/*
 * gpu_engine_emul.c — the GPU test engine on an emulated device, so the harness and the capture's CUDA path run on
 * any machine: each "device allocation" is a named POSIX shm object, its "IPC handle" is "AXEM" + that name (64
 * bytes), its "device address" is where the engine mapped it, and an upload is a memcpy. attnx-capture-emul
 * (capture_emul.c) opens those handles the way the real ops open CUDA IPC handles.
 *
 * Usage: gpu_engine_emul CAPTURE_EMUL CAPTURE MODE — as gpu_engine (gpu_engine_core.h).
 */
#include "gpu_engine_core.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "attnx_shm_cuda.h"

typedef struct emul_alloc {
	char name[48];  /* shm object ("IPC" allocation), or "" for a VMM one */
	int fd;         /* VMM: the exported fd (a memfd), -1 otherwise */
	uint8_t *base;
	uint64_t size;
} emul_alloc;

typedef struct emul {
	emul_alloc a[16];
	int n;
	int serial; /* names are never reused, so a capture holding a freed allocation is detectable */
	uint64_t steps;
} emul;

static int e_alloc(void *ctx, uint64_t bytes, uint64_t *dptr)
{
	emul *e = ctx;
	if (e->n == 16)
		return -ENOMEM;
	emul_alloc *a = &e->a[e->n];
	snprintf(a->name, sizeof a->name, "/attnx.emul.%d.%d", (int)getpid(), e->serial++);
	shm_unlink(a->name);
	int fd = shm_open(a->name, O_RDWR | O_CREAT | O_EXCL, 0600);
	if (fd < 0)
		return -errno;
	if (ftruncate(fd, (off_t)bytes) != 0) {
		close(fd);
		return -errno;
	}
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (p == MAP_FAILED)
		return -errno;
	a->base = p;
	a->size = bytes;
	a->fd = -1;
	e->n++;
	*dptr = (uint64_t)(uintptr_t)p;
	return 0;
}

/* A "VMM allocation": a memfd of the size rounded up to 2 MiB (the usual granularity), exported as that fd. */
static int e_alloc_vmm(void *ctx, uint64_t bytes, uint64_t *dptr, int *fd, uint64_t *size)
{
	emul *e = ctx;
	if (e->n == 16)
		return -ENOMEM;
	uint64_t sz = (bytes + (2u << 20) - 1) / (2u << 20) * (2u << 20);
	int f = memfd_create("attnx-emul-vmm", MFD_CLOEXEC);
	if (f < 0)
		return -errno;
	void *p = MAP_FAILED;
	if (ftruncate(f, (off_t)sz) != 0 || (p = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0)) == MAP_FAILED) {
		close(f);
		return -EIO;
	}
	emul_alloc *a = &e->a[e->n++];
	a->name[0] = '\0';
	a->fd = f;
	a->base = p;
	a->size = sz;
	*dptr = (uint64_t)(uintptr_t)p;
	*fd = f;
	*size = sz;
	return 0;
}

static int e_upload(void *ctx, uint64_t dst, const void *src, uint64_t bytes)
{
	emul *e = ctx;
	for (int i = 0; i < e->n; i++)
		if (dst >= (uint64_t)(uintptr_t)e->a[i].base &&
		    dst + bytes <= (uint64_t)(uintptr_t)e->a[i].base + e->a[i].size) {
			memcpy((void *)(uintptr_t)dst, src, bytes);
			return 0;
		}
	return -EFAULT;
}

static int e_entry(void *ctx, ax_shm_buffer *b, uint64_t dptr, uint64_t bytes)
{
	emul *e = ctx;
	for (int i = 0; i < e->n; i++) {
		uint64_t base = (uint64_t)(uintptr_t)e->a[i].base;
		if (dptr >= base && dptr < base + e->a[i].size) {
			uint8_t h[64] = {'A', 'X', 'E', 'M'};
			snprintf((char *)h + 4, sizeof h - 4, "%s", e->a[i].name);
			return ax_cuda_entry_set_ipc(b, 0, h, sizeof h, dptr - base, bytes);
		}
	}
	return -EFAULT;
}

static int e_event(void *ctx, uint8_t out[64])
{
	(void)ctx;
	memset(out, 0, 64);
	memcpy(out, "AXEV", 4);
	return 0;
}

static int e_step_done(void *ctx)
{
	((emul *)ctx)->steps++;
	return 0;
}

static void e_free_all(void *ctx)
{
	emul *e = ctx;
	for (int i = 0; i < e->n; i++) {
		munmap(e->a[i].base, e->a[i].size);
		if (e->a[i].fd >= 0)
			close(e->a[i].fd);
		else
			shm_unlink(e->a[i].name);
	}
	e->n = 0;
}

static void e_release(void *ctx) { e_free_all(ctx); }

int main(int argc, char **argv)
{
	static emul e;
	ge_dev_ops ops = {.ctx = &e, .name = "emul", .alloc = e_alloc, .upload = e_upload, .alloc_vmm = e_alloc_vmm,
			  .entry = e_entry, .event_handle = e_event, .step_done = e_step_done, .free_all = e_free_all,
			  .release = e_release};
	return ge_main(argc, argv, &ops);
}
