/*
 * attn_cuda_fast.cu — the CUDA backend's fast path (attn_cuda_fast.h): the kernel lab's v9 design
 * (capture/dev/topk_attn.cu: v8's decoupled ring and shared-memory merge, ring of 3, 2 CTAs per SM) ported to
 * the production contract: run-time H_q / H_kv (H_kv ≤ 8, group ≤ 8), bf16 or f16, i32 or i64 index rows, a
 * window, many requests of any mix of mean_logit / heads / mean_prob in one call, every index value checked
 * before its row is fetched, NaN/inf reported, 64-bit positions, results written as ax_attn_result rows.
 *
 * How a CTA works (one split of one pass-job, 8 warps). Lanes 0..15 of warp 0 are the producer (heads pass-jobs
 * with lists: of warp st mod 8 for stage st, session 6): for each stage of AXF_TS = 16 keys, lane r reads the
 * index value of key r, checks it against n_slots (outside: the job is flagged AXF_F_RANGE and the copy reads
 * slot 0 instead, so nothing outside the pool is ever read), and issues one cp.async.bulk of the whole key row
 * (H_kv·128 elements) into the stage's buffer, completing on the stage's `full` mbarrier. AXF_NS stages ring; a
 * buffer is refilled only after its `empty` mbarrier has collected one arrival per thread (each thread releases
 * its own reads of the stage: an arrive releases only the arriving thread's accesses; no CTA barrier and no proxy
 * fence in the loop: CUTLASS's TMA pipeline discipline). Warp w
 * (w < H_kv) multiplies KV head w of the 16 staged rows by its group's G ≤ 8 query rows with mma.sync m16n8k16
 * (keys as A, 16 × 16 per step; Q as B, kept in registers, column c = query head w·G + c); the products are
 * exact and accumulate in f32, the scale is applied after. heads (and mean_prob's logsumexp pass): each warp
 * keeps warp-wide top-k lists (one per query head it owns) and per-lane online logsumexps; mean modes: each
 * warp writes its group's per-key partial (Σ s_hj, or Σ exp(s_hj − lse_h)) to shared memory and arrives on the
 * stage's `redfull` mbarrier; warp 7 sums the 8 partials per key and feeds one list. At the end each CTA writes
 * its partial rows; the last CTA of the pass-job (atomic ticket) merges them exactly (logsumexp over splits;
 * top-k bounded by the better of the best k-th of any split and the k-th best of the split heads, survivors
 * sorted by bitonic networks) into the result rows. Ties go to the lower position everywhere.
 *
 * Errors: Q elements are checked (NaN/inf: AXF_F_DOM); every score of heads mode and the per-key sums of the
 * mean modes are checked (a NaN or inf in a visible key makes every score of its KV head non-finite: x·0 is NaN
 * for x inf). -ERANGE wins over -EDOM (attn_cuda_fast.h's finish). A job whose flag is set has undefined rows.
 *
 * What has run where: the session-2 code ran on an H100 and an H200 (capture/dev/RESULTS.md, runs 5b and 6:
 * validated against float64 and the generic path, sanitizers clean). The session-3 changes (planner knobs, the
 * separate heads merge kernel, split flag words, results written into mapped pinned memory, one-pass-job
 * launches in the __grid_constant__ parameter, tickets zeroed once) ran on an H100 in runs 7 and 8 (RESULTS.md:
 * 150/150 against float64 and the generic path, racecheck clean after da7a9e8). Session 4's first changes (the row
 * frame written while the kernels run, the completion word (spin), programmatic dependent launch (pdl), the trace,
 * the CTA-wide merge, the index/Q loads before the mbarrier set-up) ran on an H200 in runs 9a/9b (184/184, the three
 * sanitizers clean). The rest of session 4 (the row-per-warp merge (merge_warp), the one-fence ticket, the flags on
 * warp 1, the heads loop's list skipping, the host thread pool (threads), the defaults pdl 1 / heads-list splits
 * ≥ 32) ran on an H200 in run 10 (197/197, memcheck and racecheck clean). Session 5 (run 12, a bisection on one
 * H200) found that session 4's dynamic splits (d949028: each stage's first key through shared memory, a loop of
 * unknown length) made the static heads loop ~9% slower (1M heads 622 → 680 µs) and that merging mean_prob's
 * logsumexp rows a warp at a time (7923dad) made 128K mean_prob ~12 µs slower; both were removed (dynamic splits
 * were slower wherever they acted in run 10). Heads pass-jobs with top-k ≤ 32 then got instances of their own
 * (KB 1: lists of ≤ 32 entries, 119 instead of 126 registers with 4 lists). Session 5's final run (run 13, H200,
 * d41752a): 179/179 against float64 and the generic path, memcheck, racecheck and synccheck clean. Session 6
 * (RESULTS.md runs 19-26): the heads loop's leaner per-stage epilogue (one non-finite check, lse_add2, a ≥
 * prefilter), the rotating producer of heads pass-jobs with lists, their lists started from one sort of the first
 * 32 keys, and the host merge of a lone mean_logit pass-job (attn_cuda_fast.h: axf_hmerge_job). Session 7
 * (runs 29-33): those lists' candidates buffered in shared memory straight from the MMA fragments and merged by
 * 32-wide sorts (wl_flush; run 33, H200, 1877db0: 179/179, the three sanitizers clean, capture e2e 13/13), and trace
 * slots for a row merge's phases. Session 9 (runs 53-59): trace slots for the end of a split CTA and each CTA's own
 * loop end, and the tail (knob tail, default on): a split streams a static share of 85% of the pass-job's stages,
 * then takes blocks of the remaining 15% from a counter until none is left (the outer range loop of axf_kernel; each
 * block's logsumexp partial in its own slot, so results stay bitwise reproducible; none in mean_prob's logsumexp
 * pass, run 64). Sessions 11-12: kernel instances of their own for raw heads splits (axf_kernel with KB 0 and
 * axf_merge_kernel<AXF_MK_RAW>: one-stage splits writing their scores, merged without sorting lists) and for rows of
 * few lists (axf_merge_kernel<AXF_MK_FEW>: S·K ≤ 64 entries sorted whole, run 74), so that every other instance
 * compiles exactly as before (the heads loop and the list merge are sensitive to any change in register
 * allocation: runs 73-74). Session 13: the logsumexp pass's last-CTA merge of ≤ 128 splits took four rows a warp
 * at a time (run 80; since session 22 no logsumexp pass is merged, see below). Session 14, built without a GPU
 * (knob prob_scores): mean_prob's logsumexp pass writes every key's scores (DUMP) and its probability pass streams
 * them in place of K (FROMS), in instances of their own (template parameter X); the others' registers and spills
 * are unchanged. Session 15 (runs 81-83): the scores in blocks of
 * 8 keys, head-major, and the probability pass a thread a key over 128-key stages (from_scores): 1 × 1M mean_prob
 * 1056 → 728 µs; on by default for runs of ≥ 16K mean_prob keys (knob prob_scores_min). Session 16 (run 91): the
 * lists' candidate buffers merged only when a stage's candidates would overflow them (wl_flush). Session 17 (run
 * 95): the raw merge's row-0 flag words loaded with its scores. Session 18 (run 104): a run whose result rows are in
 * one of the state's mapped buffers (ax__attn_fast_results_alloc) has put_result write them there in their final
 * form (axf_args.zout) instead of the compact staging the host then expands. Session 19 (runs 111-112): the raw
 * merge's and the list merge launch's bars and final orders by counted ranks instead of sorting networks
 * (row_finish_ranked, merge_row_cta<1>; only the merge kernels' PTX changed). Session 20 (run 118): a bitonic
 * step decides with one comparison (bitonic_take), not two: the heads loop's list work is paid in instructions
 * (runs 115-117), and this took 8 % of the heads instance's PTX and 4 % off 1 × 32K and 1 × 128K heads. Session 21
 * (runs 129-133): the list merge launch stages only each split's head for rows of k ≤ 32 (the scan reads the rest
 * while it survives) and loads the flag words with it: its go → done 6.6 → 4.4 µs at 128K heads. Session 22 (runs
 * 137-141): mean_prob's logsumexp pass has no merge (no ticket, fences or one-CTA merge on the path): each CTA of
 * its probability pass reduces the pass's partial logsumexps of the heads it needs itself after its wait
 * (lse_rows), and its split 0 ORs the pass's split flag words into that pass-job's flag word (1 × 4K mean_prob
 * 0.89-0.92, 32K 0.88-0.91, 128K 0.95 end to end). On the CPU everything runs: the kernels under
 * attn_cuda_fast_emu.h's SIMT emulator (attn_cuda_fast_emu_test.cc, compiled with AXF_EMU: intrinsics, mbarriers,
 * bulk copies and mma.sync from the emulator, the driver left out), the host half in attn_cuda_fast_test.c.
 */
#ifdef AXF_EMU
#include "attn_cuda_fast_emu.h" /* the CPU's SIMT emulator (attn_cuda_fast_emu_test.cc): kernels only */
#else
#include <cuda_runtime.h>
#endif

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>
#include <unistd.h>

extern "C" {
#include "attn.h"
}
#include "attn_cuda.h"
#include "attn_cuda_fast.h"
#include "attn_cuda_dev.h" /* fb, finite_f, lse_add / lse_merge / lse_value (shared with the prefill path) */

#define FULLM 0xffffffffu

/* ---- device helpers (the lab's, positions as 32-bit offsets) ---------------------------------------------------- */

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define AXF_SM90(body) __trap()
#else
#define AXF_SM90(body) body
#endif
#ifndef AXF_EMU
#define AXF_DYN_SMEM(name) extern __shared__ __align__(128) unsigned char name[] /* bulk copies: 16-byte aligned */
#endif

__device__ __forceinline__ void lse_warp(float &m, float &s)
{
	for (int o = 16; o; o >>= 1) {
		float m2 = __shfl_xor_sync(FULLM, m, o), s2 = __shfl_xor_sync(FULLM, s, o);
		lse_merge(m, s, m2, s2);
	}
}

/* A warp-wide sorted top-k list (k ≤ 64): lane i holds entry i (s0, p0) and entry 32+i (s1, p1); (ts, tp) is
 * entry k-1, the bar. Empty entries are (-inf, INT_MAX). */
struct WList {
	float s0, s1, ts;
	int p0, p1, tp;
};

__device__ __forceinline__ void wl_init(WList &L, int K)
{
	L.s0 = L.s1 = -INFINITY;
	L.p0 = L.p1 = INT_MAX;
	L.ts = K ? -INFINITY : INFINITY;
	L.tp = K ? INT_MAX : -1;
}

/* KB (lists of up to 32·KB entries; the split kernels' heads instances with top-k ≤ 32 have KB 1): with KB 1 the
 * second half (s1, p1) is never read or written, so it takes no registers (run 12: the heads kernel with 4 lists
 * sat at the 128-register cap of 2 CTAs per SM, where small additions cost ~9% of its loop). */
template <int KB = 2> __device__ __forceinline__ void wl_insert(WList &L, float cs, int cp, int K)
{
	const int lane = threadIdx.x & 31;
	int r = __popc(__ballot_sync(FULLM, !fb(cs, cp, L.s0, L.p0)));
	if (KB > 1 && K > 32)
		r += __popc(__ballot_sync(FULLM, !fb(cs, cp, L.s1, L.p1)));
	if (r >= K)
		return;
	const float us0 = __shfl_up_sync(FULLM, L.s0, 1);
	const int up0 = __shfl_up_sync(FULLM, L.p0, 1);
	if (KB > 1) {
		float us1 = __shfl_up_sync(FULLM, L.s1, 1);
		int up1 = __shfl_up_sync(FULLM, L.p1, 1);
		const float c31s = __shfl_sync(FULLM, L.s0, 31);
		const int c31p = __shfl_sync(FULLM, L.p0, 31);
		if (lane == 0) {
			us1 = c31s;
			up1 = c31p;
		}
		if (lane + 32 == r) {
			L.s1 = cs;
			L.p1 = cp;
		} else if (lane + 32 > r) {
			L.s1 = us1;
			L.p1 = up1;
		}
	}
	if (lane == r) {
		L.s0 = cs;
		L.p0 = cp;
	} else if (lane > r) {
		L.s0 = us0;
		L.p0 = up0;
	}
	const int kl = K - 1;
	if (KB == 1 || kl < 32) {
		L.ts = __shfl_sync(FULLM, L.s0, kl);
		L.tp = __shfl_sync(FULLM, L.p0, kl);
	} else {
		L.ts = __shfl_sync(FULLM, L.s1, kl - 32);
		L.tp = __shfl_sync(FULLM, L.p1, kl - 32);
	}
}

template <int KB = 2> __device__ __forceinline__ void wl_offer(WList &L, float s, int p, bool ok, int K)
{
	unsigned m = __ballot_sync(FULLM, ok && fb(s, p, L.ts, L.tp));
	while (m) {
		const int src = __ffs(m) - 1;
		m &= m - 1;
		float cs = __shfl_sync(FULLM, s, src);
		int cp = __shfl_sync(FULLM, p, src);
		if (fb(cs, cp, L.ts, L.tp))
			wl_insert<KB>(L, cs, cp, K);
	}
}

__device__ __forceinline__ bool survives(float x, int p, float ts, int tp)
{
	return p >= 0 && !fb(ts, tp, x, p);
}

__device__ __forceinline__ bool bitonic_take(float x, int p, float ox, int op, int lane, int j, int k)
{
	const bool lower = (lane & j) == 0, best_first = (lane & k) == 0;
	/* the partner's entry when it is better (lower == best_first) or worse: one comparison, negated. Entries are
	 * distinct (positions) but for the empty ones (-inf, INT_MAX), which are equal — then one lane of the pair takes
	 * the other's copy of the same entry, which changes nothing (session 20: one fb a step instead of two) */
	return fb(ox, op, x, p) != (lower != best_first);
}

__device__ __forceinline__ void bitonic32(float &x, int &p)
{
	const int lane = threadIdx.x & 31;
#pragma unroll
	for (int k = 2; k <= 32; k <<= 1)
#pragma unroll
		for (int j = k >> 1; j; j >>= 1) {
			const float ox = __shfl_xor_sync(FULLM, x, j);
			const int op = __shfl_xor_sync(FULLM, p, j);
			if (bitonic_take(x, p, ox, op, lane, j, k)) {
				x = ox;
				p = op;
			}
		}
}

__device__ __forceinline__ void bitonic_merge32(float &x, int &p)
{
	const int lane = threadIdx.x & 31;
#pragma unroll
	for (int j = 16; j; j >>= 1) {
		const float ox = __shfl_xor_sync(FULLM, x, j);
		const int op = __shfl_xor_sync(FULLM, p, j);
		if (bitonic_take(x, p, ox, op, lane, j, 32)) {
			x = ox;
			p = op;
		}
	}
}

/* Merge 32 candidates sorted best first (cx, cp: entry `lane`) into a list with K ≤ 32 (lanes ≥ K of the list
 * ignored): the reversed candidates against the list make a bitonic sequence, one bitonic merge sorts it. */
__device__ __forceinline__ void wl_merge_sorted(WList &L, float cx, int cp, int K)
{
	const int lane = threadIdx.x & 31;
	const float rx = __shfl_sync(FULLM, cx, 31 - lane);
	const int rp = __shfl_sync(FULLM, cp, 31 - lane);
	float ax = lane < K ? L.s0 : -INFINITY;
	int ap = lane < K ? L.p0 : INT_MAX;
	if (fb(rx, rp, ax, ap)) {
		ax = rx;
		ap = rp;
	}
	bitonic_merge32(ax, ap);
	L.s0 = ax;
	L.p0 = ap;
	L.ts = __shfl_sync(FULLM, ax, K - 1);
	L.tp = __shfl_sync(FULLM, ap, K - 1);
}

/* Merge up to 16 candidates (lanes < 16) into a list with K ≤ 32 by bitonic networks (the lab's wl_merge16). */
__device__ __forceinline__ void wl_merge16(WList &L, float x, int p, bool ok, int K)
{
	const int lane = threadIdx.x & 31;
	float cx = ok && lane < 16 ? x : -INFINITY;
	int cp = ok && lane < 16 ? p : INT_MAX;
#pragma unroll
	for (int k = 2; k <= 16; k <<= 1)
#pragma unroll
		for (int j = k >> 1; j; j >>= 1) {
			const float ox = __shfl_xor_sync(FULLM, cx, j);
			const int op = __shfl_xor_sync(FULLM, cp, j);
			if (bitonic_take(cx, cp, ox, op, lane, j, k)) {
				cx = ox;
				cp = op;
			}
		}
	wl_merge_sorted(L, cx, cp, K);
}

/*
 * A list's candidate buffer (session 7): the candidates of a stage that beat the list's bar are appended to a
 * per-list buffer of AXF_LBUF entries in shared memory (bx, bp) instead of being merged into the list at once;
 * wl_flush merges the buffer (c entries) into the list in one 32-wide sort and merge when this stage's candidates
 * would not fit (then they go in), and once at the end of the split (session 16: until then, as soon as the next
 * stage's might not fit, i.e. at more than 16 entries — more sorts for fewer candidates; RESULTS run 91: 1 × 32K
 * heads 7 % faster, 64 × 4K 2 %). Exact: a key that does not beat the bar when it arrives cannot be in the list's
 * final k (the bar only rises); the buffered ones are merged by the list's total order. The bar stays lower between
 * flushes (more keys pass it), but a stage's few candidates cost a ballot and a store each instead of a warp-wide
 * insertion (RESULTS run 29: the offers were ~9 µs of 128K heads' loop, 13 of 32K's). Called by the
 * whole warp.
 */
