/*
 * capture_test.c — attnx-capture end to end inside one process: a real engine-side segment (ax_export) with host
 * K pools, a token-level index table and a Q ring of random f32 values; the real capture loop in a thread; an nng
 * PULL socket playing the relay's record sink and a PUB socket playing its policy publisher (ipc addresses in /tmp
 * named after the test's pid).
 *
 * Every attn record is compared with an independent float64 brute force over the same Q/K (top-k positions and
 * order exactly; logits and logsumexp to 1e-5 relative). Loss is provoked for real: no relay listening (send_full
 * gaps), an engine that closes mid-request and a new one under the same name (restart gap, new hello), descriptors
 * written straight into the ring that fail validation or are torn, a burst that overflows a tiny step ring. Option
 * parsing, layer selection and the policy table have table-driven unit cases. Policy acknowledgement: a new policy's
 * echo arrives only after the segment's wanted layers include the policy's, once per rid, attached or not.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <nng/nng.h>
#include <nng/protocol/pipeline0/pull.h>
#include <nng/protocol/pubsub0/pub.h>

#include "attnx_common.h"
#include "capture.h"
#include "policy.h"
#include "sender.h"

/* ---- test model --------------------------------------------------------------------------------------- */
#define NL 4      /* layers */
#define HQ 4      /* query heads */
#define HKV 2     /* kv heads */
#define HD 16     /* head dim */
#define SLOTS 512 /* K-pool slots */
#define CTX 128   /* index-table context */
#define IROWS 8   /* index-table rows */
#define QROWS 512 /* Q-ring rows */
#define HEAD_OFFSET 4 /* global id of local head 0 (as if rank 1 of 2) */

typedef struct engine {
	ax_export *ex;
	float *k[NL];       /* [SLOTS, HKV, HD] */
	int32_t *index;     /* [IROWS, CTX] */
	uint32_t ibuf, qbuf;
	uint64_t rng;
	float scale;
} engine;

typedef struct treq {
	uint64_t req_id;
	char rid[32];
	uint32_t P, len, row;
	int32_t tok[CTX];
	float q[CTX][NL][HQ * HD]; /* Q written for (position, layer) */
} treq;

static char g_shm[64], g_rec_addr[128], g_pol_addr[128];

