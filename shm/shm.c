/*
 * shm.c — layout helpers and validators shared by the engine side (export.c) and the capture side (attach.c).
 *
 * Everything here is pure: the validators only read the structs they are given (copies or a live mapping) and
 * compute with overflow-checked 64-bit arithmetic, so the fuzzer can throw arbitrary bytes at them. The consumer
 * calls them on its own snapshot of the header and buffer table, so a producer that scribbles over its segment
 * can make the consumer reject descriptors but never read outside the mapping. The seqlock slot copy lives here
 * too because both sides must agree on it word for word.
 */
#include "shm_internal.h"

#include "attnx_common.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <strings.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* The wire structs are the protocol: their sizes and the position of the words read concurrently are fixed. */
_Static_assert(sizeof(ax_shm_header) == 512, "ax_shm_header is 512 bytes");
_Static_assert(sizeof(ax_shm_buffer) == 256, "ax_shm_buffer is 256 bytes");
_Static_assert(sizeof(ax_shm_request) == 160, "ax_shm_request is 160 bytes");
_Static_assert(sizeof(ax_shm_step) == 128, "ax_shm_step is 128 bytes");
_Static_assert(offsetof(ax_shm_header, magic) == 0, "magic first");
_Static_assert(offsetof(ax_shm_step, seq) == 0, "seqlock word first");
_Static_assert(offsetof(ax_shm_header, ring_head) % 8 == 0, "counters 8-byte aligned");
_Static_assert(offsetof(ax_shm_header, consumer_tail) % 8 == 0, "consumer area 8-byte aligned");
_Static_assert(offsetof(ax_shm_request, req_id) % 8 == 0, "req_id 8-byte aligned");
_Static_assert(offsetof(ax_shm_header, consumer_wait) % 4 == 0 && offsetof(ax_shm_header, consumer_wait) == 408,
	       "futex word: 4-byte aligned, where reserved bytes were in the first layout (old peers see zero)");
_Static_assert(sizeof(ax_shm_step) % sizeof(uint64_t) == 0, "step copied in 64-bit words");
_Static_assert(offsetof(ax_shm_header, steps_started) == 416 && offsetof(ax_shm_header, consumer_done) == 424 &&
		       offsetof(ax_shm_request, freed_step) == 128,
	       "recycling words at their version-1 offsets (formerly reserved zero bytes)");
_Static_assert(sizeof(ax_shm_header) % AX_SHM_ALIGN == 0 && sizeof(ax_shm_step) % AX_SHM_ALIGN == 0,
	       "header and ring slots keep cache-line alignment");

static const struct {
	uint32_t id;
	size_t size;
	const char *name;
	const char *alias;
} dtypes[] = {
	{AX_DTYPE_F32, 4, "f32", "float32"},      {AX_DTYPE_F16, 2, "f16", "float16"},
	{AX_DTYPE_BF16, 2, "bf16", "bfloat16"},   {AX_DTYPE_FP8_E4M3, 1, "fp8_e4m3", "e4m3"},
	{AX_DTYPE_FP8_E5M2, 1, "fp8_e5m2", "e5m2"}, {AX_DTYPE_I32, 4, "i32", "int32"},
	{AX_DTYPE_I64, 8, "i64", "int64"},
};

size_t ax_dtype_size(uint32_t dtype)
{
	for (size_t i = 0; i < AX_ARRAY_LEN(dtypes); i++)
		if (dtypes[i].id == dtype)
			return dtypes[i].size;
	return 0;
}

const char *ax_dtype_name(uint32_t dtype)
{
	for (size_t i = 0; i < AX_ARRAY_LEN(dtypes); i++)
		if (dtypes[i].id == dtype)
			return dtypes[i].name;
	return "?";
}

int ax_dtype_parse(const char *name)
{
	if (!name)
		return -EINVAL;
	for (size_t i = 0; i < AX_ARRAY_LEN(dtypes); i++)
		if (!strcasecmp(name, dtypes[i].name) || !strcasecmp(name, dtypes[i].alias))
			return (int)dtypes[i].id;
	return -EINVAL;
}

