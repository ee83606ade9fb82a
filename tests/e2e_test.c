/*
 * e2e_test.c — the end-to-end test: attnx-test-producer → attnx-capture → attnx-relay → clients (an OpenAI client
 * over libcurl, a WebSocket client on /ws, and attnx-tail on the nng feed), all real processes.
 *
 * The group set-up starts the producer, the relay, the capture and attnx-tail with addresses unique to this run
 * (shm name, ipc paths and TCP ports carry the test's pid) so several runs can share a machine, waits until each is
 * ready (HTTP health, the capture attached to the segment), and connects the WebSocket client. Cases, in order:
 *   stream_chat          a streamed chat request with return_attention_tokens: every generated token's chunk
 *                        carries the entry of its position (DESIGN §4 alignment), prompt_attention carries P-1,
 *                        with every layer the request asked for although the capture's default is the last layer
 *                        only (the relay waits for the capture to acknowledge the request's policy),
 *                        every entry (all layers) equals a float64 brute force over the Q/K of qk_gen.h (top-k
 *                        positions and order exactly, logits, scores and logsumexp to 1e-5 relative), the text is
 *                        the deterministic token sequence;
 *   nonstream_completion the same through a non-streamed /v1/completions request;
 *   feeds_agree          the WebSocket feed and attnx-tail saw the same attn records of those requests, each again
 *                        equal to the brute force, and every seq hole per source is named by a gap record;
 *   capture_restart      SIGKILL the capture mid-stream and start it again: the stream still completes with every
 *                        token, a gap record is reported, the entries that did arrive are exact, a following request
 *                        is complete again, nothing else died;
 *   clean_shutdown       SIGTERM everything: each process exits 0, attnx-tail's recording replays.
 * argv: producer relay capture tail binaries [bf16]. Exits 77 (skip) if a binary is missing. Logs of every process are in
 * /tmp/attnx-e2e-<pid>/, printed on failure and removed after a clean run.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <civetweb.h>
#include <curl/curl.h>
#include <jansson.h>

#include "attnx_common.h"
#include "attnx_shm.h"
#include "e2e_util.h"
#include "qk_gen.h"

/* The producer's model shape: power-of-two head_dim (exact scale 1/8) and head counts, see qk_gen.h. */
#define LAYERS 4
#define QH 8
#define KVH 2
#define HD 64
#define TOPK 5
#define TOL 1e-5

enum { P_PRODUCER, P_RELAY, P_CAPTURE, P_TAIL, P_N };

static struct {
	const char *bin[P_N];
	char dir[128], shm[64], rec[160], pol[160], feed[160];
	int prod_port, relay_port;
	ex_proc p[P_N];      /* producer, relay, capture, tail (tail's stdout: <dir>/tail.jsonl) */
	/* WebSocket client */
	struct mg_connection *ws;
	pthread_mutex_t ws_mu;
	json_t *ws_recs;     /* array of records (objects) */
	int ws_closed;
	/* rids of the requests whose records the feed cases compare */
	char rids[4][64];
	int n_rids;
	int dtype_bf16;
} E = {.ws_mu = PTHREAD_MUTEX_INITIALIZER,
       .p = {{.name = "producer"}, {.name = "relay"}, {.name = "capture"}, {.name = "tail"}}};

/* ---- processes ------------------------------------------------------------------------------------------------ */

static void spawn(int which, char **argv)
{
	if (E.p[which].argv != argv) {
		ex_argv_free(E.p[which].argv);
		E.p[which].argv = argv;
	}
	ex_spawn(&E.p[which], E.dir);
}

static int alive(int which)
{
	return ex_alive(&E.p[which]);
}

/* SIGTERM (or `sig`) and wait up to 10 s; returns the exit status, 128+signal if killed, -1 if it had to be killed. */
static int stop(int which, int sig)
{
	return ex_stop(&E.p[which], sig);
}

static void dump_logs(void)
{
	ex_dump_logs(E.p, P_N, E.dir);
}

/* ---- the world of qk_gen.h and the float64 brute force ---------------------------------------------------------- */

typedef struct bf_result {
	int k;
	int64_t pos[TOPK];
	double logit[TOPK], score[TOPK], lse;
} bf_result;

