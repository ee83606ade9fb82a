/*
 * attnx_shm.h — the engine ↔ capture shared-memory protocol (DESIGN §2): segment layout, buffer table,
 * request table, token arena, Q ring and step ring; the engine-side export API (libattnx-export) and the
 * capture-side attach / validate API.
 *
 * One POSIX shm segment per engine process (per TP rank), named "/attnx.<engine>[.<rank>]", mode 0600.
 * Layout (all offsets from the segment start, every region 64-byte aligned):
 *
 *   ax_shm_header                      versioned header, model shape, producer and consumer counters
 *   ax_shm_buffer[buf_cap]             buffer table: K pools, Q ring, index tables (host or CUDA)
 *   ax_shm_request[req_cap]            request table: rid string ↔ 64-bit id, prompt location in the arena
 *   ax_shm_step[ring_cap]              step ring (ring_cap a power of two), seqlock-published descriptors
 *   int32_t tokens[arena_cap]          token arena: prompt and step token ids, a circular log
 *   data[data_size]                    host-memory buffers (K pools, Q ring, index tables) live here
 *
 * Producer rules: it never blocks and never waits for the capture. A descriptor is written into slot
 * seq & (ring_cap-1) only when seq - consumer_tail < ring_cap; otherwise it is dropped and ring_dropped counts
 * it. The slot's `seq` word is written last with release order (seq+1, so 0 means "never written"); the consumer
 * reads it with acquire order, copies the descriptor, and re-reads `seq` to detect a torn copy. After ring_head is
 * stored, libattnx-export wakes a consumer that sleeps on the header's consumer_wait word (a futex; one load and
 * no system call when none sleeps, one non-blocking FUTEX_WAKE when one does) and says so with AX_SHM_FEAT_WAKE.
 * Consumer rules: every descriptor is validated against the header and buffer table before any buffer is read
 * (ax_shm_validate_step); a bad one is rejected and counted, never read. The generation word changes when an
 * engine restarts; the consumer re-attaches. Token-arena and Q-ring reads re-check the producer's write counter
 * after the copy (a lapped read is discarded, never returned).
 *
 * All multi-byte fields are native-endian (producer and consumer share one host). Every wire struct has a fixed
 * size checked by static asserts in shm.c. Thread-safety: one producer thread per ax_export (the engine's
 * scheduler thread), one consumer thread per ax_shm handle.
 */
#ifndef ATTNX_SHM_H
#define ATTNX_SHM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AX_SHM_MAGIC 0x314d48534e545441ull /* "ATTNSHM1" little-endian */
#define AX_SHM_VERSION 1u
#define AX_SHM_NAME_MAX 64     /* segment name including the leading '/' and the NUL */
#define AX_SHM_RID_MAX 96      /* request id string including the NUL */
#define AX_SHM_MAX_LAYERS 128  /* layer masks are 128 bits */
#define AX_SHM_DEFAULT_NAME "/attnx.engine"

/* Element types of exported buffers. */
enum ax_dtype {
	AX_DTYPE_F32 = 1,
	AX_DTYPE_F16 = 2,
	AX_DTYPE_BF16 = 3,
	AX_DTYPE_FP8_E4M3 = 4, /* with the buffer's `scale` (value = fp8 · scale) */
	AX_DTYPE_FP8_E5M2 = 5,
	AX_DTYPE_I32 = 6,
	AX_DTYPE_I64 = 7,
};

/* What a buffer-table entry holds. */
enum ax_buf_kind {
	AX_BUF_K_POOL = 1,      /* keys of one layer: [slots, H_kv, D], or paged: [blocks, block_size, H_kv, D] */
	AX_BUF_Q_RING = 2,      /* query rows: [rows, H_q_local, D]; one ring for all layers */
	AX_BUF_INDEX_TOKEN = 3, /* token-level index table (SGLang req_to_token): i32/i64 [rows, ctx] */
	AX_BUF_INDEX_PAGED = 4, /* paged block table (vLLM): i32 [rows, max_blocks]; block_size in dim[2] */
};

