/*
 * capture.c — the capture loop: attach to an engine's segment, turn step descriptors into attention jobs,
 * emit records in order, and survive everything the engine or the relay may do.
 *
 * One thread (ax_capture_run) owns the shm handle, the per-request state (indexed by request-table slot and
 * checked against the 64-bit request id), the policy table and the sender. Each loop iteration:
 *   1. not attached: try ax_shm_attach every attach_retry_ms — a segment whose Q ring is not registered yet is
 *      left for the next try (the engine is still registering its buffers) —, then announce `hello` and the wanted
 *      layers; K pools the engine registers after the attach (hooks that register a layer at its first forward)
 *      are taken up by the liveness check (take_new_layers) and join the wanted layers;
 *   2. take up to 256 descriptors: BEGIN → `req`, FORWARD → one ax_attn_job per captured (position, layer),
 *      END → `end`; lost / invalid / torn descriptors become `gap` records;
 *   3. pop finished items from the ordered queue (pool.h): a job's result is trusted only if its Q row was not
 *      overwritten meanwhile (ax_shm_check_q) and its keys were not possibly recycled (ax_shm_check_keys, else a
 *      `recycled` gap), then becomes `attn` records; emitting a request's `end`, or an empty queue, publishes how
 *      far the capture has got (ax_shm_complete) so the engine can recycle what it is done with;
 *   4. service: sender deadlines and retries, policy frames from the relay, consumer heartbeat, engine liveness
 *      (restart → finish queued jobs, `gap` "restart" for requests in flight, detach, re-attach), stats records;
 *   5. nothing done: sleep in ax_shm_wait until the engine publishes, a worker finishes, a policy frame arrives
 *      (nng aio callback), ax_capture_stop, or the next timer (wake_loop wakes it from other threads).
 * Small jobs run on this thread at commit (pool.h); a step's records are sealed into one frame when it is done.
 * A policy for a rid the capture has not acknowledged yet is acknowledged at once: the wanted layers / prefill in
 * the segment are updated first (so the engine exports what the policy needs), then the `policy` record is echoed
 * on the records channel (the capture's src and seq) and the batch is flushed without waiting for its 1 ms. The relay
 * holds the request until every live capture has acked, so the engine cannot prefill before the capture asked for
 * the policy's layers.
 * Jobs point straight into the mapped segment (zero copy), so the loop drains the queue before it detaches.
 *
 * Which rows: the last prompt row P-1 always; other prompt rows when the policy's `prompt` or --prefill asks;
 * generated rows p ≥ P-1 when (p-(P-1)) % stride == 0, up to max_tokens per request (the row that samples
 * generated token i is p = P-1+i). Which layers: the request's layer set ∩ the layers the step carries.
 */
#include "capture.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <nng/nng.h>
#include <nng/protocol/pubsub0/sub.h>

#include "attn.h"
#include "backend_cuda.h"
#include "attnx_common.h"
#include "attnx_config.h"
#include "policy.h"
#include "pool.h"
#include "sender.h"

#define TAG "capture"
#define MS 1000000ull
#define CNT_ADD(c, f, n) __atomic_fetch_add(&(c)->cnt.f, (uint64_t)(n), __ATOMIC_RELAXED)

/* What to capture for one request: the defaults, or the defaults overridden by its policy. */
typedef struct settings {
	uint32_t top_k, mode, stride, max_tokens;
	int prompt;                 /* capture every prompt row */
	uint64_t layers[2];         /* layer mask */
	uint32_t n_heads;           /* heads mode: local head subset (0 = all) */
	int no_heads;               /* a subset was asked for but none of its heads lives on this rank */
	int32_t heads[AX_PROTO_MAX_LIST];
} settings;

/* A request in flight, at its request-table slot. */
typedef struct creq {
	uint64_t req_id;            /* 0 = unused */
	char rid[AX_PROTO_STR];
	uint32_t prompt_len;
	uint64_t captured;          /* generated positions captured (max_tokens) */
	uint64_t seen;              /* highest position seen + 1 */
	uint64_t pol_version;       /* policy version `set` was derived from (0 = defaults) */
	int set_valid;
	settings set;
} creq;

/* A layer's K pool as the backends read it: [slots, H_kv, D], or paged [blocks, bsize, H_kv, D]. */
typedef struct klayer {
	const uint8_t *base;
	uint64_t stride[3];         /* elements: slot (paged: row of a block), KV head, dim */
	uint64_t n_slots;           /* slots (paged: blocks) */
	uint32_t bsize;             /* 0, or the block size of a 4-D pool */
	uint64_t bstride;           /* paged: elements between blocks */
	uint32_t dtype;
	float scale;
	int ok;
} klayer;

enum gap_kind { GAP_RING_FULL, GAP_INVALID, GAP_TORN, GAP_UNSUPPORTED, GAP_TOKENS, GAP_LATE, GAP_N };
static const struct { const char *what, *reason; } gap_names[GAP_N] = {
	[GAP_RING_FULL] = {"steps", "ring_full"}, [GAP_INVALID] = {"steps", "invalid"},
	[GAP_TORN] = {"steps", "torn"},           [GAP_UNSUPPORTED] = {"steps", "unsupported"},
	[GAP_TOKENS] = {"steps", "lapped"},       [GAP_LATE] = {"requests", "late"},
};

struct ax_capture {
	ax_capture_opts o;
	int stop;                   /* atomic */
	ax__sender *snd;
	nng_socket sub;
	int sub_open;
	ax__policy_table pol;
	char (*acks)[AX_PROTO_STR]; /* rids of policies received in this poll and not yet acknowledged */
	uint32_t n_acks, acks_cap;
	ax__pool *pool;
	ax_record rec;              /* scratch for records emitted directly */
	uint64_t now_ns;
	/* attachment */
	ax_shm *shm;
	const ax_shm_header *hdr;
	uint64_t generation, dead_generation;
	uint64_t attach_ns;         /* CLOCK_MONOTONIC of the current attach */
	creq *reqs;
	uint32_t req_cap;
	klayer *k;
	uint32_t n_layers;
	const uint8_t *qbase;
	uint64_t q_rows, q_row_elems;
	uint32_t q_dtype;
	uint64_t avail[2];          /* layers with a readable K pool (and a readable Q ring) */
	uint32_t bufs_seen;         /* the segment's buffer count when the K pools were last looked up */
	uint64_t noq_since_ns;      /* when the segment was first found without a Q ring (attach_err_logged -EINPROGRESS) */
	settings defaults;
	uint64_t wanted[2];
	int wanted_prefill, wanted_set, wanted_dirty;
	int32_t *tok;
	uint32_t tok_cap;
	uint64_t last_torn;
	uint64_t step_gaps[GAP_N];  /* descriptor-level losses not yet reported */
	uint64_t lapped_rows, failed_rows; /* record-level losses found while draining, not yet reported */
	uint64_t recycled_rows;     /* rows whose keys may have been recycled (ax_shm_check_keys), not yet reported */
	char recycled_rid[AX_PROTO_STR]; /* ... all of this request */
	uint64_t recycled_total;    /* for the stats record */
	struct { const ax_record *rec; uint64_t seq_end; } endq[64]; /* queued END records and their descriptor */
	uint32_t endq_head, endq_len;
	/* timers (CLOCK_MONOTONIC ns) */
	uint64_t next_attach_ns, next_hb_ns, next_alive_ns, next_stats_ns, next_sweep_ns, dead_since_ns;
	uint64_t next_hello_ns;    /* hello is repeated while attached, so a relay started later learns the shape */
	uint64_t idle_since_ns;
	int attach_err_logged;
	ax__cuda_be *cuda;          /* CUDA backend (backend_cuda.h), opened at the first attach that uses it */
	int cuda_active;            /* this attachment's buffers are read on the GPU */
	int reexec;                 /* the CUDA device needs a new process: ax_capture_run returns AX_CAPTURE_REEXEC */
	ax_capture_stats cnt;       /* atomics; sender / pool fields filled at snapshot time */
	/* waking the loop from other threads: workers, the policy aio, ax_capture_stop */
	ax_shm *wake_shm;           /* atomic: the handle whose futex the loop sleeps on; NULL while detached */
	int wakers;                 /* atomic: threads inside wake_loop (detach waits for 0 before unmapping) */
	nng_aio *sub_aio;           /* policy frames: received on an nng thread, queued in pq */
	pthread_mutex_t pmu;        /* guards pq */
	nng_msg *pq[256];
	uint32_t pq_head, pq_len;
};

/* Wake the loop if it sleeps in ax_shm_wait (any thread; async-signal-safe: atomics and a futex call). The handle is
 * read inside a `wakers` section so detach never unmaps the futex word under a waker. */
static void wake_loop(ax_capture *c)
{
	__atomic_add_fetch(&c->wakers, 1, __ATOMIC_SEQ_CST);
	ax_shm *s = __atomic_load_n(&c->wake_shm, __ATOMIC_SEQ_CST);
	if (s)
		ax_shm_wake(s);
	__atomic_sub_fetch(&c->wakers, 1, __ATOMIC_RELEASE);
}