/* mean_logit over query heads of layer `l` at position p of a request with `seed` (DESIGN §1), float64. */
static void brute_force(uint64_t seed, int l, int64_t p, bf_result *out)
{
	int64_t n = p + 1;
	double *s = calloc((size_t)n, sizeof *s);
	double scale = 1.0 / sqrt((double)HD), q[QH][HD], mx = -INFINITY, z = 0;

	for (int h = 0; h < QH; h++) {
		uint64_t key = ax_qk_row_key(seed, AX_QK_Q, (uint32_t)l, (uint64_t)p, (uint32_t)h);
		for (int d = 0; d < HD; d++)
			q[h][d] = ax_qk_m(key, (uint32_t)d) / 64.0;
	}
	for (int64_t j = 0; j < n; j++) {
		for (int g = 0; g < KVH; g++) {
			uint64_t key = ax_qk_row_key(seed, AX_QK_K, (uint32_t)l, (uint64_t)j, (uint32_t)g);
			double k[HD];
			for (int d = 0; d < HD; d++)
				k[d] = ax_qk_m(key, (uint32_t)d) / 64.0;
			for (int h = g * (QH / KVH); h < (g + 1) * (QH / KVH); h++) {
				double dot = 0;
				for (int d = 0; d < HD; d++)
					dot += q[h][d] * k[d];
				s[j] += scale * dot / QH;
			}
		}
		mx = s[j] > mx ? s[j] : mx;
	}
	for (int64_t j = 0; j < n; j++)
		z += exp(s[j] - mx);
	out->lse = mx + log(z);
	out->k = n < TOPK ? (int)n : TOPK;
	for (int i = 0; i < out->k; i++) { /* selection: highest logit, ties by lower position */
		int64_t best = -1;
		for (int64_t j = 0; j < n; j++) {
			int taken = 0;
			for (int t = 0; t < i; t++)
				taken |= out->pos[t] == j;
			if (!taken && (best < 0 || s[j] > s[best]))
				best = j;
		}
		out->pos[i] = best;
		out->logit[i] = s[best];
	}
	double zk = 0;
	for (int i = 0; i < out->k; i++)
		zk += exp(out->logit[i] - out->logit[0]);
	for (int i = 0; i < out->k; i++)
		out->score[i] = exp(out->logit[i] - out->logit[0]) / zk;
	free(s);
}

static int close_enough(double got, double want)
{
	return fabs(got - want) <= TOL * fmax(1.0, fabs(want));
}

/* Check one attention entry (an object with layer_id, token_positions, topk_logits, attention_scores,
 * logsumexp_all) at position p. Returns 0 or -1 with a message on stderr. */
static int check_entry(json_t *e, uint64_t seed, int64_t p, const char *where)
{
	json_t *tp = json_object_get(e, "token_positions"), *lg = json_object_get(e, "topk_logits");
	json_t *sc = json_object_get(e, "attention_scores"), *lse = json_object_get(e, "logsumexp_all");
	json_t *layer = json_object_get(e, "layer_id");
	bf_result bf;

	if (!json_is_array(tp) || !json_is_array(lg) || !json_is_number(lse) || !json_is_integer(layer)) {
		fprintf(stderr, "%s: position %lld: entry lacks fields\n", where, (long long)p);
		return -1;
	}
	brute_force(seed, (int)json_integer_value(layer), p, &bf);
	if ((int)json_array_size(tp) != bf.k || (int)json_array_size(lg) != bf.k ||
	    (sc && (int)json_array_size(sc) != bf.k)) {
		fprintf(stderr, "%s: position %lld layer %lld: k %zu, expected %d\n", where, (long long)p,
			json_integer_value(layer), json_array_size(tp), bf.k);
		return -1;
	}
	for (int i = 0; i < bf.k; i++) {
		int64_t gp = json_integer_value(json_array_get(tp, (size_t)i));
		double gl = json_number_value(json_array_get(lg, (size_t)i));
		double gs = sc ? json_number_value(json_array_get(sc, (size_t)i)) : bf.score[i];
		if (gp != bf.pos[i] || !close_enough(gl, bf.logit[i]) || !close_enough(gs, bf.score[i])) {
			fprintf(stderr,
				"%s: position %lld layer %lld rank %d: got (pos %lld, logit %.9g, score %.9g), "
				"brute force (pos %lld, logit %.9g, score %.9g)\n",
				where, (long long)p, json_integer_value(layer), i, (long long)gp, gl, gs,
				(long long)bf.pos[i], bf.logit[i], bf.score[i]);
			return -1;
		}
	}
	if (!close_enough(json_number_value(lse), bf.lse)) {
		fprintf(stderr, "%s: position %lld layer %lld: logsumexp_all %.9g, brute force %.9g\n", where,
			(long long)p, json_integer_value(layer), json_number_value(lse), bf.lse);
		return -1;
	}
	return 0;
}