/*
 * Paged layouts (vLLM). A block table (AX_BUF_INDEX_PAGED) is i32 [rows, max_blocks] with ndim 2, unit column stride
 * and its block size in dim[2] (1 .. AX_SHM_MAX_BLOCK_SIZE; dim[3] and stride[2..3] zero): key position p of the
 * request in row r lives in block table[r][p / block_size], row p % block_size of that block. A K pool read through
 * it is either 4-D, [blocks, block_size, H_kv, D] with dim[1] equal to the table's block size and any strides
 * (vLLM's NHD layout, or HND: [blocks, H_kv, block_size, D] described by its strides), or 3-D [slots, H_kv, D],
 * seen as blocks of block_size consecutive slots (block b = slots b·bs .. b·bs + bs − 1; blocks = slots / bs).
 * A 4-D pool read through a token index table is seen as slots = blocks × block_size when its strides allow it
 * (stride[0] == block_size · stride[1]). Block ids outside the pool are rejected (-ERANGE) by the capture, never
 * read; table cells past the blocks a step needs are never read.
 */
#define AX_SHM_MAX_BLOCK_SIZE 65536u

/* Where a buffer lives. */
enum ax_buf_loc {
	AX_LOC_HOST = 1,     /* in this segment at `offset` */
	AX_LOC_CUDA_IPC = 2, /* cudaIpcMemHandle_t in `handle` (64 bytes), device `device`, byte `offset` into it */
	AX_LOC_CUDA_VMM = 3, /* cuMem allocation exported as a POSIX fd over the Unix socket `vmm_socket`;
				 handle[0..7] = allocation id, `offset` into it */
};

/* One buffer-table entry. 256 bytes. */
typedef struct ax_shm_buffer {
	uint32_t kind;       /* enum ax_buf_kind; 0 = unused entry */
	uint32_t loc;        /* enum ax_buf_loc */
	uint32_t dtype;      /* enum ax_dtype */
	int32_t layer;       /* layer index for K pools, -1 otherwise */
	uint32_t ndim;       /* number of used dims (1..4) */
	int32_t device;      /* CUDA device ordinal for CUDA locations, -1 for host */
	uint64_t dim[4];     /* shape, outermost first (K pool: slots, H_kv, D or blocks, block_size, H_kv, D; Q
				ring: rows, H_q, D; token index: rows, ctx; block table: rows, max_blocks, then
				block_size in dim[2]) */
	uint64_t stride[4];  /* strides in elements, outermost first */
	uint64_t offset;     /* byte offset: into the segment (HOST) or into the IPC/VMM allocation (CUDA) */
	uint64_t bytes;      /* bytes reachable from offset (extent checked against dims and strides) */
	float scale;         /* fp8 dequantisation scale (1.0 otherwise) */
	uint32_t pad0;
	uint8_t handle[64];  /* cudaIpcMemHandle_t bytes (CUDA_IPC) or allocation id (CUDA_VMM) */
	char vmm_socket[64]; /* Unix socket path serving VMM fds (CUDA_VMM), NUL-terminated */
	uint8_t reserved[16]; /* zero; sized so the entry is 256 bytes */
} ax_shm_buffer;

/* Request-table entry states. */
enum ax_req_state { AX_REQ_FREE = 0, AX_REQ_ACTIVE = 1, AX_REQ_ENDED = 2 };

/* One request-table entry. 160 bytes. Written by the producer before the BEGIN descriptor that names it. */
typedef struct ax_shm_request {
	uint32_t state;         /* enum ax_req_state (atomic) */
	uint32_t prompt_len;    /* prompt tokens */
	uint64_t req_id;        /* 64-bit id, unique for the segment's life (never 0) */
	uint64_t prompt_pos;    /* token-arena position of the prompt token ids */
	uint64_t begin_ns;      /* CLOCK_MONOTONIC when the request began */
	char rid[AX_SHM_RID_MAX]; /* engine request id string, NUL-terminated */
	uint64_t freed_step;    /* (AX_SHM_FEAT_RECYCLE, atomic) 0 while the request's KV slots and index row are its
				   own; 1 + steps_started when the engine freed them (at END, or later: see README) */
	uint8_t reserved[24];   /* zero; sized so the entry is 160 bytes */
} ax_shm_request;

/* Step descriptor kinds. */
enum ax_step_kind { AX_STEP_BEGIN = 1, AX_STEP_FORWARD = 2, AX_STEP_END = 3 };
/* Step flags. */
enum { AX_STEP_F_PREFILL = 1u << 0 };
/* End reasons (AX_STEP_END.end_reason). */
enum ax_end_reason { AX_END_STOP = 1, AX_END_LENGTH = 2, AX_END_ABORT = 3, AX_END_ERROR = 4 };

