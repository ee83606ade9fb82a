/*
 * attach.c — the capture side of the segment: map it, snapshot and validate the header and buffer table, take
 * descriptors from the step ring, read token ids, request entries and check Q-ring rows for laps.
 *
 * The consumer trusts nothing it reads from the segment twice: the header's layout is validated once and kept as
 * a private snapshot; buffer-table entries are copied and validated as buf_count grows; every descriptor is copied
 * out of its slot under the seqlock and validated against the snapshot before it is returned. Only the producer's
 * counters (ring_head, arena_head, q_head, ring_dropped, generation, state) are read live, and each is only ever
 * compared, never used as an address. The consumer writes only the consumer area of the header. ax_shm_wait
 * sleeps on the consumer_wait futex word, which a producer with AX_SHM_FEAT_WAKE clears and wakes after publishing.
 */
#include "attnx_common.h"
#include "shm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define HEARTBEAT_EVERY_NS 50000000ull /* ax_shm_next refreshes the consumer heartbeat this often */
#define MISSED_WAKE_GRACE_NS 10000000ull /* see ax_shm_wait: how long a held wake-up may take to come */

struct ax_shm {
	int fd;
	uint8_t *base;
	uint64_t size;
	ax_shm_header *h;    /* live header (consumer area written, producer words compared) */
	ax_shm_header snap;  /* validated copy taken at attach: the layout every bound check uses */
	ax_shm_buffer *bufs; /* validated copies [buf_cap]; a rejected entry has kind 0 */
	uint32_t nbufs;
	uint64_t tail;         /* next descriptor sequence number to take */
	uint64_t dropped_seen; /* ring_dropped already reported through *lost */
	uint64_t hb_ns;        /* last consumer heartbeat stored */
	uint32_t poked;        /* atomic: ax_shm_wake was called since the last ax_shm_wait returned */
	int missed_wakes;      /* sleeps that timed out over a descriptor nobody woke us for; 2 = poll from now on */
	ax_shm_stats st;
	uint64_t recycled;     /* rows ax_shm_check_keys refused */
};

static int map_segment(ax_shm *s, const char *name)
{
	s->fd = shm_open(name, O_RDWR, 0);
	if (s->fd < 0)
		return -errno;
	struct stat st;
	if (fstat(s->fd, &st) < 0)
		return -errno;
	if ((uint64_t)st.st_size < sizeof(ax_shm_header))
		return -EAGAIN; /* created, not yet sized */
	void *p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd, 0);
	if (p == MAP_FAILED)
		return -errno;
	s->base = p;
	s->size = (uint64_t)st.st_size;
	s->h = p;
	return 0;
}

/* Copy and validate the entries added since the last call. */
static void refresh_buffers(ax_shm *s)
{
	uint32_t n = AX_LOAD_ACQ(&s->h->buf_count);
	if (n > s->snap.buf_cap)
		n = s->snap.buf_cap;
	const ax_shm_buffer *shared = (const ax_shm_buffer *)(s->base + s->snap.buf_off);
	for (uint32_t i = s->nbufs; i < n; i++) {
		s->bufs[i] = shared[i];
		if (ax_shm_validate_buffer(&s->snap, &s->bufs[i])) {
			ax_log(AX_LOG_WARN, "shm", "buffer %u rejected (kind %u)", i, s->bufs[i].kind);
			s->bufs[i].kind = 0;
		}
	}
	if (n > s->nbufs)
		s->nbufs = n;
}

/* Take the snapshot and validate it; the engine may still be initialising (-EAGAIN). */
static int check_segment(ax_shm *s)
{
	if (AX_LOAD_ACQ(&s->h->magic) == 0)
		return -EAGAIN;
	memcpy(&s->snap, s->h, sizeof s->snap);
	int rc = ax_shm_validate_header(&s->snap, s->size);
	if (rc)
		return rc;
	if (AX_LOAD_ACQ(&s->h->state) != AX_SHM_STATE_READY)
		return -EAGAIN; /* closed: its engine unlinks it; a new one will come */
	s->bufs = calloc(s->snap.buf_cap, sizeof *s->bufs);
	return s->bufs ? 0 : -ENOMEM;
}

