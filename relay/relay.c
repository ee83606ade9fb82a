/*
 * relay.c — the relay's loop thread: libcurl multi on libuv for upstream requests, the nng sockets (records PULL,
 * policy PUB, feed PUB), the per-request attention store, and the lifecycle (open / run / stop / close).
 *
 * libcurl is driven by curl_multi_socket_action: its socket callback starts uv_poll watchers, its timer callback a
 * uv_timer. Each proxied request is an `ax_up` (upstream transfer) with a small state machine:
 *   UP_PASS    bytes go to the client as they come (no attention, or an upstream error status);
 *   UP_STREAM  SSE events go through the merge (relay_int.h) and come out as chunks with attention entries;
 *   UP_BODY    the whole body is collected, merged once its attention is in (or its hold is over), then sent.
 * Every up has an idle timer (the upstream's longest allowed silence) and a hold timer (the next time the merge can
 * release something); a finished up is reaped from a zero timer, never from inside a libcurl callback.
 * The records PULL's receive fd is polled with uv_poll; each frame is checked for structure (no decoding) and goes
 * verbatim to the feed PUB; its records are decoded only as far as requests, WebSocket clients and the capture table
 * need them (ingest_frame says what that means for validation).
 *
 * Policy acknowledgement: the policy travels relay → capture over nng while the request travels relay → engine over
 * HTTP, so an engine could prefill before the capture has told it (ax_shm_set_wanted) which layers to export. So an
 * attention request first announces its policy, then waits (`waiting`, on its hold timer, never blocking the loop)
 * until every live capture has echoed that `policy` record on the records channel, or --policy-wait-ms passed; only
 * then does it go upstream. Live = sent a `hello`, its records connection (the nng pipe of its last frame) is still
 * open, and it has not missed ACK_MISS_MAX acks in a row (a capture run without a policy subscriber never acks; any
 * ack it sends makes it count again). While it waits, the request's policy is re-published every 50 ms, so a
 * capture whose subscription was still connecting gets it.
 */
#include "relay_srv.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <nng/protocol/pipeline0/pull.h>
#include <nng/protocol/pubsub0/pub.h>

#include "attnx_common.h"

#ifndef AX_RELAY_WEB_DIR
#define AX_RELAY_WEB_DIR "web"
#endif

#define TAG "relay"
#define MAX_BODY_IN (64u << 20) /* non-streamed upstream bodies */
#define POLICY_REPUBLISH_MS 500
#define POLICY_WAIT_TICK_MS 50 /* re-publication period while a request waits for acks */
#define ACK_MISS_MAX 3         /* acks a capture may miss in a row before requests stop waiting for it */

enum { UP_PASS = 0, UP_STREAM = 1, UP_BODY = 2 };

struct ax_up {
	ax_up *next;
	ax_relay *r;
	ax_pconn *pc;
	CURL *e;
	struct curl_slist *hdrs;
	uv_timer_t idle, hold;
	int handles_open;
	int mode;                /* UP_* */
	int head_sent;
	int finished;            /* the response ended; waiting to be reaped */
	int in_multi;
	int touched;             /* got records in the current frame */
	int sse;                 /* the response is text/event-stream */
	int saw_done;            /* [DONE] seen (pass-through streams: in the tail) */
	int n_srcs_end;
	uint64_t policy_seq;     /* seq of the announced policy record; re-publications repeat it */
	int waiting;             /* held before the upstream until the captures in wait_mask ack its policy */
	uint64_t wait_mask;      /* r->caps slots whose ack is outstanding */
	uint64_t wait_start_ns, wait_deadline_ns;
	ax_merge *m;
	ax_sse parser;
	char *buf;               /* UP_BODY body */
	size_t blen, bcap;
	char tail[16];           /* last bytes of a pass-through stream */
	char err[256];           /* set: the stream ends with this error instead of [DONE] */
};

/* ------------------------------------------------------------------ options */

void ax_relay_opts_default(ax_relay_opts *o)
{
	memset(o, 0, sizeof *o);
	o->listen = "127.0.0.1:8081";
	o->upstream = "http://127.0.0.1:8000";
	o->records = "ipc:///tmp/attnx-records.sock";
	o->policy = "ipc:///tmp/attnx-policy.sock";
	o->feed = "ipc:///tmp/attnx-feed.sock";
	o->web = AX_RELAY_WEB_DIR;
	o->max_body = 1u << 20;
	o->max_connections = 64;
	o->attention_wait_ms = 50;
	o->upstream_timeout_ms = 30000;
	o->ws_queue = 4096;
	o->policy_wait_ms = 200;
}

static const char *keep(ax_relay *r, int i, const char *s)
{
	if (!s)
		return NULL;
	r->strs[i] = strdup(s);
	return r->strs[i];
}

static int copy_opts(ax_relay *r, const ax_relay_opts *o)
{
	r->o = *o;
	const char **f[] = {&r->o.listen, &r->o.upstream, &r->o.records, &r->o.policy, &r->o.feed, &r->o.web,
			    &r->o.token};
	for (int i = 0; i < 7; i++)
		if (*f[i] && !(*f[i] = keep(r, i, *f[i])))
			return -ENOMEM;
	for (int i = 0; i < o->n_cors && i < AX_RELAY_MAX_CORS; i++)
		if (!(r->o.cors[i] = keep(r, 8 + i, o->cors[i])))
			return -ENOMEM;
	size_t n = strlen(r->o.upstream);
	while (n > 0 && r->o.upstream[n - 1] == '/')
		r->strs[1][--n] = '\0';
	if (!n || r->o.max_connections < 2 || r->o.attention_wait_ms < 0 || r->o.upstream_timeout_ms <= 0 ||
	    r->o.ws_queue < 1 || r->o.max_body == 0 || r->o.policy_wait_ms < 0)
		return -EINVAL;
	return 0;
}

/* ------------------------------------------------------------------ proxied-request output (loop → handler) */

ax_pconn *ax__pconn_new(void)
{
	ax_pconn *pc = calloc(1, sizeof *pc);
	if (!pc)
		return NULL;
	atomic_init(&pc->refs, 1);
	pthread_mutex_init(&pc->mu, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&pc->cv, &ca);
	pthread_condattr_destroy(&ca);
	pc->clen = -1;
	return pc;
}

void ax__pconn_unref(ax_pconn *pc)
{
	if (!pc || atomic_fetch_sub(&pc->refs, 1) != 1)
		return;
	for (ax_out *o = pc->oh, *n; o; o = n) {
		n = o->next;
		free(o);
	}
	free(pc->url);
	free(pc->body);
	free(pc->auth);
	pthread_mutex_destroy(&pc->mu);
	pthread_cond_destroy(&pc->cv);
	free(pc);
}

static void pc_head(ax_pconn *pc, int status, const char *ctype, long long clen)
{
	pthread_mutex_lock(&pc->mu);
	if (!pc->head) {
		pc->head = 1;
		pc->status = status;
		snprintf(pc->ctype, sizeof pc->ctype, "%s", ctype && *ctype ? ctype : "application/octet-stream");
		pc->clen = clen;
		pthread_cond_signal(&pc->cv);
	}
	pthread_mutex_unlock(&pc->mu);
}