/*
 * One step-ring descriptor. 128 bytes.
 * BEGIN: req_slot, req_id (prompt in the request table). END: req_slot, req_id, end_reason.
 * FORWARD: query tokens at absolute positions pos0 .. pos0+n_tokens-1 of request req_id; the query at
 * position p sees keys 0..p (causal), key j read from K pool slot index[index_row][j]; seq_len = pos0+n_tokens.
 * Q rows are in the Q ring from q_row on, token-major then layer-minor over the set bits of `layers`:
 * row(t, li) = q_row + t * popcount(layers) + li. Token ids of the queries are n_tokens ints in the arena at tok_pos.
 */
typedef struct ax_shm_step {
	uint64_t seq;         /* seqlock word: descriptor sequence number + 1, written last (release) */
	uint32_t kind;        /* enum ax_step_kind */
	uint32_t flags;       /* AX_STEP_F_* */
	uint64_t req_id;      /* request this step belongs to */
	uint32_t req_slot;    /* request-table index */
	uint32_t n_tokens;    /* FORWARD: query tokens in this step (≥ 1) */
	uint64_t pos0;        /* FORWARD: absolute position of the first query token */
	uint64_t seq_len;     /* FORWARD: keys visible to the last query (pos0 + n_tokens) */
	uint32_t index_row;   /* FORWARD: row of the index table holding this request's slots */
	uint32_t decode_step; /* FORWARD: generated tokens before this step (0 for prefill) */
	uint64_t q_row;       /* FORWARD: first Q-ring row (monotonic counter; ring row = q_row % rows) */
	uint64_t layers[2];   /* FORWARD: layers whose Q rows are present (bit l of layers[l/64]) */
	uint64_t tok_pos;     /* FORWARD: token-arena position of the query token ids */
	uint32_t end_reason;  /* END: enum ax_end_reason */
	uint32_t index_buf;   /* FORWARD: buffer-table index of the index table to use */
	uint64_t t_ns;        /* CLOCK_MONOTONIC when the producer published it */
	uint8_t reserved[24]; /* zero; sized so the descriptor is 128 bytes */
} ax_shm_step;

/* The segment header. 512 bytes. Fields marked (P) are written by the producer, (C) by the consumer. */
typedef struct ax_shm_header {
	uint64_t magic;            /* AX_SHM_MAGIC; written last at creation (release) */
	uint32_t version;          /* AX_SHM_VERSION */
	uint32_t header_size;      /* sizeof(ax_shm_header) */
	uint64_t segment_size;     /* bytes in the whole segment */
	uint64_t generation;       /* (P) engine start identity: pid << 32 ^ start time; changes on restart */
	uint32_t engine_pid;       /* (P) */
	uint32_t rank;             /* TP rank of this segment */
	uint32_t world_size;       /* TP world size */
	uint32_t state;            /* (P) 1 = ready, 2 = closed by the engine (atomic) */
	char engine[32];           /* engine name ("attnx-engine", "sglang", ...) */
	char model[96];            /* model name as the engine's /v1/models reports it */
	/* model shape (local to this rank) */
	uint32_t n_layers;         /* transformer layers */
	uint32_t n_q_heads;        /* query heads on this rank */
	uint32_t n_kv_heads;       /* KV heads on this rank */
	uint32_t head_offset;      /* global index of this rank's first query head */
	uint32_t n_q_heads_total;  /* query heads over all ranks */
	uint32_t head_dim;         /* D */
	uint32_t q_dtype;          /* enum ax_dtype of Q rows */
	uint32_t k_dtype;          /* enum ax_dtype of K pools */
	float scale;               /* softmax scale (usually 1/sqrt(D)) */
	float logit_cap;           /* tanh soft cap (0 = none): s = cap·tanh(s/cap) */
	int32_t window;            /* sliding window in tokens (0 = full attention) */
	uint32_t max_ctx;          /* longest sequence the engine serves */
	/* regions */
	uint64_t buf_off;          /* buffer table */
	uint32_t buf_cap;          /* entries */
	uint32_t buf_count;        /* (P) entries in use (atomic; entries are filled before it grows) */
	uint64_t req_off;          /* request table */
	uint32_t req_cap;          /* entries */
	uint32_t ring_cap;         /* step-ring descriptors, a power of two */
	uint64_t ring_off;         /* step ring */
	uint64_t arena_off;        /* token arena */
	uint64_t arena_cap;        /* int32 entries */
	uint64_t data_off;         /* host data region */
	uint64_t data_size;        /* bytes */
	/* producer counters (atomic) */
	uint64_t ring_head;        /* (P) next descriptor sequence number */
	uint64_t ring_dropped;     /* (P) descriptors dropped because the ring was full */
	uint64_t arena_head;       /* (P) next token-arena position */
	uint64_t q_head;           /* (P) next Q-ring row */
	uint64_t heartbeat_ns;     /* (P) CLOCK_MONOTONIC of the last producer heartbeat */
	uint64_t data_used;        /* (P) bytes of the data region handed out */
	uint64_t next_req_id;      /* (P) */
	uint64_t reqs_dropped;     /* (P) requests not exported (request table full) */
	/* consumer area (atomic) */
	uint64_t consumer_tail;    /* (C) next descriptor the consumer will read */
	uint64_t consumer_pid;     /* (C) 0 = no consumer attached */
	uint64_t consumer_heartbeat_ns; /* (C) */
	uint64_t want_layers[2];   /* (C) layers whose Q rows the consumer wants (0,0 = none) */
	uint32_t want_prefill;     /* (C) 1 = export Q rows of prefill tokens too */
	uint32_t reserved_u32;
	/* wake-up (additions of this version; zero in segments of producers that do not wake) */
	uint32_t consumer_wait;    /* (C; cleared by P) futex word: 1 while the consumer sleeps in ax_shm_wait; a
				      producer with AX_SHM_FEAT_WAKE swaps it to 0 after each publish and FUTEX_WAKEs it */
	uint32_t features;         /* (P) AX_SHM_FEAT_* bits, set at creation (before magic); WAKE may be cleared
				      later (ax_export_disable_wake), so consumers read it live */
	/* slot recycling (additions of this version; zero where a side does not take part: see shm/README.md) */
	uint64_t steps_started;    /* (P) with AX_SHM_FEAT_RECYCLE: bumped (ax_export_step_start) before a step writes
				      any K-pool slot or index-table row, so before any write into freed ones */
	uint64_t consumer_done;    /* (C) with AX_SHM_CFEAT_DONE: every descriptor with sequence number < this has been
				      fully processed (its rows computed); the engine may recycle what they name */
	uint32_t consumer_features; /* (C) AX_SHM_CFEAT_* bits of the attached consumer (cleared at attach/detach) */
	uint32_t reserved_u32b;
	uint8_t reserved[72];      /* zero; sized so the header is 512 bytes */
} ax_shm_header;