/* Claim the consumer area: start from now. */
static void claim_consumer(ax_shm *s)
{
	ax_shm_header *h = s->h;
	s->tail = AX_LOAD_ACQ(&h->ring_head);
	s->dropped_seen = AX_LOAD_ACQ(&h->ring_dropped);
	AX_STORE_REL(&h->consumer_tail, s->tail);
	/* Nothing before the attach is ours to finish (rule 9); progress is advertised by the first ax_shm_complete. */
	AX_STORE_REL(&h->consumer_features, 0u);
	AX_STORE_REL(&h->consumer_done, s->tail);
	s->hb_ns = ax_now_ns();
	AX_STORE_REL(&h->consumer_heartbeat_ns, s->hb_ns);
	/* A new consumer wants nothing until it says what (a dead or detached one's wish is not inherited) */
	AX_STORE_RLX(&h->want_layers[0], 0);
	AX_STORE_RLX(&h->want_layers[1], 0);
	AX_STORE_RLX(&h->want_prefill, 0u);
	AX_STORE_REL(&h->consumer_pid, (uint64_t)getpid());
}

int ax_shm_attach(ax_shm **out, const char *name)
{
	if (!out)
		return -EINVAL;
	*out = NULL;
	if (!name)
		name = AX_SHM_DEFAULT_NAME;
	int rc = ax__shm_check_name(name);
	if (rc)
		return rc;
	ax_shm *s = calloc(1, sizeof *s);
	if (!s)
		return -ENOMEM;
	s->fd = -1;
	if ((rc = map_segment(s, name)) || (rc = check_segment(s)))
		goto fail;
	refresh_buffers(s);
	claim_consumer(s);
	*out = s;
	return 0;
fail:
	free(s->bufs);
	if (s->base)
		munmap(s->base, s->size);
	if (s->fd >= 0)
		close(s->fd);
	free(s);
	return rc;
}

