/*
 * export_graph.cu — libattnx-export-graph: the per-step export of a CUDA engine as a handful of tiny kernels on
 * the engine's stream (contract and rules in attnx_export_graph.h; segment rules in attnx_shm.h / shm/README.md).
 *
 * The segment (already created by ax_export_open) is registered with cudaHostRegister so kernels store into it
 * directly. Every producer counter (ring, arena, Q ring, request ids) lives in a device control block; kernels
 * advance it and mirror it into the header with volatile stores. Publication follows the host producer's order:
 * head counters first (store, __threadfence_system), then the data they cover, then each descriptor by seqlock
 * (seq word 0, fence, body, fence, seq = s + 1), then ring_head. A CPU consumer reading ring_head with acquire
 * order therefore sees complete slots; Q rows live in device memory and are written (and fenced at system scope)
 * before the descriptor that names them.
 *
 * Slot recycling (shm/README.md rule 9): ax_graph_open advertises AX_SHM_FEAT_RECYCLE (ax_export_step_start, which
 * also counts one step start) and the device continues the header's steps_started. k_step_begin (and k_step_start)
 * bump it first thing, store it at system scope and fence (__threadfence_system) before the thread exits: the kernel
 * is complete before any later kernel of the stream starts, so the counter is out before the engine's K writes of
 * the step that follow on the stream — the device form of the host's "relaxed store, release fence, then the
 * step's writes". Every END (k_end, and the END k_begin publishes for a row it recycles) stores the request
 * entry's freed_step = 1 + steps_started, fenced, before the END descriptor and before the map row is cleared.
 *
 * Nothing here allocates, synchronises or reads the host after ax_graph_open: the wanted layers, the consumer's
 * liveness and a clock come from a pinned block that the heartbeat thread refreshes every 10 ms.
 *
 * Cost (session 4, measured on an H200 by shm/python/tests/bench_gpu_export.py): a step kernel is a chain of
 * dependent loads (the heartbeat block and the consumer's tail over PCIe, ~1.3 µs each; the request map and rows in
 * device memory; block scans), 5-12 µs each; system fences cost nothing measurable. AX_GRAPH_OPT_FEWER (the default
 * layout) loads the heartbeat block in one round trip, issues the publish's host loads before its copy, and puts the
 * arena head and the slots' seq-0 words behind one fence (3 fences per publish, not 5). ax_graph_step_all makes a
 * whole decode step one kernel (k_step_all), which attnx.hf enqueues on a side stream in captured graphs.
 *
 * Written on a machine without a GPU; the host-side helpers are unit-tested (export_graph_test.c). The kernels
 * ran on an H200 and H100s on 2026-11-27 (the HF, SGLang-shaped and TP-2 GPU tests: shm/python/README.md).
 */
#include "attnx_export_graph.h"

#include <cuda_runtime.h>
#include <errno.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attnx_common.h"

typedef unsigned long long u64;

/* Device control block (device memory). */
struct ax_graph_dev {
	u64 ring_head, ring_dropped, arena_head, q_head, next_req_id, steps, steps_dropped;
	u64 steps_started; /* rule 9: mirrors the header word; this handle's kernels are its only writers after open */
	u64 layers[2]; /* layers whose Q rows this step exports */
	u64 q_base;    /* first Q-ring row (monotonic) of this step */
	unsigned nl;   /* popcount(layers) */
	unsigned active; /* a consumer is there: publish this step */
};

/* Request map entry (device memory), indexed by request-map row = request-table slot. */
struct ax_graph_map {
	u64 req_id;          /* 0 = free */
	unsigned prompt_len; /* prompt positions known so far (grows with chunked prefill) */
	unsigned pad;
};

/* Per batch row of the current step (device memory), written by step_begin. */
struct ax_graph_row {
	u64 req_id, pos0, q_off; /* pos0: first position of the row's tokens; q_off: its Q rows from q_base */
	unsigned valid, n, q_first, prefill, mrow, decode_step;
	long long in_off;
};

/* Pinned, mapped; written by the heartbeat thread, read by kernels. */
struct ax_graph_ctl {
	u64 want[2];
	unsigned prefill, enabled;
	u64 now_ns;
};
static_assert(sizeof(ax_graph_ctl) == 32 && offsetof(ax_graph_ctl, prefill) == 16 &&
		      offsetof(ax_graph_ctl, now_ns) == 24,
	      "ctl_load reads the block as two 16-byte words");

/* Device view of the segment. */
struct seg_view {
	ax_shm_header *h;
	ax_shm_step *ring;
	ax_shm_request *reqs;
	int *arena;
	u64 ring_cap, arena_cap, max_ctx, layer_mask[2];
	unsigned map_rows;
	unsigned dbg; /* AX_GRAPH_DBG_* / AX_GRAPH_OPT_* at enqueue */
};

struct ax_graph {
	ax_export *ex;
	ax_graph_config cfg;
	void *seg_base;
	size_t seg_size;
	seg_view sv;
	ax_graph_dev *st;     /* device */
	ax_graph_map *map;    /* device [map_rows] */
	ax_graph_row *rows;   /* device [max_batch] */
	ax_graph_ctl *ctl_h;  /* pinned host */
	ax_graph_ctl *ctl_d;  /* its device alias */
	ax_graph_ctl *ctl_copy; /* device memory: AX_GRAPH_DBG_CTL_DEV's frozen copy */
	void *dseg;           /* device alias of the segment */
	void *scratch;        /* device memory: AX_GRAPH_DBG_SEG_DEV's segment copy */
	ax_graph_dev saved;   /* the counters when SEG_DEV was entered */
	uint32_t H, D, esize, n_rows;
	ax_graph_step_args last;  /* the step begun last (ax_graph_step_publish reads its token ids) */
	int registered;
	pthread_t thread;
	int thread_started;
	volatile int stop;
	char err[160];
};

static char open_err[160] = "no error";

/* libattnx-export may offer this (a producer that cannot futex-wake a sleeping consumer tells it to poll). Weak:
 * a libattnx-export without it has no wake-up either, and consumers poll anyway. */
extern "C" void ax_export_disable_wake(ax_export *ex) __attribute__((weak));

/* ---- device helpers -------------------------------------------------------------------------------------- */

__device__ static long long ivec_get(const ax_graph_ivec &v, long long b, long long dflt)
{
	if (!v.p)
		return dflt;
	long long i = b * v.stride;
	long long x = v.bytes == 8 ? ((const long long *)v.p)[i] : (long long)((const int *)v.p)[i];
	return x + v.add;
}

__device__ static void st64(void *p, u64 v) { *(volatile u64 *)p = v; }
/* The system-scope fence of the ordering rules (AX_GRAPH_DBG_FENCE_GPU: device scope, for the measurement). */
__device__ static void sfence(unsigned dbg)
{
	if (dbg & AX_GRAPH_DBG_FENCE_GPU)
		__threadfence();
	else
		__threadfence_system();
}
/* The consumer's tail for flow control (AX_GRAPH_DBG_SEG_DEV: none, every slot free). */
__device__ static u64 tail_of(const seg_view &sv, u64 head)
{
	return (sv.dbg & AX_GRAPH_DBG_SEG_DEV) ? head : *(const volatile u64 *)&sv.h->consumer_tail;
}
__device__ static u64 ld64(const void *p) { return *(const volatile u64 *)p; }

