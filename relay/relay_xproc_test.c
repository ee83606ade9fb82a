/*
 * relay_xproc_test.c — the relay against real peers: a relay runs in a thread (HTTP on a free port, nng on per-test
 * ipc addresses), a fake upstream (raw sockets, in a thread) serves OpenAI SSE / JSON and can refuse, stall or die
 * mid-stream, records are pushed into the relay's PULL with nng PUSH, and responses are read with libcurl.
 * The last case starts the attnx-relay binary (argv[1]) and stops it with SIGTERM.
 *
 * Policy acknowledgement runs against a fake capture (its own PUSH and SUB sockets, a `hello`, then an echo of each
 * new policy after a delay, or never): the upstream must see an attention request only after the ack, or after
 * --policy-wait-ms when none comes.
 *
 * The fake upstream closes every connection after one response and says so (`Connection: close`), so libcurl
 * never reuses a connection the fake already closed (that race turned the pass-through 400 into a 502 now and then).
 * It picks its behaviour from the request body's "model": "stream" (role chunk + tokens A B C, then a stop
 * token's finish-only chunk, pushing the `req` and `attn` records of the relay's rid around the chunks as the
 * scenario says, the stop token's row included), "die" (two chunks, then the connection closes), "stall" (reads the
 * request, never answers), "slow" (a chunk every 100 ms until the client is gone), "json" (a non-streamed body with
 * usage, and logprobs when the request asks for them).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <civetweb.h>
#include <curl/curl.h>
#include <jansson.h>
#include <nng/nng.h>
#include <nng/protocol/pipeline0/push.h>
#include <nng/protocol/pubsub0/sub.h>

#include "attnx_common.h"
#include "attnx_proto.h"
#include "attnx_relay.h"

#define P_LEN 4 /* prompt length of every fake request */

static const char *relay_bin;

/* ------------------------------------------------------------------ fixture */

typedef struct fx {
	char rec_addr[128], pol_addr[128], feed_addr[128];
	ax_relay *relay;
	pthread_t relay_th;
	int port;
	/* fake upstream */
	int up_fd, up_port;
	pthread_t up_th;
	atomic_int up_stop, up_requests, up_saw_close;
	int late_ms;          /* "stream": push position P+1's record this long after chunk C instead of before B */
	char last_body[4096]; /* body of the last upstream request */
	atomic_uint_fast64_t up_req_ns; /* ax_now_ns() when the upstream had read its last request */
	pthread_mutex_t mu;
	nng_socket push;
	atomic_uint_fast64_t seq;
} fx;

static int fx_seq;

static void *relay_main(void *arg)
{
	fx *f = arg;
	ax_relay_run(f->relay);
	return NULL;
}

static void push_frame(fx *f, const ax_record *recs, int n)
{
	ax_batch b;
	const uint8_t *p;
	size_t len;
	ax_batch_init(&b);
	for (int i = 0; i < n; i++)
		assert_true(ax_batch_add(&b, &recs[i]) >= 0);
	assert_true(ax_batch_finish(&b, &p, &len) > 0);
	assert_int_equal(nng_send(f->push, (void *)p, len, 0), 0);
	ax_batch_fini(&b);
}

static void rec_head(fx *f, ax_record *r, int type, const char *rid)
{
	ax_record_init(r, type);
	r->v = AX_PROTO_VERSION;
	snprintf(r->src, sizeof r->src, "capture:test:1:0");
	r->seq = atomic_fetch_add(&f->seq, 1);
	if (rid)
		snprintf(r->rid, sizeof r->rid, "%s", rid);
}

static void attn_rec(fx *f, ax_record *r, const char *rid, int64_t pos, int32_t layer)
{
	rec_head(f, r, AX_REC_ATTN, rid);
	ax_rec_attn *a = &r->u.attn;
	a->position = pos;
	a->decode_step = pos < P_LEN ? 0 : pos - P_LEN + 1;
	a->token_id = 100 + pos;
	a->layer_id = layer;
	a->mode = AX_MODE_MEAN_LOGIT;
	a->head_id = -1;
	a->k = 2;
	a->token_positions[0] = pos;
	a->token_positions[1] = 0;
	a->topk_logits[0] = 2.0f;
	a->topk_logits[1] = 1.0f;
	a->attention_scores[0] = 0.75f;
	a->attention_scores[1] = 0.25f;
	a->logsumexp_all = 2.5;
	a->topk_mass = 0.9;
	a->prefill = pos < P_LEN;
}

static void push_attn(fx *f, const char *rid, int64_t pos)
{
	ax_record r;
	attn_rec(f, &r, rid, pos, 5);
	push_frame(f, &r, 1);
}

static void push_req(fx *f, const char *rid)
{
	ax_record r;
	int32_t prompt[P_LEN] = {1, 2, 3, 4};
	rec_head(f, &r, AX_REC_REQ, rid);
	r.u.req.prompt_len = P_LEN;
	r.u.req.prompt = prompt;
	push_frame(f, &r, 1);
}

/* ------------------------------------------------------------------ fake upstream */

typedef struct upconn {
	fx *f;
	int fd;
} upconn;