/* Producer features (ax_shm_header.features). */
enum {
	AX_SHM_FEAT_WAKE = 1u << 0, /* each publish (and close) wakes a consumer sleeping on consumer_wait */
	AX_SHM_FEAT_RECYCLE = 1u << 1, /* steps_started and the request entries' freed_step are maintained: a consumer
					  can tell a row whose keys may have been recycled (ax_shm_check_keys) */
};
/* Consumer features (ax_shm_header.consumer_features). */
enum {
	AX_SHM_CFEAT_DONE = 1u << 0, /* consumer_done is published (ax_shm_complete) */
};
/* ax_shm_wait's longest sleep when the producer does not wake (no AX_SHM_FEAT_WAKE): it is polled instead. */
#define AX_SHM_POLL_NS 200000ull

/* ----------------------------------------------------------------------------------------------------------
 * Pure layout helpers (no segment needed; used by both sides, the validator and the fuzzer).
 */

/* Bytes of one element of `dtype`; 0 for an unknown dtype. */
size_t ax_dtype_size(uint32_t dtype);
/* "f32", "bf16", ...; "?" for unknown. */
const char *ax_dtype_name(uint32_t dtype);
/* Parse a dtype name; returns the enum value or -EINVAL. */
int ax_dtype_parse(const char *name);

/*
 * Check a buffer-table entry against the segment: known kind/loc/dtype, 1..4 dims, the extent spanned by dims
 * and strides fits in `bytes`, and for HOST buffers the range lies inside the data region of `h`.
 * Returns 0 or -EINVAL / -ERANGE. Thread-safe (pure).
 */
int ax_shm_validate_buffer(const ax_shm_header *h, const ax_shm_buffer *b);

/*
 * Check a descriptor copied out of the ring before anything it names is read: kind and flags known, req_slot <
 * req_cap, for FORWARD n_tokens ≥ 1, seq_len == pos0 + n_tokens ≤ max_ctx, index_buf names a valid index buffer
 * and index_row/seq_len fit its shape, layers ⊂ [0, n_layers), the Q rows and the token ids lie in ranges
 * the producer has already written and has not yet overwritten (given the header's head counters).
 * `bufs` is the buffer table (h->buf_count valid entries). Returns 0 or -EINVAL / -ERANGE / -ESTALE (lapped).
 * Thread-safe (pure; reads the counters once).
 */
