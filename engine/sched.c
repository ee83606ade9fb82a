/*
 * sched.c — the engine: requests, continuous batching and the shm export.
 *
 * HTTP threads submit requests into a pending queue and then block on their request's event queue. One
 * scheduler thread owns the model, the KV cache and the export handle. Each iteration it admits pending
 * requests into free index-table rows (BEGIN is exported with the prompt ids), builds ONE forward step over all
 * active requests — one decode token for every request past its prompt, then prefill chunks of the others
 * within a token budget — runs it, samples the rows that produce a token, pushes events, and retires finished
 * requests (END is exported). A request that joins or leaves changes only the next step: that is continuous
 * batching.
 *
 * Retired rows: attnx-capture reads keys through the index table AFTER the step that wrote them, often after
 * the request's END (its workers run behind the engine). Releasing a finished request's slots at once would
 * hand the capture index values of -1 (its last rows lost as `invalid`) or, worse, keys of the next request
 * that reuses those slots. So an exported request's row and slots are only retired at the end: they stay
 * intact until the row or the slots are needed, oldest first. The index table has 2 × max_batch rows for
 * that, and the KV pool is sized for max_batch full contexts, so retirement never costs capacity: a retired
 * row is released the moment admission or a slot allocation would otherwise fail — the oldest one whose END the
 * capture has finished (ax_export_consumer_done), else the oldest, never waiting; ax_export_request_freed tells
 * the capture first, which then reports any row it computes later as a `recycled` gap (shm/README.md rule 9).
 *
 * Export (DESIGN §2): the K pools of every layer and the token-level index table are allocated IN the shm
 * segment's data region and handed to the KV cache, so the capture reads the engine's own keys, zero copy.
 * Per step and request the engine publishes one FORWARD descriptor per prefill chunk / decode token, with Q
 * rows (post q_norm and RoPE) in the Q ring for the layers the consumer asked for, and for prefill tokens only
 * when it asked for them (the last prompt row is always sent). Every export call is non-blocking; a full ring or
 * table only drops descriptors, never delays a token.
 *
 * Threads while a consumer is attached: attnx-capture does its work right when a step is published, i.e. when
 * the next step's forward starts on every core; on a machine whose cores all run the forward it preempts one
 * pool thread, and every job of the pass then waits for that thread (BENCH.md: b1 at 0.70 of capture-off on 2
 * cores). So when the thread count was not given (cfg.threads ≤ 0, or cfg.spare_core > 0), the step that finds
 * a consumer attached (ax_export_wanted, once per step) runs its forward on one thread fewer, leaving that core
 * to the consumer, and the first step without one takes it back (adapt_threads). Only from AX_SPARE_MIN_THREADS
 * threads up by default: with n threads the forward loses up to 1/n of its speed to the spare core, while the
 * capture's preemption costs its own CPU per step (~10% of a step at b1 on the shipped model); measured on 2
 * cores, one thread fewer ran b8 decode at 0.55 of 2 threads and sharing both cores at 0.85 (BENCH.md), and that
 * model's break-even n(n-1) ≈ T(1 thread) / capture time per step is 3.5-4 threads for the shipped model.
 * spare_core on forces it at any count ≥ 2.
 */
#define AX_SPARE_MIN_THREADS 4
#include "attnx_engine.h"

#include "attnx_common.h"
#include "attnx_shm.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum req_state { RS_PENDING, RS_ACTIVE, RS_DONE };

struct ax_req {
	atomic_int refs;
	atomic_int cancel;
	char rid[AX_SHM_RID_MAX];
	int32_t *prompt;
	int n_prompt;
	ax_gen_params p;
	uint64_t rng;
	/* scheduler-owned */
	int state, row, pos; /* pos: tokens already in the cache */
	int n_gen;
	int32_t last;        /* last sampled token (next query in decode) */
	uint64_t ex_id;      /* export request id, 0 = not exported */
	struct ax_req *next;
	/* event queue, guarded by mu */
	pthread_mutex_t mu;
	pthread_cond_t cv;
	ax_gen_event *ev;
	size_t ev_head, ev_tail, ev_cap;
	int finished;        /* the finishing event was queued */
};

/* Per-step export bookkeeping for one sequence. */
typedef struct step_exp {
	ax_req *r;
	int t0;              /* first token of this seq in the step */
	int n;               /* tokens in this seq */
	int q_first;         /* first token (within the seq) whose Q rows are exported */
	float *qptr;         /* reserved Q rows, NULL if none */
	uint64_t q_row;
} step_exp;