static void pool_done(void *arg) { wake_loop(arg); }

/* ---------------------------------------------------------------------------------------------------------
 * Emitting records.
 */

static void emit(ax_capture *c, ax_record *r);

static void emit_gap(ax_capture *c, const char *what, const char *reason, uint64_t count, const char *rid)
{
	ax_record *r = &c->rec;
	ax_record_init(r, AX_REC_GAP);
	snprintf(r->u.gap.what, sizeof r->u.gap.what, "%s", what);
	snprintf(r->u.gap.reason, sizeof r->u.gap.reason, "%s", reason);
	r->u.gap.count = count;
	if (rid)
		snprintf(r->rid, sizeof r->rid, "%s", rid);
	emit(c, r);
}

/* Report record-level losses found while draining, before the next record goes out. */
static void flush_drain_gaps(ax_capture *c)
{
	uint64_t lapped = c->lapped_rows, failed = c->failed_rows, recycled = c->recycled_rows;
	c->lapped_rows = c->failed_rows = c->recycled_rows = 0;
	if (lapped)
		emit_gap(c, "records", "lapped", lapped, NULL);
	if (failed)
		emit_gap(c, "records", "invalid", failed, NULL);
	if (recycled)
		emit_gap(c, "records", "recycled", recycled, c->recycled_rid);
}

static int drain_gaps_pending(const ax_capture *c) { return c->lapped_rows || c->failed_rows || c->recycled_rows; }

/* What a refused attn record held (the encoder's checks: proto/record.c validate_attn), so the log says which
 * part broke them: the fields, then the first entries and the first place the list is out of order. */
static void log_refused_attn(const ax_record *r)
{
	const ax_rec_attn *a = &r->u.attn;
	uint32_t k = a->k < AX_PROTO_MAX_TOPK ? a->k : AX_PROTO_MAX_TOPK, bad = 0;
	double sum = 0;
	for (uint32_t i = 0; i < k; i++) {
		sum += a->attention_scores[i];
		if (!bad && i > 0 &&
		    (a->topk_logits[i] > a->topk_logits[i - 1] ||
		     (a->topk_logits[i] == a->topk_logits[i - 1] && a->token_positions[i] <= a->token_positions[i - 1])))
			bad = i;
	}
	ax_log(AX_LOG_WARN, TAG,
	       "  refused attn: rid %s pos %lld step %lld token %lld layer %d head %d mode %u prefill %u k %u lse %g "
	       "mass %g scores sum %.6f; entries 0-3 (%lld %g) (%lld %g) (%lld %g) (%lld %g); first out of order: %u",
	       r->rid, (long long)a->position, (long long)a->decode_step, (long long)a->token_id, (int)a->layer_id,
	       (int)a->head_id, (unsigned)a->mode, (unsigned)a->prefill, (unsigned)a->k, a->logsumexp_all, a->topk_mass,
	       sum, (long long)(k > 0 ? a->token_positions[0] : -1), k > 0 ? a->topk_logits[0] : 0.0,
	       (long long)(k > 1 ? a->token_positions[1] : -1), k > 1 ? a->topk_logits[1] : 0.0,
	       (long long)(k > 2 ? a->token_positions[2] : -1), k > 2 ? a->topk_logits[2] : 0.0,
	       (long long)(k > 3 ? a->token_positions[3] : -1), k > 3 ? a->topk_logits[3] : 0.0, (unsigned)bad);
}

static void emit(ax_capture *c, ax_record *r)
{
	if (r != &c->rec && drain_gaps_pending(c))
		flush_drain_gaps(c);
	int rv = ax__sender_add(c->snd, r);
	if (rv < 0) {
		ax_log(AX_LOG_WARN, TAG, "record (%s) refused by the encoder: %s", ax_rec_type_name(r->type),
		       ax_strerror(rv));
		if (r->type == AX_REC_ATTN)
			log_refused_attn(r);
		return;
	}
	CNT_ADD(c, records, 1);
	if (r->type == AX_REC_GAP)
		CNT_ADD(c, gaps, 1);
}

/* Drain finished queue items (forward declaration: the queue may need room while records are produced). */
static int drain(ax_capture *c);
/* Run the pending GPU batch (CUDA backend) and emit its records (forward declaration). */
static int cuda_flush(ax_capture *c);

static void poll_policies(ax_capture *c);

/* A free queue slot, waiting for the head (and sending meanwhile) when the queue is full. Policies keep being
 * acknowledged meanwhile: the relay holds their requests until then. */
static ax__item *reserve_wait(ax_capture *c)
{
	for (;;) {
		ax__item *it = ax__pool_reserve(c->pool);
		if (it)
			return it;
		ax__pool_wait_head(c->pool, MS);
		drain(c);
		c->now_ns = ax_now_ns();
		ax__sender_poll(c->snd, c->now_ns);
		poll_policies(c);
	}
}

/* Queue a heap record behind the jobs already queued (takes ownership of r). */
static void push_record(ax_capture *c, ax_record *r)
{
	cuda_flush(c); /* GPU jobs queued before this record leave before it */
	ax__item *it = reserve_wait(c);
	it->kind = AX_ITEM_RECORD;
	it->rec = r;
	ax__pool_commit(c->pool);
}

static ax_record *new_record(int type, const char *rid)
{
	ax_record *r = malloc(sizeof *r);
	if (r == NULL)
		return NULL;
	ax_record_init(r, type);
	if (rid)
		snprintf(r->rid, sizeof r->rid, "%s", rid);
	return r;
}

static void push_gap(ax_capture *c, int kind, uint64_t count, const char *rid)
{
	ax_record *r = new_record(AX_REC_GAP, rid);
	if (r == NULL)
		return;
	snprintf(r->u.gap.what, sizeof r->u.gap.what, "%s", gap_names[kind].what);
	snprintf(r->u.gap.reason, sizeof r->u.gap.reason, "%s", gap_names[kind].reason);
	r->u.gap.count = count;
	push_record(c, r);
}

static void flush_step_gaps(ax_capture *c)
{
	for (int k = 0; k < GAP_N; k++)
		if (c->step_gaps[k]) {
			push_gap(c, k, c->step_gaps[k], NULL);
			c->step_gaps[k] = 0;
		}
}

/* One finished job → its attn records (or a counted loss). */
static void emit_attn(ax_capture *c, ax__item *it)
{
	if (it->err != 0) {
		CNT_ADD(c, job_errors, 1);
		c->failed_rows += it->n_res;
		ax_log(AX_LOG_DEBUG, TAG, "job %s pos %lld layer %d failed: %s", it->rid, (long long)it->position,
		       it->layer, ax_strerror(it->err));
		return;
	}
	if (c->shm == NULL || it->generation != c->generation ||
	    ax_shm_check_q(c->shm, it->q_row, 1, c->q_rows) != 0) {
		CNT_ADD(c, lapped, 1);
		c->lapped_rows += it->n_res;
		return;
	}
	/* Keys read through slots the engine may have handed to another request since (shm rule 9): never a record. */
	if (ax_shm_check_keys(c->shm, it->req_id) != 0) {
		if (c->recycled_rows && strcmp(c->recycled_rid, it->rid) != 0)
			flush_drain_gaps(c);
		memcpy(c->recycled_rid, it->rid, sizeof c->recycled_rid);
		c->recycled_rows += it->n_res;
		c->recycled_total += it->n_res;
		return;
	}
	if (drain_gaps_pending(c))
		flush_drain_gaps(c);
	for (uint32_t i = 0; i < it->n_res; i++) {
		ax_record *r = &c->rec;
		ax_record_init(r, AX_REC_ATTN);
		memcpy(r->rid, it->rid, sizeof r->rid);
		ax_rec_attn *a = &r->u.attn;
		a->k = it->res[i].k;
		ax_attn_to_record(&it->res[i], it->job.mode, a);
		a->position = it->position;
		a->decode_step = it->decode_step;
		a->token_id = it->token_id;
		a->layer_id = it->layer;
		a->mode = it->job.mode;
		a->prefill = it->prefill;
		emit(c, r);
	}
}

static int drain(ax_capture *c)
{
	int n = cuda_flush(c);
	ax__item *it;
	while ((it = ax__pool_head(c->pool)) != NULL) {
		if (it->kind == AX_ITEM_ATTN) {
			emit_attn(c, it);
		} else if (it->rec) {
			emit(c, it->rec);
			if (c->endq_len && c->endq[c->endq_head].rec == it->rec) { /* an END: its request is done */
				if (c->shm)
					ax_shm_complete(c->shm, c->endq[c->endq_head].seq_end);
				c->endq_head = (c->endq_head + 1) % AX_ARRAY_LEN(c->endq);
				c->endq_len--;
			}
		}
		ax__pool_pop(c->pool);
		n++;
	}
	if (drain_gaps_pending(c))
		flush_drain_gaps(c);
	return n;
}

/* Finish every queued item (jobs read the mapping, so this precedes any detach). */
static void drain_all(ax_capture *c)
{
	cuda_flush(c);
	while (ax__pool_count(c->pool) > 0) {
		if (drain(c) == 0)
			ax__pool_wait_head(c->pool, MS);
		ax__sender_poll(c->snd, ax_now_ns());
	}
}

