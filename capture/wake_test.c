/*
 * wake_test.c — the capture loop sleeps until there is work (suite capwake): a step the engine publishes, a policy
 * frame from the relay and ax_capture_stop each reach a loop whose idle sleep (idle_ms) is 5 s, within a wake-up
 * latency; small jobs run on the loop thread and give the same records as jobs run on workers.
 *
 * One process: a real engine-side segment (ax_export, host K pools / index table / Q ring of random f32), the real
 * capture loop in a thread, an nng PULL socket as the relay's record sink and a PUB socket as its policy publisher.
 * The loop's own timers (heartbeat 250 ms, engine liveness 200 ms) still wake it, so a loop that only polled would
 * see a step after 100 ms on average: the median latency asserted (under 40 ms over 12 trials) fails without the
 * wake-ups.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <nng/nng.h>
#include <nng/protocol/pipeline0/pull.h>
#include <nng/protocol/pubsub0/pub.h>

#include "attnx_common.h"
#include "capture.h"

#define NL 2
#define HQ 4
#define HKV 2
#define HD 16
#define SLOTS 256
#define CTX 128
#define QROWS 256
#define MS 1000000ull
#define TRIALS 12

static char g_shm[64], g_rec[128], g_pol[128];

static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
	return *s;
}
static float rndf(uint64_t *s) { return (float)((rnd(s) >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f; }

/* ---- engine side ------------------------------------------------------------------------------------------- */

typedef struct engine {
	ax_export *ex;
	uint32_t ibuf, qbuf;
	uint64_t rng, req_id;
	uint32_t len;
	int32_t tok[CTX];
} engine;

static void engine_open(engine *e, uint64_t seed)
{
	static int n; /* a fresh segment name per case: a failed case leaves its segment behind */
	snprintf(g_shm, sizeof g_shm, "/attnx.capwake.%d.%d", (int)getpid(), n++);
	memset(e, 0, sizeof *e);
	e->rng = seed;
	ax_export_config cfg = {.name = g_shm, .engine = "wake-test", .model = "m", .world_size = 1, .n_layers = NL,
				.n_q_heads = HQ, .n_kv_heads = HKV, .head_dim = HD, .q_dtype = AX_DTYPE_F32,
				.k_dtype = AX_DTYPE_F32, .max_ctx = CTX, .req_cap = 8, .ring_cap = 256,
				.arena_cap = 4096, .data_size = 4u << 20};
	assert_int_equal(ax_export_open(&e->ex, &cfg), 0);
	for (int l = 0; l < NL; l++) {
		ax_shm_buffer b = {.kind = AX_BUF_K_POOL, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_F32, .layer = l,
				   .ndim = 3, .dim = {SLOTS, HKV, HD}, .scale = 1};
		float *k;
		assert_int_equal(ax_export_add_host_buffer(e->ex, &b, (void **)&k, NULL), 0);
		for (size_t i = 0; i < (size_t)SLOTS * HKV * HD; i++)
			k[i] = rndf(&e->rng);
	}
	ax_shm_buffer ib = {.kind = AX_BUF_INDEX_TOKEN, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_I32, .layer = -1,
			    .ndim = 2, .dim = {1, CTX}, .scale = 1};
	int32_t *index;
	assert_int_equal(ax_export_add_host_buffer(e->ex, &ib, (void **)&index, &e->ibuf), 0);
	for (int j = 0; j < CTX; j++)
		index[j] = (j * 37) % SLOTS;
	ax_shm_buffer qb = {.kind = AX_BUF_Q_RING, .loc = AX_LOC_HOST, .dtype = AX_DTYPE_F32, .layer = -1,
			    .ndim = 3, .dim = {QROWS, HQ, HD}, .scale = 1};
	assert_int_equal(ax_export_add_host_buffer(e->ex, &qb, NULL, &e->qbuf), 0);
}