__device__ __forceinline__ void wl_flush(WList &L, const float *bx, const int *bp, uint32_t c, int K)
{
	const int lane = threadIdx.x & 31;
	__syncwarp(); /* the appends of every lane */
	float x = lane < (int)c ? bx[lane] : -INFINITY;
	int p = lane < (int)c ? bp[lane] : INT_MAX;
	__syncwarp(); /* read before the next appends */
	bitonic32(x, p);
	wl_merge_sorted(L, x, p, K);
}

template <int KB = 2> __device__ __forceinline__ void wl_offer16(WList &L, float x, int p, bool ok, int K)
{
	const int lane = threadIdx.x & 31;
	const unsigned m = __ballot_sync(FULLM, ok && lane < 16 && fb(x, p, L.ts, L.tp));
	if (!m)
		return;
	if ((KB == 1 || K <= 32) && __popc(m) >= 4)
		wl_merge16(L, x, p, ok && lane < 16, K);
	else
		wl_offer<KB>(L, x, p, ok && lane < 16, K);
}

#ifndef AXF_EMU /* the emulator has its own mma, mbarriers and bulk copy */
template <int F16>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
					 uint32_t b0, uint32_t b1)
{
	if (F16)
		asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
			     "{%8,%9}, {%0,%1,%2,%3};\n"
			     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
			     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
	else
		asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
			     "{%8,%9}, {%0,%1,%2,%3};\n"
			     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
			     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

#endif

/* 1 if any of the 8 16-bit elements of v is NaN or infinite (exponent all ones). */
template <int F16> __device__ __forceinline__ uint32_t nonfinite8(uint4 v)
{
	const uint32_t e = F16 ? 0x7c007c00u : 0x7f807f80u;
	uint32_t bad = 0;
	const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
	for (int i = 0; i < 4; i++)
		bad |= ((w[i] & 0xffffu & e) == (e & 0xffffu)) | ((w[i] & 0xffff0000u & e) == (e & 0xffff0000u));
	return bad;
}

#ifndef AXF_EMU
__device__ __forceinline__ uint32_t smem_u32(const void *p)
{
	return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void mbar_init(uint64_t *mb, int count)
{
	AXF_SM90(asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(mb)), "r"(count) : "memory"));
}

__device__ __forceinline__ void mbar_init_fence()
{
	AXF_SM90(asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"));
}

__device__ __forceinline__ void mbar_arrive(uint64_t *mb)
{
	AXF_SM90(asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(mb)) : "memory"));
}

__device__ __forceinline__ void mbar_arrive_tx(uint64_t *mb, uint32_t bytes)
{
	AXF_SM90(asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(mb)),
			      "r"(bytes)
			      : "memory"));
}

__device__ __forceinline__ void mbar_wait(uint64_t *mb, uint32_t parity)
{
	uint32_t done = 0;
	do {
		AXF_SM90(asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
				      "selp.u32 %0, 1, 0, p;\n\t}"
				      : "=r"(done)
				      : "r"(smem_u32(mb)), "r"(parity)
				      : "memory"));
	} while (!done);
}

/* One bulk copy global → shared (dst, src and bytes multiples of 16), completing tx bytes on mb. */
__device__ __forceinline__ void bulk_g2s(void *dst, const void *src, uint32_t bytes, uint64_t *mb)
{
	AXF_SM90(asm volatile(
		"cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
			smem_u32(dst)),
		"l"(src), "r"(bytes), "r"(smem_u32(mb))
		: "memory"));
}

#endif

#ifndef AXF_EMU
/* Programmatic dependent launch (knob pdl): a kernel launched with the attribute may start while the kernel before
 * it in the stream still runs; griddepcontrol.wait blocks until that kernel has completed and its memory operations
 * are visible (PTX ISA: griddepcontrol), so nothing it wrote may be read before. launch_dependents lets the next
 * such kernel be scheduled once every CTA of this one has issued it (or exited); without a dependent it does
 * nothing. */
__device__ __forceinline__ void griddep_wait()
{
	AXF_SM90(asm volatile("griddepcontrol.wait;" ::: "memory"));
}

__device__ __forceinline__ void griddep_launch()
{
	AXF_SM90(asm volatile("griddepcontrol.launch_dependents;" ::: "memory"));
}

/* The GPU's global timer (ns). */
__device__ __forceinline__ unsigned long long gtime()
{
	unsigned long long t;
	asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
	return t;
}

/* A system-scope release store of the completion word (the host reads it with an acquire load). */
__device__ __forceinline__ void st_release_sys(uint32_t *p, uint32_t v)
{
	AXF_SM90(asm volatile("st.release.sys.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory"));
}
#endif

/* Diagnostics (axf_args.trace): the time into slot `lo` (the first: min) and `hi` (the last: max; -1: none). */
__device__ __forceinline__ void trace_at(const axf_args &a, int lo, int hi)
{
	if (!a.trace)
		return;
	const unsigned long long t = gtime();
	if (lo >= 0)
		atomicMin(a.trace + lo, t);
	if (hi >= 0)
		atomicMax(a.trace + hi, t);
}

/*
 * The completion word (knob spin). Called by one thread of a unit (a last-CTA merge or a merge CTA) once the
 * unit's result writes are ordered before it (the caller's __syncthreads / __syncwarp: CTA / warp barriers order
 * the other threads' writes before this thread's later operations). Memory model (PTX ISA, "Memory Consistency
 * Model"): fence.sc.sys then the atomic increment form a release pattern at system scope, so every write the unit
 * made (by fence cumulativity, also those of the threads the barrier ordered) precedes the increment; the unit
 * whose increment makes the count `units` reads, through the chain of atomic increments on the one word (observation
 * order), every other unit's increment, and its own fence.sc.sys after the atomic makes that an acquire pattern:
 * every unit's writes happen before what follows. Its release store of seq (st.release.sys) then publishes them all
 * to the host, which acquires with its load of the word (attn_cuda_fast.cu's fast_wait) before it reads any result.
 * The counter is reset by that last unit: no other unit of this run touches it any more, and the next run's
 * kernels come after this one in stream order. Units in earlier launches of the run increment too, so the count
 * covers results of every launch (the last increment is in the last launch: its units start after the earlier
 * launches completed).
 */
__device__ __forceinline__ void signal_done(const axf_args &a)
{
	if (!a.done)
		return;
	__threadfence_system();
	const uint32_t prev = atomicAdd(a.done_cnt, 1u);
	if (prev == a.units - 1) {
		*a.done_cnt = 0;
		__threadfence_system();
		st_release_sys(a.done, a.seq);
	}
}

/* Byte offset in a stage buffer of the 16-byte fragment piece (row, KV head w, dims 32c+8t .. +8). */
__device__ __forceinline__ uint32_t lds_off(int row, int w, int c, int t)
{
	return (uint32_t)(row * AXF_ROWS_SM + w * (AXF_D * 2) + c * 64 + t * 16);
}

/* ---- the merge (the lab's v8_merge_row) ---------------------------------------------------------------------------- */

/* Write one merged row in compact form: the row's logsumexp and its kout entries, best first (offset -1: empty;
 * axf_plan_finish expands them); a.zout: the row's first kout entries and logsumexp in the caller's ax_attn_result
 * row itself (mapped host memory), as the finish would write them. (No logsumexp pass is merged: session 22.) */
__device__ __forceinline__ void put_result(const axf_args &a, const axf_job &jb, int r, float lse, float hx, int hp,
					   float lx, int lp)
{
	const int lane = threadIdx.x & 31, kout = (int)jb.kout;
	if (a.zout) { /* the caller's row itself, as axf_finish_row writes it from the compact form */
		ax_attn_result *o = a.zout + jb.res + r;
		if (lane < kout)
			o->pos[lane] = hp != INT_MAX ? (int64_t)(jb.start + (uint64_t)hp) : -1,
			o->logit[lane] = hp != INT_MAX ? hx : -INFINITY;
		if (lane + 32 < kout)
			o->pos[lane + 32] = lp != INT_MAX ? (int64_t)(jb.start + (uint64_t)lp) : -1,
			o->logit[lane + 32] = lp != INT_MAX ? lx : -INFINITY;
		if (lane == 0)
			o->lse = (double)lse;
		return;
	}
	axf_ent *e = a.rent + jb.rent + (uint64_t)r * jb.kout;
	if (lane < kout)
		e[lane] = axf_ent{hx, hp != INT_MAX ? hp : -1};
	if (lane + 32 < kout)
		e[lane + 32] = axf_ent{lx, lp != INT_MAX ? lp : -1};
	if (lane == 0)
		a.rlse[jb.res + r] = lse;
}

/* One warp ORs its lanes' shares v of pass-job jb's split flag words into its flag word (the host reads it). */
__device__ __forceinline__ void put_flag_word_at(const axf_args &a, uint32_t ticket, uint32_t v)
{
	for (int o = 16; o; o >>= 1)
		v |= (uint32_t)__shfl_xor_sync(FULLM, (int)v, o);
	if ((threadIdx.x & 31) == 0)
		a.pflags[ticket] = v;
}

__device__ __forceinline__ void put_flag_word(const axf_args &a, const axf_job &jb, uint32_t v)
{
	put_flag_word_at(a, jb.ticket, v);
}

/* One warp ORs the flag words of the S splits at pf[0 .. S) into flag word `ticket`. */
__device__ __forceinline__ void put_flags_at(const axf_args &a, const uint32_t *pf, uint32_t S, uint32_t ticket)
{
	uint32_t v = 0;
	for (int i = threadIdx.x & 31; i < (int)S; i += 32)
		v |= (uint32_t)__ldcg((const int *)pf + i);
	put_flag_word_at(a, ticket, v);
}

/* One warp ORs the flag words of pass-job jb's S splits into its flag word. */
__device__ __forceinline__ void put_flags(const axf_args &a, const axf_job &jb)
{
	put_flags_at(a, a.part_f + jb.pf0, jb.S, jb.ticket);
}

/* Entries of each split list staged in shared memory by the merge: E = max(1, min(K, 8, cap / S)). */
__device__ __forceinline__ int stage_e(int K, int S, int cap)
{
	return max(1, min(min(K, 8), cap / max(1, S)));
}

/* Stage the first E entries of the S split lists of row r of pass-job jb at es/ep[e·S + i], by warp wk of nwk
 * warps working together (8 independent loads in flight per lane per batch). */
__device__ __forceinline__ void stage_row(const axf_args &a, const axf_job &jb, int r, float *es, int *ep, int E,
					  int wk, int nwk)
{
	const int lane = threadIdx.x & 31, K = (int)jb.K, S = (int)jb.S;
	const uint64_t ent = jb.ent0 + (uint64_t)r * S * K;
	for (int q0 = wk * 256; q0 < S * E; q0 += nwk * 256) {
		float vx[8];
		int vp[8];
#pragma unroll
		for (int u = 0; u < 8; ++u) {
			const int q = q0 + u * 32 + lane, i = q / E, e = q - i * E;
			vx[u] = q < S * E ? __ldcg(a.part_s + ent + (uint64_t)i * K + e) : 0.f;
			vp[u] = q < S * E ? __ldcg(a.part_p + ent + (uint64_t)i * K + e) : -1;
		}
#pragma unroll
		for (int u = 0; u < 8; ++u) {
			const int q = q0 + u * 32 + lane, i = q / E, e = q - i * E;
			if (q < S * E) {
				es[e * S + i] = vx[u];
				ep[e * S + i] = vp[u];
			}
		}
	}
}

/* Entry e of split i's list of a row (entries at ent + i·K): from the staging (es/ep[e·S + i]) when e < E, else
 * from the partial lists. */
__device__ __forceinline__ void row_entry(const axf_args &a, uint64_t ent, int K, int S, int E, const float *es,
					  const int *ep, int i, int e, float &x, int &p)
{
	if (e < E) {
		x = es[e * S + i];
		p = ep[e * S + i];
	} else {
		x = __ldcg(a.part_s + ent + (uint64_t)i * K + e);
		p = __ldcg(a.part_p + ent + (uint64_t)i * K + e);
	}
}

/* The bar (ts, tp) of a row's merge, by one warp, from the best k-th entry of any split (already in ts, tp per
 * lane): reduced over the warp, then, for K ≤ 32, raised to the k-th best of the lane maxima of the split heads
 * (es/ep[i], staged): K real entries of the row, so a valid bar. */
__device__ __forceinline__ void row_bar(float &ts, int &tp, int K, int S, const float *es, const int *ep)
{
	const int lane = threadIdx.x & 31;
	for (int off = 16; off; off >>= 1) {
		const float ox = __shfl_xor_sync(FULLM, ts, off);
		const int op = __shfl_xor_sync(FULLM, tp, off);
		if (fb(ox, op, ts, tp))
			ts = ox, tp = op;
	}
	if (K <= 32) {
		float bx = -INFINITY;
		int bp = INT_MAX;
		for (int i = lane; i < S; i += 32)
			if (ep[i] >= 0 && fb(es[i], ep[i], bx, bp))
				bx = es[i], bp = ep[i];
		bitonic32(bx, bp);
		const float t2 = __shfl_sync(FULLM, bx, K - 1);
		const int t2p = __shfl_sync(FULLM, bp, K - 1);
		if (t2p != INT_MAX && fb(t2, t2p, ts, tp))
			ts = t2, tp = t2p;
	}
}

/* The end of a row's merge, by one warp: the n survivors of the bar (ts, tp) — in xs/xp when n ≤ 64, sorted by
 * bitonic networks — or, when more survived (wide ties, or k > 32 with a weak bar), every split's entries offered
 * again to a warp list (insertion; the bar filters); then the result row. */
__device__ void row_finish(const axf_args &a, const axf_job &jb, int r, float lse, float ts, int tp, int n,
			   const float *xs, const int *xp, const float *es, const int *ep, int E)
{
	const int lane = threadIdx.x & 31, K = (int)jb.K, S = (int)jb.S;
	const uint64_t ent = jb.ent0 + (uint64_t)r * S * K;
	float hx, lx = -INFINITY;
	int hp, lp = INT_MAX;
	if (n <= 64) {
		hx = lane < n ? xs[lane] : -INFINITY;
		hp = lane < n ? xp[lane] : INT_MAX;
		bitonic32(hx, hp);
		if (n > 32) { /* both halves sorted, a bitonic split, two bitonic merges */
			lx = lane + 32 < n ? xs[lane + 32] : -INFINITY;
			lp = lane + 32 < n ? xp[lane + 32] : INT_MAX;
			bitonic32(lx, lp);
			const float rx = __shfl_sync(FULLM, lx, 31 - lane);
			const int rp = __shfl_sync(FULLM, lp, 31 - lane);
			if (fb(rx, rp, hx, hp)) {
				lx = hx, lp = hp;
				hx = rx, hp = rp;
			} else {
				lx = rx, lp = rp;
			}
			bitonic_merge32(hx, hp);
			bitonic_merge32(lx, lp);
		}
	} else {
		WList L;
		wl_init(L, K);
		for (int base = 0; base < S; base += 32) {
			const int i = base + lane;
			bool act = i < S;
			for (int e = 0; e < K && __any_sync(FULLM, act); ++e) {
				float x = -INFINITY;
				int p = -1;
				if (act) {
					row_entry(a, ent, K, S, E, es, ep, i, e, x, p);
					act = survives(x, p, ts, tp);
				}
				wl_offer(L, x, p, act, K);
			}
		}
		hx = L.s0, hp = L.p0, lx = L.s1, lp = L.p1;
	}
	put_result(a, jb, r, lse, hx, hp, lx, lp);
	__syncwarp();
}

/* The end of a row's merge with n ≤ 64 survivors in xs/xp, by one warp, without a sorting network (session 19):
 * each survivor's place is the number of better ones (positions differ: a total order), where it goes in ds/dp (64
 * entries of free shared memory); then the row from there. */
__device__ __forceinline__ void row_finish_ranked(const axf_args &a, const axf_job &jb, int r, float lse, int n,
						  const float *xs, const int *xp, float *ds, int *dp)
{
	const int lane = threadIdx.x & 31;
	const float x0 = lane < n ? xs[lane] : -INFINITY, x1 = lane + 32 < n ? xs[lane + 32] : -INFINITY;
	const int p0 = lane < n ? xp[lane] : INT_MAX, p1 = lane + 32 < n ? xp[lane + 32] : INT_MAX;
	int r0 = 0, r1 = 0;
#pragma unroll 4
	for (int j = 0; j < n; ++j) {
		const float xj = xs[j];
		const int pj = xp[j];
		r0 += fb(xj, pj, x0, p0) ? 1 : 0;
		r1 += fb(xj, pj, x1, p1) ? 1 : 0;
	}
	if (lane < n)
		ds[r0] = x0, dp[r0] = p0;
	if (lane + 32 < n)
		ds[r1] = x1, dp[r1] = p1;
	__syncwarp();
	put_result(a, jb, r, lse, lane < n ? ds[lane] : -INFINITY, lane < n ? dp[lane] : INT_MAX,
		   lane + 32 < n ? ds[lane + 32] : -INFINITY, lane + 32 < n ? dp[lane + 32] : INT_MAX);
	__syncwarp();
}