/* ---------------------------------------------------------------------------------------------------------
 * CUDA backend hooks (backend_cuda.h). An attachment runs on the GPU with --backend cuda, or with auto when the
 * segment's Q ring is in GPU memory and this build and machine have the backend. Its jobs (device addresses of the
 * Q row, K pool and index row) are batched instead of queued: the batch runs when the loop drains (once per pump of
 * the step ring), when it is full, and before any record is queued behind it, and its results become records
 * through emit_attn — the CPU path's records, in the CPU path's order.
 */

static int cuda_flush(ax_capture *c)
{
	if (!c->cuda_active || ax__cuda_be_pending(c->cuda) == 0)
		return 0;
	ax__item *items;
	uint32_t n;
	static uint64_t failures; /* a broken context fails every batch: log the first and every 1000th */
	if (ax__cuda_be_run(c->cuda, &items, &n) < 0 && failures++ % 1000 == 0)
		ax_log(AX_LOG_ERROR, TAG, "GPU batch of %u jobs failed (%llu so far): %s", n,
		       (unsigned long long)failures, ax__cuda_be_strerror(c->cuda));
	int k = drain(c); /* the records queued before the batch's first job (all done at commit) */
	for (uint32_t i = 0; i < n; i++)
		emit_attn(c, &items[i]);
	if (drain_gaps_pending(c))
		flush_drain_gaps(c);
	return k + (int)n;
}

/* A batch slot, running the batch first when it is full. */
static ax__item *cuda_reserve(ax_capture *c)
{
	ax__item *it = ax__cuda_be_reserve(c->cuda);
	if (it == NULL) {
		cuda_flush(c);
		it = ax__cuda_be_reserve(c->cuda);
	}
	return it;
}

/* Where jobs read buffer `idx`: its mapped host address (CPU backend) or its imported device address (CUDA);
 * NULL if this attachment's backend cannot read it. Addresses of device memory are never dereferenced here. */
static const uint8_t *buf_base(ax_capture *c, uint32_t idx)
{
	if (!c->cuda_active)
		return ax_shm_host_ptr(c->shm, idx);
	uint64_t d = 0;
	return ax__cuda_be_map(c->cuda, idx, &d) == 0 ? (const uint8_t *)(uintptr_t)d : NULL;
}

/* Choose this attachment's backend; for CUDA, open the backend (once) and start importing the segment's buffers. */
static void cuda_attach(ax_capture *c)
{
	c->cuda_active = 0;
	if (c->o.backend == AX_BACKEND_CPU)
		return;
	uint32_t nb;
	const ax_shm_buffer *bufs = ax_shm_buffers(c->shm, &nb);
	int qi = ax_shm_find_buffer(c->shm, AX_BUF_Q_RING, -1);
	int q_on_gpu = qi >= 0 && bufs[qi].loc != AX_LOC_HOST;
	if (c->o.backend == AX_BACKEND_AUTO && (!q_on_gpu || ax__cuda_be_devices() <= 0)) {
		if (q_on_gpu)
			ax_log(AX_LOG_ERROR, TAG, "the engine's buffers are in GPU memory but %s", ax__cuda_be_why());
		return;
	}
	if (c->cuda == NULL) {
		int ndev = ax__cuda_be_devices();
		int dev = c->o.device >= 0 ? c->o.device : (q_on_gpu && bufs[qi].device < ndev ? bufs[qi].device : 0);
		int rv = ax__cuda_be_open(&c->cuda, dev);
		if (rv < 0) {
			ax_log(AX_LOG_ERROR, TAG, "CUDA backend on device %d: %s", dev, ax_strerror(rv));
			return;
		}
	}
	if (ax__cuda_be_attach(c->cuda, c->shm, qi) == 0)
		c->cuda_active = 1;
	else
		ax_log(AX_LOG_ERROR, TAG, "CUDA backend: cannot start importing the segment's buffers");
}

/* Why buf_base gave nothing: -ENOTSUP for memory of the other backend's kind, -EIO for a failed CUDA import. */
static int base_err(const ax_capture *c, const ax_shm_buffer *b)
{
	return c->cuda_active && b->loc != AX_LOC_HOST ? -EIO : -ENOTSUP;
}

static void cuda_detach(ax_capture *c)
{
	if (c->cuda_active)
		ax__cuda_be_detach(c->cuda);
	c->cuda_active = 0;
}

/* ---------------------------------------------------------------------------------------------------------
 * Settings and policies.
 */

static void local_heads(const ax_capture *c, const int32_t *ids, uint32_t n, settings *s)
{
	s->n_heads = 0;
	s->no_heads = 0;
	if (n == 0)
		return;
	for (uint32_t i = 0; i < n; i++) {
		int64_t h = (int64_t)ids[i] - c->hdr->head_offset;
		int dup = 0;
		for (uint32_t j = 0; j < s->n_heads && !dup; j++)
			dup = s->heads[j] == h; /* a head listed twice is reported once */
		if (!dup && h >= 0 && h < c->hdr->n_q_heads && s->n_heads < AX_PROTO_MAX_LIST)
			s->heads[s->n_heads++] = (int32_t)h;
	}
	s->no_heads = s->n_heads == 0;
}

static void make_defaults(ax_capture *c)
{
	settings *s = &c->defaults;
	uint32_t ignored = 0;
	memset(s, 0, sizeof *s);
	s->top_k = c->o.top_k;
	s->mode = c->o.mode;
	s->stride = c->o.stride;
	s->max_tokens = c->o.max_tokens;
	s->prompt = c->o.prefill;
	ax_capture_resolve_layers(c->o.layer_sel, c->o.layer_ids, c->o.n_layer_ids, c->n_layers, s->layers,
				  &ignored);
	if (ignored)
		ax_log(AX_LOG_WARN, TAG, "--layers: %u ids outside 0..%u ignored", ignored, c->n_layers - 1);
	local_heads(c, c->o.head_ids, c->o.n_head_ids, s);
}

static void make_settings(ax_capture *c, const ax_rec_policy *p, settings *s)
{
	*s = c->defaults;
	if (p == NULL)
		return;
	if (p->top_k)
		s->top_k = p->top_k > AX_PROTO_MAX_TOPK ? AX_PROTO_MAX_TOPK : p->top_k;
	if (p->mode >= AX_MODE_MEAN_LOGIT && p->mode <= AX_MODE_HEADS)
		s->mode = p->mode;
	s->stride = p->stride ? p->stride : 1; /* policy: 0/1 = every position */
	s->max_tokens = p->max_tokens;         /* policy: 0 = unlimited */
	s->prompt = p->prompt || c->o.prefill;
	if (p->n_layer_ids)
		ax_capture_resolve_layers(AX_LAYERS_LIST, p->layer_ids, p->n_layer_ids, c->n_layers, s->layers, NULL);
	if (p->n_head_ids)
		local_heads(c, p->head_ids, p->n_head_ids, s);
}

/* Re-derive a request's settings when its policy appeared, changed or went away. */
static void refresh_settings(ax_capture *c, creq *r)
{
	const ax__policy_entry *e = ax__policy_get(&c->pol, r->rid, c->now_ns);
	uint64_t v = e ? e->version : 0;
	if (r->set_valid && v == r->pol_version)
		return;
	make_settings(c, e ? &e->p : NULL, &r->set);
	r->pol_version = v;
	r->set_valid = 1;
}

struct wanted_acc {
	ax_capture *c;
	uint64_t layers[2];
	int prefill;
};

static void add_policy_wants(const ax__policy_entry *e, void *arg)
{
	struct wanted_acc *w = arg;
	uint64_t m[2];
	if (e->ended)
		return;
	if (e->p.n_layer_ids) {
		ax_capture_resolve_layers(AX_LAYERS_LIST, e->p.layer_ids, e->p.n_layer_ids, w->c->n_layers, m, NULL);
		w->layers[0] |= m[0];
		w->layers[1] |= m[1];
	}
	w->prefill |= e->p.prompt != 0;
}

/* Tell the engine which layers' Q rows (and whether prompt rows) any request may need. */
static void update_wanted(ax_capture *c)
{
	struct wanted_acc w = {c, {c->defaults.layers[0], c->defaults.layers[1]}, c->o.prefill};
	ax__policy_foreach(&c->pol, add_policy_wants, &w);
	w.layers[0] &= c->avail[0];
	w.layers[1] &= c->avail[1];
	c->wanted_dirty = 0;
	if (c->wanted_set && w.layers[0] == c->wanted[0] && w.layers[1] == c->wanted[1] &&
	    w.prefill == c->wanted_prefill)
		return;
	c->wanted[0] = w.layers[0];
	c->wanted[1] = w.layers[1];
	c->wanted_prefill = w.prefill;
	c->wanted_set = 1;
	ax_shm_set_wanted(c->shm, c->wanted, c->wanted_prefill);
	ax_log(AX_LOG_DEBUG, TAG, "wanted layers %016llx%016llx prefill %d", (unsigned long long)c->wanted[1],
	       (unsigned long long)c->wanted[0], c->wanted_prefill);
}