/* ---- a request and its checks ------------------------------------------------------------------------------------ */

typedef struct req {
	/* what to send */
	int chat, stream, max_tokens;
	uint64_t seed;
	const char *text;
	char rid[64];
	int layers[LAYERS], n_layers;
	/* what came back */
	long status;
	ex_buf body;
	int64_t P;                /* prompt length from the producer's own tokenizer */
	json_t *chunks;           /* streamed: parsed data events */
	int done;                 /* saw [DONE] */
	/* entries by position: seen[(pos - (P-1)) * LAYERS + layer] */
	int *seen;
	int bad_entries, misaligned, checked;
	char text_out[4096];
} req;

static char *req_body(const req *r, int with_attention)
{
	json_t *b = json_pack("{s:s,s:i,s:b,s:I,s:s}", "model", "attnx-test", "max_tokens", r->max_tokens, "stream",
			      r->stream, "seed", (json_int_t)r->seed, "rid", r->rid);
	if (r->chat)
		json_object_set_new(b, "messages", json_pack("[{s:s,s:s}]", "role", "user", "content", r->text));
	else
		json_object_set_new(b, "prompt", json_string(r->text));
	if (with_attention) {
		json_t *ls = json_array();
		for (int i = 0; i < r->n_layers; i++)
			json_array_append_new(ls, json_integer(r->layers[i]));
		json_object_set_new(b, "return_attention_tokens", json_true());
		json_object_set_new(b, "top_k_attention", json_integer(TOPK));
		json_object_set_new(b, "attention_capture_layer_ids", ls);
	}
	char *s = json_dumps(b, JSON_COMPACT);
	json_decref(b);
	return s;
}

/* The prompt length as the producer's tokenizer (and chat template) sees it, asked directly. */
static int64_t prompt_len(const req *r)
{
	char url[128];
	ex_buf b;
	json_t *body = r->chat ? json_pack("{s:[{s:s,s:s}]}", "messages", "role", "user", "content", r->text)
			       : json_pack("{s:s}", "prompt", r->text);
	char *s = json_dumps(body, JSON_COMPACT);
	int64_t n = -1;

	snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/tokenize", E.prod_port);
	ex_buf_init(&b);
	if (ex_http(url, s, &b, 5000) == 200) {
		json_t *j = json_loads(b.p, 0, NULL);
		n = json_integer_value(json_object_get(j, "count"));
		json_decref(j);
	}
	ex_buf_fini(&b);
	free(s);
	json_decref(body);
	return n;
}

static void req_init(req *r, int chat, int stream, int max_tokens, uint64_t seed, const char *text, const char *tag)
{
	memset(r, 0, sizeof *r);
	r->chat = chat;
	r->stream = stream;
	r->max_tokens = max_tokens;
	r->seed = seed;
	r->text = text;
	snprintf(r->rid, sizeof r->rid, "e2e-%d-%s", (int)getpid(), tag);
	r->layers[0] = 0;
	r->layers[1] = LAYERS - 1;
	r->n_layers = 2;
	ex_buf_init(&r->body);
	r->chunks = json_array();
	if (E.n_rids < 4)
		snprintf(E.rids[E.n_rids++], sizeof E.rids[0], "%s", r->rid);
}

static void req_fini(req *r)
{
	ex_buf_fini(&r->body);
	json_decref(r->chunks);
	free(r->seen);
}

static void *req_run(void *arg)
{
	req *r = arg;
	char url[128], *body = req_body(r, 1);

	snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/%s", E.relay_port, r->chat ? "chat/completions" : "completions");
	r->status = ex_http(url, body, &r->body, 60000);
	free(body);
	return NULL;
}

/* Split the SSE body into parsed chunks; note [DONE]. */
static void parse_sse(req *r)
{
	json_decref(r->chunks);
	r->chunks = ex_sse_parse(r->body.p, &r->done);
}