static void pc_data2(ax_pconn *pc, const char *a, size_t na, const char *b, size_t nb, const char *c, size_t nc)
{
	if (!na && !nb && !nc)
		return;
	ax_out *o = malloc(sizeof *o + na + nb + nc);
	if (!o)
		return; /* out of memory: the client gets a shorter stream, which it can see */
	o->next = NULL;
	o->len = na + nb + nc;
	/* memcpy's pointers must be valid even for 0 bytes: skip empty pieces (they may be NULL). */
	if (na)
		memcpy(o->data, a, na);
	if (nb)
		memcpy(o->data + na, b, nb);
	if (nc)
		memcpy(o->data + na + nb, c, nc);
	pthread_mutex_lock(&pc->mu);
	if (pc->gone || pc->ended) {
		pthread_mutex_unlock(&pc->mu);
		free(o);
		return;
	}
	if (pc->ot)
		pc->ot->next = o;
	else
		pc->oh = o;
	pc->ot = o;
	pthread_cond_signal(&pc->cv);
	pthread_mutex_unlock(&pc->mu);
}

static void pc_data(ax_pconn *pc, const char *p, size_t n)
{
	pc_data2(pc, p, n, NULL, 0, NULL, 0);
}

static void pc_end(ax_pconn *pc)
{
	pthread_mutex_lock(&pc->mu);
	pc->ended = 1;
	pthread_cond_signal(&pc->cv);
	pthread_mutex_unlock(&pc->mu);
}

/* {"error":{"message":..,"type":..,"param":null,"code":status}} */
static char *error_json(const char *msg, const char *type, int code)
{
	json_t *e = json_pack("{s:{s:s,s:s,s:n,s:i}}", "error", "message", msg, "type", type, "param", "code", code);
	char *s = e ? json_dumps(e, JSON_COMPACT) : NULL;
	json_decref(e);
	return s;
}

/* An error before any byte went out is a JSON response; after, an SSE error event (streams) or a cut body. */
static void up_error(ax_up *u, int status, const char *type, const char *msg)
{
	ax_pconn *pc = u->pc;
	char *j = error_json(msg, type, status);
	if (!u->head_sent) {
		pc_head(pc, status, "application/json", j ? (long long)strlen(j) : 0);
		u->head_sent = 1;
		if (j)
			pc_data(pc, j, strlen(j));
	} else if (u->sse && j) {
		pc_data2(pc, "data: ", 6, j, strlen(j), "\n\n", 2);
	}
	free(j);
	atomic_fetch_add(&u->r->m.upstream_errors, 1);
	ax_log(AX_LOG_WARN, TAG, "%s %s: %s", u->pc->info.rid[0] ? u->pc->info.rid : "-", u->pc->url, msg);
}

/* ------------------------------------------------------------------ up lifecycle */

static void on_reap(uv_timer_t *t);

static void up_unlink(ax_up *u)
{
	for (ax_up **p = &u->r->ups; *p; p = &(*p)->next)
		if (*p == u) {
			*p = u->next;
			return;
		}
}

static void final_close(ax_relay *r);

static void up_handle_closed(uv_handle_t *h)
{
	ax_up *u = h->data;
	if (--u->handles_open)
		return;
	ax_relay *r = u->r;
	up_unlink(u);
	ax__merge_free(u->m);
	ax__sse_fini(&u->parser);
	free(u->buf);
	ax__pconn_unref(u->pc);
	free(u);
	atomic_fetch_sub(&r->m.active_requests, 1);
	if (r->stopping && !r->ups)
		final_close(r);
}

/* End the response and schedule the reap (safe inside libcurl callbacks). */
static void up_finish(ax_up *u)
{
	if (u->finished)
		return;
	u->finished = 1;
	if (u->m) /* counted before the client can see the end */
		atomic_fetch_add(&u->r->m.late_entries, ax__merge_late_entries(u->m));
	pc_end(u->pc);
	uv_timer_stop(&u->idle);
	uv_timer_start(&u->hold, on_reap, 0, 0);
}

static void on_reap(uv_timer_t *t)
{
	ax_up *u = t->data;
	if (u->in_multi) {
		curl_multi_remove_handle(u->r->multi, u->e);
		u->in_multi = 0;
	}
	curl_easy_cleanup(u->e);
	u->e = NULL;
	curl_slist_free_all(u->hdrs);
	u->hdrs = NULL;
	uv_close((uv_handle_t *)&u->idle, up_handle_closed);
	uv_close((uv_handle_t *)&u->hold, up_handle_closed);
}

/* ------------------------------------------------------------------ merge output */

static int emit_cb(int what, const char *text, size_t len, void *arg)
{
	ax_up *u = arg;
	if (what == AX_MOUT_CHUNK || what == AX_MOUT_RAW) {
		pc_data2(u->pc, "data: ", 6, text, len, "\n\n", 2);
		return 0;
	}
	if (u->err[0]) {
		char *j = error_json(u->err, "upstream_error", 502);
		if (j)
			pc_data2(u->pc, "data: ", 6, j, strlen(j), "\n\n", 2);
		free(j);
	} else {
		pc_data(u->pc, "data: [DONE]\n\n", 14);
	}
	up_finish(u);
	return 1;
}

static void on_hold(uv_timer_t *t);

static void hold_until(ax_up *u, uint64_t deadline, uint64_t now)
{
	uint64_t ms = deadline > now ? (deadline - now + 999999) / 1000000 : 0;
	uv_timer_start(&u->hold, on_hold, ms, 0);
}

static void send_body(ax_up *u, const char *p, size_t n)
{
	pc_head(u->pc, 200, "application/json", (long long)n);
	u->head_sent = 1;
	pc_data(u->pc, p, n);
	up_finish(u);
}

/* Release what the merge can release now; arm the hold timer for the rest. */
static void pump(ax_up *u)
{
	uint64_t now = ax_now_ns(), dl = 0;
	if (u->finished || !u->m)
		return;
	if (u->mode == UP_STREAM) {
		int64_t next = ax__merge_poll(u->m, now, emit_cb, u);
		if (next > 0 && !u->finished)
			hold_until(u, (uint64_t)next, now);
	} else if (u->mode == UP_BODY && u->blen == (size_t)-1) {
		char *out;
		size_t n;
		int rc = ax__merge_body_take(u->m, now, &out, &n, &dl);
		if (rc > 0) {
			send_body(u, out, n);
			free(out);
		} else if (rc == 0) {
			hold_until(u, dl, now);
		}
	}
}

static void on_hold(uv_timer_t *t)
{
	pump(t->data);
}

/* ------------------------------------------------------------------ upstream responses */