struct ax_engine {
	ax_engine_config cfg;
	ax_model *m;
	ax_tok *tok;
	ax_kv *kv;
	ax_pool *pool;
	ax_fwd_scratch *s;
	const ax_model_config *mc;
	int ctx, max_batch, chunk, budget;
	float *logits;       /* [max_batch, vocab] */
	void *work;
	/* export */
	ax_export *ex;
	uint32_t qbuf, ibuf, q_rows;
	uint64_t want[2];
	int n_want, want_prefill;
	step_exp *se;
	int spare;           /* leave a core to an attached consumer (see adapt_threads) */
	atomic_int step_threads; /* pool workers the latest step's forward used (ax_engine_threads) */
	/* requests */
	pthread_mutex_t mu;
	pthread_cond_t cv;
	ax_req *pend_head, *pend_tail;
	ax_req **active;     /* [rows] by row */
	int rows, n_active;  /* index-table rows (2 × max_batch), rows holding an active request */
	uint64_t *retired;   /* [rows] 0 = not retired, else its retirement order (older = smaller) */
	int *retired_len;    /* [rows] positions to release */
	uint64_t *retired_id;   /* [rows] export id of the retired request (ended with _keep), 0 = none */
	uint64_t *retired_done; /* [rows] its END's descriptor count (ax_export_consumer_done: capture done?) */
	uint64_t retire_seq;
	int quit;
	pthread_t th;
	int th_started;
	atomic_ulong rid_seq;
};

/* ---- requests ---------------------------------------------------------------------------------------- */

static void req_free(ax_req *r)
{
	pthread_mutex_destroy(&r->mu);
	pthread_cond_destroy(&r->cv);
	free(r->ev);
	free(r->prompt);
	free(r);
}

void ax_req_release(ax_req *r)
{
	if (r && atomic_fetch_sub(&r->refs, 1) == 1)
		req_free(r);
}

void ax_req_cancel(ax_req *r) { atomic_store(&r->cancel, 1); }
const char *ax_req_rid(const ax_req *r) { return r->rid; }
int ax_req_prompt_len(const ax_req *r) { return r->n_prompt; }

static void push_event(ax_req *r, const ax_gen_event *ev)
{
	pthread_mutex_lock(&r->mu);
	if (r->ev_tail - r->ev_head == r->ev_cap) {
		size_t nc = r->ev_cap ? r->ev_cap * 2 : 16;
		ax_gen_event *ne = malloc(nc * sizeof *ne);
		if (ne) {
			for (size_t i = r->ev_head; i < r->ev_tail; i++)
				ne[i - r->ev_head] = r->ev[i % r->ev_cap];
			free(r->ev);
			r->ev = ne;
			r->ev_tail -= r->ev_head;
			r->ev_head = 0;
			r->ev_cap = nc;
		}
	}
	if (r->ev_tail - r->ev_head < r->ev_cap) {
		r->ev[r->ev_tail++ % r->ev_cap] = *ev;
		if (ev->finish)
			r->finished = 1;
	} else if (ev->finish) {
		r->finished = 2; /* out of memory: the reader sees an error finish */
	}
	pthread_cond_signal(&r->cv);
	pthread_mutex_unlock(&r->mu);
}

int ax_req_next(ax_req *r, ax_gen_event *ev, int timeout_ms)
{
	struct timespec dl;
	clock_gettime(CLOCK_REALTIME, &dl);
	if (timeout_ms >= 0) {
		dl.tv_sec += timeout_ms / 1000;
		dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
		if (dl.tv_nsec >= 1000000000) {
			dl.tv_sec++;
			dl.tv_nsec -= 1000000000;
		}
	}
	int rc = 0;
	pthread_mutex_lock(&r->mu);
	while (r->ev_head == r->ev_tail && r->finished == 0) {
		if (timeout_ms < 0)
			pthread_cond_wait(&r->cv, &r->mu);
		else if (pthread_cond_timedwait(&r->cv, &r->mu, &dl) == ETIMEDOUT)
			break;
	}
	if (r->ev_head != r->ev_tail) {
		*ev = r->ev[r->ev_head++ % r->ev_cap];
		rc = 1;
	} else if (r->finished == 2) {
		memset(ev, 0, sizeof *ev);
		ev->token = -1;
		ev->finish = AX_FINISH_ERROR;
		r->finished = 1;
		rc = 1;
	} else if (r->finished) {
		rc = -ENODATA;
	}
	pthread_mutex_unlock(&r->mu);
	return rc;
}

