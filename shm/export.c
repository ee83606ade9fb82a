/*
 * export.c — the engine side of the segment (libattnx-export): create the segment, hand out host buffers,
 * register requests, copy token ids into the arena, reserve Q-ring rows and publish step descriptors.
 *
 * The producer is one engine thread and must never wait for the capture. It keeps every counter and its own copy
 * of the header layout, buffer table and request slots in private memory and only *stores* them into the segment,
 * so a confused or hostile consumer (which maps the segment read-write for its consumer area) can make the
 * producer drop descriptors but never write outside its regions. The only word it reads back from the segment is
 * consumer_tail (ring space), the consumer area for ax_export_wanted, and consumer_wait, the futex word it clears
 * to wake a sleeping consumer after each publish.
 *
 * Publishing order (the consumer's validation relies on it): token ids and Q rows are written first — their head
 * counters are advanced *before* the overwrite so a consumer re-checking the head after its copy sees any lap —
 * then the descriptor slot (seqlock), then ring_head with release order.
 */
#include "attnx_common.h"
#include "shm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct ax_export {
	char name[AX_SHM_NAME_MAX];
	int fd;
	uint8_t *base;
	uint64_t size;
	ax_shm_header *h;      /* live header in the segment */
	int hold_wake;         /* ax_export_hold_wake: publishes defer their wake-up to ax_export_flush_wake */
	int held;              /* something was published while held */
	ax_shm_header hl;      /* private copy of the layout and model (never read back from the segment) */
	ax_shm_buffer *bufs;   /* private buffer table [buf_cap] */
	uint32_t nbufs;
	uint64_t *req_ids;     /* private: req_id held by each request slot, 0 = free [req_cap] */
	uint64_t *kept_ids;    /* private: req_id ended with _keep whose entry still holds it, 0 = none [req_cap] */
	uint64_t steps;        /* steps_started (ax_export_step_start, ax_export_request_freed) */
	uint32_t req_hint;     /* where the next free-slot search starts */
	uint64_t ring_head, ring_dropped, arena_head, q_head, data_used, next_req_id, reqs_dropped;
	uint64_t cpid;         /* consumer pid seen at the last liveness probe */
	uint64_t cpid_ns;      /* when that probe ran */
	int cpid_alive;
};

static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

/* Handles open in this process, so that a segment claiming our own pid can be told apart from one left by a
 * previous incarnation that had the same pid (a restarted container's engine is often pid 1 again). */
static pthread_mutex_t open_lock = PTHREAD_MUTEX_INITIALIZER;
static ax_export *open_list[64];

static void track(ax_export *ex, bool add)
{
	pthread_mutex_lock(&open_lock);
	for (size_t i = 0; i < AX_ARRAY_LEN(open_list); i++)
		if (open_list[i] == (add ? NULL : ex)) {
			open_list[i] = add ? ex : NULL;
			break;
		}
	pthread_mutex_unlock(&open_lock);
}

static bool open_here(const char *name)
{
	bool found = false;
	pthread_mutex_lock(&open_lock);
	for (size_t i = 0; i < AX_ARRAY_LEN(open_list) && !found; i++)
		found = open_list[i] && !strcmp(open_list[i]->name, name);
	pthread_mutex_unlock(&open_lock);
	return found;
}

/* ---- segment creation ---------------------------------------------------------------------------------- */

int ax__shm_check_name(const char *name)
{
	size_t n = strnlen(name, AX_SHM_NAME_MAX);
	if (n >= AX_SHM_NAME_MAX)
		return -ENAMETOOLONG;
	if (n < 2 || name[0] != '/' || strchr(name + 1, '/'))
		return -EINVAL;
	return 0;
}