/* Where a response puts its text and attention: choices[0].delta (chat stream), choices[0] (others). */
static json_t *target(const req *r, json_t *obj)
{
	json_t *c0 = json_array_get(json_object_get(obj, "choices"), 0);
	return r->chat && r->stream ? json_object_get(c0, "delta") : c0;
}

/* Check every layer of one entry (the top-level fields, and each value of its "layers" map). */
static void check_position_entry(req *r, json_t *e, const char *where)
{
	json_t *pos = json_object_get(e, "position"), *layers = json_object_get(e, "layers"), *v;
	const char *key;
	int64_t p = json_integer_value(pos);

	if (!json_is_integer(pos) || p < r->P - 1 || p >= r->P + r->max_tokens) {
		fprintf(stderr, "%s: entry with bad position\n", where);
		r->bad_entries++;
		return;
	}
	int64_t want_tok = p < r->P ? -1 : ax_qk_token(r->seed, (uint64_t)p);
	if (want_tok >= 0 && json_integer_value(json_object_get(e, "token_id")) != want_tok) {
		fprintf(stderr, "%s: position %lld: token_id %lld, expected %lld\n", where, (long long)p,
			json_integer_value(json_object_get(e, "token_id")), (long long)want_tok);
		r->bad_entries++;
	}
	int n = 0;
	json_t *list[LAYERS + 1];
	if (json_is_object(layers)) {
		json_object_foreach(layers, key, v)
			if (n < LAYERS)
				list[n++] = v;
	} else {
		list[n++] = e;
	}
	for (int i = 0; i < n; i++) {
		int l = (int)json_integer_value(json_object_get(list[i], "layer_id"));
		r->checked++;
		if (check_entry(list[i], r->seed, p, where))
			r->bad_entries++;
		else if (l >= 0 && l < LAYERS)
			r->seen[(p - (r->P - 1)) * LAYERS + l]++;
	}
}

static void check_entries(req *r, json_t *arr, const char *where, int64_t want_pos)
{
	size_t i;
	json_t *e;

	json_array_foreach(arr, i, e) {
		if (want_pos >= 0 && json_integer_value(json_object_get(e, "position")) != want_pos) {
			fprintf(stderr, "%s: entry for position %lld in the chunk of position %lld\n", where,
				json_integer_value(json_object_get(e, "position")), (long long)want_pos);
			r->misaligned++;
		}
		check_position_entry(r, e, where);
	}
}

static void append_text(req *r, const char *t)
{
	if (t)
		strncat(r->text_out, t, sizeof r->text_out - strlen(r->text_out) - 1);
}

/* Walk the chunks in order: token i's chunk (i ≥ 1) must carry position P+i-1; chunks without text carry late
 * entries (no alignment check). */
static void check_stream(req *r)
{
	size_t i;
	json_t *c;
	int tok = 0;

	json_array_foreach(r->chunks, i, c) {
		json_t *t = target(r, c);
		const char *text = json_string_value(json_object_get(t, r->chat ? "content" : "text"));
		int has_token = text && text[0];
		check_entries(r, json_object_get(t, "prompt_attention"), "prompt_attention", -1);
		check_entries(r, json_object_get(t, "attention_tokens"), "attention_tokens",
			      has_token && tok > 0 ? r->P + tok - 1 : -1);
		if (has_token) {
			append_text(r, text);
			tok++;
		}
	}
}

static void check_whole(req *r)
{
	json_t *j = json_loads(r->body.p ? r->body.p : "", 0, NULL);
	json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);

	check_entries(r, json_object_get(c0, "prompt_attention"), "prompt_attention", -1);
	check_entries(r, json_object_get(c0, "attention_tokens"), "attention_tokens", -1);
	append_text(r, json_string_value(r->chat ? json_object_get(json_object_get(c0, "message"), "content")
						 : json_object_get(c0, "text")));
	json_decref(j);
}

static void expected_text(const req *r, char *out, size_t cap)
{
	out[0] = 0;
	for (int i = 0; i < r->max_tokens; i++)
		strncat(out, ax_qk_words[ax_qk_token(r->seed, (uint64_t)(r->P + i)) - AX_QK_WORD_BASE],
			cap - strlen(out) - 1);
}

