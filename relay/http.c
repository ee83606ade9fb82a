/*
 * http.c — the relay's HTTP side on civetweb worker threads: routing, bearer-token auth and CORS (in begin_request,
 * so static files are covered too), the OpenAI proxy handlers, health / metrics / capabilities, and the WebSocket
 * feed.
 *
 * A proxy handler reads and checks the body, builds the upstream request, hands it to the loop (START) and then
 * waits on the request's condition variable, writing whatever the loop appends. Streams that stay silent get an
 * SSE comment every 2 s, which is how a vanished client is noticed; any failed write cancels the upstream request.
 * Every such connection holds its worker thread for its whole life, so `num_threads` is the connection limit.
 *
 * A WebSocket client gets a bounded queue (subq.c) and a writer thread that pops and writes frames; the civetweb
 * thread of the connection only reads subscribe messages. The loop fans records out under ws_mu.
 */
#include "relay_srv.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "attnx_common.h"

#define TAG "relay"
#define KEEPALIVE_MS 2000
#define DRAIN_MAX (16u << 20) /* an oversized body up to this is read and dropped so the 413 arrives cleanly */

const double ax_lat_bounds_us[AX_LAT_BUCKETS] = {50, 100, 250, 500, 1000, 2000, 5000, 10000, 50000, 250000, 1000000};

struct ax_wscli {
	ax_wscli *next;
	ax_relay *r;
	struct mg_connection *conn;
	ax_subq q;
	ax_filter f;              /* under r->ws_mu */
	pthread_t th;
	int th_ok;
};

static ax_relay *relay_of(const struct mg_connection *c)
{
	return mg_get_user_data(mg_get_context(c));
}

/* ------------------------------------------------------------------ responses */

static void cors_headers(ax_relay *r, struct mg_connection *c, char *buf, size_t n)
{
	const char *origin = mg_get_header(c, "Origin");
	buf[0] = '\0';
	if (!origin)
		return;
	for (int i = 0; i < r->o.n_cors; i++) {
		int any = strcmp(r->o.cors[i], "*") == 0;
		if (any || strcmp(r->o.cors[i], origin) == 0) {
			snprintf(buf, n,
				 "Access-Control-Allow-Origin: %s\r\nVary: Origin\r\n"
				 "Access-Control-Expose-Headers: X-Attnx-Rid\r\n",
				 any ? "*" : origin);
			return;
		}
	}
}

static int send_head(struct mg_connection *c, ax_relay *r, int status, const char *ctype, long long clen,
		     const char *extra)
{
	char cors[512], len[48] = "";
	cors_headers(r, c, cors, sizeof cors);
	if (clen >= 0)
		snprintf(len, sizeof len, "Content-Length: %lld\r\n", clen);
	return mg_printf(c,
			 "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%sCache-Control: no-cache\r\n%s%sConnection: close\r\n\r\n",
			 status, mg_get_response_code_text(c, status), ctype, len, cors, extra ? extra : "");
}

static void send_body(struct mg_connection *c, ax_relay *r, int status, const char *ctype, const char *body,
		      size_t n, const char *extra)
{
	if (send_head(c, r, status, ctype, (long long)n, extra) > 0 && n)
		mg_write(c, body, n);
}

static void send_json(struct mg_connection *c, ax_relay *r, int status, json_t *j)
{
	char *s = j ? json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(9)) : NULL;
	send_body(c, r, status, "application/json", s ? s : "{}", s ? strlen(s) : 2, NULL);
	free(s);
	json_decref(j);
}

static void send_error(struct mg_connection *c, ax_relay *r, int status, const char *type, const char *msg)
{
	send_json(c, r, status, json_pack("{s:{s:s,s:s,s:n,s:i}}", "error", "message", msg, "type", type, "param",
					  "code", status));
}

/* ------------------------------------------------------------------ auth, CORS preflight */

static int same(const char *a, const char *b)
{
	size_t na = strlen(a), nb = strlen(b);
	unsigned d = (unsigned)(na ^ nb);
	for (size_t i = 0; i < na; i++)
		d |= (unsigned char)a[i] ^ (unsigned char)b[i % (nb ? nb : 1)];
	return d == 0;
}