static void decide_head(ax_up *u)
{
	long code = 0;
	char *ct = NULL;
	curl_off_t cl = -1;
	curl_easy_getinfo(u->e, CURLINFO_RESPONSE_CODE, &code);
	curl_easy_getinfo(u->e, CURLINFO_CONTENT_TYPE, &ct);
	curl_easy_getinfo(u->e, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
	u->sse = ct && strstr(ct, "text/event-stream") != NULL;
	if (u->m && code == 200 && u->pc->info.stream && u->sse) {
		u->mode = UP_STREAM;
	} else if (u->m && code == 200 && !u->pc->info.stream) {
		u->mode = UP_BODY;
		return; /* head goes out with the merged body */
	} else {
		u->mode = UP_PASS;
	}
	pc_head(u->pc, (int)code, ct, u->mode == UP_PASS ? (long long)cl : -1);
	u->head_sent = 1;
}

static int on_event(const char *data, size_t len, void *arg)
{
	ax_up *u = arg;
	if (len == 6 && memcmp(data, "[DONE]", 6) == 0) {
		u->saw_done = 1;
		ax__merge_upstream_done(u->m, ax_now_ns());
		return 0;
	}
	return ax__merge_chunk(u->m, data, len, ax_now_ns());
}

static size_t body_append(ax_up *u, const char *p, size_t n)
{
	if (u->blen + n > MAX_BODY_IN)
		return 0; /* aborts the transfer: reported as an upstream error */
	if (u->blen + n + 1 > u->bcap) {
		size_t c = u->bcap ? u->bcap : 4096;
		while (c < u->blen + n + 1)
			c *= 2;
		char *b = realloc(u->buf, c);
		if (!b)
			return 0;
		u->buf = b;
		u->bcap = c;
	}
	memcpy(u->buf + u->blen, p, n);
	u->blen += n;
	return n;
}

static void keep_tail(ax_up *u, const char *p, size_t n)
{
	size_t have = strnlen(u->tail, sizeof u->tail), keepn = sizeof u->tail - 1;
	char tmp[2 * sizeof u->tail];
	size_t take = n > keepn ? keepn : n;
	memcpy(tmp, u->tail, have);
	memcpy(tmp + have, p + n - take, take);
	size_t tot = have + take, off = tot > keepn ? tot - keepn : 0;
	memcpy(u->tail, tmp + off, tot - off);
	u->tail[tot - off] = '\0';
	if (strstr(u->tail, "[DONE]"))
		u->saw_done = 1;
}

static size_t on_curl_write(char *p, size_t sz, size_t nmemb, void *arg)
{
	ax_up *u = arg;
	size_t n = sz * nmemb;
	if (u->finished)
		return n;
	uv_timer_again(&u->idle);
	if (!u->head_sent && u->mode != UP_BODY)
		decide_head(u);
	switch (u->mode) {
	case UP_PASS:
		pc_data(u->pc, p, n);
		if (u->sse)
			keep_tail(u, p, n);
		return n;
	case UP_STREAM:
		if (ax__sse_feed(&u->parser, p, n, on_event, u) < 0)
			return 0;
		pump(u);
		return n;
	default:
		return body_append(u, p, n);
	}
}

static void complete_ok(ax_up *u)
{
	if (!u->head_sent && u->mode != UP_BODY)
		decide_head(u);
	if (u->mode == UP_STREAM) {
		ax__sse_finish(&u->parser, on_event, u);
		if (!u->saw_done)
			snprintf(u->err, sizeof u->err, "upstream closed the stream before [DONE]");
		ax__merge_upstream_done(u->m, ax_now_ns());
		pump(u);
	} else if (u->mode == UP_BODY) {
		if (ax__merge_body(u->m, u->buf ? u->buf : "", u->blen, ax_now_ns(), u->pc->info.lp_added) < 0) {
			send_body(u, u->buf ? u->buf : "", u->blen); /* not JSON: as it came */
			return;
		}
		u->blen = (size_t)-1; /* marks "body parsed, waiting for attention" for pump */
		pump(u);
	} else {
		if (u->sse && !u->saw_done)
			up_error(u, 502, "upstream_error", "upstream closed the stream before [DONE]");
		up_finish(u);
	}
}

static void complete_err(ax_up *u, CURLcode rc, const char *why)
{
	char msg[256];
	int status = 502;
	if (rc == CURLE_COULDNT_CONNECT || rc == CURLE_COULDNT_RESOLVE_HOST)
		snprintf(msg, sizeof msg, "upstream unreachable: %s", why);
	else if (rc == CURLE_OPERATION_TIMEDOUT && (status = 504))
		snprintf(msg, sizeof msg, "upstream timeout: %s", why);
	else
		snprintf(msg, sizeof msg, "upstream failed: %s", why);
	if (u->mode == UP_STREAM && u->head_sent) {
		atomic_fetch_add(&u->r->m.upstream_errors, 1);
		ax__sse_finish(&u->parser, on_event, u);
		snprintf(u->err, sizeof u->err, "%s", msg);
		ax__merge_upstream_done(u->m, ax_now_ns());
		pump(u);
		return;
	}
	up_error(u, status, "upstream_error", msg);
	up_finish(u);
}

static void on_idle(uv_timer_t *t)
{
	ax_up *u = t->data;
	char why[64];
	uv_timer_stop(&u->idle);
	if (u->finished)
		return;
	snprintf(why, sizeof why, "no data for %d ms", u->r->o.upstream_timeout_ms);
	if (u->in_multi) { /* stop the transfer first, so nothing more comes */
		curl_multi_remove_handle(u->r->multi, u->e);
		u->in_multi = 0;
	}
	complete_err(u, CURLE_OPERATION_TIMEDOUT, why);
}

static void check_multi(ax_relay *r)
{
	CURLMsg *msg;
	int left;
	while ((msg = curl_multi_info_read(r->multi, &left))) {
		if (msg->msg != CURLMSG_DONE)
			continue;
		ax_up *u = NULL;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&u);
		CURLcode rc = msg->data.result;
		curl_multi_remove_handle(r->multi, msg->easy_handle);
		u->in_multi = 0;
		uv_timer_stop(&u->idle);
		if (u->finished)
			continue;
		if (rc == CURLE_OK)
			complete_ok(u);
		else
			complete_err(u, rc, curl_easy_strerror(rc));
	}
}

/* ------------------------------------------------------------------ libcurl on libuv */

typedef struct curl_sock {
	uv_poll_t poll;
	ax_relay *r;
	curl_socket_t fd;
} curl_sock;

static void on_curl_poll(uv_poll_t *h, int status, int events)
{
	curl_sock *cs = h->data;
	int flags = status < 0 ? CURL_CSELECT_ERR
			       : ((events & UV_READABLE) ? CURL_CSELECT_IN : 0) | ((events & UV_WRITABLE) ? CURL_CSELECT_OUT : 0);
	int running;
	ax_relay *r = cs->r;
	curl_multi_socket_action(r->multi, cs->fd, flags, &running);
	check_multi(r);
}

static void free_handle(uv_handle_t *h)
{
	free(h->data);
}

static int on_curl_socket(CURL *e, curl_socket_t s, int what, void *userp, void *socketp)
{
	ax_relay *r = userp;
	curl_sock *cs = socketp;
	if (what == CURL_POLL_REMOVE) {
		if (cs) {
			uv_poll_stop(&cs->poll);
			uv_close((uv_handle_t *)&cs->poll, free_handle);
			curl_multi_assign(r->multi, s, NULL);
		}
		return 0;
	}
	if (!cs) {
		cs = calloc(1, sizeof *cs);
		if (!cs)
			return -1;
		cs->r = r;
		cs->fd = s;
		cs->poll.data = cs;
		if (uv_poll_init_socket(&r->loop, &cs->poll, s)) {
			free(cs);
			return -1;
		}
		curl_multi_assign(r->multi, s, cs);
	}
	int ev = ((what & CURL_POLL_IN) ? UV_READABLE : 0) | ((what & CURL_POLL_OUT) ? UV_WRITABLE : 0);
	uv_poll_start(&cs->poll, ev, on_curl_poll);
	return 0;
}

