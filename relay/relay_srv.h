/*
 * relay_srv.h — the relay's shared state, split between relay.c (the libuv loop: nng, libcurl multi, attention
 * store, policies) and http.c (civetweb handlers on worker threads, WebSocket clients).
 *
 * The two sides meet in three places, each with its own lock:
 *   - the command queue (cmd_mu + uv_async `wake`): handlers enqueue START / CANCEL of a proxied request;
 *   - a proxied request's output (ax_pconn.mu + cv): the loop appends the response head and byte pieces, the
 *     handler thread waits on the condition variable and writes them to the client;
 *   - the WebSocket client list (ws_mu): the loop fans records out into each client's bounded queue; the filter
 *     a client subscribes with is changed under the same lock.
 * Capture descriptions (from hello records) and their policy-ack state live under cap_mu; metrics are atomics.
 */
#ifndef ATTNX_RELAY_SRV_H
#define ATTNX_RELAY_SRV_H

#include <pthread.h>
#include <stdatomic.h>

#include <civetweb.h>
#include <curl/curl.h>
#include <nng/nng.h>
#include <uv.h>

#include "attnx_relay.h"
#include "relay_int.h"

/* One piece of response body. */
typedef struct ax_out {
	struct ax_out *next;
	size_t len;
	char data[];
} ax_out;

enum ax_pkind { AX_PK_PASS = 0, AX_PK_CHAT = AX_RK_CHAT, AX_PK_COMPLETION = AX_RK_COMPLETION };

/* A proxied request, shared by its handler thread and the loop (refcounted: each side holds one reference). */
typedef struct ax_pconn {
	atomic_int refs;
	/* request: written by the handler before START, read-only afterwards */
	int kind;                   /* enum ax_pkind */
	char method[8];
	char *url;                  /* full upstream URL */
	char *body;                 /* upstream body (NULL for GET) */
	size_t body_len;
	char *auth;                 /* Authorization header to forward, or NULL */
	ax_reqinfo info;            /* for chat/completions */
	/* response, under mu */
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int head;                   /* status and content type are set */
	int status;
	char ctype[128];
	long long clen;             /* Content-Length, -1 = close-delimited */
	ax_out *oh, *ot;
	int ended;                  /* the loop finished this response */
	int gone;                   /* the client went away (set by the handler) */
} ax_pconn;

enum ax_cmd_type { AX_CMD_START = 1, AX_CMD_CANCEL = 2 };
typedef struct ax_cmd {
	struct ax_cmd *next;
	int type;
	ax_pconn *pc;               /* the command holds a reference */
} ax_cmd;

/* A capture seen on the records socket. */
typedef struct ax_capture {
	char src[AX_PROTO_STR];
	int has_hello;
	ax_rec_hello hello;
	uint64_t last_ns;
	nng_pipe pipe;              /* records connection its last frame came on (connected = still alive) */
	uint32_t ack_misses;        /* policy acks owed and never sent, in a row (reset by any ack) */
} ax_capture;
#define AX_MAX_CAPTURES 64

#define AX_LAT_BUCKETS 11
typedef struct ax_metrics {
	atomic_uint_fast64_t records_in, frames_in, decode_errors, feed_frames, policy_frames;
	atomic_uint_fast64_t ws_gaps, ws_dropped, ws_sent, requests, attention_requests, upstream_errors;
	atomic_uint_fast64_t late_entries, client_cancels;
	atomic_uint_fast64_t policy_acks, policy_waits, policy_ack_timeouts;
	atomic_int ws_clients, active_requests;
	atomic_uint_fast64_t lat_bucket[AX_LAT_BUCKETS + 1]; /* record arrival → WebSocket write, µs; last = +Inf */
	atomic_uint_fast64_t lat_count, lat_sum_us;
	atomic_uint_fast64_t last_record_ns;
} ax_metrics;
extern const double ax_lat_bounds_us[AX_LAT_BUCKETS];

typedef struct ax_wscli ax_wscli;
typedef struct ax_up ax_up;

struct ax_relay {
	ax_relay_opts o;
	char *strs[8 + AX_RELAY_MAX_CORS]; /* owned copies of the option strings */
	/* loop side */
	uv_loop_t loop;
	uv_async_t wake;
	uv_timer_t curl_timer, policy_timer;
	uv_poll_t pull_poll;
	uv_signal_t sig_int, sig_term;
	int loop_ok, handles_ok, signals_ok;
	CURLM *multi;
	nng_socket pull, pub_policy, pub_feed;
	ax_up *ups;                 /* active upstream transfers */
	atomic_int stop_requested;
	int stopping;
	/* commands */
	pthread_mutex_t cmd_mu;
	ax_cmd *cmd_head, *cmd_tail;
	int cmd_closed;
	/* HTTP */
	struct mg_context *mg;
	int port;
	/* WebSocket clients */
	pthread_mutex_t ws_mu;
	ax_wscli *ws;
	/* captures */
	pthread_mutex_t cap_mu;
	ax_capture caps[AX_MAX_CAPTURES];
	int n_caps;
	atomic_uint_fast64_t seq;   /* the relay's own record sequence */
	ax_metrics m;
};

/* relay.c, any thread */
int ax__relay_submit(ax_relay *r, int type, ax_pconn *pc); /* 0, or -ESHUTDOWN when stopping (no ref taken) */
ax_pconn *ax__pconn_new(void);
void ax__pconn_unref(ax_pconn *pc);
/* Fill a relay-sourced record header (src "relay", next seq, now). */
void ax__relay_rec_init(ax_relay *r, ax_record *rec, int type);

/* http.c */
int ax__http_start(ax_relay *r);            /* civetweb up, handlers registered */
void ax__http_stop(ax_relay *r);            /* mg_stop: waits for every handler */
/* Fan one record out to the WebSocket clients whose filter matches (loop thread). `in_frame`: the record came in a
 * capture frame that ax__ws_frame will pass verbatim to msgpack clients without a filter; 0 for the relay's own. */
void ax__ws_record(ax_relay *r, const ax_record *rec, uint64_t t_ns, int in_frame);
void ax__ws_frame(ax_relay *r, const void *frame, size_t len, uint64_t t_ns);
int ax__ws_count(ax_relay *r);

#endif