int ax_engine_submit(ax_engine *e, const char *rid, const int32_t *prompt, int n, const ax_gen_params *p,
		     ax_req **out)
{
	if (n <= 0 || !p || p->max_tokens < 1 || p->top_logprobs < 0 || p->top_logprobs > AX_MAX_TOP_LOGPROBS ||
	    p->n_stop_ids < 0 || p->n_stop_ids > AX_MAX_STOP_IDS)
		return -EINVAL;
	if (rid && (strlen(rid) == 0 || strlen(rid) >= AX_SHM_RID_MAX))
		return -EINVAL;
	for (int i = 0; i < n; i++)
		if (prompt[i] < 0 || prompt[i] >= e->mc->vocab)
			return -EINVAL;
	if (n >= e->ctx)
		return -E2BIG;
	ax_req *r = calloc(1, sizeof *r);
	if (!r || !(r->prompt = malloc((size_t)n * sizeof(int32_t)))) {
		free(r);
		return -ENOMEM;
	}
	memcpy(r->prompt, prompt, (size_t)n * sizeof(int32_t));
	r->n_prompt = n;
	r->p = *p;
	if (r->p.max_tokens > e->ctx - n)
		r->p.max_tokens = e->ctx - n;
	r->rng = p->has_seed ? p->seed : ax_now_ns() ^ ((uint64_t)(uintptr_t)r << 16);
	if (rid)
		snprintf(r->rid, sizeof r->rid, "%s", rid);
	else
		snprintf(r->rid, sizeof r->rid, "engine-%016llx",
			 (unsigned long long)(ax_wall_ns() ^ (atomic_fetch_add(&e->rid_seq, 1) * 0x9e3779b97f4a7c15ull)));
	pthread_mutex_init(&r->mu, NULL);
	pthread_cond_init(&r->cv, NULL);
	atomic_init(&r->refs, 2); /* caller + scheduler */
	r->state = RS_PENDING;
	pthread_mutex_lock(&e->mu);
	if (e->quit) {
		pthread_mutex_unlock(&e->mu);
		req_free(r);
		return -ESHUTDOWN;
	}
	if (e->pend_tail)
		e->pend_tail->next = r;
	else
		e->pend_head = r;
	e->pend_tail = r;
	pthread_cond_signal(&e->cv);
	pthread_mutex_unlock(&e->mu);
	*out = r;
	return 0;
}

/* ---- export ------------------------------------------------------------------------------------------ */

static int export_open(ax_engine *e, float **kpools, int32_t **index)
{
	const ax_model_config *c = e->mc;
	uint64_t slots = (uint64_t)e->max_batch * e->ctx, kd = (uint64_t)c->n_kv_heads * c->head_dim;
	uint64_t qd = (uint64_t)c->n_heads * c->head_dim;
	e->q_rows = (uint32_t)((e->budget > 512 ? e->budget : 512) * (uint64_t)c->n_layers * 2);
	uint64_t kbytes = slots * kd * 4, ibytes = (uint64_t)e->rows * e->ctx * 4, qbytes = (uint64_t)e->q_rows * qd * 4;
	ax_export_config xc = {
		.name = e->cfg.shm_name, .engine = "attnx-engine", .model = c->name,
		.rank = 0, .world_size = 1, .n_layers = (uint32_t)c->n_layers, .n_q_heads = (uint32_t)c->n_heads,
		.n_kv_heads = (uint32_t)c->n_kv_heads, .head_offset = 0, .n_q_heads_total = (uint32_t)c->n_heads,
		.head_dim = (uint32_t)c->head_dim, .q_dtype = AX_DTYPE_F32, .k_dtype = AX_DTYPE_F32,
		.scale = 1.0f / sqrtf((float)c->head_dim), .logit_cap = 0, .window = 0, .max_ctx = (uint32_t)e->ctx,
		.data_size = kbytes * (uint64_t)c->n_layers + ibytes + qbytes + 64 * (uint64_t)(c->n_layers + 4),
	};
	int rc = ax_export_open(&e->ex, &xc);
	if (rc)
		return rc;
	for (int l = 0; l < c->n_layers && !rc; l++) {
		ax_shm_buffer b = {.kind = AX_BUF_K_POOL, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_F32, .layer = l,
				   .ndim = 3, .device = -1, .dim = {slots, (uint64_t)c->n_kv_heads, (uint64_t)c->head_dim},
				   .stride = {kd, (uint64_t)c->head_dim, 1}, .bytes = kbytes, .scale = 1.0f};
		uint32_t idx;
		rc = ax_export_add_host_buffer(e->ex, &b, (void **)&kpools[l], &idx);
	}
	ax_shm_buffer ib = {.kind = AX_BUF_INDEX_TOKEN, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_I32, .layer = -1,
			    .ndim = 2, .device = -1, .dim = {(uint64_t)e->rows, (uint64_t)e->ctx},
			    .stride = {(uint64_t)e->ctx, 1}, .bytes = ibytes, .scale = 1.0f};
	if (!rc)
		rc = ax_export_add_host_buffer(e->ex, &ib, (void **)index, &e->ibuf);
	ax_shm_buffer qb = {.kind = AX_BUF_Q_RING, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_F32, .layer = -1,
			    .ndim = 3, .device = -1, .dim = {e->q_rows, (uint64_t)c->n_heads, (uint64_t)c->head_dim},
			    .stride = {qd, (uint64_t)c->head_dim, 1}, .bytes = qbytes, .scale = 1.0f};
	void *qp;
	if (!rc)
		rc = ax_export_add_host_buffer(e->ex, &qb, &qp, &e->qbuf);
	if (rc) {
		ax_export_close(e->ex);
		e->ex = NULL;
	}
	return rc;
}