static int send_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
		if (w <= 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static int sendf(int fd, const char *fmt, ...)
{
	char b[2048];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(b, sizeof b, fmt, ap);
	va_end(ap);
	return send_all(fd, b, (size_t)n);
}

/* Reads one request; returns the body (malloc'd) and the path. */
static char *read_request(int fd, char *path, size_t plen)
{
	char buf[65536];
	size_t n = 0;
	char *end = NULL;
	while (!end && n < sizeof buf - 1) {
		ssize_t r = recv(fd, buf + n, sizeof buf - 1 - n, 0);
		if (r <= 0)
			return NULL;
		n += (size_t)r;
		buf[n] = '\0';
		end = strstr(buf, "\r\n\r\n");
	}
	if (!end)
		return NULL;
	sscanf(buf, "%*s %255s", path);
	(void)plen;
	const char *cl = strcasestr(buf, "Content-Length:");
	size_t len = cl && cl < end ? strtoul(cl + 15, NULL, 10) : 0, have = n - (size_t)(end + 4 - buf);
	char *body = calloc(1, len + 1);
	memcpy(body, end + 4, have < len ? have : len);
	while (have < len) {
		ssize_t r = recv(fd, body + have, len - have, 0);
		if (r <= 0)
			break;
		have += (size_t)r;
	}
	return body;
}

static int chunk(int fd, const char *content)
{
	return sendf(fd,
		     "data: {\"id\":\"cmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"fake\",\"choices\":[{\"index\":0,"
		     "\"delta\":{\"content\":\"%s\"},\"finish_reason\":null}]}\n\n",
		     content);
}

static void serve_stream(fx *f, int fd, const char *rid)
{
	sendf(fd, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n");
	sendf(fd, "data: {\"id\":\"cmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n");
	push_req(f, rid);
	push_attn(f, rid, P_LEN - 1); /* prefill row P-1: goes with token 0 */
	chunk(fd, "A");
	chunk(fd, "B"); /* B's record (position P) comes 30 ms after B: B must wait for it */
	usleep(30000);
	push_attn(f, rid, P_LEN);
	if (!f->late_ms)
		push_attn(f, rid, P_LEN + 1);
	chunk(fd, "C");
	if (f->late_ms) {
		usleep((useconds_t)f->late_ms * 1000);
		push_attn(f, rid, P_LEN + 1); /* after C left: a late entry */
		usleep(50000);
	}
	push_attn(f, rid, P_LEN + 2); /* the row that sampled the stop token: the finish chunk's */
	sendf(fd, "data: {\"id\":\"cmpl-1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n");
	sendf(fd, "data: [DONE]\n\n");
}

/* A non-streamed chat answer "ABC"; with logprobs when asked (as engines do: one entry per sampled token). */
static void serve_json(fx *f, int fd, const char *rid, int logprobs)
{
	push_req(f, rid);
	for (int p = P_LEN - 1; p < P_LEN + 2; p++)
		push_attn(f, rid, p);
	char body[1024];
	snprintf(body, sizeof body,
		 "{\"id\":\"x\",\"object\":\"chat.completion\",\"choices\":[{\"index\":0,\"message\":{\"role\":"
		 "\"assistant\",\"content\":\"ABC\"},\"logprobs\":%s,\"finish_reason\":\"stop\"}],\"usage\":{"
		 "\"prompt_tokens\":4,\"completion_tokens\":3,\"total_tokens\":7}}",
		 logprobs ? "{\"content\":[{\"token\":\"A\",\"logprob\":-0.5},{\"token\":\"B\",\"logprob\":-0.5},"
			    "{\"token\":\"C\",\"logprob\":-0.5}]}"
			  : "null");
	sendf(fd, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %zu\r\n\r\n%s",
	      strlen(body), body);
}

static void *serve_conn(void *arg)
{
	upconn *c = arg;
	fx *f = c->f;
	char path[256] = "";
	char *body = read_request(c->fd, path, sizeof path);
	atomic_store(&f->up_req_ns, ax_now_ns());
	atomic_fetch_add(&f->up_requests, 1);
	json_t *j = body ? json_loads(body, 0, NULL) : NULL;
	const char *model = json_string_value(json_object_get(j, "model")), *rid = json_string_value(json_object_get(j, "rid"));
	pthread_mutex_lock(&f->mu);
	snprintf(f->last_body, sizeof f->last_body, "%s", body ? body : "");
	pthread_mutex_unlock(&f->mu);
	if (strcmp(path, "/v1/models") == 0) {
		const char *m = "{\"object\":\"list\",\"data\":[{\"id\":\"fake\",\"object\":\"model\"}]}";
		sendf(c->fd, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
			     "Content-Length: %zu\r\n\r\n%s", strlen(m), m);
	} else if (model && strcmp(model, "stream") == 0) {
		serve_stream(f, c->fd, rid);
	} else if (model && strcmp(model, "json") == 0) {
		serve_json(f, c->fd, rid, json_is_true(json_object_get(j, "logprobs")));
	} else if (model && strcmp(model, "die") == 0) {
		sendf(c->fd, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n");
		chunk(c->fd, "A");
		chunk(c->fd, "B");
	} else if (model && strcmp(model, "stallmid") == 0) {
		sendf(c->fd, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n");
		chunk(c->fd, "A");
		while (!atomic_load(&f->up_stop))
			usleep(10000);
	} else if (model && strcmp(model, "stall") == 0) {
		while (!atomic_load(&f->up_stop))
			usleep(10000);
	} else if (model && strcmp(model, "slow") == 0) {
		sendf(c->fd, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n");
		for (int i = 0; i < 100 && !atomic_load(&f->up_stop); i++) {
			if (chunk(c->fd, "x")) {
				atomic_store(&f->up_saw_close, 1);
				break;
			}
			usleep(100000);
		}
	} else {
		sendf(c->fd, "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
			     "Content-Length: 2\r\n\r\n{}");
	}
	json_decref(j);
	free(body);
	close(c->fd);
	free(c);
	return NULL;
}

static void *upstream_main(void *arg)
{
	fx *f = arg;
	pthread_t th[64];
	int n = 0;
	while (!atomic_load(&f->up_stop)) {
		int fd = accept(f->up_fd, NULL, NULL);
		if (fd < 0)
			break;
		upconn *c = malloc(sizeof *c);
		*c = (upconn){f, fd};
		if (n < 64 && pthread_create(&th[n], NULL, serve_conn, c) == 0)
			n++;
		else
			serve_conn(c);
	}
	for (int i = 0; i < n; i++)
		pthread_join(th[i], NULL);
	return NULL;
}

static int listen_any(int *port)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t al = sizeof a;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
	assert_int_equal(listen(fd, 64), 0);
	getsockname(fd, (struct sockaddr *)&a, &al);
	*port = ntohs(a.sin_port);
	return fd;
}

/* ------------------------------------------------------------------ setup / teardown */

static int fx_start(fx *f, int refused_upstream, void (*tune)(ax_relay_opts *))
{
	int n = ++fx_seq;
	snprintf(f->rec_addr, sizeof f->rec_addr, "ipc:///tmp/attnx-rt-%d-%d-rec.sock", getpid(), n);
	snprintf(f->pol_addr, sizeof f->pol_addr, "ipc:///tmp/attnx-rt-%d-%d-pol.sock", getpid(), n);
	snprintf(f->feed_addr, sizeof f->feed_addr, "ipc:///tmp/attnx-rt-%d-%d-feed.sock", getpid(), n);
	pthread_mutex_init(&f->mu, NULL);
	f->up_fd = listen_any(&f->up_port);
	if (refused_upstream) { /* a port nobody listens on */
		close(f->up_fd);
		f->up_fd = -1;
	} else {
		assert_int_equal(pthread_create(&f->up_th, NULL, upstream_main, f), 0);
	}
	char up[64];
	snprintf(up, sizeof up, "http://127.0.0.1:%d", f->up_port);
	ax_relay_opts o;
	ax_relay_opts_default(&o);
	o.listen = "127.0.0.1:0";
	o.upstream = up;
	o.records = f->rec_addr;
	o.policy = f->pol_addr;
	o.feed = f->feed_addr;
	o.max_connections = 16;
	o.attention_wait_ms = 2000; /* generous: the alignment test must not depend on timing */
	o.upstream_timeout_ms = 5000;
	if (tune)
		tune(&o);
	assert_int_equal(ax_relay_open(&f->relay, &o), 0);
	f->port = ax_relay_port(f->relay);
	assert_true(f->port > 0);
	assert_int_equal(pthread_create(&f->relay_th, NULL, relay_main, f), 0);
	assert_int_equal(nng_push0_open(&f->push), 0);
	assert_int_equal(nng_dial(f->push, f->rec_addr, NULL, 0), 0);
	return 0;
}

static void fx_stop(fx *f)
{
	uint64_t t0 = ax_now_ns();
	ax_relay_stop(f->relay);
	pthread_join(f->relay_th, NULL);
	uint64_t t1 = ax_now_ns();
	ax_relay_close(f->relay);
	uint64_t t2 = ax_now_ns();
	nng_close(f->push);
	if (getenv("AX_LOG"))
		fprintf(stderr, "stop: run %.1f ms, close %.1f ms, push %.1f ms\n", (t1 - t0) / 1e6, (t2 - t1) / 1e6, (ax_now_ns() - t2) / 1e6);
	atomic_store(&f->up_stop, 1);
	if (f->up_fd >= 0) {
		shutdown(f->up_fd, SHUT_RDWR);
		close(f->up_fd);
		pthread_join(f->up_th, NULL);
	}
	pthread_mutex_destroy(&f->mu);
}

/* ------------------------------------------------------------------ HTTP client */

typedef struct resp {
	long status;
	char *body;
	size_t len;
	char headers[4096];
	size_t hlen;
	int abort_after; /* return 0 from the write callback after this many bytes (client goes away) */
} resp;

static size_t on_body(char *p, size_t sz, size_t n, void *arg)
{
	resp *r = arg;
	size_t k = sz * n;
	if (r->abort_after && r->len >= (size_t)r->abort_after)
		return 0;
	r->body = realloc(r->body, r->len + k + 1);
	memcpy(r->body + r->len, p, k);
	r->len += k;
	r->body[r->len] = '\0';
	return k;
}

static size_t on_header(char *p, size_t sz, size_t n, void *arg)
{
	resp *r = arg;
	size_t k = sz * n;
	if (r->hlen + k < sizeof r->headers) {
		memcpy(r->headers + r->hlen, p, k);
		r->hlen += k;
		r->headers[r->hlen] = '\0';
	}
	return k;
}

static CURLcode http(fx *f, const char *method, const char *path, const char *body, const char *hdr, resp *r)
{
	char url[256];
	snprintf(url, sizeof url, "http://127.0.0.1:%d%s", f->port, path);
	CURL *e = curl_easy_init();
	struct curl_slist *h = NULL;
	h = curl_slist_append(h, "Content-Type: application/json");
	if (hdr)
		h = curl_slist_append(h, hdr);
	curl_easy_setopt(e, CURLOPT_URL, url);
	curl_easy_setopt(e, CURLOPT_HTTPHEADER, h);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
	curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
	curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
	curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 20000L);
	curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
	if (body) {
		curl_easy_setopt(e, CURLOPT_POSTFIELDS, body);
		curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
	}
	CURLcode rc = curl_easy_perform(e);
	curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &r->status);
	curl_slist_free_all(h);
	curl_easy_cleanup(e);
	if (!r->body)
		r->body = calloc(1, 1);
	return rc;
}

/* data: payloads of an SSE body, parsed (strings for non-JSON such as [DONE]). */
static int sse_events(const char *body, json_t **ev, int max)
{
	int n = 0;
	for (const char *p = body; (p = strstr(p, "data: ")) && n < max;) {
		p += 6;
		const char *e = strstr(p, "\n\n");
		size_t len = e ? (size_t)(e - p) : strlen(p);
		json_t *j = json_loadb(p, len, 0, NULL);
		ev[n++] = j ? j : json_stringn(p, len);
		p += len;
	}
	return n;
}

static json_t *delta_of(json_t *ev)
{
	return json_object_get(json_array_get(json_object_get(ev, "choices"), 0), "delta");
}

static const char *content_of(json_t *ev)
{
	return json_string_value(json_object_get(delta_of(ev), "content"));
}

static json_int_t first_pos(json_t *ev, const char *key)
{
	json_t *a = json_object_get(delta_of(ev), key);
	return json_array_size(a) == 1 ? json_integer_value(json_object_get(json_array_get(a, 0), "position")) : -1;
}

/* ------------------------------------------------------------------ tests */

#define CHAT_STREAM "{\"model\":\"stream\",\"stream\":true,\"return_attention_tokens\":true,\"top_k_attention\":2}"

/* Every token's chunk carries its attention: A → prompt_attention [P-1], B → [P], C → [P+1]. */
static void stream_alignment(void **state)
{
	fx f = {0};
	resp r = {0};
	json_t *ev[32];
	fx_start(&f, 0, NULL);
	assert_int_equal(http(&f, "POST", "/v1/chat/completions", CHAT_STREAM, NULL, &r), CURLE_OK);
	assert_int_equal(r.status, 200);
	assert_non_null(strcasestr(r.headers, "text/event-stream"));
	assert_non_null(strcasestr(r.headers, "X-Attnx-Rid: ax-"));
	int n = sse_events(r.body, ev, 32);
	assert_int_equal(n, 6); /* role, A, B, C, finish, [DONE] */
	assert_string_equal(content_of(ev[1]), "A");
	assert_int_equal(first_pos(ev[1], "prompt_attention"), P_LEN - 1);
	assert_string_equal(content_of(ev[2]), "B");
	assert_int_equal(first_pos(ev[2], "attention_tokens"), P_LEN);
	json_t *e = json_array_get(json_object_get(delta_of(ev[2]), "attention_tokens"), 0);
	assert_string_equal(json_string_value(json_object_get(e, "text")), "A");
	assert_int_equal(json_integer_value(json_object_get(e, "token_id")), 100 + P_LEN);
	assert_int_equal(json_integer_value(json_object_get(e, "layer_id")), 5);
	assert_string_equal(content_of(ev[3]), "C");
	assert_int_equal(first_pos(ev[3], "attention_tokens"), P_LEN + 1);
	/* the finish chunk stands for the stop token: it carries the row that sampled it */
	assert_int_equal(first_pos(ev[4], "attention_tokens"), P_LEN + 2);
	assert_string_equal(json_string_value(ev[5]), "[DONE]");
	/* the upstream got the rid in its body, and the response header names the same one */
	pthread_mutex_lock(&f.mu);
	json_t *ub = json_loads(f.last_body, 0, NULL);
	pthread_mutex_unlock(&f.mu);
	const char *rid = json_string_value(json_object_get(ub, "rid"));
	assert_non_null(rid);
	assert_non_null(strstr(r.headers, rid));
	json_decref(ub);
	for (int i = 0; i < n; i++)
		json_decref(ev[i]);
	free(r.body);
	fx_stop(&f);
}

static void short_wait(ax_relay_opts *o)
{
	o->attention_wait_ms = 300;
}

/* C's entry arrives after its hold: C goes without it, an extra chunk brings it, then the end. */
static void stream_late_entry(void **state)
{
	fx f = {.late_ms = 1000};
	resp r = {0};
	json_t *ev[32];
	fx_start(&f, 0, short_wait);
	assert_int_equal(http(&f, "POST", "/v1/chat/completions", CHAT_STREAM, NULL, &r), CURLE_OK);
	int n = sse_events(r.body, ev, 32);
	assert_int_equal(n, 7); /* role, A, B, C, late, finish, [DONE] */
	assert_string_equal(content_of(ev[3]), "C");
	assert_int_equal(first_pos(ev[3], "attention_tokens"), -1);
	assert_string_equal(content_of(ev[4]), "");
	assert_int_equal(first_pos(ev[4], "attention_tokens"), P_LEN + 1);
	assert_string_equal(json_string_value(ev[6]), "[DONE]");
	for (int i = 0; i < n; i++)
		json_decref(ev[i]);
	free(r.body);
	r = (resp){0};
	assert_int_equal(http(&f, "GET", "/metrics", NULL, NULL, &r), CURLE_OK);
	assert_non_null(strstr(r.body, "attnx_relay_late_entries_total 1\n"));
	free(r.body);
	fx_stop(&f);
}

static void non_stream(void **state)
{
	fx f = {0};
	resp r = {0};
	fx_start(&f, 0, NULL);
	assert_int_equal(http(&f, "POST", "/v1/chat/completions",
			      "{\"model\":\"json\",\"return_attention_tokens\":true}", NULL, &r), CURLE_OK);
	assert_int_equal(r.status, 200);
	json_t *j = json_loads(r.body, 0, NULL);
	json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
	json_t *at = json_object_get(c0, "attention_tokens");
	assert_int_equal(json_array_size(at), 2);
	assert_int_equal(json_integer_value(json_object_get(json_array_get(at, 0), "position")), P_LEN);
	assert_int_equal(json_integer_value(json_object_get(json_array_get(at, 1), "position")), P_LEN + 1);
	assert_int_equal(json_array_size(json_object_get(c0, "prompt_attention")), 1);
	/* every entry has its token's text: the relay asked the upstream for logprobs, and took them out again */
	assert_string_equal(json_string_value(json_object_get(json_array_get(at, 0), "text")), "A");
	assert_string_equal(json_string_value(json_object_get(json_array_get(at, 1), "text")), "B");
	assert_true(json_is_null(json_object_get(c0, "logprobs")));
	pthread_mutex_lock(&f.mu);
	json_t *ub = json_loads(f.last_body, 0, NULL);
	pthread_mutex_unlock(&f.mu);
	assert_true(json_is_true(json_object_get(ub, "logprobs")));
	json_decref(ub);
	json_decref(j);
	free(r.body);
	fx_stop(&f);
}

static void refused(void **state)
{
	fx f = {0};
	resp r = {0};
	fx_start(&f, 1, NULL);
	assert_int_equal(http(&f, "POST", "/v1/chat/completions", CHAT_STREAM, NULL, &r), CURLE_OK);
	assert_int_equal(r.status, 502);
	json_t *j = json_loads(r.body, 0, NULL);
	assert_non_null(strstr(json_string_value(json_object_get(json_object_get(j, "error"), "message")), "unreachable"));
	json_decref(j);
	free(r.body);
	r = (resp){0};
	assert_int_equal(http(&f, "GET", "/healthz", NULL, NULL, &r), CURLE_OK);
	assert_non_null(strstr(r.body, "\"reachable\":false"));
	free(r.body);
	fx_stop(&f);
}

static void fast_timeout(ax_relay_opts *o)
{
	o->upstream_timeout_ms = 300;
}

static void stall_times_out(void **state)
{
	fx f = {0};
	resp r = {0};
	fx_start(&f, 0, fast_timeout);
	uint64_t t0 = ax_now_ns();
	assert_int_equal(http(&f, "POST", "/v1/chat/completions", "{\"model\":\"stall\",\"stream\":true}", NULL, &r),
			 CURLE_OK);
	uint64_t ms = (ax_now_ns() - t0) / 1000000;
	assert_int_equal(r.status, 504);
	assert_non_null(strstr(r.body, "timeout"));
	assert_true(ms >= 250 && ms < 3000);
	free(r.body);
	/* a stall after the first chunk: the client has A, then an SSE error event, then the end */
	const char *mids[] = {"{\"model\":\"stallmid\",\"stream\":true}",
			      "{\"model\":\"stallmid\",\"stream\":true,\"return_attention_tokens\":true}"};
	for (int i = 0; i < 2; i++) {
		json_t *ev[8];
		r = (resp){0};
		assert_int_equal(http(&f, "POST", "/v1/chat/completions", mids[i], NULL, &r), CURLE_OK);
		assert_int_equal(r.status, 200);
		int n = sse_events(r.body, ev, 8);
		assert_int_equal(n, 2);
		assert_string_equal(content_of(ev[0]), "A");
		assert_non_null(strstr(json_string_value(json_object_get(json_object_get(ev[1], "error"), "message")),
				       "timeout"));
		for (int k = 0; k < n; k++)
			json_decref(ev[k]);
		free(r.body);
	}
	fx_stop(&f);
}

/* The upstream dies mid-stream: the client gets what came, an error event, the end; the next request works. */
static void death_mid_stream(void **state)
{
	fx f = {0};
	resp r = {0};
	json_t *ev[16];
	fx_start(&f, 0, NULL);
	assert_int_equal(http(&f, "POST", "/v1/chat/completions",
			      "{\"model\":\"die\",\"stream\":true,\"return_attention_tokens\":true}", NULL, &r), CURLE_OK);
	assert_int_equal(r.status, 200);
	int n = sse_events(r.body, ev, 16);
	assert_int_equal(n, 3);
	assert_string_equal(content_of(ev[0]), "A");
	assert_string_equal(content_of(ev[1]), "B");
	assert_non_null(json_object_get(ev[2], "error"));
	for (int i = 0; i < n; i++)
		json_decref(ev[i]);
	free(r.body);
	r = (resp){0}; /* the same without attention: a pass-through stream */
	assert_int_equal(http(&f, "POST", "/v1/chat/completions", "{\"model\":\"die\",\"stream\":true}", NULL, &r),
			 CURLE_OK);
	assert_non_null(strstr(r.body, "\"error\""));
	assert_null(strstr(r.body, "data: [DONE]"));
	free(r.body);
	r = (resp){0};
	assert_int_equal(http(&f, "POST", "/v1/chat/completions", CHAT_STREAM, NULL, &r), CURLE_OK);
	assert_non_null(strstr(r.body, "data: [DONE]"));
	free(r.body);
	fx_stop(&f);
}

static void client_gone_cancels(void **state)
{
	fx f = {0};
	resp r = {.abort_after = 1};
	fx_start(&f, 0, NULL);
	assert_int_not_equal(http(&f, "POST", "/v1/chat/completions", "{\"model\":\"slow\",\"stream\":true}", NULL, &r),
			     CURLE_OK);
	for (int i = 0; i < 300 && !atomic_load(&f.up_saw_close); i++)
		usleep(10000);
	assert_true(atomic_load(&f.up_saw_close));
	free(r.body);
	fx_stop(&f);
}

static void passthrough_and_errors(void **state)
{
	fx f = {0};
	resp r = {0};
	fx_start(&f, 0, NULL);
	assert_int_equal(http(&f, "GET", "/v1/models", NULL, NULL, &r), CURLE_OK);
	assert_int_equal(r.status, 200);
	assert_non_null(strstr(r.body, "\"fake\""));
	free(r.body);
	static const struct {
		const char *body;
		long status;
	} bad[] = {{"{nope", 400}, {"[]", 400}, {"{\"stream\":1}", 400}, {"{\"top_k_attention\":\"5\"}", 400},
		   {"{\"model\":\"other\"}", 400 /* the upstream's own 400, passed through */}};
	for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
		r = (resp){0};
		assert_int_equal(http(&f, "POST", "/v1/chat/completions", bad[i].body, NULL, &r), CURLE_OK);
		assert_int_equal(r.status, bad[i].status);
		free(r.body);
	}
	r = (resp){0};
	assert_int_equal(http(&f, "GET", "/v1/chat/completions", NULL, NULL, &r), CURLE_OK);
	assert_int_equal(r.status, 405);
	free(r.body);
	fx_stop(&f);
}

static void small_body_and_token(ax_relay_opts *o)
{
	static const char *cors[] = {"http://ok.example"};
	o->max_body = 1024;
	o->token = "sekret";
	o->cors[0] = cors[0];
	o->n_cors = 1;
}

static void cap_auth_cors(void **state)
{
	fx f = {0};
	resp r = {0};
	fx_start(&f, 0, small_body_and_token);
	char big[4096];
	memset(big, ' ', sizeof big - 1);
	big[0] = '{';
	big[sizeof big - 2] = '}';
	big[sizeof big - 1] = '\0';
	assert_int_equal(http(&f, "POST", "/v1/chat/completions", big, "Authorization: Bearer sekret", &r), CURLE_OK);
	assert_int_equal(r.status, 413);
	free(r.body);
	struct {
		const char *path, *hdr;
		long status;
	} cases[] = {
		{"/healthz", NULL, 200},
		{"/metrics", NULL, 401},
		{"/metrics", "Authorization: Bearer wrong", 401},
		{"/metrics", "Authorization: Bearer sekret", 200},
		{"/metrics?token=sekret", NULL, 200},
		{"/v1/models", NULL, 401},
		{"/v1/attention/capabilities", "Authorization: Bearer sekret", 200},
	};
	for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
		r = (resp){0};
		assert_int_equal(http(&f, "GET", cases[i].path, NULL, cases[i].hdr, &r), CURLE_OK);
		if (r.status != cases[i].status)
			fail_msg("%s: %ld, want %ld", cases[i].path, r.status, cases[i].status);
		free(r.body);
	}
	r = (resp){0};
	http(&f, "GET", "/healthz", NULL, "Origin: http://ok.example", &r);
	assert_non_null(strstr(r.headers, "Access-Control-Allow-Origin: http://ok.example"));
	free(r.body);
	r = (resp){0};
	http(&f, "GET", "/healthz", NULL, "Origin: http://evil.example", &r);
	assert_null(strstr(r.headers, "Access-Control-Allow-Origin"));
	free(r.body);
	r = (resp){0};
	http(&f, "OPTIONS", "/v1/chat/completions", NULL, "Origin: http://ok.example", &r);
	assert_int_equal(r.status, 204);
	assert_non_null(strstr(r.headers, "Access-Control-Allow-Headers"));
	free(r.body);
	fx_stop(&f);
}