/* Publish positions [pos0, pos0+n) with random Q rows for both layers. */
static void publish(engine *e, uint32_t n, int prefill)
{
	uint64_t q_row;
	float *q;
	assert_int_equal(ax_export_q_reserve(e->ex, e->qbuf, n * NL, &q_row, (void **)&q), 0);
	for (size_t i = 0; i < (size_t)n * NL * HQ * HD; i++)
		q[i] = rndf(&e->rng);
	for (uint32_t t = 0; t < n; t++)
		e->tok[e->len + t] = (int32_t)(rnd(&e->rng) % 1000);
	ax_shm_step s = {.req_id = e->req_id, .n_tokens = n, .pos0 = e->len, .seq_len = e->len + n,
			 .index_buf = e->ibuf, .decode_step = prefill ? 0 : e->len - 3, .q_row = q_row,
			 .layers = {(1u << NL) - 1, 0}, .flags = prefill ? AX_STEP_F_PREFILL : 0};
	assert_int_equal(ax_export_step(e->ex, &s, e->tok + e->len), 0);
	e->len += n;
}

/* ---- relay side -------------------------------------------------------------------------------------------- */

typedef struct sink {
	nng_socket pull;
	uint64_t n_attn, sum;      /* attn records, and a checksum of their contents */
	int64_t last_pos;          /* highest attn position seen */
	uint32_t last_pos_layers;  /* attn records at last_pos */
	int hello, acked;          /* a hello arrived; the policy echo `want_ack` arrived */
	char want_ack[32];
} sink;

static int on_record(const ax_record *r, void *arg)
{
	sink *s = arg;
	if (r->type == AX_REC_HELLO)
		s->hello = 1;
	if (r->type == AX_REC_POLICY && strcmp(r->rid, s->want_ack) == 0)
		s->acked = 1;
	if (r->type != AX_REC_ATTN)
		return 0;
	const ax_rec_attn *a = &r->u.attn;
	s->n_attn++;
	uint64_t h = (uint64_t)a->position * 1000003u + (uint64_t)a->layer_id * 7919u + a->k;
	for (uint32_t i = 0; i < a->k; i++) {
		uint32_t bits;
		memcpy(&bits, &a->topk_logits[i], sizeof bits);
		h = h * 1099511628211ull ^ (uint64_t)a->token_positions[i] ^ ((uint64_t)bits << 20);
	}
	s->sum += h;
	if (a->position > s->last_pos)
		s->last_pos = a->position, s->last_pos_layers = 0;
	if (a->position == s->last_pos)
		s->last_pos_layers++;
	return 0;
}

/* Read frames until `done(s)` or timeout (heart-beating the engine meanwhile); 0 or -ETIMEDOUT. */
static int recv_until(sink *s, engine *e, int (*done)(const sink *, int64_t), int64_t arg, int timeout_ms)
{
	uint64_t deadline = ax_now_ns() + (uint64_t)timeout_ms * MS;
	while (!done(s, arg)) {
		if (ax_now_ns() > deadline)
			return -ETIMEDOUT;
		ax_export_heartbeat(e->ex);
		nng_msg *m;
		if (nng_recvmsg(s->pull, &m, 0) != 0)
			continue;
		assert_true(ax_frame_decode(nng_msg_body(m), nng_msg_len(m), on_record, s) >= 0);
		nng_msg_free(m);
	}
	return 0;
}

static int got_hello(const sink *s, int64_t unused) { return (void)unused, s->hello; }
static int got_pos(const sink *s, int64_t pos) { return s->last_pos == pos && s->last_pos_layers == NL; }
static int got_ack(const sink *s, int64_t unused) { return (void)unused, s->acked; }

/* Idle for `ms` with the engine alive (heartbeats) and any stray frame read. */
static void idle(sink *s, engine *e, int ms)
{
	uint64_t until = ax_now_ns() + (uint64_t)ms * MS;
	while (ax_now_ns() < until) {
		ax_export_heartbeat(e->ex);
		nng_msg *m;
		if (nng_recvmsg(s->pull, &m, 0) == 0) {
			assert_true(ax_frame_decode(nng_msg_body(m), nng_msg_len(m), on_record, s) >= 0);
			nng_msg_free(m);
		}
	}
}

