/*
 * attnx_export_graph.h — graph-safe export for CUDA engines (libattnx-export-graph, export_graph.cu).
 *
 * A CUDA engine cannot call ax_export_step from its decode loop: the loop runs as a replayed CUDA graph, and the
 * host code that would know positions, batch rows and token ids is not executed on replay. Here every per-step
 * action is a small kernel enqueued on the engine's stream, reading the step's metadata from the engine's own
 * device tensors (fixed addresses, as graph inputs are) and writing the step ring, token arena, request table and
 * header counters of the segment through a host-mapped view of it (cudaHostRegister). No host synchronisation,
 * no allocation after ax_graph_open, so the kernels are captured into and replayed from a CUDA graph like any
 * other kernel.
 *
 * Ownership of the segment: once ax_graph_open has run, the device is the only producer of descriptors, token-arena
 * entries, Q-ring rows and request-table entries of that segment (its counters continue from the header's values
 * at open). The engine must not call ax_export_request_begin/end, ax_export_q_reserve or ax_export_step on it any
 * more. It may still add buffers (ax_export_add_device_buffer). A helper thread started by ax_graph_open stores the
 * producer heartbeat and mirrors ax_export_wanted (consumer alive, wanted layers, prefill) into pinned memory
 * every 10 ms; the kernels read that, so a dead or absent capture turns the export off within 10 ms + 5 s, and
 * the engine never waits for anything.
 *
 * Request slots: request-map row r (SGLang's req_pool_idx, HF's batch row) IS request-table slot r, and the map
 * lives in device memory: begin/end/step kernels look a row's request up on the GPU, so the host needs neither the
 * row number (it may be a device value) nor the request id. A BEGIN on a row that still holds a request first
 * publishes that request's END (reason abort): recycled rows never leak.
 *
 * Slot recycling (shm/README.md rule 9): ax_graph_open sets AX_SHM_FEAT_RECYCLE; every ax_graph_step_begin and
 * ax_graph_step_start counts a step start (steps_started, visible before any later kernel of the stream runs);
 * every END (ax_graph_request_end, and the END a BEGIN publishes for the request it displaces) stores the entry's
 * freed_step before the END descriptor. The engine must therefore enqueue a step start (on the same stream) after
 * an END and before anything writes into the ended request's K slots or index row: ax_graph_step_begin does when
 * it precedes every K write of the step; otherwise call ax_graph_step_start first (HF: from the forward pre-hook,
 * since layer 0's cache update runs before its attention). Writes made by other streams or by the host (SGLang's
 * req_to_token rows, written by the scheduler) are not ordered by these kernels.
 *
 * One step = ax_graph_step_begin, ax_graph_export_q once per layer (any order, layers not wanted are no-ops on the
 * GPU), ax_graph_step_publish after the last layer's attention has written its keys. All calls of one handle go
 * to one stream, in that order, from one host thread. Kernels per step: 2 + layers; the fused forms
 * (ax_graph_step_begin_q, ax_graph_export_q_publish) make it `layers` for small steps; an engine that can hold every
 * layer's Q until its last layer calls ax_graph_step_all once instead (one kernel for a small step, three else).
 *
 * Descriptor semantics are DESIGN §2 / attnx_shm.h: per valid batch row one FORWARD with the exported tokens
 * (prefill rows: every token when the consumer wants prefill rows, else the row's last token only), Q rows
 * token-major then layer-minor, token ids in the arena, the seqlock publication order. Padded batch rows (no
 * request in their map row, or a `pad` marker equal to pad_value) publish nothing.
 */
#ifndef ATTNX_EXPORT_GRAPH_H
#define ATTNX_EXPORT_GRAPH_H

#include <stdint.h>

#include "attnx_shm.h"