/* Remember that `rid`'s policy is new: it is acknowledged once the poll's frames are read. */
static void ack_later(ax_capture *c, const char *rid)
{
	if (c->n_acks == c->acks_cap) {
		uint32_t cap = c->acks_cap ? 2 * c->acks_cap : 16;
		char(*a)[AX_PROTO_STR] = realloc(c->acks, (size_t)cap * sizeof *a);
		if (a == NULL) {
			ax_log(AX_LOG_WARN, TAG, "%s: out of memory: policy not acknowledged", rid);
			return;
		}
		c->acks = a;
		c->acks_cap = cap;
	}
	snprintf(c->acks[c->n_acks++], AX_PROTO_STR, "%s", rid);
}

static int on_policy_record(const ax_record *r, void *arg)
{
	ax_capture *c = arg;
	if (r->type != AX_REC_POLICY || r->rid[0] == '\0')
		return 0;
	int rv = ax__policy_put(&c->pol, r->rid, &r->u.policy, c->now_ns);
	if (rv >= 0) {
		CNT_ADD(c, policies, 1);
		c->wanted_dirty = 1;
	}
	if (rv == 1) /* re-publications of a policy already held are not acknowledged again */
		ack_later(c, r->rid);
	return 0;
}

/* Acknowledge the new policies: wanted layers into the segment first, then the echoes, sent now. */
static void ack_policies(ax_capture *c)
{
	if (c->n_acks == 0)
		return;
	if (c->shm) /* not attached: the attach announces the union of the live policies before any step is read */
		update_wanted(c);
	__atomic_thread_fence(__ATOMIC_RELEASE); /* the engine learns of the request only after the ack */
	for (uint32_t i = 0; i < c->n_acks; i++) {
		const ax__policy_entry *e = ax__policy_get(&c->pol, c->acks[i], c->now_ns);
		if (e == NULL)
			continue;
		ax_record *r = &c->rec;
		ax_record_init(r, AX_REC_POLICY);
		snprintf(r->rid, sizeof r->rid, "%s", e->rid);
		r->u.policy = e->p;
		emit(c, r);
		CNT_ADD(c, policy_acks, 1);
	}
	c->n_acks = 0;
	ax__sender_flush(c->snd, 0); /* seal and try to send now, never wait */
}

/* Policy frames arrive on the aio's callback (an nng thread), which queues them and wakes the loop: a sleeping loop
 * acknowledges a new policy at once (the relay holds the request until then). */
static void on_sub_recv(void *arg)
{
	ax_capture *c = arg;
	int rv = nng_aio_result(c->sub_aio);
	if (rv == NNG_ECLOSED || rv == NNG_ECANCELED)
		return;
	if (rv == 0) {
		nng_msg *m = nng_aio_get_msg(c->sub_aio);
		pthread_mutex_lock(&c->pmu);
		if (c->pq_len < AX_ARRAY_LEN(c->pq)) {
			c->pq[(c->pq_head + c->pq_len++) % AX_ARRAY_LEN(c->pq)] = m;
			m = NULL;
		}
		pthread_mutex_unlock(&c->pmu);
		if (m) { /* 256 frames unread: the relay re-publishes every live policy each 500 ms */
			ax_log(AX_LOG_WARN, TAG, "policy queue full: frame dropped");
			nng_msg_free(m);
		}
		wake_loop(c);
	}
	nng_recv_aio(c->sub, c->sub_aio);
}

static nng_msg *pq_pop(ax_capture *c)
{
	nng_msg *m = NULL;
	pthread_mutex_lock(&c->pmu);
	if (c->pq_len) {
		m = c->pq[c->pq_head];
		c->pq_head = (c->pq_head + 1) % AX_ARRAY_LEN(c->pq);
		c->pq_len--;
	}
	pthread_mutex_unlock(&c->pmu);
	return m;
}

static void poll_policies(ax_capture *c)
{
	nng_msg *m;
	while ((m = pq_pop(c)) != NULL) {
		int rv = ax_frame_decode(nng_msg_body(m), nng_msg_len(m), on_policy_record, c);
		if (rv < 0)
			ax_log(AX_LOG_WARN, TAG, "bad policy frame (%zu bytes): %s", nng_msg_len(m), ax_strerror(rv));
		nng_msg_free(m);
	}
	ack_policies(c);
}

/* ---------------------------------------------------------------------------------------------------------
 * Requests and steps.
 */

static const char *end_reason_name(uint32_t r)
{
	switch (r) {
	case AX_END_STOP: return "stop";
	case AX_END_LENGTH: return "length";
	case AX_END_ABORT: return "abort";
	default: return "error";
	}
}

/* `req` with the prompt token ids (an empty prompt and a gap if the arena no longer holds them). */
static void push_req(ax_capture *c, const creq *r, const ax_shm_request *rq)
{
	ax_record *rec = new_record(AX_REC_REQ, r->rid);
	if (rec == NULL)
		return;
	if (rq->prompt_len > 0 && rq->prompt_len <= AX_PROTO_MAX_PROMPT) {
		int32_t *p = malloc((size_t)rq->prompt_len * sizeof *p);
		if (p && ax_shm_read_tokens(c->shm, rq->prompt_pos, rq->prompt_len, p) == 0) {
			rec->u.req.prompt = p;
			rec->u.req.prompt_len = rq->prompt_len;
		} else {
			free(p);
			push_gap(c, GAP_TOKENS, 1, r->rid);
		}
	}
	push_record(c, rec);
}

/* A request that began before this attach, met at FORWARD `s`: report the generated positions it never saw
 * (a capture restarted mid-stream, or attached late). */
static void report_late_join(ax_capture *c, const creq *r, const ax_shm_request *rq, const ax_shm_step *s)
{
	uint64_t last_prompt = rq->prompt_len ? rq->prompt_len - 1 : 0;
	if (s == NULL || rq->begin_ns >= c->attach_ns || s->pos0 <= last_prompt)
		return;
	ax_record *g = new_record(AX_REC_GAP, r->rid);
	if (g == NULL)
		return;
	snprintf(g->u.gap.what, sizeof g->u.gap.what, "steps");
	snprintf(g->u.gap.reason, sizeof g->u.gap.reason, "attached_late");
	g->u.gap.count = s->pos0 - last_prompt;
	push_record(c, g);
}

/* Start tracking the request at `slot`: from BEGIN (fwd NULL), or from its first FORWARD `fwd` if BEGIN was missed. */
static creq *start_req(ax_capture *c, uint32_t slot, uint64_t req_id, const ax_shm_step *fwd)
{
	ax_shm_request rq;
	if (slot >= c->req_cap || ax_shm_read_request(c->shm, slot, req_id, &rq) != 0)
		return NULL;
	creq *r = &c->reqs[slot];
	if (r->req_id != 0) /* the previous occupant's END was lost */
		push_gap(c, GAP_RING_FULL, 1, r->rid);
	memset(r, 0, sizeof *r);
	r->req_id = req_id;
	snprintf(r->rid, sizeof r->rid, "%.*s", (int)sizeof rq.rid - 1, rq.rid);
	r->prompt_len = rq.prompt_len;
	refresh_settings(c, r);
	push_req(c, r, &rq);
	report_late_join(c, r, &rq, fwd);
	return r;
}

static creq *find_req(ax_capture *c, uint32_t slot, uint64_t req_id)
{
	return (slot < c->req_cap && c->reqs[slot].req_id == req_id) ? &c->reqs[slot] : NULL;
}

static void on_end(ax_capture *c, const ax_shm_step *s)
{
	creq *r = find_req(c, s->req_slot, s->req_id);
	if (r == NULL)
		return; /* never saw it (BEGIN and every FORWARD lost): its loss was reported as a step gap */
	ax_record *rec = new_record(AX_REC_END, r->rid);
	if (rec) {
		snprintf(rec->u.end.reason, sizeof rec->u.end.reason, "%s", end_reason_name(s->end_reason));
		rec->u.end.tokens = r->seen;
		push_record(c, rec);
		if (c->endq_len < AX_ARRAY_LEN(c->endq)) { /* drain completes s->seq (its number + 1) at emission */
			uint32_t i = (c->endq_head + c->endq_len++) % AX_ARRAY_LEN(c->endq);
			c->endq[i].rec = rec;
			c->endq[i].seq_end = s->seq;
		}
	}
	ax__policy_end(&c->pol, r->rid, c->now_ns); /* late re-publications must not bring it back */
	c->wanted_dirty = 1;
	r->req_id = 0;
}

/* Should position p of request r be captured? Counts it against max_tokens when it is a generated row. */
static int want_row(creq *r, uint64_t p)
{
	uint64_t last_prompt = r->prompt_len ? r->prompt_len - 1 : 0;
	if (p < last_prompt)
		return r->set.prompt;
	uint64_t i = p - last_prompt; /* generated token this row samples */
	if (i % r->set.stride != 0)
		return 0;
	if (r->set.max_tokens && r->captured >= r->set.max_tokens)
		return 0;
	r->captured++;
	return 1;
}