static bool is_float_dtype(uint32_t d) { return d >= AX_DTYPE_F32 && d <= AX_DTYPE_FP8_E5M2; }
static bool is_fp8(uint32_t d) { return d == AX_DTYPE_FP8_E4M3 || d == AX_DTYPE_FP8_E5M2; }
static bool has_nul(const char *s, size_t n) { return memchr(s, 0, n) != NULL; }
static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

int ax__shm_layout(uint32_t buf_cap, uint32_t req_cap, uint32_t ring_cap, uint64_t arena_cap, uint64_t data_size,
		   ax_shm_layout *out)
{
	/* Caps are bounded so every product below stays far from 2^64. */
	if (arena_cap > (1ull << 40) || data_size > (1ull << 50))
		return -ERANGE;
	out->buf_off = align_up(sizeof(ax_shm_header), AX_SHM_ALIGN);
	out->req_off = align_up(out->buf_off + (uint64_t)buf_cap * sizeof(ax_shm_buffer), AX_SHM_ALIGN);
	out->ring_off = align_up(out->req_off + (uint64_t)req_cap * sizeof(ax_shm_request), AX_SHM_ALIGN);
	out->arena_off = align_up(out->ring_off + (uint64_t)ring_cap * sizeof(ax_shm_step), AX_SHM_ALIGN);
	out->data_off = align_up(out->arena_off + arena_cap * sizeof(int32_t), AX_SHM_ALIGN);
	out->segment_size = align_up(out->data_off + data_size, AX_SHM_ALIGN);
	return 0;
}

/* Highest element offset reachable through dims/strides, plus one, times the element size; 0 on overflow. */
static uint64_t buffer_extent(const ax_shm_buffer *b, size_t esize)
{
	uint64_t last = 0;
	for (uint32_t i = 0; i < b->ndim; i++) {
		uint64_t span;
		if (__builtin_mul_overflow(b->dim[i] - 1, b->stride[i], &span) ||
		    __builtin_add_overflow(last, span, &last))
			return 0;
	}
	uint64_t bytes;
	if (__builtin_add_overflow(last, 1, &last) || __builtin_mul_overflow(last, (uint64_t)esize, &bytes))
		return 0;
	return bytes;
}

/* A K pool: [slots, H_kv, D], or paged [blocks, block_size, H_kv, D] with a block size in range. */
static int check_k_pool(const ax_shm_header *h, const ax_shm_buffer *b)
{
	if (b->layer < 0 || (uint32_t)b->layer >= h->n_layers || !is_float_dtype(b->dtype))
		return -EINVAL;
	if (b->ndim == 3)
		return b->dim[1] == h->n_kv_heads && b->dim[2] == h->head_dim ? 0 : -EINVAL;
	if (b->ndim != 4 || b->dim[1] > AX_SHM_MAX_BLOCK_SIZE)
		return -EINVAL;
	return b->dim[2] == h->n_kv_heads && b->dim[3] == h->head_dim ? 0 : -EINVAL;
}

/* A block table: i32 [rows, max_blocks], unit column stride, block size in dim[2], nothing past it. */
static int check_block_table(const ax_shm_buffer *b)
{
	if (b->ndim != 2 || b->layer != -1 || b->dtype != AX_DTYPE_I32 || b->stride[1] != 1)
		return -EINVAL;
	if (b->dim[2] == 0 || b->dim[2] > AX_SHM_MAX_BLOCK_SIZE || b->dim[3] || b->stride[2] || b->stride[3])
		return -EINVAL;
	return 0;
}

