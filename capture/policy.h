/*
 * policy.h — per-request capture policies received from the relay, keyed by rid, with a time to live.
 *
 * The relay publishes a request's policy before the request reaches the engine and re-publishes live policies
 * every 500 ms, so the table only has to remember what it heard recently: an entry expires `ttl_ms` (0 = 60 s)
 * after it was last published or last used by a request step. Every put bumps the entry's version so users can
 * cache what they derived from it. When its request ends the entry becomes a tombstone for AX_POLICY_ENDED_MS: the
 * relay keeps re-publishing a policy until its response is done, and those late copies must neither bring the
 * policy back (its layers would stay wanted for a whole TTL) nor be acknowledged again. Internal to capture/; one
 * thread (the capture loop) uses a table.
 */
#ifndef ATTNX_CAPTURE_POLICY_H
#define ATTNX_CAPTURE_POLICY_H

#include <stdint.h>

#include "attnx_proto.h"

#define AX_POLICY_MAX_ENTRIES 65536 /* bound on memory: later policies are refused while the table is full */
#define AX_POLICY_ENDED_MS 5000     /* how long an ended request's policy is remembered as ended */

typedef struct ax__policy_entry {
	struct ax__policy_entry *next; /* bucket chain */
	char rid[AX_PROTO_STR];
	ax_rec_policy p;
	uint64_t version;              /* table-wide counter at the last put */
	uint64_t expires_ns;           /* CLOCK_MONOTONIC */
	int ended;                     /* tombstone: the request ended; puts are ignored, get finds nothing */
} ax__policy_entry;

typedef struct ax__policy_table {
	ax__policy_entry **buckets;    /* nbuckets chains */
	uint32_t nbuckets;             /* power of two */
	uint32_t count;
	uint64_t version;              /* bumped on every put / remove */
} ax__policy_table;

/* Returns 0 or -ENOMEM. */
int ax__policy_init(ax__policy_table *t);
/* Free every entry. Accepts a zeroed table. */
void ax__policy_fini(ax__policy_table *t);

/* Insert or replace the policy of `rid` (non-empty). Returns 1 (new), 0 (replaced), -EALREADY (its request ended:
 * ignored), -EINVAL (empty rid), -ENOSPC (table full) or -ENOMEM. */
int ax__policy_put(ax__policy_table *t, const char *rid, const ax_rec_policy *p, uint64_t now_ns);

/* The live entry for `rid`, or NULL (also for a tombstone). A hit extends its life by its TTL (a request in flight
 * keeps it). The pointer stays valid until the next put / remove / end / expire on the table. */
const ax__policy_entry *ax__policy_get(ax__policy_table *t, const char *rid, uint64_t now_ns);

/* Drop the entry of `rid` if any. */
void ax__policy_remove(ax__policy_table *t, const char *rid);

/* The request of `rid` ended: its entry (created if absent) becomes a tombstone that expires AX_POLICY_ENDED_MS
 * after now_ns. Returns 0, -EINVAL, -ENOSPC or -ENOMEM (then nothing is remembered). */
int ax__policy_end(ax__policy_table *t, const char *rid, uint64_t now_ns);

/* Drop entries past their expiry; returns how many were dropped. */
uint32_t ax__policy_expire(ax__policy_table *t, uint64_t now_ns);

/* Call fn for every entry, tombstones included (no modification of the table from fn). */
void ax__policy_foreach(const ax__policy_table *t, void (*fn)(const ax__policy_entry *e, void *arg), void *arg);

#endif