int ax_shm_validate_step(const ax_shm_header *h, const ax_shm_buffer *bufs, const ax_shm_step *s);

/* Paged layouts: the block size of a block table (dim[2]) or of a 4-D K pool (dim[1]); 0 for any other entry.
 * Thread-safe (pure; does not validate). */
uint32_t ax_shm_block_size(const ax_shm_buffer *b);
/* Fill `b` (zeroed first) as a block table i32 [rows, max_blocks] of `block_size`, contiguous, bytes exact; the
 * caller sets the location (loc, device, handle / offset). Returns 0 or -EINVAL (a zero dim, block_size 0 or past
 * AX_SHM_MAX_BLOCK_SIZE, an extent past 2^62 bytes). Thread-safe (pure). */
int ax_shm_block_table_desc(ax_shm_buffer *b, uint64_t rows, uint64_t max_blocks, uint32_t block_size);
/* Fill `b` (zeroed first) as layer `layer`'s paged K pool [blocks, block_size, H_kv, D] of `dtype`, contiguous
 * (vLLM's NHD layout; for HND set the strides afterwards), bytes exact, scale 1 (set it for fp8); location as
 * above. Returns 0 or -EINVAL (as above, or a dtype that is not f32/f16/bf16/fp8). Thread-safe (pure). */
int ax_shm_paged_kpool_desc(ax_shm_buffer *b, int32_t layer, uint32_t dtype, uint64_t blocks, uint32_t block_size,
			    uint32_t n_kv_heads, uint32_t head_dim);

/* Check a header read from a segment of `mapped_size` bytes: magic, version, sizes, region bounds and
 * alignment, ring_cap a power of two, model shape sane (n_q_heads a multiple of n_kv_heads, head_dim ≤ 1024).
 * Returns 0, -EPROTO (bad magic/version), -EINVAL or -ERANGE. Thread-safe (pure). */
int ax_shm_validate_header(const ax_shm_header *h, uint64_t mapped_size);

/* ----------------------------------------------------------------------------------------------------------
 * Engine side: libattnx-export.
 */
typedef struct ax_export ax_export;

typedef struct ax_export_config {
	const char *name;        /* segment name ("/attnx.engine"); NULL = AX_SHM_DEFAULT_NAME */
	const char *engine;      /* engine name for the header */
	const char *model;       /* model name */
	uint32_t rank, world_size;
	uint32_t n_layers, n_q_heads, n_kv_heads, head_offset, n_q_heads_total, head_dim;
	uint32_t q_dtype, k_dtype; /* enum ax_dtype */
	float scale, logit_cap;
	int32_t window;
	uint32_t max_ctx;
	uint32_t buf_cap;        /* 0 = 2 * n_layers + 8 */
	uint32_t req_cap;        /* 0 = 1024 */
	uint32_t ring_cap;       /* 0 = 16384; rounded up to a power of two */
	uint64_t arena_cap;      /* 0 = 4 Mi tokens */
	uint64_t data_size;      /* bytes for host buffers (K pools, Q ring, index tables) */
} ax_export_config;

/* Create (or replace a stale) segment and map it. The segment is unlinked by ax_export_close.
 * Returns 0 and sets *out, or -EINVAL (bad config), -ENAMETOOLONG, -EEXIST (a live engine owns the name),
 * or a negative errno from shm_open/ftruncate/mmap. Not thread-safe against other calls on the same handle. */
int ax_export_open(ax_export **out, const ax_export_config *cfg);
/* Mark the segment closed, unmap and unlink it. Accepts NULL. */
void ax_export_close(ax_export *ex);
/* The mapped header (for engines that want to read the consumer area). Never NULL for an open handle. */
ax_shm_header *ax_export_header(ax_export *ex);

/* Allocate a host buffer of `desc->bytes` bytes in the data region (64-byte aligned), fill in its offset,
 * append the entry to the buffer table, and return the pointer through *ptr and the table index through *index.
 * desc->loc must be AX_LOC_HOST. Returns 0, -ENOSPC (table or data region full) or -EINVAL (entry invalid). */
int ax_export_add_host_buffer(ax_export *ex, const ax_shm_buffer *desc, void **ptr, uint32_t *index);
/* Append a CUDA buffer entry (IPC handle or VMM id filled by the caller). Returns 0, -ENOSPC or -EINVAL. */
int ax_export_add_device_buffer(ax_export *ex, const ax_shm_buffer *desc, uint32_t *index);