/* The index row a FORWARD step names, or NULL (and a gap) if this attachment's backend cannot read it; *bs: 0 for a
 * token index row, the block size of a block-table row (shm/README.md, "Paged layouts"). */
static const uint8_t *index_row(ax_capture *c, const ax_shm_step *s, uint32_t *dtype, uint32_t *bs)
{
	uint32_t nb;
	const ax_shm_buffer *bufs = ax_shm_buffers(c->shm, &nb);
	const uint8_t *base = s->index_buf < nb ? buf_base(c, s->index_buf) : NULL;
	if (s->index_buf >= nb || base == NULL)
		return NULL;
	const ax_shm_buffer *b = &bufs[s->index_buf];
	size_t es = ax_dtype_size(b->dtype);
	*bs = b->kind == AX_BUF_INDEX_PAGED ? ax_shm_block_size(b) : 0;
	if ((b->kind != AX_BUF_INDEX_TOKEN && *bs == 0) || b->ndim != 2 || b->stride[1] != 1 ||
	    (b->dtype != AX_DTYPE_I32 && b->dtype != AX_DTYPE_I64) || (*bs && b->dtype != AX_DTYPE_I32))
		return NULL;
	*dtype = b->dtype;
	return base + (uint64_t)s->index_row * b->stride[0] * es;
}

typedef struct rowctx {
	const ax_shm_step *s;
	creq *r;
	const uint8_t *index;
	uint32_t index_dtype;
	uint32_t block_size;        /* 0: token index row; else a block-table row of this block size */
	uint32_t n_step_layers;
} rowctx;

/* How layer pool k is read through an index row of block size bs (0: token): j's key fields. -ENOTSUP where it
 * cannot be (a 4-D pool of another block size, a token row over a 4-D pool whose blocks are not evenly strided, a
 * 3-D pool smaller than one block). */
static int job_keys(const klayer *k, uint32_t bs, ax_attn_job *j)
{
	memcpy(j->k_stride, k->stride, sizeof j->k_stride);
	j->n_slots = k->n_slots;
	if (bs == 0 && k->bsize == 0)
		return 0;
	if (bs == 0) { /* blocks × bsize slots */
		if (k->bstride != (uint64_t)k->bsize * k->stride[0])
			return -ENOTSUP;
		j->n_slots = k->n_slots * k->bsize; /* within the validated extent: no overflow */
		return 0;
	}
	j->index_kind = AX_ATTN_INDEX_PAGED;
	j->block_size = bs;
	j->n_slots = 0;
	j->n_blocks = k->bsize ? k->n_slots : k->n_slots / bs; /* a 3-D pool: block b = slots b·bs .. */
	j->k_block_stride = k->bsize ? k->bstride : bs * k->stride[0];
	return (k->bsize && k->bsize != bs) || j->n_blocks == 0 ? -ENOTSUP : 0;
}

/* Can layer l's pool be read through this step's index row? */
static int layer_readable(const ax_capture *c, const rowctx *x, uint32_t l)
{
	ax_attn_job j;
	memset(&j, 0, sizeof j);
	return c->k[l].ok && job_keys(&c->k[l], x->block_size, &j) == 0;
}

/* Queue the job for (token t of the step, its li-th exported layer = layer l). */
static void submit_job(ax_capture *c, const rowctx *x, uint32_t t, uint32_t li, uint32_t l)
{
	const settings *set = &x->r->set;
	if (set->mode == AX_MODE_HEADS && set->no_heads)
		return;
	ax__item *it = c->cuda_active ? cuda_reserve(c) : reserve_wait(c);
	ax_attn_job *j = &it->job;
	const ax_shm_header *h = c->hdr;
	uint64_t q_abs = x->s->q_row + (uint64_t)t * x->n_step_layers + li;
	memset(j, 0, sizeof *j);
	j->q = c->qbase + (q_abs % c->q_rows) * c->q_row_elems * ax_dtype_size(c->q_dtype);
	j->q_dtype = c->q_dtype;
	j->k = c->k[l].base;
	j->k_dtype = c->k[l].dtype;
	j->k_scale = c->k[l].scale;
	job_keys(&c->k[l], x->block_size, j); /* on_forward checked it (layer_readable) */
	j->index = x->index;
	j->index_dtype = x->index_dtype;
	j->position = x->s->pos0 + t;
	j->window = h->window;
	j->n_q_heads = h->n_q_heads;
	j->n_kv_heads = h->n_kv_heads;
	j->head_dim = h->head_dim;
	j->head_offset = h->head_offset;
	j->scale = h->scale;
	j->logit_cap = h->logit_cap;
	j->mode = set->mode;
	j->top_k = set->top_k;
	if (set->mode == AX_MODE_HEADS && set->n_heads) {
		memcpy(it->heads, set->heads, set->n_heads * sizeof *set->heads);
		j->heads = it->heads;
		j->n_heads = set->n_heads;
	}
	it->n_res = ax_attn_rows(j);
	if (!c->cuda_active && ax__pool_item_results(it, it->n_res) != 0) { /* CUDA: sized when the batch runs */ /* out of memory: an empty record item keeps order */
		c->failed_rows += it->n_res;
		it->kind = AX_ITEM_RECORD;
		it->rec = NULL;
		ax__pool_commit(c->pool);
		return;
	}
	it->kind = AX_ITEM_ATTN;
	memcpy(it->rid, x->r->rid, sizeof it->rid);
	it->position = (int64_t)j->position;
	it->decode_step = x->s->decode_step;
	it->token_id = c->tok[t];
	it->layer = (int32_t)l;
	it->prefill = (x->s->flags & AX_STEP_F_PREFILL) != 0;
	it->q_row = q_abs;
	it->req_id = x->s->req_id; /* for ax_shm_check_keys (see emit_attn) */
	it->generation = c->generation;
	if (c->cuda_active)
		ax__cuda_be_commit(c->cuda);
	else
		ax__pool_commit(c->pool);
	CNT_ADD(c, rows, 1);
}

static int ensure_tokens(ax_capture *c, uint32_t n)
{
	if (n <= c->tok_cap)
		return 0;
	int32_t *t = realloc(c->tok, (size_t)n * sizeof *t);
	if (t == NULL)
		return -ENOMEM;
	c->tok = t;
	c->tok_cap = n;
	return 0;
}

static void on_forward(ax_capture *c, const ax_shm_step *s)
{
	CNT_ADD(c, steps, 1);
	creq *r = find_req(c, s->req_slot, s->req_id);
	if (r == NULL && (r = start_req(c, s->req_slot, s->req_id, s)) == NULL) {
		c->step_gaps[GAP_LATE]++; /* the request ended before we could read it */
		return;
	}
	refresh_settings(c, r);
	rowctx x = {.s = s, .r = r, .n_step_layers = (uint32_t)(__builtin_popcountll(s->layers[0]) +
								  __builtin_popcountll(s->layers[1]))};
	if (c->qbase == NULL || (x.index = index_row(c, s, &x.index_dtype, &x.block_size)) == NULL) {
		c->step_gaps[GAP_UNSUPPORTED]++;
		return;
	}
	if (ensure_tokens(c, s->n_tokens) != 0 || ax_shm_read_tokens(c->shm, s->tok_pos, s->n_tokens, c->tok) != 0) {
		c->step_gaps[GAP_TOKENS]++;
		return;
	}
	uint32_t unreadable = 0; /* wanted layers whose pool this step's index cannot address (paged block sizes) */
	for (uint32_t t = 0; t < s->n_tokens; t++) {
		uint64_t p = s->pos0 + t;
		if (p + 1 > r->seen)
			r->seen = p + 1;
		if (!want_row(r, p))
			continue;
		uint32_t li = 0;
		for (uint32_t l = 0; l < c->n_layers; l++) {
			if (!(s->layers[l / 64] >> (l % 64) & 1))
				continue;
			if ((r->set.layers[l / 64] >> (l % 64) & 1) && c->k[l].ok) {
				if (layer_readable(c, &x, l))
					submit_job(c, &x, t, li, l);
				else
					unreadable++;
			}
			li++;
		}
	}
	if (unreadable)
		c->step_gaps[GAP_UNSUPPORTED]++;
}

static void on_step(ax_capture *c, const ax_shm_step *s)
{
	switch (s->kind) {
	case AX_STEP_BEGIN:
		if (find_req(c, s->req_slot, s->req_id) == NULL && start_req(c, s->req_slot, s->req_id, NULL) == NULL)
			c->step_gaps[GAP_LATE]++;
		break;
	case AX_STEP_FORWARD:
		on_forward(c, s);
		break;
	case AX_STEP_END:
		on_end(c, s);
		break;
	default:
		c->step_gaps[GAP_INVALID]++;
		break;
	}
}

/* ---------------------------------------------------------------------------------------------------------
 * Attachment.
 */

