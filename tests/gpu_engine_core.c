/*
 * gpu_engine_core.c — the GPU test engine (see gpu_engine_core.h): one engine, two segments with identical
 * contents, two captures, one comparison.
 *
 * The engine is shaped like SGLang: one K tensor per layer [slots, H_kv, D] bf16 (here the four layers are carved
 * out of ONE device allocation at different offsets, as PyTorch's caching allocator packs tensors, so the capture's
 * importer must share the mapping), req_to_token int32 [rows, ctx], a Q ring [rows, H_q, D] bf16. Requests run
 * concurrently; each forward allocates KV slots from a free stack that requests return (shuffled) when they end,
 * so index rows point all over the pool and slots are reused by later requests, as in a real engine. A prefill
 * forward covers the whole prompt; then one decode forward per token.
 *
 * The device segment's Q ring is a CUDA entry: ax_export_q_reserve returns its row numbers (no pointer) and the
 * engine uploads the rows there. The step event is recorded after each step's uploads and before its descriptors
 * are published.
 *
 * Slot recycling (shm/README.md rule 9): each forward starts with ax_export_step_start. Normally a request ends with
 * ax_export_request_end_keep and its slots and index row go back to the free lists only when
 * ax_export_consumer_done says both captures have processed its END (then ax_export_request_freed): the engine
 * never waits, and no row is lost. The `recycle` scenario frees at once (ax_export_request_end), starts the next
 * step and overwrites the freed slots with poison keys (K = 200 in every element: logits far outside what real
 * keys give) before the captures wake (wake-ups held): rows computed after that must come out as `gap` "recycled",
 * never as records (a record with a logit above POISON_LOGIT is a wrong record).
 *
 * Before the scenario, rule_test() checks the recycling contract in-process, case by case (export + attach of one
 * small segment).
 *
 * The `sticky` scenario (capture/README.md, "Sticky CUDA errors"): the device capture runs with the backend's
 * test-only fault (ATTNX_CUDA_FAULT_AFTER=10: its 11th batch faults instead of running: on a GPU a kernel storing to
 * 0x10, cudaErrorIllegalAddress, sticky) and, on the emulated device, with resets that never recover
 * (AX_EMUL_RESET_FAILS=-1, what an H200 does): the capture must re-execute itself (same pid, a fresh image: its
 * record seq starts again, its hello comes again, its stats say cuda_reexecs 1) or, on a driver whose reset
 * recovers, attach afresh in-process (cuda_sticky and cuda_resets 1); either way it must still run at the end,
 * report every request it lost track of (an `end` or a `requests` gap for each), emit no wrong record (each of its
 * attn records equals the CPU capture's for the same key; no duplicates, no poison) and resume: the last request's
 * records are complete. The CPU side must be complete and gap-free as usual.
 *
 * Checks: both captures attach and announce the expected backend in `hello`; every request's records arrive and
 * `end` follows; no step dropped, no gap on either side; the attn record sets are equal key by key (rid, position,
 * layer, head) with equal k, token ids, decode steps and prefill flags, positions equal except where two keys'
 * logits tie within 1e-3 at the top-k boundary, logits and logsumexp within 1e-3; each side's records of a request
 * arrive in position order.
 */
#include "gpu_engine_core.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <nng/nng.h>
#include <nng/protocol/pipeline0/pull.h>

#include "attnx_proto.h"
#include "attnx_shm_cuda.h"

/* The shape: H_q 8, H_kv 2, D 64 by default (the generic kernels); the build's gpu_engine_d128 sets GE_HQ 16, GE_HKV 4,
 * GE_D 128 so the same scenarios run through the sm_90 fast path (bf16, D 128, group <= 8). */
#ifndef GE_HQ
#define GE_HQ 8
#endif
#ifndef GE_HKV
#define GE_HKV 2
#endif
#ifndef GE_D
#define GE_D 64
#endif
enum { L = 4, HQ = GE_HQ, HKV = GE_HKV, D = GE_D, SLOTS = 8192, CTX = 512, IROWS = 8, QROWS = 4096 };
enum { NREQ = 10, CONC = 3, TOPK = 8 };
#define TOL 1e-3

/* Scenarios (argv[4]): plain; auto (the device capture runs with --backend auto and must pick cuda); reject (the
 * device segment's layer-1 K pool claims bytes past its allocation: the importer must reject and count it, the
 * capture must stop wanting layer 1, and neither side may emit layer-1 records); restart (halfway, with no request
 * in flight, the engine closes both segments, frees its device memory and exports new allocations: both captures
 * must re-attach, and the device one must have closed the old mappings before opening the new). */
/* vmm: the device buffers are VMM allocations (cuMemCreate) exported as POSIX fds, served by ax_vmm_server on a
 * Unix socket, named by CUDA_VMM entries; the step event comes with the Q ring's fd. */
/* recycle: see the top. */
/* sticky: see the top. */
enum { SC_PLAIN, SC_AUTO, SC_REJECT, SC_RESTART, SC_VMM, SC_RECYCLE, SC_STICKY, SC_N };
static const char *const sc_names[SC_N] = {"plain", "auto", "reject", "restart", "vmm", "recycle", "sticky"};
#define STICKY_FAULT_AFTER "10" /* batches before the injected fault (the run has about 70) */
#define POISON_K 200.0f
#define POISON_LOGIT 50.0f /* real keys: |logit| < 10 (scale 1/8, |q| < 1, |k| < 3); poison: 25·Σq, hundreds */
static int g_scenario;
static int g_exact; /* emulated device: the same CPU code on both sides, so every value must be identical */

/* ---- tiny helpers ---------------------------------------------------------------------------------------- */

static uint64_t rng_state;
static uint32_t rnd(void)
{
	rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
	return (uint32_t)(rng_state >> 33);
}
static float rndf(void) { return (float)rnd() / 2147483648.0f - 1.0f; } /* [-1, 1) */

static uint16_t to_bf16(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	u += 0x7fff + ((u >> 16) & 1);
	return (uint16_t)(u >> 16);
}

static void msleep(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
	nanosleep(&ts, NULL);
}

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

#define CHECK(cond, ...)                                                                                           \
	do {                                                                                                       \
		if (!(cond)) {                                                                                     \
			fprintf(stderr, "gpu_engine: " __VA_ARGS__);                                                \
			fprintf(stderr, "\n");                                                                     \
			return -1;                                                                                 \
		}                                                                                                  \
	} while (0)

/* ---- the engine ------------------------------------------------------------------------------------------ */

typedef struct greq {
	int live;
	char rid[32];
	uint32_t P, gen, pos, row;
	uint64_t id_d, id_h;
	int32_t toks[CTX];
} greq;

/* A request's slots waiting to be recycled until both captures have processed its END (ax_export_consumer_done): a
 * capture computes rows some time after it takes their descriptors, and a K slot rewritten meanwhile would be read
 * with the new keys (the capture would then report the rows as recycled). */
typedef struct pending_free {
	char rid[32];
	uint64_t id_d, id_h, done_d, done_h; /* request ids and END descriptor counts in the two segments */
	uint32_t row; /* its req_to_token row: rewritten by the next request that gets it */
	uint32_t n;
	uint32_t slots[CTX];
} pending_free;

typedef struct side side;

typedef struct engine {
	const ge_dev_ops *dev;
	side *sides[2];
	pending_free pend[NREQ];
	uint32_t n_pend;
	char name_d[AX_SHM_NAME_MAX], name_h[AX_SHM_NAME_MAX];
	ax_export *exd, *exh;
	uint32_t qd, qh, idx_d, idx_h;
	uint64_t k_dev, q_dev, i_dev;      /* device addresses */
	ax_vmm_server *vmm;                /* SC_VMM: the fd server */
	char vmm_path[108];
	uint16_t *k_host[L];               /* host segment K pools */
	int32_t *i_host;                   /* host segment req_to_token */
	uint32_t free_slots[SLOTS], n_free;
	uint32_t free_rows[IROWS], n_free_rows;
	greq reqs[CONC];
	uint32_t started, ended;
	uint64_t drops;
} engine;

