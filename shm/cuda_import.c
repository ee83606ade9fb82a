/*
 * cuda_import.c — the capture side of CUDA buffers: open each CUDA entry of an attached segment once, hand out
 * device addresses, close everything on detach (attnx_shm_cuda.h, part 3).
 *
 * Plain C over an ax_cuda_ops table, so the bookkeeping — which entries share an allocation, extent checks,
 * rejection counting, teardown order — is unit-tested without a GPU; cuda_ops.c supplies the real calls.
 *
 * Per attachment: a state per buffer-table index (not yet looked at / mapped to an allocation / rejected with an
 * error, remembered so a bad entry costs one attempt and one count) and a list of opened allocations keyed by
 * what identifies them in the engine (IPC: the 64 handle bytes; VMM: socket path + allocation id), so the K pools
 * that PyTorch's caching allocator packs into one cudaMalloc block are opened once (older CUDA refused a second
 * cudaIpcOpenMemHandle of one handle in a process; newer reference-counts it; one open is right for both). Events are opened per entry on first use. Close releases events, then allocations,
 * in reverse order of opening.
 */
#include "attnx_shm_cuda.h"

#include "attnx_common.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define VMM_FETCH_TIMEOUT_MS 2000

enum ent_state { ENT_NEW = 0, ENT_MAPPED = 1, ENT_REJECTED = 2 };

typedef struct alloc {
	uint32_t loc;                           /* AX_LOC_CUDA_IPC or AX_LOC_CUDA_VMM */
	uint8_t key[AX_CUDA_IPC_HANDLE_SIZE];   /* IPC handle, or the VMM allocation id in the first 8 bytes */
	char socket[64];                        /* VMM server path */
	uint64_t base, size;
	uint8_t event[AX_CUDA_IPC_HANDLE_SIZE]; /* VMM: the server's event handle */
	int has_event;
} alloc;

typedef struct entry {
	int state;       /* enum ent_state */
	int err;         /* ENT_REJECTED: why */
	int32_t alloc;   /* ENT_MAPPED: index into allocs */
	void *event;     /* opened event, or NULL */
	int event_state; /* 0 not tried, 1 opened, 2 none, < 0 failed */
} entry;

struct ax_shm_cuda {
	const ax_shm *shm;
	const ax_cuda_ops *ops;
	int device;
	entry *ents;
	uint32_t n_ents;
	alloc *allocs;
	uint32_t n_allocs, cap_allocs;
	ax_shm_cuda_stats st;
	int last_err;
};

int ax_shm_cuda_open(ax_shm_cuda **out, const ax_shm *shm, int device, const ax_cuda_ops *ops)
{
	uint32_t n = 0;
	if (shm == NULL || ops == NULL || device < 0 || ax_shm_buffers(shm, &n) == NULL)
		return -EINVAL;
	ax_shm_cuda *c = calloc(1, sizeof *c);
	if (c == NULL)
		return -ENOMEM;
	c->ents = calloc(n ? n : 1, sizeof *c->ents);
	if (c->ents == NULL) {
		free(c);
		return -ENOMEM;
	}
	c->shm = shm;
	c->ops = ops;
	c->device = device;
	c->n_ents = n;
	*out = c;
	return 0;
}

static int same_alloc(const alloc *a, const ax_shm_buffer *b)
{
	if (a->loc != b->loc)
		return 0;
	if (b->loc == AX_LOC_CUDA_IPC)
		return memcmp(a->key, b->handle, AX_CUDA_IPC_HANDLE_SIZE) == 0;
	return memcmp(a->key, b->handle, 8) == 0 && strncmp(a->socket, b->vmm_socket, sizeof a->socket) == 0;
}

static alloc *new_alloc(ax_shm_cuda *c, const ax_shm_buffer *b)
{
	if (c->n_allocs == c->cap_allocs) {
		uint32_t cap = c->cap_allocs ? 2 * c->cap_allocs : 8;
		alloc *a = realloc(c->allocs, cap * sizeof *a);
		if (a == NULL)
			return NULL;
		c->allocs = a;
		c->cap_allocs = cap;
	}
	alloc *a = &c->allocs[c->n_allocs];
	memset(a, 0, sizeof *a);
	a->loc = b->loc;
	memcpy(a->key, b->handle, sizeof a->key);
	if (b->loc == AX_LOC_CUDA_VMM)
		memcpy(a->socket, b->vmm_socket, sizeof a->socket);
	return a;
}

/* Fetch the fd from the engine's server, map it, close the fd. */
static int open_vmm(ax_shm_cuda *c, const ax_shm_buffer *b, alloc *a)
{
	ax_vmm_reply r;
	int fd = -1;
	char path[sizeof b->vmm_socket + 1];
	memcpy(path, b->vmm_socket, sizeof b->vmm_socket);
	path[sizeof b->vmm_socket] = '\0';
	int rc = ax_vmm_fetch(path, ax_cuda_entry_vmm_id(b), VMM_FETCH_TIMEOUT_MS, &fd, &r);
	if (rc)
		return rc;
	rc = c->ops->vmm_map(c->ops->ctx, c->device, fd, r.size, &a->base);
	close(fd);
	if (rc)
		return rc;
	a->size = r.size;
	a->has_event = (r.flags & AX_VMM_F_EVENT) != 0;
	memcpy(a->event, r.event, sizeof a->event);
	return 0;
}