static int authorized(ax_relay *r, struct mg_connection *c)
{
	const char *h = mg_get_header(c, "Authorization");
	if (h && strncasecmp(h, "Bearer ", 7) == 0 && same(h + 7, r->o.token))
		return 1;
	const char *q = mg_get_request_info(c)->query_string;
	char tok[256];
	return q && mg_get_var(q, strlen(q), "token", tok, sizeof tok) > 0 && same(tok, r->o.token);
}

static int on_begin(struct mg_connection *c)
{
	ax_relay *r = relay_of(c);
	const struct mg_request_info *ri = mg_get_request_info(c);
	if (strcmp(ri->request_method, "OPTIONS") == 0) {
		send_body(c, r, 204, "text/plain", NULL, 0,
			  "Access-Control-Allow-Methods: GET, POST, OPTIONS\r\n"
			  "Access-Control-Allow-Headers: Authorization, Content-Type\r\nAccess-Control-Max-Age: 600\r\n");
		return 204;
	}
	if (r->o.token && strcmp(ri->local_uri, "/healthz") != 0 && !authorized(r, c)) {
		char *j = NULL;
		json_t *e = json_pack("{s:{s:s,s:s,s:n,s:i}}", "error", "message", "missing or wrong bearer token",
				      "type", "authentication_error", "param", "code", 401);
		j = json_dumps(e, JSON_COMPACT);
		json_decref(e);
		send_body(c, r, 401, "application/json", j ? j : "", j ? strlen(j) : 0, "WWW-Authenticate: Bearer\r\n");
		free(j);
		return 401;
	}
	return 0;
}

static int on_log(const struct mg_connection *c, const char *msg)
{
	ax_log(AX_LOG_DEBUG, "civetweb", "%s", msg);
	return 1;
}

/* ------------------------------------------------------------------ proxy */

typedef struct route {
	const char *uri;
	int kind;
	const char *method;
} route;

static const route routes[] = {
	{"/v1/chat/completions", AX_PK_CHAT, "POST"},
	{"/v1/completions", AX_PK_COMPLETION, "POST"},
	{"/v1/models", AX_PK_PASS, "GET"},
	{"/v1/tokenize", AX_PK_PASS, "POST"},
	{"/v1/detokenize", AX_PK_PASS, "POST"},
};

/* Read the request body: 0, -EMSGSIZE (over the cap), -EIO, -ENOMEM. */
static int read_body(struct mg_connection *c, size_t cap, char **out, size_t *len)
{
	long long cl = mg_get_request_info(c)->content_length;
	char tmp[16384];
	*out = NULL;
	*len = 0;
	if (cl > (long long)cap) {
		for (long long left = cl; left > 0 && cl <= DRAIN_MAX;) {
			int n = mg_read(c, tmp, sizeof tmp);
			if (n <= 0)
				break;
			left -= n;
		}
		return -EMSGSIZE;
	}
	size_t want = cl >= 0 ? (size_t)cl : cap + 1, have = 0;
	char *b = malloc(want + 1);
	if (!b)
		return -ENOMEM;
	while (have < want) {
		int n = mg_read(c, b + have, want - have);
		if (n <= 0)
			break;
		have += (size_t)n;
	}
	if (have > cap) {
		free(b);
		return -EMSGSIZE;
	}
	if (cl >= 0 && have < (size_t)cl) {
		free(b);
		return -EIO;
	}
	b[have] = '\0';
	*out = b;
	*len = have;
	return 0;
}