/* Positions [P-1, P+max_tokens-2] × requested layers that have no checked entry. */
static int missing_entries(const req *r, int verbose)
{
	int missing = 0;

	for (int64_t p = r->P - 1; p <= r->P + r->max_tokens - 2; p++)
		for (int i = 0; i < r->n_layers; i++)
			if (!r->seen[(p - (r->P - 1)) * LAYERS + r->layers[i]]) {
				if (verbose && missing < 5)
					fprintf(stderr, "%s: no entry for position %lld layer %d\n", r->rid, (long long)p,
						r->layers[i]);
				missing++;
			}
	return missing;
}

static void run_and_check(req *r)
{
	r->P = prompt_len(r);
	assert_true(r->P > 0);
	r->seen = calloc((size_t)(r->max_tokens + 1) * LAYERS, sizeof *r->seen);
	req_run(r);
	assert_int_equal(r->status, 200);
	if (r->stream) {
		parse_sse(r);
		check_stream(r);
	} else {
		check_whole(r);
	}
}

static void assert_exact(req *r)
{
	char want[4096];

	expected_text(r, want, sizeof want);
	if (strcmp(want, r->text_out))
		fail_msg("%s: text '%s', expected '%s'", r->rid, r->text_out, want);
	if (r->stream)
		assert_true(r->done);
	if (r->bad_entries || r->misaligned || missing_entries(r, 1)) {
		dump_logs();
		fail_msg("%s: %d entries differ from the brute force, %d misaligned, %d missing (of %d checked)", r->rid,
			 r->bad_entries, r->misaligned, missing_entries(r, 0), r->checked);
	}
}

/* ---- WebSocket client ----------------------------------------------------------------------------------------- */

static void ws_take(json_t *j)
{
	size_t i;
	json_t *v;

	if (json_is_array(j)) {
		json_array_foreach(j, i, v)
			ws_take(v);
	} else if (json_is_object(j) && json_object_get(j, "t")) {
		json_array_append(E.ws_recs, j);
	} else if (json_is_object(j) && json_is_array(json_object_get(j, "records"))) {
		ws_take(json_object_get(j, "records"));
	}
}

static int ws_data(struct mg_connection *c, int flags, char *data, size_t len, void *arg)
{
	if ((flags & 0xf) == MG_WEBSOCKET_OPCODE_TEXT) {
		json_t *j = json_loadb(data, len, 0, NULL);
		pthread_mutex_lock(&E.ws_mu);
		ws_take(j);
		pthread_mutex_unlock(&E.ws_mu);
		json_decref(j);
	}
	return 1;
}

static void ws_close(const struct mg_connection *c, void *arg)
{
	pthread_mutex_lock(&E.ws_mu);
	E.ws_closed = 1;
	pthread_mutex_unlock(&E.ws_mu);
}

/* ---- feed records (tail output, WebSocket) ------------------------------------------------------------------------ */

static json_t *tail_records(void)
{
	return ex_jsonl_read(E.p[P_TAIL].out);
}

static int ours(json_t *rec)
{
	const char *rid = json_string_value(json_object_get(rec, "rid"));

	for (int i = 0; rid && i < E.n_rids; i++)
		if (!strcmp(rid, E.rids[i]))
			return 1;
	return 0;
}

/* "src#seq" → record of our attn records. */
static json_t *attn_index(json_t *recs)
{
	json_t *idx = json_object(), *r;
	size_t i;
	char key[256];

	json_array_foreach(recs, i, r) {
		const char *t = json_string_value(json_object_get(r, "t"));
		if (!t || strcmp(t, "attn") || !ours(r))
			continue;
		snprintf(key, sizeof key, "%s#%lld", json_string_value(json_object_get(r, "src")),
			 json_integer_value(json_object_get(r, "seq")));
		json_object_set(idx, key, r);
	}
	return idx;
}