/* Survivors of the bar (ts, tp) among splits base0, base0 + step, ... (32 at a time: lane l takes split base + l),
 * every entry e < K of each until its first failing one (lists are sorted), appended at xs/xp[*cnt ..] (positions
 * ≥ 64 only counted). One warp; *cnt in shared memory, shared by the warps that scan together (atomicAdd: their
 * survivors in any order — the sort that follows is over a total order, so the result does not depend on it). */
__device__ __forceinline__ void row_scan(const axf_args &a, uint64_t ent, int K, int S, int E, const float *es,
					 const int *ep, float ts, int tp, int base0, int step, float *xs, int *xp,
					 uint32_t *cnt)
{
	const int lane = threadIdx.x & 31;
	for (int base = base0; base < S; base += step) {
		const int i = base + lane;
		bool act = i < S;
		for (int e = 0; e < K && __any_sync(FULLM, act); ++e) {
			float x = -INFINITY;
			int p = -1;
			if (act) {
				row_entry(a, ent, K, S, E, es, ep, i, e, x, p);
				act = survives(x, p, ts, tp);
			}
			const unsigned bm = __ballot_sync(FULLM, act);
			uint32_t off = 0;
			if (lane == 0 && bm)
				off = atomicAdd(cnt, (uint32_t)__popc(bm));
			off = (uint32_t)__shfl_sync(FULLM, (int)off, 0);
			const uint32_t pos = off + (uint32_t)__popc(bm & ((1u << lane) - 1));
			if (act && pos < 64) {
				xs[pos] = x;
				xp[pos] = p;
			}
		}
	}
}

/* One warp merges the S partials of row r of pass-job jb (partial rows at prow0 + i, entries at ent + i·K) into
 * its result row. xs/xp: the warp's 64-entry survivor scratch; es/ep: its staging of cap ≥ S
 * entries; cnt: a shared-memory word of this warp's. (The last-CTA merge of heads rows: a warp per row.) */
__device__ void merge_row(const axf_args &a, const axf_job &jb, int r, float *xs, int *xp, float *es, int *ep, int cap,
			  uint32_t *cnt)
{
	const int lane = threadIdx.x & 31, K = (int)jb.K, S = (int)jb.S, SL = S + (int)jb.tblk;
	const uint64_t prow0 = jb.part0 + (uint64_t)r * SL, ent = jb.ent0 + (uint64_t)r * S * K;
	float m = -INFINITY, sm = 0.f, ts = -INFINITY; /* (ts, tp): the best k-th entry of any split */
	int tp = INT_MAX;
	for (int i0 = lane; i0 < SL; i0 += 32 * 4) { /* the splits' (and tail blocks') logsumexps and the splits' k-th
						       * entries: 4 loads per lane issued together, then used */
		float x[4], kx[4];
		int kp[4];
#pragma unroll
		for (int u = 0; u < 4; ++u) {
			const int i = i0 + 32 * u;
			x[u] = i < SL ? __ldcg(a.part_lse + prow0 + i) : -INFINITY;
			kx[u] = -INFINITY, kp[u] = -1;
			if (K && i < S) {
				const uint64_t e = ent + (uint64_t)i * K + K - 1;
				kx[u] = __ldcg(a.part_s + e);
				kp[u] = __ldcg(a.part_p + e);
			}
		}
#pragma unroll
		for (int u = 0; u < 4; ++u) {
			if (x[u] != -INFINITY)
				lse_merge(m, sm, x[u], 1.f);
			if (kp[u] >= 0 && fb(kx[u], kp[u], ts, tp))
				ts = kx[u], tp = kp[u];
		}
	}
	lse_warp(m, sm);
	const float lse = lse_value(m, sm);
	if (!K) {
		put_result(a, jb, r, lse, -INFINITY, INT_MAX, -INFINITY, INT_MAX);
		return;
	}
	const int E = stage_e(K, S, cap);
	stage_row(a, jb, r, es, ep, E, 0, 1);
	__syncwarp();
	if (lane == 0)
		trace_at(a, -1, AXF_TR_MLOAD);
	row_bar(ts, tp, K, S, es, ep);
	if (lane == 0) {
		*cnt = 0;
		trace_at(a, -1, AXF_TR_MBAR);
	}
	__syncwarp();
	row_scan(a, ent, K, S, E, es, ep, ts, tp, 0, 32, xs, xp, cnt);
	__syncwarp();
	if (lane == 0)
		trace_at(a, -1, AXF_TR_MSCAN);
	const int n = (int)*cnt;
	__syncwarp(); /* every lane has read the count before the next row's reset */
	row_finish(a, jb, r, lse, ts, tp, n, xs, xp, es, ep, E);
}

/*
 * A warp's logsumexps of rows r0, r0 + rstep, ... (nr of them) of a logsumexp pass-job's partials (SL a row from
 * part0: mean_prob's first pass), four rows at a time, each lane's loads of the four rows' partials issued
 * together (a round of loads per 128 partials), then four warp reductions; lane 0 writes row u's to dst[u·dstep].
 * Session 22: mean_prob's probability pass computes its logsumexps so, after its wait for the logsumexp pass,
 * instead of that pass's last CTA merging them (a ticket, two fences and a one-CTA merge on the path: ~9 µs at
 * 1 × 4K, RESULTS runs 137-138). Called by every lane of the warp.
 */
__device__ void lse_rows(const axf_args &a, uint64_t part0, int SL, int r0, int nr, int rstep, float *dst, int dstep)
{
	const int lane = threadIdx.x & 31;
	for (int u0 = 0; u0 < nr; u0 += 4) {
		float m[4], sm[4];
#pragma unroll
		for (int u = 0; u < 4; ++u)
			m[u] = -INFINITY, sm[u] = 0.f;
		for (int i0 = lane; i0 < SL; i0 += 32 * 4) {
			float x[4][4];
#pragma unroll
			for (int u = 0; u < 4; ++u)
#pragma unroll
				for (int v = 0; v < 4; ++v) {
					const int i = i0 + 32 * v;
					x[u][v] = u0 + u < nr && i < SL
							  ? __ldcg(a.lpart_lse + part0 + (uint64_t)(r0 + (u0 + u) * rstep) * SL + i)
							  : -INFINITY;
				}
#pragma unroll
			for (int u = 0; u < 4; ++u)
#pragma unroll
				for (int v = 0; v < 4; ++v)
					if (x[u][v] != -INFINITY)
						lse_merge(m[u], sm[u], x[u][v], 1.f);
		}
#pragma unroll
		for (int u = 0; u < 4; ++u) {
			lse_warp(m[u], sm[u]);
			if (lane == 0 && u0 + u < nr)
				dst[(u0 + u) * dstep] = lse_value(m[u], sm[u]);
		}
	}
}

/*
 * One warp merges row r of a pass-job whose S lists hold at most 64 entries in all (S·K ≤ 64: 64 × 4K heads is 4
 * splits of top-10 each; session 12): every entry and every logsumexp partial in one round of loads, the entries
 * sorted whole by row_finish's bitonic networks — no staging, no bar, no scan (merge_row's four dependent steps,
 * ~14 µs for 64 × 4K heads on an H200 in run 71). Empty entries (position -1) sort last as (-inf, INT_MAX) and come
 * out as (-1, -inf). xs/xp: the warp's 64-entry scratch. Called by the merge kernel's warps (a row per warp).
 */
__device__ void merge_row_few(const axf_args &a, const axf_job &jb, int r, float *xs, int *xp)
{
	const int lane = threadIdx.x & 31, K = (int)jb.K, S = (int)jb.S, SL = S + (int)jb.tblk, n = S * K;
	const uint64_t prow0 = jb.part0 + (uint64_t)r * SL, ent = jb.ent0 + (uint64_t)r * S * K;
	float x[2];
	int p[2];
#pragma unroll
	for (int u = 0; u < 2; ++u) { /* the lists lie one after the other: entry q of the row at ent + q */
		const int q = lane + 32 * u;
		x[u] = q < n ? __ldcg(a.part_s + ent + q) : -INFINITY;
		p[u] = q < n ? __ldcg(a.part_p + ent + q) : -1;
	}
	float m = -INFINITY, sm = 0.f;
	for (int i = lane; i < SL; i += 32) { /* the splits' (and tail blocks') logsumexps */
		const float v = __ldcg(a.part_lse + prow0 + i);
		if (v != -INFINITY)
			lse_merge(m, sm, v, 1.f);
	}
	lse_warp(m, sm);
#pragma unroll
	for (int u = 0; u < 2; ++u) {
		xs[lane + 32 * u] = p[u] >= 0 ? x[u] : -INFINITY;
		xp[lane + 32 * u] = p[u] >= 0 ? p[u] : INT_MAX;
	}
	__syncwarp();
	if (lane == 0)
		trace_at(a, -1, AXF_TR_MLOAD);
	row_finish(a, jb, r, lse_value(m, sm), -INFINITY, INT_MAX, n, xs, xp, NULL, NULL, 1);
}

/*
 * The whole CTA merges row r of a raw pass-job (jb.raw: S ≤ AXF_NW·32 splits of one stage whose partial lists are
 * their AXF_TS scores, unsorted; session 11). Thread i holds split i's scores in registers (keys past n left out)
 * and stages its best (its head) and its logsumexp; then warp 0 sets the bar — the k-th best of the lane maxima of
 * the split heads: k real entries of the row — while warp 2 sums the 256 logsumexps; every thread then appends its
 * scores that reach the bar (usually a few in the whole row) to the survivors, and warp 0 ranks them and writes the
 * row. No list is sorted anywhere. More than 64 survivors (wide ties): warp 0 offers every split's scores that
 * reach the bar to a warp list from the partials (slow, exact). Called by every thread of the CTA.
 *
 * Session 19 (RESULTS run 111): the merge is short in work but long in dependent steps — ~48 warp shuffle rounds
 * in turn (the warps' logsumexps, the bar's 32-wide sort, the survivors' prefix sum, the final sort). Now the bar
 * and the final order are ranks counted over values every lane has at once (the k-th best: the entry with k - 1
 * better ones), survivors take their slots by shared-memory atomics, and warp 2 sums the 256 threads' logsumexps
 * (the row's maximum, then one sum) off warp 0's path: 1 × 4K heads 22.4 → 21.2 µs, the merge 5.8 → 4.5 µs.
 */
__device__ void merge_row_raw(const axf_args &a, const axf_job &jb, int r, unsigned char *smem, float *xs, int *xp,
			      float *red, int flags)
{
	const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, K = (int)jb.K, S = (int)jb.S;
	const uint64_t ent = jb.ent0 + (uint64_t)r * S * AXF_TS;
	float *es = (float *)smem, *tm = es + 2 * AXF_NW * 32, *tsm = tm + AXF_NW * 32; /* heads; logsumexps */
	int *ep = (int *)(es + AXF_NW * 32);
	uint32_t *cnt = (uint32_t *)red + 2;
	const uint32_t first = (uint32_t)tid * AXF_TS, n = jb.n;
	float x[AXF_TS];
	if (tid < S) {
		const float4 *v = (const float4 *)(a.part_s + ent + first);
#pragma unroll
		for (int c = 0; c < AXF_TS / 4; ++c) {
			const float4 f = __ldcg(v + c);
			x[4 * c] = f.x, x[4 * c + 1] = f.y, x[4 * c + 2] = f.z, x[4 * c + 3] = f.w;
		}
	}
	/* row 0's warp 1: the splits' flag words (put_flags' work), its ≤ AXF_NW loads a lane issued at once behind
	 * the scores' (session 17, run 95: put_flags' loop takes one L2 round trip a word in turn, and row 0's CTA
	 * waited for it at the bar; 1 × 4K heads 22.4 → 22.1 µs, its merge done 0.6 µs sooner) */
	uint32_t fw = 0;
	if (w == 1 && flags)
#pragma unroll
		for (int u = 0; u < AXF_NW; ++u)
			if (lane + 32 * u < S)
				fw |= (uint32_t)__ldcg((const int *)a.part_f + jb.pf0 + lane + 32 * u);
	float hx = -INFINITY, m = -INFINITY, sm = 0.f;
	int hp = INT_MAX;
#pragma unroll
	for (int e = 0; e < AXF_TS; ++e) { /* positions rise with e: the first of equal values is the lower */
		const bool ok = tid < S && first + (uint32_t)e < n;
		x[e] = ok ? x[e] : -INFINITY;
		if (x[e] > hx)
			hx = x[e], hp = (int)(first + (uint32_t)e);
	}
	if (hp != INT_MAX) {
#pragma unroll
		for (int e = 0; e < AXF_TS; ++e)
			sm += x[e] == -INFINITY ? 0.f : __expf(x[e] - hx);
		m = hx;
	}
	es[tid] = hx, ep[tid] = hp == INT_MAX ? -1 : hp, tm[tid] = m, tsm[tid] = sm;
	if (tid == 0)
		*cnt = 0;
	__syncthreads();
	if (tid == 0)
		trace_at(a, -1, AXF_TR_MLOAD);
	if (w == 1 && flags)
		put_flag_word(a, jb, fw);
	if (w == 0) { /* the bar: the lane maxima of the heads, then the one with K - 1 better ones */
		float bx = -INFINITY;
		int bp = INT_MAX;
#pragma unroll
		for (int u = 0; u < AXF_NW; ++u) { /* S ≤ AXF_NW·32: the lane's heads loaded at once */
			const int i = lane + 32 * u;
			const float hx2 = i < S ? es[i] : -INFINITY;
			const int hp2 = i < S ? ep[i] : -1;
			if (hp2 >= 0 && fb(hx2, hp2, bx, bp))
				bx = hx2, bp = hp2;
		}
		int rank = 0;
#pragma unroll
		for (int j = 0; j < 32; ++j)
			rank += fb(__shfl_sync(FULLM, bx, j), __shfl_sync(FULLM, bp, j), bx, bp) ? 1 : 0;
		const unsigned bm = __ballot_sync(FULLM, bp != INT_MAX && rank == K - 1);
		float ts = -INFINITY;
		int tp = INT_MAX;
		if (bm) { /* warp-uniform; else fewer than K heads: no bar */
			ts = __shfl_sync(FULLM, bx, __ffs(bm) - 1);
			tp = __shfl_sync(FULLM, bp, __ffs(bm) - 1);
		}
		if (lane == 0)
			red[0] = ts, ((int *)red)[1] = tp;
	} else if (w == 2) {
		float tmu[AXF_NW], tsu[AXF_NW], m2 = -INFINITY, s2 = 0.f; /* the row's maximum, then one sum */
#pragma unroll
		for (int u = 0; u < AXF_NW; ++u)
			tmu[u] = tm[lane + 32 * u], tsu[u] = tsm[lane + 32 * u], m2 = fmaxf(m2, tmu[u]);
		for (int o = 16; o; o >>= 1)
			m2 = fmaxf(m2, __shfl_xor_sync(FULLM, m2, o));
		if (m2 != -INFINITY)
#pragma unroll
			for (int u = 0; u < AXF_NW; ++u)
				s2 += tmu[u] == -INFINITY ? 0.f : tsu[u] * lse_exp(tmu[u] - m2);
		for (int o = 16; o; o >>= 1)
			s2 += __shfl_xor_sync(FULLM, s2, o);
		if (lane == 0)
			red[3] = lse_value(m2, s2);
	}
	__syncthreads();
	if (tid == 0)
		trace_at(a, -1, AXF_TR_MBAR);
	const float ts = red[0];
	const int tp = ((const int *)red)[1];
	uint32_t mk = 0;
#pragma unroll
	for (int e = 0; e < AXF_TS; ++e)
		mk |= (uint32_t)(x[e] != -INFINITY && survives(x[e], (int)(first + (uint32_t)e), ts, tp)) << e;
	if (mk) { /* a slot of its own for each survivor (their order does not matter: they are ranked) */
		uint32_t pos = atomicAdd(cnt, (uint32_t)__popc(mk));
#pragma unroll
		for (int e = 0; e < AXF_TS; ++e)
			if ((mk >> e) & 1) {
				if (pos < 64)
					xs[pos] = x[e], xp[pos] = (int)(first + (uint32_t)e);
				pos++;
			}
	}
	__syncthreads();
	if (tid == 0)
		trace_at(a, -1, AXF_TR_MSCAN);
	if (w != 0)
		return;
	const int nsv = (int)*cnt;
	if (nsv <= 64) { /* es/ep are free: every warp is past the scan */
		row_finish_ranked(a, jb, r, red[3], nsv, xs, xp, es, ep);
		return;
	}
	WList L;
	wl_init(L, K);
	for (int b = 0; b < S; b += 32) {
		const int i = b + lane;
		for (int e = 0; e < AXF_TS; ++e) {
			const uint32_t q = (uint32_t)i * AXF_TS + (uint32_t)e;
			const float v = i < S && q < n ? __ldcg(a.part_s + ent + q) : -INFINITY;
			const bool ok = i < S && q < n && survives(v, (int)q, ts, tp);
			wl_offer(L, v, (int)q, ok, K);
		}
	}
	put_result(a, jb, r, red[3], L.s0, L.p0, L.s1, L.p1);
	__syncwarp();
}