static ax_export_config seg_cfg(const char *name)
{
	ax_export_config c;
	memset(&c, 0, sizeof c);
	c.name = name, c.engine = "gpu-test-engine", c.model = "gpu-test", c.world_size = 1;
	c.n_layers = L, c.n_q_heads = HQ, c.n_kv_heads = HKV, c.n_q_heads_total = HQ, c.head_dim = D;
	c.q_dtype = AX_DTYPE_BF16, c.k_dtype = AX_DTYPE_BF16, c.scale = 0.125f, c.max_ctx = CTX;
	c.ring_cap = 4096, c.req_cap = 64, c.arena_cap = 1 << 20;
	c.data_size = (uint64_t)L * SLOTS * HKV * D * 2 + (uint64_t)QROWS * HQ * D * 2 + (uint64_t)IROWS * CTX * 4 +
		      65536;
	return c;
}

static ax_shm_buffer desc(uint32_t kind, int32_t layer, uint64_t d0, uint64_t d1, uint64_t d2, uint32_t dtype)
{
	ax_shm_buffer b;
	memset(&b, 0, sizeof b);
	b.kind = kind, b.layer = layer, b.dtype = dtype, b.scale = 1, b.device = -1;
	b.ndim = d2 ? 3 : 2;
	b.dim[0] = d0, b.dim[1] = d1, b.dim[2] = d2;
	return b;
}

/* One device allocation (id 1 K, 2 Q, 3 index): plain (an IPC entry is made from it later) or, in the vmm
 * scenario, a VMM allocation whose fd the engine's server offers (with the step event for the Q ring). */
static int dev_alloc(engine *e, uint64_t id, uint64_t bytes, uint64_t *dptr)
{
	if (g_scenario != SC_VMM)
		return e->dev->alloc(e->dev->ctx, bytes, dptr);
	int fd;
	uint64_t size;
	uint8_t ev[64];
	int have_ev = id == 2 && e->dev->event_handle(e->dev->ctx, ev) == 0;
	CHECK(e->dev->alloc_vmm && e->dev->alloc_vmm(e->dev->ctx, bytes, dptr, &fd, &size) == 0, "VMM alloc");
	CHECK(ax_vmm_server_add(e->vmm, id, fd, size, 0, have_ev ? ev : NULL) == 0, "VMM server add");
	return 0;
}

/* The location fields of an entry for [dptr, dptr + bytes) of allocation `id` based at `base`. */
static int dev_entry(engine *e, ax_shm_buffer *b, uint64_t id, uint64_t base, uint64_t dptr, uint64_t bytes)
{
	if (g_scenario != SC_VMM)
		return e->dev->entry(e->dev->ctx, b, dptr, bytes);
	return ax_cuda_entry_set_vmm(b, 0, id, e->vmm_path, dptr - base, bytes);
}

/* Device segment: K pools in one allocation, Q ring (with the step event), index table. */
static int export_device(engine *e)
{
	const uint64_t kl = (uint64_t)SLOTS * HKV * D * 2, qb = (uint64_t)QROWS * HQ * D * 2, ib = IROWS * CTX * 4;
	if (g_scenario == SC_VMM && e->vmm == NULL) {
		snprintf(e->vmm_path, sizeof e->vmm_path, "/tmp/attnx-gputest-%d.vmm.sock", (int)getpid());
		CHECK(ax_vmm_server_start(&e->vmm, e->vmm_path) == 0, "VMM server on %s", e->vmm_path);
	}
	CHECK(dev_alloc(e, 1, kl * L, &e->k_dev) == 0, "device alloc (K)");
	CHECK(dev_alloc(e, 2, qb, &e->q_dev) == 0, "device alloc (Q)");
	CHECK(dev_alloc(e, 3, ib, &e->i_dev) == 0, "device alloc (index)");
	for (int l = 0; l < L; l++) {
		ax_shm_buffer b = desc(AX_BUF_K_POOL, l, SLOTS, HKV, D, AX_DTYPE_BF16);
		CHECK(dev_entry(e, &b, 1, e->k_dev, e->k_dev + l * kl, kl) == 0, "K entry");
		if (g_scenario == SC_REJECT && l == 1)
			b.offset = 3 * kl + kl / 2; /* ends half a pool past the allocation (the segment cannot tell) */
		CHECK(ax_export_add_device_buffer(e->exd, &b, NULL) == 0, "add K entry");
	}
	ax_shm_buffer q = desc(AX_BUF_Q_RING, -1, QROWS, HQ, D, AX_DTYPE_BF16);
	CHECK(dev_entry(e, &q, 2, e->q_dev, e->q_dev, qb) == 0, "Q entry");
	uint8_t ev[64];
	if (g_scenario != SC_VMM && e->dev->event_handle(e->dev->ctx, ev) == 0) /* VMM: the server gives it */
		CHECK(ax_cuda_entry_set_event(&q, ev) == 0, "Q event");
	CHECK(ax_export_add_device_buffer(e->exd, &q, &e->qd) == 0, "add Q entry");
	ax_shm_buffer ix = desc(AX_BUF_INDEX_TOKEN, -1, IROWS, CTX, 0, AX_DTYPE_I32);
	CHECK(dev_entry(e, &ix, 3, e->i_dev, e->i_dev, ib) == 0, "index entry");
	CHECK(ax_export_add_device_buffer(e->exd, &ix, &e->idx_d) == 0, "add index entry");
	return 0;
}

static int export_host(engine *e)
{
	void *p;
	for (int l = 0; l < L; l++) {
		ax_shm_buffer b = desc(AX_BUF_K_POOL, l, SLOTS, HKV, D, AX_DTYPE_BF16);
		b.loc = AX_LOC_HOST;
		CHECK(ax_export_add_host_buffer(e->exh, &b, &p, NULL) == 0, "host K");
		e->k_host[l] = p;
	}
	ax_shm_buffer q = desc(AX_BUF_Q_RING, -1, QROWS, HQ, D, AX_DTYPE_BF16);
	q.loc = AX_LOC_HOST;
	CHECK(ax_export_add_host_buffer(e->exh, &q, NULL, &e->qh) == 0, "host Q");
	ax_shm_buffer ix = desc(AX_BUF_INDEX_TOKEN, -1, IROWS, CTX, 0, AX_DTYPE_I32);
	ix.loc = AX_LOC_HOST;
	CHECK(ax_export_add_host_buffer(e->exh, &ix, &p, &e->idx_h) == 0, "host index");
	e->i_host = p;
	return 0;
}

/* Create both segments and their buffers (again after a restart). */
static int engine_export(engine *e)
{
	ax_export_config cd = seg_cfg(e->name_d), ch = seg_cfg(e->name_h);
	CHECK(ax_export_open(&e->exd, &cd) == 0, "export open (device segment)");
	CHECK(ax_export_open(&e->exh, &ch) == 0, "export open (host segment)");
	if (export_device(e) < 0 || export_host(e) < 0)
		return -1;
	for (uint32_t i = 0; i < SLOTS; i++) /* slot 0 stays unused, as SGLang reserves it */
		e->free_slots[i] = SLOTS - 1 - i;
	e->n_free = SLOTS - 1;
	for (uint32_t i = 0; i < IROWS; i++)
		e->free_rows[i] = IROWS - 1 - i;
	e->n_free_rows = IROWS;
	e->n_pend = 0;
	return 0;
}

static int engine_open(engine *e, const ge_dev_ops *dev)
{
	memset(e, 0, sizeof *e);
	e->dev = dev;
	snprintf(e->name_d, sizeof e->name_d, "/attnx.gputest.%d.dev", (int)getpid());
	snprintf(e->name_h, sizeof e->name_h, "/attnx.gputest.%d.host", (int)getpid());
	return engine_export(e);
}

static void engine_close(engine *e)
{
	ax_export_close(e->exd);
	ax_export_close(e->exh);
	e->exd = e->exh = NULL;
}

/* After the captures are gone. */
static void engine_free(engine *e)
{
	if (e->vmm) {
		uint64_t served = 0, refused = 0;
		ax_vmm_server_counts(e->vmm, &served, &refused);
		fprintf(stderr, "gpu_engine: VMM server: %llu fds served, %llu requests refused\n",
			(unsigned long long)served, (unsigned long long)refused);
	}
	ax_vmm_server_stop(e->vmm);
	e->vmm = NULL;
}

/* The engine restarts: segments closed, device memory freed, everything exported anew (new generation). */
static int engine_restart(engine *e)
{
	engine_close(e);
	e->dev->free_all(e->dev->ctx);
	return engine_export(e);
}