static void on_curl_timeout(uv_timer_t *t)
{
	ax_relay *r = t->data;
	int running;
	curl_multi_socket_action(r->multi, CURL_SOCKET_TIMEOUT, 0, &running);
	check_multi(r);
}

static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp)
{
	ax_relay *r = userp;
	if (timeout_ms < 0)
		uv_timer_stop(&r->curl_timer);
	else
		uv_timer_start(&r->curl_timer, on_curl_timeout, (uint64_t)timeout_ms, 0);
	return 0;
}

/* ------------------------------------------------------------------ policies */

/* A capture that said hello and whose records connection is still open (the pipe's address lookup fails once the
 * connection is gone). Caller holds cap_mu. */
static int capture_connected(const ax_capture *cp)
{
	nng_sockaddr sa;
	return cp->has_hello && nng_pipe_id(cp->pipe) > 0 && nng_pipe_get_addr(cp->pipe, NNG_OPT_LOCADDR, &sa) == 0;
}

/* Query heads of the live captures: [lo, hi) per capture, one range per TP rank. */
typedef struct head_ranges {
	uint32_t lo[AX_MAX_CAPTURES], hi[AX_MAX_CAPTURES];
	int n;
	uint32_t n_layers; /* the largest model depth a capture reported */
} head_ranges;

static int in_ranges(const head_ranges *hr, int64_t h)
{
	for (int i = 0; i < hr->n; i++)
		if (h >= hr->lo[i] && h < hr->hi[i])
			return 1;
	return 0;
}

/* Distinct ids of a list (n ≤ AX_PROTO_MAX_LIST) that some capture will report: below n_layers for layers (when
 * known), inside a live rank's head range for heads (when known). Ids the captures drop are never waited for. */
static uint32_t distinct_ids(const int32_t *ids, uint32_t n, const head_ranges *hr, int heads)
{
	uint32_t c = 0;
	for (uint32_t i = 0; i < n; i++) {
		uint32_t j = 0;
		while (j < i && ids[j] != ids[i])
			j++;
		if (j < i)
			continue;
		if (heads ? (!hr->n || in_ranges(hr, ids[i])) : (!hr->n_layers || (uint32_t)ids[i] < hr->n_layers))
			c++;
	}
	return c;
}

/* Heads in the union of the ranges (ranks overlap only when two captures attach the same rank). */
static uint32_t union_heads(const head_ranges *hr)
{
	uint32_t lo[AX_MAX_CAPTURES], hi[AX_MAX_CAPTURES], c = 0;
	for (int i = 0; i < hr->n; i++) { /* insertion sort by lo */
		int j = i;
		for (; j > 0 && lo[j - 1] > hr->lo[i]; j--) {
			lo[j] = lo[j - 1];
			hi[j] = hi[j - 1];
		}
		lo[j] = hr->lo[i];
		hi[j] = hr->hi[i];
	}
	uint32_t end = 0;
	for (int i = 0; i < hr->n; i++) {
		uint32_t from = lo[i] > end ? lo[i] : end;
		if (hi[i] > from)
			c += hi[i] - from;
		if (hi[i] > end)
			end = hi[i];
	}
	return c;
}

/* Records that make one position complete: layers × heads the request asked for that some live capture will
 * report, else the defaults of the connected captures (a capture that went away no longer adds its heads: its
 * successor says hello again). With TP, each rank's capture reports the heads of its range, so the heads are the
 * union of the ranks' ranges (∩ the request's list). */
static uint32_t expected_records(ax_relay *r, const ax_rec_policy *p)
{
	uint32_t layers, heads = 1, mode = p->mode;
	int32_t seen[AX_PROTO_MAX_LIST];
	uint32_t nseen = 0;
	head_ranges hr = {.n = 0};
	pthread_mutex_lock(&r->cap_mu);
	for (int i = 0; i < r->n_caps; i++) {
		const ax_rec_hello *h = &r->caps[i].hello;
		if (!capture_connected(&r->caps[i]))
			continue;
		if (!mode)
			mode = h->mode;
		hr.lo[hr.n] = h->head_offset;
		hr.hi[hr.n++] = h->head_offset + h->n_q_heads;
		if (h->n_layers > hr.n_layers)
			hr.n_layers = h->n_layers;
		for (uint32_t k = 0; k < h->n_layer_ids && k < AX_PROTO_MAX_LIST; k++) {
			uint32_t j = 0;
			while (j < nseen && seen[j] != h->layer_ids[k])
				j++;
			if (j == nseen && nseen < AX_PROTO_MAX_LIST)
				seen[nseen++] = h->layer_ids[k];
		}
	}
	pthread_mutex_unlock(&r->cap_mu);
	if (p->n_layer_ids)
		layers = distinct_ids(p->layer_ids, p->n_layer_ids, &hr, 0);
	else
		layers = nseen;
	if (mode == AX_MODE_HEADS)
		heads = p->n_head_ids ? distinct_ids(p->head_ids, p->n_head_ids, &hr, 1) : union_heads(&hr);
	layers = layers ? layers : 1;
	return layers * (heads ? heads : 1);
}

/* The capture slots that count for a request's `end`s: connected, with a hello (as expected_records counts). */
static uint64_t live_captures(ax_relay *r)
{
	uint64_t live = 0;
	pthread_mutex_lock(&r->cap_mu);
	for (int i = 0; i < r->n_caps && i < 64; i++)
		if (capture_connected(&r->caps[i]))
			live |= 1ull << i;
	pthread_mutex_unlock(&r->cap_mu);
	return live;
}

static void publish(ax_relay *r, nng_socket s, const uint8_t *p, size_t n)
{
	nng_msg *m;
	if (nng_msg_alloc(&m, n))
		return;
	memcpy(nng_msg_body(m), p, n);
	if (nng_sendmsg(s, m, NNG_FLAG_NONBLOCK))
		nng_msg_free(m);
}

static void ax__relay_rec_init_seq(ax_relay *r, ax_record *rec, int type, uint64_t seq)
{
	(void)r;
	ax_record_init(rec, type);
	rec->v = AX_PROTO_VERSION;
	snprintf(rec->src, sizeof rec->src, "relay");
	rec->seq = seq;
	rec->ts_ns = ax_wall_ns();
}

void ax__relay_rec_init(ax_relay *r, ax_record *rec, int type)
{
	ax__relay_rec_init_seq(r, rec, type, atomic_fetch_add(&r->seq, 1));
}

/* Policies of `only` or of every live request on the policy socket. `announce` (a request's first publication)
 * gives the record a new seq and also puts it on the feed and to WebSocket clients. */
static void publish_policies(ax_relay *r, ax_up *only, int announce)
{
	ax_batch b;
	const uint8_t *p;
	size_t n;
	ax_batch_init(&b);
	for (ax_up *u = only ? only : r->ups; u; u = only ? NULL : u->next) {
		if (!u->m || u->finished)
			continue;
		ax_record rec;
		/* Only the announcement goes on the feed, so only it takes a new seq: a re-publication on the policy
		 * socket repeats the announced record, and the feed's relay seq stays without holes. */
		if (announce) {
			ax__relay_rec_init(r, &rec, AX_REC_POLICY);
			u->policy_seq = rec.seq;
		} else {
			ax__relay_rec_init_seq(r, &rec, AX_REC_POLICY, u->policy_seq);
		}
		snprintf(rec.rid, sizeof rec.rid, "%s", u->pc->info.rid);
		rec.u.policy = u->pc->info.policy;
		if (ax_batch_add(&b, &rec) < 0)
			ax_log(AX_LOG_WARN, TAG, "%s: policy record rejected by proto", rec.rid);
		else if (announce)
			ax__ws_record(r, &rec, ax_now_ns(), 0);
	}
	if (ax_batch_finish(&b, &p, &n) > 0) {
		publish(r, r->pub_policy, p, n);
		atomic_fetch_add(&r->m.policy_frames, 1);
		if (announce) {
			publish(r, r->pub_feed, p, n);
			atomic_fetch_add(&r->m.feed_frames, 1);
		}
	}
	ax_batch_fini(&b);
}