/* Seqlock write of descriptor sequence number s (body d) into its slot: seq 0, fence, body, fence, seq = s + 1. */
__device__ static void slot_write(const seg_view &sv, u64 s, const ax_shm_step *d)
{
	volatile u64 *w = (volatile u64 *)&sv.ring[s & (sv.ring_cap - 1)];
	const u64 *src = (const u64 *)d;
	w[0] = 0;
	sfence(sv.dbg);
	for (int i = 1; i < (int)(sizeof(ax_shm_step) / 8); i++)
		w[i] = src[i];
	sfence(sv.dbg);
	w[0] = s + 1;
	sfence(sv.dbg); /* the seq word is out before whatever this thread (or, after a barrier, its block)
				   stores next — ring_head above all */
}

/* Seqlock write, the body half (AX_GRAPH_OPT_FEWER): the slot's seq word was zeroed and fenced by the caller
 * (with the arena head, one fence for both); body, fence, seq = s + 1, fence. */
__device__ static void slot_write_body(const seg_view &sv, u64 s, const ax_shm_step *d)
{
	volatile u64 *w = (volatile u64 *)&sv.ring[s & (sv.ring_cap - 1)];
	const u64 *src = (const u64 *)d;
	for (int i = 1; i < (int)(sizeof(ax_shm_step) / 8); i++)
		w[i] = src[i];
	sfence(sv.dbg);
	w[0] = s + 1;
	sfence(sv.dbg); /* the seq word is out before the block's barrier, hence before ring_head */
}

/* The heartbeat block in one round trip (two 16-byte loads in flight together; AX_GRAPH_OPT_FEWER). A mix of two
 * heartbeats is harmless: one step exports the old or the new wish. */
struct ctl_snap {
	u64 want0, want1;
	unsigned prefill, enabled;
	u64 now_ns;
};
__device__ static ctl_snap ctl_load(const ax_graph_ctl *c)
{
	ulonglong2 a = __ldcv((const ulonglong2 *)c), b = __ldcv((const ulonglong2 *)c + 1);
	ctl_snap r;
	r.want0 = a.x;
	r.want1 = a.y;
	r.prefill = (unsigned)b.x;
	r.enabled = (unsigned)(b.x >> 32);
	r.now_ns = b.y;
	return r;
}

/* One control descriptor (BEGIN/END) by one thread; ring space checked; counters mirrored, ring_head last. */
__device__ static void publish_one(const seg_view &sv, ax_graph_dev *st, const ax_graph_ctl *ctl, ax_shm_step *d)
{
	u64 head = st->ring_head, tail = tail_of(sv, head);
	if (head - tail >= sv.ring_cap) {
		st->ring_dropped++;
		st64(&sv.h->ring_dropped, st->ring_dropped);
		return;
	}
	d->t_ns = ld64(&ctl->now_ns);
	slot_write(sv, head, d);
	st->ring_head = head + 1;
	sfence(sv.dbg);
	st64(&sv.h->ring_head, head + 1);
}

/* Rewrite request entry `slot`: req_id 0 first, then the fields, then the new req_id (shm README rule 6). */
__device__ static void request_write(const seg_view &sv, unsigned slot, const ax_shm_request *r)
{
	volatile u64 *w = (volatile u64 *)&sv.reqs[slot];
	const u64 *src = (const u64 *)r;
	const int id_word = (int)(offsetof(ax_shm_request, req_id) / 8);
	w[id_word] = 0;
	sfence(sv.dbg);
	for (int i = 0; i < (int)(sizeof(ax_shm_request) / 8); i++)
		if (i != id_word)
			w[i] = src[i];
	sfence(sv.dbg);
	w[id_word] = r->req_id;
}

/* Count a step start (rule 9): store, then a system-scope fence, so the new value is visible everywhere before
 * this thread (hence its kernel) finishes, hence before any later kernel of the stream writes a K slot. One thread.
 * fence = false: the caller fences before its kernel ends (step_setup: one fence for this and q_head). */
__device__ static void step_started(const seg_view &sv, ax_graph_dev *st, bool fence = true)
{
	st->steps_started = ax_graph_next_step(st->steps_started);
	st64(&sv.h->steps_started, st->steps_started);
	if (fence)
		sfence(sv.dbg);
}

/* End the request map row `row` holds, if any (freed_step, END, entry ended, map row cleared). One thread.
 * The engine frees the row's slots at (or right after) END, so freed_step is stored first and fenced: a capture
 * that sees the END, or a later step start, also sees it (rule 9). */
__device__ static void end_row(const seg_view &sv, ax_graph_dev *st, ax_graph_map *map, const ax_graph_ctl *ctl,
			       unsigned row, unsigned reason)
{
	u64 id = map[row].req_id;
	if (!id)
		return;
	st64(&sv.reqs[row].freed_step, ax_graph_freed_step(st->steps_started));
	sfence(sv.dbg);
	ax_shm_step d;
	memset(&d, 0, sizeof d);
	d.kind = AX_STEP_END;
	d.req_id = id;
	d.req_slot = row;
	d.end_reason = reason;
	publish_one(sv, st, ctl, &d);
	*(volatile unsigned *)&sv.reqs[row].state = (unsigned)AX_REQ_ENDED;
	map[row].req_id = 0;
}

/* Inclusive block scan of one u64 per thread (blockDim.x ≤ 1024); returns the exclusive prefix, *total the sum. */
__device__ static u64 block_scan(u64 v, u64 *buf, u64 *total)
{
	unsigned t = threadIdx.x, n = blockDim.x;
	buf[t] = v;
	__syncthreads();
	for (unsigned off = 1; off < n; off <<= 1) {
		u64 add = t >= off ? buf[t - off] : 0;
		__syncthreads();
		buf[t] += add;
		__syncthreads();
	}
	*total = buf[n - 1];
	u64 excl = buf[t] - v;
	__syncthreads();
	return excl;
}

/* ---- kernels --------------------------------------------------------------------------------------------- */

struct begin_args {
	unsigned row;
	const void *row_dev;
	int row_bytes, token_bytes;
	const void *tokens;
	unsigned prompt_len, skip;
	char rid[AX_SHM_RID_MAX];
};

__global__ void k_begin(seg_view sv, ax_graph_dev *st, ax_graph_map *map, const ax_graph_ctl *ctl, begin_args a)
{
	__shared__ u64 s_pos;
	__shared__ unsigned s_row;
	if (threadIdx.x == 0) {
		u64 row = a.row;
		if (a.row_dev)
			row = a.row_bytes == 8 ? *(const u64 *)a.row_dev : (u64)(unsigned)*(const int *)a.row_dev;
		s_row = row < sv.map_rows ? (unsigned)row : 0xffffffffu;
		if (s_row != 0xffffffffu) {
			end_row(sv, st, map, ctl, s_row, AX_END_ABORT); /* a recycled row whose END was missed */
			u64 pos = st->arena_head;
			st->arena_head = pos + a.prompt_len;
			st64(&sv.h->arena_head, st->arena_head);
			sfence(sv.dbg);
			s_pos = pos;
		}
	}
	__syncthreads();
	if (s_row == 0xffffffffu)
		return;
	for (unsigned i = threadIdx.x; i < a.prompt_len; i += blockDim.x) {
		int tok = 0;
		if (i >= a.skip) {
			unsigned j = i - a.skip;
			tok = a.token_bytes == 8 ? (int)((const long long *)a.tokens)[j] : ((const int *)a.tokens)[j];
		}
		((volatile int *)sv.arena)[(s_pos + i) % sv.arena_cap] = tok;
	}
	sfence(sv.dbg);
	__syncthreads();
	if (threadIdx.x != 0)
		return;
	u64 id = (++st->next_req_id) << 16 | s_row;
	st64(&sv.h->next_req_id, st->next_req_id);
	ax_shm_request r;
	memset(&r, 0, sizeof r);
	r.state = AX_REQ_ACTIVE;
	r.prompt_len = a.prompt_len;
	r.req_id = id;
	r.prompt_pos = s_pos;
	r.begin_ns = ld64(&ctl->now_ns);
	memcpy(r.rid, a.rid, sizeof r.rid);
	request_write(sv, s_row, &r);
	map[s_row].req_id = id;
	map[s_row].prompt_len = a.prompt_len;
	ax_shm_step d;
	memset(&d, 0, sizeof d);
	d.kind = AX_STEP_BEGIN;
	d.req_id = id;
	d.req_slot = s_row;
	publish_one(sv, st, ctl, &d);
}