/* Random K rows for `slot` in every layer (poison: POISON_K everywhere), written to both segments. */
static int write_k(engine *e, uint32_t slot, int poison)
{
	uint16_t row[HKV * D];
	for (int l = 0; l < L; l++) {
		float boost = rnd() % 16 == 0 ? 3.0f : 1.0f; /* a few keys that stand out */
		for (int i = 0; i < HKV * D; i++)
			row[i] = to_bf16(poison ? POISON_K : rndf() * boost);
		memcpy(e->k_host[l] + (uint64_t)slot * HKV * D, row, sizeof row);
		uint64_t off = ((uint64_t)l * SLOTS + slot) * HKV * D * 2;
		CHECK(e->dev->upload(e->dev->ctx, e->k_dev + off, row, sizeof row) == 0, "upload K");
	}
	return 0;
}

/* Slots for positions [p0, p0 + n) of request r: from the free stack, into req_to_token on both sides. */
static int place_tokens(engine *e, greq *r, uint32_t p0, uint32_t n)
{
	CHECK(e->n_free >= n, "out of KV slots");
	for (uint32_t p = p0; p < p0 + n; p++) {
		uint32_t s = e->free_slots[--e->n_free];
		e->i_host[r->row * CTX + p] = (int32_t)s;
		if (write_k(e, s, 0) < 0)
			return -1;
	}
	CHECK(e->dev->upload(e->dev->ctx, e->i_dev + ((uint64_t)r->row * CTX + p0) * 4, &e->i_host[r->row * CTX + p0],
			     (uint64_t)n * 4) == 0, "upload index");
	return 0;
}

/* Q rows of one step for `nl` layers: the same bytes into the host ring and the device ring. */
static int write_q(engine *e, uint32_t rows, uint64_t *q_row)
{
	void *hp;
	uint64_t qr_h, qr_d;
	void *dp = &dp;
	CHECK(ax_export_q_reserve(e->exh, e->qh, rows, &qr_h, &hp) == 0, "q reserve (host)");
	CHECK(ax_export_q_reserve(e->exd, e->qd, rows, &qr_d, &dp) == 0 && dp == NULL, "q reserve (device ring)");
	CHECK(qr_h == qr_d, "Q rows diverged");
	uint16_t *q = hp;
	for (uint64_t i = 0; i < (uint64_t)rows * HQ * D; i++)
		q[i] = to_bf16(rndf());
	CHECK(e->dev->upload(e->dev->ctx, e->q_dev + (qr_d % QROWS) * HQ * D * 2, q, (uint64_t)rows * HQ * D * 2) == 0,
	      "upload Q");
	*q_row = qr_h;
	return 0;
}

/* One forward of request r: prefill (whole prompt) or one decode token. */
static int forward(engine *e, greq *r)
{
	uint32_t n = r->pos == 0 ? r->P : 1, p0 = r->pos;
	ax_export_step_start(e->exd); /* before the step writes slots or index entries (rule 9) */
	ax_export_step_start(e->exh);
	if (place_tokens(e, r, p0, n) < 0)
		return -1;
	uint64_t wd[2], wh[2];
	int pd, ph;
	ax_export_wanted(e->exd, wd, &pd);
	ax_export_wanted(e->exh, wh, &ph);
	ax_shm_step s;
	memset(&s, 0, sizeof s);
	s.layers[0] = wd[0] & wh[0] & ((1u << L) - 1);
	uint32_t nl = (uint32_t)__builtin_popcountll(s.layers[0]);
	if (nl && write_q(e, n * nl, &s.q_row) < 0)
		return -1;
	CHECK(e->dev->step_done(e->dev->ctx) == 0, "step event");
	s.n_tokens = n, s.pos0 = p0, s.seq_len = p0 + n, s.index_row = r->row;
	s.decode_step = r->pos == 0 ? 0 : r->pos - r->P + 1;
	s.flags = r->pos == 0 ? AX_STEP_F_PREFILL : 0;
	ax_shm_step sh = s; /* the two segments have their own request ids and index-table entries */
	s.req_id = r->id_d, s.index_buf = e->idx_d;
	sh.req_id = r->id_h, sh.index_buf = e->idx_h;
	int a = ax_export_step(e->exd, &s, r->toks + p0), b = ax_export_step(e->exh, &sh, r->toks + p0);
	e->drops += (a == -EAGAIN) + (b == -EAGAIN);
	CHECK((a == 0 || a == -EAGAIN) && (b == 0 || b == -EAGAIN), "ax_export_step: %d / %d", a, b);
	r->pos = p0 + n;
	return 0;
}

static int begin_req(engine *e, greq *r)
{
	memset(r, 0, sizeof *r);
	snprintf(r->rid, sizeof r->rid, "ge-%u", e->started++);
	r->P = 8 + rnd() % 120;
	r->gen = 4 + rnd() % 24;
	for (uint32_t i = 0; i < r->P + r->gen; i++)
		r->toks[i] = (int32_t)(rnd() % 32000);
	CHECK(e->n_free_rows > 0, "out of index rows");
	r->row = e->free_rows[--e->n_free_rows];
	CHECK(ax_export_request_begin(e->exd, r->rid, r->toks, r->P, &r->id_d) == 0, "begin (device)");
	CHECK(ax_export_request_begin(e->exh, r->rid, r->toks, r->P, &r->id_h) == 0, "begin (host)");
	r->live = 1;
	return 0;
}

static void give_back(engine *e, const pending_free *f);

/* recycle scenario: free at END, start the next step, overwrite the freed slots at once (see the top). They go back
 * to the free lists a little later (the next iteration), so the poison is what a late reader finds, not the keys of
 * the next step's requests (which a capture could not tell from the right ones). */
static int end_now(engine *e, greq *r)
{
	CHECK(ax_export_request_end(e->exd, r->id_d, AX_END_STOP) == 0, "end (device)");
	CHECK(ax_export_request_end(e->exh, r->id_h, AX_END_STOP) == 0, "end (host)");
	ax_export_step_start(e->exd);
	ax_export_step_start(e->exh);
	pending_free *f = &e->pend[e->n_pend++]; /* back to the free lists at the next iteration (recycle) */
	memset(f, 0, sizeof *f);
	f->n = r->pos;
	f->row = r->row;
	for (uint32_t p = 0; p < r->pos; p++) {
		f->slots[p] = (uint32_t)e->i_host[r->row * CTX + p];
		if (write_k(e, f->slots[p], 1) < 0)
			return -1;
	}
	r->live = 0;
	e->ended++;
	return 0;
}

/* End r: publish END, keeping its slots until both captures are done with it (recycle). */
static int end_req(engine *e, greq *r)
{
	if (g_scenario == SC_RECYCLE)
		return end_now(e, r);
	pending_free *f = &e->pend[e->n_pend++];
	CHECK(ax_export_request_end_keep(e->exd, r->id_d, AX_END_STOP, &f->done_d) == 0, "end (device)");
	CHECK(ax_export_request_end_keep(e->exh, r->id_h, AX_END_STOP, &f->done_h) == 0, "end (host)");
	f->id_d = r->id_d, f->id_h = r->id_h;
	snprintf(f->rid, sizeof f->rid, "%s", r->rid);
	f->n = r->pos;
	for (uint32_t p = 0; p < r->pos; p++)
		f->slots[p] = (uint32_t)e->i_host[r->row * CTX + p];
	f->row = r->row;
	r->live = 0;
	e->ended++;
	return 0;
}

/* Slots back to the free stack, shuffled (later requests reuse them scattered), and the index row. */
static void give_back(engine *e, const pending_free *f)
{
	uint32_t base = e->n_free;
	for (uint32_t p = 0; p < f->n; p++)
		e->free_slots[e->n_free++] = f->slots[p];
	for (uint32_t i = e->n_free - 1; i > base && f->n; i--) {
		uint32_t j = base + rnd() % (i - base + 1), t = e->free_slots[i];
		e->free_slots[i] = e->free_slots[j];
		e->free_slots[j] = t;
	}
	e->free_rows[e->n_free_rows++] = f->row;
}