/* ------------------------------------------------------------------ feeds */

typedef struct wsc {
	pthread_mutex_t mu;
	char *msg[64];
	size_t len[64];
	int bin[64];
	int n;
} wsc;

static int ws_on_data(struct mg_connection *c, int flags, char *data, size_t len, void *arg)
{
	wsc *w = arg;
	int op = flags & 0xf;
	if (op != MG_WEBSOCKET_OPCODE_TEXT && op != MG_WEBSOCKET_OPCODE_BINARY)
		return 1;
	pthread_mutex_lock(&w->mu);
	if (w->n < 64) {
		w->msg[w->n] = malloc(len + 1);
		memcpy(w->msg[w->n], data, len);
		w->msg[w->n][len] = '\0';
		w->len[w->n] = len;
		w->bin[w->n] = op == MG_WEBSOCKET_OPCODE_BINARY;
		w->n++;
	}
	pthread_mutex_unlock(&w->mu);
	return 1;
}

static int ws_wait(wsc *w, int n)
{
	for (int i = 0; i < 300; i++) {
		pthread_mutex_lock(&w->mu);
		int have = w->n;
		pthread_mutex_unlock(&w->mu);
		if (have >= n)
			return have;
		usleep(10000);
	}
	return w->n;
}

static struct mg_connection *ws_open(fx *f, wsc *w)
{
	char err[256];
	pthread_mutex_init(&w->mu, NULL);
	struct mg_connection *c =
		mg_connect_websocket_client("127.0.0.1", f->port, 0, err, sizeof err, "/ws", NULL, ws_on_data, NULL, w);
	assert_non_null(c);
	for (int i = 0; i < 200; i++) { /* wait until the relay lists the client */
		resp r = {0};
		http(f, "GET", "/healthz", NULL, NULL, &r);
		int ok = strstr(r.body, "\"ws_clients\":1") != NULL;
		free(r.body);
		if (ok)
			break;
		usleep(10000);
	}
	return c;
}