static uint32_t end_reason(int finish)
{
	switch (finish) {
	case AX_FINISH_STOP: return AX_END_STOP;
	case AX_FINISH_LENGTH: return AX_END_LENGTH;
	case AX_FINISH_ABORT: return AX_END_ABORT;
	default: return AX_END_ERROR;
	}
}

static int layer_rank(const ax_engine *e, int layer)
{
	if (!((e->want[layer / 64] >> (layer % 64)) & 1))
		return -1;
	int r = 0;
	for (int l = 0; l < layer; l++)
		r += (int)((e->want[l / 64] >> (l % 64)) & 1);
	return r;
}

/* Forward hook: copy this layer's Q rows of every exported token into its reserved ring rows. */
static void q_hook(void *ctx, int layer, const float *q, int T)
{
	ax_engine *e = ctx;
	int li = layer_rank(e, layer);
	if (li < 0)
		return;
	size_t qd = (size_t)e->mc->n_heads * e->mc->head_dim;
	for (int i = 0; i < e->max_batch; i++) {
		step_exp *x = &e->se[i];
		if (!x->r || !x->qptr)
			continue;
		for (int t = x->q_first; t < x->n; t++)
			memcpy(x->qptr + ((size_t)(t - x->q_first) * e->n_want + li) * qd, q + (size_t)(x->t0 + t) * qd,
			       qd * sizeof(float));
	}
	(void)T;
}

/* One core fewer for the forward while a consumer is attached (only when e->spare: see the top of the file). */
static void adapt_threads(ax_engine *e, int attached)
{
	if (!e->spare)
		return;
	int all = ax_pool_threads(e->pool), want = attached ? all - 1 : all;
	if (ax_pool_active(e->pool) == want)
		return;
	ax_pool_set_active(e->pool, want);
	ax_log(AX_LOG_INFO, "engine", attached ? "consumer attached: forward on %d of %d threads (one core left to it)"
	       : "no consumer: forward on %d of %d threads", want, all);
}

/* Before the step: decide which tokens of each seq get Q rows and reserve them. */
static void export_prepare(ax_engine *e, int n_seqs)
{
	e->n_want = 0;
	if (!e->ex)
		return;
	/* q_hook walks every batch entry: entries past this step's batch must not keep an earlier step's Q rows,
	 * or it would copy into ring rows that were already published (a batch that shrank). */
	for (int i = n_seqs; i < e->max_batch; i++)
		e->se[i].qptr = NULL;
	ax_export_heartbeat(e->ex);
	int attached = ax_export_wanted(e->ex, e->want, &e->want_prefill) > 0;
	if (attached)
		e->n_want = __builtin_popcountll(e->want[0]) + __builtin_popcountll(e->want[1]);
	adapt_threads(e, attached);
	for (int i = 0; i < n_seqs; i++) {
		step_exp *x = &e->se[i];
		x->qptr = NULL;
		x->q_first = x->n;
		if (!x->r->ex_id || e->n_want == 0)
			continue;
		int prefill = x->r->pos < x->r->n_prompt;
		int last_prompt = prefill && x->r->pos + x->n == x->r->n_prompt;
		if (!prefill || e->want_prefill)
			x->q_first = 0;
		else if (last_prompt)
			x->q_first = x->n - 1;
		int rows = (x->n - x->q_first) * e->n_want;
		void *p;
		if (rows > 0 && ax_export_q_reserve(e->ex, e->qbuf, (uint32_t)rows, &x->q_row, &p) == 0)
			x->qptr = p;
		else
			x->q_first = x->n;
	}
}