/* Free the requests both captures have finished with (never waits: the others stay pending). */
static void recycle(engine *e)
{
	for (uint32_t k = 0; k < e->n_pend;) {
		pending_free *f = &e->pend[k];
		if (g_scenario == SC_RECYCLE) { /* freed at END already */
			give_back(e, f);
			*f = e->pend[--e->n_pend];
			continue;
		}
		if (!ax_export_consumer_done(e->exd, f->done_d) || !ax_export_consumer_done(e->exh, f->done_h)) {
			k++;
			continue;
		}
		ax_export_request_freed(e->exd, f->id_d); /* -ENOENT only if the entry was reused: nothing to mark */
		ax_export_request_freed(e->exh, f->id_h);
		give_back(e, f);
		*f = e->pend[--e->n_pend];
	}
}

/* Wait (bounded) until both captures have taken every descriptor: keeps the rings and Q rings from lapping. */
static void wait_consumers(engine *e)
{
	for (int i = 0; i < 2000; i++) {
		const ax_shm_header *a = ax_export_header(e->exd), *b = ax_export_header(e->exh);
		if (__atomic_load_n(&a->consumer_tail, __ATOMIC_ACQUIRE) == __atomic_load_n(&a->ring_head, __ATOMIC_ACQUIRE) &&
		    __atomic_load_n(&b->consumer_tail, __ATOMIC_ACQUIRE) == __atomic_load_n(&b->ring_head, __ATOMIC_ACQUIRE))
			return;
		msleep(1);
	}
}

/* Start requests until `upto` have started; return when all of them have ended. */
static int run_requests(engine *e, uint32_t upto)
{
	uint64_t progress_ms = now_ms(), seen = 0;
	while (e->ended < upto) {
		if (e->started + e->ended != seen)
			seen = e->started + e->ended, progress_ms = now_ms();
		CHECK(now_ms() - progress_ms < 20000, "no request could start or end for 20 s (%u pending frees: the "
		      "captures never reported them done through consumer_done)", e->n_pend);
		for (int i = 0; i < CONC; i++) {
			greq *r = &e->reqs[i];
			if (!r->live && e->started < upto && e->n_free >= CTX && e->n_free_rows > 0 && begin_req(e, r) < 0)
				return -1;
			if (!r->live)
				continue;
			int last = r->pos >= r->P + r->gen - 1 && r->pos > 0;
			if (last && g_scenario == SC_RECYCLE) { /* the captures wake after the poison (see the top) */
				wait_consumers(e);
				msleep(3); /* asleep in ax_shm_wait, so they take the step only at the flush */
				ax_export_hold_wake(e->exd);
				ax_export_hold_wake(e->exh);
			}
			if (forward(e, r) < 0)
				return -1;
			if (r->pos >= r->P + r->gen && end_req(e, r) < 0)
				return -1;
			ax_export_flush_wake(e->exd);
			ax_export_flush_wake(e->exh);
		}
		wait_consumers(e);
		msleep(1); /* an engine's step pace, roughly; also lets the captures' records arrive */
		recycle(e);
		ax_export_heartbeat(e->exd);
		ax_export_heartbeat(e->exh);
	}
	return 0;
}

/* ---- record collection ------------------------------------------------------------------------------------ */

typedef struct arec {
	char rid[32];
	ax_rec_attn a;
} arec;

struct side {
	const char *tag;
	char addr[128];
	nng_socket sock;
	pthread_t th;
	int stop;
	pthread_mutex_t mu;
	arec *recs;
	size_t n, cap;
	char backend[16];
	int hellos, ends, gaps, bad_frames;
	int recycled_gaps, poisoned; /* gaps "recycled"; attn records with a poison logit (wrong records) */
	uint64_t recycled_rows;
	int64_t cuda_rejected; /* from the last stats record, -1 before one */
	uint64_t cuda_sticky, cuda_resets, cuda_reset_failed, cuda_reexecs; /* largest in any stats record */
	uint64_t last_seq;
	int seq_restarts;      /* records whose seq went back: a new process image of the same source */
	int req_gaps;          /* `requests` gaps (a request the capture lost track of) */
	char req_gapped[NREQ][32];
	uint32_t req_seen;     /* bit i: a `req` record for ge-i arrived (the capture knew the request) */
	char ended[NREQ][32];
	char last_gap[160];
	pid_t pid;
};

/* A record computed from poison keys: every poisoned key gets the same logit (so the top k tie exactly, in every
 * mode; random keys never do), far outside the real range in the logit modes. */
static int poisoned(const ax_rec_attn *a)
{
	int ties = a->k >= 4;
	for (uint32_t i = 0; i < a->k; i++) {
		if (fabsf(a->topk_logits[i]) > POISON_LOGIT)
			return 1;
		ties &= a->topk_logits[i] == a->topk_logits[0];
	}
	return ties;
}

/* The largest value of stats counter `name` in stats record `r` into *v. */
static void stat_max(const ax_record *r, const char *name, uint64_t *v)
{
	for (uint32_t i = 0; i < r->u.stats.n; i++)
		if (strcmp(r->u.stats.kv[i].name, name) == 0 && r->u.stats.kv[i].value > *v)
			*v = r->u.stats.kv[i].value;
}

static int on_record(const ax_record *r, void *arg)
{
	side *s = arg;
	pthread_mutex_lock(&s->mu);
	s->seq_restarts += r->seq < s->last_seq;
	s->last_seq = r->seq;
	if (r->type == AX_REC_HELLO) {
		s->hellos++;
		snprintf(s->backend, sizeof s->backend, "%s", r->u.hello.backend);
	} else if (r->type == AX_REC_END) {
		if (s->ends < NREQ)
			snprintf(s->ended[s->ends], sizeof s->ended[0], "%.31s", r->rid);
		s->ends++;
	} else if (r->type == AX_REC_STATS) {
		for (uint32_t i = 0; i < r->u.stats.n; i++)
			if (strcmp(r->u.stats.kv[i].name, "cuda_rejected") == 0)
				s->cuda_rejected = (int64_t)r->u.stats.kv[i].value;
		stat_max(r, "cuda_sticky", &s->cuda_sticky);
		stat_max(r, "cuda_resets", &s->cuda_resets);
		stat_max(r, "cuda_reset_failed", &s->cuda_reset_failed);
		stat_max(r, "cuda_reexecs", &s->cuda_reexecs);
	} else if (r->type == AX_REC_GAP) {
		s->gaps++;
		if (strcmp(r->u.gap.what, "requests") == 0 && s->req_gaps < NREQ)
			snprintf(s->req_gapped[s->req_gaps++], sizeof s->req_gapped[0], "%.31s", r->rid);
		if (strcmp(r->u.gap.reason, "recycled") == 0)
			s->recycled_gaps++, s->recycled_rows += r->u.gap.count;
		snprintf(s->last_gap, sizeof s->last_gap, "%.32s/%.32s x%llu (%.40s)", r->u.gap.what, r->u.gap.reason,
			 (unsigned long long)r->u.gap.count, r->rid);
	} else if (r->type == AX_REC_REQ) {
		unsigned i;
		if (sscanf(r->rid, "ge-%u", &i) == 1 && i < NREQ)
			s->req_seen |= 1u << i;
	} else if (r->type == AX_REC_ATTN) {
		if (s->n == s->cap) {
			size_t cap = s->cap ? 2 * s->cap : 4096;
			arec *a = realloc(s->recs, cap * sizeof *a);
			if (a == NULL) {
				pthread_mutex_unlock(&s->mu);
				return -ENOMEM;
			}
			s->recs = a, s->cap = cap;
		}
		s->poisoned += poisoned(&r->u.attn);
		snprintf(s->recs[s->n].rid, sizeof s->recs[s->n].rid, "%.31s", r->rid);
		s->recs[s->n++].a = r->u.attn;
	}
	pthread_mutex_unlock(&s->mu);
	return 0;
}

static void *collect_main(void *arg)
{
	side *s = arg;
	while (!__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE)) {
		nng_msg *m;
		if (nng_recvmsg(s->sock, &m, 0) != 0)
			continue; /* receive timeout: look at the stop flag */
		if (ax_frame_decode(nng_msg_body(m), nng_msg_len(m), on_record, s) < 0)
			s->bad_frames++;
		nng_msg_free(m);
	}
	return NULL;
}

