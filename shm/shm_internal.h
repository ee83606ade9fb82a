/*
 * shm_internal.h — what shm.c, export.c and attach.c share but the public header does not promise: the segment
 * layout computation, the atomic accessors for shared words, and the validator core that takes its counters and
 * buffer count as arguments (the consumer validates against its own snapshot of the header and buffer table, never
 * against fields the producer could rewrite underneath it).
 */
#ifndef ATTNX_SHM_INTERNAL_H
#define ATTNX_SHM_INTERNAL_H

#include "attnx_shm.h"

#include <stdbool.h>

/* Shared words are plain fields in the wire structs; all concurrent access goes through these builtins. */
#define AX_LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define AX_LOAD_RLX(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define AX_STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define AX_STORE_RLX(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

#define AX_SHM_ALIGN 64u
#define AX_SHM_STATE_READY 1u
#define AX_SHM_STATE_CLOSED 2u
#define AX_SHM_REQ_CAP_MAX 65536u /* req_id = (counter << 16) | slot */
#define AX_SHM_CONSUMER_TIMEOUT_NS (5ull * 1000000000ull)

/* Region sizes of a segment; filled by ax__shm_layout. */
typedef struct ax_shm_layout {
	uint64_t buf_off, req_off, ring_off, arena_off, data_off, segment_size;
} ax_shm_layout;

/* Compute region offsets for the given capacities; -ERANGE on overflow. */
int ax__shm_layout(uint32_t buf_cap, uint32_t req_cap, uint32_t ring_cap, uint64_t arena_cap, uint64_t data_size,
		   ax_shm_layout *out);

/* The counters validate_step compares a descriptor against. */
typedef struct ax_shm_heads {
	uint64_t arena_head, q_head;
} ax_shm_heads;

/* ax_shm_validate_step with an explicit buffer count and counters (see the public comment). */
int ax__shm_validate_step(const ax_shm_header *h, const ax_shm_buffer *bufs, uint32_t nbufs,
			  const ax_shm_heads *heads, const ax_shm_step *s);

/* First valid Q-ring entry among bufs[0..nbufs), or -1. */
int ax__shm_find_q_ring(const ax_shm_header *h, const ax_shm_buffer *bufs, uint32_t nbufs);

/* A valid segment name: "/name" with no other '/', shorter than AX_SHM_NAME_MAX; 0, -EINVAL or -ENAMETOOLONG. */
int ax__shm_check_name(const char *name);

/* Is `pid` a live process (kill(pid, 0) succeeds or fails with EPERM)? pid 0 is never alive. */
bool ax__shm_pid_alive(uint64_t pid);

/* Futex on a 32-bit word of the shared mapping (not FUTEX_PRIVATE: producer and consumer are two processes).
 * wait: sleep while *w == val, at most timeout_ns; returns 0 when woken, -ETIMEDOUT, -EAGAIN (*w != val), -EINTR.
 * wake: wake one sleeper; never blocks. */
int ax__shm_futex_wait(uint32_t *w, uint32_t val, uint64_t timeout_ns);
void ax__shm_futex_wake(uint32_t *w);

/* Seqlock copy of ring slot `slot` expecting descriptor sequence number `seq`: 0 on a clean copy, -EAGAIN if the
 * slot does not (or no longer) hold `seq` or changed during the copy. */
int ax__shm_slot_read(const ax_shm_step *slot, uint64_t seq, ax_shm_step *out);
/* Seqlock write of descriptor `seq` (body from `s`) into `slot`. */
void ax__shm_slot_write(ax_shm_step *slot, uint64_t seq, const ax_shm_step *s);

#endif