/* Shape rules of each buffer kind against the model in the header. */
static int check_buffer_shape(const ax_shm_header *h, const ax_shm_buffer *b)
{
	switch (b->kind) {
	case AX_BUF_K_POOL:
		return check_k_pool(h, b);
	case AX_BUF_Q_RING:
		if (b->ndim != 3 || b->layer != -1 || !is_float_dtype(b->dtype) || b->dim[1] != h->n_q_heads ||
		    b->dim[2] != h->head_dim)
			return -EINVAL;
		return 0;
	case AX_BUF_INDEX_TOKEN:
		if (b->ndim != 2 || b->layer != -1 || (b->dtype != AX_DTYPE_I32 && b->dtype != AX_DTYPE_I64))
			return -EINVAL;
		return 0;
	case AX_BUF_INDEX_PAGED: /* [rows, max_blocks], block size in dim[2] */
		return check_block_table(b);
	default:
		return -EINVAL;
	}
}

static int check_buffer_location(const ax_shm_header *h, const ax_shm_buffer *b, size_t esize)
{
	switch (b->loc) {
	case AX_LOC_HOST:
		if (b->device != -1 || b->offset % esize)
			return -EINVAL;
		if (b->offset < h->data_off || b->offset - h->data_off > h->data_size ||
		    b->bytes > h->data_size - (b->offset - h->data_off))
			return -ERANGE;
		return 0;
	case AX_LOC_CUDA_IPC:
		return b->device >= 0 ? 0 : -EINVAL;
	case AX_LOC_CUDA_VMM:
		if (b->device < 0 || !has_nul(b->vmm_socket, sizeof b->vmm_socket) || !b->vmm_socket[0])
			return -EINVAL;
		return 0;
	default:
		return -EINVAL;
	}
}

int ax_shm_validate_buffer(const ax_shm_header *h, const ax_shm_buffer *b)
{
	size_t esize = ax_dtype_size(b->dtype);
	if (!esize || b->ndim < 1 || b->ndim > 4)
		return -EINVAL;
	for (uint32_t i = 0; i < b->ndim; i++)
		if (b->dim[i] == 0)
			return -EINVAL;
	if (is_fp8(b->dtype) && !(isfinite(b->scale) && b->scale > 0))
		return -EINVAL;
	int rc = check_buffer_shape(h, b);
	if (rc)
		return rc;
	uint64_t need = buffer_extent(b, esize);
	if (!need || need > b->bytes)
		return -ERANGE;
	return check_buffer_location(h, b, esize);
}

uint32_t ax_shm_block_size(const ax_shm_buffer *b)
{
	if (b && b->kind == AX_BUF_INDEX_PAGED && b->ndim == 2 && b->dim[2] <= AX_SHM_MAX_BLOCK_SIZE)
		return (uint32_t)b->dim[2];
	if (b && b->kind == AX_BUF_K_POOL && b->ndim == 4 && b->dim[1] <= AX_SHM_MAX_BLOCK_SIZE)
		return (uint32_t)b->dim[1];
	return 0;
}

/* Contiguous strides and the exact byte extent of b's dims; -EINVAL past 2^62 bytes. */
static int contiguous(ax_shm_buffer *b)
{
	uint64_t st = 1, esize = ax_dtype_size(b->dtype);
	for (int i = (int)b->ndim - 1; i >= 0; i--) {
		b->stride[i] = st;
		if (b->dim[i] == 0 || __builtin_mul_overflow(st, b->dim[i], &st))
			return -EINVAL;
	}
	if (!esize || st > (1ull << 62) / esize)
		return -EINVAL;
	b->bytes = st * esize;
	return 0;
}

int ax_shm_block_table_desc(ax_shm_buffer *b, uint64_t rows, uint64_t max_blocks, uint32_t block_size)
{
	if (!b)
		return -EINVAL;
	*b = (ax_shm_buffer){.kind = AX_BUF_INDEX_PAGED, .dtype = AX_DTYPE_I32, .layer = -1, .ndim = 2,
			     .dim = {rows, max_blocks}, .scale = 1, .device = -1};
	if (block_size == 0 || block_size > AX_SHM_MAX_BLOCK_SIZE)
		return -EINVAL;
	int rc = contiguous(b);
	b->dim[2] = block_size; /* after the strides: it is not a dimension of the table */
	return rc;
}