static int side_open(side *s, const char *tag)
{
	memset(s, 0, sizeof *s);
	s->tag = tag;
	s->cuda_rejected = -1;
	pthread_mutex_init(&s->mu, NULL);
	snprintf(s->addr, sizeof s->addr, "ipc:///tmp/attnx-gputest-%d-%s.sock", (int)getpid(), tag);
	CHECK(nng_pull0_open(&s->sock) == 0, "nng_pull0_open");
	nng_socket_set_ms(s->sock, NNG_OPT_RECVTIMEO, 50);
	nng_socket_set_int(s->sock, NNG_OPT_RECVBUF, 8192); /* absorb a capture's bursts: a refused frame is dropped */
	CHECK(nng_listen(s->sock, s->addr, NULL, 0) == 0, "listen %s", s->addr);
	CHECK(pthread_create(&s->th, NULL, collect_main, s) == 0, "collector thread");
	return 0;
}

/* Stop the collector (after this, the side's fields are read without the lock). Idempotent. */
static void side_stop(side *s)
{
	if (__atomic_exchange_n(&s->stop, 1, __ATOMIC_ACQ_REL) == 0)
		pthread_join(s->th, NULL);
}

static void side_close(side *s)
{
	side_stop(s);
	nng_close(s->sock);
	free(s->recs);
	pthread_mutex_destroy(&s->mu);
}

static int side_count(side *s, int *hellos, int *ends)
{
	pthread_mutex_lock(&s->mu);
	*hellos = s->hellos, *ends = s->ends;
	pthread_mutex_unlock(&s->mu);
	return 0;
}

static pid_t spawn_capture(const char *bin, const char *shm, const char *backend, const char *mode, side *s)
{
	char topk[8];
	snprintf(topk, sizeof topk, "%d", TOPK);
	if (g_scenario == SC_AUTO && strcmp(backend, "cuda") == 0)
		backend = "auto";
	const char *argv[] = {bin, "--shm", shm, "--backend", backend, "--records", s->addr, "--policy", "",
			      "--layers", g_scenario == SC_REJECT ? "0,1,2,3" : "0,2,3", "--mode", mode, "--top-k", topk, "--prefill", "--threads", "2",
			      "--stats-interval", "600000", "--max-tokens", "0", "--id", s->tag,
			      strcmp(mode, "heads") == 0 ? "--heads" : NULL, "1,6", NULL};
	extern char **environ;
	char **envp = environ, *fault[3 + 256];
	if (g_scenario == SC_STICKY && strcmp(backend, "cuda") == 0) { /* built before fork: the child only execs */
		size_t n = 0;
		fault[n++] = (char *)"ATTNX_CUDA_FAULT_AFTER=" STICKY_FAULT_AFTER;
		if (g_exact)
			fault[n++] = (char *)"AX_EMUL_RESET_FAILS=-1"; /* resets never recover: the capture re-executes */
		for (char **e = environ; *e && n < sizeof fault / sizeof fault[0] - 1; e++)
			if (strncmp(*e, "ATTNX_CUDA_FAULT", 16) != 0 && strncmp(*e, "AX_EMUL_RESET_FAILS=", 20) != 0 &&
			    strncmp(*e, "AX_EMUL_STICKY_AT_RUN=", 22) != 0 && strncmp(*e, "ATTNX_CAPTURE_REEXEC=", 21) != 0)
				fault[n++] = *e;
		fault[n] = NULL;
		envp = fault;
	}
	pid_t pid = fork();
	if (pid == 0) {
		execve(bin, (char **)argv, envp);
		_exit(127);
	}
	return pid;
}

/* Wait until both captures attached (the engine sees its consumer and the hello arrived) or one exited. */
static int wait_attached(engine *e, side *sd, side *sh)
{
	uint64_t t0 = now_ms();
	for (;;) {
		uint64_t w[2];
		int pf, h1, h2, x;
		side_count(sd, &h1, &x);
		side_count(sh, &h2, &x);
		if (ax_export_wanted(e->exd, w, &pf) && ax_export_wanted(e->exh, w, &pf) && h1 && h2)
			return 0;
		int st;
		CHECK(waitpid(sd->pid, &st, WNOHANG) == 0, "the %s capture exited before attaching (status %d%s)",
		      sd->tag, WIFEXITED(st) ? WEXITSTATUS(st) : -1,
		      WIFEXITED(st) && WEXITSTATUS(st) == 2 ? ": it has no CUDA backend or refused its options" : "");
		CHECK(waitpid(sh->pid, &st, WNOHANG) == 0, "the %s capture exited before attaching", sh->tag);
		CHECK(now_ms() - t0 < 20000, "captures did not attach within 20 s");
		ax_export_heartbeat(e->exd);
		ax_export_heartbeat(e->exh);
		msleep(10);
	}
}

/* Is request `rid` accounted for on side s: ended, or reported lost by a `requests` gap? Caller holds s->mu (or
 * the collector has stopped). */
static int accounted(const side *s, const char *rid)
{
	for (int i = 0; i < s->ends && i < NREQ; i++)
		if (strcmp(s->ended[i], rid) == 0)
			return 1;
	for (int i = 0; i < s->req_gaps; i++)
		if (strcmp(s->req_gapped[i], rid) == 0)
			return 1;
	return 0;
}

/* sticky: requests of side s not accounted for; with `known_only`, only those the capture announced (a `req`):
 * a request that began and ended while the capture was restarting is never seen by it (the new image starts at the
 * ring's head, shm/README.md), which is a restart's known blind spot, not a silent loss. */
static int unaccounted(side *s, int known_only)
{
	int n = 0;
	pthread_mutex_lock(&s->mu);
	for (unsigned i = 0; i < NREQ; i++) {
		char rid[32];
		snprintf(rid, sizeof rid, "ge-%u", i);
		n += !accounted(s, rid) && (!known_only || (s->req_seen >> i & 1));
	}
	pthread_mutex_unlock(&s->mu);
	return n;
}

static int wait_ends(side *sd, side *sh)
{
	uint64_t t0 = now_ms();
	for (;;) {
		int h, e1, e2;
		side_count(sd, &h, &e1);
		side_count(sh, &h, &e2);
		if ((g_scenario == SC_STICKY ? unaccounted(sd, 0) == 0 : e1 >= NREQ) && e2 >= NREQ)
			return 0;
		if (g_scenario == SC_STICKY && e2 >= NREQ && now_ms() - t0 > 5000 && unaccounted(sd, 1) == 0)
			return 0; /* what is left was never seen by the device capture: check_sticky reports it */
		CHECK(now_ms() - t0 < 60000, "records incomplete after 60 s: %d / %d of %d ends", e1, e2, NREQ);
		msleep(20);
	}
}

static void stop_capture(pid_t pid)
{
	if (pid <= 0)
		return;
	kill(pid, SIGTERM);
	for (int i = 0; i < 300; i++) {
		if (waitpid(pid, NULL, WNOHANG) == pid)
			return;
		msleep(10);
	}
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
}

/* ---- comparison -------------------------------------------------------------------------------------------- */

static int key_cmp(const void *x, const void *y)
{
	const arec *a = x, *b = y;
	int c = strcmp(a->rid, b->rid);
	if (c)
		return c;
	if (a->a.position != b->a.position)
		return a->a.position < b->a.position ? -1 : 1;
	if (a->a.layer_id != b->a.layer_id)
		return a->a.layer_id < b->a.layer_id ? -1 : 1;
	return (a->a.head_id > b->a.head_id) - (a->a.head_id < b->a.head_id);
}

/* Records of one request arrive in position order. Returns violations. */
static int order_violations(const side *s)
{
	int bad = 0;
	for (size_t i = 0; i < s->n; i++)
		for (size_t j = i + 1; j < s->n && j < i + 64; j++)
			if (strcmp(s->recs[i].rid, s->recs[j].rid) == 0) {
				bad += s->recs[j].a.position < s->recs[i].a.position;
				break;
			}
	return bad;
}

/* One record pair; returns 0, or 1 after printing the difference. *ties counts tolerated boundary swaps. */