/* A segment already holds the name: 0 if it was stale and is now unlinked, -EEXIST if a live engine owns it. */
static int replace_stale(const char *name)
{
	int fd = shm_open(name, O_RDWR, 0);
	if (fd < 0)
		return errno == ENOENT ? 0 : -errno;
	struct stat st;
	if (fstat(fd, &st) < 0) {
		int rc = -errno;
		close(fd);
		return rc;
	}
	if ((uint64_t)st.st_size >= sizeof(ax_shm_header)) {
		ax_shm_header *h = mmap(NULL, sizeof *h, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (h != MAP_FAILED) {
			bool ok = AX_LOAD_ACQ(&h->magic) == AX_SHM_MAGIC;
			uint32_t state = AX_LOAD_ACQ(&h->state);
			uint32_t pid = AX_LOAD_ACQ(&h->engine_pid);
			bool live = ax__shm_pid_alive(pid) && (!ok || state == AX_SHM_STATE_READY) &&
				    (pid != (uint32_t)getpid() || open_here(name));
			if (!live && ok) /* consumers still mapping the old segment see it closed and re-attach */
				AX_STORE_REL(&h->state, AX_SHM_STATE_CLOSED);
			munmap(h, sizeof *h);
			if (live) {
				close(fd);
				return -EEXIST;
			}
		}
	}
	close(fd);
	ax_log(AX_LOG_INFO, "shm", "replacing stale segment %s", name);
	if (shm_unlink(name) < 0 && errno != ENOENT)
		return -errno;
	return 0;
}

/* Create the segment file exclusively (replacing a stale one) and map it. */
static int create_segment(ax_export *ex, uint64_t size)
{
	int fd = -1;
	for (int attempt = 0; attempt < 3 && fd < 0; attempt++) {
		fd = shm_open(ex->name, O_RDWR | O_CREAT | O_EXCL, 0600);
		if (fd >= 0)
			break;
		if (errno != EEXIST)
			return -errno;
		int rc = replace_stale(ex->name);
		if (rc)
			return rc;
	}
	if (fd < 0)
		return -EEXIST;
	int rc = 0;
	if (fchmod(fd, 0600) < 0 || ftruncate(fd, (off_t)size) < 0) {
		rc = -errno;
		goto fail;
	}
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		rc = -errno;
		goto fail;
	}
	ex->fd = fd;
	ex->base = p;
	ex->size = size;
	return 0;
fail:
	close(fd);
	shm_unlink(ex->name);
	return rc;
}

/* ---- configuration -------------------------------------------------------------------------------------- */

static bool float_dtype(uint32_t d) { return d >= AX_DTYPE_F32 && d <= AX_DTYPE_FP8_E5M2; }

static int check_config(const ax_export_config *c)
{
	uint32_t world = c->world_size ? c->world_size : 1;
	if (c->n_layers < 1 || c->n_layers > AX_SHM_MAX_LAYERS || c->n_q_heads < 1 || c->n_kv_heads < 1 ||
	    c->n_q_heads % c->n_kv_heads || c->head_dim < 1 || c->head_dim > 1024 || c->rank >= world)
		return -EINVAL;
	if (c->n_q_heads_total && (uint64_t)c->head_offset + c->n_q_heads > c->n_q_heads_total)
		return -EINVAL;
	if (!float_dtype(c->q_dtype) || !float_dtype(c->k_dtype) || c->max_ctx < 1 || c->window < 0)
		return -EINVAL;
	if (!isfinite(c->scale) || c->scale < 0 || !isfinite(c->logit_cap) || c->logit_cap < 0)
		return -EINVAL;
	if ((c->engine && strlen(c->engine) >= sizeof(((ax_shm_header *)0)->engine)) ||
	    (c->model && strlen(c->model) >= sizeof(((ax_shm_header *)0)->model)))
		return -EINVAL;
	if (c->req_cap > AX_SHM_REQ_CAP_MAX || c->ring_cap > (1u << 24) || c->buf_cap > (1u << 16))
		return -EINVAL;
	return 0;
}

static uint32_t round_pow2(uint32_t v)
{
	uint32_t p = 2;
	while (p < v)
		p <<= 1;
	return p;
}