int ax_shm_paged_kpool_desc(ax_shm_buffer *b, int32_t layer, uint32_t dtype, uint64_t blocks, uint32_t block_size,
			    uint32_t n_kv_heads, uint32_t head_dim)
{
	if (!b)
		return -EINVAL;
	*b = (ax_shm_buffer){.kind = AX_BUF_K_POOL, .dtype = dtype, .layer = layer, .ndim = 4,
			     .dim = {blocks, block_size, n_kv_heads, head_dim}, .scale = 1, .device = -1};
	if (!is_float_dtype(dtype) || block_size > AX_SHM_MAX_BLOCK_SIZE)
		return -EINVAL;
	return contiguous(b);
}

/* Region [off, off+bytes) must be aligned, after *cursor and inside the segment; advances *cursor. */
static int check_region(uint64_t off, uint64_t bytes, uint64_t seg, uint64_t *cursor)
{
	if (off % AX_SHM_ALIGN)
		return -EINVAL;
	if (off < *cursor || off > seg || bytes > seg - off)
		return -ERANGE;
	*cursor = off + bytes;
	return 0;
}

static int check_model(const ax_shm_header *h)
{
	if (!has_nul(h->engine, sizeof h->engine) || !has_nul(h->model, sizeof h->model))
		return -EINVAL;
	if (h->world_size < 1 || h->rank >= h->world_size)
		return -EINVAL;
	if (h->n_layers < 1 || h->n_layers > AX_SHM_MAX_LAYERS || h->n_q_heads < 1 || h->n_kv_heads < 1 ||
	    h->n_q_heads % h->n_kv_heads || h->head_dim < 1 || h->head_dim > 1024)
		return -EINVAL;
	if ((uint64_t)h->head_offset + h->n_q_heads > h->n_q_heads_total)
		return -EINVAL;
	if (!is_float_dtype(h->q_dtype) || !is_float_dtype(h->k_dtype))
		return -EINVAL;
	if (!(isfinite(h->scale) && h->scale > 0) || !(isfinite(h->logit_cap) && h->logit_cap >= 0))
		return -EINVAL;
	if (h->window < 0 || h->max_ctx < 1)
		return -EINVAL;
	return 0;
}

static int check_regions(const ax_shm_header *h)
{
	uint32_t rc_ = h->ring_cap;
	if (h->buf_cap < 1 || h->buf_count > h->buf_cap || h->req_cap < 1 || h->req_cap > AX_SHM_REQ_CAP_MAX ||
	    rc_ < 2 || (rc_ & (rc_ - 1)) || h->arena_cap < 1)
		return -EINVAL;
	if (h->arena_cap > h->segment_size / sizeof(int32_t))
		return -ERANGE;
	uint64_t cur = sizeof(ax_shm_header), seg = h->segment_size;
	int rc;
	if ((rc = check_region(h->buf_off, (uint64_t)h->buf_cap * sizeof(ax_shm_buffer), seg, &cur)) ||
	    (rc = check_region(h->req_off, (uint64_t)h->req_cap * sizeof(ax_shm_request), seg, &cur)) ||
	    (rc = check_region(h->ring_off, (uint64_t)h->ring_cap * sizeof(ax_shm_step), seg, &cur)) ||
	    (rc = check_region(h->arena_off, h->arena_cap * sizeof(int32_t), seg, &cur)) ||
	    (rc = check_region(h->data_off, h->data_size, seg, &cur)))
		return rc;
	if (AX_LOAD_RLX(&h->data_used) > h->data_size)
		return -ERANGE;
	return 0;
}

