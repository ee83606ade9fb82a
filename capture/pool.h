/*
 * pool.h — worker threads plus the ordered output queue of the capture.
 *
 * The capture loop appends items in the order their records must leave: finished records (`req`, `end`, `gap`)
 * and attention jobs. Workers take jobs in queue order and run them (ax_attn_cpu) concurrently; the loop pops
 * items from the head only once they are done, so records of a request come out in position order and a
 * request's `end` after its last `attn`, however the workers interleave. The queue is a fixed ring, so memory is
 * bounded; when it is full the loop waits for the head (and the engine's step ring absorbs the delay, dropping
 * and counting if it must).
 *
 * Small jobs (ax__pool_set_inline) run on the loop thread at commit and are done before they are queued.
 *
 * Threads: one producer/consumer (the capture loop: reserve, commit, head, pop, wait) and n worker threads.
 * An item's fields belong to the loop before commit and after it is done, to one worker in between.
 */
#ifndef ATTNX_CAPTURE_POOL_H
#define ATTNX_CAPTURE_POOL_H

#include <stdint.h>

#include "attn.h"
#include "attnx_proto.h"

enum ax__item_kind {
	AX_ITEM_RECORD = 1, /* `rec` is a finished record (owned by the item until popped) */
	AX_ITEM_ATTN = 2,   /* `job` runs on a worker; results land in `res` */
};

typedef struct ax__item {
	int kind;                 /* enum ax__item_kind */
	int done;                 /* set under the pool lock by the worker (or at commit for records) */
	int err;                  /* ATTN: ax_attn_cpu's return */
	ax_record *rec;           /* RECORD: heap record, freed by ax__pool_pop */
	/* ATTN */
	ax_attn_job job;
	int32_t heads[AX_PROTO_MAX_LIST]; /* job.heads points here when a head subset is selected */
	ax_attn_result *res;      /* room for res_cap rows, reused across uses of the slot */
	uint32_t res_cap;
	uint32_t n_res;           /* rows produced (ax_attn_rows) */
	char rid[AX_PROTO_STR];
	int64_t position, decode_step, token_id;
	int32_t layer;
	uint32_t prefill;
	uint64_t q_row;           /* absolute Q-ring row read by the job (checked for lapping after the run) */
	uint64_t req_id;          /* the request's shm id (keys re-checked against recycling after the run) */
	uint64_t generation;      /* attachment the job belongs to */
} ax__item;

typedef struct ax__pool ax__pool;

/* Start n_threads workers over a queue of `cap` items. Returns 0, -EINVAL, -ENOMEM or -EAGAIN (threads). */
int ax__pool_open(ax__pool **out, uint32_t n_threads, uint32_t cap);
/* Stop and join the workers (after finishing the job each one holds), free every item. Accepts NULL. */
void ax__pool_close(ax__pool *p);

/* The next free slot to fill, or NULL if the queue is full. ATTN items must get room for `rows` results via
 * ax__pool_item_results. Loop thread only. */
ax__item *ax__pool_reserve(ax__pool *p);
/* Make sure item->res holds `rows` results. Returns 0 or -ENOMEM. */
int ax__pool_item_results(ax__item *it, uint32_t rows);
/* Publish the slot returned by ax__pool_reserve (RECORD items are done at once; ATTN items wake a worker). */
void ax__pool_commit(ax__pool *p);

/* The head item if it is done, else NULL. Loop thread only. */
ax__item *ax__pool_head(ax__pool *p);
/* Release the head item (frees a RECORD item's record). */
void ax__pool_pop(ax__pool *p);
/* Items queued and not yet popped. */
uint32_t ax__pool_count(ax__pool *p);
/* Jobs the workers have started so far (each queued ATTN item once; inline ones are not counted). */
uint64_t ax__pool_claims(ax__pool *p);
/* Wait up to timeout_ns for the head item to be done. Returns 1 if it is, 0 otherwise. */
int ax__pool_wait_head(ax__pool *p, uint64_t timeout_ns);

/* Jobs of at most `max_macs` multiply-adds (visible keys × H_q × D) run on the calling thread inside
 * ax__pool_commit instead of on a worker: for a small job the hand-off (a worker wake-up, then the loop's) costs more
 * CPU than the job, and on a machine without a spare core it takes that CPU from the engine. 0 = every job goes to a
 * worker (the default). Loop thread only. */
void ax__pool_set_inline(ax__pool *p, uint64_t max_macs);
/* fn(arg) is called by a worker, under the pool lock, each time a job becomes done, so a loop that sleeps somewhere
 * other than ax__pool_wait_head learns of it. fn must be quick and must not call into the pool. NULL = none. Call
 * before any job is committed. */
void ax__pool_set_notify(ax__pool *p, void (*fn)(void *arg), void *arg);

/* Nanoseconds workers spent running jobs, and jobs run. Thread-safe. */
uint64_t ax__pool_busy_ns(ax__pool *p);

#endif