static int compare_one(const arec *c, const arec *g, int *ties)
{
	const ax_rec_attn *a = &c->a, *b = &g->a;
	if (a->k != b->k || a->token_id != b->token_id || a->decode_step != b->decode_step || a->prefill != b->prefill ||
	    a->mode != b->mode) {
		fprintf(stderr, "  %s pos %lld layer %d head %d: k %u/%u token %lld/%lld step %lld/%lld\n", c->rid,
			(long long)a->position, a->layer_id, a->head_id, a->k, b->k, (long long)a->token_id,
			(long long)b->token_id, (long long)a->decode_step, (long long)b->decode_step);
		return 1;
	}
	if (g_exact && (a->logsumexp_all != b->logsumexp_all || memcmp(a->token_positions, b->token_positions,
			a->k * sizeof a->token_positions[0]) || memcmp(a->topk_logits, b->topk_logits, a->k * sizeof(float)))) {
		fprintf(stderr, "  %s pos %lld layer %d head %d: not bit-identical\n", c->rid, (long long)a->position,
			a->layer_id, a->head_id);
		return 1;
	}
	int bad = fabs(a->logsumexp_all - b->logsumexp_all) > TOL;
	for (uint32_t i = 0; i < a->k; i++) {
		bad |= !(fabsf(a->topk_logits[i] - b->topk_logits[i]) <= TOL);
		if (a->token_positions[i] == b->token_positions[i])
			continue;
		int found = 0;
		for (uint32_t j = 0; j < a->k; j++)
			found |= a->token_positions[j] == b->token_positions[i];
		if (found || fabsf(b->topk_logits[i] - a->topk_logits[a->k - 1]) <= TOL)
			(*ties)++;
		else
			bad = 1;
	}
	if (bad)
		fprintf(stderr, "  %s pos %lld layer %d head %d: cpu top1 %lld %.6f lse %.6f | cuda top1 %lld %.6f lse %.6f\n",
			c->rid, (long long)a->position, a->layer_id, a->head_id, (long long)a->token_positions[0],
			a->topk_logits[0], a->logsumexp_all, (long long)b->token_positions[0], b->topk_logits[0],
			b->logsumexp_all);
	return bad;
}

static int compare(side *cpu, side *cuda)
{
	int fails = 0, ties = 0;
	fprintf(stderr, "gpu_engine: %zu records (cpu) vs %zu (%s backend '%s'); gaps %d / %d\n", cpu->n, cuda->n,
		cuda->tag, cuda->backend, cpu->gaps, cuda->gaps);
	if (strcmp(cpu->backend, "cpu") != 0 || strcmp(cuda->backend, "cuda") != 0) {
		fprintf(stderr, "gpu_engine: hello backends '%s' / '%s', want cpu / cuda\n", cpu->backend, cuda->backend);
		fails++;
	}
	if (cpu->gaps || cuda->gaps) {
		fprintf(stderr, "gpu_engine: gaps: cpu '%s', cuda '%s'\n", cpu->last_gap, cuda->last_gap);
		fails++;
	}
	if (order_violations(cpu) || order_violations(cuda)) {
		fprintf(stderr, "gpu_engine: records out of position order\n");
		fails++;
	}
	if (cpu->n == 0 || cpu->n != cuda->n) {
		fprintf(stderr, "gpu_engine: record counts differ or are zero\n");
		fails++;
	}
	qsort(cpu->recs, cpu->n, sizeof *cpu->recs, key_cmp);
	qsort(cuda->recs, cuda->n, sizeof *cuda->recs, key_cmp);
	for (size_t i = 0; i < cpu->n && i < cuda->n && fails < 20; i++) {
		if (key_cmp(&cpu->recs[i], &cuda->recs[i]) != 0) {
			fprintf(stderr, "  record sets differ at %s pos %lld layer %d\n", cpu->recs[i].rid,
				(long long)cpu->recs[i].a.position, cpu->recs[i].a.layer_id);
			fails++;
			break;
		}
		fails += compare_one(&cpu->recs[i], &cuda->recs[i], &ties);
	}
	fprintf(stderr, "gpu_engine: %d mismatches, %d top-k boundary ties tolerated\n", fails, ties);
	return fails;
}

/* ---- scenarios ------------------------------------------------------------------------------------------------ */

/* Wait until both captures are done with every ended request, restart the engine, wait for both to re-attach. */
static int restart_between(engine *e, side *sd, side *sh)
{
	for (int i = 0; e->n_pend > 0; i++) {
		CHECK(i < 10000, "captures did not finish the first half within 10 s");
		recycle(e);
		msleep(1);
	}
	CHECK(engine_restart(e) == 0, "engine restart");
	fprintf(stderr, "gpu_engine: engine restarted after %u requests\n", e->ended);
	return wait_attached(e, sd, sh);
}

static int count_layer(const side *s, int32_t layer)
{
	int n = 0;
	for (size_t i = 0; i < s->n; i++)
		n += s->recs[i].a.layer_id == layer;
	return n;
}

/* recycle: the record sets differ with the timing, so no comparison: no wrong record, every loss a "recycled" gap,
 * and some (rows computed after the poison, which the held wake-ups make the common case). */
static int check_recycle(const side *cpu, const side *cuda)
{
	const side *sides[2] = {cpu, cuda};
	for (int i = 0; i < 2; i++) {
		const side *s = sides[i];
		fprintf(stderr, "gpu_engine: %s: %zu records, %d recycled gaps (%llu rows), %d other gaps, %d poisoned\n",
			s->tag, s->n, s->recycled_gaps, (unsigned long long)s->recycled_rows, s->gaps - s->recycled_gaps,
			s->poisoned);
		CHECK(s->poisoned == 0, "recycle: %s: %d records computed from recycled (poisoned) keys", s->tag,
		      s->poisoned);
		CHECK(s->gaps == s->recycled_gaps, "recycle: %s: other gaps (last: %s)", s->tag, s->last_gap);
		CHECK(s->recycled_rows > 0, "recycle: %s: no row reported as recycled", s->tag);
		CHECK(s->n > 0 && order_violations(s) == 0, "recycle: %s: no records, or out of order", s->tag);
	}
	return 0;
}

static int count_rid(const side *s, const char *rid)
{
	int n = 0;
	for (size_t i = 0; i < s->n; i++)
		n += strcmp(s->recs[i].rid, rid) == 0;
	return n;
}

/* sticky: each device record has an equal CPU twin, and no key comes twice. Sorts both sides. Returns the
 * number of wrong records. */
static int wrong_records(side *cpu, side *cuda)
{
	int bad = 0, ties = 0;
	qsort(cpu->recs, cpu->n, sizeof *cpu->recs, key_cmp);
	qsort(cuda->recs, cuda->n, sizeof *cuda->recs, key_cmp);
	for (size_t i = 0, j = 0; i < cuda->n && bad < 20; i++) {
		const arec *g = &cuda->recs[i];
		if (i > 0 && key_cmp(&cuda->recs[i - 1], g) == 0) {
			fprintf(stderr, "  %s pos %lld layer %d: sent twice\n", g->rid, (long long)g->a.position, g->a.layer_id);
			bad++;
			continue;
		}
		while (j < cpu->n && key_cmp(&cpu->recs[j], g) < 0)
			j++;
		if (j == cpu->n || key_cmp(&cpu->recs[j], g) != 0) {
			fprintf(stderr, "  %s pos %lld layer %d: no CPU twin\n", g->rid, (long long)g->a.position, g->a.layer_id);
			bad++;
			continue;
		}
		bad += compare_one(&cpu->recs[j], g, &ties);
	}
	return bad;
}