/* Fill the request for the loop. Returns 0 or an HTTP status with the error already sent. */
static int build_request(struct mg_connection *c, ax_relay *r, const route *rt, ax_pconn *pc)
{
	const struct mg_request_info *ri = mg_get_request_info(c);
	char err[256], rid[AX_PROTO_STR], *body = NULL;
	size_t blen = 0;
	pc->kind = rt->kind;
	snprintf(pc->method, sizeof pc->method, "%s", ri->request_method);
	size_t ul = strlen(r->o.upstream) + strlen(ri->local_uri) + (ri->query_string ? strlen(ri->query_string) : 0) + 3;
	if (!(pc->url = malloc(ul)))
		return 503;
	snprintf(pc->url, ul, "%s%s%s%s", r->o.upstream, ri->local_uri, ri->query_string ? "?" : "",
		 ri->query_string ? ri->query_string : "");
	const char *auth = mg_get_header(c, "Authorization");
	if (auth && !r->o.token) /* the relay's own token is not the engine's */
		pc->auth = strdup(auth);
	if (strcmp(rt->method, "POST") != 0)
		return 0;
	int rc = read_body(c, r->o.max_body, &body, &blen);
	if (rc == -EMSGSIZE) {
		snprintf(err, sizeof err, "request body over %zu bytes", r->o.max_body);
		send_error(c, r, 413, "invalid_request_error", err);
		return 413;
	}
	if (rc) {
		send_error(c, r, 400, "invalid_request_error", "could not read the request body");
		return 400;
	}
	if (rt->kind == AX_PK_PASS) {
		pc->body = body;
		pc->body_len = blen;
		return 0;
	}
	ax__rid_new(rid);
	rc = ax__req_parse(rt->kind, body, blen, rid, &pc->info, &pc->body, &pc->body_len, err, sizeof err);
	free(body);
	if (rc == -ENOMEM)
		return 503;
	if (rc) {
		send_error(c, r, 400, "invalid_request_error", err);
		return 400;
	}
	return 0;
}

static void cond_wait_ms(pthread_cond_t *cv, pthread_mutex_t *mu, int ms)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	ts.tv_sec += ms / 1000;
	ts.tv_nsec += (long)(ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	pthread_cond_timedwait(cv, mu, &ts);
}

static int write_head(struct mg_connection *c, ax_relay *r, ax_pconn *pc)
{
	char extra[160] = "";
	if (pc->info.rid[0])
		snprintf(extra, sizeof extra, "X-Attnx-Rid: %s\r\n", pc->info.rid);
	return send_head(c, r, pc->status, pc->ctype, pc->clen, extra);
}

/* Write what the loop produces until it ends the response or the client goes away. */
static void relay_out(struct mg_connection *c, ax_relay *r, ax_pconn *pc)
{
	int head_done = 0, ok = 1, sse = 0;
	uint64_t last = ax_now_ns();
	for (;;) {
		pthread_mutex_lock(&pc->mu);
		if (!pc->ended && !pc->oh && (head_done || !pc->head))
			cond_wait_ms(&pc->cv, &pc->mu, KEEPALIVE_MS);
		int head = pc->head && !head_done, ended = pc->ended;
		ax_out *o = pc->oh;
		pc->oh = pc->ot = NULL;
		pthread_mutex_unlock(&pc->mu);
		if (head) {
			ok = write_head(c, r, pc) > 0;
			head_done = 1;
			sse = strstr(pc->ctype, "event-stream") != NULL;
		}
		for (ax_out *n; o; o = n) {
			n = o->next;
			if (ok)
				ok = mg_write(c, o->data, o->len) > 0;
			free(o);
			last = ax_now_ns();
		}
		if (ok && sse && !ended && ax_now_ns() - last >= KEEPALIVE_MS * 1000000ull) {
			ok = mg_write(c, ": keepalive\n\n", 13) > 0;
			last = ax_now_ns();
		}
		if (!ok) {
			pthread_mutex_lock(&pc->mu);
			pc->gone = 1;
			pthread_mutex_unlock(&pc->mu);
			ax__relay_submit(r, AX_CMD_CANCEL, pc);
			return;
		}
		if (ended)
			break;
	}
	if (!head_done)
		send_error(c, r, 502, "upstream_error", "no response from upstream");
}

static int h_proxy(struct mg_connection *c, void *cbdata)
{
	ax_relay *r = relay_of(c);
	const route *rt = cbdata;
	const struct mg_request_info *ri = mg_get_request_info(c);
	if (strcmp(ri->request_method, rt->method) != 0) {
		send_error(c, r, 405, "invalid_request_error", "method not allowed");
		return 405;
	}
	ax_pconn *pc = ax__pconn_new();
	if (!pc) {
		send_error(c, r, 503, "unavailable", "out of memory");
		return 503;
	}
	int st = build_request(c, r, rt, pc);
	if (st == 503)
		send_error(c, r, 503, "unavailable", "out of memory");
	if (st) {
		ax__pconn_unref(pc);
		return st;
	}
	if (ax__relay_submit(r, AX_CMD_START, pc)) {
		send_error(c, r, 503, "unavailable", "relay is shutting down");
		ax__pconn_unref(pc);
		return 503;
	}
	relay_out(c, r, pc);
	int status = pc->status;
	ax__pconn_unref(pc);
	return status ? status : 502;
}

