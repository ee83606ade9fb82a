/*
 * attn_cuda_fast_emu.h — a small SIMT emulator that lets the CPU run attn_cuda_fast.cu's kernel code unchanged
 * (compiled as C++ with AXF_EMU defined): test code only (attn_cuda_fast_emu_test.cc), fails fast.
 *
 * How it works. One CTA at a time; its 256 threads are cooperative fibers (ucontext) on one OS thread, switched
 * only where a thread must wait: warp collectives (__shfl*_sync, __ballot_sync, __any_sync, __syncwarp and
 * mma.sync) are rendezvous of the warp's 32 lanes (values double-buffered by generation, so a lane that runs ahead
 * into the next collective cannot overwrite what a slow lane has yet to read; the call site's line is recorded
 * and must be the same for all 32 lanes: divergent collectives fail), __syncthreads a rendezvous of the CTA,
 * mbarrier waits spin with a yield. mbarriers follow PTX: an arrival count per phase and a transaction count;
 * try_wait.parity(P) succeeds once the phase of parity P has completed. cp.async.bulk lands later, at a random
 * scheduling point (its destination holds garbage meanwhile; overlapping copies in flight fail), and then
 * completes its bytes on the mbarrier; a CTA that ends with copies in flight fails. mma.sync m16n8k16 (bf16 / f16 → f32) gathers the 32 lanes' fragments,
 * multiplies them as the PTX fragment layouts say, and hands each lane its accumulators. A round of the
 * scheduler in which no thread made progress is a deadlock: the run fails.
 *
 * Not emulated: real concurrency (races, memory ordering, the async proxy), timing, shared-memory bank
 * conflicts and capacity beyond the buffer given. Those need a GPU (compute-sanitizer racecheck in the GPU test).
 */
#ifndef ATTNX_CAPTURE_ATTN_CUDA_FAST_EMU_H
#define ATTNX_CAPTURE_ATTN_CUDA_FAST_EMU_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <ucontext.h>

#include <map>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(a, b)
#define __grid_constant__

struct uint4 {
	uint32_t x, y, z, w;
};
static inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w)
{
	uint4 v = {x, y, z, w};
	return v;
}
struct float4 {
	float x, y, z, w;
};

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline uint32_t min(uint32_t a, uint32_t b) { return a < b ? a : b; }
#define __expf(x_) expf(x_)
static inline int __popc(uint32_t x) { return __builtin_popcount(x); }
static inline int __ffs(uint32_t x) { return __builtin_ffs((int)x); }
static inline void __threadfence(void) {}
static inline void __threadfence_system(void) {}
/* Programmatic dependent launch: launches run one after the other here, so waiting is a no-op. */
static inline void griddep_wait(void) {}
static inline void griddep_launch(void) {}
static inline void st_release_sys(uint32_t *p, uint32_t v) { *p = v; }
/* The global timer: a counter here (only its order means something). */
static inline unsigned long long gtime(void) { static unsigned long long t; return ++t; }
static inline unsigned long long atomicMin(unsigned long long *p, unsigned long long v)
{
	unsigned long long o = *p;
	*p = v < o ? v : o;
	return o;
}
static inline unsigned long long atomicMax(unsigned long long *p, unsigned long long v)
{
	unsigned long long o = *p;
	*p = v > o ? v : o;
	return o;
}
static inline float __ldcg(const float *p) { return *p; }
static inline int __ldcg(const int *p) { return *p; }
static inline uint32_t atomicOr(uint32_t *p, uint32_t v) { uint32_t o = *p; *p = o | v; return o; }
static inline uint32_t atomicAdd(uint32_t *p, uint32_t v) { uint32_t o = *p; *p = o + v; return o; }

#define EMU_FAIL(...)                                                                                        \
	do {                                                                                                 \
		fprintf(stderr, "emu: " __VA_ARGS__);                                                        \
		fprintf(stderr, "\n");                                                                       \
		abort();                                                                                     \
	} while (0)

/* A 16-byte vector load: misaligned, the GPU faults. */
static inline float4 __ldcg(const float4 *p)
{
	if ((uintptr_t)p % 16)
		EMU_FAIL("misaligned 16-byte load at %p", (const void *)p);
	return *p;
}

enum { EMU_NT = 256, EMU_STACK = 256 * 1024 };