static void on_policy_timer(uv_timer_t *t)
{
	publish_policies(t->data, NULL, 0);
}

static int easy_setup(ax_relay *r, ax_up *u)
{
	ax_pconn *pc = u->pc;
	CURL *e = u->e = curl_easy_init();
	if (!e)
		return -ENOMEM;
	curl_easy_setopt(e, CURLOPT_URL, pc->url);
	curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)u);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_curl_write);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, u);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)r->o.upstream_timeout_ms);
	curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
	if (pc->body) {
		curl_easy_setopt(e, CURLOPT_POSTFIELDS, pc->body);
		curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)pc->body_len);
		u->hdrs = curl_slist_append(u->hdrs, "Content-Type: application/json");
	}
	if (strcmp(pc->method, "GET") == 0)
		curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
	else if (strcmp(pc->method, "POST") != 0)
		curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, pc->method);
	u->hdrs = curl_slist_append(u->hdrs, "Expect:"); /* no 100-continue round trip */
	if (pc->auth) {
		char h[1024];
		snprintf(h, sizeof h, "Authorization: %s", pc->auth);
		u->hdrs = curl_slist_append(u->hdrs, h);
	}
	curl_easy_setopt(e, CURLOPT_HTTPHEADER, u->hdrs);
	return 0;
}

/* Hand the request to libcurl: from here on the upstream sees it. */
static void forward(ax_up *u)
{
	ax_relay *r = u->r;
	if (easy_setup(r, u) || curl_multi_add_handle(r->multi, u->e) != CURLM_OK) {
		up_error(u, 500, "internal_error", "relay could not start the upstream request");
		up_finish(u);
		return;
	}
	u->in_multi = 1;
	uv_timer_start(&u->idle, on_idle, (uint64_t)r->o.upstream_timeout_ms, (uint64_t)r->o.upstream_timeout_ms);
}

/* ------------------------------------------------------------------ waiting for policy acks */

static ax_up *find_up(ax_relay *r, const char *rid);

/* Slots of the captures a new policy must be acknowledged by (see the file comment). */
static uint64_t captures_to_wait(ax_relay *r)
{
	uint64_t mask = 0;
	pthread_mutex_lock(&r->cap_mu);
	for (int i = 0; i < r->n_caps; i++) {
		const ax_capture *cp = &r->caps[i];
		if (capture_connected(cp) && cp->ack_misses < ACK_MISS_MAX)
			mask |= 1ull << i;
	}
	pthread_mutex_unlock(&r->cap_mu);
	return mask;
}

static void on_policy_wait(uv_timer_t *t);

static void arm_wait(ax_up *u, uint64_t now)
{
	uint64_t left = u->wait_deadline_ns > now ? u->wait_deadline_ns - now : 0;
	uint64_t ms = (left + 999999) / 1000000;
	uv_timer_start(&u->hold, on_policy_wait, ms < POLICY_WAIT_TICK_MS ? ms : POLICY_WAIT_TICK_MS, 0);
}

static void end_wait(ax_up *u)
{
	uv_timer_stop(&u->hold);
	u->waiting = 0;
	forward(u);
}

/* The bound passed: count it, charge a miss to each capture that stayed silent, forward anyway. */
static void ack_timeout(ax_up *u)
{
	ax_relay *r = u->r;
	char who[AX_PROTO_STR] = "";
	int n = 0;
	atomic_fetch_add(&r->m.policy_ack_timeouts, 1);
	pthread_mutex_lock(&r->cap_mu);
	for (int i = 0; i < r->n_caps; i++)
		if (u->wait_mask >> i & 1) {
			if (n++ == 0)
				snprintf(who, sizeof who, "%s", r->caps[i].src);
			r->caps[i].ack_misses++;
		}
	pthread_mutex_unlock(&r->cap_mu);
	ax_log(AX_LOG_WARN, TAG, "%s: no policy ack from %d capture(s) (%s%s) within %d ms; forwarding anyway",
	       u->pc->info.rid, n, who, n > 1 ? ", ..." : "", r->o.policy_wait_ms);
	end_wait(u);
}

static void on_policy_wait(uv_timer_t *t)
{
	ax_up *u = t->data;
	uint64_t now = ax_now_ns();
	if (!u->waiting || u->finished)
		return;
	if (now + 500000 >= u->wait_deadline_ns) { /* within timer resolution of the bound */
		ack_timeout(u);
		return;
	}
	publish_policies(u->r, u, 0);
	arm_wait(u, now);
}

/* 1 when the request now waits for acks (it goes upstream from end_wait), 0 when it may go now. */
static int wait_for_acks(ax_up *u)
{
	ax_relay *r = u->r;
	if (r->o.policy_wait_ms <= 0 || !(u->wait_mask = captures_to_wait(r)))
		return 0;
	u->waiting = 1;
	u->wait_start_ns = ax_now_ns();
	u->wait_deadline_ns = u->wait_start_ns + (uint64_t)r->o.policy_wait_ms * 1000000ull;
	atomic_fetch_add(&r->m.policy_waits, 1);
	arm_wait(u, u->wait_start_ns);
	return 1;
}

/* A capture (slot) echoed the policy of `rid`. */
static void policy_acked(ax_relay *r, int slot, const char *rid)
{
	atomic_fetch_add(&r->m.policy_acks, 1);
	pthread_mutex_lock(&r->cap_mu);
	r->caps[slot].ack_misses = 0;
	pthread_mutex_unlock(&r->cap_mu);
	ax_up *u = rid[0] ? find_up(r, rid) : NULL;
	if (!u || !u->waiting)
		return;
	u->wait_mask &= ~(1ull << slot);
	if (u->wait_mask)
		return;
	ax_log(AX_LOG_DEBUG, TAG, "%s: policy acknowledged in %.2f ms", rid, (ax_now_ns() - u->wait_start_ns) / 1e6);
	end_wait(u);
}

/* ------------------------------------------------------------------ starting a request */

static void start_request(ax_relay *r, ax_pconn *pc)
{
	ax_up *u = calloc(1, sizeof *u);
	if (!u)
		goto oom;
	u->r = r;
	u->pc = pc; /* the command's reference moves here */
	ax__sse_init(&u->parser);
	uv_timer_init(&r->loop, &u->idle);
	uv_timer_init(&r->loop, &u->hold);
	u->idle.data = u->hold.data = u;
	u->handles_open = 2;
	u->next = r->ups;
	r->ups = u;
	atomic_fetch_add(&r->m.active_requests, 1);
	atomic_fetch_add(&r->m.requests, 1);
	if (pc->kind != AX_PK_PASS && pc->info.attention) {
		ax_merge_cfg cfg = {.kind = pc->kind, .stream = pc->info.stream, .want_prompt = (int)pc->info.policy.prompt,
				    .expected = expected_records(r, &pc->info.policy),
				    .wait_ns = (uint64_t)r->o.attention_wait_ms * 1000000ull,
				    .stride = pc->info.policy.stride, .max_tokens = pc->info.policy.max_tokens};
		if (!(u->m = ax__merge_new(&cfg)))
			goto fail;
		atomic_fetch_add(&r->m.attention_requests, 1);
		publish_policies(r, u, 1); /* before the engine sees the request */
		if (wait_for_acks(u))
			return;
	}
	forward(u);
	return;
fail:
	up_error(u, 500, "internal_error", "relay could not start the upstream request");
	up_finish(u);
	return;
oom:
	pc_head(pc, 503, "text/plain", 0);
	pc_end(pc);
	ax__pconn_unref(pc);
}