static void detach(ax_capture *c)
{
	__atomic_store_n(&c->wake_shm, NULL, __ATOMIC_SEQ_CST);
	while (__atomic_load_n(&c->wakers, __ATOMIC_ACQUIRE))
		sched_yield(); /* a waker still holds the old handle */
	cuda_detach(c); /* unmap the engine's GPU buffers before the segment naming them */
	ax_shm_detach(c->shm);
	c->shm = NULL;
	c->hdr = NULL;
	free(c->reqs);
	free(c->k);
	c->reqs = NULL;
	c->k = NULL;
	c->qbase = NULL;
	c->req_cap = c->n_layers = 0;
	c->wanted_set = 0;
	c->endq_len = 0; /* descriptor numbers of the old segment */
}

/* K pool of layer l: [slots, H_kv, D] or paged [blocks, block_size, H_kv, D], unit dim stride, a float dtype. */
static int setup_k(ax_capture *c, uint32_t l)
{
	uint32_t nb;
	const ax_shm_buffer *bufs = ax_shm_buffers(c->shm, &nb);
	int idx = ax_shm_find_buffer(c->shm, AX_BUF_K_POOL, (int32_t)l);
	if (idx < 0)
		return -ENOENT;
	const ax_shm_buffer *b = &bufs[idx];
	const uint8_t *base = buf_base(c, (uint32_t)idx);
	if (base == NULL)
		return base_err(c, b);
	uint32_t p = b->ndim == 4; /* paged [blocks, block_size, H_kv, D]: the last three dims as a 3-D pool's */
	if ((b->ndim != 3 && !p) || b->dim[1 + p] != c->hdr->n_kv_heads || b->dim[2 + p] != c->hdr->head_dim ||
	    b->stride[2 + p] != 1 || ax_dtype_size(b->dtype) == 0 || b->dtype == AX_DTYPE_I32 ||
	    b->dtype == AX_DTYPE_I64)
		return -EINVAL;
	klayer *k = &c->k[l];
	k->base = base;
	memcpy(k->stride, b->stride + p, sizeof k->stride);
	k->n_slots = b->dim[0];
	k->bsize = p ? ax_shm_block_size(b) : 0;
	k->bstride = p ? b->stride[0] : 0;
	k->dtype = b->dtype;
	k->scale = b->scale != 0 ? b->scale : 1.0f;
	k->ok = 1;
	c->avail[l / 64] |= 1ull << (l % 64);
	return 0;
}

/* The Q ring: host memory, [rows, H_q, D] with contiguous rows. */
static int setup_q(ax_capture *c)
{
	uint32_t nb;
	const ax_shm_buffer *bufs = ax_shm_buffers(c->shm, &nb);
	int idx = ax_shm_find_buffer(c->shm, AX_BUF_Q_RING, -1);
	if (idx < 0)
		return -ENOENT;
	const ax_shm_buffer *b = &bufs[idx];
	const uint8_t *base = buf_base(c, (uint32_t)idx);
	if (base == NULL)
		return base_err(c, b);
	if (b->ndim != 3 || b->dim[0] == 0 || b->dim[1] != c->hdr->n_q_heads || b->dim[2] != c->hdr->head_dim ||
	    b->stride[2] != 1 || b->stride[1] != c->hdr->head_dim ||
	    (b->dtype != AX_DTYPE_F32 && b->dtype != AX_DTYPE_F16 && b->dtype != AX_DTYPE_BF16))
		return -EINVAL;
	c->qbase = base;
	c->q_rows = b->dim[0];
	c->q_row_elems = b->stride[0];
	c->q_dtype = b->dtype;
	return 0;
}

static void log_layer_problems(ax_capture *c, int qrv)
{
	const char *be = c->cuda_active ? "CUDA" : "CPU";
	if (qrv < 0)
		ax_log(AX_LOG_ERROR, TAG, "Q ring unusable by the %s backend (%s): nothing will be captured", be,
		       qrv == -ENOTSUP ? (c->cuda_active ? "in host memory; the CUDA backend reads GPU memory only: use --backend "
					   "auto or cpu" : "in CUDA memory; needs --backend cuda")
		       : qrv == -EIO ? ax__cuda_be_import_error(c->cuda) : ax_strerror(qrv));
	uint32_t missing = 0;
	for (uint32_t l = 0; l < c->n_layers; l++)
		missing += (c->defaults.layers[l / 64] >> (l % 64) & 1) && !c->k[l].ok;
	if (missing)
		ax_log(AX_LOG_WARN, TAG, "%u selected layers have no K pool the %s backend can read%s%s (K pools the "
		       "engine registers later are taken up)", missing, be, c->cuda_active ? ": " : "",
		       c->cuda_active ? ax__cuda_be_import_error(c->cuda) : "");
}

static int setup_attachment(ax_capture *c)
{
	c->hdr = ax_shm_hdr(c->shm);
	c->generation = c->hdr->generation;
	c->n_layers = c->hdr->n_layers < AX_SHM_MAX_LAYERS ? c->hdr->n_layers : AX_SHM_MAX_LAYERS;
	c->req_cap = c->hdr->req_cap;
	c->reqs = calloc(c->req_cap ? c->req_cap : 1, sizeof *c->reqs);
	c->k = calloc(c->n_layers ? c->n_layers : 1, sizeof *c->k);
	if (c->reqs == NULL || c->k == NULL)
		return -ENOMEM;
	c->avail[0] = c->avail[1] = 0;
	c->bufs_seen = __atomic_load_n(&c->hdr->buf_count, __ATOMIC_ACQUIRE); /* before the lookups: none missed */
	cuda_attach(c);
	int qrv = setup_q(c);
	for (uint32_t l = 0; qrv == 0 && l < c->n_layers; l++)
		setup_k(c, l);
	make_defaults(c);
	log_layer_problems(c, qrv);
	ax_shm_stats st;
	ax_shm_get_stats(c->shm, &st);
	c->last_torn = st.torn;
	return 0;
}

/* A relay that starts (or restarts) after the attach has missed the hello; it needs the shape and default layers
 * to know when a position's records are complete, so the hello is repeated this often while attached. */
#define HELLO_EVERY_NS (5000ull * MS)

static void send_hello(ax_capture *c)
{
	const ax_shm_header *h = c->hdr;
	ax_record *r = &c->rec;
	ax_record_init(r, AX_REC_HELLO);
	ax_rec_hello *e = &r->u.hello;
	snprintf(e->engine, sizeof e->engine, "%.*s", (int)sizeof h->engine, h->engine);
	snprintf(e->model, sizeof e->model, "%.*s", (int)sizeof h->model, h->model);
	snprintf(e->backend, sizeof e->backend, "%s", c->cuda_active ? "cuda" : "cpu");
	e->rank = h->rank;
	e->world_size = h->world_size;
	e->n_layers = h->n_layers;
	e->n_q_heads = h->n_q_heads;
	e->n_kv_heads = h->n_kv_heads;
	e->head_offset = h->head_offset;
	e->head_dim = h->head_dim;
	e->top_k = c->o.top_k;
	e->mode = c->o.mode;
	for (uint32_t l = 0; l < c->n_layers && e->n_layer_ids < AX_PROTO_MAX_LIST; l++)
		if (c->defaults.layers[l / 64] >> (l % 64) & 1)
			e->layer_ids[e->n_layer_ids++] = (int32_t)l;
	e->generation = h->generation & INT64_MAX; /* the schema keeps integers within int64 */
	emit(c, r);
}

#define NOQ_WARN_NS (5000ull * MS) /* a segment without a Q ring this long: a warning */

static void try_attach(ax_capture *c)
{
	if (c->now_ns < c->next_attach_ns)
		return;
	c->next_attach_ns = c->now_ns + c->o.attach_retry_ms * MS;
	int rv = ax_shm_attach(&c->shm, c->o.shm_name);
	if (rv < 0) {
		c->shm = NULL;
		if (c->attach_err_logged != rv)
			ax_log(rv == -ENOENT || rv == -EAGAIN ? AX_LOG_INFO : AX_LOG_WARN, TAG,
			       "waiting for engine segment %s (%s); retrying every %u ms", c->o.shm_name,
			       ax_strerror(rv), c->o.attach_retry_ms);
		c->attach_err_logged = rv;
		return;
	}
	const ax_shm_header *h = ax_shm_hdr(c->shm);
	if (h->generation == c->dead_generation && ax_shm_alive(c->shm, c->o.dead_after_ms * MS) != 1) {
		ax_shm_detach(c->shm); /* the segment of the engine we left: wait for a new one */
		c->shm = NULL;
		return;
	}
	if (ax_shm_find_buffer(c->shm, AX_BUF_Q_RING, -1) < 0) {
		/* the engine opened its segment and is still registering its buffers: attached now, the backend and the
		 * layers would be chosen from a partial table; the next try sees the rest. Said once, and again as a
		 * warning if it lasts (an engine that never registers a Q ring cannot be captured) */
		if (c->attach_err_logged != -EINPROGRESS && c->attach_err_logged != -ETIMEDOUT) {
			ax_log(AX_LOG_INFO, TAG, "engine segment %s has no Q ring yet (the engine is registering its "
			       "buffers); retrying every %u ms", c->o.shm_name, c->o.attach_retry_ms);
			c->attach_err_logged = -EINPROGRESS;
			c->noq_since_ns = c->now_ns;
		} else if (c->attach_err_logged == -EINPROGRESS && c->now_ns - c->noq_since_ns > NOQ_WARN_NS) {
			ax_log(AX_LOG_WARN, TAG, "engine segment %s has had no Q ring for %u s: nothing can be captured "
			       "until the engine registers one", c->o.shm_name, (unsigned)(NOQ_WARN_NS / 1000000000ull));
			c->attach_err_logged = -ETIMEDOUT;
		}
		ax_shm_detach(c->shm);
		c->shm = NULL;
		return;
	}
	if (setup_attachment(c) < 0) {
		ax_log(AX_LOG_ERROR, TAG, "out of memory attaching to %s", c->o.shm_name);
		detach(c);
		return;
	}
	c->attach_err_logged = 0;
	c->dead_since_ns = 0;
	__atomic_store_n(&c->wake_shm, c->shm, __ATOMIC_SEQ_CST);
	c->attach_ns = ax_now_ns();
	CNT_ADD(c, attaches, 1);
	ax_log(AX_LOG_INFO, TAG, "attached to %s: %.32s (%.96s), %u layers, %u/%u heads, D %u, generation %llx",
	       c->o.shm_name, h->engine, h->model, h->n_layers, h->n_q_heads, h->n_kv_heads, h->head_dim,
	       (unsigned long long)h->generation);
	send_hello(c);
	c->next_hello_ns = c->now_ns + HELLO_EVERY_NS;
	update_wanted(c);
	ax_shm_heartbeat(c->shm);
}

