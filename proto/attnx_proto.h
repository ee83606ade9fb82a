/*
 * attnx_proto.h — msgpack records, schema v1 (DESIGN §3): one struct for every record type, encode / decode /
 * validate, JSON rendering with the same field names, and a batcher that packs records into nng-sized frames.
 *
 * A frame (one nng message) is a msgpack array of records; a record is a msgpack map with string keys. Every
 * record has `t` (type name), `v` (schema version), `src` (source id) and `seq` (per-source sequence number).
 * The decoder accepts maps with unknown keys (forward compatibility) but rejects: frames over the size cap,
 * anything that is not an array of maps, a missing or mistyped required field, an unknown `t`, arrays longer than
 * their caps, and trailing bytes. proto/README.md documents every field with examples.
 *
 * Memory: ax_record is a plain struct with fixed-size arrays except `req.prompt`, which the decoder allocates;
 * ax_record_fini frees it. Encoders write into an ax_buf (growable byte buffer).
 * Thread-safety: everything here is reentrant; one ax_batch / ax_buf per thread.
 */
#ifndef ATTNX_PROTO_H
#define ATTNX_PROTO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AX_PROTO_VERSION 1
#define AX_PROTO_MAX_TOPK 64          /* entries in one attn record */
#define AX_PROTO_MAX_FRAME (8u << 20) /* bytes in one frame (nng message); larger frames are rejected */
#define AX_PROTO_MAX_RECORDS 65536    /* records in one frame */
#define AX_PROTO_MAX_PROMPT (1u << 22)/* prompt tokens in one req record */
#define AX_PROTO_MAX_STATS 64         /* counters in one stats record */
#define AX_PROTO_STR 96               /* fixed string fields (rid, src, reason, ...) including the NUL */
#define AX_PROTO_MAX_LIST 128         /* layer / head lists in hello and policy */

enum ax_rec_type {
	AX_REC_HELLO = 1,  /* a source announces itself */
	AX_REC_REQ = 2,    /* a request began: rid and prompt token ids */
	AX_REC_ATTN = 3,   /* top-k attention of one query position (one layer, one mode, maybe one head) */
	AX_REC_END = 4,    /* a request ended */
	AX_REC_GAP = 5,    /* something was lost: what, how many, why */
	AX_REC_STATS = 6,  /* counters of a source */
	AX_REC_POLICY = 7, /* relay → capture: what to capture for one request */
};

enum ax_mode { AX_MODE_MEAN_LOGIT = 1, AX_MODE_MEAN_PROB = 2, AX_MODE_HEADS = 3 };

/* "hello", "req", ... / NULL for unknown. */
const char *ax_rec_type_name(int type);
int ax_rec_type_parse(const char *name); /* enum value or -EINVAL */
/* "mean_logit", "mean_prob", "heads" / NULL. */
const char *ax_mode_name(int mode);
int ax_mode_parse(const char *name);     /* enum value or -EINVAL */

typedef struct ax_rec_hello {
	char engine[AX_PROTO_STR];  /* engine name from the segment header */
	char model[AX_PROTO_STR];   /* model name */
	char backend[16];           /* "cpu" / "cuda" */
	uint32_t rank, world_size;
	uint32_t n_layers, n_q_heads, n_kv_heads, head_offset, head_dim;
	uint32_t top_k;             /* default top-k of this capture */
	uint32_t mode;              /* default enum ax_mode */
	uint32_t n_layer_ids;       /* default layers captured */
	int32_t layer_ids[AX_PROTO_MAX_LIST];
	uint64_t generation;        /* engine generation the capture is attached to */
} ax_rec_hello;

typedef struct ax_rec_req {
	uint32_t prompt_len;        /* entries in prompt */
	int32_t *prompt;            /* prompt token ids (owned by the record; freed by ax_record_fini) */
} ax_rec_req;