/*
 * The whole CTA (8 warps) merges row r of pass-job jb into its result row: one round of loads by
 * all threads brings every split's logsumexp and k-th entry into shared memory, then its first E entries (RK: with
 * k ≤ 32 only its head, in that first round; row 0's CTA loads the splits' flag words in it too); warp 0 sets the
 * bar while warp 2 merges the logsumexps; all 8 warps scan the splits for survivors together (row_scan, 1/8 of
 * the splits each); warp 0 sorts them (RK: ranks them, when ≤ 64) and writes the row. smem: the CTA's dynamic shared
 * memory (the ring is idle);
 * mode AXF_M_PROB reports logsumexp 0; flags: warp 1 also ORs the pass-job's flag words meanwhile (put_flags; RK:
 * the 8 warps' ORs of the words the first round loaded).
 * Called by every thread of the CTA.
 */
template <int RK = 0> /* 1: the bar and the final order by counted ranks (session 19; the merge launch's instance) */
__device__ void merge_row_cta(const axf_args &a, const axf_job &jb, int r, unsigned char *smem, float *xs, int *xp,
			      float *red, int mode, int flags)
{
	const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, K = (int)jb.K, S = (int)jb.S, SL = S + (int)jb.tblk;
	const uint64_t prow0 = jb.part0 + (uint64_t)r * SL, ent = jb.ent0 + (uint64_t)r * S * K;
	const int capm = AXF_MERGE_CAPM;
	float *es = (float *)smem;
	int *ep = (int *)(es + capm);
	float *sl = (float *)(ep + capm), *skx = sl + AXF_MAX_SPLITS;
	int *skp = (int *)(skx + AXF_MAX_SPLITS);
	uint32_t *cnt = (uint32_t *)red + 2;
	/* H1 (the merge launch's rows of k ≤ 32, session 21: runs 131-133): only each split's head is staged (E 1), in
	 * the same round of loads as the logsumexps and k-th entries — the bar needs no more, and the scan reads a
	 * split's next entries from the partial lists only while they survive (the bar, raised by the k-th best split
	 * head, leaves few: a row's k best are spread over ~k splits). Staging 8 entries a split took ~2.5 µs more at
	 * 128K heads (run 129: the staging's time grows with its loads) to save the scan one or two rounds of global
	 * loads. Rows of k > 32 have the weaker bar (the best k-th entry alone) and stage as before. */
	const bool H1 = RK && K <= 32;
	const int E = K ? (H1 ? 1 : stage_e(K, S, capm)) : 0;
	uint32_t fw = 0; /* RK, row 0's CTA (flags): the splits' flag words, loaded in the same round (put_flags' loop
			  * is one L2 round trip a word in turn: with the short staging it became the bar phase's longest
			  * path; run 133) */
	for (int i0 = tid; i0 < SL; i0 += AXF_NW * 32 * 4) { /* SL ≤ 1024: one batch of ≤ 4 per thread */
		float x[4], kx[4], hx[4];
		int kp[4], hp[4];
		uint32_t f[4];
#pragma unroll
		for (int u = 0; u < 4; ++u) {
			const int i = i0 + AXF_NW * 32 * u;
			f[u] = RK && flags && i < S ? (uint32_t)__ldcg((const int *)a.part_f + jb.pf0 + i) : 0u;
			x[u] = i < SL ? __ldcg(a.part_lse + prow0 + i) : -INFINITY;
			kx[u] = -INFINITY, kp[u] = -1, hx[u] = -INFINITY, hp[u] = -1;
			if (K && i < S) {
				const uint64_t e = ent + (uint64_t)i * K + K - 1;
				kx[u] = __ldcg(a.part_s + e);
				kp[u] = __ldcg(a.part_p + e);
				if (H1)
					hx[u] = __ldcg(a.part_s + e - (K - 1)), hp[u] = __ldcg(a.part_p + e - (K - 1));
			}
		}
#pragma unroll
		for (int u = 0; u < 4; ++u) {
			const int i = i0 + AXF_NW * 32 * u;
			if (i < SL)
				sl[i] = x[u];
			if (i < S) {
				skx[i] = kx[u], skp[i] = kp[u];
				if (H1)
					es[i] = hx[u], ep[i] = hp[u];
			}
			fw |= f[u];
		}
	}
	if (K && !H1)
		stage_row(a, jb, r, es, ep, E, w, AXF_NW);
	uint32_t *wfl = (uint32_t *)red + 8; /* RK: each warp's OR of its flag words (red[0..3]: bar, count, lse) */
	if (RK && flags) { /* CTA-uniform */
		for (int o = 16; o; o >>= 1)
			fw |= (uint32_t)__shfl_xor_sync(FULLM, (int)fw, o);
		if (lane == 0)
			wfl[w] = fw;
	}
	__syncthreads();
	if (tid == 0)
		trace_at(a, -1, AXF_TR_MLOAD);
	if (w == 1 && flags) { /* the pass-job's flag word, off warp 0's path (ordered before the caller's release by
				* the barriers below) */
		if (RK) {
			uint32_t v = 0;
#pragma unroll
			for (int u = 0; u < AXF_NW; ++u)
				v |= wfl[u];
			put_flag_word(a, jb, v);
		} else {
			put_flags(a, jb);
		}
	}
	if (!K) { /* CTA-uniform (no CTA-wide merge has K = 0 today): warp 0 alone */
		if (w == 0) {
			float m = -INFINITY, sm = 0.f;
			for (int i = lane; i < SL; i += 32)
				if (sl[i] != -INFINITY)
					lse_merge(m, sm, sl[i], 1.f);
			lse_warp(m, sm);
			put_result(a, jb, r, mode == AXF_M_PROB ? 0.f : lse_value(m, sm), -INFINITY, INT_MAX, -INFINITY,
				   INT_MAX);
		}
		return;
	}
	if (w == 0 && RK) { /* row_bar's bar, its reduction and 32-wide sort as 32 independent shuffles a lane */
		float ts = -INFINITY, bx = -INFINITY;
		int tp = INT_MAX, bp = INT_MAX;
#pragma unroll 4
		for (int i = lane; i < S; i += 32) {
			const float kx = skx[i], hx = es[i];
			const int kp = skp[i], hp = ep[i];
			if (kp >= 0 && fb(kx, kp, ts, tp))
				ts = kx, tp = kp;
			if (hp >= 0 && fb(hx, hp, bx, bp))
				bx = hx, bp = hp;
		}
		float tb = ts;
		int tq = tp, rank = 0;
#pragma unroll
		for (int j = 0; j < 32; ++j) {
			const float ox = __shfl_sync(FULLM, bx, j), oy = __shfl_sync(FULLM, ts, j);
			const int op = __shfl_sync(FULLM, bp, j), oq = __shfl_sync(FULLM, tp, j);
			rank += fb(ox, op, bx, bp) ? 1 : 0;
			if (fb(oy, oq, tb, tq))
				tb = oy, tq = oq;
		}
		const unsigned bm = __ballot_sync(FULLM, K <= 32 && bp != INT_MAX && rank == K - 1);
		if (bm) { /* warp-uniform: the K-th best lane maximum raises the bar */
			const float t2 = __shfl_sync(FULLM, bx, __ffs(bm) - 1);
			const int t2p = __shfl_sync(FULLM, bp, __ffs(bm) - 1);
			if (fb(t2, t2p, tb, tq))
				tb = t2, tq = t2p;
		}
		if (lane == 0)
			red[0] = tb, ((int *)red)[1] = tq, *cnt = 0;
	} else if (w == 2 && RK) { /* the logsumexp: the maximum, then one sum */
		float m = -INFINITY, sm = 0.f;
#pragma unroll 4
		for (int i = lane; i < SL; i += 32)
			m = fmaxf(m, sl[i]);
		for (int o = 16; o; o >>= 1)
			m = fmaxf(m, __shfl_xor_sync(FULLM, m, o));
		if (m != -INFINITY)
#pragma unroll 4
			for (int i = lane; i < SL; i += 32)
				sm += sl[i] == -INFINITY ? 0.f : lse_exp(sl[i] - m);
		for (int o = 16; o; o >>= 1)
			sm += __shfl_xor_sync(FULLM, sm, o);
		if (lane == 0)
			red[3] = mode == AXF_M_PROB ? 0.f : lse_value(m, sm);
	} else if (w == 0) { /* the bar: best k-th of any split, raised by the lane maxima of the split heads */
		float ts = -INFINITY;
		int tp = INT_MAX;
		for (int i = lane; i < S; i += 32)
			if (skp[i] >= 0 && fb(skx[i], skp[i], ts, tp))
				ts = skx[i], tp = skp[i];
		row_bar(ts, tp, K, S, es, ep);
		if (lane == 0)
			red[0] = ts, ((int *)red)[1] = tp, *cnt = 0;
	} else if (w == 2) { /* the logsumexp over the splits (and tail blocks), meanwhile */
		float m = -INFINITY, sm = 0.f;
		for (int i = lane; i < SL; i += 32)
			if (sl[i] != -INFINITY)
				lse_merge(m, sm, sl[i], 1.f);
		lse_warp(m, sm);
		if (lane == 0)
			red[3] = mode == AXF_M_PROB ? 0.f : lse_value(m, sm);
	}
	__syncthreads();
	if (tid == 0)
		trace_at(a, -1, AXF_TR_MBAR);
	const float ts = red[0];
	const int tp = ((const int *)red)[1];
	row_scan(a, ent, K, S, E, es, ep, ts, tp, w * 32, AXF_NW * 32, xs, xp, cnt);
	__syncthreads();
	if (tid == 0)
		trace_at(a, -1, AXF_TR_MSCAN);
	if (w == 0 && RK && *cnt <= 64) /* es/ep are free: every warp is past the scan */
		row_finish_ranked(a, jb, r, red[3], (int)*cnt, xs, xp, es, ep);
	else if (w == 0)
		row_finish(a, jb, r, red[3], ts, tp, (int)*cnt, xs, xp, es, ep, E);
}

/* Write a warp list as the partial row `prow` (entries at ent .. ent+K-1; lanes < K write entries lane, lane+32). */
template <int KB> __device__ __forceinline__ void put_list(const axf_args &a, uint64_t ent, const WList &L, int K)
{
	const int lane = threadIdx.x & 31;
	if (lane < K) {
		a.part_s[ent + lane] = L.s0;
		a.part_p[ent + lane] = L.p0 == INT_MAX ? -1 : L.p0;
	}
	if (KB > 1 && lane + 32 < K) {
		a.part_s[ent + lane + 32] = L.s1;
		a.part_p[ent + lane + 32] = L.p1 == INT_MAX ? -1 : L.p1;
	}
}

/* ---- the kernel ----------------------------------------------------------------------------------------------------- */

/* Pass-job of CTA `cta`: the largest i with split_off[i] ≤ cta (attn_cuda_dev.h's find_le on the parameter block's
 * own fields: kept apart so the kernel reads them straight from the __grid_constant__ parameters). */
__device__ __forceinline__ int find_job(const axf_args &a, uint32_t cta)
{
	int lo = 0, hi = (int)a.nj;
	while (hi - lo > 1) {
		const int mid = (lo + hi) >> 1;
		if (a.split_off[mid] <= cta)
			lo = mid;
		else
			hi = mid;
	}
	return lo;
}

/* The mean modes' per-key partials [NS][NW][TS] in a CTA's dynamic shared memory (after the ring and the
 * mbarriers); the merges use them for their bar and survivor counts once the loop is over. */
__device__ __forceinline__ float *smem_red(unsigned char *smem)
{
	return (float *)(smem + (size_t)AXF_NS * AXF_TS * AXF_ROWS_SM + (size_t)AXF_NS * 8 * 3);
}

/* The merge's survivor scratch in a CTA's dynamic shared memory (after the ring, the mbarriers and the partials;
 * the layout of AXF_SMEM). */
__device__ __forceinline__ float *smem_xs(unsigned char *smem)
{
	return (float *)(smem + (size_t)AXF_NS * AXF_TS * AXF_ROWS_SM + (size_t)AXF_NS * 8 * 3) +
	       AXF_NS * AXF_NW * AXF_TS;
}

/* Knob prob_scores: a stage of the probability pass from its scores (axf_kernel's FROMS). The stage's SK =
 * AXF_TS·AXF_SCB keys from `tile` (nv of them valid) are in buf as blocks of AXF_SCB keys (block b, keys tile + 8b
 * on, at b·(AXF_SCB·scw + 8) floats; head h's 8 keys at h·8 in it; scores already scaled). Thread k < SK sums key
 * tile + k's exp(s_h − lse_h) over the heads in the order of the pass over K — per KV head ((c0 + c1) + (c2 + c3)) +
 * ((c4 + c5) + (c6 + c7)) of its G columns (0 past G: that pass's shuffle tree), then the KV heads in turn, as its
 * reducer summed the warps — so the sums are the same bit for bit; warp AXF_NW − 1 then takes them 16 keys at a
 * time in key order, as that reducer did (its lanes' logsumexps, the list). Reads of buf: a warp's 32 keys are
 * four blocks (8·scw + 8 ≡ 8 mod 32 floats apart) of 8 consecutive floats a head, 32 banks: no conflicts. lse:
 * the H logsumexps (shared memory); rd: the stage's SK sums; par: the phase parity of empty and redfull. */
template <int KB>
__device__ __forceinline__ void from_scores(const unsigned char *buf, float *rd, uint64_t *empty, uint64_t *redfull,
					    uint32_t par, const float *lse, const axf_job &jb, uint32_t tile, int nv,
					    float &mA, float &sA, WList &L, int K, uint32_t &bad)
{
	constexpr int SK = AXF_TS * AXF_SCB;
	static_assert(SK <= AXF_NW * AXF_TS, "a stage's sums fit its partials' slot");
	static_assert(AXF_TS * (AXF_SCB * 4 * AXF_MAX_HKV * AXF_MAX_G + 32) <= AXF_TS * AXF_ROWS_SM,
		      "a stage's blocks of scores fit its ring buffer");
	const int tid = threadIdx.x, lane = tid & 31, G = (int)jb.G, Hkv = (int)jb.Hkv;
	if (tid < SK) {
		const float *sb = (const float *)buf + (tid / AXF_SCB) * (AXF_SCB * jb.scw + 8) + tid % AXF_SCB;
		float v = 0.f;
		for (int kv = 0; kv < Hkv; ++kv) {
			float c[8];
#pragma unroll
			for (int q = 0; q < 8; ++q)
				c[q] = q < G ? __expf(sb[(kv * G + q) * AXF_SCB] - lse[kv * G + q]) : 0.f;
			v += ((c[0] + c[1]) + (c[2] + c[3])) + ((c[4] + c[5]) + (c[6] + c[7]));
		}
		rd[tid] = v;
		mbar_arrive(redfull);
	}
	float vv[AXF_SCB];
	if (tid >> 5 == AXF_NW - 1) { /* warp-uniform */
		mbar_wait(redfull, par);
#pragma unroll
		for (int q = 0; q < AXF_SCB; ++q)
			vv[q] = lane < AXF_TS ? rd[q * AXF_TS + lane] : 0.f;
	}
	mbar_arrive(empty); /* every thread: the buffer read (warp AXF_NW − 1: the sums too) */
	if (tid >> 5 == AXF_NW - 1) {
#pragma unroll
		for (int q = 0; q < AXF_SCB; ++q) {
			const int k = q * AXF_TS + lane;
			const bool ok = lane < AXF_TS && k < nv;
			bad |= ok && !finite_f(vv[q]); /* a NaN/inf score, or Σ exp overflowing; 0 is fine */
			const float v = logf(vv[q] * jb.inv_h);
			if (ok)
				lse_add(mA, sA, v);
			if (K)
				wl_offer16<KB>(L, v, (int)tile + k, ok, K);
		}
	}
}