/* ------------------------------------------------------------------ health, metrics, capabilities */

static int upstream_reachable(ax_relay *r)
{
	CURL *e = curl_easy_init();
	if (!e)
		return 0;
	curl_easy_setopt(e, CURLOPT_URL, r->o.upstream);
	curl_easy_setopt(e, CURLOPT_CONNECT_ONLY, 1L);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, 1000L);
	int ok = curl_easy_perform(e) == CURLE_OK;
	curl_easy_cleanup(e);
	return ok;
}

static int h_health(struct mg_connection *c, void *cbdata)
{
	ax_relay *r = relay_of(c);
	uint64_t last = atomic_load(&r->m.last_record_ns);
	pthread_mutex_lock(&r->cap_mu);
	int ncap = r->n_caps;
	pthread_mutex_unlock(&r->cap_mu);
	int up = upstream_reachable(r);
	json_t *j = json_pack("{s:s,s:{s:s,s:b},s:i,s:o,s:I,s:i,s:i}", "status", up ? "ok" : "degraded", "upstream",
			      "url", r->o.upstream, "reachable", up, "captures", ncap, "last_record_age_ms",
			      last ? json_integer((json_int_t)((ax_now_ns() - last) / 1000000)) : json_null(),
			      "records_in", (json_int_t)atomic_load(&r->m.records_in), "ws_clients",
			      atomic_load(&r->m.ws_clients), "active_requests", atomic_load(&r->m.active_requests));
	send_json(c, r, 200, j);
	return 200;
}

static json_t *capture_json(const ax_capture *cp, uint64_t now)
{
	json_t *o = json_pack("{s:s,s:I,s:i}", "src", cp->src, "last_seen_ms", (json_int_t)((now - cp->last_ns) / 1000000),
			      "policy_ack_misses", (int)cp->ack_misses);
	if (!cp->has_hello)
		return o;
	const ax_rec_hello *h = &cp->hello;
	json_t *layers = json_array();
	for (uint32_t i = 0; i < h->n_layer_ids && i < AX_PROTO_MAX_LIST; i++)
		json_array_append_new(layers, json_integer(h->layer_ids[i]));
	json_object_update_new(o, json_pack("{s:s,s:s,s:s,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:s,s:o}", "engine", h->engine,
					    "model", h->model, "backend", h->backend, "rank", h->rank, "world_size",
					    h->world_size, "n_layers", h->n_layers, "n_q_heads", h->n_q_heads,
					    "n_kv_heads", h->n_kv_heads, "head_offset", h->head_offset, "head_dim",
					    h->head_dim, "top_k", h->top_k, "mode", ax_mode_name((int)h->mode) ?: "",
					    "layer_ids", layers));
	return o;
}

static int h_caps(struct mg_connection *c, void *cbdata)
{
	ax_relay *r = relay_of(c);
	uint64_t now = ax_now_ns();
	json_t *caps = json_array(), *layers = json_array();
	int n_layers = 0, n_heads = 0, top_k = 0;
	const char *mode = NULL;
	pthread_mutex_lock(&r->cap_mu);
	for (int i = 0; i < r->n_caps; i++) {
		const ax_capture *cp = &r->caps[i];
		json_array_append_new(caps, capture_json(cp, now));
		if (!cp->has_hello)
			continue;
		if ((int)cp->hello.n_layers > n_layers)
			n_layers = (int)cp->hello.n_layers;
		n_heads += (int)cp->hello.n_q_heads;
		if (!top_k) {
			top_k = (int)cp->hello.top_k;
			mode = ax_mode_name((int)cp->hello.mode);
		}
	}
	pthread_mutex_unlock(&r->cap_mu);
	for (int l = 0; l < n_layers; l++)
		json_array_append_new(layers, json_integer(l));
	json_t *j = json_pack("{s:s,s:[sss],s:i,s:i,s:s?,s:i,s:o,s:i,s:o,s:i,s:i,s:[sssssssss]}", "object",
			      "attention.capabilities", "modes", "mean_logit", "mean_prob", "heads", "max_top_k",
			      AX_PROTO_MAX_TOPK, "default_top_k", top_k, "default_mode", mode, "n_layers", n_layers,
			      "layers", layers, "n_heads", n_heads, "captures", caps, "attention_wait_ms",
			      r->o.attention_wait_ms, "policy_wait_ms", r->o.policy_wait_ms, "request_fields", "return_attention_tokens", "top_k_attention",
			      "attention_capture_layer_ids", "attention_capture_layer_id", "attention_capture_head_ids",
			      "attention_mode", "attention_tokens_stride", "attention_tokens_max", "include_prompt_attention");
	send_json(c, r, 200, j);
	return 200;
}