/* seq holes per source not named by a gap record of that source. */
static int uncovered_holes(json_t *recs)
{
	json_t *bysrc = json_object(), *r;
	size_t i;
	int holes = 0;

	json_array_foreach(recs, i, r) {
		const char *src = json_string_value(json_object_get(r, "src"));
		if (!src)
			continue;
		json_t *l = json_object_get(bysrc, src);
		if (!l)
			json_object_set_new(bysrc, src, l = json_array());
		json_array_append(l, r);
	}
	const char *src;
	json_t *l;
	json_object_foreach(bysrc, src, l) {
		int64_t prev = -1;
		json_array_foreach(l, i, r) {
			int64_t s = json_integer_value(json_object_get(r, "seq"));
			for (int64_t m = prev + 1; prev >= 0 && m < s; m++) {
				int covered = 0;
				size_t k;
				json_t *g;
				json_array_foreach(l, k, g) {
					const char *t = json_string_value(json_object_get(g, "t"));
					if (t && !strcmp(t, "gap") &&
					    json_integer_value(json_object_get(g, "from_seq")) <= m &&
					    m < json_integer_value(json_object_get(g, "to_seq")))
						covered = 1;
				}
				if (!covered) {
					if (holes < 5)
						fprintf(stderr, "src %s: seq %lld missing, no gap names it\n", src,
							(long long)m);
					holes++;
				}
			}
			if (s > prev)
				prev = s;
		}
	}
	json_decref(bysrc);
	return holes;
}

/* ---- set-up and cases ---------------------------------------------------------------------------------------------- */

/* The capture runs with its default layer set, the last layer only, while the requests ask for other layers (0 and
 * the last; 1): those come only from the request's policy. A policy reaches the capture over nng PUB/SUB while the
 * request would reach the engine over HTTP, so the relay holds each attention request until every live capture has
 * acknowledged its policy (the capture acks after the segment's wanted layers include it). Without that, the
 * prefill row could be computed from the defaults: prompt_attention would lack the asked layers, and the engine
 * would not have exported their Q rows. missing_entries() checks that every asked layer is there from P-1 on. */
static int start_capture(void)
{
	if (!E.p[P_CAPTURE].argv)
		E.p[P_CAPTURE].argv = ex_argv(E.bin[P_CAPTURE], "--shm", E.shm, "--records", E.rec, "--policy", E.pol,
					   "--backend", "cpu", "--top-k", "5", "--layers", "last", NULL);
	spawn(P_CAPTURE, E.p[P_CAPTURE].argv);
	for (int i = 0; i < 150 && alive(P_CAPTURE); i++) {
		if (ex_shm_consumer_ready(E.shm)) {
			usleep(800000); /* its SUB socket learns the policy feed; the relay republishes every 500 ms */
			return 0;
		}
		usleep(100000);
	}
	return -1;
}

static int setup(void **state)
{
	char url[128], port[32], listen[64], upstream[96];
	int me = (int)getpid();

	snprintf(E.dir, sizeof E.dir, "/tmp/attnx-e2e-%d", me);
	mkdir(E.dir, 0755);
	snprintf(E.shm, sizeof E.shm, "/attnx.e2e%d", me);
	snprintf(E.rec, sizeof E.rec, "ipc://%s/records.sock", E.dir);
	snprintf(E.pol, sizeof E.pol, "ipc://%s/policy.sock", E.dir);
	snprintf(E.feed, sizeof E.feed, "ipc://%s/feed.sock", E.dir);
	snprintf(E.p[P_TAIL].out, sizeof E.p[P_TAIL].out, "%s/tail.jsonl", E.dir);
	E.prod_port = ex_free_port();
	E.relay_port = ex_free_port();
	if (E.prod_port < 0 || E.relay_port < 0 || E.prod_port == E.relay_port) {
		fprintf(stderr, "e2e set-up: no two free ports (%d, %d)\n", E.prod_port, E.relay_port);
		return -1;
	}
	snprintf(listen, sizeof listen, "127.0.0.1:%d", E.prod_port);
	snprintf(port, sizeof port, "%d", E.relay_port);
	snprintf(upstream, sizeof upstream, "http://127.0.0.1:%d", E.prod_port);

	spawn(P_PRODUCER, ex_argv(E.bin[P_PRODUCER], "--listen", listen, "--shm", E.shm, "--layers", "4", "--q-heads",
				 "8", "--kv-heads", "2", "--head-dim", "64", "--dtype", E.dtype_bf16 ? "bf16" : "f32",
				 "--tokens-per-s", "40", NULL));
	snprintf(url, sizeof url, "http://%s/health", listen);
	if (ex_wait_http(url, 20))
		goto fail;
	snprintf(listen, sizeof listen, "127.0.0.1:%d", E.relay_port);
	spawn(P_RELAY, ex_argv(E.bin[P_RELAY], "--listen", listen, "--upstream", upstream, "--records", E.rec, "--policy",
			      E.pol, "--feed", E.feed, "--attention-wait-ms", "5000", "--policy-wait-ms", "5000", NULL));
	snprintf(url, sizeof url, "http://%s/healthz", listen);
	if (ex_wait_http(url, 20))
		goto fail;
	spawn(P_TAIL, ex_argv(E.bin[P_TAIL], "--feed", E.feed, "--stats", "--record", "/dev/null", NULL));
	if (start_capture())
		goto fail;
	char err[256] = "";
	E.ws_recs = json_array();
	E.ws = mg_connect_websocket_client("127.0.0.1", E.relay_port, 0, err, sizeof err, "/ws", NULL, ws_data,
					   ws_close, NULL);
	if (!E.ws) {
		fprintf(stderr, "websocket: %s\n", err);
		goto fail;
	}
	usleep(300000);
	return 0;
fail:
	fprintf(stderr, "e2e set-up failed\n");
	dump_logs();
	return -1;
}