void ax_shm_detach(ax_shm *s)
{
	if (!s)
		return;
	uint64_t me = (uint64_t)getpid();
	/* Leave the area alone if another consumer has claimed it since. */
	if (__atomic_compare_exchange_n(&s->h->consumer_pid, &me, 0, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
		AX_STORE_REL(&s->h->consumer_features, 0u);
	munmap(s->base, s->size);
	close(s->fd);
	free(s->bufs);
	free(s);
}

const ax_shm_header *ax_shm_hdr(const ax_shm *s) { return s ? s->h : NULL; }
const ax_shm_header *ax_shm_snapshot(const ax_shm *s) { return s ? &s->snap : NULL; }

const ax_shm_buffer *ax_shm_buffers(const ax_shm *s, uint32_t *count)
{
	if (count)
		*count = s ? s->nbufs : 0;
	return s ? s->bufs : NULL;
}

const void *ax_shm_host_ptr(const ax_shm *s, uint32_t index)
{
	if (!s || index >= s->nbufs || s->bufs[index].kind == 0 || s->bufs[index].loc != AX_LOC_HOST)
		return NULL;
	return s->base + s->bufs[index].offset;
}

int ax_shm_find_buffer(const ax_shm *s, uint32_t kind, int32_t layer)
{
	if (!s)
		return -EINVAL;
	refresh_buffers((ax_shm *)s); /* the table only grows; the cast keeps the header's const signature */
	for (uint32_t i = 0; i < s->nbufs; i++)
		if (s->bufs[i].kind == kind && (kind != AX_BUF_K_POOL || s->bufs[i].layer == layer))
			return (int)i;
	return -ENOENT;
}

void ax_shm_heartbeat(ax_shm *s)
{
	if (!s)
		return;
	s->hb_ns = ax_now_ns();
	AX_STORE_REL(&s->h->consumer_heartbeat_ns, s->hb_ns);
}

void ax_shm_set_wanted(ax_shm *s, const uint64_t layers[2], int prefill)
{
	if (!s)
		return;
	AX_STORE_RLX(&s->h->want_layers[0], layers ? layers[0] : 0);
	AX_STORE_RLX(&s->h->want_layers[1], layers ? layers[1] : 0);
	AX_STORE_RLX(&s->h->want_prefill, prefill ? 1u : 0u);
	ax_shm_heartbeat(s);
}

static bool segment_current(const ax_shm *s)
{
	return AX_LOAD_ACQ(&s->h->generation) == s->snap.generation &&
	       AX_LOAD_ACQ(&s->h->state) == AX_SHM_STATE_READY;
}

static void advance(ax_shm *s)
{
	s->tail++;
	AX_STORE_REL(&s->h->consumer_tail, s->tail);
}

/* Drops since the last call, plus descriptors skipped because the ring lapped the tail. */
static uint64_t collect_lost(ax_shm *s, uint64_t head)
{
	uint64_t dropped = AX_LOAD_ACQ(&s->h->ring_dropped);
	uint64_t lost = dropped - s->dropped_seen;
	s->dropped_seen = dropped;
	if (head - s->tail > s->snap.ring_cap) { /* only if someone moved consumer_tail under us */
		uint64_t skip = head - s->tail - s->snap.ring_cap;
		lost += skip;
		s->tail += skip;
	}
	s->st.lost += lost;
	return lost;
}

int ax_shm_next(ax_shm *s, ax_shm_step *out, uint64_t *lost)
{
	if (lost)
		*lost = 0;
	if (!s || !out)
		return -EINVAL;
	if (!segment_current(s))
		return -ESTALE;
	uint64_t now = ax_now_ns();
	if (now - s->hb_ns > HEARTBEAT_EVERY_NS)
		ax_shm_heartbeat(s);
	uint64_t head = AX_LOAD_ACQ(&s->h->ring_head);
	if (head < s->tail)
		return -ESTALE; /* the producer's counter went backwards: not the segment we attached to */
	uint64_t l = collect_lost(s, head);
	if (lost)
		*lost = l;
	if (head == s->tail)
		return 0;
	if (AX_LOAD_RLX(&s->h->buf_count) != s->nbufs)
		refresh_buffers(s);
	const ax_shm_step *ring = (const ax_shm_step *)(s->base + s->snap.ring_off);
	if (ax__shm_slot_read(&ring[s->tail & (s->snap.ring_cap - 1)], s->tail, out)) {
		advance(s);
		s->st.torn++;
		return -EBADMSG;
	}
	advance(s);
	ax_shm_heads heads = {AX_LOAD_ACQ(&s->h->arena_head), AX_LOAD_ACQ(&s->h->q_head)};
	if (ax__shm_validate_step(&s->snap, s->bufs, s->nbufs, &heads, out)) {
		s->st.rejected++;
		return -EBADMSG;
	}
	s->st.taken++;
	return 1;
}

int ax_shm_read_tokens(ax_shm *s, uint64_t pos, uint32_t n, int32_t *out)
{
	if (!s || (n && !out))
		return -EINVAL;
	uint64_t cap = s->snap.arena_cap, head = AX_LOAD_ACQ(&s->h->arena_head);
	if (n > cap || pos > head || n > head - pos)
		return -ERANGE;
	if (head - pos > cap)
		return -ESTALE;
	const int32_t *arena = (const int32_t *)(s->base + s->snap.arena_off);
	for (uint32_t i = 0; i < n; i++)
		out[i] = AX_LOAD_RLX(&arena[(pos + i) % cap]);
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	if (AX_LOAD_RLX(&s->h->arena_head) - pos > cap)
		return -ESTALE; /* overwritten while we copied */
	return 0;
}

int ax_shm_read_request(ax_shm *s, uint32_t slot, uint64_t req_id, ax_shm_request *out)
{
	if (!s || !out || slot >= s->snap.req_cap || req_id == 0)
		return -EINVAL;
	const ax_shm_request *r = (const ax_shm_request *)(s->base + s->snap.req_off) + slot;
	if (AX_LOAD_ACQ(&r->req_id) != req_id)
		return -ESTALE;
	const uint64_t *src = (const uint64_t *)r;
	uint64_t *dst = (uint64_t *)out;
	for (size_t i = 0; i < sizeof *r / sizeof(uint64_t); i++)
		dst[i] = AX_LOAD_RLX(&src[i]);
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	if (AX_LOAD_RLX(&r->req_id) != req_id || out->req_id != req_id || out->state == AX_REQ_FREE)
		return -ESTALE;
	out->rid[AX_SHM_RID_MAX - 1] = 0;
	return 0;
}

int ax_shm_check_q(ax_shm *s, uint64_t q_row, uint64_t n, uint64_t rows)
{
	if (!s)
		return -EINVAL;
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	uint64_t qh = AX_LOAD_RLX(&s->h->q_head);
	if (q_row > qh || n > qh - q_row || qh - q_row > rows)
		return -ESTALE;
	return 0;
}

/* Rule 9. The fence orders the caller's key reads (finished before this call) before the loads below: if a read saw
 * a write the engine made after freeing the slots, these loads see the freed_step and the step start that preceded
 * that write (the engine stores both, then a release fence, then writes). */
int ax_shm_check_keys(ax_shm *s, uint64_t req_id)
{
	if (!s || req_id == 0)
		return -EINVAL;
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	if (!(AX_LOAD_RLX(&s->h->features) & AX_SHM_FEAT_RECYCLE))
		return 0;
	uint64_t slot = req_id & 0xffff; /* ids are (counter << 16) | slot (ax_shm_next) */
	if (slot >= s->snap.req_cap) {
		s->recycled++;
		return -ESTALE;
	}
	const ax_shm_request *r = (const ax_shm_request *)(s->base + s->snap.req_off) + slot;
	uint64_t id = AX_LOAD_ACQ(&r->req_id), freed = AX_LOAD_ACQ(&r->freed_step);
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	uint64_t steps = AX_LOAD_RLX(&s->h->steps_started);
	if (id != req_id || AX_LOAD_RLX(&r->req_id) != req_id || (freed != 0 && steps >= freed)) {
		s->recycled++; /* entry reused (so long freed), or a step started since the free */
		return -ESTALE;
	}
	return 0;
}

void ax_shm_complete(ax_shm *s, uint64_t seq_end)
{
	if (!s)
		return;
	if (seq_end > s->tail)
		seq_end = s->tail;
	if (seq_end > AX_LOAD_RLX(&s->h->consumer_done))
		AX_STORE_REL(&s->h->consumer_done, seq_end);
	if (!(AX_LOAD_RLX(&s->h->consumer_features) & AX_SHM_CFEAT_DONE))
		AX_STORE_REL(&s->h->consumer_features, (uint32_t)AX_SHM_CFEAT_DONE);
}

uint64_t ax_shm_taken(const ax_shm *s) { return s ? s->tail : 0; }

uint64_t ax_shm_recycled(const ax_shm *s) { return s ? s->recycled : 0; }

void ax_shm_get_stats(const ax_shm *s, ax_shm_stats *out)
{
	if (out)
		*out = s ? s->st : (ax_shm_stats){0};
}

int ax_shm_alive(ax_shm *s, uint64_t timeout_ns)
{
	if (!s)
		return -EINVAL;
	if (!segment_current(s))
		return -ESTALE;
	if (!ax__shm_pid_alive(AX_LOAD_ACQ(&s->h->engine_pid)))
		return 0;
	uint64_t hb = AX_LOAD_ACQ(&s->h->heartbeat_ns), now = ax_now_ns();
	return now > hb && now - hb > timeout_ns ? 0 : 1;
}

/* Is there something for ax_shm_next to return (a descriptor, or -ESTALE)? */
static bool pending(const ax_shm *s)
{
	return AX_LOAD_ACQ(&s->h->ring_head) != s->tail || !segment_current(s);
}

int ax_shm_wait(ax_shm *s, uint64_t timeout_ns)
{
	if (!s)
		return -EINVAL;
	/* Read live: a producer may stop waking after attach (ax_export_disable_wake). Only a timeout depends on it. */
	if ((s->missed_wakes >= 2 || !(AX_LOAD_ACQ(&s->h->features) & AX_SHM_FEAT_WAKE)) && timeout_ns > AX_SHM_POLL_NS)
		timeout_ns = AX_SHM_POLL_NS; /* nobody will wake us: poll */
	uint32_t *w = &s->h->consumer_wait;
	/* Store the flag, then look (seq_cst): a waker stores its event (ring_head, or `poked`), fences, then looks at
	 * the flag; so either we see the event here or the waker sees the flag and wakes us. */
	__atomic_store_n(w, 1u, __ATOMIC_SEQ_CST);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (!pending(s) && !__atomic_exchange_n(&s->poked, 0u, __ATOMIC_SEQ_CST) && timeout_ns &&
	    ax__shm_futex_wait(w, 1u, timeout_ns) == -ETIMEDOUT && AX_LOAD_ACQ(w) == 1u && pending(s) &&
	    timeout_ns > AX_SHM_POLL_NS && ax__shm_futex_wait(w, 1u, MISSED_WAKE_GRACE_NS) == -ETIMEDOUT &&
	    AX_LOAD_ACQ(w) == 1u) {
		/* A descriptor came while we slept and nobody cleared the flag (a waking producer clears it before its
		 * FUTEX_WAKE), not even within a grace period (a producer holding its wake-ups over a step flushes them
		 * at the step's end): this producer advertises wakes it does not send (GPU kernels writing the ring).
		 * Twice, so that a publish racing with the timeout is not taken for it. */
		if (++s->missed_wakes == 2)
			ax_log(AX_LOG_WARN, "shm", "the producer publishes without waking the consumer: polling every "
			       "%llu us", (unsigned long long)(AX_SHM_POLL_NS / 1000));
	}
	AX_STORE_RLX(w, 0u);
	__atomic_store_n(&s->poked, 0u, __ATOMIC_RELAXED);
	return pending(s) ? 1 : 0;
}

void ax_shm_wake(ax_shm *s)
{
	if (!s)
		return;
	uint32_t *w = &s->h->consumer_wait;
	__atomic_store_n(&s->poked, 1u, __ATOMIC_SEQ_CST);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (AX_LOAD_RLX(w) != 0 && __atomic_exchange_n(w, 0u, __ATOMIC_ACQ_REL) != 0)
		ax__shm_futex_wake(w);
}