/* Fill the private header from the config (defaults applied) and compute the layout. */
static int init_header(ax_shm_header *h, const ax_export_config *c)
{
	memset(h, 0, sizeof *h);
	h->version = AX_SHM_VERSION;
	h->header_size = sizeof *h;
	h->features = AX_SHM_FEAT_WAKE;
	h->rank = c->rank;
	h->world_size = c->world_size ? c->world_size : 1;
	snprintf(h->engine, sizeof h->engine, "%s", c->engine ? c->engine : "");
	snprintf(h->model, sizeof h->model, "%s", c->model ? c->model : "");
	h->n_layers = c->n_layers;
	h->n_q_heads = c->n_q_heads;
	h->n_kv_heads = c->n_kv_heads;
	h->head_offset = c->head_offset;
	h->n_q_heads_total = c->n_q_heads_total ? c->n_q_heads_total : c->head_offset + c->n_q_heads;
	h->head_dim = c->head_dim;
	h->q_dtype = c->q_dtype;
	h->k_dtype = c->k_dtype;
	h->scale = c->scale > 0 ? c->scale : 1.0f / sqrtf((float)c->head_dim);
	h->logit_cap = c->logit_cap;
	h->window = c->window;
	h->max_ctx = c->max_ctx;
	h->buf_cap = c->buf_cap ? c->buf_cap : 2 * c->n_layers + 8;
	h->req_cap = c->req_cap ? c->req_cap : 1024;
	h->ring_cap = round_pow2(c->ring_cap ? c->ring_cap : 16384);
	h->arena_cap = c->arena_cap ? c->arena_cap : 4ull << 20;
	h->data_size = c->data_size;
	ax_shm_layout l;
	int rc = ax__shm_layout(h->buf_cap, h->req_cap, h->ring_cap, h->arena_cap, h->data_size, &l);
	if (rc)
		return rc;
	h->buf_off = l.buf_off;
	h->req_off = l.req_off;
	h->ring_off = l.ring_off;
	h->arena_off = l.arena_off;
	h->data_off = l.data_off;
	h->segment_size = l.segment_size;
	return 0;
}

static uint64_t new_generation(void)
{
	static uint64_t counter;
	uint64_t g = ((uint64_t)getpid() << 32) ^ ax_wall_ns() ^ (__atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED) << 20);
	return g ? g : 1;
}

/* Copy the private header into the fresh (zero-filled) segment; magic last, with release order. */
static void publish_header(ax_export *ex)
{
	ax_shm_header tmp = ex->hl;
	tmp.magic = 0;
	tmp.heartbeat_ns = ax_now_ns();
	memcpy(ex->h, &tmp, sizeof tmp);
	AX_STORE_REL(&ex->h->magic, AX_SHM_MAGIC);
}

int ax_export_open(ax_export **out, const ax_export_config *cfg)
{
	if (!out || !cfg)
		return -EINVAL;
	*out = NULL;
	const char *name = cfg->name ? cfg->name : AX_SHM_DEFAULT_NAME;
	int rc = ax__shm_check_name(name);
	if (rc || (rc = check_config(cfg)))
		return rc;
	ax_export *ex = calloc(1, sizeof *ex);
	if (!ex)
		return -ENOMEM;
	ex->fd = -1;
	snprintf(ex->name, sizeof ex->name, "%s", name);
	if ((rc = init_header(&ex->hl, cfg)))
		goto fail;
	ex->hl.magic = AX_SHM_MAGIC;
	ex->hl.generation = new_generation();
	ex->hl.engine_pid = (uint32_t)getpid();
	ex->hl.state = AX_SHM_STATE_READY;
	ex->bufs = calloc(ex->hl.buf_cap, sizeof *ex->bufs);
	ex->req_ids = calloc(ex->hl.req_cap, sizeof *ex->req_ids);
	ex->kept_ids = calloc(ex->hl.req_cap, sizeof *ex->kept_ids);
	if (!ex->bufs || !ex->req_ids || !ex->kept_ids) {
		rc = -ENOMEM;
		goto fail;
	}
	if ((rc = create_segment(ex, ex->hl.segment_size)))
		goto fail;
	ex->h = (ax_shm_header *)ex->base;
	publish_header(ex);
	track(ex, true);
	*out = ex;
	return 0;
fail:
	free(ex->kept_ids);
	free(ex->req_ids);
	free(ex->bufs);
	free(ex);
	return rc;
}