struct emu_dim {
	uint32_t x;
};

struct emu_warp {
	uint32_t arrived, gen;
	int line[2];                /* call site of the collective of generation parity p */
	uint64_t val[2][32];
	uint32_t a[2][32][4], b[2][32][2];
	float c[2][32][4], d[2][32][4];
	uint32_t d_gen[2];          /* generation (+1) whose d is computed */
};

struct emu_bar {
	uint32_t count, pending, phase; /* phase: number of completed phases */
	int64_t tx;
};

struct emu_copy {
	void *dst;
	const void *src;
	uint32_t bytes;
	uint64_t *mb;
};

struct emu_state {
	ucontext_t sched, fib[EMU_NT];  /* used once per fiber to start it; switches use _setjmp/_longjmp */
	jmp_buf sched_jb, fib_jb[EMU_NT];
	int started[EMU_NT];
	char *stacks;
	int cur, done[EMU_NT], waiting;
	uint64_t epoch;             /* bumped by every state change a waiter may be waiting for */
	emu_warp warp[EMU_NT / 32];
	uint32_t cta_arrived, cta_gen;
	std::map<const void *, emu_bar> bars;
	std::vector<emu_copy> inflight; /* bulk copies issued, not yet landed */
	unsigned char *smem;
	size_t smem_bytes;
	uint32_t block;
	void (*body)(void *);
	void *arg;
};

static emu_state *g_emu;

static inline emu_dim emu_tid(void) { emu_dim d = {(uint32_t)g_emu->cur}; return d; }
static inline emu_dim emu_bid(void) { emu_dim d = {g_emu->block}; return d; }
#define threadIdx (emu_tid())
#define blockIdx (emu_bid())

/* Back to the scheduler (swapcontext would make two signal-mask system calls per switch). */
static inline void emu_yield(void)
{
	if (!_setjmp(g_emu->fib_jb[g_emu->cur]))
		_longjmp(g_emu->sched_jb, 1);
}

/* Wait (yielding) until cond() holds. */
template <typename F> static inline void emu_wait(F cond)
{
	while (!cond()) {
		g_emu->waiting = 1;
		emu_yield();
	}
}

/* Warp rendezvous: store this lane's contribution (by generation parity), wait for all 32, return the parity. */
template <typename F> static inline int emu_collective(int line, F put)
{
	emu_warp &w = g_emu->warp[g_emu->cur / 32];
	const int lane = g_emu->cur & 31;
	const uint32_t g = w.gen;
	const int p = (int)(g & 1);
	if (w.arrived == 0)
		w.line[p] = line;
	else if (w.line[p] != line)
		EMU_FAIL("divergent warp collective: lane %d at line %d, others at line %d", lane, line, w.line[p]);
	put(p, lane);
	if (++w.arrived == 32) {
		w.arrived = 0;
		w.gen++;
		g_emu->epoch++;
	} else {
		emu_wait([&] { return w.gen != g; });
	}
	return p;
}

template <typename T> static inline uint64_t emu_bits(T v)
{
	uint64_t u = 0;
	memcpy(&u, &v, sizeof v);
	return u;
}
template <typename T> static inline T emu_from(uint64_t u)
{
	T v;
	memcpy(&v, &u, sizeof v);
	return v;
}

template <typename T> static inline T emu_shfl(T v, int src, int line)
{
	int p = emu_collective(line, [&](int q, int lane) { g_emu->warp[g_emu->cur / 32].val[q][lane] = emu_bits(v); });
	return emu_from<T>(g_emu->warp[g_emu->cur / 32].val[p][src & 31]);
}
static inline int emu_lane(void) { return g_emu->cur & 31; }
#define __shfl_sync(mask_, val_, src_) emu_shfl((val_), (int)(src_), __LINE__)
#define __shfl_xor_sync(mask_, val_, xor_) emu_shfl((val_), emu_lane() ^ (int)(xor_), __LINE__)
#define __shfl_up_sync(mask_, val_, d_)                                                                      \
	emu_shfl((val_), emu_lane() >= (int)(d_) ? emu_lane() - (int)(d_) : emu_lane(), __LINE__)