static void metric(ax_buf *b, const char *name, const char *type, const char *help, uint64_t v)
{
	char line[512];
	int n = snprintf(line, sizeof line, "# HELP attnx_relay_%s %s\n# TYPE attnx_relay_%s %s\nattnx_relay_%s %llu\n",
			 name, help, name, type, name, (unsigned long long)v);
	ax_buf_append(b, line, (size_t)n);
}

static void latency_metric(ax_buf *b, ax_metrics *m)
{
	char line[256];
	const char *h = "# HELP attnx_relay_ws_latency_seconds Record arrival to WebSocket frame written.\n"
			"# TYPE attnx_relay_ws_latency_seconds histogram\n";
	ax_buf_append(b, h, strlen(h));
	uint64_t cum = 0;
	for (int i = 0; i <= AX_LAT_BUCKETS; i++) {
		cum += atomic_load(&m->lat_bucket[i]);
		int n = i < AX_LAT_BUCKETS
				? snprintf(line, sizeof line, "attnx_relay_ws_latency_seconds_bucket{le=\"%g\"} %llu\n",
					   ax_lat_bounds_us[i] / 1e6, (unsigned long long)cum)
				: snprintf(line, sizeof line, "attnx_relay_ws_latency_seconds_bucket{le=\"+Inf\"} %llu\n",
					   (unsigned long long)cum);
		ax_buf_append(b, line, (size_t)n);
	}
	int n = snprintf(line, sizeof line,
			 "attnx_relay_ws_latency_seconds_sum %.6f\nattnx_relay_ws_latency_seconds_count %llu\n",
			 (double)atomic_load(&m->lat_sum_us) / 1e6, (unsigned long long)atomic_load(&m->lat_count));
	ax_buf_append(b, line, (size_t)n);
}

static int h_metrics(struct mg_connection *c, void *cbdata)
{
	ax_relay *r = relay_of(c);
	ax_metrics *m = &r->m;
	ax_buf b;
	ax_buf_init(&b);
	metric(&b, "records_in_total", "counter", "Records received from captures.", atomic_load(&m->records_in));
	metric(&b, "frames_in_total", "counter", "Frames received from captures.", atomic_load(&m->frames_in));
	metric(&b, "decode_errors_total", "counter", "Frames rejected by the decoder.", atomic_load(&m->decode_errors));
	metric(&b, "feed_frames_total", "counter", "Frames published on the feed.", atomic_load(&m->feed_frames));
	metric(&b, "policy_frames_total", "counter", "Policy frames published.", atomic_load(&m->policy_frames));
	metric(&b, "ws_clients", "gauge", "Connected WebSocket clients.", (uint64_t)atomic_load(&m->ws_clients));
	metric(&b, "ws_sent_total", "counter", "WebSocket frames sent.", atomic_load(&m->ws_sent));
	metric(&b, "ws_dropped_total", "counter", "Records dropped for slow WebSocket clients.",
	       atomic_load(&m->ws_dropped));
	metric(&b, "gaps_total", "counter", "Gap records sent to slow WebSocket clients.", atomic_load(&m->ws_gaps));
	metric(&b, "requests_total", "counter", "Proxied requests.", atomic_load(&m->requests));
	metric(&b, "attention_requests_total", "counter", "Proxied requests with return_attention_tokens.",
	       atomic_load(&m->attention_requests));
	metric(&b, "active_requests", "gauge", "Requests in flight.", (uint64_t)atomic_load(&m->active_requests));
	metric(&b, "upstream_errors_total", "counter", "Upstream failures (refused, timeout, cut).",
	       atomic_load(&m->upstream_errors));
	metric(&b, "client_cancels_total", "counter", "Requests cancelled because the client went away.",
	       atomic_load(&m->client_cancels));
	metric(&b, "late_entries_total", "counter", "Attention entries sent after their token.",
	       atomic_load(&m->late_entries));
	metric(&b, "policy_acks_total", "counter", "Policy acknowledgements received from captures.",
	       atomic_load(&m->policy_acks));
	metric(&b, "policy_waits_total", "counter",
	       "Attention requests held until the captures acknowledged their policy.", atomic_load(&m->policy_waits));
	metric(&b, "policy_ack_timeouts_total", "counter",
	       "Attention requests forwarded without every capture's policy ack (--policy-wait-ms passed).",
	       atomic_load(&m->policy_ack_timeouts));
	latency_metric(&b, m);
	send_body(c, r, 200, "text/plain; version=0.0.4", (const char *)b.data, b.len, NULL);
	ax_buf_fini(&b);
	return 200;
}