__global__ void k_end(seg_view sv, ax_graph_dev *st, ax_graph_map *map, const ax_graph_ctl *ctl, unsigned row,
		      unsigned reason)
{
	if (threadIdx.x == 0 && blockIdx.x == 0 && row < sv.map_rows)
		end_row(sv, st, map, ctl, row, reason);
}

__global__ void k_step_start(seg_view sv, ax_graph_dev *st)
{
	if (threadIdx.x == 0 && blockIdx.x == 0)
		step_started(sv, st);
}

/* Row b of the step: which request, which positions, which tokens export Q. */
__device__ static void row_setup(const seg_view &sv, ax_graph_map *map, const ax_graph_step_args &a, unsigned b,
				 unsigned nl, unsigned want_prefill, ax_graph_row *r)
{
	memset(r, 0, sizeof *r);
	long long mrow = ivec_get(a.row, b, b);
	long long n = ivec_get(a.n_tok, b, a.n_tok_const);
	long long end = ivec_get(a.seq_end, b, -1);
	if (a.pad.p && ivec_get(a.pad, b, 0) == a.pad_value)
		return;
	if (mrow < 0 || mrow >= sv.map_rows || n < 1 || end < n || (u64)end > sv.max_ctx)
		return;
	u64 id = map[mrow].req_id;
	if (!id)
		return;
	unsigned plen = map[mrow].prompt_len;
	u64 pos0 = (u64)(end - n);
	unsigned prefill = (a.flags & AX_GRAPH_PREFILL) && (n > 1 || pos0 < plen);
	if (prefill && (u64)end > plen)
		map[mrow].prompt_len = (unsigned)end; /* chunked prefill: the prompt is known up to here */
	r->valid = 1;
	r->req_id = id;
	r->mrow = (unsigned)mrow;
	r->n = (unsigned)n;
	r->pos0 = pos0;
	r->prefill = prefill;
	r->q_first = prefill && !want_prefill ? (unsigned)n - 1 : 0;
	r->decode_step = prefill ? 0 : (unsigned)(pos0 + 1 > plen ? pos0 + 1 - plen : 0);
	r->in_off = ivec_get(a.in_off, b, 0);
}

/* Thread 0's half of the step set-up: what this step exports, its Q-ring run; then one system fence for the two
 * header words this thread stored (steps_started at the set-up's start, q_head here), before anything later writes
 * K slots (rule 9) or Q rows (head before data). */
__device__ static void setup_state(const seg_view &sv, ax_graph_dev *st, unsigned enabled, const u64 *layers,
				   unsigned nl, u64 total, u64 q_rows)
{
	st->active = enabled;
	st->layers[0] = layers[0];
	st->layers[1] = layers[1];
	st->nl = nl;
	if (enabled) {
		st->steps++;
		if (total > q_rows) { /* does not fit the ring: descriptors go out without Q */
			st->steps_dropped++;
			st->nl = 0;
			st->layers[0] = st->layers[1] = 0;
		} else if (total) {
			u64 base = ax_graph_q_run(st->q_head, total, q_rows);
			st->q_head = base + total;
			st->q_base = base;
			st64(&sv.h->q_head, st->q_head); /* head before data: a lapped reader notices */
		}
	}
	sfence(sv.dbg);
}

/* The step set-up, by every thread of one block (blockDim.x a power of two ≥ a.n_rows): count the step start,
 * read what the consumer wants, resolve each batch row, scan the Q rows, reserve their run. Every thread returns
 * after the closing barrier (no early exit), so a fused kernel goes on with st and rows[] complete. */
__device__ static void step_setup(const seg_view &sv, ax_graph_dev *st, ax_graph_map *map, const ax_graph_ctl *ctl,
				  ax_graph_row *rows, const ax_graph_step_args &a, u64 q_rows, u64 *scan)
{
	__shared__ u64 s_layers[2];
	__shared__ unsigned s_nl, s_enabled, s_prefill;
	if (threadIdx.x == 0) {
		step_started(sv, st, false); /* always (enabled or not); fenced in setup_state */
		if (sv.dbg & AX_GRAPH_OPT_FEWER) {
			ctl_snap c = ctl_load(ctl);
			s_enabled = c.enabled;
			s_layers[0] = c.enabled ? c.want0 & sv.layer_mask[0] : 0;
			s_layers[1] = c.enabled ? c.want1 & sv.layer_mask[1] : 0;
			s_prefill = c.prefill;
		} else {
			s_enabled = *(const volatile unsigned *)&ctl->enabled;
			s_layers[0] = s_enabled ? ld64(&ctl->want[0]) & sv.layer_mask[0] : 0;
			s_layers[1] = s_enabled ? ld64(&ctl->want[1]) & sv.layer_mask[1] : 0;
			s_prefill = *(const volatile unsigned *)&ctl->prefill;
		}
		s_nl = ax_graph_popcount64(s_layers[0]) + ax_graph_popcount64(s_layers[1]);
	}
	__syncthreads();
	unsigned b = threadIdx.x;
	ax_graph_row r;
	memset(&r, 0, sizeof r);
	if (b < a.n_rows)
		row_setup(sv, map, a, b, s_nl, s_prefill, &r); /* also while disabled: chunked-prefill lengths */
	if (!s_enabled)
		r.valid = 0;
	u64 mine = r.valid ? (u64)(r.n - r.q_first) * s_nl : 0, total;
	r.q_off = block_scan(mine, scan, &total);
	if (b < a.n_rows)
		rows[b] = r;
	if (b == 0)
		setup_state(sv, st, s_enabled, s_layers, s_nl, total, q_rows);
	__syncthreads(); /* st and rows[] written by this block are visible to all of it */
}

/* What a Q copy reads and writes. Element (b, i, h, d) of q at q[b * st_b + (in_off(b) + i) * st_t + h * st_h + d]
 * (esize bytes each); `unit` bytes per load (16, 4 or 2, ax_graph_q_unit); ring: [q_rows, H, D]. */
struct qcopy_args {
	const char *q;
	char *ring;
	long long st_b, st_t, st_h;
	u64 q_rows;
	unsigned layer, H, D, esize, unit;
	unsigned dbg; /* AX_GRAPH_DBG_* at enqueue */
};

/* Copy layer qa.layer's Q rows of the batch rows b0, b0 + bstep, ... with this block's threads. fence: a system
 * fence after the copy, for a kernel that publishes the rows itself (after a barrier). A kernel that only copies
 * needs none: the descriptor naming the rows is written by a later kernel of the stream, which starts after this
 * one has completed (its writes performed in device memory, where the capture reads them through its IPC mapping)
 * and fences at system scope before its descriptor. No barrier inside: a thread may return early. */