static inline uint32_t emu_ballot(bool pred, int line)
{
	int p = emu_collective(line, [&](int q, int lane) { g_emu->warp[g_emu->cur / 32].val[q][lane] = pred; });
	uint32_t m = 0;
	for (int l = 0; l < 32; l++)
		m |= (g_emu->warp[g_emu->cur / 32].val[p][l] ? 1u : 0u) << l;
	return m;
}
#define __ballot_sync(mask_, pred_) emu_ballot((pred_), __LINE__)
#define __any_sync(mask_, pred_) (emu_ballot((pred_), __LINE__) != 0)
#define __syncwarp() ((void)emu_ballot(false, __LINE__))

static inline void emu_syncthreads(void)
{
	const uint32_t g = g_emu->cta_gen;
	if (++g_emu->cta_arrived == EMU_NT) {
		g_emu->cta_arrived = 0;
		g_emu->cta_gen++;
		g_emu->epoch++;
	} else {
		emu_wait([&] { return g_emu->cta_gen != g; });
	}
}
#define __syncthreads() emu_syncthreads()

/* ---- mbarriers and bulk copies ---------------------------------------------------------------------------------- */

static inline emu_bar &emu_bar_of(const uint64_t *mb)
{
	auto it = g_emu->bars.find(mb);
	if (it == g_emu->bars.end())
		EMU_FAIL("mbarrier %p used before init", (const void *)mb);
	return it->second;
}

static inline void mbar_init(uint64_t *mb, int count)
{
	emu_bar b = {(uint32_t)count, (uint32_t)count, 0, 0};
	g_emu->bars[mb] = b;
}
static inline void mbar_init_fence(void) {}

static inline void emu_bar_check(emu_bar &b)
{
	if (b.pending == 0 && b.tx == 0) {
		b.phase++;
		b.pending = b.count;
		g_emu->epoch++;
	}
}

static inline void mbar_arrive(uint64_t *mb)
{
	emu_bar &b = emu_bar_of(mb);
	if (b.pending == 0)
		EMU_FAIL("mbarrier %p: more arrivals than its count", (const void *)mb);
	b.pending--;
	emu_bar_check(b);
}

static inline void mbar_arrive_tx(uint64_t *mb, uint32_t bytes)
{
	emu_bar &b = emu_bar_of(mb);
	b.tx += bytes;
	if (b.pending == 0)
		EMU_FAIL("mbarrier %p: more arrivals than its count", (const void *)mb);
	b.pending--;
	emu_bar_check(b);
}

/* try_wait.parity(P) succeeds when the phase of parity P has completed: the current phase's parity differs. */
static inline void mbar_wait(uint64_t *mb, uint32_t parity)
{
	emu_wait([&] { return (emu_bar_of(mb).phase & 1) != (parity & 1); });
}

/* A bulk copy lands later, at a point the scheduler picks; until then its destination holds garbage, so a read
 * that does not wait for the copy's mbarrier sees wrong data. */
static inline void bulk_g2s(void *dst, const void *src, uint32_t bytes, uint64_t *mb)
{
	unsigned char *d = (unsigned char *)dst;
	if ((uintptr_t)dst % 16 || (uintptr_t)src % 16 || bytes % 16)
		EMU_FAIL("bulk copy not 16-byte aligned: dst %p src %p bytes %u", dst, src, bytes);
	if (d < g_emu->smem || d + bytes > g_emu->smem + g_emu->smem_bytes)
		EMU_FAIL("bulk copy outside shared memory");
	for (const emu_copy &c : g_emu->inflight)
		if (d < (unsigned char *)c.dst + c.bytes && (unsigned char *)c.dst < d + bytes)
			EMU_FAIL("bulk copy into a buffer another copy is still filling");
	memset(dst, 0x5a, bytes);
	emu_bar_of(mb);
	emu_copy c = {dst, src, bytes, mb};
	g_emu->inflight.push_back(c);
}

static inline void emu_land(size_t i)
{
	emu_copy c = g_emu->inflight[i];
	g_emu->inflight.erase(g_emu->inflight.begin() + (long)i);
	memcpy(c.dst, c.src, c.bytes);
	emu_bar &b = emu_bar_of(c.mb);
	b.tx -= c.bytes;
	if (b.tx < 0)
		EMU_FAIL("mbarrier %p: more bytes completed than expected", (const void *)c.mb);
	emu_bar_check(b);
}