/*
 * Paged engines (vLLM's layout; see "Paged layouts" above). ax_export_add_block_table: a host block table i32
 * [rows, max_blocks] of `block_size` in the data region (zeroed), returned through *ptr (row r at *ptr + r·max_blocks)
 * and its table index through *index. A request's steps name it (ax_shm_step.index_buf) and the request's row
 * (index_row) in each FORWARD; the engine writes the row's block ids for positions 0 .. seq_len − 1 before the step
 * is published, and follows rule 9 (ax_export_step_start) before it rewrites a row or a block it freed. Device
 * tables and K pools: ax_shm_block_table_desc / ax_shm_paged_kpool_desc, then the location, then
 * ax_export_add_device_buffer (or ax_export_add_host_buffer). Returns 0, -ENOSPC or -EINVAL.
 */
int ax_export_add_block_table(ax_export *ex, uint64_t rows, uint64_t max_blocks, uint32_t block_size, int32_t **ptr,
			      uint32_t *index);

/* Request begin: claim a request-table entry, copy the prompt into the arena, publish BEGIN.
 * Returns 0 and sets *req_id (never 0), or -ENOSPC when the request table is full (counted in reqs_dropped;
 * the engine continues without exporting this request), -EAGAIN if the BEGIN descriptor was dropped (ring
 * full; the request is still registered and later steps may still be published), -EINVAL for a bad rid. */
int ax_export_request_begin(ax_export *ex, const char *rid, const int32_t *prompt, uint32_t prompt_len,
			    uint64_t *req_id);
/* Request end: publish END and free the entry. The engine frees the request's KV slots and index row now
 * (their freed_step is stored: see ax_export_step_start). Returns 0, -ENOENT (unknown id), -EAGAIN (END dropped;
 * the entry is still freed). */
int ax_export_request_end(ax_export *ex, uint64_t req_id, uint32_t reason);

/*
 * Slot recycling (shm/README.md, rule 9). A capture computes a request's rows after the engine's step, often after
 * its END; an engine that hands the request's KV slots or index row to another request meanwhile would have it read
 * the other request's keys. With these calls the capture never emits such a row (it becomes a `gap` "recycled"),
 * and an engine that can wait may prefer to recycle what the capture has finished with.
 *
 * ax_export_step_start: call before each step writes any K-pool slot or index-table entry (before the forward,
 * and before the allocation of the step's slots writes the index table). The first call advertises
 * AX_SHM_FEAT_RECYCLE; from then on nothing the engine freed may be written before a step start that follows the free
 * (a write without one could overwrite freed keys unseen). One relaxed store and a release fence. Accepts NULL.
 *
 * ax_export_request_end_keep: as ax_export_request_end, but the engine keeps the request's KV slots and index row
 * until it calls ax_export_request_freed. *done_seq (may be NULL) receives the descriptor count after the END, for
 * ax_export_consumer_done. Same returns as ax_export_request_end.
 *
 * ax_export_request_freed: the engine is freeing the slots of a request ended with _keep, and may write into them
 * at once: records freed_step and counts as a step start (so it need not be followed by ax_export_step_start before
 * those writes). Returns 0, or -ENOENT when the request's table entry was already reused for another request (the
 * capture then treats its rows as recycled anyway) or was never ended with _keep.
 *
 * ax_export_consumer_done: 1 when recycling what an END with `done_seq` names costs the capture nothing: the
 * attached capture has processed every descriptor before done_seq (AX_SHM_CFEAT_DONE), or no capture is attached
 * and alive (ax_export_wanted's test). 0 while a live capture has not finished them, or does not say (an older
 * capture: the engine may keep the slots as long as it can, and must free them anyway when it needs them). Never
 * blocks; cheap (two loads; the consumer pid is probed at most every 100 ms).
 */
void ax_export_step_start(ax_export *ex);
int ax_export_request_end_keep(ax_export *ex, uint64_t req_id, uint32_t reason, uint64_t *done_seq);
int ax_export_request_freed(ax_export *ex, uint64_t req_id);
int ax_export_consumer_done(ax_export *ex, uint64_t done_seq);

/* Reserve `rows` consecutive Q-ring rows (Q ring at buffer index `qbuf`); returns their monotonic first row in
 * *q_row and, for a HOST Q ring, a pointer to write them through *ptr (the rows never wrap: the ring skips to its
 * start when needed). For a CUDA Q ring (CUDA_IPC / CUDA_VMM entry) *ptr is set to NULL: the engine writes ring row
 * (*q_row % dim[0]) on the GPU itself, before the step's descriptor is published (and before the step event the
 * capture waits on). Returns 0, -EINVAL (no such Q ring / rows 0 or larger than the ring). */