/* ------------------------------------------------------------------ WebSocket */

static void observe_latency(ax_metrics *m, uint64_t t_ns)
{
	double us = (double)(ax_now_ns() - t_ns) / 1e3;
	int i = 0;
	while (i < AX_LAT_BUCKETS && us > ax_lat_bounds_us[i])
		i++;
	atomic_fetch_add(&m->lat_bucket[i], 1);
	atomic_fetch_add(&m->lat_count, 1);
	atomic_fetch_add(&m->lat_sum_us, (uint64_t)us);
}

/* A blob of one record: JSON text, or a msgpack frame (array of one). */
static ax_blob *render(const ax_record *rec, int msgpack, uint64_t t_ns)
{
	ax_buf b;
	ax_buf_init(&b);
	uint8_t one = 0x91;
	int rc = msgpack ? (ax_buf_append(&b, &one, 1) ?: ax_record_pack(rec, &b)) : ax_record_json(rec, &b);
	ax_blob *out = rc ? NULL : ax__blob_new(b.data, b.len, msgpack, t_ns);
	ax_buf_fini(&b);
	return out;
}

static int ws_send_gap(ax_wscli *w, uint64_t dropped)
{
	ax_relay *r = w->r;
	ax_record g;
	ax__relay_rec_init(r, &g, AX_REC_GAP);
	snprintf(g.u.gap.what, sizeof g.u.gap.what, "records");
	snprintf(g.u.gap.reason, sizeof g.u.gap.reason, "slow_client");
	g.u.gap.count = dropped;
	pthread_mutex_lock(&r->ws_mu);
	int mp = w->f.msgpack;
	pthread_mutex_unlock(&r->ws_mu);
	ax_blob *b = render(&g, mp, ax_now_ns());
	if (!b)
		return 1;
	atomic_fetch_add(&r->m.ws_gaps, 1);
	atomic_fetch_add(&r->m.ws_dropped, dropped);
	int n = mg_websocket_write(w->conn, mp ? MG_WEBSOCKET_OPCODE_BINARY : MG_WEBSOCKET_OPCODE_TEXT, b->data, b->len);
	ax__blob_unref(b);
	return n;
}

static void *ws_writer(void *arg)
{
	ax_wscli *w = arg;
	for (;;) {
		ax_blob *b;
		uint64_t dropped;
		int rc = ax__subq_pop(&w->q, -1, &b, &dropped);
		if (rc < 0)
			break;
		if (rc == 0)
			continue;
		int n = dropped ? ws_send_gap(w, dropped)
				: mg_websocket_write(w->conn, b->binary ? MG_WEBSOCKET_OPCODE_BINARY : MG_WEBSOCKET_OPCODE_TEXT,
						     b->data, b->len);
		if (b) {
			observe_latency(&w->r->m, b->t_ns);
			atomic_fetch_add(&w->r->m.ws_sent, 1);
			ax__blob_unref(b);
		}
		if (n <= 0)
			break; /* the connection is closing; the close handler ends this client */
	}
	return NULL;
}