typedef struct ax_rec_attn {
	int64_t position;           /* absolute query position p (prompt + output) */
	int64_t decode_step;        /* generated tokens before this forward (0 for prefill rows) */
	int64_t token_id;           /* token id at position p (the query token) */
	int32_t layer_id;
	uint32_t mode;              /* enum ax_mode */
	int32_t head_id;            /* global head index when mode == heads, -1 otherwise (omitted on the wire) */
	uint32_t k;                 /* entries below */
	int64_t token_positions[AX_PROTO_MAX_TOPK]; /* key positions, best first (ties: lower position first) */
	float topk_logits[AX_PROTO_MAX_TOPK];       /* logit of each (log p_j for mean_prob) */
	float attention_scores[AX_PROTO_MAX_TOPK];  /* softmax over the top-k only */
	double logsumexp_all;       /* logsumexp over all keys 0..p (0 for mean_prob) */
	double topk_mass;           /* Σ exp(topk_logit − logsumexp_all): true mass the top-k covers */
	uint32_t prefill;           /* 1 if this row came from a prefill forward */
} ax_rec_attn;

typedef struct ax_rec_end {
	char reason[AX_PROTO_STR];  /* "stop", "length", "abort", "error" */
	uint64_t tokens;            /* total positions seen for the request */
} ax_rec_end;

typedef struct ax_rec_gap {
	char what[AX_PROTO_STR];    /* "steps", "records", "requests" */
	char reason[AX_PROTO_STR];  /* "ring_full", "send_full", "invalid", "restart", "late", ... */
	uint64_t count;             /* how many were lost */
	uint64_t from_seq, to_seq;  /* lost record seq range [from, to) of this source when known, else 0,0 */
} ax_rec_gap;

typedef struct ax_stat_kv {
	char name[48];
	uint64_t value;
} ax_stat_kv;

typedef struct ax_rec_stats {
	uint32_t n;
	ax_stat_kv kv[AX_PROTO_MAX_STATS];
} ax_rec_stats;

typedef struct ax_rec_policy {
	uint32_t top_k;             /* 0 = capture default */
	uint32_t mode;              /* 0 = default, else enum ax_mode */
	uint32_t stride;            /* record every Nth position (0/1 = all) */
	uint32_t max_tokens;        /* stop after this many positions (0 = unlimited) */
	uint32_t prompt;            /* 1 = also capture prefill rows */
	uint32_t n_layer_ids;       /* 0 = default layers */
	int32_t layer_ids[AX_PROTO_MAX_LIST];
	uint32_t n_head_ids;        /* 0 = all heads (heads mode) */
	int32_t head_ids[AX_PROTO_MAX_LIST];
	uint64_t ttl_ms;            /* how long the policy stays valid without a request (0 = 60 s) */
} ax_rec_policy;

typedef struct ax_record {
	int type;                   /* enum ax_rec_type */
	uint32_t v;                 /* schema version */
	char src[AX_PROTO_STR];     /* source id ("capture:<host>:<pid>:<rank>", "relay") */
	uint64_t seq;               /* per-source sequence number */
	uint64_t ts_ns;             /* wall-clock time at the source (`ts`, optional; 0 = absent) */
	char rid[AX_PROTO_STR];     /* request id (req, attn, end, policy; "" otherwise) */
	union {
		ax_rec_hello hello;
		ax_rec_req req;
		ax_rec_attn attn;
		ax_rec_end end;
		ax_rec_gap gap;
		ax_rec_stats stats;
		ax_rec_policy policy;
	} u;
} ax_record;

/* Zero a record and set its type. */
void ax_record_init(ax_record *r, int type);
/* Free what the decoder allocated (req.prompt). Accepts NULL; leaves the record re-usable. */
void ax_record_fini(ax_record *r);
/* Semantic checks shared by encoder and decoder: type known, k ≤ max, finite numbers, sorted top-k
 * (descending logits, ties by lower position), positions within 0..position, ... Returns 0 or -EINVAL. */
int ax_record_validate(const ax_record *r);

/* A growable byte buffer. */
typedef struct ax_buf {
	uint8_t *data;
	size_t len, cap;
} ax_buf;
void ax_buf_init(ax_buf *b);
void ax_buf_fini(ax_buf *b);
void ax_buf_reset(ax_buf *b);
int ax_buf_append(ax_buf *b, const void *p, size_t n); /* 0 or -ENOMEM */
int ax_buf_reserve(ax_buf *b, size_t n);               /* room for n more bytes: 0 or -ENOMEM */

/* Append one record (a msgpack map) to `out`. Returns 0, -EINVAL (record invalid) or -ENOMEM. */
int ax_record_pack(const ax_record *r, ax_buf *out);