/* The engine went away: report the requests we were following, finish queued jobs, let go of the segment. */
static void leave_engine(ax_capture *c, const char *why, const char *reason)
{
	ax_log(AX_LOG_WARN, TAG, "engine on %s %s; waiting for it to come back", c->o.shm_name, why);
	flush_step_gaps(c);
	drain_all(c);
	for (uint32_t i = 0; i < c->req_cap; i++)
		if (c->reqs[i].req_id != 0) {
			emit_gap(c, "requests", reason, 1, c->reqs[i].rid);
			c->reqs[i].req_id = 0;
		}
	c->dead_generation = c->generation;
	detach(c);
	CNT_ADD(c, restarts, 1);
	c->next_attach_ns = 0;
}

static int engine_closed(ax_capture *c)
{
	return __atomic_load_n(&c->hdr->state, __ATOMIC_ACQUIRE) == 2 || ax_shm_alive(c->shm, UINT64_MAX) == -ESTALE;
}

/* Take up to `budget` descriptors. Returns how many were taken. */
static int pump_ring(ax_capture *c, int budget)
{
	if (c->cuda_active && c->o.may_reexec && ax__cuda_be_need_new_process(c->cuda)) { /* main.c re-executes */
		leave_engine(c, "is unreadable: the CUDA device needs a new process after a sticky error",
			     "cuda_restart");
		c->reexec = 1;
		return 0;
	}
	if (c->cuda_active && ax__cuda_be_lost(c->cuda, c->now_ns)) { /* CUDA device reset: attach afresh */
		leave_engine(c, "is unreadable after a CUDA device reset", "cuda_reset");
		return 0;
	}
	int n = 0;
	for (; n < budget && c->shm; n++) {
		ax_shm_step st;
		uint64_t lost = 0;
		int rv = ax_shm_next(c->shm, &st, &lost);
		if (lost) {
			c->step_gaps[GAP_RING_FULL] += lost;
			CNT_ADD(c, ring_lost, lost);
		}
		if (rv == 0)
			break;
		CNT_ADD(c, descriptors, 1);
		if (rv == 1) {
			on_step(c, &st);
		} else if (rv == -ESTALE) { /* restarted, closed, or counters that went backwards: attach afresh */
			leave_engine(c, engine_closed(c) ? "restarted or closed" : "reset its step ring", "restart");
			return n;
		} else { /* -EBADMSG: rejected or torn (skipped by shm); anything else: treat alike */
			ax_shm_stats ss;
			ax_shm_get_stats(c->shm, &ss);
			c->step_gaps[ss.torn != c->last_torn ? GAP_TORN : GAP_INVALID]++;
			c->last_torn = ss.torn;
			CNT_ADD(c, rejected, 1);
		}
	}
	if (c->shm)
		flush_step_gaps(c);
	return n;
}

/* K pools registered after the attach (the SGLang and HF hooks register a layer's at its first forward): when the
 * segment's buffer count has grown, the layers without one are looked up again; those found join the wanted layers
 * (the engine then exports their rows). */
static void take_new_layers(ax_capture *c)
{
	const uint32_t n = __atomic_load_n(&c->hdr->buf_count, __ATOMIC_ACQUIRE);
	if (n == c->bufs_seen || c->qbase == NULL)
		return;
	c->bufs_seen = n;
	uint32_t found = 0;
	for (uint32_t l = 0; l < c->n_layers; l++)
		found += !c->k[l].ok && setup_k(c, l) == 0;
	if (found == 0)
		return;
	ax_log(AX_LOG_INFO, TAG, "%u more layers readable (K pools registered after the attach)", found);
	c->wanted_dirty = 1;
}

static void check_engine(ax_capture *c)
{
	if (__atomic_load_n(&c->hdr->state, __ATOMIC_ACQUIRE) == 2) {
		pump_ring(c, 1 << 20); /* read what it published before closing */
		if (c->shm)
			leave_engine(c, "closed its segment", "restart");
		return;
	}
	int rv = ax_shm_alive(c->shm, c->o.dead_after_ms * MS);
	if (rv == -ESTALE) {
		leave_engine(c, "restarted (generation changed)", "restart");
	} else if (rv == 0) {
		if (c->dead_since_ns == 0)
			c->dead_since_ns = c->now_ns;
		else if (c->now_ns - c->dead_since_ns > c->o.dead_after_ms * MS)
			leave_engine(c, "stopped its heartbeat", "restart");
	} else {
		c->dead_since_ns = 0;
		take_new_layers(c);
	}
}

/* ---------------------------------------------------------------------------------------------------------
 * Periodic work.
 */

static void send_stats(ax_capture *c)
{
	ax_capture_stats st;
	ax_capture_get_stats(c, &st);
	ax__cuda_be_recovery rs; /* sticky-error recovery in this process image (capture/README.md) */
	ax__cuda_be_recovery_get(c->cuda, &rs);
	ax_record *r = &c->rec;
	ax_record_init(r, AX_REC_STATS);
	const struct { const char *name; uint64_t v; } kv[] = {
		{"steps", st.steps},       {"rows", st.rows},         {"records", st.records},
		{"dropped", st.dropped},   {"gaps", st.gaps},         {"rejected", st.rejected},
		{"busy_ns", st.busy_ns},   {"ring_lost", st.ring_lost}, {"lapped", st.lapped},
		{"job_errors", st.job_errors}, {"attaches", st.attaches}, {"restarts", st.restarts},
		{"policies", st.policies}, {"policy_acks", st.policy_acks}, {"sent_frames", st.sent_frames},
		{"cuda_rejected", st.cuda_rejected}, {"recycled", c->recycled_total},
		{"cuda_sticky", rs.sticky}, {"cuda_resets", rs.resets}, {"cuda_reset_failed", rs.reset_failed},
		{"cuda_reexecs", c->o.reexecs},
	};
	for (size_t i = 0; i < AX_ARRAY_LEN(kv) && i < AX_PROTO_MAX_STATS; i++) {
		snprintf(r->u.stats.kv[i].name, sizeof r->u.stats.kv[i].name, "%s", kv[i].name);
		r->u.stats.kv[i].value = kv[i].v;
		r->u.stats.n++;
	}
	emit(c, r);
}

static void service(ax_capture *c)
{
	uint64_t now = c->now_ns;
	ax__sender_poll(c->snd, now);
	poll_policies(c);
	if (now >= c->next_sweep_ns) {
		if (ax__policy_expire(&c->pol, now))
			c->wanted_dirty = 1;
		c->next_sweep_ns = now + 500 * MS;
	}
	if (c->shm && c->wanted_dirty)
		update_wanted(c);
	if (c->shm && now >= c->next_hb_ns) {
		ax_shm_heartbeat(c->shm);
		c->next_hb_ns = now + 250 * MS;
	}
	if (c->shm && now >= c->next_alive_ns) {
		check_engine(c);
		c->next_alive_ns = now + 200 * MS;
	}
	if (c->shm && now >= c->next_hello_ns) {
		send_hello(c);
		c->next_hello_ns = now + HELLO_EVERY_NS;
	}
	if (c->o.stats_interval_ms && now >= c->next_stats_ns) {
		if (c->next_stats_ns != 0)
			send_stats(c);
		c->next_stats_ns = now + c->o.stats_interval_ms * MS;
	}
}

/* How long the loop may sleep: until the earliest timer (heartbeat, liveness, hello, policy sweep, stats, the
 * sender's batch deadline or retry), at most idle_ms. Steps, finished worker jobs, policy frames and
 * ax_capture_stop wake it sooner. */