int ax_shm_validate_header(const ax_shm_header *h, uint64_t mapped_size)
{
	if (AX_LOAD_ACQ(&h->magic) != AX_SHM_MAGIC || h->version != AX_SHM_VERSION)
		return -EPROTO;
	if (h->header_size != sizeof(ax_shm_header))
		return -EINVAL;
	if (h->segment_size < sizeof(ax_shm_header) || h->segment_size > mapped_size)
		return -ERANGE;
	int rc = check_model(h);
	return rc ? rc : check_regions(h);
}

int ax__shm_find_q_ring(const ax_shm_header *h, const ax_shm_buffer *bufs, uint32_t nbufs)
{
	for (uint32_t i = 0; i < nbufs; i++)
		if (bufs[i].kind == AX_BUF_Q_RING && ax_shm_validate_buffer(h, &bufs[i]) == 0)
			return (int)i;
	return -1;
}

/* The index table named by a FORWARD step must exist and cover index_row and seq_len. */
static int check_step_index(const ax_shm_header *h, const ax_shm_buffer *bufs, uint32_t nbufs,
			    const ax_shm_step *s)
{
	if (s->index_buf >= nbufs || s->index_buf >= h->buf_cap)
		return -EINVAL;
	const ax_shm_buffer *b = &bufs[s->index_buf];
	if ((b->kind != AX_BUF_INDEX_TOKEN && b->kind != AX_BUF_INDEX_PAGED) || ax_shm_validate_buffer(h, b))
		return -EINVAL;
	if (s->index_row >= b->dim[0])
		return -ERANGE;
	uint64_t cols = b->dim[1];
	if (b->kind == AX_BUF_INDEX_PAGED) {
		uint64_t blocks = s->seq_len / b->dim[2] + (s->seq_len % b->dim[2] != 0);
		return blocks > cols ? -ERANGE : 0;
	}
	return s->seq_len > cols ? -ERANGE : 0;
}

/* Q rows [q_row, q_row + n_tokens * popcount(layers)) must be one unwrapped, written, not lapped run. */
static int check_step_q(const ax_shm_header *h, const ax_shm_buffer *bufs, uint32_t nbufs,
			const ax_shm_heads *heads, const ax_shm_step *s)
{
	uint64_t nl = (uint64_t)__builtin_popcountll(s->layers[0]) + (uint64_t)__builtin_popcountll(s->layers[1]);
	if (nl == 0)
		return 0;
	int qi = ax__shm_find_q_ring(h, bufs, nbufs);
	if (qi < 0)
		return -EINVAL;
	uint64_t rows = bufs[qi].dim[0], need = nl * s->n_tokens;
	if (need > rows || s->q_row % rows + need > rows)
		return -ERANGE;
	if (s->q_row > heads->q_head || need > heads->q_head - s->q_row)
		return -ERANGE; /* not yet written */
	if (heads->q_head - s->q_row > rows)
		return -ESTALE; /* overwritten by a later reservation */
	return 0;
}

static int check_step_tokens(const ax_shm_header *h, const ax_shm_heads *heads, const ax_shm_step *s)
{
	if (s->n_tokens > h->arena_cap)
		return -ERANGE;
	if (s->tok_pos > heads->arena_head || s->n_tokens > heads->arena_head - s->tok_pos)
		return -ERANGE;
	if (heads->arena_head - s->tok_pos > h->arena_cap)
		return -ESTALE;
	return 0;
}

static int check_step_forward(const ax_shm_header *h, const ax_shm_buffer *bufs, uint32_t nbufs,
			      const ax_shm_heads *heads, const ax_shm_step *s)
{
	if (s->n_tokens < 1 || s->pos0 > UINT64_MAX - s->n_tokens || s->seq_len != s->pos0 + s->n_tokens)
		return -EINVAL;
	if (s->seq_len > h->max_ctx)
		return -ERANGE;
	if (h->n_layers < 64 && (s->layers[0] >> h->n_layers || s->layers[1]))
		return -EINVAL;
	if (h->n_layers >= 64 && h->n_layers < 128 && s->layers[1] >> (h->n_layers - 64))
		return -EINVAL;
	int rc = check_step_index(h, bufs, nbufs, s);
	if (!rc)
		rc = check_step_q(h, bufs, nbufs, heads, s);
	if (!rc)
		rc = check_step_tokens(h, heads, s);
	return rc;
}

