/*
 * relay_int.h — the relay's internal pieces, each testable on its own:
 *   reqparse.c  parse an OpenAI request body (jansson), validate the attnx fields, build the capture policy;
 *   sse.c       incremental Server-Sent-Events parser for upstream streams;
 *   merge.c     per-request attention store and the merge of attention entries into chunks / bodies;
 *   subq.c      bounded per-WebSocket-client queue that drops its oldest items and counts them;
 *   filter      (subq.c) the WebSocket subscribe filter.
 * Nothing here is thread-safe unless it says so: merge state lives on the loop thread, a subq is shared between the
 * loop (producer) and one writer thread (consumer) and locks itself.
 */
#ifndef ATTNX_RELAY_INT_H
#define ATTNX_RELAY_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "attnx_proto.h"

/* ---------------------------------------------------------------- request parsing (reqparse.c) */

enum ax_rkind { AX_RK_CHAT = 1, AX_RK_COMPLETION = 2 };

/* What the relay learned from one chat/completions request body. */
typedef struct ax_reqinfo {
	int stream;                /* "stream": true */
	int attention;             /* "return_attention_tokens": true */
	char rid[AX_PROTO_STR];    /* client's "rid" if it gave a usable one, else the generated one */
	ax_rec_policy policy;      /* policy announced to captures (meaningful when attention) */
	int lp_added;              /* the relay asked the upstream for logprobs the client did not ask for (see below) */
} ax_reqinfo;

/*
 * Parse `body` (len bytes, not NUL-terminated) as a request of `kind` (enum ax_rkind). Fills *info, sets "rid" in the
 * object and returns the upstream body (compact JSON, malloc'd, caller frees) in *out / *out_len.
 * A non-streamed request with return_attention_tokens whose client did not ask for logprobs gets them upstream
 * (chat "logprobs": true, completions "logprobs": 0) and info->lp_added = 1: the logprobs give the exact text of
 * each generated token for the entries, and the merge strips them from the response again.
 * `gen_rid` is used unless the body carries a string "rid" of 1..95 printable characters.
 * Returns 0, -EBADMSG (not JSON / not an object; *err gets a message) or -EINVAL (an attnx field of the wrong
 * type or out of range; *err names it), -ENOMEM. `err` is a static or caller buffer of errlen bytes.
 */
int ax__req_parse(int kind, const char *body, size_t len, const char *gen_rid, ax_reqinfo *info, char **out,
		  size_t *out_len, char *err, size_t errlen);
/* A fresh request id "ax-<16 hex>" (thread-safe: reads /dev/urandom once, then a counter). */
void ax__rid_new(char out[AX_PROTO_STR]);

/* ---------------------------------------------------------------- SSE parser (sse.c) */

/* Called with the data of one event (data lines joined with '\n', NUL-terminated). Non-zero stops parsing. */
typedef int (*ax_sse_cb)(const char *data, size_t len, void *arg);
typedef struct ax_sse {
	char *line;     /* partial line carried between feeds */
	size_t llen, lcap;
	char *data;     /* data of the event being built */
	size_t dlen, dcap;
	int has_data;
	int last_cr;    /* the previous feed ended with \r: a leading \n belongs to it */
} ax_sse;
void ax__sse_init(ax_sse *s);
void ax__sse_fini(ax_sse *s);
/* Feed bytes; calls cb for each complete event. Returns 0, the cb's non-zero value, or -ENOMEM / -EMSGSIZE
 * (a line over 16 MiB). */
int ax__sse_feed(ax_sse *s, const char *p, size_t n, ax_sse_cb cb, void *arg);
/* End of input: a pending event without its blank line is delivered. */
int ax__sse_finish(ax_sse *s, ax_sse_cb cb, void *arg);

/* ---------------------------------------------------------------- merge (merge.c) */

/*
 * One request's attention state. Records come in (ax__merge_add), the prompt length P comes from the `req` record
 * or the response's usage, stream chunks come in order (ax__merge_chunk) and go out (ax__merge_poll) when the
 * attention they should carry is complete or their hold time is over. Alignment: the chunk carrying generated
 * token i (i >= 1) carries position P+i-1; the chunk carrying token 0 carries `prompt_attention` (P-1, and
 * 0..P-2 when the prompt was asked for). Records for already-sent positions go out as late entries in an extra
 * chunk. Loop-thread only.
 */
typedef struct ax_merge ax_merge;

typedef struct ax_merge_cfg {
	int kind;                 /* enum ax_rkind */
	int stream;
	int want_prompt;          /* prompt rows 0..P-2 asked for */
	uint32_t expected;        /* records (layer × head) that make a position complete; 0 = 1 */
	uint64_t wait_ns;         /* how long a chunk may wait for its attention */
	uint32_t stride;          /* the policy's stride: generated rows P-1+i with i % stride != 0 never come (0/1 = all) */
	uint32_t max_tokens;      /* the policy's max_tokens: generated rows past that many never come (0 = no limit) */
} ax_merge_cfg;

/* What ax__merge_poll produces, in order. */
enum ax_mout { AX_MOUT_CHUNK = 1, AX_MOUT_DONE = 2, AX_MOUT_RAW = 3 };
/* For CHUNK: `text` is one compact JSON chunk (SSE data without "data: "); RAW: an upstream event's data that was
 * not JSON, passed as is; DONE: the stream's end (the caller writes [DONE] or an error). Non-zero stops. */
typedef int (*ax_merge_emit)(int what, const char *text, size_t len, void *arg);