int ax_export_q_reserve(ax_export *ex, uint32_t qbuf, uint32_t rows, uint64_t *q_row, void **ptr);

/* Publish one FORWARD step. `s` carries req_id, n_tokens, pos0, seq_len, index_buf, index_row, decode_step,
 * q_row, layers and flags; `tokens` holds the n_tokens query token ids (copied into the arena). seq, kind,
 * req_slot, tok_pos and t_ns are filled here. Never blocks: returns 0, -EAGAIN (ring full: dropped and
 * counted), -ENOENT (unknown request) or -EINVAL. */
int ax_export_step(ax_export *ex, const ax_shm_step *s, const int32_t *tokens);

/* Which layers the consumer wants Q rows for, and whether it wants prefill rows; 0 if no consumer is
 * attached (consumer_pid dead or heartbeat older than 5 s). Cheap; call once per step. */
int ax_export_wanted(ax_export *ex, uint64_t layers[2], int *prefill);

/* Store the producer heartbeat (call at least once a second; ax_export_step also stores it). */
void ax_export_heartbeat(ax_export *ex);

/* Batch wake-ups: after ax_export_hold_wake, publishes do not wake the consumer; ax_export_flush_wake wakes it once
 * if anything was published since. For an engine that publishes one descriptor per sequence of a batched step:
 * held over the step, the capture wakes once and finds them all (one frame of records per step, not one per
 * sequence). The hold must not outlast the step (a held descriptor waits for the consumer's timeout). Accept NULL. */
void ax_export_hold_wake(ax_export *ex);
void ax_export_flush_wake(ax_export *ex);

/* Clear AX_SHM_FEAT_WAKE: for a producer that will publish descriptors by other means than this library (GPU
 * kernels writing the ring, libattnx-export-graph), which cannot wake a sleeping consumer. Consumers then poll
 * (ax_shm_wait sleeps at most AX_SHM_POLL_NS). Call it before the first such descriptor. Accepts NULL. */
void ax_export_disable_wake(ax_export *ex);

/* ----------------------------------------------------------------------------------------------------------
 * Capture side.
 */
typedef struct ax_shm ax_shm;

/* Map an existing segment read-write (the consumer area is written), validate its header and buffer table.
 * Returns 0, -ENOENT (no segment yet), -EPROTO (bad magic/version), -EINVAL/-ERANGE (bad layout), -EAGAIN
 * (engine still initialising) or a negative errno from shm_open/mmap. */
int ax_shm_attach(ax_shm **out, const char *name);
/* Clear the consumer area (consumer_pid = 0) and unmap. Accepts NULL. */
void ax_shm_detach(ax_shm *s);

/* The live header (producer counters, consumer area). Thread-safe to read; never NULL for an attached handle. */
const ax_shm_header *ax_shm_hdr(const ax_shm *s);
/* The header copy validated at attach: the layout and model shape every bound check of this library uses. A
 * capture sizing its own arrays should read the shape from here, not from the live header (which the producer
 * could rewrite). Counters in it are stale. */
const ax_shm_header *ax_shm_snapshot(const ax_shm *s);
/* Validated copy of the buffer table (entries that failed validation have kind 0). */
const ax_shm_buffer *ax_shm_buffers(const ax_shm *s, uint32_t *count);
/* Pointer to a host buffer's first byte, or NULL if `index` is out of range, invalid, or not HOST. */
const void *ax_shm_host_ptr(const ax_shm *s, uint32_t index);
/* Index of the first buffer of `kind` (and `layer` for K pools, else pass -1); -ENOENT if none. */
int ax_shm_find_buffer(const ax_shm *s, uint32_t kind, int32_t layer);

/* Announce what the consumer wants: layer mask and prefill. Also stores the consumer heartbeat. */
void ax_shm_set_wanted(ax_shm *s, const uint64_t layers[2], int prefill);
/* Store the consumer heartbeat. */
void ax_shm_heartbeat(ax_shm *s);