static uint64_t idle_timeout(ax_capture *c)
{
	uint64_t now = c->now_ns, t = (c->o.idle_ms ? c->o.idle_ms : 100) * MS;
	const uint64_t at[] = {c->next_hb_ns, c->next_alive_ns, c->next_hello_ns, c->next_sweep_ns,
			       c->o.stats_interval_ms ? c->next_stats_ns : UINT64_MAX};
	for (size_t i = 0; i < AX_ARRAY_LEN(at); i++) {
		if (at[i] <= now)
			return 0;
		if (at[i] - now < t)
			t = at[i] - now;
	}
	uint64_t snd = ax__sender_due_in(c->snd, now);
	return snd < t ? snd : t;
}

/* Nothing happened this iteration: sleep on the segment until the engine publishes a step, a worker finishes, a
 * policy frame comes, or the next timer; not attached, retry the attach every few milliseconds. */
static void idle_wait(ax_capture *c)
{
	if (c->idle_since_ns == 0)
		c->idle_since_ns = c->now_ns;
	if (c->shm == NULL) {
		struct timespec ts = {0, 5000000};
		nanosleep(&ts, NULL);
		return;
	}
	ax_shm_wait(c->shm, idle_timeout(c));
}

/* ---------------------------------------------------------------------------------------------------------
 * Public API.
 */

static void default_src(ax_capture *c)
{
	char host[64] = "localhost";
	gethostname(host, sizeof host - 1);
	host[sizeof host - 1] = '\0';
	snprintf(c->o.src, sizeof c->o.src, "capture:%.60s:%d:%d", host, (int)getpid(), c->o.rank < 0 ? 0 : c->o.rank);
}

static int check_opts(const ax_capture_opts *o)
{
	if (o->top_k < 1 || o->top_k > AX_PROTO_MAX_TOPK || o->stride < 1 || o->threads < 1 ||
	    o->mode < AX_MODE_MEAN_LOGIT || o->mode > AX_MODE_HEADS || o->max_pending_frames < 2 ||
	    o->queue_cap < 2 || o->shm_name[0] != '/' || o->records_addr[0] == '\0' || o->attach_retry_ms == 0)
		return -EINVAL;
	if (o->backend == AX_BACKEND_CUDA && ax__cuda_be_devices() <= 0) {
		ax_log(AX_LOG_ERROR, TAG, "--backend cuda: %s", ax__cuda_be_why());
		return -ENOTSUP;
	}
	if (o->backend == AX_BACKEND_CUDA && o->device >= ax__cuda_be_devices()) {
		ax_log(AX_LOG_ERROR, TAG, "--device %d: this machine has %d CUDA devices", o->device, ax__cuda_be_devices());
		return -EINVAL;
	}
	return 0;
}

static int open_sub(ax_capture *c)
{
	if (c->o.policy_addr[0] == '\0')
		return 0;
	int rv = nng_sub0_open(&c->sub);
	if (rv != 0)
		return -EIO;
	c->sub_open = 1;
	if (nng_aio_alloc(&c->sub_aio, on_sub_recv, c) != 0)
		return -ENOMEM;
	nng_socket_set(c->sub, NNG_OPT_SUB_SUBSCRIBE, "", 0);
	nng_socket_set_ms(c->sub, NNG_OPT_RECONNMINT, 50);
	nng_socket_set_ms(c->sub, NNG_OPT_RECONNMAXT, 500);
	if ((rv = nng_dial(c->sub, c->o.policy_addr, NULL, NNG_FLAG_NONBLOCK)) != 0) {
		ax_log(AX_LOG_ERROR, TAG, "cannot dial policy address %s: %s", c->o.policy_addr, nng_strerror(rv));
		return rv == NNG_EADDRINVAL || rv == NNG_ENOTSUP ? -EINVAL : -EIO;
	}
	nng_recv_aio(c->sub, c->sub_aio);
	return 0;
}

int ax_capture_open(ax_capture **out, const ax_capture_opts *o)
{
	int rv = check_opts(o);
	if (rv < 0)
		return rv;
	ax_capture *c = calloc(1, sizeof *c);
	if (c == NULL)
		return -ENOMEM;
	c->o = *o;
	pthread_mutex_init(&c->pmu, NULL);
	if (c->o.src[0] == '\0')
		default_src(c);
	if ((rv = ax__policy_init(&c->pol)) < 0)
		goto fail;
	if ((rv = ax__pool_open(&c->pool, o->threads, o->queue_cap)) < 0)
		goto fail;
	ax__pool_set_inline(c->pool, o->inline_kmacs < 0 ? 0 : (o->inline_kmacs ? (uint64_t)o->inline_kmacs : 256) * 1000);
	ax__pool_set_notify(c->pool, pool_done, c);
	ax__sender_cfg sc = {.addr = o->records_addr, .src = c->o.src, .max_pending = o->max_pending_frames,
			     .pending_max_ns = (uint64_t)o->pending_max_ms * MS};
	if ((rv = ax__sender_open(&c->snd, &sc)) < 0)
		goto fail;
	if ((rv = open_sub(c)) < 0)
		goto fail;
	*out = c;
	return 0;
fail:
	ax_capture_close(c);
	return rv;
}

int ax_capture_run(ax_capture *c)
{
	ax_log(AX_LOG_INFO, TAG, "%s: segment %s, records → %s, policy ← %s, %u workers", c->o.src, c->o.shm_name,
	       c->o.records_addr, c->o.policy_addr[0] ? c->o.policy_addr : "(none)", c->o.threads);
	while (!__atomic_load_n(&c->stop, __ATOMIC_ACQUIRE) && !c->reexec) {
		c->now_ns = ax_now_ns();
		int busy = 0, taken = 0;
		if (c->shm == NULL)
			try_attach(c);
		else
			busy += taken = pump_ring(c, 256);
		busy += drain(c);
		if (c->shm && ax__pool_count(c->pool) == 0 && !(c->cuda_active && ax__cuda_be_pending(c->cuda))) {
			ax_shm_complete(c->shm, ax_shm_taken(c->shm)); /* every descriptor taken is done (shm rule 9) */
			c->endq_len = 0;
		}
		/* Ring empty and every job done: this step's records leave now, in one frame, without a timer wake-up. */
		if (busy && taken < 256 && ax__pool_count(c->pool) == 0)
			ax__sender_flush(c->snd, 0);
		service(c);
		if (busy)
			c->idle_since_ns = 0;
		else
			idle_wait(c);
	}
	c->now_ns = ax_now_ns();
	if (c->shm) {
		flush_step_gaps(c);
		drain_all(c);
		for (uint32_t i = 0; i < c->req_cap; i++)
			if (c->reqs[i].req_id != 0)
				emit_gap(c, "requests", "capture_stop", 1, c->reqs[i].rid);
	}
	if (c->o.stats_interval_ms)
		send_stats(c);
	uint32_t left = ax__sender_flush(c->snd, 500 * MS);
	if (left)
		ax_log(AX_LOG_WARN, TAG, "stopping with %u frames the relay did not take", left);
	if (c->shm)
		detach(c);
	if (c->reexec) { /* at most once: a caller that cannot re-execute runs again with the backoff retries */
		c->reexec = 0;
		c->o.may_reexec = 0;
		ax_log(AX_LOG_WARN, TAG, "released the segment and the CUDA device for a new process");
		return AX_CAPTURE_REEXEC;
	}
	ax_log(AX_LOG_INFO, TAG, "stopped");
	return 0;
}

void ax_capture_stop(ax_capture *c)
{
	__atomic_store_n(&c->stop, 1, __ATOMIC_RELEASE);
	wake_loop(c);
}

void ax_capture_close(ax_capture *c)
{
	if (c == NULL)
		return;
	ax__pool_close(c->pool); /* joins workers before the mapping goes */
	if (c->shm)
		detach(c);
	ax__cuda_be_close(c->cuda);
	if (c->sub_aio)
		nng_aio_stop(c->sub_aio); /* waits for a callback in progress; a re-armed receive is cancelled */
	if (c->sub_open)
		nng_close(c->sub);
	nng_aio_free(c->sub_aio);
	for (uint32_t i = 0; i < c->pq_len; i++)
		nng_msg_free(c->pq[(c->pq_head + i) % AX_ARRAY_LEN(c->pq)]);
	pthread_mutex_destroy(&c->pmu);
	ax__sender_close(c->snd);
	ax__policy_fini(&c->pol);
	free(c->acks);
	free(c->tok);
	free(c);
}

void ax_capture_get_stats(ax_capture *c, ax_capture_stats *out)
{
	const uint64_t *src = (const uint64_t *)&c->cnt;
	uint64_t *dst = (uint64_t *)out;
	for (size_t i = 0; i < sizeof *out / sizeof(uint64_t); i++)
		dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
	ax__sender_stats ss;
	ax__sender_get_stats(c->snd, &ss);
	out->sent_frames = ss.frames;
	out->dropped = ss.dropped;
	out->gaps += ss.gaps;
	out->busy_ns = ax__pool_busy_ns(c->pool) + ax__cuda_be_busy_ns(c->cuda);
	ax__cuda_be_counts(c->cuda, &out->cuda_rejected, NULL);
}