static void publish(ax_engine *e, const ax_req *r, int pos0, int n, int decode_step, int flags, const step_exp *x,
		    int with_q)
{
	ax_shm_step s = {0};
	s.req_id = r->ex_id;
	s.n_tokens = (uint32_t)n;
	s.pos0 = (uint64_t)pos0;
	s.seq_len = (uint64_t)(pos0 + n);
	s.index_buf = e->ibuf;
	s.index_row = (uint32_t)r->row;
	s.decode_step = (uint32_t)decode_step;
	s.flags = (uint32_t)flags;
	if (with_q) {
		s.q_row = x->q_row;
		s.layers[0] = e->want[0];
		s.layers[1] = e->want[1];
	}
	const int32_t *toks = pos0 < r->n_prompt ? r->prompt + pos0 : &r->last;
	ax_export_step(e->ex, &s, toks); /* -EAGAIN (ring full) is counted by the library; never wait */
}

/* After the step: one FORWARD per seq (split in two when only the last prompt row carries Q). */
static void export_publish(ax_engine *e, int n_seqs)
{
	if (!e->ex)
		return;
	for (int i = 0; i < n_seqs; i++) {
		step_exp *x = &e->se[i];
		ax_req *r = x->r;
		if (!r->ex_id)
			continue;
		int prefill = r->pos < r->n_prompt;
		int flags = prefill ? AX_STEP_F_PREFILL : 0, dstep = prefill ? 0 : r->n_gen;
		if (x->qptr && x->q_first > 0) {
			publish(e, r, r->pos, x->q_first, dstep, flags, x, 0);
			publish(e, r, r->pos + x->q_first, x->n - x->q_first, dstep, flags, x, 1);
		} else {
			publish(e, r, r->pos, x->n, dstep, flags, x, x->qptr != NULL);
		}
	}
}

/* ---- the scheduler ----------------------------------------------------------------------------------- */

/* Release a retired row's slots; the row becomes free. The export learns of the free first (shm rule 9: a capture
 * still computing the request's rows reports them as recycled rather than reading the next request's keys). */
static void unretire(ax_engine *e, int row)
{
	if (e->retired_id[row])
		ax_export_request_freed(e->ex, e->retired_id[row]);
	e->retired_id[row] = 0;
	ax_kv_release(e->kv, row, e->retired_len[row]);
	e->retired[row] = 0;
}

/* Release the oldest retired row. Returns 0, or -ENOENT when none is retired. */
static int unretire_oldest(ax_engine *e)
{
	int best = -1;
	for (int pass = 0; pass < 2 && best < 0; pass++) /* first the rows the capture is done with (never waits) */
		for (int row = 0; row < e->rows; row++)
			if (e->retired[row] && (best < 0 || e->retired[row] < e->retired[best]) &&
			    (pass || ax_export_consumer_done(e->ex, e->retired_done[row])))
				best = row;
	if (best < 0)
		return -ENOENT;
	unretire(e, best);
	return 0;
}

static void finish(ax_engine *e, ax_req *r, int why)
{
	if (r->state == RS_ACTIVE) {
		e->active[r->row] = NULL;
		e->n_active--;
		if (e->ex && r->ex_id) { /* the capture may still read this row: retire it (see the top) */
			e->retired_done[r->row] = 0;
			ax_export_request_end_keep(e->ex, r->ex_id, end_reason(why), &e->retired_done[r->row]);
			e->retired_id[r->row] = r->ex_id;
			e->retired[r->row] = ++e->retire_seq;
			e->retired_len[r->row] = e->ctx; /* the whole row: a failed step may have left slots past pos */
		} else {
			ax_kv_release(e->kv, r->row, e->ctx);
		}
	}
	r->state = RS_DONE;
	ax_req_release(r);
}

static void finish_with_event(ax_engine *e, ax_req *r, int why)
{
	ax_gen_event ev = {.token = -1, .finish = why};
	push_event(r, &ev);
	finish(e, r, why);
}

/* A row with neither an active nor a retired request; the oldest retired one is released if none is. */
static int free_row(ax_engine *e)
{
	for (int pass = 0; pass < 2; pass++) {
		for (int row = 0; row < e->rows; row++)
			if (!e->active[row] && !e->retired[row])
				return row;
		if (unretire_oldest(e))
			break;
	}
	return -1;
}