/* ---- the capture in a thread --------------------------------------------------------------------------------- */

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

static void start(runner *r, int32_t inline_kmacs, int with_policy)
{
	ax_capture_opts o;
	ax_capture_opts_default(&o);
	snprintf(o.shm_name, sizeof o.shm_name, "%s", g_shm);
	snprintf(o.records_addr, sizeof o.records_addr, "%s", g_rec);
	snprintf(o.policy_addr, sizeof o.policy_addr, "%s", with_policy ? g_pol : "");
	snprintf(o.src, sizeof o.src, "capture:wake");
	o.layer_sel = AX_LAYERS_ALL;
	o.threads = 1;
	o.stats_interval_ms = 0;
	o.attach_retry_ms = 10;
	o.log_level = AX_LOG_WARN;
	o.idle_ms = 5000; /* far longer than any latency asserted below */
	o.inline_kmacs = inline_kmacs;
	memset(r, 0, sizeof *r);
	assert_int_equal(ax_capture_open(&r->c, &o), 0);
	assert_int_equal(pthread_create(&r->th, NULL, run_main, r), 0);
}

static uint64_t stop(runner *r)
{
	uint64_t t0 = ax_now_ns();
	ax_capture_stop(r->c);
	pthread_join(r->th, NULL);
	uint64_t dt = ax_now_ns() - t0;
	assert_int_equal(r->rv, 0);
	ax_capture_close(r->c);
	return dt;
}

