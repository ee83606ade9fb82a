/*
 * sender.h — the capture's record sender: numbering, batching into frames, non-blocking nng PUSH, and loss
 * accounting that never stalls the caller.
 *
 * Every record added gets the source id, the next `seq` (consecutive per source) and a wall-clock `ts`, and is
 * packed into an ax_batch. A batch becomes a frame when full or 1 ms after its first record (ax__sender_poll).
 * Frames go out with NNG_FLAG_NONBLOCK; those nng cannot take now (no relay, or its queue full) wait in a bounded
 * queue of pending frames. When that queue is full, or its oldest frame is older than the age limit, the oldest
 * frame is dropped and replaced by a one-record frame holding a `gap` record (what "records", reason
 * "send_full", count, [from_seq, to_seq)); the gap record takes the seq of the last dropped record, so the
 * stream's seq stays consecutive and every missing seq is named by a gap that arrives before the frames after
 * the hole. Consecutive drops merge into one gap. Internal to capture/; one thread uses a sender.
 */
#ifndef ATTNX_CAPTURE_SENDER_H
#define ATTNX_CAPTURE_SENDER_H

#include <stddef.h>
#include <stdint.h>

#include "attnx_proto.h"

typedef struct ax__sender ax__sender;

typedef struct ax__sender_cfg {
	const char *addr;        /* nng address to dial (PUSH) */
	const char *src;         /* source id stamped on every record */
	uint32_t max_pending;    /* frames kept while nng refuses them (≥ 2) */
	uint64_t pending_max_ns; /* a pending frame older than this is dropped (0 = only when the queue is full) */
	uint32_t batch_records;  /* flush thresholds (0 = proto defaults: 512 records, 256 KiB, 1 ms) */
	size_t batch_bytes;
	uint64_t batch_delay_ns;
} ax__sender_cfg;

typedef struct ax__sender_stats {
	uint64_t records;        /* records accepted (numbered) */
	uint64_t rejected;       /* records refused by the encoder (invalid): not numbered, not sent */
	uint64_t frames;         /* frames nng accepted */
	uint64_t sent_records;   /* records in those frames */
	uint64_t dropped;        /* records dropped (send_full) */
	uint64_t dropped_frames;
	uint64_t gaps;           /* send_full gap records created */
} ax__sender_stats;

/* Open the PUSH socket and start dialing in the background (a missing relay is not an error).
 * Returns 0, -EINVAL (bad address or config), -ENOMEM or -EIO (nng failure). */
int ax__sender_open(ax__sender **out, const ax__sender_cfg *cfg);

/* Number, stamp and pack one record (r->src, r->seq, r->v, r->ts_ns are overwritten). Seals the batch into a
 * frame when full and tries to send. Returns 0, or -EINVAL (record invalid: counted, no seq consumed) / -ENOMEM. */
int ax__sender_add(ax__sender *s, ax_record *r);

/* Seal a batch past its deadline, send pending frames while nng takes them, drop frames past the age limit.
 * Call often (every loop iteration). */
void ax__sender_poll(ax__sender *s, uint64_t now_ns);

/* Seal the current batch and try to send everything for up to `timeout_ns`. Returns the frames still pending. */
uint32_t ax__sender_flush(ax__sender *s, uint64_t timeout_ns);

/* Nanoseconds until ax__sender_poll has work: the open batch's deadline (0 if past), a retry period while frames
 * wait for nng, UINT64_MAX when there is nothing to send. The capture loop sleeps no longer than this. */
uint64_t ax__sender_due_in(const ax__sender *s, uint64_t now_ns);

/* Frames waiting (sealed, not yet accepted by nng). */
uint32_t ax__sender_pending(const ax__sender *s);

/* The seq the next record will get. */
uint64_t ax__sender_next_seq(const ax__sender *s);

void ax__sender_get_stats(const ax__sender *s, ax__sender_stats *out);

/* Close the socket (records still pending are dropped and logged) and free. Accepts NULL. */
void ax__sender_close(ax__sender *s);

#endif