static int teardown(void **state)
{
	if (E.ws)
		mg_close_connection(E.ws);
	E.ws = NULL;
	for (int i = P_N - 1; i >= 0; i--) {
		ex_proc_forget(&E.p[i]);
	}
	shm_unlink(E.shm);
	json_decref(E.ws_recs);
	return 0;
}

static void test_stream_chat(void **state)
{
	req r;

	req_init(&r, 1, 1, 24, 1234, "the cat sat on a mat and the dog ran to the house", "chat");
	run_and_check(&r);
	assert_exact(&r);
	req_fini(&r);
}

static void test_nonstream_completion(void **state)
{
	req r;

	req_init(&r, 0, 0, 16, 99, "a big red sun was warm", "cmpl");
	r.layers[0] = 1; /* one layer only: the entry's top level carries it */
	r.n_layers = 1;
	run_and_check(&r);
	assert_exact(&r);
	req_fini(&r);
}

static void test_feeds_agree(void **state)
{
	usleep(500000); /* the last records reach both subscribers */
	json_t *tail = tail_records();
	pthread_mutex_lock(&E.ws_mu);
	json_t *ws = json_deep_copy(E.ws_recs);
	pthread_mutex_unlock(&E.ws_mu);
	json_t *ti = attn_index(tail), *wi = attn_index(ws), *r;
	const char *key;
	int only_tail = 0, only_ws = 0, differ = 0, bad = 0;

	json_object_foreach(ti, key, r) {
		json_t *w = json_object_get(wi, key);
		if (!w) {
			only_tail++;
			continue;
		}
		if (!json_equal(json_object_get(r, "token_positions"), json_object_get(w, "token_positions")) ||
		    json_integer_value(json_object_get(r, "position")) != json_integer_value(json_object_get(w, "position")))
			differ++;
		/* the seed of the request is known from its rid */
		const char *rid = json_string_value(json_object_get(r, "rid"));
		uint64_t seed = strstr(rid, "-chat") ? 1234 : 99;
		if (check_entry(r, seed, json_integer_value(json_object_get(r, "position")), "tail record"))
			bad++;
	}
	json_object_foreach(wi, key, r)
		if (!json_object_get(ti, key))
			only_ws++;
	int holes = uncovered_holes(tail);
	fprintf(stderr, "feeds: tail %zu attn records of ours, websocket %zu\n", json_object_size(ti),
		json_object_size(wi));
	int n_ti = (int)json_object_size(ti);
	json_decref(ti);
	json_decref(wi);
	json_decref(tail);
	json_decref(ws);
	if (only_tail || only_ws || differ || bad || holes || n_ti == 0)
		fail_msg("feeds: %d records only in tail, %d only on the websocket, %d differ, %d wrong, %d "
			 "uncovered seq holes, %d records",
			 only_tail, only_ws, differ, bad, holes, n_ti);
}

static int count_gaps_after(json_t *recs, size_t from)
{
	int gaps = 0;
	for (size_t i = from; i < json_array_size(recs); i++) {
		const char *t = json_string_value(json_object_get(json_array_get(recs, i), "t"));
		gaps += t && !strcmp(t, "gap");
	}
	return gaps;
}