template <int MODE, int F16, int NL, int KB, int X = 0>
__global__ void __launch_bounds__(AXF_NW * 32, AXF_MINB) axf_kernel(const __grid_constant__ axf_args a)
{
	AXF_DYN_SMEM(smem);
	griddep_launch(); /* a dependent (knob pdl) may be scheduled as CTAs of this launch end */
	const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, grow = lane >> 2, t = lane & 3;
	if (tid == 0)
		trace_at(a, AXF_TR_START0, AXF_TR_START1);
	const int ji = a.inl ? 0 : find_job(a, blockIdx.x);
	const axf_job &jb = a.inl ? a.one : a.jobs[ji]; /* the parameter itself (grid constant) or the table */
	/* KB 0: the raw kernels (axf_plan_raw; the plan sends only raw pass-jobs to them): no lists (K 0 here), no
	 * logsumexps, the one stage's scores written as the split's partial lists. A template parameter, not a test of
	 * jb.raw, so that the other instances' code stays as it was (the heads loop is sensitive to any change in its
	 * register allocation: run 73 measured 128K heads 5% slower with a run-time test). */
	constexpr bool RAW = KB == 0;
	/* X 1 (knob prob_scores, sessions 14-15): a mean_prob job's two passes with its scores in a.sc — DUMP, its
	 * logsumexp pass (heads, K 0), also writes every key's scaled scores there (blocks of AXF_SCB keys, head-major
	 * in a block: attn_cuda_fast.h's axf_sc_floats); FROMS, its probability pass, streams those blocks through the
	 * ring in place of key rows (no index, no MMA: scw·4 bytes a key instead of H_kv·256), a stage of SK =
	 * AXF_TS·AXF_SCB keys (a block a producer lane), a thread a key. The same values as the two passes over K,
	 * bit for bit. Template parameters, so that the other instances compile as before. */
	constexpr bool DUMP = MODE == AXF_M_HEADS && X == 1, FROMS = MODE == AXF_M_PROB && X == 1;
	constexpr uint32_t SK = FROMS ? AXF_TS * AXF_SCB : AXF_TS, SL1 = FROMS ? AXF_SCB : 1; /* keys a stage, a lane */
	const int K = RAW || DUMP ? 0 : (int)jb.K, S = (int)jb.S, sl = (int)(blockIdx.x - (a.inl ? 0u : a.split_off[ji]));
	const int G = (int)jb.G, Hkv = (int)jb.Hkv;
	/* [start, end): the keys of the range being streamed — the split's static share, then (knob tail) each tail
	 * block it takes; nst its stages; g0 the stages this CTA streamed before it (the ring's buffers and mbarrier
	 * phases count on over ranges) */
	const uint32_t n = jb.n;
	uint32_t start = jb.tblk ? (uint32_t)sl * jb.tss * AXF_TS : (uint32_t)sl * jb.chunk;
	uint32_t end = jb.tblk ? start + jb.tss * AXF_TS : min(n, start + jb.chunk);
	int nst = (int)((end - start + SK - 1) / SK), g0 = 0;
	const uint32_t rowb = FROMS ? jb.scw * 4u * AXF_SCB : (uint32_t)Hkv * AXF_D * 2; /* a producer lane's copy */
	const bool wv = w < Hkv, cA = wv && 2 * t < G, cB = wv && 2 * t + 1 < G;

	unsigned char *stg = smem;
	uint64_t *full = (uint64_t *)(smem + (size_t)AXF_NS * AXF_TS * AXF_ROWS_SM), *empty = full + AXF_NS,
		 *redfull = empty + AXF_NS;
	float *red = (float *)(redfull + AXF_NS); /* [NS][NW][TS] */
	float *xs = smem_xs(smem);                  /* [NW][64] */
	int *xp = (int *)(xs + AXF_NW * 64);        /* [NW][64] */
	int *flag = xp + AXF_NW * 64;
	uint32_t *cfl = (uint32_t *)(flag + 1);     /* this CTA's error bits */

	/* producer: lane r < AXF_TS of warp 0 (or, RW > 0, of stage st's warp) fetches row r of the stage; -1 = no row
	 * (past the split's end) */
	const bool prod = w == 0 && lane < AXF_TS;
	/* RW > 0 (heads with lists): the copies rotate over warps 0 .. RW−1, stage st's by warp st mod RW, so no warp
	 * carries them every stage on top of its own scoring and lists (session 6, run 21: with warp 0 alone its stage
	 * took the longest and every refill waited for it; rotating took 128K heads 122 → 103 µs). RW 0 (mean modes,
	 * the logsumexp pass): warp 0's lanes alone, where rotating gained nothing measurable. */
	const int RW = MODE == AXF_M_HEADS && K ? AXF_NW : 0;
	/* the start batch (heads lists of ≤ 32 entries, ≤ 4 lists a warp: their 32-score slices fit the merge scratch):
	 * see the loop (session 6, run 23: 1 × 4K heads 25.5 → 21.9 µs, 128K −2.5%) */
	constexpr bool BATCH = MODE == AXF_M_HEADS && KB == 1 && NL <= 4;
	/* the same instances buffer their lists' candidates (wl_flush; list h of warp w: values at lbx + h·2·AXF_LBUF,
	 * offsets right after) */
	constexpr bool BUF = BATCH;
	float *lbx = (float *)(smem + AXF_SMEM - AXF_LBUF_BYTES) + w * 4 * 2 * AXF_LBUF;
	uint32_t bcA = 0, bcB = 0; /* the fill of this lane's lists' buffers (lanes of the same t agree) */
	uint32_t rng = 0, bad = 0;
	auto has_row = [&](int st) { return st < nst && start + (uint32_t)st * SK + (uint32_t)lane * SL1 < end; };
	auto slot_of = [&](int st) -> int64_t {
		const uint32_t j = start + (uint32_t)st * SK + (uint32_t)lane * SL1;
		if (FROMS) /* the job's block of scores from key j (ranges start at multiples of AXF_TS) */
			return has_row(st) ? (int64_t)j : -1;
		return has_row(st) ? (int64_t)load_slot(jb.index, jb.idt == AX_DTYPE_I32, jb.start + j, jb.n_slots, rng) : -1;
	};
	auto issue = [&](int st, int64_t slot) { /* st: the range's stage */
		const int gs = g0 + st;
		uint64_t *mb = &full[gs % AXF_NS];
		if (slot >= 0) {
			/* FROMS: block b of the stage at b·(AXF_SCB·scw + 8) floats (≡ 8 mod 32 banks from block to block:
			 * see the loop) */
			unsigned char *dst = stg + (size_t)(gs % AXF_NS) * AXF_TS * AXF_ROWS_SM +
					     (size_t)lane * (FROMS ? rowb + 32 : AXF_ROWS_SM);
			mbar_arrive_tx(mb, rowb);
			if (FROMS)
				bulk_g2s(dst, (const char *)(a.sc + jb.sc0 + (uint64_t)slot * jb.scw), rowb, mb);
			else
				bulk_g2s(dst, (const char *)jb.k + (uint64_t)slot * jb.s0 * 2, rowb, mb);
		} else {
			mbar_arrive(mb);
		}
	};
	/* The first stages' index values and Q are loaded before the mbarriers are set up (plain global loads: they
	 * need no barrier), so their latency overlaps the set-up and the CTA barrier; the values are checked after the
	 * barrier (session 5's profile of 1 × 4K: checked at the load, the producer lanes held the whole CTA at the
	 * set-up barrier for the load's round trip, 14% of the kernel's warp samples). */
	uint64_t pre[AXF_NS - 1];
	if (FROMS && a.pdl) /* the scores and logsumexps come from the launch before */
		griddep_wait();
	if (FROMS) /* the logsumexps of every head, for every thread (read after the barrier below): warp w's rows w,
		    * w + 8, ... from the logsumexp pass's partials */
		lse_rows(a, jb.lpart0, (int)jb.lS, w, ((int)jb.H - w + AXF_NW - 1) / AXF_NW, AXF_NW, xs + w, AXF_NW);
#pragma unroll
	for (int i = 0; i < AXF_NS - 1; ++i)
		pre[i] = !FROMS && prod && has_row(i)
				 ? load_index(jb.index, jb.idt == AX_DTYPE_I32, jb.start + start + (uint32_t)i * AXF_TS + (uint32_t)lane)
				 : 0;

	/* Q: B fragments of this warp's group (column c = query head w·G + c, c < G), in registers; checked */
	uint4 qf[4];
	{
		const bool qv = wv && grow < G;
		const uint16_t *qr = (const uint16_t *)jb.q + ((size_t)(qv ? w * G + grow : 0) * AXF_D + 8 * t);
#pragma unroll
		for (int c = 0; c < 4; ++c)
			qf[c] = qv ? *(const uint4 *)(qr + 32 * c) : make_uint4(0, 0, 0, 0);
	}

	if (tid == 0) {
		for (int i = 0; i < AXF_NS; ++i) {
			mbar_init(&full[i], AXF_TS);
			mbar_init(&empty[i], AXF_NW * 32); /* every thread that read the stage arrives */
			mbar_init(&redfull[i], FROMS ? SK : AXF_NW * 8); /* FROMS: a thread a key */
		}
		mbar_init_fence();
		*cfl = 0;
	}
	__syncthreads();

	int64_t nxt = -1;
	if (prod) {
#pragma unroll
		for (int i = 0; i < AXF_NS - 1; ++i)
			if (i < nst)
				issue(i, !has_row(i) ? -1 : FROMS ? slot_of(i) : (int64_t)check_slot(pre[i], jb.n_slots, rng));
		if (!RW)
			nxt = slot_of(AXF_NS - 1);
	}
	int turn = RW ? w : AXF_NS - 1; /* the next stage this warp's lanes < 16 copy */
	while (RW && turn < AXF_NS - 1)
		turn += RW;
	if (RW && w < RW && lane < AXF_TS)
		nxt = slot_of(turn);
	__syncwarp();
#pragma unroll
	for (int c = 0; c < 4; ++c)
		bad |= nonfinite8<F16>(qf[c]);
	const float scale = jb.scale, inv_h = jb.inv_h;
	float l0 = 0.f, l1 = 0.f; /* mean_prob: logsumexps of columns 2t, 2t+1 */
	if (MODE == AXF_M_PROB) {
		if (!FROMS) { /* the logsumexps of this warp's G heads (warp-uniform), from the partials of the launch
			       * before (its first stages are already in flight), in this warp's scratch */
			if (a.pdl)
				griddep_wait();
			if (wv)
				lse_rows(a, jb.lpart0, (int)jb.lS, w * G, G, 1, xs + w * 64, 1);
			__syncwarp();
			l0 = cA ? xs[w * 64 + 2 * t] : 0.f;
			l1 = cB ? xs[w * 64 + 2 * t + 1] : 0.f;
		}
		/* the logsumexp pass's flag word, which no merge of its own writes: split 0's warp 1 ORs its splits' */
		if (sl == 0 && w == 1)
			put_flags_at(a, a.lpart_f + jb.lpf0, jb.lS, jb.lticket);
	}

	WList L[NL];
#pragma unroll
	for (int h = 0; h < NL; ++h)
		wl_init(L[h], K);
	float mA = -INFINITY, sA = 0.f, mB = -INFINITY, sB = 0.f; /* heads: columns 2t, 2t+1; mean: the list's lse */
	float thAs = INFINITY, thBs = INFINITY;                     /* heads: this lane's two lists' bars */
	auto bars = [&]() {
		if (MODE == AXF_M_HEADS && K) {
#pragma unroll
			for (int h = 0; h < NL; ++h) {
				if (h == 2 * t)
					thAs = L[h].ts;
				if (h == 2 * t + 1)
					thBs = L[h].ts;
			}
			if (!cA)
				thAs = INFINITY;
			if (!cB)
				thBs = INFINITY;
		}
	};
	bars();
	/* A range's logsumexp partials into slot `slot` of its rows (SL per row: the S splits' static shares, then
	 * the tail blocks: each its own slot, so the merge sums them in one order whichever CTA took which block —
	 * results stay bitwise the same from run to run), the accumulators then empty for the next range. */
	const uint64_t SL = (uint64_t)S + jb.tblk;
	uint32_t slot = (uint32_t)sl;
	auto put_lse = [&]() {
		if (MODE == AXF_M_HEADS) {
#pragma unroll
			for (int off = 4; off < 32; off <<= 1) {
				lse_merge(mA, sA, __shfl_xor_sync(FULLM, mA, off), __shfl_xor_sync(FULLM, sA, off));
				lse_merge(mB, sB, __shfl_xor_sync(FULLM, mB, off), __shfl_xor_sync(FULLM, sB, off));
			}
			if (lane < 4) { /* lane t holds columns 2t, 2t+1 */
				if (cA)
					a.part_lse[jb.part0 + (uint64_t)(w * G + 2 * t) * SL + slot] = lse_value(mA, sA);
				if (cB)
					a.part_lse[jb.part0 + (uint64_t)(w * G + 2 * t + 1) * SL + slot] = lse_value(mB, sB);
			}
		} else if (w == AXF_NW - 1) {
			lse_warp(mA, sA);
			if (lane == 0)
				a.part_lse[jb.part0 + slot] = lse_value(mA, sA);
		}
		mA = mB = -INFINITY, sA = sB = 0.f;
	};

	for (int rg = 0;; ++rg) { /* the ranges: the static share, then the tail blocks this CTA takes */
		for (int i = 0; i < nst; ++i) {
			const int st = i + AXF_NS - 1, gi = g0 + i, gs = g0 + st;
			if (st == turn && (RW ? w < RW && lane < AXF_TS : prod) && st < nst) {
				/* refill the buffer stage i-1 used once every warp has released it */
				if (gs >= AXF_NS)
					mbar_wait(&empty[gs % AXF_NS], (uint32_t)((gs / AXF_NS) - 1) & 1);
				issue(st, nxt);
				nxt = slot_of(st + (RW ? RW : 1)); /* nothing waits for this load until that stage */
			}
			if (st == turn)
				turn += RW ? RW : 1;
			__syncwarp();
			mbar_wait(&full[gi % AXF_NS], (uint32_t)(gi / AXF_NS) & 1);
			if (gi == 0 && tid == 0)
				trace_at(a, AXF_TR_DATA0, AXF_TR_DATA1);
			__syncwarp(); /* converged for mma.sync.aligned */
			const uint32_t tile = start + (uint32_t)i * SK;
			const int nv = (int)min(SK, end - tile);
			const unsigned char *buf = stg + (size_t)(gi % AXF_NS) * AXF_TS * AXF_ROWS_SM;
			if (FROMS) { /* CTA-uniform */
				from_scores<KB>(buf, red + (gi % AXF_NS) * AXF_NW * AXF_TS, &empty[gi % AXF_NS], &redfull[gi % AXF_NS],
					    (uint32_t)(gi / AXF_NS) & 1, xs, jb, tile, nv, mA, sA, L[0], K, bad);
				continue;
			}
			const bool r0 = wv && grow < nv, r1 = wv && grow + 8 < nv; /* rows past the end: not fetched */
			float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
			uint4 ka[4], kb[4];
#pragma unroll
			for (int c = 0; c < 4; ++c) { /* all 8 fragment loads first, then the multiplies */
				ka[c] = r0 ? *(const uint4 *)(buf + lds_off(grow, w, c, t)) : make_uint4(0, 0, 0, 0);
				kb[c] = r1 ? *(const uint4 *)(buf + lds_off(grow + 8, w, c, t)) : make_uint4(0, 0, 0, 0);
			}
#pragma unroll
			for (int c = 0; c < 4; ++c) {
				if (c & 1) {
					mma16816<F16>(c1, ka[c].x, kb[c].x, ka[c].y, kb[c].y, qf[c].x, qf[c].y);
					mma16816<F16>(c1, ka[c].z, kb[c].z, ka[c].w, kb[c].w, qf[c].z, qf[c].w);
				} else {
					mma16816<F16>(c0, ka[c].x, kb[c].x, ka[c].y, kb[c].y, qf[c].x, qf[c].y);
					mma16816<F16>(c0, ka[c].z, kb[c].z, ka[c].w, kb[c].w, qf[c].z, qf[c].w);
				}
			}
			/* x0, x1: key grow, columns 2t, 2t+1; x2, x3: key grow+8 */
			const float x0 = (c0[0] + c1[0]) * scale, x1 = (c0[1] + c1[1]) * scale;
			const float x2 = (c0[2] + c1[2]) * scale, x3 = (c0[3] + c1[3]) * scale;
			if (MODE == AXF_M_HEADS) {
				mbar_arrive(&empty[gi % AXF_NS]); /* the fragments are in registers: release the buffer */
				/* A non-finite score: x·0 is 0 for every finite x and NaN for ±inf and NaN (rows past the end and
				 * columns past G hold 0: zero fragments; a NaN or inf in a key makes every column of its KV head
				 * non-finite, so taking the columns past G in changes nothing). */
				bad |= !(x0 * 0.f + x1 * 0.f + x2 * 0.f + x3 * 0.f == 0.f);
				const float a0 = r0 ? x0 : -INFINITY, a2 = r1 ? x2 : -INFINITY; /* column 2t (list A) */
				const float b1 = r0 ? x1 : -INFINITY, b3 = r1 ? x3 : -INFINITY; /* column 2t+1 (list B) */
				if (DUMP) { /* the keys' scores for the probability pass: key tile+grow's head h at block tile's
					     * h·8 + grow, key tile+grow+8's in the next block (tile is a multiple of 16), so the 8
					     * lanes of a t store 32 contiguous bytes a head */
					static_assert(AXF_SCB == 8 && AXF_TS == 16, "DUMP's stores: blocks of 8 keys, stages of 16");
					float *o = a.sc + jb.sc0 + (uint64_t)tile * jb.scw + (uint32_t)(w * G + 2 * t) * 8 + grow;
					if (r0 && cA)
						o[0] = x0;
					if (r0 && cB)
						o[8] = x1;
					if (r1 && cA)
						o[8 * (uint64_t)jb.scw] = x2;
					if (r1 && cB)
						o[8 * (uint64_t)jb.scw + 8] = x3;
				}
				if (cA && !RAW) /* raw: the merge sums the scores' exponentials itself */
					lse_add2(mA, sA, a0, a2);
				if (cB && !RAW)
					lse_add2(mB, sB, b1, b3);
				if (RAW) { /* CTA-uniform: the stage's scores as the split's lists (keys g, g+8 of columns 2t,
					       * 2t+1; those past n too: the merge leaves them out) */
					float *o = a.part_s + jb.ent0 + ((uint64_t)(w * G + 2 * t) * S + sl) * AXF_TS + grow;
					if (cA)
						o[0] = x0, o[8] = x2;
					if (cB)
						o[(uint64_t)S * AXF_TS] = x1, o[(uint64_t)S * AXF_TS + 8] = x3;
				}
				if (BATCH && K && wv && i < 2 && g0 == 0) { /* the start batch (warp-uniform) */
					/* stages 0 and 1: every list's 32 keys go to this warp's slice of the merge scratch (idle in the
					 * loop: 4 lists × 32 scores), sorted once after stage 1 (or stage 0 when the split has one) into
					 * the lists — one 32-wide bitonic sort in place of two 16-key merges per list */
					const unsigned b0 = __ballot_sync(FULLM, r0), b1 = __ballot_sync(FULLM, r1);
					float *lb0 = xs + w * 64, *lb1 = (float *)(xp + w * 64); /* lists 0, 1 | 2, 3 */
#pragma unroll
					for (int h = 0; h < NL; ++h) {
						if (h < G) {
							const int src = ((lane & 7) << 2) | (h >> 1);
							const float ya = __shfl_sync(FULLM, (h & 1) ? x1 : x0, src);
							const float yb = __shfl_sync(FULLM, (h & 1) ? x3 : x2, src);
							const bool ok = (((lane < 8 ? b0 : b1) >> src) & 1);
							if (lane < 16)
								(h < 2 ? lb0 : lb1)[(h & 1) * 32 + i * 16 + lane] = ok ? (lane < 8 ? ya : yb) : -INFINITY;
						}
					}
					if (i == min(1, nst - 1)) {
						__syncwarp();
#pragma unroll
						for (int h = 0; h < NL; ++h) {
							if (h < G) {
								float x = lane < 16 * (i + 1) ? (h < 2 ? lb0 : lb1)[(h & 1) * 32 + lane] : -INFINITY;
								int p = x == -INFINITY ? INT_MAX : (int)start + lane;
								bitonic32(x, p);
								L[h].s0 = x, L[h].p0 = p;
								L[h].ts = __shfl_sync(FULLM, x, K - 1);
								L[h].tp = __shfl_sync(FULLM, p, K - 1);
							}
						}
						bars();
					}
				} else if (BUF && K && wv) { /* wv is warp-uniform */
					/* the candidates straight from the fragments: lane 4·g + t appends its keys g, g+8 of columns
					 * 2t (list A) and 2t+1 (list B) that reach their list's bar (≥: a superset; the flush applies
					 * the exact order) to those lists' buffers, at offsets counted among the lanes of the same t —
					 * four ballots and a store per candidate, no shuffles (a stage without one: the ballots) */
					const bool pA0 = r0 && cA && a0 >= thAs, pA2 = r1 && cA && a2 >= thAs;
					const bool pB1 = r0 && cB && b1 >= thBs, pB3 = r1 && cB && b3 >= thBs;
					const unsigned BA0 = __ballot_sync(FULLM, pA0), BA2 = __ballot_sync(FULLM, pA2);
					const unsigned BB1 = __ballot_sync(FULLM, pB1), BB3 = __ballot_sync(FULLM, pB3);
					if (BA0 | BA2 | BB1 | BB3) {
						const unsigned same = 0x11111111u << t, below = (1u << lane) - 1u;
						const uint32_t nA0 = (uint32_t)__popc(BA0 & same), nB1 = (uint32_t)__popc(BB1 & same);
						const uint32_t nA = nA0 + (uint32_t)__popc(BA2 & same), nB = nB1 + (uint32_t)__popc(BB3 & same);
						if (__any_sync(FULLM, bcA + nA > AXF_LBUF || bcB + nB > AXF_LBUF)) {
							/* a buffer this stage's candidates would overflow: merge it into its list first (the
							 * candidates, filtered by the bar before, still go in: a superset) */
#pragma unroll
							for (int h = 0; h < NL; ++h) {
								const uint32_t c = (uint32_t)__shfl_sync(FULLM, (int)((h & 1) ? bcB : bcA), h >> 1);
								const uint32_t nn = (uint32_t)__shfl_sync(FULLM, (int)((h & 1) ? nB : nA), h >> 1);
								if (h < G && c + nn > AXF_LBUF) { /* warp-uniform */
									float *bx = lbx + h * 2 * AXF_LBUF;
									wl_flush(L[h], bx, (const int *)(bx + AXF_LBUF), c, K);
									if (t == (h >> 1)) {
										if (h & 1)
											bcB = 0;
										else
											bcA = 0;
									}
								}
							}
							bars();
						}
						float *bxA = lbx + 2 * t * 2 * AXF_LBUF, *bxB = bxA + 2 * AXF_LBUF;
						int *bpA = (int *)(bxA + AXF_LBUF), *bpB = (int *)(bxB + AXF_LBUF);
						const int p0 = (int)tile + grow, p8 = p0 + 8;
						if (pA0) {
							const uint32_t at = bcA + (uint32_t)__popc(BA0 & same & below);
							bxA[at] = a0, bpA[at] = p0;
						}
						if (pA2) {
							const uint32_t at = bcA + nA0 + (uint32_t)__popc(BA2 & same & below);
							bxA[at] = a2, bpA[at] = p8;
						}
						if (pB1) {
							const uint32_t at = bcB + (uint32_t)__popc(BB1 & same & below);
							bxB[at] = b1, bpB[at] = p0;
						}
						if (pB3) {
							const uint32_t at = bcB + nB1 + (uint32_t)__popc(BB3 & same & below);
							bxB[at] = b3, bpB[at] = p8;
						}
						bcA += nA;
						bcB += nB;
					}
				} else if (K && wv) { /* wv is warp-uniform */
					/* which lists have a candidate: lane 4·g + t owns columns 2t (A) and 2t+1 (B) of keys g, g+8,
					 * and its bars are those lists' k-th entries, so list h may have one only when a lane of
					 * t = h/2 has a value at or past its bar (≥: a superset, exact ties with a later position
					 * included; wl_offer16 applies the exact order); lists without one are skipped (their gather
					 * and ballots were most of a stage's work once the lists fill up) */
					const unsigned mA = __ballot_sync(FULLM, fmaxf(a0, a2) >= thAs);
					const unsigned mB = __ballot_sync(FULLM, fmaxf(b1, b3) >= thBs);
					if (mA | mB) {
						const unsigned b0 = __ballot_sync(FULLM, r0), b1 = __ballot_sync(FULLM, r1);
#pragma unroll
						for (int h = 0; h < NL; ++h) { /* lane l < 16 gathers key tile+l of column h */
							if (h < G && (((h & 1) ? mB : mA) & (0x11111111u << (h >> 1)))) { /* warp-uniform */
								const int src = ((lane & 7) << 2) | (h >> 1);
								const float ya = __shfl_sync(FULLM, (h & 1) ? x1 : x0, src);
								const float yb = __shfl_sync(FULLM, (h & 1) ? x3 : x2, src);
								const bool ok = lane < 16 && (((lane < 8 ? b0 : b1) >> src) & 1);
								wl_offer16<KB>(L[h], lane < 8 ? ya : yb, (int)tile + lane, ok, K);
							}
						}
						bars();
					}
				}
			} else {
				float p0, p1;
				if (MODE == AXF_M_LOGIT) {
					p0 = (cA ? x0 : 0.f) + (cB ? x1 : 0.f);
					p1 = (cA ? x2 : 0.f) + (cB ? x3 : 0.f);
				} else {
					p0 = (cA ? __expf(x0 - l0) : 0.f) + (cB ? __expf(x1 - l1) : 0.f);
					p1 = (cA ? __expf(x2 - l0) : 0.f) + (cB ? __expf(x3 - l1) : 0.f);
				}
				p0 += __shfl_xor_sync(FULLM, p0, 1);
				p1 += __shfl_xor_sync(FULLM, p1, 1);
				p0 += __shfl_xor_sync(FULLM, p0, 2);
				p1 += __shfl_xor_sync(FULLM, p1, 2);
				float *rd = red + (gi % AXF_NS) * AXF_NW * AXF_TS;
				if (t == 0) {
					rd[w * AXF_TS + grow] = p0;
					rd[w * AXF_TS + grow + 8] = p1;
					mbar_arrive(&redfull[gi % AXF_NS]); /* each writer releases its own two partials */
				}
				__syncwarp();
				if (w != AXF_NW - 1) {
					mbar_arrive(&empty[gi % AXF_NS]);
				} else { /* the reducer: stage i's 8 partials, then release the stage (buffer and partials) */
					mbar_wait(&redfull[gi % AXF_NS], (uint32_t)(gi / AXF_NS) & 1);
					float v = 0.f;
					if (lane < AXF_TS)
#pragma unroll
						for (int g = 0; g < AXF_NW; ++g)
							v += rd[g * AXF_TS + lane];
					mbar_arrive(&empty[gi % AXF_NS]); /* buffer and partials read */
					const bool ok = lane < nv;
					bad |= ok && !finite_f(v); /* a NaN/inf score, or (mean_prob) Σ exp overflowing; 0 is fine */
					v = MODE == AXF_M_LOGIT ? v * inv_h : logf(v * inv_h);
					if (ok)
						lse_add(mA, sA, v);
					if (K)
						wl_offer16<KB>(L[0], v, (int)tile + lane, ok, K);
				}
			}
		}
		g0 += nst;
		if (!jb.tblk) /* CTA-uniform */
			break;
		/* the next tail block: thread 0 draws it (a CTA takes blocks until it draws past the last), the CTA barrier
		 * hands it to every thread (two words in turn: a slow reader of one draw's word is past the barrier before
		 * the draw after next overwrites it) and puts every warp past the range's last stage */
		if (tid == 0)
			cfl[1 + (rg & 1)] = atomicAdd(a.tailc + jb.ticket, 1u) - jb.tbase;
		__syncthreads();
		const uint32_t b = cfl[1 + (rg & 1)];
		if (b >= jb.tblk)
			break;
		put_lse(); /* the range just streamed; the block's goes to slot S + b */
		slot = (uint32_t)S + b;
		start = (jb.tail0 + b * jb.tstg) * AXF_TS;
		end = min(n, start + jb.tstg * AXF_TS);
		nst = (int)((end - start + SK - 1) / SK);
		/* the range's first stages, as at the start (their buffers' last readers were the range before: the refill
		 * waits on their empty barriers); then each warp's next copy and index load */
		nxt = -1;
		if (prod) {
#pragma unroll
			for (int i = 0; i < AXF_NS - 1; ++i)
				if (i < nst) {
					const int gs = g0 + i;
					if (gs >= AXF_NS)
						mbar_wait(&empty[gs % AXF_NS], (uint32_t)((gs / AXF_NS) - 1) & 1);
					issue(i, slot_of(i));
				}
			if (!RW)
				nxt = slot_of(AXF_NS - 1);
		}
		turn = RW ? w : AXF_NS - 1;
		while (RW && turn < AXF_NS - 1)
			turn += RW;
		if (RW && w < RW && lane < AXF_TS)
			nxt = slot_of(turn);
		__syncwarp();
	}

	if (BUF && K && wv) { /* the buffered candidates (warp-uniform) */
#pragma unroll
		for (int h = 0; h < NL; ++h) {
			const uint32_t c = (uint32_t)__shfl_sync(FULLM, (int)((h & 1) ? bcB : bcA), h >> 1);
			if (h < G && c) {
				float *bx = lbx + h * 2 * AXF_LBUF;
				wl_flush(L[h], bx, (const int *)(bx + AXF_LBUF), c, K);
			}
		}
	}
	if (tid == 0)
		trace_at(a, AXF_TR_LOOP0, AXF_TR_LOOP1);
	if (lane == 0) {
		trace_at(a, -1, AXF_TR_WLOOP1);
		trace_at(a, -1, AXF_TR_N + (int)(blockIdx.x % AXF_TR_CTAS));
	}
	/* this split's partial rows (the last range's logsumexps, the lists; raw: the scores are written) */
	if (!RAW)
		put_lse();
	if (MODE == AXF_M_HEADS) {
		if (K && wv)
#pragma unroll
			for (int h = 0; h < NL; ++h)
				if (h < G)
					put_list<KB>(a, jb.ent0 + ((uint64_t)(w * G + h) * S + sl) * K, L[h], K);
	} else if (w == AXF_NW - 1) {
		if (K)
			put_list<KB>(a, jb.ent0 + (uint64_t)sl * K, L[0], K);
	}
	/* this split's flag word, written whatever it holds (nothing to zero beforehand; the merger ORs them) */
	if (rng || bad) /* rng: set only by producer lanes */
		atomicOr(cfl, (rng ? AXF_F_RANGE : 0u) | (bad ? AXF_F_DOM : 0u));
	__syncthreads(); /* every thread's partial writes before thread 0's fence below; every warp is past the loop,
			  * so the ring is free for the merge's staging */
	if (tid == 0) {
		a.part_f[jb.pf0 + (uint64_t)sl] = *cfl;
		trace_at(a, -1, AXF_TR_EPI1);
	}
	if (jb.sepm || jb.hm || jb.lse_out >= 0) /* CTA-uniform: the merge launch that follows, or the host, merges
						     * this pass-job; a logsumexp pass's partials are reduced by its
						     * probability pass (lse_rows) */
		return;

	/* ticket: the CTA that finishes the pass-job's last split merges it. One fence, by thread 0 after the CTA
	 * barrier (CUTLASS's semaphore release does the same): fence.sc is cumulative in the PTX memory model, so the
	 * partial rows every thread wrote before the barrier, and the flag word, precede the ticket's increment (a
	 * release pattern); the last CTA's fence after its increment (an acquire pattern) orders its merge's loads
	 * after every other CTA's writes. (Until session 4 every thread also fenced before the barrier: one more
	 * round of write acknowledgements on each CTA's tail.) */
	if (tid == 0) {
		__threadfence();
		const int last = atomicAdd(&a.tickets[jb.ticket], 1u) == (uint32_t)S - 1;
		if (last)
			a.tickets[jb.ticket] = 0;
		__threadfence();
		*flag = last;
	}
	__syncthreads();
	if (!*flag)
		return;
	if (tid == 0)
		trace_at(a, AXF_TR_MERGE0, AXF_TR_MERGE1);
	const int cap = (int)AXF_MERGE_CAP;
	float *es = (float *)(stg + (size_t)w * cap * 8);
	int *ep = (int *)(es + cap);
	if (MODE == AXF_M_HEADS) { /* a warp per row (its slice of the ring, its survivor scratch and count) */
		if (w == 0)
			put_flags(a, jb);
		for (int r = w; r < (int)jb.H; r += AXF_NW)
			merge_row(a, jb, r, xs + w * 64, xp + w * 64, es, ep, cap, (uint32_t *)red + 8 + w);
	} else { /* one row: the whole CTA (the ring holds the staging; red the bar and the count) */
		merge_row_cta(a, jb, 0, stg, xs, xp, red, MODE, 1);
	}
	if (a.done || a.trace) { /* CTA-uniform: this merge is a unit of the completion count */
		__syncthreads(); /* every warp's result writes before thread 0's release */
		if (tid == 0) {
			trace_at(a, -1, AXF_TR_MDONE1);
			signal_done(a);
		}
	}
}

