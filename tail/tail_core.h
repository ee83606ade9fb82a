/*
 * tail_core.h — the logic of attnx-tail that does not touch a socket: record filters, per-source `seq` hole
 * tracking (with `gap` records covering holes), and splitting a recording (a msgpack stream of frames) back into
 * frames. Internal to tail/ (tail.c and tail_test.c).
 *
 * Filters (the relay's WebSocket subscribe filter works the same way): a record is shown iff it matches every
 * filter kind that is set; within one kind the values are ORed. A rid or layer filter applies only to records that
 * have that field (rid: req, attn, end, policy; layer: attn), so `--rid R` still shows hello, gap and stats records
 * (losses stay visible); add `--type` to narrow further.
 *
 * Holes: every source numbers its records 0, 1, 2, ... (`seq`). The tracker keeps, per `src`, the next expected
 * seq; a jump forward opens a pending hole [expected, seq). A `gap` record of the same source with a seq range
 * covers the part of a pending hole inside [from_seq, to_seq); a `gap` about "records" without a range covers up
 * to `count` pending seqs, oldest first. A hole still (partly) uncovered `grace_ns` after it was seen, or when the
 * tracker is flushed at exit, is reported through the callback and counted. The first record of a source sets the
 * origin (joining mid-stream is not a loss); a seq far behind the expected one (source restart) re-bases it.
 *
 * Memory: the tracker owns its source table (ax_tail_seq_fini frees it). Not thread-safe: one tracker per thread.
 */
#ifndef ATTNX_TAIL_CORE_H
#define ATTNX_TAIL_CORE_H

#include <stddef.h>
#include <stdint.h>

#include "attnx_proto.h"

#define AX_TAIL_MAX_FILTER 64 /* values per filter kind */
#define AX_TAIL_MAX_PENDING 64 /* pending holes per source; older ones are reported early when full */

typedef struct ax_tail_filter {
	uint32_t n_rids, n_layers, n_types;
	char rids[AX_TAIL_MAX_FILTER][AX_PROTO_STR]; /* --rid values */
	int32_t layers[AX_TAIL_MAX_FILTER];          /* --layer values */
	int types[AX_TAIL_MAX_FILTER];               /* --type values (enum ax_rec_type) */
} ax_tail_filter;

/* Add a filter value. Return 0, -EINVAL (bad layer number or type name, rid too long) or -ENOSPC (too many). */
int ax_tail_filter_add_rid(ax_tail_filter *f, const char *rid);
int ax_tail_filter_add_layer(ax_tail_filter *f, const char *layer);
int ax_tail_filter_add_type(ax_tail_filter *f, const char *type);
/* 1 if any filter is set. */
int ax_tail_filter_active(const ax_tail_filter *f);
/* 1 if `r` passes every filter kind that is set, 0 otherwise. Pure. */
int ax_tail_filter_match(const ax_tail_filter *f, const ax_record *r);

typedef struct ax_tail_hole {
	uint64_t from, to;  /* missing seqs [from, to) still uncovered */
	uint64_t seen_ns;   /* when the hole was opened */
} ax_tail_hole;

typedef struct ax_tail_src {
	char src[AX_PROTO_STR];
	uint64_t first_seq;     /* seq of the first record seen */
	uint64_t next;          /* next expected seq */
	uint64_t records;       /* records seen */
	uint64_t holes;         /* holes reported (uncovered) */
	uint64_t lost;          /* seqs in reported holes */
	uint64_t covered;       /* missing seqs that a gap record accounted for */
	uint64_t late;          /* records that arrived after their hole was opened (reordered) */
	uint64_t dups;          /* seqs seen twice */
	uint64_t restarts;      /* re-based origins (seq went far backwards) */
	uint64_t gaps;          /* gap records from this source */
	uint32_t n_pending;
	ax_tail_hole pending[AX_TAIL_MAX_PENDING];
} ax_tail_src;

/* Called once for every uncovered hole: source, missing seqs [from, to). */
typedef void (*ax_tail_hole_cb)(const char *src, uint64_t from, uint64_t to, void *arg);

typedef struct ax_tail_seq {
	ax_tail_src *srcs;      /* owned */
	uint32_t n, cap;
	uint64_t grace_ns;      /* how long a hole waits for a covering gap (default 1 s) */
	uint64_t restart_window;/* a seq more than this far behind `next` re-bases the source (default 65536) */
	ax_tail_hole_cb cb;     /* may be NULL */
	void *cb_arg;
} ax_tail_seq;

void ax_tail_seq_init(ax_tail_seq *t, ax_tail_hole_cb cb, void *arg);
void ax_tail_seq_fini(ax_tail_seq *t);
/* Account one record seen at `now_ns`. Returns 0 or -ENOMEM (source table could not grow). */
int ax_tail_seq_observe(ax_tail_seq *t, const ax_record *r, uint64_t now_ns);
/* Report pending holes older than grace_ns at `now_ns` (all of them if `all`). Returns the number reported. */
int ax_tail_seq_expire(ax_tail_seq *t, uint64_t now_ns, int all);
/* The source entry for `src`, or NULL. */
const ax_tail_src *ax_tail_seq_find(const ax_tail_seq *t, const char *src);

/*
 * Split a msgpack stream (concatenated msgpack values, as --record writes) into frames: sets *frame_len to the byte
 * length of the first complete value at `data`. Returns 1 (a frame), 0 (no complete value yet: need more bytes), or
 * -EBADMSG (not msgpack). Pure; does not check that the value is an array (ax_frame_decode does).
 */
int ax_tail_next_frame(const void *data, size_t len, size_t *frame_len);

/* Wrap already packed records into a frame: msgpack array header for `count` records, then `body`. Appended to
 * `out`. Returns 0 or -ENOMEM. */
int ax_tail_frame_wrap(const ax_buf *body, uint32_t count, ax_buf *out);

#endif
