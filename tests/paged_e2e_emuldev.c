/*
 * paged_e2e_emuldev.c — the device half of paged_e2e_emul (paged_e2e_test.c built with PE_DEV) on
 * tests/capture_emul.c's emulated GPU: each "device allocation" is a named POSIX shm object mapped here, its
 * "device address" is this process's mapping, its CUDA IPC handle is "AXEM" + the object's name (what
 * attnx-capture-emul opens), an upload is a memcpy. The same interface as paged_e2e_dev.cu; every call returns 0 or
 * a negative errno. The objects are unlinked when freed (and at exit by pe_dev_free's caller, free_bufs).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "attnx_shm.h"
#include "attnx_shm_cuda.h"

int pe_dev_init(void);
int pe_dev_alloc(uint64_t bytes, uint64_t *dptr);
int pe_dev_upload(uint64_t dst, const void *src, uint64_t bytes);
int pe_dev_entry(ax_shm_buffer *b, uint64_t dptr, uint64_t bytes);
void pe_dev_free(uint64_t dptr);

enum { PE_MAX_ALLOC = 32 };

static struct {
	char name[48];
	uint8_t *base;
	uint64_t size;
} g_alloc[PE_MAX_ALLOC];
static int g_serial;

/* The emulated device is always there. */
int pe_dev_init(void)
{
	return 0;
}

/* A zeroed "device allocation" of its own (one handle per buffer, as cudaMalloc + IPC). */
int pe_dev_alloc(uint64_t bytes, uint64_t *dptr)
{
	int i = 0;
	while (i < PE_MAX_ALLOC && g_alloc[i].base)
		i++;
	if (i == PE_MAX_ALLOC || bytes == 0)
		return -ENOMEM;
	snprintf(g_alloc[i].name, sizeof g_alloc[i].name, "/attnx.pe-emul.%d.%d", (int)getpid(), g_serial++);
	int fd = shm_open(g_alloc[i].name, O_RDWR | O_CREAT | O_EXCL, 0600);
	if (fd < 0)
		return -errno;
	void *p = MAP_FAILED;
	if (ftruncate(fd, (off_t)bytes) == 0)
		p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	int e = errno;
	close(fd);
	if (p == MAP_FAILED) {
		shm_unlink(g_alloc[i].name);
		return -e;
	}
	g_alloc[i].base = p;
	g_alloc[i].size = bytes;
	*dptr = (uint64_t)(uintptr_t)p;
	return 0;
}

static int find(uint64_t dptr, uint64_t bytes)
{
	for (int i = 0; i < PE_MAX_ALLOC; i++) {
		uint64_t base = (uint64_t)(uintptr_t)g_alloc[i].base;
		if (g_alloc[i].base && dptr >= base && bytes <= g_alloc[i].size && dptr - base <= g_alloc[i].size - bytes)
			return i;
	}
	return -1;
}

int pe_dev_upload(uint64_t dst, const void *src, uint64_t bytes)
{
	if (find(dst, bytes) < 0)
		return -EFAULT;
	memcpy((void *)(uintptr_t)dst, src, bytes);
	return 0;
}

int pe_dev_entry(ax_shm_buffer *b, uint64_t dptr, uint64_t bytes)
{
	int i = find(dptr, bytes);
	if (i < 0)
		return -EFAULT;
	uint8_t h[64] = {'A', 'X', 'E', 'M'};
	snprintf((char *)h + 4, sizeof h - 4, "%s", g_alloc[i].name);
	return ax_cuda_entry_set_ipc(b, 0, h, sizeof h, dptr - (uint64_t)(uintptr_t)g_alloc[i].base, bytes);
}

void pe_dev_free(uint64_t dptr)
{
	int i = find(dptr, 1);
	if (i < 0)
		return;
	munmap(g_alloc[i].base, g_alloc[i].size);
	shm_unlink(g_alloc[i].name);
	memset(&g_alloc[i], 0, sizeof g_alloc[i]);
}