__device__ static void copy_q(const ax_graph_dev *st, const ax_graph_row *rows, unsigned n_rows, unsigned b0,
			      unsigned bstep, const qcopy_args &qa, bool fence)
{
	if (!st->active || !st->nl || (qa.dbg & AX_GRAPH_DBG_NO_QCOPY))
		return;
	uint64_t lm[2] = {st->layers[0], st->layers[1]};
	int li = ax_graph_layer_slot(lm, qa.layer);
	if (li < 0)
		return;
	unsigned nl = st->nl, H = qa.H, unit = qa.unit;
	u64 base = st->q_base % qa.q_rows;
	unsigned uph = qa.D * qa.esize / unit; /* units per head */
	for (unsigned b = b0; b < n_rows; b += bstep) {
		const ax_graph_row &r = rows[b];
		if (!r.valid)
			continue;
		u64 nexp = r.n - r.q_first, total = nexp * H * uph;
		for (u64 e = threadIdx.x; e < total; e += blockDim.x) {
			u64 t = e / ((u64)H * uph), rem = e % ((u64)H * uph);
			unsigned h = (unsigned)(rem / uph), u = (unsigned)(rem % uph);
			long long tok = r.in_off + r.q_first + (long long)t;
			const char *src = qa.q + ((long long)b * qa.st_b + tok * qa.st_t + (long long)h * qa.st_h) * qa.esize +
					  (u64)u * unit;
			u64 row = base + r.q_off + t * nl + (unsigned)li;
			char *dst = qa.ring + ((row * H + h) * qa.D) * (u64)qa.esize + (u64)u * unit;
			if (unit == 16)
				*(uint4 *)dst = *(const uint4 *)src;
			else if (unit == 4)
				*(unsigned *)dst = *(const unsigned *)src;
			else
				*(unsigned short *)dst = *(const unsigned short *)src;
		}
	}
	if (fence)
		sfence(qa.dbg); /* Q rows out before this kernel's descriptor names them */
}

/* What the publish loads from host memory (AX_GRAPH_OPT_FEWER: thread 0 issues both at its kernel's start, so the
 * round trip overlaps the Q copy; reading consumer_tail early only makes flow control more conservative). */
struct host_pre {
	u64 tail, now_ns;
};
__device__ static host_pre pre_load(const seg_view &sv, const ax_graph_ctl *ctl)
{
	host_pre p = {0, 0};
	p.tail = ld64(&sv.h->consumer_tail);
	p.now_ns = ld64(&ctl->now_ns);
	return p;
}

/* Publish the step's FORWARD descriptors, by every thread of one block (blockDim.x a power of two ≥ a.n_rows):
 * token ids into the arena (head first), one seqlock slot per valid row, flow control against consumer_tail,
 * ring_head last. Uniform early exit only (st->active is read by all threads before anyone clears it).
 * pre: thread 0's host loads made earlier (AX_GRAPH_OPT_FEWER) when have_pre, else loaded here. With
 * AX_GRAPH_OPT_FEWER thread 0 stores the arena head and zeroes every slot's seq word before one fence (rule 2's
 * head first and rule 3's seq 0), each row thread then writes token ids and body, fences, stores seq = s + 1 and
 * fences (slot_write_body), and ring_head follows the barrier: 3 system fences on the path instead of 5. */
__device__ static void publish_step(const seg_view &sv, ax_graph_dev *st, const ax_graph_row *rows,
				    const ax_graph_ctl *ctl, const ax_graph_step_args &a, unsigned index_buf, u64 *scan,
				    host_pre pre, bool have_pre)
{
	__shared__ u64 s_head, s_pos, s_k, s_now;
	if (!st->active)
		return;
	const bool fewer = sv.dbg & AX_GRAPH_OPT_FEWER;
	unsigned b = threadIdx.x;
	ax_graph_row r;
	memset(&r, 0, sizeof r);
	if (b < a.n_rows)
		r = rows[b];
	u64 nexp = r.valid ? r.n - r.q_first : 0;
	u64 packed = r.valid ? (1ull << 40) | nexp : 0, total;
	u64 excl = block_scan(packed, scan, &total);
	u64 idx = excl >> 40, tok0 = excl & ((1ull << 40) - 1);
	if (b == 0) {
		host_pre p = have_pre ? pre : pre_load(sv, ctl);
		u64 head = st->ring_head, n = total >> 40;
		u64 tail = (sv.dbg & AX_GRAPH_DBG_SEG_DEV) ? head : p.tail;
		u64 space = head - tail >= sv.ring_cap ? 0 : sv.ring_cap - (head - tail);
		s_head = head;
		s_k = n < space ? n : space;
		s_now = p.now_ns;
		s_pos = st->arena_head;
		st->arena_head += total & ((1ull << 40) - 1);
		st64(&sv.h->arena_head, st->arena_head);
		if (fewer)
			for (u64 k = 0; k < s_k; k++)
				st64(&sv.ring[(head + k) & (sv.ring_cap - 1)], 0); /* seq word 0 (offset 0) */
		sfence(sv.dbg);
	}
	__syncthreads();
	if (r.valid) {
		for (u64 i = 0; i < nexp; i++) {
			long long ti = (long long)b * a.tok_stride_b + (r.in_off + r.q_first + (long long)i) * a.tok_stride_t;
			int tok = a.token_bytes == 8 ? (int)((const long long *)a.tokens)[ti] : ((const int *)a.tokens)[ti];
			((volatile int *)sv.arena)[(s_pos + tok0 + i) % sv.arena_cap] = tok;
		}
		/* the token ids are out before seq = s + 1: slot_write's first fence (after the seq word's 0), or
		 * slot_write_body's fence after the body */
		if (idx < s_k) {
			ax_shm_step d;
			memset(&d, 0, sizeof d);
			d.kind = AX_STEP_FORWARD;
			d.flags = r.prefill ? AX_STEP_F_PREFILL : 0;
			d.req_id = r.req_id;
			d.req_slot = r.mrow;
			d.n_tokens = (unsigned)nexp;
			d.pos0 = r.pos0 + r.q_first;
			d.seq_len = r.pos0 + r.n;
			d.index_row = r.mrow;
			d.decode_step = r.decode_step;
			d.index_buf = index_buf;
			if (st->nl) {
				d.q_row = st->q_base + r.q_off;
				d.layers[0] = st->layers[0];
				d.layers[1] = st->layers[1];
			}
			d.tok_pos = s_pos + tok0;
			if (fewer) {
				d.t_ns = s_now;
				slot_write_body(sv, s_head + idx, &d);
			} else {
				d.t_ns = ld64(&ctl->now_ns);
				slot_write(sv, s_head + idx, &d);
			}
		}
	}
	__syncthreads();
	if (b == 0) {
		u64 n = total >> 40;
		if (n > s_k) {
			st->ring_dropped += n - s_k;
			st64(&sv.h->ring_dropped, st->ring_dropped);
		}
		st->ring_head = s_head + s_k;
		if (!fewer)
			sfence(sv.dbg); /* fewer: every slot writer fenced after its seq word, before the barrier */
		st64(&sv.h->ring_head, st->ring_head); /* last: every slot above is complete */
		st->active = 0; /* a publish without a fresh step_begin publishes nothing */
	}
}

/* AX_GRAPH_DBG_EMPTY: what a step kernel costs as a graph node that does nothing. */
__global__ void k_nop(void) {}

#define ONE_BLOCK __global__ void __launch_bounds__(AX_GRAPH_MAX_BATCH) /* up to 1024 threads (≤ 52 registers) */

ONE_BLOCK k_step_begin(seg_view sv, ax_graph_dev *st, ax_graph_map *map, const ax_graph_ctl *ctl, ax_graph_row *rows,
		       ax_graph_step_args a, u64 q_rows)
{
	__shared__ u64 scan[AX_GRAPH_MAX_BATCH];
	step_setup(sv, st, map, ctl, rows, a, q_rows, scan);
}

__global__ void k_export_q(const ax_graph_dev *st, const ax_graph_row *rows, unsigned n_rows, qcopy_args qa)
{
	copy_q(st, rows, n_rows, blockIdx.x, gridDim.x, qa, false);
}