/* The allocation entry b lives in, opened if no earlier entry opened it. Returns its index or a negative errno. */
static int get_alloc(ax_shm_cuda *c, const ax_shm_buffer *b)
{
	for (uint32_t i = 0; i < c->n_allocs; i++)
		if (same_alloc(&c->allocs[i], b))
			return (int)i;
	alloc *a = new_alloc(c, b);
	if (a == NULL)
		return -ENOMEM;
	int rc = b->loc == AX_LOC_CUDA_IPC ? c->ops->ipc_open(c->ops->ctx, c->device, b->handle, &a->base, &a->size)
					   : open_vmm(c, b, a);
	if (rc)
		return rc;
	c->st.allocations++;
	return (int)c->n_allocs++;
}

static int reject(ax_shm_cuda *c, entry *e, int err)
{
	e->state = ENT_REJECTED;
	e->err = err;
	c->last_err = err;
	c->st.rejected++;
	return err;
}

/* The engine appended entries after the importer was opened. */
static int grow_entries(ax_shm_cuda *c, uint32_t n)
{
	entry *e = realloc(c->ents, n * sizeof *e);
	if (e == NULL)
		return -ENOMEM;
	memset(e + c->n_ents, 0, (n - c->n_ents) * sizeof *e);
	c->ents = e;
	c->n_ents = n;
	return 0;
}

/* Map entry `index` (first use) or return its remembered state. */
static int resolve(ax_shm_cuda *c, uint32_t index, const ax_shm_buffer **bp)
{
	uint32_t n = 0;
	const ax_shm_buffer *bufs = ax_shm_buffers(c->shm, &n);
	if (index >= n || bufs[index].kind == 0)
		return -ENOENT;
	if (index >= c->n_ents && grow_entries(c, n) != 0)
		return -ENOMEM;
	const ax_shm_buffer *b = &bufs[index];
	*bp = b;
	entry *e = &c->ents[index];
	if (e->state == ENT_MAPPED)
		return 0;
	if (e->state == ENT_REJECTED)
		return e->err;
	if (b->loc != AX_LOC_CUDA_IPC && b->loc != AX_LOC_CUDA_VMM)
		return -EINVAL; /* HOST entries are not this importer's business; nothing is counted */
	int ai = get_alloc(c, b);
	if (ai < 0)
		return reject(c, e, ai);
	if (ax_cuda_check_extent(b, c->allocs[ai].size) != 0)
		return reject(c, e, -ERANGE);
	e->state = ENT_MAPPED;
	e->alloc = ai;
	c->st.entries++;
	return 0;
}

int ax_shm_cuda_map(ax_shm_cuda *c, uint32_t index, uint64_t *dptr)
{
	const ax_shm_buffer *b = NULL;
	int rc = resolve(c, index, &b);
	if (rc)
		return rc;
	*dptr = c->allocs[c->ents[index].alloc].base + b->offset;
	return 0;
}

int ax_shm_cuda_event(ax_shm_cuda *c, uint32_t index, void **event)
{
	const ax_shm_buffer *b = NULL;
	int rc = resolve(c, index, &b);
	if (rc)
		return rc;
	entry *e = &c->ents[index];
	if (e->event_state == 0) {
		const alloc *a = &c->allocs[e->alloc];
		uint8_t h[AX_CUDA_IPC_HANDLE_SIZE];
		int have = b->loc == AX_LOC_CUDA_IPC ? ax_cuda_entry_event(b, h) : a->has_event;
		if (b->loc == AX_LOC_CUDA_VMM && have)
			memcpy(h, a->event, sizeof h);
		if (have <= 0) {
			e->event_state = 2;
		} else if ((rc = c->ops->event_open(c->ops->ctx, c->device, h, &e->event)) == 0) {
			e->event_state = 1;
			c->st.events++;
		} else {
			e->event_state = rc;
			c->last_err = rc;
		}
	}
	if (e->event_state == 1) {
		*event = e->event;
		return 1;
	}
	return e->event_state == 2 ? 0 : e->event_state;
}

void ax_shm_cuda_get_stats(const ax_shm_cuda *c, ax_shm_cuda_stats *out) { *out = c->st; }

const char *ax_shm_cuda_last_error(const ax_shm_cuda *c)
{
	if (c == NULL || c->last_err == 0)
		return "no error";
	if (c->last_err == -ERANGE)
		return "buffer extent outside its allocation";
	if (c->last_err != -EIO && c->last_err != -ENODEV)
		return ax_strerror(c->last_err); /* the VMM server's answer, or the fetch's */
	return c->ops->last_error ? c->ops->last_error(c->ops->ctx) : "CUDA import failed";
}

void ax_shm_cuda_close(ax_shm_cuda *c)
{
	if (c == NULL)
		return;
	for (uint32_t i = c->n_ents; i-- > 0;)
		if (c->ents[i].event_state == 1)
			c->ops->event_close(c->ops->ctx, c->device, c->ents[i].event);
	for (uint32_t i = c->n_allocs; i-- > 0;) {
		const alloc *a = &c->allocs[i];
		if (a->loc == AX_LOC_CUDA_IPC)
			c->ops->ipc_close(c->ops->ctx, c->device, a->base);
		else
			c->ops->vmm_unmap(c->ops->ctx, c->device, a->base, a->size);
	}
	free(c->allocs);
	free(c->ents);
	free(c);
}