static void ws_free(wsc *w)
{
	for (int i = 0; i < w->n; i++)
		free(w->msg[i]);
	pthread_mutex_destroy(&w->mu);
}

/* Keeps a copy of the last decoded record (attn and policy records own no memory). */
static int keep_rec(const ax_record *x, void *arg)
{
	*(ax_record *)arg = *x;
	return 0;
}

static void ws_feed(void **state)
{
	fx f = {0};
	wsc w = {0};
	fx_start(&f, 0, NULL);
	struct mg_connection *c = ws_open(&f, &w);
	ax_record recs[2];
	attn_rec(&f, &recs[0], "rid-a", 7, 3);
	attn_rec(&f, &recs[1], "rid-b", 8, 3);
	push_frame(&f, recs, 2);
	assert_int_equal(ws_wait(&w, 2), 2); /* one JSON text frame per record */
	json_t *j = json_loads(w.msg[0], 0, NULL);
	assert_string_equal(json_string_value(json_object_get(j, "t")), "attn");
	assert_string_equal(json_string_value(json_object_get(j, "rid")), "rid-a");
	json_decref(j);
	assert_false(w.bin[1]);
	/* narrow to rid-b, msgpack */
	const char *sub = "{\"type\":\"subscribe\",\"rids\":[\"rid-b\"],\"format\":\"msgpack\"}";
	mg_websocket_client_write(c, MG_WEBSOCKET_OPCODE_TEXT, sub, strlen(sub));
	assert_int_equal(ws_wait(&w, 3), 3);
	assert_non_null(strstr(w.msg[2], "subscribed"));
	push_frame(&f, recs, 2);
	assert_int_equal(ws_wait(&w, 4), 4);
	usleep(50000);
	assert_int_equal(w.n, 4); /* rid-a was filtered out */
	assert_true(w.bin[3]);
	ax_record got;
	assert_int_equal(ax_frame_decode(w.msg[3], w.len[3], keep_rec, &got), 1);
	assert_string_equal(got.rid, "rid-b");
	mg_close_connection(c);
	ws_free(&w);
	fx_stop(&f);
}