ONE_BLOCK k_publish(seg_view sv, ax_graph_dev *st, const ax_graph_row *rows, const ax_graph_ctl *ctl,
		    ax_graph_step_args a, unsigned index_buf)
{
	__shared__ u64 scan[AX_GRAPH_MAX_BATCH];
	host_pre p = {0, 0};
	if (threadIdx.x == 0 && (sv.dbg & AX_GRAPH_OPT_FEWER))
		p = pre_load(sv, ctl);
	publish_step(sv, st, rows, ctl, a, index_buf, scan, p, sv.dbg & AX_GRAPH_OPT_FEWER);
}

/* Fused (one block; small steps only, ax_graph_fuse): the step set-up, then the first layer's Q copy. */
ONE_BLOCK k_step_begin_q(seg_view sv, ax_graph_dev *st, ax_graph_map *map, const ax_graph_ctl *ctl,
			 ax_graph_row *rows, ax_graph_step_args a, u64 q_rows, qcopy_args qa)
{
	__shared__ u64 scan[AX_GRAPH_MAX_BATCH];
	step_setup(sv, st, map, ctl, rows, a, q_rows, scan);
	copy_q(st, rows, a.n_rows, 0, 1, qa, false); /* published by a later kernel */
}

/* Fused (one block; small steps only): the last layer's Q copy, then the publish (keys already written). */
ONE_BLOCK k_export_q_publish(seg_view sv, ax_graph_dev *st, const ax_graph_row *rows, const ax_graph_ctl *ctl,
			     ax_graph_step_args a, unsigned index_buf, qcopy_args qa)
{
	__shared__ u64 scan[AX_GRAPH_MAX_BATCH];
	host_pre p = {0, 0};
	if (threadIdx.x == 0 && (sv.dbg & AX_GRAPH_OPT_FEWER))
		p = pre_load(sv, ctl); /* in flight during the copy */
	copy_q(st, rows, a.n_rows, 0, 1, qa, true);
	__syncthreads(); /* every thread's rows (and its system fence) before any descriptor */
	publish_step(sv, st, rows, ctl, a, index_buf, scan, p, sv.dbg & AX_GRAPH_OPT_FEWER);
}

/* Q rows of up to AX_GRAPH_MAX_LAYERS layers in one kernel (ax_graph_step_all): qa's pointer and layer are replaced
 * by q[i] and layer[i] in turn. */
struct qall_args {
	qcopy_args qa;
	unsigned n;
	unsigned layer[AX_GRAPH_MAX_LAYERS];
	const char *q[AX_GRAPH_MAX_LAYERS];
};

__device__ static void copy_all(const ax_graph_dev *st, const ax_graph_row *rows, unsigned n_rows, unsigned b0,
				unsigned bstep, const qall_args &qa)
{
	for (unsigned i = 0; i < qa.n; i++) {
		qcopy_args c = qa.qa;
		c.q = qa.q[i];
		c.layer = qa.layer[i];
		copy_q(st, rows, n_rows, b0, bstep, c, false);
	}
}

/* Fused whole step (one block; small steps only): set-up, every layer's Q copy, a system fence per thread, a
 * barrier, the publish. */
ONE_BLOCK k_step_all(seg_view sv, ax_graph_dev *st, ax_graph_map *map, const ax_graph_ctl *ctl, ax_graph_row *rows,
		     ax_graph_step_args a, u64 q_rows, unsigned index_buf, qall_args qa)
{
	__shared__ u64 scan[AX_GRAPH_MAX_BATCH];
	host_pre p = {0, 0};
	if (threadIdx.x == 0 && (sv.dbg & AX_GRAPH_OPT_FEWER))
		p = pre_load(sv, ctl); /* in flight during the set-up and the copies */
	step_setup(sv, st, map, ctl, rows, a, q_rows, scan);
	copy_all(st, rows, a.n_rows, 0, 1, qa);
	sfence(sv.dbg); /* this thread's Q rows out before any descriptor names them */
	__syncthreads();
	publish_step(sv, st, rows, ctl, a, index_buf, scan, p, sv.dbg & AX_GRAPH_OPT_FEWER);
}

/* Every layer's Q rows of a big step (after k_step_begin): a block per batch row (grid-strided). */
__global__ void k_export_q_all(const ax_graph_dev *st, const ax_graph_row *rows, unsigned n_rows, qall_args qa)
{
	copy_all(st, rows, n_rows, blockIdx.x, gridDim.x, qa);
}

/* ---- host side ------------------------------------------------------------------------------------------- */

static int cuda_fail(ax_graph *g, cudaError_t e, const char *what)
{
	char *dst = g ? g->err : open_err;
	snprintf(dst, sizeof g->err, "%s: %s", what, cudaGetErrorString(e));
	return e == cudaErrorMemoryAllocation ? -ENOMEM : (e == cudaErrorNoDevice ? -ENODEV : -EIO);
}