int ax__shm_validate_step(const ax_shm_header *h, const ax_shm_buffer *bufs, uint32_t nbufs,
			  const ax_shm_heads *heads, const ax_shm_step *s)
{
	if (s->kind < AX_STEP_BEGIN || s->kind > AX_STEP_END)
		return -EINVAL;
	if (s->flags & ~(uint32_t)AX_STEP_F_PREFILL || (s->flags && s->kind != AX_STEP_FORWARD))
		return -EINVAL;
	if (s->req_id == 0 || s->req_slot >= h->req_cap)
		return -EINVAL;
	switch (s->kind) {
	case AX_STEP_END:
		return s->end_reason >= AX_END_STOP && s->end_reason <= AX_END_ERROR ? 0 : -EINVAL;
	case AX_STEP_FORWARD:
		return check_step_forward(h, bufs, nbufs, heads, s);
	default:
		return 0;
	}
}

int ax_shm_validate_step(const ax_shm_header *h, const ax_shm_buffer *bufs, const ax_shm_step *s)
{
	ax_shm_heads heads = {AX_LOAD_ACQ(&h->arena_head), AX_LOAD_ACQ(&h->q_head)};
	uint32_t n = AX_LOAD_ACQ(&h->buf_count);
	return ax__shm_validate_step(h, bufs, n < h->buf_cap ? n : h->buf_cap, &heads, s);
}

bool ax__shm_pid_alive(uint64_t pid)
{
	if (pid == 0 || pid > (uint64_t)INT32_MAX)
		return false;
	return kill((pid_t)pid, 0) == 0 || errno != ESRCH;
}

int ax__shm_futex_wait(uint32_t *w, uint32_t val, uint64_t timeout_ns)
{
	struct timespec ts = {(time_t)(timeout_ns / 1000000000ull), (long)(timeout_ns % 1000000000ull)};
	if (syscall(SYS_futex, w, FUTEX_WAIT, val, &ts, NULL, 0) == 0)
		return 0;
	return -errno;
}

void ax__shm_futex_wake(uint32_t *w)
{
	syscall(SYS_futex, w, FUTEX_WAKE, 1, NULL, NULL, 0);
}

/* Ring slots are copied as relaxed 64-bit atomics so a concurrent rewrite is a detected race, not UB. */
#define STEP_WORDS (sizeof(ax_shm_step) / sizeof(uint64_t))

int ax__shm_slot_read(const ax_shm_step *slot, uint64_t seq, ax_shm_step *out)
{
	const uint64_t *src = (const uint64_t *)slot;
	uint64_t *dst = (uint64_t *)out;
	uint64_t w = AX_LOAD_ACQ(&src[0]);
	if (w != seq + 1)
		return -EAGAIN;
	for (size_t i = 1; i < STEP_WORDS; i++)
		dst[i] = AX_LOAD_RLX(&src[i]);
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	if (AX_LOAD_RLX(&src[0]) != w)
		return -EAGAIN;
	dst[0] = w;
	return 0;
}

void ax__shm_slot_write(ax_shm_step *slot, uint64_t seq, const ax_shm_step *s)
{
	uint64_t *dst = (uint64_t *)slot;
	const uint64_t *src = (const uint64_t *)s;
	AX_STORE_RLX(&dst[0], 0); /* "being written": a reader that started earlier fails its re-check */
	__atomic_thread_fence(__ATOMIC_RELEASE);
	for (size_t i = 1; i < STEP_WORDS; i++)
		AX_STORE_RLX(&dst[i], src[i]);
	AX_STORE_REL(&dst[0], seq + 1);
}