ax_merge *ax__merge_new(const ax_merge_cfg *cfg);
void ax__merge_free(ax_merge *m);
void ax__merge_set_expected(ax_merge *m, uint32_t expected);
/* Prompt length, once known (first value wins). */
void ax__merge_set_prompt_len(ax_merge *m, int64_t P);
int64_t ax__merge_prompt_len(const ax_merge *m);
/* Store one attn record (copied). Returns 0, -EINVAL (position < 0 or absurd), -ENOMEM. */
int ax__merge_add(ax_merge *m, const ax_rec_attn *a);
/* The captures sent `end` for the request: no more records will come, stop waiting for missing ones. */
void ax__merge_capture_end(ax_merge *m);
/* Capture `slot` (0..63: its index in the relay's capture table) sent `end` for the request; `live` = the slots of
 * the captures that count now (connected, with a hello). Several captures (one per TP rank) each send their own
 * `end`: the captures are done (as ax__merge_capture_end) only once every live one has, so a rank whose records
 * lag behind another's end is still waited for. With no live capture known, any end is the last. */
void ax__merge_source_end(ax_merge *m, int slot, uint64_t live);
/* The captures that count changed (a hello, a closed connection): done when every live one has sent its end. */
void ax__merge_set_sources(ax_merge *m, uint64_t live);
/* A streamed chunk arrived at `now_ns`: `data` is the SSE event's data. Takes nothing; copies what it needs.
 * Returns 0 or -ENOMEM. */
int ax__merge_chunk(ax_merge *m, const char *data, size_t len, uint64_t now_ns);
/* The upstream stream ended (its [DONE] or its end of body) at now_ns. */
void ax__merge_upstream_done(ax_merge *m, uint64_t now_ns);
/* Emit every chunk that is ready at now_ns, then late entries, then DONE once it is due: before DONE, every record
 * of the request not sent yet (rows no chunk carried, e.g. beyond the last counted token) goes out in one extra
 * chunk, so a stream delivers every row the captures produced before its end. Returns the next time
 * (ns) at which polling could release something (0 = nothing is waiting on time), or a negative errno from emit. */
int64_t ax__merge_poll(ax_merge *m, uint64_t now_ns, ax_merge_emit emit, void *arg);
/* Non-streamed: the full upstream body arrived at now_ns. Entry texts come from its choices[0].logprobs (chat
 * `content[i].token`, completions `tokens[i]`). When `strip_logprobs` is set (the relay asked the upstream for
 * logprobs on the client's behalf), the merged body gets `logprobs: null` back. Returns 0, -EBADMSG (not a JSON
 * object: pass it through unchanged). */
int ax__merge_body(ax_merge *m, const char *body, size_t len, uint64_t now_ns, int strip_logprobs);
/* Non-streamed: 1 and the merged body (malloc'd, caller frees) when it is ready at now_ns or its hold is over;
 * 0 and *deadline_ns while waiting. */
int ax__merge_body_take(ax_merge *m, uint64_t now_ns, char **out, size_t *out_len, uint64_t *deadline_ns);
/* Counters for metrics. */
uint64_t ax__merge_late_entries(const ax_merge *m);

/* ---------------------------------------------------------------- subscriber queue (subq.c) */

/* A shared, immutable message for WebSocket clients (refcounted: one render, many clients). */
typedef struct ax_blob {
	atomic_int refs;
	int binary;               /* 1 = msgpack (binary frame), 0 = JSON text */
	uint64_t t_ns;            /* ax_now_ns() when its records arrived (for the latency histogram) */
	size_t len;
	char data[];
} ax_blob;
ax_blob *ax__blob_new(const void *p, size_t len, int binary, uint64_t t_ns); /* refs = 1; NULL on ENOMEM */
void ax__blob_ref(ax_blob *b);
void ax__blob_unref(ax_blob *b); /* accepts NULL */

/* Bounded FIFO of blobs: push never blocks; when full the oldest blob is dropped and counted. Thread-safe. */
typedef struct ax_subq {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	ax_blob **ring;
	uint32_t cap, head, count;
	uint64_t dropped;         /* dropped since the consumer last took the count */
	uint64_t dropped_total;
	int closed;
} ax_subq;
int ax__subq_init(ax_subq *q, uint32_t cap); /* 0 / -EINVAL / -ENOMEM */
void ax__subq_fini(ax_subq *q);              /* drops what is queued */
/* Push one reference (the queue takes a ref of its own). Returns 1 if an old item was dropped, 0 otherwise,
 * -EPIPE when closed. */
int ax__subq_push(ax_subq *q, ax_blob *b);
/* Wait up to timeout_ms (-1 forever) for an item. Returns 1 with *out (caller unrefs) — or with *out NULL and
 * *dropped > 0 when items were lost before the next one (send a gap first) —, 0 on timeout, -EPIPE when closed
 * and empty. */
int ax__subq_pop(ax_subq *q, int timeout_ms, ax_blob **out, uint64_t *dropped);
void ax__subq_close(ax_subq *q);

/* WebSocket subscribe filter: an empty list lets everything through; a list applies only to records that have
 * that field (rid: req/attn/end/policy; layer and mode: attn). */
#define AX_FILTER_MAX 64
typedef struct ax_filter {
	uint32_t n_rids, n_layers, n_modes, n_types;
	char rids[AX_FILTER_MAX][AX_PROTO_STR];
	int32_t layers[AX_FILTER_MAX];
	uint32_t modes[AX_FILTER_MAX];
	uint32_t types[AX_FILTER_MAX];
	int msgpack;              /* "format": "msgpack" */
} ax_filter;
/* Parse a subscribe message ({"type":"subscribe", ...}). Returns 0, -EBADMSG / -EINVAL with a message in err. */
int ax__filter_parse(const char *text, size_t len, ax_filter *f, char *err, size_t errlen);
int ax__filter_empty(const ax_filter *f); /* 1 when it narrows nothing */
int ax__filter_match(const ax_filter *f, const ax_record *r);

#endif