/* The separate merge of heads lists (pass-jobs with sepm, after their split launch): CTA b merges rows
 * (b mod mg)·mrpc .. of pass-job b / mg, all rows of all pass-jobs at once. mrpc 1 (many splits): the CTA-wide
 * merge of one row (merge_row_cta: its 8 warps load and scan together, warp 0 sorts); mrpc AXF_NW (few splits,
 * knob merge_warp): a row per warp (merge_row, each warp with its slice of the ring), so many short rows take
 * 8 times fewer CTAs. Every CTA is one unit of the completion count. */
template <int KIND> /* AXF_MK_LISTS, AXF_MK_RAW (merge_row_raw) or AXF_MK_FEW (merge_row_few): instances apart, so
		      * each one's code is as it would be alone (the list merge's is sensitive: session 12) */
__global__ void __launch_bounds__(AXF_NW * 32, AXF_MINB) axf_merge_kernel(const __grid_constant__ axf_args a)
{
	AXF_DYN_SMEM(smem);
	griddep_launch();
	const int w = threadIdx.x >> 5;
	const uint32_t ji = blockIdx.x / a.mg, r0 = (blockIdx.x - ji * a.mg) * a.mrpc;
	if (threadIdx.x == 0)
		trace_at(a, AXF_TR_MK0, AXF_TR_MK1);
	const axf_job &jb = a.inl ? a.one : a.jobs[ji];
	if (!jb.sepm || r0 >= jb.H) { /* CTA-uniform; still a unit of the completion count */
		if (threadIdx.x == 0)
			signal_done(a);
		return;
	}
	if (a.pdl) /* launched while the split launch drains (knob pdl): its partial rows after it completed */
		griddep_wait();
	if (threadIdx.x == 0)
		trace_at(a, -1, AXF_TR_MKGO);
	float *xs = smem_xs(smem), *red = smem_red(smem);
	int *xp = (int *)(xs + AXF_NW * 64);
	if (a.mrpc == 1) {
		if (KIND == AXF_MK_RAW)
			merge_row_raw(a, jb, (int)r0, smem, xs, xp, red, r0 == 0);
		else
			merge_row_cta<1>(a, jb, (int)r0, smem, xs, xp, red, AXF_M_HEADS, r0 == 0);
		if (w != 0)
			return;
		__syncwarp(); /* warp 0's result writes (and, by the merge's CTA barriers, warp 1's flags) before lane 0 */
		if ((threadIdx.x & 31) == 0) {
			trace_at(a, -1, AXF_TR_MKDONE);
			signal_done(a);
		}
		return;
	}
	const int cap = (int)AXF_MERGE_CAP, r = (int)r0 + w;
	if (r0 == 0 && w == 0)
		put_flags(a, jb);
	if (KIND == AXF_MK_FEW && r < (int)jb.H) /* warp-uniform; ≤ AXF_FEW_ENTS entries (the plan's promise) */
		merge_row_few(a, jb, r, xs + w * 64, xp + w * 64);
	else if (KIND != AXF_MK_FEW && r < (int)jb.H)
		merge_row(a, jb, r, xs + w * 64, xp + w * 64, (float *)(smem + (size_t)w * cap * 8),
			  (int *)(smem + (size_t)w * cap * 8) + cap, cap, (uint32_t *)red + 8 + w);
	__syncthreads(); /* every warp's result writes before thread 0's release */
	if (threadIdx.x == 0) {
		trace_at(a, -1, AXF_TR_MKDONE);
		signal_done(a);
	}
}