static void *heartbeat_main(void *arg)
{
	ax_graph *g = (ax_graph *)arg;
	while (!g->stop) {
		uint64_t want[2] = {0, 0};
		int prefill = 0;
		int on = ax_export_wanted(g->ex, want, &prefill);
		ax_export_heartbeat(g->ex);
		__atomic_store_n(&g->ctl_h->want[0], want[0], __ATOMIC_RELAXED);
		__atomic_store_n(&g->ctl_h->want[1], want[1], __ATOMIC_RELAXED);
		__atomic_store_n(&g->ctl_h->prefill, (unsigned)prefill, __ATOMIC_RELAXED);
		__atomic_store_n(&g->ctl_h->now_ns, (u64)ax_now_ns(), __ATOMIC_RELAXED);
		__atomic_store_n(&g->ctl_h->enabled, (unsigned)(on > 0), __ATOMIC_RELEASE);
		struct timespec ts = {0, 10 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
	return NULL;
}

/* The config against the segment's own buffer table (the header is ours: we created it). */
static int check_config(const ax_shm_header *h, const ax_shm_buffer *bufs, const ax_graph_config *c)
{
	if (!c->q_ring || c->q_rows < 1 || c->max_batch < 1 || c->max_batch > AX_GRAPH_MAX_BATCH || c->map_rows < 1 ||
	    c->map_rows > h->req_cap || c->qbuf >= h->buf_count || c->index_buf >= h->buf_count)
		return -EINVAL;
	const ax_shm_buffer *q = &bufs[c->qbuf], *ix = &bufs[c->index_buf];
	if (q->kind != AX_BUF_Q_RING || q->loc == AX_LOC_HOST || q->dim[0] != c->q_rows)
		return -EINVAL;
	if (q->stride[2] != 1 || q->stride[1] != h->head_dim || q->stride[0] != (uint64_t)h->n_q_heads * h->head_dim)
		return -EINVAL; /* the kernels write rows as contiguous [H, D] blocks */
	if (ix->kind != AX_BUF_INDEX_TOKEN || ix->dim[0] < c->map_rows)
		return -EINVAL;
	return 0;
}

/* Point the kernels' view of the segment at device address d (the mapped segment, or SEG_DEV's scratch copy). */
static void view_at(ax_graph *g, void *dseg)
{
	const ax_shm_header *h = (const ax_shm_header *)g->seg_base;
	char *d = (char *)dseg;
	g->sv.h = (ax_shm_header *)d;
	g->sv.ring = (ax_shm_step *)(d + h->ring_off);
	g->sv.reqs = (ax_shm_request *)(d + h->req_off);
	g->sv.arena = (int *)(d + h->arena_off);
}

static int alloc_all(ax_graph *g)
{
	cudaError_t e;
	if ((e = cudaMalloc((void **)&g->st, sizeof *g->st)) != cudaSuccess)
		return cuda_fail(g, e, "cudaMalloc state");
	if ((e = cudaMalloc((void **)&g->map, sizeof *g->map * g->cfg.map_rows)) != cudaSuccess)
		return cuda_fail(g, e, "cudaMalloc map");
	if ((e = cudaMalloc((void **)&g->rows, sizeof *g->rows * g->cfg.max_batch)) != cudaSuccess)
		return cuda_fail(g, e, "cudaMalloc rows");
	if ((e = cudaHostAlloc((void **)&g->ctl_h, sizeof *g->ctl_h, cudaHostAllocMapped)) != cudaSuccess)
		return cuda_fail(g, e, "cudaHostAlloc");
	memset(g->ctl_h, 0, sizeof *g->ctl_h);
	if ((e = cudaHostGetDevicePointer((void **)&g->ctl_d, g->ctl_h, 0)) != cudaSuccess)
		return cuda_fail(g, e, "cudaHostGetDevicePointer ctl");
	if ((e = cudaHostRegister(g->seg_base, g->seg_size, cudaHostRegisterMapped | cudaHostRegisterPortable)) !=
	    cudaSuccess)
		return cuda_fail(g, e, "cudaHostRegister segment");
	void *dseg;
	if ((e = cudaHostGetDevicePointer(&dseg, g->seg_base, 0)) != cudaSuccess)
		return cuda_fail(g, e, "cudaHostGetDevicePointer segment");
	g->registered = 1;
	g->dseg = dseg;
	view_at(g, dseg);
	return 0;
}

/* The device counters continue from the header (the host producer may have published before). */
static int init_state(ax_graph *g)
{
	const ax_shm_header *h = (const ax_shm_header *)g->seg_base;
	ax_graph_dev s;
	memset(&s, 0, sizeof s);
	s.ring_head = __atomic_load_n(&h->ring_head, __ATOMIC_ACQUIRE);
	s.ring_dropped = __atomic_load_n(&h->ring_dropped, __ATOMIC_ACQUIRE);
	s.arena_head = __atomic_load_n(&h->arena_head, __ATOMIC_ACQUIRE);
	s.q_head = __atomic_load_n(&h->q_head, __ATOMIC_ACQUIRE);
	s.next_req_id = __atomic_load_n(&h->next_req_id, __ATOMIC_ACQUIRE);
	s.steps_started = __atomic_load_n(&h->steps_started, __ATOMIC_ACQUIRE); /* after ax_export_step_start */
	cudaError_t e = cudaMemcpy(g->st, &s, sizeof s, cudaMemcpyHostToDevice);
	if (e == cudaSuccess)
		e = cudaMemset(g->map, 0, sizeof *g->map * g->cfg.map_rows);
	if (e == cudaSuccess)
		e = cudaMemset(g->rows, 0, sizeof *g->rows * g->cfg.max_batch);
	return e == cudaSuccess ? 0 : cuda_fail(g, e, "init state");
}

int ax_graph_open(ax_graph **out, ax_export *ex, const ax_graph_config *cfg)
{
	if (!out || !ex || !cfg)
		return -EINVAL;
	*out = NULL;
	ax_shm_header *h = ax_export_header(ex);
	const ax_shm_buffer *bufs = (const ax_shm_buffer *)((const char *)h + h->buf_off);
	if (check_config(h, bufs, cfg))
		return -EINVAL;
	int ndev = 0;
	cudaError_t e = cudaGetDeviceCount(&ndev);
	if (e != cudaSuccess || ndev < 1 || cfg->device < 0 || cfg->device >= ndev) {
		snprintf(open_err, sizeof open_err, "no CUDA device %d", cfg->device);
		return -ENODEV;
	}
	if ((e = cudaSetDevice(cfg->device)) != cudaSuccess)
		return cuda_fail(NULL, e, "cudaSetDevice");
	ax_graph *g = (ax_graph *)calloc(1, sizeof *g);
	if (!g)
		return -ENOMEM;
	g->ex = ex;
	g->cfg = *cfg;
	g->seg_base = h;
	g->seg_size = h->segment_size;
	g->H = h->n_q_heads;
	g->D = h->head_dim;
	g->esize = (uint32_t)ax_dtype_size(h->q_dtype);
	g->sv.ring_cap = h->ring_cap;
	g->sv.arena_cap = h->arena_cap;
	g->sv.max_ctx = h->max_ctx;
	g->sv.map_rows = cfg->map_rows;
	ax_graph_set_layers(g, NULL);
	if (ax_export_disable_wake)
		ax_export_disable_wake(ex); /* before the first device-written descriptor */
	int rc = alloc_all(g);
	if (!rc) {
		/* Rule 9: AX_SHM_FEAT_RECYCLE from now on (one step start counted; init_state continues the counter on
		 * the device). The host producer's own frees so far stored freed_step against the same counter. */
		ax_export_step_start(ex);
		rc = init_state(g);
	}
	if (rc) {
		snprintf(open_err, sizeof open_err, "%s", g->err);
		ax_graph_close(g);
		return rc;
	}
	if (pthread_create(&g->thread, NULL, heartbeat_main, g) != 0) {
		ax_graph_close(g);
		return -ENOMEM;
	}
	g->thread_started = 1;
	const char *dbg = getenv("AX_GRAPH_DEBUG");
	unsigned bits = dbg && *dbg ? (unsigned)strtoul(dbg, NULL, 0) : (unsigned)AX_GRAPH_DEFAULT_BITS;
	if (ax_graph_debug(g, bits) == -EINVAL) {
		fprintf(stderr, "attnx: AX_GRAPH_DEBUG=%s ignored (unknown bits)\n", dbg);
		ax_graph_debug(g, (unsigned)AX_GRAPH_DEFAULT_BITS);
	}
	*out = g;
	return 0;
}

void ax_graph_close(ax_graph *g)
{
	if (!g)
		return;
	if (g->thread_started) {
		g->stop = 1;
		pthread_join(g->thread, NULL);
	}
	cudaDeviceSynchronize(); /* kernels in flight still write the segment */
	if (g->registered)
		cudaHostUnregister(g->seg_base);
	cudaFreeHost(g->ctl_h);
	cudaFree(g->ctl_copy);
	cudaFree(g->scratch);
	cudaFree(g->rows);
	cudaFree(g->map);
	cudaFree(g->st);
	free(g);
}

static int launched(ax_graph *g, const char *what)
{
	cudaError_t e = cudaGetLastError();
	return e == cudaSuccess ? 0 : cuda_fail(g, e, what);
}

/* AX_GRAPH_DBG_EMPTY: the empty kernel in place of a step kernel (1 when it was enqueued). */
static int empty(ax_graph *g, void *stream, int *rc)
{
	if (!(g->sv.dbg & AX_GRAPH_DBG_EMPTY))
		return 0;
	k_nop<<<1, 32, 0, (cudaStream_t)stream>>>();
	*rc = launched(g, "k_nop");
	return 1;
}

/* The heartbeat block the kernels read: the pinned one, or AX_GRAPH_DBG_CTL_DEV's device copy. */
static const ax_graph_ctl *ctl_of(const ax_graph *g)
{
	return (g->sv.dbg & AX_GRAPH_DBG_CTL_DEV) && g->ctl_copy ? g->ctl_copy : g->ctl_d;
}

int ax_graph_request_begin(ax_graph *g, void *stream, uint32_t row, const void *row_dev, int row_bytes,
			   const char *rid, const void *dev_tokens, int token_bytes, uint32_t prompt_len, uint32_t skip)
{
	if (!g || !rid || skip > prompt_len || prompt_len > g->sv.max_ctx || (prompt_len > skip && !dev_tokens))
		return -EINVAL;
	if ((row_dev && row_bytes != 4 && row_bytes != 8) || (!row_dev && row >= g->cfg.map_rows))
		return -EINVAL;
	if (token_bytes != 4 && token_bytes != 8)
		return -EINVAL;
	size_t n = strnlen(rid, AX_SHM_RID_MAX);
	if (n == 0 || n >= AX_SHM_RID_MAX)
		return -EINVAL;
	begin_args a;
	memset(&a, 0, sizeof a);
	a.row = row;
	a.row_dev = row_dev;
	a.row_bytes = row_bytes;
	a.token_bytes = token_bytes;
	a.tokens = dev_tokens;
	a.prompt_len = prompt_len;
	a.skip = skip;
	memcpy(a.rid, rid, n);
	k_begin<<<1, 256, 0, (cudaStream_t)stream>>>(g->sv, g->st, g->map, g->ctl_d, a);
	return launched(g, "k_begin");
}

int ax_graph_request_end(ax_graph *g, void *stream, uint32_t row, uint32_t reason)
{
	if (!g || row >= g->cfg.map_rows)
		return -EINVAL;
	if (reason < AX_END_STOP || reason > AX_END_ERROR)
		reason = AX_END_ERROR;
	k_end<<<1, 1, 0, (cudaStream_t)stream>>>(g->sv, g->st, g->map, g->ctl_d, row, reason);
	return launched(g, "k_end");
}

int ax_graph_step_start(ax_graph *g, void *stream)
{
	if (!g)
		return -EINVAL;
	int rc;
	if (empty(g, stream, &rc))
		return rc;
	k_step_start<<<1, 1, 0, (cudaStream_t)stream>>>(g->sv, g->st);
	return launched(g, "k_step_start");
}

static bool ivec_ok(const ax_graph_ivec *v) { return !v->p || v->bytes == 4 || v->bytes == 8; }

/* The step's arguments as the kernels need them (every ivec readable, something to read tokens from). */
static bool step_args_ok(const ax_graph *g, const ax_graph_step_args *a)
{
	if (!a || a->n_rows < 1 || a->n_rows > g->cfg.max_batch || !a->seq_end.p || !a->tokens)
		return false;
	return ivec_ok(&a->row) && ivec_ok(&a->seq_end) && ivec_ok(&a->n_tok) && ivec_ok(&a->in_off) &&
	       ivec_ok(&a->pad) && (a->token_bytes == 4 || a->token_bytes == 8) && (a->n_tok.p || a->n_tok_const >= 1);
}

int ax_graph_step_begin(ax_graph *g, void *stream, const ax_graph_step_args *a)
{
	if (!g)
		return -EINVAL;
	if (!step_args_ok(g, a)) { /* the step exports nothing, but the engine still runs it: count its start */
		int rc = ax_graph_step_start(g, stream);
		return rc ? rc : -EINVAL;
	}
	g->n_rows = a->n_rows;
	g->last = *a;
	int rc;
	if (empty(g, stream, &rc))
		return rc;
	k_step_begin<<<1, ax_graph_block_threads(a->n_rows, 32), 0, (cudaStream_t)stream>>>(
		g->sv, g->st, g->map, ctl_of(g), g->rows, *a, g->cfg.q_rows);
	return launched(g, "k_step_begin");
}

/* A Q copy's arguments, checked against the handle (the step begun last gives the rows). */
static int qcopy(const ax_graph *g, uint32_t layer, const void *q, int elem_bytes, int64_t st_b, int64_t st_t,
		 int64_t st_h, qcopy_args *qa)
{
	if (!g || !q || !g->n_rows || elem_bytes != (int)g->esize || layer >= 128 || st_h < (int64_t)g->D)
		return -EINVAL;
	uint64_t addr = (uint64_t)(uintptr_t)q | (uint64_t)(uintptr_t)g->cfg.q_ring;
	unsigned unit = ax_graph_q_unit(addr, (uint32_t)elem_bytes, st_b, st_t, st_h, g->D);
	if (!unit)
		return -EINVAL; /* fp8 Q rows need 2-byte alignment at least */
	qa->q = (const char *)q;
	qa->ring = (char *)g->cfg.q_ring;
	qa->st_b = st_b;
	qa->st_t = st_t;
	qa->st_h = st_h;
	qa->q_rows = g->cfg.q_rows;
	qa->layer = layer;
	qa->H = g->H;
	qa->D = g->D;
	qa->esize = (unsigned)elem_bytes;
	qa->unit = unit;
	qa->dbg = g->sv.dbg;
	return 0;
}

int ax_graph_export_q(ax_graph *g, void *stream, uint32_t layer, const void *q, int elem_bytes, int64_t st_b,
		      int64_t st_t, int64_t st_h)
{
	qcopy_args qa;
	int rc = qcopy(g, layer, q, elem_bytes, st_b, st_t, st_h, &qa);
	if (rc)
		return rc;
	if (empty(g, stream, &rc))
		return rc;
	unsigned blocks = g->n_rows < 1024 ? g->n_rows : 1024;
	k_export_q<<<blocks, 256, 0, (cudaStream_t)stream>>>(g->st, g->rows, g->n_rows, qa);
	return launched(g, "k_export_q");
}

int ax_graph_step_publish(ax_graph *g, void *stream)
{
	if (!g || !g->n_rows)
		return -EINVAL;
	int rc;
	if (empty(g, stream, &rc))
		return rc;
	k_publish<<<1, ax_graph_block_threads(g->n_rows, 32), 0, (cudaStream_t)stream>>>(g->sv, g->st, g->rows,
											   ctl_of(g), g->last,
											   g->cfg.index_buf);
	return launched(g, "k_publish");
}

/* Threads of the fused kernels: a full block, so that a row's Q (8 KB for bf16, 32 heads × 128) is one round of
 * 16-byte loads (latency-bound in one block: fewer threads take proportionally longer; rows go one after the other,
 * hence AX_GRAPH_FUSE_MAX_BYTES). ptxas: ≤ 52 registers. */
#define FUSED_THREADS 1024u

/* Threads of a fused kernel's block for n_rows rows (AX_GRAPH_OPT_SMALL: 128 at least, not FUSED_THREADS). */
static uint32_t fused_threads(const ax_graph *g, uint32_t n_rows)
{
	return ax_graph_block_threads(n_rows, (g->sv.dbg & AX_GRAPH_OPT_SMALL) ? 128u : FUSED_THREADS);
}

static bool fusable(const ax_graph *g, const ax_graph_step_args *a)
{
	return ax_graph_fuse(a->n_rows, a->n_tok_const, a->n_tok.p != NULL, g->H, g->D, g->esize);
}

int ax_graph_step_begin_q(ax_graph *g, void *stream, const ax_graph_step_args *a, uint32_t layer, const void *q,
			  int elem_bytes, int64_t st_b, int64_t st_t, int64_t st_h)
{
	if (!g)
		return -EINVAL;
	qcopy_args qa;
	uint32_t saved = g->n_rows;
	g->n_rows = a ? a->n_rows : 0; /* qcopy checks against the step being begun */
	int bad = !step_args_ok(g, a) || qcopy(g, layer, q, elem_bytes, st_b, st_t, st_h, &qa);
	g->n_rows = saved;
	if (bad || !fusable(g, a)) { /* the two kernels (bad arguments: as ax_graph_step_begin reports them) */
		int rc = ax_graph_step_begin(g, stream, a);
		return rc ? rc : ax_graph_export_q(g, stream, layer, q, elem_bytes, st_b, st_t, st_h);
	}
	g->n_rows = a->n_rows;
	g->last = *a;
	int rc;
	if (empty(g, stream, &rc))
		return rc;
	k_step_begin_q<<<1, fused_threads(g, a->n_rows), 0, (cudaStream_t)stream>>>(
		g->sv, g->st, g->map, ctl_of(g), g->rows, *a, g->cfg.q_rows, qa);
	return launched(g, "k_step_begin_q");
}

int ax_graph_export_q_publish(ax_graph *g, void *stream, uint32_t layer, const void *q, int elem_bytes, int64_t st_b,
			      int64_t st_t, int64_t st_h)
{
	qcopy_args qa;
	int rc = qcopy(g, layer, q, elem_bytes, st_b, st_t, st_h, &qa);
	if (rc)
		return rc;
	if (!fusable(g, &g->last)) {
		rc = ax_graph_export_q(g, stream, layer, q, elem_bytes, st_b, st_t, st_h);
		return rc ? rc : ax_graph_step_publish(g, stream);
	}
	if (empty(g, stream, &rc))
		return rc;
	k_export_q_publish<<<1, fused_threads(g, g->n_rows), 0, (cudaStream_t)stream>>>(
		g->sv, g->st, g->rows, ctl_of(g), g->last, g->cfg.index_buf, qa);
	return launched(g, "k_export_q_publish");
}

int ax_graph_set_layers(ax_graph *g, const uint64_t layers[2])
{
	if (!g)
		return -EINVAL;
	const ax_shm_header *h = (const ax_shm_header *)g->seg_base;
	uint64_t m[2];
	if (ax_graph_layer_set(h->n_layers, layers, m))
		return -EINVAL;
	g->sv.layer_mask[0] = m[0];
	g->sv.layer_mask[1] = m[1];
	return 0;
}

int ax_graph_get_stats(ax_graph *g, ax_graph_stats *out)
{
	if (!g || !out)
		return -EINVAL;
	ax_graph_dev s;
	cudaError_t e = cudaMemcpy(&s, g->st, sizeof s, cudaMemcpyDeviceToHost);
	if (e != cudaSuccess)
		return cuda_fail(g, e, "cudaMemcpy stats");
	out->ring_head = s.ring_head;
	out->ring_dropped = s.ring_dropped;
	out->arena_head = s.arena_head;
	out->q_head = s.q_head;
	out->next_req_id = s.next_req_id;
	out->steps = s.steps;
	out->steps_dropped = s.steps_dropped;
	return 0;
}

int ax_graph_enabled(const ax_graph *g, uint64_t layers[2], int *prefill)
{
	if (!g)
		return 0;
	int on = (int)__atomic_load_n(&g->ctl_h->enabled, __ATOMIC_ACQUIRE);
	if (layers) {
		layers[0] = on ? __atomic_load_n(&g->ctl_h->want[0], __ATOMIC_RELAXED) : 0;
		layers[1] = on ? __atomic_load_n(&g->ctl_h->want[1], __ATOMIC_RELAXED) : 0;
	}
	if (prefill)
		*prefill = on ? (int)__atomic_load_n(&g->ctl_h->prefill, __ATOMIC_RELAXED) : 0;
	return on;
}

const char *ax_graph_strerror(const ax_graph *g) { return g ? g->err : open_err; }

/* SEG_DEV on: a device copy of the segment takes the kernels' stores, the counters are saved; off: the mapped
 * segment again, the counters as they were (what the scratch saw never happened for the consumer). */
static int seg_dev(ax_graph *g, int on)
{
	cudaError_t e = cudaDeviceSynchronize();
	if (e != cudaSuccess)
		return cuda_fail(g, e, "seg_dev sync");
	if (!on) {
		view_at(g, g->dseg);
		e = cudaMemcpy(g->st, &g->saved, sizeof g->saved, cudaMemcpyHostToDevice);
		return e == cudaSuccess ? 0 : cuda_fail(g, e, "seg_dev restore");
	}
	if (!g->scratch && (e = cudaMalloc(&g->scratch, g->seg_size)) != cudaSuccess)
		return cuda_fail(g, e, "cudaMalloc scratch");
	if ((e = cudaMemcpy(g->scratch, g->seg_base, g->seg_size, cudaMemcpyHostToDevice)) != cudaSuccess ||
	    (e = cudaMemcpy(&g->saved, g->st, sizeof g->saved, cudaMemcpyDeviceToHost)) != cudaSuccess)
		return cuda_fail(g, e, "seg_dev copy");
	view_at(g, g->scratch);
	return 0;
}

int ax_graph_debug(ax_graph *g, unsigned flags)
{
	if (!g || (flags & ~(unsigned)AX_GRAPH_DBG_ALL))
		return -EINVAL;
	unsigned old = g->sv.dbg;
	int rc = 0;
	if ((flags ^ old) & AX_GRAPH_DBG_SEG_DEV)
		rc = seg_dev(g, !!(flags & AX_GRAPH_DBG_SEG_DEV));
	if (!rc && (flags & AX_GRAPH_DBG_CTL_DEV)) {
		cudaError_t e = cudaSuccess;
		if (!g->ctl_copy)
			e = cudaMalloc((void **)&g->ctl_copy, sizeof *g->ctl_copy);
		if (e == cudaSuccess)
			e = cudaMemcpy(g->ctl_copy, g->ctl_h, sizeof *g->ctl_copy, cudaMemcpyHostToDevice);
		if (e != cudaSuccess)
			rc = cuda_fail(g, e, "ctl copy");
	}
	if (!rc)
		g->sv.dbg = flags;
	return rc;
}

int ax_graph_step_all(ax_graph *g, void *stream, const ax_graph_step_args *a, uint32_t n, const uint32_t *layers,
		      const void *const *q, int elem_bytes, int64_t st_b, int64_t st_t, int64_t st_h)
{
	if (!g)
		return -EINVAL;
	qall_args qa;
	memset(&qa, 0, sizeof qa);
	uint32_t saved = g->n_rows;
	g->n_rows = a ? a->n_rows : 0; /* qcopy checks against the step being begun */
	int bad = !step_args_ok(g, a) || n > AX_GRAPH_MAX_LAYERS || (n && (!layers || !q));
	uint64_t addr = (uint64_t)(uintptr_t)g->cfg.q_ring;
	for (uint32_t i = 0; !bad && i < n; i++) {
		bad = !q[i] || layers[i] >= 128 || qcopy(g, layers[i], q[i], elem_bytes, st_b, st_t, st_h, &qa.qa);
		addr |= (uint64_t)(uintptr_t)q[i];
		qa.layer[i] = layers[i];
		qa.q[i] = (const char *)q[i];
	}
	if (!bad && n) {
		qa.qa.unit = ax_graph_q_unit(addr, g->esize, st_b, st_t, st_h, g->D); /* the widest unit every layer allows */
		bad = !qa.qa.unit;
	}
	g->n_rows = saved;
	if (bad) { /* as ax_graph_step_begin reports them; the step exports nothing */
		int rc = ax_graph_step_start(g, stream);
		return rc ? rc : -EINVAL;
	}
	qa.n = n;
	if (!fusable(g, a)) {
		int rc = ax_graph_step_begin(g, stream, a);
		if (rc)
			return rc;
		if (n && !empty(g, stream, &rc)) {
			unsigned blocks = g->n_rows < 1024 ? g->n_rows : 1024;
			k_export_q_all<<<blocks, 256, 0, (cudaStream_t)stream>>>(g->st, g->rows, g->n_rows, qa);
			rc = launched(g, "k_export_q_all");
		}
		return rc ? rc : ax_graph_step_publish(g, stream);
	}
	g->n_rows = a->n_rows;
	g->last = *a;
	int rc;
	if (empty(g, stream, &rc))
		return rc;
	k_step_all<<<1, fused_threads(g, a->n_rows), 0, (cudaStream_t)stream>>>(g->sv, g->st, g->map, ctl_of(g), g->rows,
										   *a, g->cfg.q_rows, g->cfg.index_buf,
										   qa);
	return launched(g, "k_step_all");
}