/* sticky: see the top. `alive`: the device capture's pid was still running before the harness stopped it. */
static int check_sticky(side *cpu, side *cuda, int alive)
{
	fprintf(stderr, "gpu_engine: sticky: device capture: %zu records (cpu %zu), %d hellos, %d gaps (last %s), %d "
		"requests reported lost, seq restarts %d; stats: cuda_sticky %llu, cuda_resets %llu, cuda_reset_failed "
		"%llu, cuda_reexecs %llu\n", cuda->n, cpu->n, cuda->hellos, cuda->gaps, cuda->last_gap, cuda->req_gaps,
		cuda->seq_restarts, (unsigned long long)cuda->cuda_sticky, (unsigned long long)cuda->cuda_resets,
		(unsigned long long)cuda->cuda_reset_failed, (unsigned long long)cuda->cuda_reexecs);
	CHECK(alive, "sticky: the device capture exited: it must recover, not die");
	int unseen = unaccounted(cuda, 0);
	CHECK(unaccounted(cuda, 1) == 0, "sticky: requests the device capture announced but neither ended nor reported");
	CHECK(unseen <= 2, "sticky: %d requests never seen by the device capture (began and ended while it restarted)",
	      unseen);
	if (unseen)
		fprintf(stderr, "gpu_engine: sticky: %d requests began and ended while the device capture restarted "
			"(never seen by it: the ring's head is where a new image starts)\n", unseen);
	CHECK(strcmp(cpu->backend, "cpu") == 0 && strcmp(cuda->backend, "cuda") == 0, "sticky: hello backends %s / %s",
	      cpu->backend, cuda->backend);
	CHECK(cpu->gaps == 0 && cpu->ends == NREQ && cpu->n > 0, "sticky: the CPU side is incomplete (%d gaps, %d ends)",
	      cpu->gaps, cpu->ends);
	int reexec = cuda->cuda_reexecs >= 1 && cuda->seq_restarts >= 1;
	int in_proc = cuda->cuda_reexecs == 0 && cuda->cuda_sticky >= 1 && cuda->cuda_resets > cuda->cuda_reset_failed;
	CHECK(reexec || in_proc, "sticky: no recovery seen (no re-exec, no in-process reset): was the fault injected?");
	CHECK(!g_exact || reexec, "sticky: the emulated device's resets never recover: the capture must re-execute");
	CHECK(!g_exact || cuda->cuda_reexecs == (getenv("AX_EMUL_OPEN_FAILS_IN_IMAGE") ? 2u : 1u),
	      "sticky: %llu re-execs, want 1 (2 with AX_EMUL_OPEN_FAILS_IN_IMAGE: a device unusable after the first)",
	      (unsigned long long)cuda->cuda_reexecs);
	fprintf(stderr, "gpu_engine: sticky: recovered by %s\n", reexec ? "re-executing itself (a fresh process image)"
									     : "a device reset in the same process");
	CHECK(cuda->hellos >= 2 && cuda->gaps > 0, "sticky: no fresh hello (%d) or no gap for the failed batch (%d)",
	      cuda->hellos, cuda->gaps);
	CHECK(cpu->poisoned == 0 && cuda->poisoned == 0, "sticky: records with poison logits");
	CHECK(order_violations(cpu) == 0 && order_violations(cuda) == 0, "sticky: records out of position order");
	int bad = wrong_records(cpu, cuda);
	CHECK(bad == 0, "sticky: %d wrong records on the device side", bad);
	char last[32];
	snprintf(last, sizeof last, "ge-%u", NREQ - 1);
	CHECK(count_rid(cpu, last) > 0 && count_rid(cuda, last) == count_rid(cpu, last),
	      "sticky: records did not resume: %s has %d records (cpu %d)", last, count_rid(cuda, last),
	      count_rid(cpu, last));
	fprintf(stderr, "gpu_engine: sticky: no wrong record, %s complete (%d records)\n", last, count_rid(cuda, last));
	return 0;
}

static int check_scenario(const side *cpu, const side *cuda)
{
	CHECK(cpu->poisoned == 0 && cuda->poisoned == 0, "records with poison logits");
	if (g_scenario == SC_REJECT) {
		CHECK(cuda->cuda_rejected == 1, "reject: the device capture's stats say cuda_rejected %lld, want 1",
		      (long long)cuda->cuda_rejected);
		CHECK(count_layer(cpu, 1) == 0 && count_layer(cuda, 1) == 0,
		      "reject: layer-1 records (%d cpu, %d cuda): the rejected layer was still wanted", count_layer(cpu, 1),
		      count_layer(cuda, 1));
	} else {
		CHECK(cuda->cuda_rejected == 0, "the device capture rejected %lld entries", (long long)cuda->cuda_rejected);
	}
	return 0;
}

/* ---- the recycling rule, in-process ----------------------------------------------------------------------------- */

/* One small segment (req_cap 2: the third request reuses the first one's entry) and a consumer attached to it. */
typedef struct rt {
	ax_export *ex;
	ax_shm *shm;
	uint32_t qd, qh, kp;
} rt;

static int rt_open(rt *t, const char *name)
{
	memset(t, 0, sizeof *t);
	ax_export_config c = seg_cfg(name);
	c.req_cap = 2, c.ring_cap = 64, c.arena_cap = 4096, c.data_size = 1 << 20;
	CHECK(ax_export_open(&t->ex, &c) == 0, "rule: export open");
	ax_shm_buffer q = desc(AX_BUF_Q_RING, -1, 16, HQ, D, AX_DTYPE_BF16), k = desc(AX_BUF_K_POOL, 0, 64, HKV, D,
										   AX_DTYPE_BF16);
	q.loc = AX_LOC_CUDA_IPC, q.device = 0, q.bytes = 16 * HQ * D * 2;
	k.loc = AX_LOC_HOST;
	CHECK(ax_export_add_device_buffer(t->ex, &q, &t->qd) == 0, "rule: device Q ring");
	q.loc = AX_LOC_HOST, q.device = -1, q.bytes = 0;
	CHECK(ax_export_add_host_buffer(t->ex, &q, NULL, &t->qh) == 0, "rule: host Q ring");
	CHECK(ax_export_add_host_buffer(t->ex, &k, NULL, &t->kp) == 0, "rule: K pool");
	CHECK(ax_shm_attach(&t->shm, name) == 0, "rule: attach");
	return 0;
}

static void rt_close(rt *t)
{
	ax_shm_detach(t->shm);
	ax_export_close(t->ex);
}

static uint64_t rt_begin(rt *t, const char *rid)
{
	int32_t prompt[2] = {1, 2};
	uint64_t id = 0;
	return ax_export_request_begin(t->ex, rid, prompt, 2, &id) == 0 ? id : 0;
}

/* Drain the ring as a capture would (descriptors taken, nothing computed). */
static void rt_take(rt *t)
{
	ax_shm_step st;
	while (ax_shm_next(t->shm, &st, NULL) != 0)
		;
}

/* Each case: the engine's actions, then what ax_shm_check_keys must say about request A's rows computed now. */
enum { RT_NO_STEPS, RT_END_NO_STEP, RT_END_STEP, RT_ACTIVE_STEPS, RT_KEEP_STEPS, RT_KEEP_FREED, RT_ENTRY_REUSED,
       RT_N };
static const struct { const char *name; int want; } rt_cases[RT_N] = {
	[RT_NO_STEPS] = {"no ax_export_step_start ever: nothing can be told (feature off)", 0},
	[RT_END_NO_STEP] = {"freed at END, no step since: the normal last rows", 0},
	[RT_END_STEP] = {"freed at END, a step started since", -ESTALE},
	[RT_ACTIVE_STEPS] = {"still active, steps started", 0},
	[RT_KEEP_STEPS] = {"ended with _keep, steps started, not freed", 0},
	[RT_KEEP_FREED] = {"ended with _keep, then freed", -ESTALE},
	[RT_ENTRY_REUSED] = {"request entry reused by a later request", -ESTALE},
};

static int rt_case(int c)
{
	char name[AX_SHM_NAME_MAX];
	snprintf(name, sizeof name, "/attnx.gputest.%d.rule", (int)getpid());
	rt t;
	if (rt_open(&t, name) < 0)
		return -1;
	int rc = -1;
	uint64_t a = rt_begin(&t, "rule-a"), done;
	CHECK(a != 0, "rule: begin");
	if (c != RT_NO_STEPS)
		ax_export_step_start(t.ex);
	switch (c) {
	case RT_NO_STEPS:
		ax_export_request_end(t.ex, a, AX_END_STOP);
		break;
	case RT_END_NO_STEP:
		ax_export_request_end(t.ex, a, AX_END_STOP);
		break;
	case RT_END_STEP:
		ax_export_request_end(t.ex, a, AX_END_STOP);
		ax_export_step_start(t.ex);
		break;
	case RT_ACTIVE_STEPS:
		ax_export_step_start(t.ex);
		ax_export_step_start(t.ex);
		break;
	case RT_KEEP_STEPS:
		ax_export_request_end_keep(t.ex, a, AX_END_STOP, &done);
		ax_export_step_start(t.ex);
		break;
	case RT_KEEP_FREED:
		ax_export_request_end_keep(t.ex, a, AX_END_STOP, &done);
		if (ax_export_request_freed(t.ex, a) != 0)
			goto out;
		break;
	case RT_ENTRY_REUSED:
		ax_export_request_end_keep(t.ex, a, AX_END_STOP, &done);
		ax_export_request_end(t.ex, rt_begin(&t, "rule-b"), AX_END_STOP);
		if (rt_begin(&t, "rule-c") == 0 || ax_export_request_freed(t.ex, a) != -ENOENT)
			goto out; /* the entry is rule-c's now: a late free has nothing to mark */
		break;
	}
	rt_take(&t);
	int got = ax_shm_check_keys(t.shm, a);
	uint64_t counted = ax_shm_recycled(t.shm);
	if (got == rt_cases[c].want && counted == (got != 0))
		rc = 0;
	else
		fprintf(stderr, "gpu_engine: rule: %s: ax_shm_check_keys %d (want %d), recycled stat %llu\n",
			rt_cases[c].name, got, rt_cases[c].want, (unsigned long long)counted);
out:
	rt_close(&t);
	return rc;
}