static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}
static float rndf(uint64_t *s) { return (float)((rnd(s) >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f; }

static void sleep_ms(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
	nanosleep(&ts, NULL);
}

/* The segment alone (no buffer registered yet); engine_add_k / engine_add_iq register the K pools, the index
 * table and the Q ring; engine_open_cfg does all three in that order (the C engine's). */
static void engine_create(engine *e, uint64_t seed, uint32_t ring_cap)
{
	memset(e, 0, sizeof *e);
	e->rng = seed;
	ax_export_config cfg = {.name = g_shm, .engine = "test-engine", .model = "test-model", .rank = 1,
				.world_size = 2, .n_layers = NL, .n_q_heads = HQ, .n_kv_heads = HKV,
				.head_offset = HEAD_OFFSET, .n_q_heads_total = 2 * HQ, .head_dim = HD,
				.q_dtype = AX_DTYPE_F32, .k_dtype = AX_DTYPE_F32, .max_ctx = CTX, .req_cap = 16,
				.ring_cap = ring_cap, .arena_cap = 1 << 16,
				.data_size = (uint64_t)NL * SLOTS * HKV * HD * 4 + IROWS * CTX * 4 + QROWS * HQ * HD * 4 +
					     4096};
	assert_int_equal(ax_export_open(&e->ex, &cfg), 0);
	e->scale = ax_export_header(e->ex)->scale;
}

static void engine_add_k(engine *e)
{
	for (uint32_t l = 0; l < NL; l++) {
		ax_shm_buffer b = {.kind = AX_BUF_K_POOL, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_F32, .layer = (int32_t)l,
				   .ndim = 3, .dim = {SLOTS, HKV, HD}, .scale = 1};
		void *p;
		assert_int_equal(ax_export_add_host_buffer(e->ex, &b, &p, NULL), 0);
		e->k[l] = p;
		for (size_t i = 0; i < (size_t)SLOTS * HKV * HD; i++)
			e->k[l][i] = rndf(&e->rng);
	}
}

static void engine_add_iq(engine *e)
{
	ax_shm_buffer ib = {.kind = AX_BUF_INDEX_TOKEN, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_I32, .layer = -1,
			    .ndim = 2, .dim = {IROWS, CTX}, .scale = 1};
	void *p;
	assert_int_equal(ax_export_add_host_buffer(e->ex, &ib, &p, &e->ibuf), 0);
	e->index = p;
	ax_shm_buffer qb = {.kind = AX_BUF_Q_RING, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_F32, .layer = -1,
			    .ndim = 3, .dim = {QROWS, HQ, HD}, .scale = 1};
	assert_int_equal(ax_export_add_host_buffer(e->ex, &qb, NULL, &e->qbuf), 0);
}

static void engine_open_cfg(engine *e, uint64_t seed, uint32_t ring_cap)
{
	engine_create(e, seed, ring_cap);
	engine_add_k(e);
	engine_add_iq(e);
}

static void engine_open(engine *e, uint64_t seed) { engine_open_cfg(e, seed, 0); }

static void engine_close(engine *e)
{
	ax_export_close(e->ex);
	e->ex = NULL;
}

/* A request with a random prompt of P tokens and a random permutation of slots as its index row. */
static treq *req_begin(engine *e, const char *rid, uint32_t P, uint32_t row)
{
	treq *r = calloc(1, sizeof *r);
	assert_non_null(r);
	snprintf(r->rid, sizeof r->rid, "%s", rid);
	r->P = P;
	r->row = row;
	for (uint32_t i = 0; i < P; i++)
		r->tok[i] = (int32_t)(rnd(&e->rng) % 1000);
	int32_t perm[SLOTS];
	for (int i = 0; i < SLOTS; i++)
		perm[i] = i;
	for (int i = SLOTS - 1; i > 0; i--) {
		int j = (int)(rnd(&e->rng) % (uint64_t)(i + 1)), t = perm[i];
		perm[i] = perm[j];
		perm[j] = t;
	}
	memcpy(e->index + (size_t)row * CTX, perm, CTX * sizeof(int32_t));
	assert_int_equal(ax_export_request_begin(e->ex, rid, r->tok, P, &r->req_id), 0);
	return r;
}

/* Publish positions [pos0, pos0+n) with Q rows for the layers in `mask`. Returns ax_export_step's result. */
static int publish(engine *e, treq *r, uint32_t pos0, uint32_t n, uint32_t mask, int prefill)
{
	uint32_t nl = (uint32_t)__builtin_popcount(mask);
	uint64_t q_row;
	float *q;
	assert_int_equal(ax_export_q_reserve(e->ex, e->qbuf, n * nl, &q_row, (void **)&q), 0);
	for (uint32_t t = 0; t < n; t++) {
		uint32_t li = 0;
		for (uint32_t l = 0; l < NL; l++) {
			if (!(mask >> l & 1))
				continue;
			float *row = q + ((size_t)t * nl + li++) * HQ * HD;
			for (int i = 0; i < HQ * HD; i++)
				row[i] = r->q[pos0 + t][l][i] = rndf(&e->rng);
		}
	}
	ax_shm_step s = {.req_id = r->req_id, .n_tokens = n, .pos0 = pos0, .seq_len = pos0 + n,
			 .index_buf = e->ibuf, .index_row = r->row, .decode_step = prefill ? 0 : pos0 - r->P + 1,
			 .q_row = q_row, .layers = {mask, 0}, .flags = prefill ? AX_STEP_F_PREFILL : 0};
	return ax_export_step(e->ex, &s, r->tok + pos0);
}

static void req_prefill(engine *e, treq *r, uint32_t mask)
{
	assert_int_equal(publish(e, r, 0, r->P, mask, 1), 0);
	r->len = r->P;
}

static void req_decode(engine *e, treq *r, uint32_t mask)
{
	r->tok[r->len] = (int32_t)(rnd(&e->rng) % 1000);
	assert_int_equal(publish(e, r, r->len, 1, mask, 0), 0);
	r->len++;
}

/* ---- float64 brute force ------------------------------------------------------------------------------ */

typedef struct bf {
	uint32_t k;
	int64_t pos[64];
	double logit[64];
	double lse;
} bf;

static double score(const engine *e, const treq *r, uint32_t p, uint32_t l, uint32_t h, uint32_t j)
{
	const float *q = r->q[p][l] + h * HD;
	int32_t slot = e->index[(size_t)r->row * CTX + j];
	const float *k = e->k[l] + ((size_t)slot * HKV + h / (HQ / HKV)) * HD;
	double d = 0;
	for (int i = 0; i < HD; i++)
		d += (double)q[i] * k[i];
	return d * e->scale;
}

/* head < 0: mean over heads of the mode; else that local head's logits. */
static void brute(const engine *e, const treq *r, uint32_t p, uint32_t l, int mode, int head, uint32_t top_k, bf *o)
{
	double s[CTX];
	uint32_t n = p + 1;
	for (uint32_t j = 0; j < n; j++)
		s[j] = 0;
	for (uint32_t h = 0; h < HQ; h++) {
		if (head >= 0 && (int)h != head)
			continue;
		double sh[CTX], m = -INFINITY, z = 0;
		for (uint32_t j = 0; j < n; j++) {
			sh[j] = score(e, r, p, l, h, j);
			m = fmax(m, sh[j]);
		}
		for (uint32_t j = 0; j < n; j++)
			z += exp(sh[j] - m);
		for (uint32_t j = 0; j < n; j++)
			s[j] += mode == AX_MODE_MEAN_PROB ? exp(sh[j] - m) / z / HQ : (head >= 0 ? sh[j] : sh[j] / HQ);
	}
	if (mode == AX_MODE_MEAN_PROB)
		for (uint32_t j = 0; j < n; j++)
			s[j] = log(s[j]);
	double m = -INFINITY, z = 0;
	for (uint32_t j = 0; j < n; j++)
		m = fmax(m, s[j]);
	for (uint32_t j = 0; j < n; j++)
		z += exp(s[j] - m);
	o->lse = mode == AX_MODE_MEAN_PROB ? 0 : m + log(z);
	o->k = top_k < n ? top_k : n;
	int used[CTX] = {0};
	for (uint32_t i = 0; i < o->k; i++) {
		int best = -1;
		for (uint32_t j = 0; j < n; j++)
			if (!used[j] && (best < 0 || s[j] > s[best]))
				best = (int)j;
		used[best] = 1;
		o->pos[i] = best;
		o->logit[i] = s[best];
	}
}

static int close_to(double a, double b) { return fabs(a - b) <= 1e-5 * fmax(1.0, fabs(b)); }

/* Check one attn record against the brute force. */
static void check_attn(const engine *e, const treq *r, const ax_record *rec)
{
	const ax_rec_attn *a = &rec->u.attn;
	int head = a->mode == AX_MODE_HEADS ? a->head_id - HEAD_OFFSET : -1;
	bf o;
	brute(e, r, (uint32_t)a->position, (uint32_t)a->layer_id, (int)a->mode, head, a->k, &o);
	assert_int_equal(a->k, o.k);
	assert_int_equal(a->token_id, r->tok[a->position]);
	for (uint32_t i = 0; i < o.k; i++) {
		if (a->token_positions[i] != o.pos[i] || !close_to(a->topk_logits[i], o.logit[i]))
			fail_msg("%s pos %lld layer %d entry %u: got (%lld, %.7g) want (%lld, %.7g)", r->rid,
				 (long long)a->position, a->layer_id, i, (long long)a->token_positions[i],
				 a->topk_logits[i], (long long)o.pos[i], o.logit[i]);
	}
	if (!close_to(a->logsumexp_all, o.lse))
		fail_msg("%s pos %lld layer %d: lse %.9g want %.9g", r->rid, (long long)a->position, a->layer_id,
			 a->logsumexp_all, o.lse);
}

/* ---- the relay's side: a PULL sink that keeps every record, a PUB for policies ------------------------ */

typedef struct sink {
	nng_socket pull;
	int open;
	ax_record *v;
	size_t n, cap;
} sink;

static int keep_record(const ax_record *r, void *arg)
{
	sink *s = arg;
	if (s->n == s->cap) {
		s->cap = s->cap ? 2 * s->cap : 256;
		s->v = realloc(s->v, s->cap * sizeof *s->v);
		assert_non_null(s->v);
	}
	ax_record *c = &s->v[s->n++];
	*c = *r;
	if (r->type == AX_REC_REQ && r->u.req.prompt_len) {
		c->u.req.prompt = malloc(r->u.req.prompt_len * sizeof(int32_t));
		memcpy(c->u.req.prompt, r->u.req.prompt, r->u.req.prompt_len * sizeof(int32_t));
	}
	return 0;
}

static void sink_listen(sink *s)
{
	assert_int_equal(nng_pull0_open(&s->pull), 0);
	nng_socket_set_ms(s->pull, NNG_OPT_RECVTIMEO, 20);
	assert_int_equal(nng_listen(s->pull, g_rec_addr, NULL, 0), 0);
	s->open = 1;
}

static void sink_close(sink *s)
{
	if (s->open)
		nng_close(s->pull);
	for (size_t i = 0; i < s->n; i++)
		ax_record_fini(&s->v[i]);
	free(s->v);
	memset(s, 0, sizeof *s);
}

typedef int (*pred_fn)(const sink *s, const void *arg);

/* Receive until pred holds (or fail after timeout_ms), heart-beating the engines meanwhile. */
static void wait_for(sink *s, engine *e, pred_fn pred, const void *arg, int timeout_ms, const char *what)
{
	uint64_t deadline = ax_now_ns() + (uint64_t)timeout_ms * 1000000ull;
	while (!pred(s, arg)) {
		if (ax_now_ns() > deadline)
			fail_msg("timed out waiting for %s (%zu records so far)", what, s->n);
		if (e && e->ex)
			ax_export_heartbeat(e->ex);
		nng_msg *m;
		if (nng_recvmsg(s->pull, &m, 0) != 0)
			continue;
		int rv = ax_frame_decode(nng_msg_body(m), nng_msg_len(m), keep_record, s);
		if (rv < 0)
			fail_msg("capture sent a frame that does not decode: %s", ax_strerror(rv));
		nng_msg_free(m);
	}
}

/* Keep receiving for `ms` milliseconds. */
static void drain_sink(sink *s, int ms)
{
	uint64_t end = ax_now_ns() + (uint64_t)ms * 1000000ull;
	while (ax_now_ns() < end) {
		nng_msg *m;
		if (nng_recvmsg(s->pull, &m, 0) != 0)
			continue;
		assert_true(ax_frame_decode(nng_msg_body(m), nng_msg_len(m), keep_record, s) >= 0);
		nng_msg_free(m);
	}
}

static const ax_record *find(const sink *s, int type, const char *rid, size_t from)
{
	for (size_t i = from; i < s->n; i++)
		if (s->v[i].type == type && (rid == NULL || strcmp(s->v[i].rid, rid) == 0))
			return &s->v[i];
	return NULL;
}

static int has_end(const sink *s, const void *rid) { return find(s, AX_REC_END, rid, 0) != NULL; }
static int has_hello_count(const sink *s, const void *n)
{
	size_t c = 0;
	for (size_t i = 0; i < s->n; i++)
		c += s->v[i].type == AX_REC_HELLO;
	return c >= *(const size_t *)n;
}
static int has_gap_reason(const sink *s, const void *reason)
{
	for (size_t i = 0; i < s->n; i++)
		if (s->v[i].type == AX_REC_GAP && strcmp(s->v[i].u.gap.reason, reason) == 0)
			return 1;
	return 0;
}
static int attn_count_at_least(const sink *s, const void *arg)
{
	const struct { const char *rid; size_t n; } *a = arg;
	size_t c = 0;
	for (size_t i = 0; i < s->n; i++)
		c += s->v[i].type == AX_REC_ATTN && strcmp(s->v[i].rid, a->rid) == 0;
	return c >= a->n;
}

/* seq of the capture's records: consecutive from `first`, any hole named by a gap's [from, to). */
static void check_seq(const sink *s, uint64_t first)
{
	uint64_t expect = first;
	for (size_t i = 0; i < s->n; i++) {
		const ax_record *r = &s->v[i];
		if (r->type == AX_REC_GAP && strcmp(r->u.gap.reason, "send_full") == 0) {
			if (r->u.gap.from_seq != expect)
				fail_msg("send_full gap from %llu, next expected seq %llu", (unsigned long long)r->u.gap.from_seq,
					 (unsigned long long)expect);
			assert_int_equal(r->seq, r->u.gap.to_seq - 1);
			expect = r->u.gap.to_seq;
			continue;
		}
		if (r->seq != expect)
			fail_msg("record %zu (%s) has seq %llu, expected %llu", i, ax_rec_type_name(r->type),
				 (unsigned long long)r->seq, (unsigned long long)expect);
		expect++;
	}
}

/* ---- running the capture in a thread ------------------------------------------------------------------- */

typedef struct runner {
	ax_capture *c;
	pthread_t th;
	int rv;
} runner;

static void *run_main(void *arg)
{
	runner *r = arg;
	r->rv = ax_capture_run(r->c);
	return NULL;
}

static void test_opts(ax_capture_opts *o)
{
	ax_capture_opts_default(o);
	snprintf(o->shm_name, sizeof o->shm_name, "%s", g_shm);
	snprintf(o->records_addr, sizeof o->records_addr, "%s", g_rec_addr);
	snprintf(o->policy_addr, sizeof o->policy_addr, "%s", g_pol_addr);
	snprintf(o->src, sizeof o->src, "capture:test");
	o->threads = 2;
	o->stats_interval_ms = 0;
	o->attach_retry_ms = 10;
	o->dead_after_ms = 500;
	o->log_level = AX_LOG_WARN;
}

static void runner_start(runner *r, const ax_capture_opts *o)
{
	memset(r, 0, sizeof *r);
	assert_int_equal(ax_capture_open(&r->c, o), 0);
	assert_int_equal(pthread_create(&r->th, NULL, run_main, r), 0);
}

static void runner_stop(runner *r)
{
	ax_capture_stop(r->c);
	pthread_join(r->th, NULL);
	assert_int_equal(r->rv, 0);
	ax_capture_close(r->c);
	r->c = NULL;
}

/* Check every attn record of `r` against the brute force; return how many there were. */
static size_t check_all_attn(const sink *s, const engine *e, const treq *r)
{
	size_t n = 0;
	int64_t last_pos = -1;
	for (size_t i = 0; i < s->n; i++) {
		const ax_record *rec = &s->v[i];
		if (rec->type != AX_REC_ATTN || strcmp(rec->rid, r->rid) != 0)
			continue;
		assert_true(rec->u.attn.position >= last_pos); /* position order per request */
		last_pos = rec->u.attn.position;
		check_attn(e, r, rec);
		n++;
	}
	return n;
}

/* Poll the segment until the capture wants exactly `layers` (word 0), heart-beating the engine; 0 on timeout. A
 * fixed sleep before the check failed under load (CI's ThreadSanitizer stage: the capture had not set them yet). */
static int wait_wanted(engine *e, uint64_t layers, int timeout_ms)
{
	uint64_t deadline = ax_now_ns() + (uint64_t)timeout_ms * 1000000ull, wl[2];
	int wp;
	while (ax_export_wanted(e->ex, wl, &wp) != 1 || wl[0] != layers) {
		if (ax_now_ns() > deadline)
			return 0;
		ax_export_heartbeat(e->ex);
		sleep_ms(2);
	}
	return 1;
}

static int attn_exists(const sink *s, const char *rid, int64_t pos, int32_t layer)
{
	for (size_t i = 0; i < s->n; i++)
		if (s->v[i].type == AX_REC_ATTN && strcmp(s->v[i].rid, rid) == 0 && s->v[i].u.attn.position == pos &&
		    s->v[i].u.attn.layer_id == layer)
			return 1;
	return 0;
}

/* ---- cases: options ------------------------------------------------------------------------------------- */

/* A frame sealed after the loop read its clock (born later than now_ns) is young: it must not be taken for an
 * ancient one and dropped (unsigned now - born wrapped before the fix and dropped whole frames in bursts). */
static void test_sender_clock_order(void **state)
{
	(void)state;
	char addr[128];
	snprintf(addr, sizeof addr, "ipc:///tmp/attnx-capture-test-nobody-%d.sock", (int)getpid());
	ax__sender_cfg cfg = {.addr = addr, .src = "capture:test", .max_pending = 8,
			      .pending_max_ns = 1000000000ull, .batch_records = 1};
	ax__sender *s;
	assert_int_equal(ax__sender_open(&s, &cfg), 0);
	uint64_t loop_now = ax_now_ns(); /* the loop's clock, read before the record is added */
	struct timespec ts = {0, 2000000};
	nanosleep(&ts, NULL);
	ax_record r;
	ax_record_init(&r, AX_REC_END);
	snprintf(r.rid, sizeof r.rid, "rid-clock");
	snprintf(r.u.end.reason, sizeof r.u.end.reason, "stop");
	assert_int_equal(ax__sender_add(s, &r), 0); /* one record fills the batch: sealed now, nobody listening */
	ax__sender_poll(s, loop_now);
	ax__sender_stats st;
	ax__sender_get_stats(s, &st);
	assert_int_equal(st.dropped, 0);
	assert_int_equal(ax__sender_pending(s), 1);
	ax__sender_poll(s, ax_now_ns() + 2000000000ull); /* really older than the limit now: dropped */
	ax__sender_get_stats(s, &st);
	assert_int_equal(st.dropped, 1);
	ax__sender_close(s);
}

static void test_options(void **state)
{
	(void)state;
	static const struct {
		const char *args[6];
		int rv;
	} cases[] = {
		{{NULL}, 0},
		{{"--top-k", "7"}, 0},
		{{"--top-k", "0"}, -EINVAL},
		{{"--top-k", "65"}, -EINVAL},
		{{"--top-k", "5x"}, -EINVAL},
		{{"--layers", "auto"}, 0},
		{{"--layers", "0,2-3,-1"}, 0},
		{{"--layers", "1-"}, -EINVAL},
		{{"--layers", "x"}, -EINVAL},
		{{"--mode", "heads", "--heads", "0,3"}, 0},
		{{"--mode", "sum"}, -EINVAL},
		{{"--heads", "-1"}, -EINVAL},
		{{"--backend", "cuda"}, 0},
		{{"--backend", "tpu"}, -EINVAL},
		{{"--stride", "0"}, -EINVAL},
		{{"--max-tokens", "0", "--prefill"}, 0},
		{{"--threads", "0"}, -EINVAL},
		{{"--shm", "/a/b"}, -EINVAL},
		{{"--rank", "2", "--shm", "attnx.x"}, 0},
		{{"--log-level", "debug", "--stats-interval", "0"}, 0},
		{{"--log-level", "loud"}, -EINVAL},
		{{"--nope"}, -EINVAL},
		{{"--top-k"}, -EINVAL},
		{{"stray"}, -EINVAL},
		{{"--help"}, 1},
	};
	FILE *devnull = fopen("/dev/null", "w");
	for (size_t i = 0; i < AX_ARRAY_LEN(cases); i++) {
		char *argv[8] = {"attnx-capture"};
		int argc = 1;
		for (int j = 0; cases[i].args[j]; j++)
			argv[argc++] = (char *)cases[i].args[j];
		ax_capture_opts o;
		ax_capture_opts_default(&o);
		int rv = ax_capture_opts_parse(&o, argc, argv, devnull, devnull);
		if (rv != cases[i].rv)
			fail_msg("case %zu (%s %s): rv %d, want %d", i, argv[1] ? argv[1] : "", argv[2] ? argv[2] : "", rv,
				 cases[i].rv);
	}
	fclose(devnull);

	ax_capture_opts o;
	ax_capture_opts_default(&o);
	char *argv[] = {"attnx-capture", "--rank", "2", "--shm", "attnx.x", "--layers", "0,2-3,-1", "--top-k", "9"};
	assert_int_equal(ax_capture_opts_parse(&o, (int)AX_ARRAY_LEN(argv), argv, stdout, stderr), 0);
	assert_string_equal(o.shm_name, "/attnx.x.2");
	assert_int_equal(o.top_k, 9);
	assert_int_equal(o.layer_sel, AX_LAYERS_LIST);
	assert_int_equal(o.n_layer_ids, 4);
	assert_int_equal(o.layer_ids[3], -1);
	ax_capture_opts_default(&o);
	assert_string_equal(o.shm_name, AX_SHM_DEFAULT_NAME);
	assert_int_equal(o.top_k, 5);
	assert_int_equal(o.max_tokens, 4096);
	assert_int_equal(o.stride, 1);
	assert_true(o.threads >= 1);
	/* rank 0 keeps the plain name */
	char *argv0[] = {"attnx-capture", "--rank", "0"};
	assert_int_equal(ax_capture_opts_parse(&o, 3, argv0, stdout, stderr), 0);
	assert_string_equal(o.shm_name, AX_SHM_DEFAULT_NAME);
	/* a backend this build lacks is refused by open, not by the parser */
	ax_capture_opts_default(&o);
	o.backend = AX_BACKEND_CUDA;
	ax_capture *c = NULL;
	ax_log_set_level(-1);
	assert_int_equal(ax_capture_open(&c, &o), -ENOTSUP);
	ax_log_set_level(AX_LOG_WARN);
	assert_null(c);
}

static void test_layers_and_lists(void **state)
{
	(void)state;
	static const struct {
		int sel;
		int32_t ids[4];
		uint32_t n_ids, n_layers;
		uint64_t want0;
		uint32_t ignored;
	} cases[] = {
		{AX_LAYERS_LAST, {0}, 0, 32, 1ull << 31, 0},
		{AX_LAYERS_AUTO, {0}, 0, 32, 1ull << 8 | 1ull << 16 | 1ull << 24 | 1ull << 31, 0},
		{AX_LAYERS_AUTO, {0}, 0, 1, 1, 0},
		{AX_LAYERS_ALL, {0}, 0, 3, 7, 0},
		{AX_LAYERS_LIST, {0, -1, 7, -9}, 4, 4, 1 | 8, 2},
		{AX_LAYERS_LIST, {2, 2}, 2, 4, 4, 0},
	};
	for (size_t i = 0; i < AX_ARRAY_LEN(cases); i++) {
		uint64_t m[2];
		uint32_t ign = 99;
		ax_capture_resolve_layers(cases[i].sel, cases[i].ids, cases[i].n_ids, cases[i].n_layers, m, &ign);
		if (m[0] != cases[i].want0 || m[1] != 0 || ign != cases[i].ignored)
			fail_msg("layers case %zu: mask %llx ignored %u", i, (unsigned long long)m[0], ign);
	}
	uint64_t m[2];
	assert_int_equal(ax_capture_resolve_layers(AX_LAYERS_LAST, NULL, 0, 128, m, NULL), 1);
	assert_int_equal(m[1], 1ull << 63);
	static const struct {
		const char *s;
		int neg, rv;
	} lists[] = {{"1,3,5-7", 0, 5}, {"-1", 1, 1}, {"-1", 0, -EINVAL}, {"", 0, -EINVAL}, {"1,,2", 0, -EINVAL},
		     {"3-1", 0, -EINVAL}, {"0-200", 0, -E2BIG}, {"4 ", 0, -EINVAL}};
	for (size_t i = 0; i < AX_ARRAY_LEN(lists); i++) {
		int32_t ids[AX_PROTO_MAX_LIST];
		int rv = ax_capture_parse_list(lists[i].s, ids, AX_PROTO_MAX_LIST, lists[i].neg);
		if (rv != lists[i].rv)
			fail_msg("list '%s': %d want %d", lists[i].s, rv, lists[i].rv);
	}
}

static void test_policy_table(void **state)
{
	(void)state;
	ax__policy_table t;
	assert_int_equal(ax__policy_init(&t), 0);
	ax_rec_policy p = {.top_k = 3, .ttl_ms = 100};
	assert_int_equal(ax__policy_put(&t, "", &p, 0), -EINVAL);
	assert_int_equal(ax__policy_put(&t, "a", &p, 0), 1);
	assert_int_equal(ax__policy_put(&t, "b", &p, 0), 1);
	const ax__policy_entry *e = ax__policy_get(&t, "a", 50 * 1000000ull);
	assert_non_null(e);
	uint64_t v = e->version;
	p.top_k = 4;
	assert_int_equal(ax__policy_put(&t, "a", &p, 60 * 1000000ull), 0); /* replaced: new version */
	e = ax__policy_get(&t, "a", 61 * 1000000ull);
	assert_true(e->version > v);
	assert_int_equal(e->p.top_k, 4);
	assert_null(ax__policy_get(&t, "b", 150 * 1000000ull)); /* expired */
	assert_null(ax__policy_get(&t, "zz", 0));
	assert_int_equal(ax__policy_expire(&t, 150 * 1000000ull), 1); /* b; a was used at 61 ms */
	assert_int_equal(t.count, 1);
	ax__policy_remove(&t, "a");
	ax__policy_remove(&t, "a");
	assert_int_equal(t.count, 0);
	/* an ended request: late puts are ignored until the tombstone expires, then the rid is new again */
	uint64_t t0 = 200 * 1000000ull;
	assert_int_equal(ax__policy_put(&t, "c", &p, t0), 1);
	assert_int_equal(ax__policy_end(&t, "c", t0), 0);
	assert_int_equal(ax__policy_end(&t, "d", t0), 0); /* ended before its policy came */
	assert_int_equal(ax__policy_end(&t, "", t0), -EINVAL);
	assert_int_equal(ax__policy_put(&t, "c", &p, t0 + 1), -EALREADY);
	assert_int_equal(ax__policy_put(&t, "d", &p, t0 + 1), -EALREADY);
	assert_null(ax__policy_get(&t, "c", t0 + 1));
	assert_int_equal(ax__policy_expire(&t, t0 + AX_POLICY_ENDED_MS * 1000000ull - 1), 0);
	assert_int_equal(ax__policy_expire(&t, t0 + AX_POLICY_ENDED_MS * 1000000ull), 2);
	assert_int_equal(ax__policy_put(&t, "c", &p, t0 + AX_POLICY_ENDED_MS * 1000000ull), 1);
	ax__policy_fini(&t);
}

/* ---- cases: the loop ------------------------------------------------------------------------------------ */

/* Two interleaved requests, default-ish settings: hello, req, attn per captured row (= brute force), end. */
static void test_stream(void **state)
{
	(void)state;
	engine e;
	engine_open(&e, 0x1234);
	sink s = {0};
	sink_listen(&s);
	ax_capture_opts o;
	test_opts(&o);
	o.layer_sel = AX_LAYERS_LIST;
	o.layer_ids[0] = 0;
	o.layer_ids[1] = -1;
	o.n_layer_ids = 2;
	o.stats_interval_ms = 50;
	runner run;
	runner_start(&run, &o);
	size_t one = 1;
	wait_for(&s, &e, has_hello_count, &one, 5000, "hello");
	const ax_record *h = find(&s, AX_REC_HELLO, NULL, 0);
	assert_int_equal(h->u.hello.n_layers, NL);
	assert_int_equal(h->u.hello.n_layer_ids, 2);
	assert_int_equal(h->u.hello.layer_ids[1], NL - 1);
	assert_string_equal(h->u.hello.engine, "test-engine");
	assert_string_equal(h->src, "capture:test");
	uint64_t wl[2];
	int wp;
	assert_int_equal(ax_export_wanted(e.ex, wl, &wp), 1);
	assert_int_equal(wl[0], 1u | 1u << (NL - 1));
	assert_int_equal(wp, 0);

	uint32_t all = (1u << NL) - 1;
	treq *a = req_begin(&e, "ra", 9, 0), *b = req_begin(&e, "rb", 5, 1);
	req_prefill(&e, a, all);
	req_prefill(&e, b, all);
	for (int i = 0; i < 6; i++) {
		req_decode(&e, a, all);
		if (i < 4)
			req_decode(&e, b, 1u << (NL - 1)); /* b's steps carry only the last layer */
	}
	assert_int_equal(ax_export_request_end(e.ex, b->req_id, AX_END_LENGTH), 0);
	assert_int_equal(ax_export_request_end(e.ex, a->req_id, AX_END_STOP), 0);
	wait_for(&s, &e, has_end, "ra", 5000, "end of ra");
	wait_for(&s, &e, has_end, "rb", 5000, "end of rb");

	const ax_record *rq = find(&s, AX_REC_REQ, "ra", 0);
	assert_non_null(rq);
	assert_int_equal(rq->u.req.prompt_len, 9);
	assert_memory_equal(rq->u.req.prompt, a->tok, 9 * sizeof(int32_t));
	/* ra: positions P-1 .. P+5, layers 0 and 3; rb: P-1 on both layers, decodes on layer 3 only */
	assert_int_equal(check_all_attn(&s, &e, a), 7 * 2);
	assert_int_equal(check_all_attn(&s, &e, b), 2 + 4);
	assert_true(attn_exists(&s, "ra", 8, 0) && attn_exists(&s, "ra", 14, 3) && !attn_exists(&s, "ra", 7, 0));
	const ax_record *end = find(&s, AX_REC_END, "ra", 0);
	assert_string_equal(end->u.end.reason, "stop");
	assert_int_equal(end->u.end.tokens, 15);
	assert_string_equal(find(&s, AX_REC_END, "rb", 0)->u.end.reason, "length");
	/* end after the last attn of its request; req before the first */
	for (size_t i = 0; i < s.n; i++)
		if (s.v[i].type == AX_REC_ATTN && strcmp(s.v[i].rid, "ra") == 0)
			assert_true(&s.v[i] > rq && &s.v[i] < end);
	const ax_record *att = find(&s, AX_REC_ATTN, "ra", 0);
	assert_int_equal(att->u.attn.prefill, 1);
	assert_int_equal(att->u.attn.decode_step, 0);
	assert_int_equal(att->u.attn.mode, AX_MODE_MEAN_LOGIT);
	assert_int_equal(att->u.attn.k, 5);
	assert_null(find(&s, AX_REC_GAP, NULL, 0));
	runner_stop(&run);
	drain_sink(&s, 100); /* what the stop flushed: a final stats record */
	const ax_record *st = find(&s, AX_REC_STATS, NULL, 0);
	assert_non_null(st);
	assert_string_equal(st->u.stats.kv[0].name, "steps");
	check_seq(&s, 0);
	free(a);
	free(b);
	sink_close(&s);
	engine_close(&e);
}

/* ---- cases: policies -------------------------------------------------------------------------------------- */

static void publish_policy(nng_socket pub, const char *rid, const ax_rec_policy *p)
{
	ax_batch b;
	ax_batch_init(&b);
	ax_record r;
	ax_record_init(&r, AX_REC_POLICY);
	snprintf(r.src, sizeof r.src, "relay");
	snprintf(r.rid, sizeof r.rid, "%s", rid);
	r.u.policy = *p;
	assert_true(ax_batch_add(&b, &r) >= 0);
	const uint8_t *data;
	size_t len;
	assert_int_equal(ax_batch_finish(&b, &data, &len), 1);
	assert_int_equal(nng_send(pub, (void *)data, len, 0), 0);
	ax_batch_fini(&b);
}

/* Publish (as the relay does, repeatedly) until the capture has counted one more policy. */
static void policy_until_seen(runner *run, nng_socket pub, engine *e, const char *rid, const ax_rec_policy *p)
{
	ax_capture_stats st0, st;
	ax_capture_get_stats(run->c, &st0);
	uint64_t deadline = ax_now_ns() + 5000000000ull;
	do {
		assert_true(ax_now_ns() < deadline);
		publish_policy(pub, rid, p);
		ax_export_heartbeat(e->ex);
		sleep_ms(20);
		ax_capture_get_stats(run->c, &st);
	} while (st.policies == st0.policies);
	sleep_ms(10); /* the loop applies it (and re-announces wanted layers) right after counting it */
}

static size_t count_attn(const sink *s, const char *rid, int64_t pos)
{
	size_t n = 0;
	for (size_t i = 0; i < s->n; i++)
		n += s->v[i].type == AX_REC_ATTN && strcmp(s->v[i].rid, rid) == 0 && s->v[i].u.attn.position == pos;
	return n;
}

static void test_policy(void **state)
{
	(void)state;
	nng_socket pub;
	assert_int_equal(nng_pub0_open(&pub), 0);
	assert_int_equal(nng_listen(pub, g_pol_addr, NULL, 0), 0);
	engine e;
	engine_open(&e, 0x777);
	sink s = {0};
	sink_listen(&s);
	ax_capture_opts o;
	test_opts(&o); /* defaults: layer L-1, top-5, mean_logit */
	runner run;
	runner_start(&run, &o);
	size_t one = 1;
	wait_for(&s, &e, has_hello_count, &one, 5000, "hello");

	/* rp: heads mode on one head of this rank (listed twice: one record, not two) and one that is not, layer 1,
	 * top-3, prompt rows too */
	ax_rec_policy pp = {.top_k = 3, .mode = AX_MODE_HEADS, .n_layer_ids = 1, .layer_ids = {1},
			    .n_head_ids = 3, .head_ids = {HEAD_OFFSET + 2, 99, HEAD_OFFSET + 2}, .prompt = 1};
	policy_until_seen(&run, pub, &e, "rp", &pp);
	/* rm: at most 2 generated positions */
	ax_rec_policy pm = {.max_tokens = 2};
	policy_until_seen(&run, pub, &e, "rm", &pm);
	uint64_t wl[2];
	int wp;
	assert_int_equal(ax_export_wanted(e.ex, wl, &wp), 1);
	assert_int_equal(wl[0], 1u << 1 | 1u << (NL - 1)); /* the policy's layer joins the default */
	assert_int_equal(wp, 1);

	uint32_t all = (1u << NL) - 1;
	treq *p = req_begin(&e, "rp", 6, 0), *d = req_begin(&e, "rd", 4, 1), *m = req_begin(&e, "rm", 3, 2);
	req_prefill(&e, p, all);
	req_prefill(&e, d, all);
	req_prefill(&e, m, all);
	for (int i = 0; i < 4; i++) {
		req_decode(&e, m, all);
		if (i < 3)
			req_decode(&e, p, all);
		if (i < 2)
			req_decode(&e, d, all);
	}
	ax_export_request_end(e.ex, p->req_id, AX_END_STOP);
	ax_export_request_end(e.ex, d->req_id, AX_END_STOP);
	ax_export_request_end(e.ex, m->req_id, AX_END_STOP);
	wait_for(&s, &e, has_end, "rp", 5000, "end rp");
	wait_for(&s, &e, has_end, "rd", 5000, "end rd");
	wait_for(&s, &e, has_end, "rm", 5000, "end rm");
	assert_int_equal(check_all_attn(&s, &e, p), 6 + 3); /* every prompt row, 3 decodes; one head each */
	for (size_t i = 0; i < s.n; i++)
		if (s.v[i].type == AX_REC_ATTN && strcmp(s.v[i].rid, "rp") == 0) {
			assert_int_equal(s.v[i].u.attn.mode, AX_MODE_HEADS);
			assert_int_equal(s.v[i].u.attn.head_id, HEAD_OFFSET + 2);
			assert_int_equal(s.v[i].u.attn.layer_id, 1);
			assert_int_equal(s.v[i].u.attn.prefill, s.v[i].u.attn.position < 6);
		}
	assert_int_equal(check_all_attn(&s, &e, d), 3); /* defaults: P-1 and 2 decodes on layer L-1 */
	assert_true(attn_exists(&s, "rd", 3, NL - 1) && find(&s, AX_REC_ATTN, "rd", 0)->u.attn.k == 4);
	assert_int_equal(check_all_attn(&s, &e, m), 2); /* max_tokens 2: positions P-1 and P */
	assert_true(attn_exists(&s, "rm", 2, NL - 1) && attn_exists(&s, "rm", 3, NL - 1));

	/* rl: a policy that arrives mid-request applies from then on */
	treq *l = req_begin(&e, "rl", 5, 3);
	req_prefill(&e, l, all);
	req_decode(&e, l, all);
	req_decode(&e, l, all);
	struct { const char *rid; size_t n; } want3 = {"rl", 3};
	wait_for(&s, &e, attn_count_at_least, &want3, 5000, "rl's first rows");
	ax_rec_policy pl = {.top_k = 2, .n_layer_ids = 1, .layer_ids = {2}, .stride = 2};
	policy_until_seen(&run, pub, &e, "rl", &pl);
	for (int i = 0; i < 3; i++)
		req_decode(&e, l, all); /* positions 7, 8, 9: stride 2 from P-1 = 4 keeps 8 */
	ax_export_request_end(e.ex, l->req_id, AX_END_STOP);
	wait_for(&s, &e, has_end, "rl", 5000, "end rl");
	assert_int_equal(check_all_attn(&s, &e, l), 4);
	assert_true(attn_exists(&s, "rl", 4, NL - 1) && attn_exists(&s, "rl", 6, NL - 1));
	assert_true(attn_exists(&s, "rl", 8, 2));
	assert_int_equal(count_attn(&s, "rl", 7) + count_attn(&s, "rl", 9), 0);
	for (size_t i = 0; i < s.n; i++)
		if (s.v[i].type == AX_REC_ATTN && strcmp(s.v[i].rid, "rl") == 0 && s.v[i].u.attn.position == 8)
			assert_int_equal(s.v[i].u.attn.k, 2);
	runner_stop(&run);
	drain_sink(&s, 50);
	check_seq(&s, 0);
	free(p);
	free(d);
	free(m);
	free(l);
	nng_close(pub);
	sink_close(&s);
	engine_close(&e);
}

/* The records of `type` and `rid` the sink holds. */
static size_t count_type(const sink *s, int type, const char *rid)
{
	size_t n = 0;
	for (size_t i = 0; i < s->n; i++)
		n += s->v[i].type == type && strcmp(s->v[i].rid, rid) == 0;
	return n;
}

static int has_ack(const sink *s, const void *rid) { return find(s, AX_REC_POLICY, rid, 0) != NULL; }

/* Publish (as the relay does while it waits) until the capture's ack for rid arrives in the sink. */
static void policy_until_acked(sink *s, nng_socket pub, engine *e, const char *rid, const ax_rec_policy *p)
{
	uint64_t deadline = ax_now_ns() + 5000000000ull;
	while (!has_ack(s, rid)) {
		assert_true(ax_now_ns() < deadline);
		publish_policy(pub, rid, p);
		if (e && e->ex)
			ax_export_heartbeat(e->ex);
		uint64_t until = ax_now_ns() + 20000000ull;
		while (!has_ack(s, rid) && ax_now_ns() < until) { /* read frames one by one: stop at the ack's */
			nng_msg *m;
			if (nng_recvmsg(s->pull, &m, 0) != 0)
				continue;
			assert_true(ax_frame_decode(nng_msg_body(m), nng_msg_len(m), keep_record, s) >= 0);
			nng_msg_free(m);
		}
	}
}

/* A new policy is acknowledged once: the segment's wanted layers / prefill already include what it asks for when
 * the ack arrives, the ack echoes the policy with the capture's src and the rid, and the rows the engine then
 * exports are captured on the policy's layers. */
static void test_policy_ack(void **state)
{
	(void)state;
	nng_socket pub;
	assert_int_equal(nng_pub0_open(&pub), 0);
	assert_int_equal(nng_listen(pub, g_pol_addr, NULL, 0), 0);
	engine e;
	engine_open(&e, 0x4242);
	sink s = {0};
	sink_listen(&s);
	ax_capture_opts o;
	test_opts(&o); /* defaults: layer L-1, no prefill */
	runner run;
	runner_start(&run, &o);
	size_t one = 1;
	wait_for(&s, &e, has_hello_count, &one, 5000, "hello");
	uint64_t wl[2];
	int wp;
	assert_int_equal(ax_export_wanted(e.ex, wl, &wp), 1);
	assert_int_equal(wl[0], 1u << (NL - 1));
	assert_int_equal(wp, 0);

	ax_rec_policy pa = {.top_k = 3, .n_layer_ids = 2, .layer_ids = {0, 2}, .prompt = 1, .ttl_ms = 30000};
	policy_until_acked(&s, pub, &e, "ra", &pa);
	assert_int_equal(ax_export_wanted(e.ex, wl, &wp), 1); /* read as soon as the ack is in */
	assert_int_equal(wl[0], 1u | 1u << 2 | 1u << (NL - 1));
	assert_int_equal(wp, 1);
	const ax_record *ack = find(&s, AX_REC_POLICY, "ra", 0);
	assert_string_equal(ack->src, "capture:test");
	assert_int_equal(ack->u.policy.top_k, 3);
	assert_int_equal(ack->u.policy.n_layer_ids, 2);
	assert_int_equal(ack->u.policy.layer_ids[1], 2);
	assert_int_equal(ack->u.policy.prompt, 1);
	for (int i = 0; i < 5; i++) { /* re-publications are not acknowledged again */
		publish_policy(pub, "ra", &pa);
		sleep_ms(5);
	}

	/* the engine exports what the segment asks for: every prompt row, layers 0, 2 and L-1 */
	int want_prefill = 0;
	assert_int_equal(ax_export_wanted(e.ex, wl, &want_prefill), 1);
	treq *a = req_begin(&e, "ra", 5, 0);
	req_prefill(&e, a, (uint32_t)wl[0]);
	req_decode(&e, a, (uint32_t)wl[0]);
	ax_export_request_end(e.ex, a->req_id, AX_END_STOP);
	wait_for(&s, &e, has_end, "ra", 5000, "end ra");
	assert_int_equal(check_all_attn(&s, &e, a), (5 + 1) * 2); /* rows 0..P, on layers 0 and 2 only */
	for (uint32_t p = 0; p < 5; p++)
		assert_true(attn_exists(&s, "ra", p, 0) && attn_exists(&s, "ra", p, 2) && !attn_exists(&s, "ra", p, NL - 1));
	assert_int_equal(count_type(&s, AX_REC_POLICY, "ra"), 1);
	ax_capture_stats st;
	ax_capture_get_stats(run.c, &st);
	assert_int_equal(st.policy_acks, 1);
	runner_stop(&run);
	drain_sink(&s, 50);
	assert_int_equal(count_type(&s, AX_REC_POLICY, "ra"), 1);
	check_seq(&s, 0); /* acks take their place in the capture's seq */
	free(a);
	nng_close(pub);
	sink_close(&s);
	engine_close(&e);
}

/* No engine yet: the policy is acknowledged all the same, and the attach announces its layers. */
static void test_policy_ack_unattached(void **state)
{
	(void)state;
	nng_socket pub;
	assert_int_equal(nng_pub0_open(&pub), 0);
	assert_int_equal(nng_listen(pub, g_pol_addr, NULL, 0), 0);
	sink s = {0};
	sink_listen(&s);
	ax_capture_opts o;
	test_opts(&o);
	runner run;
	runner_start(&run, &o);
	ax_rec_policy pb = {.n_layer_ids = 1, .layer_ids = {1}};
	policy_until_acked(&s, pub, NULL, "rb", &pb);
	assert_null(find(&s, AX_REC_HELLO, NULL, 0));
	engine e;
	engine_open(&e, 0x99);
	size_t one = 1;
	wait_for(&s, &e, has_hello_count, &one, 5000, "hello");
	if (!wait_wanted(&e, 1u << 1 | 1u << (NL - 1), 5000))
		fail_msg("the wanted layers never became the policy's and the default");
	runner_stop(&run);
	nng_close(pub);
	sink_close(&s);
	engine_close(&e);
}

/* ---- cases: loss ---------------------------------------------------------------------------------------- */

static int attached(engine *e)
{
	uint64_t deadline = ax_now_ns() + 5000000000ull;
	while (ax_export_wanted(e->ex, NULL, NULL) != 1) {
		if (ax_now_ns() > deadline)
			return 0;
		sleep_ms(5);
	}
	return 1;
}

/* No relay at first: frames pile up to the bound, the oldest are dropped; once a relay listens, a send_full gap
 * arrives before the surviving frames and names exactly the missing seqs. The capture never stalls. */
static void test_no_relay(void **state)
{
	(void)state;
	engine e;
	engine_open(&e, 0x4242);
	ax_capture_opts o;
	test_opts(&o);
	o.max_pending_frames = 4;
	o.pending_max_ms = 60000;
	runner run;
	runner_start(&run, &o);
	assert_true(attached(&e));
	treq *r = req_begin(&e, "rn", 4, 0);
	req_prefill(&e, r, 1u << (NL - 1));
	for (int i = 0; i < 30; i++) {
		req_decode(&e, r, 1u << (NL - 1));
		sleep_ms(3); /* one frame per step (the batch deadline is 1 ms) */
	}
	ax_export_request_end(e.ex, r->req_id, AX_END_STOP);
	ax_capture_stats st;
	uint64_t deadline = ax_now_ns() + 5000000000ull;
	do {
		assert_true(ax_now_ns() < deadline);
		sleep_ms(5);
		ax_capture_get_stats(run.c, &st);
	} while (st.dropped == 0 || st.steps < 31);
	assert_true(st.steps >= 31); /* it kept capturing while nothing could be sent */

	sink s = {0};
	sink_listen(&s);
	wait_for(&s, &e, has_end, "rn", 5000, "end rn after the relay came up");
	const ax_record *g = &s.v[0];
	assert_int_equal(g->type, AX_REC_GAP);
	assert_string_equal(g->u.gap.what, "records");
	assert_string_equal(g->u.gap.reason, "send_full");
	assert_int_equal(g->u.gap.from_seq, 0); /* the hello was among the oldest */
	assert_int_equal(g->u.gap.count, g->u.gap.to_seq - g->u.gap.from_seq);
	assert_true(g->u.gap.count >= 20);
	check_seq(&s, 0);
	check_all_attn(&s, &e, r); /* the rows that survived are right */
	runner_stop(&run);
	free(r);
	sink_close(&s);
	engine_close(&e);
}

/* The engine closes mid-request and a new one takes the name: restart gap for the request, new hello, new data. */
static void test_restart(void **state)
{
	(void)state;
	engine e1, e2;
	engine_open(&e1, 0x99);
	sink s = {0};
	sink_listen(&s);
	ax_capture_opts o;
	test_opts(&o);
	runner run;
	runner_start(&run, &o);
	size_t one = 1, two = 2;
	wait_for(&s, &e1, has_hello_count, &one, 5000, "hello");
	treq *r = req_begin(&e1, "rr", 5, 0);
	req_prefill(&e1, r, (1u << NL) - 1);
	req_decode(&e1, r, (1u << NL) - 1);
	req_decode(&e1, r, (1u << NL) - 1);
	struct { const char *rid; size_t n; } want = {"rr", 3};
	wait_for(&s, &e1, attn_count_at_least, &want, 5000, "rr rows");
	check_all_attn(&s, &e1, r);
	engine_close(&e1); /* no END: the engine went away */
	wait_for(&s, NULL, has_gap_reason, "restart", 5000, "restart gap");
	const ax_record *g = find(&s, AX_REC_GAP, "rr", 0);
	assert_non_null(g);
	assert_string_equal(g->u.gap.what, "requests");
	assert_string_equal(g->u.gap.reason, "restart");

	engine_open(&e2, 0x98);
	wait_for(&s, &e2, has_hello_count, &two, 5000, "second hello");
	const ax_record *h1 = find(&s, AX_REC_HELLO, NULL, 0), *h2 = find(&s, AX_REC_HELLO, NULL, (size_t)(h1 - s.v) + 1);
	assert_true(h1->u.hello.generation != h2->u.hello.generation);
	treq *q = req_begin(&e2, "rs", 4, 0);
	req_prefill(&e2, q, (1u << NL) - 1);
	req_decode(&e2, q, (1u << NL) - 1);
	ax_export_request_end(e2.ex, q->req_id, AX_END_STOP);
	wait_for(&s, &e2, has_end, "rs", 5000, "end rs");
	assert_int_equal(check_all_attn(&s, &e2, q), 2);
	ax_capture_stats st;
	ax_capture_get_stats(run.c, &st);
	assert_int_equal(st.attaches, 2);
	assert_int_equal(st.restarts, 1);
	runner_stop(&run);
	drain_sink(&s, 50);
	check_seq(&s, 0);
	free(r);
	free(q);
	sink_close(&s);
	engine_close(&e2);
}

/* A request that began before the capture attached: `req` from the request table, an `attached_late` gap naming
 * the generated positions it missed, then correct rows from where it joined. */
/*
 * An engine that registers its buffers after the capture found its segment (every engine opens the segment before
 * it registers anything; attnx's SGLang and HF hooks register a layer's K pool at its first forward). While the Q
 * ring is missing the capture does not attach (it would choose its backend and layers from a partial table: before
 * this, an attach in that window captured nothing for the engine's whole life); once it is there it attaches with
 * no layer readable, wants none, and takes up the K pools registered afterwards within its liveness period: the
 * wanted layers grow to the default and the request's rows come back exact.
 */
static void test_buffers_late(void **state)
{
	(void)state;
	sink s = {0};
	sink_listen(&s);
	ax_capture_opts o;
	test_opts(&o);
	engine e;
	engine_create(&e, 0x3c, 0);
	runner run;
	runner_start(&run, &o);
	drain_sink(&s, 200); /* 20 attach tries */
	assert_null(find(&s, AX_REC_HELLO, NULL, 0));
	assert_int_equal(ax_export_wanted(e.ex, NULL, NULL), 0); /* no consumer */
	engine_add_iq(&e);
	size_t one = 1;
	wait_for(&s, &e, has_hello_count, &one, 5000, "hello");
	if (!wait_wanted(&e, 0, 5000))
		fail_msg("attached with no K pool, the capture should want no layer");
	engine_add_k(&e);
	if (!wait_wanted(&e, 1u << (NL - 1), 5000))
		fail_msg("the K pools registered after the attach were not taken up");
	uint32_t all = (1u << NL) - 1;
	treq *r = req_begin(&e, "rl", 5, 0);
	req_prefill(&e, r, all);
	req_decode(&e, r, all);
	ax_export_request_end(e.ex, r->req_id, AX_END_STOP);
	wait_for(&s, &e, has_end, "rl", 5000, "end rl");
	assert_int_equal(check_all_attn(&s, &e, r), 2);
	assert_true(attn_exists(&s, "rl", 4, NL - 1) && attn_exists(&s, "rl", 5, NL - 1));
	runner_stop(&run);
	free(r);
	sink_close(&s);
	engine_close(&e);
}

static void test_attached_late(void **state)
{
	(void)state;
	engine e;
	engine_open(&e, 0x31);
	uint32_t all = (1u << NL) - 1;
	treq *r = req_begin(&e, "rj", 6, 0);
	req_prefill(&e, r, all);
	for (int i = 0; i < 3; i++)
		req_decode(&e, r, all); /* positions 6, 7, 8 go by unseen */
	sink s = {0};
	sink_listen(&s);
	ax_capture_opts o;
	test_opts(&o);
	runner run;
	runner_start(&run, &o);
	size_t one = 1;
	wait_for(&s, &e, has_hello_count, &one, 5000, "hello");
	req_decode(&e, r, all);
	req_decode(&e, r, all);
	ax_export_request_end(e.ex, r->req_id, AX_END_STOP);
	wait_for(&s, &e, has_end, "rj", 5000, "end rj");
	const ax_record *q = find(&s, AX_REC_REQ, "rj", 0), *g = find(&s, AX_REC_GAP, "rj", 0);
	assert_non_null(q);
	assert_memory_equal(q->u.req.prompt, r->tok, 6 * sizeof(int32_t));
	assert_non_null(g);
	assert_true(g > q);
	assert_string_equal(g->u.gap.reason, "attached_late");
	assert_int_equal(g->u.gap.count, 4); /* positions 5 (P-1) .. 8 */
	assert_int_equal(check_all_attn(&s, &e, r), 2);
	assert_true(attn_exists(&s, "rj", 9, NL - 1) && attn_exists(&s, "rj", 10, NL - 1));
	runner_stop(&run);
	free(r);
	sink_close(&s);
	engine_close(&e);
}

/* Write a descriptor straight into the ring the way the producer does (seqlock word last), so it can be one
 * the export API would refuse to publish. `seq_word` is what the slot's seq word gets (seq+1 when intact). */
static void inject(engine *e, const ax_shm_step *d, uint64_t seq_word)
{
	ax_shm_header *h = ax_export_header(e->ex);
	uint64_t head = __atomic_load_n(&h->ring_head, __ATOMIC_ACQUIRE);
	ax_shm_step *slot = (ax_shm_step *)((uint8_t *)h + h->ring_off) + (head & (h->ring_cap - 1));
	__atomic_store_n(&slot->seq, 0, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	ax_shm_step body = *d;
	memcpy((uint8_t *)slot + 8, (uint8_t *)&body + 8, sizeof body - 8);
	__atomic_store_n(&slot->seq, seq_word ? seq_word : head + 1, __ATOMIC_RELEASE);
	__atomic_store_n(&h->ring_head, head + 1, __ATOMIC_RELEASE);
}

static void test_bad_descriptors(void **state)
{
	(void)state;
	engine e;
	engine_open(&e, 0x55);
	sink s = {0};
	sink_listen(&s);
	ax_capture_opts o;
	test_opts(&o);
	runner run;
	runner_start(&run, &o);
	size_t one = 1;
	wait_for(&s, &e, has_hello_count, &one, 5000, "hello");
	treq *r = req_begin(&e, "rv", 4, 0);
	req_prefill(&e, r, (1u << NL) - 1);
	req_decode(&e, r, (1u << NL) - 1);
	/* a FORWARD naming a buffer that does not exist: rejected, never read */
	ax_shm_step bad = {.kind = AX_STEP_FORWARD, .req_id = r->req_id, .req_slot = (uint32_t)(r->req_id & 0xffff),
			   .n_tokens = 1, .pos0 = 5, .seq_len = 6, .index_buf = 99, .layers = {1, 0}};
	inject(&e, &bad, 0);
	wait_for(&s, &e, has_gap_reason, "invalid", 5000, "invalid gap");
	/* a slot whose seq word does not match: a torn copy */
	inject(&e, &bad, 12345);
	wait_for(&s, &e, has_gap_reason, "torn", 5000, "torn gap");
	const ax_record *g = find(&s, AX_REC_GAP, NULL, 0);
	assert_string_equal(g->u.gap.what, "steps");
	assert_int_equal(g->u.gap.count, 1);
	ax_capture_stats st;
	ax_capture_get_stats(run.c, &st);
	assert_int_equal(st.rejected, 2);
	assert_int_equal(check_all_attn(&s, &e, r), 2); /* what came before is intact */
	runner_stop(&run);
	drain_sink(&s, 50);
	check_seq(&s, 0);
	free(r);
	sink_close(&s);
	engine_close(&e);
}

/* A burst into a 4-descriptor ring: the engine drops and counts, the capture reports exactly that many. */
static void test_ring_full(void **state)
{
	(void)state;
	engine e;
	engine_open_cfg(&e, 0x66, 4);
	sink s = {0};
	sink_listen(&s);
	ax_capture_opts o;
	test_opts(&o);
	runner run;
	runner_start(&run, &o);
	size_t one = 1;
	wait_for(&s, &e, has_hello_count, &one, 5000, "hello");
	treq *r = req_begin(&e, "rf", 4, 0);
	req_prefill(&e, r, 1u << (NL - 1));
	uint64_t refused = 0, published = 0;
	for (int i = 0; i < 100; i++) {
		r->tok[r->len] = 7;
		int rv = publish(&e, r, r->len, 1, 1u << (NL - 1), 0);
		assert_true(rv == 0 || rv == -EAGAIN);
		refused += rv == -EAGAIN;
		published += rv == 0;
		r->len++;
	}
	assert_true(refused > 0);
	sleep_ms(50);
	assert_int_equal(ax_export_request_end(e.ex, r->req_id, AX_END_STOP), 0);
	wait_for(&s, &e, has_end, "rf", 5000, "end rf");
	uint64_t reported = 0;
	for (size_t i = 0; i < s.n; i++)
		if (s.v[i].type == AX_REC_GAP && strcmp(s.v[i].u.gap.reason, "ring_full") == 0)
			reported += s.v[i].u.gap.count;
	assert_int_equal(reported, refused);
	assert_int_equal(check_all_attn(&s, &e, r), 1 + published);
	runner_stop(&run);
	free(r);
	sink_close(&s);
	engine_close(&e);
}

/* A relay that comes up after the attach still learns the shape: the hello is repeated every 5 s while attached. */
static void test_hello_repeated(void **state)
{
	(void)state;
	engine e;
	engine_open(&e, 0x4711);
	ax_capture_opts o;
	test_opts(&o);
	runner run;
	runner_start(&run, &o);
	assert_true(attached(&e));
	sink s = {0};
	sink_listen(&s); /* the "relay" starts after the first hello */
	size_t two = 2;
	uint64_t t0 = ax_now_ns();
	wait_for(&s, &e, has_hello_count, &two, 12000, "a repeated hello");
	assert_true(ax_now_ns() - t0 >= 3000000000ull); /* one every 5 s, not a flood */
	const ax_record *h = find(&s, AX_REC_HELLO, NULL, 0);
	assert_non_null(h);
	assert_int_equal(h->u.hello.n_layers, NL);
	runner_stop(&run);
	sink_close(&s);
	engine_close(&e);
}

int main(void)
{
	snprintf(g_shm, sizeof g_shm, "/attnx.capture-test.%d", (int)getpid());
	snprintf(g_rec_addr, sizeof g_rec_addr, "ipc:///tmp/attnx-capture-test-%d-records.sock", (int)getpid());
	snprintf(g_pol_addr, sizeof g_pol_addr, "ipc:///tmp/attnx-capture-test-%d-policy.sock", (int)getpid());
	ax_log_set_level(AX_LOG_WARN);
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_options),
		cmocka_unit_test(test_sender_clock_order),
		cmocka_unit_test(test_hello_repeated),
		cmocka_unit_test(test_layers_and_lists),
		cmocka_unit_test(test_policy_table),
		cmocka_unit_test(test_stream),
		cmocka_unit_test(test_policy),
		cmocka_unit_test(test_policy_ack),
		cmocka_unit_test(test_policy_ack_unattached),
		cmocka_unit_test(test_no_relay),
		cmocka_unit_test(test_restart),
		cmocka_unit_test(test_attached_late),
		cmocka_unit_test(test_bad_descriptors),
		cmocka_unit_test(test_buffers_late),
		cmocka_unit_test(test_ring_full),
	};
	int rv = cmocka_run_group_tests(tests, NULL, NULL);
	nng_fini();
	return rv;
}