/* After ring_head (or state) is stored: wake a consumer sleeping in ax_shm_wait. The full fence orders that store
 * before the load of consumer_wait, as the consumer orders its store of consumer_wait before its load of ring_head
 * (so one of the two sees the other). No sleeper: one load, no system call. A sleeper: the swap to 0 makes this
 * the only wake it gets, and FUTEX_WAKE never blocks — even when the sleeper has died with the word set. */
static void wake_consumer(ax_export *ex)
{
	uint32_t *w = &ex->h->consumer_wait;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (AX_LOAD_RLX(w) != 0 && __atomic_exchange_n(w, 0u, __ATOMIC_ACQ_REL) != 0)
		ax__shm_futex_wake(w);
}

/* Unlink the name only if it still names our segment (a replacement must not lose its name). */
static void unlink_if_ours(ax_export *ex)
{
	struct stat mine, named;
	int fd = shm_open(ex->name, O_RDONLY, 0);
	if (fd < 0)
		return;
	if (fstat(ex->fd, &mine) == 0 && fstat(fd, &named) == 0 && mine.st_ino == named.st_ino &&
	    mine.st_dev == named.st_dev)
		shm_unlink(ex->name);
	close(fd);
}

void ax_export_close(ax_export *ex)
{
	if (!ex)
		return;
	track(ex, false);
	AX_STORE_REL(&ex->h->state, AX_SHM_STATE_CLOSED);
	wake_consumer(ex); /* a sleeping capture learns of the close now, not at its next timer */
	unlink_if_ours(ex);
	munmap(ex->base, ex->size);
	close(ex->fd);
	free(ex->kept_ids);
	free(ex->req_ids);
	free(ex->bufs);
	free(ex);
}

ax_shm_header *ax_export_header(ax_export *ex) { return ex ? ex->h : NULL; }

void ax_export_hold_wake(ax_export *ex)
{
	if (ex)
		ex->hold_wake = 1;
}

void ax_export_flush_wake(ax_export *ex)
{
	if (!ex)
		return;
	ex->hold_wake = 0;
	if (ex->held)
		wake_consumer(ex);
	ex->held = 0;
}

void ax_export_disable_wake(ax_export *ex)
{
	if (!ex)
		return;
	ex->hl.features &= ~(uint32_t)AX_SHM_FEAT_WAKE;
	AX_STORE_REL(&ex->h->features, ex->hl.features);
	wake_consumer(ex); /* a consumer asleep now must not sleep out its whole timeout */
}

void ax_export_heartbeat(ax_export *ex)
{
	if (ex)
		AX_STORE_REL(&ex->h->heartbeat_ns, ax_now_ns());
}

/* ---- buffer table --------------------------------------------------------------------------------------- */

/* Defaults for a caller's entry: contiguous row-major strides when all are 0, bytes = extent when 0. */
static int complete_entry(ax_shm_buffer *b)
{
	size_t esize = ax_dtype_size(b->dtype);
	if (!esize || b->ndim < 1 || b->ndim > 4)
		return -EINVAL;
	bool zero = true;
	for (uint32_t i = 0; i < b->ndim; i++)
		zero = zero && b->stride[i] == 0;
	if (zero) {
		uint64_t st = 1;
		for (int i = (int)b->ndim - 1; i >= 0; i--) {
			b->stride[i] = st;
			if (__builtin_mul_overflow(st, b->dim[i], &st))
				return -EINVAL;
		}
	}
	if (b->bytes == 0) {
		uint64_t last = 0;
		for (uint32_t i = 0; i < b->ndim; i++) {
			if (b->dim[i] == 0)
				return -EINVAL;
			last += (b->dim[i] - 1) * b->stride[i];
		}
		b->bytes = (last + 1) * esize;
	}
	return 0;
}