/*
 * Decoding a frame: ax_frame_decode calls `cb` for every record in the frame, in order, with a record valid only
 * during the call (the callback must copy what it keeps; it may take ownership of req.prompt by setting it
 * to NULL). A non-zero return from cb stops decoding and is returned. Returns the number of records decoded,
 * or -EMSGSIZE (frame over the cap), -EBADMSG (not msgpack / truncated / trailing bytes / not an array of maps),
 * -EPROTO (a record with a missing, mistyped or out-of-range field, or an unknown type) — on error no record
 * after the bad one is delivered. `cb` may be NULL (validate and count only). Thread-safe.
 * Allocation: one zone per call (~24 bytes per msgpack object of the frame) and each req's prompt.
 */
typedef int (*ax_record_cb)(const ax_record *r, void *arg);
int ax_frame_decode(const void *data, size_t len, ax_record_cb cb, void *arg);
/* Decode exactly one msgpack map (not a frame) into *r (ax_record_fini it afterwards). Same errors. */
int ax_record_unpack(const void *data, size_t len, ax_record *r);
/* Where the first msgpack value at data ends (frames laid end to end, as in a recording): 1 and *frame_len set, 0
 * if the bytes end before the value does (or a container claims more entries than bytes follow: need more), or
 * -EBADMSG (a never-used head byte, nesting deeper than the decoder accepts). Does not check that the value is
 * an array of records (ax_frame_decode does). No allocation; thread-safe. */
int ax_frame_span(const void *data, size_t len, size_t *frame_len);

/* Render one record as a JSON object text (same field names as msgpack), appended to `out` without a NUL.
 * Returns 0, -EINVAL or -ENOMEM (out is left as it was on error). Thread-safe. */
int ax_record_json(const ax_record *r, ax_buf *out);

/* The same JSON as a jansson object (for embedding into larger documents). On success *out is a new reference
 * the caller json_decref()s; on error *out is NULL. Returns 0, -EINVAL (record invalid) or -ENOMEM.
 * Note: jansson prints reals with 17 significant digits unless told otherwise (JSON_REAL_PRECISION). */
struct json_t;
int ax_record_to_json_t(const ax_record *r, struct json_t **out);
/* The reverse: a JSON object (as ax_record_json writes it) into *r, with the decoder's rules: unknown keys
 * ignored, missing / mistyped / out-of-range fields -EPROTO, not an object -EBADMSG, -ENOMEM. Integers must be
 * JSON integers; float fields take integers too. *r may own a prompt either way: ax_record_fini it afterwards. */
int ax_record_from_json(const struct json_t *obj, ax_record *r);

/*
 * Batcher: packs records into a frame (msgpack array) until it holds `max_records` or `max_bytes`, or until
 * `max_delay_ns` passed since its first record; the owner polls ax_batch_due and sends ax_batch_frame.
 * The array header is written at finish time, so records are packed once.
 */
typedef struct ax_batch {
	ax_buf body;              /* packed records */
	ax_buf frame;             /* finished frame (array header + body) */
	uint32_t count;           /* records in body */
	uint32_t max_records;     /* flush threshold (default 512) */
	size_t max_bytes;         /* flush threshold (default 256 KiB; ≤ AX_PROTO_MAX_FRAME) */
	uint64_t max_delay_ns;    /* flush deadline after the first record (default 1 ms) */
	uint64_t first_ns;        /* ax_now_ns() of the first record in body */
} ax_batch;
void ax_batch_init(ax_batch *b);
void ax_batch_fini(ax_batch *b);
/* Pack a record into the batch. Returns 1 if the batch is now full (finish and send it), 0 otherwise, or a
 * negative errno, nothing added: -EINVAL (record invalid), -ENOMEM, -EMSGSIZE (the frame would exceed
 * AX_PROTO_MAX_FRAME: finish the batch and add the record again; a record that alone exceeds it can never be
 * sent), -ENOBUFS (the batch already holds AX_PROTO_MAX_RECORDS: finish it). */
int ax_batch_add(ax_batch *b, const ax_record *r);
/* 1 if the batch holds records and is full or past its deadline at time `now_ns`. */
int ax_batch_due(const ax_batch *b, uint64_t now_ns);
/* Build the frame for the records packed so far and empty the batch; *data and *len point into b->frame, valid until
 * the next call on b. Returns the record count (0 = nothing to send). */
int ax_batch_finish(ax_batch *b, const uint8_t **data, size_t *len);

#ifdef __cplusplus
}
#endif
#endif