/* Admit pending requests (at most max_batch active). Called with e->mu held. */
static void admit(ax_engine *e)
{
	while (e->pend_head && e->n_active < e->max_batch) {
		int row = free_row(e);
		if (row < 0)
			break;
		ax_req *r = e->pend_head;
		e->pend_head = r->next;
		if (!e->pend_head)
			e->pend_tail = NULL;
		r->next = NULL;
		r->row = row;
		r->state = RS_ACTIVE;
		e->active[row] = r;
		e->n_active++;
		if (e->ex) {
			int rc = ax_export_request_begin(e->ex, r->rid, r->prompt, (uint32_t)r->n_prompt, &r->ex_id);
			if (rc && rc != -EAGAIN)
				r->ex_id = 0;
		}
	}
}

static int is_stop(const ax_engine *e, const ax_req *r, int32_t tok)
{
	for (int i = 0; i < r->p.n_stop_ids; i++)
		if (r->p.stop_ids[i] == tok)
			return 1;
	if (r->p.ignore_eos)
		return 0;
	for (int i = 0; i < e->mc->n_eos; i++)
		if (e->mc->eos_ids[i] == tok)
			return 1;
	return 0;
}

/* Sample the token of a seq that produced logits, queue its event, and finish the request if it stops. */
static void emit(ax_engine *e, ax_req *r, const float *lg)
{
	int V = e->mc->vocab;
	ax_gen_event ev = {0};
	ev.token = ax_sample(lg, V, &r->p.sp, &r->rng, e->work);
	if (r->p.logprobs || r->p.top_logprobs)
		ev.logprob = ax_logprob_of(lg, V, ev.token);
	if (r->p.top_logprobs)
		ev.n_top = ax_top_logprobs(lg, V, r->p.top_logprobs, ev.top_ids, ev.top_lps);
	r->n_gen++;
	r->last = ev.token;
	if (is_stop(e, r, ev.token)) {
		ev.finish = AX_FINISH_STOP;
		ev.stop_token = 1;
	} else if (r->n_gen >= r->p.max_tokens || r->pos >= e->ctx) {
		ev.finish = AX_FINISH_LENGTH;
	}
	push_event(r, &ev);
	if (ev.finish)
		finish(e, r, ev.finish);
}

/* Build one step. Decode tokens first, then prefill chunks within the token budget. Returns n_seqs. */
static int build_step(ax_engine *e, ax_fwd_seq *seqs)
{
	int n = 0, used = 0;
	for (int pass = 0; pass < 2; pass++) {
		for (int row = 0; row < e->rows; row++) {
			ax_req *r = e->active[row];
			if (!r)
				continue;
			int prefill = r->pos < r->n_prompt;
			if (prefill != pass)
				continue;
			int len = prefill ? r->n_prompt - r->pos : 1;
			if (len > e->chunk)
				len = e->chunk;
			if (len > e->budget - used)
				len = e->budget - used;
			if (len <= 0)
				continue;
			int rc;
			while ((rc = ax_kv_alloc(e->kv, row, r->pos, len)) == -ENOSPC && unretire_oldest(e) == 0)
				;
			if (rc) {
				finish_with_event(e, r, AX_FINISH_ERROR);
				continue;
			}
			seqs[n] = (ax_fwd_seq){row, r->pos, len, prefill ? r->prompt + r->pos : &r->last,
					       !prefill || r->pos + len == r->n_prompt};
			e->se[n] = (step_exp){r, used, len, len, NULL, 0};
			used += len;
			n++;
		}
	}
	return n;
}

static void run_step(ax_engine *e)
{
	for (int row = 0; row < e->rows; row++) /* cancellations first */
		if (e->active[row] && atomic_load(&e->active[row]->cancel))
			finish_with_event(e, e->active[row], AX_FINISH_ABORT);
	ax_fwd_seq seqs[e->max_batch];
	int n = build_step(e, seqs);
	if (n == 0)
		return;
	export_prepare(e, n);
	atomic_store(&e->step_threads, ax_pool_active(e->pool));
	int rc = ax_model_forward(e->m, e->kv, e->pool, e->s, seqs, n, e->logits, e->n_want ? q_hook : NULL, e);
	if (rc) {
		ax_log(AX_LOG_ERROR, "engine", "forward failed: %s", ax_strerror(rc));
		for (int i = 0; i < n; i++)
			finish_with_event(e, e->se[i].r, AX_FINISH_ERROR);
		return;
	}
	ax_export_hold_wake(e->ex); /* the step's descriptors (and the ENDs it causes) wake the capture once */
	export_publish(e, n);
	for (int i = 0; i < n; i++) {
		ax_req *r = e->se[i].r;
		r->pos += seqs[i].n;
		if (seqs[i].want_logits)
			emit(e, r, e->logits + (size_t)i * e->mc->vocab);
	}
	ax_export_flush_wake(e->ex);
}