static void pub_feed_verbatim(void **state)
{
	fx f = {0};
	nng_socket sub;
	fx_start(&f, 0, NULL);
	assert_int_equal(nng_sub0_open(&sub), 0);
	nng_socket_set(sub, NNG_OPT_SUB_SUBSCRIBE, "", 0);
	nng_socket_set_ms(sub, NNG_OPT_RECVTIMEO, 3000);
	assert_int_equal(nng_dial(sub, f.feed_addr, NULL, 0), 0);
	usleep(100000);
	ax_record recs[2];
	rec_head(&f, &recs[0], AX_REC_HELLO, NULL);
	snprintf(recs[0].u.hello.engine, sizeof recs[0].u.hello.engine, "fake");
	snprintf(recs[0].u.hello.backend, sizeof recs[0].u.hello.backend, "cpu");
	recs[0].u.hello.world_size = 1;
	recs[0].u.hello.n_layers = 12;
	recs[0].u.hello.n_q_heads = 8;
	recs[0].u.hello.top_k = 5;
	recs[0].u.hello.mode = AX_MODE_MEAN_LOGIT;
	attn_rec(&f, &recs[1], "rid-a", 7, 3);
	ax_batch b;
	const uint8_t *p;
	size_t len;
	ax_batch_init(&b);
	ax_batch_add(&b, &recs[0]);
	ax_batch_add(&b, &recs[1]);
	ax_batch_finish(&b, &p, &len);
	assert_int_equal(nng_send(f.push, (void *)p, len, 0), 0);
	void *got;
	size_t glen;
	assert_int_equal(nng_recv(sub, &got, &glen, NNG_FLAG_ALLOC), 0);
	assert_int_equal(glen, len);
	assert_memory_equal(got, p, len);
	nng_free(got, glen);
	ax_batch_fini(&b);
	/* garbage is counted and not forwarded */
	assert_int_equal(nng_send(f.push, "\x93garbage", 8, 0), 0);
	resp r = {0};
	for (int i = 0; i < 100; i++) {
		free(r.body);
		r = (resp){0};
		http(&f, "GET", "/metrics", NULL, NULL, &r);
		if (strstr(r.body, "attnx_relay_decode_errors_total 1\n"))
			break;
		usleep(10000);
	}
	assert_non_null(strstr(r.body, "attnx_relay_decode_errors_total 1\n"));
	assert_non_null(strstr(r.body, "attnx_relay_records_in_total 2\n"));
	assert_non_null(strstr(r.body, "attnx_relay_ws_latency_seconds_bucket{le=\"+Inf\"}"));
	free(r.body);
	r = (resp){0};
	http(&f, "GET", "/v1/attention/capabilities", NULL, NULL, &r);
	json_t *j = json_loads(r.body, 0, NULL);
	assert_int_equal(json_integer_value(json_object_get(j, "n_layers")), 12);
	assert_int_equal(json_array_size(json_object_get(j, "captures")), 1);
	assert_string_equal(json_string_value(json_object_get(json_array_get(json_object_get(j, "captures"), 0), "engine")),
			    "fake");
	json_decref(j);
	free(r.body);
	r = (resp){0};
	http(&f, "GET", "/healthz", NULL, NULL, &r);
	assert_non_null(strstr(r.body, "\"reachable\":true"));
	assert_non_null(strstr(r.body, "\"captures\":1"));
	free(r.body);
	nng_close(sub);
	fx_stop(&f);
}