static void cancel_request(ax_relay *r, ax_pconn *pc)
{
	for (ax_up *u = r->ups; u; u = u->next)
		if (u->pc == pc && !u->finished) {
			atomic_fetch_add(&r->m.client_cancels, 1);
			ax_log(AX_LOG_DEBUG, TAG, "%s: client went away, upstream request cancelled", pc->info.rid);
			up_finish(u); /* the reap removes the transfer: the upstream sees the connection close */
		}
	ax__pconn_unref(pc);
}

/* ------------------------------------------------------------------ commands */

int ax__relay_submit(ax_relay *r, int type, ax_pconn *pc)
{
	ax_cmd *c = malloc(sizeof *c);
	if (!c)
		return -ENOMEM;
	c->next = NULL;
	c->type = type;
	c->pc = pc;
	pthread_mutex_lock(&r->cmd_mu);
	if (r->cmd_closed) {
		pthread_mutex_unlock(&r->cmd_mu);
		free(c);
		return -ESHUTDOWN;
	}
	atomic_fetch_add(&pc->refs, 1);
	if (r->cmd_tail)
		r->cmd_tail->next = c;
	else
		r->cmd_head = c;
	r->cmd_tail = c;
	pthread_mutex_unlock(&r->cmd_mu);
	uv_async_send(&r->wake);
	return 0;
}

static ax_cmd *take_cmds(ax_relay *r, int close)
{
	pthread_mutex_lock(&r->cmd_mu);
	ax_cmd *c = r->cmd_head;
	r->cmd_head = r->cmd_tail = NULL;
	if (close)
		r->cmd_closed = 1;
	pthread_mutex_unlock(&r->cmd_mu);
	return c;
}

static void run_cmds(ax_relay *r, ax_cmd *c)
{
	for (ax_cmd *n; c; c = n) {
		n = c->next;
		if (c->type == AX_CMD_START && !r->stopping) {
			start_request(r, c->pc);
		} else if (c->type == AX_CMD_START) {
			pc_head(c->pc, 503, "text/plain", 0);
			pc_end(c->pc);
			ax__pconn_unref(c->pc);
		} else {
			cancel_request(r, c->pc);
		}
		free(c);
	}
}

/* ------------------------------------------------------------------ records in */

/* Note a record of `rec->src`, received on `pipe`; returns the capture's slot. */
static int capture_seen(ax_relay *r, const ax_record *rec, uint64_t now, nng_pipe pipe)
{
	pthread_mutex_lock(&r->cap_mu);
	int i = 0;
	while (i < r->n_caps && strcmp(r->caps[i].src, rec->src) != 0)
		i++;
	if (i == r->n_caps) {
		if (r->n_caps == AX_MAX_CAPTURES) { /* forget the longest silent one */
			i = 0;
			for (int k = 1; k < r->n_caps; k++)
				if (r->caps[k].last_ns < r->caps[i].last_ns)
					i = k;
		} else {
			r->n_caps++;
		}
		memset(&r->caps[i], 0, sizeof r->caps[i]);
		snprintf(r->caps[i].src, sizeof r->caps[i].src, "%s", rec->src);
	}
	r->caps[i].last_ns = now;
	r->caps[i].pipe = pipe;
	if (rec->type == AX_REC_HELLO) {
		r->caps[i].has_hello = 1;
		r->caps[i].hello = rec->u.hello;
	}
	pthread_mutex_unlock(&r->cap_mu);
	return i;
}

static ax_up *find_up(ax_relay *r, const char *rid)
{
	for (ax_up *u = r->ups; u; u = u->next)
		if (u->m && !u->finished && strcmp(u->pc->info.rid, rid) == 0)
			return u;
	return NULL;
}

typedef struct ingest {
	ax_relay *r;
	uint64_t t;
	nng_pipe pipe;        /* the connection the frame came on */
	const char *last_src; /* capture_seen once per source run */
	int last_slot;        /* its slot */
} ingest;

/* A record of capture `slot` for its request. Each capture (TP rank) sends its own `end`: the request's captures
 * are done when every live one has sent it (merge.c), not at the first. */
static void to_request(ax_relay *r, const ax_record *rec, int slot)
{
	ax_up *u = rec->rid[0] ? find_up(r, rec->rid) : NULL;
	if (!u)
		return;
	if (rec->type == AX_REC_ATTN)
		ax__merge_add(u->m, &rec->u.attn);
	else if (rec->type == AX_REC_REQ)
		ax__merge_set_prompt_len(u->m, rec->u.req.prompt_len);
	else if (rec->type == AX_REC_END)
		ax__merge_source_end(u->m, slot, live_captures(r));
	else
		return;
	u->touched = 1;
}

/* A hello changes what completes a position (its heads and default layers): requests already in the store were
 * sized from the hellos known when they started, which misses a capture whose hello arrives later (a capture that
 * starts or re-attaches while a request runs). Their chunks would then leave with part of their layers × heads. */
static void refresh_expected(ax_relay *r)
{
	uint64_t live = live_captures(r);
	for (ax_up *u = r->ups; u; u = u->next)
		if (u->m && !u->finished) {
			ax__merge_set_expected(u->m, expected_records(r, &u->pc->info.policy));
			ax__merge_set_sources(u->m, live);
			u->touched = 1;
		}
}

static int on_record(const ax_record *rec, void *arg)
{
	ingest *in = arg;
	ax_relay *r = in->r;
	if (rec->type == AX_REC_HELLO || !in->last_src || strcmp(in->last_src, rec->src) != 0) {
		in->last_slot = capture_seen(r, rec, in->t, in->pipe);
		in->last_src = rec->src;
	}
	if (rec->type == AX_REC_HELLO)
		refresh_expected(r);
	if (rec->type == AX_REC_POLICY) /* on the records channel, a policy is a capture's ack */
		policy_acked(r, in->last_slot, rec->rid);
	else
		to_request(r, rec, in->last_slot);
	ax__ws_record(r, rec, in->t, 1);
	return 0;
}

/* A frame whose records fail the decoder. `published`: it passed the structural check and is already on the feed
 * (its records were not all valid); else it was dropped and the feed gets a `gap` for it. Either way it counts as a
 * decode error and WebSocket clients get a gap (they never see its records verbatim). */