static int any_active(const ax_engine *e) { return e->n_active > 0; }

/* --max-steps-per-s: sleep out the rest of this step's share of a second (never when unpaced). */
static void pace(const ax_engine *e, uint64_t step_start_ns)
{
	if (e->cfg.max_steps_per_s <= 0)
		return;
	uint64_t period = 1000000000ull / (uint64_t)e->cfg.max_steps_per_s, spent = ax_now_ns() - step_start_ns;
	if (spent >= period)
		return;
	struct timespec ts = {(time_t)((period - spent) / 1000000000ull), (long)((period - spent) % 1000000000ull)};
	nanosleep(&ts, NULL);
}

static void *sched_main(void *arg)
{
	ax_engine *e = arg;
	for (;;) {
		pthread_mutex_lock(&e->mu);
		while (!e->quit && !e->pend_head && !any_active(e)) {
			struct timespec dl;
			clock_gettime(CLOCK_REALTIME, &dl);
			dl.tv_nsec += 500000000;
			if (dl.tv_nsec >= 1000000000) {
				dl.tv_sec++;
				dl.tv_nsec -= 1000000000;
			}
			pthread_cond_timedwait(&e->cv, &e->mu, &dl);
			if (e->ex) /* idle: keep the producer heartbeat fresh */
				ax_export_heartbeat(e->ex);
		}
		int quit = e->quit;
		if (!quit)
			admit(e);
		pthread_mutex_unlock(&e->mu);
		if (quit)
			break;
		uint64_t t0 = ax_now_ns();
		run_step(e);
		pace(e, t0);
	}
	/* Abort everything still queued or running. */
	for (int row = 0; row < e->rows; row++)
		if (e->active[row])
			finish_with_event(e, e->active[row], AX_FINISH_ABORT);
	pthread_mutex_lock(&e->mu);
	ax_req *r = e->pend_head;
	e->pend_head = e->pend_tail = NULL;
	pthread_mutex_unlock(&e->mu);
	while (r) {
		ax_req *nx = r->next;
		finish_with_event(e, r, AX_FINISH_ABORT);
		r = nx;
	}
	return NULL;
}

/* ---- lifecycle --------------------------------------------------------------------------------------- */