/* Append a completed entry to the private and the shared table; buf_count grows after the entry is written. */
static int append_entry(ax_export *ex, const ax_shm_buffer *b, uint32_t *index)
{
	if (ax_shm_validate_buffer(&ex->hl, b))
		return -EINVAL;
	uint32_t i = ex->nbufs;
	ex->bufs[i] = *b;
	ax_shm_buffer *shared = (ax_shm_buffer *)(ex->base + ex->hl.buf_off);
	shared[i] = *b;
	ex->nbufs = i + 1;
	AX_STORE_REL(&ex->h->buf_count, ex->nbufs);
	if (index)
		*index = i;
	return 0;
}

int ax_export_add_host_buffer(ax_export *ex, const ax_shm_buffer *desc, void **ptr, uint32_t *index)
{
	if (!ex || !desc || desc->loc != AX_LOC_HOST)
		return -EINVAL;
	ax_shm_buffer b = *desc;
	b.device = -1;
	memset(b.reserved, 0, sizeof b.reserved);
	if (complete_entry(&b))
		return -EINVAL;
	uint64_t used = align_up(ex->data_used, AX_SHM_ALIGN);
	if (ex->nbufs >= ex->hl.buf_cap || used > ex->hl.data_size || b.bytes > ex->hl.data_size - used)
		return -ENOSPC;
	b.offset = ex->hl.data_off + used;
	int rc = append_entry(ex, &b, index);
	if (rc)
		return rc;
	ex->data_used = used + b.bytes;
	AX_STORE_REL(&ex->h->data_used, ex->data_used);
	if (ptr)
		*ptr = ex->base + b.offset;
	return 0;
}

int ax_export_add_device_buffer(ax_export *ex, const ax_shm_buffer *desc, uint32_t *index)
{
	if (!ex || !desc || (desc->loc != AX_LOC_CUDA_IPC && desc->loc != AX_LOC_CUDA_VMM))
		return -EINVAL;
	ax_shm_buffer b = *desc;
	memset(b.reserved, 0, sizeof b.reserved);
	if (complete_entry(&b))
		return -EINVAL;
	if (ex->nbufs >= ex->hl.buf_cap)
		return -ENOSPC;
	return append_entry(ex, &b, index);
}

int ax_export_add_block_table(ax_export *ex, uint64_t rows, uint64_t max_blocks, uint32_t block_size, int32_t **ptr,
			      uint32_t *index)
{
	ax_shm_buffer b;
	if (!ex || ax_shm_block_table_desc(&b, rows, max_blocks, block_size))
		return -EINVAL;
	b.loc = AX_LOC_HOST;
	return ax_export_add_host_buffer(ex, &b, (void **)ptr, index); /* the data region is fresh (zero) memory */
}

/* ---- token arena, Q ring, step ring ----------------------------------------------------------------------- */

/* Copy n token ids into the arena; returns their position. The head moves before the overwrite (see top). */
static uint64_t arena_write(ax_export *ex, const int32_t *toks, uint32_t n)
{
	int32_t *arena = (int32_t *)(ex->base + ex->hl.arena_off);
	uint64_t pos = ex->arena_head, cap = ex->hl.arena_cap;
	ex->arena_head = pos + n;
	AX_STORE_RLX(&ex->h->arena_head, ex->arena_head);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	for (uint32_t i = 0; i < n; i++)
		AX_STORE_RLX(&arena[(pos + i) % cap], toks[i]);
	return pos;
}

