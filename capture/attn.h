/*
 * attn.h — the capture's compute interface: exact top-k attention of one query row (DESIGN §1), shared by the
 * CPU backend (attn_cpu.c) and, later, the CUDA backend. Internal to capture/ (the daemon and its tests).
 *
 * A job describes one query position p of one request for one layer: the Q row [H_q, D], the layer's K pool
 * [slots, H_kv, D] with its strides, and the request's index row (slot of key j = index[j], j = 0..n_keys-1,
 * n_keys = p+1, or fewer with a sliding window: keys max(0, p+1-window)..p). The result is exact over every key:
 *   mean_logit: s_j = mean_h scale·q_h·k_{g(h),j} (after the tanh cap, if any, per head); top-k of s_j,
 *               logsumexp over all j of s_j.
 *   mean_prob:  p_j = mean_h softmax_h(s_hj); top-k of p_j reported as log p_j with logsumexp 0.
 *   heads:      per selected head h: top-k of s_hj and that head's logsumexp; head_id = head_offset + h.
 * GQA: query head h reads KV head h / (H_q / H_kv). Ties are broken by the lower key position. Slot indices
 * outside [0, n_slots) make the job fail with -ERANGE before any key is read past the pool.
 *
 * Paged addressing (vLLM's block tables; index_kind AX_ATTN_INDEX_PAGED): `index` is the request's block-table row,
 * key j lives in block index[j / block_size] at row j % block_size of it, element (j, g, d) at
 *   index[j / block_size] · k_block_stride + (j % block_size) · k_stride[0] + g · k_stride[1] + d,
 * so NHD pools [blocks, block_size, H_kv, D] and HND pools [blocks, H_kv, block_size, D] are both strides. Block ids
 * outside [0, n_blocks) fail the job with -ERANGE before any key is read; only the cells of blocks holding visible
 * keys are read. A paged job carries n_slots = 0, so code that predates paged jobs and ignores index_kind finds every
 * slot out of range (or the job invalid) rather than keys through a misread table; such code may still read up to
 * n_keys index cells (past the row's needed ones), so it must not be given paged jobs (ax_attn_cuda_run keeps them
 * off the fast path).
 */
#ifndef ATTNX_CAPTURE_ATTN_H
#define ATTNX_CAPTURE_ATTN_H

#include <stddef.h>
#include <stdint.h>

#include "attnx_proto.h"

#define AX_ATTN_MAX_TOPK AX_PROTO_MAX_TOPK
#define AX_ATTN_MAX_BLOCK_SIZE 65536u /* = AX_SHM_MAX_BLOCK_SIZE */

/* How a job's `index` addresses its keys (ax_attn_job.index_kind). */
enum ax_attn_index_kind {
	AX_ATTN_INDEX_TOKEN = 0, /* index[j] = slot of key j (SGLang req_to_token row) */
	AX_ATTN_INDEX_PAGED = 1, /* index[j / block_size] = block of key j (vLLM block-table row) */
};

typedef struct ax_attn_job {
	const void *q;           /* [H_q, D] query row, dtype q_dtype, contiguous */
	uint32_t q_dtype;        /* enum ax_dtype: f32, f16, bf16 */
	const void *k;           /* K pool base, dtype k_dtype */
	uint32_t k_dtype;        /* enum ax_dtype: f32, f16, bf16 (fp8 with k_scale) */
	float k_scale;           /* fp8 dequantisation scale (1 otherwise) */
	uint64_t k_stride[3];    /* element strides of the pool: slot, kv head, dim (dim stride must be 1) */
	uint64_t n_slots;        /* slots in the pool (index values must be < n_slots) */
	const void *index;       /* index row: slot of key j, j = 0..n_keys-1 */
	uint32_t index_dtype;    /* AX_DTYPE_I32 or AX_DTYPE_I64 */
	uint64_t position;       /* query position p; keys 0..p are visible (window permitting) */
	int32_t window;          /* sliding window (0 = all keys) */
	uint32_t n_q_heads, n_kv_heads, head_dim;
	uint32_t head_offset;    /* global id of local head 0 */
	float scale;             /* softmax scale */
	float logit_cap;         /* tanh cap, 0 = none */
	uint32_t mode;           /* enum ax_mode */
	uint32_t top_k;          /* 1..AX_ATTN_MAX_TOPK */
	const int32_t *heads;    /* heads mode: local head indices to report (NULL = all) */
	uint32_t n_heads;        /* entries in heads */
	/* Paged addressing (an addition: all zero for a token index row). */
	uint32_t index_kind;     /* enum ax_attn_index_kind (paged: index_dtype AX_DTYPE_I32, as vLLM's tables) */
	uint32_t block_size;     /* paged: keys per block, 1 .. AX_ATTN_MAX_BLOCK_SIZE (any value, not only 2^n) */
	uint64_t k_block_stride; /* paged: element stride between blocks (k_stride[0] is then the stride between rows
				    of a block) */
	uint64_t n_blocks;       /* paged: blocks in the pool (block ids must be < n_blocks); n_slots must be 0 */
} ax_attn_job;