static void test_capture_restart(void **state)
{
	req r;
	pthread_t th;
	json_t *before = tail_records();
	size_t n_before = json_array_size(before);

	json_decref(before);
	req_init(&r, 1, 1, 60, 4242, "the bird sang a soft song all night", "restart");
	r.P = prompt_len(&r);
	r.seen = calloc((size_t)(r.max_tokens + 1) * LAYERS, sizeof *r.seen);
	pthread_create(&th, NULL, req_run, &r);
	for (int i = 0; i < 200; i++) { /* let about 15 tokens through */
		pthread_mutex_lock(&r.body.mu);
		int ev = r.body.events;
		pthread_mutex_unlock(&r.body.mu);
		if (ev >= 15)
			break;
		usleep(50000);
	}
	pthread_mutex_lock(&r.body.mu);
	fprintf(stderr, "restart: killing the capture after %d stream events (wall %.3f)\n", r.body.events,
		(double)ax_wall_ns() * 1e-9);
	pthread_mutex_unlock(&r.body.mu);
	assert_int_equal(stop(P_CAPTURE, SIGKILL), 128 + SIGKILL);
	usleep(200000);
	assert_int_equal(start_capture(), 0);
	pthread_join(th, NULL);
	assert_int_equal(r.status, 200);
	parse_sse(&r);
	check_stream(&r);
	char want[4096];
	expected_text(&r, want, sizeof want);
	assert_string_equal(r.text_out, want); /* every token, in order */
	assert_true(r.done);
	if (r.bad_entries || r.misaligned)
		fail_msg("after restart: %d entries differ from the brute force, %d misaligned", r.bad_entries,
			 r.misaligned);
	int missing = missing_entries(&r, 0);
	usleep(1500000); /* gap records and the tail's flush */
	json_t *after = tail_records();
	int gaps = count_gaps_after(after, n_before);
	json_decref(after);
	fprintf(stderr, "restart: %d of %d entries missing, %d gap records after the kill\n", missing,
		r.max_tokens * r.n_layers, gaps);
	assert_true(alive(P_PRODUCER) && alive(P_RELAY) && alive(P_TAIL) && alive(P_CAPTURE));
	req_fini(&r);
	if (!gaps) {
		dump_logs();
		fail_msg("the capture was killed mid-stream but no gap record was reported");
	}
	/* the restarted capture serves a whole request again */
	req_init(&r, 1, 1, 12, 777, "then it went home", "after");
	run_and_check(&r);
	assert_exact(&r);
	req_fini(&r);
}

static void test_clean_shutdown(void **state)
{
	if (E.ws)
		mg_close_connection(E.ws);
	E.ws = NULL;
	assert_int_equal(stop(P_CAPTURE, SIGTERM), 0);
	assert_int_equal(stop(P_RELAY, SIGTERM), 0);
	assert_int_equal(stop(P_PRODUCER, SIGTERM), 0);
	assert_int_equal(stop(P_TAIL, SIGTERM), 0);
	/* the producer unlinked its segment */
	assert_true(shm_open(E.shm, O_RDONLY, 0) < 0);
}

int main(int argc, char **argv)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_stream_chat),
		cmocka_unit_test(test_nonstream_completion),
		cmocka_unit_test(test_feeds_agree),
		cmocka_unit_test(test_capture_restart),
		cmocka_unit_test(test_clean_shutdown),
	};
	if (argc < 5) {
		fprintf(stderr, "usage: e2e_test PRODUCER RELAY CAPTURE TAIL [bf16]\n");
		return 2;
	}
	for (int i = 0; i < P_N; i++) {
		E.bin[i] = argv[1 + i];
		if (access(E.bin[i], X_OK)) {
			fprintf(stderr, "e2e: %s not built (%s): skipping\n", E.p[i].name, E.bin[i]);
			return 77;
		}
	}
	E.dtype_bf16 = argc > 5 && !strcmp(argv[5], "bf16");
	signal(SIGPIPE, SIG_IGN);
	curl_global_init(CURL_GLOBAL_DEFAULT);
	mg_init_library(0);
	int rc = cmocka_run_group_tests(tests, setup, teardown);
	if (rc == 0) { /* the logs are kept only for a failed run */
		char cmd[200];
		snprintf(cmd, sizeof cmd, "rm -rf %s", E.dir);
		if (system(cmd)) {
		}
	}
	mg_exit_library();
	curl_global_cleanup();
	return rc;
}