/* ---- mma.sync m16n8k16, row.col, f32 accumulators ---------------------------------------------------------------- */

static inline float emu_half(uint16_t h, int f16)
{
	if (!f16) {
		uint32_t u = (uint32_t)h << 16;
		float f;
		memcpy(&f, &u, 4);
		return f;
	}
	uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
	float f;
	if (e == 0x1f)
		return (m ? NAN : INFINITY) * (s ? -1.f : 1.f);
	if (e == 0)
		f = ldexpf((float)m, -24);
	else
		f = ldexpf((float)(m | 0x400), (int)e - 25);
	return s ? -f : f;
}

/* A[m][k], B[k][n] from the fragments of the PTX ISA's m16n8k16 layouts (group g = lane / 4, t = lane % 4). */
template <int F16> static inline void emu_mma_all(emu_warp &w, int p)
{
	float A[16][16], B[16][8];
	for (int l = 0; l < 32; l++) {
		const int g = l >> 2, t = l & 3;
		for (int e = 0; e < 2; e++) {
			A[g][2 * t + e] = emu_half((uint16_t)(w.a[p][l][0] >> (16 * e)), F16);
			A[g + 8][2 * t + e] = emu_half((uint16_t)(w.a[p][l][1] >> (16 * e)), F16);
			A[g][2 * t + 8 + e] = emu_half((uint16_t)(w.a[p][l][2] >> (16 * e)), F16);
			A[g + 8][2 * t + 8 + e] = emu_half((uint16_t)(w.a[p][l][3] >> (16 * e)), F16);
			B[2 * t + e][g] = emu_half((uint16_t)(w.b[p][l][0] >> (16 * e)), F16);
			B[2 * t + 8 + e][g] = emu_half((uint16_t)(w.b[p][l][1] >> (16 * e)), F16);
		}
	}
	for (int l = 0; l < 32; l++) {
		const int g = l >> 2, t = l & 3;
		const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
		for (int i = 0; i < 4; i++) {
			float acc = w.c[p][l][i];
			for (int k = 0; k < 16; k++)
				acc += A[rows[i]][k] * B[k][cols[i]];
			w.d[p][l][i] = acc;
		}
	}
}

/* The first lane to run after the rendezvous computes the warp's product for everyone (a lane can run at most
 * one collective ahead, so generation parity p's slots stay until every lane has read them). */
template <int F16>
static inline void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
			    uint32_t b1)
{
	emu_warp &w = g_emu->warp[g_emu->cur / 32];
	const uint32_t gen = w.gen;
	int p = emu_collective(__LINE__, [&](int q, int lane) {
		w.a[q][lane][0] = a0, w.a[q][lane][1] = a1, w.a[q][lane][2] = a2, w.a[q][lane][3] = a3;
		w.b[q][lane][0] = b0, w.b[q][lane][1] = b1;
		memcpy(w.c[q][lane], c, sizeof c);
	});
	if (w.d_gen[p] != gen + 1) {
		emu_mma_all<F16>(w, p);
		w.d_gen[p] = gen + 1;
	}
	memcpy(c, w.d[p][g_emu->cur & 31], sizeof c);
}

/* ---- running a launch ----------------------------------------------------------------------------------------------- */

static void emu_fiber(void)
{
	g_emu->body(g_emu->arg);
	g_emu->done[g_emu->cur] = 1;
	g_emu->epoch++;
	_longjmp(g_emu->sched_jb, 1);
}

/* Threads run in a fresh random order every scheduler round (seeded by emu_seed), so runs explore different
 * interleavings of the warps; a test repeats one by its seed. */
static uint64_t emu_seed = 0x9e3779b97f4a7c15ull;

static uint64_t emu_rand(void)
{
	emu_seed ^= emu_seed << 13, emu_seed ^= emu_seed >> 7, emu_seed ^= emu_seed << 17;
	return emu_seed;
}

static void emu_shuffle(int *order)
{
	for (int i = EMU_NT - 1; i > 0; i--) {
		emu_seed ^= emu_seed << 13, emu_seed ^= emu_seed >> 7, emu_seed ^= emu_seed << 17;
		int j = (int)(emu_seed % (uint64_t)(i + 1)), x = order[i];
		order[i] = order[j], order[j] = x;
	}
}