/* One result row (one per job for mean modes, one per selected head in heads mode). */
typedef struct ax_attn_result {
	int32_t head_id;         /* global head id (heads mode) or -1 */
	uint32_t k;              /* entries filled (min(top_k, visible keys)) */
	int64_t pos[AX_ATTN_MAX_TOPK];   /* key positions, best first, ties by lower position */
	float logit[AX_ATTN_MAX_TOPK];   /* s_j (or log p_j for mean_prob) */
	double lse;              /* logsumexp over all visible keys (0 for mean_prob) */
} ax_attn_result;

/* Scratch space a worker thread reuses across jobs. */
typedef struct ax_attn_scratch ax_attn_scratch;
ax_attn_scratch *ax_attn_scratch_new(void);
void ax_attn_scratch_free(ax_attn_scratch *s);

/* Rows a job produces: 1, or the number of selected heads in heads mode. */
uint32_t ax_attn_rows(const ax_attn_job *job);

/*
 * Run one job on the CPU. `out` has room for ax_attn_rows(job) results. Returns 0, -EINVAL (bad shape, dtype,
 * mode, top_k, head index; paged: block size, n_blocks, strides past 2^62 bytes, n_slots not 0), -ERANGE (an index
 * value outside the pool: a slot, or a block id of a block holding a visible key) or -ENOMEM. Thread-safe given a scratch per
 * thread.
 *
 * Also -EDOM: a NaN or infinite value in Q or in any visible key (or a score that overflows) fails the job instead
 * of producing a record; keys outside the window are never read (nor, in heads mode with a head list, the KV
 * heads no listed head uses). On any error the contents of `out` are undefined.
 * Key dtypes: f32, f16, bf16, fp8 e4m3 ("fn": no inf, 0x7f/0xff NaN) and e5m2; k_scale applies to fp8 only.
 * Limits: H_q ≤ 4096, head_dim ≤ 4096, position < 2^40. mean_prob keeps H_q·n_keys f32 scores in the scratch
 * up to 64 MiB and reads the keys twice beyond that.
 */
int ax_attn_cpu(const ax_attn_job *job, ax_attn_scratch *scratch, ax_attn_result *out);

/* Fill an attn record's arrays from a result: token_positions, topk_logits, attention_scores (softmax over the
 * top-k), logsumexp_all, topk_mass, head_id. */
/* ax_attn_to_record also sets `k` and `mode` (head_id is -1 outside heads mode); position, decode_step, token_id,
 * layer_id and prefill are left to the caller. topk_mass is clamped to 1 against rounding. Thread-safe. */
void ax_attn_to_record(const ax_attn_result *res, uint32_t mode, ax_rec_attn *rec);

/* Conversions used by backends and tests. */
float ax_f16_to_f32(uint16_t h);
float ax_bf16_to_f32(uint16_t b);
uint16_t ax_f32_to_f16(float f);   /* round to nearest even */
uint16_t ax_f32_to_bf16(float f);  /* round to nearest even */
float ax_fp8_e4m3_to_f32(uint8_t b); /* OCP e4m3fn, unscaled */
float ax_fp8_e5m2_to_f32(uint8_t b); /* OCP e5m2, unscaled */

/* Internal, for tests: bytes of mean_prob scores the scratch may keep before mean_prob reads the keys twice. */
void ax__attn_scratch_set_store_cap(ax_attn_scratch *s, size_t bytes);

#endif