/* ---- the driver ------------------------------------------------------------------------------------------------------ */
#ifndef AXF_EMU

typedef void (*axf_kfn)(axf_args);
static const axf_kfn axf_kernels[AXF_N_INST] = { /* axf_inst's numbering */
	axf_kernel<AXF_M_LOGIT, 0, 1, 2>, axf_kernel<AXF_M_LOGIT, 1, 1, 2>, axf_kernel<AXF_M_HEADS, 0, 4, 2>,
	axf_kernel<AXF_M_HEADS, 1, 4, 2>, axf_kernel<AXF_M_HEADS, 0, 8, 2>, axf_kernel<AXF_M_HEADS, 1, 8, 2>,
	axf_kernel<AXF_M_PROB, 0, 1, 2>,  axf_kernel<AXF_M_PROB, 1, 1, 2>,  axf_kernel<AXF_M_HEADS, 0, 4, 1>,
	axf_kernel<AXF_M_HEADS, 1, 4, 1>, axf_kernel<AXF_M_HEADS, 0, 8, 1>, axf_kernel<AXF_M_HEADS, 1, 8, 1>,
	/* knob prob_scores: the logsumexp passes that write the scores, the probability pass that reads them */
	axf_kernel<AXF_M_HEADS, 0, 4, 1, 1>, axf_kernel<AXF_M_HEADS, 1, 4, 1, 1>, axf_kernel<AXF_M_HEADS, 0, 8, 1, 1>,
	axf_kernel<AXF_M_HEADS, 1, 8, 1, 1>, axf_kernel<AXF_M_PROB, 0, 1, 2, 1>};
/* The raw kernels (KB 0) of the instances raw launches can have (heads, k ≤ AXF_TS: KB 1), by instance; else NULL. */
static const axf_kfn axf_kernels_raw[AXF_N_INST] = {
	NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, axf_kernel<AXF_M_HEADS, 0, 4, 0>,
	axf_kernel<AXF_M_HEADS, 1, 4, 0>, axf_kernel<AXF_M_HEADS, 0, 8, 0>, axf_kernel<AXF_M_HEADS, 1, 8, 0>,
	NULL, NULL, NULL, NULL, NULL};

struct ax_attn_fast {
	int device;
	uint32_t sms, occ;      /* SMs; the least occupancy (CTAs per SM) of the instances */
	uint32_t resident;      /* CTAs a launch is planned for: SMs × (knob ctas_per_sm, or occ) */
	cudaStream_t stream;    /* the context's */
	cudaEvent_t ev[2];      /* around the launches, when timing is on */
	int timing;
	float kernel_ms;        /* the last run's launches (timing on), or -1 */
	cudaError_t err;
	char *dbuf;             /* device scratch */
	size_t dcap;
	char *hbuf;             /* pinned staging (mapped: the kernels write the results into it) */
	char *hdev;             /* hbuf as the device addresses it */
	size_t hcap;
	uint32_t *tick;         /* tickets: zeroed when allocated, each pass-job's last CTA resets its own; tick[tcap]:
				 * the completion count (knob spin), reset by each run's last unit; then tcap tail
				 * counters (knob tail), zeroed when allocated, never reset: tbase follows them */
	size_t tcap;
	uint32_t *tbase;        /* host: each tail counter's value when the next run starts (a run adds tblk + S to
				 * the counter of each of its pass-jobs with a tail) */
	uint32_t *done_h;       /* the completion word (knob spin): pinned, mapped; done_d as the device addresses it */
	uint32_t *done_d;
	uint32_t seq;           /* the last run's completion value */
	uint64_t spin_miss;     /* runs whose wait ended by the stream query, not by the word (should stay 0) */
	size_t max_scratch;     /* device scratch a run may take (AX_ATTN_CUDA_MAX_SCRATCH; tests lower it) */
	uint64_t sc_fallback;   /* runs planned again without mean_prob's scores: no room for them (knob prob_scores) */
	unsigned long long *trace_d;    /* diagnostics (ax__attn_fast_trace): device slots, NULL = off */
	unsigned long long *trace_init; /* pinned: their values before a run (min slots ~0, max slots 0) */
	unsigned long long trace_last[AXF_TR_ALL]; /* the last run's */
	double host_us[6];      /* the last run on the host clock (ax__attn_fast_host_us) */
	/* knob graph: chains of kernel nodes by their length and edges (fast_graph), least recently used replaced */
	struct axf_gslot {
		uint32_t n, pdl;        /* nodes; bit i: node i waits for node i-1 as its programmatic dependent */
		uint64_t used;          /* the run that last launched it */
		cudaGraph_t g;
		cudaGraphExec_t x;
		cudaGraphNode_t node[AXF_KMAX];
	} gs[AXF_GSLOTS];
	uint64_t runs;
	/* result buffers the kernels write into directly (ax__attn_fast_results_alloc, session 18): page-locked,
	 * mapped; h the host address, d the device's */
	struct axf_zbuf {
		unsigned char *h, *d;
		size_t bytes;
	} zb[AXF_ZB_MAX];
	ax_attn_result *zrun;   /* this run's: the device address of its rows, or NULL (the staging and the finish) */
	axf_plan *plan;
	axf_split split;
	axf_pool pool;          /* helper threads for runs with many rows (knob threads) */
};

static int fast_fail(ax_attn_fast *f, cudaError_t e)
{
	f->err = e;
	return e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO;
}

int ax__attn_fast_eligible(const ax_attn_job *j)
{
	return j ? axf_eligible(j) : 0;
}

/* Shared-memory opt-in for every kernel (once, here: never per call), *occ = the least occupancy (CTAs per SM)
 * and *sms; *occ = 0 when the fast path cannot run here (not sm_90, kernels not built for this device, or any
 * query failing). Returns 0. */
static int fast_setup(int device, int *occ, int *sms_out)
{
	int major = 0, sms = 0;
	*occ = 0;
	if (cudaSetDevice(device) != cudaSuccess ||
	    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
	    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
		cudaGetLastError(); /* the generic path serves this device (and reports its own errors) */
		return 0;
	}
	if (major < 9)
		return 0;
	int least = INT_MAX;
	for (int i = 0; i <= 2 * AXF_N_INST + 1; i++) { /* the split kernels, the merge kernels, the raw kernels */
		cudaFuncAttributes fa;
		int o = 0;
		const void *fn = i < AXF_N_INST        ? (const void *)axf_kernels[i]
				 : i == AXF_N_INST     ? (const void *)axf_merge_kernel<AXF_MK_LISTS>
				 : i == 2 * AXF_N_INST + 1 ? (const void *)axf_merge_kernel<AXF_MK_FEW>
							   : (const void *)axf_kernels_raw[i - AXF_N_INST - 1];
		if (!fn)
			fn = (const void *)axf_merge_kernel<AXF_MK_RAW>; /* (the raw table's empty slots: the raw merge) */
		if (cudaFuncGetAttributes(&fa, fn) != cudaSuccess || fa.binaryVersion < 90 ||
		    cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)AXF_SMEM) != cudaSuccess ||
		    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&o, fn, AXF_NW * 32, AXF_SMEM) != cudaSuccess) {
			cudaGetLastError(); /* not built for this device: the generic path serves it */
			return 0;
		}
		least = o < least ? o : least;
	}
	*occ = least;
	*sms_out = sms;
	return 0;
}

/* CTAs a launch is planned for: SMs × CTAs per SM (a knob, or the occupancy). */
static uint32_t fast_resident(const ax_attn_fast *f, uint32_t per_sm)
{
	uint64_t r = (uint64_t)(per_sm ? per_sm : f->occ) * f->sms;
	return (uint32_t)(r < (1u << 24) ? r : (1u << 24));
}

/* Both wave targets from the knobs: every launch, and launches with heads lists. */
static void fast_waves(ax_attn_fast *f)
{
	const axf_knobs *k = &f->plan->kn;
	f->resident = fast_resident(f, k->ctas_per_sm);
	f->plan->res_lists = k->ctas_per_sm_heads ? fast_resident(f, k->ctas_per_sm_heads) : 0;
}

int ax__attn_fast_new(ax_attn_fast **out, int device, void *stream)
{
	if (!out)
		return -EINVAL;
	*out = NULL;
	const char *env = getenv("AX_ATTN_CUDA_FAST");
	if (env && strcmp(env, "0") == 0)
		return 0;
	int occ = 0, sms = 0, r = fast_setup(device, &occ, &sms);
	if (r || occ <= 0 || sms <= 0)
		return r;
	ax_attn_fast *f = (ax_attn_fast *)calloc(1, sizeof *f);
	axf_plan *p = (axf_plan *)calloc(1, sizeof *p);
	if (!f || !p) {
		free(f);
		free(p);
		return -ENOMEM;
	}
	f->device = device;
	f->sms = (uint32_t)sms, f->occ = (uint32_t)occ;
	f->stream = (cudaStream_t)stream;
	f->kernel_ms = -1.f;
	f->max_scratch = AX_ATTN_CUDA_MAX_SCRATCH;
	f->plan = p;
	const axf_knobs d = AXF_KNOBS_DEFAULT;
	p->kn = d;
	const long ncpu = sysconf(_SC_NPROCESSORS_ONLN); /* the default's helpers spin: at most half the CPUs */
	if (ncpu > 0 && p->kn.threads > (uint32_t)(ncpu / 2))
		p->kn.threads = (uint32_t)(ncpu / 2);
	axf_knobs_env(&p->kn); /* read once per state */
	fast_waves(f);
	*out = f;
	return 0;
}

void ax__attn_fast_knobs(ax_attn_fast *f, axf_knobs *get, const axf_knobs *set)
{
	if (!f)
		return;
	if (get)
		*get = f->plan->kn;
	if (set) {
		f->plan->kn = *set;
		fast_waves(f);
	}
}

int ax__attn_fast_timing(ax_attn_fast *f, int on)
{
	if (!f)
		return -EINVAL;
	if (on && !f->ev[0]) {
		cudaError_t e = cudaEventCreate(&f->ev[0]);
		if (e == cudaSuccess)
			e = cudaEventCreate(&f->ev[1]);
		if (e != cudaSuccess)
			return fast_fail(f, e);
	}
	f->timing = on != 0;
	return 0;
}

static double host_now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

void ax__attn_fast_host_us(const ax_attn_fast *f, double *out)
{
	memcpy(out, f->host_us, sizeof f->host_us);
}

int ax__attn_fast_trace(ax_attn_fast *f, int on)
{
	if (!f)
		return -EINVAL;
	if (on && !f->trace_d) {
		cudaError_t e = cudaMalloc((void **)&f->trace_d, AXF_TR_ALL * sizeof(unsigned long long));
		if (e == cudaSuccess)
			e = cudaHostAlloc((void **)&f->trace_init, AXF_TR_ALL * sizeof(unsigned long long), cudaHostAllocDefault);
		if (e != cudaSuccess) {
			cudaFree(f->trace_d);
			f->trace_d = NULL;
			return fast_fail(f, e);
		}
		static const int first[] = {AXF_TR_START0, AXF_TR_DATA0, AXF_TR_LOOP0, AXF_TR_MERGE0, AXF_TR_MK0};
		memset(f->trace_init, 0, AXF_TR_ALL * sizeof(unsigned long long));
		for (size_t i = 0; i < sizeof first / sizeof first[0]; i++)
			f->trace_init[first[i]] = ~0ull;
	}
	if (!on && f->trace_d) {
		cudaStreamSynchronize(f->stream);
		cudaFree(f->trace_d);
		cudaFreeHost(f->trace_init);
		f->trace_d = NULL, f->trace_init = NULL;
	}
	return 0;
}

void ax__attn_fast_trace_get(const ax_attn_fast *f, unsigned long long *out)
{
	memcpy(out, f->trace_last, sizeof f->trace_last);
}

uint64_t ax__attn_fast_spin_misses(const ax_attn_fast *f)
{
	return f ? f->spin_miss : 0;
}

void ax__attn_fast_limit_scratch(ax_attn_fast *f, size_t bytes)
{
	if (f)
		f->max_scratch = bytes && bytes < AX_ATTN_CUDA_MAX_SCRATCH ? bytes : AX_ATTN_CUDA_MAX_SCRATCH;
}

uint64_t ax__attn_fast_sc_fallbacks(const ax_attn_fast *f)
{
	return f ? f->sc_fallback : 0;
}

float ax__attn_fast_kernel_us(const ax_attn_fast *f)
{
	return f && f->kernel_ms >= 0 ? f->kernel_ms * 1e3f : -1.f;
}

void ax__attn_fast_free(ax_attn_fast *f)
{
	if (!f)
		return;
	cudaStreamSynchronize(f->stream);
	axf_pool_fini(&f->pool);
	if (f->ev[0])
		cudaEventDestroy(f->ev[0]);
	if (f->ev[1])
		cudaEventDestroy(f->ev[1]);
	cudaFree(f->dbuf);
	cudaFree(f->tick);
	free(f->tbase);
	cudaFreeHost(f->hbuf);
	cudaFreeHost(f->done_h);
	cudaFree(f->trace_d);
	cudaFreeHost(f->trace_init);
	for (int i = 0; i < AXF_ZB_MAX; i++)
		if (f->zb[i].h)
			cudaFreeHost(f->zb[i].h);
	for (int i = 0; i < AXF_GSLOTS; i++) {
		if (f->gs[i].x)
			cudaGraphExecDestroy(f->gs[i].x);
		if (f->gs[i].g)
			cudaGraphDestroy(f->gs[i].g);
	}
	axf_plan_free(f->plan);
	axf_split_fini(&f->split);
	free(f);
}