/*
 * Sleep until there is something to take (a descriptor past this consumer's tail, or the segment closed or
 * replaced), ax_shm_wake(s) is called, or timeout_ns passes. Returns 1 when there is something to take (at once if
 * there already is), 0 otherwise (timeout, wake, signal), -EINVAL for NULL. The consumer sets consumer_wait and
 * sleeps on it (futex); a producer advertising AX_SHM_FEAT_WAKE clears it and wakes it after each publish, so a
 * step is seen within a wake-up latency whatever the timeout. Without AX_SHM_FEAT_WAKE (an older
 * libattnx-export, a producer that cannot make system calls) the sleep is capped at AX_SHM_POLL_NS; so is every
 * sleep after two that timed out with a descriptor published and the flag still set (a producer that advertises
 * wakes but does not send them costs two full timeouts, once per attachment).
 * Consumer thread only.
 */
int ax_shm_wait(ax_shm *s, uint64_t timeout_ns);
/* Wake the thread sleeping in ax_shm_wait on `s` (no system call when none sleeps). Thread-safe: any thread of the
 * consumer process may call it while `s` stays attached. */
void ax_shm_wake(ax_shm *s);

/*
 * Take the next descriptor: copy it out, validate it, advance the tail.
 * Returns 1 with *out filled, 0 if the ring is empty, -ESTALE if the engine restarted or closed (detach and
 * attach again), or -EBADMSG for a descriptor that failed validation or was torn (it is skipped and counted;
 * the next call moves on). *lost (may be NULL) receives the number of descriptors the producer dropped since
 * the previous call (ring full) so the caller can emit a gap.
 * out->seq is the slot's seqlock word: the descriptor's sequence number + 1 (contiguous over published
 * descriptors; drops do not consume numbers). Also refreshes the consumer heartbeat every 50 ms.
 * Req ids are (counter << 16) | req_slot, unique for the segment's life; treat them as opaque.
 */
int ax_shm_next(ax_shm *s, ax_shm_step *out, uint64_t *lost);

/* Copy `n` token ids at arena position `pos`; -ESTALE if the producer has overwritten them (before or during
 * the copy), -ERANGE if they were never written. */
int ax_shm_read_tokens(ax_shm *s, uint64_t pos, uint32_t n, int32_t *out);
/* The request-table entry named by a BEGIN/END/FORWARD descriptor, copied; -ESTALE if the slot no longer
 * holds req_id. The prompt is read with ax_shm_read_tokens(prompt_pos, prompt_len). */
int ax_shm_read_request(ax_shm *s, uint32_t slot, uint64_t req_id, ax_shm_request *out);
/* After reading Q rows [q_row, q_row+n) of a host Q ring with `rows` rows: 0 if the producer has not lapped them
 * (the data read is good), -ESTALE otherwise. */
int ax_shm_check_q(ax_shm *s, uint64_t q_row, uint64_t n, uint64_t rows);

/*
 * Slot recycling, capture side (shm/README.md, rule 9).
 * ax_shm_check_keys: call AFTER a row of request req_id has been computed (every K-pool and index-table read of it
 * finished, GPU work synchronised): 0 if the keys read were the request's own, -ESTALE if the engine may have
 * recycled its slots or index row before the reads finished (the row must not be emitted: report it as a gap
 * "recycled"; counted, ax_shm_recycled). Always 0 when the producer does not advertise AX_SHM_FEAT_RECYCLE (nothing
 * can be told); -EINVAL for NULL. Consumer thread only; a few loads.
 * ax_shm_complete: every descriptor with sequence number < seq_end (out->seq of ax_shm_next is seq + 1, so pass the
 * last finished descriptor's out->seq) has been fully processed; published as consumer_done (monotonic, clamped to
 * the descriptors taken) with AX_SHM_CFEAT_DONE. Consumer thread only.
 * ax_shm_taken: sequence number of the next descriptor ax_shm_next will take (= descriptors taken or skipped).
 */
int ax_shm_check_keys(ax_shm *s, uint64_t req_id);
void ax_shm_complete(ax_shm *s, uint64_t seq_end);
uint64_t ax_shm_taken(const ax_shm *s);

/* Counters of this consumer: descriptors taken, rejected by validation, torn. */
typedef struct ax_shm_stats {
	uint64_t taken, rejected, torn, lost;
} ax_shm_stats;
/* Rows ax_shm_check_keys refused on this handle (kept out of ax_shm_stats, whose layout bindings mirror). */
uint64_t ax_shm_recycled(const ax_shm *s);
void ax_shm_get_stats(const ax_shm *s, ax_shm_stats *out);

/* Is the producer alive? 1 if its pid exists and the heartbeat is younger than `timeout_ns`, 0 otherwise;
 * -ESTALE if the generation changed since attach. */
int ax_shm_alive(ax_shm *s, uint64_t timeout_ns);

#ifdef __cplusplus
}
#endif
#endif
