/*
 * attnx_relay.h — attnx-relay as a library: open a relay with options, run its loop, stop it from any thread.
 *
 * The relay proxies OpenAI requests to the upstream engine and merges attention records (from captures, over nng
 * PULL) into the responses; it re-publishes records on an nng PUB feed and a WebSocket feed (/ws), announces
 * per-request capture policies on an nng PUB (and holds an attention request until every live capture has
 * acknowledged its policy, or a bound passes), and serves health, metrics, capabilities and static files.
 * relay/README.md documents the HTTP API. The `attnx-relay` program is main.c over this header; tests run a relay
 * in a thread through it.
 *
 * Threads: ax_relay_run runs the libuv loop (upstream libcurl multi, nng sockets, attention store) in the calling
 * thread; civetweb serves HTTP/WebSocket on its own `max_connections` worker threads; each WebSocket client has a
 * writer thread. ax_relay_stop is thread-safe and async-signal-safe.
 */
#ifndef ATTNX_RELAY_H
#define ATTNX_RELAY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AX_RELAY_MAX_CORS 16

typedef struct ax_relay_opts {
	const char *listen;          /* "ADDR:PORT" for HTTP; port 0 picks a free one (see ax_relay_port) */
	const char *upstream;        /* base URL of the OpenAI-compatible engine */
	const char *records;         /* nng address the records PULL listens on */
	const char *policy;          /* nng address the policy PUB listens on */
	const char *feed;            /* nng address the feed PUB listens on */
	const char *web;             /* static files directory ("" or missing: none) */
	const char *token;           /* bearer token required on every route but /healthz (NULL: none) */
	const char *cors[AX_RELAY_MAX_CORS]; /* allowed Origins ("*" = any) */
	int n_cors;
	size_t max_body;             /* request body cap in bytes (413 above) */
	int max_connections;         /* civetweb worker threads = concurrent HTTP requests + WebSocket clients */
	int attention_wait_ms;       /* how long a chunk may wait for its attention */
	int upstream_timeout_ms;     /* connect timeout and longest silence of the upstream */
	int ws_queue;                /* records queued per WebSocket client before the oldest are dropped */
	int handle_signals;          /* 1: SIGINT/SIGTERM stop the loop (the program); 0: the embedder stops it */
	int policy_wait_ms;          /* how long an attention request waits for the captures to acknowledge its
	                              * policy before it goes upstream anyway (0 = no wait) */
} ax_relay_opts;

typedef struct ax_relay ax_relay;

/* Defaults: 127.0.0.1:8081, http://127.0.0.1:8000, the ipc:///tmp/attnx-*.sock addresses of wiring, the web/
 * folder of the source tree, 1 MiB, 64 connections, 50 ms, 30000 ms, 4096 queued records, 200 ms policy wait. */
void ax_relay_opts_default(ax_relay_opts *o);

/* Bind every socket and start the HTTP server. The strings in *o are copied. Returns 0, -EADDRINUSE, -EINVAL
 * (bad option), -ENOMEM or another negative errno; logs why. Not thread-safe with itself. */
int ax_relay_open(ax_relay **out, const ax_relay_opts *o);
/* The bound HTTP port. */
int ax_relay_port(const ax_relay *r);
/* Run the loop until ax_relay_stop (or a signal when handle_signals). Returns 0 or a negative errno. Call once. */
int ax_relay_run(ax_relay *r);
/* Ask the loop to finish: in-flight streams end with an error event, the HTTP server stops, run returns.
 * Thread-safe and async-signal-safe; may be called before run. */
void ax_relay_stop(ax_relay *r);
/* Free everything. After run returned (or instead of run). Accepts NULL. */
void ax_relay_close(ax_relay *r);

#ifdef __cplusplus
}
#endif
#endif