void ax__ws_record(ax_relay *r, const ax_record *rec, uint64_t t_ns, int in_frame)
{
	ax_blob *js = NULL, *mp = NULL;
	pthread_mutex_lock(&r->ws_mu);
	for (ax_wscli *w = r->ws; w; w = w->next) {
		if (w->f.msgpack && in_frame && ax__filter_empty(&w->f))
			continue; /* gets the verbatim frame */
		if (!ax__filter_match(&w->f, rec))
			continue;
		ax_blob **b = w->f.msgpack ? &mp : &js;
		if (!*b && !(*b = render(rec, w->f.msgpack, t_ns)))
			continue;
		ax__subq_push(&w->q, *b);
	}
	pthread_mutex_unlock(&r->ws_mu);
	ax__blob_unref(js);
	ax__blob_unref(mp);
}

void ax__ws_frame(ax_relay *r, const void *frame, size_t len, uint64_t t_ns)
{
	ax_blob *b = NULL;
	pthread_mutex_lock(&r->ws_mu);
	for (ax_wscli *w = r->ws; w; w = w->next) {
		if (!w->f.msgpack || !ax__filter_empty(&w->f))
			continue;
		if (!b && !(b = ax__blob_new(frame, len, 1, t_ns)))
			break;
		ax__subq_push(&w->q, b);
	}
	pthread_mutex_unlock(&r->ws_mu);
	ax__blob_unref(b);
}

int ax__ws_count(ax_relay *r)
{
	return atomic_load(&r->m.ws_clients);
}

static int ws_connect(const struct mg_connection *c, void *cbdata)
{
	ax_relay *r = cbdata;
	return r->o.token && !authorized(r, (struct mg_connection *)c) ? 1 : 0;
}

static void ws_ready(struct mg_connection *c, void *cbdata)
{
	ax_relay *r = cbdata;
	ax_wscli *w = calloc(1, sizeof *w);
	if (!w || ax__subq_init(&w->q, (uint32_t)r->o.ws_queue)) {
		free(w);
		return;
	}
	w->r = r;
	w->conn = c;
	if (pthread_create(&w->th, NULL, ws_writer, w)) {
		ax__subq_fini(&w->q);
		free(w);
		return;
	}
	w->th_ok = 1;
	mg_set_user_connection_data(c, w);
	pthread_mutex_lock(&r->ws_mu);
	w->next = r->ws;
	r->ws = w;
	pthread_mutex_unlock(&r->ws_mu);
	atomic_fetch_add(&r->m.ws_clients, 1);
}

static void ws_reply(struct mg_connection *c, json_t *j)
{
	char *s = json_dumps(j, JSON_COMPACT);
	if (s)
		mg_websocket_write(c, MG_WEBSOCKET_OPCODE_TEXT, s, strlen(s));
	free(s);
	json_decref(j);
}

static int ws_data(struct mg_connection *c, int flags, char *data, size_t len, void *cbdata)
{
	ax_relay *r = cbdata;
	ax_wscli *w = mg_get_user_connection_data(c);
	int op = flags & 0xf;
	if (op == MG_WEBSOCKET_OPCODE_CONNECTION_CLOSE)
		return 0;
	if (op != MG_WEBSOCKET_OPCODE_TEXT || !w)
		return 1;
	ax_filter f;
	char err[160];
	if (ax__filter_parse(data, len, &f, err, sizeof err)) {
		ws_reply(c, json_pack("{s:s,s:s}", "type", "error", "message", err));
		return 1;
	}
	pthread_mutex_lock(&r->ws_mu);
	w->f = f;
	pthread_mutex_unlock(&r->ws_mu);
	ws_reply(c, json_pack("{s:s,s:s}", "type", "subscribed", "format", f.msgpack ? "msgpack" : "json"));
	return 1;
}

static void ws_close(const struct mg_connection *c, void *cbdata)
{
	ax_relay *r = cbdata;
	ax_wscli *w = mg_get_user_connection_data(c);
	if (!w)
		return;
	pthread_mutex_lock(&r->ws_mu);
	for (ax_wscli **p = &r->ws; *p; p = &(*p)->next)
		if (*p == w) {
			*p = w->next;
			break;
		}
	pthread_mutex_unlock(&r->ws_mu);
	ax__subq_close(&w->q);
	if (w->th_ok)
		pthread_join(w->th, NULL);
	ax__subq_fini(&w->q);
	free(w);
	atomic_fetch_sub(&r->m.ws_clients, 1);
}

/* ------------------------------------------------------------------ server */