#ifdef __cplusplus
extern "C" {
#endif

#define AX_GRAPH_MAX_BATCH 1024u /* batch rows per step (one thread block scans them) */

typedef struct ax_graph ax_graph;

typedef struct ax_graph_config {
	int device;          /* CUDA device of the engine's tensors */
	uint32_t qbuf;       /* buffer-table index of the Q ring (a CUDA entry the caller added) */
	void *q_ring;        /* device pointer to Q-ring row 0: [q_rows, H_q, D] contiguous, header q_dtype */
	uint64_t q_rows;     /* rows of the Q ring */
	uint32_t index_buf;  /* buffer-table index of the index table named by FORWARD descriptors */
	uint32_t map_rows;   /* request-map rows = index-table rows; ≤ the header's req_cap */
	uint32_t max_batch;  /* most batch rows one step carries, ≤ AX_GRAPH_MAX_BATCH */
} ax_graph_config;

/* A device integer vector indexed by batch row: value(b) = p[b * stride] + add (int32 or int64 elements). */
typedef struct ax_graph_ivec {
	const void *p;  /* device pointer; NULL = absent */
	int32_t bytes;  /* 4 or 8 */
	int32_t pad0;
	int64_t stride; /* elements between rows; 0 = one value for every row */
	int64_t add;
} ax_graph_ivec;

enum { AX_GRAPH_PREFILL = 1u << 0 }; /* the forward is a prefill / extend (rows with > 1 token, or before P) */

/* What one forward looks like. Every pointer is a device pointer that stays valid (and at the same address) for
 * as long as a graph that captured the step is replayed. */
typedef struct ax_graph_step_args {
	uint32_t n_rows;       /* batch rows, padded rows included; 1..max_batch */
	uint32_t flags;        /* AX_GRAPH_PREFILL */
	ax_graph_ivec row;     /* request-map row of batch row b (SGLang req_pool_indices); absent = b */
	ax_graph_ivec seq_end; /* keys visible to row b's last token = its seq_len (SGLang seq_lens) */
	ax_graph_ivec n_tok;   /* query tokens of row b (SGLang extend_seq_lens); absent = n_tok_const */
	uint32_t n_tok_const;
	uint32_t pad1;
	ax_graph_ivec in_off;  /* row b's first token in the flattened inputs (SGLang extend_start_loc); absent = 0 */
	ax_graph_ivec pad;     /* row b is padding when value(b) == pad_value (SGLang out_cache_loc, 0); absent = none */
	int64_t pad_value;
	const void *tokens;    /* token ids: tokens[b * tok_stride_b + (in_off(b) + i) * tok_stride_t] */
	int32_t token_bytes;   /* 4 or 8 */
	int32_t pad2;
	int64_t tok_stride_b, tok_stride_t;
} ax_graph_step_args;

/* Map the segment of `ex` into the device's address space (cudaHostRegister), allocate the device control block,
 * request map and staging, and start the heartbeat thread. `ex` must outlive the handle. Returns 0, -EINVAL (bad
 * config: Q ring / index entry missing or not CUDA, map_rows > req_cap, max_batch out of range), -ENODEV (no
 * CUDA device), -ENOMEM, or -EIO (another CUDA error; ax_graph_strerror says which). Not thread-safe. */
int ax_graph_open(ax_graph **out, ax_export *ex, const ax_graph_config *cfg);
/* Stop the thread, wait for the device, free everything, unregister the segment. Accepts NULL. */
void ax_graph_close(ax_graph *g);

/* Begin a request on request-map row `row` (or, when row_dev is not NULL, on the row held by the int32/int64
 * value at device address row_dev, width row_bytes): one kernel writes the prompt into the arena, the request
 * entry and BEGIN. The prompt's ids for positions skip..prompt_len-1 are read from dev_tokens (int32 or int64,
 * contiguous, prompt_len - skip of them); positions below `skip` (a prefix the engine took from its cache, whose
 * ids it does not hold on the device) are written as 0. Legal in graph capture (not needed there).
 * Returns 0, -EINVAL (rid empty or ≥ AX_SHM_RID_MAX bytes, skip > prompt_len, prompt_len > max_ctx, row out of
 * range) or -EIO. */
int ax_graph_request_begin(ax_graph *g, void *stream, uint32_t row, const void *row_dev, int row_bytes,
			   const char *rid, const void *dev_tokens, int token_bytes, uint32_t prompt_len, uint32_t skip);
/* End whatever request map row `row` holds (nothing if none): END with `reason`, entry marked ended, map row
 * cleared. Returns 0, -EINVAL or -EIO. Legal in graph capture (not needed there). */
int ax_graph_request_end(ax_graph *g, void *stream, uint32_t row, uint32_t reason);

/* Step kernels (legal inside CUDA graph capture). Each returns 0, -EINVAL (bad arguments: the step exports nothing;
 * ax_graph_step_begin with a handle still enqueues its step start, rule 9) or -EIO (launch failure). `stream` is a
 * cudaStream_t (NULL = the legacy default). */
int ax_graph_step_begin(ax_graph *g, void *stream, const ax_graph_step_args *a);
/* Copy layer `layer`'s Q rows of the step: q element (b, i, h, d) at
 * q[b * st_b + (in_off(b) + i) * st_t + h * st_h + d] (elements of elem_bytes; d contiguous; elem_bytes must be the
 * header q_dtype's size). */
int ax_graph_export_q(ax_graph *g, void *stream, uint32_t layer, const void *q, int elem_bytes, int64_t st_b,
		      int64_t st_t, int64_t st_h);
/* Count a step start only (rule 9; one kernel, graph-safe): for an engine whose step writes K slots or index rows
 * before it can call ax_graph_step_begin. Returns 0, -EINVAL (NULL) or -EIO. */
int ax_graph_step_start(ax_graph *g, void *stream);
/* Publish the step's FORWARD descriptors (after every layer's K of this step is written). */
int ax_graph_step_publish(ax_graph *g, void *stream);

/* Fused forms, for the hot path of small steps (decode): one kernel where the plain calls take two, same effect.
 * ax_graph_step_begin_q = ax_graph_step_begin + ax_graph_export_q of the first layer; ax_graph_export_q_publish =
 * ax_graph_export_q of the last layer + ax_graph_step_publish, for engines whose last layer has written its keys
 * before its Q rows can be copied (Hugging Face: the cache update precedes the attention function). The fused
 * kernel is one thread block, so it is used only when ax_graph_fuse says the step is small (every row's token count
 * known on the host, one layer's Q rows ≤ AX_GRAPH_FUSE_MAX_BYTES); otherwise these calls enqueue the two plain
 * kernels. The choice is made on the host at the call (at capture time for a graph). Returns as the plain calls;
 * with bad step arguments ax_graph_step_begin_q still counts the step start and returns -EINVAL. */
int ax_graph_step_begin_q(ax_graph *g, void *stream, const ax_graph_step_args *a, uint32_t layer, const void *q,
			  int elem_bytes, int64_t st_b, int64_t st_t, int64_t st_h);
int ax_graph_export_q_publish(ax_graph *g, void *stream, uint32_t layer, const void *q, int elem_bytes, int64_t st_b,
			      int64_t st_t, int64_t st_h);

/* A whole step in one call, at its end, for an engine that can keep every layer's Q tensor alive until its last layer
 * has written its keys (attnx.hf's decode steps, `defer`): step set-up, layer layers[i]'s Q rows from q[i] (same
 * element size and strides for all, as ax_graph_export_q), publish. One kernel for a small step (ax_graph_fuse), else
 * three (set-up, one copy kernel for all n layers, publish), instead of n + 2. n ≤ AX_GRAPH_MAX_LAYERS; layers not
 * wanted this step are skipped on the GPU. Returns as ax_graph_step_begin_q (bad arguments: the step start is still
 * counted, -EINVAL). */
#define AX_GRAPH_MAX_LAYERS 128u
int ax_graph_step_all(ax_graph *g, void *stream, const ax_graph_step_args *a, uint32_t n, const uint32_t *layers,
		      const void *const *q, int elem_bytes, int64_t st_b, int64_t st_t, int64_t st_h);

/* Restrict which layers' Q rows may be exported: bit l of layers[] = layer l; both words 0 = every layer (the
 * default). The step set-up intersects the consumer's wish with this set, so no Q row is reserved or named for a
 * layer outside it, and the engine may skip ax_graph_export_q for those layers altogether (a kernel less per layer
 * per step: attnx.hf / attnx.sglang_hook `layers=`). Applies to the kernels enqueued, or captured into a graph,
 * after the call. Returns 0, or -EINVAL (NULL, or a set naming none of the model's layers). Not thread-safe. */
int ax_graph_set_layers(ax_graph *g, const uint64_t layers[2]);

/* Counters kept on the device, copied to the host (synchronous: for tests and diagnostics, never in a hot path). */
typedef struct ax_graph_stats {
	uint64_t ring_head, ring_dropped, arena_head, q_head, next_req_id;
	uint64_t steps, steps_dropped; /* steps begun while enabled; steps whose Q rows did not fit the ring */
} ax_graph_stats;
int ax_graph_get_stats(ax_graph *g, ax_graph_stats *out);

/* What the kernels see now (the heartbeat thread's last mirror of ax_export_wanted): 1 and the layer mask when a
 * live consumer wants something, 0 otherwise. Cheap (reads pinned memory); any thread. */
int ax_graph_enabled(const ax_graph *g, uint64_t layers[2], int *prefill);

/* The last CUDA error of `g` (or of the last failed ax_graph_open when g is NULL) as text; never NULL. */
const char *ax_graph_strerror(const ax_graph *g);

/* Variants of the step kernels, for the cost measurement (shm/python/tests/bench_gpu_export.py) and for trying a
 * candidate layout on the GPU tests. The DBG_ bits break a guarantee and are for measurements only; OPT_ bits are
 * layouts that keep every guarantee. Baked into kernels at enqueue (capture) time. ax_graph_open applies
 * $AX_GRAPH_DEBUG (a number) when set, else AX_GRAPH_DEFAULT_BITS. */
enum {
	AX_GRAPH_DBG_EMPTY = 1u << 0,     /* every step kernel is an empty 1-block kernel: exports nothing */
	AX_GRAPH_DBG_FENCE_GPU = 1u << 1, /* device-scope fences instead of system scope (ordering rules broken) */
	AX_GRAPH_DBG_NO_QCOPY = 1u << 2,  /* Q copies skipped (descriptors name rows never written) */
	AX_GRAPH_DBG_SEG_DEV = 1u << 3,   /* segment stores/loads go to a device-memory scratch copy: nothing reaches
					     the consumer, no flow control; the counters are restored on leaving */
	AX_GRAPH_DBG_CTL_DEV = 1u << 4,   /* kernels read a device copy of the heartbeat block (frozen at the call) */
	AX_GRAPH_OPT_FEWER = 1u << 5,     /* one host round trip for the heartbeat block, the publish's host loads
					     issued before its Q copy, 3 system fences per publish instead of 5 */
	AX_GRAPH_OPT_SMALL = 1u << 6,     /* fused kernels with 128-thread blocks (not 1024): slower alone, but they
					     leave room on their SM for kernels running beside them (side stream) */
	AX_GRAPH_DBG_ALL = (1u << 7) - 1,
	/* what ax_graph_open sets without $AX_GRAPH_DEBUG: the layout that measured faster in line (H200, session 4:
	 * −5 µs per HF decode step; test_gpu_hf passed with it) */
	AX_GRAPH_DEFAULT_BITS = AX_GRAPH_OPT_FEWER,
};
/* Set the variant bits. Returns 0, -EINVAL (NULL, unknown bits) or -ENOMEM / -EIO (the scratch copies). Not
 * thread-safe; synchronises the device when SEG_DEV or CTL_DEV changes (never in a hot path). */
int ax_graph_debug(ax_graph *g, unsigned flags);

/* ---- pure helpers, shared by the kernels and the host-side unit test (no CUDA needed) ---- */

#ifdef __CUDACC__
#define AX_GRAPH_HD __host__ __device__
#else
#define AX_GRAPH_HD
#endif
static inline AX_GRAPH_HD int ax_graph_popcount64(uint64_t v)
{
#ifdef __CUDA_ARCH__
	return __popcll(v);
#else
	return __builtin_popcountll(v);
#endif
}
/* Rule 9 on the device's counter: the value after a step start, and the freed_step an END stores. A capture refuses
 * a row of a freed request once steps_started >= freed_step (ax_graph_row_recycled: the same test, for the unit
 * test and the Python mirror); so a free is refused only after the next step start, never at the END itself. */
static inline AX_GRAPH_HD uint64_t ax_graph_next_step(uint64_t steps_started) { return steps_started + 1; }
static inline AX_GRAPH_HD uint64_t ax_graph_freed_step(uint64_t steps_started) { return steps_started + 1; }
static inline AX_GRAPH_HD int ax_graph_row_recycled(uint64_t freed_step, uint64_t steps_started)
{
	return freed_step != 0 && steps_started >= freed_step;
}
/* Bytes per load of a Q copy: 16, 4 or 2, the widest unit that both addresses (OR-ed into addr_or), the three
 * strides and a head row (D elements) are multiples of, in bytes; 0 when not even 2 (fp8 at an odd address). */
static inline AX_GRAPH_HD unsigned ax_graph_q_unit(uint64_t addr_or, uint32_t esize, int64_t st_b, int64_t st_t,
						   int64_t st_h, uint32_t D)
{
	uint64_t m = addr_or | (uint64_t)st_b * esize | (uint64_t)st_t * esize | (uint64_t)st_h * esize |
		     (uint64_t)D * esize;
	return (m & 15) == 0 ? 16u : (m & 3) == 0 ? 4u : (m & 1) == 0 ? 2u : 0u;
}
#define AX_GRAPH_FUSE_MAX_BYTES (32u << 10) /* one block of 1024 threads copies a row's 8 KB (bf16, 32 × 128) in a
						     round of 16-byte loads, row after row: ≤ 4 rounds */
/* Whether a step may use the one-block fused kernels: token counts known on the host (no per-row n_tok vector)
 * and one layer's Q rows (n_rows · n_tok_const · H · D · esize bytes) at most AX_GRAPH_FUSE_MAX_BYTES. */
static inline AX_GRAPH_HD int ax_graph_fuse(uint32_t n_rows, uint32_t n_tok_const, int n_tok_vec, uint32_t H,
					    uint32_t D, uint32_t esize)
{
	uint64_t tok_bytes = (uint64_t)H * D * esize; /* callers: H ≤ 2^16, D ≤ 1024, esize ≤ 8 */
	if (n_tok_vec || n_tok_const < 1 || tok_bytes == 0 || tok_bytes > AX_GRAPH_FUSE_MAX_BYTES)
		return 0;
	return (uint64_t)n_rows * n_tok_const <= AX_GRAPH_FUSE_MAX_BYTES / tok_bytes; /* no overflow */
}
/* Threads of a one-block kernel over n_rows batch rows (block_scan needs every row in the block): the smallest power
 * of two ≥ n_rows and ≥ min_threads, at most AX_GRAPH_MAX_BATCH. */
static inline AX_GRAPH_HD uint32_t ax_graph_block_threads(uint32_t n_rows, uint32_t min_threads)
{
	uint32_t t = 32;
	while ((t < n_rows || t < min_threads) && t < AX_GRAPH_MAX_BATCH)
		t <<= 1;
	return t;
}
/* The exportable-layer mask of ax_graph_set_layers: the model's layers (n_layers, ≤ 128) ∩ `want` (NULL or both
 * words 0 = all of them). Returns 0, or -1 when the intersection is empty (out untouched). */
static inline AX_GRAPH_HD int ax_graph_layer_set(uint32_t n_layers, const uint64_t *want, uint64_t out[2])
{
	uint64_t all[2] = {0, 0};
	for (uint32_t l = 0; l < n_layers && l < 128; l++)
		all[l >> 6] |= 1ull << (l & 63);
	if (want && (want[0] | want[1])) {
		all[0] &= want[0];
		all[1] &= want[1];
		if (!(all[0] | all[1]))
			return -1;
	}
	out[0] = all[0];
	out[1] = all[1];
	return 0;
}
/* First row of a run of `rows` rows in a ring of `ring_rows` rows starting at or after `head`, never wrapping. */
static inline AX_GRAPH_HD uint64_t ax_graph_q_run(uint64_t head, uint64_t rows, uint64_t ring_rows)
{
	return head % ring_rows + rows > ring_rows ? head + (ring_rows - head % ring_rows) : head;
}
/* Index of layer `l` among the set bits of mask (token-major, layer-minor Q rows); -1 if l is not set. */
static inline AX_GRAPH_HD int ax_graph_layer_slot(const uint64_t mask[2], uint32_t l)
{
	if (l >= 128 || !((mask[l >> 6] >> (l & 63)) & 1))
		return -1;
	uint64_t lo = l < 64 ? mask[0] & ((1ull << l) - 1) : mask[0];
	uint64_t hi = l <= 64 ? 0 : mask[1] & ((1ull << (l - 64)) - 1);
	return ax_graph_popcount64(lo) + ax_graph_popcount64(hi);
}

#ifdef __cplusplus
}
#endif
#endif