/* Deferral (consumer_done), q_reserve of a CUDA Q ring, error paths. */
static int rt_progress(void)
{
	char name[AX_SHM_NAME_MAX];
	snprintf(name, sizeof name, "/attnx.gputest.%d.rule", (int)getpid());
	rt t;
	if (rt_open(&t, name) < 0)
		return -1;
	int rc = -1;
	uint64_t a = rt_begin(&t, "rule-a"), done = 0, row;
	void *p = &p;
	ax_export_step_start(t.ex);
	CHECK(ax_export_request_end_keep(t.ex, a, AX_END_STOP, &done) == 0 && done == 2, "rule: end_keep (done %llu)",
	      (unsigned long long)done);
	if (ax_export_consumer_done(t.ex, done) != 0) /* a live capture that has not said anything yet */
		goto out;
	rt_take(&t);
	ax_shm_complete(t.shm, 1); /* BEGIN processed, END not yet */
	if (ax_export_consumer_done(t.ex, done) != 0)
		goto out;
	ax_shm_complete(t.shm, 1000); /* clamped to the descriptors taken */
	if (ax_export_consumer_done(t.ex, done) != 1 || ax_shm_hdr(t.shm)->consumer_done != 2)
		goto out;
	if (ax_export_request_freed(t.ex, a) != 0 || ax_export_request_freed(t.ex, a) != -ENOENT ||
	    ax_export_request_freed(t.ex, 0) != -EINVAL || ax_export_request_freed(NULL, a) != -EINVAL ||
	    ax_export_request_end_keep(t.ex, a, AX_END_STOP, NULL) != -ENOENT ||
	    ax_shm_check_keys(NULL, a) != -EINVAL ||
	    ax_shm_check_keys(t.shm, 0) != -EINVAL || ax_shm_check_keys(t.shm, (7ull << 16) | 9) != -ESTALE)
		goto out;
	/* A CUDA Q ring: row numbers, no pointer; the host ring after it continues from the same q_head. */
	if (ax_export_q_reserve(t.ex, t.qd, 10, &row, &p) != 0 || p != NULL || row != 0 ||
	    ax_export_q_reserve(t.ex, t.qd, 10, &row, &p) != 0 || row != 16 || /* never wraps */
	    ax_export_q_reserve(t.ex, t.qh, 1, &row, &p) != 0 || p == NULL || row != 26 ||
	    ax_export_q_reserve(t.ex, t.qd, 0, &row, &p) != -EINVAL || p != NULL ||
	    ax_export_q_reserve(t.ex, t.qd, 17, &row, NULL) != -EINVAL ||
	    ax_export_q_reserve(t.ex, t.kp, 1, &row, NULL) != -EINVAL ||
	    ax_export_q_reserve(t.ex, 99, 1, &row, NULL) != -EINVAL)
		goto out;
	ax_shm_detach(t.shm);
	t.shm = NULL;
	if (ax_export_consumer_done(t.ex, 1u << 30) != 1) /* nobody attached: nothing to wait for */
		goto out;
	ax_export_step_start(NULL);
	rc = 0;
out:
	if (rc)
		fprintf(stderr, "gpu_engine: rule: deferral / q_reserve / error-path checks failed\n");
	rt_close(&t);
	return rc;
}

static int rule_test(void)
{
	int fails = 0;
	for (int c = 0; c < RT_N; c++)
		fails += rt_case(c) != 0;
	fails += rt_progress() != 0;
	fprintf(stderr, "gpu_engine: recycling rule: %d of %d cases failed\n", fails, RT_N + 1);
	return fails ? -1 : 0;
}

/* ---- main ---------------------------------------------------------------------------------------------------- */

static int run(const ge_dev_ops *dev, const char *bin_d, const char *bin_h, const char *mode)
{
	engine e;
	side sd, sh;
	int rc = -1, alive = 0;
	if (engine_open(&e, dev) < 0)
		return -1;
	if (side_open(&sd, "cuda") < 0 || side_open(&sh, "cpu") < 0)
		goto out;
	e.sides[0] = &sd, e.sides[1] = &sh;
	sd.pid = spawn_capture(bin_d, e.name_d, "cuda", mode, &sd);
	sh.pid = spawn_capture(bin_h, e.name_h, "cpu", mode, &sh);
	if (wait_attached(&e, &sd, &sh) < 0 || run_requests(&e, g_scenario == SC_RESTART ? NREQ / 2 : NREQ) < 0)
		goto stop;
	if (g_scenario == SC_RESTART && (restart_between(&e, &sd, &sh) < 0 || run_requests(&e, NREQ) < 0))
		goto stop;
	if (wait_ends(&sd, &sh) < 0)
		goto stop;
	if (e.drops && g_scenario == SC_STICKY) { /* the restarting capture fell behind: its gaps say so */
		fprintf(stderr, "gpu_engine: %llu steps dropped (ring full) while the device capture recovered\n",
			(unsigned long long)e.drops);
	} else if (e.drops) {
		fprintf(stderr, "gpu_engine: %llu steps dropped (ring full): the comparison would be meaningless\n",
			(unsigned long long)e.drops);
		goto stop;
	}
	msleep(50);
	alive = waitpid(sd.pid, NULL, WNOHANG) == 0;
	rc = 0;
stop:
	stop_capture(sd.pid);
	stop_capture(sh.pid);
	msleep(100); /* the exit stats record */
	side_stop(&sd); /* the collectors are done: what follows reads their results */
	side_stop(&sh);
	if (rc == 0 && g_scenario == SC_RECYCLE)
		rc = check_recycle(&sh, &sd);
	else if (rc == 0 && g_scenario == SC_STICKY)
		rc = check_sticky(&sh, &sd, alive);
	else if (rc == 0)
		rc = compare(&sh, &sd) == 0 && check_scenario(&sh, &sd) == 0 ? 0 : -1;
	side_close(&sd);
	side_close(&sh);
out:
	engine_close(&e);
	engine_free(&e);
	dev->release(dev->ctx);
	return rc;
}

int ge_main(int argc, char **argv, const ge_dev_ops *dev)
{
	g_scenario = -1;
	for (int i = 0; i < SC_N && argc > 4; i++)
		if (strcmp(argv[4], sc_names[i]) == 0)
			g_scenario = i;
	if (argc < 4 || ax_mode_parse(argv[3]) < 0 || (argc > 4 && g_scenario < 0)) {
		fprintf(stderr, "usage: %s DEV_CAPTURE HOST_CAPTURE mean_logit|mean_prob|heads [plain|auto|reject|restart|vmm|"
			"recycle|sticky [SEED]]\n", argv[0]);
		return 2;
	}
	if (g_scenario < 0)
		g_scenario = SC_PLAIN;
	rng_state = argc > 5 ? strtoull(argv[5], NULL, 10) : 0x5eed;
	g_exact = strcmp(dev->name, "emul") == 0;
	signal(SIGPIPE, SIG_IGN);
	fprintf(stderr, "gpu_engine: device '%s', mode %s, scenario %s, %d requests, %d layers, H_q %d, H_kv %d, D %d\n",
		dev->name, argv[3], sc_names[g_scenario], NREQ, L, HQ, HKV, D);
	int rc = rule_test();
	if (rc == 0)
		rc = run(dev, argv[1], argv[2], argv[3]);
	fprintf(stderr, "gpu_engine: %s\n", rc == 0 ? "PASS" : "FAIL");
	return rc == 0 ? 0 : 1;
}