static void decode_error(ax_relay *r, int rc, size_t len, int published)
{
	ax_record g;
	ax_batch b;
	const uint8_t *p;
	size_t n;
	atomic_fetch_add(&r->m.decode_errors, 1);
	ax_log(AX_LOG_WARN, TAG, "%s a %zu-byte frame: %s", published ? "published (records invalid)" : "dropped", len,
	       ax_strerror(rc));
	ax__relay_rec_init(r, &g, AX_REC_GAP);
	snprintf(g.u.gap.what, sizeof g.u.gap.what, "frames");
	snprintf(g.u.gap.reason, sizeof g.u.gap.reason, "invalid");
	g.u.gap.count = 1;
	ax_batch_init(&b);
	if (!published && ax_batch_add(&b, &g) >= 0 && ax_batch_finish(&b, &p, &n) > 0)
		publish(r, r->pub_feed, p, n);
	ax_batch_fini(&b);
	ax__ws_record(r, &g, ax_now_ns(), 0);
}

/* The records of a frame that must be decoded even when nobody needs attention: every record that is not an
 * `attn` (hello, req, end, gap, stats, policy acks), and the first record (the capture table learns the frame's
 * source and pipe from it). More than AX_FRAME_PICKS of them: the whole frame is decoded. */
#define AX_FRAME_PICKS 32
typedef struct frame_walk {
	uint32_t n_records;
	int n_picks;                    /* -1: too many, decode the frame */
	uint32_t pick_off[AX_FRAME_PICKS], pick_len[AX_FRAME_PICKS];
} frame_walk;

/* An `attn` record as proto's encoder writes it: the map's first pair is "t": "attn". A record laid out otherwise
 * (another encoder's key order) is simply decoded. */
static int looks_attn(const uint8_t *p, size_t n)
{
	static const uint8_t key[] = {0xa1, 't', 0xa4, 'a', 't', 't', 'n'};
	size_t h = (p[0] & 0xf0) == 0x80 ? 1 : p[0] == 0xde ? 3 : 5;
	return n >= h + sizeof key && memcmp(p + h, key, sizeof key) == 0;
}

/* The structural check before a frame goes on the feed: one msgpack array of maps, nothing after it, within the
 * caps; each record's extent found with ax_frame_span (no decoding). Returns 0 or -EBADMSG / -EMSGSIZE. */
static int frame_walk_check(const uint8_t *p, size_t len, frame_walk *w)
{
	const uint8_t *end = p + len, *q;
	uint64_t n;
	if (len > AX_PROTO_MAX_FRAME)
		return -EMSGSIZE;
	if (len >= 1 && (p[0] & 0xf0) == 0x90)
		n = p[0] & 0x0f, q = p + 1;
	else if (len >= 3 && p[0] == 0xdc)
		n = (uint64_t)p[1] << 8 | p[2], q = p + 3;
	else if (len >= 5 && p[0] == 0xdd)
		n = (uint64_t)p[1] << 24 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 8 | p[4], q = p + 5;
	else
		return -EBADMSG;
	if (n > AX_PROTO_MAX_RECORDS)
		return -EMSGSIZE;
	w->n_records = (uint32_t)n;
	w->n_picks = 0;
	for (uint64_t i = 0; i < n; i++) {
		size_t rl;
		if (q == end || ((*q & 0xf0) != 0x80 && *q != 0xde && *q != 0xdf))
			return -EBADMSG;
		if (ax_frame_span(q, (size_t)(end - q), &rl) != 1)
			return -EBADMSG;
		if (w->n_picks >= 0 && (i == 0 || !looks_attn(q, rl))) {
			if (w->n_picks == AX_FRAME_PICKS) {
				w->n_picks = -1;
			} else {
				w->pick_off[w->n_picks] = (uint32_t)(q - p);
				w->pick_len[w->n_picks++] = (uint32_t)rl;
			}
		}
		q += rl;
	}
	return q == end ? 0 : -EBADMSG;
}

/* Someone needs every record: a WebSocket client, or a live request whose attention is merged. */
static int records_wanted(ax_relay *r)
{
	if (ax__ws_count(r) > 0)
		return 1;
	for (ax_up *u = r->ups; u; u = u->next)
		if (u->m && !u->finished)
			return 1;
	return 0;
}

/* Decode only the picked records (attn records are skipped unread). 0 or the first decoder error. */
static int decode_picks(const uint8_t *p, const frame_walk *w, ingest *in)
{
	for (int i = 0; i < w->n_picks; i++) {
		ax_record rec;
		int rc = ax_record_unpack(p + w->pick_off[i], w->pick_len[i], &rec);
		if (rc < 0)
			return rc;
		on_record(&rec, in);
		ax_record_fini(&rec);
	}
	return 0;
}

/*
 * One capture frame. The feed needs only the verdict that the frame is well-formed (frame_walk_check: garbage never
 * reaches the feed), not its records, so whether the frame is published no longer depends on decoding them. Its
 * records are decoded only as far as someone needs them: all of them (with full field validation) when a WebSocket
 * client is connected or a request is merging attention; otherwise only the non-attn records and the first one
 * (capture table, hellos, policy acks, req/end), while the attn records are counted but not read. Consequences: a
 * structurally sound frame whose records fail field validation is still published on the feed and counts as a
 * decode error (records_in counts all its records); WebSocket clients get a gap instead of it. When nobody needs
 * records, an attn record with bad fields is not noticed at all (attnx-tail validates what it shows).
 */
static void ingest_frame(ax_relay *r, nng_msg *msg)
{
	ingest in = {.r = r, .t = ax_now_ns(), .pipe = nng_msg_get_pipe(msg)};
	const uint8_t *body = nng_msg_body(msg);
	size_t len = nng_msg_len(msg);
	frame_walk w;
	atomic_fetch_add(&r->m.frames_in, 1);
	atomic_store(&r->m.last_record_ns, in.t);
	int rc = frame_walk_check(body, len, &w);
	if (rc < 0) {
		decode_error(r, rc, len, 0);
		nng_msg_free(msg);
		return;
	}
	atomic_fetch_add(&r->m.records_in, w.n_records);
	int full = w.n_picks < 0 || records_wanted(r);
	rc = full ? ax_frame_decode(body, len, on_record, &in) : decode_picks(body, &w, &in);
	for (ax_up *u = r->ups; u; u = u->next)
		if (u->touched) {
			u->touched = 0;
			pump(u);
		}
	if (rc < 0)
		decode_error(r, rc, len, 1);
	else if (full)
		ax__ws_frame(r, body, len, in.t);
	atomic_fetch_add(&r->m.feed_frames, 1);
	if (nng_sendmsg(r->pub_feed, msg, NNG_FLAG_NONBLOCK)) /* verbatim; ownership moves on success */
		nng_msg_free(msg);
}

static void on_pull(uv_poll_t *h, int status, int events)
{
	ax_relay *r = h->data;
	for (int i = 0; i < 256; i++) {
		nng_msg *msg;
		int rv = nng_recvmsg(r->pull, &msg, NNG_FLAG_NONBLOCK);
		if (rv)
			break;
		ingest_frame(r, msg);
	}
}

/* ------------------------------------------------------------------ lifecycle */

static void close_one(uv_handle_t *h, void *arg)
{
	ax_relay *r = arg;
	if (uv_is_closing(h))
		return;
	if (h->type == UV_POLL && h != (uv_handle_t *)&r->pull_poll) /* a libcurl socket watcher */
		uv_close(h, free_handle);
	else
		uv_close(h, NULL);
}