static int dir_exists(const char *p)
{
	struct stat st;
	return p && *p && stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static int file_exists(const char *p)
{
	struct stat st;
	return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* GET /explorer.html: the seed's URL for the page. web/explorer.html when the folder has one, else web/index.html. */
static int h_explorer(struct mg_connection *c, void *cbdata)
{
	ax_relay *r = relay_of(c);
	const struct mg_request_info *ri = mg_get_request_info(c);
	char path[4096];
	if (strcmp(ri->local_uri, "/explorer.html") != 0 || !dir_exists(r->o.web)) {
		send_error(c, r, 404, "not_found", "no such file");
		return 404;
	}
	if (strcmp(ri->request_method, "GET") != 0 && strcmp(ri->request_method, "HEAD") != 0) {
		send_error(c, r, 405, "invalid_request_error", "method not allowed");
		return 405;
	}
	const char *names[] = {"explorer.html", "index.html"};
	for (size_t i = 0; i < AX_ARRAY_LEN(names); i++) {
		snprintf(path, sizeof path, "%s/%s", r->o.web, names[i]);
		if (file_exists(path)) {
			mg_send_file(c, path);
			return 200;
		}
	}
	send_error(c, r, 404, "not_found", "the web folder has neither explorer.html nor index.html");
	return 404;
}

int ax__http_start(ax_relay *r)
{
	char threads[16], timeout[16];
	snprintf(threads, sizeof threads, "%d", r->o.max_connections);
	snprintf(timeout, sizeof timeout, "%d", 30000);
	const char *opts[32] = {"listening_ports", r->o.listen, "num_threads", threads, "request_timeout_ms", timeout,
				"websocket_timeout_ms", timeout, "enable_websocket_ping_pong", "yes",
				"enable_directory_listing", "no", "enable_keep_alive", "no"};
	int n = 14;
	if (dir_exists(r->o.web)) {
		opts[n++] = "document_root";
		opts[n++] = r->o.web;
	} else if (r->o.web && *r->o.web) {
		ax_log(AX_LOG_WARN, TAG, "web directory %s not found: no static files", r->o.web);
	}
	struct mg_callbacks cb = {.begin_request = on_begin, .log_message = on_log};
	r->mg = mg_start(&cb, r, opts);
	if (!r->mg) {
		ax_log(AX_LOG_ERROR, TAG, "cannot listen on %s", r->o.listen);
		return -EADDRINUSE;
	}
	for (size_t i = 0; i < AX_ARRAY_LEN(routes); i++)
		mg_set_request_handler(r->mg, routes[i].uri, h_proxy, (void *)&routes[i]);
	mg_set_request_handler(r->mg, "/healthz", h_health, NULL);
	mg_set_request_handler(r->mg, "/metrics", h_metrics, NULL);
	mg_set_request_handler(r->mg, "/v1/attention/capabilities", h_caps, NULL);
	mg_set_request_handler(r->mg, "/explorer.html", h_explorer, NULL);
	mg_set_websocket_handler(r->mg, "/ws", ws_connect, ws_ready, ws_data, ws_close, r);
	struct mg_server_port ports[4];
	int np = mg_get_server_ports(r->mg, 4, ports);
	r->port = np > 0 ? ports[0].port : 0;
	return 0;
}

/* civetweb's master thread notices mg_stop only when its accept poll (2 s) returns: connections wake it. */
typedef struct poker {
	atomic_int done;
	struct sockaddr_in addr;
} poker;

static void *poke(void *arg)
{
	poker *p = arg;
	while (!atomic_load(&p->done)) {
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0) {
			connect(fd, (struct sockaddr *)&p->addr, sizeof p->addr);
			close(fd);
		}
		usleep(20000);
	}
	return NULL;
}

void ax__http_stop(ax_relay *r)
{
	if (!r->mg)
		return;
	poker p = {.addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)r->port)}};
	char host[64] = "";
	sscanf(r->o.listen, "%63[^:]", host);
	if (inet_pton(AF_INET, host, &p.addr.sin_addr) != 1 || p.addr.sin_addr.s_addr == htonl(INADDR_ANY))
		p.addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	pthread_t th;
	int th_ok = r->port > 0 && pthread_create(&th, NULL, poke, &p) == 0;
	mg_stop(r->mg);
	r->mg = NULL;
	atomic_store(&p.done, 1);
	if (th_ok)
		pthread_join(th, NULL);
}