ax_attn_result *ax__attn_fast_results_alloc(ax_attn_fast *f, size_t rows)
{
	if (!f || rows == 0 || rows > SIZE_MAX / sizeof(ax_attn_result) || cudaSetDevice(f->device) != cudaSuccess) {
		cudaGetLastError();
		return NULL;
	}
	int i = 0;
	while (i < AXF_ZB_MAX && f->zb[i].h)
		i++;
	if (i == AXF_ZB_MAX)
		return NULL;
	void *h = NULL, *d = NULL;
	const size_t bytes = rows * sizeof(ax_attn_result);
	if (cudaHostAlloc(&h, bytes, cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess) {
		cudaGetLastError(); /* not the context's error: the caller takes other memory */
		return NULL;
	}
	if (cudaHostGetDevicePointer(&d, h, 0) != cudaSuccess) {
		cudaGetLastError();
		cudaFreeHost(h);
		return NULL;
	}
	f->zb[i].h = (unsigned char *)h, f->zb[i].d = (unsigned char *)d, f->zb[i].bytes = bytes;
	return (ax_attn_result *)h;
}

int ax__attn_fast_results_free(ax_attn_fast *f, ax_attn_result *r)
{
	for (int i = 0; f && r && i < AXF_ZB_MAX; i++) {
		if (f->zb[i].h == (unsigned char *)r) {
			cudaFreeHost(r);
			f->zb[i].h = f->zb[i].d = NULL, f->zb[i].bytes = 0;
			return 1;
		}
	}
	return 0;
}

/* The device address of rows out .. out + rows − 1 when they lie in one of f's result buffers, else NULL. */
static ax_attn_result *fast_zout(const ax_attn_fast *f, const ax_attn_result *out, uint64_t rows)
{
	const unsigned char *o = (const unsigned char *)out;
	for (int i = 0; i < AXF_ZB_MAX; i++) {
		const struct ax_attn_fast::axf_zbuf *z = &f->zb[i];
		if (z->h && o >= z->h && (uint64_t)(o - z->h) % sizeof(ax_attn_result) == 0 &&
		    rows <= (z->bytes - (size_t)(o - z->h)) / sizeof(ax_attn_result))
			return (ax_attn_result *)(z->d + (o - z->h));
	}
	return NULL;
}

int ax__attn_fast_take_error(ax_attn_fast *f)
{
	if (!f)
		return 0;
	int e = (int)f->err;
	f->err = cudaSuccess;
	return e;
}

/* The tail counters and their bases back to 0 (after a run that may not have made all its draws). If the counters
 * cannot be zeroed, this state plans no more tails (knob tail 0): bases out of step with their counters would have
 * every draw come back past the last block, and a run would silently miss its tail blocks. */
static void fast_tail_reset(ax_attn_fast *f)
{
	cudaStreamSynchronize(f->stream);
	if (cudaMemsetAsync(f->tick + f->tcap + 1, 0, f->tcap * sizeof(uint32_t), f->stream) != cudaSuccess ||
	    cudaStreamSynchronize(f->stream) != cudaSuccess)
		f->plan->kn.tail = 0;
	memset(f->tbase, 0, f->tcap * sizeof(uint32_t));
}

/* Grow the device scratch, the tickets (zeroed) and the pinned staging to the plan (contents not kept). */
static int fast_reserve(ax_attn_fast *f, const axf_layout *y, uint32_t njb)
{
	cudaError_t e;
	if (y->total > f->max_scratch)
		return -ENOMEM;
	if (njb > f->tcap) {
		size_t cap = njb < 1024 ? 1024 : (size_t)njb * 2;
		cudaStreamSynchronize(f->stream);
		cudaFree(f->tick);
		free(f->tbase);
		f->tick = NULL, f->tbase = NULL, f->tcap = 0;
		/* zeroed on the context's stream: ordered before the kernels (a plain cudaMemset is not: the stream is
		 * non-blocking) */
		if (!(f->tbase = (uint32_t *)calloc(cap, sizeof(uint32_t))))
			return -ENOMEM;
		if ((e = cudaMalloc((void **)&f->tick, (2 * cap + 1) * sizeof(uint32_t))) != cudaSuccess ||
		    (e = cudaMemsetAsync(f->tick, 0, (2 * cap + 1) * sizeof(uint32_t), f->stream)) != cudaSuccess)
			return fast_fail(f, e);
		f->tcap = cap;
	}
	if (!f->done_h) {
		if ((e = cudaHostAlloc((void **)&f->done_h, 64, cudaHostAllocMapped)) != cudaSuccess)
			return fast_fail(f, e);
		*f->done_h = 0;
		if (cudaHostGetDevicePointer((void **)&f->done_d, f->done_h, 0) != cudaSuccess) {
			cudaGetLastError();
			f->done_d = f->done_h;
		}
	}
	if (y->total > f->dcap) {
		cudaStreamSynchronize(f->stream);
		cudaFree(f->dbuf);
		f->dbuf = NULL, f->dcap = 0;
		if ((e = cudaMalloc((void **)&f->dbuf, y->total)) != cudaSuccess)
			return fast_fail(f, e);
		f->dcap = y->total;
	}
	if (y->off_dev > f->hcap) {
		cudaStreamSynchronize(f->stream); /* kernels may still write into the old staging */
		cudaFreeHost(f->hbuf);
		f->hbuf = f->hdev = NULL, f->hcap = 0;
		if ((e = cudaHostAlloc((void **)&f->hbuf, y->off_dev, cudaHostAllocMapped)) != cudaSuccess)
			return fast_fail(f, e);
		if (cudaHostGetDevicePointer((void **)&f->hdev, f->hbuf, 0) != cudaSuccess) {
			cudaGetLastError(); /* unified addressing (every 64-bit sm_90 process): the host pointer works */
			f->hdev = f->hbuf;
		}
		f->hcap = y->off_dev;
	}
	return 0;
}

/* One kernel of a run: its function, CTAs and arguments (a.pdl: launched as a programmatic dependent). */
typedef struct axf_kl {
	const void *fn;
	uint32_t ctas;
	axf_args a;
} axf_kl;

/* One kernel on the context's stream; a.pdl: as a programmatic dependent of the kernel before it (knob pdl).
 * cudaLaunchKernelExC either way (session 8, capture/dev/launch_cost.cu on H200 hosts: its call without attributes
 * took 3.2 µs against cudaLaunchKernel's 4.3 in run 45, the same 4.1 in run 48; end to end equal or better, run 46). */
static cudaError_t fast_kernel(ax_attn_fast *f, const axf_kl *k)
{
	void *argv[] = {(void *)&k->a};
	cudaLaunchAttribute at[1];
	at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
	at[0].val.programmaticStreamSerializationAllowed = 1;
	cudaLaunchConfig_t cfg = {};
	cfg.gridDim = dim3(k->ctas), cfg.blockDim = dim3(AXF_NW * 32), cfg.dynamicSmemBytes = AXF_SMEM;
	cfg.stream = f->stream, cfg.attrs = at, cfg.numAttrs = k->a.pdl ? 1 : 0;
	return cudaLaunchKernelExC(&cfg, k->fn, argv);
}

/* A launch's split kernel and, when it has one, its merge kernel, appended to k[*nk ..]; with the completion word
 * when `seq` is not 0. Knob pdl: the merge kernel, and a mean_prob launch (its logsumexps come from an earlier
 * launch), are launched as programmatic dependents (the kernels wait with griddepcontrol.wait before reading what
 * the one before wrote; in a graph, knob graph, through programmatic edges). */
static void fast_launch(ax_attn_fast *f, const axf_launch *L, uint32_t seq, axf_kl *k, int *nk)
{
	axf_args a = axf_plan_args(f->plan, f->dbuf, f->hdev, f->tick, f->tick + f->tcap + 1, L);
	if (seq)
		a.done_cnt = f->tick + f->tcap, a.done = f->done_d, a.units = (uint32_t)f->plan->units, a.seq = seq;
	a.trace = f->trace_d;
	a.zout = f->zrun;
	const int pdl = f->plan->kn.pdl != 0;
	a.pdl = pdl && axf_inst_mode(L->inst) == AXF_M_PROB;
	k[*nk].fn = (const void *)(L->raw ? axf_kernels_raw[L->inst] : axf_kernels[L->inst]), k[*nk].ctas = L->ctas,
	k[*nk].a = a;
	++*nk;
	if (L->mg) {
		a.pdl = pdl;
		k[*nk].fn = L->raw   ? (const void *)axf_merge_kernel<AXF_MK_RAW>
			    : L->few ? (const void *)axf_merge_kernel<AXF_MK_FEW>
				     : (const void *)axf_merge_kernel<AXF_MK_LISTS>;
		k[*nk].ctas = L->nj * L->mg, k[*nk].a = a; /* mg: CTAs per job */
		++*nk;
	}
}

/* A kernel node's parameters for k (its arguments at &k->a: copied when the node is added or updated). */
static cudaKernelNodeParams fast_node(const axf_kl *k, void **argv)
{
	cudaKernelNodeParams np = {};
	argv[0] = (void *)&k->a;
	np.func = (void *)k->fn, np.gridDim = dim3(k->ctas), np.blockDim = dim3(AXF_NW * 32);
	np.sharedMemBytes = AXF_SMEM, np.kernelParams = argv;
	return np;
}

/*
 * A run's n kernels as one graph launch (knob graph; session 8): a chain of n kernel nodes, node i after node i-1 —
 * as its programmatic dependent when kernel i is launched as one (a.pdl: an edge from the programmatic port, so its
 * griddepcontrol.wait works as in a stream), else after it ends. A chain is built and instantiated on the state's
 * first run with its length and edges and kept (AXF_GSLOTS of them, the least recently used replaced); each run
 * updates every node (function, CTAs, arguments: cudaGraphExecKernelNodeSetParams allows all three to change) and
 * launches it: one launch call instead of n (launch_cost.cu on an H200: a graph launch's call with its update takes
 * 1.7-1.9 µs against 3.2-4.3 µs a kernel, a round trip 6.1-6.6 µs against 7.8-8.9; two kernels 8.3-9.4 against
 * 11.0-12.4).
 */
static cudaError_t fast_graph(ax_attn_fast *f, const axf_kl *k, int n)
{
	cudaError_t e = cudaSuccess;
	void *argv[AXF_KMAX][1];
	uint32_t pdl = 0;
	for (int i = 1; i < n; i++)
		pdl |= (k[i].a.pdl ? 1u : 0u) << i;
	struct ax_attn_fast::axf_gslot *gs = NULL, *old = &f->gs[0];
	for (int i = 0; i < AXF_GSLOTS && !gs; i++) {
		if (f->gs[i].x && f->gs[i].n == (uint32_t)n && f->gs[i].pdl == pdl)
			gs = &f->gs[i];
		else if (f->gs[i].used < old->used)
			old = &f->gs[i];
	}
	f->runs++;
	if (!gs) { /* build it in the least recently used slot (never used: 0) */
		gs = old;
		if (gs->x) {
			cudaGraphExecDestroy(gs->x);
			cudaGraphDestroy(gs->g);
			gs->x = NULL, gs->g = NULL;
		}
		cudaGraph_t g = NULL;
		if ((e = cudaGraphCreate(&g, 0)) != cudaSuccess)
			return e;
		for (int i = 0; i < n && e == cudaSuccess; i++) {
			const cudaKernelNodeParams np = fast_node(&k[i], argv[i]);
			e = cudaGraphAddKernelNode(&gs->node[i], g, NULL, 0, &np);
			if (e == cudaSuccess && i) {
				cudaGraphEdgeData ed = {};
				if (k[i].a.pdl)
					ed.from_port = cudaGraphKernelNodePortProgrammatic, ed.type = cudaGraphDependencyTypeProgrammatic;
				e = cudaGraphAddDependencies(g, &gs->node[i - 1], &gs->node[i], &ed, 1);
			}
		}
		if (e == cudaSuccess)
			e = cudaGraphInstantiate(&gs->x, g, 0);
		if (e != cudaSuccess) {
			cudaGraphDestroy(g);
			gs->x = NULL;
			return e;
		}
		gs->g = g, gs->n = (uint32_t)n, gs->pdl = pdl;
	} else {
		for (int i = 0; i < n && e == cudaSuccess; i++) {
			const cudaKernelNodeParams np = fast_node(&k[i], argv[i]);
			e = cudaGraphExecKernelNodeSetParams(gs->x, gs->node[i], &np);
		}
		if (e != cudaSuccess) { /* the slot is dropped: the next run with this chain builds it afresh */
			cudaGraphExecDestroy(gs->x);
			cudaGraphDestroy(gs->g);
			gs->x = NULL, gs->g = NULL, gs->used = 0;
			return e;
		}
	}
	gs->used = f->runs;
	return cudaGraphLaunch(gs->x, f->stream);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	asm volatile("yield" ::: "memory");
#endif
}

/*
 * Wait for the run with completion value seq (knob spin): spin on the completion word (an acquire load: the
 * results it publishes are visible once it reads seq; signal_done explains the device side). Every 256 polls the
 * stream is queried, so a CUDA error (a fault kills the kernels: the word never comes) is reported, and a stream
 * that completed without the word (not expected: counted in spin_miss) ends the wait as cudaStreamSynchronize
 * would. Bounded by the stream's own completion, as a synchronisation is.
 */
static cudaError_t fast_wait(ax_attn_fast *f, uint32_t seq)
{
	for (uint32_t i = 1;; i++) {
		if (__atomic_load_n(f->done_h, __ATOMIC_ACQUIRE) == seq)
			return cudaSuccess;
		if ((i & 255) == 0) {
			cudaError_t e = cudaStreamQuery(f->stream);
			if (e == cudaErrorNotReady)
				continue;
			if (e == cudaSuccess && __atomic_load_n(f->done_h, __ATOMIC_ACQUIRE) != seq)
				f->spin_miss++;
			return e;
		}
		cpu_relax();
	}
}

int ax__attn_fast_run(ax_attn_fast *f, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc)
{
	if (!f || (n && (!jobs || !out || !rc)))
		return -EINVAL;
	if (n == 0)
		return 0;
	axf_plan *p = f->plan;
	if (!f->timing)
		f->kernel_ms = -1.f;
	const double t0 = host_now_us();
	int r = axf_plan_build(p, jobs, n, rc, f->resident);
	if (r || p->nl == 0)
		return r;
	cudaError_t e = cudaSetDevice(f->device);
	if (e != cudaSuccess)
		return fast_fail(f, e);
	if ((r = fast_reserve(f, &p->lay, p->njb)) == -ENOMEM && p->scs) {
		/* no room for mean_prob's scores (knob prob_scores: up to AXF_SC_MAX_MIB more scratch): the same run
		 * planned on the two passes over K, which need less; the failed allocation is not this run's error */
		const uint32_t keep = p->kn.prob_scores;
		cudaGetLastError();
		f->err = cudaSuccess;
		p->kn.prob_scores = 0;
		r = axf_plan_build(p, jobs, n, rc, f->resident);
		p->kn.prob_scores = keep;
		if (r == 0)
			r = fast_reserve(f, &p->lay, p->njb);
		f->sc_fallback += r == 0;
	}
	if (r)
		return r;
	/* results straight into the caller's rows when they are in one of our mapped buffers (session 18) */
	f->zrun = fast_zout(f, out, p->rows);
	p->zc = f->zrun != NULL;
	uint32_t seq = 0;
	if (p->kn.spin) {
		seq = ++f->seq ? f->seq : ++f->seq; /* never 0: 0 = no completion word */
	}
	int tail = 0;
	for (uint32_t k = 0; k < p->njb; k++) { /* the tail counters' bases: this run's draws start where the last
						  * run's ended (tblk + S draws a pass-job) */
		axf_job *jb = &p->jb[k];
		if (jb->tblk) {
			jb->tbase = f->tbase[jb->ticket];
			f->tbase[jb->ticket] += jb->tblk + jb->S;
			tail = 1;
		}
	}
	e = cudaSuccess;
	const double tp = host_now_us();
	if (p->upload) { /* a launch of several pass-jobs reads its table from the device */
		axf_plan_tables(p, f->hbuf);
		e = cudaMemcpyAsync(f->dbuf, f->hbuf, p->lay.up, cudaMemcpyHostToDevice, f->stream);
	}
	if (e == cudaSuccess && f->trace_d)
		e = cudaMemcpyAsync(f->trace_d, f->trace_init, AXF_TR_ALL * sizeof(unsigned long long), cudaMemcpyHostToDevice,
				    f->stream);
	if (e == cudaSuccess && f->timing)
		e = cudaEventRecord(f->ev[0], f->stream);
	r = e == cudaSuccess ? 0 : fast_fail(f, e);
	const double tu = host_now_us();
	axf_kl kl[AXF_KMAX];
	int nk = 0;
	for (uint32_t l = 0; l < p->nl; l++) /* in plan order: mean_prob's logsumexps first */
		fast_launch(f, &p->L[l], seq, kl, &nk);
	if (r == 0) {
		if (axf_plan_graph(p)) {
			e = fast_graph(f, kl, nk);
		} else {
			for (int i = 0; e == cudaSuccess && i < nk; i++)
				e = fast_kernel(f, &kl[i]);
		}
		if (e != cudaSuccess)
			r = fast_fail(f, e);
	}
	if (r == 0 && f->timing && (e = cudaEventRecord(f->ev[1], f->stream)) != cudaSuccess)
		r = fast_fail(f, e);
	if (r) {
		cudaStreamSynchronize(f->stream); /* the next run rewrites the staging the upload may still read */
		if (seq) /* some units may have counted: the next run starts from 0 */
			cudaMemsetAsync(f->tick + f->tcap, 0, sizeof(uint32_t), f->stream);
		if (tail) /* some draws may have happened: counters and bases start again from 0 */
			fast_tail_reset(f);
		return r;
	}
	const double t1 = host_now_us();
	const uint32_t nt = axf_pool_ready(&f->pool, p->kn.threads, p->rows);
	if (nt > 1) /* the results' frame, while the kernels run: on nt threads, or the caller's alone */
		axf_pool_start(&f->pool, nt, p, jobs, out, f->hbuf);
	else
		axf_plan_prefill(p, jobs, out);
	const double t2 = host_now_us();
	e = seq ? fast_wait(f, seq) : cudaStreamSynchronize(f->stream); /* then the results are in the mapped staging */
	const double t3 = host_now_us();
	if (e == cudaSuccess && f->timing)
		e = cudaEventSynchronize(f->ev[1]);
	if (e == cudaSuccess && f->timing)
		e = cudaEventElapsedTime(&f->kernel_ms, f->ev[0], f->ev[1]);
	if (e == cudaSuccess && f->trace_d) {
		e = cudaMemcpyAsync(f->trace_last, f->trace_d, sizeof f->trace_last, cudaMemcpyDeviceToHost, f->stream);
		if (e == cudaSuccess)
			e = cudaStreamSynchronize(f->stream);
	}
	if (e != cudaSuccess) {
		if (nt > 1)
			axf_pool_finish(&f->pool, 0);
		if (tail)
			fast_tail_reset(f);
		return fast_fail(f, e);
	}
	axf_plan_hmerge(p, f->hbuf); /* host-merged pass-jobs: their rows and flag words first */
	axf_plan_codes(p, f->hbuf, rc);
	if (nt > 1)
		axf_pool_finish(&f->pool, 1);
	else
		axf_finish_range(p, f->hbuf, jobs, out, 0, p->n);
	r = 0;
	const double t4 = host_now_us();
	f->host_us[0] = t1 - t0, f->host_us[1] = t2 - t1, f->host_us[2] = t3 - t2, f->host_us[3] = t4 - t3;
	f->host_us[4] = tp - t0, f->host_us[5] = tu - tp;
	return r;
}

static int fast_runner(void *ctx, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc)
{
	return ax__attn_fast_run((ax_attn_fast *)ctx, jobs, n, out, rc);
}

int ax__attn_fast_dispatch(ax_attn_fast *f, const ax_attn_job *jobs, uint32_t n, ax_attn_result *out, int *rc,
			   axf_runner generic, void *gctx)
{
	if (!f)
		return generic(gctx, jobs, n, out, rc);
	return axf_dispatch(&f->split, jobs, n, out, rc, fast_runner, f, generic, gctx);
}
#endif /* AXF_EMU */