/* Run thread i until it yields or ends (no locals live across the jump back). */
static __attribute__((noinline)) void emu_resume(emu_state *s, int i)
{
	if (_setjmp(s->sched_jb))
		return;
	if (!s->started[i]) {
		s->started[i] = 1;
		swapcontext(&s->sched, &s->fib[i]);
	} else {
		_longjmp(s->fib_jb[i], 1);
	}
}

/* The order emu_launch runs a launch's CTAs in (a GPU promises none): 0 by index, 1 backwards, 2 at random. */
static int emu_cta_order;

/* Run body(arg) as every thread of CTAs 0 .. ctas-1, one CTA after the other (in emu_cta_order's order), with
 * smem_bytes of shared memory. */
static void emu_launch(uint32_t ctas, size_t smem_bytes, void (*body)(void *), void *arg)
{
	emu_state *s = new emu_state();
	g_emu = s;
	s->stacks = (char *)malloc((size_t)EMU_NT * EMU_STACK);
	s->smem = (unsigned char *)aligned_alloc(128, (smem_bytes + 127) / 128 * 128);
	if (!s->stacks || !s->smem)
		EMU_FAIL("out of memory");
	s->smem_bytes = smem_bytes;
	int order[EMU_NT];
	for (int i = 0; i < EMU_NT; i++)
		order[i] = i;
	s->body = body;
	s->arg = arg;
	uint32_t *ord = (uint32_t *)malloc((ctas ? ctas : 1) * sizeof *ord);
	if (!ord)
		EMU_FAIL("out of memory");
	for (uint32_t b = 0; b < ctas; b++)
		ord[b] = emu_cta_order == 1 ? ctas - 1 - b : b;
	for (uint32_t b = ctas; emu_cta_order == 2 && b > 1; b--) {
		const uint32_t j = (uint32_t)(emu_rand() % b), x = ord[b - 1];
		ord[b - 1] = ord[j], ord[j] = x;
	}
	for (uint32_t bi = 0; bi < ctas; bi++) {
		const uint32_t b = ord[bi];
		s->block = b;
		s->bars.clear();
		s->inflight.clear();
		memset(s->warp, 0, sizeof s->warp);
		memset(s->done, 0, sizeof s->done);
		memset(s->started, 0, sizeof s->started);
		/* garbage, as on a GPU: every other CTA NaN in every float type (bf16, f16, f32 all ones), so a read of
		 * a ring row that was never fetched shows as a flagged job */
		memset(s->smem, (bi & 1) ? 0xa5 : 0xff, smem_bytes);
		s->cta_arrived = 0;
		for (int i = 0; i < EMU_NT; i++) {
			getcontext(&s->fib[i]);
			s->fib[i].uc_stack.ss_sp = s->stacks + (size_t)i * EMU_STACK;
			s->fib[i].uc_stack.ss_size = EMU_STACK;
			s->fib[i].uc_link = NULL;
			makecontext(&s->fib[i], emu_fiber, 0);
		}
		for (;;) {
			int alive = 0;
			uint64_t e0 = s->epoch;
			int all_waiting = 1;
			emu_shuffle(order);
			for (int k = 0; k < EMU_NT; k++) {
				const int i = order[k];
				if (s->done[i])
					continue;
				alive++;
				s->cur = i;
				s->waiting = 0;
				emu_resume(s, i);
				if (!s->inflight.empty() && emu_rand() % 4 == 0) /* a copy lands now and then */
					emu_land((size_t)(emu_rand() % s->inflight.size()));
				all_waiting &= s->waiting && !s->done[i];
			}
			if (!alive) {
				if (!s->inflight.empty())
					EMU_FAIL("CTA %u ended with %zu bulk copies in flight", b, s->inflight.size());
				break;
			}
			if (all_waiting && s->epoch == e0) {
				if (s->inflight.empty())
					EMU_FAIL("deadlock in CTA %u: every live thread waits and nothing changed", b);
				emu_land(0); /* only a copy can make progress */
			}
		}
	}
	free(ord);
	free(s->stacks);
	free(s->smem);
	delete s;
	g_emu = NULL;
}

#define AXF_DYN_SMEM(name) unsigned char *name = g_emu->smem

#endif