/* Every transfer is gone: close the remaining handles so uv_run returns. */
static void final_close(ax_relay *r)
{
	curl_multi_setopt(r->multi, CURLMOPT_SOCKETFUNCTION, NULL);
	curl_multi_setopt(r->multi, CURLMOPT_TIMERFUNCTION, NULL);
	uv_walk(&r->loop, close_one, r);
}

static void begin_stop(ax_relay *r)
{
	if (r->stopping)
		return;
	r->stopping = 1;
	ax_log(AX_LOG_INFO, TAG, "stopping");
	run_cmds(r, take_cmds(r, 1));
	for (ax_up *u = r->ups; u; u = u->next)
		if (!u->finished) {
			up_error(u, 503, "unavailable", "relay is shutting down");
			up_finish(u);
		}
	ax__http_stop(r); /* handlers have their ends; WebSocket clients are closed */
	uv_poll_stop(&r->pull_poll);
	uv_timer_stop(&r->policy_timer);
	if (!r->ups)
		final_close(r);
}

static void on_wake(uv_async_t *a)
{
	ax_relay *r = a->data;
	if (atomic_load(&r->stop_requested)) {
		begin_stop(r);
		return;
	}
	run_cmds(r, take_cmds(r, 0));
}

static void on_signal(uv_signal_t *s, int signum)
{
	ax_relay_stop(s->data);
}

static int nng_err(int rv)
{
	switch (rv) {
	case 0: return 0;
	case NNG_EADDRINUSE: return -EADDRINUSE;
	case NNG_EADDRINVAL: case NNG_EINVAL: return -EINVAL;
	case NNG_ENOMEM: return -ENOMEM;
	case NNG_EPERM: return -EPERM;
	default: return -EIO;
	}
}

#define AX_FEED_SENDBUF 256 /* frames queued per feed subscriber */

static int open_nng(ax_relay *r)
{
	int rv, fd;
	if ((rv = nng_pull0_open(&r->pull)) || (rv = nng_pub0_open(&r->pub_policy)) || (rv = nng_pub0_open(&r->pub_feed)))
		return nng_err(rv);
	nng_socket_set_int(r->pull, NNG_OPT_RECVBUF, 1024);
	/* PUB drops a frame for a subscriber whose queue is full; nng's default of 16 frames (~8 k records) lets a
	 * subscriber that is briefly descheduled lose frames at feed rates of 10^6 records/s. Queued frames are shared
	 * references, so this costs memory only while a subscriber lags: ≤ AX_FEED_SENDBUF × the frame size each. */
	nng_socket_set_int(r->pub_feed, NNG_OPT_SENDBUF, AX_FEED_SENDBUF);
	const char *addr[] = {r->o.records, r->o.policy, r->o.feed};
	nng_socket s[] = {r->pull, r->pub_policy, r->pub_feed};
	for (int i = 0; i < 3; i++)
		if ((rv = nng_listen(s[i], addr[i], NULL, 0))) {
			ax_log(AX_LOG_ERROR, TAG, "cannot listen on %s: %s", addr[i], nng_strerror(rv));
			return nng_err(rv);
		}
	if ((rv = nng_socket_get_int(r->pull, NNG_OPT_RECVFD, &fd)))
		return nng_err(rv);
	if (uv_poll_init(&r->loop, &r->pull_poll, fd))
		return -EIO;
	r->pull_poll.data = r;
	return uv_poll_start(&r->pull_poll, UV_READABLE, on_pull) ? -EIO : 0;
}

static int open_loop(ax_relay *r)
{
	if (uv_loop_init(&r->loop))
		return -ENOMEM;
	r->loop_ok = 1;
	uv_async_init(&r->loop, &r->wake, on_wake);
	uv_timer_init(&r->loop, &r->curl_timer);
	uv_timer_init(&r->loop, &r->policy_timer);
	r->wake.data = r->curl_timer.data = r->policy_timer.data = r;
	r->handles_ok = 1;
	if (r->o.handle_signals) {
		uv_signal_init(&r->loop, &r->sig_int);
		uv_signal_init(&r->loop, &r->sig_term);
		r->sig_int.data = r->sig_term.data = r;
		uv_signal_start(&r->sig_int, on_signal, SIGINT);
		uv_signal_start(&r->sig_term, on_signal, SIGTERM);
	}
	if (!(r->multi = curl_multi_init()))
		return -ENOMEM;
	curl_multi_setopt(r->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
	curl_multi_setopt(r->multi, CURLMOPT_SOCKETDATA, r);
	curl_multi_setopt(r->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
	curl_multi_setopt(r->multi, CURLMOPT_TIMERDATA, r);
	return 0;
}

static void global_init(void);

int ax_relay_open(ax_relay **out, const ax_relay_opts *o)
{
	static pthread_once_t once = PTHREAD_ONCE_INIT;
	*out = NULL;
	ax_relay *r = calloc(1, sizeof *r);
	if (!r)
		return -ENOMEM;
	pthread_mutex_init(&r->cmd_mu, NULL);
	pthread_mutex_init(&r->ws_mu, NULL);
	pthread_mutex_init(&r->cap_mu, NULL);
	int rc = copy_opts(r, o);
	if (rc) {
		ax_log(AX_LOG_ERROR, TAG, "invalid options");
		goto fail;
	}
	pthread_once(&once, global_init);
	if ((rc = open_loop(r)) || (rc = open_nng(r)) || (rc = ax__http_start(r)))
		goto fail;
	*out = r;
	return 0;
fail:
	ax_relay_close(r);
	return rc;
}

static void global_init(void)
{
	curl_global_init(CURL_GLOBAL_DEFAULT);
	mg_init_library(0);
}

int ax_relay_port(const ax_relay *r)
{
	return r->port;
}

int ax_relay_run(ax_relay *r)
{
	uv_timer_start(&r->policy_timer, on_policy_timer, POLICY_REPUBLISH_MS, POLICY_REPUBLISH_MS);
	if (atomic_load(&r->stop_requested))
		uv_async_send(&r->wake);
	ax_log(AX_LOG_INFO, TAG, "listening on %s (port %d), upstream %s, records %s", r->o.listen, r->port,
	       r->o.upstream, r->o.records);
	int rc = uv_run(&r->loop, UV_RUN_DEFAULT);
	return rc < 0 ? -EIO : 0;
}

void ax_relay_stop(ax_relay *r)
{
	atomic_store(&r->stop_requested, 1);
	if (r->handles_ok)
		uv_async_send(&r->wake);
}

void ax_relay_close(ax_relay *r)
{
	if (!r)
		return;
	if (r->mg)
		ax__http_stop(r);
	if (r->loop_ok) {
		if (!r->stopping) { /* opened but never run, or run failed: close the handles here */
			r->stopping = 1;
			run_cmds(r, take_cmds(r, 1));
			if (r->multi)
				final_close(r);
			else
				uv_walk(&r->loop, close_one, r);
		}
		uv_run(&r->loop, UV_RUN_DEFAULT);
		uv_loop_close(&r->loop);
	}
	if (r->multi)
		curl_multi_cleanup(r->multi);
	nng_close(r->pull);
	nng_close(r->pub_policy);
	nng_close(r->pub_feed);
	for (size_t i = 0; i < AX_ARRAY_LEN(r->strs); i++)
		free(r->strs[i]);
	pthread_mutex_destroy(&r->cmd_mu);
	pthread_mutex_destroy(&r->ws_mu);
	pthread_mutex_destroy(&r->cap_mu);
	free(r);
}