int ax_export_q_reserve(ax_export *ex, uint32_t qbuf, uint32_t rows, uint64_t *q_row, void **ptr)
{
	if (ptr)
		*ptr = NULL;
	if (!ex || qbuf >= ex->nbufs)
		return -EINVAL;
	const ax_shm_buffer *b = &ex->bufs[qbuf];
	if (b->kind != AX_BUF_Q_RING || rows < 1 || rows > b->dim[0])
		return -EINVAL;
	uint64_t n = b->dim[0], head = ex->q_head;
	if (head % n + rows > n)
		head += n - head % n; /* the reserved run never wraps */
	ex->q_head = head + rows;
	AX_STORE_RLX(&ex->h->q_head, ex->q_head);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	if (q_row)
		*q_row = head;
	if (ptr && b->loc == AX_LOC_HOST) /* a CUDA ring's rows are written on the GPU by the engine */
		*ptr = ex->base + b->offset + (head % n) * b->stride[0] * ax_dtype_size(b->dtype);
	return 0;
}

static bool ring_full(ax_export *ex)
{
	uint64_t tail = AX_LOAD_ACQ(&ex->h->consumer_tail);
	return ex->ring_head - tail >= ex->hl.ring_cap;
}

static void count_drop(ax_export *ex)
{
	ex->ring_dropped++;
	AX_STORE_REL(&ex->h->ring_dropped, ex->ring_dropped);
}

/* Write descriptor `d` (seq, t_ns filled here) into the next slot and advance ring_head. Space checked before. */
static void publish(ax_export *ex, ax_shm_step *d)
{
	ax_shm_step *ring = (ax_shm_step *)(ex->base + ex->hl.ring_off);
	uint64_t seq = ex->ring_head, now = ax_now_ns();
	d->t_ns = now;
	ax__shm_slot_write(&ring[seq & (ex->hl.ring_cap - 1)], seq, d);
	ex->ring_head = seq + 1;
	AX_STORE_REL(&ex->h->ring_head, ex->ring_head);
	AX_STORE_REL(&ex->h->heartbeat_ns, now);
	if (ex->hold_wake)
		ex->held = 1;
	else
		wake_consumer(ex);
}

/* Publish a BEGIN/END descriptor; -EAGAIN if the ring is full (dropped and counted). */
static int publish_control(ax_export *ex, uint32_t kind, uint32_t slot, uint64_t req_id, uint32_t reason)
{
	if (ring_full(ex)) {
		count_drop(ex);
		return -EAGAIN;
	}
	ax_shm_step d = {.kind = kind, .req_id = req_id, .req_slot = slot, .end_reason = reason};
	publish(ex, &d);
	return 0;
}

/* ---- requests ------------------------------------------------------------------------------------------- */

static int find_free_slot(ax_export *ex)
{
	uint32_t cap = ex->hl.req_cap;
	for (uint32_t i = 0; i < cap; i++) {
		uint32_t slot = (ex->req_hint + i) % cap;
		if (ex->req_ids[slot] == 0) {
			ex->req_hint = (slot + 1) % cap;
			return (int)slot;
		}
	}
	return -ENOSPC;
}

/* req_id = (counter << 16) | slot: lookup is one comparison. */
static int lookup_slot(ax_export *ex, uint64_t req_id)
{
	uint64_t slot = req_id & 0xffff;
	if (req_id == 0 || slot >= ex->hl.req_cap || ex->req_ids[slot] != req_id)
		return -ENOENT;
	return (int)slot;
}

/* Rewrite a request entry: req_id goes to 0 first so a concurrent reader's re-check fails (ids are unique). */
static void write_request(ax_export *ex, uint32_t slot, const ax_shm_request *r)
{
	ax_shm_request *dst = (ax_shm_request *)(ex->base + ex->hl.req_off) + slot;
	uint64_t *dw = (uint64_t *)dst;
	const uint64_t *sw = (const uint64_t *)r;
	AX_STORE_RLX(&dst->req_id, 0);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	for (size_t i = 0; i < sizeof *r / sizeof(uint64_t); i++)
		if (&dw[i] != &dst->req_id)
			AX_STORE_RLX(&dw[i], sw[i]);
	AX_STORE_REL(&dst->req_id, r->req_id);
}