static int open_parts(ax_engine *e)
{
	char path[4096];
	int rc = ax_model_open(&e->m, e->cfg.model_dir);
	if (rc) {
		ax_log(AX_LOG_ERROR, "engine", "cannot load model from %s: %s", e->cfg.model_dir, ax_strerror(rc));
		return rc;
	}
	e->mc = ax_model_cfg(e->m);
	snprintf(path, sizeof path, "%s/tokenizer.json", e->cfg.model_dir);
	if ((rc = ax_tok_open(&e->tok, path))) {
		ax_log(AX_LOG_ERROR, "engine", "cannot load %s: %s", path, ax_strerror(rc));
		return rc;
	}
	e->max_batch = e->cfg.max_batch > 0 ? e->cfg.max_batch : 8;
	e->rows = 2 * e->max_batch;
	e->ctx = e->cfg.ctx > 0 ? e->cfg.ctx : (e->mc->max_pos < 4096 ? e->mc->max_pos : 4096);
	if (e->ctx > e->mc->max_pos)
		e->ctx = e->mc->max_pos;
	if (e->mc->sliding_window > 0 && e->ctx > e->mc->sliding_window) {
		ax_log(AX_LOG_WARN, "engine", "context %d clamped to the model's sliding window %d (not implemented)",
		       e->ctx, e->mc->sliding_window);
		e->ctx = e->mc->sliding_window;
	}
	e->chunk = e->cfg.prefill_chunk > 0 ? e->cfg.prefill_chunk : 256;
	e->budget = e->chunk + e->max_batch;
	if ((rc = ax_pool_open(&e->pool, e->cfg.threads)))
		return rc;
	if ((rc = ax_fwd_scratch_open(&e->s, e->m, e->budget, ax_pool_threads(e->pool))))
		return rc;
	float **kp = calloc((size_t)e->mc->n_layers, sizeof *kp);
	int32_t *index = NULL;
	if (!kp)
		return -ENOMEM;
	if (!e->cfg.no_export) {
		rc = export_open(e, kp, &index);
		if (rc)
			ax_log(AX_LOG_WARN, "engine", "shm export disabled: cannot create %s: %s",
			       e->cfg.shm_name ? e->cfg.shm_name : AX_SHM_DEFAULT_NAME, ax_strerror(rc));
	}
	e->spare = e->ex && ax_pool_threads(e->pool) > 1 &&
		   (e->cfg.spare_core > 0 ||
		    (e->cfg.spare_core == 0 && e->cfg.threads <= 0 && ax_pool_threads(e->pool) >= AX_SPARE_MIN_THREADS));
	atomic_store(&e->step_threads, ax_pool_threads(e->pool));
	ax_kv_config kc = {e->mc->n_layers, e->mc->n_kv_heads, e->mc->head_dim, (uint32_t)(e->max_batch * e->ctx),
			   e->rows, e->ctx, e->ex ? kp : NULL, e->ex ? index : NULL};
	rc = ax_kv_open(&e->kv, &kc);
	free(kp);
	if (rc)
		return rc;
	e->logits = malloc((size_t)e->max_batch * e->mc->vocab * sizeof(float));
	e->work = malloc(ax_sample_work_size(e->mc->vocab));
	e->active = calloc((size_t)e->rows, sizeof *e->active);
	e->retired = calloc((size_t)e->rows, sizeof *e->retired);
	e->retired_len = calloc((size_t)e->rows, sizeof *e->retired_len);
	e->retired_id = calloc((size_t)e->rows, sizeof *e->retired_id);
	e->retired_done = calloc((size_t)e->rows, sizeof *e->retired_done);
	e->se = calloc((size_t)e->max_batch, sizeof *e->se);
	return e->logits && e->work && e->active && e->retired && e->retired_len && e->retired_id && e->retired_done &&
	       e->se ? 0 : -ENOMEM;
}

int ax_engine_open(ax_engine **out, const ax_engine_config *cfg)
{
	ax_engine *e = calloc(1, sizeof *e);
	if (!e)
		return -ENOMEM;
	e->cfg = *cfg;
	pthread_mutex_init(&e->mu, NULL);
	pthread_cond_init(&e->cv, NULL);
	int rc = open_parts(e);
	if (!rc)
		rc = -pthread_create(&e->th, NULL, sched_main, e);
	if (rc) {
		ax_engine_close(e);
		return rc;
	}
	e->th_started = 1;
	ax_log(AX_LOG_INFO, "engine", "model %s (%s): %d layers, %d/%d heads, dim %d, vocab %d; ctx %d, batch %d, "
	       "%d threads, export %s", e->mc->name, e->mc->arch, e->mc->n_layers, e->mc->n_heads, e->mc->n_kv_heads,
	       e->mc->head_dim, e->mc->vocab, e->ctx, e->max_batch, ax_pool_threads(e->pool), e->ex ? "on" : "off");
	*out = e;
	return 0;
}

void ax_engine_close(ax_engine *e)
{
	if (!e)
		return;
	pthread_mutex_lock(&e->mu);
	e->quit = 1;
	pthread_cond_broadcast(&e->cv);
	pthread_mutex_unlock(&e->mu);
	if (e->th_started)
		pthread_join(e->th, NULL);
	ax_kv_close(e->kv);
	ax_export_close(e->ex);
	ax_fwd_scratch_close(e->s);
	ax_pool_close(e->pool);
	ax_tok_close(e->tok);
	ax_model_close(e->m);
	free(e->logits);
	free(e->work);
	free(e->active);
	free(e->retired);
	free(e->retired_len);
	free(e->retired_id);
	free(e->retired_done);
	free(e->se);
	pthread_cond_destroy(&e->cv);
	pthread_mutex_destroy(&e->mu);
	free(e);
}

const ax_model_config *ax_engine_model_cfg(const ax_engine *e) { return e->mc; }
const ax_tok *ax_engine_tok(const ax_engine *e) { return e->tok; }
int ax_engine_ctx(const ax_engine *e) { return e->ctx; }
int ax_engine_exporting(const ax_engine *e) { return e->ex != NULL; }
int ax_engine_threads(const ax_engine *e) { return atomic_load(&((ax_engine *)e)->step_threads); }