static void sink_open(sink *s)
{
	memset(s, 0, sizeof *s);
	s->last_pos = -1;
	assert_int_equal(nng_pull0_open(&s->pull), 0);
	nng_socket_set_ms(s->pull, NNG_OPT_RECVTIMEO, 2);
	assert_int_equal(nng_listen(s->pull, g_rec, NULL, 0), 0);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* Median and max of lat[TRIALS] (sorted in place), printed and checked. */
static void check_latency(uint64_t *lat, const char *what)
{
	qsort(lat, TRIALS, sizeof *lat, cmp_u64);
	printf("# %s: median %.2f ms, max %.2f ms (idle sleep 5 s)\n", what, lat[TRIALS / 2] / 1e6,
	       lat[TRIALS - 1] / 1e6);
	assert_true(lat[TRIALS / 2] < 40 * MS);  /* polling on its timers would give ~100 ms */
	assert_true(lat[TRIALS - 1] < 1000 * MS); /* a sanity bound: a loaded machine may delay one wake-up */
}

/* ---- cases ------------------------------------------------------------------------------------------------- */

/* A decode step published after 300 ms of idleness reaches the relay's socket as attn records (both layers) within
 * a wake-up latency; jobs inline (kmacs 0 = default) or on a worker (-1: the worker's done-notify wakes the loop). */
static void step_latency(int32_t inline_kmacs, uint64_t *n_attn, uint64_t *sum)
{
	engine e;
	sink s;
	runner r;
	engine_open(&e, 42);
	sink_open(&s);
	start(&r, inline_kmacs, 0);
	assert_int_equal(recv_until(&s, &e, got_hello, 0, 5000), 0);
	const int32_t prompt[3] = {5, 6, 7};
	assert_int_equal(ax_export_request_begin(e.ex, "ax-wake", prompt, 3, &e.req_id), 0);
	publish(&e, 3, 1);
	assert_int_equal(recv_until(&s, &e, got_pos, 2, 5000), 0);
	uint64_t lat[TRIALS];
	for (int i = 0; i < TRIALS; i++) {
		idle(&s, &e, 300);
		uint64_t t0 = ax_now_ns();
		publish(&e, 1, 0);
		assert_int_equal(recv_until(&s, &e, got_pos, e.len - 1, 5000), 0);
		lat[i] = ax_now_ns() - t0;
	}
	check_latency(lat, inline_kmacs < 0 ? "step → records (worker jobs)" : "step → records (inline jobs)");
	assert_true(stop(&r) < 1000 * MS); /* ax_capture_stop wakes the sleeping loop (its idle sleep is 5 s) */
	*n_attn = s.n_attn;
	*sum = s.sum;
	nng_close(s.pull);
	ax_export_close(e.ex);
}

static void test_step_inline(void **state)
{
	uint64_t n, sum;
	step_latency(0, &n, &sum);
	assert_int_equal(n, (uint64_t)(1 + TRIALS) * NL);
	*(uint64_t *)*state = sum;
}

/* The same engine data through worker jobs: the same records. */
static void test_step_workers(void **state)
{
	uint64_t n, sum;
	step_latency(-1, &n, &sum);
	assert_int_equal(n, (uint64_t)(1 + TRIALS) * NL);
	assert_int_equal(sum, *(uint64_t *)*state);
}

/* A policy frame published to an idle capture is acknowledged within a wake-up latency (the relay holds the
 * request until then). */
static void test_policy_ack(void **state)
{
	(void)state;
	engine e;
	sink s;
	runner r;
	nng_socket pub;
	engine_open(&e, 7);
	sink_open(&s);
	assert_int_equal(nng_pub0_open(&pub), 0);
	assert_int_equal(nng_listen(pub, g_pol, NULL, 0), 0);
	start(&r, 0, 1);
	assert_int_equal(recv_until(&s, &e, got_hello, 0, 5000), 0);
	ax_rec_policy p = {.top_k = 3, .mode = AX_MODE_MEAN_LOGIT};
	uint64_t lat[TRIALS];
	for (int i = -1; i < TRIALS; i++) {
		snprintf(s.want_ack, sizeof s.want_ack, "ax-p%d", i);
		s.acked = 0;
		ax_batch b;
		ax_batch_init(&b);
		ax_record rec;
		ax_record_init(&rec, AX_REC_POLICY);
		snprintf(rec.src, sizeof rec.src, "relay");
		snprintf(rec.rid, sizeof rec.rid, "%s", s.want_ack);
		rec.u.policy = p;
		assert_true(ax_batch_add(&b, &rec) >= 0);
		const uint8_t *data;
		size_t len;
		assert_int_equal(ax_batch_finish(&b, &data, &len), 1);
		if (i < 0) { /* the SUB dials in the background: publish until the first echo proves it connected */
			while (recv_until(&s, &e, got_ack, 0, 20) != 0)
				assert_int_equal(nng_send(pub, (void *)data, len, 0), 0);
		} else {
			idle(&s, &e, 300);
			uint64_t t0 = ax_now_ns();
			assert_int_equal(nng_send(pub, (void *)data, len, 0), 0);
			assert_int_equal(recv_until(&s, &e, got_ack, 0, 5000), 0);
			lat[i] = ax_now_ns() - t0;
		}
		ax_batch_fini(&b);
	}
	check_latency(lat, "policy → ack");
	stop(&r);
	nng_close(pub);
	nng_close(s.pull);
	ax_export_close(e.ex);
}

int main(void)
{
	ax_log_set_level(AX_LOG_WARN);
	snprintf(g_rec, sizeof g_rec, "ipc:///tmp/attnx-capwake-%d-rec.sock", (int)getpid());
	snprintf(g_pol, sizeof g_pol, "ipc:///tmp/attnx-capwake-%d-pol.sock", (int)getpid());
	static uint64_t sum;
	const struct CMUnitTest tests[] = {
		{"step_inline", test_step_inline, NULL, NULL, &sum},
		{"step_workers", test_step_workers, NULL, NULL, &sum},
		cmocka_unit_test(test_policy_ack),
	};
	int rv = cmocka_run_group_tests(tests, NULL, NULL);
	nng_fini();
	return rv;
}