int ax_export_request_begin(ax_export *ex, const char *rid, const int32_t *prompt, uint32_t prompt_len,
			    uint64_t *req_id)
{
	if (!ex || !rid || !req_id || (prompt_len && !prompt) || prompt_len > ex->hl.arena_cap)
		return -EINVAL;
	size_t rlen = strnlen(rid, AX_SHM_RID_MAX);
	if (rlen == 0 || rlen >= AX_SHM_RID_MAX)
		return -EINVAL;
	int slot = find_free_slot(ex);
	if (slot < 0) {
		ex->reqs_dropped++;
		AX_STORE_REL(&ex->h->reqs_dropped, ex->reqs_dropped);
		return -ENOSPC;
	}
	ex->next_req_id++;
	AX_STORE_RLX(&ex->h->next_req_id, ex->next_req_id);
	uint64_t id = ex->next_req_id << 16 | (uint64_t)slot;
	ax_shm_request r = {.state = AX_REQ_ACTIVE, .prompt_len = prompt_len, .req_id = id, .begin_ns = ax_now_ns()};
	memcpy(r.rid, rid, rlen);
	r.prompt_pos = arena_write(ex, prompt, prompt_len);
	write_request(ex, (uint32_t)slot, &r); /* freed_step 0: the new request owns its slots */
	ex->req_ids[slot] = id;
	ex->kept_ids[slot] = 0; /* an entry reused before its old request was freed: that one reads as recycled */
	*req_id = id;
	return publish_control(ex, AX_STEP_BEGIN, (uint32_t)slot, id, 0);
}

static ax_shm_request *shared_request(ax_export *ex, uint32_t slot)
{
	return (ax_shm_request *)(ex->base + ex->hl.req_off) + slot;
}

/* The request's KV slots are freed now: freed_step = 1 + steps_started (rule 9). Stored before anything the engine
 * writes into them, which it does only after a later step start. */
static void mark_freed(ax_export *ex, uint32_t slot)
{
	AX_STORE_REL(&shared_request(ex, slot)->freed_step, ex->steps + 1);
}

/* END, entry ended; `keep`: the engine keeps the slots (freed later with ax_export_request_freed). */
static int end_request(ax_export *ex, uint64_t req_id, uint32_t reason, int keep, uint64_t *done_seq)
{
	if (!ex)
		return -EINVAL;
	int slot = lookup_slot(ex, req_id);
	if (slot < 0)
		return slot;
	if (reason < AX_END_STOP || reason > AX_END_ERROR)
		reason = AX_END_ERROR;
	if (!keep)
		mark_freed(ex, (uint32_t)slot);
	int rc = publish_control(ex, AX_STEP_END, (uint32_t)slot, req_id, reason);
	AX_STORE_REL(&shared_request(ex, (uint32_t)slot)->state, (uint32_t)AX_REQ_ENDED); /* readable until reused */
	ex->req_ids[slot] = 0;
	ex->kept_ids[slot] = keep ? req_id : 0;
	if (done_seq) /* dropped or not: the capture is done with the request once it has processed all before this */
		*done_seq = ex->ring_head;
	return rc;
}

int ax_export_request_end(ax_export *ex, uint64_t req_id, uint32_t reason)
{
	return end_request(ex, req_id, reason, 0, NULL);
}

int ax_export_request_end_keep(ax_export *ex, uint64_t req_id, uint32_t reason, uint64_t *done_seq)
{
	return end_request(ex, req_id, reason, 1, done_seq);
}