/* The policy of an attention request is announced on the policy PUB with the request's fields. */
static void policy_published(void **state)
{
	fx f = {0};
	nng_socket sub;
	fx_start(&f, 0, NULL);
	assert_int_equal(nng_sub0_open(&sub), 0);
	nng_socket_set(sub, NNG_OPT_SUB_SUBSCRIBE, "", 0);
	nng_socket_set_ms(sub, NNG_OPT_RECVTIMEO, 3000);
	assert_int_equal(nng_dial(sub, f.pol_addr, NULL, 0), 0);
	usleep(100000);
	resp r = {0};
	http(&f, "POST", "/v1/chat/completions",
	     "{\"model\":\"json\",\"return_attention_tokens\":true,\"top_k_attention\":7,\"attention_capture_layer_ids\":[1,2],"
	     "\"attention_mode\":\"mean_prob\"}",
	     NULL, &r);
	assert_int_equal(r.status, 200);
	void *got;
	size_t glen;
	assert_int_equal(nng_recv(sub, &got, &glen, NNG_FLAG_ALLOC), 0);
	ax_record rec;
	assert_int_equal(ax_frame_decode(got, glen, keep_rec, &rec), 1);
	assert_int_equal(rec.type, AX_REC_POLICY);
	assert_string_equal(rec.src, "relay");
	assert_int_equal(rec.u.policy.top_k, 7);
	assert_int_equal(rec.u.policy.mode, AX_MODE_MEAN_PROB);
	assert_int_equal(rec.u.policy.n_layer_ids, 2);
	assert_non_null(strstr(r.headers, rec.rid));
	nng_free(got, glen);
	free(r.body);
	nng_close(sub);
	fx_stop(&f);
}

/* ------------------------------------------------------------------ policy acknowledgement */

/* A capture as the relay sees it: a `hello` on its own PUSH connection, then (when ack_ms >= 0) an echo of each new
 * policy ack_ms after it arrived on its SUB. */
typedef struct fakecap {
	fx *f;
	nng_socket push, sub;
	int ack_ms;                 /* < 0: never acknowledges */
	char src[64];
	pthread_t th;
	atomic_int stop, acks;
	atomic_uint_fast64_t ack_ns; /* ax_now_ns() just before the last echo was sent */
	uint64_t seq;
	char acked[16][AX_PROTO_STR];
} fakecap;

static void cap_send(fakecap *c, ax_record *r)
{
	ax_batch b;
	const uint8_t *p;
	size_t len;
	r->v = AX_PROTO_VERSION;
	snprintf(r->src, sizeof r->src, "%s", c->src);
	r->seq = c->seq++;
	ax_batch_init(&b);
	assert_true(ax_batch_add(&b, r) >= 0);
	assert_true(ax_batch_finish(&b, &p, &len) > 0);
	assert_int_equal(nng_send(c->push, (void *)p, len, 0), 0);
	ax_batch_fini(&b);
}

static int is_new(fakecap *c, const char *rid)
{
	int n = atomic_load(&c->acks);
	for (int i = 0; i < n && i < 16; i++)
		if (strcmp(c->acked[i], rid) == 0)
			return 0;
	return 1;
}

static void *fakecap_main(void *arg)
{
	fakecap *c = arg;
	while (!atomic_load(&c->stop)) {
		void *m;
		size_t n;
		ax_record rec;
		if (nng_recv(c->sub, &m, &n, NNG_FLAG_ALLOC) != 0)
			continue;
		int ok = ax_frame_decode(m, n, keep_rec, &rec) == 1 && rec.type == AX_REC_POLICY;
		nng_free(m, n);
		if (!ok || c->ack_ms < 0 || !is_new(c, rec.rid) || atomic_load(&c->acks) >= 16)
			continue;
		usleep((useconds_t)c->ack_ms * 1000);
		snprintf(c->acked[atomic_load(&c->acks)], AX_PROTO_STR, "%s", rec.rid);
		atomic_store(&c->ack_ns, ax_now_ns());
		cap_send(c, &rec); /* the relay's record, echoed with this capture's src and seq */
		atomic_fetch_add(&c->acks, 1);
	}
	return NULL;
}

static void fakecap_start(fx *f, fakecap *c, int ack_ms)
{
	memset(c, 0, sizeof *c);
	c->f = f;
	c->ack_ms = ack_ms;
	snprintf(c->src, sizeof c->src, "capture:fake:%d:0", ack_ms);
	assert_int_equal(nng_push0_open(&c->push), 0);
	assert_int_equal(nng_dial(c->push, f->rec_addr, NULL, 0), 0);
	assert_int_equal(nng_sub0_open(&c->sub), 0);
	nng_socket_set(c->sub, NNG_OPT_SUB_SUBSCRIBE, "", 0);
	nng_socket_set_ms(c->sub, NNG_OPT_RECVTIMEO, 20);
	assert_int_equal(nng_dial(c->sub, f->pol_addr, NULL, 0), 0);
	ax_record h;
	ax_record_init(&h, AX_REC_HELLO);
	snprintf(h.u.hello.engine, sizeof h.u.hello.engine, "fake");
	snprintf(h.u.hello.backend, sizeof h.u.hello.backend, "cpu");
	h.u.hello.world_size = 1;
	h.u.hello.n_layers = 12;
	h.u.hello.n_q_heads = 8;
	h.u.hello.top_k = 5;
	h.u.hello.mode = AX_MODE_MEAN_LOGIT;
	h.u.hello.n_layer_ids = 1;
	h.u.hello.layer_ids[0] = 5;
	cap_send(c, &h);
	assert_int_equal(pthread_create(&c->th, NULL, fakecap_main, c), 0);
}

static void fakecap_stop(fakecap *c)
{
	atomic_store(&c->stop, 1);
	pthread_join(c->th, NULL);
	nng_close(c->sub);
	nng_close(c->push);
}

/* The value of attnx_relay_<name> on /metrics (-1 if absent). */
static long long metric_of(fx *f, const char *name)
{
	resp r = {0};
	char key[128];
	long long v = -1;
	http(f, "GET", "/metrics", NULL, NULL, &r);
	snprintf(key, sizeof key, "\nattnx_relay_%s ", name);
	const char *p = strstr(r.body, key);
	if (p)
		v = strtoll(p + strlen(key), NULL, 10);
	free(r.body);
	return v;
}

/* What reaches the feed without a WebSocket client or a live request (records are then decoded only as far as the
 * capture table needs them): structural garbage is dropped and counted; a well-formed frame whose record fails the
 * field rules is published and counted as a decode error; records_in counts every record of a published frame. */