void ax_export_step_start(ax_export *ex)
{
	if (!ex)
		return;
	if (!(ex->hl.features & AX_SHM_FEAT_RECYCLE)) {
		ex->hl.features |= AX_SHM_FEAT_RECYCLE;
		AX_STORE_REL(&ex->h->features, ex->hl.features);
	}
	ex->steps++;
	AX_STORE_RLX(&ex->h->steps_started, ex->steps);
	__atomic_thread_fence(__ATOMIC_RELEASE); /* the counter before the step's writes (as rule 2's heads) */
}

int ax_export_request_freed(ax_export *ex, uint64_t req_id)
{
	if (!ex || req_id == 0)
		return -EINVAL;
	uint64_t slot = req_id & 0xffff;
	if (slot >= ex->hl.req_cap || ex->kept_ids[slot] != req_id)
		return -ENOENT;
	ex->kept_ids[slot] = 0;
	mark_freed(ex, (uint32_t)slot);
	ax_export_step_start(ex); /* the engine writes into the slots right away */
	return 0;
}

int ax_export_step(ax_export *ex, const ax_shm_step *s, const int32_t *tokens)
{
	if (!ex || !s || !tokens || s->n_tokens < 1 || s->n_tokens > ex->hl.arena_cap)
		return -EINVAL;
	int slot = lookup_slot(ex, s->req_id);
	if (slot < 0)
		return slot;
	ax_shm_step d = *s;
	d.seq = 0;
	d.kind = AX_STEP_FORWARD;
	d.req_slot = (uint32_t)slot;
	d.tok_pos = ex->arena_head;
	d.end_reason = 0;
	memset(d.reserved, 0, sizeof d.reserved);
	/* Check the descriptor as the consumer will see it, so engine bugs surface here rather than as rejects. */
	ax_shm_heads heads = {ex->arena_head + d.n_tokens, ex->q_head};
	if (ax__shm_validate_step(&ex->hl, ex->bufs, ex->nbufs, &heads, &d))
		return -EINVAL;
	if (ring_full(ex)) { /* checked before the arena write: a dropped step costs no arena space */
		count_drop(ex);
		AX_STORE_REL(&ex->h->heartbeat_ns, ax_now_ns());
		return -EAGAIN;
	}
	arena_write(ex, tokens, d.n_tokens);
	publish(ex, &d);
	return 0;
}

/* Is a consumer attached and alive (pid set and alive, heartbeat younger than the timeout)? */
static int consumer_alive(ax_export *ex)
{
	uint64_t pid = AX_LOAD_ACQ(&ex->h->consumer_pid), hb = AX_LOAD_ACQ(&ex->h->consumer_heartbeat_ns);
	uint64_t now = ax_now_ns();
	if (pid == 0 || (now > hb && now - hb > AX_SHM_CONSUMER_TIMEOUT_NS))
		return 0;
	if (pid != ex->cpid || now - ex->cpid_ns > 100000000ull) { /* probe the pid at most every 100 ms */
		ex->cpid = pid;
		ex->cpid_ns = now;
		ex->cpid_alive = ax__shm_pid_alive(pid);
	}
	return ex->cpid_alive;
}

int ax_export_consumer_done(ax_export *ex, uint64_t done_seq)
{
	if (!ex || !consumer_alive(ex))
		return 1;
	if (!(AX_LOAD_ACQ(&ex->h->consumer_features) & AX_SHM_CFEAT_DONE))
		return 0;
	return AX_LOAD_ACQ(&ex->h->consumer_done) >= done_seq;
}

int ax_export_wanted(ax_export *ex, uint64_t layers[2], int *prefill)
{
	if (layers)
		layers[0] = layers[1] = 0;
	if (prefill)
		*prefill = 0;
	if (!ex || !consumer_alive(ex))
		return 0;
	if (layers) {
		layers[0] = AX_LOAD_RLX(&ex->h->want_layers[0]);
		layers[1] = AX_LOAD_RLX(&ex->h->want_layers[1]);
	}
	if (prefill)
		*prefill = AX_LOAD_RLX(&ex->h->want_prefill) != 0;
	return 1;
}