static void feed_structural_check(void **state)
{
	static const struct {
		const char *bytes;
		size_t len;
		int published; /* reaches the feed */
		int records;   /* added to records_in */
	} cases[] = {
		{"\x91\x81\xa1t\xa5" "bogus", 10, 1, 1},         /* unknown type: field rules fail, structure fine */
		{"\x92\x81\xa1t\xa4" "attn\x01", 10, 0, 0},     /* second element is not a map */
		{"\x92\x81\xa1t\xa4" "attn", 9, 0, 0},          /* array claims two records, holds one */
		{"\x91\x82\xa1t\xa4" "attn", 9, 0, 0},          /* map truncated */
		{"\x91\x81\xa1t\xa4" "attn\xc0", 10, 0, 0},     /* trailing byte */
		{"\xc1", 1, 0, 0},                               /* never-used head byte */
		{"\x90", 1, 1, 0},                               /* empty frame */
	};
	fx f = {0};
	nng_socket sub;
	fx_start(&f, 0, NULL);
	assert_int_equal(nng_sub0_open(&sub), 0);
	nng_socket_set(sub, NNG_OPT_SUB_SUBSCRIBE, "", 0);
	nng_socket_set_ms(sub, NNG_OPT_RECVTIMEO, 3000);
	assert_int_equal(nng_dial(sub, f.feed_addr, NULL, 0), 0);
	usleep(100000);
	long long errors = 0, records = 0;
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		assert_int_equal(nng_send(f.push, (void *)cases[i].bytes, cases[i].len, 0), 0);
		void *got;
		size_t glen;
		assert_int_equal(nng_recv(sub, &got, &glen, NNG_FLAG_ALLOC), 0);
		if (cases[i].published) { /* the frame itself, byte for byte */
			assert_int_equal(glen, cases[i].len);
			assert_memory_equal(got, cases[i].bytes, glen);
		} else { /* the relay's gap for the dropped frame */
			ax_record g;
			assert_int_equal(ax_record_unpack((const uint8_t *)got + 1, glen - 1, &g), 0);
			assert_int_equal(g.type, AX_REC_GAP);
			assert_string_equal(g.u.gap.reason, "invalid");
			ax_record_fini(&g);
		}
		nng_free(got, glen);
		errors += cases[i].len != 1 || !cases[i].published;
		records += cases[i].records;
		long long e = -1;
		for (int t = 0; t < 100 && (e = metric_of(&f, "decode_errors_total")) != errors; t++)
			usleep(10000);
		assert_int_equal(e, errors);
		assert_int_equal(metric_of(&f, "records_in_total"), records);
	}
	nng_close(sub);
	fx_stop(&f);
}

/* Without WebSocket clients or requests, attn records are skipped unread, but every other record of a frame is still
 * decoded: a hello behind attn records reaches the capture table; a frame of attn records alone changes only counts. */
static void feed_fast_path_sees_hello(void **state)
{
	fx f = {0};
	fx_start(&f, 0, NULL);
	ax_record recs[3];
	attn_rec(&f, &recs[0], "rid-a", 7, 3);
	attn_rec(&f, &recs[1], "rid-a", 8, 3);
	rec_head(&f, &recs[2], AX_REC_HELLO, NULL);
	snprintf(recs[2].u.hello.engine, sizeof recs[2].u.hello.engine, "late");
	snprintf(recs[2].u.hello.backend, sizeof recs[2].u.hello.backend, "cpu");
	recs[2].u.hello.world_size = 1;
	recs[2].u.hello.n_layers = 9;
	recs[2].u.hello.n_q_heads = 4;
	recs[2].u.hello.top_k = 5;
	recs[2].u.hello.mode = AX_MODE_MEAN_LOGIT;
	ax_batch b;
	const uint8_t *p;
	size_t len;
	ax_batch_init(&b);
	for (int i = 0; i < 3; i++)
		assert_true(ax_batch_add(&b, &recs[i]) >= 0);
	assert_true(ax_batch_finish(&b, &p, &len) > 0);
	assert_int_equal(nng_send(f.push, (void *)p, len, 0), 0);
	ax_batch_fini(&b);
	long long n = -1;
	for (int t = 0; t < 100 && (n = metric_of(&f, "records_in_total")) != 3; t++)
		usleep(10000);
	assert_int_equal(n, 3);
	assert_int_equal(metric_of(&f, "decode_errors_total"), 0);
	resp r = {0};
	http(&f, "GET", "/v1/attention/capabilities", NULL, NULL, &r);
	json_t *j = json_loads(r.body, 0, NULL);
	assert_non_null(j);
	assert_int_equal(json_integer_value(json_object_get(j, "n_layers")), 9);
	json_decref(j);
	free(r.body);
	fx_stop(&f);
}

/* Wait until the relay lists n captures with a hello (so its next request knows whom to wait for). */
static void wait_captures(fx *f, size_t n)
{
	for (int i = 0; i < 300; i++) {
		resp r = {0};
		http(f, "GET", "/v1/attention/capabilities", NULL, NULL, &r);
		json_t *j = json_loads(r.body, 0, NULL);
		size_t have = 0, k;
		json_t *c;
		json_array_foreach(json_object_get(j, "captures"), k, c)
			have += json_object_get(c, "engine") != NULL;
		json_decref(j);
		free(r.body);
		if (have >= n)
			return;
		usleep(10000);
	}
	fail_msg("the relay never listed %zu captures", n);
}

static void long_policy_wait(ax_relay_opts *o)
{
	o->policy_wait_ms = 5000; /* far above the fake capture's delay: only its ack can release the request */
}

/* A capture that acks 150 ms after the policy: the upstream sees the request only after the ack. */
static void policy_ack_holds(void **state)
{
	fx f = {0};
	fakecap c;
	resp r = {0};
	fx_start(&f, 0, long_policy_wait);
	fakecap_start(&f, &c, 150);
	wait_captures(&f, 1);
	uint64_t t0 = ax_now_ns();
	assert_int_equal(http(&f, "POST", "/v1/chat/completions", CHAT_STREAM, NULL, &r), CURLE_OK);
	assert_int_equal(r.status, 200);
	assert_non_null(strstr(r.body, "data: [DONE]"));
	uint64_t up = atomic_load(&f.up_req_ns), ack = atomic_load(&c.ack_ns);
	assert_int_equal(atomic_load(&c.acks), 1); /* re-publications while waiting were not acked twice */
	assert_true(ack > t0 && up > ack);
	assert_true(up - t0 >= 150000000ull && up - t0 < 3000000000ull);
	assert_int_equal(metric_of(&f, "policy_waits_total"), 1);
	assert_int_equal(metric_of(&f, "policy_acks_total"), 1);
	assert_int_equal(metric_of(&f, "policy_ack_timeouts_total"), 0);
	free(r.body);
	/* a request without attention never waits */
	r = (resp){0};
	assert_int_equal(http(&f, "POST", "/v1/chat/completions", "{\"model\":\"stream\",\"stream\":true}", NULL, &r),
			 CURLE_OK);
	assert_int_equal(metric_of(&f, "policy_waits_total"), 1);
	free(r.body);
	fakecap_stop(&c);
	fx_stop(&f);
}

static void short_policy_wait(ax_relay_opts *o)
{
	o->policy_wait_ms = 100;
}

static long long timed_request(fx *f, uint64_t *up_ms)
{
	resp r = {0};
	uint64_t t0 = ax_now_ns();
	assert_int_equal(http(f, "POST", "/v1/chat/completions", CHAT_STREAM, NULL, &r), CURLE_OK);
	assert_int_equal(r.status, 200);
	assert_non_null(strstr(r.body, "data: [DONE]"));
	free(r.body);
	*up_ms = (atomic_load(&f->up_req_ns) - t0) / 1000000;
	return metric_of(f, "policy_ack_timeouts_total");
}

/* A capture that never acks: forwarded after the bound and counted; after 3 misses in a row it is not waited
 * for; one ack from it makes it count again. */
static void policy_ack_timeout(void **state)
{
	fx f = {0};
	fakecap c;
	uint64_t up_ms;
	fx_start(&f, 0, short_policy_wait);
	fakecap_start(&f, &c, -1);
	wait_captures(&f, 1);
	for (int i = 1; i <= 3; i++) {
		assert_int_equal(timed_request(&f, &up_ms), i);
		if (up_ms < 100 || up_ms > 2000)
			fail_msg("request %d reached the upstream after %llu ms, want the 100 ms bound", i,
				 (unsigned long long)up_ms);
	}
	assert_int_equal(timed_request(&f, &up_ms), 3); /* three misses: no longer waited for */
	assert_int_equal(metric_of(&f, "policy_waits_total"), 3);
	ax_record ack;
	ax_record_init(&ack, AX_REC_POLICY);
	snprintf(ack.rid, sizeof ack.rid, "ax-0000000000000001");
	cap_send(&c, &ack);
	for (int i = 0; i < 300 && metric_of(&f, "policy_acks_total") < 1; i++)
		usleep(10000);
	assert_int_equal(timed_request(&f, &up_ms), 4);
	assert_int_equal(metric_of(&f, "policy_waits_total"), 4);
	fakecap_stop(&c);
	fx_stop(&f);
}

/* Captures that went away, or --policy-wait-ms 0: no wait. */
static void no_policy_wait(ax_relay_opts *o)
{
	o->policy_wait_ms = 0;
}

static void policy_no_wait(void **state)
{
	fx f = {0};
	fakecap c;
	uint64_t up_ms;
	fx_start(&f, 0, short_policy_wait);
	fakecap_start(&f, &c, -1);
	wait_captures(&f, 1);
	fakecap_stop(&c); /* its records connection closes */
	usleep(100000);
	assert_int_equal(timed_request(&f, &up_ms), 0);
	assert_int_equal(metric_of(&f, "policy_waits_total"), 0);
	fx_stop(&f);
	memset(&f, 0, sizeof f);
	fx_start(&f, 0, no_policy_wait);
	fakecap_start(&f, &c, -1);
	wait_captures(&f, 1);
	assert_int_equal(timed_request(&f, &up_ms), 0);
	assert_int_equal(metric_of(&f, "policy_waits_total"), 0);
	fakecap_stop(&c);
	fx_stop(&f);
}

/* ------------------------------------------------------------------ static files */

static char web_dir[128];

static void with_web(ax_relay_opts *o)
{
	o->web = web_dir;
}

static void write_file(const char *dir, const char *name, const char *text)
{
	char p[256];
	snprintf(p, sizeof p, "%s/%s", dir, name);
	FILE *f = fopen(p, "w");
	assert_non_null(f);
	fputs(text, f);
	fclose(f);
}

/* GET /explorer.html: web/explorer.html, or web/index.html when there is none. */
static void explorer_page(void **state)
{
	fx f = {0};
	resp r = {0};
	snprintf(web_dir, sizeof web_dir, "/tmp/attnx-rt-%d-web-XXXXXX", getpid());
	assert_non_null(mkdtemp(web_dir));
	write_file(web_dir, "index.html", "<p>index</p>");
	fx_start(&f, 0, with_web);
	assert_int_equal(http(&f, "GET", "/explorer.html", NULL, NULL, &r), CURLE_OK);
	assert_int_equal(r.status, 200);
	assert_string_equal(r.body, "<p>index</p>");
	assert_non_null(strcasestr(r.headers, "Content-Type: text/html"));
	free(r.body);
	write_file(web_dir, "explorer.html", "<p>explorer</p>");
	r = (resp){0};
	assert_int_equal(http(&f, "GET", "/explorer.html", NULL, NULL, &r), CURLE_OK);
	assert_int_equal(r.status, 200);
	assert_string_equal(r.body, "<p>explorer</p>");
	free(r.body);
	r = (resp){0};
	assert_int_equal(http(&f, "GET", "/", NULL, NULL, &r), CURLE_OK);
	assert_string_equal(r.body, "<p>index</p>");
	free(r.body);
	fx_stop(&f);
	char p[256];
	snprintf(p, sizeof p, "%s/explorer.html", web_dir);
	unlink(p);
	snprintf(p, sizeof p, "%s/index.html", web_dir);
	unlink(p);
	rmdir(web_dir);
}

/* The binary: --help states the connection limit; SIGTERM stops it cleanly. */
static void binary_sigterm(void **state)
{
	char out[8192] = "";
	char cmd[512];
	snprintf(cmd, sizeof cmd, "%s --help", relay_bin);
	FILE *p = popen(cmd, "r");
	assert_non_null(p);
	size_t n = fread(out, 1, sizeof out - 1, p);
	out[n] = '\0';
	assert_int_equal(pclose(p), 0);
	assert_non_null(strstr(out, "--max-connections"));
	assert_non_null(strstr(out, "concurrent connections"));
	assert_non_null(strstr(out, "default 127.0.0.1:8081"));
	assert_non_null(strstr(out, "--policy-wait-ms"));
	char rec[96], pol[96], feed[96];
	snprintf(rec, sizeof rec, "ipc:///tmp/attnx-rt-%d-bin-rec.sock", getpid());
	snprintf(pol, sizeof pol, "ipc:///tmp/attnx-rt-%d-bin-pol.sock", getpid());
	snprintf(feed, sizeof feed, "ipc:///tmp/attnx-rt-%d-bin-feed.sock", getpid());
	pid_t pid = fork();
	if (pid == 0) {
		execl(relay_bin, relay_bin, "--listen", "127.0.0.1:0", "--records", rec, "--policy", pol, "--feed", feed,
		      "--log-level", "warn", (char *)NULL);
		_exit(127);
	}
	usleep(300000);
	assert_int_equal(kill(pid, SIGTERM), 0);
	int st = 0;
	for (int i = 0; i < 500 && waitpid(pid, &st, WNOHANG) == 0; i++)
		usleep(10000);
	assert_true(WIFEXITED(st));
	assert_int_equal(WEXITSTATUS(st), 0);
	assert_int_equal(system("true"), 0);
	snprintf(cmd, sizeof cmd, "%s --max-connections x >/dev/null 2>&1", relay_bin);
	assert_int_equal(WEXITSTATUS(system(cmd)), 2);
}

int main(int argc, char **argv)
{
	relay_bin = argc > 1 ? argv[1] : "./attnx-relay";
	signal(SIGPIPE, SIG_IGN);
	ax_log_set_level(getenv("AX_LOG") ? atoi(getenv("AX_LOG")) : AX_LOG_ERROR);
	curl_global_init(CURL_GLOBAL_DEFAULT);
	mg_init_library(0);
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(stream_alignment),  cmocka_unit_test(stream_late_entry),
		cmocka_unit_test(non_stream),        cmocka_unit_test(refused),
		cmocka_unit_test(stall_times_out),   cmocka_unit_test(death_mid_stream),
		cmocka_unit_test(client_gone_cancels), cmocka_unit_test(passthrough_and_errors),
		cmocka_unit_test(cap_auth_cors),     cmocka_unit_test(ws_feed),
		cmocka_unit_test(pub_feed_verbatim), cmocka_unit_test(policy_published),
		cmocka_unit_test(policy_ack_holds),  cmocka_unit_test(policy_ack_timeout),
		cmocka_unit_test(policy_no_wait),    cmocka_unit_test(explorer_page),
		cmocka_unit_test(binary_sigterm),   cmocka_unit_test(feed_structural_check), cmocka_unit_test(feed_fast_path_sees_hello),
	};
	int rc = cmocka_run_group_tests(tests, NULL, NULL);
	mg_exit_library();
	curl_global_cleanup();
	return rc;
}
